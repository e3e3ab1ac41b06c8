//! The end-to-end lab: starts the real `carapace-server` and `carapace-agent` binaries in
//! a temporary directory on free loopback ports, drives them through their CLIs, and
//! stops them by pid on drop (printing their logs when a test fails).
//!
//! The binaries come from the same target directory as the test (`cargo test` builds them
//! because the server and agent crates have integration tests of their own).
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: failing loudly is the point"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// How long to wait for something that should happen promptly. Override with
/// `CARAPACE_TEST_PATIENCE_SECS` on a slow machine.
pub fn patience() -> Duration {
    let secs = std::env::var("CARAPACE_TEST_PATIENCE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// The directory holding the workspace binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The path of a workspace binary; fails with the command that builds it.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build it with `cargo build --bins` (scripts/test.sh and `cargo test --workspace` do)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, or panics with `what` after [`patience`].
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, Duration::ZERO, f).await
}

/// [`eventually`] for something that takes `expected` by design (an SVID lapsing, a
/// backoff running out), with [`patience`] on top.
pub async fn eventually_within<T, F, Fut>(what: &str, expected: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + expected + patience();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process stopped by pid on drop; its log is printed if the test is failing.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        cmd.env("CARAPACE_LOG", "warn,carapace=debug");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it has exited, with its status.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends it SIGTERM (the way an init system stops it).
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {} failed", self.pid());
    }

    /// Waits up to `within` for it to exit; its status, or `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGKILL) and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log()
            );
        }
    }
}

/// A lab directory: world-traversable (so another uid can reach the agent socket), with
/// private data directories inside.
#[derive(Debug)]
pub struct Lab {
    dir: tempfile::TempDir,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// A new lab directory.
    pub fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("carapace-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Lab { dir }
    }

    /// The lab's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A running `carapace-server`.
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Node API address.
    pub address: String,
    /// The data directory.
    pub data_dir: PathBuf,
    log: PathBuf,
    opts: ServerOptions,
}

/// How to start a server beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Name inside the lab (data dir, admin dir and log are named after it); default
    /// `server`.
    pub name: Option<String>,
    /// Extra `run` arguments.
    pub extra: Vec<String>,
    /// Extra environment variables (e.g. SOFTHSM2_CONF).
    pub envs: Vec<(String, String)>,
    /// Start under this RLIMIT_NOFILE (soft and hard), through `prlimit`.
    pub nofile: Option<u64>,
}

impl Server {
    /// Starts a server in `lab` and waits until it is healthy.
    pub fn start(lab: &Lab) -> Server {
        Self::start_with(lab, &[])
    }

    /// Starts a server with extra `run` arguments.
    pub fn start_with(lab: &Lab, extra: &[&str]) -> Server {
        Self::start_opts(
            lab,
            ServerOptions {
                extra: extra.iter().map(|s| s.to_string()).collect(),
                ..ServerOptions::default()
            },
        )
    }

    /// Starts a server with `opts` and waits until it is healthy.
    pub fn start_opts(lab: &Lab, opts: ServerOptions) -> Server {
        let mut s = Self::spawn_opts(lab, opts);
        s.wait_healthy();
        s
    }

    /// Starts a server whose data directory is `data_dir` (e.g. on a small tmpfs)
    /// instead of one in the lab, and waits until it is healthy.
    pub fn start_in(lab: &Lab, data_dir: &Path) -> Server {
        let mut s = Self::spawn_in(lab, ServerOptions::default(), Some(data_dir));
        s.wait_healthy();
        s
    }

    /// Starts a server with `opts` without waiting (for tests of start-up failures).
    pub fn spawn_opts(lab: &Lab, opts: ServerOptions) -> Server {
        Self::spawn_in(lab, opts, None)
    }

    fn spawn_in(lab: &Lab, opts: ServerOptions, data_dir: Option<&Path>) -> Server {
        let name = opts.name.clone().unwrap_or_else(|| "server".into());
        let address = format!("127.0.0.1:{}", free_port());
        let admin_socket = if name == "server" {
            lab.path().join("admin").join("admin.sock")
        } else {
            lab.path().join(format!("{name}-admin")).join("admin.sock")
        };
        let data_dir = data_dir.map_or_else(|| lab.path().join(&name), Path::to_owned);
        let log = lab.path().join(format!("{name}.log"));
        Server {
            proc: Self::spawn(&data_dir, &admin_socket, &address, &opts, &log),
            admin_socket,
            address,
            data_dir,
            log,
            opts,
        }
    }

    fn spawn(
        data_dir: &Path,
        admin_socket: &Path,
        address: &str,
        opts: &ServerOptions,
        log: &Path,
    ) -> Proc {
        let mut cmd = match opts.nofile {
            // prlimit execs the server: the pid stays the server's.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(bin("carapace-server"));
                c
            }
            None => Command::new(bin("carapace-server")),
        };
        cmd.arg("run")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--admin-socket")
            .arg(admin_socket)
            .arg("--bind-address")
            .arg(address)
            .args(&opts.extra)
            .envs(opts.envs.iter().map(|(k, v)| (k, v)));
        Proc::spawn("carapace-server", cmd, log.to_path_buf())
    }

    /// Waits for the process to exit (a start-up failure); returns its status and log.
    pub fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + patience();
        loop {
            if let Some(status) = self.proc.try_wait() {
                return (status, self.proc.log());
            }
            assert!(
                Instant::now() < deadline,
                "carapace-server did not exit:\n{}",
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the admin API answers a healthcheck.
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + patience();
        loop {
            if self.cli(&["healthcheck"]).status.success() {
                return;
            }
            if let Some(status) = self.proc.try_wait() {
                panic!("carapace-server exited with {status}:\n{}", self.proc.log());
            }
            assert!(
                Instant::now() < deadline,
                "carapace-server did not become healthy:\n{}",
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (SIGKILL): the agent must cope.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the server again on the same data dir and port.
    pub fn restart(&mut self) {
        self.proc.kill();
        // Keep the first log; the restarted server appends to a new one.
        let log = self.log.with_extension("restarted.log");
        self.proc = Self::spawn(
            &self.data_dir,
            &self.admin_socket,
            &self.address,
            &self.opts,
            &log,
        );
        self.wait_healthy();
    }

    /// Runs an admin subcommand against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("carapace-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .unwrap()
    }

    /// Runs an admin subcommand that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "carapace-server {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs an admin subcommand with `--output json` and parses it.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.cli_ok(&a)).unwrap()
    }

    /// A fresh join token: (token, agent id).
    pub fn token(&self) -> (String, String) {
        let v = self.cli_json(&["token", "generate"]);
        (
            v["token"].as_str().unwrap().to_owned(),
            v["agent_id"].as_str().unwrap().to_owned(),
        )
    }

    /// The bundle as PEM.
    pub fn bundle_pem(&self) -> String {
        self.cli_ok(&["bundle", "show"])
    }

    /// Creates an entry; returns its id.
    pub fn create_entry(
        &self,
        parent: &str,
        spiffe_id: &str,
        selectors: &[&str],
        extra: &[&str],
    ) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--parent-id",
            parent,
            "--spiffe-id",
            spiffe_id,
        ];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        args.extend(extra);
        self.cli_json(&args)["id"].as_str().unwrap().to_owned()
    }

    /// Everything the server logged so far (all runs).
    pub fn log(&self) -> String {
        let restarted =
            std::fs::read_to_string(self.log.with_extension("restarted.log")).unwrap_or_default();
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            restarted
        )
    }
}

/// A running `carapace-agent`.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Workload API socket.
    pub socket: PathBuf,
    /// Its SPIFFE ID.
    pub id: String,
    /// Data dir.
    pub data_dir: PathBuf,
}

impl Agent {
    /// Attests a new agent named `name` with a fresh token and waits until it is healthy.
    pub fn start(lab: &Lab, server: &Server, name: &str) -> Agent {
        Agent::start_with(lab, server, name, &[])
    }

    /// [`Agent::start`] with extra `run` arguments (`--config <file>`).
    pub fn start_with(lab: &Lab, server: &Server, name: &str, extra: &[&std::ffi::OsStr]) -> Agent {
        let (token, id) = server.token();
        let bundle = lab.path().join(format!("{name}-bundle.pem"));
        std::fs::write(&bundle, server.bundle_pem()).unwrap();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--join-token".as_ref(),
            token.as_ref(),
            "--trust-bundle".as_ref(),
            bundle.as_os_str(),
        ];
        args.extend_from_slice(extra);
        let mut a = Agent::spawn(lab, server, name, &args);
        a.id = id;
        a.wait_healthy();
        a
    }

    /// Spawns an agent with the given extra arguments, without waiting.
    pub fn spawn(lab: &Lab, server: &Server, name: &str, extra: &[&std::ffi::OsStr]) -> Agent {
        Agent::spawn_with_envs(lab, server, name, extra, &[])
    }

    /// [`Agent::spawn`] with extra environment variables (a realm's `KRB5_CONFIG`).
    pub fn spawn_with_envs(
        lab: &Lab,
        server: &Server,
        name: &str,
        extra: &[&std::ffi::OsStr],
        envs: &[(String, String)],
    ) -> Agent {
        let sockets = lab.path().join("sockets");
        std::fs::create_dir_all(&sockets).unwrap();
        std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = sockets.join(format!("{name}.sock"));
        let data_dir = lab.path().join(name);
        let mut cmd = Command::new(bin("carapace-agent"));
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--server-address")
            .arg(&server.address)
            .args(extra)
            .envs(envs.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn(
            "carapace-agent",
            cmd,
            lab.path().join(format!("{name}.log")),
        );
        Agent {
            proc,
            socket,
            id: String::new(),
            data_dir,
        }
    }

    /// Waits until the agent answers on its socket (or fails if it exits).
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + patience();
        loop {
            let ok = Command::new(bin("carapace-agent"))
                .args(["healthcheck", "--socket-path"])
                .arg(&self.socket)
                .output()
                .unwrap()
                .status
                .success();
            if ok && self.proc.log().contains("carapace-agent is ready") {
                return;
            }
            if let Some(status) = self.proc.try_wait() {
                panic!("carapace-agent exited with {status}:\n{}", self.proc.log());
            }
            assert!(
                Instant::now() < deadline,
                "carapace-agent did not become ready:\n{}",
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `carapace-agent api fetch x509` against this agent, as this process.
    pub fn fetch(&self, extra: &[&str]) -> Output {
        Command::new(bin("carapace-agent"))
            .args(["api", "fetch", "x509", "--socket-path"])
            .arg(&self.socket)
            .args(extra)
            .output()
            .unwrap()
    }

    /// The endpoint string SPIFFE clients take.
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }
}

/// A raw gRPC channel to a Unix socket (no security header added).
pub async fn uds_channel(path: &Path) -> Channel {
    carapace_common::uds_channel(path, None).await.unwrap()
}

/// The current process's effective uid.
pub fn my_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap()
}

/// Verifies a PEM chain (leaf first, then intermediates) against a PEM bundle with
/// `openssl verify`; returns its output.
pub fn openssl_verify(lab: &Lab, chain_pem: &str, bundle_pem: &str) -> String {
    let chain = lab.path().join("verify-chain.pem");
    let untrusted = lab.path().join("verify-untrusted.pem");
    let bundle = lab.path().join("verify-bundle.pem");
    let end = "-----END CERTIFICATE-----";
    let split = chain_pem
        .find(end)
        .map(|i| i + end.len())
        .unwrap_or(chain_pem.len());
    let (leaf, rest) = chain_pem.split_at(split);
    std::fs::write(&chain, leaf).unwrap();
    std::fs::write(&bundle, bundle_pem).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(&bundle);
    if rest.contains("BEGIN CERTIFICATE") {
        std::fs::write(&untrusted, rest.trim_start()).unwrap();
        cmd.arg("-untrusted").arg(&untrusted);
    }
    let out = cmd.arg(&chain).output().unwrap_or_else(|e| {
        panic!("openssl not found ({e}): install it with 'apt-get install openssl'")
    });
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The Python with py-spiffe: $CARAPACE_PYTHON, or target/py (scripts/test.sh makes it).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CARAPACE_PYTHON") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/python3");
    assert!(
        p.exists(),
        "the Python spiffe client is not installed: run scripts/test.sh, or \
         `python3 -m venv target/py && target/py/bin/pip install spiffe==0.3.2 \
         spiffe-tls==0.4.0 cryptography==50.0.2 PyJWT==2.15.1`"
    );
    p
}

/// Fetches the X.509 context from the agent at `socket` with py-spiffe
/// (tests/python/fetch_svid.py): `{svids: [{spiffe_id, chain_pem}], default, bundle_pem}`.
pub fn py_fetch(socket: &Path) -> serde_json::Value {
    py_fetch_result(socket).unwrap_or_else(|e| panic!("py-spiffe failed: {e}"))
}

/// [`py_fetch`], returning py-spiffe's error output when it fails (no identity, ...).
pub fn py_fetch_result(socket: &Path) -> Result<serde_json::Value, String> {
    py_fetch_output(
        Command::new(python())
            .arg(fetch_svid_script())
            .arg(socket)
            .output()
            .unwrap(),
    )
}

/// tests/python/fetch_svid.py.
pub fn fetch_svid_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/fetch_svid.py")
}

/// What a run of [`fetch_svid_script`] printed: its JSON, or its error output.
pub fn py_fetch_output(out: std::process::Output) -> Result<serde_json::Value, String> {
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The trust domain every end-to-end test uses.
pub fn td() -> carapace_core::TrustDomain {
    carapace_core::TrustDomain::new("example.org").unwrap()
}

/// `unix:uid:<this process's uid>`: the selector of the test process as a workload.
pub fn uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Agent {
    /// Waits until this process, as a workload, gets an SVID from the agent.
    pub async fn wait_for_an_svid(&self) {
        eventually("the SVID", || async {
            self.fetch(&[]).status.success().then_some(())
        })
        .await;
    }

    /// Waits until the SVIDs this process gets from the agent include `spiffe_id`.
    pub async fn wait_for_svid(&self, spiffe_id: &str) {
        eventually(&format!("an SVID for {spiffe_id}"), || async {
            String::from_utf8_lossy(&self.fetch(&[]).stdout)
                .contains(spiffe_id)
                .then_some(())
        })
        .await;
    }
}

/// One X509-SVID a workload holds, as `carapace-agent api fetch x509 --output json`
/// shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSvid {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Its notAfter, unix seconds.
    pub expires_at: i64,
    /// The chain, PEM: a new SVID is a new chain.
    pub chain_pem: String,
}

impl Agent {
    /// The X509-SVIDs this process holds from the agent now, or `None` when the agent
    /// gives it none (PermissionDenied). Any other failure fails the test.
    pub fn held_svids(&self) -> Option<Vec<HeldSvid>> {
        let out = self.fetch(&["--output", "json"]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("no identity issued for this process"),
                "api fetch failed otherwise than PermissionDenied: {err}"
            );
            return None;
        }
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        Some(
            doc["svids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| HeldSvid {
                    spiffe_id: s["spiffe_id"].as_str().unwrap().to_owned(),
                    expires_at: s["expires_at_unix"].as_i64().unwrap(),
                    chain_pem: s["chain_pem"].as_str().unwrap().to_owned(),
                })
                .collect(),
        )
    }

    /// Waits until the agent has renewed its own SVID (by `RenewAgent`, or by attesting
    /// again for attestors that re-attest), as its log says.
    pub async fn wait_for_renewal(&self) {
        eventually("the agent to renew its SVID", || async {
            self.proc
                .log()
                .contains("renewed the agent SVID")
                .then_some(())
        })
        .await;
    }

    /// The SVID for `spiffe_id` this process holds now, if any.
    pub fn held_svid(&self, spiffe_id: &str) -> Option<HeldSvid> {
        self.held_svids()?
            .into_iter()
            .find(|s| s.spiffe_id == spiffe_id)
    }

    /// Call once the node has lost its standing (attestation refused, SVID lapsed,
    /// banned): the workload (this process) keeps exactly the SVID for `spiffe_id` it
    /// holds now — nothing new is signed, though the entry's short TTL would have rotated
    /// it — until that SVID expires, and from then on gets nothing.
    pub async fn assert_keeps_until_expiry_and_gets_nothing_new(&self, spiffe_id: &str) {
        let held = self.held_svid(spiffe_id).unwrap_or_else(|| {
            panic!(
                "the workload holds no SVID for {spiffe_id} as the node loses its standing:\n{}",
                self.proc.log()
            )
        });
        loop {
            let t = now() as i64;
            let current = self.held_svid(spiffe_id);
            if t + 1 < held.expires_at {
                assert_eq!(
                    current.as_ref(),
                    Some(&held),
                    "until it expires at {} (now {t}) the workload keeps exactly the SVID it held: \
                     nothing new is signed for a node that lost its standing\n{}",
                    held.expires_at,
                    self.proc.log()
                );
            } else if t >= held.expires_at + 2 {
                assert_eq!(
                    current,
                    None,
                    "after its SVID expired at {} (now {t}) the workload gets nothing\n{}",
                    held.expires_at,
                    self.proc.log()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(
                self.held_svids(),
                None,
                "nothing new arrives later\n{}",
                self.proc.log()
            );
        }
    }
}

/// What tests/python/scrape.py (Python's `prometheus_client` parsers) saw at `url`: the
/// `/metrics` samples, or `/ready` and `/live` as plain HTTP.
pub fn scrape(url: &str) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/scrape.py");
    let out = Command::new(python())
        .arg(script)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scraping {url} failed (is prometheus-client installed? `target/py/bin/pip install prometheus-client==0.26.0`, which scripts/test.sh does):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`, if there is one.
pub fn sample(scraped: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scraped["samples"].as_array().unwrap().iter().find_map(|s| {
        (s["name"] == name
            && labels
                .iter()
                .all(|(k, v)| s["labels"][*k].as_str() == Some(*v)))
        .then(|| s["value"].as_f64().unwrap())
    })
}

/// Like [`sample`], 0 when absent (a counter not yet touched).
pub fn count(scraped: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(scraped, name, labels).unwrap_or(0.0)
}

/// An X509-SVID, its key and the bundle, as files.
#[derive(Debug, Clone)]
pub struct SvidFiles {
    /// The SVID's chain, PEM.
    pub svid: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The trust bundle, PEM.
    pub bundle: PathBuf,
}

impl Agent {
    /// The SVID for `spiffe_id` among those `carapace-agent api fetch x509 --write dir`
    /// wrote for this process (the agent's JSON says which file holds which).
    pub fn fetch_files(&self, dir: &Path, spiffe_id: &str) -> SvidFiles {
        let out = self.fetch(&["--write", dir.to_str().unwrap(), "--output", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let i = doc["svids"]
            .as_array()
            .unwrap()
            .iter()
            .position(|s| s["spiffe_id"] == spiffe_id)
            .unwrap_or_else(|| panic!("no SVID for {spiffe_id}: {doc}"));
        let (svid, key) = if i == 0 {
            ("svid.pem".to_owned(), "svid.key".to_owned())
        } else {
            (format!("svid.{i}.pem"), format!("svid.{i}.key"))
        };
        SvidFiles {
            svid: dir.join(svid),
            key: dir.join(key),
            bundle: dir.join("bundle.pem"),
        }
    }
}
