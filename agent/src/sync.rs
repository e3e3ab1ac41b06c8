//! The authorized entries the agent holds, kept by applying the server's sync messages:
//! a full state replaces them, a diff adds, replaces and removes entries.
//!
//! Besides each parsed entry the agent keeps the digest of every entry it received
//! ([`carapace_proto::sync::entry_digest`] of the wire entry, malformed ones included),
//! so that a new stream, to this server or another sharing its database, can resume from
//! what it holds ([`HeldEntries::resume_request`]) and get a diff instead of the whole
//! list. Anything inconsistent (a diff before any full state, the removal of an entry it
//! does not hold) is an error: the caller drops the stream and asks for the full state.

use std::collections::{BTreeMap, HashMap};

use carapace_core::{EntryId, RegistrationEntry};
use carapace_proto::convert::entry_from_wire;
use carapace_proto::node::{HeldEntry, SyncAuthorizedRequest, SyncAuthorizedResponse};
use carapace_proto::sync::entry_digest;

/// The entries held and what is known of them.
#[derive(Debug, Default)]
pub struct HeldEntries {
    entries: BTreeMap<EntryId, RegistrationEntry>,
    /// Digest of every entry received (by wire id), malformed ones included.
    digests: HashMap<String, Vec<u8>>,
    /// Whether `digests` reflects a full state and the diffs after it: only then may a
    /// stream resume from it or a diff apply to it.
    known: bool,
}

/// How a sync message changed the held entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Entries added or replaced (malformed ones not counted).
    pub upserted: usize,
    /// Entries removed.
    pub removed: usize,
}

impl HeldEntries {
    /// The parsed entries, by id.
    pub fn entries(&self) -> &BTreeMap<EntryId, RegistrationEntry> {
        &self.entries
    }

    /// Whether a stream may resume from what is held.
    pub fn is_known(&self) -> bool {
        self.known
    }

    /// Forgets that the held entries match any server state (kept for signing until the
    /// next full state replaces them): the next stream asks for the full state.
    pub fn invalidate(&mut self) {
        self.known = false;
    }

    /// The request opening a sync stream: a resume from what is held when that is known,
    /// else a request for the full state.
    pub fn resume_request(&self) -> SyncAuthorizedRequest {
        if !self.known {
            return SyncAuthorizedRequest::default();
        }
        SyncAuthorizedRequest {
            resume: true,
            held: self
                .digests
                .iter()
                .map(|(id, digest)| HeldEntry {
                    id: id.clone(),
                    digest: digest.clone(),
                })
                .collect(),
        }
    }

    /// Applies one message. `first` is whether it is the first of its stream and
    /// `resumed` whether that stream was opened with [`Self::resume_request`] of a known
    /// state. On error nothing was changed and the state is no longer known.
    pub fn apply(
        &mut self,
        m: &SyncAuthorizedResponse,
        first: bool,
        resumed: bool,
    ) -> Result<Applied, String> {
        let outcome = self.try_apply(m, first, resumed);
        if outcome.is_err() {
            self.known = false;
        }
        outcome
    }

    fn try_apply(
        &mut self,
        m: &SyncAuthorizedResponse,
        first: bool,
        resumed: bool,
    ) -> Result<Applied, String> {
        if m.full {
            if !m.removed.is_empty() {
                return Err("a full state that also removes entries".into());
            }
            self.entries.clear();
            self.digests.clear();
        } else {
            if !self.known || (first && !resumed) {
                return Err("a diff without a full state to apply it to".into());
            }
            if let Some(unknown) = m.removed.iter().find(|id| !self.digests.contains_key(*id)) {
                return Err(format!("the removal of entry {unknown}, which is not held"));
            }
        }
        let mut applied = Applied::default();
        for id in &m.removed {
            self.digests.remove(id);
            if let Ok(id) = EntryId::new(id) {
                self.entries.remove(&id);
            }
            applied.removed += 1;
        }
        for e in &m.entries {
            self.digests.insert(e.id.clone(), entry_digest(e));
            match entry_from_wire(e, None) {
                Ok(entry) => {
                    self.entries.insert(entry.id.clone(), entry);
                    applied.upserted += 1;
                }
                Err(err) => {
                    // A malformed new version: the old one is not what the server holds.
                    if let Ok(id) = EntryId::new(&e.id) {
                        self.entries.remove(&id);
                    }
                    tracing::warn!(entry = e.id, error = %err, "ignoring a malformed entry from the server");
                }
            }
        }
        self.known = true;
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_proto::types;

    fn wire(id: &str, hint: &str) -> types::Entry {
        types::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec![types::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            }],
            hint: hint.into(),
            ..Default::default()
        }
    }

    fn full(entries: Vec<types::Entry>) -> SyncAuthorizedResponse {
        SyncAuthorizedResponse {
            entries,
            full: true,
            ..Default::default()
        }
    }

    fn diff(entries: Vec<types::Entry>, removed: &[&str]) -> SyncAuthorizedResponse {
        SyncAuthorizedResponse {
            entries,
            removed: removed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn ids(h: &HeldEntries) -> Vec<&str> {
        h.entries().keys().map(EntryId::as_str).collect()
    }

    #[test]
    fn diffs_apply_on_a_full_state() {
        let mut h = HeldEntries::default();
        assert!(
            !h.resume_request().resume,
            "nothing known: full state asked"
        );
        h.apply(&full(vec![wire("a", ""), wire("b", "")]), true, false)
            .unwrap();
        assert_eq!(ids(&h), ["a", "b"]);
        let applied = h
            .apply(
                &diff(vec![wire("b", "new"), wire("c", "")], &["a"]),
                false,
                false,
            )
            .unwrap();
        assert_eq!(
            applied,
            Applied {
                upserted: 2,
                removed: 1
            }
        );
        assert_eq!(ids(&h), ["b", "c"]);
        assert_eq!(h.entries()[&EntryId::new("b").unwrap()].hint, "new");

        // What a resume announces is exactly what is held, with the digests received.
        let req = h.resume_request();
        assert!(req.resume);
        let mut held: Vec<_> = req.held.into_iter().map(|x| (x.id, x.digest)).collect();
        held.sort();
        assert_eq!(
            held,
            [
                ("b".to_owned(), entry_digest(&wire("b", "new"))),
                ("c".to_owned(), entry_digest(&wire("c", ""))),
            ]
        );

        // A resumed stream may open with a diff; a full state replaces everything.
        h.apply(&diff(vec![], &["b"]), true, true).unwrap();
        assert_eq!(ids(&h), ["c"]);
        h.apply(&full(vec![wire("z", "")]), true, true).unwrap();
        assert_eq!(ids(&h), ["z"]);
    }

    #[test]
    fn inconsistent_messages_are_refused_and_force_a_full_state() {
        // A diff before any full state.
        let mut h = HeldEntries::default();
        let err = h
            .apply(&diff(vec![wire("a", "")], &[]), true, false)
            .unwrap_err();
        assert!(err.contains("without a full state"), "{err}");
        assert!(h.entries().is_empty());

        // The removal of an entry not held: nothing changes, the state is unknown.
        h.apply(&full(vec![wire("a", ""), wire("b", "")]), true, false)
            .unwrap();
        let err = h
            .apply(&diff(vec![wire("c", "")], &["a", "x"]), false, false)
            .unwrap_err();
        assert!(err.contains("entry x"), "{err}");
        assert_eq!(ids(&h), ["a", "b"], "nothing applied");
        assert!(!h.is_known());
        assert!(
            !h.resume_request().resume,
            "the next stream asks for a full state"
        );
        let err = h.apply(&diff(vec![], &[]), false, false).unwrap_err();
        assert!(err.contains("without a full state"), "{err}");

        // A first message that is a diff on a stream that did not resume.
        h.apply(&full(vec![wire("a", "")]), true, false).unwrap();
        let err = h.apply(&diff(vec![], &[]), true, false).unwrap_err();
        assert!(err.contains("without a full state"), "{err}");

        // A full state with removals.
        let mut h = HeldEntries::default();
        let mut m = full(vec![]);
        m.removed = vec!["a".into()];
        assert!(h.apply(&m, true, false).is_err());
    }

    #[test]
    fn a_malformed_entry_is_held_by_digest_but_never_signed() {
        let mut h = HeldEntries::default();
        let mut bad = wire("bad", "");
        bad.spiffe_id = "not a spiffe id".into();
        h.apply(&full(vec![wire("bad", ""), wire("ok", "")]), true, false)
            .unwrap();
        // A malformed new version drops the old one.
        h.apply(&diff(vec![bad.clone()], &[]), false, false)
            .unwrap();
        assert_eq!(ids(&h), ["ok"]);
        assert_eq!(h.resume_request().held.len(), 2);
        // Its removal is known.
        h.apply(&diff(vec![], &["bad"]), false, false).unwrap();
        assert_eq!(h.resume_request().held.len(), 1);
    }
}
