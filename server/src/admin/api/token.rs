//! `CreateJoinToken`: single-use join tokens, with an optional alias entry. The token is
//! returned once and never logged (only its id).

use carapace_core::{RegistrationEntry, Selector, SelectorSet};
use carapace_proto::admin::{CreateJoinTokenRequest, JoinToken};

use super::AdminApi;
use super::fields::{deadline, new_entry_id, optional_id, ttl_or_default};
use crate::node_attestor::generate_join_token;
use carapace_core::clock::unix_now;

use crate::Result;

impl AdminApi {
    pub(super) async fn create_join_token_inner(
        &self,
        req: CreateJoinTokenRequest,
    ) -> Result<JoinToken> {
        let ttl = ttl_or_default(
            "ttl",
            req.ttl,
            self.settings.default_join_token_ttl,
            carapace_core::limits::MAX_JOIN_TOKEN_TTL,
        )?;
        let alias_id = optional_id("spiffe_id", &req.spiffe_id)?;
        let now = unix_now();
        let expires_at = deadline("ttl", now, ttl)?;
        let generated = generate_join_token();
        let agent_id = self
            .ca
            .trust_domain()
            .agent_id("join_token", &generated.id)?;
        let alias = match alias_id {
            Some(spiffe_id) => Some(RegistrationEntry {
                federates_with: Vec::new(),
                id: new_entry_id()?,
                spiffe_id,
                parent_id: agent_id.clone(),
                selectors: [Selector::new("join_token", &generated.id)?]
                    .into_iter()
                    .collect::<SelectorSet>(),
                x509_svid_ttl: None,
                jwt_svid_ttl: None,
                jwt_svid_include_jti: false,
                dns_names: Vec::new(),
                hint: String::new(),
                admin: false,
                downstream: false,
                expires_at: None,
                revision: 0,
                created_at: now,
            }),
            None => None,
        };
        let alias_log = alias
            .as_ref()
            .map(|a| (a.id.to_string(), a.spiffe_id.to_string()));
        self.cache
            .create_join_token(
                &generated.id,
                &generated.secret_hash,
                expires_at,
                now,
                alias,
            )
            .await?;
        match alias_log {
            Some((entry_id, spiffe_id)) => tracing::info!(
                token_id = generated.id,
                agent_id = %agent_id,
                expires_at,
                entry_id,
                spiffe_id,
                "created join token with an alias entry"
            ),
            None => {
                tracing::info!(token_id = generated.id, agent_id = %agent_id, expires_at, "created join token")
            }
        }
        Ok(JoinToken {
            token: generated.token.as_str().to_owned(),
            expires_at,
            agent_id: agent_id.to_string(),
        })
    }
}
