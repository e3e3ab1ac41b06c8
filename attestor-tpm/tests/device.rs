//! The agent's TPM operations against swtpm, and the server's software MakeCredential
//! against the TPM's ActivateCredential. Each test starts its own swtpm (a copy of the
//! one manufactured template: all copies share the same EKs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::process::Command;
use std::time::{Duration, Instant};

use carapace_attestor_tpm::credential::{make_credential, name_of_public};
use carapace_attestor_tpm::device::{Ak, Ek, EkAlgorithm, TpmDevice};
use carapace_core::Error;
use hsm_sim::swtpm::{NV_EK_CERT_ECC_P384, NV_EK_CERT_RSA2048, Swtpm, TpmManufacturer};
use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{Attest, AttestInfo, Public, Signature, SymmetricDefinitionObject};
use tss_esapi::traits::UnMarshall;

/// A fresh swtpm and the device opened on it.
fn start() -> (Swtpm, TpmDevice) {
    let tpm = Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap();
    let dev = TpmDevice::open(&tpm.tcti()).unwrap();
    (tpm, dev)
}

/// Runs `f`, printing how long it took.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    eprintln!("{what}: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
    r
}

fn secret() -> Vec<u8> {
    (0u8..32)
        .map(|i| i.wrapping_mul(37).wrapping_add(5))
        .collect()
}

/// Server side MakeCredential for `ak` and `ek`, agent side ActivateCredential.
fn round_trip(dev: &mut TpmDevice, ek: &Ek, ak: &Ak) -> Vec<u8> {
    let made = timed("make_credential (software)", || {
        make_credential(&ek.public, &ak.name, &secret()).unwrap()
    });
    timed("activate_credential", || {
        dev.activate_credential(ak, ek, &made.credential_blob, &made.encrypted_secret)
            .unwrap()
    })
}

fn assert_nothing_loaded(dev: &mut TpmDevice) {
    assert_eq!(dev.loaded_handles().unwrap(), Vec::<u32>::new());
}

#[test]
fn tpm_device_is_send() {
    fn send<T: Send>() {}
    send::<TpmDevice>();
}

/// (a), (f), (g): the RSA EK with its certificate; software MakeCredential for the AK's
/// name is recovered by the TPM; software Names equal the TPM's; nothing stays loaded.
#[test]
fn rsa_ek_credential_round_trip() {
    let (_tpm, mut dev) = start();
    let ek = timed("ek() (RSA-2048 + cert)", || dev.ek().unwrap());
    assert_eq!(ek.algorithm, EkAlgorithm::Rsa2048);
    let cert = ek.cert.clone().expect("swtpm has an RSA EK certificate");
    assert!(cert.len() > 500 && cert[0] == 0x30, "{} bytes", cert.len());
    assert!(ek.intermediates.is_empty());
    let public = Public::unmarshall(&ek.public).unwrap();
    let Public::Rsa { unique, .. } = &public else {
        panic!("not an RSA EK: {public:?}");
    };
    // The certificate certifies this key: its modulus is inside.
    assert!(
        cert.windows(256).any(|w| w == unique.value()),
        "EK modulus not in the certificate"
    );
    assert_eq!(public.name_hashing_algorithm(), HashingAlgorithm::Sha256);
    assert_eq!(
        public.symmetric_algorithm(),
        Some(SymmetricDefinitionObject::AES_128_CFB)
    );
    assert_eq!(name_of_public(&ek.public).unwrap(), ek.name);

    let ak = timed("create_ak", || dev.create_ak(&ek).unwrap());
    assert_eq!(name_of_public(&ak.public).unwrap(), ak.name, "(f) AK name");
    assert_eq!(&ak.name[..2], &[0x00, 0x0b], "AK nameAlg sha256");
    assert_eq!(dev.loaded_handles().unwrap().len(), 2, "EK and AK");

    assert_eq!(round_trip(&mut dev, &ek, &ak), secret());
    assert_eq!(dev.loaded_handles().unwrap().len(), 2, "sessions flushed");
    dev.flush_ak(ak).unwrap();
    dev.flush_ek(ek).unwrap();
    assert_nothing_loaded(&mut dev);
}

/// (b): swtpm's ECC EK is P-384 with nameAlg SHA-384 and AES-256-CFB; the KDFe path
/// with those parameters works, though the AK's Name is SHA-256.
#[test]
fn p384_ek_credential_round_trip() {
    let (_tpm, mut dev) = start();
    let ek = timed("ek_of(P-384) + cert", || {
        dev.ek_of(EkAlgorithm::EccP384).unwrap()
    });
    assert!(ek.cert.is_some(), "swtpm has a P-384 EK certificate");
    let public = Public::unmarshall(&ek.public).unwrap();
    let Public::Ecc {
        parameters,
        unique,
        object_attributes,
        ..
    } = &public
    else {
        panic!("not an ECC EK: {public:?}");
    };
    assert_eq!(parameters.ecc_curve(), EccCurve::NistP384);
    assert_eq!(public.name_hashing_algorithm(), HashingAlgorithm::Sha384);
    assert_eq!(
        public.symmetric_algorithm(),
        Some(SymmetricDefinitionObject::AES_256_CFB)
    );
    assert!(object_attributes.user_with_auth(), "high-range template");
    assert_eq!(unique.x().value().len(), 48);
    let cert = ek.cert.clone().unwrap();
    assert!(cert.windows(48).any(|w| w == unique.x().value()));
    assert_eq!(name_of_public(&ek.public).unwrap(), ek.name);
    assert_eq!(&ek.name[..2], &[0x00, 0x0c], "EK nameAlg sha384");

    let ak = timed("create_ak under P-384 EK", || dev.create_ak(&ek).unwrap());
    assert_eq!(name_of_public(&ak.public).unwrap(), ak.name);
    assert_eq!(round_trip(&mut dev, &ek, &ak), secret());
    dev.flush_ak(ak).unwrap();
    dev.flush_ek(ek).unwrap();
    assert_nothing_loaded(&mut dev);
}

/// The P-256 EK (low range: PolicySecret with ECC and KDFe over SHA-256). swtpm 0.7.1
/// has no certificate for it.
#[test]
fn p256_ek_without_certificate_round_trip() {
    let (_tpm, mut dev) = start();
    let ek = timed("ek_of(P-256)", || dev.ek_of(EkAlgorithm::EccP256).unwrap());
    assert_eq!(ek.cert, None);
    let public = Public::unmarshall(&ek.public).unwrap();
    assert_eq!(public.name_hashing_algorithm(), HashingAlgorithm::Sha256);
    assert!(!public.object_attributes().user_with_auth());
    let ak = dev.create_ak(&ek).unwrap();
    assert_eq!(round_trip(&mut dev, &ek, &ak), secret());
    dev.flush_ak(ak).unwrap();
    dev.flush_ek(ek).unwrap();
    assert_nothing_loaded(&mut dev);
}

/// (c): a credential made for another key's Name, or tampered with, is refused by the
/// TPM's integrity check; the error path leaves no session behind.
#[test]
fn credential_for_another_ak_is_refused() {
    let (_tpm, mut dev) = start();
    for alg in [EkAlgorithm::Rsa2048, EkAlgorithm::EccP384] {
        let ek = dev.ek_of(alg).unwrap();
        let ak = dev.create_ak(&ek).unwrap();

        let mut other_name = ak.name.clone();
        *other_name.last_mut().unwrap() ^= 1;
        let made = make_credential(&ek.public, &other_name, &secret()).unwrap();
        let err = dev
            .activate_credential(&ak, &ek, &made.credential_blob, &made.encrypted_secret)
            .unwrap_err();
        assert!(matches!(err, Error::AttestationRejected(_)), "{alg}: {err}");
        eprintln!("{alg}, other AK name: {err}");

        let mut made = make_credential(&ek.public, &ak.name, &secret()).unwrap();
        *made.credential_blob.last_mut().unwrap() ^= 0x80;
        let err = dev
            .activate_credential(&ak, &ek, &made.credential_blob, &made.encrypted_secret)
            .unwrap_err();
        assert!(matches!(err, Error::AttestationRejected(_)), "{alg}: {err}");

        // The untampered credential still works afterwards: nothing leaked.
        assert_eq!(dev.loaded_handles().unwrap().len(), 2);
        assert_eq!(round_trip(&mut dev, &ek, &ak), secret());
        dev.flush_ak(ak).unwrap();
        dev.flush_ek(ek).unwrap();
        assert_nothing_loaded(&mut dev);
    }
}

/// (d): a credential encrypted to another TPM's EK is refused. Copies of one template
/// share their EKs, so "another TPM" is a second manufacture.
#[test]
fn credential_for_another_tpms_ek_is_refused() {
    let (_tpm_a, mut a) = start();
    let (_copy, mut copy) = start();
    let other = timed("second manufacture", || TpmManufacturer::new().unwrap());
    let tpm_b = Swtpm::start(&other).unwrap();
    let mut b = TpmDevice::open(&tpm_b.tcti()).unwrap();

    for alg in [EkAlgorithm::Rsa2048, EkAlgorithm::EccP384] {
        let ek_a = a.ek_of(alg).unwrap();
        let ek_copy = copy.ek_of(alg).unwrap();
        let ek_b = b.ek_of(alg).unwrap();
        assert_eq!(
            ek_a.public, ek_copy.public,
            "copies of a template share EKs"
        );
        assert_ne!(
            ek_a.public, ek_b.public,
            "another manufacture has other EKs"
        );
        let ek_b_public = ek_b.public.clone();
        copy.flush_ek(ek_copy).unwrap();
        b.flush_ek(ek_b).unwrap();

        let ak = a.create_ak(&ek_a).unwrap();
        let made = make_credential(&ek_b_public, &ak.name, &secret()).unwrap();
        let err = a
            .activate_credential(&ak, &ek_a, &made.credential_blob, &made.encrypted_secret)
            .unwrap_err();
        assert!(matches!(err, Error::AttestationRejected(_)), "{alg}: {err}");
        eprintln!("{alg}, other TPM's EK: {err}");
        a.flush_ak(ak).unwrap();
        a.flush_ek(ek_a).unwrap();
    }
    assert_nothing_loaded(&mut a);
    assert_nothing_loaded(&mut b);
}

/// The SHA-256 PCR digest a quote carries: SHA-256 over the selected values in order.
fn pcr_digest(values: &std::collections::BTreeMap<u8, Vec<u8>>) -> Vec<u8> {
    let mut h = Sha256::new();
    for v in values.values() {
        h.update(v);
    }
    h.finalize().to_vec()
}

/// Checks a quote the way a verifier does and returns its PCR digest.
fn check_quote(ak: &Ak, nonce: &[u8], attest_bytes: &[u8], signature: &[u8]) -> Vec<u8> {
    use p256::ecdsa::signature::Verifier as _;

    let attest = Attest::unmarshall(attest_bytes).unwrap();
    assert_eq!(attest.extra_data().value(), nonce, "(e) nonce in extraData");
    let AttestInfo::Quote { info } = attest.attested() else {
        panic!("not a quote: {attest:?}");
    };

    let Public::Ecc { unique, .. } = Public::unmarshall(&ak.public).unwrap() else {
        panic!("the AK is not ECC");
    };
    let pad = |b: &[u8]| {
        let mut v = vec![0u8; 32 - b.len()];
        v.extend_from_slice(b);
        v
    };
    let point = p256::EncodedPoint::from_affine_coordinates(
        pad(unique.x().value()).as_slice().into(),
        pad(unique.y().value()).as_slice().into(),
        false,
    );
    let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point).unwrap();
    let Signature::EcDsa(sig) = Signature::unmarshall(signature).unwrap() else {
        panic!("not an ECDSA signature");
    };
    assert_eq!(sig.hashing_algorithm(), HashingAlgorithm::Sha256);
    let sig = p256::ecdsa::Signature::from_scalars(
        *p256::FieldBytes::from_slice(&pad(sig.signature_r().value())),
        *p256::FieldBytes::from_slice(&pad(sig.signature_s().value())),
    )
    .unwrap();
    key.verify(attest_bytes, &sig)
        .expect("the AK's signature over TPMS_ATTEST verifies");
    let mut tampered = attest_bytes.to_vec();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(key.verify(&tampered, &sig).is_err());
    info.pcr_digest().value().to_vec()
}

/// (e): the nonce comes back in extraData, the AK's P-256 signature verifies over the
/// TPMS_ATTEST bytes, the PCR digest is SHA-256 over the PCR_Read values, and extending
/// PCR 7 changes both.
#[test]
fn quote_carries_nonce_and_pcr_digest() {
    let (tpm, mut dev) = start();
    let ek = dev.ek().unwrap();
    let ak = dev.create_ak(&ek).unwrap();

    // All 24 PCRs: three PCR_Read calls of at most eight.
    let all: Vec<u8> = (0..24).collect();
    let values = timed("pcr_read_sha256(0..24)", || {
        dev.pcr_read_sha256(&all).unwrap()
    });
    assert_eq!(values.keys().copied().collect::<Vec<_>>(), all);
    assert!(values.values().all(|v| v.len() == 32));

    let selection = [0u8, 1, 2, 3, 4, 5, 6, 7];
    let nonce: Vec<u8> = (100u8..132).collect();
    let before = dev.pcr_read_sha256(&selection).unwrap();
    assert_eq!(before[&7], vec![0u8; 32], "fresh swtpm: PCR 7 is zero");
    let quote = timed("quote sha256:0-7", || {
        dev.quote(&ak, &nonce, &selection).unwrap()
    });
    let digest = check_quote(&ak, &nonce, &quote.attest, &quote.signature);
    assert_eq!(digest, pcr_digest(&before), "(e) PCR digest");

    let status = Command::new("tpm2_pcrextend")
        .envs(tpm.envs())
        .arg(format!("7:sha256={}", "ab".repeat(32)))
        .status()
        .unwrap();
    assert!(status.success());
    let after = dev.pcr_read_sha256(&selection).unwrap();
    assert_ne!(after[&7], before[&7], "PCR 7 changed");
    let expected7 = Sha256::new()
        .chain_update(&before[&7])
        .chain_update([0xabu8; 32])
        .finalize()
        .to_vec();
    assert_eq!(after[&7], expected7, "extend = H(old || digest)");
    assert_eq!(after[&0], before[&0]);

    let nonce2 = vec![7u8; 32];
    let quote2 = dev.quote(&ak, &nonce2, &selection).unwrap();
    let digest2 = check_quote(&ak, &nonce2, &quote2.attest, &quote2.signature);
    assert_ne!(digest2, digest);
    assert_eq!(digest2, pcr_digest(&after));

    // A nonce over 64 bytes cannot be qualifying data; PCR 24 does not exist.
    assert!(matches!(
        dev.quote(&ak, &[0u8; 65], &selection),
        Err(Error::AttestationRejected(_))
    ));
    assert!(dev.pcr_read_sha256(&[24]).is_err());

    dev.flush_ak(ak).unwrap();
    dev.flush_ek(ek).unwrap();
    assert_nothing_loaded(&mut dev);
}

/// (g): whole attestations back to back on one device never leave objects or sessions
/// behind (swtpm has three object slots: a leak would fail the fourth with 0x902).
#[test]
fn attestations_back_to_back_leave_nothing_loaded() {
    let (_tpm, mut dev) = start();
    let nonce = [9u8; 32];
    for i in 0..5 {
        let t = Instant::now();
        let ek = dev.ek().unwrap();
        let ak = dev.create_ak(&ek).unwrap();
        let made = make_credential(&ek.public, &ak.name, &secret()).unwrap();
        let got = dev
            .activate_credential(&ak, &ek, &made.credential_blob, &made.encrypted_secret)
            .unwrap();
        assert_eq!(got, secret());
        let values = dev.pcr_read_sha256(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        let quote = dev.quote(&ak, &nonce, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert_eq!(
            check_quote(&ak, &nonce, &quote.attest, &quote.signature),
            pcr_digest(&values)
        );
        dev.flush_ak(ak).unwrap();
        dev.flush_ek(ek).unwrap();
        assert_nothing_loaded(&mut dev);
        eprintln!("attestation {i} (agent side, RSA EK): {:?}", t.elapsed());
    }
}

/// Opening a TPM flushes what an earlier process left loaded.
#[test]
fn open_flushes_objects_leaked_by_an_earlier_process() {
    let (tpm, mut dev) = start();
    let ek = dev.ek_of(EkAlgorithm::EccP384).unwrap();
    let ak = dev.create_ak(&ek).unwrap();
    assert_eq!(dev.loaded_handles().unwrap().len(), 2);
    // A crash: nothing is flushed.
    std::mem::forget((ek, ak));
    std::mem::forget(dev);

    let mut dev = timed("open (with 2 leaked objects)", || {
        TpmDevice::open(&tpm.tcti()).unwrap()
    });
    assert_nothing_loaded(&mut dev);
    let ek = dev.ek().unwrap();
    dev.flush_ek(ek).unwrap();
}

/// A TCTI nobody answers on is KeyUnavailable, naming the TCTI and what to check.
#[test]
fn unreachable_tpm_is_unavailable_and_says_where() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let t = Instant::now();
    let err = TpmDevice::open(&tcti).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10));
    let Error::KeyUnavailable(msg) = &err else {
        panic!("{err:?}");
    };
    assert!(
        msg.contains(&tcti) && msg.contains("swtpm running"),
        "{msg}"
    );
    eprintln!("{msg}");

    let err = TpmDevice::open("device:/nonexistent/tpmrm0").unwrap_err();
    assert!(matches!(err, Error::KeyUnavailable(_)), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/tpmrm0"), "{err}");
    eprintln!("{err}");
}

/// The NV constants the lab documents are the ones the device reads.
#[test]
fn ek_certificate_indices_match_the_lab() {
    assert_eq!(EkAlgorithm::Rsa2048.cert_nv_index(), NV_EK_CERT_RSA2048);
    assert_eq!(EkAlgorithm::EccP384.cert_nv_index(), NV_EK_CERT_ECC_P384);
}

/// A TPM that goes away mid-attestation is KeyUnavailable (retryable), not an internal
/// error.
#[test]
fn tpm_gone_mid_attestation_is_unavailable() {
    let (tpm, mut dev) = start();
    let ek = dev.ek().unwrap();
    drop(tpm);
    let err = dev.create_ak(&ek).unwrap_err();
    assert!(matches!(err, Error::KeyUnavailable(_)), "{err:?}");
    eprintln!("{err}");
    let err = dev.pcr_read_sha256(&[0]).unwrap_err();
    assert!(matches!(err, Error::KeyUnavailable(_)), "{err:?}");
    std::mem::forget(ek);
}
