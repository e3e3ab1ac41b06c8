//! The admin API: the `carapace.admin.v1.Admin` gRPC service, on a Unix socket that only
//! the server's owner may open (socket mode 0600 in a directory of mode 0700, on a path
//! no other user can change), and on the node API's TLS port to callers presenting the
//! X509-SVID of an entry marked `admin` ([`RemoteAdmin`], `remote`: every call is
//! authorized on its own; anyone else gets `PermissionDenied`).
//!
//! On the socket, its file permissions are the whole access control: whoever can open it
//! is an administrator. The CLI in turn checks who answers (SO_PEERCRED) before it sends
//! anything, so an impostor's socket gets neither requests nor join tokens. Every write
//! of entries, agents and join tokens goes through the [`EntryCache`] (which validates
//! against the trust domain and writes the datastore first), and every signature through
//! the [`CaManager`]. Writes are logged at info with the entry id or SPIFFE ID; join
//! tokens and keys are never logged (only a token's id).
//!
//! One module per noun implements that noun's RPCs as `<rpc>_inner` methods of
//! [`AdminApi`], returning the server's [`Result`]; the [`Admin`] trait
//! impl here only delegates to them and maps errors to a status in one place (`reply`).
//! `socket` binds and serves the socket; `fields` holds the request checks several nouns
//! share. To add a noun: write `<noun>.rs` on that pattern, and add its RPCs to the
//! trait impl below; its CLI side is a file in [`crate::admin::cli`].

mod agent;
mod authority;
mod bundle;
mod entry;
mod federation;
mod fields;
mod health;
mod jwt;
mod remote;
mod socket;
mod token;
mod x509;

#[cfg(test)]
mod remote_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use carapace_proto::admin::admin_server::Admin;
use carapace_proto::admin::{
    ActivateX509AuthorityRequest, GetX509AuthorityStateRequest, GetX509AuthorityStateResponse,
    PrepareX509AuthorityRequest, RevokeX509AuthorityRequest, TaintX509AuthorityRequest,
    X509Authority,
};
use carapace_proto::admin::{
    Agent, AgentRequest, CountEntriesResponse, CreateEntryRequest, CreateJoinTokenRequest,
    DeleteEntryRequest, DeleteEntryResponse, EvictAgentResponse, GetBundleRequest, HealthRequest,
    HealthResponse, JoinToken, ListAgentsRequest, ListAgentsResponse, ListEntriesRequest,
    ListEntriesResponse, MintX509svidRequest, MintX509svidResponse, UpdateEntryRequest,
};
use carapace_proto::{admin, types};

use crate::Result;
use crate::ca::CaManager;
use crate::entry_cache::EntryCache;

pub use remote::RemoteAdmin;
pub use socket::{bind, serve};

/// Settings of the admin API.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// X509-SVID lifetime for `MintX509SVID` when the request asks for none.
    pub default_x509_svid_ttl: Duration,
    /// Join token lifetime when the request asks for none.
    pub default_join_token_ttl: Duration,
    /// How JWT-SVIDs are made (`jwt mint`).
    pub jwt: crate::jwt_keys::JwtSettings,
}

/// The admin service.
#[derive(Clone)]
pub struct AdminApi {
    cache: Arc<EntryCache>,
    ca: Arc<CaManager>,
    settings: AdminSettings,
    /// The federation refresh loop, when this server runs one: `federation refresh`
    /// goes to it, and relationship changes are announced to it.
    refresher: Option<Arc<dyn crate::federation::Refresher>>,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi")
            .field("cache", &self.cache)
            .field("ca", &self.ca)
            .field("settings", &self.settings)
            .field("refresher", &self.refresher.is_some())
            .finish()
    }
}

impl AdminApi {
    /// The service over the server's entry cache and CA (without a federation refresh
    /// loop: see [`AdminApi::with_refresher`]).
    pub fn new(cache: Arc<EntryCache>, ca: Arc<CaManager>, settings: AdminSettings) -> Self {
        AdminApi {
            cache,
            ca,
            settings,
            refresher: None,
        }
    }

    /// The service driving `refresher` for `federation refresh` and telling it of every
    /// relationship change. Set it before cloning the service for its listeners.
    #[must_use]
    pub fn with_refresher(mut self, refresher: Arc<dyn crate::federation::Refresher>) -> Self {
        self.refresher = Some(refresher);
        self
    }
}

/// A handler's result as the RPC's answer: errors mapped to a status by the server's one
/// mapping.
fn reply<T>(r: Result<T>) -> std::result::Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_entry(
        &self,
        request: Request<CreateEntryRequest>,
    ) -> std::result::Result<Response<types::Entry>, Status> {
        reply(self.create_entry_inner(request.into_inner()).await)
    }

    async fn batch_create_entry(
        &self,
        request: Request<admin::BatchCreateEntryRequest>,
    ) -> std::result::Result<Response<admin::BatchCreateEntryResponse>, Status> {
        reply(self.batch_create_entry_inner(request.into_inner()).await)
    }

    async fn update_entry(
        &self,
        request: Request<UpdateEntryRequest>,
    ) -> std::result::Result<Response<types::Entry>, Status> {
        reply(self.update_entry_inner(request.into_inner()).await)
    }

    async fn delete_entry(
        &self,
        request: Request<DeleteEntryRequest>,
    ) -> std::result::Result<Response<DeleteEntryResponse>, Status> {
        reply(self.delete_entry_inner(request.into_inner()).await)
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> std::result::Result<Response<ListEntriesResponse>, Status> {
        reply(self.list_entries_inner(request.into_inner()).await)
    }

    async fn count_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> std::result::Result<Response<CountEntriesResponse>, Status> {
        reply(self.count_entries_inner(request.into_inner()).await)
    }

    async fn list_agents(
        &self,
        _request: Request<ListAgentsRequest>,
    ) -> std::result::Result<Response<ListAgentsResponse>, Status> {
        Ok(Response::new(self.list_agents_inner()))
    }

    async fn get_agent(
        &self,
        request: Request<AgentRequest>,
    ) -> std::result::Result<Response<Agent>, Status> {
        reply(self.get_agent_inner(request.get_ref()))
    }

    async fn ban_agent(
        &self,
        request: Request<AgentRequest>,
    ) -> std::result::Result<Response<Agent>, Status> {
        reply(self.ban_agent_inner(request.into_inner()).await)
    }

    async fn evict_agent(
        &self,
        request: Request<AgentRequest>,
    ) -> std::result::Result<Response<EvictAgentResponse>, Status> {
        reply(self.evict_agent_inner(request.into_inner()).await)
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> std::result::Result<Response<types::Bundle>, Status> {
        reply(self.get_bundle_inner(request.into_inner()).await)
    }

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> std::result::Result<Response<JoinToken>, Status> {
        reply(self.create_join_token_inner(request.into_inner()).await)
    }

    async fn mint_x509svid(
        &self,
        request: Request<MintX509svidRequest>,
    ) -> std::result::Result<Response<MintX509svidResponse>, Status> {
        reply(self.mint_x509svid_inner(request.into_inner()).await)
    }

    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> std::result::Result<Response<HealthResponse>, Status> {
        reply(self.health_inner().await)
    }

    async fn get_x509_authority_state(
        &self,
        _request: Request<GetX509AuthorityStateRequest>,
    ) -> std::result::Result<Response<GetX509AuthorityStateResponse>, Status> {
        Ok(Response::new(self.get_x509_authority_state_inner()))
    }

    async fn prepare_x509_authority(
        &self,
        _request: Request<PrepareX509AuthorityRequest>,
    ) -> std::result::Result<Response<X509Authority>, Status> {
        reply(self.prepare_x509_authority_inner().await)
    }

    async fn activate_x509_authority(
        &self,
        request: Request<ActivateX509AuthorityRequest>,
    ) -> std::result::Result<Response<X509Authority>, Status> {
        reply(
            self.activate_x509_authority_inner(request.into_inner())
                .await,
        )
    }

    async fn taint_x509_authority(
        &self,
        request: Request<TaintX509AuthorityRequest>,
    ) -> std::result::Result<Response<X509Authority>, Status> {
        reply(self.taint_x509_authority_inner(request.into_inner()).await)
    }

    async fn revoke_x509_authority(
        &self,
        request: Request<RevokeX509AuthorityRequest>,
    ) -> std::result::Result<Response<X509Authority>, Status> {
        reply(self.revoke_x509_authority_inner(request.into_inner()).await)
    }

    async fn mint_jwtsvid(
        &self,
        request: Request<admin::MintJwtsvidRequest>,
    ) -> std::result::Result<Response<admin::MintJwtsvidResponse>, Status> {
        reply(self.mint_jwtsvid_inner(request.into_inner()).await)
    }

    async fn get_jwt_authority_state(
        &self,
        _request: Request<admin::GetJwtAuthorityStateRequest>,
    ) -> std::result::Result<Response<admin::GetJwtAuthorityStateResponse>, Status> {
        Ok(Response::new(self.get_jwt_authority_state_inner()))
    }

    async fn prepare_jwt_authority(
        &self,
        _request: Request<admin::PrepareJwtAuthorityRequest>,
    ) -> std::result::Result<Response<admin::JwtAuthority>, Status> {
        reply(self.prepare_jwt_authority_inner().await)
    }

    async fn activate_jwt_authority(
        &self,
        request: Request<admin::ActivateJwtAuthorityRequest>,
    ) -> std::result::Result<Response<admin::JwtAuthority>, Status> {
        reply(
            self.activate_jwt_authority_inner(request.into_inner())
                .await,
        )
    }

    async fn taint_jwt_authority(
        &self,
        request: Request<admin::TaintJwtAuthorityRequest>,
    ) -> std::result::Result<Response<admin::JwtAuthority>, Status> {
        reply(self.taint_jwt_authority_inner(request.into_inner()).await)
    }

    async fn revoke_jwt_authority(
        &self,
        request: Request<admin::RevokeJwtAuthorityRequest>,
    ) -> std::result::Result<Response<admin::JwtAuthority>, Status> {
        reply(self.revoke_jwt_authority_inner(request.into_inner()).await)
    }

    async fn create_federation(
        &self,
        request: Request<admin::CreateFederationRequest>,
    ) -> std::result::Result<Response<admin::Federation>, Status> {
        reply(self.create_federation_inner(request.into_inner()).await)
    }

    async fn update_federation(
        &self,
        request: Request<admin::UpdateFederationRequest>,
    ) -> std::result::Result<Response<admin::Federation>, Status> {
        reply(self.update_federation_inner(request.into_inner()).await)
    }

    async fn delete_federation(
        &self,
        request: Request<admin::DeleteFederationRequest>,
    ) -> std::result::Result<Response<admin::DeleteFederationResponse>, Status> {
        reply(self.delete_federation_inner(request.into_inner()).await)
    }

    async fn get_federation(
        &self,
        request: Request<admin::GetFederationRequest>,
    ) -> std::result::Result<Response<admin::Federation>, Status> {
        reply(self.get_federation_inner(request.into_inner()).await)
    }

    async fn list_federations(
        &self,
        _request: Request<admin::ListFederationsRequest>,
    ) -> std::result::Result<Response<admin::ListFederationsResponse>, Status> {
        reply(self.list_federations_inner().await)
    }

    async fn refresh_federation(
        &self,
        request: Request<admin::RefreshFederationRequest>,
    ) -> std::result::Result<Response<admin::RefreshFederationResponse>, Status> {
        reply(self.refresh_federation_inner(request.into_inner()).await)
    }

    async fn set_bundle(
        &self,
        request: Request<admin::SetBundleRequest>,
    ) -> std::result::Result<Response<admin::StoredBundle>, Status> {
        reply(self.set_bundle_inner(request.into_inner()).await)
    }

    async fn list_bundles(
        &self,
        request: Request<admin::ListBundlesRequest>,
    ) -> std::result::Result<Response<admin::ListBundlesResponse>, Status> {
        reply(self.list_bundles_inner(request.into_inner()).await)
    }

    async fn delete_bundle(
        &self,
        request: Request<admin::DeleteBundleRequest>,
    ) -> std::result::Result<Response<admin::DeleteBundleResponse>, Status> {
        reply(self.delete_bundle_inner(request.into_inner()).await)
    }
}
