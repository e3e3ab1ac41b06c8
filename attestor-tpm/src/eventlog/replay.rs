//! Replay: the PCR values a log implies, and their check against a quote.
//!
//! A PCR starts at its reset value (all zeros; PCR 0 at `00…00<locality>` when the
//! firmware logged a `StartupLocality` other than 0, because TPM2_Startup from locality
//! 3 or 4 sets it so) and each record extends it: `new = H(old ‖ digest)`, with the
//! bank's hash and the record's digest for that bank. EV_NO_ACTION records are never
//! extended (the header, `StartupLocality`, SP800-155 manifests). The replay of a bank
//! is what the log *claims*; [`EventLog::check_replay`] makes it evidence by comparing it
//! with PCR values a verified quote signed.
//!
//! SM3-256 banks are parsed but not replayed: the workspace has no SM3 implementation,
//! and a quote over SHA-256 is what the server checks. Asking for an SM3 replay is
//! refused with a message that says so.

use std::collections::BTreeMap;

use carapace_core::Error;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha384, Sha512};

use super::event_type::EV_NO_ACTION;
use super::{ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512, ALG_SM3_256, EventLog, LogError};

/// The highest PCR index [`EventLog::check_replay`] treats as the firmware's.
const LAST_FIRMWARE_PCR: u8 = 7;

/// `H(old ‖ digest)` with the hash of bank `alg` (one of the four replayable).
fn extend(alg: u16, old: &[u8], digest: &[u8]) -> Vec<u8> {
    fn with<D: Digest>(old: &[u8], digest: &[u8]) -> Vec<u8> {
        let mut h = D::new();
        h.update(old);
        h.update(digest);
        h.finalize().to_vec()
    }
    match alg {
        ALG_SHA1 => with::<Sha1>(old, digest),
        ALG_SHA256 => with::<Sha256>(old, digest),
        ALG_SHA384 => with::<Sha384>(old, digest),
        _ => with::<Sha512>(old, digest),
    }
}

/// A short name of a bank for messages.
fn alg_name(alg: u16) -> String {
    match alg {
        ALG_SHA1 => "sha1".into(),
        ALG_SHA256 => "sha256".into(),
        ALG_SHA384 => "sha384".into(),
        ALG_SHA512 => "sha512".into(),
        ALG_SM3_256 => "sm3_256".into(),
        other => format!("algorithm {other:#06x}"),
    }
}

impl EventLog {
    /// The values the log implies for bank `alg`: PCR index → final value, for every
    /// PCR the log extends (and PCR 0 when a `StartupLocality` record is present).
    /// Refused when the log has no such bank, and for an SM3-256 bank (not replayable
    /// here: see the module doc).
    pub fn replay(&self, alg: u16) -> Result<BTreeMap<u32, Vec<u8>>, LogError> {
        let Some(bank) = self.banks.iter().find(|b| b.alg == alg) else {
            return Err(LogError {
                offset: 0,
                reason: format!("the log has no {} bank", alg_name(alg)),
            });
        };
        if !matches!(alg, ALG_SHA1 | ALG_SHA256 | ALG_SHA384 | ALG_SHA512) {
            return Err(LogError {
                offset: 0,
                reason: format!(
                    "the {} bank cannot be replayed (no implementation of its hash)",
                    alg_name(alg)
                ),
            });
        }
        let size = bank.digest_size as usize;
        let mut pcrs: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        if let Some(locality) = self.startup_locality {
            let mut initial = vec![0; size];
            if let Some(last) = initial.last_mut() {
                *last = locality;
            }
            pcrs.insert(0, initial);
        }
        for event in &self.events {
            if event.event_type == EV_NO_ACTION {
                continue;
            }
            let Some(digest) = event.digest(alg) else {
                // The parser gives every record one digest per bank; a log built by
                // hand may not.
                return Err(LogError {
                    offset: event.offset,
                    reason: format!("{} has no {} digest", event.describe(alg), alg_name(alg)),
                });
            };
            let value = pcrs.entry(event.pcr).or_insert_with(|| vec![0; size]);
            *value = extend(alg, value, digest);
        }
        Ok(pcrs)
    }

    /// Checks the replay of bank `alg` against the quoted values (`quoted`: PCR index →
    /// value, as the quote verified them). Every quoted PCR in 0-7 (the firmware's) and
    /// every other quoted PCR the log extends must equal its replay (a firmware PCR the
    /// log never extends must be at its reset value). The refusal names the first PCR
    /// that differs, with both values.
    pub fn check_replay(&self, alg: u16, quoted: &BTreeMap<u8, Vec<u8>>) -> Result<(), Error> {
        let replayed = self
            .replay(alg)
            .map_err(|e| Error::AttestationRejected(format!("tpm: {e}")))?;
        let size = self
            .banks
            .iter()
            .find(|b| b.alg == alg)
            .map_or(0, |b| b.digest_size as usize);
        let reset = vec![0u8; size];
        for (&pcr, value) in quoted {
            let expected = match replayed.get(&u32::from(pcr)) {
                Some(v) => v,
                None if pcr <= LAST_FIRMWARE_PCR => &reset,
                None => continue,
            };
            if expected != value {
                return Err(Error::AttestationRejected(format!(
                    "tpm: the event log does not replay: PCR {pcr} ({}) is {} in the log, {} in the quote",
                    alg_name(alg),
                    hex::encode(expected),
                    hex::encode(value)
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::super::event_type::*;
    use super::super::parse;
    use super::super::parse::tests::{header, record, sha256_record};
    use super::*;

    fn ext(old: &[u8], d: &[u8]) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(old);
        h.update(d);
        h.finalize().to_vec()
    }

    #[test]
    fn replays_by_hand_and_skips_no_action() {
        let mut b = header(&[(ALG_SHA1, 20), (ALG_SHA256, 32)]);
        let d1 = [1u8; 32];
        let d2 = [2u8; 32];
        b.extend(record(
            4,
            EV_EFI_ACTION,
            &[(ALG_SHA1, &d1[..20]), (ALG_SHA256, &d1)],
            b"a",
        ));
        b.extend(record(
            4,
            EV_NO_ACTION,
            &[(ALG_SHA1, &[9; 20]), (ALG_SHA256, &[9; 32])],
            b"x",
        ));
        b.extend(record(
            4,
            EV_SEPARATOR,
            &[(ALG_SHA1, &d2[..20]), (ALG_SHA256, &d2)],
            b"b",
        ));
        let log = parse(&b).unwrap();
        let sha256 = log.replay(ALG_SHA256).unwrap();
        assert_eq!(sha256.keys().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(sha256[&4], ext(&ext(&[0; 32], &d1), &d2));
        let sha1 = log.replay(ALG_SHA1).unwrap();
        let mut want = vec![0u8; 20];
        for d in [&d1[..20], &d2[..20]] {
            let mut h = Sha1::new();
            h.update(&want);
            h.update(d);
            want = h.finalize().to_vec();
        }
        assert_eq!(sha1[&4], want);
        let e = log.replay(ALG_SHA384).unwrap_err();
        assert!(e.reason.contains("no sha384 bank"), "{e}");
    }

    #[test]
    fn startup_locality_sets_pcr0_initial_value() {
        let mut b = header(&[(ALG_SHA256, 32)]);
        let mut sl = b"StartupLocality\0".to_vec();
        sl.push(3);
        b.extend(record(0, EV_NO_ACTION, &[(ALG_SHA256, &[0; 32])], &sl));
        let only = parse(&b).unwrap().replay(ALG_SHA256).unwrap();
        let mut init = vec![0u8; 32];
        init[31] = 3;
        assert_eq!(only[&0], init);
        b.extend(sha256_record(0, EV_S_CRTM_VERSION, b"v"));
        let log = parse(&b).unwrap();
        let pcrs = log.replay(ALG_SHA256).unwrap();
        assert_eq!(pcrs[&0], ext(&init, &Sha256::digest(b"v")));
    }

    #[test]
    fn sm3_banks_are_not_replayed() {
        let mut b = header(&[(ALG_SM3_256, 32)]);
        b.extend(record(4, EV_EFI_ACTION, &[(ALG_SM3_256, &[1; 32])], b"a"));
        let e = parse(&b).unwrap().replay(ALG_SM3_256).unwrap_err();
        assert!(e.reason.contains("sm3_256 bank cannot be replayed"), "{e}");
    }

    #[test]
    fn check_replay_names_the_pcr_that_differs() {
        let mut b = header(&[(ALG_SHA256, 32)]);
        b.extend(sha256_record(0, EV_S_CRTM_VERSION, b"v"));
        b.extend(sha256_record(9, EV_IPL, b"kernel"));
        let log = parse(&b).unwrap();
        let pcrs = log.replay(ALG_SHA256).unwrap();
        let mut quoted: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
        quoted.insert(0, pcrs[&0].clone());
        quoted.insert(7, vec![0; 32]); // firmware PCR never extended: reset value
        quoted.insert(9, pcrs[&9].clone());
        quoted.insert(16, vec![0xee; 32]); // not the firmware's, not in the log
        log.check_replay(ALG_SHA256, &quoted).unwrap();

        let mut bad = quoted.clone();
        bad.insert(7, vec![1; 32]);
        let e = log.check_replay(ALG_SHA256, &bad).unwrap_err();
        let want = format!(
            "tpm: the event log does not replay: PCR 7 (sha256) is {} in the log, {} in the quote",
            "00".repeat(32),
            "01".repeat(32)
        );
        assert_eq!(e, Error::AttestationRejected(want));

        let mut bad = quoted.clone();
        bad.insert(9, vec![0; 32]);
        let e = log.check_replay(ALG_SHA256, &bad).unwrap_err();
        assert!(e.to_string().contains("PCR 9"), "{e}");

        let e = log.check_replay(ALG_SHA1, &quoted).unwrap_err();
        assert!(e.to_string().contains("no sha1 bank"), "{e}");
    }
}
