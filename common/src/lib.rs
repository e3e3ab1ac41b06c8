//! Process plumbing shared by `carapace-server`, `carapace-agent` and their CLIs, so that
//! both binaries behave the same way: logging set-up, shutdown signals, private
//! directories, TOML config files that report every problem at once, gRPC channels
//! over Unix sockets, who may own a socket's path and who may answer on it
//! ([`check_socket_dir`], [`uds_channel_checked`]), one instance per data directory and a
//! bounded exit ([`lock_data_dir`], [`SHUTDOWN_GRACE`]).
//!
//! Nothing here knows SPIFFE; errors are returned as complete, human-readable messages
//! that each binary wraps in its own error type.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod instance;
mod unix_socket;

pub use instance::{DataDirLock, LOCK_FILE, SHUTDOWN_GRACE, lock_data_dir, run_main};
pub use unix_socket::{
    OwnSocket, UnexpectedPeer, check_socket_dir, connect_checked, euid, remove_stale_socket,
    uds_channel_checked,
};

use std::fmt::Write as _;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint, Uri};

/// Environment variable overriding the log filter.
pub const ENV_LOG: &str = "CARAPACE_LOG";
/// Environment variable overriding the log format (`text` or `json`).
pub const ENV_LOG_FORMAT: &str = "CARAPACE_LOG_FORMAT";
/// The log filter when nothing else is configured.
pub const DEFAULT_LOG_FILTER: &str = "warn,carapace=info";

/// Logs to stderr with `filter` (EnvFilter syntax) as text, or JSON when `json`;
/// `CARAPACE_LOG` and `CARAPACE_LOG_FORMAT` override both.
pub fn init_tracing(filter: &str, json: bool) {
    let filter = std::env::var(ENV_LOG).unwrap_or_else(|_| filter.to_owned());
    let json = match std::env::var(ENV_LOG_FORMAT).as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => json,
    };
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Checks a log filter and a log format from a config file; `Ok(true)` means JSON.
pub fn check_logging(filter: &str, format: Option<&str>, problems: &mut Vec<String>) -> bool {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(filter) {
        problems.push(format!("log_level: {e}"));
    }
    match format {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            problems.push(format!("log_format: {other:?} is not \"text\" or \"json\""));
            false
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Creates `dir` (and its parents) with mode 0700 if missing, and refuses one that group
/// or others can reach, naming the `chmod` that fixes it. `what` names the directory in
/// messages ("data directory").
pub fn ensure_private_dir(dir: &Path, what: &str) -> Result<(), String> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {what} {}: {e}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("{what} {}: {e}", dir.display()))?;
    carapace_core::files::check_private(what, dir, &meta)
}

/// Parses TOML text into `T`, reporting every unknown or badly typed top-level key (serde
/// alone stops at the first).
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, Vec<String>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| vec![e.to_string()])?;
    let mut problems = Vec::new();
    for (key, value) in &table {
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        if let Err(e) = T::deserialize(toml::Value::Table(one)) {
            problems.push(e.to_string().trim().replace('\n', " "));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    T::deserialize(toml::Value::Table(table)).map_err(|e| vec![e.to_string()])
}

/// Reads a TOML config file into `T` (every problem prefixed with the path); no path
/// means `T::default()`.
pub fn read_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, Vec<String>> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    parse_toml(&text).map_err(|errs| {
        errs.into_iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect()
    })
}

/// The `[<kind>.<name>]` plugin envelopes of a config section, as (name, settings) pairs,
/// or `default` alone when the section is empty. A non-table entry is a problem.
pub fn plugin_envelopes(
    kind: &str,
    section: &toml::Table,
    default: &str,
    problems: &mut Vec<String>,
) -> Vec<(String, toml::Table)> {
    if section.is_empty() {
        return vec![(default.to_owned(), toml::Table::new())];
    }
    let mut out = Vec::new();
    for (name, v) in section {
        match v {
            toml::Value::Table(body) => out.push((name.clone(), body.clone())),
            _ => problems.push(format!("{kind}.{name}: must be a table ([{kind}.{name}])")),
        }
    }
    out
}

/// Parses one plugin's settings table into its config struct.
pub fn plugin_settings<T: DeserializeOwned>(table: &toml::Table) -> Result<T, String> {
    T::deserialize(toml::Value::Table(table.clone()))
        .map_err(|e| e.to_string().trim().replace('\n', " "))
}

/// An error and every source under it, `a: b: c` (a source whose text the message
/// already ends with is not repeated).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.ends_with(&msg) {
            let _ = write!(s, ": {msg}");
        }
        src = inner.source();
    }
    s
}

/// A gRPC channel whose every connection goes to the Unix socket `path`.
pub async fn uds_channel(
    path: &Path,
    timeout: Option<std::time::Duration>,
) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    let mut endpoint = Endpoint::from_static("http://localhost");
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        #[allow(dead_code, reason = "read by serde only")]
        name: Option<String>,
        #[allow(dead_code, reason = "read by serde only")]
        port: Option<u16>,
    }

    #[test]
    fn every_bad_key_is_reported() {
        let errs = parse_toml::<Demo>("nmae = \"x\"\nport = \"high\"\nextra = 1").unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(parse_toml::<Demo>("name = \"x\"\nport = 1").is_ok());
        assert!(parse_toml::<Demo>("not toml = = 1").is_err());
    }

    #[test]
    fn private_dirs_are_created_0700_and_loose_ones_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        ensure_private_dir(&d, "data directory").unwrap();
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = ensure_private_dir(&d, "data directory").unwrap_err();
        assert!(e.contains("chmod 700"), "{e}");
    }

    #[test]
    fn logging_settings_are_checked() {
        let mut p = Vec::new();
        assert!(check_logging("info", Some("json"), &mut p));
        assert!(!check_logging("info", None, &mut p));
        assert!(p.is_empty());
        check_logging("info[", Some("xml"), &mut p);
        assert_eq!(p.len(), 2, "{p:?}");
    }
}
