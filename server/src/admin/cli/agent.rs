//! `agent list|show|ban|evict`: attested agents.

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use carapace_proto::admin::{Agent, AgentRequest, ListAgentsRequest};

use super::client::{connect, status_error};
use super::flags::{Common, spiffe_id};
use super::view::{field, plural, render, rfc3339};
use crate::Result;

/// `agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List the attested agents.
    List(AgentListArgs),
    /// Show one attested agent.
    Show(AgentArgs),
    /// Ban an agent: its calls are refused and it cannot attest again.
    Ban(AgentArgs),
    /// Evict an agent: it must attest again.
    Evict(AgentArgs),
}

/// `agent list`
#[derive(Debug, Clone, Args)]
pub struct AgentListArgs {
    #[command(flatten)]
    pub common: Common,
}

/// `agent show|ban|evict`
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The agent's SPIFFE ID.
    #[arg(long)]
    pub spiffe_id: String,
    #[command(flatten)]
    pub common: Common,
}

/// An attested agent as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    /// The agent's SPIFFE ID.
    pub spiffe_id: String,
    /// The node attestor it attested with.
    pub attestor: String,
    /// Serial of its current SVID, hex.
    pub serial: String,
    /// Unix seconds at which its SVID expires.
    pub expires_at: i64,
    /// Unix seconds of its attestation.
    pub attested_at: i64,
    /// Whether it is banned.
    pub banned: bool,
    /// Whether it may attest again on its own.
    pub reattestable: bool,
    /// Unix seconds at which its re-attestation was refused, if it was: it is refused on
    /// every call until it attests afresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_at: Option<i64>,
    /// Why its re-attestation was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_reason: Option<String>,
    /// Its node selectors, `type:value`.
    pub selectors: Vec<String>,
}

impl From<&Agent> for AgentView {
    fn from(a: &Agent) -> Self {
        AgentView {
            spiffe_id: a.spiffe_id.clone(),
            attestor: a.attestor.clone(),
            serial: a.serial.clone(),
            expires_at: a.expires_at,
            attested_at: a.attested_at,
            banned: a.banned,
            reattestable: a.reattestable,
            refused_at: (a.refused_at != 0).then_some(a.refused_at),
            refused_reason: (a.refused_at != 0).then(|| a.refused_reason.clone()),
            selectors: a
                .selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect(),
        }
    }
}

/// The agents of `agent list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentList {
    /// The agents.
    pub agents: Vec<AgentView>,
}

/// The answer of `agent evict`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictedView {
    /// SPIFFE ID of the evicted agent.
    pub evicted: String,
}

/// One agent (no trailing blank line).
pub fn format_agent_human(a: &AgentView) -> String {
    let mut out = String::new();
    field(&mut out, "SPIFFE ID", &a.spiffe_id);
    field(&mut out, "Attestation type", &a.attestor);
    field(&mut out, "Serial number", &a.serial);
    field(&mut out, "Expires at", rfc3339(a.expires_at));
    field(&mut out, "Attested at", rfc3339(a.attested_at));
    field(&mut out, "Banned", a.banned);
    field(&mut out, "Can re-attest", a.reattestable);
    if let Some(at) = a.refused_at {
        field(
            &mut out,
            "Attestation lost",
            format!(
                "{} ({})",
                rfc3339(at),
                a.refused_reason.as_deref().unwrap_or_default()
            ),
        );
    }
    for s in &a.selectors {
        field(&mut out, "Selector", s);
    }
    out
}

/// `Found N attested agents:` then each agent, separated by blank lines.
pub fn format_agents_human(agents: &[AgentView]) -> String {
    let n = agents.len();
    let mut out = format!("Found {n} attested {}\n", plural(n, "agent", "agents"));
    for a in agents {
        out.push('\n');
        out.push_str(&format_agent_human(a));
    }
    out
}

/// Runs an `agent` subcommand; returns what to print.
pub(super) async fn run(cmd: AgentCommand) -> Result<String> {
    match cmd {
        AgentCommand::List(a) => agent_list(a).await,
        AgentCommand::Show(a) => agent_show(a).await,
        AgentCommand::Ban(a) => agent_ban(a).await,
        AgentCommand::Evict(a) => agent_evict(a).await,
    }
}

async fn agent_list(a: AgentListArgs) -> Result<String> {
    const CMD: &str = "agent list";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .list_agents(ListAgentsRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let list = AgentList {
        agents: resp.agents.iter().map(AgentView::from).collect(),
    };
    render(a.common.output, &list, |l| format_agents_human(&l.agents))
}

async fn agent_show(a: AgentArgs) -> Result<String> {
    const CMD: &str = "agent show";
    let id = spiffe_id(CMD, "--spiffe-id", &a.spiffe_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let agent = client
        .get_agent(AgentRequest {
            spiffe_id: id.to_string(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(
        a.common.output,
        &AgentView::from(&agent),
        format_agent_human,
    )
}

async fn agent_ban(a: AgentArgs) -> Result<String> {
    const CMD: &str = "agent ban";
    let id = spiffe_id(CMD, "--spiffe-id", &a.spiffe_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let agent = client
        .ban_agent(AgentRequest {
            spiffe_id: id.to_string(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &AgentView::from(&agent), |v| {
        format!("Agent banned: {}\n", v.spiffe_id)
    })
}

async fn agent_evict(a: AgentArgs) -> Result<String> {
    const CMD: &str = "agent evict";
    let id = spiffe_id(CMD, "--spiffe-id", &a.spiffe_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    client
        .evict_agent(AgentRequest {
            spiffe_id: id.to_string(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?;
    render(
        a.common.output,
        &EvictedView {
            evicted: id.to_string(),
        },
        |v| format!("Agent evicted: {}\n", v.evicted),
    )
}
