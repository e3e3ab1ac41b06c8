//! The JWT RPCs over the real socket with the real generated clients: the agent asks a
//! node API server (a real tonic `Node` service on a Unix socket, signing real tokens
//! with real keys through `carapace_core::jose::sign`) for JWT-SVIDs; and every refusal
//! of `ValidateJWTSVID`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use carapace_core::plugin::KeySigner;
use carapace_core::{JwtKey, KeyType, SpiffeId};
use carapace_keymanager_soft::{SoftKey, generate_pkcs8};
use carapace_proto::node::node_server::{Node, NodeServer};
use carapace_proto::node::{
    AttestRequest, AttestResponse, BatchNewX509svidRequest, BatchNewX509svidResponse,
    NewJwtsvidRequest, NewJwtsvidResponse, RenewAgentRequest, RenewAgentResponse,
    SyncAuthorizedRequest, SyncAuthorizedResponse,
};
use carapace_proto::types::JwtSvid;
use serde_json::{Value, json};

use super::*;
use crate::node_client::ServerLink;

// ---------------------------------------------------------------- keys and tokens

struct Key {
    kid: String,
    signer: SoftKey,
}

impl Key {
    fn new(kid: &str, kt: KeyType) -> Key {
        Key {
            kid: kid.into(),
            signer: SoftKey::from_pkcs8(kid, &generate_pkcs8(kt).unwrap()).unwrap(),
        }
    }

    fn jwt_key(&self) -> JwtKey {
        JwtKey {
            kid: self.kid.clone(),
            public_key_der: self.signer.public_key_der().to_vec(),
            expires_at: None,
        }
    }

    fn sign(&self, claims: Value) -> String {
        let Value::Object(map) = claims else {
            panic!("claims must be an object")
        };
        carapace_core::jose::sign(Some(&self.kid), &map, &self.signer).unwrap()
    }

    /// A token with exactly `header` and `claims`, signed with this key as the JOSE
    /// algorithm of its type would.
    fn forge(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let kt = self.signer.key_type();
        let der = self
            .signer
            .sign(kt.x509_algorithm(), input.as_bytes())
            .unwrap();
        let sig = match kt {
            KeyType::EcP256 => carapace_core::jose::ecdsa_der_to_fixed(&der, 32).unwrap(),
            KeyType::EcP384 => carapace_core::jose::ecdsa_der_to_fixed(&der, 48).unwrap(),
            KeyType::Rsa2048 => der,
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

fn now() -> i64 {
    carapace_core::clock::unix_now()
}

fn good_claims(sub: &str, aud: Value) -> Value {
    json!({ "sub": sub, "aud": aud, "iat": now(), "exp": now() + 300 })
}

fn jwt_bundle(pki: &Pki, keys: &[&Key], tainted: &[&str]) -> Arc<TrustBundle> {
    let mut b = (*pki.bundle()).clone();
    b.jwt_authorities = keys.iter().map(|k| k.jwt_key()).collect();
    b.tainted_jwt_kids = tainted.iter().map(|k| (*k).to_owned()).collect();
    Arc::new(b)
}

// ---------------------------------------------------------------- the node API server

/// How the test server dates the tokens it signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dating {
    /// Issued now, valid 300 s.
    Fresh,
    /// Issued 200 s ago, valid 100 s more: past its half-life.
    PastHalfLife,
}

/// A node API server answering `NewJWTSVID` as the real one does: only for the entries it
/// authorizes, with the entry's SPIFFE ID, signed by its current key.
struct TestNode {
    /// entry id → SPIFFE ID.
    authorized: Mutex<HashMap<String, String>>,
    key: Mutex<Arc<Key>>,
    dating: Mutex<Dating>,
    calls: AtomicUsize,
    /// What each call asked for (entry, audiences).
    asked: Mutex<Vec<(String, Vec<String>)>>,
    /// When set, every call fails with this code (a server without JWT support answers
    /// Unimplemented).
    fail: Mutex<Option<Code>>,
    /// How long each call takes.
    delay: Mutex<Duration>,
}

/// The `Node` service over a shared [`TestNode`].
struct NodeService(Arc<TestNode>);

#[tonic::async_trait]
impl Node for NodeService {
    type AttestStream = tokio_stream::Empty<Result<AttestResponse, Status>>;
    type SyncAuthorizedStream = tokio_stream::Empty<Result<SyncAuthorizedResponse, Status>>;

    async fn attest(
        &self,
        _: Request<tonic::Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        Err(Status::unimplemented("test server"))
    }
    async fn renew_agent(
        &self,
        _: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }
    async fn sync_authorized(
        &self,
        _: Request<SyncAuthorizedRequest>,
    ) -> Result<Response<Self::SyncAuthorizedStream>, Status> {
        Err(Status::unimplemented("test server"))
    }
    async fn batch_new_x509svid(
        &self,
        _: Request<BatchNewX509svidRequest>,
    ) -> Result<Response<BatchNewX509svidResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }
    async fn new_jwtsvid(
        &self,
        request: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let this = &self.0;
        this.calls.fetch_add(1, Ordering::SeqCst);
        let delay = *this.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let r = request.into_inner();
        this.asked
            .lock()
            .unwrap()
            .push((r.entry_id.clone(), r.audience.clone()));
        if let Some(code) = *this.fail.lock().unwrap() {
            return Err(Status::new(code, "JWT-SVIDs are not supported yet"));
        }
        if r.audience.is_empty() || r.audience.iter().any(|a| a.len() > 100) {
            return Err(Status::invalid_argument("audience too long"));
        }
        let Some(id) = this.authorized.lock().unwrap().get(&r.entry_id).cloned() else {
            return Err(Status::permission_denied(
                "entry not authorized for this agent",
            ));
        };
        let (iat, exp) = match *this.dating.lock().unwrap() {
            Dating::Fresh => (now(), now() + 300),
            Dating::PastHalfLife => (now() - 200, now() + 100),
        };
        let key = this.key.lock().unwrap().clone();
        let token = key.sign(json!({ "sub": id, "aud": r.audience, "iat": iat, "exp": exp }));
        Ok(Response::new(NewJwtsvidResponse {
            svid: Some(JwtSvid {
                token,
                spiffe_id: id,
                expires_at: exp,
                issued_at: iat,
            }),
        }))
    }
}

struct Server {
    node: Arc<TestNode>,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Server {
    async fn start(key: Arc<Key>, authorized: &[(&str, &str)]) -> Server {
        let node = Arc::new(TestNode {
            authorized: Mutex::new(
                authorized
                    .iter()
                    .map(|(e, id)| ((*e).to_owned(), format!("spiffe://example.org/{id}")))
                    .collect(),
            ),
            key: Mutex::new(key),
            dating: Mutex::new(Dating::Fresh),
            calls: AtomicUsize::new(0),
            asked: Mutex::new(Vec::new()),
            fail: Mutex::new(None),
            delay: Mutex::new(Duration::ZERO),
        });
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("node.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let service = NodeServer::new(NodeService(node.clone()));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
        });
        Server {
            node,
            _dir: dir,
            socket,
        }
    }

    /// A node API client to this server.
    async fn client(&self) -> carapace_proto::node::node_client::NodeClient<Channel> {
        carapace_proto::node::node_client::NodeClient::new(
            carapace_common::uds_channel(&self.socket, None)
                .await
                .unwrap(),
        )
    }

    fn calls(&self) -> usize {
        self.node.calls.load(Ordering::SeqCst)
    }
}

use tonic::transport::Channel;

/// A client whose every connection attempt fails: a server that cannot be reached.
fn unreachable_client(dir: &Path) -> carapace_proto::node::node_client::NodeClient<Channel> {
    let path = dir.join("nobody-listens.sock");
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }));
    carapace_proto::node::node_client::NodeClient::new(channel)
}

async fn fetch(
    client: &mut api_cli::WorkloadClient,
    audience: &[&str],
    spiffe_id: &str,
) -> Result<JwtsvidResponse, tonic::Status> {
    client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: audience.iter().map(|a| (*a).to_owned()).collect(),
            spiffe_id: spiffe_id.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Claims of a token the agent served, verified with `keys`.
fn verified(token: &str, keys: &TrustBundle, aud: &str) -> serde_json::Map<String, Value> {
    let (_, claims) =
        crate::workload_api::jwt::validate(keys, &[], aud, token, SystemTime::now()).unwrap();
    claims
}

// ---------------------------------------------------------------- FetchJWTSVID

#[tokio::test]
async fn fetch_jwt_svid_checks_its_request_and_serves_one_token_per_identity() {
    let k1 = Arc::new(Key::new("k1", KeyType::EcP256));
    let server = Server::start(k1.clone(), &[("a-web", "web"), ("b-db", "db")]).await;
    let (publisher, link) = ServerLink::new();
    publisher.publish(Some(server.client().await));
    let h = Harness::start_with_server(Pki::new("test CA"), link, 100).await;
    let bundle = jwt_bundle(&h.pki, &[&k1], &[]);
    let me = uid_sel(my_uid());
    h.cache.replace(
        bundle.clone(),
        vec![
            h.pki.svid("b-db", "db", std::slice::from_ref(&me), "db"),
            h.pki.svid("a-web", "web", std::slice::from_ref(&me), "web"),
            h.pki
                .svid("c-other", "other", &[uid_sel(my_uid().wrapping_add(1))], ""),
        ],
    );
    let mut client = h.client().await;

    // The request is checked before anything is asked of the server.
    let e = fetch(&mut client, &[], "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "audience is required");
    let e = fetch(&mut client, &["a", ""], "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("empty"), "{e:?}");
    let e = fetch(&mut client, &["a"], "not-an-id").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("spiffe_id is not a SPIFFE ID"),
        "{e:?}"
    );
    assert_eq!(server.calls(), 0);

    // One token per identity, in the order and with the hints of FetchX509SVID.
    let resp = fetch(&mut client, &["svc-b", "svc-a"], "").await.unwrap();
    let got: Vec<(&str, &str)> = resp
        .svids
        .iter()
        .map(|s| (s.spiffe_id.as_str(), s.hint.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("spiffe://example.org/web", "web"),
            ("spiffe://example.org/db", "db")
        ]
    );
    for s in &resp.svids {
        let claims = verified(&s.svid, &bundle, "svc-a");
        assert_eq!(claims["sub"], s.spiffe_id.as_str());
        assert_eq!(claims["aud"], json!(["svc-a", "svc-b"]));
    }
    // The server was asked once per identity, for the audience set sorted.
    let asked = server.node.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2);
    assert!(
        asked.iter().all(|(_, a)| a == &["svc-a", "svc-b"]),
        "{asked:?}"
    );

    // A SPIFFE ID filter.
    let resp = fetch(&mut client, &["svc-a"], "spiffe://example.org/db")
        .await
        .unwrap();
    assert_eq!(resp.svids.len(), 1);
    assert_eq!(resp.svids[0].spiffe_id, "spiffe://example.org/db");
    assert_eq!(resp.svids[0].hint, "db");
    // Another process's identity is not ours to ask for.
    let e = fetch(&mut client, &["svc-a"], "spiffe://example.org/other")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "no identity issued");

    // The server no longer authorizes "b-db": that identity is left out.
    server.node.authorized.lock().unwrap().remove("b-db");
    let resp = fetch(&mut client, &["fresh"], "").await.unwrap();
    let ids: Vec<&str> = resp.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/web"]);
    let e = fetch(&mut client, &["fresh2"], "spiffe://example.org/db")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // The server's InvalidArgument reaches the caller.
    let long = "x".repeat(101);
    let e = fetch(&mut client, &[&long], "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("audience too long"), "{e:?}");

    // Nothing registered for the caller: PermissionDenied, the server never asked.
    let before = server.calls();
    h.cache.replace(bundle.clone(), vec![]);
    let e = fetch(&mut client, &["svc-a"], "").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "no identity issued");
    assert_eq!(server.calls(), before);

    // The CLI: human and JSON.
    h.cache.replace(
        bundle.clone(),
        vec![h.pki.svid("a-web", "web", std::slice::from_ref(&me), "web")],
    );
    let text = api_cli::fetch_jwt(&h.socket, &["svc-a".into()], None, false)
        .await
        .unwrap();
    assert!(
        text.contains("SPIFFE ID:  spiffe://example.org/web"),
        "{text}"
    );
    assert!(text.contains("Audience:   svc-a"), "{text}");
    let token_line = text.lines().find(|l| l.contains("Token:")).unwrap();
    let token = token_line.split_whitespace().last().unwrap();
    verified(token, &bundle, "svc-a");
    let json_text = api_cli::fetch_jwt(
        &h.socket,
        &["svc-a".into()],
        Some("spiffe://example.org/web"),
        true,
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(v["svids"][0]["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(v["svids"][0]["hint"], "web");
    assert_eq!(v["svids"][0]["audience"], json!(["svc-a"]));
    assert_eq!(v["svids"][0]["token"], token, "the cached token");
    let e = api_cli::fetch_jwt(
        &h.socket,
        &["svc-a".into()],
        Some("spiffe://example.org/x"),
        false,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("no identity issued for this process"), "{e}");
}

#[tokio::test]
async fn tokens_are_cached_per_audience_set_until_half_their_life() {
    let k1 = Arc::new(Key::new("k1", KeyType::EcP256));
    let server = Server::start(k1.clone(), &[("e", "web")]).await;
    let h = Harness::start_with_server(
        Pki::new("test CA"),
        ServerLink::fixed(server.client().await),
        100,
    )
    .await;
    let bundle = jwt_bundle(&h.pki, &[&k1], &[]);
    h.cache.replace(
        bundle.clone(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = h.client().await;
    let token = |r: JwtsvidResponse| r.svids[0].svid.clone();

    let t1 = token(fetch(&mut client, &["ab", "cd"], "").await.unwrap());
    assert_eq!(server.calls(), 1);
    // Same set, other order, a repeat: the same token, no call.
    let t2 = token(fetch(&mut client, &["cd", "ab", "cd"], "").await.unwrap());
    assert_eq!(t1, t2);
    assert_eq!(server.calls(), 1);
    // spire#4309: {"a","bcd"} joins to the same string as {"ab","cd"}; it is another set.
    let t3 = token(fetch(&mut client, &["a", "bcd"], "").await.unwrap());
    assert_eq!(server.calls(), 2);
    assert_ne!(t3, t1);
    assert_eq!(verified(&t3, &bundle, "a")["aud"], json!(["a", "bcd"]));
    assert!(
        crate::workload_api::jwt::validate(&bundle, &[], "ab", &t3, SystemTime::now()).is_err(),
        "the {{a,bcd}} token is not for ab"
    );
    assert_eq!(h.cache.current().svids.len(), 1);
    // Hits and misses are counted (the metrics are process-wide: other tests add to them).
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, crate::metrics::metrics().registry())
        .unwrap();
    for source in ["cache", "server"] {
        let line = format!("carapace_agent_workload_jwt_svids_total{{source=\"{source}\"}} ");
        assert!(text.contains(&line), "{line} in {text}");
    }

    // A token past its half-life is renewed.
    *server.node.dating.lock().unwrap() = Dating::PastHalfLife;
    let old = token(fetch(&mut client, &["x"], "").await.unwrap());
    assert_eq!(server.calls(), 3);
    let renewed = token(fetch(&mut client, &["x"], "").await.unwrap());
    assert_eq!(server.calls(), 4, "past its half-life: asked again");
    assert_ne!(old, renewed);
}

#[tokio::test]
async fn tokens_of_a_tainted_or_removed_key_are_not_served_again() {
    let k1 = Arc::new(Key::new("k1", KeyType::EcP256));
    let k2 = Arc::new(Key::new("k2", KeyType::EcP384));
    let server = Server::start(k1.clone(), &[("e", "web")]).await;
    let h = Harness::start_with_server(
        Pki::new("test CA"),
        ServerLink::fixed(server.client().await),
        100,
    )
    .await;
    let me = uid_sel(my_uid());
    let svid = h.pki.svid("e", "web", std::slice::from_ref(&me), "");
    h.cache
        .replace(jwt_bundle(&h.pki, &[&k1, &k2], &[]), vec![svid.clone()]);
    let mut client = h.client().await;
    let kid_of = |t: &str| -> String {
        let parts = carapace_core::jose::split(t, 16 * 1024).unwrap();
        let header: Value = serde_json::from_slice(&parts.header).unwrap();
        header["kid"].as_str().unwrap().to_owned()
    };

    let t1 = fetch(&mut client, &["svc"], "").await.unwrap().svids[0]
        .svid
        .clone();
    assert_eq!(kid_of(&t1), "k1");
    assert_eq!(server.calls(), 1);

    // The operator taints k1; the server signs with k2 from now on. The cached k1 token
    // is never served again.
    *server.node.key.lock().unwrap() = k2.clone();
    let tainted = jwt_bundle(&h.pki, &[&k1, &k2], &["k1"]);
    h.cache.replace(tainted.clone(), vec![svid.clone()]);
    let t2 = fetch(&mut client, &["svc"], "").await.unwrap().svids[0]
        .svid
        .clone();
    assert_eq!(server.calls(), 2);
    assert_eq!(kid_of(&t2), "k2");
    verified(&t2, &tainted, "svc");
    let t3 = fetch(&mut client, &["svc"], "").await.unwrap().svids[0]
        .svid
        .clone();
    assert_eq!(t3, t2, "the k2 token is cached");
    assert_eq!(server.calls(), 2);

    // k2 leaves the bundle (the server went back to k1, untainted): its token goes.
    *server.node.key.lock().unwrap() = k1.clone();
    h.cache
        .replace(jwt_bundle(&h.pki, &[&k1], &[]), vec![svid.clone()]);
    let t4 = fetch(&mut client, &["svc"], "").await.unwrap().svids[0]
        .svid
        .clone();
    assert_eq!(server.calls(), 3);
    assert_eq!(kid_of(&t4), "k1");

    // A token signed with a key the agent does not hold is refused, not served.
    let k3 = Arc::new(Key::new("k3", KeyType::EcP256));
    *server.node.key.lock().unwrap() = k3;
    let e = fetch(&mut client, &["other"], "").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message()
            .contains("the server returned an unusable JWT-SVID")
            && e.message().contains("\"k3\""),
        "{e:?}"
    );
}

#[tokio::test]
async fn an_unreachable_server_gets_a_valid_cached_token_served_else_unavailable() {
    let k1 = Arc::new(Key::new("k1", KeyType::EcP256));
    let server = Server::start(k1.clone(), &[("e", "web")]).await;
    let (publisher, link) = ServerLink::new();
    publisher.publish(Some(server.client().await));
    let h = Harness::start_with_server(Pki::new("test CA"), link, 100).await;
    let bundle = jwt_bundle(&h.pki, &[&k1], &[]);
    h.cache.replace(
        bundle.clone(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = h.client().await;
    // A token past its half-life (still valid for 100 s) is cached.
    *server.node.dating.lock().unwrap() = Dating::PastHalfLife;
    let held = fetch(&mut client, &["svc"], "").await.unwrap().svids[0]
        .svid
        .clone();

    // The server answers but does not sign (one without JWT support): the valid token
    // is served; without one, Unavailable saying what the server answered.
    *server.node.fail.lock().unwrap() = Some(Code::Unimplemented);
    let got = fetch(&mut client, &["svc"], "").await.unwrap().svids[0]
        .svid
        .clone();
    assert_eq!(got, held);
    let e = fetch(&mut client, &["new"], "").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().ends_with(
            "the server did not sign it: JWT-SVIDs are not supported yet (Unimplemented)"
        ),
        "{e:?}"
    );

    // The server cannot be reached: the valid token is served.
    let dir = tempfile::tempdir().unwrap();
    publisher.publish(Some(unreachable_client(dir.path())));
    let got = fetch(&mut client, &["svc"], "").await.unwrap().svids[0]
        .svid
        .clone();
    assert_eq!(got, held);
    // Nothing cached for this audience: Unavailable, saying why.
    let e = fetch(&mut client, &["other"], "").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().starts_with(
            "cannot get a JWT-SVID for spiffe://example.org/web: the server could not be reached"
        ),
        "{e:?}"
    );
    // No identity (the agent lost its own): the same.
    publisher.publish(None);
    assert_eq!(
        fetch(&mut client, &["svc"], "").await.unwrap().svids[0].svid,
        held
    );
    let e = fetch(&mut client, &["other"], "").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("no connection to the server"), "{e:?}");

    // A tainted key's token is not served even then.
    h.cache.replace(
        jwt_bundle(&h.pki, &[&k1], &["k1"]),
        h.cache.current().svids.clone(),
    );
    let e = fetch(&mut client, &["svc"], "").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
}

#[tokio::test]
async fn concurrent_callers_of_one_identity_and_audience_set_cost_one_signature() {
    let k1 = Arc::new(Key::new("k1", KeyType::EcP256));
    let server = Server::start(k1.clone(), &[("e", "web")]).await;
    let h = Harness::start_with_server(
        Pki::new("test CA"),
        ServerLink::fixed(server.client().await),
        100,
    )
    .await;
    h.cache.replace(
        jwt_bundle(&h.pki, &[&k1], &[]),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    *server.node.delay.lock().unwrap() = Duration::from_millis(300);
    let mut calls = Vec::new();
    for _ in 0..10 {
        let mut client = h.client().await;
        calls.push(tokio::spawn(async move {
            fetch(&mut client, &["burst"], "").await.unwrap().svids[0]
                .svid
                .clone()
        }));
    }
    let mut tokens = BTreeSet::new();
    for c in calls {
        tokens.insert(c.await.unwrap());
    }
    assert_eq!(server.calls(), 1, "one signature for ten callers");
    assert_eq!(tokens.len(), 1, "all got the same token");
    // Another audience set is not held up by this one's gate, nor shares its token.
    let mut client = h.client().await;
    let other = fetch(&mut client, &["other"], "").await.unwrap().svids[0]
        .svid
        .clone();
    assert!(!tokens.contains(&other));
    assert_eq!(server.calls(), 2);
}

#[tokio::test]
async fn renewal_gates_are_released_on_success_failure_and_cancellation() {
    use crate::workload_api::jwt::JwtService;
    let k1 = Arc::new(Key::new("k1", KeyType::EcP256));
    let server = Server::start(k1.clone(), &[("e", "web")]).await;
    let pki = Pki::new("test CA");
    let bundle = jwt_bundle(&pki, &[&k1], &[]);
    let svid = pki.svid("e", "web", &[uid_sel(my_uid())], "");
    let auds = vec!["svc".to_owned()];

    let service = Arc::new(JwtService::new(
        ServerLink::fixed(server.client().await),
        10,
    ));
    assert!(
        service
            .token_for(&svid, &auds, &bundle)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(service.renewing(), 0);

    let offline = JwtService::new(ServerLink::none(), 10);
    assert!(offline.token_for(&svid, &auds, &bundle).await.is_err());
    assert_eq!(offline.renewing(), 0);

    // A caller that goes away while the server is slow leaves no gate behind.
    *server.node.delay.lock().unwrap() = Duration::from_secs(5);
    let task = {
        let (service, svid, bundle) = (service.clone(), svid.clone(), bundle.clone());
        tokio::spawn(async move {
            let _ = service
                .token_for(&svid, &["other".to_owned()], &bundle)
                .await;
        })
    };
    for _ in 0..100 {
        if service.renewing() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(service.renewing(), 1);
    task.abort();
    let _ = task.await;
    assert_eq!(service.renewing(), 0);
}

#[tokio::test]
async fn the_cache_stays_within_its_bound() {
    let k1 = Arc::new(Key::new("k1", KeyType::EcP256));
    let server = Server::start(k1.clone(), &[("e", "web")]).await;
    let pki = Pki::new("test CA");
    let h = Harness::start_with_server(pki, ServerLink::fixed(server.client().await), 5).await;
    h.cache.replace(
        jwt_bundle(&h.pki, &[&k1], &[]),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = h.client().await;
    for i in 0..20 {
        fetch(&mut client, &[&format!("aud-{i}")], "")
            .await
            .unwrap();
    }
    assert_eq!(server.calls(), 20);
    // The five most recent are held; the first is gone and is asked for again.
    fetch(&mut client, &["aud-19"], "").await.unwrap();
    assert_eq!(server.calls(), 20);
    fetch(&mut client, &["aud-0"], "").await.unwrap();
    assert_eq!(server.calls(), 21);
}

// ---------------------------------------------------------------- FetchJWTBundles

#[tokio::test]
async fn jwt_bundles_are_jwks_keyed_by_trust_domain_and_follow_key_changes() {
    let k1 = Key::new("k1", KeyType::EcP256);
    let k2 = Key::new("k2", KeyType::Rsa2048);
    let h = Harness::start().await;
    let svids = vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")];
    // No JWT key yet: an empty key set.
    h.cache.replace(h.pki.bundle(), svids.clone());
    let mut client = h.client().await;
    let mut stream = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.bundles.len(), 1);
    let doc: Value = serde_json::from_slice(&first.bundles["spiffe://example.org"]).unwrap();
    assert_eq!(doc, json!({ "keys": [] }));

    // Keys arrive: a message with both, in the standard JWK form.
    h.cache
        .replace(jwt_bundle(&h.pki, &[&k1, &k2], &[]), svids.clone());
    let second = next_message(&mut stream).await.unwrap().unwrap();
    let jwks = &second.bundles["spiffe://example.org"];
    let doc: Value = serde_json::from_slice(jwks).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["kid"], "k1");
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert!(keys[0]["x"].is_string() && keys[0]["y"].is_string());
    assert_eq!(keys[1]["kid"], "k2");
    assert_eq!(keys[1]["kty"], "RSA");
    assert!(keys[1]["n"].is_string() && keys[1]["e"] == "AQAB");
    for k in keys {
        assert_eq!(k["use"], "jwt-svid");
    }
    // The document is a JWKS the one JOSE implementation reads back: a token of k1
    // verifies with it.
    let set =
        carapace_core::jose::KeySet::from_jwks_json(jwks, &carapace_core::jose::Algorithm::ALL)
            .unwrap();
    let token = k1.sign(good_claims("spiffe://example.org/web", json!(["a"])));
    let policy = carapace_core::jose::Policy::new(
        &carapace_core::jose::Algorithm::ALL,
        SystemTime::now(),
        Duration::from_secs(5),
    );
    carapace_core::jose::verify(&token, &set, &policy).unwrap();

    // Unrelated changes send nothing: an SVID rotation, a new X.509 authority, a taint.
    h.cache.replace(
        jwt_bundle(&h.pki, &[&k1, &k2], &[]),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut b = (*jwt_bundle(&h.pki, &[&k1, &k2], &["k1"])).clone();
    b.x509_authorities.push(Pki::new("next CA").ca_der);
    b.sequence += 1;
    h.cache.replace(Arc::new(b), svids.clone());
    assert_quiet(&mut stream).await;

    // A key leaves: a message.
    h.cache
        .replace(jwt_bundle(&h.pki, &[&k2], &[]), svids.clone());
    let third = next_message(&mut stream).await.unwrap().unwrap();
    let doc: Value = serde_json::from_slice(&third.bundles["spiffe://example.org"]).unwrap();
    assert_eq!(doc["keys"].as_array().unwrap().len(), 1);
    assert_eq!(doc["keys"][0]["kid"], "k2");

    // The CLI prints the same document.
    let json_text = api_cli::fetch_jwt_bundle(&h.socket, true).await.unwrap();
    let v: Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(v["spiffe://example.org"], doc);
    let text = api_cli::fetch_jwt_bundle(&h.socket, false).await.unwrap();
    assert!(
        text.contains("Trust domain spiffe://example.org: 1 JWT key"),
        "{text}"
    );

    // Without an identity: PermissionDenied, as for the X.509 bundles.
    h.cache.replace(jwt_bundle(&h.pki, &[&k2], &[]), vec![]);
    let e = next_message(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Without the security header: InvalidArgument.
    let mut raw = SpiffeWorkloadApiClient::new(api_cli::channel(&h.socket).await.unwrap());
    let e = raw
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

// ---------------------------------------------------------------- ValidateJWTSVID

fn refusal(bundle: &TrustBundle, aud: &str, token: &str) -> String {
    crate::workload_api::jwt::validate(bundle, &[], aud, token, SystemTime::now()).unwrap_err()
}

#[test]
fn validation_accepts_the_asymmetric_algorithms_and_returns_aud_as_an_array() {
    let pki = Pki::new("test CA");
    let es256 = Key::new("es256", KeyType::EcP256);
    let es384 = Key::new("es384", KeyType::EcP384);
    let rs256 = Key::new("rs256", KeyType::Rsa2048);
    let bundle = jwt_bundle(&pki, &[&es256, &es384, &rs256], &[]);
    for key in [&es256, &es384, &rs256] {
        // `aud` as a string: returned as an array.
        let token = key.sign(good_claims("spiffe://example.org/web", json!("svc")));
        let (id, claims) =
            crate::workload_api::jwt::validate(&bundle, &[], "svc", &token, SystemTime::now())
                .unwrap();
        assert_eq!(id, "spiffe://example.org/web".parse::<SpiffeId>().unwrap());
        assert_eq!(claims["aud"], json!(["svc"]), "{}", key.kid);
        assert_eq!(claims["sub"], "spiffe://example.org/web");
    }
    // PS256 with the RSA key (signed by hand: key managers sign PKCS#1 v1.5 only).
    let pkcs8 = generate_pkcs8(KeyType::Rsa2048).unwrap();
    let pss = SoftKey::from_pkcs8("pss", &pkcs8).unwrap();
    let kp = ring::signature::RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "PS256", "kid": "pss"}).to_string()),
        URL_SAFE_NO_PAD.encode(good_claims("spiffe://example.org/web", json!(["svc"])).to_string())
    );
    let mut sig = vec![0; kp.public().modulus_len()];
    kp.sign(
        &ring::signature::RSA_PSS_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
    let mut b = (*bundle).clone();
    b.jwt_authorities.push(JwtKey {
        kid: "pss".into(),
        public_key_der: pss.public_key_der().to_vec(),
        expires_at: None,
    });
    crate::workload_api::jwt::validate(&b, &[], "svc", &token, SystemTime::now()).unwrap();
}

#[test]
fn validation_refuses_alg_none_and_hs256_signed_with_the_public_key() {
    let pki = Pki::new("test CA");
    let k = Key::new("k1", KeyType::EcP256);
    let bundle = jwt_bundle(&pki, &[&k], &[]);
    let claims = good_claims("spiffe://example.org/web", json!(["svc"]));
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());

    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "k1"})),
        b64(&claims)
    );
    let e = refusal(&bundle, "svc", &none);
    assert!(e.contains("algorithm is \"none\""), "{e}");

    // HS256 with the public key (SPKI DER, and as PEM) as the HMAC secret.
    let spki = k.signer.public_key_der().to_vec();
    let pem = carapace_core::bundle::pem_block("PUBLIC KEY", &spki);
    for secret in [spki.clone(), pem.into_bytes()] {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": "HS256", "kid": "k1"})),
            b64(&claims)
        );
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            input.as_bytes(),
        );
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
        let e = refusal(&bundle, "svc", &token);
        assert!(e.contains("algorithm is \"HS256\""), "{e}");
    }
    // The algorithm must match the key: ES384 claimed for a P-256 key.
    let token = k.forge(&json!({"alg": "ES384", "kid": "k1"}), &claims);
    let e = refusal(&bundle, "svc", &token);
    assert!(e.contains("does not match key"), "{e}");
}

#[test]
fn validation_refuses_a_missing_or_unknown_kid_and_a_bad_signature() {
    let pki = Pki::new("test CA");
    let k = Key::new("k1", KeyType::EcP256);
    let other = Key::new("k1", KeyType::EcP256); // same kid, another key
    let bundle = jwt_bundle(&pki, &[&k], &[]);
    let claims = good_claims("spiffe://example.org/web", json!(["svc"]));

    let token = k.forge(&json!({"alg": "ES256"}), &claims);
    let e = refusal(&bundle, "svc", &token);
    assert!(e.contains("no \"kid\""), "{e}");

    let stranger = Key::new("k9", KeyType::EcP256);
    let e = refusal(&bundle, "svc", &stranger.sign(claims.clone()));
    assert!(
        e.contains("\"k9\", which is not among the configured keys"),
        "{e}"
    );

    let e = refusal(&bundle, "svc", &other.sign(claims.clone()));
    assert!(e.contains("signature does not verify"), "{e}");

    // A token whose kid the agent held once but no longer does.
    let e = refusal(&jwt_bundle(&pki, &[], &[]), "svc", &k.sign(claims));
    assert!(e.contains("not among the configured keys"), "{e}");
}

#[test]
fn validation_refuses_expired_and_not_yet_valid_tokens() {
    let pki = Pki::new("test CA");
    let k = Key::new("k1", KeyType::EcP256);
    let bundle = jwt_bundle(&pki, &[&k], &[]);
    let sub = "spiffe://example.org/web";
    let expired =
        k.sign(json!({"sub": sub, "aud": ["svc"], "iat": now() - 600, "exp": now() - 60}));
    let e = refusal(&bundle, "svc", &expired);
    assert!(e.contains("expired at"), "{e}");
    let no_exp = k.sign(json!({"sub": sub, "aud": ["svc"], "iat": now()}));
    let e = refusal(&bundle, "svc", &no_exp);
    assert!(e.contains("no \"exp\""), "{e}");
    let early = k.sign(json!({"sub": sub, "aud": ["svc"], "nbf": now() + 120, "exp": now() + 600}));
    let e = refusal(&bundle, "svc", &early);
    assert!(e.contains("not valid before"), "{e}");
    let future =
        k.sign(json!({"sub": sub, "aud": ["svc"], "iat": now() + 120, "exp": now() + 600}));
    let e = refusal(&bundle, "svc", &future);
    assert!(e.contains("issued in the future"), "{e}");
    // Within the leeway: accepted.
    let skewed = k.sign(json!({"sub": sub, "aud": ["svc"], "iat": now() + 10, "exp": now() - 10}));
    crate::workload_api::jwt::validate(&bundle, &[], "svc", &skewed, SystemTime::now()).unwrap();
}

#[test]
fn validation_refuses_another_audience_and_a_foreign_or_malformed_subject() {
    let pki = Pki::new("test CA");
    let k = Key::new("k1", KeyType::EcP256);
    let bundle = jwt_bundle(&pki, &[&k], &[]);

    let token = k.sign(good_claims(
        "spiffe://example.org/web",
        json!(["svc", "other"]),
    ));
    let e = refusal(&bundle, "evil", &token);
    assert!(e.contains("does not include \"evil\""), "{e}");
    let e = refusal(&bundle, "sv", &token);
    assert!(
        e.contains("does not include"),
        "a prefix is not the audience: {e}"
    );
    let no_aud = k.sign(json!({"sub": "spiffe://example.org/web", "exp": now() + 60}));
    assert!(refusal(&bundle, "svc", &no_aud).contains("does not include"));

    for sub in [
        "web",
        "https://example.org/web",
        "spiffe://Example.org/web",
        "",
    ] {
        let token = k.sign(good_claims(sub, json!(["svc"])));
        let e = refusal(&bundle, "svc", &token);
        assert!(
            e.contains("not a SPIFFE ID") || e.contains("\"sub\""),
            "{sub:?}: {e}"
        );
    }
    let no_sub = k.sign(json!({"aud": ["svc"], "exp": now() + 60}));
    assert!(refusal(&bundle, "svc", &no_sub).contains("no \"sub\""));

    // Signed by a key this agent trusts, but for another trust domain: refused, since the
    // agent holds no key of that trust domain.
    let token = k.sign(good_claims("spiffe://other.org/web", json!(["svc"])));
    let e = refusal(&bundle, "svc", &token);
    assert!(
        e.contains("trust domain other.org, whose keys this caller may not use"),
        "{e}"
    );
}

#[tokio::test]
async fn validate_jwt_svid_over_the_socket_and_the_cli() {
    let k = Key::new("k1", KeyType::EcP256);
    let h = Harness::start().await;
    // A verifier needs no identity of its own.
    h.cache.replace(jwt_bundle(&h.pki, &[&k], &[]), vec![]);
    let mut client = h.client().await;
    let token = k.sign(good_claims("spiffe://example.org/web", json!("svc")));

    let e = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: String::new(),
            svid: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "audience is required");
    let e = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "svid is required");

    let ok = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://example.org/web");
    let claims = ok.claims.unwrap();
    use prost_types::value::Kind;
    match &claims.fields["aud"].kind {
        Some(Kind::ListValue(l)) => {
            assert_eq!(l.values.len(), 1);
            assert_eq!(l.values[0].kind, Some(Kind::StringValue("svc".into())));
        }
        other => panic!("aud is not a list: {other:?}"),
    }
    assert!(matches!(
        claims.fields["exp"].kind,
        Some(Kind::NumberValue(_))
    ));

    let e = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "evil".into(),
            svid: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("does not include \"evil\""), "{e:?}");

    // Without the security header: InvalidArgument, nothing validated.
    let mut raw = SpiffeWorkloadApiClient::new(api_cli::channel(&h.socket).await.unwrap());
    let e = raw
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "security header missing from request");

    // The CLI.
    let text = api_cli::validate_jwt(&h.socket, "svc", &token, false)
        .await
        .unwrap();
    assert!(
        text.contains("SPIFFE ID:  spiffe://example.org/web"),
        "{text}"
    );
    let v: Value = serde_json::from_str(
        &api_cli::validate_jwt(&h.socket, "svc", &token, true)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(v["claims"]["aud"], json!(["svc"]));
    assert!(v["claims"]["exp"].is_i64(), "{v}");
    let e = api_cli::validate_jwt(&h.socket, "evil", &token, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the JWT-SVID is not valid") && e.contains("does not include \"evil\""),
        "{e}"
    );
    assert!(!e.contains(&token), "the token is not echoed: {e}");
}

// ---------------------------------------------------------------- federation

/// The bundle of the foreign trust domain `td` with the JWT keys `keys`.
fn foreign_jwt_bundle(td: &str, keys: &[&Key]) -> Arc<TrustBundle> {
    let mut b = TrustBundle::new(carapace_core::TrustDomain::new(td).unwrap());
    b.x509_authorities = vec![Pki::new(&format!("{td} CA")).ca_der];
    b.jwt_authorities = keys.iter().map(|k| k.jwt_key()).collect();
    Arc::new(b)
}

#[tokio::test]
async fn federated_jwt_bundles_and_validation_for_entitled_callers_only() {
    let own_key = Key::new("own", KeyType::EcP256);
    // A foreign trust domain's signing key, made with the soft key manager; the token is
    // signed by it as that trust domain's server would.
    let a_key = Key::new("a-1", KeyType::EcP256);
    let b_key = Key::new("b-1", KeyType::EcP384);
    let h = Harness::start().await;
    let own = jwt_bundle(&h.pki, &[&own_key], &[]);
    let a = foreign_jwt_bundle("a.org", &[&a_key]);
    let b = foreign_jwt_bundle("b.org", &[&b_key]);
    // Another workload's entry federates with b.org: the agent holds it for that one.
    let (web, other) = caller_and_other_federating_with_b(&h.pki);
    h.cache.replace_all(
        own.clone(),
        federated(&[&a, &b]),
        vec![federating(&web, &["a.org"]), other.clone()],
    );
    let mut client = h.client().await;

    // FetchJWTBundles: the own JWKS and a.org's, not b.org's.
    let mut stream = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next_message(&mut stream).await.unwrap().unwrap();
    let mut tds: Vec<&str> = first.bundles.keys().map(String::as_str).collect();
    tds.sort_unstable();
    assert_eq!(tds, ["spiffe://a.org", "spiffe://example.org"]);
    assert_eq!(
        first.bundles["spiffe://a.org"],
        jwt::jwks(&a),
        "the same encoding"
    );
    let doc: Value = serde_json::from_slice(&first.bundles["spiffe://a.org"]).unwrap();
    assert_eq!(doc["keys"][0]["kid"], "a-1");
    assert_eq!(doc["keys"][0]["use"], "jwt-svid");
    // A new key in a.org reaches the open stream; a new key in b.org does not.
    let a_next = Key::new("a-2", KeyType::Rsa2048);
    let b2 = foreign_jwt_bundle("b.org", &[&b_key, &a_next]);
    h.cache.replace_all(
        own.clone(),
        federated(&[&a, &b2]),
        vec![federating(&web, &["a.org"]), other.clone()],
    );
    assert_quiet(&mut stream).await;
    let mut a2 = (*a).clone();
    a2.jwt_authorities.push(a_next.jwt_key());
    let a2 = Arc::new(a2);
    h.cache.replace_all(
        own.clone(),
        federated(&[&a2, &b2]),
        vec![federating(&web, &["a.org"]), other.clone()],
    );
    let second = next_message(&mut stream).await.unwrap().unwrap();
    let doc: Value = serde_json::from_slice(&second.bundles["spiffe://a.org"]).unwrap();
    assert_eq!(doc["keys"].as_array().unwrap().len(), 2);
    assert!(!second.bundles.contains_key("spiffe://b.org"));

    // ValidateJWTSVID: a.org's token verifies with a.org's key.
    let token = a_key.sign(good_claims("spiffe://a.org/client", json!(["svc"])));
    let ok = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://a.org/client");
    // A token claiming a.org but signed by b.org's key: refused (kid not in a.org).
    let forged = b_key.sign(good_claims("spiffe://a.org/client", json!(["svc"])));
    let e = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: forged,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("not among the configured keys"),
        "{e:?}"
    );
    // b.org's own token: the agent holds b.org's key, but for another workload.
    let b_token = b_key.sign(good_claims("spiffe://b.org/client", json!(["svc"])));
    let e = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: b_token,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("trust domain b.org, whose keys this caller may not use"),
        "{e:?}"
    );

    // The caller's entry no longer federates with a.org (the agent still holds it):
    // the same token is refused, naming the trust domain, and the JWKS is gone.
    h.cache.replace_all(
        own.clone(),
        federated(&[&a2, &b2]),
        vec![web.clone(), other.clone()],
    );
    let third = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(
        third.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://example.org"]
    );
    let e = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("trust domain a.org, whose keys this caller may not use"),
        "{e:?}"
    );
    // Nor for a caller with no identity at all.
    h.cache
        .replace_all(own, federated(&[&a2, &b2]), vec![other]);
    let e = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: token,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("trust domain a.org"), "{e:?}");
}
