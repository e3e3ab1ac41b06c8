//! The messages of `sshpop` node attestation, JSON on the node API's attestation
//! stream. Binary fields are standard base64 (with padding). Every message carries
//! [`VERSION`]; unknown fields are refused.
//!
//! 1. agent → server, [`Payload`]:
//!    `{"version":1,"certificate":"<base64 of the certificate's wire encoding>"}`
//!    (the second field of the `-cert.pub` file, decoded);
//! 2. server → agent, [`Challenge`]: `{"version":1,"nonce":"<base64, 32 bytes>"}`;
//! 3. agent → server, [`Answer`]:
//!    `{"version":1,"nonce":"<base64, 32 bytes>","signature":"-----BEGIN SSH SIGNATURE-----\n..."}`,
//!    the agent nonce and the SSHSIG signature in its PEM armour (exactly what
//!    `ssh-keygen -Y sign` writes), over [`crate::signed_message`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use carapace_core::Error;

use crate::{PLUGIN_NAME, rejected};

/// The protocol version both halves speak.
pub const VERSION: u32 = 1;

/// The largest message either half accepts. A certificate for a 4096-bit RSA host key
/// signed by a 4096-bit RSA CA, with a few dozen principals, stays under 8 KiB; 64 KiB
/// leaves room and bounds the work.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The agent's first message: its host certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// [`VERSION`].
    pub version: u32,
    /// The OpenSSH host certificate's wire encoding (`PROTOCOL.certkeys`), base64.
    pub certificate: String,
}

/// The server's challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// [`VERSION`].
    pub version: u32,
    /// The server nonce: [`crate::NONCE_LEN`] fresh random bytes, base64.
    pub nonce: String,
}

/// The agent's answer: proof that it holds the certified host key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// [`VERSION`].
    pub version: u32,
    /// The agent nonce: [`crate::NONCE_LEN`] fresh random bytes, base64.
    pub nonce: String,
    /// The SSHSIG signature (PEM, `-----BEGIN SSH SIGNATURE-----`) by the host key, in
    /// namespace [`crate::SSHSIG_NAMESPACE`], over [`crate::signed_message`].
    pub signature: String,
}

/// JSON of `msg`.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(msg).map_err(|e| rejected(format!("encoding: {e}")))
}

/// Parses `what` from `bytes`, refusing oversized and malformed input by name.
pub fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, Error> {
    carapace_core::plugin::decode_message(PLUGIN_NAME, what, bytes, MAX_MESSAGE)
}

/// Refuses a message of another protocol version; `what` names the message.
pub fn check_version(what: &str, version: u32) -> Result<(), Error> {
    if version == VERSION {
        Ok(())
    } else {
        Err(rejected(format!(
            "the {what} is {PLUGIN_NAME} version {version}, this side speaks version {VERSION}"
        )))
    }
}

/// Base64 of `bytes`.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The bytes of base64 field `what`.
pub fn unb64(what: &str, text: &str) -> Result<Vec<u8>, Error> {
    STANDARD
        .decode(text)
        .map_err(|e| rejected(format!("{what} is not base64: {e}")))
}

/// The bytes of base64 nonce field `what`, which must be [`crate::NONCE_LEN`] long.
pub fn nonce(what: &str, text: &str) -> Result<[u8; crate::NONCE_LEN], Error> {
    let bytes = unb64(what, text)?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| rejected(format!("{what} is {len} bytes, not {}", crate::NONCE_LEN)))
}
