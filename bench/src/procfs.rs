//! What the kernel says about a process (`/proc/<pid>/stat`, `/proc/<pid>/status`) and
//! about the machine (`lscpu`, `uname -r`, `/proc/loadavg`).

use std::time::Duration;

use anyhow::{Context, Result, anyhow};

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
}
