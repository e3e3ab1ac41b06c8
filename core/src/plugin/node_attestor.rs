use std::fmt;

use crate::error::Error;
use crate::selector::SelectorSet;

/// What a successful node attestation proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationResult {
    /// The node's id under the attestor: the agent's SPIFFE ID becomes
    /// `spiffe://<td>/spire/agent/<attestor name>/<agent_path>`. One or more valid path
    /// segments, derived only from verified evidence.
    pub agent_path: String,
    /// Node selectors, derived only from verified evidence.
    pub selectors: SelectorSet,
    /// Whether the agent may attest again with fresh evidence to renew (TPM, cloud), as
    /// opposed to evidence that is consumed (join tokens).
    pub can_reattest: bool,
}

/// What both halves know about the attestation besides the evidence: the agent's own
/// public key, which the server will certify in the agent SVID, and a value only the two
/// ends of this TLS connection share. An attestor that can prove where that key lives (a
/// TPM's TPM2_Certify) binds it to the evidence; one whose evidence could be relayed (a
/// Kerberos token) binds it to [`AttestationContext::tls_exporter`].
#[derive(Clone, PartialEq, Eq)]
pub struct AttestationContext {
    /// The agent key's SubjectPublicKeyInfo (DER): on the server, taken from the CSR
    /// (whose self-signature was verified); on the agent, the key it generated.
    pub agent_public_key: Vec<u8>,
    /// [`TLS_EXPORTER_LEN`] bytes of the TLS 1.3 exporter (RFC 8446 §7.5) of the
    /// connection that carries this attestation, with label [`TLS_EXPORTER_LABEL`] and no
    /// context: RFC 9266's `tls-exporter` channel binding. Both ends compute the same
    /// value; nobody else can, and it differs on every connection, so evidence bound to
    /// it is worthless on any other connection. It is keying material: never log it.
    pub tls_exporter: Vec<u8>,
}

impl fmt::Debug for AttestationContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttestationContext")
            .field("agent_public_key", &self.agent_public_key.len())
            .field("tls_exporter", &"<redacted>")
            .finish()
    }
}

/// The exporter label of [`AttestationContext::tls_exporter`] (RFC 9266 `tls-exporter`).
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// Length of [`AttestationContext::tls_exporter`] (RFC 9266: 32 bytes).
pub const TLS_EXPORTER_LEN: usize = 32;

/// The next step of a node attestation.
#[derive(Debug)]
pub enum AttestationStep {
    /// Send `challenge` to the agent and pass its answer to `session.respond`.
    Challenge {
        /// Opaque bytes for the agent's attestor.
        challenge: Vec<u8>,
        /// The state to continue from.
        session: Box<dyn AttestationSession>,
    },
    /// Attestation succeeded.
    Done(AttestationResult),
}

/// An attestation in progress, waiting for the agent's answer to a challenge.
#[async_trait::async_trait]
pub trait AttestationSession: Send + fmt::Debug {
    /// Verifies the agent's answer; returns another challenge or the result.
    async fn respond(self: Box<Self>, response: &[u8]) -> Result<AttestationStep, Error>;
}

/// The server half of node attestation, a challenge/response state machine.
///
/// Contract:
/// 1. `begin` receives the agent's first payload and returns a challenge or the result;
/// 2. every step verifies what it receives before answering; a failed check is
///    [`Error::AttestationRejected`], never a partial result;
/// 3. evidence that was used before (a join token, a Kerberos authenticator, a quote
///    over a stale nonce, an instance that already attested) is
///    [`Error::AttestationReplay`] unless the plugin is configured otherwise;
/// 4. selectors and the agent path come only from verified evidence;
/// 5. the evidence (tokens, tickets) is never logged.
#[async_trait::async_trait]
pub trait NodeAttestor: Send + Sync + fmt::Debug {
    /// The plugin name (`join_token`, `tpm`, ...); it is the `<attestor>` segment of the
    /// agent's SPIFFE ID.
    fn name(&self) -> &str;
    /// Starts an attestation with the agent's first payload.
    async fn begin(
        &self,
        payload: &[u8],
        ctx: &AttestationContext,
    ) -> Result<AttestationStep, Error>;

    /// The record to delete from this attestor's [`NodeStateStore`] when the agent
    /// `agent_path` (the part of its ID after `/spire/agent/<name>/`) is evicted, if
    /// any. An attestor that admits each node once (trust on first use) names the
    /// record that would refuse the node: evicting the agent is how an operator lets
    /// it attest again. The default keeps every record (a TPM's clock record guards
    /// against replayed quotes whichever agent holds the TPM).
    fn forget_on_eviction(&self, agent_path: &str) -> Option<String> {
        let _ = agent_path;
        None
    }
}

/// The agent half of node attestation.
///
/// Contract: `payload` produces the first message (fresh evidence each call);
/// `answer` answers one challenge of the server half, on the same connection and so with
/// the same context. Secrets in either are never logged.
#[async_trait::async_trait]
pub trait NodeAttestorClient: Send + Sync + fmt::Debug {
    /// The plugin name; must equal the server half's.
    fn name(&self) -> &str;
    /// The first message of an attestation, for the agent key in `ctx`.
    async fn payload(&self, ctx: &AttestationContext) -> Result<Vec<u8>, Error>;
    /// The answer to one challenge of the attestation `payload` began.
    async fn answer(&self, challenge: &[u8], ctx: &AttestationContext) -> Result<Vec<u8>, Error>;
}

/// Where a node attestor keeps per-node state between attestations: the server's
/// datastore (`attestation_state`), one namespace per attestor. The TPM attestor keeps
/// each TPM's last quote clock; the cloud attestors record each instance that attested
/// (trust on first use).
#[async_trait::async_trait]
pub trait NodeStateStore: Send + Sync + fmt::Debug {
    /// The saved state of node `key`.
    async fn load(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Saves the state of node `key`, replacing what was there.
    async fn save(&self, key: &str, data: &[u8]) -> Result<(), Error>;
    /// Saves the state of node `key` only if it has none, atomically: of two concurrent
    /// calls for one key exactly one returns `true`. `false` means a record was already
    /// there (it is left unchanged).
    async fn save_new(&self, key: &str, data: &[u8]) -> Result<bool, Error>;
}

/// A [`NodeStateStore`] in a map, for tests and benchmarks (the server's is its
/// datastore).
#[derive(Debug, Default)]
pub struct MemoryStateStore(std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>);

impl MemoryStateStore {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Vec<u8>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many nodes have state.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no node has state.
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Deletes the state of node `key` (what the server's eviction does to the record a
    /// plugin names); whether there was any.
    pub fn remove(&self, key: &str) -> bool {
        self.map().remove(key).is_some()
    }
}

#[async_trait::async_trait]
impl NodeStateStore for MemoryStateStore {
    async fn load(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.map().get(key).cloned())
    }

    async fn save(&self, key: &str, data: &[u8]) -> Result<(), Error> {
        self.map().insert(key.to_owned(), data.to_vec());
        Ok(())
    }

    async fn save_new(&self, key: &str, data: &[u8]) -> Result<bool, Error> {
        match self.map().entry(key.to_owned()) {
            std::collections::hash_map::Entry::Occupied(_) => Ok(false),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(data.to_vec());
                Ok(true)
            }
        }
    }
}

/// Parses attestation message `what` of plugin `plugin` from JSON `bytes`, refusing more
/// than `max` bytes and malformed input, each as [`Error::AttestationRejected`] naming
/// the message. Every plugin's wire decoding goes through it (or through
/// [`decode_versioned_message`]), so no attestation message is parsed uncapped.
pub fn decode_message<T: serde::de::DeserializeOwned>(
    plugin: &str,
    what: &str,
    bytes: &[u8],
    max: usize,
) -> Result<T, Error> {
    check_message_len(plugin, what, bytes, max)?;
    serde_json::from_slice(bytes)
        .map_err(|e| Error::AttestationRejected(format!("{plugin}: malformed {what}: {e}")))
}

/// [`decode_message`] for a message that carries its format's version
/// (`{"version": N, ...}`): the version is checked before any other member is read, so
/// an agent that speaks another version is told just that. The version stays in what
/// is decoded. Like serde's, the errors may quote a member's value when its type is
/// wrong; a caller whose messages carry secrets decodes into a
/// [`serde_json::Map`] and checks the members itself.
pub fn decode_versioned_message<T: serde::de::DeserializeOwned>(
    plugin: &str,
    what: &str,
    bytes: &[u8],
    max: usize,
    version: u64,
) -> Result<T, Error> {
    let rejected = |msg: String| Error::AttestationRejected(format!("{plugin}: {msg}"));
    check_message_len(plugin, what, bytes, max)?;
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| rejected(format!("the {what} is not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(rejected(format!("the {what} is not a JSON object")));
    };
    match object.get("version") {
        None => return Err(rejected(format!("the {what} has no version"))),
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(version) => {}
        Some(serde_json::Value::Number(n)) => {
            return Err(rejected(format!(
                "the agent speaks {what} version {n}, this server {version}"
            )));
        }
        Some(_) => return Err(rejected(format!("the {what}'s version is not a number"))),
    }
    serde_json::from_value(value).map_err(|e| rejected(format!("malformed {what}: {e}")))
}

fn check_message_len(plugin: &str, what: &str, bytes: &[u8], max: usize) -> Result<(), Error> {
    if bytes.len() > max {
        return Err(Error::AttestationRejected(format!(
            "{plugin}: the {what} is {} bytes, more than {max}",
            bytes.len()
        )));
    }
    Ok(())
}
