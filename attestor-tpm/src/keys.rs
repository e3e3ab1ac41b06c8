//! The agent's `tpm` key manager (`[key_manager.tpm]`): the agent's own key generated in
//! the TPM, kept on disk only as the TPM's encrypted blob.
//!
//! `generate_key(id, ec-p256)` runs TPM2_Create of an unrestricted ECDSA P-256 /
//! SHA-256 signing key (fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth,
//! sign, not decrypt; [`crate::device::signing_key_template`]) under the storage root
//! key ([`crate::device::srk_template`], re-derived by CreatePrimary each time, nothing
//! persistent in the TPM). The result is written to `<directory>/<id>.tpmkey` (mode
//! 0600, directory 0700, written to a temporary file, synced and renamed):
//!
//! ```json
//! {"format":"carapace-tpm-key","version":1,"public":"<base64 TPMT_PUBLIC>","private":"<base64 TPM2B_PRIVATE contents>"}
//! ```
//!
//! The private part is the sensitive area encrypted and integrity-protected by the SRK:
//! only the TPM that made it can load it, and the private key never exists outside the
//! TPM. `sign` hashes the message with SHA-256 in software, then, holding the shared
//! TPM ([`SharedTpm`]): CreatePrimary(SRK), Load, flush the SRK, TPM2_Sign (password
//! session, null hashcheck ticket), flush the key. The ECDSA `r`, `s` come back as DER.
//!
//! Only `ec-p256` keys: other types fail with [`Error::KeyBackend`] ("tpm key manager
//! supports ec-p256 only"), other signature algorithms with
//! [`Error::UnsupportedAlgorithm`]. `delete_key` removes the file (the TPM holds
//! nothing). Keys are registered with the [`SharedTpm`] by SubjectPublicKeyInfo, which
//! is how the `tpm` node attestor finds the agent key to certify.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use carapace_core::files::{NamedFile, key_directory_files, key_id_of_file};
use carapace_core::plugin::{KeyInfo, KeyManager, KeySigner, validate_key_id};
use carapace_core::{Error, KeyType, SignatureAlgorithm};

use crate::agent::DEFAULT_TCTI;
use crate::device::{EcdsaSignature, KeyBlob};
use crate::lock;
use crate::shared::SharedTpm;
use crate::verify;
use crate::wire::b64;

/// The key manager's plugin name.
pub const KEY_MANAGER_NAME: &str = "tpm";
/// The extension of key files.
pub const KEY_FILE_EXTENSION: &str = "tpmkey";
/// The `format` field of key files.
pub const KEY_FILE_FORMAT: &str = "carapace-tpm-key";
/// The directory under the data dir when the configuration names none.
pub const DEFAULT_DIRECTORY: &str = "keys-tpm";

/// Settings of `[key_manager.tpm]` on the agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmKeyManagerConfig {
    /// How to reach the TPM: `device:/dev/tpmrm0` (default) or
    /// `swtpm:host=127.0.0.1,port=2321`. Use the same string as `[node_attestor.tpm]`,
    /// so both share one TPM context and the attestation certifies the agent key.
    pub tcti: Option<String>,
    /// Where the key blobs go; a relative path is under the data dir. Default
    /// `<data_dir>/keys-tpm`.
    pub directory: Option<PathBuf>,
}

impl TpmKeyManagerConfig {
    /// The TCTI to use.
    pub fn tcti(&self) -> &str {
        self.tcti.as_deref().unwrap_or(DEFAULT_TCTI)
    }

    /// The key directory, for a process whose data dir is `data_dir`.
    pub fn directory_in(&self, data_dir: &Path) -> PathBuf {
        match &self.directory {
            Some(d) if d.is_absolute() => d.clone(),
            Some(d) => data_dir.join(d),
            None => data_dir.join(DEFAULT_DIRECTORY),
        }
    }

    /// The files these settings name, for `validate`: the key directory (created when
    /// missing, refused when group or others have access), the key files
    /// [`TpmKeyManager::open`] would load from it (refused when group or others have
    /// access) and a `device:` TCTI's device (opened at the first key).
    pub fn files(&self, data_dir: &Path) -> Vec<NamedFile> {
        let dir = self.directory_in(data_dir);
        let listing = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()));
        let mut files = key_directory_files(&dir, listing, KEY_FILE_EXTENSION);
        files.extend(crate::agent::tcti_device(self.tcti()));
        files
    }
}

/// The key id of a key file's path (`<id>.tpmkey` with a valid id), or `None` for any
/// other file, which [`TpmKeyManager::open`] skips.
fn key_id_of(path: &Path) -> Option<&str> {
    key_id_of_file(path, KEY_FILE_EXTENSION)
}

/// A key file's contents.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    version: u32,
    #[serde(with = "b64")]
    public: Vec<u8>,
    #[serde(with = "b64")]
    private: Vec<u8>,
}

fn backend(msg: impl std::fmt::Display) -> Error {
    Error::KeyBackend(format!("tpm key manager: {msg}"))
}

/// Reads and checks a `.tpmkey` file: its format, and that the public area is an
/// agent key as [`verify::check_agent_key`] requires (ECDSA P-256 signing key bound to
/// its TPM).
pub fn read_key_file(path: &Path) -> Result<KeyBlob, Error> {
    let bytes = fs::read(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
    let file: KeyFile = serde_json::from_slice(&bytes)
        .map_err(|e| backend(format!("{}: not a TPM key file: {e}", path.display())))?;
    if file.format != KEY_FILE_FORMAT || file.version != 1 {
        return Err(backend(format!(
            "{}: format {:?} version {}, expected {KEY_FILE_FORMAT:?} version 1",
            path.display(),
            file.format,
            file.version
        )));
    }
    let blob = KeyBlob {
        public: file.public,
        private: file.private,
    };
    describe(&blob).map_err(|e| backend(format!("{}: {e}", path.display())))?;
    Ok(blob)
}

/// The SubjectPublicKeyInfo of a blob's key, after checking its public area.
fn describe(blob: &KeyBlob) -> Result<Vec<u8>, Error> {
    let public = verify::parse_public_as("key public area", &blob.public)
        .map_err(|e| backend(e.to_string()))?;
    verify::check_agent_key(&public).map_err(|e| backend(e.to_string()))?;
    verify::public_key_spki_der(&public).map_err(|e| backend(e.to_string()))
}

/// Refuses a key file or directory that group or others may read or write.
fn check_private(path: &Path, what: &str) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
    carapace_core::files::check_private(what, path, &meta).map_err(backend)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| backend(format!("task failed: {e}")))?
}

/// Agent keys in the TPM, as blobs in a directory (see the module docs).
#[derive(Debug)]
pub struct TpmKeyManager {
    tpm: SharedTpm,
    dir: PathBuf,
    keys: Mutex<BTreeMap<String, Arc<TpmKey>>>,
}

impl TpmKeyManager {
    /// Opens the key manager `cfg` describes for a process whose data dir is
    /// `data_dir`, on the process-wide [`SharedTpm`] of its TCTI. The TPM is not
    /// contacted until a key is generated or signs.
    pub fn open(cfg: &TpmKeyManagerConfig, data_dir: &Path) -> Result<Self, Error> {
        Self::open_with(SharedTpm::for_tcti(cfg.tcti()), &cfg.directory_in(data_dir))
    }

    /// Opens (creating it with mode 0700 if missing) the key directory `dir`, loads
    /// every `*.tpmkey` file in it and registers the keys with `tpm`.
    pub fn open_with(tpm: SharedTpm, dir: &Path) -> Result<Self, Error> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    backend(format!(
                        "cannot create key directory {}: {e}",
                        dir.display()
                    ))
                })?;
        }
        check_private(dir, "key directory")?;
        let mut keys = BTreeMap::new();
        let entries = fs::read_dir(dir).map_err(|e| backend(format!("{}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| backend(format!("{}: {e}", dir.display())))?;
            let path = entry.path();
            let Some(id) = key_id_of(&path) else {
                continue;
            };
            check_private(&path, "key file")?;
            let blob = read_key_file(&path)?;
            let key = TpmKey::new(id, blob, tpm.clone())?;
            tpm.register_key(key.spki.clone(), key.blob.clone());
            keys.insert(id.to_owned(), Arc::new(key));
        }
        Ok(TpmKeyManager {
            tpm,
            dir: dir.to_owned(),
            keys: Mutex::new(keys),
        })
    }

    /// The TPM this key manager uses.
    pub fn shared_tpm(&self) -> &SharedTpm {
        &self.tpm
    }

    /// The key directory.
    pub fn directory(&self) -> &Path {
        &self.dir
    }

    /// The file key `id` is kept in.
    pub fn path_of(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.{KEY_FILE_EXTENSION}"))
    }

    /// Writes `blob` to the key's file atomically with mode 0600.
    fn write_key(&self, id: &str, blob: &KeyBlob) -> Result<(), Error> {
        let final_path = self.path_of(id);
        let tmp = self.dir.join(format!(".{id}.{KEY_FILE_EXTENSION}.tmp"));
        let _ = fs::remove_file(&tmp);
        let json = serde_json::to_vec(&KeyFile {
            format: KEY_FILE_FORMAT.into(),
            version: 1,
            public: blob.public.clone(),
            private: blob.private.clone(),
        })
        .map_err(|e| backend(format!("encoding key {id:?}: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &final_path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            backend(format!("cannot write key {}: {e}", final_path.display()))
        })
    }
}

#[async_trait::async_trait]
impl KeyManager for TpmKeyManager {
    fn name(&self) -> &str {
        KEY_MANAGER_NAME
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeySigner>, Error> {
        validate_key_id(id)?;
        if key_type != KeyType::EcP256 {
            return Err(backend(format!(
                "tpm key manager supports ec-p256 only (asked for {key_type})"
            )));
        }
        if lock(&self.keys).contains_key(id) || self.path_of(id).exists() {
            return Err(Error::KeyExists(id.to_owned()));
        }
        let tpm = self.tpm.clone();
        let blob = blocking(move || tpm.with_device(|d| d.create_signing_key())).await?;
        let key = Arc::new(TpmKey::new(id, blob, self.tpm.clone())?);
        {
            let mut keys = lock(&self.keys);
            if keys.contains_key(id) {
                return Err(Error::KeyExists(id.to_owned()));
            }
            self.write_key(id, &key.blob)?;
            keys.insert(id.to_owned(), key.clone());
        }
        self.tpm.register_key(key.spki.clone(), key.blob.clone());
        tracing::debug!(key = id, tcti = %self.tpm.tcti(), "tpm: generated a key in the TPM");
        Ok(key)
    }

    async fn get_key(&self, id: &str) -> Result<Arc<dyn KeySigner>, Error> {
        lock(&self.keys)
            .get(id)
            .map(|k| k.clone() as Arc<dyn KeySigner>)
            .ok_or_else(|| Error::KeyNotFound(id.to_owned()))
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, Error> {
        Ok(lock(&self.keys)
            .values()
            .map(|k| KeyInfo {
                id: k.id.clone(),
                key_type: KeyType::EcP256,
                public_key_der: k.spki.clone(),
            })
            .collect())
    }

    async fn delete_key(&self, id: &str) -> Result<(), Error> {
        let mut keys = lock(&self.keys);
        let Some(key) = keys.get(id).cloned() else {
            return Err(Error::KeyNotFound(id.to_owned()));
        };
        fs::remove_file(self.path_of(id))
            .map_err(|e| backend(format!("cannot delete key {id:?}: {e}")))?;
        keys.remove(id);
        self.tpm.unregister_key(&key.spki);
        Ok(())
    }
}

/// One key of a [`TpmKeyManager`]: its blob, loaded into the TPM for each signature.
pub struct TpmKey {
    id: String,
    spki: Vec<u8>,
    blob: KeyBlob,
    tpm: SharedTpm,
}

impl std::fmt::Debug for TpmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmKey")
            .field("id", &self.id)
            .field("tcti", &self.tpm.tcti())
            .finish_non_exhaustive()
    }
}

impl TpmKey {
    fn new(id: &str, blob: KeyBlob, tpm: SharedTpm) -> Result<Self, Error> {
        Ok(TpmKey {
            id: id.to_owned(),
            spki: describe(&blob)?,
            blob,
            tpm,
        })
    }

    /// The key's blob, as in its file.
    pub fn blob(&self) -> &KeyBlob {
        &self.blob
    }
}

impl KeySigner for TpmKey {
    fn id(&self) -> &str {
        &self.id
    }

    fn key_type(&self) -> KeyType {
        KeyType::EcP256
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, alg: SignatureAlgorithm, message: &[u8]) -> Result<Vec<u8>, Error> {
        if alg != SignatureAlgorithm::EcdsaP256Sha256 {
            return Err(Error::UnsupportedAlgorithm {
                key_type: KeyType::EcP256,
                algorithm: alg,
            });
        }
        let digest: [u8; 32] = Sha256::digest(message).into();
        let started = std::time::Instant::now();
        let signature = self
            .tpm
            .with_device_retry(|d| d.sign_digest(&self.blob, &digest))?;
        // Only the agent's own signatures (CSRs, TLS handshakes to the server) come here.
        tracing::debug!(
            key = %self.id,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "tpm: signed in the TPM"
        );
        ecdsa_der(&signature)
    }

    fn may_block(&self) -> bool {
        true
    }

    fn concurrency(&self) -> Option<usize> {
        Some(1)
    }
}

/// An ECDSA P-256 signature's `r` and `s` (big-endian, possibly shorter than 32 bytes,
/// or with leading zeros) as an ASN.1 DER `Ecdsa-Sig-Value`.
pub fn ecdsa_der(signature: &EcdsaSignature) -> Result<Vec<u8>, Error> {
    let r = field_bytes(&signature.r)?;
    let s = field_bytes(&signature.s)?;
    let sig = p256::ecdsa::Signature::from_scalars(r, s).map_err(|_| {
        backend("the TPM returned an invalid ECDSA signature (r or s out of range)")
    })?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// A big-endian integer as a 32-byte P-256 scalar: left-padded, leading zeros beyond
/// 32 bytes stripped.
fn field_bytes(bytes: &[u8]) -> Result<p256::FieldBytes, Error> {
    let start = bytes.len().saturating_sub(32);
    let (extra, value) = bytes.split_at(start);
    if extra.iter().any(|&b| b != 0) {
        return Err(backend(format!(
            "the TPM returned an ECDSA component of {} bytes, longer than P-256's 32",
            bytes.len()
        )));
    }
    let mut out = p256::FieldBytes::default();
    out[32 - value.len()..].copy_from_slice(value);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_padded_components_become_der() {
        let mut r = vec![0u8; 31];
        r[0] = 0x7f;
        r[30] = 1;
        let s = [vec![0, 0], vec![0x80; 32]].concat();
        let der = ecdsa_der(&EcdsaSignature { r: r.clone(), s }).unwrap();
        let parsed = p256::ecdsa::Signature::from_der(&der).unwrap();
        let (pr, ps) = parsed.split_bytes();
        assert_eq!(&pr[1..], r.as_slice());
        assert_eq!(pr[0], 0);
        assert_eq!(ps.as_slice(), [0x80; 32].as_slice());
        // s starts with 0x80: DER needs a leading zero there.
        assert!(
            der.windows(3).any(|w| w == [0x02, 0x21, 0x00]),
            "{der:02x?}"
        );
        assert!(
            ecdsa_der(&EcdsaSignature {
                r: vec![1; 33],
                s: vec![1; 32]
            })
            .is_err()
        );
        assert!(
            ecdsa_der(&EcdsaSignature {
                r: vec![0; 32],
                s: vec![1; 32]
            })
            .is_err(),
            "r = 0 is not a signature"
        );
    }

    #[test]
    fn config_directory_defaults_under_the_data_dir() {
        let cfg = TpmKeyManagerConfig::default();
        assert_eq!(cfg.tcti(), DEFAULT_TCTI);
        assert_eq!(
            cfg.directory_in(Path::new("/d")),
            PathBuf::from("/d/keys-tpm")
        );
        let cfg = TpmKeyManagerConfig {
            directory: Some("k".into()),
            ..Default::default()
        };
        assert_eq!(cfg.directory_in(Path::new("/d")), PathBuf::from("/d/k"));
    }
}
