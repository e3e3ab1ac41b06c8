//! The admin subcommands of `carapace-server` (`entry`, `agent`, `bundle`, `token`,
//! `x509`, `healthcheck`): each validates its input locally, calls the admin API on the
//! server's Unix socket, and returns what to print, human-readable (SPIRE-like) or JSON
//! (`--output json`).
//!
//! Every argument that can be checked without the server (SPIFFE IDs, selectors, DNS
//! names, entry ids) is checked before connecting: a bad input gets an error naming the
//! flag and nothing is sent. Errors from the server are shown as the server's message.
//! Output formatting is done by pure functions over the view structs, so it is tested
//! without a server.

use carapace_common::error_chain;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use tonic::{Code, Status};
use zeroize::Zeroizing;

use carapace_core::bundle::der_to_pem;
use carapace_core::entry::validate_dns_name;
use carapace_core::{EntryId, Selector, SpiffeId};
use carapace_proto::admin::admin_client::AdminClient;
use carapace_proto::admin::{
    Agent, AgentRequest, CreateEntryRequest, CreateJoinTokenRequest, DeleteEntryRequest,
    GetBundleRequest, HealthRequest, HealthResponse, JoinToken, ListAgentsRequest,
    ListEntriesRequest, MintX509svidRequest, UpdateEntryRequest,
};
use carapace_proto::convert::bundle_from_wire;
use carapace_proto::types;

use crate::config::default_admin_socket;
use crate::{Error, Result};

/// How long one admin call may take (minting may wait on a hardware key manager).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Check that the server answers on its admin socket.
    Healthcheck(HealthcheckArgs),
}

/// Options every admin command takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The server's admin socket (default: /run/carapace/admin.sock as root,
    /// /tmp/carapace-server/private/admin.sock otherwise).
    #[arg(long, env = "CARAPACE_ADMIN_SOCKET", default_value_os_t = default_admin_socket())]
    pub admin_socket: PathBuf,
    /// The uid the server runs as, when not this command's own: the command talks only
    /// to a socket served by its own uid or this one (checked with SO_PEERCRED before
    /// anything is sent).
    #[arg(long, env = "CARAPACE_SERVER_UID", value_name = "UID")]
    pub server_uid: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

/// Output format of the admin commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Human,
    /// JSON, for scripts.
    Json,
}

/// `entry ...`
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create a registration entry (its id is assigned by the server).
    Create(EntryCreateArgs),
    /// Show the entries matching every filter given (all entries without filters).
    Show(EntryFilterArgs),
    /// Replace every field of an entry.
    Update(EntryUpdateArgs),
    /// Delete an entry.
    Delete(EntryDeleteArgs),
    /// Count the entries matching every filter given.
    Count(EntryFilterArgs),
}

/// The fields of an entry, for `entry create` and `entry update`.
#[derive(Debug, Clone, Args)]
pub struct EntryFields {
    /// SPIFFE ID of the parent: an agent, the server (node alias) or another entry.
    #[arg(long)]
    pub parent_id: String,
    /// SPIFFE ID issued to matching workloads.
    #[arg(long)]
    pub spiffe_id: String,
    /// Selector `type:value` (e.g. unix:uid:1000); repeat for several (all must match).
    #[arg(long = "selector", value_name = "TYPE:VALUE", required = true)]
    pub selectors: Vec<String>,
    /// X509-SVID lifetime, e.g. 30s, 1h, at most 365 days (default: the server's).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub x509_svid_ttl: Option<Duration>,
    /// DNS name to add to the SVID; repeat for several (the first becomes the CN).
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// A label passed to the workload with the SVID.
    #[arg(long)]
    pub hint: Option<String>,
    /// The SVID may call the admin API.
    #[arg(long)]
    pub admin: bool,
    /// The SVID may mint downstream CAs.
    #[arg(long)]
    pub downstream: bool,
    /// When the entry is deleted: unix seconds or RFC 3339 in UTC (2030-01-01T00:00:00Z),
    /// at the latest 9999-12-31T23:59:59Z.
    #[arg(long, value_name = "TIME", value_parser = parse_expires_at)]
    pub expires_at: Option<i64>,
}

/// `entry create`
#[derive(Debug, Clone, Args)]
pub struct EntryCreateArgs {
    #[command(flatten)]
    pub fields: EntryFields,
    #[command(flatten)]
    pub common: Common,
}

/// `entry update`
#[derive(Debug, Clone, Args)]
pub struct EntryUpdateArgs {
    /// Id of the entry to replace.
    #[arg(long)]
    pub id: String,
    #[command(flatten)]
    pub fields: EntryFields,
    #[command(flatten)]
    pub common: Common,
}

/// `entry delete`
#[derive(Debug, Clone, Args)]
pub struct EntryDeleteArgs {
    /// Id of the entry to delete.
    #[arg(long)]
    pub id: String,
    #[command(flatten)]
    pub common: Common,
}

/// Entry filters of `entry show` and `entry count`; the filters given are ANDed.
#[derive(Debug, Clone, Args)]
pub struct EntryFilterArgs {
    /// Only the entry with this id.
    #[arg(long)]
    pub id: Option<String>,
    /// Only entries issuing this SPIFFE ID.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Only entries with this parent.
    #[arg(long)]
    pub parent_id: Option<String>,
    /// Only entries having this selector `type:value`; repeat for several.
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    pub selectors: Vec<String>,
    #[command(flatten)]
    pub common: Common,
}

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

/// `bundle ...`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust domain's bundle.
    Show(BundleShowArgs),
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// Concatenated PEM CERTIFICATE blocks of the X.509 authorities.
    Pem,
    /// SPIFFE bundle format (a JWK Set).
    Spiffe,
}

/// `bundle show`
#[derive(Debug, Clone, Args)]
pub struct BundleShowArgs {
    /// Bundle format (`--output json` prints the SPIFFE format).
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
    pub format: BundleFormat,
    #[command(flatten)]
    pub common: Common,
}

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
    /// Seconds the token stays valid, at most 31536000 (365 days) (default: the server's,
    /// 600).
    #[arg(long, value_name = "SECONDS")]
    pub ttl: Option<u64>,
    #[command(flatten)]
    pub common: Common,
}

/// `x509 ...`
#[derive(Debug, Subcommand)]
pub enum X509Command {
    /// Mint an X509-SVID for a key generated here (the key never leaves this process).
    Mint(X509MintArgs),
}

/// `x509 mint`
#[derive(Debug, Clone, Args)]
pub struct X509MintArgs {
    /// SPIFFE ID of the SVID.
    #[arg(long)]
    pub spiffe_id: String,
    /// Lifetime, e.g. 30s, 1h, at most 365 days (default: the server's).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// DNS name to add to the SVID; repeat for several.
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// Write svid.pem, svid.key (mode 0600) and bundle.pem into this directory instead
    /// of printing them.
    #[arg(long, value_name = "DIR")]
    pub write: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// `healthcheck`
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    pub common: Common,
}

// ---------------------------------------------------------------------------------------
// Views: what the commands print, as JSON and as text.

/// An entry as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    /// Entry id.
    pub id: String,
    /// SPIFFE ID issued.
    pub spiffe_id: String,
    /// Parent ID.
    pub parent_id: String,
    /// Selectors, `type:value`.
    pub selectors: Vec<String>,
    /// X509-SVID lifetime in seconds; `None` for the server default.
    pub x509_svid_ttl: Option<u64>,
    /// Extra DNS names.
    pub dns_names: Vec<String>,
    /// Hint.
    pub hint: String,
    /// Admin flag.
    pub admin: bool,
    /// Downstream flag.
    pub downstream: bool,
    /// Unix seconds at which the entry is deleted; `None` for never.
    pub expires_at: Option<i64>,
    /// Revision, bumped by every update.
    pub revision: u64,
    /// Unix seconds of creation.
    pub created_at: i64,
}

impl From<&types::Entry> for EntryView {
    fn from(e: &types::Entry) -> Self {
        EntryView {
            id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            parent_id: e.parent_id.clone(),
            selectors: e
                .selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect(),
            x509_svid_ttl: u64::try_from(e.x509_svid_ttl).ok().filter(|t| *t > 0),
            dns_names: e.dns_names.clone(),
            hint: e.hint.clone(),
            admin: e.admin,
            downstream: e.downstream,
            expires_at: (e.expires_at > 0).then_some(e.expires_at),
            revision: e.revision,
            created_at: e.created_at,
        }
    }
}

/// The entries of `entry show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryList {
    /// The entries found.
    pub entries: Vec<EntryView>,
}

/// The answer of `entry count`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountView {
    /// How many entries match.
    pub count: u64,
}

/// The answer of `entry delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedView {
    /// Id of the deleted entry.
    pub deleted: String,
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

/// A minted SVID: PEMs when printed, paths when written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintView {
    /// SPIFFE ID of the SVID.
    pub spiffe_id: String,
    /// Unix seconds at which it expires.
    pub expires_at: i64,
    /// The chain, PEM, leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svid_pem: Option<String>,
    /// The private key, PKCS#8 PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
    /// The bundle's X.509 authorities, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_pem: Option<String>,
    /// Where the chain was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svid_path: Option<PathBuf>,
    /// Where the key was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_path: Option<PathBuf>,
    /// Where the bundle was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_path: Option<PathBuf>,
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

// ---------------------------------------------------------------------------------------
// Pure formatting.

/// Unix seconds as RFC 3339 (UTC, seconds). Any stored value prints: one outside
/// 1970..=9999 (which RFC 3339 cannot write; older versions stored such values) prints as
/// `unix <n>`.
pub fn rfc3339(unix: i64) -> String {
    if !(0..=carapace_core::limits::MAX_UNIX_TIME).contains(&unix) {
        return format!("unix {unix} (outside 1970-01-01..9999-12-31)");
    }
    let t = UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

fn field(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{label:<17}: {value}");
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// One entry, SPIRE style (no trailing blank line).
pub fn format_entry_human(e: &EntryView) -> String {
    let mut out = String::new();
    field(&mut out, "Entry ID", &e.id);
    field(&mut out, "SPIFFE ID", &e.spiffe_id);
    field(&mut out, "Parent ID", &e.parent_id);
    field(&mut out, "Revision", e.revision);
    match e.x509_svid_ttl {
        Some(t) => field(
            &mut out,
            "X509-SVID TTL",
            humantime::format_duration(Duration::from_secs(t)),
        ),
        None => field(&mut out, "X509-SVID TTL", "default"),
    }
    for s in &e.selectors {
        field(&mut out, "Selector", s);
    }
    for d in &e.dns_names {
        field(&mut out, "DNS name", d);
    }
    if !e.hint.is_empty() {
        field(&mut out, "Hint", &e.hint);
    }
    if e.admin {
        field(&mut out, "Admin", true);
    }
    if e.downstream {
        field(&mut out, "Downstream", true);
    }
    if let Some(t) = e.expires_at {
        field(&mut out, "Expires at", rfc3339(t));
    }
    out
}

/// `Found N entries` then each entry, separated by blank lines.
pub fn format_entries_human(entries: &[EntryView]) -> String {
    let n = entries.len();
    let mut out = format!("Found {n} {}\n", plural(n, "entry", "entries"));
    for e in entries {
        out.push_str(&format_entry_human(e));
        out.push('\n');
    }
    out
}

/// `N registration entries`.
pub fn format_count_human(count: u64) -> String {
    let word = if count == 1 { "entry" } else { "entries" };
    format!("{count} registration {word}\n")
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

/// `Token: ...`, `Agent ID: ...`, `Expires: ...`.
pub fn format_token_human(t: &TokenView) -> String {
    format!(
        "Token: {}\nAgent ID: {}\nExpires: {}\n",
        t.token,
        t.agent_id,
        rfc3339(t.expires_at)
    )
}

/// The minted SVID, key and bundle as PEM (like `spire-server x509 mint`), or where they
/// were written.
pub fn format_mint_human(m: &MintView) -> String {
    let mut out = String::new();
    if let (Some(svid), Some(key), Some(bundle)) = (&m.svid_pem, &m.key_pem, &m.bundle_pem) {
        let _ = write!(
            out,
            "X509-SVID:\n{svid}\nPrivate key:\n{key}\nRoot CAs:\n{bundle}"
        );
    }
    for (what, path) in [
        ("X509-SVID", &m.svid_path),
        ("Private key", &m.key_path),
        ("Root CAs", &m.bundle_path),
    ] {
        if let Some(p) = path {
            let _ = writeln!(out, "{what} written to {}", p.display());
        }
    }
    out
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| Error::InvalidArgument(format!("cannot encode the output as JSON: {e}")))
}

fn render<T: Serialize>(
    output: OutputFormat,
    v: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<String> {
    match output {
        OutputFormat::Human => Ok(human(v)),
        OutputFormat::Json => json(v),
    }
}

// ---------------------------------------------------------------------------------------
// Input checks.

/// `--expires-at`: unix seconds, or RFC 3339 in UTC.
fn parse_expires_at(s: &str) -> std::result::Result<i64, String> {
    let t = match s.parse::<i64>() {
        Ok(t) => t,
        Err(_) => humantime::parse_rfc3339_weak(s)
            .map_err(|e| format!("expected unix seconds or RFC 3339 (2030-01-01T00:00:00Z): {e}"))?
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "must be after 1970".to_owned())
            .and_then(|d| i64::try_from(d.as_secs()).map_err(|_| "out of range".to_owned()))?,
    };
    if t <= 0 {
        return Err("must be after 1970".into());
    }
    carapace_core::limits::check_unix_time(t)?;
    Ok(t)
}

fn bad_flag(cmd: &str, flag: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{cmd}: {flag}: {e}"))
}

fn spiffe_id(cmd: &str, flag: &str, s: &str) -> Result<SpiffeId> {
    SpiffeId::from_str(s).map_err(|e| bad_flag(cmd, flag, e))
}

fn selectors(cmd: &str, v: &[String]) -> Result<Vec<types::Selector>> {
    v.iter()
        .map(|s| {
            Selector::from_str(s)
                .map(|s| types::Selector::from(&s))
                .map_err(|e| bad_flag(cmd, "--selector", e))
        })
        .collect()
}

fn entry_id(cmd: &str, s: &str) -> Result<EntryId> {
    EntryId::new(s).map_err(|e| bad_flag(cmd, "--id", e))
}

fn dns_names(cmd: &str, v: &[String]) -> Result<()> {
    for n in v {
        validate_dns_name(n)
            .map_err(|reason| bad_flag(cmd, "--dns-name", format!("{n:?}: {reason}")))?;
    }
    Ok(())
}

/// A TTL flag in whole seconds for the wire (0: the server's default), within `1s..=max`.
fn ttl_secs(cmd: &str, flag: &str, ttl: Option<Duration>, max: Duration) -> Result<i64> {
    match ttl {
        None => Ok(0),
        Some(d) if d.as_secs() == 0 => Err(bad_flag(cmd, flag, "must be at least one second")),
        Some(d) => {
            carapace_core::limits::check_duration(d, Duration::from_secs(1), max)
                .map_err(|e| bad_flag(cmd, flag, e))?;
            i64::try_from(d.as_secs()).map_err(|_| bad_flag(cmd, flag, "too large"))
        }
    }
}

impl EntryFields {
    /// The entry to send, every field checked.
    fn to_wire(&self, cmd: &str, id: String) -> Result<types::Entry> {
        let parent_id = spiffe_id(cmd, "--parent-id", &self.parent_id)?;
        let spiffe = spiffe_id(cmd, "--spiffe-id", &self.spiffe_id)?;
        if self.selectors.is_empty() {
            return Err(bad_flag(
                cmd,
                "--selector",
                "at least one selector is required",
            ));
        }
        let selectors = selectors(cmd, &self.selectors)?;
        dns_names(cmd, &self.dns_names)?;
        Ok(types::Entry {
            id,
            spiffe_id: spiffe.to_string(),
            parent_id: parent_id.to_string(),
            selectors,
            x509_svid_ttl: ttl_secs(
                cmd,
                "--x509-svid-ttl",
                self.x509_svid_ttl,
                carapace_core::limits::MAX_X509_SVID_TTL,
            )?,
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone().unwrap_or_default(),
            admin: self.admin,
            downstream: self.downstream,
            expires_at: self.expires_at.unwrap_or(0),
            revision: 0,
            created_at: 0,
        })
    }
}

impl EntryFilterArgs {
    fn to_wire(&self, cmd: &str) -> Result<ListEntriesRequest> {
        Ok(ListEntriesRequest {
            id: match &self.id {
                Some(id) => entry_id(cmd, id)?.to_string(),
                None => String::new(),
            },
            spiffe_id: match &self.spiffe_id {
                Some(s) => spiffe_id(cmd, "--spiffe-id", s)?.to_string(),
                None => String::new(),
            },
            parent_id: match &self.parent_id {
                Some(s) => spiffe_id(cmd, "--parent-id", s)?.to_string(),
                None => String::new(),
            },
            selectors: selectors(cmd, &self.selectors)?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The connection.

/// Connects to the admin socket: only to a process of this uid or `server_uid`.
pub(crate) async fn connect(
    socket: &Path,
    server_uid: Option<u32>,
) -> Result<AdminClient<Channel>> {
    let unreachable = |detail: String| Error::Io {
        context: format!(
            "cannot reach the server's admin socket {}",
            socket.display()
        ),
        source: std::io::Error::other(format!(
            "{detail} (is carapace-server running? is --admin-socket right?)"
        )),
    };
    let refused = |detail: String| {
        Error::PermissionDenied(format!(
            "refusing the admin socket {}: {detail}",
            socket.display()
        ))
    };
    let mut expected = vec![carapace_common::euid()];
    expected.extend(server_uid);
    // Defence in depth: the path must be one only root or the server could have made
    // (the peer check below is what decides).
    if let Err(e) = std::fs::symlink_metadata(socket) {
        return Err(unreachable(e.to_string()));
    }
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        carapace_common::check_socket_dir(dir, &expected, false).map_err(refused)?;
    }
    let channel = carapace_common::uds_channel_checked(socket, Some(CALL_TIMEOUT), expected)
        .await
        .map_err(|e| match carapace_common::UnexpectedPeer::find(&e) {
            Some(p) => refused(format!(
                "{p} (if the server runs as uid {uid}, pass --server-uid {uid})",
                uid = p.uid
            )),
            None => unreachable(error_chain(&e)),
        })?;
    Ok(AdminClient::new(channel))
}

/// A server answer turned into the CLI's error: the server's message, after the command.
fn status_error(cmd: &str, s: &Status) -> Error {
    let msg = format!("{cmd}: {}", s.message());
    match s.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            Error::InvalidArgument(msg)
        }
        Code::NotFound => Error::NotFound(msg),
        Code::AlreadyExists => Error::AlreadyExists(msg),
        Code::PermissionDenied => Error::PermissionDenied(msg),
        Code::Unauthenticated => Error::Unauthenticated(msg),
        code => Error::Io {
            context: cmd.to_owned(),
            source: std::io::Error::other(format!("server error ({code:?}): {}", s.message())),
        },
    }
}

// ---------------------------------------------------------------------------------------
// The commands.

/// Runs an admin command; returns what to print on stdout (ending with a newline).
pub async fn execute(cmd: AdminCommand) -> Result<String> {
    match cmd {
        AdminCommand::Entry(c) => match c {
            EntryCommand::Create(a) => entry_create(a).await,
            EntryCommand::Show(a) => entry_show(a).await,
            EntryCommand::Update(a) => entry_update(a).await,
            EntryCommand::Delete(a) => entry_delete(a).await,
            EntryCommand::Count(a) => entry_count(a).await,
        },
        AdminCommand::Agent(c) => match c {
            AgentCommand::List(a) => agent_list(a).await,
            AgentCommand::Show(a) => agent_show(a).await,
            AgentCommand::Ban(a) => agent_ban(a).await,
            AgentCommand::Evict(a) => agent_evict(a).await,
        },
        AdminCommand::Bundle(BundleCommand::Show(a)) => bundle_show(a).await,
        AdminCommand::Token(TokenCommand::Generate(a)) => token_generate(a).await,
        AdminCommand::X509(X509Command::Mint(a)) => x509_mint(a).await,
        AdminCommand::Healthcheck(a) => healthcheck(a).await,
    }
}

async fn entry_create(a: EntryCreateArgs) -> Result<String> {
    const CMD: &str = "entry create";
    let entry = a.fields.to_wire(CMD, String::new())?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let e = client
        .create_entry(CreateEntryRequest { entry: Some(entry) })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &EntryView::from(&e), format_entry_human)
}

async fn entry_update(a: EntryUpdateArgs) -> Result<String> {
    const CMD: &str = "entry update";
    let id = entry_id(CMD, &a.id)?;
    let entry = a.fields.to_wire(CMD, id.to_string())?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let e = client
        .update_entry(UpdateEntryRequest { entry: Some(entry) })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &EntryView::from(&e), format_entry_human)
}

async fn entry_delete(a: EntryDeleteArgs) -> Result<String> {
    const CMD: &str = "entry delete";
    let id = entry_id(CMD, &a.id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    client
        .delete_entry(DeleteEntryRequest { id: id.to_string() })
        .await
        .map_err(|s| status_error(CMD, &s))?;
    render(
        a.common.output,
        &DeletedView {
            deleted: id.to_string(),
        },
        |d| format!("Deleted entry {}\n", d.deleted),
    )
}

async fn entry_show(a: EntryFilterArgs) -> Result<String> {
    const CMD: &str = "entry show";
    let req = a.to_wire(CMD)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .list_entries(req)
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let list = EntryList {
        entries: resp.entries.iter().map(EntryView::from).collect(),
    };
    render(a.common.output, &list, |l| format_entries_human(&l.entries))
}

async fn entry_count(a: EntryFilterArgs) -> Result<String> {
    const CMD: &str = "entry count";
    let req = a.to_wire(CMD)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .count_entries(req)
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &CountView { count: resp.count }, |c| {
        format_count_human(c.count)
    })
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

async fn bundle_show(a: BundleShowArgs) -> Result<String> {
    const CMD: &str = "bundle show";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let wire = client
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let bundle = bundle_from_wire(&wire)
        .map_err(|e| Error::InvalidArgument(format!("{CMD}: the server sent {e}")))?;
    let format = if a.common.output == OutputFormat::Json {
        BundleFormat::Spiffe
    } else {
        a.format
    };
    match format {
        BundleFormat::Pem => Ok(bundle.to_pem()),
        BundleFormat::Spiffe => Ok(bundle.to_spiffe_json()? + "\n"),
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
        a.ttl.map(Duration::from_secs),
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

async fn x509_mint(a: X509MintArgs) -> Result<String> {
    const CMD: &str = "x509 mint";
    let id = spiffe_id(CMD, "--spiffe-id", &a.spiffe_id)?;
    dns_names(CMD, &a.dns_names)?;
    let ttl = ttl_secs(
        CMD,
        "--ttl",
        a.ttl,
        carapace_core::limits::MAX_X509_SVID_TTL,
    )?;
    let key = rcgen::KeyPair::generate()
        .map_err(|e| Error::Ca(format!("{CMD}: generating a key: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| Error::Ca(format!("{CMD}: building the CSR: {e}")))?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .mint_x509svid(MintX509svidRequest {
            spiffe_id: id.to_string(),
            csr: csr.der().to_vec(),
            ttl,
            dns_names: a.dns_names.clone(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let incomplete =
        || Error::InvalidArgument(format!("{CMD}: the server sent an incomplete answer"));
    let svid = resp.svid.ok_or_else(incomplete)?;
    let leaf = svid.cert_chain.first().ok_or_else(incomplete)?;
    if carapace_core::x509svid::public_key_of(leaf)?
        != rcgen::PublicKeyData::subject_public_key_info(&key)
    {
        return Err(Error::InvalidArgument(format!(
            "{CMD}: the server certified a key that is not ours"
        )));
    }
    let bundle = bundle_from_wire(&resp.bundle.ok_or_else(incomplete)?)
        .map_err(|e| Error::InvalidArgument(format!("{CMD}: the server sent {e}")))?;
    let svid_pem: String = svid.cert_chain.iter().map(|c| der_to_pem(c)).collect();
    let key_pem = Zeroizing::new(key.serialize_pem());
    let bundle_pem = bundle.to_pem();
    let mut view = MintView {
        spiffe_id: id.to_string(),
        expires_at: svid.expires_at,
        svid_pem: None,
        key_pem: None,
        bundle_pem: None,
        svid_path: None,
        key_path: None,
        bundle_path: None,
    };
    match &a.write {
        Some(dir) => {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(Error::io(format!("{CMD}: creating {}", dir.display())))?;
            }
            let (svid_path, key_path, bundle_path) = (
                dir.join("svid.pem"),
                dir.join("svid.key"),
                dir.join("bundle.pem"),
            );
            write_file(&svid_path, 0o644, svid_pem.as_bytes())?;
            write_file(&key_path, 0o600, key_pem.as_bytes())?;
            write_file(&bundle_path, 0o644, bundle_pem.as_bytes())?;
            view.svid_path = Some(svid_path);
            view.key_path = Some(key_path);
            view.bundle_path = Some(bundle_path);
        }
        None => {
            view.svid_pem = Some(svid_pem);
            view.key_pem = Some(key_pem.as_str().to_owned());
            view.bundle_pem = Some(bundle_pem);
        }
    }
    render(a.common.output, &view, format_mint_human)
}

/// Writes `data` to `path` with `mode`: into a new file next to it, created with that
/// mode before any byte is written (never following a symlink), then renamed over
/// `path`.
fn write_file(path: &Path, mode: u32, data: &[u8]) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(Error::io(ctx()))?;
        // Exactly `mode`, whatever the umask.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(Error::io(ctx()))?;
        f.write_all(data).map_err(Error::io(ctx()))?;
        f.sync_all().map_err(Error::io(ctx()))?;
        std::fs::rename(&tmp, path).map_err(Error::io(ctx()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn healthcheck(a: HealthcheckArgs) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: AdminCommand,
    }

    fn parse(args: &[&str]) -> std::result::Result<AdminCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("carapace-server").chain(args.iter().copied()))
            .map(|c| c.cmd)
    }

    fn entry() -> EntryView {
        EntryView {
            id: "0b5e".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/spire/agent/join_token/aa".into(),
            selectors: vec!["unix:uid:1000".into(), "unix:user:www".into()],
            x509_svid_ttl: None,
            dns_names: vec![],
            hint: String::new(),
            admin: false,
            downstream: false,
            expires_at: None,
            revision: 0,
            created_at: 1,
        }
    }

    #[test]
    fn entry_human_format_is_spire_like() {
        assert_eq!(
            format_entry_human(&entry()),
            "Entry ID         : 0b5e\n\
             SPIFFE ID        : spiffe://example.org/web\n\
             Parent ID        : spiffe://example.org/spire/agent/join_token/aa\n\
             Revision         : 0\n\
             X509-SVID TTL    : default\n\
             Selector         : unix:uid:1000\n\
             Selector         : unix:user:www\n"
        );
        let full = EntryView {
            x509_svid_ttl: Some(5400),
            dns_names: vec!["web.example.org".into()],
            hint: "web".into(),
            admin: true,
            downstream: true,
            expires_at: Some(1_893_456_000),
            revision: 3,
            ..entry()
        };
        let out = format_entry_human(&full);
        for line in [
            "Revision         : 3\n",
            "X509-SVID TTL    : 1h 30m\n",
            "DNS name         : web.example.org\n",
            "Hint             : web\n",
            "Admin            : true\n",
            "Downstream       : true\n",
            "Expires at       : 2030-01-01T00:00:00Z\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from\n{out}");
        }
    }

    #[test]
    fn entry_lists_and_counts() {
        assert_eq!(format_entries_human(&[]), "Found 0 entries\n");
        let one = format_entries_human(&[entry()]);
        assert!(
            one.starts_with("Found 1 entry\nEntry ID         : 0b5e\n"),
            "{one}"
        );
        assert!(one.ends_with("unix:user:www\n\n"), "{one}");
        let two = format_entries_human(&[entry(), entry()]);
        assert!(two.starts_with("Found 2 entries\n"));
        assert_eq!(two.matches("Entry ID").count(), 2);
        assert!(
            two.contains("unix:user:www\n\nEntry ID"),
            "entries are separated by a blank line"
        );
        assert_eq!(format_count_human(1), "1 registration entry\n");
        assert_eq!(format_count_human(3), "3 registration entries\n");
    }

    #[test]
    fn entry_json_round_trips_with_nulls_for_defaults() {
        let v: serde_json::Value = serde_json::from_str(&json(&entry()).unwrap()).unwrap();
        assert_eq!(v["x509_svid_ttl"], serde_json::Value::Null);
        assert_eq!(v["expires_at"], serde_json::Value::Null);
        assert_eq!(v["selectors"][0], "unix:uid:1000");
        let back: EntryView = serde_json::from_value(v).unwrap();
        assert_eq!(back, entry());
        // From the wire: 0 means "default" / "never".
        let wire = types::Entry {
            x509_svid_ttl: 0,
            expires_at: 0,
            ..Default::default()
        };
        let view = EntryView::from(&wire);
        assert_eq!((view.x509_svid_ttl, view.expires_at), (None, None));
    }

    #[test]
    fn agent_token_and_mint_formats() {
        let a = AgentView {
            spiffe_id: "spiffe://example.org/spire/agent/join_token/aa".into(),
            attestor: "join_token".into(),
            serial: "0a1b".into(),
            expires_at: 0,
            attested_at: 0,
            banned: true,
            reattestable: false,
            refused_at: None,
            refused_reason: None,
            selectors: vec!["region:eu".into()],
        };
        let out = format_agents_human(std::slice::from_ref(&a));
        assert!(!out.contains("Attestation lost"), "{out}");
        let lost = AgentView {
            refused_at: Some(60),
            refused_reason: Some("PCR 7 has value 00".into()),
            ..a.clone()
        };
        assert!(
            format_agent_human(&lost)
                .contains("Attestation lost : 1970-01-01T00:01:00Z (PCR 7 has value 00)\n"),
            "{}",
            format_agent_human(&lost)
        );
        assert!(
            out.starts_with("Found 1 attested agent\n\nSPIFFE ID        : spiffe://"),
            "{out}"
        );
        for line in [
            "Attestation type : join_token\n",
            "Serial number    : 0a1b\n",
            "Expires at       : 1970-01-01T00:00:00Z\n",
            "Banned           : true\n",
            "Selector         : region:eu\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from\n{out}");
        }
        let t = TokenView {
            token: "ab.cd".into(),
            agent_id: "spiffe://x/y".into(),
            expires_at: 0,
        };
        assert_eq!(
            format_token_human(&t),
            "Token: ab.cd\nAgent ID: spiffe://x/y\nExpires: 1970-01-01T00:00:00Z\n"
        );
        let mut m = MintView {
            spiffe_id: "spiffe://example.org/w".into(),
            expires_at: 0,
            svid_pem: Some("S\n".into()),
            key_pem: Some("K\n".into()),
            bundle_pem: Some("B\n".into()),
            svid_path: None,
            key_path: None,
            bundle_path: None,
        };
        assert_eq!(
            format_mint_human(&m),
            "X509-SVID:\nS\n\nPrivate key:\nK\n\nRoot CAs:\nB\n"
        );
        m.svid_pem = None;
        m.key_path = Some("/d/svid.key".into());
        assert_eq!(
            format_mint_human(&m),
            "Private key written to /d/svid.key\n"
        );
        // Paths only in JSON when written: no empty PEM fields.
        let v: serde_json::Value = serde_json::from_str(&json(&m).unwrap()).unwrap();
        assert!(v.get("svid_pem").is_none());
        assert_eq!(v["key_path"], "/d/svid.key");
    }

    #[test]
    fn human_output_never_panics_on_any_stored_time() {
        for t in [
            i64::MIN,
            -1,
            0,
            1,
            carapace_core::limits::MAX_UNIX_TIME,
            carapace_core::limits::MAX_UNIX_TIME + 1,
            99_999_999_999_999,
            i64::MAX,
        ] {
            let s = rfc3339(t);
            assert!(!s.is_empty());
        }
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(carapace_core::limits::MAX_UNIX_TIME),
            "9999-12-31T23:59:59Z"
        );
        assert_eq!(
            rfc3339(99_999_999_999_999),
            "unix 99999999999999 (outside 1970-01-01..9999-12-31)"
        );
        let e = EntryView {
            x509_svid_ttl: Some(u64::MAX),
            expires_at: Some(i64::MAX),
            ..entry()
        };
        let out = format_entry_human(&e);
        assert!(out.contains("unix 9223372036854775807"), "{out}");
        let a = AgentView {
            spiffe_id: "spiffe://example.org/spire/agent/x".into(),
            attestor: "join_token".into(),
            serial: "01".into(),
            expires_at: i64::MIN,
            banned: false,
            selectors: vec![],
            attested_at: i64::MAX,
            reattestable: false,
            refused_at: Some(i64::MIN),
            refused_reason: Some(String::new()),
        };
        assert!(format_agent_human(&a).contains("unix -9223372036854775808"));
        let t = TokenView {
            token: "t".into(),
            agent_id: "spiffe://example.org/spire/agent/x".into(),
            expires_at: i64::MAX,
        };
        assert!(format_token_human(&t).contains("unix 9223372036854775807"));
    }

    #[test]
    fn expires_at_is_bounded_by_what_x509_can_write() {
        assert_eq!(
            parse_expires_at("253402300799"),
            Ok(carapace_core::limits::MAX_UNIX_TIME)
        );
        for bad in ["253402300800", "99999999999999", "9223372036854775807"] {
            let e = parse_expires_at(bad).unwrap_err();
            assert!(e.contains("9999-12-31T23:59:59Z"), "{bad}: {e}");
        }
    }

    #[test]
    fn expires_at_accepts_unix_seconds_and_rfc3339() {
        assert_eq!(parse_expires_at("1893456000"), Ok(1_893_456_000));
        assert_eq!(parse_expires_at("2030-01-01T00:00:00Z"), Ok(1_893_456_000));
        assert!(parse_expires_at("0").is_err());
        assert!(
            parse_expires_at("tomorrow")
                .unwrap_err()
                .contains("RFC 3339")
        );
    }

    #[test]
    fn command_line_shape() {
        let cmd = parse(&[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/a",
            "--spiffe-id",
            "spiffe://example.org/b",
            "--selector",
            "unix:uid:1",
            "--selector",
            "unix:gid:2",
            "--x509-svid-ttl",
            "1h",
            "--dns-name",
            "b.example",
            "--admin",
            "--expires-at",
            "2030-01-01T00:00:00Z",
            "--admin-socket",
            "/s",
            "--output",
            "json",
        ])
        .unwrap();
        let AdminCommand::Entry(EntryCommand::Create(a)) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(a.fields.selectors, ["unix:uid:1", "unix:gid:2"]);
        assert_eq!(a.fields.x509_svid_ttl, Some(Duration::from_secs(3600)));
        assert_eq!(a.fields.expires_at, Some(1_893_456_000));
        assert!(a.fields.admin && !a.fields.downstream);
        assert_eq!(a.common.admin_socket, PathBuf::from("/s"));
        assert_eq!(a.common.output, OutputFormat::Json);
        let wire = a.fields.to_wire("entry create", String::new()).unwrap();
        assert_eq!(wire.x509_svid_ttl, 3600);
        assert_eq!(
            wire.selectors[1],
            types::Selector {
                r#type: "unix".into(),
                value: "gid:2".into()
            }
        );

        // --selector is required on create; a bad duration names its flag.
        let err = parse(&[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/a",
            "--spiffe-id",
            "spiffe://example.org/b",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--selector"), "{err}");
        let err = parse(&[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/a",
            "--spiffe-id",
            "spiffe://example.org/b",
            "--selector",
            "unix:uid:1",
            "--x509-svid-ttl",
            "soon",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--x509-svid-ttl"), "{err}");

        for args in [
            &["entry", "show", "--selector", "unix:uid:1"][..],
            &[
                "entry",
                "update",
                "--id",
                "x",
                "--parent-id",
                "spiffe://e/a",
                "--spiffe-id",
                "spiffe://e/b",
                "--selector",
                "a:b",
            ],
            &["entry", "delete", "--id", "x"],
            &["entry", "count"],
            &["agent", "list"],
            &["agent", "show", "--spiffe-id", "spiffe://e/a"],
            &["agent", "ban", "--spiffe-id", "spiffe://e/a"],
            &["agent", "evict", "--spiffe-id", "spiffe://e/a"],
            &["bundle", "show", "--format", "spiffe"],
            &[
                "token",
                "generate",
                "--spiffe-id",
                "spiffe://e/a",
                "--ttl",
                "60",
            ],
            &[
                "x509",
                "mint",
                "--spiffe-id",
                "spiffe://e/a",
                "--ttl",
                "5m",
                "--write",
                "/tmp/x",
            ],
            &["healthcheck", "--output", "json"],
        ] {
            parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(parse(&["token", "generate", "--ttl", "-5"]).is_err());
    }

    #[test]
    fn client_side_checks_name_the_flag() {
        let fields = |parent: &str, spiffe: &str, sel: &[&str]| EntryFields {
            parent_id: parent.into(),
            spiffe_id: spiffe.into(),
            selectors: sel.iter().map(|s| s.to_string()).collect(),
            x509_svid_ttl: None,
            dns_names: vec![],
            hint: None,
            admin: false,
            downstream: false,
            expires_at: None,
        };
        let err = |f: EntryFields| {
            f.to_wire("entry create", String::new())
                .unwrap_err()
                .to_string()
        };
        let e = err(fields(
            "spiffe://example.org/a",
            "not-an-id",
            &["unix:uid:1"],
        ));
        assert!(
            e.starts_with("entry create: --spiffe-id: invalid SPIFFE ID"),
            "{e}"
        );
        let e = err(fields(
            "spiffe://Example.org/a",
            "spiffe://example.org/b",
            &["unix:uid:1"],
        ));
        assert!(e.contains("--parent-id"), "{e}");
        let e = err(fields(
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            &["unix:uuid:0"],
        ));
        assert!(
            e.contains("--selector") && e.contains("unknown unix selector"),
            "{e}"
        );
        let e = err(fields(
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            &[],
        ));
        assert!(e.contains("--selector") && e.contains("required"), "{e}");
        let mut f = fields(
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            &["unix:uid:1"],
        );
        f.dns_names = vec!["bad name".into()];
        assert!(err(f.clone()).contains("--dns-name"));
        f.dns_names.clear();
        f.x509_svid_ttl = Some(Duration::from_millis(500));
        assert!(err(f).contains("--x509-svid-ttl"));
    }
}
