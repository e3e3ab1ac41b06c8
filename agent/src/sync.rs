//! The authorized entries the agent holds, kept by applying the server's sync messages:
//! a full state replaces them, a diff adds, replaces and removes entries.
//!
//! Besides each parsed entry the agent keeps the digest of every entry it received
//! ([`carapace_proto::sync::entry_digest`] of the wire entry, malformed ones included),
//! so that a new stream, to this server or another sharing its database, can resume from
//! what it holds ([`HeldEntries::resume_request`]) and get a diff instead of the whole
//! list. Anything inconsistent (a diff before any full state, the removal of an entry it
//! does not hold) is an error: the caller drops the stream and asks for the full state.
//!
//! The federated bundles (the foreign trust domains' bundles the agent's entries are
//! entitled to) are kept the same way in [`HeldFederated`], but per stream: the first
//! message of every stream carries the whole set, later ones a diff.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use carapace_core::{EntryId, RegistrationEntry, TrustBundle, TrustDomain};
use carapace_proto::convert::{bundle_from_wire, entry_from_wire};
use carapace_proto::node::{HeldEntry, SyncAuthorizedRequest, SyncAuthorizedResponse};
use carapace_proto::sync::entry_digest;
use carapace_proto::types;

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

/// The federated bundles held: every foreign bundle the server sends this agent (the
/// trust domains its authorized entries federate with, for all its workloads together).
///
/// A message with `federated_full` replaces the set; one without it adds or replaces the
/// bundles it carries and drops those named in `removed_federated_bundles`. A diff is
/// applied only on a stream whose full set the agent holds: the first message of every
/// stream must carry the full set, and a diff before it ("when in doubt, full state")
/// is refused, changing nothing (the caller drops the stream; the next one opens with
/// the full set). A diff with nothing in it changes nothing and is never refused. Until
/// a new full set arrives the bundles held keep being served.
///
/// A bundle that does not parse, or that is for the agent's own trust domain, is ignored
/// with a warning: a bundle already held for that trust domain stays (also through a full
/// set that names the trust domain), so a bad copy never replaces a good one.
#[derive(Debug)]
pub struct HeldFederated {
    own: TrustDomain,
    bundles: Arc<crate::cache::FederatedBundles>,
    /// Whether the current stream sent its full set (diffs apply only then).
    known: bool,
}

impl HeldFederated {
    /// Nothing held, for an agent of trust domain `own`.
    pub fn new(own: TrustDomain) -> Self {
        HeldFederated {
            own,
            bundles: Arc::default(),
            known: false,
        }
    }

    /// The bundles held, by trust domain (shared: cloning the `Arc` copies nothing).
    pub fn bundles(&self) -> &Arc<crate::cache::FederatedBundles> {
        &self.bundles
    }

    /// Parses one wire bundle: `None` (logged) if it does not parse or is the own trust
    /// domain's; `Some((td, None))` when its trust domain is readable but not the rest.
    fn parse(&self, b: &types::Bundle) -> Option<(TrustDomain, Option<TrustBundle>)> {
        let Ok(td) = TrustDomain::new(&b.trust_domain) else {
            tracing::warn!(
                trust_domain = %carapace_core::jose::shown(&b.trust_domain),
                "ignoring a federated bundle from the server: its trust domain is not valid"
            );
            return None;
        };
        if td == self.own {
            tracing::warn!(
                trust_domain = %td,
                "ignoring a federated bundle from the server for the agent's own trust domain"
            );
            return None;
        }
        match bundle_from_wire(b) {
            Ok(bundle) => Some((td, Some(bundle))),
            Err(e) => {
                tracing::warn!(
                    trust_domain = %td,
                    error = %e,
                    "ignoring a malformed federated bundle from the server; keeping the one held, if any"
                );
                Some((td, None))
            }
        }
    }

    /// Applies one message's federated fields; `first` is whether it opens its stream.
    /// `Ok(true)` when the bundles held changed. On error nothing was changed.
    pub fn apply(&mut self, m: &SyncAuthorizedResponse, first: bool) -> Result<bool, String> {
        if first {
            self.known = false;
        }
        if m.federated_full {
            if !m.removed_federated_bundles.is_empty() {
                return Err("a full set of federated bundles that also removes some".into());
            }
            let mut next = crate::cache::FederatedBundles::new();
            for b in &m.federated_bundles {
                let Some((td, bundle)) = self.parse(b) else {
                    continue;
                };
                let held = self.bundles.get(&td);
                let kept = match (bundle, held) {
                    (Some(new), Some(old)) if **old == new => old.clone(),
                    (Some(new), _) => Arc::new(new),
                    (None, Some(old)) => old.clone(),
                    (None, None) => continue,
                };
                next.insert(td, kept);
            }
            self.known = true;
            return Ok(self.replace(next));
        }
        if m.federated_bundles.is_empty() && m.removed_federated_bundles.is_empty() {
            return Ok(false);
        }
        if !self.known {
            return Err("a diff of federated bundles before the full set of the stream".into());
        }
        let mut next = (*self.bundles).clone();
        for name in &m.removed_federated_bundles {
            match TrustDomain::new(name) {
                Ok(td) => {
                    next.remove(&td);
                }
                Err(e) => tracing::warn!(
                    trust_domain = %carapace_core::jose::shown(name),
                    error = %e,
                    "ignoring the removal of a federated bundle: not a trust domain"
                ),
            }
        }
        for b in &m.federated_bundles {
            if let Some((td, Some(bundle))) = self.parse(b) {
                if next.get(&td).is_none_or(|old| **old != bundle) {
                    next.insert(td, Arc::new(bundle));
                }
            }
        }
        Ok(self.replace(next))
    }

    /// Holds `next` if it differs from what is held (by trust domain and content);
    /// whether it did.
    fn replace(&mut self, next: crate::cache::FederatedBundles) -> bool {
        let next = Arc::new(next);
        if crate::cache::same_federated(&self.bundles, &next) {
            return false;
        }
        self.bundles = next;
        true
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

    // ------------------------------------------------------------ federated bundles

    /// A CA certificate (DER) that `bundle_from_wire` accepts.
    fn ca(cn: &str) -> Vec<u8> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.self_signed(&kp).unwrap().der().to_vec()
    }

    fn fed(td: &str, authorities: &[&[u8]]) -> types::Bundle {
        types::Bundle {
            trust_domain: td.into(),
            x509_authorities: authorities.iter().map(|a| a.to_vec()).collect(),
            sequence: 1,
            ..Default::default()
        }
    }

    fn fed_full(bundles: Vec<types::Bundle>) -> SyncAuthorizedResponse {
        SyncAuthorizedResponse {
            federated_bundles: bundles,
            federated_full: true,
            ..Default::default()
        }
    }

    fn fed_diff(bundles: Vec<types::Bundle>, removed: &[&str]) -> SyncAuthorizedResponse {
        SyncAuthorizedResponse {
            federated_bundles: bundles,
            removed_federated_bundles: removed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// What is held: trust domain → its X.509 authorities.
    fn held(h: &HeldFederated) -> Vec<(String, Vec<Vec<u8>>)> {
        h.bundles()
            .iter()
            .map(|(td, b)| (td.name().to_owned(), b.x509_authorities.clone()))
            .collect()
    }

    fn own() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn a_full_set_of_federated_bundles_replaces_what_is_held() {
        let (a, b, c) = (ca("a"), ca("b"), ca("c"));
        let mut h = HeldFederated::new(own());
        assert!(
            h.apply(
                &fed_full(vec![fed("a.org", &[&a]), fed("b.org", &[&b])]),
                true
            )
            .unwrap()
        );
        assert_eq!(
            held(&h),
            [
                ("a.org".to_owned(), vec![a.clone()]),
                ("b.org".to_owned(), vec![b.clone()])
            ]
        );
        let kept = h.bundles()[&TrustDomain::new("b.org").unwrap()].clone();
        // The next stream's full set: a.org gone, b.org unchanged, c.org new.
        assert!(
            h.apply(
                &fed_full(vec![fed("b.org", &[&b]), fed("c.org", &[&c])]),
                true
            )
            .unwrap()
        );
        assert_eq!(
            held(&h),
            [
                ("b.org".to_owned(), vec![b.clone()]),
                ("c.org".to_owned(), vec![c.clone()])
            ]
        );
        assert!(
            Arc::ptr_eq(&kept, &h.bundles()[&TrustDomain::new("b.org").unwrap()]),
            "an unchanged bundle is the same Arc: streams following it are not woken"
        );
        // The same set again (a reconnect): no change.
        let before = h.bundles().clone();
        assert!(
            !h.apply(
                &fed_full(vec![fed("c.org", &[&c]), fed("b.org", &[&b])]),
                true
            )
            .unwrap()
        );
        assert!(Arc::ptr_eq(&before, h.bundles()));
        // An empty full set drops everything.
        assert!(h.apply(&fed_full(vec![]), false).unwrap());
        assert!(held(&h).is_empty());
    }

    #[test]
    fn federated_diffs_add_change_and_remove() {
        let (a, a2, b, c) = (ca("a"), ca("a2"), ca("b"), ca("c"));
        let mut h = HeldFederated::new(own());
        h.apply(
            &fed_full(vec![fed("a.org", &[&a]), fed("b.org", &[&b])]),
            true,
        )
        .unwrap();
        // a.org changes, c.org comes, b.org goes (named as a name or a trust domain ID).
        assert!(
            h.apply(
                &fed_diff(
                    vec![fed("a.org", &[&a, &a2]), fed("c.org", &[&c])],
                    &["b.org"]
                ),
                false
            )
            .unwrap()
        );
        assert_eq!(
            held(&h),
            [
                ("a.org".to_owned(), vec![a.clone(), a2.clone()]),
                ("c.org".to_owned(), vec![c.clone()])
            ]
        );
        assert!(
            h.apply(&fed_diff(vec![], &["spiffe://c.org"]), false)
                .unwrap()
        );
        assert_eq!(
            held(&h),
            [("a.org".to_owned(), vec![a.clone(), a2.clone()])]
        );
        // Removing what is not held, or sending what is held: no change.
        assert!(
            !h.apply(
                &fed_diff(vec![fed("a.org", &[&a, &a2])], &["zzz.org"]),
                false
            )
            .unwrap()
        );
        // A message about entries only (no federated fields) changes nothing.
        assert!(!h.apply(&SyncAuthorizedResponse::default(), false).unwrap());
        assert_eq!(held(&h).len(), 1);
    }

    #[test]
    fn a_federated_diff_before_the_streams_full_set_changes_nothing() {
        let (a, b) = (ca("a"), ca("b"));
        // Before any full set at all.
        let mut h = HeldFederated::new(own());
        let err = h
            .apply(&fed_diff(vec![fed("a.org", &[&a])], &[]), true)
            .unwrap_err();
        assert!(err.contains("before the full set"), "{err}");
        let err = h
            .apply(&fed_diff(vec![fed("a.org", &[&a])], &[]), false)
            .unwrap_err();
        assert!(err.contains("before the full set"), "{err}");
        assert!(held(&h).is_empty());

        // A full set on one stream; the next stream opens with a diff: refused, and so is
        // every diff of that stream, until its full set.
        h.apply(&fed_full(vec![fed("a.org", &[&a])]), true).unwrap();
        assert!(
            h.apply(&fed_diff(vec![], &["a.org"]), true).is_err(),
            "the first message of a stream must carry the full set"
        );
        assert!(
            h.apply(&fed_diff(vec![fed("b.org", &[&b])], &[]), false)
                .is_err()
        );
        assert_eq!(
            held(&h),
            [("a.org".to_owned(), vec![a.clone()])],
            "nothing applied; what is held is still served"
        );
        h.apply(&fed_full(vec![fed("a.org", &[&a])]), false)
            .unwrap();
        assert!(
            h.apply(&fed_diff(vec![fed("b.org", &[&b])], &[]), false)
                .unwrap()
        );
        assert_eq!(held(&h).len(), 2);

        // A full set that also removes: refused.
        let mut m = fed_full(vec![]);
        m.removed_federated_bundles = vec!["a.org".into()];
        assert!(h.apply(&m, true).is_err());
        assert_eq!(held(&h).len(), 2);
    }

    #[test]
    fn own_trust_domain_and_malformed_federated_bundles_are_ignored() {
        let (a, b, mine) = (ca("a"), ca("b"), ca("mine"));
        let mut h = HeldFederated::new(own());
        h.apply(
            &fed_full(vec![
                fed("example.org", &[&mine]),
                fed("spiffe://example.org", &[&mine]),
                fed("a.org", &[&a]),
                fed("Not A Trust Domain", &[&b]),
                fed("bad.org", &[b"not a certificate"]),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(
            held(&h),
            [("a.org".to_owned(), vec![a.clone()])],
            "only the valid foreign bundle"
        );
        // A malformed new copy of a held bundle: ignored, the good one stays (in a diff
        // and in a full set that names the trust domain).
        assert!(
            !h.apply(&fed_diff(vec![fed("a.org", &[b"garbage"])], &[]), false)
                .unwrap()
        );
        assert!(
            !h.apply(&fed_full(vec![fed("a.org", &[b"garbage"])]), true)
                .unwrap()
        );
        assert_eq!(held(&h), [("a.org".to_owned(), vec![a.clone()])]);
        // The own trust domain in a diff, or its removal: nothing.
        assert!(
            !h.apply(
                &fed_diff(vec![fed("example.org", &[&mine])], &["example.org"]),
                false
            )
            .unwrap()
        );
        assert!(!h.bundles().contains_key(&own()));
    }
}
