//! `carapace-lab up|status|down` as a person runs them: the built binary, a temporary lab
//! directory, and checks from the outside (the pids in lab.json, the configs, the tools).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use hsm_sim::lab::{LabState, Layout, ProcessRecord};
use hsm_sim::process::ProcInfo;

fn lab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_carapace-lab"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `carapace-lab down` on drop, so that a failing test leaves no daemon behind
/// (the lab's daemons run in their own process group and outlive this process).
struct Downer(PathBuf);

impl Drop for Downer {
    fn drop(&mut self) {
        let _ = lab(&["down", "--dir", self.0.to_str().unwrap()]);
    }
}

fn up(dir: &Path) -> Downer {
    up_with_report(dir).0
}

/// `up`, and what it printed.
fn up_with_report(dir: &Path) -> (Downer, String) {
    let t = Instant::now();
    let out = lab(&["up", "--dir", dir.to_str().unwrap()]);
    eprintln!("carapace-lab up: {:?}", t.elapsed());
    let downer = Downer(dir.to_owned());
    assert!(out.status.success(), "up failed:\n{}", text(&out));
    (downer, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `ssh-keygen` with `args`, which must succeed; its stdout.
fn ssh_keygen(args: &[&str]) -> String {
    let out = Command::new("ssh-keygen").args(args).output().unwrap();
    assert!(out.status.success(), "ssh-keygen {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `SHA256:<base64>` of a public key file, as `ssh-keygen -l` prints it.
fn fingerprint(public: &Path) -> String {
    let out = ssh_keygen(&["-l", "-E", "sha256", "-f", public.to_str().unwrap()]);
    out.split_whitespace().nth(1).unwrap().to_owned()
}

/// The SSH CA and host of the lab in `dir`: the files, their modes, the certificate as
/// `ssh-keygen -L` reads it, and the server and agent configs that use them. Returns the
/// CA's fingerprint and the host key's.
fn check_ssh(dir: &Path, server: &toml::Table, report: &str) -> (String, String) {
    let ssh = dir.join("ssh");
    let ca = ssh.join("ssh_ca");
    let ca_pub = ssh.join("ssh_ca.pub");
    let key = ssh.join("ssh_host_ed25519_key");
    let key_pub = ssh.join("ssh_host_ed25519_key.pub");
    let cert = ssh.join("ssh_host_ed25519_key-cert.pub");
    assert_eq!(mode(&ssh), 0o700);
    for private in [&ca, &key] {
        assert_eq!(mode(private), 0o600, "{}", private.display());
    }
    for public in [&ca_pub, &key_pub, &cert] {
        assert!(public.is_file(), "{} missing", public.display());
    }
    assert!(
        std::fs::read_to_string(&ca_pub)
            .unwrap()
            .starts_with("ssh-ed25519 ")
    );
    let ca_fp = fingerprint(&ca_pub);
    let key_fp = fingerprint(&key_pub);

    // A host certificate (not a user one) for the host key, signed by the CA, naming
    // node1 in the realm's domain, with an expiry and no critical option.
    let listed = ssh_keygen(&["-L", "-f", cert.to_str().unwrap()]);
    let fields: Vec<&str> = listed.lines().map(str::trim).collect();
    for want in [
        "Type: ssh-ed25519-cert-v01@openssh.com host certificate".to_owned(),
        format!("Public key: ED25519-CERT {key_fp}"),
        format!("Signing CA: ED25519 {ca_fp} (using ssh-ed25519)"),
        "Key ID: \"lab-node1\"".to_owned(),
        "node1.lab.test".to_owned(),
        "node1".to_owned(),
        "Critical Options: (none)".to_owned(),
    ] {
        assert!(fields.contains(&want.as_str()), "no {want:?} in:\n{listed}");
    }
    let valid = fields.iter().find(|l| l.starts_with("Valid: ")).unwrap();
    assert!(
        valid.starts_with("Valid: from ") && valid.contains(" to "),
        "{valid}"
    );

    // The server trusts the CA, for hosts of the lab's domain.
    let sshpop = server["node_attestor"]["sshpop"].as_table().unwrap();
    assert_eq!(
        sshpop["cert_authorities_path"].as_str(),
        Some(ca_pub.to_str().unwrap())
    );
    assert_eq!(sshpop["canonical_domain"].as_str(), Some("lab.test"));
    assert_eq!(sshpop.len(), 2, "{sshpop:?}");

    // The agent's commented sshpop section, put in place of the join token, is a config
    // that names the host key; the certificate is where the agent looks by default.
    let agent_text = std::fs::read_to_string(dir.join("agent.toml")).unwrap();
    let section: Vec<&str> = agent_text
        .lines()
        .skip_while(|l| *l != "#   [node_attestor.sshpop]")
        .map_while(|l| l.strip_prefix("#   "))
        .collect();
    assert!(!section.is_empty(), "no sshpop section in:\n{agent_text}");
    let switched = agent_text.replace(
        "\n[node_attestor.join_token]\n",
        &format!("\n{}\n", section.join("\n")),
    );
    let agent: toml::Table = toml::from_str(&switched).unwrap();
    let attestors = agent["node_attestor"].as_table().unwrap();
    assert_eq!(
        attestors.keys().collect::<Vec<_>>(),
        ["sshpop"],
        "{switched}"
    );
    let agent_sshpop = attestors["sshpop"].as_table().unwrap();
    assert_eq!(
        agent_sshpop["host_key_path"].as_str(),
        Some(key.to_str().unwrap())
    );
    assert!(
        !agent_sshpop.contains_key("host_cert_path"),
        "the default, <host_key_path>-cert.pub, is right"
    );

    // The report names the CA, the certificate, and the agent ID the host attests as.
    let agent_path = key_fp
        .strip_prefix("SHA256:")
        .unwrap()
        .replace('+', "-")
        .replace('/', "_");
    for want in [
        format!("SSH CA {}", ca_pub.display()),
        format!("host certificate {}", cert.display()),
        format!("spiffe://example.org/spire/agent/sshpop/{agent_path}"),
    ] {
        assert!(report.contains(&want), "no {want:?} in:\n{report}");
    }
    // The private keys never appear in it.
    for private in [&ca, &key] {
        let text = std::fs::read_to_string(private).unwrap();
        let body = text.lines().nth(1).unwrap();
        assert!(!report.contains(body));
    }
    (ca_fp, key_fp)
}

fn state(dir: &Path) -> LabState {
    LabState::read(&Layout::new(dir).unwrap()).unwrap().unwrap()
}

fn is_running(p: &ProcessRecord) -> bool {
    ProcInfo::of(p.pid)
        .unwrap()
        .is_some_and(|i| i.starttime == p.starttime && !i.exited())
}

/// The `export K=V` lines of the env file (values written without quotes here).
fn env_file(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("env"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Every key of a config, as `a`, `a.b`, ... for tables.
fn keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let name = format!("{prefix}{k}");
        if let toml::Value::Table(t) = v {
            keys(t, &format!("{name}."), out);
        }
        out.insert(name);
    }
}

/// The top-level keys a sample config in conf/ documents (set or commented out).
fn documented_keys(sample: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conf")
        .join(sample);
    let text = std::fs::read_to_string(&path).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut out: BTreeSet<String> = table.keys().cloned().collect();
    for line in text.lines() {
        if let Some((k, _)) = line.trim_start_matches(['#', ' ']).split_once(" = ") {
            out.insert(k.trim().to_owned());
        }
    }
    out
}

#[test]
fn up_status_down_leaves_nothing_running() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let (downer, report) = up_with_report(&dir);

    let st = state(&dir);
    let names: Vec<&str> = st.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["swtpm", "krb5kdc"]);
    for p in &st.processes {
        assert!(is_running(p), "{} pid {} not running", p.name, p.pid);
    }

    // The server config: the PKCS#11 key manager, on the token the lab's SoftHSM shows.
    let server: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("server.toml")).unwrap()).unwrap();
    let p11 = server["key_manager"]["pkcs11"].as_table().unwrap();
    assert_eq!(p11["token_label"].as_str(), Some("carapace"));
    assert!(Path::new(p11["module"].as_str().unwrap()).is_file());
    let pin_file = Path::new(p11["pin_file"].as_str().unwrap());
    let mode = std::fs::metadata(pin_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        server["bind_address"].as_str(),
        Some(st.server_address.as_str())
    );
    let env = env_file(&dir);
    let slots = Command::new("softhsm2-util")
        .arg("--show-slots")
        .envs(env.iter().filter(|(k, _)| k == "SOFTHSM2_CONF").cloned())
        .output()
        .unwrap();
    let slots = text(&slots);
    assert!(
        slots
            .lines()
            .any(|l| l.trim() == "Label:            carapace"),
        "token not visible with the lab's SOFTHSM2_CONF:\n{slots}"
    );
    // The output names the PIN file, never the PIN.
    let pin = std::fs::read_to_string(pin_file).unwrap();
    let status_out = lab(&["status", "--dir", dir.to_str().unwrap()]);
    assert!(status_out.status.success(), "{}", text(&status_out));
    assert!(!text(&status_out).contains(&pin));

    // The configs use only keys the sample configs document.
    let mut used = BTreeSet::new();
    keys(&server, "", &mut used);
    let documented = documented_keys("server.full.toml");
    for k in used.iter().filter(|k| !k.contains('.')) {
        if k != "key_manager" && k != "node_attestor" {
            assert!(
                documented.contains(k),
                "server.toml: {k} is not in server.full.toml"
            );
        }
    }
    let agent: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("agent.toml")).unwrap()).unwrap();
    let documented = documented_keys("agent.full.toml");
    for k in agent.keys() {
        assert!(
            documented.contains(k),
            "agent.toml: {k} is not in agent.full.toml"
        );
    }
    assert!(agent["socket_path"].as_str().unwrap().len() <= 100);

    // The SSH CA and the host it certified, and the sshpop sections that use them.
    let first_ssh = check_ssh(&dir, &server, &report);

    // The env file points the tools at the running TPM and KDC.
    let rand = Command::new("tpm2_getrandom")
        .args(["--hex", "8"])
        .envs(env.clone())
        .output()
        .unwrap();
    assert!(rand.status.success(), "{}", text(&rand));
    let kinit = Command::new("kinit")
        .arg("-kt")
        .arg(dir.join("krb/host.keytab"))
        .arg("host/node1.lab.test@LAB.TEST")
        .envs(env.clone())
        .env("KRB5CCNAME", "MEMORY:lab-cli-test")
        .output()
        .unwrap();
    assert!(kinit.status.success(), "{}", text(&kinit));

    let down = lab(&["down", "--dir", dir.to_str().unwrap()]);
    let down_text = text(&down);
    assert!(down.status.success(), "{down_text}");
    assert!(
        down_text.contains("swtpm") && down_text.contains("stopped"),
        "{down_text}"
    );
    for p in &st.processes {
        assert!(!is_running(p), "{} pid {} still running", p.name, p.pid);
    }
    assert!(!dir.join("lab.json").exists());
    assert!(dir.join("server.toml").exists(), "down keeps the files");

    let again = lab(&["down", "--dir", dir.to_str().unwrap()]);
    assert!(again.status.success());
    assert!(
        text(&again).contains("nothing is running"),
        "{}",
        text(&again)
    );
    let status_out = lab(&["status", "--dir", dir.to_str().unwrap()]);
    assert!(!status_out.status.success());
    assert!(text(&status_out).contains("nothing is running"));

    // A stopped lab's directory can be brought up again (with a new SSH CA and host
    // key), and purged.
    drop(downer);
    let (downer, report) = up_with_report(&dir);
    let server: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("server.toml")).unwrap()).unwrap();
    let second_ssh = check_ssh(&dir, &server, &report);
    assert_ne!(first_ssh.0, second_ssh.0);
    assert_ne!(first_ssh.1, second_ssh.1);
    let purge = lab(&["down", "--dir", dir.to_str().unwrap(), "--purge"]);
    assert!(purge.status.success(), "{}", text(&purge));
    assert!(!dir.exists());
    drop(downer);
}

#[test]
fn up_refuses_a_directory_with_a_running_lab() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _downer = up(&dir);
    let before = state(&dir);

    let second = lab(&["up", "--dir", dir.to_str().unwrap()]);
    assert!(!second.status.success());
    let msg = text(&second);
    assert!(msg.contains("a lab is already running in"), "{msg}");
    assert!(msg.contains("carapace-lab down --dir"), "{msg}");
    // The running lab is untouched.
    assert_eq!(state(&dir), before);
    for p in &before.processes {
        assert!(is_running(p));
    }
}

#[test]
fn down_never_signals_a_pid_that_is_not_the_recorded_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _downer = up(&dir);

    // A process of ours recorded with the wrong start time: what a recycled pid looks like.
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let info = ProcInfo::of(bystander.id()).unwrap().unwrap();
    let mut st = state(&dir);
    st.processes.push(ProcessRecord {
        name: "bystander".into(),
        pid: bystander.id(),
        starttime: info.starttime + 1,
        exe: info.exe.clone().unwrap(),
        serves: "nothing".into(),
        log: dir.join("none.log"),
    });
    std::fs::write(
        dir.join("lab.json"),
        serde_json::to_string_pretty(&st).unwrap(),
    )
    .unwrap();

    let down = lab(&["down", "--dir", dir.to_str().unwrap()]);
    let out = text(&down);
    assert!(down.status.success(), "{out}");
    assert!(
        out.contains(&format!("bystander pid {:<7} not touched", bystander.id())),
        "{out}"
    );
    assert_eq!(
        bystander.try_wait().unwrap(),
        None,
        "the bystander must still run"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[test]
fn a_missing_package_names_the_apt_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_carapace-lab"))
        .args(["up", "--dir"])
        .arg(tmp.path().join("lab"))
        // No tool can be found on this PATH (the sbin fallbacks hold none of the /usr/bin ones).
        .env("PATH", tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "carapace-lab: softhsm2-util not found; install it with: apt-get install -y softhsm2"
    );
}

#[test]
fn a_missing_ssh_keygen_names_openssh_client() {
    // Every other tool `up` needs, on a PATH of its own.
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in [
        "softhsm2-util",
        "swtpm",
        "swtpm_setup",
        "tpm2_getrandom",
        "krb5kdc",
        "kdb5_util",
        "kadmin.local",
    ] {
        let path = hsm_sim::process::require(tool, "-").unwrap();
        std::os::unix::fs::symlink(path, bin.join(tool)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_carapace-lab"))
        .args(["up", "--dir"])
        .arg(tmp.path().join("lab"))
        .env("PATH", &bin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "carapace-lab: ssh-keygen not found; install it with: apt-get install -y openssh-client"
    );
    // Nothing was started.
    assert!(!tmp.path().join("lab/lab.json").exists());
}
