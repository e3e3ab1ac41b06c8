//! End to end with a cloud identity document: the agent fetches an AWS instance identity
//! document and its PKCS#7 signature from an IMDSv2 service (a loopback stand-in that
//! speaks the real paths and headers; the signature is made by `openssl cms` with a
//! test "region" key), the server verifies it with the region certificate it was given,
//! and a workload gets its SVID through a node alias on the account. The instance
//! attests once: a second agent presenting the same document is refused, and still after
//! the server restarts (the record is in the datastore), until the operator evicts the
//! agent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use carapace_e2e::{Agent, Lab, Server, ServerOptions, eventually, uid_selector};

const ACCOUNT: &str = "123456789012";
const INSTANCE: &str = "i-0123456789abcdef0";

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl: {e}; install it with: apt-get install -y openssl"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A region certificate and a signed identity document, as IMDS serves them.
struct Signed {
    region_cert: PathBuf,
    document: String,
    rsa2048: String,
}

fn sign_document(dir: &Path) -> Signed {
    let key = dir.join("region.key");
    let cert = dir.join("region.pem");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
        "-subj",
        "/CN=Test AWS us-east-1",
        "-days",
        "2",
    ]);
    let document = format!(
        "{{\n  \"accountId\" : \"{ACCOUNT}\",\n  \"architecture\" : \"x86_64\",\n  \
         \"availabilityZone\" : \"us-east-1a\",\n  \"imageId\" : \"ami-0abcdef1234567890\",\n  \
         \"instanceId\" : \"{INSTANCE}\",\n  \"instanceType\" : \"t3.micro\",\n  \
         \"pendingTime\" : \"2026-11-20T10:00:00Z\",\n  \"privateIp\" : \"10.0.0.12\",\n  \
         \"region\" : \"us-east-1\",\n  \"version\" : \"2017-09-30\"\n}}"
    );
    let doc_file = dir.join("document.json");
    std::fs::write(&doc_file, &document).unwrap();
    let sig = dir.join("document.p7");
    openssl(&[
        "cms",
        "-sign",
        "-binary",
        "-nodetach",
        "-md",
        "sha256",
        "-nocerts",
        "-outform",
        "DER",
        "-in",
        doc_file.to_str().unwrap(),
        "-signer",
        cert.to_str().unwrap(),
        "-inkey",
        key.to_str().unwrap(),
        "-out",
        sig.to_str().unwrap(),
    ]);
    let rsa2048 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&sig).unwrap());
    Signed {
        region_cert: cert,
        document,
        rsa2048,
    }
}

/// A loopback IMDSv2: `PUT /latest/api/token` with a TTL header gives a token, and the
/// identity paths answer only with that token, as AWS's does.
async fn imds(signed: &Signed) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let routes = Arc::new((signed.document.clone(), signed.rsa2048.clone()));
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let routes = routes.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    let n = stream.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf).to_lowercase();
                let line = head.lines().next().unwrap_or_default().to_owned();
                let token = head.contains("\r\nx-aws-ec2-metadata-token: imds-token\r\n");
                let (status, body) = if line.starts_with("put /latest/api/token ") {
                    if head.contains("\r\nx-aws-ec2-metadata-token-ttl-seconds: ") {
                        (200, "imds-token".to_owned())
                    } else {
                        (400, String::new())
                    }
                } else if !token {
                    (401, String::new())
                } else if line.starts_with("get /latest/dynamic/instance-identity/document ") {
                    (200, routes.0.clone())
                } else if line.starts_with("get /latest/dynamic/instance-identity/rsa2048 ") {
                    (200, routes.1.clone())
                } else {
                    (404, String::new())
                };
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
            });
        }
    });
    url
}

fn start_server(lab: &Lab, signed: &Signed) -> Server {
    let config = lab.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n[node_attestor.aws_iid]\n\
             account_allowlist = [\"{ACCOUNT}\"]\n\
             [node_attestor.aws_iid.region_certificates]\n\"us-east-1\" = {:?}\n",
            signed.region_cert.display().to_string()
        ),
    )
    .unwrap();
    Server::start_opts(
        lab,
        ServerOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            ..ServerOptions::default()
        },
    )
}

fn spawn_agent(lab: &Lab, server: &Server, name: &str, imds: &str) -> Agent {
    let config = lab.path().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n[node_attestor.aws_iid]\nmetadata_url = {imds:?}\n"
        ),
    )
    .unwrap();
    let bundle = lab.path().join(format!("{name}-bundle.pem"));
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    let mut agent = Agent::spawn(
        lab,
        server,
        name,
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--trust-bundle".as_ref(),
            bundle.as_os_str(),
        ],
    );
    agent.id = format!("spiffe://example.org/spire/agent/aws_iid/{ACCOUNT}/us-east-1/{INSTANCE}");
    agent
}

#[tokio::test(flavor = "multi_thread")]
async fn an_aws_instance_attests_once_and_a_workload_gets_its_svid_through_an_account_alias() {
    let lab = Lab::new();
    let signed = sign_document(lab.path());
    let imds = imds(&signed).await;
    let mut server = start_server(&lab, &signed);
    let mut agent = spawn_agent(&lab, &server, "agent", &imds);
    agent.wait_healthy();

    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", &agent.id]);
    for selector in [
        format!("aws_iid:account:{ACCOUNT}"),
        "aws_iid:region:us-east-1".to_owned(),
        "aws_iid:az:us-east-1a".to_owned(),
        format!("aws_iid:instance_id:{INSTANCE}"),
        "aws_iid:image_id:ami-0abcdef1234567890".to_owned(),
    ] {
        assert!(shown.contains(&selector), "{selector} in {shown}");
    }
    server.create_entry(
        "spiffe://example.org/spire/server",
        "spiffe://example.org/node/aws-account",
        &[&format!("aws_iid:account:{ACCOUNT}")],
        &[],
    );
    server.create_entry(
        "spiffe://example.org/node/aws-account",
        "spiffe://example.org/aws-workload",
        &[&uid_selector()],
        &[],
    );
    agent
        .wait_for_svid("spiffe://example.org/aws-workload")
        .await;

    // The same document again (a copy of it, or a second agent on the instance): refused.
    let second = spawn_agent(&lab, &server, "second", &imds);
    eventually("the second attestation to be refused", || async {
        second
            .proc
            .log()
            .contains("trust on first use")
            .then_some(())
    })
    .await;
    drop(second);

    // The record is in the datastore: a restarted server refuses it too, and the first
    // agent, which renews with its SVID, keeps its identity.
    server.restart();
    let third = spawn_agent(&lab, &server, "third", &imds);
    eventually("the attestation after restart to be refused", || async {
        third
            .proc
            .log()
            .contains("trust on first use")
            .then_some(())
    })
    .await;
    agent
        .wait_for_svid("spiffe://example.org/aws-workload")
        .await;
}
