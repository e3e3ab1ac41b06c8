#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! The SPIFFE bundle JSON of fixed keys, byte for byte: `bundle show --format spiffe` and
//! the Workload API's bundles are read by py-spiffe, go-spiffe and SPIRE, so a change to
//! how keys are written (the JWK code lives in `jose`) must not change a byte of it.
//! The fixtures (tests/data/bundle) are two CA certificates (P-256, RSA-2048) and three
//! JWT public keys (P-256, P-384, RSA-2048) made with openssl; golden.json is what the
//! bundle code wrote for them before it moved onto `jose::PublicKey`.

use carapace_core::{JwtKey, TrustBundle, TrustDomain};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, SubjectPublicKeyInfoDer};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/bundle");

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DATA}/{name}")).unwrap()
}

fn fixed_bundle() -> TrustBundle {
    let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
    for ca in ["ca-p256.pem", "ca-rsa.pem"] {
        let der = CertificateDer::from_pem_slice(&read(ca)).unwrap();
        b.x509_authorities.push(der.to_vec());
    }
    for (i, kid) in ["jwt1", "jwt2", "jwt3"].iter().enumerate() {
        let spki =
            SubjectPublicKeyInfoDer::from_pem_slice(&read(&format!("{kid}.pub.pem"))).unwrap();
        b.jwt_authorities.push(JwtKey {
            kid: format!("kid-{i}"),
            public_key_der: spki.to_vec(),
            expires_at: None,
        });
    }
    b.sequence = 42;
    b.refresh_hint = Some(300);
    b
}

#[test]
fn spiffe_json_of_fixed_keys_is_unchanged() {
    let json = fixed_bundle().to_spiffe_json().unwrap();
    let golden = String::from_utf8(read("golden.json")).unwrap();
    assert_eq!(json, golden, "the SPIFFE bundle JSON changed");
}

#[test]
fn golden_json_reads_back_to_the_same_keys() {
    let golden = String::from_utf8(read("golden.json")).unwrap();
    let b = fixed_bundle();
    let back = TrustBundle::from_spiffe_json(b.trust_domain().clone(), &golden).unwrap();
    assert_eq!(back, b);
}
