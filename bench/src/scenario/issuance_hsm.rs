//! B3: X509-SVID issuance with the CA key in a SoftHSM2 token, beside the token's raw
//! signing rate.
//!
//! - The raw rate: SoftHSM2's `C_Sign` alone, in a child process
//!   ([`pkcs11::raw_rates`](crate::pkcs11::raw_rates)).
//! - Issuance: the real `carapace-server` with `[key_manager.pkcs11]` (its CA key and TLS
//!   key generated in the token) over the node API, with [`issuance::run`] and
//!   [`pkcs11::server_options`](crate::pkcs11::server_options).
//!
//! [`run`] runs both parts (B1's node API result is shown again beside them), and
//! [`section`] writes the report's section with the goal: issuance at >= 80 % of the
//! token's raw rate.

use std::path::Path;

use anyhow::{Context, Result, anyhow};

use hsm_sim::softhsm::SoftHsm;

use super::Plan;
use super::issuance;
use crate::harness::ServerOptions;
use crate::node_load::{
    NodeResult, NodeRun, RunsSummary, best_connections, median_over_runs, node_cores,
};
use crate::pkcs11::{
    NEEDS_SOFTHSM, RawRate, raw_rates, server_options, session_counts, softhsm_description,
};
use crate::process::loadavg_now;
use crate::report::{Report, Table, failed};
use crate::stats::{Repeated, fmt_bytes, fmt_cores, fmt_count, fmt_pct, fmt_us};

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
    let hsm = SoftHsm::new().with_context(|| format!("B3 {NEEDS_SOFTHSM}"))?;
    let softhsm = softhsm_description(hsm.module());
    let loadavg = loadavg_now();
    let counts = session_counts(nproc);
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

fn b3_node_rows(t: &mut Table, label: &str, n: &NodeResult, nproc: usize) {
    for (conns, runs) in &n.by_connections {
        let sum = RunsSummary::of(runs, nproc);
        t.row([
            label.to_owned(),
            conns.to_string(),
            sum.rate.map(|r| r.fmt_count()).unwrap_or_default(),
            sum.latency.map(|l| fmt_us(l.p50)).unwrap_or_default(),
            sum.latency.map(|l| fmt_us(l.p99)).unwrap_or_default(),
            sum.server_cpu_us
                .map(|c| format!("{:.0}", c.median))
                .unwrap_or_default(),
            sum.client_cpu_us
                .map(|c| format!("{:.0}", c.median))
                .unwrap_or_default(),
            fmt_cores(&sum.cores),
            sum.server_rss
                .map(|b| fmt_bytes(b as f64))
                .unwrap_or_default(),
            sum.errors,
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
    use std::time::Duration;

    use super::*;
    use crate::pkcs11::RawRun;

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
                    latencies: vec![Duration::from_millis(30)],
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
