//! A small tmpfs of its own, to run a datastore on a disk that fills up.
//!
//! [`Tmpfs::mount`] mounts a size-capped tmpfs on a fresh temporary directory (mode 0700);
//! dropping it unmounts it (lazily, so a process still holding files there cannot keep
//! the mount alive) and removes the directory. [`Tmpfs::fill`] fills what is left with
//! one file of its own, and [`Tmpfs::free`] deletes that file again: the disk-full fault
//! and its repair, with nothing else touched.
//!
//! Mounting needs `CAP_SYS_ADMIN` (root): without it [`Tmpfs::mount`] fails with a message
//! saying so, it never skips.

use std::io::Write;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::{Error, Result};

/// The file [`Tmpfs::fill`] writes.
const FILLER: &str = ".filler";

/// A mounted, size-capped tmpfs; unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` (rounded up to whole pages by the kernel) on a new
    /// temporary directory.
    pub fn mount(size_bytes: u64) -> Result<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("carapace-tmpfs-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let options = std::ffi::CString::new(format!("size={size_bytes},mode=0700"))
            .map_err(|e| Error::Other(format!("tmpfs options: {e}")))?;
        rustix::mount::mount(
            "carapace-tmpfs",
            dir.path(),
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            options.as_c_str(),
        )
        .map_err(|e| {
            Error::Other(format!(
                "mounting a {size_bytes}-byte tmpfs on {}: {e} (this test needs root, or \
                 CAP_SYS_ADMIN, to mount a small filesystem it can fill)",
                dir.path().display()
            ))
        })?;
        Ok(Tmpfs { dir, mounted: true })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the free space with one file (this fixture's own), until the kernel says
    /// `ENOSPC`. Returns how many bytes it wrote.
    pub fn fill(&self) -> Result<u64> {
        let path = self.filler();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let block = vec![0u8; 4096];
        let mut written = 0u64;
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => {
                    break;
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Ok(written)
    }

    /// Deletes the file [`fill`](Self::fill) wrote and waits until its space is free
    /// again. Nothing to do if it was not filled.
    ///
    /// The kernel returns a file's pages when its last descriptor closes, not at unlink:
    /// a child another thread of this process forks holds a copy of every descriptor
    /// until it execs, so the space can come back a moment after the delete.
    pub fn free(&self) -> Result<()> {
        let path = self.filler();
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let before = self.available()?;
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.available()? < before + len / 2 {
            if std::time::Instant::now() >= deadline {
                return Err(Error::Other(format!(
                    "{}: the {len} bytes of {} were not free 10 s after deleting it",
                    self.path().display(),
                    path.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }

    /// Bytes an unprivileged write may still use.
    fn available(&self) -> Result<u64> {
        let st = rustix::fs::statvfs(self.path()).map_err(|e| Error::io(self.path(), e.into()))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn filler(&self) -> PathBuf {
        self.dir.path().join(FILLER)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            // Lazy: a server process that still has the database open cannot keep the
            // mount (and the directory) alive.
            if let Err(e) = rustix::mount::unmount(self.dir.path(), UnmountFlags::DETACH) {
                eprintln!("unmounting {}: {e}", self.dir.path().display());
            }
            self.mounted = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tmpfs_fills_up_frees_and_unmounts() {
        let fs = Tmpfs::mount(256 * 1024).unwrap();
        let path = fs.path().to_owned();
        let written = fs.fill().unwrap();
        assert!(written > 0 && written <= 256 * 1024, "{written}");
        let err = std::fs::write(path.join("more"), vec![1u8; 8192]).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::NOSPC.raw_os_error())
        );
        fs.free().unwrap();
        std::fs::write(path.join("more"), vec![1u8; 8192]).unwrap();
        drop(fs);
        assert!(!path.exists(), "the mount point is gone after drop");
    }
}
