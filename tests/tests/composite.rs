//! End to end, composite node attestation: a server that requires `tpm` and `kerberos`
//! together (`[node_attestation] require_together`), a TPM (swtpm, manufactured by
//! hsm-sim) and an MIT KDC (hsm-sim). An agent with both attests with both on one stream
//! and its workload gets its SVID through a node alias selecting on both; an agent with
//! only the TPM, or opening with Kerberos alone, is refused naming why; a host removed
//! from the realm loses its identity at the next re-attestation, although its TPM still
//! proves itself.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use carapace_e2e::{Agent, Lab, Server, ServerOptions, eventually, uid_selector};
use hsm_sim::kdc::{Kdc, LabPrincipals};
use hsm_sim::swtpm::{Swtpm, TpmManufacturer};

/// What the server says to an agent that opens with `kerberos`, a later member.
const KERBEROS_ALONE: &str = "node attestor kerberos is required together with tpm, kerberos \
                              (node_attestation.require_together): attest with tpm first";

/// A node with a TPM in a Kerberos realm.
struct Node {
    tpm: Swtpm,
    kdc: Kdc,
    principals: LabPrincipals,
}

impl Node {
    fn new() -> Node {
        let m = TpmManufacturer::shared().unwrap_or_else(|e| panic!("{e}"));
        let tpm = Swtpm::start(m).unwrap_or_else(|e| panic!("{e}"));
        let kdc = Kdc::start("LAB.TEST").unwrap_or_else(|e| panic!("{e}"));
        let principals = kdc.provision_host_and_service().unwrap();
        Node {
            tpm,
            kdc,
            principals,
        }
    }

    /// The agent's `[node_attestor.tpm]` table.
    fn tpm_table(&self) -> String {
        format!("[node_attestor.tpm]\ntcti = {:?}\n", self.tpm.tcti())
    }

    /// The agent's `[node_attestor.kerberos]` table.
    fn kerberos_table(&self) -> String {
        let p = &self.principals;
        format!(
            "[node_attestor.kerberos]\nkeytab = {:?}\nprincipal = {:?}\nservice_principal = {:?}\n",
            p.host_keytab.display().to_string(),
            p.host,
            p.service
        )
    }
}

/// A server requiring `tpm` and `kerberos` together; `top`: more top-level settings.
fn start_server(lab: &Lab, node: &Node, top: &str) -> Server {
    let m = TpmManufacturer::shared().unwrap();
    let p = &node.principals;
    let config = lab.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n{top}\
             [node_attestation]\nrequire_together = [[\"tpm\", \"kerberos\"]]\n\
             [node_attestor.tpm]\nek_ca_files = [{:?}, {:?}]\n\
             [node_attestor.kerberos]\nkeytab = {:?}\nservice_principal = {:?}\n\
             allowed_realms = [\"LAB.TEST\"]\n",
            m.ek_ca_root().display().to_string(),
            m.ek_ca_intermediate().display().to_string(),
            p.service_keytab.display().to_string(),
            p.service
        ),
    )
    .unwrap();
    Server::start_opts(
        lab,
        ServerOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            envs: node.kdc.envs(),
            ..ServerOptions::default()
        },
    )
}

/// Spawns an agent (not waiting) whose config holds `attestors` (its node attestor
/// settings, `node_attestors` included when there are several).
fn spawn_agent(lab: &Lab, server: &Server, node: &Node, name: &str, attestors: &str) -> Agent {
    let config: PathBuf = lab.path().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("trust_domain = \"example.org\"\n{attestors}"),
    )
    .unwrap();
    let bundle = lab.path().join(format!("{name}-bundle.pem"));
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    Agent::spawn_with_envs(
        lab,
        server,
        name,
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--trust-bundle".as_ref(),
            bundle.as_os_str(),
        ],
        &node.kdc.envs(),
    )
}

/// An agent running both, TPM first.
fn spawn_full_agent(lab: &Lab, server: &Server, node: &Node) -> Agent {
    let attestors = format!(
        "node_attestors = [\"tpm\", \"kerberos\"]\n{}{}",
        node.tpm_table(),
        node.kerberos_table()
    );
    spawn_agent(lab, server, node, "agent", &attestors)
}

/// Waits for a refused agent to exit; its status.
fn wait_refused(agent: &mut Agent) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = agent.proc.try_wait() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent should have been refused:\n{}",
            agent.proc.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The one agent the server lists, with its row.
fn only_agent(server: &Server) -> serde_json::Value {
    let agents = server.cli_json(&["agent", "list"]);
    let list = agents["agents"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{agents}");
    list[0].clone()
}

fn selectors_of(row: &serde_json::Value) -> Vec<String> {
    row["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_both_attests_and_its_workload_gets_its_svid_through_an_alias_on_both() {
    let lab = Lab::new();
    let node = Node::new();
    let server = start_server(&lab, &node, "");
    let mut agent = spawn_full_agent(&lab, &server, &node);
    agent.wait_healthy();

    // One agent, named by the TPM (the first member), recorded as both, holding the
    // selectors of both.
    let row = only_agent(&server);
    let agent_id = row["spiffe_id"].as_str().unwrap().to_owned();
    assert!(
        agent_id.starts_with("spiffe://example.org/spire/agent/tpm/"),
        "{agent_id}"
    );
    assert_eq!(row["attestor"], "tpm+kerberos", "{row}");
    assert_eq!(row["reattestable"], true, "{row}");
    let selectors = selectors_of(&row);
    let ek = selectors
        .iter()
        .find(|s| s.starts_with("tpm:ek_pubhash:"))
        .unwrap_or_else(|| panic!("no EK selector in {selectors:?}"))
        .clone();
    let host = "kerberos:host:node1.lab.test";
    assert!(selectors.iter().any(|s| s == host), "{selectors:?}");
    assert!(
        selectors
            .iter()
            .all(|s| s.starts_with("tpm:") || s.starts_with("kerberos:")),
        "every selector carries its attestor: {selectors:?}"
    );
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", &agent_id]);
    assert!(shown.contains("tpm+kerberos"), "{shown}");
    // Both proofs ran, on the one attestation stream.
    let log = server.log();
    assert_eq!(log.matches("tpm: node attested").count(), 1, "{log}");
    assert_eq!(
        log.matches("kerberos: context token accepted").count(),
        1,
        "{log}"
    );

    // This TPM in this host of the realm is "tpm-and-realm"; workloads of this uid on it
    // get spiffe://example.org/composite-workload.
    server.create_entry(
        "spiffe://example.org/spire/server",
        "spiffe://example.org/node/tpm-and-realm",
        &[&ek, host],
        &[],
    );
    server.create_entry(
        "spiffe://example.org/node/tpm-and-realm",
        "spiffe://example.org/composite-workload",
        &[&uid_selector()],
        &[],
    );
    agent
        .wait_for_svid("spiffe://example.org/composite-workload")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_only_the_tpm_is_refused_naming_kerberos_and_holds_nothing() {
    let lab = Lab::new();
    let node = Node::new();
    let server = start_server(&lab, &node, "");
    let mut agent = spawn_agent(&lab, &server, &node, "agent", &node.tpm_table());
    let status = wait_refused(&mut agent);
    assert_eq!(status.code(), Some(1), "{}", agent.proc.log());
    let log = agent.proc.log();
    assert!(
        log.contains(
            "the server requires node attestor kerberos, which this agent does not configure"
        ),
        "{log}"
    );
    // The TPM proof passed, and alone it admits nothing.
    let server_log = server.log();
    assert!(
        server_log.contains("tpm: node attested"),
        "the TPM ran first:\n{server_log}"
    );
    assert!(
        server_log.contains("kerberos (2 of tpm, kerberos)"),
        "the server names the missing member:\n{server_log}"
    );
    let agents = server.cli_json(&["agent", "list"]);
    assert_eq!(agents["agents"], serde_json::json!([]), "{agents}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_opening_with_kerberos_alone_is_refused() {
    let lab = Lab::new();
    let node = Node::new();
    let server = start_server(&lab, &node, "");
    let mut agent = spawn_agent(&lab, &server, &node, "agent", &node.kerberos_table());
    let status = wait_refused(&mut agent);
    assert_eq!(status.code(), Some(1), "{}", agent.proc.log());
    let log = agent.proc.log();
    assert!(log.contains(KERBEROS_ALONE), "{log}");
    // Refused before Kerberos ran: its ticket never reached the attestor.
    let server_log = server.log();
    assert!(
        !server_log.contains("kerberos: context token accepted"),
        "{server_log}"
    );
    let agents = server.cli_json(&["agent", "list"]);
    assert_eq!(agents["agents"], serde_json::json!([]), "{agents}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reattestation_runs_both_and_a_host_removed_from_the_realm_loses_its_identity() {
    let lab = Lab::new();
    let node = Node::new();
    let server = start_server(&lab, &node, "agent_svid_ttl = \"20s\"\n");
    let mut agent = spawn_full_agent(&lab, &server, &node);
    agent.wait_healthy();
    let agent_id = only_agent(&server)["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A workload whose SVID would rotate every ~10 s if the server kept signing.
    let workload = "spiffe://example.org/composite-workload";
    server.create_entry(
        &agent_id,
        workload,
        &[&uid_selector()],
        &["--x509-svid-ttl", "20s"],
    );
    agent.wait_for_svid(workload).await;

    // At about half of 20 s the agent renews by attesting again, with both.
    agent.wait_for_renewal().await;
    let log = server.log();
    assert!(
        log.matches("tpm: node attested").count() >= 2,
        "renewal ran the TPM again:\n{log}"
    );
    assert!(
        log.matches("kerberos: context token accepted").count() >= 2,
        "renewal ran Kerberos again:\n{log}"
    );
    let renewals = log.matches("tpm: node attested").count();

    // The host leaves the realm. Its TPM still proves itself, but the next
    // re-attestation cannot complete Kerberos (the KDC refuses the host a ticket), so it
    // is refused and the agent SVID lapses unrenewed.
    node.kdc
        .admin()
        .delete_principal(&node.principals.host)
        .unwrap();
    eventually("a re-attestation whose TPM proof passed", || async {
        (server.log().matches("tpm: node attested").count() > renewals).then_some(())
    })
    .await;
    eventually("the agent SVID to lapse unrenewed", || async {
        let a = server.cli_json(&["agent", "show", "--spiffe-id", &agent_id]);
        (carapace_e2e::now() as i64 > a["expires_at"].as_i64().unwrap()).then_some(())
    })
    .await;
    assert!(
        agent.proc.log().contains("not found in Kerberos database"),
        "the agent names why it cannot renew:\n{}",
        agent.proc.log()
    );
    // From then on nothing new is signed: the workload keeps its SVID until it expires,
    // then holds nothing, while the agent keeps running.
    agent
        .assert_keeps_until_expiry_and_gets_nothing_new(workload)
        .await;
    assert_eq!(agent.proc.try_wait(), None, "the agent keeps running");
}
