//! End to end: nested servers (issue 20). A root server with `[downstream]`, an agent of
//! the root beside a downstream server, the downstream server's registration entry on the
//! root marked `--downstream` (selected by the server's executable and uid), and the
//! downstream server with `[upstream_authority.carapace]` pointed at the root's node API
//! and that agent's Workload API socket. The downstream's CA is minted by the root; an
//! agent of the downstream and a workload under it get an SVID whose chain (leaf +
//! downstream CA) `openssl verify` accepts against the root's bundle alone. A downstream
//! server whose Workload API socket is missing, or whose agent serves another trust
//! domain, refuses to start, naming the problem.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::process::Command;

use carapace_core::bundle::{certs_from_pem, der_to_pem};
use carapace_e2e::{Agent, Lab, Server, openssl_verify, uid_selector};

#[path = "support/nested.rs"]
mod support;
use support::{
    TD, downstream, downstream_entry, root, server_selectors, with_config, write_config,
};

const DOWNSTREAM_ID: &str = "spiffe://example.org/downstream/site-a";
const WEB: &str = "spiffe://example.org/site-a/web";

fn sha256_hex(text: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("sha256sum not found ({e}): apt-get install coreutils"));
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_downstream_server_is_certified_by_the_root_and_its_workloads_verify_to_the_root_bundle()
{
    let lab = Lab::new();
    let root = root(&lab, "root", TD);
    let upper = Agent::start(&lab, &root, "upper-agent");
    downstream_entry(&root, &upper.id, DOWNSTREAM_ID, &[]);

    // The downstream server mints its CA as it starts: through the agent's Workload API
    // (its SVID) and the root's upstream API.
    let down = Server::start_opts(
        &lab,
        downstream(&lab, "downstream", &root.address, &upper.socket),
    );
    let state = down.cli_json(&["localauthority", "x509", "show"]);
    assert_eq!(
        state["active"]["upstream"],
        sha256_hex(&format!("carapace|spiffe://{TD}/spire/server")),
        "the active CA is certified by the carapace upstream: {state}"
    );
    // The downstream serves the root's bundle: the upstream roots, not its own CA.
    let root_bundle = root.bundle_pem();
    let root_certs = certs_from_pem(&root_bundle).unwrap();
    assert_eq!(certs_from_pem(&down.bundle_pem()).unwrap(), root_certs);

    // An agent of the downstream server and a workload under it.
    let site = Agent::start(&lab, &down, "site-agent");
    down.create_entry(&site.id, WEB, &[&uid_selector()], &[]);
    site.wait_for_svid(WEB).await;
    let svid = site.held_svid(WEB).unwrap();
    let chain = certs_from_pem(&svid.chain_pem).unwrap();
    assert_eq!(chain.len(), 2, "leaf + downstream CA: {}", svid.chain_pem);
    assert!(
        !root_certs.contains(&chain[1]),
        "the downstream CA is an intermediate, not a root"
    );
    // Three levels: leaf → downstream CA → root CA, against the root's bundle alone.
    let verified = openssl_verify(&lab, &svid.chain_pem, &root_bundle);
    assert!(verified.contains(": OK"), "{verified}");
    // Without the downstream CA the leaf does not verify: it was not signed by the root.
    let leaf_only = openssl_verify(&lab, &der_to_pem(&chain[0]), &root_bundle);
    assert!(!leaf_only.contains(": OK"), "{leaf_only}");
    // The downstream's agent verified the downstream server (its SVID chains to the
    // root through the downstream CA), or it would have no SVID to give: checked above.
}

/// The downstream server's SVID from the root's agent lives 10 s and rotates at half-life;
/// a CA prepared after the first SVID expired is still minted: the follower took the new
/// SVIDs and each TLS handshake to the root presents the current one (the root refuses
/// an expired client certificate).
#[tokio::test(flavor = "multi_thread")]
async fn a_downstream_server_mints_with_its_current_svid_after_rotation() {
    let lab = Lab::new();
    let root = root(&lab, "root", TD);
    let upper = Agent::start(&lab, &root, "upper-agent");
    downstream_entry(&root, &upper.id, DOWNSTREAM_ID, &["--x509-svid-ttl", "10s"]);
    let down = Server::start_opts(
        &lab,
        downstream(&lab, "downstream", &root.address, &upper.socket),
    );
    let first = down.cli_json(&["localauthority", "x509", "show"]);
    let first_id = first["active"]["authority_id"].as_str().unwrap().to_owned();
    // Past the first SVID's notAfter (10 s, plus the backdating of a few seconds).
    tokio::time::sleep(std::time::Duration::from_secs(16)).await;
    let prepared = down.cli_json(&["localauthority", "x509", "prepare"]);
    let state = down.cli_json(&["localauthority", "x509", "show"]);
    assert_eq!(
        state["prepared"]["authority_id"], prepared["authority_id"],
        "{state}"
    );
    assert_ne!(
        state["prepared"]["authority_id"],
        first_id.as_str(),
        "{state}"
    );
    assert_eq!(
        state["prepared"]["upstream"], first["active"]["upstream"],
        "{state}"
    );
    let log = down.log();
    assert!(
        log.matches("this server's X509-SVID from the agent")
            .count()
            >= 3,
        "the SVID rotated at least twice: {log}"
    );
}

/// The root signs a CA only for a caller whose entry is marked `--downstream`: a server
/// whose entry lacks the flag gets its SVID from the agent but no CA, and does not
/// start; the message says what the entry needs.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_whose_entry_is_not_downstream_gets_no_ca_and_does_not_start() {
    let lab = Lab::new();
    let root = root(&lab, "root", TD);
    let upper = Agent::start(&lab, &root, "upper-agent");
    let selectors = server_selectors();
    let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
    root.create_entry(&upper.id, DOWNSTREAM_ID, &selectors, &[]);
    let mut down = Server::spawn_opts(
        &lab,
        downstream(&lab, "downstream", &root.address, &upper.socket),
    );
    let (status, log) = down.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("PermissionDenied")
            && log.contains(DOWNSTREAM_ID)
            && log.contains("--downstream"),
        "{log}"
    );
    assert!(!down.admin_socket.exists(), "the server half-started");
}

#[test]
fn a_downstream_server_without_its_workload_api_socket_refuses_to_start() {
    let lab = Lab::new();
    let missing = lab.path().join("no-agent").join("api.sock");
    let mut down = Server::spawn_opts(
        &lab,
        downstream(&lab, "downstream", "127.0.0.1:1", &missing),
    );
    let (status, log) = down.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("workload_api_socket") && log.contains(&missing.display().to_string()),
        "{log}"
    );
    assert!(!down.admin_socket.exists(), "the server half-started");

    // And without the setting at all: named as missing.
    let config = write_config(
        &lab,
        "unset",
        &format!(
            "trust_domain = \"{TD}\"\n[upstream_authority.carapace]\nserver_address = \"127.0.0.1:1\"\n"
        ),
    );
    let mut unset = Server::spawn_opts(&lab, with_config("unset", &config));
    let (status, log) = unset.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("missing field") && log.contains("workload_api_socket"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_downstream_server_whose_agent_serves_another_trust_domain_refuses_to_start() {
    let lab = Lab::new();
    let other = root(&lab, "other", "other.test");
    let agent = Agent::start_with(
        &lab,
        &other,
        "other-agent",
        &["--trust-domain".as_ref(), "other.test".as_ref()],
    );
    downstream_entry(
        &other,
        &agent.id,
        "spiffe://other.test/downstream/site-a",
        &[],
    );
    let mut down = Server::spawn_opts(
        &lab,
        downstream(&lab, "downstream", &other.address, &agent.socket),
    );
    let (status, log) = down.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("serves trust domain other.test")
            && log.contains("this server is in example.org"),
        "{log}"
    );
    assert!(!down.admin_socket.exists(), "the server half-started");
}
