//! The agent half (`[node_attestor.tpm]`): EK and a fresh AK in the first message, then
//! ActivateCredential, a TPM2_Certify of the agent key when it is a TPM key, a quote
//! over the PCRs the server names, and the boot event log when the server asks for it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use carapace_core::Error;
use carapace_core::files::{FileUse, NamedFile};
use carapace_core::plugin::{AttestationContext, NodeAttestorClient};

use crate::device::{Ak, Ek, KeyBlob, Saved, TpmDevice};
use crate::lock;
use crate::server::PLUGIN_NAME;
use crate::shared::SharedTpm;
use crate::wire::{self, Challenge, Payload, Response};

/// The TCTI used when the configuration names none: the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// Where the kernel publishes the firmware's TCG boot event log (securityfs).
pub const KERNEL_EVENT_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";

/// Settings of `[node_attestor.tpm]` on the agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmAgentConfig {
    /// How to reach the TPM: `device:/dev/tpmrm0` (default) or
    /// `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: Option<String>,
    /// The TCG boot event log sent when the server asks for it. Default: the kernel's
    /// ([`KERNEL_EVENT_LOG`]) for a `device:` TCTI, when it exists; none for other
    /// TCTIs (a simulator's PCRs are not the firmware's). `""` sends none. A path set
    /// here must be readable at each attestation.
    pub event_log: Option<PathBuf>,
}

/// Where the agent reads its event log from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EventLogSource {
    /// Sends none.
    None,
    /// The kernel's, when it exists (the default for a device TCTI).
    Kernel,
    /// A configured file, which must be readable.
    File(PathBuf),
}

impl TpmAgentConfig {
    /// The TCTI to use.
    pub fn tcti(&self) -> &str {
        self.tcti.as_deref().unwrap_or(DEFAULT_TCTI)
    }

    /// The files these settings name, for `validate`: a `device:` TCTI's device, opened
    /// at the first attestation, and a configured event log, read at each.
    pub fn files(&self) -> Vec<NamedFile> {
        let mut files: Vec<NamedFile> = tcti_device(self.tcti()).into_iter().collect();
        if let EventLogSource::File(path) = self.event_log_source() {
            files.push(NamedFile::new("event_log", path, FileUse::Read).at_use());
        }
        files
    }

    fn event_log_source(&self) -> EventLogSource {
        match &self.event_log {
            Some(p) if p.as_os_str().is_empty() => EventLogSource::None,
            Some(p) => EventLogSource::File(p.clone()),
            None if tcti_device(self.tcti()).is_some() => EventLogSource::Kernel,
            None => EventLogSource::None,
        }
    }
}

/// Reads the event log to send, or `None` when there is none to send.
fn read_event_log(source: &EventLogSource) -> Result<Option<Vec<u8>>, Error> {
    let read = |path: &Path| -> Result<Vec<u8>, Error> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Unavailable(format!(
                "tpm: cannot read the boot event log {}: {e}",
                path.display()
            ))
        })?;
        if bytes.len() > crate::eventlog::MAX_LOG_BYTES {
            return Err(Error::Unavailable(format!(
                "tpm: the boot event log {} is {} bytes, more than a server accepts ({})",
                path.display(),
                bytes.len(),
                crate::eventlog::MAX_LOG_BYTES
            )));
        }
        Ok(bytes)
    };
    match source {
        EventLogSource::None => Ok(None),
        EventLogSource::File(path) => read(path).map(Some),
        EventLogSource::Kernel => {
            let path = Path::new(KERNEL_EVENT_LOG);
            if !path.exists() {
                tracing::debug!(
                    path = KERNEL_EVENT_LOG,
                    "tpm: the kernel publishes no boot event log; sending none"
                );
                return Ok(None);
            }
            read(path).map(Some)
        }
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
    event_log: EventLogSource,
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
        let mut client = Self::with_tpm(SharedTpm::for_tcti(cfg.tcti()));
        client.event_log = cfg.event_log_source();
        client
    }

    /// A client on `tpm`, sending no event log.
    pub fn with_tpm(tpm: SharedTpm) -> Self {
        TpmAttestorClient {
            tpm,
            event_log: EventLogSource::None,
            pending: Arc::new(Mutex::new(None)),
        }
    }

    /// Sends the event log at `path` when the server asks for one.
    pub fn with_event_log(mut self, path: PathBuf) -> Self {
        self.event_log = EventLogSource::File(path);
        self
    }

    /// The TPM this client uses.
    pub fn shared_tpm(&self) -> &SharedTpm {
        &self.tpm
    }
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

    async fn answer(&self, challenge: &[u8], ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        let c: Challenge = wire::decode("challenge", challenge)?;
        if c.version != wire::VERSION || c.pcr_selection.hash != "sha256" {
            return Err(Error::AttestationRejected(format!(
                "tpm: the server asks for version {} / PCR bank {:?}; this agent speaks {} / sha256",
                c.version,
                c.pcr_selection.hash,
                wire::VERSION
            )));
        }
        let event_log = if c.event_log {
            read_event_log(&self.event_log)?
        } else {
            None
        };
        let qualifying_data = wire::qualifying_data(c.version, &c.nonce, &ctx.tls_exporter);
        let Some(pending) = lock(&self.pending).take() else {
            return Err(Error::AttestationRejected(
                "tpm: a challenge arrived without an attestation in progress".into(),
            ));
        };
        let tpm = self.tpm.clone();
        blocking(move || {
            let mut response =
                tpm.with_device(|device| respond(device, pending, &c, &qualifying_data))?;
            response.event_log = event_log;
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
fn respond(
    device: &mut TpmDevice,
    p: Pending,
    c: &Challenge,
    qualifying_data: &[u8],
) -> Result<Response, Error> {
    let ek = device.restore_ek(p.ek)?;
    let ak = match device.restore_ak(p.ak) {
        Ok(ak) => ak,
        Err(e) => {
            let _ = device.flush_ek(ek);
            return Err(e);
        }
    };
    let result = respond_loaded(device, ek, &ak, p.agent_key.as_ref(), c, qualifying_data);
    let flushed = device.flush_ak(ak);
    let response = result?;
    flushed?;
    Ok(response)
}

/// How often a quote is retried when a PCR changed between reading and quoting.
const QUOTE_ATTEMPTS: usize = 3;

/// Activates the credential (then flushes the EK, to free a slot for the agent key),
/// certifies the agent key with the AK, and quotes, both over `qualifying_data`
/// ([`wire::qualifying_data`]); the PCRs are read before and after the quote and the
/// quote is taken again if they moved in between (a measurement landed meanwhile).
fn respond_loaded(
    device: &mut TpmDevice,
    ek: Ek,
    ak: &Ak,
    agent_key: Option<&KeyBlob>,
    c: &Challenge,
    qualifying_data: &[u8],
) -> Result<Response, Error> {
    let activated = device.activate_credential(ak, &ek, &c.credential_blob, &c.encrypted_secret);
    let flushed = device.flush_ek(ek);
    let activated_secret = activated?;
    flushed?;
    let certification = match agent_key {
        Some(blob) => {
            let key = device.load_key(blob)?;
            let certified = device.certify(&key, ak, qualifying_data);
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
        let quote = device.quote(ak, qualifying_data, pcrs)?;
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
                event_log: None,
            });
        }
        tracing::debug!("tpm: PCRs changed during the quote; quoting again");
    }
    Err(Error::Unavailable(
        "tpm: the PCRs kept changing while quoting; try again".into(),
    ))
}
