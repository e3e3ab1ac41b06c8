//! SoftHSM2 tokens in a private token directory (`SOFTHSM2_CONF`).
//!
//! A [`SoftHsm`] owns a directory holding `softhsm2.conf` and `tokens/` (mode 0700); every
//! `softhsm2-util` call gets `SOFTHSM2_CONF` in its own environment only, so the process
//! environment is never changed. [`SoftHsm::init_token`] initialises a token with random
//! PINs and writes the user PIN to `<dir>/<label>.pin` (mode 0600).
//!
//! SoftHSM reads `SOFTHSM2_CONF` from the process environment at `C_Initialize`, so a test
//! that loads the module in-process must run in a process started with that variable set:
//! [`softhsm_test`] re-runs the calling test in a child process that has it.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Where Debian's `softhsm2` package puts the PKCS#11 module, in the order looked at.
pub const MODULE_PATHS: [&str; 2] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

/// The Debian package providing `softhsm2-util` and the module.
const PACKAGE: &str = "softhsm2";

/// The SoftHSM2 PKCS#11 module installed on this machine.
pub fn find_module() -> Result<PathBuf> {
    MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingPackage {
            what: format!(
                "the SoftHSM2 PKCS#11 module ({})",
                MODULE_PATHS.join(" or ")
            ),
            package: PACKAGE,
        })
}

/// A SoftHSM2 installation in a private directory: `softhsm2.conf` and `tokens/`.
pub struct SoftHsm {
    dir: PathBuf,
    conf: PathBuf,
    module: PathBuf,
    // Held for its Drop (removes the directory); None for a caller's directory.
    _temp: Option<tempfile::TempDir>,
}

impl fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftHsm")
            .field("dir", &self.dir)
            .field("conf", &self.conf)
            .field("module", &self.module)
            .field("temporary", &self._temp.is_some())
            .finish()
    }
}

/// An initialised token. `Debug` does not print the PINs.
#[derive(Clone)]
pub struct Token {
    /// The token label.
    pub label: String,
    /// The token serial number, as the token reports it (16 hex digits for SoftHSM2).
    pub serial: String,
    /// The user PIN (16 hex digits).
    pub user_pin: String,
    /// The security officer PIN (16 hex digits).
    pub so_pin: String,
    /// `<dir>/<label>.pin`: the user PIN, mode 0600, no trailing newline.
    pub pin_file: PathBuf,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .field("serial", &self.serial)
            .field("user_pin", &"<redacted>")
            .field("so_pin", &"<redacted>")
            .field("pin_file", &self.pin_file)
            .finish()
    }
}

impl SoftHsm {
    /// A SoftHSM2 installation in a fresh temporary directory, removed on drop.
    pub fn new() -> Result<SoftHsm> {
        let temp = tempfile::Builder::new()
            .prefix("carapace-softhsm-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let mut hsm = Self::in_dir(temp.path())?;
        hsm._temp = Some(temp);
        Ok(hsm)
    }

    /// A SoftHSM2 installation in `dir` (created if missing, kept on drop): writes
    /// `dir/softhsm2.conf` and creates `dir/tokens` with mode 0700. Tokens already in
    /// `dir/tokens` stay.
    pub fn in_dir(dir: &Path) -> Result<SoftHsm> {
        let module = find_module()?;
        softhsm2_util()?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(dir, e))?;
        let dir = fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        let tokens = dir.join("tokens");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tokens)
            .map_err(|e| Error::io(&tokens, e))?;
        // An existing directory keeps its mode with DirBuilder: set it.
        fs::set_permissions(&tokens, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(&tokens, e))?;
        let conf = dir.join("softhsm2.conf");
        let text = format!(
            "# Written by carapace-hsm-sim.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        );
        fs::write(&conf, text).map_err(|e| Error::io(&conf, e))?;
        Ok(SoftHsm {
            dir,
            conf,
            module,
            _temp: None,
        })
    }

    /// The directory holding `softhsm2.conf`, `tokens/` and the PIN files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The token directory (`<dir>/tokens`).
    pub fn token_dir(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    /// The SoftHSM2 PKCS#11 module (`libsofthsm2.so`).
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The configuration file, the value of `SOFTHSM2_CONF`.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The environment a child process needs to see these tokens: `SOFTHSM2_CONF`.
    pub fn envs(&self) -> Vec<(String, String)> {
        vec![(
            "SOFTHSM2_CONF".to_owned(),
            self.conf.to_string_lossy().into_owned(),
        )]
    }

    /// A `softhsm2-util` command with `SOFTHSM2_CONF` set for it alone.
    pub fn util_command(&self) -> Command {
        let mut cmd = Command::new("softhsm2-util");
        cmd.env("SOFTHSM2_CONF", &self.conf);
        cmd
    }

    /// Initialises a token labelled `label` in a free slot with random user and SO PINs
    /// (16 hex digits each) and writes the user PIN to `<dir>/<label>.pin` (mode 0600,
    /// no trailing newline).
    pub fn init_token(&self, label: &str) -> Result<Token> {
        if label.is_empty()
            || label.len() > 32
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(Error::Other(format!(
                "token label {label:?} must be 1-32 letters, digits, '-', '_' or '.'"
            )));
        }
        let user_pin = random_hex(8)?;
        let so_pin = random_hex(8)?;
        let mut cmd = self.util_command();
        cmd.args(["--init-token", "--free", "--label", label, "--pin"])
            .arg(&user_pin)
            .arg("--so-pin")
            .arg(&so_pin);
        // The PINs are on this command line; never put them in an error message.
        run(
            cmd,
            &format!("softhsm2-util --init-token --free --label {label} --pin *** --so-pin ***"),
        )?;
        let serial = self.serial_of(label)?;
        let pin_file = self.dir.join(format!("{label}.pin"));
        write_private(&pin_file, user_pin.as_bytes())?;
        Ok(Token {
            label: label.to_owned(),
            serial,
            user_pin,
            so_pin,
            pin_file,
        })
    }

    /// The slots and tokens `softhsm2-util --show-slots` reports under this configuration.
    pub fn show_slots(&self) -> Result<String> {
        let mut cmd = self.util_command();
        cmd.arg("--show-slots");
        run(cmd, "softhsm2-util --show-slots")
    }

    /// The serial number of the initialised token labelled `label`.
    pub fn serial_of(&self, label: &str) -> Result<String> {
        let out = self.show_slots()?;
        parse_slots(&out)
            .into_iter()
            .find(|t| t.label == label)
            .map(|t| t.serial)
            .ok_or_else(|| {
                Error::Other(format!(
                    "token {label:?} not listed by softhsm2-util --show-slots under {}:\n{out}",
                    self.conf.display()
                ))
            })
    }
}

/// A token as `softhsm2-util --show-slots` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedToken {
    /// The token label, padding removed.
    pub label: String,
    /// The token serial number.
    pub serial: String,
}

/// The initialised tokens in `softhsm2-util --show-slots` output.
pub fn parse_slots(show_slots: &str) -> Vec<ListedToken> {
    let mut out = Vec::new();
    let mut serial: Option<String> = None;
    let mut initialized = false;
    for line in show_slots.lines() {
        let line = line.trim();
        if line.starts_with("Slot ") {
            serial = None;
            initialized = false;
        } else if let Some(v) = line.strip_prefix("Serial number:") {
            serial = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("Initialized:") {
            initialized = v.trim() == "yes";
        } else if let Some(v) = line.strip_prefix("Label:")
            && initialized
            && let Some(serial) = serial.take()
        {
            out.push(ListedToken {
                label: v.trim().to_owned(),
                serial,
            });
        }
    }
    out
}

fn softhsm2_util() -> Result<()> {
    match Command::new("softhsm2-util").arg("--version").output() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::MissingPackage {
            what: "softhsm2-util".to_owned(),
            package: PACKAGE,
        }),
        Err(e) => Err(Error::io("softhsm2-util", e)),
    }
}

/// Runs `cmd`; its stdout on success, [`Error::Command`] (named `shown`) otherwise.
fn run(mut cmd: Command, shown: &str) -> Result<String> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingPackage {
                what: "softhsm2-util".to_owned(),
                package: PACKAGE,
            }
        } else {
            Error::io("softhsm2-util", e)
        }
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(Error::Command {
        command: shown.to_owned(),
        status: out.status.to_string(),
        output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    })
}

/// `bytes` random bytes from the kernel, as lowercase hex.
fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::io("/dev/urandom", e))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `data` to `path` with mode 0600 (also when the file existed).
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(path, e))?;
    f.write_all(data).map_err(|e| Error::io(path, e))
}

pub use crate::process::ENV_CHILD;
/// Environment variable holding the module path in the child.
pub const ENV_MODULE: &str = "HSM_SIM_MODULE";
/// Environment variable holding the token label in the child.
pub const ENV_TOKEN_LABEL: &str = "HSM_SIM_TOKEN_LABEL";
/// Environment variable holding the token serial in the child.
pub const ENV_TOKEN_SERIAL: &str = "HSM_SIM_TOKEN_SERIAL";
/// Environment variable holding the PIN file path in the child.
pub const ENV_PIN_FILE: &str = "HSM_SIM_PIN_FILE";
/// Environment variable holding the user PIN in the child (a throwaway test token's).
pub const ENV_USER_PIN: &str = "HSM_SIM_USER_PIN";

/// The token a test sees in its child process (see [`softhsm_test`]). `Debug` does not
/// print the PIN.
#[derive(Clone)]
pub struct ChildToken {
    /// The SoftHSM2 module.
    pub module: PathBuf,
    /// The token label.
    pub label: String,
    /// The token serial number.
    pub serial: String,
    /// The file holding the user PIN (mode 0600, no trailing newline).
    pub pin_file: PathBuf,
    /// The user PIN.
    pub user_pin: String,
    /// The `SOFTHSM2_CONF` this process was started with.
    pub softhsm2_conf: PathBuf,
}

impl fmt::Debug for ChildToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildToken")
            .field("module", &self.module)
            .field("label", &self.label)
            .field("serial", &self.serial)
            .field("pin_file", &self.pin_file)
            .field("user_pin", &"<redacted>")
            .field("softhsm2_conf", &self.softhsm2_conf)
            .finish()
    }
}

impl ChildToken {
    /// The directory holding `softhsm2.conf`, `tokens/` and the PIN file.
    pub fn dir(&self) -> PathBuf {
        self.softhsm2_conf
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// The SoftHSM2 token directory (`<dir>/tokens`).
    pub fn token_dir(&self) -> PathBuf {
        self.dir().join("tokens")
    }
}

/// Runs a test against its own SoftHSM2 token, in a child process that has
/// `SOFTHSM2_CONF` in its environment from the start.
///
/// In a `#[test]`: the first call (the parent) creates a [`SoftHsm`] and a token labelled
/// `label`, runs the current test executable again with
/// `--exact <test_name> --nocapture --test-threads=1 --include-ignored` and the environment
/// `SOFTHSM2_CONF`, `HSM_SIM_CHILD=<test_name>`, `HSM_SIM_MODULE`, `HSM_SIM_TOKEN_LABEL`,
/// `HSM_SIM_TOKEN_SERIAL`, `HSM_SIM_PIN_FILE`, `HSM_SIM_USER_PIN`; prints the child's
/// output and panics unless the child ran exactly that test and it passed; returns `None`.
/// In the child (`HSM_SIM_CHILD == test_name`) it returns the token, read from the
/// environment.
///
/// `test_name` is the name libtest knows: `conformance` for a top-level function in
/// `tests/x.rs`, `tests::conformance` in a unit-test module.
///
/// ```no_run
/// #[test]
/// fn conformance() {
///     let Some(token) = hsm_sim::softhsm::softhsm_test("conformance", "conf") else {
///         return; // the parent: the child ran the test
///     };
///     // ... load token.module, find token.label, log in with token.pin_file ...
/// }
/// ```
#[allow(
    clippy::panic,
    reason = "a test helper: a failed child or a missing fixture must fail the calling test"
)]
pub fn softhsm_test(test_name: &str, label: &str) -> Option<ChildToken> {
    if crate::process::is_test_child(test_name) {
        return Some(child_token().unwrap_or_else(|e| panic!("softhsm_test child: {e}")));
    }
    let hsm = SoftHsm::new().unwrap_or_else(|e| panic!("softhsm_test: {e}"));
    let token = hsm
        .init_token(label)
        .unwrap_or_else(|e| panic!("softhsm_test: {e}"));
    let mut envs = hsm.envs();
    envs.extend(
        [
            (ENV_MODULE, hsm.module().display().to_string()),
            (ENV_TOKEN_LABEL, token.label.clone()),
            (ENV_TOKEN_SERIAL, token.serial.clone()),
            (ENV_PIN_FILE, token.pin_file.display().to_string()),
            (ENV_USER_PIN, token.user_pin.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    crate::process::run_test_in_child("softhsm_test", test_name, &envs);
    None
}

fn child_token() -> std::result::Result<ChildToken, String> {
    fn var(name: &str) -> std::result::Result<String, String> {
        std::env::var(name).map_err(|e| format!("{name}: {e}"))
    }
    Ok(ChildToken {
        module: var(ENV_MODULE)?.into(),
        label: var(ENV_TOKEN_LABEL)?,
        serial: var(ENV_TOKEN_SERIAL)?,
        pin_file: var(ENV_PIN_FILE)?.into(),
        user_pin: var(ENV_USER_PIN)?,
        softhsm2_conf: var("SOFTHSM2_CONF")?.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_token_is_visible_and_pin_file_private() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.init_token("hsm-sim-test").unwrap();
        assert_eq!(token.serial.len(), 16, "serial {:?}", token.serial);
        assert_eq!(token.user_pin.len(), 16);
        assert!(token.user_pin.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(token.user_pin, token.so_pin);

        let listed = parse_slots(&hsm.show_slots().unwrap());
        assert_eq!(
            listed,
            vec![ListedToken {
                label: "hsm-sim-test".into(),
                serial: token.serial.clone()
            }]
        );

        let meta = fs::metadata(&token.pin_file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&token.pin_file).unwrap(), token.user_pin);
        let tokens = fs::metadata(hsm.token_dir()).unwrap();
        assert_eq!(tokens.permissions().mode() & 0o777, 0o700);

        let debug = format!("{token:?}");
        assert!(!debug.contains(&token.user_pin) && !debug.contains(&token.so_pin));

        // A second token in the same directory; both listed.
        let second = hsm.init_token("second").unwrap();
        assert_ne!(second.serial, token.serial);
        assert_eq!(parse_slots(&hsm.show_slots().unwrap()).len(), 2);

        // Another installation does not see these tokens.
        let other = SoftHsm::new().unwrap();
        assert!(parse_slots(&other.show_slots().unwrap()).is_empty());

        let dir = hsm.dir().to_path_buf();
        drop(hsm);
        assert!(!dir.exists(), "temporary directory removed on drop");
    }

    #[test]
    fn in_dir_keeps_the_directory() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("hsm");
        let hsm = SoftHsm::in_dir(&dir).unwrap();
        hsm.init_token("kept").unwrap();
        drop(hsm);
        let again = SoftHsm::in_dir(&dir).unwrap();
        assert_eq!(again.serial_of("kept").unwrap().len(), 16);
        assert_eq!(
            again.envs(),
            vec![(
                "SOFTHSM2_CONF".to_owned(),
                dir.canonicalize()
                    .unwrap()
                    .join("softhsm2.conf")
                    .display()
                    .to_string()
            )]
        );
    }

    #[test]
    fn bad_label_refused() {
        let hsm = SoftHsm::new().unwrap();
        assert!(hsm.init_token("a b").is_err());
        assert!(hsm.init_token("").is_err());
    }

    #[test]
    fn child_sees_the_token() {
        let Some(token) = softhsm_test("softhsm::tests::child_sees_the_token", "child") else {
            return;
        };
        assert_eq!(
            std::env::var("SOFTHSM2_CONF").unwrap(),
            token.softhsm2_conf.display().to_string()
        );
        assert_eq!(fs::read_to_string(&token.pin_file).unwrap(), token.user_pin);
        assert!(token.module.is_file());
        assert!(token.token_dir().is_dir());
        let out = Command::new("softhsm2-util")
            .arg("--show-slots")
            .output()
            .unwrap();
        let listed = parse_slots(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].label, token.label);
        assert_eq!(listed[0].serial, token.serial);
        println!("child ran");
    }

    #[test]
    #[should_panic(expected = "did not run test")]
    fn wrong_test_name_fails() {
        let _ = softhsm_test("softhsm::tests::no_such_test", "wrong");
    }
}
