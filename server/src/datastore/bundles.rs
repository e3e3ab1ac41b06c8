//! Trust bundles (SPIFFE bundle JSON) and each server's CA journal (opaque bytes).
//!
//! Several servers may share the database. Each publishes its own part of the bundle
//! (`server_bundles`: its CAs and JWT keys) with [`Datastore::publish_bundle`], which in
//! the same write transaction recomputes the trust domain's bundle (`bundles`): the union
//! of every part, without what has expired, with a sequence one above the last. A part
//! whose every key has expired (a server that is gone) is deleted then. Every server
//! serves the union, so an SVID from any server verifies against the bundle any agent
//! holds.
//!
//! The SPIFFE bundle format has no member for a JWT key's expiry nor for a taint, so they
//! are kept beside it: `jwt_key_expiries`, a JSON array aligned with the bundle's JWT keys
//! in order, and `taints`, the indexes of the tainted X.509 authorities and the tainted
//! JWT kids. A bundle therefore reads back exactly as it was written.

use serde::{Deserialize, Serialize};

use carapace_core::{JwtKey, SpiffeId, TrustBundle, TrustDomain};

use super::{Changed, Datastore, Tx, WriteTx, corrupt, unix_now};
use crate::{Error, Result};

/// What an operator tainted in a bundle, as stored in `taints`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Taints {
    /// Indexes into the bundle's X.509 authorities.
    #[serde(default)]
    x509: Vec<usize>,
    /// JWT key ids.
    #[serde(default)]
    jwt_kids: Vec<String>,
}

/// A bundle as its three columns.
struct Stored {
    data: String,
    jwt_key_expiries: String,
    taints: String,
}

fn encode(bundle: &TrustBundle) -> Result<Stored> {
    let data = bundle.to_spiffe_json()?;
    let expiries: Vec<Option<i64>> = bundle
        .jwt_authorities
        .iter()
        .map(|k| k.expires_at)
        .collect();
    let taints = Taints {
        x509: bundle
            .x509_authorities
            .iter()
            .enumerate()
            .filter(|(_, der)| bundle.tainted_x509_authorities.contains(der))
            .map(|(i, _)| i)
            .collect(),
        jwt_kids: bundle.tainted_jwt_kids.clone(),
    };
    let json = |what: &str, r: serde_json::Result<String>| {
        r.map_err(|e| Error::Datastore(format!("encoding {what}: {e}")))
    };
    Ok(Stored {
        data,
        jwt_key_expiries: json("JWT key expiries", serde_json::to_string(&expiries))?,
        taints: json("taints", serde_json::to_string(&taints))?,
    })
}

fn decode(td: &TrustDomain, at: &str, row: Stored) -> Result<TrustBundle> {
    let mut bundle =
        TrustBundle::from_spiffe_json(td.clone(), &row.data).map_err(|e| corrupt(at, e))?;
    let expiries: Vec<Option<i64>> = serde_json::from_str(&row.jwt_key_expiries)
        .map_err(|e| corrupt(at, format!("jwt_key_expiries: {e}")))?;
    if expiries.len() != bundle.jwt_authorities.len() {
        return Err(corrupt(
            at,
            format!(
                "{} JWT key expiries for {} JWT keys",
                expiries.len(),
                bundle.jwt_authorities.len()
            ),
        ));
    }
    for (key, expires_at) in bundle.jwt_authorities.iter_mut().zip(expiries) {
        key.expires_at = expires_at;
    }
    let taints: Taints =
        serde_json::from_str(&row.taints).map_err(|e| corrupt(at, format!("taints: {e}")))?;
    for i in taints.x509 {
        let der = bundle
            .x509_authorities
            .get(i)
            .ok_or_else(|| corrupt(at, format!("taints: no X.509 authority {i}")))?;
        bundle.tainted_x509_authorities.push(der.clone());
    }
    bundle.tainted_jwt_kids = taints
        .jwt_kids
        .into_iter()
        .filter(|kid| bundle.jwt_authorities.iter().any(|k| &k.kid == kid))
        .collect();
    Ok(bundle)
}

/// Whether a CA certificate is still valid at `now` (one that does not parse is kept:
/// it is the part's owner that put it there).
fn unexpired_cert(der: &[u8], now: i64) -> bool {
    carapace_core::x509svid::validity_of(der).map_or(true, |(_, not_after)| not_after > now)
}

/// The union of `parts` (each `(own, part)`) at `now`: every X.509 authority and JWT
/// key once, in the parts' order, with their taints; `sequence` and the first part's
/// refresh hint. What has expired is left out of the other servers' parts; the calling
/// server's own part (`own`) is taken whole, since its CA lifecycle already drops what it
/// no longer trusts.
pub(super) fn merge(
    td: &TrustDomain,
    parts: &[(bool, TrustBundle)],
    now: i64,
    sequence: u64,
) -> TrustBundle {
    let mut out = TrustBundle::new(td.clone());
    out.sequence = sequence;
    out.refresh_hint = parts.iter().find_map(|(_, p)| p.refresh_hint);
    for (own, part) in parts {
        for der in &part.x509_authorities {
            if (*own || unexpired_cert(der, now)) && !out.x509_authorities.contains(der) {
                out.x509_authorities.push(der.clone());
            }
        }
        for key in &part.jwt_authorities {
            let live = *own || key.expires_at.is_none_or(|t| t > now);
            if live && !out.jwt_authorities.iter().any(|k| k.kid == key.kid) {
                out.jwt_authorities.push(key.clone());
            }
        }
    }
    for (_, part) in parts {
        for der in &part.tainted_x509_authorities {
            if out.x509_authorities.contains(der) && !out.tainted_x509_authorities.contains(der) {
                out.tainted_x509_authorities.push(der.clone());
            }
        }
        for kid in &part.tainted_jwt_kids {
            if out.jwt_authorities.iter().any(|k| &k.kid == kid)
                && !out.tainted_jwt_kids.contains(kid)
            {
                out.tainted_jwt_kids.push(kid.clone());
            }
        }
    }
    out
}

/// Whether nothing in `part` is still valid at `now`.
fn all_expired(part: &TrustBundle, now: i64) -> bool {
    part.x509_authorities
        .iter()
        .all(|der| !unexpired_cert(der, now))
        && part
            .jwt_authorities
            .iter()
            .all(|k| k.expires_at.is_some_and(|t| t <= now))
}

async fn read_bundle(conn: &mut Tx, td: &TrustDomain) -> Result<Option<TrustBundle>> {
    let row: Option<(String, String, String)> = on_tx!(conn, c => {
        sqlx::query_as(
            "SELECT data, jwt_key_expiries, taints FROM bundles WHERE trust_domain = $1",
        )
        .bind(td.name())
        .fetch_optional(c)
        .await
    })?;
    row.map(|(data, jwt_key_expiries, taints)| {
        decode(
            td,
            &format!("bundles trust_domain={:?}", td.name()),
            Stored {
                data,
                jwt_key_expiries,
                taints,
            },
        )
    })
    .transpose()
}

async fn own_journal(conn: &mut Tx, server_id: &str) -> Result<Option<Vec<u8>>> {
    Ok(on_tx!(conn, c => {
        sqlx::query_scalar("SELECT data FROM server_ca_journals WHERE server_id = $1")
            .bind(server_id)
            .fetch_optional(c)
            .await
    })?)
}

/// The `server_bundles` id of downstream server `id`'s part (its JWT keys, published
/// through the upstream API).
pub(crate) fn downstream_part_id(id: &SpiffeId) -> String {
    format!("downstream:{id}")
}

/// Stores `part` as `part_id`'s part of the bundle and the trust domain's bundle as the
/// union of every part at `now`, within `tx`. The parts named in `own` are taken whole,
/// the others without what has expired; another part whose every key expired is
/// deleted. The sequence moves one up only when the union differs from the last.
async fn write_part_and_union(
    tx: &mut WriteTx,
    part_id: &str,
    part: &TrustBundle,
    own: &[&str],
    now: i64,
) -> Result<TrustBundle> {
    let td = part.trust_domain().clone();
    let stored = encode(part)?;
    on_tx!(&mut *tx, c => sqlx::query(
        "INSERT INTO server_bundles (server_id, data, jwt_key_expiries, taints, updated_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (server_id) DO UPDATE SET \
         data = excluded.data, jwt_key_expiries = excluded.jwt_key_expiries, \
         taints = excluded.taints, updated_at = excluded.updated_at",
    )
    .bind(part_id)
    .bind(stored.data.as_str())
    .bind(stored.jwt_key_expiries.as_str())
    .bind(stored.taints.as_str())
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    let rows: Vec<(String, String, String, String)> = on_tx!(&mut *tx, c => {
        sqlx::query_as(
            "SELECT server_id, data, jwt_key_expiries, taints FROM server_bundles \
             ORDER BY server_id",
        )
        .fetch_all(c)
        .await
    })?;
    let mut parts = Vec::new();
    for (id, data, jwt_key_expiries, taints) in rows {
        let at = format!("server_bundles server_id={id:?}");
        let p = decode(
            &td,
            &at,
            Stored {
                data,
                jwt_key_expiries,
                taints,
            },
        )?;
        let is_own = own.contains(&id.as_str());
        if id != part_id && all_expired(&p, now) {
            on_tx!(&mut *tx, c => sqlx::query("DELETE FROM server_bundles WHERE server_id = $1")
                .bind(id.as_str())
                .execute(c)
                .await
                .map(|r| r.rows_affected()))?;
            tracing::info!(server_id = %id, "dropped the bundle part of a server whose every key expired");
            continue;
        }
        parts.push((is_own, p));
    }
    let last = read_bundle(tx, &td).await?;
    let last_sequence = last.as_ref().map_or(0, |b| b.sequence);
    if let Some(last) = last
        && merge(&td, &parts, now, last_sequence) == last
    {
        // Nothing changed: the sequence stays (a restart is no bundle change).
        return Ok(last);
    }
    let union = merge(&td, &parts, now, last_sequence.saturating_add(1));
    let stored = encode(&union)?;
    tx.changes(Changed::Bundle);
    on_tx!(&mut *tx, c => sqlx::query(
        "INSERT INTO bundles (trust_domain, data, jwt_key_expiries, taints) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (trust_domain) DO UPDATE SET \
         data = excluded.data, jwt_key_expiries = excluded.jwt_key_expiries, \
         taints = excluded.taints",
    )
    .bind(td.name())
    .bind(stored.data.as_str())
    .bind(stored.jwt_key_expiries.as_str())
    .bind(stored.taints.as_str())
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(union)
}

impl Datastore {
    /// The trust domain's bundle: the union of every server's part.
    pub async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<TrustBundle>> {
        let mut tx = self.begin_read().await?;
        let bundle = read_bundle(&mut tx, td).await?;
        tx.commit().await?;
        Ok(bundle)
    }

    /// Stores `own` as server `server_id`'s part of the bundle and, in the same
    /// transaction, the trust domain's bundle as the union of every part at `now` (see
    /// the module), with a sequence one above the last when it differs from the last.
    /// Returns that union.
    pub async fn publish_bundle(
        &self,
        server_id: &str,
        own: &TrustBundle,
        now: i64,
    ) -> Result<TrustBundle> {
        let mut tx = self.begin_write().await?;
        let union = write_part_and_union(&mut tx, server_id, own, &[server_id], now).await?;
        tx.commit().await?;
        Ok(union)
    }

    /// Adds `key` to the part of the bundle of downstream server `downstream` (nested
    /// servers; stored under [`downstream_part_id`]) on behalf of server `server_id`, and
    /// recomputes the trust domain's bundle as [`Self::publish_bundle`] does, in one
    /// transaction. The part keeps a key once per `kid` (the one published last wins),
    /// only keys unexpired at `now`, and at most `max_keys` of them, those that expire
    /// last. Returns the union.
    pub async fn publish_downstream_jwt_key(
        &self,
        server_id: &str,
        td: &TrustDomain,
        downstream: &SpiffeId,
        key: &JwtKey,
        max_keys: usize,
        now: i64,
    ) -> Result<TrustBundle> {
        let part_id = downstream_part_id(downstream);
        let mut tx = self.begin_write().await?;
        let row: Option<(String, String, String)> = on_tx!(&mut tx, c => {
            sqlx::query_as(
                "SELECT data, jwt_key_expiries, taints FROM server_bundles WHERE server_id = $1",
            )
            .bind(part_id.as_str())
            .fetch_optional(c)
            .await
        })?;
        let mut part = match row {
            Some((data, jwt_key_expiries, taints)) => decode(
                td,
                &format!("server_bundles server_id={part_id:?}"),
                Stored {
                    data,
                    jwt_key_expiries,
                    taints,
                },
            )?,
            None => TrustBundle::new(td.clone()),
        };
        part.jwt_authorities
            .retain(|k| k.kid != key.kid && k.expires_at.is_none_or(|t| t > now));
        // Newest first: the key just published, then the others by expiry, latest first.
        part.jwt_authorities
            .sort_by_key(|k| std::cmp::Reverse(k.expires_at.unwrap_or(i64::MAX)));
        part.jwt_authorities.insert(0, key.clone());
        let dropped: Vec<String> = part
            .jwt_authorities
            .drain(max_keys.max(1).min(part.jwt_authorities.len())..)
            .map(|k| k.kid)
            .collect();
        if !dropped.is_empty() {
            tracing::info!(downstream = %downstream, ?dropped, "dropped older JWT keys of a downstream server");
        }
        part.tainted_jwt_kids.clear();
        part.tainted_x509_authorities.clear();
        part.x509_authorities.clear();
        let union = write_part_and_union(
            &mut tx,
            &part_id,
            &part,
            &[part_id.as_str(), server_id],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(union)
    }

    /// Server `server_id`'s CA journal, if it has one. A server without one claims the
    /// journal the database kept from before several servers could share it (schema
    /// version 6), if any: at most one server gets it.
    pub async fn load_ca_journal(&self, server_id: &str) -> Result<Option<Vec<u8>>> {
        let mut tx = self.begin_read().await?;
        let found = own_journal(&mut tx, server_id).await?;
        tx.commit().await?;
        if found.is_some() || server_id.is_empty() {
            return Ok(found);
        }
        let mut tx = self.begin_write().await?;
        let claimed = on_tx!(&mut tx, c => sqlx::query(
            "UPDATE server_ca_journals SET server_id = $1 WHERE server_id = '' \
             AND NOT EXISTS (SELECT 1 FROM server_ca_journals WHERE server_id = $1)",
        )
        .bind(server_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        let found = own_journal(&mut tx, server_id).await?;
        tx.commit().await?;
        if claimed > 0 {
            tracing::info!(
                server_id,
                "claimed the CA journal kept from a single-server datastore"
            );
        }
        Ok(found)
    }

    /// Replaces server `server_id`'s CA journal.
    pub async fn save_ca_journal(&self, server_id: &str, data: &[u8]) -> Result<()> {
        on_pool!(&self.pool, p => sqlx::query(
            "INSERT INTO server_ca_journals (server_id, data, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (server_id) DO UPDATE SET data = excluded.data, \
             updated_at = excluded.updated_at",
        )
        .bind(server_id)
        .bind(data)
        .bind(unix_now())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }
}
