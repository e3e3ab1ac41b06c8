//! Quotes: the AK's signature, the nonce, the PCR selection and digest, and the TPM clock.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{Attest, AttestInfo, PcrSelectionList, Public, Signature};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::public::{hash_name, rsa_public_key, uncompressed_point};
use super::{Result, reject};

/// TPM_GENERATED_VALUE: the magic at the start of every structure the TPM signs itself.
pub(super) const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE.
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// The highest PCR index a selection may name (a PC client TPM has 24 PCRs).
const MAX_PCR: u8 = 23;

/// The TPM clock state a verified quote carries (TPMS_CLOCK_INFO and the firmware
/// version), kept per TPM for [`check_clock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuoteInfo {
    /// Milliseconds the TPM has been powered since it was made (or last cleared);
    /// persisted, so it only goes back when the TPM's state is rolled back.
    pub clock: u64,
    /// TPM resets (power cycles, TPM2_Startup(CLEAR)) since the last TPM2_Clear.
    pub reset_count: u32,
    /// TPM restarts and resumes (TPM2_Startup(STATE)) since the last reset.
    pub restart_count: u32,
    /// Whether `clock` is known not to have been reported lower before (it was saved to
    /// NV since it was last reported): the quote must have it set.
    pub safe: bool,
    /// The TPM's firmware version (vendor-defined).
    pub firmware_version: u64,
}

/// Verifies a quote against the AK that signed it, the challenge, and the PCR values the
/// agent reported; returns the TPM's clock state.
///
/// - `ak`: the AK public area (already checked with `check_ak` and activated);
/// - `attest`: the marshalled TPMS_ATTEST exactly as the TPM produced it
///   (`tpm2_quote -m`);
/// - `signature`: the marshalled TPMT_SIGNATURE (`tpm2_quote -s`): ECDSA over SHA-256
///   of `attest` for an ECC AK (r and s from the signature), RSASSA-PKCS1-v1_5 SHA-256
///   for an RSA AK;
/// - `nonce`: the challenge's fresh nonce, which must be the quote's extraData;
/// - `pcrs`: the requested SHA-256 PCR indices: the quote must cover exactly these;
/// - `pcr_values`: the reported value of each of them (32 bytes each), whose SHA-256
///   over the concatenation in ascending index order must be the quoted digest.
///
/// Checks, in order: the signature, that the structure is a TPM-generated quote, the
/// nonce, the PCR selection, the values, the digest, and that the clock is safe.
pub fn verify_quote(
    ak: &Public,
    attest: &[u8],
    signature: &[u8],
    nonce: &[u8],
    pcrs: &[u8],
    pcr_values: &BTreeMap<u8, Vec<u8>>,
) -> Result<QuoteInfo> {
    check_requested(pcrs)?;
    let sig = Signature::unmarshall(signature).map_err(|e| {
        reject(format!(
            "quote signature is not a valid TPMT_SIGNATURE ({e})"
        ))
    })?;
    let again = sig
        .marshall()
        .map_err(|e| reject(format!("quote signature cannot be re-encoded: {e}")))?;
    if again.as_slice() != signature {
        return Err(reject(
            "quote signature has trailing or non-canonical bytes after the TPMT_SIGNATURE",
        ));
    }
    verify_signature("quote", ak, attest, &sig)?;

    // The signature covers these bytes: now read them.
    if attest.len() < 6 {
        return Err(reject(format!(
            "quote is {} bytes, too short for a TPMS_ATTEST",
            attest.len()
        )));
    }
    let magic = u32::from_be_bytes([attest[0], attest[1], attest[2], attest[3]]);
    if magic != TPM_GENERATED_VALUE {
        return Err(reject(format!(
            "quote is not a TPM-generated structure (magic {magic:#010x}, expected TPM_GENERATED_VALUE {TPM_GENERATED_VALUE:#010x})"
        )));
    }
    let kind = u16::from_be_bytes([attest[4], attest[5]]);
    if kind != TPM_ST_ATTEST_QUOTE {
        return Err(reject(format!(
            "attestation is not a quote (type {kind:#06x}, expected TPM_ST_ATTEST_QUOTE {TPM_ST_ATTEST_QUOTE:#06x})"
        )));
    }
    let parsed = Attest::unmarshall(attest)
        .map_err(|e| reject(format!("quote is not a valid TPMS_ATTEST ({e})")))?;
    let again = parsed
        .marshall()
        .map_err(|e| reject(format!("quote cannot be re-encoded: {e}")))?;
    if again.as_slice() != attest {
        return Err(reject(
            "quote has trailing or non-canonical bytes after the TPMS_ATTEST",
        ));
    }

    if parsed.extra_data().value() != nonce {
        return Err(reject(
            "quote nonce does not match the challenge (stale or replayed quote)",
        ));
    }
    let AttestInfo::Quote { info } = parsed.attested() else {
        return Err(reject("attestation is not a quote"));
    };
    let quoted = sha256_selection(info.pcr_selection())?;
    if quoted != pcrs {
        return Err(reject(format!(
            "quote covers PCRs {}, expected exactly sha256:{}",
            describe_selection(info.pcr_selection()),
            list(pcrs)
        )));
    }
    let mut concatenated = Vec::with_capacity(32 * pcrs.len());
    for index in pcrs {
        let value = pcr_values.get(index).ok_or_else(|| {
            reject(format!(
                "PCR {index} is in the quote but its value was not reported"
            ))
        })?;
        if value.len() != 32 {
            return Err(reject(format!(
                "PCR {index} value is {} bytes, expected 32 (sha256 bank)",
                value.len()
            )));
        }
        concatenated.extend_from_slice(value);
    }
    if let Some(extra) = pcr_values.keys().find(|i| !pcrs.contains(i)) {
        return Err(reject(format!(
            "PCR {extra} value was reported but is not in the quote (unauthenticated)"
        )));
    }
    if Sha256::digest(&concatenated).as_slice() != info.pcr_digest().value() {
        return Err(reject("PCR values do not match the quoted digest"));
    }
    let clock = parsed.clock_info();
    if !clock.safe() {
        return Err(reject("TPM clock not safe"));
    }
    Ok(QuoteInfo {
        clock: clock.clock(),
        reset_count: clock.reset_count(),
        restart_count: clock.restart_count(),
        safe: clock.safe(),
        firmware_version: parsed.firmware_version(),
    })
}

/// Checks a TPM's clock against the previous quote seen from the same TPM (`prev`,
/// `None` for a TPM seen for the first time): `resetCount` never decreases; with the
/// same `resetCount`, `restartCount` never decreases and `clock` strictly increases.
/// A failure means a replayed quote or a TPM whose state was rolled back.
///
/// TPM2_Clear resets both counters: a cleared TPM fails this check until the server
/// forgets its previous state.
pub fn check_clock(prev: Option<&QuoteInfo>, now: &QuoteInfo) -> Result<()> {
    let Some(prev) = prev else {
        return Ok(());
    };
    if now.reset_count < prev.reset_count {
        return Err(reject(format!(
            "TPM resetCount went backwards ({} → {}): replayed or rolled-back state",
            prev.reset_count, now.reset_count
        )));
    }
    if now.reset_count == prev.reset_count {
        if now.restart_count < prev.restart_count {
            return Err(reject(format!(
                "TPM restartCount went backwards ({} → {}) with the same resetCount ({}): \
                 replayed or rolled-back state",
                prev.restart_count, now.restart_count, now.reset_count
            )));
        }
        if now.clock <= prev.clock {
            return Err(reject(format!(
                "TPM clock did not advance ({} → {} ms) with the same resetCount ({}): \
                 replayed or rolled-back state",
                prev.clock, now.clock, now.reset_count
            )));
        }
    }
    Ok(())
}

/// Checks the AK's signature over `attest`; `what` (`quote`, `certify`) names the
/// signed structure in errors.
pub(super) fn verify_signature(
    what: &str,
    ak: &Public,
    attest: &[u8],
    sig: &Signature,
) -> Result<()> {
    match (ak, sig) {
        (
            Public::Ecc {
                parameters, unique, ..
            },
            Signature::EcDsa(s),
        ) => {
            expect_sha256(what, s.hashing_algorithm())?;
            if parameters.ecc_curve() != EccCurve::NistP256 {
                return Err(reject("AK curve is not NIST P-256"));
            }
            let point =
                uncompressed_point(EccCurve::NistP256, unique.x().value(), unique.y().value())?;
            // ring (about 5x faster than the p256 crate here: this is most of the
            // server's CPU per attestation) checks the point is on the curve and r, s
            // are in range.
            let mut rs = [0u8; 64];
            rs[..32].copy_from_slice(&scalar32(what, s.signature_r().value())?);
            rs[32..].copy_from_slice(&scalar32(what, s.signature_s().value())?);
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                &point,
            )
            .verify(attest, &rs)
            .map_err(|_| reject(format!("{what} signature does not verify with the AK")))
        }
        (
            Public::Rsa {
                parameters, unique, ..
            },
            Signature::RsaSsa(s),
        ) => {
            expect_sha256(what, s.hashing_algorithm())?;
            // Checked as the EK and AK checks expect (size, exponent), then verified
            // with ring.
            let key = rsa_public_key(parameters.exponent().value(), unique.value())?;
            let e = rsa::traits::PublicKeyParts::e(&key).to_bytes_be();
            ring::signature::RsaPublicKeyComponents {
                n: unique.value(),
                e: e.as_slice(),
            }
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                attest,
                s.signature().value(),
            )
            .map_err(|_| reject(format!("{what} signature does not verify with the AK")))
        }
        (Public::Ecc { .. }, other) => Err(reject(format!(
            "{what} signature scheme is {:?}, expected ECDSA for an ECC AK",
            other.algorithm()
        ))),
        (Public::Rsa { .. }, other) => Err(reject(format!(
            "{what} signature scheme is {:?}, expected RSASSA for an RSA AK",
            other.algorithm()
        ))),
        _ => Err(reject("AK is not an RSA or ECC key")),
    }
}

fn expect_sha256(what: &str, alg: HashingAlgorithm) -> Result<()> {
    if alg == HashingAlgorithm::Sha256 {
        Ok(())
    } else {
        Err(reject(format!(
            "{what} signed with {}, expected sha256",
            hash_name(alg)
        )))
    }
}

/// A P-256 scalar from a TPM ECC parameter (big-endian, possibly shorter than 32 bytes).
fn scalar32(what: &str, bytes: &[u8]) -> Result<[u8; 32]> {
    if bytes.len() > 32 {
        return Err(reject(format!(
            "{what} signature component is {} bytes, longer than P-256's 32",
            bytes.len()
        )));
    }
    let mut out = [0u8; 32];
    out[32 - bytes.len()..].copy_from_slice(bytes);
    Ok(out)
}

/// The requested selection: ascending, no duplicates, indices 0..=23, at least one.
fn check_requested(pcrs: &[u8]) -> Result<()> {
    if pcrs.is_empty() {
        return Err(reject("requested PCR selection is empty"));
    }
    if pcrs.windows(2).any(|w| w[0] >= w[1]) || pcrs.iter().any(|&i| i > MAX_PCR) {
        return Err(reject(format!(
            "requested PCR selection {} is not ascending, unique indices 0..=23",
            list(pcrs)
        )));
    }
    Ok(())
}

/// The quoted SHA-256 PCR indices, ascending; refuses other banks. Empty selections
/// (which add nothing to the digest) are ignored.
fn sha256_selection(selection: &PcrSelectionList) -> Result<Vec<u8>> {
    let mut banks = selection.get_selections().iter().filter(|s| !s.is_empty());
    let describe = || describe_selection(selection);
    let Some(bank) = banks.next() else {
        return Err(reject("quote covers no PCRs"));
    };
    if banks.next().is_some() || bank.hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err(reject(format!(
            "quote covers PCRs {}, expected only the sha256 bank",
            describe()
        )));
    }
    Ok(indices(bank))
}

fn indices(bank: &tss_esapi::structures::PcrSelection) -> Vec<u8> {
    let mut out: Vec<u8> = bank
        .selected()
        .into_iter()
        .filter_map(|slot| u8::try_from(u32::from(slot).trailing_zeros()).ok())
        .collect();
    out.sort_unstable();
    out
}

fn describe_selection(selection: &PcrSelectionList) -> String {
    let banks: Vec<String> = selection
        .get_selections()
        .iter()
        .map(|bank| {
            format!(
                "{}:{}",
                hash_name(bank.hashing_algorithm()),
                list(&indices(bank))
            )
        })
        .collect();
    if banks.is_empty() {
        "(none)".into()
    } else {
        banks.join("+")
    }
}

fn list(pcrs: &[u8]) -> String {
    pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}
