#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! Property tests of the TPM structures a `tpm` agent sends: TPMT_PUBLIC (EK, AK, agent
//! key), TPMS_ATTEST (quote, certification), TPMT_SIGNATURE, and the JSON messages. No TPM
//! is needed: the AK is a software P-256 key, so mutated attestation structures are signed
//! again and reach the parsing behind the signature check. Properties: no panic, the
//! allocation bound, and strict re-marshalling (what is accepted is exactly what
//! re-encodes).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use carapace_attestor_tpm::verify::{
    certificates_from_pem_or_der, check_agent_key, check_ak, name_of, parse_pcr_values,
    parse_public, public_key_spki_der, verify_certify, verify_quote,
};
use carapace_attestor_tpm::wire::{self, Challenge, Payload, PcrSelection, Response};
use carapace_fuzzkit::proptest;
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, bytes, config, mutated, mutated_text};
use p256::ecdsa::signature::Signer as _;
use sha2::{Digest as _, Sha256};
use tss_esapi::structures::{Attest, Signature};
use tss_esapi::traits::{Marshall, UnMarshall};

const NONCE: [u8; 32] = [7; 32];
const PCRS: [u8; 2] = [0, 7];

fn tpm2b(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A marshalled ECC NIST P-256 TPMT_PUBLIC (ECDSA-SHA256, nameAlg SHA-256) with these
/// object attributes and point.
fn ecc_public(attributes: u32, key: &p256::ecdsa::VerifyingKey) -> Vec<u8> {
    let point = key.to_encoded_point(false);
    let mut v = Vec::new();
    v.extend_from_slice(&0x0023u16.to_be_bytes()); // TPM_ALG_ECC
    v.extend_from_slice(&0x000bu16.to_be_bytes()); // nameAlg SHA-256
    v.extend_from_slice(&attributes.to_be_bytes());
    tpm2b(&mut v, &[]); // authPolicy
    v.extend_from_slice(&0x0010u16.to_be_bytes()); // symmetric: TPM_ALG_NULL
    v.extend_from_slice(&0x0018u16.to_be_bytes()); // scheme: ECDSA
    v.extend_from_slice(&0x000bu16.to_be_bytes()); // ... with SHA-256
    v.extend_from_slice(&0x0003u16.to_be_bytes()); // TPM_ECC_NIST_P256
    v.extend_from_slice(&0x0010u16.to_be_bytes()); // kdf: TPM_ALG_NULL
    tpm2b(&mut v, point.x().unwrap());
    tpm2b(&mut v, point.y().unwrap());
    v
}

/// A marshalled RSA-2048 storage-key TPMT_PUBLIC, the shape of a TCG default EK.
fn rsa_ek_public() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0001u16.to_be_bytes()); // TPM_ALG_RSA
    v.extend_from_slice(&0x000bu16.to_be_bytes());
    v.extend_from_slice(&0x0003_00b2u32.to_be_bytes());
    tpm2b(&mut v, &[0x83; 32]); // authPolicy
    v.extend_from_slice(&0x0006u16.to_be_bytes()); // AES
    v.extend_from_slice(&128u16.to_be_bytes());
    v.extend_from_slice(&0x0043u16.to_be_bytes()); // CFB
    v.extend_from_slice(&0x0010u16.to_be_bytes()); // scheme NULL
    v.extend_from_slice(&2048u16.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes()); // exponent: default
    let mut modulus = vec![0xc5; 256];
    modulus[255] |= 1;
    tpm2b(&mut v, &modulus);
    v
}

/// restricted | sign | fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth.
const AK_ATTRIBUTES: u32 = 0x0005_0072;
/// sign | fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth.
const AGENT_KEY_ATTRIBUTES: u32 = 0x0004_0072;

struct Keys {
    ak: p256::ecdsa::SigningKey,
    ak_public: Vec<u8>,
    agent_public: Vec<u8>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let ak = p256::ecdsa::SigningKey::from_slice(&[0x11; 32]).unwrap();
        let agent = p256::ecdsa::SigningKey::from_slice(&[0x22; 32]).unwrap();
        Keys {
            ak_public: ecc_public(AK_ATTRIBUTES, ak.verifying_key()),
            agent_public: ecc_public(AGENT_KEY_ATTRIBUTES, agent.verifying_key()),
            ak,
        }
    })
}

fn pcr_values() -> BTreeMap<u8, Vec<u8>> {
    PCRS.iter().map(|i| (*i, vec![*i; 32])).collect()
}

/// The common head of a TPMS_ATTEST of `kind`, signed by the AK, over `NONCE`.
fn attest_head(kind: u16) -> Vec<u8> {
    let mut v = 0xff54_4347u32.to_be_bytes().to_vec(); // TPM_GENERATED_VALUE
    v.extend_from_slice(&kind.to_be_bytes());
    let ak = parse_public(&keys().ak_public).unwrap();
    tpm2b(&mut v, &name_of(&ak).unwrap()); // qualifiedSigner
    tpm2b(&mut v, &NONCE); // extraData
    v.extend_from_slice(&1_000_000u64.to_be_bytes()); // clock
    v.extend_from_slice(&3u32.to_be_bytes()); // resetCount
    v.extend_from_slice(&1u32.to_be_bytes()); // restartCount
    v.push(1); // safe
    v.extend_from_slice(&0x2023_0000_0001u64.to_be_bytes()); // firmwareVersion
    v
}

/// A TPMS_ATTEST quote over sha256 PCRs 0 and 7 with [`pcr_values`].
fn quote() -> Vec<u8> {
    let mut v = attest_head(0x8018);
    v.extend_from_slice(&1u32.to_be_bytes()); // one bank
    v.extend_from_slice(&0x000bu16.to_be_bytes());
    v.push(3);
    v.extend_from_slice(&[0b1000_0001, 0, 0]); // PCRs 0 and 7
    let digest = Sha256::digest(pcr_values().values().flatten().copied().collect::<Vec<_>>());
    tpm2b(&mut v, &digest);
    v
}

/// A TPMS_ATTEST certification of the agent key.
fn certification() -> Vec<u8> {
    let mut v = attest_head(0x8017);
    let agent = parse_public(&keys().agent_public).unwrap();
    tpm2b(&mut v, &name_of(&agent).unwrap()); // name
    tpm2b(&mut v, &[0x40, 0x00, 0x00, 0x07]); // qualifiedName (any)
    v
}

/// The AK's marshalled TPMT_SIGNATURE (ECDSA, SHA-256) over `attest`.
fn sign(attest: &[u8]) -> Vec<u8> {
    let sig: p256::ecdsa::Signature = keys().ak.sign(attest);
    let (r, s) = sig.split_bytes();
    let mut v = 0x0018u16.to_be_bytes().to_vec();
    v.extend_from_slice(&0x000bu16.to_be_bytes());
    tpm2b(&mut v, &r);
    tpm2b(&mut v, &s);
    v
}

fn quote_result(attest: &[u8], signature: &[u8]) -> Result<(), String> {
    let ak = parse_public(&keys().ak_public).unwrap();
    verify_quote(&ak, attest, signature, &NONCE, &PCRS, &pcr_values())
        .map(drop)
        .map_err(|e| e.to_string())
}

fn certify_result(attest: &[u8], signature: &[u8]) -> Result<(), String> {
    let ak = parse_public(&keys().ak_public).unwrap();
    let agent = parse_public(&keys().agent_public).unwrap();
    verify_certify(&ak, &agent, attest, signature, &NONCE).map_err(|e| e.to_string())
}

#[test]
fn the_seeds_are_valid() {
    let ak = parse_public(&keys().ak_public).unwrap();
    check_ak(&ak).unwrap();
    let agent = parse_public(&keys().agent_public).unwrap();
    check_agent_key(&agent).unwrap();
    let ek = parse_public(&rsa_ek_public()).unwrap();
    public_key_spki_der(&ek).unwrap();
    quote_result(&quote(), &sign(&quote())).unwrap();
    certify_result(&certification(), &sign(&certification())).unwrap();
    // The hand-made structures are what tss-esapi encodes.
    assert_eq!(
        Attest::unmarshall(&quote()).unwrap().marshall().unwrap(),
        quote()
    );
    let sig = sign(&quote());
    assert_eq!(
        Signature::unmarshall(&sig).unwrap().marshall().unwrap(),
        sig
    );
}

fn public_seeds() -> Vec<Vec<u8>> {
    let template = carapace_attestor_tpm::device::signing_key_template()
        .unwrap()
        .marshall()
        .unwrap();
    vec![
        keys().ak_public.clone(),
        keys().agent_public.clone(),
        rsa_ek_public(),
        template,
    ]
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn tpmt_public_parsing_is_strict_and_never_panics(input in prop_oneof![
        1 => bytes(120),
        6 => mutated(public_seeds()),
    ]) {
        let parsed = bounded("TPMT_PUBLIC", input.len(), || parse_public(&input));
        if let Ok(public) = parsed {
            // Strict re-marshalling: accepted ⇒ marshal(parse(b)) == b.
            prop_assert_eq!(public.marshall().unwrap(), input.clone());
            let _ = bounded("public checks", input.len(), || {
                (name_of(&public).is_ok(), public_key_spki_der(&public).is_ok(),
                 check_ak(&public).is_ok(), check_agent_key(&public).is_ok())
            });
        }
    }

    #[test]
    fn quotes_are_strict_and_never_panic(
        attest in prop_oneof![1 => bytes(200), 6 => mutated(vec![quote(), certification()])],
    ) {
        // Signed again, so the parser behind the signature check sees the mutation.
        let signature = sign(&attest);
        let result = bounded("quote", attest.len(), || quote_result(&attest, &signature));
        if result.is_ok() {
            let parsed = Attest::unmarshall(&attest).unwrap();
            prop_assert_eq!(parsed.marshall().unwrap(), attest.clone());
            // Only the challenge's nonce and exactly the quoted values pass.
            prop_assert_eq!(parsed.extra_data().value(), &NONCE[..]);
            prop_assert_eq!(&attest[..6], &quote()[..6]);
            prop_assert!(attest.ends_with(&quote()[quote().len() - 42..]));
        }
    }

    #[test]
    fn certifications_are_strict_and_never_panic(
        attest in prop_oneof![1 => bytes(200), 6 => mutated(vec![certification(), quote()])],
    ) {
        let signature = sign(&attest);
        let result = bounded("certify", attest.len(), || certify_result(&attest, &signature));
        if result.is_ok() {
            prop_assert_eq!(Attest::unmarshall(&attest).unwrap().marshall().unwrap(), attest.clone());
        }
    }

    #[test]
    fn tpmt_signatures_are_strict_and_never_panic(
        signature in prop_oneof![1 => bytes(120), 6 => mutated(vec![sign(&quote())])],
    ) {
        let result = bounded("quote signature", signature.len(), || quote_result(&quote(), &signature));
        if result.is_ok() {
            prop_assert_eq!(Signature::unmarshall(&signature).unwrap().marshall().unwrap(), signature.clone());
        }
        let _ = bounded("certify signature", signature.len(), || {
            certify_result(&certification(), &signature)
        });
    }

    #[test]
    fn pcr_values_and_certificate_files_never_panic(
        values in proptest::collection::btree_map(any::<u8>(), "(0x)?[0-9a-fA-F]{62,66}|\\PC{0,8}", 0..4),
        file in prop_oneof![bytes(300), mutated(vec![b"\x30\x82\x01\x00".to_vec()])],
    ) {
        if let Ok(parsed) = parse_pcr_values(&values) {
            prop_assert!(parsed.values().all(|v| v.len() == 32));
        }
        let _ = bounded("certificate file", file.len(), || certificates_from_pem_or_der(&file));
    }
}

fn message_seeds() -> Vec<String> {
    let payload = Payload {
        version: 1,
        ek_cert: vec![0x30, 0x03, 1, 2, 3],
        ek_intermediates: vec![vec![0x30, 0]],
        ek_public: rsa_ek_public(),
        ak_public: keys().ak_public.clone(),
        agent_key_public: Some(keys().agent_public.clone()),
    };
    let challenge = Challenge {
        version: 1,
        credential_blob: vec![1; 50],
        encrypted_secret: vec![2; 64],
        nonce: NONCE.to_vec(),
        pcr_selection: PcrSelection {
            hash: "sha256".into(),
            pcrs: PCRS.to_vec(),
        },
        event_log: false,
    };
    let response = Response {
        version: 1,
        activated_secret: vec![3; 32],
        quote: quote(),
        quote_signature: sign(&quote()),
        pcr_values: PCRS.iter().map(|i| (*i, hex::encode([*i; 32]))).collect(),
        agent_key_certify: Some(certification()),
        agent_key_certify_signature: Some(sign(&certification())),
        event_log: None,
    };
    [
        wire::encode(&payload),
        wire::encode(&challenge),
        wire::encode(&response),
    ]
    .into_iter()
    .map(|b| String::from_utf8(b).unwrap())
    .collect()
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn wire_messages_never_panic_and_round_trip(text in mutated_text(message_seeds())) {
        let input = text.as_bytes();
        if let Ok(m) = bounded("Payload", input.len(), || wire::decode::<Payload>("payload", input)) {
            prop_assert_eq!(wire::decode::<Payload>("payload", &wire::encode(&m)).unwrap(), m);
        }
        if let Ok(m) = bounded("Challenge", input.len(), || wire::decode::<Challenge>("challenge", input)) {
            prop_assert_eq!(wire::decode::<Challenge>("challenge", &wire::encode(&m)).unwrap(), m);
        }
        if let Ok(m) = bounded("Response", input.len(), || wire::decode::<Response>("response", input)) {
            prop_assert_eq!(wire::decode::<Response>("response", &wire::encode(&m)).unwrap(), m);
        }
    }
}
