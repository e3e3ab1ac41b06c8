//! PKCS#11 key manager (plugin `pkcs11`): keys generated inside a token, never exported.
//!
//! Carapace's CA keys live in an HSM: they are generated in the token, sign in the token,
//! and never enter process memory. This crate implements [`KeyManager`] and [`KeySigner`]
//! over any PKCS#11 module (SoftHSM2 in tests) with the `cryptoki` crate.
//!
//! # Settings (`[key_manager.pkcs11]`, [`Pkcs11Config`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `module` | required | the vendor's PKCS#11 library, e.g. `/usr/lib/softhsm/libsofthsm2.so` |
//! | `token_label` | | the token's label (exactly one of `token_label` / `token_serial`) |
//! | `token_serial` | | the token's serial number |
//! | `pin_file` | | a file holding the user PIN, mode 0600 or stricter (refused otherwise); one trailing newline is ignored |
//! | `pin_env` | | the name of an environment variable holding the user PIN (exactly one of `pin_file` / `pin_env`) |
//! | `key_label_prefix` | `carapace-` | `CKA_LABEL` of key `id` is `prefix + id`; only such keys are listed |
//! | `sessions` | 4 | logged-in sessions in the pool = signatures in parallel (1 to 64) |
//!
//! Tokens are found by label or serial, never by slot number (SoftHSM2 moves an
//! initialised token to a random slot id; HSMs renumber slots).
//! [`Pkcs11Config::validate`] lists every problem of a configuration without touching the
//! module.
//!
//! # Objects
//!
//! Key `id` (checked by [`validate_key_id`]) is a key pair with `CKA_LABEL` = prefix + id
//! and `CKA_ID` = the first 16 bytes of SHA-256 of that label:
//!
//! - private key: `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, `CKA_SIGN` true,
//!   `CKA_EXTRACTABLE` false (so the token also sets `CKA_ALWAYS_SENSITIVE` and
//!   `CKA_NEVER_EXTRACTABLE`), and `CKA_DECRYPT`, `CKA_UNWRAP`, `CKA_DERIVE` false: a CA
//!   key signs and does nothing else;
//! - public key: `CKA_TOKEN`, `CKA_VERIFY` true, `CKA_PRIVATE`, `CKA_ENCRYPT`, `CKA_WRAP`
//!   false.
//!
//! `ec-p256` / `ec-p384` use `CKM_EC_KEY_PAIR_GEN` (named curve OID in `CKA_EC_PARAMS`),
//! `rsa-2048` uses `CKM_RSA_PKCS_KEY_PAIR_GEN` with exponent 65537. The public key is read
//! back (`CKA_EC_POINT`, or `CKA_MODULUS` and `CKA_PUBLIC_EXPONENT`) and encoded as a
//! SubjectPublicKeyInfo here.
//!
//! Signing hashes the message in software and has the token sign the digest: raw
//! `CKM_ECDSA` (the `r || s` result is DER-encoded; high-S values are valid and kept),
//! `CKM_RSA_PKCS` over the SHA-256 DigestInfo, `CKM_RSA_PKCS_PSS` (SHA-256, MGF1-SHA-256,
//! salt 32) for RSA-PSS. These are the mechanisms nearly every HSM has.
//!
//! A certificate can be stored next to a key ([`Pkcs11KeyManager::store_certificate`]:
//! `CKO_CERTIFICATE`, `CKC_X_509`, public, same label and `CKA_ID`), which is how the
//! server's `pkcs11` upstream authority keeps its root.
//!
//! # Sessions and failures
//!
//! The key manager logs in once and keeps `sessions` sessions; each signature takes one,
//! so that many signatures run in parallel. All calls block: the async [`KeyManager`]
//! methods run them on tokio's blocking pool, and [`KeySigner::may_block`] is true.
//!
//! Opening fails with [`Error::KeyBackend`] and a message that names the problem and the
//! fix: module missing or not loadable, `C_Initialize` failing (for SoftHSM2: the
//! `SOFTHSM2_CONF` file), token not found (listing the tokens present), wrong PIN
//! (`CKR_PIN_INCORRECT`; repeated failures may lock the token), PIN locked, PIN file
//! unreadable or readable by group/others, PIN variable unset. No message contains the
//! PIN.
//!
//! When the token or the module fails while running (`CKR_DEVICE_ERROR`,
//! `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_SESSION_HANDLE_INVALID`,
//! `CKR_SESSION_CLOSED`, `CKR_USER_NOT_LOGGED_IN`, `CKR_CRYPTOKI_NOT_INITIALIZED`,
//! `CKR_GENERAL_ERROR`, ...) the session pool is marked broken and one warning is logged.
//! The next call reconnects: it waits for calls in flight, finalises and re-initialises
//! the module (rescanning the slots), finds the token by label or serial, logs in and
//! opens new sessions; success logs "PKCS#11 token back". Signing and lookups retry once
//! after a successful reconnection, so a token that resets and comes straight back costs
//! callers nothing. While the token stays away, calls fail with [`Error::KeyUnavailable`]
//! (naming the `CKR_*` code) and a reconnection is attempted at most once a second.
//! Key generation, deletion and certificate storage are not retried: they fail with
//! `KeyUnavailable` and the next call reconnects. Signers handed out earlier keep
//! working after a reconnection: they name their key by label and look its handle up
//! again. A PIN the token refuses while reconnecting (changed or locked behind our back)
//! is never tried again, since that could lock the token: calls fail with `KeyBackend`
//! until the PIN source holds another PIN (it is read again at most once a second), and
//! then reconnect.
//!
//! # A real HSM
//!
//! ```toml
//! [key_manager.pkcs11]
//! module = "/opt/vendor/lib/libvendorpkcs11.so"   # the vendor's PKCS#11 library
//! token_label = "carapace-ca"                      # or token_serial = "..."
//! pin_file = "/etc/carapace/hsm.pin"               # chmod 600, owned by the server's user
//! sessions = 8                                     # at most the token's session limit
//! ```
//!
//! Check the module and the token with `pkcs11-tool --module <module> --list-tokens`.
//! With SoftHSM2, the token directory and its files must belong to the user running
//! Carapace (a token owned by another user is silently invisible) and `SOFTHSM2_CONF`
//! must name the configuration in the server's environment.
//!
//! Several key managers in one process may use the same module (the module is
//! initialised once and finalised when the last one closes); a reconnection then
//! reopens sessions without finalising the module.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod der;
mod module;
mod objects;
mod rv;
mod token;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use carapace_core::plugin::{KeyInfo, KeyManager, KeySigner, validate_key_id};
use carapace_core::{Error, KeyType, SignatureAlgorithm};

pub use config::{DEFAULT_KEY_LABEL_PREFIX, DEFAULT_SESSIONS, MAX_SESSIONS, Pkcs11Config};
pub use objects::PrivateKeyAttributes;
pub use token::RECONNECT_INTERVAL;

use token::Token;

/// The plugin name.
pub const PLUGIN_NAME: &str = "pkcs11";

/// Keys in a PKCS#11 token. Cheap to share: signers hold the token connection too.
#[derive(Debug)]
pub struct Pkcs11KeyManager {
    token: Arc<Token>,
}

/// One key in the token; signs there.
pub struct Pkcs11Key {
    token: Arc<Token>,
    id: String,
    label: String,
    key_type: KeyType,
    spki: Vec<u8>,
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("id", &self.id)
            .field("label", &self.label)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl KeySigner for Pkcs11Key {
    fn id(&self) -> &str {
        &self.id
    }

    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, alg: SignatureAlgorithm, message: &[u8]) -> Result<Vec<u8>, Error> {
        self.token
            .sign(&self.id, &self.label, self.key_type, alg, message)
    }

    fn may_block(&self) -> bool {
        true
    }

    fn concurrency(&self) -> Option<usize> {
        Some(self.token.size)
    }
}

/// Runs blocking token work on tokio's blocking pool when there is a runtime.
async fn blocking<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| Error::KeyBackend(format!("pkcs11: token task failed: {e}")))?,
        Err(_) => f(),
    }
}

impl Pkcs11KeyManager {
    /// Loads the module, finds the token, logs in and opens the session pool. Blocks
    /// (tens of milliseconds with SoftHSM2, longer with a network HSM).
    pub fn open(cfg: &Pkcs11Config) -> Result<Pkcs11KeyManager, Error> {
        Ok(Pkcs11KeyManager {
            token: Arc::new(Token::open(cfg)?),
        })
    }

    fn signer(&self, id: &str, meta: objects::KeyMeta) -> Arc<dyn KeySigner> {
        Arc::new(Pkcs11Key {
            token: self.token.clone(),
            id: id.to_owned(),
            label: self.token.label_of(id),
            key_type: meta.key_type,
            spki: meta.spki,
        })
    }

    /// The `CKA_LABEL` of key `id` (prefix + id).
    pub fn label_of(&self, id: &str) -> String {
        self.token.label_of(id)
    }

    /// Stores the DER X.509 certificate `der` under `id` (same `CKA_LABEL` and `CKA_ID`
    /// as the key `id`): `CKO_CERTIFICATE`, `CKC_X_509`, `CKA_TOKEN` true, `CKA_PRIVATE`
    /// false, with `CKA_SUBJECT`, `CKA_ISSUER`, `CKA_SERIAL_NUMBER` from the certificate.
    /// Replaces a certificate stored under `id` before. Blocks.
    pub fn store_certificate(&self, id: &str, der: &[u8]) -> Result<(), Error> {
        self.token.store_certificate(id, der)
    }

    /// The DER certificate stored under `id`, or `None`. Blocks.
    pub fn find_certificate(&self, id: &str) -> Result<Option<Vec<u8>>, Error> {
        self.token.find_certificate(id)
    }

    /// The protection attributes of the private key `id`. Blocks.
    pub fn private_key_attributes(&self, id: &str) -> Result<PrivateKeyAttributes, Error> {
        self.token.private_key_attributes(id)
    }

    /// Tries to read the secret parts of the private key `id` (`CKA_VALUE`, the RSA
    /// private exponent and primes). `None` when the token refuses all of them, as it
    /// must for a sensitive key; a value here means the key is exposed. Blocks.
    pub fn try_read_private_value(&self, id: &str) -> Result<Option<Vec<u8>>, Error> {
        self.token.try_read_private_value(id)
    }

    /// The number of times the session pool reconnected to the token since `open`.
    pub fn reconnects(&self) -> u64 {
        self.token.reconnects()
    }

    /// The number of sessions in the pool.
    pub fn sessions(&self) -> usize {
        self.token.size
    }

    /// The token's raw signing rate: signatures per second over `duration` with
    /// `threads` pool sessions signing in parallel, each with the token's raw mechanism
    /// on a precomputed digest (`CKM_ECDSA` for EC keys, `CKM_RSA_PKCS` over a DigestInfo
    /// for RSA), without any of the key manager's per-call work. `threads` must be 1 to
    /// [`Self::sessions`]. Blocks for `duration`.
    pub fn raw_sign_rate(
        &self,
        id: &str,
        threads: usize,
        duration: Duration,
    ) -> Result<f64, Error> {
        validate_key_id(id)?;
        if threads == 0 || threads > self.token.size {
            return Err(Error::KeyBackend(format!(
                "pkcs11: raw_sign_rate: threads must be 1 to {} (the session pool)",
                self.token.size
            )));
        }
        let meta = self.token.key_meta(id)?;
        let label = self.token.label_of(id);
        let alg = meta.key_type.x509_algorithm();
        let mut leases = Vec::with_capacity(threads);
        for _ in 0..threads {
            leases.push(self.token.checkout()?);
        }
        let token = &self.token;
        let barrier = Barrier::new(threads);
        let results: Vec<Result<(u64, Duration), Error>> = std::thread::scope(|scope| {
            let handles: Vec<_> = leases
                .into_iter()
                .map(|lease| {
                    let (barrier, label) = (&barrier, &label);
                    scope.spawn(move || {
                        // Mechanism is not Sync: one per thread.
                        let (mechanism, data) = objects::sign_input(alg, b"carapace raw sign rate");
                        let key = lease.session().map(|s| {
                            token
                                .private_key(s, lease.epoch, label, id)
                                .map_err(|e| match e {
                                    token::OpError::Ck(e) => token::call_error(&e),
                                    token::OpError::Core(e) => e,
                                })
                        });
                        barrier.wait();
                        let (Some(s), Some(key)) = (lease.session(), key) else {
                            return Err(Error::KeyBackend("pkcs11: no session".into()));
                        };
                        let key = key?;
                        let start = Instant::now();
                        let mut n = 0u64;
                        while start.elapsed() < duration {
                            s.sign(&mechanism, key, &data)
                                .map_err(|e| token::call_error(&e))?;
                            n += 1;
                        }
                        Ok((n, start.elapsed()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::KeyBackend(
                            "pkcs11: a signing thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        let mut total = 0u64;
        let mut longest = Duration::ZERO;
        for r in results {
            let (n, took) = r?;
            total += n;
            longest = longest.max(took);
        }
        Ok(total as f64 / longest.as_secs_f64().max(f64::EPSILON))
    }

    /// Test hook: finalises and re-initialises the module behind the key manager's back,
    /// which closes every session and drops the login, as a device reset does.
    #[doc(hidden)]
    pub fn testing_simulate_device_reset(&self) -> Result<(), Error> {
        self.token.testing_reset_module()
    }

    /// Test hook: logs the token out behind the key manager's back (every session loses
    /// the login: the next call gets `CKR_USER_NOT_LOGGED_IN`).
    #[doc(hidden)]
    pub fn testing_logout(&self) -> Result<(), Error> {
        self.token.testing_logout()
    }

    /// Test hook: the most sessions ever in use at once (calls that overlapped).
    #[doc(hidden)]
    pub fn testing_max_in_flight(&self) -> usize {
        self.token.max_in_flight()
    }

    /// Test hook: the id of the slot the token was found in.
    #[doc(hidden)]
    pub fn testing_slot_id(&self) -> Option<u64> {
        self.token.slot_id()
    }
}

#[async_trait::async_trait]
impl KeyManager for Pkcs11KeyManager {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeySigner>, Error> {
        validate_key_id(id)?;
        let (token, owned) = (self.token.clone(), id.to_owned());
        let meta = blocking(move || token.generate(&owned, key_type)).await?;
        Ok(self.signer(id, meta))
    }

    async fn get_key(&self, id: &str) -> Result<Arc<dyn KeySigner>, Error> {
        validate_key_id(id).map_err(|_| Error::KeyNotFound(id.to_owned()))?;
        let (token, owned) = (self.token.clone(), id.to_owned());
        let meta = blocking(move || token.key_meta(&owned)).await?;
        Ok(self.signer(id, meta))
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, Error> {
        let token = self.token.clone();
        blocking(move || token.list()).await
    }

    async fn delete_key(&self, id: &str) -> Result<(), Error> {
        validate_key_id(id).map_err(|_| Error::KeyNotFound(id.to_owned()))?;
        let (token, owned) = (self.token.clone(), id.to_owned());
        blocking(move || token.delete(&owned)).await
    }
}
