//! The agent's side of the node API: connections over TLS 1.3 to the server, node
//! attestation, renewal, the sync stream and batch signing.
//!
//! The agent may know several servers of its trust domain ([`ServerAddresses`]): each
//! new connection tries the one that answered last, then the others in turn, so when a
//! server dies the next connection (the sync stream reconnecting, a renewal) goes to
//! another with the agent's identity intact. A host name resolving to several addresses
//! is tried address by address as well.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use carapace_core::EntryId;
use carapace_core::plugin::{
    AttestationContext, NodeAttestorClient, TLS_EXPORTER_LABEL, TLS_EXPORTER_LEN,
};
use carapace_proto::node::{
    AttestParams, AttestRequest, AttestResult, NewJwtsvidRequest, attest_request, attest_response,
    node_client::NodeClient,
};
use carapace_proto::types::JwtSvid;
use tokio::sync::watch;

use crate::{Error, Result};

/// Largest node API message.
pub const MAX_MESSAGE_SIZE: usize = 32 * 1024 * 1024;

/// How long one server gets to accept a connection and finish the TLS handshake before
/// the next one is tried.
pub const CONNECT_TIMEOUT_PER_SERVER: Duration = Duration::from_secs(5);

/// The servers an agent may talk to, `HOST:PORT` each, and which one answered last.
/// Cheap to clone: clones share the choice.
#[derive(Clone)]
pub struct ServerAddresses {
    list: Arc<[String]>,
    current: Arc<AtomicUsize>,
}

impl ServerAddresses {
    /// The servers, in the order to try them first. Empty lists are the caller's bug:
    /// the config refuses them.
    pub fn new(list: Vec<String>) -> Self {
        ServerAddresses {
            list: list.into(),
            current: Arc::default(),
        }
    }

    /// Every address, in configured order.
    pub fn list(&self) -> &[String] {
        &self.list
    }

    /// The address that answered last (the first one before any did).
    pub fn current(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        self.list
            .get(i)
            .or(self.list.first())
            .map_or("", String::as_str)
    }

    /// Opens TCP and TLS to the current server, else to the next that answers (the name
    /// is not checked: the verifier checks the server's SPIFFE ID); remembers which.
    async fn connect(
        &self,
        connector: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let n = self.list.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let addr = &self.list[idx];
            match tokio::time::timeout(CONNECT_TIMEOUT_PER_SERVER, connect_tls(connector, addr))
                .await
            {
                Ok(Ok(tls)) => {
                    if idx != start {
                        self.current.store(idx, Ordering::Relaxed);
                        tracing::warn!(
                            server = %addr,
                            unreachable = %failures.join("; "),
                            "switched to another server"
                        );
                    }
                    return Ok(tls);
                }
                Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                Err(_) => failures.push(format!(
                    "{addr}: no TLS connection within {}s",
                    CONNECT_TIMEOUT_PER_SERVER.as_secs()
                )),
            }
        }
        Err(std::io::Error::other(format!(
            "no server answered ({})",
            failures.join("; ")
        )))
    }
}

impl fmt::Display for ServerAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.list.join(", "))
    }
}

impl fmt::Debug for ServerAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerAddresses")
            .field("list", &self.list)
            .field("current", &self.current())
            .finish()
    }
}

impl PartialEq for ServerAddresses {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl From<&str> for ServerAddresses {
    fn from(addr: &str) -> Self {
        ServerAddresses::new(vec![addr.to_owned()])
    }
}

impl From<&String> for ServerAddresses {
    fn from(addr: &String) -> Self {
        ServerAddresses::from(addr.as_str())
    }
}

impl From<&ServerAddresses> for ServerAddresses {
    fn from(s: &ServerAddresses) -> Self {
        s.clone()
    }
}

fn endpoint(servers: &ServerAddresses) -> Result<Endpoint> {
    // The URI only names the channel: the connector picks the server.
    let first = servers.current();
    let n = u32::try_from(servers.list().len())
        .unwrap_or(u32::MAX)
        .max(1);
    Ok(Endpoint::from_shared(format!("http://{first}"))
        .map_err(|e| Error::Config(format!("server_address {first:?}: {e}")))?
        .connect_timeout((CONNECT_TIMEOUT_PER_SERVER * n).max(Duration::from_secs(10)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true))
}

/// Opens TCP and TLS to `addr` (a host name: each address it resolves to in turn).
async fn connect_tls(
    connector: &tokio_rustls::TlsConnector,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("carapace-server")
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    connector.connect(name, tcp).await
}

fn client(channel: Channel) -> NodeClient<Channel> {
    NodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// A lazily connecting channel to one of `servers` over TLS with `tls`: each
/// (re)connection goes to the server that answered last, else the next that answers.
pub fn channel(
    servers: impl Into<ServerAddresses>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<NodeClient<Channel>> {
    let servers = servers.into();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let channel = endpoint(&servers)?.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        let servers = servers.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(servers.connect(&connector).await?)) }
    }));
    Ok(client(channel))
}

/// A channel over exactly one new TLS connection, with that connection's exporter
/// ([`AttestationContext::tls_exporter`]): attestation evidence is bound to it, so the
/// whole attestation must run on it. Should the connection drop, the channel does not
/// reconnect (the evidence would not verify on another connection anyway).
async fn attestation_channel(
    servers: &ServerAddresses,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(NodeClient<Channel>, Vec<u8>)> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let slot: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let exporter = slot.clone();
    let shown = servers.to_string();
    let servers = servers.clone();
    let channel = endpoint(&servers)?
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let servers = servers.clone();
            let slot = slot.clone();
            async move {
                let mut guard = slot.lock().await;
                if guard.is_some() {
                    return Err(std::io::Error::other(
                        "the attestation connection was lost; attestation starts over",
                    ));
                }
                let tls = servers.connect(&connector).await?;
                let mut out = [0u8; TLS_EXPORTER_LEN];
                tls.get_ref()
                    .1
                    .export_keying_material(&mut out, TLS_EXPORTER_LABEL, None)
                    .map_err(std::io::Error::other)?;
                *guard = Some(out.to_vec());
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| Error::Server(format!("connecting to the server at {shown}: {e}")))?;
    let exporter =
        exporter.lock().await.clone().ok_or_else(|| {
            Error::Server("the attestation connection has no TLS exporter".into())
        })?;
    Ok((client(channel), exporter))
}

/// Whether a gRPC status means the server refused the agent (as opposed to being away).
pub fn is_refusal(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
    )
}

fn status_error(what: &str, s: tonic::Status) -> Error {
    if is_refusal(&s) {
        Error::Refused(format!("{what}: {}", s.message()))
    } else {
        Error::Server(format!("{what}: {} ({:?})", s.message(), s.code()))
    }
}

/// The node attestors an agent is configured with, in the order it runs them: it opens
/// with the first; a server that requires several together (composite node
/// attestation) names each further one in `next_attestor`, and the agent runs the one it
/// configures by that name on the same stream.
#[derive(Debug, Clone)]
pub struct NodeAttestors(Vec<Arc<dyn NodeAttestorClient>>);

impl NodeAttestors {
    /// The attestors in order; `None` when there are none.
    pub fn new(members: Vec<Arc<dyn NodeAttestorClient>>) -> Option<Self> {
        (!members.is_empty()).then_some(NodeAttestors(members))
    }

    /// The attestor the agent opens with.
    pub fn first(&self) -> &Arc<dyn NodeAttestorClient> {
        &self.0[0]
    }

    /// Their names, in order, joined with `+` (the metrics label and what logs say).
    pub fn joined_names(&self) -> String {
        self.0
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join("+")
    }
}

/// Runs node attestation with `attestor` on a new connection to the server made with
/// `tls`, sending `csr` for the agent's key. A server that asks for another attestor
/// (composite attestation) is refused: use [`attest_with`] for those.
pub async fn attest(
    servers: impl Into<ServerAddresses>,
    tls: Arc<rustls::ClientConfig>,
    attestor: &dyn NodeAttestorClient,
    csr: Vec<u8>,
    agent_public_key: &[u8],
) -> Result<AttestResult> {
    run_attestation(servers.into(), tls, attestor, &[], csr, agent_public_key).await
}

/// Runs node attestation with `attestors` on a new connection to the server made with
/// `tls`, sending `csr` for the agent's key: opens with the first, and runs each further
/// attestor the server names (`next_attestor`) on the same stream, so every proof binds
/// to the same TLS session. Refuses, and aborts the stream, when the server names one
/// `attestors` does not hold.
pub async fn attest_with(
    servers: impl Into<ServerAddresses>,
    tls: Arc<rustls::ClientConfig>,
    attestors: &NodeAttestors,
    csr: Vec<u8>,
    agent_public_key: &[u8],
) -> Result<AttestResult> {
    let all: Vec<&dyn NodeAttestorClient> = attestors.0.iter().map(|a| a.as_ref()).collect();
    run_attestation(
        servers.into(),
        tls,
        attestors.first().as_ref(),
        &all,
        csr,
        agent_public_key,
    )
    .await
}

async fn run_attestation(
    servers: ServerAddresses,
    tls: Arc<rustls::ClientConfig>,
    first: &dyn NodeAttestorClient,
    configured: &[&dyn NodeAttestorClient],
    csr: Vec<u8>,
    agent_public_key: &[u8],
) -> Result<AttestResult> {
    let (mut client, tls_exporter) = attestation_channel(&servers, tls).await?;
    // One context for every attestor of this attestation: same key, same connection.
    let ctx = AttestationContext {
        agent_public_key: agent_public_key.to_vec(),
        tls_exporter,
    };
    let (tx, rx) = mpsc::channel(4);
    let payload = first.payload(&ctx).await?;
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: first.name().to_owned(),
            payload,
            csr,
        })),
    })
    .await
    .map_err(|_| Error::Server("attestation stream closed".into()))?;
    let mut responses = client
        .attest(ReceiverStream::new(rx))
        .await
        .map_err(|s| status_error("attestation", s))?
        .into_inner();
    // The attestor whose challenges the server sends now.
    let mut current = first;
    loop {
        let msg = responses
            .message()
            .await
            .map_err(|s| status_error("attestation", s))?
            .ok_or_else(|| {
                Error::Server("attestation: the server closed the stream without a result".into())
            })?;
        let step = match msg.step {
            Some(attest_response::Step::Result(r)) => return Ok(r),
            Some(attest_response::Step::Challenge(c)) => {
                attest_request::Step::ChallengeResponse(current.answer(&c, &ctx).await?)
            }
            Some(attest_response::Step::NextAttestor(name)) => {
                let Some(next) = configured.iter().copied().find(|a| a.name() == name) else {
                    // Returning drops the stream: the server sees the attestation end.
                    return Err(Error::Refused(format!(
                        "the server requires node attestor {}, which this agent does not \
                         configure",
                        name.chars().take(64).collect::<String>()
                    )));
                };
                tracing::debug!(
                    attestor = next.name(),
                    "the server asks for another node attestor"
                );
                current = next;
                attest_request::Step::NextPayload(next.payload(&ctx).await?)
            }
            None => return Err(Error::Server("attestation: empty response".into())),
        };
        tx.send(AttestRequest { step: Some(step) })
            .await
            .map_err(|_| Error::Server("attestation stream closed".into()))?;
    }
}

/// Maps a status from a node API call to the agent's error.
pub fn call_error(what: &str, s: tonic::Status) -> Error {
    status_error(what, s)
}

/// How long a JWT-SVID signing call to the server may take.
pub const JWT_SVID_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the server (`Node.NewJWTSVID`) for a JWT-SVID for `entry_id`, one of the entries
/// authorized for this agent, with `audiences` as its `aud`. The server's status is
/// returned as is: the caller tells a refusal from an unreachable server.
pub async fn new_jwt_svid(
    client: &mut NodeClient<Channel>,
    entry_id: &EntryId,
    audiences: &[String],
) -> std::result::Result<JwtSvid, tonic::Status> {
    let mut request = tonic::Request::new(NewJwtsvidRequest {
        entry_id: entry_id.to_string(),
        audience: audiences.to_vec(),
    });
    request.set_timeout(JWT_SVID_TIMEOUT);
    let response = tokio::time::timeout(JWT_SVID_TIMEOUT, client.new_jwtsvid(request))
        .await
        .map_err(|_| {
            tonic::Status::deadline_exceeded(format!(
                "the server did not answer within {}s",
                JWT_SVID_TIMEOUT.as_secs()
            ))
        })??;
    response
        .into_inner()
        .svid
        .ok_or_else(|| tonic::Status::internal("the server answered without a JWT-SVID"))
}

/// The agent's current node API client, as the manager last connected it, shared with
/// the Workload API (which asks the server for JWT-SVIDs through it). `None` while the
/// agent holds no usable identity.
#[derive(Debug, Clone)]
pub struct ServerLink {
    rx: watch::Receiver<Option<NodeClient<Channel>>>,
}

/// The manager's end of a [`ServerLink`].
#[derive(Debug)]
pub struct ServerLinkPublisher {
    tx: watch::Sender<Option<NodeClient<Channel>>>,
}

impl ServerLink {
    /// A new link (holding no client yet) and the end that publishes into it.
    pub fn new() -> (ServerLinkPublisher, ServerLink) {
        let (tx, rx) = watch::channel(None);
        (ServerLinkPublisher { tx }, ServerLink { rx })
    }

    /// A link that always holds `client` (tests, tools).
    pub fn fixed(client: NodeClient<Channel>) -> ServerLink {
        let (tx, rx) = watch::channel(Some(client));
        drop(tx);
        ServerLink { rx }
    }

    /// A link that never holds a client.
    pub fn none() -> ServerLink {
        let (_publisher, link) = ServerLink::new();
        link
    }

    /// The current client, if the agent has one.
    pub fn client(&self) -> Option<NodeClient<Channel>> {
        self.rx.borrow().clone()
    }
}

impl ServerLinkPublisher {
    /// Publishes the client the agent now uses (`None`: it has no usable identity).
    pub fn publish(&self, client: Option<NodeClient<Channel>>) {
        self.tx.send_replace(client);
    }
}
