//! Boot event logs for tests: a builder of TCG PC Client crypto-agile logs (the format of
//! `/sys/kernel/security/tpm0/binary_bios_measurements`), the PCR values they imply, and
//! their extension into a [`Swtpm`] so that a quote matches the log.
//!
//! Written from the TCG PC Client Platform Firmware Profile (§10), independently of the
//! server's parser (`carapace_attestor_tpm::eventlog`), so that tests of the one check
//! the other: nothing here calls it.
//!
//! [`LogBuilder::typical_uefi`] gives a realistic ~100-record UEFI log in the order
//! edk2-based firmware and shim/grub write it. Where firmware hashes something that is
//! not the event data (firmware volumes, PE images, `Boot####` variables, whose digest
//! covers the variable's contents only), the builder does the same with synthetic
//! contents, so a consumer that re-hashes event data must not expect it to match.

use std::collections::BTreeMap;
use std::process::Command;

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::process::{self, require};
use crate::swtpm::{Swtpm, TPM2_TOOLS_PACKAGE};
use crate::{Error, Result};

/// TPM_ALG_ID of SHA-1.
pub const ALG_SHA1: u16 = 0x0004;
/// TPM_ALG_ID of SHA-256.
pub const ALG_SHA256: u16 = 0x000b;
/// TPM_ALG_ID of SHA-384.
pub const ALG_SHA384: u16 = 0x000c;
/// TPM_ALG_ID of SHA-512.
pub const ALG_SHA512: u16 = 0x000d;

/// The event types the builder writes (TCG PC Client PFP §10.4.1).
pub mod event_type {
    #![allow(missing_docs, reason = "the TCG names say it")]
    pub const EV_POST_CODE: u32 = 0x0000_0001;
    pub const EV_NO_ACTION: u32 = 0x0000_0003;
    pub const EV_SEPARATOR: u32 = 0x0000_0004;
    pub const EV_S_CRTM_VERSION: u32 = 0x0000_0008;
    pub const EV_PLATFORM_CONFIG_FLAGS: u32 = 0x0000_000a;
    pub const EV_IPL: u32 = 0x0000_000d;
    pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
    pub const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
    pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
    pub const EV_EFI_BOOT_SERVICES_DRIVER: u32 = 0x8000_0004;
    pub const EV_EFI_GPT_EVENT: u32 = 0x8000_0006;
    pub const EV_EFI_ACTION: u32 = 0x8000_0007;
    pub const EV_EFI_PLATFORM_FIRMWARE_BLOB2: u32 = 0x8000_000a;
    pub const EV_EFI_HANDOFF_TABLES2: u32 = 0x8000_000b;
    pub const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00e0;
}
use event_type::*;

/// EFI_GLOBAL_VARIABLE (8be4df61-93ca-11d2-aa0d-00e098032b8c), on-disk byte order.
pub const EFI_GLOBAL_VARIABLE: [u8; 16] = [
    0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c,
];
/// EFI_IMAGE_SECURITY_DATABASE_GUID (d719b2cb-3d3a-4596-a3bc-dad00e67656f), on-disk byte
/// order.
pub const EFI_IMAGE_SECURITY_DATABASE: [u8; 16] = [
    0xcb, 0xb2, 0x19, 0xd7, 0x3a, 0x3d, 0x96, 0x45, 0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f,
];
/// EFI_CERT_X509_GUID (a5c059a1-94e4-4aa7-87b5-ab155c2bf072), on-disk byte order.
const EFI_CERT_X509: [u8; 16] = [
    0xa1, 0x59, 0xc0, 0xa5, 0xe4, 0x94, 0xa7, 0x4a, 0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72,
];
/// EFI_CERT_SHA256_GUID (c1c41626-504c-4092-aca9-41f936934328), on-disk byte order.
const EFI_CERT_SHA256: [u8; 16] = [
    0x26, 0x16, 0xc4, 0xc1, 0x4c, 0x50, 0x92, 0x40, 0xac, 0xa9, 0x41, 0xf9, 0x36, 0x93, 0x43, 0x28,
];

/// The digest size of a bank the builder knows.
fn digest_len(alg: u16) -> Option<usize> {
    match alg {
        ALG_SHA1 => Some(20),
        ALG_SHA256 => Some(32),
        ALG_SHA384 => Some(48),
        ALG_SHA512 => Some(64),
        _ => None,
    }
}

/// The hash of `data` with bank `alg`'s algorithm (empty for an unknown bank, which
/// [`LogBuilder::with_banks`] refuses).
pub fn hash(alg: u16, data: &[u8]) -> Vec<u8> {
    match alg {
        ALG_SHA1 => Sha1::digest(data).to_vec(),
        ALG_SHA256 => Sha256::digest(data).to_vec(),
        ALG_SHA384 => Sha384::digest(data).to_vec(),
        ALG_SHA512 => Sha512::digest(data).to_vec(),
        _ => Vec::new(),
    }
}

/// The sha256 digest of a boot application image, as [`LogBuilder::boot_application`]
/// records it in the sha256 bank: what a measured-boot policy lists.
pub fn image_digest(image: &[u8]) -> [u8; 32] {
    Sha256::digest(image).into()
}

/// tpm2-tools' name of a bank.
fn tool_name(alg: u16) -> &'static str {
    match alg {
        ALG_SHA1 => "sha1",
        ALG_SHA256 => "sha256",
        ALG_SHA384 => "sha384",
        _ => "sha512",
    }
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// One TCG_PCR_EVENT2 the builder will write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The PCR.
    pub pcr: u32,
    /// The event type.
    pub event_type: u32,
    /// One digest per bank, in the log's bank order.
    pub digests: Vec<(u16, Vec<u8>)>,
    /// The event data.
    pub data: Vec<u8>,
}

/// A crypto-agile event log under construction. Panics only on misuse by a test (a
/// digest of the wrong size, a bank it does not know), never on data.
#[derive(Debug, Clone)]
pub struct LogBuilder {
    banks: Vec<u16>,
    startup_locality: Option<u8>,
    records: Vec<Record>,
}

impl Default for LogBuilder {
    fn default() -> Self {
        LogBuilder::new()
    }
}

impl LogBuilder {
    /// An empty log with the sha1 and sha256 banks (what most firmware logs).
    pub fn new() -> LogBuilder {
        LogBuilder::with_banks(&[ALG_SHA1, ALG_SHA256])
    }

    /// An empty log with these banks, in this order.
    ///
    /// # Panics
    /// On a bank other than sha1/sha256/sha384/sha512 (a test's mistake).
    pub fn with_banks(banks: &[u16]) -> LogBuilder {
        for &b in banks {
            assert!(digest_len(b).is_some(), "unknown bank {b:#06x}");
        }
        LogBuilder {
            banks: banks.to_vec(),
            startup_locality: None,
            records: Vec::new(),
        }
    }

    /// The banks of the log.
    pub fn banks(&self) -> &[u16] {
        &self.banks
    }

    /// The records so far (without the header and the StartupLocality record), for a
    /// test to compare with what a parser read or to alter before [`LogBuilder::to_bytes`].
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The records, mutable: a test changes one to make a log that no longer replays.
    pub fn records_mut(&mut self) -> &mut Vec<Record> {
        &mut self.records
    }

    /// Writes a `StartupLocality` EV_NO_ACTION record right after the header: PCR 0
    /// then starts at `00…00<locality>`.
    pub fn startup_locality(mut self, locality: u8) -> LogBuilder {
        self.startup_locality = Some(locality);
        self
    }

    /// A record whose digest in each bank is the hash of `data`.
    pub fn event(mut self, pcr: u32, event_type: u32, data: &[u8]) -> LogBuilder {
        let digests = self.banks.iter().map(|&a| (a, hash(a, data))).collect();
        self.records.push(Record {
            pcr,
            event_type,
            digests,
            data: data.to_vec(),
        });
        self
    }

    /// A record with these digests (in this order; any count, so a test can write a
    /// malformed one) and data.
    pub fn event_with_digests(
        mut self,
        pcr: u32,
        event_type: u32,
        digests: &[(u16, &[u8])],
        data: &[u8],
    ) -> LogBuilder {
        self.records.push(Record {
            pcr,
            event_type,
            digests: digests.iter().map(|(a, d)| (*a, d.to_vec())).collect(),
            data: data.to_vec(),
        });
        self
    }

    /// A record whose digest in each bank is the hash of `content` (what firmware
    /// measured) while its data is `data` (what it logged about it).
    fn measured(mut self, pcr: u32, event_type: u32, content: &[u8], data: Vec<u8>) -> LogBuilder {
        let digests = self.banks.iter().map(|&a| (a, hash(a, content))).collect();
        self.records.push(Record {
            pcr,
            event_type,
            digests,
            data,
        });
        self
    }

    /// A UEFI variable record: the data is a UEFI_VARIABLE_DATA (GUID, name length in
    /// UTF-16 units, data length, UTF-16LE name, data), its digests the hash of it all
    /// (as firmware measures the Secure Boot variables).
    pub fn variable(
        self,
        pcr: u32,
        event_type: u32,
        guid: [u8; 16],
        name: &str,
        data: &[u8],
    ) -> LogBuilder {
        let v = variable_data(guid, name, data);
        self.event(pcr, event_type, &v)
    }

    /// A boot application (PCR 4, EV_EFI_BOOT_SERVICES_APPLICATION): the digest in each
    /// bank is that bank's hash of `image`; the data a UEFI_IMAGE_LOAD_EVENT with a
    /// small media file-path device path.
    pub fn boot_application(self, image: &[u8]) -> LogBuilder {
        let n = self.records.len();
        let data = image_load_event(image.len(), &format!("\\EFI\\app{n}.efi"));
        self.measured(4, EV_EFI_BOOT_SERVICES_APPLICATION, image, data)
    }

    /// The sha256 digests of the boot applications (PCR 4,
    /// EV_EFI_BOOT_SERVICES_APPLICATION), in log order: what a measured-boot policy's
    /// `boot_applications` lists. Requires the sha256 bank.
    pub fn boot_application_digests(&self) -> Vec<[u8; 32]> {
        self.records
            .iter()
            .filter(|r| r.pcr == 4 && r.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
            .filter_map(|r| r.digests.iter().find(|(alg, _)| *alg == ALG_SHA256))
            .filter_map(|(_, d)| <[u8; 32]>::try_from(d.as_slice()).ok())
            .collect()
    }

    /// An EV_SEPARATOR (four zero bytes, as UEFI firmware writes it) in each PCR.
    pub fn separators(mut self, pcrs: std::ops::RangeInclusive<u32>) -> LogBuilder {
        for pcr in pcrs {
            self = self.event(pcr, EV_SEPARATOR, &[0; 4]);
        }
        self
    }

    /// An EV_NO_ACTION record in PCR 0 with zero digests (never extended).
    pub fn no_action(mut self, data: &[u8]) -> LogBuilder {
        let digests = self
            .banks
            .iter()
            .map(|&a| (a, vec![0; digest_len(a).unwrap_or(0)]))
            .collect();
        self.records.push(Record {
            pcr: 0,
            event_type: EV_NO_ACTION,
            digests,
            data: data.to_vec(),
        });
        self
    }

    /// The log's bytes: the SHA-1-format header with the Spec ID event, the
    /// StartupLocality record if any, then the records.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut spec = Vec::new();
        spec.extend_from_slice(b"Spec ID Event03\0");
        spec.extend_from_slice(&0u32.to_le_bytes()); // platformClass: client
        spec.extend_from_slice(&[0, 2, 0, 2]); // specVersion 2.0 errata 0, UINTN 64-bit
        spec.extend_from_slice(&(self.banks.len() as u32).to_le_bytes());
        for &alg in &self.banks {
            spec.extend_from_slice(&alg.to_le_bytes());
            spec.extend_from_slice(&(digest_len(alg).unwrap_or(0) as u16).to_le_bytes());
        }
        spec.push(0); // vendorInfoSize
        let mut out = Vec::new();
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        out.extend_from_slice(&[0; 20]);
        out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        out.extend_from_slice(&spec);
        if let Some(locality) = self.startup_locality {
            let mut data = b"StartupLocality\0".to_vec();
            data.push(locality);
            let zeros = LogBuilder::with_banks(&self.banks).no_action(&data);
            write_record(&mut out, &zeros.records[0]);
        }
        for r in &self.records {
            write_record(&mut out, r);
        }
        out
    }

    /// The PCR values the log implies for bank `alg` (computed here, not by the
    /// parser): every PCR a record extends, and PCR 0 when there is a StartupLocality.
    /// Empty for a bank the log does not have.
    pub fn pcrs(&self, alg: u16) -> BTreeMap<u32, Vec<u8>> {
        let mut pcrs = BTreeMap::new();
        let Some(len) = digest_len(alg).filter(|_| self.banks.contains(&alg)) else {
            return pcrs;
        };
        if let Some(locality) = self.startup_locality {
            let mut v = vec![0; len];
            v[len - 1] = locality;
            pcrs.insert(0, v);
        }
        for r in self.records.iter().filter(|r| r.event_type != EV_NO_ACTION) {
            let Some((_, d)) = r.digests.iter().find(|(a, _)| *a == alg) else {
                continue;
            };
            let old = pcrs.entry(r.pcr).or_insert_with(|| vec![0; len]);
            let mut input = old.clone();
            input.extend_from_slice(d);
            *old = hash(alg, &input);
        }
        pcrs
    }

    /// Extends `tpm`'s PCRs with every extended record of the log, on the banks the
    /// log and the TPM share (a TPM made by [`crate::swtpm::TpmManufacturer`] allocates
    /// sha256 only), with `tpm2_pcrextend` (several records per call, in log order).
    /// Refused for a log with a non-zero StartupLocality (a TPM started at locality 0
    /// cannot reproduce its PCR 0) or when no bank is shared.
    pub fn extend(&self, tpm: &Swtpm) -> Result<()> {
        if self.startup_locality.is_some_and(|l| l != 0) {
            return Err(Error::Other(
                "a log with a StartupLocality other than 0 cannot be extended into a swtpm started at locality 0".into(),
            ));
        }
        let allocated = allocated_banks(tpm)?;
        let shared: Vec<u16> = self
            .banks
            .iter()
            .copied()
            .filter(|a| allocated.contains(a))
            .collect();
        if shared.is_empty() {
            return Err(Error::Other(format!(
                "the log's banks {:?} and the TPM's {:?} have nothing in common",
                self.banks, allocated
            )));
        }
        let pcrextend = require("tpm2_pcrextend", TPM2_TOOLS_PACKAGE)?;
        let specs: Vec<String> = self
            .records
            .iter()
            .filter(|r| r.event_type != EV_NO_ACTION)
            .map(|r| {
                let digests: Vec<String> = r
                    .digests
                    .iter()
                    .filter(|(a, _)| shared.contains(a))
                    .map(|(a, d)| format!("{}={}", tool_name(*a), hex::encode(d)))
                    .collect();
                format!("{}:{}", r.pcr, digests.join(","))
            })
            .collect();
        for chunk in specs.chunks(EXTEND_BATCH) {
            let mut cmd = Command::new(&pcrextend);
            cmd.args(chunk).env("TPM2TOOLS_TCTI", tpm.tcti());
            process::run(&mut cmd, None)?;
        }
        Ok(())
    }

    /// A realistic UEFI boot (about 100 records, in firmware order): the CRTM and
    /// firmware volumes in PCR 0, boot variables and tables in PCR 1, option ROM
    /// drivers in PCR 2, the Secure Boot variables (`SecureBoot`, `PK`, `KEK`, `db`,
    /// `dbx`) and their separator in PCR 7, the separators of PCRs 0-6, the GPT in
    /// PCR 5, the `db` certificate that verified shim in PCR 7 (with Secure Boot on),
    /// shim, grub and `kernel` in PCR 4, grub's commands and files in PCRs 8 and 9,
    /// and ExitBootServices in PCR 5. Banks sha1 and sha256; no StartupLocality.
    pub fn typical_uefi(secure_boot: bool, kernel: &[u8]) -> LogBuilder {
        let mut b = LogBuilder::new().event(0, EV_S_CRTM_VERSION, &utf16le("1.00\0"));
        for (i, (name, base, len)) in [
            ("PEIFV", 0x0082_0000u64, 0x0002_0000u64),
            ("DXEFV", 0x0090_0000, 0x00d0_0000),
            ("NVRAM", 0xffc0_0000, 0x0008_0000),
        ]
        .into_iter()
        .enumerate()
        {
            let mut data = vec![name.len() as u8];
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&base.to_le_bytes());
            data.extend_from_slice(&len.to_le_bytes());
            let volume = synthetic(&format!("firmware volume {i}"), 4096);
            b = b.measured(0, EV_EFI_PLATFORM_FIRMWARE_BLOB2, &volume, data);
        }
        b = b.measured(
            0,
            EV_POST_CODE,
            &synthetic("ACPI", 512),
            b"ACPI DATA".to_vec(),
        );

        // PCR 7, first: the Secure Boot configuration.
        let pk = esl_x509(&synthetic("PK certificate", 700), 1);
        let kek = esl_x509(&synthetic("KEK certificate", 900), 2);
        let db_cert = synthetic("db certificate (UEFI CA)", 1100);
        let db = esl_x509(&db_cert, 3);
        let dbx = esl_sha256(&["revoked shim 1", "revoked shim 2", "revoked grub"]);
        b = b
            .variable(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                EFI_GLOBAL_VARIABLE,
                "SecureBoot",
                &[u8::from(secure_boot)],
            )
            .variable(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                EFI_GLOBAL_VARIABLE,
                "PK",
                &pk,
            )
            .variable(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                EFI_GLOBAL_VARIABLE,
                "KEK",
                &kek,
            )
            .variable(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                EFI_IMAGE_SECURITY_DATABASE,
                "db",
                &db,
            )
            .variable(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                EFI_IMAGE_SECURITY_DATABASE,
                "dbx",
                &dbx,
            )
            .separators(7..=7);

        // PCR 1: boot variables (digest over the contents only, as edk2 does), tables.
        let boot0000 = load_option("debian", "\\EFI\\debian\\shimx64.efi");
        let boot0001 = load_option("UEFI Shell", "\\EFI\\BOOT\\BOOTX64.EFI");
        let order: Vec<u8> = [0u16, 1].iter().flat_map(|n| n.to_le_bytes()).collect();
        for (name, value) in [
            ("BootOrder", &order),
            ("Boot0000", &boot0000),
            ("Boot0001", &boot0001),
        ] {
            let data = variable_data(EFI_GLOBAL_VARIABLE, name, value);
            b = b.measured(1, EV_EFI_VARIABLE_BOOT, value, data);
        }
        let mut tables = vec![6u8];
        tables.extend_from_slice(b"SMBIOS");
        tables.extend_from_slice(&1u64.to_le_bytes()); // NumberOfTables
        tables.extend_from_slice(&[0x31; 16]); // VendorGuid (SMBIOS3)
        tables.extend_from_slice(&0x7f8e_0000u64.to_le_bytes());
        b = b
            .measured(1, EV_EFI_HANDOFF_TABLES2, &synthetic("SMBIOS", 300), tables)
            .event(1, EV_PLATFORM_CONFIG_FLAGS, &[0, 0, 0, 0]);

        // PCR 2: option ROM drivers.
        for (i, path) in ["\\NIC.efi", "\\NVMe.efi"].iter().enumerate() {
            let rom = synthetic(&format!("option rom {i}"), 2048);
            let data = image_load_event(rom.len(), path);
            b = b.measured(2, EV_EFI_BOOT_SERVICES_DRIVER, &rom, data);
        }

        // ReadyToBoot: the boot attempt, then the separators of PCRs 0-6.
        b = b
            .event(
                4,
                EV_EFI_ACTION,
                b"Calling EFI Application from Boot Option",
            )
            .separators(0..=6);

        // The GPT of the boot disk.
        let mut gpt = b"EFI PART".to_vec();
        gpt.extend_from_slice(&synthetic("GPT header", 84));
        gpt.extend_from_slice(&2u64.to_le_bytes()); // NumberOfPartitions
        gpt.extend_from_slice(&synthetic("GPT entries", 256));
        b = b.event(5, EV_EFI_GPT_EVENT, &gpt);

        // shim, verified by the db certificate (with Secure Boot on), then grub and the
        // kernel.
        if secure_boot {
            let mut sig = vec![0x55; 16]; // SignatureOwner
            sig.extend_from_slice(&db_cert);
            b = b.variable(
                7,
                EV_EFI_VARIABLE_AUTHORITY,
                EFI_IMAGE_SECURITY_DATABASE,
                "db",
                &sig,
            );
        }
        b = b
            .boot_application(&synthetic("shimx64.efi", 8192))
            .boot_application(&synthetic("grubx64.efi", 8192));

        // grub: its commands in PCR 8, the files it reads in PCR 9.
        let mut commands = vec![
            "grub_cmd: set root=hd0,gpt2".to_owned(),
            "grub_cmd: insmod part_gpt".to_owned(),
            "grub_cmd: insmod ext2".to_owned(),
            "grub_cmd: search --no-floppy --fs-uuid --set=root 0f0e-0d0c".to_owned(),
        ];
        for i in 0..70 {
            commands.push(format!("grub_cmd: set var{i}=value{i}"));
        }
        commands.push("grub_cmd: linux /vmlinuz root=UUID=0f0e-0d0c ro quiet".to_owned());
        commands.push("kernel_cmdline: /vmlinuz root=UUID=0f0e-0d0c ro quiet".to_owned());
        commands.push("grub_cmd: initrd /initrd.img".to_owned());
        for c in &commands {
            let mut data = c.as_bytes().to_vec();
            data.push(0);
            b = b.measured(8, EV_IPL, c.as_bytes(), data);
        }
        b = b
            .measured(
                9,
                EV_IPL,
                &synthetic("grub.cfg", 3000),
                b"/boot/grub/grub.cfg\0".to_vec(),
            )
            .measured(9, EV_IPL, kernel, b"/vmlinuz\0".to_vec())
            .measured(
                9,
                EV_IPL,
                &synthetic("initrd", 4096),
                b"/initrd.img\0".to_vec(),
            )
            .boot_application(kernel)
            .event(5, EV_EFI_ACTION, b"Exit Boot Services Invocation")
            .event(
                5,
                EV_EFI_ACTION,
                b"Exit Boot Services Returned with Success",
            );
        b
    }
}

/// How many records one `tpm2_pcrextend` call extends.
const EXTEND_BATCH: usize = 32;

fn write_record(out: &mut Vec<u8>, r: &Record) {
    out.extend_from_slice(&r.pcr.to_le_bytes());
    out.extend_from_slice(&r.event_type.to_le_bytes());
    out.extend_from_slice(&(r.digests.len() as u32).to_le_bytes());
    for (alg, d) in &r.digests {
        out.extend_from_slice(&alg.to_le_bytes());
        out.extend_from_slice(d);
    }
    out.extend_from_slice(&(r.data.len() as u32).to_le_bytes());
    out.extend_from_slice(&r.data);
}

/// A UEFI_VARIABLE_DATA.
pub fn variable_data(guid: [u8; 16], name: &str, data: &[u8]) -> Vec<u8> {
    let name16 = utf16le(name);
    let mut v = guid.to_vec();
    v.extend_from_slice(&((name16.len() / 2) as u64).to_le_bytes());
    v.extend_from_slice(&(data.len() as u64).to_le_bytes());
    v.extend_from_slice(&name16);
    v.extend_from_slice(data);
    v
}

/// Deterministic filler bytes standing for firmware contents: `len` bytes from
/// SHA-256 in counter mode over `label`.
fn synthetic(label: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u32;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(label.as_bytes());
        h.update(i.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        i += 1;
    }
    out.truncate(len);
    out
}

/// A media file-path device path node for `path`, then the end node.
fn file_path(path: &str) -> Vec<u8> {
    let mut name = utf16le(path);
    name.extend_from_slice(&[0, 0]);
    let mut dp = vec![0x04, 0x04];
    dp.extend_from_slice(&((4 + name.len()) as u16).to_le_bytes());
    dp.extend_from_slice(&name);
    dp.extend_from_slice(&[0x7f, 0xff, 0x04, 0x00]);
    dp
}

/// A UEFI_IMAGE_LOAD_EVENT for an image of `len` bytes loaded from `path`.
fn image_load_event(len: usize, path: &str) -> Vec<u8> {
    let dp = file_path(path);
    let mut v = Vec::new();
    v.extend_from_slice(&0x7e50_0000u64.to_le_bytes()); // ImageLocationInMemory
    v.extend_from_slice(&(len as u64).to_le_bytes()); // ImageLengthInMemory
    v.extend_from_slice(&0u64.to_le_bytes()); // ImageLinkTimeAddress
    v.extend_from_slice(&(dp.len() as u64).to_le_bytes()); // LengthOfDevicePath
    v.extend_from_slice(&dp);
    v
}

/// An EFI_LOAD_OPTION: attributes, device path length, description, device path.
fn load_option(description: &str, path: &str) -> Vec<u8> {
    let dp = file_path(path);
    let mut v = 1u32.to_le_bytes().to_vec(); // LOAD_OPTION_ACTIVE
    v.extend_from_slice(&(dp.len() as u16).to_le_bytes());
    v.extend_from_slice(&utf16le(description));
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&dp);
    v
}

/// An EFI_SIGNATURE_LIST of one X.509 certificate (owner GUID filled with `owner`).
fn esl_x509(cert: &[u8], owner: u8) -> Vec<u8> {
    let size = 16 + cert.len();
    let mut v = EFI_CERT_X509.to_vec();
    v.extend_from_slice(&((28 + size) as u32).to_le_bytes()); // SignatureListSize
    v.extend_from_slice(&0u32.to_le_bytes()); // SignatureHeaderSize
    v.extend_from_slice(&(size as u32).to_le_bytes()); // SignatureSize
    v.extend_from_slice(&[owner; 16]);
    v.extend_from_slice(cert);
    v
}

/// An EFI_SIGNATURE_LIST of SHA-256 hashes of the `labels`' synthetic images.
fn esl_sha256(labels: &[&str]) -> Vec<u8> {
    let mut v = EFI_CERT_SHA256.to_vec();
    v.extend_from_slice(&((28 + labels.len() * 48) as u32).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&48u32.to_le_bytes());
    for l in labels {
        v.extend_from_slice(&[0x77; 16]);
        v.extend_from_slice(&image_digest(&synthetic(l, 1024)));
    }
    v
}

/// The banks `tpm` allocates (`tpm2_getcap pcrs`: those with a non-empty selection).
pub fn allocated_banks(tpm: &Swtpm) -> Result<Vec<u16>> {
    let getcap = require("tpm2_getcap", TPM2_TOOLS_PACKAGE)?;
    let mut cmd = Command::new(getcap);
    cmd.arg("pcrs").env("TPM2TOOLS_TCTI", tpm.tcti());
    let out = process::run(&mut cmd, None)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut banks = Vec::new();
    for line in text.lines() {
        // "  - sha256: [ 0, 1, 2 ]"
        let Some((name, list)) = line.trim().trim_start_matches("- ").split_once(':') else {
            continue;
        };
        let alg = match name.trim() {
            "sha1" => ALG_SHA1,
            "sha256" => ALG_SHA256,
            "sha384" => ALG_SHA384,
            "sha512" => ALG_SHA512,
            _ => continue,
        };
        if list.chars().any(|c| c.is_ascii_digit()) {
            banks.push(alg);
        }
    }
    Ok(banks)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn typical_log_has_about_a_hundred_records_and_its_pcrs() {
        let b = LogBuilder::typical_uefi(true, b"kernel image");
        assert!(
            (90..=130).contains(&b.records().len()),
            "{}",
            b.records().len()
        );
        let pcrs = b.pcrs(ALG_SHA256);
        assert_eq!(
            pcrs.keys().copied().collect::<Vec<_>>(),
            (0..=9).collect::<Vec<_>>()
        );
        assert_eq!(b.pcrs(ALG_SHA384), BTreeMap::new());
        // The kernel's digest is in PCR 4 as a boot application.
        let kernel = image_digest(b"kernel image");
        assert!(b.records().iter().any(|r| r.pcr == 4
            && r.event_type == EV_EFI_BOOT_SERVICES_APPLICATION
            && r.digests.contains(&(ALG_SHA256, kernel.to_vec()))));
    }

    #[test]
    fn pcrs_follow_the_extend_rule() {
        let b = LogBuilder::with_banks(&[ALG_SHA256])
            .startup_locality(3)
            .event(0, EV_POST_CODE, b"a")
            .no_action(b"ignored");
        let mut init = vec![0u8; 32];
        init[31] = 3;
        let mut input = init.clone();
        input.extend_from_slice(&Sha256::digest(b"a"));
        assert_eq!(b.pcrs(ALG_SHA256)[&0], Sha256::digest(&input).to_vec());
        // Header (32 + 33 bytes of Spec ID) + StartupLocality + two records.
        let bytes = b.to_bytes();
        assert_eq!(&bytes[32..48], b"Spec ID Event03\0");
        assert_eq!(bytes.len(), 65 + 3 * (12 + 34 + 4) + 17 + 1 + 7);
    }
}
