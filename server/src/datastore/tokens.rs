//! Join tokens. A token is `<id>.<secret>` (see `node_attestor::join_token`): the id is
//! public (it becomes the agent ID), the secret is stored only as its SHA-256. The
//! token and the secret never reach the database, and error messages never name them.
//!
//! A token is single-use. It is consumed by one `DELETE ... WHERE id = ? AND secret_hash
//! = ? AND expires_at > now` statement in the transaction that records the agent it
//! admits ([`Datastore::attest_agent`]): the database deletes the row for at most one of
//! any number of concurrent consumers, and the one whose delete found nothing rolls its
//! whole transaction back; a wrong secret hash deletes nothing, so a wrong guess does not
//! burn the token; and a transaction that fails (a full disk) leaves the token in place,
//! so the agent can try again.

use std::fmt;

use carapace_core::RegistrationEntry;

use super::{Datastore, Tx, corrupt, entries::insert_entry, is_unique_violation};
use crate::{Error, Result};

/// A stored join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The public token id.
    pub id: String,
    /// SHA-256 of the token's secret.
    pub secret_hash: [u8; 32],
    /// Unix seconds at which the token expires: it is valid while `now < expires_at`.
    pub expires_at: i64,
    /// Unix seconds of creation.
    pub created_at: i64,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret_hash", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// A join token an agent presented and the `join_token` attestor verified (id known,
/// secret matching, not expired), to be consumed in the transaction that records the
/// agent.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedToken {
    /// The public token id.
    pub id: String,
    /// SHA-256 of the presented secret.
    pub secret_hash: [u8; 32],
}

impl fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresentedToken")
            .field("id", &self.id)
            .field("secret_hash", &"<redacted>")
            .finish()
    }
}

/// Consumes `token` inside the caller's write transaction: deletes its row if the id and
/// secret hash match and it has not expired at `now`. If nothing was deleted (already
/// used, by a racing agent too; unknown; wrong secret; expired) the attestation is
/// refused with the `join_token` attestor's one message, and the caller's transaction
/// must be dropped, so nothing else it wrote is kept.
pub(super) async fn consume(conn: &mut Tx, token: &PresentedToken, now: i64) -> Result<()> {
    // `execute` runs the statement to completion, so an error (a full disk) is reported
    // here and not lost when a half-read statement is reset.
    let done = on_tx!(conn, c => sqlx::query(
        "DELETE FROM join_tokens WHERE id = $1 AND secret_hash = $2 AND expires_at > $3",
    )
    .bind(token.id.as_str())
    .bind(&token.secret_hash[..])
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    if done == 0 {
        return Err(crate::node_attestor::join_token_rejected());
    }
    Ok(())
}

impl Datastore {
    /// Stores a join token (its id and the hash of its secret) expiring at `expires_at`,
    /// and, if `alias` is given, creates that entry exactly as
    /// [`create_entry`](Self::create_entry) does (similar-entry rule and `create` event
    /// included). One transaction: if either fails, nothing is written.
    /// [`Error::AlreadyExists`] if a token with this id is already stored.
    pub async fn create_join_token(
        &self,
        token_id: &str,
        secret_hash: &[u8; 32],
        expires_at: i64,
        now: i64,
        alias: Option<&RegistrationEntry>,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        on_tx!(&mut tx, c => sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, expires_at, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(token_id)
        .bind(&secret_hash[..])
        .bind(expires_at)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists(format!("join token {token_id} already exists"))
            } else {
                e.into()
            }
        })?;
        if let Some(entry) = alias {
            insert_entry(&mut tx, entry, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The token with this id, if stored, expired or not (compare `expires_at`).
    pub async fn get_join_token(&self, token_id: &str) -> Result<Option<JoinToken>> {
        let row: Option<(String, Vec<u8>, i64, i64)> = on_pool!(&self.pool, p => sqlx::query_as(
            "SELECT id, secret_hash, expires_at, created_at FROM join_tokens WHERE id = $1",
        )
        .bind(token_id)
        .fetch_optional(p)
        .await)?;
        row.map(|(id, hash, expires_at, created_at)| {
            let secret_hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| {
                corrupt(
                    format_args!("join_tokens id={id:?}"),
                    format!("secret_hash is {} bytes, not 32", hash.len()),
                )
            })?;
            Ok(JoinToken {
                id,
                secret_hash,
                expires_at,
                created_at,
            })
        })
        .transpose()
    }

    /// Deletes the join tokens expired at `now` (`expires_at <= now`); returns how many.
    pub async fn prune_expired_join_tokens(&self, now: i64) -> Result<u64> {
        let done = on_pool!(&self.pool, p => {
            sqlx::query("DELETE FROM join_tokens WHERE expires_at <= $1")
                .bind(now)
                .execute(p)
                .await
                .map(|r| r.rows_affected())
        })?;
        Ok(done)
    }
}
