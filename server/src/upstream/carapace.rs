//! The `carapace` upstream authority: the CA of this server is an intermediate certified
//! by a Carapace server of the same trust domain above it (nested servers). This server
//! is a workload of the upstream tier: an agent of the upstream servers runs beside it,
//! and its Workload API gives this server the X509-SVID it presents (mutual TLS) to the
//! upstream server's `carapace.upstream.v1.Upstream` service.
//!
//! Built without touching the network, [`CarapaceUpstream`] starts one task that follows
//! the agent's `FetchX509SVID` stream (reconnecting with backoff, 1 s doubling to 30 s,
//! plus jitter) into a [`watch`] of the latest SVID and one of the trust domain's bundle
//! as the agent delivers it. An SVID of another trust domain is refused, and every mint
//! fails at once saying so. A mint waits (at most `mint_timeout`) for an SVID, connects
//! to the upstream server presenting it (the client certificate is read from the watch
//! at each handshake, so a rotated SVID is used as soon as the agent delivers it),
//! accepts only a server presenting `server_spiffe_id` under the bundle, sends the CSR
//! and checks the answer before the CA manager sees it.
//!
//! [`UpstreamAuthority::fingerprint`] is derived from `server_spiffe_id` only: the
//! upstream roots rotate on their own schedule, and the CA manager retires every CA
//! minted under another fingerprint.

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use carapace_common::error_chain;
use carapace_core::clock::Clock;
use carapace_core::plugin::{KeySigner, MintRequest, MintedCa, UpstreamAuthority};
use carapace_core::{SpiffeId, TrustBundle, TrustDomain, x509svid};
use carapace_keymanager_soft::SoftKey;
use carapace_proto::carapace::types::v1 as types;
use carapace_proto::carapace::upstream::v1::upstream_client::UpstreamClient;
use carapace_proto::carapace::upstream::v1::{
    MintDownstreamCaRequest, PublishJwtAuthorityRequest, WatchBundleRequest,
};
use carapace_proto::workload_client::{X509Context, fetch_x509_svid};

use crate::{Error, Result};

/// The plugin's name.
pub const NAME: &str = "carapace";

/// How long a mint waits for an SVID and for the upstream server, by default.
pub const DEFAULT_MINT_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest and longest `mint_timeout`.
const MINT_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(600));
/// The first and the longest wait before following the Workload API again.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// `[upstream_authority.carapace]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarapaceUpstreamConfig {
    /// `HOST:PORT` of an upstream server's node API.
    pub server_address: String,
    /// The Workload API socket of the agent of the upstream servers beside this server;
    /// a relative path resolves against the data directory.
    pub workload_api_socket: PathBuf,
    /// The SPIFFE ID the upstream server must present (default
    /// `spiffe://<trust domain>/spire/server`); in this server's trust domain.
    #[serde(default)]
    pub server_spiffe_id: Option<String>,
    /// How long a mint waits for this server's SVID and the upstream's answer (default
    /// 30 s).
    #[serde(default, with = "humantime_serde::option")]
    pub mint_timeout: Option<Duration>,
}

impl CarapaceUpstreamConfig {
    /// The checks that need no trust domain (for `validate`): the address is `HOST:PORT`,
    /// the SPIFFE ID parses, the timeout is in range.
    pub fn check(&self) -> std::result::Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = check_address(&self.server_address) {
            problems.push(e);
        }
        if let Some(id) = &self.server_spiffe_id {
            if let Err(e) = id.parse::<SpiffeId>() {
                problems.push(format!("server_spiffe_id: {e}"));
            }
        }
        if let Some(t) = self.mint_timeout {
            let (lo, hi) = MINT_TIMEOUT_RANGE;
            if t < lo || t > hi {
                problems.push(format!(
                    "mint_timeout: {} is outside {} to {}",
                    carapace_core::limits::describe(t),
                    carapace_core::limits::describe(lo),
                    carapace_core::limits::describe(hi)
                ));
            }
        }
        if self.workload_api_socket.as_os_str().is_empty() {
            problems.push(
                "workload_api_socket: give the path of the agent's Workload API socket".into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The socket path, resolved against `data_dir`.
    pub fn socket_in(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(&self.workload_api_socket)
    }

    /// The upstream server's SPIFFE ID for trust domain `td`, checked to be in it.
    pub fn server_id(&self, td: &TrustDomain) -> Result<SpiffeId> {
        let id: SpiffeId = match &self.server_spiffe_id {
            Some(s) => s
                .parse()
                .map_err(|e| cfg_err(format!("server_spiffe_id: {e}")))?,
            None => format!("spiffe://{td}/spire/server")
                .parse()
                .map_err(|e| cfg_err(format!("server_spiffe_id: {e}")))?,
        };
        if !id.is_member_of(td) {
            return Err(cfg_err(format!(
                "server_spiffe_id: {id} is not in this server's trust domain {td}: an \
                 upstream server serves the same trust domain"
            )));
        }
        Ok(id)
    }
}

fn check_address(address: &str) -> std::result::Result<(), String> {
    let bad = || {
        format!(
            "server_address: {address:?} is not HOST:PORT (the upstream server's node API, \
             e.g. \"root.example.org:8081\")"
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty()
        || host.contains(['/', '@', ' ', '[', ']'])
        || port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(bad());
    }
    Ok(())
}

fn cfg_err(msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("upstream_authority.{NAME}: {msg}"))
}

/// A failure that retrying later may cure (the agent or the upstream away).
fn unavailable(msg: impl std::fmt::Display) -> carapace_core::Error {
    carapace_core::Error::Unavailable(format!("upstream_authority.{NAME}: {msg}"))
}

/// A refusal or a wrong answer: retrying will not help until someone changes something.
fn refused(msg: impl std::fmt::Display) -> carapace_core::Error {
    carapace_core::Error::PluginConfig {
        plugin: format!("upstream_authority.{NAME}"),
        reason: msg.to_string(),
    }
}

/// The SVID this server presents to the upstream server.
#[derive(Debug)]
pub struct CurrentSvid {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its notAfter, unix seconds.
    pub not_after: i64,
    /// Chain and key, for rustls.
    key: Arc<CertifiedKey>,
}

/// What the Workload API follower knows.
#[derive(Debug, Clone, Default)]
struct SvidState {
    /// The latest usable SVID.
    current: Option<Arc<CurrentSvid>>,
    /// Why there is none (or why the stream broke), for the error a mint reports.
    problem: Option<String>,
    /// The agent serves an identity this server must not use (another trust domain):
    /// mints fail at once with this message.
    refusal: Option<String>,
}

/// The `carapace` upstream authority (see the module documentation).
pub struct CarapaceUpstream {
    td: TrustDomain,
    server_address: String,
    server_id: SpiffeId,
    socket: PathBuf,
    mint_timeout: Duration,
    fingerprint: String,
    clock: Arc<dyn Clock>,
    svid: watch::Receiver<SvidState>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    follower: tokio::task::AbortHandle,
    /// The upstream server's `WatchBundle` stream, kept open between [`next_bundle`]
    /// calls.
    ///
    /// [`next_bundle`]: UpstreamAuthority::next_bundle
    watching: tokio::sync::Mutex<Option<tonic::Streaming<types::Bundle>>>,
}

/// How long the bundle stream may stay silent: the upstream server re-sends its bundle
/// every 60 s, so three missed beats mean the connection is gone.
const WATCH_SILENCE: Duration = Duration::from_secs(180);

impl std::fmt::Debug for CarapaceUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarapaceUpstream")
            .field("server_address", &self.server_address)
            .field("server_id", &self.server_id.to_string())
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Drop for CarapaceUpstream {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// The fingerprint of a `carapace` upstream: stable across the upstream's root
/// rotations (see the module documentation).
pub fn fingerprint_of(server_id: &SpiffeId) -> String {
    hex::encode(Sha256::digest(format!("carapace|{server_id}")))
}

impl CarapaceUpstream {
    /// Checks `cfg` for trust domain `td` and that the Workload API socket exists, and
    /// starts following it. Must run inside a Tokio runtime; contacts no server.
    pub fn start(
        cfg: &CarapaceUpstreamConfig,
        td: &TrustDomain,
        data_dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        cfg.check().map_err(|p| cfg_err(p.join("; ")))?;
        let server_id = cfg.server_id(td)?;
        let socket = cfg.socket_in(data_dir);
        check_socket(&socket)?;
        let (svid_tx, svid) = watch::channel(SvidState::default());
        let (bundle_tx, bundle) = watch::channel(Arc::new(TrustBundle::new(td.clone())));
        let follower = tokio::spawn(follow(
            Follower {
                socket: socket.clone(),
                td: td.clone(),
                clock: clock.clone(),
            },
            svid_tx,
            bundle_tx,
        ))
        .abort_handle();
        Ok(CarapaceUpstream {
            td: td.clone(),
            server_address: cfg.server_address.clone(),
            fingerprint: fingerprint_of(&server_id),
            server_id,
            socket,
            mint_timeout: cfg.mint_timeout.unwrap_or(DEFAULT_MINT_TIMEOUT),
            clock,
            svid,
            bundle,
            follower,
            watching: tokio::sync::Mutex::new(None),
        })
    }

    /// The answer to `call`, made as `svid`, by `deadline`: a timeout or a gRPC error
    /// becomes a core error naming the upstream server.
    async fn answer<T>(
        &self,
        deadline: Instant,
        svid: &CurrentSvid,
        call: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> std::result::Result<T, carapace_core::Error> {
        tokio::time::timeout_at(deadline, call)
            .await
            .map_err(|_| {
                unavailable(format!(
                    "the upstream server at {} did not answer within {}",
                    self.server_address,
                    carapace_core::limits::describe(self.mint_timeout)
                ))
            })?
            .map(tonic::Response::into_inner)
            .map_err(|s| status_error(&self.server_address, &svid.spiffe_id, &s))
    }

    /// The upstream server's bundle from its answer, refused unless it is of this
    /// server's trust domain.
    fn bundle_of_answer(
        &self,
        bundle: Option<&types::Bundle>,
    ) -> std::result::Result<TrustBundle, carapace_core::Error> {
        let bundle = bundle.ok_or_else(|| {
            refused(format!(
                "the upstream server at {} answered without a bundle",
                self.server_address
            ))
        })?;
        let bundle = carapace_proto::convert::bundle_from_wire(bundle).map_err(|e| {
            refused(format!(
                "the upstream server at {} sent a bad bundle: {e}",
                self.server_address
            ))
        })?;
        if bundle.trust_domain() != &self.td {
            return Err(refused(format!(
                "the upstream server at {} sent a bundle of trust domain {}, this server is in {}",
                self.server_address,
                bundle.trust_domain(),
                self.td
            )));
        }
        Ok(bundle)
    }

    /// The trust domain's bundle as the agent last delivered it (empty until the first
    /// SVID): the upstream roots, following their rotations.
    pub fn bundle_watch(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.clone()
    }

    /// Waits until `deadline` for a usable SVID.
    async fn svid_by(
        &self,
        deadline: Instant,
    ) -> std::result::Result<Arc<CurrentSvid>, carapace_core::Error> {
        let mut rx = self.svid.clone();
        let clock = self.clock.clone();
        let waited = tokio::time::timeout_at(
            deadline,
            rx.wait_for(|s| {
                s.refusal.is_some()
                    || s.current
                        .as_ref()
                        .is_some_and(|c| c.not_after > clock.unix_now())
            }),
        )
        .await;
        match waited {
            Ok(Ok(state)) => match (&state.refusal, &state.current) {
                (Some(refusal), _) => Err(refused(refusal)),
                (None, Some(current)) => Ok(current.clone()),
                (None, None) => Err(unavailable("no X509-SVID")),
            },
            Ok(Err(_)) => Err(unavailable(format!(
                "the follower of the Workload API at {} has stopped",
                self.socket.display()
            ))),
            Err(_) => {
                let problem = self.svid.borrow().problem.clone();
                Err(unavailable(format!(
                    "no X509-SVID from the agent at {} within {}{}; this server needs a \
                     registration entry on the upstream servers, marked --downstream, whose \
                     selectors match this process",
                    self.socket.display(),
                    carapace_core::limits::describe(self.mint_timeout),
                    problem.map(|p| format!(" ({p})")).unwrap_or_default()
                )))
            }
        }
    }

    /// A gRPC channel to the upstream server over mutual TLS, connected by `deadline`:
    /// each handshake presents this server's SVID as the watch holds it then, and
    /// accepts only `server_spiffe_id` under the bundle the agent delivered. Waits for an
    /// SVID first. For `Upstream` calls beyond the mint (the bundle stream).
    pub async fn connect(
        &self,
        deadline: Instant,
    ) -> std::result::Result<tonic::transport::Channel, carapace_core::Error> {
        self.svid_by(deadline).await?;
        self.channel(deadline).await
    }

    async fn channel(
        &self,
        deadline: Instant,
    ) -> std::result::Result<tonic::transport::Channel, carapace_core::Error> {
        let tls = rustls::ClientConfig::builder_with_provider(carapace_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| refused(format!("TLS configuration: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(carapace_tls::SpiffeServerVerifier::new(
                self.bundle.clone(),
                self.server_id.clone(),
            ))
            .with_client_cert_resolver(Arc::new(WatchedSvid(self.svid.clone())));
        let mut tls = tls;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        carapace_common::tls_channel(&self.server_address, Arc::new(tls), left, left)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "cannot reach the upstream server at {} as {}: {}",
                    self.server_address,
                    self.server_id,
                    error_chain(&e)
                ))
            })
    }
}

/// Checks an upstream's answer to a mint for `req`: the first certificate is for the
/// CA's key, every one is a CA, each is signed by the next and the last by a root of the
/// bundle, which is of trust domain `td`.
fn check_minted(
    td: &TrustDomain,
    address: &str,
    req: &MintRequest,
    chain: Vec<Vec<u8>>,
    bundle: Option<&carapace_proto::types::Bundle>,
) -> std::result::Result<MintedCa, carapace_core::Error> {
    let wrong = |msg: String| {
        refused(format!(
            "the upstream server at {address} answered a mint with {msg}"
        ))
    };
    let first = chain
        .first()
        .ok_or_else(|| wrong("an empty chain".into()))?;
    if x509svid::public_key_of(first).map_err(|e| wrong(e.to_string()))? != req.public_key_der {
        return Err(wrong("a certificate for another key than this CA's".into()));
    }
    for c in &chain {
        x509svid::check_signing_cert(c)
            .map_err(|e| wrong(format!("a chain that is not all CAs: {e}")))?;
    }
    let bundle = bundle.ok_or_else(|| wrong("no bundle".into()))?;
    let bundle = carapace_proto::convert::bundle_from_wire(bundle)
        .map_err(|e| wrong(format!("a bad bundle: {e}")))?;
    if bundle.trust_domain() != td {
        return Err(wrong(format!(
            "the bundle of trust domain {}, not {td}",
            bundle.trust_domain()
        )));
    }
    if bundle.x509_authorities.is_empty() {
        return Err(wrong("a bundle without X.509 authorities".into()));
    }
    check_signatures(&chain, &bundle.x509_authorities).map_err(wrong)?;
    Ok(MintedCa {
        chain,
        roots: bundle.x509_authorities,
    })
}

/// Each certificate of `chain` is signed by the next, and the last by one of `roots`.
fn check_signatures(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> std::result::Result<(), String> {
    fn parse(der: &[u8]) -> std::result::Result<X509Certificate<'_>, String> {
        X509Certificate::from_der(der)
            .map(|(_, c)| c)
            .map_err(|e| format!("a certificate that does not parse: {e}"))
    }
    let certs = chain
        .iter()
        .map(|d| parse(d))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    for pair in certs.windows(2) {
        if let [child, parent] = pair {
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|_| {
                    format!(
                        "a chain whose certificate {} is not signed by the next one",
                        child.subject()
                    )
                })?;
        }
    }
    let last = certs.last().ok_or_else(|| "an empty chain".to_owned())?;
    let roots = roots
        .iter()
        .map(|d| parse(d))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if !roots
        .iter()
        .any(|r| last.verify_signature(Some(r.public_key())).is_ok())
    {
        return Err(format!(
            "a chain that does not lead to the bundle's roots ({} is signed by none of them)",
            last.subject()
        ));
    }
    Ok(())
}

/// The client certificate of each handshake: the SVID the watch holds now.
#[derive(Debug)]
struct WatchedSvid(watch::Receiver<SvidState>);

impl rustls::client::ResolvesClientCert for WatchedSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().current.as_ref().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[async_trait::async_trait]
impl UpstreamAuthority for CarapaceUpstream {
    fn name(&self) -> &str {
        NAME
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    async fn mint_x509_ca(
        &self,
        req: &MintRequest,
    ) -> std::result::Result<MintedCa, carapace_core::Error> {
        if req.trust_domain != self.td {
            return Err(refused(format!(
                "asked for a CA of trust domain {}, but the upstream serves {}",
                req.trust_domain, self.td
            )));
        }
        let deadline = Instant::now() + self.mint_timeout;
        let svid = self.svid_by(deadline).await?;
        let channel = self.channel(deadline).await?;
        let mut client = UpstreamClient::new(channel);
        let call = client.mint_downstream_ca(MintDownstreamCaRequest {
            csr: req.csr_der.clone(),
            preferred_ttl_seconds: req.ttl.as_secs(),
            path_len: u32::from(req.path_len),
        });
        let answer = self.answer(deadline, &svid, call).await?;
        let minted = check_minted(
            &self.td,
            &self.server_address,
            req,
            answer.ca_chain,
            answer.bundle.as_ref(),
        )?;
        if let Some(first) = minted.chain.first() {
            let (_, not_after) = x509svid::validity_of(first)?;
            tracing::info!(
                upstream = %self.server_address,
                caller = %svid.spiffe_id,
                not_after,
                chain = minted.chain.len(),
                roots = minted.roots.len(),
                "the upstream server certified a new X.509 CA"
            );
        }
        Ok(minted)
    }

    async fn x509_roots(&self) -> std::result::Result<Vec<Vec<u8>>, carapace_core::Error> {
        self.svid_by(Instant::now() + self.mint_timeout).await?;
        Ok(self.bundle.borrow().x509_authorities.clone())
    }

    async fn publish_jwt_key(
        &self,
        key: &carapace_core::JwtKey,
    ) -> std::result::Result<Option<TrustBundle>, carapace_core::Error> {
        let deadline = Instant::now() + self.mint_timeout;
        let svid = self.svid_by(deadline).await?;
        let mut client = UpstreamClient::new(self.channel(deadline).await?);
        let call = client.publish_jwt_authority(PublishJwtAuthorityRequest {
            key: Some(types::JwtKey {
                kid: key.kid.clone(),
                public_key: key.public_key_der.clone(),
                expires_at: key.expires_at.unwrap_or(0),
            }),
        });
        let answer = self.answer(deadline, &svid, call).await?;
        self.bundle_of_answer(answer.bundle.as_ref()).map(Some)
    }

    async fn next_bundle(
        &self,
        known_sequence: u64,
    ) -> std::result::Result<Option<TrustBundle>, carapace_core::Error> {
        let mut watching = self.watching.lock().await;
        // A fresh stream asks for the bundle at once (sequence 0: "none held"), and its
        // first message is returned whatever its sequence: the caller learns that the
        // upstream server is back even when its bundle did not change meanwhile.
        let mut fresh = false;
        if watching.is_none() {
            let deadline = Instant::now() + self.mint_timeout;
            let svid = self.svid_by(deadline).await?;
            let mut client = UpstreamClient::new(self.channel(deadline).await?);
            let call = client.watch_bundle(WatchBundleRequest { known_sequence: 0 });
            let stream = self.answer(deadline, &svid, call).await?;
            *watching = Some(stream);
            fresh = true;
        }
        loop {
            let Some(stream) = watching.as_mut() else {
                return Err(unavailable("the bundle stream is closed"));
            };
            let next = tokio::time::timeout(WATCH_SILENCE, stream.message()).await;
            let bundle = match next {
                Ok(Ok(Some(bundle))) => bundle,
                Ok(Ok(None)) => {
                    *watching = None;
                    return Err(unavailable(format!(
                        "the upstream server at {} ended the bundle stream",
                        self.server_address
                    )));
                }
                Ok(Err(s)) => {
                    *watching = None;
                    let caller = self
                        .svid
                        .borrow()
                        .current
                        .as_ref()
                        .map(|c| c.spiffe_id.clone())
                        .unwrap_or_else(|| self.server_id.clone());
                    return Err(status_error(&self.server_address, &caller, &s));
                }
                Err(_) => {
                    *watching = None;
                    return Err(unavailable(format!(
                        "the upstream server at {} sent nothing on the bundle stream for {}",
                        self.server_address,
                        carapace_core::limits::describe(WATCH_SILENCE)
                    )));
                }
            };
            if bundle.sequence == known_sequence && !fresh {
                // The liveness beat: the bundle held already.
                continue;
            }
            match self.bundle_of_answer(Some(&bundle)) {
                Ok(b) => return Ok(Some(b)),
                Err(e) => {
                    *watching = None;
                    return Err(e);
                }
            }
        }
    }
}

/// A gRPC status from the upstream server as a core error, with its message and address.
fn status_error(address: &str, caller: &SpiffeId, s: &tonic::Status) -> carapace_core::Error {
    use tonic::Code;
    let what = format!(
        "the upstream server at {address} answered {:?}: {}",
        s.code(),
        s.message()
    );
    match s.code() {
        // The upstream's message names the caller and the fix; an older or another one
        // may not.
        Code::PermissionDenied | Code::Unauthenticated
            if !s.message().contains(&caller.to_string()) =>
        {
            refused(format!(
                "{what} (this server calls as {caller}: that ID needs a registration entry \
                 marked --downstream on the upstream servers)"
            ))
        }
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::Unimplemented
        | Code::OutOfRange => refused(what),
        _ => unavailable(what),
    }
}

/// Refuses a socket path that does not exist or is not a socket, naming the setting.
fn check_socket(socket: &Path) -> Result<()> {
    match std::fs::metadata(socket) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(cfg_err(format!(
            "workload_api_socket {} is not a socket",
            socket.display()
        ))),
        Err(e) => Err(cfg_err(format!(
            "workload_api_socket {}: {e}; start the agent of the upstream servers on \
             this host first (its Workload API gives this server its identity)",
            socket.display()
        ))),
    }
}

/// What the follower task needs.
#[derive(Debug)]
struct Follower {
    socket: PathBuf,
    td: TrustDomain,
    clock: Arc<dyn Clock>,
}

/// Follows the agent's `FetchX509SVID` stream for ever (until aborted), reconnecting
/// with backoff.
async fn follow(
    f: Follower,
    svid_tx: watch::Sender<SvidState>,
    bundle_tx: watch::Sender<Arc<TrustBundle>>,
) {
    let mut delay = BACKOFF.0;
    loop {
        let problem = match f.follow_once(&svid_tx, &bundle_tx, &mut delay).await {
            Ok(()) => "the agent ended the Workload API stream".to_owned(),
            Err(e) => e,
        };
        let jitter = rand::rng().random_range(0..=delay.as_millis() / 5);
        let wait = delay + Duration::from_millis(u64::try_from(jitter).unwrap_or(0));
        tracing::warn!(
            socket = %f.socket.display(),
            error = %problem,
            retry_in_ms = wait.as_millis(),
            "upstream_authority.carapace: following the Workload API failed; retrying"
        );
        svid_tx.send_modify(|s| s.problem = Some(problem));
        tokio::time::sleep(wait).await;
        delay = (delay * 2).min(BACKOFF.1);
    }
}

impl Follower {
    /// One connection: each response applied, until the stream ends or fails.
    async fn follow_once(
        &self,
        svid_tx: &watch::Sender<SvidState>,
        bundle_tx: &watch::Sender<Arc<TrustBundle>>,
        delay: &mut Duration,
    ) -> std::result::Result<(), String> {
        let shown = self.socket.display();
        // The process answering must run as the socket's owner (the agent that made it).
        let owner = std::fs::metadata(&self.socket)
            .map_err(|e| format!("workload_api_socket {shown}: {e}"))?
            .uid();
        let channel = carapace_common::uds_channel_checked(&self.socket, None, vec![owner])
            .await
            .map_err(|e| format!("cannot connect to {shown}: {}", error_chain(&e)))?;
        let mut stream = fetch_x509_svid(channel).await.map_err(|e| e.to_string())?;
        while let Some(ctx) = stream.next().await.map_err(|e| e.to_string())? {
            match self.accept(ctx) {
                Ok((current, bundle)) => {
                    tracing::info!(
                        socket = %shown,
                        spiffe_id = %current.spiffe_id,
                        not_after = current.not_after,
                        "upstream_authority.carapace: this server's X509-SVID from the agent"
                    );
                    svid_tx.send_replace(SvidState {
                        current: Some(Arc::new(current)),
                        problem: None,
                        refusal: None,
                    });
                    bundle_tx.send_replace(Arc::new(bundle));
                    *delay = BACKOFF.0;
                }
                Err(Rejected::Refusal(msg)) => {
                    tracing::error!(socket = %shown, "upstream_authority.carapace: {msg}");
                    svid_tx.send_replace(SvidState {
                        current: None,
                        problem: Some(msg.clone()),
                        refusal: Some(msg),
                    });
                }
                Err(Rejected::Bad(msg)) => return Err(msg),
            }
        }
        Ok(())
    }

    /// Checks one response: the default SVID in this trust domain, its key its leaf's,
    /// its chain valid under the bundle now.
    fn accept(
        &self,
        ctx: X509Context,
    ) -> std::result::Result<(CurrentSvid, TrustBundle), Rejected> {
        let svid = ctx
            .default_svid()
            .ok_or_else(|| Rejected::Bad("the Workload API sent no SVID".into()))?;
        if !svid.spiffe_id.is_member_of(&self.td) {
            return Err(Rejected::Refusal(format!(
                "the agent at {} serves trust domain {} (it gave this server {}), this \
                 server is in {}: workload_api_socket must be the socket of an agent of \
                 this trust domain's upstream servers",
                self.socket.display(),
                svid.spiffe_id.trust_domain(),
                svid.spiffe_id,
                self.td
            )));
        }
        let bad = |m: String| Rejected::Bad(format!("the SVID for {}: {m}", svid.spiffe_id));
        let leaf = svid
            .chain
            .first()
            .ok_or_else(|| bad("an empty chain".into()))?;
        let key = SoftKey::from_pkcs8("upstream-svid", &svid.key_pkcs8)
            .map_err(|e| bad(format!("its key: {e}")))?;
        if x509svid::public_key_of(leaf).map_err(|e| bad(e.to_string()))? != key.public_key_der() {
            return Err(bad("its key is not the certificate's".into()));
        }
        let now = u64::try_from(self.clock.unix_now()).unwrap_or(0);
        let verified = x509svid::verify_chain(&svid.chain, &ctx.bundle, now)
            .map_err(|e| bad(format!("not valid under the bundle the agent sent: {e}")))?;
        let key: Arc<dyn KeySigner> = Arc::new(key);
        Ok((
            CurrentSvid {
                spiffe_id: verified.spiffe_id,
                not_after: verified.not_after,
                key: carapace_tls::certified_key(&svid.chain, key),
            },
            ctx.bundle,
        ))
    }
}

/// Why a Workload API response was not taken.
#[derive(Debug)]
enum Rejected {
    /// Not usable for this server whatever happens next (another trust domain).
    Refusal(String),
    /// Malformed or invalid; the stream is reopened.
    Bad(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    fn cfg(toml_text: &str) -> std::result::Result<CarapaceUpstreamConfig, String> {
        carapace_common::plugin_settings(&toml_text.parse::<toml::Table>().unwrap())
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn settings_are_checked_naming_the_key() {
        let missing = cfg("server_address = \"root:8081\"").unwrap_err();
        assert!(missing.contains("workload_api_socket"), "{missing}");
        let missing = cfg("workload_api_socket = \"/run/a.sock\"").unwrap_err();
        assert!(missing.contains("server_address"), "{missing}");
        let unknown =
            cfg("server_address = \"a:1\"\nworkload_api_socket = \"/s\"\nport = 1").unwrap_err();
        assert!(unknown.contains("port"), "{unknown}");
        for (bad, needle) in [
            ("server_address = \"root\"", "server_address"),
            ("server_address = \"root:0\"", "server_address"),
            ("server_address = \"root:http\"", "server_address"),
            ("server_address = \"https://root:1\"", "server_address"),
            ("server_address = \":8081\"", "server_address"),
            (
                "server_address = \"a:1\"\nserver_spiffe_id = \"root\"",
                "server_spiffe_id",
            ),
            (
                "server_address = \"a:1\"\nmint_timeout = \"1h\"",
                "mint_timeout",
            ),
        ] {
            let c = cfg(&format!("{bad}\nworkload_api_socket = \"/s\"")).unwrap();
            let problems = c.check().unwrap_err().join("; ");
            assert!(problems.contains(needle), "{bad}: {problems}");
        }
        for good in ["root.example.org:8081", "127.0.0.1:1", "[::1]:8081"] {
            let c = cfg(&format!(
                "server_address = \"{good}\"\nworkload_api_socket = \"/s\""
            ))
            .unwrap();
            assert!(c.check().is_ok(), "{good}");
        }
    }

    #[test]
    fn the_server_id_defaults_to_the_server_of_the_trust_domain_and_must_be_in_it() {
        let c = cfg("server_address = \"a:1\"\nworkload_api_socket = \"/s\"").unwrap();
        assert_eq!(
            c.server_id(&td()).unwrap().to_string(),
            "spiffe://example.org/spire/server"
        );
        let c = cfg("server_address = \"a:1\"\nworkload_api_socket = \"/s\"\n\
             server_spiffe_id = \"spiffe://other.org/spire/server\"")
        .unwrap();
        let err = c.server_id(&td()).unwrap_err().to_string();
        assert!(
            err.contains("other.org") && err.contains("example.org"),
            "{err}"
        );
    }

    #[test]
    fn the_fingerprint_names_the_upstream_server_not_its_roots() {
        let a: SpiffeId = "spiffe://example.org/spire/server".parse().unwrap();
        let b: SpiffeId = "spiffe://example.org/root".parse().unwrap();
        assert_eq!(fingerprint_of(&a), fingerprint_of(&a));
        assert_ne!(fingerprint_of(&a), fingerprint_of(&b));
        assert_eq!(fingerprint_of(&a).len(), 64);
    }

    #[tokio::test]
    async fn a_missing_or_wrong_socket_is_refused_at_start_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(carapace_core::clock::SystemClock);
        let c = cfg("server_address = \"a:1\"\nworkload_api_socket = \"agent/api.sock\"").unwrap();
        let err = CarapaceUpstream::start(&c, &td(), dir.path(), clock.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("workload_api_socket")
                && err.contains(&dir.path().join("agent/api.sock").display().to_string()),
            "{err}"
        );
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let c = cfg("server_address = \"a:1\"\nworkload_api_socket = \"file\"").unwrap();
        let err = CarapaceUpstream::start(&c, &td(), dir.path(), clock)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a socket"), "{err}");
    }

    /// A socket nobody serves the Workload API on (a listener that never answers): a
    /// mint waits `mint_timeout` and fails naming the socket and what is missing; nothing
    /// is sent to any upstream server.
    #[tokio::test]
    async fn a_mint_without_an_svid_fails_after_mint_timeout_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let _listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let c = cfg(&format!(
            "server_address = \"127.0.0.1:1\"\nworkload_api_socket = \"{}\"\nmint_timeout = \"1s\"",
            socket.display()
        ))
        .unwrap();
        let up = CarapaceUpstream::start(
            &c,
            &td(),
            dir.path(),
            Arc::new(carapace_core::clock::SystemClock),
        )
        .unwrap();
        let req = MintRequest {
            trust_domain: td(),
            public_key_der: Vec::new(),
            csr_der: Vec::new(),
            path_len: 0,
            ttl: Duration::from_secs(3600),
            common_name: "x".into(),
            organization: "o".into(),
            country: "c".into(),
            not_before: 0,
        };
        let started = std::time::Instant::now();
        let err = up.mint_x509_ca(&req).await.unwrap_err().to_string();
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert!(
            err.contains("no X509-SVID from the agent at")
                && err.contains(&socket.display().to_string())
                && err.contains("--downstream"),
            "{err}"
        );
        let err = up.x509_roots().await.unwrap_err().to_string();
        assert!(err.contains("no X509-SVID"), "{err}");
        // Another trust domain asked for: refused before anything else.
        let other = MintRequest {
            trust_domain: TrustDomain::new("other.org").unwrap(),
            ..req
        };
        let err = up.mint_x509_ca(&other).await.unwrap_err().to_string();
        assert!(err.contains("other.org"), "{err}");
    }

    /// A root CA of `td` (self-signed) as (DER, issuer).
    fn root_ca(td: &TrustDomain, cn: &str) -> (Vec<u8>, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let now = carapace_core::clock::unix_now();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        let params = crate::ca::ca_params(
            td,
            dn,
            rcgen::BasicConstraints::Unconstrained,
            now - 60,
            now + 86_400,
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        (der, rcgen::Issuer::new(params, key))
    }

    /// A certificate for `key` signed by `issuer`: a CA (pathLen 0) or, with `ca` false,
    /// a leaf.
    fn certify(
        key: &rcgen::KeyPair,
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        ca: bool,
    ) -> Vec<u8> {
        let now = carapace_core::clock::unix_now();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "downstream");
        let mut params = crate::ca::ca_params(
            &td(),
            dn,
            rcgen::BasicConstraints::Constrained(0),
            now - 60,
            now + 3600,
        )
        .unwrap();
        if !ca {
            params.is_ca = rcgen::IsCa::ExplicitNoCa;
            params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        }
        params.signed_by(key, issuer).unwrap().der().to_vec()
    }

    fn wire_bundle(td: &str, roots: Vec<Vec<u8>>) -> carapace_proto::types::Bundle {
        carapace_proto::types::Bundle {
            trust_domain: td.into(),
            x509_authorities: roots,
            ..Default::default()
        }
    }

    /// What an upstream answers is checked before the CA manager sees it; real
    /// certificates, one fault each.
    #[test]
    fn a_minted_answer_is_checked_before_use() {
        let (root_a, issuer_a) = root_ca(&td(), "root a");
        let (root_b, _) = root_ca(&td(), "root b");
        let key = rcgen::KeyPair::generate().unwrap();
        let req = MintRequest {
            trust_domain: td(),
            public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
            csr_der: Vec::new(),
            path_len: 0,
            ttl: Duration::from_secs(3600),
            common_name: "x".into(),
            organization: "o".into(),
            country: "c".into(),
            not_before: 0,
        };
        let ca = certify(&key, &issuer_a, true);
        let good = wire_bundle("example.org", vec![root_a.clone()]);
        let check = |chain: Vec<Vec<u8>>, bundle: Option<&carapace_proto::types::Bundle>| {
            check_minted(&td(), "root:8081", &req, chain, bundle)
        };
        let minted = check(vec![ca.clone()], Some(&good)).unwrap();
        assert_eq!(minted.chain, vec![ca.clone()]);
        assert_eq!(minted.roots, vec![root_a.clone()]);

        let other_key = rcgen::KeyPair::generate().unwrap();
        type Case = (
            Vec<Vec<u8>>,
            Option<carapace_proto::types::Bundle>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (Vec::new(), Some(good.clone()), "an empty chain"),
            (
                vec![certify(&other_key, &issuer_a, true)],
                Some(good.clone()),
                "another key",
            ),
            (
                vec![certify(&key, &issuer_a, false)],
                Some(good.clone()),
                "not all CAs",
            ),
            (vec![ca.clone()], None, "no bundle"),
            (
                vec![ca.clone()],
                Some(wire_bundle("other.org", vec![root_a.clone()])),
                "trust domain other.org",
            ),
            (
                vec![ca.clone()],
                Some(wire_bundle("example.org", Vec::new())),
                "without X.509 authorities",
            ),
            (
                vec![ca.clone()],
                Some(wire_bundle("example.org", vec![root_b.clone()])),
                "does not lead to the bundle's roots",
            ),
            (
                vec![ca.clone(), root_b.clone()],
                Some(wire_bundle("example.org", vec![root_b.clone()])),
                "is not signed by the next one",
            ),
        ];
        for (chain, bundle, needle) in cases {
            let err = check(chain, bundle.as_ref()).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("root:8081"),
                "{needle}: {err}"
            );
        }
    }
}
