#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
//! `azure_msi` end to end: the agent half against a loopback IMDS that speaks the real
//! path, query and header and mints managed-identity tokens signed by keys generated
//! here (one key set per tenant); the server half verifies them with the production
//! code, those keys as trust anchors.

mod common;
#[path = "common/jwt.rs"]
mod jwt_keys;

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use carapace_attestor_cloud::azure::{
    AzureAgentConfig, AzureMsiAttestor, AzureMsiAttestorClient, AzureServerConfig,
};
use carapace_core::Error;
use carapace_core::plugin::{
    AttestationResult, MemoryStateStore, NodeAttestorClient, NodeStateStore, PluginContext,
};
use common::{
    MetadataServer, attest_once, context, readmitted_once_after_eviction, rejected_with, selectors,
};
use jwt_keys::{TestKey, key, now, payload, rs256};

const AUDIENCE: &str = "api://carapace-node-attestation";
/// Tenant A (keys: `key(0)`) and tenant B (keys: `key(1)`), both allowed.
const TENANT_A: &str = "0f7c1c5e-3b7e-4f3a-9c1d-6a2b8e4d9f10";
const TENANT_B: &str = "5d2e8a41-7c6b-4e19-b0a3-2f9d1c7e6b58";
/// A tenant nobody configured.
const TENANT_C: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
const SUBSCRIPTION: &str = "b3c4d5e6-f708-4192-a3b4-c5d6e7f8091a";
/// The VM's system-assigned identity (service principal object id).
const PRINCIPAL: &str = "7e1d3b2a-9c8f-4e6d-a5b4-3c2d1e0f9a8b";
/// A user-assigned identity: its client id and object id.
const UAI_CLIENT_ID: &str = "11111111-2222-4333-8444-555555555555";
const UAI_PRINCIPAL: &str = "66666666-7777-4888-9999-aaaaaaaaaaaa";
const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

fn vm_mirid() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourcegroups/Carapace-Nodes/providers/Microsoft.Compute/virtualMachines/Node-7"
    )
}

/// The claims of a v1 managed-identity access token of `principal` in `tid`.
fn claims(tid: &str, aud: &str, principal: &str) -> Value {
    let now = now();
    json!({
        "aud": aud,
        "iss": format!("https://sts.windows.net/{tid}/"),
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 86_400,
        "aio": "E2ZgYJgr",
        "appid": "3c9a5e11-d6e2-4b77-8f00-1a2b3c4d5e6f",
        "appidacr": "2",
        "idp": format!("https://sts.windows.net/{tid}/"),
        "oid": principal,
        "rh": "0.AAAA",
        "sub": principal,
        "tid": tid,
        "uti": "Qk1h",
        "ver": "1.0",
        "xms_mirid": vm_mirid(),
    })
}

/// An IMDS that answers like Azure's: 400 without `Metadata: true` or `api-version`,
/// the token's `aud` from `resource`, the system-assigned identity (with the VM's
/// `xms_mirid`) or, with `client_id`, the user-assigned one. Signs for tenant A.
async fn imds(signer: &'static TestKey) -> MetadataServer {
    MetadataServer::start(Arc::new(move |seen| {
        let (path, query) = jwt_keys::split_query(&seen.path_and_query);
        if seen.method != "GET" || path != TOKEN_PATH {
            return (404, b"{\"error\":\"not_found\"}".to_vec());
        }
        if seen.header("metadata") != Some("true") {
            return (
                400,
                br#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"#
                    .to_vec(),
            );
        }
        if query.get("api-version").map(String::as_str) != Some("2018-02-01") {
            return (400, br#"{"error":"invalid_request","error_description":"Missing or unsupported api-version"}"#.to_vec());
        }
        let Some(resource) = query.get("resource") else {
            return (400, br#"{"error":"invalid_request","error_description":"Required query variable 'resource' is missing"}"#.to_vec());
        };
        let mut c = claims(TENANT_A, resource, PRINCIPAL);
        match query.get("client_id").map(String::as_str) {
            None => {}
            Some(UAI_CLIENT_ID) => {
                c["oid"] = json!(UAI_PRINCIPAL);
                c["sub"] = json!(UAI_PRINCIPAL);
                c["xms_mirid"] = json!(format!(
                    "/subscriptions/{SUBSCRIPTION}/resourcegroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/shared"
                ));
            }
            Some(_) => {
                return (400, br#"{"error":"invalid_request","error_description":"Identity not found"}"#.to_vec());
            }
        }
        let body = json!({
            "access_token": rs256(signer, &c),
            "client_id": UAI_CLIENT_ID,
            "expires_in": "86399",
            "expires_on": (now() + 86_399).to_string(),
            "ext_expires_in": "86399",
            "not_before": now().to_string(),
            "resource": resource,
            "token_type": "Bearer",
        });
        (200, body.to_string().into_bytes())
    }))
    .await
}

fn agent_config(url: &str, extra: Value) -> AzureAgentConfig {
    let mut cfg = json!({"audience": AUDIENCE, "metadata_url": url});
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(cfg).unwrap()
}

fn agent(url: &str, extra: Value) -> AzureMsiAttestorClient {
    AzureMsiAttestorClient::new(&agent_config(url, extra)).unwrap()
}

fn write(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn config(extra: Value) -> AzureServerConfig {
    let mut cfg = json!({
        "audience": AUDIENCE,
        "tenants": {
            TENANT_A: {"keys_path": "tenant-a.json"},
            TENANT_B: {"keys_path": "tenant-b.json"},
        },
    });
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(cfg).unwrap()
}

/// A server half trusting tenant A's `key(0)` and tenant B's `key(1)`.
struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<MemoryStateStore>,
    attestor: AzureMsiAttestor,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(json!({}))
    }

    fn with(extra: Value) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "tenant-a.json", &jwt_keys::jwks(&[key(0)]));
        write(dir.path(), "tenant-b.json", &jwt_keys::jwks(&[key(1)]));
        let store = Arc::new(MemoryStateStore::default());
        let attestor = AzureMsiAttestor::new(
            &config(extra),
            &PluginContext::for_tests(dir.path()),
            store.clone(),
        )
        .unwrap();
        Fixture {
            dir,
            store,
            attestor,
        }
    }

    async fn attest(&self, payload: &[u8]) -> Result<AttestationResult, Error> {
        attest_once(&self.attestor, payload).await
    }

    async fn attest_token(&self, token: &str) -> Result<AttestationResult, Error> {
        self.attest(&payload(token)).await
    }
}

#[tokio::test]
async fn a_vm_attests_through_imds_as_tenant_and_principal() {
    let metadata = imds(key(0)).await;
    let fx = Fixture::new();
    let p = agent(&metadata.url, json!({}))
        .payload(&context())
        .await
        .unwrap();

    let seen = metadata.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(
        seen[0].path_and_query,
        format!(
            "{TOKEN_PATH}?api-version=2018-02-01&resource=api%3A%2F%2Fcarapace-node-attestation"
        )
    );
    assert_eq!(seen[0].header("metadata"), Some("true"));

    let r = fx.attest(&p).await.unwrap();
    assert_eq!(r.agent_path, format!("{TENANT_A}/{PRINCIPAL}"));
    assert_eq!(
        selectors(&r),
        [
            format!("azure_msi:principal:{PRINCIPAL}"),
            "azure_msi:resource_group:carapace-nodes".to_owned(),
            format!("azure_msi:subscription:{SUBSCRIPTION}"),
            format!("azure_msi:tenant:{TENANT_A}"),
            "azure_msi:vm_name:node-7".to_owned(),
        ]
    );
    assert!(!r.can_reattest);
    assert!(
        fx.store
            .load(&format!("{TENANT_A}/{PRINCIPAL}"))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn a_user_assigned_identity_is_asked_for_by_client_id_and_names_no_vm() {
    let metadata = imds(key(0)).await;
    let fx = Fixture::new();
    let p = agent(&metadata.url, json!({"client_id": UAI_CLIENT_ID}))
        .payload(&context())
        .await
        .unwrap();
    assert!(
        metadata.requests()[0]
            .path_and_query
            .ends_with(&format!("&client_id={UAI_CLIENT_ID}"))
    );
    let r = fx.attest(&p).await.unwrap();
    assert_eq!(r.agent_path, format!("{TENANT_A}/{UAI_PRINCIPAL}"));
    assert_eq!(
        selectors(&r),
        [
            format!("azure_msi:principal:{UAI_PRINCIPAL}"),
            format!("azure_msi:tenant:{TENANT_A}"),
        ]
    );
}

#[tokio::test]
async fn the_loopback_imds_refuses_requests_without_the_metadata_header() {
    let metadata = imds(key(0)).await;
    let base = carapace_attestor_cloud::http::BaseUrl::parse(&metadata.url).unwrap();
    let path = format!("{TOKEN_PATH}?api-version=2018-02-01&resource=x");
    let t = std::time::Duration::from_secs(5);
    let r = base.request("GET", &path, &[], t).await.unwrap();
    assert_eq!(r.status, 400);
    let err = r.ok_body("token").unwrap_err().to_string();
    assert!(err.contains("Required metadata header"), "{err}");
    let r = base
        .request("GET", &path, &[("Metadata", "true")], t)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_token_for_another_audience_is_rejected() {
    let metadata = imds(key(0)).await;
    let fx = Fixture::new();
    // E.g. an agent misconfigured to ask for an Azure Resource Manager token.
    let p = agent(
        &metadata.url,
        json!({"audience": "https://management.azure.com/"}),
    )
    .payload(&context())
    .await
    .unwrap();
    rejected_with(
        fx.attest(&p).await,
        "audience \"https://management.azure.com/\" is not the configured audience \"api://carapace-node-attestation\"",
    );
    assert!(fx.store.is_empty());
}

#[tokio::test]
async fn a_token_from_another_issuer_is_rejected() {
    let fx = Fixture::new();
    for iss in [
        format!("https://sts.windows.net/{TENANT_B}/"),
        format!("https://sts.windows.net/{TENANT_A}"),
        format!("https://login.microsoftonline.com/{TENANT_A}/"),
        "https://sts.windows.net/common/".to_owned(),
        "https://evil.example/".to_owned(),
    ] {
        let mut c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
        c["iss"] = json!(iss);
        rejected_with(
            fx.attest_token(&rs256(key(0), &c)).await,
            &format!("issuer {iss:?} is not tenant {TENANT_A}'s"),
        );
    }
    // v2 tokens' issuer is the tenant's too.
    let mut c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
    c["iss"] = json!(format!("https://login.microsoftonline.com/{TENANT_A}/v2.0"));
    fx.attest_token(&rs256(key(0), &c)).await.unwrap();
}

#[tokio::test]
async fn a_tenant_that_is_not_configured_is_rejected() {
    let fx = Fixture::new();
    rejected_with(
        fx.attest_token(&rs256(key(0), &claims(TENANT_C, AUDIENCE, PRINCIPAL)))
            .await,
        &format!("tenant \"{TENANT_C}\" is not configured (tenants: "),
    );
    let mut c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
    c.as_object_mut().unwrap().remove("tid");
    rejected_with(fx.attest_token(&rs256(key(0), &c)).await, "no \"tid\"");
    // Tenant ids are matched as Azure writes them, in lowercase.
    let upper = TENANT_A.to_uppercase();
    rejected_with(
        fx.attest_token(&rs256(key(0), &claims(&upper, AUDIENCE, PRINCIPAL)))
            .await,
        "is not configured",
    );
    assert!(fx.store.is_empty());
}

#[tokio::test]
async fn a_token_claiming_one_tenant_but_signed_with_another_tenant_s_key_is_rejected() {
    let fx = Fixture::new();
    // Tenant B's key is trusted, but only for tenant B.
    rejected_with(
        fx.attest_token(&rs256(key(1), &claims(TENANT_A, AUDIENCE, PRINCIPAL)))
            .await,
        &format!(
            "tenant {TENANT_A}: the token is signed with key \"kid-1\", which is not among the configured keys (kid-0)"
        ),
    );
    // Naming tenant A's kid does not help.
    let header = json!({"alg": "RS256", "kid": key(0).kid, "typ": "JWT"});
    rejected_with(
        fx.attest_token(&jwt_keys::rs256_with_header(
            key(1),
            &header,
            &claims(TENANT_A, AUDIENCE, PRINCIPAL),
        ))
        .await,
        "signature does not verify with key \"kid-0\"",
    );
    // Tenant B's own token verifies with its own key.
    let r = fx
        .attest_token(&rs256(key(1), &claims(TENANT_B, AUDIENCE, PRINCIPAL)))
        .await
        .unwrap();
    assert_eq!(r.agent_path, format!("{TENANT_B}/{PRINCIPAL}"));
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_rejected() {
    let fx = Fixture::new();
    let now = now();
    let mut c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
    c["exp"] = json!(now - 3600);
    rejected_with(fx.attest_token(&rs256(key(0), &c)).await, "expired at");
    let mut c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
    c["nbf"] = json!(now + 3600);
    rejected_with(
        fx.attest_token(&rs256(key(0), &c)).await,
        "not valid before",
    );
    assert!(fx.store.is_empty());
}

#[tokio::test]
async fn a_principal_attests_once_unless_reattestation_is_allowed() {
    let fx = Fixture::new();
    let good = || rs256(key(0), &claims(TENANT_A, AUDIENCE, PRINCIPAL));
    // A rejected attempt does not use up the first attestation.
    rejected_with(
        fx.attest_token(&rs256(key(0), &claims(TENANT_A, "api://other", PRINCIPAL)))
            .await,
        "audience",
    );
    let token = good();
    let first = fx.attest_token(&token).await.unwrap();
    for t in [token.clone(), good()] {
        let err = fx.attest_token(&t).await.unwrap_err();
        assert!(matches!(err, Error::AttestationReplay(_)), "{err:?}");
    }
    // Evicting the agent deletes the record its attestor names: admitted once more.
    readmitted_once_after_eviction(&fx.attestor, &fx.store, &first.agent_path, &payload(&token))
        .await;
    // Another server sharing the datastore refuses too.
    let store: Arc<dyn NodeStateStore> = fx.store.clone();
    let other = AzureMsiAttestor::new(
        &config(json!({})),
        &PluginContext::for_tests(fx.dir.path()),
        store,
    )
    .unwrap();
    let err = attest_once(&other, &payload(&good())).await.unwrap_err();
    assert!(matches!(err, Error::AttestationReplay(_)), "{err:?}");
    // The same principal id in another tenant is another agent.
    fx.attest_token(&rs256(key(1), &claims(TENANT_B, AUDIENCE, PRINCIPAL)))
        .await
        .unwrap();

    let store: Arc<dyn NodeStateStore> = fx.store.clone();
    let lenient = AzureMsiAttestor::new(
        &config(json!({"allow_reattestation": true})),
        &PluginContext::for_tests(fx.dir.path()),
        store,
    )
    .unwrap();
    for _ in 0..2 {
        assert!(
            attest_once(&lenient, &payload(&good()))
                .await
                .unwrap()
                .can_reattest
        );
    }
}

#[tokio::test]
async fn tokens_not_signed_with_rs256_are_rejected_naming_the_algorithm() {
    let fx = Fixture::new();
    let c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
    let jwks_file = std::fs::read(fx.dir.path().join("tenant-a.json")).unwrap();
    rejected_with(
        fx.attest_token(&jwt_keys::unsigned(&key(0).kid, &c)).await,
        "algorithm is \"none\"",
    );
    for secret in [&jwks_file[..], &key(0).n] {
        rejected_with(
            fx.attest_token(&jwt_keys::hs256(&key(0).kid, secret, &c))
                .await,
            "algorithm is \"HS256\"",
        );
    }
    rejected_with(
        fx.attest_token(&jwt_keys::rs512(key(0), &c)).await,
        "algorithm is \"RS512\"",
    );
    assert!(fx.store.is_empty());
}

#[tokio::test]
async fn unknown_kids_and_flipped_signatures_are_rejected() {
    let fx = Fixture::new();
    let c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
    rejected_with(
        fx.attest_token(&rs256(key(3), &c)).await,
        "key \"kid-3\", which is not among",
    );
    rejected_with(
        fx.attest_token(&jwt_keys::flip_signature_bit(&rs256(key(0), &c)))
            .await,
        "signature does not verify",
    );
    assert!(fx.store.is_empty());
}

#[tokio::test]
async fn sub_is_the_principal_and_must_match_oid() {
    let fx = Fixture::new();
    let mut c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
    c["oid"] = json!(UAI_PRINCIPAL);
    rejected_with(fx.attest_token(&rs256(key(0), &c)).await, "sub");
    c.as_object_mut().unwrap().remove("sub");
    rejected_with(fx.attest_token(&rs256(key(0), &c)).await, "no \"sub\"");
    let mut c = claims(TENANT_A, AUDIENCE, "a/b");
    c.as_object_mut().unwrap().remove("oid");
    rejected_with(
        fx.attest_token(&rs256(key(0), &c)).await,
        "principal (sub) \"a/b\" is not a valid SPIFFE ID path segment",
    );
    // Without oid, sub alone names the principal.
    let mut c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
    c.as_object_mut().unwrap().remove("oid");
    let r = fx.attest_token(&rs256(key(0), &c)).await.unwrap();
    assert_eq!(r.agent_path, format!("{TENANT_A}/{PRINCIPAL}"));
}

#[tokio::test]
async fn xms_mirid_gives_vm_selectors_only_when_it_names_a_vm() {
    let fx = Fixture::with(json!({"allow_reattestation": true}));
    let with_mirid = |mirid: Option<Value>| {
        let mut c = claims(TENANT_A, AUDIENCE, PRINCIPAL);
        match mirid {
            Some(m) => c["xms_mirid"] = m,
            None => {
                c.as_object_mut().unwrap().remove("xms_mirid");
            }
        }
        rs256(key(0), &c)
    };
    let base = [
        format!("azure_msi:principal:{PRINCIPAL}"),
        format!("azure_msi:tenant:{TENANT_A}"),
    ];
    let sub_upper = SUBSCRIPTION.to_uppercase();
    let r = fx
        .attest_token(&with_mirid(Some(json!(format!(
            "/SUBSCRIPTIONS/{sub_upper}/resourceGroups/RG1/providers/microsoft.compute/VirtualMachines/VM1"
        )))))
        .await
        .unwrap();
    assert_eq!(
        selectors(&r),
        [
            base[0].clone(),
            "azure_msi:resource_group:rg1".to_owned(),
            format!("azure_msi:subscription:{SUBSCRIPTION}"),
            base[1].clone(),
            "azure_msi:vm_name:vm1".to_owned(),
        ]
    );
    for malformed in [
        None,
        Some(json!(42)),
        Some(json!("")),
        Some(json!(format!(
            "/subscriptions/{SUBSCRIPTION}/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines"
        ))),
        Some(json!(format!(
            "/subscriptions/{SUBSCRIPTION}/resourcegroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/0"
        ))),
        Some(json!(
            "/subscriptions/nope/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
        )),
    ] {
        let r = fx
            .attest_token(&with_mirid(malformed.clone()))
            .await
            .unwrap();
        assert_eq!(selectors(&r), base, "{malformed:?}");
    }
}

#[tokio::test]
async fn a_replaced_tenant_keys_file_takes_effect_without_a_restart() {
    let fx = Fixture::new();
    let by_new_key = rs256(key(2), &claims(TENANT_A, AUDIENCE, PRINCIPAL));
    rejected_with(
        fx.attest_token(&by_new_key).await,
        "\"kid-2\", which is not among",
    );
    write(
        fx.dir.path(),
        "tenant-a.json",
        &jwt_keys::jwks(&[key(0), key(2)]),
    );
    fx.attest_token(&by_new_key).await.unwrap();
    // Tenant B's set did not change.
    rejected_with(
        fx.attest_token(&rs256(key(2), &claims(TENANT_B, AUDIENCE, PRINCIPAL)))
            .await,
        &format!("tenant {TENANT_B}: the token is signed with key \"kid-2\""),
    );
}

#[tokio::test]
async fn imds_errors_and_an_unreachable_imds_are_unavailable() {
    let metadata = imds(key(0)).await;
    // IMDS refuses an identity the VM does not have.
    let err = agent(
        &metadata.url,
        json!({"client_id": "99999999-2222-4333-8444-555555555555"}),
    )
    .payload(&context())
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("HTTP 400"), "{err}");
    assert!(err.to_string().contains("Identity not found"), "{err}");

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = agent(&format!("http://127.0.0.1:{port}"), json!({}))
        .payload(&context())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");

    // A 200 whose body is not the token response: the error does not quote it.
    for body in [
        &br#"{"token":"secret.secret.secret"}"#[..],
        br#"{"access_token":"secret"}"#,
        b"secret",
    ] {
        let junk = MetadataServer::start(Arc::new(move |_| (200, body.to_vec()))).await;
        let err = agent(&junk.url, json!({}))
            .payload(&context())
            .await
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}

#[tokio::test]
async fn malformed_payloads_and_challenges_are_refused() {
    let fx = Fixture::new();
    let token = rs256(key(0), &claims(TENANT_A, AUDIENCE, PRINCIPAL));
    for (p, want) in [
        (
            json!({"version": 0, "token": token})
                .to_string()
                .into_bytes(),
            "payload version 0",
        ),
        (b"\x00garbage".to_vec(), "the payload is not JSON"),
        (vec![b' '; 64 * 1024 + 1], "more than 65536"),
        (payload("a.b.c"), "not unpadded base64url"),
    ] {
        let msg = rejected_with(fx.attest(&p).await, want);
        assert!(!msg.contains(&token), "the token leaked into {msg}");
    }
    let err = agent("http://127.0.0.1:1", json!({}))
        .answer(b"{}", &context())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has none"), "{err}");
}

#[test]
fn bad_server_settings_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = || -> Arc<dyn NodeStateStore> { Arc::new(MemoryStateStore::default()) };
    let new = |cfg: &AzureServerConfig| {
        AzureMsiAttestor::new(cfg, &PluginContext::for_tests(dir.path()), store())
            .unwrap_err()
            .to_string()
    };

    let err = serde_json::from_value::<AzureServerConfig>(json!({"tenants": {}})).unwrap_err();
    assert!(
        err.to_string().contains("missing field `audience`"),
        "{err}"
    );
    let err = serde_json::from_value::<AzureServerConfig>(json!({
        "audience": AUDIENCE, "tenants": {TENANT_A: {"keys_path": "a", "jwks_url": "x"}},
    }))
    .unwrap_err();
    assert!(
        err.to_string().contains("unknown field `jwks_url`"),
        "{err}"
    );

    let problems = config(json!({"audience": "https://management.azure.com/", "tenants": {}}))
        .validate()
        .unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("is an Azure API"), "{problems:?}");
    assert!(problems[1].contains("tenants is empty"), "{problems:?}");
    let problems = config(json!({"audience": "", "tenants": {
        "contoso.onmicrosoft.com": {"keys_path": "a"},
        TENANT_A: {"keys_path": "a"},
        TENANT_A.to_uppercase(): {"keys_path": "a"},
    }}))
    .validate()
    .unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:?}");
    for want in [
        "audience is empty".to_owned(),
        "\"contoso.onmicrosoft.com\" is not a tenant ID".to_owned(),
        format!("tenants: {TENANT_A} is listed twice"),
    ] {
        assert!(
            problems.iter().any(|p| p.contains(&want)),
            "{want}: {problems:?}"
        );
    }

    // Key files: tenant B's missing, then weak.
    write(dir.path(), "tenant-a.json", &jwt_keys::jwks(&[key(0)]));
    let err = new(&config(json!({})));
    assert!(
        err.contains(&format!("tenants.{TENANT_B}.keys_path: keys file")),
        "{err}"
    );
    assert!(err.contains("tenant-b.json"), "{err}");
    write(
        dir.path(),
        "tenant-b.json",
        &jwt_keys::jwks(&[jwt_keys::weak_key()]),
    );
    assert!(new(&config(json!({}))).contains("1024 bits"));
    write(dir.path(), "tenant-b.json", "{\"keys\": []}");
    assert!(new(&config(json!({}))).contains("no RSA signature key"));
    write(dir.path(), "tenant-b.json", &jwt_keys::jwks(&[key(1)]));
    AzureMsiAttestor::new(
        &config(json!({})),
        &PluginContext::for_tests(dir.path()),
        store(),
    )
    .unwrap();
}

#[test]
fn bad_agent_settings_are_refused_with_the_reason() {
    let err = serde_json::from_value::<AzureAgentConfig>(json!({"client_id": UAI_CLIENT_ID}))
        .unwrap_err();
    assert!(
        err.to_string().contains("missing field `audience`"),
        "{err}"
    );
    let cfg = agent_config(
        "http://169.254.169.254",
        json!({"client_id": "my-identity", "timeout": "2m"}),
    );
    let problems = cfg.validate().unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("client_id \"my-identity\""),
        "{problems:?}"
    );
    assert!(problems[1].contains("timeout 120s"), "{problems:?}");
    let cfg: AzureAgentConfig = serde_json::from_value(json!({"audience": AUDIENCE})).unwrap();
    assert_eq!(cfg.metadata_url, "http://169.254.169.254");
    assert_eq!(cfg.timeout, std::time::Duration::from_secs(5));
    assert_eq!(cfg.client_id, None);
    AzureMsiAttestorClient::new(&cfg).unwrap();
}
