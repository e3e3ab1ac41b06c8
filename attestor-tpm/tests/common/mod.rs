//! What the in-process attestation tests (attestor.rs, certify.rs) share.

use std::collections::HashMap;
use std::sync::Mutex;

use carapace_attestor_tpm::server::{NodeStateStore, TpmAttestor};
use carapace_core::Error;
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationSession, AttestationStep, NodeAttestor,
};

/// The datastore stand-in: a map (the server's real one is tested in its crate).
#[derive(Debug, Default)]
pub(crate) struct MemoryStore(pub(crate) Mutex<HashMap<String, Vec<u8>>>);

#[async_trait::async_trait]
impl NodeStateStore for MemoryStore {
    async fn load(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.0.lock().unwrap().get(key).cloned())
    }
    async fn save(&self, key: &str, data: &[u8]) -> Result<(), Error> {
        self.0.lock().unwrap().insert(key.into(), data.to_vec());
        Ok(())
    }
}

/// Runs `begin` (the server sees `ctx`), returning the challenge and the session.
pub(crate) async fn begin(
    server: &TpmAttestor,
    payload: &[u8],
    ctx: &AttestationContext,
) -> Result<(Vec<u8>, Box<dyn AttestationSession>), Error> {
    match server.begin(payload, ctx).await? {
        AttestationStep::Challenge { challenge, session } => Ok((challenge, session)),
        AttestationStep::Done(_) => panic!("tpm attestation must challenge"),
    }
}

/// The result of the final step.
pub(crate) fn done(step: AttestationStep) -> AttestationResult {
    match step {
        AttestationStep::Done(r) => r,
        AttestationStep::Challenge { .. } => panic!("one challenge only"),
    }
}
