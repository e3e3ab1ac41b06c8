//! A minimal HTTP/1.1 client for instance metadata services: plain HTTP to a link-local
//! (or, in tests, loopback) address, one request per connection, a deadline on the whole
//! exchange and a cap on the response size. Metadata services are not reached through
//! proxies, and nothing here follows redirects: a redirect is an error.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use carapace_core::Error;

/// The largest response body read (an identity document, token or signature is a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The default deadline of one metadata request (connect, send, read the whole body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body, at most [`MAX_RESPONSE_BYTES`].
    pub body: Vec<u8>,
}

impl Response {
    /// The body of a 2xx response; otherwise [`Error::Unavailable`] naming `what`, the
    /// status and the start of the body (metadata services explain refusals there).
    pub fn ok_body(self, what: &str) -> Result<Vec<u8>, Error> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            let excerpt: String = String::from_utf8_lossy(&self.body)
                .chars()
                .take(200)
                .filter(|c| !c.is_control())
                .collect();
            Err(Error::Unavailable(format!(
                "{what}: HTTP {} {excerpt}",
                self.status
            )))
        }
    }
}

/// `s` percent-encoded for a URL query value (RFC 3986: everything but unreserved
/// characters is escaped).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits a URL's authority (`host`, `host:port`, `[v6]`, `[v6]:port`) into the host
/// (an IPv6 address without its brackets) and the port, `default_port` when none is
/// given; port 0 and an empty host are refused. `shown` names the URL in errors.
pub(crate) fn host_and_port<'a>(
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

/// A parsed `http://host[:port][/path]` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    host: String,
    port: u16,
    path: String,
}

impl BaseUrl {
    /// Parses a base URL. Only `http://` is accepted: metadata services do not speak TLS,
    /// and they are reached on a link-local address that never leaves the host.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: a metadata URL must start with http://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains(['@', ' ']) {
            return Err(format!(
                "{url:?}: no host, or a host with user info or spaces"
            ));
        }
        let (host, port) = host_and_port(authority, 80, &format!("{url:?}"))?;
        if path.contains(['?', '#']) || path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "{url:?}: the base URL must be a plain path, no query"
            ));
        }
        Ok(BaseUrl {
            host: host.to_owned(),
            port,
            path: path.trim_end_matches('/').to_owned(),
        })
    }

    /// The full URL of `path_and_query` (which starts with `/`) under this base.
    pub fn join(&self, path_and_query: &str) -> String {
        format!(
            "http://{}{}",
            self.authority(),
            self.path_of(path_and_query)
        )
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn path_of(&self, path_and_query: &str) -> String {
        format!("{}{}", self.path, path_and_query)
    }

    /// Sends one request (`GET` or `PUT` with an empty body) to `path_and_query` under
    /// this base with `headers`, and reads the response within `timeout`. Connection
    /// failures, timeouts and oversized bodies are [`Error::Unavailable`].
    pub async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Response, Error> {
        let url = self.join(path_and_query);
        tokio::time::timeout(timeout, self.exchange(method, path_and_query, headers))
            .await
            .map_err(|_| {
                Error::Unavailable(format!("{method} {url}: no answer within {timeout:?}"))
            })?
            .map_err(|e| Error::Unavailable(format!("{method} {url}: {e}")))
    }

    async fn exchange(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response, String> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(self.path_of(path_and_query))
            .header(hyper::header::HOST, self.authority())
            .header(hyper::header::USER_AGENT, "carapace-agent");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the response (at most {MAX_RESPONSE_BYTES} bytes): {e}"))?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok(Response { status, body })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            query_escape("spiffe://td/x y&z=~"),
            "spiffe%3A%2F%2Ftd%2Fx%20y%26z%3D~"
        );
        assert_eq!(query_escape("api://a-b_c.d"), "api%3A%2F%2Fa-b_c.d");
    }

    #[test]
    fn base_urls_parse_and_join() {
        let u = BaseUrl::parse("http://169.254.169.254").unwrap();
        assert_eq!(
            u.join("/latest/api/token"),
            "http://169.254.169.254:80/latest/api/token"
        );
        let u = BaseUrl::parse("http://127.0.0.1:8080/prefix/").unwrap();
        assert_eq!(u.join("/a?b=c"), "http://127.0.0.1:8080/prefix/a?b=c");
        let u = BaseUrl::parse("http://[fd00:ec2::254]/").unwrap();
        assert_eq!(u.join("/x"), "http://[fd00:ec2::254]:80/x");
        let u = BaseUrl::parse("http://[fd00:ec2::254]:81").unwrap();
        assert_eq!(u.join("/x"), "http://[fd00:ec2::254]:81/x");
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://",
            "http://u@host/",
            "http://host:port/",
            "http://host:0/",
            "http://host/a?q",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
