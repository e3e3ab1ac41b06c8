//! Agent-side node attestors built into the agent: the clients that prove the node's
//! identity to the server's matching attestor when the agent first attests (or
//! re-attests). Only `join_token` lives here; the others (`tpm`, `kerberos`, `sshpop`,
//! `aws_iid`, `gcp_iit`, `azure_msi`) come from the attestor plugin crates, and
//! [`crate::catalog`] builds whichever `[node_attestor.<name>]` names, as a
//! [`NodeAttestorClient`].
//!
//! The server half of each is its node attestor (`server/src/node_attestor/` for
//! `join_token`).

pub mod join_token;

pub use join_token::JoinTokenClient;

#[cfg(doc)]
use carapace_core::plugin::NodeAttestorClient;
