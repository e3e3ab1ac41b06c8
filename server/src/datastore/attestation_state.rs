//! Per-node state of node attestors (`attestation_state`).

use super::{Datastore, unix_now};
use crate::Result;

/// One record of `attestation_state`: a node attestor's name and the node's key in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateKey {
    /// The node attestor (its plugin name).
    pub attestor: String,
    /// The node's key in the attestor's namespace.
    pub node_key: String,
}

impl Datastore {
    /// The state `attestor` saved for `node_key`, if any.
    pub async fn load_attestation_state(
        &self,
        attestor: &str,
        node_key: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(on_pool!(&self.pool, p => sqlx::query_scalar(
            "SELECT data FROM attestation_state WHERE attestor = $1 AND node_key = $2",
        )
        .bind(attestor)
        .bind(node_key)
        .fetch_optional(p)
        .await)?)
    }

    /// Saves the state of `attestor` for `node_key`, replacing the previous one.
    pub async fn save_attestation_state(
        &self,
        attestor: &str,
        node_key: &str,
        data: &[u8],
    ) -> Result<()> {
        on_pool!(&self.pool, p => sqlx::query(
            "INSERT INTO attestation_state (attestor, node_key, data, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (attestor, node_key) DO UPDATE SET \
             data = excluded.data, updated_at = excluded.updated_at",
        )
        .bind(attestor)
        .bind(node_key)
        .bind(data)
        .bind(unix_now())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Saves the state of `attestor` for `node_key` only if there is none; `false` when
    /// there was (left unchanged). One statement, so of two concurrent calls (even from
    /// two servers on one database) exactly one inserts.
    pub async fn save_new_attestation_state(
        &self,
        attestor: &str,
        node_key: &str,
        data: &[u8],
    ) -> Result<bool> {
        let done = on_pool!(&self.pool, p => sqlx::query(
            "INSERT INTO attestation_state (attestor, node_key, data, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (attestor, node_key) DO NOTHING",
        )
        .bind(attestor)
        .bind(node_key)
        .bind(data)
        .bind(unix_now())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }
}
