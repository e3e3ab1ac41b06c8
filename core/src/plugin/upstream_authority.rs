use std::fmt;
use std::time::Duration;

use crate::error::Error;
use crate::{JwtKey, TrustBundle, TrustDomain};

/// What a server asks its upstream authority to certify: its own new X.509 CA key.
#[derive(Debug, Clone)]
pub struct MintRequest {
    /// The trust domain the CA will issue for; the upstream certificate names it in a URI
    /// SAN (`spiffe://<trust domain>`).
    pub trust_domain: TrustDomain,
    /// The CA's public key, an X.509 SubjectPublicKeyInfo in DER. The private key stays in
    /// the server's KeyManager.
    pub public_key_der: Vec<u8>,
    /// A PKCS#10 CSR (DER) for the same key, signed by it, with the URI SAN
    /// `spiffe://<trust domain>`: proof of possession for an authority that is another
    /// process (the `carapace` upstream sends it to the server above).
    pub csr_der: Vec<u8>,
    /// The CA's pathLenConstraint: how many tiers of CAs it may certify below itself
    /// (0: it signs SVIDs only). A server that serves downstream servers asks for more.
    pub path_len: u8,
    /// Wanted lifetime; the upstream caps it at its own certificate's notAfter.
    pub ttl: Duration,
    /// Subject common name for the CA certificate.
    pub common_name: String,
    /// Subject organization.
    pub organization: String,
    /// Subject country.
    pub country: String,
    /// NotBefore, unix seconds (already backdated by the caller).
    pub not_before: i64,
}

/// A CA certificate minted by an upstream authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedCa {
    /// The new CA certificate first, then any upstream intermediates (never the root),
    /// DER each. X509-SVID chains carry all of them after the leaf.
    pub chain: Vec<Vec<u8>>,
    /// The upstream root certificates, DER each: they, not the minted CA, go into the
    /// trust bundle.
    pub roots: Vec<Vec<u8>>,
}

/// An authority above the server's CA: the trust domain's root, kept outside the server
/// (an HSM token, PEM files an operator controls). Several servers of one trust domain
/// share it: each has its own intermediate CA, and the bundle holds only the root, so
/// SVIDs from every server verify against one bundle.
///
/// Contract:
/// 1. `mint_x509_ca` certifies exactly `request.public_key_der` as a CA for
///    `request.trust_domain` with at most `request.path_len` CA tiers below it, valid no
///    longer than the root;
/// 2. the root's private key never leaves the authority's backend;
/// 3. `x509_roots` returns what `mint_x509_ca` would put in `roots`, without signing.
#[async_trait::async_trait]
pub trait UpstreamAuthority: Send + Sync + fmt::Debug {
    /// The plugin name, as in the configuration (`disk`, `pkcs11`, `carapace`).
    fn name(&self) -> &str;
    /// A fingerprint of the authority: changes exactly when CAs minted before must no
    /// longer be used (another root, another upstream trust domain), so a server can
    /// retire them at once. An authority whose roots rotate on their own schedule (the
    /// `carapace` upstream) must keep it stable across that rotation.
    fn fingerprint(&self) -> String;
    /// Mints a CA certificate for the server's new CA key.
    async fn mint_x509_ca(&self, request: &MintRequest) -> Result<MintedCa, Error>;
    /// The root certificates, DER each.
    async fn x509_roots(&self) -> Result<Vec<Vec<u8>>, Error>;
    /// Adds this server's JWT signing key to the bundle the authority serves every tier
    /// of the trust domain, and returns that bundle; `None` when the authority keeps no
    /// bundle (a root in files or an HSM): the key is in this server's bundle only.
    async fn publish_jwt_key(&self, key: &JwtKey) -> Result<Option<TrustBundle>, Error>;
    /// Waits until the authority's bundle has a sequence other than `known_sequence`
    /// (0: none held) and returns it; `None` at once when the authority keeps no bundle
    /// (nothing to follow). The caller retries errors.
    async fn next_bundle(&self, known_sequence: u64) -> Result<Option<TrustBundle>, Error>;
}
