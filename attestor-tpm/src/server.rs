//! The server half (`[node_attestor.tpm]`): EK trust, AK checks, a software
//! MakeCredential, then one challenge (credential + nonce) whose answer must carry the
//! activated credential and a fresh quote over the configured PCRs, and, when the
//! payload names a TPM agent key, the AK's TPM2_Certify of that key (which must be the
//! CSR's key).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use carapace_core::clock::Clock;
use carapace_core::files::{FileUse, NamedFile};
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationSession, AttestationStep, NodeAttestor,
    PluginContext,
};
use carapace_core::{Error, SelectorSet};

use crate::eventlog::policy::{MeasuredBootConfig, MeasuredBootPolicy};
use crate::eventlog::{self, ALG_SHA256};
use crate::verify::{self, EkCache, EkIdentity, EkPolicy, PcrPolicy, QuoteInfo};
use crate::wire::{self, Challenge, Payload, PcrSelection, Response};

/// The plugin name on both sides.
pub const PLUGIN_NAME: &str = "tpm";

/// PCRs quoted when the configuration names none: the SRTM measurements of firmware,
/// option ROMs, boot loader and Secure Boot policy.
pub const DEFAULT_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

fn default_pcrs() -> Vec<u8> {
    DEFAULT_PCRS.to_vec()
}

/// Settings of `[node_attestor.tpm]` on the server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmServerConfig {
    /// PEM files with the TPM manufacturers' EK CA certificates: self-signed ones are
    /// roots, the others intermediates. Relative paths resolve against the data dir.
    #[serde(default)]
    pub ek_ca_files: Vec<PathBuf>,
    /// SHA-256 (lowercase hex) of EK public keys (SubjectPublicKeyInfo DER) accepted
    /// without a certificate chain.
    #[serde(default)]
    pub ek_hash_allowlist: Vec<String>,
    /// The sha256 PCRs every quote must cover (default 0-7); each becomes a selector.
    #[serde(default = "default_pcrs")]
    pub pcrs: Vec<u8>,
    /// Golden values: PCR index → allowed sha256 values (hex); any other value refuses
    /// attestation.
    #[serde(default)]
    pub pcr_policy: BTreeMap<String, Vec<String>>,
    /// Refuse agents whose own key (the CSR's) is not certified to be in the attested
    /// TPM (agents without `[key_manager.tpm]` on the same TPM). Default false: such
    /// agents attest, without the `tpm:agent_key:tpm` selector.
    #[serde(default)]
    pub require_agent_key_in_tpm: bool,
    /// The measured-boot policy over the boot event log
    /// ([`crate::eventlog::policy`]); when set, agents must send their log.
    pub measured_boot: Option<MeasuredBootConfig>,
}

impl TpmServerConfig {
    /// The files these settings name, for `validate`: each of `ek_ca_files`, resolved
    /// against `data_dir` as [`TpmAttestor::new`] does.
    pub fn files(&self, data_dir: &std::path::Path) -> Vec<NamedFile> {
        self.ek_ca_files
            .iter()
            .map(|f| NamedFile::new("ek_ca_files", data_dir.join(f), FileUse::Read))
            .collect()
    }

    /// Every problem of these settings (without reading files).
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.ek_ca_files.is_empty() && self.ek_hash_allowlist.is_empty() {
            problems.push(
                "set ek_ca_files (manufacturer roots) or ek_hash_allowlist: otherwise no TPM \
                 would be trusted"
                    .to_owned(),
            );
        }
        for h in &self.ek_hash_allowlist {
            if h.len() != 64
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                problems.push(format!(
                    "ek_hash_allowlist: {h:?} is not a lowercase hex SHA-256"
                ));
            }
        }
        if self.pcrs.is_empty() {
            problems.push("pcrs: quote at least one PCR".to_owned());
        }
        let mut seen = std::collections::BTreeSet::new();
        for &p in &self.pcrs {
            if p > 23 {
                problems.push(format!("pcrs: {p} is not a PCR index (0-23)"));
            }
            if !seen.insert(p) {
                problems.push(format!("pcrs: {p} is listed twice"));
            }
        }
        match PcrPolicy::from_config(&self.pcr_policy) {
            Err(e) => problems.push(e.to_string()),
            Ok(policy) => {
                for p in policy.pcrs() {
                    if !self.pcrs.contains(&p) {
                        problems.push(format!(
                            "pcr_policy: PCR {p} has golden values but is not in pcrs, so it is never quoted"
                        ));
                    }
                }
            }
        }
        if let Some(mb) = &self.measured_boot {
            match MeasuredBootPolicy::from_config(mb) {
                Err(e) => problems.push(e.to_string()),
                Ok(policy) => {
                    for p in policy.pcrs() {
                        if !self.pcrs.contains(&p) {
                            problems.push(format!(
                                "measured_boot polices PCR {p}, which is not in pcrs: add it, \
                                 so the quote covers the events the policy reads"
                            ));
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Where the attestor keeps each TPM's last quote clock between attestations (the
/// server's datastore); the trait lives in carapace-core, shared with the cloud attestors.
pub use carapace_core::plugin::NodeStateStore;

/// What is kept of a TPM's last quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ClockRecord {
    clock: u64,
    reset_count: u32,
    restart_count: u32,
}

impl ClockRecord {
    fn of(q: &QuoteInfo) -> Self {
        ClockRecord {
            clock: q.clock,
            reset_count: q.reset_count,
            restart_count: q.restart_count,
        }
    }
}

/// The server half of `tpm` node attestation.
pub struct TpmAttestor {
    ek_policy: EkPolicy,
    /// EK chains that verified under `ek_policy` ([`EkCache`]).
    ek_cache: EkCache,
    pcr_policy: PcrPolicy,
    pcrs: Vec<u8>,
    require_agent_key_in_tpm: bool,
    /// The measured-boot policy, when configured: agents must then send their log.
    measured_boot: Option<Arc<MeasuredBootPolicy>>,
    store: Arc<dyn NodeStateStore>,
    /// The time EK certificates are checked at.
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for TpmAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmAttestor")
            .field("ek_roots", &self.ek_policy.roots.len())
            .field("ek_intermediates", &self.ek_policy.intermediates.len())
            .field("ek_allowlist", &self.ek_policy.allowlist.len())
            .field("pcrs", &self.pcrs)
            .field("require_agent_key_in_tpm", &self.require_agent_key_in_tpm)
            .field("measured_boot", &self.measured_boot.is_some())
            .finish_non_exhaustive()
    }
}

fn config_err(msg: impl fmt::Display) -> Error {
    Error::PluginConfig {
        plugin: "node_attestor.tpm".into(),
        reason: msg.to_string(),
    }
}

impl TpmAttestor {
    /// Builds the attestor: validates `cfg`, reads the EK CA files (resolved against
    /// the context's data dir). EK certificates are checked at the context's clock.
    pub fn new(
        cfg: &TpmServerConfig,
        ctx: &PluginContext,
        store: Arc<dyn NodeStateStore>,
    ) -> Result<Self, Error> {
        cfg.validate().map_err(|p| config_err(p.join("; ")))?;
        let mut roots = Vec::new();
        let mut intermediates = Vec::new();
        for file in &cfg.ek_ca_files {
            let path = ctx.data_dir.join(file);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                config_err(format!("ek_ca_files: cannot read {}: {e}", path.display()))
            })?;
            let certs = carapace_core::bundle::certs_from_pem(&text)
                .map_err(|e| config_err(format!("ek_ca_files: {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(config_err(format!(
                    "ek_ca_files: {} holds no certificate",
                    path.display()
                )));
            }
            for der in certs {
                if verify::is_self_signed(&der) {
                    roots.push(der);
                } else {
                    intermediates.push(der);
                }
            }
        }
        if !cfg.ek_ca_files.is_empty() && roots.is_empty() {
            return Err(config_err(
                "ek_ca_files hold intermediates but no self-signed root",
            ));
        }
        Ok(TpmAttestor {
            ek_policy: EkPolicy::new(roots, intermediates, cfg.ek_hash_allowlist.clone())?,
            ek_cache: EkCache::default(),
            pcr_policy: PcrPolicy::from_config(&cfg.pcr_policy)?,
            pcrs: cfg.pcrs.clone(),
            require_agent_key_in_tpm: cfg.require_agent_key_in_tpm,
            measured_boot: cfg
                .measured_boot
                .as_ref()
                .map(MeasuredBootPolicy::from_config)
                .transpose()?
                .map(Arc::new),
            store,
            clock: ctx.clock.clone(),
        })
    }
}

fn rejected(msg: impl fmt::Display) -> Error {
    Error::AttestationRejected(format!("tpm: {msg}"))
}

#[async_trait::async_trait]
impl NodeAttestor for TpmAttestor {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn begin(
        &self,
        payload: &[u8],
        ctx: &AttestationContext,
    ) -> Result<AttestationStep, Error> {
        let p: Payload = wire::decode("payload", payload)?;
        if p.version != wire::VERSION && p.version != wire::VERSION_1 {
            return Err(rejected(format!(
                "payload version {} (this server speaks {} and {})",
                p.version,
                wire::VERSION_1,
                wire::VERSION
            )));
        }
        if self.measured_boot.is_some() && p.version == wire::VERSION_1 {
            return Err(rejected(
                "the measured_boot policy needs the node's boot event log, and this agent \
                 speaks version 1, which cannot send one: upgrade the agent",
            ));
        }
        let ek_public = verify::parse_public(&p.ek_public)
            .map_err(|e| rejected(format!("EK public area: {e}")))?;
        let ek = self.ek_cache.verify(
            &self.ek_policy,
            &p.ek_public,
            &ek_public,
            (!p.ek_cert.is_empty()).then_some(p.ek_cert.as_slice()),
            &p.ek_intermediates,
            self.clock.unix_now(),
        )?;
        let ak_public = verify::parse_public(&p.ak_public)
            .map_err(|e| rejected(format!("AK public area: {e}")))?;
        verify::check_ak(&ak_public)?;
        let ak_name = verify::name_of(&ak_public)?;
        let agent_key = self.agent_key(&p, ctx)?;

        let mut secret = vec![0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let mut nonce = vec![0u8; 32];
        rand::rng().fill_bytes(&mut nonce);
        let made = crate::credential::make_credential(&p.ek_public, &ak_name, &secret)?;
        let challenge = Challenge {
            version: p.version,
            credential_blob: made.credential_blob,
            encrypted_secret: made.encrypted_secret,
            nonce: nonce.clone(),
            pcr_selection: PcrSelection {
                hash: "sha256".into(),
                pcrs: self.pcrs.clone(),
            },
            event_log: p.version >= wire::VERSION,
        };
        tracing::debug!(
            ek = ek.pubhash,
            "tpm: EK trusted, AK acceptable; sent the credential and nonce"
        );
        Ok(AttestationStep::Challenge {
            challenge: wire::encode(&challenge),
            session: Box::new(TpmSession {
                version: p.version,
                ek,
                ak_public,
                agent_key,
                secret,
                qualifying_data: wire::qualifying_data(p.version, &nonce, &ctx.tls_exporter),
                pcrs: self.pcrs.clone(),
                pcr_policy: self.pcr_policy.clone(),
                measured_boot: self.measured_boot.clone(),
                store: self.store.clone(),
            }),
        })
    }
}

impl TpmAttestor {
    /// The agent key the payload names, checked: a P-256 signing key bound to its TPM,
    /// and the very key of the CSR (`ctx`). `None` when the payload names none (refused
    /// if `require_agent_key_in_tpm`).
    fn agent_key(
        &self,
        p: &Payload,
        ctx: &AttestationContext,
    ) -> Result<Option<tss_esapi::structures::Public>, Error> {
        let Some(bytes) = &p.agent_key_public else {
            if self.require_agent_key_in_tpm {
                return Err(rejected(
                    "the agent key is not in the TPM: require_agent_key_in_tpm is set and the \
                     agent named no TPM key to certify (configure [key_manager.tpm] on the agent, \
                     with the same tcti as its [node_attestor.tpm])",
                ));
            }
            return Ok(None);
        };
        let public = verify::parse_public_as("agent key public area", bytes)?;
        verify::check_agent_key(&public)?;
        let spki = verify::public_key_spki_der(&public)?;
        if !same(&spki, &ctx.agent_public_key) {
            return Err(rejected(
                "the agent key in the payload is not the key of the CSR: the TPM key to \
                 certify must be the key the agent SVID is issued for",
            ));
        }
        Ok(Some(public))
    }
}

/// One attestation between the challenge and the agent's answer. Consumed by
/// `respond`, so its nonce and credential are single use.
struct TpmSession {
    /// The wire version the agent speaks.
    version: u32,
    ek: EkIdentity,
    ak_public: tss_esapi::structures::Public,
    /// The agent key to see certified, when the payload named one.
    agent_key: Option<tss_esapi::structures::Public>,
    secret: Vec<u8>,
    /// What the quote and certification must carry ([`wire::qualifying_data`]): the
    /// nonce, bound to this connection from version 2.
    qualifying_data: Vec<u8>,
    pcrs: Vec<u8>,
    pcr_policy: PcrPolicy,
    measured_boot: Option<Arc<MeasuredBootPolicy>>,
    store: Arc<dyn NodeStateStore>,
}

impl fmt::Debug for TpmSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmSession")
            .field("ek", &self.ek.pubhash)
            .finish_non_exhaustive()
    }
}

/// Compares in constant time (subtle, as the join-token attestor does).
fn same(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

#[async_trait::async_trait]
impl AttestationSession for TpmSession {
    async fn respond(self: Box<Self>, response: &[u8]) -> Result<AttestationStep, Error> {
        let r: Response = wire::decode_response(response)?;
        if r.version != self.version {
            return Err(rejected(format!(
                "response version {}, in an attestation of version {}",
                r.version, self.version
            )));
        }
        if !same(&r.activated_secret, &self.secret) {
            return Err(rejected(
                "credential activation failed: the AK is not in the TPM that holds this EK",
            ));
        }
        let values = verify::parse_pcr_values(&r.pcr_values)?;
        let quote = verify::verify_quote(
            &self.ak_public,
            &r.quote,
            &r.quote_signature,
            &self.qualifying_data,
            &self.pcrs,
            &values,
        )?;
        match (
            &self.agent_key,
            &r.agent_key_certify,
            &r.agent_key_certify_signature,
        ) {
            (Some(key), Some(attest), Some(signature)) => {
                verify::verify_certify(
                    &self.ak_public,
                    key,
                    attest,
                    signature,
                    &self.qualifying_data,
                )?;
            }
            (Some(_), _, _) => {
                return Err(rejected(
                    "the payload named a TPM agent key but the response carries no \
                     TPM2_Certify of it (agent_key_certify and agent_key_certify_signature)",
                ));
            }
            (None, None, None) => {}
            (None, _, _) => {
                return Err(rejected(
                    "the response carries an agent key certification but the payload named \
                     no agent key",
                ));
            }
        }
        let previous: Option<ClockRecord> = match self.store.load(&self.ek.pubhash).await? {
            Some(bytes) => serde_json::from_slice(&bytes).ok(),
            None => None,
        };
        if let Some(prev) = previous {
            let prev_info = QuoteInfo {
                clock: prev.clock,
                reset_count: prev.reset_count,
                restart_count: prev.restart_count,
                ..quote
            };
            verify::check_clock(Some(&prev_info), &quote)?;
        }
        verify::check_pcr_policy(&self.pcr_policy, &values)?;
        let boot_selectors = match &r.event_log {
            Some(bytes) => {
                if self.version == wire::VERSION_1 {
                    return Err(rejected("a version 1 response carries an event log"));
                }
                let log = eventlog::parse(bytes).map_err(rejected)?;
                log.check_replay(ALG_SHA256, &values)?;
                if let Some(policy) = &self.measured_boot {
                    policy.check(&log)?;
                }
                eventlog::policy::selectors(&log, &self.pcrs)?
            }
            None if self.measured_boot.is_some() => {
                return Err(rejected(
                    "the measured_boot policy needs the node's boot event log and the agent \
                     sent none (set event_log in the agent's [node_attestor.tpm] if the log \
                     is not at the kernel's path)",
                ));
            }
            None => Vec::new(),
        };
        let record = serde_json::to_vec(&ClockRecord::of(&quote))
            .map_err(|e| Error::Unavailable(format!("tpm: {e}")))?;
        self.store.save(&self.ek.pubhash, &record).await?;

        let mut selectors = SelectorSet::new();
        selectors.extend(verify::selectors(&self.ek, &values)?);
        selectors.extend(boot_selectors);
        if self.agent_key.is_some() {
            selectors.insert(carapace_core::Selector::new(
                verify::SELECTOR_TYPE,
                verify::AGENT_KEY_IN_TPM_SELECTOR,
            )?);
        }
        tracing::info!(
            ek = self.ek.pubhash,
            reset_count = quote.reset_count,
            agent_key_in_tpm = self.agent_key.is_some(),
            event_log = r.event_log.is_some(),
            "tpm: node attested"
        );
        Ok(AttestationStep::Done(AttestationResult {
            agent_path: self.ek.pubhash.clone(),
            selectors,
            can_reattest: true,
        }))
    }
}
