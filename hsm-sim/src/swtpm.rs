//! Software TPMs (swtpm) with real EK certificates from a lab EK CA.
//!
//! [`TpmManufacturer`] plays the TPM vendor once per lab: it creates an EK CA (root and
//! intermediate, `swtpm_localca` with a private config: nothing under /etc or
//! /var/lib/swtpm-localca is read or written) and manufactures one TPM state with an
//! RSA-2048 and a P-384 EK, their certificates in NV, and a platform certificate. Each
//! [`Swtpm`] copies that state and serves it on two free loopback ports, so every copy
//! has the same EKs and EK certificates.
//!
//! swtpm has no resource manager and only three transient object slots: flush after use
//! ([`Swtpm::flush_transient`]) or give each test its own instance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{self, Child, Detached, ProcessGroup, require};
use crate::{Error, Result};

/// The Debian packages that provide `swtpm`, `swtpm_setup` and `swtpm_localca`.
pub const SWTPM_PACKAGES: &str = "swtpm swtpm-tools";
/// The Debian package that provides `tpm2_getrandom`, `tpm2_nvread`, ...
pub const TPM2_TOOLS_PACKAGE: &str = "tpm2-tools";

/// NV index of the RSA-2048 EK certificate.
pub const NV_EK_CERT_RSA2048: u32 = 0x01c0_0002;
/// NV index of the ECC EK certificate: swtpm 0.7.1 makes a **P-384** EK (the P-256 index
/// 0x01c0000a does not exist).
pub const NV_EK_CERT_ECC_P384: u32 = 0x01c0_0016;
/// NV index of the platform certificate.
pub const NV_PLATFORM_CERT: u32 = 0x01c0_8000;

/// How long a started swtpm gets to answer `tpm2_getrandom`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts with fresh ports when swtpm exits at start (a port taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// The lab's TPM vendor: an EK CA and a manufactured TPM state to copy.
///
/// Layout of its directory: `conf/` (swtpm_setup and swtpm_localca configs), `ca/` (the
/// EK CA, private keys included; mode 0700), `template/` (the manufactured state),
/// `manufacture.log` (what swtpm_setup printed).
#[derive(Debug)]
pub struct TpmManufacturer {
    dir: PathBuf,
    _tmp: Option<TempDir>,
}

impl TpmManufacturer {
    /// Manufactures in a new temporary directory, removed on drop.
    pub fn new() -> Result<TpmManufacturer> {
        let tmp = tempfile::Builder::new()
            .prefix("carapace-tpm-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let mut m = TpmManufacturer::in_dir(tmp.path())?;
        m._tmp = Some(tmp);
        Ok(m)
    }

    /// Manufactures in `dir` (created if missing, kept). An EK CA already in `dir/ca` is
    /// reused; the template state is made anew.
    pub fn in_dir(dir: &Path) -> Result<TpmManufacturer> {
        let swtpm_setup = require("swtpm_setup", SWTPM_PACKAGES)?;
        let localca = require("swtpm_localca", SWTPM_PACKAGES)?;
        require("swtpm", SWTPM_PACKAGES)?;
        let m = TpmManufacturer {
            dir: dir.to_owned(),
            _tmp: None,
        };
        for d in [
            &m.dir,
            &m.conf_dir(),
            &m.ca_dir(),
            &m.template(),
            &m.tmp_dir(),
        ] {
            crate::private_dir(d)?;
        }
        // swtpm_localca reads `key = value` lines; swtpm_setup passes the files as
        // arguments. No variable expansion anywhere, so every path is written out.
        let ca = m.ca_dir();
        let localca_conf = m.conf_dir().join("swtpm-localca.conf");
        crate::write_file(
            &localca_conf,
            &format!(
                "statedir = {}\nsigningkey = {}\nissuercert = {}\ncertserial = {}\n",
                ca.display(),
                ca.join("signkey.pem").display(),
                m.ek_ca_intermediate().display(),
                ca.join("certserial").display(),
            ),
        )?;
        let localca_options = m.conf_dir().join("swtpm-localca.options");
        crate::write_file(
            &localca_options,
            "--platform-manufacturer Carapace-Lab\n--platform-version 2.1\n--platform-model swtpm\n",
        )?;
        let setup_conf = m.conf_dir().join("swtpm_setup.conf");
        crate::write_file(
            &setup_conf,
            &format!(
                "create_certs_tool = {}\ncreate_certs_tool_config = {}\n\
                 create_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                localca.display(),
                localca_conf.display(),
                localca_options.display(),
            ),
        )?;
        let mut cmd = Command::new(swtpm_setup);
        cmd.arg("--tpm2")
            .arg("--tpmstate")
            .arg(m.template())
            .arg("--config")
            .arg(&setup_conf)
            .args([
                "--create-ek-cert",
                "--create-platform-cert",
                "--pcr-banks",
                "sha256",
                "--overwrite",
                "--display",
            ])
            // swtpm_setup makes (and removes) a swtpm_setup.certs.* folder in TMPDIR.
            .env("TMPDIR", m.tmp_dir());
        let output = process::run(&mut cmd, None)?;
        crate::write_file(&m.dir.join("manufacture.log"), &process::combined(&output))?;
        for cert in [m.ek_ca_root(), m.ek_ca_intermediate()] {
            if !cert.is_file() {
                return Err(Error::Other(format!(
                    "swtpm_setup succeeded but made no {}",
                    cert.display()
                )));
            }
        }
        Ok(m)
    }

    /// One manufacturer per test process, made on first use in a temporary directory.
    ///
    /// The directory is never removed (statics are not dropped): a few tens of kilobytes
    /// under `$TMPDIR/carapace-tpm-*` per test binary run.
    pub fn shared() -> Result<&'static TpmManufacturer> {
        static SHARED: OnceLock<TpmManufacturer> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(m) = SHARED.get() {
            return Ok(m);
        }
        let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = SHARED.get() {
            return Ok(m);
        }
        let m = TpmManufacturer::new()?;
        Ok(SHARED.get_or_init(|| m))
    }

    /// The manufacturer's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The EK CA's self-signed root certificate (PEM): the trust anchor a server is
    /// configured with to accept this lab's TPMs.
    pub fn ek_ca_root(&self) -> PathBuf {
        self.ca_dir().join("swtpm-localca-rootca-cert.pem")
    }

    /// The EK CA's intermediate certificate (PEM), which signs the EK certificates.
    pub fn ek_ca_intermediate(&self) -> PathBuf {
        self.ca_dir().join("issuercert.pem")
    }

    /// The manufactured TPM state every [`Swtpm`] starts from.
    pub fn template(&self) -> PathBuf {
        self.dir.join("template")
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    fn conf_dir(&self) -> PathBuf {
        self.dir.join("conf")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }
}

/// A running swtpm serving a copy of a manufactured TPM state on loopback TCP.
/// Dropping it stops swtpm (see [`Child`]) and removes its temporary directory, if any.
#[derive(Debug)]
pub struct Swtpm {
    // Field order matters: the daemon is stopped before its directory is removed.
    child: Child,
    port: u16,
    ctrl_port: u16,
    dir: PathBuf,
    tpm2_tools: Tpm2Tools,
    _tmp: Option<TempDir>,
}

/// Paths of the tpm2-tools used to check and clean up a TPM.
#[derive(Debug, Clone)]
struct Tpm2Tools {
    getrandom: PathBuf,
    flushcontext: PathBuf,
}

impl Swtpm {
    /// Starts a swtpm on a copy of `m`'s state in a new temporary directory, in the
    /// caller's process group.
    pub fn start(m: &TpmManufacturer) -> Result<Swtpm> {
        let tmp = tempfile::Builder::new()
            .prefix("carapace-swtpm-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let mut tpm = Swtpm::start_in(m, tmp.path(), ProcessGroup::Inherit)?;
        tpm._tmp = Some(tmp);
        Ok(tpm)
    }

    /// Starts a swtpm in `dir` (created if missing): the state goes to `dir/state`, the
    /// log to `dir/swtpm.log`. Returns once the TPM answers `tpm2_getrandom`.
    pub fn start_in(m: &TpmManufacturer, dir: &Path, group: ProcessGroup) -> Result<Swtpm> {
        let swtpm = require("swtpm", SWTPM_PACKAGES)?;
        let tpm2_tools = Tpm2Tools {
            getrandom: require("tpm2_getrandom", TPM2_TOOLS_PACKAGE)?,
            flushcontext: require("tpm2_flushcontext", TPM2_TOOLS_PACKAGE)?,
        };
        // swtpm's option syntax (`dir=...,key=...`) has no escape for a comma.
        if dir.to_string_lossy().contains(',') {
            return Err(Error::Other(format!(
                "{}: swtpm cannot use a path with a comma",
                dir.display()
            )));
        }
        let state = dir.join("state");
        crate::private_dir(dir)?;
        copy_state(&m.template(), &state)?;
        let log = dir.join("swtpm.log");
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            // The swtpm TCTI talks to the control channel at the TPM port plus one.
            let (port, ctrl_port) = process::free_tcp_port_pair()?;
            let mut cmd = Command::new(&swtpm);
            cmd.args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl_port},bindaddr=127.0.0.1"))
                .args(["--flags", "not-need-init,startup-clear"])
                // The log file is also its stdout and stderr; both append. (swtpm 0.7.1
                // refuses `--log fd=2`.)
                .arg("--log")
                .arg(format!("file={},level=1", log.display()));
            let mut child = Child::spawn("swtpm", &mut cmd, &log, group)?;
            let tcti = tcti(port);
            let ready = process::wait_ready(&mut child, READY_TIMEOUT, || {
                process::tcp_answers(port)?;
                getrandom(&tpm2_tools, &tcti)
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
            match ready {
                Ok(()) => {
                    return Ok(Swtpm {
                        child,
                        port,
                        ctrl_port,
                        dir: dir.to_owned(),
                        tpm2_tools,
                        _tmp: None,
                    });
                }
                // Exited at start: most likely a port taken since we picked it.
                Err(e) if child.try_wait()?.is_some() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Other("swtpm did not start".into())))
    }

    /// The TCTI string for tpm2-tools (`TPM2TOOLS_TCTI`) and tss-esapi:
    /// `swtpm:host=127.0.0.1,port=N`. Always set it explicitly: without one, tpm2-tss
    /// falls back to whatever listens on localhost:2321.
    pub fn tcti(&self) -> String {
        tcti(self.port)
    }

    /// Environment for child processes that use this TPM: `TPM2TOOLS_TCTI`.
    pub fn envs(&self) -> Vec<(String, String)> {
        vec![("TPM2TOOLS_TCTI".into(), self.tcti())]
    }

    /// The TPM command port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The swtpm control port, [`Swtpm::port`] + 1 (`swtpm_ioctl --tcp 127.0.0.1:PORT`).
    pub fn ctrl_port(&self) -> u16 {
        self.ctrl_port
    }

    /// The instance's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The TPM state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The swtpm process's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The swtpm process.
    pub fn child(&self) -> &Child {
        &self.child
    }

    /// Flushes every transient object (`tpm2_flushcontext -t`): swtpm has three slots
    /// and no resource manager, so each tool run that loads a context leaks one.
    pub fn flush_transient(&self) -> Result<()> {
        let mut cmd = Command::new(&self.tpm2_tools.flushcontext);
        cmd.arg("-t").env("TPM2TOOLS_TCTI", self.tcti());
        process::run(&mut cmd, None).map(drop)
    }

    /// 16 random bytes from the TPM, as hex: proof that it answers.
    pub fn getrandom(&self) -> Result<String> {
        getrandom(&self.tpm2_tools, &self.tcti())
    }

    /// Reboots the simulated machine as an OS does: an orderly TPM2_Shutdown(CLEAR)
    /// (`tpm2_shutdown -c`; without it the TPM's clock is reported not safe after the
    /// reset, and a verifier refuses the quote), TPM_Init on the control port
    /// (`swtpm_ioctl -i`), then TPM2_Startup(CLEAR) (`tpm2_startup -c`). The PCRs go back
    /// to their reset values; the persistent state (EKs, NV, hierarchies' seeds) stays,
    /// so another boot log can be extended into the same TPM. Transient objects and
    /// sessions are gone.
    pub fn power_cycle(&self) -> Result<()> {
        let ioctl = require("swtpm_ioctl", SWTPM_PACKAGES)?;
        let startup = require("tpm2_startup", TPM2_TOOLS_PACKAGE)?;
        let shutdown = require("tpm2_shutdown", TPM2_TOOLS_PACKAGE)?;
        let mut cmd = Command::new(shutdown);
        cmd.arg("-c").env("TPM2TOOLS_TCTI", self.tcti());
        process::run(&mut cmd, None)?;
        let mut cmd = Command::new(ioctl);
        cmd.arg("--tcp")
            .arg(format!("127.0.0.1:{}", self.ctrl_port))
            .arg("-i");
        process::run(&mut cmd, None)?;
        let mut cmd = Command::new(startup);
        cmd.arg("-c").env("TPM2TOOLS_TCTI", self.tcti());
        process::run(&mut cmd, None).map(drop)
    }

    /// The sha256 bank's values of `pcrs` (`tpm2_pcrread`): PCR index → 32 bytes.
    pub fn pcrs_sha256(&self, pcrs: &[u8]) -> Result<BTreeMap<u8, Vec<u8>>> {
        let pcrread = require("tpm2_pcrread", TPM2_TOOLS_PACKAGE)?;
        let list: Vec<String> = pcrs.iter().map(u8::to_string).collect();
        let mut cmd = Command::new(pcrread);
        cmd.arg(format!("sha256:{}", list.join(",")))
            .env("TPM2TOOLS_TCTI", self.tcti());
        let out = process::run(&mut cmd, None)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut values = BTreeMap::new();
        // "  sha256:" then "    4 : 0x8E9C…" per PCR.
        for line in text.lines() {
            let Some((index, value)) = line.split_once(" : 0x") else {
                continue;
            };
            let bad = || Error::Other(format!("tpm2_pcrread printed {line:?}"));
            let index: u8 = index.trim().parse().map_err(|_| bad())?;
            let value = value.trim();
            if value.len() != 64 || !value.is_ascii() {
                return Err(bad());
            }
            let bytes = (0..32)
                .map(|i| u8::from_str_radix(&value[2 * i..2 * i + 2], 16))
                .collect::<std::result::Result<Vec<u8>, _>>()
                .map_err(|_| bad())?;
            values.insert(index, bytes);
        }
        if values.len() != pcrs.len() {
            return Err(Error::Other(format!(
                "tpm2_pcrread gave {} values for {} PCRs: {text}",
                values.len(),
                pcrs.len()
            )));
        }
        Ok(values)
    }

    /// Leaves swtpm running after this process exits (`carapace-lab up`); its directory
    /// is kept even if it was a temporary one.
    pub fn detach(self) -> Detached {
        if let Some(tmp) = self._tmp {
            let _ = tmp.keep();
        }
        self.child.detach()
    }
}

fn tcti(port: u16) -> String {
    format!("swtpm:host=127.0.0.1,port={port}")
}

fn getrandom(tools: &Tpm2Tools, tcti: &str) -> Result<String> {
    let mut cmd = Command::new(&tools.getrandom);
    cmd.args(["--hex", "16"]).env("TPM2TOOLS_TCTI", tcti);
    let out = process::run(&mut cmd, None)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Copies the manufactured state files (not swtpm's `.lock`) into a new state dir.
fn copy_state(template: &Path, state: &Path) -> Result<()> {
    crate::private_dir(state)?;
    let entries = std::fs::read_dir(template).map_err(|e| Error::io(template, e))?;
    let mut copied = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(template, e))?;
        let name = entry.file_name();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !is_file || name == ".lock" {
            continue;
        }
        let to = state.join(&name);
        std::fs::copy(entry.path(), &to).map_err(|e| Error::io(&to, e))?;
        copied += 1;
    }
    if copied == 0 {
        return Err(Error::Other(format!(
            "{}: no manufactured TPM state",
            template.display()
        )));
    }
    Ok(())
}
