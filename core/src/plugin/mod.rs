//! The plugin traits. One trait per plugin kind; the server and the agent each hold one
//! catalog (name → constructor) per kind and pick implementations by configuration.
//!
//! All traits are dyn-compatible (`Arc<dyn KeyManager>`, ...) through `async-trait`, and
//! none has a default method for anything security-relevant: a forgotten implementation
//! is a compile error, not a runtime surprise.

mod context;
mod key_manager;
mod node_attestor;
mod upstream_authority;
mod workload_attestor;

pub use context::PluginContext;
pub use key_manager::{KeyInfo, KeyManager, KeySigner, validate_key_id};
pub use node_attestor::{
    AttestationContext, AttestationResult, AttestationSession, AttestationStep, MemoryStateStore,
    NodeAttestor, NodeAttestorClient, NodeStateStore, TLS_EXPORTER_LABEL, TLS_EXPORTER_LEN,
    decode_message, decode_versioned_message,
};
pub use upstream_authority::{MintRequest, MintedCa, UpstreamAuthority};
pub use workload_attestor::{Caller, WorkloadAttestor};
