//! Carapace core: the SPIFFE value types and the plugin traits every other crate shares.
//!
//! What is here:
//! - [`SpiffeId`] and [`TrustDomain`], parsed strictly by every rule of the SPIFFE ID
//!   standard, with one [`SpiffeIdRule`] per rule broken;
//! - [`Selector`] (`type:value`) and [`RegistrationEntry`] with its validation;
//! - [`clock`]: the one [`clock::Clock`] (system or manual, so tests can move time), Unix
//!   seconds and the one RFC 3339 formatter;
//! - [`limits`]: the bounds on every time and duration, and checked time arithmetic;
//! - [`TrustBundle`]: X.509 authorities and JWT keys, in PEM and in SPIFFE bundle JSON
//!   (a JWK Set with `spiffe_sequence`);
//! - [`jose`]: JSON Web Tokens, signed through a key manager and verified under an
//!   algorithm allowlist (JWT-SVIDs, the cloud attestors' tokens);
//! - [`x509svid`]: validation of an X509-SVID chain per the X509-SVID standard;
//! - the plugin traits in [`plugin`]: [`plugin::NodeAttestor`] (server half of node
//!   attestation, an explicit challenge/response state machine),
//!   [`plugin::NodeAttestorClient`] (agent half), [`plugin::KeyManager`] and
//!   [`plugin::WorkloadAttestor`], and the [`plugin::PluginContext`] every plugin
//!   constructor is handed.
//!
//! What is not here: no I/O, no async runtime, no gRPC, SQL or FFI. Those live in the
//! server, the agent and the plugin crates; this crate stays pure so that its rules can
//! be tested exhaustively and reused by every side.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bundle;
pub mod clock;
pub mod crypto;
pub mod entry;
mod error;
pub mod files;
pub mod jose;
pub mod limits;
pub mod plugin;
pub mod selector;
pub mod spiffe_id;
#[cfg(feature = "testing")]
pub mod testing;
pub mod x509svid;

pub use bundle::{JwtKey, TrustBundle};
pub use crypto::{KeyType, SignatureAlgorithm};
pub use entry::{EntryId, RegistrationEntry};
pub use error::{Blame, Error, Result};
pub use selector::{Selector, SelectorSet};
pub use spiffe_id::{SpiffeId, SpiffeIdRule, TrustDomain};
