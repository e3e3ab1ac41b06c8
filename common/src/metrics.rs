//! Metric pieces both binaries share, on `prometheus-client`: the connection counts of a
//! listener ([`ConnectionMetrics`], fed by [`crate::listener::ConnectionLimiter`]), the
//! key manager's signing latency ([`MeteredKeyManager`]), and the label sets they use.
//!
//! Labels are low-cardinality by rule: a listener, a backend, an attestor, a result, an
//! RPC, a gRPC code. Never a SPIFFE ID, an entry ID, a peer address or a key id.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use carapace_core::plugin::{KeyInfo, KeyManager, KeySigner};
use carapace_core::{Error, KeyType, SignatureAlgorithm};

/// `{listener}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// Which listener: `node_api`, `node_api_unauthenticated`, `workload_api`.
    pub listener: &'static str,
}

/// `{backend}`: the key manager plugin (`memory`, `disk`, `pkcs11`, `tpm`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The key manager's name.
    pub backend: String,
}

/// `{attestor, result}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestationLabels {
    /// The node attestor plugin's name.
    pub attestor: String,
    /// `ok`, `refused` (the node's evidence was not accepted) or `error`.
    pub result: &'static str,
}

/// `{kind, result}` of an SVID.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SvidLabels {
    /// What the SVID is for (each binary documents its kinds).
    pub kind: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// A counter of SVIDs by kind and result (`<name>_total{kind, result}`).
#[derive(Debug, Clone, Default)]
pub struct SvidCounter(Family<SvidLabels, Counter>);

impl SvidCounter {
    /// Registers the counter as `name` in `registry`.
    pub fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let c = SvidCounter::default();
        registry.register(name, help, c.0.clone());
        c
    }

    /// Counts `n` SVIDs of `kind`, signed (`ok`) or not.
    pub fn record(&self, kind: &'static str, ok: bool, n: u64) {
        if n > 0 {
            self.0
                .get_or_create(&SvidLabels {
                    kind,
                    result: if ok { "ok" } else { "error" },
                })
                .inc_by(n);
        }
    }
}

/// A counter of node attestations by attestor and result
/// (`node_attestations_total{attestor, result}`).
#[derive(Debug, Clone, Default)]
pub struct AttestationCounter(Family<AttestationLabels, Counter>);

impl AttestationCounter {
    /// Registers the counter in `registry`.
    pub fn register(registry: &mut Registry, help: &str) -> Self {
        let c = AttestationCounter::default();
        registry.register("node_attestations", help, c.0.clone());
        c
    }

    /// Counts one attestation with `attestor` (a configured plugin's name, never one a
    /// peer sent) that ended with `result`.
    pub fn record(&self, attestor: &str, result: &'static str) {
        self.0
            .get_or_create(&AttestationLabels {
                attestor: attestor.to_owned(),
                result,
            })
            .inc();
    }
}

/// Registers a gauge as `name` in `registry` and returns it.
pub fn register_gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

/// Latency buckets from 100 µs to about 13 s (a software signature to a slow HSM or a
/// TPM), doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_1, 2.0, 18)
}

/// A histogram with [`latency_buckets`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// The connection metrics of a process, by listener.
#[derive(Debug, Clone, Default)]
pub struct ConnectionFamilies {
    open: Family<ListenerLabels, Gauge>,
    refused: Family<ListenerLabels, Counter>,
}

impl ConnectionFamilies {
    /// Registers `<prefix>_connections_open` and `<prefix>_connections_refused_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let f = ConnectionFamilies::default();
        registry.register(
            "connections_open",
            "Connections open now, by listener",
            f.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at a listener's caps, by listener",
            f.refused.clone(),
        );
        f
    }

    /// The metrics of `listener`.
    pub fn listener(&self, listener: &'static str) -> ConnectionMetrics {
        let labels = ListenerLabels { listener };
        ConnectionMetrics {
            open: self.open.get_or_create(&labels).clone(),
            refused: self.refused.get_or_create(&labels).clone(),
        }
    }
}

/// One listener's live connections and refusals.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    pub(crate) open: Gauge,
    pub(crate) refused: Counter,
}

impl ConnectionMetrics {
    pub(crate) fn set_open(&self, n: usize) {
        self.open.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// `key_manager_sign_duration_seconds{backend}`: how long each signature takes.
#[derive(Debug, Clone)]
pub struct SignLatency(Family<BackendLabels, Histogram, fn() -> Histogram>);

impl SignLatency {
    /// Registers the histogram family in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let family = Family::<BackendLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "key_manager_sign_duration_seconds",
            "Time to make one signature with a key manager key, by backend",
            family.clone(),
        );
        SignLatency(family)
    }

    /// Wraps `km` so that every signature made through its keys is timed.
    pub fn wrap(&self, km: Arc<dyn KeyManager>) -> Arc<dyn KeyManager> {
        let histogram = self
            .0
            .get_or_create(&BackendLabels {
                backend: km.name().to_owned(),
            })
            .clone();
        Arc::new(MeteredKeyManager {
            inner: km,
            histogram,
        })
    }
}

/// A key manager whose signers time each signature into a histogram. Everything else is
/// the wrapped key manager's.
#[derive(Debug)]
pub struct MeteredKeyManager {
    inner: Arc<dyn KeyManager>,
    histogram: Histogram,
}

impl MeteredKeyManager {
    fn wrap(&self, signer: Arc<dyn KeySigner>) -> Arc<dyn KeySigner> {
        Arc::new(MeteredSigner {
            inner: signer,
            histogram: self.histogram.clone(),
        })
    }
}

#[async_trait::async_trait]
impl KeyManager for MeteredKeyManager {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeySigner>, Error> {
        Ok(self.wrap(self.inner.generate_key(id, key_type).await?))
    }
    async fn get_key(&self, id: &str) -> Result<Arc<dyn KeySigner>, Error> {
        Ok(self.wrap(self.inner.get_key(id).await?))
    }
    async fn list_keys(&self) -> Result<Vec<KeyInfo>, Error> {
        self.inner.list_keys().await
    }
    async fn delete_key(&self, id: &str) -> Result<(), Error> {
        self.inner.delete_key(id).await
    }
}

#[derive(Debug)]
struct MeteredSigner {
    inner: Arc<dyn KeySigner>,
    histogram: Histogram,
}

impl KeySigner for MeteredSigner {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn key_type(&self) -> KeyType {
        self.inner.key_type()
    }
    fn public_key_der(&self) -> &[u8] {
        self.inner.public_key_der()
    }
    fn sign(&self, alg: SignatureAlgorithm, message: &[u8]) -> Result<Vec<u8>, Error> {
        let start = Instant::now();
        let r = self.inner.sign(alg, message);
        self.histogram.observe(start.elapsed().as_secs_f64());
        r
    }
    fn may_block(&self) -> bool {
        self.inner.may_block()
    }
    fn concurrency(&self) -> Option<usize> {
        self.inner.concurrency()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_through_a_wrapped_key_manager_are_timed_under_its_backend() {
        let mut registry = Registry::with_prefix("t");
        let latency = SignLatency::register(&mut registry);
        let km = latency.wrap(Arc::new(carapace_keymanager_soft::MemoryKeyManager::new()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let key = rt.block_on(km.generate_key("k", KeyType::EcP256)).unwrap();
        key.sign(SignatureAlgorithm::EcdsaP256Sha256, b"m").unwrap();
        key.sign(SignatureAlgorithm::EcdsaP256Sha256, b"m").unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("t_key_manager_sign_duration_seconds_count{backend=\"memory\"} 2"),
            "{text}"
        );
    }
}
