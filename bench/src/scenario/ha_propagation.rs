//! B9 (issue 17): propagation across servers. Two real `carapace-server` processes (each
//! its own data dir, one trust domain) share a real PostgreSQL that this benchmark starts
//! ([`hsm_sim::postgres::Postgres`]); one real `carapace-agent` is attested to server B
//! with a join token from B's CLI. Each sample creates an entry for this process's uid
//! through server A's admin CLI (`carapace-server entry create --admin-socket A ...`) and
//! times how long until this process, a workload of the agent with a `FetchX509SVID`
//! stream kept open, receives an SVID with the new SPIFFE ID ([`run`]); the report's
//! section is [`section`].
//!
//! Where the time goes comes from the processes' JSON logs, on the same wall clock as
//! the samples: A's `created registration entry` (committed), B's `applied datastore
//! changes to the entry cache` (B followed A: `LISTEN/NOTIFY`, or its 1 s poll), the
//! agent's `synced authorized entries` (B pushed the agent's new entry list), B's `signed
//! workload SVIDs` (the agent's `BatchNewX509SVID`), the agent's `workload SVIDs updated`
//! (published to the Workload API). The servers log those at `debug` for their two
//! modules only (`carapace_server::entry_cache`, `carapace_server::node_api`), the agent
//! for `carapace_agent::manager`.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use tonic::Streaming;

use carapace_proto::workload::X509svidResponse;

use crate::harness::{self, Agent, Server, ServerOptions, message_of, timestamp_of};
use crate::process;
use crate::report::{Report, Table};
use crate::stats::{Summary, fmt_us};

/// The goal (issue 17): p99 from the create call on A to the workload on B's agent
/// holding the SVID, µs.
pub const GOAL_P99_US: f64 = 100_000.0;

/// How long one sample may take before the run fails.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The servers' log filter: `info`, and the two `debug` lines that time B's part.
const SERVER_LOG: &str =
    "warn,carapace=info,carapace_server::entry_cache=debug,carapace_server::node_api=debug";

/// The agent's log filter: `info`, and its `debug` line for each sync message.
const AGENT_LOG: &str = "warn,carapace=info,carapace_agent::manager=debug";

/// B9's sizes.
#[derive(Debug, Clone)]
pub struct B9Plan {
    /// Entries created on A, one sample each.
    pub samples: usize,
    /// The pause between samples is drawn uniformly from this range (ms), so that the
    /// samples fall at every phase of B's 1 s poll.
    pub gap_ms: (u64, u64),
}

impl B9Plan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> B9Plan {
        B9Plan {
            samples: if quick { 10 } else { 100 },
            gap_ms: (50, 250),
        }
    }
}

/// Where one sample's time went, from the logs: each instant in µs after the sample
/// began (the CLI call on A starting); `None` where a line was not found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stages {
    /// A logged `created registration entry` for the sample's SPIFFE ID.
    pub a_committed: Option<f64>,
    /// B logged `applied datastore changes to the entry cache`.
    pub b_applied: Option<f64>,
    /// The agent logged `synced authorized entries`.
    pub agent_synced: Option<f64>,
    /// B logged `signed workload SVIDs`.
    pub b_signed: Option<f64>,
    /// The agent logged `workload SVIDs updated`.
    pub agent_updated: Option<f64>,
}

/// One sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The SPIFFE ID created.
    pub spiffe_id: String,
    /// Wall clock when the CLI call on A started.
    pub started: SystemTime,
    /// From the CLI call starting to the stream message with the SPIFFE ID.
    pub total: Duration,
    /// The CLI call alone (process start, admin socket, A's transaction).
    pub cli: Duration,
    /// From the logs.
    pub stages: Stages,
}

/// What B9 measured.
#[derive(Debug, Clone)]
pub struct B9Result {
    /// The samples, in order.
    pub samples: Vec<Sample>,
    /// `SELECT version()` of the lab PostgreSQL.
    pub postgres: String,
    /// Time from starting both servers until B's bundle held both servers' CAs.
    pub bundle_converged: Duration,
    /// Load average when B9 began.
    pub loadavg: String,
    /// This process's uid (the entries' selector).
    pub uid: u32,
}

/// Reads `stream` until a message holds an SVID for `spiffe_id`; returns when it came.
async fn wait_for_id(stream: &mut Streaming<X509svidResponse>, spiffe_id: &str) -> Result<Instant> {
    loop {
        let msg = stream
            .message()
            .await
            .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
            .ok_or_else(|| anyhow!("FetchX509SVID stream ended"))?;
        let at = Instant::now();
        if msg.svids.iter().any(|s| s.spiffe_id == spiffe_id) {
            return Ok(at);
        }
    }
}

/// How many CA certificates a PEM bundle holds.
fn ca_count(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

/// Runs B9 under `dir`.
pub async fn run(bin_dir: &Path, dir: &Path, plan: &B9Plan) -> Result<B9Result> {
    let loadavg = process::loadavg_now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Declared first, so dropped last: the servers stop before their database does.
    let pg = harness::start_postgres().await?;
    let postgres = pg
        .psql("carapace", "SELECT version()")
        .map_err(|e| anyhow!("SELECT version(): {e}"))?;
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
    let opts = ServerOptions {
        config: Some(config),
        envs: vec![("CARAPACE_LOG".into(), SERVER_LOG.into())],
    };
    let t = Instant::now();
    let a = Server::start(bin_dir, &dir.join("a"), &opts).await?;
    let mut b = Server::start(bin_dir, &dir.join("b"), &opts).await?;
    // B serves A's CA too once it has followed A's journal.
    loop {
        b.proc.check_alive()?;
        if ca_count(&b.bundle_pem().await?) >= 2 {
            break;
        }
        if t.elapsed() > SAMPLE_TIMEOUT {
            bail!("server B's bundle never held server A's CA");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bundle_converged = t.elapsed();
    let mut agent = Agent::start_with_env(
        bin_dir,
        &dir.join("agent"),
        &b,
        None,
        &[("CARAPACE_LOG".into(), AGENT_LOG.into())],
    )
    .await?;
    let uid = rustix::process::geteuid().as_raw();
    let selector = format!("unix:uid:{uid}");
    let td = harness::TRUST_DOMAIN;

    // A first entry, made on A, so that the workload has an SVID and its stream opens.
    let first = format!("spiffe://{td}/bench/ha-first");
    a.cli(&[
        "entry",
        "create",
        "--parent-id",
        &agent.agent_id,
        "--spiffe-id",
        &first,
        "--selector",
        &selector,
    ])
    .await?;
    // Until the agent has it, the Workload API answers "no identity issued": try again.
    let deadline = Instant::now() + SAMPLE_TIMEOUT;
    let (_client, mut stream) = loop {
        let attempt = async {
            let (client, mut stream) = harness::x509_stream(&agent.socket).await?;
            wait_for_id(&mut stream, &first).await?;
            Ok::<_, anyhow::Error>((client, stream))
        };
        match tokio::time::timeout(SAMPLE_TIMEOUT, attempt).await {
            Ok(Ok(open)) => break open,
            Ok(Err(e)) if Instant::now() > deadline => {
                bail!("the workload never got {first}: {e:#}")
            }
            Err(_) => bail!("{first} did not reach the workload within {SAMPLE_TIMEOUT:?}"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };

    let mut samples = Vec::with_capacity(plan.samples);
    for i in 0..plan.samples {
        let (lo, hi) = plan.gap_ms;
        tokio::time::sleep(Duration::from_millis(rand::random_range(lo..=hi.max(lo)))).await;
        let spiffe_id = format!("spiffe://{td}/bench/ha-{i}");
        let started = SystemTime::now();
        let t0 = Instant::now();
        a.cli(&[
            "entry",
            "create",
            "--parent-id",
            &agent.agent_id,
            "--spiffe-id",
            &spiffe_id,
            "--selector",
            &selector,
        ])
        .await?;
        let cli = t0.elapsed();
        let got = tokio::time::timeout(SAMPLE_TIMEOUT, wait_for_id(&mut stream, &spiffe_id))
            .await
            .map_err(|_| {
                anyhow!("{spiffe_id} did not reach the workload within {SAMPLE_TIMEOUT:?}")
            })??;
        samples.push(Sample {
            spiffe_id,
            started,
            total: got - t0,
            cli,
            stages: Stages::default(),
        });
    }
    agent.proc.check_alive()?;
    b.proc.check_alive()?;

    // Where the time went.
    let a_log = harness::read_log(a.proc.log())?;
    let b_log = harness::read_log(b.proc.log())?;
    let agent_log = harness::read_log(agent.proc.log())?;
    attribute(&mut samples, &a_log, &b_log, &agent_log);
    Ok(B9Result {
        samples,
        postgres,
        bundle_converged,
        loadavg,
        uid,
    })
}

/// The wall-clock instants of the lines whose message is `message` (and that `keep`
/// accepts), in order.
fn instants(
    log: &[serde_json::Value],
    message: &str,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Vec<SystemTime> {
    let mut v: Vec<SystemTime> = log
        .iter()
        .filter(|l| message_of(l) == Some(message) && keep(l))
        .filter_map(timestamp_of)
        .collect();
    v.sort();
    v
}

/// The first of `sorted` at or after `from` and before `until`, as µs after `origin`.
fn first_in(
    sorted: &[SystemTime],
    from: SystemTime,
    until: SystemTime,
    origin: SystemTime,
) -> Option<f64> {
    let i = sorted.partition_point(|t| *t < from);
    let t = *sorted.get(i)?;
    (t < until).then(|| {
        t.duration_since(origin)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    })
}

/// Fills each sample's [`Stages`] from the three logs: each stage is the first matching
/// line after the previous stage and before the workload got the SVID (B's apply, after
/// the sample began: A's own line may come after it).
pub fn attribute(
    samples: &mut [Sample],
    a_log: &[serde_json::Value],
    b_log: &[serde_json::Value],
    agent_log: &[serde_json::Value],
) {
    let b_applied = instants(
        b_log,
        "applied datastore changes to the entry cache",
        |_| true,
    );
    let b_signed = instants(b_log, "signed workload SVIDs", |_| true);
    let synced = instants(agent_log, "synced authorized entries", |_| true);
    let updated = instants(agent_log, "workload SVIDs updated", |_| true);
    for s in samples {
        let origin = s.started;
        let until = origin + s.total + Duration::from_millis(1);
        let at = |us: f64| origin + Duration::from_secs_f64(us.max(0.0) / 1e6);
        let committed = instants(a_log, "created registration entry", |l| {
            l.get("fields")
                .and_then(|f| f.get("spiffe_id"))
                .and_then(|v| v.as_str())
                == Some(s.spiffe_id.as_str())
        });
        let mut st = Stages {
            a_committed: first_in(&committed, origin, until, origin),
            ..Stages::default()
        };
        // A logs its line after its commit and its own index update, so B (woken by
        // the commit's NOTIFY) may log first: B's line is looked for from the start.
        st.b_applied = first_in(&b_applied, origin, until, origin);
        let mut from = st.b_applied.or(st.a_committed).map_or(origin, at);
        st.agent_synced = first_in(&synced, from, until, origin);
        from = st.agent_synced.map_or(from, at);
        st.b_signed = first_in(&b_signed, from, until, origin);
        from = st.b_signed.map_or(from, at);
        st.agent_updated = first_in(&updated, from, until, origin);
        s.stages = st;
    }
}

/// The stages of a sample as consecutive spans (µs), the last ending at the workload's
/// message; `None` for a span whose ends were not both found.
fn spans(s: &Sample) -> [Option<f64>; 6] {
    let st = &s.stages;
    let total = s.total.as_secs_f64() * 1e6;
    let marks = [
        Some(0.0),
        st.a_committed,
        st.b_applied,
        st.agent_synced,
        st.b_signed,
        st.agent_updated,
        Some(total),
    ];
    let mut out = [None; 6];
    for (i, o) in out.iter_mut().enumerate() {
        *o = marks[i].zip(marks[i + 1]).map(|(a, b)| b - a);
    }
    out
}

/// What each span of [`spans`] is.
const SPAN_NAMES: [&str; 6] = [
    "CLI call starts → A committed the entry (process start, admin socket, A's transaction)",
    "A committed → B applied it to its entry index (NOTIFY, B reads the change log; negative when A logged after B applied)",
    "B applied → agent received its new entry list (B's sync stream push)",
    "agent received → B signed the SVID (agent key + CSR, `BatchNewX509SVID`)",
    "B signed → agent published it to the Workload API",
    "agent published → workload received the stream message",
];

/// Writes B9's section.
pub fn section(r: &mut Report, res: &B9Result, plan: &B9Plan) {
    r.para(&format!(
        "Two release `carapace-server` processes (`a` and `b`, each its own data dir and admin socket, trust domain {td}) share one lab PostgreSQL ({pg}; started by the benchmark: `initdb` in a temporary directory, `fsync=off`, loopback TCP) through `[datastore] url`, `sslmode = \"disable\"`, `password_file`. One release `carapace-agent` is attested to `b` (join token from b's `token generate`). This process (uid {uid}) is the workload: it keeps one `FetchX509SVID` stream open on the agent's socket. Each sample runs `carapace-server entry create --admin-socket <a> --parent-id <agent> --spiffe-id spiffe://{td}/bench/ha-<i> --selector unix:uid:{uid}` and times from starting that command to the stream message holding the new SPIFFE ID; {n} samples, {lo}–{hi} ms apart (random), so that they fall at every phase of b's 1 s poll. b's bundle held a's CA {conv} after a was started. Load average when B9 began: {load}.",
        td = harness::TRUST_DOMAIN,
        pg = res.postgres,
        uid = res.uid,
        n = plan.samples,
        lo = plan.gap_ms.0,
        hi = plan.gap_ms.1,
        conv = fmt_us(res.bundle_converged.as_secs_f64() * 1e6),
        load = res.loadavg,
    ));
    let total: Vec<Duration> = res.samples.iter().map(|s| s.total).collect();
    let cli: Vec<Duration> = res.samples.iter().map(|s| s.cli).collect();
    let mut t = Table::new(["figure", "samples", "p50", "p90", "p99", "max"]);
    for (label, v) in [
        (
            "**entry created on A (CLI) → workload on B's agent holds its SVID**",
            &total,
        ),
        ("of which the `entry create` command on A", &cli),
    ] {
        if let Some(s) = Summary::of_durations_us(v) {
            t.row([
                label.to_owned(),
                s.n.to_string(),
                fmt_us(s.p50),
                fmt_us(s.p90),
                fmt_us(s.p99),
                fmt_us(s.max),
            ]);
        }
    }
    r.table(&t);

    // Where the time goes: the median of each span, and the slowest sample's spans.
    let slowest = res.samples.iter().max_by_key(|s| s.total);
    let mut w = Table::new([
        "span (from the processes' logs)",
        "samples found",
        "p50",
        "p99",
        "max",
        "slowest sample",
    ]);
    let all: Vec<[Option<f64>; 6]> = res.samples.iter().map(spans).collect();
    for (i, name) in SPAN_NAMES.iter().enumerate() {
        let v: Vec<f64> = all.iter().filter_map(|s| s[i]).collect();
        let s = Summary::of(&v);
        w.row([
            (*name).to_owned(),
            v.len().to_string(),
            s.map(|s| fmt_us(s.p50)).unwrap_or_else(|| "—".into()),
            s.map(|s| fmt_us(s.p99)).unwrap_or_else(|| "—".into()),
            s.map(|s| fmt_us(s.max)).unwrap_or_else(|| "—".into()),
            slowest
                .and_then(|x| spans(x)[i])
                .map(fmt_us)
                .unwrap_or_else(|| "—".into()),
        ]);
    }
    r.table(&w);
    let polled = all
        .iter()
        .filter(|s| s[1].is_some_and(|us| us > 100_000.0))
        .count();
    let s = Summary::of_durations_us(&total);
    r.bullet(&format!(
        "Goal (issue 17): p99 < 100 ms across servers — {}: p99 {}. SPIRE: 5–10 s by design (its servers reload their entry cache every 5 s; agents sync every 5 s).",
        match s {
            Some(s) if s.p99 < GOAL_P99_US => "met",
            Some(_) => "**not met**",
            None => "n/a",
        },
        s.map(|s| fmt_us(s.p99)).unwrap_or_else(|| "n/a".into()),
    ));
    r.bullet(&format!(
        "Samples in which B took over 100 ms to apply A's commit (a lost or late notification, caught by the 1 s poll): {polled} of {}.",
        res.samples.len()
    ));
    if let Some(x) = slowest {
        r.bullet(&format!(
            "Slowest sample: {} ({}).",
            x.spiffe_id,
            fmt_us(x.total.as_secs_f64() * 1e6)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ts: &str, message: &str, extra: &str) -> serde_json::Value {
        serde_json::from_str(&format!(
            r#"{{"timestamp":"{ts}","level":"DEBUG","fields":{{"message":"{message}"{extra}}}}}"#
        ))
        .unwrap()
    }

    /// The sample `spiffe://example.org/bench/ha-0`, started 2026-12-07T06:00:00Z (the
    /// logs' times below are from then), the CLI call 6 ms, `total_ms` in all.
    fn sample(total_ms: u64) -> Sample {
        Sample {
            spiffe_id: "spiffe://example.org/bench/ha-0".into(),
            started: humantime::parse_rfc3339("2026-12-07T06:00:00Z").unwrap(),
            total: Duration::from_millis(total_ms),
            cli: Duration::from_millis(6),
            stages: Stages::default(),
        }
    }

    #[test]
    fn stages_are_read_in_order_from_the_three_logs() {
        let mut samples = vec![sample(30)];
        let a = vec![
            // Another entry's line is not this sample's.
            line(
                "2026-12-07T06:00:00.001000Z",
                "created registration entry",
                r#","spiffe_id":"spiffe://example.org/bench/other""#,
            ),
            line(
                "2026-12-07T06:00:00.005000Z",
                "created registration entry",
                r#","spiffe_id":"spiffe://example.org/bench/ha-0""#,
            ),
        ];
        let b = vec![
            // Before the sample: ignored.
            line(
                "2026-12-07T05:59:59.000000Z",
                "applied datastore changes to the entry cache",
                "",
            ),
            line(
                "2026-12-07T06:00:00.007000Z",
                "applied datastore changes to the entry cache",
                "",
            ),
            line("2026-12-07T06:00:00.020000Z", "signed workload SVIDs", ""),
        ];
        let agent = vec![
            line(
                "2026-12-07T06:00:00.009000Z",
                "synced authorized entries",
                "",
            ),
            line("2026-12-07T06:00:00.022000Z", "workload SVIDs updated", ""),
            // After the workload got it: not this sample's.
            line("2026-12-07T06:00:00.090000Z", "workload SVIDs updated", ""),
        ];
        attribute(&mut samples, &a, &b, &agent);
        let st = samples[0].stages;
        assert_eq!(st.a_committed, Some(5_000.0));
        assert_eq!(st.b_applied, Some(7_000.0));
        assert_eq!(st.agent_synced, Some(9_000.0));
        assert_eq!(st.b_signed, Some(20_000.0));
        assert_eq!(st.agent_updated, Some(22_000.0));
        assert_eq!(
            spans(&samples[0]),
            [
                Some(5_000.0),
                Some(2_000.0),
                Some(2_000.0),
                Some(11_000.0),
                Some(2_000.0),
                Some(8_000.0)
            ]
        );
    }

    #[test]
    fn b_may_apply_before_a_logs_its_commit() {
        let mut samples = vec![sample(20)];
        let a = vec![line(
            "2026-12-07T06:00:00.006000Z",
            "created registration entry",
            r#","spiffe_id":"spiffe://example.org/bench/ha-0""#,
        )];
        let b = vec![line(
            "2026-12-07T06:00:00.005500Z",
            "applied datastore changes to the entry cache",
            "",
        )];
        let agent = vec![line(
            "2026-12-07T06:00:00.007000Z",
            "synced authorized entries",
            "",
        )];
        attribute(&mut samples, &a, &b, &agent);
        let st = samples[0].stages;
        assert_eq!(st.b_applied, Some(5_500.0));
        assert_eq!(st.agent_synced, Some(7_000.0));
        assert_eq!(spans(&samples[0])[1], Some(-500.0));
    }

    #[test]
    fn a_missing_line_leaves_its_spans_unknown() {
        let mut samples = vec![sample(10)];
        attribute(&mut samples, &[], &[], &[]);
        let s = spans(&samples[0]);
        assert!(s.iter().all(Option::is_none), "{s:?}");
    }
}
