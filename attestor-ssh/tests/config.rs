//! The server's settings: trusted CAs inline and from a file, and what is refused.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use carapace_attestor_ssh::server::{SshAttestor, SshServerConfig};
use carapace_core::Error;
use carapace_core::plugin::{AttestationStep, NodeAttestor, PluginContext};
use common::{Kind, Lab, ctx, payload_of};

/// `SshAttestor::new`'s refusal, as text; it must be a configuration error.
fn refused(cfg: &SshServerConfig, base: &std::path::Path) -> String {
    match SshAttestor::new(cfg, &PluginContext::for_tests(base)) {
        Ok(a) => panic!("the server accepted the settings: {a:?}"),
        Err(e) => {
            assert!(
                matches!(e, Error::PluginConfig { ref plugin, .. } if plugin == "node_attestor.sshpop"),
                "{e:?}"
            );
            e.to_string()
        }
    }
}

#[test]
fn server_config_without_any_ca_is_refused() {
    let lab = Lab::new();
    let cfg = SshServerConfig::default();
    let problems = cfg.validate().unwrap_err();
    assert!(problems[0].contains("no SSH CA is trusted"), "{problems:?}");
    assert!(refused(&cfg, lab.dir.path()).contains("no SSH CA is trusted"));

    // A file with only comments and blank lines trusts nobody either.
    std::fs::write(lab.path("cas"), "# nobody yet\n\n").unwrap();
    let cfg = SshServerConfig {
        cert_authorities_path: Some("cas".into()),
        ..SshServerConfig::default()
    };
    assert!(cfg.validate().is_ok());
    let err = refused(&cfg, lab.dir.path());
    assert!(err.contains("lists no key"), "{err}");
}

#[test]
fn server_config_with_a_bad_authorized_keys_line_is_refused_naming_it() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let good = lab.pub_line(&ca);
    let cfg = SshServerConfig {
        cert_authorities: vec![
            good.clone(),
            "ssh-ed25519 AAAA-not-a-key".into(),
            format!("restrict {good}"),
            format!("@cert-authority *.example.com {good}"),
        ],
        ..SshServerConfig::default()
    };
    let problems = cfg.validate().unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems[0].starts_with("cert_authorities[1]: not an SSH public key"),
        "{problems:?}"
    );
    assert!(
        problems[1].starts_with("cert_authorities[2]: option \"restrict\""),
        "{problems:?}"
    );
    assert!(problems[2].contains("known_hosts syntax"), "{problems:?}");
    let err = refused(&cfg, lab.dir.path());
    assert!(err.contains("cert_authorities[1]"), "{err}");

    // In a file, the line number is named.
    std::fs::write(
        lab.path("cas"),
        format!("# fleet CA\n{good}\n\nnot a key\n"),
    )
    .unwrap();
    let cfg = SshServerConfig {
        cert_authorities_path: Some(lab.path("cas")),
        ..SshServerConfig::default()
    };
    let err = refused(&cfg, lab.dir.path());
    assert!(err.contains("line 4"), "{err}");

    let cfg = SshServerConfig {
        cert_authorities: vec![good],
        canonical_domain: Some(".example.com".into()),
        ..SshServerConfig::default()
    };
    let problems = cfg.validate().unwrap_err();
    assert!(problems[0].starts_with("canonical_domain:"), "{problems:?}");
}

#[test]
fn server_config_with_an_unreadable_ca_file_is_refused() {
    let lab = Lab::new();
    let cfg = SshServerConfig {
        cert_authorities_path: Some("no-such-file".into()),
        ..SshServerConfig::default()
    };
    let err = refused(&cfg, lab.dir.path());
    // The relative path was resolved against the base directory.
    assert!(
        err.contains(&format!("{}", lab.path("no-such-file").display())),
        "{err}"
    );
}

#[tokio::test]
async fn cas_from_inline_lines_and_a_relative_file_are_all_trusted() {
    let lab = Lab::new();
    let inline = lab.keygen("inline", Kind::Ed25519);
    let filed = lab.keygen("filed", Kind::P256);
    let host = lab.keygen("host", Kind::Ed25519);
    // With and without the cert-authority option, with comments (one with spaces).
    std::fs::write(
        lab.path("cas"),
        format!(
            "# the fleet CAs\n\n   \ncert-authority {} the filed CA, 2025\n",
            lab.pub_line(&filed)
        ),
    )
    .unwrap();
    let cfg: SshServerConfig = serde_json::from_value(serde_json::json!({
        "cert_authorities": [lab.pub_line(&inline)],
        "cert_authorities_path": "cas",
        "canonical_domain": "example.com",
    }))
    .unwrap();
    let server = SshAttestor::new(&cfg, &PluginContext::for_tests(lab.dir.path())).unwrap();
    for ca in [&inline, &filed] {
        let cert = lab.host_cert(ca, &host, "host-cert.pub");
        let step = server.begin(&payload_of(&cert), &ctx(7)).await.unwrap();
        assert!(matches!(step, AttestationStep::Challenge { .. }));
    }
}

#[test]
fn server_config_refuses_unknown_fields() {
    let err = serde_json::from_str::<SshServerConfig>(r#"{"allow_forever":true}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("allow_forever"), "{err}");
}
