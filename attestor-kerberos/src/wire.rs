//! The messages of `kerberos` node attestation, JSON on the node API's attestation
//! stream. Binary fields are standard base64.
//!
//! 1. agent → server, payload: [`Payload`] (`{"version":1}`);
//! 2. server → agent, challenge: [`Challenge::Nonce`] with 32 fresh random bytes;
//! 3. agent → server, answer: [`Answer::Token`], the initial GSS-API krb5 context token
//!    (RFC 4121 §4.1: an AP-REQ whose authenticator checksum carries the channel
//!    bindings of [`crate::channel_bindings`]);
//! 4. only when the agent asked for mutual authentication: server → agent
//!    [`Challenge::Reply`] (the AP-REP), agent → server [`Answer::ReplyVerified`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use carapace_core::Error;

use crate::PLUGIN_NAME;

/// The protocol version both halves speak.
pub const VERSION: u32 = 1;
/// The largest message either half accepts. An AD ticket with a large PAC (a user in
/// many groups) is some kilobytes; 64 KiB leaves room and bounds the work.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The agent's first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// [`VERSION`].
    pub version: u32,
}

/// A server challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Challenge {
    /// Make the context token, bound to this nonce.
    Nonce {
        /// 32 random bytes, base64.
        nonce: String,
    },
    /// Check the server's AP-REP (mutual authentication).
    Reply {
        /// The GSS-API reply token, base64.
        token: String,
    },
}

/// An agent answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Answer {
    /// The initial context token, base64.
    Token {
        /// The token, base64.
        token: String,
    },
    /// The agent verified the server's AP-REP.
    ReplyVerified,
}

/// JSON of `msg`.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(msg)
        .map_err(|e| Error::AttestationRejected(format!("{PLUGIN_NAME}: encoding: {e}")))
}

/// Parses `what` from `bytes`, refusing oversized and malformed input by name.
pub fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, Error> {
    carapace_core::plugin::decode_message(PLUGIN_NAME, what, bytes, MAX_MESSAGE)
}

/// Base64 of `bytes`.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The bytes of base64 field `what`.
pub fn unb64(what: &str, text: &str) -> Result<Vec<u8>, Error> {
    STANDARD.decode(text).map_err(|e| {
        Error::AttestationRejected(format!("{PLUGIN_NAME}: {what} is not base64: {e}"))
    })
}
