//! The admin API on the node API's TLS port, for administrators holding an X509-SVID.
//!
//! [`RemoteAdmin`] wraps the same [`AdminServer`] the Unix socket serves and authorizes
//! every call before the service sees it (not once per connection, so an entry deleted
//! or demoted between two calls of one connection stops the second). A call is served
//! only if the connection presented a client certificate that, at the time of the call:
//!
//! 1. is an X509-SVID that is not an agent's or a server's (`spiffe://<td>/spire/...`
//!    IDs never administer),
//! 2. has not expired,
//! 3. still chains to the server's current trust bundle (the TLS handshake checked the
//!    bundle of its own moment; a revoked authority leaves the bundle),
//! 4. carries the SPIFFE ID of a registration entry marked `admin` that has not expired
//!    ([`EntryCache::has_admin_entry`]).
//!
//! Anything else is `PermissionDenied` with the reason. The check wraps the whole
//! service, so an RPC added to the admin API later is covered without a line here. Each
//! call is logged at info with the caller's SPIFFE ID, its address and the method.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use carapace_core::SpiffeId;
use carapace_core::clock::unix_now;
use carapace_proto::admin::admin_server::AdminServer;
use carapace_tls::BundleWatch;

use super::AdminApi;
use crate::entry_cache::EntryCache;
use crate::node_api::PeerInfo;

/// The admin service as served on the node API's TLS port: every call authorized first.
#[derive(Debug, Clone)]
pub struct RemoteAdmin {
    inner: AdminServer<AdminApi>,
    cache: Arc<EntryCache>,
    bundle: BundleWatch,
}

impl RemoteAdmin {
    /// `api`, with every call authorized against `api`'s entry cache and trust bundle.
    pub fn new(api: AdminApi) -> Self {
        RemoteAdmin {
            cache: api.cache.clone(),
            bundle: api.ca.bundle(),
            inner: AdminServer::new(api),
        }
    }

    /// Who is calling, if they may administer at `now` (unix seconds); else why not.
    pub(super) fn authorize(&self, peer: Option<&PeerInfo>, now: i64) -> Result<SpiffeId, String> {
        let bundle = self.bundle.borrow().clone();
        let id = PeerInfo::workload_svid(
            peer,
            &bundle,
            now,
            "the admin API on this port requires an X509-SVID of an admin entry as client \
             certificate; none was presented",
            "agent and server SVIDs never administer",
        )?;
        let id = &id;
        if !self.cache.has_admin_entry(id, now) {
            return Err(format!(
                "{id} is not the SPIFFE ID of any registration entry marked admin"
            ));
        }
        Ok(id.clone())
    }
}

impl NamedService for RemoteAdmin {
    const NAME: &'static str = <AdminServer<AdminApi> as NamedService>::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl Service<http::Request<Body>> for RemoteAdmin {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let peer = req.extensions().get::<PeerInfo>();
        let remote = peer.map(|p| p.remote.to_string()).unwrap_or_default();
        let method = req.uri().path().to_owned();
        match self.authorize(peer, unix_now()) {
            Ok(caller) => {
                tracing::info!(%caller, %remote, %method, "remote admin call");
                // The service that answered `poll_ready` takes the call (tower's contract);
                // the clone is ready for the next one.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { ready.call(req).await })
            }
            Err(reason) => {
                if peer.is_some_and(|p| p.svid.is_some()) {
                    tracing::info!(%remote, %method, %reason, "remote admin call refused");
                } else {
                    tracing::debug!(%remote, %method, %reason, "remote admin call refused");
                }
                Box::pin(std::future::ready(Ok(
                    Status::permission_denied(reason).into_http()
                )))
            }
        }
    }
}
