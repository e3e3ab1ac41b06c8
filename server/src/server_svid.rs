//! The server's own X509-SVID (`spiffe://<td>/spire/server`) for the node API's TLS.
//!
//! Its key is a KeyManager key (`server-tls`), so with an HSM the TLS handshake signs
//! inside the token. The SVID is renewed at half its life and whenever the active CA
//! changes; rustls picks up the new one on the next handshake.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use carapace_core::clock::unix_now;
use carapace_core::plugin::{KeyManager, KeySigner};
use carapace_core::{Error as CoreError, KeyType};
use carapace_tls::{FixedCert, certified_key};

use crate::Result;
use crate::ca::{CaManager, IssuedSvid, SubjectKey};

/// KeyManager id of the server's TLS key.
pub const SERVER_TLS_KEY_ID: &str = "server-tls";

async fn tls_key(km: &dyn KeyManager) -> Result<Arc<dyn KeySigner>> {
    match km.get_key(SERVER_TLS_KEY_ID).await {
        Ok(k) => Ok(k),
        Err(CoreError::KeyNotFound(_)) => {
            Ok(km.generate_key(SERVER_TLS_KEY_ID, KeyType::EcP256).await?)
        }
        Err(e) => Err(e.into()),
    }
}

async fn issue(ca: &Arc<CaManager>, key: &Arc<dyn KeySigner>, ttl: Duration) -> Result<IssuedSvid> {
    let id = ca.trust_domain().server_id();
    let svid = ca
        .issue_x509_svid(
            id,
            SubjectKey::from_spki(key.public_key_der())?,
            ttl,
            Vec::new(),
            unix_now(),
        )
        .await;
    crate::metrics::metrics()
        .svids_issued
        .record("x509_server", svid.is_ok(), 1);
    svid
}

/// Issues the first server SVID and returns the resolver rustls uses, plus the task
/// that keeps it fresh.
pub async fn start(
    ca: Arc<CaManager>,
    km: Arc<dyn KeyManager>,
    ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(Arc<FixedCert>, tokio::task::JoinHandle<()>)> {
    let key = tls_key(km.as_ref()).await?;
    let svid = issue(&ca, &key, ttl).await?;
    let resolver = Arc::new(FixedCert(RwLock::new(certified_key(
        &svid.chain,
        key.clone(),
    ))));
    let r = resolver.clone();
    let task = tokio::spawn(async move {
        let mut bundle = ca.bundle();
        let mut active_key = ca.active().map(|a| a.key_id.clone()).unwrap_or_default();
        let half_life = |expires_at: i64| {
            let now = unix_now();
            now + (expires_at - now).max(2) / 2
        };
        let mut renew_at = half_life(svid.expires_at);
        loop {
            let wait = Duration::from_secs((renew_at - unix_now()).max(0) as u64);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = bundle.changed() => {
                    if changed.is_err() { return; }
                    let now_key = ca.active().map(|a| a.key_id.clone()).unwrap_or_default();
                    if now_key == active_key { continue; }
                    active_key = now_key;
                }
                _ = shutdown.changed() => return,
            }
            match issue(&ca, &key, ttl).await {
                Ok(s) => {
                    renew_at = half_life(s.expires_at);
                    *r.0.write().unwrap_or_else(|p| p.into_inner()) =
                        certified_key(&s.chain, key.clone());
                    tracing::info!(expires_at = s.expires_at, "renewed the server SVID");
                }
                Err(e) => {
                    tracing::error!(error = %e, "renewing the server SVID failed; retrying in 10s");
                    renew_at = unix_now() + 10;
                }
            }
        }
    });
    Ok((resolver, task))
}
