use std::path::PathBuf;

/// The lab's one error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program or library the lab needs is not installed.
    #[error("{what} not found; install it with: apt-get install -y {package}")]
    MissingPackage {
        /// The program or library looked for.
        what: String,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A lab command failed; `output` holds what it printed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// A component did not become ready in time; `log` holds its log.
    #[error("{component} did not become ready: {reason}\n--- {component} log ---\n{log}")]
    NotReady {
        /// The component (swtpm, krb5kdc, ...).
        component: String,
        /// Why we gave up.
        reason: String,
        /// The component's log.
        log: String,
    },
    /// Reading or writing a lab file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Anything else, with a message saying what.
    #[error("{0}")]
    Other(String),
}

/// The lab's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
