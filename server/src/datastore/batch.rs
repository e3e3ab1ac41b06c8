//! Creating a batch of entries: one write transaction for the whole batch, all or
//! nothing, in a few multi-row statements.
//!
//! Every entry is checked before anything is written: the caller's check (the core
//! validation against the trust domain), duplicates within the batch (the same id, or
//! the same SPIFFE ID, parent ID and selector set as an earlier entry of the batch), and
//! the stored checks of a single create (an entry with the same id, or a similar entry,
//! already stored). The stored checks are bulk queries inside the write transaction:
//! the stored ids among the batch's, and the stored entries (with their selectors) that
//! have one of the batch's SPIFFE IDs, compared in memory. When any entry is refused
//! nothing is written and every refused entry is named with why; otherwise the rows
//! (entries, selectors, DNS names, one `create` event each, in batch order) go in with
//! multi-row `INSERT`s of at most [`INSERT_CHUNK`] bound values, and commit at once.
//!
//! What this file depends on in the rest of the datastore: [`Datastore::begin_write`],
//! [`entries::EventKind`], [`INSERT_CHUNK`], [`is_unique_violation`] and the schema of
//! the four entry tables (the same columns `entries::insert_entry` writes).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use sqlx::QueryBuilder;

use carapace_core::RegistrationEntry;

use super::{Datastore, INSERT_CHUNK, Tx, entries, is_unique_violation, unix_now};
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

/// Bound values per statement: [`INSERT_CHUNK`] rows of three columns, the budget the
/// rest of the datastore uses (well below SQLite's and PostgreSQL's limits).
const BIND_BUDGET: usize = INSERT_CHUNK * 3;

/// A stored entry's id and selector set (type, value).
type StoredSelectors = (String, BTreeSet<(String, String)>);

/// A row of the similar-entry query: id, SPIFFE ID, parent ID, and one selector's type
/// and value (none for an entry without selectors).
type CandidateRow = (String, String, String, Option<String>, Option<String>);

/// The entries of `todo` (positions in `batch`) refused because an entry with their id,
/// or a similar entry, is stored.
async fn refused_by_storage(
    conn: &mut Tx,
    batch: &[RegistrationEntry],
    todo: &[usize],
) -> Result<Refusals> {
    let mut refused = Refusals::new();

    // Ids already stored.
    let mut stored_ids: BTreeSet<String> = BTreeSet::new();
    for chunk in todo.chunks(BIND_BUDGET) {
        let found: Vec<String> = on_tx!(conn, c => {
            let mut qb = QueryBuilder::new("SELECT id FROM entries WHERE id IN (");
            let mut list = qb.separated(", ");
            for &i in chunk {
                if let Some(e) = batch.get(i) {
                    list.push_bind(e.id.as_str());
                }
            }
            qb.push(")");
            qb.build_query_scalar().fetch_all(c).await
        })?;
        stored_ids.extend(found);
    }

    // Stored entries with one of the batch's SPIFFE IDs, with their selectors, grouped
    // by entry id (served by the (spiffe_id, parent_id) index).
    let spiffe_ids: BTreeSet<&str> = todo
        .iter()
        .filter_map(|&i| batch.get(i))
        .map(|e| e.spiffe_id.as_str())
        .collect();
    let spiffe_ids: Vec<&str> = spiffe_ids.into_iter().collect();
    let mut candidates: HashMap<(String, String), Vec<StoredSelectors>> = HashMap::new();
    for chunk in spiffe_ids.chunks(BIND_BUDGET) {
        let rows: Vec<CandidateRow> = on_tx!(conn, c => {
            let mut qb = QueryBuilder::new(
                "SELECT e.id, e.spiffe_id, e.parent_id, s.type, s.value FROM entries e \
                 LEFT JOIN entry_selectors s ON s.entry_id = e.id WHERE e.spiffe_id IN (",
            );
            let mut list = qb.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            qb.push(") ORDER BY e.id");
            qb.build_query_as().fetch_all(c).await
        })?;
        for (id, spiffe_id, parent_id, kind, value) in rows {
            let group = candidates.entry((spiffe_id, parent_id)).or_default();
            if group.last().is_none_or(|(last, _)| *last != id) {
                group.push((id, BTreeSet::new()));
            }
            if let (Some((_, set)), Some(kind), Some(value)) = (group.last_mut(), kind, value) {
                set.insert((kind, value));
            }
        }
    }

    for &i in todo {
        let Some(e) = batch.get(i) else { continue };
        if stored_ids.contains(e.id.as_str()) {
            refused.push((
                i,
                Error::AlreadyExists(format!("entry {} already exists", e.id)),
            ));
            continue;
        }
        let key = (e.spiffe_id.to_string(), e.parent_id.to_string());
        let wanted: BTreeSet<(&str, &str)> =
            e.selectors.iter().map(|s| (s.kind(), s.value())).collect();
        let similar = candidates.get(&key).and_then(|group| {
            group.iter().find(|(_, set)| {
                set.len() == wanted.len()
                    && set
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .eq(wanted.iter().copied())
            })
        });
        if let Some((other, _)) = similar {
            refused.push((
                i,
                Error::AlreadyExists(format!(
                    "similar entry {other} already exists (same SPIFFE ID {}, parent ID {} \
                     and selectors)",
                    e.spiffe_id, e.parent_id
                )),
            ));
        }
    }
    Ok(refused)
}

/// A TTL in whole seconds for its column.
fn ttl_secs(column: &str, id: &str, ttl: Option<Duration>) -> Result<Option<i64>> {
    ttl.map(|d| {
        i64::try_from(d.as_secs()).map_err(|_| {
            Error::InvalidArgument(format!(
                "entry {id}: {column} {} s is too large",
                d.as_secs()
            ))
        })
    })
    .transpose()
}

/// The row of `entries` for `e`: the values `entries::insert_entry` binds.
type EntryValues<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<i64>,
    &'a str,
    bool,
    bool,
    Option<i64>,
    i64,
    i64,
    Option<i64>,
    bool,
    String,
);

fn entry_values(e: &RegistrationEntry) -> Result<EntryValues<'_>> {
    let id = e.id.as_str();
    Ok((
        id,
        e.spiffe_id.as_str(),
        e.parent_id.as_str(),
        ttl_secs("x509_svid_ttl", id, e.x509_svid_ttl)?,
        e.hint.as_str(),
        e.admin,
        e.downstream,
        e.expires_at,
        i64::try_from(e.revision).map_err(|_| {
            Error::InvalidArgument(format!("entry {id}: revision {} is too large", e.revision))
        })?,
        e.created_at,
        ttl_secs("jwt_svid_ttl", id, e.jwt_svid_ttl)?,
        e.jwt_svid_include_jti,
        super::entries::federates_with_to_db(e),
    ))
}

/// Writes every entry of `batch` (checked) with multi-row statements.
async fn insert_all(conn: &mut Tx, batch: &[RegistrationEntry], now: i64) -> Result<()> {
    let rows = batch.iter().map(entry_values).collect::<Result<Vec<_>>>()?;
    for chunk in rows.chunks(BIND_BUDGET / 13) {
        on_tx!(conn, c => {
            let mut qb = QueryBuilder::new(
                "INSERT INTO entries (id, spiffe_id, parent_id, x509_svid_ttl, hint, admin, \
                 downstream, expires_at, revision, created_at, jwt_svid_ttl, \
                 jwt_svid_include_jti, federates_with) ",
            );
            qb.push_values(chunk, |mut row, v| {
                row.push_bind(v.0)
                    .push_bind(v.1)
                    .push_bind(v.2)
                    .push_bind(v.3)
                    .push_bind(v.4)
                    .push_bind(v.5)
                    .push_bind(v.6)
                    .push_bind(v.7)
                    .push_bind(v.8)
                    .push_bind(v.9)
                    .push_bind(v.10)
                    .push_bind(v.11)
                    .push_bind(v.12.clone());
            });
            qb.build().execute(c).await.map(|r| r.rows_affected())
        })
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists(format!("an entry of the batch was stored meanwhile: {e}"))
            } else {
                e.into()
            }
        })?;
    }

    let selectors: Vec<(&str, &str, &str)> = batch
        .iter()
        .flat_map(|e| {
            e.selectors
                .iter()
                .map(move |s| (e.id.as_str(), s.kind(), s.value()))
        })
        .collect();
    for chunk in selectors.chunks(BIND_BUDGET / 3) {
        on_tx!(conn, c => {
            let mut qb = QueryBuilder::new("INSERT INTO entry_selectors (entry_id, type, value) ");
            qb.push_values(chunk, |mut row, (id, kind, value)| {
                row.push_bind(*id).push_bind(*kind).push_bind(*value);
            });
            qb.build().execute(c).await.map(|r| r.rows_affected())
        })?;
    }

    let names: Vec<(&str, i64, &str)> = batch
        .iter()
        .flat_map(|e| {
            e.dns_names.iter().enumerate().map(move |(pos, name)| {
                (
                    e.id.as_str(),
                    i64::try_from(pos).unwrap_or(i64::MAX),
                    name.as_str(),
                )
            })
        })
        .collect();
    for chunk in names.chunks(BIND_BUDGET / 3) {
        on_tx!(conn, c => {
            let mut qb =
                QueryBuilder::new("INSERT INTO entry_dns_names (entry_id, position, name) ");
            qb.push_values(chunk, |mut row, (id, pos, name)| {
                row.push_bind(*id).push_bind(*pos).push_bind(*name);
            });
            qb.build().execute(c).await.map(|r| r.rows_affected())
        })?;
    }

    // One `create` event per entry, in batch order (ids grow in VALUES order).
    let kind = entries::EventKind::Create.as_str();
    for chunk in batch.chunks(BIND_BUDGET / 3) {
        on_tx!(conn, c => {
            let mut qb = QueryBuilder::new("INSERT INTO entry_events (entry_id, kind, at) ");
            qb.push_values(chunk, |mut row, e| {
                row.push_bind(e.id.as_str()).push_bind(kind).push_bind(now);
            });
            qb.build().execute(c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
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
    /// as for [`Datastore::create_entry`]), or when a TTL or its revision does not fit
    /// a column ([`Error::InvalidArgument`]). Any other failure (the database's) is an
    /// `Err`, and nothing is written either.
    pub async fn create_entries(
        &self,
        batch: &[RegistrationEntry],
        check: impl Fn(&RegistrationEntry) -> Result<()>,
    ) -> Result<std::result::Result<(), Refusals>> {
        let mut refused = refused_before_storage(batch, check);
        for (i, e) in batch.iter().enumerate() {
            if let Err(err) = entry_values(e) {
                if !refused.iter().any(|(j, _)| *j == i) {
                    refused.push((i, err));
                }
            }
        }
        let skip: BTreeSet<usize> = refused.iter().map(|(i, _)| *i).collect();
        let todo: Vec<usize> = (0..batch.len()).filter(|i| !skip.contains(i)).collect();
        let now = unix_now();
        let mut tx = self.begin_write().await?;
        refused.extend(refused_by_storage(&mut tx, batch, &todo).await?);
        if !refused.is_empty() {
            // Nothing was written; dropping `tx` ends the transaction.
            refused.sort_by_key(|(i, _)| *i);
            return Ok(Err(refused));
        }
        insert_all(&mut tx, batch, now).await?;
        tx.commit().await?;
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use carapace_core::{EntryId, TrustDomain};

    use super::super::EntryFilter;
    use super::super::testing::on_both_engines;
    use super::*;

    on_both_engines!(
        a_batch_is_written_whole_with_one_event_per_entry,
        one_bad_entry_writes_nothing_and_every_refusal_is_named,
        duplicates_within_the_batch_are_refused_and_nothing_written,
        only_the_same_selector_set_under_the_same_parent_is_similar,
        a_value_that_does_not_fit_its_column_refuses_the_batch,
        an_empty_batch_writes_nothing,
    );

    const AGENT: &str = "spiffe://example.org/spire/agent/join_token/abc";

    fn entry(id: &str, path: &str, selectors: &[&str]) -> RegistrationEntry {
        RegistrationEntry {
            federates_with: vec![TrustDomain::new("partner.org").unwrap()],
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
        let sql = format!("SELECT COUNT(*) FROM {table}");
        on_pool!(&ds.pool, p => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .fetch_one(p)
                .await
        })
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

    async fn a_batch_is_written_whole_with_one_event_per_entry(ds: Datastore) {
        let b = batch(1_000);
        ds.create_entries(&b, valid).await.unwrap().unwrap();
        assert_eq!(counts(&ds).await, [1_000, 2_000, 1_000, 1_000]);
        let events: Vec<(String, String)> = on_pool!(&ds.pool, p => {
            sqlx::query_as("SELECT entry_id, kind FROM entry_events ORDER BY id")
                .fetch_all(p)
                .await
        })
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

    async fn one_bad_entry_writes_nothing_and_every_refusal_is_named(ds: Datastore) {
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
        assert_eq!(ds.change_cursor().await.unwrap().entry_event, 1);

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

    async fn duplicates_within_the_batch_are_refused_and_nothing_written(ds: Datastore) {
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

    async fn only_the_same_selector_set_under_the_same_parent_is_similar(ds: Datastore) {
        ds.create_entry(&entry("old", "/s", &["unix:uid:1", "unix:gid:1"]))
            .await
            .unwrap();
        let mut other_parent = entry("p", "/s", &["unix:uid:1", "unix:gid:1"]);
        other_parent.parent_id = "spiffe://example.org/spire/agent/join_token/other"
            .parse()
            .unwrap();
        let b = vec![
            entry("sub", "/s", &["unix:uid:1"]),
            entry("super", "/s", &["unix:uid:1", "unix:gid:1", "unix:user:x"]),
            other_parent,
        ];
        ds.create_entries(&b, valid).await.unwrap().unwrap();
        assert_eq!(counts(&ds).await[0], 4);
    }

    async fn a_value_that_does_not_fit_its_column_refuses_the_batch(ds: Datastore) {
        let mut b = batch(3);
        b[1].x509_svid_ttl = Some(Duration::from_secs(u64::MAX));
        b[2].revision = u64::MAX;
        let refused = ds
            .create_entries(&b, |_| Ok(()))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(indexes(&refused), [1, 2]);
        assert!(matches!(&refused[0].1, Error::InvalidArgument(m) if m.contains("x509_svid_ttl")));
        assert!(matches!(&refused[1].1, Error::InvalidArgument(m) if m.contains("revision")));
        assert_eq!(counts(&ds).await, [0, 0, 0, 0]);
    }

    async fn an_empty_batch_writes_nothing(ds: Datastore) {
        ds.create_entries(&[], valid).await.unwrap().unwrap();
        assert_eq!(counts(&ds).await, [0, 0, 0, 0]);
    }
}
