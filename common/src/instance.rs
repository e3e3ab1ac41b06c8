//! One running instance per data directory ([`lock_data_dir`]), and a bounded exit
//! ([`SHUTDOWN_GRACE`], [`run_main`]).

use std::io::{ErrorKind, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use rustix::fs::{FlockOperation, Mode, OFlags};

/// How long a binary waits, after SIGTERM or Ctrl-C, for its streams and calls to end
/// before it closes them and exits anyway, unless its `shutdown_grace` says otherwise.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The longest `shutdown_grace` a config may set: a stop must stay bounded.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(300);

/// The `shutdown_grace` of a config file: [`SHUTDOWN_GRACE`] when unset; a value over
/// [`MAX_SHUTDOWN_GRACE`] is a problem, named with its key.
pub fn shutdown_grace(value: Option<Duration>, problems: &mut Vec<String>) -> Duration {
    let grace = value.unwrap_or(SHUTDOWN_GRACE);
    if grace > MAX_SHUTDOWN_GRACE {
        problems.push(format!(
            "shutdown_grace: {} is outside 0s..{}",
            humantime::format_duration(grace),
            humantime::format_duration(MAX_SHUTDOWN_GRACE)
        ));
    }
    grace.min(MAX_SHUTDOWN_GRACE)
}

/// How long the runtime waits at exit for blocking work (a stuck device call) to return.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = ".lock";

/// The exclusive lock on a data directory: held while this value lives (and released by
/// the kernel when the process ends, however it ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl DataDirLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes an exclusive `flock` on `<data_dir>/.lock` (created 0600 if missing, never
/// through a symbolic link) and writes this process's pid into it. When another process
/// holds it, fails with a message naming `program` and that process's pid.
pub fn lock_data_dir(data_dir: &Path, program: &str) -> Result<DataDirLock, String> {
    let path = data_dir.join(LOCK_FILE);
    let shown = path.display();
    let fd = rustix::fs::open(
        &path,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| format!("cannot open the lock file {shown}: {e}"))?;
    let mut file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("lock file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("lock file {shown} is not a regular file"));
    }
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "pid unknown".to_owned(),
            };
            return Err(format!(
                "data directory {} is in use by another {program} ({holder}, holding {shown}); stop it first, or give this one another data directory",
                data_dir.display()
            ));
        }
        Err(e) => return Err(format!("cannot lock {shown}: {e}")),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(|e| format!("cannot write the lock file {shown}: {e}"))?;
    Ok(DataDirLock { _file: file, path })
}

/// Runs a binary's async `main` on a multi-threaded runtime, then shuts the runtime down
/// without waiting more than a second for blocking work still running, so that a stuck
/// device or file-system call cannot keep the process from exiting.
pub fn run_main(main: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    run_main_with(main, |_| {})
}

/// As [`run_main`], with `configure` adjusting the runtime first (the agent bounds its
/// blocking pool).
pub fn run_main_with(
    main: impl std::future::Future<Output = ExitCode>,
    configure: impl FnOnce(&mut tokio::runtime::Builder),
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    configure(&mut builder);
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(main);
    rt.shutdown_timeout(BLOCKING_GRACE);
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_second_lock_on_a_data_dir_fails_naming_the_holder() {
        let t = tempfile::tempdir().unwrap();
        let first = lock_data_dir(t.path(), "carapace-test").unwrap();
        assert_eq!(
            std::fs::metadata(first.path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_to_string(first.path()).unwrap().trim(),
            std::process::id().to_string()
        );
        // flock locks belong to the open file: a second open in this process conflicts
        // like another process would.
        let e = lock_data_dir(t.path(), "carapace-test").unwrap_err();
        assert!(
            e.contains("in use by another carapace-test")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        let again = lock_data_dir(t.path(), "carapace-test").unwrap();
        drop(again);
    }

    #[test]
    fn a_lock_file_that_is_a_symlink_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("elsewhere");
        std::fs::write(&target, "keep me").unwrap();
        std::os::unix::fs::symlink(&target, t.path().join(LOCK_FILE)).unwrap();
        let e = lock_data_dir(t.path(), "carapace-test").unwrap_err();
        assert!(e.contains("cannot open the lock file"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    }
}
