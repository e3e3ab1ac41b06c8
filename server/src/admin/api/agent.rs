//! `ListAgents`, `GetAgent`, `BanAgent`, `EvictAgent`: attested agents.

use carapace_proto::admin::{Agent, AgentRequest, EvictAgentResponse, ListAgentsResponse};
use carapace_proto::convert::selectors_to_wire;

use super::AdminApi;
use super::fields::required_id;
use crate::datastore::AttestedAgent;
use crate::{Error, Result};

/// An attested agent as the admin API sends it.
fn agent_to_wire(a: &AttestedAgent) -> Agent {
    Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestor: a.attestor.clone(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
        selectors: selectors_to_wire(&a.selectors),
        attested_at: a.attested_at,
        reattestable: a.reattestable,
        refused_at: a.refused.as_ref().map_or(0, |r| r.at),
        refused_reason: a
            .refused
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or_default(),
    }
}

impl AdminApi {
    pub(super) fn list_agents_inner(&self) -> ListAgentsResponse {
        let agents = self
            .cache
            .list_agents()
            .iter()
            .map(|a| agent_to_wire(a))
            .collect();
        ListAgentsResponse { agents }
    }

    pub(super) fn get_agent_inner(&self, req: &AgentRequest) -> Result<Agent> {
        let id = required_id("spiffe_id", &req.spiffe_id)?;
        let agent = self
            .cache
            .get_agent(&id)
            .ok_or_else(|| Error::NotFound(format!("agent {id} not found")))?;
        Ok(agent_to_wire(&agent))
    }

    pub(super) async fn ban_agent_inner(&self, req: AgentRequest) -> Result<Agent> {
        let id = required_id("spiffe_id", &req.spiffe_id)?;
        let agent = self.cache.set_agent_banned(&id, true).await?;
        tracing::info!(spiffe_id = %id, "banned agent");
        Ok(agent_to_wire(&agent))
    }

    pub(super) async fn evict_agent_inner(&self, req: AgentRequest) -> Result<EvictAgentResponse> {
        let id = required_id("spiffe_id", &req.spiffe_id)?;
        self.cache.evict_agent(&id).await?;
        tracing::info!(spiffe_id = %id, "evicted agent; it must attest again");
        Ok(EvictAgentResponse {})
    }
}
