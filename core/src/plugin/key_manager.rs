use std::fmt;
use std::sync::Arc;

use crate::crypto::{KeyType, SignatureAlgorithm};
use crate::error::{Error, truncate_input};

/// A key's public description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's id in its key manager.
    pub id: String,
    /// The key's type.
    pub key_type: KeyType,
    /// The public key, an X.509 SubjectPublicKeyInfo in DER.
    pub public_key_der: Vec<u8>,
}

/// A handle to one private key that stays inside its key manager.
///
/// Contract:
/// 1. `sign` signs `message` (not a digest: the key manager hashes it as `alg` says)
///    and returns the signature in the form X.509 and TLS use: ASN.1 DER `Ecdsa-Sig-Value`
///    for ECDSA, the raw signature block for RSA;
/// 2. `sign` fails with [`Error::UnsupportedAlgorithm`] when the key type cannot sign with
///    `alg`, and never signs with another algorithm;
/// 3. the private key is never returned, logged or written outside the backend;
/// 4. `sign` may block (hardware): async callers run it on a blocking thread when
///    [`KeySigner::may_block`] is true.
pub trait KeySigner: Send + Sync + fmt::Debug {
    /// The key's id in its key manager.
    fn id(&self) -> &str;
    /// The key's type.
    fn key_type(&self) -> KeyType;
    /// The public key, an X.509 SubjectPublicKeyInfo in DER.
    fn public_key_der(&self) -> &[u8];
    /// Signs `message` with `alg`.
    fn sign(&self, alg: SignatureAlgorithm, message: &[u8]) -> Result<Vec<u8>, Error>;
    /// Whether `sign` may block long enough that async code must move it off the runtime.
    fn may_block(&self) -> bool;
    /// How many signatures the backend makes at once (an HSM's session pool), or `None`
    /// when only the CPU limits it. Batch signers use at least this many workers, so a
    /// slow network HSM is kept busy on every session.
    fn concurrency(&self) -> Option<usize>;
}

/// Creates, finds, lists and deletes keys by id. Keys are generated where they live
/// (memory, a 0600 file, a PKCS#11 token, a TPM) and never leave it.
///
/// Contract:
/// 1. `generate_key` creates a new key; an existing id is [`Error::KeyExists`];
/// 2. `get_key` of an unknown id is [`Error::KeyNotFound`];
/// 3. keys of persistent backends are found again by id after a restart;
/// 4. signing through handles from one key manager may run concurrently.
#[async_trait::async_trait]
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// The plugin name, as in the configuration (`memory`, `disk`, `pkcs11`).
    fn name(&self) -> &str;
    /// Generates a new key of `key_type` under `id`.
    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeySigner>, Error>;
    /// Returns the key with `id`.
    async fn get_key(&self, id: &str) -> Result<Arc<dyn KeySigner>, Error>;
    /// Lists every key, sorted by id.
    async fn list_keys(&self) -> Result<Vec<KeyInfo>, Error>;
    /// Deletes the key with `id`; deleting an unknown id is [`Error::KeyNotFound`].
    async fn delete_key(&self, id: &str) -> Result<(), Error>;
}

/// Checks a key id: 1 to 128 bytes of letters, digits, `.`, `-` and `_` (ids become file
/// names and PKCS#11 labels).
pub fn validate_key_id(id: &str) -> Result<(), Error> {
    if id.is_empty()
        || id.len() > 128
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(Error::KeyBackend(format!(
            "key id {:?} is invalid (1-128 letters, digits, '.', '-', '_'; not starting with '.')",
            truncate_input(id)
        )));
    }
    Ok(())
}
