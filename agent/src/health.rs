//! When the agent is ready: what `/ready` and `carapace-agent healthcheck` report.
//!
//! Ready means the agent can do its job now: it holds a valid SVID of its own (attested,
//! not expired, not refused by the server), and its Workload API answers a call on its
//! socket (the same call `healthcheck` makes from outside).

use std::path::PathBuf;

/// The agent's readiness checks.
#[derive(Debug, Clone)]
pub struct AgentReadiness {
    socket_path: PathBuf,
}

impl AgentReadiness {
    /// The checks of the agent serving the Workload API on `socket_path`.
    pub fn new(socket_path: PathBuf) -> Self {
        AgentReadiness { socket_path }
    }

    /// Every failing reason, one line each; empty when ready.
    pub async fn check(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        let (not_after, lost) = crate::metrics::metrics().identity();
        let now = carapace_core::clock::unix_now();
        if not_after == 0 {
            reasons.push("agent SVID: none yet (node attestation has not succeeded)".into());
        } else if not_after <= now {
            reasons.push(format!(
                "agent SVID: expired at {}",
                carapace_core::clock::rfc3339(not_after)
            ));
        }
        if let Some(why) = lost {
            reasons.push(format!("agent identity lost: {why}"));
        }
        if let Err(e) = crate::api_cli::healthcheck(&self.socket_path).await {
            reasons.push(format!("Workload API: {e}"));
        }
        reasons
    }
}

#[async_trait::async_trait]
impl carapace_common::health::Readiness for AgentReadiness {
    async fn not_ready(&self) -> Vec<String> {
        self.check().await
    }
}
