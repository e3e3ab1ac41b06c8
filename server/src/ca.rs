//! The X.509 certificate authority of the trust domain.
//!
//! Two slots, as SPIRE has them: the *active* CA signs, a *prepared* CA waits in the
//! bundle so that relying parties trust it before it signs anything. The rotator
//! ([`CaManager::tick`]) prepares the next CA at the current one's half-life (capped at
//! 30 days before expiry) and activates it at five sixths of its life (capped at 7 days
//! before expiry). Retired CAs stay in the bundle until they expire, then their keys are
//! deleted. The state is a journal in the datastore; the keys live in the KeyManager and
//! are found again by id after a restart.
//!
//! Every signature goes through the KeyManager: the CA private key is never in this
//! process's hands when the key manager is an HSM.
//!
//! With an [`UpstreamAuthority`] each CA is an intermediate certified by the upstream
//! root: X509-SVID chains carry it after the leaf, and the bundle carries the root
//! instead. Every slot remembers which certificates it contributes to the bundle and
//! under which upstream root (fingerprint) it was minted, so switching to or from an
//! upstream, or to a new root, retires the old CAs cleanly: their bundle certificates
//! stay until they expire.
//!
//! An upstream that fails (another server, in nested servers, may be away) never stops
//! the rest: the active CA signs until it expires, a failed prepare is recorded in
//! [`UpstreamStatus`] and retried with a backoff while pruning and the JWT keys go on, a
//! restart keeps a usable active CA, and a prepared CA that ends no later than the active
//! one is never activated. An upstream that keeps a bundle (`carapace`) gets this
//! server's JWT keys and sends its bundle down ([`CaManager::follow_upstream`]), which is
//! merged into this server's.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use carapace_core::plugin::{KeyManager, MintRequest, UpstreamAuthority};
use carapace_core::{KeyType, SpiffeId, TrustBundle, TrustDomain};
use carapace_tls::RcgenKey;

use crate::datastore::Datastore;
use crate::jwt_keys::{self, JwtAuthorityInfo, JwtJournal, JwtKeys, JwtSlot, Minter};
use crate::{Error, Result};

pub mod downstream;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod upstream_tests;

/// NotBefore is backdated by this much to tolerate clock skew between machines.
pub const BACKDATE: i64 = 10;
/// The bundle's `spiffe_refresh_hint`, seconds.
pub const REFRESH_HINT: u64 = 300;
/// How often the rotator looks at the CA slots.
pub const ROTATE_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed mint through the upstream authority, the next optional one (a
/// prepare) waits this long, doubling up to [`MINT_RETRY_MAX`] seconds.
const MINT_RETRY_MIN: i64 = 10;
/// The longest wait between two optional mints through a failing upstream authority.
const MINT_RETRY_MAX: i64 = 300;

/// How the upstream authority has answered this server: its mints and, for one that
/// keeps a bundle, its acceptance of this server's JWT keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamStatus {
    /// The upstream authority's name (`disk`, `pkcs11`, `carapace`).
    pub name: String,
    /// When a mint or a JWT key publication last succeeded, unix seconds.
    pub last_success: Option<i64>,
    /// Since when its answers have been failures, while the last one was.
    pub failing_since: Option<i64>,
    /// Why the last call failed, while it did.
    pub last_error: Option<String>,
    /// Before this time (unix seconds) no optional mint is tried.
    next_attempt: i64,
    /// The current wait between optional mints, seconds.
    delay: i64,
}

impl UpstreamStatus {
    fn succeeded(&mut self, now: i64) {
        self.last_success = Some(now);
        self.failing_since = None;
        self.last_error = None;
        self.next_attempt = 0;
        self.delay = 0;
    }

    fn failed(&mut self, now: i64, error: String) {
        self.failing_since.get_or_insert(now);
        self.last_error = Some(error);
        self.delay = (self.delay * 2).clamp(MINT_RETRY_MIN, MINT_RETRY_MAX);
        self.next_attempt = now + self.delay;
    }
}

/// A public key taken from a CSR or a key manager, ready to be certified.
pub struct SubjectKey(rcgen::SubjectPublicKeyInfo);

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectKey")
    }
}

impl SubjectKey {
    /// From a SubjectPublicKeyInfo (DER), refusing key types Carapace does not issue for.
    pub fn from_spki(spki_der: &[u8]) -> Result<Self> {
        carapace_core::crypto::key_type_of_spki(spki_der)?;
        rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map(SubjectKey)
            .map_err(|e| Error::InvalidArgument(format!("unsupported public key: {e}")))
    }
}

/// Parses a PKCS#10 CSR (DER), verifies its self-signature, and returns its public key.
/// Everything else in the CSR (subject, requested SANs) is ignored: the server decides
/// what goes into the certificate.
pub fn csr_public_key(csr_der: &[u8]) -> Result<SubjectKey> {
    SubjectKey::from_spki(&csr_public_key_der(csr_der)?)
}

/// Like [`csr_public_key`], returning the SubjectPublicKeyInfo as DER.
pub fn csr_public_key_der(csr_der: &[u8]) -> Result<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|e| Error::InvalidArgument(format!("csr: not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::InvalidArgument("csr: trailing bytes".into()));
    }
    csr.verify_signature()
        .map_err(|_| Error::InvalidArgument("csr: signature does not verify".into()))?;
    let spki = csr.certification_request_info.subject_pki.raw;
    carapace_core::crypto::key_type_of_spki(spki)?;
    Ok(spki.to_vec())
}

/// One CA: key, certificate and the issuer state rcgen signs with.
pub struct CaSlot {
    /// KeyManager id of the CA key.
    pub key_id: String,
    /// The CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// NotBefore, unix seconds.
    pub not_before: i64,
    /// NotAfter, unix seconds.
    pub not_after: i64,
    /// Certificates that follow the leaf in every X509-SVID chain this CA signs: empty for
    /// a self-signed CA, the CA certificate and any upstream intermediates otherwise.
    pub chain: Vec<Vec<u8>>,
    /// What this CA contributes to the bundle: itself when self-signed, the upstream
    /// roots otherwise.
    pub bundle_certs: Vec<Vec<u8>>,
    /// Fingerprint of the upstream root that certified it; None when self-signed.
    pub upstream: Option<String>,
    issuer: Issuer<'static, RcgenKey>,
}

impl std::fmt::Debug for CaSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSlot")
            .field("key_id", &self.key_id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl CaSlot {
    /// How many signatures the CA key's backend makes at once (`None`: CPU-bound).
    pub fn signing_concurrency(&self) -> Option<usize> {
        self.issuer.key().key().concurrency()
    }

    fn journal(&self) -> JournalSlot {
        JournalSlot {
            key_id: self.key_id.clone(),
            cert_der_hex: hex::encode(&self.cert_der),
            chain_hex: self.chain.iter().skip(1).map(hex::encode).collect(),
            bundle_hex: Some(self.bundle_certs.iter().map(hex::encode).collect()),
            upstream: self.upstream.clone(),
            tainted: false,
        }
    }

    /// The operator's handle on this CA: see [`authority_id`].
    pub fn authority_id(&self) -> String {
        authority_id(&self.cert_der)
    }

    fn prepare_at(&self) -> i64 {
        let life = self.not_after - self.not_before;
        self.not_after - (life / 2).min(30 * 86_400)
    }
    fn activate_at(&self) -> i64 {
        let life = self.not_after - self.not_before;
        self.not_after - (life / 6).min(7 * 86_400)
    }
}

/// What the journal keeps of each slot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct JournalSlot {
    key_id: String,
    cert_der_hex: String,
    /// Upstream intermediates above the CA certificate (not the root), DER hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chain_hex: Vec<String>,
    /// The certificates the slot puts in the bundle; absent in journals written before
    /// upstream authorities existed, meaning the (self-signed) CA certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bundle_hex: Option<Vec<String>>,
    /// Fingerprint of the upstream root; None for a self-signed CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    /// Tainted by the operator (`localauthority x509 taint`); only ever set on a retired
    /// CA. Absent in journals written before taint existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    tainted: bool,
}

fn unhex(h: &str) -> Result<Vec<u8>> {
    hex::decode(h).map_err(|e| Error::Ca(format!("CA journal is corrupt: {e}")))
}

impl JournalSlot {
    fn cert(&self) -> Result<Vec<u8>> {
        unhex(&self.cert_der_hex)
    }
    fn bundle_certs(&self) -> Result<Vec<Vec<u8>>> {
        match &self.bundle_hex {
            Some(list) => list.iter().map(|h| unhex(h)).collect(),
            None => Ok(vec![self.cert()?]),
        }
    }
}

/// A CA that no longer signs; its bundle certificates stay until it expires or the
/// operator revokes it.
#[derive(Debug, Clone)]
struct Retired {
    journal: JournalSlot,
    not_after: i64,
    bundle_certs: Vec<Vec<u8>>,
    cert_der: Vec<u8>,
    id: String,
}

impl Retired {
    fn of(slot: &CaSlot) -> Self {
        Retired {
            journal: slot.journal(),
            not_after: slot.not_after,
            bundle_certs: slot.bundle_certs.clone(),
            cert_der: slot.cert_der.clone(),
            id: slot.authority_id(),
        }
    }

    fn restore(js: &JournalSlot) -> Result<Self> {
        let cert_der = js.cert()?;
        let (_, not_after) = carapace_core::x509svid::validity_of(&cert_der)?;
        Ok(Retired {
            journal: js.clone(),
            not_after,
            bundle_certs: js.bundle_certs()?,
            id: authority_id(&cert_der),
            cert_der,
        })
    }
}

/// The id an operator names a CA by: its certificate's subject key identifier in
/// lowercase hex, as SPIRE's `localauthority` shows it; for a certificate without that
/// extension, the RFC 5280 method-1 style digest of its public key (SHA-256, first 20
/// bytes). Stable across restarts: it is a function of the certificate alone.
pub fn authority_id(cert_der: &[u8]) -> String {
    use sha2::Digest as _;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
        return hex::encode(&sha2::Sha256::digest(cert_der)[..20]);
    };
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ski) =
            ext.parsed_extension()
        {
            return hex::encode(ski.0);
        }
    }
    let key = cert.public_key().subject_public_key.data.as_ref();
    hex::encode(&sha2::Sha256::digest(key)[..20])
}

/// Where an X.509 authority stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityStatus {
    /// Signs every new SVID.
    Active,
    /// In the bundle, signing nothing yet.
    Prepared,
    /// Retired: signs nothing, in the bundle until it expires or is revoked.
    Old,
}

/// One X.509 authority as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// See [`authority_id`].
    pub id: String,
    /// Active, prepared or old.
    pub status: AuthorityStatus,
    /// NotAfter, unix seconds.
    pub not_after: i64,
    /// Tainted by the operator.
    pub tainted: bool,
    /// Fingerprint of the upstream root that certified it; None when self-signed.
    pub upstream: Option<String>,
    /// The CA certificate, DER.
    pub cert_der: Vec<u8>,
}

impl AuthorityInfo {
    fn of_slot(slot: &CaSlot, status: AuthorityStatus) -> Self {
        AuthorityInfo {
            id: slot.authority_id(),
            status,
            not_after: slot.not_after,
            tainted: false,
            upstream: slot.upstream.clone(),
            cert_der: slot.cert_der.clone(),
        }
    }

    fn of_retired(r: &Retired) -> Self {
        AuthorityInfo {
            id: r.id.clone(),
            status: AuthorityStatus::Old,
            not_after: r.not_after,
            tainted: r.journal.tainted,
            upstream: r.journal.upstream.clone(),
            cert_der: r.cert_der.clone(),
        }
    }
}

/// An authority id as typed by an operator: lowercase hex, colons allowed (as `openssl`
/// prints a subject key identifier).
pub fn normalize_authority_id(id: &str) -> Result<String> {
    let id: String = id
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if id.is_empty() {
        return Err(Error::InvalidArgument("authority_id is required".into()));
    }
    if id.len() > 128 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::InvalidArgument(
            "authority_id: not an authority id (hex, as `localauthority x509 show` prints it)"
                .into(),
        ));
    }
    Ok(id)
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
struct Journal {
    /// Monotonic counter for key ids.
    next_seq: u64,
    active: Option<JournalSlot>,
    prepared: Option<JournalSlot>,
    /// Retired CAs still in the bundle until they expire.
    retired: Vec<JournalSlot>,
    /// Bundle sequence number.
    bundle_sequence: u64,
    /// The JWT signing keys; absent in journals written before JWT-SVIDs existed.
    #[serde(default, skip_serializing_if = "JwtJournal::is_empty")]
    jwt: JwtJournal,
    /// The trust domain's bundle as the upstream authority last served it (nested
    /// servers): kept so that a restart while it is away serves it still.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream_bundle: Option<JournalBundle>,
}

/// A bundle in the journal: what the SPIFFE formats drop (JWT key expiries, taints)
/// included.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct JournalBundle {
    sequence: u64,
    /// DER hex each.
    x509_authorities: Vec<String>,
    jwt_authorities: Vec<JournalJwtKey>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tainted_x509_authorities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tainted_jwt_kids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct JournalJwtKey {
    kid: String,
    /// SubjectPublicKeyInfo, DER hex.
    public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
}

impl JournalBundle {
    fn of(b: &TrustBundle) -> Self {
        JournalBundle {
            sequence: b.sequence,
            x509_authorities: b.x509_authorities.iter().map(hex::encode).collect(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| JournalJwtKey {
                    kid: k.kid.clone(),
                    public_key: hex::encode(&k.public_key_der),
                    expires_at: k.expires_at,
                })
                .collect(),
            tainted_x509_authorities: b.tainted_x509_authorities.iter().map(hex::encode).collect(),
            tainted_jwt_kids: b.tainted_jwt_kids.clone(),
        }
    }

    fn bundle(&self, td: &TrustDomain) -> Result<TrustBundle> {
        let mut b = TrustBundle::new(td.clone());
        b.sequence = self.sequence;
        b.x509_authorities = self
            .x509_authorities
            .iter()
            .map(|h| unhex(h))
            .collect::<Result<_>>()?;
        b.jwt_authorities = self
            .jwt_authorities
            .iter()
            .map(|k| {
                Ok(carapace_core::JwtKey {
                    kid: k.kid.clone(),
                    public_key_der: unhex(&k.public_key)?,
                    expires_at: k.expires_at,
                })
            })
            .collect::<Result<_>>()?;
        b.tainted_x509_authorities = self
            .tainted_x509_authorities
            .iter()
            .map(|h| unhex(h))
            .collect::<Result<_>>()?;
        b.tainted_jwt_kids = self.tainted_jwt_kids.clone();
        Ok(b)
    }
}

#[derive(Debug, Default)]
struct State {
    journal: Journal,
    active: Option<Arc<CaSlot>>,
    prepared: Option<Arc<CaSlot>>,
    /// Retired CAs still in the bundle.
    retired: Vec<Retired>,
    /// The JWT signing keys.
    jwt: JwtKeys,
}

/// The active and prepared slots, the retired CAs and the journal, as an operator's step
/// starts from them.
type Snapshot = (
    Option<Arc<CaSlot>>,
    Option<Arc<CaSlot>>,
    Vec<Retired>,
    Journal,
);

/// CA settings.
#[derive(Debug, Clone)]
pub struct CaSettings {
    /// Lifetime of each X.509 CA.
    pub ca_ttl: Duration,
    /// Key type of CA keys.
    pub key_type: KeyType,
    /// Subject organization of CA certificates.
    pub organization: String,
    /// Subject country of CA certificates.
    pub country: String,
    /// Key type of JWT signing keys (their lifetime is `ca_ttl`).
    pub jwt_key_type: KeyType,
    /// This server's id among the servers sharing the datastore: its CA journal and its
    /// part of the bundle are stored under it.
    pub server_id: String,
    /// How many tiers of downstream CAs this server's CA may certify below itself
    /// (`[downstream] max_depth`; 0 when it serves no downstream servers): the
    /// pathLenConstraint it asks its upstream authority for.
    pub path_len: u8,
}

/// An issued certificate chain with its expiry.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// Leaf first, DER each.
    pub chain: Vec<Vec<u8>>,
    /// NotAfter of the leaf, unix seconds.
    pub expires_at: i64,
    /// Serial of the leaf, lowercase hex.
    pub serial_hex: String,
}

/// The CA manager: slots, rotation, bundle, signing.
#[derive(Debug)]
pub struct CaManager {
    td: TrustDomain,
    km: Arc<dyn KeyManager>,
    upstream: Option<Arc<dyn UpstreamAuthority>>,
    ds: Datastore,
    settings: CaSettings,
    state: RwLock<State>,
    bundle_tx: watch::Sender<Arc<TrustBundle>>,
    /// Serialises rotations (tick) so two never interleave.
    rotate_lock: tokio::sync::Mutex<()>,
    /// How the upstream authority answered (default while there is none).
    upstream_status: std::sync::Mutex<UpstreamStatus>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // State is replaced whole under the write lock; a poisoned lock holds a consistent value.
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(l: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data replaced field by field; a poisoned lock holds a usable value.
    l.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn offset(unix: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| Error::Ca(format!("time {unix} out of range: {e}")))
}

/// The parameters every CA certificate of `td` shares (self-signed CA, upstream root,
/// intermediate): `dn`, cA with `constraint`, keyCertSign|cRLSign, the trust domain's
/// URI SAN, the validity, a random serial.
pub(crate) fn ca_params(
    td: &TrustDomain,
    dn: DistinguishedName,
    constraint: BasicConstraints,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraint);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(
        td.id_string()
            .try_into()
            .map_err(|e| Error::Ca(format!("trust domain URI: {e}")))?,
    )];
    params.not_before = offset(not_before)?;
    params.not_after = offset(not_after)?;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A PKCS#10 CSR (DER) for a new CA key of `td`, signed by it where it lives, with the
/// trust domain's URI SAN and no subject: what an upstream server checks and certifies.
fn ca_csr(td: &TrustDomain, key: Arc<dyn carapace_core::plugin::KeySigner>) -> Result<Vec<u8>> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        td.id_string()
            .try_into()
            .map_err(|e| Error::Ca(format!("trust domain URI: {e}")))?,
    )];
    let signer = RcgenKey::new(key)?;
    // One signature per CA lifetime, as for the self-signed CA: inline even on an HSM.
    let csr = params
        .serialize_request(&signer)
        .map_err(|e| Error::Ca(format!("signing the CA's CSR failed: {e}")))?;
    Ok(csr.der().to_vec())
}

/// Checks that the CA certificate `der` may certify `wanted` tiers of CAs below itself
/// (no pathLenConstraint, or one at least that large).
fn check_path_len(der: &[u8], wanted: u8) -> Result<()> {
    let granted =
        path_len_constraint(der).map_err(|e| Error::Ca(format!("minted CA certificate: {e}")))?;
    match granted {
        Some(g) if g < u32::from(wanted) => Err(Error::Ca(format!(
            "the minted CA allows {g} tier(s) of CAs below it (pathLenConstraint) but \
             [downstream] max_depth asks for {wanted}"
        ))),
        _ => Ok(()),
    }
}

/// The pathLenConstraint of a CA certificate (DER); `None`: unconstrained.
fn path_len_constraint(cert_der: &[u8]) -> Result<Option<u32>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| Error::Ca(format!("the certificate does not parse: {e}")))?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| Error::Ca(format!("basicConstraints: {e}")))?;
    Ok(bc.and_then(|b| b.value.path_len_constraint))
}

pub(crate) fn random_serial() -> SerialNumber {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Positive and exactly 16 bytes long.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl CaManager {
    /// Loads the CA state from the journal (finding each key again in the KeyManager),
    /// creating a first CA if there is none or the active one has expired, and publishes
    /// the bundle. With `upstream`, every new CA is certified by it.
    pub async fn load(
        td: TrustDomain,
        km: Arc<dyn KeyManager>,
        upstream: Option<Arc<dyn UpstreamAuthority>>,
        ds: Datastore,
        settings: CaSettings,
        now: i64,
    ) -> Result<Arc<Self>> {
        let (bundle_tx, _) = watch::channel(Arc::new(TrustBundle::new(td.clone())));
        let upstream_status = std::sync::Mutex::new(UpstreamStatus {
            name: upstream
                .as_ref()
                .map(|u| u.name().to_owned())
                .unwrap_or_default(),
            ..UpstreamStatus::default()
        });
        let ca = Arc::new(CaManager {
            td,
            km,
            upstream,
            ds,
            settings,
            state: RwLock::new(State::default()),
            bundle_tx,
            rotate_lock: tokio::sync::Mutex::new(()),
            upstream_status,
        });
        let journal: Journal = match ca.ds.load_ca_journal(&ca.settings.server_id).await? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Ca(format!("CA journal is corrupt: {e}")))?,
            None => Journal::default(),
        };
        let mut state = State {
            journal: journal.clone(),
            ..State::default()
        };
        if let Some(js) = &journal.active {
            state.active = Some(Arc::new(ca.restore_slot(js).await?));
        }
        if let Some(js) = &journal.prepared {
            match ca.restore_slot(js).await {
                Ok(slot) => state.prepared = Some(Arc::new(slot)),
                Err(e) => {
                    tracing::warn!(error = %e, "prepared CA could not be restored; a new one will be prepared");
                    state.journal.prepared = None;
                }
            }
        }
        for js in &journal.retired {
            state.retired.push(Retired::restore(js)?);
        }
        state.jwt = JwtKeys::restore(&journal.jwt, &ca.jwt_minter()).await?;
        let bundle = ca.bundle_of(
            &state.journal,
            &state.retired,
            state.active.iter().chain(state.prepared.iter()),
            &state.jwt,
        )?;
        *write(&ca.state) = state;
        // This server's part, published again (another server may have dropped it while
        // this one was down), and the union of every server's is what it serves.
        let union = ca
            .ds
            .publish_bundle(
                &ca.settings.server_id,
                &bundle,
                carapace_core::clock::unix_now(),
            )
            .await?;
        ca.bundle_tx.send_replace(Arc::new(union));
        if let Err(e) = ca.tick(now).await {
            // A due prepare that the upstream authority refused (it is away, say) must
            // not stop a server whose active CA still signs: it keeps issuing, and the
            // rotator tries again.
            let Some(active) = ca.usable_active(now) else {
                return Err(e);
            };
            tracing::error!(
                error = %e,
                active_ca_expires_at = active.not_after,
                "could not prepare the next X.509 CA; the active one signs until it expires, \
                 and the rotator retries"
            );
        }
        Ok(ca)
    }

    /// The active CA, if it can sign at `now` under the current upstream authority.
    fn usable_active(&self, now: i64) -> Option<Arc<CaSlot>> {
        let upstream = self.current_upstream();
        read(&self.state)
            .active
            .clone()
            .filter(|a| a.not_after > now + BACKDATE && a.upstream == upstream)
    }

    /// How the upstream authority has answered this server's mints; `None` without one.
    pub fn upstream_status(&self) -> Option<UpstreamStatus> {
        self.upstream.as_ref()?;
        Some(lock(&self.upstream_status).clone())
    }

    /// Whether an optional mint (a prepare) may be tried at `now`: not while the
    /// upstream authority's last failure is recent (the wait doubles up to five minutes).
    fn may_try_mint(&self, now: i64) -> bool {
        self.upstream.is_none() || now >= lock(&self.upstream_status).next_attempt
    }

    /// Records a failure of the upstream authority (or of what it minted).
    fn mint_failed(&self, now: i64, error: &Error) {
        if self.upstream.is_some() {
            lock(&self.upstream_status).failed(now, error.to_string());
        }
    }

    /// [`Self::mint_ca`], recording how the upstream authority answered.
    async fn mint_recorded(&self, seq: u64, now: i64) -> Result<CaSlot> {
        let minted = self.mint_ca(seq, now).await;
        if self.upstream.is_some() {
            match &minted {
                Ok(_) => lock(&self.upstream_status).succeeded(now),
                Err(e) => self.mint_failed(now, e),
            }
        }
        minted
    }

    /// Serves the trust domain's bundle as the datastore has it now, if it is newer than
    /// the one served: other servers sharing the datastore publish their parts there.
    /// Returns whether it changed.
    pub async fn refresh_bundle(&self) -> Result<bool> {
        let Some(stored) = self.ds.get_bundle(&self.td).await? else {
            return Ok(false);
        };
        // Under the rotate lock, a publish of this server's own cannot interleave; the
        // sequence check keeps an older read from replacing a newer bundle.
        let _r = self.rotate_lock.lock().await;
        let newer = stored.sequence > self.bundle_tx.borrow().sequence;
        if newer {
            tracing::info!(
                sequence = stored.sequence,
                x509_authorities = stored.x509_authorities.len(),
                jwt_authorities = stored.jwt_authorities.len(),
                "serving the trust bundle as the servers sharing the datastore published it"
            );
            self.bundle_tx.send_replace(Arc::new(stored));
        }
        Ok(newer)
    }

    /// The bundle: what retired CAs still valid, then the active and the prepared one,
    /// contribute (each certificate once, in that order), and the JWT keys; then what the
    /// upstream authority's bundle (`journal.upstream_bundle`) adds: its X.509 roots, the
    /// JWT keys of every tier, its taints. The sequence is `journal.bundle_sequence`.
    fn bundle_of<'a>(
        &self,
        journal: &Journal,
        retired: &[Retired],
        slots: impl Iterator<Item = &'a Arc<CaSlot>>,
        jwt: &JwtKeys,
    ) -> Result<TrustBundle> {
        let mut bundle = TrustBundle::new(self.td.clone());
        bundle.sequence = journal.bundle_sequence;
        bundle.refresh_hint = Some(REFRESH_HINT);
        let all = retired
            .iter()
            .flat_map(|r| r.bundle_certs.iter())
            .chain(slots.flat_map(|s| s.bundle_certs.iter()));
        for der in all {
            if !bundle.x509_authorities.contains(der) {
                bundle.x509_authorities.push(der.clone());
            }
        }
        for r in retired.iter().filter(|r| r.journal.tainted) {
            if bundle.x509_authorities.contains(&r.cert_der) {
                bundle.tainted_x509_authorities.push(r.cert_der.clone());
            }
        }
        (bundle.jwt_authorities, bundle.tainted_jwt_kids) = jwt.bundle_keys();
        if let Some(up) = &journal.upstream_bundle {
            let up = up.bundle(&self.td)?;
            for der in up.x509_authorities {
                if !bundle.x509_authorities.contains(&der) {
                    bundle.x509_authorities.push(der);
                }
            }
            for der in up.tainted_x509_authorities {
                if bundle.x509_authorities.contains(&der)
                    && !bundle.tainted_x509_authorities.contains(&der)
                {
                    bundle.tainted_x509_authorities.push(der);
                }
            }
            for key in up.jwt_authorities {
                if !bundle.jwt_authorities.iter().any(|k| k.kid == key.kid) {
                    bundle.jwt_authorities.push(key);
                }
            }
            for kid in up.tainted_jwt_kids {
                if !bundle.tainted_jwt_kids.contains(&kid) {
                    bundle.tainted_jwt_kids.push(kid);
                }
            }
        }
        Ok(bundle)
    }

    fn jwt_minter(&self) -> Minter<'_> {
        Minter {
            km: &self.km,
            key_type: self.settings.jwt_key_type,
            ttl: self.settings.ca_ttl,
        }
    }

    /// The fingerprint new CAs are minted under (None: self-signed).
    fn current_upstream(&self) -> Option<String> {
        self.upstream.as_ref().map(|u| u.fingerprint())
    }

    async fn restore_slot(&self, js: &JournalSlot) -> Result<CaSlot> {
        let der = js.cert()?;
        let key = self.km.get_key(&js.key_id).await.map_err(|e| {
            Error::Ca(format!(
                "CA key {} named in the journal is not in the {} key manager: {e}",
                js.key_id,
                self.km.name()
            ))
        })?;
        let cert_spki = carapace_core::x509svid::public_key_of(&der)?;
        if cert_spki != key.public_key_der() {
            return Err(Error::Ca(format!(
                "CA key {} does not match its certificate in the journal",
                js.key_id
            )));
        }
        let (not_before, not_after) = carapace_core::x509svid::validity_of(&der)?;
        let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), RcgenKey::new(key)?)
            .map_err(|e| Error::Ca(format!("CA certificate unusable: {e}")))?;
        let mut chain = Vec::new();
        if js.upstream.is_some() {
            chain.push(der.clone());
            for h in &js.chain_hex {
                chain.push(unhex(h)?);
            }
        }
        Ok(CaSlot {
            key_id: js.key_id.clone(),
            bundle_certs: js.bundle_certs()?,
            upstream: js.upstream.clone(),
            cert_der: der,
            chain,
            not_before,
            not_after,
            issuer,
        })
    }

    /// Creates a new self-signed CA in a fresh key.
    async fn mint_ca(&self, seq: u64, now: i64) -> Result<CaSlot> {
        let key_id = format!("x509-ca-{seq}");
        // Checked before any key exists, so a lifetime X.509 cannot express leaves nothing.
        let not_after = carapace_core::limits::unix_plus(now, self.settings.ca_ttl)
            .filter(|t| *t <= carapace_core::limits::MAX_UNIX_TIME)
            .ok_or_else(|| {
                Error::Config(format!(
                    "ca_ttl {} from now ends after 9999-12-31, the last date X.509 can express",
                    carapace_core::limits::describe(self.settings.ca_ttl)
                ))
            })?;
        // A key left over from a crash between key creation and journal write is reused
        // only by id collision; remove it so generate succeeds.
        if self.km.get_key(&key_id).await.is_ok() {
            self.km.delete_key(&key_id).await?;
        }
        let key = self
            .km
            .generate_key(&key_id, self.settings.key_type)
            .await?;
        let not_before = now - BACKDATE;
        if let Some(upstream) = &self.upstream {
            let minted = self
                .mint_upstream(upstream.as_ref(), key, seq, not_before, now)
                .await;
            if minted.is_err() {
                // Not in the journal: the new key must not linger.
                let _ = self.km.delete_key(&key_id).await;
            }
            return minted;
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, self.settings.country.clone());
        dn.push(DnType::OrganizationName, self.settings.organization.clone());
        dn.push(DnType::CommonName, format!("{} X.509 CA {seq}", self.td));
        let params = ca_params(
            &self.td,
            dn,
            BasicConstraints::Unconstrained,
            not_before,
            not_after,
        )?;
        let signing = RcgenKey::new(key.clone())?;
        // One signature, once per CA lifetime: cheap enough to run inline even on an HSM.
        let cert_der = params
            .self_signed(&signing)
            .map_err(|e| Error::Ca(format!("self-signing the CA failed: {e}")))?
            .der()
            .to_vec();
        let issuer = Issuer::new(params, signing);
        tracing::info!(key_id, not_after, "minted a new X.509 CA");
        Ok(CaSlot {
            key_id,
            bundle_certs: vec![cert_der.clone()],
            chain: Vec::new(),
            upstream: None,
            cert_der,
            not_before,
            not_after,
            issuer,
        })
    }

    /// Has `upstream` certify the new CA key `key` (id `x509-ca-<seq>`), and checks what
    /// it minted before using it: the certificate is a CA for exactly this key, grants
    /// the pathLen this server asked for, and an SVID it signs verifies against the
    /// upstream's roots.
    async fn mint_upstream(
        &self,
        upstream: &dyn UpstreamAuthority,
        key: Arc<dyn carapace_core::plugin::KeySigner>,
        seq: u64,
        not_before: i64,
        now: i64,
    ) -> Result<CaSlot> {
        let key_id = format!("x509-ca-{seq}");
        let name = upstream.name();
        let csr_der = ca_csr(&self.td, key.clone())?;
        let minted = upstream
            .mint_x509_ca(&MintRequest {
                trust_domain: self.td.clone(),
                public_key_der: key.public_key_der().to_vec(),
                csr_der,
                path_len: self.settings.path_len,
                ttl: self.settings.ca_ttl,
                common_name: format!("{} X.509 CA {seq}", self.td),
                organization: self.settings.organization.clone(),
                country: self.settings.country.clone(),
                not_before,
            })
            .await
            .map_err(|e| Error::Ca(format!("upstream {name}: {e}")))?;
        let cert_der = minted
            .chain
            .first()
            .cloned()
            .ok_or_else(|| Error::Ca(format!("upstream {name} minted nothing")))?;
        if carapace_core::x509svid::public_key_of(&cert_der)? != key.public_key_der() {
            return Err(Error::Ca(format!(
                "upstream {name} certified another key than the CA's"
            )));
        }
        carapace_core::x509svid::check_signing_cert(&cert_der)?;
        check_path_len(&cert_der, self.settings.path_len)
            .map_err(|e| Error::Ca(format!("upstream {name}: {e}")))?;
        let (not_before, not_after) = carapace_core::x509svid::validity_of(&cert_der)?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der.as_slice().into(), RcgenKey::new(key.clone())?)
                .map_err(|e| Error::Ca(format!("minted CA certificate unusable: {e}")))?;
        let slot = CaSlot {
            key_id: key_id.clone(),
            cert_der,
            chain: minted.chain,
            bundle_certs: minted.roots,
            upstream: Some(upstream.fingerprint()),
            not_before,
            not_after,
            issuer,
        };
        // One throwaway SVID (over the CA's own public key; it is never handed out) must
        // verify against the roots the upstream named: this catches a chain that does not
        // reach them, a wrong trust domain, a pathLen that forbids the tier below.
        let probe = SpiffeId::new(&self.td, "/spire/ca-check")?;
        let svid = sign_leaf(
            &slot,
            &probe,
            &SubjectKey::from_spki(key.public_key_der())?,
            Duration::from_secs(60),
            &[],
            now,
        )?;
        let mut roots = TrustBundle::new(self.td.clone());
        roots.x509_authorities = slot.bundle_certs.clone();
        carapace_core::x509svid::verify_chain(&svid.chain, &roots, now.max(not_before) as u64)
            .map_err(|e| {
                Error::Ca(format!(
                    "upstream {name} minted a CA whose SVIDs do not verify against the roots \
                     it named: {e}"
                ))
            })?;
        tracing::info!(
            key_id,
            not_after,
            upstream = name,
            "minted a new X.509 CA under the upstream root"
        );
        Ok(slot)
    }

    /// One rotator step at time `now`: create, prepare, activate and prune CAs as their
    /// lifetimes require, then persist and publish.
    pub async fn tick(&self, now: i64) -> Result<()> {
        let _guard = self.rotate_lock.lock().await;
        let (active, prepared, mut journal) = {
            let s = read(&self.state);
            (s.active.clone(), s.prepared.clone(), s.journal.clone())
        };
        let mut changed = false;
        let mut new_active = active.clone();
        let mut new_prepared = prepared.clone();
        let mut retire: Vec<Arc<CaSlot>> = Vec::new();
        let mut expired_keys = Vec::new();
        // A failed prepare does not stop the rest of the step (pruning, the JWT keys,
        // which need no upstream): it is returned once the step is done.
        let mut mint_error = None;

        let upstream = self.current_upstream();
        if let Some(p) = new_prepared.clone() {
            if p.upstream != upstream {
                tracing::info!(
                    key_id = p.key_id,
                    "the prepared CA was minted under another upstream root; retiring it"
                );
                retire.push(p);
                new_prepared = None;
                changed = true;
            }
        }
        let active_usable = active
            .as_ref()
            .is_some_and(|a| a.not_after > now + BACKDATE && a.upstream == upstream);
        if !active_usable {
            if let Some(old) = active.clone() {
                retire.push(old);
            }
            let slot = match new_prepared
                .clone()
                .filter(|p| p.not_after > now + BACKDATE)
            {
                Some(p) => {
                    new_prepared = None;
                    p
                }
                None => {
                    let seq = journal.next_seq;
                    journal.next_seq += 1;
                    Arc::new(self.mint_recorded(seq, now).await?)
                }
            };
            new_active = Some(slot);
            changed = true;
        } else if let Some(a) = &active {
            if new_prepared.is_none() && now >= a.prepare_at() && self.may_try_mint(now) {
                let seq = journal.next_seq;
                journal.next_seq += 1;
                match self.mint_recorded(seq, now).await {
                    Ok(slot) => {
                        new_prepared = Some(Arc::new(slot));
                        tracing::info!(
                            "prepared the next X.509 CA; it is in the bundle from now on"
                        );
                        changed = true;
                    }
                    Err(e) => {
                        mint_error = Some(Error::Ca(format!(
                            "could not prepare the next X.509 CA (the active one signs until \
                             {}): {e}",
                            a.not_after
                        )));
                    }
                }
            }
            if now >= a.activate_at() {
                if let Some(p) = new_prepared.take() {
                    if p.not_after > a.not_after {
                        retire.push(a.clone());
                        tracing::info!(key_id = p.key_id, "activated the prepared X.509 CA");
                        new_active = Some(p);
                    } else {
                        // An upstream that caps what it mints at its own expiry can hand
                        // out a CA that ends before the active one: activating it would
                        // only shorten every SVID. It has signed nothing: it leaves the
                        // bundle, and another is prepared once the upstream lets it.
                        let e = Error::Ca(format!(
                            "the prepared X.509 CA {} ends at {}, no later than the active one \
                             ({}): not activated; another will be prepared",
                            p.authority_id(),
                            p.not_after,
                            a.not_after
                        ));
                        tracing::warn!(error = %e, "did not activate the prepared X.509 CA");
                        self.mint_failed(now, &e);
                        expired_keys.push(p.key_id.clone());
                    }
                    changed = true;
                }
            }
        }

        let mut retired = read(&self.state).retired.clone();
        for r in retire {
            retired.push(Retired::of(&r));
        }
        let before = retired.len();
        retired.retain(|r| {
            let keep = r.not_after > now;
            if !keep {
                expired_keys.push(r.journal.key_id.clone());
            }
            keep
        });
        if retired.len() != before {
            changed = true;
        }

        let jwt = read(&self.state).jwt.clone();
        let refresh = REFRESH_HINT as i64;
        let mut jwt = match jwt
            .step(
                &self.jwt_minter(),
                &mut journal.next_seq,
                now,
                refresh,
                self.upstream.is_some(),
            )
            .await?
        {
            Some((next, delete)) => {
                expired_keys.extend(delete);
                changed = true;
                next
            }
            None => jwt,
        };
        if let Err(e) = self.publish_jwt_keys(&mut journal, &mut jwt, now).await {
            mint_error.get_or_insert(e);
        }
        changed |= journal.upstream_bundle != read(&self.state).journal.upstream_bundle
            || jwt.journal() != read(&self.state).jwt.journal();

        if changed {
            self.persist(
                journal,
                new_active,
                new_prepared,
                retired,
                jwt,
                expired_keys,
            )
            .await?;
        }
        mint_error.map_or(Ok(()), Err)
    }

    /// Offers the upstream authority every JWT key of this server it has not accepted yet
    /// (backing off like mints while it fails), marks the accepted ones and takes the
    /// bundle it answers with into `journal`.
    async fn publish_jwt_keys(
        &self,
        journal: &mut Journal,
        jwt: &mut JwtKeys,
        now: i64,
    ) -> Result<()> {
        let Some(upstream) = &self.upstream else {
            return Ok(());
        };
        let keys = jwt.unpublished_upstream();
        if keys.is_empty() || !self.may_try_mint(now) {
            return Ok(());
        }
        for key in keys {
            match upstream.publish_jwt_key(&key).await {
                Ok(Some(bundle)) => {
                    self.check_upstream_bundle(&bundle)?;
                    jwt.mark_published_upstream(&key.kid, now);
                    journal.upstream_bundle = Some(JournalBundle::of(&bundle));
                    lock(&self.upstream_status).succeeded(now);
                    tracing::info!(
                        kid = key.kid,
                        upstream = upstream.name(),
                        "the upstream authority published this server's JWT key to every tier"
                    );
                }
                Ok(None) => {
                    // The authority keeps no bundle: this server's is the only one.
                    let at = jwt.published_at(&key.kid).unwrap_or(now);
                    jwt.mark_published_upstream(&key.kid, at);
                }
                Err(e) => {
                    let e = Error::Ca(format!(
                        "upstream {}: could not publish JWT key {}: {e}",
                        upstream.name(),
                        key.kid
                    ));
                    self.mint_failed(now, &e);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Refuses a bundle the upstream authority served for another trust domain.
    fn check_upstream_bundle(&self, bundle: &TrustBundle) -> Result<()> {
        if bundle.trust_domain() != &self.td {
            return Err(Error::Ca(format!(
                "the upstream authority served a bundle for trust domain {}, this server is in {}",
                bundle.trust_domain(),
                self.td
            )));
        }
        Ok(())
    }

    /// Serves `bundle`, the upstream authority's newest, merged into this server's (and
    /// stored in the journal). An older sequence than the one held is ignored.
    pub async fn apply_upstream_bundle(&self, bundle: &TrustBundle) -> Result<bool> {
        self.check_upstream_bundle(bundle)?;
        let _guard = self.rotate_lock.lock().await;
        let (active, prepared, retired, mut journal) = self.snapshot();
        let next = JournalBundle::of(bundle);
        match &journal.upstream_bundle {
            Some(held) if *held == next => return Ok(false),
            Some(held) if held.sequence > next.sequence => {
                tracing::warn!(
                    held = held.sequence,
                    served = next.sequence,
                    "the upstream authority served an older bundle than the one held; kept the held one"
                );
                return Ok(false);
            }
            _ => {}
        }
        journal.upstream_bundle = Some(next);
        self.commit(journal, active, prepared, retired, Vec::new())
            .await?;
        tracing::info!(
            sequence = bundle.sequence,
            x509_authorities = bundle.x509_authorities.len(),
            jwt_authorities = bundle.jwt_authorities.len(),
            "serving the upstream authority's new bundle to this tier"
        );
        Ok(true)
    }

    /// The sequence of the upstream authority's bundle held (0: none).
    fn upstream_sequence(&self) -> u64 {
        read(&self.state)
            .journal
            .upstream_bundle
            .as_ref()
            .map_or(0, |b| b.sequence)
    }

    /// Follows the upstream authority's bundle until `shutdown` resolves (or at once
    /// when it keeps none): every new one is merged into this server's bundle, so a
    /// rotation at the top reaches this tier's agents. Failures are retried, waiting 1 s
    /// doubling up to 30 s.
    pub async fn follow_upstream(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(upstream) = self.upstream.clone() else {
            return;
        };
        let mut delay = Duration::from_secs(1);
        loop {
            let known = self.upstream_sequence();
            let next = tokio::select! {
                next = upstream.next_bundle(known) => next,
                _ = shutdown.changed() => return,
            };
            match next {
                Ok(None) => return,
                Ok(Some(bundle)) => {
                    delay = Duration::from_secs(1);
                    lock(&self.upstream_status).succeeded(carapace_core::clock::unix_now());
                    if let Err(e) = self.apply_upstream_bundle(&bundle).await {
                        tracing::error!(error = %e, "could not apply the upstream authority's bundle");
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        upstream = upstream.name(),
                        retry_in_s = delay.as_secs(),
                        "could not follow the upstream authority's bundle; retrying"
                    );
                    // An upstream that cannot be reached shows as failing at once, not
                    // only at the next mint.
                    self.mint_failed(
                        carapace_core::clock::unix_now(),
                        &Error::Ca(format!("following its bundle: {e}")),
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// [`Self::persist`] of new X.509 slots with the JWT keys as they are.
    async fn commit(
        &self,
        journal: Journal,
        active: Option<Arc<CaSlot>>,
        prepared: Option<Arc<CaSlot>>,
        retired: Vec<Retired>,
        delete_keys: Vec<String>,
    ) -> Result<()> {
        let jwt = read(&self.state).jwt.clone();
        self.persist(journal, active, prepared, retired, jwt, delete_keys)
            .await
    }

    /// [`Self::persist`] of new JWT keys with the X.509 slots as they are.
    async fn commit_jwt(
        &self,
        journal: Journal,
        jwt: JwtKeys,
        delete_keys: Vec<String>,
    ) -> Result<()> {
        let (active, prepared, retired, _) = self.snapshot();
        self.persist(journal, active, prepared, retired, jwt, delete_keys)
            .await
    }

    /// Persists a new state (journal and stored bundle, with the bundle sequence bumped),
    /// then installs and publishes it and deletes the keys in `delete_keys`. Called with
    /// `rotate_lock` held. Nothing changes in memory unless the journal was written.
    async fn persist(
        &self,
        mut journal: Journal,
        active: Option<Arc<CaSlot>>,
        prepared: Option<Arc<CaSlot>>,
        retired: Vec<Retired>,
        jwt: JwtKeys,
        delete_keys: Vec<String>,
    ) -> Result<()> {
        journal.active = active.as_ref().map(|s| s.journal());
        journal.prepared = prepared.as_ref().map(|s| s.journal());
        journal.retired = retired.iter().map(|r| r.journal.clone()).collect();
        journal.jwt = jwt.journal();
        journal.bundle_sequence += 1;

        let bundle = self.bundle_of(
            &journal,
            &retired,
            active.iter().chain(prepared.iter()),
            &jwt,
        )?;

        let bytes = serde_json::to_vec(&journal).map_err(|e| Error::Ca(e.to_string()))?;
        self.ds
            .save_ca_journal(&self.settings.server_id, &bytes)
            .await?;
        let bundle = self
            .ds
            .publish_bundle(
                &self.settings.server_id,
                &bundle,
                carapace_core::clock::unix_now(),
            )
            .await?;
        let rotated = read(&self.state).active.as_ref().map(|a| a.key_id.clone())
            != active.as_ref().map(|a| a.key_id.clone());
        *write(&self.state) = State {
            journal,
            active,
            prepared,
            retired,
            jwt,
        };
        self.bundle_tx.send_replace(Arc::new(bundle));
        if rotated {
            crate::metrics::metrics().ca_rotated(carapace_core::clock::unix_now());
        }
        for key_id in delete_keys {
            if let Err(e) = self.km.delete_key(&key_id).await {
                tracing::warn!(key_id, error = %e, "could not delete the key of a CA that left the bundle");
            } else {
                tracing::info!(key_id, "deleted the key of a CA that left the bundle");
            }
        }
        Ok(())
    }

    /// A copy of the slots and the journal, for an operator's step to change and
    /// [`Self::commit`] (taken with `rotate_lock` held).
    fn snapshot(&self) -> Snapshot {
        let s = read(&self.state);
        (
            s.active.clone(),
            s.prepared.clone(),
            s.retired.clone(),
            s.journal.clone(),
        )
    }

    /// Every X.509 authority: the active one, the prepared one, then the old ones, newest
    /// first.
    pub fn authorities(&self) -> Vec<AuthorityInfo> {
        let s = read(&self.state);
        let mut out = Vec::new();
        if let Some(a) = &s.active {
            out.push(AuthorityInfo::of_slot(a, AuthorityStatus::Active));
        }
        if let Some(p) = &s.prepared {
            out.push(AuthorityInfo::of_slot(p, AuthorityStatus::Prepared));
        }
        out.extend(s.retired.iter().rev().map(AuthorityInfo::of_retired));
        out
    }

    /// `localauthority x509 prepare`: mints the next CA now and publishes it in the
    /// bundle; it signs nothing until activated. A CA prepared before is replaced, as
    /// SPIRE does: having signed nothing, it leaves the bundle and its key is deleted.
    pub async fn prepare(&self, now: i64) -> Result<AuthorityInfo> {
        let _guard = self.rotate_lock.lock().await;
        let (active, prepared, retired, mut journal) = self.snapshot();
        if active.is_none() {
            return Err(Error::FailedPrecondition(
                "there is no active X.509 authority yet".into(),
            ));
        }
        let seq = journal.next_seq;
        journal.next_seq += 1;
        let slot = Arc::new(self.mint_recorded(seq, now).await?);
        let info = AuthorityInfo::of_slot(&slot, AuthorityStatus::Prepared);
        let replaced: Vec<String> = prepared.iter().map(|p| p.key_id.clone()).collect();
        if let Err(e) = self
            .commit(journal, active, Some(slot.clone()), retired, replaced)
            .await
        {
            // Not in the journal: the new key must not linger either.
            let _ = self.km.delete_key(&slot.key_id).await;
            return Err(e);
        }
        tracing::info!(
            authority_id = info.id,
            key_id = slot.key_id,
            "operator prepared a new X.509 authority; it is in the bundle and signs nothing yet"
        );
        Ok(info)
    }

    /// `localauthority x509 activate`: the prepared CA becomes the active one; the active
    /// one becomes old (still in the bundle, signing nothing). With `id`, it must name
    /// the prepared CA.
    pub async fn activate(&self, id: Option<&str>, now: i64) -> Result<AuthorityInfo> {
        let id = id
            .filter(|i| !i.trim().is_empty())
            .map(normalize_authority_id)
            .transpose()?;
        let _guard = self.rotate_lock.lock().await;
        let (active, prepared, mut retired, journal) = self.snapshot();
        let Some(p) = prepared else {
            return Err(Error::FailedPrecondition(
                "no prepared X.509 authority: run `localauthority x509 prepare` first".into(),
            ));
        };
        if let Some(id) = &id {
            if *id != p.authority_id() {
                return Err(Error::InvalidArgument(format!(
                    "authority_id {id} is not the prepared X.509 authority ({})",
                    p.authority_id()
                )));
            }
        }
        if p.not_after <= now + BACKDATE {
            return Err(Error::FailedPrecondition(format!(
                "the prepared X.509 authority {} has expired; prepare another",
                p.authority_id()
            )));
        }
        if let Some(a) = &active {
            retired.push(Retired::of(a));
        }
        let info = AuthorityInfo::of_slot(&p, AuthorityStatus::Active);
        self.commit(journal, Some(p.clone()), None, retired, Vec::new())
            .await?;
        tracing::info!(
            authority_id = info.id,
            key_id = p.key_id,
            "operator activated the prepared X.509 authority; the previous one is old"
        );
        Ok(info)
    }

    /// Finds the old authority `id` for taint or revoke, refusing the active and the
    /// prepared one and CAs an upstream root certified (their bundle entry is the root,
    /// which an operator distrusts by changing upstreams).
    fn find_old(&self, verb: &str, id: &str, retired: &[Retired]) -> Result<usize> {
        let s = read(&self.state);
        if s.active.as_ref().is_some_and(|a| a.authority_id() == id) {
            return Err(Error::FailedPrecondition(format!(
                "cannot {verb} {id}: it is the active X.509 authority (prepare and activate another first)"
            )));
        }
        if s.prepared.as_ref().is_some_and(|p| p.authority_id() == id) {
            return Err(Error::FailedPrecondition(format!(
                "cannot {verb} {id}: it is the prepared X.509 authority, which has signed nothing"
            )));
        }
        let i = retired.iter().position(|r| r.id == id).ok_or_else(|| {
            Error::NotFound(format!(
                "no X.509 authority {id} (see `localauthority x509 show`)"
            ))
        })?;
        if retired[i].journal.upstream.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "cannot {verb} {id}: an upstream authority certified it and the bundle holds \
                 the upstream root, not this CA"
            )));
        }
        Ok(i)
    }

    /// `localauthority x509 taint`: marks an old authority tainted. The bundle (with a
    /// new sequence) tells every agent, which re-issues at once every SVID chained to it,
    /// its own included. The authority stays trusted until revoked.
    pub async fn taint(&self, id: &str) -> Result<AuthorityInfo> {
        let id = normalize_authority_id(id)?;
        let _guard = self.rotate_lock.lock().await;
        let (active, prepared, mut retired, journal) = self.snapshot();
        let i = self.find_old("taint", &id, &retired)?;
        if retired[i].journal.tainted {
            return Err(Error::FailedPrecondition(format!(
                "X.509 authority {id} is already tainted"
            )));
        }
        retired[i].journal.tainted = true;
        let info = AuthorityInfo::of_retired(&retired[i]);
        self.commit(journal, active, prepared, retired, Vec::new())
            .await?;
        tracing::warn!(
            authority_id = id,
            "operator tainted an X.509 authority: agents re-issue every SVID chained to it"
        );
        Ok(info)
    }

    /// `localauthority x509 revoke`: removes a tainted old authority from the bundle and
    /// deletes its key. SVIDs chained to it stop verifying everywhere the new bundle
    /// reaches.
    pub async fn revoke(&self, id: &str) -> Result<AuthorityInfo> {
        let id = normalize_authority_id(id)?;
        let _guard = self.rotate_lock.lock().await;
        let (active, prepared, mut retired, journal) = self.snapshot();
        let i = self.find_old("revoke", &id, &retired)?;
        if !retired[i].journal.tainted {
            return Err(Error::FailedPrecondition(format!(
                "cannot revoke {id}: only a tainted X.509 authority can be revoked (taint it first)"
            )));
        }
        let gone = retired.remove(i);
        let info = AuthorityInfo::of_retired(&gone);
        self.commit(
            journal,
            active,
            prepared,
            retired,
            vec![gone.journal.key_id.clone()],
        )
        .await?;
        tracing::warn!(
            authority_id = id,
            "operator revoked an X.509 authority: it left the bundle and its key is deleted"
        );
        Ok(info)
    }

    /// Every JWT authority: the active one, the prepared one, then the old ones, newest
    /// first.
    pub fn jwt_authorities(&self) -> Vec<JwtAuthorityInfo> {
        read(&self.state).jwt.authorities()
    }

    /// `localauthority jwt prepare`: mints the next JWT key now and publishes it in the
    /// bundle; it signs nothing until activated. A key prepared before is replaced (it
    /// has signed nothing) and deleted.
    pub async fn prepare_jwt(&self, now: i64) -> Result<JwtAuthorityInfo> {
        let _guard = self.rotate_lock.lock().await;
        let (mut journal, mut jwt) = {
            let s = read(&self.state);
            (s.journal.clone(), s.jwt.clone())
        };
        if jwt.active.is_none() {
            return Err(Error::FailedPrecondition(
                "there is no active JWT authority yet".into(),
            ));
        }
        let seq = journal.next_seq;
        journal.next_seq += 1;
        let slot = self.jwt_minter().mint(seq, now).await?;
        let replaced: Vec<String> = jwt.prepared.iter().map(|p| p.key_id().to_owned()).collect();
        jwt.prepared = Some(slot.clone());
        let info = jwt.authorities().into_iter().find(|a| a.id == slot.kid());
        if let Err(e) = self.commit_jwt(journal, jwt, replaced).await {
            let _ = self.km.delete_key(slot.key_id()).await;
            return Err(e);
        }
        tracing::info!(
            kid = slot.kid(),
            key_id = slot.key_id(),
            "operator prepared a new JWT authority; it is in the bundle and signs nothing yet"
        );
        info.ok_or_else(|| Error::Ca("the prepared JWT key is not listed".into()))
    }

    /// `localauthority jwt activate`: the prepared key becomes the active one; the active
    /// one becomes old (in the bundle until its last token expires).
    pub async fn activate_jwt(&self, id: Option<&str>, now: i64) -> Result<JwtAuthorityInfo> {
        let id = id
            .filter(|i| !i.trim().is_empty())
            .map(jwt_keys::normalize_kid)
            .transpose()?;
        let _guard = self.rotate_lock.lock().await;
        let (journal, jwt) = {
            let s = read(&self.state);
            (s.journal.clone(), s.jwt.clone())
        };
        let next = jwt.activate(id.as_deref(), now)?;
        let info = next
            .authorities()
            .into_iter()
            .next()
            .ok_or_else(|| Error::Ca("no active JWT key after activation".into()))?;
        self.commit_jwt(journal, next, Vec::new()).await?;
        tracing::info!(
            kid = info.id,
            "operator activated the prepared JWT authority; the previous one is old"
        );
        Ok(info)
    }

    /// `localauthority jwt taint`: marks an old JWT key tainted. The bundle tells every
    /// agent, which drops at once every cached JWT-SVID the key signed. The key stays
    /// trusted until revoked.
    pub async fn taint_jwt(&self, id: &str) -> Result<JwtAuthorityInfo> {
        let id = jwt_keys::normalize_kid(id)?;
        let _guard = self.rotate_lock.lock().await;
        let (journal, mut jwt) = {
            let s = read(&self.state);
            (s.journal.clone(), s.jwt.clone())
        };
        let i = jwt.find_old("taint", &id)?;
        if jwt.retired[i].is_tainted() {
            return Err(Error::FailedPrecondition(format!(
                "JWT authority {id} is already tainted"
            )));
        }
        jwt.retired[i].taint();
        let info = jwt.authorities().into_iter().find(|a| a.id == id);
        self.commit_jwt(journal, jwt, Vec::new()).await?;
        tracing::warn!(
            kid = id,
            "operator tainted a JWT authority: agents drop every cached JWT-SVID it signed"
        );
        info.ok_or_else(|| Error::Ca("the tainted JWT key is not listed".into()))
    }

    /// `localauthority jwt revoke`: removes a tainted old JWT key from the bundle and
    /// deletes it. Tokens it signed stop validating everywhere the new bundle reaches.
    pub async fn revoke_jwt(&self, id: &str) -> Result<JwtAuthorityInfo> {
        let id = jwt_keys::normalize_kid(id)?;
        let _guard = self.rotate_lock.lock().await;
        let (journal, mut jwt) = {
            let s = read(&self.state);
            (s.journal.clone(), s.jwt.clone())
        };
        let i = jwt.find_old("revoke", &id)?;
        if !jwt.retired[i].is_tainted() {
            return Err(Error::FailedPrecondition(format!(
                "cannot revoke {id}: only a tainted JWT authority can be revoked (taint it first)"
            )));
        }
        let info = jwt.authorities().into_iter().find(|a| a.id == id);
        let gone = jwt.retired.remove(i);
        self.commit_jwt(journal, jwt, vec![gone.key_id().to_owned()])
            .await?;
        tracing::warn!(
            kid = id,
            "operator revoked a JWT authority: it left the bundle and its key is deleted"
        );
        info.ok_or_else(|| Error::Ca("the revoked JWT key was not listed".into()))
    }

    /// The active JWT signing key.
    pub fn jwt_active(&self) -> Result<Arc<JwtSlot>> {
        read(&self.state)
            .jwt
            .active
            .clone()
            .ok_or_else(|| Error::Ca("no active JWT key".into()))
    }

    /// Signs a JWT-SVID with the active JWT key: on a blocking thread when the key may
    /// block (an HSM).
    pub async fn issue_jwt_svid(
        &self,
        req: jwt_keys::JwtRequest,
        now: i64,
    ) -> Result<jwt_keys::IssuedJwt> {
        let slot = self.jwt_active()?;
        if !slot.may_block() {
            return jwt_keys::sign(&slot, &req, now);
        }
        tokio::task::spawn_blocking(move || jwt_keys::sign(&slot, &req, now))
            .await
            .map_err(|e| Error::Ca(format!("signing task failed: {e}")))?
    }

    /// Runs [`Self::tick`] every [`ROTATE_INTERVAL`] until `shutdown` resolves.
    pub async fn run_rotator(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(ROTATE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    if let Err(e) = self.tick(carapace_core::clock::unix_now()).await {
                        tracing::error!(error = %e, "CA rotation failed; retrying");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The current bundle, and a receiver of every new one.
    pub fn bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle_tx.subscribe()
    }

    /// The active CA.
    pub fn active(&self) -> Result<Arc<CaSlot>> {
        read(&self.state)
            .active
            .clone()
            .ok_or_else(|| Error::Ca("no active CA".into()))
    }

    /// Whether the active CA's key signs now: one signature over a fixed probe message
    /// through the key manager (an HSM that lost its token fails here). On a blocking
    /// thread when the key may block. The error names why.
    pub async fn probe_signing(&self) -> Result<()> {
        const PROBE: &[u8] = b"carapace readiness probe";
        let ca = self.active()?;
        let key = ca.issuer.key().key().clone();
        with_ca_key(&ca, move || {
            key.sign(key.key_type().x509_algorithm(), PROBE)
                .map(|_| ())
                .map_err(Error::from)
        })
        .await
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// Signs an X509-SVID for `id` and `key`, valid for `ttl` from `now` (capped at the
    /// CA's notAfter), with extra DNS SANs. Runs on the calling thread (CPU or key
    /// manager bound): async callers use a blocking thread for batches.
    pub fn sign_x509_svid(
        &self,
        id: &SpiffeId,
        key: &SubjectKey,
        ttl: Duration,
        dns_names: &[String],
        now: i64,
    ) -> Result<IssuedSvid> {
        let ca = self.active()?;
        sign_leaf(&ca, id, key, ttl, dns_names, now)
    }

    /// [`Self::sign_x509_svid`] for async callers: on a blocking thread when the CA key
    /// may block (an HSM), so a slow token never stalls the async workers.
    pub async fn issue_x509_svid(
        self: &Arc<Self>,
        id: SpiffeId,
        key: SubjectKey,
        ttl: Duration,
        dns_names: Vec<String>,
        now: i64,
    ) -> Result<IssuedSvid> {
        let ca = self.active()?;
        let signer = ca.clone();
        with_ca_key(&ca, move || {
            sign_leaf(&signer, &id, &key, ttl, &dns_names, now)
        })
        .await
    }
}

/// Runs `f`, which signs with `ca`'s key, on the calling task, or on a blocking thread
/// when the key may block (an HSM), so a slow token never stalls the async workers.
async fn with_ca_key<T: Send + 'static>(
    ca: &CaSlot,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if !ca.issuer.key().key().may_block() {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Ca(format!("signing task failed: {e}")))?
}

/// Why signing `what` with `ca`'s key failed. A key manager that refused or failed (an
/// HSM outage, say; its log says why) is KeyUnavailable: the caller sees Unavailable and
/// retries, and nothing was issued.
fn signing_failed(ca: &CaSlot, what: &str, e: rcgen::Error) -> Error {
    match e {
        rcgen::Error::RemoteKeyError => Error::Core(carapace_core::Error::KeyUnavailable(format!(
            "the CA key {} could not sign; see the key manager's log",
            ca.key_id
        ))),
        e => Error::Ca(format!("signing {what} failed: {e}")),
    }
}

/// Builds and signs a leaf X509-SVID under `ca`.
pub fn sign_leaf(
    ca: &CaSlot,
    id: &SpiffeId,
    key: &SubjectKey,
    ttl: Duration,
    dns_names: &[String],
    now: i64,
) -> Result<IssuedSvid> {
    // A lifetime past the end of `i64` (an old entry's, say) can only mean "as long as
    // the CA allows": cap it there instead of wrapping into the past.
    let not_after = carapace_core::limits::unix_plus(now, ttl)
        .unwrap_or(i64::MAX)
        .min(ca.not_after);
    if not_after <= now {
        return Err(Error::Ca("the active CA has expired".into()));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "US");
    dn.push(DnType::OrganizationName, "Carapace");
    if let Some(first) = dns_names.first() {
        dn.push(DnType::CommonName, first.clone());
    }
    params.distinguished_name = dn;
    let mut sans = vec![SanType::URI(
        id.as_str()
            .try_into()
            .map_err(|e| Error::Ca(format!("SPIFFE ID as URI: {e}")))?,
    )];
    for name in dns_names {
        sans.push(SanType::DnsName(name.as_str().try_into().map_err(|e| {
            Error::InvalidArgument(format!("dns name {name:?}: {e}"))
        })?));
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = offset(now - BACKDATE)?;
    params.not_after = offset(not_after)?;
    let serial = random_serial();
    let serial_hex = hex::encode(serial.as_ref());
    params.serial_number = Some(serial);
    let cert = params
        .signed_by(&key.0, &ca.issuer)
        .map_err(|e| signing_failed(ca, "the SVID", e))?;
    let mut chain = Vec::with_capacity(1 + ca.chain.len());
    chain.push(cert.der().to_vec());
    chain.extend(ca.chain.iter().cloned());
    Ok(IssuedSvid {
        chain,
        expires_at: not_after,
        serial_hex,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_keymanager_soft::MemoryKeyManager;

    fn settings(ttl: u64) -> CaSettings {
        CaSettings {
            ca_ttl: Duration::from_secs(ttl),
            key_type: KeyType::EcP256,
            organization: "Carapace".into(),
            country: "US".into(),
            jwt_key_type: KeyType::EcP256,
            server_id: "server-1".into(),
            path_len: 0,
        }
    }

    async fn setup(ttl: u64, now: i64) -> (Arc<CaManager>, Datastore, Arc<MemoryKeyManager>) {
        let ds = Datastore::open_in_memory().await.unwrap();
        let km = Arc::new(MemoryKeyManager::new());
        let td = TrustDomain::new("example.org").unwrap();
        let ca = CaManager::load(td, km.clone(), None, ds.clone(), settings(ttl), now)
            .await
            .unwrap();
        (ca, ds, km)
    }

    fn workload_key() -> (SubjectKey, Vec<u8>) {
        let kp = rcgen::KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
        (SubjectKey::from_spki(&spki).unwrap(), spki)
    }

    #[tokio::test]
    async fn issues_conformant_svids_that_verify_against_the_bundle() {
        let now = 1_900_000_000;
        let (ca, _, _) = setup(86_400, now).await;
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let (key, spki) = workload_key();
        let svid = ca
            .sign_x509_svid(
                &id,
                &key,
                Duration::from_secs(3600),
                &["web.example.org".into()],
                now,
            )
            .unwrap();
        assert_eq!(svid.expires_at, now + 3600);
        let bundle = ca.bundle().borrow().clone();
        let v = carapace_core::x509svid::verify_chain(&svid.chain, &bundle, now as u64).unwrap();
        assert_eq!(v.spiffe_id, id);
        assert_eq!(
            carapace_core::x509svid::public_key_of(&svid.chain[0]).unwrap(),
            spki
        );
        assert_eq!(
            hex::encode(&v.serial),
            svid.serial_hex.trim_start_matches("00")
        );
        carapace_core::x509svid::check_signing_cert(&bundle.x509_authorities[0]).unwrap();
        let (nb, _) = carapace_core::x509svid::validity_of(&svid.chain[0]).unwrap();
        assert_eq!(nb, now - BACKDATE);
    }

    #[tokio::test]
    async fn svid_ttl_is_capped_by_the_ca() {
        let now = 1_900_000_000;
        let (ca, _, _) = setup(600, now).await;
        let (key, _) = workload_key();
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let svid = ca
            .sign_x509_svid(&id, &key, Duration::from_secs(3600), &[], now)
            .unwrap();
        assert_eq!(svid.expires_at, ca.active().unwrap().not_after);
    }

    #[tokio::test]
    async fn a_ttl_past_the_end_of_time_is_capped_by_the_ca_instead_of_wrapping() {
        let now = 1_900_000_000;
        let (ca, _, _) = setup(600, now).await;
        let (key, _) = workload_key();
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let ca_end = ca.active().unwrap().not_after;
        for secs in [i64::MAX as u64, u64::MAX, 9_223_372_036_854_775_807 - 1] {
            let svid = ca
                .sign_x509_svid(&id, &key, Duration::from_secs(secs), &[], now)
                .unwrap();
            assert_eq!(svid.expires_at, ca_end, "ttl {secs}");
            let (_, not_after) = carapace_core::x509svid::validity_of(&svid.chain[0]).unwrap();
            assert_eq!(not_after, ca_end);
        }
    }

    #[tokio::test]
    async fn a_ca_ttl_x509_cannot_express_is_refused_before_any_key_is_made() {
        let now = 1_900_000_000;
        let td = TrustDomain::new("example.org").unwrap();
        let km = Arc::new(MemoryKeyManager::new());
        let ds = Datastore::open_in_memory().await.unwrap();
        let Err(err) = CaManager::load(
            td,
            km.clone(),
            None,
            ds,
            settings(9_999_999_999_999_999_999),
            now,
        )
        .await
        else {
            panic!("a ca_ttl past 9999 was accepted");
        };
        assert!(err.to_string().contains("ca_ttl"), "{err}");
        assert!(km.list_keys().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn prepares_then_activates_with_both_in_the_bundle() {
        let t0 = 1_900_000_000;
        let ttl = 6_000; // prepare at +3000, activate at +5000
        let (ca, _, km) = setup(ttl, t0).await;
        let first = ca.active().unwrap();
        assert_eq!(ca.bundle().borrow().x509_authorities.len(), 1);

        // NotBefore is backdated 10 s, so half-life falls at t0 + 2995.
        ca.tick(t0 + 2_990).await.unwrap();
        assert_eq!(
            ca.bundle().borrow().x509_authorities.len(),
            1,
            "not yet prepared"
        );
        let seq_before = ca.bundle().borrow().sequence;

        ca.tick(t0 + 3_000).await.unwrap();
        let b = ca.bundle().borrow().clone();
        assert_eq!(
            b.x509_authorities.len(),
            2,
            "prepared CA published before use"
        );
        assert!(b.sequence > seq_before, "sequence increases on change");
        assert_eq!(
            ca.active().unwrap().key_id,
            first.key_id,
            "still signing with the first"
        );

        ca.tick(t0 + 5_000).await.unwrap();
        let second = ca.active().unwrap();
        assert_ne!(second.key_id, first.key_id, "activated the prepared CA");
        assert_eq!(
            ca.bundle().borrow().x509_authorities.len(),
            2,
            "old CA stays until it expires"
        );

        // An SVID from the new CA verifies against the bundle; so does one from the old.
        let (key, _) = workload_key();
        let id: SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let now = t0 + 5_001;
        let new_svid = ca
            .sign_x509_svid(&id, &key, Duration::from_secs(60), &[], now)
            .unwrap();
        let old_svid = sign_leaf(&first, &id, &key, Duration::from_secs(60), &[], now).unwrap();
        let bundle = ca.bundle().borrow().clone();
        carapace_core::x509svid::verify_chain(&new_svid.chain, &bundle, now as u64).unwrap();
        carapace_core::x509svid::verify_chain(&old_svid.chain, &bundle, now as u64).unwrap();

        // After the first CA expires it leaves the bundle and its key is deleted.
        ca.tick(first.not_after + 1).await.unwrap();
        let b = ca.bundle().borrow().clone();
        assert!(!b.x509_authorities.contains(&first.cert_der));
        assert!(
            km.get_key(&first.key_id).await.is_err(),
            "expired CA key deleted"
        );
    }

    #[tokio::test]
    async fn restart_keeps_the_ca() {
        let t0 = 1_900_000_000;
        let ds = Datastore::open_in_memory().await.unwrap();
        let km = Arc::new(MemoryKeyManager::new());
        let td = TrustDomain::new("example.org").unwrap();
        let ca1 = CaManager::load(
            td.clone(),
            km.clone(),
            None,
            ds.clone(),
            settings(86_400),
            t0,
        )
        .await
        .unwrap();
        let cert1 = ca1.active().unwrap().cert_der.clone();
        let seq1 = ca1.bundle().borrow().sequence;
        drop(ca1);
        let ca2 = CaManager::load(td, km, None, ds.clone(), settings(86_400), t0 + 60)
            .await
            .unwrap();
        assert_eq!(
            ca2.active().unwrap().cert_der,
            cert1,
            "same CA after restart"
        );
        assert_eq!(
            ca2.bundle().borrow().sequence,
            seq1,
            "no spurious bundle change"
        );
        let stored = ds
            .get_bundle(&TrustDomain::new("example.org").unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.x509_authorities, vec![cert1]);
    }

    #[tokio::test]
    async fn restart_with_a_lost_key_fails_clearly() {
        let t0 = 1_900_000_000;
        let ds = Datastore::open_in_memory().await.unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let km1 = Arc::new(MemoryKeyManager::new());
        CaManager::load(td.clone(), km1, None, ds.clone(), settings(86_400), t0)
            .await
            .unwrap();
        let km2 = Arc::new(MemoryKeyManager::new());
        let err = CaManager::load(td, km2, None, ds, settings(86_400), t0)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not in the memory key manager"), "{err}");
    }

    #[test]
    fn rejects_bad_csrs() {
        assert!(csr_public_key(b"garbage").is_err());
        let kp = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&kp)
            .unwrap();
        let mut der = csr.der().to_vec();
        csr_public_key(&der).unwrap();
        let n = der.len();
        der[n - 5] ^= 0xff; // corrupt the signature
        let err = csr_public_key(&der).err().unwrap().to_string();
        assert!(err.contains("csr"), "{err}");
    }

    /// A root held by a key manager key, as the disk and pkcs11 upstreams hold theirs.
    async fn local_root(name: &str, now: i64) -> Arc<dyn UpstreamAuthority> {
        let km = MemoryKeyManager::new();
        let key = km.generate_key(name, KeyType::EcP256).await.unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let der = crate::upstream::make_root_certificate(
            &td,
            key.clone(),
            name,
            "Carapace",
            Duration::from_secs(10 * 86_400),
            now,
        )
        .unwrap();
        Arc::new(crate::upstream::LocalRoot::new("disk", der, key, now).unwrap())
    }

    async fn load_with(
        upstream: Option<Arc<dyn UpstreamAuthority>>,
        km: Arc<MemoryKeyManager>,
        ds: Datastore,
        now: i64,
    ) -> Arc<CaManager> {
        let td = TrustDomain::new("example.org").unwrap();
        CaManager::load(td, km, upstream, ds, settings(86_400), now)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn two_servers_under_one_upstream_root_share_one_bundle() {
        let now = 1_900_000_000;
        let root = local_root("root", now).await;
        let root_der = root.x509_roots().await.unwrap().remove(0);
        let mut servers = Vec::new();
        for _ in 0..2 {
            let ds = Datastore::open_in_memory().await.unwrap();
            let km = Arc::new(MemoryKeyManager::new());
            servers.push(load_with(Some(root.clone()), km, ds, now).await);
        }
        let bundle_a = servers[0].bundle().borrow().clone();
        let bundle_b = servers[1].bundle().borrow().clone();
        assert_eq!(
            bundle_a.x509_authorities,
            vec![root_der.clone()],
            "the bundle is the root alone"
        );
        assert_eq!(bundle_a.x509_authorities, bundle_b.x509_authorities);
        assert_ne!(
            servers[0].active().unwrap().cert_der,
            servers[1].active().unwrap().cert_der,
            "each server has its own intermediate"
        );
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        for (i, ca) in servers.iter().enumerate() {
            let (key, _) = workload_key();
            let svid = ca
                .sign_x509_svid(&id, &key, Duration::from_secs(3600), &[], now)
                .unwrap();
            assert_eq!(svid.chain.len(), 2, "leaf and intermediate");
            assert_eq!(svid.chain[1], ca.active().unwrap().cert_der);
            // Verifies against the other server's bundle too.
            let other = &servers[1 - i];
            carapace_core::x509svid::verify_chain(
                &svid.chain,
                &other.bundle().borrow(),
                now as u64,
            )
            .unwrap();
            // A chain without the intermediate does not.
            assert!(
                carapace_core::x509svid::verify_chain(&svid.chain[..1], &bundle_a, now as u64)
                    .is_err()
            );
        }
        let ic = servers[0].active().unwrap().cert_der.clone();
        let parsed = x509_parser::parse_x509_certificate(&ic).unwrap().1;
        let bc = parsed.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(
            bc.path_len_constraint,
            Some(0),
            "the intermediate cannot sign CAs"
        );
    }

    #[tokio::test]
    async fn upstream_survives_restart_and_rotation_keeps_the_root_bundle() {
        let t0 = 1_900_000_000;
        let root = local_root("root", t0).await;
        let ds = Datastore::open_in_memory().await.unwrap();
        let km = Arc::new(MemoryKeyManager::new());
        let ca = load_with(Some(root.clone()), km.clone(), ds.clone(), t0).await;
        let first = ca.active().unwrap().cert_der.clone();
        let seq = ca.bundle().borrow().sequence;
        drop(ca);
        let ca = load_with(Some(root.clone()), km.clone(), ds.clone(), t0 + 60).await;
        assert_eq!(
            ca.active().unwrap().cert_der,
            first,
            "same CA after restart"
        );
        assert_eq!(ca.active().unwrap().chain, vec![first.clone()]);
        // Through preparation and activation the bundle stays the root.
        ca.tick(t0 + 86_400 / 2 + 1).await.unwrap();
        ca.tick(t0 + 86_400 * 5 / 6 + 1).await.unwrap();
        assert_ne!(ca.active().unwrap().cert_der, first, "rotated");
        let bundle = ca.bundle().borrow().clone();
        assert_eq!(bundle.x509_authorities, root.x509_roots().await.unwrap());
        // The sequence counts content changes: the prepared JWT key is one; activating
        // an intermediate under the same root changes nothing in the bundle.
        assert_eq!(
            bundle.sequence,
            seq + 1,
            "each content change bumps the sequence"
        );
    }

    #[tokio::test]
    async fn switching_to_an_upstream_retires_the_self_signed_ca_into_the_bundle() {
        let t0 = 1_900_000_000;
        let ds = Datastore::open_in_memory().await.unwrap();
        let km = Arc::new(MemoryKeyManager::new());
        let ca = load_with(None, km.clone(), ds.clone(), t0).await;
        let self_signed = ca.active().unwrap().cert_der.clone();
        let old_key = ca.active().unwrap().key_id.clone();
        drop(ca);
        let root = local_root("root", t0).await;
        let root_der = root.x509_roots().await.unwrap().remove(0);
        let ca = load_with(Some(root.clone()), km.clone(), ds.clone(), t0 + 60).await;
        assert!(ca.active().unwrap().upstream.is_some());
        assert_eq!(
            ca.bundle().borrow().x509_authorities,
            vec![self_signed.clone(), root_der.clone()],
            "the old CA stays trusted until it expires"
        );
        // After the old CA expires its key is deleted and only the root remains.
        ca.tick(t0 + 86_400 + 1).await.unwrap();
        let bundle = ca.bundle().borrow().clone();
        assert!(!bundle.x509_authorities.contains(&self_signed));
        assert!(bundle.x509_authorities.contains(&root_der));
        assert!(matches!(
            km.get_key(&old_key).await,
            Err(carapace_core::Error::KeyNotFound(_))
        ));
        // A new root (another upstream) retires the intermediate minted under the old one.
        let other_root = local_root("other", t0).await;
        let before = ca.active().unwrap().cert_der.clone();
        drop(ca);
        let ca = load_with(Some(other_root.clone()), km, ds, t0 + 86_400 + 2).await;
        assert_ne!(ca.active().unwrap().cert_der, before);
        let auths = ca.bundle().borrow().x509_authorities.clone();
        assert!(
            auths.contains(&root_der),
            "old root stays while its CA is valid"
        );
        assert!(auths.contains(&other_root.x509_roots().await.unwrap()[0]));
    }

    fn ski_of(der: &[u8]) -> Option<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        cert.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(hex::encode(k.0))
                }
                _ => None,
            })
    }

    fn ids(ca: &CaManager) -> Vec<(String, AuthorityStatus, bool)> {
        ca.authorities()
            .into_iter()
            .map(|a| (a.id, a.status, a.tainted))
            .collect()
    }

    #[tokio::test]
    async fn operator_prepares_activates_taints_and_revokes() {
        let t0 = 1_900_000_000;
        let td = TrustDomain::new("example.org").unwrap();
        let (ca, ds, km) = setup(86_400, t0).await;
        let first = ca.active().unwrap();
        let first_id = first.authority_id();
        assert_eq!(
            Some(first_id.clone()),
            ski_of(&first.cert_der),
            "the id is the subject key identifier"
        );
        assert_eq!(
            ids(&ca),
            vec![(first_id.clone(), AuthorityStatus::Active, false)]
        );

        // Nothing prepared: activate is refused and changes nothing.
        let seq0 = ca.bundle().borrow().sequence;
        assert!(matches!(
            ca.activate(None, t0).await,
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(ca.bundle().borrow().sequence, seq0);

        // Prepare: in the bundle, not signing.
        let p1 = ca.prepare(t0 + 1).await.unwrap();
        assert_eq!(p1.status, AuthorityStatus::Prepared);
        let b = ca.bundle().borrow().clone();
        assert_eq!(b.x509_authorities.len(), 2);
        assert!(b.sequence > seq0);
        assert_eq!(ca.active().unwrap().key_id, first.key_id);
        let p1_key = ca.authorities()[1].clone();
        // Preparing again replaces it (SPIRE): the first one signed nothing and goes.
        let p2 = ca.prepare(t0 + 2).await.unwrap();
        assert_ne!(p2.id, p1.id);
        let b = ca.bundle().borrow().clone();
        assert_eq!(b.x509_authorities.len(), 2);
        assert!(!b.x509_authorities.contains(&p1_key.cert_der));
        assert!(
            km.get_key("x509-ca-1").await.is_err(),
            "replaced key deleted"
        );

        // Activate with another id is refused; with the prepared one's id it works.
        let seq = ca.bundle().borrow().sequence;
        assert!(matches!(
            ca.activate(Some(&first_id), t0 + 3).await,
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(ca.bundle().borrow().sequence, seq);
        let act = ca.activate(Some(&p2.id), t0 + 3).await.unwrap();
        assert_eq!(act.status, AuthorityStatus::Active);
        assert_eq!(ca.active().unwrap().authority_id(), p2.id);
        assert_eq!(
            ids(&ca),
            vec![
                (p2.id.clone(), AuthorityStatus::Active, false),
                (first_id.clone(), AuthorityStatus::Old, false)
            ]
        );

        // Wrong states and ids are refused and change nothing.
        let before = (ids(&ca), ca.bundle().borrow().clone());
        let refused = [
            ca.taint(&p2.id).await.unwrap_err(),
            ca.revoke(&p2.id).await.unwrap_err(),
            ca.revoke(&first_id).await.unwrap_err(),
            ca.taint("00ff").await.unwrap_err(),
            ca.taint("not-hex").await.unwrap_err(),
            ca.taint("").await.unwrap_err(),
        ];
        assert!(matches!(refused[0], Error::FailedPrecondition(ref m) if m.contains("active")));
        assert!(matches!(refused[1], Error::FailedPrecondition(_)));
        assert!(matches!(refused[2], Error::FailedPrecondition(ref m) if m.contains("tainted")));
        assert!(matches!(refused[3], Error::NotFound(_)));
        assert!(matches!(refused[4], Error::InvalidArgument(_)));
        assert!(matches!(refused[5], Error::InvalidArgument(_)));
        assert_eq!((ids(&ca), ca.bundle().borrow().clone()), before);

        // Taint (typed as openssl prints it): the bundle says so, under a new sequence.
        let colons = first_id
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        let t = ca.taint(&colons).await.unwrap();
        assert!(t.tainted);
        let b = ca.bundle().borrow().clone();
        assert!(b.sequence > before.1.sequence);
        assert_eq!(b.tainted_x509_authorities, vec![first.cert_der.clone()]);
        assert!(
            b.x509_authorities.contains(&first.cert_der),
            "still trusted"
        );
        assert!(matches!(
            ca.taint(&first_id).await,
            Err(Error::FailedPrecondition(_))
        ));
        // New SVIDs are never signed by the tainted key.
        let (key, _) = workload_key();
        let id: SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let svid = ca
            .sign_x509_svid(&id, &key, Duration::from_secs(60), &[], t0 + 4)
            .unwrap();
        let mut only_tainted = TrustBundle::new(td.clone());
        only_tainted.x509_authorities = b.tainted_x509_authorities.clone();
        assert!(
            carapace_core::x509svid::verify_chain(&svid.chain, &only_tainted, (t0 + 4) as u64)
                .is_err()
        );
        let old_svid = sign_leaf(&first, &id, &key, Duration::from_secs(600), &[], t0 + 4).unwrap();

        // The taint survives a restart; the rotator leaves it alone.
        drop(ca);
        let ca = CaManager::load(
            td.clone(),
            km.clone(),
            None,
            ds.clone(),
            settings(86_400),
            t0 + 5,
        )
        .await
        .unwrap();
        assert_eq!(
            ids(&ca),
            vec![
                (p2.id.clone(), AuthorityStatus::Active, false),
                (first_id.clone(), AuthorityStatus::Old, true)
            ]
        );
        assert_eq!(
            ca.bundle().borrow().tainted_x509_authorities,
            vec![first.cert_der.clone()]
        );

        // Revoke: out of the bundle, key deleted, and it stays gone through restarts and
        // rotator ticks.
        let r = ca.revoke(&first_id).await.unwrap();
        assert_eq!(r.id, first_id);
        let b = ca.bundle().borrow().clone();
        assert!(!b.x509_authorities.contains(&first.cert_der));
        assert!(b.tainted_x509_authorities.is_empty());
        assert!(
            km.get_key(&first.key_id).await.is_err(),
            "revoked key deleted"
        );
        assert!(
            carapace_core::x509svid::verify_chain(&old_svid.chain, &b, (t0 + 6) as u64).is_err(),
            "an SVID of the revoked CA no longer verifies"
        );
        carapace_core::x509svid::verify_chain(&svid.chain, &b, (t0 + 6) as u64).unwrap();
        assert!(matches!(
            ca.revoke(&first_id).await,
            Err(Error::NotFound(_))
        ));
        let seq = b.sequence;
        for t in [t0 + 10, t0 + 20, t0 + 30] {
            ca.tick(t).await.unwrap();
        }
        assert_eq!(
            ca.bundle().borrow().sequence,
            seq,
            "the rotator changes nothing"
        );
        drop(ca);
        let ca = CaManager::load(td, km, None, ds, settings(86_400), t0 + 40)
            .await
            .unwrap();
        assert_eq!(
            ids(&ca),
            vec![(p2.id.clone(), AuthorityStatus::Active, false)]
        );
        assert_eq!(ca.bundle().borrow().x509_authorities.len(), 1);
    }

    #[test]
    fn journals_written_before_taint_existed_still_load() {
        let old = r#"{"next_seq":2,"active":{"key_id":"x509-ca-1","cert_der_hex":"00"},
            "prepared":null,"retired":[{"key_id":"x509-ca-0","cert_der_hex":"00"}],
            "bundle_sequence":3}"#;
        let j: Journal = serde_json::from_str(old).unwrap();
        assert!(!j.retired[0].tainted);
        let again = serde_json::to_string(&j).unwrap();
        assert!(!again.contains("tainted"), "{again}");
    }

    #[tokio::test]
    async fn an_upstream_certified_ca_cannot_be_tainted_locally() {
        let t0 = 1_900_000_000;
        let root = local_root("root", t0).await;
        let ds = Datastore::open_in_memory().await.unwrap();
        let km = Arc::new(MemoryKeyManager::new());
        let ca = load_with(Some(root), km, ds, t0).await;
        ca.prepare(t0 + 1).await.unwrap();
        let old = ca.active().unwrap().authority_id();
        ca.activate(None, t0 + 2).await.unwrap();
        let before = ca.bundle().borrow().clone();
        let err = ca.taint(&old).await.unwrap_err();
        assert!(
            matches!(err, Error::FailedPrecondition(ref m) if m.contains("upstream")),
            "{err}"
        );
        assert_eq!(*ca.bundle().borrow().as_ref(), *before);
    }
}
