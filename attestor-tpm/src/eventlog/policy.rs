//! The measured-boot policy over events (`[node_attestor.tpm.measured_boot]`), and the
//! selectors a log gives.
//!
//! A golden PCR value names one exact boot: every firmware or kernel update changes it.
//! This policy is written over the *events* behind the values instead, each allowed value
//! a set, so an operator approves the next kernel before rolling it out:
//!
//! | key | polices | rule |
//! |---|---|---|
//! | `secure_boot = true` | PCR 7 | the `SecureBoot` variable was measured as 1 |
//! | `boot_applications` | PCR 4 | every `EV_EFI_BOOT_SERVICES_APPLICATION` digest is in the set |
//! | `pk`, `kek`, `db`, `dbx` | PCR 7 | that variable's `EV_EFI_VARIABLE_DRIVER_CONFIG` digest is in the set |
//!
//! Digests are the sha256 bank's, as `tpm2_eventlog` prints them. A PCR is *policed* when
//! a key covering it is set; the policy then fails closed on it:
//!
//! - every event in a policed PCR must be of a type the rule knows (PCR 4:
//!   `EV_EFI_BOOT_SERVICES_APPLICATION`, `EV_EFI_ACTION`, `EV_SEPARATOR`; PCR 7:
//!   `EV_EFI_VARIABLE_DRIVER_CONFIG`, `EV_EFI_VARIABLE_AUTHORITY`, `EV_SEPARATOR`);
//!   anything else is refused, naming it (`EV_EFI_ACTION "UEFI Debug Mode"` in PCR 7
//!   among them: firmware in debug mode);
//! - an event whose digest is the hash of its data by definition (separators, actions,
//!   variables) must have that digest, so the data the rule reads is the data that was
//!   measured;
//! - a separator must carry 0 (a firmware error is measured as 1);
//! - in PCR 7, each Secure Boot variable is measured once, before the separator; a
//!   variable measured again, or after the separator, is refused. Root on a running node
//!   can extend PCR 7 and append a record to the log (the replay still holds), but
//!   cannot remove what the firmware measured first: taking the first and refusing
//!   repeats is what makes `SecureBoot = 1` mean Secure Boot was on;
//! - PCR 4 must measure at least one boot application, and every one must be approved.
//!   Root can append an approved digest after the real kernel; it cannot hide an
//!   unapproved one.
//!
//! Without a `measured_boot` section only the replay is checked (when the agent sends a
//! log). With one, the agent must send a log, and PCRs 4 and 7 must be quoted when
//! policed (`validate` says so).
//!
//! Selectors (type `tpm`), from any log that replayed, and only from PCRs the quote
//! covered (the replay vouches for no other):
//! - `secure_boot:on` / `secure_boot:off`: from the `SecureBoot` variable event of PCR 7
//!   when there is exactly one and its digest is its data's (none otherwise);
//! - `boot_app:sha256:<hex>`: one per `EV_EFI_BOOT_SERVICES_APPLICATION` in PCR 4.
//!
//! Limit: a boot application selector says the digest was measured in PCR 4, not that it
//! was the last one: root on the node can append the digest of another *approved*
//! application. Entries that must tell two approved kernels apart need a policy that
//! approves only one (SECURITY.md).

use std::collections::BTreeSet;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use carapace_core::{Error, Selector};

use super::event_type::{
    EV_EFI_ACTION, EV_EFI_BOOT_SERVICES_APPLICATION, EV_EFI_VARIABLE_AUTHORITY,
    EV_EFI_VARIABLE_DRIVER_CONFIG, EV_NO_ACTION, EV_SEPARATOR,
};
use super::{
    ALG_SHA256, EFI_GLOBAL_VARIABLE, EFI_IMAGE_SECURITY_DATABASE, Event, EventLog, parse_variable,
};
use crate::verify::{SELECTOR_TYPE, parse_hex_digest};

/// The PCR boot applications are measured into.
pub const PCR_BOOT_APPLICATIONS: u8 = 4;
/// The PCR the Secure Boot policy is measured into.
pub const PCR_SECURE_BOOT: u8 = 7;

/// Settings of `[node_attestor.tpm.measured_boot]` on the server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasuredBootConfig {
    /// Refuse nodes that did not boot with Secure Boot on.
    #[serde(default)]
    pub secure_boot: bool,
    /// Allowed sha256 digests of boot applications (shim, boot loader, kernel).
    pub boot_applications: Option<Vec<String>>,
    /// Allowed sha256 event digests of the `PK` variable.
    pub pk: Option<Vec<String>>,
    /// Allowed sha256 event digests of the `KEK` variable.
    pub kek: Option<Vec<String>>,
    /// Allowed sha256 event digests of the `db` variable.
    pub db: Option<Vec<String>>,
    /// Allowed sha256 event digests of the `dbx` variable.
    pub dbx: Option<Vec<String>>,
}

/// One set of allowed digests, parsed.
type Allowed = BTreeSet<[u8; 32]>;

/// A Secure Boot variable the policy knows: its name, its vendor GUID.
struct Variable {
    name: &'static str,
    guid: [u8; 16],
}

/// The variables that may be measured in PCR 7 before the separator (PFP §3.3.4.8 and
/// the UEFI spec's authenticated variables). Any other name there is refused.
const PCR7_VARIABLES: [Variable; 9] = [
    Variable {
        name: "SecureBoot",
        guid: EFI_GLOBAL_VARIABLE,
    },
    Variable {
        name: "PK",
        guid: EFI_GLOBAL_VARIABLE,
    },
    Variable {
        name: "KEK",
        guid: EFI_GLOBAL_VARIABLE,
    },
    Variable {
        name: "db",
        guid: EFI_IMAGE_SECURITY_DATABASE,
    },
    Variable {
        name: "dbx",
        guid: EFI_IMAGE_SECURITY_DATABASE,
    },
    Variable {
        name: "dbt",
        guid: EFI_IMAGE_SECURITY_DATABASE,
    },
    Variable {
        name: "dbr",
        guid: EFI_IMAGE_SECURITY_DATABASE,
    },
    Variable {
        name: "DeployedMode",
        guid: EFI_GLOBAL_VARIABLE,
    },
    Variable {
        name: "AuditMode",
        guid: EFI_GLOBAL_VARIABLE,
    },
];

/// The parsed policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeasuredBootPolicy {
    secure_boot: bool,
    boot_applications: Option<Allowed>,
    /// `(variable name, allowed digests)` for PK, KEK, db, dbx as configured.
    variables: Vec<(&'static str, Allowed)>,
}

fn config_err(reason: String) -> Error {
    Error::PluginConfig {
        plugin: "node_attestor.tpm".into(),
        reason: format!("measured_boot: {reason}"),
    }
}

fn allowed(key: &str, values: &[String]) -> Result<Allowed, Error> {
    if values.is_empty() {
        return Err(config_err(format!(
            "{key} is empty: nothing could boot (remove the key to leave it unpoliced)"
        )));
    }
    values
        .iter()
        .map(|v| {
            parse_hex_digest(v)
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| {
                    config_err(format!(
                        "{key}: {v:?} is not a sha256 digest (64 hex digits)"
                    ))
                })
        })
        .collect()
}

impl MeasuredBootPolicy {
    /// Parses the settings; errors name the key and the value at fault.
    pub fn from_config(cfg: &MeasuredBootConfig) -> Result<Self, Error> {
        let boot_applications = cfg
            .boot_applications
            .as_deref()
            .map(|v| allowed("boot_applications", v))
            .transpose()?;
        let mut variables = Vec::new();
        for (name, values) in [
            ("PK", &cfg.pk),
            ("KEK", &cfg.kek),
            ("db", &cfg.db),
            ("dbx", &cfg.dbx),
        ] {
            if let Some(values) = values {
                variables.push((name, allowed(&name.to_ascii_lowercase(), values)?));
            }
        }
        Ok(MeasuredBootPolicy {
            secure_boot: cfg.secure_boot,
            boot_applications,
            variables,
        })
    }

    /// The PCRs this policy polices, ascending: they must be quoted.
    pub fn pcrs(&self) -> Vec<u8> {
        let mut pcrs = Vec::new();
        if self.boot_applications.is_some() {
            pcrs.push(PCR_BOOT_APPLICATIONS);
        }
        if self.secure_boot || !self.variables.is_empty() {
            pcrs.push(PCR_SECURE_BOOT);
        }
        pcrs
    }

    /// Checks a log that replayed against the quote. The refusal names the event
    /// (number, type, PCR, digest) and the rule.
    pub fn check(&self, log: &EventLog) -> Result<(), Error> {
        if let Some(apps) = &self.boot_applications {
            check_pcr4(log, apps)?;
        }
        if self.secure_boot || !self.variables.is_empty() {
            let pcr7 = read_pcr7(log)?;
            if self.secure_boot {
                match pcr7.secure_boot {
                    Some(true) => {}
                    Some(false) => {
                        return Err(rejected(
                            "Secure Boot was off at boot (the SecureBoot variable measured in \
                             PCR 7 is 0) and the policy requires it on",
                        ));
                    }
                    None => {
                        return Err(rejected(
                            "the log measures no SecureBoot variable in PCR 7 and the policy \
                             requires Secure Boot on",
                        ));
                    }
                }
            }
            for (name, allowed) in &self.variables {
                let Some(event) = pcr7.variables.iter().find(|(n, _)| n == name) else {
                    return Err(rejected(format!(
                        "the log measures no {name} variable in PCR 7 and the policy names \
                         its allowed digests"
                    )));
                };
                let digest = sha256_of(event.1)?;
                if !allowed.contains(&digest) {
                    return Err(rejected(format!(
                        "{}: the {name} variable is not one of the allowed values",
                        event.1.describe(ALG_SHA256)
                    )));
                }
            }
        }
        Ok(())
    }
}

fn rejected(msg: impl std::fmt::Display) -> Error {
    Error::AttestationRejected(format!("tpm: measured boot: {msg}"))
}

/// The sha256 digest of an event, which a log that replayed on the sha256 bank has.
fn sha256_of(event: &Event) -> Result<[u8; 32], Error> {
    event
        .digest(ALG_SHA256)
        .and_then(|d| <[u8; 32]>::try_from(d).ok())
        .ok_or_else(|| {
            rejected(format!(
                "{} has no sha256 digest",
                event.describe(ALG_SHA256)
            ))
        })
}

/// Refuses an event whose sha256 digest is not the hash of its data.
fn check_data_digest(event: &Event) -> Result<(), Error> {
    let digest = sha256_of(event)?;
    if digest.as_slice() != Sha256::digest(&event.data).as_slice() {
        return Err(rejected(format!(
            "{}: the digest is not the sha256 of the event's data",
            event.describe(ALG_SHA256)
        )));
    }
    Ok(())
}

/// Refuses a separator that is not a good one (data 0, digest its hash).
fn check_separator(event: &Event) -> Result<(), Error> {
    check_data_digest(event)?;
    if event.data != [0, 0, 0, 0] {
        return Err(rejected(format!(
            "{}: a separator measuring a firmware error (data {})",
            event.describe(ALG_SHA256),
            hex::encode(&event.data)
        )));
    }
    Ok(())
}

fn unknown_in(event: &Event, pcr: u8) -> Error {
    rejected(format!(
        "{}: an event of this type is not allowed in PCR {pcr}, which the policy polices",
        event.describe(ALG_SHA256)
    ))
}

/// The events of one PCR, EV_NO_ACTION records (never extended) left out.
fn events_of(log: &EventLog, pcr: u8) -> impl Iterator<Item = &Event> {
    log.events
        .iter()
        .filter(move |e| e.pcr == u32::from(pcr) && e.event_type != EV_NO_ACTION)
}

fn check_pcr4(log: &EventLog, apps: &Allowed) -> Result<(), Error> {
    let mut booted = 0usize;
    for event in events_of(log, PCR_BOOT_APPLICATIONS) {
        match event.event_type {
            EV_EFI_BOOT_SERVICES_APPLICATION => {
                if !apps.contains(&sha256_of(event)?) {
                    return Err(rejected(format!(
                        "{}: a boot application not in boot_applications",
                        event.describe(ALG_SHA256)
                    )));
                }
                booted += 1;
            }
            EV_EFI_ACTION => check_data_digest(event)?,
            EV_SEPARATOR => check_separator(event)?,
            _ => return Err(unknown_in(event, PCR_BOOT_APPLICATIONS)),
        }
    }
    if booted == 0 {
        return Err(rejected(
            "the log measures no boot application in PCR 4 and the policy names the allowed ones",
        ));
    }
    Ok(())
}

/// What PCR 7 says, read under the strict rules.
struct Pcr7<'a> {
    /// The `SecureBoot` variable's value, when measured.
    secure_boot: Option<bool>,
    /// The Secure Boot variables measured before the separator, by name.
    variables: Vec<(&'static str, &'a Event)>,
}

fn read_pcr7(log: &EventLog) -> Result<Pcr7<'_>, Error> {
    let mut pcr7 = Pcr7 {
        secure_boot: None,
        variables: Vec::new(),
    };
    let mut separated = false;
    for event in events_of(log, PCR_SECURE_BOOT) {
        match event.event_type {
            EV_EFI_VARIABLE_DRIVER_CONFIG => {
                check_data_digest(event)?;
                if separated {
                    return Err(rejected(format!(
                        "{}: a Secure Boot variable measured after the separator",
                        event.describe(ALG_SHA256)
                    )));
                }
                let var = parse_variable(&event.data)
                    .map_err(|e| rejected(format!("{}: {e}", event.describe(ALG_SHA256))))?;
                let Some(known) = PCR7_VARIABLES
                    .iter()
                    .find(|v| v.name == var.name && v.guid == var.guid)
                else {
                    return Err(rejected(format!(
                        "{}: variable {:?} is not a Secure Boot variable",
                        event.describe(ALG_SHA256),
                        var.name
                    )));
                };
                if pcr7.variables.iter().any(|(n, _)| *n == known.name) {
                    return Err(rejected(format!(
                        "{}: the {} variable is measured twice",
                        event.describe(ALG_SHA256),
                        known.name
                    )));
                }
                if known.name == "SecureBoot" {
                    let state = secure_boot_state(&var.data).ok_or_else(|| {
                        rejected(format!(
                            "{}: SecureBoot holds {}, not 0 or 1",
                            event.describe(ALG_SHA256),
                            hex::encode(&var.data)
                        ))
                    })?;
                    pcr7.secure_boot = Some(state);
                }
                pcr7.variables.push((known.name, event));
            }
            EV_EFI_VARIABLE_AUTHORITY => check_data_digest(event)?,
            EV_SEPARATOR => {
                check_separator(event)?;
                separated = true;
            }
            _ => return Err(unknown_in(event, PCR_SECURE_BOOT)),
        }
    }
    Ok(pcr7)
}

/// The Secure Boot state the `SecureBoot` variable's contents say: 1 on; 0 or empty
/// off; anything else `None`.
fn secure_boot_state(data: &[u8]) -> Option<bool> {
    match data {
        [1] => Some(true),
        [] | [0] => Some(false),
        _ => None,
    }
}

/// The selectors of a log that replayed (see the module doc), from the PCRs in `quoted`
/// only: the replay vouches for no other PCR's events.
pub fn selectors(log: &EventLog, quoted: &[u8]) -> Result<Vec<Selector>, Error> {
    let mut values = BTreeSet::new();
    if quoted.contains(&PCR_SECURE_BOOT) {
        let secure_boot: Vec<(&Event, Vec<u8>)> = events_of(log, PCR_SECURE_BOOT)
            .filter(|e| e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG)
            .filter_map(|e| parse_variable(&e.data).ok().map(|v| (e, v)))
            .filter(|(_, v)| v.name == "SecureBoot" && v.guid == EFI_GLOBAL_VARIABLE)
            .map(|(e, v)| (e, v.data))
            .collect();
        // Exactly one, and its digest its data's: a second one (appended by root after
        // boot) or a digest that does not match leaves the state unknown.
        if let [(event, data)] = secure_boot.as_slice()
            && check_data_digest(event).is_ok()
        {
            if let Some(on) = secure_boot_state(data) {
                values.insert(format!("secure_boot:{}", if on { "on" } else { "off" }));
            }
        }
    }
    if quoted.contains(&PCR_BOOT_APPLICATIONS) {
        for event in events_of(log, PCR_BOOT_APPLICATIONS)
            .filter(|e| e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
        {
            if let Some(d) = event.digest(ALG_SHA256) {
                values.insert(format!("boot_app:sha256:{}", hex::encode(d)));
            }
        }
    }
    values
        .iter()
        .map(|v| Selector::new(SELECTOR_TYPE, v))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::eventlog::{Bank, EventDigest};

    /// A UEFI_VARIABLE_DATA, written here independently of the parser.
    fn variable_data(guid: [u8; 16], name: &str, data: &[u8]) -> Vec<u8> {
        let name: Vec<u16> = name.encode_utf16().collect();
        let mut out = guid.to_vec();
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        for c in name {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    struct Log(EventLog);

    impl Log {
        fn new() -> Log {
            Log(EventLog {
                banks: vec![Bank {
                    alg: ALG_SHA256,
                    digest_size: 32,
                }],
                startup_locality: None,
                events: Vec::new(),
            })
        }

        fn push(&mut self, pcr: u32, event_type: u32, digest: Vec<u8>, data: Vec<u8>) {
            let number = self.0.events.len() + 1;
            self.0.events.push(Event {
                number,
                offset: number * 100,
                pcr,
                event_type,
                digests: vec![EventDigest {
                    alg: ALG_SHA256,
                    digest,
                }],
                data,
            });
        }

        /// An event whose digest is its data's.
        fn hashed(&mut self, pcr: u32, event_type: u32, data: Vec<u8>) -> &mut Log {
            self.push(pcr, event_type, Sha256::digest(&data).to_vec(), data);
            self
        }

        fn var(&mut self, guid: [u8; 16], name: &str, data: &[u8]) -> &mut Log {
            self.hashed(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                variable_data(guid, name, data),
            )
        }

        fn separator(&mut self, pcr: u32) -> &mut Log {
            self.hashed(pcr, EV_SEPARATOR, vec![0; 4])
        }

        fn app(&mut self, image: &[u8]) -> &mut Log {
            self.push(
                4,
                EV_EFI_BOOT_SERVICES_APPLICATION,
                Sha256::digest(image).to_vec(),
                vec![0; 40],
            );
            self
        }

        /// A plausible boot: Secure Boot `sb`, PK/KEK/db/dbx, separators, shim, kernel.
        fn boot(sb: u8, kernel: &[u8]) -> Log {
            let mut log = Log::new();
            log.var(EFI_GLOBAL_VARIABLE, "SecureBoot", &[sb])
                .var(EFI_GLOBAL_VARIABLE, "PK", b"pk")
                .var(EFI_GLOBAL_VARIABLE, "KEK", b"kek")
                .var(EFI_IMAGE_SECURITY_DATABASE, "db", b"db")
                .var(EFI_IMAGE_SECURITY_DATABASE, "dbx", b"dbx")
                .separator(7)
                .hashed(
                    4,
                    EV_EFI_ACTION,
                    b"Calling EFI Application from Boot Option".to_vec(),
                )
                .separator(4)
                .hashed(7, EV_EFI_VARIABLE_AUTHORITY, b"db cert".to_vec())
                .app(b"shim")
                .app(kernel);
            log
        }
    }

    /// Every PCR quoted.
    const ALL: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

    fn hex256(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn var_digest(guid: [u8; 16], name: &str, data: &[u8]) -> String {
        hex256(&variable_data(guid, name, data))
    }

    fn policy(cfg: MeasuredBootConfig) -> MeasuredBootPolicy {
        MeasuredBootPolicy::from_config(&cfg).unwrap()
    }

    fn apps(images: &[&[u8]]) -> MeasuredBootConfig {
        MeasuredBootConfig {
            boot_applications: Some(images.iter().map(|i| hex256(i)).collect()),
            ..Default::default()
        }
    }

    fn refusal(p: &MeasuredBootPolicy, log: &Log) -> String {
        p.check(&log.0).unwrap_err().to_string()
    }

    #[test]
    fn an_approved_boot_passes_and_a_pre_approved_kernel_too() {
        let p = policy(MeasuredBootConfig {
            secure_boot: true,
            pk: Some(vec![var_digest(EFI_GLOBAL_VARIABLE, "PK", b"pk")]),
            db: Some(vec![
                "00".repeat(32),
                var_digest(EFI_IMAGE_SECURITY_DATABASE, "db", b"db"),
            ]),
            ..apps(&[b"shim", b"kernel-1", b"kernel-2"])
        });
        assert_eq!(p.pcrs(), vec![4, 7]);
        p.check(&Log::boot(1, b"kernel-1").0).unwrap();
        p.check(&Log::boot(1, b"kernel-2").0).unwrap();
    }

    #[test]
    fn a_kernel_not_in_the_set_is_refused_naming_the_event() {
        let p = policy(apps(&[b"shim", b"kernel-1"]));
        let msg = refusal(&p, &Log::boot(1, b"kernel-3"));
        assert_eq!(
            msg,
            format!(
                "attestation rejected: tpm: measured boot: event 11 \
                 (EV_EFI_BOOT_SERVICES_APPLICATION, PCR 4, digest {}): a boot application \
                 not in boot_applications",
                hex256(b"kernel-3")
            )
            .replace("attestation rejected: ", &attestation_prefix()),
            "{msg}"
        );
        // Appending an approved digest after the unapproved kernel changes nothing.
        let mut log = Log::boot(1, b"kernel-3");
        log.app(b"kernel-1");
        assert!(refusal(&p, &log).contains(&hex256(b"kernel-3")));
    }

    /// How the core error type prints a rejection (whatever its prefix is).
    fn attestation_prefix() -> String {
        Error::AttestationRejected(String::new()).to_string()
    }

    #[test]
    fn secure_boot_off_or_unmeasured_is_refused_when_required() {
        let p = policy(MeasuredBootConfig {
            secure_boot: true,
            ..Default::default()
        });
        assert_eq!(p.pcrs(), vec![7]);
        assert!(refusal(&p, &Log::boot(0, b"k")).contains("Secure Boot was off"));
        let mut log = Log::new();
        log.separator(7);
        assert!(refusal(&p, &log).contains("no SecureBoot variable"));
        // Root appends SecureBoot = 1 after the real 0: refused as measured twice /
        // after the separator, never read as on.
        let mut log = Log::boot(0, b"k");
        log.var(EFI_GLOBAL_VARIABLE, "SecureBoot", &[1]);
        assert!(refusal(&p, &log).contains("after the separator"));
        // Without a policy nothing is refused, but the selector is not on either.
        let sel = selectors(&log.0, &ALL).unwrap();
        assert!(
            !sel.iter().any(|s| s.value().starts_with("secure_boot")),
            "{sel:?}"
        );
    }

    #[test]
    fn variables_are_policed_by_their_event_digest() {
        let p = policy(MeasuredBootConfig {
            dbx: Some(vec![var_digest(
                EFI_IMAGE_SECURITY_DATABASE,
                "dbx",
                b"new dbx",
            )]),
            ..Default::default()
        });
        let msg = refusal(&p, &Log::boot(1, b"k"));
        assert!(
            msg.contains("the dbx variable is not one of the allowed values")
                && msg.contains("EV_EFI_VARIABLE_DRIVER_CONFIG, PCR 7"),
            "{msg}"
        );
        let mut log = Log::new();
        log.var(EFI_GLOBAL_VARIABLE, "SecureBoot", &[1])
            .separator(7);
        assert!(refusal(&p, &log).contains("measures no dbx variable"));
    }

    #[test]
    fn policed_pcrs_fail_closed() {
        let p = policy(MeasuredBootConfig {
            secure_boot: true,
            ..apps(&[b"shim", b"k"])
        });
        // An event type the rule does not know, in PCR 4 and in PCR 7.
        let mut log = Log::boot(1, b"k");
        log.hashed(4, crate::eventlog::event_type::EV_IPL, b"grub.cfg".to_vec());
        assert!(
            refusal(&p, &log).contains("(EV_IPL, PCR 4"),
            "{}",
            refusal(&p, &log)
        );
        let mut log = Log::boot(1, b"k");
        log.hashed(7, EV_EFI_ACTION, b"UEFI Debug Mode".to_vec());
        assert!(refusal(&p, &log).contains("not allowed in PCR 7"));
        // A separator measuring an error.
        let mut log = Log::boot(1, b"k");
        log.hashed(4, EV_SEPARATOR, vec![1, 0, 0, 0]);
        assert!(refusal(&p, &log).contains("firmware error"));
        // A variable whose digest is not its data's.
        let mut log = Log::new();
        log.push(
            7,
            EV_EFI_VARIABLE_DRIVER_CONFIG,
            vec![0; 32],
            variable_data(EFI_GLOBAL_VARIABLE, "SecureBoot", &[1]),
        );
        let p7 = policy(MeasuredBootConfig {
            secure_boot: true,
            ..Default::default()
        });
        assert!(refusal(&p7, &log).contains("not the sha256 of the event's data"));
        // An unknown variable name before the separator.
        let mut log = Log::new();
        log.var(EFI_GLOBAL_VARIABLE, "Shim", &[1]);
        assert!(refusal(&p7, &log).contains("not a Secure Boot variable"));
        // Nothing booted.
        let mut log = Log::new();
        log.var(EFI_GLOBAL_VARIABLE, "SecureBoot", &[1])
            .separator(4);
        assert!(refusal(&p, &log).contains("no boot application"));
        // Unpoliced PCRs may hold anything.
        let mut log = Log::boot(1, b"k");
        log.hashed(1, crate::eventlog::event_type::EV_IPL, b"x".to_vec());
        p.check(&log.0).unwrap();
    }

    #[test]
    fn selectors_name_secure_boot_and_every_boot_application() {
        let sel: Vec<String> = selectors(&Log::boot(1, b"kernel").0, &ALL)
            .unwrap()
            .iter()
            .map(|s| format!("{}:{}", s.kind(), s.value()))
            .collect();
        assert_eq!(
            sel,
            vec![
                format!("tpm:boot_app:sha256:{}", hex256(b"kernel")),
                format!("tpm:boot_app:sha256:{}", hex256(b"shim")),
                "tpm:secure_boot:on".to_owned(),
            ]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
        let off = selectors(&Log::boot(0, b"kernel").0, &ALL).unwrap();
        assert!(off.iter().any(|s| s.value() == "secure_boot:off"));
        // PCRs the quote did not cover give nothing: their events are not vouched for.
        let pcr7_only: Vec<String> = selectors(&Log::boot(1, b"kernel").0, &[7])
            .unwrap()
            .iter()
            .map(|s| s.value().to_owned())
            .collect();
        assert_eq!(pcr7_only, vec!["secure_boot:on".to_owned()]);
        assert!(
            selectors(&Log::boot(1, b"kernel").0, &[0, 1, 2])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_settings_are_refused_naming_the_key() {
        let err = MeasuredBootPolicy::from_config(&MeasuredBootConfig {
            kek: Some(vec!["abc".into()]),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("measured_boot: kek: \"abc\" is not a sha256 digest"),
            "{err}"
        );
        let err = MeasuredBootPolicy::from_config(&apps(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("boot_applications is empty"), "{err}");
        assert!(policy(MeasuredBootConfig::default()).pcrs().is_empty());
    }
}
