#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! The generated Envoy SDS v3 messages pack into `Any` with the type URLs Envoy expects,
//! and survive the round trip through their protobuf encoding.

use carapace_proto::sds::envoy::config::core::v3::{DataSource, TypedExtensionConfig, data_source};
use carapace_proto::sds::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use carapace_proto::sds::envoy::service::discovery::v3::DiscoveryResponse;
use prost::Message as _;
use prost_types::Any;

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

#[test]
fn secrets_pack_with_envoy_type_urls_and_round_trip() {
    let cert = Secret {
        name: "spiffe://example.org/web".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(b"-----BEGIN CERTIFICATE-----\n"),
            private_key: inline(b"-----BEGIN PRIVATE KEY-----\n"),
            ..Default::default()
        })),
    };
    let spiffe = SpiffeCertValidatorConfig {
        trust_domains: vec![spiffe_cert_validator_config::TrustDomain {
            name: "example.org".into(),
            trust_bundle: inline(b"roots"),
            ..Default::default()
        }],
        ..Default::default()
    };
    let spiffe_any = Any::from_msg(&spiffe).unwrap();
    assert_eq!(
        spiffe_any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    let validation = Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: "envoy.tls.cert_validator.spiffe".into(),
                    typed_config: Some(spiffe_any),
                }),
                ..Default::default()
            },
        )),
    };

    let response = DiscoveryResponse {
        version_info: "1".into(),
        resources: vec![
            Any::from_msg(&cert).unwrap(),
            Any::from_msg(&validation).unwrap(),
        ],
        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
        nonce: "n".into(),
        ..Default::default()
    };
    for any in &response.resources {
        assert_eq!(
            any.type_url,
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
        );
    }

    let decoded = DiscoveryResponse::decode(response.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, response);
    assert_eq!(decoded.resources[0].to_msg::<Secret>().unwrap(), cert);
    let back = decoded.resources[1].to_msg::<Secret>().unwrap();
    assert_eq!(back, validation);
    let Some(secret::Type::ValidationContext(ctx)) = back.r#type else {
        panic!("not a validation context: {back:?}");
    };
    let typed = ctx.custom_validator_config.unwrap().typed_config.unwrap();
    assert_eq!(typed.to_msg::<SpiffeCertValidatorConfig>().unwrap(), spiffe);
    // A message of another type does not decode as a Secret from its Any.
    assert!(typed.to_msg::<Secret>().is_err());
}
