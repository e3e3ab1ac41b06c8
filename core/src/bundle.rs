//! Trust bundles: the X.509 authorities and JWT keys of one trust domain, in PEM and in
//! the SPIFFE bundle format (a JWK Set with `spiffe_sequence` and `spiffe_refresh_hint`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};
use x509_parser::prelude::FromDer;

use crate::error::Error;
use crate::jose::{Curve, PublicKey};
use crate::spiffe_id::TrustDomain;

/// A JWT signing key published in a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtKey {
    /// The key id (`kid`); required for JWT-SVID keys.
    pub kid: String,
    /// The public key, an X.509 SubjectPublicKeyInfo in DER.
    pub public_key_der: Vec<u8>,
    /// Unix seconds after which the key is no longer used, if known.
    pub expires_at: Option<i64>,
}

/// The trust bundle of one trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    /// CA certificates in DER, each a root of X509-SVID validation.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT-SVID signing keys.
    pub jwt_authorities: Vec<JwtKey>,
    /// `spiffe_sequence`: increases on every content change.
    pub sequence: u64,
    /// `spiffe_refresh_hint` in seconds, if set.
    pub refresh_hint: Option<u64>,
    /// The X.509 authorities (each also in `x509_authorities`) an operator tainted: still
    /// trusted, but every SVID chained to one is to be re-issued at once. Travels on the
    /// node API only: the SPIFFE formats (Workload API, `bundle show`) carry none of it.
    pub tainted_x509_authorities: Vec<Vec<u8>>,
    /// The `kid`s of JWT keys (each also in `jwt_authorities`) an operator tainted: still
    /// trusted, but every cached JWT-SVID one of them signed is to be dropped at once.
    /// Node API only, like `tainted_x509_authorities`.
    pub tainted_jwt_kids: Vec<String>,
}

impl TrustBundle {
    /// An empty bundle for `td`.
    pub fn new(td: TrustDomain) -> Self {
        TrustBundle {
            trust_domain: td,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
            tainted_x509_authorities: Vec::new(),
            tainted_jwt_kids: Vec::new(),
        }
    }

    /// The trust domain this bundle is for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The X.509 authorities as concatenated PEM `CERTIFICATE` blocks.
    pub fn to_pem(&self) -> String {
        pem_string(
            "CERTIFICATE",
            self.x509_authorities.iter().map(Vec::as_slice),
        )
    }

    /// The X.509 authorities as concatenated DER, the Workload API's bundle form.
    pub fn to_concatenated_der(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// Reads a bundle of X.509 authorities from PEM. Every block must be a parseable
    /// certificate; at least one is required.
    pub fn from_pem(td: TrustDomain, pem: &str) -> Result<Self, Error> {
        let certs = certs_from_pem(pem)?;
        if certs.is_empty() {
            return Err(Error::InvalidBundle("no CERTIFICATE block found".into()));
        }
        let mut b = TrustBundle::new(td);
        b.x509_authorities = certs;
        Ok(b)
    }

    /// The bundle in SPIFFE bundle format (JWK Set).
    pub fn to_spiffe_json(&self) -> Result<String, Error> {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
                .map_err(|e| Error::InvalidBundle(format!("authority does not parse: {e}")))?;
            // An X.509 authority is named by its certificate, not by a kid.
            let mut jwk = spki_to_jwk(cert.public_key().raw, "", "x509-svid")?;
            jwk.remove("kid");
            jwk.insert("x5c".into(), json!([STANDARD.encode(der)]));
            keys.push(Value::Object(jwk));
        }
        for key in &self.jwt_authorities {
            let jwk = spki_to_jwk(&key.public_key_der, &key.kid, "jwt-svid")?;
            keys.push(Value::Object(jwk));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), json!(self.sequence));
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), json!(hint));
        }
        serde_json::to_string_pretty(&Value::Object(doc))
            .map_err(|e| Error::InvalidBundle(e.to_string()))
    }

    /// Reads a bundle in SPIFFE bundle format. Keys with a missing or unknown `use` or
    /// `kty` are ignored, as the standard asks; a JWT key without `kid` and an X.509 key
    /// without exactly-parseable `x5c` are errors.
    pub fn from_spiffe_json(td: TrustDomain, json: &str) -> Result<Self, Error> {
        let bad = |m: String| Error::InvalidBundle(m);
        let doc: Value = serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        let keys = doc
            .get("keys")
            .ok_or_else(|| bad("\"keys\" is missing".into()))?
            .as_array()
            .ok_or_else(|| bad("\"keys\" is not an array".into()))?;
        let mut b = TrustBundle::new(td);
        if let Some(seq) = doc.get("spiffe_sequence") {
            b.sequence = seq
                .as_u64()
                .ok_or_else(|| bad("\"spiffe_sequence\" is not an unsigned integer".into()))?;
        }
        if let Some(hint) = doc.get("spiffe_refresh_hint") {
            b.refresh_hint =
                Some(hint.as_u64().ok_or_else(|| {
                    bad("\"spiffe_refresh_hint\" is not an unsigned integer".into())
                })?);
        }
        for (i, key) in keys.iter().enumerate() {
            let Some(obj) = key.as_object() else {
                return Err(bad(format!("keys[{i}] is not an object")));
            };
            let kty = obj.get("kty").and_then(Value::as_str);
            if !matches!(kty, Some("EC" | "RSA")) {
                continue;
            }
            match obj.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = obj
                        .get("x5c")
                        .and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("keys[{i}]: x509-svid key has no x5c")))?;
                    let der = STANDARD
                        .decode(x5c)
                        .map_err(|e| bad(format!("keys[{i}]: x5c is not base64: {e}")))?;
                    x509_parser::certificate::X509Certificate::from_der(&der)
                        .map_err(|e| bad(format!("keys[{i}]: x5c is not a certificate: {e}")))?;
                    b.x509_authorities.push(der);
                }
                Some("jwt-svid") => {
                    let kid = obj
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| bad(format!("keys[{i}]: jwt-svid key has no kid")))?;
                    let public_key_der =
                        jwk_to_spki(obj).map_err(|m| bad(format!("keys[{i}]: {m}")))?;
                    b.jwt_authorities.push(JwtKey {
                        kid: kid.to_owned(),
                        public_key_der,
                        expires_at: None,
                    });
                }
                _ => continue,
            }
        }
        Ok(b)
    }
}

/// Encodes one DER certificate as a PEM block.
pub fn der_to_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// Encodes DER bytes as a PEM block with the given label, lines of 64 characters.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    pem_string(label, std::iter::once(der))
}

/// The PEM blocks of `ders`, each labelled `label`, in one buffer of exactly their size.
pub fn pem_blocks<'a>(label: &str, ders: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let mut out = Vec::with_capacity(ders.clone().map(|d| pem_len(label, d.len())).sum());
    for der in ders {
        push_pem_block(&mut out, label, der);
    }
    out
}

/// [`pem_blocks`] as a string.
fn pem_string<'a>(label: &str, ders: impl Iterator<Item = &'a [u8]> + Clone) -> String {
    // The label is a `&str` and base64 is ASCII: the bytes are UTF-8.
    String::from_utf8(pem_blocks(label, ders))
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// DER bytes per PEM line (64 base64 characters).
const PEM_LINE: usize = 48;

/// The length of the PEM block [`push_pem_block`] makes of `der_len` bytes labelled
/// `label`, so that a caller can size its buffer once.
fn pem_len(label: &str, der_len: usize) -> usize {
    let armour = "-----BEGIN -----\n-----END -----\n".len() + 2 * label.len();
    armour + der_len.div_ceil(3) * 4 + der_len.div_ceil(PEM_LINE)
}

/// Appends `der` to `out` as a PEM block labelled `label` (RFC 7468: standard base64 with
/// padding, lines of 64 characters), each line encoded straight into its place: no string
/// per block, per line or per header. [`pem_block`], [`der_to_pem`], [`pem_blocks`] and
/// [`TrustBundle::to_pem`] (and through them the agent's SDS secrets) are written by it.
fn push_pem_block(out: &mut Vec<u8>, label: &str, der: &[u8]) {
    out.reserve(pem_len(label, der.len()));
    out.extend_from_slice(b"-----BEGIN ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----\n");
    for line in der.chunks(PEM_LINE) {
        let at = out.len();
        out.resize(at + line.len().div_ceil(3) * 4, 0);
        // The slice was sized for exactly this line's encoding, so this cannot fail; if
        // it ever did, the allocating encoder writes the same line.
        if STANDARD.encode_slice(line, &mut out[at..]).is_err() {
            out.truncate(at);
            out.extend_from_slice(STANDARD.encode(line).as_bytes());
        }
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----\n");
}

/// Reads every `CERTIFICATE` block of a PEM document as DER.
pub fn certs_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, Error> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| Error::InvalidBundle(format!("bad PEM: {e}")))?;
        x509_parser::certificate::X509Certificate::from_der(&cert)
            .map_err(|e| Error::InvalidBundle(format!("PEM block is not a certificate: {e}")))?;
        out.push(cert.to_vec());
    }
    Ok(out)
}

/// DER prefix of a P-256 SubjectPublicKeyInfo up to the uncompressed point.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of a P-384 SubjectPublicKeyInfo up to the uncompressed point.
const P384_SPKI_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];
/// DER AlgorithmIdentifier of rsaEncryption with NULL parameters.
const RSA_ALGORITHM: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

/// The message of a key `jose` refused.
fn key_problem(e: Error) -> String {
    match e {
        Error::InvalidToken(m) => m,
        other => other.to_string(),
    }
}

/// A public key (SubjectPublicKeyInfo in DER) as a JWK with `kid` and `use`, written by
/// [`PublicKey::to_jwk`], the one JWK writer.
fn spki_to_jwk(spki_der: &[u8], kid: &str, key_use: &str) -> Result<Map<String, Value>, Error> {
    let key = PublicKey::from_spki_der(spki_der)
        .map_err(|e| Error::InvalidBundle(format!("bad public key: {}", key_problem(e))))?;
    Ok(key.to_jwk(kid, key_use))
}

/// A JWK's public key (read by [`PublicKey::from_jwk`], the one JWK reader) as a
/// SubjectPublicKeyInfo in DER, the form a [`JwtKey`] keeps.
fn jwk_to_spki(obj: &Map<String, Value>) -> Result<Vec<u8>, String> {
    PublicKey::from_jwk(obj)
        .map(|key| spki_der(&key))
        .map_err(key_problem)
}

/// The SubjectPublicKeyInfo (DER) of `key`: the uncompressed point under the curve's
/// prefix, or an RSAPublicKey under rsaEncryption.
fn spki_der(key: &PublicKey) -> Vec<u8> {
    match key {
        PublicKey::Ec { curve, point } => {
            let prefix = match curve {
                Curve::P256 => P256_SPKI_PREFIX,
                Curve::P384 => P384_SPKI_PREFIX,
            };
            [prefix, point.as_slice()].concat()
        }
        PublicKey::Rsa { n, e } => {
            let rsa_key = der_seq(&[der_uint(n), der_uint(e)].concat());
            let bits = der_tlv(0x03, &[&[0u8][..], &rsa_key].concat());
            der_seq(&[RSA_ALGORITHM, &bits].concat())
        }
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        vec![len as u8]
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

fn der_seq(content: &[u8]) -> Vec<u8> {
    der_tlv(0x30, content)
}

fn der_uint(magnitude: &[u8]) -> Vec<u8> {
    let m = strip_zeros(magnitude);
    let mut content = Vec::with_capacity(m.len() + 1);
    if m.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(m);
    der_tlv(0x02, &content)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEM as RFC 7468 writes it, the plain way: the reference `push_pem_block` and
    /// `pem_len` are held to.
    fn reference_pem(label: &str, der: &[u8]) -> String {
        let b64 = STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out + &format!("-----END {label}-----\n")
    }

    #[test]
    fn pem_blocks_are_rfc_7468_text_and_sized_exactly() {
        let der: Vec<u8> = (0..1500u32).map(|i| (i * 7 + i / 3) as u8).collect();
        for n in (0..=200).chain([479, 480, 481, 1000, 1500]) {
            for label in ["CERTIFICATE", "PRIVATE KEY"] {
                let expected = reference_pem(label, &der[..n]);
                let mut out = b"before\n".to_vec();
                push_pem_block(&mut out, label, &der[..n]);
                assert_eq!(&out[7..], expected.as_bytes(), "{label}, {n} bytes");
                assert_eq!(out.len() - 7, pem_len(label, n), "{label}, {n} bytes");
                assert_eq!(pem_block(label, &der[..n]), expected, "{label}, {n} bytes");
            }
        }
        let mut bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        bundle.x509_authorities = vec![der[..700].to_vec(), der[3..1000].to_vec()];
        assert_eq!(
            bundle.to_pem(),
            reference_pem("CERTIFICATE", &der[..700])
                + &reference_pem("CERTIFICATE", &der[3..1000])
        );
    }

    fn ca_cert(alg: &'static rcgen::SignatureAlgorithm) -> (Vec<u8>, Vec<u8>) {
        let kp = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&kp).unwrap();
        (
            cert.der().to_vec(),
            rcgen::PublicKeyData::subject_public_key_info(&kp),
        )
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn pem_round_trip() {
        let (a, _) = ca_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (b, _) = ca_cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        let mut bundle = TrustBundle::new(td());
        bundle.x509_authorities = vec![a.clone(), b.clone()];
        let pem = bundle.to_pem();
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
        let back = TrustBundle::from_pem(td(), &pem).unwrap();
        assert_eq!(back.x509_authorities, vec![a.clone(), b.clone()]);
        assert_eq!(bundle.to_concatenated_der(), [a, b].concat());
        assert!(TrustBundle::from_pem(td(), "nothing here").is_err());
    }

    #[test]
    fn spiffe_json_round_trip_with_jwt_keys() {
        let (a, _) = ca_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (_, p256) = ca_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (_, p384) = ca_cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        let mut bundle = TrustBundle::new(td());
        bundle.x509_authorities = vec![a];
        bundle.jwt_authorities = vec![
            JwtKey {
                kid: "k1".into(),
                public_key_der: p256,
                expires_at: None,
            },
            JwtKey {
                kid: "k2".into(),
                public_key_der: p384,
                expires_at: None,
            },
        ];
        bundle.sequence = 7;
        bundle.refresh_hint = Some(300);
        let json = bundle.to_spiffe_json().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert!(
            v["keys"][0].get("kid").is_none(),
            "x509-svid keys must not set kid"
        );
        assert_eq!(v["keys"][0]["x5c"].as_array().unwrap().len(), 1);
        assert_eq!(v["keys"][1]["use"], "jwt-svid");
        assert_eq!(v["keys"][1]["kid"], "k1");
        let back = TrustBundle::from_spiffe_json(td(), &json).unwrap();
        assert_eq!(back, bundle);
    }

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[test]
    fn rsa_jwk_round_trip() {
        // A 2048-bit modulus with the top bit set, and e = 65537.
        let mut n = vec![0xc5u8; 256];
        n[255] = 0x01;
        let mut jwk = Map::new();
        jwk.insert("kty".into(), json!("RSA"));
        jwk.insert("n".into(), json!(URL_SAFE_NO_PAD.encode(&n)));
        jwk.insert("e".into(), json!(URL_SAFE_NO_PAD.encode([1u8, 0, 1])));
        let spki = jwk_to_spki(&jwk).unwrap();
        assert_eq!(
            crate::crypto::key_type_of_spki(&spki).unwrap(),
            crate::KeyType::Rsa2048
        );
        jwk.insert("kid".into(), json!("k"));
        jwk.insert("use".into(), json!("jwt-svid"));
        assert_eq!(spki_to_jwk(&spki, "k", "jwt-svid").unwrap(), jwk);
    }

    #[test]
    fn jwt_keys_are_checked_as_jose_checks_them() {
        // x = 1, y = 1 is not on P-256; a 1024-bit RSA modulus is too small.
        let mut one = vec![0u8; 32];
        one[31] = 1;
        let off_curve = format!(
            r#"{{"keys":[{{"kty":"EC","use":"jwt-svid","kid":"k","crv":"P-256","x":"{0}","y":"{0}"}}]}}"#,
            URL_SAFE_NO_PAD.encode(&one)
        );
        let err = TrustBundle::from_spiffe_json(td(), &off_curve).unwrap_err();
        assert!(
            err.to_string()
                .contains("keys[0]: the P-256 point is not on the curve"),
            "{err}"
        );
        let mut n = vec![0xc5u8; 128];
        n[127] = 1;
        let weak = format!(
            r#"{{"keys":[{{"kty":"RSA","use":"jwt-svid","kid":"k","n":"{}","e":"AQAB"}}]}}"#,
            URL_SAFE_NO_PAD.encode(&n)
        );
        let err = TrustBundle::from_spiffe_json(td(), &weak).unwrap_err();
        assert!(
            err.to_string()
                .contains("keys[0]: the RSA modulus is 1024 bits"),
            "{err}"
        );
    }

    #[test]
    fn ignores_unknown_use_and_kty_and_rejects_bad_keys() {
        let doc =
            r#"{"keys":[{"kty":"EC","use":"wat"},{"kty":"OKP","use":"x509-svid"},{"kty":"EC"}]}"#;
        let b = TrustBundle::from_spiffe_json(td(), doc).unwrap();
        assert!(b.x509_authorities.is_empty() && b.jwt_authorities.is_empty());
        let no_kid = r#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256","x":"","y":""}]}"#;
        assert!(TrustBundle::from_spiffe_json(td(), no_kid).is_err());
        let no_x5c = r#"{"keys":[{"kty":"EC","use":"x509-svid"}]}"#;
        assert!(TrustBundle::from_spiffe_json(td(), no_x5c).is_err());
        assert!(TrustBundle::from_spiffe_json(td(), r#"{"nokeys":[]}"#).is_err());
        assert!(TrustBundle::from_spiffe_json(td(), "not json").is_err());
        let empty = TrustBundle::from_spiffe_json(td(), r#"{"keys":[]}"#).unwrap();
        assert!(empty.x509_authorities.is_empty());
    }
}
