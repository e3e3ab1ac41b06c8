//! What the server's unit tests share across modules: a real CA with its keys in memory
//! over an in-memory datastore, and the connection info the listener records for a
//! caller.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use carapace_common::listener::ConnectionHandle;
use carapace_core::clock::unix_now;
use carapace_core::plugin::TLS_EXPORTER_LEN;
use carapace_core::{KeyType, TrustDomain};
use carapace_keymanager_soft::MemoryKeyManager;

use crate::ca::{CaManager, CaSettings};
use crate::datastore::Datastore;
use crate::node_api::{PeerInfo, PeerSvid, TlsExporter};

/// A CA for `td` (EC P-256, a day) over a new in-memory datastore, with its keys in a
/// new in-memory key manager: two calls give two CAs with different keys.
pub(crate) async fn new_ca(td: &str) -> (Arc<CaManager>, Datastore) {
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

/// The connection info of a caller presenting `chain` (as the listener records it).
pub(crate) fn peer(chain: Option<&[Vec<u8>]>) -> PeerInfo {
    let svid = chain.map(|chain| {
        let leaf = &chain[0];
        PeerSvid {
            id: carapace_core::x509svid::check_leaf(leaf).unwrap(),
            serial_hex: hex::encode(carapace_core::x509svid::serial_of(leaf).unwrap()),
            not_after: carapace_core::x509svid::validity_of(leaf).unwrap().1,
            chain: chain.to_vec().into(),
        }
    });
    PeerInfo {
        remote: "127.0.0.1:4000".parse().unwrap(),
        svid,
        tls_exporter: TlsExporter([0; TLS_EXPORTER_LEN]),
        connection: ConnectionHandle::new(None),
    }
}
