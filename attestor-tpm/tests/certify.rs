//! TPM2_Certify of the agent key inside `tpm` attestation, both halves in process against
//! swtpm: a TPM agent key is certified by the AK and earns `tpm:agent_key:tpm`; a CSR
//! key other than the certified one, a tampered or missing certification, an exportable
//! key and (with `require_agent_key_in_tpm`) a software key are refused, each with its
//! message; the agent key can sign between the payload and the answer (slot budget).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;
use carapace_core::plugin::MemoryStateStore as MemoryStore;
use common::{begin, done, rejected, selectors};

use std::sync::Arc;

use carapace_attestor_tpm::agent::TpmAttestorClient;
use carapace_attestor_tpm::keys::TpmKeyManager;
use carapace_attestor_tpm::server::{TpmAttestor, TpmServerConfig};
use carapace_attestor_tpm::shared::SharedTpm;
use carapace_attestor_tpm::wire::{self, Payload, Response};
use carapace_core::plugin::{
    AttestationContext, AttestationResult, KeyManager, KeySigner, NodeAttestorClient, PluginContext,
};
use carapace_core::{Error, KeyType, SignatureAlgorithm};
use hsm_sim::swtpm::{Swtpm, TpmManufacturer};
use tss_esapi::structures::Public;
use tss_esapi::traits::{Marshall, UnMarshall};

fn lab_roots() -> TpmServerConfig {
    let m = TpmManufacturer::shared().unwrap();
    TpmServerConfig {
        ek_ca_files: vec![m.ek_ca_root(), m.ek_ca_intermediate()],
        pcrs: vec![0, 7],
        ..TpmServerConfig::default()
    }
}

fn server(cfg: &TpmServerConfig) -> TpmAttestor {
    TpmAttestor::new(
        cfg,
        &PluginContext::for_tests("/"),
        Arc::new(MemoryStore::default()),
    )
    .unwrap()
}

/// A TPM, its shared context, a `tpm` key manager on it holding one agent key, and the
/// attestor client on the same context.
struct Agent {
    _tpm: Swtpm,
    _dir: tempfile::TempDir,
    shared: SharedTpm,
    km: TpmKeyManager,
    key: Arc<dyn KeySigner>,
    client: TpmAttestorClient,
}

async fn agent() -> Agent {
    let tpm = Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shared = SharedTpm::new(&tpm.tcti());
    let km = TpmKeyManager::open_with(shared.clone(), &dir.path().join("keys")).unwrap();
    let key = km.generate_key("agent-1", KeyType::EcP256).await.unwrap();
    let client = TpmAttestorClient::with_tpm(shared.clone());
    Agent {
        _tpm: tpm,
        _dir: dir,
        shared,
        km,
        key,
        client,
    }
}

fn ctx(spki: &[u8]) -> AttestationContext {
    AttestationContext {
        agent_public_key: spki.to_vec(),
        tls_exporter: vec![0; 32],
    }
}

/// A P-256 SubjectPublicKeyInfo of a software key (not in any TPM).
fn software_spki() -> Vec<u8> {
    use p256::pkcs8::EncodePublicKey as _;
    let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
    secret
        .public_key()
        .to_public_key_der()
        .unwrap()
        .as_bytes()
        .to_vec()
}

/// A whole attestation: the agent for `agent_ctx`, the server sees `server_ctx` (the
/// CSR's key).
async fn attest(
    server: &TpmAttestor,
    client: &TpmAttestorClient,
    agent_ctx: &AttestationContext,
    server_ctx: &AttestationContext,
) -> Result<AttestationResult, Error> {
    let payload = client.payload(agent_ctx).await?;
    let (challenge, session) = begin(server, &payload, server_ctx).await?;
    let answer = client.answer(&challenge, &ctx(&[])).await?;
    session.respond(&answer).await.map(done)
}

fn loaded(shared: &SharedTpm) -> Vec<u32> {
    shared.with_device(|d| d.loaded_handles()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tpm_agent_key_is_certified_and_selected() {
    let a = agent().await;
    let c = ctx(a.key.public_key_der());
    let payload: Payload = wire::decode("p", &a.client.payload(&c).await.unwrap()).unwrap();
    let named = Public::unmarshall(payload.agent_key_public.as_ref().unwrap()).unwrap();
    assert_eq!(
        carapace_attestor_tpm::verify::public_key_spki_der(&named).unwrap(),
        a.key.public_key_der(),
        "the payload names the agent key"
    );
    let cfg = TpmServerConfig {
        require_agent_key_in_tpm: true,
        ..lab_roots()
    };
    let r = attest(&server(&cfg), &a.client, &c, &c).await.unwrap();
    let sel = selectors(&r);
    assert!(sel.contains(&"tpm:agent_key:tpm".to_owned()), "{sel:?}");
    assert!(
        sel.contains(&format!("tpm:ek_pubhash:{}", r.agent_path)),
        "{sel:?}"
    );
    assert_eq!(loaded(&a.shared), Vec::<u32>::new(), "nothing left loaded");
    // The key still signs afterwards (and again after a renewal-style re-attestation).
    let sig = a
        .key
        .sign(SignatureAlgorithm::EcdsaP256Sha256, b"after")
        .unwrap();
    carapace_core::crypto::verify_signature(
        a.key.public_key_der(),
        SignatureAlgorithm::EcdsaP256Sha256,
        b"after",
        &sig,
    )
    .unwrap();
    attest(&server(&cfg), &a.client, &c, &c).await.unwrap();
}

/// The agent certifies its TPM key, but its CSR (what the server will certify) is for
/// another key: refused before any challenge.
#[tokio::test(flavor = "multi_thread")]
async fn a_csr_key_other_than_the_certified_key_is_refused() {
    let a = agent().await;
    let server = server(&lab_roots());
    let payload = a
        .client
        .payload(&ctx(a.key.public_key_der()))
        .await
        .unwrap();
    let err = rejected(begin(&server, &payload, &ctx(&software_spki())).await);
    assert!(err.contains("is not the key of the CSR"), "{err}");
    // Another TPM key of the same TPM is not the CSR's key either.
    let other = a.km.generate_key("agent-2", KeyType::EcP256).await.unwrap();
    let payload = a
        .client
        .payload(&ctx(a.key.public_key_der()))
        .await
        .unwrap();
    let err = rejected(begin(&server, &payload, &ctx(other.public_key_der())).await);
    assert!(err.contains("is not the key of the CSR"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_missing_or_replayed_certification_is_refused() {
    let a = agent().await;
    let c = ctx(a.key.public_key_der());
    let server = server(&lab_roots());

    // Tampered signature.
    let (challenge, session) = begin(&server, &a.client.payload(&c).await.unwrap(), &c)
        .await
        .unwrap();
    let good: Response =
        wire::decode("r", &a.client.answer(&challenge, &ctx(&[])).await.unwrap()).unwrap();
    let mut bad = good.clone();
    let sig = bad.agent_key_certify_signature.as_mut().unwrap();
    let last = sig.len() - 1;
    sig[last] ^= 1;
    let err = rejected(session.respond(&wire::encode(&bad)).await);
    assert!(
        err.contains("certify signature does not verify with the AK"),
        "{err}"
    );

    // Tampered certification (the certified Name).
    let (challenge, session) = begin(&server, &a.client.payload(&c).await.unwrap(), &c)
        .await
        .unwrap();
    let fresh: Response =
        wire::decode("r", &a.client.answer(&challenge, &ctx(&[])).await.unwrap()).unwrap();
    let mut bad = fresh.clone();
    let attest = bad.agent_key_certify.as_mut().unwrap();
    let last = attest.len() - 1;
    attest[last] ^= 1;
    let err = rejected(session.respond(&wire::encode(&bad)).await);
    assert!(
        err.contains("certify signature does not verify with the AK"),
        "{err}"
    );

    // Missing.
    let (challenge, session) = begin(&server, &a.client.payload(&c).await.unwrap(), &c)
        .await
        .unwrap();
    let fresh: Response =
        wire::decode("r", &a.client.answer(&challenge, &ctx(&[])).await.unwrap()).unwrap();
    let bad = Response {
        agent_key_certify: None,
        agent_key_certify_signature: None,
        ..fresh.clone()
    };
    let err = rejected(session.respond(&wire::encode(&bad)).await);
    assert!(err.contains("carries no TPM2_Certify"), "{err}");

    // Replayed from an earlier attestation (another AK, another nonce).
    let (challenge, session) = begin(&server, &a.client.payload(&c).await.unwrap(), &c)
        .await
        .unwrap();
    let fresh: Response =
        wire::decode("r", &a.client.answer(&challenge, &ctx(&[])).await.unwrap()).unwrap();
    let spliced = Response {
        agent_key_certify: good.agent_key_certify.clone(),
        agent_key_certify_signature: good.agent_key_certify_signature.clone(),
        ..fresh
    };
    let err = rejected(session.respond(&wire::encode(&spliced)).await);
    assert!(
        err.contains("certify signature does not verify with the AK"),
        "{err}"
    );

    // A certification the payload did not ask for.
    let mut payload: Payload = wire::decode("p", &a.client.payload(&c).await.unwrap()).unwrap();
    payload.agent_key_public = None;
    let (challenge, session) = begin(&server, &wire::encode(&payload), &c).await.unwrap();
    let answer = a.client.answer(&challenge, &ctx(&[])).await.unwrap();
    let err = rejected(session.respond(&answer).await);
    assert!(err.contains("payload named no agent key"), "{err}");
    assert_eq!(loaded(&a.shared), Vec::<u32>::new());
}

/// A payload naming a key that could leave its TPM (not fixedTPM) is refused, whatever
/// the CSR.
#[tokio::test(flavor = "multi_thread")]
async fn an_exportable_agent_key_is_refused() {
    let a = agent().await;
    let c = ctx(a.key.public_key_der());
    let mut payload: Payload = wire::decode("p", &a.client.payload(&c).await.unwrap()).unwrap();
    let Public::Ecc {
        object_attributes,
        name_hashing_algorithm,
        auth_policy,
        parameters,
        unique,
    } = Public::unmarshall(payload.agent_key_public.as_ref().unwrap()).unwrap()
    else {
        panic!("not an ECC key");
    };
    let attrs = tss_esapi::attributes::ObjectAttributes::from(u32::from(object_attributes) & !0x2);
    assert!(!attrs.fixed_tpm());
    let exportable = Public::Ecc {
        object_attributes: attrs,
        name_hashing_algorithm,
        auth_policy,
        parameters,
        unique,
    };
    payload.agent_key_public = Some(exportable.marshall().unwrap());
    let err = rejected(begin(&server(&lab_roots()), &wire::encode(&payload), &c).await);
    assert!(err.contains("agent key is not fixedTPM"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn require_agent_key_in_tpm_refuses_a_software_key() {
    let a = agent().await;
    let soft = ctx(&software_spki());
    let required = server(&TpmServerConfig {
        require_agent_key_in_tpm: true,
        ..lab_roots()
    });
    let err = rejected(attest(&required, &a.client, &soft, &soft).await);
    assert!(err.contains("the agent key is not in the TPM"), "{err}");
    // Without the requirement the node attests, without the selector.
    let r = attest(&server(&lab_roots()), &a.client, &soft, &soft)
        .await
        .unwrap();
    assert!(
        !selectors(&r).iter().any(|s| s.starts_with("tpm:agent_key")),
        "{:?}",
        selectors(&r)
    );
    // A payload without the agent key field is a version 1 payload of earlier agents.
    let text = String::from_utf8(a.client.payload(&soft).await.unwrap()).unwrap();
    assert!(!text.contains("agent_key_public"), "{text}");
}

/// The EK and AK are swapped out between the payload and the answer, so the agent key
/// signs meanwhile (a TLS handshake to the server) although swtpm has three slots.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_key_signs_between_payload_and_answer() {
    let a = agent().await;
    let c = ctx(a.key.public_key_der());
    let server = server(&lab_roots());
    let (challenge, session) = begin(&server, &a.client.payload(&c).await.unwrap(), &c)
        .await
        .unwrap();
    assert_eq!(
        loaded(&a.shared),
        Vec::<u32>::new(),
        "EK and AK swapped out"
    );
    let key = a.key.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..3 {
            key.sign(SignatureAlgorithm::EcdsaP256Sha256, b"tls")
                .unwrap();
        }
    })
    .await
    .unwrap();
    let answer = a.client.answer(&challenge, &ctx(&[])).await.unwrap();
    let r = done(session.respond(&answer).await.unwrap());
    assert!(selectors(&r).contains(&"tpm:agent_key:tpm".to_owned()));
}

/// `verify_certify` with TPM-made evidence: a genuine certification by the AK of
/// another key, over another nonce, or a quote in its place are each refused.
#[tokio::test(flavor = "multi_thread")]
async fn verify_certify_checks_name_nonce_and_type() {
    use carapace_attestor_tpm::device::TpmDevice;
    use carapace_attestor_tpm::verify::{parse_public, verify_certify};
    let tpm = Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap();
    let tcti = tpm.tcti();
    let (ak_public, key_a, key_b, cert_b, quote) = tokio::task::spawn_blocking(move || {
        let mut dev = TpmDevice::open(&tcti).unwrap();
        let blob_a = dev.create_signing_key().unwrap();
        let blob_b = dev.create_signing_key().unwrap();
        let ek = dev.ek().unwrap();
        let ak = dev.create_ak(&ek).unwrap();
        dev.flush_ek(ek).unwrap();
        let b = dev.load_key(&blob_b).unwrap();
        let cert_b = dev.certify(&b, &ak, &[1u8; 32]).unwrap();
        dev.flush_key(b).unwrap();
        let quote = dev.quote(&ak, &[1u8; 32], &[0]).unwrap();
        let ak_public = ak.public.clone();
        dev.flush_ak(ak).unwrap();
        assert_eq!(dev.loaded_handles().unwrap(), Vec::<u32>::new());
        (ak_public, blob_a.public, blob_b.public, cert_b, quote)
    })
    .await
    .unwrap();
    let ak = parse_public(&ak_public).unwrap();
    let a = parse_public(&key_a).unwrap();
    let b = parse_public(&key_b).unwrap();
    verify_certify(&ak, &b, &cert_b.attest, &cert_b.signature, &[1u8; 32]).unwrap();
    let err = rejected(verify_certify(
        &ak,
        &a,
        &cert_b.attest,
        &cert_b.signature,
        &[1u8; 32],
    ));
    assert!(err.contains("Name mismatch"), "{err}");
    let err = rejected(verify_certify(
        &ak,
        &b,
        &cert_b.attest,
        &cert_b.signature,
        &[2u8; 32],
    ));
    assert!(err.contains("certification nonce does not match"), "{err}");
    let err = rejected(verify_certify(
        &ak,
        &b,
        &quote.attest,
        &quote.signature,
        &[1u8; 32],
    ));
    assert!(err.contains("is not a certification"), "{err}");
    let mut trailing = cert_b.signature.clone();
    trailing.push(0);
    let err = rejected(verify_certify(
        &ak,
        &b,
        &cert_b.attest,
        &trailing,
        &[1u8; 32],
    ));
    assert!(err.contains("trailing"), "{err}");
}
