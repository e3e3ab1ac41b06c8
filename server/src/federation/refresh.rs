//! The refresh loop: fetches each relationship's bundle from the peer's bundle endpoint
//! when it is due, and stores it by the datastore's rules.
//!
//! - **When.** A relationship is due at its `next_refresh_at` (none yet: at once). After
//!   a fetch, success or not, the next one is the peer's refresh hint (the new bundle's,
//!   else the stored one's, else [`DEFAULT_REFRESH`], SPIFFE Federation §6.2) clamped to
//!   `[federation] refresh_floor..refresh_ceiling`, less up to a tenth at random so that
//!   hundreds of relationships made together do not stay in step. A failure is retried at
//!   the same interval, not sooner (§6.2: a peer that is down is not hammered); an
//!   operator who has mended it runs `federation refresh`, which fetches at once.
//! - **The last good bundle stays.** A fetch that fails (peer down, TLS refused, not 200,
//!   garbage, a bundle for another trust domain) or that the sequence rule refuses writes
//!   nothing but the relationship's status; the stored bundle is what agents keep.
//! - **Several servers.** The schedule is the status in the datastore, which every
//!   server sharing it reads: a relationship another server has just refreshed is not
//!   due here. Two servers fetching at the same moment store once (the sequence rule runs
//!   inside the write transaction) and both record success.
//! - **Metrics** come from the datastore's rows, so every server shows the same:
//!   `carapace_server_federation_last_success_timestamp_seconds{trust_domain}`,
//!   `..._last_error_timestamp_seconds`, `..._bundle_sequence`, and
//!   `carapace_server_federation_refreshes_total{trust_domain, result}` (this server's).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use rand::Rng as _;
use tokio::sync::{Notify, watch};

use carapace_core::clock::unix_now;
use carapace_core::{TrustBundle, TrustDomain};

use super::bundles::ForeignBundles;
use super::fetch::fetch_bundle;
use super::{Profile, Refreshed, Refresher, Relationship, Status, Stored};
use crate::datastore::Datastore;
use crate::{Error, Result};

/// How often a peer that gives no refresh hint is polled (SPIFFE Federation §6.2
/// suggests five minutes).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);

/// Fetches in flight at once.
pub const CONCURRENCY: usize = 16;

/// How long the loop waits after the datastore failed it before trying again.
const RETRY_AFTER_DATASTORE_ERROR: Duration = Duration::from_secs(5);

/// The bounds on the polling interval (`[federation] refresh_floor`, `refresh_ceiling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The shortest interval, whatever the peer's hint.
    pub floor: Duration,
    /// The longest interval, whatever the peer's hint.
    pub ceiling: Duration,
}

impl Bounds {
    /// The interval for a peer's hint (seconds), before jitter.
    pub fn interval(&self, hint: Option<u64>) -> Duration {
        let hint = hint.map_or(DEFAULT_REFRESH, Duration::from_secs);
        hint.clamp(self.floor, self.ceiling.max(self.floor))
    }
}

/// The refresh loop of one server.
pub struct RefreshLoop {
    ds: Datastore,
    local: watch::Receiver<Arc<TrustBundle>>,
    bounds: Bounds,
    foreign: Arc<ForeignBundles>,
    wake: Notify,
}

impl std::fmt::Debug for RefreshLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshLoop")
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl RefreshLoop {
    /// A loop over `ds`'s relationships. `local` is the local trust domain's bundle (it
    /// authenticates an `https_spiffe` endpoint whose SPIFFE ID is in the local trust
    /// domain). A bundle it stores is published to the agents through `foreign`.
    pub fn new(
        ds: Datastore,
        local: watch::Receiver<Arc<TrustBundle>>,
        bounds: Bounds,
        foreign: Arc<ForeignBundles>,
    ) -> Arc<Self> {
        Arc::new(RefreshLoop {
            ds,
            local,
            bounds,
            foreign,
            wake: Notify::new(),
        })
    }

    /// Runs until `shutdown` changes.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let wait = match self.round().await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(error = %e, "federation: reading the relationships failed; trying again in 5s");
                    RETRY_AFTER_DATASTORE_ERROR
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Refreshes every relationship that is due, updates the metrics, and returns how
    /// long until the next one is.
    async fn round(&self) -> Result<Duration> {
        let now = unix_now();
        let due: Vec<(Relationship, Status)> = self
            .ds
            .list_federations()
            .await?
            .into_iter()
            .filter(|(_, s)| s.next_refresh_at.is_none_or(|t| t <= now))
            .collect();
        let stored = std::sync::atomic::AtomicBool::new(false);
        futures::stream::iter(due)
            .for_each_concurrent(CONCURRENCY, |(rel, status)| {
                let stored = &stored;
                async move {
                    match self.refresh(&rel, status).await {
                        Ok((_, true)) => stored.store(true, std::sync::atomic::Ordering::Relaxed),
                        Ok((_, false)) => {}
                        Err(e) => {
                            tracing::warn!(trust_domain = %rel.trust_domain, error = %e, "federation: recording a refresh failed");
                        }
                    }
                }
            })
            .await;
        // Once per round, not per bundle stored: hundreds fetched together (a restart,
        // many relationships made at once) would otherwise re-read them all each time.
        if stored.into_inner() {
            self.foreign.reload_or_log().await;
        }
        let all = self.ds.list_federations().await?;
        self.publish_metrics(&all).await;
        let next = all.iter().filter_map(|(_, s)| s.next_refresh_at).min();
        Ok(match next {
            // To the millisecond: waiting whole seconds from a truncated now would add up
            // to a second to every interval.
            Some(t) => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                Duration::from_secs(u64::try_from(t).unwrap_or(0)).saturating_sub(now)
            }
            // No relationship: wait for one to be made (it wakes the loop), or the ceiling.
            None if all.is_empty() => self.bounds.ceiling,
            // Relationships without a schedule: their status could not be written; try
            // again soon, without spinning.
            None => RETRY_AFTER_DATASTORE_ERROR,
        })
    }

    /// The bundle that authenticates `rel`'s endpoint: for `https_spiffe`, the bundle of
    /// the endpoint SPIFFE ID's trust domain (the relationship's own when the endpoint
    /// serves its own trust domain's bundle).
    /// `own` is the relationship's stored bundle, already read.
    async fn authenticating_bundle(
        &self,
        rel: &Relationship,
        own: Option<&TrustBundle>,
    ) -> Result<Option<TrustBundle>> {
        let Profile::HttpsSpiffe { endpoint_id } = &rel.profile else {
            return Ok(None);
        };
        let td = endpoint_id.trust_domain();
        if td == rel.trust_domain {
            return Ok(own.cloned());
        }
        if td == *self.local.borrow().trust_domain() {
            return Ok(Some(self.local.borrow().as_ref().clone()));
        }
        Ok(self.ds.foreign_bundle(&td).await?.map(|b| b.bundle))
    }

    /// Fetches `rel`'s bundle once, stores it if the rules allow, and records the
    /// status (`status` is the relationship's, as read with it); also says whether a
    /// bundle was stored (the caller then publishes the foreign bundles to the agents).
    /// Errors are the datastore's: a failed fetch is a status, not an error.
    async fn refresh(&self, rel: &Relationship, mut status: Status) -> Result<(Refreshed, bool)> {
        let td = &rel.trust_domain;
        let stored = self.ds.foreign_bundle(td).await?;
        let auth = self
            .authenticating_bundle(rel, stored.as_ref().map(|b| &b.bundle))
            .await?;
        let fetched = fetch_bundle(rel, auth.as_ref()).await;
        let now = unix_now();
        let mut hint = stored.as_ref().and_then(|b| b.bundle.refresh_hint);
        let mut stored = false;
        let outcome = match fetched {
            Ok(bundle) => {
                hint = bundle.refresh_hint.or(hint);
                if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.is_empty() {
                    tracing::warn!(trust_domain = %td, url = %rel.url, "federation: the peer's bundle has no keys: nothing of that trust domain is trusted any more");
                }
                match self.ds.store_fetched_bundle(&bundle, now).await? {
                    Stored::Replaced => {
                        tracing::info!(trust_domain = %td, sequence = bundle.sequence, "federation: stored the peer's new bundle");
                        stored = true;
                        Ok(())
                    }
                    Stored::Unchanged => Ok(()),
                    Stored::Refused(why) => Err(why),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        let result = match &outcome {
            Ok(()) => {
                status.last_success_at = Some(now);
                "ok"
            }
            Err(why) => {
                tracing::warn!(trust_domain = %td, url = %rel.url, error = %why, "federation: the bundle was not refreshed; the last good one stays");
                status.last_error = Some(why.clone());
                status.last_error_at = Some(now);
                "error"
            }
        };
        crate::metrics::metrics().federation_refreshed(td, result);
        status.next_refresh_at = Some(next_refresh_at(
            jittered(self.bounds.interval(hint), self.bounds.floor),
            SystemTime::now(),
        ));
        self.ds.set_federation_status(td, &status).await?;
        Ok((
            Refreshed {
                status,
                error: outcome.err(),
            },
            stored,
        ))
    }

    /// Sets the federation gauges from the datastore's rows.
    async fn publish_metrics(&self, all: &[(Relationship, Status)]) {
        let sequences: BTreeMap<TrustDomain, u64> = match self.ds.list_foreign_bundles().await {
            Ok(bundles) => bundles
                .into_iter()
                .map(|b| (b.bundle.trust_domain().clone(), b.bundle.sequence))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "federation metrics: reading the bundles failed");
                return;
            }
        };
        crate::metrics::metrics().federation_status(
            all.iter()
                .map(|(r, s)| (&r.trust_domain, s, sequences.get(&r.trust_domain).copied())),
        );
    }
}

/// `interval` less up to a tenth, at random, but never below `floor`.
fn jittered(interval: Duration, floor: Duration) -> Duration {
    let tenth = u64::try_from(interval.as_millis() / 10).unwrap_or(u64::MAX);
    let less = Duration::from_millis(rand::rng().random_range(0..=tenth));
    interval.saturating_sub(less).max(floor)
}

/// The unix second at which a fetch `interval` after `now` is due: rounded up, so that
/// the loop, which counts in whole seconds, never fetches sooner than `interval` (a fetch
/// late in a second would otherwise be due up to a second early, below the floor).
fn next_refresh_at(interval: Duration, now: SystemTime) -> i64 {
    let due = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(interval);
    let secs = due.as_secs() + u64::from(due.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl Refresher for RefreshLoop {
    async fn refresh_now(&self, td: &TrustDomain) -> Result<Refreshed> {
        let Some((rel, status)) = self.ds.get_federation(td).await? else {
            return Err(Error::NotFound(format!(
                "no federation relationship with {}",
                td.name()
            )));
        };
        let (refreshed, stored) = self.refresh(&rel, status).await?;
        if stored {
            self.foreign.reload_or_log().await;
        }
        // The schedule changed: let the loop recompute its wait.
        self.wake.notify_one();
        Ok(refreshed)
    }

    fn relationships_changed(&self) {
        self.wake.notify_one();
        let foreign = self.foreign.clone();
        tokio::spawn(async move { foreign.reload_or_log().await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_the_hint_within_the_bounds() {
        let b = Bounds {
            floor: Duration::from_secs(10),
            ceiling: Duration::from_secs(3600),
        };
        assert_eq!(b.interval(Some(60)), Duration::from_secs(60));
        assert_eq!(b.interval(Some(1)), Duration::from_secs(10));
        assert_eq!(b.interval(Some(86_400)), Duration::from_secs(3600));
        assert_eq!(b.interval(None), DEFAULT_REFRESH);
    }

    #[test]
    fn jitter_only_shortens_by_at_most_a_tenth_and_never_below_the_floor() {
        let s = Duration::from_secs;
        for _ in 0..1000 {
            let j = jittered(s(300), s(10));
            assert!(j >= s(270) && j <= s(300), "{j:?}");
            assert_eq!(jittered(s(10), s(10)), s(10), "the floor holds");
        }
    }

    #[test]
    fn the_next_fetch_is_never_sooner_than_the_interval() {
        let at = |secs: u64, millis: u64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        let five = Duration::from_secs(5);
        // Late in a second: due at the next whole second after now + 5 s.
        assert_eq!(next_refresh_at(five, at(100, 900)), 106);
        // On the second: exactly 5 s.
        assert_eq!(next_refresh_at(five, at(100, 0)), 105);
        assert_eq!(
            next_refresh_at(Duration::from_millis(4_500), at(100, 600)),
            106
        );
    }
}
