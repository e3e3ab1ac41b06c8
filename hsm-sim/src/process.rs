//! The lab's processes: a guard that stops a daemon by its own pid, the identity check
//! that keeps `carapace-lab down` from ever signalling a recycled pid, free loopback
//! ports, and the "is this program installed" check.
//!
//! Nothing here signals a process group or a process found by name: a daemon is stopped
//! through the [`std::process::Child`] that spawned it (its pid cannot be reused before
//! we reap it), and a recorded daemon of an earlier command through a pidfd opened
//! *before* its start time is checked (so the signal reaches that process or none).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal};

use crate::{Error, Result};

/// How long a daemon gets to exit after SIGTERM before it is sent SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// How many lines of a daemon's log are shown when a test fails.
pub const LOG_TAIL_LINES: usize = 100;

/// Where a daemon runs relative to the caller's process group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProcessGroup {
    /// The caller's group: a Ctrl-C that interrupts a test run reaches the daemon too.
    /// Right for tests, where the daemon lives no longer than its guard.
    #[default]
    Inherit,
    /// A group of its own (`setpgid(0, 0)`), so that it outlives the command that started
    /// it and no terminal signal aimed at that command reaches it (`carapace-lab up`).
    Own,
}

/// A daemon the lab spawned. Dropping the guard stops the daemon by its own pid
/// (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and reaps it; when the drop happens while
/// a thread panics (a failing test), the last [`LOG_TAIL_LINES`] lines of its log are
/// printed to stderr first, where the test harness shows them with the failure.
#[derive(Debug)]
pub struct Child {
    name: String,
    pid: u32,
    log: PathBuf,
    /// `None` once the daemon was stopped or detached.
    child: Option<std::process::Child>,
}

/// A daemon whose guard was given up with [`Child::detach`]: it keeps running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detached {
    /// What it is (`swtpm`, `krb5kdc`).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

impl Child {
    /// Spawns `cmd` as the daemon `name`, with stdin from /dev/null and stdout and stderr
    /// appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path, group: ProcessGroup) -> Result<Child> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(log, e))?;
        let err = out.try_clone().map_err(|e| Error::io(log, e))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if group == ProcessGroup::Own {
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::Other(format!("cannot start {}: {e}", command_line(cmd))))?;
        Ok(Child {
            name: name.to_owned(),
            pid: child.id(),
            log: log.to_owned(),
            child: Some(child),
        })
    }

    /// The daemon's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The daemon's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status if the daemon has exited (it is reaped then), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            None => Ok(None),
            Some(c) => c
                .try_wait()
                .map_err(|e| Error::Other(format!("{} (pid {}): wait: {e}", self.name, self.pid))),
        }
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// An [`Error::NotReady`] for this daemon, carrying its log.
    pub fn not_ready(&self, reason: impl Into<String>) -> Error {
        Error::NotReady {
            component: format!("{} (pid {})", self.name, self.pid),
            reason: reason.into(),
            log: self.log_tail(LOG_TAIL_LINES),
        }
    }

    /// Stops the daemon now (SIGTERM, SIGKILL after [`STOP_GRACE`]) and returns how it
    /// ended.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let name = self.name.clone();
        let pid = self.pid;
        match self.child.take() {
            Some(mut c) => terminate(&mut c, STOP_GRACE)
                .map_err(|e| Error::Other(format!("stopping {name} (pid {pid}): {e}"))),
            None => Err(Error::Other(format!(
                "{name} (pid {pid}) was already stopped"
            ))),
        }
    }

    /// Gives up the guard: the daemon keeps running after this process exits and nothing
    /// here stops it any more.
    pub fn detach(mut self) -> Detached {
        // Dropping a std Child neither signals nor waits for the process.
        self.child = None;
        Detached {
            name: self.name.clone(),
            pid: self.pid,
            log: self.log.clone(),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if std::thread::panicking() {
            // `eprint!`, not a raw stderr write: the test harness captures it and shows it
            // with the failing test's output. One call, so dumps never interleave.
            let mut tail = self.log_tail(LOG_TAIL_LINES);
            if tail.is_empty() {
                tail.push_str("(empty)\n");
            }
            eprint!(
                "===== {} (pid {}) log {} (last {LOG_TAIL_LINES} lines) =====\n{tail}\
                 ===== end of {} log =====\n",
                self.name,
                self.pid,
                self.log.display(),
                self.name
            );
        }
        if let Err(e) = terminate(&mut c, STOP_GRACE) {
            eprintln!("stopping {} (pid {}): {e}", self.name, self.pid);
        }
    }
}

/// Stops our own, not yet reaped child: its pid cannot belong to anyone else.
fn terminate(child: &mut std::process::Child, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // Not reaped yet, so the pid is still this child's (possibly a zombie's).
    rustix::process::kill_process(Pid::from_child(child), Signal::TERM)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        sleep(Duration::from_millis(10));
    }
    child.kill()?;
    child.wait()
}

/// The last `lines` lines of a log file (a note instead if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(cannot read {}: {e})\n", path.display()),
    };
    let mut tail = std::collections::VecDeque::with_capacity(lines);
    for line in BufReader::new(file).split(b'\n') {
        let Ok(line) = line else { break };
        if tail.len() == lines {
            tail.pop_front();
        }
        tail.push_back(String::from_utf8_lossy(&line).into_owned());
    }
    let mut out = String::new();
    for line in tail {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------
// Recorded processes (carapace-lab down/status)
// ---------------------------------------------------------------------------------------

/// What `/proc/<pid>` says about a process: enough to recognise it again later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Start time in clock ticks after boot (`/proc/<pid>/stat` field 22): with the pid
    /// and the boot id it names one process for good.
    pub starttime: u64,
    /// Its state letter (`R`, `S`, `Z` for an exited process not yet reaped, ...).
    pub state: char,
    /// The executable (`/proc/<pid>/exe`); `None` for a zombie or when not readable.
    pub exe: Option<PathBuf>,
}

impl ProcInfo {
    /// Reads `/proc/<pid>`; `Ok(None)` when there is no such process.
    pub fn of(pid: u32) -> Result<Option<ProcInfo>> {
        let path = PathBuf::from(format!("/proc/{pid}/stat"));
        let stat = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let (state, starttime) = parse_stat(&stat)
            .ok_or_else(|| Error::Other(format!("{}: unexpected format", path.display())))?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        Ok(Some(ProcInfo {
            starttime,
            state,
            exe,
        }))
    }

    /// Whether the process has exited (a zombie waiting for its parent counts as exited).
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// State and start time from the text of `/proc/<pid>/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` was field 3; starttime is field 22, 19 further on.
    let starttime = fields.nth(18)?.parse().ok()?;
    Some((state, starttime))
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): a recorded pid and start time mean
/// nothing after a reboot.
pub fn boot_id() -> Result<String> {
    let path = "/proc/sys/kernel/random/boot_id";
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| Error::io(path, e))
}

/// A process recorded by an earlier command, recognised by pid, start time and executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded<'a> {
    /// The pid.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22) when it was recorded.
    pub starttime: u64,
    /// Its executable when it was recorded.
    pub exe: &'a Path,
}

/// What became of a recorded process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The recorded process is running.
    Running,
    /// It has exited.
    Gone,
    /// The pid no longer names the recorded process: its start time or executable differ
    /// (or the executable cannot be read, which is not proof enough to signal it).
    Reused,
}

/// How [`stop_recorded`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// It exited after SIGTERM.
    Terminated,
    /// It ignored SIGTERM for [`STOP_GRACE`] and was sent SIGKILL.
    Killed,
    /// It had already exited: nothing was signalled.
    AlreadyGone,
    /// The pid belongs to another process now: nothing was signalled.
    Reused,
}

impl Recorded<'_> {
    /// Whether the recorded process still runs.
    pub fn liveness(&self) -> Result<Liveness> {
        Ok(match ProcInfo::of(self.pid)? {
            None => Liveness::Gone,
            Some(info) => self.judge(&info),
        })
    }

    fn judge(&self, info: &ProcInfo) -> Liveness {
        if info.starttime != self.starttime {
            Liveness::Reused
        } else if info.exited() {
            Liveness::Gone
        } else if info.exe.as_deref() != Some(self.exe) {
            // Same start time but another program: an exec after we recorded it, or an
            // executable we may not read. Either way, not ours to signal.
            Liveness::Reused
        } else {
            Liveness::Running
        }
    }
}

/// Stops a process recorded by an earlier command, and only that process.
///
/// A pidfd is opened first and the start time and executable are checked after: if they
/// match, the pidfd refers to the recorded process (a pid recycled before `pidfd_open`
/// would show another start time), and every signal goes through that pidfd, so none can
/// reach a process that took the pid over in between.
pub fn stop_recorded(rec: &Recorded<'_>) -> Result<StopOutcome> {
    let Some(pid) = i32::try_from(rec.pid).ok().and_then(Pid::from_raw) else {
        return Err(Error::Other(format!("{} is not a valid pid", rec.pid)));
    };
    let pidfd = match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(StopOutcome::AlreadyGone),
        Err(e) => return Err(Error::Other(format!("pidfd_open({}): {e}", rec.pid))),
    };
    match rec.liveness()? {
        Liveness::Gone => return Ok(StopOutcome::AlreadyGone),
        Liveness::Reused => return Ok(StopOutcome::Reused),
        Liveness::Running => {}
    }
    if !signal(&pidfd, Signal::TERM, rec.pid)? {
        return Ok(StopOutcome::AlreadyGone);
    }
    if wait_exit(&pidfd, STOP_GRACE, rec.pid)? {
        return Ok(StopOutcome::Terminated);
    }
    if !signal(&pidfd, Signal::KILL, rec.pid)? {
        return Ok(StopOutcome::Terminated);
    }
    if wait_exit(&pidfd, STOP_GRACE, rec.pid)? {
        return Ok(StopOutcome::Killed);
    }
    Err(Error::Other(format!(
        "pid {} did not exit after SIGKILL",
        rec.pid
    )))
}

/// Sends `sig` through the pidfd; `false` if the process has exited already.
fn signal(pidfd: &OwnedFd, sig: Signal, pid: u32) -> Result<bool> {
    match rustix::process::pidfd_send_signal(pidfd, sig) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::SRCH) => Ok(false),
        Err(e) => Err(Error::Other(format!("signalling pid {pid}: {e}"))),
    }
}

/// Waits up to `timeout` for the pidfd's process to exit (the pidfd becomes readable).
fn wait_exit(pidfd: &OwnedFd, timeout: Duration, pid: u32) -> Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::Other(format!("waiting for pid {pid}: {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------

/// Ports this process has handed out, never handed out twice (parallel tests).
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A TCP port on 127.0.0.1 that nothing listens on, picked by the kernel and never
/// returned twice by this process. Another process may still take it before the daemon
/// binds it: the fixtures retry with new ports when a daemon exits at start.
pub fn free_tcp_port() -> Result<u16> {
    free_port(false)
}

/// A port on 127.0.0.1 that is free for both TCP and UDP (a KDC listens on both).
pub fn free_tcp_udp_port() -> Result<u16> {
    free_port(true)
}

/// Two consecutive free TCP ports on 127.0.0.1, `(p, p + 1)`: the swtpm TCTI always
/// finds the control channel at the TPM port plus one.
pub fn free_tcp_port_pair() -> Result<(u16, u16)> {
    for _ in 0..100 {
        let (first, _held) = pick(false)?;
        let Some(second) = first.checked_add(1) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, second)).is_err() {
            continue;
        }
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
        if !handed_out.contains(&first) && !handed_out.contains(&second) {
            handed_out.insert(first);
            handed_out.insert(second);
            return Ok((first, second));
        }
    }
    Err(Error::Other(
        "no two consecutive free loopback ports found".into(),
    ))
}

fn free_port(udp_too: bool) -> Result<u16> {
    for _ in 0..100 {
        let (port, _held) = pick(udp_too)?;
        if HANDED_OUT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(port)
        {
            return Ok(port);
        }
    }
    Err(Error::Other("no free loopback port found".into()))
}

/// A port the kernel picked, held by a listener until the caller drops it (so that it
/// stays free while the caller checks its neighbour), and free for UDP too if asked.
fn pick(udp_too: bool) -> Result<(u16, TcpListener)> {
    let fail = |e: io::Error| Error::Other(format!("binding a loopback port: {e}"));
    for _ in 0..100 {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(fail)?;
        let port = tcp.local_addr().map_err(fail)?.port();
        if !udp_too || UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok((port, tcp));
        }
    }
    Err(Error::Other(
        "no loopback port free for both TCP and UDP found".into(),
    ))
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` (the error says why not).
pub fn tcp_answers(port: u16) -> std::result::Result<(), String> {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(200),
    )
    .map(drop)
    .map_err(|e| format!("connecting to 127.0.0.1:{port}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Programs
// ---------------------------------------------------------------------------------------

/// Directories searched after `PATH`: Debian installs `krb5kdc`, `kdb5_util` and
/// `kadmin.local` in /usr/sbin, which is not on an ordinary user's `PATH`.
const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The absolute path of `program` (searched on `PATH`, then in the sbin directories; a
/// path with a `/` is checked as is), or [`Error::MissingPackage`] naming the Debian
/// `package` list to install.
pub fn require(program: &str, package: &'static str) -> Result<PathBuf> {
    let missing = || Error::MissingPackage {
        what: program.to_owned(),
        package,
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .ok_or_else(missing)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The command line of `cmd`, for messages (the lab never puts secrets in argv).
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion with `stdin` as its input, and fails with [`Error::Command`]
/// (its output included) unless it exits 0.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output> {
    let shown = command_line(cmd);
    let fail = |e: io::Error| Error::Other(format!("cannot run {shown}: {e}"));
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(fail)?;
    // The inputs are a few bytes and the outputs small, so writing all of stdin before
    // reading any output cannot fill a pipe. A command that exits without reading its
    // input is judged by its exit status, not by the broken pipe.
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        match pipe.write_all(input) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(fail(e)),
            _ => {}
        }
    }
    let output = child.wait_with_output().map_err(fail)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::Command {
            command: shown,
            status: output.status.to_string(),
            output: combined(&output),
        })
    }
}

/// Runs `cmd` with its output captured and kills it if it has not exited within
/// `limit`: a test of something that must not hang (a read of `/dev/zero`) fails instead
/// of hanging. The output is returned whatever the exit status; [`Error::Other`] if the
/// command could not run or did not finish in time.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let shown = command_line(cmd);
    let fail = |e: io::Error| Error::Other(format!("cannot run {shown}: {e}"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(fail)?;
    // Both pipes are drained while the command runs, so a chatty one cannot block.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(fail)? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Other(format!(
                "{shown} did not finish within {limit:?}"
            )));
        }
        sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// stdout then stderr of a finished command, as text.
pub fn combined(output: &Output) -> String {
    let mut s = String::from_utf8_lossy(&output.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&output.stderr));
    s
}

/// `n` random bytes from the kernel, as lowercase hex.
pub fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::io("/dev/urandom", e))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Waits until `probe` succeeds, polling every 20 ms, giving up at `timeout` with the
/// probe's last complaint and the daemon's log. The daemon's exit ends the wait early.
pub fn wait_ready(
    child: &mut Child,
    timeout: Duration,
    mut probe: impl FnMut() -> std::result::Result<(), String>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(child.not_ready(format!("it exited at start ({status})")));
        }
        let why = match probe() {
            Ok(()) => return Ok(()),
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            return Err(child.not_ready(format!("not ready after {timeout:?}: {why}")));
        }
        sleep(Duration::from_millis(20));
    }
}

/// Environment variable naming the test a child process runs (see [`run_test_in_child`]).
pub const ENV_CHILD: &str = "HSM_SIM_CHILD";

/// Whether this process is the child [`run_test_in_child`] started for `test_name`.
pub fn is_test_child(test_name: &str) -> bool {
    std::env::var(ENV_CHILD).ok().as_deref() == Some(test_name)
}

/// Runs test `test_name` of the current test executable again in a child process with
/// `envs` (plus `HSM_SIM_CHILD=<test_name>`) in its environment from the start, for
/// libraries that read their configuration from the environment (SoftHSM2's
/// `SOFTHSM2_CONF`, krb5's `KRB5_CONFIG`): changing the environment of a running test
/// process is unsound. Prints the child's output and panics unless the child ran exactly
/// that test and it passed. `helper` names the caller in messages.
#[allow(
    clippy::panic,
    reason = "a test helper: a failed child must fail the calling test"
)]
pub fn run_test_in_child(helper: &str, test_name: &str, envs: &[(String, String)]) {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("{helper}: cannot find the test executable: {e}"));
    let out = Command::new(&exe)
        .args([
            "--exact",
            test_name,
            "--nocapture",
            "--test-threads=1",
            "--include-ignored",
        ])
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .env(ENV_CHILD, test_name)
        .output()
        .unwrap_or_else(|e| panic!("{helper}: cannot run {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- child {test_name} stdout ---\n{stdout}");
    eprintln!("--- child {test_name} stderr ---\n{stderr}");
    if !out.status.success() {
        panic!(
            "{helper}: child running {test_name} failed ({})",
            out.status
        );
    }
    // libtest prints "test <name> ... " when it starts the test (with --nocapture the
    // test's own output follows on the same line) and "1 passed" at the end: a wrong
    // name runs no test and exits successfully, which must not pass silently.
    let started = format!("test {test_name} ... ");
    if !stdout.contains(&started) || !stdout.contains("test result: ok. 1 passed;") {
        panic!(
            "{helper}: the child did not run test {test_name:?} (is the name the one \
             libtest prints, e.g. `tests::{test_name}` inside a `mod tests`?)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(parse_stat(stat), Some(('S', 987_654)));
        assert_eq!(parse_stat("12 (x) R 1"), None);
    }

    #[test]
    fn our_own_process_is_recognised_and_a_changed_start_time_is_not() {
        let me = std::process::id();
        let info = ProcInfo::of(me).unwrap().unwrap();
        let exe = info.exe.clone().unwrap();
        let rec = Recorded {
            pid: me,
            starttime: info.starttime,
            exe: &exe,
        };
        assert_eq!(rec.liveness().unwrap(), Liveness::Running);
        let recycled = Recorded {
            starttime: info.starttime + 1,
            ..rec.clone()
        };
        assert_eq!(recycled.liveness().unwrap(), Liveness::Reused);
        let other_exe = Recorded {
            exe: Path::new("/usr/bin/true"),
            ..rec
        };
        assert_eq!(other_exe.liveness().unwrap(), Liveness::Reused);
    }

    #[test]
    fn a_recycled_pid_is_never_signalled() {
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let info = ProcInfo::of(sleeper.id()).unwrap().unwrap();
        let exe = info.exe.clone().unwrap();
        let wrong = Recorded {
            pid: sleeper.id(),
            starttime: info.starttime.wrapping_sub(1),
            exe: &exe,
        };
        assert_eq!(stop_recorded(&wrong).unwrap(), StopOutcome::Reused);
        assert_eq!(sleeper.try_wait().unwrap(), None, "sleep must still run");
        let right = Recorded {
            starttime: info.starttime,
            ..wrong
        };
        assert_eq!(stop_recorded(&right).unwrap(), StopOutcome::Terminated);
        assert!(!sleeper.wait().unwrap().success());
        assert_eq!(stop_recorded(&right).unwrap(), StopOutcome::AlreadyGone);
    }

    #[test]
    fn the_guard_stops_its_child_and_a_stubborn_one_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; echo started; sleep 30 & wait"]);
        let child = Child::spawn("stubborn", &mut cmd, &log, ProcessGroup::Inherit).unwrap();
        let pid = child.pid();
        // SIGTERM before the trap is set would simply end the shell.
        while !log_tail(&log, 1).contains("started") {
            sleep(Duration::from_millis(5));
        }
        let t = Instant::now();
        let status = child.stop().unwrap();
        assert!(t.elapsed() >= STOP_GRACE);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(ProcInfo::of(pid).unwrap().is_none(), "reaped");

        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let child = Child::spawn("sleep", &mut cmd, &log, ProcessGroup::Own).unwrap();
        let pid = child.pid();
        drop(child);
        assert!(
            ProcInfo::of(pid).unwrap().is_none(),
            "stopped and reaped on drop"
        );
        assert!(log_tail(&log, 10).contains("started"));
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let text: String = (1..=250).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let tail = log_tail(&log, LOG_TAIL_LINES);
        assert_eq!(tail.lines().count(), 100);
        assert!(tail.starts_with("line 151\n") && tail.ends_with("line 250\n"));
    }

    #[test]
    fn ports_are_never_handed_out_twice() {
        // Whether a port is still free a moment later is up to every other process on the
        // machine (the fixtures retry); what this process guarantees is uniqueness.
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            assert!(seen.insert(free_tcp_udp_port().unwrap()));
            assert!(seen.insert(free_tcp_port().unwrap()));
            let (a, b) = free_tcp_port_pair().unwrap();
            assert_eq!(a + 1, b);
            assert!(seen.insert(a) && seen.insert(b));
        }
        assert!(!seen.contains(&0));
    }

    #[test]
    fn a_missing_program_names_the_apt_line() {
        let e = require("carapace-no-such-program", "swtpm swtpm-tools").unwrap_err();
        assert_eq!(
            e.to_string(),
            "carapace-no-such-program not found; install it with: apt-get install -y swtpm swtpm-tools"
        );
        assert!(require("sh", "dash").unwrap().is_absolute());
        assert!(require("/nonexistent/sh", "dash").is_err());
    }
}
