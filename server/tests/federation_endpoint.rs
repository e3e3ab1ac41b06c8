//! The federation bundle endpoint over real HTTPS.
//!
//! In process (`https_web`): a test CA (rcgen) certifies `localhost`, the endpoint serves a
//! bundle from a watch channel, and rustls clients (trusting the test CA, or another; TLS
//! 1.3 or 1.2 only) fetch it; the certificate files are swapped under it.
//!
//! Whole server (`https_spiffe`): `carapace-server run` with `[federation.bundle_endpoint]`;
//! a client authenticating the endpoint as a SPIFFE peer would (the trust domain's bundle,
//! the expected SPIFFE ID `spiffe://example.org/spire/server`) fetches the bundle, which
//! follows `localauthority x509 prepare|activate|taint`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use carapace_common::http::{ClientTls, Fetched, request};
use carapace_core::jose::PublicKey;
use carapace_core::plugin::KeyManager as _;
use carapace_core::{JwtKey, KeyType, SpiffeId, TrustBundle, TrustDomain};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_server::config::{BundleEndpoint, BundleEndpointProfile};
use carapace_server::federation::endpoint::Endpoint;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::sync::watch;

#[path = "support/federation_peer.rs"]
#[allow(dead_code, reason = "each test file uses part of it")]
mod peer;
use peer::{eventually, pki, start_web, write_pki, write_private};

/// Replaces `path` by renaming a new file onto it, as a certificate renewal does.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    write_private(&tmp, text);
    std::fs::rename(&tmp, path).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// A bundle with one X.509 authority (a CA certificate), one JWT key, both tainted,
/// sequence `sequence`, and the CA's own refresh hint (which the endpoint replaces).
async fn bundle(sequence: u64) -> TrustBundle {
    let mut b = TrustBundle::new(td());
    let ca = pki().ca_der;
    b.x509_authorities.push(ca.clone());
    let key = MemoryKeyManager::new()
        .generate_key("jwt", KeyType::EcP256)
        .await
        .unwrap();
    let kid = PublicKey::from_spki_der(key.public_key_der())
        .unwrap()
        .thumbprint();
    b.jwt_authorities.push(JwtKey {
        kid: kid.clone(),
        public_key_der: key.public_key_der().to_vec(),
        expires_at: Some(4_000_000_000),
    });
    b.tainted_x509_authorities.push(ca);
    b.tainted_jwt_kids.push(kid);
    b.sequence = sequence;
    b.refresh_hint = Some(300);
    b
}

/// A client trusting `ca_der` for `localhost`, offering `versions`.
fn client_trusting(
    ca_der: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientTls {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(carapace_tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Each connection a full handshake: a resumed session checks no certificate.
    config.resumption = rustls::client::Resumption::disabled();
    ClientTls {
        config: Arc::new(config),
        server_name: ServerName::try_from("localhost").unwrap(),
    }
}

/// A client that authenticates the endpoint as a peer's fetcher does
/// (`federation_client_config`, as `https_spiffe` asks: an X509-SVID for `expected` under
/// `bundle`, TLS 1.3 or 1.2).
fn spiffe_client(bundle: TrustBundle, expected: &str) -> ClientTls {
    let (_, rx) = watch::channel(Arc::new(bundle));
    let config =
        carapace_tls::federation_client_config(rx, expected.parse::<SpiffeId>().unwrap()).unwrap();
    spiffe_tls(config)
}

/// [`spiffe_client`] offering `versions` only.
fn spiffe_client_with(
    bundle: TrustBundle,
    expected: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientTls {
    let (_, rx) = watch::channel(Arc::new(bundle));
    let verifier = carapace_tls::SpiffeServerVerifier::accepting_tls12(
        rx,
        expected.parse::<SpiffeId>().unwrap(),
    );
    let config = rustls::ClientConfig::builder_with_provider(carapace_tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    spiffe_tls(config)
}

/// `config` for `localhost`, every connection a full handshake (a resumed session checks
/// no certificate).
fn spiffe_tls(mut config: rustls::ClientConfig) -> ClientTls {
    config.resumption = rustls::client::Resumption::disabled();
    ClientTls {
        config: Arc::new(config),
        server_name: ServerName::try_from("localhost").unwrap(),
    }
}

async fn get(
    addr: SocketAddr,
    tls: &ClientTls,
    method: &str,
    path: &str,
) -> Result<Fetched, String> {
    request(
        addr,
        Some(tls),
        method,
        "localhost",
        path,
        Duration::from_secs(10),
    )
    .await
}

/// The served bundle: status 200, JSON, not cached; (the raw document, the parsed bundle).
fn served(f: &Fetched) -> (Value, TrustBundle) {
    let body = String::from_utf8(f.body.to_vec()).unwrap();
    assert_eq!(f.status, 200, "{body}");
    assert_eq!(f.header("content-type"), Some("application/json"));
    assert_eq!(f.header("cache-control"), Some("no-store"));
    let doc: Value = serde_json::from_str(&body).unwrap();
    let bundle = TrustBundle::from_spiffe_json(td(), &body).unwrap();
    (doc, bundle)
}

/// The document holds the standard members only: no taint, nothing else of the server's.
fn assert_only_standard_members(doc: &Value) {
    let mut top: Vec<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    top.sort_unstable();
    assert_eq!(
        top,
        ["keys", "spiffe_refresh_hint", "spiffe_sequence"],
        "{doc}"
    );
    for key in doc["keys"].as_array().unwrap() {
        for member in key.as_object().unwrap().keys() {
            assert!(
                ["kty", "use", "crv", "x", "y", "n", "e", "x5c", "kid"].contains(&member.as_str()),
                "{member} in {key}"
            );
        }
    }
}

#[tokio::test]
async fn serves_the_bundle_as_spiffe_json_with_the_configured_refresh_hint() {
    let b = bundle(0).await;
    let r = start_web(b.clone(), Duration::from_secs(42)).await;
    let client = client_trusting(&r.ca_der, &[&rustls::version::TLS13]);
    let (doc, parsed) = served(&get(r.addr, &client, "GET", "/").await.unwrap());
    // The sequence even at 0 (SPIRE leaves it out), the configured hint (not the CA's).
    assert_eq!(doc["spiffe_sequence"], 0, "{doc}");
    assert_eq!(doc["spiffe_refresh_hint"], 42, "{doc}");
    assert_eq!(parsed.x509_authorities, b.x509_authorities);
    assert_eq!(
        parsed
            .jwt_authorities
            .iter()
            .map(|k| (&k.kid, &k.public_key_der))
            .collect::<Vec<_>>(),
        b.jwt_authorities
            .iter()
            .map(|k| (&k.kid, &k.public_key_der))
            .collect::<Vec<_>>()
    );
    let keys = doc["keys"].as_array().unwrap();
    let x509 = keys.iter().find(|k| k["use"] == "x509-svid").unwrap();
    assert_eq!(x509["x5c"].as_array().unwrap().len(), 1, "{x509}");
    assert!(x509.get("kid").is_none(), "{x509}");
    let jwt = keys.iter().find(|k| k["use"] == "jwt-svid").unwrap();
    assert_eq!(jwt["kid"], b.jwt_authorities[0].kid.as_str());
    // Both are tainted in the server's bundle: nothing of it is served.
    assert_only_standard_members(&doc);
    assert!(parsed.tainted_x509_authorities.is_empty() && parsed.tainted_jwt_kids.is_empty());

    // A change of the bundle is served at the next request.
    let next = bundle(1).await;
    r.bundle.send_replace(Arc::new(next.clone()));
    let (doc, parsed) = served(&get(r.addr, &client, "GET", "/").await.unwrap());
    assert_eq!(doc["spiffe_sequence"], 1);
    assert_eq!(parsed.x509_authorities, next.x509_authorities);
}

#[tokio::test]
async fn refuses_other_methods_and_paths() {
    let r = start_web(bundle(1).await, Duration::from_secs(300)).await;
    let client = client_trusting(&r.ca_der, &[&rustls::version::TLS13]);
    let post = get(r.addr, &client, "POST", "/").await.unwrap();
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    for path in ["/other", "/bundle", "//", "/.well-known/spiffe-bundle"] {
        let f = get(r.addr, &client, "GET", path).await.unwrap();
        assert_eq!(f.status, 404, "{path}");
        assert!(!String::from_utf8_lossy(&f.body).contains("keys"), "{path}");
    }
    // A query is not part of the path.
    served(&get(r.addr, &client, "GET", "/?x=1").await.unwrap());
}

#[tokio::test]
async fn a_tls12_only_client_gets_the_bundle_and_a_client_trusting_another_ca_does_not() {
    let r = start_web(bundle(1).await, Duration::from_secs(300)).await;
    let tls12 = client_trusting(&r.ca_der, &[&rustls::version::TLS12]);
    served(&get(r.addr, &tls12, "GET", "/").await.unwrap());
    let stranger = client_trusting(&pki().ca_der, &[&rustls::version::TLS13]);
    let err = get(r.addr, &stranger, "GET", "/").await.unwrap_err();
    assert!(
        err.contains("TLS handshake") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn a_renewed_certificate_is_served_and_a_broken_pair_keeps_the_previous_one() {
    let r = start_web(bundle(1).await, Duration::from_secs(300)).await;
    let old_client = client_trusting(&r.ca_der, &[&rustls::version::TLS13]);
    served(&get(r.addr, &old_client, "GET", "/").await.unwrap());

    // Renewed (by another CA, to tell them apart): served within the reload interval.
    let renewed = pki();
    replace(&r.cert_file, &renewed.chain_pem);
    replace(&r.key_file, &renewed.key_pem);
    let new_client = client_trusting(&renewed.ca_der, &[&rustls::version::TLS13]);
    let mut ok = false;
    for _ in 0..100 {
        if get(r.addr, &new_client, "GET", "/").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the renewed certificate was not served within 5s");
    assert!(get(r.addr, &old_client, "GET", "/").await.is_err());

    // A certificate with another certificate's key: the renewed pair stays.
    let broken = pki();
    replace(&r.cert_file, &broken.chain_pem);
    tokio::time::sleep(Duration::from_millis(600)).await;
    served(&get(r.addr, &new_client, "GET", "/").await.unwrap());
    let broken_client = client_trusting(&broken.ca_der, &[&rustls::version::TLS13]);
    assert!(get(r.addr, &broken_client, "GET", "/").await.is_err());
    // Junk: the same.
    replace(&r.key_file, "not a key");
    tokio::time::sleep(Duration::from_millis(600)).await;
    served(&get(r.addr, &new_client, "GET", "/").await.unwrap());
    drop(r.dir);
}

#[tokio::test]
async fn a_bad_https_web_pair_is_refused_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = write_pki(dir.path(), "b", &pki());
    write_private(&key_file, &pki().key_pem);
    let cfg = BundleEndpoint {
        bind_address: "127.0.0.1:0".parse().unwrap(),
        refresh_hint: Duration::from_secs(300),
        profile: BundleEndpointProfile::HttpsWeb {
            cert_file,
            key_file,
        },
    };
    let (_, rx) = watch::channel(Arc::new(bundle(1).await));
    let err = Endpoint::bind(&cfg, rx).await.unwrap_err().to_string();
    assert!(
        err.contains("federation.bundle_endpoint.key_file")
            && err.contains(
                "is not the key of the first certificate of federation.bundle_endpoint.cert_file"
            ),
        "{err}"
    );
}

/// A `carapace-server run` with a bundle endpoint; killed on drop.
struct Server {
    child: std::process::Child,
    dir: tempfile::TempDir,
    admin_socket: PathBuf,
    endpoint: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(endpoint_section: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("server.toml");
        let admin_socket = dir.path().join("admin/admin.sock");
        std::fs::write(
            &conf,
            format!(
                "trust_domain = \"example.org\"\ndata_dir = {:?}\n\
                 bind_address = \"127.0.0.1:{}\"\nadmin_socket = {admin_socket:?}\n\
                 [key_manager.memory]\n[node_attestor.join_token]\n\
                 [federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{port}\"\n\
                 {endpoint_section}",
                dir.path().join("data"),
                free_port(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_carapace-server"))
            .args(["run", "--config"])
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Server {
            child,
            dir,
            admin_socket,
            endpoint: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    fn try_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_carapace-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .unwrap()
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The bundle as the admin API shows it.
    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_spiffe_json(td(), &self.cli(&["bundle", "show", "--format", "spiffe"]))
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_serves_its_bundle_over_https_spiffe_and_follows_its_authorities() {
    let server = Server::start("refresh_hint = \"7s\"\n");
    let addr = server.endpoint;
    // The admin API answers once the server is up; the endpoint is started with it.
    eventually("the admin API", || async {
        server
            .try_cli(&["bundle", "show"])
            .status
            .success()
            .then_some(())
    })
    .await;
    let shown = server.bundle();
    let authorities: Value =
        serde_json::from_str(&server.cli(&["localauthority", "x509", "show", "--output", "json"]))
            .unwrap();
    let old_id = authorities["active"]["authority_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let as_peer = spiffe_client(shown.clone(), "spiffe://example.org/spire/server");
    let fetched = eventually("the bundle endpoint to answer", || async {
        get(addr, &as_peer, "GET", "/").await.ok()
    })
    .await;
    let (doc, first) = served(&fetched);
    assert_eq!(doc["spiffe_refresh_hint"], 7, "{doc}");
    assert_eq!(first.x509_authorities, shown.x509_authorities);
    assert_eq!(first.jwt_authorities, shown.jwt_authorities);
    assert_eq!(first.sequence, shown.sequence);
    assert_only_standard_members(&doc);
    // A peer on TLS 1.2 (SPIFFE Federation §5: Mozilla's intermediate compatibility).
    let tls12_peer = spiffe_client_with(
        shown.clone(),
        "spiffe://example.org/spire/server",
        &[&rustls::version::TLS12],
    );
    served(&get(addr, &tls12_peer, "GET", "/").await.unwrap());

    // A peer expecting another SPIFFE ID, or holding another trust domain's bundle,
    // refuses the endpoint.
    for (bundle, id) in [
        (shown.clone(), "spiffe://example.org/spire/agent/x"),
        (shown.clone(), "spiffe://other.org/spire/server"),
        (
            TrustBundle::from_pem(td(), &carapace_core::bundle::der_to_pem(&pki().ca_der)).unwrap(),
            "spiffe://example.org/spire/server",
        ),
    ] {
        let err = get(addr, &spiffe_client(bundle, id), "GET", "/")
            .await
            .unwrap_err();
        assert!(err.contains("TLS handshake"), "{id}: {err}");
    }

    // prepare: the new authority is served at once, with a higher sequence.
    let prepared: Value = serde_json::from_str(&server.cli(&[
        "localauthority",
        "x509",
        "prepare",
        "--output",
        "json",
    ]))
    .unwrap();
    let new_id = prepared["authority_id"].as_str().unwrap().to_owned();
    let (_, second) = served(&get(addr, &as_peer, "GET", "/").await.unwrap());
    assert!(
        second.sequence > first.sequence,
        "{} then {}",
        first.sequence,
        second.sequence
    );
    assert_eq!(
        second.x509_authorities.len(),
        first.x509_authorities.len() + 1
    );
    assert_eq!(second.x509_authorities, server.bundle().x509_authorities);
    let new_ca = second
        .x509_authorities
        .iter()
        .find(|c| !first.x509_authorities.contains(c))
        .unwrap()
        .clone();

    // activate: the server SVID the endpoint presents is renewed under the new CA; a
    // peer holding only the new CA accepts it.
    server.cli(&[
        "localauthority",
        "x509",
        "activate",
        "--authority-id",
        &new_id,
    ]);
    let mut only_new = TrustBundle::new(td());
    only_new.x509_authorities.push(new_ca);
    let new_peer = spiffe_client(only_new, "spiffe://example.org/spire/server");
    eventually("the endpoint to present an SVID of the new CA", || async {
        get(addr, &new_peer, "GET", "/").await.ok()
    })
    .await;

    // taint the old one: still served (peers must keep trusting it until it is revoked),
    // and no taint is.
    server.cli(&["localauthority", "x509", "taint", "--authority-id", &old_id]);
    let (doc, third) = served(&get(addr, &new_peer, "GET", "/").await.unwrap());
    assert_only_standard_members(&doc);
    assert!(third.sequence > second.sequence);
    assert_eq!(third.x509_authorities, second.x509_authorities);
    assert!(
        !String::from_utf8_lossy(&get(addr, &new_peer, "GET", "/").await.unwrap().body)
            .contains("taint")
    );

    // The endpoint stops with the server.
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut server = server;
    let status = eventually("the server to exit", || {
        let s = server.child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "{status:?}: {}", server.log());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the bundle endpoint still accepts connections after the server exited"
    );
}

#[test]
fn validate_and_run_refuse_a_bad_https_web_pair_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = write_pki(dir.path(), "b", &pki());
    write_private(&key_file, &pki().key_pem);
    let conf = dir.path().join("server.toml");
    let data_dir = dir.path().join("data");
    std::fs::write(
        &conf,
        format!(
            "data_dir = {data_dir:?}\nbind_address = \"127.0.0.1:{}\"\nadmin_socket = {:?}\n\
             [key_manager.memory]\n[federation.bundle_endpoint]\n\
             bind_address = \"127.0.0.1:{}\"\nprofile = \"https_web\"\n\
             cert_file = {cert_file:?}\nkey_file = {key_file:?}\n",
            free_port(),
            dir.path().join("admin/admin.sock"),
            free_port(),
        ),
    )
    .unwrap();
    for cmd in ["validate", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_carapace-server"))
            .args([cmd, "--config"])
            .arg(&conf)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{cmd}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("federation.bundle_endpoint.key_file")
                && text.contains("is not the key of the first certificate"),
            "{cmd}: {text}"
        );
    }
    assert!(
        !data_dir.exists() && !dir.path().join("admin").exists(),
        "a server that refused to start created its data directory or admin socket"
    );
}
