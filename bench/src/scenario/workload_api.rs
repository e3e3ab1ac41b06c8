//! B2 (S2): the Workload API of the real `carapace-agent` (attested to the real server
//! with a join token): first-response latency of FetchX509SVID on new connections, agent
//! memory per cached SVID, and how fast a new entry reaches a workload ([`run`]), and the
//! report's section ([`section`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio::sync::Barrier;
use tonic::Streaming;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use carapace_proto::admin::CreateEntryRequest;
use carapace_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use carapace_proto::workload::{X509svidRequest, X509svidResponse};

use crate::harness::{self, Agent, LogFollower, Server, ServerOptions};
use crate::process;
use crate::report::{Report, Table};
use crate::stats::{Summary, fmt_bytes, fmt_count, fmt_secs, fmt_us};

/// How B2 is set up and measured, as the report says it.
pub const METHOD: &str = "The release `carapace-server` and `carapace-agent` (join token, `--trust-bundle`, its own data dir and `--socket-path`), an entry `unix:uid:<this uid>` parented to the agent, and `carapace-agent api fetch x509` succeeding before anything is measured. Agent memory: VmRSS with that one SVID, then after creating the bulk entries (selector `unix:uid:<another uid>`; the agent prefetches an SVID for each) once its log says `held=<1 + bulk>`. The bulk entries are deleted again before the latency levels.";

/// How long to wait for the agent to catch up with entry changes.
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);

/// The longest one client may wait for its first message before counting as an error.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Sizes of the Workload API benchmark.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// (concurrent clients, rounds) per level.
    pub levels: Vec<(usize, usize)>,
    /// Sequential single-client fetches with the bulk entries cached (0 to skip).
    pub fetches_with_bulk: usize,
    /// Entries created at once for the memory and sync measurement.
    pub bulk_entries: usize,
    /// Repetitions of "new entry to workload".
    pub new_entry_reps: usize,
}

/// One concurrency level.
#[derive(Debug, Clone)]
pub struct Level {
    /// Concurrent clients per round.
    pub concurrency: usize,
    /// Rounds.
    pub rounds: usize,
    /// Time to first message, each successful client.
    pub samples: Vec<Duration>,
    /// Clients that failed.
    pub errors: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// Per round: from the first client starting to connect to the last first message.
    pub round_walls: Vec<Duration>,
    /// Agent CPU time over all rounds.
    pub agent_cpu: Duration,
}

/// What the Workload API benchmark measured.
#[derive(Debug, Clone)]
pub struct WorkloadResult {
    /// Latency per concurrency level, one SVID cached.
    pub levels: Vec<Level>,
    /// Single-client latency with the bulk SVIDs cached too.
    pub with_bulk: Option<Level>,
    /// Agent VmRSS with one SVID cached, before any Workload API traffic.
    pub rss_one: u64,
    /// Agent VmRSS with 1 + bulk SVIDs cached.
    pub rss_bulk: u64,
    /// Bulk entries created.
    pub bulk_entries: usize,
    /// Creating the bulk entries through the admin API.
    pub bulk_create: Duration,
    /// From the first bulk create call until the agent held them all.
    pub bulk_to_held: Duration,
    /// From the first delete call until the agent dropped them all.
    pub bulk_delete_to_dropped: Duration,
    /// Agent VmRSS after the bulk entries were deleted again.
    pub rss_deleted: u64,
    /// Agent VmRSS after the latency levels.
    pub rss_after_levels: u64,
    /// Agent VmHWM at the end.
    pub rss_peak: u64,
    /// New entry → message with its SPIFFE ID on an open stream.
    pub new_entry: Vec<Duration>,
    /// The CreateEntry call alone, each repetition.
    pub new_entry_create: Vec<Duration>,
    /// This process's uid (the workload selector).
    pub uid: u32,
}

/// Something to keep open until a round ends.
type Open = (
    SpiffeWorkloadApiClient<Channel>,
    Streaming<X509svidResponse>,
);

/// Opens FetchX509SVID (with the security header) on `client`.
async fn open_stream(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> Result<Streaming<X509svidResponse>> {
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", MetadataValue::from_static("true"));
    Ok(client
        .fetch_x509svid(req)
        .await
        .map_err(|s| anyhow!("FetchX509SVID: {:?}: {}", s.code(), s.message()))?
        .into_inner())
}

/// Connects, calls FetchX509SVID and waits for the first message; returns when it
/// started, when the message arrived, and what to keep open.
async fn first_message(socket: PathBuf) -> Result<(Instant, Instant, Open)> {
    let t0 = Instant::now();
    let mut client = harness::workload_client(&socket).await?;
    let mut stream = open_stream(&mut client).await?;
    let msg = stream
        .message()
        .await
        .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
        .ok_or_else(|| anyhow!("FetchX509SVID: stream closed without a message"))?;
    let t1 = Instant::now();
    if msg.svids.is_empty() {
        bail!("FetchX509SVID: a message without SVIDs");
    }
    Ok((t0, t1, (client, stream)))
}

/// `concurrency` clients, released together by a barrier, `rounds` times.
async fn level(agent: &Agent, concurrency: usize, rounds: usize) -> Result<Level> {
    let pid = agent.proc.pid();
    let mut out = Level {
        concurrency,
        rounds,
        samples: Vec::new(),
        errors: 0,
        first_error: None,
        round_walls: Vec::new(),
        agent_cpu: Duration::ZERO,
    };
    let cpu0 = process::cpu_time(pid)?;
    for _ in 0..rounds {
        let barrier = Arc::new(Barrier::new(concurrency));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let barrier = barrier.clone();
            let socket = agent.socket.clone();
            set.spawn(async move {
                barrier.wait().await;
                match tokio::time::timeout(CLIENT_TIMEOUT, first_message(socket)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow!("no first message within {CLIENT_TIMEOUT:?}")),
                }
            });
        }
        let mut open: Vec<Open> = Vec::with_capacity(concurrency);
        let (mut first_start, mut last_end): (Option<Instant>, Option<Instant>) = (None, None);
        while let Some(r) = set.join_next().await {
            match r? {
                Ok((t0, t1, o)) => {
                    out.samples.push(t1 - t0);
                    first_start = Some(first_start.map_or(t0, |f| f.min(t0)));
                    last_end = Some(last_end.map_or(t1, |l| l.max(t1)));
                    open.push(o);
                }
                Err(e) => {
                    out.errors += 1;
                    out.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        if let (Some(a), Some(b)) = (first_start, last_end) {
            out.round_walls.push(b - a);
        }
        drop(open);
        // Let the agent notice the closed connections before the next round.
        tokio::time::sleep(Duration::from_millis(if concurrency > 1 { 200 } else { 2 })).await;
    }
    out.agent_cpu = process::cpu_time(pid)?.saturating_sub(cpu0);
    Ok(out)
}

/// Runs the Workload API benchmark against a fresh server and agent under `dir`.
pub async fn run(bin_dir: &Path, dir: &Path, cfg: &WorkloadConfig) -> Result<WorkloadResult> {
    let server = Server::start(bin_dir, dir, &ServerOptions::default()).await?;
    let mut agent = Agent::start(bin_dir, dir, &server).await?;
    let admin = server.admin().await?;
    let uid = rustix::process::geteuid().as_raw();
    let other_uid = if uid == 4242 { 4243 } else { 4242 };
    let td = harness::TRUST_DOMAIN;

    // One entry for this process, then wait until a real workload (the CLI) gets it.
    let mut follower = LogFollower::from_start(agent.proc.log());
    harness::create_entries(
        &admin,
        vec![harness::entry(
            &format!("spiffe://{td}/bench/me"),
            &agent.agent_id,
            &format!("unix:uid:{uid}"),
        )?],
        1,
    )
    .await?;
    agent.wait_held(&mut follower, 1, SYNC_TIMEOUT).await?;
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while !agent.cli_fetch_ok().await? {
        agent.proc.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "`carapace-agent api fetch x509` never succeeded:\n{}",
                agent.proc.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_one = process::rss_bytes(agent.proc.pid())?;

    // Memory per cached SVID, and time for many new entries to reach the agent.
    let bulk: Vec<_> = (0..cfg.bulk_entries)
        .map(|i| {
            harness::entry(
                &format!("spiffe://{td}/bench/bulk-{i}"),
                &agent.agent_id,
                &format!("unix:uid:{other_uid}"),
            )
        })
        .collect::<Result<_>>()?;
    let held_bulk = 1 + cfg.bulk_entries as u64;
    let t = Instant::now();
    let stored = harness::create_entries(&admin, bulk, 16).await?;
    let bulk_create = t.elapsed();
    let held_at = agent
        .wait_held(&mut follower, held_bulk, SYNC_TIMEOUT)
        .await?;
    let bulk_to_held = held_at - t;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_bulk = process::rss_bytes(agent.proc.pid())?;

    let with_bulk = if cfg.fetches_with_bulk > 0 {
        Some(level(&agent, 1, cfg.fetches_with_bulk).await?)
    } else {
        None
    };

    // Back to one SVID for the latency levels.
    let t = Instant::now();
    harness::delete_entries(&admin, stored.into_iter().map(|e| e.id).collect(), 16).await?;
    let dropped_at = agent.wait_held(&mut follower, 1, SYNC_TIMEOUT).await?;
    let bulk_delete_to_dropped = dropped_at - t;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_deleted = process::rss_bytes(agent.proc.pid())?;

    let mut levels = Vec::new();
    for &(c, rounds) in &cfg.levels {
        levels.push(level(&agent, c, rounds).await?);
        agent.proc.check_alive()?;
    }
    let rss_after_levels = process::rss_bytes(agent.proc.pid())?;

    // New entry → workload: a stream is open; create an entry for this uid and time
    // until a message with the new SPIFFE ID arrives.
    let (_, _, (_client, mut stream)) = first_message(agent.socket.clone()).await?;
    let mut new_entry = Vec::new();
    let mut new_entry_create = Vec::new();
    for rep in 0..cfg.new_entry_reps {
        let id = format!("spiffe://{td}/bench/new-{rep}");
        let e = harness::entry(&id, &agent.agent_id, &format!("unix:uid:{uid}"))?;
        let mut a = admin.clone();
        let t0 = Instant::now();
        a.create_entry(CreateEntryRequest { entry: Some(e) })
            .await
            .map_err(|s| anyhow!("CreateEntry: {}", s.message()))?;
        new_entry_create.push(t0.elapsed());
        let wait = async {
            loop {
                let msg = stream
                    .message()
                    .await
                    .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
                    .ok_or_else(|| anyhow!("FetchX509SVID stream ended"))?;
                if msg.svids.iter().any(|s| s.spiffe_id == id) {
                    return Ok::<_, anyhow::Error>(Instant::now());
                }
            }
        };
        let got = tokio::time::timeout(SYNC_TIMEOUT, wait)
            .await
            .map_err(|_| anyhow!("{id} did not reach the workload within {SYNC_TIMEOUT:?}"))??;
        new_entry.push(got - t0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_peak = process::status_bytes(agent.proc.pid(), "VmHWM")?;
    agent.proc.check_alive()?;
    Ok(WorkloadResult {
        levels,
        with_bulk,
        rss_one,
        rss_bulk,
        bulk_entries: cfg.bulk_entries,
        bulk_create,
        bulk_to_held,
        bulk_delete_to_dropped,
        rss_deleted,
        rss_after_levels,
        rss_peak,
        new_entry,
        new_entry_create,
        uid,
    })
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

pub fn section(r: &mut Report, w: &WorkloadResult) {
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
        fmt_secs(w.bulk_create),
    ]);
    p.row([
        format!(
            "first create call → agent holds all {} SVIDs (`held=` in its log)",
            fmt_count(1.0 + w.bulk_entries as f64)
        ),
        format!("**{}**", fmt_secs(w.bulk_to_held)),
    ]);
    p.row([
        "first delete call → agent dropped them all".to_owned(),
        fmt_secs(w.bulk_delete_to_dropped),
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
        "Goals (BENCHMARKS.md's goals): first response p99 < 1 ms — 1 client: {}, worst level: {}; ≤ 3 KB per cached SVID — {}; new entry to workload < 1 s — {}.",
        single.map(|s| fmt_us(s.p99)).unwrap_or_else(|| "n/a".into()),
        fmt_us(worst_p99),
        fmt_bytes(delta / w.bulk_entries.max(1) as f64),
        ne.map(|s| format!("max {}", fmt_us(s.max))).unwrap_or_else(|| "n/a".into()),
    ));
    r.bullet("SPIRE 1.15.3 on this kind of machine (§0): first response p50 ≈ 2.9 ms, p99 ≈ 5 ms; ~13.5 KiB per cached SVID; new entry to workload 9–10 s.");
}
