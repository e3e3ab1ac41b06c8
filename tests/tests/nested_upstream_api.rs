//! End to end: the upstream API (issue 20, nested servers) of a real server, called over
//! TLS by a client presenting workload SVIDs a real agent gave this process (what a
//! downstream server does through its agent's Workload API).
//!
//! - `MintDownstreamCA` for an entry marked `--downstream`: the CA certifies the CSR's key,
//!   pathLen 0, the trust domain's URI SAN, `OU=DOWNSTREAM-1`, notAfter within
//!   `[downstream] ca_ttl_max`; a leaf the test signs with the new CA's key verifies
//!   against the server's bundle with `openssl verify`; the signing is counted in
//!   `/metrics`.
//! - Refused, each with its gRPC code and a message naming the problem: a CSR for another
//!   trust domain or with a path, a pathLen beyond the grant, a caller past its rate
//!   limit, an SVID whose entry is not `--downstream`, the agent's own SVID, an entry that
//!   lost the flag (`entry update`) or was deleted, and a server without `[downstream]`.
//! - `PublishJWTAuthority`: a downstream's JWT key (kid = its thumbprint) is served in
//!   the bundle (`bundle show`); a wrong kid and a caller without the flag are refused.
//! - `WatchBundle`: the bundle at once, a `localauthority x509 prepare` within seconds,
//!   and the stream ends with `PermissionDenied` once the caller's entry loses the flag.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use carapace_core::TrustBundle;
use carapace_core::bundle::{certs_from_pem, der_to_pem};
use carapace_e2e::{
    Agent, Lab, Server, SvidFiles, free_port, now, openssl_verify, td, uid_selector,
};
use carapace_proto::carapace::types::v1::JwtKey;
use carapace_proto::carapace::upstream::v1::upstream_client::UpstreamClient;
use carapace_proto::carapace::upstream::v1::{
    MintDownstreamCaRequest, PublishJwtAuthorityRequest, WatchBundleRequest,
};
use rcgen::{CertificateParams, DnType, Issuer, KeyPair, SanType};
use tonic::Code;
use tonic::transport::Channel;

const SITE_A: &str = "spiffe://example.org/downstream/site-a";
const SITE_B: &str = "spiffe://example.org/downstream/site-b";
const WEB_ID: &str = "spiffe://example.org/web";
const TD_URI: &str = "spiffe://example.org";
/// `[downstream] ca_ttl_max` of the test's server.
const CA_TTL_MAX: u64 = 3600;

/// The agent's own SVID and key (what a thief of the node's identity holds).
fn agent_files(lab: &Lab, agent: &Agent, bundle: &Path) -> SvidFiles {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.data_dir.join("agent.json")).unwrap()).unwrap();
    let files = SvidFiles {
        svid: lab.path().join("agent-svid.pem"),
        key: agent
            .data_dir
            .join("keys")
            .join(format!("{}.key", state["key_id"].as_str().unwrap())),
        bundle: bundle.to_owned(),
    };
    std::fs::write(&files.svid, state["svid_chain_pem"].as_str().unwrap()).unwrap();
    assert!(files.key.exists(), "{:?}", files.key);
    files
}

/// An upstream API client over TLS presenting `files`' SVID, verifying the server as
/// `spiffe://example.org/spire/server` under `files`' bundle.
async fn client(server: &Server, files: &SvidFiles) -> UpstreamClient<Channel> {
    let chain = certs_from_pem(&std::fs::read_to_string(&files.svid).unwrap()).unwrap();
    let key = carapace_keymanager_soft::load_key_file(&files.key, "svid").unwrap();
    let bundle =
        TrustBundle::from_pem(td(), &std::fs::read_to_string(&files.bundle).unwrap()).unwrap();
    let (_keep, rx) = tokio::sync::watch::channel(Arc::new(bundle));
    let tls = carapace_tls::client_config(
        rx,
        td().server_id(),
        Some(carapace_tls::certified_key(&chain, Arc::new(key))),
    )
    .unwrap();
    let channel = carapace_common::tls_channel(
        &server.address,
        Arc::new(tls),
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    UpstreamClient::new(channel)
}

/// A new CA key and a CSR for it whose only SAN is the URI `san`.
fn csr(san: &str) -> (KeyPair, Vec<u8>) {
    let kp = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(san.try_into().unwrap())];
    let der = params.serialize_request(&kp).unwrap().der().to_vec();
    (kp, der)
}

fn request(csr: &[u8], path_len: u32) -> MintDownstreamCaRequest {
    MintDownstreamCaRequest {
        csr: csr.to_vec(),
        preferred_ttl_seconds: 0,
        path_len,
    }
}

/// A call that must be refused with `code`, its message containing `needle`.
async fn assert_refused(
    client: &mut UpstreamClient<Channel>,
    req: MintDownstreamCaRequest,
    code: Code,
    needle: &str,
) {
    let err = client.mint_downstream_ca(req).await.unwrap_err();
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(needle), "{needle:?} in {err:?}");
}

/// `openssl x509 -text` of a DER certificate.
fn openssl_text(lab: &Lab, der: &[u8]) -> String {
    let path = lab.path().join("inspect.pem");
    std::fs::write(&path, der_to_pem(der)).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("openssl not found ({e}): apt-get install openssl"));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A leaf X509-SVID for `id`, signed by the downstream CA (`ca_der` with `ca_key`), as PEM.
fn leaf_pem(ca_der: &[u8], ca_key: &KeyPair, id: &str) -> String {
    let issuer = Issuer::from_ca_cert_der(&ca_der.into(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "leaf");
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.signed_by(&key, &issuer).unwrap().pem()
}

fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", url])
        .output()
        .unwrap_or_else(|e| panic!("curl not found ({e}): apt-get install curl"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn downstream_entries_get_cas_within_the_grant_and_everyone_else_is_refused() {
    let lab = Lab::new();
    let health = format!("127.0.0.1:{}", free_port());
    let config = lab.path().join("server.toml");
    let with_downstream = format!(
        "[health]\nbind_address = {health:?}\n[downstream]\nmax_depth = 1\nca_ttl_max = \"1h\"\n"
    );
    std::fs::write(&config, &with_downstream).unwrap();
    let mut server = Server::start_with(&lab, &["--config", config.to_str().unwrap()]);
    let agent = Agent::start(&lab, &server, "agent");
    let uid = uid_selector();
    let entry_a = server.create_entry(&agent.id, SITE_A, &[&uid], &["--downstream"]);
    let entry_b = server.create_entry(&agent.id, SITE_B, &[&uid], &["--downstream"]);
    server.create_entry(&agent.id, WEB_ID, &[&uid], &[]);
    for id in [SITE_A, SITE_B, WEB_ID] {
        agent.wait_for_svid(id).await;
    }
    let dir = lab.path().join("workload");
    let site_a = agent.fetch_files(&dir, SITE_A);
    let site_b = agent.fetch_files(&dir, SITE_B);
    let web = agent.fetch_files(&dir, WEB_ID);
    let mut a = client(&server, &site_a).await;
    let mut b = client(&server, &site_b).await;

    // The bundle watch of site-b: the bundle at once.
    let mut watch = b
        .watch_bundle(WatchBundleRequest { known_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the bundle at once")
        .unwrap()
        .unwrap();
    assert_eq!(first.trust_domain, "example.org");
    assert_eq!(first.x509_authorities.len(), 1);

    // A CA for site-a.
    let (ca_key, ca_csr) = csr(TD_URI);
    let asked_at = now() as i64;
    let minted = a
        .mint_downstream_ca(request(&ca_csr, 0))
        .await
        .unwrap()
        .into_inner();
    // Outside the grant: another trust domain, a path, a deeper CA. (Right after the
    // mint, so that site-a's three calls are "at once" for the rate limit.)
    let (_, other_td) = csr("spiffe://other.test");
    assert_refused(
        &mut a,
        request(&other_td, 0),
        Code::PermissionDenied,
        "csr: SAN spiffe://other.test is in trust domain other.test, not example.org",
    )
    .await;
    let (_, with_path) = csr("spiffe://example.org/downstream/site-a");
    assert_refused(
        &mut a,
        request(&with_path, 0),
        Code::PermissionDenied,
        "a CA certificate names the trust domain only, not a path",
    )
    .await;
    // site-a has had three calls at once: the fourth waits its turn.
    assert_refused(
        &mut a,
        request(&ca_csr, 0),
        Code::ResourceExhausted,
        &format!("{SITE_A} called MintDownstreamCA more than 3 times at once"),
    )
    .await;
    assert_refused(
        &mut b,
        request(&ca_csr, 1),
        Code::PermissionDenied,
        "path_len 1 is beyond the grant: [downstream] max_depth = 1",
    )
    .await;

    assert_eq!(
        minted.ca_chain.len(),
        1,
        "a self-signed upstream CA is in the bundle"
    );
    let ca_der = &minted.ca_chain[0];
    assert_eq!(
        carapace_core::x509svid::public_key_of(ca_der).unwrap(),
        rcgen::PublicKeyData::subject_public_key_info(&ca_key),
        "the CA certifies the CSR's key"
    );
    let text = openssl_text(&lab, ca_der);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("URI:spiffe://example.org\n"), "{text}");
    assert!(text.contains("DOWNSTREAM-1"), "{text}");
    let (_, not_after) = carapace_core::x509svid::validity_of(ca_der).unwrap();
    assert!(
        not_after <= now() as i64 + CA_TTL_MAX as i64
            && not_after >= asked_at + CA_TTL_MAX as i64 - 5,
        "notAfter {not_after} is [downstream] ca_ttl_max from {asked_at}"
    );
    let bundle_pem = server.bundle_pem();
    let answered = minted.bundle.unwrap();
    assert_eq!(
        answered.x509_authorities,
        certs_from_pem(&bundle_pem).unwrap(),
        "the answer carries the server's bundle"
    );
    // A leaf the downstream signs with its new CA verifies to the server's bundle.
    let chain_pem = format!(
        "{}{}",
        leaf_pem(ca_der, &ca_key, "spiffe://example.org/under/site-a"),
        der_to_pem(ca_der)
    );
    let verified = openssl_verify(&lab, &chain_pem, &bundle_pem);
    assert!(verified.contains(": OK"), "{verified}");
    // ... and not without the CA in the chain.
    let alone = openssl_verify(
        &lab,
        &leaf_pem(ca_der, &ca_key, "spiffe://example.org/under/site-a"),
        &bundle_pem,
    );
    assert!(!alone.contains(": OK"), "{alone}");
    // The signing is counted.
    let metrics = curl(&format!("http://{health}/metrics"));
    assert!(
        metrics.contains("carapace_server_downstream_cas_signed_total 1\n"),
        "{metrics}"
    );

    // Callers that are not downstream servers.
    let mut w = client(&server, &web).await;
    assert_refused(
        &mut w,
        request(&ca_csr, 0),
        Code::PermissionDenied,
        &format!("{WEB_ID} has no registration entry marked downstream; create one with `entry create ... --downstream`"),
    )
    .await;
    let mut node = client(&server, &agent_files(&lab, &agent, &web.bundle)).await;
    assert_refused(
        &mut node,
        request(&ca_csr, 0),
        Code::PermissionDenied,
        &format!("{} is an agent's SVID", agent.id),
    )
    .await;

    // A prepared CA reaches the watch within seconds.
    server.cli_json(&["localauthority", "x509", "prepare"]);
    let prepared = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the prepared CA within 5s")
        .unwrap()
        .unwrap();
    assert_eq!(prepared.x509_authorities.len(), 2, "{prepared:?}");
    assert!(prepared.sequence > first.sequence);

    // site-b loses the flag: its watch ends, its next call is refused.
    let out = server.cli_json(&[
        "entry",
        "update",
        "--id",
        &entry_b,
        "--parent-id",
        &agent.id,
        "--spiffe-id",
        SITE_B,
        "--selector",
        &uid,
    ]);
    assert_eq!(out["downstream"], false, "{out}");
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch ends within 5s")
        .unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
    assert!(
        end.message().contains(&format!(
            "{SITE_B} has no registration entry marked downstream"
        )),
        "{end:?}"
    );
    assert_refused(
        &mut b,
        request(&ca_csr, 0),
        Code::PermissionDenied,
        &format!("{SITE_B} has no registration entry marked downstream"),
    )
    .await;
    // site-a publishes its JWT key: it joins the bundle the server serves. A kid that is
    // not the key's thumbprint is refused.
    let jwt = KeyPair::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&jwt);
    let kid = carapace_core::jose::PublicKey::from_spki_der(&spki)
        .unwrap()
        .thumbprint();
    let publish = |kid: &str| PublishJwtAuthorityRequest {
        key: Some(JwtKey {
            kid: kid.to_owned(),
            public_key: spki.clone(),
            expires_at: now() as i64 + 1800,
        }),
    };
    let err = a.publish_jwt_authority(publish("mine")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("key.kid \"mine\" is not the RFC 7638 thumbprint of the key"),
        "{err:?}"
    );
    let published = a
        .publish_jwt_authority(publish(&kid))
        .await
        .unwrap()
        .into_inner()
        .bundle
        .unwrap();
    assert!(
        published.jwt_authorities.iter().any(|k| k.kid == kid),
        "{published:?}"
    );
    let shown = server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert!(
        shown["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == kid.as_str() && k["use"] == "jwt-svid"),
        "{shown}"
    );
    // The web workload cannot publish.
    let err = w.publish_jwt_authority(publish(&kid)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // site-a's entry deleted: refused (authorization comes before the rate limit).
    server.cli_ok(&["entry", "delete", "--id", &entry_a]);
    assert_refused(
        &mut a,
        request(&ca_csr, 0),
        Code::PermissionDenied,
        &format!("{SITE_A} has no registration entry marked downstream"),
    )
    .await;

    // The same server without [downstream]: a downstream entry gets no CA, and is told why.
    std::fs::write(&config, format!("[health]\nbind_address = {health:?}\n")).unwrap();
    server.restart();
    server.cli_json(&[
        "entry",
        "update",
        "--id",
        &entry_b,
        "--parent-id",
        &agent.id,
        "--spiffe-id",
        SITE_B,
        "--selector",
        &uid,
        "--downstream",
    ]);
    let mut b = client(&server, &site_b).await;
    assert_refused(
        &mut b,
        request(&ca_csr, 0),
        Code::FailedPrecondition,
        "this server signs no downstream CA: its configuration has no [downstream] section",
    )
    .await;
    let metrics = curl(&format!("http://{health}/metrics"));
    assert!(
        metrics.contains("carapace_server_downstream_cas_signed_total 0\n"),
        "{metrics}"
    );
}
