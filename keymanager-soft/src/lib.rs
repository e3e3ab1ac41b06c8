//! Software key managers: `memory` (keys live only in process memory, lost on exit) and
//! `disk` (each key a PKCS#8 file, mode 0600, in a 0700 directory).
//!
//! These keep private keys in process memory, so they are for labs, tests and agents
//! without a TPM; a production CA uses the PKCS#11 key manager instead. Signing is
//! in-memory (ring) and never blocks.
//!
//! Invariants: a key file is written to a temporary name with mode 0600 and renamed into
//! place, so a crash never leaves a half-written or world-readable key; a key file or
//! directory readable by group or others is refused at load.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod disk;
mod soft_key;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use carapace_core::plugin::{KeyInfo, KeyManager, KeySigner, validate_key_id};
use carapace_core::{Error, KeyType};

pub use disk::{DiskConfig, DiskKeyManager, load_key_file};

/// `[key_manager.memory]`: no settings.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {}
pub use soft_key::{SoftKey, generate_pkcs8};

/// Keys in process memory only.
#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: Mutex<BTreeMap<String, Arc<SoftKey>>>,
}

impl MemoryKeyManager {
    /// An empty key manager.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map inconsistent (every update is
    // a single insert or remove), so a poisoned lock is safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait::async_trait]
impl KeyManager for MemoryKeyManager {
    fn name(&self) -> &str {
        "memory"
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeySigner>, Error> {
        validate_key_id(id)?;
        if lock(&self.keys).contains_key(id) {
            return Err(Error::KeyExists(id.to_owned()));
        }
        let pkcs8 = generate_pkcs8(key_type)?;
        let key = Arc::new(SoftKey::from_pkcs8(id, &pkcs8)?);
        let mut keys = lock(&self.keys);
        if keys.contains_key(id) {
            return Err(Error::KeyExists(id.to_owned()));
        }
        keys.insert(id.to_owned(), key.clone());
        Ok(key)
    }

    async fn get_key(&self, id: &str) -> Result<Arc<dyn KeySigner>, Error> {
        lock(&self.keys)
            .get(id)
            .map(|k| k.clone() as Arc<dyn KeySigner>)
            .ok_or_else(|| Error::KeyNotFound(id.to_owned()))
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, Error> {
        Ok(lock(&self.keys).values().map(|k| k.info()).collect())
    }

    async fn delete_key(&self, id: &str) -> Result<(), Error> {
        lock(&self.keys)
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Error::KeyNotFound(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_core::testing;

    #[tokio::test]
    async fn memory_key_manager_conforms() {
        let km = MemoryKeyManager::new();
        testing::key_manager_conformance(&km, &KeyType::ALL).await;
    }
}
