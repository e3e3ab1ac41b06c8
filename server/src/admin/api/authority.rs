//! `GetX509AuthorityState`, `PrepareX509Authority`, `ActivateX509Authority`,
//! `TaintX509Authority`, `RevokeX509Authority`: the local X.509 authorities, as SPIRE's
//! `localauthority x509`. The [`crate::ca::CaManager`] checks every step (a wrong state is
//! FailedPrecondition, an unknown id NotFound, a malformed one InvalidArgument) and
//! journals each change before it takes effect.

use carapace_core::clock::unix_now;
use carapace_proto::admin::{
    ActivateX509AuthorityRequest, GetX509AuthorityStateResponse, RevokeX509AuthorityRequest,
    TaintX509AuthorityRequest, X509Authority, X509AuthorityStatus,
};

use super::AdminApi;
use crate::Result;
use crate::ca::{AuthorityInfo, AuthorityStatus};

/// An authority as the admin API sends it.
fn authority_to_wire(a: &AuthorityInfo) -> X509Authority {
    let status = match a.status {
        AuthorityStatus::Active => X509AuthorityStatus::Active,
        AuthorityStatus::Prepared => X509AuthorityStatus::Prepared,
        AuthorityStatus::Old => X509AuthorityStatus::Old,
    };
    X509Authority {
        authority_id: a.id.clone(),
        status: status as i32,
        expires_at: a.not_after,
        tainted: a.tainted,
        upstream: a.upstream.clone().unwrap_or_default(),
        certificate: a.cert_der.clone(),
    }
}

impl AdminApi {
    pub(super) fn get_x509_authority_state_inner(&self) -> GetX509AuthorityStateResponse {
        GetX509AuthorityStateResponse {
            authorities: self
                .ca
                .authorities()
                .iter()
                .map(authority_to_wire)
                .collect(),
        }
    }

    pub(super) async fn prepare_x509_authority_inner(&self) -> Result<X509Authority> {
        Ok(authority_to_wire(&self.ca.prepare(unix_now()).await?))
    }

    pub(super) async fn activate_x509_authority_inner(
        &self,
        req: ActivateX509AuthorityRequest,
    ) -> Result<X509Authority> {
        let id = Some(req.authority_id.as_str()).filter(|i| !i.is_empty());
        Ok(authority_to_wire(&self.ca.activate(id, unix_now()).await?))
    }

    pub(super) async fn taint_x509_authority_inner(
        &self,
        req: TaintX509AuthorityRequest,
    ) -> Result<X509Authority> {
        Ok(authority_to_wire(&self.ca.taint(&req.authority_id).await?))
    }

    pub(super) async fn revoke_x509_authority_inner(
        &self,
        req: RevokeX509AuthorityRequest,
    ) -> Result<X509Authority> {
        Ok(authority_to_wire(&self.ca.revoke(&req.authority_id).await?))
    }
}
