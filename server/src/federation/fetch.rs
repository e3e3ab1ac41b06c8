//! Fetching a peer trust domain's bundle from its bundle endpoint (SPIFFE Federation §5,
//! the client half): one hardened HTTPS GET per call, the endpoint authenticated by its
//! relationship's profile, and the answer checked to be that trust domain's bundle.
//!
//! - The URL: `https://` only, no user info, no fragment ([`HttpsUrl`]).
//! - The exchange ([`https_get`]): TLS 1.3 or 1.2 (Mozilla *intermediate*, as §5 asks),
//!   SNI the URL's host, HTTP/1.1, one deadline on everything (10 s), a body of at most
//!   1 MiB (a larger one is refused without being read), no proxy.
//! - `https_web`: Web PKI (webpki, RFC 6125 on the URL's host) against the relationship's
//!   `roots_pem` when set, else the system's trust store.
//! - `https_spiffe`: the endpoint must present an X509-SVID for exactly its configured
//!   SPIFFE ID, chaining to the X.509 authorities of the bundle the caller hands in: the
//!   relationship's own stored bundle when the endpoint is *self-serving* (its ID is in
//!   the trust domain fetched: the bootstrap bundle, then always the last fetched one,
//!   §5.2.2.4), another trust domain's otherwise.
//! - The answer: status 200 only. A redirect is refused, naming where it points: it is
//!   not followed (§5.2.1.4 allows following one; refusing keeps a relationship's
//!   endpoint exactly what its operator configured, and the message tells them the URL to
//!   configure instead). The body is UTF-8 SPIFFE bundle JSON.
//! - The bundle names no trust domain, so two checks make sure it is the relationship's
//!   (SPIRE does neither): every X.509 authority that carries a SPIFFE ID (a URI SAN
//!   `spiffe://td`, as Carapace's and SPIRE's CAs do) must carry the relationship's; and
//!   a self-serving `https_spiffe` endpoint's new bundle must still validate the SVID the
//!   endpoint just presented (else it is not that trust domain's bundle, and the next
//!   fetch, authenticated with it, would fail).
//!
//! An empty `keys` (every authority revoked) is legal and returned as it is: whether to
//! store it is the caller's decision. What is returned is not yet stored: the sequence
//! rules are the datastore's ([`crate::datastore::Datastore::store_fetched_bundle`]).

use std::sync::Arc;
use std::time::Duration;

use carapace_common::http::{
    HttpsResponse, HttpsUrl, https_get, roots_from_pem, system_roots, webpki_client_config,
};
use carapace_core::jose::shown;
use carapace_core::{SpiffeId, TrustBundle, TrustDomain};

use super::{Profile, Relationship};

/// The deadline of one fetch: name lookup, connection, TLS handshake, request and body.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The largest bundle read (a bundle of a dozen authorities is a few tens of KiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The limits of one fetch; [`Default`] is [`TIMEOUT`] and [`MAX_BODY_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchOptions {
    /// The deadline of the whole exchange.
    pub timeout: Duration,
    /// The largest body read.
    pub max_body: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            timeout: TIMEOUT,
            max_body: MAX_BODY_BYTES,
        }
    }
}

/// Why a fetch failed: one line for an operator (`federation show`'s last error), naming
/// the endpoint's URL and what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError(String);

impl FetchError {
    fn at(url: &HttpsUrl, reason: impl std::fmt::Display) -> Self {
        FetchError(format!("bundle endpoint {url}: {reason}"))
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FetchError {}

/// Fetches `rel`'s bundle from its endpoint and checks it is `rel.trust_domain`'s, with
/// the default limits ([`fetch_bundle_with`]).
///
/// `auth`: for `https_spiffe`, the bundle of the endpoint SPIFFE ID's trust domain (the
/// relationship's own stored bundle when self-serving, i.e. the bootstrap then the last
/// fetched; another trust domain's bundle otherwise); ignored for `https_web`.
pub async fn fetch_bundle(
    rel: &Relationship,
    auth: Option<&TrustBundle>,
) -> Result<TrustBundle, FetchError> {
    fetch_bundle_with(rel, auth, FetchOptions::default()).await
}

/// [`fetch_bundle`] within `options`' limits.
pub async fn fetch_bundle_with(
    rel: &Relationship,
    auth: Option<&TrustBundle>,
    options: FetchOptions,
) -> Result<TrustBundle, FetchError> {
    let td = &rel.trust_domain;
    let url = HttpsUrl::parse(&rel.url)
        .map_err(|e| FetchError(format!("bundle endpoint of {td}: {e}")))?;
    let tls = client_config(rel, &url, auth)?;
    let resp = https_get(&url, tls, options.timeout, options.max_body)
        .await
        .map_err(|e| FetchError::at(&url, e))?;
    let bundle = read_answer(td, &url, &resp)?;
    super::check_authorities(td, &bundle).map_err(|e| {
        FetchError::at(
            &url,
            format!("{e}; the endpoint serves another trust domain's bundle"),
        )
    })?;
    if let Profile::HttpsSpiffe { endpoint_id } = &rel.profile {
        if endpoint_id.is_member_of(td) {
            check_self_serving(endpoint_id, &bundle, &resp).map_err(|e| FetchError::at(&url, e))?;
        }
    }
    Ok(bundle)
}

/// The TLS client configuration `rel`'s profile asks for.
fn client_config(
    rel: &Relationship,
    url: &HttpsUrl,
    auth: Option<&TrustBundle>,
) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    match &rel.profile {
        Profile::HttpsWeb { roots_pem } => {
            let roots = match roots_pem {
                Some(pem) => roots_from_pem(pem.as_bytes(), "the relationship's CA certificates"),
                None => system_roots(),
            }
            .map_err(|e| FetchError::at(url, format!("https_web: {e}")))?;
            webpki_client_config(roots)
                .map(Arc::new)
                .map_err(|e| FetchError::at(url, e))
        }
        Profile::HttpsSpiffe { endpoint_id } => {
            let endpoint_td = endpoint_id.trust_domain();
            let Some(auth) = auth else {
                let how = if endpoint_id.is_member_of(&rel.trust_domain) {
                    format!(
                        "a bootstrap bundle of {endpoint_td} is needed for the first fetch \
                         (`bundle set --trust-domain {endpoint_td}`, or `federation create \
                         --bundle`)"
                    )
                } else {
                    format!(
                        "{endpoint_td}'s bundle is needed (`bundle set --trust-domain \
                         {endpoint_td}`, or a federation relationship with {endpoint_td})"
                    )
                };
                return Err(FetchError::at(
                    url,
                    format!(
                        "https_spiffe: no bundle to authenticate the endpoint's SVID \
                         ({endpoint_id}) with: {how}"
                    ),
                ));
            };
            if auth.trust_domain() != &endpoint_td {
                return Err(FetchError::at(
                    url,
                    format!(
                        "https_spiffe: the endpoint {endpoint_id} is authenticated with \
                         {endpoint_td}'s bundle, but {}'s was given",
                        auth.trust_domain()
                    ),
                ));
            }
            if auth.x509_authorities.is_empty() {
                return Err(FetchError::at(
                    url,
                    format!(
                        "https_spiffe: {endpoint_td}'s bundle has no X.509 authority to \
                         authenticate the endpoint's SVID ({endpoint_id}) with"
                    ),
                ));
            }
            // Read once: this fetch's handshake uses the bundle as it is now.
            let (_, bundle) = tokio::sync::watch::channel(Arc::new(auth.clone()));
            carapace_tls::federation_client_config(bundle, endpoint_id.clone())
                .map(Arc::new)
                .map_err(|e| FetchError::at(url, format!("TLS settings: {e}")))
        }
    }
}

/// The bundle in a 200 answer; any other status is refused.
fn read_answer(
    td: &TrustDomain,
    url: &HttpsUrl,
    resp: &HttpsResponse,
) -> Result<TrustBundle, FetchError> {
    let status = resp.status;
    if status.is_redirection() {
        let to = resp
            .header("location")
            .map_or_else(|| "nowhere (no Location)".to_owned(), shown);
        return Err(FetchError::at(
            url,
            format!(
                "HTTP {status} redirects to {to}: redirects are not followed; configure \
                 the final URL"
            ),
        ));
    }
    if status.as_u16() != 200 {
        return Err(FetchError::at(
            url,
            format!("HTTP {status}: a bundle endpoint answers 200"),
        ));
    }
    let body = std::str::from_utf8(&resp.body)
        .map_err(|e| FetchError::at(url, format!("the body is not UTF-8: {e}")))?;
    TrustBundle::from_spiffe_json(td.clone(), body)
        .map_err(|e| FetchError::at(url, format!("the body is not a SPIFFE bundle: {e}")))
}

/// A self-serving endpoint's new bundle validates the SVID it presented.
fn check_self_serving(
    endpoint_id: &SpiffeId,
    bundle: &TrustBundle,
    resp: &HttpsResponse,
) -> Result<(), String> {
    let chain: Vec<Vec<u8>> = resp
        .peer_certificates
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let now = u64::try_from(carapace_core::clock::unix_now()).unwrap_or_default();
    carapace_core::x509svid::verify_chain(&chain, bundle, now).map_err(|e| {
        format!(
            "the bundle served does not validate the endpoint's own SVID ({endpoint_id}): \
             {e}; it is not {}'s current bundle (and the next fetch, authenticated with it, \
             would fail)",
            bundle.trust_domain()
        )
    })?;
    Ok(())
}
