//! End to end with an MIT KDC (hsm-sim): the agent attests with `kerberos` from its host
//! keytab, a workload gets its SVID through a node-alias entry on the realm, renewals
//! attest again with a fresh ticket, and a host removed from the realm loses its identity
//! at the next renewal.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::PathBuf;

use std::time::Duration;

use carapace_agent::manager::REATTEST_BACKOFF_MAX;
use carapace_e2e::{Agent, Lab, Server, ServerOptions, eventually_within, uid_selector};
use hsm_sim::kdc::{Kdc, LabPrincipals};

fn realm() -> (Kdc, LabPrincipals) {
    let kdc = Kdc::start("LAB.TEST").unwrap_or_else(|e| panic!("{e}"));
    let p = kdc.provision_host_and_service().unwrap();
    (kdc, p)
}

fn start_server(lab: &Lab, kdc: &Kdc, p: &LabPrincipals, top: &str) -> Server {
    let config = lab.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n{top}[node_attestor.kerberos]\nkeytab = {:?}\n\
             service_principal = {:?}\nallowed_realms = [\"LAB.TEST\"]\n",
            p.service_keytab.display().to_string(),
            p.service
        ),
    )
    .unwrap();
    Server::start_opts(
        lab,
        ServerOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            envs: kdc.envs(),
            ..ServerOptions::default()
        },
    )
}

fn spawn_agent(lab: &Lab, server: &Server, kdc: &Kdc, p: &LabPrincipals) -> Agent {
    let config: PathBuf = lab.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n[node_attestor.kerberos]\nkeytab = {:?}\n\
             principal = {:?}\nservice_principal = {:?}\n",
            p.host_keytab.display().to_string(),
            p.host,
            p.service
        ),
    )
    .unwrap();
    let bundle = lab.path().join("agent-bundle.pem");
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    Agent::spawn_with_envs(
        lab,
        server,
        "agent",
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--trust-bundle".as_ref(),
            bundle.as_os_str(),
        ],
        &kdc.envs(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kerberos_node_attests_and_a_workload_gets_its_svid_through_a_realm_alias() {
    let lab = Lab::new();
    let (kdc, p) = realm();
    let server = start_server(&lab, &kdc, &p, "");
    let mut agent = spawn_agent(&lab, &server, &kdc, &p);
    agent.wait_healthy();

    let agent_id = "spiffe://example.org/spire/agent/kerberos/LAB.TEST/node1.lab.test";
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", agent_id]);
    for selector in [
        "kerberos:realm:LAB.TEST",
        "kerberos:principal:host/node1.lab.test@LAB.TEST",
        "kerberos:host:node1.lab.test",
    ] {
        assert!(shown.contains(selector), "{selector} in {shown}");
    }

    // Every host of the realm is "lab-realm"; workloads of this uid on them get
    // spiffe://example.org/krb-workload.
    server.create_entry(
        "spiffe://example.org/spire/server",
        "spiffe://example.org/node/lab-realm",
        &["kerberos:realm:LAB.TEST"],
        &[],
    );
    server.create_entry(
        "spiffe://example.org/node/lab-realm",
        "spiffe://example.org/krb-workload",
        &[&uid_selector()],
        &[],
    );
    agent
        .wait_for_svid("spiffe://example.org/krb-workload")
        .await;
    // Mutual authentication is on by default: the agent checked the server's AP-REP.
    let log = server.log();
    let accepted = log
        .lines()
        .find(|l| l.contains("kerberos: context token accepted"))
        .unwrap_or_else(|| panic!("no acceptance in {log}"));
    let mutual = accepted.split("mutual").nth(1).unwrap_or_default();
    assert!(mutual.contains("true"), "{accepted}");
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_attests_again_and_a_host_removed_from_the_realm_loses_its_identity() {
    let lab = Lab::new();
    let (kdc, p) = realm();
    let server = start_server(&lab, &kdc, &p, "agent_svid_ttl = \"20s\"\n");
    let mut agent = spawn_agent(&lab, &server, &kdc, &p);
    agent.wait_healthy();
    let agent_id = "spiffe://example.org/spire/agent/kerberos/LAB.TEST/node1.lab.test";
    // A workload whose SVID would rotate every ~10 s if the server kept signing.
    let workload = "spiffe://example.org/krb-workload";
    server.create_entry(
        agent_id,
        workload,
        &[&uid_selector()],
        &["--x509-svid-ttl", "20s"],
    );
    agent.wait_for_svid(workload).await;

    // At about half of 20 s the agent renews by attesting again with a fresh ticket.
    agent.wait_for_renewal().await;
    let attested = server
        .log()
        .matches("kerberos: context token accepted")
        .count();
    assert!(
        attested >= 2,
        "renewal went through attestation:\n{}",
        server.log()
    );

    // The host leaves the realm: its keytab is worthless at the next renewal (the KDC
    // refuses it a ticket, so no evidence reaches the server) and the agent SVID lapses.
    kdc.admin().delete_principal(&p.host).unwrap();
    let lapsed_at = eventually_within(
        "the agent SVID to lapse unrenewed",
        Duration::from_secs(20),
        || async {
            let a = server.cli_json(&["agent", "show", "--spiffe-id", agent_id]);
            let expires_at = a["expires_at"].as_i64().unwrap();
            (carapace_e2e::now() as i64 > expires_at).then_some(expires_at)
        },
    )
    .await;
    assert!(
        agent.proc.log().contains("not found in Kerberos database"),
        "the agent names why it cannot renew:\n{}",
        agent.proc.log()
    );
    // From then on nothing new is signed (the server went on signing here before): the
    // workload keeps its SVID until it expires, then holds nothing.
    agent
        .assert_keeps_until_expiry_and_gets_nothing_new(workload)
        .await;
    let row = server.cli_json(&["agent", "show", "--spiffe-id", agent_id]);
    assert_eq!(
        row["expires_at"].as_i64(),
        Some(lapsed_at),
        "nothing renewed"
    );
    assert_eq!(agent.proc.try_wait(), None, "the agent keeps running");

    // The host joins the realm again with a new keytab: the agent attests afresh by
    // itself, without a restart, and the workload gets a new SVID.
    kdc.admin().add_principal(&p.host).unwrap();
    std::fs::remove_file(&p.host_keytab).unwrap();
    kdc.admin().keytab(&[&p.host], &p.host_keytab).unwrap();
    eventually_within(
        "the agent to attest afresh",
        REATTEST_BACKOFF_MAX,
        || async {
            let a = server.cli_json(&["agent", "show", "--spiffe-id", agent_id]);
            (a["expires_at"].as_i64().unwrap() > lapsed_at).then_some(())
        },
    )
    .await;
    agent.wait_for_svid(workload).await;
}
