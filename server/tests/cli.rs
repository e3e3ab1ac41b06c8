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

/// Runs `cmd`, failing the test instead of hanging if it takes over 20 s.
fn output_within_20s(mut cmd: Command) -> std::process::Output {
    hsm_sim::process::output_within(&mut cmd, std::time::Duration::from_secs(20)).unwrap()
}

#[test]
fn validate_lists_type_nested_and_semantic_problems_in_one_run_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            r#"
trust_domain = "Bad Domain"
bind_address = 8081
data_dir = "{data}"
admin_socket = "{dir}/admin.sock"
ca_ttl = "9999999999999999999s"
default_x509_svid_ttl = "1 fortnight"
ca_key_type = "ec-p521"
log_format = "xml"
log_levle = "debug"
[key_manager.disk]
directory = 7
[node_attestor.join_token]
extra = true
[node_attestor.tpm]
pcrs = "all"
ek_hash_allowlist = ["ABC"]
[upstream_authority.nope]
"#,
            data = data.display(),
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let out = server()
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        // Type errors and unknown keys, each named.
        "bind_address: invalid type: integer `8081`",
        "default_x509_svid_ttl: ",
        "log_levle: unknown field `log_levle`",
        // Semantic problems of the keys that parsed.
        "trust_domain: ",
        "ca_ttl: 9999999999999999999s is outside the allowed range 10s to 36500 days",
        "ca_key_type: ",
        "log_format: \"xml\"",
        // Nested plugin problems: types, unknown keys, and the plugin's own checks.
        "key_manager.disk: directory: invalid type: integer `7`",
        "node_attestor.join_token: extra: unknown field `extra`",
        "node_attestor.tpm: pcrs: invalid type",
        "ek_hash_allowlist: \"ABC\" is not a lowercase hex SHA-256",
        "unknown upstream_authority plugin \"nope\"",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let lines = text.lines().count();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("{lines} problem(s)")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.exists(), "validate created the data dir");
    assert!(!dir.path().join("admin.sock").exists());
}

#[test]
fn validate_refuses_devices_fifos_directories_and_huge_files_promptly() {
    let dir = tempfile::tempdir().unwrap();
    for (path, needle) in hsm_sim::operator_files::not_small_regular_files(dir.path()).unwrap() {
        let mut cmd = server();
        cmd.args(["validate", "--config"]).arg(&path);
        let out = output_within_20s(cmd);
        assert_eq!(out.status.code(), Some(64), "{}", path.display());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("config file {}: {needle}", path.display())),
            "{text}"
        );
        // `run` refuses them the same way, before anything is written.
        let data = dir.path().join("data");
        let mut cmd = server();
        cmd.args(["run", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(&data);
        let out = output_within_20s(cmd);
        assert_eq!(out.status.code(), Some(64), "{}", path.display());
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle));
        assert!(!data.exists());
    }
}

#[test]
fn run_refuses_a_ca_ttl_x509_cannot_express_and_writes_no_datastore_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = dir.path().join("server.toml");
    std::fs::write(&path, "ca_ttl = \"9999999999999999999s\"\n").unwrap();
    let out = server()
        .args(["run", "--bind-address", "127.0.0.1:0", "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(&data)
        .arg("--admin-socket")
        .arg(dir.path().join("a.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ca_ttl: 9999999999999999999s is outside the allowed range 10s to 36500 days"),
        "{err}"
    );
    assert!(
        !data.exists(),
        "no data dir, datastore or key may be written"
    );
    // A huge SVID TTL is refused the same way (it used to panic computing ttl * 6).
    std::fs::write(
        &path,
        "default_x509_svid_ttl = \"9223372036854775807s\"\nagent_svid_ttl = \"366days\"\n",
    )
    .unwrap();
    let out = server()
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("default_x509_svid_ttl: 9223372036854775807s is outside the allowed range 10s to 365 days"),
        "{text}"
    );
    assert!(
        text.contains("agent_svid_ttl: 366 days is outside"),
        "{text}"
    );
}

#[test]
fn upstream_init_refuses_a_root_ttl_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("up.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[upstream_authority.disk]\ncert_file = \"root.pem\"\nkey_file = \"root.key\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = server()
        .args(["upstream", "init", "--ttl", "200years", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ttl: ") && err.contains("36500 days"),
        "{err}"
    );
    assert!(!dir.path().join("data").exists());
}

/// Sets `path`'s mode.
fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn validate_checks_every_file_the_plugins_name_and_reports_each_with_its_setting() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = p("data");
    let module = p("libvendorpkcs11.so");
    let pin = p("hsm.pin");
    let ek_ca = p("ek-ca");
    let keytab = p("carapace.keytab");
    let ssh_cas = p("ssh-cas");
    let root_cert = p("root.pem");
    let root_key = p("root.key");
    // What an operator gets wrong: a module path with a typo, a PIN file left 0644, a
    // directory where a PEM file goes, a keytab not copied yet, a FIFO (which must not
    // hang validate), a root certificate not made yet and a root key left 0644.
    std::fs::write(&pin, "1234\n").unwrap();
    chmod(&pin, 0o644);
    std::fs::create_dir(&ek_ca).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(&ssh_cas)
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(&root_key, "not read by validate").unwrap();
    chmod(&root_key, 0o644);
    let config = p("server.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = {data:?}
[key_manager.pkcs11]
module = {module:?}
token_label = "carapace-ca"
pin_file = {pin:?}
[node_attestor.tpm]
ek_ca_files = [{ek_ca:?}]
[node_attestor.kerberos]
keytab = {keytab:?}
service_principal = "carapace/server.lab.test@LAB.TEST"
allowed_realms = ["LAB.TEST"]
[node_attestor.sshpop]
cert_authorities_path = {ssh_cas:?}
[upstream_authority.disk]
cert_file = {root_cert:?}
key_file = {root_key:?}
"#
        ),
    )
    .unwrap();
    let mut cmd = server();
    cmd.args(["validate", "--config"]).arg(&config);
    let out = output_within_20s(cmd);
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    let d = |p: &std::path::Path| p.display().to_string();
    for line in [
        format!("key_manager.pkcs11: module {} does not exist", d(&module)),
        format!(
            "key_manager.pkcs11: pin_file {} has mode 644: it must not be accessible to group or others (chmod 600 {})",
            d(&pin),
            d(&pin)
        ),
        format!(
            "node_attestor.tpm: ek_ca_files {} is a directory; give a regular file",
            d(&ek_ca)
        ),
        format!(
            "node_attestor.kerberos: keytab {} does not exist",
            d(&keytab)
        ),
        format!(
            "node_attestor.sshpop: cert_authorities_path {} is a FIFO; give a regular file",
            d(&ssh_cas)
        ),
        format!(
            "upstream_authority.disk: cert_file {} does not exist",
            d(&root_cert)
        ),
        format!(
            "upstream_authority.disk: key_file {} has mode 644: it must not be accessible to group or others (chmod 600 {})",
            d(&root_key),
            d(&root_key)
        ),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from:\n{text}"
        );
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("7 problem(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("1234"), "the PIN was read: {text}");
    assert!(!data.exists(), "validate created the data dir");

    // The same configuration once the files are right.
    std::fs::write(&module, b"\x7fELF").unwrap();
    chmod(&pin, 0o600);
    std::fs::remove_dir(&ek_ca).unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["ek-ca".into()]).unwrap();
    std::fs::write(&ek_ca, ca.cert.pem()).unwrap();
    std::fs::write(&keytab, b"\x05\x02").unwrap();
    chmod(&keytab, 0o600);
    std::fs::remove_file(&ssh_cas).unwrap();
    std::fs::write(&ssh_cas, "# no CA yet\n").unwrap();
    std::fs::write(&root_cert, ca.cert.pem()).unwrap();
    chmod(&root_key, 0o600);
    let out = server()
        .args(["validate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok\n", d(&config))
    );
    assert!(!data.exists(), "validate created the data dir");
}

#[test]
fn validate_refuses_a_pin_file_the_server_user_cannot_read() {
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let module = dir.path().join("module.so");
    std::fs::write(&module, b"\x7fELF").unwrap();
    let pin = dir.path().join("hsm.pin");
    std::fs::write(&pin, "1234\n").unwrap();
    chmod(&pin, 0o600);
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[key_manager.pkcs11]\nmodule = {module:?}\ntoken_label = \"ca\"\npin_file = {pin:?}\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    chmod(&config, 0o644);
    let mut cmd = server();
    cmd.args(["validate", "--config"]).arg(&config);
    // The PIN file belongs to whoever runs the test, mode 0600; the server runs as
    // another user (as root, `nobody`), or, not being root, the owner's read bit is off.
    let uid = if carapace_common::euid() == 0 {
        cmd.uid(65534).gid(65534);
        65534
    } else {
        chmod(&pin, 0o200);
        carapace_common::euid()
    };
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        format!(
            "key_manager.pkcs11: pin_file {} cannot be read by this user (uid {uid}): Permission denied (os error 13)\n",
            pin.display()
        )
    );
}
