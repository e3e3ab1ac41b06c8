//! Registration entries: CRUD, filtered listing with bulk loading of selectors and DNS
//! names, the similar-entry rule, expiry pruning and the entry change log.
//!
//! Every write runs in one write transaction ([`Datastore::begin_write`]) that covers the entry row, its
//! selectors, its DNS names and its event row. Reads load the matching entry rows, then
//! the selectors and the DNS names of all of them with one query each (the same filter
//! as a subquery), and group them in memory: three queries whatever the number of
//! entries.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use sqlx::{Connection as _, Database, QueryBuilder};

use carapace_core::{EntryId, RegistrationEntry, Selector, SpiffeId, TrustDomain};

use super::{
    Datastore, Engine, EntryFilter, INSERT_CHUNK, Tx, corrupt, is_unique_violation, parse_selector,
    parse_spiffe_id, push_in, unix_now,
};
use crate::{Error, Result};

/// The columns of an entry row, in [`EntryRow`] order, for a query on `entries e`.
const ENTRY_COLUMNS: &str = "e.id, e.spiffe_id, e.parent_id, e.x509_svid_ttl, e.hint, \
     e.admin, e.downstream, e.expires_at, e.revision, e.created_at, e.jwt_svid_ttl, \
     e.jwt_svid_include_jti, e.federates_with";

/// One row of `entries`, as stored (and, in the bulk load, as a JSON array of its
/// columns in this order).
#[derive(sqlx::FromRow, serde::Deserialize)]
struct EntryRow {
    id: String,
    spiffe_id: String,
    parent_id: String,
    x509_svid_ttl: Option<i64>,
    hint: String,
    admin: bool,
    downstream: bool,
    expires_at: Option<i64>,
    revision: i64,
    created_at: i64,
    jwt_svid_ttl: Option<i64>,
    jwt_svid_include_jti: bool,
    /// Trust domain names separated by single spaces, in the entry's order.
    federates_with: String,
}

/// The kind of an `entry_events` row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EventKind {
    Create,
    Update,
    Delete,
}

impl EventKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            EventKind::Create => "create",
            EventKind::Update => "update",
            EventKind::Delete => "delete",
        }
    }
}

impl Datastore {
    /// Stores a new entry with its selectors and DNS names, and logs a `create` event.
    ///
    /// Fails with [`Error::AlreadyExists`] if an entry with the same id exists, or if
    /// another entry has the same SPIFFE ID, parent ID and selector set (the message
    /// names that entry). The entry is stored as given (revision and `created_at`
    /// included); it is not validated here, see [`RegistrationEntry::validate`].
    pub async fn create_entry(&self, entry: &RegistrationEntry) -> Result<()> {
        let mut tx = self.begin_write().await?;
        insert_entry(&mut tx, entry, unix_now()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces every field of the entry with `entry.id`, selectors and DNS names
    /// included, and logs an `update` event. The stored revision is bumped by one (the
    /// caller's `revision` is ignored) and `created_at` is kept (the caller's is ignored).
    /// Returns the entry as now stored.
    ///
    /// Fails with [`Error::NotFound`] if there is no such entry, and with
    /// [`Error::AlreadyExists`] if another entry has the new SPIFFE ID, parent ID and
    /// selector set.
    pub async fn update_entry(&self, entry: &RegistrationEntry) -> Result<RegistrationEntry> {
        let id = entry.id.as_str();
        let mut tx = self.begin_write().await?;
        if !entry_exists(&mut tx, id).await? {
            return Err(not_found(&entry.id));
        }
        check_similar(&mut tx, entry).await?;
        let x509_svid_ttl = ttl_to_db("x509_svid_ttl", entry.x509_svid_ttl)?;
        let jwt_svid_ttl = ttl_to_db("jwt_svid_ttl", entry.jwt_svid_ttl)?;
        on_tx!(&mut tx, c => sqlx::query(
            "UPDATE entries SET spiffe_id = $2, parent_id = $3, x509_svid_ttl = $4, hint = $5, \
             admin = $6, downstream = $7, expires_at = $8, jwt_svid_ttl = $9, \
             jwt_svid_include_jti = $10, federates_with = $11, revision = revision + 1 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(entry.spiffe_id.as_str())
        .bind(entry.parent_id.as_str())
        .bind(x509_svid_ttl)
        .bind(entry.hint.as_str())
        .bind(entry.admin)
        .bind(entry.downstream)
        .bind(entry.expires_at)
        .bind(jwt_svid_ttl)
        .bind(entry.jwt_svid_include_jti)
        .bind(federates_with_to_db(entry))
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected()))?;
        on_tx!(&mut tx, c => {
            sqlx::query("DELETE FROM entry_selectors WHERE entry_id = $1")
                .bind(id)
                .execute(&mut *c)
                .await
                .map(|r| r.rows_affected())?;
            sqlx::query("DELETE FROM entry_dns_names WHERE entry_id = $1")
                .bind(id)
                .execute(&mut *c)
                .await
                .map(|r| r.rows_affected())
        })?;
        insert_children(&mut tx, entry).await?;
        insert_events(&mut tx, &[id], EventKind::Update, unix_now()).await?;
        let stored = load_one(&mut tx, &entry.id).await?.ok_or_else(|| {
            Error::Datastore(format!("entry {} vanished while updated", entry.id))
        })?;
        tx.commit().await?;
        Ok(stored)
    }

    /// Deletes an entry (its selectors and DNS names cascade) and logs a `delete` event.
    /// Returns the entry as it was; [`Error::NotFound`] if there is no such entry.
    pub async fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry> {
        let mut tx = self.begin_write().await?;
        let entry = load_one(&mut tx, id).await?.ok_or_else(|| not_found(id))?;
        on_tx!(&mut tx, c => sqlx::query("DELETE FROM entries WHERE id = $1")
            .bind(id.as_str())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        insert_events(&mut tx, &[id.as_str()], EventKind::Delete, unix_now()).await?;
        tx.commit().await?;
        Ok(entry)
    }

    /// The entry with this id, if any.
    pub async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>> {
        let mut tx = self.begin_read().await?;
        let entry = load_one(&mut tx, id).await?;
        tx.commit().await?;
        Ok(entry)
    }

    /// The entries matching `filter`, sorted by id, with their selectors and DNS names
    /// (every entry with `EntryFilter::default()`: three bulk queries in one snapshot).
    pub async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>> {
        let mut tx = self.begin_read().await?;
        let entries = load_entries(&mut tx, filter).await?;
        tx.commit().await?;
        Ok(entries)
    }

    /// How many entries match `filter`.
    pub async fn count_entries(&self, filter: &EntryFilter) -> Result<u64> {
        let n: i64 = on_pool!(&self.pool, p => {
            let mut qb = QueryBuilder::new("SELECT COUNT(*) FROM entries e");
            push_filter(&mut qb, filter);
            qb.build_query_scalar().fetch_one(p).await
        })?;
        u64::try_from(n).map_err(|_| Error::Datastore(format!("negative entry count {n}")))
    }

    /// Hands every entry to `each` as it is read, in no particular order, for loading the
    /// in-memory entry cache; returns how many entries there were. A row that does not
    /// parse ends the load with [`Error::Datastore`] naming it. One read transaction (one
    /// snapshot); each entry comes as JSON ([`BulkEntry`]) with its selectors and DNS
    /// names.
    ///
    /// On SQLite the entries come in chunks of [`BULK_CHUNK`], each one row holding a
    /// JSON array: per entry, no row to copy and hand over from sqlx's worker thread, no
    /// wake-up. The next chunk is read while `each` indexes the last. On PostgreSQL one
    /// query joins the three tables (hash joins, whatever the statistics) and streams
    /// one row per entry, decoded as it arrives while the database reads on.
    pub async fn for_each_entry(&self, mut each: impl FnMut(RegistrationEntry)) -> Result<usize> {
        let mut parents = ParentIds::default();
        let mut n = 0;
        let mut take = |row: BulkEntry| -> Result<()> {
            each(entry_from_bulk(row, &mut parents)?);
            n += 1;
            Ok(())
        };
        match &self.pool {
            Engine::Sqlite(pool) if self.file_backed => {
                // A connection of its own, reading the database file through a memory
                // map: the index lookups of the load read pages without a system call
                // each. Closed afterwards, so no pooled connection ever maps the file (an
                // I/O error on a mapped page is a signal, not an error code).
                let options = (*pool.connect_options())
                    .clone()
                    .pragma("mmap_size", BULK_LOAD_MMAP_BYTES.to_string());
                let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
                let mut tx = conn.begin().await?;
                sqlite_chunks(&mut tx, &mut take).await?;
                tx.commit().await?;
                conn.close().await?;
            }
            _ => {
                let mut tx = self.begin_read().await?;
                match &mut tx {
                    Engine::Sqlite(t) => sqlite_chunks(t, &mut take).await?,
                    Engine::Postgres(t) => {
                        use futures::TryStreamExt as _;
                        let mut rows =
                            sqlx::query_scalar::<_, String>(POSTGRES_BULK_LOAD).fetch(&mut **t);
                        while let Some(json) = rows.try_next().await? {
                            take(serde_json::from_str(&json).map_err(|e| {
                                Error::Datastore(format!("corrupt row of entries (bulk load): {e}"))
                            })?)?;
                        }
                    }
                }
                tx.commit().await?;
            }
        }
        Ok(n)
    }

    /// Deletes every entry whose `expires_at` is at or before `now`, logging a `delete`
    /// event for each, in one transaction. Returns the ids deleted, sorted.
    pub async fn prune_expired_entries(&self, now: i64) -> Result<Vec<EntryId>> {
        let mut tx = self.begin_write().await?;
        let mut raw: Vec<String> = on_tx!(&mut tx, c => {
            sqlx::query_scalar("DELETE FROM entries WHERE expires_at <= $1 RETURNING id")
                .bind(now)
                .fetch_all(c)
                .await
        })?;
        raw.sort();
        let ids = raw
            .iter()
            .map(|id| EntryId::new(id).map_err(|e| corrupt(format_args!("entries id={id:?}"), e)))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&str> = raw.iter().map(String::as_str).collect();
        insert_events(&mut tx, &refs, EventKind::Delete, now).await?;
        tx.commit().await?;
        Ok(ids)
    }
}

fn not_found(id: &EntryId) -> Error {
    Error::NotFound(format!("entry {id} not found"))
}

/// Inserts a new entry with its children and its `create` event, inside the caller's
/// transaction. Shared by [`Datastore::create_entry`] and join-token creation.
pub(super) async fn insert_entry(conn: &mut Tx, entry: &RegistrationEntry, now: i64) -> Result<()> {
    let id = entry.id.as_str();
    if entry_exists(conn, id).await? {
        return Err(already_exists(&entry.id));
    }
    check_similar(conn, entry).await?;
    let x509_svid_ttl = ttl_to_db("x509_svid_ttl", entry.x509_svid_ttl)?;
    let jwt_svid_ttl = ttl_to_db("jwt_svid_ttl", entry.jwt_svid_ttl)?;
    let revision = i64::try_from(entry.revision).map_err(|_| {
        Error::InvalidArgument(format!(
            "entry {id}: revision {} is too large",
            entry.revision
        ))
    })?;
    on_tx!(conn, c => sqlx::query(
        "INSERT INTO entries (id, spiffe_id, parent_id, x509_svid_ttl, hint, admin, \
         downstream, expires_at, revision, created_at, jwt_svid_ttl, jwt_svid_include_jti, \
         federates_with) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(id)
    .bind(entry.spiffe_id.as_str())
    .bind(entry.parent_id.as_str())
    .bind(x509_svid_ttl)
    .bind(entry.hint.as_str())
    .bind(entry.admin)
    .bind(entry.downstream)
    .bind(entry.expires_at)
    .bind(revision)
    .bind(entry.created_at)
    .bind(jwt_svid_ttl)
    .bind(entry.jwt_svid_include_jti)
    .bind(federates_with_to_db(entry))
    .execute(c)
    .await
    .map(|r| r.rows_affected()))
    .map_err(|e| {
        if is_unique_violation(&e) {
            already_exists(&entry.id)
        } else {
            e.into()
        }
    })?;
    insert_children(conn, entry).await?;
    insert_events(conn, &[id], EventKind::Create, now).await?;
    Ok(())
}

/// Whether an entry with this id is stored.
async fn entry_exists(conn: &mut Tx, id: &str) -> Result<bool> {
    let found: Option<String> = on_tx!(conn, c => {
        sqlx::query_scalar("SELECT id FROM entries WHERE id = $1")
            .bind(id)
            .fetch_optional(c)
            .await
    })?;
    Ok(found.is_some())
}

fn already_exists(id: &EntryId) -> Error {
    Error::AlreadyExists(format!("entry {id} already exists"))
}

/// The similar-entry rule (as SPIRE's): no two entries may have the same SPIFFE ID,
/// parent ID and selector set. Fails with [`Error::AlreadyExists`] naming the first
/// other entry (by id) that is similar to `entry`; `entry`'s own row is not compared.
async fn check_similar(conn: &mut Tx, entry: &RegistrationEntry) -> Result<()> {
    let rows: Vec<(String, Option<String>, Option<String>)> = on_tx!(conn, c => sqlx::query_as(
        "SELECT e.id, s.type, s.value FROM entries e \
         LEFT JOIN entry_selectors s ON s.entry_id = e.id \
         WHERE e.spiffe_id = $1 AND e.parent_id = $2 AND e.id <> $3 \
         ORDER BY e.id",
    )
    .bind(entry.spiffe_id.as_str())
    .bind(entry.parent_id.as_str())
    .bind(entry.id.as_str())
    .fetch_all(c)
    .await)?;

    // Group the candidates' selectors by entry id, in id order.
    let mut candidates: Vec<(String, BTreeSet<(String, String)>)> = Vec::new();
    for (id, kind, value) in rows {
        if candidates.last().is_none_or(|(last, _)| *last != id) {
            candidates.push((id, BTreeSet::new()));
        }
        if let (Some((_, set)), Some(kind), Some(value)) = (candidates.last_mut(), kind, value) {
            set.insert((kind, value));
        }
    }
    let wanted: BTreeSet<(&str, &str)> = entry
        .selectors
        .iter()
        .map(|s| (s.kind(), s.value()))
        .collect();
    for (other, set) in &candidates {
        if set.len() == wanted.len()
            && set
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .eq(wanted.iter().copied())
        {
            return Err(Error::AlreadyExists(format!(
                "similar entry {other} already exists (same SPIFFE ID {}, parent ID {} and \
                 selectors)",
                entry.spiffe_id, entry.parent_id
            )));
        }
    }
    Ok(())
}

/// Inserts the selectors and DNS names of `entry` (whose row exists, whose children do
/// not).
async fn insert_children(conn: &mut Tx, entry: &RegistrationEntry) -> Result<()> {
    let id = entry.id.as_str();
    let selectors: Vec<&Selector> = entry.selectors.iter().collect();
    for chunk in selectors.chunks(INSERT_CHUNK) {
        on_tx!(conn, c => {
            let mut qb = QueryBuilder::new("INSERT INTO entry_selectors (entry_id, type, value) ");
            qb.push_values(chunk, |mut row, s| {
                row.push_bind(id).push_bind(s.kind()).push_bind(s.value());
            });
            qb.build().execute(c).await.map(|r| r.rows_affected())
        })?;
    }
    let names: Vec<(i64, &str)> = entry
        .dns_names
        .iter()
        .enumerate()
        .map(|(i, n)| (i64::try_from(i).unwrap_or(i64::MAX), n.as_str()))
        .collect();
    for chunk in names.chunks(INSERT_CHUNK) {
        on_tx!(conn, c => {
            let mut qb =
                QueryBuilder::new("INSERT INTO entry_dns_names (entry_id, position, name) ");
            qb.push_values(chunk, |mut row, (pos, name)| {
                row.push_bind(id).push_bind(*pos).push_bind(*name);
            });
            qb.build().execute(c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

/// Logs one event of `kind` for each of `ids`.
async fn insert_events(conn: &mut Tx, ids: &[&str], kind: EventKind, at: i64) -> Result<()> {
    for chunk in ids.chunks(INSERT_CHUNK) {
        on_tx!(conn, c => {
            let mut qb = QueryBuilder::new("INSERT INTO entry_events (entry_id, kind, at) ");
            qb.push_values(chunk, |mut row, id| {
                row.push_bind(*id).push_bind(kind.as_str()).push_bind(at);
            });
            qb.build().execute(c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

/// Appends the `WHERE` clause of `filter` to a query on `entries e`.
fn push_filter<DB: Database>(qb: &mut QueryBuilder<DB>, filter: &EntryFilter)
where
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut sep = " WHERE ";
    if let Some(id) = &filter.id {
        qb.push(sep)
            .push("e.id = ")
            .push_bind(id.as_str().to_owned());
        sep = " AND ";
    }
    if let Some(spiffe_id) = &filter.spiffe_id {
        qb.push(sep)
            .push("e.spiffe_id = ")
            .push_bind(spiffe_id.as_str().to_owned());
        sep = " AND ";
    }
    if let Some(parent_id) = &filter.parent_id {
        qb.push(sep)
            .push("e.parent_id = ")
            .push_bind(parent_id.as_str().to_owned());
        sep = " AND ";
    }
    // One indexed membership test per distinct selector: the entry has all of them.
    let selectors: BTreeSet<&Selector> = filter.selectors.iter().collect();
    for s in selectors {
        qb.push(sep)
            .push("e.id IN (SELECT entry_id FROM entry_selectors WHERE type = ")
            .push_bind(s.kind().to_owned())
            .push(" AND value = ")
            .push_bind(s.value().to_owned())
            .push(")");
        sep = " AND ";
    }
}

/// Loads one entry with its children.
async fn load_one(conn: &mut Tx, id: &EntryId) -> Result<Option<RegistrationEntry>> {
    let filter = EntryFilter {
        id: Some(id.clone()),
        ..EntryFilter::default()
    };
    Ok(load_entries(conn, &filter).await?.into_iter().next())
}

/// Loads the entries matching `filter`, sorted by id, with their children: one query for
/// the entries, one for all their selectors, one for all their DNS names.
async fn load_entries(conn: &mut Tx, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>> {
    let rows: Vec<EntryRow> = on_tx!(conn, c => {
        let mut qb = QueryBuilder::new(format!("SELECT {ENTRY_COLUMNS} FROM entries e"));
        push_filter(&mut qb, filter);
        qb.push(" ORDER BY e.id");
        qb.build_query_as().fetch_all(c).await
    })?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }

    let selector_rows: Vec<(String, String, String)> = on_tx!(conn, c => {
        let mut qb = QueryBuilder::new("SELECT s.entry_id, s.type, s.value FROM entry_selectors s");
        push_subquery(&mut qb, "s.entry_id", filter);
        qb.push(" ORDER BY s.entry_id, s.type, s.value");
        qb.build_query_as().fetch_all(c).await
    })?;
    let dns_rows: Vec<(String, String)> = on_tx!(conn, c => {
        let mut qb = QueryBuilder::new("SELECT d.entry_id, d.name FROM entry_dns_names d");
        push_subquery(&mut qb, "d.entry_id", filter);
        qb.push(" ORDER BY d.entry_id, d.position");
        qb.build_query_as().fetch_all(c).await
    })?;
    assemble(rows, selector_rows, dns_rows)
}

/// The entries with these ids that exist, with their children, in chunks of
/// [`super::IN_CHUNK`] ids: three queries per chunk.
pub(super) async fn load_entries_by_id(
    conn: &mut Tx,
    ids: &[EntryId],
) -> Result<Vec<RegistrationEntry>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(super::IN_CHUNK) {
        let keys = || chunk.iter().map(|i| i.as_str().to_owned());
        let rows: Vec<EntryRow> = on_tx!(conn, c => {
            let mut qb = QueryBuilder::new(format!("SELECT {ENTRY_COLUMNS} FROM entries e"));
            push_in(&mut qb, "e.id", keys());
            qb.build_query_as().fetch_all(c).await
        })?;
        let selector_rows: Vec<(String, String, String)> = on_tx!(conn, c => {
            let mut qb = QueryBuilder::new("SELECT s.entry_id, s.type, s.value FROM entry_selectors s");
            push_in(&mut qb, "s.entry_id", keys());
            qb.push(" ORDER BY s.entry_id, s.type, s.value");
            qb.build_query_as().fetch_all(c).await
        })?;
        let dns_rows: Vec<(String, String)> = on_tx!(conn, c => {
            let mut qb = QueryBuilder::new("SELECT d.entry_id, d.name FROM entry_dns_names d");
            push_in(&mut qb, "d.entry_id", keys());
            qb.push(" ORDER BY d.entry_id, d.position");
            qb.build_query_as().fetch_all(c).await
        })?;
        out.extend(assemble(rows, selector_rows, dns_rows)?);
    }
    Ok(out)
}

/// Entry rows with their selector and DNS-name rows (each sorted by entry id, then
/// their order), as entries.
fn assemble(
    rows: Vec<EntryRow>,
    selector_rows: Vec<(String, String, String)>,
    dns_rows: Vec<(String, String)>,
) -> Result<Vec<RegistrationEntry>> {
    let mut selectors: HashMap<String, Vec<Selector>> = HashMap::new();
    for (entry_id, kind, value) in selector_rows {
        let s = parse_selector(
            format_args!("entry_selectors entry_id={entry_id:?}"),
            &kind,
            &value,
        )?;
        selectors.entry(entry_id).or_default().push(s);
    }
    let mut dns_names: HashMap<String, Vec<String>> = HashMap::new();
    for (entry_id, name) in dns_rows {
        dns_names.entry(entry_id).or_default().push(name);
    }
    rows.into_iter()
        .map(|row| {
            let s = selectors.remove(&row.id).unwrap_or_default();
            let d = dns_names.remove(&row.id).unwrap_or_default();
            entry_from_row(row, s, d)
        })
        .collect()
}

/// Restricts a query on a child table to the entries matching `filter` (nothing to add
/// when the filter is empty).
fn push_subquery<DB: Database>(qb: &mut QueryBuilder<DB>, column: &str, filter: &EntryFilter)
where
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    if !filter.is_empty() {
        qb.push(" WHERE ")
            .push(column)
            .push(" IN (SELECT e.id FROM entries e");
        push_filter(qb, filter);
        qb.push(")");
    }
}

/// Entries per chunk of the bulk load ([`Datastore::for_each_entry`]).
const BULK_CHUNK: i64 = 2_000;

/// One chunk of the bulk load on SQLite: the last rowid of the chunk (NULL once past the
/// end) and a JSON array of [`BulkEntry`]s, the [`BULK_CHUNK`] (`$2`) entries after rowid
/// `$1` in storage order. `json()` keeps the aggregates JSON (not strings) inside the
/// outer array; booleans are stored as integers.
const SQLITE_BULK_CHUNK: &str = "SELECT max(c.rid), json_group_array(json_array(json_array(\
     c.id, c.spiffe_id, c.parent_id, c.x509_svid_ttl, c.hint, \
     CASE WHEN c.admin THEN json('true') ELSE json('false') END, \
     CASE WHEN c.downstream THEN json('true') ELSE json('false') END, \
     c.expires_at, c.revision, c.created_at, c.jwt_svid_ttl, \
     CASE WHEN c.jwt_svid_include_jti THEN json('true') ELSE json('false') END, \
     c.federates_with), \
     json(c.sels), json(c.dns))) \
     FROM (SELECT e.rowid AS rid, e.id, e.spiffe_id, e.parent_id, e.x509_svid_ttl, e.hint, \
           e.admin, e.downstream, e.expires_at, e.revision, e.created_at, e.jwt_svid_ttl, \
           e.jwt_svid_include_jti, e.federates_with, \
           (SELECT json_group_array(json_array(s.type, s.value)) FROM entry_selectors s \
            WHERE s.entry_id = e.id) AS sels, \
           (SELECT json_group_array(d.name ORDER BY d.position) FROM entry_dns_names d \
            WHERE d.entry_id = e.id) AS dns \
           FROM entries e WHERE e.rowid > $1 ORDER BY e.rowid LIMIT $2) c";

/// The bulk load on PostgreSQL: one row per entry, a JSON [`BulkEntry`]. The selectors
/// and DNS names are aggregated per entry and joined, not looked up entry by entry.
const POSTGRES_BULK_LOAD: &str = "SELECT json_build_array(json_build_array(e.id, \
     e.spiffe_id, e.parent_id, e.x509_svid_ttl, e.hint, e.admin, e.downstream, \
     e.expires_at, e.revision, e.created_at, e.jwt_svid_ttl, e.jwt_svid_include_jti, \
     e.federates_with), \
     COALESCE(s.sels, '[]'::json), COALESCE(d.dns, '[]'::json))::text \
     FROM entries e \
     LEFT JOIN (SELECT entry_id, json_agg(json_build_array(type, value)) AS sels \
                FROM entry_selectors GROUP BY entry_id) s ON s.entry_id = e.id \
     LEFT JOIN (SELECT entry_id, json_agg(name ORDER BY position) AS dns \
                FROM entry_dns_names GROUP BY entry_id) d ON d.entry_id = e.id";

/// Reads the SQLite bulk-load chunks on `conn` ([`SQLITE_BULK_CHUNK`]) and hands each
/// entry to `take`, reading the next chunk while the last is taken.
async fn sqlite_chunks(
    conn: &mut sqlx::SqliteConnection,
    take: &mut impl FnMut(BulkEntry) -> Result<()>,
) -> Result<()> {
    let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::channel::<String>(2);
    let read = async move {
        let mut after = i64::MIN;
        loop {
            let (last, json): (Option<i64>, String) = sqlx::query_as(SQLITE_BULK_CHUNK)
                .bind(after)
                .bind(BULK_CHUNK)
                .fetch_one(&mut *conn)
                .await?;
            let Some(last) = last else { break };
            after = last;
            if chunk_tx.send(json).await.is_err() {
                break; // taking failed: its error is the one to report
            }
        }
        Ok::<_, Error>(())
    };
    // Moves the receiver in: when taking fails, it is dropped and reading stops.
    let taken = async move {
        while let Some(json) = chunk_rx.recv().await {
            let rows: Vec<BulkEntry> = serde_json::from_str(&json).map_err(|e| {
                Error::Datastore(format!("corrupt rows of entries (bulk load): {e}"))
            })?;
            for row in rows {
                take(row)?;
            }
        }
        Ok::<_, Error>(())
    };
    let (read, taken) = tokio::join!(read, taken);
    taken?;
    read
}

/// How much of the database file the bulk load's connection maps (SQLite; the part
/// beyond is read as usual).
const BULK_LOAD_MMAP_BYTES: u64 = 1 << 31;

/// One entry of the bulk load: its `entries` row (a JSON array of the columns of
/// [`ENTRY_COLUMNS`], in order), its selectors as `[type, value]` pairs, and its DNS
/// names in their order.
#[derive(serde::Deserialize)]
struct BulkEntry(EntryRow, Vec<(String, String)>, Vec<String>);

/// Parent IDs already parsed during a bulk load: entries share a few parents (an agent
/// has many), so each distinct one is parsed once.
#[derive(Default)]
struct ParentIds(HashMap<String, SpiffeId>);

impl ParentIds {
    fn parse(&mut self, at: EntryAt<'_>, raw: &str) -> Result<SpiffeId> {
        if let Some(id) = self.0.get(raw) {
            return Ok(id.clone());
        }
        let id = parse_spiffe_id(at, raw)?;
        self.0.insert(raw.to_owned(), id.clone());
        Ok(id)
    }
}

/// A bulk-load entry as an entry, every field re-parsed as [`entry_from_row`] does.
fn entry_from_bulk(
    BulkEntry(row, pairs, dns_names): BulkEntry,
    parents: &mut ParentIds,
) -> Result<RegistrationEntry> {
    let selectors = pairs
        .iter()
        .map(|(kind, value)| {
            parse_selector(
                format_args!("entry_selectors entry_id={:?}", row.id),
                kind,
                value,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let parent = parents.parse(EntryAt(&row.id), &row.parent_id)?;
    entry_from_parsed_row(row, parent, selectors, dns_names)
}

/// Names an `entries` row in an error, formatted only when an error is.
#[derive(Clone, Copy)]
struct EntryAt<'a>(&'a str);

impl std::fmt::Display for EntryAt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entries id={:?}", self.0)
    }
}

/// `federates_with` as stored: trust domain names separated by single spaces (a name
/// has none).
pub(super) fn federates_with_to_db(entry: &RegistrationEntry) -> String {
    let names: Vec<&str> = entry.federates_with.iter().map(|td| td.name()).collect();
    names.join(" ")
}

/// Converts a stored row back into an entry, re-parsing every field.
fn entry_from_row(
    row: EntryRow,
    selectors: Vec<Selector>,
    dns_names: Vec<String>,
) -> Result<RegistrationEntry> {
    let parent = parse_spiffe_id(EntryAt(&row.id), &row.parent_id)?;
    entry_from_parsed_row(row, parent, selectors, dns_names)
}

/// [`entry_from_row`] with the parent ID already parsed.
fn entry_from_parsed_row(
    row: EntryRow,
    parent_id: SpiffeId,
    selectors: Vec<Selector>,
    dns_names: Vec<String>,
) -> Result<RegistrationEntry> {
    let at = EntryAt(&row.id);
    let id = EntryId::new(&row.id).map_err(|e| corrupt(at, e))?;
    let ttl_from_db = |column: &str, v: Option<i64>| -> Result<Option<Duration>> {
        v.map(|secs| {
            u64::try_from(secs)
                .map(Duration::from_secs)
                .map_err(|_| corrupt(at, format!("{column} {secs} < 0")))
        })
        .transpose()
    };
    let x509_svid_ttl = ttl_from_db("x509_svid_ttl", row.x509_svid_ttl)?;
    let jwt_svid_ttl = ttl_from_db("jwt_svid_ttl", row.jwt_svid_ttl)?;
    let federates_with = row
        .federates_with
        .split_ascii_whitespace()
        .map(|name| TrustDomain::new(name).map_err(|e| corrupt(at, format!("federates_with: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(RegistrationEntry {
        federates_with,
        spiffe_id: parse_spiffe_id(at, &row.spiffe_id)?,
        parent_id,
        selectors: selectors.into_iter().collect(),
        x509_svid_ttl,
        jwt_svid_ttl,
        jwt_svid_include_jti: row.jwt_svid_include_jti,
        dns_names,
        hint: row.hint,
        admin: row.admin,
        downstream: row.downstream,
        expires_at: row.expires_at,
        revision: u64::try_from(row.revision)
            .map_err(|_| corrupt(at, format!("revision {} < 0", row.revision)))?,
        created_at: row.created_at,
        id,
    })
}

/// The TTL of `column` in whole seconds (sub-second parts are dropped).
fn ttl_to_db(column: &str, ttl: Option<Duration>) -> Result<Option<i64>> {
    ttl.map(|d| {
        i64::try_from(d.as_secs())
            .map_err(|_| Error::InvalidArgument(format!("{column} {} s is too large", d.as_secs())))
    })
    .transpose()
}
