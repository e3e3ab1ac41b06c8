//! B10 (S5, issue 17): a rotation storm. One real `carapace-agent` (join token, attested
//! to one real `carapace-server` on its default SQLite datastore) holds an X509-SVID for
//! each of N entries (10,000 in the full run), all for this process's uid, each its own
//! SPIFFE ID; they are created through the admin gRPC API over the admin socket, 16 calls
//! in flight. The operator's forced rotation of README "CA lifecycle and forced rotation"
//! then renews all of them at once: `localauthority x509 prepare`, `activate`, and `taint`
//! of the old CA, which makes the agent re-issue every SVID chained to it. This process,
//! a workload with a `FetchX509SVID` stream open (every SVID of its uid is in each message),
//! times from starting the `taint` command until a message holds N SVIDs that were all
//! re-issued ([`run`]); afterwards, off the clock, every one of them is verified against a
//! bundle holding the new CA alone. The report's section is [`section`].

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::mpsc;

use carapace_core::TrustBundle;
use carapace_core::x509svid::verify_chain;
use carapace_proto::workload::X509svid;

use crate::harness::{self, Agent, LogFollower, Server, ServerOptions, message_of, timestamp_of};
use crate::process;
use crate::report::{Report, Table};
use crate::stats::{fmt_count, fmt_secs, fmt_us};

/// The goal (PERFORMANCE.md S5, issue 17): all N SVIDs renewed within this.
pub const GOAL: Duration = Duration::from_secs(10);

/// Entries created at once through the admin API.
const CREATE_IN_FLIGHT: usize = 16;

/// How long the agent may take to hold the N SVIDs at first.
const FILL_TIMEOUT: Duration = Duration::from_secs(900);

/// How long the storm may take before the run fails.
const STORM_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the bundle changes of `prepare` and `activate` are given to settle before
/// the taint.
const SETTLE: Duration = Duration::from_secs(3);

/// B10's sizes.
#[derive(Debug, Clone)]
pub struct B10Plan {
    /// SVIDs on the agent (one entry each).
    pub svids: usize,
}

impl B10Plan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> B10Plan {
        B10Plan {
            svids: if quick { 1_000 } else { 10_000 },
        }
    }
}

/// What B10 measured.
#[derive(Debug, Clone)]
pub struct B10Result {
    /// SVIDs on the agent.
    pub svids: usize,
    /// Creating the N entries through the admin API.
    pub create: Duration,
    /// From the first create call until the agent logged `held=N`.
    pub create_to_held: Duration,
    /// The `taint` command alone.
    pub taint_cli: Duration,
    /// **From starting `taint` until the workload's stream held N re-issued SVIDs.**
    pub storm: Duration,
    /// From starting `taint` until the agent logged that it re-issues the tainted SVIDs
    /// (the bundle with the taint reached it), and how many it named.
    pub agent_saw: Option<(Duration, u64)>,
    /// From starting `taint` until the agent logged `workload SVIDs updated` with what
    /// it signed, and how many.
    pub agent_signed: Option<(Duration, u64)>,
    /// Stream messages received during the storm, and the most re-issued SVIDs in one
    /// before the last.
    pub messages: usize,
    /// Re-issued SVIDs in the last message before the complete one.
    pub partial_max: usize,
    /// Size of the complete message's SVIDs (protobuf fields, approximately).
    pub message_bytes: usize,
    /// CPU time during the storm: server, agent, this process (the workload).
    pub cpu: (Duration, Duration, Duration),
    /// SVIDs of the complete message that verify against the new CA alone, distinct
    /// SPIFFE IDs among them.
    pub verified: usize,
    /// Distinct SPIFFE IDs in the complete message.
    pub distinct: usize,
    /// The old (tainted) and new CA's authority ids.
    pub authorities: (String, String),
    /// Load average when B10 began.
    pub loadavg: String,
    /// This process's uid.
    pub uid: u32,
}

/// The certificates of concatenated DER (the Workload API's `x509_svid`).
pub fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 2 || bytes[0] != 0x30 {
            bail!("concatenated DER: not a SEQUENCE");
        }
        let (len, header) = match bytes[1] {
            n if n < 0x80 => (usize::from(n), 2),
            n => {
                let k = usize::from(n & 0x7f);
                if k == 0 || k > 4 || bytes.len() < 2 + k {
                    bail!("concatenated DER: bad length");
                }
                let len = bytes[2..2 + k]
                    .iter()
                    .fold(0usize, |a, b| (a << 8) | usize::from(*b));
                (len, 2 + k)
            }
        };
        let end = header
            .checked_add(len)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| anyhow!("concatenated DER: truncated"))?;
        out.push(bytes[..end].to_vec());
        bytes = &bytes[end..];
    }
    Ok(out)
}

/// What the stream reader reports: each message's re-issued SVIDs; the complete message is
/// handed over whole, with when it arrived.
#[derive(Debug)]
enum Seen {
    Message { reissued: usize },
    Complete { at: Instant, svids: Vec<X509svid> },
    Failed(String),
}

/// A `localauthority x509` command's JSON output.
async fn authority(server: &Server, args: &[&str]) -> Result<serde_json::Value> {
    let mut full = vec!["localauthority", "x509"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--output", "json"]);
    let out = server.cli(&full).await?;
    serde_json::from_str(&out).with_context(|| format!("{}: output is not JSON", full.join(" ")))
}

/// The `authority_id` of a JSON authority.
fn id_of(v: &serde_json::Value) -> Result<String> {
    v.get("authority_id")
        .and_then(|x| x.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no authority_id in {v}"))
}

/// Runs B10 under `dir`.
pub async fn run(bin_dir: &Path, dir: &Path, plan: &B10Plan) -> Result<B10Result> {
    let loadavg = process::loadavg_now();
    let n = plan.svids;
    let server = Server::start(bin_dir, dir, &ServerOptions::default()).await?;
    let mut agent = Agent::start(bin_dir, dir, &server).await?;
    let admin = server.admin().await?;
    let uid = rustix::process::geteuid().as_raw();
    let selector = format!("unix:uid:{uid}");
    let td = harness::TRUST_DOMAIN;

    // N entries, each its own SPIFFE ID, all for this uid.
    eprintln!("==> B10: creating {n} entries");
    let entries: Vec<_> = (0..n)
        .map(|i| {
            harness::entry(
                &format!("spiffe://{td}/bench/storm-{i}"),
                &agent.agent_id,
                &selector,
            )
        })
        .collect::<Result<_>>()?;
    let mut follower = LogFollower::from_start(agent.proc.log());
    let t = Instant::now();
    harness::create_entries(&admin, entries, CREATE_IN_FLIGHT).await?;
    let create = t.elapsed();
    let held_at = agent
        .wait_held(&mut follower, n as u64, FILL_TIMEOUT)
        .await?;
    let create_to_held = held_at - t;

    // The workload's stream, with all N.
    let (client, mut stream) = harness::x509_stream(&agent.socket).await?;
    let before: HashMap<String, Vec<u8>> = loop {
        let msg = tokio::time::timeout(STORM_TIMEOUT, stream.message())
            .await
            .map_err(|_| anyhow!("no FetchX509SVID message with {n} SVIDs"))?
            .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
            .ok_or_else(|| anyhow!("FetchX509SVID stream ended"))?;
        if msg.svids.len() == n {
            break msg
                .svids
                .into_iter()
                .map(|s| (s.spiffe_id, s.x509_svid))
                .collect();
        }
    };
    if before.len() != n {
        bail!(
            "the workload holds {} distinct SPIFFE IDs, not {n}",
            before.len()
        );
    }

    // A new CA, in the bundle, then signing.
    let old = id_of(
        authority(&server, &["show"])
            .await?
            .get("active")
            .ok_or_else(|| anyhow!("localauthority x509 show: no active CA"))?,
    )?;
    let new = id_of(&authority(&server, &["prepare"]).await?)?;
    authority(&server, &["activate", "--authority-id", &new]).await?;

    // The stream is read from now on by its own task, so that the agent is never held
    // back by this process.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let _client = client;
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    let _ = tx.send(Seen::Failed("FetchX509SVID stream ended".into()));
                    return;
                }
                Err(s) => {
                    let _ = tx.send(Seen::Failed(format!(
                        "FetchX509SVID stream: {:?}: {}",
                        s.code(),
                        s.message()
                    )));
                    return;
                }
            };
            let at = Instant::now();
            let reissued = msg
                .svids
                .iter()
                .filter(|s| {
                    before
                        .get(&s.spiffe_id)
                        .is_some_and(|old| *old != s.x509_svid)
                })
                .count();
            if reissued == n && msg.svids.len() == n {
                let _ = tx.send(Seen::Complete {
                    at,
                    svids: msg.svids,
                });
                return;
            }
            if tx.send(Seen::Message { reissued }).is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(SETTLE).await;
    while let Ok(seen) = rx.try_recv() {
        match seen {
            Seen::Message { reissued: 0 } => {}
            Seen::Message { reissued } => {
                bail!("{reissued} SVIDs were re-issued before the taint")
            }
            Seen::Complete { .. } => bail!("every SVID was re-issued before the taint"),
            Seen::Failed(e) => bail!("{e}"),
        }
    }

    // The storm.
    eprintln!("==> B10: tainting the old CA ({n} SVIDs chained to it)");
    let mut follower = LogFollower::from_end(agent.proc.log())?;
    let server_pid = server.proc.pid();
    let agent_pid = agent.proc.pid();
    let cpu0 = (
        process::cpu_time(server_pid)?,
        process::cpu_time(agent_pid)?,
        process::process_cpu_time(),
    );
    let started = SystemTime::now();
    let t0 = Instant::now();
    authority(&server, &["taint", "--authority-id", &old]).await?;
    let taint_cli = t0.elapsed();
    let (mut messages, mut partial_max) = (0, 0);
    let deadline = tokio::time::Instant::now() + STORM_TIMEOUT;
    let (done, svids) = loop {
        let seen = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| {
                anyhow!(
                    "the workload did not hold {n} re-issued SVIDs within {STORM_TIMEOUT:?} (most in one message: {partial_max}):\n{}",
                    agent.proc.log_tail(20)
                )
            })?
            .ok_or_else(|| anyhow!("the stream reader ended"))?;
        match seen {
            Seen::Message { reissued } => {
                messages += 1;
                partial_max = partial_max.max(reissued);
            }
            Seen::Complete { at, svids } => {
                messages += 1;
                break (at, svids);
            }
            Seen::Failed(e) => bail!("{e}"),
        }
    };
    let storm = done - t0;
    let cpu = (
        process::cpu_time(server_pid)?.saturating_sub(cpu0.0),
        process::cpu_time(agent_pid)?.saturating_sub(cpu0.1),
        process::process_cpu_time().saturating_sub(cpu0.2),
    );
    reader.abort();
    agent.proc.check_alive()?;

    // The agent's own account, from its log.
    let since = |line: &serde_json::Value| {
        timestamp_of(line)
            .and_then(|t| t.duration_since(started).ok())
            .unwrap_or_default()
    };
    let field = |line: &serde_json::Value, k: &str| {
        line.get("fields")
            .and_then(|f| f.get(k))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let (mut agent_saw, mut agent_signed) = (None, None);
    for line in follower.poll()? {
        match message_of(&line) {
            Some("SVIDs chained to a tainted X.509 authority: re-issuing them now")
                if agent_saw.is_none() =>
            {
                agent_saw = Some((since(&line), field(&line, "workloads")));
            }
            Some("workload SVIDs updated")
                if agent_saw.is_some() && agent_signed.is_none() && field(&line, "signed") > 0 =>
            {
                agent_signed = Some((since(&line), field(&line, "signed")));
            }
            _ => {}
        }
    }

    // Off the clock: every SVID verifies against the new CA alone.
    let bundle = TrustBundle::from_pem(server.td.clone(), &server.bundle_pem().await?)
        .map_err(|e| anyhow!("bundle show: {e}"))?;
    let mut only_new = TrustBundle::new(server.td.clone());
    only_new.x509_authorities = bundle
        .x509_authorities
        .iter()
        .filter(|c| carapace_server::ca::authority_id(c) == new)
        .cloned()
        .collect();
    if only_new.x509_authorities.len() != 1 {
        bail!("the bundle does not hold the new CA {new} once");
    }
    let now = carapace_core::clock::unix_now().max(0) as u64;
    let mut verified = 0;
    let mut message_bytes = 0;
    for s in &svids {
        message_bytes += s.spiffe_id.len()
            + s.x509_svid.len()
            + s.x509_svid_key.len()
            + s.bundle.len()
            + s.hint.len();
        let chain = split_der(&s.x509_svid)?;
        if verify_chain(&chain, &only_new, now)
            .is_ok_and(|v| v.spiffe_id.to_string() == s.spiffe_id)
        {
            verified += 1;
        }
    }
    let distinct = svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect::<HashSet<_>>()
        .len();
    Ok(B10Result {
        svids: n,
        create,
        create_to_held,
        taint_cli,
        storm,
        agent_saw,
        agent_signed,
        messages,
        partial_max,
        message_bytes,
        cpu,
        verified,
        distinct,
        authorities: (old, new),
        loadavg,
        uid,
    })
}

/// Writes B10's section.
pub fn section(r: &mut Report, res: &B10Result) {
    let n = fmt_count(res.svids as f64);
    r.para(&format!(
        "The release `carapace-server` (SQLite, disk key manager, defaults) and one release `carapace-agent` attested to it with a join token. {n} entries parented to the agent, each its own SPIFFE ID (`spiffe://{td}/bench/storm-<i>`), all with `unix:uid:{uid}` (this process's uid), created through the admin gRPC API over the admin socket ({inflight} calls in flight); the agent signs an SVID for each as they arrive. This process, the workload, then opens one `FetchX509SVID` stream (each message holds every SVID of the caller). `carapace-server localauthority x509 prepare` and `activate` (CLI) make a new CA sign; {settle} s later `localauthority x509 taint --authority-id <old>` starts the storm: the server pushes the bundle with the taint to the agent, which re-issues every SVID chained to the old CA at once (`BatchNewX509SVID`, up to 2,000 CSRs per call). Timed from starting the `taint` command until a stream message holds {n} SVIDs, every one re-issued (its certificate differs from the one held before); afterwards every SVID of that message is verified against a bundle holding only the new CA. CPU from `/proc/<pid>/stat` around the storm. Load average when B10 began: {load}.",
        td = harness::TRUST_DOMAIN,
        uid = res.uid,
        inflight = CREATE_IN_FLIGHT,
        settle = SETTLE.as_secs(),
        load = res.loadavg,
    ));
    let secs = fmt_secs;
    let mut t = Table::new(["figure", "value"]);
    t.row([
        format!("**`taint` started → the workload holds {n} re-issued SVIDs**"),
        format!("**{}**", secs(res.storm)),
    ]);
    t.row([
        "of which the `taint` command".to_owned(),
        fmt_us(res.taint_cli.as_secs_f64() * 1e6),
    ]);
    if let Some((d, w)) = res.agent_saw {
        t.row([
            "`taint` started → agent logs the re-issue (bundle with the taint received)".to_owned(),
            format!("{} ({} SVIDs named)", secs(d), fmt_count(w as f64)),
        ]);
    }
    if let Some((d, s)) = res.agent_signed {
        t.row([
            "`taint` started → agent logs `workload SVIDs updated` (all signed, published)"
                .to_owned(),
            format!("{} ({} signed)", secs(d), fmt_count(s as f64)),
        ]);
    }
    t.row([
        "stream messages during the storm (re-issued SVIDs in the largest partial one)".to_owned(),
        format!("{} ({})", res.messages, fmt_count(res.partial_max as f64)),
    ]);
    t.row([
        "the complete message: SVID fields (chain, key, bundle, ID)".to_owned(),
        crate::stats::fmt_bytes(res.message_bytes as f64),
    ]);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / res.svids.max(1) as f64;
    t.row([
        "CPU during the storm: server / agent / workload (this process)".to_owned(),
        format!(
            "{} / {} / {} ({:.0} / {:.0} / {:.0} µs per SVID)",
            secs(res.cpu.0),
            secs(res.cpu.1),
            secs(res.cpu.2),
            per(res.cpu.0),
            per(res.cpu.1),
            per(res.cpu.2)
        ),
    ]);
    t.row([
        "SVIDs verifying against the new CA alone; distinct SPIFFE IDs".to_owned(),
        format!(
            "{}; {}",
            fmt_count(res.verified as f64),
            fmt_count(res.distinct as f64)
        ),
    ]);
    t.row([format!("{n} entries created (admin API)"), secs(res.create)]);
    t.row([
        format!("first create call → agent holds all {n} SVIDs (`held=` in its log)"),
        secs(res.create_to_held),
    ]);
    r.table(&t);
    r.bullet(&format!(
        "Goal (PERFORMANCE.md S5, issue 17): {n} SVIDs renewed in < {} s — {} ({}). SPIRE: at most 500 CSRs per 5 s sync, ≈ 100 s for 10,000.",
        GOAL.as_secs(),
        if res.storm < GOAL && res.verified == res.svids {
            "met"
        } else {
            "**not met**"
        },
        secs(res.storm),
    ));
    r.bullet(&format!(
        "Old CA {} (tainted), new CA {}.",
        res.authorities.0, res.authorities.1
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_der_splits_into_its_certificates() {
        // Short and long (two-byte) lengths.
        let mut long = vec![0x30, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7u8, 256));
        let short = vec![0x30, 0x03, 1, 2, 3];
        let both = [long.clone(), short.clone()].concat();
        assert_eq!(split_der(&both).unwrap(), vec![long.clone(), short]);
        assert!(split_der(&[]).unwrap().is_empty());
        // Truncated, or not a SEQUENCE: refused.
        assert!(split_der(&long[..100]).is_err());
        assert!(split_der(&[0x04, 0x01, 0x00]).is_err());
        assert!(split_der(&[0x30, 0x80]).is_err());
    }
}
