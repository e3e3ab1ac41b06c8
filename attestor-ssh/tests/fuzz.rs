#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! Property tests of what an `sshpop` agent sends the server: the host certificate (SSH
//! wire encoding, in the JSON payload) and the SSHSIG proof (PEM, in the JSON answer),
//! through the real `SshAttestor`. The keys and certificate are made here with ssh-key, so
//! no ssh-keygen is needed. Properties: no panic, the allocation bound, and nothing but the
//! genuine certificate and proof is accepted.

use std::sync::OnceLock;

use carapace_attestor_ssh::server::{SshAttestor, SshServerConfig};
use carapace_attestor_ssh::wire::{self, Answer, Challenge, Payload};
use carapace_attestor_ssh::{SSHSIG_HASH, SSHSIG_NAMESPACE, signed_message};
use carapace_core::plugin::{AttestationContext, AttestationStep, NodeAttestor, PluginContext};
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, bytes, config, mutated, mutated_text};
use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{Certificate, LineEnding, PrivateKey};

struct Fixture {
    server: SshAttestor,
    host: PrivateKey,
    cert_blob: Vec<u8>,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ca = PrivateKey::from(Ed25519Keypair::from_seed(&[1; 32]));
        let host = PrivateKey::from(Ed25519Keypair::from_seed(&[2; 32]));
        let now = carapace_core::clock::unix_now().unsigned_abs();
        let mut b = Builder::new(vec![9; 32], host.public_key(), now - 60, now + 86_400).unwrap();
        b.serial(7).unwrap();
        b.cert_type(CertType::Host).unwrap();
        b.key_id("node1").unwrap();
        b.valid_principal("node1.example.org").unwrap();
        let cert = b.sign(&ca).unwrap();
        let cfg = SshServerConfig {
            cert_authorities: vec![format!(
                "cert-authority {}",
                ca.public_key().to_openssh().unwrap()
            )],
            cert_authorities_path: None,
            canonical_domain: None,
        };
        Fixture {
            server: SshAttestor::new(&cfg, &PluginContext::for_tests("/")).unwrap(),
            host,
            cert_blob: cert.to_bytes().unwrap(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
        }
    })
}

fn ctx() -> AttestationContext {
    AttestationContext {
        agent_public_key: vec![1, 2, 3],
        tls_exporter: vec![5; 32],
    }
}

fn payload(blob: &[u8]) -> Vec<u8> {
    wire::encode(&Payload {
        version: wire::VERSION,
        certificate: wire::b64(blob),
    })
    .unwrap()
}

/// Starts an attestation with the genuine certificate; returns the server's nonce and
/// the session.
fn begin() -> (Vec<u8>, Box<dyn carapace_core::plugin::AttestationSession>) {
    let f = fixture();
    let step = f
        .runtime
        .block_on(f.server.begin(&payload(&f.cert_blob), &ctx()))
        .unwrap();
    let AttestationStep::Challenge { challenge, session } = step else {
        panic!("sshpop challenges first");
    };
    let c: Challenge = wire::decode("challenge", &challenge).unwrap();
    (wire::unb64("nonce", &c.nonce).unwrap(), session)
}

/// The genuine answer to a challenge with `server_nonce`.
fn answer(server_nonce: &[u8]) -> Answer {
    let agent_nonce = [3u8; 32];
    let msg = signed_message(server_nonce, &agent_nonce, &ctx().tls_exporter).unwrap();
    let sig = fixture()
        .host
        .sign(SSHSIG_NAMESPACE, SSHSIG_HASH, &msg)
        .unwrap();
    Answer {
        version: wire::VERSION,
        nonce: wire::b64(&agent_nonce),
        signature: sig.to_pem(LineEnding::LF).unwrap(),
    }
}

#[test]
fn the_seeds_are_accepted() {
    let f = fixture();
    let (nonce, session) = begin();
    let answer = wire::encode(&answer(&nonce)).unwrap();
    let step = f.runtime.block_on(session.respond(&answer)).unwrap();
    assert!(matches!(step, AttestationStep::Done(_)));
    assert!(Certificate::from_bytes(&f.cert_blob).is_ok());
}

/// An SSHSIG blob as PEM, in lines of 70 characters as ssh-keygen writes them.
fn sshsig_pem(blob: &[u8]) -> String {
    let b64 = wire::b64(blob);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(70)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN SSH SIGNATURE-----\n{}\n-----END SSH SIGNATURE-----\n",
        lines.join("\n")
    )
}

/// Found by `proofs_never_panic_and_only_the_genuine_one_passes`: ssh-key read the
/// SSHSIG's embedded Ed25519 key under a length prefix of 0x0e60, so a proof the agent
/// never made was accepted as its own.
#[test]
fn a_proof_with_an_altered_key_length_prefix_is_refused() {
    let f = fixture();
    let (nonce, session) = begin();
    let genuine = answer(&nonce);
    let body: String = genuine
        .signature
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut raw = wire::unb64("sig", &body).unwrap();
    // "SSHSIG", version, key blob length, "ssh-ed25519" (4 + 11), then the key's length.
    let at = 6 + 4 + 4 + 4 + 11;
    assert_eq!(raw[at..at + 4], [0, 0, 0, 32]);
    raw[at + 2] = 0x0e;
    raw[at + 3] = 0x60;
    let pem = sshsig_pem(&raw);
    let altered = wire::encode(&Answer {
        signature: pem,
        ..genuine
    })
    .unwrap();
    let e = f.runtime.block_on(session.respond(&altered)).unwrap_err();
    assert!(
        e.to_string().contains("not in canonical SSHSIG encoding"),
        "{e}"
    );
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn host_certificates_never_panic_and_only_the_genuine_one_passes(
        blob in prop_oneof![1 => bytes(200), 8 => mutated(vec![fixture().cert_blob.clone()])],
    ) {
        let f = fixture();
        let payload = payload(&blob);
        let result = bounded("sshpop payload", payload.len(), || {
            f.runtime.block_on(f.server.begin(&payload, &ctx()))
        });
        match result {
            // The CA signs every byte but its own signature, which is deterministic
            // (Ed25519): any other accepted blob would be a forgery or a second encoding.
            Ok(_) => prop_assert_eq!(&blob, &f.cert_blob),
            Err(e) => prop_assert!(e.to_string().contains("sshpop: "), "{}", e),
        }
    }

    #[test]
    fn payload_json_never_panics(text in mutated_text(vec![
        String::from_utf8(payload(&fixture().cert_blob)).unwrap(),
    ])) {
        let f = fixture();
        let _ = bounded("sshpop payload", text.len(), || {
            f.runtime.block_on(f.server.begin(text.as_bytes(), &ctx()))
        });
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn proofs_never_panic_and_only_the_genuine_one_passes(
        edits in mutated(vec![b"seed".to_vec()]),
        which in 0..3u8,
    ) {
        let f = fixture();
        let (nonce, session) = begin();
        let genuine = answer(&nonce);
        // Mutate the whole JSON, the SSHSIG PEM, or the SSHSIG's decoded bytes.
        let text = String::from_utf8(wire::encode(&genuine).unwrap()).unwrap();
        let mutate = |s: &str| -> String {
            let mut seed = s.as_bytes().to_vec();
            for (i, b) in edits.iter().enumerate() {
                if !seed.is_empty() {
                    let at = (usize::from(*b) * 131 + i * 17) % seed.len();
                    seed[at] ^= b.wrapping_add(1);
                }
            }
            String::from_utf8_lossy(&seed).into_owned()
        };
        let response = match which {
            0 => mutate(&text).into_bytes(),
            1 => wire::encode(&Answer { signature: mutate(&genuine.signature), ..genuine.clone() }).unwrap(),
            _ => {
                let body: String = genuine.signature.lines().filter(|l| !l.starts_with("-----")).collect();
                let mut raw = wire::unb64("sig", &body).unwrap();
                for (i, b) in edits.iter().enumerate() {
                    let at = (usize::from(*b) * 7 + i * 29) % raw.len();
                    raw[at] ^= b.wrapping_add(1);
                }
                let pem = sshsig_pem(&raw);
                wire::encode(&Answer { signature: pem, ..genuine.clone() }).unwrap()
            }
        };
        let result = bounded("sshpop answer", response.len(), || f.runtime.block_on(session.respond(&response)));
        if result.is_ok() {
            // Accepted ⇒ the same proof: the same nonce and the same signature.
            let got: Answer = wire::decode("answer", &response).unwrap();
            prop_assert_eq!(&got.nonce, &genuine.nonce);
            let sig = ssh_key::SshSig::from_pem(got.signature.as_bytes()).unwrap();
            let want = ssh_key::SshSig::from_pem(genuine.signature.as_bytes()).unwrap();
            prop_assert_eq!(sig, want);
            // Byte for byte: the signature blob inside the PEM is the genuine one.
            let blob = |pem: &str| -> Vec<u8> {
                let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
                wire::unb64("sig", &body).unwrap()
            };
            prop_assert_eq!(blob(&got.signature), blob(&genuine.signature));
        }
    }
}
