#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
//! `gcp_iit` end to end: the agent half against a loopback metadata server that speaks
//! the real path, query and header and mints tokens signed by keys generated here; the
//! server half verifies them with the production code, those keys as trust anchors.

mod common;
#[path = "common/jwt.rs"]
mod jwt_keys;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use carapace_attestor_cloud::gcp::{
    GcpAgentConfig, GcpIitAttestor, GcpIitAttestorClient, GcpServerConfig,
};
use carapace_attestor_cloud::tofu;
use carapace_core::Error;
use carapace_core::clock::{Clock as _, ManualClock};
use carapace_core::plugin::{
    AttestationResult, MemoryStateStore, NodeAttestor, NodeAttestorClient, NodeStateStore,
    PluginContext,
};
use common::{
    MetadataServer, attest_once, context, readmitted_once_after_eviction, rejected_with, selectors,
};
use jwt_keys::{TestKey, key, now, payload, rs256};

const AUDIENCE: &str = "spiffe://example.org";
const PROJECT: &str = "carapace-prod";
const INSTANCE_ID: &str = "4821650316384512345";
const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
const EMAIL: &str = "node@carapace-prod.iam.gserviceaccount.com";

/// The claims of a `format=full` identity token for instance `instance_id`.
fn claims(aud: &str, instance_id: &str) -> Value {
    let now = now();
    json!({
        "iss": "https://accounts.google.com",
        "aud": aud,
        "azp": "112233445566778899000",
        "sub": "112233445566778899000",
        "email": EMAIL,
        "email_verified": true,
        "iat": now,
        "exp": now + 3600,
        "google": {"compute_engine": {
            "instance_creation_timestamp": now - 86_400,
            "instance_id": instance_id,
            "instance_name": "web-1",
            "project_id": PROJECT,
            "project_number": 123_456_789_012_u64,
            "zone": "europe-west1-b",
        }},
    })
}

/// A metadata server that answers like Compute Engine's: 403 without
/// `Metadata-Flavor: Google`, 400 without an audience, the token's `aud` from the query
/// and the `google.compute_engine` claims only with `format=full`. Signs with `signer`.
async fn metadata_server(signer: &'static TestKey) -> MetadataServer {
    MetadataServer::start(Arc::new(move |seen| {
        let (path, query) = jwt_keys::split_query(&seen.path_and_query);
        if seen.method != "GET" || path != IDENTITY_PATH {
            return (404, b"Not Found".to_vec());
        }
        if seen.header("metadata-flavor") != Some("Google") {
            return (403, b"Missing Metadata-Flavor:Google header.".to_vec());
        }
        let Some(aud) = query.get("audience").filter(|a| !a.is_empty()) else {
            return (400, b"non-empty audience parameter required".to_vec());
        };
        let mut c = claims(aud, INSTANCE_ID);
        if query.get("format").map(String::as_str) != Some("full") {
            c.as_object_mut().unwrap().remove("google");
        }
        (200, rs256(signer, &c).into_bytes())
    }))
    .await
}

fn agent(url: &str, audience: &str) -> GcpIitAttestorClient {
    let cfg: GcpAgentConfig =
        serde_json::from_value(json!({"audience": audience, "metadata_url": url})).unwrap();
    GcpIitAttestorClient::new(&cfg).unwrap()
}

fn write(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn config(extra: Value) -> GcpServerConfig {
    let mut cfg = json!({
        "keys_path": "google-keys.json",
        "audience": AUDIENCE,
        "projectid_allowlist": [PROJECT, "carapace-dev"],
    });
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(cfg).unwrap()
}

/// A server half trusting `keys` (a JWKS written to the temp dir), with a fresh store.
struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<MemoryStateStore>,
    attestor: GcpIitAttestor,
}

impl Fixture {
    fn new(keys: &[&TestKey]) -> Fixture {
        Fixture::with(keys, json!({}))
    }

    fn with(keys: &[&TestKey], extra: Value) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "google-keys.json", &jwt_keys::jwks(keys));
        let store = Arc::new(MemoryStateStore::default());
        let attestor = GcpIitAttestor::new(
            &config(extra),
            &PluginContext::for_tests(dir.path()),
            store.clone(),
        )
        .unwrap();
        Fixture {
            dir,
            store,
            attestor,
        }
    }

    async fn attest(&self, payload: &[u8]) -> Result<AttestationResult, Error> {
        attest_once(&self.attestor, payload).await
    }

    async fn attest_token(&self, token: &str) -> Result<AttestationResult, Error> {
        self.attest(&payload(token)).await
    }
}

#[tokio::test]
async fn an_instance_attests_through_the_metadata_server_as_project_and_instance_id() {
    let metadata = metadata_server(key(0)).await;
    let fx = Fixture::new(&[key(0), key(1)]);
    let p = agent(&metadata.url, AUDIENCE)
        .payload(&context())
        .await
        .unwrap();

    let seen = metadata.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(
        seen[0].path_and_query,
        format!("{IDENTITY_PATH}?audience=spiffe%3A%2F%2Fexample.org&format=full")
    );
    assert_eq!(seen[0].header("metadata-flavor"), Some("Google"));

    let r = fx.attest(&p).await.unwrap();
    assert_eq!(r.agent_path, format!("{PROJECT}/{INSTANCE_ID}"));
    assert_eq!(
        selectors(&r),
        [
            "gcp_iit:instance_id:4821650316384512345",
            "gcp_iit:instance_name:web-1",
            "gcp_iit:project:carapace-prod",
            &format!("gcp_iit:service_account:{EMAIL}"),
            "gcp_iit:zone:europe-west1-b",
        ]
    );
    assert!(!r.can_reattest);
    assert_eq!(fx.store.len(), 1);
    let rec = fx
        .store
        .load(&format!("{PROJECT}/{INSTANCE_ID}"))
        .await
        .unwrap();
    assert!(rec.is_some(), "the instance's first use is recorded");
}

#[tokio::test]
async fn the_loopback_metadata_server_behaves_like_google_s() {
    // What the tests rely on: the header is required, and only format=full adds the
    // instance claims.
    let metadata = metadata_server(key(0)).await;
    let base = carapace_attestor_cloud::http::BaseUrl::parse(&metadata.url).unwrap();
    let t = std::time::Duration::from_secs(5);
    let r = base
        .request("GET", &format!("{IDENTITY_PATH}?audience=a"), &[], t)
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = base
        .request("GET", IDENTITY_PATH, &[("Metadata-Flavor", "Google")], t)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let r = base
        .request(
            "GET",
            &format!("{IDENTITY_PATH}?audience=spiffe%3A%2F%2Fexample.org"),
            &[("Metadata-Flavor", "Google")],
            t,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let token = String::from_utf8(r.body).unwrap();
    let fx = Fixture::new(&[key(0)]);
    rejected_with(fx.attest_token(&token).await, "format=full");
}

#[tokio::test]
async fn google_certificate_map_files_are_trust_anchors_too() {
    let metadata = metadata_server(key(1)).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "google-keys.json",
        &jwt_keys::cert_map(&[key(0), key(1)]),
    );
    let store: Arc<dyn NodeStateStore> = Arc::new(MemoryStateStore::default());
    let att = GcpIitAttestor::new(
        &config(json!({})),
        &PluginContext::for_tests(dir.path()),
        store,
    )
    .unwrap();
    let p = agent(&metadata.url, AUDIENCE)
        .payload(&context())
        .await
        .unwrap();
    let r = attest_once(&att, &p).await.unwrap();
    assert_eq!(r.agent_path, format!("{PROJECT}/{INSTANCE_ID}"));
}

#[tokio::test]
async fn a_token_minted_for_another_audience_is_rejected() {
    let metadata = metadata_server(key(0)).await;
    let fx = Fixture::new(&[key(0)]);
    let p = agent(&metadata.url, "spiffe://other.example")
        .payload(&context())
        .await
        .unwrap();
    rejected_with(
        fx.attest(&p).await,
        "audience \"spiffe://other.example\" is not the configured audience \"spiffe://example.org\"",
    );
    // An array audience is accepted only when the configured one is a member.
    let mut c = claims(AUDIENCE, "1");
    c["aud"] = json!(["spiffe://other.example", "spiffe://example.org/x"]);
    rejected_with(
        fx.attest_token(&rs256(key(0), &c)).await,
        "not the configured",
    );
    c["aud"] = json!(["spiffe://other.example", AUDIENCE]);
    fx.attest_token(&rs256(key(0), &c)).await.unwrap();
    assert_eq!(
        fx.store.len(),
        1,
        "only the accepted attestation is recorded"
    );
}

#[tokio::test]
async fn a_trusted_key_s_token_from_another_issuer_is_rejected() {
    let fx = Fixture::new(&[key(0)]);
    for iss in [
        "https://evil.example",
        "https://accounts.google.com/",
        "https://securetoken.google.com/carapace-prod",
    ] {
        let mut c = claims(AUDIENCE, INSTANCE_ID);
        c["iss"] = json!(iss);
        rejected_with(
            fx.attest_token(&rs256(key(0), &c)).await,
            &format!("issuer {iss:?} is not Google's"),
        );
    }
    let mut c = claims(AUDIENCE, INSTANCE_ID);
    c.as_object_mut().unwrap().remove("iss");
    rejected_with(fx.attest_token(&rs256(key(0), &c)).await, "no \"iss\"");
    // The short form is Google's too.
    c["iss"] = json!("accounts.google.com");
    fx.attest_token(&rs256(key(0), &c)).await.unwrap();
}

#[tokio::test]
async fn an_instance_of_a_project_not_in_the_allowlist_is_rejected() {
    let fx = Fixture::new(&[key(0)]);
    let mut c = claims(AUDIENCE, INSTANCE_ID);
    c["google"]["compute_engine"]["project_id"] = json!("someone-elses");
    rejected_with(
        fx.attest_token(&rs256(key(0), &c)).await,
        "project \"someone-elses\" is not in projectid_allowlist",
    );
    assert!(fx.store.is_empty());
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_rejected() {
    let fx = Fixture::new(&[key(0)]);
    let now = now();
    let mut c = claims(AUDIENCE, "1");
    c["iat"] = json!(now - 7200);
    c["exp"] = json!(now - 3600);
    rejected_with(fx.attest_token(&rs256(key(0), &c)).await, "expired at");
    let mut c = claims(AUDIENCE, "2");
    c["nbf"] = json!(now + 3600);
    rejected_with(
        fx.attest_token(&rs256(key(0), &c)).await,
        "not valid before",
    );
    let mut c = claims(AUDIENCE, "3");
    c["iat"] = json!(now + 3600);
    rejected_with(
        fx.attest_token(&rs256(key(0), &c)).await,
        "issued in the future",
    );
    let mut c = claims(AUDIENCE, "4");
    c.as_object_mut().unwrap().remove("exp");
    rejected_with(fx.attest_token(&rs256(key(0), &c)).await, "no \"exp\"");
    // Within the 30 s clock skew.
    let mut c = claims(AUDIENCE, "5");
    c["exp"] = json!(now - 5);
    fx.attest_token(&rs256(key(0), &c)).await.unwrap();
    // A smaller skew refuses it.
    let strict = Fixture::with(&[key(0)], json!({"clock_skew": "1s"}));
    rejected_with(strict.attest_token(&rs256(key(0), &c)).await, "expired at");
}

/// Tokens are checked, and first uses recorded, at the attestor's clock (its context's):
/// a token accepted now is refused as expired once that clock has moved two hours on,
/// and the trust-on-first-use record holds the clock's time, not the system's.
#[tokio::test]
async fn tokens_are_checked_and_attestations_recorded_at_the_contexts_clock() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "google-keys.json", &jwt_keys::jwks(&[key(0)]));
    let store = Arc::new(MemoryStateStore::default());
    let clock = Arc::new(ManualClock::starting_now());
    clock.set_unix(clock.unix_now() + 600); // ten minutes ahead of the system
    let attestor = GcpIitAttestor::new(
        &config(json!({})),
        &PluginContext::for_tests(dir.path()).with_clock(clock.clone()),
        store.clone(),
    )
    .unwrap();
    let r = attest_once(&attestor, &payload(&rs256(key(0), &claims(AUDIENCE, "1"))))
        .await
        .unwrap();
    let record = store
        .load(&attestor.forget_on_eviction(&r.agent_path).unwrap())
        .await
        .unwrap()
        .unwrap();
    let record: tofu::Record = serde_json::from_slice(&record).unwrap();
    assert_eq!(record.attested_at, clock.unix_now().unsigned_abs());

    let token = rs256(key(0), &claims(AUDIENCE, "2"));
    clock.advance(Duration::from_secs(2 * 3_600));
    rejected_with(attest_once(&attestor, &payload(&token)).await, "expired at");
    assert_eq!(store.len(), 1, "a refused token records nothing");
}

#[tokio::test]
async fn an_instance_attests_once_unless_reattestation_is_allowed() {
    let fx = Fixture::new(&[key(0)]);
    // A rejected attempt first: it must not use up the instance's first attestation.
    rejected_with(
        fx.attest_token(&rs256(
            key(0),
            &claims("spiffe://other.example", INSTANCE_ID),
        ))
        .await,
        "audience",
    );
    assert!(fx.store.is_empty());
    let token = rs256(key(0), &claims(AUDIENCE, INSTANCE_ID));
    let first = fx.attest_token(&token).await.unwrap();
    // The same token again, and a fresh one for the same instance.
    for t in [token.clone(), rs256(key(0), &claims(AUDIENCE, INSTANCE_ID))] {
        let err = fx.attest_token(&t).await.unwrap_err();
        assert!(matches!(err, Error::AttestationReplay(_)), "{err:?}");
    }
    // Evicting the agent deletes the record its attestor names: admitted once more.
    readmitted_once_after_eviction(&fx.attestor, &fx.store, &first.agent_path, &payload(&token))
        .await;
    // Another server (another attestor instance) sharing the datastore refuses too.
    let store: Arc<dyn NodeStateStore> = fx.store.clone();
    let other = GcpIitAttestor::new(
        &config(json!({})),
        &PluginContext::for_tests(fx.dir.path()),
        store,
    )
    .unwrap();
    let err = attest_once(
        &other,
        &payload(&rs256(key(0), &claims(AUDIENCE, INSTANCE_ID))),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::AttestationReplay(_)), "{err:?}");
    // A different instance is not affected.
    fx.attest_token(&rs256(key(0), &claims(AUDIENCE, "77")))
        .await
        .unwrap();

    // With allow_reattestation the same instance attests again and again.
    let store: Arc<dyn NodeStateStore> = fx.store.clone();
    let lenient = GcpIitAttestor::new(
        &config(json!({"allow_reattestation": true})),
        &PluginContext::for_tests(fx.dir.path()),
        store,
    )
    .unwrap();
    for _ in 0..2 {
        let r = attest_once(
            &lenient,
            &payload(&rs256(key(0), &claims(AUDIENCE, INSTANCE_ID))),
        )
        .await
        .unwrap();
        assert!(r.can_reattest);
    }
}

#[tokio::test]
async fn tokens_not_signed_with_rs256_are_rejected_naming_the_algorithm() {
    let fx = Fixture::new(&[key(0)]);
    let c = claims(AUDIENCE, INSTANCE_ID);
    let jwks_file = std::fs::read(fx.dir.path().join("google-keys.json")).unwrap();
    rejected_with(
        fx.attest_token(&jwt_keys::unsigned(&key(0).kid, &c)).await,
        "algorithm is \"none\"; only RS256",
    );
    // The confusion attack: HMAC keyed with what the verifier knows as public.
    for secret in [&jwks_file[..], &key(0).n, key(0).pkcs8_pem.as_bytes()] {
        rejected_with(
            fx.attest_token(&jwt_keys::hs256(&key(0).kid, secret, &c))
                .await,
            "algorithm is \"HS256\"",
        );
    }
    rejected_with(
        fx.attest_token(&jwt_keys::rs512(key(0), &c)).await,
        "algorithm is \"RS512\"",
    );
    for alg in ["PS256", "ES256", "RS384"] {
        let header = json!({"alg": alg, "kid": key(0).kid});
        rejected_with(
            fx.attest_token(&jwt_keys::rs256_with_header(key(0), &header, &c))
                .await,
            &format!("algorithm is {alg:?}"),
        );
    }
    assert!(fx.store.is_empty());
}

#[tokio::test]
async fn unknown_kids_and_untrusted_keys_are_rejected() {
    let fx = Fixture::new(&[key(0)]);
    let c = claims(AUDIENCE, INSTANCE_ID);
    rejected_with(
        fx.attest_token(&rs256(key(1), &c)).await,
        "signed with key \"kid-1\", which is not among the configured keys (kid-0)",
    );
    // A trusted kid in the header does not make another key's signature good.
    let header = json!({"alg": "RS256", "kid": key(0).kid});
    rejected_with(
        fx.attest_token(&jwt_keys::rs256_with_header(key(1), &header, &c))
            .await,
        "signature does not verify with key \"kid-0\"",
    );
    let no_kid = json!({"alg": "RS256"});
    rejected_with(
        fx.attest_token(&jwt_keys::rs256_with_header(key(0), &no_kid, &c))
            .await,
        "no \"kid\"",
    );
}

#[tokio::test]
async fn a_flipped_signature_bit_is_rejected() {
    let fx = Fixture::new(&[key(0)]);
    let token = rs256(key(0), &claims(AUDIENCE, INSTANCE_ID));
    rejected_with(
        fx.attest_token(&jwt_keys::flip_signature_bit(&token)).await,
        "signature does not verify",
    );
    fx.attest_token(&token).await.unwrap();
}

#[tokio::test]
async fn a_token_without_format_full_claims_is_rejected() {
    let fx = Fixture::new(&[key(0)]);
    let mut c = claims(AUDIENCE, INSTANCE_ID);
    c.as_object_mut().unwrap().remove("google");
    rejected_with(
        fx.attest_token(&rs256(key(0), &c)).await,
        "no google.compute_engine claims: the agent must request it with format=full",
    );
    let mut c = claims(AUDIENCE, INSTANCE_ID);
    c["google"]["compute_engine"]
        .as_object_mut()
        .unwrap()
        .remove("zone");
    rejected_with(
        fx.attest_token(&rs256(key(0), &c)).await,
        "google.compute_engine.zone is missing",
    );
    // Claims that are not SPIFFE path segments are refused, not rewritten.
    rejected_with(
        fx.attest_token(&rs256(key(0), &claims(AUDIENCE, "12/../34")))
            .await,
        "instance_id \"12/../34\" is not a valid SPIFFE ID path segment",
    );
    assert!(fx.store.is_empty());
}

#[tokio::test]
async fn a_replaced_keys_file_takes_effect_without_a_restart() {
    let fx = Fixture::new(&[key(0)]);
    let by_new_key = rs256(key(2), &claims(AUDIENCE, "1"));
    rejected_with(
        fx.attest_token(&by_new_key).await,
        "\"kid-2\", which is not among",
    );

    // The operator's cron job fetches Google's new keys.
    write(
        fx.dir.path(),
        "google-keys.json",
        &jwt_keys::jwks(&[key(2)]),
    );
    fx.attest_token(&by_new_key).await.unwrap();
    rejected_with(
        fx.attest_token(&rs256(key(0), &claims(AUDIENCE, "2")))
            .await,
        "\"kid-0\", which is not among the configured keys (kid-2)",
    );

    // A broken download keeps the last good keys.
    write(
        fx.dir.path(),
        "google-keys.json",
        "<html>rate limited</html>",
    );
    fx.attest_token(&rs256(key(2), &claims(AUDIENCE, "3")))
        .await
        .unwrap();
    // So does a deleted file.
    std::fs::remove_file(fx.dir.path().join("google-keys.json")).unwrap();
    fx.attest_token(&rs256(key(2), &claims(AUDIENCE, "4")))
        .await
        .unwrap();
    // The next good file is picked up.
    write(
        fx.dir.path(),
        "google-keys.json",
        &jwt_keys::jwks(&[key(0), key(2)]),
    );
    fx.attest_token(&rs256(key(0), &claims(AUDIENCE, "5")))
        .await
        .unwrap();
    // So is a rewrite in place (same inode).
    std::fs::write(
        fx.dir.path().join("google-keys.json"),
        jwt_keys::jwks(&[key(2)]),
    )
    .unwrap();
    rejected_with(
        fx.attest_token(&rs256(key(0), &claims(AUDIENCE, "6")))
            .await,
        "\"kid-0\", which is not among",
    );
}

#[tokio::test]
async fn metadata_errors_and_an_unreachable_metadata_server_are_unavailable() {
    let metadata = metadata_server(key(0)).await;
    let cfg: GcpAgentConfig = serde_json::from_value(json!({
        "audience": AUDIENCE,
        "metadata_url": metadata.url,
        "service_account": "missing@carapace-prod.iam.gserviceaccount.com",
    }))
    .unwrap();
    let err = GcpIitAttestorClient::new(&cfg)
        .unwrap()
        .payload(&context())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("HTTP 404"), "{err}");

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = agent(&format!("http://127.0.0.1:{port}"), AUDIENCE)
        .payload(&context())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");

    // A 200 that is not a token.
    let junk = MetadataServer::start(Arc::new(|_| (200, b"<html>hi</html>".to_vec()))).await;
    let err = agent(&junk.url, AUDIENCE)
        .payload(&context())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not a JWT"), "{err}");
}

#[tokio::test]
async fn malformed_payloads_and_challenges_are_refused() {
    let fx = Fixture::new(&[key(0)]);
    let token = rs256(key(0), &claims(AUDIENCE, INSTANCE_ID));
    for (p, want) in [
        (
            json!({"version": 2, "token": token})
                .to_string()
                .into_bytes(),
            "payload version 2, this server 1",
        ),
        (b"{\"version\":1,".to_vec(), "the payload is not JSON"),
        (
            json!({"version": 1, "token": token, "nonce": "x"})
                .to_string()
                .into_bytes(),
            "unknown member \"nonce\"",
        ),
        (vec![b' '; 64 * 1024 + 1], "more than 65536"),
        (payload("not-a-jwt"), "1 dot-separated parts"),
    ] {
        let msg = rejected_with(fx.attest(&p).await, want);
        assert!(!msg.contains(&token), "the token leaked into {msg}");
    }
    let err = agent("http://127.0.0.1:1", AUDIENCE)
        .answer(b"{}", &context())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has none"), "{err}");
    assert!(fx.store.is_empty());
}

#[test]
fn bad_server_settings_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = || -> Arc<dyn NodeStateStore> { Arc::new(MemoryStateStore::default()) };
    let new = |cfg: &GcpServerConfig| {
        GcpIitAttestor::new(cfg, &PluginContext::for_tests(dir.path()), store())
            .unwrap_err()
            .to_string()
    };

    let err = serde_json::from_value::<GcpServerConfig>(json!({
        "keys_path": "k.json", "projectid_allowlist": [PROJECT],
    }))
    .unwrap_err();
    assert!(
        err.to_string().contains("missing field `audience`"),
        "{err}"
    );
    let err = serde_json::from_value::<GcpServerConfig>(json!({
        "keys_path": "k.json", "audience": AUDIENCE, "projectid_allowlist": [PROJECT],
        "project_allowlist": [PROJECT],
    }))
    .unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");

    let problems = config(json!({"audience": " ", "projectid_allowlist": [], "clock_skew": "1h"}))
        .validate()
        .unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].contains("audience is empty"), "{problems:?}");
    assert!(
        problems[1].contains("projectid_allowlist is empty"),
        "{problems:?}"
    );
    assert!(problems[2].contains("clock_skew 3600s"), "{problems:?}");
    let problems = config(json!({"projectid_allowlist": ["ok", "google.com:legacy"]}))
        .validate()
        .unwrap_err();
    assert!(
        problems[0].contains("\"google.com:legacy\""),
        "{problems:?}"
    );
    assert_eq!(
        config(json!({"clock_skew": "45s"})).clock_skew,
        std::time::Duration::from_secs(45)
    );

    // Key files: missing, not keys, a weak key, and (relative to the base dir) good.
    let err = new(&config(json!({})));
    assert!(err.contains("node_attestor.gcp_iit"), "{err}");
    assert!(err.contains("google-keys.json"), "{err}");
    assert!(err.contains("No such file"), "{err}");
    write(dir.path(), "google-keys.json", "{\"keys\": 5}");
    assert!(new(&config(json!({}))).contains("\"keys\" is not an array"));
    write(dir.path(), "google-keys.json", "[1, 2]");
    assert!(new(&config(json!({}))).contains("neither a JWKS"));
    write(
        dir.path(),
        "google-keys.json",
        &jwt_keys::jwks(&[key(0), jwt_keys::weak_key()]),
    );
    let err = new(&config(json!({})));
    assert!(
        err.contains("kid \"weak\"): the RSA modulus is 1024 bits; at least 2048 are required"),
        "{err}"
    );
    write(dir.path(), "google-keys.json", &jwt_keys::jwks(&[key(0)]));
    GcpIitAttestor::new(
        &config(json!({})),
        &PluginContext::for_tests(dir.path()),
        store(),
    )
    .unwrap();
    // An absolute keys_path ignores the base dir.
    let abs = dir.path().join("google-keys.json");
    GcpIitAttestor::new(
        &config(json!({"keys_path": abs})),
        &PluginContext::for_tests(Path::new("/nonexistent")),
        store(),
    )
    .unwrap();
}

#[test]
fn bad_agent_settings_are_refused_with_the_reason() {
    let err = serde_json::from_value::<GcpAgentConfig>(json!({})).unwrap_err();
    assert!(
        err.to_string().contains("missing field `audience`"),
        "{err}"
    );
    let cfg: GcpAgentConfig = serde_json::from_value(json!({
        "audience": "",
        "service_account": "a/../b",
        "metadata_url": "https://metadata.google.internal",
        "timeout": "0s",
    }))
    .unwrap();
    let problems = cfg.validate().unwrap_err();
    assert_eq!(problems.len(), 4, "{problems:?}");
    let err = GcpIitAttestorClient::new(&cfg).unwrap_err().to_string();
    assert!(err.contains("service_account \"a/../b\""), "{err}");
    assert!(err.contains("must start with http://"), "{err}");
    let cfg: GcpAgentConfig = serde_json::from_value(json!({"audience": AUDIENCE})).unwrap();
    assert_eq!(cfg.service_account, "default");
    assert_eq!(cfg.metadata_url, "http://metadata.google.internal");
    assert_eq!(cfg.timeout, std::time::Duration::from_secs(5));
    GcpIitAttestorClient::new(&cfg).unwrap();
}
