//! Workload API tests over a real Unix socket, with the real generated tonic client and
//! the real `unix` attestor identifying this test process through the kernel.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carapace_core::plugin::Caller;
use carapace_core::{EntryId, Selector, TrustBundle, TrustDomain};
use carapace_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use carapace_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
    X509svidResponse,
};
use tonic::Code;
use zeroize::Zeroizing;

use super::*;
use crate::api_cli;
use crate::cache::{CachedSvid, SvidCache};
use crate::workload_attestor::unix::{UnixAttestorConfig, UnixWorkloadAttestor};

// ---------------------------------------------------------------- PKI for the tests

struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_der: Vec<u8>,
}

impl Pki {
    fn new(cn: &str) -> Pki {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = p.self_signed(&kp).unwrap();
        Pki {
            ca_der: cert.der().to_vec(),
            issuer: rcgen::Issuer::new(p, kp),
        }
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        let mut b = TrustBundle::new(td());
        b.x509_authorities = vec![self.ca_der.clone()];
        Arc::new(b)
    }

    /// A leaf X509-SVID for `spiffe://example.org/<path>`: (chain, PKCS#8 key, notAfter).
    fn leaf(&self, path: &str) -> (Vec<Vec<u8>>, Vec<u8>, i64) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let id = format!("spiffe://example.org/{path}");
        p.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(id).unwrap(),
        )];
        let not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let not_after = not_after.replace_nanosecond(0).unwrap();
        p.not_after = not_after;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        let cert = p.signed_by(&kp, &self.issuer).unwrap();
        (
            vec![cert.der().to_vec()],
            kp.serialize_der(),
            not_after.unix_timestamp(),
        )
    }

    fn svid(&self, entry: &str, path: &str, selectors: &[String], hint: &str) -> Arc<CachedSvid> {
        let (cert_chain, key, expires_at) = self.leaf(path);
        Arc::new(CachedSvid {
            entry_id: EntryId::new(entry).unwrap(),
            spiffe_id: format!("spiffe://example.org/{path}").parse().unwrap(),
            selectors: selectors
                .iter()
                .map(|s| s.parse::<Selector>().unwrap())
                .collect(),
            hint: hint.to_owned(),
            federates_with: Vec::new(),
            cert_chain,
            private_key_pkcs8: Zeroizing::new(key),
            expires_at,
        })
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn my_gid() -> u32 {
    rustix::process::getegid().as_raw()
}

fn uid_sel(uid: u32) -> String {
    format!("unix:uid:{uid}")
}

fn gid_sel(gid: u32) -> String {
    format!("unix:gid:{gid}")
}

// ---------------------------------------------------------------- the server under test

struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    cache: SvidCache,
    pki: Pki,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl Harness {
    async fn start() -> Harness {
        let pki = Pki::new("test CA");
        let cache = SvidCache::new(pki.bundle());
        let attestor: Arc<dyn WorkloadAttestor> =
            Arc::new(UnixWorkloadAttestor::new(UnixAttestorConfig::default()));
        Self::start_with(pki, cache, vec![attestor]).await
    }

    async fn start_with(
        pki: Pki,
        cache: SvidCache,
        attestors: Vec<Arc<dyn WorkloadAttestor>>,
    ) -> Harness {
        Self::start_full(pki, cache, attestors, None).await
    }

    /// A Workload API asking the server at `server` for JWT-SVIDs, caching at most
    /// `capacity`.
    async fn start_with_server(pki: Pki, server: ServerLink, capacity: usize) -> Harness {
        let cache = SvidCache::new(pki.bundle());
        let attestor: Arc<dyn WorkloadAttestor> =
            Arc::new(UnixWorkloadAttestor::new(UnixAttestorConfig::default()));
        Self::start_full(pki, cache, vec![attestor], Some((server, capacity))).await
    }

    async fn start_full(
        pki: Pki,
        cache: SvidCache,
        attestors: Vec<Arc<dyn WorkloadAttestor>>,
        server: Option<(ServerLink, usize)>,
    ) -> Harness {
        let mut api = WorkloadApi::new(cache.clone(), attestors);
        if let Some((server, capacity)) = server {
            api = api.with_server(server, capacity);
        }
        Self::serve(pki, cache, api).await
    }

    /// Serves `api` (whose cache is `cache`) on a socket in a fresh directory.
    async fn serve(pki: Pki, cache: SvidCache, api: WorkloadApi) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("public/api.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = socket.clone();
        let task = tokio::spawn(async move {
            serve(&path, api, async move {
                let _ = stopped.await;
            })
            .await
        });
        for _ in 0..200 {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Harness {
            _dir: dir,
            socket,
            cache,
            pki,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn client(&self) -> api_cli::WorkloadClient {
        api_cli::connect(&self.socket).await.unwrap()
    }

    async fn stop(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("serve did not return after shutdown")
            .unwrap()
    }
}

async fn next_message<T>(stream: &mut tonic::Streaming<T>) -> Result<Option<T>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no message within 10s")
}

async fn open_x509(client: &mut api_cli::WorkloadClient) -> tonic::Streaming<X509svidResponse> {
    client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn assert_quiet<T: std::fmt::Debug>(stream: &mut tonic::Streaming<T>) {
    let r = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(r.is_err(), "expected no message, got {r:?}");
}

fn ids(resp: &X509svidResponse) -> Vec<&str> {
    resp.svids.iter().map(|s| s.spiffe_id.as_str()).collect()
}

// ---------------------------------------------------------------- federation helpers

/// The bundle of the foreign trust domain `td` with `ca`'s certificate as its authority.
fn foreign_bundle(td: &str, cas: &[&Pki]) -> Arc<TrustBundle> {
    let mut b = TrustBundle::new(TrustDomain::new(td).unwrap());
    b.x509_authorities = cas.iter().map(|c| c.ca_der.clone()).collect();
    Arc::new(b)
}

/// `svid` whose entry federates with `tds`.
fn federating(svid: &Arc<CachedSvid>, tds: &[&str]) -> Arc<CachedSvid> {
    let mut s = (**svid).clone();
    s.federates_with = tds.iter().map(|t| TrustDomain::new(t).unwrap()).collect();
    Arc::new(s)
}

/// The two workloads of the federation tests (X.509, JWT and SDS APIs): this caller's
/// SVID (entry `e-web`, `spiffe://example.org/web`), federating with nothing yet, and
/// another workload's (another uid), whose entry federates with b.org: the agent holds
/// b.org for that one, never for this caller.
fn caller_and_other_federating_with_b(pki: &Pki) -> (Arc<CachedSvid>, Arc<CachedSvid>) {
    let web = pki.svid("e-web", "web", &[uid_sel(my_uid())], "");
    let other = federating(
        &pki.svid("e-other", "other", &[uid_sel(my_uid().wrapping_add(1))], ""),
        &["b.org"],
    );
    (web, other)
}

/// The agent-wide map of federated bundles.
fn federated(bundles: &[&Arc<TrustBundle>]) -> Arc<crate::cache::FederatedBundles> {
    Arc::new(
        bundles
            .iter()
            .map(|b| (b.trust_domain().clone(), (*b).clone()))
            .collect(),
    )
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn missing_or_wrong_security_header_is_invalid_argument() {
    let h = Harness::start().await;
    let mut raw = SpiffeWorkloadApiClient::new(api_cli::channel(&h.socket).await.unwrap());
    let e = raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "security header missing from request");
    let e = raw
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    for bad in ["false", "True", "true "] {
        let mut req = tonic::Request::new(X509svidRequest {});
        req.metadata_mut()
            .insert(SECURITY_HEADER, bad.parse().unwrap());
        let e = raw.fetch_x509svid(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "value {bad:?}");
    }
    // Twice is not "exactly once".
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .append(SECURITY_HEADER, "true".parse().unwrap());
    req.metadata_mut()
        .append(SECURITY_HEADER, "true".parse().unwrap());
    let e = raw.fetch_x509svid(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn nothing_registered_is_permission_denied() {
    let h = Harness::start().await;
    // An entry for another uid does not count.
    h.cache.replace(
        h.pki.bundle(),
        vec![
            h.pki
                .svid("other", "other", &[uid_sel(my_uid().wrapping_add(1))], ""),
        ],
    );
    let mut client = h.client().await;
    let mut stream = open_x509(&mut client).await;
    let e = next_message(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("no identity issued"), "{e:?}");
    assert!(
        next_message(&mut stream).await.unwrap().is_none(),
        "the stream ends"
    );

    let mut bundles = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let e = next_message(&mut bundles).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let e = api_cli::fetch_x509(&h.socket, None, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "no identity issued for this process (uid={}, gid={})",
            my_uid(),
            my_gid()
        )),
        "{e}"
    );
}

#[tokio::test]
async fn serves_the_matching_svid_and_follows_the_cache() {
    let h = Harness::start().await;
    let web = h.pki.svid("e-web", "web", &[uid_sel(my_uid())], "web");
    h.cache.replace(h.pki.bundle(), vec![web.clone()]);

    let mut client = h.client().await;
    let mut stream = open_x509(&mut client).await;
    let first = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    let got = &first.svids[0];
    assert_eq!(got.spiffe_id, "spiffe://example.org/web");
    assert_eq!(got.x509_svid, web.cert_chain.concat());
    assert_eq!(got.x509_svid_key, *web.private_key_pkcs8);
    assert_eq!(got.bundle, h.pki.ca_der);
    assert_eq!(got.hint, "web");
    assert!(first.federated_bundles.is_empty());
    assert!(first.crl.is_empty());
    // The key is a usable PKCS#8 key for the leaf.
    let kp = rcgen::KeyPair::try_from(got.x509_svid_key.as_slice()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&got.x509_svid).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&kp)
    );

    // A change that does not concern this workload sends nothing.
    let other = h
        .pki
        .svid("e-other", "other", &[uid_sel(my_uid().wrapping_add(1))], "");
    h.cache
        .replace(h.pki.bundle(), vec![web.clone(), other.clone()]);
    assert_quiet(&mut stream).await;

    // Rotation: a new leaf for the same entry is pushed on the open stream.
    let rotated = h.pki.svid("e-web", "web", &[uid_sel(my_uid())], "web");
    h.cache
        .replace(h.pki.bundle(), vec![rotated.clone(), other.clone()]);
    let second = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(second.svids.len(), 1);
    assert_eq!(second.svids[0].x509_svid, rotated.cert_chain.concat());
    assert_ne!(second.svids[0].x509_svid, first.svids[0].x509_svid);
    assert_eq!(second.svids[0].x509_svid_key, *rotated.private_key_pkcs8);

    // A bundle change (CA rotation) is pushed too, with the full state.
    let mut b = (*h.pki.bundle()).clone();
    let new_ca = Pki::new("next CA");
    b.x509_authorities.push(new_ca.ca_der.clone());
    h.cache
        .replace(Arc::new(b), vec![rotated.clone(), other.clone()]);
    let third = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(
        third.svids[0].bundle,
        [h.pki.ca_der.clone(), new_ca.ca_der].concat()
    );
    assert_eq!(third.svids[0].x509_svid, rotated.cert_chain.concat());

    // The identity goes away: PermissionDenied, and the stream ends.
    h.cache.replace(h.pki.bundle(), vec![other]);
    let e = next_message(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "no identity issued");
}

#[tokio::test]
async fn only_entries_whose_selectors_all_match_are_served_in_entry_order() {
    let h = Harness::start().await;
    let me = uid_sel(my_uid());
    let other_uid = uid_sel(my_uid().wrapping_add(1));
    let other_gid = gid_sel(my_gid().wrapping_add(1));
    h.cache.replace(
        h.pki.bundle(),
        vec![
            h.pki
                .svid("d", "d-uid-and-gid", &[me.clone(), gid_sel(my_gid())], "d"),
            h.pki.svid("a", "a-other-uid", &[other_uid], ""),
            h.pki
                .svid("c", "c-uid-wrong-gid", &[me.clone(), other_gid], ""),
            h.pki.svid("b", "b-uid", std::slice::from_ref(&me), "b"),
            h.pki.svid("e", "e-same-hint", &[me], "b"),
        ],
    );
    let mut client = h.client().await;
    let mut stream = open_x509(&mut client).await;
    let resp = next_message(&mut stream).await.unwrap().unwrap();
    // Entry-id order; "e" repeats hint "b" and is left out (hints must be unique).
    assert_eq!(
        ids(&resp),
        [
            "spiffe://example.org/b-uid",
            "spiffe://example.org/d-uid-and-gid"
        ]
    );
}

#[tokio::test]
async fn x509_bundles_are_keyed_by_trust_domain_id_and_follow_changes() {
    let h = Harness::start().await;
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = h.client().await;
    let mut stream = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.bundles.len(), 1);
    assert_eq!(first.bundles["spiffe://example.org"], h.pki.ca_der);

    // An SVID rotation does not change the bundle: nothing is sent.
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    assert_quiet(&mut stream).await;

    let extra = Pki::new("next CA");
    let mut b = (*h.pki.bundle()).clone();
    b.x509_authorities.push(extra.ca_der.clone());
    h.cache
        .replace(Arc::new(b), h.cache.current().svids.clone());
    let second = next_message(&mut stream).await.unwrap().unwrap();
    assert_eq!(
        second.bundles["spiffe://example.org"],
        [h.pki.ca_der.clone(), extra.ca_der].concat()
    );
}

#[tokio::test]
async fn federated_bundles_reach_entitled_callers_only_and_follow_changes() {
    let h = Harness::start().await;
    let (a_ca, a_next, b_ca) = (Pki::new("a CA"), Pki::new("a next CA"), Pki::new("b CA"));
    let a = foreign_bundle("a.org", &[&a_ca]);
    let b = foreign_bundle("b.org", &[&b_ca]);
    // This caller's entry federates with a.org (and with c.org, whose bundle the agent
    // does not hold); another workload's entry federates with b.org, which the agent
    // holds for it.
    let (plain, other) = caller_and_other_federating_with_b(&h.pki);
    let web = federating(&plain, &["a.org", "c.org"]);
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&a, &b]),
        vec![web.clone(), other.clone()],
    );
    let mut client = h.client().await;
    let mut svids = open_x509(&mut client).await;
    let first = next_message(&mut svids).await.unwrap().unwrap();
    assert_eq!(ids(&first), ["spiffe://example.org/web"]);
    assert_eq!(
        first.federated_bundles,
        HashMap::from([("spiffe://a.org".to_owned(), a_ca.ca_der.clone())]),
        "a.org only: not b.org (another workload's), not c.org (not held)"
    );
    assert_eq!(
        first.svids[0].bundle, h.pki.ca_der,
        "the own bundle per SVID"
    );
    let mut bundles = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next_message(&mut bundles).await.unwrap().unwrap();
    assert_eq!(
        first.bundles,
        HashMap::from([
            ("spiffe://example.org".to_owned(), h.pki.ca_der.clone()),
            ("spiffe://a.org".to_owned(), a_ca.ca_der.clone()),
        ])
    );

    // `api fetch` shows them.
    let text = api_cli::fetch_x509(&h.socket, None, false).await.unwrap();
    assert!(
        text.contains("Federated:    spiffe://a.org: 1 X.509 authority"),
        "{text}"
    );
    assert!(!text.contains("b.org"), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&api_cli::fetch_x509(&h.socket, None, true).await.unwrap()).unwrap();
    let fed = v["federated_bundles"].as_object().unwrap();
    assert_eq!(fed.len(), 1);
    assert_eq!(
        carapace_core::bundle::certs_from_pem(fed["spiffe://a.org"].as_str().unwrap()).unwrap(),
        vec![a_ca.ca_der.clone()]
    );

    // b.org changes: not this caller's, nothing is sent.
    let b2 = foreign_bundle("b.org", &[&b_ca, &a_next]);
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&a, &b2]),
        vec![web.clone(), other.clone()],
    );
    assert_quiet(&mut svids).await;
    assert_quiet(&mut bundles).await;

    // a.org gains an authority (a CA rotation over there): both open streams get it.
    let a2 = foreign_bundle("a.org", &[&a_ca, &a_next]);
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&a2, &b2]),
        vec![web.clone(), other.clone()],
    );
    let rotated = [a_ca.ca_der.clone(), a_next.ca_der.clone()].concat();
    let second = next_message(&mut svids).await.unwrap().unwrap();
    assert_eq!(second.federated_bundles["spiffe://a.org"], rotated);
    let second = next_message(&mut bundles).await.unwrap().unwrap();
    assert_eq!(second.bundles["spiffe://a.org"], rotated);

    // The agent no longer holds a.org: both streams drop it.
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&b2]),
        vec![web.clone(), other.clone()],
    );
    let third = next_message(&mut svids).await.unwrap().unwrap();
    assert!(third.federated_bundles.is_empty(), "{third:?}");
    let third = next_message(&mut bundles).await.unwrap().unwrap();
    assert_eq!(
        third.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://example.org"]
    );

    // The caller's entry stops federating (the agent holds both bundles): nothing
    // foreign, on the open streams and on new ones.
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&a2, &b2]),
        vec![web.clone(), other.clone()],
    );
    next_message(&mut svids).await.unwrap().unwrap();
    next_message(&mut bundles).await.unwrap().unwrap();
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&a2, &b2]),
        vec![plain, other.clone()],
    );
    let fourth = next_message(&mut svids).await.unwrap().unwrap();
    assert!(fourth.federated_bundles.is_empty(), "{fourth:?}");
    let fourth = next_message(&mut bundles).await.unwrap().unwrap();
    assert_eq!(
        fourth.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://example.org"]
    );
    let mut fresh = open_x509(&mut client).await;
    let got = next_message(&mut fresh).await.unwrap().unwrap();
    assert!(got.federated_bundles.is_empty(), "{got:?}");
}

#[tokio::test]
async fn socket_and_directory_modes_stale_socket_and_shutdown() {
    let mut h = Harness::start().await;
    let parent = h.socket.parent().unwrap().to_path_buf();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&parent), 0o755);
    assert_eq!(mode(&h.socket), 0o777);

    // Shutdown ends open streams (Unavailable) and serve returns.
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = h.client().await;
    let mut stream = open_x509(&mut client).await;
    next_message(&mut stream).await.unwrap().unwrap();
    h.stop().await.unwrap();
    let e = next_message(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // The socket file is left behind; a new server replaces it.
    assert!(h.socket.exists());
    let api = WorkloadApi::new(h.cache.clone(), vec![]);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let path = h.socket.clone();
    let task = tokio::spawn(async move {
        serve(&path, api, async {
            let _ = rx.await;
        })
        .await
    });
    let mut connected = false;
    for _ in 0..200 {
        if tokio::net::UnixStream::connect(&h.socket).await.is_ok() {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(connected);
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();

    // Something that is not a socket is never removed.
    let file = parent.join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let api = WorkloadApi::new(h.cache.clone(), vec![]);
    let e = serve(&file, api, async {}).await.unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

/// An attestor with fixed selectors, to reach the checks after attestation with callers
/// the `unix` attestor could not inspect.
#[derive(Debug)]
struct FixedAttestor(Result<Vec<Selector>, carapace_core::Error>);

#[async_trait::async_trait]
impl WorkloadAttestor for FixedAttestor {
    fn name(&self) -> &str {
        "fixed"
    }
    async fn attest(&self, _caller: &Caller) -> Result<Vec<Selector>, carapace_core::Error> {
        self.0.clone()
    }
}

fn request_from(peer: Peer) -> tonic::Request<X509svidRequest> {
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert(SECURITY_HEADER, "true".parse().unwrap());
    req.extensions_mut().insert(peer);
    req
}

#[tokio::test]
async fn a_caller_that_exited_is_unauthenticated_and_attestor_errors_are_unavailable() {
    let pki = Pki::new("test CA");
    let cache = SvidCache::new(pki.bundle());
    let sel: Selector = "unix:uid:0".parse().unwrap();
    cache.replace(
        pki.bundle(),
        vec![pki.svid("e", "web", &[sel.to_string()], "")],
    );
    let ok: Arc<dyn WorkloadAttestor> = Arc::new(FixedAttestor(Ok(vec![sel])));
    let api = WorkloadApi::new(cache.clone(), vec![ok]);

    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let peer = Peer::from_pid(pid, 0, 0).unwrap();

    // Alive: served.
    let resp = api
        .fetch_x509svid(request_from(peer.clone()))
        .await
        .unwrap();
    let mut stream = resp.into_inner();
    let first = futures::StreamExt::next(&mut stream)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&first), ["spiffe://example.org/web"]);

    // Exited (its PID may be reused from now on): refused.
    child.kill().unwrap();
    child.wait().unwrap();
    let e = api
        .fetch_x509svid(request_from(peer.clone()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(
        e.message(),
        "could not verify existence of the original caller"
    );

    let failing: Arc<dyn WorkloadAttestor> = Arc::new(FixedAttestor(Err(
        carapace_core::Error::WorkloadAttestation("boom".into()),
    )));
    let api = WorkloadApi::new(cache, vec![failing]);
    let me = Peer::from_pid(i32::try_from(std::process::id()).unwrap(), 0, 0).unwrap();
    let e = api.fetch_x509svid(request_from(me)).await.err().unwrap();
    assert_eq!(e.code(), Code::Unavailable);
}

/// An attestor that says it started, then waits to be released (or forever).
#[derive(Debug, Default)]
struct GatedAttestor {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
    selectors: Vec<Selector>,
}

#[async_trait::async_trait]
impl WorkloadAttestor for GatedAttestor {
    fn name(&self) -> &str {
        "gated"
    }
    async fn attest(&self, _caller: &Caller) -> Result<Vec<Selector>, carapace_core::Error> {
        self.entered.notify_one();
        self.release.notified().await;
        Ok(self.selectors.clone())
    }
}

fn one_svid_cache(sel: &Selector) -> SvidCache {
    let pki = Pki::new("test CA");
    let cache = SvidCache::new(pki.bundle());
    cache.replace(
        pki.bundle(),
        vec![pki.svid("e", "web", &[sel.to_string()], "")],
    );
    cache
}

#[tokio::test]
async fn a_caller_that_exits_mid_attestation_gets_nothing_and_loses_its_connection() {
    let sel: Selector = "unix:uid:0".parse().unwrap();
    let gated = Arc::new(GatedAttestor {
        selectors: vec![sel.clone()],
        ..GatedAttestor::default()
    });
    let api = WorkloadApi::new(
        one_svid_cache(&sel),
        vec![gated.clone() as Arc<dyn WorkloadAttestor>],
    );
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let peer = Peer::from_pid(i32::try_from(child.id()).unwrap(), 0, 0).unwrap();
    let call = tokio::spawn({
        let api = api.clone();
        let peer = peer.clone();
        async move { api.fetch_x509svid(request_from(peer)).await }
    });
    // The attestor has read what it reads; now the caller goes away.
    gated.entered.notified().await;
    child.kill().unwrap();
    child.wait().unwrap();
    gated.release.notify_one();
    let e = call.await.unwrap().err().unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(peer.connection_closed(), "the connection must be closed");
}

#[tokio::test]
async fn a_stuck_attestor_yields_unavailable_within_the_bound() {
    let sel: Selector = "unix:uid:0".parse().unwrap();
    // Never released: a /proc read that hangs.
    let stuck = Arc::new(GatedAttestor::default());
    let api = WorkloadApi::new(
        one_svid_cache(&sel),
        vec![stuck as Arc<dyn WorkloadAttestor>],
    )
    .with_attestation_timeout(Duration::from_millis(200));
    let me = Peer::from_pid(i32::try_from(std::process::id()).unwrap(), 0, 0).unwrap();
    let started = std::time::Instant::now();
    let e = api
        .fetch_x509svid(request_from(me.clone()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.message(), "workload attestation timed out");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The caller is fine; only the attestor was slow: the connection stays.
    assert!(!me.connection_closed());
}

#[tokio::test]
async fn fetch_x509_writes_files_and_never_prints_the_key() {
    let h = Harness::start().await;
    let web = h.pki.svid("a-web", "web", &[uid_sel(my_uid())], "web");
    let db = h.pki.svid("b-db", "db", &[uid_sel(my_uid())], "db");
    h.cache
        .replace(h.pki.bundle(), vec![db.clone(), web.clone()]);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("svids");

    // A pre-existing, world-readable svid.key is narrowed to 0600.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("svid.key"), "old").unwrap();
    std::fs::set_permissions(dir.join("svid.key"), std::fs::Permissions::from_mode(0o644)).unwrap();

    let text = api_cli::fetch_x509(&h.socket, Some(&dir), false)
        .await
        .unwrap();
    assert!(text.contains("spiffe://example.org/web"), "{text}");
    assert!(text.contains("spiffe://example.org/db"), "{text}");
    assert!(text.contains("Hint:       web"), "{text}");
    assert!(text.contains("Bundle:       1 X.509 authority"), "{text}");
    assert!(text.contains("CN=test CA"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("svid.key")), 0o600);
    assert_eq!(mode(&dir.join("svid.1.key")), 0o600);
    // The default identity (first entry id: "a-web") goes to svid.pem.
    let chain = std::fs::read_to_string(dir.join("svid.pem")).unwrap();
    let certs = carapace_core::bundle::certs_from_pem(&chain).unwrap();
    assert_eq!(certs, web.cert_chain);
    let other = carapace_core::bundle::certs_from_pem(
        &std::fs::read_to_string(dir.join("svid.1.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(other, db.cert_chain);
    let key = std::fs::read_to_string(dir.join("svid.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{key}");
    use rustls_pki_types::pem::PemObject as _;
    let key_der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key.as_bytes()).unwrap();
    assert_eq!(key_der.secret_pkcs8_der(), web.private_key_pkcs8.as_slice());
    let bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap();
    assert_eq!(
        carapace_core::bundle::certs_from_pem(&bundle).unwrap(),
        vec![h.pki.ca_der.clone()]
    );

    // JSON: the documented fields, no key.
    let json = api_cli::fetch_x509(&h.socket, None, true).await.unwrap();
    assert!(!json.contains("PRIVATE KEY"));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let first = &v["svids"][0];
    assert_eq!(first["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(first["hint"], "web");
    assert_eq!(first["expires_at_unix"], web.expires_at);
    assert!(first["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        carapace_core::bundle::certs_from_pem(first["chain_pem"].as_str().unwrap()).unwrap(),
        web.cert_chain
    );
    assert_eq!(
        carapace_core::bundle::certs_from_pem(first["bundle_pem"].as_str().unwrap()).unwrap(),
        vec![h.pki.ca_der.clone()]
    );
    assert_eq!(v["svids"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn watch_prints_a_line_per_message_and_healthcheck() {
    let h = Harness::start().await;
    // Alive but nothing registered: healthy.
    api_cli::healthcheck(&h.socket).await.unwrap();

    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    api_cli::healthcheck(&h.socket).await.unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let socket = h.socket.clone();
    let watcher = tokio::spawn(async move {
        api_cli::watch_x509(&socket, move |line| {
            let _ = tx.send(line);
        })
        .await
    });
    let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        line.contains("1 SVID: spiffe://example.org/web (serial "),
        "{line}"
    );
    let rotated = h.pki.svid("e", "web", &[uid_sel(my_uid())], "");
    h.cache.replace(h.pki.bundle(), vec![rotated]);
    let line2 = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(line, line2, "a new serial");
    h.cache.replace(h.pki.bundle(), vec![]);
    let e = watcher.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("no identity issued for this process"), "{e}");

    // No agent: unhealthy.
    let e = api_cli::healthcheck(&h.socket.with_file_name("missing.sock"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

/// Marks the child process [`a_recycled_pid_never_gets_the_svid_of_its_new_owner`] runs
/// itself as, inside a new PID namespace.
const PID_NS_CHILD: &str = "CARAPACE_TEST_PID_NS_CHILD";

/// A caller connects and exits; before its request is attested, its PID is given to a new
/// process that has an identity. The unix attestor, reading `/proc/<pid>` by number, now
/// sees the new process; the request must still be refused, because the caller's pidfd
/// shows the original process is gone, and the connection closed.
///
/// PIDs are recycled deterministically by writing `ns_last_pid` inside a PID namespace of
/// the test's own (`unshare --user --map-root-user --pid --fork --mount-proc`, no real
/// root needed): the test runs itself again there as PID 1.
#[test]
fn a_recycled_pid_never_gets_the_svid_of_its_new_owner() {
    const NAME: &str = "workload_api::tests::a_recycled_pid_never_gets_the_svid_of_its_new_owner";
    if std::env::var(PID_NS_CHILD).ok().as_deref() != Some(NAME) {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--pid",
                "--fork",
                "--mount-proc",
                "--",
            ])
            .arg(&exe)
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(PID_NS_CHILD, NAME)
            .output()
            .unwrap_or_else(|e| panic!("unshare (util-linux) is needed for this test: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("test result: ok. 1 passed;"),
            "the test in a new PID namespace failed ({}); unprivileged user namespaces must \
             be allowed (sysctl kernel.unprivileged_userns_clone=1) or run as root\n\
             stdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        return;
    }
    assert_eq!(
        std::process::id(),
        1,
        "runs as PID 1 of its own PID namespace"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
        let sel: Selector = format!("unix:path:{}", sleep.display()).parse().unwrap();
        let attestor = Arc::new(UnixWorkloadAttestor::new(UnixAttestorConfig::default()));
        let api = WorkloadApi::new(
            one_svid_cache(&sel),
            vec![attestor.clone() as Arc<dyn WorkloadAttestor>],
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();

        // The caller: connects, then waits for a byte on stdin and exits.
        let mut caller = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n\
                 print('connected', flush=True)\nsys.stdin.read(1)",
            ])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 is needed for this test: {e}"));
        let (stream, _) = listener.accept().await.unwrap();
        let peer = Peer::from_stream(&stream).unwrap();
        let pid = i32::try_from(caller.id()).unwrap();
        assert_eq!(peer.pid, pid, "SO_PEERCRED names the caller");

        // The caller exits and is reaped: its PID is free.
        drop(caller.stdin.take());
        assert!(caller.wait().unwrap().success());

        // The next process created gets the caller's PID.
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut owner = std::process::Command::new(&sleep)
            .arg("30")
            .spawn()
            .unwrap();
        assert_eq!(
            i32::try_from(owner.id()).unwrap(),
            pid,
            "the PID was recycled for the new process"
        );
        // What /proc/<pid> says now is the new owner, which has an identity: without
        // the pidfd check the caller would be given its SVID.
        let seen = attestor.attest(&peer.caller()).await.unwrap();
        assert!(seen.contains(&sel), "{seen:?}");

        let e = api
            .fetch_x509svid(request_from(peer.clone()))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(peer.connection_closed());

        owner.kill().unwrap();
        owner.wait().unwrap();
        drop(stream);
    });
}

#[tokio::test]
async fn a_caller_gone_before_attestation_is_unauthenticated_not_unavailable() {
    let sel: Selector = "unix:uid:0".parse().unwrap();
    let unix = Arc::new(UnixWorkloadAttestor::new(UnixAttestorConfig::default()));
    let api = WorkloadApi::new(
        one_svid_cache(&sel),
        vec![unix as Arc<dyn WorkloadAttestor>],
    );
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let peer = Peer::from_pid(i32::try_from(child.id()).unwrap(), 0, 0).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    // /proc/<pid> is gone, so the attestor fails; the reason is the caller's absence.
    let e = api
        .fetch_x509svid(request_from(peer.clone()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(peer.connection_closed());
}

#[path = "jwt_tests.rs"]
mod jwt_rpcs;

#[path = "sds_tests.rs"]
mod sds_rpcs;
