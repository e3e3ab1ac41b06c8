//! The processes the benchmarks start and measure, and this process's own counters: child
//! processes stopped by pid when their guard drops ([`Proc`]), this executable run again
//! as a measuring child ([`run_json_child`]), free ports and the descriptor limit, and what
//! the kernel says about CPU time and memory (`/proc/<pid>/stat`, `/proc/<pid>/status`,
//! `/proc/<pid>/task/*/schedstat`, `/proc/stat`, `CLOCK_*_CPUTIME_ID`) and about the
//! machine (`lscpu`, `uname -r`, `/proc/loadavg`).
//!
//! Every scenario takes its process and CPU-time helpers from here; this module depends
//! on no other module of the crate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// A child process, stopped (SIGTERM, then SIGKILL after 3 s) by pid when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
            stopped: false,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails (with the end of its log) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.stopped = true;
            bail!(
                "{} exited ({status}); end of its log:\n{}",
                self.name,
                self.log_tail(30)
            );
        }
        Ok(())
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops it: SIGTERM to its pid, then SIGKILL if it is still there after 3 s.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Raises the soft RLIMIT_NOFILE of this process to its hard limit (children started
/// afterwards inherit it). Returns (soft before, soft after).
pub fn raise_nofile_limit() -> Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        let mut raised = before;
        raised.current = before.maximum;
        setrlimit(Resource::Nofile, raised).context("raising RLIMIT_NOFILE to the hard limit")?;
    }
    Ok((before.current, getrlimit(Resource::Nofile).current))
}

/// Runs this executable again as `<exe> <flag> <args as JSON>` with `envs` added to its
/// environment, passes its stderr (progress lines) on to ours, and parses the last line
/// of its stdout that is a JSON object. A failed child's error carries the last 20 lines
/// of its stderr. B5 and B6 measure in such children: B5 because libkrb5 reads its
/// configuration from the environment, B6 to have a client process of its own.
pub async fn run_json_child<A, T>(flag: &str, args: &A, envs: &[(String, String)]) -> Result<T>
where
    A: serde::Serialize,
    T: serde::de::DeserializeOwned,
{
    use tokio::io::AsyncBufReadExt as _;
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut child = tokio::process::Command::new(&exe)
        .arg(flag)
        .arg(serde_json::to_string(args)?)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        // Errors are reported in the benchmark report: no backtraces there.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {} {flag}", exe.display()))?;
    // The child's progress lines go on to our stderr; the last ones explain a failure.
    let forward = child.stderr.take().map(|stderr| {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut tail = std::collections::VecDeque::new();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{line}");
                tail.push_back(line);
                if tail.len() > 20 {
                    tail.pop_front();
                }
            }
            tail
        })
    });
    let out = child
        .wait_with_output()
        .await
        .with_context(|| format!("waiting for {} {flag}", exe.display()))?;
    let tail = match forward {
        Some(f) => f.await.unwrap_or_default(),
        None => std::collections::VecDeque::new(),
    };
    if !out.status.success() {
        bail!(
            "{} {flag} failed ({}): {}",
            exe.display(),
            out.status,
            Vec::from(tail).join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("{flag} printed no JSON line: {stdout}"))?;
    serde_json::from_str(line)
        .with_context(|| format!("{flag} output is not the expected JSON: {line}"))
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted from the last `)`: the field after it is field 3
/// (state); utime and stime are fields 14 and 15.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of `/proc/<pid>/status` (e.g. `VmRSS`), in bytes.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let kib: u64 = v.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

/// Idle time of all CPUs together (idle + iowait), in clock ticks, from the text of
/// `/proc/stat` (its first line: `cpu user nice system idle iowait ...`).
pub fn parse_proc_stat_idle_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields
        .take(5)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some(v.get(3)? + v.get(4)?)
}

/// The model name line of `lscpu` output.
pub fn parse_lscpu_model(lscpu: &str) -> Option<String> {
    lscpu.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "Model name").then(|| v.trim().to_owned())
    })
}

/// CPU time (user + system) a process has used so far, all threads.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_cpu_ticks(&text).ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// CPU time the calling thread has used so far (`CLOCK_THREAD_CPUTIME_ID`: nanosecond
/// resolution, unlike the 10 ms ticks of `/proc`).
pub fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Idle time of the whole machine so far (idle + iowait of every CPU, summed), from
/// `/proc/stat`. Over an interval, the difference divided by the wall time is the
/// average number of idle cores.
pub fn machine_idle() -> Result<Duration> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = parse_proc_stat_idle_ticks(&text)
        .ok_or_else(|| anyhow!("/proc/stat: unexpected format"))?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// One `kB` value of `/proc/<pid>/status`, in bytes.
pub fn status_bytes(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&text, key).ok_or_else(|| anyhow!("{path}: no {key} line"))
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// The machine the benchmark runs on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// `lscpu` model name.
    pub cpu_model: String,
    /// CPUs this process may run on (what `nproc` prints).
    pub nproc: usize,
    /// `uname -r`.
    pub kernel: String,
    /// `/proc/loadavg` when the benchmark started.
    pub loadavg: String,
    /// `rustc --version` if a rustc is on PATH.
    pub rustc: String,
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Machine {
    /// Reads the machine's description now.
    pub fn detect() -> Machine {
        Machine {
            cpu_model: command_output("lscpu", &[])
                .and_then(|o| parse_lscpu_model(&o))
                .unwrap_or_else(|| "unknown (lscpu failed)".into()),
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel: command_output("uname", &["-r"]).unwrap_or_else(|| "unknown".into()),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unknown".into()),
            rustc: command_output("rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// CPU time (user + system) this process has used so far, all threads
/// (`CLOCK_PROCESS_CPUTIME_ID`: nanosecond resolution, unlike the 10 ms ticks of `/proc`).
pub fn process_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// The first field of `/proc/<pid>/schedstat` (time on a CPU, in nanoseconds).
pub fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// CPU time of every thread of `pid` from `/proc/<pid>/task/*/schedstat`: nanoseconds,
/// where `/proc/<pid>/stat` counts 10 ms ticks (too coarse for krb5kdc's share of a
/// sub-second run). `None` without schedstats (kernel without `CONFIG_SCHED_INFO`).
///
/// A thread that ends while the directory is read is skipped (its time is then missing,
/// as it would be a moment later anyway); `None` if no thread could be read.
pub fn schedstat_cpu(pid: u32) -> Option<Duration> {
    let mut ns = 0u64;
    let mut read = 0usize;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        ns = ns.saturating_add(parse_schedstat_ns(&text)?);
        read += 1;
    }
    (read > 0).then(|| Duration::from_nanos(ns))
}

/// `/proc/loadavg`'s three load averages, now.
pub fn loadavg_now() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        let stat =
            "4242 (carapace (x) srv) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("4242 (short) S 1"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_values_are_in_bytes() {
        let status = "Name:\tcarapace-agent\nVmHWM:\t   30000 kB\nVmRSS:\t   28672 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(28_672 * 1024));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(30_000 * 1024));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn machine_idle_is_idle_plus_iowait() {
        let stat = "cpu  704488 0 144146 718099 23393 0 1333 1331 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_proc_stat_idle_ticks(stat), Some(718_099 + 23_393));
        assert_eq!(parse_proc_stat_idle_ticks("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(parse_proc_stat_idle_ticks("cpu 1 2 3\n"), None);
        machine_idle().unwrap();
    }

    #[test]
    fn lscpu_model_name() {
        let out = "Architecture:  x86_64\nVendor ID:     AuthenticAMD\nModel name:    AMD EPYC\nCPU family: 25\n";
        assert_eq!(parse_lscpu_model(out).as_deref(), Some("AMD EPYC"));
        assert_eq!(parse_lscpu_model("nothing"), None);
    }

    #[test]
    fn this_process_is_visible() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        cpu_time(pid).unwrap();
    }

    #[test]
    fn schedstat_gives_nanoseconds_on_a_cpu() {
        assert_eq!(parse_schedstat_ns("85237 145386 2\n"), Some(85_237));
        assert_eq!(parse_schedstat_ns(""), None);
        let me = schedstat_cpu(std::process::id()).unwrap();
        assert!(me > Duration::ZERO);
    }
}
