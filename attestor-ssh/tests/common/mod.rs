//! A throwaway SSH CA lab for the tests: keys and certificates made by the real
//! `ssh-keygen` in a temporary directory, and both halves run in-process.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub,
    reason = "test helpers, not every test file uses every one"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use carapace_attestor_ssh::agent::{SshAgentConfig, SshAttestorClient};
use carapace_attestor_ssh::server::{SshAttestor, SshServerConfig};
use carapace_attestor_ssh::wire;
use carapace_core::Error;
use carapace_core::clock::{Clock, SystemClock};
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationStep, NodeAttestor, NodeAttestorClient,
    PluginContext,
};

/// The key types the tests generate.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Ed25519,
    P256,
    P384,
    Rsa,
}

impl Kind {
    fn args(self) -> &'static [&'static str] {
        match self {
            Kind::Ed25519 => &["-t", "ed25519"],
            Kind::P256 => &["-t", "ecdsa", "-b", "256"],
            Kind::P384 => &["-t", "ecdsa", "-b", "384"],
            Kind::Rsa => &["-t", "rsa", "-b", "2048"],
        }
    }
}

/// Runs ssh-keygen with `args` (in UTC, so `-V` dates are UTC), which must succeed.
pub fn ssh_keygen(args: &[&str]) -> String {
    let out = match Command::new("ssh-keygen")
        .args(args)
        .env("TZ", "UTC")
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "ssh-keygen is not installed (these tests make their keys and certificates with \
             it): install it with: apt-get install -y openssh-client"
        ),
        Err(e) => panic!("running ssh-keygen: {e}"),
    };
    assert!(
        out.status.success(),
        "ssh-keygen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A temporary directory of keys and certificates.
pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Self {
        Lab {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Generates key pair `name` (no passphrase); returns the private key's path.
    pub fn keygen(&self, name: &str, kind: Kind) -> PathBuf {
        let path = self.path(name);
        let p = path.to_str().unwrap();
        let mut args = vec!["-q"];
        args.extend_from_slice(kind.args());
        args.extend_from_slice(&["-N", "", "-C", name, "-f", p]);
        ssh_keygen(&args);
        path
    }

    /// Signs `key`.pub with `ca` and `extra` arguments (`-h`, `-n`, `-V`, ...); the
    /// certificate is moved to `cert_name` in the lab, whose path is returned.
    pub fn sign(&self, ca: &Path, key: &Path, cert_name: &str, extra: &[&str]) -> PathBuf {
        let ca = ca.to_str().unwrap();
        let pubkey = format!("{}.pub", key.display());
        let mut args = vec!["-q", "-s", ca];
        args.extend_from_slice(extra);
        args.push(&pubkey);
        ssh_keygen(&args);
        let made = PathBuf::from(format!("{}-cert.pub", key.display()));
        let dest = self.path(cert_name);
        std::fs::rename(&made, &dest).unwrap();
        dest
    }

    /// A host certificate for `key` by `ca`: id `keyid`, principals
    /// `host1.example.com,host1`, valid from 5 minutes ago for an hour.
    pub fn host_cert(&self, ca: &Path, key: &Path, cert_name: &str) -> PathBuf {
        self.sign(
            ca,
            key,
            cert_name,
            &[
                "-h",
                "-I",
                "keyid",
                "-n",
                "host1.example.com,host1",
                "-V",
                "-5m:+1h",
            ],
        )
    }

    /// The authorized_keys line of `key`'s public half.
    pub fn pub_line(&self, key: &Path) -> String {
        std::fs::read_to_string(format!("{}.pub", key.display()))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// What `ssh-keygen -lf <key>.pub -E sha256` prints as the fingerprint
    /// (`SHA256:...`).
    pub fn fingerprint(&self, key: &Path) -> String {
        let out = ssh_keygen(&[
            "-l",
            "-E",
            "sha256",
            "-f",
            &format!("{}.pub", key.display()),
        ]);
        out.split_whitespace().nth(1).unwrap().to_owned()
    }

    /// A server trusting `cas`.
    pub fn server(&self, cas: &[&Path]) -> SshAttestor {
        self.server_with(cas, None)
    }

    /// A server trusting `cas`, with an optional canonical domain.
    pub fn server_with(&self, cas: &[&Path], canonical_domain: Option<&str>) -> SshAttestor {
        self.server_on(cas, canonical_domain, Arc::new(SystemClock))
    }

    /// A server trusting `cas`, with an optional canonical domain, reading `clock`.
    pub fn server_on(
        &self,
        cas: &[&Path],
        canonical_domain: Option<&str>,
        clock: Arc<dyn Clock>,
    ) -> SshAttestor {
        let cfg = SshServerConfig {
            cert_authorities: cas
                .iter()
                .map(|ca| format!("cert-authority {}", self.pub_line(ca)))
                .collect(),
            cert_authorities_path: None,
            canonical_domain: canonical_domain.map(str::to_owned),
        };
        SshAttestor::new(
            &cfg,
            &PluginContext::for_tests(self.dir.path()).with_clock(clock),
        )
        .unwrap()
    }

    /// An agent with host key `key` and certificate `cert`.
    pub fn agent(&self, key: &Path, cert: &Path) -> Result<SshAttestorClient, Error> {
        SshAttestorClient::new(&SshAgentConfig {
            host_key_path: key.to_owned(),
            host_cert_path: Some(cert.to_owned()),
        })
    }
}

/// The payload an agent would send for certificate file `cert`, made without an agent
/// (which would refuse some of the certificates the server tests need).
pub fn payload_of(cert: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(cert).unwrap();
    let b64 = text.split_whitespace().nth(1).unwrap();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    wire::encode(&wire::Payload {
        version: wire::VERSION,
        certificate: wire::b64(&blob),
    })
    .unwrap()
}

/// An attestation context with a TLS exporter of 32 bytes `exporter`.
pub fn ctx(exporter: u8) -> AttestationContext {
    AttestationContext {
        agent_public_key: vec![1, 2, 3],
        tls_exporter: vec![exporter; 32],
    }
}

/// One full attestation: payload, begin, challenge, answer, respond.
pub async fn attest(
    server: &SshAttestor,
    agent: &SshAttestorClient,
    ctx: &AttestationContext,
) -> Result<AttestationResult, Error> {
    let payload = agent.payload(ctx).await?;
    let AttestationStep::Challenge { challenge, session } = server.begin(&payload, ctx).await?
    else {
        panic!("sshpop must challenge before it accepts");
    };
    let answer = agent.answer(&challenge, ctx).await?;
    match session.respond(&answer).await? {
        AttestationStep::Done(result) => Ok(result),
        AttestationStep::Challenge { .. } => panic!("sshpop has a single challenge"),
    }
}

/// The server's refusal of a payload at `begin`, as text.
pub async fn refused_at_begin(server: &SshAttestor, payload: &[u8]) -> String {
    match server.begin(payload, &ctx(7)).await {
        Ok(_) => panic!("the payload was accepted"),
        Err(e) => {
            assert!(
                matches!(e, Error::AttestationRejected(_)),
                "expected AttestationRejected, got {e:?}"
            );
            e.to_string()
        }
    }
}

/// Makes `path` readable by everyone (0644).
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `SHA256:<std base64>` → the agent path form (URL-safe, same digits).
pub fn url_safe(fingerprint: &str) -> String {
    fingerprint
        .strip_prefix("SHA256:")
        .unwrap()
        .replace('+', "-")
        .replace('/', "_")
}
