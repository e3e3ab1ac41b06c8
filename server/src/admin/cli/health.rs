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
    /// The upstream authority's answers; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamView>,
}

/// How the upstream authority has answered the server's mints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamView {
    /// Plugin name.
    pub name: String,
    /// Unix seconds of the last successful mint; absent: none since the server started.
    pub last_success_at: Option<i64>,
    /// Unix seconds since when mints have failed; absent: the last one succeeded.
    pub failing_since: Option<i64>,
    /// Why the last mint failed, while failing.
    pub last_error: Option<String>,
}

impl UpstreamView {
    fn line(&self) -> String {
        let when = |t: i64| carapace_core::clock::rfc3339(t);
        match (self.failing_since, &self.last_error) {
            (Some(since), error) => format!(
                "Upstream authority {}: failing since {}: {}\n",
                self.name,
                when(since),
                error.as_deref().unwrap_or("unknown error")
            ),
            (None, _) => match self.last_success_at {
                Some(t) => format!(
                    "Upstream authority {}: ok, last answered at {}\n",
                    self.name,
                    when(t)
                ),
                None => format!(
                    "Upstream authority {}: ok, not asked anything since the server started\n",
                    self.name
                ),
            },
        }
    }
}

impl From<&HealthResponse> for HealthView {
    fn from(h: &HealthResponse) -> Self {
        HealthView {
            healthy: true,
            trust_domain: h.trust_domain.clone(),
            ca_expires_at: h.ca_expires_at,
            agents: h.agents,
            entries: h.entries,
            upstream: h.upstream.as_ref().map(|u| UpstreamView {
                name: u.name.clone(),
                last_success_at: (u.last_success_at != 0).then_some(u.last_success_at),
                failing_since: (u.failing_since != 0).then_some(u.failing_since),
                last_error: (!u.last_error.is_empty()).then(|| u.last_error.clone()),
            }),
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
    render(a.common.output, &HealthView::from(&h), |v| {
        let mut out = "Server is healthy.\n".to_owned();
        if let Some(u) = &v.upstream {
            out.push_str(&u.line());
        }
        out
    })
}
