//! The agent half (`[node_attestor.kerberos]`): the initial GSS-API krb5 context token
//! for the server's service principal, from the host keytab, bound to the connection
//! and the server's nonce.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use carapace_core::Error;
use carapace_core::files::{FileUse, NamedFile};
use carapace_core::plugin::{AttestationContext, NodeAttestorClient};

use crate::gss::{self, Context, Cred, GssError, Name, NameType, Usage};
use crate::names::Principal;
use crate::wire::{self, Answer, Challenge, Payload};
use crate::{NONCE_LEN, PLUGIN_NAME, channel_bindings, rejected};

/// The keytab used when the configuration names none.
pub const DEFAULT_KEYTAB: &str = "/etc/krb5.keytab";

fn default_true() -> bool {
    true
}

/// Settings of `[node_attestor.kerberos]` on the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KerberosAgentConfig {
    /// The server's service principal, with its realm.
    pub service_principal: String,
    /// The host keytab; default [`DEFAULT_KEYTAB`].
    pub keytab: Option<PathBuf>,
    /// The client principal; default the host principal (`host/<this host>`, as MIT
    /// names the host-based service `host`).
    pub principal: Option<String>,
    /// Whether to ask for and check the server's AP-REP (default true).
    #[serde(default = "default_true")]
    pub mutual_auth: bool,
}

impl KerberosAgentConfig {
    /// The keytab to use.
    pub fn keytab(&self) -> PathBuf {
        self.keytab
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KEYTAB))
    }

    /// The files these settings name, for `validate`: the keytab (a secret, checked as
    /// [`KerberosAttestorClient`] checks it at each attestation).
    pub fn files(&self) -> Vec<NamedFile> {
        vec![NamedFile::new("keytab", self.keytab(), FileUse::Secret).at_use()]
    }

    /// Every problem with the settings that can be found without reading files.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = crate::names::check_service_principal(&self.service_principal) {
            problems.push(e);
        }
        if let Some(p) = &self.principal
            && let Err(e) = Principal::parse_setting(p)
        {
            problems.push(format!("principal: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// An attestation waiting for the server's AP-REP.
struct Pending {
    context: Context,
    bindings: Vec<u8>,
}

/// The agent half of `kerberos` node attestation.
pub struct KerberosAttestorClient {
    cfg: KerberosAgentConfig,
    pending: Arc<Mutex<Option<Pending>>>,
}

impl fmt::Debug for KerberosAttestorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KerberosAttestorClient")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl KerberosAttestorClient {
    /// An attestor with `cfg`. The keytab is checked at each attestation, so a host
    /// can be joined to its realm after the agent started.
    pub fn new(cfg: &KerberosAgentConfig) -> Result<Self, Error> {
        cfg.validate().map_err(|p| Error::PluginConfig {
            plugin: format!("node_attestor.{PLUGIN_NAME}"),
            reason: p.join("; "),
        })?;
        Ok(KerberosAttestorClient {
            cfg: cfg.clone(),
            pending: Arc::default(),
        })
    }

    /// Makes the context token (blocking: keytab reads and KDC round trips).
    fn make_token(cfg: &KerberosAgentConfig, bindings: &[u8]) -> Result<(Context, Vec<u8>), Error> {
        let keytab = cfg.keytab();
        crate::check_keytab(&keytab, "keytab").map_err(rejected)?;
        let who = cfg.principal.as_deref().unwrap_or("the host principal");
        let describe = |e: GssError| {
            let hint = match e.minor {
                gss::KRB5_KDC_UNREACH => " (is the KDC reachable, and krb5.conf's [realms] right?)",
                _ => "",
            };
            let msg = format!(
                "{e}{hint} (principal {who}, keytab {}, service {})",
                keytab.display(),
                cfg.service_principal
            );
            if e.minor == gss::KRB5_KDC_UNREACH {
                Error::Unavailable(format!("{PLUGIN_NAME}: {msg}"))
            } else {
                rejected(msg)
            }
        };
        let name = match &cfg.principal {
            Some(p) => Name::import(p, NameType::Principal),
            None => Name::import("host", NameType::HostBasedService),
        }
        .map_err(describe)?;
        // A private memory cache per attestation: a fresh TGT and service ticket from
        // the KDC each time, and nothing left behind.
        let ccache = format!("MEMORY:carapace-attest-{}", hex_id());
        let keytab_name = format!("FILE:{}", keytab.display());
        let result = (|| {
            let cred = Cred::acquire_from(
                Some(&name),
                Usage::Initiate,
                &[("client_keytab", &keytab_name), ("ccache", &ccache)],
            )?;
            let target = Name::import(&cfg.service_principal, NameType::Principal)?;
            Context::initiate(cred, target, Some(bindings), cfg.mutual_auth)
        })();
        if let Err(e) = gss::destroy_ccache(&ccache) {
            tracing::warn!(error = %e, "kerberos: could not destroy the attestation's credential cache");
        }
        result.map_err(describe)
    }
}

fn hex_id() -> String {
    let id: [u8; 12] = rand::random();
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait::async_trait]
impl NodeAttestorClient for KerberosAttestorClient {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn payload(&self, _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        // A new attestation abandons any earlier one.
        self.pending
            .lock()
            .map_err(|_| rejected("state lock poisoned"))?
            .take();
        wire::encode(&Payload {
            version: wire::VERSION,
        })
    }

    async fn answer(&self, challenge: &[u8], ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        match wire::decode::<Challenge>("challenge", challenge)? {
            Challenge::Nonce { nonce } => {
                let nonce = wire::unb64("nonce", &nonce)?;
                if nonce.len() != NONCE_LEN {
                    return Err(rejected(format!(
                        "the server's nonce is {} bytes, not {NONCE_LEN}",
                        nonce.len()
                    )));
                }
                let bindings = channel_bindings(&ctx.tls_exporter, &nonce)?;
                let cfg = self.cfg.clone();
                let b = bindings.clone();
                let (context, token) =
                    tokio::task::spawn_blocking(move || Self::make_token(&cfg, &b))
                        .await
                        .map_err(|e| rejected(format!("token task: {e}")))??;
                if self.cfg.mutual_auth {
                    *self
                        .pending
                        .lock()
                        .map_err(|_| rejected("state lock poisoned"))? =
                        Some(Pending { context, bindings });
                }
                wire::encode(&Answer::Token {
                    token: wire::b64(&token),
                })
            }
            Challenge::Reply { token } => {
                let reply = wire::unb64("reply token", &token)?;
                let mut pending = self
                    .pending
                    .lock()
                    .map_err(|_| rejected("state lock poisoned"))?
                    .take()
                    .ok_or_else(|| {
                        rejected("the server sent an AP-REP this agent did not ask for")
                    })?;
                pending
                    .context
                    .finish_initiator(Some(&pending.bindings), &reply)
                    .map_err(|e| {
                        rejected(format!(
                            "the server's AP-REP does not verify: it does not hold the keys of {} ({e})",
                            self.cfg.service_principal
                        ))
                    })?;
                wire::encode(&Answer::ReplyVerified)
            }
        }
    }
}
