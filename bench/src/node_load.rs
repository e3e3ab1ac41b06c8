//! Load on the node API of the real `carapace-server` (B1, B3, B8): this process attests as
//! an agent with a join token (the agent library's own node client) and opens mTLS
//! connections with the SVID it got ([`NodeBench::start`]); entries are parented to that
//! agent ([`NodeBench::grow_entries`]); a run sends calls on lanes of its caller's making
//! and measures them ([`NodeBench::run`]): wall time, each call's latency, the server's CPU
//! from `/proc/<pid>/stat`, this process's CPU (the load generator) and the machine's idle
//! time. What a run's calls are (BatchNewX509SVID, NewJWTSVID) is the scenario's.
//! B11 attests its sampled agents with [`AttestedAgent`] alone (one identity, node clients
//! opened again after each server restart).

use std::future::Future;
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

use crate::harness::{self, Server, ServerOptions, workload_id};
use crate::process;
use crate::stats::{Repeated, Summary};

/// What the calls of one lane (or of a whole run) gave.
#[derive(Debug, Clone, Default)]
pub struct Calls {
    /// Latency of each call that got an answer.
    pub latencies: Vec<Duration>,
    /// Items the server returned (SVIDs, tokens).
    pub ok: usize,
    /// Items refused or malformed.
    pub errors: usize,
    /// The first refusal's message.
    pub first_error: Option<String>,
}

impl Calls {
    /// Counts one refused or malformed item.
    pub fn failed(&mut self, message: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(message());
        }
    }

    /// Adds `other`'s calls to these.
    pub fn merge(&mut self, other: Calls) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// One measured run over the node API.
#[derive(Debug, Clone)]
pub struct NodeRun {
    /// Items the server returned (SVIDs, tokens).
    pub signed: usize,
    /// Items refused or malformed.
    pub errors: usize,
    /// The first refusal's message, if any.
    pub first_error: Option<String>,
    /// Wall time of the run.
    pub wall: Duration,
    /// Latency of each call (a whole batch for BatchNewX509SVID).
    pub latencies: Vec<Duration>,
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
    /// Items per second.
    pub fn rate(&self) -> f64 {
        self.signed as f64 / self.wall.as_secs_f64()
    }

    /// Server CPU-µs per item.
    pub fn cpu_us_per_svid(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.signed.max(1) as f64
    }

    /// Average number of idle cores on the machine during the run.
    pub fn idle_cores(&self) -> f64 {
        self.machine_idle.as_secs_f64() / self.wall.as_secs_f64().max(f64::EPSILON)
    }

    /// Load generator (this process) CPU-µs per item.
    pub fn client_cpu_us_per_svid(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / self.signed.max(1) as f64
    }
}

/// What a node API benchmark measured on one server.
#[derive(Debug, Clone)]
pub struct NodeResult {
    /// The runs, by connection count.
    pub by_connections: Vec<(usize, Vec<NodeRun>)>,
    /// Entries parented to the benchmark agent.
    pub entries: usize,
    /// Time to create them through the admin API.
    pub entry_create: Duration,
    /// Server VmRSS after start-up, attestation, entry creation and warm-up.
    pub server_rss_idle: u64,
    /// Server VmHWM (peak RSS) after the runs.
    pub server_rss_peak: u64,
}

/// The highest median items/s over the connection counts: (connections, runs).
pub fn best_connections(n: &NodeResult) -> Option<(usize, Repeated)> {
    n.by_connections
        .iter()
        .filter_map(|(c, runs)| {
            let rates: Vec<f64> = runs.iter().map(|x| x.rate()).collect();
            Repeated::of(&rates).map(|r| (*c, r))
        })
        .max_by(|a, b| a.1.median.total_cmp(&b.1.median))
}

/// The median over every run of `n` of `f`.
pub fn median_over_runs(n: &NodeResult, f: impl Fn(&NodeRun) -> f64) -> Option<f64> {
    let v: Vec<f64> = n
        .by_connections
        .iter()
        .flat_map(|(_, runs)| runs.iter().map(&f))
        .collect();
    Repeated::of(&v).map(|r| r.median)
}

/// What the report tables show of one connection count's repeated runs (B1, B3, B8).
#[derive(Debug, Clone)]
pub struct RunsSummary {
    /// Items/s.
    pub rate: Option<Repeated>,
    /// Server CPU-µs per item.
    pub server_cpu_us: Option<Repeated>,
    /// Load generator CPU-µs per item.
    pub client_cpu_us: Option<Repeated>,
    /// Per-call latency, µs, over every call of every run.
    pub latency: Option<Summary>,
    /// Where the cores went in each run ([`node_cores`]).
    pub cores: Vec<(f64, f64, f64)>,
    /// Server VmRSS after the last run.
    pub server_rss: Option<u64>,
    /// The errors column: the count, with the first error when there were any.
    pub errors: String,
}

impl RunsSummary {
    /// The summary of `runs` on a machine of `nproc` cores.
    pub fn of(runs: &[NodeRun], nproc: usize) -> RunsSummary {
        let per_run =
            |f: fn(&NodeRun) -> f64| Repeated::of(&runs.iter().map(f).collect::<Vec<_>>());
        let latencies: Vec<Duration> = runs
            .iter()
            .flat_map(|x| x.latencies.iter().copied())
            .collect();
        let errors: usize = runs.iter().map(|x| x.errors).sum();
        RunsSummary {
            rate: per_run(NodeRun::rate),
            server_cpu_us: per_run(NodeRun::cpu_us_per_svid),
            client_cpu_us: per_run(NodeRun::client_cpu_us_per_svid),
            latency: Summary::of_durations_us(&latencies),
            cores: runs.iter().map(|x| node_cores(x, nproc)).collect(),
            server_rss: runs.last().map(|x| x.server_rss),
            errors: match runs.iter().find_map(|x| x.first_error.clone()) {
                Some(e) if errors > 0 => format!("{errors} (first: {e})"),
                _ => errors.to_string(),
            },
        }
    }
}

/// Where the machine's cores went during one node API run: (ours = server + load
/// generator, idle, other processes and hypervisor steal), averaged over the run.
pub fn node_cores(x: &NodeRun, nproc: usize) -> (f64, f64, f64) {
    let wall = x.wall.as_secs_f64().max(f64::EPSILON);
    let ours = (x.server_cpu + x.client_cpu).as_secs_f64() / wall;
    let idle = x.idle_cores();
    (ours, idle, (nproc as f64 - ours - idle).max(0.0))
}

/// The real server, this process attested to it as an agent, its mTLS clients and the
/// entries parented to it.
#[derive(Debug)]
pub struct NodeBench {
    /// The server.
    pub server: Server,
    /// The benchmark agent's SPIFFE ID.
    pub agent_id: String,
    /// One mTLS connection each.
    pub clients: Vec<NodeClient<Channel>>,
    /// The ids of the entries parented to the agent; the `i`-th has the SPIFFE ID
    /// [`workload_id`]`(i)`.
    pub entry_ids: Vec<String>,
    /// Time spent creating them through the admin API.
    pub entry_create: Duration,
}

impl NodeBench {
    /// Starts the server under `dir` with `opts`, attests, and opens `connections`
    /// connections (at least one).
    pub async fn start(
        bin_dir: &Path,
        dir: &Path,
        opts: &ServerOptions,
        connections: usize,
    ) -> Result<NodeBench> {
        let server = Server::start(bin_dir, dir, opts).await?;
        Self::attach(server, connections).await
    }

    /// [`NodeBench::start`] on a server already running (B14's downstream server): attests
    /// to it and opens `connections` connections (at least one); the bench owns it then.
    pub async fn attach(server: Server, connections: usize) -> Result<NodeBench> {
        let (agent_id, clients) = attested_clients(&server, connections.max(1)).await?;
        Ok(NodeBench {
            server,
            agent_id,
            clients,
            entry_ids: Vec::new(),
            entry_create: Duration::ZERO,
        })
    }

    /// Creates entries until `total` are parented to the agent: the `i`-th for
    /// [`workload_id`]`(i)` with the selector `unix:uid:i`, 16 calls in flight.
    pub async fn grow_entries(&mut self, total: usize) -> Result<()> {
        let have = self.entry_ids.len();
        if total <= have {
            return Ok(());
        }
        let admin = self.server.admin().await?;
        let wanted = (have..total)
            .map(|i| harness::entry(&workload_id(i), &self.agent_id, &format!("unix:uid:{i}")))
            .collect::<Result<Vec<_>>>()?;
        let t = Instant::now();
        let stored = harness::create_entries(&admin, wanted, 16).await?;
        self.entry_create += t.elapsed();
        self.entry_ids.extend(stored.into_iter().map(|e| e.id));
        Ok(())
    }

    /// The server's VmRSS now.
    pub fn server_rss(&mut self) -> Result<u64> {
        self.server.proc.check_alive()?;
        process::rss_bytes(self.server.proc.pid())
    }

    /// Runs `lanes` at once (each a task sending its calls one after the other) and
    /// measures the run.
    pub async fn run<F>(&self, lanes: Vec<F>) -> Result<NodeRun>
    where
        F: Future<Output = Result<Calls>> + Send + 'static,
    {
        let pid = self.server.proc.pid();
        let me = std::process::id();
        let cpu0 = process::cpu_time(pid)?;
        let client0 = process::cpu_time(me)?;
        let idle0 = process::machine_idle()?;
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for lane in lanes {
            set.spawn(lane);
        }
        let mut calls = Calls::default();
        while let Some(r) = set.join_next().await {
            calls.merge(r??);
        }
        let wall = start.elapsed();
        Ok(NodeRun {
            signed: calls.ok,
            errors: calls.errors,
            first_error: calls.first_error,
            wall,
            latencies: calls.latencies,
            server_cpu: process::cpu_time(pid)?.saturating_sub(cpu0),
            client_cpu: process::cpu_time(me)?.saturating_sub(client0),
            machine_idle: process::machine_idle()?.saturating_sub(idle0),
            server_rss: process::rss_bytes(pid)?,
        })
    }

    /// The result of the runs `by_connections` (the server's peak RSS now), the server
    /// still running.
    pub fn result(
        &mut self,
        by_connections: Vec<(usize, Vec<NodeRun>)>,
        server_rss_idle: u64,
    ) -> Result<NodeResult> {
        self.server.proc.check_alive()?;
        Ok(NodeResult {
            by_connections,
            entries: self.entry_ids.len(),
            entry_create: self.entry_create,
            server_rss_idle,
            server_rss_peak: process::status_bytes(self.server.proc.pid(), "VmHWM")?,
        })
    }

    /// Closes the connections and stops the server.
    pub fn stop(mut self) {
        self.clients.clear();
        self.server.proc.stop();
    }
}

/// Attests as an agent; returns its SPIFFE ID and `n` mTLS node clients (one
/// connection each).
async fn attested_clients(server: &Server, n: usize) -> Result<(String, Vec<NodeClient<Channel>>)> {
    let agent = AttestedAgent::attest(server).await?;
    let clients = (0..n)
        .map(|_| agent.client(&server.addr))
        .collect::<Result<Vec<_>>>()?;
    Ok((agent.agent_id, clients))
}

/// An agent identity this process holds: attested with a join token from the server's
/// CLI, its SVID and key, and the bundle it trusts; node clients are opened with it
/// ([`AttestedAgent::client`]), also to the same server after a restart.
pub(crate) struct AttestedAgent {
    /// Its SPIFFE ID.
    pub(crate) agent_id: String,
    chain: Vec<Vec<u8>>,
    key: Arc<dyn carapace_core::plugin::KeySigner>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    server_id: carapace_core::SpiffeId,
}

impl std::fmt::Debug for AttestedAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestedAgent")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

impl AttestedAgent {
    /// Attests to `server` with a new join token (the agent library's own node client).
    pub(crate) async fn attest(server: &Server) -> Result<AttestedAgent> {
        let pem = server.bundle_pem().await?;
        Self::attest_with(server, &pem).await
    }

    /// [`Self::attest`], trusting the bundle `pem` (from `bundle show`) to reach the
    /// server: attesting many agents, the bundle is read once.
    pub(crate) async fn attest_with(server: &Server, pem: &str) -> Result<AttestedAgent> {
        let token = server.token().await?;
        let bundle = TrustBundle::from_pem(server.td.clone(), pem)
            .map_err(|e| anyhow!("bundle show: {e}"))?;
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
        // The verifiers keep reading the last bundle after the sender is gone.
        drop(bundle_tx);
        Ok(AttestedAgent {
            agent_id,
            chain,
            key,
            bundle: bundle_rx,
            server_id: server.td.server_id(),
        })
    }

    /// A new mTLS node client to `addr` with this agent's SVID (one connection, opened
    /// lazily on the first call).
    pub(crate) fn client(&self, addr: &str) -> Result<NodeClient<Channel>> {
        let tls = carapace_tls::client_config(
            self.bundle.clone(),
            self.server_id.clone(),
            Some(carapace_tls::certified_key(&self.chain, self.key.clone())),
        )?;
        Ok(node_client::channel(addr, Arc::new(tls))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_merge_keeps_the_first_error() {
        let mut a = Calls {
            ok: 2,
            latencies: vec![Duration::from_millis(1)],
            ..Calls::default()
        };
        let mut b = Calls::default();
        b.failed(|| "first".into());
        b.failed(|| "second".into());
        a.merge(b);
        let mut c = Calls::default();
        c.failed(|| "third".into());
        a.merge(c);
        assert_eq!((a.ok, a.errors, a.latencies.len()), (2, 3, 1));
        assert_eq!(a.first_error.as_deref(), Some("first"));
    }

    #[test]
    fn cores_split_into_ours_idle_and_others() {
        let run = NodeRun {
            signed: 1_000,
            errors: 0,
            first_error: None,
            wall: Duration::from_secs(1),
            latencies: Vec::new(),
            server_cpu: Duration::from_millis(1_200),
            client_cpu: Duration::from_millis(300),
            machine_idle: Duration::from_millis(400),
            server_rss: 0,
        };
        let (ours, idle, others) = node_cores(&run, 2);
        assert!((ours - 1.5).abs() < 1e-9 && (idle - 0.4).abs() < 1e-9);
        assert!((others - 0.1).abs() < 1e-9);
        assert!((run.cpu_us_per_svid() - 1_200.0).abs() < 1e-9);
        assert!((run.rate() - 1_000.0).abs() < 1e-9);
    }
}
