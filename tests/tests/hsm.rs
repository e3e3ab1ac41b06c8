//! End to end with the CA in a PKCS#11 token (SoftHSM2, provisioned by hsm-sim): the
//! server's X.509 CA key and node-API TLS key live in the token; SVIDs reach the Python
//! `spiffe` client and verify with `openssl verify`; a restart keeps the CA; the token's
//! private objects are non-extractable as `pkcs11-tool` sees them; a wrong PIN stops the
//! server with the documented message. Also the upstream authorities: two servers under
//! one root in the token, and a root in PEM files (`disk`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_core::TrustBundle;
use carapace_e2e::{
    Agent, Lab, Server, ServerOptions, bin, eventually, now, openssl_verify, py_fetch, td,
    uid_selector,
};
use hsm_sim::softhsm::{SoftHsm, Token};

/// A SoftHSM2 token for one test.
fn token(label: &str) -> (SoftHsm, Token) {
    let hsm = SoftHsm::new().unwrap_or_else(|e| panic!("{e}"));
    let token = hsm.init_token(label).unwrap_or_else(|e| panic!("{e}"));
    (hsm, token)
}

/// The token settings shared by the key manager and the upstream authority.
fn token_settings(hsm: &SoftHsm, token: &Token, pin_file: &Path) -> String {
    format!(
        "module = {:?}\ntoken_label = {:?}\npin_file = {:?}\n",
        hsm.module().display().to_string(),
        token.label,
        pin_file.display().to_string()
    )
}

fn write_config(lab: &Lab, name: &str, text: &str) -> PathBuf {
    let path = lab.path().join(format!("{name}.toml"));
    std::fs::write(&path, format!("trust_domain = \"example.org\"\n{text}")).unwrap();
    path
}

fn options(name: &str, config: &Path, hsm: &SoftHsm) -> ServerOptions {
    ServerOptions {
        name: Some(name.into()),
        extra: vec!["--config".into(), config.display().to_string()],
        envs: hsm.envs(),
        ..ServerOptions::default()
    }
}

/// Runs `pkcs11-tool` against the token; returns stdout+stderr and success.
fn pkcs11_tool(hsm: &SoftHsm, token: &Token, args: &[&str]) -> (bool, String) {
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
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_key_in_softhsm_issues_svids_that_real_clients_accept() {
    let lab = Lab::new();
    let (hsm, token) = token("ca");
    let config = write_config(
        &lab,
        "server",
        &format!(
            "[key_manager.pkcs11]\n{}",
            token_settings(&hsm, &token, &token.pin_file)
        ),
    );
    let mut server = Server::start_opts(&lab, options("server", &config, &hsm));
    let agent = Agent::start(&lab, &server, "agent");
    server.create_entry(
        &agent.id,
        "spiffe://example.org/hsm",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_an_svid().await;

    // The Python client gets an SVID that openssl verifies against the bundle.
    let v = py_fetch(&agent.socket);
    assert_eq!(v["default"], "spiffe://example.org/hsm");
    let chain_pem = v["svids"][0]["chain_pem"].as_str().unwrap();
    let bundle_pem = v["bundle_pem"].as_str().unwrap();
    let verify = openssl_verify(&lab, chain_pem, bundle_pem);
    assert!(verify.contains(": OK"), "{verify}");

    // The CA's, the JWT signing key's and the TLS key's private objects are in the token,
    // and the token refuses to hand out their values.
    let (ok, objects) = pkcs11_tool(&hsm, &token, &["--list-objects", "--type", "privkey"]);
    assert!(ok, "{objects}");
    for label in [
        "carapace-x509-ca-0",
        "carapace-jwt-key-1",
        "carapace-server-tls",
    ] {
        assert!(
            objects.contains(label),
            "{label} missing from the token:\n{objects}"
        );
    }
    let private_blocks: Vec<&str> = objects.split("Private Key Object").skip(1).collect();
    assert!(!private_blocks.is_empty(), "{objects}");
    for block in &private_blocks {
        let field = |name: &str| -> Vec<String> {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in:\n{block}"))
                .split(',')
                .map(|w| w.trim().to_owned())
                .collect()
        };
        let access = field("Access:");
        for want in [
            "sensitive",
            "always sensitive",
            "never extractable",
            "local",
        ] {
            assert!(access.iter().any(|a| a == want), "{want} missing:\n{block}");
        }
        assert!(
            !access.iter().any(|a| a == "extractable"),
            "a private key is extractable:\n{block}"
        );
        // Signing keys sign and do nothing else.
        assert_eq!(field("Usage:"), ["sign"], "{block}");
    }
    // (pkcs11-tool cannot even try to read a private value — "reading private keys not
    // (yet) supported" — so the read attempt itself is made through PKCS#11 in
    // keymanager-pkcs11's non-export test, which asserts the token refuses it.)

    // A JWT-SVID signed by the JWT key in the token verifies with PyJWT against the
    // published bundle.
    let jwt = server.cli_json(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/hsm",
        "--audience",
        "vault",
    ])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bundle_json = lab.path().join("bundle.json");
    let bundle_doc = server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    std::fs::write(&bundle_json, &bundle_doc).unwrap();
    let out = Command::new(carapace_e2e::python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/jwt_client.py"))
        .args(["-", "pyjwt"])
        .arg(&bundle_json)
        .args(["vault", &jwt])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["claims"]["sub"], "spiffe://example.org/hsm");

    // A restart finds the CA again in the token: the bundle is unchanged.
    let bundle_before = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    server.restart();
    let bundle_after = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    assert_eq!(
        bundle_before.x509_authorities,
        bundle_after.x509_authorities
    );
    // And the JWT key: the same published key set.
    assert_eq!(
        server.cli_ok(&["bundle", "show", "--format", "spiffe"]),
        bundle_doc,
        "the JWT and X.509 keys survive a restart"
    );
    let v = py_fetch(&agent.socket);
    let verify = openssl_verify(
        &lab,
        v["svids"][0]["chain_pem"].as_str().unwrap(),
        &server.bundle_pem(),
    );
    assert!(verify.contains(": OK"), "{verify}");
    assert!(
        !server.log().contains(&token.user_pin),
        "the PIN reached the log"
    );
}

#[test]
fn a_wrong_pin_stops_the_server_with_the_documented_error() {
    let lab = Lab::new();
    let (hsm, token) = token("wrongpin");
    let bad_pin = lab.path().join("bad.pin");
    std::fs::write(&bad_pin, "000000").unwrap();
    std::fs::set_permissions(
        &bad_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let config = write_config(
        &lab,
        "server",
        &format!(
            "[key_manager.pkcs11]\n{}",
            token_settings(&hsm, &token, &bad_pin)
        ),
    );
    let mut server = Server::spawn_opts(&lab, options("server", &config, &hsm));
    let (status, log) = server.wait_exit();
    assert!(!status.success());
    assert!(log.contains("CKR_PIN_INCORRECT"), "{log}");
    assert!(
        log.contains("pin_file"),
        "the message names the setting to fix:\n{log}"
    );
    assert!(!log.contains("000000"), "the PIN reached the log:\n{log}");
    // Nothing was served: no admin socket.
    assert!(!server.admin_socket.exists(), "the server half-started");
}

#[test]
fn a_missing_token_is_named_with_the_tokens_present() {
    let lab = Lab::new();
    let (hsm, token) = token("present");
    let config = write_config(
        &lab,
        "server",
        &format!(
            "[key_manager.pkcs11]\nmodule = {:?}\ntoken_label = \"absent\"\npin_file = {:?}\n",
            hsm.module().display().to_string(),
            token.pin_file.display().to_string()
        ),
    );
    let mut server = Server::spawn_opts(&lab, options("server", &config, &hsm));
    let (status, log) = server.wait_exit();
    assert!(!status.success());
    assert!(log.contains("absent") && log.contains("present"), "{log}");
    assert!(!server.admin_socket.exists(), "the server half-started");
}

/// `carapace-server upstream init` with a config; returns the root PEM it printed.
fn upstream_init(config: &Path, envs: &[(String, String)]) -> String {
    let out = Command::new(bin("carapace-server"))
        .args(["upstream", "init", "--config"])
        .arg(config)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "upstream init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_share_one_root_in_the_hsm() {
    let lab = Lab::new();
    let (hsm, token) = token("root");
    let upstream = format!(
        "[upstream_authority.pkcs11]\n{}key_label = \"td-root\"\n",
        token_settings(&hsm, &token, &token.pin_file)
    );
    let init_config = write_config(&lab, "init", &upstream);
    let root_pem = upstream_init(&init_config, &hsm.envs());
    // A second init refuses to replace the root.
    let again = Command::new(bin("carapace-server"))
        .args(["upstream", "init", "--config"])
        .arg(&init_config)
        .envs(hsm.envs())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to replace"));

    let mut servers = Vec::new();
    let mut agents = Vec::new();
    for name in ["server-a", "server-b"] {
        // Each server keeps its intermediate's key in its own key manager (disk).
        let config = write_config(&lab, name, &upstream);
        let server = Server::start_opts(&lab, options(name, &config, &hsm));
        let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
        assert_eq!(
            bundle.x509_authorities,
            TrustBundle::from_pem(td(), &root_pem)
                .unwrap()
                .x509_authorities,
            "{name}'s bundle is the shared root"
        );
        let agent = Agent::start(&lab, &server, &format!("agent-of-{name}"));
        server.create_entry(
            &agent.id,
            &format!("spiffe://example.org/{name}/web"),
            &[&uid_selector()],
            &[],
        );
        servers.push(server);
        agents.push(agent);
    }
    let mut intermediates = Vec::new();
    for agent in &agents {
        agent.wait_for_an_svid().await;
        let v = py_fetch(&agent.socket);
        let chain_pem = v["svids"][0]["chain_pem"].as_str().unwrap().to_owned();
        let chain = carapace_core::bundle::certs_from_pem(&chain_pem).unwrap();
        assert_eq!(chain.len(), 2, "leaf and the server's intermediate");
        intermediates.push(chain[1].clone());
        // Both verify against the one root, with openssl and with our verifier.
        let verify = openssl_verify(&lab, &chain_pem, &root_pem);
        assert!(verify.contains(": OK"), "{verify}");
        let bundle = TrustBundle::from_pem(td(), &root_pem).unwrap();
        carapace_core::x509svid::verify_chain(&chain, &bundle, now()).unwrap();
    }
    assert_ne!(
        intermediates[0], intermediates[1],
        "one intermediate per server"
    );
    // `upstream show` prints the root from the token.
    let show = Command::new(bin("carapace-server"))
        .args(["upstream", "show", "--config"])
        .arg(&init_config)
        .envs(hsm.envs())
        .output()
        .unwrap();
    assert!(show.status.success());
    assert_eq!(String::from_utf8(show.stdout).unwrap(), root_pem);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_root_certifies_the_server_ca() {
    let lab = Lab::new();
    let root_dir = lab.path().join("root");
    let upstream = format!(
        "[upstream_authority.disk]\ncert_file = {:?}\nkey_file = {:?}\n",
        root_dir.join("root.pem").display().to_string(),
        root_dir.join("root.key").display().to_string()
    );
    let config = write_config(&lab, "server", &upstream);
    let root_pem = upstream_init(&config, &[]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root_dir.join("root.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the root key file is private");
    let server = Server::start_opts(
        &lab,
        ServerOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            ..ServerOptions::default()
        },
    );
    assert_eq!(
        TrustBundle::from_pem(td(), &server.bundle_pem())
            .unwrap()
            .x509_authorities,
        TrustBundle::from_pem(td(), &root_pem)
            .unwrap()
            .x509_authorities
    );
    let agent = Agent::start(&lab, &server, "agent");
    server.create_entry(
        &agent.id,
        "spiffe://example.org/disk",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_an_svid().await;
    let v = py_fetch(&agent.socket);
    let verify = openssl_verify(
        &lab,
        v["svids"][0]["chain_pem"].as_str().unwrap(),
        &root_pem,
    );
    assert!(verify.contains(": OK"), "{verify}");

    // A key file others can read is refused with the fix.
    std::fs::set_permissions(
        root_dir.join("root.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let mut bad = Server::spawn_opts(
        &lab,
        ServerOptions {
            name: Some("server-bad".into()),
            extra: vec!["--config".into(), config.display().to_string()],
            ..ServerOptions::default()
        },
    );
    let (status, log) = bad.wait_exit();
    assert!(!status.success());
    assert!(log.contains("chmod 600"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_rides_out_a_token_outage_without_a_restart() {
    let lab = Lab::new();
    let (hsm, token) = token("outage");
    let config = write_config(
        &lab,
        "server",
        &format!(
            "[key_manager.pkcs11]\n{}",
            token_settings(&hsm, &token, &token.pin_file)
        ),
    );
    let server = Server::start_opts(&lab, options("server", &config, &hsm));
    let agent = Agent::start(&lab, &server, "agent");
    server.create_entry(
        &agent.id,
        "spiffe://example.org/before",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_an_svid().await;

    // The token disappears (SoftHSM2: its token directory is moved away).
    let tokens = hsm.token_dir();
    let away = tokens.with_extension("away");
    std::fs::rename(&tokens, &away).unwrap();
    server.create_entry(
        &agent.id,
        "spiffe://example.org/during",
        &[&uid_selector()],
        &[],
    );
    eventually("the agent to be told the CA key is unavailable", || async {
        agent.proc.log().contains("could not sign").then_some(())
    })
    .await;
    assert!(
        server.log().contains("PKCS#11 token failed; reconnecting"),
        "the server says what failed:\n{}",
        server.log()
    );
    let agent_log = strip_ansi(&agent.proc.log());
    let refusal = agent_log
        .lines()
        .find(|l| l.contains("could not sign"))
        .unwrap();
    assert!(
        refusal.contains("code=14"),
        "Unavailable (14), so the agent retries: {refusal}"
    );
    // Nothing half-issued: the workload still holds exactly the first SVID, the server
    // is up, and the agent's request failed as Unavailable rather than crashing anything.
    let held = String::from_utf8(agent.fetch(&[]).stdout).unwrap();
    assert!(held.contains("spiffe://example.org/before"), "{held}");
    assert!(!held.contains("spiffe://example.org/during"), "{held}");
    // Up, but not ready: `healthcheck` names the key manager (tests/tests/health.rs
    // checks /ready the same way).
    let hc = server.cli(&["healthcheck"]);
    assert!(!hc.status.success());
    assert!(
        String::from_utf8_lossy(&hc.stderr).contains("key manager"),
        "{}",
        String::from_utf8_lossy(&hc.stderr)
    );

    // The token comes back: the server reconnects by itself and the pending SVID arrives.
    std::fs::rename(&away, &tokens).unwrap();
    agent.wait_for_svid("spiffe://example.org/during").await;
    assert!(server.log().contains("token back"), "{}", server.log());
    assert!(server.cli(&["healthcheck"]).status.success());
}

/// The log without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
