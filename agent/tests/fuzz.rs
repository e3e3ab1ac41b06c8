#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! Property tests of the agent's config file parsing (`carapace_common::parse_toml` into
//! `config::FileConfig`, then `config::validate`): never a panic on any text, and every
//! unknown or mistyped key reported by name. (The /proc/<pid>/cgroup parser has its own
//! in `workload_attestor/proc_cgroup.rs`.)

use carapace_agent::config::{FileConfig, Overrides, validate};
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, config, mutated_text};

const FULL_SAMPLE: &str = include_str!("../../conf/agent.full.toml");
const SHORT_SAMPLE: &str = include_str!("../../conf/agent.toml");

/// Top-level scalar keys of the agent's config file.
const KEYS: [&str; 10] = [
    "trust_domain",
    "server_address",
    "data_dir",
    "socket_path",
    "trust_bundle_path",
    "insecure_bootstrap",
    "log_level",
    "log_format",
    "workload_key_type",
    "workload_attestation_timeout",
];
const TABLES: [&str; 3] = ["key_manager", "node_attestor", "workload_attestor"];

fn parse(text: &str) -> Result<FileConfig, Vec<String>> {
    carapace_common::parse_toml(text)
}

#[test]
fn the_samples_parse() {
    parse(FULL_SAMPLE).unwrap();
    parse(SHORT_SAMPLE).unwrap();
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn config_files_never_panic(text in prop_oneof![
        1 => "\\PC{0,200}",
        6 => mutated_text(vec![FULL_SAMPLE.to_owned(), SHORT_SAMPLE.to_owned()]),
    ]) {
        if let Ok(file) = bounded("agent config", text.len(), || parse(&text)) {
            let _ = validate(file, Overrides::default());
        }
    }

    #[test]
    fn unknown_keys_are_named(key in "[a-z][a-z_]{2,24}") {
        prop_assume!(!KEYS.contains(&key.as_str()) && !TABLES.contains(&key.as_str()));
        let problems = parse(&format!("{key} = 1\n{SHORT_SAMPLE}")).unwrap_err();
        prop_assert!(problems.iter().any(|p| p.contains(&key)), "{:?}", problems);
    }

    #[test]
    fn mistyped_keys_are_named(i in 0..KEYS.len(), value in prop_oneof![Just("[1, 2]"), Just("{ a = 1 }"), Just("-3"), Just("\"x\"")]) {
        let key = KEYS[i];
        if let Err(problems) = parse(&format!("{key} = {value}\n")) {
            prop_assert!(problems.iter().any(|p| p.contains(key)), "{:?}", problems);
        }
    }
}
