//! A real Envoy seen from outside, as the SDS tests and the SDS benchmark look at it: a
//! plain HTTP/1.1 GET (Envoy's admin interface and its listeners answer it, the admin
//! interface with a chunked body), and the serial of the certificate Envoy serves for a
//! SPIFFE ID (admin `/certs`).
//!
//! Everything answers `None` when nothing (usable) answered: callers poll until Envoy is
//! up or has picked up a new certificate.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `GET path` on `127.0.0.1:port` (one connection, `Connection: close`): the status and
/// the body (a chunked one decoded), or `None` if nothing answered. Connecting and each
/// read must finish within `timeout`.
pub fn get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    // One write: a server that answers after its first read sees the whole request.
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    parse_http_response(&raw)
}

/// The status and body of a raw HTTP/1.1 response (a chunked body decoded); `None` if it
/// is not one, or is cut short.
pub fn parse_http_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Some((
        status,
        if chunked {
            dechunk(body)?
        } else {
            body.to_owned()
        },
    ))
}

/// A chunked HTTP/1.1 body, decoded (Envoy's admin answers so).
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n..)?.strip_prefix("\r\n")?;
    }
}

/// The serial (lower-case hex) of the certificate for `spiffe_id` in the JSON of Envoy's
/// admin `/certs`, if it serves one.
pub fn serial_in_certs(certs_json: &str, spiffe_id: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(certs_json).ok()?;
    v.get("certificates")?
        .as_array()?
        .iter()
        .filter_map(|c| c.get("cert_chain").and_then(|x| x.as_array()))
        .flatten()
        .find(|leaf| {
            leaf.get("subject_alt_names")
                .and_then(|x| x.as_array())
                .is_some_and(|sans| {
                    sans.iter()
                        .any(|s| s.get("uri").and_then(|u| u.as_str()) == Some(spiffe_id))
                })
        })
        .and_then(|leaf| leaf.get("serial_number")?.as_str().map(str::to_lowercase))
}

/// The serial (lower-case hex) of the certificate for `spiffe_id` that the Envoy with
/// admin port `admin` serves (`GET /certs`, within `timeout` as [`get`]), if it has one.
pub fn served_serial(admin: u16, spiffe_id: &str, timeout: Duration) -> Option<String> {
    match get(admin, "/certs", timeout)? {
        (200, body) => serial_in_certs(&body, spiffe_id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_plain_http_responses_are_decoded() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n3;x=y\r\n 1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(raw),
            Some((200, "{\"a\": 1}".to_owned()))
        );
        let plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope";
        assert_eq!(parse_http_response(plain), Some((404, "nope".to_owned())));
        // A truncated chunk is no body at all.
        let cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nff\r\nabc";
        assert_eq!(parse_http_response(cut), None);
        assert_eq!(parse_http_response(b"garbage"), None);
    }

    #[test]
    fn the_serial_of_the_named_leaf_is_read_from_certs() {
        let certs = r#"{"certificates":[
          {"ca_cert":[{"path":"<inline>","serial_number":"aa","subject_alt_names":[{"uri":"spiffe://example.org"}]}],
           "cert_chain":[{"path":"<inline>","serial_number":"0A1B2C","subject_alt_names":[{"uri":"spiffe://example.org/bench/sds-envoy"}],"days_until_expiration":"0"}]},
          {"ca_cert":[],"cert_chain":[{"serial_number":"ff","subject_alt_names":[{"dns":"x"}]}]}
        ]}"#;
        assert_eq!(
            serial_in_certs(certs, "spiffe://example.org/bench/sds-envoy"),
            Some("0a1b2c".to_owned())
        );
        assert_eq!(serial_in_certs(certs, "spiffe://example.org/other"), None);
        // Before the secret arrives Envoy lists no certificates.
        assert_eq!(
            serial_in_certs(
                r#"{"certificates":[]}"#,
                "spiffe://example.org/bench/sds-envoy"
            ),
            None
        );
        assert_eq!(serial_in_certs("not json", "x"), None);
    }

    /// A one-shot server answering `reply` to the first connection, on a free port.
    fn answer_once(reply: Vec<u8>) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // The whole request before the answer: closing with unread bytes would reset
            // the connection under the client's read.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(&reply).unwrap();
        });
        port
    }

    #[test]
    fn served_serial_gets_certs_over_http() {
        let json = r#"{"certificates":[{"cert_chain":[{"serial_number":"0B","subject_alt_names":[{"uri":"spiffe://e.org/x"}]}]}]}"#;
        let (a, b) = json.split_at(40);
        let mut reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for chunk in [a, b] {
            reply.extend(format!("{:x}\r\n{chunk}\r\n", chunk.len()).into_bytes());
        }
        reply.extend(b"0\r\n\r\n");
        let port = answer_once(reply);
        let serial = served_serial(port, "spiffe://e.org/x", Duration::from_secs(5));
        assert_eq!(serial.as_deref(), Some("0b"));
        let port =
            answer_once(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_vec());
        assert_eq!(
            get(port, "/certs", Duration::from_secs(5)),
            Some((503, String::new()))
        );
        // Nothing listening: no answer.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(get(closed, "/", Duration::from_secs(1)), None);
    }
}
