//! `aws_iid`: EC2 instance identity documents, signed by AWS with the region's RSA-2048
//! key.
//!
//! **Agent** ([`AwsIidAttestorClient`]): IMDSv2 — `PUT /latest/api/token` (with
//! `X-aws-ec2-metadata-token-ttl-seconds`) for a session token, then, with
//! `X-aws-ec2-metadata-token`, `GET /latest/dynamic/instance-identity/document` and
//! `GET /latest/dynamic/instance-identity/rsa2048`. Both bodies are sent unchanged
//! ([`Payload`] on the wire). The token is a credential: it is never logged or sent on.
//!
//! **Server** ([`AwsIidAttestor`]), in this order:
//! 1. the `rsa2048` body (base64 of a BER PKCS#7 `SignedData`) is verified with the
//!    certificates configured per region (the crate's `pkcs7` module): the signer is the
//!    certificate named by the `SignerInfo`'s issuer and serial, never one from the
//!    PKCS#7's own bag;
//! 2. the signed content must equal the document bytes the agent sent, exactly. Without
//!    this, a validly signed PKCS#7 of one instance would vouch for any document
//!    (SPIRE's substitution fix);
//! 3. only now is the document parsed; its `region` must be a configured region whose
//!    certificate is the one that signed (one region's key cannot vouch for another).
//!    (When the signer is none of the configured certificates, the region the unverified
//!    document names is used for one thing only: to word the error, since a missing
//!    region certificate is the usual cause.)
//! 4. the account must be on `account_allowlist` if one is set;
//! 5. the agent path `ACCOUNT/REGION/INSTANCE` (each a valid SPIFFE path segment) and
//!    selectors come from the verified document;
//! 6. last, trust on first use ([`crate::tofu`]): the document is not bound to this
//!    connection, so each instance attests once (recorded in the datastore, shared by
//!    every server) unless `allow_reattestation`. A rejected attempt records nothing.
//!
//! Nothing is fetched at attestation time: the region certificates are files, read at
//! start-up. AWS publishes them per region ("AWS public certificates" in the EC2 user
//! guide, RSA-2048 column).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use carapace_core::clock::Clock;
use carapace_core::files::{FileUse, NamedFile};
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationStep, NodeAttestor, NodeAttestorClient,
    NodeStateStore, PluginContext,
};
use carapace_core::{Error, SelectorSet};

use crate::http::BaseUrl;
use crate::pkcs7::{self, Pkcs7Error, TrustedCert};
use crate::{config_err, path_segment, rejected, selector, tofu};

/// The plugin name: the `<attestor>` segment of agent IDs
/// (`spiffe://<td>/spire/agent/aws_iid/ACCOUNT/REGION/INSTANCE`) and the selector type.
pub const PLUGIN_NAME: &str = "aws_iid";

/// The instance metadata service's address.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";
/// The IMDSv2 session token's lifetime asked for, in seconds (one attestation needs
/// seconds).
pub const DEFAULT_TOKEN_TTL_SECONDS: u32 = 60;
/// The longest IMDSv2 token lifetime IMDS grants (six hours).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21_600;
/// The default deadline of each metadata request.
pub const DEFAULT_TIMEOUT: Duration = crate::http::DEFAULT_TIMEOUT;
/// The largest agent payload the server reads.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// The version of [`Payload`] this build speaks.
pub const PAYLOAD_VERSION: u32 = 1;

/// IMDSv2: where the session token is asked for (`PUT`).
pub const TOKEN_PATH: &str = "/latest/api/token";
/// IMDS: the instance identity document (JSON).
pub const DOCUMENT_PATH: &str = "/latest/dynamic/instance-identity/document";
/// IMDS: the document's RSA-2048 PKCS#7 signature (base64 DER, with line breaks).
pub const SIGNATURE_PATH: &str = "/latest/dynamic/instance-identity/rsa2048";
/// The request header that asks for a token of this many seconds.
pub const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// The request header that carries the token.
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

/// The agent's first (and only) message, JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// [`PAYLOAD_VERSION`].
    pub version: u32,
    /// The instance identity document, exactly as IMDS returned it.
    pub document: String,
    /// The `rsa2048` body, exactly as IMDS returned it: base64 of the PKCS#7, with line
    /// breaks.
    pub signature: String,
}

/// Whether `name` looks like an AWS region (`us-east-1`, `us-gov-west-1`): lowercase
/// letters, digits and inner dashes, at most 64 characters.
fn is_region_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `id` is an AWS account ID: 12 digits.
fn is_account_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit())
}

/// Settings of `[node_attestor.aws_iid]` on the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsServerConfig {
    /// Region → PEM file holding that region's AWS RSA-2048 certificate (exactly one
    /// certificate). Instances of regions not listed cannot attest. Relative paths are
    /// resolved against the configuration's directory.
    pub region_certificates: BTreeMap<String, PathBuf>,
    /// The AWS accounts (12 digits) whose instances may attest; empty (the default)
    /// allows every account whose instances can reach the server.
    #[serde(default)]
    pub account_allowlist: Vec<String>,
    /// Whether an instance may attest again (default false: trust on first use, each
    /// instance attests once).
    #[serde(default)]
    pub allow_reattestation: bool,
}

impl AwsServerConfig {
    /// The files these settings name, for `validate`: each region's certificate,
    /// resolved against `data_dir` as [`AwsIidAttestor::new`] does.
    pub fn files(&self, data_dir: &Path) -> Vec<NamedFile> {
        self.region_certificates
            .iter()
            .filter(|(_, path)| !path.as_os_str().is_empty())
            .map(|(region, path)| {
                NamedFile::new(
                    format!("region_certificates.{region}"),
                    data_dir.join(path),
                    FileUse::Read,
                )
            })
            .collect()
    }

    /// Every problem with the settings that can be found without reading files.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.region_certificates.is_empty() {
            problems.push(
                "region_certificates is empty: map each region whose instances may attest \
                 to a PEM file with AWS's RSA-2048 certificate of that region, e.g. \
                 region_certificates = { us-east-1 = \"aws/us-east-1.pem\" }"
                    .to_owned(),
            );
        }
        for (region, path) in &self.region_certificates {
            if !is_region_name(region) {
                problems.push(format!(
                    "region_certificates: {region:?} is not a region name (like us-east-1)"
                ));
            }
            if path.as_os_str().is_empty() {
                problems.push(format!("region_certificates.{region}: the path is empty"));
            }
        }
        for account in &self.account_allowlist {
            if !is_account_id(account) {
                problems.push(format!(
                    "account_allowlist: {account:?} is not an AWS account ID (12 digits)"
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

/// The server half of `aws_iid` node attestation.
pub struct AwsIidAttestor {
    /// The distinct configured certificates; `pkcs7::Verified::signer` indexes this.
    trusted: Vec<TrustedCert>,
    /// The regions each of `trusted` was configured for.
    cert_regions: Vec<Vec<String>>,
    /// Region → index in `trusted`.
    regions: BTreeMap<String, usize>,
    account_allowlist: BTreeSet<String>,
    allow_reattestation: bool,
    store: Arc<dyn NodeStateStore>,
    /// When instances attest.
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for AwsIidAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsIidAttestor")
            .field("regions", &self.regions.keys().collect::<Vec<_>>())
            .field("account_allowlist", &self.account_allowlist)
            .field("allow_reattestation", &self.allow_reattestation)
            .finish_non_exhaustive()
    }
}

impl AwsIidAttestor {
    /// Checks the settings and reads each region's certificate (paths relative to the
    /// context's data dir). Instances are recorded in `store` (the server's datastore),
    /// with the context clock's time.
    pub fn new(
        cfg: &AwsServerConfig,
        ctx: &PluginContext,
        store: Arc<dyn NodeStateStore>,
    ) -> Result<Self, Error> {
        cfg.validate()
            .map_err(|p| config_err(PLUGIN_NAME, p.join("; ")))?;
        let mut trusted: Vec<TrustedCert> = Vec::new();
        let mut cert_regions: Vec<Vec<String>> = Vec::new();
        let mut regions = BTreeMap::new();
        for (region, path) in &cfg.region_certificates {
            let path = ctx.data_dir.join(path);
            let cert = read_certificate(&path).map_err(|e| {
                config_err(
                    PLUGIN_NAME,
                    format!("region_certificates.{region} ({}): {e}", path.display()),
                )
            })?;
            let index = match trusted.iter().position(|c| c.der() == cert.der()) {
                Some(i) => i,
                None => {
                    if let Some(twin) = trusted.iter().position(|c| c.same_issuer_and_serial(&cert))
                    {
                        return Err(config_err(
                            PLUGIN_NAME,
                            format!(
                                "region_certificates.{region} ({}) is a different certificate \
                                 with the issuer and serial number of region {}'s: a \
                                 signature could not say which of the two signed it",
                                path.display(),
                                cert_regions[twin].join(", ")
                            ),
                        ));
                    }
                    trusted.push(cert);
                    cert_regions.push(Vec::new());
                    trusted.len() - 1
                }
            };
            cert_regions[index].push(region.clone());
            regions.insert(region.clone(), index);
        }
        tracing::info!(
            regions = ?regions.keys().collect::<Vec<_>>(),
            account_allowlist = ?cfg.account_allowlist,
            allow_reattestation = cfg.allow_reattestation,
            "aws_iid node attestation ready"
        );
        Ok(AwsIidAttestor {
            trusted,
            cert_regions,
            regions,
            account_allowlist: cfg.account_allowlist.iter().cloned().collect(),
            allow_reattestation: cfg.allow_reattestation,
            store,
            clock: ctx.clock.clone(),
        })
    }

    /// The regions configured for certificate `index`, for messages.
    fn regions_of(&self, index: usize) -> String {
        self.cert_regions
            .get(index)
            .map(|r| r.join(", "))
            .unwrap_or_default()
    }

    /// Why a PKCS#7 signed by none of the configured certificates was refused. The
    /// still unverified document's region is used only to word the message: a missing
    /// region certificate is the usual cause.
    fn unknown_signer(&self, signer: &str, document: &str) -> Error {
        #[derive(Deserialize)]
        struct Claim {
            region: String,
        }
        let claimed = serde_json::from_str::<Claim>(document)
            .ok()
            .map(|c| c.region)
            .filter(|r| is_region_name(r));
        let msg = match claimed {
            Some(region) => match self.regions.get(&region) {
                None => format!(
                    "no certificate configured for region {region} (the region the \
                     unverified document names; its signer, {signer}, is none of the \
                     configured region certificates)"
                ),
                Some(&i) => format!(
                    "the document names region {region}, but its signer ({signer}) is not \
                     the certificate configured for {region} ({})",
                    self.trusted
                        .get(i)
                        .map(TrustedCert::description)
                        .unwrap_or_default()
                ),
            },
            None => format!("the signer ({signer}) is none of the configured region certificates"),
        };
        rejected(PLUGIN_NAME, msg)
    }
}

/// Reads a PEM file that must hold exactly one certificate, with an RSA key of at least
/// 2048 bits.
fn read_certificate(path: &Path) -> Result<TrustedCert, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut blocks = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(&pem) {
        let block = block.map_err(|e| format!("not a PEM file: {e}"))?;
        blocks.push(block);
    }
    let block = match blocks.as_slice() {
        [one] => one,
        [] => return Err("no PEM certificate in the file".to_owned()),
        more => {
            return Err(format!(
                "{} PEM blocks; the file must hold exactly one certificate, the region's",
                more.len()
            ));
        }
    };
    if block.label != "CERTIFICATE" {
        return Err(format!("a PEM {:?} block, not a CERTIFICATE", block.label));
    }
    TrustedCert::from_der(&block.contents)
}

/// The fields of the instance identity document that are used; others are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    account_id: String,
    region: String,
    availability_zone: String,
    instance_id: String,
    image_id: String,
    instance_type: String,
}

/// Reads the agent's payload, with a message for each way it can be wrong.
fn decode_payload(payload: &[u8]) -> Result<Payload, Error> {
    carapace_core::plugin::decode_versioned_message(
        PLUGIN_NAME,
        "payload",
        payload,
        MAX_PAYLOAD_BYTES,
        u64::from(PAYLOAD_VERSION),
    )
}

#[async_trait::async_trait]
impl NodeAttestor for AwsIidAttestor {
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
        let p = decode_payload(payload)?;

        // 1. The signature, by the certificate the SignerInfo names.
        let compact: Vec<u8> = p
            .signature
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(&compact)
            .map_err(|e| rejected(PLUGIN_NAME, format!("the signature is not base64: {e}")))?;
        let verified = match pkcs7::verify_signed_data(&der, &self.trusted) {
            Ok(v) => v,
            Err(Pkcs7Error::UnknownSigner(signer)) => {
                return Err(self.unknown_signer(&signer, &p.document));
            }
            Err(e @ Pkcs7Error::Invalid(_)) => {
                return Err(rejected(PLUGIN_NAME, format!("the rsa2048 signature: {e}")));
            }
        };

        // 2. What was signed is the document, byte for byte.
        if verified.content != p.document.as_bytes() {
            return Err(rejected(
                PLUGIN_NAME,
                format!(
                    "the signed content ({} bytes) is not the document ({} bytes): the \
                     signature is of another document",
                    verified.content.len(),
                    p.document.len()
                ),
            ));
        }

        // 3. Only now is the document read, and its region must be the signer's.
        let doc: Document = serde_json::from_str(&p.document).map_err(|e| {
            rejected(
                PLUGIN_NAME,
                format!("the signed instance identity document: {e}"),
            )
        })?;
        match self.regions.get(&doc.region) {
            None => {
                return Err(rejected(
                    PLUGIN_NAME,
                    format!(
                        "no certificate configured for region {:?} (the document was signed \
                         with the certificate of {})",
                        doc.region,
                        self.regions_of(verified.signer)
                    ),
                ));
            }
            Some(&i) if i != verified.signer => {
                return Err(rejected(
                    PLUGIN_NAME,
                    format!(
                        "the document names region {}, but it is signed with the certificate \
                         configured for {}, not {}'s",
                        doc.region,
                        self.regions_of(verified.signer),
                        doc.region
                    ),
                ));
            }
            Some(_) => {}
        }

        // 4. The account.
        if !self.account_allowlist.is_empty() && !self.account_allowlist.contains(&doc.account_id) {
            return Err(rejected(
                PLUGIN_NAME,
                format!("account {:?} is not on account_allowlist", doc.account_id),
            ));
        }

        // 5. The identity, from the verified document only.
        let agent_path = format!(
            "{}/{}/{}",
            path_segment(PLUGIN_NAME, "accountId", &doc.account_id)?,
            path_segment(PLUGIN_NAME, "region", &doc.region)?,
            path_segment(PLUGIN_NAME, "instanceId", &doc.instance_id)?
        );
        let mut selectors = SelectorSet::new();
        for (name, value) in [
            ("account", &doc.account_id),
            ("region", &doc.region),
            ("az", &doc.availability_zone),
            ("instance_id", &doc.instance_id),
            ("image_id", &doc.image_id),
            ("instance_type", &doc.instance_type),
        ] {
            selectors.insert(selector(PLUGIN_NAME, format!("{name}:{value}"))?);
        }

        // 6. Trust on first use, last: nothing above may burn the instance's attestation.
        tofu::record_attestation(
            &*self.store,
            &tofu::record_key(&agent_path),
            &agent_path,
            self.allow_reattestation,
            self.clock.as_ref(),
        )
        .await?;
        tracing::info!(
            agent_path = %agent_path,
            account = %doc.account_id,
            region = %doc.region,
            instance = %doc.instance_id,
            "aws_iid: instance attested"
        );
        Ok(AttestationStep::Done(AttestationResult {
            agent_path,
            selectors,
            can_reattest: self.allow_reattestation,
        }))
    }
}

fn default_metadata_url() -> String {
    DEFAULT_METADATA_URL.to_owned()
}

fn default_token_ttl_seconds() -> u32 {
    DEFAULT_TOKEN_TTL_SECONDS
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

/// Settings of `[node_attestor.aws_iid]` on the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsAgentConfig {
    /// The instance metadata service (default [`DEFAULT_METADATA_URL`]; IPv6-only
    /// instances use `http://[fd00:ec2::254]`).
    #[serde(default = "default_metadata_url")]
    pub metadata_url: String,
    /// The IMDSv2 token lifetime asked for, 1 to 21600 seconds (default 60).
    #[serde(default = "default_token_ttl_seconds")]
    pub token_ttl_seconds: u32,
    /// The deadline of each metadata request, like `"5s"` (default 5 s).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for AwsAgentConfig {
    fn default() -> Self {
        AwsAgentConfig {
            metadata_url: default_metadata_url(),
            token_ttl_seconds: DEFAULT_TOKEN_TTL_SECONDS,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl AwsAgentConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = BaseUrl::parse(&self.metadata_url) {
            problems.push(format!("metadata_url: {e}"));
        }
        if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&self.token_ttl_seconds) {
            problems.push(format!(
                "token_ttl_seconds: {} is not between 1 and {MAX_TOKEN_TTL_SECONDS}",
                self.token_ttl_seconds
            ));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(300) {
            problems.push(format!(
                "timeout: {:?} is not between 1ms and 5m",
                self.timeout
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// The agent half of `aws_iid` node attestation.
#[derive(Debug, Clone)]
pub struct AwsIidAttestorClient {
    base: BaseUrl,
    token_ttl_seconds: u32,
    timeout: Duration,
}

impl AwsIidAttestorClient {
    /// An attestor with `cfg`; nothing is fetched until [`NodeAttestorClient::payload`].
    pub fn new(cfg: &AwsAgentConfig) -> Result<Self, Error> {
        cfg.validate()
            .map_err(|p| config_err(PLUGIN_NAME, p.join("; ")))?;
        let base = BaseUrl::parse(&cfg.metadata_url)
            .map_err(|e| config_err(PLUGIN_NAME, format!("metadata_url: {e}")))?;
        Ok(AwsIidAttestorClient {
            base,
            token_ttl_seconds: cfg.token_ttl_seconds,
            timeout: cfg.timeout,
        })
    }

    /// `GET path` with the IMDSv2 token; the body of a 2xx answer, as UTF-8.
    async fn get(&self, path: &str, token: &str, what: &str) -> Result<String, Error> {
        let body = self
            .base
            .request("GET", path, &[(TOKEN_HEADER, token)], self.timeout)
            .await?
            .ok_body(&format!("{PLUGIN_NAME}: {what} (GET {path})"))?;
        String::from_utf8(body).map_err(|_| {
            Error::Unavailable(format!(
                "{PLUGIN_NAME}: {what} (GET {path}) is not UTF-8 text"
            ))
        })
    }
}

#[async_trait::async_trait]
impl NodeAttestorClient for AwsIidAttestorClient {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn payload(&self, _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        let ttl = self.token_ttl_seconds.to_string();
        let token = self
            .base
            .request("PUT", TOKEN_PATH, &[(TOKEN_TTL_HEADER, &ttl)], self.timeout)
            .await?
            .ok_body(&format!(
                "{PLUGIN_NAME}: the IMDSv2 token (PUT {TOKEN_PATH})"
            ))?;
        // The token goes into a header: visible ASCII only. It is never logged.
        let token = String::from_utf8(token)
            .ok()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "{PLUGIN_NAME}: IMDS answered PUT {TOKEN_PATH} with something that is not \
                     a token"
                ))
            })?;
        let document = self
            .get(DOCUMENT_PATH, &token, "the instance identity document")
            .await?;
        let signature = self
            .get(SIGNATURE_PATH, &token, "the document's RSA-2048 signature")
            .await?;
        serde_json::to_vec(&Payload {
            version: PAYLOAD_VERSION,
            document,
            signature,
        })
        .map_err(|e| Error::Unavailable(format!("{PLUGIN_NAME}: encoding the payload: {e}")))
    }

    async fn answer(&self, _challenge: &[u8], _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        Err(rejected(
            PLUGIN_NAME,
            "the server sent a challenge, but aws_iid attestation has none (is the server's \
             plugin aws_iid?)",
        ))
    }
}
