#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! Property tests of the `aws_iid` attestor with what an agent sends: the JSON payload,
//! the instance identity document and its PKCS#7 signature (BER with indefinite lengths,
//! as AWS signs, made here once with the `openssl` CLI). Mutations of the signature reach
//! the BER→DER normalisation, the CMS parser and the signer lookup; the properties are no
//! panic, the allocation bound, and that nothing but the signed document is accepted.
//! (The JWT, JWKS and BER parsers have their own property tests in `jwt.rs` and
//! `pkcs7.rs`.)

mod common;

use std::process::Command;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use carapace_attestor_cloud::aws::{AwsIidAttestor, AwsServerConfig, Payload};
use carapace_core::plugin::{MemoryStateStore, PluginContext};
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, config, mutated, mutated_text};

const DOCUMENT: &str = "{\n  \"accountId\" : \"123456789012\",\n  \"architecture\" : \"x86_64\",\n  \
    \"availabilityZone\" : \"us-east-1a\",\n  \"imageId\" : \"ami-0abcdef1234567890\",\n  \
    \"instanceId\" : \"i-0123456789abcdef0\",\n  \"instanceType\" : \"t3.micro\",\n  \
    \"pendingTime\" : \"2026-01-02T03:04:05Z\",\n  \"privateIp\" : \"10.0.0.7\",\n  \
    \"region\" : \"us-east-1\",\n  \"version\" : \"2017-09-30\"\n}";

struct Fixture {
    _dir: tempfile::TempDir,
    server: AwsIidAttestor,
    pkcs7: Vec<u8>,
    runtime: tokio::runtime::Runtime,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("cannot run the openssl CLI; these tests need it: apt-get install -y openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        openssl(&[
            "req",
            "-x509",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/O=Amazon Web Services LLC",
            "-set_serial",
            "0x00b64bde5ad00924cc",
            "-keyout",
            &p("r.key"),
            "-out",
            &p("us-east-1.pem"),
            "-newkey",
            "rsa:2048",
        ]);
        std::fs::write(p("doc"), DOCUMENT).unwrap();
        openssl(&[
            "cms",
            "-sign",
            "-binary",
            "-md",
            "sha256",
            "-nosmimecap",
            "-outform",
            "DER",
            "-in",
            &p("doc"),
            "-signer",
            &p("us-east-1.pem"),
            "-inkey",
            &p("r.key"),
            "-nodetach",
            "-nocerts",
            "-stream",
            "-out",
            &p("sig.der"),
        ]);
        let pkcs7 = std::fs::read(p("sig.der")).unwrap();
        let cfg: AwsServerConfig = serde_json::from_value(serde_json::json!({
            "region_certificates": { "us-east-1": "us-east-1.pem" },
            "allow_reattestation": true,
        }))
        .unwrap();
        let server = AwsIidAttestor::new(
            &cfg,
            &PluginContext::for_tests(dir.path()),
            Arc::new(MemoryStateStore::default()),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            server,
            pkcs7,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    })
}

fn payload(document: &str, pkcs7: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&Payload {
        version: 1,
        document: document.to_owned(),
        signature: base64::engine::general_purpose::STANDARD.encode(pkcs7),
    })
    .unwrap()
}

fn attest(
    payload: &[u8],
) -> Result<carapace_core::plugin::AttestationResult, carapace_core::Error> {
    let f = fixture();
    f.runtime.block_on(common::attest_once(&f.server, payload))
}

#[test]
fn the_seed_is_accepted() {
    let r = attest(&payload(DOCUMENT, &fixture().pkcs7)).unwrap();
    assert_eq!(r.agent_path, "123456789012/us-east-1/i-0123456789abcdef0");
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn signatures_never_panic_and_only_sign_the_document(
        pkcs7 in mutated(vec![fixture().pkcs7.clone()]),
    ) {
        let p = payload(DOCUMENT, &pkcs7);
        if let Ok(r) = bounded("aws_iid payload", p.len(), || attest(&p)) {
            // Only the signed document's instance is ever admitted.
            prop_assert_eq!(r.agent_path, "123456789012/us-east-1/i-0123456789abcdef0");
        }
    }

    #[test]
    fn documents_and_payloads_never_panic_and_only_the_signed_document_passes(
        document in mutated_text(vec![DOCUMENT.to_owned()]),
        json in mutated_text(vec![String::from_utf8(payload(DOCUMENT, &fixture().pkcs7)).unwrap()]),
    ) {
        let p = payload(&document, &fixture().pkcs7);
        let result = bounded("aws_iid payload", p.len(), || attest(&p));
        prop_assert_eq!(result.is_ok(), document == DOCUMENT);
        if let Ok(r) = bounded("aws_iid payload", json.len(), || attest(json.as_bytes())) {
            prop_assert_eq!(r.agent_path, "123456789012/us-east-1/i-0123456789abcdef0");
        }
    }
}
