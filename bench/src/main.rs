//! `carapace-bench`: runs B1 (X509-SVID issuance: crypto ceiling and node API), B2
//! (Workload API latency and agent memory) and B3 (issuance with the CA key in SoftHSM2
//! beside the token's raw signing rate) against the real binaries, B4 (`tpm` node
//! attestation against swtpm, both plugin halves in process) and B5 (`kerberos` node
//! attestation against the lab's MIT KDC) and B6 (workload attestation latency and Workload
//! API connections per second on one agent), and B7 (the server's cost per node attestation
//! of `sshpop`, `aws_iid`, `gcp_iit` and `azure_msi`, both plugin halves in process; see
//! [`attest_cloud_ssh`]), and prints a Markdown report. Normally run through
//! `scripts/bench.sh [--quick]`.
//!
//! `carapace-bench --pkcs11-raw ...` is an internal mode: B3 runs it as a child process
//! with `SOFTHSM2_CONF` in its environment to measure the token's raw rate
//! (see `carapace_bench::hsm`). `carapace-bench --kerberos-child <JSON>` likewise: B5
//! runs it with the lab realm's `KRB5_CONFIG` (see `carapace_bench::kerberos`).
//! `carapace-bench --workload-attest-child <JSON>` is B6's Workload API client, run as a
//! child in its own cgroup, and `--workload-attest-caller` an idle caller process (see
//! `carapace_bench::workload_attest`).
#![forbid(unsafe_code)]

mod attest_cloud_ssh;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use carapace_bench::crypto::{self, Ceiling};
use carapace_bench::harness::{self, ServerOptions};
use carapace_bench::hsm::{self, RawRate};
use carapace_bench::kerberos::{self, KrbPlan, LoopRun, ModeResult, ServerRun};
use carapace_bench::node::{self, NodeConfig, NodeResult, NodeRun};
use carapace_bench::procfs::Machine;
use carapace_bench::report::{Report, Table};
use carapace_bench::stats::{Repeated, Summary, fmt_bytes, fmt_count, fmt_pct, fmt_us};
use carapace_bench::tpm::{self, AttestRun, Lab, OpRate, OpSamples, SignLatency, TpmPlan};
use carapace_bench::workload::{self, Level, WorkloadConfig, WorkloadResult};
use carapace_bench::workload_attest::{self, AttestPlan, B6Result, ConnRun, InProcess};
use hsm_sim::softhsm::SoftHsm;

use attest_cloud_ssh::B7Plan;

const USAGE: &str = "usage: carapace-bench [--quick] [--bin-dir DIR] [--out FILE] [--command TEXT] [--only b1|b2|b3|b4|b5|b6|b7]";

#[derive(Debug)]
struct Args {
    quick: bool,
    bin_dir: PathBuf,
    out: Option<PathBuf>,
    command: String,
    only: Option<String>,
    keep: bool,
}

fn parse_args() -> Result<Args> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut args = Args {
        quick: false,
        bin_dir: exe.parent().map(Path::to_path_buf).unwrap_or_default(),
        out: None,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        only: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--quick" => args.quick = true,
            "--bin-dir" => args.bin_dir = value("--bin-dir")?.into(),
            "--out" => args.out = Some(value("--out")?.into()),
            "--command" => args.command = value("--command")?,
            "--only" => args.only = Some(value("--only")?),
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if let Some(only) = &args.only
        && !matches!(
            only.as_str(),
            "b1" | "b2" | "b3" | "b4" | "b5" | "b6" | "b7"
        )
    {
        bail!("--only {only:?}: expected b1, b2, b3, b4, b5, b6 or b7\n{USAGE}");
    }
    Ok(args)
}

/// Sizes of one benchmark run.
#[derive(Debug, Clone)]
struct Plan {
    csrs: usize,
    ceiling_runs: usize,
    node: NodeConfig,
    workload: WorkloadConfig,
    /// B3: runs of the raw token rate per thread count, and seconds per run (B3's node
    /// API runs use `node`, like B1).
    raw_runs: usize,
    raw_seconds: f64,
    /// B4's sizes.
    tpm: TpmPlan,
    /// B5's sizes.
    krb: KrbPlan,
    /// B6's sizes.
    attest: AttestPlan,
    /// B7's sizes.
    b7: B7Plan,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                csrs: 2_000,
                ceiling_runs: 1,
                node: NodeConfig {
                    entries: 200,
                    svids_per_run: 2_000,
                    batch: 500,
                    runs: 1,
                    connections: vec![1, 2],
                },
                workload: WorkloadConfig {
                    levels: vec![(1, 50), (100, 3)],
                    fetches_with_bulk: 50,
                    bulk_entries: 200,
                    new_entry_reps: 3,
                },
                raw_runs: 1,
                raw_seconds: 0.5,
                tpm: TpmPlan::new(true),
                krb: KrbPlan::new(true),
                attest: AttestPlan::new(true),
                b7: B7Plan::new(true),
            }
        } else {
            Plan {
                csrs: 10_000,
                ceiling_runs: 3,
                node: NodeConfig {
                    entries: 1_000,
                    svids_per_run: 10_000,
                    batch: 500,
                    runs: 3,
                    connections: vec![1, 2],
                },
                workload: WorkloadConfig {
                    levels: vec![(1, 200), (100, 10), (1_000, 3)],
                    fetches_with_bulk: 200,
                    bulk_entries: 1_000,
                    new_entry_reps: 10,
                },
                raw_runs: 3,
                raw_seconds: 2.0,
                tpm: TpmPlan::new(false),
                krb: KrbPlan::new(false),
                attest: AttestPlan::new(false),
                b7: B7Plan::new(false),
            }
        }
    }
}

fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        fmt_us(d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn ceiling_section(r: &mut Report, ceilings: &[Ceiling]) {
    let mut t = Table::new([
        "threads",
        "SVIDs per run",
        "SVIDs/s: median (range, runs)",
        "CPU-µs per SVID (threads × wall / SVIDs)",
    ]);
    for c in ceilings {
        let Some(rep) = Repeated::of(&c.rates) else {
            continue;
        };
        t.row([
            c.threads.to_string(),
            fmt_count(c.svids as f64),
            rep.fmt_count(),
            format!("{:.0}", c.threads as f64 * 1e6 / rep.median),
        ]);
    }
    r.table(&t);
}

fn node_section(
    r: &mut Report,
    n: &NodeResult,
    plan: &Plan,
    ceiling_all: Option<f64>,
    ceiling_one: Option<f64>,
    nproc: usize,
) {
    let mut t = Table::new([
        "connections",
        "SVIDs per run",
        "SVIDs/s: median (range, runs)",
        "batch latency p50",
        "p99",
        "max",
        "server CPU-µs per SVID (median)",
        "server RSS after",
        "errors",
    ]);
    let mut best: Option<f64> = None;
    for (conns, runs) in &n.by_connections {
        let rates: Vec<f64> = runs.iter().map(|x| x.rate()).collect();
        let cpu: Vec<f64> = runs.iter().map(|x| x.cpu_us_per_svid()).collect();
        let lats: Vec<Duration> = runs
            .iter()
            .flat_map(|x| x.batch_latencies.iter().copied())
            .collect();
        let lat = Summary::of_durations_us(&lats);
        let rep = Repeated::of(&rates);
        if let Some(rep) = rep {
            best = Some(best.map_or(rep.median, |b: f64| b.max(rep.median)));
        }
        let errors: usize = runs.iter().map(|x| x.errors).sum();
        let first_error = runs.iter().find_map(|x| x.first_error.clone());
        t.row([
            conns.to_string(),
            fmt_count(plan.node.svids_per_run as f64),
            rep.map(|r| r.fmt_count()).unwrap_or_default(),
            lat.map(|l| fmt_us(l.p50)).unwrap_or_default(),
            lat.map(|l| fmt_us(l.p99)).unwrap_or_default(),
            lat.map(|l| fmt_us(l.max)).unwrap_or_default(),
            Repeated::of(&cpu)
                .map(|c| format!("{:.0}", c.median))
                .unwrap_or_default(),
            runs.last()
                .map(|x| fmt_bytes(x.server_rss as f64))
                .unwrap_or_default(),
            match first_error {
                Some(e) if errors > 0 => format!("{errors} (first: {e})"),
                _ => errors.to_string(),
            },
        ]);
    }
    r.table(&t);
    r.bullet(&format!(
        "Batches of {} CSRs; {} batches per run, spread round-robin over the connections, each connection sending its batches one after the other. Latency percentiles are over every batch of every run ({} per connection count).",
        plan.node.batch,
        plan.node.svids_per_run.div_ceil(plan.node.batch),
        plan.node.svids_per_run.div_ceil(plan.node.batch) * plan.node.runs
    ));
    r.bullet(&format!(
        "{} entries parented to the benchmark agent, created through the admin API (16 calls in flight) in {} ({} entries/s).",
        fmt_count(n.entries as f64),
        secs(n.entry_create),
        fmt_count(n.entries as f64 / n.entry_create.as_secs_f64())
    ));
    r.bullet(&format!(
        "Server RSS before signing (after attestation, entries, warm-up): {}; peak (VmHWM) at the end: {}.",
        fmt_bytes(n.server_rss_idle as f64),
        fmt_bytes(n.server_rss_peak as f64)
    ));
    if let (Some(best), Some(all)) = (best, ceiling_all) {
        r.bullet(&format!(
            "**Node API / crypto ceiling (all cores): {} / {} = {}** (goal ≥ 70 %; SPIRE rate-limits signing to 500/s per client).",
            fmt_count(best),
            fmt_count(all),
            fmt_pct(best / all)
        ));
    }
    let cpu: Vec<f64> = n
        .by_connections
        .iter()
        .flat_map(|(_, runs)| runs.iter().map(|x| x.cpu_us_per_svid()))
        .collect();
    if let (Some(c), Some(one), Some(all)) = (Repeated::of(&cpu), ceiling_one, ceiling_all) {
        let (one_us, all_us) = (1e6 / one, nproc as f64 * 1e6 / all);
        r.bullet(&format!(
            "Server CPU per SVID over the node API (median of all runs, /proc tick resolution 10 ms): {:.0} µs, against {:.0} µs (1 thread) and {:.0} µs (all cores) of CPU for the bare crypto: what TLS, HTTP/2, protobuf, authorization and scheduling add is within {:+.0} to {:+.0} µs per SVID.",
            c.median,
            one_us,
            all_us,
            c.median - all_us,
            c.median - one_us,
        ));
    }
}

fn level_row(t: &mut Table, label: &str, l: &Level) {
    let s = Summary::of_durations_us(&l.samples);
    let walls: Vec<f64> = l
        .round_walls
        .iter()
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
    let wall = Summary::of(&walls);
    let fetches = l.samples.len().max(1) as f64;
    t.row([
        label.to_owned(),
        l.rounds.to_string(),
        l.samples.len().to_string(),
        s.map(|s| fmt_us(s.p50)).unwrap_or_default(),
        s.map(|s| fmt_us(s.p99)).unwrap_or_default(),
        s.map(|s| fmt_us(s.p999)).unwrap_or_default(),
        s.map(|s| fmt_us(s.max)).unwrap_or_default(),
        if l.concurrency > 1 {
            wall.map(|w| {
                format!(
                    "{} ({} conn/s)",
                    fmt_us(w.p50),
                    fmt_count(l.concurrency as f64 / (w.p50 / 1e6))
                )
            })
            .unwrap_or_default()
        } else {
            "—".into()
        },
        format!("{:.0}", l.agent_cpu.as_secs_f64() * 1e6 / fetches),
        match &l.first_error {
            Some(e) => format!("{} (first: {e})", l.errors),
            None => l.errors.to_string(),
        },
    ]);
}

fn workload_section(r: &mut Report, w: &WorkloadResult) {
    r.para(&format!(
        "Each client opens its own new Unix-socket connection (a new tonic channel), calls FetchX509SVID with `workload.spiffe.io: true`, and records the time from starting to connect until the first stream message arrives; all clients of a round are released together by a barrier and keep their streams open until the round ends. Clients run as uid {} in this process (a multi-thread tokio runtime), on the same cores as the agent. The agent holds 1 SVID for that uid unless stated.",
        w.uid
    ));
    let mut t = Table::new([
        "concurrent clients",
        "rounds",
        "samples",
        "p50",
        "p99",
        "p99.9",
        "max",
        "round wall, median (new conn/s)",
        "agent CPU-µs per fetch",
        "errors",
    ]);
    for l in &w.levels {
        level_row(&mut t, &fmt_count(l.concurrency as f64), l);
    }
    if let Some(l) = &w.with_bulk {
        level_row(
            &mut t,
            &format!(
                "1, with {} more SVIDs cached",
                fmt_count(w.bulk_entries as f64)
            ),
            l,
        );
    }
    r.table(&t);
    let delta = w.rss_bulk as f64 - w.rss_one as f64;
    let mut m = Table::new(["agent memory", "value"]);
    m.row([
        "VmRSS, 1 SVID cached (before any Workload API traffic)".to_owned(),
        fmt_bytes(w.rss_one as f64),
    ]);
    m.row([
        format!(
            "VmRSS, {} SVIDs cached",
            fmt_count(1.0 + w.bulk_entries as f64)
        ),
        fmt_bytes(w.rss_bulk as f64),
    ]);
    m.row([
        "**per cached SVID** (delta / bulk entries)".to_owned(),
        format!("**{}**", fmt_bytes(delta / w.bulk_entries.max(1) as f64)),
    ]);
    m.row([
        "VmRSS after deleting the bulk entries again".to_owned(),
        fmt_bytes(w.rss_deleted as f64),
    ]);
    m.row([
        "VmRSS after the latency levels".to_owned(),
        fmt_bytes(w.rss_after_levels as f64),
    ]);
    m.row([
        "VmHWM (peak) at the end".to_owned(),
        fmt_bytes(w.rss_peak as f64),
    ]);
    r.table(&m);
    let ne = Summary::of_durations_us(&w.new_entry);
    let nc = Summary::of_durations_us(&w.new_entry_create);
    let mut p = Table::new(["propagation", "value"]);
    p.row([
        format!(
            "{} entries created (admin API, 16 in flight)",
            fmt_count(w.bulk_entries as f64)
        ),
        secs(w.bulk_create),
    ]);
    p.row([
        format!(
            "first create call → agent holds all {} SVIDs (`held=` in its log)",
            fmt_count(1.0 + w.bulk_entries as f64)
        ),
        format!("**{}**", secs(w.bulk_to_held)),
    ]);
    p.row([
        "first delete call → agent dropped them all".to_owned(),
        secs(w.bulk_delete_to_dropped),
    ]);
    if let Some(s) = ne {
        p.row([
            format!(
                "**new entry → message with its SPIFFE ID on an open stream** ({} reps)",
                s.n
            ),
            format!("**p50 {} / max {}**", fmt_us(s.p50), fmt_us(s.max)),
        ]);
    }
    if let Some(s) = nc {
        p.row([
            "of which the CreateEntry call".to_owned(),
            format!("p50 {} / max {}", fmt_us(s.p50), fmt_us(s.max)),
        ]);
    }
    r.table(&p);
    let worst_p99 = w
        .levels
        .iter()
        .filter_map(|l| Summary::of_durations_us(&l.samples))
        .map(|s| s.p99)
        .fold(f64::NAN, f64::max);
    let single = w
        .levels
        .iter()
        .find(|l| l.concurrency == 1)
        .and_then(|l| Summary::of_durations_us(&l.samples));
    r.bullet(&format!(
        "Goals (PERFORMANCE.md §0): first response p99 < 1 ms — 1 client: {}, worst level: {}; ≤ 3 KB per cached SVID — {}; new entry to workload < 1 s — {}.",
        single.map(|s| fmt_us(s.p99)).unwrap_or_else(|| "n/a".into()),
        fmt_us(worst_p99),
        fmt_bytes(delta / w.bulk_entries.max(1) as f64),
        ne.map(|s| format!("max {}", fmt_us(s.max))).unwrap_or_else(|| "n/a".into()),
    ));
    r.bullet("SPIRE 1.15.3 on this kind of machine (§0): first response p50 ≈ 2.9 ms, p99 ≈ 5 ms; ~13.5 KiB per cached SVID; new entry to workload 9–10 s.");
}

/// What B3 measured; each part may have failed on its own.
struct B3 {
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
    fn into_errors(self) -> Vec<anyhow::Error> {
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
    hsm::raw_rates(hsm, &token, counts, plan.raw_runs, plan.raw_seconds).await
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
    let opts = hsm::server_options(dir, hsm, &token, sessions)?;
    node::run(bin_dir, dir, csrs, &plan.node, &opts).await
}

/// B3: the token's raw rate alone (child process), then the real server with its CA key
/// in a fresh token for each session count, then (without B1) the software key.
async fn b3(
    bin_dir: &Path,
    dir: &Path,
    csrs: Result<&Vec<Vec<u8>>>,
    plan: &Plan,
    nproc: usize,
    b1_node: Option<NodeResult>,
) -> Result<B3> {
    let hsm = SoftHsm::new().context("B3 needs SoftHSM2 (softhsm2-util and libsofthsm2.so)")?;
    let softhsm = hsm::softhsm_description(hsm.module());
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
                    node::run(
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

/// `ours / idle / others` cores, medians of each.
fn fmt_cores(v: &[(f64, f64, f64)]) -> String {
    let med = |f: fn(&(f64, f64, f64)) -> f64| {
        Repeated::of(&v.iter().map(f).collect::<Vec<_>>()).map_or(f64::NAN, |r| r.median)
    };
    format!(
        "{:.2} / {:.2} / {:.2}",
        med(|c| c.0),
        med(|c| c.1),
        med(|c| c.2)
    )
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

/// `/proc/loadavg`'s three load averages, now.
fn loadavg_now() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// B3's report; `b1_ceiling` is B1's crypto ceiling (1 thread, all cores) if it ran.
fn b3_section(r: &mut Report, b3: &B3, plan: &Plan, nproc: usize, b1_ceiling: Option<(f64, f64)>) {
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

/// What B4 measured; each part may have failed on its own.
struct B4 {
    /// `swtpm --version`.
    swtpm: String,
    /// `/proc/loadavg` when B4 started.
    loadavg: String,
    /// Manufacturing the lab TPMs and starting their swtpms.
    setup: Duration,
    /// The EK the agent attested with, once an attestation was captured.
    ek: Option<String>,
    /// Sequential attestations on one swtpm.
    latency: Result<AttestRun>,
    /// Throughput runs on 1 and `plan.parallel` swtpms.
    throughput: Result<Vec<AttestRun>>,
    /// The server's pieces alone on a captured attestation.
    server: Result<Vec<OpRate>>,
    /// The agent's TPM commands one by one.
    ops: Result<Vec<OpSamples>>,
    /// TPM2_Sign with a P-256 signing primary.
    sign: Result<SignLatency>,
}

impl B4 {
    fn into_errors(self) -> Vec<anyhow::Error> {
        [
            self.latency.err(),
            self.throughput.err(),
            self.server.err(),
            self.ops.err(),
            self.sign.err(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// The thread counts of B4's server-alone rates: 1 and every core.
fn b4_counts(nproc: usize) -> Vec<usize> {
    if nproc > 1 { vec![1, nproc] } else { vec![1] }
}

/// Runs a blocking B4 step on tokio's blocking pool.
async fn b4_blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("{what}: task failed: {e}"))?
        .with_context(|| what.to_owned())
}

/// B4: lab TPMs and swtpms, one captured attestation, sequential attestations, the
/// throughput runs, the server's pieces alone, the TPM commands one by one, TPM2_Sign.
async fn b4(plan: &TpmPlan, nproc: usize) -> Result<B4> {
    let swtpm = tpm::swtpm_version();
    let loadavg = loadavg_now();
    let parallel = plan.parallel.max(1);
    eprintln!("==> B4: manufacturing {parallel} lab TPMs and starting a swtpm for each");
    let t = Instant::now();
    let lab = b4_blocking("setting up the lab TPMs", move || Lab::start(parallel)).await?;
    let setup = t.elapsed();
    let server = Arc::new(lab.server()?);
    let tpms: Vec<&hsm_sim::swtpm::Swtpm> = lab.tpms().iter().collect();
    let first = *tpms
        .first()
        .ok_or_else(|| anyhow!("no swtpm was started"))?;

    eprintln!("==> B4: capturing one attestation");
    let captured = tpm::capture(&server, first)
        .await
        .context("capturing one attestation of swtpm 1");
    let ek = captured
        .as_ref()
        .ok()
        .map(|c| c.ek_algorithm.as_str().to_owned());

    eprintln!(
        "==> B4: {} sequential attestations on one swtpm",
        plan.attestations
    );
    let latency = tpm::attest_run(&server, &tpms[..1], plan.attestations).await;

    let mut counts = vec![1];
    if tpms.len() > 1 {
        counts.push(tpms.len());
    }
    eprintln!(
        "==> B4: throughput ({} attestations per swtpm, swtpms {counts:?}, {} runs)",
        plan.per_tpm, plan.runs
    );
    let throughput = async {
        let mut out = Vec::new();
        for _ in 0..plan.runs.max(1) {
            for &k in &counts {
                out.push(
                    tpm::attest_run(&server, &tpms[..k], plan.per_tpm)
                        .await
                        .with_context(|| format!("throughput run on {k} swtpm(s)"))?,
                );
            }
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;

    let threads = b4_counts(nproc);
    eprintln!(
        "==> B4: server alone (threads {threads:?}, {} runs of {} s)",
        plan.rate_runs, plan.rate_seconds
    );
    let server_rates = match (captured, lab.ek_policy()) {
        (Ok(c), Ok(policy)) => {
            let (runs, seconds) = (plan.rate_runs, plan.rate_seconds);
            b4_blocking("server-alone rates", move || {
                tpm::server_rates(&c, &policy, &threads, runs, seconds)
            })
            .await
        }
        (Err(e), _) => Err(e),
        (_, Err(e)) => Err(e.context("the server's EK policy")),
    };

    eprintln!(
        "==> B4: TPM commands one by one ({} reps) and TPM2_Sign ({} signatures)",
        plan.op_reps, plan.signs
    );
    let (tcti, pid) = (first.tcti(), first.pid());
    let reps = plan.op_reps;
    let ops = b4_blocking("TPM commands one by one", move || tpm::tpm_ops(&tcti, reps)).await;
    let (tcti, signs) = (first.tcti(), plan.signs);
    let sign = b4_blocking("TPM2_Sign with a P-256 signing primary", move || {
        tpm::sign_latency(&tcti, pid, signs)
    })
    .await;
    Ok(B4 {
        swtpm,
        loadavg,
        setup,
        ek,
        latency,
        throughput,
        server: server_rates,
        ops,
        sign,
    })
}

/// A duration in the report's latency format.
fn dur(d: Duration) -> String {
    fmt_us(d.as_secs_f64() * 1e6)
}

/// p50 / p99 / max / mean of `samples`, formatted.
fn lat_cells(samples: &[Duration]) -> [String; 4] {
    match Summary::of_durations_us(samples) {
        Some(s) => [fmt_us(s.p50), fmt_us(s.p99), fmt_us(s.max), fmt_us(s.mean)],
        None => Default::default(),
    }
}

/// One figure of an attestation's phases.
type PhaseOf = fn(&tpm::Phases) -> Duration;

fn b4_latency(r: &mut Report, run: &AttestRun, ek: &str) {
    let col =
        |f: fn(&tpm::Phases) -> Duration| -> Vec<Duration> { run.samples.iter().map(f).collect() };
    let mut t = Table::new(["phase", "side", "what", "p50", "p99", "max", "mean"]);
    let rows: [(&str, &str, &str, PhaseOf); 9] = [
        (
            "`payload()`",
            "agent: TPM (wall)",
            "open the TPM, EK CreatePrimary + certificate from NV, AK Create + Load",
            |p| p.payload,
        ),
        ("`begin()`", "server (wall)", "", |p| p.begin),
        (
            "`begin()`",
            "server: **CPU**",
            "EK certificate chain, AK checks, software MakeCredential",
            |p| p.begin_cpu,
        ),
        (
            "`answer()`",
            "agent: TPM (wall)",
            "ActivateCredential, PCR_Read (before and after), Quote, flushes",
            |p| p.answer,
        ),
        ("`respond()`", "server (wall)", "", |p| p.respond),
        (
            "`respond()`",
            "server: **CPU**",
            "credential check, quote verification, clock check, store, selectors",
            |p| p.respond_cpu,
        ),
        (
            "agent total",
            "agent: TPM (wall)",
            "`payload()` + `answer()`",
            |p| p.payload + p.answer,
        ),
        (
            "server total",
            "server: **CPU**",
            "`begin()` + `respond()`",
            tpm::Phases::server_cpu,
        ),
        (
            "**whole attestation**",
            "wall",
            "payload → begin → answer → respond",
            |p| p.total,
        ),
    ];
    for (phase, side, what, f) in rows {
        let [p50, p99, max, mean] = lat_cells(&col(f));
        t.row([
            phase.to_owned(),
            side.to_owned(),
            what.to_owned(),
            p50,
            p99,
            max,
            mean,
        ]);
    }
    r.table(&t);
    let n = run.samples.len();
    let total: Duration = col(|p| p.total).iter().sum();
    let agent: Duration = col(|p| p.payload + p.answer).iter().sum();
    let server_wall: Duration = col(|p| p.begin + p.respond).iter().sum();
    let share = |d: Duration| fmt_pct(d.as_secs_f64() / total.as_secs_f64().max(f64::EPSILON));
    r.bullet(&format!(
        "{n} attestations one after the other in {} = **{:.1} attestations/s on one swtpm** ({ek} EK). Of the wall time, the agent's TPM work took {} and the server's calls {}.{}",
        secs(run.wall),
        run.rate(),
        share(agent),
        share(server_wall),
        if n < 100 {
            format!(" (p99 of {n} samples is the nearest rank: the maximum.)")
        } else {
            String::new()
        }
    ));
    let server_cpu = run.server_cpu_per_attestation();
    r.bullet(&format!(
        "CPU per attestation (averages over the run, /proc ticks of 10 ms): swtpm {}; this process {} — of which the server's calls {}, the rest the agent half's ESAPI side (marshalling, TCP to swtpm, HMAC and policy sessions in OpenSSL) and the runtime.",
        dur(run.swtpm_cpu_per_attestation()),
        dur(run.process_cpu_per_attestation()),
        dur(server_cpu),
    ));
}

fn b4_throughput(r: &mut Report, runs: &[AttestRun], plan: &TpmPlan, nproc: usize) {
    let mut counts: Vec<usize> = runs.iter().map(|x| x.tpms).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut t = Table::new([
        "swtpms (one agent client each)",
        "attestations per run",
        "attestations/s: median (range, runs)",
        "latency p50",
        "p99",
        "server CPU-µs per attestation",
        "swtpm CPU per attestation",
        "this process CPU per attestation",
        "cores: swtpms + this process / idle / others (median)",
    ]);
    let mut medians = Vec::new();
    for &k in &counts {
        let of_k: Vec<&AttestRun> = runs.iter().filter(|x| x.tpms == k).collect();
        let med = |v: Vec<f64>| Repeated::of(&v).map_or(f64::NAN, |r| r.median);
        let rates = Repeated::of(&of_k.iter().map(|x| x.rate()).collect::<Vec<_>>());
        let lats: Vec<Duration> = of_k
            .iter()
            .flat_map(|x| x.samples.iter().map(|p| p.total))
            .collect();
        let [p50, p99, _, _] = lat_cells(&lats);
        let cores: Vec<(f64, f64, f64)> = of_k.iter().map(|x| x.cores(nproc)).collect();
        if let Some(r) = rates {
            medians.push((k, r.median));
        }
        t.row([
            k.to_string(),
            (k * plan.per_tpm).to_string(),
            rates
                .map(|r| {
                    format!(
                        "{:.1}{}",
                        r.median,
                        if r.runs > 1 {
                            format!(" ({:.1}–{:.1}, {} runs)", r.min, r.max, r.runs)
                        } else {
                            String::new()
                        }
                    )
                })
                .unwrap_or_default(),
            p50,
            p99,
            format!(
                "{:.0}",
                med(of_k
                    .iter()
                    .map(|x| x.server_cpu_per_attestation().as_secs_f64() * 1e6)
                    .collect())
            ),
            fmt_us(med(of_k
                .iter()
                .map(|x| x.swtpm_cpu_per_attestation().as_secs_f64() * 1e6)
                .collect())),
            fmt_us(med(of_k
                .iter()
                .map(|x| x.process_cpu_per_attestation().as_secs_f64() * 1e6)
                .collect())),
            format!(
                "{:.2} / {:.2} / {:.2}",
                med(cores.iter().map(|c| c.0).collect()),
                med(cores.iter().map(|c| c.1).collect()),
                med(cores.iter().map(|c| c.2).collect())
            ),
        ]);
    }
    r.table(&t);
    if let (Some(&(_, one)), Some(&(k, many))) = (medians.first(), medians.last())
        && k > 1
    {
        let of = |tpms: usize, f: &dyn Fn(&AttestRun) -> f64| {
            let v: Vec<f64> = runs.iter().filter(|x| x.tpms == tpms).map(f).collect();
            Repeated::of(&v).map_or(f64::NAN, |r| r.median)
        };
        // CPU per attestation, swtpms + this process, µs.
        let cpu = |x: &AttestRun| {
            (x.swtpm_cpu_per_attestation() + x.process_cpu_per_attestation()).as_secs_f64() * 1e6
        };
        let (c1, ck) = (of(1, &cpu), of(k, &cpu));
        let (idle, others) = (of(k, &|x| x.cores(nproc).1), of(k, &|x| x.cores(nproc).2));
        let ceiling = nproc as f64 * 1e6 / ck;
        let rise = if ck > 1.15 * c1 {
            format!(
                " — each attestation cost {} more CPU with {k} swtpms running (vCPUs sharing a physical core on the host, or caches)",
                fmt_pct(ck / c1 - 1.0)
            )
        } else {
            String::new()
        };
        let why = if idle < 0.25 * nproc as f64 {
            "The cores were busy: each swtpm is one single-threaded process doing its key operations in software on the same cores as the other swtpm, the agent clients' ESAPI work and the server."
        } else {
            "The rest is waiting: each swtpm executes one command at a time, and every agent command is a round trip to it and back through the ESAPI."
        };
        let mut text = format!(
            "{k} swtpms attest {:.2}× as fast as one (ideal {k}×): {many:.1} vs {one:.1} attestations/s. CPU per attestation (swtpms + this process): {} with one swtpm, {} with {k}{rise}. At that cost {nproc} cores allow at most {ceiling:.1} attestations/s; {k} swtpms reached {} of it, with {idle:.2} cores idle on average. {why} With discrete TPMs each agent's TPM works on its own chip and only the server's CPU (column \"server CPU-µs\") is shared.",
            many / one,
            fmt_us(c1),
            fmt_us(ck),
            fmt_pct(many / ceiling),
        );
        if others > 0.3 {
            text.push_str(&format!(
                " Other processes held {others:.2} cores on average meanwhile: rerun on a quiet machine for the scaling."
            ));
        }
        r.bullet(&text);
    }
}

fn b4_server(r: &mut Report, rates: &[OpRate], latency: Option<&AttestRun>, nproc: usize) {
    let mut t = Table::new([
        "operation",
        "threads",
        "operations/s: median (range, runs)",
        "CPU-µs per operation (median; threads' CPU clocks)",
    ]);
    for x in rates {
        t.row([
            x.op.label().to_owned(),
            x.threads.to_string(),
            Repeated::of(&x.rates())
                .map(|r| r.fmt_count())
                .unwrap_or_default(),
            Repeated::of(&x.cpu())
                .map(|c| format!("{:.0}", c.median))
                .unwrap_or_default(),
        ]);
    }
    r.table(&t);
    // CPU-µs per operation on one thread.
    let one = |op: tpm::ServerOp| {
        rates
            .iter()
            .find(|x| x.op == op && x.threads == 1)
            .and_then(|x| Repeated::of(&x.cpu()))
            .map(|r| r.median)
    };
    let (vq, mc_rsa, mc_p384, vek) = (
        one(tpm::ServerOp::VerifyQuote),
        one(tpm::ServerOp::MakeCredentialRsa),
        one(tpm::ServerOp::MakeCredentialP384),
        one(tpm::ServerOp::VerifyEk),
    );
    if let (Some(run), Some(vq), Some(mc), Some(vek)) = (latency, vq, mc_rsa, vek) {
        let med = |f: PhaseOf| {
            Summary::of_durations_us(&run.samples.iter().map(f).collect::<Vec<_>>())
                .map_or(f64::NAN, |s| s.p50)
        };
        let (begin, respond, both) = (
            med(|p| p.begin_cpu),
            med(|p| p.respond_cpu),
            med(tpm::Phases::server_cpu),
        );
        r.bullet(&format!(
            "**Server CPU per attestation** (`begin()` + `respond()`, median of the sequential run): **{}** — `begin()` {} (EK chain ~{}, MakeCredential RSA-2048 ~{} by the 1-thread CPU above; the rest: JSON and TPMT_PUBLIC parsing, AK checks, Name, randomness), `respond()` {} (quote verification ~{}; the rest: JSON, PCR values, clock record, selectors). At that cost one core serves ~{} attestations/s and {nproc} cores ~{}: far above what the TPMs deliver ({:.1}/s per swtpm here, a few per second or less per discrete TPM), so the server is not the bound of node attestation.",
            fmt_us(both),
            fmt_us(begin),
            fmt_us(vek),
            fmt_us(mc),
            fmt_us(respond),
            fmt_us(vq),
            fmt_count(1e6 / both),
            fmt_count(nproc as f64 * 1e6 / both),
            run.rate(),
        ));
    }
    if let (Some(rsa), Some(p384)) = (mc_rsa, mc_p384) {
        r.bullet(&format!(
            "MakeCredential for a P-384 EK costs {} against {} for the RSA-2048 EK ({:.1}×): an ephemeral P-384 key, ECDH and KDFe (SHA-384) instead of one RSA-OAEP encryption with the EK's public key.",
            fmt_us(p384),
            fmt_us(rsa),
            p384 / rsa
        ));
    }
}

fn b4_ops(r: &mut Report, ops: &[OpSamples], latency: Option<&AttestRun>) {
    let mut t = Table::new([
        "TPM command(s)",
        "samples",
        "p50",
        "p99",
        "max",
        "client CPU (ESAPI, this thread), median",
    ]);
    for o in ops {
        let [p50, p99, max, _] = lat_cells(&o.samples);
        t.row([
            o.label.to_owned(),
            o.samples.len().to_string(),
            p50,
            p99,
            max,
            Summary::of_durations_us(&o.cpu)
                .map(|s| fmt_us(s.p50))
                .unwrap_or_default(),
        ]);
    }
    r.table(&t);
    let p50 = |o: &OpSamples| Summary::of_durations_us(&o.samples).map_or(0.0, |s| s.p50);
    // Every command but the P-384 EK, which the agent half does not use.
    let used: Vec<&OpSamples> = ops
        .iter()
        .filter(|o| !o.label.starts_with("P-384"))
        .collect();
    let sum: f64 = used.iter().map(|o| p50(o)).sum();
    if let Some(run) = latency
        && let Some(agent) = Summary::of_durations_us(
            &run.samples
                .iter()
                .map(|p| p.payload + p.answer)
                .collect::<Vec<_>>(),
        )
    {
        r.bullet(&format!(
            "Sum of the p50s above (without the P-384 EK): {}; the agent half's `payload()` + `answer()` p50 in the sequential run: {} (it also reads the PCRs a second time to detect a race with the quote).",
            fmt_us(sum),
            fmt_us(agent.p50),
        ));
    }
    let cpu_p50 = |o: &OpSamples| Summary::of_durations_us(&o.cpu).map_or(0.0, |s| s.p50);
    let cpu_sum: f64 = used.iter().map(|o| cpu_p50(o)).sum();
    if let Some(top) = used.iter().max_by(|a, b| cpu_p50(a).total_cmp(&cpu_p50(b)))
        && sum > 0.0
    {
        let why = if top.label.starts_with("AK") {
            ": tss-esapi's `ak::create_ak_2` and `ak::load_ak` each start a policy session and run PolicySecret(endorsement) in a null-auth HMAC session, and LAB.md §3.2 measured ~5 ms of client CPU per such session (OpenSSL 3 name and provider lookups)"
        } else {
            ""
        };
        r.bullet(&format!(
            "Client-side CPU (this process's ESAPI work, not the TPM's): {} of the {} above ({}); the most in {} ({} of {} wall){why}. On a discrete TPM this CPU is small beside the TPM's own time, but it is CPU the agent's host spends per attestation.",
            fmt_us(cpu_sum),
            fmt_us(sum),
            fmt_pct(cpu_sum / sum),
            top.label,
            fmt_us(cpu_p50(top)),
            fmt_us(p50(top)),
        ));
    }
}

fn b4_sign(r: &mut Report, s: &SignLatency) {
    let n = s.samples.len().max(1) as f64;
    let mut t = Table::new([
        "signatures",
        "p50",
        "p99",
        "max",
        "signatures/s (one after the other)",
        "client CPU-µs per signature (ESAPI, this thread)",
        "swtpm CPU-µs per signature",
        "CreatePrimary of the key",
    ]);
    let [p50, p99, max, _] = lat_cells(&s.samples);
    t.row([
        s.samples.len().to_string(),
        p50,
        p99,
        max,
        fmt_count(s.rate()),
        format!("{:.0}", s.client_cpu.as_secs_f64() * 1e6 / n),
        format!("{:.0}", s.swtpm_cpu.as_secs_f64() * 1e6 / n),
        dur(s.create_primary),
    ]);
    r.table(&t);
    r.bullet("Real TPMs take 100–700 ms per signature or quote (HARDWARE.md): the figure above is swtpm's software ECDSA on this CPU plus a loopback TCP round trip, two to three orders of magnitude faster than a discrete TPM. The agent's TPM key should therefore sign attestation, CSRs and TLS handshakes to the server only, never anything per workload request.");
}

/// B4's report.
fn b4_section(r: &mut Report, b4: &B4, plan: &TpmPlan, nproc: usize) {
    let ek = b4
        .ek
        .as_deref()
        .unwrap_or("unknown (no attestation was captured)");
    r.para(&format!(
        "{} (libtpms) on loopback TCP, started by carapace-hsm-sim: {} lab TPM(s), each manufactured by its own lab vendor (`TpmManufacturer`: its own EK CA, RSA-2048 and P-384 EKs with certificates in NV) and served by its own swtpm; setup took {}. Both halves of the `tpm` plugin run in this process, as in `attestor-tpm/tests/attestor.rs`: the agent half `TpmAttestorClient` (`payload()`, `answer()`; its TPM work runs on tokio's blocking threads over the `swtpm:` TCTI) and one server half `TpmAttestor` (`begin()`, `session.respond()`) with `ek_ca_files` = every vendor's root and intermediate, PCRs 0–7, no PCR policy, and an in-memory `NodeStateStore`; no gRPC between them. The agent attests with the EK `TpmDevice::ek()` picks: **{ek}**. Load average when B4 started: {}.",
        b4.swtpm,
        plan.parallel.max(1),
        secs(b4.setup),
        b4.loadavg,
    ));
    r.para("**swtpm is a software TPM on the same CPU as everything else here.** Its key operations are libtpms software crypto: a signature or quote takes about a millisecond below, where a discrete TPM takes 100–700 ms (HARDWARE.md). On real hardware the agent-side (TPM) figures grow many-fold — a quote alone by two to three orders of magnitude — while the server-side CPU figures stay as measured.");
    r.para("The RSA-2048 EK is re-derived by CreatePrimary in every attestation, and a TPM derives a primary RSA key's primes from its hierarchy seed: the prime search, hence the EK's time, depends on the seed. Every run manufactures new TPMs (and swtpm 2 has other seeds than swtpm 1), so the agent-side figures move from run to run even on a quiet machine: compare figures within one run.");

    r.heading(
        3,
        &format!("Whole attestation, sequential (one swtpm, {ek} EK)"),
    );
    r.para(&format!(
        "{} attestations one after the other with one agent client on swtpm 1, after one untimed warm-up; each phase timed. Agent calls: wall time (TPM commands, the ESAPI work in this process, the hop to a blocking thread). Server calls: wall time and CPU time (`CLOCK_THREAD_CPUTIME_ID` around every poll of the call's future, so exactly the server's work).",
        plan.attestations
    ));
    match &b4.latency {
        Ok(run) => b4_latency(r, run, ek),
        Err(e) => failed(r, "sequential attestations", e),
    }

    r.heading(
        3,
        &format!(
            "Attestations per second: one swtpm and {} in parallel, one server",
            plan.parallel.max(1)
        ),
    );
    r.para(&format!(
        "Each run: one untimed warm-up attestation per swtpm, then {} attestations per swtpm, each swtpm with its own agent client attesting one after the other in its own tokio task, all against the same `TpmAttestor` and store. {} run(s) per swtpm count, alternating. Latency: the whole attestation. CPU: /proc/<pid>/stat of this process and of the swtpm processes (10 ms ticks); cores: average cores used by the swtpms and this process / idle (`/proc/stat`) / taken by other processes or hypervisor steal, out of {nproc}.",
        plan.per_tpm, plan.runs
    ));
    match &b4.throughput {
        Ok(runs) => b4_throughput(r, runs, plan, nproc),
        Err(e) => failed(r, "attestation throughput", e),
    }

    r.heading(3, "Server alone, on one captured attestation");
    r.para(&format!(
        "One attestation of swtpm 1 captured from its messages (the server accepted it), then each piece of the server's work run in a loop on std threads, {} s per run, {} run(s) per thread count, alternating, after a warm-up. MakeCredential: a 32-byte secret for the captured AK's Name; the P-384 EK's public area comes from `TpmDevice::ek_of(EkAlgorithm::EccP384)` on the same TPM (swtpm's ECC EK; `ek()` picks it when a TPM has no RSA EK certificate). `verify_ek` with the server's policy (roots and intermediates of both lab vendors). CPU: the measuring threads' `CLOCK_THREAD_CPUTIME_ID`.",
        plan.rate_seconds, plan.rate_runs
    ));
    match &b4.server {
        Ok(rates) => b4_server(r, rates, b4.latency.as_ref().ok(), nproc),
        Err(e) => failed(r, "server-alone rates", e),
    }

    r.heading(3, "Agent side: the TPM commands one by one (swtpm 1)");
    r.para(&format!(
        "{} repetitions of what the agent half does, through `TpmDevice` (carapace-attestor-tpm) on a fresh ESAPI context each time; MakeCredential runs in software between the AK and the activation, untimed.",
        plan.op_reps
    ));
    match &b4.ops {
        Ok(ops) => b4_ops(r, ops, b4.latency.as_ref().ok()),
        Err(e) => failed(r, "TPM commands one by one", e),
    }

    r.heading(
        3,
        "TPM sign latency (stand-in for the agent key in the TPM)",
    );
    r.para("The agent key plugin (the agent's own key in the TPM) is not built yet, so its sign latency is not measured; instead, a raw TPM2_Sign as LAB.md §3.2 item 7 does it, with tss-esapi directly on swtpm 1: CreatePrimary of an unrestricted ECDSA P-256 signing key in the owner hierarchy, then `sign` of a SHA-256 digest with `AuthSession::Password` (no HMAC session: LAB.md measured those ~10× slower), one after the other after 5 warm-up signatures; the key is flushed at the end.");
    match &b4.sign {
        Ok(s) => b4_sign(r, s),
        Err(e) => failed(r, "TPM2_Sign latency", e),
    }
}

/// What B5 measured: the child's figures, or nothing if the KDC or the child failed.
struct B5 {
    /// MIT krb5's version.
    krb5: String,
    /// `/proc/loadavg` when B5 started.
    loadavg: String,
    /// The KDC's setup time and the child's measurements.
    run: kerberos::B5Run,
}

impl B5 {
    fn into_errors(self) -> Vec<anyhow::Error> {
        self.run
            .output
            .modes
            .iter()
            .flat_map(ModeResult::errors)
            .collect()
    }
}

/// B5: a KDC, its principals and keytabs, and the child that measures.
async fn b5(plan: &KrbPlan) -> Result<B5> {
    let krb5 = kerberos::krb5_version();
    let loadavg = loadavg_now();
    eprintln!(
        "==> B5: starting an MIT KDC for {} and provisioning the host and service principals",
        kerberos::REALM
    );
    let run = kerberos::run(plan).await?;
    Ok(B5 { krb5, loadavg, run })
}

fn mode_name(mutual: bool) -> &'static str {
    if mutual {
        "mutual_auth = true (default)"
    } else {
        "mutual_auth = false"
    }
}

/// A figure of a Kerberos attestation's phases.
type KrbPhaseOf = fn(&kerberos::Phases) -> Duration;

/// Mean of `f` over `samples`, µs.
fn mean_us(samples: &[kerberos::Phases], f: KrbPhaseOf) -> f64 {
    let v: Vec<Duration> = samples.iter().map(f).collect();
    Summary::of_durations_us(&v).map_or(f64::NAN, |s| s.mean)
}

fn per_attestation_us(run: &LoopRun, d: Duration) -> f64 {
    run.per_attestation(d).as_secs_f64() * 1e6
}

fn b5_sequential(r: &mut Report, run: &LoopRun, mutual: bool) {
    let mut t = Table::new([
        "phase",
        "side",
        "what",
        "wall p50",
        "wall p99",
        "wall max",
        "CPU p50 (this process)",
        "CPU mean",
    ]);
    let accept_what = if mutual {
        "acceptor credentials from the keytab, `gss_accept_sec_context` (ticket and authenticator, channel bindings, replay cache write), AP-REP, realm and name checks, selectors"
    } else {
        "acceptor credentials from the keytab, `gss_accept_sec_context` (ticket and authenticator, channel bindings, replay cache write), realm and name checks, selectors"
    };
    let mut rows: Vec<(&str, &str, &str, KrbPhaseOf, KrbPhaseOf)> = vec![
        (
            "`payload()`",
            "agent",
            "`{\"version\":1}`",
            |p| p.payload,
            |p| p.payload_cpu,
        ),
        (
            "`begin()`",
            "server",
            "32-byte nonce, challenge",
            |p| p.begin,
            |p| p.begin_cpu,
        ),
        (
            "`answer()` to the nonce",
            "agent + **KDC**",
            "keytab → AS-REQ (TGT) → TGS-REQ (service ticket) → `gss_init_sec_context` with the channel bindings",
            |p| p.token,
            |p| p.token_cpu,
        ),
        (
            "`respond()` to the token",
            "server",
            accept_what,
            |p| p.accept,
            |p| p.accept_cpu,
        ),
    ];
    if mutual {
        rows.push((
            "`answer()` to the AP-REP",
            "agent",
            "second `gss_init_sec_context` step: verify the server's AP-REP",
            |p| p.reply,
            |p| p.reply_cpu,
        ));
        rows.push((
            "`respond()` to the confirmation",
            "server",
            "`{\"step\":\"reply_verified\"}`",
            |p| p.confirm,
            |p| p.confirm_cpu,
        ));
    }
    rows.push((
        "agent total",
        "agent",
        "",
        kerberos::Phases::agent,
        kerberos::Phases::agent_cpu,
    ));
    rows.push((
        "server total",
        "server",
        "",
        kerberos::Phases::server,
        kerberos::Phases::server_cpu,
    ));
    rows.push((
        "**whole attestation**",
        "wall",
        "",
        |p| p.total,
        |p| p.agent_cpu() + p.server_cpu(),
    ));
    for (phase, side, what, wall, cpu) in rows {
        let [p50, p99, max, _] = lat_cells(&run.samples.iter().map(wall).collect::<Vec<_>>());
        let [cpu50, _, _, cpu_mean] = lat_cells(&run.samples.iter().map(cpu).collect::<Vec<_>>());
        t.row([
            phase.to_owned(),
            side.to_owned(),
            what.to_owned(),
            p50,
            p99,
            max,
            cpu50,
            cpu_mean,
        ]);
    }
    r.table(&t);
    let total = mean_us(&run.samples, |p| p.total);
    let agent = mean_us(&run.samples, kerberos::Phases::agent);
    let server = mean_us(&run.samples, kerberos::Phases::server);
    r.bullet(&format!(
        "{} attestations one after the other in {} = **{:.0} attestations/s sequentially** ({}). Of the wall time, the agent's calls took {} and the server's {}.",
        run.samples.len(),
        secs(run.wall),
        run.rate(),
        mode_name(mutual),
        fmt_pct(agent / total),
        fmt_pct(server / total),
    ));
    let process = per_attestation_us(run, run.process_cpu);
    let kdc = run.kdc_cpu.map(|k| per_attestation_us(run, k));
    let calls = mean_us(&run.samples, |p| p.agent_cpu() + p.server_cpu());
    let busy = calls + kdc.unwrap_or(0.0);
    let waiting = if busy >= 0.95 * total {
        format!(
            "The calls' CPU and krb5kdc's add up to {} of the {} per attestation: a sequential attestation is a chain of CPU work handed between the two processes, with no idle waiting worth naming.",
            fmt_pct(busy / total),
            fmt_us(total)
        )
    } else {
        format!(
            "Of the {} per attestation, {} is neither the calls nor krb5kdc on a CPU: loopback TCP round trips to the KDC, wake-ups and thread hand-offs.",
            fmt_us(total),
            fmt_us(total - busy)
        )
    };
    r.bullet(&format!(
        "CPU per attestation (run totals): this process {} (agent calls {}, server calls {}; the rest is the runtime's idle workers and blocking threads); krb5kdc {}. {waiting}",
        fmt_us(process),
        fmt_us(mean_us(&run.samples, kerberos::Phases::agent_cpu)),
        fmt_us(mean_us(&run.samples, kerberos::Phases::server_cpu)),
        kdc.map_or("not measured".into(), fmt_us),
    ));
    if let (Some((a, t)), Some(k)) = (run.kdc_requests_per_attestation(), run.kdc) {
        r.bullet(&format!(
            "The KDC's log over the run: **{a:.2} AS-REQ and {t:.2} TGS-REQ per attestation**{} — a fresh TGT and service ticket every time.",
            if k.not_issued > 0 {
                format!(" ({} not issued)", k.not_issued)
            } else {
                String::new()
            }
        ));
    }
}

fn b5_throughput(r: &mut Report, modes: &[ModeResult], plan: &KrbPlan, nproc: usize) {
    let mut t = Table::new([
        "mutual_auth",
        "loops (one agent client each)",
        "attestations per run",
        "attestations/s: median (range, runs)",
        "latency p50",
        "p99",
        "this process CPU per attestation",
        "krb5kdc CPU per attestation",
        "cores: this process + krb5kdc / idle / others (median)",
    ]);
    let med = |v: Vec<f64>| Repeated::of(&v).map_or(f64::NAN, |r| r.median);
    let mut notes = Vec::new();
    for m in modes {
        let Ok(runs) = &m.throughput else { continue };
        let mut medians = Vec::new();
        for k in plan.counts() {
            let of_k: Vec<&LoopRun> = runs.iter().filter(|x| x.loops == k).collect();
            let Some(rates) = Repeated::of(&of_k.iter().map(|x| x.rate()).collect::<Vec<_>>())
            else {
                continue;
            };
            let lats: Vec<Duration> = of_k
                .iter()
                .flat_map(|x| x.samples.iter().map(|p| p.total))
                .collect();
            let [p50, p99, _, _] = lat_cells(&lats);
            let process = med(of_k
                .iter()
                .map(|x| per_attestation_us(x, x.process_cpu))
                .collect());
            let kdc = med(of_k
                .iter()
                .filter_map(|x| x.kdc_cpu.map(|c| per_attestation_us(x, c)))
                .collect());
            let cores: Vec<(f64, f64, f64)> = of_k.iter().map(|x| x.cores(nproc)).collect();
            let idle = med(cores.iter().map(|c| c.1).collect());
            medians.push((k, rates.median, process + kdc, idle));
            t.row([
                m.mutual.to_string(),
                k.to_string(),
                (k * plan.per_loop).to_string(),
                rates.fmt_count(),
                p50,
                p99,
                fmt_us(process),
                fmt_us(kdc),
                format!(
                    "{:.2} / {idle:.2} / {:.2}",
                    med(cores.iter().map(|c| c.0).collect()),
                    med(cores.iter().map(|c| c.2).collect())
                ),
            ]);
        }
        if let (Some(&(_, one, c1, _)), Some(&(k, many, ck, idle))) =
            (medians.first(), medians.last())
            && k > 1
        {
            let ceiling = nproc as f64 * 1e6 / ck;
            notes.push(format!(
                "{}: {k} loops attest {:.2}× as fast as one (ideal {k}×): {} vs {} attestations/s. CPU per attestation (this process + krb5kdc): {} with one loop, {} with {k}. At that cost {nproc} cores allow at most {} attestations/s; {k} loops reached {} of it, with {idle:.2} cores idle on average: each attestation is a chain of hand-offs between this process and krb5kdc (agent → AS-REQ → agent → TGS-REQ → agent → server), and krb5kdc, one single-threaded process, serves one request at a time, so the two loops' requests can queue behind each other.",
                mode_name(m.mutual),
                many / one,
                fmt_count(many),
                fmt_count(one),
                fmt_us(c1),
                fmt_us(ck),
                fmt_count(ceiling),
                fmt_pct(many / ceiling),
            ));
        }
    }
    r.table(&t);
    for n in notes {
        r.bullet(&n);
    }
}

/// Median server CPU per attestation (µs) over `runs`.
fn server_cpu_of(runs: &[ServerRun]) -> Option<f64> {
    Repeated::of(&runs.iter().map(ServerRun::cpu_us).collect::<Vec<_>>()).map(|r| r.median)
}

fn b5_server(r: &mut Report, modes: &[ModeResult], plan: &KrbPlan, nproc: usize) {
    let mut t = Table::new([
        "mutual_auth",
        "tasks",
        "tokens per run",
        "attestations/s: median (range, runs)",
        "CPU-µs per attestation (median)",
        "per core: 10⁶ / CPU-µs",
        "cores: this process / idle / others (median)",
    ]);
    for m in modes {
        let Ok(runs) = &m.server else { continue };
        for k in plan.counts() {
            let of_k: Vec<ServerRun> = runs.iter().copied().filter(|x| x.threads == k).collect();
            let Some(rates) = Repeated::of(&of_k.iter().map(ServerRun::rate).collect::<Vec<_>>())
            else {
                continue;
            };
            let cpu = server_cpu_of(&of_k).unwrap_or(f64::NAN);
            let cores: Vec<(f64, f64, f64)> = of_k.iter().map(|x| x.cores(nproc)).collect();
            t.row([
                m.mutual.to_string(),
                k.to_string(),
                plan.server_tokens.to_string(),
                rates.fmt_count(),
                format!("{cpu:.0}"),
                fmt_count(1e6 / cpu),
                fmt_cores(&cores),
            ]);
        }
    }
    r.table(&t);
    for m in modes {
        let Ok(runs) = &m.server else { continue };
        let of = |k: usize| {
            let of_k: Vec<ServerRun> = runs.iter().copied().filter(|x| x.threads == k).collect();
            let med = |v: Vec<f64>| Repeated::of(&v).map(|r| r.median);
            Some((
                med(of_k.iter().map(ServerRun::rate).collect())?,
                med(of_k.iter().map(ServerRun::cpu_us).collect())?,
                med(of_k.iter().map(|x| x.cores(nproc).1).collect())?,
            ))
        };
        let k = plan.loops.max(1);
        if let (true, Some((r1, c1, _)), Some((rk, ck, idle))) = (k > 1, of(1), of(k)) {
            r.bullet(&format!(
                "{}: {k} tasks accept {:.2}× as many tokens per second as one ({} → {}) at {c1:.0} → {ck:.0} CPU-µs each, with {idle:.2} cores idle: part of each accept waits on something serialised — a lock inside libkrb5, or the replay cache file, which every accept opens, locks and writes (not identified further).",
                mode_name(m.mutual),
                rk / r1,
                fmt_count(r1),
                fmt_count(rk),
            ));
        }
    }
}

/// Where one attestation's CPU goes, with the whole-attestation rate: the bound.
fn b5_bounds(r: &mut Report, modes: &[ModeResult], nproc: usize) {
    for m in modes {
        let (Ok(seq), Ok(server)) = (&m.sequential, &m.server) else {
            continue;
        };
        let Some(server_cpu) = server_cpu_of(server) else {
            continue;
        };
        let agent = mean_us(&seq.samples, kerberos::Phases::agent_cpu);
        let kdc = seq.kdc_cpu.map(|k| per_attestation_us(seq, k));
        let best = m.throughput.as_ref().map_or(f64::NAN, |runs| {
            runs.iter().map(LoopRun::rate).fold(f64::NAN, f64::max)
        });
        r.bullet(&format!(
            "**{}: per attestation the server spends {server_cpu:.0} µs of CPU (~{} attestations/s per core), the agent half {} (libkrb5 client: keytab, two KDC exchanges, the token{}), krb5kdc {}{}.** Whole attestations reached at most {} per second here, with all three on the same {nproc} cores, the server's share of their CPU being {}. In a deployment the agents run on their own hosts and the realm's KDCs (or domain controllers) elsewhere: what the Carapace server pays per Kerberos attestation is the {server_cpu:.0} µs.",
            mode_name(m.mutual),
            fmt_count(1e6 / server_cpu),
            fmt_us(agent),
            if m.mutual { ", the AP-REP check" } else { "" },
            kdc.map_or("not measured".into(), fmt_us),
            match kdc {
                Some(k) if k > 0.0 => format!(
                    " (one single-threaded krb5kdc process issues both tickets for at most ~{} attestations/s)",
                    fmt_count(1e6 / k)
                ),
                _ => String::new(),
            },
            fmt_count(best),
            fmt_pct(server_cpu / (server_cpu + agent + kdc.unwrap_or(0.0))),
        ));
    }
    // Median and range of the server CPU per attestation over every run of a mode.
    let cpu_of = |mutual: bool| {
        let runs = modes
            .iter()
            .find(|m| m.mutual == mutual)
            .and_then(|m| m.server.as_ref().ok())?;
        Repeated::of(&runs.iter().map(ServerRun::cpu_us).collect::<Vec<_>>())
    };
    if let (Some(on), Some(off)) = (cpu_of(true), cpu_of(false)) {
        let overlap = on.min <= off.max && off.min <= on.max;
        let why = if overlap {
            "the two settings' runs overlap, so the AP-REP (one more encryption in the session key) and the confirmation message cost less than the run-to-run noise"
        } else if on.median > off.median {
            "the AP-REP (one more encryption in the session key) and the confirmation message"
        } else {
            "less with mutual authentication, although the server does more with it (the AP-REP and one more message). Carapace's server code takes the same path for both tokens (plus the confirmation step), so the difference is inside MIT's `gss_accept_sec_context`; its cause was not investigated"
        };
        r.bullet(&format!(
            "Server CPU per attestation with mutual authentication {:.0} µs (runs {:.0}–{:.0}), without {:.0} µs (runs {:.0}–{:.0}), {:+.0} µs: {why}.",
            on.median,
            on.min,
            on.max,
            off.median,
            off.min,
            off.max,
            on.median - off.median,
        ));
    }
}

fn b5_anchors(r: &mut Report, modes: &[ModeResult]) {
    r.bullet("PERFORMANCE.md sets no Kerberos figure or target (S6 names join tokens and TPM; SPIRE caps node attestation at 1/s per source IP): there is no goal to meet or miss here.");
    let Some(seq) = modes
        .iter()
        .find(|m| m.mutual)
        .and_then(|m| m.sequential.as_ref().ok())
    else {
        return;
    };
    let p50 = |f: KrbPhaseOf| {
        Summary::of_durations_us(&seq.samples.iter().map(f).collect::<Vec<_>>())
            .map_or(f64::NAN, |s| s.p50)
    };
    let total = p50(|p| p.total);
    r.bullet(&format!(
        "LAB.md §5.3 (libgssapi 0.11, client and server in separate processes, one-shot): client `acquire` with the AS-REQ 5–6 ms, `init_sec_context` with the TGS-REQ 1.5 ms, server acquire + accept 0.9 ms (5 ms when the replay cache file is new). Here, mutual auth: the agent's `answer()` to the nonce (both KDC requests and the token) p50 {}, the server's `respond()` to the token p50 {}, the whole attestation p50 {}. LAB.md's figures are one-shot, each in a fresh process; here libkrb5 is warm after the warm-up attestation. LAB.md's in-process loop with cached tickets (no KDC traffic) took 0.29 ms per handshake (median): asking the KDC for fresh tickets at every attestation makes one {:.0}× as long.",
        fmt_us(p50(|p| p.token)),
        fmt_us(p50(|p| p.accept)),
        fmt_us(total),
        total / 290.0,
    ));
}

/// B5's report.
fn b5_section(r: &mut Report, b5: &B5, plan: &KrbPlan, nproc: usize) {
    let out = &b5.run.output;
    let first = out.modes.iter().find(|m| m.agent_path.is_some());
    let requests = out
        .modes
        .iter()
        .filter_map(|m| m.sequential.as_ref().ok())
        .find_map(LoopRun::kdc_requests_per_attestation);
    r.para(&format!(
        "{}: a throwaway realm {} (carapace-hsm-sim's `Kdc`: its own directory, database and profiles, one `krb5kdc -n` process on a free 127.0.0.1 port) with `host/node1.lab.test` and `carapace/server.lab.test` and their keytabs, set up in {}. Clients reach the KDC over TCP (the lab's `krb5.conf` has `udp_preference_limit = 1`). The measurement runs in a child process (`carapace-bench --kerberos-child`) started with the realm's `KRB5_CONFIG`, `KRB5_KDC_PROFILE` and `KRB5RCACHEDIR`, because libkrb5 reads them from the environment. In it both halves of the `kerberos` plugin run on one tokio runtime ({} workers; libkrb5 runs on its blocking threads), as in `attestor-kerberos/tests/realm.rs`: the agent half `KerberosAttestorClient` (host keytab, principal `host/node1.lab.test@LAB.TEST`) and one server half `KerberosAttestor` (service keytab, `allowed_realms = [\"LAB.TEST\"]`, its `file2:` replay cache in a temporary data directory{}; it keeps every authenticator seen within the clock skew, 5 minutes); no gRPC between them. Each attestation is one simulated connection: 32 random bytes as the TLS exporter, the same on both halves. Result: agent path `{}`, selectors {}; the token answer is {} bytes of JSON. Load average when B5 started: {}.",
        b5.krb5,
        kerberos::REALM,
        secs(b5.run.setup),
        out.workers,
        out.rcache_bytes
            .map(|b| format!(", {} at the end", fmt_bytes(b as f64)))
            .unwrap_or_default(),
        first.and_then(|m| m.agent_path.as_deref()).unwrap_or("—"),
        first
            .map(|m| m
                .selectors
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        first
            .and_then(|m| m.answer_bytes)
            .map_or("—".into(), |b| b.to_string()),
        b5.loadavg,
    ));
    r.para(&format!(
        "**Every attestation acquires fresh credentials from the keytab, by design:** the agent half opens a private `MEMORY:` credential cache per attestation, so each attestation sends an AS-REQ (a TGT from the host keytab) and a TGS-REQ (a ticket for the server's principal) to the KDC before it builds its token{}. **The KDC runs on the same {nproc} cores** as both halves of the plugin; its CPU is shown separately.",
        match requests {
            Some((a, t)) => format!(" (the KDC's log: {a:.2} AS-REQ and {t:.2} TGS-REQ per attestation)"),
            None => String::new(),
        }
    ));

    for m in &out.modes {
        r.heading(
            3,
            &format!("Whole attestation, sequential, {}", mode_name(m.mutual)),
        );
        r.para(&format!(
            "{} attestations one after the other with one agent client, after one untimed warm-up; each call timed: wall time, and this process's CPU time across the call (`CLOCK_PROCESS_CPUTIME_ID`: with one attestation in flight it is the call's own work on every thread, libkrb5 on the blocking thread included, but not the KDC's).",
            plan.attestations
        ));
        match &m.sequential {
            Ok(run) => b5_sequential(r, run, m.mutual),
            Err(e) => failed(r, "sequential attestations", &anyhow!("{e}")),
        }
    }

    r.heading(
        3,
        &format!(
            "Attestations per second: 1 and {} concurrent loops, one server",
            plan.loops.max(1)
        ),
    );
    r.para(&format!(
        "Each run: one untimed warm-up attestation per loop, then {} attestations per loop, each loop with its own agent client attesting one after the other in its own tokio task, all against the same `KerberosAttestor`. {} run(s) per loop count and setting, interleaved (the two settings alternate which goes first). Latency: the whole attestation. CPU: this process (`CLOCK_PROCESS_CPUTIME_ID`) and krb5kdc (`/proc/<pid>/task/*/schedstat`, nanoseconds) over the run; cores: average cores used by this process and krb5kdc / idle (`/proc/stat`) / taken by other processes or hypervisor steal, out of {nproc}.",
        plan.per_loop, plan.runs
    ));
    b5_throughput(r, &out.modes, plan, nproc);
    for m in &out.modes {
        if let Err(e) = &m.throughput {
            failed(
                r,
                &format!("throughput, {}", mode_name(m.mutual)),
                &anyhow!("{e}"),
            );
        }
    }

    r.heading(3, "Server alone: accepting captured tokens");
    r.para(&format!(
        "In each run, {} attestations are first carried up to the agent's token answer (each with its own nonce and connection, so each token is fresh and valid once), then the server's `respond()` accepts them all on 1 or {} tokio tasks with nothing else in flight and the KDC idle: acceptor credentials from the keytab, `gss_accept_sec_context`, the replay cache, the checks; with mutual auth also the AP-REP and the confirmation step (the agent's check of the AP-REP left out). CPU: `CLOCK_PROCESS_CPUTIME_ID` over the run, per token. {} run(s) per task count and setting, interleaved (the two settings alternate which goes first).",
        plan.server_tokens,
        plan.loops.max(1),
        plan.server_runs
    ));
    b5_server(r, &out.modes, plan, nproc);
    for m in &out.modes {
        if let Err(e) = &m.server {
            failed(
                r,
                &format!("server alone, {}", mode_name(m.mutual)),
                &anyhow!("{e}"),
            );
        }
    }
    b5_bounds(r, &out.modes, nproc);

    r.heading(3, "Against the anchors");
    b5_anchors(r, &out.modes);
}

/// B6 figures of one setting (agent, loops) over all its runs.
#[derive(Debug, Clone)]
struct B6Setting {
    rate: Option<Repeated>,
    first: Option<Summary>,
    connect: Option<Summary>,
    agent_us: f64,
    client_us: f64,
    cores: (f64, f64, f64, f64),
    errors: usize,
    first_error: Option<String>,
}

impl B6Setting {
    fn of(runs: &[&ConnRun], nproc: usize) -> Option<B6Setting> {
        if runs.is_empty() {
            return None;
        }
        let med = |v: Vec<f64>| Repeated::of(&v).map_or(f64::NAN, |r| r.median);
        let samples: Vec<Duration> = runs
            .iter()
            .flat_map(|r| r.samples.iter().copied())
            .collect();
        let connect: Vec<Duration> = runs
            .iter()
            .flat_map(|r| r.connect.iter().copied())
            .collect();
        let cores: Vec<(f64, f64, f64, f64)> = runs.iter().map(|r| r.cores(nproc)).collect();
        Some(B6Setting {
            rate: Repeated::of(&runs.iter().map(|r| r.rate()).collect::<Vec<_>>()),
            first: Summary::of_durations_us(&samples),
            connect: Summary::of_durations_us(&connect),
            agent_us: med(runs.iter().map(|r| r.agent_us()).collect()),
            client_us: med(runs.iter().map(|r| r.client_us()).collect()),
            cores: (
                med(cores.iter().map(|c| c.0).collect()),
                med(cores.iter().map(|c| c.1).collect()),
                med(cores.iter().map(|c| c.2).collect()),
                med(cores.iter().map(|c| c.3).collect()),
            ),
            errors: runs.iter().map(|r| r.errors).sum(),
            first_error: runs.iter().find_map(|r| r.first_error.clone()),
        })
    }

    fn rate(&self) -> f64 {
        self.rate.map_or(f64::NAN, |r| r.median)
    }

    fn p50(&self) -> f64 {
        self.first.map_or(f64::NAN, |s| s.p50)
    }

    fn p99(&self) -> f64 {
        self.first.map_or(f64::NAN, |s| s.p99)
    }
}

/// The setting of agent `target` with `loops` client loops.
fn b6_setting(
    c: &workload_attest::Connections,
    target: usize,
    loops: usize,
    nproc: usize,
) -> Option<B6Setting> {
    B6Setting::of(&c.output.runs_of(target, loops), nproc)
}

/// `sleep` (`/usr/bin/sleep`, 42.9 KiB, cgroup `/x`).
fn b6_caller_cell(ip: &InProcess, label: Option<&str>) -> String {
    match label.and_then(|l| ip.caller(l)) {
        Some(c) => format!(
            "`{}` ({}, {})",
            c.exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            fmt_bytes(c.exe_bytes as f64),
            if c.cgroup == "/" {
                "cgroup `/`".to_owned()
            } else {
                format!("cgroup `{}`", c.cgroup)
            }
        ),
        None => "—".into(),
    }
}

fn b6_in_process(r: &mut Report, ip: &InProcess, plan: &AttestPlan) {
    use workload_attest::OpKind;
    r.para(&format!(
        "The agent's own attestors (`carapace_agent::workload_api`) called in a loop in this process ({} tokio workers; the loop runs in a spawned task, as the agent's request handlers do), {} timed calls per row after {} untimed ones ({} for the large executable), on idle caller processes: `{}` (pid {}) and this executable sleeping (`carapace-bench {}`, pid {}). Each attestor reads `/proc/<pid>` on tokio's blocking pool (`spawn_blocking`). Wall time per call; CPU: this process's `CLOCK_PROCESS_CPUTIME_ID` over the loop divided by the calls (it includes the blocking threads and the runtime's wake-ups). The last row is what the agent runs for every Workload API request: the three attestors one after the other within `workload_attestation_timeout`, then the pidfd check.",
        ip.workers,
        fmt_count(plan.iterations as f64),
        plan.warmup,
        plan.big_iterations,
        ip.small.exe.display(),
        ip.small.pid,
        workload_attest::CALLER_FLAG,
        ip.big.pid,
    ));
    let mut t = Table::new([
        "call",
        "caller (executable, size, cgroup)",
        "calls",
        "p50",
        "p99",
        "max",
        "mean",
        "CPU-µs per call",
        "selectors",
    ]);
    for o in &ip.ops {
        let [p50, p99, max, mean] = lat_cells(&o.samples);
        t.row([
            o.label.clone(),
            b6_caller_cell(ip, o.caller.as_deref()),
            fmt_count(o.samples.len() as f64),
            p50,
            p99,
            max,
            mean,
            format!("{:.1}", o.cpu_us()),
            if o.kind.attests() {
                o.selectors.len().to_string()
            } else {
                "—".to_owned()
            },
        ]);
    }
    r.table(&t);
    if let Some(all) = ip.op(OpKind::All) {
        r.bullet(&format!(
            "Selectors of the last row (the union of the three attestors): {}.",
            all.selectors
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let (Some(u), Some(c), Some(s), Some(all)) = (
        ip.op(OpKind::Unix),
        ip.op(OpKind::Cgroups),
        ip.op(OpKind::Systemd),
        ip.op(OpKind::All),
    ) {
        let sum = u.p50_us() + c.p50_us() + s.p50_us();
        let sum_cpu = u.cpu_us() + c.cpu_us() + s.cpu_us();
        let pidfd = ip.op(OpKind::Pidfd);
        r.bullet(&format!(
            "The three attestors one after the other plus the pidfd check: p50 {} and {:.1} CPU-µs, against {} and {:.1} CPU-µs for the three rows alone added up{}.",
            fmt_us(all.p50_us()),
            all.cpu_us(),
            fmt_us(sum),
            sum_cpu,
            pidfd
                .map(|p| format!(
                    " (the pidfd check alone: p50 {}, {:.1} CPU-µs)",
                    fmt_us(p.p50_us()),
                    p.cpu_us()
                ))
                .unwrap_or_default()
        ));
    }
    if let (Some(sb), Some(reads), Some(u)) = (
        ip.op(OpKind::SpawnBlocking),
        ip.op(OpKind::ProcReads),
        ip.op(OpKind::Unix),
    ) {
        r.bullet(&format!(
            "Each attestor hands its reads to tokio's blocking pool: an empty `spawn_blocking` round trip alone takes p50 {} and {:.1} CPU-µs here (wake a blocking thread, wake this task again), paid once per attestor, three times per request with three attestors. The `/proc` reads alone on the calling thread (readlink `exe`, `status`, `cgroup`) take p50 {}; `unix` also parses `/etc/passwd` and `/etc/group` on every call (p50 {} in all).",
            fmt_us(sb.p50_us()),
            sb.cpu_us(),
            fmt_us(reads.p50_us()),
            fmt_us(u.p50_us()),
        ));
    }
    if let (Some(s), Some(n)) = (ip.op(OpKind::Systemd), ip.op(OpKind::SystemdNoUnit)) {
        r.bullet(&format!(
            "`systemd` on a caller in a unit (selectors unit, slice and invocation ID; one `getxattr` on the unit's cgroup) p50 {}, on a caller in no unit (no selectors; only `/proc/<pid>/cgroup` parsed) p50 {}.",
            fmt_us(s.p50_us()),
            fmt_us(n.p50_us()),
        ));
    }
    let u = ip.op(OpKind::Unix).map(|o| o.p50_us());
    for (kind, c) in [
        (OpKind::UnixSha256Small, &ip.small),
        (OpKind::UnixSha256Big, &ip.big),
    ] {
        let (Some(o), Some(u)) = (ip.op(kind), u) else {
            continue;
        };
        let extra = (o.p50_us() - u).max(f64::EPSILON);
        let mib = c.exe_bytes as f64 / (1024.0 * 1024.0);
        r.bullet(&format!(
            "`workload_sha256 = true` on `{}` ({}): p50 {}, {} more than without: the executable is opened, read and hashed in full on every request (from the page cache){}.",
            c.exe.display(),
            fmt_bytes(c.exe_bytes as f64),
            fmt_us(o.p50_us()),
            fmt_us(extra),
            if mib >= 1.0 {
                format!(
                    ", {} MiB/s: the cost grows linearly with the executable's size, {} per MiB",
                    fmt_count(mib / (extra / 1e6)),
                    fmt_us(extra / mib)
                )
            } else {
                String::new()
            },
        ));
    }
}

fn b6_connections(
    r: &mut Report,
    c: &workload_attest::Connections,
    plan: &AttestPlan,
    nproc: usize,
) {
    r.para(&format!(
        "One release `carapace-server` and {} release `carapace-agent`s (join tokens, their own data dirs and sockets), started with `--config` holding only their `[workload_attestor.*]` sections (below; `workload_attestation_timeout` default 5 s), each with one entry for the client. The client is a child process (`carapace-bench {}`, {} tokio workers, cgroup `{}`): each client loop opens a new Unix-socket connection (a new tonic channel), sends FetchX509SVID with `workload.spiffe.io: true`, waits for the first message (one X509-SVID with its key and the bundle), closes the connection and starts the next one at once. {} run(s) of {} s per setting, interleaved (the order rotates from run to run), after {} untimed connections per agent. Latency: connect start → first message, over every connection of every run; connect: connect start → channel ready (Unix `connect` and the client's HTTP/2 set-up, which does not wait for the agent). Agent CPU from `/proc/<pid>/stat` (10 ms ticks) over each run; client CPU: the child's `CLOCK_PROCESS_CPUTIME_ID`; cores: agent / client / idle (`/proc/stat`) / others, out of {nproc}.",
        c.setups.len(),
        workload_attest::CHILD_FLAG,
        c.output.workers,
        c.output.cgroup,
        plan.runs,
        plan.seconds,
        plan.warmup_connections,
    ));
    let mut t = Table::new([
        "agent's workload attestors",
        "client loops",
        "connections/s: median (range, runs)",
        "first response p50",
        "p99",
        "p99.9",
        "connect p50",
        "agent CPU-µs per connection (median)",
        "client CPU-µs per connection",
        "cores: agent / client / idle / others",
        "connections (errors)",
    ]);
    for (i, s) in c.setups.iter().enumerate() {
        for &loops in &s.loops {
            let Some(x) = b6_setting(c, i, loops, nproc) else {
                continue;
            };
            let n: usize = c
                .output
                .runs_of(i, loops)
                .iter()
                .map(|r| r.samples.len())
                .sum();
            t.row([
                s.label.clone(),
                loops.to_string(),
                x.rate.map(|r| r.fmt_count()).unwrap_or_default(),
                x.first.map(|f| fmt_us(f.p50)).unwrap_or_default(),
                x.first.map(|f| fmt_us(f.p99)).unwrap_or_default(),
                x.first.map(|f| fmt_us(f.p999)).unwrap_or_default(),
                x.connect.map(|f| fmt_us(f.p50)).unwrap_or_default(),
                fmt_count(x.agent_us),
                fmt_count(x.client_us),
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2}",
                    x.cores.0, x.cores.1, x.cores.2, x.cores.3
                ),
                match &x.first_error {
                    Some(e) if x.errors > 0 => {
                        format!("{} ({} errors; first: {e})", fmt_count(n as f64), x.errors)
                    }
                    _ => format!("{} (0)", fmt_count(n as f64)),
                },
            ]);
        }
    }
    r.table(&t);
    for (i, s) in c.setups.iter().enumerate() {
        r.bullet(&format!(
            "{}: `{}`; entry selectors {}; agent VmRSS at the end {}.",
            s.label,
            s.config.trim().replace('\n', " "),
            s.entry_selectors
                .iter()
                .map(|x| format!("`{x}`"))
                .collect::<Vec<_>>()
                .join(" + "),
            c.agent_rss
                .get(i)
                .map(|b| fmt_bytes(*b as f64))
                .unwrap_or_default(),
        ));
    }
    let main = c.setups.first();
    if let (Some(main), Some(one)) = (main, b6_setting(c, 0, 1, nproc)) {
        for &k in main.loops.iter().filter(|&&k| k > 1) {
            let Some(many) = b6_setting(c, 0, k, nproc) else {
                continue;
            };
            let cpu = many.agent_us + many.client_us;
            let ceiling = nproc as f64 * 1e6 / cpu.max(f64::EPSILON);
            r.bullet(&format!(
                "{k} client loops: {:.2}× the connections/s of one (at most {}× on {nproc} cores), p50 {} → {}. Agent + client CPU per connection {:.0} µs: at that cost {nproc} cores allow at most {} connections/s; {k} loops reached {} of it with {:.2} cores idle.",
                many.rate() / one.rate(),
                k.min(nproc),
                fmt_us(one.p50()),
                fmt_us(many.p50()),
                cpu,
                fmt_count(ceiling),
                fmt_pct(many.rate() / ceiling),
                many.cores.2,
            ));
        }
    }
}

/// What share of a connection is attestation.
fn b6_shares(r: &mut Report, b6: &B6Result, nproc: usize, b2: Option<Summary>) {
    use workload_attest::OpKind;
    let (Ok(ip), Ok(c)) = (&b6.in_process, &b6.connections) else {
        r.para("Not computed: a part above failed.");
        return;
    };
    let (Some(all), Some(one)) = (ip.op(OpKind::All), b6_setting(c, 0, 1, nproc)) else {
        r.para("Not computed: a row is missing.");
        return;
    };
    let rest = one.agent_us - all.cpu_us();
    r.bullet(&format!(
        "**Attestation is {} of the agent's CPU per connection and {} of the first response's p50** (one client loop, `unix` + `cgroups` + `systemd`): per request the three attestors and the pidfd check take {:.0} CPU-µs and p50 {} in process, while the agent spends {:.0} CPU-µs per connection and the client sees the first message after p50 {}. The other {:.0} µs of agent CPU are the connection itself, none of it TLS: `accept`, `SO_PEERCRED` and `SO_PEERPIDFD`, HTTP/2 (preface, SETTINGS, HEADERS, stream set-up and tear-down), tonic and the security header, the cache lookup, the SVID response's protobuf (certificate chain, private key, bundle) and the close. The client spends {:.0} CPU-µs per connection on its side.",
        fmt_pct(all.cpu_us() / one.agent_us),
        fmt_pct(all.p50_us() / one.p50()),
        all.cpu_us(),
        fmt_us(all.p50_us()),
        one.agent_us,
        fmt_us(one.p50()),
        rest,
        one.client_us,
    ));
    if let (Some(u), Some(cg), Some(sd)) = (
        b6_setting(c, 1, 1, nproc),
        ip.op(OpKind::Cgroups),
        ip.op(OpKind::Systemd),
    ) {
        let (d_cpu, d_p50) = (one.agent_us - u.agent_us, one.p50() - u.p50());
        let (in_cpu, in_p50) = (cg.cpu_us() + sd.cpu_us(), cg.p50_us() + sd.p50_us());
        r.bullet(&format!(
            "In the real agent, `cgroups` + `systemd` on top of `unix` cost {d_cpu:+.0} agent CPU-µs per connection ({:.0} → {:.0}) and {} at p50 ({} → {}), connections/s {} → {} (one loop); in process the same two attestors take {in_cpu:.0} CPU-µs and p50 {} + {}. In the agent they cost {:.1}× their in-process CPU and {:.1}× their in-process latency{}. Agent CPU comes in 10 ms ticks and the runs differ by a few %: differences of a few µs are noise.",
            u.agent_us,
            one.agent_us,
            fmt_us_signed(d_p50),
            fmt_us(u.p50()),
            fmt_us(one.p50()),
            fmt_count(u.rate()),
            fmt_count(one.rate()),
            fmt_us(cg.p50_us()),
            fmt_us(sd.p50_us()),
            d_cpu / in_cpu.max(f64::EPSILON),
            d_p50 / in_p50.max(f64::EPSILON),
            if d_cpu > 1.2 * in_cpu {
                ": the in-process loop repeats one attestor with warm caches and a busy blocking thread, while in the agent each request meets caches the connection's HTTP/2 work has just used and threads that may have parked (a plausible reading, not measured)"
            } else {
                ""
            },
        ));
        let ratio = d_cpu / in_cpu.max(f64::EPSILON);
        if ratio > 1.2 {
            r.bullet(&format!(
                "Scaling the whole request's attestation by that factor ({:.0} × {ratio:.1} ≈ {:.0} CPU-µs) makes it {} of the agent's CPU per connection: attestation takes between {} (its in-process cost) and about {} (scaled by the in-agent marginal cost) of what one connection costs an otherwise idle agent.",
                all.cpu_us(),
                all.cpu_us() * ratio,
                fmt_pct(all.cpu_us() * ratio / one.agent_us),
                fmt_pct(all.cpu_us() / one.agent_us),
                fmt_pct((all.cpu_us() * ratio / one.agent_us).min(1.0)),
            ));
        }
        let most = c.setups.first().and_then(|s| s.loops.iter().copied().max());
        if let Some(k) = most.filter(|&k| k > 1)
            && let (Some(full_k), Some(unix_k)) =
                (b6_setting(c, 0, k, nproc), b6_setting(c, 1, k, nproc))
        {
            r.bullet(&format!(
                "With {k} loops (requests queued, wake-ups shared): {} → {} agent CPU-µs per connection for `unix` alone → all three ({:+.0} µs for `cgroups` + `systemd`), {} → {} connections/s ({:+.1} %).",
                fmt_count(unix_k.agent_us),
                fmt_count(full_k.agent_us),
                full_k.agent_us - unix_k.agent_us,
                fmt_count(unix_k.rate()),
                fmt_count(full_k.rate()),
                (full_k.rate() / unix_k.rate() - 1.0) * 100.0,
            ));
        }
    }
    let settings: Vec<B6Setting> = c
        .setups
        .first()
        .map(|s| {
            s.loops
                .iter()
                .filter_map(|&k| b6_setting(c, 0, k, nproc))
                .collect()
        })
        .unwrap_or_default();
    if let (Some(first), Some(last)) = (settings.first(), settings.last())
        && last.agent_us < 0.85 * first.agent_us
    {
        r.bullet(&format!(
            "The agent's CPU per connection falls with load ({} CPU-µs with one loop, {} with the most): with one connection at a time its runtime goes idle between requests and pays for parking and waking its threads (and the blocking threads of the attestors) on every connection; under load that cost is shared. The single-loop share above is therefore the share of an agent that is mostly idle.",
            fmt_count(first.agent_us),
            fmt_count(last.agent_us),
        ));
    }
    if let (Some(s), Some(big), Some(u)) = (
        b6_setting(c, 2, 1, nproc),
        ip.op(OpKind::UnixSha256Big),
        ip.op(OpKind::Unix),
    ) {
        r.bullet(&format!(
            "`workload_sha256 = true` with the client being `{}` ({}): {} connections/s, first response p50 {}, {} agent CPU-µs per connection ({:.0}× the configuration without it). In process, hashing that executable adds p50 {} per request: with `unix:sha256` a large workload binary, not the connection, sets the cost.",
            ip.big.exe.display(),
            fmt_bytes(ip.big.exe_bytes as f64),
            fmt_count(s.rate()),
            fmt_us(s.p50()),
            fmt_count(s.agent_us),
            s.agent_us / one.agent_us.max(f64::EPSILON),
            fmt_us(big.p50_us() - u.p50_us()),
        ));
    }
    if let Some(b2) = b2 {
        r.bullet(&format!(
            "B2 in this invocation (agent with `unix` only, 1 client; the connection stays open until the round ends and the next round starts 2 ms later, so both runtimes go idle between connections): first response p50 {} / p99 {}. B6 with one loop against the `unix`-only agent (the next connection at once): p50 {} / p99 {}.",
            fmt_us(b2.p50),
            fmt_us(b2.p99),
            b6_setting(c, 1, 1, nproc).map_or("n/a".into(), |x| fmt_us(x.p50())),
            b6_setting(c, 1, 1, nproc).map_or("n/a".into(), |x| fmt_us(x.p99())),
        ));
    }
}

/// `+12 µs` / `-3 µs`.
fn fmt_us_signed(us: f64) -> String {
    if us < 0.0 {
        format!("-{}", fmt_us(-us))
    } else {
        format!("+{}", fmt_us(us))
    }
}

fn b6_anchors(r: &mut Report, b6: &B6Result, nproc: usize) {
    use workload_attest::OpKind;
    if let Ok(c) = &b6.connections {
        let levels: Vec<(usize, B6Setting)> = c
            .setups
            .first()
            .map(|s| {
                s.loops
                    .iter()
                    .filter_map(|&k| b6_setting(c, 0, k, nproc).map(|x| (k, x)))
                    .collect()
            })
            .unwrap_or_default();
        let met = |x: &B6Setting| if x.p99() < 1_000.0 { "met" } else { "not met" };
        r.bullet(&format!(
            "**Goal first response p99 < 1 ms (PERFORMANCE.md §0), on new connections with `unix` + `cgroups` + `systemd`:** {}. With more loops than the {nproc} cores the latency includes queueing for a core.",
            levels
                .iter()
                .map(|(k, x)| format!(
                    "{k} loop{}: p99 {} (**{}**)",
                    if *k == 1 { "" } else { "s" },
                    fmt_us(x.p99()),
                    met(x)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));
        if let Some((_, one)) = levels.first() {
            r.bullet(&format!(
                "SPIRE 1.15.3 (§0, same kind of machine): first response on a new connection p50 ≈ 2.9 ms, p99 ≈ 5 ms. Here, one loop: p50 {} ({:.1}× lower), p99 {} ({:.1}× lower). §3.5's derived floor for a first response with the unix attestor is ≈ 0.2 ms (30 µs connect + 40 µs `/proc` + ~140 µs gRPC).",
                fmt_us(one.p50()),
                2_900.0 / one.p50(),
                fmt_us(one.p99()),
                5_000.0 / one.p99(),
            ));
            r.bullet(&format!(
                "Connections per second: S2 asks for \"a steady loop of new connections\"; PERFORMANCE.md sets no target and SPIRE publishes no figure, so nothing is met or missed. For scale: §3.5's tonic unary round trip on one open UDS connection, 1 in flight, 6,200–7,000 rpc/s; here a new connection per request, {} connections/s with one loop{}.",
                fmt_count(one.rate()),
                levels
                    .iter()
                    .map(|(_, x)| x.rate())
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                    .map(|best| format!(", at most {} with more loops", fmt_count(best)))
                    .unwrap_or_default()
            ));
        }
    }
    if let Ok(ip) = &b6.in_process
        && let (Some(reads), Some(u)) = (ip.op(OpKind::ProcReads), ip.op(OpKind::Unix))
    {
        r.bullet(&format!(
            "§3.5 measured the unix attestation's `/proc` reads in C at 39–42 µs per connection (`status`, `stat`, readlink and stat of `exe`). Here the reads the attestors make, alone: p50 {}; the whole `unix` attestor (with `/etc/passwd`, `/etc/group` and the blocking-pool hand-off): p50 {}.",
            fmt_us(reads.p50_us()),
            fmt_us(u.p50_us()),
        ));
    }
}

/// B6's report.
fn b6_section(r: &mut Report, b6: &B6Result, plan: &AttestPlan, nproc: usize, b2: Option<Summary>) {
    r.para(&match &b6.unit {
        Ok(u) => format!(
            "Every caller and the client child run in a unit-like cgroup `{}` (cgroup v2, made by this benchmark and removed at the end) whose `trusted.invocation_id` xattr holds a random 128-bit ID, as systemd makes for a service: the `systemd` attestor finds unit `{}`, slice `{}` and the invocation ID, the `cgroups` attestor the path. The entries of the agents with the `systemd` attestor require `systemd:unit:{}`, so every counted connection was attested through it.",
            u.path, u.unit, u.slice, u.unit
        ),
        Err(e) => format!(
            "No unit cgroup could be made ({e}): the callers and the client run in this process's cgroup, where the `systemd` attestor finds no unit (it then only parses `/proc/<pid>/cgroup`) and the entries require `unix:uid` only."
        ),
    });
    r.heading(
        3,
        "In process: the agent's attestors on a real caller, no gRPC",
    );
    match &b6.in_process {
        Ok(ip) => b6_in_process(r, ip, plan),
        Err(e) => failed(r, "in-process attestation", e),
    }
    r.heading(
        3,
        "Through the real agent: Workload API connections per second",
    );
    match &b6.connections {
        Ok(c) => b6_connections(r, c, plan, nproc),
        Err(e) => failed(r, "Workload API connections", e),
    }
    r.heading(3, "Where a connection's time and CPU go");
    b6_shares(r, b6, nproc, b2);
    r.heading(3, "Against the anchors");
    b6_anchors(r, b6, nproc);
}

fn failed(r: &mut Report, what: &str, e: &anyhow::Error) {
    r.para(&format!("**{what} FAILED:**"));
    r.code(&format!("{e:#}"));
}

/// The benchmark was stopped by a signal.
#[derive(Debug)]
struct Interrupted(&'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Completes with `fut`, or fails when SIGINT or SIGTERM arrives: the future is then
/// dropped, and with it the guards that stop the server and agent it started.
async fn interruptible<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut t) => {
                t.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = fut => r,
        _ = tokio::signal::ctrl_c() => Err(Interrupted("SIGINT").into()),
        _ = term => Err(Interrupted("SIGTERM").into()),
    }
}

/// `git describe --always --dirty` of the working directory, if it is a checkout.
fn revision() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some(hsm::RAW_MODE_FLAG) {
        let args = hsm::RawArgs::parse(std::env::args().skip(2))?;
        println!("{}", serde_json::to_string(&hsm::raw_child(&args)?)?);
        return Ok(());
    }
    if std::env::args().nth(1).as_deref() == Some(kerberos::CHILD_FLAG) {
        let json = std::env::args()
            .nth(2)
            .ok_or_else(|| anyhow!("{} needs its JSON argument", kerberos::CHILD_FLAG))?;
        let args: kerberos::ChildArgs = serde_json::from_str(&json)
            .with_context(|| format!("{}: arguments", kerberos::CHILD_FLAG))?;
        println!("{}", serde_json::to_string(&kerberos::child(&args)?)?);
        return Ok(());
    }
    if std::env::args().nth(1).as_deref() == Some(workload_attest::CHILD_FLAG) {
        let json = std::env::args()
            .nth(2)
            .ok_or_else(|| anyhow!("{} needs its JSON argument", workload_attest::CHILD_FLAG))?;
        let args: workload_attest::ChildArgs = serde_json::from_str(&json)
            .with_context(|| format!("{}: arguments", workload_attest::CHILD_FLAG))?;
        println!(
            "{}",
            serde_json::to_string(&workload_attest::child(&args)?)?
        );
        return Ok(());
    }
    if std::env::args().nth(1).as_deref() == Some(workload_attest::CALLER_FLAG) {
        // An idle workload for B6's attestors; stopped by pid when B6 ends.
        std::thread::sleep(workload_attest::CALLER_SLEEP);
        return Ok(());
    }
    let args = parse_args()?;
    let plan = Plan::new(args.quick);
    let machine = Machine::detect();
    let (nofile_before, nofile_after) = harness::raise_nofile_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::Builder::new()
        .prefix("carapace-bench-")
        .tempdir()?;
    let run_b1 = args.only.as_deref().is_none_or(|o| o == "b1");
    let run_b2 = args.only.as_deref().is_none_or(|o| o == "b2");
    let run_b3 = args.only.as_deref().is_none_or(|o| o == "b3");
    let run_b4 = args.only.as_deref().is_none_or(|o| o == "b4");
    let run_b5 = args.only.as_deref().is_none_or(|o| o == "b5");
    let run_b6 = args.only.as_deref().is_none_or(|o| o == "b6");
    let run_b7 = args.only.as_deref().is_none_or(|o| o == "b7");

    let mut r = Report::new();
    r.heading(1, "Carapace benchmark report");
    r.bullet(&format!(
        "Date (UTC): {}",
        humantime::format_rfc3339_seconds(SystemTime::now())
    ));
    r.bullet(&format!("Command: `{}`", args.command));
    r.bullet(&format!(
        "Source: `git describe --always --dirty` = {}",
        revision()
    ));
    r.bullet(&format!(
        "Mode: {}",
        if args.quick {
            "quick (reduced sizes, smoke run)"
        } else {
            "full"
        }
    ));
    r.bullet(&format!(
        "Machine: {} — nproc {} — kernel {} — load average at start {}",
        machine.cpu_model, machine.nproc, machine.kernel, machine.loadavg
    ));
    r.bullet(&format!(
        "Toolchain: {}; release build; binaries from `{}`",
        machine.rustc,
        args.bin_dir.display()
    ));
    r.bullet(&format!(
        "RLIMIT_NOFILE (soft) of the benchmark and its children: {} → {}",
        nofile_before.map_or("unlimited".into(), |v| v.to_string()),
        nofile_after.map_or("unlimited".into(), |v| v.to_string())
    ));
    r.bullet("Nothing is pinned: server or agent and the load generator (this process) share every core. Every figure comes from this one invocation (rows with a range: median and range of repeated runs); compare ratios taken in the same run.");

    let mut errors = Vec::new();
    // The CSRs of B1 and B3 (both send them over the node API).
    let csrs: Option<Result<Vec<Vec<u8>>>> = (run_b1 || run_b3).then(|| {
        eprintln!("==> generating {} P-256 CSRs", plan.csrs);
        crypto::generate_csrs(plan.csrs, machine.nproc)
    });
    let csrs_ok = || -> Result<&Vec<Vec<u8>>> {
        match &csrs {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => Err(anyhow!("generating the CSRs: {e:#}")),
            None => Err(anyhow!("no CSRs were generated")),
        }
    };
    // B1's node API result (software key) and crypto ceiling, shown again in B3.
    let mut b1_node: Option<NodeResult> = None;
    let mut b1_ceiling: Option<(f64, f64)> = None;
    if run_b1 {
        r.heading(
            2,
            "B1. X509-SVID issuance: crypto ceiling and node API (S1)",
        );
        let b1 = (|| -> Result<(Vec<Ceiling>, &Vec<Vec<u8>>)> {
            let csrs = csrs_ok()?;
            eprintln!(
                "==> B1: crypto ceiling (1 and {} threads, {} runs)",
                machine.nproc, plan.ceiling_runs
            );
            let (_ca, slot) = runtime.block_on(crypto::bench_ca())?;
            let c = crypto::measure(
                &slot,
                csrs,
                plan.node.entries,
                machine.nproc,
                plan.ceiling_runs,
            )?;
            Ok((c, csrs))
        })();
        let mut ceiling_all = None;
        let mut ceiling_one = None;
        r.heading(
            3,
            "Crypto ceiling (same process, the server's own functions)",
        );
        r.para("Per SVID: `carapace_server::ca::csr_public_key` (parse the PKCS#10 CSR, verify its P-256 signature) then `carapace_server::ca::sign_leaf` (build the leaf, sign it with the P-256 CA key of a `CaManager` over `Datastore::open_in_memory()` and `MemoryKeyManager`). CSRs pre-generated with rcgen like the agent's; std threads, each taking an equal share.");
        let csrs = match b1 {
            Ok((c, csrs)) => {
                ceiling_section(&mut r, &c);
                ceiling_one = c
                    .iter()
                    .find(|c| c.threads == 1)
                    .and_then(|c| Repeated::of(&c.rates))
                    .map(|x| x.median);
                ceiling_all = c
                    .iter()
                    .max_by_key(|c| c.threads)
                    .and_then(|c| Repeated::of(&c.rates))
                    .map(|x| x.median);
                b1_ceiling = ceiling_one.zip(ceiling_all);
                Some(csrs)
            }
            Err(e) => {
                failed(&mut r, "crypto ceiling", &e);
                errors.push(e);
                None
            }
        };
        r.heading(
            3,
            "Node API: BatchNewX509SVID over mTLS to the real carapace-server",
        );
        r.para("The release `carapace-server` on a temporary data dir (SQLite, disk key manager), a free 127.0.0.1 port and its own admin socket. This process attests as an agent with a join token from `carapace-server token generate` and the bundle from `carapace-server bundle show`, using `carapace_agent::node_client` and `carapace_tls`, then sends pre-generated CSRs in BatchNewX509SVID calls over 1 and 2 mTLS connections. Server CPU from /proc/<pid>/stat (utime + stime) before and after each run.");
        if let Some(csrs) = csrs {
            eprintln!(
                "==> B1: node API ({} SVIDs per run, {} runs, connections {:?})",
                plan.node.svids_per_run, plan.node.runs, plan.node.connections
            );
            match runtime.block_on(interruptible(node::run(
                &args.bin_dir,
                &dir.path().join("b1"),
                csrs,
                &plan.node,
                &ServerOptions::default(),
            ))) {
                Ok(n) => {
                    node_section(&mut r, &n, &plan, ceiling_all, ceiling_one, machine.nproc);
                    b1_node = Some(n);
                }
                Err(e) if e.is::<Interrupted>() => return Err(e),
                Err(e) => {
                    failed(&mut r, "node API benchmark", &e);
                    errors.push(e);
                }
            }
        }
    }
    // B2's single-client first response, compared with B6's.
    let mut b2_single: Option<Summary> = None;
    if run_b2 {
        eprintln!(
            "==> B2: Workload API (levels {:?}, {} bulk entries)",
            plan.workload.levels, plan.workload.bulk_entries
        );
        r.heading(
            2,
            "B2. Workload API: FetchX509SVID first response, agent memory, propagation (S2)",
        );
        r.para("The release `carapace-server` and `carapace-agent` (join token, `--trust-bundle`, its own data dir and `--socket-path`), an entry `unix:uid:<this uid>` parented to the agent, and `carapace-agent api fetch x509` succeeding before anything is measured. Agent memory: VmRSS with that one SVID, then after creating the bulk entries (selector `unix:uid:<another uid>`; the agent prefetches an SVID for each) once its log says `held=<1 + bulk>`. The bulk entries are deleted again before the latency levels.");
        match runtime.block_on(interruptible(workload::run(
            &args.bin_dir,
            &dir.path().join("b2"),
            &plan.workload,
        ))) {
            Ok(w) => {
                workload_section(&mut r, &w);
                b2_single = w
                    .levels
                    .iter()
                    .find(|l| l.concurrency == 1)
                    .and_then(|l| Summary::of_durations_us(&l.samples));
            }
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                failed(&mut r, "Workload API benchmark", &e);
                errors.push(e);
            }
        }
    }

    if run_b3 {
        r.heading(
            2,
            "B3. X509-SVID issuance with the CA key in SoftHSM2 (issue 3)",
        );
        match runtime.block_on(interruptible(b3(
            &args.bin_dir,
            &dir.path().join("b3"),
            csrs_ok(),
            &plan,
            machine.nproc,
            b1_node.take(),
        ))) {
            Ok(b3) => {
                b3_section(&mut r, &b3, &plan, machine.nproc, b1_ceiling);
                errors.extend(b3.into_errors());
            }
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                failed(&mut r, "B3 (SVID issuance with the CA in SoftHSM2)", &e);
                errors.push(e);
            }
        }
    }

    if run_b4 {
        r.heading(2, "B4. TPM node attestation against swtpm (issue 4)");
        match runtime.block_on(interruptible(b4(&plan.tpm, machine.nproc))) {
            Ok(b4) => {
                b4_section(&mut r, &b4, &plan.tpm, machine.nproc);
                errors.extend(b4.into_errors());
            }
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                failed(&mut r, "B4 (TPM node attestation against swtpm)", &e);
                errors.push(e);
            }
        }
    }

    if run_b5 {
        r.heading(2, "B5. Kerberos node attestation against the lab MIT KDC");
        match runtime.block_on(interruptible(b5(&plan.krb))) {
            Ok(b5) => {
                b5_section(&mut r, &b5, &plan.krb, machine.nproc);
                errors.extend(b5.into_errors());
            }
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                failed(
                    &mut r,
                    "B5 (Kerberos node attestation against the MIT KDC)",
                    &e,
                );
                errors.push(e);
            }
        }
    }

    if run_b6 {
        r.heading(
            2,
            "B6. Workload attestation: latency and Workload API connections per second on one agent",
        );
        eprintln!(
            "==> B6: workload attestation ({} calls per in-process row; {} run(s) of {} s per connection setting)",
            plan.attest.iterations, plan.attest.runs, plan.attest.seconds
        );
        match runtime.block_on(interruptible(workload_attest::run(
            &args.bin_dir,
            &dir.path().join("b6"),
            &plan.attest,
        ))) {
            Ok(b6) => {
                b6_section(&mut r, &b6, &plan.attest, machine.nproc, b2_single);
                errors.extend(b6.into_errors());
            }
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                failed(&mut r, "B6 (workload attestation)", &e);
                errors.push(e);
            }
        }
    }

    if run_b7 {
        r.heading(
            2,
            "B7. Node attestation by sshpop, aws_iid, gcp_iit and azure_msi: the server's cost per attestation (in process)",
        );
        eprintln!(
            "==> B7: sshpop, aws_iid, gcp_iit, azure_msi ({} s per item)",
            plan.b7.seconds
        );
        match runtime.block_on(interruptible(attest_cloud_ssh::run(
            &plan.b7,
            machine.nproc,
        ))) {
            Ok(b7) => {
                attest_cloud_ssh::section(&mut r, &b7, &plan.b7, machine.nproc);
                errors.extend(b7.into_errors());
            }
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                failed(&mut r, "B7 (sshpop and cloud node attestation)", &e);
                errors.push(e);
            }
        }
    }

    let text = r.finish();
    print!("{text}");
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("==> report written to {}", out.display());
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
    if args.keep {
        eprintln!("==> kept {}", dir.keep().display());
    }
    match errors.len() {
        0 => Ok(()),
        n => Err(anyhow!("{n} benchmark(s) failed; see the report")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_bench::hsm::RawRun;

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
        b3_section(&mut r, &b3, &Plan::new(true), 2, Some((12_000.0, 20_000.0)));
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
        b3_section(&mut r, &failed, &Plan::new(true), 2, None);
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
    fn attest_run(tpms: usize, n: usize, ms: u64) -> AttestRun {
        let p = tpm::Phases {
            payload: Duration::from_millis(ms * 9 / 10),
            begin: Duration::from_micros(450),
            begin_cpu: Duration::from_micros(440),
            answer: Duration::from_millis(ms / 10),
            respond: Duration::from_micros(350),
            respond_cpu: Duration::from_micros(340),
            total: Duration::from_millis(ms) + Duration::from_micros(800),
        };
        let wall = Duration::from_millis(ms * n as u64 / tpms as u64);
        AttestRun {
            tpms,
            samples: vec![p; n],
            wall,
            process_cpu: wall / 4,
            swtpm_cpu: wall / 2,
            idle: wall / 5,
        }
    }

    fn rate(op: tpm::ServerOp, threads: usize, rate: f64) -> OpRate {
        OpRate {
            op,
            threads,
            runs: vec![tpm::RateRun {
                rate,
                cpu_us_per_op: threads as f64 * 1e6 / rate,
                idle_cores: 0.0,
            }],
        }
    }

    #[test]
    fn b4_report_splits_the_attestation_and_names_real_tpm_latency() {
        let b4 = B4 {
            swtpm: "TPM emulator version 0.7.1".into(),
            loadavg: "0.10 0.20 0.30".into(),
            setup: Duration::from_secs(2),
            ek: Some("rsa2048".into()),
            latency: Ok(attest_run(1, 50, 100)),
            throughput: Ok(vec![attest_run(1, 20, 100), attest_run(2, 40, 140)]),
            server: Ok(tpm::ServerOp::ALL
                .iter()
                .flat_map(|&op| [rate(op, 1, 4_000.0), rate(op, 2, 7_000.0)])
                .collect()),
            ops: Ok(vec![OpSamples {
                label: "open",
                samples: vec![Duration::from_millis(2); 3],
                cpu: vec![Duration::from_micros(300); 3],
            }]),
            sign: Ok(SignLatency {
                create_primary: Duration::from_millis(2),
                samples: vec![Duration::from_micros(600); 100],
                wall: Duration::from_millis(60),
                client_cpu: Duration::from_millis(7),
                swtpm_cpu: Duration::from_millis(50),
            }),
        };
        let plan = TpmPlan::new(false);
        let mut r = Report::new();
        b4_section(&mut r, &b4, &plan, 2);
        let text = r.finish();
        assert!(text.contains("**rsa2048**"), "{text}");
        assert!(text.contains("| `begin()` | server: **CPU** |"), "{text}");
        assert!(
            text.contains("| server total | server: **CPU** | `begin()` + `respond()` | 780 µs |"),
            "{text}"
        );
        assert!(
            text.contains("**10.0 attestations/s on one swtpm** (rsa2048 EK)"),
            "{text}"
        );
        assert!(
            text.contains("2 swtpms attest 1.43× as fast as one (ideal 2×)"),
            "{text}"
        );
        assert!(text.contains("**Server CPU per attestation**"), "{text}");
        assert!(text.contains("100–700 ms"), "{text}");
        assert!(
            text.contains("| 100 | 600 µs | 600 µs | 600 µs | 1,667 | 70 | 500 | 2.00 ms |"),
            "{text}"
        );
        assert!(!text.contains("FAILED"), "{text}");
        assert!(b4.into_errors().is_empty());

        let missing = B4 {
            swtpm: "swtpm (version unknown)".into(),
            loadavg: "1.00 1.00 1.00".into(),
            setup: Duration::ZERO,
            ek: None,
            latency: Err(anyhow!("no swtpm")),
            throughput: Err(anyhow!("no swtpm")),
            server: Err(anyhow!("capturing one attestation of swtpm 1")),
            ops: Err(anyhow!("no swtpm")),
            sign: Err(anyhow!("no swtpm")),
        };
        let mut r = Report::new();
        b4_section(&mut r, &missing, &plan, 2);
        let text = r.finish();
        assert!(
            text.contains("**sequential attestations FAILED:**"),
            "{text}"
        );
        assert!(text.contains("**TPM2_Sign latency FAILED:**"), "{text}");
        assert_eq!(missing.into_errors().len(), 5);
    }

    #[test]
    fn b4_without_swtpm_fails_with_the_install_line() {
        let e = anyhow!("swtpm_setup not found").context(tpm::install_hint());
        let mut r = Report::new();
        failed(&mut r, "B4 (TPM node attestation against swtpm)", &e);
        let text = r.finish();
        assert!(
            text.contains("**B4 (TPM node attestation against swtpm) FAILED:**"),
            "{text}"
        );
        assert!(
            text.contains("apt-get install -y swtpm swtpm-tools tpm2-tools"),
            "{text}"
        );
        assert_eq!(b4_counts(1), vec![1]);
        assert_eq!(b4_counts(4), vec![1, 4]);
    }

    fn krb_phases(mutual: bool) -> kerberos::Phases {
        kerberos::Phases {
            token: Duration::from_micros(900),
            token_cpu: Duration::from_micros(600),
            accept: Duration::from_micros(250),
            accept_cpu: Duration::from_micros(240),
            reply: Duration::from_micros(if mutual { 50 } else { 0 }),
            reply_cpu: Duration::from_micros(if mutual { 50 } else { 0 }),
            total: Duration::from_micros(if mutual { 1_700 } else { 1_650 }),
            ..kerberos::Phases::default()
        }
    }

    fn loop_run(loops: usize, n: usize, rate: f64, mutual: bool) -> LoopRun {
        let wall = Duration::from_secs_f64(n as f64 / rate);
        LoopRun {
            loops,
            samples: vec![krb_phases(mutual); n],
            wall,
            process_cpu: Duration::from_micros(1_100) * u32::try_from(n).unwrap(),
            kdc_cpu: Some(Duration::from_micros(500) * u32::try_from(n).unwrap()),
            idle: wall / 2,
            kdc: Some(kerberos::KdcCounts {
                as_req: n as u64,
                tgs_req: n as u64,
                not_issued: 0,
            }),
        }
    }

    fn server_run(threads: usize, cpu_us: u64) -> ServerRun {
        ServerRun {
            threads,
            tokens: 300,
            wall: Duration::from_millis(60 / threads as u64),
            process_cpu: Duration::from_micros(cpu_us * 300),
            idle: Duration::ZERO,
        }
    }

    fn mode(mutual: bool) -> ModeResult {
        ModeResult {
            mutual,
            agent_path: Some("LAB.TEST/node1.lab.test".into()),
            selectors: vec!["kerberos:realm:LAB.TEST".into()],
            answer_bytes: Some(1059),
            sequential: Ok(loop_run(1, 500, 600.0, mutual)),
            throughput: Ok(vec![
                loop_run(1, 250, 600.0, mutual),
                loop_run(2, 500, 900.0, mutual),
            ]),
            server: Ok(vec![
                server_run(1, if mutual { 230 } else { 300 }),
                server_run(2, if mutual { 230 } else { 300 }),
            ]),
        }
    }

    #[test]
    fn b5_report_splits_agent_kdc_and_server() {
        let b5 = B5 {
            krb5: "MIT Kerberos 5 release 1.20.1".into(),
            loadavg: "0.10 0.20 0.30".into(),
            run: kerberos::B5Run {
                setup: Duration::from_millis(50),
                output: kerberos::ChildOutput {
                    modes: vec![mode(true), mode(false)],
                    rcache_bytes: Some(30 * 1024),
                    workers: 2,
                },
            },
        };
        let plan = KrbPlan::new(false);
        let mut r = Report::new();
        b5_section(&mut r, &b5, &plan, 2);
        let text = r.finish();
        assert!(
            text.contains("**600 attestations/s sequentially** (mutual_auth = true (default))"),
            "{text}"
        );
        assert!(
            text.contains("**1.00 AS-REQ and 1.00 TGS-REQ per attestation**"),
            "{text}"
        );
        assert!(text.contains("| `answer()` to the AP-REP |"), "{text}");
        assert_eq!(text.matches("| `answer()` to the AP-REP |").count(), 1);
        assert!(
            text.contains("| true | 2 | 500 | 900 | 1.70 ms | 1.70 ms | 1.10 ms | 500 µs |"),
            "{text}"
        );
        assert!(
            text.contains("2 loops attest 1.50× as fast as one (ideal 2×)"),
            "{text}"
        );
        assert!(
            text.contains("| true | 1 | 300 | 5,000 | 230 | 4,348 | 1.15 / 0.00 / 0.85 |"),
            "{text}"
        );
        assert!(
            text.contains("per attestation the server spends 230 µs of CPU"),
            "{text}"
        );
        assert!(
            text.contains("without 300 µs (runs 300–300), -70 µs: less with mutual"),
            "{text}"
        );
        assert!(
            text.contains("PERFORMANCE.md sets no Kerberos figure or target"),
            "{text}"
        );
        assert!(!text.contains("FAILED"), "{text}");
        assert!(b5.into_errors().is_empty());

        let broken = B5 {
            krb5: "MIT krb5 (version unknown)".into(),
            loadavg: "1.00 1.00 1.00".into(),
            run: kerberos::B5Run {
                setup: Duration::ZERO,
                output: kerberos::ChildOutput {
                    modes: vec![ModeResult {
                        sequential: Err("the first attestation: KDC unreachable".into()),
                        throughput: Err("the first attestation: KDC unreachable".into()),
                        server: Err("the first attestation: KDC unreachable".into()),
                        ..mode(true)
                    }],
                    rcache_bytes: None,
                    workers: 2,
                },
            },
        };
        let mut r = Report::new();
        b5_section(&mut r, &broken, &plan, 2);
        let text = r.finish();
        assert!(
            text.contains("**sequential attestations FAILED:**"),
            "{text}"
        );
        assert!(text.contains("KDC unreachable"), "{text}");
        assert_eq!(broken.into_errors().len(), 3);
    }

    #[test]
    fn b5_without_a_kdc_fails_with_the_install_line() {
        let e = anyhow!("krb5kdc not found").context(kerberos::install_hint());
        let mut r = Report::new();
        failed(
            &mut r,
            "B5 (Kerberos node attestation against the MIT KDC)",
            &e,
        );
        let text = r.finish();
        assert!(
            text.contains("apt-get install -y krb5-kdc krb5-admin-server krb5-user"),
            "{text}"
        );
    }

    fn b6_op(kind: workload_attest::OpKind, us: u64, n: usize) -> workload_attest::Op {
        workload_attest::Op {
            kind,
            label: format!("{kind:?}"),
            caller: Some("sleep".into()),
            samples: vec![Duration::from_micros(us); n],
            cpu: Duration::from_micros(us) * u32::try_from(n).unwrap(),
            selectors: if kind.attests() {
                vec!["unix:uid:0".into()]
            } else {
                Vec::new()
            },
        }
    }

    fn b6_run(target: usize, loops: usize, first_us: u64, n: usize, agent_us: u64) -> ConnRun {
        ConnRun {
            target,
            loops,
            samples: vec![Duration::from_micros(first_us); n],
            connect: vec![Duration::from_micros(60); n],
            errors: 0,
            first_error: None,
            wall: Duration::from_secs(1),
            agent_cpu: Duration::from_micros(agent_us) * u32::try_from(n).unwrap(),
            client_cpu: Duration::from_micros(250) * u32::try_from(n).unwrap(),
            idle: Duration::from_millis(500),
        }
    }

    #[test]
    fn b6_report_puts_attestation_in_context() {
        use workload_attest::OpKind;
        let caller = |label: &str, bytes: u64| workload_attest::CallerInfo {
            label: label.into(),
            pid: 42,
            exe: format!("/usr/bin/{label}").into(),
            exe_bytes: bytes,
            cgroup: "/x.slice/b6-x.service".into(),
        };
        let ip = InProcess {
            ops: vec![
                b6_op(OpKind::Pidfd, 10, 100),
                b6_op(OpKind::SpawnBlocking, 30, 100),
                b6_op(OpKind::ProcReads, 35, 100),
                b6_op(OpKind::Unix, 100, 100),
                b6_op(OpKind::Cgroups, 70, 100),
                b6_op(OpKind::Systemd, 90, 100),
                b6_op(OpKind::SystemdNoUnit, 60, 100),
                b6_op(OpKind::UnixSha256Small, 130, 100),
                workload_attest::Op {
                    caller: Some("big".into()),
                    ..b6_op(OpKind::UnixSha256Big, 10_100, 5)
                },
                b6_op(OpKind::All, 300, 100),
            ],
            small: caller("sleep", 43_000),
            big: caller("big", 10 << 20),
            outside: None,
            workers: 2,
        };
        let plan = AttestPlan::new(false);
        let setups = workload_attest::agent_setups(&plan, 0, Some("b6-x.service"));
        let runs = vec![
            b6_run(0, 1, 800, 1_200, 600),
            b6_run(0, 2, 1_200, 1_600, 700),
            b6_run(0, 8, 5_000, 1_700, 700),
            b6_run(1, 1, 650, 1_500, 500),
            b6_run(2, 1, 11_000, 90, 10_600),
        ];
        let b6 = B6Result {
            unit: Ok(workload_attest::UnitInfo {
                path: "/x.slice/b6-x.service".into(),
                unit: "b6-x.service".into(),
                slice: "x.slice".into(),
                invocation_id: "00".repeat(16),
                procs: "/sys/fs/cgroup/x.slice/b6-x.service/cgroup.procs".into(),
            }),
            in_process: Ok(ip),
            connections: Ok(workload_attest::Connections {
                setups,
                output: workload_attest::ChildOutput {
                    cgroup: "/x.slice/b6-x.service".into(),
                    workers: 2,
                    runs,
                },
                agent_rss: vec![14 << 20; 3],
            }),
        };
        let b2 = Summary::of(&[700.0, 900.0]);
        let mut r = Report::new();
        b6_section(&mut r, &b6, &plan, 2, b2);
        let text = r.finish();
        // 300 of 600 agent CPU-µs; 300 of 800 µs at p50.
        assert!(
            text.contains("**Attestation is 50.0 % of the agent's CPU per connection and 37.5 % of the first response's p50**"),
            "{text}"
        );
        assert!(text.contains("The other 300 µs of agent CPU"), "{text}");
        assert!(
            text.contains("| `unix` + `cgroups` + `systemd` | 1 | 1,200 | 800 µs | 800 µs |"),
            "{text}"
        );
        assert!(
            text.contains("1 loop: p99 800 µs (**met**); 2 loops: p99 1.20 ms (**not met**)"),
            "{text}"
        );
        assert!(
            text.contains("+100 agent CPU-µs per connection (500 → 600)"),
            "{text}"
        );
        // 10 MiB hashed in 10 ms: 1,000 MiB/s, 1 ms per MiB.
        assert!(text.contains("1,000 MiB/s"), "{text}");
        assert!(text.contains("B2 in this invocation"), "{text}");
        assert!(text.contains("systemd:unit:b6-x.service"), "{text}");
        assert!(!text.contains("FAILED"), "{text}");
        assert!(b6.into_errors().is_empty());

        let broken = B6Result {
            unit: Err("creating cgroup: permission denied".into()),
            in_process: Err(anyhow!("no sleep")),
            connections: Err(anyhow!("carapace-agent not found")),
        };
        let mut r = Report::new();
        b6_section(&mut r, &broken, &plan, 2, None);
        let text = r.finish();
        assert!(text.contains("No unit cgroup could be made"), "{text}");
        assert!(
            text.contains("**in-process attestation FAILED:**"),
            "{text}"
        );
        assert!(text.contains("carapace-agent not found"), "{text}");
        assert_eq!(broken.into_errors().len(), 2);
    }
}
