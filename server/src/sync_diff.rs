//! What one sync stream has sent an agent, and the diff to send it next.
//!
//! A stream remembers the entries it has sent (id → the cache's `Arc` of that entry).
//! On every cache change the agent's authorized entries are compared with it: unchanged
//! entries are the same `Arc` (the cache replaces an entry's `Arc` only when it stores a
//! new version), so a change costs one map lookup per entry and the encoding of the
//! changed entries only. A stream opened with the agent's held state (ids and digests)
//! starts from what the agent proves it holds: an entry whose digest matches the
//! server's encoding is not sent again, every other authorized entry is, and every held
//! id the agent is not authorized for is removed.

use std::collections::HashMap;
use std::sync::Arc;

use carapace_core::{EntryId, RegistrationEntry};
use carapace_proto::node::HeldEntry;
use carapace_proto::sync::entry_digest;
use carapace_proto::types;

/// The entries to send: added or changed ones, and ids removed.
#[derive(Debug, Default)]
pub struct Diff {
    /// Added or changed, in the order authorized (by entry id).
    pub upserts: Vec<Arc<RegistrationEntry>>,
    /// No longer authorized, sorted.
    pub removed: Vec<String>,
}

impl Diff {
    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// What a stream has sent its agent: the entries the agent holds, as far as the server
/// knows.
#[derive(Debug, Default)]
pub struct Sent {
    entries: HashMap<EntryId, Arc<RegistrationEntry>>,
}

impl Sent {
    /// The state after a full message of `current`.
    pub fn full(current: &[Arc<RegistrationEntry>]) -> Sent {
        Sent {
            entries: current.iter().map(|e| (e.id.clone(), e.clone())).collect(),
        }
    }

    /// Starts from what the agent says it holds: the diff that brings `held` to
    /// `current`, and the state after it. An entry counts as held only when its digest
    /// equals the digest of the server's encoding of it; held ids the server does not
    /// authorize (or cannot parse) are all removed. An agent claiming to hold what it
    /// does not only deprives itself: nothing beyond `current` is ever sent.
    pub fn resume(held: &[HeldEntry], current: &[Arc<RegistrationEntry>]) -> (Sent, Diff) {
        let held_digests: HashMap<&str, &[u8]> = held
            .iter()
            .map(|h| (h.id.as_str(), h.digest.as_slice()))
            .collect();
        let mut diff = Diff::default();
        for e in current {
            let same = held_digests
                .get(e.id.as_str())
                .is_some_and(|d| *d == entry_digest(&types::Entry::from(e.as_ref())).as_slice());
            if !same {
                diff.upserts.push(e.clone());
            }
        }
        let sent = Sent::full(current);
        let mut removed: Vec<String> = held_digests
            .keys()
            .filter(|id| {
                EntryId::new(id)
                    .map(|id| !sent.entries.contains_key(&id))
                    .unwrap_or(true)
            })
            .map(|id| (*id).to_owned())
            .collect();
        removed.sort();
        diff.removed = removed;
        (sent, diff)
    }

    /// The diff from what was sent to `current`; afterwards `current` counts as sent.
    pub fn advance(&mut self, current: &[Arc<RegistrationEntry>]) -> Diff {
        let mut diff = Diff::default();
        let mut next = HashMap::with_capacity(current.len());
        for e in current {
            let same = self
                .entries
                .get(&e.id)
                .is_some_and(|old| Arc::ptr_eq(old, e) || old.as_ref() == e.as_ref());
            if !same {
                diff.upserts.push(e.clone());
            }
            next.insert(e.id.clone(), e.clone());
        }
        let mut removed: Vec<String> = self
            .entries
            .keys()
            .filter(|id| !next.contains_key(*id))
            .map(|id| id.as_str().to_owned())
            .collect();
        removed.sort();
        diff.removed = removed;
        self.entries = next;
        diff
    }

    /// Entries the agent holds, as far as the server knows.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries sent.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, hint: &str) -> Arc<RegistrationEntry> {
        Arc::new(RegistrationEntry {
            federates_with: Vec::new(),
            id: EntryId::new(id).unwrap(),
            spiffe_id: format!("spiffe://example.org/{id}").parse().unwrap(),
            parent_id: "spiffe://example.org/agent".parse().unwrap(),
            selectors: ["unix:uid:1".parse().unwrap()].into_iter().collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            jwt_svid_include_jti: false,
            dns_names: vec![],
            hint: hint.to_owned(),
            admin: false,
            downstream: false,
            expires_at: None,
            revision: 0,
            created_at: 1,
        })
    }

    fn ids(d: &Diff) -> Vec<&str> {
        d.upserts.iter().map(|e| e.id.as_str()).collect()
    }

    fn held(e: &RegistrationEntry) -> HeldEntry {
        HeldEntry {
            id: e.id.as_str().to_owned(),
            digest: entry_digest(&types::Entry::from(e)),
        }
    }

    #[test]
    fn one_change_out_of_ten_thousand_is_one_entry() {
        let mut current: Vec<_> = (0..10_000)
            .map(|i| entry(&format!("e{i:05}"), ""))
            .collect();
        let mut sent = Sent::full(&current);
        assert!(
            sent.advance(&current).is_empty(),
            "no change, nothing to send"
        );

        // A new version of one entry (a new Arc with other content).
        let mut changed = current[1234].as_ref().clone();
        changed.hint = "new".into();
        changed.revision += 1;
        current[1234] = Arc::new(changed);
        let d = sent.advance(&current);
        assert_eq!(ids(&d), ["e01234"]);
        assert!(d.removed.is_empty());

        // An equal copy (say, reloaded from the datastore) is not a change.
        current[7] = Arc::new(current[7].as_ref().clone());
        assert!(sent.advance(&current).is_empty());

        // Removal and addition in one step.
        let gone = current.remove(42);
        current.push(entry("new-one", ""));
        let d = sent.advance(&current);
        assert_eq!(ids(&d), ["new-one"]);
        assert_eq!(d.removed, [gone.id.as_str()]);
        assert_eq!(sent.len(), 10_000);
        assert!(sent.advance(&current).is_empty());
    }

    #[test]
    fn a_resume_sends_what_the_agent_does_not_hold_exactly_and_removes_the_rest() {
        let a = entry("a", "");
        let b = entry("b", "");
        let c = entry("c", "");
        let mut b2 = b.as_ref().clone();
        b2.hint = "changed".into();
        b2.revision += 1;
        let b2 = Arc::new(b2);
        // Same id and revision, other content (deleted and made again with that id):
        // the digest tells them apart.
        let mut c_again = c.as_ref().clone();
        c_again.hint = "other".into();
        let c_again = Arc::new(c_again);
        let current = vec![a.clone(), b2.clone(), c_again.clone(), entry("d", "")];
        let holding = vec![
            held(&a),
            held(&b),
            held(&c),
            held(&entry("gone", "")),
            HeldEntry {
                id: "not an id!".into(),
                digest: vec![1, 2, 3],
            },
        ];
        let (mut sent, d) = Sent::resume(&holding, &current);
        assert_eq!(ids(&d), ["b", "c", "d"]);
        assert_eq!(d.removed, ["gone", "not an id!"]);
        assert_eq!(sent.len(), 4);
        assert!(sent.advance(&current).is_empty());

        // Everything held and current: nothing to send.
        let all: Vec<_> = current.iter().map(|e| held(e)).collect();
        let (_, d) = Sent::resume(&all, &current);
        assert!(d.is_empty());

        // Holding nothing: everything is sent.
        let (_, d) = Sent::resume(&[], &current);
        assert_eq!(ids(&d), ["a", "b", "c", "d"]);
    }

    #[test]
    fn claiming_entries_never_yields_more_than_the_authorized_ones() {
        let current = vec![entry("mine", "")];
        let claimed = vec![
            held(&entry("someone-elses", "")),
            HeldEntry {
                id: "mine".into(),
                digest: vec![0; 32],
            },
        ];
        let (_, d) = Sent::resume(&claimed, &current);
        assert_eq!(ids(&d), ["mine"]);
        assert_eq!(d.removed, ["someone-elses"]);
    }
}
