//! The `carapace-agent` binary's own command line.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_carapace-agent"))
}

#[test]
fn help_lists_every_command() {
    let out = agent().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "api", "healthcheck"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
    let out = agent().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--trust-domain",
        "--server-address",
        "--data-dir",
        "--socket-path",
        "--join-token",
        "--trust-bundle",
        "--insecure-bootstrap",
    ] {
        assert!(text.contains(flag), "run --help lacks {flag}");
    }
}

#[test]
fn run_requires_exactly_one_bootstrap_and_writes_nothing_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = agent()
        .args(["run", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--trust-bundle") && err.contains("--insecure-bootstrap"),
        "{err}"
    );
    assert!(!data.exists());
    let out = agent()
        .args(["run", "--insecure-bootstrap", "--trust-bundle", "/x.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn run_without_a_token_or_identity_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args([
            "run",
            "--insecure-bootstrap",
            "--server-address",
            "127.0.0.1:1",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(dir.path().join("api.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--join-token"), "{err}");
}

#[test]
fn fetch_without_an_agent_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}

#[test]
fn a_bad_kerberos_section_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n\
         [node_attestor.kerberos]\nservice_principal = \"carapace/server\"\n\
         principal = \"host/a\\\\/b@LAB.TEST\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = agent()
        .args(["run", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service_principal: principal \"carapace/server\" has no realm"),
        "{err}"
    );
    assert!(err.contains("principal: principal"), "{err}");
    assert!(!data.exists());
}
