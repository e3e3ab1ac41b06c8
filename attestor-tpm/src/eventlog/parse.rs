//! The parser: bytes → [`EventLog`], refusing anything malformed with the offset of the
//! field at fault.
//!
//! # The format (TCG PC Client Platform Firmware Profile, §10)
//!
//! All integers are little-endian.
//!
//! - **The header**, a `TCG_PCClientPCREvent` in the old SHA-1 format: `pcrIndex` (u32),
//!   `eventType` (u32), `digest` (20 bytes), `eventDataSize` (u32), `event`. Its event is
//!   the `TCG_EfiSpecIDEvent`: `signature` (16 bytes, `"Spec ID Event03\0"`),
//!   `platformClass` (u32), `specVersionMinor`, `specVersionMajor`, `specErrata`,
//!   `uintnSize` (u8 each), `numberOfAlgorithms` (u32), then per algorithm `algorithmId`
//!   (u16) and `digestSize` (u16), then `vendorInfoSize` (u8) and `vendorInfo`.
//! - **Then `TCG_PCR_EVENT2` records**: `pcrIndex` (u32), `eventType` (u32), `digests`
//!   (a TPML_DIGEST_VALUES: `count` (u32), then per digest `hashAlg` (u16) and the digest,
//!   whose size only the Spec ID event gives), `eventSize` (u32), `event`.
//!
//! # What is refused, and why
//!
//! The log comes from the node, which the server does not trust yet: every length is
//! checked against the bytes left before anything is read or allocated by it, and the
//! whole log is bounded ([`MAX_LOG_BYTES`], [`MAX_EVENTS`] records header included,
//! [`MAX_EVENT_DATA`] per record). Every refusal is a [`LogError`] naming the field at
//! fault and its offset.
//!
//! - A header that is not EV_NO_ACTION in PCR 0 with a zero digest and a
//!   `"Spec ID Event03"` event (a SHA-1-only log, TCG 1.2 style, is refused: it cannot be
//!   checked against a SHA-256 quote); a Spec ID event whose declared size differs from
//!   its contents; `specVersionMajor` other than 2; `uintnSize` other than 1 or 2;
//!   `numberOfAlgorithms` 0 or more than 8; an algorithm this crate does not know (SHA-1,
//!   SHA-256, SHA-384, SHA-512, SM3-256), one declared twice, or a digest size other than
//!   the algorithm's.
//! - A record whose digest count differs from the Spec ID's banks (or exceeds 8), whose
//!   digest algorithm is not one of the banks or appears twice: every record carries
//!   exactly one digest per bank, so the replay of each bank sees every event.
//! - A PCR index over 23, except on EV_NO_ACTION records: those are never extended, and
//!   the specification gives them no PCR to check (a `StartupLocality` record, which does
//!   concern PCR 0, must say PCR 0).
//! - A `StartupLocality` record that is not exactly `"StartupLocality\0"` and one byte,
//!   that names a locality over 4, that comes twice, or that comes after an extension of
//!   PCR 0 (it sets PCR 0's *initial* value). Other EV_NO_ACTION records (SP800-155
//!   reference manifests, vendor data) are kept in `events` as they are.
//! - Truncation anywhere, and bytes after the last record (fewer than the 12 bytes a
//!   record starts with: "trailing bytes"; more: refused for whatever is wrong with
//!   the record they would be).
//!
//! # The end of the log
//!
//! The kernel's `binary_bios_measurements` ends exactly at the last record: its reader
//! stops at the first record whose type and event size are zero, which is how it finds
//! the end of a firmware log area padded with zeros. A log copied from the whole area
//! (ACPI `TPM2` table, `LAML` bytes) has that zero padding after the last record. So:
//! when the bytes left where a record would start are **all zero**, they are padding and
//! the log ends there; any other bytes there must form a valid record, or the log is
//! refused ("trailing bytes"). A record in PCR 0 of type 0 with no digests is never
//! valid in a crypto-agile log (the digest count must equal the banks'), so nothing a
//! record could say is lost by this rule.
//!
//! [`MAX_LOG_BYTES`]: super::MAX_LOG_BYTES
//! [`MAX_EVENTS`]: super::MAX_EVENTS
//! [`MAX_EVENT_DATA`]: super::MAX_EVENT_DATA

use super::event_type::*;
use super::{
    ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512, ALG_SM3_256, Bank, Event, EventDigest, EventLog,
    LogError, MAX_EVENT_DATA, MAX_EVENTS, MAX_LOG_BYTES, UefiVariable,
};

/// The Spec ID event's signature.
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
/// The StartupLocality event's signature.
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";
/// The most banks a log may declare (and digests a record may carry).
const MAX_BANKS: u32 = 8;
/// pcrIndex, eventType and the digest count: what any record starts with.
const RECORD_FIXED: usize = 12;
/// The highest PCR index a record may extend.
const MAX_PCR: u32 = 23;

/// The digest size of a TPM_ALG_ID this crate knows.
pub(super) fn digest_size(alg: u16) -> Option<u16> {
    match alg {
        ALG_SHA1 => Some(20),
        ALG_SHA256 | ALG_SM3_256 => Some(32),
        ALG_SHA384 => Some(48),
        ALG_SHA512 => Some(64),
        _ => None,
    }
}

/// A cursor over the log that refuses to read past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn err(&self, offset: usize, reason: impl Into<String>) -> LogError {
        LogError {
            offset,
            reason: reason.into(),
        }
    }

    /// Takes `n` bytes for `field`, or refuses the log as truncated there.
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], LogError> {
        if n > self.remaining() {
            return Err(self.err(
                self.pos,
                format!(
                    "truncated: {field} needs {n} bytes, {} left",
                    self.remaining()
                ),
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self, field: &str) -> Result<u8, LogError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, LogError> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &str) -> Result<u32, LogError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Parses a crypto-agile log (see the module doc for what is refused).
pub fn parse(bytes: &[u8]) -> Result<EventLog, LogError> {
    if bytes.len() > MAX_LOG_BYTES {
        return Err(LogError {
            offset: MAX_LOG_BYTES,
            reason: format!(
                "the log is {} bytes, more than the {MAX_LOG_BYTES} accepted",
                bytes.len()
            ),
        });
    }
    let mut r = Reader { bytes, pos: 0 };
    let banks = header(&mut r)?;
    let mut events = Vec::new();
    let mut startup_locality = None;
    let mut pcr0_extended = false;
    while r.remaining() > 0 {
        let offset = r.pos;
        if bytes[offset..].iter().all(|&b| b == 0) {
            // Zero padding after the last record (module doc).
            break;
        }
        if r.remaining() < RECORD_FIXED {
            return Err(r.err(
                offset,
                format!(
                    "{} trailing bytes after the last record, fewer than a record's {RECORD_FIXED} fixed bytes",
                    r.remaining()
                ),
            ));
        }
        let number = events.len() + 1;
        if number >= MAX_EVENTS {
            return Err(r.err(
                offset,
                format!("more than {MAX_EVENTS} records (header included)"),
            ));
        }
        let event = record(&mut r, &banks, number)?;
        if event.event_type == EV_NO_ACTION {
            if event.data.starts_with(STARTUP_LOCALITY_SIGNATURE) {
                let locality = startup_locality_of(&event)?;
                if startup_locality.is_some() {
                    return Err(r.err(offset, "a second StartupLocality record"));
                }
                if pcr0_extended {
                    return Err(r.err(
                        offset,
                        "a StartupLocality record after an extension of PCR 0 (it sets PCR 0's initial value)",
                    ));
                }
                startup_locality = Some(locality);
            }
        } else if event.pcr == 0 {
            pcr0_extended = true;
        }
        events.push(event);
    }
    Ok(EventLog {
        banks,
        startup_locality,
        events,
    })
}

/// Reads the header and its Spec ID event; returns the banks it declares.
fn header(r: &mut Reader<'_>) -> Result<Vec<Bank>, LogError> {
    let at = r.pos;
    let pcr = r.u32("header pcrIndex")?;
    if pcr != 0 {
        return Err(r.err(at, format!("header pcrIndex is {pcr}, not 0")));
    }
    let at = r.pos;
    let ty = r.u32("header eventType")?;
    if ty != EV_NO_ACTION {
        return Err(r.err(
            at,
            format!("header eventType is {ty:#x}, not EV_NO_ACTION (not a crypto-agile log)"),
        ));
    }
    let at = r.pos;
    if r.take(20, "header digest")?.iter().any(|&b| b != 0) {
        return Err(r.err(at, "header digest is not 20 zero bytes"));
    }
    let at = r.pos;
    let size = r.u32("header eventDataSize")? as usize;
    if size > r.remaining() {
        return Err(r.err(
            at,
            format!(
                "truncated: header eventDataSize is {size}, {} bytes left",
                r.remaining()
            ),
        ));
    }
    let start = r.pos;
    let end = start + size;
    // Read the Spec ID event within its declared size only.
    let mut s = Reader {
        bytes: &r.bytes[..end],
        pos: start,
    };
    let at = s.pos;
    if s.take(16, "Spec ID signature")? != SPEC_ID_SIGNATURE {
        return Err(s.err(
            at,
            "Spec ID signature is not \"Spec ID Event03\" (not a crypto-agile log)",
        ));
    }
    s.u32("Spec ID platformClass")?;
    s.u8("Spec ID specVersionMinor")?;
    let at = s.pos;
    let major = s.u8("Spec ID specVersionMajor")?;
    if major != 2 {
        return Err(s.err(at, format!("Spec ID specVersionMajor is {major}, not 2")));
    }
    s.u8("Spec ID specErrata")?;
    let at = s.pos;
    let uintn = s.u8("Spec ID uintnSize")?;
    if uintn != 1 && uintn != 2 {
        return Err(s.err(at, format!("Spec ID uintnSize is {uintn}, not 1 or 2")));
    }
    let at = s.pos;
    let n = s.u32("Spec ID numberOfAlgorithms")?;
    if n == 0 || n > MAX_BANKS {
        return Err(s.err(
            at,
            format!("Spec ID numberOfAlgorithms is {n}, not 1 to {MAX_BANKS}"),
        ));
    }
    let mut banks: Vec<Bank> = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let at = s.pos;
        let alg = s.u16("Spec ID algorithmId")?;
        let Some(expected) = digest_size(alg) else {
            return Err(s.err(at, format!("Spec ID algorithmId {alg:#06x} is unknown")));
        };
        if banks.iter().any(|b| b.alg == alg) {
            return Err(s.err(
                at,
                format!("Spec ID algorithmId {alg:#06x} is declared twice"),
            ));
        }
        let at = s.pos;
        let digest_size = s.u16("Spec ID digestSize")?;
        if digest_size != expected {
            return Err(s.err(
                at,
                format!(
                    "Spec ID digestSize of algorithm {alg:#06x} is {digest_size}, not {expected}"
                ),
            ));
        }
        banks.push(Bank { alg, digest_size });
    }
    let vendor = s.u8("Spec ID vendorInfoSize")? as usize;
    s.take(vendor, "Spec ID vendorInfo")?;
    if s.pos != end {
        return Err(s.err(
            s.pos,
            format!(
                "header eventDataSize is {size}, but the Spec ID event ends after {} bytes",
                s.pos - start
            ),
        ));
    }
    r.pos = end;
    Ok(banks)
}

/// Reads one TCG_PCR_EVENT2.
fn record(r: &mut Reader<'_>, banks: &[Bank], number: usize) -> Result<Event, LogError> {
    let offset = r.pos;
    let pcr = r.u32("pcrIndex")?;
    let event_type = r.u32("eventType")?;
    if pcr > MAX_PCR && event_type != EV_NO_ACTION {
        return Err(r.err(offset, format!("pcrIndex {pcr} is over {MAX_PCR}")));
    }
    let at = r.pos;
    let count = r.u32("digests count")?;
    if count > MAX_BANKS || count as usize != banks.len() {
        return Err(r.err(
            at,
            format!(
                "digests count is {count}, the Spec ID event declares {} banks",
                banks.len()
            ),
        ));
    }
    let mut digests: Vec<EventDigest> = Vec::with_capacity(banks.len());
    for _ in 0..count {
        let at = r.pos;
        let alg = r.u16("digest hashAlg")?;
        let Some(bank) = banks.iter().find(|b| b.alg == alg) else {
            return Err(r.err(
                at,
                format!("digest hashAlg {alg:#06x} is not a bank of the Spec ID event"),
            ));
        };
        if digests.iter().any(|d| d.alg == alg) {
            return Err(r.err(at, format!("digest hashAlg {alg:#06x} appears twice")));
        }
        let digest = r.take(bank.digest_size as usize, "digest")?.to_vec();
        digests.push(EventDigest { alg, digest });
    }
    let at = r.pos;
    let size = r.u32("eventSize")? as usize;
    if size > MAX_EVENT_DATA {
        return Err(r.err(
            at,
            format!("eventSize is {size}, more than the {MAX_EVENT_DATA} accepted"),
        ));
    }
    let data = r.take(size, "event")?.to_vec();
    Ok(Event {
        number,
        offset,
        pcr,
        event_type,
        digests,
        data,
    })
}

/// The locality of a record whose data starts with the StartupLocality signature.
fn startup_locality_of(event: &Event) -> Result<u8, LogError> {
    // pcrIndex, eventType, count, the digests, eventSize.
    let digests: usize = event.digests.iter().map(|d| 2 + d.digest.len()).sum();
    let data_at = event.offset + 12 + digests + 4;
    if event.pcr != 0 {
        return Err(LogError {
            offset: event.offset,
            reason: format!("StartupLocality record in PCR {}, not 0", event.pcr),
        });
    }
    if event.data.len() != STARTUP_LOCALITY_SIGNATURE.len() + 1 {
        return Err(LogError {
            offset: data_at,
            reason: format!(
                "StartupLocality event is {} bytes, not 17",
                event.data.len()
            ),
        });
    }
    let locality = event.data[16];
    if locality > 4 {
        return Err(LogError {
            offset: data_at + 16,
            reason: format!("StartupLocality is {locality}, not 0 to 4"),
        });
    }
    Ok(locality)
}

/// Parses a UEFI_VARIABLE_DATA: VariableName (GUID, 16 bytes), UnicodeNameLength (u64,
/// in UTF-16 code units), VariableDataLength (u64), UnicodeName (UTF-16LE, no
/// terminator), VariableData. Nothing may follow the data.
pub fn parse_variable(data: &[u8]) -> Result<UefiVariable, String> {
    let mut r = Reader {
        bytes: data,
        pos: 0,
    };
    let why = |e: LogError| format!("UEFI_VARIABLE_DATA: at byte {}: {}", e.offset, e.reason);
    let guid: [u8; 16] = r
        .take(16, "VariableName")
        .map_err(why)?
        .try_into()
        .map_err(|_| "UEFI_VARIABLE_DATA: VariableName is not 16 bytes".to_owned())?;
    let lo = r.take(8, "UnicodeNameLength").map_err(why)?;
    let name_len = u64::from_le_bytes(lo.try_into().unwrap_or([0xff; 8]));
    let lo = r.take(8, "VariableDataLength").map_err(why)?;
    let data_len = u64::from_le_bytes(lo.try_into().unwrap_or([0xff; 8]));
    let left = r.remaining() as u64;
    let name_bytes = name_len
        .checked_mul(2)
        .filter(|&n| n <= left)
        .ok_or_else(|| {
            format!("UEFI_VARIABLE_DATA: UnicodeNameLength is {name_len}, {left} bytes left")
        })?;
    let name_raw = r.take(name_bytes as usize, "UnicodeName").map_err(why)?;
    let left = r.remaining() as u64;
    if data_len != left {
        return Err(format!(
            "UEFI_VARIABLE_DATA: VariableDataLength is {data_len}, {left} bytes left"
        ));
    }
    let units: Vec<u16> = name_raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let name = String::from_utf16(&units)
        .map_err(|_| "UEFI_VARIABLE_DATA: UnicodeName is not valid UTF-16".to_owned())?;
    Ok(UefiVariable {
        guid,
        name,
        data: data[r.pos..].to_vec(),
    })
}

/// The TCG name of an event type.
pub(super) fn type_name(event_type: u32) -> Option<&'static str> {
    Some(match event_type {
        EV_PREBOOT_CERT => "EV_PREBOOT_CERT",
        EV_POST_CODE => "EV_POST_CODE",
        EV_UNUSED => "EV_UNUSED",
        EV_NO_ACTION => "EV_NO_ACTION",
        EV_SEPARATOR => "EV_SEPARATOR",
        EV_ACTION => "EV_ACTION",
        EV_EVENT_TAG => "EV_EVENT_TAG",
        EV_S_CRTM_CONTENTS => "EV_S_CRTM_CONTENTS",
        EV_S_CRTM_VERSION => "EV_S_CRTM_VERSION",
        EV_CPU_MICROCODE => "EV_CPU_MICROCODE",
        EV_PLATFORM_CONFIG_FLAGS => "EV_PLATFORM_CONFIG_FLAGS",
        EV_TABLE_OF_DEVICES => "EV_TABLE_OF_DEVICES",
        EV_COMPACT_HASH => "EV_COMPACT_HASH",
        EV_IPL => "EV_IPL",
        EV_IPL_PARTITION_DATA => "EV_IPL_PARTITION_DATA",
        EV_NONHOST_CODE => "EV_NONHOST_CODE",
        EV_NONHOST_CONFIG => "EV_NONHOST_CONFIG",
        EV_NONHOST_INFO => "EV_NONHOST_INFO",
        EV_OMIT_BOOT_DEVICE_EVENTS => "EV_OMIT_BOOT_DEVICE_EVENTS",
        EV_EFI_VARIABLE_DRIVER_CONFIG => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        EV_EFI_VARIABLE_BOOT => "EV_EFI_VARIABLE_BOOT",
        EV_EFI_BOOT_SERVICES_APPLICATION => "EV_EFI_BOOT_SERVICES_APPLICATION",
        EV_EFI_BOOT_SERVICES_DRIVER => "EV_EFI_BOOT_SERVICES_DRIVER",
        EV_EFI_RUNTIME_SERVICES_DRIVER => "EV_EFI_RUNTIME_SERVICES_DRIVER",
        EV_EFI_GPT_EVENT => "EV_EFI_GPT_EVENT",
        EV_EFI_ACTION => "EV_EFI_ACTION",
        EV_EFI_PLATFORM_FIRMWARE_BLOB => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        EV_EFI_HANDOFF_TABLES => "EV_EFI_HANDOFF_TABLES",
        EV_EFI_PLATFORM_FIRMWARE_BLOB2 => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        EV_EFI_HANDOFF_TABLES2 => "EV_EFI_HANDOFF_TABLES2",
        EV_EFI_VARIABLE_BOOT2 => "EV_EFI_VARIABLE_BOOT2",
        EV_EFI_HCRTM_EVENT => "EV_EFI_HCRTM_EVENT",
        EV_EFI_VARIABLE_AUTHORITY => "EV_EFI_VARIABLE_AUTHORITY",
        EV_EFI_SPDM_FIRMWARE_BLOB => "EV_EFI_SPDM_FIRMWARE_BLOB",
        EV_EFI_SPDM_FIRMWARE_CONFIG => "EV_EFI_SPDM_FIRMWARE_CONFIG",
        _ => return None,
    })
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use sha2::{Digest as _, Sha256};

    /// A Spec ID header declaring `banks` (alg, size).
    pub(in crate::eventlog) fn header(banks: &[(u16, u16)]) -> Vec<u8> {
        let mut spec = Vec::new();
        spec.extend_from_slice(SPEC_ID_SIGNATURE);
        spec.extend_from_slice(&0u32.to_le_bytes()); // platformClass
        spec.extend_from_slice(&[0, 2, 0, 2]); // minor, major, errata, uintnSize
        spec.extend_from_slice(&(banks.len() as u32).to_le_bytes());
        for (alg, size) in banks {
            spec.extend_from_slice(&alg.to_le_bytes());
            spec.extend_from_slice(&size.to_le_bytes());
        }
        spec.push(0); // vendorInfoSize
        let mut v = Vec::new();
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        v.extend_from_slice(&[0; 20]);
        v.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        v.extend_from_slice(&spec);
        v
    }

    /// A TCG_PCR_EVENT2 with these digests.
    pub(in crate::eventlog) fn record(
        pcr: u32,
        ty: u32,
        digests: &[(u16, &[u8])],
        data: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&pcr.to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(&(digests.len() as u32).to_le_bytes());
        for (alg, d) in digests {
            v.extend_from_slice(&alg.to_le_bytes());
            v.extend_from_slice(d);
        }
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    /// A sha256-only record whose digest is the data's hash.
    pub(in crate::eventlog) fn sha256_record(pcr: u32, ty: u32, data: &[u8]) -> Vec<u8> {
        let d = Sha256::digest(data);
        record(pcr, ty, &[(ALG_SHA256, &d)], data)
    }

    fn small_log() -> Vec<u8> {
        let mut v = header(&[(ALG_SHA256, 32)]);
        v.extend(sha256_record(0, EV_S_CRTM_VERSION, b"v1\0"));
        v.extend(sha256_record(7, EV_SEPARATOR, &[0; 4]));
        v
    }

    #[test]
    fn parses_a_small_log_field_by_field() {
        let bytes = small_log();
        let log = parse(&bytes).unwrap();
        assert_eq!(
            log.banks,
            vec![Bank {
                alg: ALG_SHA256,
                digest_size: 32
            }]
        );
        assert_eq!(log.startup_locality, None);
        assert_eq!(log.events.len(), 2);
        let e = &log.events[1];
        assert_eq!((e.number, e.pcr, e.event_type), (2, 7, EV_SEPARATOR));
        assert_eq!(e.data, vec![0; 4]);
        assert_eq!(
            e.digest(ALG_SHA256).unwrap(),
            Sha256::digest([0u8; 4]).as_slice()
        );
        assert_eq!(
            e.offset,
            header(&[(ALG_SHA256, 32)]).len() + 4 + 4 + 4 + 34 + 4 + 3
        );
    }

    #[test]
    fn every_prefix_is_refused_or_a_shorter_log() {
        let bytes = small_log();
        let head = header(&[(ALG_SHA256, 32)]).len();
        let first_end = head + 4 + 4 + 4 + 34 + 4 + 3;
        let full = parse(&bytes).unwrap();
        for cut in 0..bytes.len() {
            match parse(&bytes[..cut]) {
                Ok(log) => {
                    // A shorter log: whole records, then (PCR 0's first bytes) zeros
                    // that read as padding.
                    let end = if cut >= first_end { first_end } else { head };
                    assert!(bytes[end..cut].iter().all(|&b| b == 0), "cut {cut}");
                    assert_eq!(log.events[..], full.events[..log.events.len()]);
                    assert_eq!(log.events.len(), usize::from(end == first_end));
                }
                Err(e) => {
                    assert!(
                        e.reason.starts_with("truncated") || e.reason.contains("trailing bytes"),
                        "cut {cut}: {e}"
                    );
                    assert!(e.offset <= cut, "cut {cut}: {e}");
                }
            }
        }
    }

    #[test]
    fn refusals_name_the_field_and_its_offset() {
        let head = header(&[(ALG_SHA256, 32)]);
        // Oversize.
        let e = parse(&vec![0; MAX_LOG_BYTES + 1]).unwrap_err();
        assert_eq!(e.offset, MAX_LOG_BYTES);
        // Not EV_NO_ACTION.
        let mut b = head.clone();
        b[4] = 1;
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, 4);
        assert!(e.reason.contains("EV_NO_ACTION"), "{e}");
        // Header in PCR 1.
        let mut b = head.clone();
        b[0] = 1;
        assert_eq!(parse(&b).unwrap_err().offset, 0);
        // Bad signature (TCG 1.2 "Spec ID Event00").
        let mut b = head.clone();
        b[32 + 14] = b'0';
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, 32);
        assert!(e.reason.contains("Spec ID signature"), "{e}");
        // numberOfAlgorithms 0 and 9.
        for n in [0u32, 9] {
            let mut b = head.clone();
            b[56..60].copy_from_slice(&n.to_le_bytes());
            let e = parse(&b).unwrap_err();
            assert_eq!(e.offset, 56, "{e}");
            assert!(e.reason.contains("numberOfAlgorithms"), "{e}");
        }
        // Unknown algorithm, wrong size, declared twice.
        let e = parse(&header(&[(0x0027, 32)])).unwrap_err();
        assert_eq!((e.offset, e.reason.contains("unknown")), (60, true), "{e}");
        let e = parse(&header(&[(ALG_SHA256, 20)])).unwrap_err();
        assert_eq!(
            (e.offset, e.reason.contains("digestSize")),
            (62, true),
            "{e}"
        );
        let e = parse(&header(&[(ALG_SHA256, 32), (ALG_SHA256, 32)])).unwrap_err();
        assert_eq!((e.offset, e.reason.contains("twice")), (64, true), "{e}");
        // Header event size larger than the Spec ID event.
        let mut b = head.clone();
        let size = u32::from_le_bytes(b[28..32].try_into().unwrap());
        b[28..32].copy_from_slice(&(size + 1).to_le_bytes());
        b.push(0);
        let e = parse(&b).unwrap_err();
        assert!(e.reason.contains("eventDataSize"), "{e}");
        // Digest count mismatch.
        let mut b = head.clone();
        let d = [1u8; 32];
        b.extend(record(
            4,
            EV_EFI_ACTION,
            &[(ALG_SHA256, &d), (ALG_SHA1, &d[..20])],
            b"x",
        ));
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, head.len() + 8);
        assert!(e.reason.contains("digests count is 2"), "{e}");
        // A digest of an algorithm not among the banks.
        let mut b = head.clone();
        b.extend(record(4, EV_EFI_ACTION, &[(ALG_SHA384, &[1; 32])], b"x"));
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, head.len() + 12);
        assert!(e.reason.contains("hashAlg 0x000c"), "{e}");
        // PCR 24.
        let mut b = head.clone();
        b.extend(sha256_record(24, EV_EFI_ACTION, b"x"));
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, head.len());
        assert!(e.reason.contains("pcrIndex 24"), "{e}");
        // Event size over the bound, declared but not present.
        let mut b = head.clone();
        let mut r = sha256_record(4, EV_EFI_ACTION, b"");
        let n = r.len();
        r[n - 4..].copy_from_slice(&((MAX_EVENT_DATA + 1) as u32).to_le_bytes());
        b.extend(r);
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, b.len() - 4);
        assert!(e.reason.contains("eventSize"), "{e}");
        // Trailing garbage.
        let mut b = small_log();
        let at = b.len();
        b.extend_from_slice(&[0, 0, 1]);
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, at);
        assert!(e.reason.contains("3 trailing bytes"), "{e}");
    }

    #[test]
    fn too_many_events_are_refused_where_the_limit_is_crossed() {
        let mut b = header(&[(ALG_SHA256, 32)]);
        let rec = sha256_record(8, EV_IPL, b"");
        for _ in 0..MAX_EVENTS - 1 {
            b.extend_from_slice(&rec);
        }
        assert_eq!(parse(&b).unwrap().events.len(), MAX_EVENTS - 1);
        let at = b.len();
        b.extend_from_slice(&rec);
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, at);
        assert!(e.reason.contains("more than 4096 records"), "{e}");
    }

    #[test]
    fn zero_padding_ends_the_log() {
        let mut b = small_log();
        b.extend_from_slice(&[0; 100]);
        let log = parse(&b).unwrap();
        assert_eq!(log, parse(&small_log()).unwrap());
    }

    #[test]
    fn no_action_records_are_kept_and_startup_locality_is_read() {
        let mut b = header(&[(ALG_SHA256, 32)]);
        let mut sl = STARTUP_LOCALITY_SIGNATURE.to_vec();
        sl.push(3);
        b.extend(record(0, EV_NO_ACTION, &[(ALG_SHA256, &[0; 32])], &sl));
        b.extend(record(
            0,
            EV_NO_ACTION,
            &[(ALG_SHA256, &[0; 32])],
            b"SP800-155 Event3\0rest",
        ));
        b.extend(sha256_record(0, EV_POST_CODE, b"fw"));
        let log = parse(&b).unwrap();
        assert_eq!(log.startup_locality, Some(3));
        assert_eq!(log.events.len(), 3);
        assert_eq!(log.events[1].data, b"SP800-155 Event3\0rest");

        // After an extension of PCR 0: refused.
        let mut b = header(&[(ALG_SHA256, 32)]);
        b.extend(sha256_record(0, EV_POST_CODE, b"fw"));
        let at = b.len();
        b.extend(record(0, EV_NO_ACTION, &[(ALG_SHA256, &[0; 32])], &sl));
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, at);
        assert!(e.reason.contains("StartupLocality"), "{e}");

        // Locality 5: refused at its byte.
        let mut b = header(&[(ALG_SHA256, 32)]);
        let mut bad = sl.clone();
        bad[16] = 5;
        let at = b.len() + 12 + 34 + 4 + 16;
        b.extend(record(0, EV_NO_ACTION, &[(ALG_SHA256, &[0; 32])], &bad));
        assert_eq!(parse(&b).unwrap_err().offset, at);
    }

    #[test]
    fn no_action_records_may_name_any_pcr_but_startup_locality_only_pcr_0() {
        let mut b = header(&[(ALG_SHA256, 32)]);
        b.extend(record(
            0xffff_ffff,
            EV_NO_ACTION,
            &[(ALG_SHA256, &[0; 32])],
            b"vendor",
        ));
        let log = parse(&b).unwrap();
        assert_eq!(log.events[0].pcr, 0xffff_ffff);

        let mut b = header(&[(ALG_SHA256, 32)]);
        let at = b.len();
        let mut sl = STARTUP_LOCALITY_SIGNATURE.to_vec();
        sl.push(3);
        b.extend(record(1, EV_NO_ACTION, &[(ALG_SHA256, &[0; 32])], &sl));
        let e = parse(&b).unwrap_err();
        assert_eq!(e.offset, at);
        assert!(e.reason.contains("StartupLocality record in PCR 1"), "{e}");
    }

    #[test]
    fn parses_uefi_variable_data_strictly() {
        let mut v = EFI_GLOBAL_VARIABLE_FOR_TEST.to_vec();
        v.extend_from_slice(&10u64.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
        for u in "SecureBoot".encode_utf16() {
            v.extend_from_slice(&u.to_le_bytes());
        }
        v.push(1);
        let var = parse_variable(&v).unwrap();
        assert_eq!(var.guid, EFI_GLOBAL_VARIABLE_FOR_TEST);
        assert_eq!(var.name, "SecureBoot");
        assert_eq!(var.data, vec![1]);
        // Trailing byte, missing byte, huge lengths: refused.
        let mut t = v.clone();
        t.push(0);
        assert!(
            parse_variable(&t)
                .unwrap_err()
                .contains("VariableDataLength")
        );
        assert!(parse_variable(&v[..v.len() - 1]).is_err());
        let mut h = v.clone();
        h[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            parse_variable(&h)
                .unwrap_err()
                .contains("UnicodeNameLength")
        );
        for cut in 0..v.len() {
            assert!(parse_variable(&v[..cut]).is_err());
        }
    }

    const EFI_GLOBAL_VARIABLE_FOR_TEST: [u8; 16] = super::super::EFI_GLOBAL_VARIABLE;

    #[test]
    fn names_every_event_type() {
        use super::super::event_type as t;
        let all = [
            t::EV_PREBOOT_CERT,
            t::EV_POST_CODE,
            t::EV_UNUSED,
            t::EV_NO_ACTION,
            t::EV_SEPARATOR,
            t::EV_ACTION,
            t::EV_EVENT_TAG,
            t::EV_S_CRTM_CONTENTS,
            t::EV_S_CRTM_VERSION,
            t::EV_CPU_MICROCODE,
            t::EV_PLATFORM_CONFIG_FLAGS,
            t::EV_TABLE_OF_DEVICES,
            t::EV_COMPACT_HASH,
            t::EV_IPL,
            t::EV_IPL_PARTITION_DATA,
            t::EV_NONHOST_CODE,
            t::EV_NONHOST_CONFIG,
            t::EV_NONHOST_INFO,
            t::EV_OMIT_BOOT_DEVICE_EVENTS,
            t::EV_EFI_VARIABLE_DRIVER_CONFIG,
            t::EV_EFI_VARIABLE_BOOT,
            t::EV_EFI_BOOT_SERVICES_APPLICATION,
            t::EV_EFI_BOOT_SERVICES_DRIVER,
            t::EV_EFI_RUNTIME_SERVICES_DRIVER,
            t::EV_EFI_GPT_EVENT,
            t::EV_EFI_ACTION,
            t::EV_EFI_PLATFORM_FIRMWARE_BLOB,
            t::EV_EFI_HANDOFF_TABLES,
            t::EV_EFI_PLATFORM_FIRMWARE_BLOB2,
            t::EV_EFI_HANDOFF_TABLES2,
            t::EV_EFI_VARIABLE_BOOT2,
            t::EV_EFI_HCRTM_EVENT,
            t::EV_EFI_VARIABLE_AUTHORITY,
            t::EV_EFI_SPDM_FIRMWARE_BLOB,
            t::EV_EFI_SPDM_FIRMWARE_CONFIG,
        ];
        let names: std::collections::BTreeSet<_> =
            all.iter().map(|&t| type_name(t).unwrap()).collect();
        assert_eq!(names.len(), all.len());
        assert_eq!(type_name(t::EV_EFI_ACTION), Some("EV_EFI_ACTION"));
        assert_eq!(type_name(0x8000_00ff), None);
    }
}
