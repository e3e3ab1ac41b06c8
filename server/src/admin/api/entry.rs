//! `CreateEntry`, `BatchCreateEntry`, `UpdateEntry`, `DeleteEntry`, `ListEntries`,
//! `CountEntries`:
//! registration entries, written through the [`EntryCache`](crate::entry_cache::EntryCache).

use carapace_core::{EntryId, Selector};
use carapace_proto::admin::{
    BatchCreateEntryRequest, BatchCreateEntryResponse, BatchCreateEntryResult,
    CountEntriesResponse, CreateEntryRequest, DeleteEntryRequest, DeleteEntryResponse,
    ListEntriesRequest, ListEntriesResponse, UpdateEntryRequest,
};
use carapace_proto::convert::entry_from_wire;
use carapace_proto::types;

use super::AdminApi;
use super::fields::{new_entry_id, optional_id};
use crate::datastore::EntryFilter;
use crate::entry_cache::MAX_BATCH_ENTRIES;
use carapace_core::clock::unix_now;

use crate::{Error, Result};

/// A position in a batch (at most [`MAX_BATCH_ENTRIES`]) as the wire's `uint32`.
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

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

    /// `BatchCreateEntry`: every entry converted and checked, then all written in one
    /// transaction or none. A refused entry gets its code and reason in its result.
    /// Entries that do not convert (a malformed SPIFFE ID, a negative TTL) are named
    /// first: the datastore's checks run only once every entry converts.
    pub(super) async fn batch_create_entry_inner(
        &self,
        req: BatchCreateEntryRequest,
    ) -> Result<BatchCreateEntryResponse> {
        let n = req.entries.len();
        if n > MAX_BATCH_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "{n} entries in one BatchCreateEntry request; at most {MAX_BATCH_ENTRIES} are \
                 allowed"
            )));
        }
        let now = unix_now();
        let mut refused: Vec<(usize, Error)> = Vec::new();
        let mut batch = Vec::with_capacity(n);
        for (i, wire) in req.entries.into_iter().enumerate() {
            // The id may be the client's (SPIRE's `entry_id`); revision and creation time
            // are the server's.
            let wire = types::Entry {
                revision: 0,
                created_at: now,
                ..wire
            };
            match entry_from_wire(&wire, Some(new_entry_id()?)) {
                Ok(e) => batch.push(e),
                Err(e) => refused.push((i, e.into())),
            }
        }
        if refused.is_empty() {
            match self.cache.create_entries(batch).await? {
                Ok(stored) => {
                    tracing::info!(
                        entries = stored.len(),
                        "created a batch of registration entries"
                    );
                    let results = stored
                        .iter()
                        .enumerate()
                        .map(|(i, e)| BatchCreateEntryResult {
                            index: index_u32(i),
                            entry: Some(types::Entry::from(e.as_ref())),
                            code: 0,
                            message: String::new(),
                        })
                        .collect();
                    return Ok(BatchCreateEntryResponse {
                        created: true,
                        results,
                    });
                }
                Err(r) => refused = r,
            }
        }
        tracing::info!(
            entries = n,
            refused = refused.len(),
            "refused a batch of registration entries; nothing written"
        );
        let mut results: Vec<BatchCreateEntryResult> = (0..n)
            .map(|i| BatchCreateEntryResult {
                index: index_u32(i),
                entry: None,
                code: 0,
                message: String::new(),
            })
            .collect();
        for (i, e) in refused {
            let status = tonic::Status::from(e);
            if let Some(r) = results.get_mut(i) {
                r.code = status.code() as i32;
                r.message = status.message().to_owned();
            }
        }
        Ok(BatchCreateEntryResponse {
            created: false,
            results,
        })
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
