//! The agent → server trust boundary, probed directly: a client speaking the node API to
//! the real server binary, with the agent library's own TLS and attestation code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::sync::Arc;

use carapace_agent::node_client;
use carapace_core::plugin::KeyManager;
use carapace_core::{KeyType, TrustBundle};
use carapace_e2e::{Lab, Server, now, td};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_proto::node::node_client::NodeClient;
use carapace_proto::node::{
    BatchNewX509svidRequest, NewJwtsvidRequest, NewX509svidParams, RenewAgentRequest,
    SyncAuthorizedRequest,
};
use tokio::sync::watch;
use tonic::transport::Channel;

#[path = "support/node_agent.rs"]
#[allow(dead_code, reason = "each test file uses part of it")]
mod node_agent;
use node_agent::{TestAgent, attest};

/// A CSR that asks for `san` (which the server must ignore).
fn csr_asking_for(san: &str) -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().unwrap())];
    p.serialize_request(&kp).unwrap().der().to_vec()
}

fn entry_id_of(server: &Server, spiffe_id: &str) -> String {
    server.cli_json(&["entry", "show", "--spiffe-id", spiffe_id])["entries"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A server with two attested agents, A with the entry `a-web` and B with `b-db`.
async fn two_agents(lab: &Lab) -> (Server, TestAgent, TestAgent) {
    let server = Server::start(lab);
    let km = MemoryKeyManager::new();
    let a = attest(&server, &km, "a").await;
    let b = attest(&server, &km, "b").await;
    server.create_entry(&a.id, "spiffe://example.org/a-web", &["unix:uid:1"], &[]);
    server.create_entry(&b.id, "spiffe://example.org/b-db", &["unix:uid:2"], &[]);
    (server, a, b)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_gets_only_its_own_entries_and_only_their_ids() {
    let lab = Lab::new();
    let (server, a, _b) = two_agents(&lab).await;
    let a_entry = entry_id_of(&server, "spiffe://example.org/a-web");
    let b_entry = entry_id_of(&server, "spiffe://example.org/b-db");

    // Sync: A sees only its entry.
    let mut stream = a
        .client()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let ids: Vec<&str> = first.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/a-web"]);

    // Signing: A's entry is signed with the entry's ID even though the CSR asks for B's;
    // B's entry is refused to A.
    let resp = a
        .client()
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![
                NewX509svidParams {
                    entry_id: a_entry.clone(),
                    csr: csr_asking_for("spiffe://example.org/b-db"),
                },
                NewX509svidParams {
                    entry_id: b_entry.clone(),
                    csr: csr_asking_for("spiffe://example.org/b-db"),
                },
                NewX509svidParams {
                    entry_id: "no-such-entry".into(),
                    csr: csr_asking_for("spiffe://example.org/x"),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results.len(), 3);
    let signed = resp.results[0]
        .svid
        .as_ref()
        .expect("A's own entry is signed");
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let v = carapace_core::x509svid::verify_chain(&signed.cert_chain, &bundle, now()).unwrap();
    assert_eq!(
        v.spiffe_id.as_str(),
        "spiffe://example.org/a-web",
        "the SPIFFE ID comes from the entry, not the CSR"
    );
    for r in &resp.results[1..] {
        assert!(r.svid.is_none());
        assert_eq!(r.error_code, tonic::Code::PermissionDenied as i32, "{r:?}");
        assert!(r.error_message.contains("not authorized for this agent"));
    }

    // A CSR whose signature does not verify is refused.
    let mut bad = csr_asking_for("spiffe://example.org/a-web");
    let n = bad.len();
    bad[n - 3] ^= 0x55;
    let resp = a
        .client()
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: a_entry,
                csr: bad,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.results[0].error_code,
        tonic::Code::InvalidArgument as i32
    );
}

/// The server's JWT keys as a relying party reads them: `bundle show --format spiffe`.
fn jwt_keys_of(server: &Server) -> carapace_core::jose::KeySet {
    let json = server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let jwt: Vec<&serde_json::Value> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .collect();
    assert_eq!(jwt.len(), 1, "one JWT key on a fresh server: {json}");
    carapace_core::jose::KeySet::from_jwks(
        &serde_json::json!(jwt),
        &carapace_core::jose::Algorithm::ALL,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_gets_jwt_svids_only_for_its_own_entries_and_they_verify_with_the_bundle() {
    let lab = Lab::new();
    let (server, a, _b) = two_agents(&lab).await;
    let a_entry = entry_id_of(&server, "spiffe://example.org/a-web");
    let b_entry = entry_id_of(&server, "spiffe://example.org/b-db");
    let ask = |entry: &str, aud: &[&str]| NewJwtsvidRequest {
        entry_id: entry.to_owned(),
        audience: aud.iter().map(|a| a.to_string()).collect(),
    };

    let svid = a
        .client()
        .new_jwtsvid(ask(&a_entry, &["billing", "audit"]))
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/a-web");
    // The default lifetime: five minutes.
    assert_eq!(svid.expires_at - svid.issued_at, 300);
    let keys = jwt_keys_of(&server);
    let mut policy = carapace_core::jose::Policy::new(
        &carapace_core::jose::Algorithm::ALL,
        std::time::SystemTime::now(),
        std::time::Duration::from_secs(5),
    );
    policy.audience = Some("audit");
    let claims = carapace_core::jose::verify(&svid.token, &keys, &policy).unwrap();
    assert_eq!(claims.as_map()["sub"], "spiffe://example.org/a-web");
    assert_eq!(
        claims.as_map()["aud"],
        serde_json::json!(["billing", "audit"])
    );
    assert_eq!(claims.as_map()["exp"], svid.expires_at);

    // Another agent's entry and an unknown one: refused, nothing signed.
    for entry in [b_entry.as_str(), "no-such-entry"] {
        let err = a
            .client()
            .new_jwtsvid(ask(entry, &["x"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains("not authorized for this agent"),
            "{err:?}"
        );
    }
    // No audience, or an empty one: refused, naming it.
    let err = a
        .client()
        .new_jwtsvid(ask(&a_entry, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("audience is required"), "{err:?}");
    let err = a
        .client()
        .new_jwtsvid(ask(&a_entry, &["x", ""]))
        .await
        .unwrap_err();
    assert!(err.message().contains("audience[1] is empty"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_client_svid_are_unauthenticated() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(bundle));
    let tls = carapace_tls::client_config(rx, td().server_id(), None).unwrap();
    let mut client = node_client::channel(&server.address, Arc::new(tls)).unwrap();
    let err = client
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_svid_from_another_ca_is_rejected_in_the_handshake() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let other_lab = Lab::new();
    let other = Server::start(&other_lab);
    let km = MemoryKeyManager::new();
    let mut foreign = attest(&other, &km, "foreign").await;
    // Trust the right server, but present an SVID from another CA of the same trust domain.
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(bundle));
    foreign.bundle = rx;
    foreign.address = server.address.clone();
    let err = foreign
        .client()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap_err();
    // TLS 1.3 clients learn of a rejected certificate only when the connection drops.
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "a transport failure, not an answer: {err:?}"
    );
    carapace_e2e::eventually("the server to log the rejected handshake", || async {
        server.log().contains("TLS handshake failed").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_renewal_only_the_latest_svid_is_accepted_and_eviction_locks_out() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let km = MemoryKeyManager::new();
    let mut a = attest(&server, &km, "a").await;
    let new_key = km.generate_key("a2", KeyType::EcP256).await.unwrap();
    let resp = a
        .client()
        .renew_agent(RenewAgentRequest {
            csr: carapace_tls::csr_for_key(new_key.clone()).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    let old = TestAgent {
        id: a.id.clone(),
        chain: a.chain.clone(),
        key: a.key.clone(),
        bundle: a.bundle.clone(),
        address: a.address.clone(),
    };
    a.chain = resp.svid.unwrap().cert_chain;
    a.key = new_key;
    // Until the new SVID is used, the old one still works (a lost renewal reply must not lock the agent out).
    old.client()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap();
    // Using the new SVID makes it the only one accepted.
    a.client()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap();
    let err = old
        .client()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("not its latest"), "{err:?}");
    // Evicted: refused, and told why.
    server.cli_ok(&["agent", "evict", "--spiffe-id", &a.id]);
    let err = a
        .client()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("not attested"), "{err:?}");
}

/// Reads `stream` until it fails; returns the status and when it came.
async fn stream_end(
    stream: &mut tonic::Streaming<carapace_proto::node::SyncAuthorizedResponse>,
) -> (tonic::Status, std::time::Instant) {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(60), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(s)) => return (s, std::time::Instant::now()),
            Err(_) => panic!("the stream did not end within 60 s"),
        }
    }
}

/// A batch signing request for `entry_id` with a fresh key.
fn batch_for(entry_id: &str) -> BatchNewX509svidRequest {
    BatchNewX509svidRequest {
        params: vec![NewX509svidParams {
            entry_id: entry_id.to_owned(),
            csr: csr_asking_for("spiffe://example.org/ignored"),
        }],
    }
}

/// An attested agent with one entry, one connection (its client certificate accepted
/// while the SVID was valid), an open sync stream past its first message, and one
/// SVID already signed on that connection.
async fn connected_agent(
    server: &Server,
    km: &MemoryKeyManager,
) -> (
    TestAgent,
    String,
    NodeClient<Channel>,
    tonic::Streaming<carapace_proto::node::SyncAuthorizedResponse>,
) {
    let a = attest(server, km, "a").await;
    let entry = server.create_entry(&a.id, "spiffe://example.org/w", &["unix:uid:1"], &[]);
    let mut client = a.client();
    let mut stream = client
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let signed = client.batch_new_x509svid(batch_for(&entry)).await.unwrap();
    assert!(signed.into_inner().results[0].svid.is_some());
    (a, entry, client, stream)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ban_ends_the_open_stream_within_a_second_and_every_later_call_on_the_connection_is_refused()
 {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let km = MemoryKeyManager::new();
    let (a, entry, mut client, mut stream) = connected_agent(&server, &km).await;

    server.cli_ok(&["agent", "ban", "--spiffe-id", &a.id]);
    let banned = std::time::Instant::now();
    let (status, ended) = stream_end(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("banned"), "{status:?}");
    assert!(
        ended.duration_since(banned) < std::time::Duration::from_secs(1),
        "the stream ended {:?} after the ban",
        ended.duration_since(banned)
    );
    let err = client
        .batch_new_x509svid(batch_for(&entry))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = client
        .renew_agent(RenewAgentRequest {
            csr: csr_asking_for("spiffe://example.org/ignored"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn once_the_agent_svid_expires_its_open_stream_ends_and_nothing_more_is_signed_on_the_connection()
 {
    let lab = Lab::new();
    let config = lab.path().join("server.toml");
    std::fs::write(&config, "agent_svid_ttl = \"10s\"\n").unwrap();
    let server = Server::start_with(&lab, &["--config", config.to_str().unwrap()]);
    let km = MemoryKeyManager::new();
    let (a, entry, mut client, mut stream) = connected_agent(&server, &km).await;
    let (_, not_after) = carapace_core::x509svid::validity_of(&a.chain[0]).unwrap();

    let (status, _) = stream_end(&mut stream).await;
    let ended = now() as i64;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    assert!(
        (not_after..=not_after + 1).contains(&ended),
        "the stream ended at {ended}, the SVID expired at {not_after}"
    );
    // Same connection, later calls: refused, nothing signed.
    let err = client
        .batch_new_x509svid(batch_for(&entry))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");
    let err = client
        .renew_agent(RenewAgentRequest {
            csr: csr_asking_for("spiffe://example.org/ignored"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

/// A foreign bundle for `td`: one CA certificate of a trust domain of that name (the
/// `bundle set --format pem` input).
fn foreign_ca_pem(td: &str) -> String {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{td}").try_into().unwrap(),
    )];
    p.self_signed(&kp).unwrap().pem()
}

fn set_bundle(server: &Server, lab: &Lab, td: &str) -> Vec<u8> {
    let pem = foreign_ca_pem(td);
    let path = lab.path().join(format!("{td}.pem"));
    std::fs::write(&path, &pem).unwrap();
    server.cli_ok(&[
        "bundle",
        "set",
        "--trust-domain",
        td,
        "--path",
        path.to_str().unwrap(),
    ]);
    carapace_core::bundle::certs_from_pem(&pem)
        .unwrap()
        .remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_is_sent_only_the_foreign_bundles_its_entries_federate_with() {
    let lab = Lab::new();
    let (server, a, b) = two_agents(&lab).await;
    let x_ca = set_bundle(&server, &lab, "x.test");
    set_bundle(&server, &lab, "y.test");
    let a_entry = entry_id_of(&server, "spiffe://example.org/a-web");
    server.cli_ok(&[
        "entry",
        "update",
        "--id",
        &a_entry,
        "--parent-id",
        &a.id,
        "--spiffe-id",
        "spiffe://example.org/a-web",
        "--selector",
        "unix:uid:1",
        "--federates-with",
        "x.test",
    ]);
    let names = |m: &carapace_proto::node::SyncAuthorizedResponse| -> Vec<String> {
        m.federated_bundles
            .iter()
            .map(|b| b.trust_domain.clone())
            .collect()
    };

    // The first message holds the whole set: x.test for A, nothing for B.
    let mut a_stream = a
        .client()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = a_stream.message().await.unwrap().unwrap();
    assert!(first.federated_full);
    assert_eq!(names(&first), ["x.test"]);
    assert_eq!(first.federated_bundles[0].x509_authorities, [x_ca]);
    let mut b_stream = b
        .client()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = b_stream.message().await.unwrap().unwrap();
    assert!(first.federated_full);
    assert!(first.federated_bundles.is_empty(), "{:?}", names(&first));

    // y.test changes: nobody federates with it, nobody hears of it.
    set_bundle(&server, &lab, "y.test");
    // x.test changes: A gets it (a diff), B nothing.
    let new_x = set_bundle(&server, &lab, "x.test");
    let next = a_stream.message().await.unwrap().unwrap();
    assert!(!next.federated_full);
    assert_eq!(names(&next), ["x.test"]);
    assert_eq!(next.federated_bundles[0].x509_authorities, [new_x]);
    assert!(next.entries.is_empty() && next.bundle.is_none(), "{next:?}");
    let silent = tokio::time::timeout(std::time::Duration::from_secs(2), b_stream.message()).await;
    assert!(silent.is_err(), "B was sent something: {silent:?}");

    // A's entry stops federating: the bundle is withdrawn.
    server.cli_ok(&[
        "entry",
        "update",
        "--id",
        &a_entry,
        "--parent-id",
        &a.id,
        "--spiffe-id",
        "spiffe://example.org/a-web",
        "--selector",
        "unix:uid:1",
    ]);
    let next = a_stream.message().await.unwrap().unwrap();
    assert_eq!(next.removed_federated_bundles, ["x.test"]);
    assert!(next.federated_bundles.is_empty());
}
