//! The one error type of the core crate.

use crate::spiffe_id::SpiffeIdRule;

/// Result alias for core operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who is to blame for an error; decides the gRPC status and the log level at the edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The caller or the peer sent something malformed or not allowed.
    InvalidInput,
    /// The caller is known but not allowed to do this.
    PermissionDenied,
    /// The thing asked for does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// A backend (token, TPM, database) is unavailable; retrying later may work.
    Unavailable,
    /// A bug or an unexpected backend answer.
    Internal,
}

/// Every error the core crate can produce. Messages are lowercase, name the offending
/// field and never carry a secret.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A SPIFFE ID broke one of the rules of the SPIFFE ID standard.
    #[error("invalid SPIFFE ID {input:?}: {rule}")]
    InvalidSpiffeId {
        /// The input, truncated to 128 bytes.
        input: String,
        /// The rule it broke.
        rule: SpiffeIdRule,
    },
    /// A trust domain name broke one of the rules of the SPIFFE ID standard.
    #[error("invalid trust domain {input:?}: {rule}")]
    InvalidTrustDomain {
        /// The input, truncated to 128 bytes.
        input: String,
        /// The rule it broke.
        rule: SpiffeIdRule,
    },
    /// A selector is not of the form `type:value`.
    #[error("invalid selector {input:?}: {reason}")]
    InvalidSelector {
        /// The input, truncated to 128 bytes.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A registration entry field is not acceptable.
    #[error("invalid entry: {field}: {reason}")]
    InvalidEntry {
        /// The field at fault, as named in the CLI and the API.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A trust bundle (PEM or SPIFFE JSON) could not be read.
    #[error("invalid trust bundle: {0}")]
    InvalidBundle(String),
    /// A certificate chain is not a valid X509-SVID.
    #[error("invalid X509-SVID: {0}")]
    InvalidSvid(String),
    /// A key with this id does not exist in the key manager.
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    /// A key with this id exists already.
    #[error("key {0:?} already exists")]
    KeyExists(String),
    /// The key type does not support the signature algorithm asked for.
    #[error("key type {key_type} cannot sign with {algorithm}")]
    UnsupportedAlgorithm {
        /// The key's type.
        key_type: crate::KeyType,
        /// The algorithm asked for.
        algorithm: crate::SignatureAlgorithm,
    },
    /// The key backend failed; the message says which backend and how to fix it.
    #[error("key manager: {0}")]
    KeyBackend(String),
    /// The key backend is unavailable for now (token removed, device busy).
    #[error("key manager unavailable: {0}")]
    KeyUnavailable(String),
    /// Node attestation evidence was malformed or did not prove what it claims.
    #[error("attestation rejected: {0}")]
    AttestationRejected(String),
    /// Node attestation evidence was already used (replay).
    #[error("attestation rejected: {0} was already used")]
    AttestationReplay(&'static str),
    /// Workload attestation could not identify the caller.
    #[error("workload attestation failed: {0}")]
    WorkloadAttestation(String),
    /// A backend a plugin depends on (a datastore, a device) failed for now; retrying
    /// later may succeed.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// A JWT or JWK refused by [`crate::jose`]; the message names what is wrong, never
    /// the token.
    #[error("{0}")]
    InvalidToken(String),
    /// A plugin's configuration is not acceptable.
    #[error("plugin {plugin}: {reason}")]
    PluginConfig {
        /// The plugin name.
        plugin: String,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// Who is to blame for this error.
    pub fn blame(&self) -> Blame {
        match self {
            Error::InvalidSpiffeId { .. }
            | Error::InvalidTrustDomain { .. }
            | Error::InvalidSelector { .. }
            | Error::InvalidEntry { .. }
            | Error::InvalidBundle(_)
            | Error::InvalidSvid(_)
            | Error::UnsupportedAlgorithm { .. }
            | Error::InvalidToken(_)
            | Error::PluginConfig { .. } => Blame::InvalidInput,
            Error::AttestationRejected(_) | Error::AttestationReplay(_) => Blame::PermissionDenied,
            Error::WorkloadAttestation(_) | Error::Unavailable(_) => Blame::Unavailable,
            Error::KeyNotFound(_) => Blame::NotFound,
            Error::KeyExists(_) => Blame::AlreadyExists,
            Error::KeyUnavailable(_) => Blame::Unavailable,
            Error::KeyBackend(_) => Blame::Internal,
        }
    }
}

/// Truncates user input kept in an error message to 128 bytes on a char boundary.
pub(crate) fn truncate_input(input: &str) -> String {
    const MAX: usize = 128;
    if input.len() <= MAX {
        return input.to_owned();
    }
    let mut end = MAX;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &input[..end])
}
