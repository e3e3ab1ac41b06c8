//! An agent speaking the node API directly (the agent library's TLS and attestation
//! code, a key in memory), for tests that look at the node API's messages themselves.
//! Included by `#[path]` from the test files that use it.

use std::sync::Arc;

use carapace_agent::node_attestor::JoinTokenClient;
use carapace_agent::node_client;
use carapace_core::plugin::{KeyManager, KeySigner};
use carapace_core::{KeyType, TrustBundle};
use carapace_e2e::{Server, td};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_proto::node::node_client::NodeClient;
use tokio::sync::watch;
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// An attested agent: its SPIFFE ID, SVID chain and key, the bundle and its server.
pub(crate) struct TestAgent {
    pub(crate) id: String,
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) key: Arc<dyn KeySigner>,
    pub(crate) bundle: watch::Receiver<Arc<TrustBundle>>,
    pub(crate) address: String,
}

impl TestAgent {
    /// A node API client presenting the agent's SVID.
    pub(crate) fn client(&self) -> NodeClient<Channel> {
        let ck = carapace_tls::certified_key(&self.chain, self.key.clone());
        let tls =
            carapace_tls::client_config(self.bundle.clone(), td().server_id(), Some(ck)).unwrap();
        node_client::channel(&self.address, Arc::new(tls)).unwrap()
    }
}

/// Attests a new agent to `server` with a fresh join token, its key `name` in `km`.
pub(crate) async fn attest(server: &Server, km: &MemoryKeyManager, name: &str) -> TestAgent {
    let (token, id) = server.token();
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(bundle));
    let tls = carapace_tls::client_config(rx.clone(), td().server_id(), None).unwrap();
    let key = km.generate_key(name, KeyType::EcP256).await.unwrap();
    let csr = carapace_tls::csr_for_key(key.clone()).unwrap();
    let result = node_client::attest(
        &server.address,
        Arc::new(tls),
        &JoinTokenClient::new(Zeroizing::new(token)),
        csr,
        key.public_key_der(),
    )
    .await
    .unwrap();
    TestAgent {
        id,
        chain: result.svid.unwrap().cert_chain,
        key,
        bundle: rx,
        address: server.address.clone(),
    }
}
