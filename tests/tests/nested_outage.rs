//! End to end: a downstream server rides out its root's outage (issue 20). The root
//! server is stopped for longer than the downstream server's own SVID lives: the
//! downstream keeps issuing and rotating its workloads' SVIDs, serves a new entry, stays
//! ready while its CA has life left, and says in `healthcheck` and `/metrics` that its
//! upstream is failing; its CA's due preparation fails and is retried. Started again, the
//! root signs the downstream's next CA, the health and metrics say so, and the workloads'
//! SVIDs move to the new CA.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::Duration;

use carapace_core::bundle::certs_from_pem;
use carapace_e2e::{
    Agent, Lab, Server, eventually_within, free_port, now, openssl_verify, sample, scrape,
    uid_selector,
};
use serde_json::Value;

#[path = "support/nested.rs"]
mod support;
use support::{downstream_entry, downstream_with, root};

const DOWNSTREAM_ID: &str = "spiffe://example.org/downstream/site-a";
const WEB: &str = "spiffe://example.org/site-a/web";
const LATE: &str = "spiffe://example.org/site-a/late";
/// The downstream server's own SVID, from the root-tier agent: shorter than the outage.
const DOWNSTREAM_SVID_TTL: u64 = 15;
/// How long the root is away.
const OUTAGE: Duration = Duration::from_secs(50);

fn upstream_up(health: &str) -> Option<f64> {
    let scraped = scrape(&format!("http://{health}/metrics"));
    sample(
        &scraped,
        "carapace_server_upstream_up",
        &[("authority", "carapace")],
    )
}

fn ready_status(health: &str) -> Option<i64> {
    scrape(&format!("http://{health}/ready"))["status"].as_i64()
}

/// The downstream's authorities as `localauthority x509 show` lists them.
fn authorities(down: &Server) -> Value {
    down.cli_json(&["localauthority", "x509", "show"])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_downstream_server_keeps_issuing_while_its_root_is_away_and_catches_up() {
    let lab = Lab::new();
    let mut root = root(&lab, "root", support::TD);
    let upper = Agent::start(&lab, &root, "upper-agent");
    let ttl = format!("{DOWNSTREAM_SVID_TTL}s");
    downstream_entry(&root, &upper.id, DOWNSTREAM_ID, &["--x509-svid-ttl", &ttl]);

    // A CA of 2 min: prepared at about 1 min, during the outage; SVIDs of 20 s.
    let health = format!("127.0.0.1:{}", free_port());
    let down = Server::start_opts(
        &lab,
        downstream_with(
            &lab,
            "downstream",
            &root.address,
            &upper.socket,
            "ca_ttl = \"120s\"\ndefault_x509_svid_ttl = \"20s\"\ndefault_jwt_svid_ttl = \"20s\"",
            &format!("[health]\nbind_address = \"{health}\""),
        ),
    );
    let first = authorities(&down);
    let first_ca = first["active"]["authority_id"].as_str().unwrap().to_owned();
    let first_ca_end = first["active"]["expires_at"].as_i64().unwrap();
    assert_eq!(upstream_up(&health), Some(1.0));

    let site = Agent::start(&lab, &down, "site-agent");
    down.create_entry(&site.id, WEB, &[&uid_selector()], &[]);
    site.wait_for_svid(WEB).await;
    let before = site.held_svid(WEB).unwrap();
    let root_bundle = root.bundle_pem();

    // The root goes away.
    root.kill();
    let outage_start = std::time::Instant::now();
    eventually_within(
        "the downstream reports its upstream down",
        Duration::from_secs(15),
        || async { (upstream_up(&health) == Some(0.0)).then_some(()) },
    )
    .await;
    let hc = down.cli_ok(&["healthcheck"]);
    assert!(
        hc.contains("Upstream authority carapace: failing since"),
        "{hc}"
    );
    let hc = down.cli_json(&["healthcheck"]);
    assert!(
        hc["upstream"]["failing_since"].as_i64().unwrap() > 0,
        "{hc}"
    );

    // The workload's SVID rotates (20 s, renewed at half-life) under the same CA.
    let rotated = eventually_within(
        "the workload's SVID rotates",
        Duration::from_secs(30),
        || async {
            site.held_svid(WEB)
                .filter(|s| s.chain_pem != before.chain_pem)
        },
    )
    .await;
    let verified = openssl_verify(&lab, &rotated.chain_pem, &root_bundle);
    assert!(verified.contains(": OK"), "{verified}");
    // A new entry is served too.
    down.create_entry(&site.id, LATE, &[&uid_selector()], &[]);
    site.wait_for_svid(LATE).await;

    // Past the CA's half-life its preparation is due, and fails: the CA signs on, and
    // the server stays ready while the CA has more than a sixth of its life left.
    let prepare_due = first_ca_end - 60;
    while (now() as i64) < prepare_due + 5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = authorities(&down);
    assert_eq!(
        during["active"]["authority_id"],
        first_ca.as_str(),
        "{during}"
    );
    assert!(
        during["prepared"].is_null(),
        "nothing prepared without the root: {during}"
    );
    assert_eq!(ready_status(&health), Some(200));
    let held = site.held_svid(WEB).unwrap();
    assert!(
        held.expires_at > now() as i64,
        "the workload holds a live SVID"
    );

    // Longer than the downstream server's own SVID lives.
    let left = OUTAGE.saturating_sub(outage_start.elapsed());
    assert!(OUTAGE.as_secs() > DOWNSTREAM_SVID_TTL + 5);
    tokio::time::sleep(left).await;
    root.restart();

    // The root is back: the downstream's next CA is signed by it, the upstream is up.
    let next = eventually_within(
        "the root signs the downstream's next CA",
        Duration::from_secs(60),
        || async {
            let a = authorities(&down);
            let active = a["active"]["authority_id"].as_str().map(str::to_owned);
            let prepared = a["prepared"]["authority_id"].as_str().map(str::to_owned);
            prepared
                .or(active.filter(|id| *id != first_ca))
                .filter(|id| *id != first_ca)
                .map(|id| (id, a))
        },
    )
    .await;
    let (next_ca, state) = next;
    assert_eq!(
        state["active"]["upstream"], first["active"]["upstream"],
        "{state}"
    );
    assert_eq!(upstream_up(&health), Some(1.0));
    let hc = down.cli_ok(&["healthcheck"]);
    assert!(hc.contains("Upstream authority carapace: ok"), "{hc}");

    // Once activated, the workload's SVIDs chain to the new CA (the only other one), and
    // to the root.
    let first_ca_cert = certs_from_pem(&before.chain_pem).unwrap()[1].clone();
    let on_next = eventually_within(
        "the workload's SVID is signed by the new CA",
        Duration::from_secs(90),
        || async {
            let svid = site.held_svid(WEB)?;
            let chain = certs_from_pem(&svid.chain_pem).ok()?;
            (chain.get(1)? != &first_ca_cert).then_some(svid)
        },
    )
    .await;
    assert_eq!(
        authorities(&down)["active"]["authority_id"],
        next_ca.as_str(),
        "the new CA is the active one"
    );
    let verified = openssl_verify(&lab, &on_next.chain_pem, &root.bundle_pem());
    assert!(verified.contains(": OK"), "{verified}");
}
