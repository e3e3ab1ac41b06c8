//! The server's CA in this process, for the crypto ceilings (B1, B8): a [`CaManager`] like
//! the server's over `Datastore::open_in_memory()` and a [`MemoryKeyManager`]
//! ([`bench_ca`]), and work split over std threads and timed ([`on_threads`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use carapace_core::{KeyType, TrustDomain};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_server::ca::{CaManager, CaSettings};
use carapace_server::datastore::Datastore;

/// A CA like the server's, with a P-256 X.509 CA key and a JWT key of `jwt_key_type`,
/// both active.
pub async fn bench_ca(jwt_key_type: KeyType) -> Result<Arc<CaManager>> {
    let ds = Datastore::open_in_memory().await?;
    let km = Arc::new(MemoryKeyManager::new());
    let td = TrustDomain::new(crate::harness::TRUST_DOMAIN)?;
    let settings = CaSettings {
        ca_ttl: Duration::from_secs(86_400),
        key_type: KeyType::EcP256,
        organization: "Carapace".into(),
        country: "US".into(),
        jwt_key_type,
        server_id: "bench".into(),
        path_len: 0,
    };
    Ok(CaManager::load(td, km, None, ds, settings, carapace_core::clock::unix_now()).await?)
}

/// Runs `work` over the items `0..total` split into `threads` contiguous shares (one std
/// thread each; `work(share)` returns how many items it completed) and returns the wall
/// time; fails unless every item was completed.
pub fn on_threads<F>(total: usize, threads: usize, work: F) -> Result<Duration>
where
    F: Fn(std::ops::Range<usize>) -> Result<usize> + Sync,
{
    let threads = threads.clamp(1, total.max(1));
    let per = total.div_ceil(threads).max(1);
    let start = Instant::now();
    let done = std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = (t * per).min(total)..((t + 1) * per).min(total);
                s.spawn(move || work(share))
            })
            .collect();
        let mut done = 0;
        for h in handles {
            done += h
                .join()
                .map_err(|_| anyhow!("a worker thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(done)
    })?;
    let wall = start.elapsed();
    if done != total {
        return Err(anyhow!("completed {done} of {total} items"));
    }
    Ok(wall)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_runs_once_over_the_threads() {
        let seen: Vec<AtomicUsize> = (0..10).map(|_| AtomicUsize::new(0)).collect();
        on_threads(10, 3, |share| {
            for i in share.clone() {
                seen[i].fetch_add(1, Ordering::Relaxed);
            }
            Ok(share.len())
        })
        .unwrap();
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
        // A share that falls short fails the whole.
        assert!(on_threads(10, 2, |share| Ok(share.len().saturating_sub(1))).is_err());
        assert!(on_threads(0, 4, |share| Ok(share.len())).is_ok());
    }
}
