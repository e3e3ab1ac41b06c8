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

use carapace_e2e::{Agent, Lab, Server, ServerOptions, eventually, uid_selector};

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
async fn renewal_attests_again_with_the_certificate_on_disk_and_an_expired_one_is_refused() {
    let lab = Lab::new();
    let keys = Keys::new(lab.path());
    keys.sign("first", "-5m:+1h");
    let server = start_server(&lab, &keys, "agent_svid_ttl = \"20s\"\n");
    let mut agent = spawn_agent(&lab, &server, &keys);
    agent.wait_healthy();

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

    // Its certificate lapses: the next renewal is refused.
    keys.sign("lapsed", "20200101:20200102");
    eventually("the renewal to be refused", || async {
        let log = agent.proc.log();
        (log.contains("expired") && log.contains("sshpop")).then_some(())
    })
    .await;
}
