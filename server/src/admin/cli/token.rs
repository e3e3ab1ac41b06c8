//! `token generate`: single-use join tokens for agents.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use carapace_proto::admin::{CreateJoinTokenRequest, JoinToken};

use super::client::{connect, status_error};
use super::flags::{Common, spiffe_id, ttl_secs};
use super::view::{render, rfc3339};
use crate::Result;

/// `token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Generate a single-use join token for an agent.
    Generate(TokenGenerateArgs),
}

/// `token generate`
#[derive(Debug, Clone, Args)]
pub struct TokenGenerateArgs {
    /// Also create an entry with this SPIFFE ID, parented to the agent that attests with
    /// the token.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// How long the token stays valid: seconds (600) or with units (10m, 1h), at most 365
    /// days (default: the server's, 600 seconds).
    #[arg(long, value_name = "DURATION", value_parser = carapace_common::parse_duration_flag)]
    pub ttl: Option<Duration>,
    #[command(flatten)]
    pub common: Common,
}

/// A generated join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// The token to give the agent.
    pub token: String,
    /// The SPIFFE ID the agent will get.
    pub agent_id: String,
    /// Unix seconds at which the token expires.
    pub expires_at: i64,
}

impl From<&JoinToken> for TokenView {
    fn from(t: &JoinToken) -> Self {
        TokenView {
            token: t.token.clone(),
            agent_id: t.agent_id.clone(),
            expires_at: t.expires_at,
        }
    }
}

/// `Token: ...`, `Agent ID: ...`, `Expires: ...`.
pub fn format_token_human(t: &TokenView) -> String {
    format!(
        "Token: {}\nAgent ID: {}\nExpires: {}\n",
        t.token,
        t.agent_id,
        rfc3339(t.expires_at)
    )
}

/// Runs a `token` subcommand; returns what to print.
pub(super) async fn run(cmd: TokenCommand) -> Result<String> {
    match cmd {
        TokenCommand::Generate(a) => token_generate(a).await,
    }
}

async fn token_generate(a: TokenGenerateArgs) -> Result<String> {
    const CMD: &str = "token generate";
    let spiffe = match &a.spiffe_id {
        Some(s) => spiffe_id(CMD, "--spiffe-id", s)?.to_string(),
        None => String::new(),
    };
    let ttl = ttl_secs(
        CMD,
        "--ttl",
        a.ttl,
        carapace_core::limits::MAX_JOIN_TOKEN_TTL,
    )?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let token = client
        .create_join_token(CreateJoinTokenRequest {
            ttl,
            spiffe_id: spiffe,
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let view = TokenView::from(&token);
    render(a.common.output, &view, format_token_human)
}
