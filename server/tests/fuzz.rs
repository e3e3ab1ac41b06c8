#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! Property tests of the server's parsers of peer and operator bytes: the agents' CSRs
//! (`ca::csr_public_key_der`), join tokens, and the config file (`config::parse_file`,
//! `validate`).

use carapace_core::plugin::{AttestationContext, NodeAttestor};
use carapace_fuzzkit::proptest;
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, bytes, config, mutated, mutated_text};
use carapace_server::ca::{csr_public_key, csr_public_key_der};
use carapace_server::config::{Overrides, parse_file, validate};
use carapace_server::datastore::{AttestedAgent, Datastore};
use carapace_server::node_attestor::{JoinTokenAttestor, generate_join_token, presented_token};

const FULL_SAMPLE: &str = include_str!("../../conf/server.full.toml");
const SHORT_SAMPLE: &str = include_str!("../../conf/server.toml");

/// Top-level keys of the server's config file.
const KEYS: [&str; 12] = [
    "trust_domain",
    "data_dir",
    "bind_address",
    "admin_socket",
    "log_level",
    "log_format",
    "default_x509_svid_ttl",
    "agent_svid_ttl",
    "ca_ttl",
    "ca_key_type",
    "ca_organization",
    "ca_country",
];

fn csrs() -> Vec<Vec<u8>> {
    [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
    ]
    .into_iter()
    .map(|alg| {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    })
    .collect()
}

proptest! {
    #![proptest_config(config(1000))]

    /// Never a panic; an accepted CSR gives the key it was signed with (a mutation of the
    /// signed part cannot change the key the server certifies).
    #[test]
    fn csrs_never_panic_and_only_give_the_signing_key(
        (seed, csr) in (0..2usize).prop_flat_map(|i| {
            let seeds = csrs_cached();
            (Just(i), prop_oneof![1 => bytes(200), 6 => mutated(vec![seeds[i].clone()])])
        }),
    ) {
        let result = bounded("CSR", csr.len(), || csr_public_key_der(&csr));
        if let Ok(spki) = result {
            // The key is the one the seed was signed with: mutations that keep the
            // signature valid only touch unsigned bytes.
            prop_assert_eq!(spki, csr_public_key_der(&csrs_cached()[seed]).unwrap());
            prop_assert!(csr_public_key(&csr).is_ok());
        }
    }

    /// The config file: never a panic on any text; every problem reported.
    #[test]
    fn config_files_never_panic(text in prop_oneof![
        1 => "\\PC{0,200}",
        6 => mutated_text(vec![FULL_SAMPLE.to_owned(), SHORT_SAMPLE.to_owned()]),
    ]) {
        if let Ok(file) = bounded("server config", text.len(), || parse_file(&text)) {
            let _ = validate(file, Overrides::default());
        }
    }

    /// A key the server does not know is reported by name, wherever the rest is valid.
    #[test]
    fn unknown_keys_are_named(key in "[a-z][a-z_]{2,24}") {
        prop_assume!(!KEYS.contains(&key.as_str()) && !["key_manager", "node_attestor", "upstream_authority"].contains(&key.as_str()));
        let text = format!("{key} = 1\n{SHORT_SAMPLE}");
        let problems = parse_file(&text).unwrap_err();
        prop_assert!(problems.iter().any(|p| p.contains(&key)), "{:?}", problems);
    }

    /// A known key with a value of the wrong type is reported by name.
    #[test]
    fn mistyped_keys_are_named(i in 0..KEYS.len(), value in prop_oneof![Just("[1, 2]"), Just("{ a = 1 }"), Just("true"), Just("-3")]) {
        let key = KEYS[i];
        let text = format!("{key} = {value}\n");
        if let Err(problems) = parse_file(&text) {
            prop_assert!(problems.iter().any(|p| p.contains(key)), "{:?}", problems);
        }
    }
}

fn csrs_cached() -> &'static [Vec<u8>] {
    static CSRS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    CSRS.get_or_init(csrs)
}

#[test]
fn the_seeds_are_accepted() {
    for csr in csrs_cached() {
        csr_public_key_der(csr).unwrap();
    }
    let file = parse_file(FULL_SAMPLE).unwrap();
    validate(file, Overrides::default()).unwrap();
}

proptest! {
    #![proptest_config(config(200))]

    /// Join tokens from agents: never a panic; no altered token passes the attestor or
    /// is consumed by the agent write (so none burns the genuine one), and the genuine
    /// one still admits exactly one agent afterwards.
    #[test]
    fn altered_join_tokens_never_attest_or_burn_the_token(
        edits in proptest::collection::vec(mutated(vec![b"seed".to_vec()]), 1..8),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let ds = Datastore::open_in_memory().await.unwrap();
            let t = generate_join_token();
            let now = carapace_core::clock::unix_now();
            ds.create_join_token(&t.id, &t.secret_hash, now + 600, now, None).await.unwrap();
            let attestor = JoinTokenAttestor::new(ds.clone());
            // The record the server writes for the agent a token admits, with the token
            // consumed in the same transaction.
            let admitted = |id: &str| AttestedAgent {
                spiffe_id: format!("spiffe://example.org/spire/agent/join_token/{id}")
                    .parse()
                    .unwrap(),
                attestor: "join_token".into(),
                serial: "01".into(),
                new_serial: None,
                expires_at: now + 3600,
                banned: false,
                reattestable: false,
                attested_at: now,
                selectors: Default::default(),
                refused: None,
            };
            let ctx = AttestationContext { agent_public_key: Vec::new(), tls_exporter: vec![0; 32] };
            let genuine = t.token.as_bytes().to_vec();
            for e in &edits {
                // Each edit list's bytes steer a mutation of the genuine token.
                let mut altered = genuine.clone();
                for (i, b) in e.iter().enumerate() {
                    let at = (usize::from(*b) + i * 31) % altered.len();
                    match b % 4 {
                        0 => altered[at] ^= 1 + (b >> 2),
                        1 => { altered.remove(at); }
                        2 => altered.insert(at, *b),
                        _ => altered.truncate(at),
                    }
                    if altered.is_empty() { break; }
                }
                if altered == genuine {
                    continue;
                }
                let result = attestor.begin(&altered, &ctx).await;
                prop_assert!(result.is_err(), "an altered token attested: {:?}", String::from_utf8_lossy(&altered));
                if let Some(p) = presented_token(&altered) {
                    prop_assert!(ds.attest_agent(&admitted(&p.id), Some(&p)).await.is_err());
                }
            }
            prop_assert!(attestor.begin(&genuine, &ctx).await.is_ok());
            let token = presented_token(&genuine).unwrap();
            prop_assert!(ds.attest_agent(&admitted(&token.id), Some(&token)).await.is_ok());
            prop_assert!(ds.attest_agent(&admitted(&token.id), Some(&token)).await.is_err());
            prop_assert!(attestor.begin(&genuine, &ctx).await.is_err());
            Ok(())
        })?;
    }
}
