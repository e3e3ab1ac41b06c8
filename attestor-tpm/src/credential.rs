//! The server's half of credential activation, in software: MakeCredential (TPM 2.0
//! Library Part 1 §24, "Credential Protection") and TPM object Names.
//!
//! The server has no TPM. [`make_credential`] encrypts a secret so that only the TPM
//! holding the EK can recover it, and only through TPM2_ActivateCredential with the key
//! whose Name the credential was made for. Everything follows the EK's public area: its
//! nameAlg picks the hash of OAEP, KDFa, KDFe and the outer HMAC, and its symmetric
//! definition picks the AES key size (AES-128-CFB for the RSA-2048 and P-256 EK
//! templates, AES-256-CFB and SHA-384 for P-384).
//!
//! Steps, with `H` = the EK's nameAlg:
//! 1. seed: RSA EK: random `|H|` bytes, encrypted with RSA-OAEP(H, label "IDENTITY\0");
//!    ECC EK: ECDH with an ephemeral key on the EK's curve, seed = KDFe(H, Z.x,
//!    "IDENTITY", ephemeral.x, EK.x, `|H|` bits), encrypted secret = the ephemeral
//!    point (TPMS_ECC_POINT);
//! 2. symKey = KDFa(H, seed, "STORAGE", AK name, ∅, AES key bits); encIdentity =
//!    AES-CFB(symKey, IV 0, TPM2B_DIGEST(secret));
//! 3. HMACkey = KDFa(H, seed, "INTEGRITY", ∅, ∅, `|H|` bits); outerHMAC = HMAC(H,
//!    HMACkey, encIdentity || AK name); blob = TPM2B(outerHMAC) || encIdentity.

use crate::lock;
use crate::verify::parse_public_as as parse_public;
use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use rsa::rand_core::OsRng;
use sha2::{Sha256, Sha384, Sha512};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SymmetricMode};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::AesKeyBits;
use tss_esapi::structures::{Public, SymmetricDefinitionObject};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use carapace_core::Error;

type Result<T> = std::result::Result<T, Error>;

/// The KDF label that binds the seed to credential protection (Part 1 §24.4).
const LABEL_IDENTITY: &[u8] = b"IDENTITY";
/// The KDFa label of the credential's symmetric key.
const LABEL_STORAGE: &[u8] = b"STORAGE";
/// The KDFa label of the credential's HMAC key.
const LABEL_INTEGRITY: &[u8] = b"INTEGRITY";

/// A credential for ActivateCredential: the contents of `TPM2B_ID_OBJECT` and
/// `TPM2B_ENCRYPTED_SECRET` (no outer size fields), as [`crate::wire::Challenge`]
/// carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeCredential {
    /// TPMS_ID_OBJECT: `u16 size || integrityHMAC || encIdentity`.
    pub credential_blob: Vec<u8>,
    /// The seed encrypted to the EK: the RSA-OAEP ciphertext, or for an ECC EK the
    /// ephemeral public point as TPMS_ECC_POINT (`u16 || x || u16 || y`).
    pub encrypted_secret: Vec<u8>,
}

/// A TPM name algorithm this module implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NameAlg {
    Sha256,
    Sha384,
    Sha512,
}

impl NameAlg {
    fn from_tpm(alg: HashingAlgorithm) -> Option<NameAlg> {
        match alg {
            HashingAlgorithm::Sha256 => Some(NameAlg::Sha256),
            HashingAlgorithm::Sha384 => Some(NameAlg::Sha384),
            HashingAlgorithm::Sha512 => Some(NameAlg::Sha512),
            _ => None,
        }
    }

    fn from_id(id: u16) -> Option<NameAlg> {
        match id {
            0x000b => Some(NameAlg::Sha256),
            0x000c => Some(NameAlg::Sha384),
            0x000d => Some(NameAlg::Sha512),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            NameAlg::Sha256 => 32,
            NameAlg::Sha384 => 48,
            NameAlg::Sha512 => 64,
        }
    }

    fn hash(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: sha2::Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            NameAlg::Sha256 => run::<Sha256>(parts),
            NameAlg::Sha384 => run::<Sha384>(parts),
            NameAlg::Sha512 => run::<Sha512>(parts),
        }
    }

    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>> {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>> {
            // HMAC accepts keys of any length; this error cannot happen.
            let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key)
                .map_err(|e| Error::KeyBackend(format!("tpm: HMAC key: {e}")))?;
            for p in parts {
                m.update(p);
            }
            Ok(m.finalize().into_bytes().to_vec())
        }
        match self {
            NameAlg::Sha256 => run::<Hmac<Sha256>>(key, parts),
            NameAlg::Sha384 => run::<Hmac<Sha384>>(key, parts),
            NameAlg::Sha512 => run::<Hmac<Sha512>>(key, parts),
        }
    }

    fn name(self) -> &'static str {
        match self {
            NameAlg::Sha256 => "sha256",
            NameAlg::Sha384 => "sha384",
            NameAlg::Sha512 => "sha512",
        }
    }
}

/// KDFa (Part 1 §11.4.10.2, SP800-108 counter mode with HMAC):
/// `HMAC(key, counter || label || 0 || context_u || context_v || bits)`, counters from
/// 1, big-endian u32s; `label` without its terminating zero (added here).
fn kdfa(
    alg: NameAlg,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + alg.size());
    let mut counter: u32 = 1;
    while out.len() < bytes {
        out.extend(alg.hmac(
            key,
            &[
                &counter.to_be_bytes(),
                label,
                &[0],
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        )?);
        counter = counter.wrapping_add(1);
    }
    out.truncate(bytes);
    Ok(out)
}

/// KDFe (Part 1 §11.4.10.3, SP800-56A concatenation KDF):
/// `H(counter || Z || label || 0 || party_u || party_v)`, counters from 1; `label`
/// without its terminating zero (added here).
fn kdfe(
    alg: NameAlg,
    z: &[u8],
    label: &[u8],
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + alg.size());
    let mut counter: u32 = 1;
    while out.len() < bytes {
        out.extend(alg.hash(&[&counter.to_be_bytes(), z, label, &[0], party_u, party_v]));
        counter = counter.wrapping_add(1);
    }
    out.truncate(bytes);
    out
}

/// The TPM Name of an object from its marshalled TPMT_PUBLIC, computed in software:
/// `nameAlg (u16 big-endian) || H_nameAlg(TPMT_PUBLIC)`.
///
/// Fails with [`Error::AttestationRejected`] if the bytes are not exactly one canonical
/// TPMT_PUBLIC, or its nameAlg is not SHA-256, SHA-384 or SHA-512.
pub fn name_of_public(public_marshalled: &[u8]) -> Result<Vec<u8>> {
    crate::verify::name_of(&parse_public("public area", public_marshalled)?)
}

/// Makes a credential for the key named `ak_name` (a TPM Name: `u16 alg || digest`),
/// protected by the EK whose marshalled TPMT_PUBLIC is `ek_public`, carrying `secret`
/// (1 to `|H|` bytes, `H` the EK's nameAlg: use 32 random bytes).
///
/// Accepts the EK templates of the TCG EK Credential Profile: RSA 2048/3072/4096 and
/// ECC P-256/P-384 restricted decryption keys with an AES-CFB symmetric definition and
/// nameAlg SHA-256/384/512. Anything else is [`Error::AttestationRejected`].
///
/// This does not judge whether the EK is trustworthy (certificate chain, allowlist) or
/// whether the named key is a proper attestation key: check both before calling.
pub fn make_credential(ek_public: &[u8], ak_name: &[u8], secret: &[u8]) -> Result<MadeCredential> {
    let ek = parse_public("EK public area", ek_public)?;
    let alg = NameAlg::from_tpm(ek.name_hashing_algorithm()).ok_or_else(|| {
        Error::AttestationRejected(format!(
            "tpm: EK nameAlg {:?} is not supported (sha256, sha384, sha512)",
            ek.name_hashing_algorithm()
        ))
    })?;
    let attrs = ek.object_attributes();
    if !attrs.decrypt() || !attrs.restricted() || attrs.sign_encrypt() {
        return Err(Error::AttestationRejected(
            "tpm: EK is not a restricted decryption key".into(),
        ));
    }
    let aes_bits = match ek.symmetric_algorithm() {
        Some(SymmetricDefinitionObject::Aes {
            key_bits,
            mode: SymmetricMode::Cfb,
        }) => key_bits,
        other => {
            return Err(Error::AttestationRejected(format!(
                "tpm: EK symmetric definition {other:?} is not supported (AES-CFB)"
            )));
        }
    };
    check_ak_name(ak_name)?;
    if secret.is_empty() || secret.len() > alg.size() {
        return Err(Error::AttestationRejected(format!(
            "tpm: credential secret must be 1 to {} bytes (the EK's {} digest), not {}",
            alg.size(),
            alg.name(),
            secret.len()
        )));
    }

    let (seed, encrypted_secret) = match &ek {
        Public::Rsa {
            parameters, unique, ..
        } => rsa_seed(alg, parameters.exponent().value(), unique.value())?,
        Public::Ecc {
            parameters, unique, ..
        } => ecc_seed(
            alg,
            parameters.ecc_curve(),
            unique.x().value(),
            unique.y().value(),
        )?,
        _ => {
            return Err(Error::AttestationRejected(
                "tpm: EK is neither an RSA nor an ECC key".into(),
            ));
        }
    };

    // TPM2B_DIGEST(secret), encrypted with AES-CFB under a key bound to the AK's name.
    let mut enc_identity = Vec::with_capacity(2 + secret.len());
    enc_identity.extend((secret.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(secret);
    match aes_bits {
        AesKeyBits::Aes128 => {
            let key = kdfa(alg, &seed, LABEL_STORAGE, ak_name, &[], 128)?;
            cfb_encrypt::<aes::Aes128>(&key, &mut enc_identity)?;
        }
        AesKeyBits::Aes192 => {
            let key = kdfa(alg, &seed, LABEL_STORAGE, ak_name, &[], 192)?;
            cfb_encrypt::<aes::Aes192>(&key, &mut enc_identity)?;
        }
        AesKeyBits::Aes256 => {
            let key = kdfa(alg, &seed, LABEL_STORAGE, ak_name, &[], 256)?;
            cfb_encrypt::<aes::Aes256>(&key, &mut enc_identity)?;
        }
    }

    let digest_bits = (alg.size() * 8) as u32;
    let hmac_key = kdfa(alg, &seed, LABEL_INTEGRITY, &[], &[], digest_bits)?;
    let outer_hmac = alg.hmac(&hmac_key, &[&enc_identity, ak_name])?;

    let mut credential_blob = Vec::with_capacity(2 + outer_hmac.len() + enc_identity.len());
    credential_blob.extend((outer_hmac.len() as u16).to_be_bytes());
    credential_blob.extend(&outer_hmac);
    credential_blob.extend(&enc_identity);
    Ok(MadeCredential {
        credential_blob,
        encrypted_secret,
    })
}

/// A Name of a key: a known hash algorithm id and a digest of its size.
fn check_ak_name(name: &[u8]) -> Result<()> {
    let ok = name.len() >= 2
        && NameAlg::from_id(u16::from_be_bytes([name[0], name[1]]))
            .is_some_and(|a| name.len() == 2 + a.size());
    if ok {
        Ok(())
    } else {
        Err(Error::AttestationRejected(format!(
            "tpm: {} bytes are not a key Name (u16 sha256/384/512 id || digest)",
            name.len()
        )))
    }
}

fn cfb_encrypt<C>(key: &[u8], buf: &mut [u8]) -> Result<()>
where
    C: aes::cipher::BlockEncryptMut + aes::cipher::BlockCipher + aes::cipher::KeyInit,
{
    let iv = vec![0u8; C::block_size()];
    cfb_mode::Encryptor::<C>::new_from_slices(key, &iv)
        .map_err(|e| Error::KeyBackend(format!("tpm: AES-CFB key setup: {e}")))?
        .encrypt(buf);
    Ok(())
}

/// RSA EK: a random seed of `|H|` bytes, RSA-OAEP(H, "IDENTITY\0") to the EK.
fn rsa_seed(alg: NameAlg, exponent: u32, modulus: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let e = if exponent == 0 { 65537 } else { exponent };
    // The same bounds the rsa crate applied before (and the EK checks expect): a
    // modulus of 1024 to 4096 bits, an odd exponent above 1.
    let significant = &modulus[modulus.iter().take_while(|b| **b == 0).count()..];
    let bits = significant.len() * 8
        - significant
            .first()
            .map_or(0, |b| b.leading_zeros() as usize);
    if !(1024..=4096).contains(&bits) || e < 3 || e % 2 == 0 {
        return Err(Error::AttestationRejected(format!(
            "tpm: EK RSA public key: a {bits}-bit modulus with exponent {e} is not acceptable"
        )));
    }
    let mut seed = vec![0u8; alg.size()];
    rand::rng().fill_bytes(&mut seed);
    let ctx = oaep_context(alg, e, modulus)?;
    let mut encrypted = Vec::with_capacity(modulus.len());
    lock(&ctx)
        .encrypt_to_vec(&seed, &mut encrypted)
        .map_err(|err| openssl_err("encryption", err))?;
    Ok((seed, encrypted))
}

fn openssl_err(what: &str, err: openssl::error::ErrorStack) -> Error {
    Error::AttestationRejected(format!("tpm: RSA-OAEP to the EK: {what}: {err}"))
}

/// An OpenSSL RSA-OAEP encryption context, ready for one EK.
type OaepContext = Arc<Mutex<openssl::pkey_ctx::PkeyCtx<openssl::pkey::Public>>>;

/// The most EKs whose OAEP contexts are kept; when full the cache starts again empty.
const OAEP_CONTEXTS_MAX: usize = 16_384;

/// The RSA-OAEP context for an EK (name algorithm, exponent, modulus), made on first use
/// and kept: OpenSSL's libcrypto (which tpm2-tss links anyway) encrypts four times faster
/// than the rsa crate's big-number code, but OpenSSL 3 spends as long again setting up a
/// context (key import, algorithm fetches), and a TPM attests again at every renewal of
/// its agent. A context holds only the EK's public key.
fn oaep_context(alg: NameAlg, e: u32, modulus: &[u8]) -> Result<OaepContext> {
    use openssl::bn::BigNum;
    use openssl::md::Md;
    use openssl::pkey::PKey;
    use openssl::pkey_ctx::PkeyCtx;
    use openssl::rsa::{Padding, Rsa};

    type Contexts = Mutex<HashMap<(NameAlg, u32, Vec<u8>), OaepContext>>;
    static CONTEXTS: OnceLock<Contexts> = OnceLock::new();
    let contexts = CONTEXTS.get_or_init(Contexts::default);
    let key = (alg, e, modulus.to_vec());
    if let Some(ctx) = lock(contexts).get(&key) {
        return Ok(ctx.clone());
    }
    let pkey = BigNum::from_slice(modulus)
        .and_then(|n| Rsa::from_public_components(n, BigNum::from_u32(e)?))
        .and_then(PKey::from_rsa)
        .map_err(|err| openssl_err("the EK public key", err))?;
    let md = match alg {
        NameAlg::Sha256 => Md::sha256(),
        NameAlg::Sha384 => Md::sha384(),
        NameAlg::Sha512 => Md::sha512(),
    };
    let mut ctx = PkeyCtx::new(&pkey).map_err(|err| openssl_err("context", err))?;
    ctx.encrypt_init()
        .and_then(|()| ctx.set_rsa_padding(Padding::PKCS1_OAEP))
        .and_then(|()| ctx.set_rsa_oaep_md(md))
        .and_then(|()| ctx.set_rsa_mgf1_md(md))
        .and_then(|()| ctx.set_rsa_oaep_label(LABEL_IDENTITY_OAEP))
        .map_err(|err| openssl_err("context", err))?;
    let ctx = Arc::new(Mutex::new(ctx));
    let mut map = lock(contexts);
    if map.len() >= OAEP_CONTEXTS_MAX {
        map.clear();
    }
    map.insert(key, ctx.clone());
    Ok(ctx)
}

/// The RSA-OAEP label of a credential's seed: "IDENTITY" and its terminating zero.
const LABEL_IDENTITY_OAEP: &[u8] = b"IDENTITY\0";

/// ECC EK: ECDH with an ephemeral key; seed = KDFe(H, Z.x, "IDENTITY", eph.x, ek.x).
fn ecc_seed(alg: NameAlg, curve: EccCurve, x: &[u8], y: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let (z, eph_x, eph_y) = match curve {
        EccCurve::NistP256 => ecdh_p256(x, y)?,
        EccCurve::NistP384 => ecdh_p384(x, y)?,
        other => {
            return Err(Error::AttestationRejected(format!(
                "tpm: EK curve {other:?} is not supported (P-256, P-384)"
            )));
        }
    };
    let bits = (alg.size() * 8) as u32;
    // partyVInfo is the EK's x exactly as its public area holds it.
    let seed = kdfe(alg, &z, LABEL_IDENTITY, &eph_x, x, bits);
    let mut point = Vec::with_capacity(4 + eph_x.len() + eph_y.len());
    point.extend((eph_x.len() as u16).to_be_bytes());
    point.extend(&eph_x);
    point.extend((eph_y.len() as u16).to_be_bytes());
    point.extend(&eph_y);
    Ok((seed, point))
}

/// SEC1 uncompressed point from TPM coordinates, left-padded to the field size.
fn sec1_point(x: &[u8], y: &[u8], field: usize) -> Result<Vec<u8>> {
    if x.len() > field || y.len() > field || x.is_empty() || y.is_empty() {
        return Err(Error::AttestationRejected(format!(
            "tpm: EK point coordinates of {} and {} bytes on a {field}-byte curve",
            x.len(),
            y.len()
        )));
    }
    let mut p = vec![0x04];
    p.extend(std::iter::repeat_n(0, field - x.len()));
    p.extend(x);
    p.extend(std::iter::repeat_n(0, field - y.len()));
    p.extend(y);
    Ok(p)
}

type Ecdh = (Vec<u8>, Vec<u8>, Vec<u8>);

fn ecdh_p256(x: &[u8], y: &[u8]) -> Result<Ecdh> {
    let ek = p256::PublicKey::from_sec1_bytes(&sec1_point(x, y, 32)?)
        .map_err(|_| Error::AttestationRejected("tpm: EK is not a P-256 point".into()))?;
    let eph = p256::ecdh::EphemeralSecret::random(&mut OsRng);
    let z = eph.diffie_hellman(&ek).raw_secret_bytes().to_vec();
    let public = p256::EncodedPoint::from(eph.public_key());
    split_point(public.as_bytes(), 32).map(|(ex, ey)| (z, ex, ey))
}

fn ecdh_p384(x: &[u8], y: &[u8]) -> Result<Ecdh> {
    let ek = p384::PublicKey::from_sec1_bytes(&sec1_point(x, y, 48)?)
        .map_err(|_| Error::AttestationRejected("tpm: EK is not a P-384 point".into()))?;
    let eph = p384::ecdh::EphemeralSecret::random(&mut OsRng);
    let z = eph.diffie_hellman(&ek).raw_secret_bytes().to_vec();
    let public = p384::EncodedPoint::from(eph.public_key());
    split_point(public.as_bytes(), 48).map(|(ex, ey)| (z, ex, ey))
}

/// x and y of an uncompressed SEC1 point.
fn split_point(sec1: &[u8], field: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    match sec1 {
        [0x04, rest @ ..] if rest.len() == 2 * field => {
            Ok((rest[..field].to_vec(), rest[field..].to_vec()))
        }
        _ => Err(Error::KeyBackend(
            "tpm: ephemeral ECDH key is not an uncompressed point".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rsa_seed_is_oaep_with_the_identity_label_and_bounded_keys() {
        use rsa::traits::PublicKeyParts as _;
        // A private key here (the rsa crate) decrypts what OpenSSL encrypted to its
        // public half: OAEP, SHA-256 for both hash and MGF1, label "IDENTITY\0".
        let key = rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let modulus = key.n().to_bytes_be();
        let (seed, encrypted) = rsa_seed(NameAlg::Sha256, 0, &modulus).unwrap();
        assert_eq!(seed.len(), 32);
        assert_eq!(encrypted.len(), 256);
        let decrypted = key
            .decrypt(
                rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
                &encrypted,
            )
            .unwrap();
        assert_eq!(decrypted, seed);
        // The second encryption to the same EK (its context kept): a fresh seed, still
        // decrypting.
        let (again, encrypted_again) = rsa_seed(NameAlg::Sha256, 65537, &modulus).unwrap();
        assert_ne!(again, seed);
        let decrypted = key
            .decrypt(
                rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
                &encrypted_again,
            )
            .unwrap();
        assert_eq!(decrypted, again);
        // Small or oversized moduli and even exponents are refused before any use.
        for (modulus, e) in [
            (vec![0xc5; 64], 65537),
            (vec![0xc5; 1024], 65537),
            (modulus, 4),
        ] {
            let err = rsa_seed(NameAlg::Sha256, e, &modulus)
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not acceptable"), "{err}");
        }
    }

    #[test]
    fn kdfa_truncates_and_counts_from_one() {
        let a = kdfa(NameAlg::Sha256, b"key", b"STORAGE", b"u", b"", 128).unwrap();
        assert_eq!(a.len(), 16);
        let long = kdfa(NameAlg::Sha256, b"key", b"STORAGE", b"u", b"", 512).unwrap();
        assert_eq!(long.len(), 64);
        // The first block depends on the requested size (it is hashed in), so only the
        // first block of the 256-bit output equals a direct HMAC with counter 1.
        let b = kdfa(NameAlg::Sha256, b"key", b"STORAGE", b"u", b"", 256).unwrap();
        let direct = NameAlg::Sha256
            .hmac(
                b"key",
                &[
                    &1u32.to_be_bytes(),
                    b"STORAGE\0",
                    b"u",
                    &256u32.to_be_bytes(),
                ],
            )
            .unwrap();
        assert_eq!(b, direct);
    }

    #[test]
    fn kdfe_is_a_counter_hash() {
        let s = kdfe(NameAlg::Sha384, b"z", b"IDENTITY", b"u", b"v", 384);
        let direct = NameAlg::Sha384.hash(&[&1u32.to_be_bytes(), b"z", b"IDENTITY\0", b"u", b"v"]);
        assert_eq!(s, direct);
    }

    #[test]
    fn names_are_checked() {
        let mut name = vec![0x00, 0x0b];
        name.extend([7u8; 32]);
        assert!(check_ak_name(&name).is_ok());
        assert!(check_ak_name(&name[..33]).is_err());
        assert!(check_ak_name(&[0x00, 0x04]).is_err());
        assert!(check_ak_name(&[]).is_err());
    }

    #[test]
    fn garbage_public_areas_are_rejected() {
        assert!(matches!(
            name_of_public(b"\x00\x01\x02"),
            Err(Error::AttestationRejected(_))
        ));
        assert!(matches!(
            make_credential(b"", &[0; 34], &[1; 32]),
            Err(Error::AttestationRejected(_))
        ));
    }
}
