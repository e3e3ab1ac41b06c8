//! The agent half (`[node_attestor.sshpop]`): the host certificate as the payload, and
//! an SSHSIG signature by the host key over the server's nonce, a nonce of its own and
//! the TLS connection's exporter as the answer.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rsa::signature::{RandomizedSigner as _, SignatureEncoding as _};
use serde::Deserialize;
use ssh_key::private::{KeypairData, RsaKeypair};
use ssh_key::public::KeyData;
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, Certificate, HashAlg, LineEnding, Mpint, PrivateKey, Signature, SshSig};

use carapace_core::Error;
use carapace_core::clock::SystemClock;
use carapace_core::files::{FileUse, NamedFile};
use carapace_core::plugin::{AttestationContext, NodeAttestorClient};

use crate::wire::{self, Answer, Challenge, Payload};
use crate::{
    NONCE_LEN, PLUGIN_NAME, SSHSIG_HASH, SSHSIG_NAMESPACE, USER_CERT, agent_path,
    cert_from_openssh, check_host_key_algorithm, config_err, now, rejected, rfc3339,
    signed_message,
};

/// The host key used when the configuration names none.
pub const DEFAULT_HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key";

/// The largest private key file read (an RSA 16384-bit key is about 12 KiB).
const MAX_KEY_FILE: u64 = 64 * 1024;

fn default_host_key_path() -> PathBuf {
    PathBuf::from(DEFAULT_HOST_KEY_PATH)
}

/// Settings of `[node_attestor.sshpop]` on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshAgentConfig {
    /// The host's private key, OpenSSH format, unencrypted, mode 0600 or stricter;
    /// default [`DEFAULT_HOST_KEY_PATH`].
    #[serde(default = "default_host_key_path")]
    pub host_key_path: PathBuf,
    /// The host certificate of that key; default `<host_key_path>-cert.pub`. Re-read at
    /// every attestation, so a renewed certificate is used without a restart.
    #[serde(default)]
    pub host_cert_path: Option<PathBuf>,
}

impl Default for SshAgentConfig {
    fn default() -> Self {
        SshAgentConfig {
            host_key_path: default_host_key_path(),
            host_cert_path: None,
        }
    }
}

impl SshAgentConfig {
    /// The host certificate to use: `host_cert_path`, or `<host_key_path>-cert.pub`.
    pub fn host_cert_path(&self) -> PathBuf {
        self.host_cert_path.clone().unwrap_or_else(|| {
            let mut path = self.host_key_path.clone().into_os_string();
            path.push("-cert.pub");
            PathBuf::from(path)
        })
    }

    /// The files these settings name, for `validate`: the host key (a secret, checked as
    /// [`SshAttestorClient::new`] checks it) and the host certificate.
    pub fn files(&self) -> Vec<NamedFile> {
        vec![
            NamedFile::new("host_key_path", &self.host_key_path, FileUse::Secret),
            NamedFile::new("host_cert_path", self.host_cert_path(), FileUse::Read),
        ]
    }

    /// Every problem with the settings that can be found without reading files.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.host_key_path.as_os_str().is_empty() {
            problems.push("host_key_path is empty".to_owned());
        } else if self.host_key_path.extension().is_some_and(|e| e == "pub") {
            problems.push(format!(
                "host_key_path {} is a public key file: name the private key (e.g. {}); the \
                 certificate goes in host_cert_path",
                self.host_key_path.display(),
                DEFAULT_HOST_KEY_PATH
            ));
        }
        if let Some(cert) = &self.host_cert_path {
            if cert.as_os_str().is_empty() {
                problems.push("host_cert_path is empty".to_owned());
            } else if *cert == self.host_key_path {
                problems.push(format!(
                    "host_cert_path and host_key_path are the same file ({})",
                    cert.display()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// The host private key, ready to sign proofs. No `Debug`: it is secret.
enum HostSigner {
    /// Ed25519 and ECDSA keys sign through ssh-key.
    Ssh(PrivateKey),
    /// RSA keys sign with the rsa crate (PKCS#1 v1.5, SHA-512, blinded): ssh-key 0.6.7
    /// builds its rsa key with the first prime twice, which rsa >= 0.9.7 refuses.
    Rsa(rsa::pkcs1v15::SigningKey<sha2::Sha512>),
}

impl HostSigner {
    /// Prepares `key` for signing (for RSA, checks the key's numbers are consistent).
    fn new(key: PrivateKey) -> Result<Self, String> {
        match key.key_data() {
            KeypairData::Rsa(pair) => Ok(HostSigner::Rsa(rsa_signing_key(pair)?)),
            _ => Ok(HostSigner::Ssh(key)),
        }
    }

    /// An SSHSIG by this key over `msg`, in [`SSHSIG_NAMESPACE`] with [`SSHSIG_HASH`].
    fn sign(&self, public: &KeyData, msg: &[u8]) -> Result<SshSig, String> {
        match self {
            HostSigner::Ssh(key) => key
                .sign(SSHSIG_NAMESPACE, SSHSIG_HASH, msg)
                .map_err(|e| e.to_string()),
            HostSigner::Rsa(key) => {
                let data = SshSig::signed_data(SSHSIG_NAMESPACE, SSHSIG_HASH, msg)
                    .map_err(|e| e.to_string())?;
                let raw = key
                    .try_sign_with_rng(&mut OsRng, &data)
                    .map_err(|e| e.to_string())?;
                let sig = Signature::new(
                    Algorithm::Rsa {
                        hash: Some(HashAlg::Sha512),
                    },
                    raw.to_vec(),
                )
                .map_err(|e| e.to_string())?;
                SshSig::new(public.clone(), SSHSIG_NAMESPACE, SSHSIG_HASH, sig)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// The rsa crate's signing key for an OpenSSH RSA key pair.
fn rsa_signing_key(pair: &RsaKeypair) -> Result<rsa::pkcs1v15::SigningKey<sha2::Sha512>, String> {
    let int = |m: &Mpint| {
        m.as_positive_bytes()
            .map(rsa::BigUint::from_bytes_be)
            .ok_or_else(|| "the RSA host key has a negative number".to_owned())
    };
    let key = rsa::RsaPrivateKey::from_components(
        int(&pair.public.n)?,
        int(&pair.public.e)?,
        int(&pair.private.d)?,
        vec![int(&pair.private.p)?, int(&pair.private.q)?],
    )
    .map_err(|e| format!("the RSA host key is not consistent: {e}"))?;
    Ok(rsa::pkcs1v15::SigningKey::new(key))
}

/// The agent half of `sshpop` node attestation. It holds the host private key in
/// memory; its `Debug` shows only the paths and the public key's fingerprint.
pub struct SshAttestorClient {
    host_key_path: PathBuf,
    host_cert_path: PathBuf,
    public: KeyData,
    signer: Arc<HostSigner>,
}

impl fmt::Debug for SshAttestorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshAttestorClient")
            .field("host_key_path", &self.host_key_path)
            .field("host_cert_path", &self.host_cert_path)
            .field(
                "host_key",
                &self.public.fingerprint(HashAlg::Sha256).to_string(),
            )
            .finish_non_exhaustive()
    }
}

impl SshAttestorClient {
    /// Loads the host key and checks it and the host certificate: the key file must be
    /// private to its owner and unencrypted, the certificate a host certificate with an
    /// expiry, for this key. An expired or not yet valid certificate only warns (it may
    /// be renewed before the next attestation).
    pub fn new(cfg: &SshAgentConfig) -> Result<Self, Error> {
        cfg.validate().map_err(|p| config_err(p.join("; ")))?;
        let host_cert_path = cfg.host_cert_path();
        let key = read_host_key(&cfg.host_key_path).map_err(config_err)?;
        let text = std::fs::read_to_string(&host_cert_path)
            .map_err(|e| config_err(format!("host_cert_path {}: {e}", host_cert_path.display())))?;
        let public = key.public_key().key_data().clone();
        let (cert, _) =
            check_cert(&public, &cfg.host_key_path, &text, &host_cert_path).map_err(config_err)?;
        let signer = HostSigner::new(key).map_err(|e| {
            config_err(format!(
                "host_key_path {}: {e}",
                cfg.host_key_path.display()
            ))
        })?;
        warn_window(&cert, &host_cert_path);
        tracing::info!(
            host_key_path = %cfg.host_key_path.display(),
            host_cert_path = %host_cert_path.display(),
            agent_path = %agent_path(cert.public_key()),
            key_id = %cert.key_id(),
            principals = ?cert.valid_principals(),
            valid_before = %rfc3339(cert.valid_before()),
            "sshpop: host key and certificate loaded"
        );
        Ok(SshAttestorClient {
            host_key_path: cfg.host_key_path.clone(),
            host_cert_path,
            public,
            signer: Arc::new(signer),
        })
    }
}

/// Reads the host private key, refusing a file others may read, an encrypted key and a
/// key type sshpop does not support. The file's bytes are overwritten once parsed.
fn read_host_key(path: &Path) -> Result<PrivateKey, String> {
    let shown = path.display();
    let mut file = std::fs::File::open(path).map_err(|e| format!("host_key_path {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("host_key_path {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("host_key_path {shown} is not a file"));
    }
    carapace_core::files::check_private("host_key_path", path, &meta)?;
    if meta.len() > MAX_KEY_FILE {
        return Err(format!(
            "host_key_path {shown} is {} bytes, too large for an SSH private key",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0) + 1);
    let parsed = file
        .read_to_end(&mut bytes)
        .map_err(|e| format!("host_key_path {shown}: {e}"))
        .and_then(|_| {
            PrivateKey::from_openssh(&bytes).map_err(|e| {
                format!(
                    "host_key_path {shown} is not an OpenSSH private key \
                     (-----BEGIN OPENSSH PRIVATE KEY-----): {e}"
                )
            })
        });
    bytes.iter_mut().for_each(|b| *b = 0);
    std::hint::black_box(&bytes);
    let key = parsed?;
    if key.is_encrypted() {
        return Err(format!(
            "host_key_path {shown} is encrypted with a passphrase, which the agent cannot \
             enter: use the host's unencrypted key (the one sshd uses)"
        ));
    }
    check_host_key_algorithm(&format!("host key {shown}"), &key.algorithm())?;
    Ok(key)
}

/// Parses the certificate file's text and checks it is a host certificate with an
/// expiry, for host key `public`.
fn check_cert(
    public: &KeyData,
    key_path: &Path,
    text: &str,
    cert_path: &Path,
) -> Result<(Certificate, Vec<u8>), String> {
    let shown = cert_path.display();
    let (cert, blob) =
        cert_from_openssh(text).map_err(|e| format!("host_cert_path {shown}: {e}"))?;
    if !cert.cert_type().is_host() {
        return Err(format!("host_cert_path {shown}: {USER_CERT}"));
    }
    if cert.public_key() != public {
        return Err(format!(
            "host_cert_path {shown} certifies key {}, not the host key {} of host_key_path {}: \
             the certificate belongs to another key",
            cert.public_key().fingerprint(HashAlg::Sha256),
            public.fingerprint(HashAlg::Sha256),
            key_path.display()
        ));
    }
    Ok((cert, blob))
}

/// Warns when the certificate is outside its validity window now: the server will
/// refuse it.
fn warn_window(cert: &Certificate, cert_path: &Path) {
    // A warning only: the agent half is given no context, so it reads the system's time.
    let now = now(&SystemClock);
    if now >= cert.valid_before() {
        tracing::warn!(
            host_cert_path = %cert_path.display(),
            expired_at = %rfc3339(cert.valid_before()),
            "sshpop: the host certificate has expired; the server will refuse it until it is renewed"
        );
    } else if now < cert.valid_after() {
        tracing::warn!(
            host_cert_path = %cert_path.display(),
            valid_after = %rfc3339(cert.valid_after()),
            "sshpop: the host certificate is not valid yet; the server will refuse it until then"
        );
    }
}

#[async_trait::async_trait]
impl NodeAttestorClient for SshAttestorClient {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn payload(&self, _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        // Re-read: hosts get renewed certificates without restarting the agent.
        let text = tokio::fs::read_to_string(&self.host_cert_path)
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "{PLUGIN_NAME}: host_cert_path {}: {e}",
                    self.host_cert_path.display()
                ))
            })?;
        let (cert, blob) = check_cert(
            &self.public,
            &self.host_key_path,
            &text,
            &self.host_cert_path,
        )
        .map_err(rejected)?;
        warn_window(&cert, &self.host_cert_path);
        wire::encode(&Payload {
            version: wire::VERSION,
            certificate: wire::b64(&blob),
        })
    }

    async fn answer(&self, challenge: &[u8], ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        let c: Challenge = wire::decode("challenge", challenge)?;
        wire::check_version("challenge", c.version)?;
        let server_nonce = wire::nonce("the server nonce", &c.nonce)?;
        let agent_nonce: [u8; NONCE_LEN] = rand::random();
        let msg = signed_message(&server_nonce, &agent_nonce, &ctx.tls_exporter)?;
        let signer = Arc::clone(&self.signer);
        let public = self.public.clone();
        // RSA signing is big-number work: off the async workers.
        let sig = tokio::task::spawn_blocking(move || signer.sign(&public, &msg))
            .await
            .map_err(|e| rejected(format!("signing task: {e}")))?
            .map_err(|e| rejected(format!("signing with the host key: {e}")))?;
        let signature = sig
            .to_pem(LineEnding::LF)
            .map_err(|e| rejected(format!("encoding the signature: {e}")))?;
        wire::encode(&Answer {
            version: wire::VERSION,
            nonce: wire::b64(&agent_nonce),
            signature,
        })
    }
}
