//! The JWT half of the Workload API: JWT-SVIDs fetched from the server and cached
//! ([`crate::jwt_cache`]), the JWT bundles as JWKS documents, and token validation, all
//! through [`carapace_core::jose`], the one JOSE implementation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use carapace_core::jose::{self, Algorithm, KeySet, Policy, PublicKey};
use carapace_core::{SpiffeId, TrustBundle};
use carapace_proto::types::JwtSvid;
use carapace_proto::workload::JwtBundlesResponse;
use serde_json::{Map, Value};
use tonic::Status;

use crate::cache::CachedSvid;
use crate::jwt_cache::{CachedJwt, JwtCache, JwtCacheKey, Lookup};
use crate::node_client::{self, ServerLink};

/// The clock skew allowed on `exp`, `nbf` and `iat` when validating a token, and when
/// checking one the server just signed.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// The `use` of every key in a JWT bundle (SPIFFE bundle format).
pub const KEY_USE: &str = "jwt-svid";

/// What the Workload API needs for JWT-SVIDs: the way to the server and the token cache.
#[derive(Debug)]
pub(crate) struct JwtService {
    server: ServerLink,
    cache: Mutex<JwtCache>,
    /// One gate per key being renewed: concurrent callers wanting the same token wait
    /// for the first one's answer instead of each asking the server.
    inflight: Mutex<HashMap<JwtCacheKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// A caller's hold on a key's gate; the last one out removes the gate (also when the
/// call is cancelled).
struct Inflight<'a> {
    map: &'a Mutex<HashMap<JwtCacheKey, Arc<tokio::sync::Mutex<()>>>>,
    key: JwtCacheKey,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's reference and this one: nobody else waits.
        if Arc::strong_count(&self.gate) == 2 {
            map.remove(&self.key);
        }
    }
}

/// Where a served token came from, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The cache, before its half-life.
    Cache,
    /// The server, just now.
    Server,
    /// The cache past its half-life: the server could not be reached.
    Fallback,
}

impl Source {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Server => "server",
            Source::Fallback => "cache_fallback",
        }
    }
}

impl JwtService {
    pub(crate) fn new(server: ServerLink, capacity: usize) -> Self {
        JwtService {
            server,
            cache: Mutex::new(JwtCache::new(capacity)),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// How many keys are being renewed now.
    #[cfg(test)]
    pub(crate) fn renewing(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, JwtCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token of `svid`'s identity for `audiences` (non-empty, sorted, no repeats):
    /// cached before its half-life, else from the server; if the server cannot be reached,
    /// a cached token that is still valid. `Ok(None)`: the server refused to sign for
    /// this entry (no longer authorized).
    pub(crate) async fn token_for(
        &self,
        svid: &CachedSvid,
        audiences: &[String],
        bundle: &Arc<TrustBundle>,
    ) -> Result<Option<Arc<str>>, Status> {
        let key = JwtCacheKey::new(svid.entry_id.clone(), svid.spiffe_id.clone(), audiences);
        if let Lookup::Fresh(j) =
            self.cache()
                .lookup(&key, bundle, carapace_core::clock::unix_now())
        {
            record(Source::Cache);
            return Ok(Some(j.token));
        }
        // One renewal per key at a time; whoever waited finds the fresh token.
        let hold = {
            let mut map = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            let gate = map.entry(key.clone()).or_default().clone();
            Inflight {
                map: &self.inflight,
                key: key.clone(),
                gate,
            }
        };
        let _turn = hold.gate.lock().await;
        let stale = match self
            .cache()
            .lookup(&key, bundle, carapace_core::clock::unix_now())
        {
            Lookup::Fresh(j) => {
                record(Source::Cache);
                return Ok(Some(j.token));
            }
            Lookup::Stale(j) => Some(j),
            Lookup::Missing => None,
        };
        let unreachable = |why: String| -> Result<Option<Arc<str>>, Status> {
            match &stale {
                Some(j) if carapace_core::clock::unix_now() < j.expires_at => {
                    tracing::warn!(
                        spiffe_id = %key.spiffe_id(),
                        expires_at = j.expires_at,
                        reason = %why,
                        "serving a cached JWT-SVID past its half-life: no new one could be had"
                    );
                    record(Source::Fallback);
                    Ok(Some(j.token.clone()))
                }
                _ => {
                    tracing::warn!(spiffe_id = %key.spiffe_id(), reason = %why, "no JWT-SVID to serve");
                    Err(Status::unavailable(format!(
                        "cannot get a JWT-SVID for {}: {why}",
                        key.spiffe_id()
                    )))
                }
            }
        };
        let Some(mut client) = self.server.client() else {
            return unreachable(
                "the agent has no connection to the server (it holds no identity)".into(),
            );
        };
        match node_client::new_jwt_svid(&mut client, key.entry_id(), key.audiences()).await {
            Ok(wire) => match check_issued(bundle, &key, &wire, SystemTime::now()) {
                Ok(jwt) => {
                    let token = jwt.token.clone();
                    self.cache()
                        .insert(key, jwt, bundle, carapace_core::clock::unix_now());
                    record(Source::Server);
                    Ok(Some(token))
                }
                Err(why) => {
                    tracing::error!(entry = %key.entry_id(), error = %why, "the server returned an unusable JWT-SVID");
                    unreachable(format!("the server returned an unusable JWT-SVID: {why}"))
                }
            },
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                tracing::warn!(
                    entry = %key.entry_id(),
                    error = s.message(),
                    "the server refused to sign a JWT-SVID for this entry; leaving it out"
                );
                self.cache().remove_entry(key.entry_id());
                Ok(None)
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                Err(Status::invalid_argument(s.message().to_owned()))
            }
            Err(s) => {
                let what = match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                        "the server could not be reached"
                    }
                    tonic::Code::Unauthenticated => "the server refused the agent",
                    _ => "the server did not sign it",
                };
                unreachable(format!("{what}: {} ({:?})", s.message(), s.code()))
            }
        }
    }
}

fn record(source: Source) {
    crate::metrics::metrics().jwt_svid(source.label());
}

/// The audiences of a `FetchJWTSVID` request: at least one, none empty; returned sorted
/// and without repeats.
pub(crate) fn requested_audiences(audience: &[String]) -> Result<Vec<String>, Status> {
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience is required"));
    }
    if audience.iter().any(String::is_empty) {
        return Err(Status::invalid_argument(
            "audience must not contain an empty string",
        ));
    }
    Ok(crate::jwt_cache::normalize_audiences(audience))
}

/// The JWT keys of `bundle` that parse, by kid; a key that does not is left out (and
/// logged).
pub fn key_set(bundle: &TrustBundle) -> KeySet {
    let mut set = KeySet::new();
    for k in &bundle.jwt_authorities {
        let added =
            PublicKey::from_spki_der(&k.public_key_der).and_then(|pk| set.insert(&k.kid, pk));
        if let Err(e) = added {
            tracing::warn!(kid = %jose::shown(&k.kid), error = %e, "ignoring an unusable JWT key of the bundle");
        }
    }
    set
}

/// The JWKS document of `bundle`'s JWT keys: `{"keys":[...]}`, each key with `kid`,
/// `kty`, its curve and coordinates or modulus and exponent, and `"use":"jwt-svid"`;
/// `{"keys":[]}` when there are none.
pub fn jwks(bundle: &TrustBundle) -> Vec<u8> {
    let keys: Vec<Value> = bundle
        .jwt_authorities
        .iter()
        .filter_map(|k| match PublicKey::from_spki_der(&k.public_key_der) {
            Ok(pk) => Some(Value::Object(pk.to_jwk(&k.kid, KEY_USE))),
            Err(e) => {
                tracing::warn!(kid = %jose::shown(&k.kid), error = %e, "leaving an unusable JWT key out of the JWT bundle");
                None
            }
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string().into_bytes()
}

/// `FetchJWTBundles`' message: the JWKS of the own trust domain and of each of the
/// caller's entitled `federated` ones, keyed by trust domain ID (`spiffe://<td>`, as
/// `FetchX509Bundles` keys its bundles).
pub(crate) fn jwt_bundles_response(
    bundle: &TrustBundle,
    federated: &[Arc<TrustBundle>],
) -> JwtBundlesResponse {
    JwtBundlesResponse {
        bundles: super::keyed_by_trust_domain(
            std::iter::once(bundle).chain(federated.iter().map(Arc::as_ref)),
            jwks,
        ),
    }
}

/// Checks a token the server returned for `key`: signed by a key of `bundle` under the
/// same rules as [`validate`], for the entry's SPIFFE ID, with exactly the audiences asked
/// for, current.
pub(crate) fn check_issued(
    bundle: &TrustBundle,
    key: &JwtCacheKey,
    wire: &JwtSvid,
    now: SystemTime,
) -> Result<CachedJwt, String> {
    // The token's own `sub` is what counts (checked below); the response's copy, when
    // set, must agree with it.
    if !wire.spiffe_id.is_empty() && wire.spiffe_id != key.spiffe_id().to_string() {
        return Err(format!(
            "it is for {}, not {}",
            jose::shown(&wire.spiffe_id),
            key.spiffe_id()
        ));
    }
    let first = key.audiences().first().ok_or("no audience was asked for")?;
    let (id, claims) = validate(bundle, &[], first, &wire.token, now)?;
    if id != *key.spiffe_id() {
        return Err(format!("its subject is {id}, not {}", key.spiffe_id()));
    }
    let aud = match claims.get("aud") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>(),
        _ => None,
    }
    .ok_or("its \"aud\" is not a list of strings")?;
    if crate::jwt_cache::normalize_audiences(&aud) != key.audiences() {
        return Err(format!(
            "its audience {:?} is not the one asked for, {:?}",
            aud,
            key.audiences()
        ));
    }
    let date = |name: &str| -> Result<i64, String> {
        match claims.get(name) {
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| format!("its {name:?} is not an integer")),
            _ => Err(format!("it has no {name:?}")),
        }
    };
    let expires_at = date("exp")?;
    let issued_at = date("iat")?;
    if issued_at > expires_at {
        return Err("it was issued after it expires".into());
    }
    let parts = jose::split(&wire.token, jose::MAX_TOKEN_BYTES).map_err(|e| e.to_string())?;
    let header: Map<String, Value> =
        serde_json::from_slice(&parts.header).map_err(|e| format!("its header: {e}"))?;
    let kid = match header.get("kid") {
        Some(Value::String(k)) => k.clone(),
        _ => return Err("its header has no \"kid\"".into()),
    };
    Ok(CachedJwt {
        token: Arc::from(wire.token.as_str()),
        kid,
        issued_at,
        expires_at,
    })
}

/// Validates a JWT-SVID for `audience` at `now` against the keys of the bundle of its
/// subject's trust domain: `own` (the agent's trust domain) or one of `federated` (the
/// foreign bundles the caller is entitled to). The algorithm in the asymmetric allowlist
/// and matching the key chosen by the header's `kid` (which must be in that bundle), a
/// good signature, `exp` not past and `nbf`/`iat` not future (with [`LEEWAY`]), `aud`
/// containing `audience`, and `sub` a SPIFFE ID of that trust domain (a token of any
/// other trust domain is refused, naming it: the caller may not use its keys, whether
/// or not the agent holds them for another workload). Returns the SPIFFE ID and the
/// claims, `aud` always as an array. The error names the reason, never the token.
pub fn validate(
    own: &TrustBundle,
    federated: &[Arc<TrustBundle>],
    audience: &str,
    token: &str,
    now: SystemTime,
) -> Result<(SpiffeId, Map<String, Value>), String> {
    let invalid = |e: carapace_core::Error| format!("invalid JWT-SVID: {e}");
    // Read unverified only to pick the trust domain whose keys verify the token.
    let unverified = jose::unverified_claims(token, jose::MAX_TOKEN_BYTES).map_err(invalid)?;
    let sub = unverified
        .required_string("sub")
        .map_err(|e| format!("invalid JWT-SVID: {e}"))?;
    let id: SpiffeId = sub
        .parse()
        .map_err(|e| format!("invalid JWT-SVID: the subject is not a SPIFFE ID: {e}"))?;
    let bundle = std::iter::once(own)
        .chain(federated.iter().map(Arc::as_ref))
        .find(|b| id.is_member_of(b.trust_domain()))
        .ok_or_else(|| {
            format!(
                "invalid JWT-SVID: the subject {id} is in trust domain {}, whose keys this \
                 caller may not use (it is not {} and the caller's entries do not federate \
                 with it)",
                id.trust_domain(),
                own.trust_domain()
            )
        })?;
    let keys = key_set(bundle);
    let policy = Policy {
        audience: Some(audience),
        ..Policy::new(&Algorithm::ALL, now, LEEWAY)
    };
    let claims = jose::verify(token, &keys, &policy).map_err(invalid)?;
    // The same payload was read twice; check anyway that nothing else is returned.
    if claims.string("sub").ok().flatten() != Some(sub) {
        return Err("invalid JWT-SVID: the subject changed between reads".into());
    }
    let mut claims = claims.into_map();
    if let Some(Value::String(one)) = claims.get("aud") {
        let one = one.clone();
        claims.insert("aud".into(), Value::Array(vec![Value::String(one)]));
    }
    Ok((id, claims))
}

/// JSON claims as a `google.protobuf.Struct`.
pub(crate) fn claims_struct(claims: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .into_iter()
            .map(|(k, v)| (k, proto_value(v)))
            .collect(),
    }
}

fn proto_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(proto_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(claims_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
