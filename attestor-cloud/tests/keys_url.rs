#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
//! `keys_url`: signing keys fetched over HTTPS in the background. A loopback HTTPS key
//! server (tokio-rustls + hyper, a certificate for 127.0.0.1 and localhost from a test
//! CA made here with rcgen) serves a JWKS the test can change; the server halves of
//! `gcp_iit` and `azure_msi` fetch it with the production client and verify tokens
//! signed by the keys generated here. Refresh and retry intervals are shortened through
//! the attestors' test-only `new_with_fetch_timing`; everything else is as configured.

mod common;
#[path = "common/jwt.rs"]
mod jwt_keys;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use carapace_attestor_cloud::azure::{AzureMsiAttestor, AzureServerConfig};
use carapace_attestor_cloud::gcp::{GcpIitAttestor, GcpServerConfig};
use carapace_attestor_cloud::keys::{DEFAULT_REFRESH, FetchTiming};
use carapace_core::Error;
use carapace_core::plugin::{
    AttestationResult, MemoryStateStore, NodeAttestor, NodeStateStore, PluginContext,
};
use jwt_keys::{TestKey, key, now, payload, rs256};

const AUDIENCE: &str = "spiffe://example.org";
const PROJECT: &str = "carapace-prod";
const AZURE_AUDIENCE: &str = "api://carapace-node-attestation";
const TENANT_A: &str = "0f7c1c5e-3b7e-4f3a-9c1d-6a2b8e4d9f10";
const TENANT_B: &str = "5d2e8a41-7c6b-4e19-b0a3-2f9d1c7e6b58";
const PRINCIPAL: &str = "7e1d3b2a-9c8f-4e6d-a5b4-3c2d1e0f9a8b";

/// Refreshes every 100 ms, retries after 20 ms: what `keys_refresh` (at least 1 min)
/// and the 30 s first retry would do, fast enough for a test.
const FAST: FetchTiming = FetchTiming {
    refresh: Some(Duration::from_millis(100)),
    first_retry: Duration::from_millis(20),
};

/// How long a test waits for something the background fetch should bring about.
const PATIENCE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// A test PKI and a loopback HTTPS key server.

/// A CA and a server certificate it issued for `127.0.0.1` and `localhost`.
struct Pki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn pki(name: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

/// A running HTTPS server answering every request with the current reply; stops when
/// dropped.
struct KeyServer {
    /// `https://127.0.0.1:<port>/keys`.
    url: String,
    port: u16,
    reply: Arc<Mutex<(u16, Vec<u8>)>>,
    /// HTTP requests answered.
    requests: Arc<AtomicUsize>,
    /// The SNI of each completed TLS handshake (`None`: the client sent none).
    sni: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeyServer {
    async fn start(pki: &Pki, status: u16, body: impl Into<Vec<u8>>) -> KeyServer {
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let reply = Arc::new(Mutex::new((status, body.into())));
        let requests = Arc::new(AtomicUsize::new(0));
        let sni = Arc::new(Mutex::new(Vec::new()));
        let (r, n, s) = (reply.clone(), requests.clone(), sni.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, reply, requests, sni) =
                    (acceptor.clone(), r.clone(), n.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    sni.lock()
                        .unwrap()
                        .push(stream.get_ref().1.server_name().map(str::to_owned));
                    let service = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                        let (status, body) = reply.lock().unwrap().clone();
                        requests.fetch_add(1, Ordering::SeqCst);
                        let mut resp = hyper::Response::builder().status(status);
                        if (300..400).contains(&status) {
                            resp = resp.header("location", "https://127.0.0.1:1/elsewhere");
                        }
                        let resp = resp.body(Full::new(Bytes::from(body))).unwrap();
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        KeyServer {
            url: format!("https://127.0.0.1:{port}/keys"),
            port,
            reply,
            requests,
            sni,
            task,
        }
    }

    fn reply(&self, status: u16, body: impl Into<Vec<u8>>) {
        *self.reply.lock().unwrap() = (status, body.into());
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests than now were answered, so that the fetch that got
    /// the reply before them has been dealt with.
    async fn wait_for_more_requests(&self, n: usize) {
        let target = self.requests() + n;
        until(&format!("{target} requests"), || async {
            (self.requests() >= target).then_some(())
        })
        .await;
    }
}

/// Polls `f` until it gives `Some`, for at most [`PATIENCE`].
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {PATIENCE:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn write(dir: &Path, name: &str, contents: &str) {
    std::fs::write(dir.join(name), contents).unwrap();
}

fn store() -> Arc<dyn NodeStateStore> {
    Arc::new(MemoryStateStore::default())
}

// ---------------------------------------------------------------------------------------
// gcp_iit

fn gcp_claims() -> Value {
    let now = now();
    json!({
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "sub": "112233445566778899000",
        "iat": now,
        "exp": now + 3600,
        "google": {"compute_engine": {
            "instance_id": "4821650316384512345",
            "instance_name": "web-1",
            "project_id": PROJECT,
            "zone": "europe-west1-b",
        }},
    })
}

fn gcp_config(url: &str, extra: Value) -> GcpServerConfig {
    let mut cfg = json!({
        "keys_url": url,
        "keys_ca_file": "ca.pem",
        "audience": AUDIENCE,
        "projectid_allowlist": [PROJECT],
        "allow_reattestation": true,
    });
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(cfg).unwrap()
}

/// A temp dir holding `ca.pem` (the CA of `pki`).
fn dir_with_ca(pki: &Pki) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ca.pem", &pki.ca_pem);
    dir
}

async fn attest<A: NodeAttestor>(
    att: &A,
    signer: &TestKey,
    claims: &Value,
) -> Result<AttestationResult, Error> {
    common::attest_once(att, &payload(&rs256(signer, claims))).await
}

/// Waits until a token by `signer` attests.
async fn until_attests<A: NodeAttestor>(
    att: &A,
    signer: &TestKey,
    claims: &Value,
) -> AttestationResult {
    until(&format!("a token by {} to attest", signer.kid), || async {
        attest(att, signer, claims).await.ok()
    })
    .await
}

/// Waits until attesting fails as unavailable with `want` in the message; returns it.
async fn until_unavailable_with<A: NodeAttestor>(att: &A, want: &str) -> String {
    until(&format!("Unavailable with {want:?}"), || async {
        match attest(att, key(0), &gcp_claims()).await {
            Err(Error::Unavailable(msg)) if msg.contains(want) => Some(msg),
            Err(Error::Unavailable(_)) => None,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn gcp_attests_with_keys_fetched_from_keys_url_trusting_keys_ca_file() {
    let pki = pki("key server");
    let server = KeyServer::start(&pki, 200, jwt_keys::jwks(&[key(0)])).await;
    let dir = dir_with_ca(&pki);
    // By name, so the certificate is checked against a DNS name and SNI is sent.
    let url = format!("https://localhost:{}/keys", server.port);
    // The production constructor and intervals: one fetch at startup.
    let att = GcpIitAttestor::new(
        &gcp_config(&url, json!({})),
        &PluginContext::for_tests(dir.path()),
        store(),
    )
    .unwrap();

    let r = until_attests(&att, key(0), &gcp_claims()).await;
    assert_eq!(r.agent_path, format!("{PROJECT}/4821650316384512345"));
    assert_eq!(server.requests(), 1);
    assert_eq!(*server.sni.lock().unwrap(), [Some("localhost".to_owned())]);

    // Attesting never fetches: five more attestations, still the one request.
    for _ in 0..5 {
        attest(&att, key(0), &gcp_claims()).await.unwrap();
    }
    assert_eq!(server.requests(), 1, "attestations must not fetch keys");
    // A key the server does not serve is rejected, as with a key file.
    let err = attest(&att, key(1), &gcp_claims()).await.unwrap_err();
    assert!(matches!(err, Error::AttestationRejected(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("not among the configured keys (kid-0)"),
        "{err}"
    );
}

#[tokio::test]
async fn attestations_are_unavailable_until_the_first_fetch_succeeds() {
    let pki = pki("key server");
    let server = KeyServer::start(&pki, 500, "database on fire").await;
    let dir = dir_with_ca(&pki);
    let att = GcpIitAttestor::new_with_fetch_timing(
        &gcp_config(&server.url, json!({})),
        &PluginContext::for_tests(dir.path()),
        store(),
        FAST,
    )
    .unwrap();

    let msg = until_unavailable_with(&att, "HTTP 500").await;
    assert!(
        msg.contains(&format!(
            "gcp_iit: keys not yet fetched from {}: HTTP 500 Internal Server Error database on fire",
            server.url
        )),
        "{msg}"
    );
    // Failures are retried, and the fix is picked up.
    server.wait_for_more_requests(2).await;
    server.reply(200, jwt_keys::jwks(&[key(0)]));
    until_attests(&att, key(0), &gcp_claims()).await;
}

#[tokio::test]
async fn failed_fetches_are_retried_sooner_with_a_doubling_delay_then_every_keys_refresh() {
    let pki = pki("key server");
    let server = KeyServer::start(&pki, 500, "").await;
    let dir = dir_with_ca(&pki);
    // keys_refresh as configured (1 min); only the first retry is shortened, to 20 ms.
    let timing = FetchTiming {
        refresh: None,
        first_retry: Duration::from_millis(20),
    };
    let att = GcpIitAttestor::new_with_fetch_timing(
        &gcp_config(&server.url, json!({"keys_refresh": "1m"})),
        &PluginContext::for_tests(dir.path()),
        store(),
        timing,
    )
    .unwrap();
    // Fetches at about 0, 20, 60, 140, 300 and 620 ms: a fixed 20 ms would make ~25.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed = server.requests();
    assert!((3..=6).contains(&failed), "{failed} fetches in 500 ms");
    server.reply(200, jwt_keys::jwks(&[key(0)]));
    until_attests(&att, key(0), &gcp_claims()).await;
    // After a success the next fetch waits keys_refresh (1 min).
    let after = server.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.requests(), after);
}

#[tokio::test]
async fn a_rotated_key_set_is_picked_up_after_keys_refresh_and_the_old_kid_is_gone() {
    let pki = pki("key server");
    let server = KeyServer::start(&pki, 200, jwt_keys::jwks(&[key(0)])).await;
    let dir = dir_with_ca(&pki);
    let att = GcpIitAttestor::new_with_fetch_timing(
        &gcp_config(&server.url, json!({"keys_refresh": "1m"})),
        &PluginContext::for_tests(dir.path()),
        store(),
        FAST,
    )
    .unwrap();
    until_attests(&att, key(0), &gcp_claims()).await;
    let err = attest(&att, key(1), &gcp_claims()).await.unwrap_err();
    assert!(matches!(err, Error::AttestationRejected(_)), "{err:?}");

    // Google rotates: the new set (here in the certificate-map format) has only kid-1.
    server.reply(200, jwt_keys::cert_map(&[key(1)]));
    until_attests(&att, key(1), &gcp_claims()).await;
    let err = attest(&att, key(0), &gcp_claims()).await.unwrap_err();
    assert!(matches!(err, Error::AttestationRejected(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("key \"kid-0\", which is not among the configured keys (kid-1)"),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_certificate_not_from_keys_ca_file_is_never_trusted() {
    let trusted = pki("trusted");
    let other = pki("other");
    let server = KeyServer::start(&other, 200, jwt_keys::jwks(&[key(0)])).await;
    let dir = dir_with_ca(&trusted);
    let att = GcpIitAttestor::new_with_fetch_timing(
        &gcp_config(&server.url, json!({})),
        &PluginContext::for_tests(dir.path()),
        store(),
        FAST,
    )
    .unwrap();

    let msg = until_unavailable_with(&att, "TLS handshake").await;
    assert!(
        msg.contains(&format!(
            "keys not yet fetched from {}: TLS handshake with 127.0.0.1:{}: invalid peer \
             certificate: UnknownIssuer",
            server.url, server.port
        )),
        "{msg}"
    );
    // Retried a few times, refused every time: no HTTP request ever reached the server.
    tokio::time::sleep(Duration::from_millis(200)).await;
    until_unavailable_with(&att, "UnknownIssuer").await;
    assert_eq!(server.requests(), 0);
    assert!(server.sni.lock().unwrap().is_empty());
}

#[tokio::test]
async fn without_keys_ca_file_the_system_trust_store_decides() {
    let pki = pki("private");
    let server = KeyServer::start(&pki, 200, jwt_keys::jwks(&[key(0)])).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gcp_config(&server.url, json!({}));
    cfg.keys_ca_file = None;
    match GcpIitAttestor::new_with_fetch_timing(
        &cfg,
        &PluginContext::for_tests(dir.path()),
        store(),
        FAST,
    ) {
        // The test CA is in no system store: the server is not trusted.
        Ok(att) => {
            until_unavailable_with(&att, "invalid peer certificate: UnknownIssuer").await;
            assert_eq!(server.requests(), 0);
        }
        // A machine without a CA bundle: refused at startup, saying what to do.
        Err(e) => assert!(
            e.to_string().contains("system trust store") && e.to_string().contains("keys_ca_file"),
            "{e}"
        ),
    }
}

#[tokio::test]
async fn a_bad_answer_keeps_the_last_good_key_set() {
    let pki = pki("key server");
    let server = KeyServer::start(&pki, 200, jwt_keys::jwks(&[key(0)])).await;
    let dir = dir_with_ca(&pki);
    let att = GcpIitAttestor::new_with_fetch_timing(
        &gcp_config(&server.url, json!({})),
        &PluginContext::for_tests(dir.path()),
        store(),
        FAST,
    )
    .unwrap();
    until_attests(&att, key(0), &gcp_claims()).await;

    let bad: [(u16, Vec<u8>, &str); 6] = [
        (
            200,
            b"<html>maintenance</html>".to_vec(),
            "not a key set: not JSON",
        ),
        (
            200,
            b"{\"keys\": []}".to_vec(),
            "not a key set: no RSA signature key",
        ),
        (
            200,
            jwt_keys::jwks(&[jwt_keys::weak_key()]).into_bytes(),
            "the RSA modulus is 1024 bits",
        ),
        (200, vec![b' '; 1024 * 1024 + 1], "at most 1048576 bytes"),
        (
            302,
            Vec::new(),
            "HTTP 302 Found: redirects are not followed",
        ),
        (503, b"busy".to_vec(), "HTTP 503 Service Unavailable busy"),
    ];
    for (status, body, why) in bad {
        server.reply(status, body);
        // Two more requests: the one that got the bad answer has been dealt with.
        server.wait_for_more_requests(2).await;
        until_attests(&att, key(0), &gcp_claims()).await;
        // The same answer is a failure for an attestor that never had keys: it says why.
        let fresh = GcpIitAttestor::new_with_fetch_timing(
            &gcp_config(&server.url, json!({})),
            &PluginContext::for_tests(dir.path()),
            store(),
            FAST,
        )
        .unwrap();
        until_unavailable_with(&fresh, why).await;
    }
    // Fixed: a new set replaces the kept one.
    server.reply(200, jwt_keys::jwks(&[key(1)]));
    until_attests(&att, key(1), &gcp_claims()).await;
}

#[tokio::test]
async fn dropping_the_attestor_stops_its_background_fetch() {
    let pki = pki("key server");
    let server = KeyServer::start(&pki, 200, jwt_keys::jwks(&[key(0)])).await;
    let dir = dir_with_ca(&pki);
    let att = GcpIitAttestor::new_with_fetch_timing(
        &gcp_config(&server.url, json!({})),
        &PluginContext::for_tests(dir.path()),
        store(),
        FAST,
    )
    .unwrap();
    until_attests(&att, key(0), &gcp_claims()).await;
    server.wait_for_more_requests(2).await;
    drop(att);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = server.requests();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        server.requests(),
        after,
        "fetched after the attestor was dropped"
    );
}

// ---------------------------------------------------------------------------------------
// azure_msi

fn azure_claims(tid: &str) -> Value {
    let now = now();
    json!({
        "aud": AZURE_AUDIENCE,
        "iss": format!("https://sts.windows.net/{tid}/"),
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
        "oid": PRINCIPAL,
        "sub": PRINCIPAL,
        "tid": tid,
    })
}

fn azure_config(tenants: Value) -> AzureServerConfig {
    serde_json::from_value(json!({
        "audience": AZURE_AUDIENCE,
        "tenants": tenants,
        "allow_reattestation": true,
    }))
    .unwrap()
}

#[tokio::test]
async fn azure_tenants_each_use_their_own_key_source_including_keys_url() {
    let pki = pki("login");
    let server = KeyServer::start(&pki, 200, jwt_keys::jwks(&[key(0)])).await;
    let dir = dir_with_ca(&pki);
    write(dir.path(), "tenant-b.json", &jwt_keys::jwks(&[key(1)]));
    let cfg = azure_config(json!({
        TENANT_A: {"keys_url": server.url, "keys_ca_file": "ca.pem", "keys_refresh": "10m"},
        TENANT_B: {"keys_path": "tenant-b.json"},
    }));
    let att = AzureMsiAttestor::new_with_fetch_timing(
        &cfg,
        &PluginContext::for_tests(dir.path()),
        store(),
        FAST,
    )
    .unwrap();

    let r = until_attests(&att, key(0), &azure_claims(TENANT_A)).await;
    assert_eq!(r.agent_path, format!("{TENANT_A}/{PRINCIPAL}"));
    attest(&att, key(1), &azure_claims(TENANT_B)).await.unwrap();
    // Tenant A's fetched key does not vouch for tenant B, nor B's file for A.
    for (signer, tid) in [(key(0), TENANT_B), (key(1), TENANT_A)] {
        let err = attest(&att, signer, &azure_claims(tid)).await.unwrap_err();
        assert!(matches!(err, Error::AttestationRejected(_)), "{err:?}");
        assert!(
            err.to_string().contains(&format!("tenant {tid}: ")),
            "{err}"
        );
    }

    // Before its first fetch, only the URL tenant is unavailable, named in the message.
    let broken = KeyServer::start(&pki, 404, "no such tenant").await;
    let cfg = azure_config(json!({
        TENANT_A: {"keys_url": broken.url, "keys_ca_file": "ca.pem"},
        TENANT_B: {"keys_path": "tenant-b.json"},
    }));
    let att = AzureMsiAttestor::new_with_fetch_timing(
        &cfg,
        &PluginContext::for_tests(dir.path()),
        store(),
        FAST,
    )
    .unwrap();
    let msg = until("tenant A unavailable with HTTP 404", || async {
        match attest(&att, key(0), &azure_claims(TENANT_A)).await {
            Err(Error::Unavailable(msg)) if msg.contains("HTTP 404") => Some(msg),
            Err(Error::Unavailable(_)) => None,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    })
    .await;
    assert!(
        msg.contains(&format!(
            "azure_msi: tenant {TENANT_A}: keys not yet fetched from {}: HTTP 404 Not Found no \
             such tenant",
            broken.url
        )),
        "{msg}"
    );
    attest(&att, key(1), &azure_claims(TENANT_B)).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Settings

#[test]
fn key_settings_are_validated_naming_each_problem() {
    let gcp = |keys: Value| -> Vec<String> {
        let mut cfg = json!({"audience": AUDIENCE, "projectid_allowlist": [PROJECT]});
        cfg.as_object_mut()
            .unwrap()
            .extend(keys.as_object().unwrap().clone());
        let cfg: GcpServerConfig = serde_json::from_value(cfg).unwrap();
        match cfg.validate() {
            Ok(()) => Vec::new(),
            Err(p) => p,
        }
    };
    let url = "https://www.googleapis.com/oauth2/v3/certs";
    assert!(gcp(json!({"keys_url": url})).is_empty());
    assert!(
        gcp(json!({"keys_url": url, "keys_refresh": "24h", "keys_ca_file": "ca.pem"})).is_empty()
    );
    assert!(gcp(json!({"keys_path": "k.json"})).is_empty());
    for (keys, want) in [
        (
            json!({"keys_path": "k.json", "keys_url": url}),
            "keys_path and keys_url are both set",
        ),
        (json!({}), "keys_path or keys_url is required"),
        (
            json!({"keys_url": "http://www.googleapis.com/oauth2/v3/certs"}),
            "keys_url: \"http://www.googleapis.com/oauth2/v3/certs\": plain http:// is refused",
        ),
        (
            json!({"keys_url": "www.googleapis.com/oauth2/v3/certs"}),
            "must start with https://",
        ),
        (
            json!({"keys_url": url, "keys_refresh": "30s"}),
            "keys_refresh 30s must be between 60s and 86400s",
        ),
        (
            json!({"keys_url": url, "keys_refresh": "25h"}),
            "keys_refresh 90000s must be between 60s and 86400s",
        ),
        (
            json!({"keys_path": "k.json", "keys_ca_file": "ca.pem"}),
            "keys_ca_file is set but keys_url is not",
        ),
        (
            json!({"keys_path": "k.json", "keys_refresh": "1h"}),
            "keys_refresh is set but keys_url is not",
        ),
    ] {
        let problems = gcp(keys.clone());
        assert_eq!(problems.len(), 1, "{keys}: {problems:?}");
        assert!(problems[0].contains(want), "{keys}: {problems:?}");
    }
    // Several at once are all named.
    let problems = gcp(json!({"keys_url": "http://h/", "keys_refresh": "1s", "keys_path": "k"}));
    assert_eq!(problems.len(), 3, "{problems:?}");
    // The default refresh is an hour.
    let cfg: GcpServerConfig = serde_json::from_value(json!({
        "keys_url": url, "audience": AUDIENCE, "projectid_allowlist": [PROJECT],
    }))
    .unwrap();
    assert_eq!(cfg.keys_refresh, None);
    assert_eq!(DEFAULT_REFRESH, Duration::from_secs(3600));

    // Azure: per tenant, named with the tenant.
    let problems = azure_config(json!({
        TENANT_A: {"keys_url": "http://login.microsoftonline.com/x/discovery/v2.0/keys"},
        TENANT_B: {"keys_path": "b.json", "keys_url": "https://login.microsoftonline.com/"},
    }))
    .validate()
    .unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains(&format!("tenants.{TENANT_A}.keys_url: ")),
        "{problems:?}"
    );
    assert!(
        problems[0].contains("plain http:// is refused"),
        "{problems:?}"
    );
    assert!(
        problems[1].contains(&format!(
            "tenants.{TENANT_B}.keys_path and tenants.{TENANT_B}.keys_url are both set"
        )),
        "{problems:?}"
    );
    let problems =
        azure_config(json!({TENANT_A: {"keys_ca_file": "ca.pem", "keys_refresh": "2h"}}))
            .validate()
            .unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:?}");

    // new() refuses them with the same words.
    let dir = tempfile::tempdir().unwrap();
    let err = GcpIitAttestor::new(
        &gcp_config("http://127.0.0.1:1/keys", json!({})),
        &PluginContext::for_tests(dir.path()),
        store(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::PluginConfig { .. }), "{err:?}");
    assert!(
        err.to_string().contains("plain http:// is refused"),
        "{err}"
    );
}

#[test]
fn opening_keys_url_needs_the_ca_file_and_a_tokio_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = gcp_config("https://127.0.0.1:1/keys", json!({}));
    // The CA file is read at startup, relative to the base dir.
    let err = GcpIitAttestor::new(&cfg, &PluginContext::for_tests(dir.path()), store())
        .unwrap_err()
        .to_string();
    assert!(err.contains("node_attestor.gcp_iit"), "{err}");
    assert!(err.contains("keys_ca_file: CA file"), "{err}");
    assert!(err.contains("ca.pem"), "{err}");
    write(dir.path(), "ca.pem", "no certificates here");
    let err = GcpIitAttestor::new(&cfg, &PluginContext::for_tests(dir.path()), store())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no PEM CERTIFICATE"), "{err}");
    // Outside a tokio runtime there is nowhere to fetch in the background.
    write(dir.path(), "ca.pem", &pki("any").ca_pem);
    let err = GcpIitAttestor::new(&cfg, &PluginContext::for_tests(dir.path()), store())
        .unwrap_err()
        .to_string();
    assert!(err.contains("keys_url: the keys are fetched by a background task, which needs a running tokio runtime"), "{err}");
    // A key file needs neither.
    write(dir.path(), "k.json", &jwt_keys::jwks(&[key(0)]));
    let cfg: GcpServerConfig = serde_json::from_value(json!({
        "keys_path": "k.json", "audience": AUDIENCE, "projectid_allowlist": [PROJECT],
    }))
    .unwrap();
    GcpIitAttestor::new(&cfg, &PluginContext::for_tests(dir.path()), store()).unwrap();
}
