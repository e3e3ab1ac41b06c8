//! The agent's TPM operations over tss-esapi: the endorsement key and its certificate,
//! a one-attestation AK, ActivateCredential, PCR reads and quotes; and the agent key:
//! TPM2_Create under the storage root key, Load, Sign, and TPM2_Certify by the AK.
//!
//! A [`TpmDevice`] owns one ESAPI context. It is `Send` but not `Sync`: callers keep it
//! in a mutex ([`crate::shared::SharedTpm`]) and call it from blocking threads (a real
//! TPM takes 100-700 ms per signature or key creation).
//!
//! **Transient objects.** A TPM without a resource manager (swtpm, `/dev/tpm0`) has
//! only three transient object slots. Every method flushes what it loads on every path,
//! except the results meant to stay loaded for the caller, [`Ek`], [`Ak`] and
//! [`LoadedKey`]: give them back with [`TpmDevice::flush_ek`] / [`TpmDevice::flush_ak`]
//! / [`TpmDevice::flush_key`], successfully or not (dropping the `TpmDevice` also
//! flushes them), or swap the EK and AK out with [`TpmDevice::save_ek`] /
//! [`TpmDevice::save_ak`] (TPM2_ContextSave, then flush) while waiting for the server.
//! [`TpmDevice::open`] flushes objects and sessions leaked by earlier processes.
//!
//! One attestation, agent side (slots in use on the right):
//! ```text
//! let ek = tpm.ek()?;                        // EK public + certificate      1
//! let ak = tpm.create_ak(&ek)?;              // AK public                    2
//! let ak = tpm.save_ak(ak)?; let ek = tpm.save_ek(ek)?;                   // 0
//! ...send Payload, receive Challenge...
//! let ek = tpm.restore_ek(ek)?; let ak = tpm.restore_ak(ak)?;             // 2
//! let secret = tpm.activate_credential(&ak, &ek, &blob, &encrypted_secret)?;
//! tpm.flush_ek(ek)?;                                                      // 1
//! let key = tpm.load_key(&agent_key_blob)?;  // SRK + key, SRK flushed      2
//! let certification = tpm.certify(&key, &ak, &nonce)?;
//! tpm.flush_key(key)?;                                                    // 1
//! let pcrs = tpm.pcr_read_sha256(&selection)?;
//! let quote = tpm.quote(&ak, &nonce, &selection)?;
//! tpm.flush_ak(ak)?;                                                      // 0
//! ```

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek as tss_ek, nv};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};
use tss_esapi::constants::tss::{
    TPM2_LOADED_SESSION_FIRST, TPM2_NV_INDEX_FIRST, TPM2_RH_NULL, TPM2_ST_HASHCHECK,
    TPM2_TRANSIENT_FIRST,
};
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{
    AuthHandle, KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{
    HashingAlgorithm, PublicAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest, EccParameter, EccPoint, EccScheme, EncryptedSecret, HashScheme,
    HashcheckTicket, IdObject, MaxNvBuffer, PcrSelectionList, PcrSelectionListBuilder, PcrSlot,
    Private, Public, PublicBuilder, PublicEccParametersBuilder, Signature, SignatureScheme,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::utils::TpmsContext;
use tss_esapi::{Context, TctiNameConf};

use carapace_core::Error;

type Result<T> = std::result::Result<T, Error>;
type TssError = tss_esapi::Error;

/// NV indices the TCG EK Credential Profile reserves for EK chain (intermediate CA)
/// certificates.
const NV_EK_CHAIN_FIRST: u32 = 0x01c0_0100;
const NV_EK_CHAIN_LAST: u32 = 0x01c0_01ff;
/// The highest PCR index accepted (PC Client TPMs have 24).
const MAX_PCR: u8 = 23;
/// PCRs per TPM2_PCR_Read: the TPM returns at most eight digests per call.
const PCRS_PER_READ: usize = 8;

/// The EK templates (TCG EK Credential Profile, low and high range) this module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EkAlgorithm {
    /// RSA-2048, nameAlg SHA-256, AES-128-CFB; certificate at NV 0x01c00002.
    Rsa2048,
    /// NIST P-256, nameAlg SHA-256, AES-128-CFB; certificate at NV 0x01c0000a.
    EccP256,
    /// NIST P-384, nameAlg SHA-384, AES-256-CFB (high range template, userWithAuth
    /// set); certificate at NV 0x01c00016. swtpm 0.7.1's ECC EK.
    EccP384,
}

impl EkAlgorithm {
    /// The order [`TpmDevice::ek`] tries: the first whose certificate exists wins.
    pub const PREFERENCE: [EkAlgorithm; 3] = [
        EkAlgorithm::Rsa2048,
        EkAlgorithm::EccP384,
        EkAlgorithm::EccP256,
    ];

    /// The NV index of this EK type's certificate.
    pub const fn cert_nv_index(self) -> u32 {
        match self {
            EkAlgorithm::Rsa2048 => 0x01c0_0002,
            EkAlgorithm::EccP256 => 0x01c0_000a,
            EkAlgorithm::EccP384 => 0x01c0_0016,
        }
    }

    /// A short name: `rsa2048`, `p256`, `p384`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EkAlgorithm::Rsa2048 => "rsa2048",
            EkAlgorithm::EccP256 => "p256",
            EkAlgorithm::EccP384 => "p384",
        }
    }

    const fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkAlgorithm::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkAlgorithm::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            EkAlgorithm::EccP384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
        }
    }
}

impl fmt::Display for EkAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The endorsement key, loaded in the TPM until [`TpmDevice::flush_ek`].
#[derive(Debug)]
#[must_use = "the EK stays loaded in the TPM: give it back with TpmDevice::flush_ek"]
pub struct Ek {
    /// Which template it was created from.
    pub algorithm: EkAlgorithm,
    /// Its public area, a marshalled TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// Its Name as the TPM reports it (`u16 nameAlg || digest`).
    pub name: Vec<u8>,
    /// The EK certificate from NV (DER, possibly with trailing padding), if present.
    pub cert: Option<Vec<u8>>,
    /// Certificates found in the EK chain NV range (0x01c00100-0x01c001ff), DER, in
    /// index order; usually none.
    pub intermediates: Vec<Vec<u8>>,
    handle: KeyHandle,
    user_with_auth: bool,
}

impl Ek {
    /// The ESAPI handle of the loaded EK.
    pub fn handle(&self) -> KeyHandle {
        self.handle
    }
}

/// An attestation key (restricted signing key under the EK), loaded in the TPM until
/// [`TpmDevice::flush_ak`]. It lives for one attestation only.
#[derive(Debug)]
#[must_use = "the AK stays loaded in the TPM: give it back with TpmDevice::flush_ak"]
pub struct Ak {
    /// Its public area, a marshalled TPMT_PUBLIC (ECDSA P-256 SHA-256, or RSA-2048
    /// RSASSA SHA-256 on TPMs without ECC).
    pub public: Vec<u8>,
    /// Its Name as the TPM reports it (`u16 nameAlg || digest`): what the server makes
    /// the credential for.
    pub name: Vec<u8>,
    handle: KeyHandle,
}

impl Ak {
    /// The ESAPI handle of the loaded AK.
    pub fn handle(&self) -> KeyHandle {
        self.handle
    }
}

/// A TPM2_Quote result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// The signed structure, a marshalled TPMS_ATTEST (the bytes the signature covers).
    pub attest: Vec<u8>,
    /// The AK's signature, a marshalled TPMT_SIGNATURE.
    pub signature: Vec<u8>,
}

/// A TPM2_Certify result: the AK's statement that an object (the agent key) is loaded
/// in the same TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certification {
    /// The signed structure, a marshalled TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY.
    pub attest: Vec<u8>,
    /// The AK's signature over `attest`, a marshalled TPMT_SIGNATURE.
    pub signature: Vec<u8>,
}

/// A key created in the TPM, in the form kept on disk: the TPM holds nothing between
/// uses. The private area is encrypted and integrity-protected by the TPM under the
/// storage root key (SRK), which the TPM re-derives from its owner seed: only the TPM
/// that created the key can load it again.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyBlob {
    /// The public area, a marshalled TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// The contents of the TPM2B_PRIVATE `TPM2_Create` returned (the sensitive area
    /// wrapped by the SRK, never in the clear outside the TPM).
    pub private: Vec<u8>,
}

impl fmt::Debug for KeyBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBlob")
            .field("public", &hex::encode(&self.public))
            .field("private_len", &self.private.len())
            .finish()
    }
}

/// A [`KeyBlob`] loaded in the TPM until [`TpmDevice::flush_key`].
#[derive(Debug)]
#[must_use = "the key stays loaded in the TPM: give it back with TpmDevice::flush_key"]
pub struct LoadedKey {
    /// Its Name as the TPM reports it (`u16 nameAlg || digest`).
    pub name: Vec<u8>,
    handle: KeyHandle,
}

impl LoadedKey {
    /// The ESAPI handle of the loaded key.
    pub fn handle(&self) -> KeyHandle {
        self.handle
    }
}

/// An ECDSA signature as the TPM returns it: big-endian `r` and `s`, each at most 32
/// bytes for P-256 and possibly shorter (leading zeros stripped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcdsaSignature {
    /// `r`, big-endian.
    pub r: Vec<u8>,
    /// `s`, big-endian.
    pub s: Vec<u8>,
}

/// An [`Ek`] or [`Ak`] swapped out of the TPM (TPM2_ContextSave, then flushed): it
/// holds no object slot until [`TpmDevice::restore_ek`] / [`TpmDevice::restore_ak`]
/// loads it again. An attestation keeps its EK and AK like this between the payload
/// and the server's challenge, so other users of the TPM (the agent key's signatures)
/// have all three slots of a TPM without resource manager meanwhile. A saved context
/// is only valid until the TPM restarts; dropping it needs no TPM call.
#[derive(Debug)]
pub struct Saved<T> {
    object: T,
    context: TpmsContext,
}

impl<T> Saved<T> {
    /// The object's description (its handle is not valid while it is saved).
    pub fn object(&self) -> &T {
        &self.object
    }
}

/// Objects that can be swapped out with TPM2_ContextSave.
trait Swappable {
    const WHAT: &'static str;
    fn handle_mut(&mut self) -> &mut KeyHandle;
}

impl Swappable for Ek {
    const WHAT: &'static str = "EK";
    fn handle_mut(&mut self) -> &mut KeyHandle {
        &mut self.handle
    }
}

impl Swappable for Ak {
    const WHAT: &'static str = "AK";
    fn handle_mut(&mut self) -> &mut KeyHandle {
        &mut self.handle
    }
}

/// The storage root key template: the TCG Provisioning Guidance SRK (ECC NIST P-256
/// storage key, nameAlg SHA-256, AES-128-CFB, fixedTPM, fixedParent,
/// sensitiveDataOrigin, userWithAuth, noDA, restricted, decrypt; unique x and y 32
/// zero bytes each). CreatePrimary with the same template in the owner hierarchy
/// always yields the same key (until TPM2_Clear), so blobs made under it load again
/// after a restart without anything persistent in the TPM.
pub fn srk_template() -> std::result::Result<Public, TssError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .with_sign_encrypt(false)
        .build()?;
    let zero = EccParameter::try_from(vec![0u8; 32])?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(zero.clone(), zero))
        .build()
}

/// The agent key template: an unrestricted ECC NIST P-256 signing key, ECDSA with
/// SHA-256, nameAlg SHA-256, fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth
/// (empty auth), sign, not decrypt: generated in the TPM and never leaving it.
pub fn signing_key_template() -> std::result::Result<Public, TssError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .with_restricted(false)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A TPM opened through one TCTI.
///
/// After an [`Error::KeyUnavailable`] caused by the transport (TPM gone, I/O error) the
/// ESAPI context refuses every further command: drop the device and open it again.
#[derive(Debug)]
pub struct TpmDevice {
    ctx: Context,
    tcti: String,
    /// Set when a command failed in the transport: the context is unusable.
    broken: Cell<bool>,
}

impl TpmDevice {
    /// Opens the TPM behind `tcti` (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`,
    /// or any tpm2-tss TCTI string) and flushes transient objects and sessions leaked by
    /// earlier processes (a TPM without resource manager keeps them until restart).
    ///
    /// Fails with [`Error::KeyUnavailable`] naming the TCTI when it cannot be reached.
    pub fn open(tcti: &str) -> Result<TpmDevice> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| {
            Error::KeyUnavailable(format!(
                "tpm: bad TCTI `{tcti}`: {e} (expected e.g. `device:/dev/tpmrm0` or \
                 `swtpm:host=127.0.0.1,port=2321`)"
            ))
        })?;
        let ctx = Context::new(conf).map_err(|e| {
            Error::KeyUnavailable(format!(
                "tpm ({tcti}): cannot open: {}; {}",
                describe(&e),
                reach_hint(tcti)
            ))
        })?;
        let mut dev = TpmDevice {
            ctx,
            tcti: tcti.to_owned(),
            broken: Cell::new(false),
        };
        dev.flush_leaked()?;
        Ok(dev)
    }

    /// The TCTI string this device was opened with.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// Whether a command failed in the transport (TPM gone, I/O error): ESAPI refuses
    /// every further command on this context, so drop it and open the TPM again.
    pub fn is_broken(&self) -> bool {
        self.broken.get()
    }

    /// The EK to attest with: the first of [`EkAlgorithm::PREFERENCE`] whose certificate
    /// is in NV; RSA-2048 without certificate if none has one (the server may accept
    /// it by an allowlist of EK public key hashes).
    pub fn ek(&mut self) -> Result<Ek> {
        let nv = self.nv_indices()?;
        let alg = EkAlgorithm::PREFERENCE
            .into_iter()
            .find(|a| nv.contains(&a.cert_nv_index()))
            .unwrap_or(EkAlgorithm::Rsa2048);
        self.ek_with(alg, &nv)
    }

    /// The EK of one template, with its certificate if NV has one.
    pub fn ek_of(&mut self, algorithm: EkAlgorithm) -> Result<Ek> {
        let nv = self.nv_indices()?;
        self.ek_with(algorithm, &nv)
    }

    fn ek_with(&mut self, algorithm: EkAlgorithm, nv: &BTreeSet<u32>) -> Result<Ek> {
        let template =
            tss_ek::create_ek_public_from_default_template_2(algorithm.selection(), None)
                .map_err(|e| self.error(&format!("building the {algorithm} EK template"), e))?;
        let handle = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .map_err(|e| self.error(&format!("creating the {algorithm} EK"), e))?
            .key_handle;
        match self.describe_ek(algorithm, handle, nv) {
            Ok(ek) => Ok(ek),
            Err(e) => {
                self.flush_quietly(handle.into());
                Err(e)
            }
        }
    }

    fn describe_ek(
        &mut self,
        algorithm: EkAlgorithm,
        handle: KeyHandle,
        nv: &BTreeSet<u32>,
    ) -> Result<Ek> {
        let (public, name) = self.read_public(handle, "EK")?;
        let user_with_auth = public.object_attributes().user_with_auth();
        let public = public
            .marshall()
            .map_err(|e| self.error("encoding the EK public area", e))?;
        let cert = if nv.contains(&algorithm.cert_nv_index()) {
            Some(self.read_nv(algorithm.cert_nv_index()).map_err(|e| {
                self.error(
                    &format!(
                        "reading the {algorithm} EK certificate (NV {:#010x})",
                        algorithm.cert_nv_index()
                    ),
                    e,
                )
            })?)
        } else {
            None
        };
        let mut intermediates = Vec::new();
        for &index in nv.range(NV_EK_CHAIN_FIRST..=NV_EK_CHAIN_LAST) {
            // Optional: a chain index we cannot read is left to the server's roots.
            match self.read_nv(index) {
                Ok(bytes) => intermediates.extend(split_der_certificates(&bytes)),
                Err(e) => tracing::warn!(
                    tcti = %self.tcti,
                    "tpm: skipping EK chain NV {index:#010x}: {}",
                    describe(&e)
                ),
            }
        }
        Ok(Ek {
            algorithm,
            public,
            name,
            cert,
            intermediates,
            handle,
            user_with_auth,
        })
    }

    /// Creates and loads an AK under `ek`: ECDSA P-256 with SHA-256 (restricted, sign,
    /// fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, empty auth), or RSA-2048
    /// RSASSA SHA-256 if the TPM refuses ECC.
    pub fn create_ak(&mut self, ek: &Ek) -> Result<Ak> {
        let created = match ak::create_ak_2(
            &mut self.ctx,
            ek.handle,
            HashingAlgorithm::Sha256,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
            None,
            None,
        ) {
            Ok(created) => created,
            // Only a TPM that refuses ECC gets an RSA AK; a failing TPM is reported as is.
            Err(ecc) if classify(&ecc) != Class::Tpm => {
                return Err(self.error("creating an ECDSA P-256 AK", ecc));
            }
            Err(ecc) => ak::create_ak_2(
                &mut self.ctx,
                ek.handle,
                HashingAlgorithm::Sha256,
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                SignatureSchemeAlgorithm::RsaSsa,
                None,
                None,
            )
            .map_err(|rsa| {
                self.error(
                    &format!(
                        "creating an AK (ECDSA P-256 failed: {}; RSA-2048 failed too)",
                        describe(&ecc)
                    ),
                    rsa,
                )
            })?,
        };
        let handle = ak::load_ak(
            &mut self.ctx,
            ek.handle,
            None,
            created.out_private,
            created.out_public,
        )
        .map_err(|e| self.error("loading the AK", e))?;
        match self.read_public(handle, "AK") {
            Ok((public, name)) => match public.marshall() {
                Ok(public) => Ok(Ak {
                    public,
                    name,
                    handle,
                }),
                Err(e) => {
                    self.flush_quietly(handle.into());
                    Err(self.error("encoding the AK public area", e))
                }
            },
            Err(e) => {
                self.flush_quietly(handle.into());
                Err(e)
            }
        }
    }

    /// TPM2_ActivateCredential: recovers the secret of a credential made for `ak`'s
    /// Name and encrypted to `ek` (see [`crate::credential::make_credential`]).
    /// `credential_blob` and `encrypted_secret` are the contents of TPM2B_ID_OBJECT and
    /// TPM2B_ENCRYPTED_SECRET.
    ///
    /// The EK's authorisation is PolicySecret(endorsement) for the low-range templates
    /// (RSA-2048, P-256) and its empty password for the high range (P-384). A credential
    /// made for another key or another TPM fails with [`Error::AttestationRejected`]
    /// (the TPM's integrity check).
    pub fn activate_credential(
        &mut self,
        ak: &Ak,
        ek: &Ek,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>> {
        let blob = IdObject::try_from(credential_blob.to_vec()).map_err(|e| {
            Error::AttestationRejected(format!(
                "tpm: credential blob of {} bytes: {e}",
                credential_blob.len()
            ))
        })?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(|e| {
            Error::AttestationRejected(format!(
                "tpm: encrypted secret of {} bytes: {e}",
                encrypted_secret.len()
            ))
        })?;

        let hmac = self.start_session(SessionType::Hmac, HashingAlgorithm::Sha256)?;
        let ek_auth = if ek.user_with_auth {
            Ok(AuthSession::Password)
        } else {
            self.policy_secret_endorsement()
        };
        let result = match ek_auth {
            Ok(ek_auth) => {
                self.ctx.set_sessions((Some(hmac), Some(ek_auth), None));
                let r = self
                    .ctx
                    .activate_credential(ak.handle, ek.handle, blob, secret);
                self.ctx.clear_sessions();
                if ek_auth != AuthSession::Password {
                    self.flush_session(ek_auth);
                }
                r.map(|digest| digest.value().to_vec()).map_err(|e| {
                    if is_tpm_refusal(&e) {
                        Error::AttestationRejected(format!(
                            "tpm ({}): ActivateCredential refused the credential: {} (made \
                             for another AK or another TPM's EK?)",
                            self.tcti,
                            describe(&e)
                        ))
                    } else {
                        self.error("ActivateCredential", e)
                    }
                })
            }
            Err(e) => Err(e),
        };
        self.flush_session(hmac);
        result
    }

    /// A policy session (SHA-256) satisfied with PolicySecret(TPM_RH_ENDORSEMENT): the
    /// low-range EK templates' policy A. The caller flushes it.
    fn policy_secret_endorsement(&mut self) -> Result<AuthSession> {
        let session = self.start_session(SessionType::Policy, HashingAlgorithm::Sha256)?;
        let r = PolicySession::try_from(session).and_then(|policy| {
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
        });
        match r {
            Ok(_) => Ok(session),
            Err(e) => {
                self.flush_session(session);
                Err(self.error("PolicySecret(endorsement) for the EK", e))
            }
        }
    }

    fn start_session(&mut self, kind: SessionType, hash: HashingAlgorithm) -> Result<AuthSession> {
        self.ctx
            .start_auth_session(
                None,
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                hash,
            )
            .map_err(|e| self.error("starting an auth session", e))?
            .ok_or_else(|| {
                Error::KeyBackend(format!(
                    "tpm ({}): StartAuthSession returned no session",
                    self.tcti
                ))
            })
    }

    /// Reads the SHA-256 bank values of `pcrs` (indices 0..=23; duplicates ignored),
    /// eight per TPM2_PCR_Read.
    pub fn pcr_read_sha256(&mut self, pcrs: &[u8]) -> Result<BTreeMap<u8, Vec<u8>>> {
        let mut remaining = pcr_set(pcrs)?;
        let mut values = BTreeMap::new();
        while !remaining.is_empty() {
            let chunk: Vec<u8> = remaining.iter().take(PCRS_PER_READ).copied().collect();
            let selection = pcr_selection(&chunk)?;
            let (_, read, digests) = self
                .ctx
                .execute_without_session(|c| c.pcr_read(selection))
                .map_err(|e| self.error("PCR_Read", e))?;
            let mut got: Vec<u8> = read
                .get_selections()
                .iter()
                .filter(|s| s.hashing_algorithm() == HashingAlgorithm::Sha256)
                .flat_map(|s| s.selected())
                .filter_map(pcr_index)
                .collect();
            got.sort_unstable();
            got.dedup();
            if got.is_empty() || got.len() != digests.len() {
                return Err(Error::KeyBackend(format!(
                    "tpm ({}): PCR_Read of sha256 PCRs {chunk:?} returned {} digests for \
                     PCRs {got:?}: is the sha256 PCR bank allocated?",
                    self.tcti,
                    digests.len()
                )));
            }
            for (index, digest) in got.into_iter().zip(digests.value()) {
                if remaining.remove(&index) {
                    values.insert(index, digest.value().to_vec());
                }
            }
        }
        Ok(values)
    }

    /// TPM2_Quote of the SHA-256 bank `pcrs` with `nonce` as qualifying data (at most
    /// 64 bytes), signed by `ak` with its own scheme.
    pub fn quote(&mut self, ak: &Ak, nonce: &[u8], pcrs: &[u8]) -> Result<Quote> {
        let data = Data::try_from(nonce.to_vec()).map_err(|e| {
            Error::AttestationRejected(format!("tpm: quote nonce of {} bytes: {e}", nonce.len()))
        })?;
        let indices: Vec<u8> = pcr_set(pcrs)?.into_iter().collect();
        let selection = pcr_selection(&indices)?;
        let (attest, signature) = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.quote(ak.handle, data, SignatureScheme::Null, selection)
            })
            .map_err(|e| self.error("Quote", e))?;
        let attest = attest
            .marshall()
            .map_err(|e| self.error("encoding the quote", e))?;
        let signature = signature
            .marshall()
            .map_err(|e| self.error("encoding the quote signature", e))?;
        Ok(Quote { attest, signature })
    }

    /// Swaps the EK out of the TPM: its context is saved and the object flushed, so it
    /// holds no slot until [`TpmDevice::restore_ek`]. On failure the EK is flushed.
    pub fn save_ek(&mut self, ek: Ek) -> Result<Saved<Ek>> {
        self.save(ek)
    }

    /// Loads a saved EK again.
    pub fn restore_ek(&mut self, saved: Saved<Ek>) -> Result<Ek> {
        self.restore(saved)
    }

    /// Swaps the AK out of the TPM (see [`TpmDevice::save_ek`]).
    pub fn save_ak(&mut self, ak: Ak) -> Result<Saved<Ak>> {
        self.save(ak)
    }

    /// Loads a saved AK again.
    pub fn restore_ak(&mut self, saved: Saved<Ak>) -> Result<Ak> {
        self.restore(saved)
    }

    fn save<T: Swappable>(&mut self, mut object: T) -> Result<Saved<T>> {
        let handle = *object.handle_mut();
        let saved = self.ctx.context_save(handle.into());
        // Flushed on every path: the saved context (if any) is independent of the slot.
        let flushed = self.ctx.flush_context(handle.into());
        let context =
            saved.map_err(|e| self.error(&format!("saving the {} context", T::WHAT), e))?;
        flushed.map_err(|e| self.error(&format!("flushing the saved {}", T::WHAT), e))?;
        Ok(Saved { object, context })
    }

    fn restore<T: Swappable>(&mut self, saved: Saved<T>) -> Result<T> {
        let Saved {
            mut object,
            context,
        } = saved;
        let handle = self.ctx.context_load(context).map_err(|e| {
            self.error(
                &format!(
                    "loading the saved {} context (did the TPM restart meanwhile?)",
                    T::WHAT
                ),
                e,
            )
        })?;
        *object.handle_mut() = handle.into();
        Ok(object)
    }

    /// CreatePrimary of the storage root key ([`srk_template`]) in the owner hierarchy
    /// (empty owner auth). The caller flushes it.
    fn create_srk(&mut self) -> Result<KeyHandle> {
        let template = srk_template().map_err(|e| self.error("building the SRK template", e))?;
        Ok(self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|e| self.error("creating the storage root key (owner hierarchy)", e))?
            .key_handle)
    }

    /// TPM2_Create of an ECDSA P-256 signing key ([`signing_key_template`]) under the
    /// storage root key; nothing stays loaded. The private key is generated in the TPM
    /// and leaves it only encrypted by the SRK, in [`KeyBlob::private`].
    pub fn create_signing_key(&mut self) -> Result<KeyBlob> {
        let template =
            signing_key_template().map_err(|e| self.error("building the key template", e))?;
        let srk = self.create_srk()?;
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create(srk, template, None, None, None, None)
            });
        let flushed = self.ctx.flush_context(srk.into());
        let created = created.map_err(|e| self.error("creating the key (TPM2_Create)", e))?;
        flushed.map_err(|e| self.error("flushing the storage root key", e))?;
        let public = created
            .out_public
            .marshall()
            .map_err(|e| self.error("encoding the key's public area", e))?;
        Ok(KeyBlob {
            public,
            private: created.out_private.value().to_vec(),
        })
    }

    /// Loads `blob` under a fresh storage root key (flushed right after the load: a
    /// loaded object does not need its parent). Uses two slots during the load, one
    /// after. Fails with [`Error::KeyBackend`] naming the integrity check when the blob
    /// was made by another TPM (or the owner hierarchy was cleared since).
    pub fn load_key(&mut self, blob: &KeyBlob) -> Result<LoadedKey> {
        let public = Public::unmarshall(&blob.public).map_err(|e| {
            Error::KeyBackend(format!("tpm: the key's public area does not parse: {e}"))
        })?;
        let private = Private::try_from(blob.private.clone()).map_err(|e| {
            Error::KeyBackend(format!(
                "tpm: the key's private blob ({} bytes) is not a TPM2B_PRIVATE: {e}",
                blob.private.len()
            ))
        })?;
        let srk = self.create_srk()?;
        let loaded = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(srk, private, public)
            });
        let flushed = self.ctx.flush_context(srk.into());
        let handle = match loaded {
            Ok(handle) => handle,
            Err(e) => {
                let what = if is_tpm_refusal(&e) {
                    "loading the key (TPM2_Load refused the blob: it was made by another TPM,                      or the owner hierarchy was cleared since)"
                } else {
                    "loading the key (TPM2_Load)"
                };
                return Err(self.error(what, e));
            }
        };
        if let Err(e) = flushed {
            self.flush_quietly(handle.into());
            return Err(self.error("flushing the storage root key", e));
        }
        match self.ctx.execute_without_session(|c| c.read_public(handle)) {
            Ok((_, name, _)) => Ok(LoadedKey {
                name: name.value().to_vec(),
                handle,
            }),
            Err(e) => {
                self.flush_quietly(handle.into());
                Err(self.error("ReadPublic of the loaded key", e))
            }
        }
    }

    /// Flushes a loaded key.
    pub fn flush_key(&mut self, key: LoadedKey) -> Result<()> {
        self.ctx
            .flush_context(key.handle.into())
            .map_err(|e| self.error("flushing the key", e))
    }

    /// Signs a SHA-256 `digest` with the key in `blob`: load it (under a fresh SRK),
    /// TPM2_Sign with its ECDSA-SHA256 scheme, a password session and a null hashcheck
    /// ticket, flush it. Nothing stays loaded on any path; at most two slots are used.
    pub fn sign_digest(&mut self, blob: &KeyBlob, digest: &[u8; 32]) -> Result<EcdsaSignature> {
        let key = self.load_key(blob)?;
        let signed = self.sign_loaded(&key, digest);
        let flushed = self.flush_key(key);
        let signature = signed?;
        flushed?;
        Ok(signature)
    }

    fn sign_loaded(&mut self, key: &LoadedKey, digest: &[u8; 32]) -> Result<EcdsaSignature> {
        let digest =
            Digest::try_from(digest.to_vec()).map_err(|e| self.error("building the digest", e))?;
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|e| self.error("building the null hashcheck ticket", e))?;
        let signature = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.sign(key.handle, digest, SignatureScheme::Null, ticket)
            })
            .map_err(|e| self.error("signing (TPM2_Sign)", e))?;
        match signature {
            Signature::EcDsa(s) => Ok(EcdsaSignature {
                r: s.signature_r().value().to_vec(),
                s: s.signature_s().value().to_vec(),
            }),
            other => Err(Error::KeyBackend(format!(
                "tpm ({}): TPM2_Sign returned a {:?} signature, expected ECDSA",
                self.tcti,
                other.algorithm()
            ))),
        }
    }

    /// TPM2_Certify: `ak` signs that `key` is loaded in this TPM (its Name), with
    /// `nonce` (at most 64 bytes) as qualifying data. Both objects authorise with their
    /// empty password.
    pub fn certify(&mut self, key: &LoadedKey, ak: &Ak, nonce: &[u8]) -> Result<Certification> {
        let data = Data::try_from(nonce.to_vec()).map_err(|e| {
            Error::AttestationRejected(format!("tpm: certify nonce of {} bytes: {e}", nonce.len()))
        })?;
        let (attest, signature) = self
            .ctx
            .execute_with_sessions(
                (
                    Some(AuthSession::Password),
                    Some(AuthSession::Password),
                    None,
                ),
                |c| c.certify(key.handle.into(), ak.handle, data, SignatureScheme::Null),
            )
            .map_err(|e| self.error("Certify", e))?;
        let attest = attest
            .marshall()
            .map_err(|e| self.error("encoding the certification", e))?;
        let signature = signature
            .marshall()
            .map_err(|e| self.error("encoding the certification signature", e))?;
        Ok(Certification { attest, signature })
    }

    /// Flushes the EK from the TPM.
    pub fn flush_ek(&mut self, ek: Ek) -> Result<()> {
        self.ctx
            .flush_context(ek.handle.into())
            .map_err(|e| self.error("flushing the EK", e))
    }

    /// Flushes the AK from the TPM (it cannot be loaded again: its private blob is
    /// not kept).
    pub fn flush_ak(&mut self, ak: Ak) -> Result<()> {
        self.ctx
            .flush_context(ak.handle.into())
            .map_err(|e| self.error("flushing the AK", e))
    }

    /// The TPM handles of loaded transient objects and sessions. Between attestations
    /// this is empty (a TPM behind a resource manager shows only this connection's).
    pub fn loaded_handles(&mut self) -> Result<Vec<u32>> {
        let mut handles = self.handles(TPM2_TRANSIENT_FIRST)?;
        handles.extend(self.handles(TPM2_LOADED_SESSION_FIRST)?);
        Ok(handles)
    }

    /// Flushes every loaded transient object and session, this process's or not.
    fn flush_leaked(&mut self) -> Result<()> {
        for handle in self.loaded_handles()? {
            let r = TpmHandle::try_from(handle).and_then(|tpm_handle| {
                let object = self
                    .ctx
                    .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))?;
                self.ctx.flush_context(object)
            });
            match r {
                Ok(()) => tracing::info!(
                    tcti = %self.tcti,
                    "tpm: flushed handle {handle:#010x} left loaded by an earlier process"
                ),
                Err(e) => tracing::warn!(
                    tcti = %self.tcti,
                    "tpm: cannot flush leaked handle {handle:#010x}: {}",
                    describe(&e)
                ),
            }
        }
        Ok(())
    }

    /// Handles of the type of `first`, from `first` up.
    fn handles(&mut self, first: u32) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut next = first;
        loop {
            let (data, more) = self
                .ctx
                .execute_without_session(|c| c.get_capability(CapabilityType::Handles, next, 64))
                .map_err(|e| self.error("GetCapability(handles)", e))?;
            let CapabilityData::Handles(list) = data else {
                return Err(Error::KeyBackend(format!(
                    "tpm ({}): GetCapability(handles) answered another capability",
                    self.tcti
                )));
            };
            let page: Vec<u32> = list.iter().map(|h| u32::from(*h)).collect();
            let last = page.last().copied();
            out.extend(page);
            match last {
                Some(last) if more && last < u32::MAX => next = last + 1,
                _ => break,
            }
        }
        // A page never crosses into another handle type, but be exact.
        out.retain(|h| h >> 24 == first >> 24);
        Ok(out)
    }

    fn nv_indices(&mut self) -> Result<BTreeSet<u32>> {
        Ok(self.handles(TPM2_NV_INDEX_FIRST)?.into_iter().collect())
    }

    /// Reads a whole NV index with its own (empty) auth, or the owner's if the index
    /// has no AUTHREAD.
    fn read_nv(&mut self, index: u32) -> std::result::Result<Vec<u8>, TssError> {
        let tpm_handle = NvIndexTpmHandle::new(index)?;
        let mut object = self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))?;
        let r = self.read_nv_handle(NvIndexHandle::from(object));
        if let Err(e) = self.ctx.tr_close(&mut object) {
            tracing::debug!("tpm: closing the ESYS handle of NV {index:#010x}: {e}");
        }
        r
    }

    fn read_nv_handle(&mut self, handle: NvIndexHandle) -> std::result::Result<Vec<u8>, TssError> {
        let (public, _) = self
            .ctx
            .execute_without_session(|c| c.nv_read_public(handle))?;
        let auth = if public.attributes().auth_read() {
            NvAuth::NvIndex(handle)
        } else {
            NvAuth::Owner
        };
        let size = public.data_size();
        let chunk = nv::max_nv_buffer_size(&mut self.ctx)?.clamp(1, MaxNvBuffer::MAX_SIZE);
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            let want = chunk.min(size - out.len());
            let (Ok(want), Ok(offset)) = (u16::try_from(want), u16::try_from(out.len())) else {
                break;
            };
            let data = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.nv_read(auth, handle, want, offset)
                })?;
            if data.is_empty() {
                break;
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    fn read_public(&mut self, handle: KeyHandle, what: &str) -> Result<(Public, Vec<u8>)> {
        let (public, name, _) = self
            .ctx
            .execute_without_session(|c| c.read_public(handle))
            .map_err(|e| self.error(&format!("ReadPublic of the {what}"), e))?;
        Ok((public, name.value().to_vec()))
    }

    /// Flushes an object on an error path; a failure is logged (the error being
    /// returned matters more).
    fn flush_quietly(&mut self, handle: ObjectHandle) {
        if let Err(e) = self.ctx.flush_context(handle) {
            tracing::warn!(tcti = %self.tcti, "tpm: flushing after an error: {}", describe(&e));
        }
    }

    fn flush_session(&mut self, session: AuthSession) {
        self.flush_quietly(SessionHandle::from(session).into());
    }

    /// A TPM error as Carapace's: unreachable TPM, full TPM or busy TPM are
    /// [`Error::KeyUnavailable`], the rest [`Error::KeyBackend`].
    fn error(&self, what: &str, e: TssError) -> Error {
        let text = format!("tpm ({}): {what}: {}", self.tcti, describe(&e));
        match classify(&e) {
            Class::Transport => {
                self.broken.set(true);
                Error::KeyUnavailable(format!(
                    "{text}; {} (then open the device again: this connection is unusable)",
                    reach_hint(&self.tcti)
                ))
            }
            Class::OutOfSlots => Error::KeyUnavailable(format!(
                "{text}; the TPM is out of object or session slots: on a TPM without a \
                 resource manager another program leaked them (use device:/dev/tpmrm0, or \
                 run `tpm2_flushcontext -t -s` / restart the agent)"
            )),
            Class::Busy => Error::KeyUnavailable(format!("{text}; the TPM is busy, retry later")),
            Class::Tpm | Class::Other => Error::KeyBackend(text),
        }
    }
}

/// How a tss-esapi error should be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The TCTI could not talk to the TPM.
    Transport,
    /// TPM_RC_OBJECT_MEMORY / SESSION_MEMORY / MEMORY.
    OutOfSlots,
    /// Retry, yielded, testing, NV rate, lockout...
    Busy,
    /// The TPM refused the command.
    Tpm,
    /// The software stack failed.
    Other,
}

/// TSS2 response code layers (bits 16-23).
const LAYER_TPM: u32 = 0;
const LAYER_TCTI: u32 = 10;
const LAYER_ESAPI: u32 = 7;
const LAYER_SYS: u32 = 8;
/// TSS2 base codes meaning "the connection failed".
const BASE_RC_BAD_SEQUENCE: u32 = 7;
const BASE_RC_NO_CONNECTION: u32 = 8;
const BASE_RC_TRY_AGAIN: u32 = 9;
const BASE_RC_IO_ERROR: u32 = 10;

fn classify(e: &TssError) -> Class {
    let Some(rc) = raw_rc(e) else {
        return Class::Other;
    };
    let layer = (rc >> 16) & 0xff;
    let base = rc & 0xffff;
    if layer == LAYER_TCTI
        || ((layer == LAYER_ESAPI || layer == LAYER_SYS)
            && matches!(
                base,
                // ESAPI answers BAD_SEQUENCE to every command after a failed exchange.
                BASE_RC_BAD_SEQUENCE | BASE_RC_TRY_AGAIN | BASE_RC_IO_ERROR | BASE_RC_NO_CONNECTION
            ))
    {
        return Class::Transport;
    }
    if layer != LAYER_TPM {
        return Class::Other;
    }
    let TssError::Tss2Error(code) = e else {
        return Class::Other;
    };
    match code.kind() {
        Some(
            Tss2ResponseCodeKind::ObjectMemory
            | Tss2ResponseCodeKind::SessionMemory
            | Tss2ResponseCodeKind::Memory,
        ) => Class::OutOfSlots,
        Some(
            Tss2ResponseCodeKind::Retry
            | Tss2ResponseCodeKind::Yielded
            | Tss2ResponseCodeKind::Testing
            | Tss2ResponseCodeKind::Canceled
            | Tss2ResponseCodeKind::NvRate
            | Tss2ResponseCodeKind::NvUnavailable
            | Tss2ResponseCodeKind::Lockout,
        ) => Class::Busy,
        _ => Class::Tpm,
    }
}

/// A TPM-layer error that is not a warning: the TPM looked at the input and refused.
fn is_tpm_refusal(e: &TssError) -> bool {
    classify(e) == Class::Tpm
}

/// The raw TSS2_RC of an error, from tss-esapi 7.7's "Response code value: 0x…" text
/// (the code itself is not public).
fn raw_rc(e: &TssError) -> Option<u32> {
    let text = match e {
        TssError::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => rc.to_string(),
        TssError::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => rc.to_string(),
        _ => return None,
    };
    let hex = text.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

/// An error with its raw response code, which tpm2-tss tools and docs use. tss-esapi
/// describes only TPM-layer codes; software-stack codes are named here.
fn describe(e: &TssError) -> String {
    let Some(rc) = raw_rc(e) else {
        return e.to_string();
    };
    let layer = (rc >> 16) & 0xff;
    if layer == LAYER_TPM {
        return format!("{e} (TSS2_RC {rc:#x})");
    }
    let layer_name = match layer {
        6 => "FAPI",
        LAYER_ESAPI => "ESAPI",
        LAYER_SYS => "SAPI",
        9 => "marshalling",
        LAYER_TCTI => "TCTI",
        11 | 12 => "resource manager",
        _ => "TSS",
    };
    let base = match rc & 0xffff {
        1 => "general failure",
        3 => "bad context",
        BASE_RC_BAD_SEQUENCE => "bad sequence (an earlier exchange with the TPM failed)",
        BASE_RC_NO_CONNECTION => "no connection",
        BASE_RC_TRY_AGAIN => "try again",
        BASE_RC_IO_ERROR => "I/O error",
        11 => "bad value",
        12 => "not permitted",
        17 => "malformed response",
        19 => "insufficient response",
        21 => "not supported",
        24 => "invalid ESYS_TR handle",
        27 => "response HMAC did not verify",
        _ => "error",
    };
    format!("{layer_name} {base} (TSS2_RC {rc:#x})")
}

fn reach_hint(tcti: &str) -> &'static str {
    if tcti.starts_with("device") {
        "is the TPM device present, and readable and writable by this user (/dev/tpmrm0: \
         group tss)?"
    } else if tcti.starts_with("swtpm") || tcti.starts_with("mssim") {
        "is swtpm running and listening on that host and port (`swtpm:` for swtpm, not \
         `mssim:`)?"
    } else {
        "is the TPM reachable through this TCTI? is swtpm running? is /dev/tpmrm0 readable \
         and writable by this user (group tss)?"
    }
}

/// PCR indices as a set, each checked to be 0..=23.
fn pcr_set(pcrs: &[u8]) -> Result<BTreeSet<u8>> {
    match pcrs.iter().find(|&&p| p > MAX_PCR) {
        Some(bad) => Err(Error::AttestationRejected(format!(
            "tpm: PCR {bad} is out of range (0..={MAX_PCR})"
        ))),
        None => Ok(pcrs.iter().copied().collect()),
    }
}

fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|&p| PcrSlot::try_from(1u32 << p))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::KeyBackend(format!("tpm: PCR selection {pcrs:?}: {e}")))?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| Error::KeyBackend(format!("tpm: PCR selection {pcrs:?}: {e}")))
}

fn pcr_index(slot: PcrSlot) -> Option<u8> {
    u8::try_from(u32::from(slot).trailing_zeros()).ok()
}

/// Splits concatenated DER certificates (an EK chain NV index may hold several),
/// stopping at padding or anything that is not a DER SEQUENCE.
fn split_der_certificates(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(len) = der_sequence_len(bytes) {
        let Some(cert) = bytes.get(..len) else {
            break;
        };
        out.push(cert.to_vec());
        bytes = &bytes[len..];
    }
    out
}

/// The total length (header included) of the DER SEQUENCE at the start of `bytes`.
fn der_sequence_len(bytes: &[u8]) -> Option<usize> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 || rest.len() < n {
        return None;
    }
    let len = rest[..n]
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    Some(2 + n + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_certificates_are_split_and_padding_dropped() {
        let short = [0x30, 0x03, 1, 2, 3];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend([9u8; 0x80]);
        let mut nv = short.to_vec();
        nv.extend(&long);
        nv.extend([0xff; 7]);
        assert_eq!(split_der_certificates(&nv), vec![short.to_vec(), long]);
        // Truncated: nothing.
        assert!(split_der_certificates(&[0x30, 0x82, 0x01]).is_empty());
        assert!(split_der_certificates(&[0x30, 0x05, 1]).is_empty());
    }

    #[test]
    fn pcr_indices_are_checked() {
        assert!(pcr_set(&[0, 7, 23]).is_ok());
        assert!(matches!(pcr_set(&[24]), Err(Error::AttestationRejected(_))));
        assert_eq!(pcr_index(PcrSlot::Slot7), Some(7));
        assert_eq!(pcr_index(PcrSlot::Slot23), Some(23));
    }

    #[test]
    fn bad_tcti_strings_name_themselves() {
        let Err(e) = TpmDevice::open("nonsense:whatever") else {
            panic!("opened a nonsense TCTI");
        };
        assert!(e.to_string().contains("nonsense:whatever"), "{e}");
    }
}
