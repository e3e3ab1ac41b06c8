//! B5: `kerberos` node attestation against the lab's MIT KDC, both halves of the plugin
//! in one process ([`KerberosAttestorClient`]: `payload()`, `answer()`;
//! [`KerberosAttestor`]: `begin()`, `session.respond()`), driven as
//! `attestor-kerberos/tests/realm.rs` drives them.
//!
//! libkrb5 reads `KRB5_CONFIG` from the process environment, and this crate never changes
//! its own environment (`set_var` is unsound once threads run). So the measurement runs
//! in a child: [`run_in_child`] starts a KDC for [`REALM`] (carapace-hsm-sim's [`Kdc`]),
//! provisions the host and service principals with their keytabs, and runs this
//! executable again as `carapace-bench --kerberos-child <JSON>` ([`ChildArgs`], [`child`])
//! with the realm's environment ([`Kdc::envs`]); the child prints one JSON line
//! ([`ChildOutput`]). The KDC lives until the child has ended.
//!
//! In the child, for `mutual_auth` on (the default) and off:
//! - sequential attestations, each phase timed: wall time and the process's CPU time
//!   (`CLOCK_PROCESS_CPUTIME_ID` across the call, with nothing else in flight, so it
//!   includes libkrb5's work on tokio's blocking threads, which a per-thread clock would
//!   miss);
//! - throughput with 1 and [`KrbPlan::loops`] concurrent attestation loops, each with its
//!   own agent client, against one server, with this process's and krb5kdc's CPU
//!   (`/proc`) and the KDC's requests counted in its log;
//! - the server alone: context tokens captured from real attestations (each bound to its
//!   own session's nonce and connection), then accepted by `respond()` on 1 and `loops`
//!   tasks with nothing else running: the server's attestations/s and CPU per attestation.
//!
//! Every attestation acquires fresh credentials from the host keytab (a private
//! `MEMORY:` ccache per attestation): an AS-REQ and a TGS-REQ to the KDC each time, by
//! the plugin's design (a host removed from the realm fails at its next attestation).
//!
//! [`run`] runs it (and notes the krb5 version and the load average), and [`section`] writes
//! the report's section.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use carapace_attestor_kerberos::agent::{KerberosAgentConfig, KerberosAttestorClient};
use carapace_attestor_kerberos::server::{KerberosAttestor, KerberosServerConfig};
use carapace_attestor_kerberos::wire::{self, Answer};
use carapace_core::plugin::{
    AttestationSession, AttestationStep, NodeAttestor as _, NodeAttestorClient as _, PluginContext,
};
use hsm_sim::kdc::{KRB5_PACKAGES, Kdc};

use crate::attest::{connection, first_round, timed};
use crate::process::{self, loadavg_now, process_cpu_time, schedstat_cpu};
use crate::report::{Report, Table, failed};
use crate::stats::{
    Repeated, Summary, fmt_bytes, fmt_cores, fmt_count, fmt_pct, fmt_secs, fmt_us, lat_cells,
};

/// The first argument that selects the hidden measuring mode of `carapace-bench`.
pub const CHILD_FLAG: &str = "--kerberos-child";

/// The lab realm B5 creates.
pub const REALM: &str = "LAB.TEST";

/// Sizes of B5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KrbPlan {
    /// Sequential attestations per `mutual_auth` setting, for the latency figures.
    pub attestations: usize,
    /// Attestations per loop in one throughput run.
    pub per_loop: usize,
    /// Concurrent attestation loops in the parallel throughput runs.
    pub loops: usize,
    /// Throughput runs per loop count and `mutual_auth` setting.
    pub runs: usize,
    /// Captured tokens the server accepts in one server-alone run.
    pub server_tokens: usize,
    /// Server-alone runs per task count and `mutual_auth` setting.
    pub server_runs: usize,
}

impl KrbPlan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> KrbPlan {
        if quick {
            KrbPlan {
                attestations: 20,
                per_loop: 10,
                loops: 2,
                runs: 1,
                server_tokens: 20,
                server_runs: 1,
            }
        } else {
            KrbPlan {
                attestations: 500,
                per_loop: 250,
                loops: 2,
                runs: 3,
                server_tokens: 300,
                server_runs: 3,
            }
        }
    }

    /// The loop (and server task) counts measured: 1 and [`KrbPlan::loops`].
    pub fn counts(&self) -> Vec<usize> {
        if self.loops > 1 {
            vec![1, self.loops]
        } else {
            vec![1]
        }
    }
}

/// What B5 needs installed, with the apt-get line: the context of a failed setup.
pub fn install_hint() -> String {
    format!("B5 needs the MIT KDC and its tools (apt-get install -y {KRB5_PACKAGES})")
}

/// The child's command line argument (after [`CHILD_FLAG`]), as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildArgs {
    /// The realm's directory (its `krb5.conf` must be the child's `KRB5_CONFIG`).
    pub dir: PathBuf,
    /// The realm.
    pub realm: String,
    /// krb5kdc's pid, for its CPU time.
    pub kdc_pid: Option<u32>,
    /// The KDC's log, for its request counts.
    pub kdc_log: Option<PathBuf>,
    /// The host principal and its keytab (the agent's).
    pub host: String,
    /// See [`ChildArgs::host`].
    pub host_keytab: PathBuf,
    /// The service principal and its keytab (the server's).
    pub service: String,
    /// See [`ChildArgs::service`].
    pub service_keytab: PathBuf,
    /// The sizes.
    pub plan: KrbPlan,
}

/// One whole attestation, phase by phase: wall time, and this process's CPU time across
/// each call (meaningful only when one attestation is in flight: the sequential run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// Agent `payload()` (`{"version":1}`).
    pub payload: Duration,
    /// Its CPU time.
    pub payload_cpu: Duration,
    /// Server `begin()`: a fresh nonce, the challenge.
    pub begin: Duration,
    /// Its CPU time.
    pub begin_cpu: Duration,
    /// Agent `answer()` to the nonce: credentials from the keytab (AS-REQ), the service
    /// ticket (TGS-REQ), the context token with the channel bindings.
    pub token: Duration,
    /// Its CPU time (this process only: the KDC's work is not in it).
    pub token_cpu: Duration,
    /// Server `respond()` to the token: acceptor credentials from the keytab, accept
    /// (ticket and authenticator decryption, bindings, replay cache), checks, selectors;
    /// with mutual authentication also the AP-REP.
    pub accept: Duration,
    /// Its CPU time.
    pub accept_cpu: Duration,
    /// Agent `answer()` to the AP-REP (zero without mutual authentication).
    pub reply: Duration,
    /// Its CPU time.
    pub reply_cpu: Duration,
    /// Server `respond()` to the agent's confirmation (zero without mutual
    /// authentication).
    pub confirm: Duration,
    /// Its CPU time.
    pub confirm_cpu: Duration,
    /// The whole attestation, wall time.
    pub total: Duration,
}

impl Phases {
    /// The agent's calls, wall time.
    pub fn agent(&self) -> Duration {
        self.payload + self.token + self.reply
    }

    /// The agent's calls, CPU time.
    pub fn agent_cpu(&self) -> Duration {
        self.payload_cpu + self.token_cpu + self.reply_cpu
    }

    /// The server's calls, wall time.
    pub fn server(&self) -> Duration {
        self.begin + self.accept + self.confirm
    }

    /// The server's calls, CPU time.
    pub fn server_cpu(&self) -> Duration {
        self.begin_cpu + self.accept_cpu + self.confirm_cpu
    }
}

/// Requests in the KDC's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdcCounts {
    /// `AS_REQ` lines (initial tickets: the TGT from the keytab).
    pub as_req: u64,
    /// `TGS_REQ` lines (service tickets).
    pub tgs_req: u64,
    /// Of those, lines without `ISSUE` (refused, or pre-authentication asked for).
    pub not_issued: u64,
}

impl KdcCounts {
    /// Counts the requests in the text of a krb5kdc log.
    pub fn parse(log: &str) -> KdcCounts {
        let mut c = KdcCounts::default();
        for line in log.lines() {
            let kind = if line.contains(": AS_REQ ") {
                &mut c.as_req
            } else if line.contains(": TGS_REQ ") {
                &mut c.tgs_req
            } else {
                continue;
            };
            *kind += 1;
            if !line.contains(": ISSUE: ") {
                c.not_issued += 1;
            }
        }
        c
    }

    /// `self - before`.
    pub fn since(&self, before: &KdcCounts) -> KdcCounts {
        KdcCounts {
            as_req: self.as_req.saturating_sub(before.as_req),
            tgs_req: self.tgs_req.saturating_sub(before.tgs_req),
            not_issued: self.not_issued.saturating_sub(before.not_issued),
        }
    }
}

/// Attestations by some concurrent loops against one server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopRun {
    /// Concurrent loops (one agent client each).
    pub loops: usize,
    /// Every attestation's phases.
    pub samples: Vec<Phases>,
    /// From the first attestation's start to the last one's end.
    pub wall: Duration,
    /// This process's CPU time over the run: both halves of the plugin (libkrb5 client
    /// and acceptor, the replay cache) and the runtime.
    pub process_cpu: Duration,
    /// krb5kdc's CPU time over the run (`/proc/<pid>/task/*/schedstat`, nanoseconds;
    /// else `/proc/<pid>/stat`, 10 ms ticks), if its pid is known.
    pub kdc_cpu: Option<Duration>,
    /// Idle time of all cores together over the run (`/proc/stat`).
    pub idle: Duration,
    /// The KDC's requests over the run, if its log was readable.
    pub kdc: Option<KdcCounts>,
}

impl LoopRun {
    /// Attestations per second.
    pub fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64().max(f64::EPSILON)
    }

    /// `d` per attestation.
    pub fn per_attestation(&self, d: Duration) -> Duration {
        d / u32::try_from(self.samples.len().max(1)).unwrap_or(u32::MAX)
    }

    /// Average cores used: (this process + krb5kdc, idle, others and steal), out of
    /// `nproc`.
    pub fn cores(&self, nproc: usize) -> (f64, f64, f64) {
        let wall = self.wall.as_secs_f64().max(f64::EPSILON);
        let ours = (self.process_cpu + self.kdc_cpu.unwrap_or_default()).as_secs_f64() / wall;
        let idle = self.idle.as_secs_f64() / wall;
        (ours, idle, (nproc as f64 - ours - idle).max(0.0))
    }

    /// KDC requests (AS + TGS) per attestation.
    pub fn kdc_requests_per_attestation(&self) -> Option<(f64, f64)> {
        let k = self.kdc?;
        let n = self.samples.len().max(1) as f64;
        Some((k.as_req as f64 / n, k.tgs_req as f64 / n))
    }
}

/// The server accepting captured tokens, nothing else running.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ServerRun {
    /// Concurrent tasks calling `respond()`.
    pub threads: usize,
    /// Tokens accepted.
    pub tokens: usize,
    /// From the first `respond()` to the last one's end.
    pub wall: Duration,
    /// This process's CPU time over the run (`CLOCK_PROCESS_CPUTIME_ID`).
    pub process_cpu: Duration,
    /// Idle time of all cores together over the run.
    pub idle: Duration,
}

impl ServerRun {
    /// Attestations (tokens accepted) per second.
    pub fn rate(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64().max(f64::EPSILON)
    }

    /// CPU per attestation, µs.
    pub fn cpu_us(&self) -> f64 {
        self.process_cpu.as_secs_f64() * 1e6 / self.tokens.max(1) as f64
    }

    /// Average cores used: (this process, idle, others and steal), out of `nproc`.
    pub fn cores(&self, nproc: usize) -> (f64, f64, f64) {
        let wall = self.wall.as_secs_f64().max(f64::EPSILON);
        let ours = self.process_cpu.as_secs_f64() / wall;
        let idle = self.idle.as_secs_f64() / wall;
        (ours, idle, (nproc as f64 - ours - idle).max(0.0))
    }
}

/// Everything measured with one `mutual_auth` setting; each part may have failed on its
/// own (the error text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeResult {
    /// The agent's `mutual_auth`.
    pub mutual: bool,
    /// The agent path of the warm-up attestation.
    pub agent_path: Option<String>,
    /// Its selectors.
    pub selectors: Vec<String>,
    /// The size of the agent's token answer (JSON with the base64 GSS token).
    pub answer_bytes: Option<usize>,
    /// Sequential attestations, one loop.
    pub sequential: Result<LoopRun, String>,
    /// Throughput runs with 1 and `loops` loops.
    pub throughput: Result<Vec<LoopRun>, String>,
    /// Server-alone runs.
    pub server: Result<Vec<ServerRun>, String>,
}

impl ModeResult {
    /// The failures, as errors.
    pub fn errors(&self) -> Vec<anyhow::Error> {
        let what = if self.mutual {
            "mutual_auth = true"
        } else {
            "mutual_auth = false"
        };
        [
            self.sequential.as_ref().err().map(|e| ("sequential", e)),
            self.throughput.as_ref().err().map(|e| ("throughput", e)),
            self.server.as_ref().err().map(|e| ("server alone", e)),
        ]
        .into_iter()
        .flatten()
        .map(|(part, e)| anyhow!("B5 {part} ({what}): {e}"))
        .collect()
    }
}

/// What the child prints (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildOutput {
    /// By `mutual_auth`: on, then off.
    pub modes: Vec<ModeResult>,
    /// The replay cache file's size at the end.
    pub rcache_bytes: Option<u64>,
    /// Worker threads of the child's tokio runtime.
    pub workers: usize,
}

/// What [`run_in_child`] gives back.
#[derive(Debug, Clone, PartialEq)]
pub struct B5Run {
    /// Starting the KDC and provisioning the principals and keytabs.
    pub setup: Duration,
    /// The child's measurements.
    pub output: ChildOutput,
}

/// One whole attestation, timed; returns the agent path and selectors too.
pub async fn attest_timed(
    server: &KerberosAttestor,
    client: &KerberosAttestorClient,
    mutual: bool,
) -> Result<(Phases, String, Vec<String>, usize)> {
    let ctx = connection();
    let start = Instant::now();
    let r = first_round(server, client, &ctx).await?;
    let mut p = Phases {
        payload: r.payload.wall,
        payload_cpu: r.payload.cpu,
        begin: r.begin.wall,
        begin_cpu: r.begin.cpu,
        token: r.answer.wall,
        token_cpu: r.answer.cpu,
        accept: r.respond.wall,
        accept_cpu: r.respond.cpu,
        ..Phases::default()
    };
    let result = match r.step {
        AttestationStep::Done(r) if !mutual => r,
        AttestationStep::Done(_) => bail!("mutual_auth is on, but the server sent no AP-REP"),
        AttestationStep::Challenge { .. } if !mutual => {
            bail!("mutual_auth is off, but the server sent a second challenge")
        }
        AttestationStep::Challenge { challenge, session } => {
            let (answer, took) = timed(client.answer(&challenge, &ctx)).await;
            (p.reply, p.reply_cpu) = (took.wall, took.cpu);
            let answer = answer.context("agent answer() to the AP-REP")?;
            let (step, took) = timed(session.respond(&answer)).await;
            (p.confirm, p.confirm_cpu) = (took.wall, took.cpu);
            match step.context("server respond() to the confirmation")? {
                AttestationStep::Done(r) => r,
                AttestationStep::Challenge { .. } => bail!("server sent a third challenge"),
            }
        }
    };
    p.total = start.elapsed();
    let selectors = result.selectors.iter().map(|s| s.to_string()).collect();
    Ok((p, result.agent_path, selectors, r.answer_bytes))
}

/// The KDC's CPU time and log.
#[derive(Debug, Clone)]
struct KdcWatch {
    pid: Option<u32>,
    log: Option<PathBuf>,
}

impl KdcWatch {
    fn cpu(&self) -> Option<Duration> {
        let pid = self.pid?;
        schedstat_cpu(pid).or_else(|| process::cpu_time(pid).ok())
    }

    fn counts(&self) -> Option<KdcCounts> {
        let text = std::fs::read_to_string(self.log.as_ref()?).ok()?;
        Some(KdcCounts::parse(&text))
    }
}

/// An agent client with `mutual`.
fn client(args: &ChildArgs, mutual: bool) -> Result<KerberosAttestorClient> {
    KerberosAttestorClient::new(&KerberosAgentConfig {
        service_principal: args.service.clone(),
        keytab: Some(args.host_keytab.clone()),
        principal: Some(args.host.clone()),
        mutual_auth: mutual,
    })
    .context("building the agent's KerberosAttestorClient")
}

/// `per_loop` attestations on each of `loops` loops (one task and agent client each,
/// attesting one after the other), all against `server`, after one untimed warm-up
/// attestation per loop.
async fn loop_run(
    server: &Arc<KerberosAttestor>,
    args: &ChildArgs,
    kdc: &KdcWatch,
    loops: usize,
    per_loop: usize,
    mutual: bool,
) -> Result<LoopRun> {
    let clients = (0..loops.max(1))
        .map(|_| client(args, mutual).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    for c in &clients {
        attest_timed(server, c, mutual)
            .await
            .context("warm-up attestation")?;
    }
    let (kdc0, counts0) = (kdc.cpu(), kdc.counts());
    let (cpu0, idle0) = (process_cpu_time(), process::machine_idle()?);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in clients {
        let server = server.clone();
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(per_loop);
            for _ in 0..per_loop {
                out.push(attest_timed(&server, &c, mutual).await?.0);
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut samples = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        samples.extend(joined.context("attestation task")??);
    }
    let wall = start.elapsed();
    let process_cpu = process_cpu_time().saturating_sub(cpu0);
    let idle = process::machine_idle()?.saturating_sub(idle0);
    Ok(LoopRun {
        loops: loops.max(1),
        samples,
        wall,
        process_cpu,
        kdc_cpu: kdc0.zip(kdc.cpu()).map(|(a, b)| b.saturating_sub(a)),
        idle,
        kdc: counts0.zip(kdc.counts()).map(|(a, b)| b.since(&a)),
    })
}

/// A server session waiting for its token, and the agent's token answer.
type Captured = (Box<dyn AttestationSession>, Vec<u8>);

/// `n` real attestations up to the agent's token answer: the server's session (its
/// nonce) and the answer bound to it, not yet presented.
async fn capture(
    server: &KerberosAttestor,
    client: &KerberosAttestorClient,
    n: usize,
) -> Result<Vec<Captured>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ctx = connection();
        let payload = client.payload(&ctx).await.context("agent payload()")?;
        let AttestationStep::Challenge { challenge, session } = server
            .begin(&payload, &ctx)
            .await
            .context("server begin()")?
        else {
            bail!("server begin() finished without a challenge");
        };
        let answer = client
            .answer(&challenge, &ctx)
            .await
            .context("agent answer() to the nonce")?;
        out.push((session, answer));
    }
    Ok(out)
}

/// The server accepts `captured` on `threads` tasks (round robin), each answering the
/// AP-REP challenge with the agent's confirmation itself when `mutual`.
async fn server_run(captured: Vec<Captured>, threads: usize, mutual: bool) -> Result<ServerRun> {
    let threads = threads.max(1);
    let tokens = captured.len();
    let confirm = Arc::new(wire::encode(&Answer::ReplyVerified)?);
    let mut chunks: Vec<Vec<Captured>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in captured.into_iter().enumerate() {
        if let Some(chunk) = chunks.get_mut(i % threads) {
            chunk.push(c);
        }
    }
    let (cpu0, idle0) = (process_cpu_time(), process::machine_idle()?);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in chunks {
        let confirm = confirm.clone();
        tasks.spawn(async move {
            for (session, answer) in chunk {
                match session
                    .respond(&answer)
                    .await
                    .context("server respond() to a captured token")?
                {
                    AttestationStep::Done(_) if !mutual => {}
                    AttestationStep::Challenge { session, .. } if mutual => {
                        match session.respond(&confirm).await? {
                            AttestationStep::Done(_) => {}
                            AttestationStep::Challenge { .. } => {
                                bail!("server sent a third challenge")
                            }
                        }
                    }
                    _ => bail!("the server's steps do not match mutual_auth = {mutual}"),
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("server task")??;
    }
    let wall = start.elapsed();
    Ok(ServerRun {
        threads,
        tokens,
        wall,
        process_cpu: process_cpu_time().saturating_sub(cpu0),
        idle: process::machine_idle()?.saturating_sub(idle0),
    })
}

/// `modes` in order in even runs, reversed in odd ones: neither setting always runs
/// first (the replay cache grows along the run).
fn alternating(modes: &mut [ModeResult], run: usize) -> Vec<&mut ModeResult> {
    let mut v: Vec<&mut ModeResult> = modes.iter_mut().collect();
    if run % 2 == 1 {
        v.reverse();
    }
    v
}

fn err_text(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

/// The child: checks that its `KRB5_CONFIG` is the realm's, then measures both
/// `mutual_auth` settings (on first), interleaving them in the repeated runs (in alternating order).
pub fn child(args: &ChildArgs) -> Result<ChildOutput> {
    let want = args.dir.join("krb5.conf");
    match std::env::var_os("KRB5_CONFIG") {
        Some(v) if Path::new(&v) == want => {}
        other => bail!(
            "{CHILD_FLAG} must run with KRB5_CONFIG={} in its environment (got {other:?}): libkrb5 would read another realm's profile",
            want.display()
        ),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let workers = rt.metrics().num_workers();
    let data = tempfile::Builder::new()
        .prefix("carapace-bench-krb-")
        .tempdir()?;
    let server = Arc::new(
        KerberosAttestor::new(
            &KerberosServerConfig {
                keytab: args.service_keytab.clone(),
                service_principal: args.service.clone(),
                allowed_realms: vec![args.realm.clone()],
                machine_account_domains: Default::default(),
                replay_cache: None,
            },
            &PluginContext::for_tests(data.path()),
        )
        .context("building the server's KerberosAttestor")?,
    );
    let kdc = KdcWatch {
        pid: args.kdc_pid,
        log: args.kdc_log.clone(),
    };
    let plan = &args.plan;
    let mut modes: Vec<ModeResult> = [true, false]
        .into_iter()
        .map(|mutual| ModeResult {
            mutual,
            agent_path: None,
            selectors: Vec::new(),
            answer_bytes: None,
            sequential: Err("not run".into()),
            throughput: Ok(Vec::new()),
            server: Ok(Vec::new()),
        })
        .collect();
    rt.block_on(async {
        for m in &mut modes {
            eprintln!(
                "==> B5: {} sequential attestations, mutual_auth = {}",
                plan.attestations, m.mutual
            );
            let first = async {
                let c = client(args, m.mutual)?;
                attest_timed(&server, &c, m.mutual).await
            }
            .await;
            match first {
                Ok((_, path, selectors, bytes)) => {
                    m.agent_path = Some(path);
                    m.selectors = selectors;
                    m.answer_bytes = Some(bytes);
                    m.sequential = loop_run(&server, args, &kdc, 1, plan.attestations, m.mutual)
                        .await
                        .map_err(|e| err_text(&e));
                }
                Err(e) => {
                    let e = err_text(&e.context("the first attestation"));
                    m.sequential = Err(e.clone());
                    m.throughput = Err(e.clone());
                    m.server = Err(e);
                }
            }
        }
        eprintln!(
            "==> B5: throughput ({} attestations per loop, loops {:?}, {} runs, both mutual_auth settings)",
            plan.per_loop,
            plan.counts(),
            plan.runs
        );
        for run in 0..plan.runs.max(1) {
            for m in alternating(&mut modes, run) {
                for &k in &plan.counts() {
                    let Ok(runs) = &mut m.throughput else { break };
                    match loop_run(&server, args, &kdc, k, plan.per_loop, m.mutual).await {
                        Ok(run) => runs.push(run),
                        Err(e) => {
                            m.throughput =
                                Err(err_text(&e.context(format!("throughput run, {k} loop(s)"))))
                        }
                    }
                }
            }
        }
        eprintln!(
            "==> B5: server alone ({} captured tokens per run, tasks {:?}, {} runs)",
            plan.server_tokens,
            plan.counts(),
            plan.server_runs
        );
        for run in 0..plan.server_runs.max(1) {
            for m in alternating(&mut modes, run) {
                for &k in &plan.counts() {
                    if m.server.is_err() {
                        break;
                    }
                    let run = async {
                        let c = client(args, m.mutual)?;
                        let captured = capture(&server, &c, plan.server_tokens.max(1)).await?;
                        server_run(captured, k, m.mutual).await
                    }
                    .await;
                    match (run, &mut m.server) {
                        (Ok(run), Ok(runs)) => runs.push(run),
                        (Err(e), _) => {
                            m.server =
                                Err(err_text(&e.context(format!("server alone, {k} task(s)"))))
                        }
                        (Ok(_), Err(_)) => {}
                    }
                }
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let rcache_bytes = std::fs::metadata(data.path().join("kerberos.rcache"))
        .ok()
        .map(|m| m.len());
    Ok(ChildOutput {
        modes,
        rcache_bytes,
        workers,
    })
}

/// `krb5-config --version` (`Kerberos 5 release 1.20.1`), or the krb5-kdc package's
/// version.
pub fn krb5_version() -> String {
    let out = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    out("krb5-config", &["--version"])
        .map(|v| format!("MIT {v}"))
        .or_else(|| {
            out("dpkg-query", &["-W", "-f", "${Version}", "krb5-kdc"])
                .map(|v| format!("MIT krb5-kdc {v}"))
        })
        .unwrap_or_else(|| "MIT krb5 (version unknown)".into())
}

/// B5: starts the KDC, provisions the principals, runs the child with the realm's
/// environment and reads its JSON line; the KDC is stopped afterwards (also when the
/// future is dropped: the child is killed, the KDC stopped by its guard).
pub async fn run_in_child(plan: &KrbPlan) -> Result<B5Run> {
    let t = Instant::now();
    let (kdc, principals) = tokio::task::spawn_blocking(|| -> Result<_> {
        let kdc = Kdc::start(REALM).context(install_hint())?;
        let principals = kdc
            .provision_host_and_service()
            .context("provisioning the host and service principals")?;
        Ok((kdc, principals))
    })
    .await
    .map_err(|e| anyhow!("starting the KDC: task failed: {e}"))??;
    let setup = t.elapsed();
    let args = ChildArgs {
        dir: kdc.dir().to_path_buf(),
        realm: kdc.realm().to_owned(),
        kdc_pid: Some(kdc.pid()),
        kdc_log: Some(kdc.log()),
        host: principals.host,
        host_keytab: principals.host_keytab,
        service: principals.service,
        service_keytab: principals.service_keytab,
        plan: plan.clone(),
    };
    // The KDC stays up until the child is done.
    let output: Result<ChildOutput> =
        crate::process::run_json_child(CHILD_FLAG, &args, &kdc.envs()).await;
    drop(kdc);
    let output = output?;
    Ok(B5Run { setup, output })
}

/// What B5 measured: the child's figures, or nothing if the KDC or the child failed.
#[derive(Debug)]
pub struct B5 {
    /// MIT krb5's version.
    krb5: String,
    /// `/proc/loadavg` when B5 started.
    loadavg: String,
    /// The KDC's setup time and the child's measurements.
    run: B5Run,
}

impl B5 {
    /// The failed parts, as errors (for the exit status).
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        self.run
            .output
            .modes
            .iter()
            .flat_map(ModeResult::errors)
            .collect()
    }
}

/// B5: a KDC, its principals and keytabs, and the child that measures.
pub async fn run(plan: &KrbPlan) -> Result<B5> {
    let krb5 = krb5_version();
    let loadavg = loadavg_now();
    eprintln!(
        "==> B5: starting an MIT KDC for {} and provisioning the host and service principals",
        REALM
    );
    let run = run_in_child(plan).await?;
    Ok(B5 { krb5, loadavg, run })
}

fn mode_name(mutual: bool) -> &'static str {
    if mutual {
        "mutual_auth = true (default)"
    } else {
        "mutual_auth = false"
    }
}

/// A figure of a Kerberos attestation's phases.
type KrbPhaseOf = fn(&Phases) -> Duration;

/// Mean of `f` over `samples`, µs.
fn mean_us(samples: &[Phases], f: KrbPhaseOf) -> f64 {
    let v: Vec<Duration> = samples.iter().map(f).collect();
    Summary::of_durations_us(&v).map_or(f64::NAN, |s| s.mean)
}

fn per_attestation_us(run: &LoopRun, d: Duration) -> f64 {
    run.per_attestation(d).as_secs_f64() * 1e6
}

fn b5_sequential(r: &mut Report, run: &LoopRun, mutual: bool) {
    let mut t = Table::new([
        "phase",
        "side",
        "what",
        "wall p50",
        "wall p99",
        "wall max",
        "CPU p50 (this process)",
        "CPU mean",
    ]);
    let accept_what = if mutual {
        "acceptor credentials from the keytab, `gss_accept_sec_context` (ticket and authenticator, channel bindings, replay cache write), AP-REP, realm and name checks, selectors"
    } else {
        "acceptor credentials from the keytab, `gss_accept_sec_context` (ticket and authenticator, channel bindings, replay cache write), realm and name checks, selectors"
    };
    let mut rows: Vec<(&str, &str, &str, KrbPhaseOf, KrbPhaseOf)> = vec![
        (
            "`payload()`",
            "agent",
            "`{\"version\":1}`",
            |p| p.payload,
            |p| p.payload_cpu,
        ),
        (
            "`begin()`",
            "server",
            "32-byte nonce, challenge",
            |p| p.begin,
            |p| p.begin_cpu,
        ),
        (
            "`answer()` to the nonce",
            "agent + **KDC**",
            "keytab → AS-REQ (TGT) → TGS-REQ (service ticket) → `gss_init_sec_context` with the channel bindings",
            |p| p.token,
            |p| p.token_cpu,
        ),
        (
            "`respond()` to the token",
            "server",
            accept_what,
            |p| p.accept,
            |p| p.accept_cpu,
        ),
    ];
    if mutual {
        rows.push((
            "`answer()` to the AP-REP",
            "agent",
            "second `gss_init_sec_context` step: verify the server's AP-REP",
            |p| p.reply,
            |p| p.reply_cpu,
        ));
        rows.push((
            "`respond()` to the confirmation",
            "server",
            "`{\"step\":\"reply_verified\"}`",
            |p| p.confirm,
            |p| p.confirm_cpu,
        ));
    }
    rows.push(("agent total", "agent", "", Phases::agent, Phases::agent_cpu));
    rows.push((
        "server total",
        "server",
        "",
        Phases::server,
        Phases::server_cpu,
    ));
    rows.push((
        "**whole attestation**",
        "wall",
        "",
        |p| p.total,
        |p| p.agent_cpu() + p.server_cpu(),
    ));
    for (phase, side, what, wall, cpu) in rows {
        let [p50, p99, max, _] = lat_cells(&run.samples.iter().map(wall).collect::<Vec<_>>());
        let [cpu50, _, _, cpu_mean] = lat_cells(&run.samples.iter().map(cpu).collect::<Vec<_>>());
        t.row([
            phase.to_owned(),
            side.to_owned(),
            what.to_owned(),
            p50,
            p99,
            max,
            cpu50,
            cpu_mean,
        ]);
    }
    r.table(&t);
    let total = mean_us(&run.samples, |p| p.total);
    let agent = mean_us(&run.samples, Phases::agent);
    let server = mean_us(&run.samples, Phases::server);
    r.bullet(&format!(
        "{} attestations one after the other in {} = **{:.0} attestations/s sequentially** ({}). Of the wall time, the agent's calls took {} and the server's {}.",
        run.samples.len(),
        fmt_secs(run.wall),
        run.rate(),
        mode_name(mutual),
        fmt_pct(agent / total),
        fmt_pct(server / total),
    ));
    let process = per_attestation_us(run, run.process_cpu);
    let kdc = run.kdc_cpu.map(|k| per_attestation_us(run, k));
    let calls = mean_us(&run.samples, |p| p.agent_cpu() + p.server_cpu());
    let busy = calls + kdc.unwrap_or(0.0);
    let waiting = if busy >= 0.95 * total {
        format!(
            "The calls' CPU and krb5kdc's add up to {} of the {} per attestation: a sequential attestation is a chain of CPU work handed between the two processes, with no idle waiting worth naming.",
            fmt_pct(busy / total),
            fmt_us(total)
        )
    } else {
        format!(
            "Of the {} per attestation, {} is neither the calls nor krb5kdc on a CPU: loopback TCP round trips to the KDC, wake-ups and thread hand-offs.",
            fmt_us(total),
            fmt_us(total - busy)
        )
    };
    r.bullet(&format!(
        "CPU per attestation (run totals): this process {} (agent calls {}, server calls {}; the rest is the runtime's idle workers and blocking threads); krb5kdc {}. {waiting}",
        fmt_us(process),
        fmt_us(mean_us(&run.samples, Phases::agent_cpu)),
        fmt_us(mean_us(&run.samples, Phases::server_cpu)),
        kdc.map_or("not measured".into(), fmt_us),
    ));
    if let (Some((a, t)), Some(k)) = (run.kdc_requests_per_attestation(), run.kdc) {
        r.bullet(&format!(
            "The KDC's log over the run: **{a:.2} AS-REQ and {t:.2} TGS-REQ per attestation**{} — a fresh TGT and service ticket every time.",
            if k.not_issued > 0 {
                format!(" ({} not issued)", k.not_issued)
            } else {
                String::new()
            }
        ));
    }
}

fn b5_throughput(r: &mut Report, modes: &[ModeResult], plan: &KrbPlan, nproc: usize) {
    let mut t = Table::new([
        "mutual_auth",
        "loops (one agent client each)",
        "attestations per run",
        "attestations/s: median (range, runs)",
        "latency p50",
        "p99",
        "this process CPU per attestation",
        "krb5kdc CPU per attestation",
        "cores: this process + krb5kdc / idle / others (median)",
    ]);
    let med = |v: Vec<f64>| Repeated::of(&v).map_or(f64::NAN, |r| r.median);
    let mut notes = Vec::new();
    for m in modes {
        let Ok(runs) = &m.throughput else { continue };
        let mut medians = Vec::new();
        for k in plan.counts() {
            let of_k: Vec<&LoopRun> = runs.iter().filter(|x| x.loops == k).collect();
            let Some(rates) = Repeated::of(&of_k.iter().map(|x| x.rate()).collect::<Vec<_>>())
            else {
                continue;
            };
            let lats: Vec<Duration> = of_k
                .iter()
                .flat_map(|x| x.samples.iter().map(|p| p.total))
                .collect();
            let [p50, p99, _, _] = lat_cells(&lats);
            let process = med(of_k
                .iter()
                .map(|x| per_attestation_us(x, x.process_cpu))
                .collect());
            let kdc = med(of_k
                .iter()
                .filter_map(|x| x.kdc_cpu.map(|c| per_attestation_us(x, c)))
                .collect());
            let cores: Vec<(f64, f64, f64)> = of_k.iter().map(|x| x.cores(nproc)).collect();
            let idle = med(cores.iter().map(|c| c.1).collect());
            medians.push((k, rates.median, process + kdc, idle));
            t.row([
                m.mutual.to_string(),
                k.to_string(),
                (k * plan.per_loop).to_string(),
                rates.fmt_count(),
                p50,
                p99,
                fmt_us(process),
                fmt_us(kdc),
                format!(
                    "{:.2} / {idle:.2} / {:.2}",
                    med(cores.iter().map(|c| c.0).collect()),
                    med(cores.iter().map(|c| c.2).collect())
                ),
            ]);
        }
        if let (Some(&(_, one, c1, _)), Some(&(k, many, ck, idle))) =
            (medians.first(), medians.last())
            && k > 1
        {
            let ceiling = nproc as f64 * 1e6 / ck;
            notes.push(format!(
                "{}: {k} loops attest {:.2}× as fast as one (ideal {k}×): {} vs {} attestations/s. CPU per attestation (this process + krb5kdc): {} with one loop, {} with {k}. At that cost {nproc} cores allow at most {} attestations/s; {k} loops reached {} of it, with {idle:.2} cores idle on average: each attestation is a chain of hand-offs between this process and krb5kdc (agent → AS-REQ → agent → TGS-REQ → agent → server), and krb5kdc, one single-threaded process, serves one request at a time, so the two loops' requests can queue behind each other.",
                mode_name(m.mutual),
                many / one,
                fmt_count(many),
                fmt_count(one),
                fmt_us(c1),
                fmt_us(ck),
                fmt_count(ceiling),
                fmt_pct(many / ceiling),
            ));
        }
    }
    r.table(&t);
    for n in notes {
        r.bullet(&n);
    }
}

/// Median server CPU per attestation (µs) over `runs`.
fn server_cpu_of(runs: &[ServerRun]) -> Option<f64> {
    Repeated::of(&runs.iter().map(ServerRun::cpu_us).collect::<Vec<_>>()).map(|r| r.median)
}

fn b5_server(r: &mut Report, modes: &[ModeResult], plan: &KrbPlan, nproc: usize) {
    let mut t = Table::new([
        "mutual_auth",
        "tasks",
        "tokens per run",
        "attestations/s: median (range, runs)",
        "CPU-µs per attestation (median)",
        "per core: 10⁶ / CPU-µs",
        "cores: this process / idle / others (median)",
    ]);
    for m in modes {
        let Ok(runs) = &m.server else { continue };
        for k in plan.counts() {
            let of_k: Vec<ServerRun> = runs.iter().copied().filter(|x| x.threads == k).collect();
            let Some(rates) = Repeated::of(&of_k.iter().map(ServerRun::rate).collect::<Vec<_>>())
            else {
                continue;
            };
            let cpu = server_cpu_of(&of_k).unwrap_or(f64::NAN);
            let cores: Vec<(f64, f64, f64)> = of_k.iter().map(|x| x.cores(nproc)).collect();
            t.row([
                m.mutual.to_string(),
                k.to_string(),
                plan.server_tokens.to_string(),
                rates.fmt_count(),
                format!("{cpu:.0}"),
                fmt_count(1e6 / cpu),
                fmt_cores(&cores),
            ]);
        }
    }
    r.table(&t);
    for m in modes {
        let Ok(runs) = &m.server else { continue };
        let of = |k: usize| {
            let of_k: Vec<ServerRun> = runs.iter().copied().filter(|x| x.threads == k).collect();
            let med = |v: Vec<f64>| Repeated::of(&v).map(|r| r.median);
            Some((
                med(of_k.iter().map(ServerRun::rate).collect())?,
                med(of_k.iter().map(ServerRun::cpu_us).collect())?,
                med(of_k.iter().map(|x| x.cores(nproc).1).collect())?,
            ))
        };
        let k = plan.loops.max(1);
        if let (true, Some((r1, c1, _)), Some((rk, ck, idle))) = (k > 1, of(1), of(k)) {
            r.bullet(&format!(
                "{}: {k} tasks accept {:.2}× as many tokens per second as one ({} → {}) at {c1:.0} → {ck:.0} CPU-µs each, with {idle:.2} cores idle: part of each accept waits on something serialised — a lock inside libkrb5, or the replay cache file, which every accept opens, locks and writes (not identified further).",
                mode_name(m.mutual),
                rk / r1,
                fmt_count(r1),
                fmt_count(rk),
            ));
        }
    }
}

/// Where one attestation's CPU goes, with the whole-attestation rate: the bound.
fn b5_bounds(r: &mut Report, modes: &[ModeResult], nproc: usize) {
    for m in modes {
        let (Ok(seq), Ok(server)) = (&m.sequential, &m.server) else {
            continue;
        };
        let Some(server_cpu) = server_cpu_of(server) else {
            continue;
        };
        let agent = mean_us(&seq.samples, Phases::agent_cpu);
        let kdc = seq.kdc_cpu.map(|k| per_attestation_us(seq, k));
        let best = m.throughput.as_ref().map_or(f64::NAN, |runs| {
            runs.iter().map(LoopRun::rate).fold(f64::NAN, f64::max)
        });
        r.bullet(&format!(
            "**{}: per attestation the server spends {server_cpu:.0} µs of CPU (~{} attestations/s per core), the agent half {} (libkrb5 client: keytab, two KDC exchanges, the token{}), krb5kdc {}{}.** Whole attestations reached at most {} per second here, with all three on the same {nproc} cores, the server's share of their CPU being {}. In a deployment the agents run on their own hosts and the realm's KDCs (or domain controllers) elsewhere: what the Carapace server pays per Kerberos attestation is the {server_cpu:.0} µs.",
            mode_name(m.mutual),
            fmt_count(1e6 / server_cpu),
            fmt_us(agent),
            if m.mutual { ", the AP-REP check" } else { "" },
            kdc.map_or("not measured".into(), fmt_us),
            match kdc {
                Some(k) if k > 0.0 => format!(
                    " (one single-threaded krb5kdc process issues both tickets for at most ~{} attestations/s)",
                    fmt_count(1e6 / k)
                ),
                _ => String::new(),
            },
            fmt_count(best),
            fmt_pct(server_cpu / (server_cpu + agent + kdc.unwrap_or(0.0))),
        ));
    }
    // Median and range of the server CPU per attestation over every run of a mode.
    let cpu_of = |mutual: bool| {
        let runs = modes
            .iter()
            .find(|m| m.mutual == mutual)
            .and_then(|m| m.server.as_ref().ok())?;
        Repeated::of(&runs.iter().map(ServerRun::cpu_us).collect::<Vec<_>>())
    };
    if let (Some(on), Some(off)) = (cpu_of(true), cpu_of(false)) {
        let overlap = on.min <= off.max && off.min <= on.max;
        let why = if overlap {
            "the two settings' runs overlap, so the AP-REP (one more encryption in the session key) and the confirmation message cost less than the run-to-run noise"
        } else if on.median > off.median {
            "the AP-REP (one more encryption in the session key) and the confirmation message"
        } else {
            "less with mutual authentication, although the server does more with it (the AP-REP and one more message). Carapace's server code takes the same path for both tokens (plus the confirmation step), so the difference is inside MIT's `gss_accept_sec_context`; its cause was not investigated"
        };
        r.bullet(&format!(
            "Server CPU per attestation with mutual authentication {:.0} µs (runs {:.0}–{:.0}), without {:.0} µs (runs {:.0}–{:.0}), {:+.0} µs: {why}.",
            on.median,
            on.min,
            on.max,
            off.median,
            off.min,
            off.max,
            on.median - off.median,
        ));
    }
}

fn b5_anchors(r: &mut Report, modes: &[ModeResult]) {
    r.bullet("The goals set no Kerberos figure (they name join tokens and TPM; SPIRE caps node attestation at 1/s per source IP): there is no goal to meet or miss here.");
    let Some(seq) = modes
        .iter()
        .find(|m| m.mutual)
        .and_then(|m| m.sequential.as_ref().ok())
    else {
        return;
    };
    let p50 = |f: KrbPhaseOf| {
        Summary::of_durations_us(&seq.samples.iter().map(f).collect::<Vec<_>>())
            .map_or(f64::NAN, |s| s.p50)
    };
    let total = p50(|p| p.total);
    r.bullet(&format!(
        "The lab's earlier measurement (libgssapi 0.11, client and server in separate processes, one-shot): client `acquire` with the AS-REQ 5–6 ms, `init_sec_context` with the TGS-REQ 1.5 ms, server acquire + accept 0.9 ms (5 ms when the replay cache file is new). Here, mutual auth: the agent's `answer()` to the nonce (both KDC requests and the token) p50 {}, the server's `respond()` to the token p50 {}, the whole attestation p50 {}. Those figures are one-shot, each in a fresh process; here libkrb5 is warm after the warm-up attestation. The same measurement's in-process loop with cached tickets (no KDC traffic) took 0.29 ms per handshake (median): asking the KDC for fresh tickets at every attestation makes one {:.0}× as long.",
        fmt_us(p50(|p| p.token)),
        fmt_us(p50(|p| p.accept)),
        fmt_us(total),
        total / 290.0,
    ));
}

/// B5's report.
pub fn section(r: &mut Report, b5: &B5, plan: &KrbPlan, nproc: usize) {
    let out = &b5.run.output;
    let first = out.modes.iter().find(|m| m.agent_path.is_some());
    let requests = out
        .modes
        .iter()
        .filter_map(|m| m.sequential.as_ref().ok())
        .find_map(LoopRun::kdc_requests_per_attestation);
    r.para(&format!(
        "{}: a throwaway realm {} (carapace-hsm-sim's `Kdc`: its own directory, database and profiles, one `krb5kdc -n` process on a free 127.0.0.1 port) with `host/node1.lab.test` and `carapace/server.lab.test` and their keytabs, set up in {}. Clients reach the KDC over TCP (the lab's `krb5.conf` has `udp_preference_limit = 1`). The measurement runs in a child process (`carapace-bench --kerberos-child`) started with the realm's `KRB5_CONFIG`, `KRB5_KDC_PROFILE` and `KRB5RCACHEDIR`, because libkrb5 reads them from the environment. In it both halves of the `kerberos` plugin run on one tokio runtime ({} workers; libkrb5 runs on its blocking threads), as in `attestor-kerberos/tests/realm.rs`: the agent half `KerberosAttestorClient` (host keytab, principal `host/node1.lab.test@LAB.TEST`) and one server half `KerberosAttestor` (service keytab, `allowed_realms = [\"LAB.TEST\"]`, its `file2:` replay cache in a temporary data directory{}; it keeps every authenticator seen within the clock skew, 5 minutes); no gRPC between them. Each attestation is one simulated connection: 32 random bytes as the TLS exporter, the same on both halves. Result: agent path `{}`, selectors {}; the token answer is {} bytes of JSON. Load average when B5 started: {}.",
        b5.krb5,
        REALM,
        fmt_secs(b5.run.setup),
        out.workers,
        out.rcache_bytes
            .map(|b| format!(", {} at the end", fmt_bytes(b as f64)))
            .unwrap_or_default(),
        first.and_then(|m| m.agent_path.as_deref()).unwrap_or("—"),
        first
            .map(|m| m
                .selectors
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        first
            .and_then(|m| m.answer_bytes)
            .map_or("—".into(), |b| b.to_string()),
        b5.loadavg,
    ));
    r.para(&format!(
        "**Every attestation acquires fresh credentials from the keytab, by design:** the agent half opens a private `MEMORY:` credential cache per attestation, so each attestation sends an AS-REQ (a TGT from the host keytab) and a TGS-REQ (a ticket for the server's principal) to the KDC before it builds its token{}. **The KDC runs on the same {nproc} cores** as both halves of the plugin; its CPU is shown separately.",
        match requests {
            Some((a, t)) => format!(" (the KDC's log: {a:.2} AS-REQ and {t:.2} TGS-REQ per attestation)"),
            None => String::new(),
        }
    ));

    for m in &out.modes {
        r.heading(
            3,
            &format!("Whole attestation, sequential, {}", mode_name(m.mutual)),
        );
        r.para(&format!(
            "{} attestations one after the other with one agent client, after one untimed warm-up; each call timed: wall time, and this process's CPU time across the call (`CLOCK_PROCESS_CPUTIME_ID`: with one attestation in flight it is the call's own work on every thread, libkrb5 on the blocking thread included, but not the KDC's).",
            plan.attestations
        ));
        match &m.sequential {
            Ok(run) => b5_sequential(r, run, m.mutual),
            Err(e) => failed(r, "sequential attestations", &anyhow!("{e}")),
        }
    }

    r.heading(
        3,
        &format!(
            "Attestations per second: 1 and {} concurrent loops, one server",
            plan.loops.max(1)
        ),
    );
    r.para(&format!(
        "Each run: one untimed warm-up attestation per loop, then {} attestations per loop, each loop with its own agent client attesting one after the other in its own tokio task, all against the same `KerberosAttestor`. {} run(s) per loop count and setting, interleaved (the two settings alternate which goes first). Latency: the whole attestation. CPU: this process (`CLOCK_PROCESS_CPUTIME_ID`) and krb5kdc (`/proc/<pid>/task/*/schedstat`, nanoseconds) over the run; cores: average cores used by this process and krb5kdc / idle (`/proc/stat`) / taken by other processes or hypervisor steal, out of {nproc}.",
        plan.per_loop, plan.runs
    ));
    b5_throughput(r, &out.modes, plan, nproc);
    for m in &out.modes {
        if let Err(e) = &m.throughput {
            failed(
                r,
                &format!("throughput, {}", mode_name(m.mutual)),
                &anyhow!("{e}"),
            );
        }
    }

    r.heading(3, "Server alone: accepting captured tokens");
    r.para(&format!(
        "In each run, {} attestations are first carried up to the agent's token answer (each with its own nonce and connection, so each token is fresh and valid once), then the server's `respond()` accepts them all on 1 or {} tokio tasks with nothing else in flight and the KDC idle: acceptor credentials from the keytab, `gss_accept_sec_context`, the replay cache, the checks; with mutual auth also the AP-REP and the confirmation step (the agent's check of the AP-REP left out). CPU: `CLOCK_PROCESS_CPUTIME_ID` over the run, per token. {} run(s) per task count and setting, interleaved (the two settings alternate which goes first).",
        plan.server_tokens,
        plan.loops.max(1),
        plan.server_runs
    ));
    b5_server(r, &out.modes, plan, nproc);
    for m in &out.modes {
        if let Err(e) = &m.server {
            failed(
                r,
                &format!("server alone, {}", mode_name(m.mutual)),
                &anyhow!("{e}"),
            );
        }
    }
    b5_bounds(r, &out.modes, nproc);

    r.heading(3, "Against the anchors");
    b5_anchors(r, &out.modes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_plans_are_smaller() {
        let (q, f) = (KrbPlan::new(true), KrbPlan::new(false));
        assert!(q.attestations < f.attestations && q.per_loop < f.per_loop);
        assert!(q.server_tokens < f.server_tokens && q.runs <= f.runs);
        assert_eq!(f.attestations, 500);
        assert_eq!(f.counts(), vec![1, 2]);
        let one = KrbPlan { loops: 1, ..f };
        assert_eq!(one.counts(), vec![1]);
    }

    #[test]
    fn child_args_survive_the_command_line() {
        let a = ChildArgs {
            dir: "/tmp/carapace-kdc-x".into(),
            realm: REALM.into(),
            kdc_pid: Some(42),
            kdc_log: Some("/tmp/carapace-kdc-x/kdc.log".into()),
            host: "host/node1.lab.test@LAB.TEST".into(),
            host_keytab: "/tmp/carapace-kdc-x/host.keytab".into(),
            service: "carapace/server.lab.test@LAB.TEST".into(),
            service_keytab: "/tmp/carapace-kdc-x/service.keytab".into(),
            plan: KrbPlan::new(true),
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<ChildArgs>(&json).unwrap(), a);
    }

    #[test]
    fn kdc_log_lines_are_counted_by_kind() {
        let log = "\
Nov 23 10:00:00 h krb5kdc[7](info): AS_REQ (2 etypes {aes256-cts-hmac-sha1-96(18), aes128-cts-hmac-sha1-96(17)}) 127.0.0.1: ISSUE: authtime 1, etypes {rep=aes256-cts-hmac-sha1-96(18)}, host/node1.lab.test@LAB.TEST for krbtgt/LAB.TEST@LAB.TEST
Nov 23 10:00:00 h krb5kdc[7](info): TGS_REQ (2 etypes {aes256-cts-hmac-sha1-96(18)}) 127.0.0.1: ISSUE: authtime 1, etypes {rep=aes256-cts-hmac-sha1-96(18)}, host/node1.lab.test@LAB.TEST for carapace/server.lab.test@LAB.TEST
Nov 23 10:00:00 h krb5kdc[7](info): AS_REQ (2 etypes {aes256-cts-hmac-sha1-96(18)}) 127.0.0.1: CLIENT_NOT_FOUND: host/gone.lab.test@LAB.TEST for krbtgt/LAB.TEST@LAB.TEST, Client not found in Kerberos database
Nov 23 10:00:00 h krb5kdc[7](info): closing down fd 12
";
        let c = KdcCounts::parse(log);
        assert_eq!(
            c,
            KdcCounts {
                as_req: 2,
                tgs_req: 1,
                not_issued: 1
            }
        );
        let before = KdcCounts {
            as_req: 1,
            tgs_req: 0,
            not_issued: 1,
        };
        assert_eq!(
            c.since(&before),
            KdcCounts {
                as_req: 1,
                tgs_req: 1,
                not_issued: 0
            }
        );
    }

    #[test]
    fn runs_report_rates_cores_and_requests() {
        let p = Phases {
            token: Duration::from_millis(4),
            token_cpu: Duration::from_millis(1),
            accept: Duration::from_micros(700),
            accept_cpu: Duration::from_micros(500),
            begin_cpu: Duration::from_micros(10),
            total: Duration::from_millis(5),
            ..Phases::default()
        };
        assert_eq!(p.agent(), Duration::from_millis(4));
        assert_eq!(p.server_cpu(), Duration::from_micros(510));
        let run = LoopRun {
            loops: 1,
            samples: vec![p; 100],
            wall: Duration::from_millis(500),
            process_cpu: Duration::from_millis(200),
            kdc_cpu: Some(Duration::from_millis(100)),
            idle: Duration::from_millis(500),
            kdc: Some(KdcCounts {
                as_req: 100,
                tgs_req: 100,
                not_issued: 0,
            }),
        };
        assert_eq!(run.rate(), 200.0);
        assert_eq!(
            run.per_attestation(run.process_cpu),
            Duration::from_millis(2)
        );
        let (ours, idle, others) = run.cores(2);
        assert!((ours - 0.6).abs() < 1e-9 && (idle - 1.0).abs() < 1e-9);
        assert!((others - 0.4).abs() < 1e-9);
        assert_eq!(run.kdc_requests_per_attestation(), Some((1.0, 1.0)));
        let s = ServerRun {
            threads: 2,
            tokens: 200,
            wall: Duration::from_millis(100),
            process_cpu: Duration::from_millis(160),
            idle: Duration::ZERO,
        };
        assert_eq!(s.rate(), 2_000.0);
        assert!((s.cpu_us() - 800.0).abs() < 1e-9);
    }

    #[test]
    fn the_child_refuses_another_krb5_config() {
        let a = ChildArgs {
            dir: "/nonexistent/realm".into(),
            realm: REALM.into(),
            kdc_pid: None,
            kdc_log: None,
            host: "host/node1.lab.test@LAB.TEST".into(),
            host_keytab: "/nonexistent/realm/host.keytab".into(),
            service: "carapace/server.lab.test@LAB.TEST".into(),
            service_keytab: "/nonexistent/realm/service.keytab".into(),
            plan: KrbPlan::new(true),
        };
        let err = child(&a).unwrap_err().to_string();
        assert!(
            err.contains("KRB5_CONFIG=/nonexistent/realm/krb5.conf"),
            "{err}"
        );
    }

    #[test]
    fn b5_child_measures_attestations_against_a_real_kdc() {
        let Some(r) = hsm_sim::kdc::kdc_test(
            "scenario::attest_kerberos::tests::b5_child_measures_attestations_against_a_real_kdc",
            REALM,
        ) else {
            return;
        };
        let p = &r.principals;
        let args = ChildArgs {
            dir: r.admin.dir().to_path_buf(),
            realm: REALM.into(),
            kdc_pid: None,
            kdc_log: Some(r.admin.dir().join("kdc.log")),
            host: p.host.clone(),
            host_keytab: p.host_keytab.clone(),
            service: p.service.clone(),
            service_keytab: p.service_keytab.clone(),
            plan: KrbPlan {
                attestations: 3,
                per_loop: 2,
                loops: 2,
                runs: 1,
                server_tokens: 3,
                server_runs: 1,
            },
        };
        let out = child(&args).unwrap();
        assert_eq!(out.modes.len(), 2);
        for m in &out.modes {
            assert_eq!(m.agent_path.as_deref(), Some("LAB.TEST/node1.lab.test"));
            assert!(m.errors().is_empty(), "{:?}", m.errors());
            let seq = m.sequential.as_ref().unwrap();
            assert_eq!(seq.samples.len(), 3);
            assert!(seq.samples.iter().all(|p| p.total >= p.token + p.accept));
            assert_eq!(
                seq.samples.iter().all(|p| p.reply > Duration::ZERO),
                m.mutual
            );
            // A fresh TGT and service ticket for every attestation.
            assert_eq!(seq.kdc_requests_per_attestation(), Some((1.0, 1.0)));
            let tp = m.throughput.as_ref().unwrap();
            assert_eq!(
                tp.iter()
                    .map(|r| (r.loops, r.samples.len()))
                    .collect::<Vec<_>>(),
                vec![(1, 2), (2, 4)]
            );
            let sv = m.server.as_ref().unwrap();
            assert_eq!(sv.len(), 2);
            assert!(sv.iter().all(|s| s.tokens == 3 && s.rate() > 0.0));
        }
        assert!(out.rcache_bytes.unwrap_or(0) > 0);
        // The JSON line the parent reads back.
        let json = serde_json::to_string(&out).unwrap();
        assert_eq!(serde_json::from_str::<ChildOutput>(&json).unwrap(), out);
    }

    fn krb_phases(mutual: bool) -> Phases {
        Phases {
            token: Duration::from_micros(900),
            token_cpu: Duration::from_micros(600),
            accept: Duration::from_micros(250),
            accept_cpu: Duration::from_micros(240),
            reply: Duration::from_micros(if mutual { 50 } else { 0 }),
            reply_cpu: Duration::from_micros(if mutual { 50 } else { 0 }),
            total: Duration::from_micros(if mutual { 1_700 } else { 1_650 }),
            ..Phases::default()
        }
    }

    fn loop_run(loops: usize, n: usize, rate: f64, mutual: bool) -> LoopRun {
        let wall = Duration::from_secs_f64(n as f64 / rate);
        LoopRun {
            loops,
            samples: vec![krb_phases(mutual); n],
            wall,
            process_cpu: Duration::from_micros(1_100) * u32::try_from(n).unwrap(),
            kdc_cpu: Some(Duration::from_micros(500) * u32::try_from(n).unwrap()),
            idle: wall / 2,
            kdc: Some(KdcCounts {
                as_req: n as u64,
                tgs_req: n as u64,
                not_issued: 0,
            }),
        }
    }

    fn server_run(threads: usize, cpu_us: u64) -> ServerRun {
        ServerRun {
            threads,
            tokens: 300,
            wall: Duration::from_millis(60 / threads as u64),
            process_cpu: Duration::from_micros(cpu_us * 300),
            idle: Duration::ZERO,
        }
    }

    fn mode(mutual: bool) -> ModeResult {
        ModeResult {
            mutual,
            agent_path: Some("LAB.TEST/node1.lab.test".into()),
            selectors: vec!["kerberos:realm:LAB.TEST".into()],
            answer_bytes: Some(1059),
            sequential: Ok(loop_run(1, 500, 600.0, mutual)),
            throughput: Ok(vec![
                loop_run(1, 250, 600.0, mutual),
                loop_run(2, 500, 900.0, mutual),
            ]),
            server: Ok(vec![
                server_run(1, if mutual { 230 } else { 300 }),
                server_run(2, if mutual { 230 } else { 300 }),
            ]),
        }
    }

    #[test]
    fn b5_report_splits_agent_kdc_and_server() {
        let b5 = B5 {
            krb5: "MIT Kerberos 5 release 1.20.1".into(),
            loadavg: "0.10 0.20 0.30".into(),
            run: B5Run {
                setup: Duration::from_millis(50),
                output: ChildOutput {
                    modes: vec![mode(true), mode(false)],
                    rcache_bytes: Some(30 * 1024),
                    workers: 2,
                },
            },
        };
        let plan = KrbPlan::new(false);
        let mut r = Report::new();
        section(&mut r, &b5, &plan, 2);
        let text = r.finish();
        assert!(
            text.contains("**600 attestations/s sequentially** (mutual_auth = true (default))"),
            "{text}"
        );
        assert!(
            text.contains("**1.00 AS-REQ and 1.00 TGS-REQ per attestation**"),
            "{text}"
        );
        assert!(text.contains("| `answer()` to the AP-REP |"), "{text}");
        assert_eq!(text.matches("| `answer()` to the AP-REP |").count(), 1);
        assert!(
            text.contains("| true | 2 | 500 | 900 | 1.70 ms | 1.70 ms | 1.10 ms | 500 µs |"),
            "{text}"
        );
        assert!(
            text.contains("2 loops attest 1.50× as fast as one (ideal 2×)"),
            "{text}"
        );
        assert!(
            text.contains("| true | 1 | 300 | 5,000 | 230 | 4,348 | 1.15 / 0.00 / 0.85 |"),
            "{text}"
        );
        assert!(
            text.contains("per attestation the server spends 230 µs of CPU"),
            "{text}"
        );
        assert!(
            text.contains("without 300 µs (runs 300–300), -70 µs: less with mutual"),
            "{text}"
        );
        assert!(text.contains("The goals set no Kerberos figure"), "{text}");
        assert!(!text.contains("FAILED"), "{text}");
        assert!(b5.into_errors().is_empty());

        let broken = B5 {
            krb5: "MIT krb5 (version unknown)".into(),
            loadavg: "1.00 1.00 1.00".into(),
            run: B5Run {
                setup: Duration::ZERO,
                output: ChildOutput {
                    modes: vec![ModeResult {
                        sequential: Err("the first attestation: KDC unreachable".into()),
                        throughput: Err("the first attestation: KDC unreachable".into()),
                        server: Err("the first attestation: KDC unreachable".into()),
                        ..mode(true)
                    }],
                    rcache_bytes: None,
                    workers: 2,
                },
            },
        };
        let mut r = Report::new();
        section(&mut r, &broken, &plan, 2);
        let text = r.finish();
        assert!(
            text.contains("**sequential attestations FAILED:**"),
            "{text}"
        );
        assert!(text.contains("KDC unreachable"), "{text}");
        assert_eq!(broken.into_errors().len(), 3);
    }

    #[test]
    fn b5_without_a_kdc_fails_with_the_install_line() {
        let e = anyhow!("krb5kdc not found").context(install_hint());
        let mut r = Report::new();
        failed(
            &mut r,
            "B5 (Kerberos node attestation against the MIT KDC)",
            &e,
        );
        let text = r.finish();
        assert!(
            text.contains("apt-get install -y krb5-kdc krb5-admin-server krb5-user"),
            "{text}"
        );
    }
}
