//! JWT-SVIDs from the real agent, taken and checked by clients the project did not write:
//! py-spiffe (`WorkloadApiClient`, `JwtSource`), the Rust `spiffe` crate (its client and
//! `JwtSource`), PyJWT with the agent's JWKS and with `bundle show --format spiffe`, and a
//! generic OpenID Connect relying party (PyJWT's `PyJWKClient`) that finds the keys through
//! the server's OIDC discovery endpoint over HTTPS.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_e2e::{Agent, Lab, Server, free_port, now, python, uid_selector};
use serde_json::Value;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// tests/python/jwt_client.py against `socket` (`-` for none): its JSON, or its refusal.
fn jwt_client(socket: &str, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(python())
        .arg(script("jwt_client.py"))
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn claims_of(token: &str) -> Value {
    let parts = carapace_core::jose::split(token, 1 << 16).unwrap();
    serde_json::from_slice(&parts.payload).unwrap()
}

fn header_of(token: &str) -> Value {
    let parts = carapace_core::jose::split(token, 1 << 16).unwrap();
    serde_json::from_slice(&parts.header).unwrap()
}

const WEB: &str = "spiffe://example.org/web";

async fn server_and_agent(lab: &Lab, server_extra: &[&str]) -> (Server, Agent) {
    let server = Server::start_with(lab, server_extra);
    let agent = Agent::start(lab, &server, "agent");
    server.create_entry(
        &agent.id,
        WEB,
        &[&uid_selector()],
        &["--jwt-svid-ttl", "120", "--jwt-svid-include-jti"],
    );
    agent.wait_for_svid(WEB).await;
    (server, agent)
}

#[tokio::test(flavor = "multi_thread")]
async fn py_spiffe_the_rust_crate_and_pyjwt_accept_the_agents_jwt_svids() {
    let lab = Lab::new();
    let (server, agent) = server_and_agent(&lab, &[]).await;
    let socket = agent.socket.to_str().unwrap();

    // py-spiffe: one token for the caller's identity, with the entry's lifetime and jti.
    let fetched = jwt_client(socket, &["fetch", "api", "billing"]).unwrap();
    let svid = &fetched["default"];
    assert_eq!(svid["spiffe_id"], WEB);
    assert_eq!(svid["audience"], serde_json::json!(["api", "billing"]));
    let token = svid["token"].as_str().unwrap().to_owned();
    let claims = claims_of(&token);
    assert_eq!(claims["sub"], WEB);
    assert!(claims["aud"].is_array(), "{claims}");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        120,
        "the entry's --jwt-svid-ttl"
    );
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32, "{claims}");
    let issued = claims["iat"].as_u64().unwrap();
    assert!(issued.abs_diff(now()) < 30, "iat {issued}");
    let header = header_of(&token);
    assert_eq!(
        (&header["alg"], &header["typ"]),
        (&"ES256".into(), &"JWT".into())
    );

    // Cached: the same audiences in another order get the same token.
    let again = jwt_client(socket, &["fetch", "billing", "api"]).unwrap();
    assert_eq!(again["default"]["token"], token.as_str());
    // Another audience set is another token.
    let other = jwt_client(socket, &["fetch", "api"]).unwrap();
    assert_ne!(other["default"]["token"], token.as_str());

    // py-spiffe validates through the agent, and with a JwtSource and its bundle.
    let v = jwt_client(socket, &["validate", "billing", &token]).unwrap();
    assert_eq!(v["spiffe_id"], WEB);
    let refused = jwt_client(socket, &["validate", "payroll", &token]).unwrap_err();
    assert!(refused.contains("audience"), "{refused}");
    let s = jwt_client(socket, &["source", "api"]).unwrap();
    assert_eq!(s["spiffe_id"], WEB);
    assert_eq!(s["bundle_kids"], serde_json::json!([header["kid"]]));

    // PyJWT with the agent's JWKS (FetchJWTBundles) and with `bundle show`.
    let jwks = lab.path().join("agent-jwks.json");
    std::fs::write(&jwks, jwt_client(socket, &["jwks"]).unwrap().to_string()).unwrap();
    let bundle = lab.path().join("bundle.json");
    std::fs::write(
        &bundle,
        server.cli_ok(&["bundle", "show", "--format", "spiffe"]),
    )
    .unwrap();
    for file in [&jwks, &bundle] {
        let file = file.to_str().unwrap();
        let c = jwt_client("-", &["pyjwt", file, "api", &token]).unwrap();
        assert_eq!(c["claims"]["sub"], WEB);
        let refused = jwt_client("-", &["pyjwt", file, "payroll", &token]).unwrap_err();
        assert!(refused.contains("Audience"), "{refused}");
    }

    // The Rust spiffe crate: its client and its JwtSource.
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let svid = client
        .fetch_jwt_svid(["api", "billing"], None)
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id().to_string(), WEB);
    assert_eq!(svid.token(), token, "the agent's cache serves every client");
    let checked = client.validate_jwt_token("billing", &token).await.unwrap();
    assert_eq!(checked.spiffe_id().to_string(), WEB);
    assert!(client.validate_jwt_token("payroll", &token).await.is_err());
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let b = bundles.get(&td).unwrap();
    assert!(
        b.find_jwt_authority(header["kid"].as_str().unwrap())
            .is_some(),
        "the kid of the token is in the crate's bundle"
    );
    let source = spiffe::JwtSource::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let from_source = source.fetch_jwt_svid(["api"]).await.unwrap();
    assert_eq!(from_source.spiffe_id().to_string(), WEB);
    assert!(source.try_bundle_for_trust_domain(&td).is_some());
    source.shutdown().await;
}

/// A test CA and a `localhost` certificate for the OIDC endpoint, written to `dir`:
/// (cert_file, key_file 0600, ca_file).
fn oidc_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "jwt_clients OIDC test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let (cert, key, ca_file) = (
        dir.join("oidc.crt"),
        dir.join("oidc.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    (cert, key, ca_file)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generic_oidc_client_verifies_a_workloads_jwt_svid_through_discovery_over_https() {
    let lab = Lab::new();
    let (cert, key, ca) = oidc_pki(lab.path());
    let port = free_port();
    let issuer = format!("https://localhost:{port}");
    let config = lab.path().join("oidc-server.toml");
    std::fs::write(
        &config,
        format!(
            "jwt_issuer = {issuer:?}\n[oidc_discovery]\nbind_address = \"127.0.0.1:{port}\"\n\
             cert_file = {cert:?}\nkey_file = {key:?}\n"
        ),
    )
    .unwrap();
    let (_server, agent) = server_and_agent(&lab, &["--config", config.to_str().unwrap()]).await;
    let socket = agent.socket.to_str().unwrap();
    let token = jwt_client(socket, &["fetch", "vault"]).unwrap()["default"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(claims_of(&token)["iss"], issuer.as_str());

    let verify = |audience: &str| {
        let out = Command::new(python())
            .arg(script("oidc_verify.py"))
            .args([
                "--discovery-url",
                &format!("{issuer}/.well-known/openid-configuration"),
            ])
            .arg("--ca-file")
            .arg(&ca)
            .args([
                "--token",
                &token,
                "--audience",
                audience,
                "--require-issuer",
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = verify("vault");
    assert_eq!(code, Some(0), "{stderr}");
    let claims: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(claims["sub"], WEB);
    assert_eq!(claims["iss"], issuer.as_str());
    let (code, _, stderr) = verify("payroll");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("udience"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tainted_jwt_key_makes_the_agent_drop_its_cached_tokens_and_a_revoked_one_stops_validating()
 {
    let lab = Lab::new();
    let (server, agent) = server_and_agent(&lab, &[]).await;
    let socket = agent.socket.to_str().unwrap();
    let fetch = || {
        jwt_client(socket, &["fetch", "api"]).unwrap()["default"]["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let old = fetch();
    assert_eq!(fetch(), old, "cached");
    let old_kid = header_of(&old)["kid"].as_str().unwrap().to_owned();

    // A new key, active: the cached token (old key, not tainted) is still served.
    let new_kid = server.cli_json(&["localauthority", "jwt", "prepare"])["authority_id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.cli_ok(&["localauthority", "jwt", "activate"]);
    assert_eq!(fetch(), old, "activation alone keeps the cache");

    // Tainted: once the agent has the bundle, it hands out a token of the new key.
    server.cli_ok(&["localauthority", "jwt", "taint", "--authority-id", &old_kid]);
    let fresh = carapace_e2e::eventually("a token of the new key", || async {
        let t = fetch();
        (header_of(&t)["kid"] == new_kid.as_str()).then_some(t)
    })
    .await;
    assert_ne!(fresh, old);
    // Still trusted until revoked: the agent validates the old token...
    jwt_client(socket, &["validate", "api", &old]).unwrap();
    // ...and no longer once the key is revoked and the agent has the new bundle.
    server.cli_ok(&[
        "localauthority",
        "jwt",
        "revoke",
        "--authority-id",
        &old_kid,
    ]);
    carapace_e2e::eventually("the agent to refuse the revoked key's token", || async {
        jwt_client(socket, &["validate", "api", &old])
            .is_err()
            .then_some(())
    })
    .await;
    jwt_client(socket, &["validate", "api", &fresh]).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_oidc_endpoint_can_keep_its_tls_key_in_the_key_manager() {
    let lab = Lab::new();
    let port = free_port();
    let issuer = format!("https://localhost:{port}");
    let cert_file = lab.path().join("oidc.crt");
    let config = lab.path().join("oidc-km.toml");
    let data_dir = lab.path().join("server");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data_dir:?}\njwt_issuer = {issuer:?}\n[oidc_discovery]\n\
             bind_address = \"127.0.0.1:{port}\"\nkey_id = \"oidc-tls\"\ncert_file = {cert_file:?}\n"
        ),
    )
    .unwrap();
    let csr = |want: &str| {
        let out = Command::new(carapace_e2e::bin("carapace-server"))
            .args(["oidc", "csr", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains(want), "{stderr}");
        String::from_utf8(out.stdout).unwrap()
    };
    // The key is made once in the key manager, then reused; the CSR names the issuer's host.
    let first = csr("created key oidc-tls in the disk key manager");
    let second = csr("reused key oidc-tls");
    let params = rcgen::CertificateSigningRequestParams::from_pem(&first).unwrap();
    let again = rcgen::CertificateSigningRequestParams::from_pem(&second).unwrap();
    assert_eq!(
        rcgen::PublicKeyData::der_bytes(&params.public_key),
        rcgen::PublicKeyData::der_bytes(&again.public_key),
        "the same key"
    );
    assert_eq!(
        params.params.subject_alt_names,
        vec![rcgen::SanType::DnsName("localhost".try_into().unwrap())]
    );

    // A test CA certifies it; the endpoint serves with the key manager's key.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "jwt_clients OIDC key-manager CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = params.signed_by(&rcgen::Issuer::new(ca, ca_key)).unwrap();
    std::fs::write(&cert_file, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
    let ca_file = lab.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let (mut server, agent) = server_and_agent(&lab, &["--config", config.to_str().unwrap()]).await;
    let token = jwt_client(agent.socket.to_str().unwrap(), &["fetch", "vault"]).unwrap()["default"]
        ["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = Command::new(python())
        .arg(script("oidc_verify.py"))
        .args([
            "--discovery-url",
            &format!("{issuer}/.well-known/openid-configuration"),
        ])
        .arg("--ca-file")
        .arg(&ca_file)
        .args(["--token", &token, "--audience", "vault", "--require-issuer"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let claims: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["sub"], WEB);

    // A certificate for another key is refused at start, naming the setting.
    server.kill();
    let other = rcgen::KeyPair::generate().unwrap();
    let wrong = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&other)
        .unwrap();
    let cert_file2 = lab.path().join("wrong.crt");
    std::fs::write(&cert_file2, wrong.pem()).unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(cert_file.to_str().unwrap(), cert_file2.to_str().unwrap());
    let config2 = lab.path().join("oidc-km-wrong.toml");
    std::fs::write(&config2, text).unwrap();
    let mut bad = Server::spawn_opts(
        &lab,
        carapace_e2e::ServerOptions {
            extra: vec!["--config".into(), config2.to_str().unwrap().into()],
            ..Default::default()
        },
    );
    let (status, log) = bad.wait_exit();
    assert!(!status.success());
    assert!(log.contains("is not for the key oidc-tls"), "{log}");
}
