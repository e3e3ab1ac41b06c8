//! The one clock of Carapace, and the one way to write a time.
//!
//! Everything that asks "what time is it?" asks a [`Clock`]. Production code holds a
//! [`SystemClock`]; tests hold a [`ManualClock`] they can set and advance, so an outcome
//! that depends on time (an expired token, certificate or ticket; the time a record
//! was written) can be tested without waiting. Plugins get their clock through
//! [`PluginContext`](crate::plugin::PluginContext); code that has no context (the CLIs,
//! the datastore's bookkeeping) calls [`unix_now`].
//!
//! Times are Unix seconds in an `i64`, as stored in the datastore and in certificates.
//! [`rfc3339`] writes one for people.
//!
//! Reading a clock is not I/O in the sense of this crate's rule: it neither blocks nor
//! fails.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::limits::MAX_UNIX_TIME;

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;

    /// The current time in Unix seconds ([`unix_seconds`] of [`Clock::now`]).
    ///
    /// A clock set before 1970 reads as `0` (the epoch itself), never as a negative
    /// time; one beyond `i64::MAX` seconds reads as `i64::MAX`. Code that must refuse a
    /// pre-1970 clock rather than treat it as the epoch calls [`unix_seconds`] on
    /// [`Clock::now`] instead.
    fn unix_now(&self) -> i64 {
        unix_seconds(self.now()).unwrap_or(0)
    }
}

/// The operating system's wall clock ([`SystemTime::now`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that stands still until it is told otherwise: set it with [`ManualClock::set`]
/// or [`ManualClock::set_unix`], move it with [`ManualClock::advance`]. Shared between
/// threads (behind an `Arc`), every reader sees the latest setting.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    /// A clock showing `now`.
    pub fn new(now: SystemTime) -> Self {
        ManualClock {
            now: Mutex::new(now),
        }
    }

    /// A clock showing `unix` seconds since the epoch (negative: before it).
    pub fn at_unix(unix: i64) -> Self {
        Self::new(from_unix(unix))
    }

    /// A clock showing the system's time now (and standing still from then on).
    pub fn starting_now() -> Self {
        Self::new(SystemTime::now())
    }

    /// Sets the clock to `now`.
    pub fn set(&self, now: SystemTime) {
        *self.lock() = now;
    }

    /// Sets the clock to `unix` seconds since the epoch (negative: before it).
    pub fn set_unix(&self, unix: i64) {
        self.set(from_unix(unix));
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.lock();
        *now += d;
    }

    /// Moves the clock back by `d`.
    pub fn rewind(&self, d: Duration) {
        let mut now = self.lock();
        *now -= d;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SystemTime> {
        // A SystemTime cannot be left half-written: a poisoned lock still holds a time.
        self.now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for ManualClock {
    /// A clock showing the epoch.
    fn default() -> Self {
        Self::new(UNIX_EPOCH)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.lock()
    }
}

/// `t` in Unix seconds (whole seconds, rounded down), or `None` when `t` is before 1970.
/// A time beyond `i64::MAX` seconds gives `i64::MAX`.
pub fn unix_seconds(t: SystemTime) -> Option<i64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The system's time now in Unix seconds: [`Clock::unix_now`] of [`SystemClock`], for
/// code that is handed no clock. Before 1970 it reads `0`.
pub fn unix_now() -> i64 {
    SystemClock.unix_now()
}

/// Unix seconds as RFC 3339 (UTC, whole seconds, `2020-01-02T00:00:00Z`). Any value
/// prints: one outside 1970..=9999 (which RFC 3339 cannot write) prints as
/// `unix <n> (outside 1970-01-01..9999-12-31)`.
pub fn rfc3339(unix: i64) -> String {
    if !(0..=MAX_UNIX_TIME).contains(&unix) {
        return format!("unix {unix} (outside 1970-01-01..9999-12-31)");
    }
    humantime::format_rfc3339_seconds(from_unix(unix)).to_string()
}

/// The time `unix` seconds from the epoch (negative: before it).
fn from_unix(unix: i64) -> SystemTime {
    let d = Duration::from_secs(unix.unsigned_abs());
    if unix >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::sync::Arc;

    #[test]
    fn rfc3339_writes_known_instants() {
        for (unix, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (1, "1970-01-01T00:00:01Z"),
            (1_577_836_800, "2020-01-01T00:00:00Z"),
            (1_577_923_200, "2020-01-02T00:00:00Z"),
            (951_782_400 + 3_661, "2000-02-29T01:01:01Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (MAX_UNIX_TIME, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(unix), text, "{unix}");
        }
    }

    #[test]
    fn rfc3339_names_a_value_it_cannot_write_instead_of_failing() {
        assert_eq!(rfc3339(-1), "unix -1 (outside 1970-01-01..9999-12-31)");
        assert_eq!(
            rfc3339(MAX_UNIX_TIME + 1),
            "unix 253402300800 (outside 1970-01-01..9999-12-31)"
        );
        assert_eq!(
            rfc3339(i64::MIN),
            format!("unix {} (outside 1970-01-01..9999-12-31)", i64::MIN)
        );
        assert_eq!(
            rfc3339(i64::MAX),
            format!("unix {} (outside 1970-01-01..9999-12-31)", i64::MAX)
        );
    }

    #[test]
    fn unix_seconds_rounds_down_and_refuses_times_before_1970() {
        assert_eq!(unix_seconds(UNIX_EPOCH), Some(0));
        assert_eq!(
            unix_seconds(UNIX_EPOCH + Duration::from_millis(1_999)),
            Some(1)
        );
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(1)), None);
    }

    #[test]
    fn a_clock_before_1970_reads_as_the_epoch() {
        let clock = ManualClock::at_unix(-86_400);
        assert_eq!(clock.unix_now(), 0);
        assert_eq!(unix_seconds(clock.now()), None);
    }

    #[test]
    fn the_system_clock_reads_the_system_time() {
        let before = unix_seconds(SystemTime::now()).unwrap();
        let read = SystemClock.unix_now();
        let free = unix_now();
        let after = unix_seconds(SystemTime::now()).unwrap();
        assert!(before <= read && read <= free && free <= after);
        assert!(before > 1_600_000_000, "the test machine's clock is set");
    }

    #[test]
    fn a_manual_clock_stands_still_until_set_or_advanced() {
        let clock = ManualClock::at_unix(1_700_000_000);
        assert_eq!(clock.unix_now(), 1_700_000_000);
        assert_eq!(clock.unix_now(), 1_700_000_000);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.unix_now(), 1_700_000_090);
        clock.rewind(Duration::from_secs(30));
        assert_eq!(clock.unix_now(), 1_700_000_060);
        clock.set_unix(5);
        assert_eq!(clock.unix_now(), 5);
        clock.set(UNIX_EPOCH + Duration::from_millis(7_500));
        assert_eq!(clock.now(), UNIX_EPOCH + Duration::from_millis(7_500));
        assert_eq!(clock.unix_now(), 7);
        assert_eq!(ManualClock::default().unix_now(), 0);
    }

    #[test]
    fn a_manual_clock_moved_on_one_thread_is_seen_on_another() {
        let clock = Arc::new(ManualClock::at_unix(100));
        let shared: Arc<dyn Clock> = clock.clone();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..250 {
                        clock.advance(Duration::from_secs(1));
                    }
                });
            }
        });
        assert_eq!(shared.unix_now(), 1_100);
        let reader = std::thread::spawn(move || shared.unix_now());
        assert_eq!(reader.join().unwrap(), 1_100);
    }
}
