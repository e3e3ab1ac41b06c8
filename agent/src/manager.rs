//! The agent's control loop: node attestation (or the identity kept from last time),
//! the sync stream from the server, workload SVID signing and rotation, and the agent's
//! own SVID renewal. The Workload API reads only the [`SvidCache`] this fills, so it
//! keeps serving whatever the agent holds while the server is unreachable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use carapace_core::plugin::{KeyManager, KeySigner};
use carapace_core::{EntryId, KeyType, RegistrationEntry, SpiffeId, TrustBundle};
use carapace_proto::convert::bundle_from_wire;
use carapace_proto::node::{
    BatchNewX509svidRequest, NewX509svidParams, RenewAgentRequest, SyncAuthorizedResponse,
    node_client::NodeClient,
};

use crate::cache::{CachedSvid, SvidCache, same_federated};
use crate::config::{Bootstrap, Config};
use crate::node_client::{self, NodeAttestors, call_error};
use crate::state::{self, AgentState};
use crate::sync::{HeldEntries, HeldFederated};
use crate::{Error, Result};

/// How far the server backdates notBefore (see `carapace_server::ca::BACKDATE`).
const BACKDATE: i64 = 10;
/// Most CSRs sent in one BatchNewX509SVID call.
pub const MAX_BATCH: usize = 2000;
/// Retry delays when the server is unreachable or refuses.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// See [`BACKOFF_MIN`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The longest pause between attempts to attest again after the agent lost its identity
/// (each attempt costs the server an attestation: a lost fleet must not hammer it).
pub const REATTEST_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Exponential backoff, doubling from a minimum to a cap, each delay jittered by ±20% so
/// that agents that lost the server together do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// Back to the minimum (after a success).
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next delay, jittered; doubles the one after, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::rng().random_range(0.8..=1.2))
    }
}

/// When to rotate a certificate valid until `not_after` that the agent holds since
/// `since`: at half of that life, give or take 10% of the half (so a fleet does not rotate
/// in lockstep). `since` is when the agent received it, not the notBefore, which the
/// server backdates by 10 s for clock skew (counting that would rotate short-lived SVIDs
/// almost at once).
pub fn rotate_at(since: i64, not_after: i64) -> i64 {
    let not_before = since;
    let half = ((not_after - not_before) / 2).max(1);
    let jitter = half / 10;
    let j = if jitter > 0 {
        rand::rng().random_range(-jitter..=jitter)
    } else {
        0
    };
    not_before + half + j
}

fn now() -> i64 {
    carapace_core::clock::unix_now()
}

struct Slot {
    svid: Arc<CachedSvid>,
    revision: u64,
    rotate_at: i64,
}

/// Makes workload private keys: a new key of a given type, as PKCS#8 DER. Each key goes
/// to its workload with the SVID, so it is made in memory, never in the agent's key
/// manager. The catalog supplies the implementation
/// ([`crate::catalog::build_workload_keys`]); the manager names no plugin crate.
#[derive(Clone, Copy)]
pub struct WorkloadKeys {
    generate: fn(KeyType) -> std::result::Result<Zeroizing<Vec<u8>>, carapace_core::Error>,
}

impl WorkloadKeys {
    /// Keys made by `generate`.
    pub fn new(
        generate: fn(KeyType) -> std::result::Result<Zeroizing<Vec<u8>>, carapace_core::Error>,
    ) -> Self {
        WorkloadKeys { generate }
    }

    /// A new private key of `key_type`, PKCS#8 DER.
    pub fn generate(&self, key_type: KeyType) -> Result<Zeroizing<Vec<u8>>> {
        Ok((self.generate)(key_type)?)
    }
}

impl std::fmt::Debug for WorkloadKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKeys").finish_non_exhaustive()
    }
}

/// What attestation, or a restore from the data directory, yields: the agent's state,
/// the trust bundle and the agent key.
type Identity = (AgentState, TrustBundle, Arc<dyn KeySigner>);

/// The agent's identity and everything it holds for workloads.
pub struct Manager {
    cfg: Config,
    km: Arc<dyn KeyManager>,
    /// Makes the private keys of workload SVIDs.
    workload_keys: WorkloadKeys,
    cache: SvidCache,
    bundle_tx: watch::Sender<Arc<TrustBundle>>,
    state: AgentState,
    agent_key: Arc<dyn KeySigner>,
    agent_rotate_at: i64,
    /// The authorized entries, kept from the server's sync messages.
    held: HeldEntries,
    /// The foreign bundles the entries federate with, kept from the sync messages.
    federated: HeldFederated,
    slots: BTreeMap<EntryId, Slot>,
    /// The node attestors (one, or the members of a composite in order), kept to renew
    /// by attesting again when the server allows it (TPM: a fresh quote at every
    /// renewal; a composite: every member again), and to attest afresh after losing the
    /// identity.
    attestor: Option<NodeAttestors>,
    /// notAfter of the agent's own SVID.
    agent_not_after: i64,
    /// Why the agent holds no usable identity, when it does not: its SVID lapsed, or the
    /// server refused it (renewal evidence refused, banned, evicted). Nothing is signed
    /// then; workloads keep what they hold until it expires.
    lost: Option<String>,
    /// A refusal the agent retries past with its old SVID (its attestor cannot attest
    /// again): reported, like `lost`, until a sync succeeds, so readiness does not flap
    /// to ready between two refusals.
    retried_refusal: Option<String>,
    /// Where the current node API client is published for the Workload API (JWT-SVIDs).
    server_link: Option<node_client::ServerLinkPublisher>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("agent", &self.agent_id().ok())
            .field("entries", &self.held.entries().len())
            .field("svids", &self.slots.len())
            .finish_non_exhaustive()
    }
}

fn new_key_id() -> String {
    format!("agent-{}-{:08x}", now(), rand::rng().random::<u32>())
}

impl Manager {
    /// Restores the agent's identity from the data directory or attests with the join
    /// token. Retries while the server is unreachable; fails at once when the server
    /// refuses (bad token, banned) or nothing can be attested with. The agent key lives
    /// in `km`; workload keys are made by `workload_keys`.
    pub async fn start(
        cfg: Config,
        km: Arc<dyn KeyManager>,
        workload_keys: WorkloadKeys,
        cache: SvidCache,
        attestor: Option<NodeAttestors>,
    ) -> Result<Self> {
        let stored_bundle = state::load_bundle(&cfg.data_dir, &cfg.trust_domain)?;
        if let (Some(st), Some(bundle)) = (AgentState::load(&cfg.data_dir)?, stored_bundle.clone())
        {
            match Self::restore(&cfg, &km, &st, &bundle).await {
                Ok(key) => {
                    tracing::info!(agent = %Self::id_of(&st)?, "restored the agent identity from the data directory");
                    return Self::assemble(
                        cfg,
                        km,
                        workload_keys,
                        cache,
                        (st, bundle, key),
                        attestor,
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the stored agent identity is unusable; attesting again")
                }
            }
        }
        let attestor = attestor.clone().ok_or_else(|| {
            Error::Config(
                "the agent has no valid SVID and no join token: start it with --join-token TOKEN \
                 (from `carapace-server token generate`)"
                    .into(),
            )
        })?;
        let tls = match (&stored_bundle, &cfg.bootstrap) {
            (Some(b), _) => Self::bundle_tls(&cfg, b.clone())?,
            (None, Bootstrap::BundleFile(_)) => {
                let b = cfg
                    .read_trust_bundle()
                    .map_err(Error::Config)?
                    .ok_or_else(|| Error::Config("no trust bundle configured".into()))?;
                Self::bundle_tls(&cfg, b)?
            }
            (None, Bootstrap::Insecure) => {
                tracing::warn!(
                    "insecure bootstrap: the first server reached is trusted without verification"
                );
                Arc::new(
                    carapace_tls::danger_insecure_bootstrap_config(cfg.trust_domain.server_id())
                        .map_err(|e| Error::Config(format!("TLS: {e}")))?,
                )
            }
        };
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            match Self::attest(&cfg, &km, tls.clone(), &attestor).await {
                Ok(identity) => {
                    return Self::assemble(cfg, km, workload_keys, cache, identity, Some(attestor));
                }
                // A backend the attestor needs is away for now (a KDC, a device): retry.
                Err(Error::Core(carapace_core::Error::Unavailable(reason))) => {
                    let retry_in = backoff.next_delay();
                    tracing::warn!(%reason, ?retry_in, "node attestation could not run; retrying");
                    tokio::time::sleep(retry_in).await;
                }
                Err(e @ (Error::Refused(_) | Error::Config(_) | Error::Core(_))) => return Err(e),
                Err(e) => {
                    let retry_in = backoff.next_delay();
                    tracing::warn!(error = %e, ?retry_in, "node attestation failed; retrying");
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }

    fn assemble(
        cfg: Config,
        km: Arc<dyn KeyManager>,
        workload_keys: WorkloadKeys,
        cache: SvidCache,
        (state, bundle, agent_key): Identity,
        attestor: Option<NodeAttestors>,
    ) -> Result<Self> {
        let (nb, na) = carapace_core::x509svid::validity_of(&state.svid_chain[0])?;
        // Received now (attestation) or earlier (restored): undo the server's backdate.
        let since = (nb + BACKDATE).min(now());
        let bundle = Arc::new(bundle);
        let (bundle_tx, _) = watch::channel(bundle.clone());
        cache.replace(bundle, Vec::new());
        crate::metrics::metrics().agent_svid(na);
        Ok(Manager {
            federated: HeldFederated::new(cfg.trust_domain.clone()),
            cfg,
            km,
            workload_keys,
            cache,
            bundle_tx,
            agent_key,
            agent_rotate_at: rotate_at(since, na),
            state,
            held: HeldEntries::default(),
            slots: BTreeMap::new(),
            attestor,
            agent_not_after: na,
            lost: None,
            retried_refusal: None,
            server_link: None,
        })
    }

    fn id_of(st: &AgentState) -> Result<SpiffeId> {
        Ok(carapace_core::x509svid::check_leaf(&st.svid_chain[0])?)
    }

    /// The agent's SPIFFE ID.
    pub fn agent_id(&self) -> Result<SpiffeId> {
        Self::id_of(&self.state)
    }

    /// Publishes the node API client the manager uses into `link` from now on (`None`
    /// while the agent holds no usable identity), for the Workload API's JWT-SVIDs.
    pub fn with_server_link(mut self, link: node_client::ServerLinkPublisher) -> Self {
        self.server_link = Some(link);
        self
    }

    fn publish_client(&self, client: Option<&NodeClient<Channel>>) {
        if let Some(link) = &self.server_link {
            link.publish(client.cloned());
        }
    }

    /// A receiver of the agent's current trust bundle.
    pub fn bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle_tx.subscribe()
    }

    async fn restore(
        cfg: &Config,
        km: &Arc<dyn KeyManager>,
        st: &AgentState,
        bundle: &TrustBundle,
    ) -> Result<Arc<dyn KeySigner>> {
        let key = km.get_key(&st.key_id).await?;
        let v = carapace_core::x509svid::verify_chain(&st.svid_chain, bundle, now().max(0) as u64)?;
        if !v.spiffe_id.is_agent() || !v.spiffe_id.is_member_of(&cfg.trust_domain) {
            return Err(Error::Config(format!(
                "stored SVID {} is not an agent of {}",
                v.spiffe_id, cfg.trust_domain
            )));
        }
        if carapace_core::x509svid::public_key_of(&st.svid_chain[0])? != key.public_key_der() {
            return Err(Error::Config(
                "stored SVID does not match the agent key".into(),
            ));
        }
        Ok(key)
    }

    /// TLS for first contact: verify the server against `bundle`, no client certificate.
    fn bundle_tls(cfg: &Config, bundle: TrustBundle) -> Result<Arc<rustls::ClientConfig>> {
        let (_tx, rx) = watch::channel(Arc::new(bundle));
        Ok(Arc::new(
            carapace_tls::client_config(rx, cfg.trust_domain.server_id(), None)
                .map_err(|e| Error::Config(format!("TLS: {e}")))?,
        ))
    }

    async fn attest(
        cfg: &Config,
        km: &Arc<dyn KeyManager>,
        tls: Arc<rustls::ClientConfig>,
        attestor: &NodeAttestors,
    ) -> Result<Identity> {
        let key = km.generate_key(&new_key_id(), KeyType::EcP256).await?;
        let outcome = async {
            let csr = carapace_tls::csr_for_key(key.clone())?;
            let result = node_client::attest_with(
                &cfg.server_address,
                tls,
                attestor,
                csr,
                key.public_key_der(),
            )
            .await?;
            let chain = result.svid.map(|s| s.cert_chain).unwrap_or_default();
            let bundle = bundle_from_wire(
                result.bundle.as_ref().ok_or_else(|| Error::Server("attestation result without a bundle".into()))?,
            )?;
            if bundle.trust_domain() != &cfg.trust_domain {
                return Err(Error::Refused(format!(
                    "the server is in trust domain {}, not {}",
                    bundle.trust_domain(),
                    cfg.trust_domain
                )));
            }
            let v = carapace_core::x509svid::verify_chain(&chain, &bundle, now().max(0) as u64)?;
            if carapace_core::x509svid::public_key_of(&chain[0])? != key.public_key_der() {
                return Err(Error::Server("the server certified another key".into()));
            }
            tracing::info!(agent = %v.spiffe_id, expires_at = v.not_after, "node attestation succeeded");
            let st = AgentState { key_id: key.id().to_owned(), svid_chain: chain, reattestable: result.reattestable };
            state::save_bundle(&cfg.data_dir, &bundle)?;
            st.save(&cfg.data_dir)?;
            Ok((st, bundle))
        }
        .await;
        crate::metrics::metrics().node_attestations.record(
            &attestor.joined_names(),
            match &outcome {
                Ok(_) => "ok",
                Err(Error::Refused(_)) => "refused",
                Err(_) => "error",
            },
        );
        if outcome.is_ok() {
            crate::metrics::metrics().rotated("agent");
        }
        match outcome {
            Ok((st, bundle)) => {
                Self::delete_other_agent_keys(km, key.id()).await;
                Ok((st, bundle, key))
            }
            Err(e) => {
                let _ = km.delete_key(key.id()).await;
                Err(e)
            }
        }
    }

    async fn delete_other_agent_keys(km: &Arc<dyn KeyManager>, keep: &str) {
        if let Ok(keys) = km.list_keys().await {
            for k in keys
                .into_iter()
                .filter(|k| k.id.starts_with("agent-") && k.id != keep)
            {
                let _ = km.delete_key(&k.id).await;
            }
        }
    }

    /// mTLS with the agent SVID, verifying the server against the current bundle.
    fn client_tls(&self) -> Result<Arc<rustls::ClientConfig>> {
        let ck = carapace_tls::certified_key(&self.state.svid_chain, self.agent_key.clone());
        let tls = carapace_tls::client_config(
            self.bundle_tx.subscribe(),
            self.cfg.trust_domain.server_id(),
            Some(ck),
        )
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        Ok(Arc::new(tls))
    }

    fn client(&self) -> Result<NodeClient<Channel>> {
        node_client::channel(&self.cfg.server_address, self.client_tls()?)
    }

    /// Runs until `shutdown` changes: keeps the sync stream open (reconnecting with
    /// backoff), signs and rotates workload SVIDs, renews the agent SVID, drops workload
    /// SVIDs as they expire, and attests afresh when the agent lost its identity.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut reattest_backoff = Backoff::new(BACKOFF_MIN, REATTEST_BACKOFF_MAX);
        let mut ticker = tokio::time::interval(self.cfg.rotation_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            self.drop_expired();
            self.check_own_svid();
            if self.lost.is_some() {
                self.publish_client(None);
                if self.recover().await {
                    reattest_backoff.reset();
                    backoff.reset();
                    continue;
                }
                if self
                    .pause(reattest_backoff.next_delay(), &mut shutdown)
                    .await
                {
                    return Ok(());
                }
                continue;
            }
            let mut client = self.client()?;
            self.publish_client(Some(&client));
            // Resumes from the entries held when they are known, else asks for them all.
            let request = self.held.resume_request();
            let resumed = request.resume;
            let mut stream = match client.sync_authorized(request).await {
                Ok(s) => s.into_inner(),
                Err(s) => {
                    let retry_in = backoff.next_delay();
                    self.sync_failed(&s, retry_in);
                    if self.pause(retry_in, &mut shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            tracing::info!(server = %self.cfg.server_address, resumed, "connected to the server");
            let mut renewed = false;
            let mut first = true;
            loop {
                tokio::select! {
                    msg = stream.message() => match msg {
                        Ok(Some(m)) => {
                            backoff.reset();
                            let consistent = self.apply_sync(&m, first, resumed)?;
                            first = false;
                            if !consistent {
                                // Dropped: the next stream asks for the full state.
                                break;
                            }
                            self.reconcile(&mut client).await;
                        }
                        Ok(None) => {
                            tracing::warn!("the server closed the sync stream; reconnecting");
                            break;
                        }
                        Err(s) => {
                            self.sync_failed(&s, Duration::ZERO);
                            break;
                        }
                    },
                    _ = ticker.tick() => {
                        self.drop_expired();
                        self.check_own_svid();
                        if self.lost.is_none() && now() >= self.agent_rotate_at {
                            match self.renew_agent(&mut client).await {
                                Ok(()) => {
                                    renewed = true;
                                    break; // reconnect with the new SVID
                                }
                                Err(Error::Refused(reason)) => {
                                    tracing::error!(%reason, "the server refused to renew the agent SVID: the agent has lost its identity and attests afresh");
                                    self.lost = Some(format!("renewal refused: {reason}"));
                                }
                                Err(e) => tracing::warn!(error = %e, "agent SVID renewal failed; retrying"),
                            }
                        }
                        if self.lost.is_some() {
                            break;
                        }
                        self.reconcile(&mut client).await;
                    }
                    _ = shutdown.changed() => return Ok(()),
                }
                if self.lost.is_some() {
                    break;
                }
            }
            if renewed || self.lost.is_some() {
                continue;
            }
            if self.pause(backoff.next_delay(), &mut shutdown).await {
                return Ok(());
            }
        }
    }

    /// Waits `d`, dropping workload SVIDs as they expire; `true` if shutdown came first.
    async fn pause(&mut self, d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            self.drop_expired();
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(self.cfg.rotation_interval)) => {}
                _ = shutdown.changed() => return true,
            }
        }
    }

    /// Marks the identity lost once the agent's own SVID has lapsed.
    fn check_own_svid(&mut self) {
        if self.lost.is_none() && now() >= self.agent_not_after {
            tracing::error!(
                expired_at = self.agent_not_after,
                "the agent SVID has expired: nothing new is signed for workloads until the agent attests afresh"
            );
            self.lost = Some(format!(
                "the agent SVID expired at unix time {}",
                self.agent_not_after
            ));
        }
        self.publish_lost();
    }

    /// Publishes why the agent has no usable identity (for readiness), if it has none.
    fn publish_lost(&self) {
        let why = self.lost.as_deref().or(self.retried_refusal.as_deref());
        crate::metrics::metrics().set_lost(why);
    }

    /// Workloads keep an SVID until it expires, never after: drops expired ones and
    /// publishes when any went.
    fn drop_expired(&mut self) {
        let t = now();
        let before = self.slots.len();
        self.slots.retain(|_, s| s.svid.expires_at > t);
        let expired = before - self.slots.len();
        if expired > 0 {
            tracing::warn!(
                expired,
                held = self.slots.len(),
                "workload SVIDs expired before they could be renewed"
            );
            self.publish();
        }
    }

    /// Tries to get an identity back after losing it: attests afresh, as at first start,
    /// with new evidence and a new key and without presenting the old SVID. An attestor
    /// whose evidence cannot be presented again (a spent join token) cannot do that: then
    /// the sync stream is tried again while the old SVID is valid (an unbanned agent
    /// recovers), and the operator is told what to do. `true` when the agent has an
    /// identity again.
    async fn recover(&mut self) -> bool {
        let why = self.lost.clone().unwrap_or_default();
        let attestor = match (&self.attestor, self.state.reattestable) {
            (Some(a), true) => a.clone(),
            _ => {
                if now() < self.agent_not_after {
                    self.retried_refusal = self.lost.take();
                } else {
                    tracing::error!(
                        reason = why,
                        "the agent has no valid SVID and its node attestor cannot attest again: \
                         give it a new join token (restart it with --join-token TOKEN from \
                         `carapace-server token generate`)"
                    );
                }
                return false;
            }
        };
        tracing::warn!(
            reason = why,
            "the agent lost its identity; attesting afresh"
        );
        let bundle = self.bundle_tx.borrow().as_ref().clone();
        let outcome = match Self::bundle_tls(&self.cfg, bundle) {
            Ok(tls) => Self::attest(&self.cfg, &self.km, tls, &attestor).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok((st, bundle, key)) => {
                let (_, na) = match carapace_core::x509svid::validity_of(&st.svid_chain[0]) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(error = %e, "the server returned an unusable agent SVID");
                        return false;
                    }
                };
                self.state = st;
                self.agent_key = key;
                self.agent_not_after = na;
                self.agent_rotate_at = rotate_at(now(), na);
                crate::metrics::metrics().agent_svid(na);
                if self.bundle_tx.borrow().as_ref() != &bundle {
                    self.bundle_tx.send_replace(Arc::new(bundle));
                }
                self.lost = None;
                tracing::info!(
                    expires_at = na,
                    "attested afresh: the agent has an identity again"
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "attesting afresh failed; workloads keep what they hold until it expires");
                false
            }
        }
    }

    /// A failed or ended sync call: a refusal means the agent lost its identity.
    fn sync_failed(&mut self, s: &tonic::Status, retry_in: Duration) {
        if node_client::is_refusal(s) {
            tracing::error!(
                error = s.message(),
                "the server refused this agent (banned, evicted, its SVID expired or its re-attestation refused); still serving the SVIDs held until they expire"
            );
            self.lost = Some(format!("the server refused the agent: {}", s.message()));
            self.publish_lost();
        } else {
            tracing::warn!(
                error = s.message(),
                ?retry_in,
                "server unreachable; still serving the SVIDs held"
            );
        }
    }

    /// Applies one sync message; `false` when it does not fit the entries held (the
    /// stream must be dropped and the full state asked for).
    fn apply_sync(
        &mut self,
        m: &SyncAuthorizedResponse,
        first: bool,
        resumed: bool,
    ) -> Result<bool> {
        crate::metrics::metrics().synced();
        if self.retried_refusal.take().is_some() {
            tracing::info!("the server serves this agent again");
            self.publish_lost();
        }
        if let Some(b) = m.bundle.as_ref() {
            match bundle_from_wire(b) {
                Ok(bundle) if bundle.trust_domain() == &self.cfg.trust_domain => {
                    if self.bundle_tx.borrow().as_ref() != &bundle {
                        state::save_bundle(&self.cfg.data_dir, &bundle)?;
                        tracing::info!(
                            sequence = bundle.sequence,
                            authorities = bundle.x509_authorities.len(),
                            "trust bundle updated"
                        );
                        self.rotate_tainted(&bundle);
                        self.bundle_tx.send_replace(Arc::new(bundle));
                    }
                }
                Ok(other) => {
                    tracing::error!(trust_domain = %other.trust_domain(), "ignoring a bundle of another trust domain")
                }
                Err(e) => {
                    tracing::error!(error = %e, "ignoring a malformed bundle from the server")
                }
            }
        }
        // The federated bundles first: a message whose diff does not fit is dropped
        // whole (its entries too: the held entries stay known, the next stream resumes).
        match self.federated.apply(m, first) {
            Ok(true) => tracing::info!(
                trust_domains = self.federated.bundles().len(),
                "federated bundles updated"
            ),
            Ok(false) => {}
            Err(why) => {
                tracing::warn!(
                    revision = m.revision,
                    error = why,
                    "an inconsistent sync message from the server; reconnecting for the full set"
                );
                return Ok(false);
            }
        }
        match self.held.apply(m, first, resumed) {
            Ok(applied) => {
                tracing::debug!(
                    revision = m.revision,
                    full = m.full,
                    upserted = applied.upserted,
                    removed = applied.removed,
                    entries = self.held.entries().len(),
                    "synced authorized entries"
                );
                Ok(true)
            }
            Err(why) => {
                tracing::warn!(
                    revision = m.revision,
                    error = why,
                    "an inconsistent sync message from the server; asking for the full state"
                );
                Ok(false)
            }
        }
    }

    /// Makes every SVID chained to an authority the server tainted (an operator suspects
    /// its key) due at once: workload SVIDs are re-signed by the reconcile that follows
    /// this sync message, the agent's own SVID on the next tick through its usual renewal.
    fn rotate_tainted(&mut self, bundle: &TrustBundle) {
        if bundle.tainted_x509_authorities.is_empty() {
            return;
        }
        let t = now();
        let mut tainted = TrustBundle::new(bundle.trust_domain().clone());
        tainted.x509_authorities = bundle.tainted_x509_authorities.clone();
        let chained = |chain: &[Vec<u8>]| {
            carapace_core::x509svid::verify_chain(chain, &tainted, t.max(0) as u64).is_ok()
        };
        let mut workloads = 0;
        for slot in self.slots.values_mut() {
            if chained(&slot.svid.cert_chain) {
                slot.rotate_at = i64::MIN;
                workloads += 1;
            }
        }
        let own = chained(&self.state.svid_chain);
        if own {
            self.agent_rotate_at = self.agent_rotate_at.min(t);
        }
        if workloads > 0 || own {
            tracing::warn!(
                workloads,
                agent_svid = own,
                "SVIDs chained to a tainted X.509 authority: re-issuing them now"
            );
        }
    }

    /// Signs what is missing or due, drops what is no longer authorized, publishes.
    async fn reconcile(&mut self, client: &mut NodeClient<Channel>) {
        let t = now();
        let before = self.slots.len();
        self.slots
            .retain(|id, _| self.held.entries().contains_key(id));
        let removed = before - self.slots.len();
        // Entitlements follow the entry at once, not at the re-signing its new revision
        // brings (which may wait for the server): a workload whose entry stops federating
        // with a trust domain stops getting its bundle now.
        let mut refederated = 0;
        for (id, slot) in self.slots.iter_mut() {
            let Some(entry) = self.held.entries().get(id) else {
                continue;
            };
            if entry.federates_with != slot.svid.federates_with {
                let mut svid = (*slot.svid).clone();
                svid.federates_with = entry.federates_with.clone();
                slot.svid = Arc::new(svid);
                refederated += 1;
            }
        }
        let due: Vec<RegistrationEntry> = self
            .held
            .entries()
            .values()
            .filter(|e| match self.slots.get(&e.id) {
                None => true,
                Some(s) => s.revision != e.revision || t >= s.rotate_at || t >= s.svid.expires_at,
            })
            .cloned()
            .collect();
        let mut signed = 0;
        for chunk in due.chunks(MAX_BATCH) {
            if self.lost.is_some() {
                break;
            }
            let outcome = self.sign_batch(client, chunk).await;
            let ok = outcome.as_ref().map_or(0, |n| *n);
            let received = &crate::metrics::metrics().svids_received;
            received.record("workload", true, ok as u64);
            received.record("workload", false, chunk.len().saturating_sub(ok) as u64);
            match outcome {
                Ok(n) => signed += n,
                Err(Error::Refused(reason)) => {
                    tracing::error!(%reason, "the server refused to sign for this agent: it has lost its identity");
                    self.lost = Some(format!("signing refused: {reason}"));
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, pending = due.len(), "signing workload SVIDs failed; retrying shortly");
                    break;
                }
            }
        }
        if removed > 0
            || signed > 0
            || refederated > 0
            || self.cache.current().bundle.as_ref() != self.bundle_tx.borrow().as_ref()
            || !same_federated(&self.cache.current().federated, self.federated.bundles())
        {
            if signed > 0 {
                crate::metrics::metrics().rotated("workload");
            }
            if removed > 0 || signed > 0 {
                tracing::info!(
                    signed,
                    removed,
                    held = self.slots.len(),
                    "workload SVIDs updated"
                );
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let svids = self.slots.values().map(|s| s.svid.clone()).collect();
        self.cache.replace_all(
            self.bundle_tx.borrow().clone(),
            self.federated.bundles().clone(),
            svids,
        );
    }

    async fn sign_batch(
        &mut self,
        client: &mut NodeClient<Channel>,
        entries: &[RegistrationEntry],
    ) -> Result<usize> {
        let key_type = self.cfg.workload_key_type;
        let workload_keys = self.workload_keys;
        let ids: Vec<EntryId> = entries.iter().map(|e| e.id.clone()).collect();
        let keys = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|id| workload_key_and_csr(workload_keys, key_type).map(|(k, c)| (id, k, c)))
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| Error::Crypto(format!("key generation task failed: {e}")))??;
        let params = keys
            .iter()
            .map(|(id, _, csr)| NewX509svidParams {
                entry_id: id.to_string(),
                csr: csr.clone(),
            })
            .collect();
        let resp = client
            .batch_new_x509svid(BatchNewX509svidRequest { params })
            .await
            .map_err(|s| call_error("signing workload SVIDs", s))?
            .into_inner();
        let mut signed = 0;
        // Each key is moved into the cache, never copied.
        let mut by_id: BTreeMap<String, Zeroizing<Vec<u8>>> = keys
            .into_iter()
            .map(|(id, key, _)| (id.to_string(), key))
            .collect();
        for r in resp.results {
            let Some(entry) = EntryId::new(&r.entry_id)
                .ok()
                .and_then(|id| self.held.entries().get(&id).cloned())
            else {
                continue;
            };
            let Some(svid) = r.svid else {
                tracing::warn!(
                    entry = r.entry_id,
                    code = r.error_code,
                    error = r.error_message,
                    "the server did not sign an SVID"
                );
                continue;
            };
            let Some(key) = by_id.remove(&r.entry_id) else {
                continue;
            };
            match self.check_issued(&entry, &svid.cert_chain) {
                Ok((_, na)) => {
                    self.slots.insert(
                        entry.id.clone(),
                        Slot {
                            svid: Arc::new(CachedSvid {
                                entry_id: entry.id.clone(),
                                spiffe_id: entry.spiffe_id.clone(),
                                selectors: entry.selectors.clone(),
                                hint: entry.hint.clone(),
                                federates_with: entry.federates_with.clone(),
                                cert_chain: svid.cert_chain,
                                private_key_pkcs8: key,
                                expires_at: na,
                            }),
                            revision: entry.revision,
                            rotate_at: rotate_at(now(), na),
                        },
                    );
                    signed += 1;
                }
                Err(e) => {
                    tracing::error!(entry = r.entry_id, error = %e, "the server returned an unusable SVID")
                }
            }
        }
        Ok(signed)
    }

    /// The issued chain must verify against the bundle and carry the entry's SPIFFE ID.
    fn check_issued(&self, entry: &RegistrationEntry, chain: &[Vec<u8>]) -> Result<(i64, i64)> {
        let bundle = self.bundle_tx.borrow().clone();
        let v = carapace_core::x509svid::verify_chain(chain, &bundle, now().max(0) as u64)?;
        if v.spiffe_id != entry.spiffe_id {
            return Err(Error::Server(format!(
                "SVID for {} carries {}",
                entry.spiffe_id, v.spiffe_id
            )));
        }
        Ok(carapace_core::x509svid::validity_of(&chain[0])?)
    }

    async fn renew_agent(&mut self, client: &mut NodeClient<Channel>) -> Result<()> {
        let key = self.km.generate_key(&new_key_id(), KeyType::EcP256).await?;
        let result = async {
            let csr = carapace_tls::csr_for_key(key.clone())?;
            let chain = match (&self.attestor, self.state.reattestable) {
                // Evidence that can be presented again (a TPM quote) renews by attesting
                // again: a node whose evidence changed (PCRs) loses its identity here.
                // It runs on a connection of its own: the evidence is bound to it.
                (Some(attestor), true) => {
                    let result = node_client::attest_with(
                        &self.cfg.server_address,
                        self.client_tls()?,
                        attestor,
                        csr,
                        key.public_key_der(),
                    )
                    .await?;
                    result.svid.map(|s| s.cert_chain).unwrap_or_default()
                }
                _ => {
                    let resp = client
                        .renew_agent(RenewAgentRequest { csr })
                        .await
                        .map_err(|s| call_error("renewing the agent SVID", s))?
                        .into_inner();
                    resp.svid.map(|s| s.cert_chain).unwrap_or_default()
                }
            };
            let bundle = self.bundle_tx.borrow().clone();
            let v = carapace_core::x509svid::verify_chain(&chain, &bundle, now().max(0) as u64)?;
            if v.spiffe_id != self.agent_id()? {
                return Err(Error::Server(format!(
                    "renewal returned an SVID for {}",
                    v.spiffe_id
                )));
            }
            Ok(chain)
        }
        .await;
        crate::metrics::metrics()
            .svids_received
            .record("agent", result.is_ok(), 1);
        let chain = match result {
            Ok(c) => c,
            Err(e) => {
                let _ = self.km.delete_key(key.id()).await;
                return Err(e);
            }
        };
        let old_key = self.state.key_id.clone();
        self.state = AgentState {
            key_id: key.id().to_owned(),
            svid_chain: chain,
            reattestable: self.state.reattestable,
        };
        self.state.save(&self.cfg.data_dir)?;
        self.agent_key = key;
        let (_, na) = carapace_core::x509svid::validity_of(&self.state.svid_chain[0])?;
        self.agent_rotate_at = rotate_at(now(), na);
        self.agent_not_after = na;
        crate::metrics::metrics().agent_svid(na);
        crate::metrics::metrics().rotated("agent");
        if let Err(e) = self.km.delete_key(&old_key).await {
            tracing::warn!(key = old_key, error = %e, "could not delete the previous agent key");
        }
        tracing::info!(expires_at = na, "renewed the agent SVID");
        Ok(())
    }
}

/// A new workload private key (PKCS#8 DER, from `keys`) and a CSR signed by it.
fn workload_key_and_csr(
    keys: WorkloadKeys,
    key_type: KeyType,
) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
    let pkcs8 = keys.generate(key_type)?;
    let alg: &'static rcgen::SignatureAlgorithm = match key_type {
        KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
    };
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_slice());
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, alg)
        .map_err(|e| Error::Crypto(format!("workload key: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&kp)
        .map_err(|e| Error::Crypto(format!("workload CSR: {e}")))?;
    Ok((pkcs8, csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_at_half_life_with_ten_percent_jitter() {
        for _ in 0..1000 {
            let r = rotate_at(1000, 4600); // 1h life, half = 1800, jitter 180
            assert!((1000 + 1800 - 180..=1000 + 1800 + 180).contains(&r), "{r}");
        }
        // A 30 s SVID rotates between 13.5 and 16.5 s.
        let r = rotate_at(0, 30);
        assert!((14..=16).contains(&r), "{r}");
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let bases = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0];
        for base in bases {
            let d = b.next_delay().as_secs_f64();
            assert!((base * 0.8..=base * 1.2).contains(&d), "{d} for {base}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(600));
        // The jitter spreads a fleet: not every delay is the same.
        let spread: std::collections::BTreeSet<u128> = (0..50)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
                b.next_delay().as_millis()
            })
            .collect();
        assert!(spread.len() > 10, "{spread:?}");
    }

    #[test]
    fn workload_keys_and_csrs_for_every_key_type() {
        for kt in [KeyType::EcP256, KeyType::EcP384] {
            let (key, csr) =
                workload_key_and_csr(crate::catalog::build_workload_keys(), kt).unwrap();
            assert!(!key.is_empty());
            use x509_parser::prelude::FromDer;
            let (_, req) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&csr)
                    .unwrap();
            req.verify_signature().unwrap();
        }
    }

    // ------------------------------------------------------------ federated bundles

    use carapace_core::TrustDomain;
    use carapace_proto::types;

    fn ca(cn: &str) -> Vec<u8> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.self_signed(&kp).unwrap().der().to_vec()
    }

    fn wire_bundle(td: &str, ca: &[u8]) -> types::Bundle {
        types::Bundle {
            trust_domain: td.into(),
            x509_authorities: vec![ca.to_vec()],
            ..Default::default()
        }
    }

    fn wire_entry(revision: u64, federates_with: &[&str]) -> types::Entry {
        types::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://example.org/w1".into(),
            parent_id: "spiffe://example.org/spire/agent/join_token/x".into(),
            selectors: vec![types::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            }],
            revision,
            federates_with: federates_with.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// A manager holding an identity (no server: signing fails, as when the server is
    /// unreachable), publishing into the returned cache.
    async fn manager(dir: &std::path::Path) -> (Manager, SvidCache) {
        let cfg = crate::config::validate(
            crate::config::FileConfig::default(),
            crate::config::Overrides {
                insecure_bootstrap: true,
                data_dir: Some(dir.to_path_buf()),
                ..Default::default()
            },
        )
        .unwrap();
        let km: Arc<dyn KeyManager> = Arc::new(carapace_keymanager_soft::MemoryKeyManager::new());
        let key = km
            .generate_key("agent-test", KeyType::EcP256)
            .await
            .unwrap();
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let svid = p.self_signed(&kp).unwrap().der().to_vec();
        let state = AgentState {
            key_id: "agent-test".into(),
            svid_chain: vec![svid],
            reattestable: false,
        };
        let bundle = TrustBundle::new(cfg.trust_domain.clone());
        let cache = SvidCache::new(Arc::new(bundle.clone()));
        let m = Manager::assemble(
            cfg,
            km,
            crate::catalog::build_workload_keys(),
            cache.clone(),
            (state, bundle, key),
            None,
        )
        .unwrap();
        (m, cache)
    }

    fn federated_tds(cache: &SvidCache) -> Vec<String> {
        cache
            .current()
            .federated
            .keys()
            .map(|td| td.name().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn sync_messages_publish_federated_bundles_and_entitlements_to_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, cache) = manager(dir.path()).await;
        // Nobody listens: signing fails at once, the rest of the reconcile runs.
        let mut client = NodeClient::new(
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        );
        let (a, a2, b, c) = (ca("a"), ca("a2"), ca("b"), ca("c"));

        // A stream's first message: entries and the full set.
        let first = SyncAuthorizedResponse {
            full: true,
            entries: vec![wire_entry(1, &["a.org"])],
            federated_full: true,
            federated_bundles: vec![wire_bundle("a.org", &a), wire_bundle("b.org", &b)],
            ..Default::default()
        };
        assert!(m.apply_sync(&first, true, false).unwrap());
        m.reconcile(&mut client).await;
        assert_eq!(federated_tds(&cache), ["a.org", "b.org"]);

        // A diff: a.org changes, b.org goes.
        let diff = SyncAuthorizedResponse {
            federated_bundles: vec![wire_bundle("a.org", &a2)],
            removed_federated_bundles: vec!["b.org".into()],
            ..Default::default()
        };
        assert!(m.apply_sync(&diff, false, false).unwrap());
        m.reconcile(&mut client).await;
        assert_eq!(federated_tds(&cache), ["a.org"]);
        let td = TrustDomain::new("a.org").unwrap();
        assert_eq!(
            cache.current().federated[&td].x509_authorities,
            vec![a2.clone()]
        );

        // A new stream opening with a diff: refused, nothing published.
        let bad = SyncAuthorizedResponse {
            full: true,
            entries: vec![wire_entry(1, &["a.org"])],
            federated_bundles: vec![wire_bundle("c.org", &c)],
            ..Default::default()
        };
        assert!(!m.apply_sync(&bad, true, false).unwrap());
        m.reconcile(&mut client).await;
        assert_eq!(federated_tds(&cache), ["a.org"]);

        // The workload's SVID (as if signed) federates with a.org: it is entitled.
        let entry = m.held.entries()[&EntryId::new("e1").unwrap()].clone();
        m.slots.insert(
            entry.id.clone(),
            Slot {
                svid: Arc::new(CachedSvid {
                    entry_id: entry.id.clone(),
                    spiffe_id: entry.spiffe_id.clone(),
                    selectors: entry.selectors.clone(),
                    hint: String::new(),
                    federates_with: entry.federates_with.clone(),
                    cert_chain: vec![vec![1]],
                    private_key_pkcs8: Zeroizing::new(vec![2]),
                    expires_at: now() + 3600,
                }),
                revision: entry.revision,
                rotate_at: now() + 1800,
            },
        );
        m.publish();
        let st = cache.current();
        assert_eq!(st.entitled(&st.svids).len(), 1);

        // The entry stops federating (a new revision the server cannot sign for now):
        // the workload loses the bundle at once, though its SVID was not re-signed.
        let next = SyncAuthorizedResponse {
            full: true,
            entries: vec![wire_entry(2, &[])],
            federated_full: true,
            federated_bundles: vec![wire_bundle("a.org", &a2)],
            ..Default::default()
        };
        assert!(m.apply_sync(&next, true, false).unwrap());
        m.reconcile(&mut client).await;
        let st = cache.current();
        assert_eq!(st.svids.len(), 1);
        assert_eq!(st.svids[0].cert_chain, [vec![1]], "not re-signed");
        assert!(st.svids[0].federates_with.is_empty());
        assert!(st.entitled(&st.svids).is_empty());
        assert_eq!(federated_tds(&cache), ["a.org"], "still held by the agent");
    }
}
