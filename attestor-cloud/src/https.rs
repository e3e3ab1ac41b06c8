//! A minimal HTTPS GET client for fetching signing keys (a JWKS or Google's certificate
//! map) from a configured `https://` URL, on the server, in the background.
//!
//! Kept apart from [`crate::http`] (the agent's plain-HTTP metadata client) on purpose:
//! keys decide whose tokens are believed, so they only ever come over authenticated TLS.
//! One request per connection (HTTP/1.1 over rustls with the ring provider, TLS 1.2 or
//! 1.3, SNI the URL's host, the server's certificate verified by webpki against the
//! configured roots: a CA file, or the system's trust store), a deadline on the whole
//! exchange, a cap on the body, and no redirects (a 3xx is an error naming the status).
//! No proxy is used. Errors name the URL's host and what failed, never a body beyond a
//! short excerpt of an error page.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// The largest response body read (a key set is a few KiB; the cap of key files).
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The deadline of one fetch: connect, TLS handshake, request and the whole body.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// The largest CA file read.
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// A parsed `https://host[:port][/path][?query]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpsUrl {
    /// As configured, for messages.
    text: String,
    /// The host, without brackets for IPv6.
    host: String,
    port: u16,
    /// Origin-form request target: `/path?query`.
    target: String,
    server_name: ServerName<'static>,
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl HttpsUrl {
    /// Parses `url`. Only `https://` is accepted: keys decide whose tokens are believed,
    /// so they must come authenticated; plain `http://` is refused, with no exception.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let shown = crate::jwt::shown(url);
        let Some(rest) = url.strip_prefix("https://") else {
            if url
                .get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
            {
                return Err(format!(
                    "{shown}: plain http:// is refused: signing keys must come over \
                     authenticated HTTPS (https://...)"
                ));
            }
            return Err(format!("{shown}: a key URL must start with https://"));
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
                 in a key URL"
            ));
        }
        let (host, port) = crate::http::host_and_port(authority, 443, &shown)?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{shown}: the host is not a DNS name or an IP address: {e}"))?;
        if authority.strip_prefix('[').is_some() && !matches!(server_name, ServerName::IpAddress(_))
        {
            return Err(format!("{shown}: [{host}] is not an IPv6 address"));
        }
        let target = if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("/{target}")
        };
        target
            .parse::<hyper::Uri>()
            .map_err(|e| format!("{shown}: the path is not usable: {e}"))?;
        Ok(HttpsUrl {
            text: url.to_owned(),
            host: host.to_owned(),
            port,
            target,
            server_name,
        })
    }

    /// The `Host` header: the host, with the port unless it is 443.
    fn host_header(&self) -> String {
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

/// Reads the PEM certificates of `path` as trust roots; at least one is required.
pub(crate) fn roots_from_ca_file(path: &Path) -> Result<RootCertStore, String> {
    use std::io::Read as _;
    let what = format!("CA file {}", path.display());
    let file = std::fs::File::open(path).map_err(|e| format!("{what}: {e}"))?;
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(|e| format!("{what}: {e}"))?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(format!("{what}: larger than {MAX_CA_FILE_BYTES} bytes"));
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
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
pub(crate) fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "no usable certificate in the system trust store ({ignored} unusable{}{}); set \
             keys_ca_file to the CA that issued the key server's certificate",
            if errors.is_empty() { "" } else { "; " },
            errors.join("; ")
        ));
    }
    if ignored > 0 || !found.errors.is_empty() {
        tracing::debug!(
            added,
            ignored,
            errors = ?found.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "some system trust roots were not usable"
        );
    }
    Ok(roots)
}

/// An HTTPS client trusting a fixed set of roots.
#[derive(Debug, Clone)]
pub(crate) struct HttpsClient {
    tls: Arc<rustls::ClientConfig>,
}

/// Aborts a spawned task when dropped (the connection driver, on every way out).
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl HttpsClient {
    /// A client verifying servers against `roots`: TLS 1.3 or 1.2, ring, HTTP/1.1 only.
    pub(crate) fn new(roots: RootCertStore) -> Result<Self, String> {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpsClient { tls: Arc::new(tls) })
    }

    /// `GET url` within [`TIMEOUT`]: the body of a 2xx response of at most
    /// [`MAX_BODY_BYTES`]; anything else (including a redirect) is an error.
    pub(crate) async fn get(&self, url: &HttpsUrl) -> Result<Vec<u8>, String> {
        tokio::time::timeout(TIMEOUT, self.exchange(url))
            .await
            .map_err(|_| format!("no complete answer within {TIMEOUT:?}"))?
    }

    async fn exchange(&self, url: &HttpsUrl) -> Result<Vec<u8>, String> {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", url.host_header()))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(url.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}: {e}", url.host_header()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let _driver = AbortOnDrop(tokio::spawn(conn).abort_handle());
        let req = Request::builder()
            .method("GET")
            .uri(url.target.as_str())
            .header(hyper::header::HOST, url.host_header())
            .header(hyper::header::USER_AGENT, "carapace-server")
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(format!(
                "HTTP {status}: redirects are not followed; configure the final URL"
            ));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the response (at most {MAX_BODY_BYTES} bytes): {e}"))?
            .to_bytes();
        if !status.is_success() {
            let excerpt: String = String::from_utf8_lossy(&body)
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            return Err(format!("HTTP {status} {excerpt}").trim_end().to_owned());
        }
        Ok(body.to_vec())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn https_urls_parse_strictly() {
        let u = HttpsUrl::parse("https://www.googleapis.com/oauth2/v3/certs").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("www.googleapis.com", 443, "/oauth2/v3/certs")
        );
        assert_eq!(u.host_header(), "www.googleapis.com");
        assert_eq!(u.to_string(), "https://www.googleapis.com/oauth2/v3/certs");
        let u = HttpsUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((u.port, u.target.as_str()), (8443, "/"));
        assert_eq!(u.host_header(), "127.0.0.1:8443");
        assert!(matches!(u.server_name, ServerName::IpAddress(_)));
        let u = HttpsUrl::parse("https://[::1]:9/k?a=b").unwrap();
        assert_eq!(
            (u.host.as_str(), u.target.as_str(), u.host_header().as_str()),
            ("::1", "/k?a=b", "[::1]:9")
        );
        let u = HttpsUrl::parse("https://h?x=1").unwrap();
        assert_eq!(u.target, "/?x=1");
        for (bad, want) in [
            ("http://www.googleapis.com/oauth2/v3/certs", "plain http://"),
            ("HTTP://h/", "plain http://"),
            ("ftp://h/", "must start with https://"),
            ("www.googleapis.com", "must start with https://"),
            ("https://", "no host"),
            ("https:///x", "no host"),
            ("https://u:p@h/", "user info"),
            ("https://h:0/", "not a port number"),
            ("https://h:x/", "not a port number"),
            ("https://h/a b", "spaces"),
            ("https://h/#f", "fragment"),
            ("https://[::1/", "unclosed ["),
            ("https://[h]/", "not an IPv6 address"),
            ("https://-h/", "not a DNS name"),
        ] {
            let err = HttpsUrl::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn ca_files_need_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(
            roots_from_ca_file(&missing)
                .unwrap_err()
                .contains("missing.pem")
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        assert!(
            roots_from_ca_file(&empty)
                .unwrap_err()
                .contains("no PEM CERTIFICATE")
        );
    }
}
