//! `MintJWTSVID` (`jwt mint`) and the local JWT authorities (`localauthority jwt`):
//! `GetJWTAuthorityState`, `PrepareJWTAuthority`, `ActivateJWTAuthority`,
//! `TaintJWTAuthority`, `RevokeJWTAuthority`. The [`crate::ca::CaManager`] checks every
//! step and journals each change before it takes effect, as for the X.509 authorities.

use carapace_core::clock::unix_now;
use carapace_proto::admin::{
    ActivateJwtAuthorityRequest, GetJwtAuthorityStateResponse, JwtAuthority, MintJwtsvidRequest,
    MintJwtsvidResponse, RevokeJwtAuthorityRequest, TaintJwtAuthorityRequest, X509AuthorityStatus,
};

use super::AdminApi;
use super::fields::ttl_or_default;
use crate::Result;
use crate::ca::AuthorityStatus;
use crate::jwt_keys::{JwtAuthorityInfo, JwtRequest};

/// A JWT authority as the admin API sends it.
fn jwt_authority_to_wire(a: &JwtAuthorityInfo) -> JwtAuthority {
    let status = match a.status {
        AuthorityStatus::Active => X509AuthorityStatus::Active,
        AuthorityStatus::Prepared => X509AuthorityStatus::Prepared,
        AuthorityStatus::Old => X509AuthorityStatus::Old,
    };
    JwtAuthority {
        authority_id: a.id.clone(),
        status: status as i32,
        expires_at: a.expires_at,
        tainted: a.tainted,
        public_key: a.public_key_der.clone(),
    }
}

impl AdminApi {
    pub(super) async fn mint_jwtsvid_inner(
        &self,
        req: MintJwtsvidRequest,
    ) -> Result<MintJwtsvidResponse> {
        let id = self.mintable_id(&req.spiffe_id)?;
        let ttl = ttl_or_default(
            "ttl",
            req.ttl,
            self.settings.jwt.default_ttl,
            carapace_core::limits::MAX_JWT_SVID_TTL,
        )?;
        let issued = self
            .ca
            .issue_jwt_svid(
                JwtRequest {
                    spiffe_id: id.clone(),
                    audiences: req.audience,
                    ttl,
                    issuer: self.settings.jwt.issuer.clone(),
                    include_jti: false,
                },
                unix_now(),
            )
            .await;
        crate::metrics::metrics()
            .svids_issued
            .record("jwt_minted", issued.is_ok(), 1);
        let issued = issued?;
        tracing::info!(spiffe_id = %id, expires_at = issued.expires_at, "minted a JWT-SVID");
        Ok(MintJwtsvidResponse {
            svid: Some(crate::node_api::jwt_to_wire(&issued)),
        })
    }

    pub(super) fn get_jwt_authority_state_inner(&self) -> GetJwtAuthorityStateResponse {
        GetJwtAuthorityStateResponse {
            authorities: self
                .ca
                .jwt_authorities()
                .iter()
                .map(jwt_authority_to_wire)
                .collect(),
        }
    }

    pub(super) async fn prepare_jwt_authority_inner(&self) -> Result<JwtAuthority> {
        Ok(jwt_authority_to_wire(
            &self.ca.prepare_jwt(unix_now()).await?,
        ))
    }

    pub(super) async fn activate_jwt_authority_inner(
        &self,
        req: ActivateJwtAuthorityRequest,
    ) -> Result<JwtAuthority> {
        let id = Some(req.authority_id.as_str()).filter(|i| !i.is_empty());
        Ok(jwt_authority_to_wire(
            &self.ca.activate_jwt(id, unix_now()).await?,
        ))
    }

    pub(super) async fn taint_jwt_authority_inner(
        &self,
        req: TaintJwtAuthorityRequest,
    ) -> Result<JwtAuthority> {
        Ok(jwt_authority_to_wire(
            &self.ca.taint_jwt(&req.authority_id).await?,
        ))
    }

    pub(super) async fn revoke_jwt_authority_inner(
        &self,
        req: RevokeJwtAuthorityRequest,
    ) -> Result<JwtAuthority> {
        Ok(jwt_authority_to_wire(
            &self.ca.revoke_jwt(&req.authority_id).await?,
        ))
    }
}
