//! `healthcheck`: whether the server answers on its admin socket, with a summary.

use clap::Args;
use serde::{Deserialize, Serialize};

use carapace_proto::admin::{HealthRequest, HealthResponse};

use super::client::{connect, status_error};
use super::flags::Common;
use super::view::render;
use crate::Result;

/// `healthcheck`
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    pub common: Common,
}

/// The answer of `healthcheck`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    /// Always true (an unhealthy server is an error).
    pub healthy: bool,
    /// The server's trust domain.
    pub trust_domain: String,
    /// Unix seconds of the active CA's notAfter.
    pub ca_expires_at: i64,
    /// Attested agents.
    pub agents: u64,
    /// Registration entries.
    pub entries: u64,
}

impl From<&HealthResponse> for HealthView {
    fn from(h: &HealthResponse) -> Self {
        HealthView {
            healthy: true,
            trust_domain: h.trust_domain.clone(),
            ca_expires_at: h.ca_expires_at,
            agents: h.agents,
            entries: h.entries,
        }
    }
}

/// Runs `healthcheck`; returns what to print.
pub(super) async fn run(a: HealthcheckArgs) -> Result<String> {
    const CMD: &str = "healthcheck";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let h = client
        .health(HealthRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &HealthView::from(&h), |_| {
        "Server is healthy.\n".to_owned()
    })
}
