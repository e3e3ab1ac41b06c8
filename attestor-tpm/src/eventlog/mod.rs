//! The TCG PC Client boot event log: what the firmware, the boot loader and the kernel
//! measured into PCRs 0-9 before the OS ran, in the crypto-agile format of
//! `/sys/kernel/security/tpm0/binary_bios_measurements` (TCG PC Client Platform
//! Firmware Profile, §10: a `TCG_PCClientPCREvent` header in the SHA-1 format carrying
//! the `Spec ID Event03`, then `TCG_PCR_EVENT2` records with one digest per bank).
//!
//! - [`parse`]: bytes → [`EventLog`], bounded ([`MAX_LOG_BYTES`], [`MAX_EVENTS`]); a
//!   malformed log is refused with the byte offset and the reason ([`LogError`]).
//! - [`EventLog::replay`]: the PCR values the log implies for one bank (EV_NO_ACTION
//!   records are not extended; a `StartupLocality` record sets PCR 0's initial value).
//! - [`EventLog::check_replay`]: the replay against the quoted PCRs, naming the first
//!   PCR that differs.
//! - [`policy`]: the operator's measured-boot policy over events (boot applications,
//!   Secure Boot, the `PK`/`KEK`/`db`/`dbx` variables) and the selectors the log gives.
//!
//! The log itself is not signed: it is evidence only through the replay, which ties
//! each PCR's sequence of events to the quoted value. Nothing ties the interleaving of
//! events *across* PCRs, and root on the node can extend PCRs 0-15 after boot; the
//! policy's rules are written with both in mind (SECURITY.md).

mod parse;
pub mod policy;
mod replay;

pub use parse::{parse, parse_variable};

/// The largest log a server accepts (a typical UEFI log is 30-70 KiB; large `db`/`dbx`
/// variables make some 200 KiB).
pub const MAX_LOG_BYTES: usize = 1024 * 1024;
/// The most records (header included) a server accepts in one log.
pub const MAX_EVENTS: usize = 4096;
/// The largest event data of one record.
pub const MAX_EVENT_DATA: usize = 256 * 1024;

/// TPM_ALG_ID of SHA-1.
pub const ALG_SHA1: u16 = 0x0004;
/// TPM_ALG_ID of SHA-256.
pub const ALG_SHA256: u16 = 0x000b;
/// TPM_ALG_ID of SHA-384.
pub const ALG_SHA384: u16 = 0x000c;
/// TPM_ALG_ID of SHA-512.
pub const ALG_SHA512: u16 = 0x000d;
/// TPM_ALG_ID of SM3-256.
pub const ALG_SM3_256: u16 = 0x0012;

/// Event types (TCG PC Client PFP §10.4.1) this crate names.
pub mod event_type {
    #![allow(missing_docs, reason = "the TCG names say it")]
    pub const EV_PREBOOT_CERT: u32 = 0x0000_0000;
    pub const EV_POST_CODE: u32 = 0x0000_0001;
    pub const EV_UNUSED: u32 = 0x0000_0002;
    pub const EV_NO_ACTION: u32 = 0x0000_0003;
    pub const EV_SEPARATOR: u32 = 0x0000_0004;
    pub const EV_ACTION: u32 = 0x0000_0005;
    pub const EV_EVENT_TAG: u32 = 0x0000_0006;
    pub const EV_S_CRTM_CONTENTS: u32 = 0x0000_0007;
    pub const EV_S_CRTM_VERSION: u32 = 0x0000_0008;
    pub const EV_CPU_MICROCODE: u32 = 0x0000_0009;
    pub const EV_PLATFORM_CONFIG_FLAGS: u32 = 0x0000_000a;
    pub const EV_TABLE_OF_DEVICES: u32 = 0x0000_000b;
    pub const EV_COMPACT_HASH: u32 = 0x0000_000c;
    pub const EV_IPL: u32 = 0x0000_000d;
    pub const EV_IPL_PARTITION_DATA: u32 = 0x0000_000e;
    pub const EV_NONHOST_CODE: u32 = 0x0000_000f;
    pub const EV_NONHOST_CONFIG: u32 = 0x0000_0010;
    pub const EV_NONHOST_INFO: u32 = 0x0000_0011;
    pub const EV_OMIT_BOOT_DEVICE_EVENTS: u32 = 0x0000_0012;
    pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
    pub const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
    pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
    pub const EV_EFI_BOOT_SERVICES_DRIVER: u32 = 0x8000_0004;
    pub const EV_EFI_RUNTIME_SERVICES_DRIVER: u32 = 0x8000_0005;
    pub const EV_EFI_GPT_EVENT: u32 = 0x8000_0006;
    pub const EV_EFI_ACTION: u32 = 0x8000_0007;
    pub const EV_EFI_PLATFORM_FIRMWARE_BLOB: u32 = 0x8000_0008;
    pub const EV_EFI_HANDOFF_TABLES: u32 = 0x8000_0009;
    pub const EV_EFI_PLATFORM_FIRMWARE_BLOB2: u32 = 0x8000_000a;
    pub const EV_EFI_HANDOFF_TABLES2: u32 = 0x8000_000b;
    pub const EV_EFI_VARIABLE_BOOT2: u32 = 0x8000_000c;
    pub const EV_EFI_HCRTM_EVENT: u32 = 0x8000_0010;
    pub const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00e0;
    pub const EV_EFI_SPDM_FIRMWARE_BLOB: u32 = 0x8000_00e1;
    pub const EV_EFI_SPDM_FIRMWARE_CONFIG: u32 = 0x8000_00e2;
}

/// The TCG name of an event type (`EV_SEPARATOR`), or `None` for a type this crate
/// does not know.
pub fn type_name(event_type: u32) -> Option<&'static str> {
    parse::type_name(event_type)
}

/// A log the parser refused: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogError {
    /// Byte offset in the log of the field at fault.
    pub offset: usize,
    /// What is wrong, for an operator.
    pub reason: String,
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "event log: at byte {}: {}", self.offset, self.reason)
    }
}

impl std::error::Error for LogError {}

/// One bank the log carries (from the Spec ID event): its algorithm and digest size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bank {
    /// TPM_ALG_ID.
    pub alg: u16,
    /// Digest size in bytes, as the Spec ID event declares it.
    pub digest_size: u16,
}

/// One digest of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDigest {
    /// TPM_ALG_ID.
    pub alg: u16,
    /// The digest.
    pub digest: Vec<u8>,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its position in the log: 0 is the header (the Spec ID event), 1 the first
    /// `TCG_PCR_EVENT2`.
    pub number: usize,
    /// Byte offset of the record in the log.
    pub offset: usize,
    /// The PCR it was extended into.
    pub pcr: u32,
    /// Its event type ([`event_type`]).
    pub event_type: u32,
    /// One digest per bank, in the record's order.
    pub digests: Vec<EventDigest>,
    /// The event data.
    pub data: Vec<u8>,
}

impl Event {
    /// The digest for bank `alg`, if the record has one.
    pub fn digest(&self, alg: u16) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|d| d.alg == alg)
            .map(|d| d.digest.as_slice())
    }

    /// `index 12 (EV_EFI_ACTION, PCR 4, sha256 ab12…)`: how refusals name an event.
    pub fn describe(&self, alg: u16) -> String {
        let name = type_name(self.event_type)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("type {:#010x}", self.event_type));
        match self.digest(alg) {
            Some(d) => format!(
                "event {} ({name}, PCR {}, digest {})",
                self.number,
                self.pcr,
                hex::encode(d)
            ),
            None => format!("event {} ({name}, PCR {})", self.number, self.pcr),
        }
    }
}

/// A parsed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    /// The banks the Spec ID event declares; every `TCG_PCR_EVENT2` carries a digest
    /// for each, in this order.
    pub banks: Vec<Bank>,
    /// The locality of TPM2_Startup from a `StartupLocality` EV_NO_ACTION record, when
    /// the log has one: PCR 0 then starts at `00…00<locality>`.
    pub startup_locality: Option<u8>,
    /// The `TCG_PCR_EVENT2` records in log order (the header is not among them).
    pub events: Vec<Event>,
}

/// A UEFI_VARIABLE_DATA (the data of EV_EFI_VARIABLE_* events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiVariable {
    /// VariableName GUID, in its on-disk (mixed-endian) byte order.
    pub guid: [u8; 16],
    /// The variable's name, decoded from UTF-16LE.
    pub name: String,
    /// The variable's contents.
    pub data: Vec<u8>,
}

/// EFI_GLOBAL_VARIABLE (8be4df61-93ca-11d2-aa0d-00e098032b8c) in its on-disk byte order:
/// the vendor GUID of `SecureBoot`, `PK` and `KEK`.
pub const EFI_GLOBAL_VARIABLE: [u8; 16] = [
    0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c,
];
/// EFI_IMAGE_SECURITY_DATABASE_GUID (d719b2cb-3d3a-4596-a3bc-dad00e67656f) in its on-disk
/// byte order: the vendor GUID of `db`, `dbx`, `dbt` and `dbr`.
pub const EFI_IMAGE_SECURITY_DATABASE: [u8; 16] = [
    0xcb, 0xb2, 0x19, 0xd7, 0x3a, 0x3d, 0x96, 0x45, 0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f,
];
