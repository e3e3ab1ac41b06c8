//! EK trust: the certificate chain to a manufacturer root, or the allowlist.

use carapace_core::Error;
use carapace_core::selector::MAX_SELECTOR_VALUE_LEN;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::Public;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey;
use x509_parser::time::ASN1Time;

use super::public::{ek_pubhash, uncompressed_point};
use super::{Result, reject};

/// tcg-kp-EKCertificate, the extended key usage of an EK certificate.
const TCG_KP_EK_CERTIFICATE: &str = "2.23.133.8.1";
/// Extensions an EK certificate or an EK CA certificate may mark critical: key usage,
/// subject alternative name (an EK certificate's TCG directoryName SAN is critical
/// because its subject is empty), basic constraints, extended key usage, certificate
/// policies, subject directory attributes (TCG TPM specification), key identifiers.
const KNOWN_CRITICAL: [&str; 8] = [
    "2.5.29.15",
    "2.5.29.17",
    "2.5.29.19",
    "2.5.29.37",
    "2.5.29.32",
    "2.5.29.9",
    "2.5.29.14",
    "2.5.29.35",
];
/// The longest chain searched: leaf, up to this many intermediates, root.
const MAX_INTERMEDIATES: usize = 6;
/// The most candidate issuers tried in all (bounds the search on hostile input).
const MAX_SIGNATURE_CHECKS: usize = 64;

/// Which Endorsement Keys the server trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EkPolicy {
    /// Manufacturer root certificates (DER): trust anchors for EK certificates.
    pub roots: Vec<Vec<u8>>,
    /// Intermediate CA certificates (DER) from the server's configuration, used with the
    /// ones the agent sends to build chains. They are never trust anchors.
    pub intermediates: Vec<Vec<u8>>,
    /// EK hashes ([`ek_pubhash`](super::ek_pubhash), 64 lowercase hex digits) trusted
    /// without a certificate.
    pub allowlist: Vec<String>,
}

impl EkPolicy {
    /// Builds a policy from configuration, checking that every certificate parses and
    /// every allowlist entry is a SHA-256 hash (normalised to lowercase). Errors are
    /// [`Error::PluginConfig`] for plugin `tpm`. (A policy built directly from its fields
    /// skips unparsable certificates at verification time.)
    pub fn new(
        roots: Vec<Vec<u8>>,
        intermediates: Vec<Vec<u8>>,
        allowlist: Vec<String>,
    ) -> Result<EkPolicy> {
        let config = |reason: String| Error::PluginConfig {
            plugin: "tpm".into(),
            reason,
        };
        for (what, list) in [("EK root", &roots), ("EK intermediate", &intermediates)] {
            for (i, der) in list.iter().enumerate() {
                let cert =
                    parse_cert(der).map_err(|e| config(format!("{what} #{}: {e}", i + 1)))?;
                if what == "EK intermediate" && !is_ca(&cert) {
                    return Err(config(format!(
                        "{what} #{} ({}) is not a CA certificate",
                        i + 1,
                        cert.subject()
                    )));
                }
            }
        }
        let mut hashes = Vec::with_capacity(allowlist.len());
        for entry in allowlist {
            let h = entry.trim().to_ascii_lowercase();
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(config(format!(
                    "EK allowlist entry {entry:?} is not a SHA-256 hash (64 hex digits)"
                )));
            }
            hashes.push(h);
        }
        Ok(EkPolicy {
            roots,
            intermediates,
            allowlist: hashes,
        })
    }
}

/// Why the server trusts an EK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EkTrust {
    /// Its certificate chains to a configured manufacturer root and certifies this key.
    Certificate,
    /// Its hash is on the allowlist (its certificate, if any, did not establish trust).
    Allowlist,
}

/// A trusted EK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkIdentity {
    /// [`ek_pubhash`](super::ek_pubhash) of the EK.
    pub pubhash: String,
    /// Why it is trusted.
    pub trust: EkTrust,
    /// The EK certificate issuer's common name, when trusted through the certificate
    /// (and the CN is a usable selector value: no control characters, at most 1000 bytes).
    pub cert_issuer_cn: Option<String>,
    /// The EK certificate's serial number, lowercase hex without leading zero bytes, when
    /// trusted through the certificate.
    pub cert_serial_hex: Option<String>,
}

/// Decides whether an EK is trusted.
///
/// - `ek_public`: the EK public area the agent sent (credential activation proves the AK
///   is in the TPM holding this EK);
/// - `ek_cert`: the EK certificate (DER) from the TPM's NV, if any (an empty slice counts
///   as none; bytes after the certificate, NV padding, are ignored);
/// - `agent_intermediates`: CA certificates the agent found in NV;
/// - `now`: the current time, Unix seconds.
///
/// A certificate, when present and parsable, must certify exactly `ek_public`'s key
/// (RSA modulus and exponent, or EC curve and point), whatever else holds. The EK is then
/// trusted when the certificate chains to one of `policy.roots` — signature by signature
/// through CA intermediates from the agent or the configuration, every certificate but
/// the root valid at `now`, no unknown critical extension, an extended key usage (if any)
/// including tcg-kp-EKCertificate — or else when its hash is on `policy.allowlist`.
///
/// With an allowlisted hash, a certificate that does not chain (or that x509-parser cannot
/// parse: some EK certificates are not strict DER) is ignored, and the identity carries no
/// certificate fields: selectors never come from an unverified certificate.
pub fn verify_ek(
    policy: &EkPolicy,
    ek_public: &Public,
    ek_cert: Option<&[u8]>,
    agent_intermediates: &[Vec<u8>],
    now: i64,
) -> Result<EkIdentity> {
    verify_ek_until(policy, ek_public, ek_cert, agent_intermediates, now)
        .map(|(identity, _)| identity)
}

/// [`verify_ek`], and until when (Unix seconds) the certificate chain it found stays
/// valid: `None` when the trust came from the allowlist.
fn verify_ek_until(
    policy: &EkPolicy,
    ek_public: &Public,
    ek_cert: Option<&[u8]>,
    agent_intermediates: &[Vec<u8>],
    now: i64,
) -> Result<(EkIdentity, Option<i64>)> {
    let pubhash = ek_pubhash(ek_public)?;
    let allowlisted = policy
        .allowlist
        .iter()
        .any(|h| h.eq_ignore_ascii_case(&pubhash));
    let allowlist_identity = || EkIdentity {
        pubhash: pubhash.clone(),
        trust: EkTrust::Allowlist,
        cert_issuer_cn: None,
        cert_serial_hex: None,
    };
    let not_trusted = |why: &str| {
        reject(format!(
            "EK is not trusted: its certificate does not chain to a configured manufacturer \
             root and its hash {pubhash} is not on the allowlist ({why})"
        ))
    };
    let Some(der) = ek_cert.filter(|c| !c.is_empty()) else {
        return if allowlisted {
            Ok((allowlist_identity(), None))
        } else {
            Err(reject(format!(
                "EK is not trusted: it has no certificate and its hash {pubhash} is not on the allowlist"
            )))
        };
    };
    let cert = match X509Certificate::from_der(der) {
        Ok((_, cert)) => cert,
        Err(e) if allowlisted => {
            tracing::debug!(error = %e, "EK certificate unparsable; EK trusted by the allowlist");
            return Ok((allowlist_identity(), None));
        }
        Err(e) => {
            return Err(not_trusted(&format!(
                "the EK certificate cannot be parsed as X.509 (x509-parser: {e}); \
                 allowlist the EK hash if its certificate is malformed"
            )));
        }
    };
    check_same_key(&cert, ek_public)?;

    let time = ASN1Time::from_timestamp(now)
        .map_err(|e| reject(format!("verification time {now} is out of range: {e}")))?;
    match build_chain(&cert, policy, agent_intermediates, time) {
        Ok(valid_until) => {
            let cert_issuer_cn = cert
                .issuer()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .filter(|cn| {
                    !cn.is_empty()
                        && cn.len() + "ek_cert_issuer_cn:".len() <= MAX_SELECTOR_VALUE_LEN
                        && !cn.chars().any(char::is_control)
                })
                .map(str::to_owned);
            Ok((
                EkIdentity {
                    pubhash,
                    trust: EkTrust::Certificate,
                    cert_issuer_cn,
                    cert_serial_hex: Some(serial_hex(cert.raw_serial())),
                },
                Some(valid_until),
            ))
        }
        Err(_) if allowlisted => Ok((allowlist_identity(), None)),
        Err(why) => Err(not_trusted(&why)),
    }
}

/// The most chains an [`EkCache`] remembers; when full it starts again empty.
pub const EK_CACHE_MAX: usize = 16_384;

/// EK certificate chains that verified, so a TPM attesting again (at every renewal of
/// its agent) costs a hash and a lookup instead of parsing the roots and checking each
/// signature of the chain again.
///
/// An entry is keyed by the SHA-256 of exactly what was verified (the EK public area,
/// the certificate and the agent's intermediates, each length-prefixed), holds the
/// identity [`verify_ek`] returned, and is used only while every certificate of the
/// chain it found is still valid, and not before the time it was verified at (a clock
/// set back does not reach certificates not yet valid then). Only trust through a
/// certificate is cached; failures
/// never are. One cache belongs to one [`EkPolicy`]: a server reloading its policy
/// builds a new attestor, and a new cache with it.
#[derive(Debug, Default)]
pub struct EkCache {
    /// Key → (identity, verified at, valid until), Unix seconds.
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], (EkIdentity, i64, i64)>>,
}

impl EkCache {
    /// [`verify_ek`], with the EK public area as the bytes the agent sent
    /// (`ek_public_bytes`, which parsed as `ek_public`).
    pub fn verify(
        &self,
        policy: &EkPolicy,
        ek_public_bytes: &[u8],
        ek_public: &Public,
        ek_cert: Option<&[u8]>,
        agent_intermediates: &[Vec<u8>],
        now: i64,
    ) -> Result<EkIdentity> {
        use sha2::{Digest as _, Sha256};
        let Some(der) = ek_cert.filter(|c| !c.is_empty()) else {
            return verify_ek(policy, ek_public, ek_cert, agent_intermediates, now);
        };
        let mut h = Sha256::new();
        for part in [ek_public_bytes, der]
            .into_iter()
            .chain(agent_intermediates.iter().map(Vec::as_slice))
        {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let key: [u8; 32] = h.finalize().into();
        let mut entries = crate::lock(&self.entries);
        if let Some((identity, verified_at, valid_until)) = entries.get(&key) {
            if (*verified_at..=*valid_until).contains(&now) {
                return Ok(identity.clone());
            }
            entries.remove(&key);
        }
        drop(entries);

        let (identity, valid_until) =
            verify_ek_until(policy, ek_public, ek_cert, agent_intermediates, now)?;
        if let Some(valid_until) = valid_until {
            let mut entries = crate::lock(&self.entries);
            if entries.len() >= EK_CACHE_MAX {
                entries.clear();
            }
            entries.insert(key, (identity.clone(), now, valid_until));
        }
        Ok(identity)
    }

    /// How many chains are remembered.
    pub fn len(&self) -> usize {
        crate::lock(&self.entries).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads configuration certificates: every `CERTIFICATE` block of a PEM file, or one DER
/// certificate. Errors are [`Error::PluginConfig`] for plugin `tpm`.
pub fn certificates_from_pem_or_der(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let config = |reason: String| Error::PluginConfig {
        plugin: "tpm".into(),
        reason,
    };
    if bytes.first() == Some(&0x30) {
        parse_cert(bytes).map_err(config)?;
        return Ok(vec![bytes.to_vec()]);
    }
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        let pem = pem.map_err(|e| config(format!("malformed PEM: {e}")))?;
        if pem.label == "CERTIFICATE" {
            parse_cert(&pem.contents).map_err(config)?;
            out.push(pem.contents);
        }
    }
    if out.is_empty() {
        return Err(config("no certificate found (PEM or DER expected)".into()));
    }
    Ok(out)
}

/// Whether `der` is a self-signed certificate (issuer equals subject and its signature
/// verifies with its own key): how a configured CA file tells roots from intermediates.
pub fn is_self_signed(der: &[u8]) -> bool {
    match parse_cert(der) {
        Ok(cert) => {
            cert.issuer().as_raw() == cert.subject().as_raw() && cert.verify_signature(None).is_ok()
        }
        Err(_) => false,
    }
}

fn parse_cert(der: &[u8]) -> std::result::Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )),
        Err(e) => Err(format!("not an X.509 certificate: {e}")),
    }
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// The certificate's key must be the EK's: same RSA modulus and exponent, or same curve
/// and point (compared as curve points, so a compressed point in a certificate matches).
fn check_same_key(cert: &X509Certificate<'_>, ek: &Public) -> Result<()> {
    let mismatch = |detail: String| {
        reject(format!(
            "EK certificate's public key does not match the EK public area ({detail})"
        ))
    };
    let spki = cert.public_key();
    let parsed = spki
        .parsed()
        .map_err(|e| reject(format!("EK certificate's public key cannot be parsed: {e}")))?;
    match (ek, parsed) {
        (
            Public::Rsa {
                parameters, unique, ..
            },
            PublicKey::RSA(rsa),
        ) => {
            let exponent = match parameters.exponent().value() {
                0 => 65537,
                e => e,
            };
            let cert_exponent = rsa.try_exponent().ok();
            if strip_zeros(rsa.modulus) != strip_zeros(unique.value()) {
                return Err(mismatch("different RSA modulus".into()));
            }
            if cert_exponent != Some(u64::from(exponent)) {
                return Err(mismatch("different RSA exponent".into()));
            }
            Ok(())
        }
        (
            Public::Ecc {
                parameters, unique, ..
            },
            PublicKey::EC(point),
        ) => {
            let curve = parameters.ecc_curve();
            let ours = uncompressed_point(curve, unique.x().value(), unique.y().value())?;
            let cert_curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            let same = match (curve, cert_curve.as_deref()) {
                (EccCurve::NistP256, Some("1.2.840.10045.3.1.7")) => {
                    p256::PublicKey::from_sec1_bytes(point.data()).ok()
                        == p256::PublicKey::from_sec1_bytes(&ours).ok()
                }
                (EccCurve::NistP384, Some("1.3.132.0.34")) => {
                    p384::PublicKey::from_sec1_bytes(point.data()).ok()
                        == p384::PublicKey::from_sec1_bytes(&ours).ok()
                }
                (_, other) => {
                    return Err(mismatch(format!(
                        "certificate curve {}, public area curve {curve:?}",
                        other.unwrap_or("unknown")
                    )));
                }
            };
            if same {
                Ok(())
            } else {
                Err(mismatch("different EC point".into()))
            }
        }
        (ek, parsed) => Err(mismatch(format!(
            "certificate has {}, public area is {}",
            key_kind(&parsed),
            match ek {
                Public::Rsa { .. } => "RSA",
                Public::Ecc { .. } => "ECC",
                _ => "neither RSA nor ECC",
            }
        ))),
    }
}

fn key_kind(key: &PublicKey<'_>) -> &'static str {
    match key {
        PublicKey::RSA(_) => "an RSA key",
        PublicKey::EC(_) => "an EC key",
        _ => "an unsupported key type",
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

fn serial_hex(raw: &[u8]) -> String {
    let stripped = strip_zeros(raw);
    if stripped.is_empty() {
        "00".into()
    } else {
        hex::encode(stripped)
    }
}

/// Searches a chain from the EK certificate to a configured root. On failure, says why
/// (the problems met on the way, or that no issuer was found).
/// Finds a chain from `leaf` to a root; on success, until when (Unix seconds) every
/// certificate of it but the root (a trust anchor, whose dates are not checked) is valid.
fn build_chain(
    leaf: &X509Certificate<'_>,
    policy: &EkPolicy,
    agent_intermediates: &[Vec<u8>],
    now: ASN1Time,
) -> std::result::Result<i64, String> {
    check_validity("the EK certificate", leaf, now)?;
    check_critical("the EK certificate", leaf)?;
    if let Ok(Some(eku)) = leaf.extended_key_usage() {
        let tcg = eku
            .value
            .other
            .iter()
            .any(|oid| oid.to_id_string() == TCG_KP_EK_CERTIFICATE);
        if !tcg && !eku.value.any {
            return Err(format!(
                "the EK certificate's extended key usage does not include \
                 tcg-kp-EKCertificate ({TCG_KP_EK_CERTIFICATE})"
            ));
        }
    }
    let roots: Vec<X509Certificate<'_>> = policy
        .roots
        .iter()
        .filter_map(|der| parse_cert(der).ok())
        .collect();
    if roots.is_empty() {
        return Err("no manufacturer root is configured".into());
    }
    // Agent-sent intermediates may be NV-padded like the EK certificate.
    let intermediates: Vec<X509Certificate<'_>> = agent_intermediates
        .iter()
        .chain(policy.intermediates.iter())
        .filter_map(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c))
        .collect();
    let mut search = Search {
        roots: &roots,
        intermediates: &intermediates,
        now,
        path: Vec::new(),
        problems: Vec::new(),
        checks: 0,
    };
    if search.issued_to_root(leaf) {
        let valid_until = search
            .path
            .iter()
            .filter_map(|&i| intermediates.get(i))
            .map(|c| c.validity().not_after.timestamp())
            .fold(leaf.validity().not_after.timestamp(), i64::min);
        return Ok(valid_until);
    }
    if search.problems.is_empty() {
        Err(format!(
            "no configured root or intermediate is its issuer {:?}",
            leaf.issuer().to_string()
        ))
    } else {
        search.problems.dedup();
        Err(search.problems.join("; "))
    }
}

/// Depth-first search for a chain, backtracking over candidate issuers.
struct Search<'c, 'a> {
    roots: &'c [X509Certificate<'a>],
    intermediates: &'c [X509Certificate<'a>],
    now: ASN1Time,
    /// Indices of the intermediates on the current path, leaf side first.
    path: Vec<usize>,
    problems: Vec<String>,
    checks: usize,
}

impl Search<'_, '_> {
    fn issued_to_root(&mut self, cert: &X509Certificate<'_>) -> bool {
        for root in self.roots {
            if names_match(cert, root) && self.signed_by(cert, root) {
                return true;
            }
        }
        if self.path.len() >= MAX_INTERMEDIATES {
            self.problems.push(format!(
                "chain longer than {MAX_INTERMEDIATES} intermediates"
            ));
            return false;
        }
        for (i, ca) in self.intermediates.iter().enumerate() {
            if self.path.contains(&i) || !names_match(cert, ca) {
                continue;
            }
            let what = format!("intermediate {:?}", ca.subject().to_string());
            if let Err(problem) = self.usable_ca(&what, ca) {
                self.problems.push(problem);
                continue;
            }
            if !self.signed_by(cert, ca) {
                continue;
            }
            self.path.push(i);
            if self.issued_to_root(ca) {
                return true;
            }
            self.path.pop();
        }
        false
    }

    /// A CA certificate may issue at this depth: a CA, allowed to sign certificates,
    /// valid now, within its path length constraint, no unknown critical extension.
    fn usable_ca(&self, what: &str, ca: &X509Certificate<'_>) -> std::result::Result<(), String> {
        match ca.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {
                if let Some(max) = bc.value.path_len_constraint {
                    // Intermediates already between this CA and the EK certificate.
                    if self.path.len() > max as usize {
                        return Err(format!(
                            "{what} allows {max} intermediates below it, the chain has {}",
                            self.path.len()
                        ));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "{what} is not a CA (basicConstraints cA is not set)"
                ));
            }
        }
        if let Ok(Some(ku)) = ca.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(format!("{what} may not sign certificates (no keyCertSign)"));
            }
        }
        check_validity(what, ca, self.now)?;
        check_critical(what, ca)
    }

    fn signed_by(&mut self, cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
        if self.checks >= MAX_SIGNATURE_CHECKS {
            return false;
        }
        self.checks += 1;
        if cert.signature_algorithm != cert.tbs_certificate.signature {
            self.problems.push(format!(
                "{:?}: outer and inner signature algorithms differ",
                cert.subject().to_string()
            ));
            return false;
        }
        match cert.verify_signature(Some(issuer.public_key())) {
            Ok(()) => true,
            Err(e) => {
                self.problems.push(format!(
                    "signature on {:?} does not verify with the key of {:?} ({e})",
                    describe(cert),
                    issuer.subject().to_string()
                ));
                false
            }
        }
    }
}

fn describe(cert: &X509Certificate<'_>) -> String {
    let subject = cert.subject().to_string();
    if subject.is_empty() {
        format!(
            "the EK certificate (serial {})",
            serial_hex(cert.raw_serial())
        )
    } else {
        subject
    }
}

fn names_match(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    cert.issuer().as_raw() == issuer.subject().as_raw()
        || cert.issuer().to_string() == issuer.subject().to_string()
}

fn check_validity(
    what: &str,
    cert: &X509Certificate<'_>,
    now: ASN1Time,
) -> std::result::Result<(), String> {
    let validity = cert.validity();
    if validity.is_valid_at(now) {
        Ok(())
    } else {
        Err(format!(
            "{what} is not valid at {now} (valid from {} to {})",
            validity.not_before, validity.not_after
        ))
    }
}

fn check_critical(what: &str, cert: &X509Certificate<'_>) -> std::result::Result<(), String> {
    for ext in cert.extensions().iter().filter(|e| e.critical) {
        let oid = ext.oid.to_id_string();
        if let ParsedExtension::ParseError { error } = ext.parsed_extension() {
            return Err(format!(
                "{what} has a critical extension {oid} that cannot be parsed ({error})"
            ));
        }
        if !KNOWN_CRITICAL.contains(&oid.as_str()) {
            return Err(format!(
                "{what} has an unsupported critical extension {oid}"
            ));
        }
    }
    Ok(())
}
