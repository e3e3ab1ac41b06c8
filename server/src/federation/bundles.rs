//! The foreign bundles this server hands to agents: a copy of the datastore's
//! `federated_bundles`, published on a `watch` that the node API's sync streams follow.
//!
//! Reloaded after every local write that may change a foreign bundle (the refresh loop
//! storing one, `bundle set|delete`, `federation delete`) and, when several servers share
//! the datastore, when another server's write is announced (`follow`). A reload that finds
//! a trust domain's bundle unchanged keeps its `Arc`, so the sync streams compare by
//! pointer first and send an agent only the bundles that changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use carapace_core::{TrustBundle, TrustDomain};

use crate::Result;
use crate::datastore::Datastore;

/// Every foreign trust domain's bundle, by trust domain.
pub type BundleMap = BTreeMap<TrustDomain, Arc<TrustBundle>>;

/// The foreign bundles, kept current with the datastore.
#[derive(Debug)]
pub struct ForeignBundles {
    ds: Datastore,
    tx: watch::Sender<Arc<BundleMap>>,
    /// Serialises reloads, so an older read never replaces a newer one.
    reloading: tokio::sync::Mutex<()>,
}

impl ForeignBundles {
    /// Reads the foreign bundles of `ds`.
    pub async fn load(ds: Datastore) -> Result<Arc<Self>> {
        let this = Arc::new(ForeignBundles {
            ds,
            tx: watch::Sender::new(Arc::new(BundleMap::new())),
            reloading: tokio::sync::Mutex::new(()),
        });
        this.reload().await?;
        Ok(this)
    }

    /// Reads the datastore's foreign bundles again and publishes them if any changed.
    pub async fn reload(&self) -> Result<()> {
        let _one_at_a_time = self.reloading.lock().await;
        let stored = self.ds.list_foreign_bundles().await?;
        let old = self.tx.borrow().clone();
        let mut new = BundleMap::new();
        for f in stored {
            let td = f.bundle.trust_domain().clone();
            let bundle = match old.get(&td) {
                Some(b) if **b == f.bundle => b.clone(),
                _ => Arc::new(f.bundle),
            };
            new.insert(td, bundle);
        }
        let changed = new.len() != old.len()
            || new
                .iter()
                .zip(old.iter())
                .any(|((ta, a), (tb, b))| ta != tb || !Arc::ptr_eq(a, b));
        if changed {
            tracing::debug!(trust_domains = new.len(), "foreign bundles changed");
            self.tx.send_replace(Arc::new(new));
        }
        Ok(())
    }

    /// [`Self::reload`], logging a failure instead of returning it (the next reload
    /// catches up).
    pub async fn reload_or_log(&self) {
        if let Err(e) = self.reload().await {
            tracing::warn!(error = %e, "re-reading the foreign bundles failed; agents keep the ones they have");
        }
    }

    /// The current set, and its changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<BundleMap>> {
        self.tx.subscribe()
    }

    /// The current set.
    pub fn current(&self) -> Arc<BundleMap> {
        self.tx.borrow().clone()
    }
}

/// What one sync stream has sent of the foreign bundles, and the next message's share.
#[derive(Debug, Default)]
pub struct SentForeign {
    /// `None` until the first message: it carries the whole set.
    sent: Option<BundleMap>,
}

/// The foreign bundles of one sync message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ForeignDiff {
    /// `bundles` is the whole set.
    pub full: bool,
    /// Bundles added or changed (all of them with `full`).
    pub bundles: Vec<Arc<TrustBundle>>,
    /// Trust domains no longer sent.
    pub removed: Vec<TrustDomain>,
}

impl ForeignDiff {
    /// Whether there is nothing to tell the agent.
    pub fn is_empty(&self) -> bool {
        !self.full && self.bundles.is_empty() && self.removed.is_empty()
    }
}

impl SentForeign {
    /// The bundles of `all` that the entries' `federates_with` name, compared with what
    /// was sent: the next message's share, which is then taken as sent.
    pub fn advance<'a>(
        &mut self,
        federates_with: impl Iterator<Item = &'a TrustDomain>,
        all: &BundleMap,
    ) -> ForeignDiff {
        let mut wanted = BundleMap::new();
        for td in federates_with {
            if let Some(b) = all.get(td) {
                wanted.entry(td.clone()).or_insert_with(|| b.clone());
            }
        }
        let diff = match &self.sent {
            None => ForeignDiff {
                full: true,
                bundles: wanted.values().cloned().collect(),
                removed: Vec::new(),
            },
            Some(sent) => ForeignDiff {
                full: false,
                bundles: wanted
                    .iter()
                    .filter(|(td, b)| {
                        sent.get(*td)
                            .is_none_or(|s| !Arc::ptr_eq(s, b) && s.as_ref() != b.as_ref())
                    })
                    .map(|(_, b)| b.clone())
                    .collect(),
                removed: sent
                    .keys()
                    .filter(|td| !wanted.contains_key(*td))
                    .cloned()
                    .collect(),
            },
        };
        self.sent = Some(wanted);
        diff
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn bundle(name: &str, seq: u64) -> Arc<TrustBundle> {
        let mut b = TrustBundle::new(td(name));
        b.sequence = seq;
        Arc::new(b)
    }

    #[test]
    fn a_stream_gets_the_whole_entitled_set_then_only_changes() {
        let mut all = BundleMap::new();
        for n in ["a.org", "b.org", "c.org"] {
            all.insert(td(n), bundle(n, 1));
        }
        let mut sent = SentForeign::default();
        // First message: the whole set the entries name (x.org has no bundle: skipped).
        let names = [td("a.org"), td("b.org"), td("x.org"), td("a.org")];
        let d = sent.advance(names.iter(), &all);
        assert!(d.full);
        let got: Vec<&str> = d.bundles.iter().map(|b| b.trust_domain().name()).collect();
        assert_eq!(got, ["a.org", "b.org"]);
        // Nothing changed: nothing to send.
        assert!(sent.advance(names.iter(), &all).is_empty());
        // c.org changed, but no entry names it: nothing to send.
        all.insert(td("c.org"), bundle("c.org", 2));
        assert!(sent.advance(names.iter(), &all).is_empty());
        // b.org changed: only it.
        all.insert(td("b.org"), bundle("b.org", 2));
        let d = sent.advance(names.iter(), &all);
        assert!(!d.full);
        assert_eq!(d.bundles, vec![bundle("b.org", 2)]);
        assert!(d.removed.is_empty());
        // The entries no longer name a.org; x.org's bundle arrives.
        all.insert(td("x.org"), bundle("x.org", 1));
        let names = [td("b.org"), td("x.org")];
        let d = sent.advance(names.iter(), &all);
        assert_eq!(d.bundles, vec![bundle("x.org", 1)]);
        assert_eq!(d.removed, vec![td("a.org")]);
        // The bundle is deleted on the server: removed.
        all.remove(&td("x.org"));
        let d = sent.advance(names.iter(), &all);
        assert!(d.bundles.is_empty());
        assert_eq!(d.removed, vec![td("x.org")]);
    }
}
