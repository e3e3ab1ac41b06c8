//! End to end: the CA lifecycle an operator drives (`localauthority x509 prepare`,
//! `activate`, `taint`, `revoke`) against the real server and agent, seen by a workload
//! watching through py-spiffe, by the agent's own SVID and by `openssl verify`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use carapace_core::TrustBundle;
use carapace_core::bundle::certs_from_pem;
use carapace_core::x509svid::verify_chain;
use carapace_e2e::{
    Agent, Lab, Server, eventually, now, openssl_verify, patience, python, td, uid_selector,
};

const WEB: &str = "spiffe://example.org/web";
/// How soon after `taint` every SVID chained to the tainted CA must be re-issued: far
/// less than half the 1 h TTLs here, so only the taint can explain it.
const REISSUE_WITHIN: Duration = Duration::from_secs(10);

/// Whether `chain` (leaf first) is signed under the CA certificate `ca`.
fn chained_to(chain: &[Vec<u8>], ca: &[u8]) -> bool {
    let mut only = TrustBundle::new(td());
    only.x509_authorities = vec![ca.to_vec()];
    verify_chain(chain, &only, now()).is_ok()
}

/// The CA certificates of `bundle show`, DER.
fn bundle_certs(server: &Server) -> Vec<Vec<u8>> {
    certs_from_pem(&server.bundle_pem()).unwrap()
}

/// The agent's own SVID chain as it keeps it in its data directory.
fn agent_svid(agent: &Agent) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(agent.data_dir.join("agent.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    certs_from_pem(doc["svid_chain_pem"].as_str().unwrap()).unwrap()
}

/// A long-running py-spiffe workload (tests/python/watch_x509.py) streaming X.509
/// contexts; each update arrives on the channel.
struct Watcher {
    child: std::process::Child,
    updates: mpsc::Receiver<serde_json::Value>,
    stderr: std::path::PathBuf,
}

impl Watcher {
    fn start(lab: &Lab, agent: &Agent) -> Watcher {
        let script =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/watch_x509.py");
        let stderr = lab.path().join("watch_x509.err");
        let mut child = Command::new(python())
            .arg(script)
            .arg(&agent.socket)
            .arg("300")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, updates) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                    return;
                }
            }
        });
        Watcher {
            child,
            updates,
            stderr,
        }
    }

    /// The next update satisfying `pred` (earlier ones are dropped), within `within`.
    fn next_where(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.updates.recv_timeout(left) {
                Ok(u) if pred(&u) => return u,
                Ok(_) => {}
                Err(_) => panic!(
                    "the py-spiffe workload got no update with {what} within {within:?}; its stderr: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                ),
            }
        }
    }

    /// Every update received so far, the last one last.
    fn drain(&mut self) -> Vec<serde_json::Value> {
        self.updates.try_iter().collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chain (DER, leaf first) of the SVID for `id` in a watcher update, if any.
fn svid_in(update: &serde_json::Value, id: &str) -> Option<Vec<Vec<u8>>> {
    update["svids"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spiffe_id"] == id)
        .map(|s| certs_from_pem(s["chain_pem"].as_str().unwrap()).unwrap())
}

fn pem_of(chain: &[Vec<u8>]) -> String {
    chain
        .iter()
        .map(|c| carapace_core::bundle::der_to_pem(c))
        .collect()
}

fn authority_state(server: &Server) -> serde_json::Value {
    server.cli_json(&["localauthority", "x509", "show"])
}

#[tokio::test(flavor = "multi_thread")]
async fn taint_reissues_every_svid_at_once_and_revoke_distrusts_the_old_ca() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = Agent::start(&lab, &server, "agent");
    server.create_entry(
        &agent.id,
        WEB,
        &[&uid_selector()],
        &["--x509-svid-ttl", "1h"],
    );
    let mut watcher = Watcher::start(&lab, &agent);
    let first = watcher.next_where("the web SVID", patience(), |u| svid_in(u, WEB).is_some());
    let old_svid = svid_in(&first, WEB).unwrap();

    let old_ca = bundle_certs(&server);
    assert_eq!(old_ca.len(), 1);
    let old_ca = old_ca[0].clone();
    let old_id = authority_state(&server)["active"]["authority_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(chained_to(&old_svid, &old_ca));
    let old_agent_svid = agent_svid(&agent);
    assert!(chained_to(&old_agent_svid, &old_ca));

    // prepare + activate: the new CA is trusted, then signs; nothing held is re-issued.
    let prepared = server.cli_json(&["localauthority", "x509", "prepare"]);
    let new_id = prepared["authority_id"].as_str().unwrap().to_owned();
    let new_ca = bundle_certs(&server)
        .into_iter()
        .find(|c| *c != old_ca)
        .expect("the prepared CA is in the bundle");
    watcher.next_where("the prepared CA in its bundle", patience(), |u| {
        certs_from_pem(u["bundle_pem"].as_str().unwrap())
            .unwrap()
            .contains(&new_ca)
    });
    server.cli_ok(&[
        "localauthority",
        "x509",
        "activate",
        "--authority-id",
        &new_id,
    ]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for u in watcher.drain() {
        assert_eq!(
            svid_in(&u, WEB).as_ref(),
            Some(&old_svid),
            "activate alone re-issues nothing"
        );
    }
    assert_eq!(agent_svid(&agent), old_agent_svid);

    // taint: the workload's SVID and the agent's own are re-issued under the new CA at
    // once.
    let tainted_at = now() as f64;
    let started = Instant::now();
    let out = server.cli_json(&["localauthority", "x509", "taint", "--authority-id", &old_id]);
    assert_eq!(out["tainted"], true);
    let update = watcher.next_where("a web SVID under the new CA", REISSUE_WITHIN, |u| {
        svid_in(u, WEB).is_some_and(|c| chained_to(&c, &new_ca))
    });
    let received_at = update["received_at"].as_f64().unwrap();
    assert!(
        received_at - tainted_at < REISSUE_WITHIN.as_secs_f64(),
        "re-issued {:.1} s after the taint",
        received_at - tainted_at
    );
    let new_svid = svid_in(&update, WEB).unwrap();
    assert!(!chained_to(&new_svid, &old_ca));
    let new_agent_svid = eventually("the agent SVID re-issued under the new CA", || async {
        let chain = agent_svid(&agent);
        chained_to(&chain, &new_ca).then_some(chain)
    })
    .await;
    assert!(
        started.elapsed() < REISSUE_WITHIN,
        "the agent SVID took {:?}",
        started.elapsed()
    );
    // The server takes the new agent SVID as current once the agent first uses it.
    let serial = hex_serial(&new_agent_svid[0]);
    eventually(
        "the agent to use its renewed SVID with the server",
        || async {
            let shown = server.cli_json(&["agent", "show", "--spiffe-id", &agent.id]);
            (shown["serial"].as_str().unwrap().trim_start_matches('0')
                == serial.trim_start_matches('0'))
            .then_some(())
        },
    )
    .await;

    // The taint is in the journal: a restarted server still has it.
    let mut server = server;
    server.restart();
    let state = authority_state(&server);
    assert_eq!(state["old"][0]["authority_id"], old_id.as_str());
    assert_eq!(state["old"][0]["tainted"], true);

    // revoke: the old CA leaves `bundle show`, the agent's and the workload's bundles;
    // an SVID chained to it no longer verifies with openssl, the new one does.
    server.cli_ok(&[
        "localauthority",
        "x509",
        "revoke",
        "--authority-id",
        &old_id,
    ]);
    let bundle = server.bundle_pem();
    let certs = certs_from_pem(&bundle).unwrap();
    assert!(
        !certs.contains(&old_ca),
        "bundle show still holds the revoked CA"
    );
    assert_eq!(certs, vec![new_ca.clone()]);
    let out = openssl_verify(&lab, &pem_of(&old_svid), &bundle);
    assert!(!out.contains(": OK"), "the old SVID still verifies: {out}");
    let out = openssl_verify(&lab, &pem_of(&old_agent_svid), &bundle);
    assert!(
        !out.contains(": OK"),
        "the old agent SVID still verifies: {out}"
    );
    let out = openssl_verify(&lab, &pem_of(&new_svid), &bundle);
    assert!(out.contains(": OK"), "the new SVID does not verify: {out}");
    let out = openssl_verify(&lab, &pem_of(&new_agent_svid), &bundle);
    assert!(
        out.contains(": OK"),
        "the new agent SVID does not verify: {out}"
    );
    let update = watcher.next_where("a bundle without the revoked CA", patience(), |u| {
        !certs_from_pem(u["bundle_pem"].as_str().unwrap())
            .unwrap()
            .contains(&old_ca)
    });
    assert_eq!(
        certs_from_pem(update["bundle_pem"].as_str().unwrap()).unwrap(),
        vec![new_ca.clone()]
    );
    let state = authority_state(&server);
    assert_eq!(state["active"]["authority_id"], new_id.as_str());
    assert_eq!(state["old"], serde_json::json!([]));

    // The agent still works with the server under the new CA alone: a new entry arrives.
    server.create_entry(
        &agent.id,
        "spiffe://example.org/after",
        &[&uid_selector()],
        &[],
    );
    watcher.next_where(
        "an SVID for a new entry after the revoke",
        patience(),
        |u| svid_in(u, "spiffe://example.org/after").is_some_and(|c| chained_to(&c, &new_ca)),
    );
}

/// The leaf's serial, lowercase hex, through openssl (as an operator reads it).
fn hex_serial(der: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("openssl not found ({e}): install it with 'apt-get install openssl'")
        });
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), der).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase()
}

#[test]
fn taint_of_the_active_ca_and_revoke_of_an_untainted_one_are_refused() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let first = authority_state(&server)["active"]["authority_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = |args: &[&str], why: &str| {
        let bundle = server.bundle_pem();
        let state = authority_state(&server);
        let out = server.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert_eq!(server.bundle_pem(), bundle, "{args:?} changed the bundle");
        assert_eq!(
            authority_state(&server),
            state,
            "{args:?} changed the authorities"
        );
    };
    refused(
        &["localauthority", "x509", "taint", "--authority-id", &first],
        "it is the active X.509 authority",
    );
    refused(
        &["localauthority", "x509", "revoke", "--authority-id", &first],
        "it is the active X.509 authority",
    );
    refused(
        &[
            "localauthority",
            "x509",
            "taint",
            "--authority-id",
            "nothex",
        ],
        "--authority-id",
    );
    refused(
        &["localauthority", "x509", "activate"],
        "no prepared X.509 authority",
    );
    server.cli_ok(&["localauthority", "x509", "prepare"]);
    server.cli_ok(&["localauthority", "x509", "activate"]);
    refused(
        &["localauthority", "x509", "revoke", "--authority-id", &first],
        "only a tainted X.509 authority can be revoked",
    );
    refused(
        &[
            "localauthority",
            "x509",
            "revoke",
            "--authority-id",
            "0123abcd",
        ],
        "no X.509 authority 0123abcd",
    );
    // The old CA is still in the bundle, untainted, after all of that.
    let state = authority_state(&server);
    assert_eq!(state["old"][0]["authority_id"], first.as_str());
    assert_eq!(state["old"][0]["tainted"], false);
    assert_eq!(certs_from_pem(&server.bundle_pem()).unwrap().len(), 2);
}
