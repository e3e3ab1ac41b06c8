//! `WatchBundle`: the trust domain's bundle, streamed to a downstream server.
//!
//! The first message goes out at once when the bundle's sequence differs from the one the
//! caller holds; then one on every change of the bundle this server serves, and the
//! current bundle again after [`BEAT`] without a message (a liveness beat: a downstream
//! that hears nothing for longer knows the stream is dead). The caller is authorized again
//! before every message, on every change of the entries (its entry may lose `downstream`
//! or be deleted) and when its SVID expires: a caller no longer authorized gets
//! `PermissionDenied` and the stream ends. At server shutdown the stream ends with
//! `Unavailable`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::Status;

use carapace_core::clock::unix_now;
use carapace_core::{SpiffeId, TrustBundle};
use carapace_proto::carapace::types::v1 as types;

use super::auth::Authorizer;
use crate::node_api::PeerInfo;

/// The longest a bundle watch stays silent: the current bundle is sent again after this
/// long without a message. Shorter than the bundle's refresh hint
/// ([`crate::ca::REFRESH_HINT`]) so that a downstream notices a dead stream well before it
/// would refresh anyway.
pub const BEAT: Duration = Duration::from_secs(60);

/// One bundle watch's state.
#[derive(Debug)]
pub(super) struct Watcher {
    pub(super) auth: Authorizer,
    pub(super) bundles: watch::Receiver<Arc<TrustBundle>>,
    pub(super) revisions: watch::Receiver<u64>,
    pub(super) closing: Option<watch::Receiver<bool>>,
    pub(super) beat: Duration,
}

impl Watcher {
    /// Streams to `tx` until the caller goes away, is no longer authorized, or the server
    /// shuts down.
    pub(super) async fn run(
        mut self,
        caller: SpiffeId,
        peer: Option<PeerInfo>,
        known_sequence: u64,
        tx: mpsc::Sender<Result<types::Bundle, Status>>,
    ) {
        let lapse_at = peer
            .as_ref()
            .and_then(|p| p.svid.as_ref())
            .map_or(0, |s| s.not_after);
        let lapse = tokio::time::sleep_until(until_unix(lapse_at));
        tokio::pin!(lapse);
        let beat = tokio::time::sleep(self.beat);
        tokio::pin!(beat);
        // The last bundle sent; at first, what the caller says it holds (by sequence).
        let mut sent: Option<Arc<TrustBundle>> = None;
        let mut due = false;
        tracing::info!(%caller, known_sequence, "bundle watch opened");
        loop {
            if let Err(reason) = self.auth.authorize(peer.as_ref(), unix_now()) {
                tracing::info!(%caller, %reason, "bundle watch ended: no longer authorized");
                let _ = tx.send(Err(Status::permission_denied(reason))).await;
                return;
            }
            self.revisions.borrow_and_update();
            let current = self.bundles.borrow_and_update().clone();
            let changed = match &sent {
                Some(s) => **s != *current,
                None => current.sequence != known_sequence,
            };
            if changed || due {
                let msg = types::Bundle::from(current.as_ref());
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                tracing::debug!(%caller, sequence = current.sequence, beat = due && !changed, "bundle sent");
                sent = Some(current);
                due = false;
                beat.as_mut().reset(tokio::time::Instant::now() + self.beat);
            }
            tokio::select! {
                r = self.bundles.changed() => if r.is_err() { return },
                r = self.revisions.changed() => if r.is_err() { return },
                () = &mut beat => due = true,
                () = &mut lapse => {
                    // Checked above; should the clock disagree, again in a second.
                    lapse.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(1));
                }
                () = tx.closed() => return,
                () = shutting_down(self.closing.as_mut()) => {
                    let _ = tx.send(Err(Status::unavailable("the server is shutting down"))).await;
                    return;
                }
            }
        }
    }
}

fn until_unix(t: i64) -> tokio::time::Instant {
    let left = t.saturating_sub(unix_now()).max(0);
    tokio::time::Instant::now() + Duration::from_secs(left.unsigned_abs())
}

/// Completes when `closing` turns true; never without a receiver or once its sender
/// is gone without having said so.
async fn shutting_down(closing: Option<&mut watch::Receiver<bool>>) {
    if let Some(c) = closing {
        if c.wait_for(|c| *c).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await;
}
