//! SPIFFE federation: the local trust domain's bundle served to peers (the bundle
//! endpoint), and the bundles of other trust domains fetched from theirs.
//!
//! A *relationship* is one-way (SPIFFE Federation §6): "we trust trust domain X, whose
//! bundle endpoint is at URL, authenticated with profile P". Relationships and the
//! bundles they bring live in the datastore, so every server sharing it sees the same;
//! relationships named in the config file are written there at start.
//!
//! The types here are shared by the datastore (`datastore::federation`), the admin API
//! and the refresh loop.

pub mod bundles;
pub mod endpoint;
pub mod fetch;
pub mod refresh;

use carapace_common::http::HttpsUrl;
use carapace_core::{SpiffeId, TrustBundle, TrustDomain};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;

/// How a peer's bundle endpoint is authenticated (SPIFFE Federation §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// `https_web`: the endpoint's certificate is checked by Web PKI (RFC 6125, the
    /// URL's host) against `roots_pem` when set, else the system's trust store.
    HttpsWeb {
        /// CA certificates (PEM) trusted for this endpoint only; `None`: the system's.
        roots_pem: Option<String>,
    },
    /// `https_spiffe`: the endpoint presents an X509-SVID with this SPIFFE ID, checked
    /// against the peer trust domain's bundle (the bootstrap bundle for the first fetch,
    /// then always the latest fetched one, §5.2.2.4).
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint must present (a Carapace or SPIRE server:
        /// `spiffe://<td>/spire/server`).
        endpoint_id: SpiffeId,
    },
}

impl Profile {
    /// The profile's name as the specification writes it.
    pub fn name(&self) -> &'static str {
        match self {
            Profile::HttpsWeb { .. } => "https_web",
            Profile::HttpsSpiffe { .. } => "https_spiffe",
        }
    }
}

/// Where a relationship was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config file (`[[federation.federates_with]]`): written at every start; the
    /// admin API refuses to change or delete it.
    Config,
    /// The admin API (`carapace-server federation create`).
    Api,
}

impl Source {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
        }
    }
}

/// A federation relationship: the local trust domain trusts `trust_domain`'s bundle, as
/// fetched from `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    /// The foreign trust domain (never the local one).
    pub trust_domain: TrustDomain,
    /// The bundle endpoint URL: `https://`, no user info, no fragment.
    pub url: String,
    /// How the endpoint is authenticated.
    pub profile: Profile,
    /// Where it was defined.
    pub source: Source,
}

/// The longest bundle endpoint URL accepted.
pub const MAX_URL_BYTES: usize = 2048;

/// Checks a bundle endpoint URL (SPIFFE Federation §5.2.1.1) wherever one comes in (the
/// config file, the admin API and CLI) by the parser the fetcher uses
/// ([`HttpsUrl::parse`]: `https://` only, printable ASCII, no user info, no fragment, a
/// DNS name or IP address and a port from 1 to 65535), so that every URL accepted can be
/// fetched; also required and at most [`MAX_URL_BYTES`]. Errors quote the URL and name
/// what is wrong.
pub fn check_endpoint_url(url: &str) -> Result<HttpsUrl, String> {
    if url.is_empty() {
        return Err("is required".into());
    }
    if url.len() > MAX_URL_BYTES {
        return Err(format!(
            "{}: longer than {MAX_URL_BYTES} bytes",
            carapace_core::jose::shown(url)
        ));
    }
    HttpsUrl::parse(url)
}

/// Checks that `bundle` is `td`'s as far as its X.509 authorities tell (a bundle
/// document names no trust domain): every authority that carries a SPIFFE ID (a URI SAN
/// `spiffe://td`, as Carapace's and SPIRE's CAs do, X509-SVID §3) must carry `td`'s; one
/// that carries none (an enterprise root) passes. For every bundle of a foreign trust
/// domain before it is stored: fetched, or set by an operator (`bundle set`, a bootstrap
/// bundle). The error names the authority and the trust domain it names.
pub(crate) fn check_authorities(td: &TrustDomain, bundle: &TrustBundle) -> Result<(), String> {
    for (i, der) in bundle.x509_authorities.iter().enumerate() {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| format!("X.509 authority {i} does not parse: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("X.509 authority {i} has a bad subjectAltName: {e}"))?;
        let uris = san.iter().flat_map(|san| {
            san.value.general_names.iter().filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
        });
        for uri in uris {
            let Ok(id) = uri.parse::<SpiffeId>() else {
                continue;
            };
            if !id.is_member_of(td) {
                return Err(format!(
                    "the bundle is not {td}'s: X.509 authority {i} is a CA of trust domain \
                     {} (URI SAN {id})",
                    id.trust_domain()
                ));
            }
        }
    }
    Ok(())
}

/// What the refresh loop last saw of a relationship (shown by `federation show` and in
/// metrics). Times are unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The last fetch that succeeded (the bundle was stored, or was unchanged).
    pub last_success_at: Option<i64>,
    /// The last fetch that failed, and why (kept after a later success, for the record).
    pub last_error: Option<String>,
    /// When `last_error` happened.
    pub last_error_at: Option<i64>,
    /// When the next fetch is due.
    pub next_refresh_at: Option<i64>,
}

/// How a foreign bundle came to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Fetched from the relationship's bundle endpoint.
    Fetched,
    /// Set by an operator (`bundle set`, or the bootstrap bundle of `federation create`).
    Static,
}

impl Origin {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Fetched => "fetched",
            Origin::Static => "static",
        }
    }
}

/// A foreign trust domain's bundle as the datastore keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignBundle {
    /// The bundle (its trust domain is the foreign one).
    pub bundle: TrustBundle,
    /// How it came.
    pub origin: Origin,
    /// When it was stored (unix seconds).
    pub updated_at: i64,
}

/// What storing a fetched bundle did ([`crate::datastore::Datastore::store_fetched_bundle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// It replaced the stored one (or there was none).
    Replaced,
    /// The stored one has the same keys: the bundle stays (a higher sequence or a new
    /// refresh hint is recorded).
    Unchanged,
    /// It was refused, and why (a lower sequence, or the same sequence with other content):
    /// the stored one stays.
    Refused(String),
}

/// What one fetch of a relationship's bundle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// The relationship's status afterwards.
    pub status: Status,
    /// Why this fetch failed (the last good bundle stayed); `None`: it succeeded.
    pub error: Option<String>,
}

/// The refresh loop as the admin API sees it (`federation refresh`, and relationship
/// changes that must be picked up at once rather than at the next poll).
#[async_trait::async_trait]
pub trait Refresher: Send + Sync {
    /// Fetches `td`'s bundle now, stores it by the usual rules, and returns what
    /// happened (`NotFound` if there is no such relationship).
    async fn refresh_now(&self, td: &TrustDomain) -> crate::Result<Refreshed>;

    /// Relationships or foreign bundles were created, changed or deleted: re-read them
    /// now (the relationships' schedule, and the bundles the agents get).
    fn relationships_changed(&self);
}

/// Writes the config file's relationships into the datastore (replacing the config
/// relationships an earlier start wrote), and stores each bootstrap bundle whose trust
/// domain has no bundle yet: a bundle fetched since, or set by an operator, is newer than
/// the file and stays.
pub async fn apply_config(
    ds: &crate::datastore::Datastore,
    cfg: &crate::config::Federation,
    now: i64,
) -> crate::Result<()> {
    let relationships: Vec<Relationship> =
        cfg.relationships.iter().map(|(r, _)| r.clone()).collect();
    ds.replace_config_federations(&relationships).await?;
    for (rel, bootstrap) in &cfg.relationships {
        let Some(bootstrap) = bootstrap else { continue };
        if ds.foreign_bundle(&rel.trust_domain).await?.is_some() {
            continue;
        }
        let bundle = bootstrap
            .read(&rel.trust_domain)
            .map_err(crate::Error::Config)?;
        ds.set_static_bundle(&bundle, now).await?;
        tracing::info!(trust_domain = %rel.trust_domain, file = %bootstrap.path.display(), "stored the bootstrap bundle of a federation relationship");
    }
    if !relationships.is_empty() {
        tracing::info!(
            count = relationships.len(),
            "federation relationships of the config file written to the datastore"
        );
    }
    Ok(())
}
