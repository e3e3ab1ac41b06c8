#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
//! `aws_iid` end to end: a loopback IMDSv2 that speaks the real paths and headers, region
//! certificates and PKCS#7 signatures made at test time with the `openssl` CLI (in the
//! shape AWS uses: BER with indefinite lengths, signed attributes, no certificates),
//! verified by the production code with those certificates as trust anchors. Two real
//! AWS signatures check the parser against what AWS actually produces.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use carapace_attestor_cloud::aws::{
    AwsAgentConfig, AwsIidAttestor, AwsIidAttestorClient, AwsServerConfig, DOCUMENT_PATH,
    MAX_PAYLOAD_BYTES, PLUGIN_NAME, Payload, SIGNATURE_PATH, TOKEN_PATH,
};
use carapace_attestor_cloud::tofu;
use carapace_core::Error;
use carapace_core::clock::ManualClock;
use carapace_core::plugin::{
    AttestationResult, MemoryStateStore, NodeAttestor, NodeAttestorClient, NodeStateStore,
    PluginContext,
};
use common::{MetadataServer, context};

/// The token the loopback IMDS hands out.
const IMDS_TOKEN: &str = "AQAEAGv8Ztest-imds-token_0123456789==";

/// AWS's region certificates all carry this subject and issuer; they differ in serial
/// number and key.
const AWS_DN: &str = "/C=US/ST=Washington State/L=Seattle/O=Amazon Web Services LLC";

/// Runs the `openssl` CLI and returns its standard output.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the openssl CLI ({e}); these tests need it: apt-get install -y openssl"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A certificate and its key, as PEM files.
#[derive(Debug)]
struct Cert {
    pem: PathBuf,
    key: PathBuf,
}

impl Cert {
    fn der(&self) -> Vec<u8> {
        openssl(&["x509", "-in", s(&self.pem), "-outform", "DER"])
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A directory of test certificates, documents and signatures.
struct Pki {
    dir: tempfile::TempDir,
    n: AtomicUsize,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
            n: AtomicUsize::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn fresh(&self, what: &str) -> PathBuf {
        self.path(&format!(
            "{what}-{}",
            self.n.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// A self-signed certificate for a new key (`newkey` like `rsa:2048`).
    fn cert_with(&self, name: &str, subject: &str, serial: &str, newkey: &[&str]) -> Cert {
        let cert = Cert {
            pem: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        };
        let mut args = vec!["req", "-x509", "-nodes", "-days", "1", "-subj", subject];
        args.extend_from_slice(&["-set_serial", serial, "-keyout", s(&cert.key)]);
        args.extend_from_slice(&["-out", s(&cert.pem), "-newkey"]);
        args.extend_from_slice(newkey);
        openssl(&args);
        cert
    }

    /// A self-signed RSA-2048 certificate.
    fn cert(&self, name: &str, subject: &str, serial: &str) -> Cert {
        self.cert_with(name, subject, serial, &["rsa:2048"])
    }

    /// The PKCS#7 of `doc` by `signer`, shaped like AWS's: attached content, SHA-256,
    /// BER with indefinite lengths (`-stream`), signed attributes content-type,
    /// signing-time and message-digest, no certificates. `extra` adds or overrides.
    fn sign(&self, doc: &[u8], signer: &Cert, extra: &[&str]) -> Vec<u8> {
        self.sign_raw(
            doc,
            &[
                &["-signer", s(&signer.pem), "-inkey", s(&signer.key)][..],
                &["-nodetach", "-nocerts", "-stream"][..],
                extra,
            ]
            .concat(),
        )
    }

    /// `openssl cms -sign` of `doc` with exactly `args` besides the basics.
    fn sign_raw(&self, doc: &[u8], args: &[&str]) -> Vec<u8> {
        let doc_path = self.fresh("doc");
        std::fs::write(&doc_path, doc).unwrap();
        let base = [
            "cms",
            "-sign",
            "-binary",
            "-md",
            "sha256",
            "-nosmimecap",
            "-outform",
            "DER",
            "-in",
            s(&doc_path),
        ];
        openssl(&[&base[..], args].concat())
    }
}

/// Two regions' AWS-like certificates: same subject, different serials and keys.
struct Aws {
    pki: Pki,
    us_east_1: Cert,
    eu_west_1: Cert,
}

impl Aws {
    fn new() -> Aws {
        let pki = Pki::new();
        let us_east_1 = pki.cert("us-east-1", AWS_DN, "0x00b64bde5ad00924cc");
        let eu_west_1 = pki.cert("eu-west-1", AWS_DN, "0x00d26cf2b8e7a11403");
        Aws {
            pki,
            us_east_1,
            eu_west_1,
        }
    }

    /// A server configuration with both regions, by paths relative to the PKI directory
    /// (which `server` passes as the base directory).
    fn config(&self) -> AwsServerConfig {
        serde_json::from_value(serde_json::json!({
            "region_certificates": {
                "us-east-1": "us-east-1.pem",
                "eu-west-1": "eu-west-1.pem",
            }
        }))
        .unwrap()
    }

    fn server_with(&self, cfg: &AwsServerConfig, store: Arc<MemoryStateStore>) -> AwsIidAttestor {
        AwsIidAttestor::new(cfg, &PluginContext::for_tests(self.pki.dir.path()), store).unwrap()
    }

    fn server(&self) -> AwsIidAttestor {
        self.server_with(&self.config(), Arc::default())
    }
}

/// An instance identity document formatted as IMDS formats them.
fn document(account: &str, region: &str, instance: &str) -> String {
    format!(
        "{{\n  \"accountId\" : \"{account}\",\n  \"architecture\" : \"x86_64\",\n  \
         \"availabilityZone\" : \"{region}a\",\n  \"billingProducts\" : null,\n  \
         \"devpayProductCodes\" : null,\n  \"marketplaceProductCodes\" : null,\n  \
         \"imageId\" : \"ami-0abcdef1234567890\",\n  \"instanceId\" : \"{instance}\",\n  \
         \"instanceType\" : \"t3.micro\",\n  \"kernelId\" : null,\n  \
         \"pendingTime\" : \"2026-01-02T03:04:05Z\",\n  \"privateIp\" : \"10.0.0.7\",\n  \
         \"ramdiskId\" : null,\n  \"region\" : \"{region}\",\n  \"version\" : \"2017-09-30\"\n}}"
    )
}

/// DER as IMDS serves it: base64 in lines of 76 characters.
fn imds_base64(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    b64.as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn payload_of(document: &str, signature: &str) -> Vec<u8> {
    serde_json::to_vec(&Payload {
        version: 1,
        document: document.to_owned(),
        signature: signature.to_owned(),
    })
    .unwrap()
}

fn payload(document: &str, pkcs7: &[u8]) -> Vec<u8> {
    payload_of(document, &imds_base64(pkcs7))
}

async fn attest(server: &AwsIidAttestor, payload: &[u8]) -> Result<AttestationResult, Error> {
    common::attest_once(server, payload).await
}

/// The attestation must be rejected (not a replay, not unavailable) with a message
/// containing each of `words`.
async fn assert_rejected(server: &AwsIidAttestor, payload: &[u8], words: &[&str]) -> String {
    let err = attest(server, payload).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::AttestationRejected(_)), "{msg}");
    assert!(msg.contains("aws_iid: "), "{msg}");
    for w in words {
        assert!(msg.contains(w), "{msg:?} does not contain {w:?}");
    }
    msg
}

fn selectors(result: &AttestationResult) -> BTreeSet<String> {
    result
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.kind(), s.value()))
        .collect()
}

/// A loopback IMDS that behaves like IMDSv2: a token for `PUT /latest/api/token` with a
/// valid TTL header, and the document and signature only for requests carrying it.
async fn imdsv2(document: String, signature: String) -> MetadataServer {
    MetadataServer::start(Arc::new(move |seen| {
        let authorized = seen.header("x-aws-ec2-metadata-token") == Some(IMDS_TOKEN);
        match (seen.method.as_str(), seen.path_and_query.as_str()) {
            ("PUT", TOKEN_PATH) => {
                let ttl = seen
                    .header("x-aws-ec2-metadata-token-ttl-seconds")
                    .and_then(|t| t.parse::<u32>().ok());
                match ttl {
                    Some(1..=21600) => (200, IMDS_TOKEN.as_bytes().to_vec()),
                    _ => (400, b"missing or invalid TTL".to_vec()),
                }
            }
            ("GET", DOCUMENT_PATH) if authorized => (200, document.clone().into_bytes()),
            ("GET", SIGNATURE_PATH) if authorized => (200, signature.clone().into_bytes()),
            ("GET", DOCUMENT_PATH | SIGNATURE_PATH) => (401, Vec::new()),
            _ => (404, b"not found".to_vec()),
        }
    }))
    .await
}

fn client_for(url: &str) -> AwsIidAttestorClient {
    AwsIidAttestorClient::new(&AwsAgentConfig {
        metadata_url: url.to_owned(),
        ..AwsAgentConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn agent_and_server_attest_end_to_end_through_imdsv2() {
    let aws = Aws::new();
    let doc = document("123456789012", "us-east-1", "i-0123456789abcdef0");
    let sig = imds_base64(&aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]));
    let imds = imdsv2(doc.clone(), sig.clone()).await;
    let client = client_for(&imds.url);
    assert_eq!((PLUGIN_NAME, client.name()), ("aws_iid", "aws_iid"));

    let p = client.payload(&context()).await.unwrap();
    let sent: Payload = serde_json::from_slice(&p).unwrap();
    assert_eq!((sent.version, sent.document, sent.signature), (1, doc, sig));

    let seen = imds.requests();
    let asked: Vec<_> = seen
        .iter()
        .map(|r| (r.method.as_str(), r.path_and_query.as_str()))
        .collect();
    assert_eq!(
        asked,
        [
            ("PUT", TOKEN_PATH),
            ("GET", DOCUMENT_PATH),
            ("GET", SIGNATURE_PATH)
        ]
    );
    assert_eq!(
        seen[0].header("x-aws-ec2-metadata-token-ttl-seconds"),
        Some("60")
    );
    assert_eq!(seen[0].header("x-aws-ec2-metadata-token"), None);
    for get in &seen[1..] {
        assert_eq!(get.header("x-aws-ec2-metadata-token"), Some(IMDS_TOKEN));
    }

    let server = aws.server();
    assert_eq!(server.name(), "aws_iid");
    let result = attest(&server, &p).await.unwrap();
    assert_eq!(
        result.agent_path,
        "123456789012/us-east-1/i-0123456789abcdef0"
    );
    let want: BTreeSet<String> = [
        "aws_iid:account:123456789012",
        "aws_iid:region:us-east-1",
        "aws_iid:az:us-east-1a",
        "aws_iid:instance_id:i-0123456789abcdef0",
        "aws_iid:image_id:ami-0abcdef1234567890",
        "aws_iid:instance_type:t3.micro",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(selectors(&result), want);
    assert!(!result.can_reattest);

    // The agent has no answer to give: aws_iid has no challenge.
    let err = client.answer(b"{}", &context()).await.unwrap_err();
    assert!(matches!(err, Error::AttestationRejected(_)), "{err}");
}

#[tokio::test]
async fn the_agent_asks_for_the_configured_token_ttl_and_refuses_a_non_token() {
    let aws = Aws::new();
    let doc = document("123456789012", "us-east-1", "i-1");
    let sig = imds_base64(&aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]));
    let imds = imdsv2(doc, sig).await;
    let client = AwsIidAttestorClient::new(&AwsAgentConfig {
        metadata_url: imds.url.clone(),
        token_ttl_seconds: 21600,
        timeout: Duration::from_secs(2),
    })
    .unwrap();
    client.payload(&context()).await.unwrap();
    assert_eq!(
        imds.requests()[0].header("x-aws-ec2-metadata-token-ttl-seconds"),
        Some("21600")
    );

    // A "token" that could not be a header value is not sent on.
    let bad = MetadataServer::start(Arc::new(|_| (200, b"line\nbreak".to_vec()))).await;
    let err = client_for(&bad.url).payload(&context()).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("not a token"), "{err}");
    assert_eq!(bad.requests().len(), 1);
}

/// The trust-on-first-use record holds the time of the attestor's clock (its context's):
/// a reattestation an hour later on that clock moves it by exactly an hour.
#[tokio::test]
async fn the_first_use_record_holds_the_contexts_time() {
    let aws = Aws::new();
    let clock = Arc::new(ManualClock::at_unix(1_700_000_000));
    let store = Arc::new(MemoryStateStore::default());
    let server = AwsIidAttestor::new(
        &serde_json::from_value(serde_json::json!({
            "region_certificates": {"us-east-1": "us-east-1.pem"},
            "allow_reattestation": true,
        }))
        .unwrap(),
        &PluginContext::for_tests(aws.pki.dir.path()).with_clock(clock.clone()),
        store.clone(),
    )
    .unwrap();
    let signed = document("111111111111", "us-east-1", "i-0aaaaaaaaaaaaaaaa");
    let p = payload(
        &signed,
        &aws.pki.sign(signed.as_bytes(), &aws.us_east_1, &[]),
    );
    let r = attest(&server, &p).await.unwrap();
    let key = server.forget_on_eviction(&r.agent_path).unwrap();
    let attested_at = || async {
        let data = store.load(&key).await.unwrap().unwrap();
        serde_json::from_slice::<tofu::Record>(&data)
            .unwrap()
            .attested_at
    };
    assert_eq!(attested_at().await, 1_700_000_000);
    clock.advance(Duration::from_secs(3_600));
    attest(&server, &p).await.unwrap();
    assert_eq!(attested_at().await, 1_700_003_600);
}

#[tokio::test]
async fn a_document_other_than_the_signed_content_is_rejected() {
    let aws = Aws::new();
    let server = aws.server();
    let signed = document("111111111111", "us-east-1", "i-0aaaaaaaaaaaaaaaa");
    let pkcs7 = aws.pki.sign(signed.as_bytes(), &aws.us_east_1, &[]);
    // The same valid signature, with another instance's document beside it.
    let other = document("222222222222", "us-east-1", "i-0bbbbbbbbbbbbbbbb");
    assert_rejected(
        &server,
        &payload(&other, &pkcs7),
        &["signed content", "is not the document"],
    )
    .await;
    // Even a change that JSON does not see (a trailing newline) is another document.
    assert_rejected(
        &server,
        &payload(&format!("{signed}\n"), &pkcs7),
        &["is not the document"],
    )
    .await;
    // The signed document itself passes.
    attest(&server, &payload(&signed, &pkcs7)).await.unwrap();
}

#[tokio::test]
async fn a_signer_other_than_the_first_certificate_in_the_bag_is_rejected() {
    let aws = Aws::new();
    // A longer subject makes the attacker's certificate sort after the region's in the
    // DER SET OF, so the trusted certificate is the bag's first.
    let attacker = aws.pki.cert(
        "attacker",
        "/O=Attacker/OU=a subject long enough that this certificate/OU=sorts after the region certificate/CN=attacker",
        "0x01",
    );
    let bag = aws.pki.path("bag.pem");
    std::fs::write(
        &bag,
        [
            std::fs::read(&aws.us_east_1.pem).unwrap(),
            std::fs::read(&attacker.pem).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let doc = document("123456789012", "us-east-1", "i-0123456789abcdef0");
    let pkcs7 = aws
        .pki
        .sign(doc.as_bytes(), &attacker, &["-certfile", s(&bag)]);
    let (region_at, attacker_at) = (
        find(&pkcs7, &aws.us_east_1.der()).expect("the region certificate is in the bag"),
        find(&pkcs7, &attacker.der()).expect("the attacker certificate is in the bag"),
    );
    assert!(
        region_at < attacker_at,
        "the region certificate comes first"
    );
    // A verifier that believes the bag accepts it: the PKCS#7 itself is sound.
    verify_with_openssl_trusting_the_bag(&aws.pki, &pkcs7);

    assert_rejected(
        &aws.server(),
        &payload(&doc, &pkcs7),
        &[
            "signer",
            "CN=attacker",
            "is not the certificate configured for us-east-1",
        ],
    )
    .await;
}

#[tokio::test]
async fn an_attacker_certificate_with_the_trusted_issuer_and_serial_does_not_verify() {
    let aws = Aws::new();
    // Same subject, issuer and serial as us-east-1's certificate; another key.
    let twin = aws.pki.cert("twin", AWS_DN, "0x00b64bde5ad00924cc");
    let doc = document("123456789012", "us-east-1", "i-0123456789abcdef0");
    // The twin certificate travels in the bag (no -nocerts).
    let pkcs7 = aws.pki.sign_raw(
        doc.as_bytes(),
        &[
            "-signer",
            s(&twin.pem),
            "-inkey",
            s(&twin.key),
            "-nodetach",
            "-stream",
        ],
    );
    assert!(find(&pkcs7, &twin.der()).is_some());
    verify_with_openssl_trusting_the_bag(&aws.pki, &pkcs7);

    assert_rejected(
        &aws.server(),
        &payload(&doc, &pkcs7),
        &["signature does not verify with the configured certificate"],
    )
    .await;
}

#[tokio::test]
async fn a_signature_by_another_regions_certificate_is_rejected() {
    let aws = Aws::new();
    let doc = document("123456789012", "us-east-1", "i-0123456789abcdef0");
    let pkcs7 = aws.pki.sign(doc.as_bytes(), &aws.eu_west_1, &[]);
    assert_rejected(
        &aws.server(),
        &payload(&doc, &pkcs7),
        &[
            "names region us-east-1",
            "signed with the certificate configured for eu-west-1",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_region_without_a_certificate_is_rejected() {
    let aws = Aws::new();
    let server = aws.server();
    let doc = document("123456789012", "ap-south-1", "i-0123456789abcdef0");
    // Signed with a configured region's key: verified, but the region has no certificate.
    let pkcs7 = aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]);
    assert_rejected(
        &server,
        &payload(&doc, &pkcs7),
        &[
            "no certificate configured for region \"ap-south-1\"",
            "us-east-1",
        ],
    )
    .await;
    // Signed with the (unconfigured) region's own key, as AWS would.
    let ap_south_1 = aws.pki.cert("ap-south-1", AWS_DN, "0x00c4a7e0b1d2f30517");
    let pkcs7 = aws.pki.sign(doc.as_bytes(), &ap_south_1, &[]);
    assert_rejected(
        &server,
        &payload(&doc, &pkcs7),
        &[
            "no certificate configured for region ap-south-1",
            "unverified",
        ],
    )
    .await;
}

#[tokio::test]
async fn an_account_not_on_the_allowlist_is_rejected() {
    let aws = Aws::new();
    let mut cfg = aws.config();
    cfg.account_allowlist = vec!["111111111111".into(), "333333333333".into()];
    let server = aws.server_with(&cfg, Arc::default());
    let doc = document("123456789012", "us-east-1", "i-0123456789abcdef0");
    let pkcs7 = aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]);
    assert_rejected(
        &server,
        &payload(&doc, &pkcs7),
        &["account \"123456789012\" is not on account_allowlist"],
    )
    .await;
    let doc = document("333333333333", "us-east-1", "i-0123456789abcdef0");
    let pkcs7 = aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]);
    let result = attest(&server, &payload(&doc, &pkcs7)).await.unwrap();
    assert_eq!(
        result.agent_path,
        "333333333333/us-east-1/i-0123456789abcdef0"
    );
}

#[tokio::test]
async fn an_instance_attests_once_unless_reattestation_is_allowed() {
    let aws = Aws::new();
    let store = Arc::new(MemoryStateStore::default());
    let server = aws.server_with(&aws.config(), store.clone());
    let doc = document("123456789012", "us-east-1", "i-0123456789abcdef0");
    let p = payload(&doc, &aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]));
    attest(&server, &p).await.unwrap();

    // The same evidence again, and even a fresh signature of the same instance.
    let err = attest(&server, &p).await.unwrap_err();
    assert!(matches!(err, Error::AttestationReplay(_)), "{err}");
    let fresh = payload(&doc, &aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]));
    let err = attest(&server, &fresh).await.unwrap_err();
    assert!(matches!(err, Error::AttestationReplay(_)), "{err}");

    // A second server over the same datastore (a restart, or another server of the
    // trust domain) refuses too.
    let other = aws.server_with(&aws.config(), store.clone());
    let err = attest(&other, &p).await.unwrap_err();
    assert!(matches!(err, Error::AttestationReplay(_)), "{err}");
    // Another instance is not affected.
    let doc2 = document("123456789012", "us-east-1", "i-0fffffffffffffff0");
    let p2 = payload(&doc2, &aws.pki.sign(doc2.as_bytes(), &aws.us_east_1, &[]));
    attest(&other, &p2).await.unwrap();
    assert_eq!(store.len(), 2);

    // Evicting the agent deletes the record its attestor names: the instance is
    // admitted once more, and only once.
    let path = "123456789012/us-east-1/i-0123456789abcdef0";
    common::readmitted_once_after_eviction(&other, &store, path, &p).await;

    // With allow_reattestation, again and again.
    let mut cfg = aws.config();
    cfg.allow_reattestation = true;
    let lenient = aws.server_with(&cfg, store.clone());
    for _ in 0..2 {
        let result = attest(&lenient, &p).await.unwrap();
        assert!(result.can_reattest);
        assert_eq!(
            result.agent_path,
            "123456789012/us-east-1/i-0123456789abcdef0"
        );
    }
}

#[tokio::test]
async fn rejected_attempts_do_not_consume_the_first_use() {
    let aws = Aws::new();
    let store = Arc::new(MemoryStateStore::default());
    let mut cfg = aws.config();
    cfg.account_allowlist = vec!["999999999999".into()];
    let strict = aws.server_with(&cfg, store.clone());
    let doc = document("123456789012", "us-east-1", "i-0123456789abcdef0");
    let pkcs7 = aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]);
    let good = payload(&doc, &pkcs7);
    assert_rejected(&strict, &good, &["account_allowlist"]).await;

    let server = aws.server_with(&aws.config(), store.clone());
    let substituted = document("123456789012", "us-east-1", "i-0123456789abcdef1");
    assert_rejected(
        &server,
        &payload(&substituted, &pkcs7),
        &["not the document"],
    )
    .await;
    let by_other_region = aws.pki.sign(doc.as_bytes(), &aws.eu_west_1, &[]);
    assert_rejected(&server, &payload(&doc, &by_other_region), &["eu-west-1"]).await;
    assert!(store.is_empty(), "a rejected attempt recorded the instance");

    attest(&server, &good).await.unwrap();
    assert!(
        store
            .load("123456789012/us-east-1/i-0123456789abcdef0")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn malformed_signatures_are_rejected_without_panic() {
    let aws = Aws::new();
    let server = aws.server();
    let doc = document("123456789012", "us-east-1", "i-0123456789abcdef0");
    let key = &aws.us_east_1;
    let signer = ["-signer", s(&key.pem), "-inkey", s(&key.key)];

    // Detached: the document is not inside.
    let detached = aws
        .pki
        .sign_raw(doc.as_bytes(), &[&signer[..], &["-nocerts"]].concat());
    assert_rejected(&server, &payload(&doc, &detached), &["detached"]).await;

    // Two signers.
    let eu = &aws.eu_west_1;
    let two = aws.pki.sign(
        doc.as_bytes(),
        key,
        &["-signer", s(&eu.pem), "-inkey", s(&eu.key)],
    );
    assert_rejected(&server, &payload(&doc, &two), &["2 signers"]).await;

    // A flipped bit in the signature value (the last element of the DER form).
    let mut tampered = aws.pki.sign_raw(
        doc.as_bytes(),
        &[&signer[..], &["-nodetach", "-nocerts"]].concat(),
    );
    *tampered.last_mut().unwrap() ^= 0x01;
    assert_rejected(&server, &payload(&doc, &tampered), &["does not verify"]).await;

    // A changed byte of the signed content (and the same change in the document).
    let mut changed = aws.pki.sign(doc.as_bytes(), key, &[]);
    let at = find(&changed, b"t3.micro").unwrap();
    changed[at + 7] = b'X';
    let changed_doc = doc.replace("t3.micro", "t3.micrX");
    assert_rejected(
        &server,
        &payload(&changed_doc, &changed),
        &["message-digest attribute is not the SHA-256"],
    )
    .await;

    // A weaker digest than AWS uses.
    let sha1 = aws.pki.sign(doc.as_bytes(), key, &["-md", "sha1"]);
    assert_rejected(
        &server,
        &payload(&doc, &sha1),
        &["digest algorithm", "not SHA-256"],
    )
    .await;

    // RSA-PSS: not what AWS uses.
    let pss = aws.pki.sign_raw(
        doc.as_bytes(),
        &[
            &signer[..],
            &["-nodetach", "-keyopt", "rsa_padding_mode:pss"],
        ]
        .concat(),
    );
    assert_rejected(&server, &payload(&doc, &pss), &["signature algorithm"]).await;

    // The signer named by subject key identifier.
    let keyid = aws.pki.sign(doc.as_bytes(), key, &["-keyid"]);
    assert_rejected(&server, &payload(&doc, &keyid), &["subject key identifier"]).await;

    // Not base64, empty, not a PKCS#7 at all.
    assert_rejected(
        &server,
        &payload_of(&doc, "@@not base64@@"),
        &["not base64"],
    )
    .await;
    assert_rejected(&server, &payload_of(&doc, ""), &["empty"]).await;
    assert_rejected(
        &server,
        &payload(&doc, b"\x30\x03\x02\x01\x05"),
        &["ContentInfo"],
    )
    .await;

    // Every truncation of a good signature.
    let good = aws.pki.sign(doc.as_bytes(), key, &[]);
    for len in 0..good.len() {
        assert_rejected(&server, &payload(&doc, &good[..len]), &[]).await;
    }
    // Trailing bytes after it.
    let trailing = [&good[..], b"\x00"].concat();
    assert_rejected(&server, &payload(&doc, &trailing), &["after the end"]).await;
    // And the untouched one passes.
    attest(&server, &payload(&doc, &good)).await.unwrap();
}

#[tokio::test]
async fn a_pkcs7_without_signed_attributes_verifies_over_the_content() {
    let aws = Aws::new();
    let doc = document("123456789012", "eu-west-1", "i-0123456789abcdef0");
    let pkcs7 = aws.pki.sign(doc.as_bytes(), &aws.eu_west_1, &["-noattr"]);
    let result = attest(&aws.server(), &payload(&doc, &pkcs7)).await.unwrap();
    assert_eq!(
        result.agent_path,
        "123456789012/eu-west-1/i-0123456789abcdef0"
    );
    // The DER (definite-length) form is read as well as BER.
    let der = aws.pki.sign_raw(
        doc.as_bytes(),
        &[
            "-signer",
            s(&aws.eu_west_1.pem),
            "-inkey",
            s(&aws.eu_west_1.key),
            "-nodetach",
        ],
    );
    attest(&aws.server(), &payload(&doc, &der)).await.unwrap();
}

#[tokio::test]
async fn malformed_payloads_are_rejected() {
    let aws = Aws::new();
    let server = aws.server();
    let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    assert_rejected(&server, &big, &["more than 65536"]).await;
    assert_rejected(&server, b"not json", &["not JSON"]).await;
    assert_rejected(&server, b"[1]", &["not a JSON object"]).await;
    assert_rejected(
        &server,
        br#"{"document":"{}","signature":""}"#,
        &["no version"],
    )
    .await;
    assert_rejected(
        &server,
        br#"{"version":2,"document":"{}","signature":""}"#,
        &["version 2", "this server 1"],
    )
    .await;
    assert_rejected(
        &server,
        br#"{"version":1,"document":"{}"}"#,
        &["missing field `signature`"],
    )
    .await;
    assert_rejected(
        &server,
        br#"{"version":1,"document":"{}","signature":"","extra":1}"#,
        &["unknown field `extra`"],
    )
    .await;
    // A signed document that is not an identity document is refused after verification.
    let not_iid = r#"{"accountId":"123456789012"}"#;
    let pkcs7 = aws.pki.sign(not_iid.as_bytes(), &aws.us_east_1, &[]);
    assert_rejected(
        &server,
        &payload(not_iid, &pkcs7),
        &["signed instance identity document", "missing field"],
    )
    .await;
    // A signed document whose instance ID is not a path segment.
    let doc = document("123456789012", "us-east-1", "i-0/../x");
    let pkcs7 = aws.pki.sign(doc.as_bytes(), &aws.us_east_1, &[]);
    assert_rejected(
        &server,
        &payload(&doc, &pkcs7),
        &["instanceId", "not a valid SPIFFE ID path segment"],
    )
    .await;
}

#[tokio::test]
async fn an_unreachable_imds_is_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = client_for(&format!("http://127.0.0.1:{port}"))
        .payload(&context())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains(TOKEN_PATH), "{err}");
}

#[tokio::test]
async fn imds_errors_are_unavailable_naming_the_path() {
    // No token: IMDSv2 refuses the document.
    let no_token = MetadataServer::start(Arc::new(|seen| match seen.method.as_str() {
        "PUT" => (403, b"IMDSv2 disabled".to_vec()),
        _ => (404, Vec::new()),
    }))
    .await;
    let err = client_for(&no_token.url)
        .payload(&context())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("PUT {TOKEN_PATH}): HTTP 403")),
        "{err}"
    );

    // A token that IMDS then does not accept.
    let wrong_token = MetadataServer::start(Arc::new(|seen| match seen.method.as_str() {
        "PUT" => (200, b"some-other-token".to_vec()),
        _ => (401, Vec::new()),
    }))
    .await;
    let err = client_for(&wrong_token.url)
        .payload(&context())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("GET {DOCUMENT_PATH}): HTTP 401")),
        "{err}"
    );

    // The signature path failing.
    let broken = MetadataServer::start(Arc::new(|seen| {
        match (seen.method.as_str(), seen.path_and_query.as_str()) {
            ("PUT", _) => (200, IMDS_TOKEN.as_bytes().to_vec()),
            (_, DOCUMENT_PATH) => (200, b"{}".to_vec()),
            _ => (500, b"internal error".to_vec()),
        }
    }))
    .await;
    let err = client_for(&broken.url)
        .payload(&context())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("GET {SIGNATURE_PATH}): HTTP 500 internal error")),
        "{err}"
    );
    // The token is never part of an error.
    assert!(!err.to_string().contains(IMDS_TOKEN), "{err}");
}

fn server_config_err(aws: &Aws, cfg: serde_json::Value) -> String {
    let cfg: AwsServerConfig = serde_json::from_value(cfg).unwrap();
    let err = AwsIidAttestor::new(
        &cfg,
        &PluginContext::for_tests(aws.pki.dir.path()),
        Arc::new(MemoryStateStore::default()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::PluginConfig { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("node_attestor.aws_iid"), "{msg}");
    msg
}

#[test]
fn server_config_is_validated() {
    let aws = Aws::new();
    let pki = &aws.pki;
    let check = |cfg: serde_json::Value, want: &[&str]| {
        let msg = server_config_err(&aws, cfg);
        for w in want {
            assert!(msg.contains(w), "{msg:?} does not contain {w:?}");
        }
    };
    check(
        serde_json::json!({"region_certificates": {}}),
        &["region_certificates is empty"],
    );
    check(
        serde_json::json!({"region_certificates": {"us-east-1": "missing.pem"}}),
        &[
            "region_certificates.us-east-1",
            "missing.pem",
            "cannot read",
        ],
    );
    pki.cert_with(
        "ec",
        "/CN=ec",
        "1",
        &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    check(
        serde_json::json!({"region_certificates": {"us-east-1": "ec.pem"}}),
        &["ec.pem", "not RSA"],
    );
    pki.cert_with("rsa1024", "/CN=small", "1", &["rsa:1024"]);
    check(
        serde_json::json!({"region_certificates": {"us-east-1": "rsa1024.pem"}}),
        &["1024 bits"],
    );
    let two = pki.path("two.pem");
    std::fs::write(
        &two,
        [
            std::fs::read(&aws.us_east_1.pem).unwrap(),
            std::fs::read(&aws.eu_west_1.pem).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    check(
        serde_json::json!({"region_certificates": {"us-east-1": "two.pem"}}),
        &["2 PEM blocks"],
    );
    check(
        serde_json::json!({"region_certificates": {"us-east-1": "us-east-1.key"}}),
        &["PRIVATE KEY", "not a CERTIFICATE"],
    );
    std::fs::write(pki.path("empty.pem"), b"").unwrap();
    check(
        serde_json::json!({"region_certificates": {"us-east-1": "empty.pem"}}),
        &["no PEM certificate"],
    );
    // Two different certificates that a signer identifier could not tell apart.
    pki.cert("twin", AWS_DN, "0x00b64bde5ad00924cc");
    check(
        serde_json::json!({"region_certificates": {"us-east-1": "us-east-1.pem", "us-west-2": "twin.pem"}}),
        &["issuer and serial number of region us-east-1"],
    );
    check(
        serde_json::json!({
            "region_certificates": {"US East": "us-east-1.pem"},
            "account_allowlist": ["12345", "123456789012", "12345678901a"],
        }),
        &[
            "\"US East\" is not a region name",
            "\"12345\" is not an AWS account ID",
            "\"12345678901a\" is not an AWS account ID",
        ],
    );
    let unknown = serde_json::from_value::<AwsServerConfig>(serde_json::json!({
        "region_certificates": {"us-east-1": "us-east-1.pem"},
        "allow_reattest": true,
    }))
    .unwrap_err();
    assert!(unknown.to_string().contains("unknown field"), "{unknown}");

    // The same certificate for two regions, by an absolute path: fine.
    let cfg: AwsServerConfig = serde_json::from_value(serde_json::json!({
        "region_certificates": {
            "us-east-1": aws.us_east_1.pem,
            "us-east-2": "us-east-1.pem",
        },
        "account_allowlist": ["123456789012"],
    }))
    .unwrap();
    assert!(!cfg.allow_reattestation);
    AwsIidAttestor::new(
        &cfg,
        &PluginContext::for_tests(Path::new("/nonexistent")),
        Arc::new(MemoryStateStore::default()),
    )
    .unwrap_err();
    AwsIidAttestor::new(
        &cfg,
        &PluginContext::for_tests(pki.dir.path()),
        Arc::new(MemoryStateStore::default()),
    )
    .unwrap();
}

#[test]
fn agent_config_is_validated() {
    let cfg: AwsAgentConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.metadata_url, "http://169.254.169.254");
    assert_eq!(cfg.token_ttl_seconds, 60);
    assert_eq!(cfg.timeout, Duration::from_secs(5));
    AwsIidAttestorClient::new(&cfg).unwrap();

    let cfg: AwsAgentConfig = serde_json::from_str(
        r#"{"metadata_url":"http://[fd00:ec2::254]","token_ttl_seconds":300,"timeout":"250ms"}"#,
    )
    .unwrap();
    assert_eq!(cfg.timeout, Duration::from_millis(250));
    AwsIidAttestorClient::new(&cfg).unwrap();

    let bad = |json: &str, want: &str| {
        let cfg: AwsAgentConfig = serde_json::from_str(json).unwrap();
        let err = AwsIidAttestorClient::new(&cfg).unwrap_err();
        assert!(matches!(err, Error::PluginConfig { .. }), "{err}");
        assert!(
            err.to_string().contains(want),
            "{err} does not contain {want:?}"
        );
    };
    bad(
        r#"{"metadata_url":"https://169.254.169.254"}"#,
        "metadata_url",
    );
    bad(r#"{"token_ttl_seconds":0}"#, "token_ttl_seconds: 0");
    bad(r#"{"token_ttl_seconds":21601}"#, "token_ttl_seconds: 21601");
    bad(r#"{"timeout":"0s"}"#, "timeout");
    assert!(serde_json::from_str::<AwsAgentConfig>(r#"{"url":"x"}"#).is_err());
    assert!(serde_json::from_str::<AwsAgentConfig>(r#"{"timeout":"soon"}"#).is_err());
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `openssl cms -verify` with the certificates of the PKCS#7's own bag and no chain
/// check: what a verifier that trusts the bag would conclude. It accepts, which shows
/// the PKCS#7 is well formed and only the trust decision refuses it.
fn verify_with_openssl_trusting_the_bag(pki: &Pki, pkcs7: &[u8]) {
    let path = pki.fresh("p7");
    std::fs::write(&path, pkcs7).unwrap();
    openssl(&[
        "cms",
        "-verify",
        "-noverify",
        "-inform",
        "DER",
        "-in",
        s(&path),
        "-out",
        "/dev/null",
    ]);
}

/// AWS's RSA-2048 certificate for us-west-2, as published in the EC2 user guide ("AWS
/// public certificates"; the same certificate is embedded in Teleport's
/// `lib/auth/join_ec2.go`). Subject = issuer = C=US, ST=Washington State, L=Seattle,
/// O=Amazon Web Services LLC; serial b6:4b:de:5a:d0:09:24:cc.
const AWS_US_WEST_2_RSA2048_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIEEjCCAvqgAwIBAgIJALZL3lrQCSTMMA0GCSqGSIb3DQEBCwUAMFwxCzAJBgNV
BAYTAlVTMRkwFwYDVQQIExBXYXNoaW5ndG9uIFN0YXRlMRAwDgYDVQQHEwdTZWF0
dGxlMSAwHgYDVQQKExdBbWF6b24gV2ViIFNlcnZpY2VzIExMQzAgFw0xNTA4MTQw
OTAxMzJaGA8yMTk1MDExNzA5MDEzMlowXDELMAkGA1UEBhMCVVMxGTAXBgNVBAgT
EFdhc2hpbmd0b24gU3RhdGUxEDAOBgNVBAcTB1NlYXR0bGUxIDAeBgNVBAoTF0Ft
YXpvbiBXZWIgU2VydmljZXMgTExDMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIB
CgKCAQEA02Y59qtAA0a6uzo7nEQcnJ26OKF+LRPwZfixBH+EbEN/Fx0gYy1jpjCP
s5+VRNg6/WbfqAsV6X2VSjUKN59ZMnMY9ALA/Ipz0n00Huxj38EBZmX/NdNqKm7C
qWu1q5kmIvYjKGiadfboU8wLwLcHo8ywvfgI6FiGGsEO9VMC56E/hL6Cohko11LW
dizyvRcvg/IidazVkJQCN/4zC9PUOVyKdhW33jXy8BTg/QH927QuNk+ZzD7HH//y
tIYxDhR6TIZsSnRjz3bOcEHxt1nsidc65mY0ejQty4hy7ioSiapw316mdbtE+RTN
fcH9FPIFKQNBpiqfAW5Ebp3Lal3/+wIDAQABo4HUMIHRMAsGA1UdDwQEAwIHgDAd
BgNVHQ4EFgQU7coQx8Qnd75qA9XotSWT3IhvJmowgY4GA1UdIwSBhjCBg4AU7coQ
x8Qnd75qA9XotSWT3IhvJmqhYKReMFwxCzAJBgNVBAYTAlVTMRkwFwYDVQQIExBX
YXNoaW5ndG9uIFN0YXRlMRAwDgYDVQQHEwdTZWF0dGxlMSAwHgYDVQQKExdBbWF6
b24gV2ViIFNlcnZpY2VzIExMQ4IJALZL3lrQCSTMMBIGA1UdEwEB/wQIMAYBAf8C
AQAwDQYJKoZIhvcNAQELBQADggEBAFZ1e2MnzRaXCaLwEC1pW/f0oRG8nHrlPZ9W
OYZEWbh+QanRgaikBNDtVTwARQcZm3z+HWSkaIx3cyb6vM0DSkZuiwzm1LJ9rDPc
aBm03SEt5v8mcc7sXWvgFjCnUpzosmky6JheCD4O1Cf8k0olZ93FQnTrbg62OK0h
83mGCDeVKU3hLH97FYoUq+3N/IliWFDhvibAYYKFJydZLhIdlCiiB99AM6Sg53rm
oukS3csyUxZyTU2hQfdjyo1nqW9yhvFAKjnnggiwxNKTTPZzstKW8+cnYwiiTwJN
QpVoZdt0SfbuNnmwRUMi+QbuccXweav29QeQ3ADqjgB0CZdSRKk=
-----END CERTIFICATE-----
";

/// A server trusting AWS's real us-west-2 certificate.
fn real_aws_server(dir: &Path, allow_reattestation: bool) -> AwsIidAttestor {
    std::fs::write(dir.join("us-west-2.pem"), AWS_US_WEST_2_RSA2048_CERT).unwrap();
    let cfg: AwsServerConfig = serde_json::from_value(serde_json::json!({
        "region_certificates": {"us-west-2": "us-west-2.pem"},
        "allow_reattestation": allow_reattestation,
    }))
    .unwrap();
    AwsIidAttestor::new(
        &cfg,
        &PluginContext::for_tests(dir),
        Arc::new(MemoryStateStore::default()),
    )
    .unwrap()
}

#[tokio::test]
async fn real_aws_rsa2048_signatures_verify_with_the_region_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = real_aws_server(dir.path(), false);
    // 2021-06: rsaEncryption; signed attributes content-type, signing-time,
    // message-digest; BER with indefinite lengths; no certificates.
    let result = attest(&server, &payload_of(FLAWS_DOCUMENT, FLAWS_RSA2048))
        .await
        .unwrap();
    assert_eq!(
        result.agent_path,
        "975426262029/us-west-2/i-05bef8a081f307783"
    );
    assert!(selectors(&result).contains("aws_iid:image_id:ami-7c803d1c"));
    // 2021-09: sha256WithRSAEncryption, plus CMSAlgorithmProtection.
    let result = attest(&server, &payload_of(TELEPORT_DOCUMENT, TELEPORT_RSA2048))
        .await
        .unwrap();
    assert_eq!(
        result.agent_path,
        "278576220453/us-west-2/i-078517ca8a70a1dde"
    );
    assert!(selectors(&result).contains("aws_iid:instance_type:t2.medium"));

    // The real signature of one instance does not vouch for another's document.
    let server = real_aws_server(dir.path(), true);
    assert_rejected(
        &server,
        &payload_of(TELEPORT_DOCUMENT, FLAWS_RSA2048),
        &["is not the document"],
    )
    .await;
    let edited = FLAWS_DOCUMENT.replace("t2.micro", "m5.large");
    assert_rejected(
        &server,
        &payload_of(&edited, FLAWS_RSA2048),
        &["is not the document"],
    )
    .await;
}

#[tokio::test]
async fn every_single_bit_change_of_a_real_aws_signature_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = real_aws_server(dir.path(), true);
    let der = base64::engine::general_purpose::STANDARD
        .decode(FLAWS_RSA2048.replace('\n', ""))
        .unwrap();
    attest(&server, &payload(FLAWS_DOCUMENT, &der))
        .await
        .unwrap();
    // Signed or not, no byte is left unchecked: the versions, the list of digest
    // algorithms and the BER framing are checked as strictly as what the signature
    // covers.
    for i in 0..der.len() {
        for bit in 0..8 {
            let mut changed = der.clone();
            changed[i] ^= 1 << bit;
            match attest(&server, &payload(FLAWS_DOCUMENT, &changed)).await {
                Err(Error::AttestationRejected(_)) => {}
                other => panic!("byte {i} bit {bit}: {other:?}"),
            }
        }
    }
}

// Two real `instance-identity/rsa2048` bodies, exactly as IMDS served them, with the
// documents they sign. The first is from the flAWS.cloud challenge instance (dumped in
// github.com/amkuipers/aws-imds-spider, example-imds.json); the second from Teleport's
// EC2 join tests (github.com/gravitational/teleport). Both verify with `openssl cms
// -verify -certfile us-west-2.pem -noverify`.
const FLAWS_RSA2048: &str = "\
MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwGggCSABIIB\n\
03sKICAiYWNjb3VudElkIiA6ICI5NzU0MjYyNjIwMjkiLAogICJhcmNoaXRlY3R1cmUiIDogIng4\n\
Nl82NCIsCiAgImF2YWlsYWJpbGl0eVpvbmUiIDogInVzLXdlc3QtMmEiLAogICJiaWxsaW5nUHJv\n\
ZHVjdHMiIDogbnVsbCwKICAiZGV2cGF5UHJvZHVjdENvZGVzIiA6IG51bGwsCiAgIm1hcmtldHBs\n\
YWNlUHJvZHVjdENvZGVzIiA6IG51bGwsCiAgImltYWdlSWQiIDogImFtaS03YzgwM2QxYyIsCiAg\n\
Imluc3RhbmNlSWQiIDogImktMDViZWY4YTA4MWYzMDc3ODMiLAogICJpbnN0YW5jZVR5cGUiIDog\n\
InQyLm1pY3JvIiwKICAia2VybmVsSWQiIDogbnVsbCwKICAicGVuZGluZ1RpbWUiIDogIjIwMTct\n\
MDItMTJUMjI6Mjk6MjRaIiwKICAicHJpdmF0ZUlwIiA6ICIxNzIuMzEuNDEuODQiLAogICJyYW1k\n\
aXNrSWQiIDogbnVsbCwKICAicmVnaW9uIiA6ICJ1cy13ZXN0LTIiLAogICJ2ZXJzaW9uIiA6ICIy\n\
MDE3LTA5LTMwIgp9AAAAAAAAMYIB/zCCAfsCAQEwaTBcMQswCQYDVQQGEwJVUzEZMBcGA1UECBMQ\n\
V2FzaGluZ3RvbiBTdGF0ZTEQMA4GA1UEBxMHU2VhdHRsZTEgMB4GA1UEChMXQW1hem9uIFdlYiBT\n\
ZXJ2aWNlcyBMTEMCCQC2S95a0AkkzDANBglghkgBZQMEAgEFAKBpMBgGCSqGSIb3DQEJAzELBgkq\n\
hkiG9w0BBwEwHAYJKoZIhvcNAQkFMQ8XDTIxMDYyMjExMjgyNlowLwYJKoZIhvcNAQkEMSIEIMLb\n\
8ow7kb0G49NVLH/I4LsuoqSXQFXOlFvia2B3LTcIMA0GCSqGSIb3DQEBAQUABIIBAKS0/q8M7ird\n\
ODslVBw1ANusi/x8UCxqmEmYYSQlK1VRVQxz1RNks0cR43pWcxDubnN1VKzVYmnl5SNjUuQCrcD9\n\
/+kVrJjc8bSVDUUyGYXVhVaPD+3UgI0av1x3Ye8TrcMyVx4T7IX9kDMPZKuLucg8ki/4HHlaKTFY\n\
qQuhCdmEAArkbDYTAPj1SCQUKTvArjlNTdTmiAkVsdbtlKGbNO2zSLuL6DXfD8Ih8WwYXcRWkVHK\n\
Lh9kslnFwFiBWEB5Eaao/OntTDmtgOhzTqtZ3azZI1lDojB+Ad3QohOmvVj9sRKl+K8F2iM2Oh05\n\
ec5QiYevpdJuTpklqBuamo4QAmEAAAAAAAA=";

const TELEPORT_RSA2048: &str = "\
MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwGggCSABIIB\n\
23sKICAiYWNjb3VudElkIiA6ICIyNzg1NzYyMjA0NTMiLAogICJhcmNoaXRlY3R1cmUiIDogIng4\n\
Nl82NCIsCiAgImF2YWlsYWJpbGl0eVpvbmUiIDogInVzLXdlc3QtMmEiLAogICJiaWxsaW5nUHJv\n\
ZHVjdHMiIDogbnVsbCwKICAiZGV2cGF5UHJvZHVjdENvZGVzIiA6IG51bGwsCiAgIm1hcmtldHBs\n\
YWNlUHJvZHVjdENvZGVzIiA6IG51bGwsCiAgImltYWdlSWQiIDogImFtaS0wZmE5ZTFmNjQxNDJj\n\
ZGUxNyIsCiAgImluc3RhbmNlSWQiIDogImktMDc4NTE3Y2E4YTcwYTFkZGUiLAogICJpbnN0YW5j\n\
ZVR5cGUiIDogInQyLm1lZGl1bSIsCiAgImtlcm5lbElkIiA6IG51bGwsCiAgInBlbmRpbmdUaW1l\n\
IiA6ICIyMDIxLTA5LTAzVDIxOjI1OjQ0WiIsCiAgInByaXZhdGVJcCIgOiAiMTAuMC4wLjIwOSIs\n\
CiAgInJhbWRpc2tJZCIgOiBudWxsLAogICJyZWdpb24iIDogInVzLXdlc3QtMiIsCiAgInZlcnNp\n\
b24iIDogIjIwMTctMDktMzAiCn0AAAAAAAAxggIvMIICKwIBATBpMFwxCzAJBgNVBAYTAlVTMRkw\n\
FwYDVQQIExBXYXNoaW5ndG9uIFN0YXRlMRAwDgYDVQQHEwdTZWF0dGxlMSAwHgYDVQQKExdBbWF6\n\
b24gV2ViIFNlcnZpY2VzIExMQwIJALZL3lrQCSTMMA0GCWCGSAFlAwQCAQUAoIGYMBgGCSqGSIb3\n\
DQEJAzELBgkqhkiG9w0BBwEwHAYJKoZIhvcNAQkFMQ8XDTIxMDkwMzIxMjU0N1owLQYJKoZIhvcN\n\
AQk0MSAwHjANBglghkgBZQMEAgEFAKENBgkqhkiG9w0BAQsFADAvBgkqhkiG9w0BCQQxIgQgCH2d\n\
JiKmdx9uhxlm8ObWAvFOhqJb7k79+DW/T3ezwVUwDQYJKoZIhvcNAQELBQAEggEANWautigs/qZ6\n\
w8g5/EfWsAFj8kHgUD+xqsQ1HDrBUx3IQ498NMBZ78379B8RBfuzeVjbaf+yugov0fYrDbGvSRRw\n\
myy49TfZ9gdlpWQXzwSg3OPMDNToRoKw00/LQjSxcTCaPP4vMDEIjYMUqZ3i4uWYJJJ0Lb7fDMDk\n\
Anu7yHolVfbnvIAuZe8lGpc7ofCSBG5wulm+/pqzO25YPMH1cLEvOadE+3N2GxK6gRTLJoE98rsm\n\
LDp6OuU/b2QfaxU0ec6OogdtSJto/URI0/ygHmNAzBis470A29yh5nVwm6AkY4krjPsK7uiBIRhs\n\
lr5x0X6+ggQfF2BKAJ/BRcAHNgAAAAAAAA==";

const FLAWS_DOCUMENT: &str = r#"{
  "accountId" : "975426262029",
  "architecture" : "x86_64",
  "availabilityZone" : "us-west-2a",
  "billingProducts" : null,
  "devpayProductCodes" : null,
  "marketplaceProductCodes" : null,
  "imageId" : "ami-7c803d1c",
  "instanceId" : "i-05bef8a081f307783",
  "instanceType" : "t2.micro",
  "kernelId" : null,
  "pendingTime" : "2017-02-12T22:29:24Z",
  "privateIp" : "172.31.41.84",
  "ramdiskId" : null,
  "region" : "us-west-2",
  "version" : "2017-09-30"
}"#;

const TELEPORT_DOCUMENT: &str = r#"{
  "accountId" : "278576220453",
  "architecture" : "x86_64",
  "availabilityZone" : "us-west-2a",
  "billingProducts" : null,
  "devpayProductCodes" : null,
  "marketplaceProductCodes" : null,
  "imageId" : "ami-0fa9e1f64142cde17",
  "instanceId" : "i-078517ca8a70a1dde",
  "instanceType" : "t2.medium",
  "kernelId" : null,
  "pendingTime" : "2021-09-03T21:25:44Z",
  "privateIp" : "10.0.0.209",
  "ramdiskId" : null,
  "region" : "us-west-2",
  "version" : "2017-09-30"
}"#;
