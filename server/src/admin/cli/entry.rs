//! `entry create|show|update|delete|count`: registration entries.
//!
//! `entry create --data FILE` reads many entries from JSON in SPIRE's `-data` format
//! (see [`data`]), checks all of them, then sends them in batches of at most
//! [`MAX_BATCH_ENTRIES`], one `BatchCreateEntry` call (one server transaction) each, in
//! file order, stopping at the first batch the server refuses. The batches before it
//! stay written; the error says which were written, which was refused and why, and
//! which were not sent.

mod data;

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use carapace_proto::admin::{
    BatchCreateEntryRequest, CreateEntryRequest, DeleteEntryRequest, ListEntriesRequest,
    UpdateEntryRequest,
};
use carapace_proto::types;

use super::client::{connect, status_error};
use super::flags::{
    Common, bad_flag, dns_names, entry_id, parse_expires_at, selectors, spiffe_id, trust_domain,
    ttl_secs,
};
use super::view::{OutputFormat, field, plural, render, rfc3339};
use crate::entry_cache::MAX_BATCH_ENTRIES;
use crate::{Error, Result};

/// `entry ...`
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create a registration entry (its id is assigned by the server), or with --data
    /// the entries of a JSON file.
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
    /// X509-SVID lifetime: seconds (3600) or with units (30s, 1h), at most 365 days
    /// (default: the server's).
    #[arg(long, value_name = "DURATION", value_parser = carapace_common::parse_duration_flag)]
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime: seconds (300) or with units (5m, 1h), at most 1 day (default:
    /// the server's default_jwt_svid_ttl, 5m unless configured).
    #[arg(long, value_name = "DURATION", value_parser = carapace_common::parse_duration_flag)]
    pub jwt_svid_ttl: Option<Duration>,
    /// Put a unique `jti` (JWT ID) claim in every JWT-SVID of this entry, for audiences
    /// that refuse a token they have seen before.
    #[arg(long)]
    pub jwt_svid_include_jti: bool,
    /// DNS name to add to the SVID; repeat for several (the first becomes the CN).
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// A foreign trust domain (spiffe://td or td) whose bundle the entry's workloads
    /// receive with their SVIDs, to authenticate its workloads; repeat for several
    /// (SPIRE's -federatesWith). Its bundle comes from a `federation` relationship or a
    /// `bundle set`; one that has none yet is accepted, and sent once it exists.
    #[arg(long = "federates-with", value_name = "TRUST_DOMAIN")]
    pub federates_with: Vec<String>,
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

/// `entry create`: one entry from flags, or many from `--data`.
#[derive(Debug, Clone, Args)]
pub struct EntryCreateArgs {
    /// Create the entries of this JSON file (`-` for standard input), in the format of
    /// SPIRE's `entry create -data`: {"entries": [{"spiffe_id": .., "parent_id": ..,
    /// "selectors": [{"type": .., "value": ..}], ...}]}. Sent in batches of at most
    /// 1,000 entries, each written whole or not at all; a refused batch stops the
    /// command, and the batches before it stay written.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "parent_id", "spiffe_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl",
        "jwt_svid_include_jti", "dns_names", "federates_with", "hint", "admin", "downstream",
        "expires_at",
    ])]
    pub data: Option<PathBuf>,
    /// The entry's fields (without --data).
    #[command(flatten)]
    pub fields: Option<EntryFields>,
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
    /// JWT-SVID lifetime in seconds; `None` for the server default.
    #[serde(default)]
    pub jwt_svid_ttl: Option<u64>,
    /// Whether its JWT-SVIDs carry a `jti` claim.
    #[serde(default)]
    pub jwt_svid_include_jti: bool,
    /// Extra DNS names.
    pub dns_names: Vec<String>,
    /// Foreign trust domains whose bundles its workloads receive (names).
    #[serde(default)]
    pub federates_with: Vec<String>,
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
            jwt_svid_ttl: u64::try_from(e.jwt_svid_ttl).ok().filter(|t| *t > 0),
            jwt_svid_include_jti: e.jwt_svid_include_jti,
            dns_names: e.dns_names.clone(),
            federates_with: e.federates_with.clone(),
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

/// One entry, SPIRE style (no trailing blank line).
pub fn format_entry_human(e: &EntryView) -> String {
    let mut out = String::new();
    field(&mut out, "Entry ID", &e.id);
    field(&mut out, "SPIFFE ID", &e.spiffe_id);
    field(&mut out, "Parent ID", &e.parent_id);
    field(&mut out, "Revision", e.revision);
    for (label, ttl) in [
        ("X509-SVID TTL", e.x509_svid_ttl),
        ("JWT-SVID TTL", e.jwt_svid_ttl),
    ] {
        match ttl {
            Some(t) => field(
                &mut out,
                label,
                humantime::format_duration(Duration::from_secs(t)),
            ),
            None => field(&mut out, label, "default"),
        }
    }
    if e.jwt_svid_include_jti {
        field(&mut out, "JWT-SVID jti", true);
    }
    for s in &e.selectors {
        field(&mut out, "Selector", s);
    }
    for d in &e.dns_names {
        field(&mut out, "DNS name", d);
    }
    for td in &e.federates_with {
        field(&mut out, "FederatesWith", td);
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

impl EntryFields {
    /// The entry to send, every field checked.
    pub(super) fn to_wire(&self, cmd: &str, id: String) -> Result<types::Entry> {
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
        let federates_with = self
            .federates_with
            .iter()
            .map(|td| trust_domain(cmd, "--federates-with", td).map(|td| td.name().to_owned()))
            .collect::<Result<Vec<_>>>()?;
        Ok(types::Entry {
            federates_with,
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
            jwt_svid_ttl: ttl_secs(
                cmd,
                "--jwt-svid-ttl",
                self.jwt_svid_ttl,
                carapace_core::limits::MAX_JWT_SVID_TTL,
            )?,
            jwt_svid_include_jti: self.jwt_svid_include_jti,
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
    /// The filter to send, every field checked.
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

/// Runs an `entry` subcommand; returns what to print.
pub(super) async fn run(cmd: EntryCommand) -> Result<String> {
    match cmd {
        EntryCommand::Create(a) => entry_create(a).await,
        EntryCommand::Show(a) => entry_show(a).await,
        EntryCommand::Update(a) => entry_update(a).await,
        EntryCommand::Delete(a) => entry_delete(a).await,
        EntryCommand::Count(a) => entry_count(a).await,
    }
}

async fn entry_create(a: EntryCreateArgs) -> Result<String> {
    const CMD: &str = "entry create";
    let fields = match (&a.data, &a.fields) {
        (Some(path), _) => return entry_create_data(path, &a.common).await,
        (None, Some(fields)) => fields,
        (None, None) => {
            return Err(Error::InvalidArgument(format!(
                "{CMD}: give --parent-id, --spiffe-id and --selector, or --data FILE"
            )));
        }
    };
    let entry = fields.to_wire(CMD, String::new())?;
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

/// The entries of a `--data` file (`-`: standard input), every one checked, no two
/// alike. Errors name the file and the entry (`entries[12].selectors[0]`).
pub(super) fn read_data(path: &std::path::Path) -> Result<Vec<types::Entry>> {
    const CMD: &str = "entry create";
    let shown = path.display();
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(Error::io(format!(
                "{CMD}: reading --data from standard input"
            )))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(Error::io(format!("{CMD}: reading --data {shown}")))?
    };
    let prefix = |e: Error| Error::InvalidArgument(format!("{CMD}: --data {shown}: {e}"));
    let entries = data::parse_entries(&text).map_err(prefix)?;
    data::first_duplicate(&entries).map_err(prefix)?;
    Ok(entries)
}

/// What `entry create --data` created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CreatedView {
    /// The entries created, in file order.
    pub entries: Vec<EntryView>,
}

/// `Created N entries in B batches`.
pub(super) fn format_created_human(n: usize, batches: usize) -> String {
    format!(
        "Created {n} {} in {batches} {}\n",
        plural(n, "entry", "entries"),
        plural(batches, "batch", "batches")
    )
}

/// The error of a `--data` run stopped by batch `b` (0-based) of `batches`, whose
/// first entry is `entries[offset]`: what was written, what was refused and why (one
/// line per refused entry: its position in the file, SPIFFE ID and the server's
/// reason), and what was not sent.
pub(super) fn refused_batch_error(
    batches: &[std::ops::Range<usize>],
    b: usize,
    sent: &[types::Entry],
    results: &[carapace_proto::admin::BatchCreateEntryResult],
) -> Error {
    use std::fmt::Write as _;
    let range =
        |r: &std::ops::Range<usize>| format!("entries[{}..={}]", r.start, r.end.saturating_sub(1));
    let Some(this) = batches.get(b) else {
        return Error::InvalidArgument("entry create: no such batch".into());
    };
    let mut out = String::from("entry create: ");
    if b == 0 {
        out.push_str("nothing written");
    } else {
        let written = this.start;
        let which = if b == 1 {
            "batch 1".to_owned()
        } else {
            format!("batches 1-{b}")
        };
        let _ = write!(
            out,
            "{which} written ({written} {}, {}); ",
            plural(written, "entry", "entries"),
            range(&(0..written))
        );
    }
    let _ = write!(
        out,
        "{}batch {} of {} ({}) refused, nothing of it written:",
        if b == 0 { "; " } else { "" },
        b + 1,
        batches.len(),
        range(this)
    );
    for r in results.iter().filter(|r| r.code != 0) {
        let i = r.index as usize;
        let id = sent.get(i).map_or("", |e| e.spiffe_id.as_str());
        let _ = write!(out, "\n  entries[{}] ({id}): {}", this.start + i, r.message);
    }
    if b + 1 < batches.len() {
        let rest = batches.len() - b - 1;
        let from = batches.get(b + 1).map_or(0, |r| r.start);
        let total = batches.last().map_or(0, |r| r.end);
        let _ = write!(
            out,
            "\n{rest} later {} ({}) not sent",
            plural(rest, "batch", "batches"),
            range(&(from..total))
        );
    }
    Error::InvalidArgument(out)
}

/// `entry create --data`: read and check the file, then one call per batch.
async fn entry_create_data(path: &std::path::Path, common: &Common) -> Result<String> {
    const CMD: &str = "entry create";
    let entries = read_data(path)?;
    let batches: Vec<std::ops::Range<usize>> = (0..entries.len())
        .step_by(MAX_BATCH_ENTRIES)
        .map(|start| start..(start + MAX_BATCH_ENTRIES).min(entries.len()))
        .collect();
    let mut client = connect(&common.admin_socket, common.server_uid).await?;
    let mut created = CreatedView {
        entries: Vec::new(),
    };
    let mut count = 0;
    for (b, range) in batches.iter().enumerate() {
        let sent = entries.get(range.clone()).unwrap_or_default().to_vec();
        let resp = client
            .batch_create_entry(BatchCreateEntryRequest {
                entries: sent.clone(),
            })
            .await
            .map_err(|s| {
                let e = status_error(CMD, &s);
                Error::InvalidArgument(format!(
                    "{e}; batch {} of {} not written{}",
                    b + 1,
                    batches.len(),
                    if b == 0 {
                        String::new()
                    } else {
                        format!(", the {} before it written ({} entries)", b, range.start)
                    }
                ))
            })?
            .into_inner();
        if !resp.created {
            return Err(refused_batch_error(&batches, b, &sent, &resp.results));
        }
        count += resp.results.len();
        // Kept only to be printed: the human summary needs the count alone.
        if common.output == OutputFormat::Json {
            created.entries.extend(
                resp.results
                    .iter()
                    .filter_map(|r| r.entry.as_ref())
                    .map(EntryView::from),
            );
        }
    }
    let n = batches.len();
    render(common.output, &created, |_| format_created_human(count, n))
}
