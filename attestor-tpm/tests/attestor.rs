//! The two halves of `tpm` attestation together, in process, against swtpm: what the
//! server's `TpmAttestor` accepts and each refusal the issue lists, with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;
use carapace_core::plugin::{MemoryStateStore as MemoryStore, NodeStateStore as _};
use common::{begin, done};

use std::sync::Arc;

use carapace_attestor_tpm::agent::{TpmAgentConfig, TpmAttestorClient};
use carapace_attestor_tpm::device::TpmDevice;
use carapace_attestor_tpm::server::{TpmAttestor, TpmServerConfig};
use carapace_attestor_tpm::wire::{self, Challenge, Response};
use carapace_core::Error;
use carapace_core::clock::ManualClock;
use carapace_core::plugin::{
    AttestationContext, AttestationResult, NodeAttestorClient, PluginContext,
};
use hsm_sim::swtpm::{Swtpm, TpmManufacturer};

fn ctx() -> AttestationContext {
    AttestationContext {
        agent_public_key: Vec::new(),
        tls_exporter: vec![0; 32],
    }
}

fn tpm() -> Swtpm {
    Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap()
}

fn lab_roots() -> TpmServerConfig {
    let m = TpmManufacturer::shared().unwrap();
    TpmServerConfig {
        ek_ca_files: vec![m.ek_ca_root(), m.ek_ca_intermediate()],
        pcrs: vec![0, 1, 2, 3, 4, 5, 6, 7],
        ..TpmServerConfig::default()
    }
}

fn server(cfg: &TpmServerConfig, store: Arc<MemoryStore>) -> TpmAttestor {
    TpmAttestor::new(cfg, &PluginContext::for_tests("/"), store).unwrap()
}

fn client(tpm: &Swtpm) -> TpmAttestorClient {
    TpmAttestorClient::new(&TpmAgentConfig {
        tcti: Some(tpm.tcti()),
        ..Default::default()
    })
}

/// A whole attestation.
async fn attest(
    server: &TpmAttestor,
    client: &TpmAttestorClient,
) -> Result<AttestationResult, Error> {
    let (challenge, session) = begin(server, &client.payload(&ctx()).await?, &ctx()).await?;
    let answer = client.answer(&challenge, &ctx()).await?;
    session.respond(&answer).await.map(done)
}

fn rejected(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(e @ (Error::AttestationRejected(_) | Error::AttestationReplay(_))) => e.to_string(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_tpm_attests_with_selectors_and_may_reattest() {
    let tpm = tpm();
    let store = Arc::new(MemoryStore::default());
    let server = server(&lab_roots(), store.clone());
    let c = client(&tpm);
    let r = attest(&server, &c).await.unwrap();
    assert_eq!(r.agent_path.len(), 64, "agent path is the EK hash");
    assert!(r.can_reattest);
    let sel: Vec<String> = r
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.kind(), s.value()))
        .collect();
    assert!(
        sel.contains(&format!("tpm:ek_pubhash:{}", r.agent_path)),
        "{sel:?}"
    );
    assert!(
        sel.iter().any(|s| s.starts_with("tpm:ek_cert_issuer_cn:")),
        "{sel:?}"
    );
    assert!(
        sel.iter().any(|s| s.starts_with("tpm:ek_cert_serial:")),
        "{sel:?}"
    );
    for i in 0..8 {
        assert!(
            sel.iter()
                .any(|s| s.starts_with(&format!("tpm:pcr:sha256:{i}:"))),
            "{sel:?}"
        );
    }
    // The same TPM attests again (renewal): its clock moved forward.
    let again = attest(&server, &c).await.unwrap();
    assert_eq!(again.agent_path, r.agent_path);
    assert_eq!(store.len(), 1, "one clock record per EK");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_ek_is_refused() {
    let tpm = tpm();
    // Roots of another manufacturer only.
    let other = TpmManufacturer::new().unwrap();
    let cfg = TpmServerConfig {
        ek_ca_files: vec![other.ek_ca_root()],
        ..lab_roots()
    };
    let err = rejected(attest(&server(&cfg, Arc::default()), &client(&tpm)).await);
    assert!(err.contains("EK is not trusted"), "{err}");
    // An allowlist that does not hold this EK.
    let cfg = TpmServerConfig {
        ek_ca_files: Vec::new(),
        ek_hash_allowlist: vec!["00".repeat(32)],
        ..lab_roots()
    };
    let err = rejected(attest(&server(&cfg, Arc::default()), &client(&tpm)).await);
    assert!(err.contains("is not on the allowlist"), "{err}");
}

/// The EK certificate chain is checked at the attestor's clock (the context's), not the
/// system's: before the lab CA and the EK certificate were issued the EK is not trusted;
/// moved forward to the present, the same TPM attests.
#[tokio::test(flavor = "multi_thread")]
async fn the_ek_certificate_is_checked_at_the_contexts_clock() {
    let tpm = tpm();
    let clock = Arc::new(ManualClock::at_unix(1_000_000_000)); // 2001-09-09
    let ctx = PluginContext::for_tests("/").with_clock(clock.clone());
    let server = TpmAttestor::new(&lab_roots(), &ctx, Arc::new(MemoryStore::default())).unwrap();
    let c = client(&tpm);
    let err = rejected(attest(&server, &c).await);
    assert!(err.contains("EK is not trusted"), "{err}");

    clock.set(std::time::SystemTime::now());
    let r = attest(&server, &c).await.unwrap();
    assert_eq!(r.agent_path.len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowlisted_ek_is_trusted_without_roots() {
    let tpm = tpm();
    let first = attest(&server(&lab_roots(), Arc::default()), &client(&tpm))
        .await
        .unwrap();
    let cfg = TpmServerConfig {
        ek_ca_files: Vec::new(),
        ek_hash_allowlist: vec![first.agent_path.clone()],
        ..lab_roots()
    };
    let r = attest(&server(&cfg, Arc::default()), &client(&tpm))
        .await
        .unwrap();
    assert_eq!(r.agent_path, first.agent_path);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_credential_answer_is_refused() {
    let tpm = tpm();
    let server = server(&lab_roots(), Arc::default());
    let c = client(&tpm);
    let (challenge, session) = begin(&server, &c.payload(&ctx()).await.unwrap(), &ctx())
        .await
        .unwrap();
    let mut answer: Response =
        wire::decode("r", &c.answer(&challenge, &ctx()).await.unwrap()).unwrap();
    answer.activated_secret[0] ^= 1;
    let err = rejected(session.respond(&wire::encode(&answer)).await);
    assert!(err.contains("credential activation failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_quote_is_refused_as_stale() {
    let tpm = tpm();
    let server = server(&lab_roots(), Arc::default());
    let c = client(&tpm);
    // An answer recorded from one attestation...
    let (challenge, session) = begin(&server, &c.payload(&ctx()).await.unwrap(), &ctx())
        .await
        .unwrap();
    let recorded = c.answer(&challenge, &ctx()).await.unwrap();
    done(session.respond(&recorded).await.unwrap());
    // ...replayed into a new one: its credential and nonce belong to the old challenge.
    let (_, session) = begin(&server, &c.payload(&ctx()).await.unwrap(), &ctx())
        .await
        .unwrap();
    let err = rejected(session.respond(&recorded).await);
    assert!(err.contains("credential activation failed"), "{err}");
    // Even with the new credential answered correctly, the old quote's nonce is stale.
    let (challenge, session) = begin(&server, &c.payload(&ctx()).await.unwrap(), &ctx())
        .await
        .unwrap();
    let fresh: Response = wire::decode("r", &c.answer(&challenge, &ctx()).await.unwrap()).unwrap();
    let old: Response = wire::decode("r", &recorded).unwrap();
    let spliced = Response {
        quote: old.quote,
        quote_signature: old.quote_signature,
        pcr_values: old.pcr_values,
        ..fresh
    };
    let err = rejected(session.respond(&wire::encode(&spliced)).await);
    // Each attestation has a fresh AK, so the old quote fails on its signature before
    // its stale nonce is even looked at.
    assert!(err.contains("does not verify with the AK"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_nonce_is_refused() {
    let tpm = tpm();
    let server = server(&lab_roots(), Arc::default());
    let c = client(&tpm);
    let (challenge, session) = begin(&server, &c.payload(&ctx()).await.unwrap(), &ctx())
        .await
        .unwrap();
    // The agent quotes over another nonce than the one it was given.
    let mut altered: Challenge = wire::decode("c", &challenge).unwrap();
    altered.nonce = vec![7u8; 32];
    let answer = c.answer(&wire::encode(&altered), &ctx()).await.unwrap();
    let err = rejected(session.respond(&answer).await);
    assert!(err.contains("nonce does not match"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_pcr_values_are_refused() {
    let tpm = tpm();
    let server = server(&lab_roots(), Arc::default());
    let c = client(&tpm);
    let (challenge, session) = begin(&server, &c.payload(&ctx()).await.unwrap(), &ctx())
        .await
        .unwrap();
    let mut answer: Response =
        wire::decode("r", &c.answer(&challenge, &ctx()).await.unwrap()).unwrap();
    answer.pcr_values.insert(7, "ab".repeat(32));
    let err = rejected(session.respond(&wire::encode(&answer)).await);
    assert!(
        err.contains("PCR values do not match the quoted digest"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quote_from_another_tpm_is_refused() {
    let a = tpm();
    let other = TpmManufacturer::new().unwrap();
    let b = Swtpm::start(&other).unwrap();
    let server = server(&lab_roots(), Arc::default());
    let ca = client(&a);
    let (challenge_a, session_a) = begin(&server, &ca.payload(&ctx()).await.unwrap(), &ctx())
        .await
        .unwrap();
    let answer_a: Response =
        wire::decode("r", &ca.answer(&challenge_a, &ctx()).await.unwrap()).unwrap();
    let nonce: Challenge = wire::decode("c", &challenge_a).unwrap();
    // A relay: TPM B quotes A's challenge nonce with its own AK.
    let quote_b = tokio::task::spawn_blocking(move || {
        let mut dev = TpmDevice::open(&b.tcti()).unwrap();
        let ek = dev.ek().unwrap();
        let ak = dev.create_ak(&ek).unwrap();
        let q = dev
            .quote(&ak, &nonce.nonce, &nonce.pcr_selection.pcrs)
            .unwrap();
        let values = dev.pcr_read_sha256(&nonce.pcr_selection.pcrs).unwrap();
        dev.flush_ak(ak).unwrap();
        dev.flush_ek(ek).unwrap();
        (q, values)
    })
    .await
    .unwrap();
    let spliced = Response {
        quote: quote_b.0.attest,
        quote_signature: quote_b.0.signature,
        pcr_values: quote_b
            .1
            .iter()
            .map(|(i, v)| (*i, hex::encode(v)))
            .collect(),
        ..answer_a
    };
    let err = rejected(session_a.respond(&wire::encode(&spliced)).await);
    assert!(err.contains("does not verify with the AK"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_count_going_backwards_is_refused() {
    let tpm = tpm();
    let store = Arc::new(MemoryStore::default());
    let server = server(&lab_roots(), store.clone());
    let c = client(&tpm);
    let r = attest(&server, &c).await.unwrap();
    // The server saw this EK with a later resetCount before (a rolled-back TPM state,
    // or a replayed attestation from a restored VM snapshot).
    let saved = store.load(&r.agent_path).await.unwrap().unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    let mut rec = rec.as_object().unwrap().clone();
    let reset = rec["reset_count"].as_u64().unwrap();
    rec.insert("reset_count".into(), (reset + 5).into());
    store
        .save(&r.agent_path, &serde_json::to_vec(&rec).unwrap())
        .await
        .unwrap();
    let err = rejected(attest(&server, &c).await);
    assert!(err.contains("resetCount went backwards"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pcr_policy_mismatch_names_the_pcr() {
    let tpm = tpm();
    let mut cfg = lab_roots();
    cfg.pcr_policy
        .insert("7".into(), vec!["11".repeat(32), "22".repeat(32)]);
    let err = rejected(attest(&server(&cfg, Arc::default()), &client(&tpm)).await);
    assert!(err.contains("PCR 7 has value"), "{err}");
}
