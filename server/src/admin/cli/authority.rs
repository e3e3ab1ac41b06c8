//! `localauthority x509|jwt show|prepare|activate|taint|revoke`: the server's X.509
//! authorities (CAs) and JWT authorities (signing keys), driven by the operator as
//! SPIRE's `localauthority` is. The usual forced rotation after a suspected key
//! compromise: `prepare`, `activate`, `taint --authority-id <old>` (agents re-issue
//! everything chained to it, or drop every cached JWT-SVID it signed, at once), then
//! `revoke --authority-id <old>` (it leaves the bundle).

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use carapace_core::bundle::pem_block;
use carapace_proto::admin::{
    ActivateJwtAuthorityRequest, ActivateX509AuthorityRequest, GetJwtAuthorityStateRequest,
    GetX509AuthorityStateRequest, JwtAuthority, PrepareJwtAuthorityRequest,
    PrepareX509AuthorityRequest, RevokeJwtAuthorityRequest, RevokeX509AuthorityRequest,
    TaintJwtAuthorityRequest, TaintX509AuthorityRequest, X509Authority, X509AuthorityStatus,
};

use super::client::{connect, status_error};
use super::flags::{Common, bad_flag};
use super::view::{render, rfc3339};
use crate::Result;
use crate::ca::normalize_authority_id;
use crate::jwt_keys::normalize_kid;

/// `localauthority ...`
#[derive(Debug, Subcommand)]
pub enum LocalAuthorityCommand {
    /// The X.509 authorities (CAs) that sign X509-SVIDs.
    #[command(subcommand)]
    X509(X509AuthorityCommand),
    /// The JWT authorities (signing keys) that sign JWT-SVIDs.
    #[command(subcommand)]
    Jwt(JwtAuthorityCommand),
}

/// `localauthority x509 ...`
#[derive(Debug, Subcommand)]
pub enum X509AuthorityCommand {
    /// Show the active, prepared and old X.509 authorities.
    Show(AuthorityArgs),
    /// Create the next X.509 authority now: in the bundle, signing nothing yet (replaces
    /// one prepared before).
    Prepare(AuthorityArgs),
    /// Make the prepared X.509 authority the active one; the active one becomes old.
    Activate(AuthorityActivateArgs),
    /// Taint an old X.509 authority: every agent re-issues at once every SVID chained to
    /// it, its own included.
    Taint(AuthorityIdArgs),
    /// Revoke a tainted old X.509 authority: it leaves the bundle and its key is deleted.
    Revoke(AuthorityIdArgs),
}

/// `localauthority jwt ...`
#[derive(Debug, Subcommand)]
pub enum JwtAuthorityCommand {
    /// Show the active, prepared and old JWT keys, by kid.
    Show(AuthorityArgs),
    /// Create the next JWT key now: in the bundle, signing nothing yet.
    ///
    /// It replaces one prepared before. Activate it only once every agent and federated
    /// peer has fetched the bundle that carries it, or they refuse its tokens.
    Prepare(AuthorityArgs),
    /// Make the prepared JWT key the active one; the active one becomes old.
    ///
    /// The new key signs every JWT-SVID from now on; the old one stays in the bundle
    /// until the last token it signed has expired.
    Activate(JwtAuthorityActivateArgs),
    /// Taint an old JWT key: agents drop at once every cached JWT-SVID it signed.
    ///
    /// They fetch new tokens, signed by the active key, at the next request.
    Taint(JwtAuthorityIdArgs),
    /// Revoke a tainted old JWT key: it leaves the bundle and the key is deleted.
    ///
    /// Tokens it signed no longer validate anywhere the bundle is refreshed.
    Revoke(JwtAuthorityIdArgs),
}

/// `localauthority x509|jwt show|prepare`
#[derive(Debug, Clone, Args)]
pub struct AuthorityArgs {
    #[command(flatten)]
    pub common: Common,
}

/// `localauthority x509 activate`
#[derive(Debug, Clone, Args)]
pub struct AuthorityActivateArgs {
    /// The prepared authority's id; when given, activate refuses any other.
    #[arg(long)]
    pub authority_id: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

/// `localauthority x509 taint|revoke`
#[derive(Debug, Clone, Args)]
pub struct AuthorityIdArgs {
    /// The authority's id, as `localauthority x509 show` prints it.
    #[arg(long)]
    pub authority_id: String,
    #[command(flatten)]
    pub common: Common,
}

/// `localauthority jwt activate`
#[derive(Debug, Clone, Args)]
pub struct JwtAuthorityActivateArgs {
    /// The prepared key's id (its kid); when given, activate refuses any other.
    #[arg(long)]
    pub authority_id: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

/// `localauthority jwt taint|revoke`
#[derive(Debug, Clone, Args)]
pub struct JwtAuthorityIdArgs {
    /// The key's id: its kid, as `localauthority jwt show` prints it.
    #[arg(long)]
    pub authority_id: String,
    #[command(flatten)]
    pub common: Common,
}

/// One X.509 authority as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityView {
    /// Its id: the CA certificate's subject key identifier, hex.
    pub authority_id: String,
    /// `active`, `prepared` or `old`.
    pub status: String,
    /// Unix seconds of its notAfter.
    pub expires_at: i64,
    /// Whether the operator tainted it.
    pub tainted: bool,
    /// The fingerprint of the upstream authority that certified it (the root
    /// certificate's SHA-256; for `carapace`, that of its upstream server's ID); absent
    /// when self-signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

impl From<&X509Authority> for AuthorityView {
    fn from(a: &X509Authority) -> Self {
        AuthorityView {
            authority_id: a.authority_id.clone(),
            status: status_name(a.status).to_owned(),
            expires_at: a.expires_at,
            tainted: a.tainted,
            upstream: (!a.upstream.is_empty()).then(|| a.upstream.clone()),
        }
    }
}

/// What `localauthority x509|jwt show` prints: SPIRE's three sections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateView<V> {
    /// The authority that signs.
    pub active: Option<V>,
    /// The authority prepared to sign next.
    pub prepared: Option<V>,
    /// Old authorities, still in the bundle, newest first.
    pub old: Vec<V>,
}

/// What `localauthority x509 show` prints.
pub type AuthorityStateView = StateView<AuthorityView>;
/// What `localauthority jwt show` prints.
pub type JwtAuthorityStateView = StateView<JwtAuthorityView>;

/// An authority as printed, X.509 or JWT.
pub trait Listed: Serialize {
    /// What it is called in headings: `X.509 authority`, `JWT authority`.
    const NOUN: &'static str;
    /// `active`, `prepared` or `old`.
    fn status(&self) -> &str;
    /// Its fields, one indented line each.
    fn lines(&self, out: &mut String);
}

fn line(out: &mut String, label: &str, value: &dyn std::fmt::Display) {
    out.push_str(&format!("  {label:<15}: {value}\n"));
}

impl Listed for AuthorityView {
    const NOUN: &'static str = "X.509 authority";
    fn status(&self) -> &str {
        &self.status
    }
    fn lines(&self, out: &mut String) {
        line(out, "Authority ID", &self.authority_id);
        line(out, "Status", &self.status);
        line(out, "Expires at", &rfc3339(self.expires_at));
        line(out, "Tainted", &self.tainted);
        match &self.upstream {
            Some(fp) => line(out, "Upstream", fp),
            None => line(out, "Upstream", &"none (self-signed)"),
        }
    }
}

impl Listed for JwtAuthorityView {
    const NOUN: &'static str = "JWT authority";
    fn status(&self) -> &str {
        &self.status
    }
    fn lines(&self, out: &mut String) {
        line(out, "Authority ID", &self.authority_id);
        line(out, "Status", &self.status);
        line(out, "Expires at", &rfc3339(self.expires_at));
        line(out, "Tainted", &self.tainted);
    }
}

/// The three sections of a server's list.
pub fn state_of<V: Listed>(views: impl IntoIterator<Item = V>) -> StateView<V> {
    let mut state = StateView {
        active: None,
        prepared: None,
        old: Vec::new(),
    };
    for v in views {
        match v.status() {
            "active" => state.active = Some(v),
            "prepared" => state.prepared = Some(v),
            _ => state.old.push(v),
        }
    }
    state
}

/// `<title>:` then the authority's fields, indented.
pub fn format_one_human<V: Listed>(title: &str, a: &V) -> String {
    let mut out = format!("{title}:\n");
    a.lines(&mut out);
    out
}

/// The three sections of `localauthority x509|jwt show`, SPIRE's layout.
pub fn format_state_human<V: Listed>(s: &StateView<V>) -> String {
    let noun = V::NOUN;
    let mut out = format!("Active {noun}:\n");
    match &s.active {
        Some(a) => a.lines(&mut out),
        None => out.push_str(&format!("  No active {noun} found\n")),
    }
    out.push_str(&format!("\nPrepared {noun}:\n"));
    match &s.prepared {
        Some(a) => a.lines(&mut out),
        None => out.push_str(&format!("  No prepared {noun} found\n")),
    }
    // "X.509 authorities", "JWT authorities".
    let plural = noun
        .strip_suffix('y')
        .map_or_else(|| noun.to_owned(), |n| format!("{n}ies"));
    out.push_str(&format!("\nOld {plural}:\n"));
    if s.old.is_empty() {
        out.push_str(&format!("  No old {noun} found\n"));
    }
    for (i, a) in s.old.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        a.lines(&mut out);
    }
    out
}

/// `<verb> <noun>:` and the authority a step returned, or its JSON.
fn render_step<V: Listed>(output: super::view::OutputFormat, verb: &str, v: &V) -> Result<String> {
    render(output, v, |v| {
        format_one_human(&format!("{verb} {}", V::NOUN), v)
    })
}

/// The name of a status on the wire (JWT authorities reuse the X.509 statuses).
fn status_name(status: i32) -> &'static str {
    match X509AuthorityStatus::try_from(status) {
        Ok(X509AuthorityStatus::Active) => "active",
        Ok(X509AuthorityStatus::Prepared) => "prepared",
        Ok(X509AuthorityStatus::Old) => "old",
        _ => "unknown",
    }
}

/// One JWT authority (signing key) as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtAuthorityView {
    /// Its id: the key's `kid` (its RFC 7638 thumbprint), as in the bundle and in the
    /// header of every token it signs.
    pub authority_id: String,
    /// `active`, `prepared` or `old`.
    pub status: String,
    /// Unix seconds: when an active or prepared key stops signing; when an old key
    /// leaves the bundle (the last `exp` it signed).
    pub expires_at: i64,
    /// Whether the operator tainted it.
    pub tainted: bool,
    /// The public key, SubjectPublicKeyInfo PEM (`openssl pkey -pubin` reads it); JSON
    /// only.
    pub public_key_pem: String,
}

impl From<&JwtAuthority> for JwtAuthorityView {
    fn from(a: &JwtAuthority) -> Self {
        JwtAuthorityView {
            authority_id: a.authority_id.clone(),
            status: status_name(a.status).to_owned(),
            expires_at: a.expires_at,
            tainted: a.tainted,
            public_key_pem: if a.public_key.is_empty() {
                String::new()
            } else {
                pem_block("PUBLIC KEY", &a.public_key)
            },
        }
    }
}

/// Runs a `localauthority` subcommand; returns what to print.
pub(super) async fn run(cmd: LocalAuthorityCommand) -> Result<String> {
    match cmd {
        LocalAuthorityCommand::X509(c) => match c {
            X509AuthorityCommand::Show(a) => show(a).await,
            X509AuthorityCommand::Prepare(a) => prepare(a).await,
            X509AuthorityCommand::Activate(a) => activate(a).await,
            X509AuthorityCommand::Taint(a) => taint(a).await,
            X509AuthorityCommand::Revoke(a) => revoke(a).await,
        },
        LocalAuthorityCommand::Jwt(c) => match c {
            JwtAuthorityCommand::Show(a) => jwt_show(a).await,
            JwtAuthorityCommand::Prepare(a) => jwt_prepare(a).await,
            JwtAuthorityCommand::Activate(a) => jwt_activate(a).await,
            JwtAuthorityCommand::Taint(a) => jwt_taint(a).await,
            JwtAuthorityCommand::Revoke(a) => jwt_revoke(a).await,
        },
    }
}

/// `--authority-id`, checked before anything is sent.
fn authority_id(cmd: &str, id: &str) -> Result<String> {
    normalize_authority_id(id).map_err(|e| bad_flag(cmd, "--authority-id", e))
}

/// A JWT `--authority-id` (a kid: base64url characters), checked before anything is
/// sent, by the server's own rule ([`normalize_kid`]).
pub(super) fn jwt_authority_id(cmd: &str, id: &str) -> Result<String> {
    normalize_kid(id).map_err(|e| bad_flag(cmd, "--authority-id", e))
}

/// The answer of a call, or the CLI error naming `cmd`.
fn answer<T>(cmd: &str, r: std::result::Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| status_error(cmd, &s))
}

async fn show(a: AuthorityArgs) -> Result<String> {
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = answer(
        "localauthority x509 show",
        client
            .get_x509_authority_state(GetX509AuthorityStateRequest {})
            .await,
    )?;
    let state = state_of(resp.authorities.iter().map(AuthorityView::from));
    render(a.common.output, &state, format_state_human)
}

async fn prepare(a: AuthorityArgs) -> Result<String> {
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = answer(
        "localauthority x509 prepare",
        client
            .prepare_x509_authority(PrepareX509AuthorityRequest {})
            .await,
    )?;
    render_step(a.common.output, "Prepared", &AuthorityView::from(&got))
}

async fn activate(a: AuthorityActivateArgs) -> Result<String> {
    const CMD: &str = "localauthority x509 activate";
    let id = a
        .authority_id
        .as_deref()
        .map(|i| authority_id(CMD, i))
        .transpose()?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = answer(
        CMD,
        client
            .activate_x509_authority(ActivateX509AuthorityRequest {
                authority_id: id.unwrap_or_default(),
            })
            .await,
    )?;
    render_step(a.common.output, "Activated", &AuthorityView::from(&got))
}

async fn taint(a: AuthorityIdArgs) -> Result<String> {
    const CMD: &str = "localauthority x509 taint";
    let id = authority_id(CMD, &a.authority_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = answer(
        CMD,
        client
            .taint_x509_authority(TaintX509AuthorityRequest { authority_id: id })
            .await,
    )?;
    render_step(a.common.output, "Tainted", &AuthorityView::from(&got))
}

async fn revoke(a: AuthorityIdArgs) -> Result<String> {
    const CMD: &str = "localauthority x509 revoke";
    let id = authority_id(CMD, &a.authority_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = answer(
        CMD,
        client
            .revoke_x509_authority(RevokeX509AuthorityRequest { authority_id: id })
            .await,
    )?;
    render_step(a.common.output, "Revoked", &AuthorityView::from(&got))
}

async fn jwt_show(a: AuthorityArgs) -> Result<String> {
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = answer(
        "localauthority jwt show",
        client
            .get_jwt_authority_state(GetJwtAuthorityStateRequest {})
            .await,
    )?;
    let state = state_of(resp.authorities.iter().map(JwtAuthorityView::from));
    render(a.common.output, &state, format_state_human)
}

async fn jwt_prepare(a: AuthorityArgs) -> Result<String> {
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = answer(
        "localauthority jwt prepare",
        client
            .prepare_jwt_authority(PrepareJwtAuthorityRequest {})
            .await,
    )?;
    render_step(a.common.output, "Prepared", &JwtAuthorityView::from(&got))
}

async fn jwt_activate(a: JwtAuthorityActivateArgs) -> Result<String> {
    const CMD: &str = "localauthority jwt activate";
    let id = a
        .authority_id
        .as_deref()
        .map(|i| jwt_authority_id(CMD, i))
        .transpose()?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = answer(
        CMD,
        client
            .activate_jwt_authority(ActivateJwtAuthorityRequest {
                authority_id: id.unwrap_or_default(),
            })
            .await,
    )?;
    render_step(a.common.output, "Activated", &JwtAuthorityView::from(&got))
}

async fn jwt_taint(a: JwtAuthorityIdArgs) -> Result<String> {
    const CMD: &str = "localauthority jwt taint";
    let id = jwt_authority_id(CMD, &a.authority_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = answer(
        CMD,
        client
            .taint_jwt_authority(TaintJwtAuthorityRequest { authority_id: id })
            .await,
    )?;
    render_step(a.common.output, "Tainted", &JwtAuthorityView::from(&got))
}

async fn jwt_revoke(a: JwtAuthorityIdArgs) -> Result<String> {
    const CMD: &str = "localauthority jwt revoke";
    let id = jwt_authority_id(CMD, &a.authority_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = answer(
        CMD,
        client
            .revoke_jwt_authority(RevokeJwtAuthorityRequest { authority_id: id })
            .await,
    )?;
    render_step(a.common.output, "Revoked", &JwtAuthorityView::from(&got))
}
