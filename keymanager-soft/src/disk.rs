use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use zeroize::Zeroizing;

use carapace_core::files::{NamedFile, key_directory_files, key_id_of_file};
use carapace_core::plugin::{KeyInfo, KeyManager, KeySigner, validate_key_id};
use carapace_core::{Error, KeyType};

use crate::soft_key::{SoftKey, generate_pkcs8};

/// `[key_manager.disk]` settings.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Key directory; a relative path is under the data dir. Default `<data_dir>/keys`.
    pub directory: Option<PathBuf>,
}

impl DiskConfig {
    /// The key directory these settings name, for a process whose data dir is `data_dir`.
    pub fn directory_in(&self, data_dir: &Path) -> PathBuf {
        match &self.directory {
            Some(d) if d.is_absolute() => d.clone(),
            Some(d) => data_dir.join(d),
            None => data_dir.join("keys"),
        }
    }

    /// The files these settings name, for `validate`: the key directory (created when
    /// missing, refused when group or others have access) and the key files
    /// [`DiskKeyManager::open`] would load from it (secrets).
    pub fn files(&self, data_dir: &Path) -> Vec<NamedFile> {
        let dir = self.directory_in(data_dir);
        let listing = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()));
        key_directory_files(&dir, listing, "key")
    }
}

/// The key id of a key file's path (`<id>.key` with a valid id), or `None` for any
/// other file, which [`DiskKeyManager::open`] skips.
fn key_id_of(path: &Path) -> Option<&str> {
    key_id_of_file(path, "key")
}

/// Keys as PKCS#8 PEM files (`<id>.key`, mode 0600) in a directory (mode 0700).
#[derive(Debug)]
pub struct DiskKeyManager {
    dir: PathBuf,
    keys: Mutex<BTreeMap<String, Arc<SoftKey>>>,
}

fn backend(msg: impl std::fmt::Display) -> Error {
    Error::KeyBackend(msg.to_string())
}

/// Refuses a key file or directory that group or others may read or write.
fn check_private(path: &Path, what: &str) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
    carapace_core::files::check_private(what, path, &meta).map_err(backend)
}

/// Loads the PKCS#8 PEM key file `path` as key `id`, refusing a file that group or
/// others may read or write.
pub fn load_key_file(path: &Path, id: &str) -> Result<SoftKey, Error> {
    check_private(path, "key file")?;
    let pem =
        Zeroizing::new(fs::read(path).map_err(|e| backend(format!("{}: {e}", path.display())))?);
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| {
        backend(format!(
            "{}: not a PKCS#8 PEM key: {e} (convert one with `openssl pkcs8 -topk8 -nocrypt`)",
            path.display()
        ))
    })?;
    SoftKey::from_pkcs8(id, der.secret_pkcs8_der())
}

impl DiskKeyManager {
    /// Opens (creating it with mode 0700 if missing) the key directory and loads every
    /// `*.key` file in it.
    pub fn open(dir: &Path) -> Result<Self, Error> {
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
            keys.insert(id.to_owned(), Arc::new(load_key_file(&path, id)?));
        }
        Ok(DiskKeyManager {
            dir: dir.to_owned(),
            keys: Mutex::new(keys),
        })
    }

    fn path_of(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key"))
    }

    /// Writes `pkcs8` to `<id>.key` atomically with mode 0600.
    fn write_key(&self, id: &str, pkcs8: &[u8]) -> Result<(), Error> {
        let final_path = self.path_of(id);
        let tmp = self.dir.join(format!(".{id}.key.tmp"));
        let _ = fs::remove_file(&tmp);
        let pem = Zeroizing::new(carapace_core::bundle::pem_block("PRIVATE KEY", pkcs8));
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(pem.as_bytes())?;
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single insert or remove: a poisoned map is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait::async_trait]
impl KeyManager for DiskKeyManager {
    fn name(&self) -> &str {
        "disk"
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeySigner>, Error> {
        validate_key_id(id)?;
        if lock(&self.keys).contains_key(id) || self.path_of(id).exists() {
            return Err(Error::KeyExists(id.to_owned()));
        }
        let pkcs8 = generate_pkcs8(key_type)?;
        let key = Arc::new(SoftKey::from_pkcs8(id, &pkcs8)?);
        let mut keys = lock(&self.keys);
        if keys.contains_key(id) {
            return Err(Error::KeyExists(id.to_owned()));
        }
        self.write_key(id, &pkcs8)?;
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
        let mut keys = lock(&self.keys);
        if !keys.contains_key(id) {
            return Err(Error::KeyNotFound(id.to_owned()));
        }
        fs::remove_file(self.path_of(id))
            .map_err(|e| backend(format!("cannot delete key {id:?}: {e}")))?;
        keys.remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_core::testing;
    use std::os::unix::fs::PermissionsExt as _;

    #[tokio::test]
    async fn disk_key_manager_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::open(&dir.path().join("keys")).unwrap();
        testing::key_manager_conformance(&km, &KeyType::ALL).await;
    }

    #[tokio::test]
    async fn keys_survive_a_restart_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("keys");
        let before = {
            let km = DiskKeyManager::open(&kdir).unwrap();
            testing::create_for_restart(&km, &[KeyType::EcP256, KeyType::EcP384]).await
        };
        assert_eq!(
            fs::metadata(&kdir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for info in &before {
            let mode = fs::metadata(kdir.join(format!("{}.key", info.id)))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "key file mode");
        }
        let km = DiskKeyManager::open(&kdir).unwrap();
        testing::check_after_restart(&km, &before).await;
    }

    #[tokio::test]
    async fn refuses_a_group_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("keys");
        {
            let km = DiskKeyManager::open(&kdir).unwrap();
            km.generate_key("ca", KeyType::EcP256).await.unwrap();
        }
        let path = kdir.join("ca.key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = DiskKeyManager::open(&kdir).unwrap_err().to_string();
        assert!(
            err.contains("must not be accessible to group or others"),
            "{err}"
        );
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[tokio::test]
    async fn refuses_a_corrupt_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("keys");
        DiskKeyManager::open(&kdir).unwrap();
        let path = kdir.join("bad.key");
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(b"not a key")
            .unwrap();
        let err = DiskKeyManager::open(&kdir).unwrap_err().to_string();
        assert!(err.contains("bad.key"), "{err}");
    }
}
