//! B7: what one node attestation by the `sshpop`, `aws_iid`, `gcp_iit` and `azure_msi`
//! attestors costs, both halves in this process with the production code and no gRPC
//! (as B4 and B5 drive theirs, and as the plugins' own tests do):
//! - `sshpop` (carapace-attestor-ssh): whole round trips, [`SshAttestorClient::payload`]
//!   → [`SshAttestor::begin`] → `answer` → `session.respond`, for ed25519, ECDSA P-256
//!   and RSA-3072 host keys, each with a host certificate from one ed25519 CA. The server
//!   part (`begin` + `respond`) and the agent part (`payload` + `answer`: the agent signs)
//!   are timed separately.
//! - `aws_iid`, `gcp_iit`, `azure_msi` (carapace-attestor-cloud): the server's `begin()`
//!   alone (these plugins never challenge), on evidence made once at set-up: instance
//!   identity documents signed by a test RSA-2048 "region" certificate with
//!   `openssl cms -sign` in AWS's shape (as `attestor-cloud/tests/aws.rs` makes them), and
//!   RS256 tokens signed with a test RSA-2048 key published in a JWKS file. The trust on
//!   first use record goes to a [`MemoryStateStore`]: repeats are allowed
//!   (`allow_reattestation = true`), and `aws_iid` is also measured with TOFU on, over
//!   documents of distinct instances.
//!
//! Keys and certificates are made by the real `ssh-keygen` and `openssl` in a temporary
//! directory; a missing tool fails its items with the `apt-get install` line.
//!
//! Each call is timed: wall time, and this process's CPU time across it
//! (`CLOCK_PROCESS_CPUTIME_ID`, [`process_cpu_time`], with one attestation in flight, so
//! it includes the agent's file reads and signatures on tokio's blocking threads).
//!
//! [`run`] measures, [`section`] writes the report's B7 section.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rsa::pkcs8::EncodePrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use serde_json::json;

use crate::attest::{connection, first_round, timed};
use crate::process::process_cpu_time;
use crate::report::{Report, Table};
use crate::stats::{Summary, fmt_bytes, fmt_count, fmt_us};
use carapace_attestor_cloud::aws::{self, AwsIidAttestor, AwsServerConfig};
use carapace_attestor_cloud::azure::{AzureMsiAttestor, AzureServerConfig};
use carapace_attestor_cloud::gcp::{GcpIitAttestor, GcpServerConfig};
use carapace_attestor_cloud::tofu;
use carapace_attestor_ssh::agent::{SshAgentConfig, SshAttestorClient};
use carapace_attestor_ssh::server::{SshAttestor, SshServerConfig};
use carapace_core::clock::SystemClock;
use carapace_core::plugin::{
    AttestationResult, AttestationStep, MemoryStateStore, NodeAttestor, NodeAttestorClient as _,
    PluginContext,
};

/// How to get `ssh-keygen`.
pub const SSH_KEYGEN_HINT: &str = "install it with: apt-get install -y openssh-client";
/// How to get `openssl`.
pub const OPENSSL_HINT: &str = "install it with: apt-get install -y openssl";

/// The host certificates' principals (the server requires `example.com` or below).
const PRINCIPALS: &str = "host1.example.com,host1";
/// The AWS account, region and region certificate subject of the test documents.
const AWS_ACCOUNT: &str = "123456789012";
const AWS_REGION: &str = "us-east-1";
const AWS_DN: &str = "/C=US/ST=Washington State/L=Seattle/O=Amazon Web Services LLC";
/// `gcp_iit`'s audience and project.
const GCP_AUDIENCE: &str = "spiffe://example.org";
const GCP_PROJECT: &str = "carapace-prod";
/// `azure_msi`'s audience, tenant, subscription and principal.
const AZURE_AUDIENCE: &str = "api://carapace-node-attestation";
const AZURE_TENANT: &str = "0f7c1c5e-3b7e-4f3a-9c1d-6a2b8e4d9f10";
const AZURE_SUBSCRIPTION: &str = "b3c4d5e6-f708-4192-a3b4-c5d6e7f8091a";
const AZURE_PRINCIPAL: &str = "7e1d3b2a-9c8f-4e6d-a5b4-3c2d1e0f9a8b";
/// The key id the test JWT key is published under.
const JWT_KID: &str = "b7-rs256-0";

/// Sizes of B7.
#[derive(Debug, Clone, PartialEq)]
pub struct B7Plan {
    /// Seconds of timed attestations per item, after the warm-up.
    pub seconds: f64,
    /// Untimed attestations before each item.
    pub warmup: usize,
    /// At most this many timed attestations per item.
    pub max_attestations: usize,
    /// `aws_iid` with trust on first use: documents of distinct instances, each
    /// presented once (`warmup` more are signed for the warm-up and the replay check).
    pub tofu_documents: usize,
    /// The trust-on-first-use record alone: keys recorded.
    pub tofu_records: usize,
}

impl B7Plan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> B7Plan {
        if quick {
            B7Plan {
                seconds: 0.2,
                warmup: 3,
                max_attestations: 2_000,
                tofu_documents: 10,
                tofu_records: 1_000,
            }
        } else {
            B7Plan {
                seconds: 2.0,
                warmup: 20,
                max_attestations: 50_000,
                tofu_documents: 300,
                tofu_records: 10_000,
            }
        }
    }
}

/// The `sshpop` host key types measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKey {
    Ed25519,
    P256,
    Rsa3072,
}

impl HostKey {
    /// Every type, in report order.
    pub const ALL: [HostKey; 3] = [HostKey::Ed25519, HostKey::P256, HostKey::Rsa3072];

    /// What the report calls it.
    pub fn label(self) -> &'static str {
        match self {
            HostKey::Ed25519 => "ed25519",
            HostKey::P256 => "ECDSA P-256",
            HostKey::Rsa3072 => "RSA-3072",
        }
    }

    fn keygen_args(self) -> &'static [&'static str] {
        match self {
            HostKey::Ed25519 => &["-t", "ed25519"],
            HostKey::P256 => &["-t", "ecdsa", "-b", "256"],
            HostKey::Rsa3072 => &["-t", "rsa", "-b", "3072"],
        }
    }

    fn file(self) -> &'static str {
        match self {
            HostKey::Ed25519 => "ssh_host_ed25519_key",
            HostKey::P256 => "ssh_host_ecdsa_key",
            HostKey::Rsa3072 => "ssh_host_rsa_key",
        }
    }
}

/// One measured item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `sshpop` with this host key: whole round trips.
    Ssh(HostKey),
    /// `aws_iid`'s `begin()`: with `allow_reattestation` one document again and again,
    /// without it distinct instances' documents once each.
    Aws { reattest: bool },
    /// `gcp_iit`'s `begin()`, one token again and again.
    Gcp,
    /// `azure_msi`'s `begin()`, one token again and again.
    Azure,
}

impl Kind {
    /// The plugin's name.
    pub fn plugin(self) -> &'static str {
        match self {
            Kind::Ssh(_) => carapace_attestor_ssh::PLUGIN_NAME,
            Kind::Aws { .. } => aws::PLUGIN_NAME,
            Kind::Gcp => carapace_attestor_cloud::gcp::PLUGIN_NAME,
            Kind::Azure => carapace_attestor_cloud::azure::PLUGIN_NAME,
        }
    }

    /// A short name for running text.
    pub fn short(self) -> String {
        match self {
            Kind::Ssh(k) => format!("sshpop {}", k.label()),
            Kind::Aws { reattest: true } => "aws_iid".into(),
            Kind::Aws { reattest: false } => "aws_iid with TOFU".into(),
            Kind::Gcp => "gcp_iit".into(),
            Kind::Azure => "azure_msi".into(),
        }
    }

    /// The item's name in the report and in errors.
    pub fn label(self) -> String {
        match self {
            Kind::Ssh(k) => format!("sshpop, {} host key", k.label()),
            Kind::Aws { reattest: true } => "aws_iid, allow_reattestation = true".into(),
            Kind::Aws { reattest: false } => {
                "aws_iid, allow_reattestation = false (distinct instances)".into()
            }
            Kind::Gcp => "gcp_iit, allow_reattestation = true".into(),
            Kind::Azure => "azure_msi, allow_reattestation = true".into(),
        }
    }
}

/// One attestation, call by call: wall time and this process's CPU time. The cloud
/// items have `begin` only.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Agent `payload()` (`sshpop`: re-reads and checks the host certificate).
    pub payload: Duration,
    pub payload_cpu: Duration,
    /// Server `begin()`.
    pub begin: Duration,
    pub begin_cpu: Duration,
    /// Agent `answer()` (`sshpop`: the host key's SSHSIG signature).
    pub answer: Duration,
    pub answer_cpu: Duration,
    /// Server `respond()` (`sshpop`: the signature's verification).
    pub respond: Duration,
    pub respond_cpu: Duration,
    /// The whole attestation, wall time.
    pub total: Duration,
}

impl Sample {
    /// The server's calls, wall time.
    pub fn server(&self) -> Duration {
        self.begin + self.respond
    }

    /// The server's calls, CPU time.
    pub fn server_cpu(&self) -> Duration {
        self.begin_cpu + self.respond_cpu
    }

    /// The agent's calls, wall time.
    pub fn agent(&self) -> Duration {
        self.payload + self.answer
    }

    /// The agent's calls, CPU time.
    pub fn agent_cpu(&self) -> Duration {
        self.payload_cpu + self.answer_cpu
    }
}

/// One item's timed loop.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRun {
    /// Every timed attestation.
    pub samples: Vec<Sample>,
    /// From the first timed attestation's start to the last one's end.
    pub wall: Duration,
    /// This process's CPU time over the loop.
    pub process_cpu: Duration,
    /// The agent path of the first attestation.
    pub agent_path: String,
    /// Its selectors.
    pub selectors: Vec<String>,
    /// The agent's payload (the first message), bytes.
    pub payload_bytes: usize,
}

impl ItemRun {
    /// Attestations per second, one after the other.
    pub fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64().max(f64::EPSILON)
    }

    /// `f` of every sample, summarised in µs.
    pub fn summary(&self, f: fn(&Sample) -> Duration) -> Option<Summary> {
        let v: Vec<Duration> = self.samples.iter().map(f).collect();
        Summary::of_durations_us(&v)
    }

    /// Mean of `f`, µs (NaN without samples).
    pub fn mean_us(&self, f: fn(&Sample) -> Duration) -> f64 {
        self.summary(f).map_or(f64::NAN, |s| s.mean)
    }
}

/// An item and what it measured, or why it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub kind: Kind,
    pub run: Result<ItemRun, String>,
}

/// The trust-on-first-use record alone ([`tofu::record_attestation`] on a
/// [`MemoryStateStore`]): CPU per record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TofuRecord {
    /// Records made in each loop.
    pub n: usize,
    /// First attestations: `save_new` of `n` distinct instances, µs each.
    pub first_us: f64,
    /// Repeats allowed: `save` of one instance `n` times, µs each.
    pub again_us: f64,
}

/// What B7 measured.
#[derive(Debug, Clone, PartialEq)]
pub struct B7 {
    /// `/proc/loadavg` when B7 started.
    pub loadavg: String,
    /// `ssh -V`'s first word, or why not.
    pub openssh: String,
    /// `openssl version`.
    pub openssl: String,
    /// Making every key, certificate, document and token.
    pub setup: Duration,
    /// In report order.
    pub items: Vec<Item>,
    /// The TOFU record alone.
    pub tofu_record: Result<TofuRecord, String>,
}

impl B7 {
    /// The failed items, as errors.
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        let record = self
            .tofu_record
            .err()
            .map(|e| anyhow!("B7 TOFU record alone: {e}"));
        self.items
            .into_iter()
            .filter_map(|i| i.run.err().map(|e| anyhow!("B7 {}: {e}", i.kind.label())))
            .chain(record)
            .collect()
    }
}

/// Runs `program` with `args` (in UTC); its standard output, or an error with
/// `hint` when it is not installed.
fn tool(program: &str, args: &[&str], hint: &str) -> Result<Vec<u8>> {
    let out = match Command::new(program).args(args).env("TZ", "UTC").output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{program} not found: {hint}")
        }
        Err(e) => return Err(anyhow!(e).context(format!("running {program}"))),
    };
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// OpenSSH's version (`ssh -V` prints it on standard error).
fn openssh_version() -> String {
    Command::new("ssh")
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            text.split([',', ' ']).next().map(str::to_owned)
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "OpenSSH (version unknown)".into())
}

/// `OpenSSL 3.0.11` (the first two words of `openssl version`).
fn openssl_version() -> String {
    tool("openssl", &["version"], OPENSSL_HINT)
        .map(|o| {
            String::from_utf8_lossy(&o)
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|e| format!("{e:#}"))
}

/// The `sshpop` keys: an ed25519 CA and a certified host key per [`HostKey`].
#[derive(Debug)]
struct SshLab {
    dir: PathBuf,
    /// The CA's public key line.
    ca: String,
}

impl SshLab {
    fn new(dir: &Path) -> Result<SshLab> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ssh_keygen = |args: &[&str]| tool("ssh-keygen", args, SSH_KEYGEN_HINT);
        let ca = dir.join("ca");
        let ca_s = path_str(&ca)?;
        ssh_keygen(&["-q", "-t", "ed25519", "-N", "", "-C", "b7-ca", "-f", ca_s])?;
        for k in HostKey::ALL {
            let key = dir.join(k.file());
            let key_s = path_str(&key)?;
            let mut args = vec!["-q"];
            args.extend_from_slice(k.keygen_args());
            args.extend_from_slice(&["-N", "", "-C", k.file(), "-f", key_s]);
            ssh_keygen(&args)?;
            let public = format!("{key_s}.pub");
            ssh_keygen(&[
                "-q",
                "-s",
                ca_s,
                "-h",
                "-I",
                k.file(),
                "-n",
                PRINCIPALS,
                "-V",
                "-5m:+1h",
                &public,
            ])?;
        }
        let ca_line = std::fs::read_to_string(dir.join("ca.pub")).context("reading ca.pub")?;
        Ok(SshLab {
            dir: dir.to_owned(),
            ca: ca_line.trim().to_owned(),
        })
    }

    fn server(&self) -> Result<SshAttestor> {
        let cfg = SshServerConfig {
            cert_authorities: vec![format!("cert-authority {}", self.ca)],
            cert_authorities_path: None,
            canonical_domain: Some("example.com".into()),
        };
        SshAttestor::new(&cfg, &PluginContext::for_tests(&self.dir)).context("SshAttestor::new")
    }

    fn client(&self, k: HostKey) -> Result<SshAttestorClient> {
        let key = self.dir.join(k.file());
        let cert = PathBuf::from(format!("{}-cert.pub", key.display()));
        SshAttestorClient::new(&SshAgentConfig {
            host_key_path: key,
            host_cert_path: Some(cert),
        })
        .context("SshAttestorClient::new")
    }
}

/// An instance identity document, formatted as IMDS formats them.
fn aws_document(instance: &str) -> String {
    format!(
        "{{\n  \"accountId\" : \"{AWS_ACCOUNT}\",\n  \"architecture\" : \"x86_64\",\n  \
         \"availabilityZone\" : \"{AWS_REGION}a\",\n  \"billingProducts\" : null,\n  \
         \"devpayProductCodes\" : null,\n  \"marketplaceProductCodes\" : null,\n  \
         \"imageId\" : \"ami-0abcdef1234567890\",\n  \"instanceId\" : \"{instance}\",\n  \
         \"instanceType\" : \"t3.micro\",\n  \"kernelId\" : null,\n  \
         \"pendingTime\" : \"2026-01-02T03:04:05Z\",\n  \"privateIp\" : \"10.0.0.7\",\n  \
         \"ramdiskId\" : null,\n  \"region\" : \"{AWS_REGION}\",\n  \"version\" : \"2017-09-30\"\n}}"
    )
}

/// DER as IMDS serves it: base64 in lines of 76 characters.
fn imds_base64(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 76 + 1);
    for (i, c) in b64.chars().enumerate() {
        if i > 0 && i % 76 == 0 {
            out.push('\n');
        }
        out.push(c);
    }
    out
}

/// The `aws_iid` region certificate and signed documents, as agent payloads.
#[derive(Debug)]
struct AwsLab {
    dir: PathBuf,
    /// One payload per instance `i-…0`, `i-…1`, ...
    payloads: Vec<Vec<u8>>,
}

impl AwsLab {
    /// A self-signed RSA-2048 "us-east-1" certificate and `n` documents of distinct
    /// instances signed with it, on `threads` threads (one `openssl` run each).
    fn new(dir: &Path, n: usize, threads: usize) -> Result<AwsLab> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cert = dir.join(format!("{AWS_REGION}.pem"));
        let key = dir.join(format!("{AWS_REGION}.key"));
        let (cert_s, key_s) = (path_str(&cert)?, path_str(&key)?);
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-nodes",
                "-days",
                "1",
                "-subj",
                AWS_DN,
                "-set_serial",
                "0x00b64bde5ad00924cc",
                "-keyout",
                key_s,
                "-out",
                cert_s,
                "-newkey",
                "rsa:2048",
            ],
            OPENSSL_HINT,
        )?;
        let sign = |i: usize| -> Result<Vec<u8>> {
            let document = aws_document(&format!("i-{i:017x}"));
            let doc_path = dir.join(format!("doc-{i}.json"));
            std::fs::write(&doc_path, &document)
                .with_context(|| format!("writing {}", doc_path.display()))?;
            let der = tool(
                "openssl",
                &[
                    "cms",
                    "-sign",
                    "-binary",
                    "-nodetach",
                    "-md",
                    "sha256",
                    "-nocerts",
                    "-nosmimecap",
                    "-stream",
                    "-outform",
                    "DER",
                    "-signer",
                    cert_s,
                    "-inkey",
                    key_s,
                    "-in",
                    path_str(&doc_path)?,
                ],
                OPENSSL_HINT,
            )?;
            Ok(serde_json::to_vec(&aws::Payload {
                version: aws::PAYLOAD_VERSION,
                document,
                signature: imds_base64(&der),
            })?)
        };
        let threads = threads.clamp(1, n.max(1));
        let mut slots: Vec<Option<Result<Vec<u8>>>> = (0..n).map(|_| None).collect();
        std::thread::scope(|s| {
            for (t, chunk) in slots.chunks_mut(n.div_ceil(threads).max(1)).enumerate() {
                let sign = &sign;
                let first = t * n.div_ceil(threads).max(1);
                s.spawn(move || {
                    for (j, slot) in chunk.iter_mut().enumerate() {
                        *slot = Some(sign(first + j));
                    }
                });
            }
        });
        let payloads = slots
            .into_iter()
            .map(|s| s.unwrap_or_else(|| Err(anyhow!("a signing thread did not finish"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(AwsLab {
            dir: dir.to_owned(),
            payloads,
        })
    }

    fn server(&self, reattest: bool) -> Result<AwsIidAttestor> {
        let cfg = AwsServerConfig {
            region_certificates: BTreeMap::from([(
                AWS_REGION.to_owned(),
                PathBuf::from(format!("{AWS_REGION}.pem")),
            )]),
            account_allowlist: vec![AWS_ACCOUNT.to_owned()],
            allow_reattestation: reattest,
        };
        AwsIidAttestor::new(
            &cfg,
            &PluginContext::for_tests(&self.dir),
            Arc::new(MemoryStateStore::default()),
        )
        .context("AwsIidAttestor::new")
    }
}

/// The JWT key (published as a JWKS in the lab) and the two tokens, as agent payloads.
#[derive(Debug)]
struct JwtLab {
    dir: PathBuf,
    gcp: Vec<u8>,
    azure: Vec<u8>,
}

impl JwtLab {
    /// A fresh RSA-2048 key (the rsa crate) in `keys.json` as a JWKS, and a `gcp_iit` and
    /// an `azure_msi` token signed RS256 with it (ring), valid for an hour.
    fn new(dir: &Path) -> Result<JwtLab> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
            .context("generating the RSA-2048 JWT key")?;
        let jwks = json!({"keys": [{
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": JWT_KID,
            "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        }]});
        std::fs::write(dir.join("keys.json"), jwks.to_string()).context("writing keys.json")?;
        let pkcs8 = key.to_pkcs8_der().context("encoding the JWT key")?;
        let pair = ring::signature::RsaKeyPair::from_pkcs8(pkcs8.as_bytes())
            .map_err(|e| anyhow!("ring refuses the JWT key: {e}"))?;
        let rs256 = |claims: &serde_json::Value| -> Result<Vec<u8>> {
            let header = json!({"alg": "RS256", "kid": JWT_KID, "typ": "JWT"});
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let mut sig = vec![0; pair.public().modulus_len()];
            pair.sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|e| anyhow!("signing the token: {e}"))?;
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
            Ok(json!({"version": 1, "token": token})
                .to_string()
                .into_bytes())
        };
        let now = carapace_core::clock::unix_now();
        let gcp = rs256(&json!({
            "iss": "https://accounts.google.com",
            "aud": GCP_AUDIENCE,
            "azp": "112233445566778899000",
            "sub": "112233445566778899000",
            "email": "node@carapace-prod.iam.gserviceaccount.com",
            "email_verified": true,
            "iat": now,
            "exp": now + 3600,
            "google": {"compute_engine": {
                "instance_creation_timestamp": now - 86_400,
                "instance_id": "4821650316384512345",
                "instance_name": "web-1",
                "project_id": GCP_PROJECT,
                "project_number": 123_456_789_012_u64,
                "zone": "europe-west1-b",
            }},
        }))?;
        let azure = rs256(&json!({
            "aud": AZURE_AUDIENCE,
            "iss": format!("https://sts.windows.net/{AZURE_TENANT}/"),
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + 3600,
            "appid": "3c9a5e11-d6e2-4b77-8f00-1a2b3c4d5e6f",
            "appidacr": "2",
            "idp": format!("https://sts.windows.net/{AZURE_TENANT}/"),
            "oid": AZURE_PRINCIPAL,
            "sub": AZURE_PRINCIPAL,
            "tid": AZURE_TENANT,
            "ver": "1.0",
            "xms_mirid": format!(
                "/subscriptions/{AZURE_SUBSCRIPTION}/resourcegroups/Carapace-Nodes/providers/Microsoft.Compute/virtualMachines/Node-7"
            ),
        }))?;
        Ok(JwtLab {
            dir: dir.to_owned(),
            gcp,
            azure,
        })
    }

    fn gcp_server(&self) -> Result<GcpIitAttestor> {
        let cfg: GcpServerConfig = serde_json::from_value(json!({
            "keys_path": "keys.json",
            "audience": GCP_AUDIENCE,
            "projectid_allowlist": [GCP_PROJECT],
            "allow_reattestation": true,
        }))?;
        GcpIitAttestor::new(
            &cfg,
            &PluginContext::for_tests(&self.dir),
            Arc::new(MemoryStateStore::default()),
        )
        .context("GcpIitAttestor::new")
    }

    fn azure_server(&self) -> Result<AzureMsiAttestor> {
        let cfg: AzureServerConfig = serde_json::from_value(json!({
            "audience": AZURE_AUDIENCE,
            "tenants": {AZURE_TENANT: {"keys_path": "keys.json"}},
            "allow_reattestation": true,
        }))?;
        AzureMsiAttestor::new(
            &cfg,
            &PluginContext::for_tests(&self.dir),
            Arc::new(MemoryStateStore::default()),
        )
        .context("AzureMsiAttestor::new")
    }
}

/// One whole `sshpop` attestation, call by call.
async fn ssh_once(
    server: &SshAttestor,
    client: &SshAttestorClient,
) -> Result<(Sample, AttestationResult)> {
    let ctx = connection();
    let start = Instant::now();
    let r = first_round(server, client, &ctx).await?;
    let AttestationStep::Done(result) = r.step else {
        bail!("sshpop's respond() sent a second challenge");
    };
    let s = Sample {
        payload: r.payload.wall,
        payload_cpu: r.payload.cpu,
        begin: r.begin.wall,
        begin_cpu: r.begin.cpu,
        answer: r.answer.wall,
        answer_cpu: r.answer.cpu,
        respond: r.respond.wall,
        respond_cpu: r.respond.cpu,
        total: start.elapsed(),
    };
    Ok((s, result))
}

/// One `begin()` of a plugin that never challenges.
async fn begin_once(
    server: &dyn NodeAttestor,
    payload: &[u8],
) -> Result<(Sample, AttestationResult)> {
    let ctx = connection();
    let (step, took) = timed(server.begin(payload, &ctx)).await;
    let AttestationStep::Done(result) = step.context("server begin()")? else {
        bail!("{}'s begin() challenged; it never does", server.name());
    };
    let s = Sample {
        begin: took.wall,
        begin_cpu: took.cpu,
        total: took.wall,
        ..Sample::default()
    };
    Ok((s, result))
}

/// `warmup` untimed attestations by `once`, then timed ones until `budget` has passed
/// (at least one) or `max` were made.
async fn measure<F, Fut>(
    warmup: usize,
    budget: Duration,
    max: usize,
    payload_bytes: usize,
    mut once: F,
) -> Result<ItemRun>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Sample, AttestationResult)>>,
{
    let mut first: Option<AttestationResult> = None;
    for _ in 0..warmup {
        let (_, r) = once().await.context("warm-up attestation")?;
        first.get_or_insert(r);
    }
    let mut samples = Vec::new();
    let (cpu0, start) = (process_cpu_time(), Instant::now());
    while samples.len() < max.max(1) && (samples.is_empty() || start.elapsed() < budget) {
        let (s, r) = once()
            .await
            .with_context(|| format!("attestation {}", samples.len() + 1))?;
        samples.push(s);
        first.get_or_insert(r);
    }
    let wall = start.elapsed();
    let process_cpu = process_cpu_time().saturating_sub(cpu0);
    let first = first.ok_or_else(|| anyhow!("no attestation was made"))?;
    Ok(ItemRun {
        samples,
        wall,
        process_cpu,
        agent_path: first.agent_path,
        selectors: first.selectors.iter().map(|s| s.to_string()).collect(),
        payload_bytes,
    })
}

fn budget(plan: &B7Plan) -> Duration {
    Duration::try_from_secs_f64(plan.seconds.max(0.0)).unwrap_or(Duration::ZERO)
}

async fn ssh_item(lab: &SshLab, k: HostKey, plan: &B7Plan) -> Result<ItemRun> {
    let server = lab.server()?;
    let client = lab.client(k)?;
    let payload_bytes = client
        .payload(&connection())
        .await
        .context("agent payload()")?
        .len();
    let (server, client) = (&server, &client);
    measure(
        plan.warmup,
        budget(plan),
        plan.max_attestations,
        payload_bytes,
        || ssh_once(server, client),
    )
    .await
}

async fn repeat_item(server: &dyn NodeAttestor, payload: &[u8], plan: &B7Plan) -> Result<ItemRun> {
    measure(
        plan.warmup,
        budget(plan),
        plan.max_attestations,
        payload.len(),
        || begin_once(server, payload),
    )
    .await
}

/// `aws_iid` with trust on first use: the first `warmup` documents (at least one) as the
/// warm-up, every other one once, timed; then the first again, which must be refused as
/// a replay.
async fn aws_tofu_item(lab: &AwsLab, warmup: usize) -> Result<ItemRun> {
    let server = lab.server(false)?;
    let warmup = warmup.max(1);
    let Some(first) = lab.payloads.first() else {
        bail!("no document was signed");
    };
    let timed = lab.payloads.len().saturating_sub(warmup);
    if timed == 0 {
        bail!(
            "only {} documents were signed: none left to time after the warm-up",
            lab.payloads.len()
        );
    }
    let mut next = lab.payloads.iter();
    let server_ref = &server;
    let run = measure(warmup, Duration::MAX, timed, first.len(), || {
        let payload = next.next();
        async move {
            let payload = payload.ok_or_else(|| anyhow!("out of documents"))?;
            begin_once(server_ref, payload).await
        }
    })
    .await?;
    match server.begin(first, &connection()).await {
        Err(carapace_core::Error::AttestationReplay(_)) => Ok(run),
        Err(e) => bail!("the first document again: expected a replay refusal, got {e}"),
        Ok(_) => bail!("the first document was accepted a second time with TOFU on"),
    }
}

/// The TOFU record alone, `n` times each way.
async fn tofu_record(n: usize) -> Result<TofuRecord> {
    let n = n.max(1);
    let store = MemoryStateStore::default();
    let keys: Vec<String> = (0..n)
        .map(|i| format!("{AWS_ACCOUNT}/{AWS_REGION}/i-{i:017x}"))
        .collect();
    let c0 = process_cpu_time();
    for k in &keys {
        tofu::record_attestation(&store, k, k, false, &SystemClock)
            .await
            .context("record_attestation (save_new)")?;
    }
    let c1 = process_cpu_time();
    let one = &keys[0];
    for _ in 0..n {
        tofu::record_attestation(&store, one, one, true, &SystemClock)
            .await
            .context("record_attestation (save)")?;
    }
    let c2 = process_cpu_time();
    Ok(TofuRecord {
        n,
        first_us: us(c1.saturating_sub(c0)) / n as f64,
        again_us: us(c2.saturating_sub(c1)) / n as f64,
    })
}

/// B7: makes the keys, certificates, documents and tokens, then measures every item.
/// A failed set-up or item fails that item only.
pub async fn run(plan: &B7Plan, nproc: usize) -> Result<B7> {
    let loadavg = crate::process::loadavg_now();
    let dir = tempfile::Builder::new()
        .prefix("carapace-b7-")
        .tempdir()
        .context("creating B7's temporary directory")?;
    let start = Instant::now();
    let ssh = SshLab::new(&dir.path().join("ssh"));
    let aws = AwsLab::new(
        &dir.path().join("aws"),
        plan.tofu_documents + plan.warmup.max(1),
        nproc,
    );
    let jwt = JwtLab::new(&dir.path().join("jwt"));
    let setup = start.elapsed();
    let err = |what: &str, e: &anyhow::Error| format!("{what}: {e:#}");
    let mut items = Vec::new();
    for k in HostKey::ALL {
        let kind = Kind::Ssh(k);
        eprintln!("==> B7: {}", kind.label());
        let run = match &ssh {
            Ok(lab) => ssh_item(lab, k, plan).await.map_err(|e| format!("{e:#}")),
            Err(e) => Err(err("making the SSH CA, host keys and certificates", e)),
        };
        items.push(Item { kind, run });
    }
    for reattest in [true, false] {
        let kind = Kind::Aws { reattest };
        eprintln!("==> B7: {}", kind.label());
        let run = match &aws {
            Ok(lab) if reattest => match (lab.server(true), lab.payloads.first()) {
                (Ok(server), Some(p)) => repeat_item(&server, p, plan).await,
                (Err(e), _) => Err(e),
                (_, None) => Err(anyhow!("no document was signed")),
            }
            .map_err(|e| format!("{e:#}")),
            Ok(lab) => aws_tofu_item(lab, plan.warmup)
                .await
                .map_err(|e| format!("{e:#}")),
            Err(e) => Err(err(
                "making the region certificate and signing the documents",
                e,
            )),
        };
        items.push(Item { kind, run });
    }
    for kind in [Kind::Gcp, Kind::Azure] {
        eprintln!("==> B7: {}", kind.label());
        let run = match &jwt {
            Ok(lab) => {
                let server: Result<Box<dyn NodeAttestor>> = if kind == Kind::Gcp {
                    lab.gcp_server()
                        .map(|s| Box::new(s) as Box<dyn NodeAttestor>)
                } else {
                    lab.azure_server()
                        .map(|s| Box::new(s) as Box<dyn NodeAttestor>)
                };
                let payload = if kind == Kind::Gcp {
                    &lab.gcp
                } else {
                    &lab.azure
                };
                match server {
                    Ok(server) => repeat_item(server.as_ref(), payload, plan).await,
                    Err(e) => Err(e),
                }
                .map_err(|e| format!("{e:#}"))
            }
            Err(e) => Err(err("making the JWT key and tokens", e)),
        };
        items.push(Item { kind, run });
    }
    let tofu_record = tofu_record(plan.tofu_records)
        .await
        .map_err(|e| format!("{e:#}"));
    Ok(B7 {
        loadavg,
        openssh: openssh_version(),
        openssl: openssl_version(),
        setup,
        items,
        tofu_record,
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// [`fmt_us_frac`] with a sign (`+0.30 µs`, `-12 µs`).
fn fmt_us_frac_signed(v: f64) -> String {
    if v < 0.0 {
        format!("-{}", fmt_us_frac(-v))
    } else {
        format!("+{}", fmt_us_frac(v))
    }
}

/// Sub-microsecond figures: `0.42 µs`, `3.1 µs`, else as [`fmt_us`].
fn fmt_us_frac(v: f64) -> String {
    if v.is_finite() && v < 1.0 {
        format!("{v:.2} µs")
    } else if v.is_finite() && v < 10.0 {
        format!("{v:.1} µs")
    } else {
        fmt_us(v)
    }
}

/// `p50 / p99` of `f`, formatted.
fn p50_p99(run: &ItemRun, f: fn(&Sample) -> Duration) -> String {
    run.summary(f).map_or_else(
        || "n/a".into(),
        |s| format!("{} / {}", fmt_us(s.p50), fmt_us(s.p99)),
    )
}

fn p50(run: &ItemRun, f: fn(&Sample) -> Duration) -> String {
    run.summary(f)
        .map_or_else(|| "n/a".into(), |s| fmt_us(s.p50))
}

/// Attestations one core's CPU allows at `cpu_us` each.
fn per_core(cpu_us: f64) -> f64 {
    if cpu_us > 0.0 { 1e6 / cpu_us } else { f64::NAN }
}

/// B7's report.
pub fn section(r: &mut Report, b7: &B7, plan: &B7Plan, nproc: usize) {
    let ok: Vec<(Kind, &ItemRun)> = b7
        .items
        .iter()
        .filter_map(|i| i.run.as_ref().ok().map(|run| (i.kind, run)))
        .collect();
    r.para(&format!(
        "Both halves of each plugin in this process, with the production code and no gRPC or TLS (as in the plugins' own tests, and as B4 and B5 run theirs). Set-up ({}), once: `ssh-keygen` ({}) made an ed25519 CA and ed25519, ECDSA P-256 and RSA-3072 host keys, each with a host certificate (`-h -n {PRINCIPALS} -V -5m:+1h`); `openssl` ({}) made a self-signed RSA-2048 certificate for region {AWS_REGION} and signed {} instance identity documents of distinct instances with `openssl cms -sign -binary -nodetach -md sha256 -nocerts -nosmimecap -stream -outform DER` (AWS's shape, base64 in 76-column lines as IMDS serves it); the rsa crate made an RSA-2048 key, published as a JWKS file, and ring signed one `gcp_iit` identity token (`format=full` claims) and one `azure_msi` managed-identity token with it (RS256). Servers: `SshAttestor` trusting the CA (`canonical_domain = \"example.com\"`); `AwsIidAttestor` (`account_allowlist` = the documents' account), `GcpIitAttestor` and `AzureMsiAttestor`, each with its own `MemoryStateStore` for the trust-on-first-use records (the server's datastore is not in these figures). Each item: {} untimed attestations, then attestations one after the other for {} s (at most {}), each on a new simulated connection (32 random bytes of TLS exporter). Wall time per call, and this process's CPU time across it (`CLOCK_PROCESS_CPUTIME_ID`; the agent's certificate read and RSA signature run on tokio's blocking threads and are included). No log subscriber is installed, so the plugins' per-attestation `info` lines cost nothing here. Load average when B7 started: {}.",
        fmt_us(us(b7.setup)),
        b7.openssh,
        b7.openssl,
        plan.tofu_documents + plan.warmup.max(1),
        plan.warmup,
        plan.seconds,
        fmt_count(plan.max_attestations as f64),
        b7.loadavg,
    ));

    r.heading(3, "sshpop: whole attestations, one loop");
    let mut t = Table::new([
        "host key (certificate by an ed25519 CA)",
        "attestations",
        "attestations/s",
        "whole p50 / p99",
        "server `begin()` + `respond()` p50 / p99",
        "server CPU / attestation",
        "`begin()` p50",
        "`respond()` p50",
        "agent `payload()` + `answer()` p50 / p99",
        "agent CPU / attestation",
    ]);
    for (kind, run) in &ok {
        let Kind::Ssh(k) = kind else { continue };
        t.row([
            k.label().to_owned(),
            fmt_count(run.samples.len() as f64),
            format!("**{}**", fmt_count(run.rate())),
            p50_p99(run, |s| s.total),
            format!("**{}**", p50_p99(run, Sample::server)),
            fmt_us(run.mean_us(Sample::server_cpu)),
            p50(run, |s| s.begin),
            p50(run, |s| s.respond),
            p50_p99(run, Sample::agent),
            fmt_us(run.mean_us(Sample::agent_cpu)),
        ]);
    }
    if !t.is_empty() {
        r.table(&t);
        r.para("`begin()`: decode the certificate, check the CA's signature, type, validity, principals and options, make the nonce. `respond()`: parse the SSHSIG, check key, namespace and hash, verify the signature over SHA-256(server nonce ‖ agent nonce ‖ TLS exporter). `payload()`: re-read and check the host certificate file. `answer()`: sign with the host key (on a blocking thread).");
    }
    for i in &b7.items {
        if let (Kind::Ssh(_), Err(e)) = (i.kind, &i.run) {
            crate::report::failed(r, &format!("B7 {}", i.kind.label()), &anyhow!("{e}"));
        }
    }

    r.heading(3, "Cloud instance identity: the server's begin(), one loop");
    let mut t = Table::new([
        "plugin",
        "evidence",
        "attestations",
        "attestations/s",
        "`begin()` p50 / p99",
        "CPU / attestation",
        "per core (10⁶ / CPU)",
        "payload",
    ]);
    for (kind, run) in &ok {
        let evidence = match kind {
            Kind::Ssh(_) => continue,
            Kind::Aws { reattest: true } => {
                "PKCS#7 (RSA-2048, SHA-256) over the document; the same document each time"
            }
            Kind::Aws { reattest: false } => {
                "the same, a new instance's document each time (TOFU record `save_new`)"
            }
            Kind::Gcp => "RS256 JWT (RSA-2048), JWKS file; the same token each time",
            Kind::Azure => "RS256 JWT (RSA-2048), JWKS file per tenant; the same token each time",
        };
        let cpu = run.mean_us(|s| s.begin_cpu);
        t.row([
            format!("`{}`", kind.label()),
            evidence.to_owned(),
            fmt_count(run.samples.len() as f64),
            format!("**{}**", fmt_count(run.rate())),
            format!("**{}**", p50_p99(run, |s| s.begin)),
            fmt_us(cpu),
            fmt_count(per_core(cpu)),
            fmt_bytes(run.payload_bytes as f64),
        ]);
    }
    if !t.is_empty() {
        r.table(&t);
    }
    for i in &b7.items {
        if let Err(e) = &i.run
            && !matches!(i.kind, Kind::Ssh(_))
        {
            crate::report::failed(r, &format!("B7 {}", i.kind.label()), &anyhow!("{e}"));
        }
    }
    if let Some((_, run)) = ok.iter().find(|(k, _)| *k == Kind::Aws { reattest: false }) {
        r.para(&format!(
            "With `allow_reattestation = false` each of the {} timed documents (after {} warm-up ones) was accepted once; then the first warm-up document, presented again, was refused as a replay (`AttestationReplay`), as trust on first use requires. That loop is short ({}), so its rate is the noisiest figure here.",
            fmt_count(run.samples.len() as f64),
            plan.warmup.max(1),
            fmt_us(us(run.wall)),
        ));
    }
    let mut results = Table::new(["item", "agent path", "selectors"]);
    for (kind, run) in &ok {
        results.row([
            kind.label(),
            format!("`{}/{}`", kind.plugin(), run.agent_path),
            run.selectors.len().to_string(),
        ]);
    }
    if !results.is_empty() {
        r.para("What the first attestation of each item gave:");
        r.table(&results);
    }

    r.heading(3, "Server cost per attestation");
    let server_cpu: Vec<(Kind, f64)> = ok
        .iter()
        .map(|(k, run)| (*k, run.mean_us(Sample::server_cpu)))
        .collect();
    if let (Some(lo), Some(hi)) = (
        server_cpu.iter().min_by(|a, b| a.1.total_cmp(&b.1)),
        server_cpu.iter().max_by(|a, b| a.1.total_cmp(&b.1)),
    ) {
        r.bullet(&format!(
            "**Server CPU per attestation: {} ({}) to {} ({})**, so one core verifies ~{} to ~{} attestations/s and {nproc} cores ~{} to ~{}, before gRPC, TLS and the datastore.",
            fmt_us(lo.1),
            lo.0.short(),
            fmt_us(hi.1),
            hi.0.short(),
            fmt_count(per_core(hi.1)),
            fmt_count(per_core(lo.1)),
            fmt_count(per_core(hi.1) * nproc as f64),
            fmt_count(per_core(lo.1) * nproc as f64),
        ));
    }
    let ssh_share: Vec<String> = ok
        .iter()
        .filter_map(|(k, run)| {
            let Kind::Ssh(h) = k else { return None };
            let server = run.mean_us(Sample::server_cpu);
            let agent = run.mean_us(Sample::agent_cpu);
            Some(format!(
                "{} {:.0} % ({} of {})",
                h.label(),
                100.0 * server / (server + agent),
                fmt_us(server),
                fmt_us(server + agent)
            ))
        })
        .collect();
    if !ssh_share.is_empty() {
        r.bullet(&format!(
            "`sshpop`: the server's share of an attestation's CPU (both halves here): {}. The agent part (chiefly its signature with the host key) runs on each host in a deployment, not on the server.",
            ssh_share.join(", ")
        ));
    }
    let aws = |reattest| {
        ok.iter()
            .find(|(k, _)| *k == Kind::Aws { reattest })
            .map(|(_, run)| run.mean_us(|s| s.begin_cpu))
    };
    if let (Some(again), Some(tofu)) = (aws(true), aws(false)) {
        let record = match &b7.tofu_record {
            Ok(t) => format!(
                " The record alone (`tofu::record_attestation` on a `MemoryStateStore`, {} keys): {} per first attestation (`save_new`, distinct instances), {} per repeat (`save`, one instance): {} of the difference.",
                fmt_count(t.n as f64),
                fmt_us_frac(t.first_us),
                fmt_us_frac(t.again_us),
                fmt_us_frac_signed(t.first_us - t.again_us),
            ),
            Err(_) => String::new(),
        };
        let cmp = if tofu.max(again) < 250.0 {
            "more than"
        } else {
            "comparable to"
        };
        r.bullet(&format!(
            "`aws_iid`: {} of CPU per attestation with repeats allowed (the same document), {} over distinct instances with TOFU: {}.{record} In the server, the record is a datastore write instead (0.25–0.54 ms per attestation on Postgres, as measured for the goals), {cmp} the verification measured here.",
            fmt_us(again),
            fmt_us(tofu),
            fmt_us_frac_signed(tofu - again),
        ));
    }
    if let Err(e) = &b7.tofu_record {
        crate::report::failed(r, "B7 TOFU record alone", &anyhow!("{e}"));
    }

    r.heading(3, "Against the anchors");
    r.bullet("The node-attestation goal: server-side crypto for a TPM attestation is well under 1 ms (EK chain with 2 RSA-2048 verifies ≈ 52 µs, MakeCredential ≈ 1 RSA public operation, quote verify ≈ 26–92 µs); B4 measured ~0.94 ms of server CPU per TPM attestation (`begin()` + `respond()`).");
    if let Some(hi) = server_cpu.iter().map(|(_, c)| *c).max_by(f64::total_cmp) {
        r.bullet(&format!(
            "Here every attestor's server part costs at most {} of CPU per attestation: {} 1 ms.",
            fmt_us(hi),
            if hi < 1_000.0 { "under" } else { "over" }
        ));
    }
    if let (Some(lo), Some(hi)) = (
        server_cpu.iter().map(|(_, c)| *c).min_by(f64::total_cmp),
        server_cpu.iter().map(|(_, c)| *c).max_by(f64::total_cmp),
    ) {
        r.bullet(&format!(
            "SPIRE caps attestation at 1/s per source IP. One core here verifies ~{} to ~{} attestations/s (most to least expensive attestor): what ~{} to ~{} source IPs at SPIRE's cap would send. Such a cap, not the server's CPU, bounds how fast a fleet can (re-)attest.",
            fmt_count(per_core(hi)),
            fmt_count(per_core(lo)),
            fmt_count(per_core(hi)),
            fmt_count(per_core(lo)),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_plans_are_smaller() {
        let (q, f) = (B7Plan::new(true), B7Plan::new(false));
        assert!(q.seconds < f.seconds && q.warmup <= f.warmup);
        assert!(q.tofu_documents < f.tofu_documents);
        // Full: 6 items of 2 s plus set-up stays well under a minute.
        assert!(f.seconds * 6.0 < 30.0);
    }

    #[test]
    fn imds_base64_wraps_at_76_columns() {
        let text = imds_base64(&[0xAB; 120]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().take(2).all(|l| l.len() == 76));
        let joined: String = lines.concat();
        assert_eq!(STANDARD.decode(joined).unwrap(), vec![0xAB; 120]);
    }

    fn sample(server_us: u64, agent_us: u64) -> Sample {
        Sample {
            payload: Duration::from_micros(agent_us / 4),
            payload_cpu: Duration::from_micros(agent_us / 4),
            begin: Duration::from_micros(server_us / 2),
            begin_cpu: Duration::from_micros(server_us / 2),
            answer: Duration::from_micros(agent_us - agent_us / 4),
            answer_cpu: Duration::from_micros(agent_us - agent_us / 4),
            respond: Duration::from_micros(server_us - server_us / 2),
            respond_cpu: Duration::from_micros(server_us - server_us / 2),
            total: Duration::from_micros(server_us + agent_us),
        }
    }

    fn item_run(s: Sample, n: usize, path: &str) -> ItemRun {
        ItemRun {
            samples: vec![s; n],
            wall: s.total * u32::try_from(n).unwrap(),
            process_cpu: s.total * u32::try_from(n).unwrap(),
            agent_path: path.into(),
            selectors: vec!["x:y".into(), "x:z".into()],
            payload_bytes: 700,
        }
    }

    #[test]
    fn report_separates_server_and_agent_and_states_the_anchors() {
        let cloud = |us| Sample {
            begin: Duration::from_micros(us),
            begin_cpu: Duration::from_micros(us),
            total: Duration::from_micros(us),
            ..Sample::default()
        };
        let b7 = B7 {
            loadavg: "0.10 0.20 0.30".into(),
            openssh: "OpenSSH_9.2p1".into(),
            openssl: "OpenSSL 3.0.0".into(),
            setup: Duration::from_millis(1500),
            items: vec![
                Item {
                    kind: Kind::Ssh(HostKey::Ed25519),
                    run: Ok(item_run(sample(100, 100), 1000, "abc")),
                },
                Item {
                    kind: Kind::Ssh(HostKey::P256),
                    run: Err(
                        "ssh-keygen not found: install it with: apt-get install -y openssh-client"
                            .into(),
                    ),
                },
                Item {
                    kind: Kind::Aws { reattest: true },
                    run: Ok(item_run(cloud(200), 1000, "123456789012/us-east-1/i-0")),
                },
                Item {
                    kind: Kind::Aws { reattest: false },
                    run: Ok(item_run(cloud(210), 300, "123456789012/us-east-1/i-1")),
                },
                Item {
                    kind: Kind::Gcp,
                    run: Ok(item_run(cloud(50), 1000, "carapace-prod/1")),
                },
            ],
            tofu_record: Ok(TofuRecord {
                n: 10_000,
                first_us: 0.45,
                again_us: 0.3,
            }),
        };
        let mut r = Report::new();
        section(&mut r, &b7, &B7Plan::new(false), 2);
        let text = r.finish();
        assert!(
            text.contains("| ed25519 | 1,000 | **5,000** | 200 µs / 200 µs | **100 µs / 100 µs** | 100 µs | 50 µs | 50 µs | 100 µs / 100 µs | 100 µs |"),
            "{text}"
        );
        assert!(
            text.contains("**B7 sshpop, ECDSA P-256 host key FAILED:**"),
            "{text}"
        );
        assert!(text.contains("apt-get install -y openssh-client"), "{text}");
        assert!(
            text.contains("| `aws_iid, allow_reattestation = true` | PKCS#7"),
            "{text}"
        );
        assert!(
            text.contains("| **5,000** | **200 µs / 200 µs** | 200 µs | 5,000 | 700 B |"),
            "{text}"
        );
        assert!(
            text.contains(
                "**Server CPU per attestation: 50 µs (gcp_iit) to 210 µs (aws_iid with TOFU)**"
            ),
            "{text}"
        );
        assert!(
            text.contains("`aws_iid`: 200 µs of CPU per attestation with repeats allowed (the same document), 210 µs over distinct instances with TOFU: +10 µs."),
            "{text}"
        );
        assert!(
            text.contains("as measured for the goals), more than the verification measured here."),
            "{text}"
        );
        assert!(
            text.contains("(`save`, one instance): +0.15 µs of the difference"),
            "{text}"
        );
        assert!(text.contains("was refused as a replay"), "{text}");
        assert!(
            text.contains("`aws_iid/123456789012/us-east-1/i-0`"),
            "{text}"
        );
        assert!(text.contains("ed25519 50 % (100 µs of 200 µs)"), "{text}");
        assert!(
            text.contains("at most 210 µs of CPU per attestation: under 1 ms"),
            "{text}"
        );
        assert!(
            text.contains("~4,762 to ~20,000 attestations/s (most to least expensive attestor)"),
            "{text}"
        );
        assert!(
            text.contains("0.45 µs per first attestation (`save_new`"),
            "{text}"
        );
        assert!(
            text.contains("Load average when B7 started: 0.10 0.20 0.30"),
            "{text}"
        );
        assert_eq!(b7.into_errors().len(), 1);
    }

    /// Runs every item briefly with the real tools; an item whose tool is missing must
    /// fail with its install line.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn b7_measures_every_attestor_briefly() {
        let plan = B7Plan {
            seconds: 60.0,
            warmup: 1,
            max_attestations: 2,
            tofu_documents: 3,
            tofu_records: 10,
        };
        let b7 = run(&plan, 2).await.unwrap();
        assert_eq!(b7.items.len(), 7);
        let t = b7.tofu_record.as_ref().unwrap();
        assert!(t.n == 10 && t.first_us > 0.0 && t.again_us > 0.0);
        for item in &b7.items {
            match &item.run {
                Ok(run) => {
                    let want = if item.kind == (Kind::Aws { reattest: false }) {
                        3
                    } else {
                        2
                    };
                    assert_eq!(run.samples.len(), want, "{:?}", item.kind);
                    assert!(run.rate() > 0.0);
                    assert!(!run.selectors.is_empty(), "{:?}", item.kind);
                    for s in &run.samples {
                        assert!(s.begin > Duration::ZERO && s.total >= s.server());
                        if let Kind::Ssh(_) = item.kind {
                            assert!(s.respond > Duration::ZERO && s.answer > Duration::ZERO);
                            assert!(s.total >= s.server() + s.agent());
                        }
                    }
                    match item.kind {
                        // The first (warm-up) document in both cases.
                        Kind::Aws { .. } => assert_eq!(
                            run.agent_path,
                            format!("{AWS_ACCOUNT}/{AWS_REGION}/i-{:017x}", 0)
                        ),
                        Kind::Gcp => {
                            assert_eq!(run.agent_path, "carapace-prod/4821650316384512345")
                        }
                        Kind::Azure => {
                            assert_eq!(run.agent_path, format!("{AZURE_TENANT}/{AZURE_PRINCIPAL}"))
                        }
                        Kind::Ssh(_) => assert!(!run.agent_path.is_empty()),
                    }
                }
                Err(e) => {
                    let missing = match item.kind {
                        Kind::Ssh(_) => SSH_KEYGEN_HINT,
                        Kind::Aws { .. } => OPENSSL_HINT,
                        Kind::Gcp | Kind::Azure => panic!("{:?}: {e}", item.kind),
                    };
                    assert!(e.contains(missing), "{:?}: {e}", item.kind);
                    eprintln!("skipped {:?}: {e}", item.kind);
                }
            }
        }
        let mut r = Report::new();
        section(&mut r, &b7, &plan, 2);
        assert!(r.finish().contains("Server CPU per attestation"));
    }
}
