//! The federation bundle fetcher against real TLS peers on loopback: each case starts an
//! in-process endpoint (tokio-rustls, certificates from rcgen test CAs, TLS 1.3 or 1.2
//! only, a hand-written HTTP/1.1 answer) and fetches from it with a relationship's
//! profile, then checks the bundle returned or the reason of the refusal.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carapace_core::{SpiffeId, TrustBundle, TrustDomain};
use carapace_server::federation::fetch::{FetchOptions, fetch_bundle, fetch_bundle_with};
use carapace_server::federation::{Profile, Relationship, Source};
use rustls::SupportedProtocolVersion;
use rustls::version::{TLS12, TLS13};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TD: &str = "td.test";
const ENDPOINT: &str = "spiffe://td.test/spire/server";

/// A test CA (rcgen) and what it signs.
struct Ca {
    der: Vec<u8>,
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Ca {
    /// A CA; with `td`, a SPIFFE signing certificate of it (URI SAN `spiffe://td`).
    fn new(td: Option<&str>) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        // Each CA its own name, so a client trusting another finds no issuer at all.
        let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA {n}"));
        if let Some(td) = td {
            p.subject_alt_names = vec![rcgen::SanType::URI(
                format!("spiffe://{td}").try_into().unwrap(),
            )];
        }
        let cert = p.self_signed(&key).unwrap();
        Ca {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    fn leaf(&self, p: rcgen::CertificateParams) -> Cert {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Cert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// A Web PKI server certificate for `host`.
    fn server_cert(&self, host: &str) -> Cert {
        self.leaf(rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap())
    }

    /// An X509-SVID for `id`.
    fn svid(&self, id: &str) -> Cert {
        let mut p = rcgen::CertificateParams::default();
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        self.leaf(p)
    }
}

/// A certificate chain and its key, as a peer presents them.
struct Cert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// The bundle of `td` holding `cas`, sequence 7.
fn bundle(td: &str, cas: &[&Ca]) -> TrustBundle {
    let mut b = TrustBundle::new(TrustDomain::new(td).unwrap());
    b.x509_authorities = cas.iter().map(|ca| ca.der.clone()).collect();
    b.sequence = 7;
    b
}

fn json(b: &TrustBundle) -> Vec<u8> {
    b.to_spiffe_json().unwrap().into_bytes()
}

/// What a test peer answers.
enum Answer {
    /// A whole HTTP/1.1 response.
    Http {
        status: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// A 200 whose body is 10 MB, streamed, declared by `Content-Length` or not.
    Huge { declared: bool },
    /// A TCP connection accepted and never answered (not even the TLS handshake).
    Silent,
}

impl Answer {
    fn ok(body: Vec<u8>) -> Answer {
        Answer::Http {
            status: "200 OK",
            headers: Vec::new(),
            body,
        }
    }
}

/// What a peer saw of the last request: the SNI and the request head.
#[derive(Debug, Default, Clone)]
struct Seen {
    sni: Option<String>,
    head: String,
}

/// A peer serving `answer` over TLS with `versions`, presenting `cert`.
struct Peer {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl Peer {
    async fn start(
        cert: Cert,
        versions: &[&'static SupportedProtocolVersion],
        answer: Answer,
    ) -> Peer {
        let cfg = rustls::ServerConfig::builder_with_provider(carapace_tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(cert.chain, cert.key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let answer = Arc::new(answer);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                if matches!(*answer, Answer::Silent) {
                    held.push(tcp);
                    continue;
                }
                let (acceptor, answer, seen) = (acceptor.clone(), answer.clone(), seen2.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    *seen.lock().unwrap() = Seen {
                        sni: tls.get_ref().1.server_name().map(str::to_owned),
                        head: String::from_utf8_lossy(&head).into_owned(),
                    };
                    let _ = respond(&mut tls, &answer).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Peer { addr, seen }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/bundle?x=1", self.addr.port())
    }
}

async fn respond<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    answer: &Answer,
) -> std::io::Result<()> {
    match answer {
        Answer::Http {
            status,
            headers,
            body,
        } => {
            let mut out = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            for (n, v) in headers {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
            out.push_str("\r\n");
            w.write_all(out.as_bytes()).await?;
            w.write_all(body).await
        }
        Answer::Huge { declared } => {
            const SIZE: usize = 10 * 1024 * 1024;
            let length = if *declared {
                format!("content-length: {SIZE}\r\n")
            } else {
                String::new()
            };
            w.write_all(
                format!("HTTP/1.1 200 OK\r\n{length}connection: close\r\n\r\n{{\"keys\": [")
                    .as_bytes(),
            )
            .await?;
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..SIZE / chunk.len() {
                w.write_all(&chunk).await?;
            }
            Ok(())
        }
        Answer::Silent => Ok(()),
    }
}

fn relationship(url: String, profile: Profile) -> Relationship {
    Relationship {
        trust_domain: TrustDomain::new(TD).unwrap(),
        url,
        profile,
        source: Source::Api,
    }
}

fn web(roots: Option<&Ca>) -> Profile {
    Profile::HttpsWeb {
        roots_pem: roots.map(|ca| ca.pem.clone()),
    }
}

fn spiffe(id: &str) -> Profile {
    Profile::HttpsSpiffe {
        endpoint_id: id.parse::<SpiffeId>().unwrap(),
    }
}

/// One fetch: what the peer presents and answers, the relationship's profile and the
/// bundle to authenticate with, and what must come of it: the authorities of the bundle
/// returned, or a refusal whose message holds each of the strings.
struct Case {
    name: &'static str,
    cert: Cert,
    versions: &'static [&'static SupportedProtocolVersion],
    answer: Answer,
    profile: Profile,
    auth: Option<TrustBundle>,
    expect: Result<Vec<Vec<u8>>, Vec<&'static str>>,
}

const ANY: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];
const ONLY_TLS12: &[&SupportedProtocolVersion] = &[&TLS12];

fn summary(b: &TrustBundle) -> String {
    format!(
        "{}'s bundle of {} X.509 authorities, sequence {}",
        b.trust_domain(),
        b.x509_authorities.len(),
        b.sequence
    )
}

async fn run(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let peer = Peer::start(case.cert, case.versions, case.answer).await;
        let rel = relationship(peer.url(), case.profile);
        let started = Instant::now();
        let got = fetch_bundle(&rel, case.auth.as_ref()).await;
        let took = started.elapsed();
        match (&case.expect, got) {
            (Ok(authorities), Ok(b)) => {
                if &b.x509_authorities != authorities
                    || b.trust_domain().name() != TD
                    || b.sequence != 7
                {
                    failures.push(format!("{}: wrong bundle: {}", case.name, summary(&b)));
                }
            }
            (Err(wants), Err(e)) => {
                let msg = e.to_string();
                if !msg.starts_with(&format!("bundle endpoint {}: ", peer.url()))
                    || wants.iter().any(|w| !msg.contains(w))
                {
                    failures.push(format!("{}: refused, but with {msg:?}", case.name));
                }
            }
            (Ok(_), Err(e)) => failures.push(format!("{}: refused: {e}", case.name)),
            (Err(_), Ok(b)) => {
                failures.push(format!("{}: accepted {}", case.name, summary(&b)));
            }
        }
        // Nothing waits for a deadline: every refusal here is prompt.
        if took > Duration::from_secs(5) {
            failures.push(format!("{}: took {took:?}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn https_web_endpoints_are_checked_by_web_pki() {
    let (web_ca, other_ca, td_ca) = (Ca::new(None), Ca::new(None), Ca::new(Some(TD)));
    let served = bundle(TD, &[&td_ca]);
    let good = || Answer::ok(json(&served));
    run(vec![
        Case {
            name: "a certificate for the URL's host from the configured CA",
            cert: web_ca.server_cert("localhost"),
            versions: ANY,
            answer: good(),
            profile: web(Some(&web_ca)),
            auth: None,
            expect: Ok(vec![td_ca.der.clone()]),
        },
        Case {
            name: "TLS 1.2 only",
            cert: web_ca.server_cert("localhost"),
            versions: ONLY_TLS12,
            answer: good(),
            profile: web(Some(&web_ca)),
            auth: None,
            expect: Ok(vec![td_ca.der.clone()]),
        },
        Case {
            name: "a CA other than the configured one",
            cert: web_ca.server_cert("localhost"),
            versions: ANY,
            answer: good(),
            profile: web(Some(&other_ca)),
            auth: None,
            expect: Err(vec![
                "TLS handshake with localhost:",
                "invalid peer certificate",
                "UnknownIssuer",
            ]),
        },
        Case {
            name: "a test CA is not in the system's trust store",
            cert: web_ca.server_cert("localhost"),
            versions: ANY,
            answer: good(),
            profile: web(None),
            auth: None,
            expect: Err(vec!["invalid peer certificate", "UnknownIssuer"]),
        },
        Case {
            name: "a certificate for another host",
            cert: web_ca.server_cert("other.example"),
            versions: ANY,
            answer: good(),
            profile: web(Some(&web_ca)),
            auth: None,
            expect: Err(vec![
                "certificate not valid for name \"localhost\"",
                "other.example",
            ]),
        },
        Case {
            name: "an SVID is not a Web PKI certificate",
            cert: td_ca.svid(ENDPOINT),
            versions: ANY,
            answer: good(),
            profile: web(Some(&td_ca)),
            auth: None,
            expect: Err(vec!["invalid peer certificate"]),
        },
    ])
    .await;
}

#[tokio::test]
async fn https_spiffe_endpoints_must_present_the_configured_svid() {
    let (td_ca, td_ca2, hub_ca) = (
        Ca::new(Some(TD)),
        Ca::new(Some(TD)),
        Ca::new(Some("hub.test")),
    );
    let served = bundle(TD, &[&td_ca]);
    let good = || Answer::ok(json(&served));
    let auth = Some(bundle(TD, &[&td_ca]));
    run(vec![
        Case {
            name: "self-serving, authenticated with the bootstrap bundle",
            cert: td_ca.svid(ENDPOINT),
            versions: ANY,
            answer: good(),
            profile: spiffe(ENDPOINT),
            auth: auth.clone(),
            expect: Ok(vec![td_ca.der.clone()]),
        },
        Case {
            name: "TLS 1.2 only",
            cert: td_ca.svid(ENDPOINT),
            versions: ONLY_TLS12,
            answer: good(),
            profile: spiffe(ENDPOINT),
            auth: auth.clone(),
            expect: Ok(vec![td_ca.der.clone()]),
        },
        Case {
            name: "a rotation: the new bundle holds the endpoint's CA and the next",
            cert: td_ca.svid(ENDPOINT),
            versions: ANY,
            answer: Answer::ok(json(&bundle(TD, &[&td_ca, &td_ca2]))),
            profile: spiffe(ENDPOINT),
            auth: auth.clone(),
            expect: Ok(vec![td_ca.der.clone(), td_ca2.der.clone()]),
        },
        Case {
            name: "another SPIFFE ID",
            cert: td_ca.svid("spiffe://td.test/workload"),
            versions: ANY,
            answer: good(),
            profile: spiffe(ENDPOINT),
            auth: auth.clone(),
            expect: Err(vec![
                "invalid peer certificate",
                "server presented spiffe://td.test/workload but spiffe://td.test/spire/server was expected",
            ]),
        },
        Case {
            name: "an SVID from a CA the authenticating bundle does not hold",
            cert: td_ca2.svid(ENDPOINT),
            versions: ANY,
            answer: good(),
            profile: spiffe(ENDPOINT),
            auth: auth.clone(),
            expect: Err(vec!["invalid peer certificate", "chain does not verify against the bundle"]),
        },
        Case {
            name: "a Web PKI certificate",
            cert: td_ca.server_cert("localhost"),
            versions: ANY,
            answer: good(),
            profile: spiffe(ENDPOINT),
            auth: auth.clone(),
            expect: Err(vec!["invalid peer certificate", "leaf has no URI SAN"]),
        },
        Case {
            name: "no bundle to authenticate with",
            cert: td_ca.svid(ENDPOINT),
            versions: ANY,
            answer: good(),
            profile: spiffe(ENDPOINT),
            auth: None,
            expect: Err(vec![
                "no bundle to authenticate the endpoint's SVID (spiffe://td.test/spire/server) with",
                "a bootstrap bundle of td.test is needed",
                "bundle set --trust-domain td.test",
                "federation create --bundle",
            ]),
        },
        Case {
            name: "self-serving, the new bundle lacks the endpoint's own CA",
            cert: td_ca.svid(ENDPOINT),
            versions: ANY,
            answer: Answer::ok(json(&bundle(TD, &[&td_ca2]))),
            profile: spiffe(ENDPOINT),
            auth: auth.clone(),
            expect: Err(vec![
                "the bundle served does not validate the endpoint's own SVID (spiffe://td.test/spire/server)",
                "it is not td.test's current bundle",
            ]),
        },
        Case {
            name: "not self-serving: the endpoint is another trust domain's",
            cert: hub_ca.svid("spiffe://hub.test/spire/server"),
            versions: ANY,
            answer: Answer::ok(json(&bundle(TD, &[&td_ca2]))),
            profile: spiffe("spiffe://hub.test/spire/server"),
            auth: Some(bundle("hub.test", &[&hub_ca])),
            expect: Ok(vec![td_ca2.der.clone()]),
        },
        Case {
            name: "not self-serving, with no bundle of the endpoint's trust domain",
            cert: hub_ca.svid("spiffe://hub.test/spire/server"),
            versions: ANY,
            answer: good(),
            profile: spiffe("spiffe://hub.test/spire/server"),
            auth: None,
            expect: Err(vec!["hub.test's bundle is needed"]),
        },
        Case {
            name: "not self-serving, authenticated with the wrong trust domain's bundle",
            cert: hub_ca.svid("spiffe://hub.test/spire/server"),
            versions: ANY,
            answer: good(),
            profile: spiffe("spiffe://hub.test/spire/server"),
            auth: auth.clone(),
            expect: Err(vec!["authenticated with hub.test's bundle, but td.test's was given"]),
        },
    ])
    .await;
}

#[tokio::test]
async fn answers_other_than_the_trust_domains_bundle_are_refused() {
    let (web_ca, td_ca, other_ca) = (
        Ca::new(None),
        Ca::new(Some(TD)),
        Ca::new(Some("other.test")),
    );
    let cert = || web_ca.server_cert("localhost");
    let http = |status, headers, body: &[u8]| Answer::Http {
        status,
        headers,
        body: body.to_vec(),
    };
    let case = |name, answer, expect| Case {
        name,
        cert: cert(),
        versions: ANY,
        answer,
        profile: web(Some(&web_ca)),
        auth: None,
        expect,
    };
    let redirect = vec![("location", "https://elsewhere.example/bundle".to_owned())];
    run(vec![
        case(
            "a CA without a SPIFFE ID is not checked",
            Answer::ok(json(&bundle(TD, &[&web_ca, &td_ca]))),
            Ok(vec![web_ca.der.clone(), td_ca.der.clone()]),
        ),
        case("an empty bundle is legal", Answer::ok(json(&bundle(TD, &[]))), Ok(vec![])),
        case(
            "another trust domain's bundle",
            Answer::ok(json(&bundle(TD, &[&td_ca, &other_ca]))),
            Err(vec![
                "the bundle is not td.test's",
                "X.509 authority 1 is a CA of trust domain other.test (URI SAN spiffe://other.test)",
            ]),
        ),
        case(
            "malformed JSON",
            Answer::ok(b"{\"keys\": [".to_vec()),
            Err(vec!["the body is not a SPIFFE bundle", "not JSON"]),
        ),
        case(
            "JSON without keys",
            Answer::ok(b"{\"spiffe_sequence\": 1}".to_vec()),
            Err(vec!["the body is not a SPIFFE bundle", "\"keys\" is missing"]),
        ),
        case(
            "not UTF-8",
            Answer::ok(b"{\"keys\": [\xff]}".to_vec()),
            Err(vec!["the body is not UTF-8"]),
        ),
        case(
            "10 MB, declared",
            Answer::Huge { declared: true },
            Err(vec!["the body is 10485760 bytes (Content-Length), more than the 1048576 allowed"]),
        ),
        case(
            "10 MB, undeclared",
            Answer::Huge { declared: false },
            Err(vec!["the body is larger than the 1048576 bytes allowed"]),
        ),
        case(
            "a redirect",
            http("302 Found", redirect.clone(), b""),
            Err(vec![
                "HTTP 302 Found redirects to \"https://elsewhere.example/bundle\"",
                "redirects are not followed; configure the final URL",
            ]),
        ),
        case(
            "a permanent redirect without Location",
            http("308 Permanent Redirect", vec![], b""),
            Err(vec!["HTTP 308 Permanent Redirect redirects to nowhere (no Location)"]),
        ),
        case(
            "not found",
            http("404 Not Found", vec![], b"no bundle here"),
            Err(vec!["HTTP 404 Not Found: a bundle endpoint answers 200"]),
        ),
        case(
            "a server error",
            http("500 Internal Server Error", vec![], b"oops"),
            Err(vec!["HTTP 500 Internal Server Error"]),
        ),
        case(
            "another success status",
            http("204 No Content", vec![], b""),
            Err(vec!["HTTP 204 No Content"]),
        ),
    ])
    .await;
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out() {
    let ca = Ca::new(None);
    let peer = Peer::start(ca.server_cert("localhost"), ANY, Answer::Silent).await;
    let rel = relationship(peer.url(), web(Some(&ca)));
    let started = Instant::now();
    let options = FetchOptions {
        timeout: Duration::from_millis(800),
        ..FetchOptions::default()
    };
    // Without a deadline of its own the fetch would wait forever: this one fails instead.
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        fetch_bundle_with(&rel, None, options),
    )
    .await
    .expect("the fetch has no deadline")
    .unwrap_err();
    let took = started.elapsed();
    assert!(
        err.to_string().contains("localhost:")
            && err
                .to_string()
                .contains("gave no complete answer within 800ms"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(FetchOptions::default().timeout, Duration::from_secs(10));
    assert_eq!(FetchOptions::default().max_body, 1024 * 1024);
}

#[tokio::test]
async fn the_request_is_a_plain_get_of_the_urls_target_with_its_host_as_sni() {
    let ca = Ca::new(Some(TD));
    let peer = Peer::start(
        ca.svid(ENDPOINT),
        ANY,
        Answer::ok(json(&bundle(TD, &[&ca]))),
    )
    .await;
    let rel = relationship(peer.url(), spiffe(ENDPOINT));
    fetch_bundle(&rel, Some(&bundle(TD, &[&ca]))).await.unwrap();
    let seen = peer.seen.lock().unwrap().clone();
    assert_eq!(seen.sni.as_deref(), Some("localhost"));
    let head = seen.head.to_ascii_lowercase();
    assert!(head.starts_with("get /bundle?x=1 http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("\r\nhost: localhost:{}\r\n", peer.addr.port())),
        "{head}"
    );
}

#[tokio::test]
async fn urls_other_than_https_are_refused_before_connecting() {
    for (url, want) in [
        ("http://localhost:1/bundle", "plain http:// is refused"),
        ("https://user:pw@localhost:1/bundle", "user info"),
        ("https://localhost:1/bundle#top", "fragment"),
    ] {
        let rel = relationship(url.to_owned(), web(None));
        let err = fetch_bundle(&rel, None).await.unwrap_err().to_string();
        assert!(
            err.starts_with("bundle endpoint of td.test: ") && err.contains(want),
            "{url}: {err}"
        );
    }
    // A name that does not resolve, and a port where nothing listens.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for url in [
        "https://no-such-host.invalid/bundle".to_owned(),
        format!("https://127.0.0.1:{free}/bundle"),
    ] {
        let rel = relationship(url.clone(), web(None));
        let err = fetch_bundle(&rel, None).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("bundle endpoint {url}: cannot connect to")),
            "{err}"
        );
    }
}
