//! The health endpoints of both binaries, scraped from outside the way an operator's
//! tooling does: `/metrics` read by Python's `prometheus_client` parsers (OpenMetrics and
//! the classic Prometheus text format), `/ready` and `/live` read over plain HTTP, and the
//! `healthcheck` commands' exit codes. Counters move with real traffic; the server turns
//! unready when its SoftHSM2 token cannot sign, names why, and is ready again when the
//! token is back, with no restart; an agent that has not attested is not ready.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_e2e::{
    Agent, Lab, Server, ServerOptions, bin, count, eventually, free_port, now, py_fetch, sample,
    scrape, uid_selector,
};
use hsm_sim::softhsm::SoftHsm;
use serde_json::Value;

fn write_config(lab: &Lab, name: &str, text: &str) -> PathBuf {
    let path = lab.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The notAfter of the first certificate in `pem`.
fn not_after(pem: &str) -> i64 {
    let der = carapace_core::bundle::certs_from_pem(pem)
        .unwrap()
        .remove(0);
    carapace_core::x509svid::validity_of(&der).unwrap().1
}

fn healthcheck_agent(addr: &str) -> std::process::Output {
    Command::new(bin("carapace-agent"))
        .args(["healthcheck", "--health-address", addr])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_traffic_and_readiness_follows_the_hsm() {
    let lab = Lab::new();
    let hsm = SoftHsm::new().unwrap_or_else(|e| panic!("{e}"));
    let token = hsm.init_token("health").unwrap_or_else(|e| panic!("{e}"));
    let server_health = format!("127.0.0.1:{}", free_port());
    let config = write_config(
        &lab,
        "server",
        &format!(
            "trust_domain = \"example.org\"\n[health]\nbind_address = {server_health:?}\n\
             [key_manager.pkcs11]\nmodule = {:?}\ntoken_label = {:?}\npin_file = {:?}\n",
            hsm.module().display().to_string(),
            token.label,
            token.pin_file.display().to_string()
        ),
    );
    let server = Server::start_opts(
        &lab,
        ServerOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            envs: hsm.envs(),
            ..ServerOptions::default()
        },
    );
    let s = |path: &str| scrape(&format!("http://{server_health}{path}"));

    // Live and ready, and the endpoint refuses what it does not serve.
    let live = s("/live");
    assert_eq!(live["status"], 200, "{live}");
    let ready = s("/ready");
    assert_eq!(ready["status"], 200, "{ready}");
    assert_eq!(ready["body"], "ready\n");
    assert_eq!(s("/nothing")["status"], 404);
    let post = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("http://{server_health}/metrics"))
        .output()
        .unwrap_or_else(|e| panic!("curl not found ({e}): apt-get install curl"));
    assert_eq!(String::from_utf8_lossy(&post.stdout), "405");

    let before = s("/metrics");
    assert!(
        before["content_type"]
            .as_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{}",
        before["content_type"]
    );
    // The CA's absolute expiry is what `healthcheck` reports for the active CA.
    let health = server.cli_json(&["healthcheck"]);
    assert_eq!(
        sample(
            &before,
            "carapace_server_x509_ca_expiry_timestamp_seconds",
            &[("slot", "active")]
        ),
        Some(health["ca_expires_at"].as_i64().unwrap() as f64),
        "{before}"
    );
    let rotated = sample(
        &before,
        "carapace_server_x509_ca_last_rotation_timestamp_seconds",
        &[],
    )
    .unwrap();
    assert!(rotated > 0.0 && rotated <= now() as f64, "{rotated}");

    // An agent attests with a join token; it serves its own health endpoint.
    let agent_health = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start_with(
        &lab,
        &server,
        "agent",
        &["--health-address".as_ref(), agent_health.as_ref()],
    );
    let a = |path: &str| scrape(&format!("http://{agent_health}{path}"));
    eventually("the agent to be ready", || async {
        (a("/ready")["status"] == 200).then_some(())
    })
    .await;
    assert!(healthcheck_agent(&agent_health).status.success());

    // A workload with no entry yet is refused: counted under PermissionDenied.
    let refused = py_fetch_refused(&agent.socket);
    assert!(
        refused.contains("PERMISSION_DENIED") || refused.contains("no identity"),
        "{refused}"
    );
    server.create_entry(
        &agent.id,
        "spiffe://example.org/web",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_svid("spiffe://example.org/web").await;
    let fetched = py_fetch(&agent.socket);
    let svid_not_after = not_after(fetched["svids"][0]["chain_pem"].as_str().unwrap());

    let after = s("/metrics");
    let attested = [("attestor", "join_token"), ("result", "ok")];
    assert_eq!(
        count(&after, "carapace_server_node_attestations_total", &attested)
            - count(
                &before,
                "carapace_server_node_attestations_total",
                &attested
            ),
        1.0
    );
    let workload_ok = [("kind", "x509_workload"), ("result", "ok")];
    assert!(
        count(&after, "carapace_server_svids_issued_total", &workload_ok)
            > count(&before, "carapace_server_svids_issued_total", &workload_ok)
    );
    assert!(
        count(
            &after,
            "carapace_server_svids_issued_total",
            &[("kind", "x509_agent"), ("result", "ok")]
        ) >= 1.0
    );
    assert_eq!(sample(&after, "carapace_server_agents", &[]), Some(1.0));
    assert_eq!(sample(&after, "carapace_server_entries", &[]), Some(1.0));
    let signs = [("backend", "pkcs11")];
    assert!(
        count(
            &after,
            "carapace_server_key_manager_sign_duration_seconds_count",
            &signs
        ) > count(
            &before,
            "carapace_server_key_manager_sign_duration_seconds_count",
            &signs
        ),
        "signatures in the token are timed"
    );
    assert!(
        sample(
            &after,
            "carapace_server_connections_open",
            &[("listener", "node_api")]
        )
        .unwrap()
            >= 1.0,
        "the agent's sync connection is open"
    );
    // No label carries a SPIFFE ID.
    for s in after["samples"].as_array().unwrap() {
        let labels = s["labels"].to_string();
        assert!(!labels.contains("spiffe://"), "{s}");
    }

    let agent_metrics = a("/metrics");
    let ok = [("rpc", "FetchX509SVID"), ("code", "OK")];
    assert!(
        count(
            &agent_metrics,
            "carapace_agent_workload_api_requests_total",
            &ok
        ) >= 1.0
    );
    assert!(
        count(
            &agent_metrics,
            "carapace_agent_workload_api_requests_total",
            &[("rpc", "FetchX509SVID"), ("code", "PermissionDenied")]
        ) >= 1.0,
        "{agent_metrics}"
    );
    assert!(
        count(
            &agent_metrics,
            "carapace_agent_workload_api_request_duration_seconds_count",
            &[("rpc", "FetchX509SVID")]
        ) >= 2.0
    );
    assert_eq!(
        sample(
            &agent_metrics,
            "carapace_agent_workload_svid_soonest_expiry_timestamp_seconds",
            &[]
        ),
        Some(svid_not_after as f64)
    );
    let agent_svid_expiry = sample(
        &agent_metrics,
        "carapace_agent_agent_svid_expiry_timestamp_seconds",
        &[],
    )
    .unwrap();
    assert!(agent_svid_expiry > now() as f64, "{agent_svid_expiry}");
    let synced = sample(
        &agent_metrics,
        "carapace_agent_last_sync_timestamp_seconds",
        &[],
    )
    .unwrap();
    assert!(synced > 0.0 && synced <= now() as f64);
    assert!(
        sample(
            &agent_metrics,
            "carapace_agent_last_rotation_timestamp_seconds",
            &[("kind", "workload")]
        )
        .is_some()
    );
    assert_eq!(
        count(
            &agent_metrics,
            "carapace_agent_node_attestations_total",
            &[("attestor", "join_token"), ("result", "ok")]
        ),
        1.0
    );

    // The token goes away (SoftHSM2: its directory is moved): the server is not ready,
    // says why on /ready and in `healthcheck`, and keeps serving /live.
    let tokens = hsm.token_dir();
    let away = tokens.with_extension("away");
    std::fs::rename(&tokens, &away).unwrap();
    let unready = eventually("the server to turn unready", || async {
        let r = s("/ready");
        (r["status"] == 503).then_some(r)
    })
    .await;
    let body = unready["body"].as_str().unwrap();
    assert!(
        body.contains("key manager: the active CA's key cannot sign"),
        "{body}"
    );
    assert_eq!(s("/live")["status"], 200);
    let hc = server.cli(&["healthcheck"]);
    assert!(!hc.status.success());
    assert!(
        String::from_utf8_lossy(&hc.stderr).contains("key manager"),
        "{}",
        String::from_utf8_lossy(&hc.stderr)
    );

    // The token is back: ready again, with no restart.
    std::fs::rename(&away, &tokens).unwrap();
    eventually("the server to be ready again", || async {
        (s("/ready")["status"] == 200).then_some(())
    })
    .await;
    assert!(server.cli(&["healthcheck"]).status.success());
}

/// py-spiffe's error output for a fetch that must fail.
fn py_fetch_refused(socket: &Path) -> String {
    carapace_e2e::py_fetch_result(socket).expect_err("the fetch should be refused")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_has_not_attested_is_live_but_not_ready() {
    let lab = Lab::new();
    let mut server = Server::start(&lab);
    let (token, _) = server.token();
    let bundle = lab.path().join("bundle.pem");
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    // The server goes away before the agent's first attestation: it keeps trying.
    server.kill();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = lab.path().join("agent.toml");
    std::fs::write(&config, format!("[health]\nbind_address = {addr:?}\n")).unwrap();
    let mut agent = Agent::spawn(
        &lab,
        &server,
        "lonely",
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--join-token".as_ref(),
            token.as_ref(),
            "--trust-bundle".as_ref(),
            bundle.as_os_str(),
        ],
    );
    let ready = eventually("the agent's health endpoint to answer", || async {
        let r = scrape(&format!("http://{addr}/ready"));
        (r["status"] != Value::Null).then_some(r)
    })
    .await;
    assert_eq!(ready["status"], 503, "{ready}");
    assert!(
        ready["body"]
            .as_str()
            .unwrap()
            .contains("agent SVID: none yet"),
        "{ready}"
    );
    assert_eq!(scrape(&format!("http://{addr}/live"))["status"], 200);
    let hc = healthcheck_agent(&addr);
    assert_eq!(hc.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&hc.stderr).contains("agent SVID: none yet"),
        "{}",
        String::from_utf8_lossy(&hc.stderr)
    );
    assert!(agent.proc.try_wait().is_none(), "the agent keeps trying");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_banned_agent_turns_unready_and_says_why() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let addr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start_with(
        &lab,
        &server,
        "banned",
        &["--health-address".as_ref(), addr.as_ref()],
    );
    let ready = |addr: String| async move { scrape(&format!("http://{addr}/ready")) };
    eventually("the agent to be ready", || {
        let r = ready(addr.clone());
        async move { (r.await["status"] == 200).then_some(()) }
    })
    .await;
    assert!(healthcheck_agent(&addr).status.success());

    server.cli_ok(&["agent", "ban", "--spiffe-id", &agent.id]);
    // Waits for the reason, not just any 503: on a loaded machine an earlier probe may
    // also find the Workload API slow to answer.
    let unready = eventually("the banned agent to turn unready, naming why", || {
        let r = ready(addr.clone());
        async move {
            let r = r.await;
            let says_why = r["body"]
                .as_str()
                .is_some_and(|b| b.contains("agent identity lost"));
            (r["status"] == 503 && says_why).then_some(r)
        }
    })
    .await;
    let body = unready["body"].as_str().unwrap();
    assert!(
        body.contains("agent identity lost: the server refused the agent"),
        "{body}"
    );
    // Still live: the process answers, it just cannot do its job.
    assert_eq!(scrape(&format!("http://{addr}/live"))["status"], 200);
    let hc = healthcheck_agent(&addr);
    assert_eq!(hc.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&hc.stderr).contains("agent identity lost"),
        "{}",
        String::from_utf8_lossy(&hc.stderr)
    );
    // It stays unready while it retries the server with its old SVID (its join token
    // cannot attest again): never ready between two refusals.
    for _ in 0..30 {
        let r = ready(addr.clone()).await;
        assert_eq!(r["status"], 503, "{r}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
