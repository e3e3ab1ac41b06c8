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
    /// SHA-256 fingerprint of the upstream root that certified it; absent when
    /// self-signed.
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

/// What `localauthority x509 show` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityStateView {
    /// The authority that signs.
    pub active: Option<AuthorityView>,
    /// The authority prepared to sign next.
    pub prepared: Option<AuthorityView>,
    /// Old authorities, still in the bundle, newest first.
    pub old: Vec<AuthorityView>,
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

/// What `localauthority jwt show` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtAuthorityStateView {
    /// The key that signs.
    pub active: Option<JwtAuthorityView>,
    /// The key prepared to sign next.
    pub prepared: Option<JwtAuthorityView>,
    /// Old keys, still in the bundle, newest first.
    pub old: Vec<JwtAuthorityView>,
}

fn jwt_authority_lines(out: &mut String, a: &JwtAuthorityView) {
    let line = |out: &mut String, label: &str, value: &dyn std::fmt::Display| {
        out.push_str(&format!("  {label:<15}: {value}\n"));
    };
    line(out, "Authority ID", &a.authority_id);
    line(out, "Status", &a.status);
    line(out, "Expires at", &rfc3339(a.expires_at));
    line(out, "Tainted", &a.tainted);
}

/// `<title>:` then the JWT authority's fields, indented.
pub fn format_jwt_authority_human(title: &str, a: &JwtAuthorityView) -> String {
    let mut out = format!("{title}:\n");
    jwt_authority_lines(&mut out, a);
    out
}

/// The three sections of `localauthority jwt show`, as `localauthority x509 show`.
pub fn format_jwt_authority_state_human(s: &JwtAuthorityStateView) -> String {
    let mut out = String::from("Active JWT authority:\n");
    match &s.active {
        Some(a) => jwt_authority_lines(&mut out, a),
        None => out.push_str("  No active JWT authority found\n"),
    }
    out.push_str("\nPrepared JWT authority:\n");
    match &s.prepared {
        Some(a) => jwt_authority_lines(&mut out, a),
        None => out.push_str("  No prepared JWT authority found\n"),
    }
    out.push_str("\nOld JWT authorities:\n");
    if s.old.is_empty() {
        out.push_str("  No old JWT authority found\n");
    }
    for (i, a) in s.old.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        jwt_authority_lines(&mut out, a);
    }
    out
}

/// The state of `localauthority jwt show`, from the server's list.
pub(super) fn jwt_state_of(authorities: &[JwtAuthority]) -> JwtAuthorityStateView {
    let mut state = JwtAuthorityStateView {
        active: None,
        prepared: None,
        old: Vec::new(),
    };
    for v in authorities.iter().map(JwtAuthorityView::from) {
        match v.status.as_str() {
            "active" => state.active = Some(v),
            "prepared" => state.prepared = Some(v),
            _ => state.old.push(v),
        }
    }
    state
}

fn authority_lines(out: &mut String, a: &AuthorityView) {
    let line = |out: &mut String, label: &str, value: &dyn std::fmt::Display| {
        out.push_str(&format!("  {label:<15}: {value}\n"));
    };
    line(out, "Authority ID", &a.authority_id);
    line(out, "Status", &a.status);
    line(out, "Expires at", &rfc3339(a.expires_at));
    line(out, "Tainted", &a.tainted);
    match &a.upstream {
        Some(fp) => line(out, "Upstream root", fp),
        None => line(out, "Upstream root", &"none (self-signed)"),
    }
}

/// `<title>:` then the authority's fields, indented.
pub fn format_authority_human(title: &str, a: &AuthorityView) -> String {
    let mut out = format!("{title}:\n");
    authority_lines(&mut out, a);
    out
}

/// The three sections of `localauthority x509 show`, SPIRE's layout.
pub fn format_authority_state_human(s: &AuthorityStateView) -> String {
    let mut out = String::from("Active X.509 authority:\n");
    match &s.active {
        Some(a) => authority_lines(&mut out, a),
        None => out.push_str("  No active X.509 authority found\n"),
    }
    out.push_str("\nPrepared X.509 authority:\n");
    match &s.prepared {
        Some(a) => authority_lines(&mut out, a),
        None => out.push_str("  No prepared X.509 authority found\n"),
    }
    out.push_str("\nOld X.509 authorities:\n");
    if s.old.is_empty() {
        out.push_str("  No old X.509 authority found\n");
    }
    for (i, a) in s.old.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        authority_lines(&mut out, a);
    }
    out
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

/// The longest kid accepted, in bytes (an RFC 7638 SHA-256 thumbprint is 43).
const MAX_KID_LEN: usize = 128;

/// A JWT `--authority-id` (a kid: base64url characters), checked before anything is
/// sent.
pub(super) fn jwt_authority_id(cmd: &str, id: &str) -> Result<String> {
    let id = id.trim();
    if id.is_empty() {
        return Err(bad_flag(cmd, "--authority-id", "is required"));
    }
    if id.len() > MAX_KID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad_flag(
            cmd,
            "--authority-id",
            "not a JWT authority id (the kid, as `localauthority jwt show` prints it)",
        ));
    }
    Ok(id.to_owned())
}

async fn show(a: AuthorityArgs) -> Result<String> {
    const CMD: &str = "localauthority x509 show";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .get_x509_authority_state(GetX509AuthorityStateRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let mut state = AuthorityStateView {
        active: None,
        prepared: None,
        old: Vec::new(),
    };
    for v in resp.authorities.iter().map(AuthorityView::from) {
        match v.status.as_str() {
            "active" => state.active = Some(v),
            "prepared" => state.prepared = Some(v),
            _ => state.old.push(v),
        }
    }
    render(a.common.output, &state, format_authority_state_human)
}

async fn prepare(a: AuthorityArgs) -> Result<String> {
    const CMD: &str = "localauthority x509 prepare";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .prepare_x509_authority(PrepareX509AuthorityRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &AuthorityView::from(&got), |v| {
        format_authority_human("Prepared X.509 authority", v)
    })
}

async fn activate(a: AuthorityActivateArgs) -> Result<String> {
    const CMD: &str = "localauthority x509 activate";
    let id = a
        .authority_id
        .as_deref()
        .map(|i| authority_id(CMD, i))
        .transpose()?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .activate_x509_authority(ActivateX509AuthorityRequest {
            authority_id: id.unwrap_or_default(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &AuthorityView::from(&got), |v| {
        format_authority_human("Activated X.509 authority", v)
    })
}

async fn taint(a: AuthorityIdArgs) -> Result<String> {
    const CMD: &str = "localauthority x509 taint";
    let id = authority_id(CMD, &a.authority_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .taint_x509_authority(TaintX509AuthorityRequest { authority_id: id })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &AuthorityView::from(&got), |v| {
        format_authority_human("Tainted X.509 authority", v)
    })
}

async fn revoke(a: AuthorityIdArgs) -> Result<String> {
    const CMD: &str = "localauthority x509 revoke";
    let id = authority_id(CMD, &a.authority_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .revoke_x509_authority(RevokeX509AuthorityRequest { authority_id: id })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &AuthorityView::from(&got), |v| {
        format_authority_human("Revoked X.509 authority", v)
    })
}

async fn jwt_show(a: AuthorityArgs) -> Result<String> {
    const CMD: &str = "localauthority jwt show";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .get_jwt_authority_state(GetJwtAuthorityStateRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(
        a.common.output,
        &jwt_state_of(&resp.authorities),
        format_jwt_authority_state_human,
    )
}

async fn jwt_prepare(a: AuthorityArgs) -> Result<String> {
    const CMD: &str = "localauthority jwt prepare";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .prepare_jwt_authority(PrepareJwtAuthorityRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &JwtAuthorityView::from(&got), |v| {
        format_jwt_authority_human("Prepared JWT authority", v)
    })
}

async fn jwt_activate(a: JwtAuthorityActivateArgs) -> Result<String> {
    const CMD: &str = "localauthority jwt activate";
    let id = a
        .authority_id
        .as_deref()
        .map(|i| jwt_authority_id(CMD, i))
        .transpose()?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .activate_jwt_authority(ActivateJwtAuthorityRequest {
            authority_id: id.unwrap_or_default(),
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &JwtAuthorityView::from(&got), |v| {
        format_jwt_authority_human("Activated JWT authority", v)
    })
}

async fn jwt_taint(a: JwtAuthorityIdArgs) -> Result<String> {
    const CMD: &str = "localauthority jwt taint";
    let id = jwt_authority_id(CMD, &a.authority_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .taint_jwt_authority(TaintJwtAuthorityRequest { authority_id: id })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &JwtAuthorityView::from(&got), |v| {
        format_jwt_authority_human("Tainted JWT authority", v)
    })
}

async fn jwt_revoke(a: JwtAuthorityIdArgs) -> Result<String> {
    const CMD: &str = "localauthority jwt revoke";
    let id = jwt_authority_id(CMD, &a.authority_id)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let got = client
        .revoke_jwt_authority(RevokeJwtAuthorityRequest { authority_id: id })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    render(a.common.output, &JwtAuthorityView::from(&got), |v| {
        format_jwt_authority_human("Revoked JWT authority", v)
    })
}
