//! Files an operator could name where Carapace expects a small regular file (a config
//! file, a trust bundle), which it must refuse promptly without reading them to the end.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// A character device (`/dev/zero`, endless), a FIFO (no writer: a read would block
/// forever), a directory, and a 2 MiB file that is valid TOML (one comment line) but
/// over the 1 MiB cap; the FIFO and the big file are made in `dir`. Each comes with the
/// words its refusal must contain.
pub fn not_small_regular_files(dir: &Path) -> Result<Vec<(PathBuf, &'static str)>> {
    let fifo = dir.join("fifo.toml");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map_err(|e| Error::Other(format!("cannot run mkfifo: {e}")))?;
    if !made.success() {
        return Err(Error::Other(format!("mkfifo {} failed", fifo.display())));
    }
    let huge = dir.join("huge.toml");
    std::fs::write(&huge, format!("#{}\n", "x".repeat(2 << 20)))
        .map_err(|e| Error::Other(format!("cannot write {}: {e}", huge.display())))?;
    Ok(vec![
        (PathBuf::from("/dev/zero"), "is a character device"),
        (fifo, "is a FIFO"),
        (dir.to_path_buf(), "is a directory"),
        (huge, "is 2097154 bytes, more than the 1048576 allowed"),
    ])
}
