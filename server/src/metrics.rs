//! The server's Prometheus metrics, served on `/metrics` by the health endpoint
//! ([`carapace_common::health`]). Every name starts with `carapace_server_`.
//!
//! The metrics are process-wide, as the tracing subscriber is: the code that counts an
//! event ([`metrics`]) need not be handed a registry. Gauges computed from state (entry
//! and agent counts, CA expiry times) are refreshed just before each scrape
//! ([`refresh`]). No label carries a SPIFFE ID, an entry ID, a key id or an address.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use carapace_common::metrics::{
    AttestationCounter, ConnectionFamilies, SignLatency, SvidCounter, register_gauge,
};

use crate::ca::{AuthorityStatus, CaManager};
use crate::entry_cache::EntryCache;

/// `{slot}` of a CA.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    /// `active`, `prepared`, or `old` (retired, still in the bundle).
    pub slot: &'static str,
    /// The CA's position among the CAs of its slot, soonest to expire first (`0` for
    /// the active and the prepared CA): bounded by the handful of CAs in the bundle.
    pub index: u32,
}

/// `{trust_domain}` of a federation relationship (a trust domain's name, bounded by the
/// relationships an operator made).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FederationLabels {
    /// The foreign trust domain's name.
    pub trust_domain: String,
}

/// `{trust_domain, result}` of a bundle refresh.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// The foreign trust domain's name.
    pub trust_domain: String,
    /// `ok` (stored, or unchanged) or `error` (the last good bundle stayed).
    pub result: &'static str,
}

/// Every metric of the server.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    /// `svids_issued_total{kind, result}`; kinds: `x509_workload` (for an agent's
    /// workloads), `x509_agent` (attestation and renewal), `x509_server` (the server's
    /// own), `x509_minted` (`x509 mint`), `jwt_workload` (`NewJWTSVID`), `jwt_minted`
    /// (`jwt mint`).
    pub svids_issued: SvidCounter,
    /// `node_attestations_total{attestor, result}`.
    pub node_attestations: AttestationCounter,
    /// `key_manager_sign_duration_seconds{backend}`.
    pub sign_latency: SignLatency,
    /// `connections_open{listener}`, `connections_refused_total{listener}`.
    pub connections: ConnectionFamilies,
    entries: Gauge,
    agents: Gauge,
    ca_expiry: Family<CaLabels, Gauge>,
    ca_last_rotation: Gauge,
    federation_last_success: Family<FederationLabels, Gauge>,
    federation_last_error: Family<FederationLabels, Gauge>,
    federation_sequence: Family<FederationLabels, Gauge>,
    federation_refreshes: Family<RefreshLabels, Counter>,
    downstream_cas_signed: Counter,
}

static METRICS: LazyLock<ServerMetrics> = LazyLock::new(ServerMetrics::new);

/// The server's metrics.
pub fn metrics() -> &'static ServerMetrics {
    &METRICS
}

impl ServerMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("carapace_server");
        let svids_issued = SvidCounter::register(
            &mut registry,
            "svids_issued",
            "X509-SVIDs signed, by kind and result",
        );
        let node_attestations = AttestationCounter::register(
            &mut registry,
            "Node attestations, by attestor and result (ok, refused: the evidence was not accepted, error)",
        );
        let sign_latency = SignLatency::register(&mut registry);
        let connections = ConnectionFamilies::register(&mut registry);
        let entries = register_gauge(&mut registry, "entries", "Registration entries");
        let agents = register_gauge(&mut registry, "agents", "Attested agents");
        let ca_expiry = Family::default();
        registry.register(
            "x509_ca_expiry_timestamp_seconds",
            "When each X.509 CA in the bundle expires (notAfter, unix seconds), by slot",
            Clone::clone(&ca_expiry),
        );
        let ca_last_rotation = register_gauge(
            &mut registry,
            "x509_ca_last_rotation_timestamp_seconds",
            "When the active X.509 CA took over (unix seconds): its activation seen by this process, else its notBefore",
        );
        let federation_last_success = Family::default();
        registry.register(
            "federation_last_success_timestamp_seconds",
            "When each federation relationship's bundle was last fetched and accepted (unix seconds; 0: never)",
            Clone::clone(&federation_last_success),
        );
        let federation_last_error = Family::default();
        registry.register(
            "federation_last_error_timestamp_seconds",
            "When fetching each federation relationship's bundle last failed (unix seconds; 0: never)",
            Clone::clone(&federation_last_error),
        );
        let federation_sequence = Family::default();
        registry.register(
            "federation_bundle_sequence",
            "The spiffe_sequence of each foreign trust domain's stored bundle (absent: none stored)",
            Clone::clone(&federation_sequence),
        );
        let federation_refreshes = Family::default();
        registry.register(
            "federation_refreshes",
            "Bundle fetches by this server, by trust domain and result (ok, error: the last good bundle stayed)",
            Clone::clone(&federation_refreshes),
        );
        let downstream_cas_signed = Counter::default();
        registry.register(
            "downstream_cas_signed",
            "Intermediate CAs signed for downstream servers (nested servers)",
            downstream_cas_signed.clone(),
        );
        ServerMetrics {
            registry,
            downstream_cas_signed,
            federation_last_success,
            federation_last_error,
            federation_sequence,
            federation_refreshes,
            svids_issued,
            node_attestations,
            sign_latency,
            connections,
            entries,
            agents,
            ca_expiry,
            ca_last_rotation,
        }
    }

    /// The registry `/metrics` encodes.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts one bundle refresh of `td` by this server.
    pub fn federation_refreshed(&self, td: &carapace_core::TrustDomain, result: &'static str) {
        self.federation_refreshes
            .get_or_create(&RefreshLabels {
                trust_domain: td.name().to_owned(),
                result,
            })
            .inc();
    }

    /// Sets the federation gauges to `relationships` (trust domain, status, stored
    /// bundle's sequence), forgetting the trust domains no longer listed.
    pub fn federation_status<'a>(
        &self,
        relationships: impl Iterator<
            Item = (
                &'a carapace_core::TrustDomain,
                &'a crate::federation::Status,
                Option<u64>,
            ),
        >,
    ) {
        self.federation_last_success.clear();
        self.federation_last_error.clear();
        self.federation_sequence.clear();
        for (td, status, sequence) in relationships {
            let labels = FederationLabels {
                trust_domain: td.name().to_owned(),
            };
            self.federation_last_success
                .get_or_create(&labels)
                .set(status.last_success_at.unwrap_or(0));
            self.federation_last_error
                .get_or_create(&labels)
                .set(status.last_error_at.unwrap_or(0));
            if let Some(seq) = sequence {
                self.federation_sequence
                    .get_or_create(&labels)
                    .set(i64::try_from(seq).unwrap_or(i64::MAX));
            }
        }
    }

    /// Counts one CA signed for a downstream server.
    pub fn downstream_ca_signed(&self) {
        self.downstream_cas_signed.inc();
    }

    /// Records that the active CA took over at `now`.
    pub fn ca_rotated(&self, now: i64) {
        self.ca_last_rotation.set(now);
    }
}

/// Refreshes the gauges computed from state: entry and agent counts, and the expiry of
/// every CA in the bundle.
pub fn refresh(ca: &CaManager, cache: &EntryCache) {
    let m = metrics();
    m.entries
        .set(i64::try_from(cache.entry_count()).unwrap_or(i64::MAX));
    m.agents
        .set(i64::try_from(cache.list_agents().len()).unwrap_or(i64::MAX));
    m.ca_expiry.clear();
    let mut authorities = ca.authorities();
    // The old CAs are numbered soonest to expire first.
    authorities.sort_by_key(|a| a.not_after);
    let mut old = 0;
    for a in &authorities {
        let (slot, index) = match a.status {
            AuthorityStatus::Active => ("active", 0),
            AuthorityStatus::Prepared => ("prepared", 0),
            AuthorityStatus::Old => {
                old += 1;
                ("old", old - 1)
            }
        };
        m.ca_expiry
            .get_or_create(&CaLabels { slot, index })
            .set(a.not_after);
    }
    if m.ca_last_rotation.get() == 0 {
        if let Ok(a) = ca.active() {
            m.ca_last_rotation.set(a.not_before + crate::ca::BACKDATE);
        }
    }
}
