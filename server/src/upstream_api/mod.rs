//! The upstream API (`carapace.upstream.v1.Upstream`), served on the node API port to
//! downstream servers (nested servers): each call is authorized on its own, for a caller
//! whose X509-SVID verifies against the current bundle and whose SPIFFE ID has a
//! registration entry marked `downstream` ([`auth`]).
//!
//! - `MintDownstreamCA` certifies a downstream server's CA key under the active CA
//!   ([`CaManager::sign_downstream_ca`]: the grant is the trust domain, a depth and a
//!   lifetime; `[downstream]` in the configuration);
//! - `WatchBundle` streams the bundle ([`watch`]);
//! - `PublishJWTAuthority` adds a downstream server's JWT key to the bundle
//!   ([`CaManager::publish_downstream_jwt_key`]: a part of the bundle per downstream,
//!   at most three keys each).
//!
//! `MintDownstreamCA` and `PublishJWTAuthority` are rate limited per caller
//! ([`auth::RateLimiter`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch as tokio_watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use carapace_core::clock::unix_now;
use carapace_proto::carapace::types::v1 as types;
use carapace_proto::carapace::upstream::v1::upstream_server::{Upstream, UpstreamServer};
use carapace_proto::carapace::upstream::v1::{
    MintDownstreamCaRequest, MintDownstreamCaResponse, PublishJwtAuthorityRequest,
    PublishJwtAuthorityResponse, WatchBundleRequest,
};

use crate::ca::CaManager;
use crate::ca::downstream::DownstreamCaRequest;
use crate::config::Downstream;
use crate::entry_cache::EntryCache;
use crate::node_api::PeerInfo;

pub mod auth;
pub mod watch;

use auth::{Authorizer, RateLimiter};

/// Largest request message: a CSR (an RSA-8192 key's is under 3 KiB) or a JWT key.
pub const MAX_REQUEST_SIZE: usize = 64 * 1024;

const MINT: &str = "MintDownstreamCA";
const PUBLISH: &str = "PublishJWTAuthority";
const WATCH: &str = "WatchBundle";

/// The upstream API's handlers.
#[derive(Debug, Clone)]
pub struct UpstreamApi {
    ca: Arc<CaManager>,
    cache: Arc<EntryCache>,
    auth: Authorizer,
    limiter: RateLimiter,
    grant: Option<Downstream>,
    closing: Option<tokio_watch::Receiver<bool>>,
    beat: Duration,
}

impl UpstreamApi {
    /// The API over `ca` and `cache`, signing within `grant` (`[downstream]`; `None`: no
    /// downstream CA is signed, the calls say so).
    pub fn new(ca: Arc<CaManager>, cache: Arc<EntryCache>, grant: Option<Downstream>) -> Self {
        UpstreamApi {
            auth: Authorizer::new(cache.clone(), ca.bundle()),
            ca,
            cache,
            limiter: RateLimiter::default(),
            grant,
            closing: None,
            beat: watch::BEAT,
        }
    }

    /// Ends the bundle watches when `closing` turns true (server shutdown).
    pub fn with_shutdown(mut self, closing: tokio_watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }

    /// Uses `limiter` instead of the default rate limits.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = limiter;
        self
    }

    /// The gRPC service, taking requests up to [`MAX_REQUEST_SIZE`].
    pub fn into_service(self) -> UpstreamServer<UpstreamApi> {
        UpstreamServer::new(self).max_decoding_message_size(MAX_REQUEST_SIZE)
    }

    /// Authorizes a call of `method` and, for the calls that make the server work, takes
    /// it from the caller's rate limit.
    fn admit<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
        limited: bool,
    ) -> Result<carapace_core::SpiffeId, Status> {
        let caller = self
            .auth
            .check(req.extensions().get::<PeerInfo>(), method, unix_now())?;
        if limited {
            self.limiter.take(method, &caller, Instant::now())?;
        }
        Ok(caller)
    }
}

type BundleStream = ReceiverStream<Result<types::Bundle, Status>>;

#[tonic::async_trait]
impl Upstream for UpstreamApi {
    type WatchBundleStream = BundleStream;

    async fn mint_downstream_ca(
        &self,
        req: Request<MintDownstreamCaRequest>,
    ) -> Result<Response<MintDownstreamCaResponse>, Status> {
        let caller = self.admit(&req, MINT, true)?;
        let r = req.into_inner();
        let minted = self
            .ca
            .sign_downstream_ca(
                self.grant.as_ref(),
                DownstreamCaRequest {
                    csr_der: &r.csr,
                    preferred_ttl: Duration::from_secs(r.preferred_ttl_seconds),
                    path_len: r.path_len,
                    caller: &caller,
                },
                unix_now(),
            )
            .await
            .map_err(|e| {
                tracing::info!(%caller, error = %e, "downstream CA refused");
                Status::from(e)
            })?;
        Ok(Response::new(MintDownstreamCaResponse {
            ca_chain: minted.chain,
            bundle: Some(types::Bundle::from(minted.bundle.as_ref())),
        }))
    }

    async fn publish_jwt_authority(
        &self,
        req: Request<PublishJwtAuthorityRequest>,
    ) -> Result<Response<PublishJwtAuthorityResponse>, Status> {
        let caller = self.admit(&req, PUBLISH, true)?;
        let wire = req
            .into_inner()
            .key
            .ok_or_else(|| Status::invalid_argument("key: missing"))?;
        let key = carapace_core::JwtKey {
            kid: wire.kid,
            public_key_der: wire.public_key,
            expires_at: (wire.expires_at != 0).then_some(wire.expires_at),
        };
        let bundle = self
            .ca
            .publish_downstream_jwt_key(self.grant.as_ref(), &caller, &key, unix_now())
            .await
            .map_err(|e| {
                tracing::info!(%caller, error = %e, "downstream JWT key refused");
                Status::from(e)
            })?;
        Ok(Response::new(PublishJwtAuthorityResponse {
            bundle: Some(types::Bundle::from(bundle.as_ref())),
        }))
    }

    async fn watch_bundle(
        &self,
        req: Request<WatchBundleRequest>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        let caller = self.admit(&req, WATCH, false)?;
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let known = req.into_inner().known_sequence;
        let (tx, rx) = mpsc::channel(1);
        let watcher = watch::Watcher {
            auth: self.auth.clone(),
            bundles: self.ca.bundle(),
            revisions: self.cache.subscribe(),
            closing: self.closing.clone(),
            beat: self.beat,
        };
        tokio::spawn(watcher.run(caller, peer, known, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests;
