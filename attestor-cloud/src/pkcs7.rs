//! Verification of a CMS / PKCS#7 `SignedData` (RFC 5652) against certificates the
//! server was configured with: what AWS's `instance-identity/rsa2048` signature is.
//!
//! What a real AWS RSA-2048 signature looks like (two samples from 2021 were checked with
//! `openssl asn1parse` and verified with AWS's published us-west-2 certificate):
//! - **BER, not DER**: indefinite lengths (`30 80 … 00 00`) and the content as a
//!   constructed OCTET STRING. The `cms` crate reads DER only, so the input is first
//!   re-encoded with definite lengths and the content's chunks joined ([`ber_to_der`]).
//! - `eContentType` id-data with the document **attached** (not detached);
//! - **no certificates** in the bag; the signer is named by issuer and serial number;
//! - digest SHA-256; signature rsaEncryption (2021-06) or sha256WithRSAEncryption
//!   (2021-09), PKCS#1 v1.5;
//! - signed attributes content-type, signing-time, message-digest (and, in the newer
//!   sample, CMSAlgorithmProtection).
//!
//! What is verified, and why:
//! 1. `SignedData` and `SignerInfo` version 1, every listed digest algorithm SHA-256, and
//!    exactly one `SignerInfo`; the signer is found **only** by its
//!    `IssuerAndSerialNumber` among the configured certificates (issuer DER-equal, serial
//!    equal). Certificates in the bag are never looked at: not as trust anchors, not to
//!    choose the signer (SPIRE's Azure fix: trust the actual signer, not the first
//!    certificate of the bag). A bag certificate with the trusted issuer and serial but
//!    another key changes nothing: the configured certificate's key is the one used.
//! 2. the content is attached, of type id-data, and is returned to the caller, who must
//!    compare it with the document it was given (SPIRE's substitution fix: the signed
//!    content must *be* the document).
//! 3. digest SHA-256 — what AWS uses, so nothing weaker is accepted; signature
//!    rsaEncryption or sha256WithRSAEncryption, verified with ring (RSA 2048 to 8192
//!    bits, PKCS#1 v1.5, SHA-256). Because both algorithms are pinned here,
//!    CMSAlgorithmProtection (which guards against algorithm substitution) adds nothing
//!    and is not required.
//! 4. with signed attributes: exactly one content-type attribute, id-data; exactly one
//!    message-digest attribute, equal to SHA-256 of the content; the signature is over
//!    the DER of the attributes as a `SET OF` (tag 0x31), as RFC 5652 §5.4 says (they
//!    are re-encoded in DER order, which AWS's and OpenSSL's already are). Without
//!    signed attributes, the signature is over the content itself. Signing-time is
//!    signed but not interpreted: an instance's document is valid as long as the
//!    instance, and replays are trust on first use's business.
//!
//! Input is hostile: its size is capped, parsing never panics, nesting is bounded, and
//! every error says what failed.

use std::fmt;

use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{SignedData, SignerIdentifier};
use der::asn1::{ObjectIdentifier, OctetString};
use der::{Any, Encode, Tag, Tagged};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

/// The largest PKCS#7 accepted (AWS's is about 1 KiB).
pub(crate) const MAX_PKCS7_BYTES: usize = 64 * 1024;

/// How deep BER elements may nest (CMS SignedData needs about 12 levels).
const MAX_DEPTH: usize = 32;

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

/// The smallest and largest RSA modulus accepted, in bits (ring's
/// `RSA_PKCS1_2048_8192_SHA256` bounds).
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

/// A certificate a signature may be verified with: its issuer and serial (to recognise
/// the signer) and its RSA public key.
#[derive(Clone)]
pub(crate) struct TrustedCert {
    der: Vec<u8>,
    issuer: Vec<u8>,
    serial: Vec<u8>,
    rsa_public_key: Vec<u8>,
    description: String,
}

impl fmt::Debug for TrustedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedCert")
            .field("certificate", &self.description)
            .finish_non_exhaustive()
    }
}

impl TrustedCert {
    /// Reads a DER certificate, which must hold an RSA key of 2048 to 8192 bits. Its
    /// validity dates and extensions are not checked: AWS's region certificates are
    /// self-signed key carriers (us-west-2's is valid until 2195), not a PKI.
    pub(crate) fn from_der(der: &[u8]) -> Result<Self, String> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the certificate", rest.len()));
        }
        let tbs = &cert.tbs_certificate;
        let spki = cert.public_key();
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => modulus_bits(rsa.modulus),
            Ok(_) => {
                return Err(format!(
                    "the key is not RSA (algorithm {}); AWS's rsa2048 signatures need the \
                     region's RSA certificate",
                    spki.algorithm.algorithm
                ));
            }
            Err(e) => return Err(format!("the public key cannot be read: {e}")),
        };
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(format!(
                "the RSA key has {bits} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} are accepted"
            ));
        }
        let serial = tbs.raw_serial();
        Ok(TrustedCert {
            der: der.to_vec(),
            issuer: tbs.issuer().as_raw().to_vec(),
            serial: serial.to_vec(),
            rsa_public_key: spki.subject_public_key.data.to_vec(),
            description: format!(
                "subject {}, issuer {}, serial {}, RSA-{bits}",
                tbs.subject(),
                tbs.issuer(),
                hex_colon(serial)
            ),
        })
    }

    /// The certificate's DER.
    pub(crate) fn der(&self) -> &[u8] {
        &self.der
    }

    /// Whether `other` has this certificate's issuer and serial number: a signer
    /// identifier could not tell the two apart.
    pub(crate) fn same_issuer_and_serial(&self, other: &TrustedCert) -> bool {
        self.issuer == other.issuer && self.serial == other.serial
    }

    /// Subject, issuer, serial and key size, for messages.
    pub(crate) fn description(&self) -> &str {
        &self.description
    }
}

/// The bit length of a big-endian unsigned modulus.
fn modulus_bits(modulus: &[u8]) -> usize {
    let digits: &[u8] = match modulus.iter().position(|&b| b != 0) {
        Some(i) => &modulus[i..],
        None => &[],
    };
    match digits.first() {
        Some(&top) => (digits.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    }
}

fn hex_colon(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A verified signature: the signed content and which trusted certificate signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    /// The encapsulated content (for AWS, the document bytes).
    pub(crate) content: Vec<u8>,
    /// The index in `trusted` of the certificate whose key verified the signature.
    pub(crate) signer: usize,
}

/// Why a PKCS#7 was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pkcs7Error {
    /// Well formed, but signed by a certificate that is none of the trusted ones (named
    /// by the `SignerInfo`'s issuer and serial); the signature was not checked.
    UnknownSigner(String),
    /// Malformed, or not what is accepted, or the signature does not verify.
    Invalid(String),
}

impl fmt::Display for Pkcs7Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pkcs7Error::UnknownSigner(signer) => write!(
                f,
                "the signer ({signer}) is none of the configured certificates"
            ),
            Pkcs7Error::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl From<String> for Pkcs7Error {
    fn from(msg: String) -> Self {
        Pkcs7Error::Invalid(msg)
    }
}

impl From<&str> for Pkcs7Error {
    fn from(msg: &str) -> Self {
        Pkcs7Error::Invalid(msg.to_owned())
    }
}

/// Verifies the PKCS#7 / CMS `SignedData` `pkcs7` (BER or DER) with one of `trusted`
/// (which must not share an issuer and serial number) and returns the signed content;
/// see the module documentation for every check. The caller must still compare the
/// content with what it was told was signed.
pub(crate) fn verify_signed_data(
    pkcs7: &[u8],
    trusted: &[TrustedCert],
) -> Result<Verified, Pkcs7Error> {
    if pkcs7.is_empty() {
        return Err("the PKCS#7 is empty".into());
    }
    if pkcs7.len() > MAX_PKCS7_BYTES {
        return Err(format!(
            "the PKCS#7 has {} bytes; at most {MAX_PKCS7_BYTES} are accepted",
            pkcs7.len()
        )
        .into());
    }
    let der = ber_to_der(pkcs7).map_err(|e| format!("the PKCS#7 is not valid BER: {e}"))?;
    let info = <ContentInfo as der::Decode>::from_der(&der)
        .map_err(|e| format!("not a CMS ContentInfo: {e}"))?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(format!(
            "content type {} is not signed-data ({ID_SIGNED_DATA})",
            info.content_type
        )
        .into());
    }
    let signed: SignedData = info
        .content
        .decode_as()
        .map_err(|e| format!("not a CMS SignedData: {e}"))?;

    let signers = signed.signer_infos.0.as_slice();
    let [signer] = signers else {
        return Err(format!(
            "{} signers (SignerInfos); exactly one is accepted",
            signers.len()
        )
        .into());
    };

    let eci = &signed.encap_content_info;
    if eci.econtent_type != ID_DATA {
        return Err(format!(
            "the signed content's type {} is not id-data ({ID_DATA})",
            eci.econtent_type
        )
        .into());
    }
    let content = match &eci.econtent {
        None => {
            return Err("a detached signature: the signed content is not in the PKCS#7".into());
        }
        Some(any) => any
            .decode_as::<OctetString>()
            .map_err(|e| format!("the signed content is not an OCTET STRING: {e}"))?
            .into_bytes(),
    };

    // The signer is who the SignerInfo names; the bag of certificates plays no part.
    let SignerIdentifier::IssuerAndSerialNumber(isn) = &signer.sid else {
        return Err(
            "the signer is named by subject key identifier; only issuer and serial \
                    number (as AWS uses) is accepted"
                .into(),
        );
    };
    let issuer = isn
        .issuer
        .to_der()
        .map_err(|e| format!("the signer's issuer cannot be encoded: {e}"))?;
    let serial = isn.serial_number.as_bytes();
    // Version 1 is what issuer-and-serial signers of id-data with no attribute
    // certificates make (RFC 5652 §5.1, §5.3); anything else is not AWS's.
    if signed.version != CmsVersion::V1 {
        return Err(format!(
            "SignedData version {:?}; only v1 is accepted",
            signed.version
        )
        .into());
    }
    if signed.digest_algorithms.is_empty() {
        return Err("the SignedData lists no digest algorithm".into());
    }
    for alg in signed.digest_algorithms.iter() {
        check_algorithm(alg, &[ID_SHA256], "SignedData digest algorithm", "SHA-256")?;
    }

    if signer.version != CmsVersion::V1 {
        return Err(format!(
            "SignerInfo version {:?}; only v1 is accepted",
            signer.version
        )
        .into());
    }

    let Some(index) = trusted
        .iter()
        .position(|c| c.issuer == issuer && c.serial == serial)
    else {
        return Err(Pkcs7Error::UnknownSigner(format!(
            "issuer {}, serial {}",
            isn.issuer,
            hex_colon(serial)
        )));
    };
    let cert = &trusted[index];

    check_algorithm(
        &signer.digest_alg,
        &[ID_SHA256],
        "digest algorithm",
        "SHA-256",
    )?;
    check_algorithm(
        &signer.signature_algorithm,
        &[RSA_ENCRYPTION, SHA256_WITH_RSA],
        "signature algorithm",
        "rsaEncryption or sha256WithRSAEncryption",
    )?;

    let signed_bytes = match &signer.signed_attrs {
        None => content.clone(),
        Some(attrs) => {
            let mut content_type = None;
            let mut message_digest = None;
            for attr in attrs.iter() {
                let slot = if attr.oid == ID_CONTENT_TYPE {
                    &mut content_type
                } else if attr.oid == ID_MESSAGE_DIGEST {
                    &mut message_digest
                } else {
                    continue;
                };
                if slot.is_some() {
                    return Err(format!("two {} signed attributes", attr.oid).into());
                }
                let [value] = attr.values.as_slice() else {
                    return Err(format!(
                        "signed attribute {} has {} values; exactly one is accepted",
                        attr.oid,
                        attr.values.len()
                    )
                    .into());
                };
                *slot = Some(value);
            }
            let content_type: ObjectIdentifier = content_type
                .ok_or("the signed attributes have no content-type")?
                .decode_as()
                .map_err(|e| format!("the content-type attribute is not an OID: {e}"))?;
            if content_type != ID_DATA {
                return Err(format!(
                    "the content-type attribute is {content_type}, not id-data ({ID_DATA})"
                )
                .into());
            }
            let digest: OctetString = message_digest
                .ok_or("the signed attributes have no message-digest")?
                .decode_as()
                .map_err(|e| format!("the message-digest attribute is not an OCTET STRING: {e}"))?;
            if digest.as_bytes() != Sha256::digest(&content).as_slice() {
                return Err(
                    "the message-digest attribute is not the SHA-256 of the signed content".into(),
                );
            }
            // RFC 5652 §5.4: the signature covers the DER of the attributes as SET OF.
            attrs
                .to_der()
                .map_err(|e| format!("the signed attributes cannot be encoded: {e}"))?
        }
    };

    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &cert.rsa_public_key,
    )
    .verify(&signed_bytes, signer.signature.as_bytes())
    .map_err(|_| {
        format!(
            "the signature does not verify with the configured certificate ({})",
            cert.description
        )
    })?;
    Ok(Verified {
        content,
        signer: index,
    })
}

/// `alg` must be one of `allowed`, with absent or NULL parameters.
fn check_algorithm(
    alg: &cms::cert::x509::spki::AlgorithmIdentifierOwned,
    allowed: &[ObjectIdentifier],
    what: &str,
    names: &str,
) -> Result<(), String> {
    if !allowed.contains(&alg.oid) {
        return Err(format!("{what} {} is not {names}", alg.oid));
    }
    match &alg.parameters {
        None => Ok(()),
        Some(p) if is_null(p) => Ok(()),
        Some(p) => Err(format!(
            "{what} {} has parameters ({}); only none or NULL is accepted",
            alg.oid,
            p.tag()
        )),
    }
}

fn is_null(any: &Any) -> bool {
    any.tag() == Tag::Null && any.value().is_empty()
}

/// One BER element.
enum Node {
    Primitive { tag: u8, content: Vec<u8> },
    Constructed { tag: u8, children: Vec<Node> },
}

/// The universal tags of OCTET STRING, primitive and constructed.
const OCTET_STRING: u8 = 0x04;
const OCTET_STRING_CONSTRUCTED: u8 = 0x24;

/// Re-encodes BER as DER where the two differ in what CMS producers emit: indefinite
/// lengths become definite (and minimal), and a constructed OCTET STRING becomes one
/// primitive OCTET STRING of its chunks. Everything else is copied; what is not DER
/// beyond that (unsorted sets, non-minimal integers) is left for the DER parser to
/// refuse. Only low tag numbers (below 31, all CMS uses) are read.
fn ber_to_der(input: &[u8]) -> Result<Vec<u8>, String> {
    let (node, rest) = parse(input, 0)?;
    let node = node.ok_or("an end-of-contents marker instead of an element")?;
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes after the end of the structure",
            rest.len()
        ));
    }
    let mut out = Vec::with_capacity(input.len());
    encode(node, &mut out)?;
    Ok(out)
}

/// Parses one element; `None` is an end-of-contents marker.
fn parse(input: &[u8], depth: usize) -> Result<(Option<Node>, &[u8]), String> {
    if depth > MAX_DEPTH {
        return Err(format!("elements nested deeper than {MAX_DEPTH} levels"));
    }
    let (&tag, rest) = input
        .split_first()
        .ok_or("truncated: an element's tag is missing")?;
    if tag & 0x1f == 0x1f {
        return Err(format!(
            "tag {tag:#04x} uses the high tag number form, which CMS does not use"
        ));
    }
    let (&first, mut rest) = rest
        .split_first()
        .ok_or("truncated: an element's length is missing")?;
    let constructed = tag & 0x20 != 0;
    let len = match first {
        0x80 => None,
        l if l < 0x80 => Some(usize::from(l)),
        0x81..=0x83 => {
            let n = usize::from(first & 0x7f);
            if rest.len() < n {
                return Err("truncated: an element's length is cut short".into());
            }
            let (bytes, after) = rest.split_at(n);
            rest = after;
            Some(bytes.iter().fold(0usize, |l, &b| (l << 8) | usize::from(b)))
        }
        _ => return Err(format!("length form {first:#04x} is not accepted")),
    };
    match len {
        None => {
            if !constructed {
                return Err(format!(
                    "tag {tag:#04x}: an indefinite length on a primitive element"
                ));
            }
            let mut children = Vec::new();
            loop {
                let (child, after) = parse(rest, depth + 1)?;
                rest = after;
                match child {
                    Some(child) => children.push(child),
                    None => break,
                }
            }
            Ok((Some(Node::Constructed { tag, children }), rest))
        }
        Some(len) => {
            if rest.len() < len {
                return Err(format!(
                    "truncated: tag {tag:#04x} claims {len} bytes, {} remain",
                    rest.len()
                ));
            }
            let (mut body, after) = rest.split_at(len);
            if tag == 0 {
                return if len == 0 {
                    Ok((None, after))
                } else {
                    Err("a malformed end-of-contents marker".into())
                };
            }
            if constructed {
                let mut children = Vec::new();
                while !body.is_empty() {
                    let (child, more) = parse(body, depth + 1)?;
                    body = more;
                    children.push(
                        child.ok_or("an end-of-contents marker in a definite-length element")?,
                    );
                }
                Ok((Some(Node::Constructed { tag, children }), after))
            } else {
                Ok((
                    Some(Node::Primitive {
                        tag,
                        content: body.to_vec(),
                    }),
                    after,
                ))
            }
        }
    }
}

fn encode(node: Node, out: &mut Vec<u8>) -> Result<(), String> {
    match node {
        Node::Primitive { tag, content } => {
            push_header(out, tag, content.len())?;
            out.extend_from_slice(&content);
        }
        Node::Constructed {
            tag: OCTET_STRING_CONSTRUCTED,
            children,
        } => {
            let mut content = Vec::new();
            join_octets(children, &mut content)?;
            push_header(out, OCTET_STRING, content.len())?;
            out.extend_from_slice(&content);
        }
        Node::Constructed { tag, children } => {
            let mut inner = Vec::new();
            for child in children {
                encode(child, &mut inner)?;
            }
            push_header(out, tag, inner.len())?;
            out.extend_from_slice(&inner);
        }
    }
    Ok(())
}

/// The chunks of a constructed OCTET STRING, joined.
fn join_octets(children: Vec<Node>, out: &mut Vec<u8>) -> Result<(), String> {
    for child in children {
        match child {
            Node::Primitive {
                tag: OCTET_STRING,
                content,
            } => out.extend_from_slice(&content),
            Node::Constructed {
                tag: OCTET_STRING_CONSTRUCTED,
                children,
            } => join_octets(children, out)?,
            Node::Primitive { tag, .. } | Node::Constructed { tag, .. } => {
                return Err(format!(
                    "a constructed OCTET STRING holds an element of tag {tag:#04x}"
                ));
            }
        }
    }
    Ok(())
}

/// A DER identifier and (minimal, definite) length, written by the `der` crate.
fn push_header(out: &mut Vec<u8>, tag: u8, len: usize) -> Result<(), String> {
    let tag = der::Tag::try_from(tag).map_err(|e| format!("tag {tag:#04x}: {e}"))?;
    let len = der::Length::try_from(len).map_err(|e| format!("a length of {len}: {e}"))?;
    der::Header::new(tag, len)
        .and_then(|h| h.encode_to_vec(out))
        .map_err(|e| format!("encoding a header: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn indefinite_lengths_become_definite_and_octet_chunks_are_joined() {
        // SEQUENCE(indef) { [0](indef) { OCTET STRING(constructed, indef) { "ab", "c" } } }
        let ber = [
            0x30, 0x80, 0xa0, 0x80, 0x24, 0x80, 0x04, 0x02, b'a', b'b', 0x04, 0x01, b'c', 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(
            ber_to_der(&ber).unwrap(),
            [0x30, 0x07, 0xa0, 0x05, 0x04, 0x03, b'a', b'b', b'c']
        );
        // Non-minimal definite lengths become minimal; DER passes through unchanged.
        assert_eq!(
            ber_to_der(&[0x30, 0x81, 0x03, 0x02, 0x01, 0x05]).unwrap(),
            [0x30, 0x03, 0x02, 0x01, 0x05]
        );
        let long = [&[0x04, 0x82, 0x01, 0x00][..], &[7u8; 256][..]].concat();
        assert_eq!(ber_to_der(&long).unwrap(), long);
    }

    #[test]
    fn malformed_ber_is_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "tag is missing"),
            (&[0x30], "length is missing"),
            (&[0x30, 0x05, 0x02, 0x01], "claims 5 bytes"),
            (&[0x30, 0x80, 0x02, 0x01, 0x05], "tag is missing"),
            (&[0x04, 0x80, 0x00, 0x00], "primitive"),
            (&[0x00, 0x00], "end-of-contents marker instead"),
            (&[0x30, 0x02, 0x00, 0x00], "definite-length"),
            (&[0x02, 0x01, 0x05, 0xff], "1 bytes after"),
            (&[0x1f, 0x01, 0x00], "high tag number"),
            (&[0x04, 0x84, 0, 0, 0, 1, 0], "length form"),
            (
                &[0x24, 0x80, 0x02, 0x01, 0x05, 0x00, 0x00],
                "holds an element",
            ),
        ];
        for (input, want) in cases {
            let err = ber_to_der(input).err().unwrap();
            assert!(err.contains(want), "{input:02x?}: {err}");
        }
        let mut deep = Vec::new();
        for _ in 0..100 {
            deep.extend_from_slice(&[0x30, 0x80]);
        }
        assert!(ber_to_der(&deep).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn modulus_bits_are_counted_exactly() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x7f, 0xff]), 15);
        assert_eq!(modulus_bits(&[0x00]), 0);
        assert_eq!(modulus_bits(&[]), 0);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        // A deterministic xorshift stream: random lengths and bytes, including
        // plausible-looking headers.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = (next() % 64) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b) = input.first_mut() {
                *b = [0x30, 0x24, 0xa0, 0x04][(next() % 4) as usize];
            }
            assert!(verify_signed_data(&input, &[]).is_err());
        }
    }

    mod properties {
        use super::*;
        use carapace_fuzzkit::proptest::prelude::*;
        use carapace_fuzzkit::{bounded, bytes, config, mutated};

        /// BER shaped like AWS's signatures: indefinite lengths, chunked OCTET STRINGs,
        /// non-minimal lengths, nested.
        fn ber_seeds() -> Vec<Vec<u8>> {
            vec![
                vec![
                    0x30, 0x80, 0xa0, 0x80, 0x24, 0x80, 0x04, 0x02, b'a', b'b', 0x04, 0x01, b'c',
                    0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                ],
                vec![0x30, 0x81, 0x03, 0x02, 0x01, 0x05],
                [&[0x04, 0x82, 0x01, 0x00][..], &[7u8; 256][..]].concat(),
                vec![
                    0x30, 0x80, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02,
                    0xa0, 0x80, 0x30, 0x80, 0x02, 0x01, 0x01, 0x31, 0x00, 0x30, 0x80, 0x06, 0x09,
                    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01, 0xa0, 0x80, 0x24, 0x80,
                    0x04, 0x03, b'd', b'o', b'c', 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x31, 0x00,
                    0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                ],
            ]
        }

        proptest! {
            #![proptest_config(config(3000))]

            /// Never a panic or a large allocation; what is accepted becomes DER that is
            /// a fixed point (DER in, the same DER out) and no longer than the input.
            #[test]
            fn ber_to_der_never_panics_and_is_idempotent(
                input in prop_oneof![1 => bytes(64), 6 => mutated(ber_seeds())],
            ) {
                if let Ok(der) = bounded("ber_to_der", input.len(), || ber_to_der(&input)) {
                    prop_assert!(der.len() <= input.len(), "{} > {}", der.len(), input.len());
                    prop_assert_eq!(ber_to_der(&der).unwrap(), der);
                }
                let refused = bounded("verify_signed_data", input.len(), || verify_signed_data(&input, &[]));
                prop_assert!(refused.is_err());
            }

        }

        proptest! {
            #![proptest_config(config(300))]

            /// Every nesting depth up to far past the limit: an error, never a stack
            /// overflow.
            #[test]
            fn deep_nesting_is_refused_not_overflowed(depth in 0usize..2000, definite in any::<bool>()) {
                let mut input = Vec::new();
                if definite {
                    // Short-form lengths only reach 127 bytes: the inner ones are long form.
                    let mut inner = vec![0x05, 0x00];
                    for _ in 0..depth {
                        let mut outer = vec![0x30, 0x83];
                        outer.extend_from_slice(&(inner.len() as u32).to_be_bytes()[1..]);
                        outer.extend(inner);
                        inner = outer;
                    }
                    input = inner;
                } else {
                    for _ in 0..depth {
                        input.extend_from_slice(&[0x30, 0x80]);
                    }
                    input.extend_from_slice(&[0x05, 0x00]);
                    for _ in 0..depth {
                        input.extend_from_slice(&[0x00, 0x00]);
                    }
                }
                let result = bounded("ber_to_der", input.len(), || ber_to_der(&input));
                prop_assert_eq!(result.is_ok(), depth <= MAX_DEPTH, "depth {}", depth);
            }
        }
    }
}
