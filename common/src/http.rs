//! The one small HTTP/1.1 server of both binaries, for read-only endpoints (the health
//! endpoint, the server's OIDC discovery endpoint), plain or over TLS, and its clients:
//! [`request`] (to a known address, for probes and tests) and [`https_get`] (an
//! `https://` URL as configured: a peer trust domain's bundle endpoint).
//!
//! What it serves is a [`Routes`]: a path in, a [`Reply`] out. The server itself answers
//! 405 (with `Allow: GET, HEAD`) to any other method and sends HEAD replies without their
//! body, so a `Routes` only ever sees GETs. Every listener is bounded the same way: at
//! most [`MAX_CONNECTIONS`] connections at once (the next ones are closed at once), the
//! TLS handshake and then a request's headers must each arrive within
//! [`HEADER_TIMEOUT`], a connection lives at most [`CONNECTION_TIMEOUT`] and serves one
//! request (no keep-alive), and a stop ends every connection.
//!
//! [`https_get`] is hardened for URLs an operator typed and servers Carapace does not run:
//! `https://` only ([`HttpsUrl`]: no user info, no fragment), one request per connection
//! (HTTP/1.1, TLS 1.3 or 1.2 as the caller's configuration allows, SNI the URL's host), a
//! deadline on the whole exchange (name lookup included), a cap on the body (a larger one
//! is refused without reading it all: at once when `Content-Length` says so), the body of
//! an answer other than 2xx never read, no redirect followed and no proxy used.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
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

/// The largest body [`request`] reads.
pub const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

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

/// Sends `method path` to `addr` (over TLS with `tls`) and reads the whole answer (a body
/// of at most [`MAX_REQUEST_BODY`]), all within `timeout`. `host` is the `Host` header.
/// Errors name the address and what failed.
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
        let answer = match tls {
            None => exchange(stream, method, host, path, |_| true, MAX_REQUEST_BODY).await,
            Some(tls) => {
                let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
                exchange(stream, method, host, path, |_| true, MAX_REQUEST_BODY).await
            }
        }
        .map_err(|e| format!("{addr}: {e}"))?;
        Ok(Fetched {
            status: answer.status.as_u16(),
            headers: answer.headers,
            body: answer.body,
        })
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{addr} did not answer within {}s", timeout.as_secs()))?
}

/// Aborts a spawned task when dropped (a connection's driver, on every way out).
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An answer as [`exchange`] read it.
struct Answer {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: Bytes,
}

/// One HTTP/1.1 request on `io` and its answer; the body is read only when
/// `read_body(status)`, and at most `max_body` bytes of it. Errors say what failed; the
/// caller names the server.
async fn exchange<I>(
    io: I,
    method: Method,
    host: &str,
    target: &str,
    read_body: fn(StatusCode) -> bool,
    max_body: usize,
) -> Result<Answer, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let _driver = AbortOnDrop(tokio::spawn(conn).abort_handle());
    let req = Request::builder()
        .method(method)
        .uri(target)
        .header(header::HOST, host)
        .header(header::USER_AGENT, "carapace")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let status = resp.status();
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
    if !read_body(status) {
        return Ok(Answer {
            status,
            headers,
            body: Bytes::new(),
        });
    }
    let declared = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > max_body as u64) {
        return Err(format!(
            "the body is {len} bytes (Content-Length), more than the {max_body} allowed"
        ));
    }
    let body = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("the body is larger than the {max_body} bytes allowed")
            } else {
                format!("reading the body: {e}")
            }
        })?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// A parsed `https://host[:port][/path][?query]` URL: what [`https_get`] fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    /// As configured, for messages.
    text: String,
    /// The host, without brackets for IPv6.
    host: String,
    port: u16,
    /// Origin-form request target: `/path?query`.
    target: String,
    server_name: ServerName<'static>,
}

impl std::fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl HttpsUrl {
    /// Parses `url`: `https://` only (plain `http://` is refused: what comes over it is
    /// not authenticated), printable ASCII, no user info, no fragment; the port defaults
    /// to 443 and the path to `/`. Errors quote the URL and name what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        let shown = carapace_core::jose::shown(url);
        let Some(rest) = url.strip_prefix("https://") else {
            if url
                .get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
            {
                return Err(format!(
                    "{shown}: plain http:// is refused: only authenticated HTTPS \
                     (https://...) is fetched"
                ));
            }
            return Err(format!("{shown}: the URL must start with https://"));
        };
        if !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{shown}: spaces, control or non-ASCII characters (percent-encode them)"
            ));
        }
        if url.contains('#') {
            return Err(format!("{shown}: a URL with a #fragment"));
        }
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "{shown}: user info (user@host) is not supported; credentials do not belong \
                 in the URL"
            ));
        }
        let (host, port) = host_and_port(authority, 443, &shown)?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{shown}: the host is not a DNS name or an IP address: {e}"))?;
        if authority.starts_with('[') && !matches!(server_name, ServerName::IpAddress(_)) {
            return Err(format!("{shown}: [{host}] is not an IPv6 address"));
        }
        let target = if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("/{target}")
        };
        target
            .parse::<http::Uri>()
            .map_err(|e| format!("{shown}: the path is not usable: {e}"))?;
        Ok(HttpsUrl {
            text: url.to_owned(),
            host: host.to_owned(),
            port,
            target,
            server_name,
        })
    }

    /// The host, without brackets for IPv6.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (443 unless the URL names one).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The request target: `/path?query`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The host as TLS names it (SNI, and what a Web PKI certificate must hold).
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// The `Host` header: the host, with the port unless it is 443.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Splits `host[:port]` or `[v6][:port]`.
fn host_and_port<'a>(
    authority: &'a str,
    default_port: u16,
    shown: &str,
) -> Result<(&'a str, u16), String> {
    let port_of = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{shown}: port {p:?} is not a port number"))
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{shown}: unclosed [ in the host"))?;
        match after {
            "" => (host, default_port),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, port_of(p)?),
                None => return Err(format!("{shown}: junk after the IPv6 address")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (authority, default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("{shown}: no host"));
    }
    Ok((host, port))
}

/// The PEM certificates of `pem` as trust roots; at least one is required. `what` names
/// where they come from in errors.
pub fn roots_from_pem(pem: &[u8], what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let cert = cert.map_err(|e| format!("{what}: PEM block {i}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{what}: certificate {i} is not a usable trust anchor: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{what}: no PEM CERTIFICATE in it"));
    }
    Ok(roots)
}

/// The system's trust roots (as `rustls-native-certs` finds them: on Linux the
/// distribution's CA bundle, or `SSL_CERT_FILE`/`SSL_CERT_DIR`); at least one is required.
pub fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
    if added == 0 {
        return Err(format!(
            "no usable certificate in the system trust store ({ignored} unusable{}{}); \
             configure the CA that issued the server's certificate",
            if errors.is_empty() { "" } else { "; " },
            errors.join("; ")
        ));
    }
    if ignored > 0 || !errors.is_empty() {
        tracing::debug!(
            added,
            ignored,
            ?errors,
            "some system trust roots were not usable"
        );
    }
    Ok(roots)
}

/// A client configuration verifying servers by Web PKI (webpki, the name [`https_get`]
/// connects to) against `roots`: TLS 1.3 or 1.2, ring, ALPN `http/1.1`, no client
/// certificate.
pub fn webpki_client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, String> {
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| format!("TLS settings: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// A TLS handshake failure for a person: rustls shows a verifier's own error (an
/// X509-SVID refused, say) only as its debug form, so that one is shown as its text.
fn tls_error(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Other(other))) => {
            format!("invalid peer certificate: {other}")
        }
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "invalid peer certificate: issued by no trusted CA (UnknownIssuer)".to_owned()
        }
        _ => e.to_string(),
    }
}

/// An answer as [`https_get`] returns it.
#[derive(Debug, Clone)]
pub struct HttpsResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body of a 2xx answer; empty for any other (whose body is not read).
    pub body: Bytes,
    /// The certificate chain the server presented, leaf first (as the client's
    /// configuration verified it).
    pub peer_certificates: Vec<CertificateDer<'static>>,
}

impl HttpsResponse {
    /// The first value of header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET url` over TLS with `tls` (whose verifier decides whom to trust; it is handed
/// the URL's host), all within `timeout`: name lookup, connection, handshake, request
/// and a body of at most `max_body` bytes (read only for a 2xx status). Redirects are
/// not followed: a 3xx is returned as it is. Errors say what failed (naming the host and
/// port when connecting failed or took too long); the caller names the URL.
pub async fn https_get(
    url: &HttpsUrl,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    max_body: usize,
) -> Result<HttpsResponse, String> {
    let peer = url.host_header();
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot connect to {peer}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(url.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {peer} failed: {}", tls_error(&e)))?;
        let peer_certificates = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let answer = exchange(
            stream,
            Method::GET,
            &peer,
            &url.target,
            |s| s.is_success(),
            max_body,
        )
        .await?;
        Ok(HttpsResponse {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
            peer_certificates,
        })
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{peer} gave no complete answer within {timeout:?}"))?
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

    #[test]
    fn https_urls_parse_strictly() {
        let u = HttpsUrl::parse("https://td.example/bundle").unwrap();
        assert_eq!(
            (u.host(), u.port(), u.target(), u.host_header().as_str()),
            ("td.example", 443, "/bundle", "td.example")
        );
        assert_eq!(u.to_string(), "https://td.example/bundle");
        let u = HttpsUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((u.port(), u.target()), (8443, "/"));
        assert_eq!(u.host_header(), "127.0.0.1:8443");
        assert!(matches!(u.server_name(), ServerName::IpAddress(_)));
        let u = HttpsUrl::parse("https://[::1]:9/k?a=b").unwrap();
        assert_eq!(
            (u.host(), u.target(), u.host_header().as_str()),
            ("::1", "/k?a=b", "[::1]:9")
        );
        assert_eq!(HttpsUrl::parse("https://h?x=1").unwrap().target(), "/?x=1");
        for (bad, want) in [
            ("http://td.example/", "plain http://"),
            ("HTTP://h/", "plain http://"),
            ("ftp://h/", "must start with https://"),
            ("td.example", "must start with https://"),
            ("https://", "no host"),
            ("https:///x", "no host"),
            ("https://u:p@h/", "user info"),
            ("https://h:0/", "not a port number"),
            ("https://h:x/", "not a port number"),
            ("https://h/a b", "spaces"),
            ("https://h/#f", "fragment"),
            ("https://[::1/", "unclosed ["),
            ("https://[::1]x/", "junk after"),
            ("https://[h]/", "not an IPv6 address"),
            ("https://-h/", "not a DNS name"),
        ] {
            let err = HttpsUrl::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn roots_need_a_certificate() {
        let err = roots_from_pem(b"not pem", "the roots").unwrap_err();
        assert_eq!(err, "the roots: no PEM CERTIFICATE in it");
        let junk = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = roots_from_pem(junk, "the roots").unwrap_err();
        assert!(err.contains("not a usable trust anchor"), "{err}");
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
