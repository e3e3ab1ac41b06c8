//! Key and certificate objects in the token: generation, lookup, listing, deletion,
//! signing.

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, CertificateType, KeyType as CkKeyType, ObjectClass,
    ObjectHandle,
};
use cryptoki::session::Session;
use sha2::{Digest, Sha256, Sha384};

use carapace_core::plugin::{KeyInfo, validate_key_id};
use carapace_core::{Error, KeyType, SignatureAlgorithm};

use crate::der;
use crate::module::lock;
use crate::token::{OpError, Token};

/// A key's public description, read from the token.
#[derive(Debug, Clone)]
pub(crate) struct KeyMeta {
    pub(crate) key_type: KeyType,
    pub(crate) spki: Vec<u8>,
}

/// Attributes of a private key object that show it cannot leave the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrivateKeyAttributes {
    /// `CKA_TOKEN`: stored in the token (survives a restart).
    pub token: bool,
    /// `CKA_PRIVATE`: only visible after login.
    pub private: bool,
    /// `CKA_SENSITIVE`: secret attributes cannot be read.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`: the key could be wrapped out of the token.
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`: has always been sensitive.
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`: has never been extractable.
    pub never_extractable: bool,
}

/// `CKA_ID` of the objects of `label`: the first 16 bytes of SHA-256 of the label, so the
/// key pair and its certificate share it and tools pair them.
pub(crate) fn object_id(label: &str) -> Vec<u8> {
    Sha256::digest(label.as_bytes())[..16].to_vec()
}

fn label_attr(label: &str) -> Attribute {
    Attribute::Label(label.as_bytes().to_vec())
}

fn find(s: &Session, class: ObjectClass, label: &str) -> Result<Vec<ObjectHandle>, OpError> {
    Ok(s.find_objects(&[Attribute::Class(class), label_attr(label)])?)
}

fn backend(msg: impl std::fmt::Display) -> OpError {
    OpError::Core(Error::KeyBackend(format!("pkcs11: {msg}")))
}

/// The value of one attribute of an object, if the token returned it.
fn attr(s: &Session, h: ObjectHandle, t: AttributeType) -> Result<Option<Attribute>, OpError> {
    Ok(s.get_attributes(h, &[t])?.into_iter().next())
}

fn bytes_attr(s: &Session, h: ObjectHandle, t: AttributeType) -> Result<Option<Vec<u8>>, OpError> {
    Ok(match attr(s, h, t)? {
        Some(
            Attribute::EcParams(v)
            | Attribute::EcPoint(v)
            | Attribute::Modulus(v)
            | Attribute::PublicExponent(v)
            | Attribute::Value(v)
            | Attribute::Label(v),
        ) => Some(v),
        _ => None,
    })
}

/// The public key of `label` as a SubjectPublicKeyInfo, from its public key object (or,
/// for RSA, the private key object when the public one is missing).
fn read_meta(s: &Session, private: ObjectHandle, label: &str) -> Result<KeyMeta, OpError> {
    let ck_type = match attr(s, private, AttributeType::KeyType)? {
        Some(Attribute::KeyType(t)) => t,
        _ => return Err(backend(format!("key {label:?} has no CKA_KEY_TYPE"))),
    };
    let public = find(s, ObjectClass::PUBLIC_KEY, label)?.into_iter().next();
    if ck_type == CkKeyType::EC {
        let params = bytes_attr(s, private, AttributeType::EcParams)?
            .ok_or_else(|| backend(format!("EC key {label:?} has no CKA_EC_PARAMS")))?;
        let key_type = der::ec_key_type(&params).ok_or_else(|| {
            backend(format!(
                "EC key {label:?} is on a curve Carapace does not support (ec-p256, ec-p384)"
            ))
        })?;
        let public = public.ok_or_else(|| {
            backend(format!(
                "EC key {label:?} has no public key object in the token (CKA_EC_POINT is read \
                 from it)"
            ))
        })?;
        let raw = bytes_attr(s, public, AttributeType::EcPoint)?
            .ok_or_else(|| backend(format!("EC public key {label:?} has no CKA_EC_POINT")))?;
        let point = der::ec_point(&raw, key_type).ok_or_else(|| {
            backend(format!(
                "EC public key {label:?}: CKA_EC_POINT is not an uncompressed {key_type} point"
            ))
        })?;
        let spki = der::ec_spki(key_type, &point)
            .ok_or_else(|| backend(format!("EC key {label:?}: cannot encode the public key")))?;
        Ok(KeyMeta { key_type, spki })
    } else if ck_type == CkKeyType::RSA {
        let from = public.unwrap_or(private);
        let modulus = bytes_attr(s, from, AttributeType::Modulus)?
            .ok_or_else(|| backend(format!("RSA key {label:?} has no CKA_MODULUS")))?;
        let exponent = bytes_attr(s, from, AttributeType::PublicExponent)?
            .ok_or_else(|| backend(format!("RSA key {label:?} has no CKA_PUBLIC_EXPONENT")))?;
        let bits = der::bit_len(&modulus);
        if bits != 2048 {
            return Err(backend(format!(
                "RSA key {label:?} has {bits} bits; Carapace supports rsa-2048"
            )));
        }
        let spki = der::rsa_spki(&modulus, &exponent)
            .ok_or_else(|| backend(format!("RSA key {label:?}: cannot encode the public key")))?;
        Ok(KeyMeta {
            key_type: KeyType::Rsa2048,
            spki,
        })
    } else {
        Err(backend(format!(
            "key {label:?} is of a type Carapace does not support ({ck_type})"
        )))
    }
}

fn templates(kt: KeyType, label: &str) -> (Mechanism<'static>, Vec<Attribute>, Vec<Attribute>) {
    let id = object_id(label);
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        // A CA key signs and does nothing else: no decryption, unwrapping or derivation
        // (tokens default some of these to true).
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        label_attr(label),
        Attribute::Id(id.clone()),
    ];
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        label_attr(label),
        Attribute::Id(id),
    ];
    let mechanism = match der::ec_params(kt) {
        Some(params) => {
            public.push(Attribute::EcParams(params.to_vec()));
            Mechanism::EccKeyPairGen
        }
        None => {
            public.push(Attribute::ModulusBits(2048.into()));
            public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    (mechanism, public, private)
}

impl Token {
    pub(crate) fn label_of(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// Generates a key pair in the token.
    pub(crate) fn generate(&self, id: &str, kt: KeyType) -> Result<KeyMeta, Error> {
        validate_key_id(id)?;
        let label = self.label_of(id);
        let _admin = lock(&self.admin);
        let meta = self.run(false, |s, epoch| {
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                if !find(s, class, &label)?.is_empty() {
                    return Err(Error::KeyExists(id.to_owned()).into());
                }
            }
            let (mechanism, public_t, private_t) = templates(kt, &label);
            let (public, private) = s.generate_key_pair(&mechanism, &public_t, &private_t)?;
            match read_meta(s, private, &label) {
                Ok(meta) if meta.key_type == kt => {
                    self.remember(&label, epoch, private);
                    Ok(meta)
                }
                other => {
                    let _ = s.destroy_object(private);
                    let _ = s.destroy_object(public);
                    match other {
                        Err(e) => Err(e),
                        Ok(meta) => Err(backend(format!(
                            "the token generated a {} key when asked for {kt}",
                            meta.key_type
                        ))),
                    }
                }
            }
        })?;
        tracing::info!(token = %self.selector, key = id, key_type = %kt, "generated key in token");
        Ok(meta)
    }

    /// The key `id`: type and public key.
    pub(crate) fn key_meta(&self, id: &str) -> Result<KeyMeta, Error> {
        validate_key_id(id)?;
        let label = self.label_of(id);
        self.run(true, |s, epoch| {
            let private = self.private_key(s, epoch, &label, id)?;
            read_meta(s, private, &label)
        })
    }

    /// Every key whose label starts with the prefix, sorted by id.
    pub(crate) fn list(&self) -> Result<Vec<KeyInfo>, Error> {
        let mut keys = self.run(true, |s, _| {
            let mut out = Vec::new();
            for h in s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])? {
                let Some(label) = bytes_attr(s, h, AttributeType::Label)? else {
                    continue;
                };
                let Ok(label) = String::from_utf8(label) else {
                    continue;
                };
                let Some(id) = label.strip_prefix(&self.prefix) else {
                    continue;
                };
                if validate_key_id(id).is_err() {
                    continue;
                }
                match read_meta(s, h, &label) {
                    Ok(meta) => out.push(KeyInfo {
                        id: id.to_owned(),
                        key_type: meta.key_type,
                        public_key_der: meta.spki,
                    }),
                    Err(OpError::Core(e)) => {
                        tracing::debug!(token = %self.selector, label, error = %e, "skipping key");
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })?;
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys.dedup_by(|a, b| a.id == b.id);
        Ok(keys)
    }

    /// Destroys the private and public key objects of `id`.
    pub(crate) fn delete(&self, id: &str) -> Result<(), Error> {
        validate_key_id(id)?;
        let label = self.label_of(id);
        let _admin = lock(&self.admin);
        self.run(false, |s, _| {
            let mut objects = find(s, ObjectClass::PRIVATE_KEY, &label)?;
            objects.extend(find(s, ObjectClass::PUBLIC_KEY, &label)?);
            if objects.is_empty() {
                return Err(Error::KeyNotFound(id.to_owned()).into());
            }
            self.forget(&label);
            for h in objects {
                s.destroy_object(h)?;
            }
            Ok(())
        })?;
        tracing::info!(token = %self.selector, key = id, "deleted key from token");
        Ok(())
    }

    /// Signs `message` with the key labelled `label`.
    pub(crate) fn sign(
        &self,
        id: &str,
        label: &str,
        kt: KeyType,
        alg: SignatureAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, Error> {
        if !kt.supports(alg) {
            return Err(Error::UnsupportedAlgorithm {
                key_type: kt,
                algorithm: alg,
            });
        }
        let (mechanism, data) = sign_input(alg, message);
        let raw = self.run(true, |s, epoch| {
            let key = self.private_key(s, epoch, label, id)?;
            Ok(s.sign(&mechanism, key, &data)?)
        })?;
        finish_signature(kt, raw)
    }

    /// Stores (or replaces) the X.509 certificate of `id`.
    pub(crate) fn store_certificate(&self, id: &str, cert_der: &[u8]) -> Result<(), Error> {
        validate_key_id(id)?;
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| Error::KeyBackend(format!("pkcs11: not a DER X.509 certificate: {e}")))?;
        let tbs = &cert.tbs_certificate;
        let subject = tbs.subject.as_raw().to_vec();
        let issuer = tbs.issuer.as_raw().to_vec();
        let serial = der::integer_content(tbs.raw_serial()).ok_or_else(|| {
            Error::KeyBackend("pkcs11: the certificate's serial cannot be encoded".into())
        })?;
        let label = self.label_of(id);
        let _admin = lock(&self.admin);
        self.run(false, |s, _| {
            let old = find(s, ObjectClass::CERTIFICATE, &label)?;
            s.create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Private(false),
                label_attr(&label),
                Attribute::Id(object_id(&label)),
                Attribute::Subject(subject.clone()),
                Attribute::Issuer(issuer.clone()),
                Attribute::SerialNumber(serial.clone()),
                Attribute::Value(cert_der.to_vec()),
            ])?;
            for h in old {
                s.destroy_object(h)?;
            }
            Ok(())
        })?;
        tracing::info!(token = %self.selector, key = id, "stored certificate in token");
        Ok(())
    }

    /// The DER X.509 certificate stored under `id`, if any.
    pub(crate) fn find_certificate(&self, id: &str) -> Result<Option<Vec<u8>>, Error> {
        validate_key_id(id)?;
        let label = self.label_of(id);
        self.run(true, |s, _| {
            match find(s, ObjectClass::CERTIFICATE, &label)?.as_slice() {
                [] => Ok(None),
                [h] => bytes_attr(s, *h, AttributeType::Value)?
                    .map(Some)
                    .ok_or_else(|| backend(format!("certificate {label:?} has no CKA_VALUE"))),
                many => Err(backend(format!(
                    "the {} holds {} certificates labelled {label:?}; delete the extra ones",
                    self.selector,
                    many.len()
                ))),
            }
        })
    }

    /// The protection attributes of the private key of `id`.
    pub(crate) fn private_key_attributes(&self, id: &str) -> Result<PrivateKeyAttributes, Error> {
        validate_key_id(id)?;
        let label = self.label_of(id);
        self.run(true, |s, epoch| {
            let key = self.private_key(s, epoch, &label, id)?;
            let mut out = PrivateKeyAttributes::default();
            for a in s.get_attributes(
                key,
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ],
            )? {
                match a {
                    Attribute::Token(v) => out.token = v,
                    Attribute::Private(v) => out.private = v,
                    Attribute::Sensitive(v) => out.sensitive = v,
                    Attribute::Extractable(v) => out.extractable = v,
                    Attribute::AlwaysSensitive(v) => out.always_sensitive = v,
                    Attribute::NeverExtractable(v) => out.never_extractable = v,
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    /// Tries to read the secret value of the private key of `id` (`CKA_VALUE`, and the
    /// RSA private exponent and primes); `None` when the token refuses every one.
    pub(crate) fn try_read_private_value(&self, id: &str) -> Result<Option<Vec<u8>>, Error> {
        validate_key_id(id)?;
        let label = self.label_of(id);
        self.run(true, |s, epoch| {
            let key = self.private_key(s, epoch, &label, id)?;
            let secret = [
                AttributeType::Value,
                AttributeType::PrivateExponent,
                AttributeType::Prime1,
                AttributeType::Prime2,
                AttributeType::Exponent1,
                AttributeType::Exponent2,
                AttributeType::Coefficient,
            ];
            for (t, info) in secret.iter().zip(s.get_attribute_info(key, &secret)?) {
                if let AttributeInfo::Available(n) = info
                    && n > 0
                {
                    for a in s.get_attributes(key, &[*t])? {
                        if let Attribute::Value(v)
                        | Attribute::PrivateExponent(v)
                        | Attribute::Prime1(v)
                        | Attribute::Prime2(v)
                        | Attribute::Exponent1(v)
                        | Attribute::Exponent2(v)
                        | Attribute::Coefficient(v) = a
                            && !v.is_empty()
                        {
                            return Ok(Some(v));
                        }
                    }
                }
            }
            Ok(None)
        })
    }
}

/// The mechanism and the data to give the token for `alg` over `message`.
pub(crate) fn sign_input(alg: SignatureAlgorithm, message: &[u8]) -> (Mechanism<'static>, Vec<u8>) {
    match alg {
        SignatureAlgorithm::EcdsaP256Sha256 => (Mechanism::Ecdsa, Sha256::digest(message).to_vec()),
        SignatureAlgorithm::EcdsaP384Sha384 => (Mechanism::Ecdsa, Sha384::digest(message).to_vec()),
        SignatureAlgorithm::RsaPkcs1Sha256 => {
            let mut data = der::SHA256_DIGEST_INFO_PREFIX.to_vec();
            data.extend_from_slice(&Sha256::digest(message));
            (Mechanism::RsaPkcs, data)
        }
        SignatureAlgorithm::RsaPssSha256 => (
            Mechanism::RsaPkcsPss(PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32.into(),
            }),
            Sha256::digest(message).to_vec(),
        ),
    }
}

/// The token's signature in the form X.509 and TLS use.
pub(crate) fn finish_signature(kt: KeyType, raw: Vec<u8>) -> Result<Vec<u8>, Error> {
    match kt {
        KeyType::EcP256 | KeyType::EcP384 => der::ecdsa_signature(&raw, kt).ok_or_else(|| {
            Error::KeyBackend(format!(
                "pkcs11: the token returned a {}-byte ECDSA signature; expected {} bytes (r || s)",
                raw.len(),
                2 * der::ec_field_len(kt)
            ))
        }),
        KeyType::Rsa2048 if raw.len() == 256 => Ok(raw),
        KeyType::Rsa2048 => Err(Error::KeyBackend(format!(
            "pkcs11: the token returned a {}-byte RSA-2048 signature",
            raw.len()
        ))),
    }
}
