//! B11 (S4, issue 17): a trust domain of 1,000,000 entries over 10,000 agents, once per
//! datastore engine: the embedded SQLite (the default) and a real PostgreSQL that this
//! benchmark starts ([`hsm_sim::postgres::Postgres`], as B9 does).
//!
//! Per engine ([`run`]): the real release `carapace-server` is started (its VmRSS then is
//! the baseline); this process attests `attested` agents to it (all `agents` by default)
//! with join tokens from its CLI, eight at a time ([`AttestedAgent`]); a file in SPIRE's
//! `-data` format is written as a stream ([`write_data_file`]: entry `i` is
//! `spiffe://example.org/w/<i>`, parented to agent `i % agents`, with the selector
//! `unix:uid:<1000 + i / agents>`; the first parent IDs are the attested agents', any
//! others synthetic join-token agent IDs that never attest, [`parent_ids`]); the real CLI creates them (`carapace-server entry
//! create --data FILE`, batches of 1,000, each one transaction), timed, and the admin
//! API's `CountEntries` must then say `entries`. The server's VmRSS gives the memory
//! per entry. Then the server is restarted `restarts` times on the same data (SIGTERM,
//! time to exit; spawn → admin `Health` answers, which the server does only once its
//! entry index is loaded and its node API bound; spawn → the first `SyncAuthorized`
//! message of the first agent, with its entries: "restart to serving"). On the last
//! restart's server, the full `SyncAuthorized` (no resume) of each of `sample` agents,
//! spread evenly over the attested ones ([`sample_indices`]), is timed to
//! its first message, which must hold exactly the agent's entries ([`expected_entries`]):
//! `rounds` rounds one agent after the other, then `rounds` rounds of every sampled agent
//! at once. The report's section is [`section`].

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use tonic::transport::Channel;

use carapace_proto::admin::ListEntriesRequest;
use carapace_proto::node::SyncAuthorizedRequest;
use carapace_proto::node::node_client::NodeClient;

use crate::harness::{self, Server, ServerOptions};
use crate::node_load::AttestedAgent;
use crate::process;
use crate::report::{Report, Table, failed};
use crate::stats::{Summary, fmt_bytes, fmt_count, fmt_secs, fmt_us};

/// The goal (issue 17, S4): a restarted server serves within this.
pub const GOAL_RESTART: Duration = Duration::from_secs(10);

/// The goal (issue 17, S4): per-agent authorized-entry sync p99, µs.
pub const GOAL_SYNC_P99_US: f64 = 10_000.0;

/// How long the server may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a restarted server may take to answer.
const RESTART_TIMEOUT: Duration = Duration::from_secs(600);

/// How long one `SyncAuthorized` may take to its first message.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The first uid of the entries' selectors (`unix:uid:<UID_BASE + i / agents>`).
const UID_BASE: usize = 1000;

/// The datastore engines B11 runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The embedded SQLite in the server's data dir (the default).
    Sqlite,
    /// The lab PostgreSQL, through `[datastore] url`.
    Postgres,
}

impl Engine {
    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        }
    }

    /// The engines named by `--engine`: `sqlite`, `postgres` or `both`.
    pub fn parse_list(s: &str) -> Result<Vec<Engine>> {
        match s {
            "sqlite" => Ok(vec![Engine::Sqlite]),
            "postgres" | "postgresql" => Ok(vec![Engine::Postgres]),
            "both" => Ok(vec![Engine::Sqlite, Engine::Postgres]),
            other => bail!("--engine {other:?}: expected sqlite, postgres or both"),
        }
    }
}

/// B11's sizes.
#[derive(Debug, Clone)]
pub struct B11Plan {
    /// Entries in the trust domain.
    pub entries: usize,
    /// Parent IDs (agents) they are spread over, evenly.
    pub agents: usize,
    /// Agents this process attests (the first parent IDs; all of them by default).
    pub attested: usize,
    /// Attested agents whose syncs are timed, spread evenly over them.
    pub sample: usize,
    /// Server restarts on the full datastore.
    pub restarts: usize,
    /// Rounds of syncs over the sampled agents, sequential and concurrent.
    pub rounds: usize,
    /// The engines, in order.
    pub engines: Vec<Engine>,
}

impl B11Plan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> B11Plan {
        if quick {
            B11Plan {
                entries: 20_000,
                agents: 200,
                attested: 200,
                sample: 10,
                restarts: 1,
                rounds: 3,
                engines: vec![Engine::Sqlite, Engine::Postgres],
            }
        } else {
            B11Plan {
                entries: 1_000_000,
                agents: 10_000,
                attested: 10_000,
                sample: 100,
                restarts: 3,
                rounds: 10,
                engines: vec![Engine::Sqlite, Engine::Postgres],
            }
        }
    }

    /// Whether the sizes make sense: at least one agent, every sampled agent attested,
    /// every attested agent a parent, and at least one entry per agent.
    pub fn check(&self) -> Result<()> {
        if self.agents == 0 || self.sample == 0 || self.rounds == 0 {
            bail!("B11: agents, sample and rounds must be at least 1 ({self:?})");
        }
        if self.sample > self.attested || self.attested > self.agents {
            bail!(
                "B11: {} sampled agents, {} attested, {} agents: expected sampled <= attested <= agents",
                self.sample,
                self.attested,
                self.agents
            );
        }
        if self.entries < self.agents {
            bail!(
                "B11: {} entries cannot give each of {} agents one",
                self.entries,
                self.agents
            );
        }
        Ok(())
    }
}

/// The `agents` parent IDs of the data file: the `attested` agents' SPIFFE IDs first,
/// then synthetic `spiffe://<td>/spire/agent/join_token/bench-<j>` (j = their index).
pub fn parent_ids(td: &str, attested: &[String], agents: usize) -> Vec<String> {
    let mut out: Vec<String> = attested.iter().take(agents).cloned().collect();
    out.extend(
        (out.len()..agents).map(|j| format!("spiffe://{td}/spire/agent/join_token/bench-{j}")),
    );
    out
}

/// How many of `entries` entries the `j`-th of `agents` parent IDs gets (entry `i` goes
/// to parent `i % agents`).
pub fn expected_entries(entries: usize, agents: usize, j: usize) -> usize {
    if agents == 0 {
        return 0;
    }
    entries / agents + usize::from(j < entries % agents)
}

/// The SPIFFE ID of entry `i`.
pub fn entry_spiffe_id(td: &str, i: usize) -> String {
    format!("spiffe://{td}/w/{i}")
}

/// One entry of the data file, as SPIRE's `-data` has it.
#[derive(Serialize)]
struct DataEntry<'a> {
    spiffe_id: String,
    parent_id: &'a str,
    selectors: [DataSelector; 1],
}

/// A selector of the data file.
#[derive(Serialize)]
struct DataSelector {
    #[serde(rename = "type")]
    kind: &'static str,
    value: String,
}

/// Writes `{"entries": [...]}` with `entries` entries to `w`, one per line, as a stream:
/// entry `i` is [`entry_spiffe_id`]`(i)`, parented to `parents[i % parents.len()]`, with
/// the one selector `unix:uid:<1000 + i / parents.len()>`.
pub fn write_data_file(
    mut w: impl Write,
    td: &str,
    parents: &[String],
    entries: usize,
) -> Result<()> {
    if parents.is_empty() {
        bail!("no parent IDs for the data file");
    }
    let agents = parents.len();
    w.write_all(b"{\"entries\": [\n")?;
    for i in 0..entries {
        if i > 0 {
            w.write_all(b",\n")?;
        }
        let e = DataEntry {
            spiffe_id: entry_spiffe_id(td, i),
            parent_id: &parents[i % agents],
            selectors: [DataSelector {
                kind: "unix",
                value: format!("uid:{}", UID_BASE + i / agents),
            }],
        };
        serde_json::to_writer(&mut w, &e)?;
    }
    w.write_all(b"\n]}\n")?;
    w.flush()?;
    Ok(())
}

/// One restart of the server on the full datastore.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    /// SIGTERM → the process exited.
    pub stop: Duration,
    /// Spawn → the admin API answers `Health`.
    pub to_health: Duration,
    /// Spawn → a sampled agent's first `SyncAuthorized` message arrived with its entries
    /// (on a new connection: TLS handshake included).
    pub to_first_sync: Duration,
}

/// What B11 measured on one engine.
#[derive(Debug, Clone)]
pub struct EngineRun {
    /// The engine.
    pub engine: Engine,
    /// `SELECT version()` of the lab PostgreSQL (PostgreSQL only).
    pub postgres: Option<String>,
    /// Load average when this engine's run began, and when it ended.
    pub loadavg: (String, String),
    /// Server VmRSS right after start, before any entry or agent.
    pub rss_baseline: u64,
    /// Attesting every agent (join tokens from the CLI, eight at a time).
    pub attest: Duration,
    /// Size of the data file.
    pub data_bytes: u64,
    /// Writing it.
    pub data_write: Duration,
    /// Wall time of `entry create --data`.
    pub create: Duration,
    /// Server CPU time during it.
    pub create_server_cpu: Duration,
    /// Server VmRSS after the entries were created.
    pub rss_created: u64,
    /// The restarts, in order.
    pub restarts: Vec<Restart>,
    /// The sequential syncs (every round, every sampled agent).
    pub sync_sequential: Vec<Duration>,
    /// The concurrent syncs (every round, every sampled agent at once).
    pub sync_concurrent: Vec<Duration>,
    /// Server VmRSS after the restarts and syncs (index loaded).
    pub rss_restarted: u64,
    /// Server VmHWM (peak RSS) of the last restarted process.
    pub rss_restarted_peak: u64,
}

impl EngineRun {
    /// Server memory per entry: (`rss` − baseline) / entries.
    pub fn per_entry(&self, rss: u64, entries: usize) -> f64 {
        (rss as f64 - self.rss_baseline as f64) / entries.max(1) as f64
    }
}

/// What B11 measured: one outcome per engine.
#[derive(Debug)]
pub struct B11 {
    /// Per engine, in the plan's order.
    pub runs: Vec<(Engine, Result<EngineRun>)>,
}

impl B11 {
    /// The failed engines, as errors.
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        self.runs
            .into_iter()
            .filter_map(|(e, r)| r.err().map(|err| anyhow!("B11 {}: {err:#}", e.label())))
            .collect()
    }
}

/// Runs B11 under `dir`, each engine in turn (an engine's failure does not stop the
/// others).
pub async fn run(bin_dir: &Path, dir: &Path, plan: &B11Plan) -> Result<B11> {
    plan.check()?;
    let mut runs = Vec::new();
    for &engine in &plan.engines {
        let sub = dir.join(engine.label().to_lowercase());
        eprintln!(
            "==> B11 on {}: {} entries over {} agents ({} attested, {} timed)",
            engine.label(),
            plan.entries,
            plan.agents,
            plan.attested,
            plan.sample
        );
        let r = run_engine(bin_dir, &sub, plan, engine).await;
        if let Err(e) = &r {
            eprintln!("==> B11 on {} failed: {e:#}", engine.label());
        }
        // The data dir of a million entries is large: not kept for the next engine.
        let _ = std::fs::remove_dir_all(&sub);
        runs.push((engine, r));
    }
    Ok(B11 { runs })
}

/// Attestations in flight at once while attesting every agent.
const ATTEST_IN_FLIGHT: usize = 8;

/// Attests `n` agents to `server`, [`ATTEST_IN_FLIGHT`] at a time, in order.
async fn attest_all(server: &Server, pem: &str, n: usize) -> Result<Vec<AttestedAgent>> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let k = ATTEST_IN_FLIGHT.min(n - all.len());
        let batch =
            futures::future::try_join_all((0..k).map(|_| AttestedAgent::attest_with(server, pem)))
                .await?;
        all.extend(batch);
        if all.len() % 1_000 == 0 {
            eprintln!("==> B11: {} of {n} agents attested", all.len());
        }
    }
    Ok(all)
}

/// `sample` indices out of `0..n`, spread evenly, the first 0 (fewer when `sample > n`).
pub fn sample_indices(n: usize, sample: usize) -> Vec<usize> {
    let k = sample.min(n);
    (0..k).map(|j| j * n / k).collect()
}

/// The server's entry count (admin `CountEntries`, no filter).
async fn count_entries(server: &Server) -> Result<u64> {
    let mut admin = server.admin().await?;
    Ok(admin
        .count_entries(ListEntriesRequest::default())
        .await
        .map_err(|s| anyhow!("CountEntries: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .count)
}

/// A full `SyncAuthorized` (no resume) of `agent_id` on `client`: the time until its
/// first message, which must replace the agent's entries with exactly `expected` entries,
/// all parented to the agent.
async fn first_sync(
    mut client: NodeClient<Channel>,
    agent_id: &str,
    expected: usize,
) -> Result<Duration> {
    let t = Instant::now();
    let first = async {
        let mut stream = client
            .sync_authorized(SyncAuthorizedRequest {
                resume: false,
                held: Vec::new(),
            })
            .await
            .map_err(|s| anyhow!("SyncAuthorized: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        stream
            .message()
            .await
            .map_err(|s| anyhow!("SyncAuthorized stream: {:?}: {}", s.code(), s.message()))?
            .ok_or_else(|| anyhow!("SyncAuthorized stream ended before its first message"))
    };
    let msg = tokio::time::timeout(SYNC_TIMEOUT, first)
        .await
        .map_err(|_| {
            anyhow!("no SyncAuthorized message for {agent_id} within {SYNC_TIMEOUT:?}")
        })??;
    let took = t.elapsed();
    if !msg.full {
        bail!("{agent_id}: the first SyncAuthorized message of a new stream is not full");
    }
    if msg.entries.len() != expected {
        bail!(
            "{agent_id}: SyncAuthorized carried {} entries, expected {expected}",
            msg.entries.len()
        );
    }
    if let Some(e) = msg.entries.iter().find(|e| e.parent_id != agent_id) {
        bail!(
            "{agent_id}: SyncAuthorized carried {} of parent {}",
            e.spiffe_id,
            e.parent_id
        );
    }
    Ok(took)
}

/// Runs B11 on one engine under `dir`.
async fn run_engine(
    bin_dir: &Path,
    dir: &Path,
    plan: &B11Plan,
    engine: Engine,
) -> Result<EngineRun> {
    let load_start = process::loadavg_now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Declared first, so dropped last: the server stops before its database does.
    let pg = match engine {
        Engine::Postgres => Some(harness::start_postgres().await?),
        Engine::Sqlite => None,
    };
    let mut opts = ServerOptions::default();
    let mut postgres = None;
    if let Some(pg) = &pg {
        postgres = Some(
            pg.psql("carapace", "SELECT version()")
                .map_err(|e| anyhow!("SELECT version(): {e}"))?,
        );
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "[datastore]\nurl = \"{}\"\nsslmode = \"disable\"\npassword_file = \"{}\"\n",
                pg.url("carapace"),
                pg.password_file().display()
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        opts.config = Some(config);
    }
    let mut server = Server::start(bin_dir, &dir.join("server"), &opts).await?;
    let rss_baseline = process::rss_bytes(server.proc.pid())?;

    // The agents: every one attests (so the restarts load them too); the syncs of
    // `sample` of them, spread evenly, are timed.
    let pem = server.bundle_pem().await?;
    let t = Instant::now();
    let all = attest_all(&server, &pem, plan.attested).await?;
    let attest = t.elapsed();
    let td = harness::TRUST_DOMAIN;
    let attested: Vec<String> = all.iter().map(|a| a.agent_id.clone()).collect();
    let sampled = sample_indices(plan.attested, plan.sample);
    let parents = parent_ids(td, &attested, plan.agents);

    // The data file, written as a stream.
    let data = dir.join("entries.json");
    let t = Instant::now();
    {
        let (path, entries) = (data.clone(), plan.entries);
        tokio::task::spawn_blocking(move || -> Result<()> {
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            write_data_file(std::io::BufWriter::new(f), td, &parents, entries)
                .with_context(|| format!("writing {}", path.display()))
        })
        .await??;
    }
    let data_write = t.elapsed();
    let data_bytes = std::fs::metadata(&data)?.len();

    // Created by the real CLI.
    eprintln!(
        "==> B11 on {}: entry create --data ({} MB)",
        engine.label(),
        data_bytes / 1_000_000
    );
    let (create, create_server_cpu) = create_with_cli(&mut server, &data).await?;
    let _ = std::fs::remove_file(&data);
    let count = count_entries(&server).await?;
    if count != plan.entries as u64 {
        bail!(
            "after entry create --data the server counts {count} entries, expected {}",
            plan.entries
        );
    }
    let rss_created = process::rss_bytes(server.proc.pid())?;

    // Restarts on the full datastore.
    let mut restarts = Vec::with_capacity(plan.restarts);
    let probe = all
        .first()
        .ok_or_else(|| anyhow!("B11 needs at least one attested agent"))?;
    let probe_expected = expected_entries(plan.entries, plan.agents, 0);
    for k in 0..plan.restarts {
        eprintln!(
            "==> B11 on {}: restart {} of {}",
            engine.label(),
            k + 1,
            plan.restarts
        );
        let stop = server.terminate(STOP_TIMEOUT).await?;
        let t = Instant::now();
        server
            .restart(&format!("server-restart-{k}.log"), RESTART_TIMEOUT)
            .await?;
        let to_health = t.elapsed();
        first_sync(probe.client(&server.addr)?, &probe.agent_id, probe_expected).await?;
        let to_first_sync = t.elapsed();
        restarts.push(Restart {
            stop,
            to_health,
            to_first_sync,
        });
    }
    let count = count_entries(&server).await?;
    if count != plan.entries as u64 {
        bail!(
            "after the restarts the server counts {count} entries, expected {}",
            plan.entries
        );
    }

    // Per-agent syncs: one connection per agent, warmed by one unmeasured sync.
    let agents: Vec<&AttestedAgent> = sampled.iter().map(|&j| &all[j]).collect();
    let clients = agents
        .iter()
        .map(|a| a.client(&server.addr))
        .collect::<Result<Vec<_>>>()?;
    // Attested agent j is parent j.
    let expected: Vec<usize> = sampled
        .iter()
        .map(|&j| expected_entries(plan.entries, plan.agents, j))
        .collect();
    for ((a, c), n) in agents.iter().zip(&clients).zip(&expected) {
        first_sync(c.clone(), &a.agent_id, *n).await?;
    }
    eprintln!("==> B11 on {}: {} sync rounds", engine.label(), plan.rounds);
    let mut sync_sequential = Vec::with_capacity(plan.rounds * agents.len());
    for _ in 0..plan.rounds {
        for ((a, c), n) in agents.iter().zip(&clients).zip(&expected) {
            sync_sequential.push(first_sync(c.clone(), &a.agent_id, *n).await?);
        }
    }
    let mut sync_concurrent = Vec::with_capacity(plan.rounds * agents.len());
    for _ in 0..plan.rounds {
        let mut set = tokio::task::JoinSet::new();
        for ((a, c), n) in agents.iter().zip(&clients).zip(&expected) {
            let (c, id, n) = (c.clone(), a.agent_id.clone(), *n);
            set.spawn(async move { first_sync(c, &id, n).await });
        }
        while let Some(r) = set.join_next().await {
            sync_concurrent.push(r??);
        }
    }
    server.proc.check_alive()?;
    let rss_restarted = process::rss_bytes(server.proc.pid())?;
    let rss_restarted_peak = process::status_bytes(server.proc.pid(), "VmHWM")?;
    drop(clients);
    // A clean stop (the harness's own would SIGKILL after 3 s), before PostgreSQL stops.
    server.terminate(STOP_TIMEOUT).await?;
    drop(pg);
    Ok(EngineRun {
        engine,
        postgres,
        loadavg: (load_start, process::loadavg_now()),
        rss_baseline,
        attest,
        data_bytes,
        data_write,
        create,
        create_server_cpu,
        rss_created,
        restarts,
        sync_sequential,
        sync_concurrent,
        rss_restarted,
        rss_restarted_peak,
    })
}

/// Runs `<bin>/carapace-server entry create --data <data> --admin-socket <socket>`:
/// its wall time and the server's CPU time meanwhile; fails with its stderr when it
/// fails.
async fn create_with_cli(server: &mut Server, data: &Path) -> Result<(Duration, Duration)> {
    let pid = server.proc.pid();
    let cpu0 = process::cpu_time(pid)?;
    let t = Instant::now();
    let out = tokio::process::Command::new(server.bin())
        .args(["entry", "create", "--data"])
        .arg(data)
        .arg("--admin-socket")
        .arg(&server.admin_socket)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running carapace-server entry create --data")?;
    let wall = t.elapsed();
    if !out.status.success() {
        bail!(
            "carapace-server entry create --data {} failed ({}): {}",
            data.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    server.proc.check_alive()?;
    let cpu = process::cpu_time(pid)?.saturating_sub(cpu0);
    Ok((wall, cpu))
}

/// `met` or `**not met**` for a figure against its goal.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}

/// The durations of `v`, formatted and joined (`13.9 s, 14.2 s`).
fn each(v: impl Iterator<Item = Duration>) -> String {
    let parts: Vec<String> = v.map(fmt_secs).collect();
    if parts.is_empty() {
        "—".into()
    } else {
        parts.join(", ")
    }
}

/// `p50 / p99 / max` of `v` (n samples).
fn lat(v: &[Duration]) -> String {
    match Summary::of_durations_us(v) {
        Some(s) => format!(
            "p50 {} / p99 {} / max {} ({} syncs)",
            fmt_us(s.p50),
            fmt_us(s.p99),
            fmt_us(s.max),
            fmt_count(s.n as f64)
        ),
        None => "—".into(),
    }
}

/// Writes B11's section.
pub fn section(r: &mut Report, res: &B11, plan: &B11Plan) {
    let td = harness::TRUST_DOMAIN;
    r.para(&format!(
        "One release `carapace-server` per engine (SQLite: the embedded datastore in its data dir; PostgreSQL: a lab cluster the benchmark starts, `initdb` in a temporary directory, `fsync=off`, loopback TCP, through `[datastore] url`). This process attests {attested} agents with join tokens from the server's CLI, eight at a time. A data file in SPIRE's `-data` format holds {entries} entries spread evenly over {agents} parent IDs (the attested agents' SPIFFE IDs, then, if fewer attested, `spiffe://{td}/spire/agent/join_token/bench-<j>`): entry i is `spiffe://{td}/w/<i>`, parent i mod {agents}, selector `unix:uid:<1000 + i / {agents}>`; `carapace-server entry create --data FILE` creates them (batches of 1,000, one transaction each), then `CountEntries` must say {entries}. Memory per entry: (server VmRSS − its VmRSS right after start) / entries (the server process alone: PostgreSQL's memory is not in it). Then {restarts} restart(s) on the same data: SIGTERM → exit; spawn → the admin API answers `Health` (the server loads its entry index and binds the node API before it serves the admin socket); spawn → the first `SyncAuthorized` message of the first agent on a new connection, with its entries (**restart to serving**). Last, on the restarted server, the full `SyncAuthorized` (no resume) of {sample} agents spread evenly over the attested ones, one mTLS connection each, is timed to its first message, which must hold exactly the agent's {per} entries, all parented to it: {rounds} round(s) one agent after another, then {rounds} round(s) of all {sample} at once (after one unmeasured sync per connection).",
        sample = fmt_count(plan.sample as f64),
        attested = fmt_count(plan.attested as f64),
        entries = fmt_count(plan.entries as f64),
        agents = fmt_count(plan.agents as f64),
        restarts = plan.restarts,
        rounds = plan.rounds,
        per = fmt_count(expected_entries(plan.entries, plan.agents, 0) as f64),
    ));
    let ok: Vec<&EngineRun> = res
        .runs
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    if !ok.is_empty() {
        let mut header = vec!["figure".to_owned()];
        header.extend(ok.iter().map(|x| x.engine.label().to_owned()));
        header.push("goal (issue 17)".into());
        let mut t = Table::new(header);
        let mut row = |label: &str, f: &dyn Fn(&EngineRun) -> String, goal: &str| {
            let mut cells = vec![label.to_owned()];
            cells.extend(ok.iter().map(|x| f(x)));
            cells.push(goal.to_owned());
            t.row(cells);
        };
        let n = plan.entries;
        row(
            "`entry create --data` (wall)",
            &|x| {
                format!(
                    "{} ({} entries/s; server CPU {})",
                    fmt_secs(x.create),
                    fmt_count(n as f64 / x.create.as_secs_f64().max(f64::EPSILON)),
                    fmt_secs(x.create_server_cpu)
                )
            },
            "",
        );
        row(
            "server VmRSS at start (baseline)",
            &|x| fmt_bytes(x.rss_baseline as f64),
            "",
        );
        row(
            "server VmRSS after creating the entries",
            &|x| {
                format!(
                    "{} ({} per entry)",
                    fmt_bytes(x.rss_created as f64),
                    fmt_bytes(x.per_entry(x.rss_created, n))
                )
            },
            "",
        );
        row(
            "SIGTERM → exited (each restart)",
            &|x| each(x.restarts.iter().map(|s| s.stop)),
            "",
        );
        row(
            "spawn → admin `Health` answers (each restart)",
            &|x| each(x.restarts.iter().map(|s| s.to_health)),
            "",
        );
        row(
            "**restart to serving**: spawn → first `SyncAuthorized` message (each restart)",
            &|x| each(x.restarts.iter().map(|s| s.to_first_sync)),
            "< 10 s",
        );
        row(
            "server VmRSS after restart, index loaded (peak)",
            &|x| {
                format!(
                    "{} ({} per entry; peak {})",
                    fmt_bytes(x.rss_restarted as f64),
                    fmt_bytes(x.per_entry(x.rss_restarted, n)),
                    fmt_bytes(x.rss_restarted_peak as f64)
                )
            },
            "",
        );
        row(
            "**per-agent `SyncAuthorized`, one agent at a time**",
            &|x| lat(&x.sync_sequential),
            "p99 < 10 ms",
        );
        row(
            "per-agent `SyncAuthorized`, all sampled agents at once",
            &|x| lat(&x.sync_concurrent),
            "",
        );
        row(
            "attesting the agents (8 at a time); writing the data file",
            &|x| {
                format!(
                    "{}; {} ({})",
                    fmt_secs(x.attest),
                    fmt_secs(x.data_write),
                    fmt_bytes(x.data_bytes as f64)
                )
            },
            "",
        );
        row(
            "load average at start → end",
            &|x| format!("{} → {}", x.loadavg.0, x.loadavg.1),
            "",
        );
        r.table(&t);
        for x in &ok {
            let worst = x.restarts.iter().map(|s| s.to_first_sync).max();
            let seq = Summary::of_durations_us(&x.sync_sequential);
            r.bullet(&format!(
                "{}: restart to serving < 10 s — {} (slowest {}); per-agent sync p99 < 10 ms — {} (p99 {}).",
                x.engine.label(),
                worst.map_or("n/a", |w| verdict(w < GOAL_RESTART)),
                worst.map_or_else(|| "—".into(), fmt_secs),
                seq.map_or("n/a", |s| verdict(s.p99 < GOAL_SYNC_P99_US)),
                seq.map_or_else(|| "—".into(), |s| fmt_us(s.p99)),
            ));
            if let Some(pg) = &x.postgres {
                r.bullet(&format!("PostgreSQL: {pg}."));
            }
        }
    }
    for (engine, run) in &res.runs {
        if let Err(e) = run {
            failed(r, &format!("B11 on {}", engine.label()), e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parents(n: usize, attested: usize) -> Vec<String> {
        let ids: Vec<String> = (0..attested)
            .map(|k| format!("spiffe://example.org/spire/agent/join_token/real-{k}"))
            .collect();
        parent_ids("example.org", &ids, n)
    }

    #[test]
    fn sampled_agents_are_spread_evenly_from_the_first() {
        assert_eq!(sample_indices(10_000, 4), [0, 2_500, 5_000, 7_500]);
        assert_eq!(sample_indices(3, 3), [0, 1, 2]);
        assert_eq!(sample_indices(2, 5), [0, 1]);
        assert!(sample_indices(7, 0).is_empty());
    }

    #[test]
    fn attested_agents_come_first_then_synthetic_ones() {
        let p = parents(5, 2);
        assert_eq!(
            p,
            [
                "spiffe://example.org/spire/agent/join_token/real-0",
                "spiffe://example.org/spire/agent/join_token/real-1",
                "spiffe://example.org/spire/agent/join_token/bench-2",
                "spiffe://example.org/spire/agent/join_token/bench-3",
                "spiffe://example.org/spire/agent/join_token/bench-4",
            ]
        );
        // More attested than agents: only the first `agents`.
        assert_eq!(parents(1, 3).len(), 1);
    }

    #[test]
    fn entries_are_spread_evenly_over_the_agents() {
        assert_eq!(expected_entries(1_000_000, 10_000, 0), 100);
        assert_eq!(expected_entries(1_000_000, 10_000, 9_999), 100);
        // 10 over 4: agents 0 and 1 get 3, agents 2 and 3 get 2; the sum is 10.
        let got: Vec<usize> = (0..4).map(|j| expected_entries(10, 4, j)).collect();
        assert_eq!(got, [3, 3, 2, 2]);
        assert_eq!(got.iter().sum::<usize>(), 10);
        assert_eq!(expected_entries(10, 0, 0), 0);
    }

    #[test]
    fn the_data_file_is_spires_format_one_entry_per_line() {
        let p = parents(4, 1);
        let mut buf = Vec::new();
        write_data_file(&mut buf, "example.org", &p, 10).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], r#"{"entries": ["#);
        assert_eq!(lines.len(), 1 + 10 + 1);
        // The first lines parse back, each an entry followed by a comma.
        let first: serde_json::Value =
            serde_json::from_str(lines[1].strip_suffix(',').unwrap()).unwrap();
        assert_eq!(
            first,
            serde_json::json!({
                "spiffe_id": "spiffe://example.org/w/0",
                "parent_id": "spiffe://example.org/spire/agent/join_token/real-0",
                "selectors": [{"type": "unix", "value": "uid:1000"}],
            })
        );
        let second: serde_json::Value =
            serde_json::from_str(lines[2].strip_suffix(',').unwrap()).unwrap();
        assert_eq!(
            second["parent_id"],
            "spiffe://example.org/spire/agent/join_token/bench-1"
        );
        // The whole document parses, and entry i has parent i % 4 and uid 1000 + i / 4.
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let entries = doc["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 10);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e["spiffe_id"], format!("spiffe://example.org/w/{i}"));
            assert_eq!(e["parent_id"], p[i % 4].as_str());
            assert_eq!(e["selectors"][0]["value"], format!("uid:{}", 1000 + i / 4));
        }
        // Per parent, as many entries as expected_entries says.
        for (j, parent) in p.iter().enumerate() {
            let n = entries
                .iter()
                .filter(|e| e["parent_id"] == parent.as_str())
                .count();
            assert_eq!(n, expected_entries(10, 4, j));
        }
    }

    #[test]
    fn an_empty_data_file_is_still_a_document_and_no_parents_is_refused() {
        let mut buf = Vec::new();
        write_data_file(&mut buf, "example.org", &parents(2, 0), 0).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(doc["entries"].as_array().map(Vec::len), Some(0));
        assert!(write_data_file(Vec::new(), "example.org", &[], 1).is_err());
    }

    #[test]
    fn plans_are_checked() {
        B11Plan::new(true).check().unwrap();
        B11Plan::new(false).check().unwrap();
        let mut p = B11Plan::new(true);
        p.sample = p.attested + 1;
        assert!(p.check().is_err());
        let mut p = B11Plan::new(true);
        p.attested = p.agents + 1;
        assert!(p.check().is_err());
        let mut p = B11Plan::new(true);
        p.entries = p.agents - 1;
        assert!(p.check().is_err());
        assert_eq!(Engine::parse_list("sqlite").unwrap(), [Engine::Sqlite]);
        assert_eq!(
            Engine::parse_list("both").unwrap(),
            [Engine::Sqlite, Engine::Postgres]
        );
        assert!(Engine::parse_list("mysql").is_err());
    }
}
