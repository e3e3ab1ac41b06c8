//! Cloud instance-identity node attestation: the provider signs a statement about the
//! instance, the agent fetches it from the instance metadata service, and the server
//! verifies it against trust anchors it was configured with.
//!
//! | plugin | evidence | verified with | agent path |
//! |---|---|---|---|
//! | `aws_iid` | instance identity document + its RSA-2048 PKCS#7 signature (IMDSv2) | the region's AWS certificate | `ACCOUNT/REGION/INSTANCE` |
//! | `gcp_iit` | instance identity token, an RS256 JWT (`format=full`) | Google's signing keys (JWKS or certificates) | `PROJECT/INSTANCE` |
//! | `azure_msi` | managed-identity access token, an RS256 JWT with `kid` | the tenant's key set (JWKS) | `TENANT/PRINCIPAL` |
//!
//! What the three share:
//! - **No network at attestation time.** Trust anchors are files named in the server's
//!   configuration (AWS region certificates; JWKS files), or, for the JWT plugins, an
//!   `https://` `keys_url` the server fetches in the background and refreshes
//!   ([`keys`]); an attestation never waits on a fetch. Every metadata URL on the agent
//!   is a setting (defaults are the providers' link-local addresses).
//! - **Trust on first use** ([`tofu`]): the evidence is not bound to a server nonce, so
//!   each instance attests once, recorded in the server's datastore, unless
//!   `allow_reattestation` is set.
//! - **Selectors and the agent path come only from verified evidence**, and each path
//!   segment must be a valid SPIFFE path segment (`path_segment`).

use carapace_core::{Error, Selector};

pub mod aws;
pub mod azure;
pub mod gcp;
pub mod http;
mod https;
pub mod jwt;
pub mod keys;
mod pkcs7;
pub mod tofu;

/// An [`Error::AttestationRejected`] naming the plugin.
pub(crate) fn rejected(plugin: &str, msg: impl std::fmt::Display) -> Error {
    Error::AttestationRejected(format!("{plugin}: {msg}"))
}

/// An [`Error::PluginConfig`] for `node_attestor.<plugin>`.
pub(crate) fn config_err(plugin: &str, reason: impl std::fmt::Display) -> Error {
    Error::PluginConfig {
        plugin: format!("node_attestor.{plugin}"),
        reason: reason.to_string(),
    }
}

/// A selector `<plugin>:<value>` from verified evidence; a value the selector grammar
/// refuses (a control character, say) rejects the attestation.
pub(crate) fn selector(plugin: &str, value: String) -> Result<Selector, Error> {
    Selector::new(plugin, &value).map_err(|e| rejected(plugin, format!("selector {value:?}: {e}")))
}

/// `value` (named `what` in errors) as one SPIFFE ID path segment: 1 to 255 characters
/// of `A-Z a-z 0-9 - . _`, and neither `.` nor `..`. A claim that is not one rejects the
/// attestation rather than being rewritten, so two instances can never map to one ID.
pub(crate) fn path_segment(plugin: &str, what: &str, value: &str) -> Result<String, Error> {
    let ok = !value.is_empty()
        && value.len() <= 255
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(rejected(
            plugin,
            format!("{what} {value:?} is not a valid SPIFFE ID path segment"),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn path_segments_are_checked_not_rewritten() {
        assert_eq!(path_segment("p", "x", "i-0abc.9_Z").unwrap(), "i-0abc.9_Z");
        for bad in ["", ".", "..", "a/b", "a b", "é", &"a".repeat(256)] {
            assert!(path_segment("p", "x", bad).is_err(), "{bad:?}");
        }
    }
}
