//! The agent's SVID cache: the X509-SVIDs of every workload entry this agent serves, plus
//! its own trust domain's bundle and the federated (foreign) bundles its entries are
//! entitled to, published as one immutable snapshot.
//!
//! The manager (which talks to the server) builds a new snapshot and calls
//! [`SvidCache::replace`]; Workload API streams hold a [`tokio::sync::watch::Receiver`] and
//! recompute what they send on every change. Snapshots and SVIDs are shared through
//! `Arc`s: no DER or key bytes are copied per workload or per subscriber.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use carapace_core::{EntryId, Selector, SelectorSet, SpiffeId, TrustBundle, TrustDomain};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// One X509-SVID issued for one registration entry.
#[derive(Clone)]
pub struct CachedSvid {
    /// The entry the SVID was issued for.
    pub entry_id: EntryId,
    /// The SVID's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The entry's selectors: a workload gets this SVID when all of them are among its own.
    pub selectors: SelectorSet,
    /// The entry's hint (may be empty).
    pub hint: String,
    /// The foreign trust domains the entry federates with: a workload holding this SVID
    /// gets their bundles (those the agent holds).
    pub federates_with: Vec<TrustDomain>,
    /// The certificate chain in DER, leaf first.
    pub cert_chain: Vec<Vec<u8>>,
    /// The private key, PKCS#8 DER; wiped on drop and never printed.
    pub private_key_pkcs8: Zeroizing<Vec<u8>>,
    /// The leaf's notAfter, unix seconds.
    pub expires_at: i64,
}

impl CachedSvid {
    /// The leaf certificate (DER), if the chain is not empty.
    pub fn leaf(&self) -> Option<&[u8]> {
        self.cert_chain.first().map(Vec::as_slice)
    }

    /// Whether `self` and `other` would be served identically.
    fn same_as(&self, other: &CachedSvid) -> bool {
        self.entry_id == other.entry_id
            && self.spiffe_id == other.spiffe_id
            && self.selectors == other.selectors
            && self.hint == other.hint
            && self.federates_with == other.federates_with
            && self.expires_at == other.expires_at
            && self.cert_chain == other.cert_chain
            && *self.private_key_pkcs8 == *other.private_key_pkcs8
    }
}

impl fmt::Debug for CachedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedSvid")
            .field("entry_id", &self.entry_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("selectors", &self.selectors)
            .field("hint", &self.hint)
            .field("federates_with", &self.federates_with)
            .field("chain_len", &self.cert_chain.len())
            .field("private_key_pkcs8", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Whether two SVID lists are the same, element by element (same `Arc` or same content).
pub(crate) fn same_svids(a: &[Arc<CachedSvid>], b: &[Arc<CachedSvid>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(x, y) || x.same_as(y))
}

/// Whether two bundles are the same (same `Arc` or same content).
pub(crate) fn same_bundle(a: &Arc<TrustBundle>, b: &Arc<TrustBundle>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// The bundles of foreign trust domains the agent holds, by trust domain (never the own
/// one).
pub type FederatedBundles = BTreeMap<TrustDomain, Arc<TrustBundle>>;

/// Whether two sets of federated bundles are the same (same `Arc`, or the same trust
/// domains with the same bundles).
pub(crate) fn same_federated(a: &Arc<FederatedBundles>, b: &Arc<FederatedBundles>) -> bool {
    Arc::ptr_eq(a, b)
        || (a.len() == b.len()
            && a.iter()
                .zip(b.iter())
                .all(|((ta, ba), (tb, bb))| ta == tb && same_bundle(ba, bb)))
}

/// One immutable snapshot of the cache.
#[derive(Debug, Clone)]
pub struct CacheState {
    /// The agent's own trust domain's bundle.
    pub bundle: Arc<TrustBundle>,
    /// Every foreign bundle the agent holds (for all its workloads together): a caller
    /// sees only those it is entitled to ([`CacheState::entitled`]).
    pub federated: Arc<FederatedBundles>,
    /// Every SVID, sorted by entry id.
    pub svids: Vec<Arc<CachedSvid>>,
    /// Positions in `svids`, keyed by each SVID's smallest selector: an entry can only
    /// match a workload that has that selector, so a lookup touches only candidates.
    by_first_selector: HashMap<Selector, Vec<usize>>,
    /// SVIDs whose entry has no selectors (the server refuses such entries; kept exact).
    unconditional: Vec<usize>,
}

impl CacheState {
    /// A snapshot of `svids` (sorted by entry id) with its selector index.
    fn new(
        bundle: Arc<TrustBundle>,
        federated: Arc<FederatedBundles>,
        svids: Vec<Arc<CachedSvid>>,
    ) -> Self {
        let mut by_first_selector: HashMap<Selector, Vec<usize>> = HashMap::new();
        let mut unconditional = Vec::new();
        for (i, s) in svids.iter().enumerate() {
            match s.selectors.iter().next() {
                Some(first) => by_first_selector.entry(first.clone()).or_default().push(i),
                None => unconditional.push(i),
            }
        }
        CacheState {
            bundle,
            federated,
            svids,
            by_first_selector,
            unconditional,
        }
    }

    /// The SVIDs whose entry selectors are all among `workload`'s selectors, in entry-id
    /// order (the first is the workload's default identity). Costs O(|workload| +
    /// candidates), not O(cached SVIDs).
    pub fn matching(&self, workload: &SelectorSet) -> Vec<Arc<CachedSvid>> {
        let mut hits = self.unconditional.clone();
        for sel in workload.iter() {
            if let Some(v) = self.by_first_selector.get(sel) {
                hits.extend_from_slice(v);
            }
        }
        // Each SVID is indexed once, so there are no duplicates; sorting the positions
        // restores entry-id order.
        hits.sort_unstable();
        hits.into_iter()
            .map(|i| &self.svids[i])
            .filter(|s| s.selectors.is_subset_of(workload))
            .cloned()
            .collect()
    }

    /// The foreign bundles a caller holding `svids` (its matching SVIDs) is entitled to:
    /// those of the trust domains any of their entries federates with, among the bundles
    /// the agent holds; sorted by trust domain, each once. Nothing else: a bundle the
    /// agent holds for another workload is not among them.
    pub fn entitled(&self, svids: &[Arc<CachedSvid>]) -> Vec<Arc<TrustBundle>> {
        if self.federated.is_empty() {
            return Vec::new();
        }
        let wanted: BTreeSet<&TrustDomain> =
            svids.iter().flat_map(|s| s.federates_with.iter()).collect();
        wanted
            .into_iter()
            .filter_map(|td| self.federated.get(td).cloned())
            .collect()
    }
}

/// The cache: a watch channel of [`CacheState`] snapshots. Cloning shares the same cache.
#[derive(Debug, Clone)]
pub struct SvidCache {
    tx: Arc<watch::Sender<Arc<CacheState>>>,
}

impl SvidCache {
    /// An empty cache holding `bundle`.
    pub fn new(bundle: Arc<TrustBundle>) -> Self {
        let (tx, _rx) = watch::channel(Arc::new(CacheState::new(
            bundle,
            Arc::default(),
            Vec::new(),
        )));
        SvidCache { tx: Arc::new(tx) }
    }

    /// A receiver that sees the current snapshot and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CacheState>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<CacheState> {
        self.tx.borrow().clone()
    }

    /// Replaces the whole state, with no federated bundles (see
    /// [`SvidCache::replace_all`]).
    pub fn replace(&self, bundle: Arc<TrustBundle>, svids: Vec<Arc<CachedSvid>>) {
        self.replace_all(bundle, Arc::default(), svids);
    }

    /// Replaces the whole state. `svids` are sorted by entry id here. Subscribers are
    /// notified only if the bundle, a federated bundle or an SVID actually changed.
    pub fn replace_all(
        &self,
        bundle: Arc<TrustBundle>,
        federated: Arc<FederatedBundles>,
        mut svids: Vec<Arc<CachedSvid>>,
    ) {
        svids.sort_by(|a, b| a.entry_id.cmp(&b.entry_id));
        self.tx.send_if_modified(|state| {
            if same_bundle(&state.bundle, &bundle)
                && same_federated(&state.federated, &federated)
                && same_svids(&state.svids, &svids)
            {
                return false;
            }
            *state = Arc::new(CacheState::new(bundle, federated, svids));
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_core::{Selector, TrustDomain};

    fn bundle(seq: u64) -> Arc<TrustBundle> {
        let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        b.x509_authorities = vec![vec![1, 2, 3]];
        b.sequence = seq;
        Arc::new(b)
    }

    fn svid(id: &str, selectors: &[&str], leaf: u8) -> Arc<CachedSvid> {
        Arc::new(CachedSvid {
            entry_id: EntryId::new(id).unwrap(),
            spiffe_id: format!("spiffe://example.org/{id}").parse().unwrap(),
            selectors: selectors
                .iter()
                .map(|s| s.parse::<Selector>().unwrap())
                .collect(),
            hint: String::new(),
            federates_with: Vec::new(),
            cert_chain: vec![vec![leaf]],
            private_key_pkcs8: Zeroizing::new(vec![0xAA, 0xBB, 0xCC]),
            expires_at: 0,
        })
    }

    fn set(items: &[&str]) -> SelectorSet {
        items
            .iter()
            .map(|s| s.parse::<Selector>().unwrap())
            .collect()
    }

    #[test]
    fn debug_never_prints_the_key() {
        let s = svid("e1", &["unix:uid:0"], 1);
        let dbg = format!("{s:?}");
        assert!(dbg.contains("redacted"), "{dbg}");
        assert!(
            !dbg.contains("170") && !dbg.contains("AA") && !dbg.contains("aa"),
            "{dbg}"
        );
    }

    #[test]
    fn replace_sorts_and_matching_is_subset_in_entry_order() {
        let cache = SvidCache::new(bundle(1));
        cache.replace(
            bundle(1),
            vec![
                svid("c", &["unix:uid:0"], 3),
                svid("a", &["unix:uid:0", "unix:gid:0"], 1),
                svid("b", &["unix:uid:1"], 2),
            ],
        );
        let st = cache.current();
        let ids: Vec<_> = st.svids.iter().map(|s| s.entry_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let m = st.matching(&set(&["unix:uid:0", "unix:gid:0", "unix:user:root"]));
        let ids: Vec<_> = m.iter().map(|s| s.entry_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        let m = st.matching(&set(&["unix:uid:0"]));
        let ids: Vec<_> = m.iter().map(|s| s.entry_id.as_str()).collect();
        assert_eq!(ids, ["c"], "an entry with two selectors needs both");
        assert!(st.matching(&set(&[])).is_empty());
        // Shared, not copied.
        assert!(Arc::ptr_eq(&m[0], &st.svids[2]));
    }

    #[tokio::test]
    async fn notifies_only_on_change() {
        let cache = SvidCache::new(bundle(1));
        let mut rx = cache.subscribe();
        rx.borrow_and_update();
        let a = svid("a", &["unix:uid:0"], 1);
        cache.replace(bundle(1), vec![a.clone()]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // Same content in new Arcs: no notification.
        cache.replace(bundle(1), vec![svid("a", &["unix:uid:0"], 1)]);
        assert!(!rx.has_changed().unwrap());
        // New leaf: notification.
        cache.replace(bundle(1), vec![svid("a", &["unix:uid:0"], 2)]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // New bundle: notification.
        cache.replace(bundle(2), vec![svid("a", &["unix:uid:0"], 2)]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // Emptied: notification.
        cache.replace(bundle(2), vec![]);
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().svids.is_empty());
    }

    #[test]
    fn indexed_matching_agrees_with_a_linear_scan() {
        use rand::Rng;
        let pool: Vec<String> = (0..12).map(|i| format!("unix:uid:{i}")).collect();
        let mut rng = rand::rng();
        let pick = |rng: &mut rand::rngs::ThreadRng, n: usize| -> Vec<String> {
            (0..n)
                .map(|_| pool[rng.random_range(0..pool.len())].clone())
                .collect()
        };
        let svids: Vec<Arc<CachedSvid>> = (0..300)
            .map(|i| {
                let n = rng.random_range(1..4);
                let sels = pick(&mut rng, n);
                let refs: Vec<&str> = sels.iter().map(String::as_str).collect();
                svid(&format!("e{i:04}"), &refs, i as u8)
            })
            .collect();
        let cache = SvidCache::new(bundle(1));
        cache.replace(bundle(1), svids.clone());
        let state = cache.current();
        for _ in 0..200 {
            let n = rng.random_range(0..8);
            let w: SelectorSet = pick(&mut rng, n)
                .iter()
                .map(|s| s.parse::<Selector>().unwrap())
                .collect();
            let fast: Vec<_> = state
                .matching(&w)
                .iter()
                .map(|s| s.entry_id.clone())
                .collect();
            let slow: Vec<_> = state
                .svids
                .iter()
                .filter(|s| s.selectors.is_subset_of(&w))
                .map(|s| s.entry_id.clone())
                .collect();
            assert_eq!(fast, slow, "workload {w:?}");
        }
    }

    fn foreign(td: &str, leaf: u8) -> Arc<TrustBundle> {
        let mut b = TrustBundle::new(TrustDomain::new(td).unwrap());
        b.x509_authorities = vec![vec![leaf]];
        Arc::new(b)
    }

    fn federating(id: &str, sel: &str, tds: &[&str]) -> Arc<CachedSvid> {
        let mut s = (*svid(id, &[sel], 1)).clone();
        s.federates_with = tds.iter().map(|t| TrustDomain::new(t).unwrap()).collect();
        Arc::new(s)
    }

    fn federated(bundles: &[Arc<TrustBundle>]) -> Arc<FederatedBundles> {
        Arc::new(
            bundles
                .iter()
                .map(|b| (b.trust_domain().clone(), b.clone()))
                .collect(),
        )
    }

    #[test]
    fn a_caller_is_entitled_only_to_held_bundles_its_entries_federate_with() {
        let cache = SvidCache::new(bundle(1));
        let (a, b, c) = (
            foreign("a.org", 1),
            foreign("b.org", 2),
            foreign("c.org", 3),
        );
        cache.replace_all(
            bundle(1),
            federated(&[a.clone(), b.clone(), c.clone()]),
            vec![
                federating("x", "unix:uid:0", &["b.org", "a.org", "missing.org"]),
                federating("y", "unix:uid:0", &["a.org"]),
                federating("z", "unix:uid:1", &["c.org"]),
            ],
        );
        let st = cache.current();
        let tds = |v: Vec<Arc<TrustBundle>>| -> Vec<String> {
            v.iter()
                .map(|b| b.trust_domain().name().to_owned())
                .collect()
        };
        // uid 0: a.org (twice) and b.org, not c.org (uid 1's) nor missing.org (not held).
        let mine = st.matching(&set(&["unix:uid:0"]));
        assert_eq!(tds(st.entitled(&mine)), ["a.org", "b.org"]);
        assert!(
            Arc::ptr_eq(&st.entitled(&mine)[0], &a),
            "shared, not copied"
        );
        assert_eq!(
            tds(st.entitled(&st.matching(&set(&["unix:uid:1"])))),
            ["c.org"]
        );
        assert!(st.entitled(&[]).is_empty());
        assert!(st.entitled(&[svid("plain", &["unix:uid:0"], 1)]).is_empty());
    }

    #[tokio::test]
    async fn a_federated_bundle_change_notifies() {
        let cache = SvidCache::new(bundle(1));
        let svids = vec![federating("x", "unix:uid:0", &["a.org"])];
        let mut rx = cache.subscribe();
        cache.replace_all(bundle(1), federated(&[foreign("a.org", 1)]), svids.clone());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // The same content in new Arcs: nothing.
        cache.replace_all(bundle(1), federated(&[foreign("a.org", 1)]), svids.clone());
        assert!(!rx.has_changed().unwrap());
        // A changed, an added and a removed bundle each notify.
        cache.replace_all(bundle(1), federated(&[foreign("a.org", 2)]), svids.clone());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        cache.replace_all(
            bundle(1),
            federated(&[foreign("a.org", 2), foreign("b.org", 1)]),
            svids.clone(),
        );
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        cache.replace_all(bundle(1), federated(&[foreign("b.org", 1)]), svids.clone());
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().federated.len(), 1);
        // An entry's federates_with alone changing notifies too.
        cache.replace_all(
            bundle(1),
            federated(&[foreign("b.org", 1)]),
            vec![federating("x", "unix:uid:0", &["b.org"])],
        );
        assert!(rx.has_changed().unwrap());
    }
}
