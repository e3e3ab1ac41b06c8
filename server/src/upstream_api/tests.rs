//! The upstream API's per-call authorization, rate limit and bundle watch, over a real CA
//! and entry cache (the TLS path and the binaries are in the e2e test
//! `tests/tests/nested_upstream_api.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_core::clock::unix_now;
use carapace_core::plugin::KeySigner;
use carapace_core::{EntryId, KeyType, RegistrationEntry, SpiffeId, TrustDomain};
use carapace_keymanager_soft::{SoftKey, generate_pkcs8};
use tokio::sync::mpsc;
use tonic::Code;

use super::auth::{Authorizer, RateLimiter};
use super::watch::Watcher;
use crate::ca::{CaManager, SubjectKey};
use crate::entry_cache::EntryCache;
use crate::test_support::{new_ca, peer};

const AGENT: &str = "spiffe://example.org/spire/agent/join_token/0011223344556677";
const SITE: &str = "spiffe://example.org/downstream/site-a";

async fn setup() -> (Authorizer, Arc<EntryCache>, Arc<CaManager>) {
    let (ca, ds) = new_ca("example.org").await;
    let cache = EntryCache::load(TrustDomain::new("example.org").unwrap(), ds)
        .await
        .unwrap();
    (Authorizer::new(cache.clone(), ca.bundle()), cache, ca)
}

/// An SVID chain for `id` from `ca`, valid `ttl` seconds.
async fn svid(ca: &Arc<CaManager>, id: &str, ttl: u64) -> Vec<Vec<u8>> {
    let pkcs8 = generate_pkcs8(KeyType::EcP256).unwrap();
    let key = SoftKey::from_pkcs8("k", &pkcs8).unwrap();
    ca.issue_x509_svid(
        id.parse().unwrap(),
        SubjectKey::from_spki(key.public_key_der()).unwrap(),
        Duration::from_secs(ttl),
        vec![],
        unix_now(),
    )
    .await
    .unwrap()
    .chain
}

fn entry(
    id: &str,
    spiffe_id: &str,
    downstream: bool,
    admin: bool,
    expires_at: Option<i64>,
) -> RegistrationEntry {
    RegistrationEntry {
        federates_with: Vec::new(),
        id: EntryId::new(id).unwrap(),
        spiffe_id: spiffe_id.parse().unwrap(),
        parent_id: AGENT.parse().unwrap(),
        selectors: [format!("unix:user:{id}").parse().unwrap()]
            .into_iter()
            .collect(),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        jwt_svid_include_jti: false,
        dns_names: vec![],
        hint: String::new(),
        admin,
        downstream,
        expires_at,
        revision: 0,
        created_at: 0,
    }
}

#[tokio::test]
async fn every_call_needs_an_unexpired_svid_under_the_bundle_of_an_unexpired_downstream_entry() {
    let (auth, cache, ca) = setup().await;
    let now = unix_now();
    let chain = svid(&ca, SITE, 3600).await;
    let p = peer(Some(&chain));
    let site: SpiffeId = SITE.parse().unwrap();

    // No certificate.
    let err = auth.authorize(Some(&peer(None)), now).unwrap_err();
    assert!(err.contains("none was presented"), "{err}");
    assert!(auth.authorize(None, now).is_err());

    // No entry; an entry without the flag; an admin entry: refused, saying what to do.
    let not_downstream = format!(
        "{SITE} has no registration entry marked downstream; create one with `entry create \
         ... --downstream`"
    );
    assert!(
        auth.authorize(Some(&p), now)
            .unwrap_err()
            .starts_with(&not_downstream)
    );
    cache
        .create_entry(entry("plain", SITE, false, true, None))
        .await
        .unwrap();
    assert!(
        auth.authorize(Some(&p), now)
            .unwrap_err()
            .starts_with(&not_downstream)
    );

    // A downstream entry: served, until it expires.
    cache
        .create_entry(entry("site", SITE, true, false, Some(now + 600)))
        .await
        .unwrap();
    assert_eq!(auth.authorize(Some(&p), now).unwrap(), site);
    assert!(
        auth.authorize(Some(&p), now + 600)
            .unwrap_err()
            .starts_with(&not_downstream)
    );

    // The SVID past its notAfter: refused as expired.
    let err = auth.authorize(Some(&p), now + 3601).unwrap_err();
    assert!(err.contains("expired at"), "{err}");

    // An agent's SVID, even with a downstream entry for its ID: never.
    // (Whether such an entry can be created at all is the entry rules' business.)
    let _ = cache
        .create_entry(entry("agent-ds", AGENT, true, false, None))
        .await;
    let agent_chain = svid(&ca, AGENT, 3600).await;
    let err = auth
        .authorize(Some(&peer(Some(&agent_chain))), now)
        .unwrap_err();
    assert!(
        err.starts_with(&format!("{AGENT} is an agent's SVID")),
        "{err}"
    );
    let server_chain = svid(&ca, "spiffe://example.org/spire/server", 3600).await;
    let err = auth
        .authorize(Some(&peer(Some(&server_chain))), now)
        .unwrap_err();
    assert!(err.contains("is under the reserved /spire path"), "{err}");

    // An SVID of another CA of the same trust domain (not in this bundle).
    let (other, _) = new_ca("example.org").await;
    let foreign = svid(&other, SITE, 3600).await;
    let err = auth
        .authorize(Some(&peer(Some(&foreign))), now)
        .unwrap_err();
    assert!(
        err.contains("is no longer valid under the trust bundle"),
        "{err}"
    );
}

#[test]
fn the_rate_limit_is_a_burst_then_a_steady_rate_per_caller_and_method() {
    let limiter = RateLimiter::new(3, 6);
    let a: SpiffeId = SITE.parse().unwrap();
    let b: SpiffeId = "spiffe://example.org/downstream/site-b".parse().unwrap();
    let t0 = Instant::now();
    for _ in 0..3 {
        limiter.take("Mint", &a, t0).unwrap();
    }
    let err = limiter.take("Mint", &a, t0).unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains(&format!(
            "{SITE} called Mint more than 3 times at once or 6 times a minute; retry in"
        )),
        "{err:?}"
    );
    // Other callers and other methods have their own buckets.
    limiter.take("Mint", &b, t0).unwrap();
    limiter.take("Publish", &a, t0).unwrap();
    // One call every ten seconds after that.
    limiter
        .take("Mint", &a, t0 + Duration::from_secs(5))
        .unwrap_err();
    limiter
        .take("Mint", &a, t0 + Duration::from_secs(10))
        .unwrap();
    limiter
        .take("Mint", &a, t0 + Duration::from_secs(11))
        .unwrap_err();
    // After a quiet minute, a burst again (never more than the burst).
    let later = t0 + Duration::from_secs(600);
    for _ in 0..3 {
        limiter.take("Mint", &a, later).unwrap();
    }
    limiter.take("Mint", &a, later).unwrap_err();
}

async fn next(
    rx: &mut mpsc::Receiver<Result<carapace_proto::carapace::types::v1::Bundle, tonic::Status>>,
) -> Result<carapace_proto::carapace::types::v1::Bundle, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message within 5s")
        .expect("the stream is open")
}

async fn quiet(
    rx: &mut mpsc::Receiver<Result<carapace_proto::carapace::types::v1::Bundle, tonic::Status>>,
    d: Duration,
) {
    if let Ok(m) = tokio::time::timeout(d, rx.recv()).await {
        panic!("unexpected message: {m:?}");
    }
}

#[tokio::test]
async fn a_watch_sends_changes_and_beats_and_ends_when_the_entry_loses_downstream() {
    let (auth, cache, ca) = setup().await;
    let now = unix_now();
    cache
        .create_entry(entry("site", SITE, true, false, None))
        .await
        .unwrap();
    let chain = svid(&ca, SITE, 3600).await;
    let site: SpiffeId = SITE.parse().unwrap();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = |beat: Duration| Watcher {
        auth: auth.clone(),
        bundles: ca.bundle(),
        revisions: cache.subscribe(),
        closing: Some(stop_rx.clone()),
        beat,
    };
    let seq = ca.bundle().borrow().sequence;

    // Known sequence = the current one: nothing until a change.
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(watcher(Duration::from_secs(3600)).run(
        site.clone(),
        Some(peer(Some(&chain))),
        seq,
        tx,
    ));
    quiet(&mut rx, Duration::from_millis(300)).await;
    // A prepared CA joins the bundle: sent at once.
    ca.prepare(now).await.unwrap();
    let b = next(&mut rx).await.unwrap();
    assert!(b.sequence > seq);
    assert_eq!(b.x509_authorities.len(), 2);
    // An unrelated entry change: authorized again, nothing sent.
    cache
        .create_entry(entry(
            "other",
            "spiffe://example.org/web",
            false,
            false,
            None,
        ))
        .await
        .unwrap();
    quiet(&mut rx, Duration::from_millis(300)).await;

    // Another watch from sequence 0: the bundle at once, then a beat with the same one.
    let (tx2, mut rx2) = mpsc::channel(1);
    tokio::spawn(watcher(Duration::from_millis(300)).run(
        site.clone(),
        Some(peer(Some(&chain))),
        0,
        tx2,
    ));
    let first = next(&mut rx2).await.unwrap();
    assert_eq!(first.sequence, b.sequence);
    let beat = next(&mut rx2).await.unwrap();
    assert_eq!(beat, first);

    // The entry loses `downstream`: both streams end with PermissionDenied.
    let mut e = entry("site", SITE, false, false, None);
    e.revision = cache
        .get_entry(&EntryId::new("site").unwrap())
        .unwrap()
        .revision;
    cache.update_entry(e).await.unwrap();
    for rx in [&mut rx, &mut rx2] {
        let end = loop {
            match next(rx).await {
                Ok(_) => {}
                Err(s) => break s,
            }
        };
        assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
        assert!(
            end.message()
                .contains("has no registration entry marked downstream"),
            "{end:?}"
        );
        assert!(rx.recv().await.is_none(), "the stream ended");
    }
}

#[tokio::test]
async fn a_watch_ends_with_unavailable_at_shutdown() {
    let (auth, cache, ca) = setup().await;
    cache
        .create_entry(entry("site", SITE, true, false, None))
        .await
        .unwrap();
    let chain = svid(&ca, SITE, 3600).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (tx, mut rx) = mpsc::channel(1);
    let task = tokio::spawn(
        Watcher {
            auth,
            bundles: ca.bundle(),
            revisions: cache.subscribe(),
            closing: Some(stop_rx),
            beat: Duration::from_secs(3600),
        }
        .run(SITE.parse().unwrap(), Some(peer(Some(&chain))), 0, tx),
    );
    next(&mut rx).await.unwrap();
    stop_tx.send(true).unwrap();
    let end = next(&mut rx).await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    task.await.unwrap();
}
