#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! The boot event log parser and its replay, against logs written by the lab's
//! independent builder (`hsm_sim::eventlog`), against tpm2-tools' `tpm2_eventlog`, and
//! against a real swtpm whose PCRs were extended with the log's digests; its refusals
//! with their offsets; and a property test over mutated logs.

use std::collections::BTreeMap;
use std::process::Command;

use carapace_attestor_tpm::eventlog::{
    self, ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512, EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE, EventLog, LogError, MAX_EVENTS, MAX_LOG_BYTES, event_type::*,
    parse, parse_variable,
};
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, config, mutated};
use hsm_sim::eventlog::{LogBuilder, image_digest};
use hsm_sim::swtpm::{Swtpm, TpmManufacturer};

const KERNEL: &[u8] = b"\x4d\x5aa linux kernel image, in a test";

/// The logs every comparison runs on: (name, builder).
fn sample_logs() -> Vec<(&'static str, LogBuilder)> {
    vec![
        (
            "typical, secure boot",
            LogBuilder::typical_uefi(true, KERNEL),
        ),
        (
            "typical, no secure boot",
            LogBuilder::typical_uefi(false, KERNEL),
        ),
        (
            "startup locality 3",
            LogBuilder::new()
                .startup_locality(3)
                .event(0, EV_S_CRTM_VERSION, b"1\0")
                .event(0, EV_POST_CODE, b"POST CODE")
                .separators(0..=7),
        ),
        (
            "sha256 only",
            LogBuilder::with_banks(&[ALG_SHA256])
                .event(0, EV_S_CRTM_VERSION, b"1\0")
                .variable(
                    7,
                    EV_EFI_VARIABLE_DRIVER_CONFIG,
                    EFI_GLOBAL_VARIABLE,
                    "SecureBoot",
                    &[1],
                )
                .separators(0..=7)
                .boot_application(KERNEL),
        ),
        (
            "sha1, sha256 and sha384, with other EV_NO_ACTION records",
            LogBuilder::with_banks(&[ALG_SHA1, ALG_SHA256, ALG_SHA384])
                .event(0, EV_S_CRTM_VERSION, b"1\0")
                .no_action(b"SP800-155 Event3\0reference manifest")
                .variable(
                    7,
                    EV_EFI_VARIABLE_DRIVER_CONFIG,
                    EFI_IMAGE_SECURITY_DATABASE,
                    "db",
                    &[0x30; 300],
                )
                .separators(0..=7)
                .boot_application(KERNEL)
                .event(14, EV_IPL, b"MokList\0"),
        ),
        (
            "sha512 and sha256",
            LogBuilder::with_banks(&[ALG_SHA512, ALG_SHA256])
                .event(0, EV_S_CRTM_VERSION, b"1\0")
                .separators(0..=7)
                .event(23, EV_EVENT_TAG, b"application"),
        ),
    ]
}

/// Whether the builder wrote a StartupLocality record (it comes first, before the
/// builder's records; only the "startup locality 3" sample has one).
fn has_locality(b: &LogBuilder) -> bool {
    b.to_bytes().windows(16).any(|w| w == b"StartupLocality\0")
}

#[test]
fn builder_logs_parse_field_by_field_and_replay_like_the_builder() {
    for (name, b) in sample_logs() {
        let bytes = b.to_bytes();
        let log = parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let banks: Vec<u16> = log.banks.iter().map(|b| b.alg).collect();
        assert_eq!(banks, b.banks(), "{name}");
        for bank in &log.banks {
            let want = match bank.alg {
                ALG_SHA1 => 20,
                ALG_SHA256 => 32,
                ALG_SHA384 => 48,
                _ => 64,
            };
            assert_eq!(bank.digest_size, want, "{name}");
        }
        let skip = usize::from(has_locality(&b));
        assert_eq!(log.startup_locality, (skip == 1).then_some(3), "{name}");
        assert_eq!(log.events.len(), b.records().len() + skip, "{name}");
        let mut last_offset = 0;
        for (i, e) in log.events.iter().enumerate() {
            assert_eq!(e.number, i + 1, "{name}");
            assert!(e.offset > last_offset, "{name}: offsets increase");
            last_offset = e.offset;
            if i < skip {
                assert_eq!((e.pcr, e.event_type), (0, EV_NO_ACTION), "{name}");
                continue;
            }
            let r = &b.records()[i - skip];
            assert_eq!((e.pcr, e.event_type), (r.pcr, r.event_type), "{name} {i}");
            let digests: Vec<(u16, Vec<u8>)> = e
                .digests
                .iter()
                .map(|d| (d.alg, d.digest.clone()))
                .collect();
            assert_eq!(digests, r.digests, "{name} {i}");
            assert_eq!(e.data, r.data, "{name} {i}");
        }
        for &alg in b.banks() {
            assert_eq!(
                log.replay(alg).unwrap(),
                b.pcrs(alg),
                "{name}: bank {alg:#x}"
            );
        }
    }
}

#[test]
fn the_typical_log_carries_secure_boot_and_the_kernel() {
    let log = parse(&LogBuilder::typical_uefi(true, KERNEL).to_bytes()).unwrap();
    let pcr7: Vec<_> = log
        .events
        .iter()
        .filter(|e| e.pcr == 7 && e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG)
        .map(|e| parse_variable(&e.data).unwrap())
        .collect();
    let names: Vec<&str> = pcr7.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["SecureBoot", "PK", "KEK", "db", "dbx"]);
    assert_eq!(pcr7[0].guid, EFI_GLOBAL_VARIABLE);
    assert_eq!(pcr7[0].data, [1]);
    assert_eq!(pcr7[3].guid, EFI_IMAGE_SECURITY_DATABASE);
    assert!(pcr7[3].data.len() > 300, "a plausible db");
    let apps: Vec<&[u8]> = log
        .events
        .iter()
        .filter(|e| e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
        .map(|e| e.digest(ALG_SHA256).unwrap())
        .collect();
    assert_eq!(apps.len(), 3, "shim, grub, the kernel");
    assert_eq!(apps[2], image_digest(KERNEL));
    assert!(
        log.events
            .iter()
            .any(|e| e.pcr == 7 && e.event_type == EV_EFI_VARIABLE_AUTHORITY)
    );
    let off = parse(&LogBuilder::typical_uefi(false, KERNEL).to_bytes()).unwrap();
    assert!(
        !off.events
            .iter()
            .any(|e| e.event_type == EV_EFI_VARIABLE_AUTHORITY)
    );
}

/// One event as `tpm2_eventlog` printed it: PCR, type name, (bank, hex digest)s.
type ToolEvent = (u32, String, Vec<(String, String)>);

/// What `tpm2_eventlog` printed: per event (header included) its PCR, type name and
/// digests; and the PCR values per bank.
#[derive(Debug, Default)]
struct ToolView {
    events: Vec<ToolEvent>,
    pcrs: BTreeMap<String, BTreeMap<u32, String>>,
}

/// Runs tpm2_eventlog (tpm2-tools 5.4) on `bytes` and reads its YAML by lines.
fn tpm2_eventlog(bytes: &[u8]) -> ToolView {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.bin");
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("tpm2_eventlog")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("tpm2_eventlog: {e}; install it with: apt-get install -y tpm2-tools")
        });
    assert!(
        out.status.success(),
        "tpm2_eventlog: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut view = ToolView::default();
    let mut in_pcrs = false;
    let mut bank = String::new();
    let mut alg = String::new();
    for line in text.lines() {
        let t = line.trim();
        if line == "pcrs:" {
            in_pcrs = true;
        } else if in_pcrs {
            if let Some(b) = t.strip_suffix(':') {
                bank = b.to_owned();
            } else if let Some((i, v)) = t.split_once(": 0x") {
                view.pcrs
                    .entry(bank.clone())
                    .or_default()
                    .insert(i.trim().parse().unwrap(), v.to_ascii_lowercase());
            }
        } else if t.starts_with("- EventNum:") {
            view.events.push((0, String::new(), Vec::new()));
        } else if let Some(p) = t.strip_prefix("PCRIndex: ") {
            view.events.last_mut().unwrap().0 = p.parse().unwrap();
        } else if let Some(n) = t.strip_prefix("EventType: ") {
            view.events.last_mut().unwrap().1 = n.to_owned();
        } else if let Some(a) = t.strip_prefix("- AlgorithmId: ") {
            alg = a.to_owned();
        } else if let Some(d) = t.strip_prefix("Digest: ") {
            if !alg.is_empty() {
                let d = d.trim_matches('"').to_owned();
                view.events
                    .last_mut()
                    .unwrap()
                    .2
                    .push((std::mem::take(&mut alg), d));
            }
        }
    }
    view
}

fn tool_alg(alg: u16) -> &'static str {
    match alg {
        ALG_SHA1 => "sha1",
        ALG_SHA256 => "sha256",
        ALG_SHA384 => "sha384",
        _ => "sha512",
    }
}

/// The same files through tpm2_eventlog: the event count, each event's PCR, type name
/// and digests, and the PCR values it prints.
///
/// Not compared: the PCR values of logs with EV_NO_ACTION records after the header
/// (StartupLocality, SP800-155): tpm2-tools 5.4 extends their zero digests and ignores
/// the StartupLocality, so its values are wrong there (checked below as exactly that
/// mistake, so that a tool that fixes it shows up here). The event data is not compared
/// either: the tool prints it decoded per type, and the builder test above checks it
/// byte for byte.
#[test]
fn the_parser_agrees_with_tpm2_eventlog() {
    for (name, b) in sample_logs() {
        let bytes = b.to_bytes();
        let log = parse(&bytes).unwrap();
        let tool = tpm2_eventlog(&bytes);
        assert_eq!(
            tool.events.len(),
            log.events.len() + 1,
            "{name}: header + records"
        );
        assert_eq!(tool.events[0].1, "EV_NO_ACTION", "{name}: the header");
        for (e, t) in log.events.iter().zip(&tool.events[1..]) {
            assert_eq!(e.pcr, t.0, "{name}: event {}", e.number);
            assert_eq!(eventlog::type_name(e.event_type).unwrap(), t.1, "{name}");
            let ours: Vec<(String, String)> = e
                .digests
                .iter()
                .map(|d| (tool_alg(d.alg).to_owned(), hex::encode(&d.digest)))
                .collect();
            assert_eq!(ours, t.2, "{name}: event {}", e.number);
        }
        let no_action_after_header = log.events.iter().any(|e| e.event_type == EV_NO_ACTION);
        for bank in &log.banks {
            let ours: BTreeMap<u32, String> = log
                .replay(bank.alg)
                .unwrap()
                .into_iter()
                .map(|(i, v)| (i, hex::encode(v)))
                .collect();
            let theirs = &tool.pcrs[tool_alg(bank.alg)];
            if no_action_after_header {
                assert_ne!(
                    &ours, theirs,
                    "{name}: tpm2-tools 5.4 no longer miscomputes?"
                );
            } else {
                assert_eq!(&ours, theirs, "{name}: bank {}", tool_alg(bank.alg));
            }
        }
    }
}

#[test]
fn a_log_extended_into_a_swtpm_replays_and_a_changed_event_is_refused_naming_its_pcr() {
    let tpm = Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap();
    let b = LogBuilder::typical_uefi(true, KERNEL);
    b.extend(&tpm).unwrap();
    let all: Vec<u8> = (0..=9).collect();
    let quoted = tpm.pcrs_sha256(&all).unwrap();
    let log = parse(&b.to_bytes()).unwrap();
    log.check_replay(ALG_SHA256, &quoted).unwrap();

    // Another kernel in the log than the one the TPM measured.
    let mut changed = b.clone();
    let kernel_record = changed
        .records_mut()
        .iter_mut()
        .rev()
        .find(|r| r.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
        .unwrap();
    for (alg, d) in &mut kernel_record.digests {
        *d = hsm_sim::eventlog::hash(*alg, b"another kernel");
    }
    let changed = parse(&changed.to_bytes()).unwrap();
    let err = changed.check_replay(ALG_SHA256, &quoted).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("the event log does not replay: PCR 4 (sha256) is")
            && msg.contains(&hex::encode(&quoted[&4])),
        "{msg}"
    );

    // A reboot into another log: the same TPM now replays only the new one.
    tpm.power_cycle().unwrap();
    let second = LogBuilder::typical_uefi(false, b"second kernel");
    second.extend(&tpm).unwrap();
    let quoted = tpm.pcrs_sha256(&all).unwrap();
    parse(&second.to_bytes())
        .unwrap()
        .check_replay(ALG_SHA256, &quoted)
        .unwrap();
    let err = log.check_replay(ALG_SHA256, &quoted).unwrap_err();
    // PCRs 0-3 are the same in both boots; the kernel differs.
    assert!(err.to_string().contains("PCR 4 (sha256)"), "{err}");
}

/// A small log: header, two records.
fn small() -> Vec<u8> {
    LogBuilder::new()
        .event(0, EV_S_CRTM_VERSION, b"1\0")
        .event(4, EV_SEPARATOR, &[0; 4])
        .to_bytes()
}

/// The header's length for `n` banks (32 + Spec ID: 29 + 4 per bank).
fn header_len(banks: usize) -> usize {
    32 + 29 + 4 * banks
}

#[test]
fn a_log_cut_anywhere_is_refused_or_a_shorter_log() {
    let bytes = small();
    let full = parse(&bytes).unwrap();
    for cut in 0..bytes.len() {
        match parse(&bytes[..cut]) {
            Ok(log) => {
                // Whole records, then zeros (the first bytes of a PCR 0 record) that
                // read as padding.
                let n = log.events.len();
                assert_eq!(log.events[..], full.events[..n], "cut {cut}");
                let start = full.events.get(n).map_or(bytes.len(), |e| e.offset);
                assert!(cut >= start, "cut {cut}");
                assert!(bytes[start..cut].iter().all(|&b| b == 0), "cut {cut}");
            }
            Err(LogError { offset, reason }) => {
                assert!(offset <= cut, "cut {cut}: offset {offset}");
                assert!(
                    reason.starts_with("truncated: ") || reason.contains("trailing bytes"),
                    "cut {cut}: {reason}"
                );
            }
        }
    }
}

fn refused(bytes: &[u8]) -> LogError {
    parse(bytes).expect_err("refused")
}

#[test]
fn malformed_logs_are_refused_with_the_offset_of_the_field_at_fault() {
    let head = header_len(2);
    // Oversize.
    let e = refused(&vec![0; MAX_LOG_BYTES + 1]);
    assert_eq!(e.offset, MAX_LOG_BYTES);
    assert!(e.reason.contains("more than the 1048576 accepted"), "{e}");

    // A SHA-1 (TCG 1.2) header: EV_S_CRTM_VERSION instead of the Spec ID event.
    let mut b = small();
    b[4] = EV_S_CRTM_VERSION as u8;
    let e = refused(&b);
    assert_eq!(e.offset, 4);
    assert!(e.reason.contains("header eventType"), "{e}");
    // An unknown algorithm in the Spec ID event (SHA3-256, 0x0027).
    let mut b = small();
    b[60..62].copy_from_slice(&0x0027u16.to_le_bytes());
    let e = refused(&b);
    assert_eq!(e.offset, 60);
    assert!(e.reason.contains("algorithmId 0x0027 is unknown"), "{e}");

    // A record with one digest where the Spec ID declares two banks.
    let mut b = LogBuilder::new()
        .event_with_digests(4, EV_EFI_ACTION, &[(ALG_SHA256, &[7; 32])], b"x")
        .to_bytes();
    let e = refused(&b);
    assert_eq!(e.offset, head + 8);
    assert!(e.reason.contains("digests count is 1"), "{e}");
    // A digest of a bank the log does not declare.
    b = LogBuilder::new()
        .event_with_digests(
            4,
            EV_EFI_ACTION,
            &[(ALG_SHA1, &[7; 20]), (ALG_SHA384, &[7; 48])],
            b"x",
        )
        .to_bytes();
    let e = refused(&b);
    assert_eq!(e.offset, head + 12 + 22);
    assert!(e.reason.contains("hashAlg 0x000c"), "{e}");

    // Trailing garbage.
    let mut b = small();
    let end = b.len();
    b.extend_from_slice(b"\0\0\0\0junk");
    let e = refused(&b);
    assert_eq!(e.offset, end, "{e}");
    assert!(e.reason.contains("8 trailing bytes"), "{e}");
    // ... but zero padding is the end of the log.
    let mut b = small();
    b.extend_from_slice(&[0; 64]);
    assert_eq!(parse(&b).unwrap(), parse(&small()).unwrap());

    // Too many records.
    let mut many = LogBuilder::with_banks(&[ALG_SHA256]);
    for _ in 0..MAX_EVENTS {
        many = many.event(8, EV_IPL, b"");
    }
    let bytes = many.to_bytes();
    let e = refused(&bytes);
    let record = 12 + 34 + 4;
    assert_eq!(e.offset, header_len(1) + (MAX_EVENTS - 1) * record);
    assert!(e.reason.contains("more than 4096 records"), "{e}");
}

/// Every accepted log's records lie within the input, carry one digest per bank, and
/// anything after the last record is zeros.
fn check_accepted(input: &[u8], log: &EventLog) {
    let mut end = 0;
    for e in &log.events {
        assert_eq!(e.digests.len(), log.banks.len());
        let digests: usize = e.digests.iter().map(|d| 2 + d.digest.len()).sum();
        end = e.offset + 12 + digests + 4 + e.data.len();
        assert!(end <= input.len());
    }
    if end > 0 {
        assert!(input[end..].iter().all(|&b| b == 0));
    }
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn mutated_logs_never_panic_and_stay_bounded(input in mutated(vec![
        small(),
        LogBuilder::typical_uefi(true, KERNEL).to_bytes(),
        LogBuilder::with_banks(&[ALG_SHA1, ALG_SHA256, ALG_SHA384])
            .startup_locality(3)
            .no_action(b"SP800-155 Event3\0")
            .event(0, EV_POST_CODE, b"x")
            .to_bytes(),
    ])) {
        let started = std::time::Instant::now();
        let parsed = bounded("event log", input.len(), || parse(&input));
        if let Ok(log) = parsed {
            check_accepted(&input, &log);
            for bank in &log.banks {
                let _ = bounded("replay", input.len(), || log.replay(bank.alg));
            }
        }
        prop_assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
