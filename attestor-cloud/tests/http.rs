#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
//! The metadata HTTP client against a real (loopback) HTTP server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use carapace_attestor_cloud::http::{BaseUrl, MAX_RESPONSE_BYTES};
use carapace_core::Error;
use common::MetadataServer;

#[tokio::test]
async fn the_client_sends_method_path_and_headers_and_reads_the_body() {
    let server = MetadataServer::start(Arc::new(|seen| match seen.path_and_query.as_str() {
        "/base/ok?x=1" => (200, b"hello".to_vec()),
        "/base/big" => (200, vec![b'a'; MAX_RESPONSE_BYTES + 1]),
        _ => (404, b"not here".to_vec()),
    }))
    .await;
    let base = BaseUrl::parse(&format!("{}/base/", server.url)).unwrap();
    let r = base
        .request("PUT", "/ok?x=1", &[("X-Test", "v")], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    let seen = &server.requests()[0];
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.header("x-test"), Some("v"));

    let r = base
        .request("GET", "/missing", &[], Duration::from_secs(5))
        .await
        .unwrap();
    let err = r.ok_body("the document").unwrap_err().to_string();
    assert!(err.contains("the document: HTTP 404 not here"), "{err}");

    let err = base
        .request("GET", "/big", &[], Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
}

#[tokio::test]
async fn an_unreachable_or_silent_service_is_unavailable() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = BaseUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    let err = base
        .request("GET", "/", &[], Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("cannot connect"), "{err}");

    // A listener that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = BaseUrl::parse(&format!("http://{}", silent.local_addr().unwrap())).unwrap();
    let err = base
        .request("GET", "/", &[], Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no answer within"), "{err}");
}
