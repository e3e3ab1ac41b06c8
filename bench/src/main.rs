//! `carapace-bench`: runs B1 (X509-SVID issuance: crypto ceiling and node API) and B2
//! (Workload API latency and agent memory) against the real binaries and prints a
//! Markdown report. Normally run through `scripts/bench.sh [--quick]`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use carapace_bench::crypto::{self, Ceiling};
use carapace_bench::harness;
use carapace_bench::node::{self, NodeConfig, NodeResult};
use carapace_bench::procfs::Machine;
use carapace_bench::report::{Report, Table};
use carapace_bench::stats::{Repeated, Summary, fmt_bytes, fmt_count, fmt_pct, fmt_us};
use carapace_bench::workload::{self, Level, WorkloadConfig, WorkloadResult};

const USAGE: &str =
    "usage: carapace-bench [--quick] [--bin-dir DIR] [--out FILE] [--command TEXT] [--only b1|b2]";

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
    Ok(args)
}

/// Sizes of one benchmark run.
#[derive(Debug, Clone)]
struct Plan {
    csrs: usize,
    ceiling_runs: usize,
    node: NodeConfig,
    workload: WorkloadConfig,
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
    if run_b1 {
        eprintln!("==> B1: generating {} P-256 CSRs", plan.csrs);
        r.heading(
            2,
            "B1. X509-SVID issuance: crypto ceiling and node API (S1)",
        );
        let b1 = (|| -> Result<(Vec<Ceiling>, Vec<Vec<u8>>)> {
            let csrs = crypto::generate_csrs(plan.csrs, machine.nproc)?;
            eprintln!(
                "==> B1: crypto ceiling (1 and {} threads, {} runs)",
                machine.nproc, plan.ceiling_runs
            );
            let (_ca, slot) = runtime.block_on(crypto::bench_ca())?;
            let c = crypto::measure(
                &slot,
                &csrs,
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
                &csrs,
                &plan.node,
            ))) {
                Ok(n) => node_section(&mut r, &n, &plan, ceiling_all, ceiling_one, machine.nproc),
                Err(e) if e.is::<Interrupted>() => return Err(e),
                Err(e) => {
                    failed(&mut r, "node API benchmark", &e);
                    errors.push(e);
                }
            }
        }
    }
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
            Ok(w) => workload_section(&mut r, &w),
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                failed(&mut r, "Workload API benchmark", &e);
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
