//! The OIDC discovery endpoint over real HTTPS: a test CA (rcgen) certifies `localhost`,
//! the trust bundle holds a P-256 and an RSA-2048 JWT key from the in-memory key manager,
//! and clients fetch the documents with rustls (trusting the test CA, or not), and with
//! PyJWT's `PyJWKClient` (tests/python/oidc_verify.py), which verifies tokens signed by
//! `carapace_core::jose::sign` with those keys.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use carapace_common::http::{ClientTls, Fetched, request};
use carapace_core::jose::PublicKey;
use carapace_core::plugin::{KeyManager as _, KeySigner};
use carapace_core::{JwtKey, KeyType, TrustBundle, TrustDomain};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_server::config::{OidcDiscovery, OidcKey};
use carapace_server::oidc::{self, Endpoint};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::sync::watch;

#[path = "support/federation_peer.rs"]
#[allow(dead_code, reason = "each test file uses part of it")]
mod peer;
use peer::{Pki, eventually, pki, write_private};

/// The files of `pki` in `dir`: (cert_file, key_file, ca_file).
fn write_pki(dir: &Path, pki: &Pki) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key, ca) = (
        dir.join("oidc.crt"),
        dir.join("oidc.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, &pki.chain_pem).unwrap();
    write_private(&key, &pki.key_pem);
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    (cert, key, ca)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Keys {
    ec: Arc<dyn KeySigner>,
    rsa: Arc<dyn KeySigner>,
}

impl Keys {
    async fn new() -> Self {
        let km = MemoryKeyManager::new();
        Keys {
            ec: km.generate_key("jwt-ec", KeyType::EcP256).await.unwrap(),
            rsa: km.generate_key("jwt-rsa", KeyType::Rsa2048).await.unwrap(),
        }
    }
}

fn kid(key: &dyn KeySigner) -> String {
    PublicKey::from_spki_der(key.public_key_der())
        .unwrap()
        .thumbprint()
}

fn bundle_of(keys: &[&Arc<dyn KeySigner>]) -> TrustBundle {
    let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
    for k in keys {
        b.jwt_authorities.push(JwtKey {
            kid: kid(k.as_ref()),
            public_key_der: k.public_key_der().to_vec(),
            expires_at: None,
        });
    }
    b.sequence = 1;
    b
}

/// A running endpoint.
struct Running {
    addr: SocketAddr,
    issuer: String,
    dir: tempfile::TempDir,
    ca_file: PathBuf,
    cfg: OidcDiscovery,
    bundle: watch::Sender<Arc<TrustBundle>>,
    _stop: watch::Sender<bool>,
    ca_der: Vec<u8>,
}

async fn start(bundle: TrustBundle, path: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (cert_file, key_file, ca_file) = write_pki(dir.path(), &pki);
    let port = free_port();
    let issuer = format!("https://localhost:{port}{path}");
    let cfg = OidcDiscovery {
        bind_address: format!("127.0.0.1:{port}").parse().unwrap(),
        issuer: issuer.clone(),
        cert_file,
        key: OidcKey::File(key_file),
    };
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
    let endpoint = Endpoint::bind(&cfg, bundle_rx)
        .await
        .unwrap()
        .with_reload_interval(Duration::from_millis(100));
    let addr = endpoint.local_addr().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(endpoint.serve(stop_rx));
    Running {
        addr,
        issuer,
        dir,
        ca_file,
        cfg,
        bundle: bundle_tx,
        _stop: stop_tx,
        ca_der: pki.ca_der,
    }
}

fn client_trusting(ca_der: &[u8]) -> ClientTls {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(carapace_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ClientTls {
        config: Arc::new(config),
        server_name: ServerName::try_from("localhost").unwrap(),
    }
}

async fn fetch(r: &Running, method: &str, path: &str) -> Fetched {
    request(
        r.addr,
        Some(&client_trusting(&r.ca_der)),
        method,
        "localhost",
        path,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
}

fn body_json(f: &Fetched) -> Value {
    assert_eq!(f.status, 200, "{}", String::from_utf8_lossy(&f.body));
    assert_eq!(f.header("content-type"), Some("application/json"));
    serde_json::from_slice(&f.body).unwrap()
}

#[tokio::test]
async fn serves_the_discovery_document_and_the_jwks_over_https() {
    let keys = Keys::new().await;
    let r = start(bundle_of(&[&keys.ec, &keys.rsa]), "/td").await;

    let conf = fetch(&r, "GET", "/td/.well-known/openid-configuration").await;
    assert_eq!(conf.header("cache-control"), Some("public, max-age=300"));
    assert_eq!(
        body_json(&conf),
        json!({
            "issuer": r.issuer,
            "jwks_uri": format!("{}/keys", r.issuer),
            "authorization_endpoint": "urn:carapace:programmatic_authorization",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        })
    );

    let jwks = fetch(&r, "GET", "/td/keys").await;
    assert_eq!(jwks.header("cache-control"), Some("public, max-age=300"));
    let jwks = body_json(&jwks);
    let published = jwks["keys"].as_array().unwrap();
    assert_eq!(published.len(), 2, "{jwks}");
    let ec = &published[0];
    assert_eq!(ec["kid"], kid(keys.ec.as_ref()));
    assert_eq!(
        (&ec["kty"], &ec["crv"], &ec["use"], &ec["alg"]),
        (
            &json!("EC"),
            &json!("P-256"),
            &json!("sig"),
            &json!("ES256")
        )
    );
    assert_eq!(
        PublicKey::from_jwk(ec.as_object().unwrap()).unwrap(),
        PublicKey::from_spki_der(keys.ec.public_key_der()).unwrap()
    );
    let rsa = &published[1];
    assert_eq!(rsa["kid"], kid(keys.rsa.as_ref()));
    assert_eq!(
        (&rsa["kty"], &rsa["e"], &rsa["use"], &rsa["alg"]),
        (
            &json!("RSA"),
            &json!("AQAB"),
            &json!("sig"),
            &json!("RS256")
        )
    );
    assert_eq!(
        PublicKey::from_jwk(rsa.as_object().unwrap()).unwrap(),
        PublicKey::from_spki_der(keys.rsa.public_key_der()).unwrap()
    );

    // A key the CA publishes is served at once, and the refresh hint shortens the cache.
    let p384 = MemoryKeyManager::new()
        .generate_key("jwt-p384", KeyType::EcP384)
        .await
        .unwrap();
    let mut next = bundle_of(&[&keys.ec, &p384]);
    next.refresh_hint = Some(60);
    r.bundle.send_replace(Arc::new(next));
    let conf = fetch(&r, "GET", "/td/.well-known/openid-configuration").await;
    assert_eq!(conf.header("cache-control"), Some("public, max-age=60"));
    assert_eq!(
        body_json(&conf)["id_token_signing_alg_values_supported"],
        json!(["ES256", "ES384"])
    );
    let jwks = body_json(&fetch(&r, "GET", "/td/keys").await);
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [kid(keys.ec.as_ref()), kid(p384.as_ref())]);
    assert_eq!(jwks["keys"][1]["alg"], "ES384");

    // No JWT key yet: an empty set, and no algorithm claimed.
    r.bundle.send_replace(Arc::new(bundle_of(&[])));
    assert_eq!(
        body_json(&fetch(&r, "GET", "/td/keys").await),
        json!({"keys": []})
    );
}

#[tokio::test]
async fn refuses_other_methods_and_paths() {
    let keys = Keys::new().await;
    let r = start(bundle_of(&[&keys.ec]), "/td").await;
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let resp = fetch(&r, method, "/td/keys").await;
        assert_eq!(resp.status, 405, "{method}");
        assert_eq!(resp.header("allow"), Some("GET, HEAD"), "{method}");
    }
    for path in [
        "/",
        "/keys",
        "/.well-known/openid-configuration",
        "/td/keys/",
        "/td/.well-known/openid-configuration/x",
        "/td/../keys",
    ] {
        assert_eq!(fetch(&r, "GET", path).await.status, 404, "{path}");
    }
    let head = fetch(&r, "HEAD", "/td/keys").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("application/json"));
    assert!(head.body.is_empty());
    // A query does not change what is served.
    let q = body_json(&fetch(&r, "GET", "/td/keys?x=1").await);
    assert_eq!(q["keys"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_fails_the_handshake() {
    let keys = Keys::new().await;
    let r = start(bundle_of(&[&keys.ec]), "").await;
    let stranger = pki();
    let err = request(
        r.addr,
        Some(&client_trusting(&stranger.ca_der)),
        "GET",
        "localhost",
        "/keys",
        Duration::from_secs(10),
    )
    .await
    .unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    // Plain HTTP is not answered either.
    let plain = request(
        r.addr,
        None,
        "GET",
        "localhost",
        "/keys",
        Duration::from_secs(10),
    )
    .await;
    assert!(plain.is_err(), "{plain:?}");
    // And the endpoint still serves clients that trust it.
    assert_eq!(fetch(&r, "GET", "/keys").await.status, 200);
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_closed() {
    use tokio::io::AsyncReadExt as _;
    let keys = Keys::new().await;
    let r = start(bundle_of(&[&keys.ec]), "").await;
    let mut silent = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    while silent.read(&mut buf).await.unwrap_or(0) > 0 {}
    let waited = started.elapsed();
    let limit = carapace_common::http::HEADER_TIMEOUT;
    assert!(
        waited >= limit - Duration::from_secs(1) && waited < limit + Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let keys = Keys::new().await;
    let r = start(bundle_of(&[&keys.ec]), "").await;
    let renewed = pki();
    let tmp = r.dir.path().join("new");
    std::fs::create_dir(&tmp).unwrap();
    let (cert, key, _) = write_pki(&tmp, &renewed);
    // Key first, then the certificate, each renamed into place as ACME clients do.
    std::fs::rename(&key, r.cfg.key_file().unwrap()).unwrap();
    std::fs::rename(&cert, &r.cfg.cert_file).unwrap();
    let mut served = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = request(
            r.addr,
            Some(&client_trusting(&renewed.ca_der)),
            "GET",
            "localhost",
            "/keys",
            Duration::from_secs(10),
        )
        .await;
        if got.is_ok_and(|f| f.status == 200) {
            served = true;
            break;
        }
    }
    assert!(served, "the renewed certificate was not served within 5s");
    // A broken renewal (a key of another certificate) keeps the current pair.
    let other = pki();
    write_private(&tmp.join("k"), &other.key_pem);
    std::fs::rename(tmp.join("k"), r.cfg.key_file().unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = request(
        r.addr,
        Some(&client_trusting(&renewed.ca_der)),
        "GET",
        "localhost",
        "/keys",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(still.status, 200);
}

fn cfg_in(dir: &Path, pki: &Pki) -> OidcDiscovery {
    let (cert_file, key_file, _) = write_pki(dir, pki);
    OidcDiscovery {
        bind_address: "127.0.0.1:0".parse().unwrap(),
        issuer: "https://oidc.example.org".into(),
        cert_file,
        key: OidcKey::File(key_file),
    }
}

#[tokio::test]
async fn bad_certificate_and_key_files_are_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki();
    let cfg = cfg_in(dir.path(), &good);
    assert_eq!(oidc::check_files(&cfg), Vec::<String>::new());

    // The key of another certificate: refused by validate and at start.
    write_private(cfg.key_file().unwrap(), &pki().key_pem);
    let problems = oidc::check_files(&cfg);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("oidc_discovery.key_file ")
            && problems[0]
                .contains("is not the key of the first certificate of oidc_discovery.cert_file"),
        "{problems:?}"
    );
    let (_, rx) = watch::channel(Arc::new(bundle_of(&[])));
    let err = Endpoint::bind(&cfg, rx.clone()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("is not the key of the first certificate"),
        "{err}"
    );
    write_private(cfg.key_file().unwrap(), &good.key_pem);

    // A key others can read.
    std::fs::set_permissions(
        cfg.key_file().unwrap(),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let problems = oidc::check_files(&cfg);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("key_file") && p.contains("mode 644") && p.contains("chmod 600")),
        "{problems:?}"
    );
    assert!(Endpoint::bind(&cfg, rx.clone()).await.is_err());
    std::fs::set_permissions(
        cfg.key_file().unwrap(),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    // A key owned by someone else (the tests run as root, as CI does).
    assert_eq!(
        carapace_common::euid(),
        0,
        "this test changes a file's owner: run it as root"
    );
    std::os::unix::fs::chown(cfg.key_file().unwrap(), Some(65534), None).unwrap();
    let problems = oidc::check_files(&cfg);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("oidc_discovery.key_file")
                && p.contains("is owned by uid 65534, not by the server's user (uid 0)")),
        "{problems:?}"
    );
    std::os::unix::fs::chown(cfg.key_file().unwrap(), Some(0), None).unwrap();

    // Not a key, not a certificate, missing files.
    std::fs::write(dir.path().join("junk"), "hello").unwrap();
    let junk_cert = OidcDiscovery {
        cert_file: dir.path().join("junk"),
        ..cfg.clone()
    };
    let problems = oidc::check_files(&junk_cert);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("oidc_discovery.cert_file ")
                && p.contains("holds no CERTIFICATE")),
        "{problems:?}"
    );
    write_private(&dir.path().join("junk.key"), "not a key");
    let junk_key = OidcDiscovery {
        key: OidcKey::File(dir.path().join("junk.key")),
        ..cfg.clone()
    };
    let problems = oidc::check_files(&junk_key);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("oidc_discovery.key_file ")
                && p.contains("not a PEM private key")),
        "{problems:?}"
    );
    let missing = OidcDiscovery {
        cert_file: dir.path().join("nope.crt"),
        key: OidcKey::File(dir.path().join("nope.key")),
        ..cfg.clone()
    };
    let problems = oidc::check_files(&missing);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("cert_file") && p.contains("nope.crt does not exist")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("key_file") && p.contains("nope.key does not exist")),
        "{problems:?}"
    );
}

#[test]
fn validate_reports_the_oidc_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki();
    let cfg = cfg_in(dir.path(), &good);
    let conf = dir.path().join("server.toml");
    let write_conf = |issuer: &str| {
        std::fs::write(
            &conf,
            format!(
                "data_dir = {:?}\n[oidc_discovery]\nissuer = {issuer:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                dir.path().join("data"),
                cfg.cert_file,
                cfg.key_file().unwrap()
            ),
        )
        .unwrap()
    };
    let validate = || {
        Command::new(env!("CARGO_BIN_EXE_carapace-server"))
            .args(["validate", "--config"])
            .arg(&conf)
            .output()
            .unwrap()
    };
    write_conf("https://oidc.example.org");
    let out = validate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    write_private(cfg.key_file().unwrap(), &pki().key_pem);
    write_conf("http://oidc.example.org/?q");
    let out = validate();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    // The issuer is refused before any file is looked at.
    assert!(
        text.contains("oidc_discovery.issuer: \"http://oidc.example.org/?q\" is not an https URL"),
        "{text}"
    );
    write_conf("https://oidc.example.org");
    let out = validate();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("oidc_discovery.key_file") && text.contains("is not the key of"),
        "{text}"
    );
}

/// The Python with PyJWT: $CARAPACE_PYTHON, or target/py (scripts/test.sh makes it).
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CARAPACE_PYTHON") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/python3");
    assert!(
        p.exists(),
        "Python with PyJWT is not installed: run scripts/test.sh, or `python3 -m venv \
         target/py && target/py/bin/pip install PyJWT==2.10.1 cryptography==51.0.1`"
    );
    p
}

fn claims(
    sub: &str,
    aud: &[&str],
    iss: Option<&str>,
    exp_in: i64,
) -> serde_json::Map<String, Value> {
    let now = carapace_core::clock::unix_now();
    let mut c = json!({"sub": sub, "aud": aud, "iat": now, "exp": now + exp_in});
    if let Some(iss) = iss {
        c["iss"] = json!(iss);
    }
    c.as_object().unwrap().clone()
}

/// Runs oidc_verify.py off the runtime: (exit code, stdout, stderr).
async fn verify(r: &Running, token: &str, audience: &str) -> (i32, String, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/oidc_verify.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .arg("--discovery-url")
        .arg(format!("{}/.well-known/openid-configuration", r.issuer))
        .arg("--ca-file")
        .arg(&r.ca_file)
        .args(["--token", token, "--audience", audience]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn pyjwt_verifies_tokens_through_discovery_and_refuses_bad_ones() {
    let keys = Keys::new().await;
    let r = start(bundle_of(&[&keys.ec, &keys.rsa]), "/td").await;
    let sub = "spiffe://example.org/web";
    for key in [&keys.ec, &keys.rsa] {
        let token = carapace_core::jose::sign(
            Some(&kid(key.as_ref())),
            &claims(sub, &["vault", "aws"], Some(&r.issuer), 300),
            key.as_ref(),
        )
        .unwrap();
        let (code, out, err) = verify(&r, &token, "aws").await;
        assert_eq!(code, 0, "{:?}: {err}", key.key_type());
        let verified: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(verified["sub"], sub);
        assert_eq!(verified["aud"], json!(["vault", "aws"]));
        assert_eq!(verified["iss"], r.issuer);

        let (code, _, err) = verify(&r, &token, "gcp").await;
        assert_eq!(code, 1);
        assert!(err.contains("InvalidAudienceError"), "{err}");
    }

    // Signed by a key that is not published.
    let stranger = MemoryKeyManager::new()
        .generate_key("other", KeyType::EcP256)
        .await
        .unwrap();
    let token =
        carapace_core::jose::sign(None, &claims(sub, &["aws"], None, 300), stranger.as_ref())
            .unwrap();
    let (code, _, err) = verify(&r, &token, "aws").await;
    assert_eq!(code, 1);
    assert!(err.contains("no key for the token"), "{err}");

    // A published kid on a token another key signed.
    let forged = carapace_core::jose::sign(
        Some(&kid(keys.ec.as_ref())),
        &claims(sub, &["aws"], None, 300),
        stranger.as_ref(),
    )
    .unwrap();
    let (code, _, err) = verify(&r, &forged, "aws").await;
    assert_eq!(code, 1);
    assert!(err.contains("InvalidSignatureError"), "{err}");

    // Expired, and from another issuer.
    let expired = carapace_core::jose::sign(
        Some(&kid(keys.ec.as_ref())),
        &claims(sub, &["aws"], None, -600),
        keys.ec.as_ref(),
    )
    .unwrap();
    let (code, _, err) = verify(&r, &expired, "aws").await;
    assert_eq!(code, 1);
    assert!(err.contains("ExpiredSignatureError"), "{err}");
    let elsewhere = carapace_core::jose::sign(
        Some(&kid(keys.ec.as_ref())),
        &claims(sub, &["aws"], Some("https://evil.example"), 300),
        keys.ec.as_ref(),
    )
    .unwrap();
    let (code, _, err) = verify(&r, &elsewhere, "aws").await;
    assert_eq!(code, 1);
    assert!(err.contains("InvalidIssuerError"), "{err}");

    // A key removed from the bundle no longer verifies.
    r.bundle.send_replace(Arc::new(bundle_of(&[&keys.rsa])));
    let token = carapace_core::jose::sign(
        Some(&kid(keys.ec.as_ref())),
        &claims(sub, &["aws"], None, 300),
        keys.ec.as_ref(),
    )
    .unwrap();
    let (code, _, err) = verify(&r, &token, "aws").await;
    assert_eq!(code, 1);
    assert!(err.contains("no key for the token"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_serves_the_endpoint_from_its_own_bundle_and_stops_it_with_itself() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (cert_file, key_file, _) = write_pki(dir.path(), &pki);
    let port = free_port();
    let issuer = format!("https://localhost:{port}");
    let conf = dir.path().join("server.toml");
    let data_dir = dir.path().join("data");
    let admin = dir.path().join("admin");
    std::fs::write(
        &conf,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = {data_dir:?}\nbind_address = \"127.0.0.1:{}\"\n\
             admin_socket = {:?}\n[key_manager.memory]\n[node_attestor.join_token]\n\
             [oidc_discovery]\nbind_address = \"127.0.0.1:{port}\"\nissuer = {issuer:?}\n\
             cert_file = {cert_file:?}\nkey_file = {key_file:?}\n",
            free_port(),
            admin.join("admin.sock"),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_carapace-server"))
        .args(["run", "--config"])
        .arg(&conf)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = client_trusting(&pki.ca_der);
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            request(
                addr,
                Some(&client),
                "GET",
                "localhost",
                path,
                Duration::from_secs(5),
            )
            .await
        }
    };
    let conf_doc = eventually("the OIDC endpoint to answer", || async {
        get("/.well-known/openid-configuration").await.ok()
    })
    .await;
    let doc = body_json(&conf_doc);
    assert_eq!(doc["issuer"], issuer);
    assert_eq!(doc["jwks_uri"], format!("{issuer}/keys"));
    let jwks = body_json(&get("/keys").await.unwrap());
    assert!(jwks["keys"].is_array(), "{jwks}");
    // Whatever JWT keys the server's bundle holds, the endpoint publishes the same.
    let shown = Command::new(env!("CARGO_BIN_EXE_carapace-server"))
        .args(["bundle", "show", "--format", "spiffe", "--admin-socket"])
        .arg(admin.join("admin.sock"))
        .output()
        .unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let bundle: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let jwt_kids = |keys: &Value, use_: &str| -> Vec<String> {
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["use"] == use_)
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(jwt_kids(&jwks, "sig"), jwt_kids(&bundle, "jwt-svid"));
    assert_eq!(
        jwt_kids(&jwks, "sig").len(),
        jwks["keys"].as_array().unwrap().len()
    );

    // SIGTERM stops the endpoint with the server.
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = eventually("the server to exit", || {
        let s = server.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "{status:?}");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the OIDC port still accepts connections after the server exited"
    );
}

#[test]
fn the_server_refuses_to_start_with_a_key_that_is_not_the_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (cert_file, key_file, _) = write_pki(dir.path(), &pki);
    write_private(&key_file, &self::pki().key_pem);
    let conf = dir.path().join("server.toml");
    let data_dir = dir.path().join("data");
    std::fs::write(
        &conf,
        format!(
            "data_dir = {data_dir:?}\nbind_address = \"127.0.0.1:{}\"\nadmin_socket = {:?}\n\
             [key_manager.memory]\n[oidc_discovery]\nbind_address = \"127.0.0.1:{}\"\n\
             issuer = \"https://localhost\"\ncert_file = {cert_file:?}\nkey_file = {key_file:?}\n",
            free_port(),
            dir.path().join("admin/admin.sock"),
            free_port(),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_carapace-server"))
        .args(["run", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("oidc_discovery.key_file")
            && err.contains("is not the key of the first certificate"),
        "{err}"
    );
    assert!(
        !data_dir.exists() && !dir.path().join("admin").exists(),
        "a server that refused to start created its data directory or admin socket"
    );
}
