//! Federation relationships, their status, and the bundles of foreign trust domains
//! (schema version 8: `federation_relationships`, `federated_bundles`).
//!
//! # Relationships
//!
//! One row per foreign trust domain, keyed by its name. A relationship's status (what the
//! refresh loop last saw) is kept in the same row, so it goes with it. Relationships from
//! the config file (`source = 'config'`) are replaced as a set at start
//! ([`Datastore::replace_config_federations`]); those of the admin API (`source = 'api'`)
//! one by one. A trust domain has at most one relationship, of one source:
//! [`Datastore::update_federation`] refuses to change the source, and the config file
//! cannot name a trust domain the API manages.
//!
//! # Foreign bundles
//!
//! Stored as SPIFFE bundle JSON (the format has no member for a JWT key's expiry nor for
//! a taint: a foreign bundle has neither, and a bundle passed with them reads back
//! without). A bundle is stored *static* (an operator's: [`Datastore::set_static_bundle`]
//! always replaces the stored one) or *fetched* from the relationship's bundle endpoint.
//! A fetched bundle is stored by this rule ([`Datastore::store_fetched_bundle`]), decided
//! inside the write transaction, so two servers fetching at once agree and the sequence
//! never goes back:
//!
//! 1. No bundle is stored (and a relationship exists): it is stored (`Replaced`).
//! 2. The stored bundle has the same keys (X.509 authorities and JWT keys, in any order):
//!    `Unchanged`. If the fetched one has a higher sequence or another refresh hint,
//!    those are written (the keys are not); the origin stays.
//! 3. The fetched bundle has no sequence (0: a peer that sends no `spiffe_sequence`,
//!    such as SPIRE): the newest wins, SPIFFE Federation §4.2 (`Replaced`).
//! 4. Its sequence is higher than the stored one's: `Replaced`.
//! 5. Its sequence is lower (a peer that rebuilt its datastore restarts its sequence),
//!    or equal with other keys: `Refused`, saying why; the stored bundle stays. An
//!    operator recovers with `bundle set`.
//!
//! A static bundle is replaced by a fetched one by the same rule. A fetched bundle for a
//! trust domain without a relationship (deleted while the fetch ran) is refused: deleting
//! a relationship deletes its bundle (SPIFFE Federation §6.3), and a late fetch must not
//! bring it back.
//!
//! # Notifications
//!
//! Every transaction here that changes a relationship or a foreign bundle sends the
//! `federation` notification on PostgreSQL ([`Changed::Federation`], seen by a follower
//! as [`super::Woken::federation`]). Status writes send none: no server holds the status
//! in memory, each reads it when shown, and the refresh loop writes it at every poll.

use std::collections::{BTreeMap, BTreeSet};

use carapace_core::{TrustBundle, TrustDomain};

use super::{Changed, Datastore, Tx, corrupt, is_unique_violation, parse_spiffe_id, unix_now};
use crate::federation::{ForeignBundle, Origin, Profile, Relationship, Source, Status, Stored};
use crate::{Error, Result};

/// Selects every relationship row, as [`RelRow`]s.
macro_rules! select_rels {
    ($($where:literal)?) => {
        concat!(
            "SELECT trust_domain, url, profile, endpoint_spiffe_id, web_roots_pem, source, \
             last_success_at, last_error, last_error_at, next_refresh_at \
             FROM federation_relationships",
            $($where)?
        )
    };
}

/// One row of `federation_relationships`.
#[derive(sqlx::FromRow)]
struct RelRow {
    trust_domain: String,
    url: String,
    profile: String,
    endpoint_spiffe_id: Option<String>,
    web_roots_pem: Option<String>,
    source: String,
    last_success_at: Option<i64>,
    last_error: Option<String>,
    last_error_at: Option<i64>,
    next_refresh_at: Option<i64>,
}

fn decode_rel(row: RelRow) -> Result<(Relationship, Status)> {
    let at = format!(
        "federation_relationships trust_domain={:?}",
        row.trust_domain
    );
    let trust_domain = TrustDomain::new(&row.trust_domain).map_err(|e| corrupt(&at, e))?;
    let profile = match (row.profile.as_str(), row.endpoint_spiffe_id) {
        ("https_web", None) => Profile::HttpsWeb {
            roots_pem: row.web_roots_pem,
        },
        ("https_spiffe", Some(id)) => Profile::HttpsSpiffe {
            endpoint_id: parse_spiffe_id(&at, &id)?,
        },
        (p, id) => {
            return Err(corrupt(
                &at,
                format!("profile {p:?} with endpoint_spiffe_id {id:?}"),
            ));
        }
    };
    let source = match row.source.as_str() {
        "config" => Source::Config,
        "api" => Source::Api,
        s => return Err(corrupt(&at, format!("source {s:?}"))),
    };
    Ok((
        Relationship {
            trust_domain,
            url: row.url,
            profile,
            source,
        },
        Status {
            last_success_at: row.last_success_at,
            last_error: row.last_error,
            last_error_at: row.last_error_at,
            next_refresh_at: row.next_refresh_at,
        },
    ))
}

/// The profile's columns: `(profile, endpoint_spiffe_id, web_roots_pem)`.
fn profile_columns(p: &Profile) -> (&'static str, Option<String>, Option<String>) {
    match p {
        Profile::HttpsWeb { roots_pem } => (p.name(), None, roots_pem.clone()),
        Profile::HttpsSpiffe { endpoint_id } => (p.name(), Some(endpoint_id.to_string()), None),
    }
}

/// Every relationship, by trust domain name (sorted here: the engines' collations differ).
async fn read_rels(conn: &mut Tx, td: Option<&TrustDomain>) -> Result<Vec<(Relationship, Status)>> {
    let rows: Vec<RelRow> = match td {
        Some(td) => on_tx!(conn, c => {
            sqlx::query_as(select_rels!(" WHERE trust_domain = $1"))
                .bind(td.name())
                .fetch_all(c)
                .await
        })?,
        None => on_tx!(conn, c => sqlx::query_as(select_rels!()).fetch_all(c).await)?,
    };
    let mut out = rows
        .into_iter()
        .map(decode_rel)
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.0.trust_domain.name().cmp(b.0.trust_domain.name()));
    Ok(out)
}

/// Inserts `rel` (created and updated at `now`).
async fn insert_rel(conn: &mut Tx, rel: &Relationship, now: i64) -> sqlx::Result<u64> {
    let (profile, endpoint_id, roots) = profile_columns(&rel.profile);
    on_tx!(conn, c => sqlx::query(
        "INSERT INTO federation_relationships (trust_domain, url, profile, endpoint_spiffe_id, \
         web_roots_pem, source, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
    )
    .bind(rel.trust_domain.name())
    .bind(rel.url.as_str())
    .bind(profile)
    .bind(endpoint_id)
    .bind(roots)
    .bind(rel.source.as_str())
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))
}

/// Replaces the URL and profile of `rel`'s row (its source and status stay).
async fn update_rel(conn: &mut Tx, rel: &Relationship, now: i64) -> sqlx::Result<u64> {
    let (profile, endpoint_id, roots) = profile_columns(&rel.profile);
    on_tx!(conn, c => sqlx::query(
        "UPDATE federation_relationships SET url = $2, profile = $3, endpoint_spiffe_id = $4, \
         web_roots_pem = $5, updated_at = $6 WHERE trust_domain = $1",
    )
    .bind(rel.trust_domain.name())
    .bind(rel.url.as_str())
    .bind(profile)
    .bind(endpoint_id)
    .bind(roots)
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))
}

async fn delete_rel(conn: &mut Tx, td: &TrustDomain) -> sqlx::Result<u64> {
    on_tx!(conn, c => sqlx::query("DELETE FROM federation_relationships WHERE trust_domain = $1")
        .bind(td.name())
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
}

async fn delete_bundle(conn: &mut Tx, td: &TrustDomain) -> sqlx::Result<u64> {
    on_tx!(conn, c => sqlx::query("DELETE FROM federated_bundles WHERE trust_domain = $1")
        .bind(td.name())
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
}

/// One row of `federated_bundles`.
#[derive(sqlx::FromRow)]
struct BundleRow {
    trust_domain: String,
    data: String,
    origin: String,
    updated_at: i64,
}

fn decode_bundle(row: BundleRow) -> Result<ForeignBundle> {
    let at = format!("federated_bundles trust_domain={:?}", row.trust_domain);
    let td = TrustDomain::new(&row.trust_domain).map_err(|e| corrupt(&at, e))?;
    let bundle = TrustBundle::from_spiffe_json(td, &row.data).map_err(|e| corrupt(&at, e))?;
    let origin = match row.origin.as_str() {
        "fetched" => Origin::Fetched,
        "static" => Origin::Static,
        o => return Err(corrupt(&at, format!("origin {o:?}"))),
    };
    Ok(ForeignBundle {
        bundle,
        origin,
        updated_at: row.updated_at,
    })
}

async fn read_bundles(conn: &mut Tx, td: Option<&TrustDomain>) -> Result<Vec<ForeignBundle>> {
    let rows: Vec<BundleRow> = match td {
        Some(td) => on_tx!(conn, c => {
            sqlx::query_as(
                "SELECT trust_domain, data, origin, updated_at FROM federated_bundles \
                 WHERE trust_domain = $1",
            )
            .bind(td.name())
            .fetch_all(c)
            .await
        })?,
        None => on_tx!(conn, c => {
            sqlx::query_as("SELECT trust_domain, data, origin, updated_at FROM federated_bundles")
                .fetch_all(c)
                .await
        })?,
    };
    let mut out = rows
        .into_iter()
        .map(decode_bundle)
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| {
        a.bundle
            .trust_domain()
            .name()
            .cmp(b.bundle.trust_domain().name())
    });
    Ok(out)
}

/// `bundle` as stored: its SPIFFE bundle JSON, and the bundle that JSON reads back as
/// (without JWT key expiries and taints, which the format cannot carry).
fn encode_bundle(bundle: &TrustBundle) -> Result<(String, TrustBundle)> {
    let data = bundle.to_spiffe_json()?;
    let read_back = TrustBundle::from_spiffe_json(bundle.trust_domain().clone(), &data)?;
    Ok((data, read_back))
}

/// The `sequence` column's value: the bundle's, saturated at the largest BIGINT.
fn sequence_column(b: &TrustBundle) -> i64 {
    i64::try_from(b.sequence).unwrap_or(i64::MAX)
}

/// Writes `bundle` (encoded as `data`) as `td`'s bundle, replacing any.
async fn upsert_bundle(
    conn: &mut Tx,
    bundle: &TrustBundle,
    data: &str,
    origin: Origin,
    now: i64,
) -> sqlx::Result<u64> {
    on_tx!(conn, c => sqlx::query(
        "INSERT INTO federated_bundles (trust_domain, data, sequence, origin, updated_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (trust_domain) DO UPDATE SET \
         data = excluded.data, sequence = excluded.sequence, origin = excluded.origin, \
         updated_at = excluded.updated_at",
    )
    .bind(bundle.trust_domain().name())
    .bind(data)
    .bind(sequence_column(bundle))
    .bind(origin.as_str())
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))
}

/// Whether two bundles hold the same X.509 authorities and JWT keys, in any order.
fn same_keys(a: &TrustBundle, b: &TrustBundle) -> bool {
    let x509 = |t: &TrustBundle| t.x509_authorities.iter().cloned().collect::<BTreeSet<_>>();
    let jwt = |t: &TrustBundle| {
        t.jwt_authorities
            .iter()
            .map(|k| (k.kid.clone(), k.public_key_der.clone()))
            .collect::<BTreeSet<_>>()
    };
    a.x509_authorities.len() == b.x509_authorities.len()
        && a.jwt_authorities.len() == b.jwt_authorities.len()
        && x509(a) == x509(b)
        && jwt(a) == jwt(b)
}

/// What the sequence rule (see the module) decides for `new` over `stored`.
enum Decision {
    Store,
    /// The same keys: write `new`'s sequence and hint if they differ.
    SameKeys,
    Refuse(String),
}

fn decide(stored: &TrustBundle, new: &TrustBundle) -> Decision {
    let td = new.trust_domain();
    if same_keys(stored, new) {
        Decision::SameKeys
    } else if new.sequence == 0 || new.sequence > stored.sequence {
        Decision::Store
    } else if new.sequence < stored.sequence {
        Decision::Refuse(format!(
            "trust domain {td}: the fetched bundle's sequence {} is lower than the stored \
             bundle's {}: kept the stored one (a peer that rebuilt its datastore restarts \
             its sequence: `bundle set` accepts its bundle)",
            new.sequence, stored.sequence
        ))
    } else {
        Decision::Refuse(format!(
            "trust domain {td}: the fetched bundle has the stored bundle's sequence {} but \
             other keys: kept the stored one (a peer must raise the sequence when its keys \
             change)",
            new.sequence
        ))
    }
}

impl Datastore {
    /// Creates a relationship; `AlreadyExists` naming the trust domain if one exists.
    pub async fn create_federation(&self, rel: &Relationship) -> Result<()> {
        let mut tx = self.begin_write().await?;
        tx.changes(Changed::Federation);
        insert_rel(&mut tx, rel, unix_now()).await.map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists(format!(
                    "a federation relationship with trust domain {} already exists",
                    rel.trust_domain
                ))
            } else {
                e.into()
            }
        })?;
        tx.commit().await
    }

    /// Replaces a relationship's URL and profile; `NotFound` if there is none.
    ///
    /// Its source stays: `FailedPrecondition` if `rel.source` is not the stored one (the
    /// admin API cannot take over a relationship of the config file, nor the reverse).
    /// Its status stays too.
    pub async fn update_federation(&self, rel: &Relationship) -> Result<()> {
        let td = &rel.trust_domain;
        let mut tx = self.begin_write().await?;
        let Some((stored, _)) = read_rels(&mut tx, Some(td)).await?.into_iter().next() else {
            return Err(no_relationship(td));
        };
        if stored.source != rel.source {
            return Err(Error::FailedPrecondition(format!(
                "the federation relationship with trust domain {td} is managed through {}",
                managed_through(stored.source)
            )));
        }
        if stored != *rel {
            tx.changes(Changed::Federation);
            update_rel(&mut tx, rel, unix_now()).await?;
        }
        tx.commit().await
    }

    /// Makes the config file's relationships (`Source::Config`) exactly `rels`: creates
    /// or replaces each, and deletes the config relationships no longer named (with
    /// their status; their bundles stay, as a static bundle would). Fails, changing
    /// nothing, if one names a trust domain an API relationship already has.
    ///
    /// Also fails (`InvalidArgument`, changing nothing) if one of `rels` is not of
    /// `Source::Config` or two name one trust domain. A relationship that is already
    /// stored as given is not rewritten (its `updated_at` stays).
    pub async fn replace_config_federations(&self, rels: &[Relationship]) -> Result<()> {
        let mut wanted = BTreeMap::new();
        for rel in rels {
            let td = &rel.trust_domain;
            if rel.source != Source::Config {
                return Err(Error::InvalidArgument(format!(
                    "federation relationship with trust domain {td}: not from the config file"
                )));
            }
            if wanted.insert(td.name().to_owned(), rel).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "the config file names trust domain {td} in two federation relationships"
                )));
            }
        }
        let mut tx = self.begin_write().await?;
        tx.changes(Changed::Federation);
        let stored: BTreeMap<String, Relationship> = read_rels(&mut tx, None)
            .await?
            .into_iter()
            .map(|(r, _)| (r.trust_domain.name().to_owned(), r))
            .collect();
        for (name, rel) in &wanted {
            if let Some(old) = stored.get(name)
                && old.source == Source::Api
            {
                return Err(Error::FailedPrecondition(format!(
                    "the config file names a federation relationship with trust domain {}, \
                     which is managed through the admin API: remove it from the config \
                     file, or delete it with `carapace-server federation delete \
                     --trust-domain {}` first",
                    rel.trust_domain, rel.trust_domain
                )));
            }
        }
        let now = unix_now();
        for (name, rel) in &wanted {
            match stored.get(name) {
                None => {
                    insert_rel(&mut tx, rel, now).await?;
                }
                Some(old) if old != *rel => {
                    update_rel(&mut tx, rel, now).await?;
                }
                Some(_) => {}
            }
        }
        for (name, old) in &stored {
            if old.source == Source::Config && !wanted.contains_key(name) {
                delete_rel(&mut tx, &old.trust_domain).await?;
            }
        }
        tx.commit().await
    }

    /// Deletes a relationship, its status and its trust domain's bundle (SPIFFE
    /// Federation §6.3). Returns whether it existed.
    pub async fn delete_federation(&self, td: &TrustDomain) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        tx.changes(Changed::Federation);
        let existed = delete_rel(&mut tx, td).await? > 0;
        if existed {
            delete_bundle(&mut tx, td).await?;
        }
        tx.commit().await?;
        Ok(existed)
    }

    /// One relationship and its status.
    pub async fn get_federation(&self, td: &TrustDomain) -> Result<Option<(Relationship, Status)>> {
        let mut tx = self.begin_read().await?;
        let found = read_rels(&mut tx, Some(td)).await?;
        tx.commit().await?;
        Ok(found.into_iter().next())
    }

    /// Every relationship and its status, by trust domain name.
    pub async fn list_federations(&self) -> Result<Vec<(Relationship, Status)>> {
        let mut tx = self.begin_read().await?;
        let all = read_rels(&mut tx, None).await?;
        tx.commit().await?;
        Ok(all)
    }

    /// Records what the refresh loop saw of a relationship (nothing if it was deleted).
    ///
    /// One statement outside a write transaction, sending no notification (see the
    /// module).
    pub async fn set_federation_status(&self, td: &TrustDomain, status: &Status) -> Result<()> {
        on_pool!(&self.pool, p => sqlx::query(
            "UPDATE federation_relationships SET last_success_at = $2, last_error = $3, \
             last_error_at = $4, next_refresh_at = $5 WHERE trust_domain = $1",
        )
        .bind(td.name())
        .bind(status.last_success_at)
        .bind(status.last_error.as_deref())
        .bind(status.last_error_at)
        .bind(status.next_refresh_at)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// A foreign trust domain's bundle.
    pub async fn foreign_bundle(&self, td: &TrustDomain) -> Result<Option<ForeignBundle>> {
        let mut tx = self.begin_read().await?;
        let found = read_bundles(&mut tx, Some(td)).await?;
        tx.commit().await?;
        Ok(found.into_iter().next())
    }

    /// Every foreign bundle, by trust domain name.
    pub async fn list_foreign_bundles(&self) -> Result<Vec<ForeignBundle>> {
        let mut tx = self.begin_read().await?;
        let all = read_bundles(&mut tx, None).await?;
        tx.commit().await?;
        Ok(all)
    }

    /// Stores an operator's bundle (`bundle set`, a bootstrap bundle): it always
    /// replaces the stored one.
    pub async fn set_static_bundle(&self, bundle: &TrustBundle, now: i64) -> Result<()> {
        let (data, _) = encode_bundle(bundle)?;
        let mut tx = self.begin_write().await?;
        tx.changes(Changed::Federation);
        upsert_bundle(&mut tx, bundle, &data, Origin::Static, now).await?;
        tx.commit().await
    }

    /// Stores a fetched bundle if it is newer than the stored one (the sequence rule,
    /// decided inside the write transaction so two servers fetching at once agree).
    ///
    /// The rule is the module's. A bundle for a trust domain without a relationship is
    /// refused (`Stored::Refused`).
    pub async fn store_fetched_bundle(&self, bundle: &TrustBundle, now: i64) -> Result<Stored> {
        let td = bundle.trust_domain();
        let (data, new) = encode_bundle(bundle)?;
        let mut tx = self.begin_write().await?;
        tx.changes(Changed::Federation);
        if read_rels(&mut tx, Some(td)).await?.is_empty() {
            tx.commit().await?;
            return Ok(Stored::Refused(format!(
                "there is no federation relationship with trust domain {td} (deleted while \
                 its bundle was fetched?): its bundle is not stored"
            )));
        }
        let stored = read_bundles(&mut tx, Some(td)).await?.into_iter().next();
        let outcome = match stored {
            None => {
                upsert_bundle(&mut tx, &new, &data, Origin::Fetched, now).await?;
                Stored::Replaced
            }
            Some(stored) => match decide(&stored.bundle, &new) {
                Decision::Store => {
                    upsert_bundle(&mut tx, &new, &data, Origin::Fetched, now).await?;
                    Stored::Replaced
                }
                Decision::SameKeys => {
                    let mut kept = stored.bundle.clone();
                    kept.sequence = kept.sequence.max(new.sequence);
                    kept.refresh_hint = new.refresh_hint;
                    if kept != stored.bundle {
                        let (data, _) = encode_bundle(&kept)?;
                        upsert_bundle(&mut tx, &kept, &data, stored.origin, now).await?;
                    }
                    Stored::Unchanged
                }
                Decision::Refuse(why) => Stored::Refused(why),
            },
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Deletes a foreign bundle. Returns whether it existed.
    pub async fn delete_foreign_bundle(&self, td: &TrustDomain) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        tx.changes(Changed::Federation);
        let existed = delete_bundle(&mut tx, td).await? > 0;
        tx.commit().await?;
        Ok(existed)
    }
}

fn no_relationship(td: &TrustDomain) -> Error {
    Error::NotFound(format!(
        "there is no federation relationship with trust domain {td}"
    ))
}

fn managed_through(source: Source) -> &'static str {
    match source {
        Source::Config => "the config file",
        Source::Api => "the admin API",
    }
}
