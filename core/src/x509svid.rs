//! X509-SVID validation per the X509-SVID standard.
//!
//! [`verify_chain`] is what a relying party runs: RFC 5280 path validation (through
//! webpki) against the bundle of the SVID's own trust domain, plus every SPIFFE rule on
//! the leaf ([`check_leaf`]) and on each signing certificate ([`check_signing_cert`]).

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::bundle::TrustBundle;
use crate::error::Error;
use crate::spiffe_id::SpiffeId;

/// What a verified X509-SVID proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The SVID's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The leaf's serial number, big-endian bytes without leading zeros.
    pub serial: Vec<u8>,
    /// The leaf's notAfter, unix seconds.
    pub not_after: i64,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidSvid(msg.into())
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| bad(format!("certificate does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate"));
    }
    Ok(cert)
}

/// The URI SANs of a certificate; an error if the SAN extension is malformed or repeated.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<(Vec<&'a str>, bool), Error> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("bad subjectAltName: {e}")))?;
    let Some(san) = san else {
        return Ok((Vec::new(), false));
    };
    let uris = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    Ok((uris, san.critical))
}

/// Checks the leaf rules of the X509-SVID standard and returns the SPIFFE ID:
/// exactly one URI SAN, a `spiffe` ID with a non-root path, `cA` false, key usage present
/// and critical with digitalSignature and without keyCertSign/cRLSign, extended key usage
/// (if present) with both serverAuth and clientAuth, and a critical SAN when the subject
/// is empty.
pub fn check_leaf(der: &[u8]) -> Result<SpiffeId, Error> {
    let cert = parse(der)?;
    let (uris, san_critical) = uri_sans(&cert)?;
    let uri = match uris.as_slice() {
        [one] => *one,
        [] => return Err(bad("leaf has no URI SAN")),
        _ => return Err(bad("leaf has more than one URI SAN")),
    };
    let id: SpiffeId = uri.parse()?;
    if id.path().is_empty() {
        return Err(bad(format!("leaf SPIFFE ID {id} has no path")));
    }
    if cert.subject().iter_attributes().next().is_none() && !san_critical {
        return Err(bad(
            "leaf subject is empty but the URI SAN extension is not critical",
        ));
    }
    let bc = cert
        .basic_constraints()
        .map_err(|e| bad(format!("bad basicConstraints: {e}")))?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(bad("leaf has cA=true"));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| bad(format!("bad keyUsage: {e}")))?
        .ok_or_else(|| bad("leaf has no keyUsage extension"))?;
    if !ku.critical {
        return Err(bad("leaf keyUsage is not critical"));
    }
    if !ku.value.digital_signature() {
        return Err(bad("leaf keyUsage lacks digitalSignature"));
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(bad("leaf keyUsage sets keyCertSign or cRLSign"));
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| bad(format!("bad extendedKeyUsage: {e}")))?;
    if let Some(eku) = eku {
        if !(eku.value.server_auth && eku.value.client_auth) {
            return Err(bad(
                "leaf extendedKeyUsage must include serverAuth and clientAuth",
            ));
        }
    }
    Ok(id)
}

/// Checks the signing-certificate rules: `cA` true, keyCertSign set, and a SPIFFE ID,
/// if present, without a path.
pub fn check_signing_cert(der: &[u8]) -> Result<(), Error> {
    let cert = parse(der)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| bad(format!("bad basicConstraints: {e}")))?;
    if !bc.is_some_and(|b| b.value.ca) {
        return Err(bad("signing certificate does not have cA=true"));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| bad(format!("bad keyUsage: {e}")))?
        .ok_or_else(|| bad("signing certificate has no keyUsage"))?;
    if !ku.value.key_cert_sign() {
        return Err(bad("signing certificate keyUsage lacks keyCertSign"));
    }
    let (uris, _) = uri_sans(&cert)?;
    for uri in uris {
        if let Ok(id) = uri.parse::<SpiffeId>() {
            if !id.path().is_empty() {
                return Err(bad(format!(
                    "signing certificate SPIFFE ID {id} has a path"
                )));
            }
        }
    }
    Ok(())
}

/// Verifies an X509-SVID chain (leaf first, then intermediates) against `bundle` at time
/// `now` (unix seconds): path validation to one of the bundle's authorities, the leaf
/// rules, the signing-certificate rules on every intermediate, and that the SVID is in
/// the bundle's trust domain.
pub fn verify_chain(
    chain: &[Vec<u8>],
    bundle: &TrustBundle,
    now: u64,
) -> Result<VerifiedSvid, Error> {
    let leaf_der = chain
        .first()
        .ok_or_else(|| bad("empty certificate chain"))?;
    let id = check_leaf(leaf_der)?;
    if !id.is_member_of(bundle.trust_domain()) {
        return Err(bad(format!(
            "SVID {id} is not in trust domain {} of the bundle",
            bundle.trust_domain()
        )));
    }
    for ca in &chain[1..] {
        check_signing_cert(ca)?;
    }
    let anchors_der: Vec<CertificateDer<'_>> = bundle
        .x509_authorities
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors = anchors_der
        .iter()
        .map(|d| webpki::anchor_from_trusted_cert(d).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bundle authority unusable: {e}")))?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let leaf = CertificateDer::from(leaf_der.as_slice());
    let ee =
        webpki::EndEntityCert::try_from(&leaf).map_err(|e| bad(format!("leaf unusable: {e}")))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| bad(format!("chain does not verify against the bundle: {e:?}")))?;
    let cert = parse(leaf_der)?;
    Ok(VerifiedSvid {
        spiffe_id: id,
        serial: cert
            .raw_serial()
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The serial number of a certificate as big-endian bytes without leading zeros.
pub fn serial_of(der: &[u8]) -> Result<Vec<u8>, Error> {
    let cert = parse(der)?;
    Ok(cert
        .raw_serial()
        .iter()
        .copied()
        .skip_while(|&b| b == 0)
        .collect())
}

/// The notBefore and notAfter of a certificate, unix seconds.
pub fn validity_of(der: &[u8]) -> Result<(i64, i64), Error> {
    let cert = parse(der)?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// The SubjectPublicKeyInfo DER of a certificate.
pub fn public_key_of(der: &[u8]) -> Result<Vec<u8>, Error> {
    let cert = parse(der)?;
    Ok(cert.public_key().raw.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe_id::TrustDomain;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };

    const NOW: u64 = 1_900_000_000;

    struct Ca {
        der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let kp = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        p.not_before = time(NOW - 3600);
        p.not_after = time(NOW + 3600);
        let der = p.self_signed(&kp).unwrap().der().to_vec();
        Ca {
            der,
            issuer: Issuer::new(p, kp),
        }
    }

    fn time(unix: u64) -> ::time::OffsetDateTime {
        ::time::OffsetDateTime::from_unix_timestamp(unix as i64).unwrap()
    }

    fn leaf_params(uris: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::OrganizationName, "Carapace");
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = time(NOW - 60);
        p.not_after = time(NOW + 600);
        p
    }

    fn sign(p: CertificateParams, ca: &Ca) -> Vec<u8> {
        let kp = KeyPair::generate().unwrap();
        p.signed_by(&kp, &ca.issuer).unwrap().der().to_vec()
    }

    fn bundle(ca: &Ca) -> TrustBundle {
        let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        b.x509_authorities.push(ca.der.clone());
        b
    }

    #[test]
    fn a_good_svid_verifies() {
        let ca = ca();
        let leaf = sign(leaf_params(&["spiffe://example.org/web"]), &ca);
        let v = verify_chain(&[leaf], &bundle(&ca), NOW).unwrap();
        assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/web");
        assert_eq!(v.not_after, (NOW + 600) as i64);
        check_signing_cert(&ca.der).unwrap();
    }

    #[test]
    fn rejects_zero_or_two_uri_sans() {
        let ca = ca();
        let none = sign(leaf_params(&[]), &ca);
        assert!(
            check_leaf(&none)
                .unwrap_err()
                .to_string()
                .contains("no URI SAN")
        );
        let two = sign(
            leaf_params(&["spiffe://example.org/a", "spiffe://example.org/b"]),
            &ca,
        );
        assert!(
            check_leaf(&two)
                .unwrap_err()
                .to_string()
                .contains("more than one")
        );
    }

    #[test]
    fn rejects_root_path_and_non_spiffe_uri() {
        let ca = ca();
        let root = sign(leaf_params(&["spiffe://example.org"]), &ca);
        assert!(
            check_leaf(&root)
                .unwrap_err()
                .to_string()
                .contains("no path")
        );
        let http = sign(leaf_params(&["https://example.org/a"]), &ca);
        assert!(matches!(
            check_leaf(&http),
            Err(Error::InvalidSpiffeId { .. })
        ));
    }

    #[test]
    fn rejects_leaf_with_ca_true_or_cert_sign() {
        let ca = ca();
        let mut p = leaf_params(&["spiffe://example.org/a"]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert!(
            check_leaf(&sign(p, &ca))
                .unwrap_err()
                .to_string()
                .contains("cA=true")
        );
        let mut p = leaf_params(&["spiffe://example.org/a"]);
        p.key_usages.push(KeyUsagePurpose::KeyCertSign);
        assert!(
            check_leaf(&sign(p, &ca))
                .unwrap_err()
                .to_string()
                .contains("keyCertSign")
        );
        let mut p = leaf_params(&["spiffe://example.org/a"]);
        p.key_usages.push(KeyUsagePurpose::CrlSign);
        assert!(check_leaf(&sign(p, &ca)).is_err());
    }

    #[test]
    fn rejects_missing_key_usage_or_digital_signature() {
        let ca = ca();
        let mut p = leaf_params(&["spiffe://example.org/a"]);
        p.key_usages.clear();
        assert!(
            check_leaf(&sign(p, &ca))
                .unwrap_err()
                .to_string()
                .contains("no keyUsage")
        );
        let mut p = leaf_params(&["spiffe://example.org/a"]);
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        assert!(
            check_leaf(&sign(p, &ca))
                .unwrap_err()
                .to_string()
                .contains("digitalSignature")
        );
    }

    #[test]
    fn rejects_eku_without_both_auths() {
        let ca = ca();
        let mut p = leaf_params(&["spiffe://example.org/a"]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        assert!(
            check_leaf(&sign(p, &ca))
                .unwrap_err()
                .to_string()
                .contains("serverAuth")
        );
        // No EKU at all is allowed (SHOULD, not MUST).
        let mut p = leaf_params(&["spiffe://example.org/a"]);
        p.extended_key_usages.clear();
        check_leaf(&sign(p, &ca)).unwrap();
    }

    #[test]
    fn rejects_empty_subject_with_non_critical_san() {
        let ca = ca();
        // rcgen marks the SAN critical itself when the subject is empty, so build the
        // extension by hand: SEQUENCE { [6] "spiffe://example.org/a" }, not critical.
        let uri = b"spiffe://example.org/a";
        let mut content = vec![0x30, (uri.len() + 2) as u8, 0x86, uri.len() as u8];
        content.extend_from_slice(uri);
        let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 17], content);
        ext.set_criticality(false);
        let mut p = leaf_params(&[]);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.custom_extensions.push(ext);
        assert!(
            check_leaf(&sign(p, &ca))
                .unwrap_err()
                .to_string()
                .contains("not critical")
        );
        // The same with a critical SAN is fine.
        let mut p = leaf_params(&["spiffe://example.org/a"]);
        p.distinguished_name = rcgen::DistinguishedName::new();
        check_leaf(&sign(p, &ca)).unwrap();
    }

    #[test]
    fn rejects_foreign_trust_domain_and_unknown_authority() {
        let ca = ca();
        let other = sign(leaf_params(&["spiffe://other.org/a"]), &ca);
        assert!(
            verify_chain(&[other], &bundle(&ca), NOW)
                .unwrap_err()
                .to_string()
                .contains("trust domain")
        );
        let stranger = self::ca();
        let leaf = sign(leaf_params(&["spiffe://example.org/a"]), &stranger);
        assert!(verify_chain(&[leaf], &bundle(&ca), NOW).is_err());
    }

    #[test]
    fn rejects_expired_svid() {
        let ca = ca();
        let leaf = sign(leaf_params(&["spiffe://example.org/a"]), &ca);
        assert!(verify_chain(&[leaf], &bundle(&ca), NOW + 601).is_err());
    }

    #[test]
    fn rejects_signing_cert_with_path_or_without_ca() {
        let kp = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org/ca".try_into().unwrap())];
        let der = p.self_signed(&kp).unwrap().der().to_vec();
        assert!(
            check_signing_cert(&der)
                .unwrap_err()
                .to_string()
                .contains("has a path")
        );
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let der = p.self_signed(&kp).unwrap().der().to_vec();
        assert!(
            check_signing_cert(&der)
                .unwrap_err()
                .to_string()
                .contains("cA=true")
        );
    }

    #[test]
    fn verifies_through_an_intermediate() {
        let root = ca();
        let ikp = KeyPair::generate().unwrap();
        let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
        ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ip.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        ip.not_before = time(NOW - 3600);
        ip.not_after = time(NOW + 3600);
        let ider = ip.signed_by(&ikp, &root.issuer).unwrap().der().to_vec();
        let inter = Ca {
            der: ider.clone(),
            issuer: Issuer::new(ip, ikp),
        };
        let leaf = sign(leaf_params(&["spiffe://example.org/a"]), &inter);
        verify_chain(&[leaf.clone(), ider], &bundle(&root), NOW).unwrap();
        assert!(verify_chain(&[leaf], &bundle(&root), NOW).is_err());
    }
}
