//! The agent's JWT-SVID cache: tokens the server signed, per identity and audience set,
//! reused until half their life.
//!
//! - The key is a struct: the entry, its SPIFFE ID and the audiences as a sorted list
//!   without repeats, never a joined string (SPIRE keyed on the concatenation, so
//!   `{"ab","cd"}` and `{"a","bcd"}` shared a token, spire#4309).
//! - The cache holds at most `capacity` tokens: when full, expired tokens and tokens
//!   whose key is gone from the bundle or tainted are dropped first, then the least
//!   recently used one.
//! - A token is only ever handed out while the key that signed it (its header's `kid`) is
//!   in the bundle and not tainted; otherwise it is dropped on sight.

use std::collections::HashMap;
use std::sync::Arc;

use carapace_core::{EntryId, SpiffeId, TrustBundle};

/// The most tokens held by default (a JWT-SVID is well under 1 KiB).
pub const DEFAULT_CAPACITY: usize = 4096;

/// What a token was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtCacheKey {
    entry_id: EntryId,
    spiffe_id: SpiffeId,
    /// Sorted, without repeats.
    audiences: Vec<String>,
}

impl JwtCacheKey {
    /// The key for `entry_id` (`spiffe_id`) and `audiences` in any order, repeats
    /// ignored.
    pub fn new(entry_id: EntryId, spiffe_id: SpiffeId, audiences: &[String]) -> Self {
        JwtCacheKey {
            entry_id,
            spiffe_id,
            audiences: normalize_audiences(audiences),
        }
    }

    /// The entry.
    pub fn entry_id(&self) -> &EntryId {
        &self.entry_id
    }

    /// The SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The audiences, sorted, without repeats.
    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }
}

/// `audiences` sorted and without repeats.
pub fn normalize_audiences(audiences: &[String]) -> Vec<String> {
    let mut v = audiences.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// One token the server signed, checked by the agent.
#[derive(Clone, PartialEq, Eq)]
pub struct CachedJwt {
    /// The compact JWS.
    pub token: Arc<str>,
    /// The header's `kid`.
    pub kid: String,
    /// `iat`, unix seconds.
    pub issued_at: i64,
    /// `exp`, unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for CachedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer secret.
        f.debug_struct("CachedJwt")
            .field("token", &"<redacted>")
            .field("kid", &self.kid)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl CachedJwt {
    /// When the token is due for renewal: half its life.
    pub fn renew_at(&self) -> i64 {
        self.issued_at
            .saturating_add(self.expires_at.saturating_sub(self.issued_at) / 2)
    }

    /// Whether its signing key is in `bundle` and not tainted.
    fn key_trusted(&self, bundle: &TrustBundle) -> bool {
        bundle.jwt_authorities.iter().any(|k| k.kid == self.kid)
            && !bundle.tainted_jwt_kids.contains(&self.kid)
    }

    /// Whether it may still be handed out at `now` under `bundle`.
    fn usable(&self, bundle: &TrustBundle, now: i64) -> bool {
        now < self.expires_at && self.key_trusted(bundle)
    }
}

#[derive(Debug)]
struct Slot {
    jwt: CachedJwt,
    last_used: u64,
}

/// The cache (not synchronised: the Workload API keeps it behind a mutex, never across
/// an `await`).
#[derive(Debug)]
pub struct JwtCache {
    slots: HashMap<JwtCacheKey, Slot>,
    capacity: usize,
    /// A use counter, for least-recently-used eviction.
    clock: u64,
    /// The bundle the cache was last pruned for.
    pruned_for: Option<Arc<TrustBundle>>,
}

/// What [`JwtCache::lookup`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A token before its half-life: serve it.
    Fresh(CachedJwt),
    /// A token past its half-life but still valid: renew it, and serve it if the server
    /// cannot be reached.
    Stale(CachedJwt),
    /// Nothing usable.
    Missing,
}

impl JwtCache {
    /// An empty cache holding at most `capacity` tokens (at least 1).
    pub fn new(capacity: usize) -> Self {
        JwtCache {
            slots: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
            pruned_for: None,
        }
    }

    /// How many tokens are held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The token for `key` at `now` under `bundle`. A token that expired, or whose key
    /// left the bundle or was tainted, is dropped. When `bundle` differs from the one the
    /// cache last saw, every token is checked against it first.
    pub fn lookup(&mut self, key: &JwtCacheKey, bundle: &Arc<TrustBundle>, now: i64) -> Lookup {
        self.prune_if_bundle_changed(bundle, now);
        self.clock += 1;
        let clock = self.clock;
        let Some(slot) = self.slots.get_mut(key) else {
            return Lookup::Missing;
        };
        if !slot.jwt.usable(bundle, now) {
            self.slots.remove(key);
            return Lookup::Missing;
        }
        slot.last_used = clock;
        if now < slot.jwt.renew_at() {
            Lookup::Fresh(slot.jwt.clone())
        } else {
            Lookup::Stale(slot.jwt.clone())
        }
    }

    /// Keeps `jwt` for `key`, making room if the cache is full.
    pub fn insert(
        &mut self,
        key: JwtCacheKey,
        jwt: CachedJwt,
        bundle: &Arc<TrustBundle>,
        now: i64,
    ) {
        self.clock += 1;
        if !self.slots.contains_key(&key) && self.slots.len() >= self.capacity {
            self.prune(bundle, now);
            if self.slots.len() >= self.capacity {
                let oldest = self
                    .slots
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.slots.remove(&k);
                }
            }
        }
        self.slots.insert(
            key,
            Slot {
                jwt,
                last_used: self.clock,
            },
        );
    }

    /// Drops the token of `key`.
    pub fn remove(&mut self, key: &JwtCacheKey) {
        self.slots.remove(key);
    }

    /// Drops every token of `entry_id` (the server refused to sign for it).
    pub fn remove_entry(&mut self, entry_id: &EntryId) {
        self.slots.retain(|k, _| k.entry_id != *entry_id);
    }

    /// Drops every token that expired or whose key is gone from `bundle` or tainted.
    pub fn prune(&mut self, bundle: &Arc<TrustBundle>, now: i64) {
        let before = self.slots.len();
        self.slots.retain(|_, s| s.jwt.usable(bundle, now));
        let dropped = before - self.slots.len();
        if dropped > 0 {
            tracing::debug!(
                dropped,
                held = self.slots.len(),
                "dropped cached JWT-SVIDs: expired, or signed by a key no longer trusted"
            );
        }
        self.pruned_for = Some(bundle.clone());
    }

    fn prune_if_bundle_changed(&mut self, bundle: &Arc<TrustBundle>, now: i64) {
        let same = self
            .pruned_for
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, bundle) || **b == **bundle);
        if !same {
            self.prune(bundle, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_core::{JwtKey, TrustDomain};

    fn bundle(kids: &[&str], tainted: &[&str]) -> Arc<TrustBundle> {
        let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        b.jwt_authorities = kids
            .iter()
            .map(|k| JwtKey {
                kid: (*k).into(),
                public_key_der: vec![1],
                expires_at: None,
            })
            .collect();
        b.tainted_jwt_kids = tainted.iter().map(|k| (*k).to_string()).collect();
        Arc::new(b)
    }

    fn key(entry: &str, auds: &[&str]) -> JwtCacheKey {
        let auds: Vec<String> = auds.iter().map(|a| (*a).to_string()).collect();
        JwtCacheKey::new(
            EntryId::new(entry).unwrap(),
            format!("spiffe://example.org/{entry}").parse().unwrap(),
            &auds,
        )
    }

    fn jwt(token: &str, kid: &str, iat: i64, exp: i64) -> CachedJwt {
        CachedJwt {
            token: token.into(),
            kid: kid.into(),
            issued_at: iat,
            expires_at: exp,
        }
    }

    #[test]
    fn audience_sets_are_keys_without_ambiguity() {
        // spire#4309: a joined string made these two the same key.
        assert_ne!(key("e", &["ab", "cd"]), key("e", &["a", "bcd"]));
        assert_ne!(key("e", &["a,b"]), key("e", &["a", "b"]));
        assert_ne!(key("e", &["a b"]), key("e", &["a", "b"]));
        assert_ne!(key("e", &["ab"]), key("e", &["a", "b"]));
        // A set: order and repeats do not matter.
        assert_eq!(key("e", &["b", "a", "b"]), key("e", &["a", "b"]));
        assert_eq!(key("e", &["b", "a"]).audiences(), ["a", "b"]);
        // Another entry is another key.
        assert_ne!(key("e", &["a"]), key("f", &["a"]));

        let b = bundle(&["k"], &[]);
        let mut c = JwtCache::new(10);
        c.insert(key("e", &["ab", "cd"]), jwt("t1", "k", 100, 200), &b, 100);
        assert_eq!(c.lookup(&key("e", &["a", "bcd"]), &b, 110), Lookup::Missing);
        assert_eq!(
            c.lookup(&key("e", &["cd", "ab"]), &b, 110),
            Lookup::Fresh(jwt("t1", "k", 100, 200))
        );
    }

    #[test]
    fn fresh_until_half_life_then_stale_until_expiry() {
        let b = bundle(&["k"], &[]);
        let mut c = JwtCache::new(10);
        let k = key("e", &["a"]);
        c.insert(k.clone(), jwt("t", "k", 1000, 1300), &b, 1000);
        assert!(matches!(c.lookup(&k, &b, 1149), Lookup::Fresh(_)));
        assert!(matches!(c.lookup(&k, &b, 1150), Lookup::Stale(_)));
        assert!(matches!(c.lookup(&k, &b, 1299), Lookup::Stale(_)));
        assert_eq!(c.lookup(&k, &b, 1300), Lookup::Missing);
        assert!(c.is_empty(), "an expired token is dropped");
    }

    #[test]
    fn tokens_of_a_tainted_or_removed_key_are_dropped_at_once() {
        let mut c = JwtCache::new(10);
        let b = bundle(&["k1", "k2"], &[]);
        c.insert(key("a", &["x"]), jwt("ta", "k1", 100, 400), &b, 100);
        c.insert(key("b", &["x"]), jwt("tb", "k2", 100, 400), &b, 100);
        c.insert(key("c", &["x"]), jwt("tc", "k2", 100, 400), &b, 100);
        assert_eq!(c.len(), 3);
        // k1 tainted: its token goes on the first lookup under the new bundle, whatever
        // is looked up; the others stay.
        let tainted = bundle(&["k1", "k2"], &["k1"]);
        assert!(matches!(
            c.lookup(&key("b", &["x"]), &tainted, 110),
            Lookup::Fresh(_)
        ));
        assert_eq!(c.len(), 2);
        assert_eq!(c.lookup(&key("a", &["x"]), &tainted, 110), Lookup::Missing);
        // k2 leaves the bundle: its tokens go.
        let gone = bundle(&["k1", "k3"], &[]);
        assert_eq!(c.lookup(&key("c", &["x"]), &gone, 111), Lookup::Missing);
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_expired_first_then_least_recently_used() {
        let b = bundle(&["k"], &[]);
        let mut c = JwtCache::new(3);
        c.insert(key("a", &["x"]), jwt("ta", "k", 100, 150), &b, 100); // expires first
        c.insert(key("b", &["x"]), jwt("tb", "k", 100, 400), &b, 100);
        c.insert(key("c", &["x"]), jwt("tc", "k", 100, 400), &b, 100);
        // At 200 "a" is expired: it makes room, nobody else goes.
        c.insert(key("d", &["x"]), jwt("td", "k", 200, 500), &b, 200);
        assert_eq!(c.len(), 3);
        assert_eq!(c.lookup(&key("a", &["x"]), &b, 200), Lookup::Missing);
        // Use "b": "c" is now the least recently used and is evicted by "e".
        assert!(matches!(
            c.lookup(&key("b", &["x"]), &b, 201),
            Lookup::Fresh(_)
        ));
        c.insert(key("e", &["x"]), jwt("te", "k", 201, 500), &b, 201);
        assert_eq!(c.len(), 3);
        assert_eq!(c.lookup(&key("c", &["x"]), &b, 202), Lookup::Missing);
        for k in ["b", "d", "e"] {
            assert!(
                matches!(c.lookup(&key(k, &["x"]), &b, 202), Lookup::Fresh(_)),
                "{k}"
            );
        }
        // Many distinct audience sets never grow it past its bound.
        for i in 0..1000 {
            c.insert(
                key("b", &[&format!("aud-{i}")]),
                jwt("t", "k", 300, 600),
                &b,
                300,
            );
            assert!(c.len() <= 3);
        }
        // Replacing a held key does not evict another.
        let mut c = JwtCache::new(2);
        c.insert(key("a", &["x"]), jwt("t1", "k", 100, 400), &b, 100);
        c.insert(key("b", &["x"]), jwt("t1", "k", 100, 400), &b, 100);
        c.insert(key("a", &["x"]), jwt("t2", "k", 110, 400), &b, 110);
        assert_eq!(c.len(), 2);
        c.remove_entry(&EntryId::new("a").unwrap());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn debug_never_prints_the_token() {
        let j = jwt("eyJsecret.payload.sig", "k", 1, 2);
        let dbg = format!("{j:?}");
        assert!(!dbg.contains("eyJsecret"), "{dbg}");
    }
}
