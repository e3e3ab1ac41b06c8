//! When the server is ready: what `/ready` and `carapace-server healthcheck` both report.
//!
//! Ready means the server can do its job now, each check exercising the real thing:
//!
//! 1. the datastore answers and commits a write (a one-row probe write), and the last
//!    real write transaction did not fail (a full disk);
//! 2. the key manager signs with the active CA's key (one probe signature: an HSM whose
//!    token is gone fails, and passes again when the token is back, with no restart);
//! 3. an active X.509 CA exists and has not expired;
//! 4. an active JWT signing key exists and has not expired;
//! 5. with an upstream authority: not both failing to mint and in the active CA's last
//!    sixth of life (the server still signs, but stops when the CA expires; before that,
//!    SVIDs are cut short at its end).
//!
//! The probes run at most once per [`PROBE_INTERVAL`]: a burst of `/ready` requests
//! costs one write and one signature.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::ca::CaManager;
use crate::entry_cache::EntryCache;

/// The shortest time between two probes of the datastore and the key manager.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// When the checks last ran, and what they found.
type LastProbe = Option<(Instant, Vec<String>)>;

/// The server's readiness checks.
#[derive(Debug, Clone)]
pub struct ServerReadiness {
    ca: Arc<CaManager>,
    cache: Arc<EntryCache>,
    last: Arc<Mutex<LastProbe>>,
}

impl ServerReadiness {
    /// The checks of the server that owns `ca` and `cache`.
    pub fn new(ca: Arc<CaManager>, cache: Arc<EntryCache>) -> Self {
        ServerReadiness {
            ca,
            cache,
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// Every failing reason, one line each; empty when ready.
    pub async fn check(&self) -> Vec<String> {
        let mut last = self.last.lock().await;
        if let Some((at, reasons)) = last.as_ref() {
            if at.elapsed() < PROBE_INTERVAL {
                return reasons.clone();
            }
        }
        let reasons = self.probe().await;
        *last = Some((Instant::now(), reasons.clone()));
        reasons
    }

    async fn probe(&self) -> Vec<String> {
        let now = carapace_core::clock::unix_now();
        let mut reasons = Vec::new();
        let ds = self.cache.datastore();
        if let Err(e) = ds.probe_write(now).await {
            reasons.push(format!("datastore: a probe write did not commit: {e}"));
        }
        // The probe rewrites one row in place, which can commit on a disk too full for
        // anything else (or fail where the last real write did not): the last real
        // write's failure stands, beside the probe's, until a real write commits.
        if let Err(why) = ds.write_health() {
            reasons.push(format!("datastore writes are failing: {why}"));
        }
        match self.ca.active() {
            Err(_) => reasons.push("x509 CA: there is no active CA".into()),
            Ok(ca) if ca.not_after <= now => reasons.push(format!(
                "x509 CA: the active CA expired at {}",
                carapace_core::clock::rfc3339(ca.not_after)
            )),
            Ok(ca) => {
                if let Err(e) = self.ca.probe_signing().await {
                    reasons.push(format!("key manager: the active CA's key cannot sign: {e}"));
                }
                if let Some(reason) = upstream_reason(&ca, self.ca.upstream_status(), now) {
                    reasons.push(reason);
                }
            }
        }
        match self.ca.jwt_active() {
            Err(_) => reasons.push("jwt: there is no active JWT signing key".into()),
            Ok(key) if key.not_after() <= now => reasons.push(format!(
                "jwt: the active JWT signing key expired at {}",
                carapace_core::clock::rfc3339(key.not_after())
            )),
            Ok(_) => {}
        }
        reasons
    }
}

/// The reason readiness fails for the upstream authority: its mints fail and the active
/// CA `ca` is in the last sixth of its life (when a CA is activated, so no prepared CA
/// will take over).
pub(crate) fn upstream_reason(
    ca: &crate::ca::CaSlot,
    status: Option<crate::ca::UpstreamStatus>,
    now: i64,
) -> Option<String> {
    let status = status?;
    let since = status.failing_since?;
    let life = ca.not_after - ca.not_before;
    if ca.not_after - now > life / 6 {
        return None;
    }
    Some(format!(
        "x509 CA: the active CA expires at {} and the upstream authority {} has failed since {}: {}",
        carapace_core::clock::rfc3339(ca.not_after),
        status.name,
        carapace_core::clock::rfc3339(since),
        status.last_error.as_deref().unwrap_or("unknown error")
    ))
}

#[async_trait::async_trait]
impl carapace_common::health::Readiness for ServerReadiness {
    async fn not_ready(&self) -> Vec<String> {
        self.check().await
    }
}
