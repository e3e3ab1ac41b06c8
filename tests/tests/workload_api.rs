//! End to end: the real server and agent, with SPIFFE clients others wrote (the Rust
//! `spiffe` crate, py-spiffe, openssl) and the agent's own CLI.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use carapace_core::TrustBundle;
use carapace_core::x509svid::verify_chain;
use carapace_e2e::{
    Agent, Lab, Server, bin, eventually, my_uid, now, openssl_verify, py_fetch, td, uds_channel,
    uid_selector,
};
use futures::StreamExt;
use spiffe::WorkloadApiClient;

/// Server + one agent + one entry for this process's uid.
fn setup(lab: &Lab) -> (Server, Agent) {
    let server = Server::start(lab);
    let agent = Agent::start(lab, &server, "agent");
    (server, agent)
}

async fn client(agent: &Agent) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_spiffe_client_receives_a_conformant_svid() {
    let lab = Lab::new();
    let (server, agent) = setup(&lab);
    server.create_entry(
        &agent.id,
        "spiffe://example.org/web",
        &[&uid_selector()],
        &["--hint", "web", "--dns-name", "web.example.org"],
    );
    let c = client(&agent).await;
    let ctx = eventually("the SVID through the spiffe crate", || {
        let c = c.clone();
        async move { c.fetch_x509_context().await.ok() }
    })
    .await;
    let svid = ctx.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(svid.hint(), Some("web"));

    // The chain verifies against `bundle show` with every X509-SVID rule ...
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let v = verify_chain(&chain, &bundle, now()).unwrap();
    assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/web");
    // ... and with openssl.
    let pem: String = chain
        .iter()
        .map(|d| carapace_core::bundle::der_to_pem(d))
        .collect();
    let out = openssl_verify(&lab, &pem, &server.bundle_pem());
    assert!(out.contains(": OK"), "openssl verify: {out}");
    // The bundle the client received is the server's.
    let got = ctx
        .bundle_set()
        .get(&spiffe::TrustDomain::new("example.org").unwrap())
        .unwrap();
    let got: Vec<Vec<u8>> = got
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    assert_eq!(got, bundle.x509_authorities);
    // The private key matches the leaf.
    let leaf_spki = carapace_core::x509svid::public_key_of(&chain[0]).unwrap();
    let key = svid.private_key().as_ref().to_vec();
    let kp = rcgen_like_public_key(&key);
    assert_eq!(kp, leaf_spki, "the private key belongs to the leaf");
}

/// The SubjectPublicKeyInfo of a PKCS#8 P-256 key, via openssl (an independent tool).
fn rcgen_like_public_key(pkcs8: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.der");
    std::fs::write(&p, pkcs8).unwrap();
    let out = Command::new("openssl")
        .args([
            "pkey", "-inform", "DER", "-pubout", "-outform", "DER", "-in",
        ])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn python_spiffe_client_receives_the_svid() {
    let lab = Lab::new();
    let (server, agent) = setup(&lab);
    server.create_entry(
        &agent.id,
        "spiffe://example.org/py",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_an_svid().await;
    let v = py_fetch(&agent.socket);
    assert_eq!(v["default"], "spiffe://example.org/py");
    let chain_pem = v["svids"][0]["chain_pem"].as_str().unwrap();
    let verify = openssl_verify(&lab, chain_pem, v["bundle_pem"].as_str().unwrap());
    assert!(verify.contains(": OK"), "{verify}");
    assert_eq!(
        TrustBundle::from_pem(td(), v["bundle_pem"].as_str().unwrap())
            .unwrap()
            .x509_authorities,
        TrustBundle::from_pem(td(), &server.bundle_pem())
            .unwrap()
            .x509_authorities
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_of_another_uid_is_denied() {
    assert_eq!(
        my_uid(),
        0,
        "this test runs a workload as uid 65534 and must run as root (CI does)"
    );
    let lab = Lab::new();
    let (server, agent) = setup(&lab);
    server.create_entry(
        &agent.id,
        "spiffe://example.org/root-only",
        &["unix:uid:0"],
        &[],
    );
    agent.wait_for_an_svid().await;
    let out = Command::new(bin("carapace-agent"))
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(&agent.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uid 65534 must not get root's SVID");
    assert!(stderr.contains("no identity issued"), "{stderr}");
    assert!(stderr.contains("uid=65534"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_without_the_security_header_is_invalid_argument() {
    let lab = Lab::new();
    let (server, agent) = setup(&lab);
    server.create_entry(&agent.id, "spiffe://example.org/x", &[&uid_selector()], &[]);
    let mut raw =
        carapace_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            uds_channel(&agent.socket).await,
        );
    let err = raw
        .fetch_x509svid(carapace_proto::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

fn serial_of(ctx: &spiffe::X509Context) -> Vec<u8> {
    carapace_core::x509svid::serial_of(ctx.default_svid().unwrap().leaf().as_ref()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_lived_svid_rotates_on_the_open_stream() {
    let lab = Lab::new();
    let (server, agent) = setup(&lab);
    server.create_entry(
        &agent.id,
        "spiffe://example.org/short",
        &[&uid_selector()],
        &["--x509-svid-ttl", "20s"],
    );
    let c = client(&agent).await;
    eventually("the first SVID", || {
        let c = c.clone();
        async move { c.fetch_x509_context().await.ok() }
    })
    .await;
    let mut stream = c.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let leaf = first.default_svid().unwrap().leaf().as_ref().to_vec();
    let (nb, na) = carapace_core::x509svid::validity_of(&leaf).unwrap();
    assert!(
        na - nb <= 30,
        "a 20 s TTL (plus the 10 s backdate), got {}",
        na - nb
    );
    let started = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("a rotated SVID within 30 s")
        .unwrap()
        .unwrap();
    assert_ne!(
        serial_of(&first),
        serial_of(&second),
        "the stream carries a new SVID"
    );
    assert_eq!(
        second.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/short"
    );
    // Rotation happens at about half-life, before expiry.
    let (_, old_expiry) = carapace_core::x509svid::validity_of(&leaf).unwrap();
    assert!(
        (now() as i64) < old_expiry,
        "rotated before the old SVID expired"
    );
    // At about half of the 20 s: not at once, not at expiry.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5),
        "rotated too early, after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_entry_removes_the_svid_from_the_stream() {
    let lab = Lab::new();
    let (server, agent) = setup(&lab);
    let a = server.create_entry(&agent.id, "spiffe://example.org/a", &[&uid_selector()], &[]);
    let b = server.create_entry(&agent.id, "spiffe://example.org/b", &[&uid_selector()], &[]);
    let c = client(&agent).await;
    eventually("both SVIDs", || {
        let c = c.clone();
        async move {
            c.fetch_x509_context()
                .await
                .ok()
                .filter(|x| x.svids().len() == 2)
        }
    })
    .await;
    let mut stream = c.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), 2);
    server.cli_ok(&["entry", "delete", "--id", &a]);
    let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ids: Vec<String> = next
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(ids, ["spiffe://example.org/b"]);
    server.cli_ok(&["entry", "delete", "--id", &b]);
    let last = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap();
    let err = last.expect_err("no SVID left");
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_serves_while_the_server_is_down_and_reconnects() {
    let lab = Lab::new();
    let (mut server, agent) = setup(&lab);
    server.create_entry(
        &agent.id,
        "spiffe://example.org/steady",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_an_svid().await;
    server.kill();
    for _ in 0..3 {
        let out = agent.fetch(&[]);
        assert!(
            out.status.success(),
            "served while the server is down: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    server.restart();
    // A new entry can only arrive through a new connection to the restarted server.
    server.create_entry(
        &agent.id,
        "spiffe://example.org/after-restart",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_svid("after-restart").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_banned_agent_is_refused() {
    let lab = Lab::new();
    let (server, agent) = setup(&lab);
    server.create_entry(
        &agent.id,
        "spiffe://example.org/before-ban",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_an_svid().await;
    server.cli_ok(&["agent", "ban", "--spiffe-id", &agent.id]);
    let shown = server.cli_json(&["agent", "show", "--spiffe-id", &agent.id]);
    assert_eq!(shown["banned"], true);
    eventually("the agent to log that it was refused", || async {
        agent
            .proc
            .log()
            .contains("refused this agent")
            .then_some(())
    })
    .await;
    // Nothing new reaches a banned agent.
    server.create_entry(
        &agent.id,
        "spiffe://example.org/after-ban",
        &[&uid_selector()],
        &[],
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = String::from_utf8_lossy(&agent.fetch(&[]).stdout).to_string();
    assert!(
        !out.contains("after-ban"),
        "a banned agent must not receive new SVIDs: {out}"
    );
    assert!(
        server
            .log()
            .contains(&format!("agent {} is banned", agent.id)),
        "server log says why"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_token_works_once_and_never_reaches_a_log() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let (token, agent_id) = server.token();
    let bundle = lab.path().join("bundle.pem");
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    let args = [
        "--join-token".as_ref(),
        token.as_ref(),
        "--trust-bundle".as_ref(),
        bundle.as_os_str(),
    ];
    let mut first = Agent::spawn(&lab, &server, "first", &args);
    first.wait_healthy();
    assert!(first.proc.log().contains(&agent_id));
    let mut second = Agent::spawn(&lab, &server, "second", &args);
    let status = eventually("the second agent to give up", || {
        let s = second.proc.try_wait();
        async move { s }
    })
    .await;
    assert!(!status.success());
    let log = second.proc.log();
    assert!(
        log.contains("join token is unknown, expired or already used"),
        "{log}"
    );
    let secret = token.split_once('.').unwrap().1;
    for (name, text) in [
        ("server", server.log()),
        ("first agent", first.proc.log()),
        ("second agent", log),
    ] {
        assert!(
            !text.contains(secret),
            "the join token's secret reached the {name} log"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_keeps_its_identity_without_attesting_again() {
    let lab = Lab::new();
    let (server, mut agent) = setup(&lab);
    server.create_entry(
        &agent.id,
        "spiffe://example.org/kept",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_an_svid().await;
    agent.proc.kill();
    // No join token this time: the agent must use what it kept in its data dir.
    let mut again = Agent::spawn(&lab, &server, "agent", &["--insecure-bootstrap".as_ref()]);
    again.wait_healthy();
    assert!(
        again.proc.log().contains("restored the agent identity"),
        "{}",
        again.proc.log()
    );
    assert!(again.proc.log().contains(&agent.id));
    again.wait_for_an_svid().await;
    let key_mode = std::fs::metadata(agent.data_dir.join("agent.json")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_entry_reaches_a_waiting_workload_within_seconds() {
    let lab = Lab::new();
    let (server, agent) = setup(&lab);
    server.create_entry(
        &agent.id,
        "spiffe://example.org/first",
        &[&uid_selector()],
        &[],
    );
    let c = client(&agent).await;
    eventually("the first SVID", || {
        let c = c.clone();
        async move { c.fetch_x509_context().await.ok() }
    })
    .await;
    let mut stream = c.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let created = Instant::now();
    server.create_entry(
        &agent.id,
        "spiffe://example.org/second",
        &[&uid_selector()],
        &[],
    );
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(msg.svids().len(), 2);
    eprintln!(
        "new entry reached the workload in {:?} (including the CLI's own start-up)",
        created.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_admin_input_is_refused_and_writes_nothing() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = "spiffe://example.org/spire/agent/join_token/0011223344556677";
    for (args, needle) in [
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/ok",
                "--parent-id",
                "not-an-id",
                "--selector",
                "unix:uid:0",
            ],
            "parent",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/ok",
                "--parent-id",
                agent,
                "--selector",
                "unix:uuid:0",
            ],
            "selector",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/spire/x",
                "--parent-id",
                agent,
                "--selector",
                "unix:uid:0",
            ],
            "reserved",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/ok",
                "--parent-id",
                "spiffe://other.org/agent",
                "--selector",
                "unix:uid:0",
            ],
            "trust domain",
        ),
    ] {
        let mut full = vec!["entry", "create"];
        full.extend(args);
        let out = server.cli(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{full:?} must fail");
        assert!(err.contains(needle), "{full:?}: {err}");
    }
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_renews_its_own_svid_and_keeps_working() {
    let lab = Lab::new();
    let config = lab.path().join("server.toml");
    std::fs::write(&config, "agent_svid_ttl = \"20s\"\n").unwrap();
    let server = Server::start_with(&lab, &["--config", config.to_str().unwrap()]);
    let agent = Agent::start(&lab, &server, "agent");
    let before = server.cli_json(&["agent", "show", "--spiffe-id", &agent.id]);
    eventually(
        "the agent to renew its SVID at about half of 20 s",
        || async {
            agent
                .proc
                .log()
                .contains("renewed the agent SVID")
                .then_some(())
        },
    )
    .await;
    // The renewed SVID is in use: new entries still arrive, and the server now knows the
    // new serial as the agent's only one.
    server.create_entry(
        &agent.id,
        "spiffe://example.org/after-renewal",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_svid("after-renewal").await;
    let after = server.cli_json(&["agent", "show", "--spiffe-id", &agent.id]);
    assert_ne!(
        before["serial"], after["serial"],
        "the server records the renewed serial"
    );
    assert!(after["expires_at"].as_i64() > before["expires_at"].as_i64());
    assert!(
        !server.log().contains("not its latest"),
        "the agent never used a stale SVID"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_banned_agent_gets_nothing_new_and_its_workloads_keep_what_they_hold_until_it_expires() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = Agent::start(&lab, &server, "agent");
    // A workload whose SVID would rotate every ~10 s if the server kept signing.
    let workload = "spiffe://example.org/banned-node-workload";
    server.create_entry(
        &agent.id,
        workload,
        &[&uid_selector()],
        &["--x509-svid-ttl", "20s"],
    );
    agent.wait_for_svid(workload).await;
    server.cli_ok(&["agent", "ban", "--spiffe-id", &agent.id]);
    agent
        .assert_keeps_until_expiry_and_gets_nothing_new(workload)
        .await;
}
