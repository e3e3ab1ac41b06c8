//! `bundle show|set|list|delete`: the trust domain's bundle, as PEM or in the SPIFFE
//! format, and the bundles of foreign trust domains (SPIRE's `spire-server bundle`).
//!
//! `bundle show --format spiffe` prints what `bundle set --format spiffe` imports on
//! another Carapace server, and what SPIRE's `spire-server bundle set -format spiffe`
//! imports: the way to federate with a peer whose bundle endpoint cannot be reached
//! (an air-gapped trust domain).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use carapace_proto::admin::{
    self as wire, BundleOrigin, DeleteBundleMode, DeleteBundleRequest, GetBundleRequest,
    ListBundlesRequest, SetBundleRequest,
};
use carapace_proto::convert::bundle_from_wire;

use super::client::{connect, status_error};
use super::flags::{Common, trust_domain};
use super::view::{OutputFormat, field, plural, render, rfc3339};
use crate::{Error, Result};

/// `bundle ...`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust domain's bundle, or a foreign trust domain's stored one.
    Show(BundleShowArgs),
    /// Store a foreign trust domain's bundle (from a file or standard input).
    ///
    /// It replaces the stored one at once; if a federation relationship names the trust
    /// domain, its next successful fetch replaces it in turn. With no relationship the
    /// bundle stays until `bundle delete`: the way to trust a peer whose bundle endpoint
    /// cannot be reached. SPIRE's equivalent: `spire-server bundle set -id
    /// spiffe://TD -format pem|spiffe`.
    Set(BundleSetArgs),
    /// List the foreign trust domains' bundles (SPIRE: `bundle list`).
    List(BundleListArgs),
    /// Delete a foreign trust domain's bundle: its workloads are no longer trusted.
    ///
    /// Refused while a federation relationship names the trust domain (delete the
    /// relationship, which deletes the bundle too). SPIRE: `bundle delete -id`.
    Delete(BundleDeleteArgs),
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// Concatenated PEM CERTIFICATE blocks of the X.509 authorities.
    Pem,
    /// SPIFFE bundle format (a JWK Set).
    Spiffe,
}

impl BundleFormat {
    /// As the admin API names it.
    pub(super) fn to_wire(self) -> wire::BundleFormat {
        match self {
            BundleFormat::Pem => wire::BundleFormat::Pem,
            BundleFormat::Spiffe => wire::BundleFormat::Spiffe,
        }
    }
}

/// `bundle show`
#[derive(Debug, Clone, Args)]
pub struct BundleShowArgs {
    /// Bundle format (`--output json` prints the SPIFFE format).
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
    pub format: BundleFormat,
    /// A foreign trust domain whose stored bundle to print (default: this server's own
    /// trust domain).
    #[arg(long, value_name = "TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

/// `bundle set`
#[derive(Debug, Clone, Args)]
pub struct BundleSetArgs {
    /// The foreign trust domain: partner.org or spiffe://partner.org (SPIRE: -id).
    #[arg(long, value_name = "TRUST_DOMAIN")]
    pub trust_domain: String,
    /// The input's format: pem (CA certificates), or spiffe (a JWK Set, what `bundle
    /// show --format spiffe` prints; it carries JWT keys too).
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
    pub format: BundleFormat,
    /// The bundle file (default and `-`: standard input).
    #[arg(long, value_name = "FILE")]
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// `bundle list`
#[derive(Debug, Clone, Args)]
pub struct BundleListArgs {
    /// Also this server's own trust domain's bundle.
    #[arg(long)]
    pub include_local: bool,
    #[command(flatten)]
    pub common: Common,
}

/// `bundle delete --mode`
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeleteModeArg {
    /// Refuse while a federation relationship (or, later, an entry) names the trust
    /// domain.
    Restrict,
}

/// `bundle delete`
#[derive(Debug, Clone, Args)]
pub struct BundleDeleteArgs {
    /// The foreign trust domain (SPIRE: -id).
    #[arg(long, value_name = "TRUST_DOMAIN")]
    pub trust_domain: String,
    /// What to do about what still uses the bundle (SPIRE: -mode).
    #[arg(long, value_enum, default_value_t = DeleteModeArg::Restrict)]
    pub mode: DeleteModeArg,
    #[command(flatten)]
    pub common: Common,
}

/// A stored bundle as `bundle list`, `bundle set` and `federation show` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBundleView {
    /// Its trust domain.
    pub trust_domain: String,
    /// `fetched`, `static` or `local`.
    pub origin: String,
    /// Its `spiffe_sequence`.
    pub sequence: u64,
    /// Unix seconds when it was stored (0 for the local bundle).
    pub updated_at: i64,
    /// How many X.509 authorities it holds.
    pub x509_authorities: usize,
    /// How many JWT keys it holds.
    pub jwt_authorities: usize,
}

/// The name of an origin on the wire.
fn origin_name(origin: i32) -> &'static str {
    match BundleOrigin::try_from(origin) {
        Ok(BundleOrigin::Fetched) => "fetched",
        Ok(BundleOrigin::Static) => "static",
        Ok(BundleOrigin::Local) => "local",
        _ => "unknown",
    }
}

impl From<&wire::StoredBundle> for StoredBundleView {
    fn from(s: &wire::StoredBundle) -> Self {
        let b = s.bundle.clone().unwrap_or_default();
        StoredBundleView {
            trust_domain: b.trust_domain,
            origin: origin_name(s.origin).to_owned(),
            sequence: b.sequence,
            updated_at: s.updated_at,
            x509_authorities: b.x509_authorities.len(),
            jwt_authorities: b.jwt_authorities.len(),
        }
    }
}

/// One stored bundle, SPIRE-like.
pub fn format_stored_bundle_human(b: &StoredBundleView) -> String {
    let mut out = String::new();
    field(&mut out, "Trust domain", &b.trust_domain);
    field(&mut out, "Origin", &b.origin);
    field(&mut out, "Sequence", b.sequence);
    if b.origin != "local" {
        field(&mut out, "Updated at", rfc3339(b.updated_at));
    }
    field(&mut out, "X.509 authorities", b.x509_authorities);
    field(&mut out, "JWT authorities", b.jwt_authorities);
    out
}

/// `Found N bundles`, then each, separated by blank lines.
pub fn format_stored_bundles_human(v: &[StoredBundleView]) -> String {
    let mut out = format!(
        "Found {} {}\n",
        v.len(),
        plural(v.len(), "bundle", "bundles")
    );
    for b in v {
        out.push('\n');
        out.push_str(&format_stored_bundle_human(b));
    }
    out
}

/// What `bundle list` prints in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleList {
    /// The bundles, by trust domain (the local one first when asked for).
    pub bundles: Vec<StoredBundleView>,
}

/// What `bundle delete` prints in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleDeletedView {
    /// The trust domain whose bundle was deleted.
    pub trust_domain: String,
}

/// Runs a `bundle` subcommand; returns what to print.
pub(super) async fn run(cmd: BundleCommand) -> Result<String> {
    match cmd {
        BundleCommand::Show(a) => bundle_show(a).await,
        BundleCommand::Set(a) => bundle_set(a).await,
        BundleCommand::List(a) => bundle_list(a).await,
        BundleCommand::Delete(a) => bundle_delete(a).await,
    }
}

async fn bundle_show(a: BundleShowArgs) -> Result<String> {
    const CMD: &str = "bundle show";
    let td = a
        .trust_domain
        .as_deref()
        .map(|t| trust_domain(CMD, "--trust-domain", t))
        .transpose()?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let wire = client
        .get_bundle(GetBundleRequest {
            trust_domain: td.map(|t| t.name().to_owned()).unwrap_or_default(),
        })
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

async fn bundle_set(a: BundleSetArgs) -> Result<String> {
    const CMD: &str = "bundle set";
    let td = trust_domain(CMD, "--trust-domain", &a.trust_domain)?;
    let path = a.path.clone().unwrap_or_else(|| PathBuf::from("-"));
    let doc = super::federation::document(CMD, "--path", &path, a.format)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let stored = client
        .set_bundle(SetBundleRequest {
            trust_domain: td.name().to_owned(),
            bundle: Some(doc),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let view = StoredBundleView::from(&stored);
    render(a.common.output, &view, |v| {
        format!("Bundle set\n{}", format_stored_bundle_human(v))
    })
}

async fn bundle_list(a: BundleListArgs) -> Result<String> {
    const CMD: &str = "bundle list";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .list_bundles(ListBundlesRequest {
            include_local: a.include_local,
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let view = BundleList {
        bundles: resp.bundles.iter().map(StoredBundleView::from).collect(),
    };
    render(a.common.output, &view, |v| {
        format_stored_bundles_human(&v.bundles)
    })
}

async fn bundle_delete(a: BundleDeleteArgs) -> Result<String> {
    const CMD: &str = "bundle delete";
    let td = trust_domain(CMD, "--trust-domain", &a.trust_domain)?;
    let mode = match a.mode {
        DeleteModeArg::Restrict => DeleteBundleMode::Restrict,
    };
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    client
        .delete_bundle(DeleteBundleRequest {
            trust_domain: td.name().to_owned(),
            mode: mode as i32,
        })
        .await
        .map_err(|s| status_error(CMD, &s))?;
    let view = BundleDeletedView {
        trust_domain: td.name().to_owned(),
    };
    render(a.common.output, &view, |v| {
        format!("Deleted the bundle of {}\n", v.trust_domain)
    })
}
