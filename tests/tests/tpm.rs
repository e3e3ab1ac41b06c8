//! End to end with a TPM (swtpm, manufactured by hsm-sim with EK certificates from a lab
//! CA): the agent attests with `tpm`, the server trusts the EK through the lab root,
//! activates a credential and checks a fresh quote; a workload gets its SVID through a
//! node-alias entry that selects on PCR 7; a node whose PCR 7 no longer matches the
//! server's policy is refused. Measured boot: the agent sends a boot event log (built by
//! hsm-sim in the TCG format, the swtpm's PCRs extended to match), the server replays it
//! and polices its events; a pre-approved kernel keeps the node's identity across a
//! reboot, an unapproved one loses it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_e2e::{Agent, Lab, Server, ServerOptions, bin, eventually, uid_selector};
use hsm_sim::eventlog::{LogBuilder, image_digest};
use hsm_sim::swtpm::{Swtpm, TpmManufacturer};

/// A fresh swtpm from the shared manufactured template.
fn tpm() -> Swtpm {
    let m = TpmManufacturer::shared().unwrap_or_else(|e| panic!("{e}"));
    Swtpm::start(m).unwrap_or_else(|e| panic!("{e}"))
}

fn tpm2(tpm: &Swtpm, args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .envs(tpm.envs())
        .output()
        .unwrap_or_else(|e| panic!("{} ({e}): apt-get install -y tpm2-tools", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// PCR 7 (sha256) as lowercase hex.
fn pcr7(tpm: &Swtpm) -> String {
    let out = tpm2(tpm, &["tpm2_pcrread", "sha256:7"]);
    let hex = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("7 : 0x"))
        .unwrap_or_else(|| panic!("no PCR 7 in {out}"));
    hex.trim().to_lowercase()
}

fn server_config(lab: &Lab, extra: &str) -> PathBuf {
    let m = TpmManufacturer::shared().unwrap();
    let path = lab.path().join("server.toml");
    std::fs::write(
        &path,
        format!(
            "trust_domain = \"example.org\"\n[node_attestor.join_token]\n[node_attestor.tpm]\n\
             ek_ca_files = [{:?}, {:?}]\n{extra}",
            m.ek_ca_root().display().to_string(),
            m.ek_ca_intermediate().display().to_string()
        ),
    )
    .unwrap();
    path
}

fn start_server(lab: &Lab, config: &Path) -> Server {
    Server::start_opts(
        lab,
        ServerOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            ..ServerOptions::default()
        },
    )
}

/// Spawns a `tpm` agent against `server` (not waiting).
fn spawn_agent(lab: &Lab, server: &Server, tpm: &Swtpm, name: &str) -> Agent {
    spawn_agent_with(lab, server, tpm, name, "")
}

/// Spawns a `tpm` agent with more `[node_attestor.tpm]` settings (not waiting).
fn spawn_agent_with(lab: &Lab, server: &Server, tpm: &Swtpm, name: &str, extra: &str) -> Agent {
    let config = lab.path().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n[node_attestor.tpm]\ntcti = {:?}\n{extra}",
            tpm.tcti()
        ),
    )
    .unwrap();
    let bundle = lab.path().join(format!("{name}-bundle.pem"));
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    Agent::spawn(
        lab,
        server,
        name,
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--trust-bundle".as_ref(),
            bundle.as_os_str(),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tpm_node_attests_and_a_workload_gets_its_svid_through_a_pcr_alias() {
    let lab = Lab::new();
    let tpm = tpm();
    let server = start_server(&lab, &server_config(&lab, ""));
    let mut agent = spawn_agent(&lab, &server, &tpm, "agent");
    agent.wait_healthy();

    // The agent's ID is derived from the EK.
    let agents = server.cli_json(&["agent", "list"]);
    let agent_id = agents["agents"][0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        agent_id.starts_with("spiffe://example.org/spire/agent/tpm/"),
        "{agent_id}"
    );
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", &agent_id]);
    let pcr = pcr7(&tpm);
    assert!(
        shown.contains(&format!("tpm:pcr:sha256:7:{pcr}")),
        "{shown}"
    );
    assert!(shown.contains("tpm:ek_pubhash:"), "{shown}");
    assert!(shown.contains("tpm:ek_cert_issuer_cn:"), "{shown}");

    // Every node that booted with this PCR 7 is "good-boot"; workloads of this uid on
    // such nodes get spiffe://example.org/tpm-workload.
    server.create_entry(
        "spiffe://example.org/spire/server",
        "spiffe://example.org/node/good-boot",
        &[&format!("tpm:pcr:sha256:7:{pcr}")],
        &[],
    );
    server.create_entry(
        "spiffe://example.org/node/good-boot",
        "spiffe://example.org/tpm-workload",
        &[&uid_selector()],
        &[],
    );
    agent
        .wait_for_svid("spiffe://example.org/tpm-workload")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_pcr_7_is_not_golden_is_refused() {
    let lab = Lab::new();
    let tpm = tpm();
    let good = pcr7(&tpm);
    // Extend PCR 7 (as a changed Secure Boot policy would): the value leaves the policy.
    tpm2(
        &tpm,
        &[
            "tpm2_pcrextend",
            "7:sha256=0000000000000000000000000000000000000000000000000000000000000001",
        ],
    );
    let server = start_server(
        &lab,
        &server_config(
            &lab,
            &format!("[node_attestor.tpm.pcr_policy]\n\"7\" = [{good:?}]\n"),
        ),
    );
    let mut agent = spawn_agent(&lab, &server, &tpm, "agent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = agent.proc.try_wait() {
            assert!(!status.success());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent should have been refused:\n{}",
            agent.proc.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = agent.proc.log();
    assert!(log.contains("PCR 7"), "the refusal names the PCR:\n{log}");
    let server_log = server.log();
    assert!(server_log.contains("PCR 7"), "{server_log}");
    let _ = bin("carapace-agent");
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_attests_again_and_a_changed_pcr_loses_the_identity() {
    let lab = Lab::new();
    let tpm = tpm();
    let golden = pcr7(&tpm);
    let server = start_server(
        &lab,
        &server_config(
            &lab,
            &format!("[node_attestor.tpm.pcr_policy]\n\"7\" = [{golden:?}]\n",),
        )
        .with_prefix("agent_svid_ttl = \"20s\"\n"),
    );
    let mut agent = spawn_agent(&lab, &server, &tpm, "agent");
    agent.wait_healthy();
    let agent_id = server.cli_json(&["agent", "list"])["agents"][0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A workload whose SVID would rotate every ~10 s if the server kept signing.
    let workload = "spiffe://example.org/tpm-workload";
    server.create_entry(
        &agent_id,
        workload,
        &[&uid_selector()],
        &["--x509-svid-ttl", "20s"],
    );
    agent.wait_for_svid(workload).await;

    // At about half of 20 s the agent renews by attesting again with a fresh quote.
    agent.wait_for_renewal().await;
    let attested = server.log().matches("tpm: node attested").count();
    assert!(
        attested >= 2,
        "renewal went through attestation:\n{}",
        server.log()
    );

    // The node's boot state changes: the next renewal is refused, naming the PCR, and
    // the server records the refusal in the agent's row.
    tpm2(
        &tpm,
        &[
            "tpm2_pcrextend",
            "7:sha256=0000000000000000000000000000000000000000000000000000000000000002",
        ],
    );
    let refused = eventually("the refused re-attestation in the agent's row", || async {
        let a = server.cli_json(&["agent", "show", "--spiffe-id", &agent_id]);
        a["refused_reason"].as_str().map(str::to_owned)
    })
    .await;
    assert!(refused.contains("PCR 7 has value"), "{refused}");
    // From then on nothing new is signed for this node (the server went on signing here
    // before): the workload keeps its SVID until it expires, then holds nothing, while
    // the agent keeps attesting afresh and is refused each time.
    agent
        .assert_keeps_until_expiry_and_gets_nothing_new(workload)
        .await;
    assert_eq!(agent.proc.try_wait(), None, "the agent keeps running");
    assert!(
        agent.proc.log().contains("attesting afresh"),
        "{}",
        agent.proc.log()
    );
}

/// Spawns an agent whose own key is in the TPM (`[key_manager.tpm]`, same TCTI as its
/// `[node_attestor.tpm]`), not waiting. Respawning with the same `name` reuses the data
/// directory (a restart).
fn spawn_tpm_key_agent(lab: &Lab, server: &Server, tpm: &Swtpm, name: &str) -> Agent {
    let config = lab.path().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n[key_manager.tpm]\ntcti = {tcti:?}\n\
             [node_attestor.tpm]\ntcti = {tcti:?}\n",
            tcti = tpm.tcti()
        ),
    )
    .unwrap();
    let bundle = lab.path().join(format!("{name}-bundle.pem"));
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    Agent::spawn(
        lab,
        server,
        name,
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--trust-bundle".as_ref(),
            bundle.as_os_str(),
        ],
    )
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// No private key in the clear anywhere in the agent's data dir: no PEM private key, no
/// PKCS#8 DER; the only key material is one TPM blob in `keys-tpm/`.
fn assert_no_private_key_on_disk(data_dir: &Path) {
    let files = files_under(data_dir);
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} holds a PEM private key",
            f.display()
        );
        // PKCS#8 v1 DER starts with SEQUENCE { INTEGER 0, SEQUENCE { OID ... } }.
        assert!(
            !bytes
                .windows(5)
                .any(|w| w == [0x02, 0x01, 0x00, 0x30, 0x13]),
            "{} looks like PKCS#8 DER",
            f.display()
        );
    }
    let blobs: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "tpmkey"))
        .collect();
    assert_eq!(blobs.len(), 1, "one agent key blob: {files:?}");
    assert_eq!(
        blobs[0].parent().unwrap(),
        data_dir.join("keys-tpm"),
        "{files:?}"
    );
    let blob: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blobs[0]).unwrap()).unwrap();
    assert_eq!(blob["format"], "carapace-tpm-key", "{blob}");
}

/// The agent's own key is generated in the TPM and certified by the AK inside the
/// attestation (the server requires it and adds `tpm:agent_key:tpm`); a workload gets
/// its SVID through an alias on that selector; the agent restarts, restores its identity
/// without attesting again, and syncs over TLS signed by the TPM key (a new entry
/// arrives); no private key is ever on disk.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_key_lives_in_the_tpm_is_certified_and_signs_tls_after_a_restart() {
    let lab = Lab::new();
    let tpm = tpm();
    let server = start_server(
        &lab,
        &server_config(&lab, "require_agent_key_in_tpm = true\n"),
    );
    let mut agent = spawn_tpm_key_agent(&lab, &server, &tpm, "agent");
    agent.wait_healthy();

    let agents = server.cli_json(&["agent", "list"]);
    let agent_id = agents["agents"][0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", &agent_id]);
    assert!(shown.contains("tpm:agent_key:tpm"), "{shown}");
    server.create_entry(
        "spiffe://example.org/spire/server",
        "spiffe://example.org/node/tpm-keyed",
        &["tpm:agent_key:tpm"],
        &[],
    );
    server.create_entry(
        "spiffe://example.org/node/tpm-keyed",
        "spiffe://example.org/before-restart",
        &[&uid_selector()],
        &[],
    );
    agent
        .wait_for_svid("spiffe://example.org/before-restart")
        .await;
    assert_no_private_key_on_disk(&agent.data_dir);

    // Restart: same data dir, same TPM.
    agent.proc.kill();
    let mut again = spawn_tpm_key_agent(&lab, &server, &tpm, "agent");
    again.wait_healthy();
    let log = again.proc.log();
    assert!(
        log.contains("restored the agent identity from the data directory"),
        "{log}"
    );
    assert!(log.contains(&agent_id), "{log}");
    // Only the sync stream (mutual TLS, the client half signed in the TPM) brings a new
    // entry to the restarted agent.
    server.create_entry(
        "spiffe://example.org/node/tpm-keyed",
        "spiffe://example.org/after-restart",
        &[&uid_selector()],
        &[],
    );
    again
        .wait_for_svid("spiffe://example.org/after-restart")
        .await;
    // The restarted agent signed nothing but its TLS handshakes, in the TPM.
    let log = again.proc.log();
    assert!(log.contains("tpm: signed in the TPM"), "{log}");
    assert_eq!(
        server.log().matches("tpm: node attested").count(),
        1,
        "the restart did not attest again:\n{}",
        server.log()
    );
    assert_no_private_key_on_disk(&again.data_dir);
}

/// Renewal with the agent key in the TPM: the agent attests again over its TLS
/// connection (signed by the current TPM key), certifying a new TPM key; the old key's
/// blob is deleted.
#[tokio::test(flavor = "multi_thread")]
async fn renewal_certifies_a_new_tpm_key_and_drops_the_old_one() {
    let lab = Lab::new();
    let tpm = tpm();
    let server = start_server(
        &lab,
        &server_config(&lab, "require_agent_key_in_tpm = true\n")
            .with_prefix("agent_svid_ttl = \"20s\"\n"),
    );
    let mut agent = spawn_tpm_key_agent(&lab, &server, &tpm, "agent");
    agent.wait_healthy();
    let first = files_under(&agent.data_dir.join("keys-tpm"));
    assert_eq!(first.len(), 1, "{first:?}");
    agent.wait_for_renewal().await;
    let log = server.log();
    assert!(
        log.matches("tpm: node attested").count() >= 2,
        "renewal went through attestation:\n{log}"
    );
    // require_agent_key_in_tpm: each of them certified the (new) agent key.
    let now = files_under(&agent.data_dir.join("keys-tpm"));
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, first, "a new key replaced the old one");
    assert_no_private_key_on_disk(&agent.data_dir);
}

/// An agent whose key is not in the TPM (the default `disk` key manager) is refused by
/// a server that requires it, naming why.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_requiring_the_agent_key_in_the_tpm_refuses_a_disk_key() {
    let lab = Lab::new();
    let tpm = tpm();
    let server = start_server(
        &lab,
        &server_config(&lab, "require_agent_key_in_tpm = true\n"),
    );
    let mut agent = spawn_agent(&lab, &server, &tpm, "agent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while agent.proc.try_wait().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent should have been refused:\n{}",
            agent.proc.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = agent.proc.log();
    assert!(log.contains("the agent key is not in the TPM"), "{log}");
}

/// Prepends top-level settings to a config file.
trait WithPrefix {
    fn with_prefix(self, prefix: &str) -> Self;
}

impl WithPrefix for PathBuf {
    fn with_prefix(self, prefix: &str) -> Self {
        let text = std::fs::read_to_string(&self).unwrap();
        std::fs::write(&self, format!("{prefix}{text}")).unwrap();
        self
    }
}

/// Boots `log` on `tpm` (a reboot first when `reboot`: PCRs back to zero) and writes it
/// where the agent reads it.
fn boot(tpm: &Swtpm, log: &LogBuilder, path: &Path, reboot: bool) {
    if reboot {
        tpm.power_cycle().unwrap_or_else(|e| panic!("{e}"));
    }
    log.extend(tpm).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(path, log.to_bytes()).unwrap();
}

/// Waits for the next attestation (a renewal), then reboots the node with Secure Boot
/// into `kernel`: the reboot lands well before the renewal after it.
async fn reboot_after_a_renewal(server: &Server, tpm: &Swtpm, kernel: &[u8], log_path: &Path) {
    let attested = || server.log().matches("tpm: node attested").count();
    let before = attested();
    eventually("a renewal by attestation", || async {
        (attested() > before).then_some(())
    })
    .await;
    boot(tpm, &LogBuilder::typical_uefi(true, kernel), log_path, true);
}

/// The agent's selectors as `agent show` lists them.
fn agent_selectors(server: &Server, agent_id: &str) -> String {
    server.cli_ok(&["agent", "show", "--spiffe-id", agent_id])
}

#[tokio::test(flavor = "multi_thread")]
async fn measured_boot_a_pre_approved_kernel_keeps_the_identity_and_an_unapproved_one_loses_it() {
    let lab = Lab::new();
    let tpm = tpm();
    let log_path = lab.path().join("binary_bios_measurements");
    let (kernel_1, kernel_2, kernel_3): (&[u8], &[u8], &[u8]) =
        (b"vmlinuz-6.1.0-40", b"vmlinuz-6.1.0-41", b"vmlinuz-evil");
    let first = LogBuilder::typical_uefi(true, kernel_1);
    boot(&tpm, &first, &log_path, false);
    // Shim, the boot loader and both kernels are approved; the third kernel is not.
    let approved: Vec<String> = first
        .boot_application_digests()
        .into_iter()
        .chain([image_digest(kernel_2)])
        .map(hex::encode)
        .collect();
    let server = start_server(
        &lab,
        &server_config(
            &lab,
            &format!(
                "[node_attestor.tpm.measured_boot]\nsecure_boot = true\n\
                 boot_applications = {approved:?}\n"
            ),
        )
        .with_prefix("agent_svid_ttl = \"20s\"\n"),
    );
    let mut agent = spawn_agent_with(
        &lab,
        &server,
        &tpm,
        "agent",
        &format!("event_log = {:?}\n", log_path.display().to_string()),
    );
    agent.wait_healthy();
    let agent_id = server.cli_json(&["agent", "list"])["agents"][0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let k1 = format!(
        "tpm:boot_app:sha256:{}",
        hex::encode(image_digest(kernel_1))
    );
    let k2 = format!(
        "tpm:boot_app:sha256:{}",
        hex::encode(image_digest(kernel_2))
    );
    let shown = agent_selectors(&server, &agent_id);
    assert!(shown.contains("tpm:secure_boot:on"), "{shown}");
    assert!(shown.contains(&k1), "{shown}");

    // Nodes that booted with Secure Boot on are "secure-boot"; workloads of this uid on
    // them get an SVID that rotates about every 10 s while the server signs for the node.
    server.create_entry(
        "spiffe://example.org/spire/server",
        "spiffe://example.org/node/secure-boot",
        &["tpm:secure_boot:on"],
        &[],
    );
    let workload = "spiffe://example.org/measured-workload";
    server.create_entry(
        "spiffe://example.org/node/secure-boot",
        workload,
        &[&uid_selector()],
        &["--x509-svid-ttl", "20s"],
    );
    agent.wait_for_svid(workload).await;

    // Right after a renewal (about every 10 s), the node reboots into the pre-approved
    // kernel: the next renewal attests with the new log and the node keeps its identity.
    reboot_after_a_renewal(&server, &tpm, kernel_2, &log_path).await;
    eventually("the node attested with the new kernel", || async {
        agent_selectors(&server, &agent_id)
            .contains(&k2)
            .then_some(())
    })
    .await;
    let shown = agent_selectors(&server, &agent_id);
    assert!(
        !shown.contains(&k1),
        "the old kernel's selector is gone: {shown}"
    );
    let after_reboot = agent
        .held_svid(workload)
        .expect("the workload holds its SVID");
    eventually("a new SVID signed after the reboot", || async {
        agent
            .held_svid(workload)
            .filter(|s| s.chain_pem != after_reboot.chain_pem)
    })
    .await;
    assert_eq!(
        server.cli_json(&["agent", "show", "--spiffe-id", &agent_id])["refused_reason"],
        serde_json::Value::Null,
        "nothing was refused"
    );

    // A reboot into a kernel nobody approved: the next renewal is refused, naming the
    // event, and the workload's identity lapses.
    reboot_after_a_renewal(&server, &tpm, kernel_3, &log_path).await;
    let refused = eventually("the refused re-attestation in the agent's row", || async {
        let a = server.cli_json(&["agent", "show", "--spiffe-id", &agent_id]);
        a["refused_reason"].as_str().map(str::to_owned)
    })
    .await;
    assert!(
        refused.contains("a boot application not in boot_applications")
            && refused.contains(&hex::encode(image_digest(kernel_3)))
            && refused.contains("EV_EFI_BOOT_SERVICES_APPLICATION"),
        "{refused}"
    );
    agent
        .assert_keeps_until_expiry_and_gets_nothing_new(workload)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn measured_boot_refuses_a_log_that_does_not_replay_and_secure_boot_off() {
    let lab = Lab::new();
    let server = start_server(
        &lab,
        &server_config(
            &lab,
            "[node_attestor.tpm.measured_boot]\nsecure_boot = true\n",
        ),
    );
    // A log whose events were never extended into this TPM: the replay names PCR 0.
    let tpm_a = tpm();
    let path_a = lab.path().join("a.log");
    std::fs::write(&path_a, LogBuilder::typical_uefi(true, b"k").to_bytes()).unwrap();
    // A node that booted with Secure Boot off.
    let tpm_b = tpm();
    let path_b = lab.path().join("b.log");
    boot(
        &tpm_b,
        &LogBuilder::typical_uefi(false, b"k"),
        &path_b,
        false,
    );
    for (tpm, path, name, expected) in [
        (
            &tpm_a,
            &path_a,
            "agent-a",
            "the event log does not replay: PCR 0",
        ),
        (&tpm_b, &path_b, "agent-b", "Secure Boot was off"),
    ] {
        let mut agent = spawn_agent_with(
            &lab,
            &server,
            tpm,
            name,
            &format!("event_log = {:?}\n", path.display().to_string()),
        );
        let status = agent
            .proc
            .wait_exit(std::time::Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{name} should have been refused:\n{}", agent.proc.log()));
        assert!(!status.success());
        let log = agent.proc.log();
        assert!(log.contains(expected), "{name}: {log}");
    }
    assert_eq!(
        server.cli_json(&["agent", "list"])["agents"]
            .as_array()
            .map(Vec::len),
        Some(0),
        "no agent was recorded"
    );
}
