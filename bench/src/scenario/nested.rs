//! B14 (issue 20): nested servers. Three parts, each a `Result` of its own ([`run`]); the
//! report's section is [`section`].
//!
//! 1. **Intermediate CA signing at the upstream, in process** ([`sign_latencies`]): the
//!    server's own [`CaManager::sign_downstream_ca`] (what the root runs for a
//!    `MintDownstreamCA` call: parse and check the CSR, build the intermediate, sign it
//!    with the active CA key) over `Datastore::open_in_memory()`, one call at a time, a
//!    fresh P-256 CSR each (URI SAN `spiffe://example.org`, made up front). With the CA
//!    key in a [`MemoryKeyManager`], and in a SoftHSM2 token: SoftHSM2 reads
//!    `SOFTHSM2_CONF` from the environment, so that half runs in a child
//!    (`carapace-bench` [`CHILD_FLAG`] `<JSON>`, [`child`]) like B3's raw rate.
//! 2. **`localauthority x509 prepare` on a downstream server, end to end**
//!    ([`run_wire`]): the release `carapace-server` as root (`[downstream]`), a release
//!    `carapace-agent` of the root beside the downstream server, the downstream's entry
//!    on the root marked `--downstream` (selected by the server executable's path and
//!    the uid), and a release `carapace-server` with `[upstream_authority.carapace]`
//!    (the root's node API and the agent's Workload API socket). Each sample is the
//!    wall time of the CLI command (process start included): the downstream generates a
//!    key, makes a CSR, calls the root's `MintDownstreamCA` over mutual TLS with its
//!    workload SVID, checks and stores the answer. The root allows a caller 3 mints at
//!    once and 6 per minute: the samples are spaced (the pause is not timed).
//! 3. **Issuance rate of the downstream beside the root's**, in the same run: this
//!    process attests as an agent to each server (B1's [`NodeBench`]), creates the same
//!    number of entries on each, and sends the same CSRs in `BatchNewX509SVID` calls
//!    (B1's batches), runs alternating root / downstream. A downstream SVID's chain is
//!    leaf + downstream CA (checked on one call to each).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use carapace_core::plugin::KeyManager;
use carapace_core::{KeyType, SpiffeId, TrustDomain};
use carapace_keymanager_pkcs11::{Pkcs11Config, Pkcs11KeyManager};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_proto::node::{BatchNewX509svidRequest, NewX509svidParams};
use carapace_server::ca::downstream::DownstreamCaRequest;
use carapace_server::ca::{CaManager, CaSettings};
use carapace_server::config::Downstream;
use carapace_server::datastore::Datastore;
use hsm_sim::softhsm::SoftHsm;

use super::issuance::{self, NodeConfig};
use crate::harness::{Agent, Server, ServerOptions, TRUST_DOMAIN};
use crate::node_load::{NodeBench, NodeResult, RunsSummary, best_connections};
use crate::pkcs11::{NEEDS_SOFTHSM, softhsm_description};
use crate::process;
use crate::report::{Report, Table, failed};
use crate::stats::{Summary, fmt_bytes, fmt_count, fmt_pct, fmt_us};

/// The hidden mode of `carapace-bench` in which part 1 runs with the CA key in SoftHSM2.
pub const CHILD_FLAG: &str = "--nested-sign-child";

/// The downstream server's SPIFFE ID (its entry on the root).
const DOWNSTREAM_ID: &str = "spiffe://example.org/downstream/bench";

/// The root's CA lifetime; `[downstream] ca_ttl_max` is its default, a sixth of it.
const ROOT_CA_TTL: &str = "36h";
/// The downstream's CA lifetime: what the root grants, and six times the SVID lifetime
/// (the default 1 h on both servers, which a server requires to be at most `ca_ttl`/6).
const DOWNSTREAM_CA_TTL: &str = "6h";

/// Part 1's grant, as `[downstream]` with `max_depth = 1` and the default `ca_ttl_max`.
fn grant() -> Downstream {
    Downstream {
        max_depth: 1,
        ca_ttl_max: Duration::from_secs(6 * 3600),
    }
}

/// Calls before the timed ones in part 1 (key handles, allocator, CPU frequency).
const WARM_UP_SIGNS: usize = 10;

/// B14's sizes.
#[derive(Debug, Clone)]
pub struct B14Plan {
    /// Part 1: timed `sign_downstream_ca` calls per key manager.
    pub signs: usize,
    /// Part 2: `localauthority x509 prepare` samples.
    pub prepares: usize,
    /// Part 2: the pause between two samples (the root's rate limit: 6 per minute).
    pub prepare_gap: Duration,
    /// Part 3: the P-256 CSRs generated up front.
    pub csrs: usize,
    /// Part 3: the node API runs, on each server.
    pub node: NodeConfig,
}

impl B14Plan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> B14Plan {
        if quick {
            B14Plan {
                signs: 50,
                prepares: 3,
                prepare_gap: Duration::from_millis(10_500),
                csrs: 2_000,
                node: NodeConfig {
                    entries: 200,
                    svids_per_run: 2_000,
                    batch: 500,
                    runs: 1,
                    connections: vec![1, 2],
                },
            }
        } else {
            B14Plan {
                signs: 200,
                prepares: 20,
                prepare_gap: Duration::from_millis(10_500),
                csrs: 10_000,
                node: NodeConfig {
                    entries: 1_000,
                    svids_per_run: 10_000,
                    batch: 500,
                    runs: 3,
                    connections: vec![1, 2],
                },
            }
        }
    }
}

/// The SoftHSM2 half of part 1: the token's description and the latencies.
#[derive(Debug)]
pub struct HsmSigns {
    /// SoftHSM2's version, module and crypto library.
    pub softhsm: String,
    /// One per timed call.
    pub latencies: Vec<Duration>,
}

/// Parts 2 and 3's figures (one set of processes).
#[derive(Debug)]
pub struct Wire {
    /// Part 2: the wall time of each `localauthority x509 prepare`.
    pub prepares: Vec<Duration>,
    /// Part 3 on the root server.
    pub root: NodeResult,
    /// Part 3 on the downstream server.
    pub down: NodeResult,
    /// Certificates in an SVID's chain from the root / from the downstream.
    pub chain_len: (usize, usize),
    /// Load average when part 3 began.
    pub loadavg: String,
}

/// What B14 measured; each part may have failed on its own.
#[derive(Debug)]
pub struct B14 {
    /// Load average when B14 began.
    pub loadavg: String,
    /// Part 1, software key.
    pub soft: Result<Vec<Duration>>,
    /// Part 1, key in SoftHSM2.
    pub hsm: Result<HsmSigns>,
    /// Parts 2 and 3.
    pub wire: Result<Wire>,
}

impl B14 {
    /// The failed parts, as errors (for the exit status).
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        let mut out = Vec::new();
        out.extend(self.soft.err());
        out.extend(self.hsm.err());
        out.extend(self.wire.err());
        out
    }
}

/// `n` CSRs for fresh P-256 CA keys, each with the one URI SAN `spiffe://<td>` (what a
/// downstream server sends when it prepares a CA).
pub fn ca_csrs(n: usize) -> Result<Vec<Vec<u8>>> {
    let san = rcgen::SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}")
            .try_into()
            .map_err(|e| anyhow!("URI SAN: {e}"))?,
    );
    (0..n)
        .map(|_| {
            let kp = rcgen::KeyPair::generate().context("P-256 key generation")?;
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = vec![san.clone()];
            Ok(params.serialize_request(&kp).context("CSR")?.der().to_vec())
        })
        .collect()
}

/// A CA like a root server's with `[downstream] max_depth = 1` (its CA may certify one
/// tier below it), its keys in `km`; then `calls` timed `sign_downstream_ca` calls one
/// after the other (after [`WARM_UP_SIGNS`]), each on a fresh CSR.
pub async fn sign_latencies(km: Arc<dyn KeyManager>, calls: usize) -> Result<Vec<Duration>> {
    let ds = Datastore::open_in_memory().await?;
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let settings = CaSettings {
        ca_ttl: Duration::from_secs(36 * 3600),
        key_type: KeyType::EcP256,
        organization: "Carapace".into(),
        country: "US".into(),
        jwt_key_type: KeyType::EcP256,
        server_id: "bench".into(),
        path_len: 1,
    };
    let now = carapace_core::clock::unix_now();
    let ca = CaManager::load(td, km, None, ds, settings, now).await?;
    let csrs = ca_csrs(calls + WARM_UP_SIGNS)?;
    let caller: SpiffeId = DOWNSTREAM_ID.parse().map_err(|e| anyhow!("{e}"))?;
    let grant = grant();
    let mut out = Vec::with_capacity(calls);
    for (i, csr) in csrs.iter().enumerate() {
        let req = DownstreamCaRequest {
            csr_der: csr,
            preferred_ttl: Duration::ZERO,
            path_len: 0,
            caller: &caller,
        };
        let t = Instant::now();
        let signed = ca
            .sign_downstream_ca(Some(&grant), req, carapace_core::clock::unix_now())
            .await?;
        let took = t.elapsed();
        if signed.chain.is_empty() {
            bail!("sign_downstream_ca returned no certificate");
        }
        if i >= WARM_UP_SIGNS {
            out.push(took);
        }
    }
    Ok(out)
}

/// The child's arguments (one JSON argument after [`CHILD_FLAG`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildArgs {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token label.
    pub token_label: String,
    /// The file holding the user PIN.
    pub pin_file: PathBuf,
    /// Timed calls.
    pub calls: usize,
}

/// What the child prints (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildOutput {
    /// Each timed call, ns.
    pub latencies_ns: Vec<u64>,
}

/// The child: [`sign_latencies`] with the CA key generated in the token. Must run with
/// `SOFTHSM2_CONF` in its environment.
pub fn child(args: &ChildArgs) -> Result<ChildOutput> {
    let cfg = Pkcs11Config {
        module: args.module.clone(),
        token_label: Some(args.token_label.clone()),
        pin_file: Some(args.pin_file.clone()),
        key_label_prefix: Some("bench-".into()),
        sessions: Some(1),
        ..Pkcs11Config::default()
    };
    let km = Pkcs11KeyManager::open(&cfg).map_err(|e| anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let latencies = rt.block_on(sign_latencies(Arc::new(km), args.calls))?;
    Ok(ChildOutput {
        latencies_ns: latencies
            .iter()
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .collect(),
    })
}

async fn hsm_signs(calls: usize) -> Result<HsmSigns> {
    let hsm = SoftHsm::new().with_context(|| format!("B14 {NEEDS_SOFTHSM}"))?;
    let token = hsm.init_token("bench-b14")?;
    let args = ChildArgs {
        module: hsm.module().to_path_buf(),
        token_label: token.label.clone(),
        pin_file: token.pin_file.clone(),
        calls,
    };
    let out: ChildOutput = process::run_json_child(CHILD_FLAG, &args, &hsm.envs()).await?;
    Ok(HsmSigns {
        softhsm: softhsm_description(hsm.module()),
        latencies: out
            .latencies_ns
            .into_iter()
            .map(Duration::from_nanos)
            .collect(),
    })
}

/// One `BatchNewX509SVID` of one CSR to `bench`'s server: the certificates in the SVID's
/// chain.
async fn chain_len(bench: &NodeBench, csr: &[u8]) -> Result<usize> {
    let mut client = bench
        .clients
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("no node client"))?;
    let entry_id = bench
        .entry_ids
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("no entry"))?;
    let resp = client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id,
                csr: csr.to_vec(),
            }],
        })
        .await
        .map_err(|s| anyhow!("BatchNewX509SVID: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let svid = resp
        .results
        .into_iter()
        .next()
        .and_then(|r| r.svid)
        .ok_or_else(|| anyhow!("BatchNewX509SVID returned no SVID"))?;
    Ok(svid.cert_chain.len())
}

/// Parts 2 and 3 on one set of release processes under `dir`.
pub async fn run_wire(bin_dir: &Path, dir: &Path, plan: &B14Plan) -> Result<Wire> {
    let cfg = &plan.node;
    let nproc = std::thread::available_parallelism().map_or(1, usize::from);
    eprintln!("==> B14: generating {} P-256 CSRs", plan.csrs);
    let csrs = issuance::generate_csrs(plan.csrs, nproc)?;
    let max_conns = cfg.connections.iter().copied().max().unwrap_or(1).max(1);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    // The root, serving downstream servers.
    let root_toml = dir.join("root.toml");
    std::fs::write(
        &root_toml,
        format!("ca_ttl = \"{ROOT_CA_TTL}\"\n[downstream]\n"),
    )?;
    let root_opts = ServerOptions {
        config: Some(root_toml),
        envs: Vec::new(),
    };
    eprintln!("==> B14: root server, its agent, the downstream server");
    let mut root = NodeBench::start(bin_dir, &dir.join("root"), &root_opts, max_conns).await?;
    let upper = Agent::start(bin_dir, &dir.join("upper-agent"), &root.server).await?;
    let exe = std::fs::canonicalize(bin_dir.join("carapace-server"))
        .context("locating carapace-server")?;
    let uid = rustix::process::getuid().as_raw();
    root.server
        .cli(&[
            "entry",
            "create",
            "--parent-id",
            &upper.agent_id,
            "--spiffe-id",
            DOWNSTREAM_ID,
            "--selector",
            &format!("unix:path:{}", exe.display()),
            "--selector",
            &format!("unix:uid:{uid}"),
            "--downstream",
        ])
        .await?;

    // The downstream server: its CA minted by the root as it starts.
    let down_toml = dir.join("downstream.toml");
    let mut upstream = toml::Table::new();
    upstream.insert("server_address".into(), root.server.addr.clone().into());
    upstream.insert(
        "workload_api_socket".into(),
        upper.socket.to_string_lossy().into_owned().into(),
    );
    let mut ua = toml::Table::new();
    ua.insert("carapace".into(), toml::Value::Table(upstream));
    let mut top = toml::Table::new();
    top.insert("ca_ttl".into(), DOWNSTREAM_CA_TTL.into());
    top.insert("upstream_authority".into(), toml::Value::Table(ua));
    std::fs::write(&down_toml, toml::to_string(&top)?)?;
    let down_opts = ServerOptions {
        config: Some(down_toml),
        envs: Vec::new(),
    };
    let down_server = Server::start(bin_dir, &dir.join("downstream"), &down_opts).await?;
    let mut down = NodeBench::attach(down_server, max_conns).await?;

    // Part 3: the same entries, the same CSRs, runs alternating.
    root.grow_entries(cfg.entries.max(1)).await?;
    down.grow_entries(cfg.entries.max(1)).await?;
    let first = csrs.first().ok_or_else(|| anyhow!("no CSRs"))?;
    let chain = (
        chain_len(&root, first).await?,
        chain_len(&down, first).await?,
    );
    if chain != (1, 2) {
        bail!(
            "SVID chains: {} certificate(s) from the root, {} from the downstream (expected 1 and 2: the downstream's leaf carries its CA)",
            chain.0,
            chain.1
        );
    }
    for bench in [&root, &down] {
        issuance::warm_up(bench, &csrs, cfg).await?;
    }
    let rss_idle = (root.server_rss()?, down.server_rss()?);
    let loadavg = process::loadavg_now();
    let mut root_runs = Vec::new();
    let mut down_runs = Vec::new();
    for &conns in &cfg.connections {
        let conns = conns.clamp(1, max_conns);
        eprintln!(
            "==> B14: BatchNewX509SVID, {conns} connection(s), {} run(s) of {} SVIDs on each server",
            cfg.runs, cfg.svids_per_run
        );
        let (mut r, mut d) = (Vec::new(), Vec::new());
        for _ in 0..cfg.runs.max(1) {
            r.push(issuance::one_run(&root, conns, &csrs, cfg).await?);
            tokio::time::sleep(Duration::from_millis(200)).await;
            d.push(issuance::one_run(&down, conns, &csrs, cfg).await?);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        root_runs.push((conns, r));
        down_runs.push((conns, d));
    }
    let root_result = root.result(root_runs, rss_idle.0)?;
    let down_result = down.result(down_runs, rss_idle.1)?;

    // Part 2: prepares on the downstream, spaced for the root's rate limit.
    let mut prepares = Vec::with_capacity(plan.prepares);
    for i in 0..plan.prepares {
        tokio::time::sleep(plan.prepare_gap).await;
        eprintln!(
            "==> B14: localauthority x509 prepare {}/{}",
            i + 1,
            plan.prepares
        );
        let t = Instant::now();
        let out = down
            .server
            .cli(&["localauthority", "x509", "prepare", "--output", "json"])
            .await?;
        prepares.push(t.elapsed());
        let v: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("localauthority x509 prepare: not JSON: {out}"))?;
        if v.get("authority_id").and_then(|x| x.as_str()).is_none() {
            bail!("localauthority x509 prepare: no authority_id in {out}");
        }
    }
    // Every prepared CA was certified by the root: the downstream's state says so.
    let show = down
        .server
        .cli(&["localauthority", "x509", "show", "--output", "json"])
        .await?;
    let state: serde_json::Value = serde_json::from_str(&show)
        .with_context(|| format!("localauthority x509 show: not JSON: {show}"))?;
    let upstream_of = |slot: &str| state.get(slot).and_then(|s| s.get("upstream")).cloned();
    if plan.prepares > 0
        && (upstream_of("prepared").is_none_or(|u| u.is_null())
            || upstream_of("prepared") != upstream_of("active"))
    {
        bail!("the prepared CA is not certified by the root's upstream: {state}");
    }

    down.stop();
    drop(upper);
    root.stop();
    Ok(Wire {
        prepares,
        root: root_result,
        down: down_result,
        chain_len: chain,
        loadavg,
    })
}

/// B14: part 1 (software key, then SoftHSM2 in a child), then parts 2 and 3 on release
/// processes.
pub async fn run(bin_dir: &Path, dir: &Path, plan: &B14Plan) -> Result<B14> {
    let loadavg = process::loadavg_now();
    eprintln!(
        "==> B14: sign_downstream_ca in process, {} calls, software key",
        plan.signs
    );
    let soft = sign_latencies(Arc::new(MemoryKeyManager::new()), plan.signs).await;
    eprintln!(
        "==> B14: sign_downstream_ca in process, {} calls, key in SoftHSM2",
        plan.signs
    );
    let hsm = hsm_signs(plan.signs).await;
    let wire = run_wire(bin_dir, &dir.join("wire"), plan).await;
    Ok(B14 {
        loadavg,
        soft,
        hsm,
        wire,
    })
}

fn latency_row(t: &mut Table, what: &str, samples: &[Duration]) {
    if let Some(s) = Summary::of_durations_us(samples) {
        t.row([
            what.to_owned(),
            s.n.to_string(),
            fmt_us(s.p50),
            fmt_us(s.p99),
            fmt_us(s.max),
        ]);
    }
}

/// B14's report.
pub fn section(r: &mut Report, b14: &B14, plan: &B14Plan, nproc: usize) {
    r.para(&format!(
        "Load average when B14 began: {}. One root server, one agent of it, one downstream server, all release builds on this machine, sharing its {nproc} cores with the load generator (this process).",
        b14.loadavg
    ));
    r.heading(
        3,
        "Intermediate CA signing at the upstream (in process) and `localauthority x509 prepare` on a downstream (end to end)",
    );
    r.para(&format!(
        "In process: `CaManager::sign_downstream_ca` (what the root runs for `MintDownstreamCA`: parse and check the CSR, build the intermediate, sign it with the active P-256 CA key) over `Datastore::open_in_memory()`, `[downstream] max_depth = 1`, one call at a time on a fresh CSR (P-256, URI SAN `spiffe://{TRUST_DOMAIN}`), {WARM_UP_SIGNS} calls of warm-up; the CA key in `MemoryKeyManager`, then generated in a SoftHSM2 token (`sessions = 1`, in a child process with `SOFTHSM2_CONF`). End to end: the wall time of `carapace-server localauthority x509 prepare --output json` against the downstream's admin socket (CLI process start included): key generation, CSR, the Workload API SVID, mutual TLS to the root, `MintDownstreamCA`, checks, store. The root allows a caller 3 mints at once and 6 per minute (token bucket), so the samples are {:.1} s apart (the pause is not timed); after them, `localauthority x509 show` confirms the prepared CA has the active one's upstream.",
        plan.prepare_gap.as_secs_f64()
    ));
    let mut t = Table::new(["what", "samples", "p50", "p99", "max"]);
    match &b14.soft {
        Ok(l) => latency_row(&mut t, "`sign_downstream_ca`, software key", l),
        Err(e) => failed(r, "sign_downstream_ca with the software key", e),
    }
    match &b14.hsm {
        Ok(h) => latency_row(
            &mut t,
            "`sign_downstream_ca`, key in SoftHSM2",
            &h.latencies,
        ),
        Err(e) => failed(r, "sign_downstream_ca with the key in SoftHSM2", e),
    }
    if let Ok(w) = &b14.wire {
        latency_row(
            &mut t,
            "**`localauthority x509 prepare` on the downstream (through the root)**",
            &w.prepares,
        );
    }
    r.table(&t);
    if let Ok(h) = &b14.hsm {
        r.bullet(&h.softhsm);
    }

    r.heading(
        3,
        "Issuance rate: the downstream server beside the root, same run",
    );
    let w = match &b14.wire {
        Ok(w) => w,
        Err(e) => {
            failed(r, "B14 on the release processes", e);
            return;
        }
    };
    r.para(&format!(
        "B1's node API load against each server: this process attests to it with a join token, creates {} entries parented to itself (admin API), and sends the same {} pre-generated P-256 CSRs in `BatchNewX509SVID` calls of {} over 1 and 2 mTLS connections, {} run(s) per connection count, alternating root / downstream. SVIDs from the root carry {} certificate, from the downstream {} (leaf + downstream CA). Load average when this part began: {}.",
        fmt_count(plan.node.entries as f64),
        fmt_count(plan.csrs as f64),
        plan.node.batch,
        plan.node.runs,
        w.chain_len.0,
        w.chain_len.1,
        w.loadavg
    ));
    let mut t = Table::new([
        "server",
        "connections",
        "SVIDs/s: median (range, runs)",
        "batch latency p50",
        "p99",
        "server CPU-µs per SVID (median)",
        "server RSS after",
        "errors",
    ]);
    for (label, n) in [("root", &w.root), ("downstream", &w.down)] {
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
                sum.server_rss
                    .map(|b| fmt_bytes(b as f64))
                    .unwrap_or_default(),
                sum.errors,
            ]);
        }
    }
    r.table(&t);
    for (conns, root_runs) in &w.root.by_connections {
        let down_runs = w
            .down
            .by_connections
            .iter()
            .find(|(c, _)| c == conns)
            .map(|(_, r)| r);
        let (Some(rr), Some(dr)) = (
            RunsSummary::of(root_runs, nproc).rate,
            down_runs.and_then(|d| RunsSummary::of(d, nproc).rate),
        ) else {
            continue;
        };
        r.bullet(&format!(
            "{conns} connection(s): downstream / root = {} / {} = **{}**",
            fmt_count(dr.median),
            fmt_count(rr.median),
            fmt_pct(dr.median / rr.median)
        ));
    }
    if let (Some((rc, rr)), Some((dc, dr))) = (best_connections(&w.root), best_connections(&w.down))
    {
        r.bullet(&format!(
            "Best of each: root {} SVIDs/s ({rc} connection(s)), downstream {} ({dc}): **{}**.",
            fmt_count(rr.median),
            fmt_count(dr.median),
            fmt_pct(dr.median / rr.median)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_downstream_ca_is_signed_and_timed_in_process() {
        let l = sign_latencies(Arc::new(MemoryKeyManager::new()), 3)
            .await
            .unwrap();
        assert_eq!(l.len(), 3);
        assert!(l.iter().all(|d| *d > Duration::ZERO));
    }

    #[test]
    fn ca_csrs_carry_the_trust_domain_uri() {
        let csrs = ca_csrs(2).unwrap();
        assert_eq!(csrs.len(), 2);
        assert_ne!(csrs[0], csrs[1]);
        let needle = format!("spiffe://{TRUST_DOMAIN}");
        assert!(
            csrs[0]
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        );
    }

    #[test]
    fn child_args_round_trip_as_json() {
        let a = ChildArgs {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "bench-b14".into(),
            pin_file: "/tmp/x.pin".into(),
            calls: 7,
        };
        let back: ChildArgs = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.calls, 7);
        assert_eq!(back.token_label, "bench-b14");
    }
}
