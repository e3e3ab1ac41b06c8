//! TLS for Carapace, on rustls with the ring provider: TLS 1.3 only for the node API;
//! TLS 1.2 as well for fetching a federated trust domain's bundle.
//!
//! - [`KeyManagerSigningKey`] makes a [`KeySigner`] usable as a rustls signing key, so the
//!   server's and the agent's TLS handshakes sign inside their key manager (HSM, TPM):
//!   the private key is never in rustls's hands.
//! - [`SpiffeServerVerifier`] (used by agents) accepts a server only if its certificate is
//!   a valid X509-SVID under the current trust bundle with exactly the expected SPIFFE ID.
//!   [`federation_client_config`] uses it, with TLS 1.2 allowed as well, for a peer trust
//!   domain's `https_spiffe` bundle endpoint.
//! - [`SpiffeClientVerifier`] (used by the server) accepts a client certificate only if it
//!   is a valid X509-SVID of the trust domain under the current bundle. It does not
//!   demand one: node attestation runs before the agent has an SVID, and every RPC that
//!   needs one checks for it.
//!
//! Both verifiers read the bundle from a [`tokio::sync::watch`] channel on every
//! handshake, so a CA rotation takes effect without rebuilding the TLS configuration.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;

use carapace_core::plugin::KeySigner;
use carapace_core::x509svid::{VerifiedSvid, verify_chain};
use carapace_core::{KeyType, SignatureAlgorithm, SpiffeId, TrustBundle};

/// The current trust bundle, as published by whoever owns it.
pub type BundleWatch = watch::Receiver<Arc<TrustBundle>>;

/// The crypto provider every Carapace TLS endpoint uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn supported_algs() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// A rustls signing key backed by a key manager's key.
#[derive(Debug, Clone)]
pub struct KeyManagerSigningKey {
    key: Arc<dyn KeySigner>,
}

impl KeyManagerSigningKey {
    /// Wraps `key`.
    pub fn new(key: Arc<dyn KeySigner>) -> Self {
        KeyManagerSigningKey { key }
    }

    fn scheme(&self) -> (SignatureScheme, SignatureAlgorithm) {
        match self.key.key_type() {
            KeyType::EcP256 => (
                SignatureScheme::ECDSA_NISTP256_SHA256,
                SignatureAlgorithm::EcdsaP256Sha256,
            ),
            KeyType::EcP384 => (
                SignatureScheme::ECDSA_NISTP384_SHA384,
                SignatureAlgorithm::EcdsaP384Sha384,
            ),
            // TLS 1.3 allows only PSS for RSA handshake signatures.
            KeyType::Rsa2048 => (
                SignatureScheme::RSA_PSS_SHA256,
                SignatureAlgorithm::RsaPssSha256,
            ),
        }
    }
}

impl SigningKey for KeyManagerSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let (scheme, alg) = self.scheme();
        offered.contains(&scheme).then(|| {
            Box::new(KeyManagerSigner {
                key: self.key.clone(),
                scheme,
                alg,
            }) as Box<dyn Signer>
        })
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        match self.key.key_type() {
            KeyType::EcP256 | KeyType::EcP384 => rustls::SignatureAlgorithm::ECDSA,
            KeyType::Rsa2048 => rustls::SignatureAlgorithm::RSA,
        }
    }
}

#[derive(Debug)]
struct KeyManagerSigner {
    key: Arc<dyn KeySigner>,
    scheme: SignatureScheme,
    alg: SignatureAlgorithm,
}

impl Signer for KeyManagerSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key.sign(self.alg, message).map_err(|e| {
            tracing::warn!(key = self.key.id(), error = %e, "TLS handshake signature failed");
            rustls::Error::General(format!("signing failed: {e}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// A certificate chain with a key manager key, for rustls.
pub fn certified_key(chain: &[Vec<u8>], key: Arc<dyn KeySigner>) -> Arc<CertifiedKey> {
    let certs = chain
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    Arc::new(CertifiedKey::new(
        certs,
        Arc::new(KeyManagerSigningKey::new(key)),
    ))
}

fn now_secs(now: UnixTime) -> u64 {
    now.as_secs()
}

fn verify_svid(
    bundle: &BundleWatch,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<VerifiedSvid, rustls::Error> {
    let chain: Vec<Vec<u8>> = std::iter::once(end_entity.to_vec())
        .chain(intermediates.iter().map(|c| c.to_vec()))
        .collect();
    let bundle = bundle.borrow().clone();
    verify_chain(&chain, &bundle, now_secs(now)).map_err(|e| {
        tracing::debug!(error = %e, "peer certificate rejected");
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    })
}

/// Verifies a server's certificate as an X509-SVID with an expected SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: BundleWatch,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
    /// Whether TLS 1.2 handshake signatures are verified (else refused).
    tls12: bool,
}

impl SpiffeServerVerifier {
    /// Accepts only servers presenting an SVID for `expected` under `bundle`, over TLS 1.3
    /// only (the node API).
    pub fn new(bundle: BundleWatch, expected: SpiffeId) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            bundle,
            expected,
            algs: supported_algs(),
            tls12: false,
        })
    }

    /// As [`SpiffeServerVerifier::new`], but TLS 1.2 handshakes are verified too: for a
    /// peer trust domain's bundle endpoint (`https_spiffe`; SPIFFE Federation §5 asks
    /// for Mozilla's *intermediate* profile, TLS 1.2 and 1.3), which may be another
    /// implementation's.
    pub fn accepting_tls12(bundle: BundleWatch, expected: SpiffeId) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            bundle,
            expected,
            algs: supported_algs(),
            tls12: true,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let svid = verify_svid(&self.bundle, end_entity, intermediates, now)?;
        if svid.spiffe_id != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    carapace_core::Error::InvalidSvid(format!(
                        "server presented {} but {} was expected",
                        svid.spiffe_id, self.expected
                    )),
                ))),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.tls12 {
            return rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs);
        }
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies client certificates as X509-SVIDs of the trust domain; optional.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: BundleWatch,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// Accepts client SVIDs valid under `bundle`, and clients without a certificate.
    pub fn new(bundle: BundleWatch) -> Arc<Self> {
        Arc::new(SpiffeClientVerifier {
            bundle,
            algs: supported_algs(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_svid(&self.bundle, end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A TLS 1.3-only server configuration presenting `cert` and verifying optional client
/// SVIDs against `bundle`, with ALPN `h2` for gRPC.
pub fn server_config(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    bundle: BundleWatch,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SpiffeClientVerifier::new(bundle))
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A TLS 1.3-only client configuration that accepts only `server_id` under `bundle`, and
/// presents `client` (chain and key) when given, with ALPN `h2` for gRPC.
pub fn client_config(
    bundle: BundleWatch,
    server_id: SpiffeId,
    client: Option<Arc<CertifiedKey>>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(bundle, server_id));
    let mut cfg = match client {
        Some(ck) => builder.with_client_cert_resolver(Arc::new(FixedClientCert(ck))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client configuration for fetching a peer trust domain's bundle from its
/// `https_spiffe` bundle endpoint (SPIFFE Federation §5.2.2): the endpoint must present
/// an X509-SVID for `endpoint_id` under `bundle` (the bundle of `endpoint_id`'s trust
/// domain); TLS 1.3 or 1.2, no client certificate, ALPN `http/1.1`. The host name the
/// client connects to goes out as SNI but is not checked against the certificate: the
/// SPIFFE ID is.
pub fn federation_client_config(
    bundle: BundleWatch,
    endpoint_id: SpiffeId,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::accepting_tls12(
            bundle,
            endpoint_id,
        ))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Always presents one certificate (swappable), as a server certificate resolver.
#[derive(Debug)]
pub struct FixedCert(pub std::sync::RwLock<Arc<CertifiedKey>>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts any server certificate whose leaf claims `expected` — without checking who
/// signed it. Only for the agent's `insecure_bootstrap` first contact, when it has no
/// bundle yet; the handshake signature is still verified.
#[derive(Debug)]
struct InsecureBootstrapVerifier {
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for InsecureBootstrapVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = carapace_core::x509svid::check_leaf(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if id != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        tracing::warn!(server = %id, "insecure bootstrap: trusting the server without verifying its certificate chain");
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A client configuration for the agent's `insecure_bootstrap` first contact: the server
/// must present an SVID claiming `server_id`, but its chain is not verified. The bundle
/// the server then returns becomes the agent's trust root.
pub fn danger_insecure_bootstrap_config(
    server_id: SpiffeId,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(InsecureBootstrapVerifier {
            expected: server_id,
            algs: supported_algs(),
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A KeyManager key as an rcgen signer, so certificates and CSRs are signed inside the
/// key manager.
pub struct RcgenKey {
    key: Arc<dyn KeySigner>,
    raw_public_key: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl std::fmt::Debug for RcgenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcgenKey")
            .field("key", &self.key.id())
            .finish()
    }
}

impl RcgenKey {
    /// Wraps `key`.
    pub fn new(key: Arc<dyn KeySigner>) -> Result<Self, carapace_core::Error> {
        use x509_parser::prelude::FromDer;
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(key.public_key_der())
            .map_err(|e| {
                carapace_core::Error::KeyBackend(format!(
                    "key {} has an unreadable public key: {e}",
                    key.id()
                ))
            })?;
        let alg: &'static rcgen::SignatureAlgorithm = match key.key_type() {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        };
        Ok(RcgenKey {
            raw_public_key: spki.subject_public_key.data.to_vec(),
            key,
            alg,
        })
    }

    /// The wrapped key.
    pub fn key(&self) -> &Arc<dyn KeySigner> {
        &self.key
    }
}

impl rcgen::PublicKeyData for RcgenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw_public_key
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl rcgen::SigningKey for RcgenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key
            .sign(self.key.key_type().x509_algorithm(), msg)
            .map_err(|e| {
                // The key manager logs outages itself (once); this is per signature.
                tracing::debug!(key = self.key.id(), error = %e, "signature by key manager failed");
                rcgen::Error::RemoteKeyError
            })
    }
}

/// A PKCS#10 CSR (DER) for `key`, signed by it, with an empty subject: the server
/// decides every name in the certificate.
pub fn csr_for_key(key: Arc<dyn KeySigner>) -> Result<Vec<u8>, carapace_core::Error> {
    let signer = RcgenKey::new(key)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&signer)
        .map_err(|e| carapace_core::Error::KeyBackend(format!("CSR signing failed: {e}")))?;
    Ok(csr.der().to_vec())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use carapace_core::TrustDomain;
    use rustls_pki_types::PrivateKeyDer;

    /// A CA of `td` (URI SAN `spiffe://td`) and a server SVID it signed for `id`.
    fn svid(
        td: &str,
        id: &str,
    ) -> (
        TrustBundle,
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    ) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{td}").try_into().unwrap(),
        )];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::default();
        leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        let leaf = leaf.signed_by(&key, &issuer).unwrap();
        let mut bundle = TrustBundle::new(TrustDomain::new(td).unwrap());
        bundle.x509_authorities.push(ca_cert.der().to_vec());
        (
            bundle,
            vec![leaf.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
    }

    /// Serves one TLS handshake with `versions` on a loopback port.
    async fn tls_peer(
        versions: &[&'static rustls::SupportedProtocolVersion],
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> std::net::SocketAddr {
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        addr
    }

    async fn handshake(
        cfg: rustls::ClientConfig,
        addr: std::net::SocketAddr,
    ) -> Result<(), String> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn federation_accepts_tls12_and_the_node_api_does_not() {
        let id: SpiffeId = "spiffe://td.test/spire/server".parse().unwrap();
        let (bundle, chain, key) = svid("td.test", id.as_str());
        let (_tx, rx) = watch::channel(Arc::new(bundle));
        let tls12 = tls_peer(&[&rustls::version::TLS12], chain.clone(), key.clone_key()).await;
        let tls13 = tls_peer(&[&rustls::version::TLS13], chain, key).await;
        for addr in [tls12, tls13] {
            handshake(
                federation_client_config(rx.clone(), id.clone()).unwrap(),
                addr,
            )
            .await
            .unwrap();
        }
        handshake(client_config(rx.clone(), id.clone(), None).unwrap(), tls13)
            .await
            .unwrap();
        let err = handshake(client_config(rx.clone(), id, None).unwrap(), tls12)
            .await
            .unwrap_err();
        assert!(err.contains("ProtocolVersion"), "{err}");
        // The SPIFFE ID is still checked with TLS 1.2.
        let other: SpiffeId = "spiffe://td.test/other".parse().unwrap();
        let err = handshake(federation_client_config(rx, other).unwrap(), tls12)
            .await
            .unwrap_err();
        assert!(
            err.contains("but spiffe://td.test/other was expected"),
            "{err}"
        );
    }
}
