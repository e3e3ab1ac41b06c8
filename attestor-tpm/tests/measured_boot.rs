//! Measured boot in process, against swtpm: the agent sends the boot event log with its
//! quote (wire version 2), the server replays it against the quoted PCRs and polices its
//! events. The logs are built by hsm-sim's `LogBuilder` in the TCG format and the swtpm's
//! PCRs extended to match, as firmware would have.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;
use common::{begin, done, rejected, selectors};

use std::path::Path;
use std::sync::Arc;

use carapace_attestor_tpm::agent::{TpmAgentConfig, TpmAttestorClient};
use carapace_attestor_tpm::eventlog::policy::MeasuredBootConfig;
use carapace_attestor_tpm::server::{TpmAttestor, TpmServerConfig};
use carapace_attestor_tpm::wire::{self, Challenge, Payload};
use carapace_core::Error;
use carapace_core::plugin::{
    AttestationContext, AttestationResult, MemoryStateStore, NodeAttestorClient, PluginContext,
};
use hsm_sim::eventlog::{LogBuilder, image_digest};
use hsm_sim::swtpm::{Swtpm, TpmManufacturer};

fn ctx(exporter: u8) -> AttestationContext {
    AttestationContext {
        agent_public_key: Vec::new(),
        tls_exporter: vec![exporter; 32],
    }
}

fn tpm() -> Swtpm {
    Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap()
}

fn server(measured_boot: Option<MeasuredBootConfig>) -> TpmAttestor {
    server_quoting(&carapace_attestor_tpm::server::DEFAULT_PCRS, measured_boot)
}

fn server_quoting(pcrs: &[u8], measured_boot: Option<MeasuredBootConfig>) -> TpmAttestor {
    let m = TpmManufacturer::shared().unwrap();
    let cfg = TpmServerConfig {
        ek_ca_files: vec![m.ek_ca_root(), m.ek_ca_intermediate()],
        pcrs: pcrs.to_vec(),
        measured_boot,
        ..TpmServerConfig::default()
    };
    TpmAttestor::new(
        &cfg,
        &PluginContext::for_tests("/"),
        Arc::new(MemoryStateStore::default()),
    )
    .unwrap()
}

/// A client that sends the log at `log`.
fn client(tpm: &Swtpm, log: &Path) -> TpmAttestorClient {
    TpmAttestorClient::new(&TpmAgentConfig {
        tcti: Some(tpm.tcti()),
        event_log: Some(log.to_owned()),
    })
}

async fn attest(
    server: &TpmAttestor,
    client: &TpmAttestorClient,
) -> Result<AttestationResult, Error> {
    let (challenge, session) = begin(server, &client.payload(&ctx(0)).await?, &ctx(0)).await?;
    let answer = client.answer(&challenge, &ctx(0)).await?;
    session.respond(&answer).await.map(done)
}

/// A booted node: a swtpm whose PCRs hold `log`, and the log in a file.
struct Node {
    tpm: Swtpm,
    dir: tempfile::TempDir,
}

impl Node {
    fn boot(log: &LogBuilder) -> Node {
        let tpm = tpm();
        log.extend(&tpm).unwrap();
        let node = Node {
            tpm,
            dir: tempfile::tempdir().unwrap(),
        };
        node.write(&log.to_bytes());
        node
    }

    /// Reboots the node into `log`: PCRs reset, `log` measured and written.
    fn reboot(&self, log: &LogBuilder) {
        self.tpm.power_cycle().unwrap();
        log.extend(&self.tpm).unwrap();
        self.write(&log.to_bytes());
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("binary_bios_measurements")
    }

    /// Replaces the log the agent sends (the PCRs stay).
    fn write(&self, bytes: &[u8]) {
        std::fs::write(self.log_path(), bytes).unwrap();
    }

    fn client(&self) -> TpmAttestorClient {
        client(&self.tpm, &self.log_path())
    }
}

fn approved(images: &[&[u8]], log: &LogBuilder) -> MeasuredBootConfig {
    MeasuredBootConfig {
        secure_boot: true,
        boot_applications: Some(
            log.boot_application_digests()
                .into_iter()
                .chain(images.iter().map(|i| image_digest(i)))
                .map(hex::encode)
                .collect(),
        ),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_that_replays_gives_its_selectors_without_a_policy() {
    let log = LogBuilder::typical_uefi(true, b"kernel");
    let node = Node::boot(&log);
    let r = attest(&server(None), &node.client()).await.unwrap();
    let sel = selectors(&r);
    assert!(sel.contains(&"tpm:secure_boot:on".to_owned()), "{sel:?}");
    for d in log.boot_application_digests() {
        let s = format!("tpm:boot_app:sha256:{}", hex::encode(d));
        assert!(sel.contains(&s), "{s} in {sel:?}");
    }
    assert!(
        sel.contains(&format!(
            "tpm:boot_app:sha256:{}",
            hex::encode(image_digest(b"kernel"))
        )),
        "{sel:?}"
    );
    // A server that does not quote PCR 4 takes no boot application from the log: nothing
    // vouches for those events.
    let r = attest(&server_quoting(&[0, 7], None), &node.client())
        .await
        .unwrap();
    let sel = selectors(&r);
    assert!(sel.contains(&"tpm:secure_boot:on".to_owned()), "{sel:?}");
    assert!(!sel.iter().any(|s| s.contains("boot_app")), "{sel:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_accepts_a_pre_approved_kernel_and_refuses_others() {
    let first = LogBuilder::typical_uefi(true, b"kernel-1");
    let policy = approved(&[b"kernel-2"], &first);
    let server = server(Some(policy));
    // One node (one EK: the server keeps its TPM clock) rebooting into each kernel.
    let node = Node::boot(&first);
    let c = node.client();
    attest(&server, &c).await.unwrap();
    node.reboot(&LogBuilder::typical_uefi(true, b"kernel-2"));
    attest(&server, &c).await.unwrap();
    node.reboot(&LogBuilder::typical_uefi(true, b"kernel-3"));
    let msg = rejected(attest(&server, &c).await);
    assert!(
        msg.contains("EV_EFI_BOOT_SERVICES_APPLICATION, PCR 4")
            && msg.contains(&hex::encode(image_digest(b"kernel-3")))
            && msg.contains("a boot application not in boot_applications"),
        "{msg}"
    );
    node.reboot(&LogBuilder::typical_uefi(false, b"kernel-1"));
    let msg = rejected(attest(&server, &c).await);
    assert!(msg.contains("Secure Boot was off"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_that_does_not_replay_is_refused_naming_the_pcr() {
    let log = LogBuilder::typical_uefi(true, b"kernel");
    let node = Node::boot(&log);
    let server = server(None);
    // The PCRs say kernel, the log says another one.
    node.write(&LogBuilder::typical_uefi(true, b"other kernel").to_bytes());
    let msg = rejected(attest(&server, &node.client()).await);
    assert!(
        msg.contains("the event log does not replay: PCR 4"),
        "{msg}"
    );
    // A truncated log: refused with its offset.
    let bytes = log.to_bytes();
    node.write(&bytes[..bytes.len() - 7]);
    let msg = rejected(attest(&server, &node.client()).await);
    assert!(msg.contains("event log: at byte"), "{msg}");
    // The original log attests.
    node.write(&bytes);
    attest(&server, &node.client()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_log_is_not_sent_and_a_policy_without_a_log_refuses() {
    let log = LogBuilder::typical_uefi(true, b"kernel");
    let node = Node::boot(&log);
    let mut big = log.to_bytes();
    big.resize(carapace_attestor_tpm::eventlog::MAX_LOG_BYTES + 1, 0);
    node.write(&big);
    let server = server(Some(approved(&[], &log)));
    let c = node.client();
    let (challenge, _session) = begin(&server, &c.payload(&ctx(0)).await.unwrap(), &ctx(0))
        .await
        .unwrap();
    let err = c.answer(&challenge, &ctx(0)).await.unwrap_err().to_string();
    assert!(err.contains("more than a server accepts"), "{err}");
    // An agent configured to send no log.
    let none = TpmAttestorClient::new(&TpmAgentConfig {
        tcti: Some(node.tpm.tcti()),
        event_log: Some("".into()),
    });
    let msg = rejected(attest(&server, &none).await);
    assert!(msg.contains("the agent sent none"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn version_2_evidence_is_bound_to_its_connection() {
    let log = LogBuilder::typical_uefi(true, b"kernel");
    let node = Node::boot(&log);
    let server = server(None);
    let c = node.client();
    // The server's side of the attestation runs on connection 1; the agent answers as if
    // on connection 2 (a relay): the quote's qualifying data does not match.
    let (challenge, session) = begin(&server, &c.payload(&ctx(1)).await.unwrap(), &ctx(1))
        .await
        .unwrap();
    let answer = c.answer(&challenge, &ctx(2)).await.unwrap();
    let msg = rejected(session.respond(&answer).await);
    assert!(
        msg.to_lowercase().contains("nonce") || msg.contains("qualifying"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_1_agent_gets_a_version_1_challenge_and_no_measured_boot() {
    let tpm = tpm();
    let c = TpmAttestorClient::new(&TpmAgentConfig {
        tcti: Some(tpm.tcti()),
        ..Default::default()
    });
    let mut payload: Payload = wire::decode("payload", &c.payload(&ctx(0)).await.unwrap()).unwrap();
    assert_eq!(payload.version, wire::VERSION);
    payload.version = wire::VERSION_1;
    let v1 = wire::encode(&payload);
    let (challenge, _) = begin(&server(None), &v1, &ctx(0)).await.unwrap();
    let text = String::from_utf8(challenge.clone()).unwrap();
    assert!(!text.contains("event_log"), "{text}");
    let parsed: Challenge = wire::decode("challenge", &challenge).unwrap();
    assert_eq!(parsed.version, wire::VERSION_1);
    // A server with a measured-boot policy refuses a version 1 agent outright.
    let log = LogBuilder::typical_uefi(true, b"kernel");
    let msg = rejected(
        begin(&server(Some(approved(&[], &log))), &v1, &ctx(0))
            .await
            .map(|_| ()),
    );
    assert!(msg.contains("speaks version 1"), "{msg}");
}

#[test]
fn validate_names_policed_pcrs_that_are_not_quoted_and_bad_digests() {
    let cfg = TpmServerConfig {
        ek_hash_allowlist: vec!["00".repeat(32)],
        pcrs: vec![0, 7],
        measured_boot: Some(MeasuredBootConfig {
            secure_boot: true,
            boot_applications: Some(vec!["11".repeat(32)]),
            ..Default::default()
        }),
        ..TpmServerConfig::default()
    };
    let problems = cfg.validate().unwrap_err();
    assert_eq!(
        problems,
        vec![
            "measured_boot polices PCR 4, which is not in pcrs: add it, so the quote covers \
             the events the policy reads"
                .to_owned()
        ]
    );
    let bad = TpmServerConfig {
        measured_boot: Some(MeasuredBootConfig {
            db: Some(vec!["not hex".into()]),
            ..Default::default()
        }),
        ..cfg
    };
    let problems = bad.validate().unwrap_err().join("; ");
    assert!(
        problems.contains("measured_boot: db: \"not hex\" is not a sha256 digest"),
        "{problems}"
    );
    // And from TOML, as the server reads it: an unknown key is refused.
    let err = toml::from_str::<TpmServerConfig>(
        "ek_hash_allowlist = []\n[measured_boot]\nsecureboot = true\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown field `secureboot`"), "{err}");
}
