//! Public areas (TPMT_PUBLIC): parsing, SubjectPublicKeyInfo, EK hash, TPM name, and the
//! AK attribute checks.

use sha2::{Digest as _, Sha256, Sha384, Sha512};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{EccScheme, Public, RsaScheme};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::{Result, reject};

/// Parses a marshalled TPMT_PUBLIC (the wire form of the EK and AK public areas).
///
/// Refuses trailing bytes and encodings that do not re-marshal to the same bytes, so
/// [`name_of`] hashes exactly what was received. Errors name "public area"; use
/// [`parse_public_as`] to name which one.
pub fn parse_public(bytes: &[u8]) -> Result<Public> {
    parse_public_as("public area", bytes)
}

/// [`parse_public`], with `what` (such as `"EK public area"`) naming the input in errors.
pub fn parse_public_as(what: &str, bytes: &[u8]) -> Result<Public> {
    let public = Public::unmarshall(bytes).map_err(|e| {
        reject(format!(
            "{what} is not a valid TPMT_PUBLIC ({e}); a TPM2B_PUBLIC, as \
             `tpm2_createek -u`/`tpm2_createak -u` write it, starts with a 2-byte size to strip"
        ))
    })?;
    let again = public
        .marshall()
        .map_err(|e| reject(format!("{what} cannot be re-encoded: {e}")))?;
    if again.as_slice() != bytes {
        if bytes.len() > again.len() && bytes.starts_with(&again) {
            return Err(reject(format!(
                "{what} has {} trailing bytes after the TPMT_PUBLIC",
                bytes.len() - again.len()
            )));
        }
        return Err(reject(format!(
            "{what} is not a canonical TPMT_PUBLIC encoding (it does not re-encode to the same bytes)"
        )));
    }
    Ok(public)
}

/// The DER SubjectPublicKeyInfo of an RSA or ECC (NIST P-256 or P-384) public area: the
/// form OpenSSL and X.509 certificates use (`rsaEncryption` with NULL parameters, or
/// `id-ecPublicKey` with the named curve and an uncompressed point).
///
/// It equals what `tpm2_readpublic -c <handle> -f der -o key.der` writes.
pub fn public_key_spki_der(public: &Public) -> Result<Vec<u8>> {
    match public {
        Public::Rsa {
            parameters, unique, ..
        } => {
            use rsa::pkcs8::EncodePublicKey as _;
            let key = rsa_public_key(parameters.exponent().value(), unique.value())?;
            let der = key
                .to_public_key_der()
                .map_err(|e| reject(format!("cannot encode the RSA public key: {e}")))?;
            Ok(der.as_bytes().to_vec())
        }
        Public::Ecc {
            parameters, unique, ..
        } => {
            let curve = parameters.ecc_curve();
            let point = uncompressed_point(curve, unique.x().value(), unique.y().value())?;
            let der = match curve {
                EccCurve::NistP256 => {
                    use p256::pkcs8::EncodePublicKey as _;
                    p256::PublicKey::from_sec1_bytes(&point)
                        .map_err(|_| reject("ECC public key is not a point on NIST P-256"))?
                        .to_public_key_der()
                        .map_err(|e| reject(format!("cannot encode the P-256 public key: {e}")))?
                }
                EccCurve::NistP384 => {
                    use p384::pkcs8::EncodePublicKey as _;
                    p384::PublicKey::from_sec1_bytes(&point)
                        .map_err(|_| reject("ECC public key is not a point on NIST P-384"))?
                        .to_public_key_der()
                        .map_err(|e| reject(format!("cannot encode the P-384 public key: {e}")))?
                }
                other => {
                    return Err(reject(format!(
                        "ECC curve {} is not supported (NIST P-256 or P-384)",
                        curve_name(other)
                    )));
                }
            };
            Ok(der.as_bytes().to_vec())
        }
        Public::KeyedHash { .. } | Public::SymCipher { .. } => Err(reject(
            "public area is not an asymmetric key (RSA or ECC expected)",
        )),
    }
}

/// The EK's identity for allowlists and selectors: lowercase hex SHA-256 of the EK's
/// [`public_key_spki_der`].
///
/// Operators compute it on the node, from the EK itself or from its certificate (both
/// give the same hash; verified against swtpm with tpm2-tools 5.4 and OpenSSL 3):
///
/// ```sh
/// # RSA-2048 EK (persistent at 0x81010001, or the transient one `tpm2_createek -G rsa -c ek.ctx` makes)
/// tpm2_readpublic -c 0x81010001 -f der -o ek.der && sha256sum ek.der
/// # from the RSA EK certificate in NV (ECC P-256: 0x01c0000a, P-384: 0x01c00016)
/// tpm2_nvread 0x01c00002 -C o -o ekcert.der
/// openssl x509 -inform DER -in ekcert.der -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum
/// ```
pub fn ek_pubhash(public: &Public) -> Result<String> {
    let der = public_key_spki_der(public)?;
    Ok(hex::encode(Sha256::digest(&der)))
}

/// The TPM name of an object: its name algorithm (big-endian TPM_ALG_ID) followed by the
/// hash of its marshalled TPMT_PUBLIC. This is what `tpm2_createak -n` writes, and what
/// MakeCredential binds the credential to.
pub fn name_of(public: &Public) -> Result<Vec<u8>> {
    let marshalled = public
        .marshall()
        .map_err(|e| reject(format!("cannot encode the public area: {e}")))?;
    let alg = public.name_hashing_algorithm();
    let (id, digest): (u16, Vec<u8>) = match alg {
        HashingAlgorithm::Sha256 => (0x000b, Sha256::digest(&marshalled).to_vec()),
        HashingAlgorithm::Sha384 => (0x000c, Sha384::digest(&marshalled).to_vec()),
        HashingAlgorithm::Sha512 => (0x000d, Sha512::digest(&marshalled).to_vec()),
        other => {
            return Err(reject(format!(
                "name algorithm {} is not supported (sha256, sha384 or sha512)",
                hash_name(other)
            )));
        }
    };
    let mut name = id.to_be_bytes().to_vec();
    name.extend_from_slice(&digest);
    Ok(name)
}

/// Checks that a public area is an acceptable Attestation Key: a restricted signing key
/// (not a decryption key) generated in and bound to its TPM (fixedTPM, fixedParent,
/// sensitiveDataOrigin), usable with its auth value (userWithAuth), name algorithm
/// SHA-256, and either ECC NIST P-256 with ECDSA-SHA256 or RSA-2048 with RSASSA-SHA256.
///
/// A restricted key only signs digests the TPM computed itself (quotes, certifications),
/// so it cannot be used to forge a quote over chosen data. Errors name the first
/// attribute that fails, such as "AK is not restricted".
pub fn check_ak(ak: &Public) -> Result<()> {
    let attrs = ak.object_attributes();
    let required = [
        (attrs.restricted(), "AK is not restricted"),
        (
            attrs.sign_encrypt(),
            "AK is not a signing key (sign attribute clear)",
        ),
        (
            attrs.fixed_tpm(),
            "AK is not fixedTPM (it could be duplicated out of its TPM)",
        ),
        (
            attrs.fixed_parent(),
            "AK is not fixedParent (it could be duplicated to another parent)",
        ),
        (
            attrs.sensitive_data_origin(),
            "AK is not sensitiveDataOrigin (its private key was not generated by the TPM)",
        ),
        (
            attrs.user_with_auth(),
            "AK is not userWithAuth (it cannot be used with its auth value)",
        ),
    ];
    for (ok, message) in required {
        if !ok {
            return Err(reject(message));
        }
    }
    if attrs.decrypt() {
        return Err(reject("AK is a decryption key (decrypt attribute set)"));
    }
    let name_alg = ak.name_hashing_algorithm();
    if name_alg != HashingAlgorithm::Sha256 {
        return Err(reject(format!(
            "AK name algorithm is {}, expected sha256",
            hash_name(name_alg)
        )));
    }
    match ak {
        Public::Ecc {
            parameters, unique, ..
        } => {
            let curve = parameters.ecc_curve();
            if curve != EccCurve::NistP256 {
                return Err(reject(format!(
                    "AK curve is {}, expected NIST P-256",
                    curve_name(curve)
                )));
            }
            match parameters.ecc_scheme() {
                EccScheme::EcDsa(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256 => {}
                other => {
                    return Err(reject(format!(
                        "AK scheme is {}, expected ECDSA-SHA256",
                        ecc_scheme_name(other)
                    )));
                }
            }
            // The point must be on the curve: a quote could never verify otherwise.
            uncompressed_point(curve, unique.x().value(), unique.y().value()).and_then(|p| {
                p256::PublicKey::from_sec1_bytes(&p)
                    .map(drop)
                    .map_err(|_| reject("AK public key is not a point on NIST P-256"))
            })
        }
        Public::Rsa {
            parameters, unique, ..
        } => {
            if parameters.key_bits() != RsaKeyBits::Rsa2048 || unique.value().len() != 256 {
                return Err(reject(format!(
                    "AK RSA key is {} bits, expected 2048",
                    u16::from(parameters.key_bits())
                )));
            }
            match parameters.rsa_scheme() {
                RsaScheme::RsaSsa(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256 => {}
                other => {
                    return Err(reject(format!(
                        "AK scheme is {}, expected RSASSA-SHA256",
                        rsa_scheme_name(other)
                    )));
                }
            }
            rsa_public_key(parameters.exponent().value(), unique.value()).map(drop)
        }
        Public::KeyedHash { .. } => Err(reject(
            "AK algorithm is keyedhash, expected ECC P-256 or RSA-2048",
        )),
        Public::SymCipher { .. } => Err(reject(
            "AK algorithm is symcipher, expected ECC P-256 or RSA-2048",
        )),
    }
}

/// An RSA public key from a TPM exponent (0 means 65537) and modulus.
pub(super) fn rsa_public_key(exponent: u32, modulus: &[u8]) -> Result<rsa::RsaPublicKey> {
    let e = if exponent == 0 { 65537 } else { exponent };
    rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(modulus), rsa::BigUint::from(e))
        .map_err(|e| reject(format!("RSA public key is not usable: {e}")))
}

/// `04 || X || Y`, each coordinate left-padded to the curve's size.
pub(super) fn uncompressed_point(curve: EccCurve, x: &[u8], y: &[u8]) -> Result<Vec<u8>> {
    let size = match curve {
        EccCurve::NistP256 => 32,
        EccCurve::NistP384 => 48,
        other => {
            return Err(reject(format!(
                "ECC curve {} is not supported (NIST P-256 or P-384)",
                curve_name(other)
            )));
        }
    };
    let mut point = Vec::with_capacity(1 + 2 * size);
    point.push(0x04);
    for coordinate in [x, y] {
        if coordinate.len() > size {
            return Err(reject(format!(
                "ECC point coordinate is {} bytes, longer than the curve's {size}",
                coordinate.len()
            )));
        }
        point.resize(point.len() + size - coordinate.len(), 0);
        point.extend_from_slice(coordinate);
    }
    Ok(point)
}

/// The tpm2-tools name of a hash algorithm.
pub(super) fn hash_name(alg: HashingAlgorithm) -> &'static str {
    match alg {
        HashingAlgorithm::Sha1 => "sha1",
        HashingAlgorithm::Sha256 => "sha256",
        HashingAlgorithm::Sha384 => "sha384",
        HashingAlgorithm::Sha512 => "sha512",
        HashingAlgorithm::Sm3_256 => "sm3_256",
        HashingAlgorithm::Sha3_256 => "sha3_256",
        HashingAlgorithm::Sha3_384 => "sha3_384",
        HashingAlgorithm::Sha3_512 => "sha3_512",
        HashingAlgorithm::Null => "null",
    }
}

fn curve_name(curve: EccCurve) -> &'static str {
    match curve {
        EccCurve::NistP192 => "NIST P-192",
        EccCurve::NistP224 => "NIST P-224",
        EccCurve::NistP256 => "NIST P-256",
        EccCurve::NistP384 => "NIST P-384",
        EccCurve::NistP521 => "NIST P-521",
        EccCurve::BnP256 => "BN P-256",
        EccCurve::BnP638 => "BN P-638",
        EccCurve::Sm2P256 => "SM2 P-256",
    }
}

fn ecc_scheme_name(scheme: EccScheme) -> String {
    match scheme {
        EccScheme::EcDsa(h) => format!("ECDSA-{}", hash_name(h.hashing_algorithm())),
        EccScheme::EcDh(_) => "ECDH".into(),
        EccScheme::EcDaa(_) => "ECDAA".into(),
        EccScheme::Sm2(_) => "SM2".into(),
        EccScheme::EcSchnorr(_) => "EC-Schnorr".into(),
        EccScheme::EcMqv(_) => "ECMQV".into(),
        EccScheme::Null => "null (any)".into(),
    }
}

fn rsa_scheme_name(scheme: RsaScheme) -> String {
    match scheme {
        RsaScheme::RsaSsa(h) => format!("RSASSA-{}", hash_name(h.hashing_algorithm())),
        RsaScheme::RsaPss(h) => format!("RSAPSS-{}", hash_name(h.hashing_algorithm())),
        RsaScheme::RsaEs => "RSAES".into(),
        RsaScheme::Oaep(_) => "OAEP".into(),
        RsaScheme::Null => "null (any)".into(),
    }
}
