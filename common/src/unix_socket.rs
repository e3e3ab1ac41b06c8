//! Unix sockets both binaries serve on and their CLIs talk to: who may own the path to a
//! socket ([`check_socket_dir`]), taking over a stale socket but never a live one
//! ([`remove_stale_socket`]), removing at exit only the socket this process bound
//! ([`OwnSocket`]), and gRPC channels that check who answers before sending a byte
//! ([`uds_channel_checked`]).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// How many symbolic links [`check_socket_dir`] follows before giving up (as the kernel).
const MAX_SYMLINKS: usize = 40;

/// The effective uid of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// `uid 1000` or `uid 0 or 1000`, for messages.
fn uids(list: &[u32]) -> String {
    let mut list = list.to_vec();
    list.sort_unstable();
    list.dedup();
    let shown: Vec<String> = list.iter().map(u32::to_string).collect();
    format!("uid {}", shown.join(" or "))
}

/// Checks the directory that holds (or will hold) a private socket, walking every
/// component from `/` down to `dir`, and returns it with every symbolic link resolved.
///
/// Every directory on the way must be owned by root or by a uid in `owners`, and no
/// group or other user may write to it, since whoever can write to a directory can
/// replace what lies below it. One exception: a single shared directory with the sticky
/// bit (like `/tmp`), where others may create entries but not replace ours. `dir` itself
/// must be owned by a uid in `owners` and be private (no group or other access at all).
/// A symbolic link on the way is followed if root or a uid in `owners` owns it (its
/// target is checked the same way) and refused otherwise.
///
/// With `create`, missing directories are created with mode 0700 one at a time, each
/// after its parent passed the check; nothing that exists is ever changed: a problem is
/// reported with the command that fixes it. Messages name the offending path.
pub fn check_socket_dir(dir: &Path, owners: &[u32], create: bool) -> Result<PathBuf, String> {
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?
            .join(dir)
    };
    let mut pending: VecDeque<OsString> = components(&dir);
    let mut walk = Walk {
        owners,
        sticky: None,
    };
    let mut cur = PathBuf::from("/");
    let root = std::fs::symlink_metadata(&cur).map_err(|e| format!("/: {e}"))?;
    walk.check_dir(&cur, &root, pending.is_empty())?;
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            // `cur` has no symbolic link in it, so its parent is the real parent, and
            // was checked on the way down.
            cur.pop();
            walk.left(&cur);
            continue;
        }
        let next = cur.join(&name);
        let meta = match std::fs::symlink_metadata(&next) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound && create => {
                match std::fs::DirBuilder::new().mode(0o700).create(&next) {
                    Ok(()) => {}
                    // Someone made it in between: it is checked below like any other.
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(format!("cannot create {}: {e}", next.display())),
                }
                std::fs::symlink_metadata(&next).map_err(|e| format!("{}: {e}", next.display()))?
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(format!("{} does not exist", next.display()));
            }
            Err(e) => return Err(format!("{}: {e}", next.display())),
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(format!(
                    "{}: too many levels of symbolic links",
                    dir.display()
                ));
            }
            if !walk.trusted(meta.uid()) {
                return Err(format!(
                    "{} is a symbolic link owned by uid {}, who could point it elsewhere; only root or {} may own links on the way to the socket (use the path it points to instead)",
                    next.display(),
                    meta.uid(),
                    uids(owners)
                ));
            }
            let target = std::fs::read_link(&next)
                .map_err(|e| format!("cannot read the link {}: {e}", next.display()))?;
            if target.is_absolute() {
                cur = PathBuf::from("/");
                walk.left(&cur);
            }
            for c in components(&target).into_iter().rev() {
                pending.push_front(c);
            }
            continue;
        }
        walk.check_dir(&next, &meta, pending.is_empty())?;
        cur = next;
    }
    Ok(cur)
}

/// The names in `path` (`..` kept, `.` and the root dropped).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// What [`check_socket_dir`] carries down the path.
struct Walk<'a> {
    owners: &'a [u32],
    /// The shared sticky directory met on the way, if any.
    sticky: Option<PathBuf>,
}

impl Walk<'_> {
    /// The walk went back up to `cur` (`..` or an absolute link): a shared directory no
    /// longer on the path no longer counts.
    fn left(&mut self, cur: &Path) {
        if self.sticky.as_ref().is_some_and(|s| !cur.starts_with(s)) {
            self.sticky = None;
        }
    }

    fn trusted(&self, uid: u32) -> bool {
        uid == 0 || self.owners.contains(&uid)
    }

    /// One directory on the way; `last` means the socket's own directory.
    fn check_dir(
        &mut self,
        path: &Path,
        meta: &std::fs::Metadata,
        last: bool,
    ) -> Result<(), String> {
        let shown = path.display();
        if !meta.is_dir() {
            return Err(format!("{shown} is not a directory"));
        }
        let uid = meta.uid();
        let mode = meta.mode() & 0o7777;
        if !self.trusted(uid) {
            return Err(format!(
                "{shown} is owned by uid {uid}, who could replace what lies below it; only root or {} may own the directories on the way to the socket (choose a path under a directory they own)",
                uids(self.owners)
            ));
        }
        if last {
            if !self.owners.contains(&uid) {
                return Err(format!(
                    "{shown} is owned by uid {uid}, not by {}: the socket's directory must belong to the server",
                    uids(self.owners)
                ));
            }
            if mode & 0o077 != 0 {
                let hint = if mode & 0o1000 != 0 {
                    format!(
                        "it is a shared directory: put the socket in a private directory below it, e.g. {}",
                        path.join("carapace").join("admin.sock").display()
                    )
                } else {
                    format!("chmod 700 {shown}, or choose another path")
                };
                return Err(format!(
                    "{shown} has mode {mode:o}: the socket's directory must be private, no access for group or others ({hint})"
                ));
            }
            return Ok(());
        }
        if mode & 0o022 != 0 {
            let sticky = mode & 0o1000 != 0;
            match &self.sticky {
                None if sticky => self.sticky = Some(path.to_path_buf()),
                // The same one again, reached through a link.
                Some(first) if sticky && first == path => {}
                Some(first) if sticky => {
                    return Err(format!(
                        "{shown} is a second shared directory (mode {mode:o}) below {}; only one shared sticky directory like /tmp may be on the way to the socket",
                        first.display()
                    ));
                }
                _ => {
                    return Err(format!(
                        "{shown} has mode {mode:o}: group or others may write to it and so replace what lies below it (chmod go-w {shown}, or choose another path)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Removes a socket file left behind by a process that is gone, so that a new one can be
/// bound at `path`. Refuses (and removes nothing) when anything that is not a socket is
/// there, or when something still accepts connections on it. `program` names who might
/// be serving it in the message ("carapace-agent").
pub fn remove_stale_socket(path: &Path, program: &str) -> Result<(), String> {
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{shown}: {e}")),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{shown} exists and is not a socket; refusing to remove it (remove it yourself or choose another path)"
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "address in use: something still accepts connections on {shown} (another {program}?); refusing to remove it"
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused || e.kind() == ErrorKind::NotFound => {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(socket = %shown, "removed a stale socket");
                    Ok(())
                }
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("cannot remove the stale socket {shown}: {e}")),
            }
        }
        Err(e) => Err(format!(
            "cannot tell whether the socket {shown} is stale: {e}; refusing to remove it"
        )),
    }
}

/// A socket this process bound, recorded by the device and inode of its file. It keeps a
/// duplicate of the listening descriptor, which holds on to that inode (a bound socket
/// references its file), so the inode number cannot be reused while this value lives:
/// [`OwnSocket::remove`] removes the file at the path only if it is still that inode,
/// never a socket another process put there since.
#[derive(Debug)]
pub struct OwnSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
    _pin: std::os::fd::OwnedFd,
}

impl OwnSocket {
    /// Records the socket `listener` was just bound to at `path`.
    pub fn record(path: &Path, listener: std::os::fd::BorrowedFd<'_>) -> Result<OwnSocket, String> {
        let shown = path.display();
        let pin = listener
            .try_clone_to_owned()
            .map_err(|e| format!("{shown}: cannot duplicate the listener: {e}"))?;
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| format!("{shown}: cannot stat after binding: {e}"))?;
        Ok(OwnSocket {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            _pin: pin,
        })
    }

    /// Removes the socket file if it is still the one this process bound.
    pub fn remove(self) {
        let shown = self.path.display();
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %shown, error = %e, "cannot remove the socket");
                }
            }
            Ok(_) => tracing::warn!(
                socket = %shown,
                "the socket was replaced by another process's; leaving it"
            ),
            Err(_) => {}
        }
    }
}

/// The socket at `path` is served by a uid that is not one expected: nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnexpectedPeer {
    /// The socket.
    pub path: PathBuf,
    /// The uid of the process that answered (SO_PEERCRED).
    pub uid: u32,
    /// The uids that were expected.
    pub expected: Vec<u32>,
}

impl std::fmt::Display for UnexpectedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is served by a process of uid {}, not {}: refusing to send anything to it",
            self.path.display(),
            self.uid,
            uids(&self.expected)
        )
    }
}

impl std::error::Error for UnexpectedPeer {}

impl UnexpectedPeer {
    /// Finds an [`UnexpectedPeer`] among the sources of `e` (a failed connect).
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a UnexpectedPeer> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(p) = err.downcast_ref::<UnexpectedPeer>() {
                return Some(p);
            }
            // io::Error::source skips the error it wraps; get_ref reaches it.
            if let Some(p) = err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<UnexpectedPeer>())
            {
                return Some(p);
            }
            cur = err.source();
        }
        None
    }
}

/// Connects to `path` and checks, on that very connection, that the process which
/// answers runs as one of `expected` (SO_PEERCRED), before anything is written to it.
pub async fn connect_checked(
    path: &Path,
    expected: &[u32],
) -> std::io::Result<tokio::net::UnixStream> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    let uid = stream.peer_cred()?.uid();
    if !expected.contains(&uid) {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            UnexpectedPeer {
                path: path.to_path_buf(),
                uid,
                expected: expected.to_vec(),
            },
        ));
    }
    Ok(stream)
}

/// A gRPC channel whose every connection goes to the Unix socket `path` and is checked
/// with [`connect_checked`] before the first byte is sent.
pub async fn uds_channel_checked(
    path: &Path,
    timeout: Option<std::time::Duration>,
    expected: Vec<u32>,
) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    let mut endpoint = Endpoint::from_static("http://localhost");
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            let expected = expected.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(connect_checked(&path, &expected).await?))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn set_mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    /// A directory for a test, root-owned 0700 under /tmp (tests run as root).
    fn base() -> tempfile::TempDir {
        tempfile::tempdir_in("/tmp").unwrap()
    }

    #[test]
    fn a_private_directory_is_created_and_accepted_under_tmp() {
        let t = base();
        let d = t.path().join("a/b");
        let got = check_socket_dir(&d, &[euid()], true).unwrap();
        assert_eq!(got, d);
        assert_eq!(mode(&t.path().join("a")), 0o700);
        assert_eq!(mode(&d), 0o700);
        // Checking again changes nothing and passes; without `create` too.
        check_socket_dir(&d, &[euid()], false).unwrap();
    }

    #[test]
    fn a_missing_directory_is_reported_without_create() {
        let t = base();
        let d = t.path().join("missing");
        let e = check_socket_dir(&d, &[euid()], false).unwrap_err();
        assert!(e.contains("does not exist") && e.contains("missing"), "{e}");
        assert!(!d.exists());
    }

    #[test]
    fn a_directory_of_another_uid_on_the_way_is_refused_and_nothing_is_created() {
        let t = base();
        set_mode(t.path(), 0o755);
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        set_mode(&theirs, 0o755);
        let e = check_socket_dir(&theirs.join("private"), &[euid()], true).unwrap_err();
        assert!(
            e.contains(&format!("{} is owned by uid 65534", theirs.display())),
            "{e}"
        );
        assert!(!theirs.join("private").exists());
        assert_eq!(mode(&theirs), 0o755);
        // The socket's own directory owned by them is refused as well.
        set_mode(&theirs, 0o700);
        let e = check_socket_dir(&theirs, &[euid()], true).unwrap_err();
        assert!(e.contains("owned by uid 65534"), "{e}");
        assert_eq!(mode(&theirs), 0o700);
    }

    #[test]
    fn a_group_writable_directory_on_the_way_is_refused_unchanged() {
        let t = base();
        let loose = t.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        set_mode(&loose, 0o775);
        let e = check_socket_dir(&loose.join("private"), &[euid()], true).unwrap_err();
        assert!(
            e.contains(&format!("{} has mode 775", loose.display())) && e.contains("chmod go-w"),
            "{e}"
        );
        assert_eq!(mode(&loose), 0o775);
        assert!(!loose.join("private").exists());
    }

    #[test]
    fn a_shared_sticky_directory_is_refused_as_the_socket_directory_and_unchanged() {
        let t = base();
        let shared = t.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        set_mode(&shared, 0o1777);
        let e = check_socket_dir(&shared, &[euid()], true).unwrap_err();
        assert!(
            e.contains("has mode 1777") && e.contains("must be private"),
            "{e}"
        );
        assert_eq!(mode(&shared), 0o1777);
        // /tmp is the first shared directory on the way; `shared` would be a second.
        let e = check_socket_dir(&shared.join("x"), &[euid()], true).unwrap_err();
        assert!(e.contains("second shared directory"), "{e}");
        assert!(!shared.join("x").exists());
    }

    #[test]
    fn a_loose_socket_directory_is_refused_with_the_chmod_and_unchanged() {
        let t = base();
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        set_mode(&d, 0o750);
        let e = check_socket_dir(&d, &[euid()], true).unwrap_err();
        assert!(e.contains(&format!("chmod 700 {}", d.display())), "{e}");
        assert_eq!(mode(&d), 0o750);
    }

    #[test]
    fn symlinks_are_followed_when_trusted_and_refused_otherwise() {
        let t = base();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        set_mode(&real, 0o700);
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(check_socket_dir(&link, &[euid()], false).unwrap(), real);
        // A link someone else owns could be repointed: refused.
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let e = check_socket_dir(&link, &[euid()], false).unwrap_err();
        assert!(e.contains("symbolic link owned by uid 65534"), "{e}");
        // A relative link resolves from its directory.
        let rel = t.path().join("rel");
        std::os::unix::fs::symlink("real", &rel).unwrap();
        assert_eq!(check_socket_dir(&rel, &[euid()], false).unwrap(), real);
    }

    #[test]
    fn a_stale_socket_is_removed_and_a_live_one_or_a_file_is_kept() {
        let t = base();
        let p = t.path().join("s.sock");
        let live = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let e = remove_stale_socket(&p, "carapace-test").unwrap_err();
        assert!(
            e.contains("address in use") && e.contains("carapace-test"),
            "{e}"
        );
        assert!(p.exists());
        drop(live);
        remove_stale_socket(&p, "carapace-test").unwrap();
        assert!(!p.exists());
        let f = t.path().join("file");
        std::fs::write(&f, "keep me").unwrap();
        let e = remove_stale_socket(&f, "carapace-test").unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "keep me");
    }

    #[test]
    fn only_the_socket_this_process_bound_is_removed() {
        use std::os::fd::AsFd as _;
        let t = base();
        let p = t.path().join("s.sock");
        let first = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let own = OwnSocket::record(&p, first.as_fd()).unwrap();
        drop(first);
        // Another process replaced it: left alone.
        std::fs::remove_file(&p).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&p).unwrap();
        own.remove();
        assert!(p.exists());
        OwnSocket::record(&p, other.as_fd()).unwrap().remove();
        assert!(!p.exists());
    }

    #[tokio::test]
    async fn a_socket_served_by_an_unexpected_uid_gets_no_byte() {
        let t = base();
        let p = t.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&p).unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let _ = conn.read_to_end(&mut buf).await;
            buf.len()
        });
        let other = euid().wrapping_add(1);
        let e = uds_channel_checked(&p, None, vec![other])
            .await
            .unwrap_err();
        let found = UnexpectedPeer::find(&e).expect("an UnexpectedPeer in the error");
        assert_eq!(found.uid, euid());
        assert_eq!(found.expected, vec![other]);
        let text = crate::error_chain(&e);
        assert!(
            text.contains(&format!("served by a process of uid {}", euid())),
            "{text}"
        );
        assert_eq!(server.await.unwrap(), 0, "nothing may reach the socket");
        // The expected uid gets through.
        let _listener2 = {
            std::fs::remove_file(&p).unwrap();
            tokio::net::UnixListener::bind(&p).unwrap()
        };
        connect_checked(&p, &[euid()]).await.unwrap();
    }
}
