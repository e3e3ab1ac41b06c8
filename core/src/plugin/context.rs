//! What every plugin constructor is handed: [`PluginContext`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::TrustDomain;
use crate::clock::{Clock, SystemClock};

/// What every plugin constructor may use: the trust domain, the data directory that
/// relative paths in the plugin's settings resolve against, and the clock the plugin
/// reads the time from (never `SystemTime::now()` itself, so tests can move time).
#[derive(Debug, Clone)]
pub struct PluginContext {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The process's data directory; relative plugin paths resolve against it.
    pub data_dir: PathBuf,
    /// The time.
    pub clock: Arc<dyn Clock>,
}

impl PluginContext {
    /// A context for `trust_domain`, with `data_dir` and `clock`.
    pub fn new(trust_domain: TrustDomain, data_dir: PathBuf, clock: Arc<dyn Clock>) -> Self {
        PluginContext {
            trust_domain,
            data_dir,
            clock,
        }
    }

    /// For tests and tools: trust domain `example.org`, the data directory `data_dir` and
    /// the [`SystemClock`]. Give it a [`ManualClock`](crate::clock::ManualClock) with
    /// [`PluginContext::with_clock`] to move time.
    pub fn for_tests(data_dir: impl AsRef<Path>) -> Self {
        #[allow(clippy::expect_used, reason = "a constant, valid trust domain name")]
        let trust_domain = TrustDomain::new("example.org").expect("a valid trust domain");
        Self::new(
            trust_domain,
            data_dir.as_ref().to_path_buf(),
            Arc::new(SystemClock),
        )
    }

    /// The same context reading the time from `clock`.
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        PluginContext { clock, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::Duration;

    #[test]
    fn a_test_context_reads_the_time_from_the_clock_it_is_given() {
        let ctx = PluginContext::for_tests("/var/lib/carapace");
        assert_eq!(ctx.trust_domain.to_string(), "example.org");
        assert_eq!(ctx.data_dir, Path::new("/var/lib/carapace"));
        assert!(ctx.clock.unix_now() > 1_600_000_000);

        let clock = Arc::new(ManualClock::at_unix(1_000));
        let ctx = ctx.with_clock(clock.clone());
        let copy = ctx.clone();
        clock.advance(Duration::from_secs(60));
        assert_eq!(ctx.clock.unix_now(), 1_060);
        assert_eq!(copy.clock.unix_now(), 1_060, "clones share the clock");
        assert_eq!(copy.data_dir, Path::new("/var/lib/carapace"));
    }
}
