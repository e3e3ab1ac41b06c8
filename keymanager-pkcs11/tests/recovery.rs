//! The session pool survives the token going away and coming back.
//!
//! What callers see: a failure that means the connection is gone marks the pool broken
//! and reconnects at once; signing and lookups are retried once after a successful
//! reconnection, so a reset token that is back at once costs nothing. While the token
//! stays away, calls fail with `KeyUnavailable` and a reconnection is attempted at most
//! once a second. Signers obtained before keep working.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use carapace_core::plugin::{KeyManager, KeySigner};
use carapace_core::{Error, KeyType, SignatureAlgorithm};
use carapace_keymanager_pkcs11::{Pkcs11Config, Pkcs11KeyManager, RECONNECT_INTERVAL};
use hsm_sim::softhsm::softhsm_test;

use common::config;

fn sign_ok(key: &dyn KeySigner) {
    let alg = key.key_type().x509_algorithm();
    let sig = key.sign(alg, b"recovery").unwrap();
    carapace_core::crypto::verify_signature(key.public_key_der(), alg, b"recovery", &sig).unwrap();
}

#[tokio::test]
async fn device_reset_is_invisible_to_callers() {
    let Some(token) = softhsm_test("device_reset_is_invisible_to_callers", "reset") else {
        return;
    };
    common::init_logging();
    let km = Pkcs11KeyManager::open(&config(&token)).unwrap();
    let ec = km.generate_key("ec", KeyType::EcP256).await.unwrap();
    let rsa = km.generate_key("rsa", KeyType::Rsa2048).await.unwrap();
    sign_ok(ec.as_ref());

    // Every session and the login are gone, as after a device reset.
    km.testing_simulate_device_reset().unwrap();
    sign_ok(ec.as_ref()); // fails with CKR_SESSION_HANDLE_INVALID, reconnects, retries
    assert_eq!(km.reconnects(), 1);
    sign_ok(rsa.as_ref());
    rsa.sign(SignatureAlgorithm::RsaPssSha256, b"pss").unwrap();
    assert_eq!(km.list_keys().await.unwrap().len(), 2);

    // A lookup as the first call after a reset.
    km.testing_simulate_device_reset().unwrap();
    let again = km.get_key("ec").await.unwrap();
    assert_eq!(again.public_key_der(), ec.public_key_der());
    assert_eq!(km.reconnects(), 2);

    // Logged out behind our back: CKR_USER_NOT_LOGGED_IN, then the same.
    km.testing_logout().unwrap();
    sign_ok(ec.as_ref());
    assert_eq!(km.reconnects(), 3);

    // Generation is not retried: it fails once with KeyUnavailable, the next call
    // reconnects.
    km.testing_simulate_device_reset().unwrap();
    match km.generate_key("new", KeyType::EcP256).await {
        Err(Error::KeyUnavailable(msg)) => {
            println!("{msg}");
            assert!(msg.contains("CKR_SESSION_HANDLE_INVALID"), "{msg}");
        }
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    // The reconnection is due at once (the last attempt was not a failed reconnection).
    let new = km.generate_key("new", KeyType::EcP256).await.unwrap();
    sign_ok(new.as_ref());
    assert_eq!(km.reconnects(), 4);
}

#[tokio::test]
async fn token_directory_outage() {
    let Some(token) = softhsm_test("token_directory_outage", "outage") else {
        return;
    };
    common::init_logging();
    let km = Pkcs11KeyManager::open(&config(&token)).unwrap();
    let key = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    sign_ok(key.as_ref());

    // The token directory disappears. SoftHSM2 (file backend) notices on the next use:
    // the objects vanish (C_FindObjects finds nothing, without an error), and a handle
    // held before is invalid (CKR_OBJECT_HANDLE_INVALID): that breaks the pool; the
    // reconnection fails (C_Initialize returns CKR_GENERAL_ERROR without its tokendir).
    let dir = token.token_dir();
    let away = dir.with_file_name("tokens-away");
    std::fs::rename(&dir, &away).unwrap();
    let alg = SignatureAlgorithm::EcdsaP256Sha256;
    let first = key.sign(alg, b"m").unwrap_err();
    println!("during the outage: {first}");
    assert!(matches!(first, Error::KeyUnavailable(_)), "{first:?}");
    // Within the reconnect interval: fails at once, says since when and why.
    let second = key.sign(alg, b"m").unwrap_err();
    println!("right after: {second}");
    match &second {
        Error::KeyUnavailable(msg) => {
            assert!(msg.contains("has been unavailable for"), "{msg}");
            assert!(msg.contains("HANDLE_INVALID"), "{msg}");
            assert!(msg.contains("last reconnection attempt"), "{msg}");
        }
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    assert!(matches!(
        km.list_keys().await,
        Err(Error::KeyUnavailable(_))
    ));
    std::thread::sleep(RECONNECT_INTERVAL + Duration::from_millis(100));
    let third = key.sign(alg, b"m").unwrap_err();
    println!("a second later: {third}");
    assert!(matches!(third, Error::KeyUnavailable(_)), "{third:?}");
    assert_eq!(km.reconnects(), 0);

    // Back: the next due reconnection succeeds, the signer from before signs.
    std::fs::rename(&away, &dir).unwrap();
    std::thread::sleep(RECONNECT_INTERVAL + Duration::from_millis(100));
    sign_ok(key.as_ref());
    assert_eq!(km.reconnects(), 1);
    assert_eq!(km.list_keys().await.unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_signing_across_resets() {
    let Some(token) = softhsm_test("concurrent_signing_across_resets", "concurrent") else {
        return;
    };
    let km = Arc::new(Pkcs11KeyManager::open(&config(&token)).unwrap());
    let key = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, unavailable) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (key, stop, ok, unavailable) =
                (key.clone(), stop.clone(), ok.clone(), unavailable.clone());
            std::thread::spawn(move || {
                let alg = SignatureAlgorithm::EcdsaP256Sha256;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("thread {t} message {i}");
                    match key.sign(alg, msg.as_bytes()) {
                        Ok(sig) => {
                            carapace_core::crypto::verify_signature(
                                key.public_key_der(),
                                alg,
                                msg.as_bytes(),
                                &sig,
                            )
                            .unwrap();
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Error::KeyUnavailable(_)) => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(other) => panic!("thread {t}: {other:?}"),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        km.testing_simulate_device_reset().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let (ok, unavailable) = (
        ok.load(Ordering::Relaxed),
        unavailable.load(Ordering::Relaxed),
    );
    println!(
        "{ok} signatures, {unavailable} KeyUnavailable, {} reconnections",
        km.reconnects()
    );
    assert!(ok > 100);
    assert_eq!(km.reconnects(), 3);
    // With an immediate reconnection and a retry, nobody saw the resets.
    assert_eq!(unavailable, 0);
    carapace_core::testing::concurrent_signing(key);
}

#[tokio::test]
async fn pin_changed_while_running_waits_for_the_new_pin() {
    let Some(token) = softhsm_test(
        "pin_changed_while_running_waits_for_the_new_pin",
        "pin-change",
    ) else {
        return;
    };
    common::init_logging();
    let km = Pkcs11KeyManager::open(&Pkcs11Config {
        sessions: Some(1),
        ..config(&token)
    })
    .unwrap();
    let key = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    // Another program changes the user PIN.
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&token.module)
        .args(["--token-label", &token.label, "--login", "--pin"])
        .arg(&token.user_pin)
        .args(["--change-pin", "--new-pin", "9999999999999999"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The next reconnection logs in with the old PIN: refused, and that PIN is never
    // tried again (repeated failures could lock the token).
    km.testing_simulate_device_reset().unwrap();
    let err = key
        .sign(SignatureAlgorithm::EcdsaP256Sha256, b"m")
        .unwrap_err();
    println!("{err}");
    match &err {
        Error::KeyBackend(msg) => assert!(msg.contains("CKR_PIN_INCORRECT"), "{msg}"),
        other => panic!("expected KeyBackend, got {other:?}"),
    }
    std::thread::sleep(RECONNECT_INTERVAL + Duration::from_millis(100));
    let again = key
        .sign(SignatureAlgorithm::EcdsaP256Sha256, b"m")
        .unwrap_err();
    assert_eq!(again, err);
    assert_eq!(km.reconnects(), 0);

    // The operator puts the new PIN in the file: the next check (at most once a second)
    // reads it and reconnects, without a restart.
    std::fs::write(&token.pin_file, "9999999999999999\n").unwrap();
    std::thread::sleep(RECONNECT_INTERVAL + Duration::from_millis(100));
    sign_ok(key.as_ref());
    assert_eq!(km.reconnects(), 1);
}
