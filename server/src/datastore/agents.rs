//! Attested agents and their node selectors.
//!
//! An agent row and its node selectors are always written together in one transaction.
//! A banned agent's row is frozen: it cannot be re-upserted (re-attestation) nor get a
//! new serial until it is unbanned or evicted.

use std::collections::HashMap;

use sqlx::QueryBuilder;

use carapace_core::{Selector, SelectorSet, SpiffeId};

use super::{
    Datastore, INSERT_CHUNK, PresentedToken, StateKey, Tx, parse_selector, parse_spiffe_id,
    push_in, tokens, unix_now,
};
use crate::{Error, Result};

/// An agent that completed node attestation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestedAgent {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The node attestor that attested it (`join_token`, `tpm`, ...).
    pub attestor: String,
    /// Hex serial number of the agent's current X509-SVID.
    pub serial: String,
    /// Hex serial of an SVID issued by a renewal that the agent has not used yet.
    pub new_serial: Option<String>,
    /// Unix seconds at which the agent's (newest) SVID expires.
    pub expires_at: i64,
    /// The agent is banned: it may not renew nor re-attest.
    pub banned: bool,
    /// The agent may re-attest (its attestor supports it).
    pub reattestable: bool,
    /// Unix seconds of the (last) attestation.
    pub attested_at: i64,
    /// The node selectors its attestation produced.
    pub selectors: SelectorSet,
    /// Set when the agent's last re-attestation was refused: it is refused on every
    /// node-API call until it attests afresh, which clears this.
    pub refused: Option<Refusal>,
}

/// Why and when an attested agent's re-attestation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Unix seconds of the refusal.
    pub at: i64,
    /// The attestor's reason, as the agent was told.
    pub reason: String,
}

/// One row of `attested_agents`, as stored.
#[derive(sqlx::FromRow)]
struct AgentRow {
    spiffe_id: String,
    attestor: String,
    serial: String,
    new_serial: Option<String>,
    expires_at: i64,
    banned: bool,
    reattestable: bool,
    attested_at: i64,
    refused_at: Option<i64>,
    refused_reason: Option<String>,
}

const AGENT_COLUMNS: &str = "spiffe_id, attestor, serial, new_serial, expires_at, banned, \
     reattestable, attested_at, refused_at, refused_reason";

impl Datastore {
    /// Inserts the agent, or replaces every field of the existing one, and replaces its
    /// node selectors, in one transaction.
    ///
    /// If the stored agent is banned, fails with [`Error::PermissionDenied`] and changes
    /// nothing.
    pub async fn upsert_attested_agent(&self, agent: &AttestedAgent) -> Result<()> {
        self.attest_agent(agent, None).await
    }

    /// Records an attestation: upserts the agent as
    /// [`upsert_attested_agent`](Self::upsert_attested_agent) does and, given the join
    /// `token` it presented, consumes that token in the same transaction. Either both
    /// happen or neither: a token that cannot be consumed (already used, by a racing
    /// agent too; expired at the attestation time, `agent.attested_at`) refuses the
    /// attestation with
    /// [`carapace_core::Error::AttestationRejected`] and writes nothing, and a write that
    /// fails leaves the token usable.
    pub async fn attest_agent(
        &self,
        agent: &AttestedAgent,
        token: Option<&PresentedToken>,
    ) -> Result<()> {
        let id = agent.spiffe_id.as_str();
        let mut tx = self.begin_write().await?;
        if let Some(token) = token {
            tokens::consume(&mut tx, token, agent.attested_at).await?;
        }
        if banned(&mut tx, &agent.spiffe_id).await? == Some(true) {
            return Err(banned_error(&agent.spiffe_id));
        }
        on_tx!(&mut tx, c => sqlx::query(
            "INSERT INTO attested_agents (spiffe_id, attestor, serial, new_serial, expires_at, \
             banned, reattestable, attested_at, refused_at, refused_reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (spiffe_id) DO UPDATE SET attestor = excluded.attestor, \
             serial = excluded.serial, new_serial = excluded.new_serial, \
             expires_at = excluded.expires_at, banned = excluded.banned, \
             reattestable = excluded.reattestable, attested_at = excluded.attested_at, \
             refused_at = excluded.refused_at, refused_reason = excluded.refused_reason",
        )
        .bind(id)
        .bind(agent.attestor.as_str())
        .bind(agent.serial.as_str())
        .bind(agent.new_serial.as_deref())
        .bind(agent.expires_at)
        .bind(agent.banned)
        .bind(agent.reattestable)
        .bind(agent.attested_at)
        .bind(agent.refused.as_ref().map(|r| r.at))
        .bind(agent.refused.as_ref().map(|r| r.reason.as_str()))
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected()))?;
        on_tx!(&mut tx, c => sqlx::query("DELETE FROM node_selectors WHERE spiffe_id = $1")
            .bind(id)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        let selectors: Vec<&Selector> = agent.selectors.iter().collect();
        for chunk in selectors.chunks(INSERT_CHUNK) {
            on_tx!(&mut tx, c => {
                let mut qb =
                    QueryBuilder::new("INSERT INTO node_selectors (spiffe_id, type, value) ");
                qb.push_values(chunk, |mut row, s| {
                    row.push_bind(id).push_bind(s.kind()).push_bind(s.value());
                });
                qb.build().execute(c).await.map(|r| r.rows_affected())
            })?;
        }
        log_agent(&mut tx, &agent.spiffe_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The agent with this SPIFFE ID, with its node selectors, if any.
    pub async fn get_attested_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>> {
        let mut tx = self.begin_read().await?;
        let agent = load_agents(&mut tx, Some(id)).await?.into_iter().next();
        tx.commit().await?;
        Ok(agent)
    }

    /// Every agent, sorted by SPIFFE ID, with its node selectors (two queries).
    pub async fn list_attested_agents(&self) -> Result<Vec<AttestedAgent>> {
        let mut tx = self.begin_read().await?;
        let agents = load_agents(&mut tx, None).await?;
        tx.commit().await?;
        Ok(agents)
    }

    /// Records a renewal: the agent was issued an SVID with serial `new_serial`, expiring
    /// at `expires_at`. Its current serial stays valid until
    /// [`promote_agent_serial`](Self::promote_agent_serial).
    ///
    /// [`Error::NotFound`] if the agent is missing, [`Error::PermissionDenied`] if it is
    /// banned.
    pub async fn set_agent_new_serial(
        &self,
        id: &SpiffeId,
        new_serial: &str,
        expires_at: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        match banned(&mut tx, id).await? {
            None => return Err(not_found(id)),
            Some(true) => return Err(banned_error(id)),
            Some(false) => {}
        }
        on_tx!(&mut tx, c => sqlx::query(
            "UPDATE attested_agents SET new_serial = $2, expires_at = $3 WHERE spiffe_id = $1",
        )
        .bind(id.as_str())
        .bind(new_serial)
        .bind(expires_at)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        log_agent(&mut tx, id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The agent used its renewed SVID: makes `serial` its current serial and clears
    /// `new_serial`, provided `new_serial` equals `serial`. Calling it again once done
    /// (the current serial is `serial` and none is pending) succeeds and changes nothing.
    ///
    /// [`Error::NotFound`] if the agent is missing, [`Error::PermissionDenied`] if it is
    /// banned or `serial` is neither the pending serial nor (with none pending) the
    /// current one, e.g. because another renewal replaced the pending serial.
    pub async fn promote_agent_serial(&self, id: &SpiffeId, serial: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let row: Option<(String, Option<String>, bool)> = on_tx!(&mut tx, c => sqlx::query_as(
            "SELECT serial, new_serial, banned FROM attested_agents WHERE spiffe_id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(c)
        .await)?;
        let Some((current, pending, is_banned)) = row else {
            return Err(not_found(id));
        };
        if is_banned {
            return Err(banned_error(id));
        }
        match pending.as_deref() {
            Some(p) if p == serial => {
                on_tx!(&mut tx, c => sqlx::query(
                    "UPDATE attested_agents SET serial = $2, new_serial = NULL \
                     WHERE spiffe_id = $1",
                )
                .bind(id.as_str())
                .bind(serial)
                .execute(c)
                .await
                .map(|r| r.rows_affected()))?;
                log_agent(&mut tx, id).await?;
                tx.commit().await?;
                Ok(())
            }
            None if current == serial => Ok(()),
            _ => Err(Error::PermissionDenied(format!(
                "agent {id}: serial {serial} is not the agent's pending renewal serial"
            ))),
        }
    }

    /// Records that the agent's re-attestation was refused: from now on every node-API
    /// call of the agent is refused (and a pending renewal can no longer be promoted)
    /// until it attests afresh. Returns the agent as now stored; [`Error::NotFound`] if
    /// missing.
    pub async fn set_agent_refused(
        &self,
        id: &SpiffeId,
        refusal: &Refusal,
    ) -> Result<AttestedAgent> {
        self.update_agent(id, AgentUpdate::Refused(refusal)).await
    }

    /// Bans or unbans the agent; returns it as now stored. [`Error::NotFound`] if missing.
    pub async fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<AttestedAgent> {
        self.update_agent(id, AgentUpdate::Banned(banned)).await
    }

    /// Runs `update` of the agent `id` in a write transaction and returns the agent as
    /// now stored; [`Error::NotFound`] if no row matched.
    async fn update_agent(&self, id: &SpiffeId, update: AgentUpdate<'_>) -> Result<AttestedAgent> {
        let mut tx = self.begin_write().await?;
        let done = on_tx!(&mut tx, c => match update {
            AgentUpdate::Refused(refusal) => {
                sqlx::query(
                    "UPDATE attested_agents SET refused_at = $2, refused_reason = $3, \
                     new_serial = NULL WHERE spiffe_id = $1",
                )
                .bind(id.as_str())
                .bind(refusal.at)
                .bind(refusal.reason.as_str())
                .execute(c)
                .await
                .map(|r| r.rows_affected())
            }
            AgentUpdate::Banned(banned) => {
                sqlx::query("UPDATE attested_agents SET banned = $2 WHERE spiffe_id = $1")
                    .bind(id.as_str())
                    .bind(banned)
                    .execute(c)
                    .await
                    .map(|r| r.rows_affected())
            }
        })?;
        if done == 0 {
            return Err(not_found(id));
        }
        let agent = load_agents(&mut tx, Some(id))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| not_found(id))?;
        log_agent(&mut tx, id).await?;
        tx.commit().await?;
        Ok(agent)
    }

    /// Evicts the agent: deletes it and its node selectors. It may attest again (as a new
    /// agent) afterwards. `forget` is an attestation-state record deleted in the same
    /// transaction: the one its node attestor names for eviction (a trust-on-first-use
    /// record); every other record stays. [`Error::NotFound`] if missing.
    pub async fn delete_attested_agent(
        &self,
        id: &SpiffeId,
        forget: Option<&StateKey>,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let deleted = on_tx!(&mut tx, c => {
            sqlx::query("DELETE FROM attested_agents WHERE spiffe_id = $1")
                .bind(id.as_str())
                .execute(c)
                .await
                .map(|r| r.rows_affected())
        })?;
        if deleted == 0 {
            return Err(not_found(id));
        }
        if let Some(key) = forget {
            on_tx!(&mut tx, c => {
                sqlx::query("DELETE FROM attestation_state WHERE attestor = $1 AND node_key = $2")
                    .bind(&key.attestor)
                    .bind(&key.node_key)
                    .execute(c)
                    .await
                    .map(|r| r.rows_affected())
            })?;
        }
        log_agent(&mut tx, id).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Logs a write of the agent `id` in `agent_events`, inside the write's transaction.
async fn log_agent(conn: &mut Tx, id: &SpiffeId) -> Result<()> {
    on_tx!(conn, c => {
        sqlx::query("INSERT INTO agent_events (spiffe_id, at) VALUES ($1, $2)")
            .bind(id.as_str())
            .bind(unix_now())
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// The agents with these SPIFFE IDs that exist, with their node selectors, in one
/// snapshot (chunks of [`super::IN_CHUNK`]).
pub(super) async fn load_agents_by_id(
    conn: &mut Tx,
    ids: &[SpiffeId],
) -> Result<Vec<AttestedAgent>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(super::IN_CHUNK) {
        let rows: Vec<AgentRow> = on_tx!(conn, c => {
            let mut qb = QueryBuilder::new(format!("SELECT {AGENT_COLUMNS} FROM attested_agents"));
            push_in(&mut qb, "spiffe_id", chunk.iter().map(|i| i.as_str().to_owned()));
            qb.build_query_as().fetch_all(c).await
        })?;
        let selector_rows: Vec<(String, String, String)> = on_tx!(conn, c => {
            let mut qb = QueryBuilder::new("SELECT spiffe_id, type, value FROM node_selectors");
            push_in(&mut qb, "spiffe_id", chunk.iter().map(|i| i.as_str().to_owned()));
            qb.push(" ORDER BY spiffe_id, type, value");
            qb.build_query_as().fetch_all(c).await
        })?;
        out.extend(assemble(rows, selector_rows)?);
    }
    Ok(out)
}

/// A one-column change of an agent row ([`Datastore::update_agent`]).
enum AgentUpdate<'a> {
    /// Records a refused re-attestation and drops a pending renewal.
    Refused(&'a Refusal),
    /// Bans (`true`) or unbans.
    Banned(bool),
}

fn not_found(id: &SpiffeId) -> Error {
    Error::NotFound(format!("agent {id} not found"))
}

fn banned_error(id: &SpiffeId) -> Error {
    Error::PermissionDenied(format!("agent {id} is banned"))
}

/// Whether the agent is banned; `None` if it does not exist.
async fn banned(conn: &mut Tx, id: &SpiffeId) -> Result<Option<bool>> {
    Ok(on_tx!(conn, c => {
        sqlx::query_scalar("SELECT banned FROM attested_agents WHERE spiffe_id = $1")
            .bind(id.as_str())
            .fetch_optional(c)
            .await
    })?)
}

/// Loads one agent (`only`) or all, sorted by SPIFFE ID, with their node selectors:
/// one query for the agents, one for the selectors.
async fn load_agents(conn: &mut Tx, only: Option<&SpiffeId>) -> Result<Vec<AttestedAgent>> {
    let rows: Vec<AgentRow> = on_tx!(conn, c => {
        let mut qb = QueryBuilder::new(format!("SELECT {AGENT_COLUMNS} FROM attested_agents"));
        if let Some(id) = only {
            qb.push(" WHERE spiffe_id = ")
                .push_bind(id.as_str().to_owned());
        }
        qb.push(" ORDER BY spiffe_id");
        qb.build_query_as().fetch_all(c).await
    })?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }

    let selector_rows: Vec<(String, String, String)> = on_tx!(conn, c => {
        let mut qb = QueryBuilder::new("SELECT spiffe_id, type, value FROM node_selectors");
        if let Some(id) = only {
            qb.push(" WHERE spiffe_id = ")
                .push_bind(id.as_str().to_owned());
        }
        qb.push(" ORDER BY spiffe_id, type, value");
        qb.build_query_as().fetch_all(c).await
    })?;
    assemble(rows, selector_rows)
}

/// Agent rows with their node-selector rows, as agents.
fn assemble(
    rows: Vec<AgentRow>,
    selector_rows: Vec<(String, String, String)>,
) -> Result<Vec<AttestedAgent>> {
    let mut selectors: HashMap<String, Vec<Selector>> = HashMap::new();
    for (agent, kind, value) in selector_rows {
        let s = parse_selector(
            format_args!("node_selectors spiffe_id={agent:?}"),
            &kind,
            &value,
        )?;
        selectors.entry(agent).or_default().push(s);
    }
    rows.into_iter()
        .map(|row| {
            let s = selectors.remove(&row.spiffe_id).unwrap_or_default();
            agent_from_row(row, s)
        })
        .collect()
}

fn agent_from_row(row: AgentRow, selectors: Vec<Selector>) -> Result<AttestedAgent> {
    let at = format!("attested_agents spiffe_id={:?}", row.spiffe_id);
    Ok(AttestedAgent {
        spiffe_id: parse_spiffe_id(&at, &row.spiffe_id)?,
        attestor: row.attestor,
        serial: row.serial,
        new_serial: row.new_serial,
        expires_at: row.expires_at,
        banned: row.banned,
        reattestable: row.reattestable,
        attested_at: row.attested_at,
        selectors: selectors.into_iter().collect(),
        refused: match (row.refused_at, row.refused_reason) {
            (Some(at), Some(reason)) => Some(Refusal { at, reason }),
            (Some(at), None) => Some(Refusal {
                at,
                reason: String::new(),
            }),
            _ => None,
        },
    })
}
