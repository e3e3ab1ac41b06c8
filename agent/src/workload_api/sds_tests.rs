//! SDS over the real socket with the real generated tonic client, the caller identified
//! by the kernel through the real `unix` attestor, as an Envoy would be: what Envoy
//! receives (secrets, PEM that parses, validators, versions and nonces) and what it does
//! not (answers to ACKs, stale requests and NACKs).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use carapace_proto::sds::envoy::config::core::v3::data_source::Specifier;
use carapace_proto::sds::envoy::config::core::v3::{BuildVersion, Node, node};
use carapace_proto::sds::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
};
use carapace_proto::sds::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use carapace_proto::sds::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use carapace_proto::sds::envoy::r#type::v3::SemanticVersion;
use carapace_proto::sds::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::*;
use crate::workload_api::sds::{
    SECRET_TYPE_URL, SPIFFE_VALIDATOR, SPIFFE_VALIDATOR_CONFIG_TYPE_URL, SdsConfig, build_secrets,
};

type SdsClient = SecretDiscoveryServiceClient<tonic::transport::Channel>;

/// A Workload API with SDS configured by `config`.
async fn start_sds(config: SdsConfig) -> Harness {
    let pki = Pki::new("test CA");
    let cache = SvidCache::new(pki.bundle());
    let attestor: Arc<dyn WorkloadAttestor> =
        Arc::new(UnixWorkloadAttestor::new(UnixAttestorConfig::default()));
    let api = WorkloadApi::new(cache.clone(), vec![attestor]).with_sds(config);
    Harness::serve(pki, cache, api).await
}

async fn sds_client(h: &Harness) -> SdsClient {
    SecretDiscoveryServiceClient::new(api_cli::channel(&h.socket).await.unwrap())
}

fn envoy_node(version: Option<(u32, u32)>) -> Option<Node> {
    Some(Node {
        id: "envoy-1".into(),
        cluster: "test".into(),
        user_agent_name: "envoy".into(),
        user_agent_version_type: version.map(|(major_number, minor_number)| {
            node::UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                version: Some(SemanticVersion {
                    major_number,
                    minor_number,
                    patch: 0,
                }),
                metadata: None,
            })
        }),
        ..Default::default()
    })
}

fn with_metadata(mut node: Option<Node>, value: prost_types::value::Kind) -> Option<Node> {
    if let Some(n) = node.as_mut() {
        n.metadata = Some(prost_types::Struct {
            fields: [(
                "disable_spiffe_cert_validation".to_owned(),
                prost_types::Value { kind: Some(value) },
            )]
            .into(),
        });
    }
    node
}

fn request(names: &[&str], node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest {
        node,
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    }
}

fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            a.to_msg::<Secret>().unwrap()
        })
        .collect()
}

fn names(secrets: &[Secret]) -> Vec<&str> {
    secrets.iter().map(|s| s.name.as_str()).collect()
}

fn inline_bytes(
    source: Option<&carapace_proto::sds::envoy::config::core::v3::DataSource>,
) -> &[u8] {
    match source.and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b,
        other => panic!("not inline bytes: {other:?}"),
    }
}

/// The DER blocks of a PEM text, with their labels.
fn pem_blocks(pem: &[u8]) -> Vec<(String, Vec<u8>)> {
    let text = std::str::from_utf8(pem).unwrap();
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            current = Some((label.to_owned(), String::new()));
        } else if let Some(label) = line
            .strip_prefix("-----END ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            let (begin, b64) = current.take().unwrap();
            assert_eq!(begin, label);
            out.push((begin, STANDARD.decode(b64).unwrap()));
        } else if let Some((_, b64)) = current.as_mut() {
            b64.push_str(line);
        }
    }
    assert!(current.is_none(), "unterminated PEM block");
    out
}

fn tls(secret: &Secret) -> &TlsCertificate {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(t)) => t,
        other => panic!("{} is not a TLS certificate: {other:?}", secret.name),
    }
}

fn validation(secret: &Secret) -> &CertificateValidationContext {
    match &secret.r#type {
        Some(secret::Type::ValidationContext(v)) => v,
        other => panic!("{} is not a validation context: {other:?}", secret.name),
    }
}

/// The SPIFFE validator's trust domains and their roots (DER), or `None` for a plain
/// `trusted_ca` context (whose roots are then in `trusted_ca`).
fn spiffe_domains(ctx: &CertificateValidationContext) -> Option<Vec<(String, Vec<Vec<u8>>)>> {
    let custom = ctx.custom_validator_config.as_ref()?;
    assert_eq!(custom.name, SPIFFE_VALIDATOR);
    assert!(ctx.trusted_ca.is_none());
    let config = custom
        .typed_config
        .as_ref()
        .unwrap()
        .to_msg::<SpiffeCertValidatorConfig>()
        .unwrap();
    Some(
        config
            .trust_domains
            .iter()
            .map(|td| {
                let roots = pem_blocks(inline_bytes(td.trust_bundle.as_ref()))
                    .into_iter()
                    .map(|(label, der)| {
                        assert_eq!(label, "CERTIFICATE");
                        der
                    })
                    .collect();
                (td.name.clone(), roots)
            })
            .collect(),
    )
}

fn trusted_ca(ctx: &CertificateValidationContext) -> Vec<Vec<u8>> {
    assert!(ctx.custom_validator_config.is_none(), "{ctx:?}");
    pem_blocks(inline_bytes(ctx.trusted_ca.as_ref()))
        .into_iter()
        .map(|(_, der)| der)
        .collect()
}

/// Asserts that `secret` holds `svid`'s chain and key as PEM, and that the key is the
/// certificate's.
fn assert_tls_matches(secret: &Secret, svid: &CachedSvid) {
    let t = tls(secret);
    let chain = pem_blocks(inline_bytes(t.certificate_chain.as_ref()));
    assert_eq!(
        chain,
        svid.cert_chain
            .iter()
            .map(|der| ("CERTIFICATE".to_owned(), der.clone()))
            .collect::<Vec<_>>()
    );
    let key = pem_blocks(inline_bytes(t.private_key.as_ref()));
    assert_eq!(key.len(), 1);
    assert_eq!(key[0].0, "PRIVATE KEY");
    assert_eq!(key[0].1, *svid.private_key_pkcs8);
    let kp = rcgen::KeyPair::try_from(key[0].1.as_slice()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0].1).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&kp)
    );
    let san = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .unwrap();
    assert_eq!(san, svid.spiffe_id.as_str());
}

async fn fetch(
    client: &mut SdsClient,
    req: DiscoveryRequest,
) -> Result<DiscoveryResponse, tonic::Status> {
    client
        .fetch_secrets(req)
        .await
        .map(tonic::Response::into_inner)
}

/// An open `StreamSecrets`: the request sender and the response stream.
struct EnvoyStream {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
}

impl EnvoyStream {
    async fn open(client: &mut SdsClient, first: DiscoveryRequest) -> EnvoyStream {
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let responses = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        EnvoyStream {
            requests: tx,
            responses,
        }
    }

    async fn send(&self, req: DiscoveryRequest) {
        self.requests.send(req).await.unwrap();
    }

    async fn next(&mut self) -> DiscoveryResponse {
        next_message(&mut self.responses).await.unwrap().unwrap()
    }

    /// Acknowledges `resp` for `names` (Envoy sends no node after the first request).
    fn ack(resp: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: resp.version_info.clone(),
            response_nonce: resp.nonce.clone(),
            ..request(names, None)
        }
    }

    fn nack(resp: &DiscoveryResponse, acked_version: &str, names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: acked_version.to_owned(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "Failed to load certificate chain".into(),
                details: Vec::new(),
            }),
            ..request(names, None)
        }
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn fetch_secrets_serves_default_and_identities_as_tls_certificates_without_the_header() {
    let h = start_sds(SdsConfig::default()).await;
    let me = uid_sel(my_uid());
    let web = h.pki.svid("e-1", "web", std::slice::from_ref(&me), "");
    let db = h.pki.svid("e-2", "db", std::slice::from_ref(&me), "");
    let other = h
        .pki
        .svid("e-0", "other", &[uid_sel(my_uid().wrapping_add(1))], "");
    h.cache
        .replace(h.pki.bundle(), vec![web.clone(), db.clone(), other]);
    let mut client = sds_client(&h).await;

    let resp = fetch(
        &mut client,
        request(
            &["default", "spiffe://example.org/db"],
            envoy_node(Some((1, 40))),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.type_url, SECRET_TYPE_URL);
    assert_eq!(resp.version_info, "");
    assert_eq!(resp.nonce, "");
    let got = secrets(&resp);
    assert_eq!(names(&got), ["spiffe://example.org/db", "default"]);
    assert_tls_matches(&got[0], &db);
    // `default` is the first identity in entry-id order.
    assert_tls_matches(&got[1], &web);

    // No names: everything the caller may have (its bundle by trust domain ID and each
    // identity by SPIFFE ID), not the alias names.
    let all = secrets(&fetch(&mut client, request(&[], None)).await.unwrap());
    assert_eq!(
        names(&all),
        [
            "spiffe://example.org",
            "spiffe://example.org/web",
            "spiffe://example.org/db"
        ]
    );
    assert_eq!(
        spiffe_domains(validation(&all[0])).unwrap(),
        [("example.org".to_owned(), vec![h.pki.ca_der.clone()])]
    );
    assert_tls_matches(&all[1], &web);
    assert_tls_matches(&all[2], &db);
}

#[tokio::test]
async fn rootca_and_all_together_are_two_secrets() {
    let h = start_sds(SdsConfig::default()).await;
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = sds_client(&h).await;
    let got = secrets(
        &fetch(&mut client, request(&["ROOTCA", "ALL"], envoy_node(None)))
            .await
            .unwrap(),
    );
    assert_eq!(names(&got), ["ROOTCA", "ALL"]);
    for s in &got {
        assert_eq!(
            spiffe_domains(validation(s)).unwrap(),
            [("example.org".to_owned(), vec![h.pki.ca_der.clone()])],
            "{}",
            s.name
        );
    }
    // The own trust domain's ID names the same bundle.
    let got = secrets(
        &fetch(&mut client, request(&["spiffe://example.org"], None))
            .await
            .unwrap(),
    );
    assert_eq!(names(&got), ["spiffe://example.org"]);
}

#[tokio::test]
async fn names_the_caller_cannot_have_are_refused() {
    let h = start_sds(SdsConfig::default()).await;
    let mut client = sds_client(&h).await;
    // No identity at all: nothing, not even the bundle.
    let e = fetch(&mut client, request(&["ROOTCA"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "no identity issued");

    h.cache.replace(
        h.pki.bundle(),
        vec![
            h.pki.svid("e", "web", &[uid_sel(my_uid())], ""),
            h.pki
                .svid("f", "theirs", &[uid_sel(my_uid().wrapping_add(1))], ""),
        ],
    );
    let e = fetch(
        &mut client,
        request(
            &[
                "default",
                "spiffe://example.org/theirs",
                "spiffe://other.org",
            ],
            None,
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        r#"workload is not authorized for the requested identities ["spiffe://example.org/theirs", "spiffe://other.org"]"#
    );

    // On a stream too: the error ends it.
    let mut s = EnvoyStream::open(&mut client, request(&["nope"], envoy_node(None))).await;
    let e = next_message(&mut s.responses).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(r#"["nope"]"#), "{e:?}");

    // And on an incremental stream.
    let mut d = DeltaEnvoy::open(
        &mut client,
        delta(&["default", "nope"], &[], envoy_node(None)),
    )
    .await;
    let e = next_message(&mut d.responses).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(r#"["nope"]"#), "{e:?}");
}

#[tokio::test]
async fn the_spiffe_validator_depends_on_the_envoy_version_and_the_disable_flags() {
    let h = start_sds(SdsConfig::default()).await;
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = sds_client(&h).await;
    let ca = vec![h.pki.ca_der.clone()];
    let spiffe = Some(vec![("example.org".to_owned(), ca.clone())]);
    let rootca = async |client: &mut SdsClient, node: Option<Node>| {
        let got = secrets(&fetch(client, request(&["ROOTCA"], node)).await.unwrap());
        assert_eq!(names(&got), ["ROOTCA"]);
        got.into_iter().next().unwrap()
    };
    use prost_types::value::Kind;

    for version in [None, Some((1, 18)), Some((1, 40)), Some((2, 0))] {
        let s = rootca(&mut client, envoy_node(version)).await;
        assert_eq!(spiffe_domains(validation(&s)), spiffe, "{version:?}");
    }
    let s = rootca(&mut client, None).await;
    assert_eq!(spiffe_domains(validation(&s)), spiffe, "no node");
    for version in [(1, 17), (0, 99)] {
        let s = rootca(&mut client, envoy_node(Some(version))).await;
        assert_eq!(spiffe_domains(validation(&s)), None, "{version:?}");
        assert_eq!(trusted_ca(validation(&s)), ca);
    }
    for flag in [Kind::BoolValue(true), Kind::StringValue("true".into())] {
        let s = rootca(
            &mut client,
            with_metadata(envoy_node(Some((1, 40))), flag.clone()),
        )
        .await;
        assert_eq!(trusted_ca(validation(&s)), ca, "{flag:?}");
    }
    let s = rootca(
        &mut client,
        with_metadata(envoy_node(Some((1, 40))), Kind::BoolValue(false)),
    )
    .await;
    assert_eq!(spiffe_domains(validation(&s)), spiffe);
    for bad in [Kind::StringValue("maybe".into()), Kind::NumberValue(1.0)] {
        let e = fetch(
            &mut client,
            request(&["ROOTCA"], with_metadata(envoy_node(None), bad.clone())),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            e.message().contains("disable_spiffe_cert_validation"),
            "{e:?}"
        );
    }
    // ALL exists only with the SPIFFE validator.
    let e = fetch(&mut client, request(&["ALL"], envoy_node(Some((1, 17)))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("SPIFFE certificate validator"),
        "{e:?}"
    );

    // On a stream, the node of the first request decides for the whole stream.
    let mut s =
        EnvoyStream::open(&mut client, request(&["ROOTCA"], envoy_node(Some((1, 17))))).await;
    let first = s.next().await;
    assert_eq!(trusted_ca(validation(&secrets(&first)[0])), ca);
    s.send(EnvoyStream::ack(&first, &["ROOTCA", "default"]))
        .await;
    let second = s.next().await;
    let got = secrets(&second);
    assert_eq!(names(&got), ["ROOTCA", "default"]);
    assert_eq!(trusted_ca(validation(&got[0])), ca);

    // Disabled by the config: trusted_ca for every Envoy, unless its metadata says false.
    let h = start_sds(SdsConfig {
        disable_spiffe_cert_validation: true,
        ..SdsConfig::default()
    })
    .await;
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let ca = vec![h.pki.ca_der.clone()];
    let mut client = sds_client(&h).await;
    let s = rootca(&mut client, envoy_node(Some((1, 40)))).await;
    assert_eq!(trusted_ca(validation(&s)), ca);
    let s = rootca(
        &mut client,
        with_metadata(envoy_node(Some((1, 40))), Kind::StringValue("false".into())),
    )
    .await;
    assert_eq!(
        spiffe_domains(validation(&s)),
        Some(vec![("example.org".to_owned(), ca)])
    );
}

#[tokio::test]
async fn configured_names_replace_spires() {
    let h = start_sds(SdsConfig {
        default_svid_name: "my-svid".into(),
        default_bundle_name: "my-roots".into(),
        default_all_bundles_name: "every-root".into(),
        disable_spiffe_cert_validation: false,
    })
    .await;
    let web = h.pki.svid("e", "web", &[uid_sel(my_uid())], "");
    h.cache.replace(h.pki.bundle(), vec![web.clone()]);
    let mut client = sds_client(&h).await;
    let got = secrets(
        &fetch(
            &mut client,
            request(&["my-svid", "my-roots", "every-root"], None),
        )
        .await
        .unwrap(),
    );
    assert_eq!(names(&got), ["my-roots", "every-root", "my-svid"]);
    assert_tls_matches(&got[2], &web);
    let e = fetch(&mut client, request(&["default"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_stream_answers_changes_not_acks_stale_requests_or_nacks() {
    let h = start_sds(SdsConfig::default()).await;
    let me = uid_sel(my_uid());
    let web = h.pki.svid("e-web", "web", std::slice::from_ref(&me), "");
    let theirs = h.pki.svid(
        "e-theirs",
        "theirs",
        &[uid_sel(my_uid().wrapping_add(1))],
        "",
    );
    h.cache
        .replace(h.pki.bundle(), vec![web.clone(), theirs.clone()]);
    let mut client = sds_client(&h).await;

    let mut s = EnvoyStream::open(
        &mut client,
        request(&["default"], envoy_node(Some((1, 40)))),
    )
    .await;
    let v1 = s.next().await;
    assert_eq!(v1.version_info, "1");
    assert_eq!(v1.type_url, SECRET_TYPE_URL);
    assert!(!v1.nonce.is_empty());
    let got = secrets(&v1);
    assert_eq!(names(&got), ["default"]);
    assert_tls_matches(&got[0], &web);

    // The ACK is not answered.
    s.send(EnvoyStream::ack(&v1, &["default"])).await;
    assert_quiet(&mut s.responses).await;

    // A cache change that does not touch this workload's secrets sends nothing.
    let theirs2 = h.pki.svid(
        "e-theirs",
        "theirs",
        &[uid_sel(my_uid().wrapping_add(1))],
        "",
    );
    h.cache.replace(h.pki.bundle(), vec![web.clone(), theirs2]);
    assert_quiet(&mut s.responses).await;

    // Rotation: a new version with the new certificate and a new nonce.
    let rotated = h.pki.svid("e-web", "web", std::slice::from_ref(&me), "");
    h.cache
        .replace(h.pki.bundle(), vec![rotated.clone(), theirs.clone()]);
    let v2 = s.next().await;
    assert_eq!(v2.version_info, "2");
    assert_ne!(v2.nonce, v1.nonce);
    assert_tls_matches(&secrets(&v2)[0], &rotated);

    // A request naming the older nonce is stale, even with new names: ignored.
    s.send(DiscoveryRequest {
        version_info: v1.version_info.clone(),
        response_nonce: v1.nonce.clone(),
        ..request(&["default", "ROOTCA"], None)
    })
    .await;
    assert_quiet(&mut s.responses).await;

    // A NACK is logged and not answered with the same secrets (no retry loop).
    s.send(EnvoyStream::nack(&v2, "1", &["default"])).await;
    assert_quiet(&mut s.responses).await;

    // The stream lives on: a new subscription on the last nonce is answered.
    s.send(EnvoyStream::ack(&v2, &["default", "ROOTCA"])).await;
    let v3 = s.next().await;
    assert_eq!(v3.version_info, "3");
    let got = secrets(&v3);
    assert_eq!(names(&got), ["ROOTCA", "default"]);
    assert_tls_matches(&got[1], &rotated);

    // A CA change reaches the validation context.
    s.send(EnvoyStream::ack(&v3, &["default", "ROOTCA"])).await;
    assert_quiet(&mut s.responses).await;
    let mut b = (*h.pki.bundle()).clone();
    let next_ca = Pki::new("next CA");
    b.x509_authorities.push(next_ca.ca_der.clone());
    h.cache
        .replace(Arc::new(b), vec![rotated.clone(), theirs.clone()]);
    let v4 = s.next().await;
    assert_eq!(v4.version_info, "4");
    assert_eq!(
        spiffe_domains(validation(&secrets(&v4)[0])).unwrap(),
        [(
            "example.org".to_owned(),
            vec![h.pki.ca_der.clone(), next_ca.ca_der]
        )]
    );

    // The identity goes away: PermissionDenied ends the stream.
    h.cache.replace(h.pki.bundle(), vec![theirs]);
    let e = next_message(&mut s.responses).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn streams_end_with_unavailable_on_shutdown() {
    let mut h = start_sds(SdsConfig::default()).await;
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = sds_client(&h).await;
    let mut s = EnvoyStream::open(&mut client, request(&[], envoy_node(None))).await;
    s.next().await;
    let mut d = DeltaEnvoy::open(&mut client, delta(&[], &[], envoy_node(None))).await;
    d.next().await;
    let stopping = tokio::spawn(async move { h.stop().await });
    let e = next_message(&mut s.responses).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let e = next_message(&mut d.responses).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    drop((s, d));
    stopping.await.unwrap().unwrap();
}

fn delta(subscribe: &[&str], unsubscribe: &[&str], node: Option<Node>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: subscribe.iter().map(|n| (*n).to_owned()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

/// An open `DeltaSecrets` stream.
struct DeltaEnvoy {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl DeltaEnvoy {
    async fn open(client: &mut SdsClient, first: DeltaDiscoveryRequest) -> DeltaEnvoy {
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let responses = client
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        DeltaEnvoy {
            requests: tx,
            responses,
        }
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.requests.send(req).await.unwrap();
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        next_message(&mut self.responses).await.unwrap().unwrap()
    }

    fn ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            response_nonce: resp.nonce.clone(),
            ..delta(&[], &[], None)
        }
    }
}

/// The resources of a delta response: (name, version, secret).
fn delta_secrets(resp: &DeltaDiscoveryResponse) -> Vec<(String, String, Secret)> {
    assert_eq!(resp.type_url, SECRET_TYPE_URL);
    resp.resources
        .iter()
        .map(|r| {
            let any = r.resource.as_ref().unwrap();
            assert_eq!(any.type_url, SECRET_TYPE_URL);
            (
                r.name.clone(),
                r.version.clone(),
                any.to_msg::<Secret>().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn delta_secrets_sends_only_what_changed() {
    let h = start_sds(SdsConfig::default()).await;
    let me = uid_sel(my_uid());
    let web = h.pki.svid("e-web", "web", std::slice::from_ref(&me), "");
    let db = h.pki.svid("e-db", "db", std::slice::from_ref(&me), "");
    h.cache.replace(h.pki.bundle(), vec![web.clone()]);
    let mut client = sds_client(&h).await;

    let mut d = DeltaEnvoy::open(
        &mut client,
        delta(&["default"], &[], envoy_node(Some((1, 40)))),
    )
    .await;
    let r1 = d.next().await;
    assert_eq!(r1.system_version_info, "1");
    assert!(!r1.nonce.is_empty());
    assert!(r1.removed_resources.is_empty());
    let got = delta_secrets(&r1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "default");
    assert_tls_matches(&got[0].2, &web);
    let default_v1 = got[0].1.clone();

    // The ACK is not answered; subscribing to more sends only the new resource.
    d.send(DeltaEnvoy::ack(&r1)).await;
    assert_quiet(&mut d.responses).await;
    d.send(delta(&["ROOTCA"], &[], None)).await;
    let r2 = d.next().await;
    let got = delta_secrets(&r2);
    assert_eq!(
        got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(),
        ["ROOTCA"]
    );
    assert_eq!(
        spiffe_domains(validation(&got[0].2)).unwrap(),
        [("example.org".to_owned(), vec![h.pki.ca_der.clone()])]
    );
    let rootca_v = got[0].1.clone();

    // Rotation: only the certificate, with a new version.
    let rotated = h.pki.svid("e-web", "web", std::slice::from_ref(&me), "");
    h.cache.replace(h.pki.bundle(), vec![rotated.clone()]);
    let r3 = d.next().await;
    let got = delta_secrets(&r3);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "default");
    assert_ne!(got[0].1, default_v1);
    assert_tls_matches(&got[0].2, &rotated);
    let default_v2 = got[0].1.clone();

    // A NACK is logged, not answered.
    d.send(DeltaDiscoveryRequest {
        response_nonce: r3.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "bad key".into(),
            details: Vec::new(),
        }),
        ..delta(&[], &[], None)
    })
    .await;
    assert_quiet(&mut d.responses).await;

    // A new stream declaring what it holds gets only what differs.
    let mut d2 = DeltaEnvoy::open(
        &mut client,
        DeltaDiscoveryRequest {
            initial_resource_versions: [
                ("default".to_owned(), default_v2.clone()),
                ("ROOTCA".to_owned(), "stale".to_owned()),
            ]
            .into(),
            ..delta(&["default", "ROOTCA"], &[], envoy_node(None))
        },
    )
    .await;
    let got = delta_secrets(&d2.next().await);
    assert_eq!(
        got.iter()
            .map(|g| (g.0.as_str(), g.1.as_str()))
            .collect::<Vec<_>>(),
        [("ROOTCA", rootca_v.as_str())]
    );
    drop(d2);

    // A wildcard stream gets everything, and the removal of an identity that goes.
    let mut w = DeltaEnvoy::open(&mut client, delta(&[], &[], envoy_node(None))).await;
    h.cache
        .replace(h.pki.bundle(), vec![rotated.clone(), db.clone()]);
    let mut first = delta_secrets(&w.next().await);
    // The cache change may arrive before or after the first answer.
    if first.len() < 3 {
        first.extend(delta_secrets(&w.next().await));
    }
    let mut got: Vec<&str> = first.iter().map(|g| g.0.as_str()).collect();
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "spiffe://example.org",
            "spiffe://example.org/db",
            "spiffe://example.org/web"
        ]
    );
    h.cache.replace(h.pki.bundle(), vec![rotated.clone()]);
    let gone = w.next().await;
    assert!(gone.resources.is_empty());
    assert_eq!(gone.removed_resources, ["spiffe://example.org/db"]);
}

#[tokio::test]
async fn streams_end_when_envoy_closes_its_side() {
    let h = start_sds(SdsConfig::default()).await;
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e", "web", &[uid_sel(my_uid())], "")],
    );
    let mut client = sds_client(&h).await;

    let mut s = EnvoyStream::open(&mut client, request(&["default"], envoy_node(None))).await;
    s.next().await;
    drop(s.requests);
    assert!(next_message(&mut s.responses).await.unwrap().is_none());

    let mut d = DeltaEnvoy::open(&mut client, delta(&["default"], &[], envoy_node(None))).await;
    d.next().await;
    drop(d.requests);
    assert!(next_message(&mut d.responses).await.unwrap().is_none());

    // The connection serves on.
    let mut s = EnvoyStream::open(&mut client, request(&["ROOTCA"], envoy_node(None))).await;
    assert_eq!(names(&secrets(&s.next().await)), ["ROOTCA"]);
}

#[tokio::test]
async fn a_stream_waits_for_its_first_request_through_cache_changes() {
    let h = start_sds(SdsConfig::default()).await;
    let me = uid_sel(my_uid());
    h.cache.replace(
        h.pki.bundle(),
        vec![h.pki.svid("e-web", "web", std::slice::from_ref(&me), "")],
    );
    let mut client = sds_client(&h).await;

    // Opened with no request yet: a rotation before the first request sends nothing.
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let rotated = h.pki.svid("e-web", "web", std::slice::from_ref(&me), "");
    h.cache.replace(h.pki.bundle(), vec![rotated.clone()]);
    assert_quiet(&mut responses).await;

    // The first request is answered from the cache as it is now.
    tx.send(request(&["default"], envoy_node(None)))
        .await
        .unwrap();
    let v1 = next_message(&mut responses).await.unwrap().unwrap();
    assert_eq!(v1.version_info, "1");
    assert_tls_matches(&secrets(&v1)[0], &rotated);

    // Likewise for a delta stream.
    let (dtx, drx) = mpsc::channel(8);
    let mut delta_responses = client
        .delta_secrets(ReceiverStream::new(drx))
        .await
        .unwrap()
        .into_inner();
    let again = h.pki.svid("e-web", "web", std::slice::from_ref(&me), "");
    h.cache.replace(h.pki.bundle(), vec![again.clone()]);
    assert_quiet(&mut delta_responses).await;
    dtx.send(delta(&["default"], &[], envoy_node(None)))
        .await
        .unwrap();
    let r1 = next_message(&mut delta_responses).await.unwrap().unwrap();
    let got = delta_secrets(&r1);
    assert_eq!(got.len(), 1);
    assert_tls_matches(&got[0].2, &again);

    // The open SotW stream follows the same rotation.
    let v2 = next_message(&mut responses).await.unwrap().unwrap();
    assert_eq!(v2.version_info, "2");
    assert_tls_matches(&secrets(&v2)[0], &again);
}

#[tokio::test]
async fn federated_bundles_are_served_under_all_and_their_name_to_entitled_callers_only() {
    let h = start_sds(SdsConfig::default()).await;
    let (a_ca, a_next, b_ca) = (Pki::new("a CA"), Pki::new("a next CA"), Pki::new("b CA"));
    let a = foreign_bundle("a.org", &[&a_ca]);
    let b = foreign_bundle("b.org", &[&b_ca]);
    // Another workload's entry federates with b.org: the agent holds it for that one.
    let (web, other) = caller_and_other_federating_with_b(&h.pki);
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&a, &b]),
        vec![federating(&web, &["a.org"]), other.clone()],
    );
    let mut client = sds_client(&h).await;

    let got = secrets(
        &fetch(
            &mut client,
            request(&["ALL", "spiffe://a.org"], envoy_node(None)),
        )
        .await
        .unwrap(),
    );
    assert_eq!(names(&got), ["ALL", "spiffe://a.org"]);
    assert_eq!(
        spiffe_domains(validation(&got[0])).unwrap(),
        [
            ("a.org".to_owned(), vec![a_ca.ca_der.clone()]),
            ("example.org".to_owned(), vec![h.pki.ca_der.clone()]),
        ]
    );
    assert_eq!(
        spiffe_domains(validation(&got[1])).unwrap(),
        [("a.org".to_owned(), vec![a_ca.ca_der.clone()])]
    );
    // Everything: the own bundle, a.org's, the identity; never b.org's.
    let all = secrets(&fetch(&mut client, request(&[], None)).await.unwrap());
    assert_eq!(
        names(&all),
        [
            "spiffe://example.org",
            "spiffe://a.org",
            "spiffe://example.org/web"
        ]
    );
    let e = fetch(&mut client, request(&["spiffe://b.org"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(r#"["spiffe://b.org"]"#), "{e:?}");

    // An open stream on ALL follows a.org's rotation.
    let mut s = EnvoyStream::open(&mut client, request(&["ALL"], envoy_node(None))).await;
    let first = s.next().await;
    s.send(EnvoyStream::ack(&first, &["ALL"])).await;
    let a2 = foreign_bundle("a.org", &[&a_ca, &a_next]);
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&a2, &b]),
        vec![federating(&web, &["a.org"]), other.clone()],
    );
    let second = s.next().await;
    assert_eq!(
        spiffe_domains(validation(&secrets(&second)[0])).unwrap()[0],
        (
            "a.org".to_owned(),
            vec![a_ca.ca_der.clone(), a_next.ca_der.clone()]
        )
    );

    // The caller's entry stops federating: ALL is the own bundle only (on the open
    // stream too), and a.org's name is refused.
    h.cache.replace_all(
        h.pki.bundle(),
        federated(&[&a2, &b]),
        vec![web.clone(), other.clone()],
    );
    let third = s.next().await;
    assert_eq!(
        spiffe_domains(validation(&secrets(&third)[0])).unwrap(),
        [("example.org".to_owned(), vec![h.pki.ca_der.clone()])]
    );
    let e = fetch(&mut client, request(&["spiffe://a.org"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(r#"["spiffe://a.org"]"#), "{e:?}");
}

#[test]
fn all_and_federated_trust_domains_by_name() {
    let own = Pki::new("own CA");
    let other_ca = Pki::new("other CA");
    let mut other = TrustBundle::new(TrustDomain::new("other.org").unwrap());
    other.x509_authorities = vec![other_ca.ca_der.clone()];
    let mut alpha = TrustBundle::new(TrustDomain::new("alpha.org").unwrap());
    alpha.x509_authorities = vec![own.ca_der.clone()];
    let federated = [Arc::new(other), Arc::new(alpha)];
    let svids = [own.svid("e", "web", &[uid_sel(1)], "")];
    let cfg = SdsConfig::default();
    let unpack = |v: Vec<prost_types::Any>| -> Vec<Secret> {
        v.iter().map(|a| a.to_msg::<Secret>().unwrap()).collect()
    };

    let got = unpack(
        build_secrets(
            &cfg,
            &["ALL".into(), "spiffe://other.org".into()],
            &svids,
            &own.bundle(),
            &federated,
            true,
        )
        .unwrap(),
    );
    assert_eq!(names(&got), ["ALL", "spiffe://other.org"]);
    let domains: Vec<String> = spiffe_domains(validation(&got[0]))
        .unwrap()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(domains, ["alpha.org", "example.org", "other.org"]);
    assert_eq!(
        spiffe_domains(validation(&got[1])).unwrap(),
        [("other.org".to_owned(), vec![other_ca.ca_der.clone()])]
    );
    assert_eq!(
        trusted_ca(validation(
            &unpack(
                build_secrets(
                    &cfg,
                    &["spiffe://other.org".into()],
                    &svids,
                    &own.bundle(),
                    &federated,
                    false
                )
                .unwrap()
            )[0]
        )),
        [other_ca.ca_der]
    );

    // Everything: own, then federated by name, then identities.
    let got = unpack(build_secrets(&cfg, &[], &svids, &own.bundle(), &federated, true).unwrap());
    assert_eq!(
        names(&got),
        [
            "spiffe://example.org",
            "spiffe://alpha.org",
            "spiffe://other.org",
            "spiffe://example.org/web"
        ]
    );
}

#[test]
fn packed_type_urls_are_the_messages_own() {
    use prost::Name as _;
    assert_eq!(SECRET_TYPE_URL, Secret::type_url());
    assert_eq!(
        SPIFFE_VALIDATOR_CONFIG_TYPE_URL,
        SpiffeCertValidatorConfig::type_url()
    );
}
