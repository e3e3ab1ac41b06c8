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
