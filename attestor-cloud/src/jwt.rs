//! RS256 JSON Web Tokens, verified against a configured key set: what `gcp_iit` (Google's
//! instance identity token) and `azure_msi` (a managed identity's access token) share.
//! Parsing, keys and verification are [`carapace_core::jose`]'s (the one JOSE path of
//! Carapace); this module holds what is cloud-specific: the RS256-only policy, key files
//! and Google's certificate map, the plugin payload and the settings checks.
//!
//! # What [`verify_rs256`] accepts
//!
//! A compact JWS (RFC 7515) of at most [`MAX_TOKEN_BYTES`]: exactly three unpadded
//! base64url parts, header and claims JSON objects without a repeated member. Its header
//! must say `alg` `RS256`, exactly: `none`, the HMAC family (the classic confusion attack
//! signs with the RSA public key as an HMAC secret), other RSA hashes, RSA-PSS and ECDSA
//! are all refused by name, so the algorithm is our policy and never the token's choice. The header must name a `kid` that is in the configured
//! [`KeySet`]: the signature is checked with that one key (no trying every key), and header
//! parameters that point elsewhere (`jku`, `jwk`, `x5u`, `x5c`) are never used. A `crit`
//! header is refused (we implement no extension). The signature is RSASSA-PKCS1-v1_5 with
//! SHA-256 over `header.payload`, with a 2048- to 8192-bit key (ring's
//! `RSA_PKCS1_2048_8192_SHA256`). Only then are the claims parsed: `exp` is required and
//! `nbf`/`iat` are checked when present, each with the configured clock-skew leeway.
//! Issuer and audience are the callers' checks ([`Claims::has_audience`] accepts the
//! string and the array form of `aud`).
//!
//! # Key files and key URLs
//!
//! A [`KeySet`] is read from a file an operator keeps up to date (`keys_path`), or
//! fetched from an `https://` URL (`keys_url`) by a background task over authenticated
//! HTTPS only, at startup and then every `keys_refresh` ([`crate::keys`]). Either way
//! nothing is fetched from the network at attestation time, and a fetched body must meet
//! the same rules as a file. Two shapes are recognised:
//! - a JWKS (RFC 7517), `{"keys":[{"kty":"RSA","kid":..,"n":..,"e":..}]}`, as Google serves
//!   at `https://www.googleapis.com/oauth2/v3/certs` and Microsoft at
//!   `https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys`; keys that are not
//!   RSA, are not for signatures (`use`), or are declared for another `alg` are skipped;
//!   `x5c`/`x5t` are ignored (the key is `n` and `e`);
//! - Google's certificate map, `{"<kid>":"-----BEGIN CERTIFICATE-----..."}`, as served at
//!   `https://www.googleapis.com/oauth2/v1/certs`: the RSA key of each certificate (the
//!   certificate is only a carrier; its validity dates are not used).
//!
//! RSA keys under 2048 bits are refused. A [`KeyFile`] re-reads its file whenever its
//! size, modification time or inode changes, checked at every verification, so a cron job
//! refreshing the provider's keys (`curl -o keys.json.tmp … && mv keys.json.tmp keys.json`)
//! needs no restart; a file that cannot be read or parsed keeps the last good set, with a
//! warning (as does a fetch from a key URL that fails or brings something unusable).
//!
//! Tokens are bearer secrets: nothing here logs one or puts one in an error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use carapace_core::Error;
use carapace_core::jose::{Algorithm, Policy, PublicKey};

use crate::rejected;

pub use carapace_core::jose::{Claims, KeySet, MAX_RSA_BITS, MAX_TOKEN_BYTES, MIN_RSA_BITS};

pub(crate) use carapace_core::jose::shown;

/// The largest attestation payload accepted.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// The version of the attestation payload `{"version":1,"token":"<jwt>"}`.
pub const PAYLOAD_VERSION: u64 = 1;

/// The largest key file read.
pub const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;

/// The one algorithm of Google's and Azure's tokens.
const ALGORITHMS: &[Algorithm] = &[Algorithm::RS256];

/// Reading a [`KeySet`] from what the cloud providers publish.
pub trait KeySetFiles: Sized {
    /// Parses a JWKS or a certificate map (told apart by shape). At least one usable
    /// key is required; a duplicated `kid`, an RSA key under 2048 bits or a certificate
    /// without an RSA key is an error naming the `kid`.
    fn from_json(json: &[u8]) -> Result<Self, String>;
    /// Reads and parses `path`; errors name the file.
    fn load(path: &Path) -> Result<Self, String>;
}

impl KeySetFiles for KeySet {
    fn from_json(json: &[u8]) -> Result<KeySet, String> {
        let value: Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(top) = value else {
            return Err(
                "neither a JWKS ({\"keys\":[...]}) nor a certificate map ({\"<kid>\":\"-----BEGIN \
                 CERTIFICATE-----...\"}): the top level is not an object"
                    .into(),
            );
        };
        let set = if let Some(keys) = top.get("keys") {
            let set = KeySet::from_jwks(keys, ALGORITHMS).map_err(|e| e.to_string())?;
            tracing::debug!(kids = ?set.kids().collect::<Vec<_>>(), "JWKS read (keys that are not RS256 signature keys skipped)");
            set
        } else if !top.is_empty() && top.values().all(Value::is_string) {
            from_certificate_map(&top)?
        } else {
            return Err(
                "neither a JWKS (no \"keys\" member) nor a certificate map (not every value is \
                 a PEM certificate string)"
                    .into(),
            );
        };
        if set.is_empty() {
            return Err("no RSA signature key in it".into());
        }
        Ok(set)
    }

    fn load(path: &Path) -> Result<KeySet, String> {
        let bytes = read_capped(path)?;
        KeySet::from_json(&bytes).map_err(|e| format!("keys file {}: {e}", path.display()))
    }
}

/// Google's certificate map: the RSA key of each certificate by kid.
fn from_certificate_map(map: &Map<String, Value>) -> Result<KeySet, String> {
    let mut set = KeySet::new();
    for (kid, pem) in map {
        let what = format!("certificate {}", shown(kid));
        let pem = pem.as_str().unwrap_or_default();
        if kid.is_empty() {
            return Err(format!("{what}: an empty key id"));
        }
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.trim().as_bytes())
            .map_err(|e| format!("{what}: not a PEM certificate: {e}"))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!(
                "{what}: a PEM {:?} block, not a CERTIFICATE",
                pem.label
            ));
        }
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("{what}: not an X.509 certificate: {e}"))?;
        let key = match cert.public_key().parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                PublicKey::rsa(rsa.modulus, rsa.exponent).map_err(|e| format!("{what}: {e}"))?
            }
            Ok(_) => return Err(format!("{what}: its key is not an RSA key")),
            Err(e) => return Err(format!("{what}: its public key cannot be parsed: {e}")),
        };
        set.insert(kid, key).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(set)
}

fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file =
        std::fs::File::open(path).map_err(|e| format!("keys file {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("keys file {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "keys file {}: larger than {MAX_KEY_FILE_BYTES} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

/// What identifies one version of a file: a rewrite or a replacement changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: (u64, u64),
}

fn stamp(path: &Path) -> Result<Stamp, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("keys file {}: {e}", path.display()))?;
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt as _;
        (meta.dev(), meta.ino())
    };
    #[cfg(not(unix))]
    let inode = (0, 0);
    Ok(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
    })
}

#[derive(Debug)]
struct Loaded {
    /// The version last tried (loaded or failed); `None` after a failed `stat`.
    seen: Option<Stamp>,
    keys: Arc<KeySet>,
}

/// A [`KeySet`] kept in step with its file: [`KeyFile::keys`] re-reads the file when it
/// changed, and keeps the last good set (with a warning) when the new content is not
/// usable.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl KeyFile {
    /// Loads `path`, which must hold a usable key set now.
    pub fn open(path: &Path) -> Result<KeyFile, String> {
        let seen = stamp(path)?;
        let keys = KeySet::load(path)?;
        Ok(KeyFile {
            path: path.to_owned(),
            loaded: Mutex::new(Loaded {
                seen: Some(seen),
                keys: Arc::new(keys),
            }),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current key set, re-read first if the file changed since it was last read.
    pub fn keys(&self) -> Arc<KeySet> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let now = stamp(&self.path);
        match (&now, &loaded.seen) {
            (Ok(now), Some(seen)) if now == seen => return loaded.keys.clone(),
            (Err(_), None) => return loaded.keys.clone(),
            _ => {}
        }
        loaded.seen = now.as_ref().ok().cloned();
        let result = now.and_then(|_| KeySet::load(&self.path));
        match result {
            Ok(keys) => {
                tracing::info!(
                    file = %self.path.display(),
                    kids = ?keys.kids().collect::<Vec<_>>(),
                    "keys file changed: reloaded"
                );
                loaded.keys = Arc::new(keys);
            }
            Err(e) => tracing::warn!(
                error = %e,
                kids = ?loaded.keys.kids().collect::<Vec<_>>(),
                "keys file changed but is not usable; still verifying with the keys read before"
            ),
        }
        loaded.keys.clone()
    }
}

/// The claims of `token` WITHOUT verifying anything: only for choosing which keys to
/// verify it with (Azure's `tid`). Nothing read here may be trusted or acted on.
pub(crate) fn unverified_claims(token: &str) -> Result<Claims, String> {
    carapace_core::jose::unverified_claims(token, MAX_TOKEN_BYTES).map_err(|e| e.to_string())
}

/// Verifies `token` as described in the [module documentation](self) (with
/// [`carapace_core::jose::verify`], RS256 only) and returns its claims. `now` and
/// `leeway` decide `exp`, `nbf` and `iat`. Errors never contain the token.
pub fn verify_rs256(
    token: &str,
    keys: &KeySet,
    now: SystemTime,
    leeway: Duration,
) -> Result<Claims, String> {
    carapace_core::jose::verify(token, keys, &Policy::new(ALGORITHMS, now, leeway))
        .map_err(|e| e.to_string())
}

/// The attestation payload `{"version":1,"token":"<jwt>"}` of both JWT plugins.
pub(crate) fn encode_payload(token: &str) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&serde_json::json!({ "version": PAYLOAD_VERSION, "token": token }))
        .map_err(|e| Error::Unavailable(format!("encoding the attestation payload: {e}")))
}

/// The token in an attestation payload, checked for size, version and shape. Errors
/// never quote the payload (it carries the token).
pub(crate) fn decode_payload(plugin: &str, payload: &[u8]) -> Result<String, Error> {
    let mut map: serde_json::Map<String, Value> = carapace_core::plugin::decode_versioned_message(
        plugin,
        "payload",
        payload,
        MAX_PAYLOAD_BYTES,
        PAYLOAD_VERSION,
    )?;
    map.remove("version");
    let token = match map.remove("token") {
        Some(Value::String(t)) => t,
        Some(_) => return Err(rejected(plugin, "the payload's \"token\" is not a string")),
        None => return Err(rejected(plugin, "the payload has no \"token\"")),
    };
    if let Some(unknown) = map.keys().next() {
        return Err(rejected(
            plugin,
            format!("the payload has an unknown member {}", shown(unknown)),
        ));
    }
    Ok(token)
}

/// The default leeway for `exp`, `nbf` and `iat` (`clock_skew`).
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The largest `clock_skew` accepted: more would let expired tokens through for long.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The largest agent `timeout` accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn default_clock_skew() -> Duration {
    DEFAULT_CLOCK_SKEW
}

pub(crate) fn default_timeout() -> Duration {
    crate::http::DEFAULT_TIMEOUT
}

/// What is wrong with an `audience` setting, if anything.
pub(crate) fn audience_problem(audience: &str) -> Option<String> {
    if audience.trim().is_empty() {
        Some(
            "audience is empty: set it to a value unique to this trust domain, e.g. its \
             SPIFFE ID \"spiffe://example.org\""
                .into(),
        )
    } else if audience.len() > 1024 || audience.chars().any(char::is_control) {
        Some("audience must be at most 1024 characters, without control characters".into())
    } else {
        None
    }
}

/// What is wrong with a `clock_skew` setting, if anything.
pub(crate) fn clock_skew_problem(skew: Duration) -> Option<String> {
    (skew > MAX_CLOCK_SKEW).then(|| {
        format!(
            "clock_skew {skew:?} is more than the {MAX_CLOCK_SKEW:?} allowed (it extends every \
             token's lifetime)"
        )
    })
}

/// What is wrong with an agent's `timeout` setting, if anything.
pub(crate) fn timeout_problem(timeout: Duration) -> Option<String> {
    (timeout.is_zero() || timeout > MAX_TIMEOUT)
        .then(|| format!("timeout {timeout:?} must be more than 0 and at most {MAX_TIMEOUT:?}"))
}

/// A token the agent got from a metadata service, checked before it is sent: printable
/// ASCII, three parts, at most [`MAX_TOKEN_BYTES`]. `what` names the source in errors.
pub(crate) fn check_fetched_token(plugin: &str, what: &str, token: &str) -> Result<(), Error> {
    if token.is_empty()
        || token.len() > MAX_TOKEN_BYTES
        || !token.bytes().all(|b| b.is_ascii_graphic())
        || token.split('.').count() != 3
    {
        return Err(rejected(
            plugin,
            format!(
                "{what} is not a JWT ({} bytes; expected three base64url parts, at most \
                 {MAX_TOKEN_BYTES} bytes)",
                token.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use carapace_core::jose::PublicKey;
    use rsa::pkcs8::EncodePrivateKey as _;
    use rsa::traits::PublicKeyParts as _;
    use serde_json::json;
    use std::sync::OnceLock;
    use std::time::UNIX_EPOCH;

    /// The components of RSA key `kid` in `set`.
    struct RsaParts {
        n: Vec<u8>,
        e: Vec<u8>,
    }

    fn rsa_parts(set: &KeySet, kid: &str) -> RsaParts {
        match set.get(kid).unwrap() {
            PublicKey::Rsa { n, e } => RsaParts {
                n: n.clone(),
                e: e.clone(),
            },
            other => panic!("{other:?}"),
        }
    }

    /// The token's parts, as the verifier splits them.
    fn split(token: &str) -> Result<carapace_core::jose::Parts<'_>, carapace_core::Error> {
        carapace_core::jose::split(token, MAX_TOKEN_BYTES)
    }

    fn b64(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    /// One RSA-2048 key for the module's tests: (PKCS#8 DER, JWKS with kid "k1").
    fn key() -> &'static (Vec<u8>, KeySet) {
        static KEY: OnceLock<(Vec<u8>, KeySet)> = OnceLock::new();
        KEY.get_or_init(|| {
            let sk = rsa::RsaPrivateKey::new(&mut rand_core(), 2048).unwrap();
            let jwks = json!({"keys": [{
                "kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
                "n": b64(&sk.n().to_bytes_be()), "e": b64(&sk.e().to_bytes_be()),
            }]});
            let set = KeySet::from_json(jwks.to_string().as_bytes()).unwrap();
            (sk.to_pkcs8_der().unwrap().as_bytes().to_vec(), set)
        })
    }

    fn rand_core() -> rsa::rand_core::OsRng {
        rsa::rand_core::OsRng
    }

    fn sign(header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let kp = ring::signature::RsaKeyPair::from_pkcs8(&key().0).unwrap();
        let mut sig = vec![0; kp.public().modulus_len()];
        kp.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{input}.{}", b64(&sig))
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn verify(token: &str) -> Result<Claims, String> {
        verify_rs256(token, &key().1, now(), Duration::from_secs(30))
    }

    fn header() -> Value {
        json!({"alg": "RS256", "kid": "k1", "typ": "JWT"})
    }

    #[test]
    fn a_good_token_verifies_and_its_claims_are_returned() {
        let t = sign(&header(), &json!({"exp": 1_700_000_100, "sub": "x"}));
        assert_eq!(verify(&t).unwrap().required_string("sub").unwrap(), "x");
    }

    #[test]
    fn the_token_must_have_exactly_three_base64url_parts() {
        let t = sign(&header(), &json!({"exp": 1_700_000_100}));
        let (a, rest) = t.split_once('.').unwrap();
        let (b, c) = rest.split_once('.').unwrap();
        for (bad, want) in [
            (format!("{a}.{b}"), "2 dot-separated parts"),
            (format!("{a}.{b}.{c}.{c}"), "4 dot-separated parts"),
            (
                format!("{a}.{b}.{c}="),
                "signature is not unpadded base64url",
            ),
            (format!("{a}=.{b}.{c}"), "header is not unpadded base64url"),
            (format!("{a}.{b}+.{c}"), "payload is not unpadded base64url"),
            (
                format!("{a}.{b}.{}/", &c[..c.len() - 1]),
                "signature is not",
            ),
            (String::new(), "1 dot-separated parts"),
        ] {
            let err = verify(&bad).unwrap_err();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }

    #[test]
    fn oversized_tokens_are_refused_before_parsing() {
        let t = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(verify(&t).unwrap_err().contains("more than the 16384"));
    }

    #[test]
    fn the_header_must_say_rs256_with_a_known_kid_and_no_crit() {
        let claims = json!({"exp": 1_700_000_100});
        for (header, want) in [
            (json!({"alg": "none", "kid": "k1"}), "\"none\"; only RS256"),
            (json!({"alg": "RS512", "kid": "k1"}), "\"RS512\""),
            (json!({"alg": "rs256", "kid": "k1"}), "\"rs256\""),
            (json!({"kid": "k1"}), "no \"alg\""),
            (json!({"alg": "RS256"}), "no \"kid\""),
            (json!({"alg": "RS256", "kid": 1}), "\"kid\" is not a string"),
            (
                json!({"alg": "RS256", "kid": "k2"}),
                "key \"k2\", which is not among",
            ),
            (
                json!({"alg": "RS256", "kid": "k1", "crit": ["b64"]}),
                "crit",
            ),
        ] {
            let err = verify(&sign(&header, &claims)).unwrap_err();
            assert!(err.contains(want), "{header}: {err}");
        }
    }

    #[test]
    fn a_changed_payload_fails_the_signature() {
        let t = sign(&header(), &json!({"exp": 1_700_000_100, "sub": "a"}));
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(json!({"exp": 1_700_000_100, "sub": "b"})
                .to_string()
                .as_bytes()),
            parts[2]
        );
        assert!(verify(&forged).unwrap_err().contains("does not verify"));
    }

    #[test]
    fn times_are_checked_with_leeway() {
        let ok = |c: Value| verify(&sign(&header(), &c));
        assert!(ok(json!({"exp": 1_700_000_000 - 30})).is_ok());
        assert!(
            ok(json!({"exp": 1_700_000_000 - 31}))
                .unwrap_err()
                .contains("expired")
        );
        assert!(ok(json!({"exp": 1_700_000_100.5})).is_ok());
        assert!(ok(json!({"sub": "x"})).unwrap_err().contains("no \"exp\""));
        assert!(
            ok(json!({"exp": "soon"}))
                .unwrap_err()
                .contains("not a number")
        );
        assert!(ok(json!({"exp": 1_700_000_100, "nbf": 1_700_000_030})).is_ok());
        assert!(
            ok(json!({"exp": 1_700_000_100, "nbf": 1_700_000_031}))
                .unwrap_err()
                .contains("not valid before")
        );
        assert!(
            ok(json!({"exp": 1_700_000_100, "iat": 1_700_000_031}))
                .unwrap_err()
                .contains("issued in the future")
        );
    }

    #[test]
    fn key_files_are_told_apart_by_shape() {
        for (json, want) in [
            ("[]", "top level is not an object"),
            ("{}", "neither a JWKS"),
            ("{\"a\": 1}", "neither a JWKS"),
            ("{\"keys\": {}}", "\"keys\" is not an array"),
            ("{\"keys\": []}", "no RSA signature key"),
            (
                "{\"keys\": [{\"kty\": \"EC\", \"kid\": \"e\"}]}",
                "no RSA signature key",
            ),
            (
                "{\"keys\": [{\"kty\": \"RSA\", \"n\": \"AQAB\", \"e\": \"AQAB\"}]}",
                "no \"kid\"",
            ),
            (
                "{\"keys\": [{\"kty\": \"RSA\", \"kid\": \"a\", \"n\": \"*\", \"e\": \"AQAB\"}]}",
                "\"n\" is not base64url",
            ),
            (
                "{\"k\": \"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\"}",
                "certificate \"k\"",
            ),
            ("not json", "not JSON"),
        ] {
            let err = KeySet::from_json(json.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn non_signature_keys_are_skipped_and_duplicates_refused() {
        let (_, set) = key();
        let k = rsa_parts(set, "k1");
        let jwk = |kid: &str, extra: Value| {
            let mut m = json!({"kty": "RSA", "kid": kid, "n": b64(&k.n), "e": b64(&k.e)});
            m.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            m
        };
        let s = KeySet::from_json(
            json!({"keys": [
                jwk("a", json!({})),
                jwk("enc", json!({"use": "enc"})),
                jwk("ps", json!({"alg": "PS256"})),
                jwk("wrap", json!({"key_ops": ["wrapKey"]})),
                jwk("v", json!({"key_ops": ["verify"], "x5c": ["ignored"]})),
            ]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(s.kids().collect::<Vec<_>>(), ["a", "v"]);
        let err = KeySet::from_json(
            json!({"keys": [jwk("a", json!({})), jwk("a", json!({}))]})
                .to_string()
                .as_bytes(),
        )
        .unwrap_err();
        assert!(err.contains("kid \"a\"): the kid appears twice"), "{err}");
        let mut padded_n = b64(&k.n);
        while padded_n.len() % 4 != 0 {
            padded_n.push('=');
        }
        assert!(
            KeySet::from_json(
                json!({"keys": [{"kty": "RSA", "kid": "p", "n": padded_n, "e": "AQAB"}]})
                    .to_string()
                    .as_bytes()
            )
            .is_ok()
        );
    }

    #[test]
    fn payloads_are_checked_without_quoting_them() {
        let ok = decode_payload("p", br#"{"version":1,"token":"a.b.c"}"#).unwrap();
        assert_eq!(ok, "a.b.c");
        for (payload, want) in [
            (
                &br#"{"version":2,"token":"secret"}"#[..],
                "payload version 2",
            ),
            (br#"{"token":"secret"}"#, "no version"),
            (br#"{"version":1}"#, "no \"token\""),
            (br#"{"version":1,"token":7}"#, "not a string"),
            (
                br#"{"version":1,"token":"secret","x":1}"#,
                "unknown member \"x\"",
            ),
            (br#"{"version":1,"token":"secret"#, "not JSON"),
            (br#"["secret"]"#, "not a JSON object"),
        ] {
            let err = decode_payload("p", payload).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert!(
            decode_payload("p", &big)
                .unwrap_err()
                .to_string()
                .contains("65537 bytes")
        );
    }

    #[test]
    fn fetched_tokens_must_look_like_jwts() {
        assert!(check_fetched_token("p", "t", "a.b.c").is_ok());
        for bad in ["", "a.b", "a.b.c\n", "a b.c.d", "<html>"] {
            assert!(check_fetched_token("p", "t", bad).is_err(), "{bad:?}");
        }
        let long = format!("{}.b.c", "a".repeat(MAX_TOKEN_BYTES));
        let err = check_fetched_token("p", "the token", &long)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the token is not a JWT (16388 bytes"), "{err}");
    }

    #[test]
    fn shown_values_are_quoted_and_cut() {
        assert_eq!(shown("a\"b"), "\"a\\\"b\"");
        assert!(shown(&"x".repeat(200)).ends_with("\"…"));
    }

    mod properties {
        use super::*;
        use carapace_fuzzkit::proptest::prelude::*;
        use carapace_fuzzkit::{bounded, config, mutated_text};

        fn genuine() -> String {
            sign(
                &header(),
                &json!({"exp": 1_700_000_100, "sub": "x", "aud": ["a", "b"]}),
            )
        }

        fn jwks() -> String {
            let sk = rsa::RsaPrivateKey::from_pkcs8_der(&key().0).unwrap();
            json!({"keys": [
                {"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
                 "n": b64(&sk.n().to_bytes_be()), "e": b64(&sk.e().to_bytes_be())},
                {"kty": "EC", "kid": "e1", "crv": "P-256", "x": "AA", "y": "AA"},
            ]})
            .to_string()
        }

        use rsa::pkcs8::DecodePrivateKey as _;

        proptest! {
            #![proptest_config(config(1000))]

            /// Never a panic; a token that verifies is exactly the genuine one: its
            /// compact serialisation re-made from its decoded parts is itself.
            #[test]
            fn tokens_never_panic_and_only_the_genuine_one_verifies(
                token in mutated_text(vec![genuine()]),
            ) {
                let result = bounded("verify_rs256", token.len(), || verify(&token));
                let _ = bounded("unverified_claims", token.len(), || unverified_claims(&token));
                if result.is_ok() {
                    let parts = split(&token).unwrap();
                    let again = format!("{}.{}.{}", b64(&parts.header), b64(&parts.payload), b64(&parts.signature));
                    prop_assert_eq!(&again, &token);
                    prop_assert_eq!(&token, &genuine());
                }
            }

            /// Key sets (JWKS and certificate maps, from files or keys_url): never a
            /// panic, the allocation bound, and the same answer twice.
            #[test]
            fn key_sets_never_panic(text in mutated_text(vec![
                jwks(),
                r#"{"k1":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}"#.into(),
            ])) {
                let parsed = bounded("KeySet", text.len(), || KeySet::from_json(text.as_bytes()));
                prop_assert_eq!(KeySet::from_json(text.as_bytes()), parsed.clone());
                if let Ok(set) = parsed {
                    prop_assert!(!set.is_empty());
                }
            }

            /// The attestation payload of the JWT plugins.
            #[test]
            fn payloads_never_panic(text in mutated_text(vec![
                String::from_utf8(encode_payload(&genuine()).unwrap()).unwrap(),
            ])) {
                if let Ok(token) = bounded("decode_payload", text.len(), || decode_payload("gcp_iit", text.as_bytes())) {
                    prop_assert_eq!(decode_payload("gcp_iit", &encode_payload(&token).unwrap()).unwrap(), token);
                }
            }
        }
    }
}
