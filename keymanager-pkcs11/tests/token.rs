//! The PKCS#11 key manager against SoftHSM2: conformance, persistence, non-export,
//! certificates, token selection by serial, parallel sessions, raw rate.
//!
//! Each test runs in a child process with its own token (`softhsm_test`), because
//! SoftHSM2 reads `SOFTHSM2_CONF` from the environment when the module initialises.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::process::Command;
use std::time::Duration;

use carapace_core::plugin::KeyManager;
use carapace_core::testing::{check_after_restart, create_for_restart, key_manager_conformance};
use carapace_core::{Error, KeyType, SignatureAlgorithm};
use carapace_keymanager_pkcs11::{Pkcs11Config, Pkcs11KeyManager};
use hsm_sim::softhsm::softhsm_test;

use common::config;

#[tokio::test]
async fn conformance() {
    let Some(token) = softhsm_test("conformance", "conformance") else {
        return;
    };
    common::init_logging();
    let km = Pkcs11KeyManager::open(&config(&token)).unwrap();
    assert_eq!(km.name(), "pkcs11");
    assert_eq!(km.sessions(), 4);
    key_manager_conformance(&km, &KeyType::ALL).await;
    assert!(km.list_keys().await.unwrap().is_empty());
    // 8 threads on 4 sessions: calls into the token really overlapped.
    let overlapped = km.testing_max_in_flight();
    assert!(
        overlapped >= 2,
        "at most {overlapped} sessions were ever in use at once"
    );
    println!("max sessions in use at once: {overlapped}");
    assert_eq!(km.reconnects(), 0);
}

#[tokio::test]
async fn keys_survive_restart() {
    let Some(token) = softhsm_test("keys_survive_restart", "restart") else {
        return;
    };
    let cfg = config(&token);
    let km = Pkcs11KeyManager::open(&cfg).unwrap();
    let before = create_for_restart(&km, &KeyType::ALL).await;
    drop(km); // closes the sessions and finalises the module

    // Another program sees the objects with their labels (the module is finalised).
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&token.module)
        .args(["--token-label", &token.label, "--login", "--pin"])
        .arg(&token.user_pin)
        .arg("--list-objects")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{listing}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kt in KeyType::ALL {
        assert!(
            listing.contains(&format!("label:      carapace-restart-{kt}")),
            "pkcs11-tool does not list carapace-restart-{kt}:\n{listing}"
        );
    }

    let km = Pkcs11KeyManager::open(&cfg).unwrap();
    check_after_restart(&km, &before).await;
    let ids: Vec<String> = km
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(
        ids,
        ["restart-ec-p256", "restart-ec-p384", "restart-rsa-2048"]
    );

    // A key manager with another prefix sees none of them.
    let other = Pkcs11KeyManager::open(&Pkcs11Config {
        key_label_prefix: Some("other-".into()),
        ..cfg.clone()
    })
    .unwrap();
    assert!(other.list_keys().await.unwrap().is_empty());
    assert!(matches!(
        other.get_key("restart-ec-p256").await,
        Err(Error::KeyNotFound(_))
    ));
    // ... and the empty prefix (the upstream authority's) sees them by full label.
    let all = Pkcs11KeyManager::open(&Pkcs11Config {
        key_label_prefix: Some(String::new()),
        ..cfg
    })
    .unwrap();
    let key = all.get_key("carapace-restart-ec-p256").await.unwrap();
    assert_eq!(key.public_key_der(), before[0].public_key_der);
}

#[tokio::test]
async fn private_keys_do_not_leave_the_token() {
    let Some(token) = softhsm_test("private_keys_do_not_leave_the_token", "nonexport") else {
        return;
    };
    let km = Pkcs11KeyManager::open(&config(&token)).unwrap();
    for kt in KeyType::ALL {
        let id = format!("secret-{kt}");
        km.generate_key(&id, kt).await.unwrap();
        let attrs = km.private_key_attributes(&id).unwrap();
        assert!(attrs.token, "{kt}: {attrs:?}");
        assert!(attrs.private, "{kt}: {attrs:?}");
        assert!(attrs.sensitive, "{kt}: {attrs:?}");
        assert!(!attrs.extractable, "{kt}: {attrs:?}");
        assert!(attrs.always_sensitive, "{kt}: {attrs:?}");
        assert!(attrs.never_extractable, "{kt}: {attrs:?}");
        assert_eq!(
            km.try_read_private_value(&id).unwrap(),
            None,
            "{kt}: the token returned secret key material"
        );
    }
    assert!(matches!(
        km.private_key_attributes("missing"),
        Err(Error::KeyNotFound(_))
    ));

    // The key manager's Debug output carries no PIN.
    let debug = format!("{km:?}");
    assert!(!debug.contains(&token.user_pin), "{debug}");
    assert!(debug.contains("nonexport"), "{debug}");
}

#[tokio::test]
async fn certificates_stored_next_to_keys() {
    let Some(token) = softhsm_test("certificates_stored_next_to_keys", "certs") else {
        return;
    };
    let km = Pkcs11KeyManager::open(&Pkcs11Config {
        key_label_prefix: Some(String::new()),
        ..config(&token)
    })
    .unwrap();
    assert_eq!(km.find_certificate("root").unwrap(), None);
    km.generate_key("root", KeyType::EcP256).await.unwrap();
    let first = rcgen::generate_simple_self_signed(vec!["first.test".into()])
        .unwrap()
        .cert
        .der()
        .to_vec();
    km.store_certificate("root", &first).unwrap();
    assert_eq!(km.find_certificate("root").unwrap(), Some(first));
    let second = rcgen::generate_simple_self_signed(vec!["second.test".into()])
        .unwrap()
        .cert
        .der()
        .to_vec();
    km.store_certificate("root", &second).unwrap();
    assert_eq!(km.find_certificate("root").unwrap(), Some(second.clone()));
    // The certificate does not make a key: listing shows the one key pair.
    let listed = km.list_keys().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(matches!(
        km.store_certificate("root", b"not a certificate"),
        Err(Error::KeyBackend(m)) if m.contains("not a DER X.509 certificate")
    ));
    // Deleting the key keeps the certificate.
    km.delete_key("root").await.unwrap();
    assert_eq!(km.find_certificate("root").unwrap(), Some(second));
}

#[tokio::test]
async fn token_found_by_serial() {
    let Some(token) = softhsm_test("token_found_by_serial", "by-serial") else {
        return;
    };
    let cfg = Pkcs11Config {
        token_label: None,
        token_serial: Some(token.serial.clone()),
        // The child's environment holds the PIN too: exercise pin_env.
        pin_file: None,
        pin_env: Some(hsm_sim::softhsm::ENV_USER_PIN.into()),
        sessions: Some(2),
        ..config(&token)
    };
    let km = Pkcs11KeyManager::open(&cfg).unwrap();
    assert_eq!(km.sessions(), 2);
    // SoftHSM2 moves an initialised token off slot 0.
    assert_ne!(km.testing_slot_id(), Some(0));
    let key = km.generate_key("by-serial", KeyType::EcP384).await.unwrap();
    let sig = key
        .sign(SignatureAlgorithm::EcdsaP384Sha384, b"hello")
        .unwrap();
    carapace_core::crypto::verify_signature(
        key.public_key_der(),
        SignatureAlgorithm::EcdsaP384Sha384,
        b"hello",
        &sig,
    )
    .unwrap();

    let wrong = Pkcs11KeyManager::open(&Pkcs11Config {
        token_serial: Some("0000000000000000".into()),
        ..cfg
    })
    .unwrap_err()
    .to_string();
    assert!(
        wrong.contains("no token with serial \"0000000000000000\""),
        "{wrong}"
    );
    assert!(wrong.contains(&token.serial), "{wrong}");
}

#[tokio::test]
async fn raw_sign_rate() {
    let Some(token) = softhsm_test("raw_sign_rate", "rate") else {
        return;
    };
    let km = Pkcs11KeyManager::open(&config(&token)).unwrap();
    km.generate_key("bench", KeyType::EcP256).await.unwrap();
    let one = km
        .raw_sign_rate("bench", 1, Duration::from_millis(300))
        .unwrap();
    let four = km
        .raw_sign_rate("bench", 4, Duration::from_millis(300))
        .unwrap();
    println!("SoftHSM2 raw CKM_ECDSA P-256: {one:.0}/s on 1 session, {four:.0}/s on 4");
    assert!(one > 50.0, "{one}");
    assert!(four > 50.0, "{four}");
    assert!(
        km.raw_sign_rate("bench", 0, Duration::from_millis(10))
            .is_err()
    );
    assert!(
        km.raw_sign_rate("bench", 5, Duration::from_millis(10))
            .is_err()
    );
    assert!(matches!(
        km.raw_sign_rate("missing", 1, Duration::from_millis(10)),
        Err(Error::KeyNotFound(_))
    ));
    // The pool is whole afterwards.
    let key = km.get_key("bench").await.unwrap();
    carapace_core::testing::concurrent_signing(key);
}
