//! TPM 2.0 node attestation (plugin `tpm`, agent and server halves) and the agent's
//! `tpm` key manager.
//!
//! Layout: [`wire`] (the messages), [`device`] (the agent's TPM operations over
//! tss-esapi), [`shared`] (one TPM context per process, shared by the agent's key
//! manager and attestor), [`keys`] (the agent key in the TPM), [`agent`] and [`server`]
//! (the two attestor halves), [`credential`] (the server's software MakeCredential),
//! [`verify`] (the server's checks of EK, AK, quote, PCR policy and agent key
//! certification), [`eventlog`] (the TCG boot event log: parser, replay, and the
//! measured-boot policy over its events).
//!
//! # Agent settings
//!
//! ```toml
//! [key_manager.tpm]                # optional: the agent's own key in the TPM
//! tcti = "device:/dev/tpmrm0"      # default; or "swtpm:host=127.0.0.1,port=2321"
//! directory = "keys-tpm"           # default <data_dir>/keys-tpm; relative to the data dir
//!
//! [node_attestor.tpm]
//! tcti = "device:/dev/tpmrm0"      # default; use the same string as the key manager
//! event_log = "/sys/kernel/security/tpm0/binary_bios_measurements"  # default for device:
//! ```
//!
//! `[key_manager.tpm]` ([`keys::TpmKeyManagerConfig`]) generates the agent's key (the
//! key of its agent SVID, which signs the CSR and the agent's TLS handshakes with the
//! server) inside the TPM: an ECDSA P-256 key that is fixedTPM and fixedParent, created
//! under the owner hierarchy's storage root key. The data dir holds only its public
//! area and the TPM's encrypted private blob (`<id>.tpmkey`, mode 0600), which no other
//! TPM can load; the blob loads again after an agent or TPM restart because the SRK is
//! re-derived from the TPM's seed. Only `ec-p256` is supported. Workload keys are not
//! affected: they stay in the agent's memory. Each signature costs a TPM round trip
//! (about 2 ms on swtpm, 100-700 ms on a hardware TPM); the agent signs only its CSRs and
//! its TLS handshakes to the server with it.
//!
//! The key manager and the attestor share one TPM context per TCTI string
//! ([`shared::SharedTpm::for_tcti`]): a TPM without a resource manager has three object
//! slots and no arbitration between clients. Every path flushes what it loaded.
//!
//! # Server settings (`[node_attestor.tpm]`, [`server::TpmServerConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `ek_ca_files` | | PEM files of the TPM vendors' EK CA roots and intermediates |
//! | `ek_hash_allowlist` | | SHA-256 of accepted EK public keys (SPKI DER), lowercase hex |
//! | `pcrs` | 0-7 | the sha256 PCRs to quote; each becomes a selector |
//! | `pcr_policy` | | PCR index → allowed values |
//! | `require_agent_key_in_tpm` | false | refuse agents whose key is not certified to be in the TPM |
//! | `measured_boot` | | the policy over the boot event log ([`eventlog::policy`]); agents must send their log |
//!
//! # What the agent key certification proves
//!
//! When the agent's key is a TPM key on the attesting TPM, the payload carries its public
//! area and the answer a TPM2_Certify of it, signed by the AK with the server's fresh
//! nonce. The server checks ([`verify::check_agent_key`], [`verify::verify_certify`]):
//!
//! 1. the key's public area says it was generated in a TPM and cannot leave it
//!    (fixedTPM, fixedParent, sensitiveDataOrigin), signs and does not decrypt, P-256;
//! 2. its SubjectPublicKeyInfo is the CSR's key (the key the agent SVID will certify);
//! 3. the certification is signed by the AK, is TPM-generated (TPM_GENERATED_VALUE,
//!    TPM_ST_ATTEST_CERTIFY), carries this attestation's nonce, and names exactly that
//!    public area (its Name).
//!
//! With credential activation (the AK is in the TPM that holds the trusted EK), this
//! proves the private key of the agent SVID is inside that TPM and cannot be copied
//! out: a stolen data dir, or evidence relayed from another host, cannot produce a
//! working agent. On success the node gets the selector `tpm:agent_key:tpm`
//! ([`verify::AGENT_KEY_IN_TPM_SELECTOR`]), so registration entries can require it;
//! `require_agent_key_in_tpm = true` refuses nodes without it ("the agent key is not in
//! the TPM"). Agents with a software key send version 1 messages without the optional
//! fields and attest as before.
//!
//! The certification says nothing about the PCRs at signing time: that is the quote's
//! job, made in the same answer over the same nonce.

pub mod agent;
pub mod credential;
pub mod device;
pub mod eventlog;
pub mod keys;
pub mod server;
pub mod shared;
pub mod verify;
pub mod wire;

/// Locks `m`, taking the value of a poisoned lock as it is. Every mutex in this crate
/// guards a value that each critical section leaves whole (single inserts and removes
/// on maps, a TPM device whose state is checked at each use and reopened when broken,
/// an OpenSSL context whose calls complete or fail as a whole), so a panic in another
/// thread leaves nothing half-updated behind it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
