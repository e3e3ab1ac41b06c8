//! `Health`: the server's readiness (the same checks as the health endpoint's `/ready`,
//! see [`crate::health`]), with a summary.

use carapace_proto::admin::{HealthResponse, UpstreamHealth};

use super::AdminApi;
use crate::health::ServerReadiness;
use crate::{Error, Result};

impl AdminApi {
    pub(super) async fn health_inner(&self) -> Result<HealthResponse> {
        let reasons = ServerReadiness::new(self.ca.clone(), self.cache.clone())
            .check()
            .await;
        if !reasons.is_empty() {
            return Err(Error::Core(carapace_core::Error::Unavailable(format!(
                "not ready: {}",
                reasons.join("; ")
            ))));
        }
        let ca = self.ca.active()?;
        Ok(HealthResponse {
            trust_domain: self.ca.trust_domain().name().to_owned(),
            ca_expires_at: ca.not_after,
            agents: self.cache.list_agents().len() as u64,
            entries: self.cache.entry_count() as u64,
            upstream: self.ca.upstream_status().map(|u| UpstreamHealth {
                name: u.name,
                last_success_at: u.last_success.unwrap_or(0),
                failing_since: u.failing_since.unwrap_or(0),
                last_error: u.last_error.unwrap_or_default(),
            }),
        })
    }
}
