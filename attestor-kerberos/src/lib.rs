//! Kerberos node attestation (plugin `kerberos`, agent and server halves).
//!
//! A node proves who it is with the host keytab it already has from joining its realm
//! (MIT or Active Directory): the agent makes the standard GSS-API krb5 initial context
//! token (RFC 4121) for the server's service principal, and the server accepts it with
//! its own keytab. Layout: [`wire`] (the messages), [`names`] (principal parsing, host
//! normalisation, agent ID and selectors), [`agent`] and [`server`] (the two halves),
//! `gss` (the GSS-API calls, the crate's only unsafe code) and `pac` (group SIDs from an
//! AD PAC).
//!
//! # Binding: why a captured token is worthless
//!
//! The token's authenticator carries GSS channel bindings (RFC 4121 §4.1.1.2) whose
//! application data is [`channel_bindings`]: a label, the TLS exporter of the node API
//! connection the attestation runs on (RFC 9266 `tls-exporter`, known only to the two
//! ends of that connection) and a 32-byte nonce the server just drew. The authenticator
//! is encrypted in the ticket's session key, so nobody can change the bindings without
//! the host's keys. The server passes its own bindings to `gss_accept_sec_context`;
//! MIT compares them (`GSS_S_BAD_BINDINGS` on mismatch) and, because MIT also accepts
//! tokens with no bindings at all, the server additionally requires
//! `GSS_C_CHANNEL_BOUND_FLAG`. A token relayed to another connection, another server
//! replica or a later attestation therefore fails. The replay cache (a `file2:` cache in
//! the server's data dir) is the second line: an authenticator seen before is refused
//! as a replay even before its bindings are compared.
//!
//! # Agent settings (`[node_attestor.kerberos]`, [`agent::KerberosAgentConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `service_principal` | (required) | the server's principal, e.g. `carapace/server.example.com@EXAMPLE.COM` |
//! | `keytab` | `/etc/krb5.keytab` | the host keytab |
//! | `principal` | the host principal | the client principal in the keytab, e.g. `host/node1.example.com@EXAMPLE.COM` or `NODE1$@EXAMPLE.COM` |
//! | `mutual_auth` | `true` | also check the server's AP-REP (proof the server holds the service key) |
//!
//! Credentials come from the keytab through `gss_acquire_cred_from` with a private
//! `MEMORY:` credential cache per attestation, destroyed afterwards: every attestation
//! asks the KDC for a fresh ticket, and no environment variable or shared cache is read
//! or written.
//!
//! # Server settings (`[node_attestor.kerberos]`, [`server::KerberosServerConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `keytab` | (required) | the keytab holding `service_principal`'s keys |
//! | `service_principal` | (required) | the only principal tickets may be for |
//! | `allowed_realms` | (required) | client realms accepted, e.g. `["EXAMPLE.COM"]` |
//! | `machine_account_domains` | | realm → AD DNS domain, for `NAME$` accounts whose DNS domain is not the realm in lowercase |
//! | `replay_cache` | `<data_dir>/kerberos.rcache` | the acceptor's replay cache file |
//!
//! # Result
//!
//! Agent ID `spiffe://<td>/spire/agent/kerberos/<REALM>/<host fqdn>`; selectors
//! `kerberos:realm:<REALM>`, `kerberos:principal:<principal>`, `kerberos:host:<fqdn>` and,
//! when the ticket carries a PAC whose server signature MIT verified,
//! `kerberos:group_sid:<SID>` for each group in its logon info. Attestation can be
//! repeated with a fresh ticket, so agents renew by attesting again: a host removed from
//! the realm loses its identity at its next renewal.

mod gss;
mod pac;

pub mod agent;
pub mod names;
pub mod server;
pub mod wire;

use std::fmt;
use std::path::Path;

use carapace_core::Error;
use carapace_core::plugin::TLS_EXPORTER_LEN;

/// The plugin name on both sides.
pub const PLUGIN_NAME: &str = "kerberos";

/// Length of the server's nonce.
pub const NONCE_LEN: usize = 32;

const BINDINGS_LABEL: &[u8] = b"carapace kerberos node attestation v1\0";

/// The application data of the GSS channel bindings: a fixed label, the TLS exporter of
/// the attestation's connection and the server's nonce.
pub fn channel_bindings(tls_exporter: &[u8], nonce: &[u8]) -> Result<Vec<u8>, Error> {
    if tls_exporter.len() != TLS_EXPORTER_LEN || nonce.len() != NONCE_LEN {
        return Err(Error::AttestationRejected(format!(
            "{PLUGIN_NAME}: channel bindings need a {TLS_EXPORTER_LEN}-byte TLS exporter and a \
             {NONCE_LEN}-byte nonce (got {} and {})",
            tls_exporter.len(),
            nonce.len()
        )));
    }
    let mut out = Vec::with_capacity(BINDINGS_LABEL.len() + TLS_EXPORTER_LEN + NONCE_LEN);
    out.extend_from_slice(BINDINGS_LABEL);
    out.extend_from_slice(tls_exporter);
    out.extend_from_slice(nonce);
    Ok(out)
}

/// An attestation refusal, prefixed with the plugin name.
pub(crate) fn rejected(msg: impl fmt::Display) -> Error {
    Error::AttestationRejected(format!("{PLUGIN_NAME}: {msg}"))
}

/// Refuses a keytab (long-term keys) that is not a file or that others can read; `key`
/// names the setting in the message.
pub(crate) fn check_keytab(path: &Path, key: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{key} {} is not a file", path.display()));
    }
    carapace_core::files::check_private(key, path, &meta)
}
