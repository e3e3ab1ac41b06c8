//! B1, second half: X509-SVID issuance over the real node API. The real
//! `carapace-server` binary; this process attests as an agent with a join token (the
//! agent library's own node client), then sends `BatchNewX509SVID` over mTLS.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::watch;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use carapace_agent::node_attestor::JoinTokenClient;
use carapace_agent::node_client;
use carapace_core::plugin::KeyManager as _;
use carapace_core::{KeyType, TrustBundle};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_proto::convert::bundle_from_wire;
use carapace_proto::node::node_client::NodeClient;
use carapace_proto::node::{BatchNewX509svidRequest, NewX509svidParams};

use crate::harness::{self, Server, ServerOptions};
use crate::procfs;

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

/// One run: `svids_per_run` SVIDs over `connections` connections.
#[derive(Debug, Clone)]
pub struct NodeRun {
    /// SVIDs the server returned.
    pub signed: usize,
    /// Per-CSR errors the server returned, and the first message.
    pub errors: usize,
    /// The first per-CSR error message, if any.
    pub first_error: Option<String>,
    /// Wall time of the run.
    pub wall: Duration,
    /// Latency of each batch call.
    pub batch_latencies: Vec<Duration>,
    /// Server CPU time (user + system) during the run.
    pub server_cpu: Duration,
    /// CPU time of this process (the load generator: TLS client, protobuf) during the run.
    pub client_cpu: Duration,
    /// Idle time of all the machine's CPUs together during the run (`/proc/stat`).
    pub machine_idle: Duration,
    /// Server VmRSS after the run.
    pub server_rss: u64,
}

impl NodeRun {
    /// SVIDs per second.
    pub fn rate(&self) -> f64 {
        self.signed as f64 / self.wall.as_secs_f64()
    }

    /// Server CPU-µs per SVID.
    pub fn cpu_us_per_svid(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.signed.max(1) as f64
    }

    /// Average number of idle cores on the machine during the run.
    pub fn idle_cores(&self) -> f64 {
        self.machine_idle.as_secs_f64() / self.wall.as_secs_f64().max(f64::EPSILON)
    }

    /// Load generator (this process) CPU-µs per SVID.
    pub fn client_cpu_us_per_svid(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / self.signed.max(1) as f64
    }
}

/// What the node API benchmark measured.
#[derive(Debug, Clone)]
pub struct NodeResult {
    /// The runs, by connection count.
    pub by_connections: Vec<(usize, Vec<NodeRun>)>,
    /// Entries created, and how long creating them through the admin API took.
    pub entries: usize,
    /// Time to create the entries.
    pub entry_create: Duration,
    /// Server VmRSS after start-up, attestation and entry creation, before signing.
    pub server_rss_idle: u64,
    /// Server VmHWM (peak RSS) at the end.
    pub server_rss_peak: u64,
}

/// Attests as an agent; returns its SPIFFE ID and `n` mTLS node clients (one
/// connection each).
async fn attested_clients(server: &Server, n: usize) -> Result<(String, Vec<NodeClient<Channel>>)> {
    let token = server.token().await?;
    let pem = server.bundle_pem().await?;
    let bundle =
        TrustBundle::from_pem(server.td.clone(), &pem).map_err(|e| anyhow!("bundle show: {e}"))?;
    let agent_id = token.agent_id.clone();
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
    let km = MemoryKeyManager::new();
    let key = km.generate_key("bench-agent", KeyType::EcP256).await?;
    let csr = carapace_tls::csr_for_key(key.clone())?;
    let tls = carapace_tls::client_config(bundle_rx.clone(), server.td.server_id(), None)?;
    let result = node_client::attest(
        &server.addr,
        Arc::new(tls),
        &JoinTokenClient::new(Zeroizing::new(token.token)),
        csr,
        key.public_key_der(),
    )
    .await
    .context("node attestation")?;
    let chain = result.svid.map(|s| s.cert_chain).unwrap_or_default();
    if chain.is_empty() {
        bail!("attestation returned no SVID");
    }
    if let Some(b) = result.bundle.as_ref() {
        bundle_tx.send_replace(Arc::new(bundle_from_wire(b)?));
    }
    let ck = carapace_tls::certified_key(&chain, key);
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let tls = carapace_tls::client_config(
            bundle_rx.clone(),
            server.td.server_id(),
            Some(ck.clone()),
        )?;
        clients.push(node_client::channel(&server.addr, Arc::new(tls))?);
    }
    // The verifiers keep reading the last bundle after the sender is gone.
    drop(bundle_tx);
    Ok((agent_id, clients))
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

/// Sends `reqs` one after the other on `client`; returns (latencies, signed, errors, first error).
async fn send_all(
    mut client: NodeClient<Channel>,
    reqs: Vec<BatchNewX509svidRequest>,
) -> Result<(Vec<Duration>, usize, usize, Option<String>)> {
    let mut lat = Vec::with_capacity(reqs.len());
    let (mut signed, mut errors, mut first) = (0, 0, None);
    for req in reqs {
        let want = req.params.len();
        let t = Instant::now();
        let resp = client
            .batch_new_x509svid(req)
            .await
            .map_err(|s| anyhow!("BatchNewX509SVID: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        lat.push(t.elapsed());
        if resp.results.len() != want {
            bail!(
                "BatchNewX509SVID returned {} results for {want} CSRs",
                resp.results.len()
            );
        }
        for r in resp.results {
            if r.error_code == 0 && r.svid.as_ref().is_some_and(|s| !s.cert_chain.is_empty()) {
                signed += 1;
            } else {
                errors += 1;
                first.get_or_insert(format!("code {}: {}", r.error_code, r.error_message));
            }
        }
    }
    Ok((lat, signed, errors, first))
}

async fn one_run(
    server: &Server,
    clients: &[NodeClient<Channel>],
    conns: usize,
    csrs: &[Vec<u8>],
    entry_ids: &[String],
    cfg: &NodeConfig,
) -> Result<NodeRun> {
    let all = batches(csrs, entry_ids, cfg.svids_per_run, cfg.batch);
    let mut lanes: Vec<Vec<BatchNewX509svidRequest>> = vec![Vec::new(); conns];
    for (i, b) in all.into_iter().enumerate() {
        lanes[i % conns].push(b);
    }
    let pid = server.proc.pid();
    let cpu0 = procfs::cpu_time(pid)?;
    let me = std::process::id();
    let client0 = procfs::cpu_time(me)?;
    let idle0 = procfs::machine_idle()?;
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (lane, client) in lanes.into_iter().zip(clients.iter().cloned()) {
        set.spawn(send_all(client, lane));
    }
    let mut run = NodeRun {
        signed: 0,
        errors: 0,
        first_error: None,
        wall: Duration::ZERO,
        batch_latencies: Vec::new(),
        server_cpu: Duration::ZERO,
        client_cpu: Duration::ZERO,
        machine_idle: Duration::ZERO,
        server_rss: 0,
    };
    while let Some(r) = set.join_next().await {
        let (lat, signed, errors, first) = r??;
        run.batch_latencies.extend(lat);
        run.signed += signed;
        run.errors += errors;
        if run.first_error.is_none() {
            run.first_error = first;
        }
    }
    run.wall = start.elapsed();
    run.server_cpu = procfs::cpu_time(pid)?.saturating_sub(cpu0);
    run.client_cpu = procfs::cpu_time(me)?.saturating_sub(client0);
    run.machine_idle = procfs::machine_idle()?.saturating_sub(idle0);
    run.server_rss = procfs::rss_bytes(pid)?;
    Ok(run)
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
    let mut server = Server::start(bin_dir, dir, opts).await?;
    let max_conns = cfg.connections.iter().copied().max().unwrap_or(1).max(1);
    let (agent_id, clients) = attested_clients(&server, max_conns).await?;
    let admin = server.admin().await?;
    let wanted = (0..cfg.entries.max(1))
        .map(|i| {
            harness::entry(
                &crate::crypto::workload_id(i),
                &agent_id,
                &format!("unix:uid:{i}"),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    let stored = harness::create_entries(&admin, wanted, 16).await?;
    let entry_create = t.elapsed();
    let entry_ids: Vec<String> = stored.into_iter().map(|e| e.id).collect();

    // Warm-up: one small batch per connection (TLS handshakes, first allocations).
    for c in &clients {
        let warm = batches(csrs, &entry_ids, cfg.batch.min(50), cfg.batch);
        send_all(c.clone(), warm).await.context("warm-up batch")?;
    }
    server.proc.check_alive()?;
    let server_rss_idle = procfs::rss_bytes(server.proc.pid())?;

    let mut by_connections = Vec::new();
    for &conns in &cfg.connections {
        let mut runs = Vec::new();
        for _ in 0..cfg.runs.max(1) {
            runs.push(
                one_run(
                    &server,
                    &clients[..conns.max(1)],
                    conns.max(1),
                    csrs,
                    &entry_ids,
                    cfg,
                )
                .await?,
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        by_connections.push((conns, runs));
    }
    let server_rss_peak = procfs::status_bytes(server.proc.pid(), "VmHWM")?;
    server.proc.check_alive()?;
    drop(clients);
    server.proc.stop();
    Ok(NodeResult {
        by_connections,
        entries: entry_ids.len(),
        entry_create,
        server_rss_idle,
        server_rss_peak,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
