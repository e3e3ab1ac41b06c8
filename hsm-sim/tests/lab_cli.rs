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
    let t = Instant::now();
    let out = lab(&["up", "--dir", dir.to_str().unwrap()]);
    eprintln!("carapace-lab up: {:?}", t.elapsed());
    let downer = Downer(dir.to_owned());
    assert!(out.status.success(), "up failed:\n{}", text(&out));
    downer
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
    let downer = up(&dir);

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

    // A stopped lab's directory can be brought up again, and purged.
    drop(downer);
    let downer = up(&dir);
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
