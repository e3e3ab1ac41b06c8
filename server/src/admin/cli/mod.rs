//! The admin subcommands of `carapace-server` (`entry`, `agent`, `bundle`, `token`,
//! `x509`, `jwt`, `localauthority`, `healthcheck`): each validates its input locally, calls the admin API on the
//! server's Unix socket, and returns what to print, human-readable (SPIRE-like) or JSON
//! (`--output json`).
//!
//! Every argument that can be checked without the server (SPIFFE IDs, selectors, DNS
//! names, entry ids) is checked before connecting: a bad input gets an error naming the
//! flag and nothing is sent. Errors from the server are shown as the server's message.
//! Output formatting is done by pure functions over the view structs, so it is tested
//! without a server.
//!
//! One module per noun holds that noun's clap types, its views (what it prints) with
//! their `format_*_human` functions, and its commands, dispatched by the noun's `run`.
//! What the nouns share: `flags` (the [`Common`] flags and the input checks), `view`
//! (`--output`, JSON, the human layout's primitives) and `client` (the connection and
//! the server's errors). To add a noun: write `<noun>.rs` on that pattern, add its
//! variant to [`AdminCommand`] and its arm to [`execute`], and re-export its public
//! types here; its server side is a file in [`crate::admin::api`].

mod agent;
mod authority;
mod bundle;
mod client;
mod entry;
mod flags;
mod health;
mod jwt;
mod token;
mod view;
mod x509;

#[cfg(test)]
mod tests;

use clap::Subcommand;

use crate::Result;

pub use agent::{
    AgentArgs, AgentCommand, AgentList, AgentListArgs, AgentView, EvictedView, format_agent_human,
    format_agents_human,
};
pub use authority::{
    AuthorityActivateArgs, AuthorityArgs, AuthorityIdArgs, AuthorityStateView, AuthorityView,
    JwtAuthorityActivateArgs, JwtAuthorityCommand, JwtAuthorityIdArgs, JwtAuthorityStateView,
    JwtAuthorityView, Listed, LocalAuthorityCommand, StateView, X509AuthorityCommand,
    format_one_human, format_state_human, state_of,
};
pub use bundle::{BundleCommand, BundleFormat, BundleShowArgs};
// The admin API's tests talk to their server over the CLI's checked connection.
#[cfg(test)]
pub(crate) use client::connect;
pub use entry::{
    CountView, DeletedView, EntryCommand, EntryCreateArgs, EntryDeleteArgs, EntryFields,
    EntryFilterArgs, EntryList, EntryUpdateArgs, EntryView, format_count_human,
    format_entries_human, format_entry_human,
};
pub use flags::Common;
pub use health::{HealthView, HealthcheckArgs};
pub use jwt::{JwtCommand, JwtMintArgs, JwtMintView, format_jwt_mint_human};
pub use token::{TokenCommand, TokenGenerateArgs, TokenView, format_token_human};
pub use view::{OutputFormat, rfc3339};
pub use x509::{MintView, X509Command, X509MintArgs, format_mint_human};

/// The admin subcommands, flattened into the `carapace-server` command line.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create, show, update, delete and count registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// List, show, ban and evict attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Show the trust domain's bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Generate join tokens for agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Mint X509-SVIDs outside of any agent.
    #[command(subcommand)]
    X509(X509Command),
    /// Mint JWT-SVIDs outside of any agent.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Show, prepare, activate, taint and revoke the server's own CAs and JWT keys.
    #[command(subcommand)]
    Localauthority(LocalAuthorityCommand),
    /// Check that the server answers on its admin socket.
    Healthcheck(HealthcheckArgs),
}

/// Runs an admin command; returns what to print on stdout (ending with a newline).
pub async fn execute(cmd: AdminCommand) -> Result<String> {
    match cmd {
        AdminCommand::Entry(c) => entry::run(c).await,
        AdminCommand::Agent(c) => agent::run(c).await,
        AdminCommand::Bundle(c) => bundle::run(c).await,
        AdminCommand::Token(c) => token::run(c).await,
        AdminCommand::X509(c) => x509::run(c).await,
        AdminCommand::Jwt(c) => jwt::run(c).await,
        AdminCommand::Localauthority(c) => authority::run(c).await,
        AdminCommand::Healthcheck(a) => health::run(a).await,
    }
}
