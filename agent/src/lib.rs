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
pub mod health;
pub mod jwt_cache;
pub mod manager;

/// The agent runtime's bound on blocking threads: requests whose attestation finds every
/// one busy wait for one, within `workload_attestation_timeout`. A caller that can make
/// `/proc` reads hang (a process stuck in the kernel) holds one thread per request until
/// the read returns; the bound keeps such a caller from growing the agent without limit,
/// and its own connections are bounded by `max_connections_per_uid`.
pub const MAX_BLOCKING_THREADS: usize = 64;
pub mod memory;
pub mod metrics;
pub mod node_attestor;
pub mod node_client;
pub mod state;
pub mod sync;
pub mod workload_api;
pub mod workload_attestor;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use carapace_core::TrustBundle;

pub use error::{Error, Result};

use crate::cache::SvidCache;
use crate::config::Config;
use crate::workload_api::WorkloadApi;

/// Runs the agent until `shutdown` resolves.
///
/// A second agent on the same data directory refuses to start
/// ([`carapace_common::lock_data_dir`]), and none takes over a Workload API socket that
/// still answers. On `shutdown` the Workload API streams and the sync stream end, and the
/// agent waits at most `shutdown_grace` (default [`carapace_common::SHUTDOWN_GRACE`]) for
/// them before it drops what
/// is left; it then removes its socket, if that is still the one it bound.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    // Every configuration problem before anything is created, bound or contacted.
    let problems = cfg.check_files();
    if !problems.is_empty() {
        return Err(Error::Config(problems.join("; ")));
    }
    carapace_common::ensure_private_dir(&cfg.data_dir, "data directory").map_err(Error::Config)?;
    let _lock =
        carapace_common::lock_data_dir(&cfg.data_dir, "carapace-agent").map_err(Error::Config)?;
    let km = catalog::build_key_manager(&cfg.key_manager.0, &cfg.key_manager.1, &cfg.data_dir)?;
    let km = metrics::metrics().sign_latency.wrap(km);
    let workload_keys = catalog::build_workload_keys();
    let attestors = catalog::build_workload_attestors(&cfg.workload_attestors)?;
    let attestor = catalog::build_node_attestors(&cfg.node_attestors, cfg.join_token.clone())?;
    let health_listener = match cfg.health_address {
        Some(addr) => Some(
            carapace_common::health::bind(addr)
                .await
                .map_err(Error::Config)?,
        ),
        None => None,
    };
    let listener = workload_api::bind(&cfg.socket_path)?;
    let socket =
        carapace_common::OwnSocket::record(&cfg.socket_path, std::os::fd::AsFd::as_fd(&listener))
            .map_err(Error::Config)?;
    let cache = SvidCache::new(Arc::new(TrustBundle::new(cfg.trust_domain.clone())));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (server_link_tx, server_link) = node_client::ServerLink::new();
    let api = WorkloadApi::new(cache.clone(), attestors)
        .with_server(server_link, jwt_cache::DEFAULT_CAPACITY)
        .with_attestation_timeout(cfg.workload_attestation_timeout)
        .with_connection_limits(cfg.workload_api_limits)
        .with_sds(cfg.sds.clone())
        .with_drain_timeout(cfg.shutdown_grace);
    if let Some(listener) = health_listener {
        let refresh_cache = cache.clone();
        let endpoint = carapace_common::health::Endpoint::new(
            metrics::metrics().registry(),
            Arc::new(health::AgentReadiness::new(cfg.socket_path.clone())),
        )
        .with_before_scrape(Arc::new(move || metrics::metrics().refresh(&refresh_cache)));
        // Ends with the stop signal; nothing to drain.
        tokio::spawn(carapace_common::health::serve(
            listener,
            endpoint,
            stop_rx.clone(),
        ));
    }
    tokio::spawn(memory::trim_periodically(stop_rx.clone()));
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
        m = manager::Manager::start(cfg.clone(), km, workload_keys, cache, attestor) => m,
        _ = &mut shutdown => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            let r = stop_within_grace(cfg.shutdown_grace, None, api_task).await;
            socket.remove();
            return r;
        }
    };
    let manager = match manager {
        Ok(m) => m.with_server_link(server_link_tx),
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = stop_within_grace(cfg.shutdown_grace, None, api_task).await;
            socket.remove();
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
    let r = stop_within_grace(cfg.shutdown_grace, Some(manager_task), api_task).await;
    socket.remove();
    tracing::info!("stopped");
    r
}

/// Waits for the manager and the Workload API to stop, at most `grace`; then drops them.
async fn stop_within_grace(
    grace: std::time::Duration,
    manager: Option<tokio::task::JoinHandle<Result<()>>>,
    api: tokio::task::JoinHandle<Result<()>>,
) -> Result<()> {
    let aborts: Vec<_> = manager
        .iter()
        .map(|m| m.abort_handle())
        .chain([api.abort_handle()])
        .collect();
    let stopped = tokio::time::timeout(grace, async {
        if let Some(m) = manager {
            let _ = m.await;
        }
        api.await
    })
    .await;
    match stopped {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(Error::Workload(format!("Workload API task failed: {e}"))),
        Err(_) => {
            tracing::warn!(
                ?grace,
                "still busy after the shutdown grace period; stopping anyway"
            );
            for a in &aborts {
                a.abort();
            }
            Ok(())
        }
    }
}
