//! Every way opening a token can fail gives a message naming the problem and the fix,
//! and never the PIN.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use carapace_core::Error;
use carapace_keymanager_pkcs11::{Pkcs11Config, Pkcs11KeyManager};
use hsm_sim::softhsm::softhsm_test;

use common::config;

fn open_err(cfg: &Pkcs11Config) -> String {
    match Pkcs11KeyManager::open(cfg) {
        Ok(_) => panic!("open succeeded with {cfg:?}"),
        Err(e @ Error::KeyBackend(_)) => e.to_string(),
        Err(other) => panic!("expected KeyBackend, got {other:?}"),
    }
}

fn write_pin(path: &PathBuf, pin: &str, mode: u32) {
    std::fs::write(path, pin).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn wrong_pin_is_refused_with_the_fix() {
    let Some(token) = softhsm_test("wrong_pin_is_refused_with_the_fix", "wrong-pin") else {
        return;
    };
    let wrong = token.pin_file.with_file_name("wrong.pin");
    write_pin(&wrong, "0000000000000000\n", 0o600);
    let cfg = Pkcs11Config {
        pin_file: Some(wrong.clone()),
        ..config(&token)
    };
    let msg = open_err(&cfg);
    println!("{msg}");
    assert!(
        msg.contains("the token rejected the PIN (CKR_PIN_INCORRECT)"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("pin_file {}", wrong.display())),
        "{msg}"
    );
    assert!(
        msg.contains("repeated failures may lock the token"),
        "{msg}"
    );
    assert!(!msg.contains("0000000000000000") && !msg.contains(&token.user_pin));

    // The failed attempt left nothing behind: the right PIN works.
    let km = Pkcs11KeyManager::open(&config(&token)).unwrap();
    drop(km);
}

#[test]
fn pin_file_readable_by_others_is_refused() {
    let Some(token) = softhsm_test("pin_file_readable_by_others_is_refused", "pin-mode") else {
        return;
    };
    std::fs::set_permissions(&token.pin_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let msg = open_err(&config(&token));
    println!("{msg}");
    assert!(msg.contains("has mode 644"), "{msg}");
    assert!(
        msg.contains(&format!("(chmod 600 {})", token.pin_file.display())),
        "{msg}"
    );
    assert!(!msg.contains(&token.user_pin));

    let missing = token.pin_file.with_file_name("missing.pin");
    let msg = open_err(&Pkcs11Config {
        pin_file: Some(missing.clone()),
        ..config(&token)
    });
    println!("{msg}");
    assert!(
        msg.contains(&format!("pin_file {} cannot be read", missing.display())),
        "{msg}"
    );
}

#[test]
fn unknown_token_lists_the_tokens_present() {
    let Some(token) = softhsm_test("unknown_token_lists_the_tokens_present", "present") else {
        return;
    };
    let msg = open_err(&Pkcs11Config {
        token_label: Some("absent".into()),
        ..config(&token)
    });
    println!("{msg}");
    assert!(msg.contains("no token with label \"absent\""), "{msg}");
    assert!(
        msg.contains(&format!(
            "tokens present: \"present\" (serial {})",
            token.serial
        )),
        "{msg}"
    );
    assert!(msg.contains("check token_label"), "{msg}");
    assert!(msg.contains("SOFTHSM2_CONF"), "{msg}");
    assert!(msg.contains("owned by another user"), "{msg}");
}

#[test]
fn pin_env_unset_is_refused() {
    let msg = open_err(&Pkcs11Config {
        module: "/usr/lib/softhsm/libsofthsm2.so".into(),
        token_label: Some("any".into()),
        pin_env: Some("CARAPACE_TEST_PIN_THAT_IS_NOT_SET".into()),
        ..Default::default()
    });
    println!("{msg}");
    assert!(
        msg.contains("pin_env: environment variable CARAPACE_TEST_PIN_THAT_IS_NOT_SET is not set"),
        "{msg}"
    );
}

#[test]
fn missing_module_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    write_pin(&pin, "1234", 0o600);
    let cfg = Pkcs11Config {
        module: "/nonexistent/libvendor-pkcs11.so".into(),
        token_label: Some("any".into()),
        pin_file: Some(pin.clone()),
        ..Default::default()
    };
    let msg = open_err(&cfg);
    println!("{msg}");
    assert_eq!(
        msg,
        "key manager: pkcs11: PKCS#11 module /nonexistent/libvendor-pkcs11.so could not be \
         loaded: no such file; check `module` (SoftHSM2: apt-get install softhsm2, \
         /usr/lib/softhsm/libsofthsm2.so)"
    );
    // A file that is not a shared library.
    let msg = open_err(&Pkcs11Config {
        module: pin.clone(),
        ..cfg
    });
    println!("{msg}");
    assert!(msg.contains("could not be loaded"), "{msg}");
    assert!(msg.contains("check `module`"), "{msg}");
}

#[test]
fn token_and_pin_settings_must_name_exactly_one() {
    let base = Pkcs11Config {
        module: "/usr/lib/softhsm/libsofthsm2.so".into(),
        token_label: Some("a".into()),
        pin_env: Some("PIN".into()),
        ..Default::default()
    };
    let both = open_err(&Pkcs11Config {
        token_serial: Some("123".into()),
        ..base.clone()
    });
    assert!(
        both.contains("token_label and token_serial: set exactly one of them, not both"),
        "{both}"
    );
    let neither = open_err(&Pkcs11Config {
        token_label: None,
        ..base.clone()
    });
    assert!(neither.contains("token_label or token_serial"), "{neither}");
    let pins = open_err(&Pkcs11Config {
        pin_file: Some("/x".into()),
        ..base.clone()
    });
    assert!(pins.contains("pin_file and pin_env"), "{pins}");
    let sessions = open_err(&Pkcs11Config {
        sessions: Some(0),
        ..base
    });
    assert!(
        sessions.contains("sessions: 0 is not between 1 and 64"),
        "{sessions}"
    );
}

#[test]
fn softhsm_without_its_configuration() {
    // This process has no SOFTHSM2_CONF pointing at a token directory of ours; whatever
    // SoftHSM2 finds (the system tokendir, or nothing), the token is not there and the
    // message says where SoftHSM2 looks.
    if std::env::var_os("SOFTHSM2_CONF").is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    write_pin(&pin, "1234", 0o600);
    let msg = open_err(&Pkcs11Config {
        module: "/usr/lib/softhsm/libsofthsm2.so".into(),
        token_label: Some("carapace-surely-absent".into()),
        pin_file: Some(pin),
        ..Default::default()
    });
    println!("{msg}");
    assert!(msg.contains("SOFTHSM2_CONF is not set"), "{msg}");
}
