//! Envoy's Secret Discovery Service (SDS v3, `envoy.service.secret.v3`), served on the
//! Workload API socket so that an Envoy configured for SPIRE's agent works unchanged.
//!
//! - Strings from Envoy (node, nonces, NACK messages) are logged quoted (`Debug`), never raw.
//! - The caller is attested as for every Workload API RPC ([`WorkloadApi::attest`]), but
//!   the `workload.spiffe.io` security header is not required: Envoy does not send it. A
//!   caller with no identity is refused with `PermissionDenied` ("no identity issued"),
//!   as `FetchX509Bundles` is: bundles too are for workloads that have an identity.
//! - Resource names ([`SdsConfig`] holds the configurable ones): an identity's SPIFFE ID
//!   (a `tls_certificate`); `default` (the caller's first identity, in entry-id order);
//!   the own trust domain's SPIFFE ID (`spiffe://example.org`) or `ROOTCA` (its bundle as
//!   a `validation_context`); `ALL` (the own and federated bundles in one SPIFFE
//!   validator configuration); a federated trust domain's SPIFFE ID. The federated
//!   bundles are those the caller is entitled to ([`CacheState::entitled`]: its entries
//!   federate with them), never another the agent holds. An empty list asks
//!   for everything (every identity by SPIFFE ID and every bundle by trust domain ID).
//!   Each requested name gets its own `Secret`, so `ROOTCA` and `ALL` may be asked for
//!   together (SPIRE refuses that). A name the caller cannot have fails the request with
//!   `InvalidArgument`, naming what was left over.
//! - Certificates: the chain and the PKCS#8 key inline, as PEM. Validation contexts: the
//!   SPIFFE certificate validator (`envoy.tls.cert_validator.spiffe`, one trust domain per
//!   bundle) unless it is disabled by the config or by the node metadata key
//!   `disable_spiffe_cert_validation` (a bool or a string such as `"true"`), or the Envoy
//!   reports a build version older than 1.18 (which lacks it); otherwise `trusted_ca`.
//! - `StreamSecrets`: `version_info` counts the responses of the stream, every response
//!   has a new random nonce. A request naming an older nonce is stale and ignored; an ACK
//!   (or a NACK) is answered only if it changes the resource names; a NACK is logged with
//!   Envoy's error and the same secrets are not sent again; a cache change (rotation, a
//!   bundle change) sends a new response to every stream whose secrets it changes.
//! - Streams (`StreamSecrets`, `DeltaSecrets`) are driven by their response stream, polled
//!   by the connection's task, with no task or channel of their own: a stream ends when
//!   Envoy closes its side of the call (with no error), when the agent shuts down
//!   (`Unavailable`), or after sending an error.
//! - `FetchSecrets`: one response, with no version and no nonce.
//! - `DeltaSecrets` (incremental xDS): the names subscribed so far (the first request
//!   subscribing to none, or `*`, subscribes to everything, as SotW's empty list does),
//!   each resource versioned by a digest of its content; a response carries only the
//!   resources whose version the client does not hold (including those it declared in
//!   `initial_resource_versions`), and `removed_resources` for those of a wildcard
//!   subscription that are gone. ACKs and NACKs (logged) are not answered; the name
//!   rules and errors are those of `StreamSecrets`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use carapace_core::bundle::pem_blocks;
use carapace_core::{SelectorSet, TrustBundle};
use carapace_proto::sds::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source, node,
};
use carapace_proto::sds::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use carapace_proto::sds::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use carapace_proto::sds::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use futures::StreamExt as _;
use prost_types::Any;
use rand::Rng as _;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use zeroize::Zeroize as _;

use super::{FeedStream, FirstAnswer, NO_IDENTITY, WorkloadApi, shutting_down};
use crate::cache::{CacheState, CachedSvid};

/// The type URL of the resources SDS serves.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// The node metadata key with which one Envoy turns the SPIFFE validator off (or on).
pub const DISABLE_SPIFFE_CERT_VALIDATION_KEY: &str = "disable_spiffe_cert_validation";

/// The oldest Envoy with the SPIFFE certificate validator: 1.18.
const SPIFFE_VALIDATOR_SINCE: (u32, u32) = (1, 18);

/// How SDS names its resources (`[sds]` in the agent config); the defaults are SPIRE's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    /// The name of the caller's first identity.
    pub default_svid_name: String,
    /// The name of the own trust domain's bundle.
    pub default_bundle_name: String,
    /// The name of the own and federated bundles together.
    pub default_all_bundles_name: String,
    /// Serve `trusted_ca` instead of the SPIFFE validator to every Envoy (one Envoy can
    /// choose for itself with the node metadata key
    /// [`DISABLE_SPIFFE_CERT_VALIDATION_KEY`]).
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsConfig {
    fn default() -> Self {
        SdsConfig {
            default_svid_name: "default".into(),
            default_bundle_name: "ROOTCA".into(),
            default_all_bundles_name: "ALL".into(),
            disable_spiffe_cert_validation: false,
        }
    }
}

/// A data source holding `bytes` inline.
fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

/// The type URL of the SPIFFE certificate validator's configuration.
pub(crate) const SPIFFE_VALIDATOR_CONFIG_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

/// `msg` as an `Any` of `type_url`, its encoding sized up front (`Any::from_msg` would
/// format the type URL and grow the buffer as it encodes).
fn pack(msg: &impl prost::Message, type_url: &str) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: msg.encode_to_vec(),
    }
}

/// A `tls_certificate` secret named `name` for `svid`.
fn tls_certificate(name: &str, svid: &CachedSvid) -> Secret {
    let chain = pem_blocks("CERTIFICATE", svid.cert_chain.iter().map(Vec::as_slice));
    let key = pem_blocks(
        "PRIVATE KEY",
        std::iter::once(svid.private_key_pkcs8.as_slice()),
    );
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

/// The X.509 authorities of `bundles` as PEM.
fn roots_pem(bundles: &[&TrustBundle]) -> Vec<u8> {
    pem_blocks(
        "CERTIFICATE",
        bundles
            .iter()
            .flat_map(|b| b.x509_authorities.iter().map(Vec::as_slice)),
    )
}

/// A `validation_context` secret named `name` trusting `bundles`: one trust domain each
/// for the SPIFFE validator, or all their roots together as `trusted_ca`.
fn validation_context(name: &str, bundles: &[&TrustBundle], spiffe_validator: bool) -> Secret {
    let context = if spiffe_validator {
        let config = SpiffeCertValidatorConfig {
            trust_domains: bundles
                .iter()
                .map(|b| spiffe_cert_validator_config::TrustDomain {
                    name: b.trust_domain().name().to_owned(),
                    trust_bundle: inline(roots_pem(&[b])),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        CertificateValidationContext {
            custom_validator_config: Some(TypedExtensionConfig {
                name: SPIFFE_VALIDATOR.into(),
                typed_config: Some(pack(&config, SPIFFE_VALIDATOR_CONFIG_TYPE_URL)),
            }),
            ..Default::default()
        }
    } else {
        CertificateValidationContext {
            trusted_ca: inline(roots_pem(bundles)),
            ..Default::default()
        }
    };
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(context)),
    }
}

/// The secrets answering `names` (empty: everything) for a caller holding `svids`
/// (non-empty, entry-id order), packed as Envoy expects them.
pub(crate) fn build_secrets(
    cfg: &SdsConfig,
    names: &[String],
    svids: &[Arc<CachedSvid>],
    own: &TrustBundle,
    federated: &[Arc<TrustBundle>],
    spiffe_validator: bool,
) -> Result<Vec<Any>, Status> {
    Ok(
        secrets_for(cfg, names, svids, own, federated, spiffe_validator)?
            .into_iter()
            .map(|secret| pack_secret(secret).1)
            .collect(),
    )
}

/// `secret` packed, and its name; the private key of the unpacked copy is wiped.
fn pack_secret(mut secret: Secret) -> (String, Any) {
    let any = pack(&secret, SECRET_TYPE_URL);
    if let Some(secret::Type::TlsCertificate(t)) = &mut secret.r#type {
        if let Some(data_source::Specifier::InlineBytes(key)) =
            t.private_key.as_mut().and_then(|k| k.specifier.as_mut())
        {
            key.zeroize();
        }
    }
    (secret.name, any)
}

/// The secrets of [`build_secrets`], unpacked.
fn secrets_for(
    cfg: &SdsConfig,
    names: &[String],
    svids: &[Arc<CachedSvid>],
    own: &TrustBundle,
    federated: &[Arc<TrustBundle>],
    spiffe_validator: bool,
) -> Result<Vec<Secret>, Status> {
    let everything = names.is_empty();
    let mut left: HashSet<&str> = names.iter().map(String::as_str).collect();
    // Whether `name` is asked for, by name or as part of everything; each name is
    // answered once.
    let mut asked = |name: &str, in_everything: bool| {
        if everything {
            in_everything
        } else {
            left.remove(name)
        }
    };
    let mut secrets = Vec::new();

    let own_id = own.trust_domain().id_string();
    if asked(&own_id, true) {
        secrets.push(validation_context(&own_id, &[own], spiffe_validator));
    }
    if asked(&cfg.default_bundle_name, false) {
        secrets.push(validation_context(
            &cfg.default_bundle_name,
            &[own],
            spiffe_validator,
        ));
    }
    let mut federated: Vec<&TrustBundle> = federated
        .iter()
        .map(Arc::as_ref)
        .filter(|b| b.trust_domain() != own.trust_domain())
        .collect();
    federated.sort_by(|a, b| a.trust_domain().name().cmp(b.trust_domain().name()));
    if asked(&cfg.default_all_bundles_name, false) {
        if !spiffe_validator {
            return Err(Status::invalid_argument(format!(
                "{:?} (every trust bundle together) needs the SPIFFE certificate validator, which is disabled for this Envoy (disable_spiffe_cert_validation, or an Envoy older than 1.18)",
                cfg.default_all_bundles_name
            )));
        }
        let mut all = vec![own];
        all.extend(federated.iter().copied());
        all.sort_by(|a, b| a.trust_domain().name().cmp(b.trust_domain().name()));
        secrets.push(validation_context(
            &cfg.default_all_bundles_name,
            &all,
            true,
        ));
    }
    for b in &federated {
        let id = b.trust_domain().id_string();
        if asked(&id, true) {
            secrets.push(validation_context(&id, &[*b], spiffe_validator));
        }
    }
    let mut ids = HashSet::new();
    for svid in svids {
        // Two entries with one SPIFFE ID: the first (entry-id order) names it.
        if ids.insert(svid.spiffe_id.as_str()) && asked(svid.spiffe_id.as_str(), true) {
            secrets.push(tls_certificate(svid.spiffe_id.as_str(), svid));
        }
    }
    if let Some(first) = svids.first() {
        if asked(&cfg.default_svid_name, false) {
            secrets.push(tls_certificate(&cfg.default_svid_name, first));
        }
    }
    if !left.is_empty() {
        let mut left: Vec<&str> = left.into_iter().collect();
        left.sort_unstable();
        return Err(Status::invalid_argument(format!(
            "workload is not authorized for the requested identities {left:?}"
        )));
    }
    Ok(secrets)
}

/// Whether to serve the SPIFFE validator to the Envoy described by `node` (`None`: it
/// did not say who it is).
pub(crate) fn use_spiffe_validator(cfg: &SdsConfig, node: Option<&Node>) -> Result<bool, Status> {
    let mut disabled = cfg.disable_spiffe_cert_validation;
    let flag = node
        .and_then(|n| n.metadata.as_ref())
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_CERT_VALIDATION_KEY))
        .and_then(|v| v.kind.as_ref());
    if let Some(kind) = flag {
        use prost_types::value::Kind;
        disabled = match kind {
            Kind::BoolValue(b) => *b,
            Kind::StringValue(s) => parse_bool(s).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "node metadata {DISABLE_SPIFFE_CERT_VALIDATION_KEY}: {s:?} is not a boolean"
                ))
            })?,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "node metadata {DISABLE_SPIFFE_CERT_VALIDATION_KEY}: must be a boolean or a string holding one"
                )));
            }
        };
    }
    if disabled {
        return Ok(false);
    }
    let version = match node.and_then(|n| n.user_agent_version_type.as_ref()) {
        Some(node::UserAgentVersionType::UserAgentBuildVersion(b)) => b.version.as_ref(),
        _ => None,
    };
    Ok(version.is_none_or(|v| (v.major_number, v.minor_number) >= SPIFFE_VALIDATOR_SINCE))
}

/// A boolean as Go's `strconv.ParseBool` (what SPIRE accepts) reads it.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn new_nonce() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// The bundles of other trust domains a caller holding `svids` may have: those its
/// entries federate with, among those the agent holds ([`CacheState::entitled`]). They
/// are in `ALL` and each is served under its trust domain ID; any other foreign trust
/// domain's name is refused like any name the caller cannot have.
fn federated_bundles(state: &CacheState, svids: &[Arc<CachedSvid>]) -> Vec<Arc<TrustBundle>> {
    state.entitled(svids)
}

/// The resources of one response for a caller with `selectors`: `PermissionDenied`
/// without an identity.
fn resources_for(
    cfg: &SdsConfig,
    state: &CacheState,
    selectors: &SelectorSet,
    names: &[String],
    spiffe_validator: bool,
) -> Result<Vec<Any>, Status> {
    let svids = state.matching(selectors);
    if svids.is_empty() {
        tracing::debug!(
            selectors = selectors.len(),
            "no identity issued to the SDS caller"
        );
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    build_secrets(
        cfg,
        names,
        &svids,
        &state.bundle,
        &federated_bundles(state, &svids),
        spiffe_validator,
    )
}

/// One SDS stream of either kind (`StreamSecrets`, `DeltaSecrets`), as [`SdsFeed`]
/// drives it: each of Envoy's requests and each cache change may produce a response, or
/// an error that ends the stream.
trait SdsStream: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// The stream's kind, for the log.
    const KIND: &'static str;
    /// Handles one request from Envoy, given the cache as it is now.
    fn on_request(
        &mut self,
        req: Self::Request,
        state: &CacheState,
    ) -> Result<Option<Self::Response>, Status>;
    /// Handles a change of the cache (a rotation, a bundle, an entry).
    fn on_update(&mut self, state: &CacheState) -> Result<Option<Self::Response>, Status>;
}

/// Drives one SDS stream from its response stream, polled by the connection's own task
/// (no task and no channel of its own): Envoy's requests, the cache's changes, the
/// agent's shutdown (`Unavailable`), the cache going away (`Unavailable`). It ends
/// without an error when Envoy closes its side of the call or the call breaks, and after
/// yielding an error.
struct SdsFeed<S: SdsStream> {
    stream: S,
    requests: Streaming<S::Request>,
    updates: watch::Receiver<Arc<CacheState>>,
    closing: watch::Receiver<bool>,
    /// Recorded with the code of the first response or error.
    first_answer: Option<FirstAnswer>,
    /// The stream has ended (its error, if any, was yielded).
    done: bool,
}

impl<S: SdsStream> SdsFeed<S>
where
    Streaming<S::Request>: futures::Stream<Item = Result<S::Request, Status>> + Unpin,
{
    /// The next response, or the error that ends the stream; `None` once it has ended.
    async fn next(&mut self) -> Option<Result<S::Response, Status>> {
        while !self.done {
            let step = tokio::select! {
                () = shutting_down(&mut self.closing) => {
                    Err(Status::unavailable("the agent is shutting down"))
                }
                req = self.requests.next() => match req {
                    Some(Ok(req)) => {
                        let state = self.updates.borrow_and_update().clone();
                        self.stream.on_request(req, &state)
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "{} ended by the client", S::KIND);
                        self.done = true;
                        return None;
                    }
                    None => {
                        self.done = true;
                        return None;
                    }
                },
                r = self.updates.changed() => match r {
                    Ok(()) => {
                        let state = self.updates.borrow_and_update().clone();
                        self.stream.on_update(&state)
                    }
                    Err(_) => Err(Status::unavailable("the SVID cache is gone")),
                },
            };
            match step {
                Ok(None) => {}
                Ok(Some(response)) => {
                    if let Some(f) = self.first_answer.take() {
                        f.answered(tonic::Code::Ok);
                    }
                    return Some(Ok(response));
                }
                Err(status) => {
                    if let Some(f) = self.first_answer.take() {
                        f.answered(status.code());
                    }
                    self.done = true;
                    return Some(Err(status));
                }
            }
        }
        None
    }
}

impl WorkloadApi {
    /// The response stream of `stream`, fed by `requests` and the cache.
    fn sds_stream<S: SdsStream>(
        &self,
        stream: S,
        requests: Streaming<S::Request>,
        first_answer: FirstAnswer,
    ) -> FeedStream<S::Response>
    where
        Streaming<S::Request>: futures::Stream<Item = Result<S::Request, Status>> + Unpin + Send,
    {
        let feed = SdsFeed {
            stream,
            requests,
            updates: self.cache.subscribe(),
            closing: self.closing.clone(),
            first_answer: Some(first_answer),
            done: false,
        };
        Box::pin(futures::stream::unfold(feed, |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        }))
    }
}

/// One `StreamSecrets` stream.
struct SecretStream {
    cfg: Arc<SdsConfig>,
    selectors: SelectorSet,
    /// Set by the first request, from its node (later requests may omit the node).
    spiffe_validator: Option<bool>,
    /// The resource names of the latest request; `None` before the first.
    names: Option<Vec<String>>,
    /// Responses sent so far: the `version_info` of the last one.
    version: u64,
    /// The nonce of the last response.
    nonce: Option<String>,
    /// The resources of the last response (ACKed, NACKed or pending).
    sent: Option<Vec<Any>>,
}

impl SecretStream {
    /// The response with the secrets for the current names from `state`, unless they are
    /// what was last sent and `force` is false.
    fn answer(
        &mut self,
        state: &CacheState,
        force: bool,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let (Some(names), Some(spiffe)) = (&self.names, self.spiffe_validator) else {
            return Ok(None);
        };
        let resources = resources_for(&self.cfg, state, &self.selectors, names, spiffe)?;
        if !force && self.sent.as_ref() == Some(&resources) {
            return Ok(None);
        }
        self.version += 1;
        let nonce = new_nonce();
        let response = DiscoveryResponse {
            version_info: self.version.to_string(),
            resources: resources.clone(),
            type_url: SECRET_TYPE_URL.into(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        tracing::debug!(
            version = self.version,
            resources = resources.len(),
            "SDS response sent"
        );
        self.nonce = Some(nonce);
        self.sent = Some(resources);
        Ok(Some(response))
    }
}

impl SdsStream for SecretStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const KIND: &'static str = "SDS stream";

    fn on_request(
        &mut self,
        req: DiscoveryRequest,
        state: &CacheState,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        if self.spiffe_validator.is_none() {
            if let Some(n) = &req.node {
                tracing::debug!(node = ?n.id, cluster = ?n.cluster, agent = ?n.user_agent_name, "SDS stream opened");
            }
            self.spiffe_validator = Some(use_spiffe_validator(&self.cfg, req.node.as_ref())?);
        }
        if let Some(nonce) = &self.nonce {
            if req.response_nonce != *nonce {
                tracing::debug!(
                    nonce = ?req.response_nonce,
                    "stale SDS request (not for the last response): ignored"
                );
                return Ok(None);
            }
        }
        if let Some(e) = &req.error_detail {
            tracing::warn!(
                version = ?req.version_info,
                names = ?req.resource_names,
                code = e.code,
                error = ?e.message,
                "Envoy rejected the secrets (NACK); they are not sent again"
            );
        }
        let changed = self.names.as_ref() != Some(&req.resource_names);
        self.names = Some(req.resource_names);
        if self.sent.is_some() && !changed {
            // An ACK or a NACK of the current subscription: nothing to send.
            return Ok(None);
        }
        self.answer(state, true)
    }

    fn on_update(&mut self, state: &CacheState) -> Result<Option<DiscoveryResponse>, Status> {
        self.answer(state, false)
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for WorkloadApi {
    type DeltaSecretsStream = FeedStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = FeedStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let call = FirstAnswer::new("DeltaSecrets");
        let selectors = call.failed(self.attest(&request, call.rpc).await)?;
        let stream = DeltaStream {
            cfg: self.sds.clone(),
            selectors,
            spiffe_validator: None,
            wildcard: false,
            subscribed: BTreeSet::new(),
            known: HashMap::new(),
            version: 0,
        };
        Ok(Response::new(self.sds_stream(
            stream,
            request.into_inner(),
            call,
        )))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let call = FirstAnswer::new("StreamSecrets");
        let selectors = call.failed(self.attest(&request, call.rpc).await)?;
        let stream = SecretStream {
            cfg: self.sds.clone(),
            selectors,
            spiffe_validator: None,
            names: None,
            version: 0,
            nonce: None,
            sent: None,
        };
        Ok(Response::new(self.sds_stream(
            stream,
            request.into_inner(),
            call,
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let call = FirstAnswer::new("FetchSecrets");
        call.unary(self.fetch_secrets_once(request, call.rpc).await)
    }
}

/// The wildcard resource name of incremental xDS.
const WILDCARD: &str = "*";

/// A resource's version in incremental xDS: a digest of its encoding, so that equal
/// content has equal versions across streams and agent restarts.
fn resource_version(any: &Any) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(any.type_url.as_bytes())
        .chain_update(&any.value)
        .finalize();
    hex::encode(&digest[..16])
}

/// One `DeltaSecrets` stream.
struct DeltaStream {
    cfg: Arc<SdsConfig>,
    selectors: SelectorSet,
    /// Set by the first request, from its node.
    spiffe_validator: Option<bool>,
    /// Everything the caller may have is subscribed.
    wildcard: bool,
    /// The names subscribed explicitly.
    subscribed: BTreeSet<String>,
    /// What the client holds: name → version (sent, or declared by the client).
    known: HashMap<String, String>,
    /// Responses sent so far: the `system_version_info` of the last one.
    version: u64,
}

impl DeltaStream {
    /// The subscribed secrets from `state`, by name.
    fn current(&self, state: &CacheState, spiffe: bool) -> Result<BTreeMap<String, Any>, Status> {
        let mut out = BTreeMap::new();
        let mut lists = Vec::new();
        if self.wildcard {
            lists.push(Vec::new());
        }
        if !self.subscribed.is_empty() {
            lists.push(self.subscribed.iter().cloned().collect::<Vec<_>>());
        }
        let svids = state.matching(&self.selectors);
        if svids.is_empty() {
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        let federated = federated_bundles(state, &svids);
        for names in lists {
            for secret in secrets_for(&self.cfg, &names, &svids, &state.bundle, &federated, spiffe)?
            {
                let (name, any) = pack_secret(secret);
                out.insert(name, any);
            }
        }
        Ok(out)
    }

    /// The response with what the client does not hold yet, and the removal of what a
    /// wildcard subscription no longer has; none if there is neither.
    fn answer(&mut self, state: &CacheState) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let Some(spiffe) = self.spiffe_validator else {
            return Ok(None);
        };
        let current = self.current(state, spiffe)?;
        let mut resources = Vec::new();
        for (name, any) in current.iter() {
            let version = resource_version(any);
            if self.known.get(name) != Some(&version) {
                resources.push(
                    carapace_proto::sds::envoy::service::discovery::v3::Resource {
                        name: name.clone(),
                        version: version.clone(),
                        resource: Some(any.clone()),
                        ..Default::default()
                    },
                );
                self.known.insert(name.clone(), version);
            }
        }
        let removed: Vec<String> = self
            .known
            .keys()
            .filter(|name| !current.contains_key(*name))
            .cloned()
            .collect();
        for name in &removed {
            self.known.remove(name);
        }
        if resources.is_empty() && removed.is_empty() {
            return Ok(None);
        }
        self.version += 1;
        Ok(Some(DeltaDiscoveryResponse {
            system_version_info: self.version.to_string(),
            resources,
            type_url: SECRET_TYPE_URL.into(),
            removed_resources: removed,
            nonce: new_nonce(),
            ..Default::default()
        }))
    }
}

impl SdsStream for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const KIND: &'static str = "SDS delta stream";

    fn on_request(
        &mut self,
        mut req: DeltaDiscoveryRequest,
        state: &CacheState,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        if self.spiffe_validator.is_none() {
            self.spiffe_validator = Some(use_spiffe_validator(&self.cfg, req.node.as_ref())?);
            // The first request: what the client already holds, and the legacy wildcard
            // (a first request naming nothing).
            self.known = std::mem::take(&mut req.initial_resource_versions);
            self.wildcard = req.resource_names_subscribe.is_empty();
        }
        if let Some(e) = &req.error_detail {
            tracing::warn!(
                nonce = ?req.response_nonce,
                code = e.code,
                error = ?e.message,
                "Envoy rejected the secrets (NACK, incremental); they are not sent again"
            );
        }
        for name in req.resource_names_subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.subscribed.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
            } else {
                self.subscribed.remove(&name);
                // Unsubscribed: the client forgets it, so a later subscription resends.
                self.known.remove(&name);
            }
        }
        if !self.wildcard {
            // What is no longer subscribed needs no removal notice.
            let subscribed = &self.subscribed;
            self.known.retain(|name, _| subscribed.contains(name));
        }
        self.answer(state)
    }

    fn on_update(&mut self, state: &CacheState) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        self.answer(state)
    }
}

impl WorkloadApi {
    async fn fetch_secrets_once(
        &self,
        request: Request<DiscoveryRequest>,
        method: &str,
    ) -> Result<DiscoveryResponse, Status> {
        let selectors = self.attest(&request, method).await?;
        let req = request.get_ref();
        let spiffe = use_spiffe_validator(&self.sds, req.node.as_ref())?;
        let state = self.cache.current();
        let resources = resources_for(&self.sds, &state, &selectors, &req.resource_names, spiffe)?;
        Ok(DiscoveryResponse {
            resources,
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
    }
}
