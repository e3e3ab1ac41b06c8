//! The node API (agent ↔ server) on TLS 1.3.
//!
//! `Attest` runs on server-authenticated TLS (the agent has no SVID yet); every other RPC
//! requires the agent's X509-SVID as client certificate and re-checks on every call that
//! the agent is attested, not banned, and presenting its latest SVID
//! ([`EntryCache::authenticate_agent`]). An agent only ever receives entries it is
//! authorized for, and the server signs a CSR only for such an entry, with that entry's
//! SPIFFE ID.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use carapace_common::listener::{ConnectionHandle, HasConnection};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use carapace_core::clock::unix_now;
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationStep, NodeAttestor, TLS_EXPORTER_LABEL,
    TLS_EXPORTER_LEN,
};
use carapace_core::{RegistrationEntry, SpiffeId};
use carapace_proto::node::{
    self, AttestRequest, AttestResponse, BatchNewX509svidRequest, BatchNewX509svidResponse,
    RenewAgentRequest, RenewAgentResponse, SyncAuthorizedRequest, SyncAuthorizedResponse,
    X509SvidResult, attest_request, attest_response,
};
use carapace_proto::types;

use crate::ca::{CaManager, IssuedSvid, SubjectKey, csr_public_key, csr_public_key_der, sign_leaf};
use crate::datastore::{AttestedAgent, Refusal};
use crate::entry_cache::{AgentCredential, EntryCache};
use crate::federation::bundles::{BundleMap, ForeignDiff, SentForeign};
use crate::sync_diff::{Diff, Sent};
use crate::{Error, Result};

/// The longest a whole attestation (all challenge rounds) may take.
pub const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest node API message (a batch of CSRs) on a connection with an agent SVID.
pub const MAX_MESSAGE_SIZE: usize = 32 * 1024 * 1024;
/// Largest message on a connection without an agent SVID (attestation only): an
/// attestor's payload (the plugins cap theirs at 64 KiB) plus a CSR and framing.
pub const MAX_ATTESTATION_MESSAGE_SIZE: usize = 128 * 1024;
/// Attestations in progress at once, by default; more are refused with
/// `ResourceExhausted` before their first message is read.
pub const DEFAULT_MAX_ATTESTATIONS_IN_FLIGHT: usize = 64;

/// Who is on the other end of a node API connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The TCP peer address.
    pub remote: SocketAddr,
    /// The client SVID, if one was presented (rustls has already verified it).
    pub svid: Option<PeerSvid>,
    /// The connection's TLS exporter for channel binding
    /// ([`AttestationContext::tls_exporter`]). Keying material: never logged.
    pub tls_exporter: TlsExporter,
    /// The connection's RPC count and idle timer ([`crate::listener`]).
    pub connection: ConnectionHandle,
}

impl PeerInfo {
    /// The SPIFFE ID of the workload SVID `peer` presented, if it may still act at `now`
    /// (unix seconds) under `bundle`: presented (else `none_presented`), not an agent's
    /// or a server's (`/spire/...`: `reserved` says what such SVIDs never do), not
    /// expired, still chaining to the current bundle. Else why not. What the caller may
    /// do is the caller's to check (an entry marked `admin`, `downstream`).
    pub fn workload_svid(
        peer: Option<&PeerInfo>,
        bundle: &carapace_core::TrustBundle,
        now: i64,
        none_presented: &str,
        reserved: &str,
    ) -> std::result::Result<SpiffeId, String> {
        let svid = peer
            .and_then(|p| p.svid.as_ref())
            .ok_or_else(|| none_presented.to_owned())?;
        let id = &svid.id;
        if id.is_reserved() {
            let what = if id.is_agent() {
                "an agent's SVID"
            } else {
                "under the reserved /spire path"
            };
            return Err(format!("{id} is {what}; {reserved}"));
        }
        if now >= svid.not_after {
            return Err(format!(
                "the client SVID {id} expired at {}",
                carapace_core::clock::rfc3339(svid.not_after)
            ));
        }
        let now_u = u64::try_from(now).unwrap_or(0);
        carapace_core::x509svid::verify_chain(&svid.chain, bundle, now_u).map_err(|e| {
            format!("the client SVID {id} is no longer valid under the trust bundle: {e}")
        })?;
        Ok(id.clone())
    }
}

impl HasConnection for PeerInfo {
    fn connection(&self) -> &ConnectionHandle {
        &self.connection
    }
}

/// [`TLS_EXPORTER_LEN`] bytes of a connection's TLS exporter, redacted in `Debug`.
#[derive(Clone)]
pub struct TlsExporter(pub [u8; TLS_EXPORTER_LEN]);

impl std::fmt::Debug for TlsExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsExporter(<redacted>)")
    }
}

/// The RFC 9266 `tls-exporter` value of a server connection.
pub(crate) fn tls_exporter<IO>(conn: &tokio_rustls::server::TlsStream<IO>) -> Option<TlsExporter> {
    let mut out = [0u8; TLS_EXPORTER_LEN];
    conn.get_ref()
        .1
        .export_keying_material(&mut out, TLS_EXPORTER_LABEL, None)
        .ok()?;
    Some(TlsExporter(out))
}

/// A verified client SVID.
#[derive(Debug, Clone)]
pub struct PeerSvid {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Its serial, lowercase hex without leading zeros.
    pub serial_hex: String,
    /// Its notAfter, unix seconds: every call checks it, whatever the handshake saw.
    pub not_after: i64,
    /// The certificates the peer presented, leaf first (DER): the admin API checks them
    /// against the current bundle on every call ([`crate::admin::api::RemoteAdmin`]).
    pub chain: Arc<[Vec<u8>]>,
}

impl PeerSvid {
    /// This SVID as a credential for a call at `now`.
    pub fn credential(&self, now: i64) -> AgentCredential<'_> {
        AgentCredential {
            id: &self.id,
            serial_hex: &self.serial_hex,
            not_after: self.not_after,
            now,
        }
    }
}

pub(crate) fn peer_svid<IO>(conn: &tokio_rustls::server::TlsStream<IO>) -> Option<PeerSvid> {
    let certs = conn.get_ref().1.peer_certificates()?;
    let leaf = certs.first()?;
    let id = carapace_core::x509svid::check_leaf(leaf).ok()?;
    let serial = carapace_core::x509svid::serial_of(leaf).ok()?;
    let (_, not_after) = carapace_core::x509svid::validity_of(leaf).ok()?;
    Some(PeerSvid {
        id,
        serial_hex: hex::encode(serial),
        not_after,
        chain: certs.iter().map(|c| c.to_vec()).collect(),
    })
}

/// A tokio instant at unix time `t` (seconds), or now if that has passed.
fn until_unix(t: i64) -> tokio::time::Instant {
    let left = t.saturating_sub(unix_now()).max(0);
    tokio::time::Instant::now() + Duration::from_secs(left.unsigned_abs())
}

/// Completes when `closing` turns true; never without a receiver or once its sender
/// is gone without having said so.
async fn shutting_down(closing: Option<&mut watch::Receiver<bool>>) {
    if let Some(c) = closing {
        if c.wait_for(|c| *c).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// Settings the node API needs.
#[derive(Debug, Clone)]
pub struct NodeApiSettings {
    /// Lifetime of workload SVIDs without their own TTL.
    pub default_x509_svid_ttl: Duration,
    /// Lifetime of agent SVIDs.
    pub agent_svid_ttl: Duration,
    /// How JWT-SVIDs are made.
    pub jwt: crate::jwt_keys::JwtSettings,
}

/// The node API service.
#[derive(Debug, Clone)]
pub struct NodeApi {
    cache: Arc<EntryCache>,
    ca: Arc<CaManager>,
    attestors: Arc<HashMap<String, Arc<dyn NodeAttestor>>>,
    /// `[node_attestation] require_together`: lists of attestors run together, in
    /// order, each opened by its first member.
    required_together: Arc<crate::config::NodeAttestation>,
    settings: NodeApiSettings,
    /// Permits for attestations in progress.
    attestations: Arc<Semaphore>,
    /// Turns true when the server shuts down: sync streams then end (`Unavailable`).
    closing: Option<watch::Receiver<bool>>,
    /// The foreign trust domains' bundles; `None`: no federation (none are sent).
    foreign: Option<watch::Receiver<Arc<BundleMap>>>,
}

/// A signing task that did not finish (it panicked, or was cancelled at shutdown): an
/// internal error, so its detail (a panic message) goes to the log and the caller gets
/// the generic message.
fn signing_task_failed(e: tokio::task::JoinError) -> Status {
    Status::from(Error::Ca(format!("signing task failed: {e}")))
}

/// The `result` label of a finished attestation: `ok`; `refused` when the node's
/// evidence, its request or its standing was not accepted (the node's doing); `error`
/// when the server could not finish (a datastore, key manager or time-out failure).
fn attestation_result(msg: &std::result::Result<AttestResponse, Status>) -> &'static str {
    use tonic::Code;
    match msg {
        Ok(_) => "ok",
        Err(s) => match s.code() {
            Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition => "refused",
            _ => "error",
        },
    }
}

fn svid_to_wire(s: &IssuedSvid) -> types::X509Svid {
    types::X509Svid {
        cert_chain: s.chain.clone(),
        expires_at: s.expires_at,
    }
}

impl NodeApi {
    /// A node API over the cache, the CA and the enabled attestors.
    pub fn new(
        cache: Arc<EntryCache>,
        ca: Arc<CaManager>,
        attestors: Vec<Arc<dyn NodeAttestor>>,
        settings: NodeApiSettings,
    ) -> Self {
        let attestors = attestors
            .into_iter()
            .map(|a| (a.name().to_owned(), a))
            .collect();
        NodeApi {
            cache,
            ca,
            attestors: Arc::new(attestors),
            required_together: Arc::default(),
            settings,
            attestations: Arc::new(Semaphore::new(DEFAULT_MAX_ATTESTATIONS_IN_FLIGHT)),
            closing: None,
            foreign: None,
        }
    }

    /// Requires the node attestors of each list together (composite node attestation,
    /// `[node_attestation] require_together`, validated by the config): an agent opens
    /// with a list's first member and is asked for the others on the same stream; a
    /// later member alone is refused.
    pub fn with_required_together(mut self, lists: crate::config::NodeAttestation) -> Self {
        self.required_together = Arc::new(lists);
        self
    }

    /// Sends each agent the foreign bundles its entries federate with, from `foreign`.
    pub fn with_foreign_bundles(mut self, foreign: watch::Receiver<Arc<BundleMap>>) -> Self {
        self.foreign = Some(foreign);
        self
    }

    /// Ends every sync stream (with `Unavailable`) once `closing` turns true, so that a
    /// shutdown does not wait on streams that never end by themselves.
    pub fn with_shutdown(mut self, closing: watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }

    /// Bounds the attestations in progress at once (default
    /// [`DEFAULT_MAX_ATTESTATIONS_IN_FLIGHT`]).
    pub fn with_max_attestations_in_flight(mut self, max: usize) -> Self {
        self.attestations = Arc::new(Semaphore::new(max));
        self
    }

    /// The gRPC service for connections with an agent SVID, with the node API's message
    /// size limits.
    pub fn into_service(self) -> node::node_server::NodeServer<Self> {
        node::node_server::NodeServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// The gRPC service for connections without an agent SVID: messages up to
    /// [`MAX_ATTESTATION_MESSAGE_SIZE`] (attestation is all such a caller may do).
    pub fn into_attestation_service(self) -> node::node_server::NodeServer<Self> {
        node::node_server::NodeServer::new(self)
            .max_decoding_message_size(MAX_ATTESTATION_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// Checks the caller's client SVID, on every call, and returns the agent and the SVID.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<(Arc<AttestedAgent>, PeerSvid)> {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.svid.clone())
            .ok_or_else(|| {
                Error::Unauthenticated(
                    "this call requires the agent's X509-SVID as client certificate".into(),
                )
            })?;
        if !peer.id.is_agent() || !peer.id.is_member_of(self.ca.trust_domain()) {
            return Err(Error::PermissionDenied(format!(
                "{} is not an agent of this trust domain",
                peer.id
            )));
        }
        match self
            .cache
            .authenticate_agent(&peer.credential(unix_now()))
            .await
        {
            Ok(agent) => Ok((agent, peer)),
            Err(e) => {
                let remote = req.extensions().get::<PeerInfo>().map(|p| p.remote);
                tracing::warn!(agent = %peer.id, remote = ?remote, error = %e, "refused an agent call");
                Err(e)
            }
        }
    }

    /// An attestor refused the evidence of a caller that presented its agent SVID (an
    /// attested agent renewing by attesting again): its node no longer proves what it
    /// proved, so the agent loses its standing at once, not when its SVID lapses.
    async fn refuse_agent(&self, peer: Option<&PeerSvid>, error: &carapace_core::Error) {
        use carapace_core::Blame;
        if !matches!(error.blame(), Blame::InvalidInput | Blame::PermissionDenied) {
            return; // a backend away for now says nothing about the node
        }
        let Some(peer) = peer else { return };
        let now = unix_now();
        if !peer.id.is_agent()
            || !peer.id.is_member_of(self.ca.trust_domain())
            || self.cache.still_authorized(&peer.credential(now)).is_err()
        {
            return;
        }
        let refusal = Refusal {
            at: now,
            reason: error.to_string(),
        };
        match self.cache.mark_refused(&peer.id, refusal).await {
            Ok(()) => tracing::warn!(
                agent = %peer.id,
                error = %error,
                "re-attestation refused: the agent is refused on every call until it attests afresh"
            ),
            Err(e) => {
                tracing::error!(agent = %peer.id, error = %e, "could not record a refused re-attestation")
            }
        }
    }

    /// The node attestors an attestation opening with `name` runs, in order: `name`
    /// alone, or the whole list of `[node_attestation] require_together` it heads. An
    /// attestor that is a later member of a list is refused alone.
    fn members_for(&self, name: &str) -> Result<Vec<Arc<dyn NodeAttestor>>> {
        let lookup = |n: &str| {
            self.attestors.get(n).cloned().ok_or_else(|| {
                let mut enabled: Vec<&str> = self.attestors.keys().map(String::as_str).collect();
                enabled.sort();
                Error::InvalidArgument(format!(
                    "node attestor {n:?} is not enabled on this server (enabled: {})",
                    enabled.join(", ")
                ))
            })
        };
        let first = lookup(name)?;
        let Some(list) = self.required_together.list_of(name) else {
            return Ok(vec![first]);
        };
        if list.first().map(String::as_str) != Some(name) {
            return Err(Error::PermissionDenied(format!(
                "node attestor {name} is required together with {} \
                 (node_attestation.require_together): attest with {} first",
                list.join(", "),
                list.first().map_or("", String::as_str)
            )));
        }
        // Config validation made sure every member is configured.
        list.iter().map(|m| lookup(m)).collect()
    }

    async fn run_attestation<S>(
        &self,
        inbound: &mut S,
        tx: &mpsc::Sender<std::result::Result<AttestResponse, Status>>,
        peer: Option<PeerInfo>,
        attestor_name: &mut Option<String>,
    ) -> Result<AttestResponse>
    where
        S: Stream<Item = std::result::Result<AttestRequest, Status>> + Unpin + Send,
    {
        let remote = peer.as_ref().map(|p| p.remote);
        let caller = peer.as_ref().and_then(|p| p.svid.as_ref());
        let Some(attest_request::Step::Params(params)) = next_step(inbound).await? else {
            return Err(Error::InvalidArgument(
                "attestation must open with AttestParams".into(),
            ));
        };
        if self.attestors.contains_key(&params.attestor) {
            // A configured name (also a later member refused alone) is a bounded label.
            *attestor_name = Some(params.attestor.clone());
        }
        let members = self.members_for(&params.attestor)?;
        let names: Vec<&str> = members.iter().map(|m| m.name()).collect();
        // A composite is recorded (and labelled) as its members joined with `+`: the
        // lists are configured, so the label set stays bounded.
        let joined = names.join("+");
        *attestor_name = Some(joined.clone());
        // Check the CSR before the attestor consumes any single-use evidence.
        let agent_public_key = csr_public_key_der(&params.csr)?;
        let key = SubjectKey::from_spki(&agent_public_key)?;
        let exporter = peer.as_ref().map(|p| &p.tls_exporter).ok_or_else(|| {
            Error::Unauthenticated("attestation needs a TLS 1.3 connection with an exporter".into())
        })?;
        // One context for every member: each binds its proof to this TLS session and
        // this agent key, as it does alone.
        let ctx = AttestationContext {
            agent_public_key,
            tls_exporter: exporter.0.to_vec(),
        };
        let composite = members.len() > 1;
        let mut results = Vec::with_capacity(members.len());
        for (i, member) in members.iter().enumerate() {
            // In a composite, every failure names the member: "kerberos (2 of tpm, kerberos)".
            let which = format!("{} ({} of {})", member.name(), i + 1, names.join(", "));
            let named = |e: carapace_core::Error| {
                if composite {
                    member_error(&which, e)
                } else {
                    e
                }
            };
            let payload = if i == 0 {
                params.payload.clone()
            } else {
                send(
                    tx,
                    attest_response::Step::NextAttestor(member.name().to_owned()),
                )
                .await?;
                match next_step(inbound).await {
                    Ok(Some(attest_request::Step::NextPayload(p))) => p,
                    Ok(other) => {
                        // The agent answered, without this member's evidence: refused,
                        // and recorded against a renewing agent like a failed member.
                        let e = carapace_core::Error::AttestationRejected(format!(
                            "{which}: the agent {} instead of this attestor's payload",
                            if other.is_none() {
                                "ended the attestation"
                            } else {
                                "sent another message"
                            }
                        ));
                        self.refuse_agent(caller, &e).await;
                        return Err(e.into());
                    }
                    Err(e) => {
                        return Err(Error::InvalidArgument(format!("{which}: {e}")));
                    }
                }
            };
            let result = match self
                .run_member(member.as_ref(), &payload, &ctx, inbound, tx)
                .await
            {
                Ok(r) => r,
                Err(MemberError::Attestor(e)) => {
                    let e = named(e);
                    self.refuse_agent(caller, &e).await;
                    return Err(e.into());
                }
                Err(MemberError::Stream(e)) => return Err(e),
            };
            if composite {
                if let Some(s) = result.selectors.iter().find(|s| s.kind() != member.name()) {
                    let e = carapace_core::Error::AttestationRejected(format!(
                        "{which}: the attestor produced selector {}:{}, not of its own type",
                        s.kind(),
                        s.value()
                    ));
                    self.refuse_agent(caller, &e).await;
                    return Err(e.into());
                }
            }
            results.push(result);
        }
        // The agent ID comes from the first member; the selectors are every member's.
        let first = &members[0];
        let mut results = results.into_iter();
        let Some(mut result) = results.next() else {
            return Err(Error::Ca("an attestation ran no node attestor".into()));
        };
        for r in results {
            result.selectors.extend(r.selectors.iter().cloned());
            result.can_reattest &= r.can_reattest;
        }
        let agent_id = self
            .ca
            .trust_domain()
            .agent_id(first.name(), &result.agent_path)?;
        if self.cache.get_agent(&agent_id).is_some_and(|a| a.banned) {
            return Err(Error::PermissionDenied(format!(
                "agent {agent_id} is banned"
            )));
        }
        let now = unix_now();
        let svid = self
            .ca
            .issue_x509_svid(
                agent_id.clone(),
                key,
                self.settings.agent_svid_ttl,
                Vec::new(),
                now,
            )
            .await;
        crate::metrics::metrics()
            .svids_issued
            .record("x509_agent", svid.is_ok(), 1);
        let svid = svid?;
        let serial = hex::encode(carapace_core::x509svid::serial_of(&svid.chain[0])?);
        // A join token is consumed in the transaction that records the agent, not by its
        // attestor: a failed write leaves it usable, a racing agent's write is refused.
        // (A composite never holds one: the config refuses it.)
        let token = match first.name() {
            crate::node_attestor::JOIN_TOKEN if !composite => Some(
                crate::node_attestor::presented_token(&params.payload)
                    .ok_or_else(crate::node_attestor::join_token_rejected)?,
            ),
            _ => None,
        };
        self.cache
            .attest_agent(
                AttestedAgent {
                    spiffe_id: agent_id.clone(),
                    attestor: joined.clone(),
                    serial,
                    new_serial: None,
                    expires_at: svid.expires_at,
                    banned: false,
                    reattestable: result.can_reattest,
                    attested_at: now,
                    selectors: result.selectors,
                    refused: None,
                },
                token.as_ref(),
            )
            .await?;
        tracing::info!(agent = %agent_id, attestor = %joined, remote = ?remote, "agent attested");
        let bundle = self.ca.bundle().borrow().clone();
        Ok(AttestResponse {
            step: Some(attest_response::Step::Result(node::AttestResult {
                svid: Some(svid_to_wire(&svid)),
                bundle: Some(types::Bundle::from(bundle.as_ref())),
                reattestable: result.can_reattest,
            })),
        })
    }

    /// Runs one node attestor from its first payload to its result, relaying its
    /// challenges on the stream.
    async fn run_member<S>(
        &self,
        attestor: &dyn NodeAttestor,
        payload: &[u8],
        ctx: &AttestationContext,
        inbound: &mut S,
        tx: &mpsc::Sender<std::result::Result<AttestResponse, Status>>,
    ) -> std::result::Result<AttestationResult, MemberError>
    where
        S: Stream<Item = std::result::Result<AttestRequest, Status>> + Unpin + Send,
    {
        let mut step = attestor
            .begin(payload, ctx)
            .await
            .map_err(MemberError::Attestor)?;
        loop {
            match step {
                AttestationStep::Done(r) => return Ok(r),
                AttestationStep::Challenge { challenge, session } => {
                    send(tx, attest_response::Step::Challenge(challenge))
                        .await
                        .map_err(MemberError::Stream)?;
                    let Some(attest_request::Step::ChallengeResponse(answer)) =
                        next_step(inbound).await.map_err(MemberError::Stream)?
                    else {
                        return Err(MemberError::Stream(Error::InvalidArgument(
                            "expected a challenge response".into(),
                        )));
                    };
                    step = session
                        .respond(&answer)
                        .await
                        .map_err(MemberError::Attestor)?;
                }
            }
        }
    }

    /// The next message of a sync stream: the entries `diff` holds, with `full` set when
    /// they replace the agent's whole set.
    fn sync_message(
        &self,
        full: bool,
        diff: &Diff,
        bundle: Option<types::Bundle>,
        foreign: &ForeignDiff,
    ) -> SyncAuthorizedResponse {
        SyncAuthorizedResponse {
            revision: self.cache.revision(),
            entries: diff
                .upserts
                .iter()
                .map(|e| types::Entry::from(e.as_ref()))
                .collect(),
            bundle,
            full,
            removed: diff.removed.clone(),
            federated_bundles: foreign
                .bundles
                .iter()
                .map(|b| types::Bundle::from(b.as_ref()))
                .collect(),
            removed_federated_bundles: foreign
                .removed
                .iter()
                .map(|td| td.name().to_owned())
                .collect(),
            federated_full: foreign.full,
        }
    }
}

/// A signed JWT-SVID as the node and admin APIs return it.
pub fn jwt_to_wire(j: &crate::jwt_keys::IssuedJwt) -> types::JwtSvid {
    types::JwtSvid {
        token: j.token.clone(),
        spiffe_id: j.spiffe_id.to_string(),
        expires_at: j.expires_at,
        issued_at: j.issued_at,
    }
}

/// How one node attestor of an attestation failed: the attestor refused (or could not
/// check) the evidence, or the stream broke.
enum MemberError {
    Attestor(carapace_core::Error),
    Stream(Error),
}

/// The next message of an attestation stream; `None` when the agent ended it.
async fn next_step<S>(inbound: &mut S) -> Result<Option<attest_request::Step>>
where
    S: Stream<Item = std::result::Result<AttestRequest, Status>> + Unpin + Send,
{
    match inbound.next().await {
        None => Ok(None),
        Some(Ok(m)) => Ok(m.step),
        Some(Err(s)) => Err(Error::InvalidArgument(format!(
            "attestation stream: {}",
            s.message()
        ))),
    }
}

/// Sends one step of an attestation to the agent.
async fn send(
    tx: &mpsc::Sender<std::result::Result<AttestResponse, Status>>,
    step: attest_response::Step,
) -> Result<()> {
    tx.send(Ok(AttestResponse { step: Some(step) }))
        .await
        .map_err(|_| Error::InvalidArgument("agent went away during attestation".into()))
}

/// A composite member's failure, naming the member (`which`: "kerberos (2 of tpm,
/// kerberos)") and keeping its class: a refusal stays a refusal, a backend away stays
/// `Unavailable`, an internal failure stays as it was (its detail goes to the log).
fn member_error(which: &str, e: carapace_core::Error) -> carapace_core::Error {
    use carapace_core::{Blame, Error as E};
    match e {
        E::AttestationRejected(m) => E::AttestationRejected(format!("{which}: {m}")),
        E::Unavailable(m) => E::Unavailable(format!("{which}: {m}")),
        e => match e.blame() {
            Blame::InvalidInput
            | Blame::PermissionDenied
            | Blame::NotFound
            | Blame::AlreadyExists => E::AttestationRejected(format!("{which}: {e}")),
            Blame::Unavailable => E::Unavailable(format!("{which}: {e}")),
            Blame::Internal => e,
        },
    }
}

type RespStream<T> = ReceiverStream<std::result::Result<T, Status>>;

#[tonic::async_trait]
impl node::node_server::Node for NodeApi {
    type AttestStream = RespStream<AttestResponse>;
    type SyncAuthorizedStream = RespStream<SyncAuthorizedResponse>;

    async fn attest(
        &self,
        req: Request<Streaming<AttestRequest>>,
    ) -> std::result::Result<Response<Self::AttestStream>, Status> {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let remote = peer.as_ref().map(|p| p.remote);
        // Taken before the first message is read, held until the attestation ends.
        let permit = self.attestations.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!(remote = ?remote, "attestation refused: too many in progress");
            Status::resource_exhausted("too many attestations in progress; retry later")
        })?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut attestor = None;
            let outcome = tokio::time::timeout(
                ATTESTATION_TIMEOUT,
                this.run_attestation(&mut inbound, &tx, peer, &mut attestor),
            )
            .await;
            let msg = match outcome {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(e)) => {
                    tracing::warn!(remote = ?remote, error = %e, "node attestation failed");
                    Err(Status::from(e))
                }
                Err(_) => Err(Status::deadline_exceeded("attestation took too long")),
            };
            // Only configured attestors become labels: a peer's made-up name is `none`.
            crate::metrics::metrics().node_attestations.record(
                attestor.as_deref().unwrap_or("none"),
                attestation_result(&msg),
            );
            drop(permit);
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> std::result::Result<Response<RenewAgentResponse>, Status> {
        let (agent, _) = self.authenticate(&req).await?;
        if agent.reattestable {
            // Its node must prove itself again at every renewal: a plain renewal would let
            // a node whose evidence changed (a PCR, a deleted principal) keep its identity.
            return Err(Error::PermissionDenied(format!(
                "agent {} renews by attesting again with {} evidence, not by RenewAgent",
                agent.spiffe_id, agent.attestor
            ))
            .into());
        }
        let key = csr_public_key(&req.get_ref().csr)?;
        let svid = self
            .ca
            .issue_x509_svid(
                agent.spiffe_id.clone(),
                key,
                self.settings.agent_svid_ttl,
                Vec::new(),
                unix_now(),
            )
            .await;
        crate::metrics::metrics()
            .svids_issued
            .record("x509_agent", svid.is_ok(), 1);
        let svid = svid?;
        let serial =
            hex::encode(carapace_core::x509svid::serial_of(&svid.chain[0]).map_err(Error::from)?);
        self.cache
            .set_agent_new_serial(&agent.spiffe_id, &serial, svid.expires_at)
            .await?;
        tracing::info!(agent = %agent.spiffe_id, expires_at = svid.expires_at, "renewed agent SVID");
        Ok(Response::new(RenewAgentResponse {
            svid: Some(svid_to_wire(&svid)),
        }))
    }

    async fn sync_authorized(
        &self,
        req: Request<SyncAuthorizedRequest>,
    ) -> std::result::Result<Response<Self::SyncAuthorizedStream>, Status> {
        let (agent, peer) = self.authenticate(&req).await?;
        let request = req.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        tokio::spawn(async move {
            let id = agent.spiffe_id.clone();
            let mut closing = this.closing.clone();
            let mut revisions = this.cache.subscribe();
            let mut bundles = this.ca.bundle();
            // What this stream has sent: `None` until the first message.
            let mut sent: Option<Sent> = None;
            let mut last_bundle: Option<types::Bundle> = None;
            let mut foreign = this.foreign.clone();
            let mut sent_foreign = SentForeign::default();
            // The stream ends when the SVID it was opened with lapses, whatever else.
            let lapse = tokio::time::sleep_until(until_unix(peer.not_after));
            tokio::pin!(lapse);
            loop {
                // The agent may have been banned, evicted, refused or renewed since the
                // call began, or its SVID may have expired: checked at every change.
                if let Err(e) = this.cache.still_authorized(&peer.credential(unix_now())) {
                    tracing::info!(agent = %id, error = %e, "ended an agent's sync stream");
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
                revisions.borrow_and_update();
                let bundle = types::Bundle::from(bundles.borrow_and_update().as_ref());
                let current = this.cache.authorized_entries(&id);
                let all_foreign = foreign
                    .as_mut()
                    .map(|f| f.borrow_and_update().clone())
                    .unwrap_or_default();
                let foreign_diff = sent_foreign.advance(
                    current.iter().flat_map(|e| e.federates_with.iter()),
                    &all_foreign,
                );
                // The first message: the full state, or a diff against what the agent
                // proves it holds. Later ones: what changed since the previous one, and
                // nothing at all when this agent's view did not change.
                let (full, diff) = match sent.as_mut() {
                    Some(s) => (false, s.advance(&current)),
                    None if request.resume => {
                        let (s, d) = Sent::resume(&request.held, &current);
                        sent = Some(s);
                        (false, d)
                    }
                    None => {
                        sent = Some(Sent::full(&current));
                        (
                            true,
                            Diff {
                                upserts: current,
                                removed: Vec::new(),
                            },
                        )
                    }
                };
                let first = last_bundle.is_none();
                let new_bundle = (last_bundle.as_ref() != Some(&bundle)).then(|| bundle.clone());
                if first || new_bundle.is_some() || !diff.is_empty() || !foreign_diff.is_empty() {
                    last_bundle = Some(bundle);
                    let msg = this.sync_message(full, &diff, new_bundle, &foreign_diff);
                    tracing::debug!(
                        agent = %id,
                        full,
                        entries = msg.entries.len(),
                        removed = msg.removed.len(),
                        federated_bundles = msg.federated_bundles.len(),
                        revision = msg.revision,
                        "sync message"
                    );
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = revisions.changed() => if r.is_err() { return },
                    r = bundles.changed() => if r.is_err() { return },
                    r = async {
                        match foreign.as_mut() {
                            Some(f) => f.changed().await,
                            None => std::future::pending().await,
                        }
                    } => if r.is_err() { return },
                    () = &mut lapse => {
                        // Re-checked above; should the clock disagree, again in a second.
                        lapse.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                    _ = tx.closed() => return,
                    () = shutting_down(closing.as_mut()) => {
                        let _ = tx.send(Err(Status::unavailable("the server is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<BatchNewX509svidRequest>,
    ) -> std::result::Result<Response<BatchNewX509svidResponse>, Status> {
        let (agent, _) = self.authenticate(&req).await?;
        let params = req.into_inner().params;
        let authorized: HashMap<String, Arc<RegistrationEntry>> = self
            .cache
            .authorized_entries(&agent.spiffe_id)
            .into_iter()
            .map(|e| (e.id.to_string(), e))
            .collect();
        let ca = self.ca.active()?;
        let default_ttl = self.settings.default_x509_svid_ttl;
        let now = unix_now();
        let jobs: Vec<(String, Option<Arc<RegistrationEntry>>, Vec<u8>)> = params
            .into_iter()
            .map(|p| {
                let e = authorized.get(&p.entry_id).cloned();
                (p.entry_id, e, p.csr)
            })
            .collect();
        // Every core, or every HSM session when the CA key's token serves more at once
        // (a network HSM's latency is not CPU: it needs signatures in flight).
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let workers = cores.max(ca.signing_concurrency().unwrap_or(1));
        let chunk = jobs.len().div_ceil(workers).max(1);
        let mut handles = Vec::new();
        let mut jobs = jobs.into_iter();
        loop {
            let part: Vec<_> = jobs.by_ref().take(chunk).collect();
            if part.is_empty() {
                break;
            }
            let ca = ca.clone();
            handles.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|(entry_id, entry, csr)| {
                        let outcome = match entry {
                            None => Err(Error::PermissionDenied(format!(
                                "entry {entry_id} is not authorized for this agent"
                            ))),
                            Some(e) => csr_public_key(&csr).and_then(|key| {
                                sign_leaf(
                                    &ca,
                                    &e.spiffe_id,
                                    &key,
                                    e.x509_svid_ttl.unwrap_or(default_ttl),
                                    &e.dns_names,
                                    now,
                                )
                            }),
                        };
                        match outcome {
                            Ok(svid) => X509SvidResult {
                                entry_id,
                                svid: Some(svid_to_wire(&svid)),
                                error_code: 0,
                                error_message: String::new(),
                            },
                            Err(e) => {
                                let status = Status::from(e);
                                X509SvidResult {
                                    entry_id,
                                    svid: None,
                                    error_code: status.code() as i32,
                                    error_message: status.message().to_owned(),
                                }
                            }
                        }
                    })
                    .collect::<Vec<_>>()
            }));
        }
        let mut results = Vec::new();
        for h in handles {
            results.extend(h.await.map_err(signing_task_failed)?);
        }
        let signed = results.iter().filter(|r| r.svid.is_some()).count();
        let issued = &crate::metrics::metrics().svids_issued;
        issued.record("x509_workload", true, signed as u64);
        issued.record("x509_workload", false, (results.len() - signed) as u64);
        tracing::debug!(agent = %agent.spiffe_id, requested = results.len(), signed, "signed workload SVIDs");
        Ok(Response::new(BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        req: Request<node::NewJwtsvidRequest>,
    ) -> std::result::Result<Response<node::NewJwtsvidResponse>, Status> {
        let (agent, _) = self.authenticate(&req).await?;
        let r = req.into_inner();
        let entry = self
            .cache
            .authorized_entry(&agent.spiffe_id, &r.entry_id)
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "entry {:?} is not authorized for this agent",
                    r.entry_id.chars().take(64).collect::<String>()
                ))
            })?;
        let issued = self
            .ca
            .issue_jwt_svid(
                crate::jwt_keys::JwtRequest {
                    spiffe_id: entry.spiffe_id.clone(),
                    audiences: r.audience,
                    ttl: entry.jwt_svid_ttl.unwrap_or(self.settings.jwt.default_ttl),
                    issuer: self.settings.jwt.issuer.clone(),
                    include_jti: entry.jwt_svid_include_jti,
                },
                unix_now(),
            )
            .await;
        crate::metrics::metrics()
            .svids_issued
            .record("jwt_workload", issued.is_ok(), 1);
        let issued = issued?;
        tracing::debug!(agent = %agent.spiffe_id, spiffe_id = %issued.spiffe_id, expires_at = issued.expires_at, "signed a JWT-SVID");
        Ok(Response::new(node::NewJwtsvidResponse {
            svid: Some(jwt_to_wire(&issued)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_core::plugin::AttestationSession;
    use carapace_core::{Selector, SelectorSet};

    /// A node attestor for the state machine: it expects `<name>-proof`, optionally
    /// challenges with `<name>-nonce` and expects `<name>-answer`, and records the
    /// context each attestation ran with.
    #[derive(Debug)]
    struct Fake {
        name: &'static str,
        challenge: bool,
        can_reattest: bool,
        /// The selector type it produces (its own name unless a test says otherwise).
        selector_type: &'static str,
        /// Refuses every proof (the node's evidence no longer holds).
        refuse: std::sync::atomic::AtomicBool,
        contexts: std::sync::Mutex<Vec<AttestationContext>>,
    }

    impl Fake {
        fn new(name: &'static str, challenge: bool) -> Arc<Self> {
            Arc::new(Fake {
                name,
                challenge,
                can_reattest: true,
                selector_type: name,
                refuse: false.into(),
                contexts: Default::default(),
            })
        }

        fn done(&self) -> AttestationStep {
            let mut selectors = SelectorSet::new();
            selectors
                .insert(Selector::new(self.selector_type, &format!("id:{}", self.name)).unwrap());
            AttestationStep::Done(AttestationResult {
                agent_path: format!("{}-node", self.name),
                selectors,
                can_reattest: self.can_reattest,
            })
        }
    }

    #[derive(Debug)]
    struct FakeSession(&'static str, AttestationStep);

    #[async_trait::async_trait]
    impl AttestationSession for FakeSession {
        async fn respond(
            self: Box<Self>,
            response: &[u8],
        ) -> std::result::Result<AttestationStep, carapace_core::Error> {
            if response != format!("{}-answer", self.0).as_bytes() {
                return Err(carapace_core::Error::AttestationRejected(format!(
                    "{}: wrong answer",
                    self.0
                )));
            }
            Ok(self.1)
        }
    }

    #[async_trait::async_trait]
    impl NodeAttestor for Fake {
        fn name(&self) -> &str {
            self.name
        }

        async fn begin(
            &self,
            payload: &[u8],
            ctx: &AttestationContext,
        ) -> std::result::Result<AttestationStep, carapace_core::Error> {
            self.contexts.lock().unwrap().push(ctx.clone());
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed)
                || payload != format!("{}-proof", self.name).as_bytes()
            {
                return Err(carapace_core::Error::AttestationRejected(format!(
                    "{}: the principal is unknown",
                    self.name
                )));
            }
            if self.challenge {
                return Ok(AttestationStep::Challenge {
                    challenge: format!("{}-nonce", self.name).into_bytes(),
                    session: Box::new(FakeSession(self.name, self.done())),
                });
            }
            Ok(self.done())
        }
    }

    async fn node_api(attestors: &[Arc<Fake>], lists: &[&[&str]]) -> NodeApi {
        let (ca, ds) = crate::test_support::new_ca("example.org").await;
        let cache = EntryCache::load(ca.trust_domain().clone(), ds)
            .await
            .unwrap();
        NodeApi::new(
            cache,
            ca,
            attestors
                .iter()
                .map(|a| a.clone() as Arc<dyn NodeAttestor>)
                .collect(),
            NodeApiSettings {
                default_x509_svid_ttl: Duration::from_secs(600),
                agent_svid_ttl: Duration::from_secs(600),
                jwt: Default::default(),
            },
        )
        .with_required_together(crate::config::NodeAttestation {
            require_together: lists
                .iter()
                .map(|l| l.iter().map(|m| (*m).to_owned()).collect())
                .collect(),
        })
    }

    /// What the agent's side of a test attestation does with each server step.
    #[derive(Debug, Clone, Copy)]
    struct Agent {
        /// The attestors it configures (it answers for these, as their real clients).
        has: &'static [&'static str],
        /// Answers challenges wrongly.
        wrong_answers: bool,
    }

    fn request(step: attest_request::Step) -> std::result::Result<AttestRequest, Status> {
        Ok(AttestRequest { step: Some(step) })
    }

    /// Runs one attestation opening with `opening`, as `caller` (an agent SVID chain
    /// when renewing). Returns the outcome and the server's steps, in order.
    async fn attest(
        api: &NodeApi,
        agent: Agent,
        opening: &str,
        caller: Option<&[Vec<u8>]>,
    ) -> (Result<AttestResponse>, Vec<String>) {
        let kp = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&kp)
            .unwrap()
            .der()
            .to_vec();
        let (in_tx, in_rx) = mpsc::channel(8);
        let (out_tx, mut out_rx) = mpsc::channel(8);
        in_tx
            .send(request(attest_request::Step::Params(node::AttestParams {
                attestor: opening.to_owned(),
                payload: format!("{opening}-proof").into_bytes(),
                csr,
            })))
            .await
            .unwrap();
        let this = api.clone();
        let peer = crate::test_support::peer(caller);
        let mut run = tokio::spawn(async move {
            let mut inbound = ReceiverStream::new(in_rx);
            let mut name = None;
            this.run_attestation(&mut inbound, &out_tx, Some(peer), &mut name)
                .await
        });
        let mut seen = Vec::new();
        let mut in_tx = Some(in_tx);
        loop {
            tokio::select! {
                outcome = &mut run => return (outcome.unwrap(), seen),
                Some(msg) = out_rx.recv() => {
                    let step = msg.unwrap().step.unwrap();
                    let reply = match step {
                        attest_response::Step::Challenge(c) => {
                            let c = String::from_utf8(c).unwrap();
                            seen.push(format!("challenge {c}"));
                            let who = c.trim_end_matches("-nonce");
                            let answer = if agent.wrong_answers { "nope".to_owned() } else { format!("{who}-answer") };
                            Some(attest_request::Step::ChallengeResponse(answer.into_bytes()))
                        }
                        attest_response::Step::NextAttestor(n) => {
                            seen.push(format!("next {n}"));
                            // An agent without it ends the stream, as the real one does.
                            agent.has.contains(&n.as_str()).then(|| {
                                attest_request::Step::NextPayload(format!("{n}-proof").into_bytes())
                            })
                        }
                        attest_response::Step::Result(_) => unreachable!("returned, not sent"),
                    };
                    match reply {
                        Some(r) => in_tx.as_ref().unwrap().send(request(r)).await.unwrap(),
                        None => in_tx = None,
                    }
                }
            }
        }
    }

    const BOTH: Agent = Agent {
        has: &["tpm", "kerberos"],
        wrong_answers: false,
    };

    #[tokio::test]
    async fn a_composite_runs_every_member_on_one_stream_with_one_context() {
        let tpm = Fake::new("tpm", true);
        let krb = Fake::new("kerberos", true);
        let api = node_api(&[tpm.clone(), krb.clone()], &[&["tpm", "kerberos"]]).await;
        let (outcome, seen) = attest(&api, BOTH, "tpm", None).await;
        let result = match outcome.unwrap().step.unwrap() {
            attest_response::Step::Result(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            seen,
            [
                "challenge tpm-nonce",
                "next kerberos",
                "challenge kerberos-nonce"
            ]
        );
        assert!(result.reattestable);
        // Both members saw the same TLS exporter and agent key.
        let (a, b) = (tpm.contexts.lock().unwrap(), krb.contexts.lock().unwrap());
        assert_eq!(a.len(), 1);
        assert_eq!(*a, *b);
        // The agent ID comes from the first member; the selectors are both members'.
        let id = api.ca.trust_domain().agent_id("tpm", "tpm-node").unwrap();
        let agent = api.cache.get_agent(&id).unwrap();
        assert_eq!(agent.attestor, "tpm+kerberos");
        let mut selectors: Vec<String> = agent
            .selectors
            .iter()
            .map(|s| format!("{}:{}", s.kind(), s.value()))
            .collect();
        selectors.sort();
        assert_eq!(selectors, ["kerberos:id:kerberos", "tpm:id:tpm"]);
    }

    #[tokio::test]
    async fn a_later_member_alone_is_refused_and_an_attestor_outside_lists_runs_alone() {
        let tpm = Fake::new("tpm", false);
        let krb = Fake::new("kerberos", false);
        let ssh = Fake::new("sshpop", true);
        let api = node_api(&[tpm.clone(), krb.clone(), ssh], &[&["tpm", "kerberos"]]).await;
        let (outcome, seen) = attest(&api, BOTH, "kerberos", None).await;
        let status = Status::from(outcome.unwrap_err());
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "node attestor kerberos is required together with tpm, kerberos \
             (node_attestation.require_together): attest with tpm first"
        );
        assert!(seen.is_empty());
        assert!(
            krb.contexts.lock().unwrap().is_empty(),
            "kerberos never ran"
        );

        let (outcome, seen) = attest(&api, BOTH, "sshpop", None).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(seen, ["challenge sshpop-nonce"]);
        let id = api
            .ca
            .trust_domain()
            .agent_id("sshpop", "sshpop-node")
            .unwrap();
        assert_eq!(api.cache.get_agent(&id).unwrap().attestor, "sshpop");
    }

    #[tokio::test]
    async fn a_missing_or_failing_member_refuses_the_node_naming_it() {
        let tpm = Fake::new("tpm", true);
        let krb = Fake::new("kerberos", true);
        let api = node_api(&[tpm.clone(), krb.clone()], &[&["tpm", "kerberos"]]).await;
        let id = api.ca.trust_domain().agent_id("tpm", "tpm-node").unwrap();

        // The agent does not configure kerberos: it ends the stream when asked for it.
        let only_tpm = Agent {
            has: &["tpm"],
            wrong_answers: false,
        };
        let (outcome, seen) = attest(&api, only_tpm, "tpm", None).await;
        let status = Status::from(outcome.unwrap_err());
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "attestation rejected: kerberos (2 of tpm, kerberos): the agent ended the \
             attestation instead of this attestor's payload"
        );
        assert_eq!(seen, ["challenge tpm-nonce", "next kerberos"]);
        assert!(api.cache.get_agent(&id).is_none(), "nothing recorded");

        // The second member refuses the evidence.
        krb.refuse.store(true, std::sync::atomic::Ordering::Relaxed);
        let (outcome, _) = attest(&api, BOTH, "tpm", None).await;
        assert_eq!(
            Status::from(outcome.unwrap_err()).message(),
            "attestation rejected: kerberos (2 of tpm, kerberos): kerberos: the principal is unknown"
        );
        // The first member answers wrongly.
        krb.refuse
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let wrong = Agent {
            has: &["tpm", "kerberos"],
            wrong_answers: true,
        };
        let (outcome, seen) = attest(&api, wrong, "tpm", None).await;
        assert_eq!(
            Status::from(outcome.unwrap_err()).message(),
            "attestation rejected: tpm (1 of tpm, kerberos): tpm: wrong answer"
        );
        assert_eq!(seen, ["challenge tpm-nonce"]);
        assert!(api.cache.get_agent(&id).is_none());
    }

    #[tokio::test]
    async fn reattestation_runs_every_member_again_and_a_failing_one_is_recorded() {
        let tpm = Fake::new("tpm", false);
        let krb = Fake::new("kerberos", false);
        let api = node_api(&[tpm.clone(), krb.clone()], &[&["tpm", "kerberos"]]).await;
        let (outcome, _) = attest(&api, BOTH, "tpm", None).await;
        let Some(attest_response::Step::Result(r)) = outcome.unwrap().step else {
            panic!("no result")
        };
        let chain = r.svid.unwrap().cert_chain;
        // Renewing, with the SVID: both members again.
        let (outcome, seen) = attest(&api, BOTH, "tpm", Some(&chain)).await;
        let Some(attest_response::Step::Result(r)) = outcome.unwrap().step else {
            panic!("no result")
        };
        assert_eq!(seen, ["next kerberos"]);
        assert_eq!(krb.contexts.lock().unwrap().len(), 2);
        // The host principal is gone: the renewal is refused and recorded.
        let chain = r.svid.unwrap().cert_chain;
        krb.refuse.store(true, std::sync::atomic::Ordering::Relaxed);
        let (outcome, _) = attest(&api, BOTH, "tpm", Some(&chain)).await;
        assert!(outcome.is_err());
        let id = api.ca.trust_domain().agent_id("tpm", "tpm-node").unwrap();
        let refused = api.cache.get_agent(&id).unwrap().refused.clone().unwrap();
        assert_eq!(
            refused.reason,
            "attestation rejected: kerberos (2 of tpm, kerberos): kerberos: the principal is unknown"
        );
    }

    #[tokio::test]
    async fn a_member_whose_selectors_are_not_its_own_or_not_reattestable_counts() {
        let tpm = Fake::new("tpm", false);
        let krb = Arc::new(Fake {
            selector_type: "tpm",
            ..Arc::into_inner(Fake::new("kerberos", false)).unwrap()
        });
        let api = node_api(&[tpm.clone(), krb], &[&["tpm", "kerberos"]]).await;
        let (outcome, _) = attest(&api, BOTH, "tpm", None).await;
        assert_eq!(
            Status::from(outcome.unwrap_err()).message(),
            "attestation rejected: kerberos (2 of tpm, kerberos): the attestor produced \
             selector tpm:id:kerberos, not of its own type"
        );
        // One member that cannot attest again makes the whole agent renew by RenewAgent.
        let krb = Arc::new(Fake {
            can_reattest: false,
            ..Arc::into_inner(Fake::new("kerberos", false)).unwrap()
        });
        let api2 = node_api(&[tpm, krb], &[&["tpm", "kerberos"]]).await;
        let (outcome, _) = attest(&api2, BOTH, "tpm", None).await;
        let Some(attest_response::Step::Result(r)) = outcome.unwrap().step else {
            panic!("no result")
        };
        assert!(!r.reattestable);
    }

    #[tokio::test]
    async fn a_failed_signing_task_reaches_the_caller_as_a_generic_internal_error() {
        let died = tokio::task::spawn_blocking(|| -> Vec<X509SvidResult> {
            panic!("detail for the log only: key handle 0x2a")
        })
        .await
        .unwrap_err();
        let status = signing_task_failed(died);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error; see the server log");
    }
}
