//! JSON Web Tokens (compact JWS, RFC 7515/7519): the one JOSE implementation of Carapace,
//! for signing through a [`KeySigner`] (so the key may stay in an HSM) and for verifying
//! against a [`KeySet`] under a [`Policy`] the caller chooses.
//!
//! # What [`verify`] accepts
//!
//! A compact JWS of at most [`Policy::max_token_bytes`]: exactly three unpadded base64url
//! parts, whose header and payload are JSON objects without a repeated member name. The
//! header's `alg` must be in the policy's allowlist, which can only name asymmetric
//! algorithms ([`Algorithm`]: RS256/384/512, PS256/384/512, ES256, ES384): `none` and the
//! HMAC family (the classic confusion attack signs with the RSA public key as an HMAC
//! secret) cannot even be expressed, so they are refused by name. The header must name a
//! `kid` that is in the [`KeySet`]: the signature is checked with that one key (no trying
//! every key), and that key's type must match `alg` (an RSA key never verifies an ES256
//! token, a P-256 key never an ES384 one). Header parameters that point elsewhere (`jku`,
//! `jwk`, `x5u`, `x5c`) are never used and `crit` is refused (no extension is implemented).
//! Signatures are checked with ring. Only then are the claims read: `exp` is required and
//! must not be past, `nbf`/`iat` must not be in the future, each with the policy's leeway;
//! `aud` (a string or an array) must contain the policy's audience and `iss` must equal its
//! issuer when those are set.
//!
//! Errors are [`Error::InvalidToken`]s naming what is wrong; tokens are bearer secrets, so nothing
//! here puts a token in an error, and values from the token are quoted and cut
//! ([`shown`]).
//!
//! # Keys
//!
//! [`PublicKey`] is an RSA (2048 to 8192 bits) or EC (P-256, P-384) public key, read from
//! a JWK or from a SubjectPublicKeyInfo (a key manager's key), written as a JWK with a
//! caller-chosen `use` (`jwt-svid` in SPIFFE bundles, `sig` for OIDC), and named by its
//! RFC 7638 thumbprint ([`PublicKey::thumbprint`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use serde_json::{Map, Value};

use crate::crypto::{KeyType, SignatureAlgorithm};
use crate::error::Error;
use crate::plugin::KeySigner;

/// The default largest token accepted (Google's and Azure's are 1 to 3 KiB, JWT-SVIDs
/// less than 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// The largest RSA modulus accepted, in bits (ring's limit for verification).
pub const MAX_RSA_BITS: usize = 8192;

/// base64url for key components in a JWK: padding tolerated, non-canonical bits refused.
const JWK_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A refused token or key ([`Error::InvalidToken`]): the message names what is wrong
/// (never the token).
fn refused(reason: impl Into<String>) -> Error {
    Error::InvalidToken(reason.into())
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// `s` for an error message: quoted, escaped and cut to 128 characters (claims and
/// header values come from the token's sender).
pub fn shown(s: &str) -> String {
    const MAX: usize = 128;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}…")
    }
}

/// The JWS algorithms Carapace knows: only asymmetric ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
}

impl Algorithm {
    /// Every algorithm, in a stable order.
    pub const ALL: [Algorithm; 8] = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
    ];

    /// The `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
        }
    }

    /// The algorithm named `name` exactly (case matters), if Carapace knows it.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The algorithm a key manager key of `key_type` signs JWTs with.
    pub fn for_key_type(key_type: KeyType) -> Algorithm {
        match key_type {
            KeyType::EcP256 => Algorithm::ES256,
            KeyType::EcP384 => Algorithm::ES384,
            KeyType::Rsa2048 => Algorithm::RS256,
        }
    }

    fn rsa_params(self) -> Option<&'static ring::signature::RsaParameters> {
        use ring::signature as s;
        Some(match self {
            Algorithm::RS256 => &s::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::RS384 => &s::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::RS512 => &s::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::PS256 => &s::RSA_PSS_2048_8192_SHA256,
            Algorithm::PS384 => &s::RSA_PSS_2048_8192_SHA384,
            Algorithm::PS512 => &s::RSA_PSS_2048_8192_SHA512,
            Algorithm::ES256 | Algorithm::ES384 => return None,
        })
    }

    fn curve(self) -> Option<Curve> {
        match self {
            Algorithm::ES256 => Some(Curve::P256),
            Algorithm::ES384 => Some(Curve::P384),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An elliptic curve of an EC key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    /// NIST P-256.
    P256,
    /// NIST P-384.
    P384,
}

impl Curve {
    /// The JWK `crv` name.
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    /// Bytes of one coordinate (and of `r` and `s` in a JOSE signature).
    pub fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }

    fn from_name(name: &str) -> Option<Curve> {
        match name {
            "P-256" => Some(Curve::P256),
            "P-384" => Some(Curve::P384),
            _ => None,
        }
    }
}

/// A public key that can verify JWTs.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// An RSA key: big-endian modulus and exponent, without leading zeros.
    Rsa {
        /// The modulus.
        n: Vec<u8>,
        /// The public exponent.
        e: Vec<u8>,
    },
    /// An EC key.
    Ec {
        /// Its curve.
        curve: Curve,
        /// The uncompressed point `04 || x || y`.
        point: Vec<u8>,
    },
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKey::Rsa { n, .. } => write!(f, "RSA-{}", bit_length(n)),
            PublicKey::Ec { curve, .. } => write!(f, "EC-{}", curve.name()),
        }
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

/// Bits of a big-endian number without leading zero bytes.
fn bit_length(n: &[u8]) -> usize {
    match n.first() {
        Some(&top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    }
}

impl PublicKey {
    /// An RSA key from its components, checked as ring will at verification: 2048 to 8192
    /// bits, an odd modulus, an odd exponent from 3 to 2^33-1.
    pub fn rsa(n: &[u8], e: &[u8]) -> Result<Self> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        let bits = bit_length(n);
        if bits < MIN_RSA_BITS {
            return Err(refused(format!(
                "the RSA modulus is {bits} bits; at least {MIN_RSA_BITS} are required"
            )));
        }
        if bits > MAX_RSA_BITS {
            return Err(refused(format!(
                "the RSA modulus is {bits} bits; at most {MAX_RSA_BITS} are supported"
            )));
        }
        if n.last().is_some_and(|b| b & 1 == 0) {
            return Err(refused("the RSA modulus is even"));
        }
        let e_value = if e.len() <= 5 {
            e.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        } else {
            u64::MAX
        };
        if !(3..(1 << 33)).contains(&e_value) || e_value & 1 == 0 {
            return Err(refused(
                "the RSA public exponent must be odd and between 3 and 2^33-1 (usually 65537)",
            ));
        }
        Ok(PublicKey::Rsa {
            n: n.to_vec(),
            e: e.to_vec(),
        })
    }

    /// An EC key from its coordinates, each exactly the curve's length (RFC 7518 6.2.1.2),
    /// naming a point on the curve (checked by ring's public-key validation, through an
    /// ECDH agreement with a throwaway key: ring has no other public entry point for it).
    pub fn ec(curve: Curve, x: &[u8], y: &[u8]) -> Result<Self> {
        let len = curve.coordinate_len();
        if x.len() != len || y.len() != len {
            return Err(refused(format!(
                "the {} point's coordinates are {} and {} bytes; both must be {len}",
                curve.name(),
                x.len(),
                y.len()
            )));
        }
        if x.iter().chain(y).all(|&b| b == 0) {
            return Err(refused(format!("the {} point is zero", curve.name())));
        }
        let mut point = Vec::with_capacity(1 + 2 * len);
        point.push(4);
        point.extend_from_slice(x);
        point.extend_from_slice(y);
        let ecdh = match curve {
            Curve::P256 => &ring::agreement::ECDH_P256,
            Curve::P384 => &ring::agreement::ECDH_P384,
        };
        let throwaway =
            ring::agreement::EphemeralPrivateKey::generate(ecdh, &ring::rand::SystemRandom::new())
                .map_err(|_| refused("no randomness to check the EC point with"))?;
        ring::agreement::agree_ephemeral(
            throwaway,
            &ring::agreement::UnparsedPublicKey::new(ecdh, &point),
            |_| (),
        )
        .map_err(|_| refused(format!("the {} point is not on the curve", curve.name())))?;
        Ok(PublicKey::Ec { curve, point })
    }

    /// A key from a JWK object (`kty` `RSA` with `n`/`e`, or `EC` with `crv`/`x`/`y`).
    /// Other members (`kid`, `use`, `alg`, `x5c`…) are not read here.
    pub fn from_jwk(jwk: &Map<String, Value>) -> Result<Self> {
        let member = |name: &str| -> Result<&str> {
            match jwk.get(name) {
                Some(Value::String(s)) => Ok(s),
                Some(_) => Err(refused(format!("{name:?} is not a string"))),
                None => Err(refused(format!("no {name:?}"))),
            }
        };
        let component = |name: &str| -> Result<Vec<u8>> {
            JWK_B64
                .decode(member(name)?)
                .map_err(|e| refused(format!("{name:?} is not base64url: {e}")))
        };
        match member("kty")? {
            "RSA" => PublicKey::rsa(&component("n")?, &component("e")?),
            "EC" => {
                let crv = member("crv")?;
                let curve = Curve::from_name(crv).ok_or_else(|| {
                    refused(format!(
                        "the curve {} is not supported (P-256, P-384)",
                        shown(crv)
                    ))
                })?;
                PublicKey::ec(curve, &component("x")?, &component("y")?)
            }
            other => Err(refused(format!(
                "the key type {} is not supported (RSA, EC)",
                shown(other)
            ))),
        }
    }

    /// A key from an X.509 SubjectPublicKeyInfo in DER (a key manager's public key).
    pub fn from_spki_der(spki_der: &[u8]) -> Result<Self> {
        use x509_parser::prelude::FromDer;
        use x509_parser::public_key::PublicKey as Parsed;
        let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| refused(format!("not a SubjectPublicKeyInfo: {e}")))?;
        if !rest.is_empty() {
            return Err(refused("bytes after the SubjectPublicKeyInfo"));
        }
        match spki.parsed() {
            Ok(Parsed::RSA(rsa)) => PublicKey::rsa(rsa.modulus, rsa.exponent),
            Ok(Parsed::EC(point)) => {
                let oid = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok());
                let curve = match oid {
                    Some(o) if o == x509_parser::oid_registry::OID_EC_P256 => Curve::P256,
                    Some(o) if o == x509_parser::oid_registry::OID_NIST_EC_P384 => Curve::P384,
                    _ => return Err(refused("the EC key's curve is not P-256 or P-384")),
                };
                let data = point.data();
                let len = curve.coordinate_len();
                if data.len() != 1 + 2 * len || data.first() != Some(&4) {
                    return Err(refused(format!(
                        "the {} point is not uncompressed",
                        curve.name()
                    )));
                }
                PublicKey::ec(curve, &data[1..=len], &data[1 + len..])
            }
            Ok(_) => Err(refused("the public key is neither RSA nor EC")),
            Err(e) => Err(refused(format!("the public key cannot be parsed: {e}"))),
        }
    }

    /// Whether this key can verify `alg` (RSA keys the RS and PS families, EC keys the
    /// ES algorithm of their curve).
    pub fn supports(&self, alg: Algorithm) -> bool {
        match self {
            PublicKey::Rsa { .. } => alg.rsa_params().is_some(),
            PublicKey::Ec { curve, .. } => alg.curve() == Some(*curve),
        }
    }

    /// What kind of key this is, for messages: `an RSA key`, `a P-256 key`.
    fn kind(&self) -> String {
        match self {
            PublicKey::Rsa { .. } => "an RSA key".into(),
            PublicKey::Ec { curve, .. } => format!("a {} key", curve.name()),
        }
    }

    fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        match (self, alg.rsa_params(), alg.curve()) {
            (PublicKey::Rsa { n, e }, Some(params), _) => {
                ring::signature::RsaPublicKeyComponents { n, e }
                    .verify(params, message, signature)
                    .is_ok()
            }
            (PublicKey::Ec { curve, point }, _, Some(c)) if *curve == c => {
                let ring_alg = match c {
                    Curve::P256 => &ring::signature::ECDSA_P256_SHA256_FIXED,
                    Curve::P384 => &ring::signature::ECDSA_P384_SHA384_FIXED,
                };
                ring::signature::UnparsedPublicKey::new(ring_alg, point)
                    .verify(message, signature)
                    .is_ok()
            }
            _ => false,
        }
    }

    /// The members RFC 7638 hashes, in its (lexicographic) order.
    fn required_members(&self) -> Vec<(&'static str, String)> {
        match self {
            PublicKey::Rsa { n, e } => vec![
                ("e", URL_SAFE_NO_PAD.encode(e)),
                ("kty", "RSA".into()),
                ("n", URL_SAFE_NO_PAD.encode(n)),
            ],
            PublicKey::Ec { curve, point } => {
                let len = curve.coordinate_len();
                vec![
                    ("crv", curve.name().into()),
                    ("kty", "EC".into()),
                    ("x", URL_SAFE_NO_PAD.encode(&point[1..=len])),
                    ("y", URL_SAFE_NO_PAD.encode(&point[1 + len..])),
                ]
            }
        }
    }

    /// The RFC 7638 JWK thumbprint: SHA-256 of the required members, base64url. A stable
    /// `kid` for a key.
    pub fn thumbprint(&self) -> String {
        let mut json = String::from("{");
        for (i, (name, value)) in self.required_members().into_iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            // Names and values are ASCII without characters JSON escapes.
            json.push_str(&format!("\"{name}\":\"{value}\""));
        }
        json.push('}');
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, json.as_bytes()))
    }

    /// The key as a JWK object: `kty`, `kid`, `use` and the key's members.
    pub fn to_jwk(&self, kid: &str, key_use: &str) -> Map<String, Value> {
        let mut jwk = Map::new();
        for (name, value) in self.required_members() {
            jwk.insert(name.into(), Value::String(value));
        }
        jwk.insert("kid".into(), Value::String(kid.into()));
        jwk.insert("use".into(), Value::String(key_use.into()));
        jwk
    }
}

/// Verification keys by key id (`kid`); a kid appears at most once.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: BTreeMap<String, PublicKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.keys.iter()).finish()
    }
}

impl KeySet {
    /// An empty set.
    pub fn new() -> Self {
        KeySet::default()
    }

    /// Adds `key` under `kid`; an empty or repeated kid is refused.
    pub fn insert(&mut self, kid: &str, key: PublicKey) -> Result<()> {
        if kid.is_empty() {
            return Err(refused("an empty kid"));
        }
        if self.keys.contains_key(kid) {
            return Err(refused("the kid appears twice"));
        }
        self.keys.insert(kid.to_owned(), key);
        Ok(())
    }

    /// Reads the `keys` array of a JWKS (RFC 7517) as parsed JSON, keeping the signature
    /// keys that can verify one of `algorithms`: a key whose `kty` is not RSA or EC, or
    /// that cannot serve any of `algorithms` (an EC key when only RS256 is wanted, a P-521
    /// key), that is declared for another `use` than `sig` or `jwt-svid`, for an `alg`
    /// outside `algorithms` or one its type cannot serve, or with `key_ops` without
    /// `verify`, is skipped. A kept key
    /// must have a non-empty `kid` unique in the set and valid components; errors name
    /// the key by index and kid. `x5c`/`x5t` are ignored (the key is its components). The
    /// result may be empty.
    pub fn from_jwks(keys: &Value, algorithms: &[Algorithm]) -> Result<KeySet> {
        let Value::Array(keys) = keys else {
            return Err(refused("JWKS: \"keys\" is not an array"));
        };
        let mut set = KeySet::default();
        for (i, jwk) in keys.iter().enumerate() {
            let Value::Object(jwk) = jwk else {
                return Err(refused(format!("JWKS key {i}: not an object")));
            };
            let member = |name: &str| -> Result<Option<&str>> {
                match jwk.get(name) {
                    None => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s)),
                    Some(_) => Err(refused(format!("JWKS key {i}: {name:?} is not a string"))),
                }
            };
            let kid = member("kid")?;
            let what = match kid {
                Some(kid) => format!("JWKS key {i} (kid {})", shown(kid)),
                None => format!("JWKS key {i}"),
            };
            let kty = member("kty")?.ok_or_else(|| refused(format!("{what}: no \"kty\"")))?;
            let wanted_kty = match kty {
                "RSA" => algorithms.iter().any(|a| a.rsa_params().is_some()),
                "EC" => {
                    let crv = member("crv")?.and_then(Curve::from_name);
                    crv.is_some_and(|c| algorithms.iter().any(|a| a.curve() == Some(c)))
                }
                _ => false,
            };
            let declared = member("alg")?.map(Algorithm::from_name);
            let usable = wanted_kty
                && member("use")?.is_none_or(|u| u == "sig" || u == "jwt-svid")
                && declared.is_none_or(|a| a.is_some_and(|a| algorithms.contains(&a)))
                && match jwk.get("key_ops") {
                    None => true,
                    Some(Value::Array(ops)) => ops.iter().any(|o| o == "verify"),
                    Some(_) => return Err(refused(format!("{what}: \"key_ops\" is not an array"))),
                };
            if !usable {
                continue;
            }
            let kid = match kid {
                Some(k) if !k.is_empty() => k,
                _ => {
                    return Err(refused(format!(
                        "{what}: no \"kid\" (keys are chosen by kid)"
                    )));
                }
            };
            let key = PublicKey::from_jwk(jwk).map_err(|e| refused(format!("{what}: {e}")))?;
            if let Some(Some(alg)) = declared
                && !key.supports(alg)
            {
                // Declared for an algorithm its own type cannot serve: not usable.
                continue;
            }
            set.insert(kid, key)
                .map_err(|e| refused(format!("{what}: {e}")))?;
        }
        Ok(set)
    }

    /// Parses a JWKS document `{"keys":[...]}` as [`KeySet::from_jwks`] does.
    pub fn from_jwks_json(json: &[u8], algorithms: &[Algorithm]) -> Result<KeySet> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| refused(format!("not JSON: {e}")))?;
        match value.get("keys") {
            Some(keys) if value.is_object() => KeySet::from_jwks(keys, algorithms),
            _ => Err(refused(
                "not a JWKS: no \"keys\" member in a top-level object",
            )),
        }
    }

    /// The set as a JWKS document, each key with `use` `key_use`.
    pub fn to_jwks(&self, key_use: &str) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|(kid, key)| Value::Object(key.to_jwk(kid, key_use)))
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// The key with `kid`.
    pub fn get(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.get(kid)
    }

    /// The key ids, sorted.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Whether `kid` is in the set.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A token's claims: those [`verify`] returns are verified; those of
/// [`unverified_claims`] are not.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(Map<String, Value>);

impl Claims {
    /// The claims as a JSON object.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The claims as a JSON object, owned.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }

    /// Claim `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// String claim `name`: `None` when absent, an error when present but not a string.
    pub fn string(&self, name: &str) -> Result<Option<&str>, String> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("claim {name:?} is not a string")),
        }
    }

    /// String claim `name`, which must be present and non-empty.
    pub fn required_string(&self, name: &str) -> Result<&str, String> {
        match self.string(name)? {
            Some(s) if !s.is_empty() => Ok(s),
            Some(_) => Err(format!("claim {name:?} is empty")),
            None => Err(format!("the token has no {name:?} claim")),
        }
    }

    /// Whether `aud` is the token's audience: the `aud` string, or a member of the `aud`
    /// array.
    pub fn has_audience(&self, aud: &str) -> bool {
        match self.0.get("aud") {
            Some(Value::String(s)) => s == aud,
            Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(aud)),
            _ => false,
        }
    }

    /// The audience as a list (a string `aud` is a list of one); `None` when `aud` is
    /// absent or not a string or an array of strings.
    pub fn audiences(&self) -> Option<Vec<&str>> {
        match self.0.get("aud") {
            Some(Value::String(s)) => Some(vec![s.as_str()]),
            Some(Value::Array(items)) => items.iter().map(Value::as_str).collect(),
            _ => None,
        }
    }

    /// The `aud` claim for an error message.
    pub fn audience_shown(&self) -> String {
        match self.0.get("aud") {
            Some(Value::String(s)) => shown(s),
            Some(v @ Value::Array(_)) => shown(&v.to_string()),
            Some(_) => "(not a string)".into(),
            None => "(none)".into(),
        }
    }

    /// A NumericDate claim (seconds since the epoch; a fraction is dropped).
    pub fn date(&self, name: &str) -> Result<Option<i64>, String> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(i))
                } else if n.as_u64().is_some() {
                    Ok(Some(i64::MAX))
                } else {
                    match n.as_f64() {
                        Some(f) if f.is_finite() => Ok(Some(f.floor() as i64)),
                        _ => Err(format!("claim {name:?} is not a usable number")),
                    }
                }
            }
            Some(_) => Err(format!(
                "claim {name:?} is not a number (seconds since 1970)"
            )),
        }
    }
}

/// The three parts of a compact JWS, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts<'a> {
    /// `header.payload` as in the token: what the signature covers.
    pub signing_input: &'a str,
    /// The decoded header (JSON, not parsed yet).
    pub header: Vec<u8>,
    /// The decoded payload.
    pub payload: Vec<u8>,
    /// The decoded signature.
    pub signature: Vec<u8>,
}

/// Splits a compact JWS of at most `max_bytes` into its three unpadded base64url parts.
pub fn split(token: &str, max_bytes: usize) -> Result<Parts<'_>> {
    if token.len() > max_bytes {
        return Err(refused(format!(
            "the token is {} bytes, more than the {max_bytes} accepted",
            token.len()
        )));
    }
    let pieces: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = pieces[..] else {
        return Err(refused(format!(
            "the token has {} dot-separated parts; a signed JWT has 3",
            pieces.len()
        )));
    };
    let decode = |what: &str, part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| refused(format!("the token's {what} is not unpadded base64url: {e}")))
    };
    Ok(Parts {
        signing_input: &token[..header.len() + 1 + payload.len()],
        header: decode("header", header)?,
        payload: decode("payload", payload)?,
        signature: decode("signature", signature)?,
    })
}

/// A JSON object whose member names are all distinct (RFC 7515 4: a repeated header
/// parameter must be refused; the same rule is applied to claims).
struct UniqueObject(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueObject, A::Error> {
                let mut map = Map::new();
                while let Some((name, value)) = access.next_entry::<String, Value>()? {
                    if map.contains_key(&name) {
                        return Err(serde::de::Error::custom(format!(
                            "the member {} appears twice",
                            shown(&name)
                        )));
                    }
                    map.insert(name, value);
                }
                Ok(UniqueObject(map))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn json_object(what: &str, bytes: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(_)) => {}
        Ok(_) => return Err(refused(format!("the token's {what} is not a JSON object"))),
        Err(e) => {
            return Err(refused(format!(
                "the token's {what} is not JSON ({:?} error at column {})",
                e.classify(),
                e.column()
            )));
        }
    }
    serde_json::from_slice::<UniqueObject>(bytes)
        .map(|o| o.0)
        .map_err(|e| {
            let msg = e.to_string();
            let cut = msg.split(" at line").next().unwrap_or(&msg);
            refused(format!("the token's {what}: {cut}"))
        })
}

/// The claims of `token` WITHOUT verifying anything: only for choosing which keys to
/// verify it with (Azure's `tid`). Nothing read here may be trusted or acted on.
pub fn unverified_claims(token: &str, max_bytes: usize) -> Result<Claims> {
    let parts = split(token, max_bytes)?;
    json_object("payload", &parts.payload).map(Claims)
}

/// What [`verify`] requires of a token besides its signature.
#[derive(Debug, Clone)]
pub struct Policy<'a> {
    /// The algorithms accepted (at least one).
    pub algorithms: &'a [Algorithm],
    /// The current time.
    pub now: SystemTime,
    /// The clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// The audience `aud` must contain, when set.
    pub audience: Option<&'a str>,
    /// The issuer `iss` must equal, when set.
    pub issuer: Option<&'a str>,
    /// The largest token accepted, in bytes ([`MAX_TOKEN_BYTES`] unless told).
    pub max_token_bytes: usize,
}

impl<'a> Policy<'a> {
    /// A policy accepting `algorithms` at `now` with `leeway`, without audience or issuer
    /// checks, for tokens up to [`MAX_TOKEN_BYTES`].
    pub fn new(algorithms: &'a [Algorithm], now: SystemTime, leeway: Duration) -> Self {
        Policy {
            algorithms,
            now,
            leeway,
            audience: None,
            issuer: None,
            max_token_bytes: MAX_TOKEN_BYTES,
        }
    }
}

/// The names of `algorithms` for a message: `RS256`, `RS256 or ES256`, `RS256, PS256 or
/// ES256`.
fn names(algorithms: &[Algorithm]) -> String {
    match algorithms {
        [] => "nothing".into(),
        [one] => one.name().into(),
        [rest @ .., last] => format!(
            "{} or {}",
            rest.iter().map(|a| a.name()).collect::<Vec<_>>().join(", "),
            last.name()
        ),
    }
}

/// Verifies `token` as described in the [module documentation](self) and returns its
/// claims.
pub fn verify(token: &str, keys: &KeySet, policy: &Policy<'_>) -> Result<Claims> {
    let parts = split(token, policy.max_token_bytes)?;
    let header = json_object("header", &parts.header)?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => match Algorithm::from_name(name) {
            Some(alg) if policy.algorithms.contains(&alg) => alg,
            _ => {
                let verb = if policy.algorithms.len() == 1 {
                    "is"
                } else {
                    "are"
                };
                return Err(refused(format!(
                    "the token's algorithm is {}; only {} {verb} accepted",
                    shown(name),
                    names(policy.algorithms)
                )));
            }
        },
        Some(_) => return Err(refused("the token's \"alg\" is not a string")),
        None => return Err(refused("the token's header has no \"alg\"")),
    };
    if header.contains_key("crit") {
        return Err(refused(
            "the token's header has \"crit\" extensions, which this verifier does not implement",
        ));
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) => kid,
        Some(_) => return Err(refused("the token's \"kid\" is not a string")),
        None => return Err(refused("the token's header has no \"kid\"")),
    };
    let key = keys.get(kid).ok_or_else(|| {
        refused(format!(
            "the token is signed with key {}, which is not among the configured keys ({})",
            shown(kid),
            keys.kids().collect::<Vec<_>>().join(", ")
        ))
    })?;
    if !key.supports(alg) {
        return Err(refused(format!(
            "the token's algorithm {alg} does not match key {}, {}",
            shown(kid),
            key.kind()
        )));
    }
    if !key.verify(alg, parts.signing_input.as_bytes(), &parts.signature) {
        return Err(refused(format!(
            "the token's signature does not verify with key {}",
            shown(kid)
        )));
    }
    let claims = Claims(json_object("payload", &parts.payload)?);
    check_times(&claims, policy.now, policy.leeway)?;
    if let Some(audience) = policy.audience
        && !claims.has_audience(audience)
    {
        return Err(refused(format!(
            "the token's audience {} does not include {}",
            claims.audience_shown(),
            shown(audience)
        )));
    }
    if let Some(issuer) = policy.issuer {
        match claims.string("iss").map_err(refused)? {
            Some(iss) if iss == issuer => {}
            Some(iss) => {
                return Err(refused(format!(
                    "the token's issuer is {}, not {}",
                    shown(iss),
                    shown(issuer)
                )));
            }
            None => return Err(refused("the token has no \"iss\" (issuer) claim")),
        }
    }
    Ok(claims)
}

/// Checks `exp` (required), `nbf` and `iat` against `now` with `leeway`.
pub fn check_times(claims: &Claims, now: SystemTime, leeway: Duration) -> Result<()> {
    let now = crate::clock::unix_seconds(now)
        .ok_or_else(|| refused("the system clock is before 1970"))?;
    let leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
    let exp = claims
        .date("exp")
        .map_err(refused)?
        .ok_or_else(|| refused("the token has no \"exp\" (expiry) claim"))?;
    if now > exp.saturating_add(leeway) {
        return Err(refused(format!(
            "the token expired at {exp} (now {now}, clock skew allowed {leeway} s)"
        )));
    }
    if let Some(nbf) = claims.date("nbf").map_err(refused)?
        && now.saturating_add(leeway) < nbf
    {
        return Err(refused(format!(
            "the token is not valid before {nbf} (now {now}, clock skew allowed {leeway} s)"
        )));
    }
    if let Some(iat) = claims.date("iat").map_err(refused)?
        && iat > now.saturating_add(leeway)
    {
        return Err(refused(format!(
            "the token was issued in the future, at {iat} (now {now}, clock skew allowed {leeway} s)"
        )));
    }
    Ok(())
}

/// Converts an ASN.1 DER `Ecdsa-Sig-Value` (what [`KeySigner`] returns for EC keys) to
/// the JOSE form: `r || s`, each left-padded to `width` bytes.
pub fn ecdsa_der_to_fixed(der: &[u8], width: usize) -> Result<Vec<u8>> {
    let bad = || refused("the ECDSA signature is not a DER Ecdsa-Sig-Value");
    /// One DER TLV: (tag, contents, rest). Only definite lengths up to 2 bytes.
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, b) = b.split_first()?;
        let (len, b) = match first {
            0..=0x7f => (usize::from(first), b),
            0x81 => {
                let (&l, b) = b.split_first()?;
                (usize::from(l), b)
            }
            0x82 => {
                let (l, b) = b.split_at_checked(2)?;
                (usize::from(l[0]) << 8 | usize::from(l[1]), b)
            }
            _ => return None,
        };
        let (contents, rest) = b.split_at_checked(len)?;
        Some((tag, contents, rest))
    }
    let (tag, seq, rest) = tlv(der).ok_or_else(bad)?;
    if tag != 0x30 || !rest.is_empty() {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(2 * width);
    let mut seq = seq;
    for _ in 0..2 {
        let (tag, int, rest) = tlv(seq).ok_or_else(bad)?;
        if tag != 0x02 || int.is_empty() || int[0] & 0x80 != 0 {
            return Err(bad());
        }
        let int = strip_leading_zeros(int);
        if int.is_empty() || int.len() > width {
            return Err(bad());
        }
        out.resize(out.len() + width - int.len(), 0);
        out.extend_from_slice(int);
        seq = rest;
    }
    if !seq.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// Signs `claims` as a compact JWS with `signer`'s key (which may stay in an HSM): `alg`
/// from its key type ([`Algorithm::for_key_type`]), header `{"alg","kid","typ":"JWT"}`
/// with `kid` as given or else the RFC 7638 thumbprint of its public key.
pub fn sign(
    kid: Option<&str>,
    claims: &Map<String, Value>,
    signer: &dyn KeySigner,
) -> Result<String, Error> {
    let key_type = signer.key_type();
    let alg = Algorithm::for_key_type(key_type);
    let kid = match kid {
        Some(kid) => kid.to_owned(),
        None => PublicKey::from_spki_der(signer.public_key_der())
            .map_err(|e| Error::KeyBackend(format!("key {:?}: {e}", signer.id())))?
            .thumbprint(),
    };
    let header = serde_json::json!({ "alg": alg.name(), "kid": kid, "typ": "JWT" });
    let encode = |v: serde_json::Result<Vec<u8>>| -> Result<String, Error> {
        v.map(|bytes| URL_SAFE_NO_PAD.encode(bytes))
            .map_err(|e| Error::Unavailable(format!("encoding a JWT: {e}")))
    };
    let signing_input = format!(
        "{}.{}",
        encode(serde_json::to_vec(&header))?,
        encode(serde_json::to_vec(claims))?
    );
    let signature = signer.sign(key_type.x509_algorithm(), signing_input.as_bytes())?;
    let signature = match key_type {
        KeyType::EcP256 | KeyType::EcP384 => {
            let width = match key_type {
                KeyType::EcP384 => Curve::P384.coordinate_len(),
                _ => Curve::P256.coordinate_len(),
            };
            ecdsa_der_to_fixed(&signature, width)
                .map_err(|e| Error::KeyBackend(format!("key {:?}: {e}", signer.id())))?
        }
        KeyType::Rsa2048 => {
            debug_assert_eq!(
                key_type.x509_algorithm(),
                SignatureAlgorithm::RsaPkcs1Sha256
            );
            signature
        }
    };
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

#[cfg(test)]
#[path = "jose_tests.rs"]
mod tests;
