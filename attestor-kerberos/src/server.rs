//! The server half (`[node_attestor.kerberos]`): a fresh nonce, then the agent's context
//! token accepted with the server's keytab and checked for target, bindings, realm and
//! ticket time.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use carapace_core::Error;
use carapace_core::clock::Clock;
use carapace_core::files::{FileUse, NamedFile};
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationSession, AttestationStep, NodeAttestor,
    PluginContext,
};

use crate::gss::{self, Cred, GssError, Name, NameType, Usage};
use crate::names::{self, Principal};
use crate::wire::{self, Answer, Challenge, Payload};
use crate::{NONCE_LEN, PLUGIN_NAME, channel_bindings, check_keytab, pac, rejected};

/// The MIT name attribute that carries an AD PAC's logon info (KERB_VALIDATION_INFO).
const PAC_LOGON_INFO: &str = "urn:mspac:logon-info";

/// Settings of `[node_attestor.kerberos]` on the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KerberosServerConfig {
    /// The keytab with the service principal's keys (mode 0600 or stricter).
    pub keytab: PathBuf,
    /// The service principal tickets must be for, with its realm:
    /// `carapace/server.example.com@EXAMPLE.COM`.
    pub service_principal: String,
    /// The realms whose hosts may attest.
    pub allowed_realms: Vec<String>,
    /// Realm → DNS domain of AD machine accounts (`NAME$@REALM` is `name.<domain>`);
    /// realms not listed use the realm in lowercase.
    #[serde(default)]
    pub machine_account_domains: BTreeMap<String, String>,
    /// The replay cache file; default `<data_dir>/kerberos.rcache`.
    pub replay_cache: Option<PathBuf>,
}

impl KerberosServerConfig {
    /// The files these settings name, for `validate`: the keytab (a secret, checked as
    /// [`KerberosAttestor::new`] checks it). The replay cache is created when missing.
    pub fn files(&self) -> Vec<NamedFile> {
        vec![NamedFile::new("keytab", &self.keytab, FileUse::Secret)]
    }

    /// Every problem with the settings that can be found without reading files.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = names::check_service_principal(&self.service_principal) {
            problems.push(e);
        }
        if self.allowed_realms.is_empty() {
            problems.push(
                "allowed_realms is empty: list the realms whose hosts may attest, e.g. \
                 [\"EXAMPLE.COM\"]"
                    .into(),
            );
        }
        for realm in &self.allowed_realms {
            if let Err(e) = names::check_realm(realm) {
                problems.push(format!("allowed_realms: {e}"));
            }
        }
        for (realm, domain) in &self.machine_account_domains {
            if !self.allowed_realms.contains(realm) {
                problems.push(format!(
                    "machine_account_domains names realm {realm:?}, which is not in allowed_realms"
                ));
            }
            if domain.is_empty() || domain.contains(['/', '@', ' ']) {
                problems.push(format!(
                    "machine_account_domains.{realm}: {domain:?} is not a DNS domain"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn config_err(reason: String) -> Error {
    Error::PluginConfig {
        plugin: format!("node_attestor.{PLUGIN_NAME}"),
        reason,
    }
}

#[derive(Debug)]
struct Inner {
    keytab: String,
    service_principal: String,
    allowed_realms: Vec<String>,
    machine_account_domains: BTreeMap<String, String>,
    rcache: String,
    /// The time service tickets are checked at.
    clock: Arc<dyn Clock>,
}

impl Inner {
    /// Acceptor credentials for exactly the service principal, from the configured
    /// keytab and replay cache (never the process environment).
    fn acceptor(&self) -> Result<Cred, GssError> {
        let name = Name::import(&self.service_principal, NameType::Principal)?;
        Cred::acquire_from(
            Some(&name),
            Usage::Accept,
            &[("keytab", &self.keytab), ("rcache", &self.rcache)],
        )
    }
}

/// The server half of `kerberos` node attestation.
#[derive(Debug, Clone)]
pub struct KerberosAttestor {
    inner: Arc<Inner>,
}

impl KerberosAttestor {
    /// Checks the settings and the keytab (it must hold the service principal) and
    /// prepares the replay cache under the context's data dir. Service tickets are
    /// checked at the context's clock.
    pub fn new(cfg: &KerberosServerConfig, ctx: &PluginContext) -> Result<Self, Error> {
        let data_dir = &ctx.data_dir;
        cfg.validate().map_err(|p| config_err(p.join("; ")))?;
        check_keytab(&cfg.keytab, "keytab").map_err(config_err)?;
        let rcache = cfg
            .replay_cache
            .clone()
            .unwrap_or_else(|| data_dir.join("kerberos.rcache"));
        let rcache = if rcache.is_absolute() {
            rcache
        } else {
            data_dir.join(rcache)
        };
        let keytab = std::path::absolute(&cfg.keytab)
            .map_err(|e| config_err(format!("keytab {}: {e}", cfg.keytab.display())))?;
        let inner = Inner {
            keytab: format!("FILE:{}", keytab.display()),
            service_principal: cfg.service_principal.clone(),
            allowed_realms: cfg.allowed_realms.clone(),
            machine_account_domains: cfg.machine_account_domains.clone(),
            rcache: format!("file2:{}", rcache.display()),
            clock: ctx.clock.clone(),
        };
        // Fails now, not at the first attestation, if the keytab lacks the principal.
        inner.acceptor().map_err(|e| {
            config_err(format!(
                "keytab {} cannot accept tickets for {}: {}",
                cfg.keytab.display(),
                cfg.service_principal,
                e.message
            ))
        })?;
        tracing::info!(
            service_principal = %cfg.service_principal,
            keytab = %cfg.keytab.display(),
            replay_cache = %rcache.display(),
            allowed_realms = ?cfg.allowed_realms,
            "kerberos node attestation ready"
        );
        Ok(KerberosAttestor {
            inner: Arc::new(inner),
        })
    }
}

#[async_trait::async_trait]
impl NodeAttestor for KerberosAttestor {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn begin(
        &self,
        payload: &[u8],
        ctx: &AttestationContext,
    ) -> Result<AttestationStep, Error> {
        let p: Payload = wire::decode("payload", payload)?;
        if p.version != wire::VERSION {
            return Err(rejected(format!(
                "the agent speaks version {}, this server {}",
                p.version,
                wire::VERSION
            )));
        }
        let nonce: [u8; NONCE_LEN] = rand::random();
        // Checks the exporter's length now rather than after the agent's work.
        let bindings = channel_bindings(&ctx.tls_exporter, &nonce)?;
        let challenge = wire::encode(&Challenge::Nonce {
            nonce: wire::b64(&nonce),
        })?;
        Ok(AttestationStep::Challenge {
            challenge,
            session: Box::new(Session {
                inner: self.inner.clone(),
                bindings,
            }),
        })
    }
}

/// Waiting for the context token bound to this session's nonce.
struct Session {
    inner: Arc<Inner>,
    bindings: Vec<u8>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("kerberos::Session")
    }
}

/// Waiting for the agent to confirm it verified the AP-REP.
#[derive(Debug)]
struct AwaitingConfirmation {
    result: AttestationResult,
}

#[async_trait::async_trait]
impl AttestationSession for AwaitingConfirmation {
    async fn respond(self: Box<Self>, response: &[u8]) -> Result<AttestationStep, Error> {
        match wire::decode("answer", response)? {
            Answer::ReplyVerified => Ok(AttestationStep::Done(self.result)),
            Answer::Token { .. } => Err(rejected("expected the AP-REP confirmation")),
        }
    }
}

#[async_trait::async_trait]
impl AttestationSession for Session {
    async fn respond(self: Box<Self>, response: &[u8]) -> Result<AttestationStep, Error> {
        let token = match wire::decode("answer", response)? {
            Answer::Token { token } => wire::unb64("token", &token)?,
            Answer::ReplyVerified => return Err(rejected("expected the context token")),
        };
        let Session { inner, bindings } = *self;
        // Keytab and replay cache files: blocking I/O, off the async workers.
        let (result, reply) =
            tokio::task::spawn_blocking(move || accept(&inner, &token, &bindings))
                .await
                .map_err(|e| Error::Unavailable(format!("{PLUGIN_NAME}: accept task: {e}")))??;
        if reply.is_empty() {
            Ok(AttestationStep::Done(result))
        } else {
            Ok(AttestationStep::Challenge {
                challenge: wire::encode(&Challenge::Reply {
                    token: wire::b64(&reply),
                })?,
                session: Box::new(AwaitingConfirmation { result }),
            })
        }
    }
}

/// Why `gss_accept_sec_context` refused, in words an operator can act on.
fn accept_error(inner: &Inner, e: &GssError) -> Error {
    if e.minor == gss::KRB5KRB_AP_ERR_REPEAT {
        return Error::AttestationReplay("this Kerberos authenticator (replay cache)");
    }
    if e.routine() == gss::GSS_S_BAD_BINDINGS {
        return rejected(
            "the token's channel bindings do not match this TLS connection and nonce: it was \
             made for another connection, attestation or server",
        );
    }
    if e.minor == gss::KRB5KRB_AP_ERR_TKT_EXPIRED {
        return rejected(format!("the service ticket has expired ({})", e.message));
    }
    if e.minor == gss::KRB5KRB_AP_ERR_TKT_NYV {
        return rejected(format!(
            "the service ticket is not valid yet ({})",
            e.message
        ));
    }
    if e.minor == gss::KRB5KRB_AP_ERR_SKEW {
        return rejected(format!(
            "the token's authenticator is too old or from a clock that is off ({})",
            e.message
        ));
    }
    if [
        gss::KRB5KRB_AP_WRONG_PRINC,
        gss::KRB5_KT_NOTFOUND,
        gss::KRB5KRB_AP_ERR_NOT_US,
        gss::KRB5KRB_AP_ERR_NOKEY,
    ]
    .contains(&e.minor)
    {
        return rejected(format!(
            "the ticket is not for {} ({})",
            inner.service_principal, e.message
        ));
    }
    rejected(format!("the context token was refused: {}", e.message))
}

fn accept(
    inner: &Inner,
    token: &[u8],
    bindings: &[u8],
) -> Result<(AttestationResult, Vec<u8>), Error> {
    let cred = inner.acceptor().map_err(|e| {
        Error::Unavailable(format!(
            "{PLUGIN_NAME}: acceptor credentials for {}: {}",
            inner.service_principal, e.message
        ))
    })?;
    let accepted =
        gss::Context::accept(cred, token, bindings).map_err(|e| accept_error(inner, &e))?;
    if accepted.target != inner.service_principal {
        return Err(rejected(format!(
            "the ticket is for {}, not {}",
            accepted.target, inner.service_principal
        )));
    }
    if accepted.flags & gss::CHANNEL_BOUND_FLAG == 0 {
        return Err(rejected(
            "the token carries no channel bindings: this agent does not bind its token to the \
             TLS connection",
        ));
    }
    // MIT forgives the clock skew past the ticket's end; a fresh ticket is asked for
    // at every attestation, so no skew is given here.
    let now = inner.clock.unix_now();
    if i64::from(accepted.ticket_endtime) <= now {
        return Err(rejected(format!(
            "the service ticket expired {} s ago",
            now - i64::from(accepted.ticket_endtime)
        )));
    }
    let source = accepted
        .source
        .display()
        .map_err(|e| rejected(format!("the client's name: {e}")))?;
    let principal = Principal::parse(&source)?;
    if !inner.allowed_realms.contains(&principal.realm) {
        return Err(rejected(format!(
            "realm {} of {source} is not in allowed_realms ({})",
            principal.realm,
            inner.allowed_realms.join(", ")
        )));
    }
    let group_sids = group_sids(&accepted.source, &source);
    let (agent_path, selectors) = names::identity(
        &principal,
        inner
            .machine_account_domains
            .get(&principal.realm)
            .map(String::as_str),
        &group_sids,
    )?;
    tracing::info!(
        principal = %source,
        agent_path = %agent_path,
        group_sids = group_sids.len(),
        mutual = accepted.flags & gss::MUTUAL_FLAG != 0,
        "kerberos: context token accepted"
    );
    Ok((
        AttestationResult {
            agent_path,
            selectors,
            can_reattest: true,
        },
        accepted.reply,
    ))
}

/// The group SIDs of the ticket's PAC, if it has one that MIT authenticated (its server
/// signature verified with the service key). A PAC that cannot be read gives no SIDs and
/// a warning: group selectors only ever add identities, so leaving them out fails safe.
fn group_sids(source: &Name, principal: &str) -> Vec<String> {
    match source.attribute(PAC_LOGON_INFO) {
        Ok(Some((value, true))) => match pac::group_sids(&value) {
            Ok(sids) => sids,
            Err(e) => {
                tracing::warn!(%principal, error = %e, "kerberos: the PAC's logon info could not be read; no group_sid selectors");
                Vec::new()
            }
        },
        Ok(Some((_, false))) => {
            tracing::warn!(%principal, "kerberos: the ticket's PAC is not authenticated; no group_sid selectors");
            Vec::new()
        }
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::debug!(%principal, error = %e, "kerberos: no PAC logon info");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gss::Context;

    fn ctx() -> AttestationContext {
        AttestationContext {
            agent_public_key: Vec::new(),
            tls_exporter: vec![7; 32],
        }
    }

    /// MIT accepts a token that carries no channel bindings even when the acceptor
    /// passes some; only `GSS_C_CHANNEL_BOUND_FLAG` tells. Such a token must not pass.
    #[test]
    fn a_token_without_channel_bindings_is_refused() {
        let Some(r) = hsm_sim::kdc::kdc_test(
            "server::tests::a_token_without_channel_bindings_is_refused",
            "LAB.TEST",
        ) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let server = KerberosAttestor::new(
            &KerberosServerConfig {
                keytab: r.principals.service_keytab.clone(),
                service_principal: r.principals.service.clone(),
                allowed_realms: vec!["LAB.TEST".into()],
                machine_account_domains: BTreeMap::new(),
                replay_cache: None,
            },
            &PluginContext::for_tests(dir.path()),
        )
        .unwrap();
        let keytab = format!("FILE:{}", r.principals.host_keytab.display());
        let unbound = |bindings: Option<&[u8]>| {
            let me = Name::import(&r.principals.host, NameType::Principal).unwrap();
            let cred = Cred::acquire_from(
                Some(&me),
                Usage::Initiate,
                &[
                    ("client_keytab", &keytab),
                    ("ccache", "MEMORY:unbound-test"),
                ],
            )
            .unwrap();
            let target = Name::import(&r.principals.service, NameType::Principal).unwrap();
            let (_ctx, token) = Context::initiate(cred, target, bindings, false).unwrap();
            wire::encode(&Answer::Token {
                token: wire::b64(&token),
            })
            .unwrap()
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let payload = wire::encode(&Payload { version: 1 }).unwrap();
            let AttestationStep::Challenge { session, .. } =
                server.begin(&payload, &ctx()).await.unwrap()
            else {
                panic!("expected a challenge");
            };
            let err = session
                .respond(&unbound(None))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("carries no channel bindings"), "{err}");
            // The same flow with the right bindings passes: the refusal above is the
            // missing bindings, nothing else.
            let AttestationStep::Challenge { challenge, session } =
                server.begin(&payload, &ctx()).await.unwrap()
            else {
                panic!("expected a challenge");
            };
            let Challenge::Nonce { nonce } = wire::decode("c", &challenge).unwrap() else {
                panic!("expected a nonce");
            };
            let bindings =
                channel_bindings(&ctx().tls_exporter, &wire::unb64("n", &nonce).unwrap()).unwrap();
            let step = session.respond(&unbound(Some(&bindings))).await.unwrap();
            assert!(matches!(step, AttestationStep::Done(_)));
        });
        gss::destroy_ccache("MEMORY:unbound-test").unwrap();
    }
}
