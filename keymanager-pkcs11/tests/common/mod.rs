//! Shared by the integration tests: the key manager settings for a child's token.
#![allow(dead_code, reason = "each test file uses part of it")]

use carapace_keymanager_pkcs11::Pkcs11Config;
use hsm_sim::softhsm::ChildToken;

/// Settings naming `token` by label, with its PIN file.
pub(crate) fn config(token: &ChildToken) -> Pkcs11Config {
    Pkcs11Config {
        module: token.module.clone(),
        token_label: Some(token.label.clone()),
        token_serial: None,
        pin_file: Some(token.pin_file.clone()),
        pin_env: None,
        key_label_prefix: None,
        sessions: None,
    }
}

/// Logs to the test output (the child prints it) at debug for this crate.
pub(crate) fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("carapace_keymanager_pkcs11=debug")
        .with_test_writer()
        .try_init();
}
