//! Keeps this server's entry index and trust bundle current with what the other servers
//! sharing its PostgreSQL datastore commit (and with its own writes, harmlessly).
//!
//! Woken by the notification every committed write sends (`LISTEN`), which names what
//! changed: the change logs (read from this server's cursor, [`EntryCache::follow`]) or
//! the bundle (read again, [`CaManager::refresh_bundle`]). In any case both are read once
//! a [`POLL_INTERVAL`]: a lost notification (the listening connection dropped) delays a
//! change by at most that much, never loses it. On SQLite, whose database no other server
//! shares, there is nothing to follow and the task ends at once.
//!
//! A notification also says when federation relationships or foreign bundles changed
//! ([`Woken::federation`]); nothing here holds them yet, so that is not acted on (the
//! federation refresh loop and the agents' sync are to be woken by it, issue 19).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::ca::CaManager;
use crate::datastore::{ChangeListener, Woken};
use crate::entry_cache::EntryCache;

/// The longest a change committed by another server waits to be applied here.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Follows the datastore until `shutdown` changes.
pub async fn run(cache: Arc<EntryCache>, ca: Arc<CaManager>, mut shutdown: watch::Receiver<bool>) {
    let ds = cache.datastore().clone();
    let mut listener: Option<ChangeListener> = match ds.change_listener().await {
        Ok(None) => return,
        Ok(Some(l)) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "not notified of other servers' changes; polling every second");
            None
        }
    };
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        // What to re-read: a notification names it, a poll re-reads both.
        let woken = tokio::select! {
            woke = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match woke {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the datastore notifications; polling until they are back");
                        listener = None;
                        continue;
                    }
                }
            }
            _ = poll.tick() => {
                if listener.is_none() {
                    listener = ds.change_listener().await.ok().flatten();
                }
                Woken { logs: true, bundle: true, federation: true }
            }
            _ = shutdown.changed() => return,
        };
        let followed = if woken.logs {
            cache.follow().await.map(drop)
        } else {
            Ok(())
        };
        let refreshed = if woken.bundle {
            ca.refresh_bundle().await.map(drop)
        } else {
            Ok(())
        };
        match (followed, refreshed) {
            (Ok(()), Ok(())) => {
                if failing {
                    tracing::info!("following the datastore again");
                    failing = false;
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                if !failing {
                    tracing::warn!(error = %e, "could not apply the datastore's changes; retrying");
                    failing = true;
                }
            }
        }
    }
}
