//! One rule for files that hold secrets (keys, PINs, keytabs) and the directories that
//! hold them: group and others get no access at all. The callers read the metadata (this
//! crate does no I/O); the rule and its message, which names the `chmod` to run, live
//! here once.
//!
//! [`NamedFile`] is how a plugin's settings say which files they name and how the plugin
//! uses each, so that `validate` (carapace-common's `check_named_file`) checks them the
//! way the plugin will, without the plugin being built.

use std::fs::Metadata;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// How a plugin uses a file one of its settings names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileUse {
    /// A regular file it reads (certificates, a CA list, a PKCS#11 module).
    Read,
    /// A regular file holding a secret (a key, a PIN, a keytab): read, and refused when
    /// group or others have any access ([`check_private`]).
    Secret,
    /// A directory it creates (mode 0700) when missing, refuses when group or others
    /// have any access, and writes files into.
    PrivateDir,
    /// A character device it opens for reading and writing (a TPM).
    Device,
}

/// A file a plugin setting names: the setting, the path as the plugin resolves it, and
/// how the plugin uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    /// The setting as written in the plugin's table (`pin_file`, `ek_ca_files`,
    /// `tenants.<id>.keys_path`).
    pub setting: String,
    /// The path the plugin will open (a relative setting resolved as the plugin does).
    pub path: PathBuf,
    /// What the plugin does with it.
    pub usage: FileUse,
    /// `true` when the plugin reads it as the process starts; `false` when only at its
    /// first use (the agent's keytab is read at each attestation, so a host may join its
    /// realm after the agent started).
    pub at_start: bool,
}

impl NamedFile {
    /// A file read at start.
    pub fn new(setting: impl Into<String>, path: impl Into<PathBuf>, usage: FileUse) -> Self {
        NamedFile {
            setting: setting.into(),
            path: path.into(),
            usage,
            at_start: true,
        }
    }

    /// The same file, read only at its first use.
    pub fn at_use(self) -> Self {
        NamedFile {
            at_start: false,
            ..self
        }
    }
}

/// The key id of a key manager's key file `<id>.<extension>` when `<id>` is a valid key
/// id, or `None` for any other file, which the key manager skips when it loads its
/// directory.
pub fn key_id_of_file<'a>(path: &'a Path, extension: &str) -> Option<&'a str> {
    path.file_name()?
        .to_str()?
        .strip_suffix(extension)?
        .strip_suffix('.')
        .filter(|id| crate::plugin::validate_key_id(id).is_ok())
}

/// A key manager's key directory as `validate` checks it (setting `directory`): the
/// directory (private) and, sorted, each file of `listing` (the directory's entries, which
/// the caller reads: core does no I/O) that the key manager would load (secret).
pub fn key_directory_files(
    dir: &Path,
    listing: impl IntoIterator<Item = PathBuf>,
    extension: &str,
) -> Vec<NamedFile> {
    let mut keys: Vec<PathBuf> = listing
        .into_iter()
        .filter(|p| key_id_of_file(p, extension).is_some())
        .collect();
    keys.sort();
    std::iter::once(NamedFile::new("directory", dir, FileUse::PrivateDir))
        .chain(
            keys.into_iter()
                .map(|p| NamedFile::new("directory", p, FileUse::Secret)),
        )
        .collect()
}

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
