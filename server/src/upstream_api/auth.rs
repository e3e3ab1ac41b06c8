//! Who may call the upstream API, decided on every call (and before every message of a
//! bundle watch), and how often.
//!
//! A call is served only if the connection presented a client certificate that, at the
//! time of the call:
//!
//! 1. is an X509-SVID that is not an agent's or a server's (`spiffe://<td>/spire/...`:
//!    an agent's SVID is not a downstream server's, and a node's identity must not buy a
//!    CA);
//! 2. has not expired;
//! 3. still chains to the server's current trust bundle (the TLS handshake checked the
//!    bundle of its own moment; a revoked authority leaves the bundle);
//! 4. carries the SPIFFE ID of a registration entry marked `downstream` that has not
//!    expired ([`EntryCache::has_downstream_entry`]).
//!
//! Anything else is `PermissionDenied` with the reason. The calls that make the server
//! work (a CA signature, a bundle write) are also limited per caller and method by a
//! token bucket ([`RateLimiter`]): `ResourceExhausted` past it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;

use carapace_core::SpiffeId;
use carapace_tls::BundleWatch;

use crate::entry_cache::EntryCache;
use crate::node_api::PeerInfo;

/// Decides, per call, whether the caller is a downstream server.
#[derive(Debug, Clone)]
pub struct Authorizer {
    cache: Arc<EntryCache>,
    bundle: BundleWatch,
}

impl Authorizer {
    /// Authorizes against `cache`'s entries and the bundle `bundle` holds at each call.
    pub fn new(cache: Arc<EntryCache>, bundle: BundleWatch) -> Self {
        Authorizer { cache, bundle }
    }

    /// The caller's SPIFFE ID if it may call the upstream API at `now` (unix seconds);
    /// else why not.
    pub fn authorize(&self, peer: Option<&PeerInfo>, now: i64) -> Result<SpiffeId, String> {
        let bundle = self.bundle.borrow().clone();
        let id = PeerInfo::workload_svid(
            peer,
            &bundle,
            now,
            "the upstream API requires the X509-SVID of a registration entry marked \
             downstream as client certificate; none was presented",
            "agent and server SVIDs are not downstream servers' (a downstream server calls \
             with the workload SVID its agent gives it)",
        )?;
        let id = &id;
        if !self.cache.has_downstream_entry(id, now) {
            return Err(format!(
                "{id} has no registration entry marked downstream; create one with \
                 `entry create ... --downstream` (or add --downstream with `entry update`)"
            ));
        }
        Ok(id.clone())
    }

    /// [`Self::authorize`] as a gRPC status, logged: at info when a certificate was
    /// presented (someone holding an SVID of the trust domain was refused), at debug
    /// otherwise.
    pub fn check(
        &self,
        peer: Option<&PeerInfo>,
        method: &str,
        now: i64,
    ) -> Result<SpiffeId, Status> {
        self.authorize(peer, now).map_err(|reason| {
            let remote = peer.map(|p| p.remote.to_string()).unwrap_or_default();
            if peer.is_some_and(|p| p.svid.is_some()) {
                tracing::info!(%remote, method, %reason, "upstream API call refused");
            } else {
                tracing::debug!(%remote, method, %reason, "upstream API call refused");
            }
            Status::permission_denied(reason)
        })
    }
}

/// Calls a caller may make at once before the limit applies.
pub const RATE_BURST: u32 = 3;
/// Calls per minute a caller may make in the long run, per method.
pub const RATE_PER_MINUTE: u32 = 6;
/// Buckets kept at most; full ones are forgotten first (a full bucket is the default).
const MAX_BUCKETS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per (method, caller): [`RATE_BURST`] calls at once, refilled at
/// [`RATE_PER_MINUTE`] a minute.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    burst: f64,
    per_minute: u32,
    per_second: f64,
    buckets: Arc<Mutex<HashMap<(&'static str, SpiffeId), Bucket>>>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new(RATE_BURST, RATE_PER_MINUTE)
    }
}

impl RateLimiter {
    /// `burst` calls at once, `per_minute` in the long run.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        RateLimiter {
            burst: f64::from(burst.max(1)),
            per_minute,
            per_second: f64::from(per_minute) / 60.0,
            buckets: Arc::default(),
        }
    }

    /// Takes one call of `method` for `caller` at `now`; `ResourceExhausted` saying when
    /// to retry if its bucket is empty.
    pub fn take(
        &self,
        method: &'static str,
        caller: &SpiffeId,
        now: Instant,
    ) -> Result<(), Status> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS {
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, b| refill(b, burst, rate, now) < burst);
        }
        let b = buckets.entry((method, caller.clone())).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(b, self.burst, self.per_second, now);
        if tokens >= 1.0 {
            *b = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            return Ok(());
        }
        *b = Bucket { tokens, at: now };
        let wait = if self.per_second > 0.0 {
            Duration::from_secs_f64((1.0 - tokens) / self.per_second).as_secs() + 1
        } else {
            u64::MAX
        };
        tracing::info!(%caller, method, "upstream API call refused: rate limit");
        Err(Status::resource_exhausted(format!(
            "{caller} called {method} more than {} times at once or {} times a minute; \
             retry in {wait}s",
            self.burst, self.per_minute
        )))
    }
}

/// The tokens of `b` at `now`.
fn refill(b: &Bucket, burst: f64, per_second: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * per_second).min(burst)
}
