//! Running Carapace like a service, without carapace-lab: the systemd units in
//! `dist/systemd` pass `systemd-analyze verify` and keep their hardening (its offline
//! security review), `scripts/install.sh` installs into a staging root without ever
//! replacing an operator's config and refuses to start anything where it cannot, and the
//! three operator recipes in `dist/recipes` (the very scripts OPERATIONS.md points to)
//! give a working SoftHSM2 token, a swtpm with an EK certificate from a local CA and an
//! MIT realm: a real server and agent are started on what each writes. The binaries run
//! as their units run them (`setpriv`: the server as its own user without capabilities,
//! the agent as root with the unit's two) and under `strace -f`, and every system call
//! and socket family they use must pass the unit's `SystemCallFilter=` and
//! `RestrictAddressFamilies=`; nothing is started under systemd itself.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use carapace_e2e::{Agent, Lab, Server, ServerOptions, bin, bin_dir, free_port, uid_selector};

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a tool that must exist; a missing one fails with its install command.
fn tool(name: &str, package: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        found,
        "{name} not found: apt-get install -y {package} (scripts/test.sh installs it)"
    );
    Command::new(name)
}

/// Runs a recipe script from `dist/recipes` with `args`; it must succeed.
fn recipe(name: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = Command::new(repo().join("dist/recipes").join(name))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "{name} {args:?}: {}", text(&out));
    text(&out)
}

/// Stops, by the pid in `file`, a daemon a recipe started in the background.
struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn install(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(repo().join("scripts/install.sh"))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

/// `install.sh --no-start` into a fresh staging root with the test's binaries.
fn staged_install() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let bins = bin_dir().display().to_string();
    let out = install(
        &[
            "--root",
            &root.path().display().to_string(),
            "--bin-dir",
            &bins,
            "--no-start",
            "--tpm",
        ],
        &[],
    );
    assert!(out.status.success(), "install.sh: {}", text(&out));
    root
}

/// The staged units, with `ExecStart=` pointing into the staging root (systemd-analyze
/// verify checks that the command exists), in a directory of their own.
fn units_for_verify(root: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["carapace-server.service", "carapace-agent.service"] {
        let staged = root.join("usr/local/lib/systemd/system").join(unit);
        let body = std::fs::read_to_string(&staged).unwrap();
        assert!(
            body.contains("ExecStart=/usr/local/bin/carapace-"),
            "{unit}: {body}"
        );
        let body = body.replace(
            "ExecStart=/usr/local/bin/",
            &format!("ExecStart={}/usr/local/bin/", root.display()),
        );
        std::fs::write(dir.path().join(unit), body).unwrap();
    }
    // The TPM drop-in beside its unit: verify reads it too.
    let dropins = dir.path().join("carapace-agent.service.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::copy(
        root.join("usr/local/lib/systemd/system/carapace-agent.service.d/tpm.conf"),
        dropins.join("tpm.conf"),
    )
    .unwrap();
    dir
}

fn systemd_analyze(dir: &Path, args: &[&str]) -> Output {
    tool("systemd-analyze", "systemd")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_units_pass_systemd_analyze_verify_and_keep_their_hardening() {
    let root = staged_install();
    let units = units_for_verify(root.path());
    let verify = |dir: &Path| {
        systemd_analyze(
            dir,
            &[
                "verify",
                "./carapace-server.service",
                "./carapace-agent.service",
            ],
        )
    };
    let out = verify(units.path());
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    assert_eq!(text(&out).trim(), "", "verify warned");

    // The offline security review (what `systemd-analyze security` scores a running
    // unit by): an unhardened unit scores 9.6; these stay low.
    for (unit, most) in [
        ("carapace-server.service", 1.5),
        ("carapace-agent.service", 2.5),
    ] {
        let out = systemd_analyze(units.path(), &["security", "--offline=yes", unit]);
        let report = text(&out);
        let level: f64 = report
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in {report}"));
        assert!(
            level <= most,
            "{unit}: exposure {level} > {most}:\n{report}"
        );
    }
    // The agent's capabilities are exactly the two it needs for /proc; the server has none.
    let agent = std::fs::read_to_string(units.path().join("carapace-agent.service")).unwrap();
    assert!(agent.contains("\nCapabilityBoundingSet=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH\n"));
    let server = std::fs::read_to_string(units.path().join("carapace-server.service")).unwrap();
    assert!(server.contains("\nCapabilityBoundingSet=\n") && server.contains("\nUser=carapace\n"));

    // verify really checks the command: without the agent's binary it fails, naming it.
    std::fs::remove_file(root.path().join("usr/local/bin/carapace-agent")).unwrap();
    let out = verify(units.path());
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("carapace-agent"), "{}", text(&out));
}

#[test]
fn the_shipped_configs_validate_and_name_the_units_directories() {
    let server = repo().join("dist/etc/server.toml");
    let out = Command::new(bin("carapace-server"))
        .args(["validate", "--config"])
        .arg(&server)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // The agent's names /etc/carapace/bundle.pem, which validate reads: point it at one.
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let key = dir.path().join("key.pem");
    let out = tool("openssl", "openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=ca",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let agent = std::fs::read_to_string(repo().join("dist/etc/agent.toml")).unwrap();
    assert!(agent.contains("trust_bundle_path = \"/etc/carapace/bundle.pem\""));
    let agent_copy = dir.path().join("agent.toml");
    std::fs::write(
        &agent_copy,
        agent.replace("/etc/carapace/bundle.pem", &bundle.display().to_string()),
    )
    .unwrap();
    let out = Command::new(bin("carapace-agent"))
        .args(["validate", "--config"])
        .arg(&agent_copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // The sockets and data dirs are where the units make them.
    let unit =
        |name: &str| std::fs::read_to_string(repo().join("dist/systemd").join(name)).unwrap();
    let server_cfg = std::fs::read_to_string(&server).unwrap();
    let server_unit = unit("carapace-server.service");
    assert!(server_cfg.contains("admin_socket = \"/run/carapace/admin.sock\""));
    assert!(server_unit.contains("\nRuntimeDirectory=carapace\n"));
    assert!(server_cfg.contains("data_dir = \"/var/lib/carapace/server\""));
    assert!(server_unit.contains("\nStateDirectory=carapace/server\n"));
    assert!(server_unit.contains("run --config /etc/carapace/server.toml\n"));
    let agent_unit = unit("carapace-agent.service");
    assert!(agent.contains("socket_path = \"/run/carapace-agent/api.sock\""));
    assert!(agent_unit.contains("\nRuntimeDirectory=carapace-agent\n"));
    assert!(agent.contains("data_dir = \"/var/lib/carapace/agent\""));
    assert!(agent_unit.contains("\nStateDirectory=carapace/agent\n"));
    assert!(agent_unit.contains("run --config /etc/carapace/agent.toml\n"));
}

#[test]
fn install_sh_stages_files_and_never_replaces_an_operators_config() {
    let root = staged_install();
    let r = |p: &str| root.path().join(p.trim_start_matches('/'));
    for (path, want_mode, same_as) in [
        (
            "/usr/local/bin/carapace-server",
            0o755,
            bin_dir().join("carapace-server"),
        ),
        (
            "/usr/local/bin/carapace-agent",
            0o755,
            bin_dir().join("carapace-agent"),
        ),
        (
            "/usr/local/lib/systemd/system/carapace-server.service",
            0o644,
            repo().join("dist/systemd/carapace-server.service"),
        ),
        (
            "/usr/local/lib/systemd/system/carapace-agent.service",
            0o644,
            repo().join("dist/systemd/carapace-agent.service"),
        ),
        (
            "/usr/local/lib/systemd/system/carapace-agent.service.d/tpm.conf",
            0o644,
            repo().join("dist/systemd/carapace-agent.service.d/tpm.conf"),
        ),
        (
            "/usr/local/lib/sysusers.d/carapace.conf",
            0o644,
            repo().join("dist/sysusers.d/carapace.conf"),
        ),
        (
            "/etc/carapace/server.toml",
            0o644,
            repo().join("dist/etc/server.toml"),
        ),
        (
            "/etc/carapace/agent.toml",
            0o644,
            repo().join("dist/etc/agent.toml"),
        ),
        (
            "/usr/local/share/carapace/server.toml",
            0o644,
            repo().join("dist/etc/server.toml"),
        ),
    ] {
        let got = r(path);
        assert_eq!(mode(&got), want_mode, "{path}");
        assert!(
            std::fs::read(&got).unwrap() == std::fs::read(&same_as).unwrap(),
            "{path} differs from {}",
            same_as.display()
        );
    }
    // The server's user, made from the sysusers.d file inside the staging root.
    let passwd = std::fs::read_to_string(r("/etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("carapace:")
            && l.ends_with(":/var/lib/carapace/server:/usr/sbin/nologin")),
        "{passwd}"
    );

    // The operator edits the config; a second run (an upgrade) keeps it and says so.
    let mine = "trust_domain = \"mine.example\"\n";
    std::fs::write(r("/etc/carapace/server.toml"), mine).unwrap();
    let bins = bin_dir().display().to_string();
    let root_arg = root.path().display().to_string();
    let out = install(
        &["--root", &root_arg, "--bin-dir", &bins, "--no-start"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(r("/etc/carapace/server.toml")).unwrap(),
        mine
    );
    assert!(
        text(&out).contains("kept /etc/carapace/server.toml: it is yours"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("kept /etc/carapace/agent.toml (unchanged)"));

    // Starting needs systemd as PID 1 and the real root: refused before anything is
    // written (a fresh root stays empty).
    let empty = tempfile::tempdir().unwrap();
    let empty_arg = empty.path().display().to_string();
    let out = install(
        &["--root", &empty_arg, "--bin-dir", &bins],
        &[("CARAPACE_SYSTEMD_RUN_DIR", "/nonexistent/systemd")],
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(
        text(&out).contains("systemd is not running as PID 1") && text(&out).contains("--no-start"),
        "{}",
        text(&out)
    );
    let present = empty.path().display().to_string();
    let out = install(
        &["--root", &empty_arg, "--bin-dir", &bins],
        &[("CARAPACE_SYSTEMD_RUN_DIR", present.as_str())],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("add --no-start"), "{}", text(&out));
    // Missing binaries are named, also before anything is written.
    let out = install(
        &[
            "--root",
            &empty_arg,
            "--bin-dir",
            "/nonexistent",
            "--no-start",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("/nonexistent/carapace-server"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}

fn server_with(
    lab: &Lab,
    name: &str,
    sections: &[&Path],
    envs: Vec<(String, String)>,
) -> ServerOptions {
    let mut config = String::from("trust_domain = \"example.org\"\n");
    for s in sections {
        config.push_str(&std::fs::read_to_string(s).unwrap());
    }
    let path = lab.path().join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    ServerOptions {
        name: Some(name.into()),
        extra: vec!["--config".into(), path.display().to_string()],
        envs,
        ..ServerOptions::default()
    }
}

#[test]
fn the_softhsm2_recipe_gives_a_token_the_server_keeps_its_ca_in() {
    let lab = Lab::new();
    let dir = lab.path().join("hsm");
    recipe("softhsm2-token.sh", &[&dir.display().to_string()], &[]);
    let conf = dir.join("softhsm2.conf").display().to_string();
    let envs = vec![("SOFTHSM2_CONF".to_owned(), conf.clone())];
    // The drop-in puts the same SOFTHSM2_CONF in the unit's environment.
    let dropin =
        std::fs::read_to_string(dir.join("carapace-server.service.d/softhsm2.conf")).unwrap();
    assert!(
        dropin.contains(&format!("Environment=SOFTHSM2_CONF={conf}\n")),
        "{dropin}"
    );
    // The PIN file ends in a newline (as `echo` writes it), which the server ignores.
    let pin = std::fs::read_to_string(dir.join("user.pin")).unwrap();
    assert!(pin.ends_with('\n') && !pin.ends_with("\n\n"));
    assert_eq!(mode(&dir.join("user.pin")), 0o600);

    let server = Server::start_opts(
        &lab,
        server_with(
            &lab,
            "server",
            &[&dir.join("server-pkcs11.toml")],
            envs.clone(),
        ),
    );
    let bundle = server.bundle_pem();
    assert!(bundle.contains("BEGIN CERTIFICATE"), "{bundle}");
    // The CA key is in the token, not on disk.
    assert!(!server.data_dir.join("keys").exists());
    let out = tool("pkcs11-tool", "opensc")
        .arg("--module")
        .arg(
            std::fs::read_to_string(dir.join("server-pkcs11.toml"))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("module = \""))
                .unwrap()
                .trim_end_matches('"'),
        )
        .args([
            "--token-label",
            "carapace",
            "--login",
            "--pin",
            pin.trim_end(),
        ])
        .args(["--list-objects", "--type", "privkey"])
        .envs(envs.clone())
        .output()
        .unwrap();
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    assert!(listed.contains("label:      carapace-x509-ca-"), "{listed}");
    assert!(listed.contains("never extractable"), "{listed}");

    // One trailing newline only: a PIN file with two is a wrong PIN.
    let two = lab.path().join("two-newlines.pin");
    std::fs::write(&two, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(&two, std::fs::Permissions::from_mode(0o600)).unwrap();
    let section = std::fs::read_to_string(dir.join("server-pkcs11.toml"))
        .unwrap()
        .replace(
            &dir.join("user.pin").display().to_string(),
            &two.display().to_string(),
        );
    let section_path = lab.path().join("two-newlines.toml");
    std::fs::write(&section_path, section).unwrap();
    let mut refused =
        Server::spawn_opts(&lab, server_with(&lab, "refused", &[&section_path], envs));
    let (status, log) = refused.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(log.contains("CKR_PIN_INCORRECT"), "{log}");
}

/// Two free consecutive ports (swtpm's command port and its control port).
fn port_pair() -> u16 {
    loop {
        let p = free_port();
        if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_swtpm_recipe_gives_a_tpm_an_agent_attests_with() {
    let lab = Lab::new();
    let dir = lab.path().join("tpm");
    let port = port_pair().to_string();
    let _swtpm = PidFile(dir.join("swtpm.pid"));
    recipe(
        "swtpm-ek-cert.sh",
        &[&dir.display().to_string(), &port],
        &[],
    );
    // The server as its unit runs it, with the EK CA file installed for its user.
    let home = server_home(&lab);
    let ek_ca = give_server(&home, &dir.join("ek-ca.pem"), "ek-ca.pem");
    let section = std::fs::read_to_string(dir.join("server-tpm.toml"))
        .unwrap()
        .replace(
            &dir.join("ek-ca.pem").display().to_string(),
            &ek_ca.display().to_string(),
        );
    let mut server = UnitServer::start(&lab, &home, &section, &[]);
    let agent_config = lab.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "trust_domain = \"example.org\"\n{}",
            std::fs::read_to_string(dir.join("agent-tpm.toml")).unwrap()
        ),
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(&agent_config)
            .unwrap()
            .contains(&format!("tcti = \"swtpm:host=127.0.0.1,port={port}\"")),
    );
    // As the unit runs it: its capabilities, no new privileges; every system call traced.
    let trace = lab.path().join("agent.strace");
    let mut agent = spawn_agent_under(
        &lab,
        (&server.address, &server.bundle_pem()),
        "agent",
        &unit_capabilities("carapace-agent.service"),
        &agent_config,
        &[],
        Some(&trace),
    );
    let agents: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    let agent_id = agents["agents"][0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        agent_id.starts_with("spiffe://example.org/spire/agent/tpm/"),
        "{agents}"
    );
    server.create_entry(
        &agent_id,
        "spiffe://example.org/recipe-tpm",
        &uid_selector(),
    );
    agent.wait_for_svid("spiffe://example.org/recipe-tpm").await;
    stop_traced(&mut agent.proc);
    assert_unit_allows("carapace-agent.service", &trace);
    server.stop_and_check();
}

/// The host name the agent's default principal is made of (`host/<this>`), and the host
/// the server derives from it (a name without a dot is put in the realm's domain).
fn default_host(realm: &str) -> (String, String) {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_ascii_lowercase();
    let host = if name.contains('.') {
        name.clone()
    } else {
        format!("{name}.{}", realm.to_ascii_lowercase())
    };
    (name, host)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mit_kdc_recipe_gives_keytabs_an_agent_attests_with_under_its_default_principal() {
    let lab = Lab::new();
    let dir = lab.path().join("krb");
    let realm = "OPS.TEST";
    let port = free_port().to_string();
    let _kdc = PidFile(dir.join("krb5kdc.pid"));
    // No HOST_FQDN: the recipe names the host as the agent will, from `hostname`.
    recipe(
        "mit-kdc-realm.sh",
        &[&dir.display().to_string(), realm, &port],
        &[],
    );
    let (name, host) = default_host(realm);
    let envs = vec![(
        "KRB5_CONFIG".to_owned(),
        dir.join("krb5.conf").display().to_string(),
    )];
    // The server as its unit runs it, with its keytab and krb5.conf installed for its
    // user (OPERATIONS.md: the server's keytab belongs to it, 0600).
    let home = server_home(&lab);
    let keytab = give_server(&home, &dir.join("carapace.keytab"), "carapace.keytab");
    let krb5_conf = give_server(&home, &dir.join("krb5.conf"), "krb5.conf");
    let section = std::fs::read_to_string(dir.join("server-kerberos.toml"))
        .unwrap()
        .replace(
            &dir.join("carapace.keytab").display().to_string(),
            &keytab.display().to_string(),
        );
    let mut server = UnitServer::start(
        &lab,
        &home,
        &section,
        &[("KRB5_CONFIG".to_owned(), krb5_conf.display().to_string())],
    );
    let agent_section = std::fs::read_to_string(dir.join("agent-kerberos.toml")).unwrap();
    // The agent is not told its principal.
    assert!(
        !agent_section.lines().any(|l| l.starts_with("principal")),
        "{agent_section}"
    );
    let agent_config = lab.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!("trust_domain = \"example.org\"\n{agent_section}"),
    )
    .unwrap();
    // As the unit runs it: its capabilities, no new privileges; every system call traced.
    let trace = lab.path().join("agent.strace");
    let mut agent = spawn_agent_under(
        &lab,
        (&server.address, &server.bundle_pem()),
        "agent",
        &unit_capabilities("carapace-agent.service"),
        &agent_config,
        &envs,
        Some(&trace),
    );
    let agent_id = format!("spiffe://example.org/spire/agent/kerberos/{realm}/{host}");
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", &agent_id]);
    assert!(
        shown.contains(&format!("kerberos:principal:host/{name}@{realm}")),
        "{shown}"
    );
    server.create_entry(
        &agent_id,
        "spiffe://example.org/recipe-krb",
        &uid_selector(),
    );
    agent.wait_for_svid("spiffe://example.org/recipe-krb").await;
    stop_traced(&mut agent.proc);
    assert_unit_allows("carapace-agent.service", &trace);
    server.stop_and_check();
}

/// `setpriv` arguments that give a process the capability bounding set a unit names in
/// `CapabilityBoundingSet=` (empty: none), and no new privileges.
fn unit_capabilities(unit: &str) -> Vec<String> {
    let body = std::fs::read_to_string(repo().join("dist/systemd").join(unit)).unwrap();
    let caps = body
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("{unit} has no CapabilityBoundingSet="));
    let mut set = String::from("-all");
    for cap in caps.split_whitespace() {
        set.push_str(&format!(
            ",+{}",
            cap.trim_start_matches("CAP_").to_ascii_lowercase()
        ));
    }
    [
        "--no-new-privs",
        "--bounding-set",
        &set,
        "--inh-caps",
        "-all",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// An agent run as root under `setpriv` with the given capability arguments, attested
/// with a join token, hashing callers' executables.
fn spawn_bounded_agent(lab: &Lab, server: &Server, name: &str, setpriv: &[String]) -> Agent {
    let (token, id) = server.token();
    let config = lab.path().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\n[node_attestor.join_token]\n\
         [workload_attestor.unix]\nworkload_sha256 = true\n",
    )
    .unwrap();
    let mut agent = spawn_agent_under(
        lab,
        (&server.address, &server.bundle_pem()),
        name,
        setpriv,
        &config,
        &[("CARAPACE_JOIN_TOKEN".to_owned(), token)],
        None,
    );
    agent.id = id;
    agent
}

/// An agent on `config` (plus the server's address and bundle, and its own data dir and
/// socket in the lab), run as root under `setpriv` with `setpriv`'s arguments, and under
/// `strace -f` logging to `trace` if given. Returns once it says it is ready.
fn spawn_agent_under(
    lab: &Lab,
    (server_address, bundle_pem): (&str, &str),
    name: &str,
    setpriv: &[String],
    config: &Path,
    envs: &[(String, String)],
    trace: Option<&Path>,
) -> Agent {
    let bundle = lab.path().join(format!("{name}-bundle.pem"));
    std::fs::write(&bundle, bundle_pem).unwrap();
    let sockets = lab.path().join("sockets");
    std::fs::create_dir_all(&sockets).unwrap();
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = sockets.join(format!("{name}.sock"));
    let data_dir = lab.path().join(name);
    let mut cmd = match trace {
        Some(trace) => traced(setpriv, &bin("carapace-agent"), trace),
        None => {
            let mut c = tool("setpriv", "util-linux");
            c.args(setpriv).arg("--").arg(bin("carapace-agent"));
            c
        }
    };
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--server-address")
        .arg(server_address)
        .arg("--trust-bundle")
        .arg(&bundle)
        .envs(envs.iter().map(|(k, v)| (k, v)));
    let proc = carapace_e2e::Proc::spawn(
        "carapace-agent",
        cmd,
        lab.path().join(format!("{name}.log")),
    );
    let agent = Agent {
        proc,
        socket,
        id: String::new(),
        data_dir,
    };
    // Not `wait_healthy`: its healthcheck would have an agent that hashes callers'
    // executables hash the (large, debug) CLI, slower unoptimised than the attestation
    // timeout.
    let mut agent = agent;
    let deadline = std::time::Instant::now() + carapace_e2e::patience();
    while !agent.proc.log().contains("carapace-agent is ready") {
        if let Some(status) = agent.proc.try_wait() {
            panic!("carapace-agent exited with {status}:\n{}", agent.proc.log());
        }
        assert!(std::time::Instant::now() < deadline, "{}", agent.proc.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    agent
}

/// Fails unless every system call in `trace` is one `unit`'s `SystemCallFilter=` allows.
fn assert_unit_allows(unit: &str, trace: &Path) {
    let allowed = unit_syscalls(unit);
    let made = traced_syscalls(trace);
    assert!(
        made.len() > 20,
        "{unit}: only {made:?} in {}",
        trace.display()
    );
    let refused: Vec<&String> = made.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "{unit}: the binary made system calls its SystemCallFilter= refuses: {refused:?}"
    );
    // And every socket it opened is of a family RestrictAddressFamilies= allows.
    let body = std::fs::read_to_string(repo().join("dist/systemd").join(unit)).unwrap();
    let families: Vec<&str> = body
        .lines()
        .find_map(|l| l.strip_prefix("RestrictAddressFamilies="))
        .unwrap_or_else(|| panic!("{unit} has no RestrictAddressFamilies="))
        .split_whitespace()
        .collect();
    let log = std::fs::read_to_string(trace).unwrap();
    let opened: std::collections::BTreeSet<&str> = log
        .lines()
        .filter_map(|l| {
            l.split_once(" socket(")
                .or_else(|| l.split_once(" socketpair("))
                .and_then(|(_, args)| args.split([',', ')']).next())
        })
        .collect();
    assert!(
        !opened.is_empty(),
        "{unit}: no socket() in {}",
        trace.display()
    );
    let outside: Vec<&&str> = opened.iter().filter(|f| !families.contains(f)).collect();
    assert!(
        outside.is_empty(),
        "{unit}: sockets of families RestrictAddressFamilies= refuses: {outside:?} (allowed \
         {families:?}):\n{}",
        log.lines()
            .filter(|l| outside.iter().any(|f| l.contains(**f)))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_units_two_capabilities_identify_another_users_private_executable() {
    assert_eq!(
        carapace_e2e::my_uid(),
        0,
        "this test runs a workload as uid 65534 and must run as root (CI does)"
    );
    let lab = Lab::new();
    let server = Server::start(&lab);
    // A workload of uid 65534 whose executable only that uid may read (0700): a private
    // copy of the Python interpreter running py-spiffe's fetch (tests/python).
    let site = Command::new(carapace_e2e::python())
        .args(["-c", "import site; print(site.getsitepackages()[0])"])
        .output()
        .unwrap();
    assert!(site.status.success(), "{}", text(&site));
    let site = String::from_utf8(site.stdout).unwrap().trim().to_owned();
    let interpreter = std::fs::canonicalize(carapace_e2e::python()).unwrap();
    let private = lab.path().join("nobody");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = private.join("python");
    std::fs::copy(&interpreter, &exe).unwrap();
    std::os::unix::fs::chown(&exe, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = tool("sha256sum", "coreutils").arg(&exe).output().unwrap();
    let sha = text(&out).split_whitespace().next().unwrap().to_owned();
    let nobody_fetch = |agent: &Agent| {
        carapace_e2e::py_fetch_output(
            Command::new(&exe)
                // -S: only the virtualenv's packages (PYTHONPATH), not the system's.
                .arg("-S")
                .arg(carapace_e2e::fetch_svid_script())
                .arg(&agent.socket)
                .env("PYTHONPATH", &site)
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap(),
        )
    };
    let selectors = [
        "unix:uid:65534".to_owned(),
        format!("unix:path:{}", exe.display()),
        format!("unix:sha256:{sha}"),
    ];
    let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();

    // With exactly the unit's capabilities the agent reads that process's /proc entry
    // and its executable: the workload gets its SVID.
    let bounded = spawn_bounded_agent(
        &lab,
        &server,
        "bounded",
        &unit_capabilities("carapace-agent.service"),
    );
    server.create_entry(&bounded.id, "spiffe://example.org/nobody", &selectors, &[]);
    let got = carapace_e2e::eventually("the SVID of uid 65534's private executable", || {
        let r = nobody_fetch(&bounded);
        async move { r.ok() }
    })
    .await;
    assert_eq!(got["default"], "spiffe://example.org/nobody", "{got}");

    // With none (the server's set), root cannot read another user's /proc/<pid>/exe:
    // the caller cannot be identified and gets nothing. Only processes of its own uid
    // holding no more capabilities than it does are identified: one such is served (so
    // both entries have reached the agent).
    let bare = spawn_bounded_agent(
        &lab,
        &server,
        "bare",
        &unit_capabilities("carapace-server.service"),
    );
    server.create_entry(
        &bare.id,
        "spiffe://example.org/nobody-bare",
        &selectors,
        &[],
    );
    server.create_entry(
        &bare.id,
        "spiffe://example.org/root-bare",
        &["unix:uid:0"],
        &[],
    );
    carapace_e2e::eventually("root's SVID from the agent without capabilities", || {
        let out = tool("setpriv", "util-linux")
            .args(["--bounding-set", "-all", "--inh-caps", "-all", "--"])
            .arg(carapace_e2e::python())
            .arg(carapace_e2e::fetch_svid_script())
            .arg(&bare.socket)
            .output()
            .unwrap();
        let r = carapace_e2e::py_fetch_output(out);
        async move {
            r.ok()
                .filter(|v| v["default"] == "spiffe://example.org/root-bare")
        }
    })
    .await;
    let refused = nobody_fetch(&bare);
    assert!(refused.is_err(), "{refused:?}");
}

#[test]
fn the_softhsm2_recipe_serves_a_server_running_as_its_own_user_without_capabilities() {
    assert_eq!(
        carapace_e2e::my_uid(),
        0,
        "this test runs the server as uid 65534 and must run as root (CI does)"
    );
    let lab = Lab::new();
    let home = server_home(&lab);
    let dir = home.join("hsm");
    // The token belongs to the server's user (TOKEN_OWNER), as OPERATIONS.md says.
    recipe(
        "softhsm2-token.sh",
        &[&dir.display().to_string()],
        &[("TOKEN_OWNER", "nobody")],
    );
    // As the unit runs it: its own user, no capabilities, no new privileges; every
    // system call traced, the PKCS#11 module's included.
    let mut server = UnitServer::start(
        &lab,
        &home,
        &std::fs::read_to_string(dir.join("server-pkcs11.toml")).unwrap(),
        &[(
            "SOFTHSM2_CONF".to_owned(),
            dir.join("softhsm2.conf").display().to_string(),
        )],
    );
    let cli = |args: &[&str]| server.cli(args);
    let admin = server.admin.clone();
    let bundle = cli(&["bundle", "show"]);
    assert!(
        text(&bundle).contains("BEGIN CERTIFICATE"),
        "{}",
        text(&bundle)
    );
    assert!(!server.home.join("data").join("keys").exists());
    // Without --server-uid the root CLI sends nothing to a socket of another uid.
    let out = Command::new(bin("carapace-server"))
        .args(["healthcheck", "--admin-socket"])
        .arg(&admin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("owned by uid 65534"), "{}", text(&out));
    server.stop_and_check();
}

/// The server's own directory (the unit's `StateDirectory=`): `<lab>/svc`, owned by uid
/// 65534 (the unit's `carapace`), 0700.
fn server_home(lab: &Lab) -> PathBuf {
    let home = lab.path().join("svc");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    home
}

/// Copies `from` into the server's home as `name`, owned by the server's user, 0600 (as
/// an operator installs the server's keytab or EK CA file).
fn give_server(home: &Path, from: &Path, name: &str) -> PathBuf {
    let to = home.join(name);
    std::fs::copy(from, &to).unwrap();
    std::os::unix::fs::chown(&to, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    to
}

/// A server run as its unit runs it: uid 65534, no capabilities, no new privileges, its
/// data dir and admin socket in its home; under `strace -f`.
struct UnitServer {
    proc: carapace_e2e::Proc,
    admin: PathBuf,
    address: String,
    home: PathBuf,
    trace: PathBuf,
}

impl UnitServer {
    /// Starts it on `sections` (TOML after the trust domain) and waits until healthy.
    fn start(lab: &Lab, home: &Path, sections: &str, envs: &[(String, String)]) -> UnitServer {
        let admin = home.join("admin").join("admin.sock");
        let address = format!("127.0.0.1:{}", free_port());
        let config = lab.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"example.org\"\ndata_dir = {:?}\nadmin_socket = {:?}\n\
                 bind_address = {address:?}\n{sections}",
                home.join("data").display().to_string(),
                admin.display().to_string(),
            ),
        )
        .unwrap();
        let mut as_server: Vec<String> = ["--reuid", "65534", "--regid", "65534", "--clear-groups"]
            .map(str::to_owned)
            .to_vec();
        as_server.extend(unit_capabilities("carapace-server.service"));
        let trace = home.join("server.strace");
        let mut cmd = traced(&as_server, &bin("carapace-server"), &trace);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .envs(envs.iter().map(|(k, v)| (k, v)));
        let proc = carapace_e2e::Proc::spawn("carapace-server", cmd, lab.path().join("server.log"));
        let mut server = UnitServer {
            proc,
            admin,
            address,
            home: home.to_owned(),
            trace,
        };
        let deadline = std::time::Instant::now() + carapace_e2e::patience();
        while !server.cli(&["healthcheck"]).status.success() {
            if let Some(status) = server.proc.try_wait() {
                panic!(
                    "carapace-server exited with {status}:\n{}",
                    server.proc.log()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                server.proc.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server
    }

    /// An admin command, as root, trusting the socket of uid 65534 (`--server-uid`).
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("carapace-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin)
            .args(["--server-uid", "65534"])
            .output()
            .unwrap()
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn bundle_pem(&self) -> String {
        self.cli_ok(&["bundle", "show"])
    }

    fn create_entry(&self, parent: &str, spiffe_id: &str, selector: &str) {
        self.cli_ok(&[
            "entry",
            "create",
            "--parent-id",
            parent,
            "--spiffe-id",
            spiffe_id,
            "--selector",
            selector,
        ]);
    }

    /// Stops it with SIGTERM and checks its system calls and sockets against the unit.
    fn stop_and_check(&mut self) {
        stop_traced(&mut self.proc);
        assert_unit_allows("carapace-server.service", &self.trace);
    }
}

/// Every system call of the groups and names in `items` (`@system-service`, `ptrace`),
/// as `systemd-analyze syscall-filter` lists them, groups expanded.
fn syscall_set(items: &[&str]) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut pending: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(item) = pending.pop() {
        if !item.starts_with('@') {
            out.insert(item);
            continue;
        }
        if !seen.insert(item.clone()) {
            continue;
        }
        let listed = systemd_analyze(Path::new("/"), &["syscall-filter", "--no-pager", &item]);
        assert!(listed.status.success(), "{}", text(&listed));
        for line in String::from_utf8(listed.stdout).unwrap().lines().skip(1) {
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                pending.push(line.to_owned());
            }
        }
    }
    out
}

/// What a unit's `SystemCallFilter=` lines allow: the first is the allow list, each
/// `~` line takes its names away.
fn unit_syscalls(unit: &str) -> std::collections::BTreeSet<String> {
    let body = std::fs::read_to_string(repo().join("dist/systemd").join(unit)).unwrap();
    let mut allowed = std::collections::BTreeSet::new();
    for line in body.lines() {
        let Some(value) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        match value.strip_prefix('~') {
            Some(denied) => {
                let denied: Vec<&str> = denied.split_whitespace().collect();
                for name in syscall_set(&denied) {
                    allowed.remove(&name);
                }
            }
            None => {
                let items: Vec<&str> = value.split_whitespace().collect();
                allowed.extend(syscall_set(&items));
            }
        }
    }
    assert!(!allowed.is_empty(), "{unit} has no SystemCallFilter=");
    allowed
}

/// The system calls in an `strace -f -o FILE` log.
fn traced_syscalls(log: &Path) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .filter_map(|l| {
            let rest = l.split_once(' ').map_or(l, |(_, r)| r).trim_start();
            if rest.starts_with('<') || rest.starts_with("---") || rest.starts_with("+++") {
                return None;
            }
            let name = rest.split('(').next()?;
            (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
                .then(|| name.to_owned())
        })
        .collect()
}

/// `cmd` under `strace -f` (logging to `trace`), itself under `setpriv` with `setpriv`
/// arguments: the user and capabilities of the unit. setpriv execs strace, so the
/// process started is strace, and `cmd` its child.
fn traced(setpriv: &[String], cmd: &Path, trace: &Path) -> Command {
    let strace = tool("strace", "strace").get_program().to_owned();
    let mut c = tool("setpriv", "util-linux");
    c.args(setpriv)
        .arg("--")
        .arg(strace)
        .args(["-f", "-qq", "-o"])
        .arg(trace)
        .arg("--")
        .arg(cmd);
    c
}

/// Sends SIGTERM to the program `strace` runs (its child), and waits for both to exit.
fn stop_traced(proc: &mut carapace_e2e::Proc) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children", pid = proc.pid()))
            .unwrap();
    for child in children.split_whitespace() {
        let _ = Command::new("kill").args(["-TERM", child]).status();
    }
    let status = proc.wait_exit(carapace_e2e::patience());
    assert!(status.is_some(), "did not exit on SIGTERM:\n{}", proc.log());
}

#[test]
fn the_binaries_make_only_system_calls_their_units_allow() {
    let lab = Lab::new();
    let port = free_port();
    // The server runs as its own user (uid 65534 here, `carapace` in the unit) in a
    // directory of its own, as the unit's StateDirectory= and RuntimeDirectory= give it.
    // (As root, SQLite would fchown its files, which the filter refuses.)
    let home = lab.path().join("svc");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let admin = home.join("admin").join("admin.sock");
    // The shipped configs, with the lab's paths and port.
    let server_config = lab.path().join("server.toml");
    std::fs::write(
        &server_config,
        std::fs::read_to_string(repo().join("dist/etc/server.toml"))
            .unwrap()
            .replace(
                "/var/lib/carapace/server",
                &home.join("server").display().to_string(),
            )
            .replace("/run/carapace/admin.sock", &admin.display().to_string())
            .replace("127.0.0.1:8081", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let server_trace = home.join("server.strace");
    let mut as_server: Vec<String> = ["--reuid", "65534", "--regid", "65534", "--clear-groups"]
        .map(str::to_owned)
        .to_vec();
    as_server.extend(unit_capabilities("carapace-server.service"));
    let mut cmd = traced(&as_server, &bin("carapace-server"), &server_trace);
    cmd.args(["run", "--config"]).arg(&server_config);
    let mut server =
        carapace_e2e::Proc::spawn("carapace-server", cmd, lab.path().join("server.log"));
    let cli = |args: &[&str]| {
        let out = Command::new(bin("carapace-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(&admin)
            .args(["--server-uid", "65534"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let deadline = std::time::Instant::now() + carapace_e2e::patience() * 3;
    while !cli(&["healthcheck"]).0 {
        assert!(server.try_wait().is_none(), "{}", server.log());
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let bundle = lab.path().join("bundle.pem");
    std::fs::write(&bundle, cli(&["bundle", "show"]).1).unwrap();
    let (ok, token) = cli(&["token", "generate", "--output", "json"]);
    assert!(ok, "{token}");
    let token: serde_json::Value = serde_json::from_str(&token).unwrap();
    let agent_id = token["agent_id"].as_str().unwrap().to_owned();

    let socket = lab.path().join("sockets").join("api.sock");
    let agent_config = lab.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        std::fs::read_to_string(repo().join("dist/etc/agent.toml"))
            .unwrap()
            .replace(
                "/var/lib/carapace/agent",
                &lab.path().join("agent").display().to_string(),
            )
            .replace(
                "/run/carapace-agent/api.sock",
                &socket.display().to_string(),
            )
            .replace("/etc/carapace/bundle.pem", &bundle.display().to_string())
            .replace("127.0.0.1:8081", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let agent_trace = lab.path().join("agent.strace");
    let mut cmd = traced(
        &unit_capabilities("carapace-agent.service"),
        &bin("carapace-agent"),
        &agent_trace,
    );
    cmd.args(["run", "--config"])
        .arg(&agent_config)
        .env("CARAPACE_JOIN_TOKEN", token["token"].as_str().unwrap());
    let mut agent = carapace_e2e::Proc::spawn("carapace-agent", cmd, lab.path().join("agent.log"));
    let (ok, out) = cli(&[
        "entry",
        "create",
        "--parent-id",
        &agent_id,
        "--spiffe-id",
        "spiffe://example.org/traced",
        "--selector",
        &uid_selector(),
    ]);
    assert!(ok, "{out}");
    // A workload gets its SVID: attestation, sync, signing and the Workload API ran.
    let deadline = std::time::Instant::now() + carapace_e2e::patience() * 3;
    loop {
        let out = Command::new(bin("carapace-agent"))
            .args(["api", "fetch", "x509", "--socket-path"])
            .arg(&socket)
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/traced") {
            break;
        }
        assert!(agent.try_wait().is_none(), "{}", agent.log());
        assert!(
            std::time::Instant::now() < deadline,
            "{}\n{}",
            text(&out),
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // And both shut down the way systemd stops them.
    stop_traced(&mut agent);
    stop_traced(&mut server);

    assert_unit_allows("carapace-server.service", &server_trace);
    assert_unit_allows("carapace-agent.service", &agent_trace);
}
