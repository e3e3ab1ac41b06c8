//! The server half (`[node_attestor.sshpop]`): the agent's host certificate checked
//! against the trusted SSH CAs, then a fresh nonce the agent must sign with the
//! certified host key, bound to the TLS connection.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use ssh_key::{Algorithm, Certificate, Fingerprint, HashAlg, PublicKey, SshSig};

use carapace_core::clock::Clock;
use carapace_core::files::{FileUse, NamedFile};
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationSession, AttestationStep, NodeAttestor,
    PluginContext, TLS_EXPORTER_LEN,
};
use carapace_core::{Error, Selector, SelectorSet};

use crate::wire::{self, Answer, Challenge, Payload};
use crate::{
    NONCE_LEN, PLUGIN_NAME, SSHSIG_HASH, SSHSIG_NAMESPACE, USER_CERT, agent_path, ca_fingerprint,
    cert_from_blob, check_host_key_algorithm, config_err, now, rejected, rfc3339,
    signature_fits_key, signed_message,
};

/// Settings of `[node_attestor.sshpop]` on the server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshServerConfig {
    /// Trusted CA public keys, one authorized_keys line each: `ssh-ed25519 AAAA... ca`,
    /// optionally prefixed by the `cert-authority` option (the only option accepted).
    #[serde(default)]
    pub cert_authorities: Vec<String>,
    /// A file of further such lines (`#` comments and blank lines are skipped); a
    /// relative path is resolved against the data dir of the context given to
    /// [`SshAttestor::new`].
    #[serde(default)]
    pub cert_authorities_path: Option<PathBuf>,
    /// When set, at least one principal of the host certificate must be this DNS
    /// domain or a subdomain of it (compared without regard to ASCII case).
    #[serde(default)]
    pub canonical_domain: Option<String>,
}

impl SshServerConfig {
    /// The files these settings name, for `validate`: `cert_authorities_path`, resolved
    /// against `data_dir` as [`SshAttestor::new`] does.
    pub fn files(&self, data_dir: &std::path::Path) -> Vec<NamedFile> {
        self.cert_authorities_path
            .iter()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| NamedFile::new("cert_authorities_path", data_dir.join(p), FileUse::Read))
            .collect()
    }

    /// Every problem with the settings that can be found without reading files.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.cert_authorities.is_empty() && self.cert_authorities_path.is_none() {
            problems.push(
                "no SSH CA is trusted: set cert_authorities (authorized_keys lines such as \
                 \"cert-authority ssh-ed25519 AAAA... ca\") or cert_authorities_path"
                    .into(),
            );
        }
        for (i, line) in self.cert_authorities.iter().enumerate() {
            if let Err(e) = parse_ca_line(line) {
                problems.push(format!("cert_authorities[{i}]: {e}"));
            }
        }
        if let Some(path) = &self.cert_authorities_path
            && path.as_os_str().is_empty()
        {
            problems.push("cert_authorities_path is empty".into());
        }
        if let Some(domain) = &self.canonical_domain
            && let Err(e) = check_domain(domain)
        {
            problems.push(format!("canonical_domain: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Parses one trusted-CA line: an authorized_keys line whose only accepted option is
/// `cert-authority`, with or without a comment.
fn parse_ca_line(line: &str) -> Result<PublicKey, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("empty: expected an authorized_keys line such as \
                    \"cert-authority ssh-ed25519 AAAA... ca\""
            .into());
    }
    if line.starts_with('@') {
        return Err(
            "this is known_hosts syntax (@cert-authority <hosts> <key>): give the CA \
                    key as an authorized_keys line, \"cert-authority ssh-ed25519 AAAA... ca\""
                .into(),
        );
    }
    let first = line.split_ascii_whitespace().next().unwrap_or_default();
    let key_text = if first.ends_with("-cert-v01@openssh.com") {
        return Err("this is a certificate: give the CA's public key (the ca.pub file)".into());
    } else if Algorithm::new(first).is_ok() {
        line
    } else {
        let (options, rest) = split_options(line)?;
        for option in split_unquoted(options, ',') {
            if !option.eq_ignore_ascii_case("cert-authority") {
                return Err(format!(
                    "option {option:?} is not supported here: only cert-authority may precede \
                     the key (or {first:?} is not a key type)"
                ));
            }
        }
        rest
    };
    let key = PublicKey::from_openssh(key_text)
        .map_err(|e| format!("not an SSH public key line ({e})"))?;
    // ssh-key 0.6.7 reads a fixed-size key without checking its length prefix: insist
    // that the key re-encodes to the text given, so one key has one spelling.
    let given = key_text.split_ascii_whitespace().nth(1);
    let again = key.to_openssh().unwrap_or_default();
    if given.is_none() || again.split_ascii_whitespace().nth(1) != given {
        return Err(
            "not an SSH public key line (its key data is not in canonical SSH \
                    wire encoding: copy the CA's .pub file as ssh-keygen wrote it)"
                .into(),
        );
    }
    match key.algorithm() {
        Algorithm::SkEd25519 | Algorithm::SkEcdsaSha2NistP256 => Ok(key),
        alg => check_host_key_algorithm("the CA key", &alg).map(|()| key),
    }
}

/// Splits an authorized_keys line into its options and the rest, at the first
/// whitespace outside double quotes.
fn split_options(line: &str) -> Result<(&str, &str), String> {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_ascii_whitespace() && !quoted => {
                let rest = line[i..].trim_start();
                if rest.is_empty() {
                    break;
                }
                return Ok((&line[..i], rest));
            }
            _ => {}
        }
    }
    Err("no key after the options (expected \"cert-authority ssh-ed25519 AAAA... ca\")".into())
}

/// Splits at `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The base64 body of a PEM document, without its boundary lines and whitespace.
fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(str::split_ascii_whitespace)
        .collect()
}

/// Checks a DNS domain setting: dot-separated non-empty labels of letters, digits and
/// `-`.
fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() || domain.len() > 253 {
        return Err(format!(
            "{domain:?} is not a DNS domain (1 to 253 characters)"
        ));
    }
    for label in domain.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "{domain:?} is not a DNS domain (labels of letters, digits and '-', no leading, \
                 trailing or double dot)"
            ));
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Inner {
    /// The SHA-256 fingerprints of the trusted CA keys.
    cas: Vec<Fingerprint>,
    /// The canonical domain, in lowercase.
    canonical_domain: Option<String>,
    /// The time certificates are checked at.
    clock: Arc<dyn Clock>,
}

/// What a host certificate that passed every check gives.
#[derive(Debug)]
struct Verified {
    result: AttestationResult,
    key_id: String,
    ca: String,
    principals: Vec<String>,
}

impl Inner {
    /// Every check on the certificate, in an order where each message is about data
    /// already known authentic: CA trust and signature first.
    fn check(&self, cert: &Certificate, now: u64) -> Result<Verified, Error> {
        let ca_fp = cert.signature_key().fingerprint(HashAlg::Sha256);
        if !self.cas.contains(&ca_fp) {
            return Err(rejected(format!(
                "the host certificate is signed by CA {ca_fp}, which is not in cert_authorities"
            )));
        }
        if cert.valid_after() >= cert.valid_before() {
            return Err(rejected(format!(
                "the host certificate's validity window is empty (valid from {} to {})",
                rfc3339(cert.valid_after()),
                rfc3339(cert.valid_before())
            )));
        }
        let sig_alg = cert.signature().algorithm();
        if matches!(sig_alg, Algorithm::Rsa { hash: None }) {
            return Err(rejected(format!(
                "the host certificate is signed by CA {ca_fp} with SHA-1 (ssh-rsa), which sshpop \
                 refuses: re-sign it with ssh-keygen -t rsa-sha2-512 -s ca_key ..."
            )));
        }
        if !signature_fits_key(&cert.signature_key().algorithm(), &sig_alg) {
            return Err(rejected(format!(
                "the CA signature on the host certificate does not verify: a {} signature cannot \
                 come from CA {ca_fp}, a {} key",
                sig_alg.as_str(),
                cert.signature_key().algorithm().as_str()
            )));
        }
        // At valid_after the window holds, so a failure here is the signature.
        cert.validate_at(cert.valid_after(), [&ca_fp])
            .map_err(|_| {
                rejected(format!(
                    "the CA signature on the host certificate does not verify with CA {ca_fp}: the \
                 certificate was altered or forged"
                ))
            })?;
        if !cert.cert_type().is_host() {
            return Err(rejected(USER_CERT));
        }
        if now < cert.valid_after() {
            return Err(rejected(format!(
                "the host certificate is not valid before {} (it is now {})",
                rfc3339(cert.valid_after()),
                rfc3339(now)
            )));
        }
        if now >= cert.valid_before() {
            return Err(rejected(format!(
                "the host certificate expired at {} (it is now {})",
                rfc3339(cert.valid_before()),
                rfc3339(now)
            )));
        }
        check_host_key_algorithm("the host key", &cert.public_key().algorithm())
            .map_err(rejected)?;
        let principals = cert.valid_principals();
        if principals.is_empty() {
            return Err(rejected(
                "the host certificate names no principals, which OpenSSH reads as valid for any \
                 host: sign it with -n <host names>",
            ));
        }
        for p in principals {
            if p.is_empty() || p.chars().any(char::is_control) {
                return Err(rejected(format!(
                    "the host certificate has principal {p:?}: principals must be non-empty and \
                     free of control characters"
                )));
            }
        }
        if !cert.critical_options().is_empty() {
            let names: Vec<&str> = cert.critical_options().keys().map(String::as_str).collect();
            return Err(rejected(format!(
                "the host certificate has critical option(s) {names:?}: OpenSSH defines none for \
                 host certificates, and sshpop refuses options it cannot honour"
            )));
        }
        if cert.key_id().chars().any(char::is_control) {
            return Err(rejected(format!(
                "the host certificate's key id {:?} contains control characters",
                cert.key_id()
            )));
        }
        if let Some(domain) = &self.canonical_domain {
            let suffix = format!(".{domain}");
            let fits = principals.iter().any(|p| {
                let p = p.to_ascii_lowercase();
                p == *domain || p.ends_with(&suffix)
            });
            if !fits {
                return Err(rejected(format!(
                    "no principal of the host certificate ({}) is in canonical_domain {domain}",
                    principals.join(", ")
                )));
            }
        }

        let ca = ca_fingerprint(cert.signature_key());
        let selector = |value: String| {
            Selector::new(PLUGIN_NAME, &value)
                .map_err(|e| rejected(format!("selector {value:?}: {e}")))
        };
        let mut selectors = SelectorSet::new();
        for p in principals {
            selectors.insert(selector(format!("principal:{p}"))?);
        }
        if !cert.key_id().is_empty() {
            selectors.insert(selector(format!("key_id:{}", cert.key_id()))?);
        }
        selectors.insert(selector(format!("ca_fingerprint:{ca}"))?);
        Ok(Verified {
            result: AttestationResult {
                agent_path: agent_path(cert.public_key()),
                selectors,
                can_reattest: true,
            },
            key_id: cert.key_id().to_owned(),
            ca,
            principals: principals.to_vec(),
        })
    }
}

/// The server half of `sshpop` node attestation.
#[derive(Debug, Clone)]
pub struct SshAttestor {
    inner: Arc<Inner>,
}

impl SshAttestor {
    /// Checks the settings and loads the trusted CA keys; a relative
    /// `cert_authorities_path` is resolved against the context's data dir. Certificates
    /// are checked at the context's clock.
    pub fn new(cfg: &SshServerConfig, ctx: &PluginContext) -> Result<Self, Error> {
        cfg.validate().map_err(|p| config_err(p.join("; ")))?;
        let mut keys = Vec::new();
        for (i, line) in cfg.cert_authorities.iter().enumerate() {
            keys.push(
                parse_ca_line(line)
                    .map_err(|e| config_err(format!("cert_authorities[{i}]: {e}")))?,
            );
        }
        if let Some(path) = &cfg.cert_authorities_path {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                ctx.data_dir.join(path)
            };
            let text = std::fs::read_to_string(&path).map_err(|e| {
                config_err(format!("cert_authorities_path {}: {e}", path.display()))
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                keys.push(parse_ca_line(line).map_err(|e| {
                    config_err(format!(
                        "cert_authorities_path {}, line {}: {e}",
                        path.display(),
                        n + 1
                    ))
                })?);
            }
            if keys.is_empty() {
                return Err(config_err(format!(
                    "no SSH CA is trusted: cert_authorities is empty and cert_authorities_path {} \
                     lists no key",
                    path.display()
                )));
            }
        }
        let mut cas: Vec<Fingerprint> = Vec::new();
        for key in &keys {
            let fp = key.fingerprint(HashAlg::Sha256);
            if !cas.contains(&fp) {
                cas.push(fp);
            }
        }
        let canonical_domain = cfg
            .canonical_domain
            .as_ref()
            .map(|d| d.to_ascii_lowercase());
        tracing::info!(
            cert_authorities = ?cas.iter().map(ToString::to_string).collect::<Vec<_>>(),
            canonical_domain = canonical_domain.as_deref().unwrap_or(""),
            "sshpop node attestation ready"
        );
        Ok(SshAttestor {
            inner: Arc::new(Inner {
                cas,
                canonical_domain,
                clock: ctx.clock.clone(),
            }),
        })
    }
}

#[async_trait::async_trait]
impl NodeAttestor for SshAttestor {
    fn name(&self) -> &str {
        PLUGIN_NAME
    }

    async fn begin(
        &self,
        payload: &[u8],
        ctx: &AttestationContext,
    ) -> Result<AttestationStep, Error> {
        let p: Payload = wire::decode("payload", payload)?;
        wire::check_version("payload", p.version)?;
        // Checked now rather than after the agent's work.
        if ctx.tls_exporter.len() != TLS_EXPORTER_LEN {
            return Err(rejected(format!(
                "the TLS exporter is {} bytes, not {TLS_EXPORTER_LEN}",
                ctx.tls_exporter.len()
            )));
        }
        let blob = wire::unb64("certificate", &p.certificate)?;
        let cert = cert_from_blob(&blob).map_err(rejected)?;
        let verified = self.inner.check(&cert, now(self.inner.clock.as_ref()))?;
        let server_nonce: [u8; NONCE_LEN] = rand::random();
        let challenge = wire::encode(&Challenge {
            version: wire::VERSION,
            nonce: wire::b64(&server_nonce),
        })?;
        Ok(AttestationStep::Challenge {
            challenge,
            session: Box::new(Session {
                server_nonce,
                tls_exporter: ctx.tls_exporter.clone(),
                host_key: PublicKey::new(cert.public_key().clone(), ""),
                verified,
            }),
        })
    }
}

/// Waiting for the host key's signature over this session's nonce.
struct Session {
    server_nonce: [u8; NONCE_LEN],
    /// Keying material of the connection: never logged.
    tls_exporter: Vec<u8>,
    host_key: PublicKey,
    verified: Verified,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("sshpop::Session")
            .field("agent_path", &self.verified.result.agent_path)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl AttestationSession for Session {
    async fn respond(self: Box<Self>, response: &[u8]) -> Result<AttestationStep, Error> {
        let a: Answer = wire::decode("answer", response)?;
        wire::check_version("answer", a.version)?;
        let agent_nonce = wire::nonce("the agent nonce", &a.nonce)?;
        let Session {
            server_nonce,
            tls_exporter,
            host_key,
            verified,
        } = *self;
        let sig = SshSig::from_pem(a.signature.as_bytes()).map_err(|e| {
            rejected(format!(
                "the proof signature does not verify: it is not an SSH signature ({e})"
            ))
        })?;
        // As for certificates: ssh-key reads the embedded key under any length prefix,
        // so insist on the one encoding of what was decoded.
        let again = sig.to_pem(ssh_key::LineEnding::LF).unwrap_or_default();
        if pem_body(&again) != pem_body(&a.signature) {
            return Err(rejected(
                "the proof signature is not in canonical SSHSIG encoding (it does not re-encode \
                 to the same bytes)",
            ));
        }
        if sig.namespace() != SSHSIG_NAMESPACE {
            return Err(rejected(format!(
                "the proof signature does not verify: it is for namespace {:?}, not {SSHSIG_NAMESPACE:?}",
                sig.namespace()
            )));
        }
        if sig.hash_alg() != SSHSIG_HASH {
            return Err(rejected(format!(
                "the proof signature does not verify: it hashes with {}, not {}",
                sig.hash_alg().as_str(),
                SSHSIG_HASH.as_str()
            )));
        }
        if sig.public_key() != host_key.key_data() {
            return Err(rejected(format!(
                "the proof signature does not verify: it is made by key {}, not by the host \
                 certificate's key {}",
                sig.public_key().fingerprint(HashAlg::Sha256),
                host_key.fingerprint(HashAlg::Sha256)
            )));
        }
        if !signature_fits_key(&host_key.algorithm(), &sig.algorithm()) {
            return Err(rejected(format!(
                "the proof signature does not verify: a {} signature cannot come from a {} key",
                sig.algorithm().as_str(),
                host_key.algorithm().as_str()
            )));
        }
        let msg = signed_message(&server_nonce, &agent_nonce, &tls_exporter)?;
        host_key.verify(SSHSIG_NAMESPACE, &msg, &sig).map_err(|_| {
            rejected(
                "the proof signature does not verify: it was not made by the host key over \
                     this challenge on this TLS connection (replayed, relayed or forged)",
            )
        })?;
        tracing::info!(
            agent_path = %verified.result.agent_path,
            key_id = %verified.key_id,
            ca_fingerprint = %verified.ca,
            principals = ?verified.principals,
            "sshpop: host certificate and proof of the host key verified"
        );
        Ok(AttestationStep::Done(verified.result))
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

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti";

    #[test]
    fn ca_lines_with_and_without_the_cert_authority_option_and_comments_parse() {
        let plain = parse_ca_line(KEY).unwrap();
        for line in [
            format!("{KEY} my ca"),
            format!("cert-authority {KEY}"),
            format!("cert-authority {KEY} ca with spaces in its comment"),
            format!("  CERT-AUTHORITY {KEY}  "),
        ] {
            assert_eq!(
                parse_ca_line(&line).unwrap().key_data(),
                plain.key_data(),
                "{line}"
            );
        }
    }

    #[test]
    fn ca_lines_with_other_options_or_known_hosts_syntax_are_refused() {
        let e = parse_ca_line(&format!("cert-authority,principals=\"a b\" {KEY}")).unwrap_err();
        assert!(e.contains("principals=\\\"a b\\\""), "{e}");
        let e = parse_ca_line(&format!("@cert-authority *.example.com {KEY}")).unwrap_err();
        assert!(e.contains("known_hosts"), "{e}");
        let e = parse_ca_line("cert-authority").unwrap_err();
        assert!(e.contains("no key after the options"), "{e}");
        let e = parse_ca_line("ssh-ed25519 not-base64!").unwrap_err();
        assert!(e.contains("not an SSH public key"), "{e}");
    }

    /// Found by `properties::ca_lines_never_panic`: a key whose length prefix was
    /// altered (`AAAA` → `AA/A` in the base64) was read as the same key.
    #[test]
    fn a_ca_key_with_an_altered_length_prefix_is_refused() {
        let altered = KEY.replacen("NTE5AAAAI", "NTE5AA/AI", 1);
        assert_ne!(altered, KEY);
        let e = parse_ca_line(&altered).unwrap_err();
        assert!(e.contains("canonical SSH wire encoding"), "{e}");
        assert!(parse_ca_line(KEY).is_ok());
    }

    #[test]
    fn domains_are_checked() {
        assert!(check_domain("example.com").is_ok());
        assert!(check_domain("EXAMPLE.com").is_ok());
        for bad in ["", ".example.com", "example.com.", "a..b", "a b", "a/b"] {
            assert!(check_domain(bad).is_err(), "{bad:?}");
        }
    }

    mod properties {
        use super::*;
        use carapace_fuzzkit::proptest::prelude::*;
        use carapace_fuzzkit::{bounded, config, mutated_text};

        proptest! {
            #![proptest_config(config(1000))]

            /// Trusted-CA lines (from the config or `cert_authorities_path`): never a
            /// panic; an accepted line is the CA key it names, with the options and
            /// comment it may carry.
            #[test]
            fn ca_lines_never_panic(line in mutated_text(vec![
                format!("cert-authority {KEY} my ca"),
                format!("cert-authority,\"quoted, option\" {KEY}"),
                KEY.to_owned(),
            ])) {
                if let Ok(key) = bounded("CA line", line.len(), || parse_ca_line(&line)) {
                    let text = key.to_openssh().unwrap();
                    let body = text.split_ascii_whitespace().nth(1).unwrap();
                    prop_assert!(line.contains(body), "{:?} does not name {}", line, body);
                }
                let _ = check_domain(&line);
            }
        }
    }
}
