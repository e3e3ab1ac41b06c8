//! The `carapace-agent` binary's own command line.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_carapace-agent"))
}

#[test]
fn help_lists_every_command() {
    let out = agent().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "validate", "api", "healthcheck"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
    let out = agent().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--trust-domain",
        "--server-address",
        "--data-dir",
        "--socket-path",
        "--join-token",
        "--trust-bundle",
        "--insecure-bootstrap",
    ] {
        assert!(text.contains(flag), "run --help lacks {flag}");
    }
}

#[test]
fn run_requires_exactly_one_bootstrap_and_writes_nothing_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = agent()
        .args(["run", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--trust-bundle") && err.contains("--insecure-bootstrap"),
        "{err}"
    );
    assert!(!data.exists());
    let out = agent()
        .args(["run", "--insecure-bootstrap", "--trust-bundle", "/x.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn run_without_a_token_or_identity_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args([
            "run",
            "--insecure-bootstrap",
            "--server-address",
            "127.0.0.1:1",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(dir.path().join("api.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--join-token"), "{err}");
}

#[test]
fn fetch_without_an_agent_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}

#[test]
fn a_bad_kerberos_section_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n\
         [node_attestor.kerberos]\nservice_principal = \"carapace/server\"\n\
         principal = \"host/a\\\\/b@LAB.TEST\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = agent()
        .args(["run", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service_principal: principal \"carapace/server\" has no realm"),
        "{err}"
    );
    assert!(err.contains("principal: principal"), "{err}");
    assert!(!data.exists());
}

/// Runs `cmd`, failing the test instead of hanging if it takes over 20 s.
fn output_within_20s(mut cmd: Command) -> std::process::Output {
    hsm_sim::process::output_within(&mut cmd, std::time::Duration::from_secs(20)).unwrap()
}

#[test]
fn run_refuses_config_files_that_are_devices_fifos_or_huge_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (path, needle) in hsm_sim::operator_files::not_small_regular_files(dir.path()).unwrap() {
        let mut cmd = agent();
        cmd.args(["run", "--insecure-bootstrap", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(&data);
        let out = output_within_20s(cmd);
        assert_eq!(out.status.code(), Some(64), "{}", path.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("config file {}: {needle}", path.display())),
            "{err}"
        );
        assert!(!data.exists());
    }
}

#[test]
fn run_lists_type_nested_and_semantic_problems_in_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "trust_domain = \"Bad Domain\"\ninsecure_bootstrap = \"yes\"\nlog_format = \"xml\"\n\
         workload_attestation_timeout = \"9999999999999999999s\"\nsocket_pth = \"/x\"\n\
         [workload_attestor.unix]\nworkload_sha256 = 1\n\
         [node_attestor.kerberos]\nservice_principal = \"carapace/server\"\nkeytab = 5\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = agent()
        .args(["run", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "insecure_bootstrap: invalid type",
        "socket_pth: unknown field",
        "trust_domain: ",
        "log_format: \"xml\"",
        "workload_attestation_timeout: ",
        "workload_attestor.unix: workload_sha256: invalid type",
        "node_attestor.kerberos: keytab: invalid type",
        "service_principal: principal \"carapace/server\" has no realm",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    assert!(!data.exists());
}

#[test]
fn a_trust_bundle_that_is_a_device_is_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cmd = agent();
    cmd.args([
        "run",
        "--join-token",
        "t",
        "--server-address",
        "127.0.0.1:1",
        "--trust-bundle",
        "/dev/zero",
        "--socket-path",
    ])
    .arg(dir.path().join("api.sock"))
    .arg("--data-dir")
    .arg(&data);
    let out = output_within_20s(cmd);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trust bundle /dev/zero: is a character device"),
        "{err}"
    );
}

#[test]
fn validate_reports_every_problem_including_the_files_named_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sock_dir = dir.path().join("sock");
    let write_config = |extra: &str, bundle: &str| {
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "data_dir = {data:?}\nsocket_path = {sock:?}\ntrust_bundle_path = {bundle:?}\n{extra}",
                sock = sock_dir.join("api.sock"),
            ),
        )
        .unwrap();
        path
    };
    let missing = dir.path().join("missing.pem");
    let bad = write_config("nope = 1\n", missing.to_str().unwrap());
    let out = agent()
        .args(["validate", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nope"), "{text}");
    // A file problem is found too once the file itself parses.
    let bad_bundle = write_config("", missing.to_str().unwrap());
    let out = agent()
        .args(["validate", "--config"])
        .arg(&bad_bundle)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("trust bundle") && text.contains("missing.pem"),
        "{text}"
    );
    // `run` with the same file refuses before it creates, binds or contacts anything.
    let out = output_within_20s({
        let mut c = agent();
        c.args([
            "run",
            "--join-token",
            "t",
            "--server-address",
            "127.0.0.1:1",
            "--config",
        ])
        .arg(&bad_bundle);
        c
    });
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.exists() && !sock_dir.exists());
    // Not a PEM bundle.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let out = agent()
        .args(["validate", "--config"])
        .arg(write_config("", junk.to_str().unwrap()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stdout).contains("junk.pem"));
    // A good one.
    let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
    let good_pem = dir.path().join("bundle.pem");
    std::fs::write(&good_pem, ca.cert.pem()).unwrap();
    let good = write_config("", good_pem.to_str().unwrap());
    let out = agent()
        .args(["validate", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
    assert!(!data.exists() && !sock_dir.exists());
}

/// Sets `path`'s mode.
fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn validate_and_run_check_the_files_the_plugins_name_each_with_its_setting() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let d = |p: &std::path::Path| p.display().to_string();
    let (data, sock_dir) = (p("data"), p("sock"));
    let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
    let bundle = p("bundle.pem");
    std::fs::write(&bundle, ca.cert.pem()).unwrap();
    let ssh = hsm_sim::ssh::provision_lab_host(&p("ssh"), "lab.test").unwrap();
    let keys = p("keys");
    let write_config = |name: &str, plugins: &str| {
        let path = p(name);
        std::fs::write(
            &path,
            format!(
                "data_dir = {data:?}\nsocket_path = {:?}\ntrust_bundle_path = {bundle:?}\n{plugins}",
                sock_dir.join("api.sock")
            ),
        )
        .unwrap();
        path
    };
    // A host key left 0644, a directory where the certificate goes, a key directory
    // others can read.
    chmod(&ssh.host_key, 0o644);
    let cert_dir = p("certs");
    std::fs::create_dir(&cert_dir).unwrap();
    std::fs::create_dir(&keys).unwrap();
    chmod(&keys, 0o755);
    let sshpop = write_config(
        "sshpop.toml",
        &format!(
            "[key_manager.disk]\ndirectory = {keys:?}\n[node_attestor.sshpop]\nhost_key_path = {:?}\nhost_cert_path = {cert_dir:?}\n",
            ssh.host_key
        ),
    );
    let expected = [
        format!(
            "key_manager.disk: directory {} has mode 755: it must not be accessible to group or others (chmod 700 {})",
            d(&keys),
            d(&keys)
        ),
        format!(
            "node_attestor.sshpop: host_key_path {} has mode 644: it must not be accessible to group or others (chmod 600 {})",
            d(&ssh.host_key),
            d(&ssh.host_key)
        ),
        format!(
            "node_attestor.sshpop: host_cert_path {} is a directory; give a regular file",
            d(&cert_dir)
        ),
    ];
    let out = agent()
        .args(["validate", "--config"])
        .arg(&sshpop)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().collect::<Vec<_>>(), expected, "{text}");
    // `run` refuses the same files (all read at start) before it creates, binds or
    // contacts anything.
    let out = output_within_20s({
        let mut c = agent();
        c.args(["run", "--server-address", "127.0.0.1:1", "--config"])
            .arg(&sshpop);
        c
    });
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for line in &expected {
        assert!(err.contains(line.as_str()), "{line:?} missing from:\n{err}");
    }
    assert!(!data.exists() && !sock_dir.exists());

    // The TPM device and the keytab are opened only at their first use, but validate
    // reports them too.
    let tpm_device = p("tpmrm0");
    let keytab = p("krb5.keytab");
    let tpm_kerberos = |tcti: &str| {
        write_config(
            "kerberos.toml",
            &format!(
                "[key_manager.tpm]\ntcti = \"{tcti}\"\ndirectory = \"keys-tpm\"\n\
                 [node_attestor.kerberos]\nservice_principal = \"carapace/server.lab.test@LAB.TEST\"\nkeytab = {keytab:?}\n",
            ),
        )
    };
    let kerberos = tpm_kerberos(&format!("device:{}", d(&tpm_device)));
    let out = agent()
        .args(["validate", "--config"])
        .arg(&kerberos)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            format!("key_manager.tpm: tcti {} does not exist", d(&tpm_device)),
            format!(
                "node_attestor.kerberos: keytab {} does not exist",
                d(&keytab)
            ),
        ],
        "{text}"
    );
    std::fs::write(&keytab, b"\x05\x02").unwrap();
    chmod(&keytab, 0o640);
    let out = agent()
        .args(["validate", "--config"])
        .arg(&kerberos)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "node_attestor.kerberos: keytab {} has mode 640",
            d(&keytab)
        )),
        "{text}"
    );

    // Fixed, both validate.
    chmod(&ssh.host_key, 0o600);
    std::fs::remove_dir(&cert_dir).unwrap();
    std::fs::copy(&ssh.host_cert, &cert_dir).unwrap();
    chmod(&keys, 0o700);
    chmod(&keytab, 0o600);
    for config in [
        sshpop,
        tpm_kerberos("device:/dev/null"),
        tpm_kerberos("swtpm:host=127.0.0.1,port=2321"),
    ] {
        let out = agent()
            .args(["validate", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}: ok\n", d(&config))
        );
        assert_eq!(out.status.code(), Some(0));
    }
    assert!(!data.exists() && !sock_dir.exists());
}
