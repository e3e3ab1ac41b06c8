//! The refresh loop against a real peer: the server's own `https_web` bundle endpoint in
//! process, serving a bundle the test changes, and a SQLite datastore. What is checked is
//! what an operator and an agent would see: the stored bundle and its sequence, the
//! relationship's status, the bundles published to the node API, the metrics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::sync::Arc;
use std::time::Duration;

use carapace_core::bundle::der_to_pem;
use carapace_core::clock::unix_now;
use carapace_core::{TrustBundle, TrustDomain};
use carapace_server::Error;
use carapace_server::datastore::Datastore;
use carapace_server::federation::bundles::ForeignBundles;
use carapace_server::federation::refresh::{Bounds, RefreshLoop};
use carapace_server::federation::{Profile, Refresher as _, Relationship, Source, Status};
use tokio::sync::watch;

#[path = "support/federation_peer.rs"]
#[allow(dead_code, reason = "each test file uses part of it")]
mod peer;
use peer::{Running, eventually, pki, start_web};

fn partner() -> TrustDomain {
    TrustDomain::new("partner.test").unwrap()
}

/// A bundle of partner.test with one new X.509 authority.
fn peer_bundle(sequence: u64) -> TrustBundle {
    let mut b = TrustBundle::new(partner());
    b.x509_authorities.push(pki().ca_der);
    b.sequence = sequence;
    b
}

/// The local server's side: a datastore with the relationship to `peer`, the foreign
/// bundles published to agents, and the refresh loop running.
struct Local {
    ds: Datastore,
    foreign: Arc<ForeignBundles>,
    refresher: Arc<RefreshLoop>,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Local {
    async fn start(peer: &Running, bounds: Bounds) -> Local {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(&dir.path().join("ds.sqlite"))
            .await
            .unwrap();
        ds.create_federation(&Relationship {
            trust_domain: partner(),
            url: format!("https://localhost:{}/", peer.addr.port()),
            profile: Profile::HttpsWeb {
                roots_pem: Some(der_to_pem(&peer.ca_der)),
            },
            source: Source::Api,
        })
        .await
        .unwrap();
        let foreign = ForeignBundles::load(ds.clone()).await.unwrap();
        let (_, local_bundle) = watch::channel(Arc::new(TrustBundle::new(
            TrustDomain::new("example.org").unwrap(),
        )));
        let refresher = RefreshLoop::new(ds.clone(), local_bundle, bounds, foreign.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(refresher.clone().run(stop_rx));
        Local {
            ds,
            foreign,
            refresher,
            _stop: stop_tx,
            _dir: dir,
        }
    }

    async fn stored_sequence(&self) -> Option<u64> {
        self.ds
            .foreign_bundle(&partner())
            .await
            .unwrap()
            .map(|b| b.bundle.sequence)
    }

    async fn status(&self) -> Status {
        self.ds.get_federation(&partner()).await.unwrap().unwrap().1
    }
}

fn seconds(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[tokio::test]
async fn a_peer_is_polled_at_its_hint_and_a_bad_answer_keeps_the_last_good_bundle() {
    let first = peer_bundle(1);
    let peer = start_web(first.clone(), seconds(1)).await;
    let local = Local::start(
        &peer,
        Bounds {
            floor: seconds(1),
            ceiling: seconds(60),
        },
    )
    .await;

    // Fetched at once, stored, and published to the agents' sync streams.
    eventually("the first bundle", || async {
        (local.stored_sequence().await == Some(1)).then_some(())
    })
    .await;
    eventually("the stored bundle published to the agents", || async {
        (local
            .foreign
            .current()
            .get(&partner())
            .is_some_and(|b| b.x509_authorities == first.x509_authorities))
        .then_some(())
    })
    .await;
    let status = local.status().await;
    let success = status.last_success_at.expect("a success is recorded");
    assert!((unix_now() - success).abs() <= 5, "{status:?}");
    assert!(status.last_error.is_none(), "{status:?}");
    let next = status.next_refresh_at.unwrap();
    assert!(
        (1..=2).contains(&(next - success)),
        "the next poll is the 1 s hint away, rounded up to a whole second: {status:?}"
    );

    // The peer rotates: picked up at the hint, without being asked.
    let second = peer_bundle(2);
    peer.bundle.send_replace(Arc::new(second.clone()));
    eventually("the second bundle", || async {
        (local.stored_sequence().await == Some(2)).then_some(())
    })
    .await;
    eventually("the second bundle published", || async {
        (local.foreign.current()[&partner()].x509_authorities == second.x509_authorities)
            .then_some(())
    })
    .await;

    // A lower sequence (a peer that lost its state, or a replay) is refused and recorded.
    peer.bundle.send_replace(Arc::new(peer_bundle(1)));
    let status = eventually("the refusal", || async {
        let s = local.status().await;
        s.last_error.is_some().then_some(s)
    })
    .await;
    let error = status.last_error.unwrap();
    assert!(error.contains("lower"), "{error}");
    assert_eq!(local.stored_sequence().await, Some(2));

    // The peer goes down: the error says so, the last good bundle stays.
    peer.stop.send_replace(true);
    let status = eventually("the connection error", || async {
        let s = local.status().await;
        s.last_error
            .as_deref()
            .is_some_and(|e| !e.contains("lower"))
            .then_some(s)
    })
    .await;
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("cannot connect"),
        "{status:?}"
    );
    assert_eq!(local.stored_sequence().await, Some(2));
    assert_eq!(
        local.foreign.current()[&partner()].x509_authorities,
        second.x509_authorities
    );

    // The metrics show the relationship (from the datastore's rows).
    let mut text = String::new();
    prometheus_client::encoding::text::encode(
        &mut text,
        carapace_server::metrics::metrics().registry(),
    )
    .unwrap();
    for metric in [
        "carapace_server_federation_last_success_timestamp_seconds{trust_domain=\"partner.test\"}",
        "carapace_server_federation_last_error_timestamp_seconds{trust_domain=\"partner.test\"}",
        "carapace_server_federation_bundle_sequence{trust_domain=\"partner.test\"} 2",
        "carapace_server_federation_refreshes_total{trust_domain=\"partner.test\",result=\"error\"}",
    ] {
        assert!(text.contains(metric), "{metric} missing from\n{text}");
    }
}

#[tokio::test]
async fn a_refresh_asked_for_is_immediate_and_a_deleted_relationship_is_forgotten() {
    let peer = start_web(peer_bundle(1), seconds(3600)).await;
    // The loop would not poll again for an hour.
    let local = Local::start(
        &peer,
        Bounds {
            floor: seconds(3600),
            ceiling: seconds(3600),
        },
    )
    .await;
    eventually("the first bundle", || async {
        (local.stored_sequence().await == Some(1)).then_some(())
    })
    .await;

    peer.bundle.send_replace(Arc::new(peer_bundle(2)));
    let refreshed = local.refresher.refresh_now(&partner()).await.unwrap();
    assert_eq!(refreshed.error, None);
    let status = refreshed.status;
    assert_eq!(local.stored_sequence().await, Some(2), "stored by the call");
    assert!(
        status.last_success_at.unwrap() >= unix_now() - 5,
        "{status:?}"
    );
    assert!(
        status.next_refresh_at.unwrap() >= unix_now() + 3000,
        "the next poll is the hour away: {status:?}"
    );

    let unknown = TrustDomain::new("nobody.test").unwrap();
    let err = local.refresher.refresh_now(&unknown).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");

    // Deleting the relationship deletes its bundle; the agents lose it.
    assert!(local.ds.delete_federation(&partner()).await.unwrap());
    local.refresher.relationships_changed();
    eventually("the bundle withdrawn from the agents", || async {
        local.foreign.current().is_empty().then_some(())
    })
    .await;
    assert_eq!(local.stored_sequence().await, None);
}
