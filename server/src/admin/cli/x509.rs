//! `x509 mint`: X509-SVIDs outside of any agent, for a key generated here (the key never
//! leaves this process), printed or written to a directory.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use carapace_core::bundle::der_to_pem;
use carapace_proto::admin::MintX509svidRequest;
use carapace_proto::convert::bundle_from_wire;

use super::client::{connect, status_error};
use super::flags::{Common, dns_names, spiffe_id, ttl_secs};
use super::view::render;
use crate::{Error, Result};

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
    /// Lifetime: seconds (3600) or with units (30s, 1h), at most 365 days (default: the
    /// server's).
    #[arg(long, value_name = "DURATION", value_parser = carapace_common::parse_duration_flag)]
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

/// Runs an `x509` subcommand; returns what to print.
pub(super) async fn run(cmd: X509Command) -> Result<String> {
    match cmd {
        X509Command::Mint(a) => x509_mint(a).await,
    }
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
