//! The agent's one error type.

/// Result alias for the agent.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the agent produces. Messages name what is wrong and never carry a secret
/// (join tokens, private keys).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A core rule was broken (malformed ID, selector, bundle, SVID, key error).
    #[error(transparent)]
    Core(#[from] carapace_core::Error),
    /// The configuration is not acceptable; the message names the key.
    #[error("config: {0}")]
    Config(String),
    /// Talking to the server failed.
    #[error("server: {0}")]
    Server(String),
    /// The server refused the agent (banned, evicted, attestation rejected).
    #[error("server refused the agent: {0}")]
    Refused(String),
    /// Workload attestation or the Workload API failed.
    #[error("workload api: {0}")]
    Workload(String),
    /// An I/O error with the path or operation it concerns.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A certificate or key could not be built or read.
    #[error("crypto: {0}")]
    Crypto(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
