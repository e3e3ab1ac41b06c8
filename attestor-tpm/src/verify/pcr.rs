//! PCR values: parsing and the golden-value policy.

use std::collections::BTreeMap;

use carapace_core::Error;

use super::{Result, reject};

/// The highest PCR index (a PC client TPM has 24 PCRs).
const MAX_PCR: u8 = 23;

/// Measured-boot policy: for each listed PCR (SHA-256 bank), the values it may have.
/// PCRs not listed are not constrained (but still become selectors when quoted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PcrPolicy {
    /// PCR index → allowed 32-byte values (at least one each).
    pub golden: BTreeMap<u8, Vec<Vec<u8>>>,
}

impl PcrPolicy {
    /// Builds a policy from configuration: PCR index as a decimal string (`"7"`) → list of
    /// allowed values as 64 hex digits (either case; a `0x` prefix, as `tpm2_pcrread`
    /// prints, is accepted). Errors are [`Error::PluginConfig`] for plugin `tpm`, naming
    /// the entry.
    pub fn from_config(entries: &BTreeMap<String, Vec<String>>) -> Result<PcrPolicy> {
        let config = |reason: String| Error::PluginConfig {
            plugin: "tpm".into(),
            reason,
        };
        let mut golden = BTreeMap::new();
        for (key, values) in entries {
            let index = key
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|i| *i <= MAX_PCR)
                .ok_or_else(|| {
                    config(format!(
                        "pcr_policy: {key:?} is not a PCR index (a decimal number 0..=23)"
                    ))
                })?;
            let mut allowed = Vec::new();
            for value in values {
                let digest = parse_hex_digest(value).ok_or_else(|| {
                    config(format!(
                        "pcr_policy: PCR {index}: {value:?} is not a SHA-256 value (64 hex digits)"
                    ))
                })?;
                allowed.push(digest);
            }
            if allowed.is_empty() {
                return Err(config(format!(
                    "pcr_policy: PCR {index} has no allowed values (remove it to leave it unconstrained)"
                )));
            }
            if golden.insert(index, allowed).is_some() {
                return Err(config(format!("pcr_policy: PCR {index} is listed twice")));
            }
        }
        Ok(PcrPolicy { golden })
    }

    /// The PCRs the policy constrains, ascending: they must be in the quote selection.
    pub fn pcrs(&self) -> Vec<u8> {
        self.golden.keys().copied().collect()
    }

    /// Whether the policy constrains nothing.
    pub fn is_empty(&self) -> bool {
        self.golden.is_empty()
    }
}

/// Checks quoted PCR values (from [`verify_quote`](super::verify_quote)) against a policy:
/// every PCR the policy lists must have been quoted and have one of its allowed values.
pub fn check_pcr_policy(policy: &PcrPolicy, values: &BTreeMap<u8, Vec<u8>>) -> Result<()> {
    for (index, allowed) in &policy.golden {
        let Some(value) = values.get(index) else {
            return Err(reject(format!(
                "PCR {index} is required by the PCR policy but was not quoted"
            )));
        };
        if !allowed.iter().any(|a| a == value) {
            return Err(reject(format!(
                "PCR {index} has value {}, not one of the allowed values",
                hex::encode(value)
            )));
        }
    }
    Ok(())
}

/// Decodes the agent's reported PCR values (wire `Response::pcr_values`: index → hex).
/// Each must be 32 bytes (SHA-256 bank).
pub fn parse_pcr_values(values: &BTreeMap<u8, String>) -> Result<BTreeMap<u8, Vec<u8>>> {
    values
        .iter()
        .map(|(index, value)| {
            parse_hex_digest(value)
                .map(|v| (*index, v))
                .ok_or_else(|| reject(format!("PCR {index} value is not 64 hex digits")))
        })
        .collect()
}

/// 64 hex digits (either case, optional `0x`) as 32 bytes; `None` otherwise.
pub fn parse_hex_digest(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    let text = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if text.len() != 64 {
        return None;
    }
    hex::decode(text).ok()
}
