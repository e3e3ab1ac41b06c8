//! swtpm fixture: manufactured EK certificates chain to the lab EK CA, instances run in
//! parallel from one template, and dropping one stops its process.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use hsm_sim::process::ProcInfo;
use hsm_sim::swtpm::{NV_EK_CERT_ECC_P384, NV_EK_CERT_RSA2048, Swtpm, TpmManufacturer};

/// Reads an NV index as the owner and returns its bytes (DER for an EK certificate).
fn nvread(tpm: &Swtpm, index: u32, out: &Path) {
    let status = Command::new("tpm2_nvread")
        .envs(tpm.envs())
        .args(["-C", "o", "-o"])
        .arg(out)
        .arg(format!("{index:#010x}"))
        .status()
        .unwrap();
    assert!(status.success(), "tpm2_nvread {index:#x} failed");
}

/// `openssl verify` of a DER certificate against the lab EK CA root and intermediate.
fn verify_ek_cert(m: &TpmManufacturer, der: &Path) {
    let pem = der.with_extension("pem");
    let conv = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(der)
        .arg("-out")
        .arg(&pem)
        .output()
        .unwrap();
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(m.ek_ca_root())
        .arg("-untrusted")
        .arg(m.ek_ca_intermediate())
        .arg(&pem)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && out.trim_end().ends_with(": OK"),
        "openssl verify: {out}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn two_tpms_from_one_template_serve_ek_certs_that_chain_to_the_lab_ca() {
    let t = Instant::now();
    let m = TpmManufacturer::new().unwrap();
    eprintln!("manufacture: {:?}", t.elapsed());

    let t = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Swtpm::start(&m).unwrap());
        let b = s.spawn(|| Swtpm::start(&m).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    eprintln!("two swtpm starts in parallel: {:?}", t.elapsed());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.pid(), b.pid());
    assert_eq!(a.tcti(), format!("swtpm:host=127.0.0.1,port={}", a.port()));

    let work = tempfile::tempdir().unwrap();
    for (name, tpm) in [("a", &a), ("b", &b)] {
        let rsa = work.path().join(format!("{name}-ek-rsa.der"));
        nvread(tpm, NV_EK_CERT_RSA2048, &rsa);
        verify_ek_cert(&m, &rsa);
        let ecc = work.path().join(format!("{name}-ek-p384.der"));
        nvread(tpm, NV_EK_CERT_ECC_P384, &ecc);
        verify_ek_cert(&m, &ecc);
        tpm.flush_transient().unwrap();
    }
    // Copies of one manufactured state: the same EK certificate in both.
    assert_eq!(
        std::fs::read(work.path().join("a-ek-rsa.der")).unwrap(),
        std::fs::read(work.path().join("b-ek-rsa.der")).unwrap()
    );

    let pids = [a.pid(), b.pid()];
    let dirs = [a.dir().to_owned(), b.dir().to_owned()];
    drop(a);
    drop(b);
    for (pid, dir) in pids.into_iter().zip(dirs) {
        assert!(
            ProcInfo::of(pid).unwrap().is_none(),
            "swtpm {pid} still there"
        );
        assert!(!dir.exists(), "{} not removed", dir.display());
    }
    let ca = m.dir().to_owned();
    drop(m);
    assert!(!ca.exists());
}

#[test]
fn the_shared_manufacturer_is_made_once() {
    let first = TpmManufacturer::shared().unwrap();
    let second = TpmManufacturer::shared().unwrap();
    assert!(std::ptr::eq(first, second));
    assert!(first.ek_ca_root().is_file() && first.ek_ca_intermediate().is_file());
    let t = Instant::now();
    let tpm = Swtpm::start(first).unwrap();
    eprintln!("swtpm start: {:?}", t.elapsed());
    assert_eq!(tpm.getrandom().unwrap().len(), 32);
}

#[test]
fn swtpm_state_is_private_to_each_instance() {
    let m = TpmManufacturer::shared().unwrap();
    let tpm = Swtpm::start(m).unwrap();
    assert!(tpm.state_dir().starts_with(tpm.dir()));
    assert!(!tpm.state_dir().starts_with(m.dir()));
    assert!(tpm.child().log().starts_with(tpm.dir()));
}

/// The RSA EK's public area, created from the endorsement seed (`tpm2_createek`), then
/// flushed: the same bytes mean the same seed, so the same TPM.
fn ek_public(tpm: &Swtpm, dir: &Path) -> Vec<u8> {
    let public = dir.join("ek.pub");
    let out = Command::new("tpm2_createek")
        .envs(tpm.envs())
        .args(["-G", "rsa", "-c"])
        .arg(dir.join("ek.ctx"))
        .arg("-u")
        .arg(&public)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tpm.flush_transient().unwrap();
    std::fs::read(public).unwrap()
}

#[test]
fn power_cycle_resets_the_pcrs_and_keeps_the_ek() {
    let tpm = Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let ek = ek_public(&tpm, work.path());
    let extend = Command::new("tpm2_pcrextend")
        .envs(tpm.envs())
        .arg(format!("4:sha256={}", "ab".repeat(32)))
        .status()
        .unwrap();
    assert!(extend.success());
    let before = tpm.pcrs_sha256(&[4, 7]).unwrap();
    assert_ne!(before[&4], vec![0; 32]);
    assert_eq!(before[&7], vec![0; 32]);

    tpm.power_cycle().unwrap();

    let after = tpm.pcrs_sha256(&[4, 7]).unwrap();
    assert_eq!(after[&4], vec![0; 32], "PCR 4 back to its reset value");
    assert_eq!(after[&7], vec![0; 32]);
    assert_eq!(tpm.getrandom().unwrap().len(), 32, "the TPM answers");
    assert_eq!(ek_public(&tpm, work.path()), ek, "same endorsement seed");
    // A second cycle works too (Startup after Init, not a leftover state).
    tpm.power_cycle().unwrap();
    assert_eq!(tpm.pcrs_sha256(&[4]).unwrap()[&4], vec![0; 32]);
}
