//! Creating a batch of entries: one write transaction for the whole batch, all or
//! nothing.
//!
//! Every entry is checked before anything is committed: the caller's check (the core
//! validation against the trust domain), duplicates within the batch (the same id, or
//! the same SPIFFE ID, parent ID and selector set as an earlier entry of the batch), and
//! the stored checks of a single create (an entry with the same id or a similar entry
//! already stored). When any entry is refused the transaction is rolled back and every
//! refused entry is named with why; otherwise every entry (row, selectors, DNS names and
//! one `create` event each) is committed at once.
//!
//! The stored checks and the writes reuse [`entries::insert_entry`] per entry, inside the
//! one transaction: that is the only datastore internal used here.

use std::collections::{BTreeSet, HashMap};

use carapace_core::RegistrationEntry;

use super::{Datastore, entries, unix_now};
use crate::{Error, Result};

/// The refused entries of a batch: (position in the batch, why), in batch order.
pub(super) type Refusals = Vec<(usize, Error)>;

/// The identity of an entry for the similar-entry rule: SPIFFE ID, parent ID and the
/// selector set.
type SimilarKey<'a> = (&'a str, &'a str, BTreeSet<(&'a str, &'a str)>);

fn similar_key(e: &RegistrationEntry) -> SimilarKey<'_> {
    (
        e.spiffe_id.as_str(),
        e.parent_id.as_str(),
        e.selectors.iter().map(|s| (s.kind(), s.value())).collect(),
    )
}

/// The entries refused by `check` or as duplicates of an earlier entry of the batch.
/// An entry refused by `check` is not compared with the others.
fn refused_before_storage(
    batch: &[RegistrationEntry],
    check: impl Fn(&RegistrationEntry) -> Result<()>,
) -> Refusals {
    let mut refused = Refusals::new();
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut similar: HashMap<SimilarKey<'_>, usize> = HashMap::new();
    for (i, e) in batch.iter().enumerate() {
        if let Err(err) = check(e) {
            refused.push((i, err));
            continue;
        }
        if let Some(first) = ids.get(e.id.as_str()) {
            refused.push((
                i,
                Error::AlreadyExists(format!(
                    "entry id {} is also the id of entry {first} of this batch",
                    e.id
                )),
            ));
            continue;
        }
        if let Some(first) = similar.get(&similar_key(e)) {
            refused.push((
                i,
                Error::AlreadyExists(format!(
                    "entry {first} of this batch has the same SPIFFE ID {}, parent ID {} and \
                     selectors",
                    e.spiffe_id, e.parent_id
                )),
            ));
            continue;
        }
        ids.insert(e.id.as_str(), i);
        similar.insert(similar_key(e), i);
    }
    refused
}

impl Datastore {
    /// Stores every entry of `batch` (as given: ids, revisions and `created_at`
    /// included), with its selectors, DNS names and one `create` event each, in one write
    /// transaction; or, when any entry is refused, stores none and returns
    /// `Ok(Err(refusals))` naming every refused entry by its position in the batch.
    ///
    /// An entry is refused when `check` refuses it, when it has the id of an earlier
    /// entry of the batch or the same SPIFFE ID, parent ID and selectors, when an entry
    /// with its id is stored, or when a similar entry is stored ([`Error::AlreadyExists`]
    /// as for [`Datastore::create_entry`]). Any other failure (the database's) is an
    /// `Err`, and nothing is written either.
    pub async fn create_entries(
        &self,
        batch: &[RegistrationEntry],
        check: impl Fn(&RegistrationEntry) -> Result<()>,
    ) -> Result<std::result::Result<(), Refusals>> {
        let mut refused = refused_before_storage(batch, check);
        let skip: BTreeSet<usize> = refused.iter().map(|(i, _)| *i).collect();
        let now = unix_now();
        let mut tx = self.begin_write().await?;
        for (i, e) in batch.iter().enumerate() {
            if skip.contains(&i) {
                continue;
            }
            // The remaining entries are still inserted after a refusal, to find every
            // refusal: the transaction is rolled back anyway.
            match entries::insert_entry(&mut tx, e, now).await {
                Ok(()) => {}
                Err(err @ (Error::AlreadyExists(_) | Error::InvalidArgument(_))) => {
                    refused.push((i, err));
                }
                Err(err) => return Err(err),
            }
        }
        if !refused.is_empty() {
            // Dropping `tx` rolls back what was inserted.
            refused.sort_by_key(|(i, _)| *i);
            return Ok(Err(refused));
        }
        tx.commit().await?;
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use carapace_core::{EntryId, TrustDomain};

    use super::super::EntryFilter;
    use super::*;

    const AGENT: &str = "spiffe://example.org/spire/agent/join_token/abc";

    fn entry(id: &str, path: &str, selectors: &[&str]) -> RegistrationEntry {
        RegistrationEntry {
            id: EntryId::new(id).unwrap(),
            spiffe_id: format!("spiffe://example.org{path}").parse().unwrap(),
            parent_id: AGENT.parse().unwrap(),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            jwt_svid_include_jti: false,
            dns_names: vec![format!("{id}.example.org")],
            hint: String::new(),
            admin: false,
            downstream: false,
            expires_at: None,
            revision: 0,
            created_at: 1_000,
        }
    }

    fn batch(n: usize) -> Vec<RegistrationEntry> {
        (0..n)
            .map(|i| {
                entry(
                    &format!("b{i}"),
                    &format!("/w/{i}"),
                    &["unix:uid:1000", &format!("unix:gid:{i}")],
                )
            })
            .collect()
    }

    fn valid(e: &RegistrationEntry) -> Result<()> {
        let td: TrustDomain = "example.org".parse().unwrap();
        Ok(e.validate(&td)?)
    }

    async fn rows(ds: &Datastore, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&ds.pool)
            .await
            .unwrap()
    }

    /// Rows of every entry table: entries, selectors, DNS names, events.
    async fn counts(ds: &Datastore) -> [i64; 4] {
        [
            rows(ds, "entries").await,
            rows(ds, "entry_selectors").await,
            rows(ds, "entry_dns_names").await,
            rows(ds, "entry_events").await,
        ]
    }

    fn indexes(r: &Refusals) -> Vec<usize> {
        r.iter().map(|(i, _)| *i).collect()
    }

    #[tokio::test]
    async fn a_batch_is_written_whole_with_one_event_per_entry() {
        let ds = Datastore::open_in_memory().await.unwrap();
        let b = batch(1_000);
        ds.create_entries(&b, valid).await.unwrap().unwrap();
        assert_eq!(counts(&ds).await, [1_000, 2_000, 1_000, 1_000]);
        let events: Vec<(String, String)> =
            sqlx::query_as("SELECT entry_id, kind FROM entry_events ORDER BY id")
                .fetch_all(&ds.pool)
                .await
                .unwrap();
        let expected: Vec<(String, String)> = b
            .iter()
            .map(|e| (e.id.to_string(), "create".to_owned()))
            .collect();
        assert_eq!(events, expected);
        let stored = ds.list_entries(&EntryFilter::default()).await.unwrap();
        let mut want = b.clone();
        want.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(stored, want, "stored exactly as given");
    }

    #[tokio::test]
    async fn one_bad_entry_writes_nothing_and_every_refusal_is_named() {
        let ds = Datastore::open_in_memory().await.unwrap();
        let stored = entry("old", "/stored", &["unix:uid:7"]);
        ds.create_entry(&stored).await.unwrap();
        let before = counts(&ds).await;

        let mut b = batch(10);
        // 3: outside the trust domain (the caller's check).
        b[3].spiffe_id = "spiffe://other.org/w".parse().unwrap();
        // 5: similar to the stored entry.
        b[5] = entry("new5", "/stored", &["unix:uid:7"]);
        // 8: the id of a stored entry.
        b[8].id = EntryId::new("old").unwrap();
        let refused = ds.create_entries(&b, valid).await.unwrap().unwrap_err();
        assert_eq!(indexes(&refused), [3, 5, 8]);
        assert!(
            refused[0].1.to_string().contains("other.org"),
            "{}",
            refused[0].1
        );
        assert!(
            matches!(&refused[1].1, Error::AlreadyExists(m) if m.contains("similar entry old")),
            "{}",
            refused[1].1
        );
        assert!(
            matches!(&refused[2].1, Error::AlreadyExists(m) if m.contains("entry old already exists")),
            "{}",
            refused[2].1
        );
        assert_eq!(counts(&ds).await, before, "nothing written");
        assert_eq!(ds.latest_entry_event_id().await.unwrap(), 1);

        // The same batch without the bad entries goes through.
        let good: Vec<_> = b
            .into_iter()
            .enumerate()
            .filter(|(i, _)| ![3, 5, 8].contains(i))
            .map(|(_, e)| e)
            .collect();
        ds.create_entries(&good, valid).await.unwrap().unwrap();
        assert_eq!(counts(&ds).await[0], 1 + 7);
    }

    #[tokio::test]
    async fn duplicates_within_the_batch_are_refused_and_nothing_written() {
        let ds = Datastore::open_in_memory().await.unwrap();
        let mut b = batch(6);
        // 2: same SPIFFE ID, parent and selectors as 0 (selector order differs).
        b[2] = entry("other-id", "/w/0", &["unix:gid:0", "unix:uid:1000"]);
        // 4: same id as 1.
        b[4].id = EntryId::new("b1").unwrap();
        let refused = ds.create_entries(&b, valid).await.unwrap().unwrap_err();
        assert_eq!(indexes(&refused), [2, 4]);
        assert!(
            refused[0].1.to_string().contains("entry 0 of this batch"),
            "{}",
            refused[0].1
        );
        assert!(
            refused[1].1.to_string().contains("entry 1 of this batch"),
            "{}",
            refused[1].1
        );
        assert_eq!(counts(&ds).await, [0, 0, 0, 0]);

        // Same SPIFFE ID and parent with other selectors is not a duplicate.
        let mut b = batch(2);
        b[1] = entry("x", "/w/0", &["unix:uid:1000"]);
        ds.create_entries(&b, valid).await.unwrap().unwrap();
        assert_eq!(counts(&ds).await[0], 2);
    }

    #[tokio::test]
    async fn an_empty_batch_writes_nothing() {
        let ds = Datastore::open_in_memory().await.unwrap();
        ds.create_entries(&[], valid).await.unwrap().unwrap();
        assert_eq!(counts(&ds).await, [0, 0, 0, 0]);
    }
}
