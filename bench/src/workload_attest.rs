//! B6: what workload attestation costs on one agent.
//!
//! 1. **In process, no gRPC** ([`in_process`]): the agent's own workload attestors
//!    (`carapace_agent::workload_attestor`: `unix` with and without `workload_sha256`,
//!    `cgroups`, `systemd`, all three in a row as the agent runs them) and the pidfd
//!    check the Workload API does after attestation on every request
//!    ([`Peer::is_alive`]), called in a loop on real, idle caller processes: a `sleep`
//!    and this executable in a sleeping mode ([`CALLER_FLAG`]), the large executable for
//!    `unix:sha256`. Wall time per call, and this process's CPU time over the loop
//!    (`CLOCK_PROCESS_CPUTIME_ID`: the attestors run on tokio's blocking threads, which a
//!    per-thread clock would miss). For reference, the same `/proc` reads with no
//!    attestor around them, and a bare `spawn_blocking` round trip (each attestor hands
//!    its reads to the blocking pool).
//! 2. **Through the real agent binary** ([`connections`]): Workload API connections per
//!    second, each a new Unix-socket connection, HTTP/2, one `FetchX509SVID` until the
//!    first message, then close, with 1, 2 and 8 concurrent client loops. The clients
//!    run in a child process (`carapace-bench` [`CHILD_FLAG`] `<JSON>`, [`child`]) so
//!    that it can be a workload of its own cgroup. Three agents against one server,
//!    differing only in their `[workload_attestor.*]` sections: `unix` + `cgroups` +
//!    `systemd` (the measured configuration), `unix` alone and `unix` with
//!    `workload_sha256 = true` + `cgroups` + `systemd` (for the marginal costs).
//!    Agent CPU per connection from `/proc/<pid>/stat`.
//!
//! When this process may create cgroups (root, cgroup v2 mounted), every caller and the
//! client child run in a unit-like cgroup `/carapace-bench-<tag>.slice/b6-<tag>.service`
//! with a `trusted.invocation_id` xattr, as systemd makes for a service, so that the
//! `systemd` attestor finds a unit, its slice and its invocation ID (otherwise it only
//! parses `/proc/<pid>/cgroup` and finds nothing). The cgroups are removed at the end.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;

use carapace_agent::workload_api::Peer;
use carapace_agent::workload_attestor::cgroups::{CgroupAttestorConfig, CgroupWorkloadAttestor};
use carapace_agent::workload_attestor::unix::{UnixAttestorConfig, UnixWorkloadAttestor};
use carapace_core::plugin::{Caller, WorkloadAttestor};
use carapace_core::{Selector, SelectorSet};
use carapace_proto::types;
use carapace_proto::workload::X509svidRequest;
use carapace_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

use crate::harness::{self, LogFollower, Proc, Server, ServerOptions};
use crate::kerberos::process_cpu_time;
use crate::procfs;

/// The first argument of the hidden client mode of `carapace-bench` (see [`child`]).
pub const CHILD_FLAG: &str = "--workload-attest-child";

/// The first argument of the hidden caller mode: sleep, as an idle workload whose
/// executable is this (large) binary.
pub const CALLER_FLAG: &str = "--workload-attest-caller";

/// How long a caller process sleeps at most (it is stopped at the end of B6).
pub const CALLER_SLEEP: Duration = Duration::from_secs(600);

/// How long to wait for the agent to hold its SVID.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest one connection may take before it counts as an error.
const CONN_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's default `workload_attestation_timeout`, applied in process as the agent
/// applies it.
const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(5);

/// Sizes of B6.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttestPlan {
    /// Timed calls per in-process row.
    pub iterations: usize,
    /// Timed calls of `unix` with `workload_sha256` on the large executable.
    pub big_iterations: usize,
    /// Untimed calls before each in-process row.
    pub warmup: usize,
    /// Connection runs per setting (agent, loops), interleaved.
    pub runs: usize,
    /// Seconds per connection run.
    pub seconds: f64,
    /// Concurrent client loops against the measured agent.
    pub loops: Vec<usize>,
    /// Untimed connections per agent before the runs.
    pub warmup_connections: usize,
}

impl AttestPlan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> AttestPlan {
        if quick {
            AttestPlan {
                iterations: 500,
                big_iterations: 5,
                warmup: 20,
                runs: 1,
                seconds: 0.5,
                loops: vec![1, 2],
                warmup_connections: 20,
            }
        } else {
            AttestPlan {
                iterations: 5_000,
                big_iterations: 40,
                warmup: 200,
                runs: 3,
                seconds: 2.0,
                loops: vec![1, 2, 8],
                warmup_connections: 200,
            }
        }
    }
}

/// A real caller process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallerInfo {
    /// What it is (`sleep 600`, ...).
    pub label: String,
    /// Its pid.
    pub pid: i32,
    /// `/proc/<pid>/exe`.
    pub exe: PathBuf,
    /// The executable's size in bytes.
    pub exe_bytes: u64,
    /// Its cgroup v2 path (the `0::` line of `/proc/<pid>/cgroup`).
    pub cgroup: String,
}

/// What an in-process row calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// [`Peer::is_alive`] alone.
    Pidfd,
    /// An empty `spawn_blocking` round trip.
    SpawnBlocking,
    /// The `/proc` reads alone, on the calling thread.
    ProcReads,
    /// `unix`, `workload_sha256 = false`.
    Unix,
    /// `cgroups`.
    Cgroups,
    /// `systemd` (caller in the unit cgroup when there is one).
    Systemd,
    /// `systemd` on a caller in no unit.
    SystemdNoUnit,
    /// `unix`, `workload_sha256 = true`, small executable.
    UnixSha256Small,
    /// `unix`, `workload_sha256 = true`, this (large) executable.
    UnixSha256Big,
    /// `unix` + `cgroups` + `systemd` in a row, then the pidfd check.
    All,
}

/// One in-process row.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// What it calls.
    pub kind: OpKind,
    /// What is called, for the report.
    pub label: String,
    /// Which caller ([`CallerInfo::label`]) it is called on, if any.
    pub caller: Option<String>,
    /// Wall time of each timed call.
    pub samples: Vec<Duration>,
    /// This process's CPU time over all timed calls.
    pub cpu: Duration,
    /// The selectors of one call (empty for the rows that are no attestor).
    pub selectors: Vec<String>,
}

impl OpKind {
    /// Whether the row runs workload attestors (and so has selectors).
    pub fn attests(self) -> bool {
        !matches!(
            self,
            OpKind::Pidfd | OpKind::SpawnBlocking | OpKind::ProcReads
        )
    }
}

impl Op {
    /// p50 of the calls in µs.
    pub fn p50_us(&self) -> f64 {
        crate::stats::Summary::of_durations_us(&self.samples).map_or(f64::NAN, |s| s.p50)
    }

    /// Mean CPU time per call in µs.
    pub fn cpu_us(&self) -> f64 {
        self.cpu_per_call().as_secs_f64() * 1e6
    }

    /// Mean CPU time per call.
    pub fn cpu_per_call(&self) -> Duration {
        self.cpu / u32::try_from(self.samples.len().max(1)).unwrap_or(u32::MAX)
    }
}

/// What the in-process part measured.
#[derive(Debug, Clone, PartialEq)]
pub struct InProcess {
    /// The rows, in report order.
    pub ops: Vec<Op>,
    /// The `sleep` caller (the one all rows use unless stated).
    pub small: CallerInfo,
    /// This executable, sleeping (for `unix:sha256` of a large binary).
    pub big: CallerInfo,
    /// A `sleep` left outside the unit cgroup (only when there is one).
    pub outside: Option<CallerInfo>,
    /// Worker threads of this process's tokio runtime.
    pub workers: usize,
}

impl InProcess {
    /// The row of `kind`.
    pub fn op(&self, kind: OpKind) -> Option<&Op> {
        self.ops.iter().find(|o| o.kind == kind)
    }

    /// The caller called `label`.
    pub fn caller(&self, label: &str) -> Option<&CallerInfo> {
        [Some(&self.small), Some(&self.big), self.outside.as_ref()]
            .into_iter()
            .flatten()
            .find(|c| c.label == label)
    }
}

/// The unit-like cgroup the callers and clients run in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitInfo {
    /// Its path below the cgroup v2 root, e.g. `/carapace-bench-1a2b.slice/b6-1a2b.service`.
    pub path: String,
    /// The unit, e.g. `b6-1a2b.service`.
    pub unit: String,
    /// The slice, e.g. `carapace-bench-1a2b.slice`.
    pub slice: String,
    /// The `trusted.invocation_id` set on it.
    pub invocation_id: String,
    /// Its `cgroup.procs` file.
    pub procs: PathBuf,
}

/// A cgroup v2 directory tree made by B6, removed (deepest first) when dropped.
#[derive(Debug)]
struct UnitCgroup {
    created: Vec<PathBuf>,
    info: UnitInfo,
}

/// The cgroup v2 mount point, from the text of `/proc/self/mountinfo`.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mount = pre.split_whitespace().nth(4)?;
        (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// The cgroup v2 path (`0::<path>`) in the text of `/proc/<pid>/cgroup`.
pub fn parse_unified_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl UnitCgroup {
    /// Creates `/carapace-bench-<tag>.slice/b6-<tag>.service` below the cgroup v2 root
    /// with a random `trusted.invocation_id`.
    fn create() -> Result<UnitCgroup> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo")?;
        let root = parse_cgroup2_mount(&info).ok_or_else(|| anyhow!("no cgroup2 mount"))?;
        let tag = random_hex(4);
        let slice = format!("carapace-bench-{tag}.slice");
        let unit = format!("b6-{tag}.service");
        let mut this = UnitCgroup {
            created: Vec::new(),
            info: UnitInfo {
                path: format!("/{slice}/{unit}"),
                unit: unit.clone(),
                slice: slice.clone(),
                invocation_id: random_hex(16),
                procs: PathBuf::new(),
            },
        };
        let mut dir = root;
        for part in [&slice, &unit] {
            dir = dir.join(part);
            std::fs::create_dir(&dir)
                .with_context(|| format!("creating cgroup {} (needs root)", dir.display()))?;
            this.created.push(dir.clone());
        }
        rustix::fs::setxattr(
            &dir,
            "trusted.invocation_id",
            this.info.invocation_id.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .with_context(|| format!("setting trusted.invocation_id on {}", dir.display()))?;
        this.info.procs = dir.join("cgroup.procs");
        Ok(this)
    }
}

impl Drop for UnitCgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // Empty once its processes exited; retried while the kernel tears them down.
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Moves process `pid` into the cgroup whose `cgroup.procs` is `procs`.
fn join_cgroup(procs: &Path, pid: u32) -> Result<()> {
    std::fs::write(procs, pid.to_string())
        .with_context(|| format!("moving pid {pid} into {}", procs.display()))
}

/// A caller process's description, read from `/proc`.
fn caller_info(label: &str, pid: u32) -> Result<CallerInfo> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("reading /proc/{pid}/exe"))?;
    let exe_bytes = std::fs::metadata(format!("/proc/{pid}/exe"))
        .with_context(|| format!("stat /proc/{pid}/exe"))?
        .len();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| parse_unified_path(&t))
        .unwrap_or_else(|| "unknown".into());
    Ok(CallerInfo {
        label: label.to_owned(),
        pid: i32::try_from(pid)?,
        exe,
        exe_bytes,
        cgroup,
    })
}

/// Starts an idle caller (stopped when its guard drops), in `procs`' cgroup if given.
fn spawn_caller(
    dir: &Path,
    name: &str,
    cmd: Command,
    procs: Option<&Path>,
) -> Result<(Proc, CallerInfo)> {
    let proc = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    if let Some(p) = procs {
        join_cgroup(p, proc.pid())?;
    }
    let info = caller_info(name, proc.pid())?;
    Ok((proc, info))
}

/// Times `iterations` calls of `f` after `warmup` untimed ones: each call's wall time
/// and this process's CPU time over the timed calls.
async fn measure<F, Fut>(
    iterations: usize,
    warmup: usize,
    mut f: F,
) -> Result<(Vec<Duration>, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<usize>>,
{
    for _ in 0..warmup {
        f().await?;
    }
    let mut samples = Vec::with_capacity(iterations);
    let cpu0 = process_cpu_time();
    for _ in 0..iterations {
        let t = Instant::now();
        f().await?;
        samples.push(t.elapsed());
    }
    Ok((samples, process_cpu_time().saturating_sub(cpu0)))
}

/// The attestors run one after the other, as the agent runs them, within the agent's
/// default time bound; the number of distinct selectors.
async fn attest_all(attestors: &[Arc<dyn WorkloadAttestor>], caller: &Caller) -> Result<usize> {
    let set = tokio::time::timeout(ATTESTATION_TIMEOUT, async {
        let mut set = SelectorSet::new();
        for a in attestors {
            set.extend(a.attest(caller).await?);
        }
        Ok::<_, carapace_core::Error>(set)
    })
    .await
    .map_err(|_| anyhow!("attestation timed out"))??;
    Ok(set.len())
}

/// The selectors of one run of `attestors`, as text.
async fn selectors_of(
    attestors: &[Arc<dyn WorkloadAttestor>],
    caller: &Caller,
) -> Result<Vec<String>> {
    let mut set = SelectorSet::new();
    for a in attestors {
        set.extend(a.attest(caller).await?);
    }
    Ok(set.iter().map(Selector::to_string).collect())
}

/// What every attestor reads, with no attestor around it and on this thread:
/// `readlink /proc/<pid>/exe`, `/proc/<pid>/status` and `/proc/<pid>/cgroup`.
fn proc_reads(pid: i32) -> Result<usize> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let exe = std::fs::read_link(dir.join("exe"))?;
    let status = std::fs::read_to_string(dir.join("status"))?;
    let cgroup = std::fs::read_to_string(dir.join("cgroup"))?;
    Ok(exe.as_os_str().len() + status.len() + cgroup.len())
}

/// The in-process part: real callers, the agent's attestors, the pidfd check.
/// `procs`: the unit cgroup's `cgroup.procs`, if there is one.
pub async fn in_process(
    dir: PathBuf,
    plan: AttestPlan,
    procs: Option<PathBuf>,
) -> Result<InProcess> {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let mut sleep = Command::new("sleep");
    sleep.arg(CALLER_SLEEP.as_secs().to_string());
    let (_small_proc, small) = spawn_caller(&dir, "sleep", sleep, procs.as_deref())?;
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut me = Command::new(&exe);
    me.arg(CALLER_FLAG);
    let (_big_proc, big) = spawn_caller(&dir, "carapace-bench-caller", me, procs.as_deref())?;
    let (_outside_proc, outside) = match &procs {
        Some(_) => {
            let mut sleep = Command::new("sleep");
            sleep.arg(CALLER_SLEEP.as_secs().to_string());
            let (p, i) = spawn_caller(&dir, "sleep-outside", sleep, None)?;
            (Some(p), Some(i))
        }
        None => (None, None),
    };

    let caller = |c: &CallerInfo| Caller {
        pid: c.pid,
        uid,
        gid,
    };
    let (cs, cb) = (caller(&small), caller(&big));
    let peer = Peer::from_pid(small.pid, uid, gid).context("pidfd_open of the caller")?;
    let cfg = CgroupAttestorConfig::default();
    let unix: Arc<dyn WorkloadAttestor> = Arc::new(UnixWorkloadAttestor::new(UnixAttestorConfig {
        workload_sha256: false,
    }));
    let unix_sha: Arc<dyn WorkloadAttestor> =
        Arc::new(UnixWorkloadAttestor::new(UnixAttestorConfig {
            workload_sha256: true,
        }));
    let cgroups: Arc<dyn WorkloadAttestor> = Arc::new(CgroupWorkloadAttestor::cgroups(&cfg));
    let systemd: Arc<dyn WorkloadAttestor> = Arc::new(CgroupWorkloadAttestor::systemd(&cfg));
    let all = [unix.clone(), cgroups.clone(), systemd.clone()];

    let (n, w) = (plan.iterations, plan.warmup);
    let mut ops = Vec::new();
    let mut push = |kind: OpKind,
                    label: &str,
                    caller: Option<&CallerInfo>,
                    m: (Vec<Duration>, Duration),
                    selectors: Vec<String>| {
        ops.push(Op {
            kind,
            label: label.to_owned(),
            caller: caller.map(|c| c.label.clone()),
            samples: m.0,
            cpu: m.1,
            selectors,
        });
    };

    eprintln!("==> B6: in process ({n} calls per row)");
    let peer_ref = &peer;
    let m = measure(n, w, || async move {
        if peer_ref.is_alive() {
            Ok(0)
        } else {
            Err(anyhow!("the caller's pidfd check failed"))
        }
    })
    .await?;
    push(
        OpKind::Pidfd,
        "pidfd check alone (`Peer::is_alive`: poll + /proc/self/fdinfo)",
        Some(&small),
        m,
        Vec::new(),
    );
    let m = measure(n, w, || async {
        tokio::task::spawn_blocking(|| ()).await?;
        Ok(0)
    })
    .await?;
    push(
        OpKind::SpawnBlocking,
        "reference: empty `spawn_blocking` round trip",
        None,
        m,
        Vec::new(),
    );
    let pid = small.pid;
    let m = measure(n, w, || async move { proc_reads(pid) }).await?;
    push(
        OpKind::ProcReads,
        "reference: the /proc reads alone, this thread (readlink exe, status, cgroup)",
        Some(&small),
        m,
        Vec::new(),
    );

    let rows: [(OpKind, &str, &Arc<dyn WorkloadAttestor>); 3] = [
        (OpKind::Unix, "`unix` (workload_sha256 = false)", &unix),
        (OpKind::Cgroups, "`cgroups`", &cgroups),
        (OpKind::Systemd, "`systemd`", &systemd),
    ];
    for (kind, label, a) in rows {
        let one = std::slice::from_ref(a);
        let c = &cs;
        let m = measure(n, w, || async move { attest_all(one, c).await }).await?;
        push(kind, label, Some(&small), m, selectors_of(one, &cs).await?);
    }
    if let Some(out) = &outside {
        let co = caller(out);
        let c = &co;
        let one = std::slice::from_ref(&systemd);
        let m = measure(n, w, || async move { attest_all(one, c).await }).await?;
        push(
            OpKind::SystemdNoUnit,
            "`systemd`, caller in no unit",
            Some(out),
            m,
            selectors_of(one, &co).await?,
        );
    }
    let one = std::slice::from_ref(&unix_sha);
    let c = &cs;
    let m = measure(n, w, || async move { attest_all(one, c).await }).await?;
    push(
        OpKind::UnixSha256Small,
        "`unix` (workload_sha256 = true)",
        Some(&small),
        m,
        selectors_of(one, &cs).await?,
    );
    eprintln!(
        "==> B6: in process, unix:sha256 of a {} MiB executable ({} calls)",
        big.exe_bytes >> 20,
        plan.big_iterations
    );
    let c = &cb;
    let m = measure(plan.big_iterations, 2, || async move {
        attest_all(one, c).await
    })
    .await?;
    push(
        OpKind::UnixSha256Big,
        "`unix` (workload_sha256 = true)",
        Some(&big),
        m,
        selectors_of(one, &cb).await?,
    );
    let all_ref = &all[..];
    let c = &cs;
    let m = measure(n, w, || async move {
        let k = attest_all(all_ref, c).await?;
        if !peer_ref.is_alive() {
            bail!("the caller's pidfd check failed");
        }
        Ok(k)
    })
    .await?;
    push(
        OpKind::All,
        "**`unix` + `cgroups` + `systemd` + pidfd check** (what the agent does per request)",
        Some(&small),
        m,
        selectors_of(all_ref, &cs).await?,
    );
    Ok(InProcess {
        ops,
        small,
        big,
        outside,
        workers,
    })
}

/// One agent configuration of the connection part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSetup {
    /// Its workload attestors, for the report.
    pub label: String,
    /// Its `[workload_attestor.*]` sections.
    pub config: String,
    /// The client loop counts measured against it.
    pub loops: Vec<usize>,
    /// The selectors of its entry for the client.
    pub entry_selectors: Vec<String>,
}

/// The three agent configurations: the measured one first.
pub fn agent_setups(plan: &AttestPlan, uid: u32, unit: Option<&str>) -> Vec<AgentSetup> {
    // `unix` alone also at the most loops, for the marginal cost under saturation.
    let most = plan.loops.iter().copied().max().unwrap_or(1);
    let unix_loops = if most > 1 { vec![1, most] } else { vec![1] };
    let full_selectors: Vec<String> = std::iter::once(format!("unix:uid:{uid}"))
        .chain(unit.map(|u| format!("systemd:unit:{u}")))
        .collect();
    vec![
        AgentSetup {
            label: "`unix` + `cgroups` + `systemd`".into(),
            config: "[workload_attestor.unix]\nworkload_sha256 = false\n[workload_attestor.cgroups]\n[workload_attestor.systemd]\n".into(),
            loops: plan.loops.clone(),
            entry_selectors: full_selectors.clone(),
        },
        AgentSetup {
            label: "`unix` alone".into(),
            config: "[workload_attestor.unix]\nworkload_sha256 = false\n".into(),
            loops: unix_loops,
            entry_selectors: vec![format!("unix:uid:{uid}")],
        },
        AgentSetup {
            label: "`unix` (workload_sha256 = true) + `cgroups` + `systemd`".into(),
            config: "[workload_attestor.unix]\nworkload_sha256 = true\n[workload_attestor.cgroups]\n[workload_attestor.systemd]\n".into(),
            loops: vec![1],
            entry_selectors: full_selectors,
        },
    ]
}

/// One agent the client child connects to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Its Workload API socket.
    pub socket: PathBuf,
    /// Its pid, for its CPU time.
    pub agent_pid: u32,
}

/// The child's command line argument (after [`CHILD_FLAG`]), as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildArgs {
    /// The cgroup to join first (`cgroup.procs`), if any.
    pub procs: Option<PathBuf>,
    /// The agents, in [`agent_setups`] order.
    pub targets: Vec<Target>,
    /// (target, loops) settings; each run measures all of them.
    pub settings: Vec<(usize, usize)>,
    /// The sizes.
    pub plan: AttestPlan,
}

/// One run of one setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnRun {
    /// Index into [`ChildArgs::targets`].
    pub target: usize,
    /// Concurrent client loops.
    pub loops: usize,
    /// Connect start → first message, each successful connection.
    pub samples: Vec<Duration>,
    /// Connect start → channel ready (Unix connect + the client's HTTP/2 set-up).
    pub connect: Vec<Duration>,
    /// Connections that failed.
    pub errors: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// From the loops' start until the last one stopped.
    pub wall: Duration,
    /// The agent's CPU time over the run (`/proc/<pid>/stat`, 10 ms ticks).
    pub agent_cpu: Duration,
    /// The client process's CPU time over the run.
    pub client_cpu: Duration,
    /// The machine's idle time over the run (all CPUs, `/proc/stat`).
    pub idle: Duration,
}

impl ConnRun {
    /// Successful connections per second.
    pub fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64().max(f64::EPSILON)
    }

    /// Agent CPU-µs per successful connection.
    pub fn agent_us(&self) -> f64 {
        self.agent_cpu.as_secs_f64() * 1e6 / self.samples.len().max(1) as f64
    }

    /// Client CPU-µs per successful connection.
    pub fn client_us(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / self.samples.len().max(1) as f64
    }

    /// Average cores: agent, client, idle, others (the rest of `nproc`).
    pub fn cores(&self, nproc: usize) -> (f64, f64, f64, f64) {
        let wall = self.wall.as_secs_f64().max(f64::EPSILON);
        let agent = self.agent_cpu.as_secs_f64() / wall;
        let client = self.client_cpu.as_secs_f64() / wall;
        let idle = self.idle.as_secs_f64() / wall;
        (
            agent,
            client,
            idle,
            (nproc as f64 - agent - client - idle).max(0.0),
        )
    }
}

/// What the client child reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildOutput {
    /// The child's cgroup v2 path while it ran.
    pub cgroup: String,
    /// Its tokio worker threads.
    pub workers: usize,
    /// Every run, in the order measured.
    pub runs: Vec<ConnRun>,
}

impl ChildOutput {
    /// The runs of one setting.
    pub fn runs_of(&self, target: usize, loops: usize) -> Vec<&ConnRun> {
        self.runs
            .iter()
            .filter(|r| r.target == target && r.loops == loops)
            .collect()
    }
}

/// What the connection part measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Connections {
    /// The agents, in [`agent_setups`] order.
    pub setups: Vec<AgentSetup>,
    /// The measurements.
    pub output: ChildOutput,
    /// The agents' VmRSS at the end.
    pub agent_rss: Vec<u64>,
}

/// Everything B6 measured; each part may have failed on its own.
#[derive(Debug)]
pub struct B6Result {
    /// The unit cgroup, or why there is none.
    pub unit: std::result::Result<UnitInfo, String>,
    /// The in-process part.
    pub in_process: Result<InProcess>,
    /// The connection part.
    pub connections: Result<Connections>,
}

impl B6Result {
    /// The failures, for the exit status.
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        [self.in_process.err(), self.connections.err()]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// A wire entry with several selectors (`type:value` each).
fn entry_with(spiffe_id: &str, parent: &str, selectors: &[String]) -> Result<types::Entry> {
    let (first, rest) = selectors
        .split_first()
        .ok_or_else(|| anyhow!("an entry needs a selector"))?;
    let mut e = harness::entry(spiffe_id, parent, first)?;
    for s in rest {
        let s: Selector = s.parse().map_err(|e| anyhow!("selector {s:?}: {e}"))?;
        e.selectors.push(types::Selector::from(&s));
    }
    Ok(e)
}

/// The connection part: one server, the agents of [`agent_setups`], each with an entry
/// for the client, and the client child in the unit cgroup (if any).
pub async fn connections(
    bin_dir: &Path,
    dir: &Path,
    plan: &AttestPlan,
    unit: Option<&UnitInfo>,
) -> Result<Connections> {
    let uid = rustix::process::geteuid().as_raw();
    let setups = agent_setups(plan, uid, unit.map(|u| u.unit.as_str()));
    eprintln!("==> B6: starting a server and {} agents", setups.len());
    let server = Server::start(bin_dir, &dir.join("server"), &ServerOptions::default()).await?;
    let admin = server.admin().await?;
    let mut agents = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let mut a = harness::Agent::start_with_config(
            bin_dir,
            &dir.join(format!("agent-{i}")),
            &server,
            Some(&s.config),
        )
        .await
        .with_context(|| format!("starting the agent with {}", s.label))?;
        let mut follower = LogFollower::from_start(a.proc.log());
        let e = entry_with(
            &format!("spiffe://{}/bench/b6-{i}", harness::TRUST_DOMAIN),
            &a.agent_id,
            &s.entry_selectors,
        )?;
        harness::create_entries(&admin, vec![e], 1).await?;
        a.wait_held(&mut follower, 1, SYNC_TIMEOUT).await?;
        agents.push(a);
    }
    let targets: Vec<Target> = agents
        .iter()
        .map(|a| Target {
            socket: a.socket.clone(),
            agent_pid: a.proc.pid(),
        })
        .collect();
    let settings: Vec<(usize, usize)> = setups
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.loops.iter().map(move |&l| (i, l)))
        .collect();
    let args = ChildArgs {
        procs: unit.map(|u| u.procs.clone()),
        targets,
        settings,
        plan: plan.clone(),
    };
    let output: ChildOutput = harness::run_json_child(CHILD_FLAG, &args, &[]).await?;
    let mut agent_rss = Vec::new();
    for a in &mut agents {
        a.proc.check_alive()?;
        agent_rss.push(procfs::rss_bytes(a.proc.pid())?);
    }
    Ok(Connections {
        setups,
        output,
        agent_rss,
    })
}

/// One Workload API connection: connect, FetchX509SVID with the security header, first
/// message, close. Returns (connect start → first message, connect start → channel ready).
async fn one_connection(socket: &Path) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let channel = carapace_common::uds_channel(socket, None)
        .await
        .context("connecting to the Workload API")?;
    let t1 = Instant::now();
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", MetadataValue::from_static("true"));
    let mut stream = client
        .fetch_x509svid(req)
        .await
        .map_err(|s| anyhow!("FetchX509SVID: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let msg = stream
        .message()
        .await
        .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
        .ok_or_else(|| anyhow!("FetchX509SVID: stream closed without a message"))?;
    let t2 = Instant::now();
    if msg.svids.is_empty() {
        bail!("FetchX509SVID: a message without SVIDs");
    }
    drop(stream);
    drop(client);
    Ok((t2 - t0, t1 - t0))
}

/// `one_connection` within [`CONN_TIMEOUT`].
async fn timed_connection(socket: &Path) -> Result<(Duration, Duration)> {
    tokio::time::timeout(CONN_TIMEOUT, one_connection(socket))
        .await
        .map_err(|_| anyhow!("no first message within {CONN_TIMEOUT:?}"))?
}

/// Per loop: (first-message samples, connect samples, errors, first error).
type LoopOut = (Vec<Duration>, Vec<Duration>, usize, Option<String>);

/// `loops` client loops against `target` for `seconds`.
async fn conn_run(target: &Target, index: usize, loops: usize, seconds: f64) -> Result<ConnRun> {
    let agent_cpu0 = procfs::cpu_time(target.agent_pid)?;
    let client_cpu0 = process_cpu_time();
    let idle0 = procfs::machine_idle()?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(seconds);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..loops {
        let socket = target.socket.clone();
        set.spawn(async move {
            let mut out: LoopOut = (Vec::new(), Vec::new(), 0, None);
            while Instant::now() < deadline {
                match timed_connection(&socket).await {
                    Ok((first, connect)) => {
                        out.0.push(first);
                        out.1.push(connect);
                    }
                    Err(e) => {
                        out.2 += 1;
                        out.3.get_or_insert_with(|| format!("{e:#}"));
                        // A broken agent must not turn this into a busy loop.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            out
        });
    }
    let mut run = ConnRun {
        target: index,
        loops,
        samples: Vec::new(),
        connect: Vec::new(),
        errors: 0,
        first_error: None,
        wall: Duration::ZERO,
        agent_cpu: Duration::ZERO,
        client_cpu: Duration::ZERO,
        idle: Duration::ZERO,
    };
    while let Some(r) = set.join_next().await {
        let (s, c, e, first) = r?;
        run.samples.extend(s);
        run.connect.extend(c);
        run.errors += e;
        if run.first_error.is_none() {
            run.first_error = first;
        }
    }
    run.wall = t0.elapsed();
    run.agent_cpu = procfs::cpu_time(target.agent_pid)?.saturating_sub(agent_cpu0);
    run.client_cpu = process_cpu_time().saturating_sub(client_cpu0);
    run.idle = procfs::machine_idle()?.saturating_sub(idle0);
    Ok(run)
}

/// The client child: joins the unit cgroup, checks every agent answers, then measures
/// each setting `plan.runs` times, interleaved (the order rotates from run to run).
pub fn child(args: &ChildArgs) -> Result<ChildOutput> {
    if let Some(p) = &args.procs {
        join_cgroup(p, std::process::id())?;
    }
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| parse_unified_path(&t))
        .unwrap_or_else(|| "unknown".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let workers = rt.metrics().num_workers();
    rt.block_on(async {
        for (i, t) in args.targets.iter().enumerate() {
            // The agent may need a moment after `held=1` before it answers.
            let deadline = Instant::now() + SYNC_TIMEOUT;
            loop {
                match timed_connection(&t.socket).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context(format!("agent {i} never answered")));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            for _ in 0..args.plan.warmup_connections {
                timed_connection(&t.socket)
                    .await
                    .with_context(|| format!("warm-up connection to agent {i}"))?;
            }
        }
        let mut runs = Vec::new();
        let n = args.settings.len().max(1);
        for r in 0..args.plan.runs.max(1) {
            for k in 0..args.settings.len() {
                let (t, loops) = args.settings[(k + r) % n];
                let target = args
                    .targets
                    .get(t)
                    .ok_or_else(|| anyhow!("no target {t}"))?;
                eprintln!(
                    "==> B6: run {}/{}: agent {t}, {loops} client loop(s), {} s",
                    r + 1,
                    args.plan.runs.max(1),
                    args.plan.seconds
                );
                runs.push(conn_run(target, t, loops, args.plan.seconds).await?);
                // Let the agent finish with the closed connections.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(ChildOutput {
            cgroup,
            workers,
            runs,
        })
    })
}

/// B6: the unit cgroup (if this process may make one), the in-process rows, then the
/// connections through the real agents.
pub async fn run(bin_dir: &Path, dir: &Path, plan: &AttestPlan) -> Result<B6Result> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let unit = UnitCgroup::create();
    let unit_info = unit.as_ref().ok().map(|u| u.info.clone());
    let procs = unit_info.as_ref().map(|u| u.procs.clone());
    // On a runtime worker, as the agent's request handlers run.
    let in_process = tokio::spawn(in_process(dir.join("callers"), plan.clone(), procs))
        .await
        .map_err(|e| anyhow!("the in-process task failed: {e}"))
        .and_then(|r| r);
    let connections = connections(bin_dir, &dir.join("agents"), plan, unit_info.as_ref()).await;
    let unit = match unit {
        Ok(u) => Ok(u.info.clone()),
        Err(e) => Err(format!("{e:#}")),
    };
    Ok(B6Result {
        unit,
        in_process,
        connections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mount_and_unified_path() {
        let info = "24 30 0:22 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw\n\
                    35 24 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
        let cg = "9:name=systemd:/\n0::/carapace-bench-1a2b.slice/b6-1a2b.service\n";
        assert_eq!(
            parse_unified_path(cg).as_deref(),
            Some("/carapace-bench-1a2b.slice/b6-1a2b.service")
        );
        assert_eq!(parse_unified_path("4:memory:/x\n"), None);
    }

    #[test]
    fn connection_runs_give_rates_and_cores() {
        let run = ConnRun {
            target: 0,
            loops: 2,
            samples: vec![Duration::from_micros(500); 4_000],
            connect: vec![Duration::from_micros(50); 4_000],
            errors: 0,
            first_error: None,
            wall: Duration::from_secs(2),
            agent_cpu: Duration::from_millis(1_200),
            client_cpu: Duration::from_millis(600),
            idle: Duration::from_millis(100),
        };
        assert!((run.rate() - 2_000.0).abs() < 1e-9);
        assert!((run.agent_us() - 300.0).abs() < 1e-9);
        assert!((run.client_us() - 150.0).abs() < 1e-9);
        let (a, c, i, o) = run.cores(2);
        assert!((a - 0.6).abs() < 1e-9 && (c - 0.3).abs() < 1e-9);
        assert!((i - 0.05).abs() < 1e-9 && (o - 1.05).abs() < 1e-9);
    }

    #[test]
    fn setups_put_the_measured_agent_first_and_match_the_unit() {
        let plan = AttestPlan::new(false);
        let s = agent_setups(&plan, 1000, Some("b6-x.service"));
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].loops, vec![1, 2, 8]);
        assert_eq!(
            s[0].entry_selectors,
            vec!["unix:uid:1000", "systemd:unit:b6-x.service"]
        );
        assert_eq!(s[1].entry_selectors, vec!["unix:uid:1000"]);
        assert_eq!(s[1].loops, vec![1, 8]);
        assert_eq!(s[2].loops, vec![1]);
        assert!(s[2].config.contains("workload_sha256 = true"));
        for setup in &s {
            let t: toml::Table = setup.config.parse().unwrap();
            assert!(t.contains_key("workload_attestor"));
        }
        let e = entry_with(
            "spiffe://example.org/w",
            "spiffe://example.org/a",
            &s[0].entry_selectors,
        )
        .unwrap();
        assert_eq!(e.selectors.len(), 2);
        assert_eq!(e.selectors[1].r#type, "systemd");
        let quick = AttestPlan::new(true);
        assert!(quick.iterations < plan.iterations && quick.seconds < plan.seconds);
        let args = ChildArgs {
            procs: None,
            targets: vec![Target {
                socket: "/tmp/x.sock".into(),
                agent_pid: 1,
            }],
            settings: vec![(0, 1)],
            plan: quick,
        };
        let back: ChildArgs = serde_json::from_str(&serde_json::to_string(&args).unwrap()).unwrap();
        assert_eq!(back, args);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attestors_see_a_real_caller() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let (_p, info) = spawn_caller(dir.path(), "sleep", cmd, None).unwrap();
        assert!(info.exe_bytes > 0);
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        let caller = Caller {
            pid: info.pid,
            uid,
            gid,
        };
        let unix: Arc<dyn WorkloadAttestor> =
            Arc::new(UnixWorkloadAttestor::new(UnixAttestorConfig::default()));
        let sel = selectors_of(std::slice::from_ref(&unix), &caller)
            .await
            .unwrap();
        assert!(sel.contains(&format!("unix:uid:{uid}")), "{sel:?}");
        let (samples, _cpu) = measure(3, 1, || attest_all(std::slice::from_ref(&unix), &caller))
            .await
            .unwrap();
        assert_eq!(samples.len(), 3);
        assert!(proc_reads(info.pid).unwrap() > 0);
    }
}
