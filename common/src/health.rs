//! The health and metrics endpoint both binaries serve when `[health]` is configured (or
//! `--health-address` is given): a small HTTP/1.1 listener, loopback by default, with
//!
//! - `GET /live`: 200 while the process's runtime answers (it says nothing about whether
//!   the process can do its job: restart on this, do not route on it);
//! - `GET /ready`: 200 `ready` when every readiness check passes, otherwise 503 with one
//!   line per failing reason ([`Readiness`]): route and alert on this;
//! - `GET /metrics`: the process's metrics in the OpenMetrics text format, encoded by
//!   `prometheus-client` (which Prometheus and `prometheus_client.parser` read).
//!
//! Anything else is 404 (405 for a method other than GET or HEAD). It is served by
//! [`crate::http`], bounded like every listener there: at most [`MAX_CONNECTIONS`]
//! connections at once (the next ones are closed at once), a request's headers must
//! arrive within [`HEADER_TIMEOUT`], and a connection lives at most
//! [`CONNECTION_TIMEOUT`]. It serves no secrets: readiness reasons and metrics carry no
//! SPIFFE IDs, keys or tokens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::Reply;
pub use crate::http::{CONNECTION_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS};
/// How long the readiness checks may take together before `/ready` answers 503.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// The content type of `/metrics` (OpenMetrics text, which Prometheus negotiates).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `[health]` in a config file. The section's presence turns the endpoint on.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// HOST:PORT to listen on (default: the binary's loopback address).
    pub bind_address: Option<String>,
}

/// The address the endpoint listens on, or `None` when it is off: `--health-address`
/// (`flag`) wins over `[health] bind_address`; a `[health]` section without an address
/// listens on `default` (a loopback address). A bad address is a problem naming the key.
pub fn resolve_address(
    file: Option<&HealthFile>,
    flag: Option<&str>,
    default: &str,
    problems: &mut Vec<String>,
) -> Option<SocketAddr> {
    let (key, text) = match (flag, file) {
        (Some(f), _) => ("--health-address", f),
        (
            None,
            Some(HealthFile {
                bind_address: Some(a),
            }),
        ) => ("health.bind_address", a.as_str()),
        (None, Some(_)) => ("health.bind_address", default),
        (None, None) => return None,
    };
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(e) => {
            problems.push(format!("{key}: {text:?} is not HOST:PORT ({e})"));
            None
        }
    }
}

/// What makes a process ready. `not_ready` returns one human-readable reason per failing
/// check (empty: ready); each names what failed and, where it helps, what to do.
#[async_trait::async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// The failing reasons; empty when the process can do its job.
    async fn not_ready(&self) -> Vec<String>;
}

/// Refreshes gauges computed from state (counts, expiry times) just before a scrape.
pub type BeforeScrape = Arc<dyn Fn() + Send + Sync>;

/// What the endpoint serves.
#[derive(Clone)]
pub struct Endpoint {
    registry: &'static Registry,
    readiness: Arc<dyn Readiness>,
    before_scrape: Option<BeforeScrape>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Serves `registry` on `/metrics` and `readiness` on `/ready`.
    pub fn new(registry: &'static Registry, readiness: Arc<dyn Readiness>) -> Self {
        Endpoint {
            registry,
            readiness,
            before_scrape: None,
        }
    }

    /// Calls `f` before each scrape of `/metrics`.
    pub fn with_before_scrape(mut self, f: BeforeScrape) -> Self {
        self.before_scrape = Some(f);
        self
    }

    /// The readiness reasons, with [`READY_TIMEOUT`] as a reason of its own.
    pub async fn not_ready(&self) -> Vec<String> {
        match tokio::time::timeout(READY_TIMEOUT, self.readiness.not_ready()).await {
            Ok(reasons) => reasons,
            Err(_) => vec![format!(
                "the readiness checks did not finish within {}s",
                READY_TIMEOUT.as_secs()
            )],
        }
    }

    /// The OpenMetrics exposition of the registry.
    pub fn metrics_text(&self) -> String {
        if let Some(f) = &self.before_scrape {
            f();
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, self.registry) {
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        out
    }
}

#[async_trait::async_trait]
impl crate::http::Routes for Endpoint {
    async fn get(&self, path: &str) -> Reply {
        match path {
            "/live" => Reply::text(200, "live\n"),
            "/ready" => {
                let reasons = self.not_ready().await;
                if reasons.is_empty() {
                    Reply::text(200, "ready\n")
                } else {
                    let mut body = String::from("not ready:\n");
                    for r in reasons {
                        body.push_str(&r);
                        body.push('\n');
                    }
                    Reply::text(503, body)
                }
            }
            "/metrics" => {
                Reply::text(200, self.metrics_text()).with_content_type(METRICS_CONTENT_TYPE)
            }
            _ => Reply::text(404, "not found: /live, /ready and /metrics are served\n"),
        }
    }
}

/// Binds the endpoint's TCP listener; the error names the address and what to do.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen on {addr} for the health endpoint ([health] bind_address): {e}")
    })
}

/// Serves `endpoint` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, stop: watch::Receiver<bool>) {
    if let Ok(addr) = listener.local_addr() {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the health endpoint listens beyond loopback: anyone who reaches it sees the metrics");
        }
        tracing::info!(%addr, "health endpoint: /live, /ready, /metrics");
    }
    crate::http::serve(listener, "health endpoint", None, Arc::new(endpoint), stop).await;
}

/// GETs `path` from a health endpoint at `addr` (what the `healthcheck` commands do):
/// the status code and the body, within [`READY_TIMEOUT`] plus a second.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let resp = crate::http::request(
        addr,
        None,
        "GET",
        &addr.to_string(),
        path,
        READY_TIMEOUT + Duration::from_secs(1),
    )
    .await
    .map_err(|e| format!("health endpoint: {e}"))?;
    Ok((
        resp.status,
        String::from_utf8_lossy(&resp.body).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_a_bare_section_listens_on_the_default_and_bad_addresses_are_named() {
        let mut p = Vec::new();
        assert_eq!(resolve_address(None, None, "127.0.0.1:8080", &mut p), None);
        let bare = HealthFile::default();
        assert_eq!(
            resolve_address(Some(&bare), None, "127.0.0.1:8080", &mut p),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        let set = HealthFile {
            bind_address: Some("127.0.0.1:9000".into()),
        };
        assert_eq!(
            resolve_address(Some(&set), Some("[::1]:9100"), "127.0.0.1:8080", &mut p),
            Some("[::1]:9100".parse().unwrap())
        );
        assert!(p.is_empty());
        let bad = HealthFile {
            bind_address: Some("localhost".into()),
        };
        assert_eq!(
            resolve_address(Some(&bad), None, "127.0.0.1:8080", &mut p),
            None
        );
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("health.bind_address: \"localhost\""),
            "{p:?}"
        );
    }
}
