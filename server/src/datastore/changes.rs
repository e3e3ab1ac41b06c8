//! Following what every server sharing the datastore commits: the change logs
//! (`entry_events`, `agent_events`), read by id from a [`Cursor`], and, on PostgreSQL, a
//! notification after each committed write to wake the readers at once.
//!
//! Nothing is skipped: writes are serialised (see the module's invariants), and an event
//! id is drawn inside the write lock, so a log's ids become visible in increasing order;
//! a reader that has seen id N will never later see an id below N appear. An id left
//! unused by a rolled-back write is a gap that stays empty.
//!
//! The logs are pruned ([`Datastore::prune_change_logs`]); `change_log_horizon` keeps the
//! highest id pruned from each. A reader whose cursor is below it has missed events:
//! [`Changes::reset`] tells it to reload everything.

use carapace_core::{EntryId, RegistrationEntry, SpiffeId};
use sqlx::postgres::PgListener;

use super::{
    CHANGES_CHANNEL, Changed, Datastore, Engine, Tx, agents, corrupt, entries, parse_spiffe_id,
};
use crate::{Error, Result};

/// How far a reader has followed the change logs: the last event id of each it applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The last `entry_events` id.
    pub entry_event: i64,
    /// The last `agent_events` id.
    pub agent_event: i64,
}

/// What changed after a cursor: the entries and agents written (each once, in the order
/// of their first event), and the cursor past them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Entries created, updated or deleted.
    pub entries: Vec<EntryId>,
    /// Agents attested, renewed, banned, refused or evicted.
    pub agents: Vec<SpiffeId>,
    /// The cursor after these changes.
    pub cursor: Cursor,
    /// Whether either log had more than the limit after the cursor (read again).
    pub more: bool,
    /// Whether events after the cursor were pruned: the reader must reload everything
    /// (from a fresh [`Datastore::change_cursor`]); the rest of this is empty.
    pub reset: bool,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.agents.is_empty()
    }
}

/// Wakes a reader when any server commits a write to a PostgreSQL datastore.
#[derive(Debug)]
pub struct ChangeListener {
    listener: PgListener,
}

/// What the notifications received say changed, merged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Woken {
    /// The change logs (entries, agents): read them from the cursor.
    pub logs: bool,
    /// The trust domain's bundle: read it again.
    pub bundle: bool,
    /// Federation relationships or foreign bundles were created, changed or deleted
    /// ([`Datastore::list_federations`], [`Datastore::list_foreign_bundles`]): whoever
    /// holds them (the refresh loop, the agents' sync) reads them again. Status writes
    /// do not set it.
    pub federation: bool,
}

impl Woken {
    fn add(&mut self, payload: &str) {
        match Changed::from_payload(payload) {
            Some(Changed::Logs) => self.logs = true,
            Some(Changed::Bundle) => self.bundle = true,
            Some(Changed::Federation) => self.federation = true,
            // Unknown (another version's): re-read everything.
            None => {
                self.logs = true;
                self.bundle = true;
                self.federation = true;
            }
        }
    }
}

impl ChangeListener {
    /// Waits for the next committed write (of any server), and returns what it changed
    /// merged with what the notifications already buffered say. Notifications sent while
    /// the connection was down are lost (it reconnects by itself): readers also poll.
    pub async fn recv(&mut self) -> Result<Woken> {
        let first = self
            .listener
            .recv()
            .await
            .map_err(|e| Error::Datastore(format!("waiting for datastore changes: {e}")))?;
        let mut woken = Woken::default();
        woken.add(first.payload());
        while let Some(n) = self.listener.next_buffered() {
            woken.add(n.payload());
        }
        Ok(woken)
    }
}

/// The two change logs.
#[derive(Clone, Copy)]
enum Log {
    Entries,
    Agents,
}

impl Log {
    fn name(self) -> &'static str {
        match self {
            Log::Entries => "entry_events",
            Log::Agents => "agent_events",
        }
    }
}

/// The newest id of `log` (0 when empty), or the highest pruned if that is higher.
async fn latest(conn: &mut Tx, log: Log) -> Result<i64> {
    let sql = match log {
        Log::Entries => "SELECT COALESCE(MAX(id), 0) FROM entry_events",
        Log::Agents => "SELECT COALESCE(MAX(id), 0) FROM agent_events",
    };
    let newest: i64 = on_tx!(conn, c => sqlx::query_scalar(sql).fetch_one(c).await)?;
    Ok(newest.max(horizon(conn, log).await?))
}

/// The highest id pruned from `log` (0 if none).
async fn horizon(conn: &mut Tx, log: Log) -> Result<i64> {
    let pruned: Option<i64> = on_tx!(conn, c => {
        sqlx::query_scalar("SELECT pruned_through FROM change_log_horizon WHERE log = $1")
            .bind(log.name())
            .fetch_optional(c)
            .await
    })?;
    Ok(pruned.unwrap_or(0))
}

impl Datastore {
    /// The cursor at the end of both logs now. Read it before loading what it covers: a
    /// write committed in between is then applied twice, never missed.
    pub async fn change_cursor(&self) -> Result<Cursor> {
        let mut tx = self.begin_read().await?;
        let cursor = Cursor {
            entry_event: latest(&mut tx, Log::Entries).await?,
            agent_event: latest(&mut tx, Log::Agents).await?,
        };
        tx.commit().await?;
        Ok(cursor)
    }

    /// The entries and agents written after `after`, at most `limit` events of each log.
    pub async fn changes_since(&self, after: Cursor, limit: i64) -> Result<Changes> {
        let mut tx = self.begin_read().await?;
        if after.entry_event < horizon(&mut tx, Log::Entries).await?
            || after.agent_event < horizon(&mut tx, Log::Agents).await?
        {
            tx.commit().await?;
            return Ok(Changes {
                cursor: after,
                reset: true,
                ..Changes::default()
            });
        }
        let entry_rows: Vec<(i64, String)> = on_tx!(&mut tx, c => {
            sqlx::query_as(
                "SELECT id, entry_id FROM entry_events WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after.entry_event)
            .bind(limit)
            .fetch_all(c)
            .await
        })?;
        let agent_rows: Vec<(i64, String)> = on_tx!(&mut tx, c => {
            sqlx::query_as(
                "SELECT id, spiffe_id FROM agent_events WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after.agent_event)
            .bind(limit)
            .fetch_all(c)
            .await
        })?;
        tx.commit().await?;
        let full = |n: usize| i64::try_from(n).is_ok_and(|n| n >= limit);
        let mut out = Changes {
            cursor: after,
            more: full(entry_rows.len()) || full(agent_rows.len()),
            ..Changes::default()
        };
        for (id, entry) in entry_rows {
            let entry = EntryId::new(&entry)
                .map_err(|e| corrupt(format_args!("entry_events id={id}"), e))?;
            if !out.entries.contains(&entry) {
                out.entries.push(entry);
            }
            out.cursor.entry_event = id;
        }
        for (id, agent) in agent_rows {
            let agent = parse_spiffe_id(format_args!("agent_events id={id}"), &agent)?;
            if !out.agents.contains(&agent) {
                out.agents.push(agent);
            }
            out.cursor.agent_event = id;
        }
        Ok(out)
    }

    /// Deletes the events of both logs written before `before` (unix seconds) and records
    /// the highest id deleted from each (see the module). Returns how many were deleted.
    pub async fn prune_change_logs(&self, before: i64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let mut deleted = 0;
        for log in [Log::Entries, Log::Agents] {
            let (max_sql, delete_sql) = match log {
                Log::Entries => (
                    "SELECT MAX(id) FROM entry_events WHERE at < $1",
                    "DELETE FROM entry_events WHERE id <= $1",
                ),
                Log::Agents => (
                    "SELECT MAX(id) FROM agent_events WHERE at < $1",
                    "DELETE FROM agent_events WHERE id <= $1",
                ),
            };
            let through: Option<i64> = on_tx!(&mut tx, c => {
                sqlx::query_scalar(max_sql).bind(before).fetch_one(c).await
            })?;
            let Some(through) = through else { continue };
            deleted += on_tx!(&mut tx, c => {
                sqlx::query(delete_sql)
                    .bind(through)
                    .execute(c)
                    .await
                    .map(|r| r.rows_affected())
            })?;
            on_tx!(&mut tx, c => sqlx::query(
                "INSERT INTO change_log_horizon (log, pruned_through) VALUES ($1, $2) \
                 ON CONFLICT (log) DO UPDATE SET pruned_through = excluded.pruned_through",
            )
            .bind(log.name())
            .bind(through)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// The entries with these ids that exist now (a missing one was deleted).
    pub async fn entries_by_id(&self, ids: &[EntryId]) -> Result<Vec<RegistrationEntry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_read().await?;
        let found = entries::load_entries_by_id(&mut tx, ids).await?;
        tx.commit().await?;
        Ok(found)
    }

    /// The agents with these SPIFFE IDs that exist now (a missing one was evicted).
    pub async fn agents_by_id(&self, ids: &[SpiffeId]) -> Result<Vec<agents::AttestedAgent>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_read().await?;
        let found = agents::load_agents_by_id(&mut tx, ids).await?;
        tx.commit().await?;
        Ok(found)
    }

    /// A listener woken by every write any server commits, on PostgreSQL; `None` on
    /// SQLite, whose database no other server shares.
    pub async fn change_listener(&self) -> Result<Option<ChangeListener>> {
        match &self.pool {
            Engine::Sqlite(_) => Ok(None),
            Engine::Postgres(pool) => {
                let mut listener = PgListener::connect_with(pool).await.map_err(|e| {
                    Error::Datastore(format!("listening for datastore changes: {e}"))
                })?;
                listener.listen(CHANGES_CHANNEL).await.map_err(|e| {
                    Error::Datastore(format!("listening for datastore changes: {e}"))
                })?;
                Ok(Some(ChangeListener { listener }))
            }
        }
    }
}
