//! The server's in-memory view of entries and agents, and the answer to "which entries
//! may this agent have" (the rules below), without touching the datastore.
//!
//! Invariant: every write of entries or agents goes through this type. It writes the
//! datastore first (one transaction) and only then updates the index and bumps the
//! revision, so the index never holds what the datastore refused. Writers are
//! serialised by one lock; readers never wait on the datastore.
//!
//! Authorization, for an agent with ID A and node selectors N:
//! 1. alias IDs: SPIFFE IDs of node-alias entries (parent = the server ID) whose
//!    selectors are a subset of N;
//! 2. authorized entries: entries whose parent is A or an alias ID, then, transitively,
//!    entries whose parent is the SPIFFE ID of an entry already authorized.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};

use tokio::sync::{Mutex, watch};

use carapace_core::{EntryId, RegistrationEntry, Selector, SpiffeId, TrustDomain};

use carapace_core::plugin::NodeAttestor;

use crate::datastore::{AttestedAgent, Cursor, Datastore, PresentedToken, Refusal, StateKey};
use crate::{Error, Result};

/// The most entries [`EntryCache::create_entries`] writes in one batch (one transaction).
pub const MAX_BATCH_ENTRIES: usize = 1_000;

/// The client SVID an agent calls the node API with, and when it calls.
#[derive(Debug, Clone, Copy)]
pub struct AgentCredential<'a> {
    /// The SVID's SPIFFE ID.
    pub id: &'a SpiffeId,
    /// Its serial, lowercase hex without leading zeros.
    pub serial_hex: &'a str,
    /// Its notAfter, unix seconds.
    pub not_after: i64,
    /// The time of the call, unix seconds.
    pub now: i64,
}

/// The entries filed under one key of the index. Nearly always one (a SPIFFE ID is
/// rarely issued by two entries): then without a heap allocation of its own, which at a
/// million entries is a million allocations fewer to make at load and free at exit.
#[derive(Debug)]
enum Ids {
    One(EntryId),
    Many(Vec<EntryId>),
}

impl Ids {
    fn push(&mut self, id: EntryId) {
        match self {
            Ids::One(first) => *self = Ids::Many(vec![first.clone(), id]),
            Ids::Many(v) => v.push(id),
        }
    }

    /// Removes `id`; returns whether none are left.
    fn remove(&mut self, id: &EntryId) -> bool {
        match self {
            Ids::One(only) => only == id,
            Ids::Many(v) => {
                v.retain(|x| x != id);
                v.is_empty()
            }
        }
    }
}

impl<'a> IntoIterator for &'a Ids {
    type Item = &'a EntryId;
    type IntoIter = std::slice::Iter<'a, EntryId>;
    fn into_iter(self) -> Self::IntoIter {
        match self {
            Ids::One(id) => std::slice::from_ref(id).iter(),
            Ids::Many(v) => v.iter(),
        }
    }
}

/// Files `id` under `key`.
fn file<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Ids>, key: K, id: EntryId) {
    match map.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().push(id),
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(Ids::One(id));
        }
    }
}

/// Takes `id` out from under `key`, and the key with it when nothing is left.
fn unfile<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Ids>, key: &K, id: &EntryId) {
    if map.get_mut(key).is_some_and(|ids| ids.remove(id)) {
        map.remove(key);
    }
}

/// The maps of the index hash with foldhash (seeded per process): several lookups per
/// entry at load, and per call after.
type HashMap<K, V> = foldhash::HashMap<K, V>;

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<EntryId, Arc<RegistrationEntry>>,
    by_parent: HashMap<SpiffeId, Ids>,
    /// Entries by their SPIFFE ID: the way up from an entry to its parents' entries.
    by_spiffe_id: HashMap<SpiffeId, Ids>,
    /// Node-alias entries, indexed by each of their selectors.
    aliases_by_selector: HashMap<Selector, Ids>,
    agents: HashMap<SpiffeId, Arc<AttestedAgent>>,
}

impl Index {
    /// Adds `e`, replacing the entry with its id if there is one.
    fn insert(&mut self, e: RegistrationEntry, server_id: &SpiffeId) {
        self.remove(&e.id, server_id);
        self.add(e, server_id);
    }

    /// Adds `e`, whose id the index does not hold (the bulk load: ids are the
    /// datastore's primary key, so each comes once).
    fn add(&mut self, e: RegistrationEntry, server_id: &SpiffeId) {
        let id = e.id.clone();
        file(&mut self.by_parent, e.parent_id.clone(), id.clone());
        file(&mut self.by_spiffe_id, e.spiffe_id.clone(), id.clone());
        if &e.parent_id == server_id {
            for s in e.selectors.iter() {
                file(&mut self.aliases_by_selector, s.clone(), id.clone());
            }
        }
        self.entries.insert(id, Arc::new(e));
    }

    fn remove(&mut self, id: &EntryId, server_id: &SpiffeId) {
        let Some(old) = self.entries.remove(id) else {
            return;
        };
        unfile(&mut self.by_parent, &old.parent_id, id);
        unfile(&mut self.by_spiffe_id, &old.spiffe_id, id);
        if &old.parent_id == server_id {
            for s in old.selectors.iter() {
                unfile(&mut self.aliases_by_selector, s, id);
            }
        }
    }
}

/// Entries and agents in memory, with change notification.
#[derive(Debug)]
pub struct EntryCache {
    td: TrustDomain,
    server_id: SpiffeId,
    ds: Datastore,
    index: RwLock<Index>,
    write_lock: Mutex<()>,
    revision: watch::Sender<u64>,
    /// The configured node attestors by name: asked what to forget when one of their
    /// agents is evicted.
    attestors: HashMap<String, Arc<dyn NodeAttestor>>,
    /// How far [`EntryCache::follow`] has applied the datastore's change logs. Changed
    /// only with `write_lock` held.
    cursor: std::sync::Mutex<Cursor>,
}

/// Every entry and agent, and the change-log cursor they reflect. The cursor is read
/// first: a write committed while the rows load is applied again by the next
/// [`EntryCache::follow`], never missed.
async fn load_index(ds: &Datastore, server_id: &SpiffeId) -> Result<(Cursor, Index)> {
    let cursor = ds.change_cursor().await?;
    let mut index = Index::default();
    ds.for_each_entry(|e| index.add(e, server_id)).await?;
    for a in ds.list_attested_agents().await? {
        index.agents.insert(a.spiffe_id.clone(), Arc::new(a));
    }
    Ok((cursor, index))
}

/// Events of each change log [`EntryCache::follow`] reads at a time.
const FOLLOW_BATCH: i64 = 10_000;

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Updates are single map operations under the write lock; a poisoned lock is consistent.
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl EntryCache {
    /// Loads every entry and agent from the datastore, with no node attestor to consult
    /// on eviction (tests and tools; the server uses [`EntryCache::load_with_attestors`]).
    pub async fn load(td: TrustDomain, ds: Datastore) -> Result<Arc<Self>> {
        Self::load_with_attestors(td, ds, &[]).await
    }

    /// Loads every entry and agent from the datastore; `attestors` are the configured
    /// node attestors, asked on eviction which of their records to forget
    /// ([`NodeAttestor::forget_on_eviction`]).
    pub async fn load_with_attestors(
        td: TrustDomain,
        ds: Datastore,
        attestors: &[Arc<dyn NodeAttestor>],
    ) -> Result<Arc<Self>> {
        let server_id = td.server_id();
        let started = std::time::Instant::now();
        let (cursor, index) = load_index(&ds, &server_id).await?;
        let rev = cursor.entry_event.max(0) as u64;
        let (revision, _) = watch::channel(rev);
        tracing::info!(
            entries = index.entries.len(),
            agents = index.agents.len(),
            took_ms = started.elapsed().as_millis(),
            "loaded the entry cache"
        );
        Ok(Arc::new(EntryCache {
            td,
            server_id,
            ds,
            index: RwLock::new(index),
            write_lock: Mutex::new(()),
            revision,
            attestors: attestors
                .iter()
                .map(|a| (a.name().to_owned(), a.clone()))
                .collect(),
            cursor: std::sync::Mutex::new(cursor),
        }))
    }

    /// Applies what was committed to the datastore since the last call, by this server
    /// or any other sharing the datastore: each entry and agent named in the change logs
    /// is read again and replaces (or, gone, leaves) the index. Bumps the revision when
    /// the index changed, so agents' streams get the new state. Returns how many entries
    /// and agents changed in the index.
    ///
    /// Holds the write lock, so a write of this server never interleaves: what the index
    /// holds never goes back to an older row.
    pub async fn follow(&self) -> Result<usize> {
        let _w = self.write_lock.lock().await;
        let mut changed = 0;
        loop {
            let cursor = *self.cursor.lock().unwrap_or_else(|p| p.into_inner());
            let changes = self.ds.changes_since(cursor, FOLLOW_BATCH).await?;
            if changes.reset {
                // Events after the cursor were pruned (this server fell a whole
                // retention period behind): reload everything.
                let (cursor, index) = load_index(&self.ds, &self.server_id).await?;
                tracing::warn!(
                    entries = index.entries.len(),
                    agents = index.agents.len(),
                    "changes this server had not applied were pruned from the change logs; \
                     reloaded the entry cache"
                );
                *write(&self.index) = index;
                *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = cursor;
                changed += 1;
                break;
            }
            if changes.is_empty() {
                break;
            }
            let entries = self.ds.entries_by_id(&changes.entries).await?;
            let agents = self.ds.agents_by_id(&changes.agents).await?;
            {
                let mut idx = write(&self.index);
                let found: HashSet<&EntryId> = entries.iter().map(|e| &e.id).collect();
                for id in changes.entries.iter().filter(|id| !found.contains(id)) {
                    if idx.entries.contains_key(id) {
                        idx.remove(id, &self.server_id);
                        changed += 1;
                    }
                }
                for e in entries {
                    if idx.entries.get(&e.id).is_none_or(|old| **old != e) {
                        idx.insert(e, &self.server_id);
                        changed += 1;
                    }
                }
                let found: HashSet<&SpiffeId> = agents.iter().map(|a| &a.spiffe_id).collect();
                for id in changes.agents.iter().filter(|id| !found.contains(id)) {
                    if idx.agents.remove(id).is_some() {
                        changed += 1;
                    }
                }
                for a in agents {
                    if idx.agents.get(&a.spiffe_id).is_none_or(|old| **old != a) {
                        idx.agents.insert(a.spiffe_id.clone(), Arc::new(a));
                        changed += 1;
                    }
                }
            }
            *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = changes.cursor;
            if !changes.more {
                break;
            }
        }
        if changed > 0 {
            tracing::debug!(changed, "applied datastore changes to the entry cache");
            self.bump();
        }
        Ok(changed)
    }

    /// The datastore behind the cache.
    pub fn datastore(&self) -> &Datastore {
        &self.ds
    }

    /// A receiver that changes whenever an entry or an agent changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    fn bump(&self) {
        self.revision.send_modify(|r| *r += 1);
    }

    /// Validates and stores a new entry.
    pub async fn create_entry(&self, e: RegistrationEntry) -> Result<Arc<RegistrationEntry>> {
        e.validate(&self.td)?;
        let _w = self.write_lock.lock().await;
        self.ds.create_entry(&e).await?;
        let stored = Arc::new(e.clone());
        write(&self.index).insert(e, &self.server_id);
        self.bump();
        Ok(stored)
    }

    /// Validates and stores a batch of at most [`MAX_BATCH_ENTRIES`] new entries in one
    /// datastore transaction, all or none (see [`Datastore::create_entries`]); then
    /// indexes them and bumps the revision once. Returns the stored entries in batch
    /// order, or `Ok(Err(..))` naming every refused entry by its position (and writing
    /// nothing). More entries than the limit: [`Error::InvalidArgument`].
    pub async fn create_entries(
        &self,
        batch: Vec<RegistrationEntry>,
    ) -> Result<std::result::Result<Vec<Arc<RegistrationEntry>>, Vec<(usize, Error)>>> {
        if batch.len() > MAX_BATCH_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "{} entries in one batch; at most {MAX_BATCH_ENTRIES} are allowed",
                batch.len()
            )));
        }
        let _w = self.write_lock.lock().await;
        let td = &self.td;
        if let Err(refused) = self
            .ds
            .create_entries(&batch, |e| Ok(e.validate(td)?))
            .await?
        {
            return Ok(Err(refused));
        }
        let stored: Vec<Arc<RegistrationEntry>> = batch.iter().cloned().map(Arc::new).collect();
        let mut index = write(&self.index);
        for e in batch {
            index.insert(e, &self.server_id);
        }
        drop(index);
        if !stored.is_empty() {
            self.bump();
        }
        Ok(Ok(stored))
    }

    /// Validates and replaces an entry (same id); returns the stored entry.
    pub async fn update_entry(&self, e: RegistrationEntry) -> Result<Arc<RegistrationEntry>> {
        e.validate(&self.td)?;
        let _w = self.write_lock.lock().await;
        let stored = self.ds.update_entry(&e).await?;
        write(&self.index).insert(stored.clone(), &self.server_id);
        self.bump();
        Ok(Arc::new(stored))
    }

    /// Deletes an entry; returns it.
    pub async fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry> {
        let _w = self.write_lock.lock().await;
        let old = self.ds.delete_entry(id).await?;
        write(&self.index).remove(id, &self.server_id);
        self.bump();
        Ok(old)
    }

    /// Creates a join token, and its alias entry if any, in one transaction.
    pub async fn create_join_token(
        &self,
        token_id: &str,
        secret_hash: &[u8; 32],
        expires_at: i64,
        now: i64,
        alias: Option<RegistrationEntry>,
    ) -> Result<()> {
        if let Some(a) = &alias {
            a.validate(&self.td)?;
        }
        let _w = self.write_lock.lock().await;
        self.ds
            .create_join_token(token_id, secret_hash, expires_at, now, alias.as_ref())
            .await?;
        if let Some(a) = alias {
            write(&self.index).insert(a, &self.server_id);
            self.bump();
        }
        Ok(())
    }

    /// Removes entries whose `expires_at` has passed.
    pub async fn prune_expired_entries(&self, now: i64) -> Result<usize> {
        let _w = self.write_lock.lock().await;
        let ids = self.ds.prune_expired_entries(now).await?;
        if !ids.is_empty() {
            let mut idx = write(&self.index);
            for id in &ids {
                idx.remove(id, &self.server_id);
            }
            drop(idx);
            self.bump();
        }
        Ok(ids.len())
    }

    /// An entry by id.
    pub fn get_entry(&self, id: &EntryId) -> Option<Arc<RegistrationEntry>> {
        read(&self.index).entries.get(id).cloned()
    }

    /// Whether an entry issuing `id`, marked `admin` and not expired at `now` (unix
    /// seconds), exists: who may call the admin API over TLS, asked on every call.
    pub fn has_admin_entry(&self, id: &SpiffeId, now: i64) -> bool {
        let idx = read(&self.index);
        idx.by_spiffe_id.get(id).into_iter().flatten().any(|eid| {
            idx.entries
                .get(eid)
                .is_some_and(|e| e.admin && e.expires_at.is_none_or(|t| t > now))
        })
    }

    /// Whether `id` is the SPIFFE ID of an entry marked `downstream` that has not
    /// expired at `now`: the upstream API ([`crate::upstream_api`]) signs CAs and takes
    /// JWT keys only from such callers.
    pub fn has_downstream_entry(&self, id: &SpiffeId, now: i64) -> bool {
        let idx = read(&self.index);
        idx.by_spiffe_id.get(id).into_iter().flatten().any(|eid| {
            idx.entries
                .get(eid)
                .is_some_and(|e| e.downstream && e.expires_at.is_none_or(|t| t > now))
        })
    }

    /// Number of entries.
    pub fn entry_count(&self) -> usize {
        read(&self.index).entries.len()
    }

    /// Stores (creates or replaces) an attested agent with its node selectors.
    pub async fn upsert_agent(&self, agent: AttestedAgent) -> Result<()> {
        self.attest_agent(agent, None).await
    }

    /// Records an attestation: stores the agent as [`upsert_agent`](Self::upsert_agent)
    /// does and consumes the join `token` it presented in the same datastore transaction
    /// ([`Datastore::attest_agent`]): both or neither.
    pub async fn attest_agent(
        &self,
        agent: AttestedAgent,
        token: Option<&PresentedToken>,
    ) -> Result<()> {
        let _w = self.write_lock.lock().await;
        self.ds.attest_agent(&agent, token).await?;
        if let Some(t) = token {
            // Only now: the delete is committed.
            tracing::info!(token_id = %t.id, agent = %agent.spiffe_id, "join token consumed");
        }
        write(&self.index)
            .agents
            .insert(agent.spiffe_id.clone(), Arc::new(agent));
        self.bump();
        Ok(())
    }

    /// Records a renewed agent SVID, not yet used by the agent.
    pub async fn set_agent_new_serial(
        &self,
        id: &SpiffeId,
        serial: &str,
        expires_at: i64,
    ) -> Result<()> {
        let _w = self.write_lock.lock().await;
        self.ds.set_agent_new_serial(id, serial, expires_at).await?;
        self.refresh_agent(id).await
    }

    /// Bans or unbans an agent. A banned agent is refused on every call and cannot
    /// attest again until unbanned.
    pub async fn set_agent_banned(
        &self,
        id: &SpiffeId,
        banned: bool,
    ) -> Result<Arc<AttestedAgent>> {
        let _w = self.write_lock.lock().await;
        let a = Arc::new(self.ds.set_agent_banned(id, banned).await?);
        write(&self.index).agents.insert(id.clone(), a.clone());
        self.bump();
        Ok(a)
    }

    /// Evicts an agent: it must attest again. What its node attestor names for eviction
    /// (a trust-on-first-use record) is deleted in the same transaction, so the node
    /// may attest again; an agent whose attestor is no longer configured leaves its
    /// records (the log says so).
    pub async fn evict_agent(&self, id: &SpiffeId) -> Result<()> {
        let _w = self.write_lock.lock().await;
        // The ID names the attestor that admitted the agent; for a composite (`tpm+kerberos`)
        // that is its first member. Only that member's record is forgotten, which is enough:
        // a composite holds no trust-on-first-use member (the config refuses them), so no
        // other member keeps a record that would refuse the node when it attests again.
        let forget = id.agent_parts().and_then(|(name, path)| {
            let Some(attestor) = self.attestors.get(name) else {
                tracing::warn!(
                    spiffe_id = %id,
                    attestor = name,
                    "evicting an agent of a node attestor that is not configured: any \
                     record it keeps of the node stays"
                );
                return None;
            };
            attestor.forget_on_eviction(path).map(|node_key| StateKey {
                attestor: name.to_owned(),
                node_key,
            })
        });
        self.ds.delete_attested_agent(id, forget.as_ref()).await?;
        write(&self.index).agents.remove(id);
        self.bump();
        Ok(())
    }

    async fn refresh_agent(&self, id: &SpiffeId) -> Result<()> {
        let a = self
            .ds
            .get_attested_agent(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("agent {id} not found")))?;
        write(&self.index).agents.insert(id.clone(), Arc::new(a));
        self.bump();
        Ok(())
    }

    /// An agent by SPIFFE ID.
    pub fn get_agent(&self, id: &SpiffeId) -> Option<Arc<AttestedAgent>> {
        read(&self.index).agents.get(id).cloned()
    }

    /// Every agent, sorted by SPIFFE ID.
    pub fn list_agents(&self) -> Vec<Arc<AttestedAgent>> {
        let mut v: Vec<_> = read(&self.index).agents.values().cloned().collect();
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        v
    }

    /// Records that `id`'s re-attestation was refused: every node-API call of the agent
    /// is refused from now on, and its open sync streams end, until it attests afresh.
    pub async fn mark_refused(&self, id: &SpiffeId, refusal: Refusal) -> Result<()> {
        let _w = self.write_lock.lock().await;
        let a = Arc::new(self.ds.set_agent_refused(id, &refusal).await?);
        write(&self.index).agents.insert(id.clone(), a);
        self.bump();
        Ok(())
    }

    /// Checks that the agent `cred` names may call the node API now: it is attested, not
    /// banned, its last re-attestation was not refused, the SVID it presents has not
    /// expired, and that SVID is its latest (or the renewal it was just given, which then
    /// becomes the latest).
    pub async fn authenticate_agent(
        &self,
        cred: &AgentCredential<'_>,
    ) -> Result<Arc<AttestedAgent>> {
        let agent = self.standing(cred)?;
        if agent.serial == cred.serial_hex {
            return Ok(agent);
        }
        if agent.new_serial.as_deref() == Some(cred.serial_hex) {
            let _w = self.write_lock.lock().await;
            self.ds
                .promote_agent_serial(cred.id, cred.serial_hex)
                .await?;
            self.refresh_agent(cred.id).await?;
            return self.standing(cred);
        }
        Err(Error::PermissionDenied(format!(
            "agent {} presented an SVID that is not its latest",
            cred.id
        )))
    }

    /// The rules of [`authenticate_agent`](Self::authenticate_agent) without promoting a
    /// renewal: for open streams, re-checked whenever an agent changes and when the SVID
    /// expires. The serial may be the current one or the pending renewal.
    pub fn still_authorized(&self, cred: &AgentCredential<'_>) -> Result<Arc<AttestedAgent>> {
        let agent = self.standing(cred)?;
        if agent.serial == cred.serial_hex || agent.new_serial.as_deref() == Some(cred.serial_hex) {
            Ok(agent)
        } else {
            Err(Error::PermissionDenied(format!(
                "agent {} presented an SVID that is not its latest (renewed or attested again)",
                cred.id
            )))
        }
    }

    /// Everything but the serial: attested, not banned, not refused, SVID not expired.
    fn standing(&self, cred: &AgentCredential<'_>) -> Result<Arc<AttestedAgent>> {
        let id = cred.id;
        let agent = self.get_agent(id).ok_or_else(|| {
            Error::PermissionDenied(format!("agent {id} is not attested (evicted?)"))
        })?;
        if agent.banned {
            return Err(Error::PermissionDenied(format!("agent {id} is banned")));
        }
        if let Some(r) = &agent.refused {
            return Err(Error::PermissionDenied(format!(
                "agent {id} failed re-attestation at unix time {} ({}); it must attest again",
                r.at, r.reason
            )));
        }
        if cred.now >= cred.not_after {
            return Err(Error::PermissionDenied(format!(
                "agent {id} presented an SVID that expired at unix time {}; it must attest again",
                cred.not_after
            )));
        }
        Ok(agent)
    }

    /// The entry `id` if `agent` is authorized for it (it is among
    /// [`Self::authorized_entries`]), found by walking up from the entry to the agent or
    /// a node alias of it instead of listing everything the agent may have: a signing
    /// call costs the depth of the entry's ancestry, not the agent's entry count.
    pub fn authorized_entry(&self, agent: &SpiffeId, id: &str) -> Option<Arc<RegistrationEntry>> {
        let idx = read(&self.index);
        let entry = idx.entries.get(&EntryId::new(id).ok()?)?.clone();
        let node_selectors = idx.agents.get(agent).map(|a| &a.selectors);
        let is_root = |sid: &SpiffeId| {
            sid == agent
                || node_selectors.is_some_and(|node| {
                    idx.by_spiffe_id.get(sid).into_iter().flatten().any(|aid| {
                        idx.entries.get(aid).is_some_and(|alias| {
                            alias.parent_id == self.server_id && alias.selectors.is_subset_of(node)
                        })
                    })
                })
        };
        let mut visited: HashSet<&SpiffeId> = HashSet::new();
        let mut queue: VecDeque<&SpiffeId> = VecDeque::from([&entry.parent_id]);
        while let Some(parent) = queue.pop_front() {
            if !visited.insert(parent) {
                continue;
            }
            if is_root(parent) {
                return Some(entry.clone());
            }
            for pid in idx.by_spiffe_id.get(parent).into_iter().flatten() {
                if let Some(p) = idx.entries.get(pid) {
                    queue.push_back(&p.parent_id);
                }
            }
        }
        None
    }

    /// The entries `agent` is authorized for, sorted by entry id.
    pub fn authorized_entries(&self, agent: &SpiffeId) -> Vec<Arc<RegistrationEntry>> {
        let idx = read(&self.index);
        let mut roots: Vec<SpiffeId> = vec![agent.clone()];
        if let Some(a) = idx.agents.get(agent) {
            let mut seen_alias: HashSet<&EntryId> = HashSet::new();
            for s in a.selectors.iter() {
                for alias_id in idx.aliases_by_selector.get(s).into_iter().flatten() {
                    if !seen_alias.insert(alias_id) {
                        continue;
                    }
                    if let Some(alias) = idx.entries.get(alias_id) {
                        if alias.selectors.is_subset_of(&a.selectors) {
                            roots.push(alias.spiffe_id.clone());
                        }
                    }
                }
            }
        }
        let mut visited: HashSet<SpiffeId> = roots.iter().cloned().collect();
        let mut queue: VecDeque<SpiffeId> = roots.into();
        let mut out: BTreeMap<EntryId, Arc<RegistrationEntry>> = BTreeMap::new();
        while let Some(parent) = queue.pop_front() {
            for eid in idx.by_parent.get(&parent).into_iter().flatten() {
                let Some(e) = idx.entries.get(eid) else {
                    continue;
                };
                if out.insert(eid.clone(), e.clone()).is_none()
                    && visited.insert(e.spiffe_id.clone())
                {
                    queue.push_back(e.spiffe_id.clone());
                }
            }
        }
        out.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_core::SelectorSet;

    fn sel(s: &[&str]) -> SelectorSet {
        s.iter().map(|x| x.parse::<Selector>().unwrap()).collect()
    }

    fn entry(id: &str, spiffe: &str, parent: &str, s: &[&str]) -> RegistrationEntry {
        RegistrationEntry {
            federates_with: Vec::new(),
            id: EntryId::new(id).unwrap(),
            spiffe_id: spiffe.parse().unwrap(),
            parent_id: parent.parse().unwrap(),
            selectors: sel(s),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            jwt_svid_include_jti: false,
            dns_names: vec![],
            hint: String::new(),
            admin: false,
            downstream: false,
            expires_at: None,
            revision: 0,
            created_at: 0,
        }
    }

    fn agent(id: &str, s: &[&str]) -> AttestedAgent {
        AttestedAgent {
            spiffe_id: id.parse().unwrap(),
            attestor: "join_token".into(),
            serial: "01".into(),
            new_serial: None,
            expires_at: 0,
            banned: false,
            reattestable: false,
            attested_at: 0,
            selectors: sel(s),
            refused: None,
        }
    }

    const A1: &str = "spiffe://example.org/spire/agent/join_token/a1";
    const A2: &str = "spiffe://example.org/spire/agent/join_token/a2";
    const SERVER: &str = "spiffe://example.org/spire/server";

    async fn cache() -> Arc<EntryCache> {
        let ds = Datastore::open_in_memory().await.unwrap();
        EntryCache::load(TrustDomain::new("example.org").unwrap(), ds)
            .await
            .unwrap()
    }

    fn ids(v: &[Arc<RegistrationEntry>]) -> Vec<&str> {
        v.iter().map(|e| e.id.as_str()).collect()
    }

    #[tokio::test]
    async fn direct_alias_and_descendant_entries_are_authorized() {
        let c = cache().await;
        c.upsert_agent(agent(A1, &["tpm:ek_pubhash:x", "region:eu"]))
            .await
            .unwrap();
        c.upsert_agent(agent(A2, &["region:us"])).await.unwrap();
        // Direct child of A1.
        c.create_entry(entry("e1", "spiffe://example.org/web", A1, &["unix:uid:1"]))
            .await
            .unwrap();
        // Node alias matching A1 (subset of its node selectors), and one needing more.
        c.create_entry(entry(
            "n1",
            "spiffe://example.org/eu-nodes",
            SERVER,
            &["region:eu"],
        ))
        .await
        .unwrap();
        c.create_entry(entry(
            "n2",
            "spiffe://example.org/eu-tpm-x-y",
            SERVER,
            &["region:eu", "tpm:ek_pubhash:y"],
        ))
        .await
        .unwrap();
        c.create_entry(entry(
            "e2",
            "spiffe://example.org/db",
            "spiffe://example.org/eu-nodes",
            &["unix:uid:2"],
        ))
        .await
        .unwrap();
        c.create_entry(entry(
            "e3",
            "spiffe://example.org/never",
            "spiffe://example.org/eu-tpm-x-y",
            &["unix:uid:3"],
        ))
        .await
        .unwrap();
        // Descendant of e2 (nested), and of A2 only.
        c.create_entry(entry(
            "e4",
            "spiffe://example.org/db/sidecar",
            "spiffe://example.org/db",
            &["unix:uid:4"],
        ))
        .await
        .unwrap();
        c.create_entry(entry("e5", "spiffe://example.org/us", A2, &["unix:uid:5"]))
            .await
            .unwrap();

        assert_eq!(
            ids(&c.authorized_entries(&A1.parse().unwrap())),
            ["e1", "e2", "e4"]
        );
        assert_eq!(ids(&c.authorized_entries(&A2.parse().unwrap())), ["e5"]);
        // The walk up from one entry agrees with the full list, entry by entry.
        for agent in [A1, A2, "spiffe://example.org/spire/agent/x/unknown"] {
            let agent: SpiffeId = agent.parse().unwrap();
            let listed = c.authorized_entries(&agent);
            let all = ids(&listed);
            for e in ["e1", "e2", "e3", "e4", "e5", "n1", "n2", "nope", "bad id!"] {
                assert_eq!(
                    c.authorized_entry(&agent, e).is_some(),
                    all.contains(&e),
                    "{agent} {e}"
                );
            }
        }
        // An agent that is not attested gets only what is parented to its ID directly.
        assert!(
            c.authorized_entries(&"spiffe://example.org/spire/agent/x/y".parse().unwrap())
                .is_empty()
        );
    }

    #[tokio::test]
    async fn cycles_terminate() {
        let c = cache().await;
        c.upsert_agent(agent(A1, &[])).await.unwrap();
        c.create_entry(entry("a", "spiffe://example.org/a", A1, &["x:1"]))
            .await
            .unwrap();
        c.create_entry(entry(
            "b",
            "spiffe://example.org/b",
            "spiffe://example.org/a",
            &["x:1"],
        ))
        .await
        .unwrap();
        c.create_entry(entry(
            "c",
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            &["x:2"],
        ))
        .await
        .unwrap();
        assert_eq!(
            ids(&c.authorized_entries(&A1.parse().unwrap())),
            ["a", "b", "c"]
        );
    }

    #[tokio::test]
    async fn updates_and_deletes_reindex_and_bump_the_revision() {
        let c = cache().await;
        c.upsert_agent(agent(A1, &[])).await.unwrap();
        let mut rx = c.subscribe();
        let r0 = *rx.borrow_and_update();
        c.create_entry(entry("e1", "spiffe://example.org/web", A1, &["unix:uid:1"]))
            .await
            .unwrap();
        assert!(rx.has_changed().unwrap());
        assert!(c.revision() > r0);
        let mut moved = entry("e1", "spiffe://example.org/web", A2, &["unix:uid:1"]);
        moved.revision = 99;
        let stored = c.update_entry(moved).await.unwrap();
        assert_eq!(
            stored.revision, 1,
            "revision bumped by the datastore, not the caller"
        );
        assert!(c.authorized_entries(&A1.parse().unwrap()).is_empty());
        assert_eq!(ids(&c.authorized_entries(&A2.parse().unwrap())), ["e1"]);
        c.delete_entry(&EntryId::new("e1").unwrap()).await.unwrap();
        assert!(c.authorized_entries(&A2.parse().unwrap()).is_empty());
        assert_eq!(c.entry_count(), 0);
    }

    #[tokio::test]
    async fn invalid_entries_write_nothing() {
        let c = cache().await;
        let before = c.revision();
        let bad = entry("e1", "spiffe://example.org/spire/x", A1, &["unix:uid:1"]);
        assert!(c.create_entry(bad).await.is_err());
        let foreign_parent = entry(
            "e2",
            "spiffe://example.org/x",
            "spiffe://other.org/agent",
            &["unix:uid:1"],
        );
        assert!(c.create_entry(foreign_parent).await.is_err());
        assert_eq!(c.entry_count(), 0);
        assert_eq!(c.revision(), before);
        assert_eq!(
            c.datastore()
                .count_entries(&Default::default())
                .await
                .unwrap(),
            0
        );
    }

    fn cred<'a>(id: &'a SpiffeId, serial: &'a str) -> AgentCredential<'a> {
        AgentCredential {
            id,
            serial_hex: serial,
            not_after: 2000,
            now: 1000,
        }
    }

    #[tokio::test]
    async fn agent_authentication_rules() {
        let c = cache().await;
        let id: SpiffeId = A1.parse().unwrap();
        c.upsert_agent(agent(A1, &[])).await.unwrap();
        c.authenticate_agent(&cred(&id, "01")).await.unwrap();
        let err = c
            .authenticate_agent(&cred(&id, "02"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not its latest"), "{err}");
        // Renewal: the new serial is accepted and promoted; the old one is then refused.
        c.set_agent_new_serial(&id, "02", 123).await.unwrap();
        c.authenticate_agent(&cred(&id, "01")).await.unwrap();
        c.still_authorized(&cred(&id, "02")).unwrap();
        c.authenticate_agent(&cred(&id, "02")).await.unwrap();
        assert!(c.authenticate_agent(&cred(&id, "01")).await.is_err());
        assert!(c.still_authorized(&cred(&id, "01")).is_err());
        c.set_agent_banned(&id, true).await.unwrap();
        let err = c
            .authenticate_agent(&cred(&id, "02"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("banned"), "{err}");
        assert!(c.still_authorized(&cred(&id, "02")).is_err());
        c.set_agent_banned(&id, false).await.unwrap();
        c.evict_agent(&id).await.unwrap();
        let err = c
            .authenticate_agent(&cred(&id, "02"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not attested"), "{err}");
    }

    #[tokio::test]
    async fn an_expired_svid_or_a_refused_reattestation_is_refused_until_a_fresh_attestation() {
        let c = cache().await;
        let id: SpiffeId = A1.parse().unwrap();
        c.upsert_agent(agent(A1, &[])).await.unwrap();
        // The SVID's own notAfter counts, whatever the handshake saw.
        let expired = AgentCredential {
            now: 2000,
            ..cred(&id, "01")
        };
        let err = c
            .authenticate_agent(&expired)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("expired at unix time 2000"), "{err}");
        assert!(c.still_authorized(&expired).is_err());

        // A pending renewal is dropped with the refusal: it cannot be promoted later.
        c.set_agent_new_serial(&id, "02", 3000).await.unwrap();
        let before = c.revision();
        c.mark_refused(
            &id,
            Refusal {
                at: 1500,
                reason: "PCR 7 has value 00".into(),
            },
        )
        .await
        .unwrap();
        assert!(c.revision() > before, "open streams are woken");
        for serial in ["01", "02"] {
            let err = c
                .authenticate_agent(&cred(&id, serial))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("failed re-attestation"), "{err}");
            assert!(err.contains("PCR 7"), "{err}");
        }
        let stored = c
            .datastore()
            .get_attested_agent(&id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.new_serial, None);
        assert_eq!(
            stored.refused,
            Some(Refusal {
                at: 1500,
                reason: "PCR 7 has value 00".into()
            })
        );
        // A fresh attestation (a new record) clears it.
        c.upsert_agent(AttestedAgent {
            serial: "03".into(),
            ..agent(A1, &[])
        })
        .await
        .unwrap();
        c.authenticate_agent(&cred(&id, "03")).await.unwrap();
        assert_eq!(
            c.datastore()
                .get_attested_agent(&id)
                .await
                .unwrap()
                .unwrap()
                .refused,
            None
        );
        // Unknown agents cannot be marked.
        let other: SpiffeId = A2.parse().unwrap();
        assert!(
            c.mark_refused(
                &other,
                Refusal {
                    at: 1,
                    reason: "x".into()
                }
            )
            .await
            .is_err()
        );
    }

    /// A node attestor that only has a name and, if `first_use`, names each node's record
    /// (keyed by agent path) for eviction, as the cloud attestors do.
    #[derive(Debug)]
    struct Named {
        name: &'static str,
        first_use: bool,
    }

    #[async_trait::async_trait]
    impl NodeAttestor for Named {
        fn name(&self) -> &str {
            self.name
        }

        async fn begin(
            &self,
            _: &[u8],
            _: &carapace_core::plugin::AttestationContext,
        ) -> Result<carapace_core::plugin::AttestationStep, carapace_core::Error> {
            Err(carapace_core::Error::AttestationRejected(
                "not in this test".into(),
            ))
        }

        fn forget_on_eviction(&self, agent_path: &str) -> Option<String> {
            self.first_use.then(|| agent_path.to_owned())
        }
    }

    #[tokio::test]
    async fn eviction_forgets_what_the_agents_attestor_names_and_nothing_else() {
        let ds = Datastore::open_in_memory().await.unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let attestors: Vec<Arc<dyn NodeAttestor>> = vec![
            Arc::new(Named {
                name: "cloudy",
                first_use: true,
            }),
            Arc::new(Named {
                name: "tpm",
                first_use: false,
            }),
        ];
        let c = EntryCache::load_with_attestors(td, ds.clone(), &attestors)
            .await
            .unwrap();
        // Three agents, each with a record of its node: one of a first-use attestor,
        // one of an attestor that keeps its records, one of an attestor no longer
        // configured.
        let agents = [("cloudy", "acct/i-1"), ("tpm", "ek1"), ("gone", "n1")];
        for (attestor, path) in agents {
            let id = format!("spiffe://example.org/spire/agent/{attestor}/{path}");
            c.upsert_agent(agent(&id, &[])).await.unwrap();
            assert!(
                ds.save_new_attestation_state(attestor, path, b"x")
                    .await
                    .unwrap()
            );
        }
        for (attestor, path) in agents {
            let id: SpiffeId = format!("spiffe://example.org/spire/agent/{attestor}/{path}")
                .parse()
                .unwrap();
            c.evict_agent(&id).await.unwrap();
            assert!(c.get_agent(&id).is_none());
            assert_eq!(ds.get_attested_agent(&id).await.unwrap(), None);
        }
        let left = |attestor, path| {
            let ds = ds.clone();
            async move { ds.load_attestation_state(attestor, path).await.unwrap() }
        };
        assert_eq!(
            left("cloudy", "acct/i-1").await,
            None,
            "the first-use record"
        );
        assert!(left("tpm", "ek1").await.is_some(), "the TPM's record stays");
        assert!(left("gone", "n1").await.is_some(), "unknown attestor: kept");
    }

    #[tokio::test]
    async fn reload_from_the_datastore_gives_the_same_answers() {
        let ds = Datastore::open_in_memory().await.unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let c = EntryCache::load(td.clone(), ds.clone()).await.unwrap();
        c.upsert_agent(agent(A1, &["region:eu"])).await.unwrap();
        c.create_entry(entry(
            "n1",
            "spiffe://example.org/eu",
            SERVER,
            &["region:eu"],
        ))
        .await
        .unwrap();
        c.create_entry(entry(
            "e1",
            "spiffe://example.org/w",
            "spiffe://example.org/eu",
            &["unix:uid:1"],
        ))
        .await
        .unwrap();
        let c2 = EntryCache::load(td, ds).await.unwrap();
        assert_eq!(ids(&c2.authorized_entries(&A1.parse().unwrap())), ["e1"]);
        assert!(c2.revision() >= 2);
    }

    // ------------------------------------------------------------ several servers

    /// The caches of two servers sharing one fresh PostgreSQL database.
    async fn two_servers() -> (
        Arc<EntryCache>,
        Arc<EntryCache>,
        Arc<hsm_sim::postgres::Postgres>,
    ) {
        let (mut stores, pg) = crate::datastore::testing::postgres_servers(2).await;
        let td = TrustDomain::new("example.org").unwrap();
        let b = EntryCache::load(td.clone(), stores.pop().unwrap())
            .await
            .unwrap();
        let a = EntryCache::load(td, stores.pop().unwrap()).await.unwrap();
        (a, b, pg)
    }

    fn sid(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_on_one_server_reaches_the_other_servers_index() {
        let (a, b, _pg) = two_servers().await;
        a.upsert_agent(agent(A1, &["region:eu"])).await.unwrap();
        a.create_entry(entry("w1", "spiffe://example.org/w1", A1, &["unix:uid:1"]))
            .await
            .unwrap();
        assert!(b.get_agent(&sid(A1)).is_none(), "not before following");
        let rev = b.revision();
        assert_eq!(b.follow().await.unwrap(), 2);
        assert!(b.revision() > rev, "the agents' streams are woken");
        assert_eq!(ids(&b.authorized_entries(&sid(A1))), ["w1"]);

        // A ban on A: B refuses the agent.
        a.set_agent_banned(&sid(A1), true).await.unwrap();
        b.follow().await.unwrap();
        assert!(b.get_agent(&sid(A1)).unwrap().banned);
        a.set_agent_banned(&sid(A1), false).await.unwrap();

        // An entry deleted on B leaves A's index.
        b.delete_entry(&EntryId::new("w1").unwrap()).await.unwrap();
        a.follow().await.unwrap();
        assert!(a.authorized_entries(&sid(A1)).is_empty());

        // An eviction on A: B forgets the agent.
        a.evict_agent(&sid(A1)).await.unwrap();
        b.follow().await.unwrap();
        assert!(b.get_agent(&sid(A1)).is_none());

        // Nothing new: nothing changes, no wake-up.
        let rev = b.revision();
        assert_eq!(b.follow().await.unwrap(), 0);
        assert_eq!(b.revision(), rev);
        // A server's own writes, read back, change nothing either.
        let rev = a.revision();
        assert_eq!(a.follow().await.unwrap(), 0);
        assert_eq!(a.revision(), rev);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_behind_the_pruned_change_logs_reloads_its_index() {
        let (a, b, _pg) = two_servers().await;
        a.upsert_agent(agent(A1, &[])).await.unwrap();
        a.create_entry(entry("w1", "spiffe://example.org/w1", A1, &["unix:uid:1"]))
            .await
            .unwrap();
        // Pruned before B followed: B cannot follow, it reloads.
        let now = carapace_core::clock::unix_now();
        a.datastore().prune_change_logs(now + 10).await.unwrap();
        let rev = b.revision();
        assert!(b.follow().await.unwrap() > 0);
        assert!(b.revision() > rev);
        assert_eq!(ids(&b.authorized_entries(&sid(A1))), ["w1"]);
        assert!(b.get_agent(&sid(A1)).is_some());
        // And follows on from there.
        a.create_entry(entry("w2", "spiffe://example.org/w2", A1, &["unix:uid:1"]))
            .await
            .unwrap();
        assert_eq!(b.follow().await.unwrap(), 1);
        assert_eq!(ids(&b.authorized_entries(&sid(A1))), ["w1", "w2"]);
    }

    /// Entries written on two servers at once, while both follow: every agent ends with
    /// exactly its entries on both servers (no change lost to commit order).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn entries_written_on_two_servers_at_once_reach_both_indexes_exactly() {
        let (a, b, _pg) = two_servers().await;
        let agents: Vec<String> = (0..4)
            .map(|i| format!("spiffe://example.org/spire/agent/join_token/n{i}"))
            .collect();
        for (i, id) in agents.iter().enumerate() {
            let on = if i % 2 == 0 { &a } else { &b };
            on.upsert_agent(agent(id, &[])).await.unwrap();
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let followers: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .map(|c| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        c.follow().await.unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let on = if w == 0 { a.clone() } else { b.clone() };
                let agents = agents.clone();
                tokio::spawn(async move {
                    for i in 0..60 {
                        let parent = &agents[(i + w) % 4];
                        let id = format!("w{w}-{i}");
                        on.create_entry(entry(
                            &id,
                            &format!("spiffe://example.org/{id}"),
                            parent,
                            &["unix:uid:1"],
                        ))
                        .await
                        .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for f in followers {
            f.await.unwrap();
        }
        a.follow().await.unwrap();
        b.follow().await.unwrap();
        for (n, parent) in agents.iter().enumerate() {
            let mut expected: Vec<String> = (0..2)
                .flat_map(|w| {
                    (0..60)
                        .filter(move |i| (i + w) % 4 == n)
                        .map(move |i| format!("w{w}-{i}"))
                })
                .collect();
            expected.sort();
            for (name, c) in [("A", &a), ("B", &b)] {
                let mut got: Vec<String> = c
                    .authorized_entries(&sid(parent))
                    .iter()
                    .map(|e| e.id.as_str().to_owned())
                    .collect();
                got.sort();
                assert_eq!(got, expected, "server {name}, agent {parent}");
            }
        }
        assert_eq!(a.entry_count(), 120);
        assert_eq!(b.entry_count(), 120);
    }
}
