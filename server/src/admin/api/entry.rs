//! `CreateEntry`, `UpdateEntry`, `DeleteEntry`, `ListEntries`, `CountEntries`:
//! registration entries, written through the [`EntryCache`](crate::entry_cache::EntryCache).

use carapace_core::{EntryId, Selector};
use carapace_proto::admin::{
    CountEntriesResponse, CreateEntryRequest, DeleteEntryRequest, DeleteEntryResponse,
    ListEntriesRequest, ListEntriesResponse, UpdateEntryRequest,
};
use carapace_proto::convert::entry_from_wire;
use carapace_proto::types;

use super::AdminApi;
use super::fields::{new_entry_id, optional_id};
use crate::datastore::EntryFilter;
use carapace_core::clock::unix_now;

use crate::{Error, Result};

/// The datastore filter a `ListEntries` or `CountEntries` request asks for.
fn filter_from(req: &ListEntriesRequest) -> Result<EntryFilter> {
    let id = if req.id.is_empty() {
        None
    } else {
        Some(EntryId::new(&req.id).map_err(|e| Error::InvalidArgument(format!("filter id: {e}")))?)
    };
    let selectors = req
        .selectors
        .iter()
        .map(|s| {
            Selector::try_from(s)
                .map_err(|e| Error::InvalidArgument(format!("filter selectors: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EntryFilter {
        id,
        spiffe_id: optional_id("filter spiffe_id", &req.spiffe_id)?,
        parent_id: optional_id("filter parent_id", &req.parent_id)?,
        selectors,
    })
}

impl AdminApi {
    pub(super) async fn create_entry_inner(&self, req: CreateEntryRequest) -> Result<types::Entry> {
        let wire = req
            .entry
            .ok_or_else(|| Error::InvalidArgument("entry is required".into()))?;
        // The id, revision and creation time are the server's, whatever the client sent.
        let wire = types::Entry {
            id: String::new(),
            revision: 0,
            created_at: unix_now(),
            ..wire
        };
        let entry = entry_from_wire(&wire, Some(new_entry_id()?))?;
        let stored = self.cache.create_entry(entry).await?;
        tracing::info!(
            entry_id = %stored.id,
            spiffe_id = %stored.spiffe_id,
            parent_id = %stored.parent_id,
            "created registration entry"
        );
        Ok(types::Entry::from(stored.as_ref()))
    }

    pub(super) async fn update_entry_inner(&self, req: UpdateEntryRequest) -> Result<types::Entry> {
        let wire = req
            .entry
            .ok_or_else(|| Error::InvalidArgument("entry is required".into()))?;
        if wire.id.is_empty() {
            return Err(Error::InvalidArgument(
                "entry id is required to update an entry".into(),
            ));
        }
        let id = EntryId::new(&wire.id)?;
        let old = self
            .cache
            .get_entry(&id)
            .ok_or_else(|| Error::NotFound(format!("entry {id} not found")))?;
        let wire = types::Entry {
            created_at: old.created_at,
            revision: old.revision,
            ..wire
        };
        let entry = entry_from_wire(&wire, None)?;
        let stored = self.cache.update_entry(entry).await?;
        tracing::info!(
            entry_id = %stored.id,
            spiffe_id = %stored.spiffe_id,
            parent_id = %stored.parent_id,
            revision = stored.revision,
            "updated registration entry"
        );
        Ok(types::Entry::from(stored.as_ref()))
    }

    pub(super) async fn delete_entry_inner(
        &self,
        req: DeleteEntryRequest,
    ) -> Result<DeleteEntryResponse> {
        if req.id.is_empty() {
            return Err(Error::InvalidArgument("id is required".into()));
        }
        let id = EntryId::new(&req.id)?;
        let old = self.cache.delete_entry(&id).await?;
        tracing::info!(entry_id = %old.id, spiffe_id = %old.spiffe_id, "deleted registration entry");
        Ok(DeleteEntryResponse {})
    }

    pub(super) async fn list_entries_inner(
        &self,
        req: ListEntriesRequest,
    ) -> Result<ListEntriesResponse> {
        let filter = filter_from(&req)?;
        let entries = self.cache.datastore().list_entries(&filter).await?;
        Ok(ListEntriesResponse {
            entries: entries.iter().map(types::Entry::from).collect(),
        })
    }

    pub(super) async fn count_entries_inner(
        &self,
        req: ListEntriesRequest,
    ) -> Result<CountEntriesResponse> {
        let filter = filter_from(&req)?;
        Ok(CountEntriesResponse {
            count: self.cache.datastore().count_entries(&filter).await?,
        })
    }
}
