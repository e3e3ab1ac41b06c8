//! The server's one error type, and its mapping to gRPC status in one place.

use carapace_core::Blame;

/// Result alias for the server.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the server produces. Messages name what is wrong and never carry a
/// secret (join tokens, private keys, CSR contents).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A core rule was broken (malformed ID, selector, entry, bundle, SVID, key error).
    #[error(transparent)]
    Core(#[from] carapace_core::Error),
    /// The configuration is not acceptable; the message names the key.
    #[error("config: {0}")]
    Config(String),
    /// A request was malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well formed but the state does not allow it (a CA lifecycle step
    /// out of order, say); nothing was changed.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller is not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller is not authenticated (no or unacceptable client certificate).
    #[error("{0}")]
    Unauthenticated(String),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Datastore(String),
    /// A certificate could not be built or signed.
    #[error("ca: {0}")]
    Ca(String),
    /// An I/O error with the path or operation it concerns.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Datastore(e.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Datastore(format!("migration failed: {e}"))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::Core(core) => match core.blame() {
                Blame::InvalidInput => Status::invalid_argument(e.to_string()),
                Blame::PermissionDenied => Status::permission_denied(e.to_string()),
                Blame::NotFound => Status::not_found(e.to_string()),
                Blame::AlreadyExists => Status::already_exists(e.to_string()),
                Blame::Unavailable => Status::unavailable(e.to_string()),
                Blame::Internal => internal(&e),
            },
            Error::Config(_) | Error::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            Error::NotFound(_) => Status::not_found(e.to_string()),
            Error::AlreadyExists(_) => Status::already_exists(e.to_string()),
            Error::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            Error::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            Error::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            Error::Datastore(_) | Error::Ca(_) | Error::Io { .. } => internal(&e),
        }
    }
}

/// Internal errors reach the logs in full and the caller only as a generic message.
fn internal(e: &Error) -> tonic::Status {
    tracing::error!(error = %e, "internal error");
    tonic::Status::internal("internal error; see the server log")
}
