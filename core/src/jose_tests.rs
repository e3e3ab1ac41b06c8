#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
//! Tests of [`super`]: sign/verify round trips with real keys, every refusal, key
//! parsing and serialisation.

use super::*;
use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
use rsa::traits::PublicKeyParts as _;
use serde_json::json;
use std::sync::OnceLock;
use std::time::UNIX_EPOCH;

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// A software KeySigner with the key manager contract: DER ECDSA, PKCS#1 v1.5 RSA.
#[derive(Debug)]
enum TestSigner {
    Ec(KeyType, Box<rcgen::KeyPair>, Vec<u8>),
    Rsa(Vec<u8>, Vec<u8>),
}

impl KeySigner for TestSigner {
    fn id(&self) -> &str {
        "test"
    }
    fn key_type(&self) -> KeyType {
        match self {
            TestSigner::Ec(kt, ..) => *kt,
            TestSigner::Rsa(..) => KeyType::Rsa2048,
        }
    }
    fn public_key_der(&self) -> &[u8] {
        match self {
            TestSigner::Ec(_, _, spki) | TestSigner::Rsa(_, spki) => spki,
        }
    }
    fn sign(&self, alg: SignatureAlgorithm, message: &[u8]) -> Result<Vec<u8>, Error> {
        assert_eq!(alg, self.key_type().x509_algorithm());
        match self {
            TestSigner::Ec(_, kp, _) => Ok(rcgen::SigningKey::sign(kp.as_ref(), message).unwrap()),
            TestSigner::Rsa(pkcs8, _) => {
                Ok(rsa_sign(pkcs8, &ring::signature::RSA_PKCS1_SHA256, message))
            }
        }
    }
    fn may_block(&self) -> bool {
        false
    }
    fn concurrency(&self) -> Option<usize> {
        None
    }
}

fn rsa_sign(
    pkcs8: &[u8],
    alg: &'static dyn ring::signature::RsaEncoding,
    message: &[u8],
) -> Vec<u8> {
    let kp = ring::signature::RsaKeyPair::from_pkcs8(pkcs8).unwrap();
    let mut sig = vec![0; kp.public().modulus_len()];
    kp.sign(alg, &ring::rand::SystemRandom::new(), message, &mut sig)
        .unwrap();
    sig
}

fn ec_signer(kt: KeyType) -> TestSigner {
    let alg = match kt {
        KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        _ => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
    TestSigner::Ec(kt, Box::new(kp), spki)
}

/// One RSA-2048 key for the module's tests.
fn rsa_signer() -> &'static TestSigner {
    static KEY: OnceLock<TestSigner> = OnceLock::new();
    KEY.get_or_init(|| {
        let sk = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        TestSigner::Rsa(
            sk.to_pkcs8_der().unwrap().as_bytes().to_vec(),
            sk.to_public_key().to_public_key_der().unwrap().into_vec(),
        )
    })
}

fn p256() -> &'static TestSigner {
    static KEY: OnceLock<TestSigner> = OnceLock::new();
    KEY.get_or_init(|| ec_signer(KeyType::EcP256))
}

fn key_of(signer: &dyn KeySigner) -> PublicKey {
    PublicKey::from_spki_der(signer.public_key_der()).unwrap()
}

fn set_of(signers: &[(&str, &dyn KeySigner)]) -> KeySet {
    let mut set = KeySet::new();
    for (kid, s) in signers {
        set.insert(kid, key_of(*s)).unwrap();
    }
    set
}

const NOW: u64 = 1_700_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn claims(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn good_claims() -> Map<String, Value> {
    claims(json!({"sub": "spiffe://example.org/w", "aud": ["a"], "exp": NOW + 300, "iat": NOW}))
}

const ALL: &[Algorithm] = &Algorithm::ALL;

fn policy() -> Policy<'static> {
    Policy::new(ALL, now(), Duration::from_secs(30))
}

/// A token with any header, signed by `signer` with `alg`'s JOSE form.
fn forge(header: &Value, claims: &Value, signer: &TestSigner) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let der = signer
        .sign(signer.key_type().x509_algorithm(), input.as_bytes())
        .unwrap();
    let sig = match signer.key_type() {
        KeyType::EcP256 => ecdsa_der_to_fixed(&der, 32).unwrap(),
        KeyType::EcP384 => ecdsa_der_to_fixed(&der, 48).unwrap(),
        KeyType::Rsa2048 => der,
    };
    format!("{input}.{}", b64(&sig))
}

fn refused(token: &str, set: &KeySet, policy: &Policy<'_>) -> String {
    verify(token, set, policy).unwrap_err().to_string()
}

#[test]
fn signed_tokens_verify_for_es256_es384_and_rs256() {
    let p384 = ec_signer(KeyType::EcP384);
    for (signer, alg) in [(p256(), "ES256"), (&p384, "ES384"), (rsa_signer(), "RS256")] {
        let token = sign(None, &good_claims(), signer).unwrap();
        let parts = split(&token, MAX_TOKEN_BYTES).unwrap();
        let header: Value = serde_json::from_slice(&parts.header).unwrap();
        let kid = key_of(signer).thumbprint();
        assert_eq!(header, json!({"alg": alg, "kid": kid, "typ": "JWT"}));
        let set = set_of(&[(&kid, signer)]);
        let got = verify(&token, &set, &policy()).unwrap();
        assert_eq!(got.as_map(), &good_claims());
        // An explicit kid is used as given.
        let token = sign(Some("k"), &good_claims(), signer).unwrap();
        assert!(verify(&token, &set_of(&[("k", signer)]), &policy()).is_ok());
        // The policy's allowlist decides: the same token without its algorithm allowed.
        let others: Vec<Algorithm> = ALL.iter().copied().filter(|a| a.name() != alg).collect();
        let err = refused(
            &token,
            &set_of(&[("k", signer)]),
            &Policy::new(&others, now(), Duration::ZERO),
        );
        assert!(
            err.contains(&format!("algorithm is \"{alg}\"; only")),
            "{err}"
        );
    }
}

#[test]
fn rsa_pss_and_other_rsa_hashes_verify() {
    let TestSigner::Rsa(pkcs8, _) = rsa_signer() else {
        unreachable!()
    };
    let set = set_of(&[("r", rsa_signer())]);
    for (alg, enc) in [
        (
            "PS256",
            &ring::signature::RSA_PSS_SHA256 as &'static dyn ring::signature::RsaEncoding,
        ),
        ("PS512", &ring::signature::RSA_PSS_SHA512),
        ("RS384", &ring::signature::RSA_PKCS1_SHA384),
    ] {
        let input = format!(
            "{}.{}",
            b64(json!({"alg": alg, "kid": "r"}).to_string().as_bytes()),
            b64(Value::Object(good_claims()).to_string().as_bytes())
        );
        let token = format!("{input}.{}", b64(&rsa_sign(pkcs8, enc, input.as_bytes())));
        assert!(verify(&token, &set, &policy()).is_ok(), "{alg}");
    }
}

#[test]
fn none_and_hmac_are_refused_by_name() {
    let set = set_of(&[("k", rsa_signer())]);
    let payload = b64(Value::Object(good_claims()).to_string().as_bytes());
    let none = format!("{}.{payload}.", b64(br#"{"alg":"none","kid":"k"}"#));
    let err = refused(&none, &set, &policy());
    assert!(
        err.contains("algorithm is \"none\"; only RS256, RS384"),
        "{err}"
    );
    // The confusion attack: HS256 keyed with the public key the verifier holds.
    let header = b64(br#"{"alg":"HS256","kid":"k","typ":"JWT"}"#);
    let input = format!("{header}.{payload}");
    for secret in [rsa_signer().public_key_der().to_vec(), {
        let PublicKey::Rsa { n, .. } = key_of(rsa_signer()) else {
            unreachable!()
        };
        n
    }] {
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            input.as_bytes(),
        );
        let token = format!("{input}.{}", b64(mac.as_ref()));
        let err = refused(&token, &set, &policy());
        assert!(err.contains("algorithm is \"HS256\"; only"), "{err}");
    }
}

#[test]
fn the_algorithm_must_match_the_key_type() {
    let p384 = ec_signer(KeyType::EcP384);
    let set = set_of(&[("ec", p256()), ("rsa", rsa_signer()), ("p384", &p384)]);
    let c = Value::Object(good_claims());
    // An RS256 header naming an EC key (signed by the EC key, so only the type differs).
    let t = forge(&json!({"alg": "RS256", "kid": "ec"}), &c, p256());
    let err = refused(&t, &set, &policy());
    assert!(
        err.contains("algorithm RS256 does not match key \"ec\", a P-256 key"),
        "{err}"
    );
    let t = forge(&json!({"alg": "ES256", "kid": "rsa"}), &c, rsa_signer());
    let err = refused(&t, &set, &policy());
    assert!(
        err.contains("algorithm ES256 does not match key \"rsa\", an RSA key"),
        "{err}"
    );
    let t = forge(&json!({"alg": "ES384", "kid": "ec"}), &c, p256());
    assert!(refused(&t, &set, &policy()).contains("does not match key \"ec\""));
    let t = forge(&json!({"alg": "ES256", "kid": "p384"}), &c, &p384);
    assert!(refused(&t, &set, &policy()).contains("a P-384 key"));
    // Control: the right pairing verifies.
    assert!(
        verify(
            &forge(&json!({"alg": "ES384", "kid": "p384"}), &c, &p384),
            &set,
            &policy()
        )
        .is_ok()
    );
}

#[test]
fn the_kid_is_required_and_must_be_known() {
    let set = set_of(&[("k", p256())]);
    let c = Value::Object(good_claims());
    for (header, want) in [
        (json!({"alg": "ES256"}), "no \"kid\""),
        (json!({"alg": "ES256", "kid": 7}), "\"kid\" is not a string"),
        (
            json!({"alg": "ES256", "kid": "other"}),
            "key \"other\", which is not among the configured keys (k)",
        ),
        (
            json!({"alg": "ES256", "kid": "k", "crit": ["exp"]}),
            "\"crit\"",
        ),
        (json!({"kid": "k"}), "no \"alg\""),
        (json!({"alg": 1, "kid": "k"}), "\"alg\" is not a string"),
    ] {
        let err = refused(&forge(&header, &c, p256()), &set, &policy());
        assert!(err.contains(want), "{header}: {err}");
    }
}

#[test]
fn a_bad_signature_is_refused() {
    let set = set_of(&[("k", p256()), ("other", rsa_signer())]);
    let t = sign(Some("k"), &good_claims(), p256()).unwrap();
    let (input, sig) = t.rsplit_once('.').unwrap();
    // Another claim set under the same signature.
    let (header, _) = input.split_once('.').unwrap();
    let mut c = good_claims();
    c.insert("sub".into(), json!("spiffe://example.org/admin"));
    let forged = format!(
        "{header}.{}.{sig}",
        b64(Value::Object(c).to_string().as_bytes())
    );
    assert!(refused(&forged, &set, &policy()).contains("signature does not verify with key \"k\""));
    // Another P-256 key's signature.
    let t2 = sign(Some("k"), &good_claims(), &ec_signer(KeyType::EcP256)).unwrap();
    assert!(refused(&t2, &set, &policy()).contains("does not verify"));
    // A DER signature instead of r||s.
    let der = p256()
        .sign(SignatureAlgorithm::EcdsaP256Sha256, input.as_bytes())
        .unwrap();
    let t3 = format!("{input}.{}", b64(&der));
    assert!(refused(&t3, &set, &policy()).contains("does not verify"));
}

#[test]
fn times_are_checked_with_leeway() {
    let set = set_of(&[("k", p256())]);
    let t = |c: Value| sign(Some("k"), &claims(c), p256()).unwrap();
    let ok = |c: Value| verify(&t(c), &set, &policy());
    assert!(ok(json!({"exp": NOW - 30})).is_ok());
    assert!(
        ok(json!({"exp": NOW - 31}))
            .unwrap_err()
            .to_string()
            .contains("expired at")
    );
    assert!(
        ok(json!({"sub": "x"}))
            .unwrap_err()
            .to_string()
            .contains("no \"exp\"")
    );
    assert!(
        ok(json!({"exp": NOW + 10, "nbf": NOW + 31}))
            .unwrap_err()
            .to_string()
            .contains("not valid before")
    );
    assert!(ok(json!({"exp": NOW + 10, "nbf": NOW + 30})).is_ok());
    assert!(
        ok(json!({"exp": NOW + 10, "iat": NOW + 31}))
            .unwrap_err()
            .to_string()
            .contains("issued in the future")
    );
    assert!(
        ok(json!({"exp": "later"}))
            .unwrap_err()
            .to_string()
            .contains("not a number")
    );
    // Without leeway, one second late is expired.
    let strict = Policy::new(ALL, now(), Duration::ZERO);
    assert!(verify(&t(json!({"exp": NOW - 1})), &set, &strict).is_err());
    assert!(verify(&t(json!({"exp": NOW})), &set, &strict).is_ok());
}

#[test]
fn audience_and_issuer_are_checked_when_asked() {
    let set = set_of(&[("k", p256())]);
    let t = |c: Value| sign(Some("k"), &claims(c), p256()).unwrap();
    let mut p = policy();
    p.audience = Some("a");
    for good in [json!("a"), json!(["x", "a"])] {
        assert!(
            verify(&t(json!({"exp": NOW + 9, "aud": good})), &set, &p).is_ok(),
            "{good}"
        );
    }
    for (bad, shown) in [
        (json!("ab"), "\"ab\""),
        (json!(["x", ["a"]]), "\"[\\\"x\\\",[\\\"a\\\"]]\""),
        (json!(1), "(not a string)"),
        (json!(null), "(not a string)"),
    ] {
        let err = refused(&t(json!({"exp": NOW + 9, "aud": bad})), &set, &p);
        assert!(
            err.contains(&format!("audience {shown}")) && err.contains("does not include \"a\""),
            "{err}"
        );
    }
    let err = refused(&t(json!({"exp": NOW + 9})), &set, &p);
    assert!(err.contains("audience (none) does not include"), "{err}");
    // Without an audience in the policy, any aud passes.
    assert!(verify(&t(json!({"exp": NOW + 9, "aud": "b"})), &set, &policy()).is_ok());
    p.audience = None;
    p.issuer = Some("https://issuer");
    assert!(
        verify(
            &t(json!({"exp": NOW + 9, "iss": "https://issuer"})),
            &set,
            &p
        )
        .is_ok()
    );
    assert!(
        refused(
            &t(json!({"exp": NOW + 9, "iss": "https://other"})),
            &set,
            &p
        )
        .contains("issuer is \"https://other\", not")
    );
    assert!(refused(&t(json!({"exp": NOW + 9})), &set, &p).contains("no \"iss\""));
}

#[test]
fn malformed_tokens_are_refused_naming_the_part() {
    let set = set_of(&[("k", p256())]);
    let t = sign(Some("k"), &good_claims(), p256()).unwrap();
    let (a, rest) = t.split_once('.').unwrap();
    let (b, c) = rest.split_once('.').unwrap();
    let not_object = b64(b"[1]");
    let not_json = b64(b"{\"alg\":");
    let dup = b64(br#"{"alg":"ES256","kid":"k","alg":"none"}"#);
    for (bad, want) in [
        (format!("{a}.{b}"), "2 dot-separated parts"),
        (format!("{a}.{b}.{c}.{c}"), "4 dot-separated parts"),
        (String::new(), "1 dot-separated parts"),
        (format!("{a}=.{b}.{c}"), "header is not unpadded base64url"),
        (format!("{a}.{b}*.{c}"), "payload is not unpadded base64url"),
        (
            format!("{a}.{b}.{c}="),
            "signature is not unpadded base64url",
        ),
        (
            format!("{not_object}.{b}.{c}"),
            "header is not a JSON object",
        ),
        (format!("{not_json}.{b}.{c}"), "header is not JSON"),
        (
            format!("{dup}.{b}.{c}"),
            "header: the member \"alg\" appears twice",
        ),
        (
            format!("{}.{b}.{c}", "a".repeat(MAX_TOKEN_BYTES)),
            "more than the 16384 accepted",
        ),
    ] {
        let err = refused(&bad, &set, &policy());
        assert!(err.contains(want), "{want}: {err}");
    }
    // A smaller cap in the policy.
    let mut p = policy();
    p.max_token_bytes = t.len() - 1;
    assert!(refused(&t, &set, &p).contains("more than the"));
    // Claims with a repeated member are refused even when the signature is good.
    let dup_claims = format!("{{\"exp\":{},\"sub\":\"a\",\"sub\":\"b\"}}", NOW + 9);
    let input = format!("{a}.{}", b64(dup_claims.as_bytes()));
    let der = p256()
        .sign(SignatureAlgorithm::EcdsaP256Sha256, input.as_bytes())
        .unwrap();
    let token = format!("{input}.{}", b64(&ecdsa_der_to_fixed(&der, 32).unwrap()));
    assert!(refused(&token, &set, &policy()).contains("payload: the member \"sub\" appears twice"));
}

#[test]
fn der_signatures_become_fixed_width_r_and_s() {
    // r = 1 (one byte), s with its sign-padding zero and 32 significant bytes.
    let mut s = vec![0x00];
    s.extend([0x80; 32]);
    let mut der = vec![
        0x30,
        (3 + 2 + s.len()) as u8,
        0x02,
        0x01,
        0x01,
        0x02,
        s.len() as u8,
    ];
    der.extend(&s);
    let fixed = ecdsa_der_to_fixed(&der, 32).unwrap();
    let mut want = vec![0; 31];
    want.push(1);
    want.extend([0x80; 32]);
    assert_eq!(fixed, want);
    // P-384 width, with a long-form sequence length (0x81).
    let r = [0x7f; 48];
    let mut der = vec![0x30, 0x81, 2 + 48 + 2 + 2, 0x02, 48];
    der.extend(r);
    der.extend([0x02, 2, 0x01, 0x02]);
    let fixed = ecdsa_der_to_fixed(&der, 48).unwrap();
    assert_eq!(&fixed[..48], &r);
    assert_eq!(&fixed[48..94], &[0; 46]);
    assert_eq!(&fixed[94..], &[1, 2]);
    for bad in [
        &[][..],
        &[0x30, 0x00],
        &[0x30, 0x03, 0x02, 0x01, 0x01],
        &[0x30, 0x06, 0x02, 0x01, 0x81, 0x02, 0x01, 0x01], // negative r
        &[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x00], // trailing byte
        &[0x31, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
        &[0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x01], // r = 0
    ] {
        assert!(ecdsa_der_to_fixed(bad, 32).is_err(), "{bad:?}");
    }
    // 33 significant bytes do not fit P-256.
    let mut der = vec![0x30, 2 + 33 + 3, 0x02, 33];
    der.extend([0x01; 33]);
    der.extend([0x02, 1, 1]);
    assert!(ecdsa_der_to_fixed(&der, 32).is_err());
    // Many real signatures (some have short r or s) all verify after conversion.
    let set = set_of(&[("k", p256())]);
    for i in 0..300 {
        let mut c = good_claims();
        c.insert("i".into(), json!(i));
        assert!(verify(&sign(Some("k"), &c, p256()).unwrap(), &set, &policy()).is_ok());
    }
}

#[test]
fn keys_round_trip_through_jwk_and_jwks() {
    let p384 = ec_signer(KeyType::EcP384);
    let signers: [&TestSigner; 3] = [p256(), &p384, rsa_signer()];
    let mut set = KeySet::new();
    for s in signers {
        let key = key_of(s);
        let jwk = key.to_jwk(&key.thumbprint(), "jwt-svid");
        assert_eq!(jwk["use"], "jwt-svid");
        assert_eq!(PublicKey::from_jwk(&jwk).unwrap(), key);
        set.insert(&key.thumbprint(), key).unwrap();
    }
    for key_use in ["jwt-svid", "sig"] {
        let jwks = set.to_jwks(key_use);
        let again = KeySet::from_jwks_json(jwks.to_string().as_bytes(), ALL).unwrap();
        assert_eq!(again, set);
    }
    let jwks = set.to_jwks("sig");
    let ec = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["crv"] == "P-256")
        .unwrap();
    assert_eq!(ec["kty"], "EC");
    assert_eq!(ec["x"].as_str().unwrap().len(), 43);
    // Only the ES256 keys when only ES256 is wanted.
    let only = KeySet::from_jwks_json(jwks.to_string().as_bytes(), &[Algorithm::ES256]).unwrap();
    assert_eq!(only.len(), 1);
}

#[test]
fn thumbprints_follow_rfc_7638() {
    // RFC 7638 3.1 hashes exactly the required members, sorted, without whitespace.
    let key = key_of(p256());
    let PublicKey::Ec { point, .. } = &key else {
        unreachable!()
    };
    let json = format!(
        "{{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"{}\",\"y\":\"{}\"}}",
        b64(&point[1..33]),
        b64(&point[33..])
    );
    let want = b64(ring::digest::digest(&ring::digest::SHA256, json.as_bytes()).as_ref());
    assert_eq!(key.thumbprint(), want);
    let rsa = key_of(rsa_signer());
    let PublicKey::Rsa { n, e } = &rsa else {
        unreachable!()
    };
    let json = format!(
        "{{\"e\":\"{}\",\"kty\":\"RSA\",\"n\":\"{}\"}}",
        b64(e),
        b64(n)
    );
    assert_eq!(
        rsa.thumbprint(),
        b64(ring::digest::digest(&ring::digest::SHA256, json.as_bytes()).as_ref())
    );
    assert_ne!(
        key_of(p256()).thumbprint(),
        key_of(&ec_signer(KeyType::EcP256)).thumbprint()
    );
}

#[test]
fn jwks_refuse_duplicates_and_skip_what_they_cannot_use() {
    let key = key_of(p256());
    let jwk = |kid: &str, extra: Value| {
        let mut m = key.to_jwk(kid, "jwt-svid");
        m.remove("use");
        m.extend(extra.as_object().unwrap().clone());
        Value::Object(m)
    };
    let err =
        KeySet::from_jwks(&json!([jwk("a", json!({})), jwk("a", json!({}))]), ALL).unwrap_err();
    assert!(
        err.to_string()
            .contains("JWKS key 1 (kid \"a\"): the kid appears twice"),
        "{err}"
    );
    let set = KeySet::from_jwks(
        &json!([
            jwk("a", json!({})),
            jwk("enc", json!({"use": "enc"})),
            jwk("svid", json!({"use": "jwt-svid"})),
            jwk("rs", json!({"alg": "RS256"})),
            jwk("hs", json!({"alg": "HS256"})),
            jwk("wrap", json!({"key_ops": ["wrapKey"]})),
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AA"},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
        ]),
        ALL,
    )
    .unwrap();
    assert_eq!(set.kids().collect::<Vec<_>>(), ["a", "svid"]);
    for (bad, want) in [
        (json!([jwk("", json!({}))]), "no \"kid\""),
        (
            json!([jwk("x", json!({"x": "AA"}))]),
            "coordinates are 1 and 32 bytes; both must be 32",
        ),
        (
            json!([jwk("x", json!({"y": "*"}))]),
            "\"y\" is not base64url",
        ),
        (
            json!([jwk("x", json!({"crv": 5}))]),
            "\"crv\" is not a string",
        ),
        (json!([7]), "JWKS key 0: not an object"),
        (json!({}), "\"keys\" is not an array"),
    ] {
        let err = KeySet::from_jwks(&bad, ALL).unwrap_err();
        assert!(err.to_string().contains(want), "{bad}: {err}");
    }
    let zero = PublicKey::ec(Curve::P256, &[0; 32], &[0; 32]).unwrap_err();
    assert!(zero.to_string().contains("point is zero"));
    let off = PublicKey::ec(Curve::P256, &[1; 32], &[2; 32]).unwrap_err();
    assert!(
        off.to_string().contains("P-256 point is not on the curve"),
        "{off}"
    );
    let off = PublicKey::ec(Curve::P384, &[1; 48], &[2; 48]).unwrap_err();
    assert!(
        off.to_string().contains("P-384 point is not on the curve"),
        "{off}"
    );
    // A real point with one coordinate changed is no longer on the curve.
    let PublicKey::Ec { point, .. } = key_of(p256()) else {
        unreachable!()
    };
    let mut y = point[33..].to_vec();
    y[31] ^= 1;
    assert!(PublicKey::ec(Curve::P256, &point[1..33], &y).is_err());
    assert!(PublicKey::ec(Curve::P256, &point[1..33], &point[33..]).is_ok());
    assert!(KeySet::from_jwks_json(b"[]", ALL).is_err());
    assert!(
        KeySet::from_jwks_json(b"{", ALL)
            .unwrap_err()
            .to_string()
            .contains("not JSON")
    );
}

#[test]
fn spki_keys_are_read_by_type() {
    assert!(matches!(
        key_of(p256()),
        PublicKey::Ec {
            curve: Curve::P256,
            ..
        }
    ));
    assert!(matches!(
        key_of(&ec_signer(KeyType::EcP384)),
        PublicKey::Ec {
            curve: Curve::P384,
            ..
        }
    ));
    assert!(matches!(key_of(rsa_signer()), PublicKey::Rsa { .. }));
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let err =
        PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&ed)).unwrap_err();
    assert!(err.to_string().contains("neither RSA nor EC"), "{err}");
    assert!(PublicKey::from_spki_der(b"\x30\x00").is_err());
    let mut trailing = p256().public_key_der().to_vec();
    trailing.push(0);
    assert!(PublicKey::from_spki_der(&trailing).is_err());
}

#[test]
fn weak_or_odd_rsa_keys_are_refused() {
    let PublicKey::Rsa { n, e } = key_of(rsa_signer()) else {
        unreachable!()
    };
    assert!(
        PublicKey::rsa(&n[..128], &e)
            .unwrap_err()
            .to_string()
            .contains("1024 bits; at least 2048")
    );
    let mut with_zero = vec![0];
    with_zero.extend_from_slice(&n);
    assert_eq!(
        PublicKey::rsa(&with_zero, &e).unwrap(),
        key_of(rsa_signer())
    );
    for e in [&[1u8][..], &[2], &[1, 0, 0], &[1, 0, 0, 0, 0, 1]] {
        assert!(
            PublicKey::rsa(&n, e)
                .unwrap_err()
                .to_string()
                .contains("exponent"),
            "{e:?}"
        );
    }
    let mut even = n.clone();
    *even.last_mut().unwrap() &= 0xfe;
    assert!(
        PublicKey::rsa(&even, &e)
            .unwrap_err()
            .to_string()
            .contains("even")
    );
    assert!(
        PublicKey::rsa(&[0xff; 1025], &e)
            .unwrap_err()
            .to_string()
            .contains("at most 8192")
    );
    assert_eq!(bit_length(&[0x01, 0]), 9);
    assert_eq!(bit_length(&[]), 0);
}

#[test]
fn audience_may_be_a_string_or_an_array() {
    let c = |v: Value| Claims(v.as_object().unwrap().clone());
    assert!(c(json!({"aud": "a"})).has_audience("a"));
    assert!(!c(json!({"aud": "ab"})).has_audience("a"));
    assert!(c(json!({"aud": ["x", "a"]})).has_audience("a"));
    assert!(!c(json!({"aud": ["x", ["a"]]})).has_audience("a"));
    assert!(!c(json!({"aud": 1})).has_audience("1"));
    assert!(!c(json!({})).has_audience("a"));
    assert_eq!(c(json!({"aud": ["x"]})).audience_shown(), "\"[\\\"x\\\"]\"");
    assert_eq!(c(json!({"aud": "a"})).audiences(), Some(vec!["a"]));
    assert_eq!(
        c(json!({"aud": ["a", "b"]})).audiences(),
        Some(vec!["a", "b"])
    );
    assert_eq!(c(json!({"aud": ["a", 1]})).audiences(), None);
}

#[test]
fn shown_values_are_quoted_and_cut() {
    assert_eq!(shown("a\"b"), "\"a\\\"b\"");
    assert!(shown(&"x".repeat(200)).ends_with("\"…"));
}

#[test]
fn rsa_public_key_components_match_the_rsa_crate() {
    // The SPKI reader agrees with an independent parser of the same key.
    let TestSigner::Rsa(pkcs8, _) = rsa_signer() else {
        unreachable!()
    };
    use rsa::pkcs8::DecodePrivateKey as _;
    let sk = rsa::RsaPrivateKey::from_pkcs8_der(pkcs8).unwrap();
    assert_eq!(
        key_of(rsa_signer()),
        PublicKey::rsa(&sk.n().to_bytes_be(), &sk.e().to_bytes_be()).unwrap()
    );
}
