//! The SPIFFE Workload API, served on a Unix socket.
//!
//! Rules (the SPIFFE Workload Endpoint and Workload API standards, github.com/spiffe/spiffe):
//! - every RPC requires the metadata `workload.spiffe.io: true`, exactly once; otherwise
//!   `InvalidArgument`;
//! - the caller is identified by the kernel only ([`peer`]): each RPC runs every workload
//!   attestor ([`crate::workload_attestor`]) on the connection's caller (all of them within
//!   `workload_attestation_timeout`, else `Unavailable`: never a partial selector set),
//!   unions the selectors, then checks through the caller's pidfd that the same process
//!   is still alive and still has that PID; if not, the RPC is `Unauthenticated` and the
//!   connection is closed, so a recycled PID cannot be attested as another process;
//! - a caller is *entitled* to the federated bundles of the trust domains its entries
//!   (those whose selectors match it) federate with, among those the agent holds
//!   ([`CacheState::entitled`]); it never sees another, even one the agent holds for
//!   another workload;
//! - `FetchX509SVID` streams the full set of matching SVIDs, with the entitled bundles in
//!   `federated_bundles` (keyed by trust domain ID, `spiffe://<td>`), again on every
//!   change; `PermissionDenied` ("no identity issued") when nothing matches;
//! - `FetchX509Bundles` streams the own trust domain's bundle and the entitled ones to
//!   callers that have an identity, again when their X.509 authorities change;
//! - `FetchJWTSVID` requires an audience (`InvalidArgument` without one, or with an
//!   empty one, or with a `spiffe_id` that is not a SPIFFE ID) and answers one JWT-SVID
//!   per identity of the caller (the same identities, order and hints as
//!   `FetchX509SVID`, narrowed to `spiffe_id` when given), `PermissionDenied` ("no
//!   identity issued") when none matches. Tokens come from the server
//!   (`Node.NewJWTSVID`) and are cached per identity and audience set until half their
//!   life ([`crate::jwt_cache`]); when the server cannot be reached a cached token that
//!   is still valid is served, else `Unavailable`;
//! - `FetchJWTBundles` streams the JWT keys of the own trust domain and of the entitled
//!   ones, a JWKS document each, to callers that have an identity, again when the keys
//!   change;
//! - `ValidateJWTSVID` requires both fields and answers `InvalidArgument`, naming the
//!   reason, for any token [`jwt::validate`] refuses: a token of a foreign trust domain
//!   is verified with its keys if the caller is entitled to its bundle, refused (naming
//!   the trust domain) if not.
//!
//! The same socket serves Envoy's Secret Discovery Service ([`sds`]), with the same
//! caller attestation but without the security header, which Envoy does not send.

pub mod h2_authority;
pub mod jwt;
pub mod peer;
pub mod sds;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use carapace_core::plugin::WorkloadAttestor;
use carapace_core::{SelectorSet, TrustBundle};
use carapace_proto::sds::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use carapace_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use carapace_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub use peer::{Peer, PeerStream, incoming};

use crate::cache::{CacheState, CachedSvid, SvidCache, same_svids};
use crate::node_client::ServerLink;
use crate::{Error, Result};

/// The security header every Workload API request must carry.
pub use carapace_proto::workload_client::SECURITY_HEADER;

const NO_IDENTITY: &str = "no identity issued";

/// How long all workload attestors together may take for one request, by default.
pub const DEFAULT_ATTESTATION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection without an RPC in progress stays open, by default.
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds on the Workload API's connections (`[workload_api]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Live connections in total.
    pub max_connections: usize,
    /// Live connections of one uid.
    pub max_connections_per_uid: usize,
    /// How long a connection without an RPC in progress (including one that never sent
    /// a byte) stays open.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// The defaults for a process that may hold `fd_limit` descriptors (`None`:
    /// unlimited): each connection holds two (its socket and the caller's pidfd), and the
    /// Workload API may use half of them, so `max_connections` is a quarter of the limit
    /// (at least 8, at most 16,384) and a uid may hold a quarter of that (at least 2).
    pub fn from_fd_limit(fd_limit: Option<u64>) -> Self {
        let fds = usize::try_from(fd_limit.unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
        let max_connections = (fds / 4).clamp(8, 16_384);
        ConnectionLimits {
            max_connections,
            max_connections_per_uid: (max_connections / 4).max(2),
            idle_timeout: DEFAULT_CONNECTION_IDLE_TIMEOUT,
        }
    }
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: SvidCache,
    attestors: Arc<[Arc<dyn WorkloadAttestor>]>,
    attestation_timeout: Duration,
    limits: ConnectionLimits,
    /// How long [`serve`] waits for open connections after shutdown before returning
    /// anyway.
    drain_timeout: Duration,
    /// Turns true when the server shuts down, so that streams end and connections close.
    closing: watch::Receiver<bool>,
    /// The way to the server and the JWT-SVID cache.
    jwt: Arc<jwt::JwtService>,
    /// How SDS names its resources.
    sds: Arc<sds::SdsConfig>,
}

impl WorkloadApi {
    /// A service answering from `cache`, identifying callers with every one of
    /// `attestors`.
    pub fn new(cache: SvidCache, attestors: Vec<Arc<dyn WorkloadAttestor>>) -> Self {
        // A receiver whose sender is gone never reports a change; `serve` replaces it.
        let (_tx, closing) = watch::channel(false);
        WorkloadApi {
            cache,
            attestors: attestors.into(),
            attestation_timeout: DEFAULT_ATTESTATION_TIMEOUT,
            limits: ConnectionLimits::from_fd_limit(carapace_common::listener::fd_limit()),
            drain_timeout: carapace_common::SHUTDOWN_GRACE,
            closing,
            jwt: Arc::new(jwt::JwtService::new(
                ServerLink::none(),
                crate::jwt_cache::DEFAULT_CAPACITY,
            )),
            sds: Arc::new(sds::SdsConfig::default()),
        }
    }

    /// Asks the server for JWT-SVIDs through `server` (the manager keeps it current),
    /// caching at most `capacity` tokens (default [`crate::jwt_cache::DEFAULT_CAPACITY`]).
    /// Without it, `FetchJWTSVID` can only answer `Unavailable`.
    pub fn with_server(mut self, server: ServerLink, capacity: usize) -> Self {
        self.jwt = Arc::new(jwt::JwtService::new(server, capacity));
        self
    }

    /// Names SDS resources and chooses Envoy's certificate validator as `config` says
    /// (default [`sds::SdsConfig::default`], SPIRE's names).
    pub fn with_sds(mut self, config: sds::SdsConfig) -> Self {
        self.sds = Arc::new(config);
        self
    }

    /// Bounds how long a shutdown waits for open connections (default
    /// [`carapace_common::SHUTDOWN_GRACE`]).
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Bounds the time all attestors together may take for one request (default
    /// [`DEFAULT_ATTESTATION_TIMEOUT`]); past it the request fails with `Unavailable`.
    pub fn with_attestation_timeout(mut self, timeout: Duration) -> Self {
        self.attestation_timeout = timeout;
        self
    }

    /// Bounds the connections of the socket (default
    /// [`ConnectionLimits::from_fd_limit`] of this process's limit).
    pub fn with_connection_limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Checks the security header, identifies the caller and returns its selectors.
    async fn authorize<T>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<SelectorSet, Status> {
        check_security_header(request)?;
        self.attest(request, method).await
    }

    /// Identifies the caller of `request` through the kernel and every workload attestor
    /// and returns its selectors (no security header check: SDS has none).
    async fn attest<T>(&self, request: &Request<T>, method: &str) -> Result<SelectorSet, Status> {
        let peer = request.extensions().get::<Peer>().ok_or_else(|| {
            tracing::error!(
                method,
                "Workload API request without kernel peer credentials"
            );
            Status::internal("caller credentials unavailable")
        })?;
        let caller = peer.caller();
        // Every attestor must answer, within the time bound: a stuck /proc read or a
        // slow attestor yields Unavailable, never a partial selector set.
        let attested = tokio::time::timeout(self.attestation_timeout, async {
            let mut selectors = SelectorSet::new();
            for attestor in self.attestors.iter() {
                let s = attestor
                    .attest(&caller)
                    .await
                    .map_err(|e| (attestor.name(), e))?;
                selectors.extend(s);
            }
            Ok::<_, (&str, carapace_core::Error)>(selectors)
        })
        .await;
        // Everything above read /proc/<pid> by number: it describes this caller only if
        // the pidfd still names a live process with that PID now. Checked whatever the
        // attestors said: a caller that vanished (often the reason an attestor failed)
        // is refused as such and loses its connection.
        if !peer.is_alive() {
            tracing::warn!(
                method,
                pid = caller.pid,
                uid = caller.uid,
                gid = caller.gid,
                "the caller exited during attestation; closing its connection"
            );
            peer.close_connection();
            return Err(Status::unauthenticated(
                "could not verify existence of the original caller",
            ));
        }
        let selectors = match attested {
            Ok(Ok(s)) => s,
            Ok(Err((attestor, e))) => {
                tracing::warn!(
                    method,
                    pid = caller.pid,
                    uid = caller.uid,
                    gid = caller.gid,
                    attestor,
                    error = %e,
                    "workload attestation failed"
                );
                return Err(Status::unavailable("workload attestation failed"));
            }
            Err(_) => {
                tracing::warn!(
                    method,
                    pid = caller.pid,
                    uid = caller.uid,
                    gid = caller.gid,
                    timeout = ?self.attestation_timeout,
                    "workload attestation timed out"
                );
                return Err(Status::unavailable("workload attestation timed out"));
            }
        };
        tracing::debug!(
            method,
            pid = caller.pid,
            uid = caller.uid,
            gid = caller.gid,
            selectors = selectors.len(),
            "attested Workload API caller"
        );
        Ok(selectors)
    }
}

/// `workload.spiffe.io: true`, exactly once, exact value.
fn check_security_header<T>(request: &Request<T>) -> Result<(), Status> {
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// `svids` without those whose non-empty hint repeats an earlier one, as the standard
/// requires unique hints (SPIRE does the same).
fn with_unique_hints(svids: &[Arc<CachedSvid>]) -> Vec<&Arc<CachedSvid>> {
    let mut hints = HashSet::new();
    svids
        .iter()
        .filter(|s| {
            let unique = s.hint.is_empty() || hints.insert(s.hint.as_str());
            if !unique {
                tracing::warn!(
                    entry_id = %s.entry_id,
                    hint = %s.hint,
                    "SVID left out of a Workload API response: its hint is not unique"
                );
            }
            unique
        })
        .collect()
}

/// Bundles keyed by trust domain ID (`spiffe://<td>`, the key go-spiffe and py-spiffe
/// read), each as `encode` makes it.
fn keyed_by_trust_domain<'a>(
    bundles: impl IntoIterator<Item = &'a TrustBundle>,
    encode: impl Fn(&TrustBundle) -> Vec<u8>,
) -> HashMap<String, Vec<u8>> {
    bundles
        .into_iter()
        .map(|b| (b.trust_domain().id_string(), encode(b)))
        .collect()
}

/// The `X509SVIDResponse` for `svids` (non-empty), hints made unique, with the caller's
/// entitled `federated` bundles.
fn x509_svid_response(
    svids: &[Arc<CachedSvid>],
    bundle: &[u8],
    federated: &[Arc<TrustBundle>],
) -> X509svidResponse {
    let svids = with_unique_hints(svids)
        .into_iter()
        .map(|s| X509svid {
            spiffe_id: s.spiffe_id.to_string(),
            x509_svid: s.cert_chain.concat(),
            x509_svid_key: s.private_key_pkcs8.to_vec(),
            bundle: bundle.to_vec(),
            hint: s.hint.clone(),
        })
        .collect();
    X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: keyed_by_trust_domain(
            federated.iter().map(Arc::as_ref),
            TrustBundle::to_concatenated_der,
        ),
    }
}

/// The own bundle and the caller's entitled `federated` ones.
fn x509_bundles_response(
    state: &CacheState,
    federated: &[Arc<TrustBundle>],
) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: keyed_by_trust_domain(
            std::iter::once(state.bundle.as_ref()).chain(federated.iter().map(Arc::as_ref)),
            TrustBundle::to_concatenated_der,
        ),
    }
}

/// What a stream follows: a cache change that does not touch it sends nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// The caller's SVIDs and the X.509 authorities of the own and entitled bundles
    /// (`FetchX509SVID`).
    Svids,
    /// The X.509 authorities of the own and entitled bundles (`FetchX509Bundles`).
    X509Authorities,
    /// The JWT keys of the own and entitled bundles (`FetchJWTBundles`).
    JwtKeys,
}

/// What a stream last sent, to tell whether a cache change concerns it.
struct Sent {
    svids: Vec<Arc<CachedSvid>>,
    bundle: Arc<TrustBundle>,
    /// The entitled federated bundles, sorted by trust domain.
    federated: Vec<Arc<TrustBundle>>,
}

impl Follow {
    /// Whether `a` and `b` differ in what this stream sends of a bundle.
    fn bundle_changed(self, a: &Arc<TrustBundle>, b: &Arc<TrustBundle>) -> bool {
        !Arc::ptr_eq(a, b)
            && (a.trust_domain() != b.trust_domain()
                || match self {
                    Follow::Svids | Follow::X509Authorities => {
                        a.x509_authorities != b.x509_authorities
                    }
                    Follow::JwtKeys => a.jwt_authorities != b.jwt_authorities,
                })
    }

    fn changed(
        self,
        prev: &Sent,
        svids: &[Arc<CachedSvid>],
        federated: &[Arc<TrustBundle>],
        state: &CacheState,
    ) -> bool {
        (self == Follow::Svids && !same_svids(&prev.svids, svids))
            || self.bundle_changed(&prev.bundle, &state.bundle)
            || prev.federated.len() != federated.len()
            || prev
                .federated
                .iter()
                .zip(federated)
                .any(|(a, b)| self.bundle_changed(a, b))
    }
}

/// A server stream of the Workload API: polled by the connection's own task, so that the
/// first message goes out without a hand-off to another task.
pub(crate) type FeedStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One stream fed from the cache: the first message at once, then one per relevant
/// change, until the client goes away (the stream is dropped), the identity is gone or the
/// server shuts down. `build` makes a message from the matching SVIDs, their entitled
/// federated bundles and the snapshot.
struct Feed<F> {
    updates: watch::Receiver<Arc<CacheState>>,
    closing: watch::Receiver<bool>,
    selectors: SelectorSet,
    follow: Follow,
    build: F,
    first_answer: Option<FirstAnswer>,
    /// What the stream last sent; `None` before the first message.
    last: Option<Sent>,
    /// The stream sent its last item (an error) and ends.
    done: bool,
}

impl<F, T> Feed<F>
where
    F: Fn(&[Arc<CachedSvid>], &[Arc<TrustBundle>], &CacheState) -> T,
{
    /// The message for the current snapshot if it concerns the stream (always for the
    /// first); `PermissionDenied`, ending the stream, if the caller has no identity left.
    fn message_for_current(&mut self) -> Option<Result<T, Status>> {
        let state = self.updates.borrow_and_update().clone();
        let svids = state.matching(&self.selectors);
        if svids.is_empty() {
            tracing::debug!(
                selectors = self.selectors.len(),
                "no identity issued to the caller"
            );
            if let Some(f) = self.first_answer.take() {
                f.answered(tonic::Code::PermissionDenied);
            }
            self.done = true;
            return Some(Err(Status::permission_denied(NO_IDENTITY)));
        }
        let federated = state.entitled(&svids);
        if let Some(prev) = &self.last {
            if !self.follow.changed(prev, &svids, &federated, &state) {
                return None;
            }
        }
        if let Some(f) = self.first_answer.take() {
            f.answered(tonic::Code::Ok);
        }
        let message = (self.build)(&svids, &federated, &state);
        self.last = Some(Sent {
            svids,
            bundle: state.bundle.clone(),
            federated,
        });
        Some(Ok(message))
    }

    /// The next item: the first message, or the next that concerns the stream once the
    /// cache changes; an error ends the stream.
    async fn next(&mut self) -> Option<Result<T, Status>> {
        if self.done {
            return None;
        }
        if self.last.is_none() {
            return self.message_for_current();
        }
        loop {
            tokio::select! {
                () = shutting_down(&mut self.closing) => {
                    self.done = true;
                    return Some(Err(Status::unavailable("the agent is shutting down")));
                }
                r = self.updates.changed() => {
                    if r.is_err() {
                        self.done = true;
                        return Some(Err(Status::unavailable("the SVID cache is gone")));
                    }
                }
            }
            if let Some(item) = self.message_for_current() {
                return Some(item);
            }
        }
    }
}

/// A call's start, recorded in the metrics with the code of its first answer.
#[derive(Debug, Clone, Copy)]
struct FirstAnswer {
    rpc: &'static str,
    start: std::time::Instant,
}

impl FirstAnswer {
    fn new(rpc: &'static str) -> Self {
        FirstAnswer {
            rpc,
            start: std::time::Instant::now(),
        }
    }

    fn answered(self, code: tonic::Code) {
        crate::metrics::metrics().rpc(self.rpc, code, self.start);
    }

    /// Records the code of a unary call's answer, and passes it on.
    fn unary<T>(self, r: Result<T, Status>) -> Result<Response<T>, Status> {
        self.answered(r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok));
        r.map(Response::new)
    }

    /// Records `r`'s code if it is an error, and passes it on.
    fn failed<T>(self, r: Result<T, Status>) -> Result<T, Status> {
        if let Err(s) = &r {
            self.answered(s.code());
        }
        r
    }
}

/// Completes when the server starts shutting down; never if no shutdown can come.
async fn shutting_down(closing: &mut watch::Receiver<bool>) {
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl WorkloadApi {
    /// The stream of `follow` for a caller with `selectors`.
    fn cache_stream<T, F>(
        &self,
        selectors: SelectorSet,
        follow: Follow,
        build: F,
        first_answer: FirstAnswer,
    ) -> FeedStream<T>
    where
        T: Send + 'static,
        F: Fn(&[Arc<CachedSvid>], &[Arc<TrustBundle>], &CacheState) -> T + Send + 'static,
    {
        let feed = Feed {
            updates: self.cache.subscribe(),
            closing: self.closing.clone(),
            selectors,
            follow,
            build,
            first_answer: Some(first_answer),
            last: None,
            done: false,
        };
        Box::pin(futures::stream::unfold(feed, |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        }))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = FeedStream<X509svidResponse>;
    type FetchX509BundlesStream = FeedStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = FeedStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let call = FirstAnswer::new("FetchX509SVID");
        let selectors = call.failed(self.authorize(&request, call.rpc).await)?;
        Ok(Response::new(self.cache_stream(
            selectors,
            Follow::Svids,
            |svids, federated, state| {
                x509_svid_response(svids, &state.bundle.to_concatenated_der(), federated)
            },
            call,
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let call = FirstAnswer::new("FetchX509Bundles");
        let selectors = call.failed(self.authorize(&request, call.rpc).await)?;
        Ok(Response::new(self.cache_stream(
            selectors,
            Follow::X509Authorities,
            |_, federated, state| x509_bundles_response(state, federated),
            call,
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let call = FirstAnswer::new("FetchJWTSVID");
        call.unary(self.fetch_jwt_svids(request, call.rpc).await)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let call = FirstAnswer::new("FetchJWTBundles");
        let selectors = call.failed(self.authorize(&request, call.rpc).await)?;
        Ok(Response::new(self.cache_stream(
            selectors,
            Follow::JwtKeys,
            |_, federated, state| jwt::jwt_bundles_response(&state.bundle, federated),
            call,
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let call = FirstAnswer::new("ValidateJWTSVID");
        call.unary(self.validate_jwt_svid(request, call.rpc).await)
    }
}

impl WorkloadApi {
    async fn fetch_jwt_svids(
        &self,
        request: Request<JwtsvidRequest>,
        method: &str,
    ) -> Result<JwtsvidResponse, Status> {
        check_security_header(&request)?;
        let audiences = jwt::requested_audiences(&request.get_ref().audience)?;
        let wanted = match request.get_ref().spiffe_id.as_str() {
            "" => None,
            id => Some(id.parse::<carapace_core::SpiffeId>().map_err(|e| {
                Status::invalid_argument(format!("spiffe_id is not a SPIFFE ID: {e}"))
            })?),
        };
        let selectors = self.authorize(&request, method).await?;
        let state = self.cache.current();
        let matching = state.matching(&selectors);
        let identities: Vec<&Arc<CachedSvid>> = with_unique_hints(&matching)
            .into_iter()
            .filter(|s| wanted.as_ref().is_none_or(|w| *w == s.spiffe_id))
            .collect();
        if identities.is_empty() {
            tracing::debug!(
                selectors = selectors.len(),
                filtered = wanted.is_some(),
                "no identity issued to the caller"
            );
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        let tokens = futures::future::join_all(
            identities
                .iter()
                .map(|s| self.jwt.token_for(s, &audiences, &state.bundle)),
        )
        .await;
        let mut svids = Vec::with_capacity(identities.len());
        for (s, token) in identities.iter().zip(tokens) {
            if let Some(token) = token? {
                svids.push(Jwtsvid {
                    spiffe_id: s.spiffe_id.to_string(),
                    svid: token.to_string(),
                    hint: s.hint.clone(),
                });
            }
        }
        if svids.is_empty() {
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        Ok(JwtsvidResponse { svids })
    }

    async fn validate_jwt_svid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
        method: &str,
    ) -> Result<ValidateJwtsvidResponse, Status> {
        check_security_header(&request)?;
        let req = request.get_ref();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        // The caller is attested like any other (its identity is not required: a
        // verifier may have none, and then trusts its own trust domain only).
        let selectors = self.authorize(&request, method).await?;
        let state = self.cache.current();
        let federated = state.entitled(&state.matching(&selectors));
        let req = request.into_inner();
        match jwt::validate(
            &state.bundle,
            &federated,
            &req.audience,
            &req.svid,
            std::time::SystemTime::now(),
        ) {
            Ok((id, claims)) => Ok(ValidateJwtsvidResponse {
                spiffe_id: id.to_string(),
                claims: Some(jwt::claims_struct(claims)),
            }),
            Err(reason) => {
                tracing::info!(audience = %carapace_core::jose::shown(&req.audience), %reason, "JWT-SVID refused");
                Err(Status::invalid_argument(reason))
            }
        }
    }
}

/// Serves `api` on the Unix socket `socket_path` until `shutdown` completes.
///
/// Creates the socket's parent directory (mode 0755) if missing, removes a stale socket
/// (but refuses to remove anything that is not a socket, or a socket that still accepts
/// connections: another agent's), binds, and makes the socket
/// mode 0777: any local process may connect, its identity comes from the kernel. On
/// shutdown, open streams end with `Unavailable` and the server waits up to 5 seconds for
/// connections to close.
pub async fn serve(
    socket_path: &Path,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let listener = bind(socket_path)?;
    serve_listener(listener, socket_path, api, shutdown).await
}

/// Serves `api` on a listener made by [`bind`] until `shutdown` completes (see [`serve`]).
pub async fn serve_listener(
    listener: tokio::net::UnixListener,
    socket_path: &Path,
    mut api: WorkloadApi,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let limits = api.limits;
    let drain_timeout = api.drain_timeout;
    tracing::info!(
        socket = %socket_path.display(),
        max_connections = limits.max_connections,
        max_connections_per_uid = limits.max_connections_per_uid,
        connection_idle_timeout = ?limits.idle_timeout,
        fd_limit = ?carapace_common::listener::fd_limit(),
        "Workload API listening"
    );

    let (closing_tx, closing_rx) = watch::channel(false);
    api.closing = closing_rx.clone();
    let mut server_closing = closing_rx;
    let server = tonic::transport::Server::builder()
        .layer(carapace_common::listener::TrackRpcsLayer::<Peer>::new())
        .add_service(SecretDiscoveryServiceServer::new(api.clone()))
        .add_service(SpiffeWorkloadApiServer::new(api))
        .serve_with_incoming_shutdown(incoming(listener, limits), async move {
            let _ = server_closing.wait_for(|c| *c).await;
        });
    tokio::pin!(server);
    let map_err = |e: tonic::transport::Error| {
        Error::Workload(format!("serving {}: {e}", socket_path.display()))
    };
    tokio::select! {
        r = &mut server => return r.map_err(map_err),
        () = shutdown => {}
    }
    tracing::info!("Workload API shutting down");
    closing_tx.send_replace(true);
    match tokio::time::timeout(drain_timeout, server).await {
        Ok(r) => r.map_err(map_err),
        Err(_) => {
            tracing::warn!("Workload API connections still open after the drain timeout; closing");
            Ok(())
        }
    }
}

/// Creates the socket (see [`serve`]) so that start-up fails before anything else runs.
pub fn bind(socket_path: &Path) -> Result<tokio::net::UnixListener> {
    let shown = socket_path.display();
    if let Some(parent) = socket_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(Error::io(format!("creating {}", parent.display())))?;
            // The umask may have narrowed the mode; workloads must reach the socket.
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).map_err(
                Error::io(format!("setting the mode of {}", parent.display())),
            )?;
        }
    }
    // A stale socket (nothing accepts on it) is replaced; a live one, or anything that
    // is not a socket, is left alone and start-up fails.
    carapace_common::remove_stale_socket(socket_path, "carapace-agent")
        .map_err(|e| Error::Config(format!("workload API socket {shown}: {e}")))?;
    let listener = tokio::net::UnixListener::bind(socket_path)
        .map_err(Error::io(format!("binding {shown}")))?;
    std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o777))
        .map_err(Error::io(format!("setting the mode of {shown}")))?;
    Ok(listener)
}

#[cfg(test)]
mod tests;
