//! SSH host-certificate node attestation (plugin `sshpop`, agent and server halves).
//!
//! A node proves who it is with what an SSH-managed fleet already has: a host key
//! (`/etc/ssh/ssh_host_ed25519_key`) and an OpenSSH host certificate for it, signed by
//! the fleet's SSH CA. The agent sends the certificate; the server checks it against the
//! CAs it trusts, then challenges the agent to prove it holds the certified host key.
//! Layout: [`wire`] (the messages), [`agent`] and [`server`] (the two halves); this
//! module holds what both halves must compute identically ([`signed_message`],
//! [`agent_path`], [`ca_fingerprint`]) and the certificate decoding they share.
//!
//! # Protocol
//!
//! 1. agent → server, [`wire::Payload`]: the host certificate (its OpenSSH wire
//!    encoding, base64).
//! 2. The server checks the certificate, all before it answers:
//!    - the signing CA's SHA-256 fingerprint is one of the configured CAs, and the CA's
//!      signature over the certificate verifies;
//!    - the certificate type is *host* (a user certificate proves nothing about a node);
//!    - the current time is inside the validity window (`valid after <= now < valid
//!      before`, no clock skew allowed, as OpenSSH does), and the certificate is not
//!      "valid forever" (see below);
//!    - it names at least one principal (OpenSSH reads an empty list as "any host"),
//!      every principal is non-empty and free of control characters, and, when
//!      `canonical_domain` is set, at least one principal is that domain or a subdomain
//!      of it;
//!    - it carries no critical option at all (OpenSSH defines none for host
//!      certificates, so one that is there is something this server cannot honour);
//!    - the host key is ed25519, ECDSA P-256/P-384 or RSA.
//! 3. server → agent, [`wire::Challenge`]: 32 fresh random bytes (the server nonce).
//! 4. agent → server, [`wire::Answer`]: 32 fresh random bytes of its own (the agent
//!    nonce) and an SSHSIG signature (OpenSSH's `PROTOCOL.sshsig`, the format of
//!    `ssh-keygen -Y sign`) by the host key, namespace [`SSHSIG_NAMESPACE`], hash
//!    [`SSHSIG_HASH`], over the 32-byte [`signed_message`]:
//!    `SHA-256(server nonce || agent nonce || TLS exporter)`.
//! 5. The server verifies the signature with the certificate's public key (the signing
//!    key must be exactly that key, the namespace and hash exactly the above, the
//!    signature algorithm one that fits the key) and the attestation succeeds.
//!
//! ## Binding: why a captured answer is worthless
//!
//! The server nonce is fresh for every attestation, so an old answer does not verify
//! against a new challenge. The TLS exporter (RFC 9266 `tls-exporter`,
//! [`carapace_core::plugin::AttestationContext::tls_exporter`]) is known only to the two
//! ends of the node API connection the attestation runs on. SPIRE's `sshpop` signs only
//! `SHA-256(server nonce || agent nonce)`, which a malicious server (or anything the
//! agent was tricked into talking to) could forward to a real server as its own proof;
//! here the relayed answer names the wrong connection and fails. The SSHSIG namespace
//! keeps the host key's signature from meaning anything in another protocol (SSH user
//! authentication, `git` commit signing, ...), and keeps their signatures from meaning
//! anything here.
//!
//! ## "Valid forever" certificates are refused
//!
//! `ssh-keygen -s` without `-V` makes a certificate that never expires (valid before
//! `2^64 - 1`). A node identity that can never lapse cannot be withdrawn short of
//! distrusting the whole CA, so both halves refuse such a certificate with a message
//! that says how to re-sign it with an expiry. (ssh-key 0.6.7 cannot decode these
//! certificates at all; the crate recognises them from the wire encoding first, so the
//! operator gets that message and not a decoding error.)
//!
//! # Result
//!
//! Agent ID `spiffe://<td>/spire/agent/sshpop/<fingerprint>`, where `<fingerprint>` is
//! [`agent_path`]: the unpadded URL-safe base64 of the SHA-256 of the host **public
//! key**'s SSH wire encoding (the same hash `ssh-keygen -lf host_key.pub` prints, with
//! `+/` written `-_`). SPIRE hashes the certificate instead; Carapace hashes the key so
//! that the node keeps its ID when its host certificate is renewed, and changes it only
//! when the host key changes.
//!
//! Selectors (SPIRE's `sshpop` gives none): `sshpop:principal:<p>` for every principal,
//! `sshpop:key_id:<id>` when the key ID is not empty, and
//! `sshpop:ca_fingerprint:SHA256:<base64>`, exactly as `ssh-keygen -lf ca.pub` prints
//! it. Attestation can be repeated (a fresh nonce each time), so agents renew by
//! attesting again: a host whose certificate lapses loses its identity at its next
//! renewal.
//!
//! # Server settings (`[node_attestor.sshpop]`, [`server::SshServerConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `cert_authorities` | `[]` | trusted CA public keys, authorized_keys lines: `ssh-ed25519 AAAA... ca`, optionally prefixed by the `cert-authority` option |
//! | `cert_authorities_path` | | a file of such lines (`#` comments and blank lines skipped); a relative path is resolved against the data dir of the context given to [`server::SshAttestor::new`] |
//! | `canonical_domain` | | when set, at least one principal must be this domain or a subdomain of it |
//!
//! At least one CA must be configured, through either setting.
//!
//! # Agent settings (`[node_attestor.sshpop]`, [`agent::SshAgentConfig`])
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `host_key_path` | `/etc/ssh/ssh_host_ed25519_key` | the host's private key (mode 0600, not encrypted) |
//! | `host_cert_path` | `<host_key_path>-cert.pub` | its host certificate, re-read at each attestation |

pub mod agent;
pub mod server;
pub mod wire;

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::{Digest as _, Sha256};
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, Certificate, EcdsaCurve, HashAlg};

use carapace_core::Error;
use carapace_core::clock::Clock;
use carapace_core::plugin::TLS_EXPORTER_LEN;

/// The plugin name on both sides.
pub const PLUGIN_NAME: &str = "sshpop";

/// Length of the server's and of the agent's nonce.
pub const NONCE_LEN: usize = 32;

/// The SSHSIG namespace of the proof signature. A signature made under it verifies
/// under no other namespace, so the host key's proof here cannot be replayed into any
/// other protocol that uses SSHSIG (and theirs cannot be replayed here). The `@v1`
/// names this crate's protocol version: a new [`signed_message`] gets a new namespace.
pub const SSHSIG_NAMESPACE: &str = "carapace-sshpop@v1";

/// The SSHSIG hash algorithm of the proof signature; the server accepts no other.
pub const SSHSIG_HASH: HashAlg = HashAlg::Sha512;

/// The largest `valid before` ssh-key can represent (`i64::MAX` seconds). OpenSSH's
/// "forever" is `u64::MAX`; anything past this is treated as forever.
const MAX_REPRESENTABLE_TIME: u64 = i64::MAX.unsigned_abs();

/// What the host key signs (inside SSHSIG): `SHA-256(server_nonce || agent_nonce ||
/// tls_exporter)`. Both halves call this, so they cannot disagree.
pub fn signed_message(
    server_nonce: &[u8],
    agent_nonce: &[u8],
    tls_exporter: &[u8],
) -> Result<[u8; 32], Error> {
    if server_nonce.len() != NONCE_LEN
        || agent_nonce.len() != NONCE_LEN
        || tls_exporter.len() != TLS_EXPORTER_LEN
    {
        return Err(rejected(format!(
            "the signed message needs a {NONCE_LEN}-byte server nonce, a {NONCE_LEN}-byte agent \
             nonce and a {TLS_EXPORTER_LEN}-byte TLS exporter (got {}, {} and {})",
            server_nonce.len(),
            agent_nonce.len(),
            tls_exporter.len()
        )));
    }
    let mut h = Sha256::new();
    h.update(server_nonce);
    h.update(agent_nonce);
    h.update(tls_exporter);
    Ok(h.finalize().into())
}

/// The agent path of a host key: unpadded URL-safe base64 of the SHA-256 of the key's
/// SSH wire encoding. It depends on the key only, never on the certificate.
pub fn agent_path(host_key: &KeyData) -> String {
    URL_SAFE_NO_PAD.encode(host_key.fingerprint(HashAlg::Sha256).as_bytes())
}

/// A CA key's fingerprint as `ssh-keygen -lf` prints it: `SHA256:<unpadded base64>`.
pub fn ca_fingerprint(ca: &KeyData) -> String {
    ca.fingerprint(HashAlg::Sha256).to_string()
}

/// The refusal of a certificate that never expires, the same on both halves.
pub(crate) const FOREVER: &str = "the host certificate is valid forever (no expiry), which \
    sshpop refuses: an identity that never expires cannot be withdrawn. Re-sign it with an \
    expiry, e.g. ssh-keygen -s ca_key -h -I <key id> -n <host names> -V +52w host_key.pub";

/// The refusal of a user certificate, the same on both halves.
pub(crate) const USER_CERT: &str = "the certificate is a user certificate, not a host \
    certificate: sign the host key with ssh-keygen -s ca_key -h";

/// An attestation refusal, prefixed with the plugin name.
pub(crate) fn rejected(msg: impl fmt::Display) -> Error {
    Error::AttestationRejected(format!("{PLUGIN_NAME}: {msg}"))
}

/// A settings error of this plugin.
pub(crate) fn config_err(reason: impl fmt::Display) -> Error {
    Error::PluginConfig {
        plugin: format!("node_attestor.{PLUGIN_NAME}"),
        reason: reason.to_string(),
    }
}

/// Seconds since the Unix epoch on `clock`, now, as SSH certificates count them (a
/// clock never reads before the epoch, so the conversion is exact).
pub(crate) fn now(clock: &dyn Clock) -> u64 {
    clock.unix_now().unsigned_abs()
}

/// `secs` since the epoch as RFC 3339 UTC (`2020-01-02T00:00:00Z`), by core's
/// [`carapace_core::clock::rfc3339`]: a time past 9999-12-31 prints as `unix <n> (outside
/// 1970-01-01..9999-12-31)`. SSH certificate times fit an `i64` (ssh-key refuses larger).
pub(crate) fn rfc3339(secs: u64) -> String {
    carapace_core::clock::rfc3339(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// Reads an SSH wire encoding field by field (RFC 4251 §5).
struct WireReader<'a>(&'a [u8]);

impl<'a> WireReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
}

/// `(valid after, valid before)` as a certificate's wire encoding declares them
/// (`PROTOCOL.certkeys`), read without decoding the rest; `None` for an encoding this
/// cannot walk (an unknown key type, a truncated blob). It exists to recognise "valid
/// forever" certificates, which ssh-key 0.6.7 cannot decode.
pub(crate) fn declared_validity(blob: &[u8]) -> Option<(u64, u64)> {
    let mut r = WireReader(blob);
    let kind = std::str::from_utf8(r.string()?).ok()?;
    let key = kind.strip_suffix("-cert-v01@openssh.com")?;
    // The public key's fields between the nonce and the serial.
    let key_fields = match key {
        "ssh-ed25519" => 1,
        "ssh-rsa" | "sk-ssh-ed25519@openssh.com" => 2,
        "sk-ecdsa-sha2-nistp256@openssh.com" => 3,
        "ssh-dss" => 4,
        k if k.starts_with("ecdsa-sha2-") => 2,
        _ => return None,
    };
    r.string()?; // nonce
    for _ in 0..key_fields {
        r.string()?;
    }
    r.u64()?; // serial
    r.u32()?; // type
    r.string()?; // key id
    r.string()?; // valid principals
    Some((r.u64()?, r.u64()?))
}

/// Decodes a certificate from its wire encoding, recognising "valid forever" ones.
///
/// Refuses an encoding that does not re-encode to the same bytes: ssh-key 0.6.7 reads a
/// fixed-size key field without checking its length prefix, and checks the CA signature
/// over its own re-encoding, so without this a blob the CA never signed (a key length of
/// 127 instead of 32) would be accepted as the certificate it re-encodes to.
pub(crate) fn cert_from_blob(blob: &[u8]) -> Result<Certificate, String> {
    if let Some((_, before)) = declared_validity(blob)
        && before > MAX_REPRESENTABLE_TIME
    {
        return Err(FOREVER.into());
    }
    let cert = Certificate::from_bytes(blob)
        .map_err(|e| format!("the host certificate cannot be decoded: {e}"))?;
    match cert.to_bytes() {
        Ok(again) if again == blob => Ok(cert),
        _ => Err(
            "the host certificate is not in canonical SSH wire encoding (it does not \
                  re-encode to the same bytes)"
                .into(),
        ),
    }
}

/// Decodes a certificate file's text (`<type>-cert-v01@openssh.com <base64> [comment]`)
/// into the certificate and its wire encoding.
pub(crate) fn cert_from_openssh(text: &str) -> Result<(Certificate, Vec<u8>), String> {
    let mut parts = text.split_ascii_whitespace();
    let (Some(kind), Some(data)) = (parts.next(), parts.next()) else {
        return Err(
            "is not an OpenSSH certificate (expected `<type>-cert-v01@openssh.com <base64> \
             [comment]`)"
                .into(),
        );
    };
    if !kind.ends_with("-cert-v01@openssh.com") {
        return Err(format!(
            "holds a {kind} key, not a certificate: give the host certificate (e.g. \
             ssh_host_ed25519_key-cert.pub)"
        ));
    }
    let blob = STANDARD
        .decode(data)
        .map_err(|e| format!("is not an OpenSSH certificate: its data is not base64 ({e})"))?;
    let cert = cert_from_blob(&blob)?;
    if cert.algorithm().to_certificate_type() != kind {
        return Err(format!(
            "says {kind} but holds a {} certificate",
            cert.algorithm().to_certificate_type()
        ));
    }
    Ok((cert, blob))
}

/// Refuses a host key type this crate cannot verify proofs of; `what` names the key.
pub(crate) fn check_host_key_algorithm(what: &str, alg: &Algorithm) -> Result<(), String> {
    match alg {
        Algorithm::Ed25519
        | Algorithm::Rsa { .. }
        | Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256 | EcdsaCurve::NistP384,
        } => Ok(()),
        other => Err(format!(
            "{what} is {}, which sshpop does not support (ssh-ed25519, ecdsa-sha2-nistp256, \
             ecdsa-sha2-nistp384 or ssh-rsa)",
            other.as_str()
        )),
    }
}

/// Whether a signature made with algorithm `sig` can come from a key of algorithm
/// `key`: the same algorithm, or for RSA keys one of the SHA-2 variants (never SHA-1
/// `ssh-rsa`).
pub(crate) fn signature_fits_key(key: &Algorithm, sig: &Algorithm) -> bool {
    match key {
        Algorithm::Rsa { .. } => matches!(sig, Algorithm::Rsa { hash: Some(_) }),
        _ => sig == key,
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]

    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_577_836_800), "2020-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_577_923_200), "2020-01-02T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3_661), "2000-02-29T01:01:01Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn signed_message_refuses_wrong_lengths_and_binds_every_input() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let x = [3u8; 32];
        let m = signed_message(&a, &b, &x).unwrap();
        assert_ne!(m, signed_message(&b, &a, &x).unwrap());
        assert_ne!(m, signed_message(&a, &b, &[4u8; 32]).unwrap());
        assert!(signed_message(&a[..31], &b, &x).is_err());
        assert!(signed_message(&a, &b, &x[..16]).is_err());
    }

    #[test]
    fn declared_validity_walks_a_hand_made_certificate_encoding() {
        fn string(out: &mut Vec<u8>, s: &[u8]) {
            out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
            out.extend_from_slice(s);
        }
        let mut blob = Vec::new();
        string(&mut blob, b"ssh-ed25519-cert-v01@openssh.com");
        string(&mut blob, &[9; 32]); // nonce
        string(&mut blob, &[7; 32]); // key
        blob.extend_from_slice(&5u64.to_be_bytes()); // serial
        blob.extend_from_slice(&2u32.to_be_bytes()); // host
        string(&mut blob, b"id");
        string(&mut blob, b"");
        blob.extend_from_slice(&0u64.to_be_bytes());
        blob.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(declared_validity(&blob), Some((0, u64::MAX)));
        assert_eq!(cert_from_blob(&blob).unwrap_err(), FOREVER);
        assert_eq!(declared_validity(&blob[..blob.len() - 1]), None);
    }

    /// A host certificate signed by an Ed25519 CA, made with ssh-key (no ssh-keygen).
    fn host_cert_blob() -> Vec<u8> {
        use ssh_key::PrivateKey;
        use ssh_key::certificate::{Builder, CertType};
        use ssh_key::private::Ed25519Keypair;
        let ca = PrivateKey::from(Ed25519Keypair::from_seed(&[1; 32]));
        let host = PrivateKey::from(Ed25519Keypair::from_seed(&[2; 32]));
        let mut b = Builder::new(vec![9; 32], host.public_key(), 1_000, 2_000_000_000).unwrap();
        b.serial(7).unwrap();
        b.cert_type(CertType::Host).unwrap();
        b.key_id("node1").unwrap();
        b.valid_principal("node1.example.org").unwrap();
        b.sign(&ca).unwrap().to_bytes().unwrap()
    }

    /// Found by the property test of the server (tests/fuzz.rs): ssh-key decoded a host
    /// key whose length prefix said 127 bytes as the 32-byte key and verified the CA
    /// signature over its re-encoding, so a blob the CA never signed was accepted.
    #[test]
    fn a_certificate_with_a_wrong_key_length_prefix_is_refused() {
        let good = host_cert_blob();
        assert!(cert_from_blob(&good).is_ok());
        // type string (4 + 32), nonce (4 + 32), then the key's length prefix.
        let at = 4 + 32 + 4 + 32;
        assert_eq!(good[at..at + 4], [0, 0, 0, 32]);
        let mut bad = good.clone();
        bad[at + 3] = 127;
        let e = cert_from_blob(&bad).unwrap_err();
        assert!(e.contains("not in canonical SSH wire encoding"), "{e}");
        // Trailing bytes are refused too.
        let mut trailing = good;
        trailing.push(0);
        assert!(cert_from_blob(&trailing).is_err());
    }

    mod properties {
        use super::*;
        use carapace_fuzzkit::proptest::prelude::*;
        use carapace_fuzzkit::{bounded, config, mutated, mutated_text};

        proptest! {
            #![proptest_config(config(500))]

            /// The wire reader and the decoder never panic; what is accepted is exactly
            /// its own encoding, and the reader's window is the decoder's.
            #[test]
            fn certificate_blobs_never_panic_and_re_encode_to_themselves(
                blob in mutated(vec![host_cert_blob()]),
            ) {
                let validity = bounded("declared_validity", blob.len(), || declared_validity(&blob));
                if let Ok(cert) = bounded("cert_from_blob", blob.len(), || cert_from_blob(&blob)) {
                    prop_assert_eq!(cert.to_bytes().unwrap(), blob.clone());
                    // Where the reader can walk it (a known key type), it reads the
                    // window the decoder does.
                    if validity.is_some() || cert.public_key().algorithm().is_ed25519() {
                        prop_assert_eq!(validity, Some((cert.valid_after(), cert.valid_before())));
                    }
                }
            }

            /// Certificate files (the agent reads its own): never a panic; what is
            /// accepted is the certificate the file's base64 encodes, of the type it says.
            #[test]
            fn certificate_files_never_panic(text in mutated_text(vec![format!(
                "ssh-ed25519-cert-v01@openssh.com {} node1\n",
                STANDARD.encode(host_cert_blob())
            )])) {
                if let Ok((cert, blob)) = bounded("cert_from_openssh", text.len(), || cert_from_openssh(&text)) {
                    prop_assert_eq!(cert.to_bytes().unwrap(), blob);
                    let kind = cert.algorithm().to_certificate_type();
                    prop_assert_eq!(text.split_ascii_whitespace().next(), Some(kind.as_str()));
                }
            }
        }
    }
}
