//! The Carapace binaries under test: the real `carapace-server` and `carapace-agent`,
//! started on temporary directories, free loopback ports and their own sockets, and
//! stopped by pid when their guard drops (also on every error path, through
//! [`Proc`](crate::process::Proc)); their admin API and CLI, and their JSON logs.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use tonic::Streaming;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use carapace_core::{Selector, TrustDomain};
use carapace_proto::admin::admin_client::AdminClient;
use carapace_proto::admin::{CreateEntryRequest, DeleteEntryRequest, HealthRequest};
use carapace_proto::types;
use carapace_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use carapace_proto::workload::{X509svidRequest, X509svidResponse};

use crate::process::{Proc, free_port};

/// The trust domain every benchmark uses.
pub const TRUST_DOMAIN: &str = "example.org";

/// How long to wait for a process to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `i`-th benchmark workload SPIFFE ID, `spiffe://example.org/bench/wl-i`.
pub fn workload_id(i: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/bench/wl-{i}")
}

/// A new connection (its own tonic channel over a new Unix stream) to the Workload API
/// at `socket`.
pub async fn workload_client(socket: &Path) -> Result<SpiffeWorkloadApiClient<Channel>> {
    let channel = carapace_common::uds_channel(socket, None)
        .await
        .context("connecting to the Workload API")?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

/// An open `FetchX509SVID` stream and the client it was opened on (kept with it, so
/// that its connection lives as long as the stream is read).
pub type X509Stream = (
    SpiffeWorkloadApiClient<Channel>,
    Streaming<X509svidResponse>,
);

/// Opens `FetchX509SVID` (with the security header) on a new connection to `socket`,
/// accepting messages of any size (every SVID of the caller is in each).
pub async fn x509_stream(socket: &Path) -> Result<X509Stream> {
    let mut client = workload_client(socket)
        .await?
        .max_decoding_message_size(usize::MAX);
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", MetadataValue::from_static("true"));
    let stream = client
        .fetch_x509svid(req)
        .await
        .map_err(|s| anyhow!("FetchX509SVID: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok((client, stream))
}

/// A wire entry for `spiffe_id`, parented to `parent`, with one selector (`type:value`).
pub fn entry(spiffe_id: &str, parent: &str, selector: &str) -> Result<types::Entry> {
    let s = Selector::from_str(selector).map_err(|e| anyhow!("selector {selector:?}: {e}"))?;
    Ok(types::Entry {
        spiffe_id: spiffe_id.to_owned(),
        parent_id: parent.to_owned(),
        selectors: vec![types::Selector::from(&s)],
        ..Default::default()
    })
}

/// A running `carapace-server` on a free port with its own admin socket and data dir.
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// The node API address, HOST:PORT.
    pub addr: String,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// The trust domain.
    pub td: TrustDomain,
    bin: PathBuf,
    /// The directory it was started under (data dir, admin socket, logs).
    dir: PathBuf,
    /// How it was started, for [`Server::restart`].
    opts: ServerOptions,
}

/// A join token from `carapace-server token generate --output json`.
#[derive(Debug, Clone)]
pub struct Token {
    /// The secret.
    pub token: String,
    /// The SPIFFE ID the agent gets when it attests with it.
    pub agent_id: String,
}

/// How to start a server beyond the defaults: a config file and extra environment.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Passed as `--config FILE`; the flags the harness passes (trust domain, data dir,
    /// addresses) override the file.
    pub config: Option<PathBuf>,
    /// Added to the server's environment (e.g. `SOFTHSM2_CONF`).
    pub envs: Vec<(String, String)>,
}

impl Server {
    /// Starts `<bin_dir>/carapace-server run` under `dir` (with `opts`' config file and
    /// environment) and waits until its admin API answers.
    pub async fn start(bin_dir: &Path, dir: &Path, opts: &ServerOptions) -> Result<Server> {
        Self::start_in(bin_dir, dir, opts, TRUST_DOMAIN).await
    }

    /// [`Server::start`] for the trust domain `td` instead of [`TRUST_DOMAIN`] (B13's
    /// federated trust domains); agents started on it join `td`.
    pub async fn start_in(
        bin_dir: &Path,
        dir: &Path,
        opts: &ServerOptions,
        td: &str,
    ) -> Result<Server> {
        let td = TrustDomain::new(td)?;
        let bin = bin_dir.join("carapace-server");
        if !bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p carapace-server`",
                bin.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let admin_socket = dir.join("server-admin").join("admin.sock");
        let proc = Self::spawn(&bin, dir, opts, &td, &addr, &admin_socket, "server.log")?;
        let mut server = Server {
            proc,
            addr,
            admin_socket,
            td,
            bin,
            dir: dir.to_path_buf(),
            opts: opts.clone(),
        };
        server
            .wait_ready(START_TIMEOUT, Duration::from_millis(50))
            .await?;
        Ok(server)
    }

    /// Starts the process: `run` for `td` on `dir`'s data dir, `addr`, `admin_socket`,
    /// logging JSON to `<dir>/<log>`.
    fn spawn(
        bin: &Path,
        dir: &Path,
        opts: &ServerOptions,
        td: &TrustDomain,
        addr: &str,
        admin_socket: &Path,
        log: &str,
    ) -> Result<Proc> {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--trust-domain")
            .arg(td.to_string())
            .arg("--data-dir")
            .arg(dir.join("server-data"))
            .args(["--bind-address", addr])
            .arg("--admin-socket")
            .arg(admin_socket)
            .env("CARAPACE_LOG", "warn,carapace=info")
            .env("CARAPACE_LOG_FORMAT", "json")
            .envs(opts.envs.iter().map(|(k, v)| (k, v)));
        if let Some(config) = &opts.config {
            cmd.arg("--config").arg(config);
        }
        Proc::spawn("carapace-server", cmd, &dir.join(log))
    }

    /// Waits until the admin API answers `Health` (polled every `poll`). The server
    /// loads its entry index and binds the node API before it serves the admin socket.
    async fn wait_ready(&mut self, timeout: Duration, poll: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.proc.check_alive()?;
            if let Ok(mut admin) = self.admin().await {
                if admin.health(HealthRequest {}).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "carapace-server did not answer on {} within {timeout:?}:\n{}",
                    self.admin_socket.display(),
                    self.proc.log_tail(30)
                );
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Stops the server with SIGTERM and waits up to `timeout` for it to exit (then
    /// SIGKILL, and an error); returns how long it took to exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<Duration> {
        self.proc.check_alive()?;
        let pid = i32::try_from(self.proc.pid())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| anyhow!("carapace-server has no valid pid"))?;
        let t = Instant::now();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("sending SIGTERM to carapace-server")?;
        // `check_alive` fails once the process has exited (and reaps it).
        while self.proc.check_alive().is_ok() {
            if t.elapsed() > timeout {
                self.proc.stop();
                bail!("carapace-server did not exit within {timeout:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(t.elapsed())
    }

    /// Starts the server again after [`Server::terminate`]: the same binary, data dir,
    /// options, node API address and admin socket, logging to `<dir>/<log>`; waits up to
    /// `timeout` until its admin API answers (polled every 10 ms).
    pub async fn restart(&mut self, log: &str, timeout: Duration) -> Result<()> {
        if self.proc.check_alive().is_ok() {
            bail!("carapace-server is still running; terminate it first");
        }
        self.proc = Self::spawn(
            &self.bin,
            &self.dir,
            &self.opts,
            &self.td,
            &self.addr,
            &self.admin_socket,
            log,
        )?;
        self.wait_ready(timeout, Duration::from_millis(10)).await
    }

    /// The binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Runs `carapace-server <args> --admin-socket <socket>` and returns its stdout.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new(&self.bin)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running carapace-server {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "carapace-server {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A new join token, from the real CLI.
    pub async fn token(&self) -> Result<Token> {
        let json = self.cli(&["token", "generate", "--output", "json"]).await?;
        let v: serde_json::Value =
            serde_json::from_str(&json).context("token generate: output is not JSON")?;
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("token generate: no {k:?} in {json}"))
        };
        Ok(Token {
            token: field("token")?,
            agent_id: field("agent_id")?,
        })
    }

    /// The bundle in PEM, from the real CLI (`bundle show`).
    pub async fn bundle_pem(&self) -> Result<String> {
        self.cli(&["bundle", "show"]).await
    }

    /// A client of the admin API over the admin socket (one HTTP/2 connection).
    pub async fn admin(&self) -> Result<AdminClient<Channel>> {
        let channel =
            carapace_common::uds_channel(&self.admin_socket, Some(Duration::from_secs(60)))
                .await
                .with_context(|| format!("connecting to {}", self.admin_socket.display()))?;
        Ok(AdminClient::new(channel))
    }
}

/// Creates `entries` through the admin API with up to `concurrency` calls in flight on
/// one connection; returns the stored entries (with their ids) in the order given.
pub async fn create_entries(
    admin: &AdminClient<Channel>,
    entries: Vec<types::Entry>,
    concurrency: usize,
) -> Result<Vec<types::Entry>> {
    let n = entries.len();
    let workers = concurrency.clamp(1, n.max(1));
    let mut lanes: Vec<Vec<(usize, types::Entry)>> = vec![Vec::new(); workers];
    for (i, e) in entries.into_iter().enumerate() {
        lanes[i % workers].push((i, e));
    }
    let mut set = tokio::task::JoinSet::new();
    for lane in lanes {
        let mut admin = admin.clone();
        set.spawn(async move {
            let mut out = Vec::with_capacity(lane.len());
            for (i, e) in lane {
                let stored = admin
                    .create_entry(CreateEntryRequest { entry: Some(e) })
                    .await
                    .map_err(|s| anyhow!("CreateEntry: {:?}: {}", s.code(), s.message()))?
                    .into_inner();
                out.push((i, stored));
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, e)| e).collect())
}

/// Deletes entries by id through the admin API, up to `concurrency` calls in flight.
pub async fn delete_entries(
    admin: &AdminClient<Channel>,
    ids: Vec<String>,
    concurrency: usize,
) -> Result<()> {
    let workers = concurrency.clamp(1, ids.len().max(1));
    let mut lanes: Vec<Vec<String>> = vec![Vec::new(); workers];
    for (i, id) in ids.into_iter().enumerate() {
        lanes[i % workers].push(id);
    }
    let mut set = tokio::task::JoinSet::new();
    for lane in lanes {
        let mut admin = admin.clone();
        set.spawn(async move {
            for id in lane {
                admin
                    .delete_entry(DeleteEntryRequest { id })
                    .await
                    .map_err(|s| anyhow!("DeleteEntry: {:?}: {}", s.code(), s.message()))?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// `held` of an agent log line (JSON) saying `workload SVIDs updated ... held=N`.
pub fn held_of(line: &serde_json::Value) -> Option<u64> {
    let fields = line.get("fields")?;
    if fields.get("message")?.as_str()? != "workload SVIDs updated" {
        return None;
    }
    fields.get("held")?.as_u64()
}

/// The `message` of a JSON log line.
pub fn message_of(line: &serde_json::Value) -> Option<&str> {
    line.get("fields")?.get("message")?.as_str()
}

/// When a JSON log line was written (its RFC 3339 `timestamp`, wall clock).
pub fn timestamp_of(line: &serde_json::Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(line.get("timestamp")?.as_str()?).ok()
}

/// Every complete JSON line of a log file, from its beginning.
pub fn read_log(path: &Path) -> Result<Vec<serde_json::Value>> {
    LogFollower::from_start(path).poll()
}

/// Follows a JSON-lines log file as it grows.
#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogFollower {
    /// Follows `path` from its current end.
    pub fn from_end(path: &Path) -> Result<LogFollower> {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok(LogFollower {
            path: path.to_path_buf(),
            offset,
            partial: String::new(),
        })
    }

    /// Follows `path` from its beginning.
    pub fn from_start(path: &Path) -> LogFollower {
        LogFollower {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
        }
    }

    /// The complete JSON lines written since the last call (other lines are skipped).
    pub fn poll(&mut self) -> Result<Vec<serde_json::Value>> {
        let mut f = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut out = Vec::new();
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim()) {
                out.push(v);
            }
        }
        Ok(out)
    }
}

/// A running `carapace-agent` attested with a join token, with its own socket and
/// data dir, logging JSON.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// Its SPIFFE ID.
    pub agent_id: String,
    bin: PathBuf,
}

impl Agent {
    /// Starts `<bin_dir>/carapace-agent run` against `server` and waits until it has
    /// attested and serves the Workload API ("carapace-agent is ready" in its log).
    pub async fn start(bin_dir: &Path, dir: &Path, server: &Server) -> Result<Agent> {
        Self::start_with_config(bin_dir, dir, server, None).await
    }

    /// [`Agent::start`] with `config` written to `<dir>/agent.toml` and passed as
    /// `--config` (plugin sections such as `[workload_attestor.*]`).
    pub async fn start_with_config(
        bin_dir: &Path,
        dir: &Path,
        server: &Server,
        config: Option<&str>,
    ) -> Result<Agent> {
        Self::start_with_env(bin_dir, dir, server, config, &[]).await
    }

    /// [`Agent::start_with_config`] with `envs` added to the agent's environment after
    /// the harness's own (so `CARAPACE_LOG` there overrides the default filter).
    pub async fn start_with_env(
        bin_dir: &Path,
        dir: &Path,
        server: &Server,
        config: Option<&str>,
        envs: &[(String, String)],
    ) -> Result<Agent> {
        let bin = bin_dir.join("carapace-agent");
        if !bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p carapace-agent`",
                bin.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let token = server.token().await?;
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, server.bundle_pem().await?)?;
        let socket = dir.join("agent-public").join("api.sock");
        let log = dir.join("agent.log");
        let mut cmd = Command::new(&bin);
        cmd.arg("run");
        if let Some(config) = config {
            let path = dir.join("agent.toml");
            std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
            cmd.arg("--config").arg(path);
        }
        cmd.arg("--trust-domain")
            .arg(server.td.to_string())
            .args(["--server-address", &server.addr])
            .arg("--data-dir")
            .arg(dir.join("agent-data"))
            .arg("--socket-path")
            .arg(&socket)
            .arg("--trust-bundle")
            .arg(&bundle)
            // In the environment rather than argv, so it is not in the process list.
            .env("CARAPACE_JOIN_TOKEN", &token.token)
            .env("CARAPACE_LOG", "warn,carapace=info")
            .env("CARAPACE_LOG_FORMAT", "json")
            .envs(envs.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn("carapace-agent", cmd, &log)?;
        let mut agent = Agent {
            proc,
            socket,
            agent_id: token.agent_id,
            bin,
        };
        let mut follower = LogFollower::from_start(&log);
        let deadline = Instant::now() + START_TIMEOUT;
        'wait: loop {
            agent.proc.check_alive()?;
            for line in follower.poll()? {
                if message_of(&line) == Some("carapace-agent is ready") {
                    break 'wait;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "carapace-agent was not ready within {START_TIMEOUT:?}:\n{}",
                    agent.proc.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(agent)
    }

    /// Runs `carapace-agent api fetch x509 --socket-path <socket>`; whether it succeeded.
    pub async fn cli_fetch_ok(&self) -> Result<bool> {
        let out = tokio::process::Command::new(&self.bin)
            .args(["api", "fetch", "x509", "--socket-path"])
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running carapace-agent api fetch x509")?;
        Ok(out.status.success())
    }

    /// Waits until the agent logs `held=<target>`; returns when it saw it.
    pub async fn wait_held(
        &mut self,
        follower: &mut LogFollower,
        target: u64,
        timeout: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            for line in follower.poll()? {
                if let Some(h) = held_of(&line) {
                    last = Some(h);
                    if h == target {
                        return Ok(Instant::now());
                    }
                }
            }
            self.proc.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the agent did not log held={target} within {timeout:?} (last held={last:?}):\n{}",
                    self.proc.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Starts the lab PostgreSQL (`hsm_sim::postgres`) with a database `carapace`, off the
/// runtime's threads (it waits for the cluster), or says how to install it (B9, B11).
pub async fn start_postgres() -> Result<hsm_sim::postgres::Postgres> {
    use hsm_sim::postgres::{POSTGRES_PACKAGES, Postgres};
    tokio::task::spawn_blocking(|| {
        let pg = Postgres::start().map_err(|e| {
            anyhow!(
                "starting the lab PostgreSQL: {e} (install it with `apt-get install -y {POSTGRES_PACKAGES}`)"
            )
        })?;
        pg.create_database("carapace")
            .map_err(|e| anyhow!("creating the database: {e}"))?;
        Ok(pg)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_is_read_from_the_agent_json_log() {
        let line: serde_json::Value = serde_json::from_str(
            r#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","fields":{"message":"workload SVIDs updated","signed":1000,"removed":0,"held":1001},"target":"carapace_agent::manager"}"#,
        )
        .unwrap();
        assert_eq!(held_of(&line), Some(1001));
        assert_eq!(message_of(&line), Some("workload SVIDs updated"));
        assert_eq!(
            timestamp_of(&line),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
        );
        let micro: serde_json::Value =
            serde_json::from_str(r#"{"timestamp":"2026-01-01T00:00:01.000250Z"}"#).unwrap();
        assert_eq!(
            timestamp_of(&micro),
            Some(SystemTime::UNIX_EPOCH + Duration::from_micros(1_767_225_601_000_250))
        );
        let other: serde_json::Value =
            serde_json::from_str(r#"{"fields":{"message":"connected to the server","held":3}}"#)
                .unwrap();
        assert_eq!(held_of(&other), None);
    }

    #[test]
    fn follower_returns_only_complete_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "{\"a\":1}\n").unwrap();
        let mut f = LogFollower::from_end(&p).unwrap();
        assert!(f.poll().unwrap().is_empty());
        use std::io::Write as _;
        let mut w = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        write!(w, "not json\n{{\"b\":2}}\n{{\"c\":").unwrap();
        let got = f.poll().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["b"], 2);
        writeln!(w, "3}}").unwrap();
        assert_eq!(f.poll().unwrap()[0]["c"], 3);
    }

    #[test]
    fn entries_split_selectors_at_the_first_colon() {
        let e = entry(
            "spiffe://example.org/w",
            "spiffe://example.org/spire/agent/join_token/x",
            "unix:uid:1000",
        )
        .unwrap();
        assert_eq!(e.selectors[0].r#type, "unix");
        assert_eq!(e.selectors[0].value, "uid:1000");
        assert!(e.id.is_empty());
    }
}
