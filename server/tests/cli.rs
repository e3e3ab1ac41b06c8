//! The `carapace-server` binary's own command line: help, validate, and refusing a bad
//! configuration before starting anything.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::Command;

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_carapace-server"))
}

#[test]
fn help_lists_every_command() {
    let out = server().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for cmd in [
        "run",
        "validate",
        "entry",
        "agent",
        "bundle",
        "token",
        "x509",
        "healthcheck",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
}

#[test]
fn validate_accepts_the_shipped_samples() {
    for name in ["server.toml", "server.full.toml"] {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/").to_owned() + name;
        let out = server()
            .args(["validate", "--config", &path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// `validate --config` on a file holding `text`; it must exit 64 (config problems).
fn validate_bad(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = server()
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    out
}

#[test]
fn validate_lists_every_problem_and_exits_64() {
    let out = validate_bad(
        "trust_domain = \"UPPER.case\"\nbind_address = \"nowhere\"\nca_key_type = \"dsa\"\n[key_manager.hsm]\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "trust_domain",
        "bind_address",
        "ca_key_type",
        "key_manager.hsm",
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 problem(s)"));
}

#[test]
fn validate_lists_every_hsm_and_upstream_problem() {
    let out = validate_bad(
        "[key_manager.pkcs11]\nmodule = \"/nope.so\"\ntoken_label = \"a\"\ntoken_serial = \"b\"\n\
         sessions = 0\n[upstream_authority.pkcs11]\nmodule = \"/x.so\"\ntoken_label = \"r\"\n\
         pin_env = \"P\"\nkey_label = \"bad label!\"\n[upstream_authority.disk]\ncert_file = \"x\"\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "upstream_authority: at most one",
        "token_label and token_serial",
        "pin_file or pin_env",
        "sessions: 0",
        "upstream_authority.disk: missing field `key_file`",
        "key_label",
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
}

#[test]
fn validate_lists_every_kerberos_problem() {
    let out = validate_bad(
        "[node_attestor.kerberos]\nkeytab = \"/k\"\nservice_principal = \"carapace\"\n\
         allowed_realms = [\"LAB/TEST\"]\n\
         [node_attestor.kerberos.machine_account_domains]\n\"AD.TEST\" = \"corp\"\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "service_principal: principal \"carapace\" has no realm",
        "allowed_realms: realm \"LAB/TEST\"",
        "machine_account_domains names realm \"AD.TEST\", which is not in allowed_realms",
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
}

#[test]
fn validate_lists_every_ssh_and_cloud_attestor_problem() {
    let out = validate_bad(
        "[node_attestor.sshpop]\ncanonical_domain = \"bad domain\"\n\
         [node_attestor.aws_iid]\naccount_allowlist = [\"12345\"]\n\
         [node_attestor.gcp_iit]\nkeys_path = \"google.json\"\naudience = \"\"\n\
         projectid_allowlist = []\n\
         [node_attestor.azure_msi]\naudience = \"https://management.azure.com/\"\n\
         [node_attestor.azure_msi.tenants.\"not-a-guid\"]\nkeys_path = \"k.json\"\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "node_attestor.sshpop: no SSH CA is trusted",
        "canonical_domain: \"bad domain\" is not a DNS domain",
        "node_attestor.aws_iid: missing field `region_certificates`",
        "node_attestor.gcp_iit: audience is empty",
        "projectid_allowlist is empty",
        "node_attestor.azure_msi: audience \"https://management.azure.com/\" is an Azure API",
        "\"not-a-guid\" is not a tenant ID",
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 problem(s)"));
}

#[test]
fn upstream_commands_need_an_upstream_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.toml");
    std::fs::write(&path, "trust_domain = \"example.org\"\n").unwrap();
    let out = server()
        .args(["upstream", "init", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no [upstream_authority.disk]"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_refuses_a_bad_config_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = server()
        .args(["run", "--trust-domain", "spiffe://bad/path", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust_domain"));
    assert!(!data.exists(), "nothing may be written for a bad config");
}

#[test]
fn run_refuses_a_data_dir_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = server()
        .args(["run", "--bind-address", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--admin-socket")
        .arg(dir.path().join("a.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 700"), "{err}");
    assert!(!data.join("datastore.sqlite3").exists());
}
