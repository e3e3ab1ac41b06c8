//! The one small HTTP/1.1 server of both binaries, for read-only endpoints (the health
//! endpoint, the server's OIDC discovery endpoint), plain or over TLS, and its client.
//!
//! What it serves is a [`Routes`]: a path in, a [`Reply`] out. The server itself answers
//! 405 (with `Allow: GET, HEAD`) to any other method and sends HEAD replies without their
//! body, so a `Routes` only ever sees GETs. Every listener is bounded the same way: at
//! most [`MAX_CONNECTIONS`] connections at once (the next ones are closed at once), the
//! TLS handshake and then a request's headers must each arrive within
//! [`HEADER_TIMEOUT`], a connection lives at most [`CONNECTION_TIMEOUT`] and serves one
//! request (no keep-alive), and a stop ends every connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::listener::{AcceptBackoff, accept_with_backoff};

/// Most connections served at once, per listener.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to finish the TLS handshake, and then to send a request's
/// headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// `text/plain; charset=utf-8`.
pub const TEXT: &str = "text/plain; charset=utf-8";
/// `application/json`.
pub const JSON: &str = "application/json";

/// An answer: status, content type, extra headers and body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// Other headers (`Cache-Control`...).
    pub headers: Vec<(&'static str, String)>,
    /// The body (dropped for HEAD).
    pub body: Bytes,
}

impl Reply {
    /// A reply of `status` with a `text/plain` body.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: TEXT,
            headers: Vec::new(),
            body: Bytes::from(body.into()),
        }
    }

    /// A 200 reply with a JSON body.
    pub fn json(body: impl Into<Bytes>) -> Self {
        Reply {
            status: 200,
            content_type: JSON,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The reply with `content_type` instead.
    pub fn with_content_type(mut self, content_type: &'static str) -> Self {
        self.content_type = content_type;
        self
    }

    /// The reply with one more header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn into_response(self, head: bool) -> Response<Full<Bytes>> {
        let body = if head { Bytes::new() } else { self.body };
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        for (name, value) in self.headers {
            match HeaderValue::try_from(value) {
                Ok(v) => {
                    headers.append(HeaderName::from_static(name), v);
                }
                Err(e) => tracing::warn!(header = name, error = %e, "dropped a bad header value"),
            }
        }
        resp
    }
}

/// What a listener serves: the reply to a GET of a path (HEAD gets the same without the
/// body).
#[async_trait::async_trait]
pub trait Routes: Send + Sync + 'static {
    /// The reply to `GET path` (the request's path, without its query).
    async fn get(&self, path: &str) -> Reply;
}

async fn answer(routes: &dyn Routes, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return Reply::text(405, "only GET and HEAD\n")
            .with_header("allow", "GET, HEAD")
            .into_response(false);
    }
    routes.get(req.uri().path()).await.into_response(head)
}

/// Serves `routes` on `listener` (over TLS with `tls`, which should offer ALPN
/// `http/1.1`) until `stop` turns true. `name` names the endpoint in logs.
pub async fn serve(
    listener: TcpListener,
    name: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
    routes: Arc<dyn Routes>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = AcceptBackoff::new(name);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = tokio::select! {
            s = accept_with_backoff(&mut backoff, || listener.accept()) => s,
            _ = stop.changed() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, endpoint = name, "connection refused: too many at once");
            drop(stream);
            continue;
        };
        let routes = routes.clone();
        let acceptor = acceptor.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = async {
                match acceptor {
                    None => serve_connection(stream, routes).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => serve_connection(tls, routes).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, endpoint = name, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                tracing::debug!(%peer, endpoint = name, "TLS handshake timed out");
                            }
                        }
                    }
                }
            };
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {
                    if r.is_err() {
                        tracing::debug!(%peer, endpoint = name, "connection closed after {}s", CONNECTION_TIMEOUT.as_secs());
                    }
                }
                _ = stop.changed() => {}
            }
        });
    }
}

async fn serve_connection<I>(io: I, routes: Arc<dyn Routes>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let routes = routes.clone();
        async move { Ok::<_, Infallible>(answer(routes.as_ref(), req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "HTTP connection failed");
    }
}

/// A response as [`request`] returns it.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Fetched {
    /// The first value of header `name` (lower case), if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How [`request`] reaches a server over TLS: the client configuration and the name the
/// server's certificate must have.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The client configuration (its roots decide whom to trust).
    pub config: Arc<rustls::ClientConfig>,
    /// The server's name, as its certificate must hold it.
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// Sends `method path` to `addr` (over TLS with `tls`) and reads the whole answer, all
/// within `timeout`. `host` is the `Host` header. Errors name the address and what failed.
pub async fn request(
    addr: SocketAddr,
    tls: Option<&ClientTls>,
    method: &str,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<Fetched, String> {
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|e| format!("bad HTTP method {method:?}: {e}"))?;
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        match tls {
            None => send(stream, addr, method, host, path).await,
            Some(tls) => {
                let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
                send(stream, addr, method, host, path).await
            }
        }
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{addr} did not answer within {}s", timeout.as_secs()))?
}

async fn send<I>(
    io: I,
    addr: SocketAddr,
    method: Method,
    host: &str,
    path: &str,
) -> Result<Fetched, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("request to {addr}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{addr}: {e}"))?
        .to_bytes();
    Ok(Fetched {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    struct Hello;

    #[async_trait::async_trait]
    impl Routes for Hello {
        async fn get(&self, path: &str) -> Reply {
            Reply::text(200, format!("hello {path}\n")).with_header("cache-control", "no-store")
        }
    }

    async fn start() -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            "test endpoint",
            None,
            Arc::new(Hello),
            stop_rx,
        ));
        (addr, stop_tx)
    }

    async fn get(addr: SocketAddr, method: &str) -> Fetched {
        request(addr, None, method, "x", "/p?q", Duration::from_secs(5))
            .await
            .unwrap()
    }

    /// Reads until the peer closes; how long that took.
    async fn closed_after(mut s: tokio::net::TcpStream) -> Duration {
        let start = std::time::Instant::now();
        let mut buf = [0u8; 256];
        while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        start.elapsed()
    }

    #[tokio::test]
    async fn answers_get_and_head_and_refuses_other_methods() {
        let (addr, _stop) = start().await;
        let r = get(addr, "GET").await;
        assert_eq!((r.status, &r.body[..]), (200, &b"hello /p\n"[..]));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.header("content-type"), Some(TEXT));
        let r = get(addr, "HEAD").await;
        assert_eq!((r.status, r.body.len()), (200, 0));
        let r = get(addr, "POST").await;
        assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    }

    #[tokio::test]
    async fn connections_are_bounded_in_number_and_time() {
        let (addr, stop) = start().await;
        // MAX_CONNECTIONS silent clients hold every slot; the next one is closed at once.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_after(extra).await < Duration::from_secs(2));
        // A client that never sends its headers is closed after HEADER_TIMEOUT.
        let silent = held.pop().unwrap();
        let waited = closed_after(silent).await;
        assert!(
            waited >= HEADER_TIMEOUT - Duration::from_secs(1)
                && waited < HEADER_TIMEOUT + Duration::from_secs(3),
            "{waited:?}"
        );
        drop(held);
        // Slots come back; a stop closes what is open.
        let mut open = tokio::net::TcpStream::connect(addr).await.unwrap();
        open.write_all(b"GET /p HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(true).unwrap();
        assert!(closed_after(open).await < Duration::from_secs(2));
    }
}
