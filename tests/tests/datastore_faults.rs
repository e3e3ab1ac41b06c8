//! The server's datastore on a disk that fills up: the real server binary with its data
//! directory on a 2 MiB tmpfs (mounted by the test: it needs root), driven by the admin
//! CLI and by an agent speaking the node API with the agent library.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::sync::Arc;

use carapace_agent::node_attestor::JoinTokenClient;
use carapace_agent::node_client;
use carapace_core::plugin::KeyManager;
use carapace_core::{KeyType, TrustBundle};
use carapace_e2e::{Lab, Server, td};
use carapace_keymanager_soft::MemoryKeyManager;
use hsm_sim::tmpfs::Tmpfs;
use tokio::sync::watch;
use zeroize::Zeroizing;

/// Attests with `token` through the node API; the agent's SPIFFE ID, or why not.
async fn attest(
    server: &Server,
    token: &str,
    key_name: &str,
) -> Result<String, carapace_agent::Error> {
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(bundle));
    let tls = carapace_tls::client_config(rx, td().server_id(), None).unwrap();
    let km = MemoryKeyManager::new();
    let key = km.generate_key(key_name, KeyType::EcP256).await.unwrap();
    let csr = carapace_tls::csr_for_key(key.clone()).unwrap();
    let result = node_client::attest(
        &server.address,
        Arc::new(tls),
        &JoinTokenClient::new(Zeroizing::new(token.to_owned())),
        csr,
        key.public_key_der(),
    )
    .await;
    let chain = result?.svid.unwrap().cert_chain;
    Ok(carapace_core::x509svid::check_leaf(&chain[0])
        .unwrap()
        .to_string())
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_writes_cleanly_and_they_recover_without_a_restart() {
    let lab = Lab::new();
    let disk = Tmpfs::mount(2 << 20).unwrap();
    let mut server = Server::start_in(&lab, &disk.path().join("server"));
    let pid = server.proc.pid();
    let (token, agent_id) = server.token();
    server.create_entry(
        "spiffe://example.org/spire/server",
        "spiffe://example.org/before",
        &["unix:uid:1"],
        &[],
    );
    let entries_before = server.cli_json(&["entry", "show"])["entries"]
        .as_array()
        .unwrap()
        .len();

    disk.fill().unwrap();

    // Entries fail, and nothing is half-written.
    for i in 0..10 {
        let out = server.cli(&[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/spire/server",
            "--spiffe-id",
            &format!("spiffe://example.org/full-{i}"),
            "--selector",
            "unix:uid:2",
        ]);
        assert!(
            !out.status.success(),
            "entry {i} was created on a full disk"
        );
    }
    assert_eq!(
        server.cli_json(&["entry", "show"])["entries"]
            .as_array()
            .unwrap()
            .len(),
        entries_before
    );

    // The health check says so.
    let health = server.cli(&["healthcheck"]);
    assert!(!health.status.success(), "healthy on a full disk");
    assert!(
        stderr(&health).contains("datastore writes are failing")
            && stderr(&health).contains("database or disk is full"),
        "{}",
        stderr(&health)
    );

    // An agent whose record cannot be written is refused, and its token is not spent.
    let failed = attest(&server, &token, "first").await.unwrap_err();
    assert!(
        matches!(&failed, carapace_agent::Error::Server(m) if m.contains("Internal")),
        "{failed:?}"
    );
    assert!(
        server.cli_json(&["agent", "list"])["agents"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Nor is a delete that was not committed reported as done.
    assert_eq!(server.log().matches("join token consumed").count(), 0);

    disk.free().unwrap();

    // Same process, no restart: the retry with the same token succeeds and the agent
    // is stored; entries can be created again.
    assert_eq!(attest(&server, &token, "retry").await.unwrap(), agent_id);
    let agents = server.cli_json(&["agent", "list"]);
    assert_eq!(agents["agents"][0]["spiffe_id"], agent_id.as_str());
    assert_eq!(server.log().matches("join token consumed").count(), 1);
    for i in 0..10 {
        server.create_entry(
            "spiffe://example.org/spire/server",
            &format!("spiffe://example.org/after-{i}"),
            &["unix:uid:3"],
            &[],
        );
    }
    assert_eq!(
        server.cli_json(&["entry", "show"])["entries"]
            .as_array()
            .unwrap()
            .len(),
        entries_before + 10
    );
    server.cli_ok(&["healthcheck"]);
    // And the token is spent now.
    let again = attest(&server, &token, "again").await.unwrap_err();
    assert!(
        matches!(&again, carapace_agent::Error::Refused(m) if m.contains("already used")),
        "{again:?}"
    );
    assert_eq!(server.proc.pid(), pid);
    assert!(server.proc.try_wait().is_none(), "the server kept running");
    server.kill();
}
