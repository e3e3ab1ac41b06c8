//! The agent half (`[node_attestor.tpm]`): EK and a fresh AK in the first message, then
//! ActivateCredential, a TPM2_Certify of the agent key when it is a TPM key, and a quote
//! over the PCRs the server names.

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use carapace_core::Error;
use carapace_core::files::{FileUse, NamedFile};
use carapace_core::plugin::{AttestationContext, NodeAttestorClient};

use crate::device::{Ak, Ek, KeyBlob, Saved, TpmDevice};
use crate::server::PLUGIN_NAME;
use crate::shared::SharedTpm;
use crate::wire::{self, Challenge, Payload, Response};

/// The TCTI used when the configuration names none: the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// Settings of `[node_attestor.tpm]` on the agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmAgentConfig {
    /// How to reach the TPM: `device:/dev/tpmrm0` (default) or
    /// `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: Option<String>,
}

impl TpmAgentConfig {
    /// The TCTI to use.
    pub fn tcti(&self) -> &str {
        self.tcti.as_deref().unwrap_or(DEFAULT_TCTI)
    }

    /// The files these settings name, for `validate`: a `device:` TCTI's device, opened
    /// at the first attestation.
    pub fn files(&self) -> Vec<NamedFile> {
        tcti_device(self.tcti()).into_iter().collect()
    }
}

/// The device of a `device:<path>` TCTI (opened for reading and writing at its first
/// use), as a file `validate` checks; `None` for other TCTIs (`swtpm:`, `mssim:`).
pub fn tcti_device(tcti: &str) -> Option<NamedFile> {
    let path = tcti.trim().strip_prefix("device:")?.trim();
    (!path.is_empty()).then(|| NamedFile::new("tcti", path, FileUse::Device).at_use())
}

/// An attestation in progress: the EK and AK swapped out of the TPM (so they hold no
/// slot while the server thinks), and the agent key to certify, if it is a TPM key.
struct Pending {
    ek: Saved<Ek>,
    ak: Saved<Ak>,
    agent_key: Option<KeyBlob>,
}

/// The agent half of `tpm` node attestation. One attestation at a time, on the
/// process's [`SharedTpm`] for its TCTI, which it shares with the `tpm` key manager.
///
/// When the agent key of the attestation (`AttestationContext::agent_public_key`) is a
/// key of a `tpm` key manager on the same [`SharedTpm`], the payload names it and the
/// answer carries a TPM2_Certify of it by the AK over the server's nonce.
pub struct TpmAttestorClient {
    tpm: SharedTpm,
    pending: Arc<Mutex<Option<Pending>>>,
}

impl fmt::Debug for TpmAttestorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmAttestorClient")
            .field("tcti", &self.tpm.tcti())
            .finish_non_exhaustive()
    }
}

impl TpmAttestorClient {
    /// A client for the TPM at `cfg.tcti()`, on the process-wide [`SharedTpm`] of that
    /// TCTI.
    pub fn new(cfg: &TpmAgentConfig) -> Self {
        Self::with_tpm(SharedTpm::for_tcti(cfg.tcti()))
    }

    /// A client on `tpm`.
    pub fn with_tpm(tpm: SharedTpm) -> Self {
        TpmAttestorClient {
            tpm,
            pending: Arc::new(Mutex::new(None)),
        }
    }

    /// The TPM this client uses.
    pub fn shared_tpm(&self) -> &SharedTpm {
        &self.tpm
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Unavailable(format!("tpm: task failed: {e}")))?
}

#[async_trait::async_trait]
impl NodeAttestorClient for TpmAttestorClient {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn payload(&self, ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        // A previous attestation that never got its challenge: its EK and AK are only
        // saved contexts, dropping them needs no TPM call.
        lock(&self.pending).take();
        let agent_key = self.tpm.key_by_spki(&ctx.agent_public_key);
        if agent_key.is_none() {
            tracing::debug!(
                tcti = %self.tpm.tcti(),
                "tpm: the agent key is not a TPM key of this TPM; attesting without TPM2_Certify"
            );
        }
        let tpm = self.tpm.clone();
        let pending = self.pending.clone();
        blocking(move || {
            let (payload, ek, ak) =
                tpm.with_device(|device| first_message(device, agent_key.as_ref()))?;
            *lock(&pending) = Some(Pending { ek, ak, agent_key });
            Ok(wire::encode(&payload))
        })
        .await
    }

    async fn answer(&self, challenge: &[u8], _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        let c: Challenge = wire::decode("challenge", challenge)?;
        if c.version != wire::VERSION || c.pcr_selection.hash != "sha256" {
            return Err(Error::AttestationRejected(format!(
                "tpm: the server asks for version {} / PCR bank {:?}; this agent speaks {} / sha256",
                c.version,
                c.pcr_selection.hash,
                wire::VERSION
            )));
        }
        let Some(pending) = lock(&self.pending).take() else {
            return Err(Error::AttestationRejected(
                "tpm: a challenge arrived without an attestation in progress".into(),
            ));
        };
        let tpm = self.tpm.clone();
        blocking(move || {
            let response = tpm.with_device(|device| respond(device, pending, &c))?;
            Ok(wire::encode(&response))
        })
        .await
    }
}

/// EK, fresh AK, the payload; the EK and AK swapped out. Nothing stays loaded on any
/// path.
fn first_message(
    device: &mut TpmDevice,
    agent_key: Option<&KeyBlob>,
) -> Result<(Payload, Saved<Ek>, Saved<Ak>), Error> {
    let ek = device.ek()?;
    let ak = match device.create_ak(&ek) {
        Ok(ak) => ak,
        Err(e) => {
            let _ = device.flush_ek(ek);
            return Err(e);
        }
    };
    let payload = Payload {
        version: wire::VERSION,
        ek_cert: ek.cert.clone().unwrap_or_default(),
        ek_intermediates: ek.intermediates.clone(),
        ek_public: ek.public.clone(),
        ak_public: ak.public.clone(),
        agent_key_public: agent_key.map(|k| k.public.clone()),
    };
    // save_* flush the object on every path.
    let ak = match device.save_ak(ak) {
        Ok(ak) => ak,
        Err(e) => {
            let _ = device.flush_ek(ek);
            return Err(e);
        }
    };
    let ek = device.save_ek(ek)?;
    Ok((payload, ek, ak))
}

/// Loads the EK and AK again and answers; everything loaded is flushed on every path.
fn respond(device: &mut TpmDevice, p: Pending, c: &Challenge) -> Result<Response, Error> {
    let ek = device.restore_ek(p.ek)?;
    let ak = match device.restore_ak(p.ak) {
        Ok(ak) => ak,
        Err(e) => {
            let _ = device.flush_ek(ek);
            return Err(e);
        }
    };
    let result = respond_loaded(device, ek, &ak, p.agent_key.as_ref(), c);
    let flushed = device.flush_ak(ak);
    let response = result?;
    flushed?;
    Ok(response)
}

/// How often a quote is retried when a PCR changed between reading and quoting.
const QUOTE_ATTEMPTS: usize = 3;

/// Activates the credential (then flushes the EK, to free a slot for the agent key),
/// certifies the agent key with the AK, and quotes; the PCRs are read before and after
/// the quote and the quote is taken again if they moved in between (a measurement
/// landed meanwhile).
fn respond_loaded(
    device: &mut TpmDevice,
    ek: Ek,
    ak: &Ak,
    agent_key: Option<&KeyBlob>,
    c: &Challenge,
) -> Result<Response, Error> {
    let activated = device.activate_credential(ak, &ek, &c.credential_blob, &c.encrypted_secret);
    let flushed = device.flush_ek(ek);
    let activated_secret = activated?;
    flushed?;
    let certification = match agent_key {
        Some(blob) => {
            let key = device.load_key(blob)?;
            let certified = device.certify(&key, ak, &c.nonce);
            let flushed = device.flush_key(key);
            let certified = certified?;
            flushed?;
            Some(certified)
        }
        None => None,
    };
    let pcrs = &c.pcr_selection.pcrs;
    for _ in 0..QUOTE_ATTEMPTS {
        let before = device.pcr_read_sha256(pcrs)?;
        let quote = device.quote(ak, &c.nonce, pcrs)?;
        let after = device.pcr_read_sha256(pcrs)?;
        if before == after {
            let (agent_key_certify, agent_key_certify_signature) = match certification {
                Some(c) => (Some(c.attest), Some(c.signature)),
                None => (None, None),
            };
            return Ok(Response {
                version: wire::VERSION,
                activated_secret,
                quote: quote.attest,
                quote_signature: quote.signature,
                pcr_values: after.iter().map(|(i, v)| (*i, hex::encode(v))).collect(),
                agent_key_certify,
                agent_key_certify_signature,
            });
        }
        tracing::debug!("tpm: PCRs changed during the quote; quoting again");
    }
    Err(Error::Unavailable(
        "tpm: the PCRs kept changing while quoting; try again".into(),
    ))
}
