//! The agent's `tpm` key manager against swtpm: the KeyManager contract for ec-p256,
//! keys that survive a restart of the agent and of the TPM, key files that hold only
//! the TPM's encrypted blob (useless in another TPM), signing from many threads through
//! the one shared TPM context, nothing left loaded in the TPM.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Instant;

use carapace_attestor_tpm::agent::{TpmAgentConfig, TpmAttestorClient};
use carapace_attestor_tpm::device::TpmDevice;
use carapace_attestor_tpm::keys::{TpmKeyManager, TpmKeyManagerConfig, read_key_file};
use carapace_attestor_tpm::shared::SharedTpm;
use carapace_core::crypto::verify_signature;
use carapace_core::plugin::KeyManager;
use carapace_core::{Error, KeyType, SignatureAlgorithm, testing};
use hsm_sim::swtpm::{Swtpm, TpmManufacturer};

fn tpm() -> Swtpm {
    Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap()
}

/// A key manager on its own (unregistered) shared TPM, keys in `dir`.
fn key_manager(tpm: &Swtpm, dir: &std::path::Path) -> TpmKeyManager {
    TpmKeyManager::open_with(SharedTpm::new(&tpm.tcti()), dir).unwrap()
}

fn loaded(shared: &SharedTpm) -> Vec<u32> {
    shared.with_device(|d| d.loaded_handles()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tpm_key_manager_conforms_for_ec_p256() {
    let tpm = tpm();
    let dir = tempfile::tempdir().unwrap();
    let km = key_manager(&tpm, &dir.path().join("keys"));
    testing::key_manager_conformance(&km, &[KeyType::EcP256]).await;
    assert_eq!(
        loaded(km.shared_tpm()),
        Vec::<u32>::new(),
        "nothing left loaded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_ec_p256_keys_are_made_and_only_ecdsa_p256_sha256_signs() {
    let tpm = tpm();
    let dir = tempfile::tempdir().unwrap();
    let km = key_manager(&tpm, &dir.path().join("keys"));
    for kt in [KeyType::EcP384, KeyType::Rsa2048] {
        let err = km.generate_key("k", kt).await.unwrap_err();
        assert!(matches!(err, Error::KeyBackend(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("tpm key manager supports ec-p256 only"),
            "{err}"
        );
    }
    let key = km.generate_key("k", KeyType::EcP256).await.unwrap();
    for alg in [
        SignatureAlgorithm::EcdsaP384Sha384,
        SignatureAlgorithm::RsaPkcs1Sha256,
        SignatureAlgorithm::RsaPssSha256,
    ] {
        assert!(
            matches!(key.sign(alg, b"m"), Err(Error::UnsupportedAlgorithm { .. })),
            "{alg}"
        );
    }
    assert!(key.may_block());
    assert_eq!(key.concurrency(), Some(1));
}

/// The agent restarts (a new process: new shared TPM, new key manager over the same
/// directory) and the TPM restarts (a new swtpm from the same manufactured state, so
/// the same seeds): the key is found again, with the same public key, and signs.
#[tokio::test(flavor = "multi_thread")]
async fn keys_survive_agent_and_tpm_restarts() {
    let m = TpmManufacturer::shared().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("keys-tpm");
    let before = {
        let tpm = Swtpm::start(m).unwrap();
        let km = key_manager(&tpm, &kdir);
        testing::create_for_restart(&km, &[KeyType::EcP256]).await
    };
    assert_eq!(
        std::fs::metadata(&kdir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for info in &before {
        let path = kdir.join(format!("{}.tpmkey", info.id));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key file mode");
    }
    let tpm = Swtpm::start(m).unwrap();
    let km = key_manager(&tpm, &kdir);
    testing::check_after_restart(&km, &before).await;
    assert_eq!(loaded(km.shared_tpm()), Vec::<u32>::new());
}

/// The file is `{format, version, public, private}`: a TPMT_PUBLIC and the TPM's
/// encrypted TPM2B_PRIVATE; no PEM, no PKCS#8. The blob only loads in the TPM that
/// made it: another TPM (other seeds) refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn the_key_file_is_a_tpm_blob_that_no_other_tpm_can_load() {
    let tpm = tpm();
    let dir = tempfile::tempdir().unwrap();
    let km = key_manager(&tpm, &dir.path().join("keys"));
    km.generate_key("agent-1", KeyType::EcP256).await.unwrap();
    let path = km.path_of("agent-1");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["format", "private", "public", "version"]);
    assert_eq!(json["format"], "carapace-tpm-key");
    let blob = read_key_file(&path).unwrap();
    assert!(
        !blob.private.is_empty() && blob.private.len() < 256,
        "{blob:?}"
    );
    // The private part is not a PKCS#8 / SEC1 key (a DER SEQUENCE): it is the TPM's
    // integrity HMAC and encrypted sensitive area.
    assert_ne!(blob.private[0], 0x30, "{blob:?}");

    // The same TPM loads it...
    let shared = km.shared_tpm().clone();
    let b = blob.clone();
    shared
        .with_device(move |d| {
            let k = d.load_key(&b)?;
            d.flush_key(k)
        })
        .unwrap();
    // ...a TPM of another manufacturer (other seeds, so another SRK) does not.
    let other_vendor = TpmManufacturer::new().unwrap();
    let other = Swtpm::start(&other_vendor).unwrap();
    let mut dev = TpmDevice::open(&other.tcti()).unwrap();
    let err = dev.load_key(&blob).unwrap_err();
    assert!(err.to_string().contains("made by another TPM"), "{err}");
    assert_eq!(dev.loaded_handles().unwrap(), Vec::<u32>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_readable_key_file_is_refused() {
    let tpm = tpm();
    let dir = tempfile::tempdir().unwrap();
    {
        let km = key_manager(&tpm, &dir.path().join("keys"));
        km.generate_key("agent-1", KeyType::EcP256).await.unwrap();
    }
    let path = dir.path().join("keys").join("agent-1.tpmkey");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = TpmKeyManager::open_with(SharedTpm::new(&tpm.tcti()), &dir.path().join("keys"))
        .unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

/// Eight threads sign at once through the one TPM context (the conformance check),
/// while attestations run on the same TPM: every signature verifies, every
/// attestation completes, and nothing is left loaded.
#[tokio::test(flavor = "multi_thread")]
async fn signing_from_many_threads_shares_the_tpm_with_attestation() {
    let tpm = tpm();
    let dir = tempfile::tempdir().unwrap();
    let shared = SharedTpm::new(&tpm.tcti());
    let km = TpmKeyManager::open_with(shared.clone(), &dir.path().join("keys")).unwrap();
    let key = km.generate_key("agent-1", KeyType::EcP256).await.unwrap();
    let client = TpmAttestorClient::with_tpm(shared.clone());
    let signer = key.clone();
    let signing = tokio::task::spawn_blocking(move || testing::concurrent_signing(signer));
    let ctx = carapace_core::plugin::AttestationContext {
        agent_public_key: key.public_key_der().to_vec(),
        tls_exporter: vec![0; 32],
    };
    use carapace_core::plugin::NodeAttestorClient as _;
    for _ in 0..3 {
        // Without a server: the payload, then the EK and AK are saved contexts; the
        // next payload drops them.
        let payload = client.payload(&ctx).await.unwrap();
        let p: carapace_attestor_tpm::wire::Payload =
            carapace_attestor_tpm::wire::decode("payload", &payload).unwrap();
        assert!(p.agent_key_public.is_some(), "the TPM key is named");
    }
    signing.await.unwrap();
    assert_eq!(loaded(&shared), Vec::<u32>::new());
}

/// The key manager and the attestor built from configuration share the process-wide
/// TPM context of their TCTI.
#[tokio::test(flavor = "multi_thread")]
async fn configured_key_manager_and_attestor_share_one_tpm() {
    let tpm = tpm();
    let dir = tempfile::tempdir().unwrap();
    let km = TpmKeyManager::open(
        &TpmKeyManagerConfig {
            tcti: Some(tpm.tcti()),
            directory: None,
        },
        dir.path(),
    )
    .unwrap();
    assert_eq!(km.directory(), dir.path().join("keys-tpm"));
    let client = TpmAttestorClient::new(&TpmAgentConfig {
        tcti: Some(tpm.tcti()),
        ..Default::default()
    });
    assert!(km.shared_tpm().same_as(client.shared_tpm()));
    let key = km.generate_key("agent-1", KeyType::EcP256).await.unwrap();
    assert!(km.shared_tpm().key_by_spki(key.public_key_der()).is_some());
    km.delete_key("agent-1").await.unwrap();
    assert!(km.shared_tpm().key_by_spki(key.public_key_der()).is_none());
    assert!(!km.path_of("agent-1").exists());
}

/// Sign latency on swtpm (CreatePrimary SRK + Load + flush + Sign + flush, password
/// sessions), printed for the record.
#[tokio::test(flavor = "multi_thread")]
async fn sign_latency() {
    let tpm = tpm();
    let dir = tempfile::tempdir().unwrap();
    let km = key_manager(&tpm, &dir.path().join("keys"));
    let t = Instant::now();
    let key = km.generate_key("agent-1", KeyType::EcP256).await.unwrap();
    eprintln!("generate_key: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
    let key = Arc::clone(&key);
    let times = tokio::task::spawn_blocking(move || {
        let mut times = Vec::new();
        for i in 0..50 {
            let msg = format!("message {i}");
            let t = Instant::now();
            let sig = key
                .sign(SignatureAlgorithm::EcdsaP256Sha256, msg.as_bytes())
                .unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            verify_signature(
                key.public_key_der(),
                SignatureAlgorithm::EcdsaP256Sha256,
                msg.as_bytes(),
                &sig,
            )
            .unwrap();
        }
        times
    })
    .await
    .unwrap();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    eprintln!(
        "sign (50 signatures): median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms",
        sorted[25], sorted[45], sorted[0], sorted[49]
    );
}
