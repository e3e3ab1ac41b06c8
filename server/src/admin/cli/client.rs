//! The CLI's connection to the server: [`connect`] opens the admin socket, only to a
//! process of the expected uid, or, under `--server-address` ([`with_remote`]), the
//! node API's port over mutual TLS with an admin SVID, only to a server presenting
//! `spiffe://<td>/spire/server` under the given bundle; [`status_error`] turns the
//! server's answers into the CLI's errors (the server's message, after the command).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carapace_common::error_chain;
use tonic::transport::Channel;
use tonic::{Code, Status};

use carapace_proto::admin::admin_client::AdminClient;

use crate::{Error, Result};

/// How long one admin call may take (minting may wait on a hardware key manager).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the TCP and TLS connection to a remote server may take.
const REMOTE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest SVID or bundle PEM file read.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// `--server-address` and the admin SVID's files.
#[derive(Debug, Clone)]
pub(crate) struct RemoteFlags {
    /// The server's node API address, HOST:PORT.
    pub address: String,
    /// The admin X509-SVID, PEM, leaf first.
    pub svid: PathBuf,
    /// Its PKCS#8 PEM private key (owner-only file).
    pub svid_key: PathBuf,
    /// The trust bundle's CA certificates, PEM.
    pub bundle: PathBuf,
}

tokio::task_local! {
    /// The remote server the admin commands of this task call instead of the socket.
    static REMOTE: Option<RemoteFlags>;
}

/// Runs `f` with [`connect`] going to `remote` (when given) instead of the admin socket.
pub(super) async fn with_remote<F: Future>(remote: Option<RemoteFlags>, f: F) -> F::Output {
    REMOTE.scope(remote, f).await
}

/// The client TLS configuration `remote`'s files make: the admin SVID as client
/// certificate, and only `spiffe://<td of the SVID>/spire/server` under the bundle
/// accepted as the server. Every problem names the flag and the file.
pub(crate) fn remote_tls(remote: &RemoteFlags, now: i64) -> Result<rustls::ClientConfig> {
    use carapace_core::x509svid;
    let bad = |flag: &str, path: &Path, e: &dyn std::fmt::Display| {
        Error::InvalidArgument(format!("{flag} {}: {e}", path.display()))
    };
    let svid_pem = carapace_common::read_operator_file(&remote.svid, "--svid", MAX_PEM_FILE)
        .map_err(Error::InvalidArgument)?;
    let chain = carapace_core::bundle::certs_from_pem(&svid_pem)
        .map_err(|e| bad("--svid", &remote.svid, &e))?;
    let leaf = chain.first().ok_or_else(|| {
        bad(
            "--svid",
            &remote.svid,
            &"holds no PEM certificate (expected the X509-SVID, leaf first)",
        )
    })?;
    let id = x509svid::check_leaf(leaf).map_err(|e| bad("--svid", &remote.svid, &e))?;
    let (_, not_after) =
        x509svid::validity_of(leaf).map_err(|e| bad("--svid", &remote.svid, &e))?;
    if now >= not_after {
        return Err(bad(
            "--svid",
            &remote.svid,
            &format!(
                "the SVID of {id} expired at {}; fetch a new one",
                carapace_core::clock::rfc3339(not_after)
            ),
        ));
    }
    let key =
        carapace_keymanager_soft::load_key_file(&remote.svid_key, "admin-svid").map_err(|e| {
            let why = match e {
                carapace_core::Error::KeyBackend(m) => m,
                other => other.to_string(),
            };
            Error::InvalidArgument(format!("--svid-key: {why}"))
        })?;
    let spki = leaf_spki(leaf).map_err(|e| bad("--svid", &remote.svid, &e))?;
    if carapace_core::plugin::KeySigner::public_key_der(&key) != spki.as_slice() {
        return Err(Error::InvalidArgument(format!(
            "--svid-key {} is not the key of the SVID in --svid {}",
            remote.svid_key.display(),
            remote.svid.display()
        )));
    }
    let bundle_pem = carapace_common::read_operator_file(&remote.bundle, "--bundle", MAX_PEM_FILE)
        .map_err(Error::InvalidArgument)?;
    let td = id.trust_domain();
    let bundle = carapace_core::TrustBundle::from_pem(td.clone(), &bundle_pem)
        .map_err(|e| bad("--bundle", &remote.bundle, &e))?;
    let (_keep, bundle) = tokio::sync::watch::channel(Arc::new(bundle));
    let client = carapace_tls::certified_key(&chain, Arc::new(key));
    carapace_tls::client_config(bundle, td.server_id(), Some(client))
        .map_err(|e| Error::Config(format!("TLS configuration: {e}")))
}

/// The DER SubjectPublicKeyInfo of a certificate.
fn leaf_spki(der: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// Checks that `--server-address` is `HOST:PORT` (a name or an address, `[v6]:port`).
pub(crate) fn check_address(address: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "--server-address {address:?}: {why}; expected HOST:PORT (the server's node API address, e.g. server.example.org:8081)"
        ))
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() || host == "[]" {
        return Err(bad("no host"));
    }
    if host.contains(['/', '@', ' ']) || (host.contains(':') && !host.starts_with('[')) {
        return Err(bad("not a host name or address"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("the port must be a number from 1 to 65535")),
    }
}

/// Connects to `remote.address` over mutual TLS with the admin SVID.
async fn connect_remote(remote: &RemoteFlags) -> Result<AdminClient<Channel>> {
    check_address(&remote.address)?;
    let tls = remote_tls(remote, carapace_core::clock::unix_now())?;
    let channel = carapace_common::tls_channel(
        &remote.address,
        Arc::new(tls),
        REMOTE_CONNECT_TIMEOUT,
        CALL_TIMEOUT,
    )
    .await
    .map_err(|e| Error::Io {
        context: format!("cannot reach the server at {} over TLS", remote.address),
        source: std::io::Error::other(format!(
            "{} (is --server-address the server's node API address? does --bundle hold the trust domain's current bundle?)",
            error_chain(&e)
        )),
    })?;
    Ok(AdminClient::new(channel))
}

/// Connects to the admin socket: only to a process of this uid or `server_uid`. Under
/// [`with_remote`] with a remote server, connects to that server instead.
pub(crate) async fn connect(
    socket: &Path,
    server_uid: Option<u32>,
) -> Result<AdminClient<Channel>> {
    if let Some(remote) = REMOTE.try_with(|r| r.clone()).ok().flatten() {
        return connect_remote(&remote).await;
    }
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
        carapace_common::check_socket_dir(dir, &expected, false).map_err(|e| {
            // Under the shipped unit the server runs as its own user and owns the
            // socket's directory: say how to trust it.
            if server_uid.is_none() && e.contains("is owned by uid") {
                refused(format!(
                    "{e}; if the server runs as that user, pass --server-uid UID (or set CARAPACE_SERVER_UID)"
                ))
            } else {
                refused(e)
            }
        })?;
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
pub(super) fn status_error(cmd: &str, s: &Status) -> Error {
    let msg = format!("{cmd}: {}", s.message());
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(msg),
        Code::FailedPrecondition => Error::FailedPrecondition(msg),
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
