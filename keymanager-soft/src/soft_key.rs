use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use zeroize::Zeroizing;

use carapace_core::plugin::{KeyInfo, KeySigner};
use carapace_core::{Error, KeyType, SignatureAlgorithm};

/// A private key held in process memory (ring), signing without blocking.
pub struct SoftKey {
    id: String,
    key_type: KeyType,
    spki: Vec<u8>,
    inner: Inner,
    rng: SystemRandom,
}

enum Inner {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl std::fmt::Debug for SoftKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("SoftKey")
            .field("id", &self.id)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P384_SPKI_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

fn backend(msg: impl std::fmt::Display) -> Error {
    Error::KeyBackend(msg.to_string())
}

/// Generates a new private key of `key_type` as PKCS#8 DER.
pub fn generate_pkcs8(key_type: KeyType) -> Result<Zeroizing<Vec<u8>>, Error> {
    let rng = SystemRandom::new();
    match key_type {
        KeyType::EcP256 | KeyType::EcP384 => {
            let alg = ecdsa_alg(key_type);
            let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng)
                .map_err(|_| backend("ECDSA key generation failed"))?;
            Ok(Zeroizing::new(doc.as_ref().to_vec()))
        }
        KeyType::Rsa2048 => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| backend(format!("RSA key generation failed: {e}")))?;
            let doc = key
                .to_pkcs8_der()
                .map_err(|e| backend(format!("RSA key encoding failed: {e}")))?;
            Ok(Zeroizing::new(doc.as_bytes().to_vec()))
        }
    }
}

fn ecdsa_alg(kt: KeyType) -> &'static signature::EcdsaSigningAlgorithm {
    if kt == KeyType::EcP384 {
        &signature::ECDSA_P384_SHA384_ASN1_SIGNING
    } else {
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING
    }
}

impl SoftKey {
    /// Loads a key from PKCS#8 DER; the key type is read from the document.
    pub fn from_pkcs8(id: &str, pkcs8: &[u8]) -> Result<Self, Error> {
        let rng = SystemRandom::new();
        for kt in [KeyType::EcP256, KeyType::EcP384] {
            if let Ok(kp) = EcdsaKeyPair::from_pkcs8(ecdsa_alg(kt), pkcs8, &rng) {
                let prefix = if kt == KeyType::EcP256 {
                    P256_SPKI_PREFIX
                } else {
                    P384_SPKI_PREFIX
                };
                let spki = [prefix, kp.public_key().as_ref()].concat();
                return Ok(SoftKey {
                    id: id.to_owned(),
                    key_type: kt,
                    spki,
                    inner: Inner::Ecdsa(kp),
                    rng,
                });
            }
        }
        let kp = RsaKeyPair::from_pkcs8(pkcs8).map_err(|e| {
            backend(format!(
                "key {id:?} is not a P-256, P-384 or RSA PKCS#8 key: {e}"
            ))
        })?;
        if kp.public().modulus_len() != 256 {
            return Err(backend(format!("key {id:?}: only RSA-2048 is supported")));
        }
        let spki = {
            use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
            let key = rsa::RsaPrivateKey::from_pkcs8_der(pkcs8)
                .map_err(|e| backend(format!("key {id:?}: {e}")))?;
            key.to_public_key()
                .to_public_key_der()
                .map_err(|e| backend(format!("key {id:?}: {e}")))?
                .as_bytes()
                .to_vec()
        };
        Ok(SoftKey {
            id: id.to_owned(),
            key_type: KeyType::Rsa2048,
            spki,
            inner: Inner::Rsa(kp),
            rng,
        })
    }

    /// The key's public description.
    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            key_type: self.key_type,
            public_key_der: self.spki.clone(),
        }
    }
}

impl KeySigner for SoftKey {
    fn id(&self) -> &str {
        &self.id
    }

    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, alg: SignatureAlgorithm, message: &[u8]) -> Result<Vec<u8>, Error> {
        if !self.key_type.supports(alg) {
            return Err(Error::UnsupportedAlgorithm {
                key_type: self.key_type,
                algorithm: alg,
            });
        }
        match &self.inner {
            Inner::Ecdsa(kp) => kp
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| backend("ECDSA signing failed")),
            Inner::Rsa(kp) => {
                let padding: &dyn signature::RsaEncoding = match alg {
                    SignatureAlgorithm::RsaPssSha256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(padding, &self.rng, message, &mut sig)
                    .map_err(|_| backend("RSA signing failed"))?;
                Ok(sig)
            }
        }
    }

    fn may_block(&self) -> bool {
        false
    }

    fn concurrency(&self) -> Option<usize> {
        None
    }
}
