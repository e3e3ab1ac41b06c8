//! What the in-process node attestation scenarios (B5, B7) share: a simulated TLS
//! connection and one challenge/response round of a plugin's two halves, each call timed
//! in wall and CPU time.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use carapace_core::plugin::{
    AttestationContext, AttestationStep, NodeAttestor, NodeAttestorClient, TLS_EXPORTER_LEN,
};

use crate::process::process_cpu_time;

/// One simulated TLS connection: both halves see the same 32 random bytes as exporter.
pub fn connection() -> AttestationContext {
    AttestationContext {
        agent_public_key: Vec::new(),
        tls_exporter: rand::random::<[u8; TLS_EXPORTER_LEN]>().to_vec(),
    }
}

/// The time one call took.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Took {
    /// Wall time.
    pub wall: Duration,
    /// This process's CPU time across the call.
    pub cpu: Duration,
}

/// `fut`'s output and the time it took.
pub async fn timed<T>(fut: impl Future<Output = T>) -> (T, Took) {
    let (t, c) = (Instant::now(), process_cpu_time());
    let out = fut.await;
    let took = Took {
        wall: t.elapsed(),
        cpu: process_cpu_time().saturating_sub(c),
    };
    (out, took)
}

/// The first round of a challenge/response attestation: agent `payload()`, server
/// `begin()` (which must challenge), agent `answer()`, server `respond()`.
#[derive(Debug)]
pub struct FirstRound {
    /// Agent `payload()`.
    pub payload: Took,
    /// Server `begin()`.
    pub begin: Took,
    /// Agent `answer()` to the first challenge.
    pub answer: Took,
    /// Server `respond()` to that answer.
    pub respond: Took,
    /// The answer's size.
    pub answer_bytes: usize,
    /// What `respond()` returned: the result, or a further challenge.
    pub step: AttestationStep,
}

/// Runs [`FirstRound`] on connection `ctx`.
pub async fn first_round(
    server: &dyn NodeAttestor,
    client: &dyn NodeAttestorClient,
    ctx: &AttestationContext,
) -> Result<FirstRound> {
    let (payload, payload_took) = timed(client.payload(ctx)).await;
    let payload = payload.context("agent payload()")?;
    let (step, begin) = timed(server.begin(&payload, ctx)).await;
    let AttestationStep::Challenge { challenge, session } = step.context("server begin()")? else {
        bail!(
            "{}: server begin() finished without a challenge",
            server.name()
        );
    };
    let (answer, answer_took) = timed(client.answer(&challenge, ctx)).await;
    let answer = answer.context("agent answer()")?;
    let (step, respond) = timed(session.respond(&answer)).await;
    Ok(FirstRound {
        payload: payload_took,
        begin,
        answer: answer_took,
        respond,
        answer_bytes: answer.len(),
        step: step.context("server respond()")?,
    })
}
