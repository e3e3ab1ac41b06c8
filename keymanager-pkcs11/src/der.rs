//! The few DER structures the key manager builds or takes apart: SubjectPublicKeyInfo
//! (EC, RSA), ECDSA-Sig-Value, the SHA-256 DigestInfo and the OCTET STRING around
//! `CKA_EC_POINT`. The encoding is the `der`, `spki` and `pkcs1` crates'; this module
//! only chooses the structures.

use ::der::asn1::{AnyRef, BitStringRef, ObjectIdentifier, OctetStringRef, UintRef};
use ::der::{Decode, Encode, Tag};
use spki::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use carapace_core::KeyType;

/// DER OID of prime256v1 / secp256r1 (1.2.840.10045.3.1.7), as `CKA_EC_PARAMS`.
pub(crate) const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER OID of secp384r1 (1.3.132.0.34), as `CKA_EC_PARAMS`.
pub(crate) const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// id-ecPublicKey.
const EC_PUBLIC_KEY_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// rsaEncryption.
const RSA_ENCRYPTION_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// DigestInfo prefix for SHA-256 (RFC 8017 section 9.2 note 1).
pub(crate) const SHA256_DIGEST_INFO_PREFIX: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// `CKA_EC_PARAMS` for an EC key type.
pub(crate) fn ec_params(kt: KeyType) -> Option<&'static [u8]> {
    match kt {
        KeyType::EcP256 => Some(P256_PARAMS),
        KeyType::EcP384 => Some(P384_PARAMS),
        KeyType::Rsa2048 => None,
    }
}

/// The EC key type named by `CKA_EC_PARAMS`, if supported.
pub(crate) fn ec_key_type(params: &[u8]) -> Option<KeyType> {
    if params == P256_PARAMS {
        Some(KeyType::EcP256)
    } else if params == P384_PARAMS {
        Some(KeyType::EcP384)
    } else {
        None
    }
}

/// Size in bytes of a field element (and of r and s) of an EC key type.
pub(crate) fn ec_field_len(kt: KeyType) -> usize {
    match kt {
        KeyType::EcP384 => 48,
        _ => 32,
    }
}

/// An unsigned big-endian integer that must not be zero (a modulus, an exponent, an
/// ECDSA r or s): `None` for zero, which no valid key or signature has (and which the
/// `der` crate would encode with no content octets, not as DER).
fn positive(unsigned_be: &[u8]) -> Option<UintRef<'_>> {
    if unsigned_be.iter().all(|&b| b == 0) {
        return None;
    }
    UintRef::new(unsigned_be).ok()
}

/// A DER INTEGER around `content` as found in a certificate (two's complement, kept as is:
/// `CKA_SERIAL_NUMBER` must equal the certificate's own encoding).
pub(crate) fn integer_content(content: &[u8]) -> Option<Vec<u8>> {
    AnyRef::new(Tag::Integer, content).ok()?.to_der().ok()
}

/// The uncompressed point in `CKA_EC_POINT`: PKCS#11 says a DER OCTET STRING around
/// `04 || X || Y`; some modules return the bare point. Checks the length.
pub(crate) fn ec_point(attr: &[u8], kt: KeyType) -> Option<Vec<u8>> {
    let point_len = 1 + 2 * ec_field_len(kt);
    let is_point = |p: &[u8]| p.len() == point_len && p.first() == Some(&0x04);
    if let Ok(wrapped) = OctetStringRef::from_der(attr)
        && is_point(wrapped.as_bytes())
    {
        return Some(wrapped.as_bytes().to_vec());
    }
    is_point(attr).then(|| attr.to_vec())
}

/// SubjectPublicKeyInfo of an EC key from its uncompressed point.
pub(crate) fn ec_spki(kt: KeyType, point: &[u8]) -> Option<Vec<u8>> {
    let curve = ObjectIdentifier::from_der(ec_params(kt)?).ok()?;
    spki_der(EC_PUBLIC_KEY_OID, Some(AnyRef::from(&curve)), point)
}

/// SubjectPublicKeyInfo of an RSA key from its modulus and public exponent (unsigned
/// big-endian, as in `CKA_MODULUS` / `CKA_PUBLIC_EXPONENT`).
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Option<Vec<u8>> {
    let key = pkcs1::RsaPublicKey {
        modulus: positive(modulus)?,
        public_exponent: positive(exponent)?,
    }
    .to_der()
    .ok()?;
    spki_der(RSA_ENCRYPTION_OID, Some(AnyRef::NULL), &key)
}

fn spki_der(
    algorithm: ObjectIdentifier,
    parameters: Option<AnyRef<'_>>,
    key: &[u8],
) -> Option<Vec<u8>> {
    SubjectPublicKeyInfo {
        algorithm: AlgorithmIdentifier {
            oid: algorithm,
            parameters,
        },
        subject_public_key: BitStringRef::from_bytes(key).ok()?,
    }
    .to_der()
    .ok()
}

/// Number of significant bits of an unsigned big-endian integer.
pub(crate) fn bit_len(unsigned_be: &[u8]) -> usize {
    let skip = unsigned_be.iter().take_while(|&&b| b == 0).count();
    match unsigned_be.get(skip) {
        None => 0,
        Some(&b) => (unsigned_be.len() - skip) * 8 - b.leading_zeros() as usize,
    }
}

/// ECDSA-Sig-Value (SEQUENCE of INTEGER r, s) from the raw `r || s` CKM_ECDSA returns.
pub(crate) fn ecdsa_signature(raw: &[u8], kt: KeyType) -> Option<Vec<u8>> {
    let n = ec_field_len(kt);
    if raw.len() != 2 * n {
        return None;
    }
    let (r, s) = raw.split_at(n);
    // ECDSA-Sig-Value is a SEQUENCE of two INTEGERs: a SEQUENCE OF two, as DER goes.
    [positive(r)?, positive(s)?].to_der().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER INTEGER from unsigned big-endian bytes, as the SPKI and signature encoders
    /// write them.
    fn integer(unsigned_be: &[u8]) -> Option<Vec<u8>> {
        positive(unsigned_be)?.to_der().ok()
    }

    fn octet_string(content: &[u8]) -> Vec<u8> {
        OctetStringRef::new(content).unwrap().to_der().unwrap()
    }

    #[test]
    fn integers() {
        assert_eq!(integer(&[0, 0, 1]).unwrap(), vec![2, 1, 1]);
        assert_eq!(integer(&[0x80]).unwrap(), vec![2, 2, 0, 0x80]);
        // Zero is no modulus, exponent, r or s: refused, never encoded without content.
        assert_eq!(integer(&[]), None);
        assert_eq!(integer(&[0, 0]), None);
        assert_eq!(rsa_spki(&[0; 256], &[1, 0, 1]), None);
        assert_eq!(ecdsa_signature(&[0; 64], KeyType::EcP256), None);
        // A certificate's serial is kept byte for byte, even a non-minimal one.
        assert_eq!(integer_content(&[0, 0x7f]).unwrap(), vec![2, 2, 0, 0x7f]);
        assert_eq!(bit_len(&[0, 0x01, 0]), 9);
        assert_eq!(bit_len(&[0x80, 0]), 16);
    }

    #[test]
    fn long_lengths() {
        let t = octet_string(&[7u8; 300]);
        assert_eq!(&t[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(t.len(), 304);
        // A long-form EC_POINT wrapper is read too, and trailing bytes are refused.
        let mut point = vec![0x04];
        point.extend_from_slice(&[0x11; 64]);
        let mut wrapped = octet_string(&point);
        wrapped.push(0);
        assert_eq!(ec_point(&wrapped, KeyType::EcP256), None);
    }

    #[test]
    fn ec_point_wrapped_and_bare() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[0x11; 64]);
        let wrapped = octet_string(&point);
        assert_eq!(&wrapped[..3], &[0x04, 0x41, 0x04]);
        assert_eq!(ec_point(&wrapped, KeyType::EcP256).unwrap(), point);
        assert_eq!(ec_point(&point, KeyType::EcP256).unwrap(), point);
        assert!(ec_point(&wrapped, KeyType::EcP384).is_none());
        let mut p384 = vec![0x04];
        p384.extend_from_slice(&[0x22; 96]);
        assert_eq!(
            ec_point(&octet_string(&p384), KeyType::EcP384).unwrap(),
            p384
        );
    }

    #[test]
    fn spki_matches_known_prefixes() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[0x11; 64]);
        let spki = ec_spki(KeyType::EcP256, &point).unwrap();
        // The fixed P-256 SPKI header every encoder produces.
        assert_eq!(
            &spki[..26],
            &[
                0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
                0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00
            ]
        );
        let modulus = [0xc5u8; 256];
        let rsa = rsa_spki(&modulus, &[1, 0, 1]).unwrap();
        assert_eq!(&rsa[..4], &[0x30, 0x82, 0x01, 0x22]);
        assert_eq!(rsa.len(), 0x126);
    }

    #[test]
    fn ecdsa_der() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[63] = 1; // s is 1
        let der = ecdsa_signature(&raw, KeyType::EcP256).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 0x21, 0x00]);
        assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x01]);
        assert!(ecdsa_signature(&raw[..63], KeyType::EcP256).is_none());
    }
}
