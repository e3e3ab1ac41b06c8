#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! Property tests of core's parsers of peer bytes: SPIFFE IDs, trust domains, selectors,
//! trust bundles (PEM and SPIFFE JSON), X509-SVIDs, the attestation-message decode, and
//! JWTs and JWKS (`jose`).
//! Each parses arbitrary input and mutations of valid input without panicking and within
//! the allocation bound; what is accepted re-encodes to itself where the format is
//! canonical. `CARAPACE_FUZZ_CASES` raises the case count (see carapace-fuzzkit).

use std::sync::OnceLock;

use carapace_core::plugin::decode_message;
use carapace_core::x509svid::{check_leaf, check_signing_cert, verify_chain};
use carapace_core::{Selector, SpiffeId, TrustBundle, TrustDomain};
use carapace_fuzzkit::proptest;
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, bytes, config, mutated, mutated_text};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const NOW: u64 = 1_900_000_000;

/// A trust-domain name character, or (rarely) anything.
fn td_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9._-]{1,40}",
        1 => "[a-zA-Z0-9._:@%/-]{0,12}",
        1 => "\\PC{0,8}",
    ]
}

/// A path segment character, or (rarely) anything.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-zA-Z0-9._-]{1,20}",
        1 => "[./%?#]{0,3}",
        1 => "\\PC{0,6}",
    ]
}

fn spiffe_id_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![8 => Just("spiffe://"), 1 => Just("SPIFFE://"), 1 => Just("spiffe:/"), 1 => Just("")],
        td_name(),
        proptest::collection::vec(segment(), 0..6),
        prop_oneof![8 => Just(""), 1 => Just("/"), 1 => Just("?q"), 1 => Just("#f")],
    )
        .prop_map(|(scheme, td, segs, tail)| {
            let mut s = format!("{scheme}{td}");
            for seg in segs {
                s.push('/');
                s.push_str(&seg);
            }
            s.push_str(tail);
            s
        })
}

/// The checks every accepted SPIFFE ID must pass.
fn check_accepted_id(input: &str, id: &SpiffeId) {
    // Canonical: what was accepted is exactly what is printed.
    assert_eq!(id.to_string(), input);
    assert_eq!(id.as_str(), input);
    let again: SpiffeId = id.to_string().parse().unwrap();
    assert_eq!(&again, id);
    // The parts rebuild the same ID.
    let td = TrustDomain::new(id.trust_domain_name()).unwrap();
    assert_eq!(td, id.trust_domain());
    assert_eq!(&SpiffeId::new(&td, id.path()).unwrap(), id);
    assert_eq!(format!("spiffe://{}{}", td, id.path()), input);
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn spiffe_id_parse_never_panics_and_accepted_ids_are_canonical(s in spiffe_id_text()) {
        let parsed = bounded("SpiffeId", s.len(), || s.parse::<SpiffeId>());
        match parsed {
            Ok(id) => check_accepted_id(&s, &id),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn spiffe_id_parse_of_arbitrary_text(s in "\\PC{0,64}|.{0,64}") {
        if let Ok(id) = bounded("SpiffeId", s.len(), || s.parse::<SpiffeId>()) {
            check_accepted_id(&s, &id);
        }
    }

    #[test]
    fn valid_spiffe_ids_are_accepted_and_survive_mutation(
        td in "[a-z0-9][a-z0-9._-]{0,30}",
        segs in proptest::collection::vec("[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,15}", 0..8),
        edits in mutated(vec![b"spiffe://example.org/ns/prod/sa/web".to_vec()]),
    ) {
        let s = segs.iter().fold(format!("spiffe://{td}"), |acc, seg| format!("{acc}/{seg}"));
        let id: SpiffeId = s.parse().unwrap();
        check_accepted_id(&s, &id);
        let mutated = String::from_utf8_lossy(&edits).into_owned();
        if let Ok(id) = mutated.parse::<SpiffeId>() {
            check_accepted_id(&mutated, &id);
        }
    }

    #[test]
    fn trust_domain_parse_round_trips(s in prop_oneof![td_name(), spiffe_id_text()]) {
        if let Ok(td) = bounded("TrustDomain", s.len(), || TrustDomain::new(&s)) {
            // Display gives the name; both the name and the ID form parse back to it.
            prop_assert_eq!(&TrustDomain::new(&td.to_string()).unwrap(), &td);
            prop_assert_eq!(&TrustDomain::new(&td.id_string()).unwrap(), &td);
            let id: SpiffeId = td.id_string().parse().unwrap();
            prop_assert_eq!(id.path(), "");
            prop_assert!(s == td.name() || s == td.id_string());
        }
    }

    #[test]
    fn selector_parse_round_trips(
        s in prop_oneof![
            "[a-z_-]{0,10}:\\PC{0,40}",
            "unix:(uid|gid|supplementary_gid|user|group|path|sha256|x):[0-9a-f/+ -]{0,66}",
            ".{0,40}",
        ]
    ) {
        if let Ok(sel) = bounded("Selector", s.len(), || s.parse::<Selector>()) {
            prop_assert_eq!(sel.to_string(), s.clone());
            prop_assert_eq!(&s.parse::<Selector>().unwrap(), &sel);
            prop_assert_eq!(&Selector::new(sel.kind(), sel.value()).unwrap(), &sel);
        }
    }

    #[test]
    fn decode_message_is_capped_and_never_panics(input in prop_oneof![
        bytes(256),
        mutated(vec![br#"{"version":1,"nonce":"AAAA","list":[1,2,{"a":null}]}"#.to_vec()]),
    ]) {
        let parsed = bounded("decode_message", input.len(), || {
            decode_message::<serde_json::Value>("fuzz", "message", &input, 64)
        });
        if let Ok(value) = parsed {
            prop_assert!(input.len() <= 64);
            prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&input).unwrap(), value);
        }
    }
}

/// A CA certificate and key, and an X509-SVID it signed, made once.
struct Certs {
    ca: Vec<u8>,
    leaf: Vec<u8>,
    jwt_spki: Vec<u8>,
}

fn time(unix: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix as i64).unwrap()
}

fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let kp = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        p.not_before = time(NOW - 3600);
        p.not_after = time(NOW + 3600);
        let ca = p.self_signed(&kp).unwrap().der().to_vec();
        let issuer = Issuer::new(p, kp);
        let mut l = CertificateParams::new(Vec::<String>::new()).unwrap();
        l.subject_alt_names = vec![SanType::URI("spiffe://example.org/web".try_into().unwrap())];
        l.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        l.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        l.not_before = time(NOW - 60);
        l.not_after = time(NOW + 600);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = l.signed_by(&leaf_key, &issuer).unwrap().der().to_vec();
        let jwt_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .or_else(|_| KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384))
            .unwrap();
        Certs {
            ca,
            leaf,
            jwt_spki: rcgen::PublicKeyData::subject_public_key_info(&jwt_key),
        }
    })
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn good_bundle() -> TrustBundle {
    let c = certs();
    let mut b = TrustBundle::new(td());
    b.x509_authorities = vec![c.ca.clone()];
    b.jwt_authorities = vec![carapace_core::JwtKey {
        kid: "k1".into(),
        public_key_der: c.jwt_spki.clone(),
        expires_at: None,
    }];
    b.sequence = 3;
    b.refresh_hint = Some(300);
    b
}

#[test]
fn the_seeds_are_valid() {
    let b = good_bundle();
    let json = b.to_spiffe_json().unwrap();
    assert_eq!(TrustBundle::from_spiffe_json(td(), &json).unwrap(), b);
    let pem = b.to_pem();
    assert_eq!(
        TrustBundle::from_pem(td(), &pem).unwrap().x509_authorities,
        b.x509_authorities
    );
    let v = verify_chain(&[certs().leaf.clone()], &b, NOW).unwrap();
    assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/web");
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn spiffe_bundle_json_never_panics_and_round_trips(input in prop_oneof![
        1 => "\\PC{0,200}",
        6 => mutated_text(vec![good_bundle().to_spiffe_json().unwrap()]),
    ]) {
        let parsed = bounded("SPIFFE bundle", input.len(), || TrustBundle::from_spiffe_json(td(), &input));
        if let Ok(bundle) = parsed {
            // What was accepted re-encodes to a document that parses to the same bundle.
            if let Ok(json) = bundle.to_spiffe_json() {
                prop_assert_eq!(&TrustBundle::from_spiffe_json(td(), &json).unwrap(), &bundle);
            }
        }
    }

    #[test]
    fn pem_bundle_never_panics_and_round_trips(input in prop_oneof![
        1 => "\\PC{0,200}",
        6 => mutated_text(vec![good_bundle().to_pem()]),
    ]) {
        let parsed = bounded("PEM bundle", input.len(), || TrustBundle::from_pem(td(), &input));
        if let Ok(bundle) = parsed {
            let again = TrustBundle::from_pem(td(), &bundle.to_pem()).unwrap();
            prop_assert_eq!(again.x509_authorities, bundle.x509_authorities);
        }
    }

    #[test]
    fn x509_svid_checks_never_panic(
        leaf in mutated(vec![certs().leaf.clone(), certs().ca.clone()]),
        intermediate in mutated(vec![certs().ca.clone()]),
    ) {
        let bundle = good_bundle();
        bounded("check_leaf", leaf.len(), || check_leaf(&leaf)).ok();
        bounded("check_signing_cert", intermediate.len(), || check_signing_cert(&intermediate)).ok();
        let chain = [leaf.clone(), intermediate.clone()];
        if let Ok(v) = bounded("verify_chain", leaf.len() + intermediate.len(), || {
            verify_chain(&chain, &bundle, NOW)
        }) {
            // Only an ID the bundle's trust domain owns is ever verified.
            prop_assert!(v.spiffe_id.is_member_of(&td()));
        }
    }
}

/// An ES256 token signed by a fixed P-256 key, the key set that verifies it, and a JWKS
/// with keys of every type.
struct Jose {
    token: String,
    keys: carapace_core::jose::KeySet,
    jwks: String,
    der_signature: Vec<u8>,
}

fn jose() -> &'static Jose {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use carapace_core::jose::{KeySet, PublicKey, ecdsa_der_to_fixed};
    static J: OnceLock<Jose> = OnceLock::new();
    J.get_or_init(|| {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let key = |kp: &KeyPair| {
            PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(kp)).unwrap()
        };
        let mut keys = KeySet::new();
        keys.insert("k1", key(&kp)).unwrap();
        let input = format!(
            "{}.{}",
            B64.encode(br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#),
            B64.encode(format!(
                r#"{{"sub":"spiffe://example.org/w","aud":["a","b"],"exp":{}}}"#,
                NOW + 300
            ))
        );
        let der = rcgen::SigningKey::sign(&kp, input.as_bytes()).unwrap();
        let token = format!(
            "{input}.{}",
            B64.encode(ecdsa_der_to_fixed(&der, 32).unwrap())
        );
        let mut all = keys.clone();
        all.insert("k2", key(&p384)).unwrap();
        let jwks = all.to_jwks("jwt-svid").to_string();
        Jose {
            token,
            keys,
            jwks,
            der_signature: der,
        }
    })
}

fn jose_policy() -> carapace_core::jose::Policy<'static> {
    use carapace_core::jose::{Algorithm, Policy};
    let mut p = Policy::new(
        &Algorithm::ALL,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOW),
        std::time::Duration::from_secs(30),
    );
    p.audience = Some("a");
    p
}

#[test]
fn the_jose_seeds_are_valid() {
    use carapace_core::jose::{Algorithm, KeySet, verify};
    let j = jose();
    verify(&j.token, &j.keys, &jose_policy()).unwrap();
    assert_eq!(
        KeySet::from_jwks_json(j.jwks.as_bytes(), &Algorithm::ALL)
            .unwrap()
            .len(),
        2
    );
}

proptest! {
    #![proptest_config(config(1000))]

    /// Tokens: never a panic, the allocation bound, and only the genuine token verifies.
    #[test]
    fn jwt_verify_never_panics_and_only_the_genuine_token_verifies(input in prop_oneof![
        1 => "\\PC{0,200}",
        8 => mutated_text(vec![jose().token.clone()]),
    ]) {
        use carapace_core::jose::{MAX_TOKEN_BYTES, unverified_claims, verify};
        let j = jose();
        let result = bounded("jose::verify", input.len(), || verify(&input, &j.keys, &jose_policy()));
        bounded("jose::unverified_claims", input.len(), || unverified_claims(&input, MAX_TOKEN_BYTES)).ok();
        if result.is_ok() {
            prop_assert_eq!(&input, &j.token);
        }
    }

    /// JWKS: never a panic, the allocation bound, and an accepted set re-serialises to a
    /// JWKS that parses back to the same set.
    #[test]
    fn jwks_never_panic_and_round_trip(input in prop_oneof![
        1 => "\\PC{0,200}",
        8 => mutated_text(vec![jose().jwks.clone()]),
    ]) {
        use carapace_core::jose::{Algorithm, KeySet};
        let parsed = bounded("jose::KeySet", input.len(), || KeySet::from_jwks_json(input.as_bytes(), &Algorithm::ALL));
        if let Ok(set) = parsed {
            let again = KeySet::from_jwks_json(set.to_jwks("sig").to_string().as_bytes(), &Algorithm::ALL).unwrap();
            prop_assert_eq!(again, set);
        }
    }

    /// DER ECDSA signatures from a key manager: never a panic; what converts is r||s.
    #[test]
    fn ecdsa_der_conversion_never_panics(input in prop_oneof![
        1 => bytes(120),
        8 => mutated(vec![jose().der_signature.clone()]),
    ]) {
        if let Ok(fixed) = bounded("ecdsa_der_to_fixed", input.len(), || carapace_core::jose::ecdsa_der_to_fixed(&input, 32)) {
            prop_assert_eq!(fixed.len(), 64);
        }
    }
}
