//! The bundle endpoint (`[federation.bundle_endpoint]`): an HTTPS listener serving the
//! local trust domain's bundle to the servers of other trust domains that federate with
//! it (SPIFFE Federation §5), Carapace or SPIRE.
//!
//! `GET /` answers the current bundle in the SPIFFE bundle format
//! ([`TrustBundle::to_spiffe_json`]): the X.509 authorities as `"use": "x509-svid"` keys
//! with `x5c`, the JWT keys as `"use": "jwt-svid"` keys with `kid`, `spiffe_sequence`
//! always (also at 0, which SPIRE leaves out) and `spiffe_refresh_hint` the configured
//! hint. It is built from the CA's bundle at each request, so a prepared authority is
//! served at once; taints are not part of the format and are never served (a tainted
//! authority stays in the bundle until it is revoked, as for the agents). `Content-Type:
//! application/json`, `Cache-Control: no-store` (peers poll at the refresh hint; a cache
//! in between would only delay a rotation). Any other path is 404, a method other than
//! GET or HEAD 405, and the listener is bounded like the health endpoint
//! ([`carapace_common::http`]).
//!
//! TLS 1.2 and 1.3 ([`crate::oidc::https_config`]: SPIFFE Federation §5 asks for
//! Mozilla's intermediate compatibility, and SPIRE peers may offer either), no client
//! authentication, with the certificate of the profile:
//!
//! - `https_spiffe`: the server's own X509-SVID (`spiffe://<td>/spire/server`,
//!   [`crate::server_svid`]), through the same resolver as the node API, so it is renewed
//!   with it (at half life and when the active CA changes).
//! - `https_web`: a certificate and key from files (a public CA's, for peers that check
//!   the URL's host by Web PKI), read at start and reloaded within
//!   [`crate::oidc::RELOAD_INTERVAL`] of a change; a pair that does not load is logged and
//!   the previous one kept ([`crate::oidc::ReloadingCert`], shared with the OIDC endpoint).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use carapace_common::http::{Reply, Routes};
use carapace_core::TrustBundle;
use carapace_tls::FixedCert;

use crate::config::{BundleEndpoint, BundleEndpointProfile, OidcKey};
use crate::oidc::{ReloadingCert, TlsFiles};
use crate::{Error, Result};

/// The settings' section, as messages name it.
const SECTION: &str = "federation.bundle_endpoint";

/// The endpoint's name in logs.
const NAME: &str = "bundle endpoint";

/// The bundle document served at `/`.
#[derive(Debug, Clone)]
pub struct BundleDocument {
    bundle: watch::Receiver<Arc<TrustBundle>>,
    refresh_hint: u64,
}

impl BundleDocument {
    /// The document of the bundles `bundle` carries, with `refresh_hint` as its
    /// `spiffe_refresh_hint` (whole seconds, at least 1).
    pub fn new(bundle: watch::Receiver<Arc<TrustBundle>>, refresh_hint: Duration) -> Self {
        BundleDocument {
            bundle,
            refresh_hint: refresh_hint.as_secs().max(1),
        }
    }

    /// The current bundle as SPIFFE bundle JSON.
    pub fn json(&self) -> std::result::Result<String, carapace_core::Error> {
        let mut bundle = TrustBundle::clone(&self.bundle.borrow());
        bundle.refresh_hint = Some(self.refresh_hint);
        // Not part of the format (to_spiffe_json writes none); cleared so that no later
        // change of the encoder can publish them.
        bundle.tainted_x509_authorities.clear();
        bundle.tainted_jwt_kids.clear();
        bundle.to_spiffe_json()
    }
}

#[async_trait::async_trait]
impl Routes for BundleDocument {
    async fn get(&self, path: &str) -> Reply {
        if path != "/" {
            return Reply::text(404, "not found: the bundle is served at /\n");
        }
        match self.json() {
            Ok(body) => Reply::json(body).with_header("cache-control", "no-store"),
            Err(e) => {
                tracing::error!(error = %e, "{NAME}: the bundle cannot be encoded");
                Reply::text(500, "the bundle cannot be encoded\n")
            }
        }
    }
}

/// The endpoint's files (`https_web`), read and checked, not yet listening: what
/// [`crate::run`] does first, before it writes anything.
#[derive(Debug)]
pub struct Loaded {
    cfg: BundleEndpoint,
    cert: Option<ReloadingCert>,
}

impl Loaded {
    /// Reads and checks the `https_web` certificate and key (as the OIDC endpoint's:
    /// [`crate::oidc::load_tls_files`]); nothing to read for `https_spiffe`.
    pub fn load(cfg: &BundleEndpoint) -> Result<Self> {
        let cert = match &cfg.profile {
            BundleEndpointProfile::HttpsSpiffe => None,
            BundleEndpointProfile::HttpsWeb {
                cert_file,
                key_file,
            } => Some(ReloadingCert::load(
                TlsFiles {
                    section: SECTION,
                    cert_file: cert_file.clone(),
                    key: OidcKey::File(key_file.clone()),
                },
                None,
                NAME,
            )?),
        };
        Ok(Loaded {
            cfg: cfg.clone(),
            cert,
        })
    }

    /// Binds the listener for the bundles `bundle` carries.
    pub async fn bind(self, bundle: watch::Receiver<Arc<TrustBundle>>) -> Result<Endpoint> {
        let listener = TcpListener::bind(self.cfg.bind_address)
            .await
            .map_err(|e| {
                Error::Config(format!(
                    "cannot listen on {} for the bundle endpoint ({SECTION}.bind_address): {e}",
                    self.cfg.bind_address
                ))
            })?;
        Ok(Endpoint {
            listener,
            document: BundleDocument::new(bundle, self.cfg.refresh_hint),
            cfg: self.cfg,
            cert: self.cert,
            reload_interval: crate::oidc::RELOAD_INTERVAL,
        })
    }
}

/// The endpoint, bound and loaded, ready to serve.
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
    cfg: BundleEndpoint,
    cert: Option<ReloadingCert>,
    document: BundleDocument,
    reload_interval: Duration,
}

impl Endpoint {
    /// Reads the files and binds the listener: every failure is here, before anything is
    /// served.
    pub async fn bind(
        cfg: &BundleEndpoint,
        bundle: watch::Receiver<Arc<TrustBundle>>,
    ) -> Result<Self> {
        Loaded::load(cfg)?.bind(bundle).await
    }

    /// Looks at the `https_web` files every `interval` instead of
    /// [`crate::oidc::RELOAD_INTERVAL`] (tests).
    pub fn with_reload_interval(mut self, interval: Duration) -> Self {
        self.reload_interval = interval;
        self
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        self.listener
            .local_addr()
            .map_err(Error::io("the bundle endpoint's address"))
    }

    /// The profile it serves: `https_spiffe` or `https_web`.
    pub fn profile(&self) -> &'static str {
        self.cfg.profile.name()
    }

    /// Serves until `stop` turns true. `server_svid` is the server's own X509-SVID
    /// resolver ([`crate::server_svid::start`]), which `https_spiffe` presents (`https_web`
    /// presents its files, reloading a renewed pair); without it `https_spiffe` logs an
    /// error and serves nothing.
    pub async fn serve(self, server_svid: Option<Arc<FixedCert>>, stop: watch::Receiver<bool>) {
        let Endpoint {
            listener,
            cfg,
            cert,
            document,
            reload_interval,
        } = self;
        let (resolver, reload) = match (cert, server_svid) {
            (Some(cert), _) => {
                let resolver = cert.resolver();
                (
                    resolver,
                    Some(tokio::spawn(cert.reload(reload_interval, stop.clone()))),
                )
            }
            (None, Some(svid)) => (svid, None),
            (None, None) => {
                tracing::error!("{NAME}: https_spiffe without the server's SVID; not serving");
                return;
            }
        };
        let tls = match crate::oidc::https_config(SECTION, resolver) {
            Ok(tls) => Arc::new(tls),
            Err(e) => {
                tracing::error!(error = %e, "{NAME}: not serving");
                return;
            }
        };
        if let Ok(addr) = listener.local_addr() {
            let bundle = document.bundle.borrow().clone();
            let td = bundle.trust_domain();
            match cfg.profile {
                BundleEndpointProfile::HttpsSpiffe => tracing::info!(
                    %addr,
                    profile = cfg.profile.name(),
                    endpoint_spiffe_id = %td.server_id(),
                    refresh_hint = document.refresh_hint,
                    "{NAME}: serving the bundle of {td} at https://{addr}/"
                ),
                BundleEndpointProfile::HttpsWeb { ref cert_file, .. } => tracing::info!(
                    %addr,
                    profile = cfg.profile.name(),
                    cert_file = %cert_file.display(),
                    refresh_hint = document.refresh_hint,
                    "{NAME}: serving the bundle of {td} at https://{addr}/"
                ),
            }
        }
        carapace_common::http::serve(listener, NAME, Some(tls), Arc::new(document), stop).await;
        if let Some(reload) = reload {
            reload.abort();
        }
    }
}
