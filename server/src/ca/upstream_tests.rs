//! The CA manager under an upstream authority that fails or caps what it mints: the
//! active CA keeps signing, the rest of the rotation goes on, and a CA that would shorten
//! every SVID is never activated.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use carapace_core::plugin::MintedCa;
use carapace_keymanager_soft::MemoryKeyManager;

const T0: i64 = 1_900_000_000;
const CA_TTL: u64 = 86_400;

fn settings(path_len: u8) -> CaSettings {
    CaSettings {
        ca_ttl: Duration::from_secs(CA_TTL),
        key_type: KeyType::EcP256,
        organization: "Carapace".into(),
        country: "US".into(),
        jwt_key_type: KeyType::EcP256,
        server_id: "server-1".into(),
        path_len,
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// A `disk`-style root (a key manager key and its self-signed certificate) valid for
/// `ttl` from `now`.
async fn root(ttl: u64, now: i64) -> Arc<crate::upstream::LocalRoot> {
    let km = MemoryKeyManager::new();
    let key = km.generate_key("root", KeyType::EcP256).await.unwrap();
    let der = crate::upstream::make_root_certificate(
        &td(),
        key.clone(),
        "root",
        "Carapace",
        Duration::from_secs(ttl),
        now,
    )
    .unwrap();
    Arc::new(crate::upstream::LocalRoot::new("disk", der, key, now).unwrap())
}

/// A real root behind a switch: while `down`, every mint fails as an unreachable upstream
/// server's would. Everything else is the root's own.
#[derive(Debug)]
struct Switched {
    root: Arc<crate::upstream::LocalRoot>,
    down: AtomicBool,
    /// Names another root's certificate as the roots of what it mints.
    lie_about_roots: Option<Vec<u8>>,
    /// The bundle it serves every tier, as a server above keeps one; `None`: none, as a
    /// root in files keeps none.
    keeps: Option<std::sync::Mutex<TrustBundle>>,
}

#[async_trait::async_trait]
impl UpstreamAuthority for Switched {
    fn name(&self) -> &str {
        "switched"
    }
    fn fingerprint(&self) -> String {
        self.root.fingerprint()
    }
    async fn mint_x509_ca(
        &self,
        request: &MintRequest,
    ) -> std::result::Result<MintedCa, carapace_core::Error> {
        if self.down.load(Ordering::SeqCst) {
            return Err(carapace_core::Error::KeyUnavailable(
                "upstream unreachable".into(),
            ));
        }
        let mut minted = self.root.mint_x509_ca(request).await?;
        if let Some(other) = &self.lie_about_roots {
            minted.roots = vec![other.clone()];
        }
        Ok(minted)
    }
    async fn x509_roots(&self) -> std::result::Result<Vec<Vec<u8>>, carapace_core::Error> {
        self.root.x509_roots().await
    }
    async fn publish_jwt_key(
        &self,
        key: &carapace_core::JwtKey,
    ) -> std::result::Result<Option<TrustBundle>, carapace_core::Error> {
        if self.down.load(Ordering::SeqCst) {
            return Err(carapace_core::Error::KeyUnavailable(
                "upstream unreachable".into(),
            ));
        }
        let Some(keeps) = &self.keeps else {
            return self.root.publish_jwt_key(key).await;
        };
        let mut b = keeps.lock().unwrap();
        b.jwt_authorities.push(key.clone());
        b.sequence += 1;
        Ok(Some(b.clone()))
    }
    async fn next_bundle(
        &self,
        known: u64,
    ) -> std::result::Result<Option<TrustBundle>, carapace_core::Error> {
        match &self.keeps {
            None => self.root.next_bundle(known).await,
            Some(b) => Ok(Some(b.lock().unwrap().clone())),
        }
    }
}

async fn load(
    upstream: Arc<dyn UpstreamAuthority>,
    km: Arc<MemoryKeyManager>,
    ds: Datastore,
    path_len: u8,
    now: i64,
) -> Result<Arc<CaManager>> {
    CaManager::load(td(), km, Some(upstream), ds, settings(path_len), now).await
}

fn issue(ca: &CaManager, now: i64) -> IssuedSvid {
    let kp = rcgen::KeyPair::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
    let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
    let svid = ca
        .sign_x509_svid(
            &id,
            &SubjectKey::from_spki(&spki).unwrap(),
            Duration::from_secs(600),
            &[],
            now,
        )
        .unwrap();
    carapace_core::x509svid::verify_chain(&svid.chain, &ca.bundle().borrow(), now as u64).unwrap();
    svid
}

#[tokio::test]
async fn a_restart_while_the_upstream_is_away_keeps_the_active_ca_signing() {
    let up = Arc::new(Switched {
        root: root(30 * 86_400, T0).await,
        down: AtomicBool::new(false),
        lie_about_roots: None,
        keeps: None,
    });
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(up.clone(), km.clone(), ds.clone(), 0, T0)
        .await
        .unwrap();
    let active = ca.active().unwrap().key_id.clone();
    drop(ca);

    // Past the half-life a prepare is due at once, and the upstream is away.
    up.down.store(true, Ordering::SeqCst);
    let later = T0 + CA_TTL as i64 / 2 + 60;
    let ca = load(up.clone(), km.clone(), ds.clone(), 0, later)
        .await
        .expect("a server whose active CA is good starts without its upstream");
    assert_eq!(ca.active().unwrap().key_id, active);
    issue(&ca, later);
    let status = ca.upstream_status().unwrap();
    assert_eq!(status.failing_since, Some(later));
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("upstream unreachable")),
        "{status:?}"
    );
    assert!(
        ca.authorities()
            .iter()
            .all(|a| a.status != AuthorityStatus::Prepared)
    );
    // Ready while the CA has more than a sixth of its life left; then not, saying why.
    let a = ca.active().unwrap();
    assert_eq!(
        crate::health::upstream_reason(&a, ca.upstream_status(), later),
        None
    );
    let late = a.not_after - (a.not_after - a.not_before) / 6;
    let reason = crate::health::upstream_reason(&a, ca.upstream_status(), late).unwrap();
    assert!(
        reason.contains("upstream authority switched has failed since")
            && reason.contains("upstream unreachable"),
        "{reason}"
    );

    // With no usable CA at all, the same outage does stop the start.
    drop(ca);
    let expired = T0 + CA_TTL as i64 + 60;
    let err = load(up.clone(), km.clone(), ds.clone(), 0, expired)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("upstream unreachable"), "{err}");

    // Back: the next load mints and the status clears.
    up.down.store(false, Ordering::SeqCst);
    let ca = load(up.clone(), km, ds, 0, expired).await.unwrap();
    assert_ne!(ca.active().unwrap().key_id, active);
    let status = ca.upstream_status().unwrap();
    assert_eq!(status.failing_since, None);
    assert_eq!(status.last_success, Some(expired));
}

#[tokio::test]
async fn a_failed_prepare_still_rotates_the_jwt_keys_and_backs_off() {
    let up = Arc::new(Switched {
        root: root(30 * 86_400, T0).await,
        down: AtomicBool::new(false),
        lie_about_roots: None,
        keeps: None,
    });
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(up.clone(), km, ds, 0, T0).await.unwrap();
    assert_eq!(ca.jwt_authorities().len(), 1);

    up.down.store(true, Ordering::SeqCst);
    // The X.509 CA and the JWT key share ca_ttl: both prepares are due.
    let t = T0 + CA_TTL as i64 / 2 + 1;
    let err = ca.tick(t).await.unwrap_err().to_string();
    assert!(err.contains("could not prepare the next X.509 CA"), "{err}");
    assert_eq!(
        ca.jwt_authorities().len(),
        2,
        "the JWT key was prepared though the upstream is away"
    );
    assert!(
        ca.authorities()
            .iter()
            .all(|a| a.status != AuthorityStatus::Prepared)
    );

    // The upstream is back, but the next try waits out the backoff.
    up.down.store(false, Ordering::SeqCst);
    ca.tick(t + MINT_RETRY_MIN - 1).await.unwrap();
    assert!(
        ca.authorities()
            .iter()
            .all(|a| a.status != AuthorityStatus::Prepared),
        "no mint before the backoff ends"
    );
    ca.tick(t + MINT_RETRY_MIN).await.unwrap();
    assert!(
        ca.authorities()
            .iter()
            .any(|a| a.status == AuthorityStatus::Prepared)
    );
    assert_eq!(ca.upstream_status().unwrap().failing_since, None);
}

#[tokio::test]
async fn a_prepared_ca_that_ends_no_later_than_the_active_one_is_not_activated() {
    // The root ends before ca_ttl runs out: every CA it certifies is capped at its end,
    // so the prepared CA ends with the active one (SPIRE #7199's trap).
    let up: Arc<dyn UpstreamAuthority> = root(40_000, T0).await;
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(up, km.clone(), ds, 0, T0).await.unwrap();
    let active = ca.active().unwrap();
    assert_eq!(active.not_after, T0 + 40_000);

    let life = active.not_after - active.not_before;
    let prepare_at = active.not_after - life / 2;
    ca.tick(prepare_at).await.unwrap();
    let prepared = read(&ca.state).prepared.clone().unwrap();
    assert_eq!(prepared.not_after, active.not_after);

    let activate_at = active.not_after - life / 6;
    let err = ca.tick(activate_at).await;
    assert!(err.is_ok(), "{err:?}");
    assert_eq!(
        ca.active().unwrap().key_id,
        active.key_id,
        "the active CA keeps signing"
    );
    assert!(read(&ca.state).prepared.is_none());
    assert!(
        km.get_key(&prepared.key_id).await.is_err(),
        "the unused CA's key is deleted"
    );
    let status = ca.upstream_status().unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no later than the active one")),
        "{status:?}"
    );
    issue(&ca, activate_at);
}

#[tokio::test]
async fn the_ca_asks_its_upstream_for_the_configured_path_length() {
    let up: Arc<dyn UpstreamAuthority> = root(30 * 86_400, T0).await;
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(up, km, ds, 1, T0).await.unwrap();
    let der = ca.active().unwrap().cert_der.clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert_eq!(bc.path_len_constraint, Some(1));
    issue(&ca, T0);
}

#[tokio::test]
async fn a_ca_granted_less_depth_than_configured_is_refused() {
    // A CA certified with pathLen 0 by a root, checked against a server that serves
    // one tier of downstream servers.
    let up = root(30 * 86_400, T0).await;
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(up, km, ds, 0, T0).await.unwrap();
    let der = ca.active().unwrap().cert_der.clone();
    check_path_len(&der, 0).unwrap();
    let err = check_path_len(&der, 1).unwrap_err().to_string();
    assert!(err.contains("max_depth asks for 1"), "{err}");
}

#[tokio::test]
async fn a_ca_that_does_not_chain_to_the_roots_named_is_refused_and_its_key_deleted() {
    let other = root(30 * 86_400, T0).await.root_der().to_vec();
    let up = Arc::new(Switched {
        root: root(30 * 86_400, T0).await,
        down: AtomicBool::new(false),
        lie_about_roots: Some(other),
        keeps: None,
    });
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let err = load(up, km.clone(), ds, 0, T0)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("do not verify against the roots it named"),
        "{err}"
    );
    assert!(
        km.get_key("x509-ca-0").await.is_err() && km.get_key("x509-ca-1").await.is_err(),
        "the key of the refused CA is deleted"
    );
}

/// A server above that keeps a bundle: its root, and the JWT key of another tier.
async fn keeping_upstream() -> Arc<Switched> {
    let root = root(30 * 86_400, T0).await;
    let mut b = TrustBundle::new(td());
    b.sequence = 7;
    b.x509_authorities = vec![root.root_der().to_vec()];
    b.jwt_authorities = vec![carapace_core::JwtKey {
        kid: "other-tier".into(),
        public_key_der: carapace_core::x509svid::public_key_of(root.root_der()).unwrap(),
        expires_at: Some(T0 + 3_600),
    }];
    Arc::new(Switched {
        root,
        down: AtomicBool::new(false),
        lie_about_roots: None,
        keeps: Some(std::sync::Mutex::new(b)),
    })
}

#[tokio::test]
async fn jwt_keys_go_upstream_and_the_upstream_bundle_comes_down_and_survives_a_restart() {
    let up = keeping_upstream().await;
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(up.clone(), km.clone(), ds.clone(), 0, T0)
        .await
        .unwrap();
    let own_kid = ca.jwt_active().unwrap().kid().to_owned();

    // The first key went up at start, and the answer came down into this tier's bundle.
    let kept = up.keeps.as_ref().unwrap().lock().unwrap().clone();
    assert!(kept.jwt_authorities.iter().any(|k| k.kid == own_kid));
    let served = ca.bundle().borrow().clone();
    let kids: Vec<&str> = served
        .jwt_authorities
        .iter()
        .map(|k| k.kid.as_str())
        .collect();
    assert!(
        kids.contains(&"other-tier") && kids.contains(&own_kid.as_str()),
        "{kids:?}"
    );
    assert_eq!(
        kids.iter().filter(|k| **k == own_kid).count(),
        1,
        "the own key once"
    );

    // A rotation at the top: a new root in the upstream bundle reaches this tier.
    let new_root = root(30 * 86_400, T0).await.root_der().to_vec();
    let mut next = kept.clone();
    next.sequence += 1;
    next.x509_authorities.push(new_root.clone());
    assert!(ca.apply_upstream_bundle(&next).await.unwrap());
    assert!(ca.bundle().borrow().x509_authorities.contains(&new_root));
    // The same again, or an older one, changes nothing.
    assert!(!ca.apply_upstream_bundle(&next).await.unwrap());
    assert!(!ca.apply_upstream_bundle(&kept).await.unwrap());
    assert!(ca.bundle().borrow().x509_authorities.contains(&new_root));
    // Another trust domain's is refused.
    let foreign = TrustBundle::new(TrustDomain::new("other.test").unwrap());
    let err = ca
        .apply_upstream_bundle(&foreign)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("trust domain other.test"), "{err}");

    // A restart while the upstream is away serves the last one it sent.
    drop(ca);
    up.down.store(true, Ordering::SeqCst);
    let ca = load(up.clone(), km, ds, 0, T0 + 60).await.unwrap();
    let served = ca.bundle().borrow().clone();
    assert!(served.x509_authorities.contains(&new_root));
    assert!(served.jwt_authorities.iter().any(|k| k.kid == "other-tier"));
}

#[tokio::test]
async fn a_jwt_key_the_upstream_has_not_accepted_is_not_activated_until_the_active_one_lapses() {
    let up = keeping_upstream().await;
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(up.clone(), km, ds, 0, T0).await.unwrap();
    let first = ca.jwt_active().unwrap().kid().to_owned();

    up.down.store(true, Ordering::SeqCst);
    let half = T0 + CA_TTL as i64 / 2 + 1;
    let _ = ca.tick(half).await;
    let prepared = ca
        .jwt_authorities()
        .into_iter()
        .find(|a| a.status == AuthorityStatus::Prepared)
        .expect("the next JWT key is prepared locally though the upstream is away");
    // Activation time, long after local publication: still not activated.
    let late = T0 + CA_TTL as i64 * 5 / 6 + 1;
    let _ = ca.tick(late).await;
    assert_eq!(ca.jwt_active().unwrap().kid(), first);
    assert!(
        !up.keeps
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .jwt_authorities
            .iter()
            .any(|k| k.kid == prepared.id)
    );

    // The upstream is back: the key goes up, and is activated three refresh periods on.
    up.down.store(false, Ordering::SeqCst);
    let back = late + MINT_RETRY_MAX;
    ca.tick(back).await.unwrap();
    assert!(
        up.keeps
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .jwt_authorities
            .iter()
            .any(|k| k.kid == prepared.id)
    );
    assert_eq!(ca.jwt_active().unwrap().kid(), first);
    ca.tick(back + 3 * REFRESH_HINT as i64).await.unwrap();
    assert_eq!(ca.jwt_active().unwrap().kid(), prepared.id);
}

#[tokio::test]
async fn a_middle_tier_passes_a_downstream_jwt_key_on_to_its_upstream() {
    let up = keeping_upstream().await;
    let ds = Datastore::open_in_memory().await.unwrap();
    let km = Arc::new(MemoryKeyManager::new());
    let ca = load(up.clone(), km, ds, 1, T0).await.unwrap();
    let grant = crate::config::Downstream {
        max_depth: 1,
        ca_ttl_max: Duration::from_secs(CA_TTL / 6),
    };
    let kp = rcgen::KeyPair::generate().unwrap();
    let der = rcgen::PublicKeyData::subject_public_key_info(&kp);
    let key = carapace_core::JwtKey {
        kid: carapace_core::jose::PublicKey::from_spki_der(&der)
            .unwrap()
            .thumbprint(),
        public_key_der: der,
        expires_at: Some(T0 + 3_600),
    };
    let site: SpiffeId = "spiffe://example.org/site-b".parse().unwrap();
    let served = ca
        .publish_downstream_jwt_key(Some(&grant), &site, &key, T0)
        .await
        .unwrap();
    assert!(served.jwt_authorities.iter().any(|k| k.kid == key.kid));
    assert!(
        up.keeps
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .jwt_authorities
            .iter()
            .any(|k| k.kid == key.kid),
        "the key reached the tier above"
    );

    // With the tier above away, the call fails (the downstream server retries).
    up.down.store(true, Ordering::SeqCst);
    let err = ca
        .publish_downstream_jwt_key(Some(&grant), &site, &key, T0)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("could not be passed on"), "{err}");
}
