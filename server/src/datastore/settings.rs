//! Where the datastore is and how to reach it: the validated `[datastore]` section.
//!
//! The PostgreSQL password never sits in a URL, a flag or a log: it is read, when the
//! server connects, from a file private to the server's user or from an environment
//! variable. [`PostgresSettings::display_target`] is the URL as messages show it.

use std::path::PathBuf;

use crate::{Error, Result};

/// Connections of a pool when `[datastore]` sets none. SQLite has one writer at a time
/// anyway (readers run concurrently in WAL mode); a PostgreSQL server's writes are
/// serialised by the write lock, so more connections mostly serve more readers.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// The datastore of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settings {
    /// An embedded SQLite database file (created 0600 if missing).
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Connections in the pool.
        max_connections: u32,
    },
    /// A PostgreSQL database, possibly shared by several servers of the trust domain.
    Postgres(PostgresSettings),
}

impl std::fmt::Display for Settings {
    /// The engine and where: `sqlite /path` or `postgres postgres://user@host/db`,
    /// never a password (a PostgreSQL url holds none; its query is left out).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Settings::Sqlite { path, .. } => write!(f, "sqlite {}", path.display()),
            Settings::Postgres(pg) => write!(f, "postgres {}", pg.display_target()),
        }
    }
}

/// A PostgreSQL datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// `postgres://USER@HOST:PORT/DATABASE[?...]`, without a password.
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// TLS to the database; `None`: the URL's `sslmode`, else libpq's default (`prefer`).
    pub ssl_mode: Option<SslMode>,
    /// The CA certificates (PEM) the database's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// Where the password comes from.
    pub password: Password,
}

impl PostgresSettings {
    /// The URL as messages show it: without its query, which may carry options.
    pub fn display_target(&self) -> &str {
        self.url.split('?').next().unwrap_or(&self.url)
    }
}

/// Where a PostgreSQL password comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Password {
    /// None (trust, peer or certificate authentication).
    None,
    /// The first line of a file private to the server's user.
    File(PathBuf),
    /// An environment variable of the server's process.
    Env(String),
}

impl Password {
    /// The password, read now. A file must be private to this user (no access for group
    /// or others); a variable must be set and valid UTF-8. Errors name the file or the
    /// variable, never the password.
    pub fn read(&self) -> Result<Option<String>> {
        match self {
            Password::None => Ok(None),
            Password::File(path) => {
                let what = format!("datastore password_file {}", path.display());
                let meta =
                    std::fs::metadata(path).map_err(|e| Error::Config(format!("{what}: {e}")))?;
                carapace_core::files::check_private("datastore password_file", path, &meta)
                    .map_err(Error::Config)?;
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("{what}: {e}")))?;
                let password = text.lines().next().unwrap_or("");
                if password.is_empty() {
                    return Err(Error::Config(format!("{what} is empty")));
                }
                Ok(Some(password.to_owned()))
            }
            Password::Env(var) => match std::env::var(var) {
                Ok(p) if !p.is_empty() => Ok(Some(p)),
                Ok(_) => Err(Error::Config(format!(
                    "datastore password_env: the variable {var} is empty"
                ))),
                Err(std::env::VarError::NotPresent) => Err(Error::Config(format!(
                    "datastore password_env: the variable {var} is not set"
                ))),
                Err(std::env::VarError::NotUnicode(_)) => Err(Error::Config(format!(
                    "datastore password_env: the variable {var} is not valid UTF-8"
                ))),
            },
        }
    }
}

/// TLS to PostgreSQL, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, unverified.
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, the certificate chains to `ca_file`.
    VerifyCa,
    /// TLS, the certificate chains to `ca_file` and names the host.
    VerifyFull,
}

impl SslMode {
    /// The `sslmode` spellings, in order.
    pub const NAMES: [&'static str; 5] =
        ["disable", "prefer", "require", "verify-ca", "verify-full"];

    /// Parses an `sslmode` value.
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the database's certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl From<SslMode> for sqlx::postgres::PgSslMode {
    fn from(m: SslMode) -> Self {
        use sqlx::postgres::PgSslMode;
        match m {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        }
    }
}
