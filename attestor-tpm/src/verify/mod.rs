//! The server's checks of TPM evidence: pure functions over bytes, no TPM needed.
//!
//! What a `tpm` node attestation proves, and where:
//! - [`verify_ek`]: the Endorsement Key belongs to a genuine TPM: its certificate chains
//!   to a configured manufacturer root (and certifies exactly this key), or its hash is on
//!   the operator's allowlist;
//! - [`check_ak`]: the Attestation Key is a restricted signing key generated in a TPM
//!   (credential activation, in `credential`, then proves it is in *the same* TPM as the
//!   EK, bound by [`name_of`]);
//! - [`verify_quote`]: the AK signed a fresh quote (the server's nonce) over exactly the
//!   requested PCRs, and the reported PCR values are the quoted ones;
//! - [`check_clock`]: a TPM seen before did not go back in time (replayed or rolled-back
//!   state);
//! - [`check_pcr_policy`]: measured boot reached a known-good state;
//! - [`check_agent_key`], [`verify_certify`]: the agent key (the CSR's) is a P-256
//!   signing key generated in and bound to a TPM, and the AK certified (TPM2_Certify,
//!   fresh nonce) that it is loaded in the AK's TPM;
//! - [`selectors`]: what the node is, for registration entries.
//!
//! Every rejection is [`Error::AttestationRejected`] with a message naming exactly what
//! failed. All TPM structures are in their TPM wire encoding (tss-esapi `Marshall`), and
//! each parser refuses trailing or non-canonical bytes, so the bytes that were signed or
//! hashed are the bytes that were checked.

mod certify;
mod ek;
mod pcr;
mod public;
mod quote;

use std::collections::BTreeMap;

use carapace_core::{Error, Selector};

pub use certify::{check_agent_key, verify_certify};
pub use ek::{
    EK_CACHE_MAX, EkCache, EkIdentity, EkPolicy, EkTrust, certificates_from_pem_or_der,
    is_self_signed, verify_ek,
};
pub use pcr::{PcrPolicy, check_pcr_policy, parse_hex_digest, parse_pcr_values};
pub use public::{
    check_ak, ek_pubhash, name_of, parse_public, parse_public_as, public_key_spki_der,
};
pub use quote::{QuoteInfo, check_clock, verify_quote};

/// The selector type every `tpm` selector has.
pub const SELECTOR_TYPE: &str = "tpm";

/// The selector value (type [`SELECTOR_TYPE`]) of a node whose agent key (the key of
/// its agent SVID, from the CSR) the AK certified to be in the same TPM:
/// `tpm:agent_key:tpm`.
pub const AGENT_KEY_IN_TPM_SELECTOR: &str = "agent_key:tpm";

/// Shorthand for this module's results.
pub type Result<T> = std::result::Result<T, Error>;

/// Builds a rejection.
fn reject(message: impl Into<String>) -> Error {
    Error::AttestationRejected(message.into())
}

/// The node's selectors (type [`SELECTOR_TYPE`]):
/// - `tpm:ek_pubhash:<hex>`: always ([`ek_pubhash`]);
/// - `tpm:ek_cert_issuer_cn:<cn>` and `tpm:ek_cert_serial:<hex>`: when the EK was trusted
///   through its certificate chain ([`EkTrust::Certificate`]); never from an unverified
///   certificate;
/// - `tpm:pcr:sha256:<index>:<hex>`: one per quoted PCR (decimal index, lowercase hex).
///
/// The server adds [`AGENT_KEY_IN_TPM_SELECTOR`] when the agent key was certified.
///
/// `pcr_values` must be the values [`verify_quote`] accepted: values outside the quote are
/// unauthenticated.
///
/// Fails only on an [`EkIdentity`] built by hand with an issuer CN that is not a valid
/// selector value ([`verify_ek`] keeps only valid ones).
pub fn selectors(ek: &EkIdentity, pcr_values: &BTreeMap<u8, Vec<u8>>) -> Result<Vec<Selector>> {
    let mut values = vec![format!("ek_pubhash:{}", ek.pubhash)];
    if let Some(cn) = &ek.cert_issuer_cn {
        values.push(format!("ek_cert_issuer_cn:{cn}"));
    }
    if let Some(serial) = &ek.cert_serial_hex {
        values.push(format!("ek_cert_serial:{serial}"));
    }
    for (index, value) in pcr_values {
        values.push(format!("pcr:sha256:{index}:{}", hex::encode(value)));
    }
    values
        .iter()
        .map(|v| Selector::new(SELECTOR_TYPE, v))
        .collect()
}
