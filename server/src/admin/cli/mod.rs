//! The admin subcommands of `carapace-server` (`entry`, `agent`, `bundle`, `federation`,
//! `token`, `x509`, `jwt`, `localauthority`, `healthcheck`): each validates its input locally, calls the admin API on the
//! server's Unix socket (or, with `--server-address`, on the server's node API port over
//! mutual TLS as an admin SVID), and returns what to print, human-readable (SPIRE-like)
//! or JSON (`--output json`).
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
mod federation;
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
pub use bundle::{
    BundleCommand, BundleDeleteArgs, BundleDeletedView, BundleFormat, BundleList, BundleListArgs,
    BundleSetArgs, BundleShowArgs, DeleteModeArg, StoredBundleView, format_stored_bundle_human,
    format_stored_bundles_human,
};
// The admin API's tests talk to their server over the CLI's checked connection.
#[cfg(test)]
pub(crate) use client::connect;
// The admin API's tests check the remote flags' file checks next to the server's.
#[cfg(test)]
pub(crate) use client::{RemoteFlags, check_address, remote_tls};
pub use entry::{
    CountView, DeletedView, EntryCommand, EntryCreateArgs, EntryDeleteArgs, EntryFields,
    EntryFilterArgs, EntryList, EntryUpdateArgs, EntryView, format_count_human,
    format_entries_human, format_entry_human,
};
pub use federation::{
    FederationCommand, FederationCreateArgs, FederationDeletedView, FederationFields,
    FederationList, FederationListArgs, FederationTdArgs, FederationUpdateArgs, FederationView,
    ProfileArg, format_federation_human, format_federations_human, https_spiffe_hint,
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
    /// Show the trust domain's bundle; set, list and delete foreign trust domains'.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Trust other trust domains: their bundle endpoints, fetched in the background.
    #[command(subcommand)]
    Federation(FederationCommand),
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

impl AdminCommand {
    /// The flags every admin command takes.
    fn common(&self) -> &Common {
        use authority::{JwtAuthorityCommand as J, X509AuthorityCommand as X};
        match self {
            AdminCommand::Entry(c) => match c {
                EntryCommand::Create(a) => &a.common,
                EntryCommand::Show(a) | EntryCommand::Count(a) => &a.common,
                EntryCommand::Update(a) => &a.common,
                EntryCommand::Delete(a) => &a.common,
            },
            AdminCommand::Agent(c) => match c {
                AgentCommand::List(a) => &a.common,
                AgentCommand::Show(a) | AgentCommand::Ban(a) | AgentCommand::Evict(a) => &a.common,
            },
            AdminCommand::Bundle(c) => match c {
                BundleCommand::Show(a) => &a.common,
                BundleCommand::Set(a) => &a.common,
                BundleCommand::List(a) => &a.common,
                BundleCommand::Delete(a) => &a.common,
            },
            AdminCommand::Federation(c) => match c {
                FederationCommand::Create(a) => &a.common,
                FederationCommand::Update(a) => &a.common,
                FederationCommand::Delete(a)
                | FederationCommand::Show(a)
                | FederationCommand::Refresh(a) => &a.common,
                FederationCommand::List(a) => &a.common,
            },
            AdminCommand::Token(TokenCommand::Generate(a)) => &a.common,
            AdminCommand::X509(X509Command::Mint(a)) => &a.common,
            AdminCommand::Jwt(JwtCommand::Mint(a)) => &a.common,
            AdminCommand::Localauthority(c) => match c {
                LocalAuthorityCommand::X509(x) => match x {
                    X::Show(a) | X::Prepare(a) => &a.common,
                    X::Activate(a) => &a.common,
                    X::Taint(a) | X::Revoke(a) => &a.common,
                },
                LocalAuthorityCommand::Jwt(j) => match j {
                    J::Show(a) | J::Prepare(a) => &a.common,
                    J::Activate(a) => &a.common,
                    J::Taint(a) | J::Revoke(a) => &a.common,
                },
            },
            AdminCommand::Healthcheck(a) => &a.common,
        }
    }
}

/// Runs an admin command, on the admin socket or, with `--server-address`, on that
/// server over mutual TLS; returns what to print on stdout (ending with a newline).
pub async fn execute(cmd: AdminCommand) -> Result<String> {
    let remote = cmd.common().remote();
    client::with_remote(remote, dispatch(cmd)).await
}

async fn dispatch(cmd: AdminCommand) -> Result<String> {
    match cmd {
        AdminCommand::Entry(c) => entry::run(c).await,
        AdminCommand::Agent(c) => agent::run(c).await,
        AdminCommand::Bundle(c) => bundle::run(c).await,
        AdminCommand::Federation(c) => federation::run(c).await,
        AdminCommand::Token(c) => token::run(c).await,
        AdminCommand::X509(c) => x509::run(c).await,
        AdminCommand::Jwt(c) => jwt::run(c).await,
        AdminCommand::Localauthority(c) => authority::run(c).await,
        AdminCommand::Healthcheck(a) => health::run(a).await,
    }
}
