//! The node API's listener: TCP accept, connection caps, TLS handshakes, and the two
//! gRPC servers connections are handed to.
//!
//! Every connection is counted from `accept` on, in total and per IP address
//! ([`NodeApiLimits`], [`carapace_common::listener`]); accept errors back off instead of
//! spinning. The TLS handshake must finish within [`HANDSHAKE_TIMEOUT`]. Then:
//!
//! - a connection with an agent SVID (`spiffe://<td>/spire/agent/...`) is served by a
//!   server taking messages up to [`MAX_MESSAGE_SIZE`] (batches of CSRs), and is never
//!   closed for being idle;
//! - any other connection can only attest: it also takes a place among at most
//!   `max_unauthenticated_connections`, is served with messages up to
//!   [`MAX_ATTESTATION_MESSAGE_SIZE`] and small HTTP/2 windows (so it cannot make the
//!   server buffer megabytes), and is closed after `unauthenticated_idle_timeout` without
//!   an RPC in progress.
//!
//! At a cap, the oldest idle connection of the heaviest peer makes room, so a caller
//! that comes to attest is served while idle connections hold the caps.
//!
//! Both servers also serve the admin API ([`RemoteAdmin`]), which authorizes each call
//! itself: an administrator's SVID is not an agent's, so its connections are served
//! with the attestation limits above (remote administration is a few calls, and a
//! workload SVID earns no more room than an anonymous caller); an agent's call is
//! refused with `PermissionDenied` like any other non-admin's.
//!
//! Both also serve the upstream API ([`UpstreamApi`], nested servers), which authorizes
//! each call too: a downstream server calls with a workload SVID, so it is served with the
//! attestation limits as well (a CA signature now and then, a JWT key, and one bundle
//! watch, which counts as an RPC in progress and so keeps its connection from being
//! closed as idle).

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use carapace_common::listener::{
    AcceptBackoff, ConnectionHandle, ConnectionLimiter, Limits, TrackRpcsLayer, Tracked,
    WithConnectInfo, accept_with_backoff,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::admin::api::RemoteAdmin;
use crate::node_api::{
    HANDSHAKE_TIMEOUT, MAX_ATTESTATION_MESSAGE_SIZE, MAX_MESSAGE_SIZE, NodeApi, PeerInfo,
    peer_svid, tls_exporter,
};
use crate::upstream_api::UpstreamApi;

/// How long a connection without an agent SVID stays open without an RPC in progress,
/// by default.
pub const DEFAULT_UNAUTHENTICATED_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 stream window of connections without an agent SVID.
const ATTESTATION_STREAM_WINDOW: u32 = 64 * 1024;
/// HTTP/2 connection window of connections without an agent SVID.
const ATTESTATION_CONNECTION_WINDOW: u32 = 128 * 1024;
/// Concurrent streams on a connection without an agent SVID.
const ATTESTATION_MAX_STREAMS: u32 = 4;
/// Largest header list on a connection without an agent SVID.
const ATTESTATION_MAX_HEADER_LIST: u32 = 16 * 1024;
const _: () = assert!(MAX_ATTESTATION_MESSAGE_SIZE < MAX_MESSAGE_SIZE);
/// How often the server pings its peers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Bounds on the node API's connections and attestations (`[node_api]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeApiLimits {
    /// Live connections in total (including those in their TLS handshake).
    pub max_connections: usize,
    /// Live connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Live connections without an agent SVID, after their handshake.
    pub max_unauthenticated_connections: usize,
    /// How long a connection without an agent SVID stays open without an RPC.
    pub unauthenticated_idle_timeout: Duration,
    /// Attestations in progress at once.
    pub max_attestations_in_flight: usize,
}

impl NodeApiLimits {
    /// The defaults for a process that may hold `fd_limit` descriptors (`None`:
    /// unlimited): the node API may use half of them (at least 16, at most 16,384
    /// connections), one IP address half of that, and connections without an agent SVID
    /// a quarter.
    pub fn from_fd_limit(fd_limit: Option<u64>) -> Self {
        let fds = usize::try_from(fd_limit.unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
        let max_connections = (fds / 2).clamp(16, 16_384);
        NodeApiLimits {
            max_connections,
            max_connections_per_ip: max_connections / 2,
            max_unauthenticated_connections: max_connections / 4,
            unauthenticated_idle_timeout: DEFAULT_UNAUTHENTICATED_IDLE_TIMEOUT,
            max_attestations_in_flight: crate::node_api::DEFAULT_MAX_ATTESTATIONS_IN_FLIGHT,
        }
    }
}

/// A TLS connection carrying its [`PeerInfo`] to the handlers.
pub type TlsConn = WithConnectInfo<tokio_rustls::server::TlsStream<Tracked<TcpStream>>, PeerInfo>;

/// Ready connections, split by whether they carry an agent SVID.
#[derive(Debug)]
pub struct Incoming {
    /// Connections with an agent SVID.
    pub authenticated: ReceiverStream<io::Result<TlsConn>>,
    /// Connections without one (attestation only).
    pub unauthenticated: ReceiverStream<io::Result<TlsConn>>,
}

/// Accepts TCP connections within `limits` and completes TLS handshakes concurrently (a
/// slow client cannot hold up others), yielding ready connections.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: NodeApiLimits,
    mut shutdown: watch::Receiver<bool>,
) -> Incoming {
    let (authed_tx, authed_rx) = mpsc::channel(128);
    let (unauth_tx, unauth_rx) = mpsc::channel(128);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let all = ConnectionLimiter::<IpAddr>::new(
        "node API",
        Limits {
            max_connections: limits.max_connections,
            max_per_peer: limits.max_connections_per_ip,
        },
    )
    .with_metrics(crate::metrics::metrics().connections.listener("node_api"));
    let unauthenticated = ConnectionLimiter::<IpAddr>::new(
        "node API (without agent SVID)",
        Limits {
            max_connections: limits.max_unauthenticated_connections,
            max_per_peer: limits
                .max_connections_per_ip
                .min(limits.max_unauthenticated_connections),
        },
    )
    .with_metrics(
        crate::metrics::metrics()
            .connections
            .listener("node_api_unauthenticated"),
    );
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::new("node API");
        let mut refused = 0u64;
        loop {
            let (tcp, remote) = tokio::select! {
                c = accept_with_backoff(&mut backoff, || listener.accept()) => c,
                _ = shutdown.changed() => return,
            };
            let conn = ConnectionHandle::new(Some(limits.unauthenticated_idle_timeout));
            let admission = match all.admit(remote.ip(), &conn) {
                Ok(a) => a,
                Err(refusal) => {
                    refused += 1;
                    // The 1st, 2nd, 4th... refusal: visible without flooding the log.
                    if refused.is_power_of_two() {
                        tracing::warn!(%remote, %refusal, refused, "node API connection refused");
                    }
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tcp = Tracked::new(tcp, conn.clone(), admission);
            let acceptor = acceptor.clone();
            let unauthenticated = unauthenticated.clone();
            let (authed_tx, unauth_tx) = (authed_tx.clone(), unauth_tx.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                // TLS 1.3 only (the config allows nothing else), so the exporter always
                // exists; a connection without one is dropped.
                let Some(tls_exporter) = tls_exporter(&tls) else {
                    tracing::warn!(%remote, "no TLS exporter on a connection; dropped");
                    return;
                };
                let info = PeerInfo {
                    remote,
                    svid: peer_svid(&tls),
                    tls_exporter,
                    connection: conn.clone(),
                };
                if info.svid.as_ref().is_some_and(|s| s.id.is_agent()) {
                    conn.set_idle_timeout(None);
                    let _ = authed_tx.send(Ok(TlsConn::new(tls, info))).await;
                    return;
                }
                match unauthenticated.admit(remote.ip(), &conn) {
                    Ok(admission) => {
                        let mut tls = tls;
                        tls.get_mut().0.hold(admission);
                        let _ = unauth_tx.send(Ok(TlsConn::new(tls, info))).await;
                    }
                    Err(refusal) => {
                        tracing::debug!(%remote, %refusal, "node API connection without an agent SVID refused");
                    }
                }
            });
        }
    });
    Incoming {
        authenticated: ReceiverStream::new(authed_rx),
        unauthenticated: ReceiverStream::new(unauth_rx),
    }
}

/// Serves `api`, `admin` and `upstream` on `listener` within `limits` until `stop`
/// turns true: connections with an agent SVID and the others on two gRPC servers with
/// different limits (see the module documentation).
pub fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    api: NodeApi,
    admin: RemoteAdmin,
    upstream: UpstreamApi,
    limits: NodeApiLimits,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tracing::info!(
        max_connections = limits.max_connections,
        max_connections_per_ip = limits.max_connections_per_ip,
        max_unauthenticated_connections = limits.max_unauthenticated_connections,
        unauthenticated_idle_timeout = ?limits.unauthenticated_idle_timeout,
        max_attestations_in_flight = limits.max_attestations_in_flight,
        fd_limit = ?carapace_common::listener::fd_limit(),
        "node API limits"
    );
    let incoming = incoming(listener, tls, limits, stop.clone());
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let authenticated = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .layer(TrackRpcsLayer::<PeerInfo>::new())
        .add_service(api.clone().into_service())
        .add_service(admin.clone())
        .add_service(upstream.clone().into_service())
        .serve_with_incoming_shutdown(incoming.authenticated, stopped(stop.clone()));
    let unauthenticated = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .initial_stream_window_size(ATTESTATION_STREAM_WINDOW)
        .initial_connection_window_size(ATTESTATION_CONNECTION_WINDOW)
        .max_concurrent_streams(ATTESTATION_MAX_STREAMS)
        .http2_max_header_list_size(ATTESTATION_MAX_HEADER_LIST)
        .layer(TrackRpcsLayer::<PeerInfo>::new())
        .add_service(api.into_attestation_service())
        .add_service(admin)
        .add_service(upstream.into_service())
        .serve_with_incoming_shutdown(incoming.unauthenticated, stopped(stop));
    tokio::spawn(async move {
        let (a, u) = tokio::join!(authenticated, unauthenticated);
        for r in [a, u] {
            if let Err(e) = r {
                tracing::error!(error = %e, "node API server failed");
            }
        }
    })
}
