//! Kernel-only identification of Workload API callers.
//!
//! At accept time the agent reads the peer's credentials (`SO_PEERCRED`: pid, uid, gid as
//! of `connect()`) and takes a pidfd for the peer process. The pidfd pins the identity of
//! that one process: after the attestors have read `/proc/<pid>`, [`Peer::is_alive`]
//! checks that the pidfd's process is still running, so the PID cannot have been recycled
//! for another process in between (SECURITY.md, "PID reuse"; SPIRE's peertracker does the same with
//! a `/proc/<pid>` handle and the process start time).
//!
//! The pidfd comes from `getsockopt(SO_PEERPIDFD)` (Linux ≥ 6.5), which the kernel
//! derives from the very process that called `connect()`: there is no window for PID
//! reuse. On older kernels it falls back to `pidfd_open(pid)`, which has a small race: if
//! the peer exits and its PID is recycled between `connect()` and `pidfd_open`, the pidfd
//! refers to the new process. The fallback is logged once per connection at debug level.
//!
//! The supplementary groups come from `getsockopt(SO_PEERGROUPS)` at accept, as of
//! `connect()` like the uid and gid (Linux ≥ 4.13), so attestation does not read
//! `/proc/<pid>/status` for them.
//!
//! This module and [`crate::memory`] are the crate's only `unsafe` code (here the
//! `SO_PEERPIDFD` and `SO_PEERGROUPS` getsockopts, which rustix does not wrap).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use carapace_common::listener::{
    AcceptBackoff, ConnectionHandle, ConnectionLimiter, HasConnection, Limits, Tracked,
    accept_with_backoff,
};
use carapace_core::plugin::Caller;
use futures::Stream;
use futures::task::AtomicWaker;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

/// How a [`Peer`]'s pidfd was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidfdSource {
    /// `getsockopt(SO_PEERPIDFD)`: the kernel's own reference to the connecting process.
    SoPeerPidfd,
    /// `pidfd_open(pid)`: racy if the peer exited and its PID was reused before the call.
    PidfdOpen,
}

/// A Workload API caller as the kernel identified it at connect time.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Process id (in the agent's PID namespace) at connect time.
    pub pid: i32,
    /// Effective user id at connect time.
    pub uid: u32,
    /// Effective group id at connect time.
    pub gid: u32,
    /// Supplementary group ids at connect time (`SO_PEERGROUPS`); `None` for a peer
    /// made by [`Peer::from_pid`] (the attestors then read `/proc/<pid>/status`).
    pub groups: Option<Arc<[u32]>>,
    /// A pidfd for the process, held for the connection's lifetime.
    pub pidfd: Arc<OwnedFd>,
    /// Closes the caller's connection (see [`Peer::close_connection`]).
    closer: Arc<Closer>,
    /// The connection's RPC count and idle timer (see [`carapace_common::listener`]).
    connection: ConnectionHandle,
}

impl HasConnection for Peer {
    fn connection(&self) -> &ConnectionHandle {
        &self.connection
    }
}

/// A connection's kill switch: once set, the connection's reads and writes fail, so the
/// HTTP/2 server drops it.
#[derive(Debug, Default)]
struct Closer {
    closed: AtomicBool,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
}

impl Closer {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.read_waker.wake();
        self.write_waker.wake();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the Workload API caller could not be verified; connection closed",
    )
}

impl Peer {
    /// Identifies the peer of a connected Unix stream socket: `SO_PEERCRED`, then a pidfd
    /// from `SO_PEERPIDFD`, or from `pidfd_open` on kernels older than 6.5.
    pub fn from_stream(stream: &UnixStream) -> io::Result<Peer> {
        Self::from_stream_with_source(stream).map(|(peer, _)| peer)
    }

    /// As [`Peer::from_stream`], also saying how the pidfd was obtained.
    pub fn from_stream_with_source(stream: &UnixStream) -> io::Result<(Peer, PidfdSource)> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid().unwrap_or(0);
        if pid <= 0 {
            return Err(io::Error::other(
                "the peer's PID is not visible in the agent's PID namespace",
            ));
        }
        let (pidfd, source) = match so_peerpidfd(stream.as_fd()) {
            Ok(fd) => (fd, PidfdSource::SoPeerPidfd),
            // ENOPROTOOPT: kernel older than 6.5. EINVAL: some older kernels for unknown
            // options on this socket family.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOPROTOOPT)
                    || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                tracing::debug!(
                    pid,
                    "SO_PEERPIDFD unsupported by this kernel; falling back to pidfd_open"
                );
                (open_pidfd(pid)?, PidfdSource::PidfdOpen)
            }
            Err(e) => return Err(e),
        };
        let groups = so_peergroups(stream.as_fd())?;
        let peer = Peer {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            groups: Some(groups.into()),
            pidfd: Arc::new(pidfd),
            closer: Arc::default(),
            connection: ConnectionHandle::new(None),
        };
        Ok((peer, source))
    }

    /// A peer for a known process, its pidfd from `pidfd_open(pid)`. Subject to the PID
    /// reuse race described in the module documentation: use [`Peer::from_stream`] for
    /// callers of a socket.
    pub fn from_pid(pid: i32, uid: u32, gid: u32) -> io::Result<Peer> {
        Ok(Peer {
            pid,
            uid,
            gid,
            groups: None,
            pidfd: Arc::new(open_pidfd(pid)?),
            closer: Arc::default(),
            connection: ConnectionHandle::new(None),
        })
    }

    /// The caller as the workload attestors see it.
    pub fn caller(&self) -> Caller {
        Caller {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// Whether the pidfd's process is still running and is still the process with PID
    /// [`Peer::pid`]: the attestors read `/proc/<pid>` by number, so everything they read
    /// describes this caller only if this holds afterwards.
    ///
    /// Two checks: the pidfd is not readable (`POLLIN` means its process exited), and the
    /// kernel's own record of the pidfd (`/proc/self/fdinfo/<fd>`, `Pid:`) names the same
    /// PID (it reads -1 once the process is gone). Any error counts as "not alive" (fail
    /// closed).
    pub fn is_alive(&self) -> bool {
        let mut fds = [PollFd::new(&*self.pidfd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let running = match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(0) => true,
            Ok(_) => fds[0].revents().is_empty(),
            Err(e) => {
                tracing::debug!(pid = self.pid, error = %e, "polling the caller's pidfd failed");
                false
            }
        };
        running && pidfd_pid(&self.pidfd) == Some(self.pid)
    }

    /// Closes the caller's connection: the next read or write on it fails and the server
    /// drops it, with every stream on it. Used when the caller could not be verified.
    pub fn close_connection(&self) {
        self.closer.close();
    }

    /// Whether [`Peer::close_connection`] was called.
    pub fn connection_closed(&self) -> bool {
        self.closer.is_closed()
    }
}

/// The PID a pidfd refers to, from `/proc/self/fdinfo/<fd>` (`Pid:` line; -1 once the
/// process has exited).
fn pidfd_pid(fd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()
}

fn open_pidfd(pid: i32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::other("PID 0 has no pidfd"))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// `getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD)`: a pidfd for the process that connected the
/// peer end of `sock` (Linux ≥ 6.5). The returned pidfd is close-on-exec.
#[allow(
    unsafe_code,
    reason = "rustix does not wrap SO_PEERPIDFD; two reviewed calls"
)]
pub(crate) fn so_peerpidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `sock` is a valid open descriptor for the duration of the borrow; `fd` and
    // `len` are live, properly aligned locals; `len` holds the size of the buffer `fd`
    // points to, so the kernel writes at most `size_of::<c_int>()` bytes into it.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut fd).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::c_int>() || fd < 0 {
        return Err(io::Error::other("SO_PEERPIDFD returned no descriptor"));
    }
    // SAFETY: on success the kernel installed `fd` in this process's descriptor table
    // for us alone; nothing else owns or will close it, so `OwnedFd` may take ownership.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The most supplementary groups a process can have (`NGROUPS_MAX` on Linux).
const MAX_GROUPS: usize = 65_536;

/// `getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS)`: the supplementary group ids of the
/// process that connected the peer end of `sock`, as of `connect()`. The kernel answers
/// `ERANGE` with the size it needs when the buffer is short; the call is then repeated
/// once with that size.
#[allow(
    unsafe_code,
    reason = "rustix does not wrap SO_PEERGROUPS; one reviewed call"
)]
pub(crate) fn so_peergroups(sock: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    for _ in 0..2 {
        let mut len = libc::socklen_t::try_from(groups.len() * GID)
            .map_err(|_| io::Error::other("SO_PEERGROUPS buffer too large"))?;
        // SAFETY: `sock` is a valid open descriptor for the duration of the borrow;
        // `groups` is a live, aligned buffer of `len` bytes, which bounds what the kernel
        // writes; `len` is a live local the kernel updates with the bytes written (or
        // needed, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast::<libc::c_void>(),
                &mut len,
            )
        };
        let len = len as usize;
        if rc == 0 {
            if len % GID != 0 || len > groups.len() * GID {
                return Err(io::Error::other("SO_PEERGROUPS returned a malformed list"));
            }
            groups.truncate(len / GID);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || len / GID > MAX_GROUPS {
            return Err(err);
        }
        groups = vec![0; len / GID + 1];
    }
    Err(io::Error::other(
        "the peer's supplementary groups changed size while they were read",
    ))
}

/// An accepted Workload API connection with its caller's kernel identity; tonic puts the
/// [`Peer`] into every request's extensions.
#[derive(Debug)]
pub struct PeerStream {
    inner: super::h2_authority::AuthorityFix<UnixStream>,
    peer: Peer,
}

impl PeerStream {
    /// Identifies the peer of `inner`.
    pub fn new(inner: UnixStream) -> io::Result<Self> {
        Self::with_connection(inner, ConnectionHandle::new(None))
    }

    /// Identifies the peer of `inner`, whose RPCs `connection` counts.
    pub fn with_connection(inner: UnixStream, connection: ConnectionHandle) -> io::Result<Self> {
        let mut peer = Peer::from_stream(&inner)?;
        peer.connection = connection;
        Ok(PeerStream {
            inner: super::h2_authority::AuthorityFix::new(inner),
            peer,
        })
    }

    /// The caller.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let closer = self.peer.closer.clone();
        closer.read_waker.register(cx.waker());
        if closer.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let closer = self.peer.closer.clone();
        closer.write_waker.register(cx.waker());
        if closer.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let closer = self.peer.closer.clone();
        closer.write_waker.register(cx.waker());
        if closer.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.get_ref().is_write_vectored()
    }
}

/// The accepted connections of `listener`, each with its caller identified, within
/// `limits` (see [`carapace_common::listener`]): at most `max_connections` in total and
/// `max_connections_per_uid` per uid (read with `SO_PEERCRED` before a pidfd is taken, so
/// a refused connection costs nothing more), each closed after `idle_timeout` without an
/// RPC in progress. Connections whose peer cannot be identified are logged and dropped;
/// accept errors back off (10 ms doubling to 1 s) instead of spinning. Never ends.
pub fn incoming(
    listener: UnixListener,
    limits: super::ConnectionLimits,
) -> impl Stream<Item = io::Result<Tracked<PeerStream>>> + Send {
    let limiter = ConnectionLimiter::<u32>::new(
        "Workload API",
        Limits {
            max_connections: limits.max_connections,
            max_per_peer: limits.max_connections_per_uid,
        },
    )
    .with_metrics(
        crate::metrics::metrics()
            .connections
            .listener("workload_api"),
    );
    let state = (listener, limiter, AcceptBackoff::new("Workload API"), 0u64);
    futures::stream::unfold(
        state,
        move |(listener, limiter, mut backoff, mut refused)| async move {
            loop {
                let (stream, _) = accept_with_backoff(&mut backoff, || listener.accept()).await;
                let uid = match stream.peer_cred() {
                    Ok(cred) => cred.uid(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read a Workload API caller's credentials; dropping the connection");
                        continue;
                    }
                };
                let conn = ConnectionHandle::new(Some(limits.idle_timeout));
                let admission = match limiter.admit(uid, &conn) {
                    Ok(a) => a,
                    Err(refusal) => {
                        refused += 1;
                        // The 1st, 2nd, 4th... refusal: visible without flooding the log.
                        if refused.is_power_of_two() {
                            tracing::warn!(uid, %refusal, refused, "Workload API connection refused");
                        }
                        continue;
                    }
                };
                match PeerStream::with_connection(stream, conn.clone()) {
                    Ok(s) => {
                        let tracked = Tracked::new(s, conn, admission);
                        return Some((Ok(tracked), (listener, limiter, backoff, refused)));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot identify a Workload API caller; dropping the connection");
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fdinfo_pid(fd: &OwnedFd) -> i32 {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .unwrap_or_else(|| panic!("no Pid: line in fdinfo: {info}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn pidfd_liveness_follows_the_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let peer = Peer::from_pid(pid, 0, 0).unwrap();
        assert_eq!(fdinfo_pid(&peer.pidfd), pid);
        assert!(peer.is_alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!peer.is_alive(), "a reaped process must not be alive");
    }

    #[test]
    fn exited_but_unreaped_process_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let peer = Peer::from_pid(pid, 0, 0).unwrap();
        // Wait for the exit without reaping: the pidfd turns readable.
        let mut fds = [PollFd::new(&*peer.pidfd, PollFlags::IN)];
        rustix::event::poll(&mut fds, None).unwrap();
        assert!(!peer.is_alive());
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn so_peerpidfd_names_the_connecting_process() {
        let (a, b) = UnixStream::pair().unwrap();
        let (peer, source) = Peer::from_stream_with_source(&a).unwrap();
        assert_eq!(
            source,
            PidfdSource::SoPeerPidfd,
            "this kernel supports SO_PEERPIDFD"
        );
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(peer.pid, me);
        assert_eq!(peer.uid, rustix::process::geteuid().as_raw());
        assert_eq!(peer.gid, rustix::process::getegid().as_raw());
        assert_eq!(fdinfo_pid(&peer.pidfd), me);
        assert!(peer.is_alive());
        drop(b);
    }

    /// The groups at accept are the connecting process's, as `/proc/<pid>/status` lists
    /// them; a child that sets other groups before it connects is seen with those.
    #[tokio::test]
    async fn so_peergroups_are_the_connecting_process_groups() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let want: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap()
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::from_stream(&a).unwrap();
        assert_eq!(peer.groups.as_deref(), Some(&want[..]));
        assert_eq!(peer.caller().groups, peer.groups);

        // More groups than the first buffer holds (32), set by a child before it
        // connects (root only: setgroups needs CAP_SETGID).
        assert!(
            rustix::process::geteuid().is_root(),
            "this test sets a child's groups (setgroups needs CAP_SETGID): run it as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let many: Vec<u32> = (70_000..70_100).collect();
        let list = many
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut child = std::process::Command::new("setpriv")
            .args(["--groups", &list, "--"])
            .args(["python3", "-c"])
            .arg(format!(
                "import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({:?}); time.sleep(30)",
                path.to_str().unwrap()
            ))
            .spawn()
            .unwrap();
        let (conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let peer = Peer::from_stream(&conn).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(peer.pid, i32::try_from(child.id()).unwrap());
        assert_eq!(peer.groups.as_deref(), Some(&many[..]));
    }

    #[tokio::test]
    async fn closing_the_connection_fails_a_pending_read_and_later_writes() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn = PeerStream::new(a).unwrap();
        let peer = conn.peer().clone();
        // A read waiting for data the peer never sends...
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let r = conn.read(&mut buf).await;
            (r, conn)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...is woken and fails when the connection is closed.
        peer.close_connection();
        let (r, mut conn) = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the pending read must be woken")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        let w = conn.write(b"x").await;
        assert_eq!(w.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        assert!(peer.connection_closed());
    }

    #[test]
    fn the_pidfd_names_its_process_until_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let peer = Peer::from_pid(pid, 0, 0).unwrap();
        assert_eq!(pidfd_pid(&peer.pidfd), Some(pid));
        // A peer that claims another PID for the same pidfd is not that process.
        let liar = Peer {
            pid: pid + 1,
            ..peer.clone()
        };
        assert!(!liar.is_alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pidfd_pid(&peer.pidfd), Some(-1));
    }

    #[tokio::test]
    async fn accepted_connections_carry_the_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).await.unwrap();
        let mut inc = Box::pin(incoming(
            listener,
            crate::workload_api::ConnectionLimits::from_fd_limit(Some(1024)),
        ));
        let conn = futures::StreamExt::next(&mut inc).await.unwrap().unwrap();
        let info = tonic::transport::server::Connected::connect_info(&conn);
        assert_eq!(info.pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!(fdinfo_pid(&info.pidfd), info.pid);
        drop(client);
    }
}
