//! A small client of the SPIFFE Workload API, for a Carapace process that is itself a
//! workload of an agent: a downstream server takes the X509-SVID it presents to its
//! upstream server from the agent beside it (nested servers).
//!
//! The caller builds the channel (`carapace_common::unix_socket::uds_channel_checked`
//! checks the answering process's uid before the first byte); [`client`] adds the
//! security header every request must carry; [`fetch_x509_svid`] follows
//! `FetchX509SVID` and converts each response into core types, re-checking what the
//! agent sent (a peer's bytes are untrusted): the SPIFFE ID, the chain (the leaf rules,
//! the signing-certificate rules, the leaf's ID equal to the announced one) and the
//! bundle (every authority a certificate). Keys are kept in [`Zeroizing`] buffers and the
//! wire copy is wiped once converted.

use carapace_core::x509svid::{check_leaf, check_signing_cert, validity_of};
use carapace_core::{Error, SpiffeId, TrustBundle, TrustDomain};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use zeroize::{Zeroize as _, Zeroizing};

use crate::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::workload::{X509svidRequest, X509svidResponse};

/// The metadata key every Workload API request carries (value `true`), so that a
/// workload cannot be tricked into calling the Workload API by a server-side request
/// forgery.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Adds `workload.spiffe.io: true` to every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request.metadata_mut().insert(
            SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(request)
    }
}

/// A Workload API client that sends the security header on every request.
pub type WorkloadClient = SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>;

/// A Workload API client over `channel`.
pub fn client(channel: Channel) -> WorkloadClient {
    SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader)
}

/// One X509-SVID of the caller, checked.
pub struct X509Svid {
    /// Its SPIFFE ID (the leaf's URI SAN, equal to what the agent announced).
    pub spiffe_id: SpiffeId,
    /// The chain, leaf first, then the intermediates, DER each.
    pub chain: Vec<Vec<u8>>,
    /// The private key, PKCS#8 DER.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// The operator's hint (may be empty).
    pub hint: String,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("chain_len", &self.chain.len())
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

/// One `FetchX509SVID` response: the caller's SVIDs (the first is the default identity)
/// and the bundle of the default SVID's trust domain.
#[derive(Debug)]
pub struct X509Context {
    /// At least one.
    pub svids: Vec<X509Svid>,
    /// The bundle of the first SVID's trust domain (its X.509 authorities only: the
    /// Workload API carries no JWT keys, sequence or refresh hint here).
    pub bundle: TrustBundle,
}

impl X509Context {
    /// The default identity (the first SVID).
    pub fn default_svid(&self) -> Option<&X509Svid> {
        self.svids.first()
    }
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::InvalidSvid(format!("the Workload API sent {msg}"))
}

/// Splits concatenated DER certificates (the Workload API's chain and bundle form):
/// each must be one complete DER SEQUENCE that parses as a certificate; nothing may
/// trail. `what` names the field in errors.
pub fn split_certificates(mut der: &[u8], what: &str) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let len = der_element_len(der).ok_or_else(|| {
            bad(format!(
                "a {what} that is not concatenated DER certificates"
            ))
        })?;
        let (one, rest) = der.split_at(len);
        validity_of(one).map_err(|e| {
            bad(format!(
                "a {what} with a certificate that does not parse: {e}"
            ))
        })?;
        out.push(one.to_vec());
        der = rest;
    }
    Ok(out)
}

/// The length (header included) of the DER SEQUENCE at the start of `der`, if it is one
/// and fits in `der`.
fn der_element_len(der: &[u8]) -> Option<usize> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (content, header) = match first {
        n if n < 0x80 => (usize::from(n), 2),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            let bytes = rest.get(..n)?;
            // DER: the shortest length form, no leading zero byte.
            if bytes.first() == Some(&0) {
                return None;
            }
            let len = bytes.iter().try_fold(0usize, |acc, &b| {
                acc.checked_mul(256)?.checked_add(usize::from(b))
            })?;
            if len < 0x80 {
                return None;
            }
            (len, 2 + n)
        }
        _ => return None,
    };
    let total = header.checked_add(content)?;
    (total <= der.len()).then_some(total)
}

/// One wire SVID, checked; the wire key is wiped.
fn svid_from_wire(wire: &mut crate::workload::X509svid) -> Result<X509Svid, Error> {
    let key_pkcs8 = Zeroizing::new(std::mem::take(&mut wire.x509_svid_key));
    wire.x509_svid_key.zeroize();
    let spiffe_id: SpiffeId = wire
        .spiffe_id
        .parse()
        .map_err(|e| bad(format!("an SVID with a bad spiffe_id: {e}")))?;
    let chain = split_certificates(&wire.x509_svid, "x509_svid")?;
    let leaf = chain
        .first()
        .ok_or_else(|| bad(format!("an empty certificate chain for {spiffe_id}")))?;
    let leaf_id = check_leaf(leaf).map_err(|e| bad(format!("for {spiffe_id}: {e}")))?;
    if leaf_id != spiffe_id {
        return Err(bad(format!(
            "an SVID announced as {spiffe_id} whose certificate is for {leaf_id}"
        )));
    }
    for ca in chain.iter().skip(1) {
        check_signing_cert(ca).map_err(|e| bad(format!("for {spiffe_id}: {e}")))?;
    }
    if key_pkcs8.is_empty() {
        return Err(bad(format!("no private key for {spiffe_id}")));
    }
    Ok(X509Svid {
        spiffe_id,
        chain,
        key_pkcs8,
        hint: std::mem::take(&mut wire.hint),
    })
}

/// Converts one `FetchX509SVID` response, checked (see the module documentation); the
/// keys on the wire are wiped whatever the outcome.
pub fn x509_context_from_wire(mut wire: X509svidResponse) -> Result<X509Context, Error> {
    let mut svids = Vec::with_capacity(wire.svids.len());
    let mut first_err = None;
    for s in &mut wire.svids {
        // Every key is taken off the wire (and wiped there), even after an error.
        match svid_from_wire(s) {
            Ok(svid) => svids.push(svid),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let first = wire
        .svids
        .first()
        .ok_or_else(|| bad("a response without SVIDs"))?;
    let td: TrustDomain = svids
        .first()
        .map(|s| s.spiffe_id.trust_domain())
        .ok_or_else(|| bad("a response without SVIDs"))?;
    let mut bundle = TrustBundle::new(td);
    bundle.x509_authorities = split_certificates(&first.bundle, "bundle")?;
    if bundle.x509_authorities.is_empty() {
        return Err(bad(format!(
            "an empty bundle for trust domain {}",
            bundle.trust_domain()
        )));
    }
    Ok(X509Context { svids, bundle })
}

/// A Workload API status as a core error; `PermissionDenied` (no identity for this
/// process) says so.
pub fn status_error(status: &Status) -> Error {
    match status.code() {
        Code::PermissionDenied => Error::WorkloadAttestation(format!(
            "the agent issued no identity to this process: {}",
            status.message()
        )),
        code => Error::Unavailable(format!("Workload API error {code:?}: {}", status.message())),
    }
}

/// The `FetchX509SVID` stream, converted.
#[derive(Debug)]
pub struct X509ContextStream {
    inner: tonic::Streaming<X509svidResponse>,
}

impl X509ContextStream {
    /// The next response, checked; `Ok(None)` when the agent ends the stream. A response
    /// that fails the checks is an error, and the stream may still go on.
    pub async fn next(&mut self) -> Result<Option<X509Context>, Error> {
        match self.inner.message().await {
            Ok(Some(m)) => x509_context_from_wire(m).map(Some),
            Ok(None) => Ok(None),
            Err(s) => Err(status_error(&s)),
        }
    }
}

/// Opens `FetchX509SVID` on `channel` (with the security header).
pub async fn fetch_x509_svid(channel: Channel) -> Result<X509ContextStream, Error> {
    let inner = client(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    Ok(X509ContextStream { inner })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use crate::workload::X509svid;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };

    /// A CA of `example.org` and an SVID for `id` it signed: (leaf, ca, leaf key PKCS#8).
    fn svid(id: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        let ca_cert = ca.clone().self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::default();
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let leaf_cert = leaf.signed_by(&key, &issuer).unwrap();
        (
            leaf_cert.der().to_vec(),
            ca_cert.der().to_vec(),
            key.serialize_der(),
        )
    }

    fn wire(id: &str, chain: Vec<u8>, key: Vec<u8>, bundle: Vec<u8>) -> X509svidResponse {
        X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: id.into(),
                x509_svid: chain,
                x509_svid_key: key,
                bundle,
                hint: "h".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_good_response_converts_to_core_types() {
        let id = "spiffe://example.org/downstream/a";
        let (leaf, ca, key) = svid(id);
        let ctx = x509_context_from_wire(wire(id, leaf.clone(), key.clone(), ca.clone())).unwrap();
        let s = ctx.default_svid().unwrap();
        assert_eq!(s.spiffe_id.to_string(), id);
        assert_eq!(s.chain, vec![leaf.clone()]);
        assert_eq!(s.key_pkcs8.as_slice(), key.as_slice());
        assert_eq!(s.hint, "h");
        assert_eq!(ctx.bundle.trust_domain().name(), "example.org");
        assert_eq!(ctx.bundle.x509_authorities, vec![ca.clone()]);
        // The chain verifies against the bundle as delivered (rcgen's certificates are
        // valid from 1975 to 4096).
        carapace_core::x509svid::verify_chain(&s.chain, &ctx.bundle, 1_900_000_000).unwrap();
        // Two certificates in the bundle, concatenated.
        let two = x509_context_from_wire(wire(id, leaf, key, [ca.clone(), ca].concat())).unwrap();
        assert_eq!(two.bundle.x509_authorities.len(), 2);
    }

    #[test]
    fn bad_responses_are_refused_naming_the_fault() {
        let id = "spiffe://example.org/downstream/a";
        let (leaf, ca, key) = svid(id);
        let cases: Vec<(X509svidResponse, &str)> = vec![
            (X509svidResponse::default(), "without SVIDs"),
            (
                wire(
                    "spiffe://example.org/other",
                    leaf.clone(),
                    key.clone(),
                    ca.clone(),
                ),
                "whose certificate is for spiffe://example.org/downstream/a",
            ),
            (
                wire("not an id", leaf.clone(), key.clone(), ca.clone()),
                "bad spiffe_id",
            ),
            (
                wire(id, Vec::new(), key.clone(), ca.clone()),
                "empty certificate chain",
            ),
            (
                wire(
                    id,
                    [leaf.clone(), vec![0x30]].concat(),
                    key.clone(),
                    ca.clone(),
                ),
                "x509_svid that is not concatenated DER",
            ),
            // The CA as the leaf: the leaf rules apply.
            (wire(id, ca.clone(), key.clone(), ca.clone()), "has no path"),
            // The leaf as an intermediate: the signing-certificate rules apply.
            (
                wire(
                    id,
                    [leaf.clone(), leaf.clone()].concat(),
                    key.clone(),
                    ca.clone(),
                ),
                "signing certificate",
            ),
            (
                wire(id, leaf.clone(), Vec::new(), ca.clone()),
                "no private key",
            ),
            (
                wire(id, leaf.clone(), key.clone(), Vec::new()),
                "empty bundle",
            ),
            (
                wire(id, leaf.clone(), key.clone(), b"garbage".to_vec()),
                "bundle that is not concatenated DER",
            ),
        ];
        for (w, needle) in cases {
            let err = x509_context_from_wire(w).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn der_lengths_are_read_strictly() {
        let (_, ca, _) = svid("spiffe://example.org/a");
        assert_eq!(der_element_len(&ca), Some(ca.len()));
        // Truncated, not a SEQUENCE, indefinite length, a non-minimal length.
        assert_eq!(der_element_len(&ca[..ca.len() - 1]), None);
        assert_eq!(der_element_len(&[0x31, 0x00]), None);
        assert_eq!(der_element_len(&[0x30, 0x80, 0, 0]), None);
        assert_eq!(der_element_len(&[0x30, 0x81, 0x05, 1, 2, 3, 4, 5]), None);
        assert_eq!(der_element_len(&[0x30, 0x82, 0x00, 0x80]), None);
        assert_eq!(
            der_element_len(&[0x30, 0x85, 1, 1, 1, 1, 1]),
            None,
            "more than four length bytes"
        );
        assert_eq!(der_element_len(&[0x30, 0x00]), Some(2));
        // A length that overflows the input is refused, not sliced.
        assert_eq!(der_element_len(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn a_refused_response_still_has_its_keys_taken_off_the_wire() {
        let id = "spiffe://example.org/downstream/a";
        let (leaf, ca, key) = svid(id);
        let mut w = wire(id, leaf, key, ca);
        w.svids.push(X509svid {
            spiffe_id: "bad".into(),
            x509_svid_key: vec![7; 32],
            ..Default::default()
        });
        let mut s = w.svids[1].clone();
        assert!(svid_from_wire(&mut s).is_err());
        assert!(s.x509_svid_key.is_empty());
        assert!(x509_context_from_wire(w).is_err());
    }
}
