//! End to end with SSH host certificates made by `ssh-keygen`: the agent attests with
//! `sshpop` from its host key and certificate, a workload gets its SVID through a node
//! alias on the SSH CA, renewals attest again with the certificate on disk at that
//! moment, and a host whose certificate expired loses its identity at the next renewal.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use carapace_agent::node_client;
use carapace_attestor_ssh::agent::{SshAgentConfig, SshAttestorClient};
use carapace_core::plugin::{KeyManager, KeySigner};
use carapace_core::{KeyType, TrustBundle};
use carapace_e2e::td;
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_proto::node::{RenewAgentRequest, SyncAuthorizedRequest};
use tokio::sync::watch;

use carapace_agent::manager::REATTEST_BACKOFF_MAX;
use carapace_e2e::{
    Agent, Lab, Server, ServerOptions, eventually, eventually_within, uid_selector,
};

fn ssh_keygen(args: &[&str]) -> String {
    let out = Command::new("ssh-keygen")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("ssh-keygen: {e}; install it with: apt-get install -y openssh-client")
        });
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `SHA256:<base64>` of a public key file, as `ssh-keygen -l` prints it.
fn fingerprint(public: &Path) -> String {
    let out = ssh_keygen(&["-l", "-E", "sha256", "-f", public.to_str().unwrap()]);
    out.split_whitespace().nth(1).unwrap().to_owned()
}

/// An SSH CA and one host key in `dir`.
struct Keys {
    ca: PathBuf,
    host: PathBuf,
}

impl Keys {
    fn new(dir: &Path) -> Keys {
        let ca = dir.join("ssh_ca");
        let host = dir.join("ssh_host_ed25519_key");
        for (key, kind) in [(&ca, "ed25519"), (&host, "ed25519")] {
            ssh_keygen(&[
                "-q",
                "-t",
                kind,
                "-N",
                "",
                "-C",
                "",
                "-f",
                key.to_str().unwrap(),
            ]);
        }
        Keys { ca, host }
    }

    fn cert_path(&self) -> PathBuf {
        PathBuf::from(format!("{}-cert.pub", self.host.display()))
    }

    /// Signs the host key as a host certificate with key id `id`, valid `validity`.
    fn sign(&self, id: &str, validity: &str) {
        ssh_keygen(&[
            "-q",
            "-s",
            self.ca.to_str().unwrap(),
            "-h",
            "-I",
            id,
            "-n",
            "node1.example.org,node1",
            "-V",
            validity,
            &format!("{}.pub", self.host.display()),
        ]);
    }

    fn ca_public(&self) -> PathBuf {
        PathBuf::from(format!("{}.pub", self.ca.display()))
    }

    /// The agent ID: the host key's SHA-256, unpadded URL-safe base64.
    fn agent_id(&self) -> String {
        let fp = fingerprint(Path::new(&format!("{}.pub", self.host.display())));
        let b64 = fp
            .strip_prefix("SHA256:")
            .unwrap()
            .replace('+', "-")
            .replace('/', "_");
        format!("spiffe://example.org/spire/agent/sshpop/{b64}")
    }
}

fn start_server(lab: &Lab, keys: &Keys, top: &str) -> Server {
    let config = lab.path().join("server.toml");
    let ca_line = std::fs::read_to_string(keys.ca_public()).unwrap();
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n{top}[node_attestor.sshpop]\n\
             cert_authorities = [{:?}]\ncanonical_domain = \"example.org\"\n",
            ca_line.trim()
        ),
    )
    .unwrap();
    Server::start_opts(
        lab,
        ServerOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            ..ServerOptions::default()
        },
    )
}

fn spawn_agent(lab: &Lab, server: &Server, keys: &Keys) -> Agent {
    let config = lab.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n[node_attestor.sshpop]\nhost_key_path = {:?}\n\
             host_cert_path = {:?}\n",
            keys.host.display().to_string(),
            keys.cert_path().display().to_string()
        ),
    )
    .unwrap();
    let bundle = lab.path().join("agent-bundle.pem");
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    let mut agent = Agent::spawn(
        lab,
        server,
        "agent",
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--trust-bundle".as_ref(),
            bundle.as_os_str(),
        ],
    );
    agent.id = keys.agent_id();
    agent
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ssh_host_attests_with_its_certificate_and_a_workload_gets_its_svid_through_a_ca_alias()
{
    let lab = Lab::new();
    let keys = Keys::new(lab.path());
    keys.sign("node1-2026", "-5m:+1h");
    let server = start_server(&lab, &keys, "");
    let mut agent = spawn_agent(&lab, &server, &keys);
    agent.wait_healthy();

    let ca_fp = fingerprint(&keys.ca_public());
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", &agent.id]);
    for selector in [
        "sshpop:principal:node1.example.org".to_owned(),
        "sshpop:principal:node1".to_owned(),
        "sshpop:key_id:node1-2026".to_owned(),
        format!("sshpop:ca_fingerprint:{ca_fp}"),
    ] {
        assert!(shown.contains(&selector), "{selector} in {shown}");
    }

    // Every host this CA certifies is "ssh-fleet"; workloads of this uid on them get
    // spiffe://example.org/ssh-workload.
    server.create_entry(
        "spiffe://example.org/spire/server",
        "spiffe://example.org/node/ssh-fleet",
        &[&format!("sshpop:ca_fingerprint:{ca_fp}")],
        &[],
    );
    server.create_entry(
        "spiffe://example.org/node/ssh-fleet",
        "spiffe://example.org/ssh-workload",
        &[&uid_selector()],
        &[],
    );
    agent
        .wait_for_svid("spiffe://example.org/ssh-workload")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_attests_again_with_the_certificate_on_disk_and_an_expired_one_loses_the_identity()
{
    let lab = Lab::new();
    let keys = Keys::new(lab.path());
    keys.sign("first", "-5m:+1h");
    let server = start_server(&lab, &keys, "agent_svid_ttl = \"20s\"\n");
    let mut agent = spawn_agent(&lab, &server, &keys);
    agent.wait_healthy();
    // A workload whose SVID would rotate every ~10 s if the server kept signing.
    let workload = "spiffe://example.org/ssh-workload";
    server.create_entry(
        &agent.id,
        workload,
        &[&uid_selector()],
        &["--x509-svid-ttl", "20s"],
    );
    agent.wait_for_svid(workload).await;

    // The host gets a renewed certificate (same key, new key id): the next renewal
    // attests with it, under the same agent ID.
    keys.sign("renewed", "-5m:+1h");
    eventually("the renewal to present the renewed certificate", || async {
        server
            .cli_ok(&["agent", "show", "--spiffe-id", &agent.id])
            .contains("sshpop:key_id:renewed")
            .then_some(())
    })
    .await;
    // A reattesting agent cannot dodge fresh evidence with a plain renewal: the server
    // refuses RenewAgent for it (proved in node_api.rs with a direct client).

    // Its certificate lapses: the next renewal is refused, and the server records it.
    keys.sign("lapsed", "20200101:20200102");
    let refused = eventually("the refused re-attestation in the agent's row", || async {
        let a = server.cli_json(&["agent", "show", "--spiffe-id", &agent.id]);
        a["refused_at"].as_i64().map(|_| a)
    })
    .await;
    let reason = refused["refused_reason"].as_str().unwrap();
    assert!(reason.contains("expired"), "{reason}");
    // From then on nothing new is signed: the workload keeps its SVID until it expires,
    // then holds nothing (the server went on signing here before).
    agent
        .assert_keeps_until_expiry_and_gets_nothing_new(workload)
        .await;
    assert_eq!(agent.proc.try_wait(), None, "the agent keeps running");

    // The host gets a valid certificate again: the agent attests afresh by itself (no
    // restart), the refusal is cleared, and the workload gets a new SVID.
    keys.sign("restored", "-5m:+1h");
    let restored = eventually_within(
        "the agent to attest afresh",
        REATTEST_BACKOFF_MAX,
        || async {
            let a = server.cli_json(&["agent", "show", "--spiffe-id", &agent.id]);
            (a["refused_at"].is_null()
                && a["selectors"]
                    .to_string()
                    .contains("sshpop:key_id:restored"))
            .then_some(a)
        },
    )
    .await;
    assert_ne!(restored["serial"], refused["serial"]);
    agent.wait_for_svid(workload).await;
}

/// A client that speaks the node API directly with the agent library's TLS and the sshpop
/// attestor: what a compromised node could send, whatever the agent binary does.
struct DirectAgent {
    chain: Vec<Vec<u8>>,
    key: Arc<dyn KeySigner>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
}

impl DirectAgent {
    fn tls(&self) -> Arc<rustls::ClientConfig> {
        let ck = carapace_tls::certified_key(&self.chain, self.key.clone());
        Arc::new(
            carapace_tls::client_config(self.bundle.clone(), td().server_id(), Some(ck)).unwrap(),
        )
    }
}

async fn attest_direct(
    server: &Server,
    km: &MemoryKeyManager,
    attestor: &SshAttestorClient,
    tls: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<Vec<Vec<u8>>, carapace_agent::Error> {
    let key = km.generate_key(name, KeyType::EcP256).await.unwrap();
    let csr = carapace_tls::csr_for_key(key.clone()).unwrap();
    node_client::attest(&server.address, tls, attestor, csr, key.public_key_der())
        .await
        .map(|r| r.svid.unwrap().cert_chain)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reattesting_agent_cannot_renew_without_evidence_and_a_refused_reattestation_locks_it_out()
 {
    let lab = Lab::new();
    let keys = Keys::new(lab.path());
    keys.sign("first", "-5m:+1h");
    let server = start_server(&lab, &keys, "");
    let attestor = SshAttestorClient::new(&SshAgentConfig {
        host_key_path: keys.host.clone(),
        host_cert_path: None,
    })
    .unwrap();
    let km = MemoryKeyManager::new();
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(bundle));
    let first_contact =
        Arc::new(carapace_tls::client_config(rx.clone(), td().server_id(), None).unwrap());
    let chain = attest_direct(&server, &km, &attestor, first_contact.clone(), "a1")
        .await
        .unwrap();
    let agent = DirectAgent {
        chain,
        key: km.get_key("a1").await.unwrap(),
        bundle: rx.clone(),
    };
    let mut client = node_client::channel(&server.address, agent.tls()).unwrap();
    client
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap();

    // A plain renewal would dodge fresh evidence: refused, and the SVID stays the one.
    let other = km.generate_key("a2", KeyType::EcP256).await.unwrap();
    let err = client
        .renew_agent(RenewAgentRequest {
            csr: carapace_tls::csr_for_key(other).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("renews by attesting again"),
        "{err:?}"
    );
    let row = server.cli_json(&["agent", "show", "--spiffe-id", &keys.agent_id()]);
    assert!(row["refused_at"].is_null());

    // Re-attesting with a lapsed certificate, presenting the valid SVID: refused, and at
    // once (the SVID is good for another hour) every call of the agent is refused.
    keys.sign("lapsed", "20200101:20200102");
    let err = attest_direct(&server, &km, &attestor, agent.tls(), "a3")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    let err = client
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("failed re-attestation"), "{err:?}");
    let row = server.cli_json(&["agent", "show", "--spiffe-id", &keys.agent_id()]);
    assert!(row["refused_at"].as_i64().is_some(), "{row}");

    // A fresh attestation with valid evidence (no SVID presented) clears it.
    keys.sign("again", "-5m:+1h");
    let chain = attest_direct(&server, &km, &attestor, first_contact, "a4")
        .await
        .unwrap();
    let again = DirectAgent {
        chain,
        key: km.get_key("a4").await.unwrap(),
        bundle: rx,
    };
    node_client::channel(&server.address, again.tls())
        .unwrap()
        .sync_authorized(SyncAuthorizedRequest::default())
        .await
        .unwrap();
    let row = server.cli_json(&["agent", "show", "--spiffe-id", &keys.agent_id()]);
    assert!(row["refused_at"].is_null(), "{row}");
}
