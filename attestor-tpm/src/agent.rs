//! The agent half (`[node_attestor.tpm]`): EK and a fresh AK in the first message, then
//! ActivateCredential and a quote over the PCRs the server names.

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use carapace_core::Error;
use carapace_core::plugin::{AttestationContext, NodeAttestorClient};

use crate::device::{Ak, Ek, TpmDevice};
use crate::server::PLUGIN_NAME;
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
}

/// An attestation in progress: the TPM context with the EK and AK loaded.
struct Pending {
    device: TpmDevice,
    ek: Ek,
    ak: Ak,
}

/// The agent half of `tpm` node attestation. One attestation at a time; the TPM context
/// lives only while an attestation runs.
pub struct TpmAttestorClient {
    tcti: String,
    pending: Arc<Mutex<Option<Pending>>>,
}

impl fmt::Debug for TpmAttestorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmAttestorClient")
            .field("tcti", &self.tcti)
            .finish_non_exhaustive()
    }
}

impl TpmAttestorClient {
    /// A client for the TPM at `cfg.tcti()`.
    pub fn new(cfg: &TpmAgentConfig) -> Self {
        TpmAttestorClient {
            tcti: cfg.tcti().to_owned(),
            pending: Arc::new(Mutex::new(None)),
        }
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

    async fn payload(&self, _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        // A previous attestation that never got its challenge: drop it (flushes).
        lock(&self.pending).take();
        let tcti = self.tcti.clone();
        let pending = self.pending.clone();
        blocking(move || {
            let mut device = TpmDevice::open(&tcti)?;
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
            };
            *lock(&pending) = Some(Pending { device, ek, ak });
            Ok(wire::encode(&payload))
        })
        .await
    }

    async fn answer(&self, challenge: &[u8]) -> Result<Vec<u8>, Error> {
        let c: Challenge = wire::decode("challenge", challenge)?;
        if c.version != wire::VERSION || c.pcr_selection.hash != "sha256" {
            return Err(Error::AttestationRejected(format!(
                "tpm: the server asks for version {} / PCR bank {:?}; this agent speaks {} / sha256",
                c.version,
                c.pcr_selection.hash,
                wire::VERSION
            )));
        }
        let Some(Pending { mut device, ek, ak }) = lock(&self.pending).take() else {
            return Err(Error::AttestationRejected(
                "tpm: a challenge arrived without an attestation in progress".into(),
            ));
        };
        blocking(move || {
            let result = respond(&mut device, &ek, &ak, &c);
            // Flushed on every path: a TPM without resource manager has 3 object slots.
            let flushed = device.flush_ak(ak).and(device.flush_ek(ek));
            let response = result?;
            flushed?;
            Ok(wire::encode(&response))
        })
        .await
    }
}

/// How often a quote is retried when a PCR changed between reading and quoting.
const QUOTE_ATTEMPTS: usize = 3;

/// Activates the credential and quotes; the PCRs are read before and after the quote and
/// the quote is taken again if they moved in between (a measurement landed meanwhile).
fn respond(device: &mut TpmDevice, ek: &Ek, ak: &Ak, c: &Challenge) -> Result<Response, Error> {
    let activated_secret =
        device.activate_credential(ak, ek, &c.credential_blob, &c.encrypted_secret)?;
    let pcrs = &c.pcr_selection.pcrs;
    for _ in 0..QUOTE_ATTEMPTS {
        let before = device.pcr_read_sha256(pcrs)?;
        let quote = device.quote(ak, &c.nonce, pcrs)?;
        let after = device.pcr_read_sha256(pcrs)?;
        if before == after {
            return Ok(Response {
                version: wire::VERSION,
                activated_secret,
                quote: quote.attest,
                quote_signature: quote.signature,
                pcr_values: after.iter().map(|(i, v)| (*i, hex::encode(v))).collect(),
            });
        }
        tracing::debug!("tpm: PCRs changed during the quote; quoting again");
    }
    Err(Error::Unavailable(
        "tpm: the PCRs kept changing while quoting; try again".into(),
    ))
}
