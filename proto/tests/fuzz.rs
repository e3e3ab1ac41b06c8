#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! Property tests of the wire → core conversions of what peers send (entries, bundles,
//! selectors), from protobuf bytes: never a panic, the allocation bound, and what is
//! accepted converts back to the same wire message. And the Workload API client's
//! checks of a `FetchX509SVID` response (`workload_client`): never a panic, the
//! allocation bound.

use carapace_fuzzkit::proptest;
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, bytes, config, mutated};
use carapace_proto::convert::{bundle_from_wire, entry_from_wire, selectors_from_wire};
use carapace_proto::types;
use carapace_proto::workload::{X509svid, X509svidResponse};
use carapace_proto::workload_client::{split_certificates, x509_context_from_wire};
use prost::Message as _;

fn entry_strategy() -> impl Strategy<Value = types::Entry> {
    let id = prop_oneof!["[a-zA-Z0-9_-]{1,20}", "\\PC{0,4}"];
    let spiffe = prop_oneof![
        "spiffe://example\\.org(/[a-zA-Z0-9._-]{1,8}){0,3}",
        "\\PC{0,12}",
    ];
    let selector = ("[a-z_]{0,6}", prop_oneof!["[a-z0-9:/]{0,12}", "\\PC{0,6}"])
        .prop_map(|(r#type, value)| types::Selector { r#type, value });
    (
        id,
        spiffe.clone(),
        spiffe,
        proptest::collection::vec(selector, 0..4),
        any::<i64>(),
        proptest::collection::vec("[a-z.]{0,10}", 0..3),
        any::<(bool, bool, i64, u64, i64)>(),
        any::<(i64, bool)>(),
    )
        .prop_map(
            |(
                id,
                spiffe_id,
                parent_id,
                selectors,
                ttl,
                dns_names,
                (admin, downstream, expires_at, revision, created_at),
                (jwt_svid_ttl, jwt_svid_include_jti),
            )| {
                types::Entry {
                    federates_with: Vec::new(),
                    id,
                    spiffe_id,
                    parent_id,
                    selectors,
                    x509_svid_ttl: ttl,
                    dns_names,
                    hint: String::new(),
                    admin,
                    downstream,
                    expires_at,
                    revision,
                    created_at,
                    jwt_svid_ttl,
                    jwt_svid_include_jti,
                }
            },
        )
}

/// `entry` with its selectors sorted and deduplicated, as a selector set holds them.
fn with_selector_set(mut entry: types::Entry) -> types::Entry {
    entry
        .selectors
        .sort_by(|a, b| (&a.r#type, &a.value).cmp(&(&b.r#type, &b.value)));
    entry
        .selectors
        .dedup_by(|a, b| a.r#type == b.r#type && a.value == b.value);
    entry
}

fn good_entry() -> types::Entry {
    types::Entry {
        federates_with: Vec::new(),
        id: "e1".into(),
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: "spiffe://example.org/spire/agent/join_token/t1".into(),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        x509_svid_ttl: 3600,
        dns_names: vec!["web.example.org".into()],
        hint: "web".into(),
        admin: false,
        downstream: false,
        expires_at: 0,
        revision: 3,
        created_at: 1_700_000_000,
        jwt_svid_ttl: 300,
        jwt_svid_include_jti: true,
    }
}

fn good_bundle() -> types::Bundle {
    types::Bundle {
        trust_domain: "example.org".into(),
        x509_authorities: vec![vec![0x30, 0x03, 0x02, 0x01, 0x01]],
        jwt_authorities: vec![types::JwtKey {
            kid: "k1".into(),
            public_key: vec![0x30, 0x00],
            expires_at: 5,
        }],
        sequence: 9,
        refresh_hint: 300,
        tainted_jwt_kids: vec!["k1".into()],
        tainted_x509_authorities: vec![],
    }
}

/// A real `FetchX509SVID` response: an SVID for `spiffe://example.org/w` signed by a CA
/// of `example.org`, its key, and that CA as the bundle.
fn good_x509_response() -> Vec<u8> {
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.clone().self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.subject_alt_names = vec![SanType::URI("spiffe://example.org/w".try_into().unwrap())];
    let leaf_cert = leaf.signed_by(&key, &issuer).unwrap();
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: "spiffe://example.org/w".into(),
            x509_svid: [leaf_cert.der().to_vec(), ca_cert.der().to_vec()].concat(),
            x509_svid_key: key.serialize_der(),
            bundle: ca_cert.der().to_vec(),
            hint: String::new(),
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

proptest! {
    #![proptest_config(config(2000))]

    /// Accepted entries convert back to the same wire entry, up to the order and
    /// repetition of selectors (a set).
    #[test]
    fn entries_never_panic_and_round_trip(entry in entry_strategy()) {
        if let Ok(core) = bounded("entry_from_wire", entry.encoded_len(), || entry_from_wire(&entry, None)) {
            let back = types::Entry::from(&core);
            prop_assert_eq!(&entry_from_wire(&back, None).unwrap(), &core);
            prop_assert_eq!(&back, &with_selector_set(entry));
        }
    }

    /// Entries and bundles decoded from mutated protobuf bytes.
    #[test]
    fn wire_bytes_never_panic(buf in prop_oneof![
        1 => bytes(200),
        6 => mutated(vec![good_entry().encode_to_vec(), good_bundle().encode_to_vec()]),
    ]) {
        if let Ok(entry) = bounded("Entry::decode", buf.len(), || types::Entry::decode(buf.as_slice())) {
            let _ = selectors_from_wire(&entry.selectors);
            if let Ok(core) = entry_from_wire(&entry, None) {
                prop_assert_eq!(types::Entry::from(&core), with_selector_set(entry));
            }
        }
        if let Ok(bundle) = bounded("Bundle::decode", buf.len(), || types::Bundle::decode(buf.as_slice())) {
            if let Ok(core) = bounded("bundle_from_wire", buf.len(), || bundle_from_wire(&bundle)) {
                prop_assert_eq!(types::Bundle::from(&core), bundle);
            }
        }
    }

    /// `FetchX509SVID` responses decoded from mutated protobuf bytes, and concatenated
    /// DER from arbitrary bytes.
    #[test]
    fn x509_responses_never_panic(buf in prop_oneof![
        1 => bytes(400),
        6 => mutated(vec![good_x509_response()]),
    ]) {
        let _ = bounded("split_certificates", buf.len(), || split_certificates(&buf, "bundle"));
        if let Ok(m) = bounded("X509svidResponse::decode", buf.len(), || X509svidResponse::decode(buf.as_slice())) {
            if let Ok(ctx) = bounded("x509_context_from_wire", buf.len(), || x509_context_from_wire(m)) {
                prop_assert!(!ctx.svids.is_empty() && !ctx.bundle.x509_authorities.is_empty());
            }
        }
    }
}
