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

pub mod health;
pub mod http;
mod instance;
pub mod listener;
pub mod metrics;
mod unix_socket;

pub use instance::{
    DataDirLock, LOCK_FILE, MAX_SHUTDOWN_GRACE, SHUTDOWN_GRACE, lock_data_dir, run_main,
    run_main_with, shutdown_grace,
};
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

/// Parses a duration given on the command line, the way SPIRE's users type them: bare
/// seconds (`60`, SPIRE's form) or a number with units (`60s`, `10m`, `1h30m`, `7d`). For
/// every duration flag of both CLIs (clap's `value_parser`).
pub fn parse_duration_flag(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(std::time::Duration::from_secs)
            .map_err(|_| format!("{s} seconds is too large"));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("expected seconds (60) or a duration with units (60s, 10m, 1h, 7d): {e}")
    })
}

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

/// The largest config file either binary reads: 1 MiB (the full samples are a few KiB).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// What a file type is, for messages.
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Checks a file a plugin setting names the way the plugin will use it, without opening
/// it (so `validate` reads no secret, opens no device and never blocks on a FIFO): it
/// exists, it is what the plugin needs (a regular file, a directory, a character device),
/// a secret's or a private directory's mode gives group and others nothing
/// ([`carapace_core::files::check_private`], the rule the plugins apply), and this user
/// (the effective uid, as the plugin will run) may read it, or read and write a device or
/// directory. A [`FileUse::PrivateDir`] may be missing: the plugin creates it. Messages
/// start with the setting and the path.
///
/// [`FileUse::PrivateDir`]: carapace_core::files::FileUse::PrivateDir
pub fn check_named_file(f: &carapace_core::files::NamedFile) -> Result<(), String> {
    use carapace_core::files::FileUse;
    use rustix::fs::{Access, AtFlags};
    use std::os::unix::fs::FileTypeExt as _;
    let (setting, path) = (f.setting.as_str(), f.path.as_path());
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match f.usage {
                FileUse::PrivateDir => Ok(()),
                _ => Err(format!("{setting} {shown} does not exist")),
            };
        }
        Err(e) => return Err(format!("{setting} {shown} cannot be examined: {e}")),
    };
    let kind = meta.file_type();
    let (fits, wanted, access, how) = match f.usage {
        FileUse::Read | FileUse::Secret => {
            (kind.is_file(), "a regular file", Access::READ_OK, "read")
        }
        FileUse::PrivateDir => (
            kind.is_dir(),
            "a directory",
            Access::READ_OK | Access::WRITE_OK | Access::EXEC_OK,
            "read and written",
        ),
        FileUse::Device => (
            kind.is_char_device(),
            "a character device",
            Access::READ_OK | Access::WRITE_OK,
            "read and written",
        ),
    };
    if !fits {
        return Err(format!(
            "{setting} {shown} is {}; give {wanted}",
            file_kind(kind)
        ));
    }
    if matches!(f.usage, FileUse::Secret | FileUse::PrivateDir) {
        carapace_core::files::check_private(setting, path, &meta)?;
    }
    rustix::fs::accessat(rustix::fs::CWD, path, access, AtFlags::EACCESS).map_err(|e| {
        format!(
            "{setting} {shown} cannot be {how} by this user (uid {}): {}",
            euid(),
            std::io::Error::from(e)
        )
    })
}

/// [`check_named_file`] for each of `files`, every problem prefixed with `plugin`
/// (`node_attestor.tpm: ek_ca_files /etc/ek/ca.pem does not exist`).
pub fn check_named_files(plugin: &str, files: &[carapace_core::files::NamedFile]) -> Vec<String> {
    files
        .iter()
        .filter_map(|f| check_named_file(f).err())
        .map(|e| format!("{plugin}: {e}"))
        .collect()
}

/// Reads a file an operator gave (a config file, a PEM bundle) as UTF-8 text: only a
/// regular file (a symlink to one is fine) of at most `max` bytes. A FIFO, a device
/// (`/dev/zero`), a directory or a larger file is refused with a message saying so,
/// instead of blocking or reading without end; the read itself is bounded too, so a file
/// that grows while it is read cannot hang the caller either. Messages start with `what`
/// and the path.
pub fn read_operator_file(path: &Path, what: &str, max: u64) -> Result<String, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let fail = |reason: String| format!("{what} {}: {reason}", path.display());
    let check = |meta: &std::fs::Metadata| {
        if !meta.file_type().is_file() {
            return Err(fail(format!(
                "is {}; give a regular file",
                file_kind(meta.file_type())
            )));
        }
        if meta.len() > max {
            return Err(fail(format!(
                "is {} bytes, more than the {max} allowed",
                meta.len()
            )));
        }
        Ok(())
    };
    // Checked before opening (opening a FIFO for reading would wait for a writer) and
    // again on the open file, which O_NONBLOCK keeps from waiting if the path was
    // swapped for a FIFO in between.
    check(&std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    check(
        &file
            .metadata()
            .map_err(|e| fail(format!("cannot read: {e}")))?,
    )?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > max {
        return Err(fail(format!(
            "grew past the {max} bytes allowed while being read"
        )));
    }
    String::from_utf8(bytes).map_err(|e| fail(format!("is not UTF-8 text: {e}")))
}

/// A serde message on one line.
fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().trim().replace('\n', " ")
}

/// Deserializes `table` into `T` key by key, so that every unknown or badly typed key is
/// reported with its name (serde alone stops at the first), and returns `T` built from the
/// keys that were fine, so later checks can still run on them. `None` when even those do
/// not make a `T` (a required key is missing); a required key that was reported as bad is
/// not reported again as missing.
pub fn parse_table<T: DeserializeOwned>(table: &toml::Table) -> (Option<T>, Vec<String>) {
    let mut problems = Vec::new();
    let mut good = table.clone();
    let mut bad = Vec::new();
    for (key, value) in table {
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        if let Err(e) = T::deserialize(toml::Value::Table(one)) {
            let msg = one_line(&e);
            // A key alone lacks the others: only a problem if the whole table lacks them.
            if msg.starts_with("missing field") {
                continue;
            }
            problems.push(format!("{key}: {msg}"));
            good.remove(key);
            bad.push(key.as_str());
        }
    }
    match T::deserialize(toml::Value::Table(good)) {
        Ok(v) => (Some(v), problems),
        Err(e) => {
            let msg = one_line(&e);
            let already = bad
                .iter()
                .any(|k| msg.starts_with(&format!("missing field `{k}`")));
            if !already {
                problems.push(msg);
            }
            (None, problems)
        }
    }
}

/// Parses TOML text into `T` as [`parse_table`] does. `Err` holds the syntax error alone
/// when the text is not TOML (nothing else can be said then).
pub fn parse_toml_partial<T: DeserializeOwned>(
    text: &str,
) -> Result<(Option<T>, Vec<String>), Vec<String>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| vec![e.to_string()])?;
    Ok(parse_table(&table))
}

/// Parses TOML text into `T`, reporting every unknown or badly typed top-level key (serde
/// alone stops at the first).
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, Vec<String>> {
    match parse_toml_partial(text)? {
        (Some(v), problems) if problems.is_empty() => Ok(v),
        (_, problems) => Err(problems),
    }
}

/// Reads a config file ([`read_operator_file`], at most [`MAX_CONFIG_FILE_BYTES`]) into
/// `T` as [`parse_toml_partial`] does, every problem prefixed with the path: the `T` made
/// of the keys that parsed (or `T::default()`), and the problems. `Err` when nothing
/// could be parsed (unreadable, not a regular file, too large, not TOML). No path means
/// `T::default()`.
pub fn read_toml_partial<T: DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<(T, Vec<String>), Vec<String>> {
    let Some(path) = path else {
        return Ok((T::default(), Vec::new()));
    };
    let text =
        read_operator_file(path, "config file", MAX_CONFIG_FILE_BYTES).map_err(|e| vec![e])?;
    let prefix = |errs: Vec<String>| -> Vec<String> {
        errs.into_iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect()
    };
    let (value, problems) = parse_toml_partial::<T>(&text).map_err(prefix)?;
    Ok((value.unwrap_or_default(), prefix(problems)))
}

/// Reads a config file into `T`, every problem prefixed with the path; no path means
/// `T::default()`.
pub fn read_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, Vec<String>> {
    match read_toml_partial(path)? {
        (v, problems) if problems.is_empty() => Ok(v),
        (_, problems) => Err(problems),
    }
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

/// Parses one plugin's settings table into its config struct, naming every bad key (one
/// message, problems joined by `; `).
pub fn plugin_settings<T: DeserializeOwned>(table: &toml::Table) -> Result<T, String> {
    match parse_table(table) {
        (Some(v), problems) if problems.is_empty() => Ok(v),
        (_, problems) => Err(problems.join("; ")),
    }
}

/// Checks one plugin's settings for `validate`: every bad key, and the plugin's own
/// checks (`check`) run on the keys that parsed, so one run lists both kinds of problem.
/// One message, problems joined by `; `.
pub fn check_plugin_settings<T: DeserializeOwned>(
    table: &toml::Table,
    check: impl FnOnce(&T) -> Result<(), Vec<String>>,
) -> Result<(), String> {
    let (value, mut problems) = parse_table::<T>(table);
    if let Some(v) = value {
        if let Err(more) = check(&v) {
            problems.extend(more);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
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

/// A gRPC channel to `address` (`HOST:PORT`) over TLS with `tls`, connected before it is
/// returned (within `connect_timeout`); each call then has `timeout`. The server name
/// sent is `carapace-server`: Carapace's verifiers check the peer's SPIFFE ID, not a DNS
/// name.
pub async fn tls_channel(
    address: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    connect_timeout: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let target = address.to_owned();
    Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let target = target.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(target.as_str()).await?;
                tcp.set_nodelay(true)?;
                let name = rustls_pki_types::ServerName::try_from("carapace-server")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_flags_take_bare_seconds_and_units() {
        use std::time::Duration;
        for (input, secs) in [
            ("60", 60),
            ("60s", 60),
            (" 90 ", 90),
            ("10m", 600),
            ("1h30m", 5400),
            ("7d", 604_800),
            ("0", 0),
        ] {
            assert_eq!(
                parse_duration_flag(input),
                Ok(Duration::from_secs(secs)),
                "{input:?}"
            );
        }
        for bad in [
            "",
            "-5",
            "1.5",
            "ten",
            "5 parsecs",
            "99999999999999999999999",
        ] {
            let e = parse_duration_flag(bad).unwrap_err();
            assert!(e.contains("seconds") && !e.is_empty(), "{bad:?}: {e}");
        }
    }
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

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Plugin {
        path: String,
        #[serde(default)]
        #[allow(dead_code, reason = "read by serde only")]
        retries: u8,
    }

    #[test]
    fn every_bad_key_is_named_and_the_good_ones_still_parse() {
        let (v, errs) =
            parse_toml_partial::<Demo>("name = \"x\"\nport = \"high\"\nextra = 1").unwrap();
        assert_eq!(v.unwrap().name.as_deref(), Some("x"));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("extra: unknown field `extra`"),
            "{errs:?}"
        );
        assert!(errs[1].starts_with("port: invalid type"), "{errs:?}");
        // A required key that is mistyped is reported once, not again as missing.
        let t: toml::Table = "path = 5\nretries = 300\nnope = 1".parse().unwrap();
        let (v, errs) = parse_table::<Plugin>(&t);
        assert!(v.is_none());
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().all(|e| !e.contains("missing")), "{errs:?}");
        // A required key that is absent is reported.
        let t: toml::Table = "retries = 1".parse().unwrap();
        let (v, errs) = parse_table::<Plugin>(&t);
        assert!(v.is_none());
        assert_eq!(errs, ["missing field `path`"]);
        let t: toml::Table = "path = \"p\"\nretries = \"x\"".parse().unwrap();
        let e = check_plugin_settings::<Plugin>(&t, |p| Err(vec![format!("{} is bad", p.path)]))
            .unwrap_err();
        assert!(
            e.starts_with("retries: invalid type") && e.ends_with("; p is bad"),
            "{e}"
        );
        assert!(
            plugin_settings::<Plugin>(&t)
                .unwrap_err()
                .starts_with("retries:")
        );
    }

    #[test]
    fn only_regular_files_up_to_the_cap_are_read() {
        let t = tempfile::tempdir().unwrap();
        let ok = t.path().join("ok.toml");
        std::fs::write(&ok, "name = \"x\"").unwrap();
        assert_eq!(
            read_operator_file(&ok, "config file", 100).unwrap(),
            "name = \"x\""
        );
        let big = t.path().join("big.toml");
        std::fs::write(&big, "#".repeat(101)).unwrap();
        let e = read_operator_file(&big, "config file", 100).unwrap_err();
        assert!(e.contains("is 101 bytes, more than the 100 allowed"), "{e}");
        let fifo = t.path().join("fifo");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        let started = std::time::Instant::now();
        for (path, kind) in [
            (Path::new("/dev/zero"), "a character device"),
            (fifo.as_path(), "a FIFO"),
            (t.path(), "a directory"),
        ] {
            let e = read_operator_file(path, "config file", MAX_CONFIG_FILE_BYTES).unwrap_err();
            assert!(
                e.starts_with(&format!("config file {}: is {kind}", path.display())),
                "{e}"
            );
            let e = read_toml::<Demo>(Some(path)).unwrap_err();
            assert!(e[0].contains(kind), "{e:?}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let bad = t.path().join("bad.toml");
        std::fs::write(&bad, [0xff, 0xfe]).unwrap();
        assert!(
            read_operator_file(&bad, "config file", 100)
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    #[test]
    fn named_files_are_checked_as_their_plugin_uses_them_without_being_opened() {
        use carapace_core::files::{FileUse, NamedFile};
        use std::path::PathBuf;
        let t = tempfile::tempdir().unwrap();
        let check = |usage, path: &Path| check_named_file(&NamedFile::new("setting", path, usage));
        let file = t.path().join("f");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let missing = t.path().join("missing");
        let fifo = t.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let started = std::time::Instant::now();
        let shown = |p: &Path| p.display().to_string();
        for (usage, path, expected) in [
            (FileUse::Read, file.clone(), None),
            (
                FileUse::Read,
                missing.clone(),
                Some(format!("setting {} does not exist", shown(&missing))),
            ),
            (
                FileUse::Read,
                t.path().to_path_buf(),
                Some(format!(
                    "setting {} is a directory; give a regular file",
                    shown(t.path())
                )),
            ),
            (
                FileUse::Read,
                fifo.clone(),
                Some(format!(
                    "setting {} is a FIFO; give a regular file",
                    shown(&fifo)
                )),
            ),
            (
                FileUse::Secret,
                file.clone(),
                Some(format!(
                    "setting {} has mode 644: it must not be accessible to group or others \
                     (chmod 600 {})",
                    shown(&file),
                    shown(&file)
                )),
            ),
            (FileUse::PrivateDir, missing.clone(), None),
            (
                FileUse::PrivateDir,
                file.clone(),
                Some(format!(
                    "setting {} is a regular file; give a directory",
                    shown(&file)
                )),
            ),
            (FileUse::Device, PathBuf::from("/dev/null"), None),
            (
                FileUse::Device,
                file.clone(),
                Some(format!(
                    "setting {} is a regular file; give a character device",
                    shown(&file)
                )),
            ),
            (
                FileUse::Secret,
                PathBuf::from("/dev/zero"),
                Some("setting /dev/zero is a character device; give a regular file".into()),
            ),
        ] {
            assert_eq!(
                check(usage, &path).err(),
                expected,
                "{usage:?} {}",
                path.display()
            );
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(check(FileUse::Secret, &file), Ok(()));
        let dir = t.path().join("keys");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check(FileUse::PrivateDir, &dir).unwrap_err();
        assert!(e.contains("has mode 755") && e.contains("chmod 700"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(check(FileUse::PrivateDir, &dir), Ok(()));
        let problems = check_named_files(
            "node_attestor.tpm",
            &[
                NamedFile::new("ek_ca_files", &file, FileUse::Read),
                NamedFile::new("ek_ca_files", &missing, FileUse::Read),
                NamedFile::new("ek_ca_files", t.path(), FileUse::Read),
            ],
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!(
                "node_attestor.tpm: ek_ca_files {} does not exist",
                shown(&missing)
            )),
            "{problems:?}"
        );
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
