//! Trust bundles (SPIFFE bundle JSON) and the CA journal (opaque bytes).
//!
//! The SPIFFE bundle format has no member for a JWT key's expiry, so the expiries are
//! kept beside it in `bundles.jwt_key_expiries`: a JSON array aligned with the bundle's
//! JWT keys in order. A bundle therefore reads back exactly as it was written.

use carapace_core::{TrustBundle, TrustDomain};

use super::{Datastore, corrupt, unix_now};
use crate::{Error, Result};

impl Datastore {
    /// The bundle of trust domain `td`, if stored.
    pub async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<TrustBundle>> {
        let row: Option<(String, String)> = on_pool!(&self.pool, p => {
            sqlx::query_as("SELECT data, jwt_key_expiries FROM bundles WHERE trust_domain = $1")
                .bind(td.name())
                .fetch_optional(p)
                .await
        })?;
        let Some((data, expiries)) = row else {
            return Ok(None);
        };
        let at = format!("bundles trust_domain={:?}", td.name());
        let mut bundle =
            TrustBundle::from_spiffe_json(td.clone(), &data).map_err(|e| corrupt(&at, e))?;
        let expiries: Vec<Option<i64>> = serde_json::from_str(&expiries)
            .map_err(|e| corrupt(&at, format!("jwt_key_expiries: {e}")))?;
        if expiries.len() != bundle.jwt_authorities.len() {
            return Err(corrupt(
                &at,
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
        Ok(Some(bundle))
    }

    /// Stores the bundle of its trust domain, replacing any stored one.
    pub async fn set_bundle(&self, bundle: &TrustBundle) -> Result<()> {
        let data = bundle.to_spiffe_json()?;
        let expiries: Vec<Option<i64>> = bundle
            .jwt_authorities
            .iter()
            .map(|k| k.expires_at)
            .collect();
        let expiries = serde_json::to_string(&expiries)
            .map_err(|e| Error::Datastore(format!("encoding JWT key expiries: {e}")))?;
        on_pool!(&self.pool, p => sqlx::query(
            "INSERT INTO bundles (trust_domain, data, jwt_key_expiries) VALUES ($1, $2, $3) \
             ON CONFLICT (trust_domain) DO UPDATE SET data = excluded.data, \
             jwt_key_expiries = excluded.jwt_key_expiries",
        )
        .bind(bundle.trust_domain().name())
        .bind(data.as_str())
        .bind(expiries.as_str())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// The CA journal, if one was saved.
    pub async fn load_ca_journal(&self) -> Result<Option<Vec<u8>>> {
        Ok(on_pool!(&self.pool, p => {
            sqlx::query_scalar("SELECT data FROM ca_journal WHERE id = 1")
                .fetch_optional(p)
                .await
        })?)
    }

    /// Saves the CA journal, replacing the previous one.
    pub async fn save_ca_journal(&self, data: &[u8]) -> Result<()> {
        on_pool!(&self.pool, p => sqlx::query(
            "INSERT INTO ca_journal (id, data, updated_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET data = excluded.data, \
             updated_at = excluded.updated_at",
        )
        .bind(data)
        .bind(unix_now())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }
}
