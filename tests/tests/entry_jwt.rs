//! End to end: the JWT-SVID settings of a registration entry (`--jwt-svid-ttl`,
//! `--jwt-svid-include-jti`) through the real `carapace-server` CLI and server: stored,
//! shown, kept across a restart, replaced by an update, and refused out of range with
//! nothing written.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::process::Command;

use carapace_e2e::{Lab, Server, bin};

const AGENT: &str = "spiffe://example.org/spire/agent/join_token/0011223344556677";

fn entry_args<'a>(verb: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "entry",
        verb,
        "--parent-id",
        AGENT,
        "--spiffe-id",
        "spiffe://example.org/api",
        "--selector",
        "unix:uid:1000",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn entry_jwt_settings_are_stored_shown_and_kept() {
    let lab = Lab::new();
    let mut server = Server::start(&lab);

    let created = server.cli_json(&entry_args(
        "create",
        &["--jwt-svid-ttl", "10m", "--jwt-svid-include-jti"],
    ));
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["jwt_svid_ttl"], 600, "{created}");
    assert_eq!(created["jwt_svid_include_jti"], true, "{created}");

    // Read back by `entry show --output json`, and after a restart (from the database).
    for round in ["before restart", "after restart"] {
        let shown = server.cli_json(&["entry", "show", "--id", &id]);
        let e = &shown["entries"][0];
        assert_eq!(e["id"], id.as_str(), "{round}: {shown}");
        assert_eq!(e["jwt_svid_ttl"], 600, "{round}: {shown}");
        assert_eq!(e["jwt_svid_include_jti"], true, "{round}: {shown}");
        assert_eq!(
            e["x509_svid_ttl"],
            serde_json::Value::Null,
            "{round}: {shown}"
        );
        let text = server.cli_ok(&["entry", "show", "--id", &id]);
        assert!(text.contains("JWT-SVID TTL     : 10m\n"), "{round}: {text}");
        assert!(
            text.contains("JWT-SVID jti     : true\n"),
            "{round}: {text}"
        );
        if round == "before restart" {
            server.restart();
        }
    }

    // An update replaces every field: without the flags, back to the defaults.
    let mut update = entry_args("update", &[]);
    update.extend(["--id", &id]);
    let updated = server.cli_json(&update);
    assert_eq!(
        updated["jwt_svid_ttl"],
        serde_json::Value::Null,
        "{updated}"
    );
    assert_eq!(updated["jwt_svid_include_jti"], false, "{updated}");
    assert_eq!(updated["revision"], 1, "{updated}");
    let text = server.cli_ok(&["entry", "show", "--id", &id]);
    assert!(text.contains("JWT-SVID TTL     : default\n"), "{text}");
    assert!(!text.contains("JWT-SVID jti"), "{text}");

    // Out of range: refused naming the flag (exit 1), nothing written.
    for (ttl, needle) in [
        (
            "1day1s",
            "entry create: --jwt-svid-ttl: 86401s is outside the allowed range 1s to 1 day",
        ),
        (
            "0",
            "entry create: --jwt-svid-ttl: must be at least one second",
        ),
        (
            "9223372036854775807s",
            "entry create: --jwt-svid-ttl: 9223372036854775807s is outside the allowed range",
        ),
    ] {
        let args = entry_args(
            "create",
            &["--selector", "unix:uid:7", "--jwt-svid-ttl", ttl],
        );
        let out = server.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{ttl}: {err}");
        assert!(err.contains(needle), "{ttl}: {err}");
    }
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 1);
    let shown = server.cli_json(&["entry", "show", "--id", &id]);
    assert_eq!(shown["entries"][0]["revision"], 1, "{shown}");

    // The longest TTL is accepted.
    let edge = server.cli_json(&entry_args(
        "create",
        &["--selector", "unix:uid:8", "--jwt-svid-ttl", "1day"],
    ));
    assert_eq!(edge["jwt_svid_ttl"], 86_400, "{edge}");
    assert_eq!(edge["jwt_svid_include_jti"], false, "{edge}");
}

/// `jwt mint` needs an audience: clap refuses the command line (exit 2) before anything
/// connects to a server.
#[test]
fn jwt_mint_without_an_audience_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("carapace-server"))
        .args(["jwt", "mint", "--spiffe-id", "spiffe://example.org/m"])
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--audience <AUDIENCE>"), "{err}");
    assert!(out.stdout.is_empty());
}
