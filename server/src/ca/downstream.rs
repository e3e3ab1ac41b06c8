//! Signing the CAs of downstream servers (nested servers) with the active CA.
//!
//! A downstream server proves possession of its new CA key with a PKCS#10 CSR whose only
//! SAN is the URI `spiffe://<trust domain>`; [`CaManager::sign_downstream_ca`] certifies
//! that key as an intermediate CA of the trust domain under the active CA. What is
//! granted is the *trust domain, a depth and a lifetime*, never a path:
//!
//! - the certificate's only SAN is `spiffe://<trust domain>` (a CSR naming another trust
//!   domain, a path, a DNS name or anything else is refused: a signing certificate names
//!   its trust domain only);
//! - its pathLenConstraint is what the caller asked for, which must be below this
//!   server's `[downstream] max_depth` and below the active CA's own pathLenConstraint;
//! - its lifetime is at most `[downstream] ca_ttl_max` and never past the active CA's
//!   notAfter; a request the active CA's remaining life would cut to less than half of
//!   what it would get otherwise, or to less than [`MIN_DOWNSTREAM_CA_TTL`], is refused
//!   ("retry after its rotation") rather than answered with a CA about to expire
//!   (SPIRE #7199).
//!
//! No URI name constraints: RFC 5280 URI constraints bind the host part only (so they
//! could not bound a path), and rustls-webpki rejects every chain in which a URI SAN meets
//! a URI constraint (RUSTSEC-2026-0098), which would break every SVID the downstream
//! signs. A downstream CA can therefore sign any SPIFFE ID of the trust domain, as in
//! SPIRE.
//!
//! Subject: `C=<ca_country>, O=<ca_organization>, OU=DOWNSTREAM-<n>, CN=<td> downstream
//! CA`, where `n` is the tier of the server the CA is for, counted in servers below the
//! top: 1 under a server whose own CA is not a downstream CA (self-signed, or certified by
//! a disk/pkcs11 root), `k + 1` under a server whose active CA is `OU=DOWNSTREAM-k`. The
//! certificate carries an authority key identifier (and rcgen's subject key identifier),
//! so path builders tell CAs of the same subject apart.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, DistinguishedName, DnType};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use carapace_core::limits::describe;
use carapace_core::{JwtKey, SpiffeId, TrustBundle};

use super::{
    BACKDATE, CaManager, ROTATE_INTERVAL, SubjectKey, ca_params, path_len_constraint,
    signing_failed, with_ca_key,
};
use crate::config::Downstream;
use crate::{Error, Result};

/// The shortest downstream CA this server signs: ten rotator intervals. A shorter CA
/// would be due for replacement almost at once.
pub const MIN_DOWNSTREAM_CA_TTL: Duration = Duration::from_secs(10 * ROTATE_INTERVAL.as_secs());

/// The prefix of the organizational unit of downstream CAs; the tier follows.
pub const DOWNSTREAM_OU_PREFIX: &str = "DOWNSTREAM-";

/// A downstream server's request for a CA.
#[derive(Debug, Clone, Copy)]
pub struct DownstreamCaRequest<'a> {
    /// PKCS#10 CSR (DER) signed by the new CA key.
    pub csr_der: &'a [u8],
    /// The lifetime asked for; zero: the bound (`[downstream] ca_ttl_max`).
    pub preferred_ttl: Duration,
    /// The pathLenConstraint asked for (0: the downstream signs SVIDs only).
    pub path_len: u32,
    /// Who asks (authorized by the caller of this function).
    pub caller: &'a SpiffeId,
}

/// A signed downstream CA.
#[derive(Debug, Clone)]
pub struct DownstreamCa {
    /// The new CA certificate first, then every intermediate above it (never a root of
    /// the bundle), DER each.
    pub chain: Vec<Vec<u8>>,
    /// The bundle as this server serves it now.
    pub bundle: Arc<TrustBundle>,
    /// The new CA's serial number, lowercase hex.
    pub serial_hex: String,
    /// Its notAfter, unix seconds.
    pub not_after: i64,
    /// Its pathLenConstraint.
    pub path_len: u8,
}

impl CaManager {
    /// Certifies the key of `req.csr_der` as a downstream CA of this trust domain under
    /// the active CA at `now`, within `grant` (`[downstream]`; `None`: this server signs
    /// no downstream CA). See the module documentation for what is checked; every refusal
    /// names what is wrong, and nothing is signed then.
    pub async fn sign_downstream_ca(
        &self,
        grant: Option<&Downstream>,
        req: DownstreamCaRequest<'_>,
        now: i64,
    ) -> Result<DownstreamCa> {
        let grant = grant.ok_or_else(|| {
            Error::FailedPrecondition(
                "this server signs no downstream CA: its configuration has no [downstream] \
                 section (add `[downstream]`, with `max_depth` and `ca_ttl_max`, to serve \
                 downstream servers)"
                    .into(),
            )
        })?;
        let key = csr_ca_key(req.csr_der, &self.td)?;

        // Depth: below the grant, and below what the active CA itself may certify.
        let active = self.active()?;
        if req.path_len >= u32::from(grant.max_depth) {
            return Err(Error::PermissionDenied(format!(
                "path_len {} is beyond the grant: [downstream] max_depth = {} allows \
                 downstream CAs with a pathLenConstraint of at most {}",
                req.path_len,
                grant.max_depth,
                grant.max_depth - 1
            )));
        }
        let own = path_len_constraint(&active.cert_der)
            .map_err(|e| Error::Ca(format!("the active CA: {e}")))?;
        if let Some(k) = own {
            if req.path_len >= k {
                let what = if k == 0 {
                    "cannot certify another CA".to_owned()
                } else {
                    format!(
                        "certifies CAs with a pathLenConstraint of at most {}",
                        k - 1
                    )
                };
                return Err(Error::FailedPrecondition(format!(
                    "the active CA {} has pathLenConstraint {k}: it {what}; it was minted \
                     before [downstream] max_depth = {} applied: prepare and activate a \
                     new CA (`localauthority x509 prepare`, then `activate`)",
                    active.authority_id(),
                    grant.max_depth
                )));
            }
        }
        let path_len = u8::try_from(req.path_len).map_err(|_| {
            Error::InvalidArgument(format!("path_len {} is out of range", req.path_len))
        })?;

        let ttl = downstream_ttl(grant, req.preferred_ttl, active.not_after, now)?;
        let not_after = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));

        let tier = downstream_tier(&active.cert_der)?.saturating_add(1);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, self.settings.country.clone());
        dn.push(DnType::OrganizationName, self.settings.organization.clone());
        dn.push(
            DnType::OrganizationalUnitName,
            format!("{DOWNSTREAM_OU_PREFIX}{tier}"),
        );
        dn.push(DnType::CommonName, format!("{} downstream CA", self.td));
        let mut params = ca_params(
            &self.td,
            dn,
            BasicConstraints::Constrained(path_len),
            now - BACKDATE,
            not_after,
        )?;
        params.use_authority_key_identifier_extension = true;
        let serial_hex = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.as_ref()))
            .unwrap_or_default();

        let signer = active.clone();
        let cert_der = with_ca_key(&active, move || {
            params
                .signed_by(&key.0, &signer.issuer)
                .map(|c| c.der().to_vec())
                .map_err(|e| signing_failed(&signer, "the downstream CA", e))
        })
        .await?;
        carapace_core::x509svid::check_signing_cert(&cert_der)?;

        let mut chain = Vec::with_capacity(1 + active.chain.len());
        chain.push(cert_der);
        chain.extend(active.chain.iter().cloned());
        let bundle = self.bundle_tx.borrow().clone();
        crate::metrics::metrics().downstream_ca_signed();
        tracing::info!(
            caller = %req.caller,
            serial = %serial_hex,
            not_after = %carapace_core::clock::rfc3339(not_after),
            path_len,
            tier,
            issuer = %active.authority_id(),
            "signed a downstream CA"
        );
        Ok(DownstreamCa {
            chain,
            bundle,
            serial_hex,
            not_after,
            path_len,
        })
    }
}

/// How many JWT keys of one downstream server the bundle keeps (previous, current,
/// next: spire#4699 is what happens without a bound).
pub const MAX_DOWNSTREAM_JWT_KEYS: usize = 3;

impl CaManager {
    /// Adds downstream server `caller`'s JWT signing key to the trust domain's bundle at
    /// `now`, within `grant` (`[downstream]`; `None`: refused), and serves the new bundle
    /// at once; returns it. The key's `kid` must be its RFC 7638 thumbprint (so a `kid`
    /// names one key across every part of the bundle), of a supported type, and
    /// `expires_at` must be in the future and at most `ca_ttl_max` plus the longest
    /// JWT-SVID lifetime from now. The caller's part (`server_bundles` row
    /// `downstream:<id>`) keeps its [`MAX_DOWNSTREAM_JWT_KEYS`] keys that expire last;
    /// it leaves the bundle when they have all expired.
    pub async fn publish_downstream_jwt_key(
        &self,
        grant: Option<&Downstream>,
        caller: &SpiffeId,
        key: &JwtKey,
        now: i64,
    ) -> Result<Arc<TrustBundle>> {
        let grant = grant.ok_or_else(|| {
            Error::FailedPrecondition(
                "this server takes no downstream JWT key: its configuration has no \
                 [downstream] section (add `[downstream]` to serve downstream servers)"
                    .into(),
            )
        })?;
        check_downstream_jwt_key(key, grant, now)?;
        let union = self
            .ds
            .publish_downstream_jwt_key(
                &self.settings.server_id,
                &self.td,
                caller,
                key,
                MAX_DOWNSTREAM_JWT_KEYS,
                now,
            )
            .await?;
        self.refresh_bundle().await?;
        // A middle tier passes the key on, so that it reaches the top and, from there,
        // every tier; a failure fails the call, and the downstream server retries.
        if let Some(upstream) = &self.upstream {
            match upstream.publish_jwt_key(key).await {
                Ok(Some(bundle)) => {
                    self.apply_upstream_bundle(&bundle).await?;
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::Core(carapace_core::Error::Unavailable(format!(
                        "the key is in this tier's bundle but could not be passed on to \
                         this server's upstream authority {}: {e}",
                        upstream.name()
                    ))));
                }
            }
        }
        tracing::info!(
            caller = %caller,
            kid = %key.kid,
            expires_at = %key.expires_at.map(carapace_core::clock::rfc3339).unwrap_or_default(),
            sequence = union.sequence,
            "published a downstream server's JWT key"
        );
        Ok(self.bundle_tx.borrow().clone())
    }
}

/// The checks of a downstream server's JWT key; the error names the field.
fn check_downstream_jwt_key(key: &JwtKey, grant: &Downstream, now: i64) -> Result<()> {
    if key.kid.is_empty() {
        return Err(Error::InvalidArgument("key.kid: empty".into()));
    }
    let public = carapace_core::jose::PublicKey::from_spki_der(&key.public_key_der)
        .map_err(|e| Error::InvalidArgument(format!("key.public_key: {e}")))?;
    let thumbprint = public.thumbprint();
    if key.kid != thumbprint {
        return Err(Error::InvalidArgument(format!(
            "key.kid {:?} is not the RFC 7638 thumbprint of the key ({thumbprint})",
            key.kid
        )));
    }
    let expires_at = key.expires_at.ok_or_else(|| {
        Error::InvalidArgument(
            "key.expires_at: required (when the key stops signing plus the longest \
             JWT-SVID lifetime)"
                .into(),
        )
    })?;
    if expires_at <= now {
        return Err(Error::InvalidArgument(format!(
            "key.expires_at {} is not in the future",
            carapace_core::clock::rfc3339(expires_at)
        )));
    }
    let bound = grant
        .ca_ttl_max
        .saturating_add(carapace_core::limits::MAX_JWT_SVID_TTL);
    let latest = carapace_core::limits::unix_plus(now, bound).unwrap_or(i64::MAX);
    if expires_at > latest {
        return Err(Error::InvalidArgument(format!(
            "key.expires_at {} is beyond {} from now ([downstream] ca_ttl_max {} plus the \
             longest JWT-SVID lifetime, {}): a downstream server's JWT keys must not \
             outlive what this server grants its CAs",
            carapace_core::clock::rfc3339(expires_at),
            describe(bound),
            describe(grant.ca_ttl_max),
            describe(carapace_core::limits::MAX_JWT_SVID_TTL)
        )));
    }
    Ok(())
}

/// The lifetime of a downstream CA: `preferred` (zero: the bound) capped at
/// `[downstream] ca_ttl_max` and at the active CA's notAfter; refused when that cap
/// leaves less than half of the lifetime otherwise granted or less than
/// [`MIN_DOWNSTREAM_CA_TTL`].
fn downstream_ttl(
    grant: &Downstream,
    preferred: Duration,
    active_not_after: i64,
    now: i64,
) -> Result<Duration> {
    if !preferred.is_zero() && preferred < MIN_DOWNSTREAM_CA_TTL {
        return Err(Error::InvalidArgument(format!(
            "preferred_ttl_seconds {} is below the shortest downstream CA lifetime, {}",
            preferred.as_secs(),
            describe(MIN_DOWNSTREAM_CA_TTL)
        )));
    }
    let wanted = if preferred.is_zero() {
        grant.ca_ttl_max
    } else {
        preferred.min(grant.ca_ttl_max)
    };
    if wanted < MIN_DOWNSTREAM_CA_TTL {
        return Err(Error::FailedPrecondition(format!(
            "[downstream] ca_ttl_max = {} is below the shortest downstream CA lifetime, {}",
            describe(grant.ca_ttl_max),
            describe(MIN_DOWNSTREAM_CA_TTL)
        )));
    }
    let left = Duration::from_secs(u64::try_from(active_not_after - now).unwrap_or(0));
    let ttl = wanted.min(left);
    if ttl < wanted / 2 || ttl < MIN_DOWNSTREAM_CA_TTL {
        return Err(Error::FailedPrecondition(format!(
            "the upstream CA expires in {} (at {}): a downstream CA signed now would live \
             {}, less than half of the {} it is granted; retry after its rotation",
            describe(left),
            carapace_core::clock::rfc3339(active_not_after),
            describe(ttl),
            describe(wanted)
        )));
    }
    Ok(ttl)
}

/// The CA key of a downstream server's CSR: the CSR parses, its self-signature verifies,
/// the key type is one Carapace uses, and its SANs are exactly the URI of `td`.
fn csr_ca_key(csr_der: &[u8], td: &carapace_core::TrustDomain) -> Result<SubjectKey> {
    let spki = super::csr_public_key_der(csr_der)?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
        .map_err(|e| Error::InvalidArgument(format!("csr: not a PKCS#10 request: {e}")))?;
    let want = td.id_string();
    let mut names: Vec<&GeneralName<'_>> = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => names.extend(san.general_names.iter()),
            ParsedExtension::ParseError { error } => {
                return Err(Error::InvalidArgument(format!(
                    "csr: a requested extension does not parse: {error}"
                )));
            }
            _ => {}
        }
    }
    let uri = match names.as_slice() {
        [] => {
            return Err(Error::InvalidArgument(format!(
                "csr: no subject alternative name; a downstream CA's CSR carries exactly \
                 one, the URI {want}"
            )));
        }
        [GeneralName::URI(uri)] => *uri,
        [other] => {
            return Err(Error::InvalidArgument(format!(
                "csr: subject alternative name {} is not allowed; a downstream CA's only \
                 SAN is the URI {want}",
                describe_name(other)
            )));
        }
        many => {
            return Err(Error::InvalidArgument(format!(
                "csr: {} subject alternative names ({}); a downstream CA's only SAN is \
                 the URI {want}",
                many.len(),
                many.iter()
                    .map(|n| describe_name(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    };
    let id: SpiffeId = uri.parse().map_err(|e| {
        Error::InvalidArgument(format!(
            "csr: SAN URI {uri:?} is not a SPIFFE ID ({e}); a downstream CA's only SAN is \
             the URI {want}"
        ))
    })?;
    if !id.is_member_of(td) {
        return Err(Error::PermissionDenied(format!(
            "csr: SAN {id} is in trust domain {}, not {td}: this server signs CAs of its \
             own trust domain only",
            id.trust_domain_name()
        )));
    }
    if !id.path().is_empty() {
        return Err(Error::PermissionDenied(format!(
            "csr: SAN {id} has a path; a CA certificate names the trust domain only, not a \
             path (ask for {want})"
        )));
    }
    SubjectKey::from_spki(&spki)
}

/// A SAN for messages: its kind and value.
fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI {u}"),
        GeneralName::DNSName(d) => format!("DNS {d}"),
        GeneralName::RFC822Name(m) => format!("email {m}"),
        GeneralName::IPAddress(_) => "an IP address".to_owned(),
        GeneralName::DirectoryName(_) => "a directory name".to_owned(),
        _ => "an unsupported name type".to_owned(),
    }
}

fn parse_cert(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>> {
    x509_parser::certificate::X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| Error::Ca(format!("the active CA certificate does not parse: {e}")))
}

/// The tier of a CA certificate among downstream CAs: `k` for `OU=DOWNSTREAM-k`, 0 for
/// any other CA (self-signed, or certified by a root that is not a server).
fn downstream_tier(cert_der: &[u8]) -> Result<u32> {
    let cert = parse_cert(cert_der)?;
    Ok(cert
        .subject()
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .filter_map(|ou| ou.strip_prefix(DOWNSTREAM_OU_PREFIX))
        .filter_map(|n| n.parse::<u32>().ok())
        .max()
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaSettings;
    use crate::datastore::Datastore;
    use carapace_core::plugin::{KeyManager, UpstreamAuthority};
    use carapace_core::{KeyType, TrustDomain};
    use carapace_keymanager_soft::MemoryKeyManager;
    use rcgen::{CertificateParams, Issuer, KeyPair, SanType};

    const NOW: i64 = 1_900_000_000;
    const HOUR: u64 = 3600;
    const TD: &str = "spiffe://example.org";

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn settings(ca_ttl: u64, path_len: u8) -> CaSettings {
        CaSettings {
            ca_ttl: Duration::from_secs(ca_ttl),
            key_type: KeyType::EcP256,
            organization: "Carapace".into(),
            country: "US".into(),
            jwt_key_type: KeyType::EcP256,
            server_id: "server-1".into(),
            path_len,
        }
    }

    fn grant(max_depth: u8, ca_ttl_max: u64) -> Downstream {
        Downstream {
            max_depth,
            ca_ttl_max: Duration::from_secs(ca_ttl_max),
        }
    }

    /// A server with a self-signed CA living `ca_ttl` seconds from `now`.
    async fn server(ca_ttl: u64, now: i64) -> Arc<CaManager> {
        let ds = Datastore::open_in_memory().await.unwrap();
        let km = Arc::new(MemoryKeyManager::new());
        CaManager::load(td(), km, None, ds, settings(ca_ttl, 1), now)
            .await
            .unwrap()
    }

    /// A server whose CA is an intermediate of a disk-style root, minted with `path_len`.
    async fn server_under_root(path_len: u8, now: i64) -> Arc<CaManager> {
        let root_km = MemoryKeyManager::new();
        let key = root_km.generate_key("root", KeyType::EcP256).await.unwrap();
        let der = crate::upstream::make_root_certificate(
            &td(),
            key.clone(),
            "root",
            "Carapace",
            Duration::from_secs(30 * 86_400),
            now,
        )
        .unwrap();
        let root: Arc<dyn UpstreamAuthority> =
            Arc::new(crate::upstream::LocalRoot::new("disk", der, key, now).unwrap());
        let ds = Datastore::open_in_memory().await.unwrap();
        let km = Arc::new(MemoryKeyManager::new());
        CaManager::load(
            td(),
            km,
            Some(root),
            ds,
            settings(10 * 86_400, path_len),
            now,
        )
        .await
        .unwrap()
    }

    /// A new CA key and a CSR for it with `sans`.
    fn csr(sans: Vec<SanType>) -> (KeyPair, Vec<u8>) {
        let kp = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let der = params.serialize_request(&kp).unwrap().der().to_vec();
        (kp, der)
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    fn caller() -> SpiffeId {
        "spiffe://example.org/downstream/site-a".parse().unwrap()
    }

    async fn sign(
        ca: &CaManager,
        grant: Option<&Downstream>,
        csr_der: &[u8],
        preferred_ttl: u64,
        path_len: u32,
        now: i64,
    ) -> Result<DownstreamCa> {
        let caller = caller();
        ca.sign_downstream_ca(
            grant,
            DownstreamCaRequest {
                csr_der,
                preferred_ttl: Duration::from_secs(preferred_ttl),
                path_len,
                caller: &caller,
            },
            now,
        )
        .await
    }

    /// An X509-SVID for `id` signed by the downstream CA (`ca_der`, key `ca_key`): leaf
    /// first, then the chain the upstream returned.
    fn leaf_under(ca_der: &[u8], ca_key: &KeyPair, chain: &[Vec<u8>], id: &str) -> Vec<Vec<u8>> {
        let issuer = Issuer::from_ca_cert_der(&ca_der.into(), ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "workload");
        params.subject_alt_names = vec![uri(id)];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = crate::ca::offset(NOW - 60).unwrap();
        params.not_after = crate::ca::offset(NOW + 600).unwrap();
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        let mut out = vec![leaf.der().to_vec()];
        out.extend(chain.iter().cloned());
        out
    }

    fn cert(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
        parse_cert(der).unwrap()
    }

    fn ou(der: &[u8]) -> Vec<String> {
        cert(der)
            .subject()
            .iter_organizational_unit()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_downstream_ca_signs_svids_that_verify_against_the_bundle() {
        let ca = server(86_400, NOW).await;
        let (kp, csr_der) = csr(vec![uri(TD)]);
        let g = grant(1, 4 * HOUR);
        let minted = sign(&ca, Some(&g), &csr_der, 0, 0, NOW).await.unwrap();

        // A self-signed active CA is in the bundle: the chain is the new CA alone.
        assert_eq!(minted.chain.len(), 1);
        let der = &minted.chain[0];
        assert_eq!(
            carapace_core::x509svid::public_key_of(der).unwrap(),
            rcgen::PublicKeyData::subject_public_key_info(&kp)
        );
        carapace_core::x509svid::check_signing_cert(der).unwrap();
        assert_eq!(path_len_constraint(der).unwrap(), Some(0));
        assert_eq!(minted.path_len, 0);
        assert_eq!(ou(der), vec!["DOWNSTREAM-1".to_owned()]);
        let c = cert(der);
        let cn: Vec<_> = c
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(cn, vec!["example.org downstream CA"]);
        let san = c.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI(TD)],
            "the only SAN is the trust domain's URI"
        );
        assert!(
            c.extensions().iter().any(|e| matches!(
                e.parsed_extension(),
                ParsedExtension::AuthorityKeyIdentifier(_)
            )),
            "the downstream CA carries an AKID"
        );
        // Lifetime: the bound (preferred 0), backdated start.
        let (nb, na) = carapace_core::x509svid::validity_of(der).unwrap();
        assert_eq!((nb, na), (NOW - BACKDATE, NOW + 4 * HOUR as i64));
        assert_eq!(minted.not_after, na);
        assert_eq!(hex::encode(c.raw_serial()), minted.serial_hex);
        // The bundle returned is the server's.
        assert_eq!(*minted.bundle, *ca.bundle().borrow().clone());

        // A leaf the downstream signs with its new CA verifies against the upstream bundle.
        let chain = leaf_under(
            der,
            &kp,
            &minted.chain,
            "spiffe://example.org/anything/at/all",
        );
        let v = carapace_core::x509svid::verify_chain(&chain, &minted.bundle, NOW as u64).unwrap();
        assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/anything/at/all");
        // ... and only under it: not against another server's bundle.
        let other = server(86_400, NOW).await;
        let err =
            carapace_core::x509svid::verify_chain(&chain, &other.bundle().borrow(), NOW as u64)
                .unwrap_err()
                .to_string();
        assert!(err.contains("does not verify"), "{err}");
    }

    #[tokio::test]
    async fn under_an_intermediate_the_chain_carries_it_and_pathlen_follows_the_grant() {
        let ca = server_under_root(2, NOW).await;
        let active = ca.active().unwrap();
        assert_eq!(path_len_constraint(&active.cert_der).unwrap(), Some(2));
        let (kp, csr_der) = csr(vec![uri(TD)]);
        let g = grant(2, 4 * HOUR);
        let minted = sign(&ca, Some(&g), &csr_der, 2 * HOUR, 1, NOW)
            .await
            .unwrap();
        // [new CA, this server's CA]; the root is in the bundle.
        assert_eq!(minted.chain.len(), 2);
        assert_eq!(minted.chain[1], active.cert_der);
        assert_eq!(path_len_constraint(&minted.chain[0]).unwrap(), Some(1));
        assert_eq!(ou(&minted.chain[0]), vec!["DOWNSTREAM-1".to_owned()]);
        assert_eq!(
            minted.not_after,
            NOW + 2 * HOUR as i64,
            "preferred below the bound"
        );
        let chain = leaf_under(
            &minted.chain[0],
            &kp,
            &minted.chain,
            "spiffe://example.org/w",
        );
        carapace_core::x509svid::verify_chain(&chain, &minted.bundle, NOW as u64).unwrap();
        // The tier of a CA under a downstream CA is one more.
        assert_eq!(downstream_tier(&minted.chain[0]).unwrap(), 1);
        assert_eq!(downstream_tier(&active.cert_der).unwrap(), 0);

        // pathLen 2 is the grant's limit (max_depth 2 allows at most 1).
        let err = sign(&ca, Some(&g), &csr_der, 0, 2, NOW).await.unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("path_len 2 is beyond the grant")
                && msg.contains("max_depth = 2")
                && msg.contains("at most 1"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn an_active_ca_minted_without_room_below_it_is_named() {
        // The server's CA was minted with pathLen 0 (before [downstream] was configured).
        let ca = server_under_root(0, NOW).await;
        let (_, csr_der) = csr(vec![uri(TD)]);
        let err = sign(&ca, Some(&grant(1, 4 * HOUR)), &csr_der, 0, 0, NOW)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("has pathLenConstraint 0: it cannot certify another CA")
                && msg.contains("localauthority x509 prepare"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn the_lifetime_is_capped_by_the_bound_and_the_active_ca() {
        let ca = server(86_400, NOW).await;
        let active_end = ca.active().unwrap().not_after;
        let (_, csr_der) = csr(vec![uri(TD)]);
        let g = grant(1, 4 * HOUR);
        let na = |m: DownstreamCa| m.not_after - NOW;
        // Preferred above the bound: the bound.
        let m = sign(&ca, Some(&g), &csr_der, 10 * HOUR, 0, NOW)
            .await
            .unwrap();
        assert_eq!(na(m), 4 * HOUR as i64);
        // Preferred below: preferred.
        let m = sign(&ca, Some(&g), &csr_der, HOUR, 0, NOW).await.unwrap();
        assert_eq!(na(m), HOUR as i64);
        // Near the active CA's end: capped at its notAfter while that is at least half.
        let late = active_end - 3 * HOUR as i64;
        let m = sign(&ca, Some(&g), &csr_der, 0, 0, late).await.unwrap();
        assert_eq!(m.not_after, active_end);
        // Less than half left: refused, naming when the upstream CA expires.
        let later = active_end - HOUR as i64;
        let err = sign(&ca, Some(&g), &csr_der, 0, 0, later)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("the upstream CA expires in 3600s")
                && msg.contains("retry after its rotation"),
            "{msg}"
        );
        // Half of a short preferred TTL is fine, but never less than the minimum.
        let m = sign(&ca, Some(&g), &csr_der, 2 * HOUR, 0, later)
            .await
            .unwrap();
        assert_eq!(m.not_after, active_end);
        let err = sign(&ca, Some(&g), &csr_der, 150, 0, active_end - 90)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("retry after its rotation"),
            "{err}"
        );
        // A preferred TTL below the minimum is refused as such.
        let err = sign(&ca, Some(&g), &csr_der, 30, 0, NOW).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("preferred_ttl_seconds 30 is below the shortest downstream CA lifetime"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn bad_requests_are_refused_naming_what_is_wrong() {
        let ca = server(86_400, NOW).await;
        let g = grant(1, 4 * HOUR);
        let refused = |r: Result<DownstreamCa>| r.map(|_| ()).unwrap_err();

        // No [downstream]: refused before anything else.
        let (_, good) = csr(vec![uri(TD)]);
        let err = refused(sign(&ca, None, &good, 0, 0, NOW).await);
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert!(err.to_string().contains("no [downstream] section"), "{err}");

        // Not a CSR; a CSR whose signature does not verify.
        let err = refused(sign(&ca, Some(&g), b"garbage", 0, 0, NOW).await);
        assert!(
            err.to_string().contains("csr: not a PKCS#10 request"),
            "{err}"
        );
        let mut broken = good.clone();
        let n = broken.len();
        broken[n - 5] ^= 0xff;
        let err = refused(sign(&ca, Some(&g), &broken, 0, 0, NOW).await);
        assert!(
            err.to_string().contains("csr: signature does not verify"),
            "{err}"
        );

        // Another trust domain; a path; refused as beyond the grant.
        let (_, other_td) = csr(vec![uri("spiffe://other.test")]);
        let err = refused(sign(&ca, Some(&g), &other_td, 0, 0, NOW).await);
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        assert!(
            err.to_string().contains(
                "csr: SAN spiffe://other.test is in trust domain other.test, not example.org"
            ),
            "{err}"
        );
        let (_, with_path) = csr(vec![uri("spiffe://example.org/site-a")]);
        let err = refused(sign(&ca, Some(&g), &with_path, 0, 0, NOW).await);
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("a CA certificate names the trust domain only, not a path"),
            "{err}"
        );

        // No SAN, a DNS SAN, two SANs, a URI that is not a SPIFFE ID.
        let (_, none) = csr(vec![]);
        let err = refused(sign(&ca, Some(&g), &none, 0, 0, NOW).await);
        assert!(
            err.to_string().contains("csr: no subject alternative name"),
            "{err}"
        );
        let (_, dns) = csr(vec![SanType::DnsName("ca.example.org".try_into().unwrap())]);
        let err = refused(sign(&ca, Some(&g), &dns, 0, 0, NOW).await);
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("subject alternative name DNS ca.example.org is not allowed"),
            "{err}"
        );
        let (_, two) = csr(vec![
            uri(TD),
            SanType::DnsName("ca.example.org".try_into().unwrap()),
        ]);
        let err = refused(sign(&ca, Some(&g), &two, 0, 0, NOW).await);
        assert!(
            err.to_string().contains("csr: 2 subject alternative names"),
            "{err}"
        );
        let (_, https) = csr(vec![uri("https://example.org")]);
        let err = refused(sign(&ca, Some(&g), &https, 0, 0, NOW).await);
        assert!(err.to_string().contains("is not a SPIFFE ID"), "{err}");

        // A depth beyond the grant.
        let err = refused(sign(&ca, Some(&g), &good, 0, 1, NOW).await);
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        assert!(
            err.to_string().contains("path_len 1 is beyond the grant"),
            "{err}"
        );

        // An unsupported key type (Ed25519).
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri(TD)];
        let ed_csr = params.serialize_request(&ed).unwrap().der().to_vec();
        let err = refused(sign(&ca, Some(&g), &ed_csr, 0, 0, NOW).await);
        assert!(
            matches!(err, Error::Core(_) | Error::InvalidArgument(_)),
            "{err:?}"
        );

        // And the good one is signed.
        sign(&ca, Some(&g), &good, 0, 0, NOW).await.unwrap();
    }

    /// A JWT key of a downstream server as it publishes it: kid = thumbprint.
    fn downstream_jwt_key(expires_at: i64) -> JwtKey {
        let kp = KeyPair::generate().unwrap();
        let der = rcgen::PublicKeyData::subject_public_key_info(&kp);
        JwtKey {
            kid: carapace_core::jose::PublicKey::from_spki_der(&der)
                .unwrap()
                .thumbprint(),
            public_key_der: der,
            expires_at: Some(expires_at),
        }
    }

    #[tokio::test]
    async fn a_downstream_jwt_key_joins_the_served_bundle_checked_and_bounded() {
        let now = carapace_core::clock::unix_now();
        let ca = server(86_400, now).await;
        let g = grant(1, 4 * HOUR);
        let site = caller();
        let before = ca.bundle().borrow().clone();
        let own_kids: Vec<String> = before
            .jwt_authorities
            .iter()
            .map(|k| k.kid.clone())
            .collect();

        // Refusals, each naming the field; nothing reaches the bundle.
        let refused = |key: JwtKey| {
            let ca = ca.clone();
            let site = site.clone();
            let g = g.clone();
            async move {
                ca.publish_downstream_jwt_key(Some(&g), &site, &key, now)
                    .await
                    .unwrap_err()
                    .to_string()
            }
        };
        let mut wrong_kid = downstream_jwt_key(now + 600);
        wrong_kid.kid = "my-key".into();
        let err = refused(wrong_kid).await;
        assert!(
            err.contains("key.kid \"my-key\" is not the RFC 7638 thumbprint of the key"),
            "{err}"
        );
        let mut no_expiry = downstream_jwt_key(now + 600);
        no_expiry.expires_at = None;
        assert!(
            refused(no_expiry)
                .await
                .contains("key.expires_at: required")
        );
        let err = refused(downstream_jwt_key(now)).await;
        assert!(err.contains("is not in the future"), "{err}");
        let err = refused(downstream_jwt_key(now + 4 * HOUR as i64 + 86_400 + 1)).await;
        assert!(err.contains("is beyond 100800s from now"), "{err}");
        let mut not_a_key = downstream_jwt_key(now + 600);
        not_a_key.public_key_der = b"nope".to_vec();
        assert!(refused(not_a_key).await.contains("key.public_key"));
        let err = ca
            .publish_downstream_jwt_key(None, &site, &downstream_jwt_key(now + 600), now)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert!(err.to_string().contains("no [downstream] section"), "{err}");
        assert_eq!(*ca.bundle().borrow().clone(), *before);

        // A good key: served at once, the sequence moves, the own keys stay.
        let key = downstream_jwt_key(now + 600);
        let served = ca
            .publish_downstream_jwt_key(Some(&g), &site, &key, now)
            .await
            .unwrap();
        assert!(served.sequence > before.sequence);
        assert_eq!(*served, *ca.bundle().borrow().clone());
        assert!(served.jwt_authorities.contains(&key));
        for kid in &own_kids {
            assert!(served.jwt_authorities.iter().any(|k| &k.kid == kid));
        }
        assert_eq!(served.x509_authorities, before.x509_authorities);

        // Three more: the first one published leaves (it expires first).
        let more: Vec<JwtKey> = (2..=4).map(|i| downstream_jwt_key(now + 600 * i)).collect();
        for k in &more {
            ca.publish_downstream_jwt_key(Some(&g), &site, k, now)
                .await
                .unwrap();
        }
        let served = ca.bundle().borrow().clone();
        assert!(!served.jwt_authorities.contains(&key));
        for k in &more {
            assert!(served.jwt_authorities.contains(k));
        }
        assert_eq!(
            served.jwt_authorities.len(),
            own_kids.len() + MAX_DOWNSTREAM_JWT_KEYS
        );

        // The CA's own rotation keeps the downstream keys in the bundle.
        ca.prepare(now).await.unwrap();
        let served = ca.bundle().borrow().clone();
        for k in &more {
            assert!(served.jwt_authorities.contains(k));
        }
    }
}
