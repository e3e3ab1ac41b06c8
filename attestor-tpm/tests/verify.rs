//! The server's verification library against real evidence: EKs, EK certificates, AKs and
//! quotes made by tpm2-tools on a swtpm manufactured by the lab EK CA (hsm-sim).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use carapace_attestor_tpm::verify::{
    self, EkIdentity, EkPolicy, EkTrust, PcrPolicy, QuoteInfo, SELECTOR_TYPE,
};
use carapace_core::Error;
use hsm_sim::swtpm::{NV_EK_CERT_ECC_P384, NV_EK_CERT_RSA2048, Swtpm, TpmManufacturer};
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributes;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::Public;

const ALL_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
const ALL_PCRS_ARG: &str = "sha256:0,1,2,3,4,5,6,7";

/// One swtpm (a copy of the shared manufactured state) and a work directory for the
/// files tpm2-tools writes.
struct Lab {
    tpm: Swtpm,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let tpm = Swtpm::start(TpmManufacturer::shared().unwrap()).unwrap();
        Lab {
            tpm,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// Runs a tpm2-tools command in the work dir against this TPM (TCTI in the child's
    /// environment only), then flushes transient objects: swtpm has three slots and no
    /// resource manager.
    fn tool(&self, program: &str, args: &[&str]) -> Output {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.tpm.flush_transient().unwrap();
        out
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .envs(self.tpm.envs())
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// The RSA-2048 EK (`tpm2_createek`, default template): `ek.ctx`, and its public area.
    fn ek_rsa(&self) -> Public {
        self.tool(
            "tpm2_createek",
            &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
        );
        public_from_tpm2b(&self.read("ek.pub"))
    }

    /// The P-384 EK swtpm_setup made persistent at 0x81010016.
    fn ek_p384(&self) -> Public {
        self.tool("tpm2_readpublic", &["-c", "0x81010016", "-o", "ek384.pub"]);
        public_from_tpm2b(&self.read("ek384.pub"))
    }

    /// An AK under the RSA EK (`ek.ctx`): `<name>.ctx`, `<name>.pub`, `<name>.name`.
    fn ak(&self, name: &str, alg: &str) -> Public {
        let scheme = if alg == "rsa" { "rsassa" } else { "ecdsa" };
        let (ctx, public, tpm_name) = (
            format!("{name}.ctx"),
            format!("{name}.pub"),
            format!("{name}.name"),
        );
        self.tool(
            "tpm2_createak",
            &[
                "-C", "ek.ctx", "-c", &ctx, "-G", alg, "-g", "sha256", "-s", scheme, "-u", &public,
                "-n", &tpm_name,
            ],
        );
        public_from_tpm2b(&self.read(&public))
    }

    /// A quote by key `<key>.ctx` over `selection` with `nonce`: (TPMS_ATTEST, TPMT_SIGNATURE).
    fn quote(&self, key: &str, selection: &str, nonce: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let ctx = format!("{key}.ctx");
        self.tool(
            "tpm2_quote",
            &[
                "-c",
                &ctx,
                "-l",
                selection,
                "-q",
                &hex::encode(nonce),
                "-m",
                "quote.msg",
                "-s",
                "quote.sig",
                "-o",
                "quote.pcrs",
                "-g",
                "sha256",
            ],
        );
        (self.read("quote.msg"), self.read("quote.sig"))
    }

    /// The SHA-256 values of `pcrs` (`tpm2_pcrread -o` writes the raw digests back to back).
    fn pcr_values(&self, pcrs: &[u8]) -> BTreeMap<u8, Vec<u8>> {
        let list: Vec<String> = pcrs.iter().map(u8::to_string).collect();
        let selection = format!("sha256:{}", list.join(","));
        self.tool("tpm2_pcrread", &[&selection, "-o", "pcrs.bin"]);
        let raw = self.read("pcrs.bin");
        assert_eq!(raw.len(), 32 * pcrs.len());
        pcrs.iter()
            .zip(raw.chunks(32))
            .map(|(i, v)| (*i, v.to_vec()))
            .collect()
    }

    /// An EK certificate from NV (DER, as `tpm2_nvread` returns it).
    fn nv_cert(&self, index: u32) -> Vec<u8> {
        let file = format!("nv-{index:x}.der");
        self.tool(
            "tpm2_nvread",
            &["-C", "o", "-o", &file, &format!("{index:#010x}")],
        );
        self.read(&file)
    }
}

/// `tpm2_createek -u`, `tpm2_createak -u` and `tpm2_readpublic -o` write a TPM2B_PUBLIC:
/// a 2-byte big-endian size, then the TPMT_PUBLIC the wire carries.
fn public_from_tpm2b(tpm2b: &[u8]) -> Public {
    let size = usize::from(u16::from_be_bytes([tpm2b[0], tpm2b[1]]));
    assert_eq!(size + 2, tpm2b.len(), "not a TPM2B_PUBLIC");
    verify::parse_public(&tpm2b[2..]).unwrap()
}

fn nonce() -> Vec<u8> {
    rand::random::<[u8; 32]>().to_vec()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn rejection(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(Error::AttestationRejected(m)) => m,
        other => panic!("expected AttestationRejected, got {other:?}"),
    }
}

/// The lab EK CA: (root DER, intermediate DER).
fn lab_ca() -> (Vec<u8>, Vec<u8>) {
    let m = TpmManufacturer::shared().unwrap();
    let root =
        verify::certificates_from_pem_or_der(&std::fs::read(m.ek_ca_root()).unwrap()).unwrap();
    let inter =
        verify::certificates_from_pem_or_der(&std::fs::read(m.ek_ca_intermediate()).unwrap())
            .unwrap();
    assert_eq!((root.len(), inter.len()), (1, 1));
    (root[0].clone(), inter[0].clone())
}

fn sh(script: &str, dir: &Path) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---------------------------------------------------------------- quotes

#[test]
fn good_ecc_quote_passes_and_yields_clock_and_pcr_selectors() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak = lab.ak("ak", "ecc");
    verify::check_ak(&ak).unwrap();
    let n = nonce();
    let (attest, sig) = lab.quote("ak", ALL_PCRS_ARG, &n);
    let values = lab.pcr_values(&ALL_PCRS);
    let info = verify::verify_quote(&ak, &attest, &sig, &n, &ALL_PCRS, &values).unwrap();
    assert!(info.safe);
    assert!(info.clock > 0);
    assert_ne!(info.firmware_version, 0);

    let ek = EkIdentity {
        pubhash: "ab".repeat(32),
        trust: EkTrust::Allowlist,
        cert_issuer_cn: None,
        cert_serial_hex: None,
    };
    let selectors: Vec<String> = verify::selectors(&ek, &values)
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(selectors.len(), 9, "{selectors:?}");
    assert_eq!(selectors[0], format!("tpm:ek_pubhash:{}", "ab".repeat(32)));
    // A freshly started swtpm has all of PCRs 0-7 at zero.
    assert_eq!(
        selectors[8],
        format!("tpm:pcr:sha256:7:{}", "00".repeat(32))
    );
}

#[test]
fn good_rsa_quote_passes() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak = lab.ak("ak", "rsa");
    verify::check_ak(&ak).unwrap();
    let n = nonce();
    let (attest, sig) = lab.quote("ak", ALL_PCRS_ARG, &n);
    let values = lab.pcr_values(&ALL_PCRS);
    verify::verify_quote(&ak, &attest, &sig, &n, &ALL_PCRS, &values).unwrap();
}

#[test]
fn quote_with_another_nonce_is_rejected_as_stale() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak = lab.ak("ak", "ecc");
    let (attest, sig) = lab.quote("ak", ALL_PCRS_ARG, &nonce());
    let values = lab.pcr_values(&ALL_PCRS);
    let m = rejection(verify::verify_quote(
        &ak,
        &attest,
        &sig,
        &nonce(),
        &ALL_PCRS,
        &values,
    ));
    assert_eq!(
        m,
        "quote nonce does not match the challenge (stale or replayed quote)"
    );
}

#[test]
fn tampered_missing_or_extra_pcr_values_are_rejected() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak = lab.ak("ak", "ecc");
    let n = nonce();
    let (attest, sig) = lab.quote("ak", ALL_PCRS_ARG, &n);
    let values = lab.pcr_values(&ALL_PCRS);

    let mut tampered = values.clone();
    tampered.get_mut(&3).unwrap()[0] ^= 1;
    let m = rejection(verify::verify_quote(
        &ak, &attest, &sig, &n, &ALL_PCRS, &tampered,
    ));
    assert_eq!(m, "PCR values do not match the quoted digest");

    let mut missing = values.clone();
    missing.remove(&5);
    let m = rejection(verify::verify_quote(
        &ak, &attest, &sig, &n, &ALL_PCRS, &missing,
    ));
    assert_eq!(m, "PCR 5 is in the quote but its value was not reported");

    let mut extra = values.clone();
    extra.insert(9, vec![0; 32]);
    let m = rejection(verify::verify_quote(
        &ak, &attest, &sig, &n, &ALL_PCRS, &extra,
    ));
    assert_eq!(
        m,
        "PCR 9 value was reported but is not in the quote (unauthenticated)"
    );

    let mut short = values.clone();
    short.insert(2, vec![0; 20]);
    let m = rejection(verify::verify_quote(
        &ak, &attest, &sig, &n, &ALL_PCRS, &short,
    ));
    assert_eq!(m, "PCR 2 value is 20 bytes, expected 32 (sha256 bank)");
}

#[test]
fn quote_over_a_different_selection_is_rejected() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak = lab.ak("ak", "ecc");
    let n = nonce();
    // The agent quotes fewer PCRs than the server asked for...
    let (attest, sig) = lab.quote("ak", "sha256:0,1,2", &n);
    let values = lab.pcr_values(&[0, 1, 2]);
    let m = rejection(verify::verify_quote(
        &ak, &attest, &sig, &n, &ALL_PCRS, &values,
    ));
    assert_eq!(
        m,
        "quote covers PCRs sha256:0,1,2, expected exactly sha256:0,1,2,3,4,5,6,7"
    );
    // ...and the same quote passes when that is what was asked for.
    verify::verify_quote(&ak, &attest, &sig, &n, &[0, 1, 2], &values).unwrap();
}

#[test]
fn quote_signed_by_another_ak_or_altered_is_rejected() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak1 = lab.ak("ak1", "ecc");
    lab.ak("ak2", "ecc");
    let n = nonce();
    let (attest, sig) = lab.quote("ak2", ALL_PCRS_ARG, &n);
    let values = lab.pcr_values(&ALL_PCRS);
    let m = rejection(verify::verify_quote(
        &ak1, &attest, &sig, &n, &ALL_PCRS, &values,
    ));
    assert_eq!(m, "quote signature does not verify with the AK");

    // The right AK, but one bit of the signed structure changed (the PCR digest's last byte).
    let (attest, sig) = lab.quote("ak1", ALL_PCRS_ARG, &n);
    let mut altered = attest.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let m = rejection(verify::verify_quote(
        &ak1, &altered, &sig, &n, &ALL_PCRS, &values,
    ));
    assert_eq!(m, "quote signature does not verify with the AK");

    // An RSA AK's quote presented for an ECC AK: the scheme is named.
    let rsa_ak = lab.ak("akr", "rsa");
    let (attest, sig) = lab.quote("akr", ALL_PCRS_ARG, &n);
    let m = rejection(verify::verify_quote(
        &ak1, &attest, &sig, &n, &ALL_PCRS, &values,
    ));
    assert!(m.contains("expected ECDSA for an ECC AK"), "{m}");
    verify::verify_quote(&rsa_ak, &attest, &sig, &n, &ALL_PCRS, &values).unwrap();

    // Trailing bytes after the signature are refused.
    let mut padded = sig.clone();
    padded.push(0);
    let m = rejection(verify::verify_quote(
        &rsa_ak, &attest, &padded, &n, &ALL_PCRS, &values,
    ));
    assert!(m.contains("trailing or non-canonical"), "{m}");
}

#[test]
fn other_hash_algorithms_and_other_attestation_types_are_named() {
    let lab = Lab::new();
    // A signing key without a fixed scheme, so the quote may use SHA-1.
    lab.tool(
        "tpm2_createprimary",
        &[
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc256:null",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
            "-c",
            "key.ctx",
        ],
    );
    lab.tool("tpm2_readpublic", &["-c", "key.ctx", "-o", "key.pub"]);
    let key = public_from_tpm2b(&lab.read("key.pub"));
    let n = nonce();
    let ctx_quote = |hash: &str| {
        lab.tool(
            "tpm2_quote",
            &[
                "-c",
                "key.ctx",
                "-l",
                ALL_PCRS_ARG,
                "-q",
                &hex::encode(&n),
                "-m",
                "q.msg",
                "-s",
                "q.sig",
                "-g",
                hash,
            ],
        );
        (lab.read("q.msg"), lab.read("q.sig"))
    };
    let values = lab.pcr_values(&ALL_PCRS);
    let (attest, sig) = ctx_quote("sha1");
    let m = rejection(verify::verify_quote(
        &key, &attest, &sig, &n, &ALL_PCRS, &values,
    ));
    assert_eq!(m, "quote signed with sha1, expected sha256");

    // A TPM2_Certify structure signed by a real AK is not a quote.
    lab.ek_rsa();
    let ak = lab.ak("ak", "ecc");
    lab.tool(
        "tpm2_certify",
        &[
            "-c",
            "ak.ctx",
            "-C",
            "ak.ctx",
            "-g",
            "sha256",
            "-o",
            "certify.att",
            "-s",
            "certify.sig",
        ],
    );
    let m = rejection(verify::verify_quote(
        &ak,
        &lab.read("certify.att"),
        &lab.read("certify.sig"),
        &n,
        &ALL_PCRS,
        &values,
    ));
    assert_eq!(
        m,
        "attestation is not a quote (type 0x8017, expected TPM_ST_ATTEST_QUOTE 0x8018)"
    );
}

// ---------------------------------------------------------------- AK checks

#[test]
fn non_restricted_signing_key_is_not_an_ak() {
    let lab = Lab::new();
    // A signing key with every AK attribute but `restricted`: it can quote (so the quote
    // itself verifies), but it would also sign any digest, so a "quote" could be forged.
    lab.tool(
        "tpm2_createprimary",
        &[
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc256:ecdsa-sha256",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
            "-c",
            "key.ctx",
        ],
    );
    lab.tool("tpm2_readpublic", &["-c", "key.ctx", "-o", "key.pub"]);
    let key = public_from_tpm2b(&lab.read("key.pub"));
    assert_eq!(rejection(verify::check_ak(&key)), "AK is not restricted");
    let n = nonce();
    let (attest, sig) = lab.quote("key", ALL_PCRS_ARG, &n);
    let values = lab.pcr_values(&ALL_PCRS);
    verify::verify_quote(&key, &attest, &sig, &n, &ALL_PCRS, &values).unwrap();
}

/// `public` with its attributes changed by `f`.
fn with_attributes(public: &Public, f: impl Fn(u32) -> u32) -> Public {
    let changed = ObjectAttributes::from(f(u32::from(public.object_attributes())));
    match public.clone() {
        Public::Ecc {
            name_hashing_algorithm,
            auth_policy,
            parameters,
            unique,
            ..
        } => Public::Ecc {
            object_attributes: changed,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            unique,
        },
        _ => unreachable!("ECC AK expected"),
    }
}

#[test]
fn ak_attribute_checks_name_the_attribute() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak = lab.ak("ak", "ecc");
    verify::check_ak(&ak).unwrap();
    // TPMA_OBJECT bits.
    const FIXED_TPM: u32 = 1 << 1;
    const FIXED_PARENT: u32 = 1 << 4;
    const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    const USER_WITH_AUTH: u32 = 1 << 6;
    const RESTRICTED: u32 = 1 << 16;
    const DECRYPT: u32 = 1 << 17;
    const SIGN: u32 = 1 << 18;
    let cases = [
        (!RESTRICTED, 0, "AK is not restricted"),
        (!SIGN, 0, "AK is not a signing key (sign attribute clear)"),
        (
            !FIXED_TPM,
            0,
            "AK is not fixedTPM (it could be duplicated out of its TPM)",
        ),
        (
            !FIXED_PARENT,
            0,
            "AK is not fixedParent (it could be duplicated to another parent)",
        ),
        (
            !SENSITIVE_DATA_ORIGIN,
            0,
            "AK is not sensitiveDataOrigin (its private key was not generated by the TPM)",
        ),
        (
            !USER_WITH_AUTH,
            0,
            "AK is not userWithAuth (it cannot be used with its auth value)",
        ),
        (
            !0,
            DECRYPT,
            "AK is a decryption key (decrypt attribute set)",
        ),
    ];
    for (keep, add, message) in cases {
        let bad = with_attributes(&ak, |a| (a & keep) | add);
        assert_eq!(rejection(verify::check_ak(&bad)), message);
    }
    // Name algorithm.
    let Public::Ecc {
        object_attributes,
        auth_policy,
        parameters,
        unique,
        ..
    } = ak.clone()
    else {
        unreachable!()
    };
    let sha384_named = Public::Ecc {
        object_attributes,
        name_hashing_algorithm: HashingAlgorithm::Sha384,
        auth_policy,
        parameters,
        unique,
    };
    assert_eq!(
        rejection(verify::check_ak(&sha384_named)),
        "AK name algorithm is sha384, expected sha256"
    );
    // An EK is restricted but a decryption key, not a signing key.
    let ek = lab.ek_rsa();
    assert_eq!(
        rejection(verify::check_ak(&ek)),
        "AK is not a signing key (sign attribute clear)"
    );
    // The P-384 EK: same.
    assert!(verify::check_ak(&lab.ek_p384()).is_err());
}

#[test]
fn name_of_matches_tpm2_createak_name() {
    let lab = Lab::new();
    lab.ek_rsa();
    for (name, alg) in [("ake", "ecc"), ("akr", "rsa")] {
        let ak = lab.ak(name, alg);
        assert_eq!(
            verify::name_of(&ak).unwrap(),
            lab.read(&format!("{name}.name"))
        );
    }
}

#[test]
fn parse_public_refuses_trailing_bytes_and_the_tpm2b_form() {
    let lab = Lab::new();
    lab.ek_rsa();
    let tpm2b = lab.read("ek.pub");
    let mut trailing = tpm2b[2..].to_vec();
    trailing.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        rejection(verify::parse_public(&trailing)),
        "public area has 3 trailing bytes after the TPMT_PUBLIC"
    );
    let m = rejection(verify::parse_public_as("EK public area", &tpm2b));
    assert!(
        m.starts_with("EK public area is not a valid TPMT_PUBLIC"),
        "{m}"
    );
    assert!(m.contains("strip"), "{m}");
}

// ---------------------------------------------------------------- EK hash and trust

#[test]
fn ek_pubhash_matches_the_documented_tpm2_tools_and_openssl_recipes() {
    let lab = Lab::new();
    let ek = lab.ek_rsa();
    let hash = verify::ek_pubhash(&ek).unwrap();

    // tpm2_readpublic -f der writes the SubjectPublicKeyInfo: the same bytes we build.
    lab.tool(
        "tpm2_readpublic",
        &["-c", "0x81010001", "-f", "der", "-o", "ek.der"],
    );
    let der = lab.read("ek.der");
    assert_eq!(verify::public_key_spki_der(&ek).unwrap(), der);
    let out = sh("sha256sum ek.der", lab.dir.path());
    assert_eq!(out.split_whitespace().next().unwrap(), hash);
    // The transient EK tpm2_createek made from the default template is the same key.
    lab.tool(
        "tpm2_readpublic",
        &["-c", "ek.ctx", "-f", "der", "-o", "ek-ctx.der"],
    );
    assert_eq!(lab.read("ek-ctx.der"), der);

    // From the EK certificate with OpenSSL.
    let cert = lab.nv_cert(NV_EK_CERT_RSA2048);
    std::fs::write(lab.path("ekcert.der"), &cert).unwrap();
    let out = sh(
        "openssl x509 -inform DER -in ekcert.der -pubkey -noout \
         | openssl pkey -pubin -outform DER | sha256sum",
        lab.dir.path(),
    );
    assert_eq!(out.split_whitespace().next().unwrap(), hash);

    // P-384: the EC SubjectPublicKeyInfo is byte-identical too.
    let ek384 = lab.ek_p384();
    lab.tool(
        "tpm2_readpublic",
        &["-c", "0x81010016", "-f", "der", "-o", "ek384.der"],
    );
    let der384 = lab.read("ek384.der");
    assert_eq!(verify::public_key_spki_der(&ek384).unwrap(), der384);
    assert_eq!(
        verify::ek_pubhash(&ek384).unwrap(),
        hex::encode(Sha256::digest(&der384))
    );
}

#[test]
fn ek_cert_chains_to_the_lab_root_through_a_configured_intermediate() {
    let lab = Lab::new();
    let ek = lab.ek_rsa();
    let cert = lab.nv_cert(NV_EK_CERT_RSA2048);
    let (root, inter) = lab_ca();
    assert!(verify::is_self_signed(&root));
    assert!(!verify::is_self_signed(&inter));
    let policy = EkPolicy::new(vec![root.clone()], vec![inter.clone()], vec![]).unwrap();
    let id = verify::verify_ek(&policy, &ek, Some(&cert), &[], now()).unwrap();
    assert_eq!(id.trust, EkTrust::Certificate);
    assert_eq!(id.pubhash, verify::ek_pubhash(&ek).unwrap());
    assert_eq!(id.cert_issuer_cn.as_deref(), Some("swtpm-localca"));
    // The serial as OpenSSL prints it.
    std::fs::write(lab.path("ekcert.der"), &cert).unwrap();
    let serial = sh(
        "openssl x509 -inform DER -in ekcert.der -noout -serial",
        lab.dir.path(),
    );
    let serial = serial
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase();
    let expected = serial.trim_start_matches("00");
    assert_eq!(id.cert_serial_hex.as_deref(), Some(expected));

    let selectors: Vec<String> = verify::selectors(&id, &BTreeMap::new())
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        selectors,
        [
            format!("tpm:ek_pubhash:{}", id.pubhash),
            "tpm:ek_cert_issuer_cn:swtpm-localca".to_owned(),
            format!("tpm:ek_cert_serial:{expected}"),
        ]
    );
    assert!(selectors.iter().all(|s| s.starts_with(SELECTOR_TYPE)));

    // The intermediate may come from the agent (NV) instead of the configuration.
    let from_agent = EkPolicy::new(vec![root.clone()], vec![], vec![]).unwrap();
    let id = verify::verify_ek(
        &from_agent,
        &ek,
        Some(&cert),
        std::slice::from_ref(&inter),
        now(),
    )
    .unwrap();
    assert_eq!(id.trust, EkTrust::Certificate);

    // Without the intermediate, nothing issued the EK certificate.
    let m = rejection(verify::verify_ek(&from_agent, &ek, Some(&cert), &[], now()));
    assert!(
        m.contains("no configured root or intermediate is its issuer \"CN=swtpm-localca\""),
        "{m}"
    );

    // The intermediate as the only "root" is a trust anchor: accepted (it is configured).
    let inter_as_root = EkPolicy::new(vec![inter.clone()], vec![], vec![]).unwrap();
    verify::verify_ek(&inter_as_root, &ek, Some(&cert), &[], now()).unwrap();

    // Before the certificates were issued (1970), nothing is valid.
    let m = rejection(verify::verify_ek(&policy, &ek, Some(&cert), &[], 0));
    assert!(m.contains("the EK certificate is not valid at"), "{m}");

    // NV padding after the certificate is ignored.
    let mut padded = cert.clone();
    padded.extend_from_slice(&[0xff; 16]);
    verify::verify_ek(&policy, &ek, Some(&padded), &[], now()).unwrap();
}

#[test]
fn the_ek_cache_answers_a_verified_chain_again_and_only_that_one() {
    use tss_esapi::traits::Marshall as _;
    let lab = Lab::new();
    let ek = lab.ek_rsa();
    let ek_bytes = ek.marshall().unwrap();
    let cert = lab.nv_cert(NV_EK_CERT_RSA2048);
    let (root, inter) = lab_ca();
    let policy = EkPolicy::new(vec![root.clone()], vec![], vec![]).unwrap();
    let cache = verify::EkCache::default();
    let chain = std::slice::from_ref(&inter);
    // A failure is not remembered.
    let m = rejection(cache.verify(&policy, &ek_bytes, &ek, Some(&cert), &[], now()));
    assert!(
        m.contains("no configured root or intermediate is its issuer"),
        "{m}"
    );
    assert!(cache.is_empty());
    let first = cache
        .verify(&policy, &ek_bytes, &ek, Some(&cert), chain, now())
        .unwrap();
    assert_eq!(
        first,
        verify::verify_ek(&policy, &ek, Some(&cert), chain, now()).unwrap()
    );
    assert_eq!(cache.len(), 1);
    // Again: the same answer, from the cache.
    let again = cache
        .verify(&policy, &ek_bytes, &ek, Some(&cert), chain, now())
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(cache.len(), 1);
    // The same certificate without the intermediate is another question: refused.
    let m = rejection(cache.verify(&policy, &ek_bytes, &ek, Some(&cert), &[], now()));
    assert!(
        m.contains("no configured root or intermediate is its issuer"),
        "{m}"
    );
    // The certificate presented with another EK: refused, cached chain or not.
    let other = lab.ek_p384();
    let other_bytes = other.marshall().unwrap();
    rejection(cache.verify(&policy, &other_bytes, &other, Some(&cert), chain, now()));
    // Before the time it was verified at (a clock set back) the entry is not used: the
    // chain is checked again, and refused (1970: before the certificates).
    let m = rejection(cache.verify(&policy, &ek_bytes, &ek, Some(&cert), chain, 0));
    assert!(m.contains("is not valid at"), "{m}");
    assert!(cache.is_empty(), "the entry is dropped");
    cache
        .verify(&policy, &ek_bytes, &ek, Some(&cert), chain, now())
        .unwrap();
    // Past the end of the chain's validity (swtpm's certificates end in 9999) the entry
    // is not used: the chain is checked again, and refused.
    let far = 253_402_300_800; // 10000-01-01
    let m = rejection(cache.verify(&policy, &ek_bytes, &ek, Some(&cert), chain, far));
    assert!(
        m.contains("is not valid at") || m.contains("out of range"),
        "{m}"
    );
    assert!(cache.is_empty(), "the lapsed entry is dropped");
}

#[test]
fn another_manufacturers_root_with_the_same_name_does_not_verify() {
    let lab = Lab::new();
    let ek = lab.ek_rsa();
    let cert = lab.nv_cert(NV_EK_CERT_RSA2048);
    let (_, inter) = lab_ca();
    // A second lab CA: same names (CN=swtpm-localca-rootca), different keys.
    let other = TpmManufacturer::new().unwrap();
    let other_root =
        verify::certificates_from_pem_or_der(&std::fs::read(other.ek_ca_root()).unwrap()).unwrap();
    let policy = EkPolicy::new(other_root, vec![inter], vec![]).unwrap();
    let m = rejection(verify::verify_ek(&policy, &ek, Some(&cert), &[], now()));
    assert!(
        m.contains(
            "signature on \"CN=swtpm-localca\" does not verify with the key of \"CN=swtpm-localca-rootca\""
        ),
        "{m}"
    );
}

#[test]
fn p384_ek_cert_chains_too() {
    let lab = Lab::new();
    let ek = lab.ek_p384();
    let cert = lab.nv_cert(NV_EK_CERT_ECC_P384);
    let (root, inter) = lab_ca();
    let policy = EkPolicy::new(vec![root], vec![inter], vec![]).unwrap();
    let id = verify::verify_ek(&policy, &ek, Some(&cert), &[], now()).unwrap();
    assert_eq!(id.trust, EkTrust::Certificate);
    assert_eq!(id.cert_issuer_cn.as_deref(), Some("swtpm-localca"));
}

#[test]
fn unknown_ek_is_not_trusted_with_an_empty_policy() {
    let lab = Lab::new();
    let ek = lab.ek_rsa();
    let cert = lab.nv_cert(NV_EK_CERT_RSA2048);
    let hash = verify::ek_pubhash(&ek).unwrap();
    let empty = EkPolicy::default();
    let m = rejection(verify::verify_ek(&empty, &ek, Some(&cert), &[], now()));
    assert_eq!(
        m,
        format!(
            "EK is not trusted: its certificate does not chain to a configured manufacturer \
             root and its hash {hash} is not on the allowlist (no manufacturer root is configured)"
        )
    );
    let m = rejection(verify::verify_ek(&empty, &ek, None, &[], now()));
    assert_eq!(
        m,
        format!(
            "EK is not trusted: it has no certificate and its hash {hash} is not on the allowlist"
        )
    );
    // Garbage instead of a certificate.
    let m = rejection(verify::verify_ek(
        &empty,
        &ek,
        Some(b"not a cert"),
        &[],
        now(),
    ));
    assert!(m.contains("cannot be parsed as X.509"), "{m}");
}

#[test]
fn allowlisted_ek_is_trusted_without_a_certificate() {
    let lab = Lab::new();
    let ek = lab.ek_rsa();
    let hash = verify::ek_pubhash(&ek).unwrap();
    let policy = EkPolicy::new(vec![], vec![], vec![hash.to_ascii_uppercase()]).unwrap();
    let id = verify::verify_ek(&policy, &ek, None, &[], now()).unwrap();
    assert_eq!(
        id,
        EkIdentity {
            pubhash: hash.clone(),
            trust: EkTrust::Allowlist,
            cert_issuer_cn: None,
            cert_serial_hex: None,
        }
    );
    // With its (unchained, here) certificate: still the allowlist, and no selector from
    // the unverified certificate.
    let cert = lab.nv_cert(NV_EK_CERT_RSA2048);
    let id = verify::verify_ek(&policy, &ek, Some(&cert), &[], now()).unwrap();
    assert_eq!(id.trust, EkTrust::Allowlist);
    assert_eq!(id.cert_issuer_cn, None);
    let selectors = verify::selectors(&id, &BTreeMap::new()).unwrap();
    assert_eq!(selectors.len(), 1);

    // Config errors are PluginConfig.
    let e = EkPolicy::new(vec![], vec![], vec!["xyz".into()]).unwrap_err();
    assert!(matches!(e, Error::PluginConfig { .. }), "{e}");
    let e = EkPolicy::new(vec![b"junk".to_vec()], vec![], vec![]).unwrap_err();
    assert!(matches!(e, Error::PluginConfig { .. }), "{e}");
}

#[test]
fn certificate_for_another_key_is_rejected_even_when_allowlisted() {
    let lab = Lab::new();
    let ek384 = lab.ek_p384();
    let rsa_cert = lab.nv_cert(NV_EK_CERT_RSA2048);
    let (root, inter) = lab_ca();
    let hash = verify::ek_pubhash(&ek384).unwrap();
    let policy = EkPolicy::new(vec![root], vec![inter], vec![hash]).unwrap();
    let m = rejection(verify::verify_ek(
        &policy,
        &ek384,
        Some(&rsa_cert),
        &[],
        now(),
    ));
    assert_eq!(
        m,
        "EK certificate's public key does not match the EK public area \
         (certificate has an RSA key, public area is ECC)"
    );
    // Same algorithm, different key: the RSA EK certificate presented with an RSA AK.
    lab.ek_rsa();
    let rsa_ak = lab.ak("ak", "rsa");
    let m = rejection(verify::verify_ek(
        &EkPolicy::default(),
        &rsa_ak,
        Some(&rsa_cert),
        &[],
        now(),
    ));
    assert_eq!(
        m,
        "EK certificate's public key does not match the EK public area (different RSA modulus)"
    );
}

// ---------------------------------------------------------------- clock

fn clock(clock: u64, reset_count: u32, restart_count: u32) -> QuoteInfo {
    QuoteInfo {
        clock,
        reset_count,
        restart_count,
        safe: true,
        firmware_version: 1,
    }
}

#[test]
fn clock_checks() {
    // First sighting: anything goes.
    verify::check_clock(None, &clock(5, 0, 0)).unwrap();
    // Time passes; a restart; a reset (the clock may then be lower: it is saved lazily).
    verify::check_clock(Some(&clock(1000, 5, 2)), &clock(2000, 5, 2)).unwrap();
    verify::check_clock(Some(&clock(1000, 5, 2)), &clock(2000, 5, 3)).unwrap();
    verify::check_clock(Some(&clock(1000, 5, 2)), &clock(10, 6, 0)).unwrap();

    let m = rejection(verify::check_clock(
        Some(&clock(1000, 5, 0)),
        &clock(2000, 3, 0),
    ));
    assert_eq!(
        m,
        "TPM resetCount went backwards (5 → 3): replayed or rolled-back state"
    );
    let m = rejection(verify::check_clock(
        Some(&clock(1000, 5, 4)),
        &clock(2000, 5, 1),
    ));
    assert_eq!(
        m,
        "TPM restartCount went backwards (4 → 1) with the same resetCount (5): \
         replayed or rolled-back state"
    );
    let m = rejection(verify::check_clock(
        Some(&clock(1000, 5, 1)),
        &clock(1000, 5, 1),
    ));
    assert_eq!(
        m,
        "TPM clock did not advance (1000 → 1000 ms) with the same resetCount (5): \
         replayed or rolled-back state"
    );
    assert!(verify::check_clock(Some(&clock(1000, 5, 1)), &clock(999, 5, 2)).is_err());
}

#[test]
fn two_real_quotes_pass_the_clock_check_in_order_only() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak = lab.ak("ak", "ecc");
    let values = lab.pcr_values(&ALL_PCRS);
    let n1 = nonce();
    let (a1, s1) = lab.quote("ak", ALL_PCRS_ARG, &n1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let n2 = nonce();
    let (a2, s2) = lab.quote("ak", ALL_PCRS_ARG, &n2);
    let q1 = verify::verify_quote(&ak, &a1, &s1, &n1, &ALL_PCRS, &values).unwrap();
    let q2 = verify::verify_quote(&ak, &a2, &s2, &n2, &ALL_PCRS, &values).unwrap();
    verify::check_clock(Some(&q1), &q2).unwrap();
    assert!(verify::check_clock(Some(&q2), &q1).is_err());
}

// ---------------------------------------------------------------- PCR policy

#[test]
fn pcr_policy_matches_then_fails_after_pcrextend() {
    let lab = Lab::new();
    lab.ek_rsa();
    let ak = lab.ak("ak", "ecc");
    let zero = "00".repeat(32);
    let config = BTreeMap::from([
        ("7".to_owned(), vec![zero.clone()]),
        (
            "0".to_owned(),
            vec![format!("0x{}", "AA".repeat(32)), zero.clone()],
        ),
    ]);
    let policy = PcrPolicy::from_config(&config).unwrap();
    assert_eq!(policy.pcrs(), [0, 7]);

    let n = nonce();
    let (attest, sig) = lab.quote("ak", ALL_PCRS_ARG, &n);
    let values = lab.pcr_values(&ALL_PCRS);
    verify::verify_quote(&ak, &attest, &sig, &n, &ALL_PCRS, &values).unwrap();
    verify::check_pcr_policy(&policy, &values).unwrap();

    // Measure something new into PCR 7 (Secure Boot policy on a PC).
    lab.tool(
        "tpm2_pcrextend",
        &[&format!("7:sha256={}", "ab".repeat(32))],
    );
    let n = nonce();
    let (attest, sig) = lab.quote("ak", ALL_PCRS_ARG, &n);
    let values = lab.pcr_values(&ALL_PCRS);
    verify::verify_quote(&ak, &attest, &sig, &n, &ALL_PCRS, &values).unwrap();
    let extended = hex::encode(Sha256::digest([vec![0u8; 32], vec![0xab; 32]].concat()));
    assert_eq!(hex::encode(&values[&7]), extended);
    let m = rejection(verify::check_pcr_policy(&policy, &values));
    assert_eq!(
        m,
        format!("PCR 7 has value {extended}, not one of the allowed values")
    );

    // The new value, once allowed, passes.
    let config = BTreeMap::from([("7".to_owned(), vec![zero.clone(), extended.clone()])]);
    verify::check_pcr_policy(&PcrPolicy::from_config(&config).unwrap(), &values).unwrap();

    // A PCR the policy needs but the quote lacks.
    let only_0_to_3: BTreeMap<u8, Vec<u8>> = values
        .iter()
        .filter(|(i, _)| **i < 4)
        .map(|(i, v)| (*i, v.clone()))
        .collect();
    let m = rejection(verify::check_pcr_policy(&policy, &only_0_to_3));
    assert_eq!(m, "PCR 7 is required by the PCR policy but was not quoted");
}

#[test]
fn pcr_policy_config_errors_name_the_entry() {
    let bad = |k: &str, v: &[&str]| {
        let config = BTreeMap::from([(k.to_owned(), v.iter().map(|s| s.to_string()).collect())]);
        match PcrPolicy::from_config(&config) {
            Err(Error::PluginConfig { reason, .. }) => reason,
            other => panic!("expected PluginConfig, got {other:?}"),
        }
    };
    assert!(bad("24", &[&"00".repeat(32)]).contains("\"24\" is not a PCR index"));
    assert!(bad("x", &[&"00".repeat(32)]).contains("is not a PCR index"));
    assert!(bad("7", &["abcd"]).contains("PCR 7: \"abcd\" is not a SHA-256 value"));
    assert!(bad("7", &[]).contains("PCR 7 has no allowed values"));
    let dup = BTreeMap::from([
        ("7".to_owned(), vec!["00".repeat(32)]),
        ("07".to_owned(), vec!["00".repeat(32)]),
    ]);
    assert!(PcrPolicy::from_config(&dup).is_err());

    let values = BTreeMap::from([(1u8, "ab".repeat(32)), (2u8, "zz".into())]);
    assert_eq!(
        rejection(verify::parse_pcr_values(&values)),
        "PCR 2 value is not 64 hex digits"
    );
}
