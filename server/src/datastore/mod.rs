//! The server's persistent storage: registration entries, attested agents, trust
//! bundles, join tokens and the CA journal, in SQLite (embedded, the default) or
//! PostgreSQL (several servers sharing a trust domain), through sqlx.
//!
//! # Invariants
//!
//! - **One transaction per multi-table write.** Creating an entry writes `entries`,
//!   `entry_selectors`, `entry_dns_names` and `entry_events` in one transaction;
//!   upserting an agent writes the agent and its node selectors in one; creating a join
//!   token with an alias entry writes both in one. A write that fails leaves nothing
//!   behind. Write transactions are serialised: on SQLite they start with `BEGIN
//!   IMMEDIATE`; on PostgreSQL they take one transaction-scoped advisory lock
//!   ([`WRITE_LOCK`]) before anything else, which every server sharing the database
//!   takes too. So the checks a write makes (duplicate id, similar entry, banned agent)
//!   and the writes that follow see the same state: no other writer, on this server or
//!   another, can slip in between. Reads never wait for that lock.
//! - **Every entry write is logged.** Each create, update and delete of an entry (pruning
//!   included) inserts exactly one row into `entry_events` in the same transaction. Event
//!   ids only grow, and since writers are serialised and an id is drawn inside the
//!   lock, they also become visible in id order (an id left unused by a rolled-back
//!   write stays a gap forever). [`Datastore::change_cursor`] gives the newest one. This
//!   is the change log that caches and other servers follow.
//! - **Join tokens are stored only as hashes.** A token is `<id>.<secret>`; the caller
//!   passes the public id and the SHA-256 of the secret, so neither the token nor the
//!   secret reaches the database. A token is consumed by a conditional `DELETE` in the
//!   transaction that records its agent ([`Datastore::attest_agent`]): of two concurrent
//!   consumers exactly one deletes the row, and a write that fails leaves the token.
//! - **A failed write never poisons the pool.** SQLite rolls a transaction back by itself
//!   when a statement or `COMMIT` fails with `SQLITE_FULL` or an I/O error; sqlx's
//!   `ROLLBACK` then fails and its transaction depth stays at 1, so the connection would
//!   refuse every later `BEGIN`. A connection returned to the pool still inside a
//!   transaction is closed instead (the pool opens a fresh one), so writes recover by
//!   themselves once the fault is gone. Whether the last write transaction could begin
//!   and commit is kept for the health check ([`Datastore::write_health`]).
//! - **What is read is re-validated.** Rows are turned back into core types with the
//!   core parsers ([`SpiffeId`], [`Selector`], [`EntryId`]); a row that does not parse is
//!   reported as [`Error::Datastore`] naming the row, never a panic.
//! - **Reads of several tables are consistent.** Loading entries or agents with their
//!   selectors runs its few bulk queries inside one read transaction (one snapshot), and
//!   never one query per entry.
//!
//! # Two engines, one code
//!
//! The pool and every transaction are an [`Engine`]: SQLite's or PostgreSQL's. A query
//! is written once, inside [`on_pool!`] or [`on_tx!`], which compile it for each engine
//! (no runtime translation, no `Any` driver) and run the one in use. Static SQL uses
//! `$N` placeholders (native to PostgreSQL, accepted by SQLite) and dynamic SQL is built
//! with [`sqlx::QueryBuilder`], which emits each engine's placeholders. Upserts use
//! `INSERT ... ON CONFLICT ... DO UPDATE` and deletions `RETURNING`, both engines' SQL.
//! Integers are `BIGINT` on both (an `INTEGER` is 32 bits on PostgreSQL). What differs
//! lives in this file (connecting, beginning a write, telling whether it wrote) and in
//! the two DDL sets, `server/migrations/sqlite/` and `server/migrations/postgres/`,
//! which carry the same versions. PostgreSQL migrations run under sqlx's session
//! advisory lock, so servers started together on an empty database apply each once.
//!
//! # Files
//!
//! A SQLite database file is created with mode 0600 (and its directory, if missing, 0700)
//! before SQLite opens it: it holds node data. SQLite gives the `-wal` and `-shm` files
//! the same mode as the database file.

/// Runs `$body` with `$c` bound to the pool of the engine in use (`&SqlitePool` or
/// `&PgPool`). The body is compiled once per engine; both arms must yield one type.
macro_rules! on_pool {
    ($pool:expr, $c:ident => $body:expr) => {
        match $pool {
            $crate::datastore::Engine::Sqlite($c) => $body,
            $crate::datastore::Engine::Postgres($c) => $body,
        }
    };
}

/// Runs `$body` with `$c` bound to the connection of a transaction ([`Tx`], or a
/// [`WriteTx`] through its deref), as `&mut SqliteConnection` or `&mut PgConnection`.
/// The body is compiled once per engine; both arms must yield one type.
macro_rules! on_tx {
    ($tx:expr, $c:ident => $body:expr) => {{
        let tx: &mut $crate::datastore::Tx = $tx;
        match tx {
            $crate::datastore::Engine::Sqlite(t) => {
                let $c: &mut sqlx::SqliteConnection = &mut *t;
                $body
            }
            $crate::datastore::Engine::Postgres(t) => {
                let $c: &mut sqlx::PgConnection = &mut *t;
                $body
            }
        }
    }};
}

mod agents;
mod attestation_state;
mod batch;
mod bundles;
mod changes;
mod entries;
mod federation;
mod settings;
mod tokens;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// Event and journal timestamps: the system's time (no plugin context reaches the datastore).
use carapace_core::clock::unix_now;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Postgres, Sqlite, Transaction};

use carapace_core::{EntryId, Selector, SpiffeId};

use crate::{Error, Result};

pub use agents::{AttestedAgent, Refusal};
pub use attestation_state::StateKey;
pub use changes::{ChangeListener, Changes, Cursor, Woken};
pub use settings::{DEFAULT_MAX_CONNECTIONS, Password, PostgresSettings, Settings, SslMode};
pub use tokens::{JoinToken, PresentedToken};

/// How long a connection waits for a lock held by another connection (SQLite), or for
/// a connection from the pool (both).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows per multi-row `INSERT`, kept well below SQLite's bind-parameter limit.
const INSERT_CHUNK: usize = 500;

/// Rows a SQLite connection's worker thread reads ahead of the task consuming them
/// (sqlx's default is 50): a bulk load then hands rows over in runs, not one wake-up each.
const SQLITE_ROW_BUFFER: usize = 1024;

/// Values per `IN (...)` list, kept well below both engines' bind-parameter limits.
const IN_CHUNK: usize = 1000;

/// The name of the PostgreSQL notification every committed write sends
/// ([`Datastore::change_listener`]); its payload is a [`Changed`].
const CHANGES_CHANNEL: &str = "carapace_changes";

/// What a committed write changed, as far as the servers following the datastore care:
/// the payload of its notification on PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Changed {
    /// Rows the change logs cover (entries, agents), or nothing a follower reads.
    Logs,
    /// The trust domain's bundle.
    Bundle,
    /// Federation relationships or foreign trust domains' bundles
    /// (`datastore::federation`).
    Federation,
}

impl Changed {
    fn payload(self) -> &'static str {
        match self {
            Changed::Logs => "logs",
            Changed::Bundle => "bundle",
            Changed::Federation => "federation",
        }
    }

    /// The change a notification's payload names; `None` for a payload this version
    /// does not know (a reader then re-reads everything it follows).
    fn from_payload(payload: &str) -> Option<Self> {
        match payload {
            "logs" => Some(Changed::Logs),
            "bundle" => Some(Changed::Bundle),
            "federation" => Some(Changed::Federation),
            _ => None,
        }
    }
}

/// The key of the PostgreSQL advisory lock every write transaction takes first
/// (`pg_advisory_xact_lock`): "carapace" in ASCII. Only Carapace servers take it.
pub const WRITE_LOCK: i64 = 0x6361_7261_7061_6365;

/// How long a PostgreSQL session may sit idle inside a transaction before the database
/// ends it, releasing its locks: a server that hangs (or a network that drops) while
/// holding [`WRITE_LOCK`] cannot stall the other servers' writes for longer.
const PG_IDLE_IN_TRANSACTION_TIMEOUT: &str = "30s";

/// The embedded migrations of each engine. Both sets carry the same versions.
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// One value per database engine: the datastore's pool, and each of its transactions.
#[derive(Clone, Debug)]
pub enum Engine<S, P> {
    /// SQLite (embedded).
    Sqlite(S),
    /// PostgreSQL.
    Postgres(P),
}

/// The pool of the engine in use.
type Pool = Engine<SqlitePool, PgPool>;

/// A transaction on the engine in use: its queries see one snapshot (SQLite) or run at
/// PostgreSQL's default `READ COMMITTED`, each statement seeing what was committed when
/// it started. Dropping it uncommitted rolls it back.
type Tx = Engine<Transaction<'static, Sqlite>, Transaction<'static, Postgres>>;

impl Tx {
    /// Commits.
    async fn commit(self) -> sqlx::Result<()> {
        match self {
            Engine::Sqlite(t) => t.commit().await,
            Engine::Postgres(t) => t.commit().await,
        }
    }
}

/// The server datastore: a connection pool. Cheap to clone; clones share the pool.
#[derive(Clone, Debug)]
pub struct Datastore {
    pool: Pool,
    /// Whether the pool is SQLite on a file (not in memory, where each connection
    /// would open a database of its own).
    file_backed: bool,
    /// Why the last write transaction failed to begin or commit; `None` once one
    /// commits.
    write_failure: Arc<Mutex<Option<String>>>,
}

/// Which entries to list or count. Every filter that is set must hold (AND); the default
/// filter matches every entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Only the entry with this id.
    pub id: Option<EntryId>,
    /// Only entries issuing this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Only entries with this parent.
    pub parent_id: Option<SpiffeId>,
    /// Only entries that have all of these selectors (and possibly more).
    pub selectors: Vec<Selector>,
}

impl EntryFilter {
    /// Whether no filter is set.
    fn is_empty(&self) -> bool {
        self.id.is_none()
            && self.spiffe_id.is_none()
            && self.parent_id.is_none()
            && self.selectors.is_empty()
    }
}

impl Datastore {
    /// Connects to the datastore `settings` describe and brings its schema up to date.
    pub async fn connect(settings: &Settings) -> Result<Datastore> {
        match settings {
            Settings::Sqlite {
                path,
                max_connections,
            } => Datastore::open_with(path, *max_connections).await,
            Settings::Postgres(pg) => Datastore::open_postgres(pg).await,
        }
    }

    /// Opens (creating if missing) the SQLite database at `path` and brings its schema up
    /// to date.
    ///
    /// The parent directory is created (mode 0700) if missing, and the database file is
    /// created with mode 0600 before SQLite opens it. The connections use WAL journaling,
    /// `synchronous=NORMAL`, foreign keys and a 5 s busy timeout.
    pub async fn open(path: &Path) -> Result<Datastore> {
        Datastore::open_with(path, DEFAULT_MAX_CONNECTIONS).await
    }

    async fn open_with(path: &Path, max_connections: u32) -> Result<Datastore> {
        create_db_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .row_buffer_size(SQLITE_ROW_BUFFER);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .after_release(|conn, _| Box::pin(discard_if_in_transaction(conn)))
            .connect_with(options)
            .await
            .map_err(|e| Error::Datastore(format!("opening {}: {e}", path.display())))?;
        let mut ds = Datastore::with_pool(Engine::Sqlite(pool));
        ds.file_backed = true;
        ds.migrate().await?;
        Ok(ds)
    }

    /// Connects to the PostgreSQL database `pg` describes and brings its schema up to
    /// date, under sqlx's migration lock: servers started together apply each migration
    /// once, the others wait and find it applied.
    ///
    /// The password is read here (from its file or variable), never logged. Every
    /// session ends a transaction left idle for 30 s, releasing its locks.
    pub async fn open_postgres(pg: &PostgresSettings) -> Result<Datastore> {
        let target = pg.display_target();
        let mut options: PgConnectOptions = pg
            .url
            .parse()
            .map_err(|e| Error::Datastore(format!("datastore url {target}: {e}")))?;
        if let Some(password) = pg.password.read()? {
            options = options.password(&password);
        }
        if let Some(mode) = pg.ssl_mode {
            options = options.ssl_mode(mode.into());
        }
        if let Some(ca) = &pg.ca_file {
            options = options.ssl_root_cert(ca);
        }
        options = options.application_name("carapace-server").options([(
            "idle_in_transaction_session_timeout",
            PG_IDLE_IN_TRANSACTION_TIMEOUT,
        )]);
        let pool = PgPoolOptions::new()
            .max_connections(pg.max_connections)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| Error::Datastore(format!("connecting to {target}: {e}")))?;
        let ds = Datastore::with_pool(Engine::Postgres(pool));
        ds.migrate().await?;
        Ok(ds)
    }

    /// Opens a fresh, private in-memory database, for tests.
    ///
    /// An in-memory SQLite database lives as long as its connection and is private to
    /// it, so the pool holds exactly one connection that never expires: every caller
    /// (and every clone) sees the same database, and concurrent callers queue for the
    /// connection. Each call opens a new, empty database. Unlike [`open`](Self::open)'s
    /// pool, this one keeps a connection a failed write left inside a transaction:
    /// replacing it would replace the database too.
    pub async fn open_in_memory() -> Result<Datastore> {
        let options = SqliteConnectOptions::new()
            .filename(":memory:")
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // A failed ping would replace the connection, and with it the database, by
            // an empty one: better to let the next query fail.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|e| Error::Datastore(format!("opening in-memory database: {e}")))?;
        let ds = Datastore::with_pool(Engine::Sqlite(pool));
        ds.migrate().await?;
        Ok(ds)
    }

    fn with_pool(pool: Pool) -> Datastore {
        Datastore {
            pool,
            file_backed: false,
            write_failure: Arc::new(Mutex::new(None)),
        }
    }

    /// The engine in use: `"sqlite"` or `"postgres"`.
    pub fn engine(&self) -> &'static str {
        match self.pool {
            Engine::Sqlite(_) => "sqlite",
            Engine::Postgres(_) => "postgres",
        }
    }

    /// Whether writes work, as far as the last write transaction tells: an error naming
    /// why it could not begin or commit (a full disk, a lock held too long), until a
    /// later one commits. A minimal signal for the health check: it does not probe, and
    /// a failure inside a transaction that is rolled back cleanly is not counted.
    pub fn write_health(&self) -> std::result::Result<(), String> {
        match &*lock(&self.write_failure) {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Proves that the datastore answers and commits a write now: rewrites the one row of
    /// `health_probe` in a write transaction of its own. The readiness check's probe. It
    /// is not a [`WriteTx`]: rewriting one row in place can commit on a disk too full for
    /// an entry, so its success must not clear what [`Self::write_health`] reports.
    pub async fn probe_write(&self, now: i64) -> Result<()> {
        let mut tx = self.begin_serialised().await?;
        on_tx!(&mut tx, c => sqlx::query(
            "INSERT INTO health_probe (id, probed_at) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at",
        )
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        tx.commit().await?;
        Ok(())
    }

    /// Closes every connection, waiting for those in use to be returned. Later calls
    /// fail.
    pub async fn close(&self) {
        on_pool!(&self.pool, p => p.close().await)
    }

    /// Applies the migrations not yet applied. Idempotent.
    async fn migrate(&self) -> Result<()> {
        match &self.pool {
            Engine::Sqlite(p) => SQLITE_MIGRATOR.run(p).await?,
            Engine::Postgres(p) => POSTGRES_MIGRATOR.run(p).await?,
        }
        Ok(())
    }

    /// Begins a transaction that holds the write lock: SQLite's (`BEGIN IMMEDIATE`,
    /// waiting up to the busy timeout for it), or [`WRITE_LOCK`] on PostgreSQL (waiting
    /// as long as the holder's transaction lasts). The reads a write makes before
    /// writing therefore cannot be invalidated by another writer; on SQLite a deferred
    /// transaction would instead fail with `SQLITE_BUSY` when upgrading to a write lock.
    async fn begin_serialised(&self) -> sqlx::Result<Tx> {
        Ok(match &self.pool {
            Engine::Sqlite(p) => Engine::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Engine::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Engine::Postgres(tx)
            }
        })
    }

    /// Starts a write transaction ([`Self::begin_serialised`]).
    ///
    /// On any error before [`WriteTx::commit`] the transaction is rolled back when the
    /// `WriteTx` is dropped, and (SQLite) the connection is closed rather than reused if
    /// that rollback fails (see the module's invariants).
    async fn begin_write(&self) -> Result<WriteTx> {
        let began = async {
            let mut tx = self.begin_serialised().await?;
            let mark = write_mark(&mut tx).await?;
            Ok::<_, sqlx::Error>((tx, mark))
        };
        match began.await {
            Ok((tx, mark)) => Ok(WriteTx {
                tx,
                mark,
                changed: Changed::Logs,
                write_failure: self.write_failure.clone(),
            }),
            Err(e) => {
                record_write_failure(&self.write_failure, "starting a write transaction", &e);
                Err(e.into())
            }
        }
    }

    /// Starts a read transaction: the queries in it see one snapshot (SQLite), or each
    /// sees what was committed when it started (PostgreSQL's `READ COMMITTED`).
    async fn begin_read(&self) -> Result<Tx> {
        Ok(match &self.pool {
            Engine::Sqlite(p) => Engine::Sqlite(p.begin().await?),
            Engine::Postgres(p) => Engine::Postgres(p.begin().await?),
        })
    }
}

/// A write transaction ([`Datastore::begin_serialised`]). It derefs to its [`Tx`] for
/// queries; [`commit`](Self::commit) records the outcome for
/// [`Datastore::write_health`]; dropping it uncommitted rolls it back.
struct WriteTx {
    tx: Tx,
    /// Where the transaction began, to tell at commit whether it wrote ([`wrote`]).
    mark: WriteMark,
    /// What the notification sent at commit names, if the transaction wrote.
    changed: Changed,
    write_failure: Arc<Mutex<Option<String>>>,
}

impl WriteTx {
    /// Marks the transaction as changing `what`: its commit notification says so.
    fn changes(&mut self, what: Changed) {
        self.changed = what;
    }

    /// Commits. Nothing the transaction wrote is visible before this returns `Ok`.
    ///
    /// A failure is recorded for [`Datastore::write_health`]; a success clears it only
    /// if the transaction changed a row, because committing nothing (a prune that found
    /// nothing) writes nothing and proves nothing about a full disk. On PostgreSQL a
    /// transaction that wrote also wakes the servers following the datastore, when it
    /// commits.
    async fn commit(self) -> Result<()> {
        let WriteTx {
            mut tx,
            mark,
            changed,
            write_failure,
        } = self;
        let committed = async {
            let wrote = wrote(&mut tx, mark).await?;
            if let (true, Engine::Postgres(t)) = (wrote, &mut tx) {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANGES_CHANNEL)
                    .bind(changed.payload())
                    .execute(&mut **t)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(wrote)
        };
        match committed.await {
            Ok(wrote) => {
                if wrote {
                    *lock(&write_failure) = None;
                }
                Ok(())
            }
            Err(e) => {
                record_write_failure(&write_failure, "committing a write transaction", &e);
                Err(e.into())
            }
        }
    }
}

impl Deref for WriteTx {
    type Target = Tx;
    fn deref(&self) -> &Tx {
        &self.tx
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Tx {
        &mut self.tx
    }
}

/// What [`wrote`] compares against: on SQLite, the connection's `total_changes()` (rows
/// inserted, updated or deleted since it opened) when the transaction began; PostgreSQL
/// needs nothing (a transaction is given an id at its first write).
#[derive(Clone, Copy)]
enum WriteMark {
    Sqlite { total_changes: i64 },
    Postgres,
}

async fn write_mark(tx: &mut Tx) -> sqlx::Result<WriteMark> {
    Ok(match tx {
        Engine::Sqlite(t) => WriteMark::Sqlite {
            total_changes: sqlx::query_scalar("SELECT total_changes()")
                .fetch_one(&mut **t)
                .await?,
        },
        Engine::Postgres(_) => WriteMark::Postgres,
    })
}

/// Whether the transaction begun at `mark` has inserted, updated or deleted a row.
async fn wrote(tx: &mut Tx, mark: WriteMark) -> sqlx::Result<bool> {
    match (tx, mark) {
        (Engine::Sqlite(t), WriteMark::Sqlite { total_changes }) => {
            let now: i64 = sqlx::query_scalar("SELECT total_changes()")
                .fetch_one(&mut **t)
                .await?;
            Ok(now != total_changes)
        }
        (Engine::Postgres(t), _) => {
            sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
                .fetch_one(&mut **t)
                .await
        }
        // A mark is only ever taken on its own transaction; if not, assume a write.
        (Engine::Sqlite(_), WriteMark::Postgres) => Ok(true),
    }
}

fn lock(m: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn record_write_failure(slot: &Mutex<Option<String>>, what: &str, e: &sqlx::Error) {
    *lock(slot) = Some(format!("{what} failed at unix time {}: {e}", unix_now()));
}

/// The SQLite pool's `after_release` check: `false` (close it) for a connection still
/// inside a transaction. That happens when SQLite rolled a failed transaction back by
/// itself (`SQLITE_FULL`, I/O errors), so the `ROLLBACK` sqlx queued when the transaction
/// was dropped failed and sqlx's transaction depth stayed at 1: reused, the connection
/// would refuse every later `BEGIN` ("attempted to call begin_with at non-zero
/// transaction depth"). It also covers a `ROLLBACK` that really failed: closing the
/// connection rolls the transaction back and frees SQLite's write lock.
async fn discard_if_in_transaction(conn: &mut SqliteConnection) -> sqlx::Result<bool> {
    // A dropped transaction only queues its ROLLBACK on the connection's worker; a ping
    // goes through the same queue, so the depth is read after the rollback ran.
    conn.ping().await?;
    if conn.is_in_transaction() {
        tracing::warn!(
            "closing a datastore connection left inside a failed transaction; the pool \
             opens a fresh one"
        );
        return Ok(false);
    }
    Ok(true)
}

/// Creates the parent directory (0700) and the database file (0600) if missing.
fn create_db_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(Error::io(format!(
                "creating datastore directory {}",
                dir.display()
            )))?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(format!(
            "creating datastore file {}",
            path.display()
        )))?;
    Ok(())
}

/// The error for a stored row that does not convert back into a core type.
fn corrupt(row: impl std::fmt::Display, problem: impl std::fmt::Display) -> Error {
    Error::Datastore(format!("corrupt row {row}: {problem}"))
}

/// Appends ` WHERE column IN (...)` with one bound value per item (at least one).
fn push_in<DB: sqlx::Database>(
    qb: &mut sqlx::QueryBuilder<DB>,
    column: &str,
    items: impl IntoIterator<Item = String>,
) where
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    qb.push(" WHERE ").push(column).push(" IN (");
    let mut sep = qb.separated(", ");
    for item in items {
        sep.push_bind(item);
    }
    qb.push(")");
}

/// Whether `e` is a uniqueness (primary key or unique index) violation.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// Parses a stored SPIFFE ID.
fn parse_spiffe_id(row: impl std::fmt::Display, s: &str) -> Result<SpiffeId> {
    s.parse().map_err(|e| corrupt(row, e))
}

/// Parses a stored selector.
fn parse_selector(row: impl std::fmt::Display, kind: &str, value: &str) -> Result<Selector> {
    Selector::stored(kind, value).map_err(|e| corrupt(row, e))
}
