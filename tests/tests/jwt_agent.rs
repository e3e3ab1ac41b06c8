//! End to end: the agent's JWT RPCs through the real binaries, with the agent's CLI and
//! py-spiffe (tests/python/jwt_client.py): the JWT bundle matches the server's, forged
//! tokens are refused with the reason and a non-zero exit, requests are checked before
//! the server is asked anything.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use carapace_core::KeyType;
use carapace_e2e::{Agent, Lab, Server, bin, eventually, now, python, uid_selector};
use carapace_keymanager_soft::{SoftKey, generate_pkcs8};
use serde_json::{Value, json};

fn jwt_client_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/jwt_client.py")
}

fn agent_api(agent: &Agent, args: &[&str]) -> Output {
    Command::new(bin("carapace-agent"))
        .arg("api")
        .args(args)
        .arg("--socket-path")
        .arg(&agent.socket)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The kids of the `jwt-svid` keys in the server's `bundle show --format spiffe`.
fn server_kids(server: &Server) -> BTreeSet<String> {
    let doc: Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_bundles_match_the_server_and_forged_tokens_are_refused_by_cli_and_py_spiffe() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = Agent::start(&lab, &server, "agent");
    server.create_entry(
        &agent.id,
        "spiffe://example.org/web",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_svid("spiffe://example.org/web").await;

    // The JWT bundle: a JWKS keyed by trust domain ID, the server's JWT keys, each
    // `"use": "jwt-svid"` (`{"keys": []}` while the server has none).
    let want = server_kids(&server);
    let jwks = eventually("the agent's JWT bundle to match the server's", || async {
        let out = agent_api(&agent, &["fetch", "jwt-bundle", "--output", "json"]);
        assert!(out.status.success(), "{}", text(&out));
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let keys = doc["spiffe://example.org"]["keys"]
            .as_array()
            .unwrap()
            .clone();
        let kids: BTreeSet<String> = keys
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect();
        (kids == want).then_some(keys)
    })
    .await;
    for k in &jwks {
        assert_eq!(k["use"], "jwt-svid", "{k}");
        assert!(k["kty"] == "EC" || k["kty"] == "RSA", "{k}");
    }
    let py = Command::new(python())
        .arg(jwt_client_script())
        .arg(&agent.socket)
        .arg("bundles")
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "py-spiffe fetch_jwt_bundles: {}",
        text(&py)
    );
    let got: Value = serde_json::from_slice(&py.stdout).unwrap();
    let py_kids: BTreeSet<String> = got["example.org"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(py_kids, want);

    // Forged tokens for this agent's own trust domain.
    let claims = json!({"sub": "spiffe://example.org/web", "aud": ["svc"], "iat": now(), "exp": now() + 300});
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "k"})),
        b64(&claims)
    );
    // The algorithm is refused before any key is looked at (the unit tests sign HS256
    // with the very public key: `validation_refuses_alg_none_and_hs256_...`).
    let hs256 = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "HS256", "kid": "k"})),
        b64(&claims),
        URL_SAFE_NO_PAD.encode([7u8; 32])
    );
    let stranger =
        SoftKey::from_pkcs8("stranger", &generate_pkcs8(KeyType::EcP256).unwrap()).unwrap();
    let map = claims.as_object().unwrap().clone();
    let unknown_kid = carapace_core::jose::sign(Some("not-a-bundle-key"), &map, &stranger).unwrap();

    for (token, reason) in [
        (&none, "algorithm is \"none\""),
        (
            &unknown_kid,
            "\"not-a-bundle-key\", which is not among the configured keys",
        ),
    ] {
        let out = agent_api(
            &agent,
            &["validate", "jwt", "--audience", "svc", "--token", token],
        );
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the JWT-SVID is not valid") && err.contains(reason),
            "{err}"
        );
        assert!(
            !err.contains(token.as_str()),
            "the token is not echoed: {err}"
        );

        let py = Command::new(python())
            .arg(jwt_client_script())
            .arg(&agent.socket)
            .args(["validate", "svc", token])
            .output()
            .unwrap();
        assert_eq!(py.status.code(), Some(1), "{}", text(&py));
        let err = String::from_utf8_lossy(&py.stderr);
        assert!(
            err.contains("INVALID_ARGUMENT") && err.contains(reason),
            "{err}"
        );
    }

    // `--token -` reads the token from standard input (kept out of the process list).
    let mut child = Command::new(bin("carapace-agent"))
        .args([
            "api",
            "validate",
            "jwt",
            "--audience",
            "svc",
            "--token",
            "-",
        ])
        .arg("--socket-path")
        .arg(&agent.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{hs256}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("algorithm is \"HS256\""),
        "{}",
        text(&out)
    );

    // Requests the agent refuses before asking the server anything.
    let out = agent_api(&agent, &["fetch", "jwt"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--audience"),
        "{}",
        text(&out)
    );
    let out = agent_api(
        &agent,
        &[
            "fetch",
            "jwt",
            "--audience",
            "svc",
            "--spiffe-id",
            "not-an-id",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spiffe_id is not a SPIFFE ID"),
        "{}",
        text(&out)
    );
    let out = agent_api(
        &agent,
        &[
            "fetch",
            "jwt",
            "--audience",
            "svc",
            "--spiffe-id",
            "spiffe://example.org/not-mine",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no identity issued for this process"),
        "{}",
        text(&out)
    );
    let out = agent_api(
        &agent,
        &["validate", "jwt", "--audience", "", "--token", &none],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("audience is required"),
        "{}",
        text(&out)
    );
}
