use std::time::{Duration, SystemTime};

use carapace_core::jose::{Algorithm, KeySet, Policy};
use carapace_core::plugin::KeyManager;
use carapace_core::{KeyType, TrustBundle, TrustDomain};
use carapace_keymanager_soft::MemoryKeyManager;

use super::*;
use crate::ca::{CaManager, CaSettings, ROTATE_INTERVAL};
use crate::datastore::Datastore;

const T0: i64 = 1_900_000_000;

fn settings(ttl: u64, jwt_key_type: KeyType) -> CaSettings {
    CaSettings {
        ca_ttl: Duration::from_secs(ttl),
        key_type: KeyType::EcP256,
        organization: "Carapace".into(),
        country: "US".into(),
        jwt_key_type,
        server_id: "server-1".into(),
        path_len: 0,
    }
}

async fn load(
    ds: &Datastore,
    km: &Arc<MemoryKeyManager>,
    ttl: u64,
    key_type: KeyType,
    now: i64,
) -> Arc<CaManager> {
    let td = TrustDomain::new("example.org").unwrap();
    CaManager::load(
        td,
        km.clone(),
        None,
        ds.clone(),
        settings(ttl, key_type),
        now,
    )
    .await
    .unwrap()
}

async fn fresh(ttl: u64, key_type: KeyType) -> (Arc<CaManager>, Datastore, Arc<MemoryKeyManager>) {
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(&ds, &km, ttl, key_type, T0).await;
    (ca, ds, km)
}

fn request(aud: &[&str], ttl: u64) -> JwtRequest {
    JwtRequest {
        spiffe_id: "spiffe://example.org/web".parse().unwrap(),
        audiences: aud.iter().map(|a| a.to_string()).collect(),
        ttl: Duration::from_secs(ttl),
        issuer: None,
        include_jti: false,
    }
}

fn key_set(bundle: &TrustBundle) -> KeySet {
    let mut set = KeySet::new();
    for k in &bundle.jwt_authorities {
        set.insert(
            &k.kid,
            jose::PublicKey::from_spki_der(&k.public_key_der).unwrap(),
        )
        .unwrap();
    }
    set
}

/// Verifies `token` against the bundle as a relying party would at `now`.
fn verify_at(
    token: &str,
    bundle: &TrustBundle,
    aud: &str,
    now: i64,
) -> Result<jose::Claims, carapace_core::Error> {
    let mut policy = Policy::new(
        &Algorithm::ALL,
        SystemTime::UNIX_EPOCH + Duration::from_secs(now as u64),
        Duration::ZERO,
    );
    policy.audience = Some(aud);
    jose::verify(token, &key_set(bundle), &policy)
}

fn header(token: &str) -> serde_json::Value {
    serde_json::from_slice(&jose::split(token, 1 << 16).unwrap().header).unwrap()
}

#[tokio::test]
async fn a_first_start_publishes_one_key_whose_kid_is_its_thumbprint_and_tokens_verify() {
    let (ca, _, km) = fresh(86_400, KeyType::EcP256).await;
    let bundle = ca.bundle().borrow().clone();
    assert_eq!(bundle.jwt_authorities.len(), 1);
    let key = &bundle.jwt_authorities[0];
    assert_eq!(
        key.kid,
        jose::PublicKey::from_spki_der(&key.public_key_der)
            .unwrap()
            .thumbprint()
    );
    assert_eq!(key.expires_at, Some(T0 + 86_400));
    // The key is in the key manager, under the id the journal names.
    let slot = ca.jwt_active().unwrap();
    assert_eq!(
        km.get_key(slot.key_id()).await.unwrap().public_key_der(),
        key.public_key_der.as_slice()
    );

    let issued = jwt_sign_now(&ca, request(&["b", "a"], 300), T0 + 5).await;
    assert_eq!((issued.issued_at, issued.expires_at), (T0 + 5, T0 + 305));
    let h = header(&issued.token);
    assert_eq!(h["alg"], "ES256");
    assert_eq!(h["typ"], "JWT");
    assert_eq!(h["kid"], key.kid.as_str());
    let claims = verify_at(&issued.token, &bundle, "a", T0 + 6).unwrap();
    let m = claims.as_map();
    assert_eq!(m["sub"], "spiffe://example.org/web");
    assert_eq!(m["aud"], serde_json::json!(["b", "a"]));
    assert_eq!(
        (m["iat"].as_i64(), m["exp"].as_i64()),
        (Some(T0 + 5), Some(T0 + 305))
    );
    assert!(!m.contains_key("iss") && !m.contains_key("jti"), "{m:?}");
    // A relying party at exp refuses it; one asking for another audience too.
    assert!(verify_at(&issued.token, &bundle, "a", T0 + 306).is_err());
    assert!(verify_at(&issued.token, &bundle, "c", T0 + 6).is_err());
}

async fn jwt_sign_now(ca: &Arc<CaManager>, req: JwtRequest, now: i64) -> IssuedJwt {
    ca.issue_jwt_svid(req, now).await.unwrap()
}

#[tokio::test]
async fn issuer_and_jti_are_set_when_asked_and_each_jti_is_new() {
    let (ca, _, _) = fresh(86_400, KeyType::EcP256).await;
    let bundle = ca.bundle().borrow().clone();
    let mut req = request(&["x"], 60);
    req.issuer = Some("https://oidc.example.org".into());
    req.include_jti = true;
    let a = jwt_sign_now(&ca, req.clone(), T0 + 1).await;
    let b = jwt_sign_now(&ca, req, T0 + 1).await;
    let ca_claims = verify_at(&a.token, &bundle, "x", T0 + 2).unwrap();
    let cb_claims = verify_at(&b.token, &bundle, "x", T0 + 2).unwrap();
    assert_eq!(ca_claims.as_map()["iss"], "https://oidc.example.org");
    let (ja, jb) = (&ca_claims.as_map()["jti"], &cb_claims.as_map()["jti"]);
    assert_eq!(ja.as_str().unwrap().len(), 32);
    assert_ne!(ja, jb);
}

#[tokio::test]
async fn each_jwt_key_type_signs_with_its_algorithm() {
    for (key_type, alg) in [
        (KeyType::EcP256, "ES256"),
        (KeyType::EcP384, "ES384"),
        (KeyType::Rsa2048, "RS256"),
    ] {
        let (ca, _, _) = fresh(86_400, key_type).await;
        let bundle = ca.bundle().borrow().clone();
        let issued = jwt_sign_now(&ca, request(&["x"], 60), T0 + 1).await;
        assert_eq!(header(&issued.token)["alg"], alg);
        verify_at(&issued.token, &bundle, "x", T0 + 2).unwrap();
    }
}

#[tokio::test]
async fn exp_never_passes_the_keys_not_after_and_a_lapsed_key_signs_nothing() {
    let (ca, _, _) = fresh(3600, KeyType::EcP256).await;
    let slot = ca.jwt_active().unwrap();
    let issued = jwt_sign_now(&ca, request(&["x"], 600), slot.not_after() - 60).await;
    assert_eq!(issued.expires_at, slot.not_after());
    let err = sign(&slot, &request(&["x"], 600), slot.not_after()).unwrap_err();
    assert!(err.to_string().contains("has expired"), "{err}");
}

#[tokio::test]
async fn bad_audiences_are_refused_naming_what_is_wrong() {
    let (ca, _, _) = fresh(86_400, KeyType::EcP256).await;
    let long = "a".repeat(MAX_AUDIENCE_LEN + 1);
    let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| i.to_string()).collect();
    for (auds, want) in [
        (vec![], "audience is required"),
        (
            vec!["ok".to_string(), String::new()],
            "audience[1] is empty",
        ),
        (vec![long], "bytes long"),
        (vec!["a\nb".to_string()], "control character"),
        (many, "at most 32"),
    ] {
        let mut req = request(&[], 60);
        req.audiences = auds;
        let err = ca.issue_jwt_svid(req, T0 + 1).await.unwrap_err();
        assert!(err.to_string().contains(want), "{err} !~ {want}");
    }
}

#[tokio::test]
async fn ten_restarts_reuse_the_key_and_the_published_set_stays_one_key() {
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let first = load(&ds, &km, 86_400, KeyType::EcP256, T0).await;
    let kid = first.jwt_active().unwrap().kid().to_owned();
    drop(first);
    for i in 1..=10 {
        let ca = load(&ds, &km, 86_400, KeyType::EcP256, T0 + i * 60).await;
        let bundle = ca.bundle().borrow().clone();
        let kids: Vec<&str> = bundle
            .jwt_authorities
            .iter()
            .map(|k| k.kid.as_str())
            .collect();
        assert_eq!(kids, vec![kid.as_str()], "restart {i}");
        // The stored bundle (what peers and a restarted server read) says the same.
        let stored = ds.get_bundle(ca.trust_domain()).await.unwrap().unwrap();
        assert_eq!(stored.jwt_authorities.len(), 1, "restart {i}");
    }
    let jwt_keys = km
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.id.starts_with("jwt-key-"))
        .count();
    assert_eq!(jwt_keys, 1);
}

#[tokio::test]
async fn rotation_keeps_at_most_three_keys_and_every_token_verifies_until_it_expires() {
    // A one-hour key life: prepared at 30 min, activated at 50 min (it was published
    // 20 min before: more than three refresh periods), each old key kept until the last
    // token it signed has expired.
    let (ca, _, km) = fresh(3600, KeyType::EcP256).await;
    let mut outstanding: Vec<IssuedJwt> = Vec::new();
    let mut kids_seen = std::collections::BTreeSet::new();
    let mut activations = 0;
    let mut last_active = ca.jwt_active().unwrap().kid().to_owned();
    let mut first_seen = std::collections::BTreeMap::new();
    let step = ROTATE_INTERVAL.as_secs() as i64;
    let mut now = T0;
    while now < T0 + 5 * 3600 {
        now += step;
        ca.tick(now).await.unwrap();
        let bundle = ca.bundle().borrow().clone();
        assert!(
            bundle.jwt_authorities.len() <= 3,
            "{} keys at {now}",
            bundle.jwt_authorities.len()
        );
        for k in &bundle.jwt_authorities {
            first_seen.entry(k.kid.clone()).or_insert(now);
        }
        let active = ca.jwt_active().unwrap();
        if active.kid() != last_active {
            activations += 1;
            // It was in the bundle three refresh periods before it signed.
            let published = first_seen[active.kid()];
            assert!(
                now - published >= PUBLISH_PERIODS * crate::ca::REFRESH_HINT as i64,
                "activated {}s after publication",
                now - published
            );
            last_active = active.kid().to_owned();
        }
        kids_seen.insert(active.kid().to_owned());
        // A five-minute token every minute or so.
        if now % 60 < step {
            outstanding.push(jwt_sign_now(&ca, request(&["x"], 300), now).await);
        }
        outstanding.retain(|t| t.expires_at > now);
        for t in &outstanding {
            verify_at(&t.token, &bundle, "x", now)
                .unwrap_or_else(|e| panic!("a live token stopped verifying at {now}: {e}"));
        }
    }
    assert!(
        activations >= 5,
        "{activations} activations in five key lives"
    );
    // Only the keys still in the bundle are in the key manager.
    let bundle = ca.bundle().borrow().clone();
    let in_km = km
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.id.starts_with("jwt-key-"))
        .count();
    assert_eq!(in_km, bundle.jwt_authorities.len());
    assert!(kids_seen.len() >= 6);
}

#[tokio::test]
async fn the_rotator_waits_three_refresh_periods_before_activating_a_prepared_key() {
    let (ca, _, _) = fresh(3600, KeyType::EcP256).await;
    let first = ca.jwt_active().unwrap().kid().to_owned();
    // Prepared by the operator just before the activation point.
    let activate_at = T0 + 3600 - 600;
    let prepared = ca.prepare_jwt(activate_at - 10).await.unwrap();
    ca.tick(activate_at).await.unwrap();
    assert_eq!(ca.jwt_active().unwrap().kid(), first, "activated too early");
    ca.tick(activate_at - 10 + 3 * 300).await.unwrap();
    assert_eq!(ca.jwt_active().unwrap().kid(), prepared.id);
}

#[tokio::test]
async fn operator_prepare_activate_taint_revoke() {
    let (ca, _, km) = fresh(86_400, KeyType::EcP256).await;
    let first = ca.jwt_active().unwrap().kid().to_owned();
    let now = T0 + 100;
    let token = jwt_sign_now(&ca, request(&["x"], 300), now).await;

    // Activate with nothing prepared; taint the active one; a malformed id.
    let err = ca.activate_jwt(None, now).await.unwrap_err();
    assert!(
        err.to_string().contains("no prepared JWT authority"),
        "{err}"
    );
    let err = ca.taint_jwt(&first).await.unwrap_err();
    assert!(err.to_string().contains("active JWT authority"), "{err}");
    let err = ca.taint_jwt("not a kid!").await.unwrap_err();
    assert!(err.to_string().contains("not a JWT key id"), "{err}");

    let p = ca.prepare_jwt(now).await.unwrap();
    assert_eq!(p.status, AuthorityStatus::Prepared);
    assert_eq!(ca.bundle().borrow().jwt_authorities.len(), 2);
    // Preparing again replaces the prepared key and deletes it.
    let p2 = ca.prepare_jwt(now).await.unwrap();
    assert_ne!(p.id, p2.id);
    assert_eq!(ca.bundle().borrow().jwt_authorities.len(), 2);
    let err = ca.activate_jwt(Some(&p.id), now).await.unwrap_err();
    assert!(err.to_string().contains("is not the prepared"), "{err}");
    let a = ca.activate_jwt(Some(&p2.id), now).await.unwrap();
    assert_eq!(a.status, AuthorityStatus::Active);
    let list = ca.jwt_authorities();
    assert_eq!(
        list.iter()
            .map(|a| (a.id.as_str(), a.status))
            .collect::<Vec<_>>(),
        vec![
            (p2.id.as_str(), AuthorityStatus::Active),
            (first.as_str(), AuthorityStatus::Old)
        ]
    );
    // The old key stays until the token it signed expires.
    assert_eq!(list[1].expires_at, token.expires_at);
    verify_at(&token.token, &ca.bundle().borrow(), "x", now + 1).unwrap();

    // A third key cannot become active while the old one still verifies tokens.
    ca.prepare_jwt(now).await.unwrap();
    let err = ca.activate_jwt(None, now).await.unwrap_err();
    assert!(err.to_string().contains("still verifies tokens"), "{err}");
    assert_eq!(ca.bundle().borrow().jwt_authorities.len(), 3);

    // Revoke needs a taint first; taint marks it in the bundle for the agents.
    let err = ca.revoke_jwt(&first).await.unwrap_err();
    assert!(err.to_string().contains("taint it first"), "{err}");
    ca.taint_jwt(&first).await.unwrap();
    assert_eq!(ca.bundle().borrow().tainted_jwt_kids, vec![first.clone()]);
    let err = ca.taint_jwt(&first).await.unwrap_err();
    assert!(err.to_string().contains("already tainted"), "{err}");
    let before = ca.bundle().borrow().sequence;
    ca.revoke_jwt(&first).await.unwrap();
    let bundle = ca.bundle().borrow().clone();
    assert!(bundle.sequence > before);
    assert!(bundle.jwt_authorities.iter().all(|k| k.kid != first));
    assert!(bundle.tainted_jwt_kids.is_empty());
    // What it signed no longer verifies, and its key is gone from the key manager.
    assert!(verify_at(&token.token, &bundle, "x", now + 1).is_err());
    let ids: Vec<String> = km
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert!(!ids.iter().any(|i| i == "jwt-key-1"), "{ids:?}");
    let err = ca.revoke_jwt(&first).await.unwrap_err();
    assert!(err.to_string().contains("no JWT authority"), "{err}");
    // Now the next key may be activated.
    ca.activate_jwt(None, now).await.unwrap();
}

#[tokio::test]
async fn a_journal_from_before_jwt_keys_loads_and_gains_one() {
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(&ds, &km, 86_400, KeyType::EcP256, T0).await;
    let x509 = ca.active().unwrap().key_id.clone();
    drop(ca);
    // Strip the JWT keys from the journal, as a release before them wrote it.
    let bytes = ds.load_ca_journal("server-1").await.unwrap().unwrap();
    let mut j: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    j.as_object_mut().unwrap().remove("jwt").unwrap();
    ds.save_ca_journal("server-1", &serde_json::to_vec(&j).unwrap())
        .await
        .unwrap();
    let ca = load(&ds, &km, 86_400, KeyType::EcP256, T0 + 60).await;
    assert_eq!(ca.active().unwrap().key_id, x509);
    assert_eq!(ca.bundle().borrow().jwt_authorities.len(), 1);
}

#[test]
fn operator_kids_are_base64url() {
    assert_eq!(normalize_kid(" abc-_9 ").unwrap(), "abc-_9");
    for bad in ["", "a b", "a/b", "a=", &"a".repeat(129)] {
        assert!(normalize_kid(bad).is_err(), "{bad:?}");
    }
}
