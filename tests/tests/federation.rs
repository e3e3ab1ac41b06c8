//! SPIFFE federation end to end: three trust domains on loopback, each a real server and a
//! real agent, and workloads speaking mutual TLS through `spiffe-tls` (PyPI, py-spiffe's
//! TLS library: a client library Carapace did not write).
//!
//! - a.test serves its bundle over `https_spiffe` (its server SVID); b.test trusts it
//!   through `federation create` with a bootstrap bundle from `bundle show --format
//!   spiffe`.
//! - b.test serves its bundle over `https_web` (a certificate from a CA made with openssl);
//!   a.test trusts it through its config file (`[[federation.federates_with]]`, `ca_file`).
//! - c.test federates with nobody.
//!
//! A workload in a.test serves, one in b.test dials; each authorizes the other's exact
//! SPIFFE ID, each verifies the other with the bundle its agent got from federation. The
//! workload of c.test is refused. A CA rotation in a.test reaches b.test's workload within
//! the refresh hint, and mutual TLS keeps working across it. A peer serving another trust
//! domain's bundle, garbage, 10 MB or a redirect is refused and the last good bundle stays.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carapace_core::bundle::certs_from_pem;
use carapace_core::x509svid::verify_chain;
use carapace_core::{TrustBundle, TrustDomain};
use carapace_e2e::{
    Agent, Lab, Server, ServerOptions, eventually, free_port, now, python, uid_selector,
};
use serde_json::Value;

#[path = "support/py_peers.rs"]
mod py_peers;
use py_peers::{KillOnDrop, dial_mtls, py_jwt, script, serve_mtls};

/// The refresh hint both bundle endpoints serve, and the servers' polling floor.
const HINT_SECS: u64 = 2;

fn server(lab: &Lab, name: &str, td: &str, config: &str) -> Server {
    let path = lab.path().join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    Server::start_opts(
        lab,
        ServerOptions {
            name: Some(name.into()),
            extra: vec![
                "--trust-domain".into(),
                td.into(),
                "--config".into(),
                path.display().to_string(),
            ],
            ..ServerOptions::default()
        },
    )
}

/// Starts an agent of `server` (trust domain `td`) and registers this process, as a
/// workload, as `spiffe_id`, federating with `federates_with`.
async fn agent_with_workload(
    lab: &Lab,
    server: &Server,
    td: &str,
    spiffe_id: &str,
    federates_with: &[&str],
) -> Agent {
    let name = format!("{}-agent", td.trim_end_matches(".test"));
    let agent = Agent::start_with(
        lab,
        server,
        &name,
        &["--trust-domain".as_ref(), td.as_ref()],
    );
    let mut extra = Vec::new();
    for f in federates_with {
        extra.extend(["--federates-with", *f]);
    }
    server.create_entry(&agent.id, spiffe_id, &[&uid_selector()], &extra);
    agent.wait_for_svid(spiffe_id).await;
    agent
}

/// The federated bundles this process, as a workload, holds from `agent`: trust domain
/// ID → CA certificates (DER).
fn federated(agent: &Agent) -> serde_json::Map<String, Value> {
    let out = agent.fetch(&["--output", "json"]);
    assert!(
        out.status.success(),
        "api fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["federated_bundles"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

fn federated_cas(agent: &Agent, td_id: &str) -> Vec<Vec<u8>> {
    federated(agent)
        .get(td_id)
        .map(|pem| certs_from_pem(pem.as_str().unwrap()).unwrap())
        .unwrap_or_default()
}

/// The CA certificates of `server`'s own bundle.
fn own_cas(server: &Server) -> Vec<Vec<u8>> {
    certs_from_pem(&server.bundle_pem()).unwrap()
}

/// `federation show` of `td` on `server`, as JSON.
fn federation(server: &Server, td: &str) -> Value {
    server.cli_json(&["federation", "show", "--trust-domain", td])
}

/// The web PKI of b.test's `https_web` endpoint, made with openssl: (CA file, certificate
/// chain, key) for `localhost`.
fn web_pki(lab: &Lab) -> (PathBuf, PathBuf, PathBuf) {
    let dir = lab.path().join("web-pki");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = hsm_sim_tls(&dir);
    (dir.join("tls-ca.pem"), cert, key)
}

fn hsm_sim_tls(dir: &Path) -> (PathBuf, PathBuf) {
    hsm_sim::tls::make_ca_and_server_cert(dir, &["localhost"])
        .unwrap_or_else(|e| panic!("{e} (install openssl: apt-get install -y openssl)"))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_trust_domains_federate_both_ways_and_a_third_is_refused() {
    let lab = Lab::new();
    let (web_ca, web_cert, web_key) = web_pki(&lab);
    let (a_port, b_port, mtls_port) = (free_port(), free_port(), free_port());

    // b.test: its bundle over https_web.
    let b = server(
        &lab,
        "b",
        "b.test",
        &format!(
            "[federation]\nrefresh_floor = \"1s\"\n\n\
             [federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{b_port}\"\n\
             refresh_hint = \"{HINT_SECS}s\"\nprofile = \"https_web\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            web_cert.display(),
            web_key.display()
        ),
    );
    // a.test: its bundle over https_spiffe; trusts b.test from its config file.
    let a = server(
        &lab,
        "a",
        "a.test",
        &format!(
            "[federation]\nrefresh_floor = \"1s\"\n\n\
             [federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{a_port}\"\n\
             refresh_hint = \"{HINT_SECS}s\"\nprofile = \"https_spiffe\"\n\n\
             [[federation.federates_with]]\ntrust_domain = \"b.test\"\n\
             bundle_endpoint_url = \"https://localhost:{b_port}/\"\n\
             bundle_endpoint_profile = \"https_web\"\nca_file = \"{}\"\n",
            web_ca.display()
        ),
    );
    // b.test trusts a.test through the admin CLI, bootstrapped with a.test's bundle.
    let a_bundle = lab.path().join("a-bundle.json");
    std::fs::write(
        &a_bundle,
        a.cli_ok(&["bundle", "show", "--format", "spiffe"]),
    )
    .unwrap();
    b.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "a.test",
        "--bundle-endpoint-url",
        &format!("https://127.0.0.1:{a_port}/"),
        "--profile",
        "https_spiffe",
        "--bundle-path",
        a_bundle.to_str().unwrap(),
        "--bundle-format",
        "spiffe",
    ]);
    // c.test: nobody's peer.
    let c = server(&lab, "c", "c.test", "");

    // Each fetched the other's bundle: the relationship says so, the bundle is the peer's.
    for (local, peer, td) in [(&a, &b, "b.test"), (&b, &a, "a.test")] {
        let status = eventually(&format!("a successful fetch of {td}"), || async {
            let f = federation(local, td);
            f["last_success_at"].is_i64().then_some(f)
        })
        .await;
        assert!(status["last_error"].is_null(), "{status}");
        let stored = local.cli_ok(&["bundle", "show", "--trust-domain", td]);
        assert_eq!(certs_from_pem(&stored).unwrap(), own_cas(peer));
    }
    assert_eq!(federation(&a, "b.test")["source"], "config");
    assert_eq!(federation(&b, "a.test")["source"], "api");

    let a_agent =
        agent_with_workload(&lab, &a, "a.test", "spiffe://a.test/server", &["b.test"]).await;
    let b_agent =
        agent_with_workload(&lab, &b, "b.test", "spiffe://b.test/client", &["a.test"]).await;
    let c_agent = agent_with_workload(&lab, &c, "c.test", "spiffe://c.test/intruder", &[]).await;

    // Each workload holds exactly the peer's bundle it federates with.
    eventually("a.test's workload holds b.test's bundle", || async {
        (federated_cas(&a_agent, "spiffe://b.test") == own_cas(&b)).then_some(())
    })
    .await;
    eventually("b.test's workload holds a.test's bundle", || async {
        (federated_cas(&b_agent, "spiffe://a.test") == own_cas(&a)).then_some(())
    })
    .await;
    assert_eq!(federated(&a_agent).len(), 1);
    assert!(
        federated(&c_agent).is_empty(),
        "c.test federates with nobody"
    );

    // Mutual TLS through spiffe-tls: a.test serves, b.test dials, each pins the other.
    let address = format!("127.0.0.1:{mtls_port}");
    let _mtls_server = serve_mtls(&lab, &a_agent, &address, "spiffe://b.test/client");
    assert_eq!(
        dial_mtls(&b_agent, &address, "spiffe://a.test/server", "hello").unwrap(),
        "spiffe://a.test/server got: hello"
    );
    // c.test's workload is refused (it cannot verify a.test, and a.test does not trust it).
    let refused = dial_mtls(&c_agent, &address, "spiffe://a.test/server", "let me in").unwrap_err();
    assert!(refused.contains("refused"), "{refused}");
    // The server goes on serving b.test.
    assert_eq!(
        dial_mtls(&b_agent, &address, "spiffe://a.test/server", "again").unwrap(),
        "spiffe://a.test/server got: again"
    );

    // JWT-SVIDs cross too (py-spiffe): a token of b.test's workload is validated by
    // a.test's agent with b.test's federated JWT key; c.test's agent refuses it.
    let token = py_jwt(&b_agent, &["fetch", "a-server"]).unwrap()["default"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let valid = py_jwt(&a_agent, &["validate", "a-server", &token]).unwrap();
    assert_eq!(valid["spiffe_id"], "spiffe://b.test/client");
    let kids = py_jwt(&a_agent, &["bundles"]).unwrap();
    assert!(
        kids["b.test"].as_array().is_some_and(|k| !k.is_empty()),
        "{kids}"
    );
    assert!(kids.get("c.test").is_none(), "{kids}");
    let refused = py_jwt(&c_agent, &["validate", "a-server", &token]).unwrap_err();
    assert!(refused.contains("b.test"), "{refused}");

    // A CA rotation in a.test: the prepared CA reaches b.test's workload within about the
    // refresh hint (poll at the hint, then the agent's sync stream and Workload API).
    let old_id = a.cli_json(&["localauthority", "x509", "show"])["active"]["authority_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = own_cas(&a);
    let prepared = a.cli_json(&["localauthority", "x509", "prepare"]);
    let new_id = prepared["authority_id"].as_str().unwrap().to_owned();
    let new_ca = own_cas(&a)
        .into_iter()
        .find(|c| !before.contains(c))
        .expect("the prepared CA is in a.test's bundle");
    let started = Instant::now();
    eventually("the prepared CA at b.test's workload", || async {
        federated_cas(&b_agent, "spiffe://a.test")
            .contains(&new_ca)
            .then_some(())
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(HINT_SECS * 5),
        "the prepared CA took {took:?} to reach the federated workload (hint {HINT_SECS}s)"
    );
    // Activate it and taint the old one: a.test's workload is re-issued under the new CA
    // at once, and b.test still accepts it.
    a.cli_ok(&[
        "localauthority",
        "x509",
        "activate",
        "--authority-id",
        &new_id,
    ]);
    a.cli_ok(&["localauthority", "x509", "taint", "--authority-id", &old_id]);
    eventually("a.test's workload re-issued under the new CA", || async {
        let svid = a_agent.held_svid("spiffe://a.test/server")?;
        let chain = certs_from_pem(&svid.chain_pem).ok()?;
        let mut only_new = TrustBundle::new(TrustDomain::new("a.test").unwrap());
        only_new.x509_authorities.push(new_ca.clone());
        verify_chain(&chain, &only_new, now()).ok().map(drop)
    })
    .await;
    eventually("mutual TLS under the new CA", || async {
        dial_mtls(&b_agent, &address, "spiffe://a.test/server", "rotated")
            .ok()
            .filter(|a| a == "spiffe://a.test/server got: rotated")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_serving_garbage_never_replaces_the_last_good_bundle() {
    let lab = Lab::new();
    let (web_ca, web_cert, web_key) = web_pki(&lab);
    let b_port = free_port();
    let b = server(
        &lab,
        "b",
        "b.test",
        &format!(
            "[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{b_port}\"\n\
             refresh_hint = \"{HINT_SECS}s\"\nprofile = \"https_web\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            web_cert.display(),
            web_key.display()
        ),
    );
    // b.test's endpoint parses with py-spiffe's bundle parsers, and is b.test's bundle.
    let out = Command::new(python())
        .arg(script("parse_bundle.py"))
        .arg(format!("https://localhost:{b_port}/"))
        .arg(&web_ca)
        .arg("b.test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "py-spiffe could not parse the bundle endpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut parsed_cas: Vec<Vec<u8>> = parsed["x509_authorities"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| certs_from_pem(p.as_str().unwrap()).unwrap())
        .collect();
    let mut b_cas = own_cas(&b);
    parsed_cas.sort();
    b_cas.sort();
    assert_eq!(parsed_cas, b_cas);
    assert_eq!(parsed["refresh_hint"], HINT_SECS);
    assert!(parsed["sequence"].as_u64().unwrap() >= 1, "{parsed}");
    assert!(
        !parsed["jwt_kids"].as_array().unwrap().is_empty(),
        "{parsed}"
    );

    // a.test trusts "c.test" at an endpoint the test controls (Python's ssl + http.server).
    let c = server(&lab, "c", "c.test", "");
    let peer_port = free_port();
    let mode = lab.path().join("peer-mode");
    let serve = |what: &str| std::fs::write(&mode, what).unwrap();
    let c_json = lab.path().join("c.json");
    std::fs::write(&c_json, c.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    let b_json = lab.path().join("b.json");
    std::fs::write(&b_json, b.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    let garbage = lab.path().join("garbage.json");
    std::fs::write(
        &garbage,
        "{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"bm90IGEgY2VydA==\"]}",
    )
    .unwrap();
    serve(&format!("serve {}", c_json.display()));
    let mut peer = Command::new(python())
        .arg(script("bundle_peer.py"))
        .arg(peer_port.to_string())
        .arg(&web_cert)
        .arg(&web_key)
        .arg(&mode)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(peer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening");
    let _peer = KillOnDrop(peer);

    let a = server(
        &lab,
        "a",
        "a.test",
        "[federation]\nrefresh_ceiling = \"1h\"\n",
    );
    a.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "c.test",
        "--bundle-endpoint-url",
        &format!("https://localhost:{peer_port}/"),
        "--profile",
        "https_web",
        "--ca-file",
        web_ca.to_str().unwrap(),
    ]);
    // The good bundle first.
    eventually("c.test's bundle", || async {
        let out = a.cli(&["bundle", "show", "--trust-domain", "c.test"]);
        out.status.success().then_some(())
    })
    .await;
    let good = a.cli_ok(&["bundle", "show", "--trust-domain", "c.test"]);
    assert_eq!(certs_from_pem(&good).unwrap(), own_cas(&c));

    for (what, expect) in [
        (format!("serve {}", b_json.display()), "b.test"),
        (format!("serve {}", garbage.display()), "bundle"),
        ("big".to_owned(), "1048576"),
        ("redirect".to_owned(), "redirect"),
    ] {
        serve(&what);
        let out = a.cli(&["federation", "refresh", "--trust-domain", "c.test"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{what}: {text}");
        assert!(text.contains(expect), "{what}: {expect:?} not in {text}");
        let status = federation(&a, "c.test");
        assert!(
            status["last_error"].as_str().unwrap().contains(expect),
            "{what}: {status}"
        );
        assert_eq!(
            a.cli_ok(&["bundle", "show", "--trust-domain", "c.test"]),
            good,
            "{what}: the last good bundle stays"
        );
    }
    // Mended: the next refresh succeeds again.
    serve(&format!("serve {}", c_json.display()));
    a.cli_ok(&["federation", "refresh", "--trust-domain", "c.test"]);
}
