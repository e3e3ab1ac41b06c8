//! `Health`: whether the CA is active and the datastore takes writes, with a summary.

use carapace_proto::admin::HealthResponse;

use super::AdminApi;
use crate::{Error, Result};

impl AdminApi {
    pub(super) fn health_inner(&self) -> Result<HealthResponse> {
        let ca = self.ca.active()?;
        self.cache.datastore().write_health().map_err(|why| {
            Error::Core(carapace_core::Error::Unavailable(format!(
                "datastore writes are failing: {why}"
            )))
        })?;
        Ok(HealthResponse {
            trust_domain: self.ca.trust_domain().name().to_owned(),
            ca_expires_at: ca.not_after,
            agents: self.cache.list_agents().len() as u64,
            entries: self.cache.entry_count() as u64,
        })
    }
}
