//! B1, first half: the crypto ceiling. Exactly the server's per-SVID work, with the
//! server's own functions, in this process: parse and verify a CSR
//! ([`carapace_server::ca::csr_public_key`]), then build and sign the leaf
//! ([`carapace_server::ca::sign_leaf`]) under a CA slot of a [`CaManager`] loaded over an
//! in-memory datastore and the in-memory key manager.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use carapace_core::{KeyType, SpiffeId, TrustDomain};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_server::ca::{CaManager, CaSettings, CaSlot, csr_public_key, sign_leaf};
use carapace_server::datastore::Datastore;

/// Lifetime of the benchmark's SVIDs (the server's default).
pub const SVID_TTL: Duration = Duration::from_secs(3600);

/// `n` PKCS#10 CSRs (DER) for fresh P-256 keys, as the agent makes them (rcgen, empty
/// subject), generated on `threads` threads.
pub fn generate_csrs(n: usize, threads: usize) -> Result<Vec<Vec<u8>>> {
    let threads = threads.clamp(1, n.max(1));
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let count = per.min(n.saturating_sub(t * per));
                s.spawn(move || -> Result<Vec<Vec<u8>>> {
                    (0..count)
                        .map(|_| {
                            let kp = rcgen::KeyPair::generate().context("P-256 key generation")?;
                            let csr = rcgen::CertificateParams::default()
                                .serialize_request(&kp)
                                .context("CSR")?;
                            Ok(csr.der().to_vec())
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow!("CSR generation thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// The `i`-th benchmark workload SPIFFE ID, `spiffe://example.org/bench/wl-i`.
pub fn workload_id(i: usize) -> String {
    format!("spiffe://{}/bench/wl-{i}", crate::harness::TRUST_DOMAIN)
}

/// A CA like the server's: a [`CaManager`] over `Datastore::open_in_memory()` and a
/// [`MemoryKeyManager`] with a P-256 CA key; returns it with its active slot.
pub async fn bench_ca() -> Result<(Arc<CaManager>, Arc<CaSlot>)> {
    let ds = Datastore::open_in_memory().await?;
    let km = Arc::new(MemoryKeyManager::new());
    let td = TrustDomain::new(crate::harness::TRUST_DOMAIN)?;
    let settings = CaSettings {
        ca_ttl: Duration::from_secs(86_400),
        key_type: KeyType::EcP256,
        organization: "Carapace".into(),
        country: "US".into(),
    };
    let ca = CaManager::load(td, km, None, ds, settings, carapace_server::unix_now()).await?;
    let slot = ca.active()?;
    Ok((ca, slot))
}

/// Issues one SVID for each of `csrs` (SPIFFE IDs cycling over `ids`) on `threads` std
/// threads, each taking an equal contiguous share; returns the wall time.
pub fn issue_all(
    slot: &CaSlot,
    ids: &[SpiffeId],
    csrs: &[Vec<u8>],
    threads: usize,
) -> Result<Duration> {
    if ids.is_empty() {
        return Err(anyhow!("no SPIFFE IDs"));
    }
    let threads = threads.clamp(1, csrs.len().max(1));
    let per = csrs.len().div_ceil(threads);
    let now = carapace_server::unix_now();
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = csrs
            .chunks(per.max(1))
            .enumerate()
            .map(|(t, chunk)| {
                s.spawn(move || -> Result<usize> {
                    let mut issued = 0;
                    for (j, csr) in chunk.iter().enumerate() {
                        let id = &ids[(t * per + j) % ids.len()];
                        let key = csr_public_key(csr)?;
                        let svid = sign_leaf(slot, id, &key, SVID_TTL, &[], now)?;
                        issued += usize::from(!svid.chain.is_empty());
                    }
                    Ok(issued)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| anyhow!("signing thread panicked"))??;
        }
        if total != csrs.len() {
            return Err(anyhow!("issued {total} of {} SVIDs", csrs.len()));
        }
        Ok(())
    })?;
    Ok(start.elapsed())
}

/// The ceiling at one thread count: SVIDs/s of each run.
#[derive(Debug, Clone)]
pub struct Ceiling {
    /// Threads used.
    pub threads: usize,
    /// SVIDs issued per run.
    pub svids: usize,
    /// SVIDs/s of each run.
    pub rates: Vec<f64>,
}

/// Measures the ceiling with 1 thread and with `nproc` threads, `runs` times each
/// (alternating), over `csrs` with SPIFFE IDs cycling over `entries` names.
pub fn measure(
    slot: &CaSlot,
    csrs: &[Vec<u8>],
    entries: usize,
    nproc: usize,
    runs: usize,
) -> Result<Vec<Ceiling>> {
    let ids: Vec<SpiffeId> = (0..entries.max(1))
        .map(|i| workload_id(i).parse().map_err(|e| anyhow!("{e}")))
        .collect::<Result<_>>()?;
    let mut counts = vec![1];
    if nproc > 1 {
        counts.push(nproc);
    }
    let mut out: Vec<Ceiling> = counts
        .iter()
        .map(|&t| Ceiling {
            threads: t,
            svids: csrs.len(),
            rates: Vec::new(),
        })
        .collect();
    // Warm-up: caches, allocator, CPU frequency.
    issue_all(slot, &ids, &csrs[..csrs.len().min(500)], nproc)?;
    for _ in 0..runs.max(1) {
        for c in &mut out {
            let wall = issue_all(slot, &ids, csrs, c.threads)?;
            c.rates.push(csrs.len() as f64 / wall.as_secs_f64());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issues_with_the_server_functions() {
        let (_ca, slot) = bench_ca().await.unwrap();
        let csrs = generate_csrs(7, 2).unwrap();
        assert_eq!(csrs.len(), 7);
        let ids: Vec<SpiffeId> = (0..3).map(|i| workload_id(i).parse().unwrap()).collect();
        issue_all(&slot, &ids, &csrs, 2).unwrap();
        let c = measure(&slot, &csrs, 3, 2, 1).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.rates.len() == 1 && c.rates[0] > 0.0));
    }
}
