//! The parser: bytes → [`EventLog`](super::EventLog), refusing anything malformed with
//! its offset. Helper-owned: see the module doc of `eventlog`.

use super::{EventLog, LogError, UefiVariable};

/// Parses a crypto-agile log.
pub fn parse(bytes: &[u8]) -> Result<EventLog, LogError> {
    let _ = bytes;
    Err(LogError {
        offset: 0,
        reason: "not implemented".into(),
    })
}

/// Parses a UEFI_VARIABLE_DATA.
pub fn parse_variable(data: &[u8]) -> Result<UefiVariable, String> {
    let _ = data;
    Err("not implemented".into())
}

/// The TCG name of an event type.
pub(super) fn type_name(event_type: u32) -> Option<&'static str> {
    let _ = event_type;
    None
}
