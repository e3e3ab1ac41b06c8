//! One TPM context per TCTI per process, shared by the agent's `tpm` key manager and its
//! `tpm` node attestor.
//!
//! A TPM without a resource manager (swtpm, `/dev/tpm0`) has three transient object
//! slots and no notion of clients: a second ESAPI context would flush the first one's
//! objects when it opens ([`TpmDevice::open`] flushes what it finds loaded). So every
//! TPM command of a process goes through one [`SharedTpm`]: a mutex around one
//! [`TpmDevice`], opened on first use and opened again after a transport failure.
//!
//! [`SharedTpm::for_tcti`] returns the process-wide instance of a TCTI string (the same
//! string: `device:/dev/tpmrm0` and `device` are two instances), so the key manager and
//! the attestor built separately from `[key_manager.tpm]` and `[node_attestor.tpm]`
//! share it. It also carries the registry the attestor needs for TPM2_Certify: the key
//! blobs of the agent keys the key manager holds, by SubjectPublicKeyInfo.
//!
//! Slot budget (no resource manager): between calls nothing is loaded. A signature
//! uses two slots at most (SRK and key while loading, then the key); an attestation's
//! answer uses three at most (EK and AK; then AK, SRK and agent key; then AK and agent
//! key); between the payload and the answer the EK and AK are swapped out
//! ([`TpmDevice::save_ek`]), so a TLS handshake signed meanwhile finds all slots free.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use carapace_core::Error;

use crate::device::{KeyBlob, TpmDevice};
use crate::lock;

/// The TPM behind one TCTI, opened lazily and shared; cheap to clone.
#[derive(Clone)]
pub struct SharedTpm {
    inner: Arc<Inner>,
}

struct Inner {
    tcti: String,
    device: Mutex<Option<TpmDevice>>,
    /// Agent keys held by a `tpm` key manager on this TPM: SPKI DER → blob.
    keys: Mutex<HashMap<Vec<u8>, KeyBlob>>,
}

impl fmt::Debug for SharedTpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedTpm")
            .field("tcti", &self.inner.tcti)
            .finish_non_exhaustive()
    }
}

/// The process-wide instances by TCTI; entries die with their last user.
fn registry() -> &'static Mutex<HashMap<String, Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<Inner>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

impl SharedTpm {
    /// A new instance for `tcti`, not shared with anything else in the process (tests,
    /// tools). Nothing is opened yet.
    pub fn new(tcti: &str) -> SharedTpm {
        SharedTpm {
            inner: Arc::new(Inner {
                tcti: tcti.trim().to_owned(),
                device: Mutex::new(None),
                keys: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The process-wide instance for `tcti` (created on first call, kept while someone
    /// holds it).
    pub fn for_tcti(tcti: &str) -> SharedTpm {
        let tcti = tcti.trim();
        let mut map = lock(registry());
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(inner) = map.get(tcti).and_then(Weak::upgrade) {
            return SharedTpm { inner };
        }
        let shared = SharedTpm::new(tcti);
        map.insert(tcti.to_owned(), Arc::downgrade(&shared.inner));
        shared
    }

    /// The TCTI string.
    pub fn tcti(&self) -> &str {
        &self.inner.tcti
    }

    /// Whether `other` is the same instance (same device, same key registry).
    pub fn same_as(&self, other: &SharedTpm) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Runs `f` with the device, opening it first if needed; the lock is held
    /// throughout, so `f` is the only TPM user of the process meanwhile. Blocks: call
    /// it from a blocking thread. A device whose transport failed is dropped (its
    /// objects flushed as far as possible) and opened again by the next call.
    pub fn with_device<T>(
        &self,
        f: impl FnOnce(&mut TpmDevice) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut guard = lock(&self.inner.device);
        let device = match guard.as_mut() {
            Some(device) => device,
            None => guard.insert(TpmDevice::open(&self.inner.tcti)?),
        };
        let result = f(device);
        if device.is_broken() {
            tracing::warn!(tcti = %self.inner.tcti, "tpm: the connection failed; it is opened again on next use");
            *guard = None;
        }
        result
    }

    /// [`SharedTpm::with_device`] for operations that may run twice (signing, reads):
    /// when a device kept from an earlier call turns out broken (the TPM restarted, a
    /// TCP connection to swtpm dropped), it is opened again and `f` retried once.
    pub fn with_device_retry<T>(
        &self,
        mut f: impl FnMut(&mut TpmDevice) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let reused = lock(&self.inner.device).is_some();
        let mut broke = false;
        let first = self.with_device(|device| {
            let r = f(device);
            broke = device.is_broken();
            r
        });
        match first {
            Err(e) if reused && broke => {
                tracing::info!(tcti = %self.inner.tcti, error = %e, "tpm: retrying once on a new connection");
                self.with_device(f)
            }
            other => other,
        }
    }

    /// Closes the device (flushing what this process had loaded); the next call opens
    /// it again.
    pub fn close(&self) {
        lock(&self.inner.device).take();
    }

    /// Registers an agent key held by a `tpm` key manager on this TPM, by its
    /// SubjectPublicKeyInfo (DER), so the attestor can certify it.
    pub fn register_key(&self, spki: Vec<u8>, blob: KeyBlob) {
        lock(&self.inner.keys).insert(spki, blob);
    }

    /// Forgets a registered key.
    pub fn unregister_key(&self, spki: &[u8]) {
        lock(&self.inner.keys).remove(spki);
    }

    /// The blob of the registered key with this SubjectPublicKeyInfo, if any.
    pub fn key_by_spki(&self, spki: &[u8]) -> Option<KeyBlob> {
        lock(&self.inner.keys).get(spki).cloned()
    }
}
