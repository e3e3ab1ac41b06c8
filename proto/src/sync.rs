//! What the agent and the server agree on to diff an agent's authorized entries.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::types;

/// The digest identifying one entry's content in a sync resume: SHA-256 of its protobuf
/// encoding (prost encodes a message deterministically: fields in number order, repeated
/// fields in order). The agent hashes the entry as it received it, the server the entry
/// it would send: equal digests mean the agent holds exactly what the server would send.
pub fn entry_digest(e: &types::Entry) -> Vec<u8> {
    Sha256::digest(e.encode_to_vec()).to_vec()
}
