//! Flags every admin command shares ([`Common`]) and the checks the commands run on their
//! input before connecting: SPIFFE IDs, selectors, entry ids, DNS names, TTLs and times.
//!
//! A bad input gets an error naming the command and the flag (`entry create: --spiffe-id:
//! ...`), and nothing is sent to the server.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use clap::Args;

use carapace_core::entry::validate_dns_name;
use carapace_core::{EntryId, Selector, SpiffeId, TrustDomain};
use carapace_proto::types;

use super::view::OutputFormat;
use crate::config::default_admin_socket;
use crate::{Error, Result};

/// Options every admin command takes: where the server is (its admin socket, or its
/// node API address with an admin SVID) and the output format.
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
    /// Call the server at HOST:PORT (its node API address) over mutual TLS instead of
    /// the admin socket, as the admin workload whose X509-SVID --svid, --svid-key and
    /// --bundle name. The server accepts the SVID of a registration entry created with
    /// --admin (checked on every call) and must itself present spiffe://<trust
    /// domain>/spire/server under the bundle. An admin workload gets its files with
    /// `carapace-agent api fetch x509 --write DIR` (svid.pem, svid.key, bundle.pem), or
    /// an administrator mints them with `carapace-server x509 mint --write DIR`.
    #[arg(
        long,
        env = "CARAPACE_ADMIN_SERVER_ADDRESS",
        value_name = "HOST:PORT",
        requires_all = ["svid", "svid_key", "bundle"]
    )]
    pub server_address: Option<String>,
    /// With --server-address: the admin X509-SVID, PEM, leaf first (then any
    /// intermediates).
    #[arg(
        long,
        env = "CARAPACE_ADMIN_SVID",
        value_name = "FILE",
        requires = "server_address"
    )]
    pub svid: Option<PathBuf>,
    /// With --server-address: the SVID's private key, PKCS#8 PEM, in a file no group or
    /// other user may read or write (chmod 600).
    #[arg(
        long,
        env = "CARAPACE_ADMIN_SVID_KEY",
        value_name = "FILE",
        requires = "server_address"
    )]
    pub svid_key: Option<PathBuf>,
    /// With --server-address: the trust bundle, PEM CA certificates of the trust domain,
    /// which the server's SVID must chain to.
    #[arg(
        long,
        env = "CARAPACE_ADMIN_BUNDLE",
        value_name = "FILE",
        requires = "server_address"
    )]
    pub bundle: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

/// `--expires-at`: unix seconds, or RFC 3339 in UTC.
pub(super) fn parse_expires_at(s: &str) -> std::result::Result<i64, String> {
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

impl Common {
    /// The remote server and admin SVID files, when `--server-address` is given (clap
    /// makes the four flags go together).
    pub(super) fn remote(&self) -> Option<super::client::RemoteFlags> {
        Some(super::client::RemoteFlags {
            address: self.server_address.clone()?,
            svid: self.svid.clone()?,
            svid_key: self.svid_key.clone()?,
            bundle: self.bundle.clone()?,
        })
    }
}

/// The error for a bad flag: `<cmd>: <flag>: <why>`.
pub(super) fn bad_flag(cmd: &str, flag: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{cmd}: {flag}: {e}"))
}

/// A SPIFFE ID flag, parsed.
pub(super) fn spiffe_id(cmd: &str, flag: &str, s: &str) -> Result<SpiffeId> {
    SpiffeId::from_str(s).map_err(|e| bad_flag(cmd, flag, e))
}

/// A trust domain flag (`partner.org` or `spiffe://partner.org`), checked.
pub(super) fn trust_domain(cmd: &str, flag: &str, s: &str) -> Result<TrustDomain> {
    TrustDomain::new(s).map_err(|e| bad_flag(cmd, flag, e))
}

/// `--selector` flags, parsed, in wire form.
pub(super) fn selectors(cmd: &str, v: &[String]) -> Result<Vec<types::Selector>> {
    v.iter()
        .map(|s| {
            Selector::from_str(s)
                .map(|s| types::Selector::from(&s))
                .map_err(|e| bad_flag(cmd, "--selector", e))
        })
        .collect()
}

/// An `--id` flag, checked.
pub(super) fn entry_id(cmd: &str, s: &str) -> Result<EntryId> {
    EntryId::new(s).map_err(|e| bad_flag(cmd, "--id", e))
}

/// `--dns-name` flags, checked.
pub(super) fn dns_names(cmd: &str, v: &[String]) -> Result<()> {
    for n in v {
        validate_dns_name(n)
            .map_err(|reason| bad_flag(cmd, "--dns-name", format!("{n:?}: {reason}")))?;
    }
    Ok(())
}

/// A TTL flag in whole seconds for the wire (0: the server's default), within `1s..=max`.
pub(super) fn ttl_secs(cmd: &str, flag: &str, ttl: Option<Duration>, max: Duration) -> Result<i64> {
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
