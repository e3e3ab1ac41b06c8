//! Replay: the PCR values a log implies, and their check against a quote.

use std::collections::BTreeMap;

use carapace_core::Error;

use super::{EventLog, LogError};

impl EventLog {
    /// The values the log implies for bank `alg`: PCR index → final value, for every
    /// PCR the log extends (and PCR 0 when a `StartupLocality` record is present).
    /// Refused when the log has no such bank.
    pub fn replay(&self, alg: u16) -> Result<BTreeMap<u32, Vec<u8>>, LogError> {
        let _ = alg;
        Err(LogError {
            offset: 0,
            reason: "not implemented".into(),
        })
    }

    /// Checks the replay of bank `alg` against the quoted values (`quoted`: PCR index →
    /// value, as the quote verified them). Every quoted PCR in 0-7 (the firmware's) and
    /// every other quoted PCR the log extends must equal its replay (a firmware PCR the
    /// log never extends must be at its reset value). The refusal names the first PCR
    /// that differs, with both values.
    pub fn check_replay(&self, alg: u16, quoted: &BTreeMap<u8, Vec<u8>>) -> Result<(), Error> {
        let _ = (alg, quoted);
        Err(Error::AttestationRejected("not implemented".into()))
    }
}
