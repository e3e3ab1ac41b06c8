//! JWT-SVIDs as the server signs them, checked from outside: `jwt mint` through the real
//! binary, verified by PyJWT (a JOSE library the project did not write) with the keys
//! `bundle show --format spiffe` publishes; the key set across restarts; the operator's
//! `localauthority jwt` lifecycle.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_e2e::{Lab, Server, python};

fn jwt_client() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/jwt_client.py")
}

/// The token's header `kid`.
fn kid_of(token: &str) -> String {
    let parts = carapace_core::jose::split(token, 1 << 16).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&parts.header).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

/// `jwt mint`, its JSON output.
fn mint(server: &Server, id: &str, audiences: &[&str]) -> serde_json::Value {
    let mut args = vec!["jwt", "mint", "--spiffe-id", id];
    for a in audiences {
        args.extend(["--audience", a]);
    }
    server.cli_json(&args)
}

/// The kids of the JWT keys `bundle show --format spiffe` publishes, in order; the
/// document is written to `file` for PyJWT.
fn published_kids(server: &Server, file: &Path) -> Vec<String> {
    let json = server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    std::fs::write(file, &json).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// PyJWT verifies `token` for `audience` with the JWKS in `jwks`: the claims, or PyJWT's
/// refusal.
fn pyjwt(jwks: &Path, audience: &str, token: &str) -> Result<serde_json::Value, String> {
    let out = Command::new(python())
        .arg(jwt_client())
        .args(["-", "pyjwt"])
        .arg(jwks)
        .args([audience, token])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn minted_tokens_verify_with_pyjwt_and_ten_restarts_keep_one_published_key() {
    let lab = Lab::new();
    let mut server = Server::start(&lab);
    let jwks = lab.path().join("bundle.json");
    let minted = mint(&server, "spiffe://example.org/ci", &["vault", "audit"]);
    let token = minted["token"].as_str().unwrap();
    assert_eq!(minted["spiffe_id"], "spiffe://example.org/ci");
    assert_eq!(
        minted["expires_at"].as_i64().unwrap() - minted["issued_at"].as_i64().unwrap(),
        300,
        "default_jwt_svid_ttl is 5 minutes"
    );
    let kids = published_kids(&server, &jwks);
    assert_eq!(kids, vec![kid_of(token)]);
    let show = server.cli_json(&["localauthority", "jwt", "show"]);
    assert_eq!(show["active"]["authority_id"], kids[0].as_str());

    let claims = pyjwt(&jwks, "audit", token).unwrap();
    assert_eq!(claims["claims"]["sub"], "spiffe://example.org/ci");
    assert_eq!(
        claims["claims"]["aud"],
        serde_json::json!(["vault", "audit"])
    );
    let refused = pyjwt(&jwks, "billing", token).unwrap_err();
    assert!(refused.contains("Audience"), "{refused}");

    // Ten restarts: the same single key, and the first token still verifies.
    for i in 0..10 {
        server.restart();
        assert_eq!(published_kids(&server, &jwks), kids, "after restart {i}");
    }
    pyjwt(&jwks, "vault", token).unwrap();
    let again = mint(&server, "spiffe://example.org/ci", &["vault"]);
    assert_eq!(kid_of(again["token"].as_str().unwrap()), kids[0]);

    // What the CLI refuses never reaches the server.
    let out = server.cli(&["jwt", "mint", "--spiffe-id", "spiffe://example.org/ci"]);
    assert_eq!(out.status.code(), Some(2), "no --audience");
    let out = server.cli(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://other.org/ci",
        "--audience",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in trust domain"),
        "{out:?}"
    );
}

#[test]
fn localauthority_jwt_rotates_taints_and_revokes_and_pyjwt_follows_the_bundle() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let jwks = lab.path().join("bundle.json");
    let old_token = mint(&server, "spiffe://example.org/web", &["api"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_kid = kid_of(&old_token);

    // Prepared: in the bundle, signing nothing.
    let prepared = server.cli_json(&["localauthority", "jwt", "prepare"]);
    let new_kid = prepared["authority_id"].as_str().unwrap().to_owned();
    assert_eq!(
        published_kids(&server, &jwks),
        vec![old_kid.clone(), new_kid.clone()]
    );
    let t = mint(&server, "spiffe://example.org/web", &["api"]);
    assert_eq!(kid_of(t["token"].as_str().unwrap()), old_kid);

    // Activated: new tokens carry the new kid; the old token still verifies.
    server.cli_ok(&[
        "localauthority",
        "jwt",
        "activate",
        "--authority-id",
        &new_kid,
    ]);
    let new_token = mint(&server, "spiffe://example.org/web", &["api"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(kid_of(&new_token), new_kid);
    pyjwt(&jwks, "api", &old_token).unwrap();
    published_kids(&server, &jwks);
    pyjwt(&jwks, "api", &old_token).unwrap();
    pyjwt(&jwks, "api", &new_token).unwrap();

    // A third key cannot be activated while the old one still verifies tokens.
    server.cli_ok(&["localauthority", "jwt", "prepare"]);
    let out = server.cli(&["localauthority", "jwt", "activate"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still verifies tokens"),
        "{out:?}"
    );
    assert_eq!(published_kids(&server, &jwks).len(), 3);

    // The active key cannot be tainted; revoke needs a taint; a malformed kid is refused.
    for args in [
        vec!["taint", "--authority-id", new_kid.as_str()],
        vec!["revoke", "--authority-id", old_kid.as_str()],
        vec!["taint", "--authority-id", "not a kid"],
    ] {
        let mut full = vec!["localauthority", "jwt"];
        full.extend(args.iter());
        let out = server.cli(&full);
        assert!(!out.status.success(), "{full:?} succeeded");
    }
    server.cli_ok(&["localauthority", "jwt", "taint", "--authority-id", &old_kid]);
    let show = server.cli_json(&["localauthority", "jwt", "show"]);
    assert_eq!(show["old"][0]["authority_id"], old_kid.as_str());
    assert_eq!(show["old"][0]["tainted"], true);
    server.cli_ok(&[
        "localauthority",
        "jwt",
        "revoke",
        "--authority-id",
        &old_kid,
    ]);

    // Revoked: gone from the bundle; PyJWT with the new bundle refuses the old token and
    // accepts the new one.
    let kids = published_kids(&server, &jwks);
    assert!(!kids.contains(&old_kid), "{kids:?}");
    assert_eq!(kids.len(), 2);
    let refused = pyjwt(&jwks, "api", &old_token).unwrap_err();
    assert!(
        refused.contains(&old_kid) || refused.contains("kid"),
        "{refused}"
    );
    pyjwt(&jwks, "api", &new_token).unwrap();
}
