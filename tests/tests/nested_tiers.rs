//! End to end: three tiers of nested servers on loopback (issue 20). A root server whose
//! CA key is in SoftHSM2 (`[key_manager.pkcs11]`) serves `[downstream]`; two downstream
//! servers (site-a, site-b) run under it, each with an agent of the root beside it (the
//! root's entry for the server's executable and uid, marked `--downstream`) and
//! `[upstream_authority.carapace]`; an agent and a workload (this process) under each
//! downstream server.
//!
//! - Workloads under different downstream servers do mutual TLS with each other through
//!   `spiffe-tls` (PyPI), each authorizing the other's exact SPIFFE ID, both ways; the
//!   bundle each holds is the root's; `openssl verify` takes each SVID chain (leaf +
//!   downstream CA) to the root bundle, and refuses the leaf alone.
//! - A JWT-SVID of either site validates through the other site's agent and through an
//!   agent of the root (its key went up with `PublishJWTAuthority` and down with
//!   `WatchBundle`).
//! - A root CA prepared at the top reaches both downstream servers' bundles and the
//!   bundles both workloads fetch, within a bounded time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carapace_core::bundle::{certs_from_pem, der_to_pem};
use carapace_e2e::{
    Agent, Lab, Server, ServerOptions, eventually, free_port, openssl_verify, py_fetch,
    uid_selector,
};
use hsm_sim::softhsm::{SoftHsm, Token};
use serde_json::Value;

#[path = "support/py_peers.rs"]
mod py_peers;
#[path = "support/nested.rs"]
mod support;
use py_peers::{dial_mtls, py_jwt, serve_mtls};
use support::{TD, downstream, downstream_entry, with_config, write_config};

const SITE_A: &str = "spiffe://example.org/downstream/site-a";
const SITE_B: &str = "spiffe://example.org/downstream/site-b";
const WEB_A: &str = "spiffe://example.org/site-a/web";
const WEB_B: &str = "spiffe://example.org/site-b/web";
const WEB_A_NEXT: &str = "spiffe://example.org/site-a/web-next";
/// How long a root rotation may take to reach every tier: WatchBundle pushes the root's
/// bundle to the downstream servers at once, their agents sync every few seconds.
const ROTATION_BOUND: Duration = Duration::from_secs(30);

/// The root: its CA (and JWT and TLS keys) in a SoftHSM2 token, serving downstream
/// servers. Its CA lives 6 h, so a downstream CA gets at most 1 h.
fn root(lab: &Lab, hsm: &SoftHsm, token: &Token) -> Server {
    let config = write_config(
        lab,
        "root",
        &format!(
            "trust_domain = \"{TD}\"\nca_ttl = \"6h\"\n[downstream]\n[key_manager.pkcs11]\n\
             module = {:?}\ntoken_label = {:?}\npin_file = {:?}\n",
            hsm.module().display().to_string(),
            token.label,
            token.pin_file.display().to_string()
        ),
    );
    Server::start_opts(
        lab,
        ServerOptions {
            envs: hsm.envs(),
            ..with_config("root", &config)
        },
    )
}

/// Runs `pkcs11-tool` (logged in) against the token; returns its stdout.
fn pkcs11_tool(hsm: &SoftHsm, token: &Token, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(hsm.module())
        .args([
            "--token-label",
            &token.label,
            "--login",
            "--pin",
            &token.user_pin,
        ])
        .args(args)
        .envs(hsm.envs())
        .output()
        .unwrap_or_else(|e| {
            panic!("pkcs11-tool not found ({e}): install it with apt-get install -y opensc")
        });
    assert!(
        out.status.success(),
        "pkcs11-tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The public keys (DER SubjectPublicKeyInfo) of the X.509 CA keys in the token, read
/// with `pkcs11-tool`.
fn token_ca_keys(lab: &Lab, hsm: &SoftHsm, token: &Token) -> Vec<Vec<u8>> {
    let listing = pkcs11_tool(
        hsm,
        token,
        &[
            "--list-objects".as_ref(),
            "--type".as_ref(),
            "pubkey".as_ref(),
        ],
    );
    let labels: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("label:"))
        .map(str::trim)
        .filter(|l| l.starts_with("carapace-x509-ca-"))
        .collect();
    assert!(!labels.is_empty(), "no CA key in the token:\n{listing}");
    labels
        .into_iter()
        .map(|label| {
            let file = lab.path().join(format!("{label}.spki.der"));
            pkcs11_tool(
                hsm,
                token,
                &[
                    "--read-object".as_ref(),
                    "--type".as_ref(),
                    "pubkey".as_ref(),
                    "--label".as_ref(),
                    label.as_ref(),
                    "--output-file".as_ref(),
                    file.as_os_str(),
                ],
            );
            std::fs::read(&file).unwrap()
        })
        .collect()
}

/// The public key (DER SubjectPublicKeyInfo) of a certificate (DER), read with openssl.
fn cert_public_key(lab: &Lab, cert: &[u8]) -> Vec<u8> {
    let pem = lab.path().join("cert-for-key.pem");
    std::fs::write(&pem, der_to_pem(cert)).unwrap();
    let key_pem = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&pem)
        .output()
        .unwrap_or_else(|e| panic!("openssl not found ({e}): apt-get install -y openssl"));
    assert!(key_pem.status.success(), "{key_pem:?}");
    let mut der = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut der.stdin.take().unwrap(), &key_pem.stdout).unwrap();
    let der = der.wait_with_output().unwrap();
    assert!(der.status.success(), "{der:?}");
    der.stdout
}

/// The CA certificates (DER) in a PEM bundle, sorted: a bundle is a set.
fn cas(pem: &str) -> Vec<Vec<u8>> {
    let mut certs = certs_from_pem(pem).unwrap();
    certs.sort();
    certs
}

/// The bundle this process, as a workload, holds from `agent` now (through the agent
/// CLI: cheap enough to poll).
fn held_bundle(agent: &Agent) -> Vec<Vec<u8>> {
    let out = agent.fetch(&["--output", "json"]);
    assert!(
        out.status.success(),
        "api fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    cas(doc["svids"][0]["bundle_pem"].as_str().unwrap())
}

/// A JWT-SVID for `audience` this process gets from `agent`.
fn jwt_of(agent: &Agent, audience: &str) -> String {
    py_jwt(agent, &["fetch", audience]).unwrap()["default"]["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits until `agent` validates `token` for `audience` (its signing key may still be on
/// its way through the tiers); returns the SPIFFE ID it validated.
async fn validated_by(agent: &Agent, what: &str, audience: &str, token: &str) -> String {
    let valid = eventually(what, || async {
        py_jwt(agent, &["validate", audience, token]).ok()
    })
    .await;
    valid["spiffe_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_tiers_under_a_root_in_an_hsm_share_trust_both_ways() {
    let started = Instant::now();
    let lab = Lab::new();
    let hsm = SoftHsm::new().unwrap_or_else(|e| panic!("{e}"));
    let token = hsm.init_token("root").unwrap_or_else(|e| panic!("{e}"));
    let root = root(&lab, &hsm, &token);

    // An agent of the root beside each downstream server, and the root's entry for each
    // downstream server process under it.
    let upper_a = Agent::start(&lab, &root, "upper-a");
    let upper_b = Agent::start(&lab, &root, "upper-b");
    downstream_entry(&root, &upper_a.id, SITE_A, &[]);
    downstream_entry(&root, &upper_b.id, SITE_B, &[]);

    // Both downstream servers start together; each mints its CA from the root at once.
    let mut site_a = Server::spawn_opts(
        &lab,
        downstream(&lab, "site-a", &root.address, &upper_a.socket),
    );
    let mut site_b = Server::spawn_opts(
        &lab,
        downstream(&lab, "site-b", &root.address, &upper_b.socket),
    );
    site_a.wait_healthy();
    site_b.wait_healthy();

    // An agent and a workload (this process) under each.
    let agent_a = Agent::start(&lab, &site_a, "agent-a");
    let agent_b = Agent::start(&lab, &site_b, "agent-b");
    site_a.create_entry(&agent_a.id, WEB_A, &[&uid_selector()], &[]);
    site_b.create_entry(&agent_b.id, WEB_B, &[&uid_selector()], &[]);
    agent_a.wait_for_svid(WEB_A).await;
    agent_b.wait_for_svid(WEB_B).await;
    eprintln!("three tiers up in {:?}", started.elapsed());

    // 1. Each workload holds the root's bundle, and its SVID chains to it through its
    // downstream server's CA (and only through it).
    let root_pem = root.bundle_pem();
    let root_cas = cas(&root_pem);
    // The root CA's key is the token's.
    assert_eq!(root_cas.len(), 1, "{root_pem}");
    assert!(
        token_ca_keys(&lab, &hsm, &token).contains(&cert_public_key(&lab, &root_cas[0])),
        "the root CA certifies a key in the token"
    );
    let mut downstream_cas = Vec::new();
    for (agent, id) in [(&agent_a, WEB_A), (&agent_b, WEB_B)] {
        let ctx = py_fetch(&agent.socket);
        assert_eq!(ctx["default"], id, "{ctx}");
        assert_eq!(
            cas(ctx["bundle_pem"].as_str().unwrap()),
            root_cas,
            "the workload under {id} holds the root's bundle"
        );
        let chain_pem = ctx["svids"][0]["chain_pem"].as_str().unwrap();
        let chain = certs_from_pem(chain_pem).unwrap();
        assert_eq!(chain.len(), 2, "leaf + downstream CA: {chain_pem}");
        assert!(
            !root_cas.contains(&chain[1]),
            "the downstream CA is an intermediate, not a root"
        );
        downstream_cas.push(chain[1].clone());
        let verified = openssl_verify(&lab, chain_pem, &root_pem);
        assert!(verified.contains(": OK"), "{id}: {verified}");
        let leaf_only = openssl_verify(&lab, &der_to_pem(&chain[0]), &root_pem);
        assert!(!leaf_only.contains(": OK"), "{id}, leaf alone: {leaf_only}");
    }
    assert_ne!(
        downstream_cas[0], downstream_cas[1],
        "each downstream server has its own CA"
    );

    // 2. Mutual TLS across the sites through spiffe-tls, both ways, each side pinning the
    // other's exact ID.
    let address_a = format!("127.0.0.1:{}", free_port());
    let address_b = format!("127.0.0.1:{}", free_port());
    let _serve_a = serve_mtls(&lab, &agent_a, &address_a, WEB_B);
    let _serve_b = serve_mtls(&lab, &agent_b, &address_b, WEB_A);
    assert_eq!(
        dial_mtls(&agent_b, &address_a, WEB_A, "from b").unwrap(),
        format!("{WEB_A} got: from b")
    );
    assert_eq!(
        dial_mtls(&agent_a, &address_b, WEB_B, "from a").unwrap(),
        format!("{WEB_B} got: from a")
    );
    // The ID is what is authorized, not just the chain: site-b's workload expecting
    // another ID at site-a's address refuses the connection.
    let refused = dial_mtls(&agent_b, &address_a, WEB_B, "wrong peer").unwrap_err();
    assert!(refused.contains("refused"), "{refused}");
    eprintln!("mutual TLS done at {:?}", started.elapsed());

    // 3. JWT-SVIDs across tiers: site-a's key went to the root (PublishJWTAuthority) and
    // from there to site-b (WatchBundle) and its agent; and the other way round.
    let token_a = jwt_of(&agent_a, "billing");
    let token_b = jwt_of(&agent_b, "billing");
    for (agent, token, id, what) in [
        (
            &agent_b,
            &token_a,
            WEB_A,
            "site-b's agent validating site-a's JWT-SVID",
        ),
        (
            &upper_a,
            &token_a,
            WEB_A,
            "a root agent validating site-a's JWT-SVID",
        ),
        (
            &agent_a,
            &token_b,
            WEB_B,
            "site-a's agent validating site-b's JWT-SVID",
        ),
        (
            &upper_b,
            &token_b,
            WEB_B,
            "a root agent validating site-b's JWT-SVID",
        ),
    ] {
        assert_eq!(validated_by(agent, what, "billing", token).await, id);
    }
    // Another audience is still refused: validation, not a rubber stamp.
    let refused = py_jwt(&agent_b, &["validate", "payroll", &token_a]).unwrap_err();
    assert!(refused.contains("validate failed"), "{refused}");
    eprintln!("JWT across tiers done at {:?}", started.elapsed());

    // 4. A root CA prepared at the top reaches every tier: both downstream servers'
    // bundles and the bundles both workloads fetch.
    let prepared = root.cli_json(&["localauthority", "x509", "prepare"]);
    let rotated = Instant::now();
    let after = cas(&root.bundle_pem());
    let new_ca = after
        .iter()
        .find(|c| !root_cas.contains(c))
        .unwrap_or_else(|| panic!("the prepared CA is in the root's bundle: {prepared}"))
        .clone();
    assert!(
        token_ca_keys(&lab, &hsm, &token).contains(&cert_public_key(&lab, &new_ca)),
        "the prepared root CA's key is in the token too"
    );
    let mut pending: Vec<&str> = vec!["site-a", "site-b", "agent-a", "agent-b"];
    while !pending.is_empty() {
        pending.retain(|tier| {
            let bundle = match *tier {
                "site-a" => cas(&site_a.bundle_pem()),
                "site-b" => cas(&site_b.bundle_pem()),
                "agent-a" => held_bundle(&agent_a),
                _ => held_bundle(&agent_b),
            };
            !bundle.contains(&new_ca)
        });
        assert!(
            pending.is_empty() || rotated.elapsed() < ROTATION_BOUND,
            "the root's prepared CA has not reached {pending:?} within {ROTATION_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the prepared root CA reached every tier in {:?}",
        rotated.elapsed()
    );
    // What a SPIFFE client fetches under each site: the root's whole bundle, new CA
    // included.
    for agent in [&agent_a, &agent_b] {
        let ctx = py_fetch(&agent.socket);
        assert_eq!(cas(ctx["bundle_pem"].as_str().unwrap()), after, "{ctx}");
    }
    for site in [&site_a, &site_b] {
        assert_eq!(cas(&site.bundle_pem()), after);
    }

    // The rotation is usable down the tiers: the root activates its new CA; site-a
    // prepares and activates a CA of its own (minted by the root, now under the new root
    // CA); an SVID site-a signs from then on chains to the new root CA alone, and verifies
    // against the bundle site-b's workload holds.
    let prepared_id = prepared["authority_id"].as_str().unwrap();
    root.cli_ok(&[
        "localauthority",
        "x509",
        "activate",
        "--authority-id",
        prepared_id,
    ]);
    let site_prepared = site_a.cli_json(&["localauthority", "x509", "prepare"]);
    site_a.cli_ok(&[
        "localauthority",
        "x509",
        "activate",
        "--authority-id",
        site_prepared["authority_id"].as_str().unwrap(),
    ]);
    site_a.create_entry(&agent_a.id, WEB_A_NEXT, &[&uid_selector()], &[]);
    agent_a.wait_for_svid(WEB_A_NEXT).await;
    let next = agent_a.held_svid(WEB_A_NEXT).unwrap();
    let chain = certs_from_pem(&next.chain_pem).unwrap();
    assert_eq!(chain.len(), 2, "leaf + site-a's new CA: {}", next.chain_pem);
    assert!(
        !downstream_cas.contains(&chain[1]),
        "signed by site-a's new CA"
    );
    let verified = openssl_verify(&lab, &next.chain_pem, &der_to_pem(&new_ca));
    assert!(verified.contains(": OK"), "to the new root CA: {verified}");
    let old_root = openssl_verify(&lab, &next.chain_pem, &root_pem);
    assert!(
        !old_root.contains(": OK"),
        "not to the old root CA: {old_root}"
    );
    let site_b_bundle: String = held_bundle(&agent_b)
        .iter()
        .map(|c| der_to_pem(c))
        .collect();
    let verified = openssl_verify(&lab, &next.chain_pem, &site_b_bundle);
    assert!(
        verified.contains(": OK"),
        "with site-b's workload's bundle: {verified}"
    );
    eprintln!("done in {:?}", started.elapsed());
}
