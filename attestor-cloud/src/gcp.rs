//! `gcp_iit`: Google Compute Engine instance identity tokens.
//!
//! # Evidence
//!
//! The agent asks the instance's metadata server for an identity token of the instance's
//! service account, `GET /computeMetadata/v1/instance/service-accounts/<sa>/identity?
//! audience=<audience>&format=full` with `Metadata-Flavor: Google` (the header that makes
//! the metadata server refuse requests a browser or a proxy could be tricked into
//! sending). Google signs it: an RS256 JWT whose `google.compute_engine` claims (present
//! only with `format=full`) name the project, zone and instance. The agent sends it as
//! `{"version":1,"token":"<jwt>"}`; there is no challenge.
//!
//! # What the server verifies
//!
//! 1. The signature, with a key from the configured key set (Google's JWKS or its
//!    certificate map: a file refreshed by the operator, or fetched from `keys_url` in
//!    the background; see [`crate::jwt`] and [`crate::keys`]): `alg` RS256 only, the
//!    `kid` must be in the set, `exp`/`nbf`/`iat` within `clock_skew`.
//! 2. `iss` is Google's, `https://accounts.google.com` or `accounts.google.com` (SPIRE's
//!    `gcp_iit` does not check it; Google signs other token kinds with the same keys).
//! 3. `aud` is the configured `audience`. The token is a bearer credential anyone who sees
//!    it can replay, and any service on the VM can mint one for any audience: the audience
//!    must therefore be unique to this trust domain (its SPIFFE ID, say), so that a token
//!    minted for another deployment, or by this instance for another relying party, is
//!    useless here, and one presented here is useless elsewhere.
//! 4. The `google.compute_engine` claims are present (a token without them was requested
//!    without `format=full`) and `project_id` is in `projectid_allowlist`.
//! 5. Trust on first use ([`crate::tofu`]): the token is not bound to this connection, so
//!    each instance (`PROJECT/INSTANCE_ID`) attests once unless `allow_reattestation`.
//!
//! # Result
//!
//! Agent ID `spiffe://<td>/spire/agent/gcp_iit/<project_id>/<instance_id>`; selectors
//! `gcp_iit:project:<project_id>`, `gcp_iit:zone:<zone>`,
//! `gcp_iit:instance_name:<instance_name>`, `gcp_iit:instance_id:<instance_id>` and, when
//! the token carries `email`, `gcp_iit:service_account:<email>`.
//!
//! # Server settings (`[node_attestor.gcp_iit]`, [`GcpServerConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `keys_path` | | Google's signing keys in a file: a JWKS (`https://www.googleapis.com/oauth2/v3/certs`) or the certificate map (`…/oauth2/v1/certs`); relative to the server's data dir; re-read when it changes |
//! | `keys_url` | | instead of `keys_path`, an `https://` URL to fetch the keys from, e.g. `https://www.googleapis.com/oauth2/v3/certs`; fetched in the background, never at attestation time |
//! | `keys_refresh` | `1h` | with `keys_url`: how often the keys are fetched again (`1m` to `24h`); a failed fetch keeps the last good keys and is retried after 30 s, doubling |
//! | `keys_ca_file` | the system's trust store | with `keys_url`: PEM CA certificates trusted for it, relative to the server's data dir |
//! | `audience` | (required) | the `aud` tokens must carry, unique to this trust domain |
//! | `projectid_allowlist` | (required) | projects whose instances may attest |
//! | `allow_reattestation` | `false` | let an instance attest more than once |
//! | `clock_skew` | `30s` | leeway on `exp`, `nbf` and `iat` (at most `5m`) |
//!
//! Exactly one of `keys_path` and `keys_url` is required. A `keys_url` is fetched over
//! authenticated HTTPS only (`http://` is refused): at startup and then every
//! `keys_refresh`, by a background task; until its first fetch succeeds, attestations
//! fail as unavailable (the agent retries). See [`crate::keys`].
//!
//! # Agent settings (`[node_attestor.gcp_iit]`, [`GcpAgentConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `audience` | (required) | must equal the server's |
//! | `service_account` | `default` | the service account whose identity token to fetch (`default` or its email) |
//! | `metadata_url` | `http://metadata.google.internal` | the metadata server |
//! | `timeout` | `5s` | deadline of the metadata request |

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

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
pub const PLUGIN_NAME: &str = "gcp_iit";

/// The issuers Google's identity tokens carry.
pub const ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];

/// The agent's default metadata server.
pub const DEFAULT_METADATA_URL: &str = "http://metadata.google.internal";

/// The agent's default service account.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

fn default_metadata_url() -> String {
    DEFAULT_METADATA_URL.to_owned()
}

fn default_service_account() -> String {
    DEFAULT_SERVICE_ACCOUNT.to_owned()
}

/// Settings of `[node_attestor.gcp_iit]` on the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpServerConfig {
    /// Google's token signing keys in a file: a JWKS or Google's `{kid: PEM
    /// certificate}` map, relative to the base directory given to
    /// [`GcpIitAttestor::new`]. Re-read when the file changes. Exactly one of this and
    /// `keys_url`.
    #[serde(default)]
    pub keys_path: Option<PathBuf>,
    /// An `https://` URL serving the keys (same formats), fetched in the background at
    /// startup and every `keys_refresh`, never at attestation time. Exactly one of this
    /// and `keys_path`.
    #[serde(default)]
    pub keys_url: Option<String>,
    /// With `keys_url`: how often it is fetched again (unset: [`crate::keys::DEFAULT_REFRESH`],
    /// 1 h; from 1 min to 24 h).
    #[serde(default, with = "humantime_serde")]
    pub keys_refresh: Option<Duration>,
    /// With `keys_url`: PEM certificates of the CAs trusted for it instead of the
    /// system's trust store, relative to the base directory given to
    /// [`GcpIitAttestor::new`].
    #[serde(default)]
    pub keys_ca_file: Option<PathBuf>,
    /// The audience (`aud`) tokens must be minted for. Required, no default: it must be
    /// unique to this trust domain (its SPIFFE ID, e.g. `spiffe://example.org`) so that
    /// a token minted for another deployment or relying party is useless here.
    pub audience: String,
    /// The GCP projects whose instances may attest.
    pub projectid_allowlist: Vec<String>,
    /// Whether an instance may attest more than once (default false: trust on first use).
    #[serde(default)]
    pub allow_reattestation: bool,
    /// Leeway on the token's `exp`, `nbf` and `iat` (default 30 s).
    #[serde(default = "jwt::default_clock_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
}

impl GcpServerConfig {
    /// The files these settings name, for `validate`: `keys_path`, or with `keys_url`
    /// its `keys_ca_file`, resolved against `data_dir` as [`GcpIitAttestor::new`] does.
    pub fn files(&self, data_dir: &std::path::Path) -> Vec<NamedFile> {
        self.key_settings().files(data_dir)
    }

    /// Every problem with the settings that can be found without reading files.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = self.key_settings().problems();
        problems.extend(jwt::audience_problem(&self.audience));
        if self.projectid_allowlist.is_empty() {
            problems.push(
                "projectid_allowlist is empty: list the projects whose instances may attest, \
                 e.g. [\"my-project\"]"
                    .into(),
            );
        }
        for p in &self.projectid_allowlist {
            if path_segment(PLUGIN_NAME, "project", p).is_err() {
                problems.push(format!(
                    "projectid_allowlist: {} is not a project ID usable in a SPIFFE ID \
                     (letters, digits, '-', '.', '_')",
                    shown(p)
                ));
            }
        }
        problems.extend(jwt::clock_skew_problem(self.clock_skew));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn key_settings(&self) -> KeySettings<'_> {
        KeySettings {
            prefix: "",
            keys_path: self.keys_path.as_deref(),
            keys_url: self.keys_url.as_deref(),
            keys_refresh: self.keys_refresh,
            keys_ca_file: self.keys_ca_file.as_deref(),
        }
    }
}

/// The server half of `gcp_iit` node attestation.
#[derive(Debug)]
pub struct GcpIitAttestor {
    keys: Keys,
    audience: String,
    projects: BTreeSet<String>,
    allow_reattestation: bool,
    clock_skew: Duration,
    store: Arc<dyn NodeStateStore>,
    /// The time tokens are checked at and instances attest.
    clock: Arc<dyn Clock>,
}

impl GcpIitAttestor {
    /// Checks the settings and opens the key source: loads the key file (`keys_path`,
    /// relative to the context's data dir), or starts fetching `keys_url` in the background (which
    /// needs a running tokio runtime; the first fetch has not happened when this
    /// returns). `store` records the instances that attested (trust on first use).
    pub fn new(
        cfg: &GcpServerConfig,
        ctx: &PluginContext,
        store: Arc<dyn NodeStateStore>,
    ) -> Result<Self, Error> {
        Self::new_with_fetch_timing(cfg, ctx, store, FetchTiming::default())
    }

    /// For tests only: [`GcpIitAttestor::new`] with the background fetch's intervals
    /// replaced by `timing` (refreshes and retries in milliseconds, which the settings
    /// refuse). The settings are validated as usual.
    #[doc(hidden)]
    pub fn new_with_fetch_timing(
        cfg: &GcpServerConfig,
        ctx: &PluginContext,
        store: Arc<dyn NodeStateStore>,
        timing: FetchTiming,
    ) -> Result<Self, Error> {
        cfg.validate()
            .map_err(|p| config_err(PLUGIN_NAME, p.join("; ")))?;
        let keys =
            cfg.key_settings()
                .open(PLUGIN_NAME, PLUGIN_NAME.to_owned(), &ctx.data_dir, timing)?;
        tracing::info!(
            keys = %keys.source(),
            kids = ?keys.kids(),
            audience = %cfg.audience,
            projects = ?cfg.projectid_allowlist,
            allow_reattestation = cfg.allow_reattestation,
            "gcp_iit node attestation ready"
        );
        Ok(GcpIitAttestor {
            keys,
            audience: cfg.audience.clone(),
            projects: cfg.projectid_allowlist.iter().cloned().collect(),
            allow_reattestation: cfg.allow_reattestation,
            clock_skew: cfg.clock_skew,
            store,
            clock: ctx.clock.clone(),
        })
    }
}

/// The instance described by a verified token's `google.compute_engine` claims.
#[derive(Debug)]
struct Instance<'a> {
    project_id: &'a str,
    zone: &'a str,
    instance_id: &'a str,
    instance_name: &'a str,
}

fn instance(claims: &jwt::Claims) -> Result<Instance<'_>, Error> {
    let ce = claims
        .get("google")
        .and_then(|g| g.get("compute_engine"))
        .and_then(Value::as_object)
        .ok_or_else(|| {
            rejected(
                PLUGIN_NAME,
                "the token has no google.compute_engine claims: the agent must request it with \
                 format=full",
            )
        })?;
    let field = |name: &str| match ce.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.as_str()),
        _ => Err(rejected(
            PLUGIN_NAME,
            format!("the token's google.compute_engine.{name} is missing or not a string"),
        )),
    };
    Ok(Instance {
        project_id: field("project_id")?,
        zone: field("zone")?,
        instance_id: field("instance_id")?,
        instance_name: field("instance_name")?,
    })
}

#[async_trait::async_trait]
impl NodeAttestor for GcpIitAttestor {
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
        let keys = self.keys.current()?;
        let claims = jwt::verify_rs256(&token, &keys, self.clock.now(), self.clock_skew)
            .map_err(|e| rejected(PLUGIN_NAME, e))?;
        let err = |e: String| rejected(PLUGIN_NAME, e);
        let iss = claims.required_string("iss").map_err(err)?;
        if !ISSUERS.contains(&iss) {
            return Err(rejected(
                PLUGIN_NAME,
                format!(
                    "the token's issuer {} is not Google's ({})",
                    shown(iss),
                    ISSUERS.join(" or ")
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
        let inst = instance(&claims)?;
        if !self.projects.contains(inst.project_id) {
            return Err(rejected(
                PLUGIN_NAME,
                format!(
                    "project {} is not in projectid_allowlist",
                    shown(inst.project_id)
                ),
            ));
        }
        let email = claims.string("email").map_err(err)?;
        let agent_path = format!(
            "{}/{}",
            path_segment(PLUGIN_NAME, "project_id", inst.project_id)?,
            path_segment(PLUGIN_NAME, "instance_id", inst.instance_id)?
        );
        let mut selectors = SelectorSet::new();
        for value in [
            format!("project:{}", inst.project_id),
            format!("zone:{}", inst.zone),
            format!("instance_name:{}", inst.instance_name),
            format!("instance_id:{}", inst.instance_id),
        ]
        .into_iter()
        .chain(email.map(|e| format!("service_account:{e}")))
        {
            selectors.insert(selector(PLUGIN_NAME, value)?);
        }
        tofu::record_attestation(
            self.store.as_ref(),
            &tofu::record_key(&agent_path),
            &agent_path,
            self.allow_reattestation,
            self.clock.as_ref(),
        )
        .await?;
        tracing::info!(
            agent_path = %agent_path,
            zone = inst.zone,
            instance_name = inst.instance_name,
            service_account = email.unwrap_or(""),
            "gcp_iit: instance attested"
        );
        Ok(AttestationStep::Done(AttestationResult {
            agent_path,
            selectors,
            can_reattest: self.allow_reattestation,
        }))
    }
}

/// Settings of `[node_attestor.gcp_iit]` on the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpAgentConfig {
    /// The audience to request the token for; must equal the server's `audience`.
    pub audience: String,
    /// The service account whose identity token is fetched: `default` or its email.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The metadata server (default [`DEFAULT_METADATA_URL`]).
    #[serde(default = "default_metadata_url")]
    pub metadata_url: String,
    /// Deadline of the metadata request (default 5 s).
    #[serde(default = "jwt::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl GcpAgentConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        problems.extend(jwt::audience_problem(&self.audience));
        let sa = &self.service_account;
        if sa.is_empty()
            || sa.len() > 255
            || !sa
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'@' | b'.' | b'-' | b'_'))
        {
            problems.push(format!(
                "service_account {}: expected \"default\" or a service account email",
                shown(sa)
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

/// The agent half of `gcp_iit` node attestation.
#[derive(Debug)]
pub struct GcpIitAttestorClient {
    cfg: GcpAgentConfig,
    base: BaseUrl,
}

impl GcpIitAttestorClient {
    /// An attestor with `cfg`; nothing is fetched until the first [`payload`].
    ///
    /// [`payload`]: NodeAttestorClient::payload
    pub fn new(cfg: &GcpAgentConfig) -> Result<Self, Error> {
        cfg.validate()
            .map_err(|p| config_err(PLUGIN_NAME, p.join("; ")))?;
        let base = BaseUrl::parse(&cfg.metadata_url).map_err(|e| config_err(PLUGIN_NAME, e))?;
        Ok(GcpIitAttestorClient {
            cfg: cfg.clone(),
            base,
        })
    }

    /// The metadata path and query of the identity token.
    fn identity_path(&self) -> String {
        format!(
            "/computeMetadata/v1/instance/service-accounts/{}/identity?audience={}&format=full",
            self.cfg.service_account,
            query_escape(&self.cfg.audience)
        )
    }
}

#[async_trait::async_trait]
impl NodeAttestorClient for GcpIitAttestorClient {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn payload(&self, _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        let body = self
            .base
            .request(
                "GET",
                &self.identity_path(),
                &[("Metadata-Flavor", "Google")],
                self.cfg.timeout,
            )
            .await?
            .ok_body("gcp_iit: the metadata server's identity token")?;
        let token = String::from_utf8(body).map_err(|_| {
            rejected(
                PLUGIN_NAME,
                "the metadata server's identity token is not UTF-8",
            )
        })?;
        let token = token.trim();
        jwt::check_fetched_token(PLUGIN_NAME, "the metadata server's identity token", token)?;
        jwt::encode_payload(token)
    }

    async fn answer(&self, _challenge: &[u8], _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        Err(rejected(
            PLUGIN_NAME,
            "the server sent a challenge, but gcp_iit attestation has none",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_identity_path_escapes_the_audience() {
        let c = GcpIitAttestorClient::new(&GcpAgentConfig {
            audience: "spiffe://example.org/a b".into(),
            service_account: "sa@p.iam.gserviceaccount.com".into(),
            metadata_url: default_metadata_url(),
            timeout: jwt::default_timeout(),
        })
        .unwrap();
        assert_eq!(
            c.identity_path(),
            "/computeMetadata/v1/instance/service-accounts/sa@p.iam.gserviceaccount.com/\
             identity?audience=spiffe%3A%2F%2Fexample.org%2Fa%20b&format=full"
        );
    }
}
