//! Keys and tokens for the JWT plugins' tests: RSA keys generated here, written as a JWKS
//! or as Google's certificate map, and tokens signed with them the way Google and
//! Microsoft sign (RS256), or deliberately not (`none`, HS256 with the public key as the
//! secret, RS512).
#![allow(dead_code, reason = "each test file uses part of it")]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
use rsa::traits::PublicKeyParts as _;
use serde_json::{Value, json};

/// An RSA key pair with its key id.
pub(crate) struct TestKey {
    /// The `kid` it is published under.
    pub(crate) kid: String,
    /// PKCS#8 DER of the private key.
    pub(crate) pkcs8: Vec<u8>,
    /// PKCS#8 PEM of the private key.
    pub(crate) pkcs8_pem: String,
    /// Modulus, big-endian.
    pub(crate) n: Vec<u8>,
    /// Public exponent, big-endian.
    pub(crate) e: Vec<u8>,
}

fn generate(kid: String, bits: usize) -> TestKey {
    let sk = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).unwrap();
    TestKey {
        kid,
        pkcs8: sk.to_pkcs8_der().unwrap().as_bytes().to_vec(),
        pkcs8_pem: sk.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        n: sk.n().to_bytes_be(),
        e: sk.e().to_bytes_be(),
    }
}

/// RSA-2048 key number `i` (0 to 3) of this test binary, with kid `kid-<i>`; generated
/// once per process.
pub(crate) fn key(i: usize) -> &'static TestKey {
    static KEYS: [OnceLock<TestKey>; 4] = [const { OnceLock::new() }; 4];
    KEYS[i].get_or_init(|| generate(format!("kid-{i}"), 2048))
}

/// An RSA-1024 key (too weak; kid `weak`).
pub(crate) fn weak_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| generate("weak".into(), 1024))
}

pub(crate) fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// `key` as a JWK, as Microsoft publishes them.
pub(crate) fn jwk(key: &TestKey) -> Value {
    json!({
        "kty": "RSA", "use": "sig", "kid": key.kid, "x5t": key.kid,
        "n": b64(&key.n), "e": b64(&key.e),
    })
}

/// A JWKS of `keys`.
pub(crate) fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| jwk(k)).collect::<Vec<_>>() }).to_string()
}

/// Google's `{kid: PEM certificate}` map of `keys`: a self-signed certificate per key.
pub(crate) fn cert_map(keys: &[&TestKey]) -> String {
    let mut map = serde_json::Map::new();
    for k in keys {
        let kp = rcgen::KeyPair::from_pem(&k.pkcs8_pem).unwrap();
        let params = rcgen::CertificateParams::new(vec!["www.googleapis.com".to_owned()]).unwrap();
        let cert = params.self_signed(&kp).unwrap();
        map.insert(k.kid.clone(), Value::String(cert.pem()));
    }
    Value::Object(map).to_string()
}

/// `b64url(header).b64url(claims)`.
pub(crate) fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn rsa_sign(key: &TestKey, alg: &'static dyn ring::signature::RsaEncoding, input: &str) -> Vec<u8> {
    let kp = ring::signature::RsaKeyPair::from_pkcs8(&key.pkcs8).unwrap();
    let mut sig = vec![0; kp.public().modulus_len()];
    kp.sign(
        alg,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    sig
}

/// An RS256 token signed by `key`, with header `{"alg":"RS256","kid":<kid>,"typ":"JWT"}`.
pub(crate) fn rs256(key: &TestKey, claims: &Value) -> String {
    let header = json!({"alg": "RS256", "kid": key.kid, "typ": "JWT"});
    rs256_with_header(key, &header, claims)
}

/// An RS256 signature by `key` over any header.
pub(crate) fn rs256_with_header(key: &TestKey, header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims);
    let sig = rsa_sign(key, &ring::signature::RSA_PKCS1_SHA256, &input);
    format!("{input}.{}", b64(&sig))
}

/// A genuine RS512 token by `key` (a hash we do not accept).
pub(crate) fn rs512(key: &TestKey, claims: &Value) -> String {
    let header = json!({"alg": "RS512", "kid": key.kid, "typ": "JWT"});
    let input = signing_input(&header, claims);
    let sig = rsa_sign(key, &ring::signature::RSA_PKCS1_SHA512, &input);
    format!("{input}.{}", b64(&sig))
}

/// An HS256 token whose HMAC key is `secret` (the confusion attack passes the verifier's
/// public key bytes).
pub(crate) fn hs256(kid: &str, secret: &[u8], claims: &Value) -> String {
    let header = json!({"alg": "HS256", "kid": kid, "typ": "JWT"});
    let input = signing_input(&header, claims);
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        input.as_bytes(),
    );
    format!("{input}.{}", b64(tag.as_ref()))
}

/// An unsecured token (`alg` `none`, empty signature).
pub(crate) fn unsigned(kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "none", "kid": kid, "typ": "JWT"});
    format!("{}.", signing_input(&header, claims))
}

/// `token` with one bit of its signature flipped.
pub(crate) fn flip_signature_bit(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[10] ^= 0x01;
    format!("{input}.{}", b64(&sig))
}

/// Now, in seconds since the epoch.
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// The attestation payload carrying `token`.
pub(crate) fn payload(token: &str) -> Vec<u8> {
    json!({"version": 1, "token": token})
        .to_string()
        .into_bytes()
}

/// `%XX`-decodes a query value.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The path and the decoded query parameters of `path_and_query`.
pub(crate) fn split_query(path_and_query: &str) -> (String, BTreeMap<String, String>) {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (path.to_owned(), params)
}
