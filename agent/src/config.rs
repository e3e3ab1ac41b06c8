//! Agent configuration: an optional TOML file overridden by flags, validated in one place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use carapace_core::{KeyType, TrustDomain};

use crate::node_client::ServerAddresses;
use crate::workload_api::ConnectionLimits;
use crate::workload_api::sds::SdsConfig;

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";
/// Default server address.
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:8081";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/carapace/agent";
/// Default Workload API socket.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/carapace-agent/public/api.sock";
/// Where the health endpoint listens when `[health]` names no address (loopback; the
/// server's default is 8080, so both fit on one machine).
pub const DEFAULT_HEALTH_ADDRESS: &str = "127.0.0.1:8082";

/// The file format: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain.
    pub trust_domain: Option<String>,
    /// Server node API address, HOST:PORT, or a list of them (servers of one trust
    /// domain: the agent fails over between them).
    pub server_address: Option<ServerAddressFile>,
    /// Data directory (agent key, SVID, bundle).
    pub data_dir: Option<PathBuf>,
    /// Workload API socket path.
    pub socket_path: Option<PathBuf>,
    /// PEM bundle to trust the server with on first contact.
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust the server on first contact without a bundle (labs only).
    pub insecure_bootstrap: Option<bool>,
    /// Log filter.
    pub log_level: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// Key type of workload keys.
    pub workload_key_type: Option<String>,
    /// How long the workload attestors together may take for one Workload API request.
    #[serde(default, with = "humantime_serde::option")]
    pub workload_attestation_timeout: Option<Duration>,
    /// Bounds on the Workload API's connections.
    #[serde(default)]
    pub workload_api: WorkloadApiFile,
    /// Envoy's Secret Discovery Service: resource names and the certificate validator.
    #[serde(default)]
    pub sds: SdsFile,
    /// How long a stop waits for open streams before closing them.
    #[serde(default, with = "humantime_serde::option")]
    pub shutdown_grace: Option<Duration>,
    /// Key manager for the agent's own key (exactly one; default `disk`).
    #[serde(default)]
    pub key_manager: toml::Table,
    /// Node attestors (default `join_token`): one, or several for a server that requires
    /// them together (composite node attestation), then ordered by `node_attestors`.
    #[serde(default)]
    pub node_attestor: toml::Table,
    /// The order the agent runs its node attestors in, when more than one is configured:
    /// it opens with the first, and runs the others as the server asks for them.
    pub node_attestors: Option<Vec<String>>,
    /// Workload attestors (default `unix`).
    #[serde(default)]
    pub workload_attestor: toml::Table,
    /// The health endpoint (`/live`, `/ready`, `/metrics`): on when the section is present.
    pub health: Option<carapace_common::health::HealthFile>,
}

/// `[workload_api]`: bounds on the Workload API's connections. Unset keys default from
/// the process's descriptor limit ([`ConnectionLimits::from_fd_limit`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiFile {
    /// Live connections in total.
    pub max_connections: Option<usize>,
    /// Live connections of one uid.
    pub max_connections_per_uid: Option<usize>,
    /// How long a connection without an RPC in progress stays open.
    #[serde(default, with = "humantime_serde::option")]
    pub connection_idle_timeout: Option<Duration>,
}

/// `[sds]`: how SDS names its resources (SPIRE's names by default) and whether Envoy
/// gets the SPIFFE certificate validator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsFile {
    /// The name of the workload's first identity (default `default`).
    pub default_svid_name: Option<String>,
    /// The name of the own trust domain's bundle (default `ROOTCA`).
    pub default_bundle_name: Option<String>,
    /// The name of the own and federated bundles together (default `ALL`).
    pub default_all_bundles_name: Option<String>,
    /// Serve `trusted_ca` instead of the SPIFFE certificate validator (default false).
    pub disable_spiffe_cert_validation: Option<bool>,
}

/// Resolves `[sds]`, listing every problem: a name must be non-empty, without spaces,
/// not a SPIFFE ID (those name identities and trust domains), and the three must differ.
fn sds_config(file: &SdsFile, problems: &mut Vec<String>) -> SdsConfig {
    let defaults = SdsConfig::default();
    let config = SdsConfig {
        default_svid_name: file
            .default_svid_name
            .clone()
            .unwrap_or(defaults.default_svid_name),
        default_bundle_name: file
            .default_bundle_name
            .clone()
            .unwrap_or(defaults.default_bundle_name),
        default_all_bundles_name: file
            .default_all_bundles_name
            .clone()
            .unwrap_or(defaults.default_all_bundles_name),
        disable_spiffe_cert_validation: file
            .disable_spiffe_cert_validation
            .unwrap_or(defaults.disable_spiffe_cert_validation),
    };
    let names = [
        ("default_svid_name", &config.default_svid_name),
        ("default_bundle_name", &config.default_bundle_name),
        ("default_all_bundles_name", &config.default_all_bundles_name),
    ];
    for (i, (key, name)) in names.iter().enumerate() {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            problems.push(format!(
                "sds.{key}: {name:?} must be non-empty, without spaces or control characters"
            ));
        } else if name.to_ascii_lowercase().starts_with("spiffe://") {
            problems.push(format!(
                "sds.{key}: {name:?} is a SPIFFE ID, which names an identity or a trust domain; choose another name"
            ));
        }
        for (other, other_name) in &names[..i] {
            if other_name == name {
                problems.push(format!(
                    "sds.{key}: {name:?} is also sds.{other}; the names must differ"
                ));
            }
        }
    }
    config
}

/// The longest `workload_api.connection_idle_timeout` accepted.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Resolves `[workload_api]` against the defaults for `fd_limit`, listing every problem.
fn workload_api_limits(
    file: &WorkloadApiFile,
    fd_limit: Option<u64>,
    problems: &mut Vec<String>,
) -> ConnectionLimits {
    let defaults = ConnectionLimits::from_fd_limit(fd_limit);
    let max_connections = file.max_connections.unwrap_or(defaults.max_connections);
    let max_connections_per_uid = file.max_connections_per_uid.unwrap_or_else(|| {
        (max_connections / 4)
            .max(1)
            .min(defaults.max_connections_per_uid)
    });
    let idle_timeout = file
        .connection_idle_timeout
        .unwrap_or(defaults.idle_timeout);
    if max_connections == 0 {
        problems.push("workload_api.max_connections: must be at least 1".into());
    }
    if max_connections_per_uid == 0 || max_connections_per_uid > max_connections {
        problems.push(format!(
            "workload_api.max_connections_per_uid: {max_connections_per_uid} is outside 1..=max_connections ({max_connections})"
        ));
    } else if max_connections_per_uid == max_connections && max_connections > 1 {
        problems.push(format!(
            "workload_api.max_connections_per_uid: {max_connections_per_uid} equals max_connections: one uid could take every connection; set it lower"
        ));
    }
    if idle_timeout < Duration::from_millis(100) || idle_timeout > MAX_IDLE_TIMEOUT {
        problems.push(format!(
            "workload_api.connection_idle_timeout: {} is outside 100ms..1h",
            humantime::format_duration(idle_timeout)
        ));
    }
    if let Some(limit) = fd_limit {
        // Two descriptors per connection (socket + pidfd), plus the agent's own.
        if (max_connections as u64).saturating_mul(2) >= limit {
            problems.push(format!(
                "workload_api.max_connections: {max_connections} connections need {} file descriptors (socket + pidfd each), more than this process may open ({limit}, RLIMIT_NOFILE); lower it or raise the limit",
                max_connections * 2
            ));
        }
    }
    ConnectionLimits {
        max_connections,
        max_connections_per_uid,
        idle_timeout,
    }
}

/// `server_address` in the file: one `HOST:PORT` or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ServerAddressFile {
    /// One server.
    One(String),
    /// Several servers of the trust domain.
    Many(Vec<String>),
}

/// The most servers an agent is given.
pub const MAX_SERVER_ADDRESSES: usize = 32;

/// Checks a server list: 1 to [`MAX_SERVER_ADDRESSES`] distinct `HOST:PORT` values.
fn server_addresses(list: Vec<String>, problems: &mut Vec<String>) -> Vec<String> {
    if list.is_empty() {
        problems.push("server_address: the list is empty; name at least one HOST:PORT".into());
    }
    if list.len() > MAX_SERVER_ADDRESSES {
        problems.push(format!(
            "server_address: {} addresses, at most {MAX_SERVER_ADDRESSES}",
            list.len()
        ));
    }
    for (i, a) in list.iter().enumerate() {
        match a.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => problems.push(format!("server_address: {a:?} is not HOST:PORT")),
        }
        if list[..i].contains(a) {
            problems.push(format!("server_address: {a:?} is listed twice"));
        }
    }
    list
}

/// Flag overrides.
#[derive(Default)]
pub struct Overrides {
    /// `--trust-domain`.
    pub trust_domain: Option<String>,
    /// `--server-address`, repeated for several servers (replaces the file's list).
    pub server_address: Vec<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--socket-path`.
    pub socket_path: Option<PathBuf>,
    /// `--join-token`.
    pub join_token: Option<Zeroizing<String>>,
    /// `--trust-bundle`.
    pub trust_bundle_path: Option<PathBuf>,
    /// `--insecure-bootstrap`.
    pub insecure_bootstrap: bool,
    /// `--health-address`.
    pub health_address: Option<String>,
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overrides")
            .field("trust_domain", &self.trust_domain)
            .field("server_address", &self.server_address)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// How the agent trusts the server before it has a bundle of its own.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// A PEM bundle file.
    BundleFile(PathBuf),
    /// No verification of the server on first contact.
    Insecure,
}

impl Config {
    /// The server's CA certificates from `trust_bundle_path`, read and parsed: a regular
    /// file of at most [`carapace_common::MAX_CONFIG_FILE_BYTES`] (a FIFO or a device must
    /// not hang start-up) holding PEM certificates. `None` with `insecure_bootstrap`.
    pub fn read_trust_bundle(&self) -> Result<Option<carapace_core::TrustBundle>, String> {
        let Bootstrap::BundleFile(path) = &self.bootstrap else {
            return Ok(None);
        };
        let pem = carapace_common::read_operator_file(
            path,
            "trust bundle",
            carapace_common::MAX_CONFIG_FILE_BYTES,
        )?;
        carapace_core::TrustBundle::from_pem(self.trust_domain.clone(), &pem)
            .map(Some)
            .map_err(|e| format!("trust bundle {}: {e}", path.display()))
    }

    /// Problems with the files this configuration names that are read at start: the
    /// trust bundle (read) and the plugins' files ([`crate::catalog::check_files`]).
    /// `validate` reports them, and `run` refuses to start with any, before it binds the
    /// Workload API socket or contacts the server.
    pub fn check_files(&self) -> Vec<String> {
        self.check_named_files(true)
    }

    /// [`Self::check_files`] and the files plugins read only when first used (the
    /// keytab, read at each attestation; a TPM device): what `validate` reports.
    pub fn check_all_files(&self) -> Vec<String> {
        self.check_named_files(false)
    }

    fn check_named_files(&self, at_start_only: bool) -> Vec<String> {
        let mut problems: Vec<String> = self.read_trust_bundle().err().into_iter().collect();
        problems.extend(crate::catalog::check_files(
            &self.key_manager,
            &self.node_attestors,
            &self.data_dir,
            at_start_only,
        ));
        problems
    }
}

/// A validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// The servers, HOST:PORT each.
    pub server_address: ServerAddresses,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Join token for the first attestation.
    pub join_token: Option<Zeroizing<String>>,
    /// Bootstrap trust.
    pub bootstrap: Bootstrap,
    /// Log filter.
    pub log_level: String,
    /// JSON logs.
    pub log_json: bool,
    /// Workload key type.
    pub workload_key_type: KeyType,
    /// Key manager: name and plugin table.
    pub key_manager: (String, toml::Table),
    /// Node attestors, in the order they run (`node_attestors`): names and plugin
    /// tables. The agent opens with the first; the others run when the server asks.
    pub node_attestors: Vec<(String, toml::Table)>,
    /// Workload attestors: names and plugin tables.
    pub workload_attestors: Vec<(String, toml::Table)>,
    /// How often the rotator looks at SVIDs.
    pub rotation_interval: Duration,
    /// Bound on workload attestation per request.
    pub workload_attestation_timeout: Duration,
    /// Bounds on the Workload API's connections.
    pub workload_api_limits: ConnectionLimits,
    /// SDS resource names and certificate validator.
    pub sds: SdsConfig,
    /// How long a stop waits for open streams and calls before closing them.
    pub shutdown_grace: Duration,
    /// Where the health endpoint listens; `None`: off.
    pub health_address: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("trust_domain", &self.trust_domain)
            .field("server_address", &self.server_address)
            .field("data_dir", &self.data_dir)
            .field("socket_path", &self.socket_path)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

/// Reads a config file; `None` means defaults. Every problem is listed.
pub fn read_file(path: Option<&Path>) -> Result<FileConfig, Vec<String>> {
    carapace_common::read_toml(path)
}

/// Reads the config file (if any) and validates it with the overrides, listing every
/// problem of every kind in one pass: unknown and badly typed keys, and the checks of
/// [`validate`] on the keys that did parse.
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

/// Puts the `[node_attestor.X]` tables in the order `node_attestors` gives, listing every
/// problem: with more than one table the list is required (TOML tables have no order);
/// every name in it needs a table and every table a place in it; a join token, consumed
/// by its first use, is never one of several.
fn order_node_attestors(
    tables: Vec<(String, toml::Table)>,
    order: Option<&[String]>,
    problems: &mut Vec<String>,
) -> Vec<(String, toml::Table)> {
    let names = |t: &[(String, toml::Table)]| {
        t.iter()
            .map(|(n, _)| format!("[node_attestor.{n}]"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(order) = order else {
        if tables.len() > 1 {
            problems.push(format!(
                "node_attestors: {} are configured: set node_attestors = [\"first\", ...] to \
                 give the order the agent runs them in (TOML tables have no order)",
                names(&tables)
            ));
        }
        return tables;
    };
    let mut out = Vec::new();
    for (i, name) in order.iter().enumerate() {
        if order[..i].contains(name) {
            problems.push(format!("node_attestors: {name} is named twice"));
            continue;
        }
        match tables.iter().find(|(n, _)| n == name) {
            Some(t) => out.push(t.clone()),
            None => problems.push(format!(
                "node_attestors: {name} has no [node_attestor.{name}] table"
            )),
        }
    }
    for (name, _) in &tables {
        if !order.contains(name) {
            problems.push(format!(
                "node_attestor.{name}: configured but not in node_attestors (add it, or remove the table)"
            ));
        }
    }
    if order.is_empty() {
        problems.push("node_attestors: is empty (name at least one node attestor)".into());
    }
    if tables.len() > 1 && tables.iter().any(|(n, _)| n == "join_token") {
        problems.push(
            "node_attestor.join_token: a join token is spent by its first attestation, so it \
             cannot be combined with other node attestors"
                .into(),
        );
    }
    out
}

/// Validates a file config with flag overrides, listing every problem.
pub fn validate(file: FileConfig, ov: Overrides) -> Result<Config, Vec<String>> {
    let mut problems = Vec::new();
    let td = ov
        .trust_domain
        .or(file.trust_domain)
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into());
    let trust_domain = TrustDomain::new(&td)
        .map_err(|e| problems.push(format!("trust_domain: {e}")))
        .ok();
    let list = if !ov.server_address.is_empty() {
        ov.server_address
    } else {
        match file.server_address {
            Some(ServerAddressFile::One(a)) => vec![a],
            Some(ServerAddressFile::Many(list)) => list,
            None => vec![DEFAULT_SERVER_ADDRESS.into()],
        }
    };
    let server_address = ServerAddresses::new(server_addresses(list, &mut problems));
    let socket_path = ov
        .socket_path
        .or(file.socket_path)
        .unwrap_or_else(|| DEFAULT_SOCKET_PATH.into());
    if socket_path.as_os_str().len() > 100 {
        problems.push(format!(
            "socket_path: {} is too long for a Unix socket",
            socket_path.display()
        ));
    }
    let trust_bundle = ov.trust_bundle_path.or(file.trust_bundle_path);
    let insecure = ov.insecure_bootstrap || file.insecure_bootstrap.unwrap_or(false);
    let bootstrap = match (trust_bundle, insecure) {
        (Some(p), false) => Some(Bootstrap::BundleFile(p)),
        (None, true) => Some(Bootstrap::Insecure),
        (Some(_), true) => {
            problems
                .push("trust_bundle_path and insecure_bootstrap: set exactly one, not both".into());
            None
        }
        (None, false) => {
            problems.push(
                "trust bundle: set exactly one of --trust-bundle PATH (the server's `bundle show` output) \
                 or --insecure-bootstrap (labs only: trusts the first server it reaches)"
                    .into(),
            );
            None
        }
    };
    let log_level = file
        .log_level
        .unwrap_or_else(|| carapace_common::DEFAULT_LOG_FILTER.into());
    let log_json =
        carapace_common::check_logging(&log_level, file.log_format.as_deref(), &mut problems);
    let workload_key_type = match file.workload_key_type.as_deref().map(str::parse::<KeyType>) {
        None => KeyType::EcP256,
        Some(Ok(k)) => k,
        Some(Err(e)) => {
            problems.push(format!("workload_key_type: {e}"));
            KeyType::EcP256
        }
    };
    let workload_attestation_timeout = file
        .workload_attestation_timeout
        .unwrap_or(crate::workload_api::DEFAULT_ATTESTATION_TIMEOUT);
    if workload_attestation_timeout.is_zero()
        || workload_attestation_timeout > Duration::from_secs(60)
    {
        problems.push(format!(
            "workload_attestation_timeout: {} is outside 1ms..60s",
            humantime::format_duration(workload_attestation_timeout)
        ));
    }
    let shutdown_grace = carapace_common::shutdown_grace(file.shutdown_grace, &mut problems);
    let workload_api_limits = workload_api_limits(
        &file.workload_api,
        carapace_common::listener::fd_limit(),
        &mut problems,
    );
    let sds = sds_config(&file.sds, &mut problems);
    let health_address = carapace_common::health::resolve_address(
        file.health.as_ref(),
        ov.health_address.as_deref(),
        DEFAULT_HEALTH_ADDRESS,
        &mut problems,
    );
    if let Some(t) = &ov.join_token {
        if t.trim().is_empty() {
            problems.push("join_token: is empty".into());
        }
    }
    let mut key_managers =
        carapace_common::plugin_envelopes("key_manager", &file.key_manager, "disk", &mut problems);
    let node_attestors = order_node_attestors(
        carapace_common::plugin_envelopes(
            "node_attestor",
            &file.node_attestor,
            "join_token",
            &mut problems,
        ),
        file.node_attestors.as_deref(),
        &mut problems,
    );
    let workload_attestors = carapace_common::plugin_envelopes(
        "workload_attestor",
        &file.workload_attestor,
        "unix",
        &mut problems,
    );
    crate::catalog::check_plugins(
        &key_managers,
        &node_attestors,
        &workload_attestors,
        &mut problems,
    );
    match (trust_domain, bootstrap) {
        (Some(trust_domain), Some(bootstrap)) if problems.is_empty() => Ok(Config {
            trust_domain,
            server_address,
            data_dir: ov
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            socket_path,
            join_token: ov.join_token,
            bootstrap,
            log_level,
            log_json,
            workload_key_type,
            key_manager: key_managers.remove(0),
            node_attestors,
            workload_attestors,
            rotation_interval: Duration::from_secs(1),
            workload_attestation_timeout,
            workload_api_limits,
            sds,
            shutdown_grace,
            health_address,
        }),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_with_insecure_bootstrap() {
        let c = validate(
            FileConfig::default(),
            Overrides {
                insecure_bootstrap: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.trust_domain.name(), "example.org");
        assert_eq!(c.server_address.list(), ["127.0.0.1:8081"]);
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert!(matches!(c.bootstrap, Bootstrap::Insecure));
    }

    #[test]
    fn server_address_is_one_address_or_a_list_and_the_flags_replace_the_file() {
        let insecure = || Overrides {
            insecure_bootstrap: true,
            ..Default::default()
        };
        let one = validate(parse("server_address = \"a:1\""), insecure()).unwrap();
        assert_eq!(one.server_address.list(), ["a:1"]);
        let many = validate(parse("server_address = [\"a:1\", \"b:2\"]"), insecure()).unwrap();
        assert_eq!(many.server_address.list(), ["a:1", "b:2"]);
        assert_eq!(many.server_address.current(), "a:1");
        assert_eq!(many.server_address.to_string(), "a:1, b:2");
        let flags = validate(
            parse("server_address = [\"a:1\", \"b:2\"]"),
            Overrides {
                server_address: vec!["c:3".into(), "d:4".into()],
                ..insecure()
            },
        )
        .unwrap();
        assert_eq!(flags.server_address.list(), ["c:3", "d:4"]);
        for (text, want) in [
            ("server_address = []", "the list is empty"),
            (
                "server_address = [\"a:1\", \"a:1\"]",
                "\"a:1\" is listed twice",
            ),
            (
                "server_address = [\"a:1\", \"b\"]",
                "\"b\" is not HOST:PORT",
            ),
        ] {
            let errs = validate(parse(text), insecure()).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(want)), "{text}: {errs:?}");
        }
        let errs = carapace_common::parse_toml::<FileConfig>("server_address = 5").unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("server_address")),
            "{errs:?}"
        );
    }

    #[test]
    fn exactly_one_bootstrap_is_required() {
        let none = validate(FileConfig::default(), Overrides::default()).unwrap_err();
        assert!(none.iter().any(|e| e.contains("exactly one")), "{none:?}");
        let both = validate(
            FileConfig::default(),
            Overrides {
                insecure_bootstrap: true,
                trust_bundle_path: Some("b.pem".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(both.iter().any(|e| e.contains("not both")), "{both:?}");
    }

    #[test]
    fn all_problems_are_listed_and_the_token_is_never_printed() {
        let errs = validate(
            FileConfig {
                log_format: Some("xml".into()),
                ..Default::default()
            },
            Overrides {
                trust_domain: Some("Bad".into()),
                server_address: vec!["nohostport".into()],
                join_token: Some(Zeroizing::new("secret-token-value".into())),
                ..Default::default()
            },
        )
        .unwrap_err();
        for needle in [
            "trust_domain",
            "server_address",
            "log_format",
            "trust bundle",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        let ov = Overrides {
            join_token: Some(Zeroizing::new("secret-token-value".into())),
            ..Default::default()
        };
        assert!(!format!("{ov:?}").contains("secret-token-value"));
    }

    #[test]
    fn sds_names_default_to_spires_and_bad_ones_are_all_listed() {
        let mut problems = Vec::new();
        assert_eq!(
            sds_config(&SdsFile::default(), &mut problems),
            SdsConfig::default()
        );
        assert!(problems.is_empty(), "{problems:?}");
        let file = parse(
            "[sds]\ndefault_svid_name = \"svid\"\ndefault_bundle_name = \"roots\"\ndefault_all_bundles_name = \"every\"\ndisable_spiffe_cert_validation = true\n",
        );
        let c = sds_config(&file.sds, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            c,
            SdsConfig {
                default_svid_name: "svid".into(),
                default_bundle_name: "roots".into(),
                default_all_bundles_name: "every".into(),
                disable_spiffe_cert_validation: true,
            }
        );

        let file = parse(
            "[sds]\ndefault_svid_name = \"\"\ndefault_bundle_name = \"spiffe://example.org\"\ndefault_all_bundles_name = \"ROOTCA\"\n",
        );
        sds_config(&file.sds, &mut problems);
        assert_eq!(
            problems,
            [
                "sds.default_svid_name: \"\" must be non-empty, without spaces or control characters",
                "sds.default_bundle_name: \"spiffe://example.org\" is a SPIFFE ID, which names an identity or a trust domain; choose another name",
            ]
        );
        problems.clear();
        let file = parse("[sds]\ndefault_all_bundles_name = \"ROOTCA\"\n");
        sds_config(&file.sds, &mut problems);
        assert_eq!(
            problems,
            [
                "sds.default_all_bundles_name: \"ROOTCA\" is also sds.default_bundle_name; the names must differ"
            ]
        );
        let unknown = carapace_common::parse_toml::<FileConfig>("[sds]\ndefault_name = \"x\"\n")
            .unwrap_err()
            .join("\n");
        assert!(unknown.contains("default_name"), "{unknown}");
    }

    #[test]
    fn workload_api_limits_default_from_the_descriptor_limit() {
        let mut problems = Vec::new();
        let l = workload_api_limits(&WorkloadApiFile::default(), Some(1024), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(l.max_connections, 256);
        assert_eq!(l.max_connections_per_uid, 64);
        assert_eq!(l.idle_timeout, Duration::from_secs(30));
        let file = parse("[workload_api]\nmax_connections = 40\n");
        let l = workload_api_limits(&file.workload_api, Some(1024), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!((l.max_connections, l.max_connections_per_uid), (40, 10));
    }

    fn parse(text: &str) -> FileConfig {
        carapace_common::parse_toml(text).unwrap()
    }

    #[test]
    fn several_node_attestors_run_in_the_order_node_attestors_gives() {
        let ov = || Overrides {
            insecure_bootstrap: true,
            ..Default::default()
        };
        // One table: no list needed, nothing changes.
        let c = validate(parse("[node_attestor.sshpop]\n"), ov()).unwrap();
        let names = |c: &Config| {
            c.node_attestors
                .iter()
                .map(|(n, _)| n.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&c), ["sshpop"]);
        let c = validate(FileConfig::default(), ov()).unwrap();
        assert_eq!(names(&c), ["join_token"]);
        // Two, ordered by the list (whatever the order of the tables).
        let c = validate(
            parse("node_attestors = [\"aws_iid\", \"sshpop\"]\n[node_attestor.sshpop]\n[node_attestor.aws_iid]\n"),
            ov(),
        )
        .unwrap();
        assert_eq!(names(&c), ["aws_iid", "sshpop"]);

        for (text, wanted) in [
            (
                "[node_attestor.sshpop]\n[node_attestor.aws_iid]\n",
                "node_attestors: [node_attestor.aws_iid], [node_attestor.sshpop] are configured: \
                 set node_attestors = [\"first\", ...] to give the order the agent runs them in \
                 (TOML tables have no order)",
            ),
            (
                "node_attestors = [\"aws_iid\", \"gcp_iit\"]\n[node_attestor.aws_iid]\n",
                "node_attestors: gcp_iit has no [node_attestor.gcp_iit] table",
            ),
            (
                "node_attestors = [\"aws_iid\"]\n[node_attestor.aws_iid]\n[node_attestor.sshpop]\n",
                "node_attestor.sshpop: configured but not in node_attestors (add it, or remove the table)",
            ),
            (
                "node_attestors = [\"aws_iid\", \"aws_iid\"]\n[node_attestor.aws_iid]\n",
                "node_attestors: aws_iid is named twice",
            ),
            (
                "node_attestors = []\n[node_attestor.aws_iid]\n",
                "node_attestors: is empty (name at least one node attestor)",
            ),
            (
                "node_attestors = [\"aws_iid\", \"join_token\"]\n[node_attestor.aws_iid]\n[node_attestor.join_token]\n",
                "node_attestor.join_token: a join token is spent by its first attestation, so it \
                 cannot be combined with other node attestors",
            ),
        ] {
            let errs = validate(parse(text), ov()).unwrap_err();
            assert!(errs.iter().any(|e| e == wanted), "{text}: {errs:?}");
            // The empty list also leaves the table out (and so none is left); every other
            // case has one problem.
            assert_eq!(
                errs.len(),
                1 + 2 * usize::from(text.contains("[]")),
                "{text}: {errs:?}"
            );
        }
    }

    #[test]
    fn bad_workload_api_limits_are_all_listed() {
        let file = parse(
            "[workload_api]\nmax_connections = 600\nmax_connections_per_uid = 700\nconnection_idle_timeout = \"2h\"\n",
        );
        let mut problems = Vec::new();
        workload_api_limits(&file.workload_api, Some(1024), &mut problems);
        for needle in [
            "workload_api.max_connections_per_uid: 700 is outside 1..=max_connections (600)",
            "workload_api.connection_idle_timeout: 2h is outside 100ms..1h",
            "workload_api.max_connections: 600 connections need 1200 file descriptors",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        }
        let unknown = carapace_common::parse_toml::<FileConfig>("[workload_api]\nmax_conns = 1\n")
            .unwrap_err();
        assert!(
            unknown.iter().any(|e| e.contains("max_conns")),
            "{unknown:?}"
        );
    }

    #[test]
    fn shutdown_grace_defaults_to_five_seconds_and_is_bounded() {
        let insecure = || Overrides {
            insecure_bootstrap: true,
            ..Default::default()
        };
        let c = validate(FileConfig::default(), insecure()).unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        let c = validate(parse("shutdown_grace = \"30s\"\n"), insecure()).unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        let errs = validate(parse("shutdown_grace = \"1h\"\n"), insecure()).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("shutdown_grace: 1h is outside 0s..5m")),
            "{errs:?}"
        );
    }

    #[test]
    fn shipped_samples_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
        for name in ["agent.toml", "agent.full.toml"] {
            let file =
                read_file(Some(&root.join(name))).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            validate(file, Overrides::default()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
    }
}
