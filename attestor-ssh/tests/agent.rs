//! What the agent half refuses at start, with keys and certificates made by
//! `ssh-keygen` at test time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use carapace_attestor_ssh::agent::{DEFAULT_HOST_KEY_PATH, SshAgentConfig, SshAttestorClient};
use carapace_core::Error;
use common::{Kind, Lab, chmod};

/// The agent's refusal at start, as text; it must be a configuration error.
fn refused(r: Result<SshAttestorClient, Error>) -> String {
    match r {
        Ok(c) => panic!("the agent started: {c:?}"),
        Err(e) => {
            assert!(
                matches!(e, Error::PluginConfig { ref plugin, .. } if plugin == "node_attestor.sshpop"),
                "{e:?}"
            );
            e.to_string()
        }
    }
}

#[test]
fn agent_refuses_a_certificate_of_another_key_at_start() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let a = lab.keygen("a", Kind::Ed25519);
    let b = lab.keygen("b", Kind::Ed25519);
    let cert_a = lab.host_cert(&ca, &a, "a-cert.pub");
    let err = refused(lab.agent(&b, &cert_a));
    assert!(
        err.contains(&format!("certifies key {}", lab.fingerprint(&a))),
        "{err}"
    );
    assert!(
        err.contains(&format!("not the host key {}", lab.fingerprint(&b))),
        "{err}"
    );
}

#[test]
fn agent_refuses_a_private_key_others_may_read() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    chmod(&host, 0o644);
    let err = refused(lab.agent(&host, &cert));
    assert!(
        err.contains("has mode 644") && err.contains("chmod 600"),
        "{err}"
    );
    chmod(&host, 0o640);
    let err = refused(lab.agent(&host, &cert));
    assert!(err.contains("chmod 600"), "{err}");
    chmod(&host, 0o600);
    lab.agent(&host, &cert).unwrap();
}

#[test]
fn agent_refuses_valid_forever_and_user_certificates_at_start() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let forever = lab.sign(
        &ca,
        &host,
        "forever-cert.pub",
        &["-h", "-I", "k", "-n", "host1"],
    );
    let err = refused(lab.agent(&host, &forever));
    assert!(err.contains("valid forever (no expiry)"), "{err}");
    assert!(err.contains("-V +52w"), "{err}");

    let user = lab.sign(
        &ca,
        &host,
        "user-cert.pub",
        &["-I", "k", "-n", "host1", "-V", "-5m:+1h"],
    );
    let err = refused(lab.agent(&host, &user));
    assert!(
        err.contains("user certificate, not a host certificate"),
        "{err}"
    );
}

#[test]
fn agent_refuses_an_encrypted_private_key() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.path("host");
    common::ssh_keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "passphrase",
        "-f",
        host.to_str().unwrap(),
    ]);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let err = refused(lab.agent(&host, &cert));
    assert!(err.contains("encrypted with a passphrase"), "{err}");
}

#[test]
fn agent_refuses_a_plain_public_key_as_certificate_and_a_missing_file() {
    let lab = Lab::new();
    let host = lab.keygen("host", Kind::Ed25519);
    let pubkey = lab.path("host.pub");
    let err = refused(lab.agent(&host, &pubkey));
    assert!(err.contains("not a certificate"), "{err}");
    let err = refused(lab.agent(&host, &lab.path("missing-cert.pub")));
    assert!(err.contains("missing-cert.pub"), "{err}");
}

#[test]
fn agent_debug_output_holds_no_private_key() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let agent = lab.agent(&host, &cert).unwrap();
    let debug = format!("{agent:?}");
    assert!(debug.contains(&lab.fingerprint(&host)), "{debug}");
    let pem = std::fs::read_to_string(&host).unwrap();
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        // Every 70-character base64 line of the key file, and any 16-character piece.
        for piece in line.as_bytes().chunks(16).filter(|c| c.len() == 16) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(!debug.contains(piece), "{debug}");
        }
    }
    assert!(!debug.to_lowercase().contains("private"), "{debug}");
}

#[test]
fn agent_config_defaults_and_validation() {
    let cfg: SshAgentConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, SshAgentConfig::default());
    assert_eq!(cfg.host_key_path.to_str().unwrap(), DEFAULT_HOST_KEY_PATH);
    assert_eq!(
        cfg.host_cert_path().to_str().unwrap(),
        "/etc/ssh/ssh_host_ed25519_key-cert.pub"
    );
    let cfg: SshAgentConfig =
        serde_json::from_str(r#"{"host_key_path":"/k","host_cert_path":"/c"}"#).unwrap();
    assert_eq!(cfg.host_cert_path().to_str().unwrap(), "/c");
    assert!(serde_json::from_str::<SshAgentConfig>(r#"{"host_key":"/k"}"#).is_err());

    let problems = SshAgentConfig {
        host_key_path: "/etc/ssh/ssh_host_ed25519_key.pub".into(),
        host_cert_path: Some("".into()),
    }
    .validate()
    .unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("is a public key file"), "{problems:?}");
    assert!(
        problems[1].contains("host_cert_path is empty"),
        "{problems:?}"
    );
}
