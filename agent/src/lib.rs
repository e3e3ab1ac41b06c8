//! The Carapace agent: attests its node to the server, keeps the SVIDs of the workloads
//! registered on it, and serves them over the SPIFFE Workload API.
//!
//! [`run`] binds the Workload API socket, restores or attests the agent's identity
//! ([`manager::Manager::start`]), then runs the manager (sync, signing, rotation) and the
//! Workload API ([`workload_api`]) side by side. The Workload API reads only the
//! [`cache::SvidCache`]: it keeps serving while the server is unreachable.
#![deny(unsafe_code)]

pub mod api_cli;
pub mod cache;
pub mod catalog;
pub mod config;
mod error;
pub mod join_token;
pub mod manager;
pub mod node_client;
pub mod state;
pub mod workload_api;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use carapace_core::TrustBundle;

pub use error::{Error, Result};

use crate::cache::SvidCache;
use crate::config::Config;
use crate::workload_api::WorkloadApi;

/// Runs the agent until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    carapace_common::ensure_private_dir(&cfg.data_dir, "data directory").map_err(Error::Config)?;
    let km = catalog::build_key_manager(&cfg.key_manager.0, &cfg.key_manager.1, &cfg.data_dir)?;
    let attestors = catalog::build_workload_attestors(&cfg.workload_attestors)?;
    let attestor = catalog::build_node_attestor(
        &cfg.node_attestor.0,
        &cfg.node_attestor.1,
        cfg.join_token.clone(),
    )?;
    let listener = workload_api::bind(&cfg.socket_path)?;
    let cache = SvidCache::new(Arc::new(TrustBundle::new(cfg.trust_domain.clone())));
    let (stop_tx, stop_rx) = watch::channel(false);
    let api = WorkloadApi::new(cache.clone(), attestors)
        .with_attestation_timeout(cfg.workload_attestation_timeout)
        .with_connection_limits(cfg.workload_api_limits);
    let socket_path = cfg.socket_path.clone();
    let api_task = {
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            workload_api::serve_listener(listener, &socket_path, api, async move {
                let _ = stop.changed().await;
            })
            .await
        })
    };

    tokio::pin!(shutdown);
    let manager = tokio::select! {
        m = manager::Manager::start(cfg.clone(), km, cache, attestor) => m,
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            let _ = api_task.await;
            return Ok(());
        }
    };
    let manager = match manager {
        Ok(m) => m,
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = api_task.await;
            return Err(e);
        }
    };
    tracing::info!(
        agent = %manager.agent_id().map(|i| i.to_string()).unwrap_or_default(),
        socket = %cfg.socket_path.display(),
        server = %cfg.server_address,
        "carapace-agent is ready"
    );
    let manager_task = tokio::spawn(manager.run(stop_rx.clone()));
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = manager_task.await;
    match api_task.await {
        Ok(r) => r,
        Err(e) => Err(Error::Workload(format!("Workload API task failed: {e}"))),
    }
}
