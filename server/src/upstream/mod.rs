//! Upstream authorities. Here, those whose root key is a [`KeySigner`] held by the
//! operator: `disk` (PKCS#8 PEM files) and `pkcs11` (a key and certificate object in an
//! HSM token). [`carapace`]: another Carapace server of the trust domain above this one
//! (nested servers).
//!
//! Each server of the trust domain generates its own intermediate CA key in its
//! KeyManager and has the root certify it ([`LocalRoot::mint_x509_ca`]); the bundle
//! carries the root only, so SVIDs from every server verify against one bundle.
//! [`make_root_certificate`] is what `carapace-server upstream init` uses to create the
//! root certificate, signed by the root key where it lives.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, DistinguishedName, DnType, Issuer};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use carapace_core::plugin::{KeySigner, MintRequest, MintedCa, UpstreamAuthority};
use carapace_core::{TrustDomain, x509svid};
use carapace_tls::RcgenKey;

use crate::ca::ca_params;
use crate::{Error, Result};

pub mod carapace;

/// Settings of the `disk` upstream authority: the root CA's certificate and PKCS#8 key as
/// PEM files. Relative paths resolve against the data directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskUpstreamConfig {
    /// The root certificate (PEM).
    pub cert_file: PathBuf,
    /// The root private key (PKCS#8 PEM, mode 0600).
    pub key_file: PathBuf,
}

impl DiskUpstreamConfig {
    /// The two paths, resolved against `data_dir`.
    pub fn paths_in(&self, data_dir: &Path) -> (PathBuf, PathBuf) {
        (
            data_dir.join(&self.cert_file),
            data_dir.join(&self.key_file),
        )
    }
}

/// Default `key_label` of the `pkcs11` upstream authority.
pub const DEFAULT_ROOT_LABEL: &str = "carapace-root";

/// A root CA: its certificate and a signer for its key, which stays in its backend.
pub struct LocalRoot {
    name: &'static str,
    root_der: Vec<u8>,
    not_after: i64,
    fingerprint: String,
    issuer: Arc<Issuer<'static, RcgenKey>>,
    may_block: bool,
}

impl std::fmt::Debug for LocalRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRoot")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn upstream_err(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("upstream_authority.{name}: {msg}"))
}

impl LocalRoot {
    /// Checks that `root_der` is a CA certificate whose public key is `signer`'s and that
    /// has not expired at `now`, and wraps them.
    pub fn new(
        name: &'static str,
        root_der: Vec<u8>,
        signer: Arc<dyn KeySigner>,
        now: i64,
    ) -> Result<Self> {
        x509svid::check_signing_cert(&root_der)
            .map_err(|e| upstream_err(name, format!("the root certificate is not a CA: {e}")))?;
        let spki = x509svid::public_key_of(&root_der)?;
        if spki != signer.public_key_der() {
            return Err(upstream_err(
                name,
                format!(
                    "the root certificate does not belong to the root key {:?}",
                    signer.id()
                ),
            ));
        }
        let (_, not_after) = x509svid::validity_of(&root_der)?;
        if not_after <= now {
            return Err(upstream_err(
                name,
                "the root certificate has expired; create a new root (carapace-server upstream init)",
            ));
        }
        let may_block = signer.may_block();
        let issuer = Issuer::from_ca_cert_der(&root_der.as_slice().into(), RcgenKey::new(signer)?)
            .map_err(|e| upstream_err(name, format!("the root certificate is unusable: {e}")))?;
        Ok(LocalRoot {
            name,
            fingerprint: hex::encode(Sha256::digest(&root_der)),
            root_der,
            not_after,
            issuer: Arc::new(issuer),
            may_block,
        })
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }
}

#[async_trait::async_trait]
impl UpstreamAuthority for LocalRoot {
    fn name(&self) -> &str {
        self.name
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    async fn mint_x509_ca(
        &self,
        req: &MintRequest,
    ) -> std::result::Result<MintedCa, carapace_core::Error> {
        // Past the end of `i64` means "as long as the root allows".
        let not_after = carapace_core::limits::unix_plus(req.not_before, req.ttl)
            .unwrap_or(i64::MAX)
            .min(self.not_after);
        if not_after <= req.not_before + crate::ca::BACKDATE {
            return Err(carapace_core::Error::KeyBackend(format!(
                "upstream_authority.{}: the root certificate expires too soon to certify a CA",
                self.name
            )));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, req.country.clone());
        dn.push(DnType::OrganizationName, req.organization.clone());
        dn.push(DnType::CommonName, req.common_name.clone());
        // Path length 0 unless the server serves downstream servers: the intermediate
        // signs SVIDs only, never another CA.
        let mut params = ca_params(
            &req.trust_domain,
            dn,
            BasicConstraints::Constrained(req.path_len),
            req.not_before,
            not_after,
        )
        .map_err(|e| carapace_core::Error::KeyBackend(e.to_string()))?;
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::SubjectPublicKeyInfo::from_der(&req.public_key_der).map_err(|e| {
            carapace_core::Error::KeyBackend(format!("CA public key unreadable: {e}"))
        })?;
        let issuer = self.issuer.clone();
        let sign = move || {
            params
                .signed_by(&key, issuer.as_ref())
                .map(|c| c.der().to_vec())
                .map_err(|e| {
                    carapace_core::Error::KeyBackend(format!("the root could not sign: {e}"))
                })
        };
        let cert = if self.may_block {
            tokio::task::spawn_blocking(sign)
                .await
                .map_err(|e| carapace_core::Error::KeyBackend(format!("signing task: {e}")))??
        } else {
            sign()?
        };
        tracing::info!(
            upstream = self.name,
            not_after,
            "the upstream root certified a new X.509 CA"
        );
        Ok(MintedCa {
            chain: vec![cert],
            roots: vec![self.root_der.clone()],
        })
    }

    async fn x509_roots(&self) -> std::result::Result<Vec<Vec<u8>>, carapace_core::Error> {
        Ok(vec![self.root_der.clone()])
    }

    /// A root in files or an HSM keeps no bundle: JWT keys stay in the server's own.
    async fn publish_jwt_key(
        &self,
        _key: &carapace_core::JwtKey,
    ) -> std::result::Result<Option<carapace_core::TrustBundle>, carapace_core::Error> {
        Ok(None)
    }

    /// A root in files or an HSM keeps no bundle to follow.
    async fn next_bundle(
        &self,
        _known_sequence: u64,
    ) -> std::result::Result<Option<carapace_core::TrustBundle>, carapace_core::Error> {
        Ok(None)
    }
}

/// Creates a self-signed root CA certificate for `td` over `signer`'s key, valid for
/// `ttl` from `now`. The signature is made where the key lives.
pub fn make_root_certificate(
    td: &TrustDomain,
    signer: Arc<dyn KeySigner>,
    common_name: &str,
    organization: &str,
    ttl: Duration,
    now: i64,
) -> Result<Vec<u8>> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::CommonName, common_name);
    let params = ca_params(
        td,
        dn,
        BasicConstraints::Unconstrained,
        now - crate::ca::BACKDATE,
        carapace_core::limits::unix_plus(now, ttl)
            .filter(|t| *t <= carapace_core::limits::MAX_UNIX_TIME)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "root ttl {} from now ends after 9999-12-31, the last date X.509 can express",
                    carapace_core::limits::describe(ttl)
                ))
            })?,
    )?;
    let key = RcgenKey::new(signer)?;
    Ok(params
        .self_signed(&key)
        .map_err(|e| Error::Ca(format!("self-signing the root failed: {e}")))?
        .der()
        .to_vec())
}
