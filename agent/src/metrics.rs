//! The agent's Prometheus metrics, served on `/metrics` by the health endpoint
//! ([`carapace_common::health`]), and the state its readiness reads. Every name starts
//! with `carapace_agent_`.
//!
//! The metrics are process-wide, as the tracing subscriber is (one agent per process):
//! the manager and the Workload API record into [`metrics`] without being handed a
//! registry. Gauges computed from the SVID cache are refreshed before each scrape. No
//! label carries a SPIFFE ID, an entry ID, a selector, a uid or a pid.

use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use carapace_common::metrics::{
    AttestationCounter, ConnectionFamilies, SignLatency, SvidCounter, latency_histogram,
    register_gauge,
};

use crate::cache::SvidCache;

/// `{rpc, code}` of a Workload API call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The RPC's name, e.g. `FetchX509SVID`.
    pub rpc: &'static str,
    /// The gRPC status code's name (`OK`, `PermissionDenied`, ...).
    pub code: &'static str,
}

/// `{rpc}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcNameLabels {
    /// The RPC's name.
    pub rpc: &'static str,
}

/// `{kind}` of a rotation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `agent` or `workload`.
    pub kind: &'static str,
}

/// `{source}` of a JWT-SVID served.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwtSourceLabels {
    /// `cache` (before its half-life), `server` (signed for this call) or
    /// `cache_fallback` (past its half-life: the server could not be reached).
    pub source: &'static str,
}

/// Every metric of the agent, and what its readiness reads.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    /// `workload_api_requests_total{rpc, code}`.
    requests: Family<RpcLabels, Counter>,
    /// `workload_api_request_duration_seconds{rpc}`: until the first answer.
    latency: Family<RpcNameLabels, Histogram, fn() -> Histogram>,
    /// `node_attestations_total{attestor, result}`: this agent's.
    pub node_attestations: AttestationCounter,
    /// `svids_received_total{kind, result}`; kinds: `agent` (its own, by renewal),
    /// `workload`.
    pub svids_received: SvidCounter,
    /// `key_manager_sign_duration_seconds{backend}`.
    pub sign_latency: SignLatency,
    /// `connections_open{listener}`, `connections_refused_total{listener}`.
    pub connections: ConnectionFamilies,
    agent_svid_expiry: Gauge,
    workload_svid_expiry: Gauge,
    workload_svids: Gauge,
    last_sync: Gauge,
    last_rotation: Family<KindLabels, Gauge>,
    /// `workload_jwt_svids_total{source}`.
    jwt_svids: Family<JwtSourceLabels, Counter>,
    /// Why the agent holds no usable identity, when it does not.
    lost: Mutex<Option<String>>,
}

static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

/// The agent's metrics.
pub fn metrics() -> &'static AgentMetrics {
    &METRICS
}

impl AgentMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("carapace_agent");
        let requests = Family::default();
        registry.register(
            "workload_api_requests",
            "Workload API calls, by RPC and gRPC status code (of the first answer of a stream)",
            Clone::clone(&requests),
        );
        let latency = Family::<RpcNameLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "workload_api_request_duration_seconds",
            "Time from a Workload API call to its first answer (caller attestation included), by RPC",
            Clone::clone(&latency),
        );
        let node_attestations = AttestationCounter::register(
            &mut registry,
            "Node attestations of this agent, by attestor and result (ok, refused, error)",
        );
        let svids_received = SvidCounter::register(
            &mut registry,
            "svids_received",
            "X509-SVIDs the agent asked the server for, by kind and result",
        );
        let sign_latency = SignLatency::register(&mut registry);
        let connections = ConnectionFamilies::register(&mut registry);
        let agent_svid_expiry = register_gauge(
            &mut registry,
            "agent_svid_expiry_timestamp_seconds",
            "When the agent's own X509-SVID expires (notAfter, unix seconds)",
        );
        let workload_svid_expiry = register_gauge(
            &mut registry,
            "workload_svid_soonest_expiry_timestamp_seconds",
            "When the soonest-expiring workload X509-SVID the agent holds expires (unix seconds; 0: none held)",
        );
        let workload_svids =
            register_gauge(&mut registry, "workload_svids", "Workload X509-SVIDs held");
        let last_sync = register_gauge(
            &mut registry,
            "last_sync_timestamp_seconds",
            "When the agent last received its entries and bundle from the server (unix seconds)",
        );
        let last_rotation = Family::default();
        registry.register(
            "last_rotation_timestamp_seconds",
            "When the agent last received a new X509-SVID, by kind (agent, workload; unix seconds)",
            Clone::clone(&last_rotation),
        );
        let jwt_svids = Family::default();
        registry.register(
            "workload_jwt_svids",
            "JWT-SVIDs served by FetchJWTSVID, by source (cache: before its half-life; server: signed for the call; cache_fallback: past its half-life, the server unreachable)",
            Clone::clone(&jwt_svids),
        );
        AgentMetrics {
            registry,
            jwt_svids,
            requests,
            latency,
            node_attestations,
            svids_received,
            sign_latency,
            connections,
            agent_svid_expiry,
            workload_svid_expiry,
            workload_svids,
            last_sync,
            last_rotation,
            lost: Mutex::new(None),
        }
    }

    /// The registry `/metrics` encodes.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records a Workload API call that answered `code` `start` after it began.
    pub fn rpc(&self, rpc: &'static str, code: tonic::Code, start: Instant) {
        let code = code_name(code);
        self.requests.get_or_create(&RpcLabels { rpc, code }).inc();
        self.latency
            .get_or_create(&RpcNameLabels { rpc })
            .observe(start.elapsed().as_secs_f64());
    }

    /// The agent holds an SVID of its own (new, or restored from its data directory),
    /// valid until `not_after`.
    pub fn agent_svid(&self, not_after: i64) {
        self.agent_svid_expiry.set(not_after);
    }

    /// The agent received a new SVID of `kind` (`agent`, `workload`) now.
    pub fn rotated(&self, kind: &'static str) {
        self.last_rotation
            .get_or_create(&KindLabels { kind })
            .set(carapace_core::clock::unix_now());
    }

    /// A JWT-SVID was served from `source` (`cache`, `server`, `cache_fallback`).
    pub fn jwt_svid(&self, source: &'static str) {
        self.jwt_svids
            .get_or_create(&JwtSourceLabels { source })
            .inc();
    }

    /// The agent received its entries and bundle.
    pub fn synced(&self) {
        self.last_sync.set(carapace_core::clock::unix_now());
    }

    /// Why the agent holds no usable identity (`None`: it does).
    pub fn set_lost(&self, why: Option<&str>) {
        *self.lost.lock().unwrap_or_else(PoisonError::into_inner) = why.map(str::to_owned);
    }

    /// The agent's own SVID's notAfter (0: none yet) and why its identity is lost, if it is.
    pub fn identity(&self) -> (i64, Option<String>) {
        (
            self.agent_svid_expiry.get(),
            self.lost
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    /// Refreshes the gauges computed from the SVID cache.
    pub fn refresh(&self, cache: &SvidCache) {
        let state = cache.current();
        let expiries = state.svids.iter().map(|s| s.expires_at);
        self.workload_svids
            .set(i64::try_from(state.svids.len()).unwrap_or(i64::MAX));
        self.workload_svid_expiry.set(expiries.min().unwrap_or(0));
    }
}

/// The name of a gRPC status code as the metrics label it: `OK`, else the variant's name
/// (`PermissionDenied`); static, so that recording a call allocates nothing.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_variant_names_and_ok() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        for n in 1..=16 {
            let code = tonic::Code::from_i32(n);
            assert_eq!(code_name(code), format!("{code:?}"), "code {n}");
        }
    }
}
