//! Server configuration: a TOML file (optional) overridden by command-line flags,
//! validated into a [`Config`] in one place for both `run` and `validate`.
//!
//! Every problem is collected with the key it concerns, so `validate` can list them all.
//! Plugin sections are envelopes keyed by plugin name (`[key_manager.disk]`); the
//! catalog checks that the name exists and the plugin checks its own keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use carapace_core::{KeyType, TrustDomain, limits};

use crate::datastore;
use crate::listener::NodeApiLimits;

/// Default trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/carapace/server";
/// Default node API address.
pub const DEFAULT_BIND_ADDRESS: &str = "127.0.0.1:8081";
/// Where the health endpoint listens when `[health]` names no address (loopback).
pub const DEFAULT_HEALTH_ADDRESS: &str = "127.0.0.1:8080";
/// Default admin socket of a server that does not run as root.
pub const DEFAULT_ADMIN_SOCKET: &str = "/tmp/carapace-server/private/admin.sock";
/// Default admin socket of a server (and CLI) running as root: in a root-owned runtime
/// directory that no other user can have pre-created (`/run/carapace`, made 0700).
pub const DEFAULT_ROOT_ADMIN_SOCKET: &str = "/run/carapace/admin.sock";

/// The default admin socket for this process: [`DEFAULT_ROOT_ADMIN_SOCKET`] as root,
/// [`DEFAULT_ADMIN_SOCKET`] otherwise.
pub fn default_admin_socket() -> PathBuf {
    if carapace_common::euid() == 0 {
        DEFAULT_ROOT_ADMIN_SOCKET.into()
    } else {
        DEFAULT_ADMIN_SOCKET.into()
    }
}
/// Default X509-SVID lifetime.
pub const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default X.509 CA lifetime.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// The shortest `default_x509_svid_ttl`, `agent_svid_ttl` and `ca_ttl`.
pub const MIN_TTL: Duration = Duration::from_secs(10);
/// Default join token lifetime for `token generate`.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// The file format: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain name.
    pub trust_domain: Option<String>,
    /// Directory for the datastore and keys.
    pub data_dir: Option<PathBuf>,
    /// Node API listen address, HOST:PORT.
    pub bind_address: Option<String>,
    /// Admin API Unix socket path.
    pub admin_socket: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax).
    pub log_level: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// X509-SVID lifetime of workload SVIDs without their own.
    #[serde(default, with = "humantime_serde::option")]
    pub default_x509_svid_ttl: Option<Duration>,
    /// Agent SVID lifetime.
    #[serde(default, with = "humantime_serde::option")]
    pub agent_svid_ttl: Option<Duration>,
    /// How long a stop waits for open streams and calls before closing them.
    #[serde(default, with = "humantime_serde::option")]
    pub shutdown_grace: Option<Duration>,
    /// X.509 CA lifetime.
    #[serde(default, with = "humantime_serde::option")]
    pub ca_ttl: Option<Duration>,
    /// CA key type.
    pub ca_key_type: Option<String>,
    /// CA subject organization.
    pub ca_organization: Option<String>,
    /// CA subject country.
    pub ca_country: Option<String>,
    /// JWT signing key type: `ec-p256` (ES256, the default), `ec-p384` (ES384) or
    /// `rsa-2048` (RS256).
    pub jwt_key_type: Option<String>,
    /// The `iss` claim of every JWT-SVID; none when unset.
    pub jwt_issuer: Option<String>,
    /// JWT-SVID lifetime of entries without their own.
    #[serde(default, with = "humantime_serde::option")]
    pub default_jwt_svid_ttl: Option<Duration>,
    /// Bounds on the node API's connections and attestations.
    #[serde(default)]
    pub node_api: NodeApiFile,
    /// The health endpoint (`/live`, `/ready`, `/metrics`): on when the section is present.
    pub health: Option<carapace_common::health::HealthFile>,
    /// Key manager plugins: exactly one.
    #[serde(default)]
    pub key_manager: toml::Table,
    /// Node attestor plugins: at least one.
    #[serde(default)]
    pub node_attestor: toml::Table,
    /// Policy over the node attestors: which must be passed together.
    #[serde(default)]
    pub node_attestation: NodeAttestationFile,
    /// Upstream authority plugin: at most one.
    #[serde(default)]
    pub upstream_authority: toml::Table,
    /// The OIDC discovery endpoint: on when the section is present.
    pub oidc_discovery: Option<OidcDiscoveryFile>,
    /// Where entries, agents and bundles are kept (default: SQLite in `data_dir`).
    #[serde(default)]
    pub datastore: DatastoreFile,
    /// SPIFFE federation: the bundle endpoint and the trust domains federated with.
    #[serde(default)]
    pub federation: FederationFile,
    /// Nested servers: this server signs intermediate CAs for downstream servers; on
    /// when the section is present.
    pub downstream: Option<DownstreamFile>,
}

/// `[downstream]`: this server certifies the CAs of downstream servers (nested servers)
/// whose registration entry is marked `downstream`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamFile {
    /// How many tiers of servers may sit below this one (default 1: downstream servers
    /// sign SVIDs only).
    pub max_depth: Option<u8>,
    /// The longest lifetime of a downstream CA (default `ca_ttl`/6, which this server's
    /// own CA rotation never cuts short).
    #[serde(default, with = "humantime_serde::option")]
    pub ca_ttl_max: Option<Duration>,
}

/// The deepest `[downstream] max_depth`: X.509 validators stop at six intermediates.
pub const MAX_DOWNSTREAM_DEPTH: u8 = 4;

/// `[downstream]`, checked.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// Tiers of servers below this one (≥ 1): this server's CA is minted with this
    /// pathLenConstraint, and a downstream CA gets at most one less.
    pub max_depth: u8,
    /// The longest lifetime of a downstream CA.
    pub ca_ttl_max: Duration,
}

/// `[datastore]`: SQLite (the default, in `data_dir`) or PostgreSQL.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreFile {
    /// `sqlite://PATH` (relative: in `data_dir`) or `postgres://USER@HOST:PORT/DB`.
    pub url: Option<String>,
    /// Connections in the pool.
    pub max_connections: Option<u32>,
    /// PostgreSQL: TLS to the database, as libpq's `sslmode`.
    pub sslmode: Option<String>,
    /// PostgreSQL: the CA certificates (PEM) the database's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL: a file holding the password, private to the server's user.
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: an environment variable holding the password.
    pub password_env: Option<String>,
}

/// The datastore file under `data_dir` when `[datastore]` names none.
pub const DEFAULT_DATASTORE_FILE: &str = "datastore.sqlite3";

/// The largest `[datastore] max_connections`.
pub const MAX_DATASTORE_CONNECTIONS: u32 = 1000;

/// Validates `[datastore]`; every problem names its key.
fn datastore(
    file: &DatastoreFile,
    data_dir: &Path,
    problems: &mut Vec<String>,
) -> Option<datastore::Settings> {
    let before = problems.len();
    let max_connections = file
        .max_connections
        .unwrap_or(datastore::DEFAULT_MAX_CONNECTIONS);
    if !(1..=MAX_DATASTORE_CONNECTIONS).contains(&max_connections) {
        problems.push(format!(
            "datastore.max_connections: {max_connections} is outside \
             1..={MAX_DATASTORE_CONNECTIONS}"
        ));
    }
    let in_data_dir = |p: &Path| data_dir.join(p);
    let url = file.url.as_deref().unwrap_or("");
    let settings = if url.is_empty() || url.starts_with("sqlite:") {
        for (key, set) in [
            ("sslmode", file.sslmode.is_some()),
            ("ca_file", file.ca_file.is_some()),
            ("password_file", file.password_file.is_some()),
            ("password_env", file.password_env.is_some()),
        ] {
            if set {
                problems.push(format!(
                    "datastore.{key}: only for a PostgreSQL url (postgres://...)"
                ));
            }
        }
        let path = match url
            .strip_prefix("sqlite://")
            .or(url.strip_prefix("sqlite:"))
        {
            None => data_dir.join(DEFAULT_DATASTORE_FILE),
            Some("") => {
                problems.push(format!(
                    "datastore.url: {url:?} names no file (sqlite://PATH; a relative PATH \
                     is in data_dir)"
                ));
                PathBuf::new()
            }
            Some(p) if p.contains('?') => {
                problems.push(format!(
                    "datastore.url: {url:?}: SQLite options are not taken from the url \
                     (the server sets WAL, foreign keys and a busy timeout itself)"
                ));
                PathBuf::new()
            }
            Some(p) => in_data_dir(Path::new(p)),
        };
        datastore::Settings::Sqlite {
            path,
            max_connections,
        }
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        if let Some(why) = url_password(url) {
            problems.push(format!(
                "datastore.url: {why}: a password is never taken from the url (config \
                 files and process listings are read by others); set password_file or \
                 password_env"
            ));
        } else if let Err(e) = url.parse::<sqlx::postgres::PgConnectOptions>() {
            problems.push(format!(
                "datastore.url: {url:?} is not a PostgreSQL url: {e}"
            ));
        }
        let ssl_mode = match file.sslmode.as_deref() {
            None => file
                .ca_file
                .is_some()
                .then_some(datastore::SslMode::VerifyFull),
            Some(m) => match datastore::SslMode::parse(m) {
                Some(mode) => {
                    if file.ca_file.is_some() && !mode.verifies() {
                        problems.push(format!(
                            "datastore.ca_file: sslmode {m:?} does not check the database's \
                             certificate; use verify-full (or verify-ca) with a ca_file"
                        ));
                    }
                    Some(mode)
                }
                None => {
                    problems.push(format!(
                        "datastore.sslmode: {m:?} is not one of {}",
                        datastore::SslMode::NAMES.join(", ")
                    ));
                    None
                }
            },
        };
        let password = match (&file.password_file, &file.password_env) {
            (Some(_), Some(_)) => {
                problems.push("datastore: set password_file or password_env, not both".to_owned());
                datastore::Password::None
            }
            (Some(f), None) => datastore::Password::File(in_data_dir(f)),
            (None, Some(v)) if v.is_empty() || v.contains('=') || v.contains('\0') => {
                problems.push(format!(
                    "datastore.password_env: {v:?} is not an environment variable name"
                ));
                datastore::Password::None
            }
            (None, Some(v)) => datastore::Password::Env(v.clone()),
            (None, None) => datastore::Password::None,
        };
        datastore::Settings::Postgres(datastore::PostgresSettings {
            url: url.to_owned(),
            max_connections,
            ssl_mode,
            ca_file: file.ca_file.as_deref().map(in_data_dir),
            password,
        })
    } else {
        // Only the scheme is repeated: the rest may hold a secret.
        let scheme = url.split(':').next().unwrap_or("");
        problems.push(format!(
            "datastore.url: the scheme {scheme:?} is neither sqlite nor postgres \
             (sqlite://PATH or postgres://USER@HOST:PORT/DB)"
        ));
        return None;
    };
    (problems.len() == before).then_some(settings)
}

/// Why a PostgreSQL url carries a password, if it does: in its user info
/// (`user:password@`) or as a `password` query parameter. The password is not repeated.
fn url_password(url: &str) -> Option<&'static str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && userinfo.contains(':')
    {
        return Some("it has a password in its user info (user:password@)");
    }
    if query
        .split('&')
        .any(|kv| kv.split('=').next() == Some("password"))
    {
        return Some("it has a password query parameter");
    }
    None
}

/// `[node_attestation]`: policy over the configured node attestors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAttestationFile {
    /// Lists of node attestors a node must pass together, in order, in one attestation
    /// (composite node attestation).
    #[serde(default)]
    pub require_together: Vec<Vec<String>>,
}

/// Composite node attestation: lists of node attestors a node must pass together, in
/// order, on one attestation stream. Each list has two or more distinct configured
/// attestors whose results are re-attestable, and an attestor is in at most one list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAttestation {
    /// The lists, as configured.
    pub require_together: Vec<Vec<String>>,
}

impl NodeAttestation {
    /// The list `attestor` belongs to, if any.
    pub fn list_of(&self, attestor: &str) -> Option<&[String]> {
        self.require_together
            .iter()
            .find(|l| l.iter().any(|m| m == attestor))
            .map(Vec::as_slice)
    }
}

/// Whether node attestor `name` with settings `table` admits a node more than once, so
/// that it may be part of a composite: a join token is consumed, and a cloud attestor
/// records each instance on first use unless `allow_reattestation` is set.
fn reattestable_attestor(name: &str, table: &toml::Table) -> bool {
    match name {
        "join_token" => false,
        "aws_iid" | "gcp_iit" | "azure_msi" => table
            .get("allow_reattestation")
            .and_then(toml::Value::as_bool)
            .unwrap_or(false),
        _ => true,
    }
}

/// Checks `[node_attestation] require_together` against the configured attestors,
/// listing every problem (each names its list).
fn node_attestation(
    file: &NodeAttestationFile,
    node_attestors: &[(String, toml::Table)],
    problems: &mut Vec<String>,
) -> NodeAttestation {
    const KEY: &str = "node_attestation.require_together";
    let mut seen: Vec<&str> = Vec::new();
    for list in &file.require_together {
        let shown = format!("[{}]", list.join(", "));
        let mut distinct: Vec<&str> = Vec::new();
        for member in list {
            if distinct.contains(&member.as_str()) {
                problems.push(format!("{KEY}: {shown} names {member} twice"));
                continue;
            }
            distinct.push(member);
            if seen.contains(&member.as_str()) {
                problems.push(format!(
                    "{KEY}: {shown}: {member} is already in another list (an attestor may be in at most one)"
                ));
            }
            match node_attestors.iter().find(|(n, _)| n == member) {
                None => problems.push(format!(
                    "{KEY}: {shown}: {member} is not configured (add [node_attestor.{member}])"
                )),
                Some((name, table)) if !reattestable_attestor(name, table) => {
                    problems.push(format!(
                        "{KEY}: {shown}: {member} admits a node only once (trust on first \
                         use), which would make the combination single-use; only attestors \
                         whose evidence can be presented again may be required together"
                    ))
                }
                Some(_) => {}
            }
        }
        if distinct.len() < 2 {
            problems.push(format!(
                "{KEY}: {shown} needs at least two distinct node attestors"
            ));
        }
        seen.extend(distinct);
    }
    NodeAttestation {
        require_together: file.require_together.clone(),
    }
}

/// `[node_api]`: bounds on the node API's connections and attestations. Unset keys
/// default from the process's descriptor limit ([`NodeApiLimits::from_fd_limit`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeApiFile {
    /// Live connections in total.
    pub max_connections: Option<usize>,
    /// Live connections from one IP address.
    pub max_connections_per_ip: Option<usize>,
    /// Live connections without an agent SVID.
    pub max_unauthenticated_connections: Option<usize>,
    /// How long a connection without an agent SVID stays open without an RPC.
    #[serde(default, with = "humantime_serde::option")]
    pub unauthenticated_idle_timeout: Option<Duration>,
    /// Attestations in progress at once.
    pub max_attestations_in_flight: Option<usize>,
}

/// Resolves `[node_api]` against the defaults for `fd_limit`, listing every problem.
fn node_api_limits(
    file: &NodeApiFile,
    fd_limit: Option<u64>,
    problems: &mut Vec<String>,
) -> NodeApiLimits {
    let defaults = NodeApiLimits::from_fd_limit(fd_limit);
    let max_connections = file.max_connections.unwrap_or(defaults.max_connections);
    let scaled = |part: usize, default: usize| (max_connections / part).max(1).min(default);
    let l = NodeApiLimits {
        max_connections,
        max_connections_per_ip: file
            .max_connections_per_ip
            .unwrap_or_else(|| scaled(2, defaults.max_connections_per_ip)),
        max_unauthenticated_connections: file
            .max_unauthenticated_connections
            .unwrap_or_else(|| scaled(4, defaults.max_unauthenticated_connections)),
        unauthenticated_idle_timeout: file
            .unauthenticated_idle_timeout
            .unwrap_or(defaults.unauthenticated_idle_timeout),
        max_attestations_in_flight: file
            .max_attestations_in_flight
            .unwrap_or(defaults.max_attestations_in_flight),
    };
    if max_connections == 0 {
        problems.push("node_api.max_connections: must be at least 1".into());
    }
    for (key, v) in [
        ("max_connections_per_ip", l.max_connections_per_ip),
        (
            "max_unauthenticated_connections",
            l.max_unauthenticated_connections,
        ),
    ] {
        if v == 0 || v > max_connections {
            problems.push(format!(
                "node_api.{key}: {v} is outside 1..=max_connections ({max_connections})"
            ));
        }
    }
    if l.max_attestations_in_flight == 0 || l.max_attestations_in_flight > 4096 {
        problems.push(format!(
            "node_api.max_attestations_in_flight: {} is outside 1..=4096",
            l.max_attestations_in_flight
        ));
    }
    if l.unauthenticated_idle_timeout < Duration::from_millis(100)
        || l.unauthenticated_idle_timeout > Duration::from_secs(3600)
    {
        problems.push(format!(
            "node_api.unauthenticated_idle_timeout: {} is outside 100ms..1h",
            humantime::format_duration(l.unauthenticated_idle_timeout)
        ));
    }
    if let Some(limit) = fd_limit {
        if max_connections as u64 >= limit {
            problems.push(format!(
                "node_api.max_connections: {max_connections} is not below the number of files this process may open ({limit}, RLIMIT_NOFILE): the datastore, the key manager and the admin socket would be starved; lower it or raise the limit"
            ));
        }
    }
    l
}

/// Command-line overrides of the essentials.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--trust-domain`.
    pub trust_domain: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--bind-address`.
    pub bind_address: Option<String>,
    /// `--admin-socket`.
    pub admin_socket: Option<PathBuf>,
    /// `--health-address`.
    pub health_address: Option<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Node API address.
    pub bind_address: SocketAddr,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Log filter.
    pub log_level: String,
    /// Log as JSON.
    pub log_json: bool,
    /// Workload SVID lifetime default.
    pub default_x509_svid_ttl: Duration,
    /// Agent SVID lifetime.
    pub agent_svid_ttl: Duration,
    /// How long a stop waits for open streams and calls before closing them.
    pub shutdown_grace: Duration,
    /// CA lifetime.
    pub ca_ttl: Duration,
    /// CA key type.
    pub ca_key_type: KeyType,
    /// CA subject organization.
    pub ca_organization: String,
    /// CA subject country.
    pub ca_country: String,
    /// JWT signing key type.
    pub jwt_key_type: KeyType,
    /// The `iss` claim of JWT-SVIDs.
    pub jwt_issuer: Option<String>,
    /// JWT-SVID lifetime default.
    pub default_jwt_svid_ttl: Duration,
    /// Key manager: name and raw plugin table.
    pub key_manager: (String, toml::Table),
    /// Node attestors: names and raw plugin tables.
    pub node_attestors: Vec<(String, toml::Table)>,
    /// Which node attestors must be passed together (`[node_attestation]`).
    pub node_attestation: NodeAttestation,
    /// Upstream authority, if any: name and raw plugin table.
    pub upstream_authority: Option<(String, toml::Table)>,
    /// Bounds on the node API's connections and attestations.
    pub node_api: NodeApiLimits,
    /// Where the health endpoint listens; `None`: off.
    pub health_address: Option<SocketAddr>,
    /// The OIDC discovery endpoint; `None`: off.
    pub oidc_discovery: Option<OidcDiscovery>,
    /// The datastore.
    pub datastore: datastore::Settings,
    /// SPIFFE federation (`[federation]`): the bundle endpoint and the relationships
    /// the config file defines.
    pub federation: Federation,
    /// Nested servers (`[downstream]`); `None`: this server signs no downstream CA.
    pub downstream: Option<Downstream>,
}

impl Config {
    /// The files `[datastore]` names, for `validate`: the CA file (read) and the
    /// password file (a secret).
    pub fn datastore_files(&self) -> Vec<carapace_core::files::NamedFile> {
        use carapace_core::files::{FileUse, NamedFile};
        let mut files = Vec::new();
        if let datastore::Settings::Postgres(pg) = &self.datastore {
            if let Some(ca) = &pg.ca_file {
                files.push(NamedFile::new("ca_file", ca, FileUse::Read));
            }
            if let datastore::Password::File(f) = &pg.password {
                files.push(NamedFile::new("password_file", f, FileUse::Secret));
            }
        }
        files
    }
}

/// Reads a config file; a missing `path` means defaults. Every problem is listed.
pub fn read_file(path: Option<&Path>) -> Result<FileConfig, Vec<String>> {
    carapace_common::read_toml(path)
}

/// Reads the config file (if any) and validates it with the overrides, listing every
/// problem of every kind in one pass: unknown and badly typed keys, and the checks of
/// [`validate`] on the keys that did parse. This is what `run` and `validate` use, so
/// `validate` passing means `run` gets past its configuration.
pub fn load(path: Option<&Path>, ov: Overrides) -> Result<Config, Vec<String>> {
    let (file, mut problems) = carapace_common::read_toml_partial::<FileConfig>(path)?;
    match validate(file, ov) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(problems),
        Err(more) => {
            problems.extend(more);
            Err(problems)
        }
    }
}

/// Parses config text, reporting every unknown key and every badly typed value.
pub fn parse_file(text: &str) -> Result<FileConfig, Vec<String>> {
    carapace_common::parse_toml(text)
}

/// Validates a file config with overrides into a [`Config`], listing every problem.
pub fn validate(file: FileConfig, ov: Overrides) -> Result<Config, Vec<String>> {
    let mut problems = Vec::new();
    let td_text = ov
        .trust_domain
        .or(file.trust_domain)
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
    let trust_domain = TrustDomain::new(&td_text)
        .map_err(|e| problems.push(format!("trust_domain: {e}")))
        .ok();
    let bind_text = ov
        .bind_address
        .or(file.bind_address)
        .unwrap_or_else(|| DEFAULT_BIND_ADDRESS.to_owned());
    let bind_address = bind_text
        .parse::<SocketAddr>()
        .map_err(|e| {
            problems.push(format!(
                "bind_address: {bind_text:?} is not HOST:PORT ({e})"
            ))
        })
        .ok();
    let data_dir = ov
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    let admin_socket = ov
        .admin_socket
        .or(file.admin_socket)
        .unwrap_or_else(default_admin_socket);
    if admin_socket.as_os_str().len() > 100 {
        problems.push(format!(
            "admin_socket: {} is longer than a Unix socket path may be (100 bytes)",
            admin_socket.display()
        ));
    }
    let log_level = file
        .log_level
        .unwrap_or_else(|| carapace_common::DEFAULT_LOG_FILTER.into());
    let log_json =
        carapace_common::check_logging(&log_level, file.log_format.as_deref(), &mut problems);
    let default_x509_svid_ttl = file.default_x509_svid_ttl.unwrap_or(DEFAULT_X509_SVID_TTL);
    let agent_svid_ttl = file.agent_svid_ttl.unwrap_or(default_x509_svid_ttl);
    let shutdown_grace = carapace_common::shutdown_grace(file.shutdown_grace, &mut problems);
    let ca_ttl = file.ca_ttl.unwrap_or(DEFAULT_CA_TTL);
    let mut in_range = true;
    for (key, d, max) in [
        (
            "default_x509_svid_ttl",
            default_x509_svid_ttl,
            limits::MAX_X509_SVID_TTL,
        ),
        ("agent_svid_ttl", agent_svid_ttl, limits::MAX_X509_SVID_TTL),
        ("ca_ttl", ca_ttl, limits::MAX_CA_TTL),
    ] {
        if let Err(e) = limits::check_duration(d, MIN_TTL, max) {
            problems.push(format!("{key}: {e}"));
            in_range = false;
        }
    }
    // SVIDs are guaranteed their full TTL only while the CA has ttl/6 left (activation).
    let max_svid = ca_ttl / 6;
    for (key, d) in [
        ("default_x509_svid_ttl", default_x509_svid_ttl),
        ("agent_svid_ttl", agent_svid_ttl),
    ] {
        if in_range && d > max_svid {
            problems.push(format!(
                "{key}: {} exceeds ca_ttl/6 ({}); SVIDs would be cut short by CA rotation (raise ca_ttl to at least {})",
                humantime::format_duration(d),
                humantime::format_duration(max_svid),
                humantime::format_duration(d * 6)
            ));
        }
    }
    let key_type = |key: &str, v: Option<&str>, problems: &mut Vec<String>| match v
        .map(str::parse::<KeyType>)
    {
        None => KeyType::EcP256,
        Some(Ok(k)) => k,
        Some(Err(e)) => {
            problems.push(format!("{key}: {e}"));
            KeyType::EcP256
        }
    };
    let ca_key_type = key_type("ca_key_type", file.ca_key_type.as_deref(), &mut problems);
    let jwt_key_type = key_type("jwt_key_type", file.jwt_key_type.as_deref(), &mut problems);
    let default_jwt_svid_ttl = file
        .default_jwt_svid_ttl
        .unwrap_or(crate::jwt_keys::DEFAULT_JWT_SVID_TTL);
    if let Err(e) = limits::check_duration(
        default_jwt_svid_ttl,
        MIN_TTL,
        max_svid.min(limits::MAX_JWT_SVID_TTL),
    ) {
        problems.push(format!(
            "default_jwt_svid_ttl: {e} (at most 1 day, and ca_ttl/6 so that key rotation never cuts a token short)"
        ));
    }
    if let Some(iss) = &file.jwt_issuer {
        if iss.is_empty()
            || iss.len() > 512
            || iss.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            problems.push(format!(
                "jwt_issuer: {:?} is not an issuer (1 to 512 bytes, no spaces or control characters; for OIDC discovery an https URL)",
                iss.chars().take(64).collect::<String>()
            ));
        }
    }

    let health_address = carapace_common::health::resolve_address(
        file.health.as_ref(),
        ov.health_address.as_deref(),
        DEFAULT_HEALTH_ADDRESS,
        &mut problems,
    );
    let node_api = node_api_limits(
        &file.node_api,
        carapace_common::listener::fd_limit(),
        &mut problems,
    );
    let mut key_managers =
        carapace_common::plugin_envelopes("key_manager", &file.key_manager, "disk", &mut problems);
    if key_managers.len() > 1 {
        problems.push(format!(
            "key_manager: exactly one is allowed, found {} ({})",
            key_managers.len(),
            key_managers
                .iter()
                .map(|k| k.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let node_attestors = carapace_common::plugin_envelopes(
        "node_attestor",
        &file.node_attestor,
        "join_token",
        &mut problems,
    );
    let node_attestation = node_attestation(&file.node_attestation, &node_attestors, &mut problems);
    let mut upstreams: Vec<(String, toml::Table)> = if file.upstream_authority.is_empty() {
        Vec::new()
    } else {
        carapace_common::plugin_envelopes(
            "upstream_authority",
            &file.upstream_authority,
            "",
            &mut problems,
        )
    };
    if upstreams.len() > 1 {
        problems.push(format!(
            "upstream_authority: at most one is allowed, found {}",
            upstreams.len()
        ));
    }
    crate::catalog::check_plugins(&key_managers, &node_attestors, &mut problems);
    crate::catalog::check_upstream(&upstreams, &mut problems);
    let datastore = datastore(&file.datastore, &data_dir, &mut problems);
    let oidc_discovery = file
        .oidc_discovery
        .as_ref()
        .and_then(|o| oidc_discovery(o, file.jwt_issuer.as_deref(), &data_dir, &mut problems));
    let federation = federation(
        &file.federation,
        trust_domain.as_ref(),
        &data_dir,
        &mut problems,
    );
    if let Some(endpoint) = &federation.bundle_endpoint {
        let others = [
            ("bind_address", bind_address),
            ("health.bind_address", health_address),
            (
                "oidc_discovery.bind_address",
                oidc_discovery.as_ref().map(|o| o.bind_address),
            ),
        ];
        for (key, other) in others {
            if let Some(other) = other
                && addresses_clash(endpoint.bind_address, other)
            {
                problems.push(format!(
                    "federation.bundle_endpoint.bind_address: {} and {key} ({other}) share \
                     a port; give the bundle endpoint a port of its own",
                    endpoint.bind_address
                ));
            }
        }
    }

    let downstream = file
        .downstream
        .as_ref()
        .map(|d| downstream(d, ca_ttl, &mut problems));

    match (trust_domain, bind_address, datastore) {
        (Some(trust_domain), Some(bind_address), Some(datastore)) if problems.is_empty() => {
            Ok(Config {
                trust_domain,
                data_dir,
                bind_address,
                admin_socket,
                log_level,
                log_json,
                default_x509_svid_ttl,
                agent_svid_ttl,
                shutdown_grace,
                ca_ttl,
                ca_key_type,
                ca_organization: file.ca_organization.unwrap_or_else(|| "Carapace".into()),
                ca_country: file.ca_country.unwrap_or_else(|| "US".into()),
                jwt_key_type,
                jwt_issuer: file.jwt_issuer,
                default_jwt_svid_ttl,
                key_manager: key_managers.remove(0),
                node_attestors,
                node_attestation,
                upstream_authority: upstreams.pop(),
                node_api,
                health_address,
                oidc_discovery,
                datastore,
                federation,
                downstream,
            })
        }
        _ => Err(problems),
    }
}

/// Checks `[downstream]`: `max_depth` in 1..=[`MAX_DOWNSTREAM_DEPTH`], `ca_ttl_max`
/// between the shortest downstream CA lifetime
/// ([`crate::ca::downstream::MIN_DOWNSTREAM_CA_TTL`]) and `ca_ttl`.
fn downstream(file: &DownstreamFile, ca_ttl: Duration, problems: &mut Vec<String>) -> Downstream {
    let max_depth = file.max_depth.unwrap_or(1);
    if !(1..=MAX_DOWNSTREAM_DEPTH).contains(&max_depth) {
        problems.push(format!(
            "downstream.max_depth: {max_depth} is out of range (1..={MAX_DOWNSTREAM_DEPTH}); \
             remove [downstream] for a server that signs no downstream CA"
        ));
    }
    let ca_ttl_max = file.ca_ttl_max.unwrap_or(ca_ttl / 6);
    // A downstream CA shorter than this would be refused anyway: say so at start.
    let min = crate::ca::downstream::MIN_DOWNSTREAM_CA_TTL;
    if let Err(e) = limits::check_duration(ca_ttl_max, min, ca_ttl) {
        problems.push(format!(
            "downstream.ca_ttl_max: {e} (the upper bound is ca_ttl; the lower, ten CA \
             rotation intervals)"
        ));
    }
    Downstream {
        max_depth,
        ca_ttl_max,
    }
}

/// Where the OIDC discovery endpoint listens when `[oidc_discovery]` names no address.
pub const DEFAULT_OIDC_ADDRESS: &str = "127.0.0.1:8443";

/// `[oidc_discovery]`: the OIDC discovery endpoint ([`crate::oidc`]).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcDiscoveryFile {
    /// HOST:PORT to listen on (default [`DEFAULT_OIDC_ADDRESS`]).
    pub bind_address: Option<String>,
    /// The issuer URL (default: the server's `jwt_issuer`).
    pub issuer: Option<String>,
    /// The TLS certificate chain, PEM (relative: in `data_dir`).
    pub cert_file: Option<PathBuf>,
    /// The TLS key, PKCS#8 PEM, private to the server's user (relative: in `data_dir`).
    pub key_file: Option<PathBuf>,
    /// Instead of `key_file`: the id of the TLS key in the server's key manager (in the
    /// HSM with pkcs11), made with `carapace-server oidc csr`; it starts with `oidc-`.
    pub key_id: Option<String>,
}

/// Where the OIDC endpoint's TLS key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OidcKey {
    /// A PKCS#8 PEM file, private to the server's user.
    File(PathBuf),
    /// A key in the server's key manager, by id.
    KeyManager(String),
}

/// The prefix of every OIDC TLS key id: it keeps them apart from the CA, JWT and server
/// keys the server creates in the same key manager.
pub const OIDC_KEY_PREFIX: &str = "oidc-";

/// The validated `[oidc_discovery]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcDiscovery {
    /// Where it listens.
    pub bind_address: SocketAddr,
    /// The issuer: an `https` URL without query, fragment or trailing slash.
    pub issuer: String,
    /// The TLS certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The TLS key.
    pub key: OidcKey,
}

impl OidcDiscovery {
    /// The files it names, for `validate`: the certificate chain (read) and the key (a
    /// secret). [`crate::oidc::check_files`] checks them and their content.
    pub fn files(&self) -> Vec<carapace_core::files::NamedFile> {
        use carapace_core::files::{FileUse, NamedFile};
        let mut files = vec![NamedFile::new("cert_file", &self.cert_file, FileUse::Read)];
        if let Some(key_file) = self.key_file() {
            files.push(NamedFile::new("key_file", key_file, FileUse::Secret));
        }
        files
    }

    /// The key file, when the key is one.
    pub fn key_file(&self) -> Option<&Path> {
        match &self.key {
            OidcKey::File(p) => Some(p),
            OidcKey::KeyManager(_) => None,
        }
    }
}

/// Validates `[oidc_discovery]`; `jwt_issuer` is the server's, the issuer's default (and
/// when both are set they must be equal: OIDC clients compare a token's `iss` with the
/// discovery document's `issuer`). Every problem names its key.
fn oidc_discovery(
    file: &OidcDiscoveryFile,
    jwt_issuer: Option<&str>,
    data_dir: &Path,
    problems: &mut Vec<String>,
) -> Option<OidcDiscovery> {
    let before = problems.len();
    let bind_text = file.bind_address.as_deref().unwrap_or(DEFAULT_OIDC_ADDRESS);
    let bind_address = bind_text
        .parse::<SocketAddr>()
        .map_err(|e| {
            problems.push(format!(
                "oidc_discovery.bind_address: {bind_text:?} is not HOST:PORT ({e})"
            ))
        })
        .ok();
    let issuer = match (file.issuer.as_deref(), jwt_issuer) {
        (Some(i), Some(j)) if i != j => {
            problems.push(format!(
                "oidc_discovery.issuer: {i:?} differs from jwt_issuer {j:?}; OIDC clients \
                 refuse tokens whose iss is not the discovery document's issuer (leave \
                 oidc_discovery.issuer out to use jwt_issuer)"
            ));
            None
        }
        (Some(i), _) | (None, Some(i)) => match crate::oidc::check_issuer(i) {
            Ok(()) => Some(i.to_owned()),
            Err(e) => {
                problems.push(format!("oidc_discovery.issuer: {i:?} {e}"));
                None
            }
        },
        (None, None) => {
            problems.push(
                "oidc_discovery.issuer: missing: set the https URL the JWT-SVIDs' iss names \
                 (for example \"https://oidc.example.org\")"
                    .into(),
            );
            None
        }
    };
    // A relative path is in data_dir, as the upstream authority's files are.
    let mut path = |key: &str, value: &Option<PathBuf>| match value {
        Some(p) if !p.as_os_str().is_empty() => Some(data_dir.join(p)),
        _ => {
            problems.push(format!(
                "oidc_discovery.{key}: missing: name the {}",
                if key == "cert_file" {
                    "PEM certificate chain the endpoint presents"
                } else {
                    "PKCS#8 PEM key of that certificate (mode 0600)"
                }
            ));
            None
        }
    };
    let cert_file = path("cert_file", &file.cert_file);
    let key = match (&file.key_file, &file.key_id) {
        (Some(_), Some(_)) => {
            problems.push(
                "oidc_discovery: key_file and key_id are both set; name the key one way".into(),
            );
            None
        }
        (None, Some(id)) => match check_oidc_key_id(id) {
            Ok(()) => Some(OidcKey::KeyManager(id.clone())),
            Err(e) => {
                problems.push(format!("oidc_discovery.key_id: {e}"));
                None
            }
        },
        (key_file, None) => path("key_file", key_file).map(OidcKey::File),
    };
    match (bind_address, issuer, cert_file, key) {
        (Some(bind_address), Some(issuer), Some(cert_file), Some(key))
            if problems.len() == before =>
        {
            Some(OidcDiscovery {
                bind_address,
                issuer,
                cert_file,
                key,
            })
        }
        _ => None,
    }
}

/// An OIDC TLS key id: a key manager id that starts with [`OIDC_KEY_PREFIX`].
pub fn check_oidc_key_id(id: &str) -> std::result::Result<(), String> {
    carapace_core::plugin::validate_key_id(id).map_err(|e| e.to_string())?;
    if !id.starts_with(OIDC_KEY_PREFIX) || id.len() == OIDC_KEY_PREFIX.len() {
        return Err(format!(
            "{id:?} does not start with {OIDC_KEY_PREFIX:?} (for example \"oidc-tls\"): the \
             server's own keys live in the same key manager"
        ));
    }
    Ok(())
}

/// Where the bundle endpoint listens when `[federation.bundle_endpoint]` names no
/// address: all addresses, port 8443, as SPIRE's.
pub const DEFAULT_BUNDLE_ENDPOINT_ADDRESS: &str = "0.0.0.0:8443";
/// The `spiffe_refresh_hint` served when none is configured.
pub const DEFAULT_BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(300);
/// The shortest `refresh_hint`.
pub const MIN_BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(1);
/// The longest `refresh_hint`: the CA publishes a new JWT key three refresh periods of
/// its own bundle ([`crate::ca::REFRESH_HINT`], 5 minutes) before it signs with it, and
/// a peer told to poll less often than that could see a token before its key (SPIFFE
/// Federation §4.1: keys are published 3 to 5 refresh hints before use).
pub const MAX_BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(crate::ca::REFRESH_HINT);
/// The default shortest interval between two polls of a peer's bundle endpoint.
pub const DEFAULT_REFRESH_FLOOR: Duration = Duration::from_secs(10);
/// The default longest interval between two polls of a peer's bundle endpoint.
pub const DEFAULT_REFRESH_CEILING: Duration = Duration::from_secs(3600);
/// The bounds of `refresh_floor` and `refresh_ceiling`.
pub const REFRESH_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// The largest bootstrap bundle or CA file read.
const MAX_FEDERATION_FILE_BYTES: u64 = 1024 * 1024;

/// `[federation]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationFile {
    /// The shortest interval between two polls of a peer (default 10s).
    #[serde(default, with = "humantime_serde::option")]
    pub refresh_floor: Option<Duration>,
    /// The longest interval between two polls of a peer (default 1h).
    #[serde(default, with = "humantime_serde::option")]
    pub refresh_ceiling: Option<Duration>,
    /// The bundle endpoint: on when the section is present.
    pub bundle_endpoint: Option<BundleEndpointFile>,
    /// The trust domains whose bundles this one trusts.
    #[serde(default)]
    pub federates_with: Vec<FederatesWithFile>,
}

/// `[federation.bundle_endpoint]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpointFile {
    /// HOST:PORT to listen on (default [`DEFAULT_BUNDLE_ENDPOINT_ADDRESS`]).
    pub bind_address: Option<String>,
    /// The `spiffe_refresh_hint` served (default 5m).
    #[serde(default, with = "humantime_serde::option")]
    pub refresh_hint: Option<Duration>,
    /// `https_spiffe` (default: the server's own X509-SVID) or `https_web` (a
    /// certificate from `cert_file` and `key_file`).
    pub profile: Option<String>,
    /// `https_web`: the certificate chain, PEM (relative: in `data_dir`).
    pub cert_file: Option<PathBuf>,
    /// `https_web`: its key, PEM, private to the server's user (relative: in `data_dir`).
    pub key_file: Option<PathBuf>,
}

/// One `[[federation.federates_with]]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatesWithFile {
    /// The foreign trust domain.
    pub trust_domain: Option<String>,
    /// Its bundle endpoint, `https://`.
    pub bundle_endpoint_url: Option<String>,
    /// `https_spiffe` or `https_web`.
    pub bundle_endpoint_profile: Option<String>,
    /// `https_spiffe`: the SPIFFE ID the endpoint presents (default
    /// `spiffe://<trust_domain>/spire/server`).
    pub endpoint_spiffe_id: Option<String>,
    /// `https_web`: CA certificates (PEM) trusted for this endpoint instead of the
    /// system's (relative: in `data_dir`).
    pub ca_file: Option<PathBuf>,
    /// The trust domain's bundle to start from (relative: in `data_dir`): the bootstrap
    /// bundle of a self-serving `https_spiffe` endpoint.
    pub bundle_file: Option<PathBuf>,
    /// `bundle_file`'s format: `spiffe` (default, a SPIFFE bundle: `bundle show
    /// --format spiffe` of the peer) or `pem` (X.509 authorities only).
    pub bundle_format: Option<String>,
}

/// The validated `[federation]`. The default (no section): no endpoint, no
/// relationships, the default poll bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federation {
    /// The bundle endpoint serving this trust domain's bundle; `None`: off.
    pub bundle_endpoint: Option<BundleEndpoint>,
    /// The relationships of `[[federation.federates_with]]` (source
    /// [`crate::federation::Source::Config`]), each with its bootstrap bundle file, in
    /// the file's order; no trust domain twice, never the local one.
    pub relationships: Vec<(crate::federation::Relationship, Option<BootstrapBundle>)>,
    /// The shortest interval between two polls of a peer's endpoint, whatever its
    /// refresh hint says.
    pub refresh_floor: Duration,
    /// The longest interval between two polls of a peer's endpoint (also the interval
    /// for a peer that sends no refresh hint, if shorter than the spec's default).
    pub refresh_ceiling: Duration,
}

impl Default for Federation {
    fn default() -> Self {
        Federation {
            bundle_endpoint: None,
            relationships: Vec::new(),
            refresh_floor: DEFAULT_REFRESH_FLOOR,
            refresh_ceiling: DEFAULT_REFRESH_CEILING,
        }
    }
}

/// The validated `[federation.bundle_endpoint]` ([`crate::federation::endpoint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpoint {
    /// Where it listens.
    pub bind_address: SocketAddr,
    /// The `spiffe_refresh_hint` it serves: how often peers should poll.
    pub refresh_hint: Duration,
    /// How peers authenticate it.
    pub profile: BundleEndpointProfile,
}

/// How the bundle endpoint is authenticated by its peers (SPIFFE Federation §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleEndpointProfile {
    /// `https_spiffe`: it presents the server's own X509-SVID,
    /// `spiffe://<trust_domain>/spire/server`, renewed with it.
    HttpsSpiffe,
    /// `https_web`: it presents a Web PKI certificate from files, reloaded when they
    /// change.
    HttpsWeb {
        /// The certificate chain, PEM, leaf first.
        cert_file: PathBuf,
        /// Its key, PEM, private to the server's user.
        key_file: PathBuf,
    },
}

impl BundleEndpointProfile {
    /// The profile's name as the specification writes it.
    pub fn name(&self) -> &'static str {
        match self {
            BundleEndpointProfile::HttpsSpiffe => "https_spiffe",
            BundleEndpointProfile::HttpsWeb { .. } => "https_web",
        }
    }
}

/// The format of a bundle file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleFormat {
    /// A SPIFFE bundle (JWK Set): X.509 authorities and JWT keys.
    Spiffe,
    /// PEM certificates: X.509 authorities only.
    Pem,
}

impl BundleFormat {
    /// Parses `spiffe` or `pem`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "spiffe" => Some(BundleFormat::Spiffe),
            "pem" => Some(BundleFormat::Pem),
            _ => None,
        }
    }

    /// As written in the config and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BundleFormat::Spiffe => "spiffe",
            BundleFormat::Pem => "pem",
        }
    }
}

/// A relationship's bootstrap bundle (`bundle_file`, `bundle_format`): checked to be a
/// readable bundle of its trust domain when the config is loaded; stored when the
/// relationship has no bundle yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapBundle {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: BundleFormat,
}

impl BootstrapBundle {
    /// Reads and parses the bundle for `td`, refusing one whose X.509 authorities name
    /// another trust domain ([`crate::federation::check_authorities`]). The error names
    /// the file.
    pub fn read(
        &self,
        td: &TrustDomain,
    ) -> std::result::Result<carapace_core::TrustBundle, String> {
        let what = "bundle_file";
        let text =
            carapace_common::read_operator_file(&self.path, what, MAX_FEDERATION_FILE_BYTES)?;
        let parsed = match self.format {
            BundleFormat::Spiffe => carapace_core::TrustBundle::from_spiffe_json(td.clone(), &text),
            BundleFormat::Pem => carapace_core::TrustBundle::from_pem(td.clone(), &text),
        };
        let bundle = parsed.map_err(|e| {
            format!(
                "{what} {}: not a {} bundle: {e}",
                self.path.display(),
                self.format.name()
            )
        })?;
        crate::federation::check_authorities(td, &bundle)
            .map_err(|e| format!("{what} {}: {e}", self.path.display()))?;
        Ok(bundle)
    }
}

/// Whether two listeners cannot both bind: the same port on the same address, or on
/// any address when one is a wildcard (`0.0.0.0`, `[::]`).
fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A duration key of `[federation]` within `bounds`; the problem names the key.
fn bounded(
    key: &str,
    value: Option<Duration>,
    default: Duration,
    (min, max): (Duration, Duration),
    problems: &mut Vec<String>,
) -> Duration {
    let d = value.unwrap_or(default);
    if let Err(e) = limits::check_duration(d, min, max) {
        problems.push(format!("{key}: {e}"));
    }
    d
}

/// Validates `[federation]`; every problem names its key (`federation.federates_with[2]
/// .trust_domain`). Reads the files it names: the `https_web` certificate and key
/// (checked as the OIDC endpoint's), each `ca_file` (its certificates are the
/// relationship's roots) and each `bundle_file` (parsed, so that a bad bootstrap bundle
/// is found by `validate`). `local` is the local trust domain, if valid.
fn federation(
    file: &FederationFile,
    local: Option<&TrustDomain>,
    data_dir: &Path,
    problems: &mut Vec<String>,
) -> Federation {
    use crate::federation::{Profile, Relationship, Source};
    use carapace_core::files::{FileUse, NamedFile};
    let refresh_floor = bounded(
        "federation.refresh_floor",
        file.refresh_floor,
        DEFAULT_REFRESH_FLOOR,
        REFRESH_BOUNDS,
        problems,
    );
    let refresh_ceiling = bounded(
        "federation.refresh_ceiling",
        file.refresh_ceiling,
        DEFAULT_REFRESH_CEILING,
        REFRESH_BOUNDS,
        problems,
    );
    if refresh_floor > refresh_ceiling {
        problems.push(format!(
            "federation.refresh_floor: {} is above refresh_ceiling ({})",
            humantime::format_duration(refresh_floor),
            humantime::format_duration(refresh_ceiling)
        ));
    }
    // A relative path is in data_dir, as the other sections' files are.
    let in_data_dir = |p: &Path| data_dir.join(p);
    let profile_choices = "\"https_spiffe\" or \"https_web\"";

    let bundle_endpoint = file.bundle_endpoint.as_ref().and_then(|e| {
        let before = problems.len();
        let key = |k: &str| format!("federation.bundle_endpoint.{k}");
        let bind_text = e
            .bind_address
            .as_deref()
            .unwrap_or(DEFAULT_BUNDLE_ENDPOINT_ADDRESS);
        let bind_address = bind_text
            .parse::<SocketAddr>()
            .map_err(|err| {
                problems.push(format!(
                    "{}: {bind_text:?} is not HOST:PORT ({err})",
                    key("bind_address")
                ))
            })
            .ok();
        let refresh_hint = bounded(
            &key("refresh_hint"),
            e.refresh_hint,
            DEFAULT_BUNDLE_REFRESH_HINT,
            (MIN_BUNDLE_REFRESH_HINT, MAX_BUNDLE_REFRESH_HINT),
            problems,
        );
        let profile = match e.profile.as_deref().unwrap_or("https_spiffe") {
            "https_spiffe" => {
                for (k, set) in [
                    ("cert_file", e.cert_file.is_some()),
                    ("key_file", e.key_file.is_some()),
                ] {
                    if set {
                        problems.push(format!(
                            "{}: only for profile \"https_web\" (https_spiffe presents the \
                             server's own X509-SVID)",
                            key(k)
                        ));
                    }
                }
                Some(BundleEndpointProfile::HttpsSpiffe)
            }
            "https_web" => {
                let mut path = |k: &str, v: &Option<PathBuf>, what: &str| match v {
                    Some(p) if !p.as_os_str().is_empty() => Some(in_data_dir(p)),
                    _ => {
                        problems.push(format!(
                            "{}: missing: profile \"https_web\" needs the {what}",
                            key(k)
                        ));
                        None
                    }
                };
                let cert_file = path(
                    "cert_file",
                    &e.cert_file,
                    "PEM certificate chain the endpoint presents",
                );
                let key_file = path(
                    "key_file",
                    &e.key_file,
                    "PEM key of that certificate (mode 0600)",
                );
                match (cert_file, key_file) {
                    (Some(cert_file), Some(key_file)) => {
                        let files = crate::oidc::TlsFiles {
                            section: "federation.bundle_endpoint",
                            cert_file: cert_file.clone(),
                            key: OidcKey::File(key_file.clone()),
                        };
                        problems.extend(crate::oidc::check_tls_files(&files));
                        Some(BundleEndpointProfile::HttpsWeb {
                            cert_file,
                            key_file,
                        })
                    }
                    _ => None,
                }
            }
            other => {
                problems.push(format!(
                    "{}: {other:?} is not {profile_choices}",
                    key("profile")
                ));
                None
            }
        };
        match (bind_address, profile) {
            (Some(bind_address), Some(profile)) if problems.len() == before => {
                Some(BundleEndpoint {
                    bind_address,
                    refresh_hint,
                    profile,
                })
            }
            _ => None,
        }
    });

    let mut relationships: Vec<(Relationship, Option<BootstrapBundle>)> = Vec::new();
    for (i, f) in file.federates_with.iter().enumerate() {
        let before = problems.len();
        let key = |k: &str| format!("federation.federates_with[{i}].{k}");
        let trust_domain = match f.trust_domain.as_deref() {
            None => {
                problems.push(format!(
                    "{}: missing: name the foreign trust domain",
                    key("trust_domain")
                ));
                None
            }
            Some(t) => match TrustDomain::new(t) {
                Err(e) => {
                    problems.push(format!("{}: {e}", key("trust_domain")));
                    None
                }
                Ok(td) if Some(&td) == local => {
                    problems.push(format!(
                        "{}: {td} is this server's own trust domain; a trust domain does \
                         not federate with itself",
                        key("trust_domain")
                    ));
                    None
                }
                Ok(td) if relationships.iter().any(|(r, _)| r.trust_domain == td) => {
                    problems.push(format!(
                        "{}: {td} is federated with twice; keep one \
                         [[federation.federates_with]] per trust domain",
                        key("trust_domain")
                    ));
                    None
                }
                Ok(td) => Some(td),
            },
        };
        let url = match f.bundle_endpoint_url.as_deref() {
            None => {
                problems.push(format!(
                    "{}: missing: the https URL of the trust domain's bundle endpoint",
                    key("bundle_endpoint_url")
                ));
                None
            }
            Some(u) => match crate::federation::check_endpoint_url(u) {
                Ok(_) => Some(u.to_owned()),
                Err(e) => {
                    problems.push(format!("{}: {e}", key("bundle_endpoint_url")));
                    None
                }
            },
        };
        let ca_roots = |problems: &mut Vec<String>| -> Option<String> {
            let path = in_data_dir(f.ca_file.as_deref()?);
            let what = key("ca_file");
            let checked =
                carapace_common::check_named_file(&NamedFile::new(&what, &path, FileUse::Read))
                    .and_then(|()| {
                        carapace_common::read_operator_file(&path, &what, MAX_FEDERATION_FILE_BYTES)
                    })
                    .and_then(|pem| match carapace_core::bundle::certs_from_pem(&pem) {
                        Ok(certs) if !certs.is_empty() => Ok(pem),
                        Ok(_) => Err(format!(
                            "{what} {}: holds no CERTIFICATE block",
                            path.display()
                        )),
                        Err(e) => Err(format!("{what} {}: {e}", path.display())),
                    });
            checked.map_err(|e| problems.push(e)).ok()
        };
        let profile = match f.bundle_endpoint_profile.as_deref() {
            None => {
                problems.push(format!(
                    "{}: missing: {profile_choices}",
                    key("bundle_endpoint_profile")
                ));
                None
            }
            Some("https_spiffe") => {
                if f.ca_file.is_some() {
                    problems.push(format!(
                        "{}: only for bundle_endpoint_profile \"https_web\" (an https_spiffe \
                         endpoint is checked against the trust domain's bundle)",
                        key("ca_file")
                    ));
                }
                match (&f.endpoint_spiffe_id, &trust_domain) {
                    (Some(id), _) => match id.parse::<carapace_core::SpiffeId>() {
                        Ok(endpoint_id) => Some(Profile::HttpsSpiffe { endpoint_id }),
                        Err(e) => {
                            problems.push(format!("{}: {e}", key("endpoint_spiffe_id")));
                            None
                        }
                    },
                    (None, Some(td)) => Some(Profile::HttpsSpiffe {
                        endpoint_id: td.server_id(),
                    }),
                    (None, None) => None,
                }
            }
            Some("https_web") => {
                if f.endpoint_spiffe_id.is_some() {
                    problems.push(format!(
                        "{}: only for bundle_endpoint_profile \"https_spiffe\" (an https_web \
                         endpoint is checked by Web PKI against the URL's host)",
                        key("endpoint_spiffe_id")
                    ));
                }
                let had = problems.len();
                let roots_pem = ca_roots(problems);
                (problems.len() == had).then_some(Profile::HttpsWeb { roots_pem })
            }
            Some(other) => {
                problems.push(format!(
                    "{}: {other:?} is not {profile_choices}",
                    key("bundle_endpoint_profile")
                ));
                None
            }
        };
        let format = match f.bundle_format.as_deref() {
            None => Some(BundleFormat::Spiffe),
            Some(s) => BundleFormat::parse(s).or_else(|| {
                problems.push(format!(
                    "{}: {s:?} is not \"spiffe\" or \"pem\"",
                    key("bundle_format")
                ));
                None
            }),
        };
        if f.bundle_format.is_some() && f.bundle_file.is_none() {
            problems.push(format!("{}: set without bundle_file", key("bundle_format")));
        }
        let bootstrap = match (&f.bundle_file, format) {
            (Some(p), Some(format)) => {
                let b = BootstrapBundle {
                    path: in_data_dir(p),
                    format,
                };
                if let Some(td) = &trust_domain
                    && let Err(e) = b.read(td)
                {
                    problems.push(format!("federation.federates_with[{i}].{e}"));
                }
                Some(b)
            }
            _ => None,
        };
        if let (Some(trust_domain), Some(url), Some(profile)) = (trust_domain, url, profile)
            && problems.len() == before
        {
            relationships.push((
                Relationship {
                    trust_domain,
                    url,
                    profile,
                    source: Source::Config,
                },
                bootstrap,
            ));
        }
    }
    Federation {
        bundle_endpoint,
        relationships,
        refresh_floor,
        refresh_ceiling,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_the_embedded_defaults() {
        let c = validate(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.trust_domain.name(), "example.org");
        assert_eq!(c.bind_address.to_string(), "127.0.0.1:8081");
        assert_eq!(c.default_x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.ca_ttl, Duration::from_secs(86_400));
        assert_eq!(c.key_manager.0, "disk");
        assert_eq!(c.node_attestors[0].0, "join_token");
        assert_eq!(c.admin_socket, default_admin_socket());
        // Tests run as root (CI does): the root default is under /run.
        if carapace_common::euid() == 0 {
            assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ROOT_ADMIN_SOCKET));
        }
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse_file("trust_domain = \"a.org\"\nbind_address = \"0.0.0.0:1\"").unwrap();
        let c = validate(
            file,
            Overrides {
                trust_domain: Some("b.org".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.trust_domain.name(), "b.org");
        assert_eq!(c.bind_address.port(), 1);
    }

    #[test]
    fn unknown_and_mistyped_keys_are_all_listed() {
        let errs = parse_file("trust_domian = \"x\"\nca_ttl = 5\nbind_adress = \"y\"").unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("trust_domian")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("bind_adress")), "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("ca_ttl") || e.contains("invalid type")),
            "{errs:?}"
        );
    }

    #[test]
    fn semantic_problems_are_all_listed() {
        let file = parse_file(
            r#"
trust_domain = "Bad.Domain"
bind_address = "nowhere"
ca_ttl = "1h"
default_x509_svid_ttl = "1h"
ca_key_type = "ec-p521"
log_format = "xml"
[key_manager.nope]
[node_attestor.join_token]
"#,
        )
        .unwrap();
        let errs = validate(file, Overrides::default()).unwrap_err();
        for needle in [
            "trust_domain",
            "bind_address",
            "ca_ttl/6",
            "ca_key_type",
            "log_format",
            "nope",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle} missing from {errs:?}"
            );
        }
    }

    #[test]
    fn durations_are_bounded_without_overflow() {
        for (text, needle) in [
            (
                "ca_ttl = \"9999999999999999999s\"",
                "ca_ttl: 9999999999999999999s is outside the allowed range 10s to 36500 days",
            ),
            ("ca_ttl = \"36501days\"", "ca_ttl: 36501 days is outside"),
            (
                "default_x509_svid_ttl = \"18446744073709551615s\"",
                "default_x509_svid_ttl: 18446744073709551615s is outside the allowed range 10s to 365 days",
            ),
            ("agent_svid_ttl = \"5s\"", "agent_svid_ttl: 5s is outside"),
        ] {
            let errs = validate(parse_file(text).unwrap(), Overrides::default()).unwrap_err();
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        let c = validate(
            parse_file("ca_ttl = \"36500days\"\ndefault_x509_svid_ttl = \"365days\"").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.ca_ttl, limits::MAX_CA_TTL);
    }

    #[test]
    fn load_lists_type_and_semantic_problems_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "trust_domain = \"Bad\"\nca_ttl = 5\nnope = 1\n[node_attestor.tpm]\npcrs = 1\n",
        )
        .unwrap();
        let errs = load(Some(&path), Overrides::default()).unwrap_err();
        let plugin_problems: &[&str] = if cfg!(feature = "tpm") {
            &["node_attestor.tpm: pcrs: invalid type", "set ek_ca_files"]
        } else {
            &["node_attestor.tpm: node_attestor \"tpm\" is not in this build"]
        };
        for needle in [
            "s.toml: ca_ttl: invalid type",
            "s.toml: nope: unknown field",
            "trust_domain: ",
        ]
        .iter()
        .chain(plugin_problems)
        {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
    }

    #[test]
    fn node_api_limits_default_from_the_descriptor_limit() {
        let mut problems = Vec::new();
        let l = node_api_limits(&NodeApiFile::default(), Some(1024), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(l.max_connections, 512);
        assert_eq!(l.max_connections_per_ip, 256);
        assert_eq!(l.max_unauthenticated_connections, 128);
        assert_eq!(l.unauthenticated_idle_timeout, Duration::from_secs(10));
        assert_eq!(l.max_attestations_in_flight, 64);
        let file = parse_file("[node_api]\nmax_connections = 40\n").unwrap();
        let l = node_api_limits(&file.node_api, Some(1024), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            (l.max_connections_per_ip, l.max_unauthenticated_connections),
            (20, 10)
        );
    }

    #[test]
    fn bad_node_api_limits_are_all_listed() {
        let file = parse_file(
            r#"
[node_api]
max_connections = 2000
max_connections_per_ip = 0
max_unauthenticated_connections = 3000
unauthenticated_idle_timeout = "10ms"
max_attestations_in_flight = 0
"#,
        )
        .unwrap();
        let mut problems = Vec::new();
        node_api_limits(&file.node_api, Some(1024), &mut problems);
        for needle in [
            "node_api.max_connections: 2000 is not below the number of files this process may open (1024",
            "node_api.max_connections_per_ip: 0 is outside 1..=max_connections (2000)",
            "node_api.max_unauthenticated_connections: 3000 is outside",
            "node_api.unauthenticated_idle_timeout: 10ms is outside 100ms..1h",
            "node_api.max_attestations_in_flight: 0 is outside 1..=4096",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        }
        let unknown = parse_file("[node_api]\nmax_conns = 1\n").unwrap_err();
        assert!(
            unknown.iter().any(|e| e.contains("max_conns")),
            "{unknown:?}"
        );
    }

    #[test]
    fn shutdown_grace_defaults_to_five_seconds_and_is_bounded() {
        let c = validate(parse_file("").unwrap(), Overrides::default()).unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        let c = validate(
            parse_file("shutdown_grace = \"30s\"").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        let errs = validate(
            parse_file("shutdown_grace = \"1h\"").unwrap(),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("shutdown_grace: 1h is outside 0s..5m")),
            "{errs:?}"
        );
    }

    fn datastore_of(text: &str) -> Result<datastore::Settings, Vec<String>> {
        let text = format!("data_dir = \"/d\"\n[datastore]\n{text}");
        validate(parse_file(&text)?, Overrides::default()).map(|c| c.datastore)
    }

    #[test]
    fn the_datastore_defaults_to_sqlite_in_the_data_dir_and_takes_postgres_urls() {
        use datastore::{Password, PostgresSettings, Settings, SslMode};
        let sqlite = |path: &str, n| Settings::Sqlite {
            path: path.into(),
            max_connections: n,
        };
        assert_eq!(datastore_of("").unwrap(), sqlite("/d/datastore.sqlite3", 8));
        assert_eq!(
            datastore_of("url = \"sqlite://ds.db\"\nmax_connections = 3").unwrap(),
            sqlite("/d/ds.db", 3)
        );
        assert_eq!(
            datastore_of("url = \"sqlite:///var/ds.db\"").unwrap(),
            sqlite("/var/ds.db", 8)
        );
        assert_eq!(
            datastore_of(
                "url = \"postgres://carapace@db.example.org:5432/carapace\"\n\
                 ca_file = \"/etc/db-ca.pem\"\npassword_file = \"db-password\"\n\
                 max_connections = 20"
            )
            .unwrap(),
            Settings::Postgres(PostgresSettings {
                url: "postgres://carapace@db.example.org:5432/carapace".into(),
                max_connections: 20,
                // A CA file alone means: verify the certificate and the host name.
                ssl_mode: Some(SslMode::VerifyFull),
                ca_file: Some("/etc/db-ca.pem".into()),
                password: Password::File("/d/db-password".into()),
            })
        );
        let Settings::Postgres(pg) = datastore_of(
            "url = \"postgresql://c@h/db\"\nsslmode = \"require\"\npassword_env = \"PGPW\"",
        )
        .unwrap() else {
            panic!("postgres")
        };
        assert_eq!(
            (pg.ssl_mode, pg.password.clone()),
            (Some(SslMode::Require), Password::Env("PGPW".into()))
        );
        // What a log line shows: the engine and the target, no query.
        let shown = Settings::Postgres(PostgresSettings {
            url: "postgres://c@h/db?application_name=x".into(),
            ..pg
        })
        .to_string();
        assert_eq!(shown, "postgres postgres://c@h/db");
    }

    #[test]
    fn each_bad_datastore_key_is_named_and_a_url_password_is_never_repeated() {
        for (text, want) in [
            (
                "url = \"mysql://u:hunter2@h/db\"",
                "datastore.url: the scheme \"mysql\"",
            ),
            (
                "url = \"sqlite://\"",
                "datastore.url: \"sqlite://\" names no file",
            ),
            (
                "url = \"sqlite://x.db?mode=ro\"",
                "SQLite options are not taken",
            ),
            (
                "url = \"postgres://u:hunter2@h/db\"",
                "datastore.url: it has a password in its user info",
            ),
            (
                "url = \"postgres://u@h/db?password=hunter2\"",
                "datastore.url: it has a password query parameter",
            ),
            (
                "password_file = \"pw\"",
                "datastore.password_file: only for a PostgreSQL",
            ),
            (
                "sslmode = \"require\"",
                "datastore.sslmode: only for a PostgreSQL",
            ),
            (
                "max_connections = 0",
                "datastore.max_connections: 0 is outside 1..=1000",
            ),
            (
                "url = \"postgres://u@h/db\"\nsslmode = \"verify\"",
                "datastore.sslmode: \"verify\" is not one of disable, prefer",
            ),
            (
                "url = \"postgres://u@h/db\"\nsslmode = \"require\"\nca_file = \"ca.pem\"",
                "datastore.ca_file: sslmode \"require\" does not check",
            ),
            (
                "url = \"postgres://u@h/db\"\npassword_file = \"f\"\npassword_env = \"V\"",
                "datastore: set password_file or password_env, not both",
            ),
            (
                "url = \"postgres://u@h/db\"\npassword_env = \"A=B\"",
                "datastore.password_env: \"A=B\" is not an environment variable name",
            ),
            ("pasword_file = \"f\"", "unknown field `pasword_file`"),
        ] {
            let errs = datastore_of(text).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(want)), "{text}: {errs:?}");
            assert!(!errs.join("\n").contains("hunter2"), "{text}: {errs:?}");
        }
    }

    #[test]
    fn the_datastore_password_comes_from_a_private_file_or_a_set_variable() {
        use datastore::Password;
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = Password::File(file.clone());
        assert_eq!(p.read().unwrap().as_deref(), Some("s3cret"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = p.read().unwrap_err().to_string();
        assert!(e.contains("has mode 644") && e.contains("chmod 600"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let e = Password::File(dir.path().join("missing"))
            .read()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("datastore password_file") && e.contains("missing"),
            "{e}"
        );
        let e = Password::Env("CARAPACE_TEST_SURELY_UNSET_VAR".into())
            .read()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CARAPACE_TEST_SURELY_UNSET_VAR is not set"),
            "{e}"
        );
        assert_eq!(Password::None.read().unwrap(), None);
    }

    #[test]
    fn jwt_settings_default_parse_and_each_bad_one_is_named() {
        let c = validate(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.jwt_key_type, KeyType::EcP256);
        assert_eq!(c.default_jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(c.jwt_issuer, None);
        let c = validate(
            parse_file(
                "jwt_key_type = \"rsa-2048\"\ndefault_jwt_svid_ttl = \"2m\"\njwt_issuer = \"https://oidc.example.org\"",
            )
            .unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.jwt_key_type, KeyType::Rsa2048);
        assert_eq!(c.default_jwt_svid_ttl, Duration::from_secs(120));
        assert_eq!(c.jwt_issuer.as_deref(), Some("https://oidc.example.org"));
        let errs = validate(
            parse_file(
                "jwt_key_type = \"ed25519\"\ndefault_jwt_svid_ttl = \"5h\"\njwt_issuer = \"a b\"",
            )
            .unwrap(),
            Overrides::default(),
        )
        .unwrap_err();
        for want in [
            "jwt_key_type: ",
            "default_jwt_svid_ttl: ",
            "jwt_issuer: \"a b\" is not an issuer",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
        }
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn oidc_discovery_is_validated_naming_each_key() {
        let c = validate(
            parse_file(
                "[oidc_discovery]\nissuer = \"https://oidc.example.org/td\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n",
            )
            .unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.oidc_discovery,
            Some(OidcDiscovery {
                bind_address: DEFAULT_OIDC_ADDRESS.parse().unwrap(),
                issuer: "https://oidc.example.org/td".into(),
                cert_file: "/c.pem".into(),
                key: OidcKey::File("/k.pem".into()),
            })
        );
        assert_eq!(
            validate(parse_file("").unwrap(), Overrides::default())
                .unwrap()
                .oidc_discovery,
            None
        );
        let errs = validate(
            parse_file("[oidc_discovery]\nbind_address = \"here\"\n").unwrap(),
            Overrides::default(),
        )
        .unwrap_err();
        for needle in [
            "oidc_discovery.bind_address: \"here\" is not HOST:PORT",
            "oidc_discovery.issuer: missing",
            "oidc_discovery.cert_file: missing",
            "oidc_discovery.key_file: missing",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        for (issuer, needle) in [
            ("http://oidc.example.org", "is not an https URL"),
            ("https://oidc.example.org?x=1", "has a query"),
            ("https://oidc.example.org#f", "has a fragment"),
            ("https://oidc.example.org/", "ends with a slash"),
            ("https://", "has no host"),
            ("https://user@oidc.example.org", "has user information"),
            ("https://oidc.example.org:99999", "has a bad port"),
            ("https://oidc.example.org:", "has a bad port"),
            ("https://oidc_example.org", "has a bad host"),
            ("https://[::g]:8443", "has a bad host"),
        ] {
            let text = format!(
                "[oidc_discovery]\nissuer = {issuer:?}\ncert_file = \"/c\"\nkey_file = \"/k\"\n"
            );
            let errs = validate(parse_file(&text).unwrap(), Overrides::default()).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.starts_with("oidc_discovery.issuer: ") && e.contains(needle)),
                "{issuer}: {needle}: {errs:?}"
            );
        }
        for good in [
            "https://oidc.example.org:8443",
            "https://[::1]:8443/td",
            "https://10.0.0.1/a/b",
        ] {
            assert_eq!(crate::oidc::check_issuer(good), Ok(()), "{good}");
        }
        let file = OidcDiscoveryFile {
            issuer: Some("https://a.example".into()),
            cert_file: Some("/c".into()),
            key_file: Some("/k".into()),
            ..Default::default()
        };
        let mut problems = Vec::new();
        assert!(
            oidc_discovery(
                &file,
                Some("https://b.example"),
                Path::new("/d"),
                &mut problems
            )
            .is_none()
        );
        assert!(
            problems[0].contains("differs from jwt_issuer"),
            "{problems:?}"
        );
        let inherits = OidcDiscoveryFile {
            issuer: None,
            ..file
        };
        let o = oidc_discovery(
            &inherits,
            Some("https://b.example"),
            Path::new("/d"),
            &mut problems,
        )
        .unwrap();
        assert_eq!(o.issuer, "https://b.example");
        let relative = OidcDiscoveryFile {
            cert_file: Some("oidc/oidc.crt".into()),
            ..inherits
        };
        let o = oidc_discovery(
            &relative,
            Some("https://b.example"),
            Path::new("/d"),
            &mut problems,
        )
        .unwrap();
        assert_eq!(o.cert_file, PathBuf::from("/d/oidc/oidc.crt"));
        assert_eq!(o.key, OidcKey::File(PathBuf::from("/k")));
    }

    #[test]
    fn the_oidc_key_is_a_file_or_a_key_manager_key_named_oidc_something() {
        let base = "[oidc_discovery]\nissuer = \"https://o.example\"\ncert_file = \"/c\"\n";
        let ok = validate(
            parse_file(&format!("{base}key_id = \"oidc-tls\"\n")).unwrap(),
            Overrides::default(),
        )
        .unwrap()
        .oidc_discovery
        .unwrap();
        assert_eq!(ok.key, OidcKey::KeyManager("oidc-tls".into()));
        assert_eq!(ok.key_file(), None);
        assert_eq!(ok.files().len(), 1, "no key file to check");
        for (extra, want) in [
            (
                "key_id = \"oidc-tls\"\nkey_file = \"/k\"\n",
                "key_file and key_id are both set",
            ),
            ("key_id = \"x509-ca-0\"\n", "does not start with \"oidc-\""),
            ("key_id = \"oidc-\"\n", "does not start with"),
            ("key_id = \"oidc-a/b\"\n", "oidc_discovery.key_id: "),
            ("", "oidc_discovery.key_file: missing"),
        ] {
            let errs = validate(
                parse_file(&format!("{base}{extra}")).unwrap(),
                Overrides::default(),
            )
            .unwrap_err();
            assert!(errs.iter().any(|e| e.contains(want)), "{want}: {errs:?}");
        }
    }

    fn federation_of(text: &str) -> Result<Federation, Vec<String>> {
        let text = format!("trust_domain = \"example.org\"\ndata_dir = \"/d\"\n{text}");
        validate(parse_file(&text)?, Overrides::default()).map(|c| c.federation)
    }

    /// A self-signed CA certificate, PEM, and a `localhost` certificate and key it signed.
    fn test_pki() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
    }

    #[test]
    fn federation_defaults_to_nothing_and_the_endpoint_to_https_spiffe_on_8443() {
        assert_eq!(federation_of("").unwrap(), Federation::default());
        assert_eq!(
            (
                Federation::default().refresh_floor,
                Federation::default().refresh_ceiling
            ),
            (Duration::from_secs(10), Duration::from_secs(3600))
        );
        let f = federation_of("[federation.bundle_endpoint]\n").unwrap();
        assert_eq!(
            f.bundle_endpoint,
            Some(BundleEndpoint {
                bind_address: "0.0.0.0:8443".parse().unwrap(),
                refresh_hint: Duration::from_secs(300),
                profile: BundleEndpointProfile::HttpsSpiffe,
            })
        );
        assert!(f.relationships.is_empty());
        let f = federation_of(
            "[federation]\nrefresh_floor = \"2s\"\nrefresh_ceiling = \"10m\"\n\
             [federation.bundle_endpoint]\nbind_address = \"127.0.0.1:9443\"\n\
             refresh_hint = \"30s\"\nprofile = \"https_spiffe\"\n",
        )
        .unwrap();
        assert_eq!(
            (f.refresh_floor, f.refresh_ceiling),
            (Duration::from_secs(2), Duration::from_secs(600))
        );
        let e = f.bundle_endpoint.unwrap();
        assert_eq!(e.bind_address.to_string(), "127.0.0.1:9443");
        assert_eq!(e.refresh_hint, Duration::from_secs(30));
    }

    #[test]
    fn the_https_web_endpoint_reads_its_files_in_the_data_dir_and_names_each_problem() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (_, cert, key) = test_pki();
        std::fs::write(dir.path().join("b.crt"), cert).unwrap();
        std::fs::write(dir.path().join("b.key"), key).unwrap();
        std::fs::set_permissions(
            dir.path().join("b.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let conf = |extra: &str| {
            format!(
                "data_dir = {:?}\n[federation.bundle_endpoint]\nprofile = \"https_web\"\n{extra}",
                dir.path()
            )
        };
        let c = validate(
            parse_file(&conf("cert_file = \"b.crt\"\nkey_file = \"b.key\"\n")).unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.federation.bundle_endpoint.unwrap().profile,
            BundleEndpointProfile::HttpsWeb {
                cert_file: dir.path().join("b.crt"),
                key_file: dir.path().join("b.key"),
            }
        );
        let errs = validate(parse_file(&conf("")).unwrap(), Overrides::default()).unwrap_err();
        for needle in [
            "federation.bundle_endpoint.cert_file: missing",
            "federation.bundle_endpoint.key_file: missing",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        // The key readable by others, a key that is not the certificate's, no file.
        std::fs::set_permissions(
            dir.path().join("b.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        for (files, needle) in [
            ("cert_file = \"b.crt\"\nkey_file = \"b.key\"\n", "key_file"),
            (
                "cert_file = \"nope.crt\"\nkey_file = \"b.key\"\n",
                "nope.crt does not exist",
            ),
        ] {
            let errs =
                validate(parse_file(&conf(files)).unwrap(), Overrides::default()).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.starts_with("federation.bundle_endpoint") && e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        std::fs::set_permissions(
            dir.path().join("b.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(dir.path().join("other.key"), test_pki().2).unwrap();
        std::fs::set_permissions(
            dir.path().join("other.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let errs = validate(
            parse_file(&conf("cert_file = \"b.crt\"\nkey_file = \"other.key\"\n")).unwrap(),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("federation.bundle_endpoint.key_file ")
                && e.contains("is not the key of the first certificate of federation.bundle_endpoint.cert_file")),
            "{errs:?}"
        );
    }

    #[test]
    fn each_bad_federation_key_is_named() {
        let errs = federation_of(
            "[federation]\nrefresh_floor = \"2h\"\nrefresh_ceiling = \"2days\"\n\
             [federation.bundle_endpoint]\nbind_address = \"anywhere\"\n\
             refresh_hint = \"1h\"\nprofile = \"https_spiffe\"\ncert_file = \"c\"\nkey_file = \"k\"\n",
        )
        .unwrap_err();
        for needle in [
            "federation.refresh_ceiling: 2 days is outside the allowed range 1s to 1 day",
            "federation.bundle_endpoint.bind_address: \"anywhere\" is not HOST:PORT",
            "federation.bundle_endpoint.refresh_hint: 3600s is outside the allowed range 1s to 300s",
            "federation.bundle_endpoint.cert_file: only for profile \"https_web\"",
            "federation.bundle_endpoint.key_file: only for profile \"https_web\"",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        let errs = federation_of(
            "[federation]\nrefresh_floor = \"2m\"\nrefresh_ceiling = \"1m\"\n\
             [federation.bundle_endpoint]\nprofile = \"acme\"\n",
        )
        .unwrap_err();
        for needle in [
            "federation.refresh_floor: 2m is above refresh_ceiling (1m)",
            "federation.bundle_endpoint.profile: \"acme\" is not \"https_spiffe\" or \"https_web\"",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        for (text, needle) in [
            ("[federation]\nrefresh_flor = \"1s\"\n", "refresh_flor"),
            ("[federation.bundle_endpoint]\nport = 1\n", "port"),
            (
                "[[federation.federates_with]]\ntrust_domian = \"a\"\n",
                "trust_domian",
            ),
        ] {
            let errs = parse_file(text).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.contains(needle) && e.contains("unknown field")),
                "{needle}: {errs:?}"
            );
        }
    }

    #[test]
    fn the_bundle_endpoint_needs_a_port_of_its_own() {
        for (text, needle) in [
            (
                "bind_address = \"127.0.0.1:8443\"\n[federation.bundle_endpoint]\n",
                "and bind_address (127.0.0.1:8443) share a port",
            ),
            (
                "[health]\nbind_address = \"127.0.0.1:9000\"\n\
                 [federation.bundle_endpoint]\nbind_address = \"0.0.0.0:9000\"\n",
                "and health.bind_address (127.0.0.1:9000) share a port",
            ),
            (
                "[oidc_discovery]\nissuer = \"https://o.example\"\ncert_file = \"/c\"\n\
                 key_file = \"/k\"\n[federation.bundle_endpoint]\n",
                "and oidc_discovery.bind_address (127.0.0.1:8443) share a port",
            ),
        ] {
            let errs = federation_of(text).unwrap_err();
            assert!(
                errs.iter().any(
                    |e| e.starts_with("federation.bundle_endpoint.bind_address: ")
                        && e.contains(needle)
                ),
                "{needle}: {errs:?}"
            );
        }
        // Another address on the same port is fine.
        federation_of(
            "bind_address = \"127.0.0.1:8443\"\n[federation.bundle_endpoint]\n\
             bind_address = \"127.0.0.2:8443\"\n",
        )
        .unwrap();
    }

    #[test]
    fn relationships_are_parsed_with_their_defaults_roots_and_bootstrap_bundles() {
        use crate::federation::{Profile, Relationship, Source};
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, _, _) = test_pki();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        let mut b = carapace_core::TrustBundle::new(TrustDomain::new("a.test").unwrap());
        b.x509_authorities = carapace_core::bundle::certs_from_pem(&ca_pem).unwrap();
        b.sequence = 3;
        std::fs::write(dir.path().join("a.json"), b.to_spiffe_json().unwrap()).unwrap();
        std::fs::write(dir.path().join("a.pem"), &ca_pem).unwrap();
        let text = format!(
            "trust_domain = \"example.org\"\ndata_dir = {:?}\n\
             [[federation.federates_with]]\ntrust_domain = \"a.test\"\n\
             bundle_endpoint_url = \"https://a.test:8443\"\n\
             bundle_endpoint_profile = \"https_spiffe\"\nbundle_file = \"a.json\"\n\
             [[federation.federates_with]]\ntrust_domain = \"spiffe://b.test\"\n\
             bundle_endpoint_url = \"https://bundles.b.test/b?x=1\"\n\
             bundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://hub.test/bundle-server\"\n\
             bundle_file = \"a.pem\"\nbundle_format = \"pem\"\n\
             [[federation.federates_with]]\ntrust_domain = \"c.test\"\n\
             bundle_endpoint_url = \"https://[::1]:9443/\"\n\
             bundle_endpoint_profile = \"https_web\"\nca_file = \"ca.pem\"\n\
             [[federation.federates_with]]\ntrust_domain = \"d.test\"\n\
             bundle_endpoint_url = \"https://d.test\"\n\
             bundle_endpoint_profile = \"https_web\"\n",
            dir.path()
        );
        let f = validate(parse_file(&text).unwrap(), Overrides::default())
            .unwrap()
            .federation;
        let td = |s: &str| TrustDomain::new(s).unwrap();
        assert_eq!(
            f.relationships,
            vec![
                (
                    Relationship {
                        trust_domain: td("a.test"),
                        url: "https://a.test:8443".into(),
                        profile: Profile::HttpsSpiffe {
                            endpoint_id: "spiffe://a.test/spire/server".parse().unwrap()
                        },
                        source: Source::Config,
                    },
                    Some(BootstrapBundle {
                        path: dir.path().join("a.json"),
                        format: BundleFormat::Spiffe
                    })
                ),
                (
                    Relationship {
                        trust_domain: td("b.test"),
                        url: "https://bundles.b.test/b?x=1".into(),
                        profile: Profile::HttpsSpiffe {
                            endpoint_id: "spiffe://hub.test/bundle-server".parse().unwrap()
                        },
                        source: Source::Config,
                    },
                    Some(BootstrapBundle {
                        path: dir.path().join("a.pem"),
                        format: BundleFormat::Pem
                    })
                ),
                (
                    Relationship {
                        trust_domain: td("c.test"),
                        url: "https://[::1]:9443/".into(),
                        profile: Profile::HttpsWeb {
                            roots_pem: Some(ca_pem.clone())
                        },
                        source: Source::Config,
                    },
                    None
                ),
                (
                    Relationship {
                        trust_domain: td("d.test"),
                        url: "https://d.test".into(),
                        profile: Profile::HttpsWeb { roots_pem: None },
                        source: Source::Config,
                    },
                    None
                ),
            ]
        );
        // The bootstrap bundle reads back as the bundle written.
        let read = f.relationships[0]
            .1
            .as_ref()
            .unwrap()
            .read(&td("a.test"))
            .unwrap();
        assert_eq!(read.x509_authorities, b.x509_authorities);
        assert_eq!(read.sequence, 3);
    }

    #[test]
    fn each_bad_relationship_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk"), "not a bundle").unwrap();
        // A CA of other.test (URI SAN), given as a.test's bootstrap bundle.
        let mut other_ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        other_ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        other_ca.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://other.test".try_into().unwrap(),
        )];
        let other_ca = other_ca
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::write(dir.path().join("other.pem"), other_ca.pem()).unwrap();
        let rel = |body: &str| {
            format!(
                "trust_domain = \"example.org\"\ndata_dir = {:?}\n\
                 [[federation.federates_with]]\n{body}",
                dir.path()
            )
        };
        let ok = "trust_domain = \"a.test\"\nbundle_endpoint_url = \"https://a.test\"\n";
        for (body, needle) in [
            (
                "bundle_endpoint_url = \"https://a.test\"\nbundle_endpoint_profile = \"https_web\"\n",
                "federation.federates_with[0].trust_domain: missing",
            ),
            (
                "trust_domain = \"A.test\"\nbundle_endpoint_url = \"https://a.test\"\n\
                 bundle_endpoint_profile = \"https_web\"\n",
                "federation.federates_with[0].trust_domain: ",
            ),
            (
                "trust_domain = \"example.org\"\nbundle_endpoint_url = \"https://a.test\"\n\
                 bundle_endpoint_profile = \"https_web\"\n",
                "federation.federates_with[0].trust_domain: example.org is this server's own trust domain",
            ),
            (
                "trust_domain = \"a.test\"\nbundle_endpoint_profile = \"https_web\"\n",
                "federation.federates_with[0].bundle_endpoint_url: missing",
            ),
            (
                "trust_domain = \"a.test\"\nbundle_endpoint_url = \"http://a.test\"\n\
                 bundle_endpoint_profile = \"https_web\"\n",
                "federation.federates_with[0].bundle_endpoint_url: \"http://a.test\": plain http:// is refused",
            ),
            (
                "trust_domain = \"a.test\"\nbundle_endpoint_url = \"https://u:p@a.test\"\n\
                 bundle_endpoint_profile = \"https_web\"\n",
                "bundle_endpoint_url: \"https://u:p@a.test\": user info (user@host) is not supported",
            ),
            (
                "trust_domain = \"a.test\"\nbundle_endpoint_url = \"https://a.test/#x\"\n\
                 bundle_endpoint_profile = \"https_web\"\n",
                "bundle_endpoint_url: \"https://a.test/#x\": a URL with a #fragment",
            ),
            (
                "trust_domain = \"a.test\"\nbundle_endpoint_url = \"https://a.test:0\"\n\
                 bundle_endpoint_profile = \"https_web\"\n",
                "bundle_endpoint_url: \"https://a.test:0\": port \"0\" is not a port number",
            ),
            (
                "trust_domain = \"a.test\"\nbundle_endpoint_url = \"https://-a.test\"\n\
                 bundle_endpoint_profile = \"https_web\"\n",
                "bundle_endpoint_url: \"https://-a.test\": the host is not a DNS name",
            ),
            (
                "trust_domain = \"a.test\"\nbundle_endpoint_url = \"https:///x\"\n\
                 bundle_endpoint_profile = \"https_web\"\n",
                "bundle_endpoint_url: \"https:///x\": no host",
            ),
            (
                ok,
                "federation.federates_with[0].bundle_endpoint_profile: missing",
            ),
            (
                &format!("{ok}bundle_endpoint_profile = \"https\"\n"),
                "federation.federates_with[0].bundle_endpoint_profile: \"https\" is not",
            ),
            (
                &format!(
                    "{ok}bundle_endpoint_profile = \"https_web\"\n\
                     endpoint_spiffe_id = \"spiffe://a.test/spire/server\"\n"
                ),
                "federation.federates_with[0].endpoint_spiffe_id: only for bundle_endpoint_profile \"https_spiffe\"",
            ),
            (
                &format!("{ok}bundle_endpoint_profile = \"https_spiffe\"\nca_file = \"ca.pem\"\n"),
                "federation.federates_with[0].ca_file: only for bundle_endpoint_profile \"https_web\"",
            ),
            (
                &format!(
                    "{ok}bundle_endpoint_profile = \"https_spiffe\"\n\
                     endpoint_spiffe_id = \"spiffe://a.test/x/../y\"\n"
                ),
                "federation.federates_with[0].endpoint_spiffe_id: ",
            ),
            (
                &format!("{ok}bundle_endpoint_profile = \"https_web\"\nca_file = \"nope.pem\"\n"),
                "federation.federates_with[0].ca_file ",
            ),
            (
                &format!("{ok}bundle_endpoint_profile = \"https_web\"\nca_file = \"junk\"\n"),
                "holds no CERTIFICATE block",
            ),
            (
                &format!(
                    "{ok}bundle_endpoint_profile = \"https_spiffe\"\nbundle_file = \"nope.json\"\n"
                ),
                "federation.federates_with[0].bundle_file ",
            ),
            (
                &format!(
                    "{ok}bundle_endpoint_profile = \"https_spiffe\"\nbundle_file = \"junk\"\n"
                ),
                "not a spiffe bundle",
            ),
            (
                &format!(
                    "{ok}bundle_endpoint_profile = \"https_spiffe\"\nbundle_file = \"other.pem\"\n\
                     bundle_format = \"pem\"\n"
                ),
                "other.pem: the bundle is not a.test's: X.509 authority 0 is a CA of trust \
                 domain other.test (URI SAN spiffe://other.test)",
            ),
            (
                &format!(
                    "{ok}bundle_endpoint_profile = \"https_spiffe\"\nbundle_file = \"junk\"\n\
                     bundle_format = \"jwks\"\n"
                ),
                "federation.federates_with[0].bundle_format: \"jwks\" is not \"spiffe\" or \"pem\"",
            ),
            (
                &format!(
                    "{ok}bundle_endpoint_profile = \"https_spiffe\"\nbundle_format = \"pem\"\n"
                ),
                "federation.federates_with[0].bundle_format: set without bundle_file",
            ),
        ] {
            let errs = validate(parse_file(&rel(body)).unwrap(), Overrides::default()).unwrap_err();
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        // The same trust domain twice: the second is named.
        let twice = format!(
            "{}{ok}bundle_endpoint_profile = \"https_web\"\n",
            rel(&format!(
                "{ok}bundle_endpoint_profile = \"https_web\"\n\
                [[federation.federates_with]]\n"
            ))
        );
        let errs = validate(parse_file(&twice).unwrap(), Overrides::default()).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "federation.federates_with[1].trust_domain: a.test is federated with twice"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn downstream_is_off_without_its_section_and_bounded_with_it() {
        let c = validate(FileConfig::default(), Overrides::default()).unwrap();
        assert!(c.downstream.is_none());

        // The section alone: one tier below, CAs up to ca_ttl/6.
        let c = validate(
            parse_file("ca_ttl = \"24h\"\n[downstream]\n").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        let d = c.downstream.unwrap();
        assert_eq!(d.max_depth, 1);
        assert_eq!(d.ca_ttl_max, Duration::from_secs(4 * 3600));

        let c = validate(
            parse_file("[downstream]\nmax_depth = 3\nca_ttl_max = \"2h\"\n").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        let d = c.downstream.unwrap();
        assert_eq!((d.max_depth, d.ca_ttl_max), (3, Duration::from_secs(7200)));

        // Out of range: each named, all listed.
        for (text, needle) in [
            (
                "[downstream]\nmax_depth = 0\n",
                "downstream.max_depth: 0 is out of range (1..=4)",
            ),
            (
                "[downstream]\nmax_depth = 5\n",
                "downstream.max_depth: 5 is out of range (1..=4)",
            ),
            (
                "ca_ttl = \"24h\"\n[downstream]\nca_ttl_max = \"25h\"\n",
                "downstream.ca_ttl_max:",
            ),
            (
                "[downstream]\nca_ttl_max = \"99s\"\n",
                "downstream.ca_ttl_max:",
            ),
        ] {
            let errs = validate(parse_file(text).unwrap(), Overrides::default()).unwrap_err();
            assert_eq!(errs.len(), 1, "{text}: {errs:?}");
            assert!(errs[0].starts_with(needle), "{text}: {errs:?}");
        }
        let errs = parse_file("[downstream]\nmax_dept = 1\n").unwrap_err();
        assert!(errs.iter().any(|e| e.contains("max_dept")), "{errs:?}");
    }

    fn require_together(text: &str, configured: &[&str]) -> (NodeAttestation, Vec<String>) {
        let file = parse_file(text).unwrap();
        let attestors: Vec<(String, toml::Table)> = configured
            .iter()
            .map(|c| {
                let (name, table) = c.split_once(' ').unwrap_or((c, ""));
                (name.to_owned(), toml::from_str(table).unwrap())
            })
            .collect();
        let mut problems = Vec::new();
        let n = node_attestation(&file.node_attestation, &attestors, &mut problems);
        (n, problems)
    }

    #[test]
    fn attestors_required_together_are_configured_distinct_reattestable_and_in_one_list() {
        let (n, problems) = require_together(
            "[node_attestation]\nrequire_together = [[\"tpm\", \"kerberos\"]]\n",
            &["tpm", "kerberos", "join_token"],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            n.list_of("kerberos"),
            Some(&["tpm".to_owned(), "kerberos".to_owned()][..])
        );
        assert_eq!(n.list_of("join_token"), None);
        // None by default.
        let (n, problems) = require_together("", &["join_token"]);
        assert!(problems.is_empty() && n.require_together.is_empty());
        // A cloud attestor that admits a node again may be a member.
        let (_, problems) = require_together(
            "[node_attestation]\nrequire_together = [[\"tpm\", \"aws_iid\"]]\n",
            &["tpm", "aws_iid allow_reattestation = true"],
        );
        assert!(problems.is_empty(), "{problems:?}");

        for (text, configured, wanted) in [
            (
                r#"require_together = [["tpm", "kerberos"]]"#,
                &["tpm"][..],
                "node_attestation.require_together: [tpm, kerberos]: kerberos is not configured (add [node_attestor.kerberos])",
            ),
            (
                r#"require_together = [["tpm"]]"#,
                &["tpm"][..],
                "node_attestation.require_together: [tpm] needs at least two distinct node attestors",
            ),
            (
                r#"require_together = [["tpm", "tpm"]]"#,
                &["tpm"][..],
                "node_attestation.require_together: [tpm, tpm] names tpm twice",
            ),
            (
                r#"require_together = [["tpm", "kerberos"], ["sshpop", "kerberos"]]"#,
                &["tpm", "kerberos", "sshpop"][..],
                "node_attestation.require_together: [sshpop, kerberos]: kerberos is already in another list (an attestor may be in at most one)",
            ),
            (
                r#"require_together = [["tpm", "join_token"]]"#,
                &["tpm", "join_token"][..],
                "node_attestation.require_together: [tpm, join_token]: join_token admits a node only once (trust on first use)",
            ),
            (
                r#"require_together = [["gcp_iit", "tpm"]]"#,
                &["tpm", "gcp_iit"][..],
                "node_attestation.require_together: [gcp_iit, tpm]: gcp_iit admits a node only once (trust on first use)",
            ),
        ] {
            let (_, problems) =
                require_together(&format!("[node_attestation]\n{text}\n"), configured);
            assert!(problems[0].starts_with(wanted), "{text}: {problems:?}");
            // `[tpm, tpm]` is also too short; every other case has one problem.
            assert_eq!(
                problems.len(),
                1 + usize::from(text.contains("\"tpm\", \"tpm\""))
            );
        }
        // Through `validate`: a list naming an attestor that is not configured.
        let errs = validate(
            parse_file("[node_attestation]\nrequire_together = [[\"join_token\", \"x\"]]\n")
                .unwrap(),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("x is not configured")),
            "{errs:?}"
        );
        let errs = parse_file("[node_attestation]\nrequire = []\n").unwrap_err();
        assert!(errs.iter().any(|e| e.contains("require")), "{errs:?}");
    }

    #[test]
    fn shipped_samples_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
        for name in ["server.toml", "server.full.toml"] {
            let path = root.join(name);
            let file = read_file(Some(&path)).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            validate(file, Overrides::default()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
    }
}
