//! Join tokens. A token is `<id>.<secret>` (see `node_attestor::join_token`): the id is
//! public (it becomes the agent ID), the secret is stored only as its SHA-256. The
//! token and the secret never reach the database, and error messages never name them.
//!
//! A token is single-use. Consuming it is one `DELETE ... WHERE id = ? AND secret_hash
//! = ? RETURNING expires_at` statement: the database deletes the row for at most one of
//! any number of concurrent consumers, so exactly one of them sees it; a wrong secret
//! hash deletes nothing, so a wrong guess does not burn the token.

use std::fmt;

use carapace_core::RegistrationEntry;

use super::{Datastore, corrupt, entries::insert_entry, is_unique_violation};
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
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, expires_at, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(token_id)
        .bind(&secret_hash[..])
        .bind(expires_at)
        .bind(now)
        .execute(&mut *tx)
        .await
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
        let row: Option<(String, Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT id, secret_hash, expires_at, created_at FROM join_tokens WHERE id = $1",
        )
        .bind(token_id)
        .fetch_optional(&self.pool)
        .await?;
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

    /// Consumes a join token: if a token with this id and secret hash is stored, deletes
    /// it and returns whether it had not expired (`now < expires_at`); an expired token
    /// is deleted too. A wrong secret hash deletes nothing and returns `false`.
    /// Race-free: of concurrent consumers of one token, exactly one can get `true`.
    pub async fn consume_join_token(
        &self,
        token_id: &str,
        secret_hash: &[u8; 32],
        now: i64,
    ) -> Result<bool> {
        let expires_at: Option<i64> = sqlx::query_scalar(
            "DELETE FROM join_tokens WHERE id = $1 AND secret_hash = $2 RETURNING expires_at",
        )
        .bind(token_id)
        .bind(&secret_hash[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(expires_at.is_some_and(|exp| now < exp))
    }

    /// Deletes the join tokens expired at `now` (`expires_at <= now`); returns how many.
    pub async fn prune_expired_join_tokens(&self, now: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM join_tokens WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
