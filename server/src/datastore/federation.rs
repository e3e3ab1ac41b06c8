//! Federation relationships, their status, and the bundles of foreign trust domains.
//!
//! STUB: the signatures are settled; the bodies are being written (issue 19).

use carapace_core::{TrustBundle, TrustDomain};

use super::Datastore;
use crate::federation::{ForeignBundle, Relationship, Status, Stored};
use crate::{Error, Result};

fn not_yet() -> Error {
    Error::Datastore("federation storage is not built yet".into())
}

impl Datastore {
    /// Creates a relationship; `AlreadyExists` naming the trust domain if one exists.
    pub async fn create_federation(&self, _rel: &Relationship) -> Result<()> {
        Err(not_yet())
    }

    /// Replaces a relationship's URL and profile; `NotFound` if there is none.
    pub async fn update_federation(&self, _rel: &Relationship) -> Result<()> {
        Err(not_yet())
    }

    /// Makes the config file's relationships (`Source::Config`) exactly `rels`: creates
    /// or replaces each, and deletes the config relationships no longer named (with
    /// their status; their bundles stay, as a static bundle would). Fails, changing
    /// nothing, if one names a trust domain an API relationship already has.
    pub async fn replace_config_federations(&self, _rels: &[Relationship]) -> Result<()> {
        Err(not_yet())
    }

    /// Deletes a relationship, its status and its trust domain's bundle (SPIFFE
    /// Federation §6.3). Returns whether it existed.
    pub async fn delete_federation(&self, _td: &TrustDomain) -> Result<bool> {
        Err(not_yet())
    }

    /// One relationship and its status.
    pub async fn get_federation(
        &self,
        _td: &TrustDomain,
    ) -> Result<Option<(Relationship, Status)>> {
        Err(not_yet())
    }

    /// Every relationship and its status, by trust domain name.
    pub async fn list_federations(&self) -> Result<Vec<(Relationship, Status)>> {
        Err(not_yet())
    }

    /// Records what the refresh loop saw of a relationship (nothing if it was deleted).
    pub async fn set_federation_status(&self, _td: &TrustDomain, _status: &Status) -> Result<()> {
        Err(not_yet())
    }

    /// A foreign trust domain's bundle.
    pub async fn foreign_bundle(&self, _td: &TrustDomain) -> Result<Option<ForeignBundle>> {
        Err(not_yet())
    }

    /// Every foreign bundle, by trust domain name.
    pub async fn list_foreign_bundles(&self) -> Result<Vec<ForeignBundle>> {
        Err(not_yet())
    }

    /// Stores an operator's bundle (`bundle set`, a bootstrap bundle): it always
    /// replaces the stored one.
    pub async fn set_static_bundle(&self, _bundle: &TrustBundle, _now: i64) -> Result<()> {
        Err(not_yet())
    }

    /// Stores a fetched bundle if it is newer than the stored one (the sequence rule,
    /// decided inside the write transaction so two servers fetching at once agree).
    pub async fn store_fetched_bundle(&self, _bundle: &TrustBundle, _now: i64) -> Result<Stored> {
        Err(not_yet())
    }

    /// Deletes a foreign bundle. Returns whether it existed.
    pub async fn delete_foreign_bundle(&self, _td: &TrustDomain) -> Result<bool> {
        Err(not_yet())
    }
}
