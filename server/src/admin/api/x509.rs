//! `MintX509SVID`: an X509-SVID for a CSR, outside of any agent, signed through the
//! [`CaManager`](crate::ca::CaManager).

use carapace_proto::admin::{MintX509svidRequest, MintX509svidResponse};
use carapace_proto::types;

use super::AdminApi;
use super::fields::{required_id, ttl_or_default};
use crate::ca::csr_public_key;
use carapace_core::clock::unix_now;

use crate::{Error, Result};

impl AdminApi {
    /// `spiffe_id` of a mint request: a SPIFFE ID of this trust domain with a path,
    /// outside the reserved `/spire` path.
    pub(super) fn mintable_id(&self, spiffe_id: &str) -> Result<carapace_core::SpiffeId> {
        let id = required_id("spiffe_id", spiffe_id)?;
        let td = self.ca.trust_domain();
        if !id.is_member_of(td) {
            return Err(Error::InvalidArgument(format!(
                "spiffe_id: {id} is not in trust domain {td}"
            )));
        }
        if id.path().is_empty() {
            return Err(Error::InvalidArgument(format!(
                "spiffe_id: {id} has no path; an SVID needs one"
            )));
        }
        if id.is_reserved() {
            return Err(Error::InvalidArgument(format!(
                "spiffe_id: {id} is under the reserved path /spire (agents and the server)"
            )));
        }
        Ok(id)
    }

    pub(super) async fn mint_x509svid_inner(
        &self,
        req: MintX509svidRequest,
    ) -> Result<MintX509svidResponse> {
        let id = self.mintable_id(&req.spiffe_id)?;
        if req.csr.is_empty() {
            return Err(Error::InvalidArgument("csr is required".into()));
        }
        for name in &req.dns_names {
            carapace_core::entry::validate_dns_name(name).map_err(|reason| {
                Error::InvalidArgument(format!("dns_names: {name:?}: {reason}"))
            })?;
        }
        let ttl = ttl_or_default(
            "ttl",
            req.ttl,
            self.settings.default_x509_svid_ttl,
            carapace_core::limits::MAX_X509_SVID_TTL,
        )?;
        let key = csr_public_key(&req.csr)?;
        let now = unix_now();
        // Signing may wait on a hardware key manager: off the async workers then.
        let issued = self
            .ca
            .issue_x509_svid(id.clone(), key, ttl, req.dns_names.clone(), now)
            .await;
        crate::metrics::metrics()
            .svids_issued
            .record("x509_minted", issued.is_ok(), 1);
        let issued = issued?;
        tracing::info!(
            spiffe_id = %id,
            serial = issued.serial_hex,
            expires_at = issued.expires_at,
            "minted an X509-SVID"
        );
        let bundle = self.ca.bundle().borrow().clone();
        Ok(MintX509svidResponse {
            svid: Some(types::X509Svid {
                cert_chain: issued.chain,
                expires_at: issued.expires_at,
            }),
            bundle: Some(types::Bundle::from(bundle.as_ref())),
        })
    }
}
