//! B1 (S1): X509-SVID issuance, the crypto ceiling beside the node API of the real server.
//!
//! - The crypto ceiling: exactly the server's per-SVID work, with the server's own
//!   functions, in this process: parse and verify a CSR
//!   ([`carapace_server::ca::csr_public_key`]), then build and sign the leaf
//!   ([`carapace_server::ca::sign_leaf`]) under a CA slot of a [`CaManager`] loaded over an
//!   in-memory datastore and the in-memory key manager ([`bench_ca`], [`measure`]), on 1
//!   thread and on every core; the report's [`ceiling_section`].
//! - The node API: the real `carapace-server` binary; this process attests as an agent
//!   ([`NodeBench`]), then sends `BatchNewX509SVID` over mTLS ([`run`]); the report's
//!   [`node_section`]. B3 runs the same [`run`] against a server whose CA key is in
//!   SoftHSM2.
//!
//! The P-256 CSRs both halves send are made up front, like the agent's ([`generate_csrs`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tonic::transport::Channel;

use carapace_core::{KeyType, SpiffeId};
use carapace_proto::node::node_client::NodeClient;
use carapace_proto::node::{BatchNewX509svidRequest, NewX509svidParams};
use carapace_server::ca::{CaManager, CaSlot, csr_public_key, sign_leaf};

use super::Plan;
use crate::harness::{ServerOptions, workload_id};
use crate::inproc;
use crate::node_load::{Calls, NodeBench, NodeResult, NodeRun, RunsSummary};
use crate::report::{Report, Table};
use crate::stats::{Repeated, fmt_bytes, fmt_count, fmt_pct, fmt_secs, fmt_us};

/// How the crypto ceiling is measured, as the report says it.
pub const CEILING_METHOD: &str = "Per SVID: `carapace_server::ca::csr_public_key` (parse the PKCS#10 CSR, verify its P-256 signature) then `carapace_server::ca::sign_leaf` (build the leaf, sign it with the P-256 CA key of a `CaManager` over `Datastore::open_in_memory()` and `MemoryKeyManager`). CSRs pre-generated with rcgen like the agent's; std threads, each taking an equal share.";

/// How the node API run is set up and measured, as the report says it.
pub const NODE_API_METHOD: &str = "The release `carapace-server` on a temporary data dir (SQLite, disk key manager), a free 127.0.0.1 port and its own admin socket. This process attests as an agent with a join token from `carapace-server token generate` and the bundle from `carapace-server bundle show`, using `carapace_agent::node_client` and `carapace_tls`, then sends pre-generated CSRs in BatchNewX509SVID calls over 1 and 2 mTLS connections. Server CPU from /proc/<pid>/stat (utime + stime) before and after each run.";

/// Lifetime of the benchmark's SVIDs (the server's default).
pub const SVID_TTL: Duration = Duration::from_secs(3600);

/// `n` PKCS#10 CSRs (DER) for fresh P-256 keys, as the agent makes them (rcgen, empty
/// subject), generated on `threads` threads.
pub fn generate_csrs(n: usize, threads: usize) -> Result<Vec<Vec<u8>>> {
    let threads = threads.clamp(1, n.max(1));
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let count = per.min(n.saturating_sub(t * per));
                s.spawn(move || -> Result<Vec<Vec<u8>>> {
                    (0..count)
                        .map(|_| {
                            let kp = rcgen::KeyPair::generate().context("P-256 key generation")?;
                            let csr = rcgen::CertificateParams::default()
                                .serialize_request(&kp)
                                .context("CSR")?;
                            Ok(csr.der().to_vec())
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow!("CSR generation thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// A CA like the server's ([`inproc::bench_ca`]) with its active X.509 slot.
pub async fn bench_ca() -> Result<(Arc<CaManager>, Arc<CaSlot>)> {
    let ca = inproc::bench_ca(KeyType::EcP256).await?;
    let slot = ca.active()?;
    Ok((ca, slot))
}

/// Issues one SVID for each of `csrs` (SPIFFE IDs cycling over `ids`) on `threads` std
/// threads, each taking an equal contiguous share; returns the wall time.
pub fn issue_all(
    slot: &CaSlot,
    ids: &[SpiffeId],
    csrs: &[Vec<u8>],
    threads: usize,
) -> Result<Duration> {
    if ids.is_empty() {
        return Err(anyhow!("no SPIFFE IDs"));
    }
    let now = carapace_core::clock::unix_now();
    inproc::on_threads(csrs.len(), threads, |share| {
        let mut issued = 0;
        for k in share {
            let key = csr_public_key(&csrs[k])?;
            let svid = sign_leaf(slot, &ids[k % ids.len()], &key, SVID_TTL, &[], now)?;
            issued += usize::from(!svid.chain.is_empty());
        }
        Ok(issued)
    })
}

/// The ceiling at one thread count: SVIDs/s of each run.
#[derive(Debug, Clone)]
pub struct Ceiling {
    /// Threads used.
    pub threads: usize,
    /// SVIDs issued per run.
    pub svids: usize,
    /// SVIDs/s of each run.
    pub rates: Vec<f64>,
}

/// Measures the ceiling with 1 thread and with `nproc` threads, `runs` times each
/// (alternating), over `csrs` with SPIFFE IDs cycling over `entries` names.
pub fn measure(
    slot: &CaSlot,
    csrs: &[Vec<u8>],
    entries: usize,
    nproc: usize,
    runs: usize,
) -> Result<Vec<Ceiling>> {
    let ids: Vec<SpiffeId> = (0..entries.max(1))
        .map(|i| workload_id(i).parse().map_err(|e| anyhow!("{e}")))
        .collect::<Result<_>>()?;
    let mut counts = vec![1];
    if nproc > 1 {
        counts.push(nproc);
    }
    let mut out: Vec<Ceiling> = counts
        .iter()
        .map(|&t| Ceiling {
            threads: t,
            svids: csrs.len(),
            rates: Vec::new(),
        })
        .collect();
    // Warm-up: caches, allocator, CPU frequency.
    issue_all(slot, &ids, &csrs[..csrs.len().min(500)], nproc)?;
    for _ in 0..runs.max(1) {
        for c in &mut out {
            let wall = issue_all(slot, &ids, csrs, c.threads)?;
            c.rates.push(csrs.len() as f64 / wall.as_secs_f64());
        }
    }
    Ok(out)
}

/// Sizes of the node API benchmark.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Entries parented to the benchmark agent.
    pub entries: usize,
    /// SVIDs requested per run.
    pub svids_per_run: usize,
    /// CSRs per BatchNewX509SVID call.
    pub batch: usize,
    /// Runs per connection count.
    pub runs: usize,
    /// Connection counts to measure.
    pub connections: Vec<usize>,
}

/// The batches of one run: `total` CSRs (cycling over `csrs`) for entries cycling over
/// `entry_ids`, `batch` per request.
fn batches(
    csrs: &[Vec<u8>],
    entry_ids: &[String],
    total: usize,
    batch: usize,
) -> Vec<BatchNewX509svidRequest> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < total {
        let end = (i + batch).min(total);
        let params = (i..end)
            .map(|k| NewX509svidParams {
                entry_id: entry_ids[k % entry_ids.len()].clone(),
                csr: csrs[k % csrs.len()].clone(),
            })
            .collect();
        out.push(BatchNewX509svidRequest { params });
        i = end;
    }
    out
}

/// Sends `reqs` one after the other on `client`.
async fn send_all(
    mut client: NodeClient<Channel>,
    reqs: Vec<BatchNewX509svidRequest>,
) -> Result<Calls> {
    let mut calls = Calls::default();
    for req in reqs {
        let want = req.params.len();
        let t = Instant::now();
        let resp = client
            .batch_new_x509svid(req)
            .await
            .map_err(|s| anyhow!("BatchNewX509SVID: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        calls.latencies.push(t.elapsed());
        if resp.results.len() != want {
            bail!(
                "BatchNewX509SVID returned {} results for {want} CSRs",
                resp.results.len()
            );
        }
        for r in resp.results {
            if r.error_code == 0 && r.svid.as_ref().is_some_and(|s| !s.cert_chain.is_empty()) {
                calls.ok += 1;
            } else {
                calls.failed(|| format!("code {}: {}", r.error_code, r.error_message));
            }
        }
    }
    Ok(calls)
}

/// One run: `svids_per_run` SVIDs in batches spread round-robin over `conns` connections
/// (B14 runs it on a root server and on a downstream server).
pub async fn one_run(
    bench: &NodeBench,
    conns: usize,
    csrs: &[Vec<u8>],
    cfg: &NodeConfig,
) -> Result<NodeRun> {
    let all = batches(csrs, &bench.entry_ids, cfg.svids_per_run, cfg.batch);
    let mut lanes: Vec<Vec<BatchNewX509svidRequest>> = vec![Vec::new(); conns];
    for (i, b) in all.into_iter().enumerate() {
        lanes[i % conns].push(b);
    }
    let lanes = lanes
        .into_iter()
        .zip(bench.clients.iter().cloned())
        .map(|(lane, client)| send_all(client, lane))
        .collect();
    bench.run(lanes).await
}

/// Warm-up: one small batch per connection (TLS handshakes, first allocations).
pub async fn warm_up(bench: &NodeBench, csrs: &[Vec<u8>], cfg: &NodeConfig) -> Result<()> {
    for c in &bench.clients {
        let warm = batches(csrs, &bench.entry_ids, cfg.batch.min(50), cfg.batch);
        send_all(c.clone(), warm).await.context("warm-up batch")?;
    }
    Ok(())
}

/// Runs the node API benchmark against a fresh server under `dir`, started with `opts`
/// (a config file and environment; the default is the disk key manager).
pub async fn run(
    bin_dir: &Path,
    dir: &Path,
    csrs: &[Vec<u8>],
    cfg: &NodeConfig,
    opts: &ServerOptions,
) -> Result<NodeResult> {
    let max_conns = cfg.connections.iter().copied().max().unwrap_or(1).max(1);
    let mut bench = NodeBench::start(bin_dir, dir, opts, max_conns).await?;
    bench.grow_entries(cfg.entries.max(1)).await?;

    warm_up(&bench, csrs, cfg).await?;
    let server_rss_idle = bench.server_rss()?;

    let mut by_connections = Vec::new();
    for &conns in &cfg.connections {
        let conns = conns.clamp(1, max_conns);
        let mut runs = Vec::new();
        for _ in 0..cfg.runs.max(1) {
            runs.push(one_run(&bench, conns, csrs, cfg).await?);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        by_connections.push((conns, runs));
    }
    let result = bench.result(by_connections, server_rss_idle)?;
    bench.stop();
    Ok(result)
}

pub fn ceiling_section(r: &mut Report, ceilings: &[Ceiling]) {
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

pub fn node_section(
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
        let sum = RunsSummary::of(runs, nproc);
        if let Some(rep) = sum.rate {
            best = Some(best.map_or(rep.median, |b: f64| b.max(rep.median)));
        }
        t.row([
            conns.to_string(),
            fmt_count(plan.node.svids_per_run as f64),
            sum.rate.map(|r| r.fmt_count()).unwrap_or_default(),
            sum.latency.map(|l| fmt_us(l.p50)).unwrap_or_default(),
            sum.latency.map(|l| fmt_us(l.p99)).unwrap_or_default(),
            sum.latency.map(|l| fmt_us(l.max)).unwrap_or_default(),
            sum.server_cpu_us
                .map(|c| format!("{:.0}", c.median))
                .unwrap_or_default(),
            sum.server_rss
                .map(|b| fmt_bytes(b as f64))
                .unwrap_or_default(),
            sum.errors,
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
        fmt_secs(n.entry_create),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issues_with_the_server_functions() {
        let (_ca, slot) = bench_ca().await.unwrap();
        let csrs = generate_csrs(7, 2).unwrap();
        assert_eq!(csrs.len(), 7);
        let ids: Vec<SpiffeId> = (0..3).map(|i| workload_id(i).parse().unwrap()).collect();
        issue_all(&slot, &ids, &csrs, 2).unwrap();
        let c = measure(&slot, &csrs, 3, 2, 1).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.rates.len() == 1 && c.rates[0] > 0.0));
    }

    #[test]
    fn batches_cycle_over_csrs_and_entries() {
        let csrs = vec![vec![1u8], vec![2u8], vec![3u8]];
        let ids = vec!["a".to_owned(), "b".to_owned()];
        let b = batches(&csrs, &ids, 7, 3);
        assert_eq!(
            b.iter().map(|r| r.params.len()).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let last = &b[2].params[0];
        assert_eq!(
            (last.entry_id.as_str(), last.csr.as_slice()),
            ("a", &[1u8][..])
        );
        assert_eq!(b[1].params[0].entry_id, "b");
    }
}
