//! The setup the admin API's unit tests share (`tests` on the socket, `remote_tests` for
//! [`super::RemoteAdmin`]): a real CA with its keys in memory over an in-memory
//! datastore, and an [`AdminApi`] over it and an entry cache.

use std::sync::Arc;
use std::time::Duration;

use carapace_core::clock::unix_now;
use carapace_core::{KeyType, TrustDomain};
use carapace_keymanager_soft::MemoryKeyManager;

use super::{AdminApi, AdminSettings};
use crate::ca::{CaManager, CaSettings};
use crate::datastore::Datastore;
use crate::entry_cache::EntryCache;

/// The agent the tests' entries are under.
pub(super) const AGENT: &str = "spiffe://example.org/spire/agent/join_token/0011223344556677";

/// A CA for `td` (EC P-256, a day) over a new in-memory datastore, with its keys in a
/// new in-memory key manager: two calls give two CAs with different keys.
pub(super) async fn new_ca(td: &str) -> (Arc<CaManager>, Datastore) {
    let ds = Datastore::open_in_memory().await.unwrap();
    let ca = CaManager::load(
        TrustDomain::new(td).unwrap(),
        Arc::new(MemoryKeyManager::new()),
        None,
        ds.clone(),
        CaSettings {
            ca_ttl: Duration::from_secs(24 * 3600),
            key_type: KeyType::EcP256,
            organization: "Carapace".into(),
            country: "US".into(),
            jwt_key_type: KeyType::EcP256,
            server_id: "server-1".into(),
            path_len: 0,
        },
        unix_now(),
    )
    .await
    .unwrap();
    (ca, ds)
}

/// An [`AdminApi`] for `example.org` (SVIDs an hour, join tokens ten minutes by
/// default) over a new CA and an entry cache on the CA's datastore.
pub(super) async fn new_admin_api() -> (AdminApi, Arc<EntryCache>, Arc<CaManager>) {
    let (ca, ds) = new_ca("example.org").await;
    let cache = EntryCache::load(TrustDomain::new("example.org").unwrap(), ds)
        .await
        .unwrap();
    let api = AdminApi::new(
        cache.clone(),
        ca.clone(),
        AdminSettings {
            default_x509_svid_ttl: Duration::from_secs(3600),
            default_join_token_ttl: Duration::from_secs(600),
            jwt: Default::default(),
        },
    );
    (api, cache, ca)
}
