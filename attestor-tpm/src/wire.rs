//! The `tpm` attestation messages: JSON, byte fields in standard base64. TPM structures
//! travel in their TPM wire encoding (the `Marshall` form of tss-esapi), so any TPM
//! software stack can produce them.
//!
//! One round trip:
//! 1. agent → server [`Payload`]: EK certificate (and intermediates found in NV), EK
//!    public area, AK public area;
//! 2. server → agent [`Challenge`]: a credential for the AK's name encrypted to the EK
//!    (software MakeCredential), a fresh nonce, the PCR selection to quote;
//! 3. agent → server [`Response`]: the decrypted credential (ActivateCredential: the AK
//!    is in the same TPM as the EK), a quote over the PCRs with the nonce, and the PCR
//!    values.
//!
//! When the agent's own key (the one its CSR certifies) is a TPM key of the agent's
//! `tpm` key manager, the [`Payload`] also carries its public area
//! (`agent_key_public`) and the [`Response`] a TPM2_Certify of it by the AK over the
//! same nonce (`agent_key_certify`, `agent_key_certify_signature`): proof that the
//! CSR's key lives in the same TPM as the AK and EK. These optional fields are left out
//! of the JSON when absent, so an agent without a TPM key sends exactly the version 1
//! messages of earlier releases.
//!
//! # Version 2
//!
//! An agent speaking version 2 says so in its [`Payload`], and the server answers in
//! kind; a version 1 agent gets a version 1 challenge, without the new fields (it would
//! refuse them). Version 2 changes two things:
//!
//! - **Channel binding.** The quote's and the certification's qualifying data is
//!   [`qualifying_data`]: SHA-256 over a label, the server's nonce and the TLS exporter
//!   of the attestation's connection, instead of the bare nonce. Evidence an agent
//!   produced on one connection proves nothing on another, which is what lets a
//!   composite attestation say every proof was made on the same TLS session.
//! - **The boot event log.** A version 2 challenge sets `event_log`, and the
//!   [`Response`] may carry the node's TCG boot event log (`event_log`), which the server
//!   replays against the quote ([`crate::eventlog`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use carapace_core::Error;

/// The version this release speaks (see the module doc).
pub const VERSION: u32 = 2;
/// The version of earlier releases, still accepted from agents.
pub const VERSION_1: u32 = 1;

/// The largest payload or challenge either side accepts: an EK certificate chain,
/// public areas, a quote and a certification are a few KiB.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The largest [`Response`] a server accepts: [`MAX_MESSAGE`] and an event log of up to
/// [`crate::eventlog::MAX_LOG_BYTES`] in base64.
pub const MAX_RESPONSE: usize = MAX_MESSAGE + crate::eventlog::MAX_LOG_BYTES.div_ceil(3) * 4;

/// The label of [`qualifying_data`].
const QUALIFYING_LABEL: &[u8] = b"carapace tpm attestation v2\0";

/// The qualifying data (extraData) of a version 2 quote and certification: SHA-256 of
/// a label, the server's nonce and the TLS exporter of the attestation's connection.
/// Version 1 used the bare nonce.
pub fn qualifying_data(version: u32, nonce: &[u8], tls_exporter: &[u8]) -> Vec<u8> {
    use sha2::{Digest as _, Sha256};
    if version == VERSION_1 {
        return nonce.to_vec();
    }
    let mut h = Sha256::new();
    h.update(QUALIFYING_LABEL);
    h.update((nonce.len() as u32).to_be_bytes());
    h.update(nonce);
    h.update(tls_exporter);
    h.finalize().to_vec()
}

/// Serde adapter: bytes as standard base64.
pub mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises bytes as base64.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    /// Parses base64 into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: optional bytes as base64 (absent or `null` is `None`); use with
/// `#[serde(default, skip_serializing_if = "Option::is_none")]`.
pub mod b64_opt {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises `Some` bytes as base64 (and `None` as `null`).
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_some(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    /// Parses an optional base64 string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Serde adapter: a list of byte strings as base64.
pub mod b64_list {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises each item as base64.
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(&STANDARD.encode(item))?;
        }
        seq.end()
    }

    /// Parses a list of base64 strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        list.into_iter()
            .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Agent → server: who the TPM is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// [`VERSION`].
    pub version: u32,
    /// The EK certificate (DER) from the TPM's NV, if it has one.
    #[serde(with = "b64")]
    pub ek_cert: Vec<u8>,
    /// Intermediate certificates found in NV (DER), possibly none.
    #[serde(with = "b64_list")]
    pub ek_intermediates: Vec<Vec<u8>>,
    /// The EK's public area, a marshalled TPMT_PUBLIC.
    #[serde(with = "b64")]
    pub ek_public: Vec<u8>,
    /// The AK's public area, a marshalled TPMT_PUBLIC.
    #[serde(with = "b64")]
    pub ak_public: Vec<u8>,
    /// The agent key's public area (a marshalled TPMT_PUBLIC) when the key the CSR
    /// certifies is a TPM key: the server then requires a TPM2_Certify of it in the
    /// [`Response`]. Absent for an agent key outside the TPM.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub agent_key_public: Option<Vec<u8>>,
}

/// The PCRs to quote: one bank and a list of indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcrSelection {
    /// The bank: `sha256` (the only one accepted for now).
    pub hash: String,
    /// PCR indices, 0..=23, ascending, no duplicates.
    pub pcrs: Vec<u8>,
}

/// Server → agent: prove the AK is in this TPM, and quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// [`VERSION`].
    pub version: u32,
    /// The credential blob, a marshalled TPM2B_ID_OBJECT's contents (TPMS_ID_OBJECT:
    /// integrity HMAC and encrypted identity).
    #[serde(with = "b64")]
    pub credential_blob: Vec<u8>,
    /// The seed encrypted to the EK, a TPM2B_ENCRYPTED_SECRET's contents.
    #[serde(with = "b64")]
    pub encrypted_secret: Vec<u8>,
    /// 32 fresh random bytes, the quote's qualifying data.
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    /// What to quote.
    pub pcr_selection: PcrSelection,
    /// Version 2: send the boot event log with the answer, when the node has one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub event_log: bool,
}

/// Agent → server: the activated credential and the quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// [`VERSION`].
    pub version: u32,
    /// The secret ActivateCredential recovered.
    #[serde(with = "b64")]
    pub activated_secret: Vec<u8>,
    /// The quote, a marshalled TPMS_ATTEST.
    #[serde(with = "b64")]
    pub quote: Vec<u8>,
    /// The AK's signature over `quote`, a marshalled TPMT_SIGNATURE.
    #[serde(with = "b64")]
    pub quote_signature: Vec<u8>,
    /// The selected PCRs' values, by index (lowercase hex of the digest).
    pub pcr_values: BTreeMap<u8, String>,
    /// TPM2_Certify of the agent key named in the payload, signed by the AK with the
    /// challenge nonce as qualifying data: a marshalled TPMS_ATTEST
    /// (TPM_ST_ATTEST_CERTIFY). Present exactly when the payload named an agent key.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub agent_key_certify: Option<Vec<u8>>,
    /// The AK's signature over `agent_key_certify`, a marshalled TPMT_SIGNATURE.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub agent_key_certify_signature: Option<Vec<u8>>,
    /// Version 2: the node's TCG boot event log (crypto-agile format), when the challenge
    /// asked for it and the node has one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub event_log: Option<Vec<u8>>,
}

/// Parses a message of at most [`MAX_MESSAGE`] bytes, naming what is wrong.
pub fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, Error> {
    carapace_core::plugin::decode_message(crate::server::PLUGIN_NAME, what, bytes, MAX_MESSAGE)
}

/// Parses a [`Response`] of at most [`MAX_RESPONSE`] bytes (it may carry an event log).
pub fn decode_response(bytes: &[u8]) -> Result<Response, Error> {
    carapace_core::plugin::decode_message(
        crate::server::PLUGIN_NAME,
        "response",
        bytes,
        MAX_RESPONSE,
    )
}

/// Encodes a message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    serde_json::to_vec(msg).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn messages_are_capped_before_they_are_parsed() {
        // Valid JSON for a map, one byte over the cap: refused for its size alone.
        let mut big = b"{\"a\":\"".to_vec();
        big.resize(MAX_MESSAGE - 1, b'x');
        big.extend_from_slice(b"\"}");
        let err = decode::<BTreeMap<String, String>>("payload", &big).unwrap_err();
        assert!(
            matches!(&err, Error::AttestationRejected(m) if m == "tpm: the payload is 65537 bytes, more than 65536"),
            "{err:?}"
        );
        // At the cap it parses.
        big.remove(10);
        assert_eq!(
            decode::<BTreeMap<String, String>>("payload", &big)
                .unwrap()
                .len(),
            1
        );
        // A response may carry a 1 MiB event log in base64, and no more.
        let mut log = b"{\"a\":\"".to_vec();
        log.resize(MAX_RESPONSE - 1, b'x');
        log.extend_from_slice(b"\"}");
        let err = decode_response(&log).unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
        const { assert!(MAX_RESPONSE >= MAX_MESSAGE + crate::eventlog::MAX_LOG_BYTES * 4 / 3) };
        let err = decode::<Payload>("payload", b"{").unwrap_err();
        assert!(err.to_string().contains("tpm: malformed payload"), "{err}");
    }

    #[test]
    fn version_2_binds_the_qualifying_data_to_the_connection() {
        let nonce = [1u8; 32];
        assert_eq!(qualifying_data(VERSION_1, &nonce, &[2; 32]), nonce.to_vec());
        let a = qualifying_data(VERSION, &nonce, &[2; 32]);
        assert_eq!(a.len(), 32);
        assert_ne!(a, nonce.to_vec());
        assert_ne!(a, qualifying_data(VERSION, &nonce, &[3; 32]));
        assert_ne!(a, qualifying_data(VERSION, &[4; 32], &[2; 32]));
    }

    #[test]
    fn a_version_1_challenge_carries_no_version_2_field() {
        let c = Challenge {
            version: VERSION_1,
            credential_blob: vec![1],
            encrypted_secret: vec![2],
            nonce: vec![3],
            pcr_selection: PcrSelection {
                hash: "sha256".into(),
                pcrs: vec![7],
            },
            event_log: false,
        };
        let json = String::from_utf8(encode(&c)).unwrap();
        assert!(!json.contains("event_log"), "{json}");
    }
}
