//! What the in-process attestation tests (attestor.rs, certify.rs) share.

use carapace_attestor_tpm::server::TpmAttestor;
use carapace_core::Error;
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationSession, AttestationStep, NodeAttestor,
};

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

/// The message of a rejection; anything else fails the test.
#[allow(dead_code, reason = "not every test file uses every helper")]
pub(crate) fn rejected(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(e @ Error::AttestationRejected(_)) => e.to_string(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// The selectors of a result as `type:value` strings.
#[allow(dead_code, reason = "not every test file uses every helper")]
pub(crate) fn selectors(r: &AttestationResult) -> Vec<String> {
    r.selectors
        .iter()
        .map(|s| format!("{}:{}", s.kind(), s.value()))
        .collect()
}
