//! B3: X509-SVID issuance with the CA key in a SoftHSM2 token, beside the token's raw
//! signing rate.
//!
//! - The raw rate: [`Pkcs11KeyManager::raw_sign_rate`] (`CKM_ECDSA` on a precomputed
//!   P-256 digest, one logged-in session per thread, nothing else running). SoftHSM2 reads
//!   `SOFTHSM2_CONF` from the process environment when the module is initialised, and this
//!   crate does not change its own environment, so the measurement runs in a child:
//!   `carapace-bench --pkcs11-raw ...` ([`RawArgs`], [`raw_child`]) started by
//!   [`raw_rates`] with `SOFTHSM2_CONF` in its environment; it prints one JSON line.
//! - Issuance: the real `carapace-server` with `[key_manager.pkcs11]` (its CA key and TLS
//!   key generated in the token) over the node API, with [`issuance::run`];
//!   [`server_options`] writes the config file and gives the environment.
//!
//! [`run`] runs both parts (B1's node API result is shown again beside them), and
//! [`section`] writes the report's section with the goal: issuance at >= 80 % of the
//! token's raw rate.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use carapace_core::KeyType;
use carapace_core::plugin::KeyManager as _;
use carapace_keymanager_pkcs11::{Pkcs11Config, Pkcs11KeyManager};
use hsm_sim::softhsm::{SoftHsm, Token};

use super::Plan;
use super::issuance::{self, NodeResult, NodeRun};
use crate::harness::ServerOptions;
use crate::process::{self, loadavg_now};
use crate::report::{Report, Table, failed};
use crate::stats::{Repeated, Summary, fmt_bytes, fmt_cores, fmt_count, fmt_pct, fmt_us};

/// The first argument that selects the hidden raw-rate mode of `carapace-bench`.
pub const RAW_MODE_FLAG: &str = "--pkcs11-raw";

/// The key id the raw-rate child generates (label `bench-raw` with its prefix).
const RAW_KEY_ID: &str = "raw";

/// Arguments of the raw-rate child:
/// `--pkcs11-raw --module M --token-label L --pin-file F --threads 1,2 --runs R --seconds S`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawArgs {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token label.
    pub token_label: String,
    /// The file holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
    /// The thread counts to measure (each run measures all of them, in this order).
    pub threads: Vec<usize>,
    /// Runs per thread count.
    pub runs: usize,
    /// Length of one run, in seconds.
    pub seconds: f64,
}

impl RawArgs {
    /// Parses the arguments after [`RAW_MODE_FLAG`].
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<RawArgs> {
        let (mut module, mut label, mut pin) = (None, None, None);
        let (mut threads, mut runs, mut seconds) = (vec![1], 1, 1.0);
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| anyhow!("{a} needs a value"));
            match a.as_str() {
                "--module" => module = Some(PathBuf::from(value()?)),
                "--token-label" => label = Some(value()?),
                "--pin-file" => pin = Some(PathBuf::from(value()?)),
                "--threads" => {
                    threads = value()?
                        .split(',')
                        .map(|t| t.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--threads: a comma-separated list of counts")?;
                }
                "--runs" => runs = value()?.parse().context("--runs")?,
                "--seconds" => seconds = value()?.parse().context("--seconds")?,
                other => bail!("{RAW_MODE_FLAG}: unknown argument {other:?}"),
            }
        }
        if threads.is_empty() || threads.contains(&0) {
            bail!("--threads: every count must be at least 1");
        }
        if !(seconds > 0.0 && seconds <= 600.0) {
            bail!("--seconds: {seconds} is not between 0 and 600");
        }
        Ok(RawArgs {
            module: module.ok_or_else(|| anyhow!("--module is required"))?,
            token_label: label.ok_or_else(|| anyhow!("--token-label is required"))?,
            pin_file: pin.ok_or_else(|| anyhow!("--pin-file is required"))?,
            threads,
            runs: runs.max(1),
            seconds,
        })
    }

    /// The command line (after the program name) that [`RawArgs::parse`] reads back.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![RAW_MODE_FLAG.into(), "--module".into()];
        v.push(self.module.clone().into());
        v.push("--token-label".into());
        v.push(self.token_label.clone().into());
        v.push("--pin-file".into());
        v.push(self.pin_file.clone().into());
        v.push("--threads".into());
        v.push(
            self.threads
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        );
        v.push("--runs".into());
        v.push(self.runs.to_string().into());
        v.push("--seconds".into());
        v.push(self.seconds.to_string().into());
        v
    }
}

/// One raw-rate run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RawRun {
    /// Signatures per second.
    pub rate: f64,
    /// CPU time of the measuring process (user + system, all threads) per signature, µs.
    pub cpu_us_per_sig: f64,
    /// Average number of idle cores on the machine during the run (`/proc/stat`).
    pub idle_cores: f64,
}

impl RawRun {
    /// Average number of cores the token kept busy: signatures/s × CPU per signature.
    pub fn busy_cores(&self) -> f64 {
        self.rate * self.cpu_us_per_sig / 1e6
    }
}

/// The raw rate at one thread count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawRate {
    /// Threads, each with its own logged-in session.
    pub threads: usize,
    /// The runs.
    pub runs: Vec<RawRun>,
}

impl RawRate {
    /// Signatures/s of each run.
    pub fn rates(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.rate).collect()
    }

    /// CPU-µs per signature of each run.
    pub fn cpu(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.cpu_us_per_sig).collect()
    }

    /// Cores kept busy in each run.
    pub fn busy(&self) -> Vec<f64> {
        self.runs.iter().map(RawRun::busy_cores).collect()
    }

    /// Idle cores on the machine in each run.
    pub fn idle(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.idle_cores).collect()
    }
}

/// What the child prints (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawOutput {
    /// By thread count, in the order asked.
    pub rates: Vec<RawRate>,
}

/// The raw-rate child: opens the token (as many sessions as the largest thread count),
/// generates a P-256 key (or takes the one an earlier run left), warms up, then measures every thread count `runs` times
/// (alternating). Must run in a process whose environment has `SOFTHSM2_CONF`.
pub fn raw_child(args: &RawArgs) -> Result<RawOutput> {
    let sessions = args.threads.iter().copied().max().unwrap_or(1);
    let cfg = Pkcs11Config {
        module: args.module.clone(),
        token_label: Some(args.token_label.clone()),
        pin_file: Some(args.pin_file.clone()),
        key_label_prefix: Some("bench-".into()),
        sessions: Some(sessions),
        ..Pkcs11Config::default()
    };
    let km = Pkcs11KeyManager::open(&cfg).map_err(|e| anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if rt.block_on(km.get_key(RAW_KEY_ID)).is_err() {
        rt.block_on(km.generate_key(RAW_KEY_ID, KeyType::EcP256))
            .map_err(|e| anyhow!("generating the P-256 key: {e}"))?;
    }
    let run_for = Duration::from_secs_f64(args.seconds);
    // Warm-up: sessions, key handles, CPU frequency.
    km.raw_sign_rate(
        RAW_KEY_ID,
        sessions,
        run_for.min(Duration::from_millis(300)),
    )
    .map_err(|e| anyhow!("warm-up: {e}"))?;
    let me = std::process::id();
    let mut out: Vec<RawRate> = args
        .threads
        .iter()
        .map(|&threads| RawRate {
            threads,
            runs: Vec::new(),
        })
        .collect();
    for _ in 0..args.runs {
        for r in &mut out {
            let cpu0 = process::cpu_time(me)?;
            let idle0 = process::machine_idle()?;
            let t = Instant::now();
            let rate = km
                .raw_sign_rate(RAW_KEY_ID, r.threads, run_for)
                .map_err(|e| anyhow!("raw_sign_rate({} threads): {e}", r.threads))?;
            let wall = t.elapsed();
            let cpu = process::cpu_time(me)?.saturating_sub(cpu0);
            let idle = process::machine_idle()?.saturating_sub(idle0);
            let sigs = (rate * wall.as_secs_f64()).max(1.0);
            r.runs.push(RawRun {
                rate,
                cpu_us_per_sig: cpu.as_secs_f64() * 1e6 / sigs,
                idle_cores: idle.as_secs_f64() / wall.as_secs_f64().max(f64::EPSILON),
            });
        }
    }
    Ok(RawOutput { rates: out })
}

/// Runs the raw-rate child (this executable with [`RAW_MODE_FLAG`]) with the
/// environment of `hsm`, on `token`, and reads its JSON line. The child is killed if the
/// future is dropped.
pub async fn raw_rates(
    hsm: &SoftHsm,
    token: &Token,
    threads: &[usize],
    runs: usize,
    seconds: f64,
) -> Result<Vec<RawRate>> {
    let args = RawArgs {
        module: hsm.module().to_path_buf(),
        token_label: token.label.clone(),
        pin_file: token.pin_file.clone(),
        threads: threads.to_vec(),
        runs,
        seconds,
    };
    let exe = std::env::current_exe().context("locating this executable")?;
    let out = tokio::process::Command::new(&exe)
        .args(args.to_args())
        .envs(hsm.envs())
        // Errors are reported in the benchmark report: no backtraces there.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {} {RAW_MODE_FLAG}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{} {RAW_MODE_FLAG} failed ({}): {}",
            exe.display(),
            out.status,
            stderr.trim()
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("{RAW_MODE_FLAG} printed no JSON line: {stdout}{stderr}"))?;
    let parsed: RawOutput = serde_json::from_str(line)
        .with_context(|| format!("{RAW_MODE_FLAG} output is not the expected JSON: {line}"))?;
    Ok(parsed.rates)
}

/// The server's `[key_manager.pkcs11]` config file text.
pub fn server_config_text(module: &Path, token: &Token, sessions: usize) -> Result<String> {
    let mut pkcs11 = toml::Table::new();
    pkcs11.insert(
        "module".into(),
        toml::Value::String(module.to_string_lossy().into_owned()),
    );
    pkcs11.insert(
        "token_label".into(),
        toml::Value::String(token.label.clone()),
    );
    pkcs11.insert(
        "pin_file".into(),
        toml::Value::String(token.pin_file.to_string_lossy().into_owned()),
    );
    pkcs11.insert(
        "sessions".into(),
        toml::Value::Integer(i64::try_from(sessions)?),
    );
    let mut km = toml::Table::new();
    km.insert("pkcs11".into(), toml::Value::Table(pkcs11));
    let mut root = toml::Table::new();
    root.insert("key_manager".into(), toml::Value::Table(km));
    Ok(toml::to_string(&root)?)
}

/// Writes `<dir>/server.toml` with `[key_manager.pkcs11]` for `token` and `sessions`,
/// and returns the options that start the server with it and with `SOFTHSM2_CONF`.
pub fn server_options(
    dir: &Path,
    hsm: &SoftHsm,
    token: &Token,
    sessions: usize,
) -> Result<ServerOptions> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("server.toml");
    std::fs::write(&path, server_config_text(hsm.module(), token, sessions)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(ServerOptions {
        config: Some(path),
        envs: hsm.envs(),
    })
}

/// SoftHSM2's version (`softhsm2-util --version`) and the crypto library its module is
/// linked against (from `ldd`), for the report.
pub fn softhsm_description(module: &Path) -> String {
    let version = std::process::Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout);
            Some(out.lines().next()?.trim().to_owned())
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let backend = std::process::Command::new("ldd")
        .arg(module)
        .output()
        .ok()
        .and_then(|o| crypto_backend(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|| "crypto backend unknown".into());
    format!("SoftHSM2 {version} ({}, {backend})", module.display())
}

/// The crypto library in `ldd` output: OpenSSL's libcrypto or Botan.
pub fn crypto_backend(ldd: &str) -> Option<String> {
    ldd.lines().find_map(|l| {
        let name = l.split_whitespace().next()?;
        if name.starts_with("libcrypto.so") {
            Some(format!("OpenSSL {name}"))
        } else if name.starts_with("libbotan") {
            Some(format!("Botan {name}"))
        } else {
            None
        }
    })
}

/// What B3 measured; each part may have failed on its own.
#[derive(Debug)]
pub struct B3 {
    /// SoftHSM2's version, module and crypto library.
    softhsm: String,
    /// `/proc/loadavg` when B3 started.
    loadavg: String,
    /// The token's raw rate by thread count.
    raw: Result<Vec<RawRate>>,
    /// The node API with `[key_manager.pkcs11] sessions = k`, by k.
    by_sessions: Vec<(usize, Result<NodeResult>)>,
    /// The node API with the software key (disk key manager).
    soft: Result<NodeResult>,
    /// Whether `soft` is B1's measurement (otherwise B3 made it).
    soft_from_b1: bool,
}

impl B3 {
    /// The failed parts, as errors (for the exit status).
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        let mut out = Vec::new();
        out.extend(self.raw.err());
        out.extend(self.by_sessions.into_iter().filter_map(|(_, r)| r.err()));
        // B1 already counted its own failure.
        if !self.soft_from_b1 {
            out.extend(self.soft.err());
        }
        out
    }
}

/// The session (and raw thread) counts B3 measures: 1 and every core.
fn b3_counts(nproc: usize) -> Vec<usize> {
    let n = nproc.clamp(1, carapace_keymanager_pkcs11::MAX_SESSIONS);
    if n > 1 { vec![1, n] } else { vec![1] }
}

async fn b3_raw(hsm: &SoftHsm, counts: &[usize], plan: &Plan) -> Result<Vec<RawRate>> {
    let token = hsm.init_token("bench-raw")?;
    raw_rates(hsm, &token, counts, plan.raw_runs, plan.raw_seconds).await
}

async fn b3_pkcs11_node(
    bin_dir: &Path,
    dir: &Path,
    hsm: &SoftHsm,
    csrs: &[Vec<u8>],
    plan: &Plan,
    sessions: usize,
) -> Result<NodeResult> {
    let token = hsm.init_token(&format!("bench-s{sessions}"))?;
    let opts = server_options(dir, hsm, &token, sessions)?;
    issuance::run(bin_dir, dir, csrs, &plan.node, &opts).await
}

/// B3: the token's raw rate alone (child process), then the real server with its CA key
/// in a fresh token for each session count, then (without B1) the software key.
pub async fn run(
    bin_dir: &Path,
    dir: &Path,
    csrs: Result<&Vec<Vec<u8>>>,
    plan: &Plan,
    nproc: usize,
    b1_node: Option<NodeResult>,
) -> Result<B3> {
    let hsm = SoftHsm::new().context("B3 needs SoftHSM2 (softhsm2-util and libsofthsm2.so)")?;
    let softhsm = softhsm_description(hsm.module());
    let loadavg = loadavg_now();
    let counts = b3_counts(nproc);
    eprintln!(
        "==> B3: SoftHSM2 raw sign rate (threads {counts:?}, {} runs of {} s)",
        plan.raw_runs, plan.raw_seconds
    );
    let raw = b3_raw(&hsm, &counts, plan).await;
    let csrs = csrs.map_err(|e| format!("{e:#}"));
    let mut by_sessions = Vec::new();
    for &k in &counts {
        eprintln!(
            "==> B3: node API with [key_manager.pkcs11] sessions = {k} ({} SVIDs per run, {} runs, connections {:?})",
            plan.node.svids_per_run, plan.node.runs, plan.node.connections
        );
        let res = match &csrs {
            Ok(c) => {
                b3_pkcs11_node(bin_dir, &dir.join(format!("pkcs11-s{k}")), &hsm, c, plan, k).await
            }
            Err(e) => Err(anyhow!("{e}")),
        };
        by_sessions.push((k, res));
    }
    let (soft, soft_from_b1) = match b1_node {
        Some(n) => (Ok(n), true),
        None => {
            eprintln!("==> B3: node API with the software key (B1 was not run)");
            let res = match &csrs {
                Ok(c) => {
                    issuance::run(
                        bin_dir,
                        &dir.join("software"),
                        c,
                        &plan.node,
                        &ServerOptions::default(),
                    )
                    .await
                }
                Err(e) => Err(anyhow!("{e}")),
            };
            (res, false)
        }
    };
    Ok(B3 {
        softhsm,
        loadavg,
        raw,
        by_sessions,
        soft,
        soft_from_b1,
    })
}

/// The highest median SVIDs/s over the connection counts: (connections, runs).
fn best_connections(n: &NodeResult) -> Option<(usize, Repeated)> {
    n.by_connections
        .iter()
        .filter_map(|(c, runs)| {
            let rates: Vec<f64> = runs.iter().map(|x| x.rate()).collect();
            Repeated::of(&rates).map(|r| (*c, r))
        })
        .max_by(|a, b| a.1.median.total_cmp(&b.1.median))
}

/// The median over every run of `n` of `f`.
fn median_over_runs(n: &NodeResult, f: impl Fn(&NodeRun) -> f64) -> Option<f64> {
    let v: Vec<f64> = n
        .by_connections
        .iter()
        .flat_map(|(_, runs)| runs.iter().map(&f))
        .collect();
    Repeated::of(&v).map(|r| r.median)
}

/// Where the machine's cores went during one node API run: (ours = server + load
/// generator, idle, other processes and hypervisor steal), averaged over the run.
fn node_cores(x: &NodeRun, nproc: usize) -> (f64, f64, f64) {
    let wall = x.wall.as_secs_f64().max(f64::EPSILON);
    let ours = (x.server_cpu + x.client_cpu).as_secs_f64() / wall;
    let idle = x.idle_cores();
    (ours, idle, (nproc as f64 - ours - idle).max(0.0))
}

fn b3_node_rows(t: &mut Table, label: &str, n: &NodeResult, nproc: usize) {
    for (conns, runs) in &n.by_connections {
        let rates: Vec<f64> = runs.iter().map(|x| x.rate()).collect();
        let cpu: Vec<f64> = runs.iter().map(|x| x.cpu_us_per_svid()).collect();
        let client: Vec<f64> = runs.iter().map(|x| x.client_cpu_us_per_svid()).collect();
        let cores: Vec<(f64, f64, f64)> = runs.iter().map(|x| node_cores(x, nproc)).collect();
        let lats: Vec<Duration> = runs
            .iter()
            .flat_map(|x| x.batch_latencies.iter().copied())
            .collect();
        let lat = Summary::of_durations_us(&lats);
        let errors: usize = runs.iter().map(|x| x.errors).sum();
        let first_error = runs.iter().find_map(|x| x.first_error.clone());
        t.row([
            label.to_owned(),
            conns.to_string(),
            Repeated::of(&rates)
                .map(|r| r.fmt_count())
                .unwrap_or_default(),
            lat.map(|l| fmt_us(l.p50)).unwrap_or_default(),
            lat.map(|l| fmt_us(l.p99)).unwrap_or_default(),
            Repeated::of(&cpu)
                .map(|c| format!("{:.0}", c.median))
                .unwrap_or_default(),
            Repeated::of(&client)
                .map(|c| format!("{:.0}", c.median))
                .unwrap_or_default(),
            fmt_cores(&cores),
            runs.last()
                .map(|x| fmt_bytes(x.server_rss as f64))
                .unwrap_or_default(),
            match first_error {
                Some(e) if errors > 0 => format!("{errors} (first: {e})"),
                _ => errors.to_string(),
            },
        ]);
    }
}

/// B3's report; `b1_ceiling` is B1's crypto ceiling (1 thread, all cores) if it ran.
pub fn section(r: &mut Report, b3: &B3, plan: &Plan, nproc: usize, b1_ceiling: Option<(f64, f64)>) {
    r.para(&format!(
        "{}. Every token is initialised with `softhsm2-util --init-token` in a private directory named by `SOFTHSM2_CONF` (carapace-hsm-sim), with a random user PIN in a 0600 file; the directory is removed at the end. This process never loads the module: PKCS#11 runs in child processes started with `SOFTHSM2_CONF`. Load average when B3 started: {}. Cores columns: average cores used by the measured processes / idle (`/proc/stat`) / taken by other processes or hypervisor steal, out of {nproc}.",
        b3.softhsm, b3.loadavg
    ));
    r.heading(3, "SoftHSM2 raw signing rate (the token alone)");
    r.para("`Pkcs11KeyManager::raw_sign_rate` in a child process (`carapace-bench --pkcs11-raw`): a P-256 key generated in the token, then `C_Sign` with `CKM_ECDSA` on a precomputed SHA-256 digest in a loop, each thread on its own logged-in session of the pool, nothing else of the benchmark running (no server; this process waits). Runs alternate between the thread counts after a warm-up. CPU: the child's utime + stime over the run, per signature.");
    match &b3.raw {
        Ok(raw) => {
            let mut t = Table::new([
                "threads (one session each)",
                "seconds per run",
                "signatures/s: median (range, runs)",
                "CPU-µs per signature (median)",
                "cores: token / idle / others (median)",
            ]);
            for x in raw {
                let cores: Vec<(f64, f64, f64)> = x
                    .runs
                    .iter()
                    .map(|run| {
                        let busy = run.busy_cores();
                        (
                            busy,
                            run.idle_cores,
                            (nproc as f64 - busy - run.idle_cores).max(0.0),
                        )
                    })
                    .collect();
                t.row([
                    x.threads.to_string(),
                    format!("{}", plan.raw_seconds),
                    Repeated::of(&x.rates())
                        .map(|r| r.fmt_count())
                        .unwrap_or_default(),
                    Repeated::of(&x.cpu())
                        .map(|c| format!("{:.0}", c.median))
                        .unwrap_or_default(),
                    fmt_cores(&cores),
                ]);
            }
            r.table(&t);
        }
        Err(e) => failed(r, "SoftHSM2 raw signing rate", e),
    }

    r.heading(
        3,
        "Node API: BatchNewX509SVID to the real carapace-server with [key_manager.pkcs11]",
    );
    r.para(&format!(
        "As B1's node API run (same CSRs, {} entries, batches of {}, {} SVIDs per run, {} run(s) per connection count), but the server is started with `--config` holding `[key_manager.pkcs11]` (`module`, `token_label`, `pin_file`, `sessions = k`) and with `SOFTHSM2_CONF` in its environment: its CA key and TLS key are generated in a fresh token and every SVID is signed there (`CKM_ECDSA`, one pool session per signature). The server splits each batch over {nproc} blocking threads; with `sessions = 1` they take turns on the one session. Server CPU includes the token's work (SoftHSM2 is a library in the server process); the load generator is this process (TLS client, HTTP/2, protobuf). /proc CPU counters tick every 10 ms.",
        fmt_count(plan.node.entries as f64),
        plan.node.batch,
        fmt_count(plan.node.svids_per_run as f64),
        plan.node.runs,
    ));
    let mut t = Table::new([
        "CA key",
        "connections",
        "SVIDs/s: median (range, runs)",
        "batch p50",
        "batch p99",
        "server CPU-µs per SVID (median)",
        "load generator CPU-µs per SVID (median)",
        "cores: server + load generator / idle / others (median)",
        "server RSS after",
        "errors",
    ]);
    let mut failures = Vec::new();
    for (k, n) in &b3.by_sessions {
        match n {
            Ok(n) => b3_node_rows(&mut t, &format!("SoftHSM2, sessions = {k}"), n, nproc),
            Err(e) => failures.push((
                format!("node API with [key_manager.pkcs11] sessions = {k}"),
                e,
            )),
        }
    }
    let soft_label = if b3.soft_from_b1 {
        "software key (disk key manager, ring): B1's run above"
    } else {
        "software key (disk key manager, ring): measured in B3 (B1 not run)"
    };
    match &b3.soft {
        Ok(n) => b3_node_rows(&mut t, soft_label, n, nproc),
        Err(e) if !b3.soft_from_b1 => {
            failures.push(("node API with the software key".to_owned(), e))
        }
        Err(_) => {}
    }
    if !t.is_empty() {
        r.table(&t);
    }
    for (what, e) in failures {
        failed(r, &what, e);
    }
    b3_goal(r, b3, nproc, b1_ceiling);
}

/// One session count's figures for the goal: the raw rate at k threads and the
/// issuance with `sessions = k`.
struct GoalRow {
    k: usize,
    raw: f64,
    raw_cpu: f64,
    raw_cores: (f64, f64, f64),
    best: (usize, f64),
    server_cpu: f64,
    client_cpu: f64,
    cores: (f64, f64, f64),
}

impl GoalRow {
    fn of(k: usize, raw: &RawRate, n: &NodeResult, nproc: usize) -> Option<GoalRow> {
        let med = |v: Vec<f64>| Repeated::of(&v).map(|r| r.median);
        let (conns, best) = best_connections(n)?;
        let runs: Vec<&NodeRun> = n
            .by_connections
            .iter()
            .flat_map(|(_, runs)| runs.iter())
            .collect();
        let cores: Vec<(f64, f64, f64)> = runs.iter().map(|x| node_cores(x, nproc)).collect();
        let busy = med(raw.busy())?;
        let idle = med(raw.idle())?;
        Some(GoalRow {
            k,
            raw: med(raw.rates())?,
            raw_cpu: med(raw.cpu())?,
            raw_cores: (busy, idle, (nproc as f64 - busy - idle).max(0.0)),
            best: (conns, best.median),
            server_cpu: median_over_runs(n, NodeRun::cpu_us_per_svid)?,
            client_cpu: median_over_runs(n, NodeRun::client_cpu_us_per_svid)?,
            cores: (
                med(cores.iter().map(|c| c.0).collect())?,
                med(cores.iter().map(|c| c.1).collect())?,
                med(cores.iter().map(|c| c.2).collect())?,
            ),
        })
    }

    fn ratio(&self) -> f64 {
        self.best.1 / self.raw
    }

    /// The most SVIDs/s `nproc` cores give at the measured CPU cost per SVID.
    fn cpu_ceiling(&self, nproc: usize) -> f64 {
        nproc as f64 * 1e6 / (self.server_cpu + self.client_cpu).max(f64::EPSILON)
    }
}

/// The ratios against the goal, and what bounds them.
fn b3_goal(r: &mut Report, b3: &B3, nproc: usize, b1_ceiling: Option<(f64, f64)>) {
    r.heading(
        3,
        "Against the goal: issuance ≥ 80 % of the token's raw rate",
    );
    let Ok(raw) = &b3.raw else {
        r.para("No ratio: the raw rate was not measured (see the failure above).");
        return;
    };
    let soft_best = b3.soft.as_ref().ok().and_then(best_connections);
    let soft_cpu = b3
        .soft
        .as_ref()
        .ok()
        .and_then(|n| median_over_runs(n, NodeRun::cpu_us_per_svid));
    let rows: Vec<GoalRow> = b3
        .by_sessions
        .iter()
        .filter_map(|(k, n)| {
            let raw_k = raw.iter().find(|x| x.threads == *k)?;
            GoalRow::of(*k, raw_k, n.as_ref().ok()?, nproc)
        })
        .collect();
    let mut t = Table::new([
        "k",
        "SoftHSM2 raw rate, k threads (median)",
        "issuance with sessions = k (best median over connections)",
        "**issuance / raw**",
        "goal ≥ 80 %",
        "issuance / software-key issuance",
    ]);
    for g in &rows {
        t.row([
            g.k.to_string(),
            fmt_count(g.raw),
            format!("{} ({} conn.)", fmt_count(g.best.1), g.best.0),
            format!("**{}**", fmt_pct(g.ratio())),
            if g.ratio() >= 0.8 {
                "met".into()
            } else {
                "**not met**".into()
            },
            soft_best
                .map(|(_, s)| fmt_pct(g.best.1 / s.median))
                .unwrap_or_default(),
        ]);
    }
    if let Some((c, s)) = soft_best {
        t.row([
            "software key".to_owned(),
            "—".to_owned(),
            format!("{} ({c} conn.)", fmt_count(s.median)),
            "—".to_owned(),
            "—".to_owned(),
            "100.0 %".to_owned(),
        ]);
    }
    r.table(&t);
    let measured = rows.len() == b3.by_sessions.len() && !rows.is_empty();
    let all_met = measured && rows.iter().all(|g| g.ratio() >= 0.8);
    r.bullet(&format!(
        "**Goal (SVID issuance ≥ 80 % of SoftHSM2's raw sign rate): {}** — {}.",
        if all_met {
            "met"
        } else if measured {
            "not met"
        } else {
            "not measured"
        },
        rows.iter()
            .map(|g| format!(
                "sessions = {}: {} ({})",
                g.k,
                fmt_pct(g.ratio()),
                if g.ratio() >= 0.8 { "met" } else { "not met" }
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    if rows.is_empty() {
        return;
    }

    r.para(&format!(
        "What bounds it. SoftHSM2 is a software token: a library in the server process, so its signatures are CPU work on the same {nproc} cores as the server's CSR verification, certificate building, TLS and HTTP/2 and this load generator, whereas its raw rate was measured with the benchmark otherwise idle. With C CPU-µs per SVID (server, token signature included, plus load generator), {nproc} cores issue at most {nproc}×10⁶ / C SVIDs/s, whatever the server's concurrency (on a network or PCIe HSM the signature would run on the HSM's processor instead)."
    ));
    let mut b = Table::new([
        "k",
        "raw: CPU-µs per signature",
        "raw: cores token / idle / others",
        "issuance: CPU-µs per SVID, server + load generator = C",
        "CPU ceiling: cores × 10⁶ / C (share of raw)",
        "issuance: cores ours / idle / others",
        "CPU per SVID allowed at 80 % of raw",
    ]);
    for g in &rows {
        let ceiling = g.cpu_ceiling(nproc);
        b.row([
            g.k.to_string(),
            format!("{:.0}", g.raw_cpu),
            format!(
                "{:.2} / {:.2} / {:.2}",
                g.raw_cores.0, g.raw_cores.1, g.raw_cores.2
            ),
            format!(
                "{:.0} + {:.0} = {:.0}",
                g.server_cpu,
                g.client_cpu,
                g.server_cpu + g.client_cpu
            ),
            format!("{} ({})", fmt_count(ceiling), fmt_pct(ceiling / g.raw)),
            format!("{:.2} / {:.2} / {:.2}", g.cores.0, g.cores.1, g.cores.2),
            format!("{:.0} µs", nproc as f64 * 1e6 / (0.8 * g.raw)),
        ]);
    }
    r.table(&b);
    for g in &rows {
        let ceiling = g.cpu_ceiling(nproc);
        let cpu_says = if ceiling / g.raw < 0.8 {
            format!(
                "the CPU alone rules 80 % out on this machine: at {:.0} CPU-µs per SVID the {nproc} cores give at most {} of the raw rate; 80 % would need at most {:.0} µs per SVID, i.e. at most {:.0} µs besides the token's ~{:.0} µs signature",
                g.server_cpu + g.client_cpu,
                fmt_pct(ceiling / g.raw),
                nproc as f64 * 1e6 / (0.8 * g.raw),
                (nproc as f64 * 1e6 / (0.8 * g.raw) - g.raw_cpu).max(0.0),
                g.raw_cpu,
            )
        } else {
            format!(
                "the CPU would allow {} of the raw rate, so the gap to it is time the token's session{} sat idle",
                fmt_pct(ceiling / g.raw),
                if g.k == 1 { "" } else { "s" }
            )
        };
        let why = if g.k == 1 {
            "With one session the server signs one SVID at a time, and every gap between two signatures comes off the raw rate: the next signer thread waiting for a core (shared with the other signer thread, CSR verification, TLS and the load generator) and the hand-off of the session between threads."
        } else {
            "With every core signing, the token's signatures and everything else per SVID share the same cores."
        };
        r.bullet(&format!(
            "sessions = {}: {} — {cpu_says}. {why} During issuance {:.2} cores were idle and {:.2} taken by other processes on average.",
            g.k,
            fmt_pct(g.ratio()),
            g.cores.1,
            g.cores.2,
        ));
    }
    if let (Some(sc), Some(g)) = (soft_cpu, rows.last()) {
        r.bullet(&format!(
            "Server CPU per SVID (median of all runs): {sc:.0} µs with the software key, {:.0} µs with SoftHSM2 (sessions = {}): a signature in SoftHSM2 through PKCS#11 costs the server about {:.0} µs more than one with ring.",
            g.server_cpu,
            g.k,
            g.server_cpu - sc
        ));
    }
    let one = raw.iter().find(|x| x.threads == 1);
    for x in raw.iter().filter(|x| x.threads > 1) {
        let med = |v: Vec<f64>| Repeated::of(&v).map_or(f64::NAN, |r| r.median);
        let Some(one) = one else { break };
        let (r1, rk) = (med(one.rates()), med(x.rates()));
        let (c1, ck) = (med(one.cpu()), med(x.cpu()));
        let (busy, idle) = (med(x.busy()), med(x.idle()));
        let others = (nproc as f64 - busy - idle).max(0.0);
        let hint = if idle > 0.3 {
            " The threads waited with cores idle: part of SoftHSM2's signing is serialised (its locks)."
        } else if others > 0.3 {
            " Other processes held cores meanwhile: the raw figure is low for that reason (rerun on a quiet machine)."
        } else if ck > 1.15 * c1 {
            " Each signature costs more CPU when every core signs (contention inside SoftHSM2 and OpenSSL, or vCPUs sharing a physical core on the host)."
        } else {
            ""
        };
        r.bullet(&format!(
            "SoftHSM2 scaling: {} threads sign {:.2}× as fast as 1 (ideal {}×); CPU per signature {c1:.0} → {ck:.0} µs; cores token / idle / others {busy:.2} / {idle:.2} / {others:.2}.{hint}{}",
            x.threads,
            rk / r1,
            x.threads,
            match b1_ceiling {
                Some((one, all)) => format!(
                    " For comparison, B1's crypto ceiling (ring, same invocation) scaled {:.2}× from 1 thread to {nproc}.",
                    all / one
                ),
                None => String::new(),
            }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_args_round_trip() {
        let a = RawArgs {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "bench-raw".into(),
            pin_file: "/tmp/x/bench-raw.pin".into(),
            threads: vec![1, 2],
            runs: 3,
            seconds: 1.5,
        };
        let args: Vec<String> = a
            .to_args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(args[0], RAW_MODE_FLAG);
        assert_eq!(RawArgs::parse(args.into_iter().skip(1)).unwrap(), a);
        assert!(RawArgs::parse(["--module".to_owned(), "/m".to_owned()]).is_err());
        assert!(
            RawArgs::parse(
                [
                    "--module",
                    "/m",
                    "--token-label",
                    "t",
                    "--pin-file",
                    "/p",
                    "--threads",
                    "0"
                ]
                .map(str::to_owned)
            )
            .is_err()
        );
        assert!(RawArgs::parse(["--bogus".to_owned()]).is_err());
    }

    #[test]
    fn raw_output_is_one_json_line() {
        let o = RawOutput {
            rates: vec![RawRate {
                threads: 2,
                runs: vec![RawRun {
                    rate: 1250.0,
                    cpu_us_per_sig: 800.0,
                    idle_cores: 0.5,
                }],
            }],
        };
        let line = serde_json::to_string(&o).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<RawOutput>(&line).unwrap(), o);
        assert_eq!(o.rates[0].rates(), vec![1250.0]);
        assert_eq!(o.rates[0].cpu(), vec![800.0]);
        assert_eq!(o.rates[0].busy(), vec![1.0]);
        assert_eq!(o.rates[0].idle(), vec![0.5]);
    }

    #[test]
    fn server_config_is_a_pkcs11_key_manager_section() {
        let token = Token {
            label: "bench-s2".into(),
            serial: "0123456789abcdef".into(),
            user_pin: "deadbeef00000001".into(),
            so_pin: "deadbeef00000002".into(),
            pin_file: "/tmp/a \"b\"/bench-s2.pin".into(),
        };
        let text =
            server_config_text(Path::new("/usr/lib/softhsm/libsofthsm2.so"), &token, 2).unwrap();
        assert!(!text.contains("deadbeef"), "no PIN in the file: {text}");
        let v: toml::Table = toml::from_str(&text).unwrap();
        let p = &v["key_manager"]["pkcs11"];
        assert_eq!(
            p["module"].as_str(),
            Some("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(p["token_label"].as_str(), Some("bench-s2"));
        assert_eq!(p["pin_file"].as_str(), Some("/tmp/a \"b\"/bench-s2.pin"));
        assert_eq!(p["sessions"].as_integer(), Some(2));
        // The key manager accepts it.
        let cfg: Pkcs11Config = p.clone().try_into().unwrap();
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn raw_child_measures_a_softhsm_token() {
        let Some(token) = hsm_sim::softhsm::softhsm_test(
            "scenario::issuance_hsm::tests::raw_child_measures_a_softhsm_token",
            "raw",
        ) else {
            return;
        };
        let out = raw_child(&RawArgs {
            module: token.module.clone(),
            token_label: token.label.clone(),
            pin_file: token.pin_file.clone(),
            threads: vec![1, 2],
            runs: 2,
            seconds: 0.05,
        })
        .unwrap();
        assert_eq!(
            out.rates.iter().map(|r| r.threads).collect::<Vec<_>>(),
            vec![1, 2]
        );
        for r in &out.rates {
            assert_eq!(r.runs.len(), 2);
            assert!(
                r.runs
                    .iter()
                    .all(|x| x.rate > 0.0 && x.cpu_us_per_sig >= 0.0)
            );
        }
        // A second child on the same token reuses the key.
        let again = raw_child(&RawArgs {
            module: token.module.clone(),
            token_label: token.label.clone(),
            pin_file: token.pin_file.clone(),
            threads: vec![1],
            runs: 1,
            seconds: 0.05,
        })
        .unwrap();
        assert_eq!(again.rates.len(), 1);
    }

    #[test]
    fn crypto_backend_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007f)\n\tlibcrypto.so.3 => /lib/x86_64-linux-gnu/libcrypto.so.3 (0x00007f)\n\tlibc.so.6 => /lib/libc.so.6\n";
        assert_eq!(
            crypto_backend(ldd).as_deref(),
            Some("OpenSSL libcrypto.so.3")
        );
        assert_eq!(crypto_backend("libc.so.6 => /lib/libc.so.6"), None);
    }

    fn node(rate_per_conn: &[(usize, f64)], server_us: f64) -> NodeResult {
        let by_connections = rate_per_conn
            .iter()
            .map(|&(conns, rate)| {
                let signed = 10_000;
                let wall = Duration::from_secs_f64(signed as f64 / rate);
                let run = NodeRun {
                    signed,
                    errors: 0,
                    first_error: None,
                    wall,
                    batch_latencies: vec![Duration::from_millis(30)],
                    server_cpu: Duration::from_secs_f64(server_us * signed as f64 / 1e6),
                    client_cpu: Duration::from_millis(50),
                    machine_idle: wall / 10,
                    server_rss: 20 << 20,
                };
                (conns, vec![run])
            })
            .collect();
        NodeResult {
            by_connections,
            entries: 1_000,
            entry_create: Duration::from_millis(500),
            server_rss_idle: 15 << 20,
            server_rss_peak: 25 << 20,
        }
    }

    fn raw(threads: usize, rate: f64, cpu: f64) -> RawRate {
        RawRate {
            threads,
            runs: vec![RawRun {
                rate,
                cpu_us_per_sig: cpu,
                idle_cores: 0.05,
            }],
        }
    }

    #[test]
    fn b3_counts_are_one_and_every_core() {
        assert_eq!(b3_counts(1), vec![1]);
        assert_eq!(b3_counts(2), vec![1, 2]);
        assert_eq!(
            b3_counts(1_000),
            vec![1, carapace_keymanager_pkcs11::MAX_SESSIONS]
        );
    }

    #[test]
    fn b3_report_states_the_goal_and_the_bounds() {
        let b3 = B3 {
            softhsm: "SoftHSM2 2.6.1".into(),
            loadavg: "0.10 0.20 0.30".into(),
            raw: Ok(vec![raw(1, 17_000.0, 58.0), raw(2, 22_000.0, 80.0)]),
            by_sessions: vec![
                (1, Ok(node(&[(1, 7_500.0), (2, 7_200.0)], 200.0))),
                (2, Ok(node(&[(1, 9_500.0), (2, 18_000.0)], 110.0))),
            ],
            soft: Ok(node(&[(1, 18_000.0), (2, 17_000.0)], 90.0)),
            soft_from_b1: true,
        };
        let mut r = Report::new();
        section(&mut r, &b3, &Plan::new(true), 2, Some((12_000.0, 20_000.0)));
        let text = r.finish();
        assert!(
            text.contains("sessions = 1: 44.1 % (not met); sessions = 2: 81.8 % (met)"),
            "{text}"
        );
        assert!(
            text.contains("**Goal (SVID issuance ≥ 80 % of SoftHSM2's raw sign rate): not met**"),
            "{text}"
        );
        // 2 cores at 200 + 5 CPU-µs per SVID: at most 9,756/s = 57.4 % of 17,000.
        assert!(text.contains("9,756 (57.4 %)"), "{text}");
        assert!(
            text.contains("B1's crypto ceiling (ring, same invocation) scaled 1.67×"),
            "{text}"
        );
        assert!(
            text.contains("about 20 µs more than one with ring"),
            "{text}"
        );
        assert!(!text.contains("FAILED"), "{text}");

        let failed = B3 {
            raw: Err(anyhow!("softhsm2 went away")),
            by_sessions: vec![(1, Err(anyhow!("server did not start")))],
            soft: Err(anyhow!("no CSRs")),
            soft_from_b1: false,
            ..b3
        };
        let mut r = Report::new();
        section(&mut r, &failed, &Plan::new(true), 2, None);
        let text = r.finish();
        assert!(
            text.contains("**SoftHSM2 raw signing rate FAILED:**"),
            "{text}"
        );
        assert!(text.contains("server did not start"), "{text}");
        assert!(
            text.contains("No ratio: the raw rate was not measured"),
            "{text}"
        );
        assert_eq!(failed.into_errors().len(), 3);
    }
}
