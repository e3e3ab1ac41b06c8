//! Giving the memory a burst of work freed back to the system.
//!
//! glibc's allocator keeps what it has freed inside its arenas (one per thread that
//! allocated, up to eight per core) and returns it to the system only from the top of
//! each heap. A burst of Workload API connections spreads buffers over many arenas; once
//! they close, the freed memory stays in the process: RSS rose from 67 to 121 MB after
//! 2,000 connections and stayed there (issue 22). Every [`TRIM_INTERVAL`] (a second) the
//! agent asks glibc to give back every whole free page of every arena (`malloc_trim(0)`),
//! on a blocking thread. An idle agent trimming every second used no measurable CPU (no
//! 10 ms tick in 20 s); the memory a sync or a burst of connections freed is back with
//! the system a second later (BENCHMARKS.md B15).
//!
//! This module and `workload_api::peer` are the crate's only `unsafe` code.

use std::time::Duration;

use tokio::sync::watch;

/// How often the agent gives freed memory back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Returns every whole free page of the allocator's heaps to the system; whether any
/// was returned. Does nothing where the allocator is not glibc's.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(
    unsafe_code,
    reason = "glibc's malloc_trim has no safe wrapper; one call"
)]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointer and touches only the allocator's own state,
    // under each arena's lock; glibc documents it as safe to call from any thread at any
    // time (MT-Safe).
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Returns every whole free page of the allocator's heaps to the system; whether any
/// was returned. Does nothing where the allocator is not glibc's.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

/// Trims every [`TRIM_INTERVAL`] until `stop` turns true (or its sender is gone).
pub async fn trim_periodically(mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let start = std::time::Instant::now();
                if let Ok(returned) = tokio::task::spawn_blocking(trim).await {
                    tracing::trace!(returned, took = ?start.elapsed(), "malloc_trim");
                }
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_trim_returns_freed_memory_that_the_allocator_kept() {
        // On a thread of its own (its own arena): 64 MiB in 4 KiB blocks, all freed but
        // the last, which pins the top of the heap so that free() cannot give the rest
        // back by itself.
        let (before, after_free, after_trim) = std::thread::spawn(|| {
            let mut blocks: Vec<Vec<u8>> =
                (0..16_384).map(|i| vec![(i % 251) as u8; 4096]).collect();
            let before = rss_kib();
            let last = blocks.pop();
            drop(blocks);
            let after_free = rss_kib();
            assert!(trim(), "something to give back");
            let after_trim = rss_kib();
            drop(last);
            (before, after_free, after_trim)
        })
        .join()
        .unwrap();
        assert!(
            after_free + 16 * 1024 > before,
            "free() alone kept the memory: {before} → {after_free} KiB"
        );
        assert!(
            after_trim + 32 * 1024 < after_free,
            "the trim gave at least 32 of the 64 MiB back: {after_free} → {after_trim} KiB"
        );
    }

    #[tokio::test]
    async fn the_periodic_trim_ends_with_the_stop_signal() {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(trim_periodically(rx));
        tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
