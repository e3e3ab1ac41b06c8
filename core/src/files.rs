//! One rule for files that hold secrets (keys, PINs, keytabs) and the directories that
//! hold them: group and others get no access at all. The callers read the metadata (this
//! crate does no I/O); the rule and its message, which names the `chmod` to run, live
//! here once.

use std::fs::Metadata;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Refuses `path` (its metadata `meta`) when group or others have any permission on it;
/// `what` names it in the message (`"key file"`, `"host_key_path"`).
pub fn check_private(what: &str, path: &Path, meta: &Metadata) -> Result<(), String> {
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let fix = if meta.is_dir() { "700" } else { "600" };
    Err(format!(
        "{what} {} has mode {mode:03o}: it must not be accessible to group or others \
         (chmod {fix} {})",
        path.display(),
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::fs::Permissions;

    #[test]
    fn only_owner_only_modes_pass_and_the_message_names_the_fix() {
        let dir = std::env::temp_dir().join(format!("carapace-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, b"k").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o700, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&file, Permissions::from_mode(mode)).unwrap();
            let meta = std::fs::metadata(&file).unwrap();
            let r = check_private("key file", &file, &meta);
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains(&format!("has mode {mode:03o}")), "{e}");
                assert!(e.contains("chmod 600"), "{e}");
            }
        }
        std::fs::set_permissions(&dir, Permissions::from_mode(0o750)).unwrap();
        let e =
            check_private("data directory", &dir, &std::fs::metadata(&dir).unwrap()).unwrap_err();
        assert!(e.contains("chmod 700"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
