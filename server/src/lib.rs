//! The Carapace server: the identity authority of a SPIFFE trust domain.
//!
//! [`run`] wires everything: the datastore (SQLite or PostgreSQL), the key manager and node attestors
//! from the catalogs, the CA ([`ca::CaManager`]) with its rotator, the in-memory entry
//! index ([`entry_cache::EntryCache`]), the node API on TLS 1.3 ([`node_api`]) and the
//! admin API on a Unix socket and, for admin SVIDs, on the node API's port
//! ([`admin::api`]), and the optional health, OIDC discovery ([`oidc`]) and federation
//! bundle ([`federation::endpoint`]) endpoints. `main.rs` only parses the command line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ca;
pub mod catalog;
pub mod config;
pub mod datastore;
pub mod entry_cache;
mod error;
pub mod federation;
pub mod follow;
pub mod health;
pub mod jwt_keys;
pub mod listener;
pub mod metrics;
pub mod node_api;
pub mod node_attestor;
pub mod oidc;
pub mod server_svid;
pub mod sync_diff;
#[cfg(test)]
mod test_support;
pub mod upstream;
pub mod upstream_api;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use carapace_core::clock::SystemClock;

pub use error::{Error, Result};

use crate::ca::{CaManager, CaSettings};
use crate::catalog::PluginContext;
use crate::config::Config;
use crate::datastore::Datastore;
use crate::entry_cache::EntryCache;

/// How often expired entries and join tokens are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// How long closing the datastore may take at shutdown.
const DATASTORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Creates `dir` (and parents) with mode 0700 if missing, and refuses one that others
/// can read or write.
pub fn private_dir(dir: &Path, what: &str) -> Result<()> {
    carapace_common::ensure_private_dir(dir, what).map_err(Error::Config)
}

/// How long change-log events are kept: a server that falls further behind (cut off from
/// the database longer than this while running) reloads its whole index.
pub const CHANGE_LOG_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The file in the data directory that holds the server's id.
pub const SERVER_ID_FILE: &str = "server-id";

/// This server's id among the servers sharing a datastore: 32 lowercase hex digits in
/// `<data_dir>/server-id`, made (random, mode 0600) at the first start. Its CA journal and
/// its part of the trust bundle are stored under it, so a server keeps its own CA however
/// many share the database. Called with the data directory locked.
pub fn server_id(data_dir: &Path) -> Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let path = data_dir.join(SERVER_ID_FILE);
    let valid =
        |s: &str| s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match std::fs::read_to_string(&path) {
        Ok(text) if valid(text.trim_end()) => return Ok(text.trim_end().to_owned()),
        Ok(_) => {
            return Err(Error::Config(format!(
                "{} does not hold a server id (32 lowercase hex digits): restore it from a \
                 backup; deleting it makes this server a new one, whose old CA journal \
                 stays unused in the datastore",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
    }
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(Error::io(format!("creating {}", path.display())))?;
    file.write_all(format!("{id}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(Error::io(format!("writing {}", path.display())))?;
    tracing::info!(server_id = %id, "this server's id is new");
    Ok(id)
}

/// Runs the server until `shutdown` resolves. Everything that can fail at start-up
/// (data dir, datastore, key manager, CA, listening sockets) fails before anything is
/// served: the server never half-starts.
///
/// On `shutdown` it stops accepting, ends the sync streams, waits at most
/// `shutdown_grace` (default [`carapace_common::SHUTDOWN_GRACE`]) for open calls and
/// streams (then drops them),
/// closes the datastore and removes its admin socket (only if it is still the one it
/// bound). A second server on the same data directory refuses to start
/// ([`carapace_common::lock_data_dir`]).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    // Operator files that can be checked without state are checked before any is written.
    // (A key in the key manager is checked once the key manager is open, below.)
    let mut oidc_loaded = match &config.oidc_discovery {
        Some(oidc) if oidc.key_file().is_some() => Some(oidc::Loaded::load(oidc, None)?),
        _ => None,
    };
    let bundle_endpoint_loaded = match &config.federation.bundle_endpoint {
        Some(cfg) => Some(federation::endpoint::Loaded::load(cfg)?),
        None => None,
    };
    private_dir(&config.data_dir, "data directory")?;
    let _lock = carapace_common::lock_data_dir(&config.data_dir, "carapace-server")
        .map_err(Error::Config)?;
    let server_id = server_id(&config.data_dir)?;
    let ds = Datastore::connect(&config.datastore).await?;
    let ctx = PluginContext::new(
        config.trust_domain.clone(),
        config.data_dir.clone(),
        Arc::new(SystemClock),
    );
    let km = catalog::build_key_manager(&config.key_manager.0, &config.key_manager.1, &ctx)?;
    let km = metrics::metrics().sign_latency.wrap(km);
    if let Some(oidc) = config
        .oidc_discovery
        .as_ref()
        .filter(|o| o.key_file().is_none())
    {
        let key = oidc::key_of(oidc, &km).await?;
        oidc_loaded = Some(oidc::Loaded::load(oidc, key)?);
    }
    let upstream = match &config.upstream_authority {
        Some((name, table)) => {
            Some(catalog::build_upstream_authority(name, table, &ctx, ctx.clock.unix_now()).await?)
        }
        None => None,
    };
    let mut attestors = Vec::new();
    for (name, table) in &config.node_attestors {
        attestors.push(catalog::build_node_attestor(name, table, &ctx, &ds)?);
    }
    let ca = CaManager::load(
        config.trust_domain.clone(),
        km.clone(),
        upstream,
        ds.clone(),
        CaSettings {
            ca_ttl: config.ca_ttl,
            key_type: config.ca_key_type,
            organization: config.ca_organization.clone(),
            country: config.ca_country.clone(),
            jwt_key_type: config.jwt_key_type,
            server_id: server_id.clone(),
            path_len: config.downstream.as_ref().map_or(0, |d| d.max_depth),
        },
        ctx.clock.unix_now(),
    )
    .await?;
    let cache =
        EntryCache::load_with_attestors(config.trust_domain.clone(), ds.clone(), &attestors)
            .await?;
    federation::apply_config(&ds, &config.federation, ctx.clock.unix_now()).await?;
    let foreign_bundles = federation::bundles::ForeignBundles::load(ds.clone()).await?;

    let listener = tokio::net::TcpListener::bind(config.bind_address)
        .await
        .map_err(Error::io(format!(
            "cannot listen on {} for the node API",
            config.bind_address
        )))?;
    let health_listener = match config.health_address {
        Some(addr) => Some(
            carapace_common::health::bind(addr)
                .await
                .map_err(Error::Config)?,
        ),
        None => None,
    };
    let oidc_endpoint = match oidc_loaded {
        Some(loaded) => Some(loaded.bind(ca.bundle()).await?),
        None => None,
    };
    let bundle_endpoint = match bundle_endpoint_loaded {
        Some(loaded) => Some(loaded.bind(ca.bundle()).await?),
        None => None,
    };
    let admin_listener = admin::api::bind(&config.admin_socket)?;
    let admin_socket = carapace_common::OwnSocket::record(
        &config.admin_socket,
        std::os::fd::AsFd::as_fd(&admin_listener),
    )
    .map_err(Error::Config)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (server_cert, svid_task) = server_svid::start(
        ca.clone(),
        km.clone(),
        config.default_x509_svid_ttl,
        stop_rx.clone(),
    )
    .await?;
    let tls = carapace_tls::server_config(server_cert.clone(), ca.bundle())
        .map_err(|e| Error::Config(format!("TLS configuration: {e}")))?;

    let jwt_settings = jwt_keys::JwtSettings {
        default_ttl: config.default_jwt_svid_ttl,
        issuer: config.jwt_issuer.clone(),
    };
    let node = node_api::NodeApi::new(
        cache.clone(),
        ca.clone(),
        attestors,
        node_api::NodeApiSettings {
            default_x509_svid_ttl: config.default_x509_svid_ttl,
            agent_svid_ttl: config.agent_svid_ttl,
            jwt: jwt_settings.clone(),
        },
    )
    .with_required_together(config.node_attestation.clone())
    .with_max_attestations_in_flight(config.node_api.max_attestations_in_flight)
    .with_foreign_bundles(foreign_bundles.subscribe())
    .with_shutdown(stop_rx.clone());
    let refresher = federation::refresh::RefreshLoop::new(
        ds.clone(),
        ca.bundle(),
        federation::refresh::Bounds {
            floor: config.federation.refresh_floor,
            ceiling: config.federation.refresh_ceiling,
        },
        foreign_bundles.clone(),
    );
    let refresh_task = tokio::spawn(refresher.clone().run(stop_rx.clone()));
    let admin = admin::api::AdminApi::new(
        cache.clone(),
        ca.clone(),
        admin::api::AdminSettings {
            default_x509_svid_ttl: config.default_x509_svid_ttl,
            default_join_token_ttl: config::DEFAULT_JOIN_TOKEN_TTL,
            jwt: jwt_settings,
        },
    )
    .with_refresher(refresher.clone());
    let node_task = crate::listener::serve(
        listener,
        Arc::new(tls),
        node,
        admin::api::RemoteAdmin::new(admin.clone()),
        upstream_api::UpstreamApi::new(ca.clone(), cache.clone(), config.downstream.clone())
            .with_shutdown(stop_rx.clone()),
        config.node_api,
        stop_rx.clone(),
    );
    let admin_task = {
        let mut stop = stop_rx.clone();
        tokio::spawn(admin::api::serve(admin_listener, admin, async move {
            let _ = stop.changed().await;
        }))
    };
    let readiness = health::ServerReadiness::new(ca.clone(), cache.clone());
    let health_task = health_listener.map(|listener| {
        let (ca, cache) = (ca.clone(), cache.clone());
        let endpoint = carapace_common::health::Endpoint::new(
            metrics::metrics().registry(),
            Arc::new(readiness.clone()),
        )
        .with_before_scrape(Arc::new(move || metrics::refresh(&ca, &cache)));
        tokio::spawn(carapace_common::health::serve(
            listener,
            endpoint,
            stop_rx.clone(),
        ))
    });
    let oidc_task = oidc_endpoint.map(|e| tokio::spawn(e.serve(stop_rx.clone())));
    // https_spiffe presents the node API's resolver: renewed with the server SVID.
    let bundle_endpoint_task =
        bundle_endpoint.map(|e| tokio::spawn(e.serve(Some(server_cert.clone()), stop_rx.clone())));
    let rotator = tokio::spawn(ca.clone().run_rotator(stop_rx.clone()));
    // Nested servers: the upstream server's bundle, merged into this tier's.
    let upstream_follower = tokio::spawn(ca.clone().follow_upstream(stop_rx.clone()));
    let follower = tokio::spawn(follow::run(
        cache.clone(),
        ca.clone(),
        Some(follow::Federation {
            bundles: foreign_bundles.clone(),
            refresher: refresher.clone(),
        }),
        stop_rx.clone(),
    ));
    let pruner = {
        let cache = cache.clone();
        let clock = ctx.clock.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let now = clock.unix_now();
                match cache.prune_expired_entries(now).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(count = n, "pruned expired entries"),
                    Err(e) => tracing::warn!(error = %e, "pruning expired entries failed"),
                }
                if let Err(e) = cache.datastore().prune_expired_join_tokens(now).await {
                    tracing::warn!(error = %e, "pruning expired join tokens failed");
                }
                match cache
                    .datastore()
                    .prune_change_logs(now - CHANGE_LOG_RETENTION.as_secs() as i64)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(count = n, "pruned old change-log events"),
                    Err(e) => tracing::warn!(error = %e, "pruning the change logs failed"),
                }
            }
        })
    };

    tracing::info!(
        trust_domain = %config.trust_domain,
        node_api = %config.bind_address,
        admin_socket = %config.admin_socket.display(),
        data_dir = %config.data_dir.display(),
        datastore = %config.datastore,
        key_manager = km.name(),
        "carapace-server is ready"
    );
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let aborts = [
        node_task.abort_handle(),
        admin_task.abort_handle(),
        rotator.abort_handle(),
        upstream_follower.abort_handle(),
        follower.abort_handle(),
        refresh_task.abort_handle(),
        pruner.abort_handle(),
        svid_task.abort_handle(),
    ]
    .into_iter()
    .chain(health_task.as_ref().map(|t| t.abort_handle()))
    .chain(oidc_task.as_ref().map(|t| t.abort_handle()))
    .chain(bundle_endpoint_task.as_ref().map(|t| t.abort_handle()))
    .collect::<Vec<_>>();
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        let _ = node_task.await;
        let _ = admin_task.await;
        let _ = rotator.await;
        let _ = upstream_follower.await;
        let _ = follower.await;
        let _ = refresh_task.await;
        let _ = pruner.await;
        let _ = svid_task.await;
        if let Some(t) = health_task {
            let _ = t.await;
        }
        if let Some(t) = oidc_task {
            let _ = t.await;
        }
        if let Some(t) = bundle_endpoint_task {
            let _ = t.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace = ?config.shutdown_grace,
            "calls or streams still open after the shutdown grace period; closing them"
        );
        for a in &aborts {
            a.abort();
        }
    }
    // Writes are transactions; closing lets SQLite finish cleanly (WAL checkpoint) and
    // ends PostgreSQL sessions (releasing any lock they hold) at once.
    if tokio::time::timeout(DATASTORE_CLOSE_TIMEOUT, ds.close())
        .await
        .is_err()
    {
        tracing::warn!("the datastore did not close in time; its transactions are intact");
    }
    admin_socket.remove();
    tracing::info!("stopped");
    Ok(())
}
