//! Key types and signature algorithms, and signature verification for tests and checks.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The key types every key manager supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    /// ECDSA on NIST P-256 (the default).
    #[default]
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
}

impl KeyType {
    /// Every key type, in a stable order.
    pub const ALL: [KeyType; 3] = [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048];

    /// The configuration name: `ec-p256`, `ec-p384` or `rsa-2048`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }

    /// The algorithm used for certificates signed with this key.
    pub fn x509_algorithm(self) -> SignatureAlgorithm {
        match self {
            KeyType::EcP256 => SignatureAlgorithm::EcdsaP256Sha256,
            KeyType::EcP384 => SignatureAlgorithm::EcdsaP384Sha384,
            KeyType::Rsa2048 => SignatureAlgorithm::RsaPkcs1Sha256,
        }
    }

    /// Whether a key of this type can sign with `alg`.
    pub fn supports(self, alg: SignatureAlgorithm) -> bool {
        matches!(
            (self, alg),
            (KeyType::EcP256, SignatureAlgorithm::EcdsaP256Sha256)
                | (KeyType::EcP384, SignatureAlgorithm::EcdsaP384Sha384)
                | (KeyType::Rsa2048, SignatureAlgorithm::RsaPkcs1Sha256)
                | (KeyType::Rsa2048, SignatureAlgorithm::RsaPssSha256)
        )
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "ec-p256" => Ok(KeyType::EcP256),
            "ec-p384" => Ok(KeyType::EcP384),
            "rsa-2048" => Ok(KeyType::Rsa2048),
            other => Err(Error::PluginConfig {
                plugin: "key_type".into(),
                reason: format!("unknown key type {other:?} (known: ec-p256, ec-p384, rsa-2048)"),
            }),
        }
    }
}

impl<'de> serde::Deserialize<'de> for KeyType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A signature algorithm: key type, padding and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    /// ECDSA P-256 with SHA-256, ASN.1 DER signature.
    EcdsaP256Sha256,
    /// ECDSA P-384 with SHA-384, ASN.1 DER signature.
    EcdsaP384Sha384,
    /// RSA PKCS#1 v1.5 with SHA-256 (X.509 signatures).
    RsaPkcs1Sha256,
    /// RSA-PSS with SHA-256, salt length 32 (TLS 1.3 signatures).
    RsaPssSha256,
}

impl fmt::Display for SignatureAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignatureAlgorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            SignatureAlgorithm::EcdsaP384Sha384 => "ecdsa-p384-sha384",
            SignatureAlgorithm::RsaPkcs1Sha256 => "rsa-pkcs1-sha256",
            SignatureAlgorithm::RsaPssSha256 => "rsa-pss-sha256",
        })
    }
}

/// Verifies `signature` over `message` with the public key in `spki_der` (an X.509
/// SubjectPublicKeyInfo). Pure software (ring), independent of any key manager.
pub fn verify_signature(
    spki_der: &[u8],
    alg: SignatureAlgorithm,
    message: &[u8],
    signature: &[u8],
) -> Result<(), Error> {
    use x509_parser::prelude::FromDer;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| Error::KeyBackend(format!("bad public key: {e}")))?;
    let raw = spki.subject_public_key.data.as_ref();
    let ring_alg: &dyn ring::signature::VerificationAlgorithm = match alg {
        SignatureAlgorithm::EcdsaP256Sha256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
        SignatureAlgorithm::EcdsaP384Sha384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
        SignatureAlgorithm::RsaPkcs1Sha256 => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        SignatureAlgorithm::RsaPssSha256 => &ring::signature::RSA_PSS_2048_8192_SHA256,
    };
    ring::signature::UnparsedPublicKey::new(ring_alg, raw)
        .verify(message, signature)
        .map_err(|_| Error::KeyBackend(format!("{alg} signature does not verify")))
}

/// The key type of a SubjectPublicKeyInfo, if it is one Carapace supports.
pub fn key_type_of_spki(spki_der: &[u8]) -> Result<KeyType, Error> {
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| Error::InvalidSvid(format!("bad public key: {e}")))?;
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => match point.key_size() {
            256 => Ok(KeyType::EcP256),
            384 => Ok(KeyType::EcP384),
            n => Err(Error::InvalidSvid(format!("unsupported EC key size {n}"))),
        },
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() == 2048 => Ok(KeyType::Rsa2048),
        Ok(PublicKey::RSA(rsa)) => Err(Error::InvalidSvid(format!(
            "unsupported RSA key size {}",
            rsa.key_size()
        ))),
        _ => Err(Error::InvalidSvid(
            "unsupported public key algorithm".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_names_round_trip() {
        for kt in KeyType::ALL {
            assert_eq!(kt.as_str().parse::<KeyType>().unwrap(), kt);
            assert!(kt.supports(kt.x509_algorithm()));
        }
        assert!("ec-p521".parse::<KeyType>().is_err());
        assert!(!KeyType::EcP256.supports(SignatureAlgorithm::EcdsaP384Sha384));
    }

    #[test]
    fn verifies_and_rejects_signatures() {
        let kp = rcgen::KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
        let sig = rcgen::SigningKey::sign(&kp, b"hello").unwrap();
        verify_signature(&spki, SignatureAlgorithm::EcdsaP256Sha256, b"hello", &sig).unwrap();
        assert!(
            verify_signature(&spki, SignatureAlgorithm::EcdsaP256Sha256, b"hellO", &sig).is_err()
        );
        assert_eq!(key_type_of_spki(&spki).unwrap(), KeyType::EcP256);
    }
}
