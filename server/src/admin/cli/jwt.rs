//! `jwt mint`: a JWT-SVID signed by the server for any SPIFFE ID of its trust domain,
//! outside of any agent (for a test, a script, or a service that cannot run an agent).

use std::time::Duration;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use carapace_proto::admin::MintJwtsvidRequest;

use super::client::{connect, status_error};
use super::flags::{Common, bad_flag, spiffe_id, ttl_secs};
use super::view::render;
use crate::jwt_keys::{MAX_AUDIENCE_LEN, MAX_AUDIENCES};
use crate::{Error, Result};

/// `jwt ...`
#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Mint a JWT-SVID signed by the server's active JWT key, and print it.
    ///
    /// The token is printed alone on one line (`--output json` adds its SPIFFE ID, `exp`
    /// and `iat`), so that `TOKEN=$(carapace-server jwt mint ...)` works. Its claims:
    /// `sub` (the SPIFFE ID), `aud` (every --audience, as an array), `exp`, `iat`, and
    /// `iss` when the server has a `jwt_issuer`.
    Mint(JwtMintArgs),
}

/// `jwt mint`
#[derive(Debug, Clone, Args)]
pub struct JwtMintArgs {
    /// SPIFFE ID of the token (its `sub` claim); any ID of the server's trust domain.
    #[arg(long)]
    pub spiffe_id: String,
    /// An audience the token is for (its `aud` claim), e.g. the URL or name of the
    /// service that checks it; repeat for several. At least one is required.
    #[arg(long = "audience", value_name = "AUDIENCE", required = true)]
    pub audiences: Vec<String>,
    /// Lifetime: seconds (300) or with units (5m, 1h), at most 1 day (default: the
    /// server's default_jwt_svid_ttl). The token never outlives the key that signs it.
    #[arg(long, value_name = "DURATION", value_parser = carapace_common::parse_duration_flag)]
    pub ttl: Option<Duration>,
    #[command(flatten)]
    pub common: Common,
}

/// A minted JWT-SVID as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtMintView {
    /// The token, JWS compact serialization.
    pub token: String,
    /// Its SPIFFE ID (`sub`).
    pub spiffe_id: String,
    /// Unix seconds of its `exp`.
    pub expires_at: i64,
    /// Unix seconds of its `iat`.
    pub issued_at: i64,
}

/// The token alone, on one line.
pub fn format_jwt_mint_human(m: &JwtMintView) -> String {
    format!("{}\n", m.token)
}

/// `--audience` flags, checked before connecting by the server's bounds
/// ([`crate::jwt_keys::check_audiences`]), with messages naming the flag, and not repeated.
pub(super) fn audiences(cmd: &str, v: &[String]) -> Result<Vec<String>> {
    if v.is_empty() {
        return Err(bad_flag(
            cmd,
            "--audience",
            "at least one audience is required",
        ));
    }
    if v.len() > MAX_AUDIENCES {
        return Err(bad_flag(
            cmd,
            "--audience",
            format!("at most {MAX_AUDIENCES} audiences"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for a in v {
        if a.is_empty() {
            return Err(bad_flag(cmd, "--audience", "cannot be empty"));
        }
        if a.len() > MAX_AUDIENCE_LEN {
            return Err(bad_flag(
                cmd,
                "--audience",
                format!("longer than {MAX_AUDIENCE_LEN} bytes"),
            ));
        }
        if a.chars().any(char::is_control) {
            return Err(bad_flag(
                cmd,
                "--audience",
                format!("{a:?} contains control characters"),
            ));
        }
        if out.contains(a) {
            return Err(bad_flag(cmd, "--audience", format!("{a:?} is given twice")));
        }
        out.push(a.clone());
    }
    Ok(out)
}

/// Whether `token` has the shape of a JWS compact serialization: three base64url parts
/// (header, claims, signature), none empty.
fn is_compact_jws(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Runs a `jwt` subcommand; returns what to print.
pub(super) async fn run(cmd: JwtCommand) -> Result<String> {
    match cmd {
        JwtCommand::Mint(a) => jwt_mint(a).await,
    }
}

async fn jwt_mint(a: JwtMintArgs) -> Result<String> {
    const CMD: &str = "jwt mint";
    let id = spiffe_id(CMD, "--spiffe-id", &a.spiffe_id)?;
    let audience = audiences(CMD, &a.audiences)?;
    let ttl = ttl_secs(CMD, "--ttl", a.ttl, carapace_core::limits::MAX_JWT_SVID_TTL)?;
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let resp = client
        .mint_jwtsvid(MintJwtsvidRequest {
            spiffe_id: id.to_string(),
            audience,
            ttl,
        })
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let view = view_of_minted(CMD, &id.to_string(), resp.svid)?;
    render(a.common.output, &view, format_jwt_mint_human)
}

/// What the server answered, checked: a token of the requested SPIFFE ID, in compact
/// form (nothing else is printed).
pub(super) fn view_of_minted(
    cmd: &str,
    requested: &str,
    svid: Option<carapace_proto::types::JwtSvid>,
) -> Result<JwtMintView> {
    let svid = svid.ok_or_else(|| {
        Error::InvalidArgument(format!("{cmd}: the server sent an incomplete answer"))
    })?;
    if !is_compact_jws(&svid.token) {
        return Err(Error::InvalidArgument(format!(
            "{cmd}: the server sent something that is not a JWT"
        )));
    }
    if svid.spiffe_id != requested {
        return Err(Error::InvalidArgument(format!(
            "{cmd}: the server minted a token for {:?}, not {requested}",
            svid.spiffe_id
        )));
    }
    Ok(JwtMintView {
        token: svid.token,
        spiffe_id: svid.spiffe_id,
        expires_at: svid.expires_at,
        issued_at: svid.issued_at,
    })
}
