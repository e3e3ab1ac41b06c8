//! A loopback HTTP server that plays an instance metadata service: the test gives it a
//! handler (method, path and query, headers → status and body) and reads back what was
//! asked. It speaks real HTTP/1.1 (hyper), so the agent's metadata client is exercised
//! exactly as against the provider's service.
#![allow(dead_code, reason = "each test file uses part of it")]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One request the server received.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    /// `GET`, `PUT`, ...
    pub(crate) method: String,
    /// The path with its query (`/latest/api/token`, `/a?b=c`).
    pub(crate) path_and_query: String,
    /// Header names in lowercase → value.
    pub(crate) headers: BTreeMap<String, String>,
}

impl Seen {
    /// The value of header `name` (lowercase).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// The handler: a request → (status, body).
pub(crate) type Handler = Arc<dyn Fn(&Seen) -> (u16, Vec<u8>) + Send + Sync>;

/// A running loopback metadata server; stops when dropped.
pub(crate) struct MetadataServer {
    /// `http://127.0.0.1:<port>`: the base URL to configure.
    pub(crate) url: String,
    /// Every request received, in order.
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MetadataServer {
    /// Starts serving `handler` on a free loopback port.
    pub(crate) async fn start(handler: Handler) -> MetadataServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = Seen {
                            method: req.method().as_str().to_owned(),
                            path_and_query: req
                                .uri()
                                .path_and_query()
                                .map(|p| p.as_str().to_owned())
                                .unwrap_or_default(),
                            headers: req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.as_str().to_owned(),
                                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                    )
                                })
                                .collect(),
                        };
                        let (status, body) = handler(&seen);
                        log.lock().unwrap().push(seen);
                        async move {
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MetadataServer {
            url: format!("http://{addr}"),
            seen,
            task,
        }
    }

    /// The requests received so far.
    pub(crate) fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A fixed 32-byte TLS exporter and an agent key for attestation contexts in tests.
pub(crate) fn context() -> carapace_core::plugin::AttestationContext {
    carapace_core::plugin::AttestationContext {
        agent_public_key: vec![0x30, 0x00],
        tls_exporter: vec![7; 32],
    }
}

/// One attestation by a plugin that never challenges (all three cloud plugins): `begin`
/// must finish it.
pub(crate) async fn attest_once(
    att: &dyn carapace_core::plugin::NodeAttestor,
    payload: &[u8],
) -> Result<carapace_core::plugin::AttestationResult, carapace_core::Error> {
    match att.begin(payload, &context()).await? {
        carapace_core::plugin::AttestationStep::Done(r) => Ok(r),
        carapace_core::plugin::AttestationStep::Challenge { .. } => {
            panic!("{} never challenges", att.name())
        }
    }
}

/// Deletes from `store` the record `att` names for evicting `agent_path` (what the
/// server's eviction does), then checks that `payload` is admitted once more, and once
/// only.
pub(crate) async fn readmitted_once_after_eviction(
    att: &dyn carapace_core::plugin::NodeAttestor,
    store: &carapace_core::plugin::MemoryStateStore,
    agent_path: &str,
    payload: &[u8],
) {
    let key = att
        .forget_on_eviction(agent_path)
        .expect("a first-use record to forget");
    assert!(store.remove(&key), "no record under {key:?}");
    attest_once(att, payload)
        .await
        .expect("admitted after eviction");
    let err = attest_once(att, payload).await.unwrap_err();
    assert!(
        matches!(err, carapace_core::Error::AttestationReplay(_)),
        "{err:?}"
    );
}

/// The message of a rejection (not a replay, not unavailable) that contains `want`.
pub(crate) fn rejected_with(
    result: Result<carapace_core::plugin::AttestationResult, carapace_core::Error>,
    want: &str,
) -> String {
    let err = result.unwrap_err();
    assert!(
        matches!(err, carapace_core::Error::AttestationRejected(_)),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(want), "expected {want:?} in: {msg}");
    msg
}

/// The selectors of a result, as `type:value` strings.
pub(crate) fn selectors(r: &carapace_core::plugin::AttestationResult) -> Vec<String> {
    r.selectors.iter().map(ToString::to_string).collect()
}
