//! The Carapace lab: SoftHSM2 tokens, swtpm TPMs manufactured with EK certificates and an
//! MIT Kerberos realm, each in a temporary directory on free loopback ports, plus an SSH
//! CA with a certified host key ([`ssh`]), a small tmpfs to fill up ([`tmpfs`]), a
//! throwaway PostgreSQL cluster ([`postgres`]), files no config reader may hang on
//! ([`operator_files`]), a look at a running Envoy from outside ([`envoy`]: its
//! admin `/certs`), and TCG boot event logs with the PCR values they imply
//! ([`eventlog`]). Tests, the benchmarks and the `carapace-lab` binary share it.
//! A missing package is an error naming the exact `apt-get install` line, never a silent
//! skip.
//!
//! Every daemon is a [`process::Child`]: stopped by its own pid when its fixture is
//! dropped, its log printed to stderr (which the test harness shows with the failure)
//! when the drop happens during a panic. Nothing changes the test process's environment:
//! each fixture hands out the variables its clients need (`envs()`), to be set on the
//! child processes a test starts.
//!
//! # In a test
//!
//! ```no_run
//! use hsm_sim::kdc::Kdc;
//! use hsm_sim::swtpm::{Swtpm, TpmManufacturer};
//!
//! # fn main() -> hsm_sim::Result<()> {
//! // One manufactured TPM per test binary (about 1 s, once); each test gets its own
//! // swtpm on a copy of it (about 30 ms), so tests never share TPM object slots.
//! let tpm = Swtpm::start(TpmManufacturer::shared()?)?;
//! let tcti = tpm.tcti(); // "swtpm:host=127.0.0.1,port=N": for tss-esapi or TPM2TOOLS_TCTI
//! let ek_roots = TpmManufacturer::shared()?.ek_ca_root(); // the server's EK trust anchor
//!
//! // A realm per test (about 60 ms with both keytabs): a node and a service principal.
//! let kdc = Kdc::start("LAB.TEST")?;
//! let principals = kdc.provision_host_and_service()?;
//! let mut kinit = std::process::Command::new("kinit");
//! kinit.envs(kdc.envs()).arg("-kt").arg(&principals.host_keytab).arg(&principals.host);
//! # let _ = (tcti, ek_roots);
//! # Ok(())
//! # }
//! ```
//!
//! A fixture that fails to start returns [`Error::NotReady`] with its log, or
//! [`Error::MissingPackage`] with the install line; tests propagate it (`?` or
//! `unwrap()`), they never skip.
//!
//! # For a person
//!
//! `carapace-lab up [--dir DIR]` starts the same fixtures as daemons that outlive the
//! command, writes a server and an agent config that use them, and prints how to use
//! them; `carapace-lab down` stops exactly the processes `up` recorded ([`lab`]).

pub mod envoy;
mod error;
pub mod eventlog;
pub mod kdc;
pub mod lab;
pub mod operator_files;
pub mod postgres;
pub mod process;
pub mod softhsm;
pub mod ssh;
pub mod swtpm;
pub mod tls;
pub mod tmpfs;

pub use error::{Error, Result};

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` and its missing parents with mode 0700. An existing directory is left
/// as it is.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Writes `text` to `path` (created or truncated).
pub(crate) fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Sets the permission bits of `path`.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))
}
