//! What every listening socket of Carapace shares, so that no local user or unauthenticated
//! peer can exhaust a process's file descriptors or memory by connecting and saying
//! nothing:
//!
//! - [`accept_with_backoff`]: an accept loop that sleeps after a failed `accept`
//!   (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`: 10 ms doubling to 1 s, reset on success)
//!   instead of spinning on a listener that stays readable;
//! - [`ConnectionLimiter`]: live connections counted in total and per peer (a uid for a
//!   Unix socket, an IP address for TCP), each with a cap. At a cap, the oldest *idle*
//!   connection (no RPC in progress) of the same peer, or of the heaviest peers when the
//!   total is reached, makes room for the newcomer; a connection with an RPC in progress
//!   is never displaced. With the total below the descriptor limit ([`fd_limit`]) and the
//!   per-peer cap below the total, a caller of another peer is always served;
//! - [`Tracked`]: a connection wrapper that closes a connection without an RPC in
//!   progress for its idle timeout (including one that never sends a byte), or one its
//!   limiter displaced: reads return end-of-file, so the HTTP/2 server drops it;
//! - [`TrackRpcsLayer`]: the tower layer that tells [`Tracked`] when RPCs start and end.
//!
//! A connection is idle when no RPC is in progress on it, as gRPC's `MaxConnectionIdle`
//! counts it: bytes alone (an HTTP/2 preface, PINGs, a slow trickle of headers) do not
//! keep a connection open.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The first pause after a failed `accept`.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause after failed `accept`s in a row.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The soft `RLIMIT_NOFILE` of this process: how many descriptors it may hold. `None`
/// when unlimited.
pub fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Pauses between failed `accept` calls: [`ACCEPT_BACKOFF_MIN`] doubling to
/// [`ACCEPT_BACKOFF_MAX`], back to the minimum after a success.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    next: Duration,
    failures: u64,
}

impl AcceptBackoff {
    /// A backoff for the listener named `what` in logs ("node API").
    pub fn new(what: &'static str) -> Self {
        AcceptBackoff {
            what,
            next: ACCEPT_BACKOFF_MIN,
            failures: 0,
        }
    }

    /// Records a successful `accept`.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                listener = self.what,
                failures = self.failures,
                "accepting connections again"
            );
        }
        self.failures = 0;
        self.next = ACCEPT_BACKOFF_MIN;
    }

    /// Records a failed `accept` and waits before the next one. Errors that concern only
    /// the one connection (it was reset before it was accepted) are retried at once.
    pub async fn failed(&mut self, error: &io::Error) {
        use rustix::io::Errno;
        if matches!(
            Errno::from_io_error(error),
            Some(Errno::CONNABORTED | Errno::INTR | Errno::PROTO)
        ) {
            tracing::debug!(listener = self.what, %error, "a connection failed before it was accepted");
            return;
        }
        self.failures += 1;
        // Logged on the 1st, 2nd, 4th, 8th... failure in a row: visible, not a flood.
        if self.failures.is_power_of_two() {
            tracing::warn!(
                listener = self.what,
                %error,
                failures = self.failures,
                retry_in = ?self.next,
                "accept failed (out of file descriptors or memory?); backing off"
            );
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(ACCEPT_BACKOFF_MAX);
    }
}

/// Calls `accept` until it succeeds, backing off after failures (see [`AcceptBackoff`]).
pub async fn accept_with_backoff<T, F, Fut>(backoff: &mut AcceptBackoff, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(t) => {
                backoff.succeeded();
                return t;
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
}

// === impl ConnectionHandle ===

#[derive(Debug)]
struct Shared {
    rpcs: AtomicUsize,
    idle_since: Mutex<Instant>,
    idle_timeout: Mutex<Option<Duration>>,
    closed: AtomicBool,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
}

/// The shared state of one connection: RPCs in progress, since when it is idle, its idle
/// timeout, and its kill switch. Cloned into the connection's connect info, so that
/// [`TrackRpcsLayer`] can count its RPCs.
#[derive(Debug, Clone)]
pub struct ConnectionHandle(Arc<Shared>);

impl ConnectionHandle {
    /// A new connection, idle from now, closed after `idle_timeout` without an RPC in
    /// progress (`None`: never).
    pub fn new(idle_timeout: Option<Duration>) -> Self {
        ConnectionHandle(Arc::new(Shared {
            rpcs: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            idle_timeout: Mutex::new(idle_timeout),
            closed: AtomicBool::new(false),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
        }))
    }

    /// Changes the idle timeout (e.g. none once a TLS peer proved who it is).
    pub fn set_idle_timeout(&self, idle_timeout: Option<Duration>) {
        *self
            .0
            .idle_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = idle_timeout;
        self.0.read_waker.wake();
    }

    /// Marks an RPC as started; it ends when the guard is dropped.
    pub fn rpc_started(&self) -> RpcGuard {
        self.0.rpcs.fetch_add(1, Ordering::SeqCst);
        RpcGuard(self.clone())
    }

    /// Whether no RPC is in progress.
    pub fn is_idle(&self) -> bool {
        self.0.rpcs.load(Ordering::SeqCst) == 0
    }

    /// Closes the connection: its next read returns end-of-file and writes fail.
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.read_waker.wake();
        self.0.write_waker.wake();
    }

    /// Whether [`ConnectionHandle::close`] was called (or the idle timeout struck).
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::SeqCst)
    }

    /// When the connection turns idle too long, if it is idle and has a timeout.
    fn idle_deadline(&self) -> Option<Instant> {
        let timeout = (*self
            .0
            .idle_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner))?;
        if !self.is_idle() {
            return None;
        }
        let since = *self
            .0
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(since + timeout)
    }
}

/// An RPC in progress on a connection (see [`ConnectionHandle::rpc_started`]).
#[derive(Debug)]
pub struct RpcGuard(ConnectionHandle);

impl Drop for RpcGuard {
    fn drop(&mut self) {
        let shared = &self.0.0;
        if shared.rpcs.fetch_sub(1, Ordering::SeqCst) == 1 {
            *shared
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
            // The reader re-arms its idle timer.
            shared.read_waker.wake();
        }
    }
}

// === impl ConnectionLimiter ===

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Live connections in total.
    pub max_connections: usize,
    /// Live connections of one peer (uid or IP address).
    pub max_per_peer: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer holds its cap of connections, each with an RPC in progress.
    PeerLimit(usize),
    /// The listener holds its total cap, and no peer at least as heavy as the newcomer
    /// has an idle connection to give up.
    TotalLimit(usize),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::PeerLimit(n) => {
                write!(f, "the peer already holds {n} busy connections (its cap)")
            }
            Refusal::TotalLimit(n) => write!(f, "{n} connections are open (the cap), all busy"),
        }
    }
}

#[derive(Debug)]
struct LimiterState<K> {
    next_id: u64,
    total: usize,
    /// Each peer's connections, oldest first.
    peers: HashMap<K, BTreeMap<u64, ConnectionHandle>>,
}

impl<K: Eq + Hash + Clone> LimiterState<K> {
    fn count(&self, key: &K) -> usize {
        self.peers.get(key).map_or(0, BTreeMap::len)
    }

    fn remove(&mut self, key: &K, id: u64) -> Option<ConnectionHandle> {
        let conns = self.peers.get_mut(key)?;
        let conn = conns.remove(&id)?;
        if conns.is_empty() {
            self.peers.remove(key);
        }
        self.total -= 1;
        Some(conn)
    }

    /// Closes the oldest idle connection of `key`; false if it has none.
    fn evict_idle_of(&mut self, key: &K) -> bool {
        let Some(id) = self.peers.get(key).and_then(|conns| {
            conns
                .iter()
                .find(|(_, c)| c.is_idle() && !c.is_closed())
                .map(|(id, _)| *id)
        }) else {
            return false;
        };
        if let Some(conn) = self.remove(key, id) {
            conn.close();
        }
        true
    }

    /// Closes the oldest idle connection of the heaviest peer that has one, among peers
    /// holding at least `at_least` connections; false if there is none.
    fn evict_from_heaviest(&mut self, at_least: usize) -> bool {
        let mut keys: Vec<(usize, K)> = self
            .peers
            .iter()
            .filter(|(_, c)| c.len() >= at_least)
            .map(|(k, c)| (c.len(), k.clone()))
            .collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.0));
        keys.into_iter().any(|(_, k)| self.evict_idle_of(&k))
    }
}

/// Counts a listener's live connections in total and per peer, within [`Limits`].
pub struct ConnectionLimiter<K> {
    name: &'static str,
    limits: Limits,
    state: Arc<Mutex<LimiterState<K>>>,
    metrics: Option<crate::metrics::ConnectionMetrics>,
}

impl<K> fmt::Debug for ConnectionLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionLimiter")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<K> Clone for ConnectionLimiter<K> {
    fn clone(&self) -> Self {
        ConnectionLimiter {
            name: self.name,
            limits: self.limits,
            state: self.state.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<K: Eq + Hash + Clone + Send + Sync + 'static> ConnectionLimiter<K> {
    /// A limiter named `name` in logs.
    pub fn new(name: &'static str, limits: Limits) -> Self {
        ConnectionLimiter {
            name,
            limits,
            state: Arc::new(Mutex::new(LimiterState {
                next_id: 0,
                total: 0,
                peers: HashMap::new(),
            })),
            metrics: None,
        }
    }

    /// Reports the live connections and the refusals to `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::ConnectionMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The caps.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Live connections: (total, of `key`).
    pub fn counts(&self, key: &K) -> (usize, usize) {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (st.total, st.count(key))
    }

    /// Admits `conn` of peer `key`, displacing an idle connection if a cap is reached
    /// (see the module documentation). The admission lasts until the returned value is
    /// dropped (or until the connection is displaced in turn).
    pub fn admit(&self, key: K, conn: &ConnectionHandle) -> Result<Admission, Refusal> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let refused = |r: Refusal| {
            if let Some(m) = &self.metrics {
                m.refused.inc();
            }
            Err(r)
        };
        if st.count(&key) >= self.limits.max_per_peer && !st.evict_idle_of(&key) {
            return refused(Refusal::PeerLimit(self.limits.max_per_peer));
        }
        if st.total >= self.limits.max_connections {
            let own = st.count(&key);
            if !st.evict_from_heaviest(own) {
                return refused(Refusal::TotalLimit(self.limits.max_connections));
            }
            tracing::debug!(
                listener = self.name,
                "closed an idle connection to make room for a new one"
            );
        }
        let id = st.next_id;
        st.next_id += 1;
        st.total += 1;
        st.peers
            .entry(key.clone())
            .or_default()
            .insert(id, conn.clone());
        let metrics = self.metrics.clone();
        if let Some(m) = &metrics {
            m.set_open(st.total);
        }
        drop(st);
        let state = Arc::downgrade(&self.state);
        Ok(Admission {
            release: Some(Box::new(move || {
                if let Some(state) = state.upgrade() {
                    let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
                    st.remove(&key, id);
                    if let Some(m) = &metrics {
                        m.set_open(st.total);
                    }
                }
            })),
        })
    }
}

/// A connection's place in a [`ConnectionLimiter`], given back on drop.
pub struct Admission {
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Admission")
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

// === impl Tracked ===

/// A connection that ends when its [`ConnectionHandle`] is closed or stays idle past its
/// timeout (reads return end-of-file, writes fail), and that holds its [`Admission`]s
/// until it is dropped.
pub struct Tracked<IO> {
    inner: IO,
    conn: ConnectionHandle,
    idle: Pin<Box<Sleep>>,
    admissions: Vec<Admission>,
}

impl<IO: fmt::Debug> fmt::Debug for Tracked<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracked")
            .field("inner", &self.inner)
            .field("closed", &self.conn.is_closed())
            .finish_non_exhaustive()
    }
}

impl<IO> Tracked<IO> {
    /// Wraps `inner`, tracked by `conn`, holding `admission`.
    pub fn new(inner: IO, conn: ConnectionHandle, admission: Admission) -> Self {
        Tracked {
            inner,
            conn,
            idle: Box::pin(tokio::time::sleep(Duration::ZERO)),
            admissions: vec![admission],
        }
    }

    /// Holds one more admission (of another limiter) for the connection's lifetime.
    pub fn hold(&mut self, admission: Admission) {
        self.admissions.push(admission);
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// The connection's handle.
    pub fn connection(&self) -> &ConnectionHandle {
        &self.conn
    }

    /// Whether the connection must end now: closed, or idle past its deadline (then
    /// closed). Otherwise arms the idle timer so the reader wakes at the deadline.
    fn poll_ended(&mut self, cx: &mut Context<'_>) -> bool {
        if self.conn.is_closed() {
            return true;
        }
        let Some(deadline) = self.conn.idle_deadline() else {
            return false;
        };
        if self.idle.deadline() != deadline {
            self.idle.as_mut().reset(deadline);
        }
        if Instant::now() >= deadline || self.idle.as_mut().poll(cx).is_ready() {
            tracing::debug!("closing a connection idle for its whole idle timeout");
            self.conn.close();
            return true;
        }
        false
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.0.read_waker.register(cx.waker());
        if this.poll_ended(cx) {
            // End-of-file: the server drops the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed (idle, or displaced by a newer one)",
    )
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.conn.0.write_waker.register(cx.waker());
        if this.conn.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.conn.0.write_waker.register(cx.waker());
        if this.conn.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Tracked<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

// === impl WithConnectInfo ===

/// A stream and the connect info its RPC handlers see (tonic's `Connected`), reads and
/// writes passed straight through: what every listener hands tonic ([`UnixConn`] here,
/// the node API's TLS connections in the server).
#[derive(Debug)]
pub struct WithConnectInfo<IO, I> {
    inner: IO,
    info: I,
}

impl<IO, I> WithConnectInfo<IO, I> {
    /// `inner`, whose handlers see `info`.
    pub fn new(inner: IO, info: I) -> Self {
        WithConnectInfo { inner, info }
    }
}

impl<IO, I> tonic::transport::server::Connected for WithConnectInfo<IO, I>
where
    I: Clone + Send + Sync + 'static,
{
    type ConnectInfo = I;

    fn connect_info(&self) -> I {
        self.info.clone()
    }
}

impl<IO: AsyncRead + Unpin, I: Unpin> AsyncRead for WithConnectInfo<IO, I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin, I: Unpin> AsyncWrite for WithConnectInfo<IO, I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A Unix socket connection whose connect info carries its peer's uid and its
/// [`ConnectionHandle`] (for [`TrackRpcsLayer`]).
pub type UnixConn = WithConnectInfo<tokio::net::UnixStream, UnixConnInfo>;

/// The connect info of a [`UnixConn`].
#[derive(Debug, Clone)]
pub struct UnixConnInfo {
    /// The peer's effective uid at `connect()`.
    pub uid: u32,
    /// The connection's handle.
    pub connection: ConnectionHandle,
}

impl HasConnection for UnixConnInfo {
    fn connection(&self) -> &ConnectionHandle {
        &self.connection
    }
}

/// The accepted connections of a Unix socket `listener` named `what` in logs, within
/// `limits` per uid (`SO_PEERCRED`) and in total, each closed after `idle_timeout`
/// without an RPC in progress; accept errors back off. Serve it with
/// [`TrackRpcsLayer`]`<`[`UnixConnInfo`]`>`. Never ends.
pub fn unix_incoming(
    listener: tokio::net::UnixListener,
    what: &'static str,
    limits: Limits,
    idle_timeout: Option<Duration>,
) -> impl futures::Stream<Item = io::Result<Tracked<UnixConn>>> + Send {
    let limiter = ConnectionLimiter::<u32>::new(what, limits);
    let state = (listener, limiter, AcceptBackoff::new(what), 0u64);
    futures::stream::unfold(
        state,
        move |(listener, limiter, mut backoff, mut refused)| async move {
            loop {
                let (stream, _) = accept_with_backoff(&mut backoff, || listener.accept()).await;
                let uid = match stream.peer_cred() {
                    Ok(cred) => cred.uid(),
                    Err(e) => {
                        tracing::warn!(listener = what, error = %e, "cannot read a caller's credentials; dropping the connection");
                        continue;
                    }
                };
                let connection = ConnectionHandle::new(idle_timeout);
                match limiter.admit(uid, &connection) {
                    Ok(admission) => {
                        let conn = UnixConn::new(
                            stream,
                            UnixConnInfo {
                                uid,
                                connection: connection.clone(),
                            },
                        );
                        let tracked = Tracked::new(conn, connection, admission);
                        return Some((Ok(tracked), (listener, limiter, backoff, refused)));
                    }
                    Err(refusal) => {
                        refused += 1;
                        if refused.is_power_of_two() {
                            tracing::warn!(listener = what, uid, %refusal, refused, "connection refused");
                        }
                    }
                }
            }
        },
    )
}

// === impl TrackRpcsLayer ===

/// A connect-info type that carries its connection's [`ConnectionHandle`].
pub trait HasConnection {
    /// The connection's handle.
    fn connection(&self) -> &ConnectionHandle;
}

/// A tower layer counting the RPCs of each connection whose connect info `T` (from the
/// request's extensions) carries a [`ConnectionHandle`]: an RPC lasts from its request
/// until its response body is dropped (a stream's end).
pub struct TrackRpcsLayer<T>(PhantomData<fn() -> T>);

impl<T> TrackRpcsLayer<T> {
    /// The layer for connect info `T`.
    pub fn new() -> Self {
        TrackRpcsLayer(PhantomData)
    }
}

impl<T> Default for TrackRpcsLayer<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for TrackRpcsLayer<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for TrackRpcsLayer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrackRpcsLayer")
    }
}

impl<S, T> tower::Layer<S> for TrackRpcsLayer<T> {
    type Service = TrackRpcs<S, T>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackRpcs {
            inner,
            _info: PhantomData,
        }
    }
}

/// The service of [`TrackRpcsLayer`].
pub struct TrackRpcs<S, T> {
    inner: S,
    _info: PhantomData<fn() -> T>,
}

impl<S: Clone, T> Clone for TrackRpcs<S, T> {
    fn clone(&self) -> Self {
        TrackRpcs {
            inner: self.inner.clone(),
            _info: PhantomData,
        }
    }
}

impl<S, T> fmt::Debug for TrackRpcs<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrackRpcs")
    }
}

impl<S, T, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TrackRpcs<S, T>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    T: HasConnection + Send + Sync + 'static,
{
    type Response = http::Response<RpcBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<T>()
            .map(|info| info.connection().rpc_started());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| RpcBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its RPC counted until it is dropped.
#[derive(Debug)]
pub struct RpcBody<B> {
    inner: B,
    _guard: Option<RpcGuard>,
}

impl<B: http_body::Body + Unpin> http_body::Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limiter(total: usize, per_peer: usize) -> ConnectionLimiter<u32> {
        ConnectionLimiter::new(
            "test",
            Limits {
                max_connections: total,
                max_per_peer: per_peer,
            },
        )
    }

    #[test]
    fn a_busy_peer_at_its_cap_is_refused_and_others_are_admitted() {
        let l = limiter(10, 2);
        let conns: Vec<_> = (0..3).map(|_| ConnectionHandle::new(None)).collect();
        let _rpcs: Vec<_> = conns.iter().map(ConnectionHandle::rpc_started).collect();
        let _a = l.admit(7, &conns[0]).unwrap();
        let _b = l.admit(7, &conns[1]).unwrap();
        assert_eq!(l.admit(7, &conns[2]).unwrap_err(), Refusal::PeerLimit(2));
        let other = ConnectionHandle::new(None);
        let _c = l.admit(8, &other).unwrap();
        assert_eq!(l.counts(&7), (3, 2));
        assert!(!conns[0].is_closed() && !conns[1].is_closed());
    }

    #[test]
    fn at_the_peer_cap_the_oldest_idle_connection_of_that_peer_makes_room() {
        let l = limiter(10, 2);
        let old = ConnectionHandle::new(None);
        let busy = ConnectionHandle::new(None);
        let _rpc = busy.rpc_started();
        let _busy = l.admit(7, &busy).unwrap();
        let _old = l.admit(7, &old).unwrap();
        let new = ConnectionHandle::new(None);
        let _new = l.admit(7, &new).unwrap();
        assert!(old.is_closed(), "the idle connection is displaced");
        assert!(!busy.is_closed(), "a busy connection never is");
        assert_eq!(l.counts(&7), (2, 2));
        // The displaced connection's admission, dropped later, changes nothing.
        drop(_old);
        assert_eq!(l.counts(&7), (2, 2));
    }

    #[test]
    fn at_the_total_cap_the_heaviest_peer_gives_up_an_idle_connection() {
        let l = limiter(4, 3);
        let heavy: Vec<_> = (0..3).map(|_| ConnectionHandle::new(None)).collect();
        let _h: Vec<_> = heavy.iter().map(|c| l.admit(65534, c).unwrap()).collect();
        let light = ConnectionHandle::new(None);
        let _l = l.admit(1000, &light).unwrap();
        let root = ConnectionHandle::new(None);
        let _r = l.admit(0, &root).unwrap();
        assert!(
            heavy[0].is_closed(),
            "the heaviest peer's oldest idle connection"
        );
        assert!(!light.is_closed());
        assert_eq!(l.counts(&65534), (4, 2));
        // All busy: the next newcomer is refused.
        let _rpcs: Vec<_> = [&heavy[1], &heavy[2], &light, &root]
            .iter()
            .map(|c| c.rpc_started())
            .collect();
        assert_eq!(
            l.admit(5, &ConnectionHandle::new(None)).unwrap_err(),
            Refusal::TotalLimit(4)
        );
    }

    #[tokio::test]
    async fn a_silent_connection_reads_end_of_file_after_its_idle_timeout() {
        let (a, mut b) = tokio::io::duplex(64);
        let l = limiter(1, 1);
        let conn = ConnectionHandle::new(Some(Duration::from_millis(200)));
        let mut t = Tracked::new(a, conn.clone(), l.admit(1, &conn).unwrap());
        let start = std::time::Instant::now();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "end-of-file");
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(t.write_all(b"x").await.is_err());
        drop(t);
        assert_eq!(l.counts(&1), (0, 0), "the admission is given back");
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test]
    async fn an_rpc_in_progress_keeps_the_connection_and_its_end_restarts_the_clock() {
        let (a, mut b) = tokio::io::duplex(64);
        let l = limiter(1, 1);
        let conn = ConnectionHandle::new(Some(Duration::from_millis(200)));
        let mut t = Tracked::new(a, conn.clone(), l.admit(1, &conn).unwrap());
        let rpc = conn.rpc_started();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = t.read(&mut buf).await.unwrap();
            (n, std::time::Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!conn.is_closed(), "busy connections are not idle");
        let ended = std::time::Instant::now();
        drop(rpc);
        let (n, closed_at) = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        assert!(closed_at.duration_since(ended) >= Duration::from_millis(190));
        b.write_all(b"late").await.ok();
    }

    #[tokio::test]
    async fn accept_errors_back_off_instead_of_spinning() {
        let mut backoff = AcceptBackoff::new("test");
        let mut calls = 0u32;
        let start = std::time::Instant::now();
        let got = accept_with_backoff(&mut backoff, || {
            calls += 1;
            let n = calls;
            async move {
                if n <= 5 {
                    Err(io::Error::from(rustix::io::Errno::MFILE))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got, 6);
        // 10 + 20 + 40 + 80 + 160 ms.
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(backoff.next, ACCEPT_BACKOFF_MIN, "reset by the success");
    }
}
