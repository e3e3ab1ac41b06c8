//! `federation create|update|delete|list|show|refresh`: the trust domains this one
//! trusts, each with its peer's bundle endpoint (SPIRE's `spire-server federation`).
//!
//! A relationship is one-way (SPIFFE Federation §6): `federation create` on server A
//! for trust domain B makes A's workloads trust B's; B needs its own relationship with
//! A for the other direction. The bundle of B is fetched from B's bundle endpoint at
//! B's refresh hint, and at once by `federation refresh`.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use carapace_core::TrustDomain;
use carapace_proto::admin::{
    self as wire, BundleDocument, CreateFederationRequest, DeleteFederationRequest,
    FederationProfile, FederationRelationship, FederationSource, GetFederationRequest,
    ListFederationsRequest, RefreshFederationRequest, UpdateFederationRequest,
};

use super::bundle::{BundleFormat, StoredBundleView};
use super::client::{connect, status_error};
use super::flags::{Common, bad_flag, spiffe_id, trust_domain};
use super::view::{field, plural, render, rfc3339};
use crate::{Error, Result};

/// The largest bundle or CA file read (the server's limit too).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// `federation ...`
#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Trust another trust domain: fetch its bundle from its bundle endpoint.
    ///
    /// The relationship is one-way: this trust domain's workloads trust the other's;
    /// the other server needs its own relationship for the reverse. For https_spiffe,
    /// the first fetch needs the peer's bundle: give it with --bundle-path (e.g. the
    /// output of `carapace-server bundle show --format spiffe`, or SPIRE's
    /// `spire-server bundle show -format spiffe`, on the peer), or with `bundle set`.
    /// SPIRE's equivalent: `spire-server federation create`.
    Create(FederationCreateArgs),
    /// Change a relationship's endpoint, profile or bootstrap bundle.
    ///
    /// The trust domain selects the relationship; the flags given replace those
    /// fields, the others are kept. Relationships from the config file
    /// ([[federation.federates_with]]) are changed there.
    Update(FederationUpdateArgs),
    /// Stop trusting a trust domain: delete its relationship, its status and its
    /// bundle.
    Delete(FederationTdArgs),
    /// List the relationships, with their last fetch.
    List(FederationListArgs),
    /// Show a relationship: its endpoint, profile, last success and error, next
    /// refresh, and the stored bundle's sequence and origin.
    Show(FederationTdArgs),
    /// Fetch a trust domain's bundle now and print the relationship's status; exits
    /// non-zero when the fetch failed.
    Refresh(FederationTdArgs),
}

/// `--profile`: how the peer's bundle endpoint is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProfileArg {
    /// The endpoint presents an X509-SVID (by default spiffe://<trust domain>/spire/server,
    /// what Carapace and SPIRE servers present), checked against the peer's bundle.
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
    /// The endpoint presents a Web PKI certificate for the URL's host, checked against
    /// --ca-file or the system's trust store.
    #[value(name = "https_web")]
    HttpsWeb,
}

/// The relationship's fields, for `federation create` and `federation update`.
#[derive(Debug, Clone, Args)]
pub struct FederationFields {
    /// The peer's bundle endpoint: https://host[:port][/path] (SPIRE:
    /// -bundleEndpointURL).
    #[arg(long, value_name = "URL")]
    pub bundle_endpoint_url: Option<String>,
    /// How the endpoint is authenticated: https_spiffe or https_web (SPIRE:
    /// -bundleEndpointProfile).
    #[arg(long, value_enum, alias = "bundle-endpoint-profile")]
    pub profile: Option<ProfileArg>,
    /// https_spiffe: the SPIFFE ID the endpoint presents (default: spiffe://<trust
    /// domain>/spire/server; SPIRE: -endpointSpiffeID). Another trust domain's ID is
    /// allowed when that trust domain serves the bundle; its bundle must then be known.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub endpoint_spiffe_id: Option<String>,
    /// https_web: PEM CA certificates trusted for this endpoint only (default: the
    /// system's trust store).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The peer trust domain's bundle to start from (`-`: standard input), stored as a
    /// static bundle; https_spiffe needs one for its first fetch (SPIRE:
    /// -trustDomainBundlePath).
    #[arg(long, value_name = "FILE")]
    pub bundle_path: Option<PathBuf>,
    /// The format of --bundle-path: pem, or spiffe (a JWK Set, what `bundle show
    /// --format spiffe` prints) (SPIRE: -trustDomainBundleFormat).
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem, requires = "bundle_path")]
    pub bundle_format: BundleFormat,
}

/// `federation create`
#[derive(Debug, Clone, Args)]
pub struct FederationCreateArgs {
    /// The trust domain to trust: partner.org or spiffe://partner.org (SPIRE:
    /// -trustDomain).
    #[arg(long, value_name = "TRUST_DOMAIN")]
    pub trust_domain: String,
    #[command(flatten)]
    pub fields: FederationFields,
    #[command(flatten)]
    pub common: Common,
}

/// `federation update`
#[derive(Debug, Clone, Args)]
pub struct FederationUpdateArgs {
    /// The trust domain whose relationship to change.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    pub trust_domain: String,
    #[command(flatten)]
    pub fields: FederationFields,
    #[command(flatten)]
    pub common: Common,
}

/// `federation delete|show|refresh`
#[derive(Debug, Clone, Args)]
pub struct FederationTdArgs {
    /// The relationship's trust domain: partner.org or spiffe://partner.org (SPIRE:
    /// -id).
    #[arg(long, value_name = "TRUST_DOMAIN")]
    pub trust_domain: String,
    #[command(flatten)]
    pub common: Common,
}

/// `federation list`
#[derive(Debug, Clone, Args)]
pub struct FederationListArgs {
    #[command(flatten)]
    pub common: Common,
}

/// A relationship as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationView {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint.
    pub bundle_endpoint_url: String,
    /// `https_spiffe` or `https_web`.
    pub profile: String,
    /// https_spiffe: the SPIFFE ID the endpoint presents.
    pub endpoint_spiffe_id: Option<String>,
    /// https_web: how many CA certificates of its own it trusts (`None`: the system's
    /// trust store).
    pub web_roots: Option<usize>,
    /// `config` or `api`.
    pub source: String,
    /// Unix seconds of the last successful fetch.
    pub last_success_at: Option<i64>,
    /// The last failed fetch's reason.
    pub last_error: Option<String>,
    /// Unix seconds of the last failed fetch.
    pub last_error_at: Option<i64>,
    /// Unix seconds of the next fetch.
    pub next_refresh_at: Option<i64>,
    /// The trust domain's stored bundle, if any.
    pub bundle: Option<StoredBundleView>,
}

fn nonzero(t: i64) -> Option<i64> {
    (t != 0).then_some(t)
}

impl From<&wire::Federation> for FederationView {
    fn from(f: &wire::Federation) -> Self {
        let rel = f.relationship.clone().unwrap_or_default();
        let status = f.status.clone().unwrap_or_default();
        let profile = match FederationProfile::try_from(rel.profile) {
            Ok(FederationProfile::HttpsSpiffe) => "https_spiffe",
            Ok(FederationProfile::HttpsWeb) => "https_web",
            _ => "unknown",
        };
        let web_roots = (profile == "https_web" && !rel.web_roots_pem.is_empty()).then(|| {
            carapace_core::bundle::certs_from_pem(&rel.web_roots_pem).map_or(0, |c| c.len())
        });
        FederationView {
            trust_domain: rel.trust_domain,
            bundle_endpoint_url: rel.bundle_endpoint_url,
            profile: profile.to_owned(),
            endpoint_spiffe_id: (!rel.endpoint_spiffe_id.is_empty())
                .then_some(rel.endpoint_spiffe_id),
            web_roots,
            source: match FederationSource::try_from(rel.source) {
                Ok(FederationSource::Config) => "config",
                Ok(FederationSource::Api) => "api",
                _ => "unknown",
            }
            .to_owned(),
            last_success_at: nonzero(status.last_success_at),
            last_error: (!status.last_error.is_empty()).then_some(status.last_error),
            last_error_at: nonzero(status.last_error_at),
            next_refresh_at: nonzero(status.next_refresh_at),
            bundle: f.bundle.as_ref().map(StoredBundleView::from),
        }
    }
}

/// One relationship in the SPIRE-like layout.
pub fn format_federation_human(f: &FederationView) -> String {
    let mut out = String::new();
    field(&mut out, "Trust domain", &f.trust_domain);
    field(&mut out, "Endpoint URL", &f.bundle_endpoint_url);
    field(&mut out, "Endpoint profile", &f.profile);
    if let Some(id) = &f.endpoint_spiffe_id {
        field(&mut out, "Endpoint ID", id);
    }
    if f.profile == "https_web" {
        match f.web_roots {
            Some(n) => field(
                &mut out,
                "Web PKI roots",
                format!("{n} {}", plural(n, "CA certificate", "CA certificates")),
            ),
            None => field(&mut out, "Web PKI roots", "the system's trust store"),
        }
    }
    field(&mut out, "Source", &f.source);
    let when = |t: Option<i64>, none: &str| t.map_or_else(|| none.to_owned(), rfc3339);
    field(&mut out, "Last success", when(f.last_success_at, "never"));
    match (&f.last_error, f.last_error_at) {
        (Some(e), t) => field(&mut out, "Last error", format!("{} ({e})", when(t, "?"))),
        (None, _) => field(&mut out, "Last error", "none"),
    }
    field(
        &mut out,
        "Next refresh",
        when(f.next_refresh_at, "not scheduled"),
    );
    match &f.bundle {
        Some(b) => {
            field(&mut out, "Bundle sequence", b.sequence);
            field(&mut out, "Bundle origin", &b.origin);
            field(&mut out, "Bundle updated", rfc3339(b.updated_at));
            field(
                &mut out,
                "Bundle keys",
                format!("{} X.509, {} JWT", b.x509_authorities, b.jwt_authorities),
            );
        }
        None => field(&mut out, "Bundle", "none stored yet"),
    }
    out
}

/// `Found N federation relationships`, then each, separated by blank lines.
pub fn format_federations_human(v: &[FederationView]) -> String {
    let mut out = format!(
        "Found {} {}\n",
        v.len(),
        plural(
            v.len(),
            "federation relationship",
            "federation relationships"
        )
    );
    for f in v {
        out.push('\n');
        out.push_str(&format_federation_human(f));
    }
    out
}

/// What `federation list` prints in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationList {
    /// The relationships, by trust domain.
    pub federations: Vec<FederationView>,
}

/// What `federation delete` prints in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationDeletedView {
    /// The trust domain no longer trusted.
    pub trust_domain: String,
}

/// Runs a `federation` subcommand; returns what to print.
pub(super) async fn run(cmd: FederationCommand) -> Result<String> {
    match cmd {
        FederationCommand::Create(a) => create(a).await,
        FederationCommand::Update(a) => update(a).await,
        FederationCommand::Delete(a) => delete(a).await,
        FederationCommand::List(a) => list(a).await,
        FederationCommand::Show(a) => show(a).await,
        FederationCommand::Refresh(a) => refresh(a).await,
    }
}

/// Reads an operator's file (`-`: standard input, when `stdin_ok`), at most
/// [`MAX_FILE_BYTES`].
pub(super) fn read_input(cmd: &str, flag: &str, path: &Path) -> Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut s)
            .map_err(Error::io(format!("{cmd}: {flag}: reading standard input")))?;
        if s.len() as u64 > MAX_FILE_BYTES {
            return Err(bad_flag(
                cmd,
                flag,
                format!("standard input holds more than {MAX_FILE_BYTES} bytes"),
            ));
        }
        return Ok(s);
    }
    carapace_common::read_operator_file(path, &format!("{cmd}: {flag}"), MAX_FILE_BYTES)
        .map_err(Error::InvalidArgument)
}

/// The bundle document of `format` read from `path`.
pub(super) fn document(
    cmd: &str,
    flag: &str,
    path: &Path,
    format: BundleFormat,
) -> Result<BundleDocument> {
    let content = read_input(cmd, flag, path)?;
    if content.trim().is_empty() {
        return Err(bad_flag(
            cmd,
            flag,
            format!("{} is empty", shown_path(path)),
        ));
    }
    Ok(BundleDocument {
        format: format.to_wire() as i32,
        content,
    })
}

fn shown_path(path: &Path) -> String {
    if path.as_os_str() == "-" {
        "standard input".into()
    } else {
        path.display().to_string()
    }
}

/// The relationship the flags describe, over `base` (update: the current one).
fn apply_fields(
    cmd: &str,
    td: &TrustDomain,
    f: &FederationFields,
    base: FederationRelationship,
) -> Result<FederationRelationship> {
    let mut rel = FederationRelationship {
        trust_domain: td.name().to_owned(),
        source: 0,
        ..base
    };
    if let Some(url) = &f.bundle_endpoint_url {
        crate::federation::check_endpoint_url(url)
            .map_err(|e| bad_flag(cmd, "--bundle-endpoint-url", e))?;
        rel.bundle_endpoint_url = url.clone();
    }
    let old_profile = FederationProfile::try_from(rel.profile).ok();
    let profile = match f.profile {
        Some(ProfileArg::HttpsSpiffe) => FederationProfile::HttpsSpiffe,
        Some(ProfileArg::HttpsWeb) => FederationProfile::HttpsWeb,
        None => old_profile.unwrap_or(FederationProfile::Unspecified),
    };
    if old_profile != Some(profile) {
        // A profile change drops the other profile's parameters.
        rel.endpoint_spiffe_id.clear();
        rel.web_roots_pem.clear();
    }
    rel.profile = profile as i32;
    match profile {
        FederationProfile::HttpsSpiffe => {
            if f.ca_file.is_some() {
                return Err(bad_flag(
                    cmd,
                    "--ca-file",
                    "only the https_web profile takes CA certificates; https_spiffe checks \
                     the endpoint's SVID against the trust domain's bundle (--bundle-path)",
                ));
            }
            if let Some(id) = &f.endpoint_spiffe_id {
                rel.endpoint_spiffe_id = spiffe_id(cmd, "--endpoint-spiffe-id", id)?.to_string();
            }
        }
        FederationProfile::HttpsWeb => {
            if f.endpoint_spiffe_id.is_some() {
                return Err(bad_flag(
                    cmd,
                    "--endpoint-spiffe-id",
                    "only the https_spiffe profile has an endpoint SPIFFE ID; https_web \
                     checks the URL's host name instead",
                ));
            }
            if let Some(path) = &f.ca_file {
                let pem = read_input(cmd, "--ca-file", path)?;
                let certs = carapace_core::bundle::certs_from_pem(&pem)
                    .map_err(|e| bad_flag(cmd, "--ca-file", e))?;
                if certs.is_empty() {
                    return Err(bad_flag(
                        cmd,
                        "--ca-file",
                        format!("{} holds no PEM CERTIFICATE block", shown_path(path)),
                    ));
                }
                rel.web_roots_pem = pem;
            }
        }
        FederationProfile::Unspecified => {
            return Err(bad_flag(
                cmd,
                "--profile",
                "required: https_spiffe or https_web",
            ));
        }
    }
    if rel.bundle_endpoint_url.is_empty() {
        return Err(bad_flag(cmd, "--bundle-endpoint-url", "required"));
    }
    Ok(rel)
}

/// `--bundle-path`, read.
fn bootstrap(cmd: &str, f: &FederationFields) -> Result<Option<BundleDocument>> {
    f.bundle_path
        .as_deref()
        .map(|p| document(cmd, "--bundle-path", p, f.bundle_format))
        .transpose()
}

fn show_one(output: super::view::OutputFormat, f: &wire::Federation) -> Result<String> {
    render(output, &FederationView::from(f), format_federation_human)
}

async fn create(a: FederationCreateArgs) -> Result<String> {
    const CMD: &str = "federation create";
    let td = trust_domain(CMD, "--trust-domain", &a.trust_domain)?;
    let rel = apply_fields(CMD, &td, &a.fields, FederationRelationship::default())?;
    let bootstrap_bundle = bootstrap(CMD, &a.fields)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .create_federation(CreateFederationRequest {
            relationship: Some(rel),
            bootstrap_bundle,
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let mut out = show_one(a.common.output, &got)?;
    if a.common.output == super::view::OutputFormat::Human {
        out.push_str(&https_spiffe_hint(&FederationView::from(&got)));
    }
    Ok(out)
}

/// For an https_spiffe relationship without a bundle of the endpoint's trust domain:
/// how to give the first fetch one (else it cannot authenticate the endpoint).
pub fn https_spiffe_hint(v: &FederationView) -> String {
    let Some(id) = v.endpoint_spiffe_id.as_deref() else {
        return String::new();
    };
    let endpoint_td = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default();
    if endpoint_td != v.trust_domain {
        // Another trust domain serves it: its bundle comes from its own relationship.
        return String::new();
    }
    if v.bundle.is_some() {
        return String::new();
    }
    format!(
        "\nNo bundle of {td} is stored yet: the first fetch cannot authenticate {id} without \
         one. Give it with `federation update --trust-domain {td} --bundle-path FILE \
         --bundle-format spiffe` (the output of `bundle show --format spiffe` on {td}'s \
         server) or `bundle set --trust-domain {td}`.\n",
        td = v.trust_domain
    )
}

async fn update(a: FederationUpdateArgs) -> Result<String> {
    const CMD: &str = "federation update";
    let td = trust_domain(CMD, "--trust-domain", &a.trust_domain)?;
    let bootstrap_bundle = bootstrap(CMD, &a.fields)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let current = client
        .get_federation(GetFederationRequest {
            trust_domain: td.name().to_owned(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner()
        .relationship
        .unwrap_or_default();
    let rel = apply_fields(CMD, &td, &a.fields, current)?;
    let got = client
        .update_federation(UpdateFederationRequest {
            relationship: Some(rel),
            bootstrap_bundle,
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    show_one(a.common.output, &got)
}

async fn delete(a: FederationTdArgs) -> Result<String> {
    const CMD: &str = "federation delete";
    let td = trust_domain(CMD, "--trust-domain", &a.trust_domain)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    client
        .delete_federation(DeleteFederationRequest {
            trust_domain: td.name().to_owned(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?;
    let view = FederationDeletedView {
        trust_domain: td.name().to_owned(),
    };
    render(a.common.output, &view, |v| {
        format!(
            "Deleted the federation relationship with {} and its bundle\n",
            v.trust_domain
        )
    })
}

async fn list(a: FederationListArgs) -> Result<String> {
    const CMD: &str = "federation list";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .list_federations(ListFederationsRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let view = FederationList {
        federations: resp.federations.iter().map(FederationView::from).collect(),
    };
    render(a.common.output, &view, |v| {
        format_federations_human(&v.federations)
    })
}

async fn show(a: FederationTdArgs) -> Result<String> {
    const CMD: &str = "federation show";
    let td = trust_domain(CMD, "--trust-domain", &a.trust_domain)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .get_federation(GetFederationRequest {
            trust_domain: td.name().to_owned(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    show_one(a.common.output, &got)
}

async fn refresh(a: FederationTdArgs) -> Result<String> {
    const CMD: &str = "federation refresh";
    let td = trust_domain(CMD, "--trust-domain", &a.trust_domain)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .refresh_federation(RefreshFederationRequest {
            trust_domain: td.name().to_owned(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let view = resp
        .federation
        .as_ref()
        .map(FederationView::from)
        .ok_or_else(|| Error::InvalidArgument(format!("{CMD}: the server sent no relationship")))?;
    if !resp.succeeded {
        // The status, then why: on stderr, with a failing exit.
        return Err(Error::FailedPrecondition(format!(
            "{CMD}: fetching the bundle of {td} failed: {}\n{}",
            view.last_error.as_deref().unwrap_or("no reason recorded"),
            format_federation_human(&view).trim_end()
        )));
    }
    render(a.common.output, &view, format_federation_human)
}
