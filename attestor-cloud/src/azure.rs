//! `azure_msi`: Azure managed-identity access tokens.
//!
//! # Evidence
//!
//! The agent asks the Azure Instance Metadata Service (IMDS) for an access token of the
//! VM's managed identity, `GET /metadata/identity/oauth2/token?api-version=2018-02-01&
//! resource=<audience>[&client_id=<id>]` with `Metadata: true` (IMDS refuses requests
//! without it, which a proxy or a server-side request forgery would not add). Microsoft
//! Entra ID signs it: an RS256 JWT with a `kid` from the tenant's key set. The agent sends
//! it as `{"version":1,"token":"<jwt>"}`; there is no challenge.
//!
//! # What the server verifies
//!
//! 1. The token's `tid` (read before verification, and used for nothing but this) picks
//!    the tenant's key set; a tenant that is not configured is refused. Nothing else is
//!    read until the signature verified with a key of THAT tenant's set (`alg` RS256 only,
//!    `kid` in the set, `exp`/`nbf`/`iat` within `clock_skew`): a key trusted for tenant
//!    B never vouches for a token claiming tenant A.
//! 2. `iss` is the tenant's own: `https://sts.windows.net/<tid>/` (v1 tokens) or
//!    `https://login.microsoftonline.com/<tid>/v2.0` (v2).
//! 3. `aud` is the configured `audience`: the application ID URI (or, for an application
//!    issuing v2 tokens, its client ID) of an app registration made for node attestation,
//!    e.g. `api://carapace-node-attestation`. Not Azure Resource Manager's
//!    `https://management.azure.com/`, which is refused: such a token is a bearer
//!    credential for Azure's management API as that VM, and a server (or anyone who read
//!    its logs or traffic) holding it could act as the VM in Azure.
//! 4. `sub` is the principal (for a managed identity, its service principal's object ID)
//!    and must equal `oid` when both are present.
//! 5. Trust on first use ([`crate::tofu`]): the token is not bound to this connection, so
//!    each principal (`TENANT/PRINCIPAL`) attests once unless `allow_reattestation`.
//!
//! Operator notes: any principal of an allowed tenant that can obtain a token for the
//! audience can attest, so set "assignment required" on the app registration and assign
//! only the VMs' managed identities. A user-assigned identity shared by several VMs is one
//! principal, hence one agent ID: with trust on first use only the first VM attests; use
//! system-assigned identities (one per VM).
//!
//! # Result
//!
//! Agent ID `spiffe://<td>/spire/agent/azure_msi/<tenant>/<principal>`; selectors
//! `azure_msi:tenant:<tid>`, `azure_msi:principal:<sub>` and, when the token's `xms_mirid`
//! names a VM (`/subscriptions/<s>/resourcegroups/<rg>/providers/Microsoft.Compute/
//! virtualMachines/<name>`, as a system-assigned identity's does),
//! `azure_msi:subscription:<s>`, `azure_msi:resource_group:<rg>` and
//! `azure_msi:vm_name:<name>`, lowercased (Azure resource names are case-insensitive).
//! Any other `xms_mirid` (a user-assigned identity's, or a malformed one) adds nothing.
//!
//! # Server settings (`[node_attestor.azure_msi]`, [`AzureServerConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `audience` | (required) | the `aud` tokens must carry |
//! | `tenants.<tenant id>.keys_path` | | per allowed tenant (a GUID), its JWKS (`https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys`) in a file, relative to the server's data dir; re-read when it changes |
//! | `tenants.<tenant id>.keys_url` | | instead of `keys_path`, an `https://` URL to fetch the tenant's JWKS from, e.g. `https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys`; fetched in the background, never at attestation time |
//! | `tenants.<tenant id>.keys_refresh` | `1h` | with `keys_url`: how often it is fetched again (`1m` to `24h`); a failed fetch keeps the last good keys and is retried after 30 s, doubling |
//! | `tenants.<tenant id>.keys_ca_file` | the system's trust store | with `keys_url`: PEM CA certificates trusted for it, relative to the server's data dir |
//! | `allow_reattestation` | `false` | let a principal attest more than once |
//! | `clock_skew` | `30s` | leeway on `exp`, `nbf` and `iat` (at most `5m`) |
//!
//! Each tenant needs exactly one of `keys_path` and `keys_url`. A `keys_url` is fetched
//! over authenticated HTTPS only (`http://` is refused): at startup and then every
//! `keys_refresh`, by a background task per tenant; until a tenant's first fetch
//! succeeds, its principals' attestations fail as unavailable (the agent retries). See
//! [`crate::keys`].
//!
//! # Agent settings (`[node_attestor.azure_msi]`, [`AzureAgentConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `audience` | (required) | the resource to request the token for; must match the server's |
//! | `client_id` | | a user-assigned identity's client ID (default: the system-assigned identity) |
//! | `metadata_url` | `http://169.254.169.254` | IMDS |
//! | `timeout` | `5s` | deadline of the IMDS request |

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use carapace_core::clock::Clock;
use carapace_core::files::NamedFile;
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationStep, NodeAttestor, NodeAttestorClient,
    NodeStateStore, PluginContext,
};
use carapace_core::{Error, SelectorSet};

use crate::http::{BaseUrl, query_escape};
use crate::jwt::{self, shown};
use crate::keys::{FetchTiming, KeySettings, Keys};
use crate::{config_err, path_segment, rejected, selector, tofu};

/// The plugin name on both sides, and the selector type.
pub const PLUGIN_NAME: &str = "azure_msi";

/// The agent's default IMDS address.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";

/// The IMDS API version the agent asks for.
pub const IMDS_API_VERSION: &str = "2018-02-01";

/// Audiences refused on the server: Azure's own APIs, whose tokens must never be handed
/// to a third party.
const AZURE_API_AUDIENCES: &[&str] = &[
    "https://management.azure.com",
    "https://management.core.windows.net",
    "https://graph.microsoft.com",
    "https://vault.azure.net",
    "https://storage.azure.com",
];

fn default_metadata_url() -> String {
    DEFAULT_METADATA_URL.to_owned()
}

/// Whether `s` is a GUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex (either case).
pub fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// One allowed tenant: where its signing keys come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's token signing keys in a file (a JWKS), relative to the base
    /// directory given to [`AzureMsiAttestor::new`]. Re-read when the file changes.
    /// Exactly one of this and `keys_url`.
    #[serde(default)]
    pub keys_path: Option<PathBuf>,
    /// An `https://` URL serving the tenant's JWKS, fetched in the background at startup
    /// and every `keys_refresh`, never at attestation time. Exactly one of this and
    /// `keys_path`.
    #[serde(default)]
    pub keys_url: Option<String>,
    /// With `keys_url`: how often it is fetched again (unset:
    /// [`crate::keys::DEFAULT_REFRESH`], 1 h; from 1 min to 24 h).
    #[serde(default, with = "humantime_serde")]
    pub keys_refresh: Option<Duration>,
    /// With `keys_url`: PEM certificates of the CAs trusted for it instead of the
    /// system's trust store, relative to the base directory given to
    /// [`AzureMsiAttestor::new`].
    #[serde(default)]
    pub keys_ca_file: Option<PathBuf>,
}

impl TenantConfig {
    fn key_settings<'a>(&'a self, prefix: &'a str) -> KeySettings<'a> {
        KeySettings {
            prefix,
            keys_path: self.keys_path.as_deref(),
            keys_url: self.keys_url.as_deref(),
            keys_refresh: self.keys_refresh,
            keys_ca_file: self.keys_ca_file.as_deref(),
        }
    }
}

/// Settings of `[node_attestor.azure_msi]` on the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureServerConfig {
    /// The audience (`aud`) tokens must carry: the application ID URI (or client ID) of
    /// an app registration for node attestation, e.g. `api://carapace-node-attestation`.
    /// Required; Azure's own APIs (`https://management.azure.com/`, ...) are refused, as
    /// a token for them would let whoever reads it act as the VM in Azure.
    pub audience: String,
    /// The allowed tenants, by tenant ID (a GUID), each with its own key set: a token is
    /// verified only with its own tenant's keys.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Whether a principal may attest more than once (default false: trust on first use).
    #[serde(default)]
    pub allow_reattestation: bool,
    /// Leeway on the token's `exp`, `nbf` and `iat` (default 30 s).
    #[serde(default = "jwt::default_clock_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
}

impl AzureServerConfig {
    /// The files these settings name, for `validate`: each tenant's `keys_path`, or with
    /// `keys_url` its `keys_ca_file`, resolved against `data_dir` as
    /// [`AzureMsiAttestor::new`] does.
    pub fn files(&self, data_dir: &std::path::Path) -> Vec<NamedFile> {
        self.tenants
            .iter()
            .flat_map(|(tid, t)| t.key_settings(&format!("tenants.{tid}.")).files(data_dir))
            .collect()
    }

    /// Every problem with the settings that can be found without reading files.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        problems.extend(jwt::audience_problem(&self.audience));
        let bare = self.audience.trim_end_matches('/').to_ascii_lowercase();
        if AZURE_API_AUDIENCES.contains(&bare.as_str()) {
            problems.push(format!(
                "audience {} is an Azure API: a token for it would let the server (or anyone \
                 who reads it) call that API as the VM; register an application for node \
                 attestation and use its application ID URI, e.g. \
                 \"api://carapace-node-attestation\"",
                shown(&self.audience)
            ));
        }
        if self.tenants.is_empty() {
            problems.push(
                "tenants is empty: add [node_attestor.azure_msi.tenants.\"<tenant id>\"] with \
                 the tenant's keys_path or keys_url for each tenant whose VMs may attest"
                    .into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (tid, t) in &self.tenants {
            if !is_guid(tid) {
                problems.push(format!(
                    "tenants: {} is not a tenant ID (a GUID such as \
                     72f988bf-86f1-41af-91ab-2d7cd011db47)",
                    shown(tid)
                ));
            } else if !seen.insert(tid.to_ascii_lowercase()) {
                problems.push(format!("tenants: {tid} is listed twice"));
            }
            problems.extend(t.key_settings(&format!("tenants.{tid}.")).problems());
        }
        problems.extend(jwt::clock_skew_problem(self.clock_skew));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// The server half of `azure_msi` node attestation.
#[derive(Debug)]
pub struct AzureMsiAttestor {
    audience: String,
    /// Lowercase tenant ID → its keys.
    tenants: BTreeMap<String, Keys>,
    allow_reattestation: bool,
    clock_skew: Duration,
    store: Arc<dyn NodeStateStore>,
    /// The time tokens are checked at and instances attest.
    clock: Arc<dyn Clock>,
}

impl AzureMsiAttestor {
    /// Checks the settings and opens every tenant's key source: loads its key file
    /// (relative to the context's data dir), or starts fetching its `keys_url` in the background
    /// (which needs a running tokio runtime; the first fetch has not happened when this
    /// returns). `store` records the principals that attested (trust on first use).
    pub fn new(
        cfg: &AzureServerConfig,
        ctx: &PluginContext,
        store: Arc<dyn NodeStateStore>,
    ) -> Result<Self, Error> {
        Self::new_with_fetch_timing(cfg, ctx, store, FetchTiming::default())
    }

    /// For tests only: [`AzureMsiAttestor::new`] with the background fetches' intervals
    /// replaced by `timing` (refreshes and retries in milliseconds, which the settings
    /// refuse). The settings are validated as usual.
    #[doc(hidden)]
    pub fn new_with_fetch_timing(
        cfg: &AzureServerConfig,
        ctx: &PluginContext,
        store: Arc<dyn NodeStateStore>,
        timing: FetchTiming,
    ) -> Result<Self, Error> {
        cfg.validate()
            .map_err(|p| config_err(PLUGIN_NAME, p.join("; ")))?;
        let mut tenants = BTreeMap::new();
        for (tid, t) in &cfg.tenants {
            let lower = tid.to_ascii_lowercase();
            let keys = t.key_settings(&format!("tenants.{tid}.")).open(
                PLUGIN_NAME,
                format!("{PLUGIN_NAME}: tenant {lower}"),
                &ctx.data_dir,
                timing,
            )?;
            tenants.insert(lower, keys);
        }
        tracing::info!(
            audience = %cfg.audience,
            tenants = ?tenants
                .iter()
                .map(|(tid, k)| format!("{tid}: {}", k.source()))
                .collect::<Vec<_>>(),
            allow_reattestation = cfg.allow_reattestation,
            "azure_msi node attestation ready"
        );
        Ok(AzureMsiAttestor {
            audience: cfg.audience.clone(),
            tenants,
            allow_reattestation: cfg.allow_reattestation,
            clock_skew: cfg.clock_skew,
            store,
            clock: ctx.clock.clone(),
        })
    }
}

/// The VM a managed identity's `xms_mirid` names: (subscription, resource group, name),
/// lowercased; `None` for anything but exactly
/// `/subscriptions/<guid>/resourcegroups/<rg>/providers/Microsoft.Compute/virtualMachines/<name>`
/// (fixed segments compared case-insensitively).
pub fn parse_vm_resource_id(mirid: &str) -> Option<(String, String, String)> {
    let segs: Vec<&str> = mirid.split('/').collect();
    let [
        "",
        subscriptions,
        sub,
        resource_groups,
        rg,
        providers,
        namespace,
        kind,
        name,
    ] = segs[..]
    else {
        return None;
    };
    let fixed = [
        (subscriptions, "subscriptions"),
        (resource_groups, "resourcegroups"),
        (providers, "providers"),
        (namespace, "Microsoft.Compute"),
        (kind, "virtualMachines"),
    ];
    let plain =
        |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(|c| c.is_control() || c == ' ');
    if fixed
        .iter()
        .all(|(got, want)| got.eq_ignore_ascii_case(want))
        && is_guid(sub)
        && plain(rg)
        && plain(name)
    {
        Some((
            sub.to_ascii_lowercase(),
            rg.to_lowercase(),
            name.to_lowercase(),
        ))
    } else {
        None
    }
}

#[async_trait::async_trait]
impl NodeAttestor for AzureMsiAttestor {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    /// This instance's trust-on-first-use record: evicting the agent lets it attest again.
    fn forget_on_eviction(&self, agent_path: &str) -> Option<String> {
        Some(tofu::record_key(agent_path))
    }

    async fn begin(
        &self,
        payload: &[u8],
        _ctx: &AttestationContext,
    ) -> Result<AttestationStep, Error> {
        let token = jwt::decode_payload(PLUGIN_NAME, payload)?;
        let err = |e: String| rejected(PLUGIN_NAME, e);
        // Unverified: only to pick the key set.
        let unverified = jwt::unverified_claims(&token).map_err(err)?;
        let claimed_tid = unverified.required_string("tid").map_err(err)?;
        let Some((tid, keys)) = self.tenants.get_key_value(claimed_tid) else {
            return Err(rejected(
                PLUGIN_NAME,
                format!(
                    "tenant {} is not configured (tenants: {})",
                    shown(claimed_tid),
                    self.tenants
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        let keys = keys.current()?;
        let claims = jwt::verify_rs256(&token, &keys, self.clock.now(), self.clock_skew)
            .map_err(|e| rejected(PLUGIN_NAME, format!("tenant {tid}: {e}")))?;
        // Verified from here on.
        if claims.required_string("tid").map_err(err)? != tid {
            return Err(rejected(
                PLUGIN_NAME,
                "the token's tid changed under verification",
            ));
        }
        let iss = claims.required_string("iss").map_err(err)?;
        let v1 = format!("https://sts.windows.net/{tid}/");
        let v2 = format!("https://login.microsoftonline.com/{tid}/v2.0");
        if iss != v1 && iss != v2 {
            return Err(rejected(
                PLUGIN_NAME,
                format!(
                    "the token's issuer {} is not tenant {tid}'s ({v1} or {v2})",
                    shown(iss)
                ),
            ));
        }
        if !claims.has_audience(&self.audience) {
            return Err(rejected(
                PLUGIN_NAME,
                format!(
                    "the token's audience {} is not the configured audience {}",
                    claims.audience_shown(),
                    shown(&self.audience)
                ),
            ));
        }
        let sub = claims.required_string("sub").map_err(err)?;
        if let Some(oid) = claims.string("oid").map_err(err)?
            && oid != sub
        {
            return Err(rejected(
                PLUGIN_NAME,
                format!(
                    "the token's sub {} and oid {} differ: not a managed identity's token",
                    shown(sub),
                    shown(oid)
                ),
            ));
        }
        let agent_path = format!(
            "{}/{}",
            path_segment(PLUGIN_NAME, "tenant", tid)?,
            path_segment(PLUGIN_NAME, "principal (sub)", sub)?
        );
        let mut values = vec![format!("tenant:{tid}"), format!("principal:{sub}")];
        // Selectors when it names a VM; anything else adds nothing (it is not required).
        if let Some(mirid) = claims.get("xms_mirid") {
            match mirid.as_str().and_then(parse_vm_resource_id) {
                Some((subscription, rg, name)) => values.extend([
                    format!("subscription:{subscription}"),
                    format!("resource_group:{rg}"),
                    format!("vm_name:{name}"),
                ]),
                None => tracing::debug!(
                    xms_mirid = %shown(&mirid.to_string()),
                    "azure_msi: xms_mirid does not name a virtual machine; no subscription selectors"
                ),
            }
        }
        let mut selectors = SelectorSet::new();
        for v in values {
            selectors.insert(selector(PLUGIN_NAME, v)?);
        }
        tofu::record_attestation(
            self.store.as_ref(),
            &tofu::record_key(&agent_path),
            &agent_path,
            self.allow_reattestation,
            self.clock.as_ref(),
        )
        .await?;
        tracing::info!(agent_path = %agent_path, selectors = ?selectors, "azure_msi: principal attested");
        Ok(AttestationStep::Done(AttestationResult {
            agent_path,
            selectors,
            can_reattest: self.allow_reattestation,
        }))
    }
}

/// Settings of `[node_attestor.azure_msi]` on the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureAgentConfig {
    /// The resource to request the token for (IMDS `resource`); it must come out as the
    /// server's `audience` in the token's `aud`.
    pub audience: String,
    /// The client ID of a user-assigned identity; default the system-assigned identity.
    pub client_id: Option<String>,
    /// The Instance Metadata Service (default [`DEFAULT_METADATA_URL`]).
    #[serde(default = "default_metadata_url")]
    pub metadata_url: String,
    /// Deadline of the IMDS request (default 5 s).
    #[serde(default = "jwt::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl AzureAgentConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        problems.extend(jwt::audience_problem(&self.audience));
        if let Some(id) = &self.client_id
            && !is_guid(id)
        {
            problems.push(format!(
                "client_id {} is not a client ID (a GUID)",
                shown(id)
            ));
        }
        if let Err(e) = BaseUrl::parse(&self.metadata_url) {
            problems.push(format!("metadata_url: {e}"));
        }
        problems.extend(jwt::timeout_problem(self.timeout));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// IMDS's token response; only the token is read.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenResponse { access_token: <redacted> }")
    }
}

/// The agent half of `azure_msi` node attestation.
#[derive(Debug)]
pub struct AzureMsiAttestorClient {
    cfg: AzureAgentConfig,
    base: BaseUrl,
}

impl AzureMsiAttestorClient {
    /// An attestor with `cfg`; nothing is fetched until the first [`payload`].
    ///
    /// [`payload`]: NodeAttestorClient::payload
    pub fn new(cfg: &AzureAgentConfig) -> Result<Self, Error> {
        cfg.validate()
            .map_err(|p| config_err(PLUGIN_NAME, p.join("; ")))?;
        let base = BaseUrl::parse(&cfg.metadata_url).map_err(|e| config_err(PLUGIN_NAME, e))?;
        Ok(AzureMsiAttestorClient {
            cfg: cfg.clone(),
            base,
        })
    }

    /// The IMDS path and query of the token.
    fn token_path(&self) -> String {
        let mut p = format!(
            "/metadata/identity/oauth2/token?api-version={IMDS_API_VERSION}&resource={}",
            query_escape(&self.cfg.audience)
        );
        if let Some(id) = &self.cfg.client_id {
            p.push_str("&client_id=");
            p.push_str(&query_escape(id));
        }
        p
    }
}

#[async_trait::async_trait]
impl NodeAttestorClient for AzureMsiAttestorClient {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn payload(&self, _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        let body = self
            .base
            .request(
                "GET",
                &self.token_path(),
                &[("Metadata", "true")],
                self.cfg.timeout,
            )
            .await?
            .ok_body("azure_msi: the managed identity token from IMDS")?;
        // The body carries the token: errors say where parsing failed, never what it read.
        let resp: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            rejected(
                PLUGIN_NAME,
                format!(
                    "IMDS's token response is not JSON with an access_token ({:?} error at line \
                     {} column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            )
        })?;
        jwt::check_fetched_token(PLUGIN_NAME, "IMDS's access_token", &resp.access_token)?;
        jwt::encode_payload(&resp.access_token)
    }

    async fn answer(&self, _challenge: &[u8], _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        Err(rejected(
            PLUGIN_NAME,
            "the server sent a challenge, but azure_msi attestation has none",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn guids_are_recognised() {
        assert!(is_guid("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(is_guid("72F988BF-86F1-41AF-91AB-2D7CD011DB47"));
        for bad in [
            "",
            "72f988bf86f141af91ab2d7cd011db47",
            "72f988bf-86f1-41af-91ab-2d7cd011db4",
            "72f988bf-86f1-41af-91ab-2d7cd011db4g",
            "{72f988bf-86f1-41af-91ab-2d7cd011db47}",
            "72f988bf-86f1-41af-91ab_2d7cd011db47",
        ] {
            assert!(!is_guid(bad), "{bad}");
        }
    }

    #[test]
    fn the_token_path_escapes_resource_and_client_id() {
        let mut cfg = AzureAgentConfig {
            audience: "api://carapace node".into(),
            client_id: None,
            metadata_url: default_metadata_url(),
            timeout: jwt::default_timeout(),
        };
        let c = AzureMsiAttestorClient::new(&cfg).unwrap();
        assert_eq!(
            c.token_path(),
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api%3A%2F%2Fcarapace%20node"
        );
        cfg.client_id = Some("11111111-2222-3333-4444-555555555555".into());
        let c = AzureMsiAttestorClient::new(&cfg).unwrap();
        assert!(
            c.token_path()
                .ends_with("&client_id=11111111-2222-3333-4444-555555555555")
        );
    }

    #[test]
    fn vm_resource_ids_parse_strictly() {
        let sub = "0b1f6471-1bf0-4dda-aec3-cb9272f09590";
        assert_eq!(
            parse_vm_resource_id(&format!(
                "/subscriptions/{sub}/resourcegroups/My-RG/providers/Microsoft.Compute/virtualMachines/Web-1"
            )),
            Some((sub.into(), "my-rg".into(), "web-1".into()))
        );
        assert!(
            parse_vm_resource_id(&format!(
                "/SUBSCRIPTIONS/{sub}/resourceGroups/rg/providers/microsoft.compute/VIRTUALMACHINES/vm"
            ))
            .is_some()
        );
        for bad in [
            format!(
                "/subscriptions/{sub}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id"
            ),
            format!("/subscriptions/{sub}/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/"),
            format!("/subscriptions/{sub}/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm/x"),
            format!("subscriptions/{sub}/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm"),
            "/subscriptions/not-a-guid/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm".into(),
            String::new(),
        ] {
            assert_eq!(parse_vm_resource_id(&bad), None, "{bad}");
        }
    }
}
