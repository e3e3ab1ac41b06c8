//! `CreateFederation`, `UpdateFederation`, `DeleteFederation`, `GetFederation`,
//! `ListFederations`, `RefreshFederation`: federation relationships; and `SetBundle`,
//! `ListBundles`, `DeleteBundle` (and `GetBundle`'s foreign trust domains, in `bundle`):
//! the bundles of foreign trust domains.
//!
//! Every field is checked here before anything is written (SPIFFE Federation §5.1,
//! §7.1): the trust domain is never the local one; the URL is `https://` without user
//! info or fragment; `https_spiffe` has an endpoint SPIFFE ID (by default the peer's
//! server, `spiffe://<td>/spire/server`) and no web roots, `https_web` no endpoint ID.
//! A bundle document (bootstrap or `SetBundle`) is parsed for the foreign trust domain
//! and must hold at least one authority. Relationships from the config file are
//! read-only here. After a relationship changes, the refresh loop, if any, is told.

use carapace_core::{SpiffeId, TrustBundle, TrustDomain};
use carapace_proto::admin::{
    BundleDocument, BundleFormat, BundleOrigin, CreateFederationRequest, DeleteBundleMode,
    DeleteBundleRequest, DeleteBundleResponse, DeleteFederationRequest, DeleteFederationResponse,
    Federation, FederationProfile, FederationRelationship, FederationSource, FederationStatus,
    GetFederationRequest, ListBundlesRequest, ListBundlesResponse, ListFederationsResponse,
    RefreshFederationRequest, RefreshFederationResponse, SetBundleRequest, StoredBundle,
    UpdateFederationRequest,
};
use carapace_proto::types;

use super::AdminApi;
use crate::federation::{ForeignBundle, Origin, Profile, Relationship, Source, Status};
use crate::{Error, Result};
use carapace_core::clock::unix_now;

/// The largest bundle document or set of web roots accepted (a bundle of a few hundred
/// authorities fits many times over).
pub(crate) const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Where config-file relationships are defined, for the messages that refuse them.
const CONFIG_SECTION: &str = "[[federation.federates_with]]";

/// A trust domain field, required, and never the local trust domain.
fn foreign_td(local: &TrustDomain, field: &str, value: &str) -> Result<TrustDomain> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    let td =
        TrustDomain::new(value).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))?;
    if &td == local {
        return Err(Error::InvalidArgument(format!(
            "{field}: {td} is this server's own trust domain; federation and foreign bundles \
             are for other trust domains"
        )));
    }
    Ok(td)
}

/// A trust domain field naming one that must exist already (no local check needed: the
/// local one never has a relationship or a foreign bundle).
fn any_td(field: &str, value: &str) -> Result<TrustDomain> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    TrustDomain::new(value).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

/// Web PKI roots: PEM certificates, at least one.
fn check_roots(pem: &str) -> Result<()> {
    if pem.len() > MAX_DOCUMENT_BYTES {
        return Err(Error::InvalidArgument(format!(
            "relationship.web_roots_pem: more than {MAX_DOCUMENT_BYTES} bytes"
        )));
    }
    let certs = carapace_core::bundle::certs_from_pem(pem)
        .map_err(|e| Error::InvalidArgument(format!("relationship.web_roots_pem: {e}")))?;
    if certs.is_empty() {
        return Err(Error::InvalidArgument(
            "relationship.web_roots_pem: no PEM CERTIFICATE block found".into(),
        ));
    }
    for (i, der) in certs.iter().enumerate() {
        carapace_core::x509svid::validity_of(der).map_err(|e| {
            Error::InvalidArgument(format!(
                "relationship.web_roots_pem: certificate {i} does not parse: {e}"
            ))
        })?;
    }
    Ok(())
}

/// A relationship from the wire, every field checked; its source is the API.
fn relationship_from_wire(
    local: &TrustDomain,
    wire: Option<FederationRelationship>,
) -> Result<Relationship> {
    let w = wire.ok_or_else(|| Error::InvalidArgument("relationship is required".into()))?;
    let td = foreign_td(local, "relationship.trust_domain", &w.trust_domain)?;
    crate::federation::check_endpoint_url(&w.bundle_endpoint_url)
        .map_err(|e| Error::InvalidArgument(format!("relationship.bundle_endpoint_url: {e}")))?;
    let profile = match FederationProfile::try_from(w.profile) {
        Ok(FederationProfile::HttpsWeb) => {
            if !w.endpoint_spiffe_id.is_empty() {
                return Err(Error::InvalidArgument(
                    "relationship.endpoint_spiffe_id: only the https_spiffe profile has an \
                     endpoint SPIFFE ID; https_web checks the URL's host name instead"
                        .into(),
                ));
            }
            let roots_pem = if w.web_roots_pem.is_empty() {
                None
            } else {
                check_roots(&w.web_roots_pem)?;
                Some(w.web_roots_pem)
            };
            Profile::HttpsWeb { roots_pem }
        }
        Ok(FederationProfile::HttpsSpiffe) => {
            if !w.web_roots_pem.is_empty() {
                return Err(Error::InvalidArgument(
                    "relationship.web_roots_pem: only the https_web profile takes web PKI \
                     roots; https_spiffe checks the endpoint's SVID against the trust \
                     domain's bundle"
                        .into(),
                ));
            }
            let endpoint_id = if w.endpoint_spiffe_id.is_empty() {
                td.server_id()
            } else {
                w.endpoint_spiffe_id.parse::<SpiffeId>().map_err(|e| {
                    Error::InvalidArgument(format!("relationship.endpoint_spiffe_id: {e}"))
                })?
            };
            Profile::HttpsSpiffe { endpoint_id }
        }
        _ => {
            return Err(Error::InvalidArgument(
                "relationship.profile is required: https_web or https_spiffe".into(),
            ));
        }
    };
    Ok(Relationship {
        trust_domain: td,
        url: w.bundle_endpoint_url,
        profile,
        source: Source::Api,
    })
}

/// A relationship as the wire carries it.
pub(crate) fn relationship_to_wire(r: &Relationship) -> FederationRelationship {
    let (profile, endpoint_spiffe_id, web_roots_pem) = match &r.profile {
        Profile::HttpsWeb { roots_pem } => (
            FederationProfile::HttpsWeb,
            String::new(),
            roots_pem.clone().unwrap_or_default(),
        ),
        Profile::HttpsSpiffe { endpoint_id } => (
            FederationProfile::HttpsSpiffe,
            endpoint_id.to_string(),
            String::new(),
        ),
    };
    FederationRelationship {
        trust_domain: r.trust_domain.name().to_owned(),
        bundle_endpoint_url: r.url.clone(),
        profile: profile as i32,
        endpoint_spiffe_id,
        web_roots_pem,
        source: match r.source {
            Source::Config => FederationSource::Config,
            Source::Api => FederationSource::Api,
        } as i32,
    }
}

fn status_to_wire(s: &Status) -> FederationStatus {
    FederationStatus {
        last_success_at: s.last_success_at.unwrap_or(0),
        last_error: s.last_error.clone().unwrap_or_default(),
        last_error_at: s.last_error_at.unwrap_or(0),
        next_refresh_at: s.next_refresh_at.unwrap_or(0),
    }
}

/// A stored foreign bundle as the wire carries it.
fn stored_to_wire(b: &ForeignBundle) -> StoredBundle {
    StoredBundle {
        bundle: Some(types::Bundle::from(&b.bundle)),
        origin: match b.origin {
            Origin::Fetched => BundleOrigin::Fetched,
            Origin::Static => BundleOrigin::Static,
        } as i32,
        updated_at: b.updated_at,
    }
}

/// A bundle document parsed as `td`'s bundle; it must hold at least one authority.
/// `field` names the request field in errors.
pub(crate) fn parse_document(
    td: &TrustDomain,
    field: &str,
    doc: &BundleDocument,
) -> Result<TrustBundle> {
    let bad = |m: String| Error::InvalidArgument(format!("{field}: {m}"));
    if doc.content.len() > MAX_DOCUMENT_BYTES {
        return Err(bad(format!(
            "{} bytes, more than the {MAX_DOCUMENT_BYTES} allowed",
            doc.content.len()
        )));
    }
    if doc.content.trim().is_empty() {
        return Err(bad("the bundle is empty".into()));
    }
    let bundle = match BundleFormat::try_from(doc.format) {
        Ok(BundleFormat::Pem) => TrustBundle::from_pem(td.clone(), &doc.content)
            .map_err(|e| bad(format!("not a PEM bundle: {e}")))?,
        Ok(BundleFormat::Spiffe) => TrustBundle::from_spiffe_json(td.clone(), &doc.content)
            .map_err(|e| bad(format!("not a SPIFFE bundle (JWK Set): {e}")))?,
        _ => return Err(bad("format is required: pem or spiffe".into())),
    };
    for (i, der) in bundle.x509_authorities.iter().enumerate() {
        carapace_core::x509svid::validity_of(der)
            .map_err(|e| bad(format!("X.509 authority {i} does not parse: {e}")))?;
    }
    crate::federation::check_authorities(td, &bundle).map_err(bad)?;
    if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.is_empty() {
        return Err(bad(format!(
            "the bundle holds no X.509 authority and no JWT key this server can use; to \
             stop trusting {td}, delete its bundle instead"
        )));
    }
    Ok(bundle)
}

/// The refusal of a write to a relationship the config file defines.
fn config_owned(td: &TrustDomain, what: &str) -> Error {
    Error::FailedPrecondition(format!(
        "the federation relationship with {td} is defined in the config file \
         ({CONFIG_SECTION}); {what} it there and restart the server"
    ))
}

impl AdminApi {
    fn local_td(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// Tells the refresh loop, if any, that relationships or foreign bundles changed (it
    /// re-reads both: the agents get the bundles at once).
    fn relationships_changed(&self) {
        if let Some(r) = &self.refresher {
            r.relationships_changed();
        }
    }

    /// A relationship with its status and its trust domain's bundle.
    async fn federation_of(&self, rel: &Relationship, status: &Status) -> Result<Federation> {
        let bundle = self
            .cache
            .datastore()
            .foreign_bundle(&rel.trust_domain)
            .await?;
        Ok(Federation {
            relationship: Some(relationship_to_wire(rel)),
            status: Some(status_to_wire(status)),
            bundle: bundle.as_ref().map(stored_to_wire),
        })
    }

    /// A relationship and its status, or `NotFound` naming the trust domain.
    async fn existing(&self, td: &TrustDomain) -> Result<(Relationship, Status)> {
        self.cache
            .datastore()
            .get_federation(td)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no federation relationship with {td}")))
    }

    /// The bootstrap bundle of a create or update, parsed (before anything is written).
    fn bootstrap(
        &self,
        td: &TrustDomain,
        doc: Option<&BundleDocument>,
    ) -> Result<Option<TrustBundle>> {
        doc.map(|d| parse_document(td, "bootstrap_bundle", d))
            .transpose()
    }

    pub(super) async fn create_federation_inner(
        &self,
        req: CreateFederationRequest,
    ) -> Result<Federation> {
        let rel = relationship_from_wire(self.local_td(), req.relationship)?;
        let bundle = self.bootstrap(&rel.trust_domain, req.bootstrap_bundle.as_ref())?;
        let ds = self.cache.datastore();
        ds.create_federation(&rel).await?;
        if let Some(b) = &bundle {
            if let Err(e) = ds.set_static_bundle(b, unix_now()).await {
                // Nothing half-written: the relationship goes again.
                if let Err(undo) = ds.delete_federation(&rel.trust_domain).await {
                    tracing::error!(
                        trust_domain = %rel.trust_domain,
                        error = %undo,
                        "could not undo a federation relationship whose bootstrap bundle \
                         was not stored"
                    );
                }
                return Err(e);
            }
        }
        tracing::info!(
            trust_domain = %rel.trust_domain,
            url = %rel.url,
            profile = rel.profile.name(),
            bootstrap_bundle = bundle.is_some(),
            "created federation relationship"
        );
        self.relationships_changed();
        self.federation_of(&rel, &Status::default()).await
    }

    pub(super) async fn update_federation_inner(
        &self,
        req: UpdateFederationRequest,
    ) -> Result<Federation> {
        let rel = relationship_from_wire(self.local_td(), req.relationship)?;
        let bundle = self.bootstrap(&rel.trust_domain, req.bootstrap_bundle.as_ref())?;
        let (old, status) = self.existing(&rel.trust_domain).await?;
        if old.source == Source::Config {
            return Err(config_owned(&rel.trust_domain, "change"));
        }
        let ds = self.cache.datastore();
        ds.update_federation(&rel).await?;
        if let Some(b) = &bundle {
            ds.set_static_bundle(b, unix_now()).await?;
        }
        tracing::info!(
            trust_domain = %rel.trust_domain,
            url = %rel.url,
            profile = rel.profile.name(),
            bootstrap_bundle = bundle.is_some(),
            "updated federation relationship"
        );
        self.relationships_changed();
        self.federation_of(&rel, &status).await
    }

    pub(super) async fn delete_federation_inner(
        &self,
        req: DeleteFederationRequest,
    ) -> Result<DeleteFederationResponse> {
        let td = any_td("trust_domain", &req.trust_domain)?;
        let (old, _) = self.existing(&td).await?;
        if old.source == Source::Config {
            return Err(config_owned(&td, "remove"));
        }
        if !self.cache.datastore().delete_federation(&td).await? {
            return Err(Error::NotFound(format!(
                "no federation relationship with {td}"
            )));
        }
        tracing::info!(trust_domain = %td, "deleted federation relationship and its bundle");
        self.relationships_changed();
        Ok(DeleteFederationResponse {})
    }

    pub(super) async fn get_federation_inner(
        &self,
        req: GetFederationRequest,
    ) -> Result<Federation> {
        let td = any_td("trust_domain", &req.trust_domain)?;
        let (rel, status) = self.existing(&td).await?;
        self.federation_of(&rel, &status).await
    }

    pub(super) async fn list_federations_inner(&self) -> Result<ListFederationsResponse> {
        let ds = self.cache.datastore();
        let rels = ds.list_federations().await?;
        let mut bundles: std::collections::HashMap<TrustDomain, ForeignBundle> = ds
            .list_foreign_bundles()
            .await?
            .into_iter()
            .map(|b| (b.bundle.trust_domain().clone(), b))
            .collect();
        let federations = rels
            .iter()
            .map(|(rel, status)| Federation {
                relationship: Some(relationship_to_wire(rel)),
                status: Some(status_to_wire(status)),
                bundle: bundles
                    .remove(&rel.trust_domain)
                    .as_ref()
                    .map(stored_to_wire),
            })
            .collect();
        Ok(ListFederationsResponse { federations })
    }

    pub(super) async fn refresh_federation_inner(
        &self,
        req: RefreshFederationRequest,
    ) -> Result<RefreshFederationResponse> {
        let td = any_td("trust_domain", &req.trust_domain)?;
        let (rel, _) = self.existing(&td).await?;
        let refresher = self.refresher.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(
                "this server runs no federation refresh loop, so it cannot fetch bundles \
                 (is it a build or configuration without federation?)"
                    .into(),
            )
        })?;
        let refreshed = refresher.refresh_now(&td).await?;
        let succeeded = refreshed.error.is_none();
        tracing::info!(trust_domain = %td, succeeded, "federation refresh requested");
        Ok(RefreshFederationResponse {
            federation: Some(self.federation_of(&rel, &refreshed.status).await?),
            succeeded,
        })
    }

    pub(super) async fn set_bundle_inner(&self, req: SetBundleRequest) -> Result<StoredBundle> {
        let td = foreign_td(self.local_td(), "trust_domain", &req.trust_domain)?;
        let doc = req
            .bundle
            .ok_or_else(|| Error::InvalidArgument("bundle is required".into()))?;
        let bundle = parse_document(&td, "bundle", &doc)?;
        let ds = self.cache.datastore();
        ds.set_static_bundle(&bundle, unix_now()).await?;
        tracing::info!(
            trust_domain = %td,
            x509_authorities = bundle.x509_authorities.len(),
            jwt_authorities = bundle.jwt_authorities.len(),
            sequence = bundle.sequence,
            "set a static foreign bundle"
        );
        // The agents entitled to it get it at once.
        self.relationships_changed();
        let stored = ds.foreign_bundle(&td).await?.ok_or_else(|| {
            Error::Datastore(format!("the bundle of {td} was stored but cannot be read"))
        })?;
        Ok(stored_to_wire(&stored))
    }

    pub(super) async fn list_bundles_inner(
        &self,
        req: ListBundlesRequest,
    ) -> Result<ListBundlesResponse> {
        let mut bundles = Vec::new();
        if req.include_local {
            let local = self.ca.bundle().borrow().clone();
            bundles.push(StoredBundle {
                bundle: Some(types::Bundle::from(local.as_ref())),
                origin: BundleOrigin::Local as i32,
                updated_at: 0,
            });
        }
        let foreign = self.cache.datastore().list_foreign_bundles().await?;
        bundles.extend(foreign.iter().map(stored_to_wire));
        Ok(ListBundlesResponse { bundles })
    }

    pub(super) async fn delete_bundle_inner(
        &self,
        req: DeleteBundleRequest,
    ) -> Result<DeleteBundleResponse> {
        let td = foreign_td(self.local_td(), "trust_domain", &req.trust_domain)?;
        match DeleteBundleMode::try_from(req.mode) {
            Ok(DeleteBundleMode::Unspecified | DeleteBundleMode::Restrict) => {}
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "mode {}: unknown; the only mode is restrict",
                    req.mode
                )));
            }
        }
        let ds = self.cache.datastore();
        if let Some((rel, _)) = ds.get_federation(&td).await? {
            return Err(Error::FailedPrecondition(match rel.source {
                Source::Api => format!(
                    "a federation relationship with {td} exists and would fetch the bundle \
                     again; delete the federation relationship first (`federation delete \
                     --trust-domain {td}` deletes its bundle too)"
                ),
                Source::Config => format!(
                    "a federation relationship with {td} exists and would fetch the bundle \
                     again; it is defined in the config file ({CONFIG_SECTION}): remove it \
                     there and restart the server first"
                ),
            }));
        }
        if !ds.delete_foreign_bundle(&td).await? {
            return Err(Error::NotFound(format!("no bundle of {td} is stored")));
        }
        tracing::info!(trust_domain = %td, "deleted a foreign bundle");
        self.relationships_changed();
        Ok(DeleteBundleResponse {})
    }

    /// `GetBundle` for a foreign trust domain (`None`: the local one).
    pub(super) async fn foreign_bundle_wire(&self, td: &str) -> Result<Option<types::Bundle>> {
        if td.is_empty() {
            return Ok(None);
        }
        let td = any_td("trust_domain", td)?;
        if &td == self.local_td() {
            return Ok(None);
        }
        let b = self
            .cache
            .datastore()
            .foreign_bundle(&td)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no bundle of {td} is stored (`bundle list` shows the foreign bundles)"
                ))
            })?;
        Ok(Some(types::Bundle::from(&b.bundle)))
    }
}
