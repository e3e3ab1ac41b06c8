//! The few DER structures the key manager builds or takes apart: SubjectPublicKeyInfo
//! (EC, RSA), ECDSA-Sig-Value, the SHA-256 DigestInfo and the OCTET STRING around
//! `CKA_EC_POINT`.

use carapace_core::KeyType;

/// DER OID of prime256v1 / secp256r1 (1.2.840.10045.3.1.7), as `CKA_EC_PARAMS`.
pub(crate) const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER OID of secp384r1 (1.3.132.0.34), as `CKA_EC_PARAMS`.
pub(crate) const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// id-ecPublicKey (1.2.840.10045.2.1).
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// rsaEncryption (1.2.840.113549.1.1.1).
const RSA_ENCRYPTION_OID: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
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

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// A DER INTEGER from unsigned big-endian bytes.
pub(crate) fn integer(unsigned_be: &[u8]) -> Vec<u8> {
    let skip = unsigned_be.iter().take_while(|&&b| b == 0).count();
    let digits = &unsigned_be[skip..];
    let mut content = Vec::with_capacity(digits.len() + 1);
    if digits.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(digits);
    tlv(0x02, &content)
}

/// A DER INTEGER around `content` as found in a certificate (two's complement, kept as is).
pub(crate) fn integer_content(content: &[u8]) -> Vec<u8> {
    tlv(0x02, content)
}

fn bit_string(content: &[u8]) -> Vec<u8> {
    let mut with_unused = Vec::with_capacity(content.len() + 1);
    with_unused.push(0);
    with_unused.extend_from_slice(content);
    tlv(0x03, &with_unused)
}

/// Reads one TLV at the start of `der`: (tag, content, rest).
fn read_tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The uncompressed point in `CKA_EC_POINT`: PKCS#11 says a DER OCTET STRING around
/// `04 || X || Y`; some modules return the bare point. Checks the length.
pub(crate) fn ec_point(attr: &[u8], kt: KeyType) -> Option<Vec<u8>> {
    let point_len = 1 + 2 * ec_field_len(kt);
    if let Some((0x04, inner, [])) = read_tlv(attr)
        && inner.len() == point_len
        && inner.first() == Some(&0x04)
    {
        return Some(inner.to_vec());
    }
    if attr.len() == point_len && attr.first() == Some(&0x04) {
        return Some(attr.to_vec());
    }
    None
}

/// SubjectPublicKeyInfo of an EC key from its uncompressed point.
pub(crate) fn ec_spki(kt: KeyType, point: &[u8]) -> Option<Vec<u8>> {
    let params = ec_params(kt)?;
    let alg = sequence(&[EC_PUBLIC_KEY_OID, params]);
    Some(sequence(&[&alg, &bit_string(point)]))
}

/// SubjectPublicKeyInfo of an RSA key from its modulus and public exponent (unsigned
/// big-endian, as in `CKA_MODULUS` / `CKA_PUBLIC_EXPONENT`).
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let alg = sequence(&[RSA_ENCRYPTION_OID, &[0x05, 0x00]]);
    let key = sequence(&[&integer(modulus), &integer(exponent)]);
    sequence(&[&alg, &bit_string(&key)])
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
    Some(sequence(&[&integer(r), &integer(s)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn octet_string(content: &[u8]) -> Vec<u8> {
        tlv(0x04, content)
    }

    #[test]
    fn integers() {
        assert_eq!(integer(&[0, 0, 1]), vec![2, 1, 1]);
        assert_eq!(integer(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(integer(&[]), vec![2, 1, 0]);
        assert_eq!(integer(&[0, 0]), vec![2, 1, 0]);
        assert_eq!(bit_len(&[0, 0x01, 0]), 9);
        assert_eq!(bit_len(&[0x80, 0]), 16);
    }

    #[test]
    fn long_lengths() {
        let t = tlv(0x04, &[7u8; 300]);
        assert_eq!(&t[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let (tag, content, rest) = read_tlv(&t).unwrap();
        assert_eq!((tag, content.len(), rest.len()), (4, 300, 0));
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
        let rsa = rsa_spki(&modulus, &[1, 0, 1]);
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
