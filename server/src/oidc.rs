//! The OIDC discovery endpoint (`[oidc_discovery]`): an HTTPS listener that lets generic
//! OpenID Connect relying parties (cloud IAM federation, Vault, API gateways, PyJWT's
//! `PyJWKClient`) verify JWT-SVIDs, without SPIRE's separate oidc-discovery-provider.
//!
//! Under the issuer URL's path (`https://oidc.example.org/td` serves `/td/...`) it serves
//!
//! - `GET /.well-known/openid-configuration`: `issuer`, `jwks_uri` (the issuer followed by
//!   `/keys`), `authorization_endpoint`, `response_types_supported` (`id_token`),
//!   `subject_types_supported` (`public`) and `id_token_signing_alg_values_supported` (the
//!   algorithms of the keys published: ES256 for P-256, ES384 for P-384, RS256 for RSA);
//! - `GET /keys`: the trust domain's JWT keys as a JWK Set in the OIDC form: each key
//!   with `kid`, `kty`, its curve or modulus members, `"use": "sig"` (generic clients keep
//!   only those; the SPIFFE bundle says `jwt-svid`) and `alg`.
//!
//! Both are built from the current trust bundle at each request, so a key the CA
//! publishes is served at once, and carry `Cache-Control: public, max-age` of the
//! bundle's refresh hint, at most [`MAX_CACHE_AGE`]. Anything else is 404, a method other
//! than GET or HEAD 405, and the listener is bounded like the health endpoint
//! ([`carapace_common::http`]). It serves public keys only, over TLS (1.2 or 1.3,
//! rustls's safe defaults) with the configured certificate; no client authentication.
//!
//! The certificate and key files are read at start (the key: a regular file owned by
//! the server's user with no group or other access) and must belong together; a changed
//! pair is picked up by [`Endpoint::serve`] within [`RELOAD_INTERVAL`] (an ACME client
//! renewing the certificate needs no restart), a broken one is logged and the previous
//! pair kept. With `key_id` instead of `key_file` the key is in the server's key manager
//! (in the HSM with pkcs11: TLS handshakes are signed there); `carapace-server oidc csr`
//! creates it and prints a CSR for the issuer's host ([`csr`]), and only the certificate
//! file is watched.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use carapace_common::http::{Reply, Routes};
use carapace_core::TrustBundle;
use carapace_core::jose::{Algorithm, Curve, PublicKey};
use carapace_core::plugin::{KeyManager, KeySigner};
use rustls::sign::CertifiedKey;

use crate::config::{OidcDiscovery, OidcKey};
use crate::{Error, Result};

/// The longest `Cache-Control: max-age` of the documents, in seconds.
pub const MAX_CACHE_AGE: u64 = 300;

/// How often the certificate and key files are looked at for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// The largest certificate chain or key file read.
const MAX_PEM_BYTES: u64 = 256 * 1024;

/// `authorization_endpoint`, which the OIDC discovery standard requires: there is no
/// interactive authorization here (JWT-SVIDs are issued to workloads), so, as Kubernetes'
/// service account issuer does, a URN that says so; clients that parse the member as a
/// URI accept it, where SPIRE's empty string trips some of them.
pub const AUTHORIZATION_ENDPOINT: &str = "urn:carapace:programmatic_authorization";

/// Checks an issuer URL as OIDC discovery requires (`https`, a host, no query or
/// fragment) and as Carapace serves it (no user information, no trailing slash: the
/// documents live under `<issuer>/.well-known/...` and `<issuer>/keys`). The error
/// completes "`<issuer>` ...".
pub fn check_issuer(issuer: &str) -> std::result::Result<(), String> {
    let Some(rest) = issuer.strip_prefix("https://") else {
        return Err("is not an https URL (OIDC requires https://HOST[/PATH])".into());
    };
    if let Some(c) = issuer.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "holds {c:?}: write the URL in ASCII without spaces (punycode and percent-encoding)"
        ));
    }
    if issuer.contains('?') {
        return Err("has a query: an issuer has none".into());
    }
    if issuer.contains('#') {
        return Err("has a fragment: an issuer has none".into());
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err("has user information: an issuer has none".into());
    }
    // HOST, HOST:PORT, [IPv6] or [IPv6]:PORT.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !authority.ends_with(']') => (host, Some(port)),
        _ => (authority, None),
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if let Some(port) = port {
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return Err(format!("has a bad port {port:?}"));
        }
    }
    let name_ok = if let Some(ip) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        ip.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !name_ok {
        return Err(format!("has a bad host {host:?}"));
    }
    if path.ends_with('/') {
        return Err("ends with a slash: leave it out (tokens' iss must match it exactly)".into());
    }
    Ok(())
}

/// The documents, from the current trust bundle.
#[derive(Debug, Clone)]
pub struct Discovery {
    issuer: String,
    /// The issuer's path (`""` or `/td`), under which the documents are served.
    prefix: String,
    bundle: watch::Receiver<Arc<TrustBundle>>,
}

impl Discovery {
    /// The documents of `issuer` (checked by [`check_issuer`]) for the bundles `bundle`
    /// carries.
    pub fn new(issuer: &str, bundle: watch::Receiver<Arc<TrustBundle>>) -> Self {
        let rest = issuer.strip_prefix("https://").unwrap_or(issuer);
        let prefix = rest.find('/').map_or("", |i| &rest[i..]).to_owned();
        Discovery {
            issuer: issuer.to_owned(),
            prefix,
            bundle,
        }
    }

    /// The path of the discovery document.
    pub fn configuration_path(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.prefix)
    }

    /// The path of the JWK Set.
    pub fn keys_path(&self) -> String {
        format!("{}/keys", self.prefix)
    }

    /// The published keys with their algorithms; a key that is not a JWT key Carapace
    /// can describe, or a repeated kid, is left out (and logged).
    fn keys(&self, bundle: &TrustBundle) -> Vec<(String, PublicKey, Algorithm)> {
        let mut out: Vec<(String, PublicKey, Algorithm)> = Vec::new();
        for key in &bundle.jwt_authorities {
            if out.iter().any(|(kid, _, _)| *kid == key.kid) {
                tracing::warn!(kid = %key.kid, "a JWT key id appears twice in the bundle; the first is published");
                continue;
            }
            match PublicKey::from_spki_der(&key.public_key_der) {
                Ok(public) => {
                    let alg = algorithm(&public);
                    out.push((key.kid.clone(), public, alg));
                }
                Err(e) => {
                    tracing::warn!(kid = %key.kid, error = %e, "a JWT key of the bundle is left out of the OIDC JWK Set");
                }
            }
        }
        out
    }

    /// `/.well-known/openid-configuration`.
    pub fn configuration(&self) -> Value {
        let bundle = self.bundle.borrow().clone();
        let mut algs: Vec<Algorithm> = self.keys(&bundle).into_iter().map(|k| k.2).collect();
        algs.sort();
        algs.dedup();
        json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}/keys", self.issuer),
            "authorization_endpoint": AUTHORIZATION_ENDPOINT,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported":
                algs.iter().map(|a| a.name()).collect::<Vec<_>>(),
        })
    }

    /// `/keys`: the JWK Set, each key with `"use": "sig"` and its `alg`.
    pub fn jwks(&self) -> Value {
        let bundle = self.bundle.borrow().clone();
        let keys: Vec<Value> = self
            .keys(&bundle)
            .into_iter()
            .map(|(kid, public, alg)| {
                let mut jwk = public.to_jwk(&kid, "sig");
                jwk.insert("alg".into(), Value::String(alg.name().into()));
                Value::Object(jwk)
            })
            .collect();
        json!({ "keys": keys })
    }

    fn max_age(&self) -> u64 {
        self.bundle
            .borrow()
            .refresh_hint
            .map_or(MAX_CACHE_AGE, |h| h.min(MAX_CACHE_AGE))
    }
}

/// The algorithm a JWT-SVID key of this type signs with.
fn algorithm(key: &PublicKey) -> Algorithm {
    match key {
        PublicKey::Ec {
            curve: Curve::P256, ..
        } => Algorithm::ES256,
        PublicKey::Ec {
            curve: Curve::P384, ..
        } => Algorithm::ES384,
        PublicKey::Rsa { .. } => Algorithm::RS256,
    }
}

#[async_trait::async_trait]
impl Routes for Discovery {
    async fn get(&self, path: &str) -> Reply {
        let doc = if path == self.configuration_path() {
            self.configuration()
        } else if path == self.keys_path() {
            self.jwks()
        } else {
            return Reply::text(
                404,
                format!(
                    "not found: {} and {} are served\n",
                    self.configuration_path(),
                    self.keys_path()
                ),
            );
        };
        match serde_json::to_vec(&doc) {
            Ok(body) => Reply::json(body).with_header(
                "cache-control",
                format!("public, max-age={}", self.max_age()),
            ),
            Err(e) => Reply::text(500, format!("cannot encode the document: {e}\n")),
        }
    }
}

/// A TLS certificate chain and its key as an endpoint's settings name them, shared by
/// the OIDC discovery endpoint and the federation bundle endpoint
/// ([`crate::federation::endpoint`]): the chain from a PEM file, the key from a PEM file
/// or the key manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The settings' section, which messages name the keys under (`oidc_discovery`,
    /// `federation.bundle_endpoint`).
    pub section: &'static str,
    /// The certificate chain, PEM, leaf first.
    pub cert_file: PathBuf,
    /// The key of its first certificate.
    pub key: OidcKey,
}

impl TlsFiles {
    /// The key file, when the key is one.
    pub fn key_file(&self) -> Option<&Path> {
        match &self.key {
            OidcKey::File(p) => Some(p),
            OidcKey::KeyManager(_) => None,
        }
    }

    /// The files, for [`carapace_common::check_named_files`]: the chain (read) and the
    /// key (a secret).
    pub fn named_files(&self) -> Vec<carapace_core::files::NamedFile> {
        use carapace_core::files::{FileUse, NamedFile};
        let mut files = vec![NamedFile::new("cert_file", &self.cert_file, FileUse::Read)];
        if let Some(key_file) = self.key_file() {
            files.push(NamedFile::new("key_file", key_file, FileUse::Secret));
        }
        files
    }
}

/// The OIDC endpoint's files.
fn tls_files(cfg: &OidcDiscovery) -> TlsFiles {
    TlsFiles {
        section: "oidc_discovery",
        cert_file: cfg.cert_file.clone(),
        key: cfg.key.clone(),
    }
}

/// What identifies the certificate and key files' contents, to notice a renewal: each
/// file's inode, size and change times (a file renamed into place is a new inode even when
/// its times fall in the same clock tick as the old one's).
type Stamp = [Option<(u64, u64, u64, i64, i64, i64, i64)>; 2];

fn stamp(files: &TlsFiles) -> Stamp {
    let of = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            (
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            )
        })
    };
    [of(&files.cert_file), files.key_file().and_then(of)]
}

/// Reads `cert_file`'s PEM chain, DER each, leaf first.
fn read_chain(
    files: &TlsFiles,
) -> std::result::Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let cert_what = format!("{}.cert_file", files.section);
    let cert_path = files.cert_file.display();
    let pem = carapace_common::read_operator_file(&files.cert_file, &cert_what, MAX_PEM_BYTES)?;
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_what} {cert_path}: not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "{cert_what} {cert_path}: holds no CERTIFICATE block"
        ));
    }
    Ok(chain)
}

/// Reads the OIDC endpoint's certificate and key ([`load_tls_files`]).
pub fn load_certified_key(
    cfg: &OidcDiscovery,
    key: Option<&Arc<dyn KeySigner>>,
) -> std::result::Result<Arc<CertifiedKey>, String> {
    load_tls_files(&tls_files(cfg), key)
}

/// Reads `cert_file` and the key into a certified key: `key_file` (checked to be a
/// regular file owned by this user with no group or other access), or `key`, the key
/// manager's key `key_id` names. The key must be the certificate's. Messages name the
/// setting (`<section>.cert_file`) and the path.
pub fn load_tls_files(
    files: &TlsFiles,
    key: Option<&Arc<dyn KeySigner>>,
) -> std::result::Result<Arc<CertifiedKey>, String> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject as _;
    let cert_what = format!("{}.cert_file", files.section);
    let cert_path = files.cert_file.display();
    let chain = read_chain(files)?;
    let key_file = match &files.key {
        OidcKey::File(p) => p,
        OidcKey::KeyManager(id) => {
            let key = key.ok_or_else(|| {
                format!(
                    "{}.key_id {id}: the key manager's key was not loaded",
                    files.section
                )
            })?;
            let leaf = carapace_core::x509svid::public_key_of(&chain[0])
                .map_err(|e| format!("{cert_what} {cert_path}: {e}"))?;
            if leaf != key.public_key_der() {
                return Err(format!(
                    "{cert_what} {cert_path}: its first certificate is not for the key \
                     {id} in the key manager (get a certificate for the CSR `carapace-server \
                     oidc csr` prints)"
                ));
            }
            let chain: Vec<Vec<u8>> = chain.iter().map(|c| c.to_vec()).collect();
            return Ok(carapace_tls::certified_key(&chain, key.clone()));
        }
    };
    let key_what = format!("{}.key_file", files.section);
    let key_path = key_file.display();
    let meta = std::fs::metadata(key_file)
        .map_err(|e| format!("{key_what} {key_path}: cannot read: {e}"))?;
    carapace_core::files::check_private(&key_what, key_file, &meta)?;
    let me = carapace_common::euid();
    if meta.uid() != me {
        return Err(format!(
            "{key_what} {key_path} is owned by uid {}, not by the server's user (uid {me}): \
             whoever owns it can replace the key (chown it to the server's user)",
            meta.uid()
        ));
    }
    let pem = zeroize::Zeroizing::new(carapace_common::read_operator_file(
        key_file,
        &key_what,
        MAX_PEM_BYTES,
    )?);
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        format!("{key_what} {key_path}: not a PEM private key (PKCS#8, or PKCS#1/SEC1): {e}")
    })?;
    let certified = CertifiedKey::from_der(chain, key, &carapace_tls::provider()).map_err(|e| {
        match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{key_what} {key_path}: the key is not the key of the first certificate of {cert_what} {cert_path}"
            ),
            other => format!("{key_what} {key_path}: unusable: {other}"),
        }
    })?;
    Ok(Arc::new(certified))
}

/// The key manager's TLS key when `key_id` names one (None for a key file).
pub async fn key_of(
    cfg: &OidcDiscovery,
    km: &Arc<dyn KeyManager>,
) -> Result<Option<Arc<dyn KeySigner>>> {
    let OidcKey::KeyManager(id) = &cfg.key else {
        return Ok(None);
    };
    km.get_key(id).await.map(Some).map_err(|e| {
        Error::Config(format!(
            "oidc_discovery.key_id {id}: not in the {} key manager ({e}): create it and a CSR \
             for the certificate with `carapace-server oidc csr --config <this file>`",
            km.name()
        ))
    })
}

/// `carapace-server oidc csr`: the key `key_id` in `km` (generated there as `key_type`
/// when it does not exist yet; an existing one is reused) and a PKCS#10 CSR, PEM, for
/// `dns_names` signed by it. Returns the CSR and whether the key is new.
pub async fn csr(
    km: &Arc<dyn KeyManager>,
    key_id: &str,
    key_type: carapace_core::KeyType,
    dns_names: &[String],
) -> Result<(String, bool)> {
    crate::config::check_oidc_key_id(key_id)
        .map_err(|e| Error::InvalidArgument(format!("--key-id: {e}")))?;
    if dns_names.is_empty() {
        return Err(Error::InvalidArgument(
            "--dns-name: at least one is needed".into(),
        ));
    }
    for name in dns_names {
        carapace_core::entry::validate_dns_name(name)
            .map_err(|e| Error::InvalidArgument(format!("--dns-name {name:?}: {e}")))?;
    }
    let (key, created) = match km.get_key(key_id).await {
        Ok(key) => (key, false),
        Err(carapace_core::Error::KeyNotFound(_)) => {
            (km.generate_key(key_id, key_type).await?, true)
        }
        Err(e) => return Err(e.into()),
    };
    let mut params = rcgen::CertificateParams::new(dns_names.to_vec())
        .map_err(|e| Error::InvalidArgument(format!("--dns-name: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, dns_names[0].clone());
    let signing = carapace_tls::RcgenKey::new(key)?;
    let csr = params
        .serialize_request(&signing)
        .map_err(|e| Error::Ca(format!("signing the CSR failed: {e}")))?;
    let pem = csr
        .pem()
        .map_err(|e| Error::Ca(format!("encoding the CSR: {e}")))?;
    Ok((pem, created))
}

/// For `validate`: the OIDC endpoint's files ([`check_tls_files`]).
pub fn check_files(cfg: &OidcDiscovery) -> Vec<String> {
    check_tls_files(&tls_files(cfg))
}

/// For `validate`: the files' checks ([`carapace_common::check_named_file`]) and, when
/// they pass, what the server checks at start: the chain parses, the key is private to
/// this user and matches the certificate. Reads the key, as the server will.
pub fn check_tls_files(files: &TlsFiles) -> Vec<String> {
    let problems = carapace_common::check_named_files(files.section, &files.named_files());
    if !problems.is_empty() {
        return problems;
    }
    // A key manager key is not opened here (validate opens no key manager): the chain
    // alone is checked, and its match with the key at start.
    let checked = match files.key {
        OidcKey::File(_) => load_tls_files(files, None).map(|_| ()),
        OidcKey::KeyManager(_) => read_chain(files).map(|_| ()),
    };
    match checked {
        Ok(()) => Vec::new(),
        Err(e) => vec![e],
    }
}

/// The TLS configuration of a public HTTPS endpoint presenting `cert` (swappable): TLS
/// 1.2 and 1.3 with rustls's safe defaults (public relying parties and SPIFFE federation
/// peers are not all on 1.3; both versions with forward-secret AEAD suites only, as
/// Mozilla's "intermediate" profile), no client authentication, ALPN `http/1.1`.
/// `section` names the endpoint's settings in the (unlikely) error.
pub fn https_config(
    section: &str,
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(carapace_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("{section}: TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// A certificate and key read from files and swapped when the files change, as a
/// rustls certificate resolver ([`ReloadingCert::resolver`]): what the OIDC endpoint
/// and the bundle endpoint's `https_web` profile present.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    key: Option<Arc<dyn KeySigner>>,
    cert: Arc<carapace_tls::FixedCert>,
    loaded: Stamp,
    endpoint: &'static str,
}

impl ReloadingCert {
    /// Reads and checks the certificate and key ([`load_tls_files`]); `key` is the key
    /// manager's key when `files` names one ([`key_of`]). `endpoint` names the endpoint
    /// in logs.
    pub fn load(
        files: TlsFiles,
        key: Option<Arc<dyn KeySigner>>,
        endpoint: &'static str,
    ) -> Result<Self> {
        // Taken before reading: a change while reading is seen as a change.
        let loaded = stamp(&files);
        let certified = load_tls_files(&files, key.as_ref()).map_err(Error::Config)?;
        Ok(ReloadingCert {
            files,
            key,
            cert: Arc::new(carapace_tls::FixedCert(RwLock::new(certified))),
            loaded,
            endpoint,
        })
    }

    /// The resolver presenting the current pair.
    pub fn resolver(&self) -> Arc<carapace_tls::FixedCert> {
        self.cert.clone()
    }

    /// Until `stop` turns true, looks at the files every `interval` and swaps in the
    /// certificate and key when they changed; keeps the previous pair (and says why)
    /// when the new one does not load.
    pub async fn reload(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let ReloadingCert {
            files,
            key,
            cert,
            loaded: mut last,
            endpoint,
        } = self;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let now = stamp(&files);
            if now == last {
                continue;
            }
            let (files2, key2) = (files.clone(), key.clone());
            match tokio::task::spawn_blocking(move || load_tls_files(&files2, key2.as_ref())).await
            {
                Ok(Ok(certified)) => {
                    *cert.0.write().unwrap_or_else(|p| p.into_inner()) = certified;
                    last = now;
                    tracing::info!(cert_file = %files.cert_file.display(), "{endpoint}: loaded the renewed certificate");
                }
                Ok(Err(e)) => {
                    // Tried again at the next change (or the next tick, if the files are
                    // still being written).
                    tracing::warn!(error = %e, "{endpoint}: keeping the previous certificate");
                    last = now;
                }
                Err(e) => tracing::warn!(error = %e, "{endpoint}: reloading failed"),
            }
        }
    }
}

/// The endpoint's certificate and key, read and checked, not yet listening: what
/// [`crate::run`] does first, before it writes anything.
#[derive(Debug)]
pub struct Loaded {
    cfg: OidcDiscovery,
    cert: ReloadingCert,
}

impl Loaded {
    /// Reads and checks the certificate and key ([`load_certified_key`]); `key` is the
    /// key manager's key when `key_id` names one ([`key_of`]).
    pub fn load(cfg: &OidcDiscovery, key: Option<Arc<dyn KeySigner>>) -> Result<Self> {
        Ok(Loaded {
            cfg: cfg.clone(),
            cert: ReloadingCert::load(tls_files(cfg), key, "OIDC discovery endpoint")?,
        })
    }

    /// Binds the listener for the bundles `bundle` carries.
    pub async fn bind(self, bundle: watch::Receiver<Arc<TrustBundle>>) -> Result<Endpoint> {
        let tls = Arc::new(https_config("oidc_discovery", self.cert.resolver())?);
        let listener = TcpListener::bind(self.cfg.bind_address).await.map_err(|e| {
            Error::Config(format!(
                "cannot listen on {} for the OIDC discovery endpoint (oidc_discovery.bind_address): {e}",
                self.cfg.bind_address
            ))
        })?;
        Ok(Endpoint {
            listener,
            discovery: Discovery::new(&self.cfg.issuer, bundle),
            cert: self.cert,
            tls,
            reload_interval: RELOAD_INTERVAL,
        })
    }
}

/// The endpoint, bound and loaded, ready to serve.
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
    cert: ReloadingCert,
    tls: Arc<rustls::ServerConfig>,
    discovery: Discovery,
    reload_interval: Duration,
}

impl Endpoint {
    /// Reads the certificate and key and binds the listener: every failure is here, before
    /// anything is served.
    pub async fn bind(
        cfg: &OidcDiscovery,
        bundle: watch::Receiver<Arc<TrustBundle>>,
    ) -> Result<Self> {
        Loaded::load(cfg, None)?.bind(bundle).await
    }

    /// Looks at the files every `interval` instead of [`RELOAD_INTERVAL`] (tests).
    pub fn with_reload_interval(mut self, interval: Duration) -> Self {
        self.reload_interval = interval;
        self
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        self.listener
            .local_addr()
            .map_err(Error::io("the OIDC discovery listener's address"))
    }

    /// Serves until `stop` turns true, reloading a renewed certificate and key.
    pub async fn serve(self, stop: watch::Receiver<bool>) {
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(
                %addr,
                issuer = %self.discovery.issuer,
                "OIDC discovery endpoint: {} and {}",
                self.discovery.configuration_path(),
                self.discovery.keys_path()
            );
        }
        let reload = tokio::spawn(self.cert.reload(self.reload_interval, stop.clone()));
        carapace_common::http::serve(
            self.listener,
            "OIDC discovery endpoint",
            Some(self.tls),
            Arc::new(self.discovery),
            stop,
        )
        .await;
        reload.abort();
    }
}
