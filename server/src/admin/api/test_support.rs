//! The setup the admin API's unit tests share (`tests` on the socket, `remote_tests` for
//! [`super::RemoteAdmin`]): a real CA with its keys in memory over an in-memory
//! datastore, and an [`AdminApi`] over it and an entry cache.

use std::sync::Arc;
use std::time::Duration;

use carapace_core::TrustDomain;

use super::{AdminApi, AdminSettings};
use crate::ca::CaManager;
use crate::entry_cache::EntryCache;
pub(super) use crate::test_support::new_ca;

/// The agent the tests' entries are under.
pub(super) const AGENT: &str = "spiffe://example.org/spire/agent/join_token/0011223344556677";

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
