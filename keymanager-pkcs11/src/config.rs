//! `[key_manager.pkcs11]` settings and reading the user PIN.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use carapace_core::Error;
use carapace_core::files::{FileUse, NamedFile};

/// Default prefix of the `CKA_LABEL` of every object the key manager creates.
pub const DEFAULT_KEY_LABEL_PREFIX: &str = "carapace-";
/// Default number of logged-in sessions in the pool (parallel signatures).
pub const DEFAULT_SESSIONS: usize = 4;
/// Largest accepted `sessions`.
pub const MAX_SESSIONS: usize = 64;

/// `[key_manager.pkcs11]` settings. Holds no secret: the PIN is read from `pin_file` or
/// the `pin_env` variable when the token is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library) of the HSM vendor, e.g.
    /// `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token to use (exactly one of `token_label` / `token_serial`).
    pub token_label: Option<String>,
    /// The serial number of the token to use (exactly one of `token_label` / `token_serial`).
    pub token_serial: Option<String>,
    /// A file holding the user PIN (mode 0600 or stricter; one trailing newline is
    /// ignored). Exactly one of `pin_file` / `pin_env`.
    pub pin_file: Option<PathBuf>,
    /// The name of an environment variable holding the user PIN. Exactly one of
    /// `pin_file` / `pin_env`.
    pub pin_env: Option<String>,
    /// Prefix of the `CKA_LABEL` of every key (`prefix + key id`); default `carapace-`.
    /// Only objects whose label starts with it are listed.
    pub key_label_prefix: Option<String>,
    /// Number of logged-in sessions, i.e. of signatures that can run in parallel
    /// (1 to 64, default 4).
    pub sessions: Option<usize>,
}

/// Which token to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenSelector {
    Label(String),
    Serial(String),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token with label {l:?}"),
            TokenSelector::Serial(s) => write!(f, "token with serial {s:?}"),
        }
    }
}

impl TokenSelector {
    pub(crate) fn matches(&self, label: &str, serial: &str) -> bool {
        match self {
            TokenSelector::Label(l) => label.trim_end() == l.trim_end(),
            TokenSelector::Serial(s) => serial.trim() == s.trim(),
        }
    }

    /// The config key that selected the token, for messages.
    pub(crate) fn key(&self) -> &'static str {
        match self {
            TokenSelector::Label(_) => "token_label",
            TokenSelector::Serial(_) => "token_serial",
        }
    }
}

/// Where the PIN comes from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PinSource {
    File(PathBuf),
    Env(String),
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "pin_file {}", p.display()),
            PinSource::Env(v) => write!(f, "pin_env {v}"),
        }
    }
}

fn valid_label_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl Pkcs11Config {
    /// Checks the settings without touching the module or the token; every problem is
    /// listed, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.module.as_os_str().is_empty() {
            problems.push(
                "module: required: the path of the HSM vendor's PKCS#11 library \
                 (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
                    .to_owned(),
            );
        }
        match (&self.token_label, &self.token_serial) {
            (Some(_), Some(_)) => problems
                .push("token_label and token_serial: set exactly one of them, not both".to_owned()),
            (None, None) => problems.push(
                "token_label or token_serial: set exactly one of them to name the token \
                 (slot numbers are not stable and are not accepted)"
                    .to_owned(),
            ),
            (Some(l), None) => {
                if l.trim().is_empty() || l.len() > 32 {
                    problems.push(format!(
                        "token_label: {l:?} must be 1 to 32 bytes (PKCS#11 token labels are \
                         32 bytes, blank padded)"
                    ));
                }
            }
            (None, Some(s)) => {
                if s.trim().is_empty() || s.len() > 16 {
                    problems.push(format!(
                        "token_serial: {s:?} must be 1 to 16 characters (PKCS#11 serial \
                         numbers are 16 bytes, blank padded)"
                    ));
                }
            }
        }
        match (&self.pin_file, &self.pin_env) {
            (Some(_), Some(_)) => {
                problems.push("pin_file and pin_env: set exactly one of them, not both".to_owned())
            }
            (None, None) => problems.push(
                "pin_file or pin_env: set exactly one of them to give the token's user PIN"
                    .to_owned(),
            ),
            (Some(p), None) if p.as_os_str().is_empty() => {
                problems.push("pin_file: must not be empty".to_owned())
            }
            (None, Some(v))
                if v.is_empty()
                    || v.contains('=')
                    || v.contains('\0')
                    || v.bytes().any(|b| b.is_ascii_whitespace()) =>
            {
                problems.push(format!(
                    "pin_env: {v:?} is not an environment variable name"
                ))
            }
            _ => {}
        }
        if let Some(prefix) = &self.key_label_prefix
            && (prefix.len() > 64 || !valid_label_chars(prefix))
        {
            problems.push(format!(
                "key_label_prefix: {prefix:?} must be at most 64 letters, digits, '.', '-' or '_'"
            ));
        }
        if let Some(n) = self.sessions
            && !(1..=MAX_SESSIONS).contains(&n)
        {
            problems.push(format!("sessions: {n} is not between 1 and {MAX_SESSIONS}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The files these settings name, for `validate`: the module (loaded when the key
    /// manager opens) and the PIN file (a secret: [`read_pin`] refuses one group or others
    /// can access). Paths as written; the caller resolves them as it does before
    /// [`crate::Pkcs11KeyManager::open`].
    pub fn files(&self) -> Vec<NamedFile> {
        let mut files = Vec::new();
        if !self.module.as_os_str().is_empty() {
            files.push(NamedFile::new("module", &self.module, FileUse::Read));
        }
        if let Some(pin) = self.pin_file.as_ref().filter(|p| !p.as_os_str().is_empty()) {
            files.push(NamedFile::new("pin_file", pin, FileUse::Secret));
        }
        files
    }

    pub(crate) fn selector(&self) -> Result<TokenSelector, Error> {
        match (&self.token_label, &self.token_serial) {
            (Some(l), None) => Ok(TokenSelector::Label(l.clone())),
            (None, Some(s)) => Ok(TokenSelector::Serial(s.clone())),
            _ => Err(invalid(vec![
                "token_label or token_serial: set exactly one of them".to_owned(),
            ])),
        }
    }

    pub(crate) fn pin_source(&self) -> Result<PinSource, Error> {
        match (&self.pin_file, &self.pin_env) {
            (Some(p), None) => Ok(PinSource::File(p.clone())),
            (None, Some(v)) => Ok(PinSource::Env(v.clone())),
            _ => Err(invalid(vec![
                "pin_file or pin_env: set exactly one of them".to_owned(),
            ])),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        self.key_label_prefix
            .as_deref()
            .unwrap_or(DEFAULT_KEY_LABEL_PREFIX)
    }

    pub(crate) fn session_count(&self) -> usize {
        self.sessions.unwrap_or(DEFAULT_SESSIONS)
    }
}

/// The error for settings that do not pass [`Pkcs11Config::validate`].
pub(crate) fn invalid(problems: Vec<String>) -> Error {
    Error::KeyBackend(format!("pkcs11: invalid settings: {}", problems.join("; ")))
}

/// Reads the user PIN from its source. Messages name the source, never the PIN.
pub(crate) fn read_pin(source: &PinSource) -> Result<AuthPin, Error> {
    let pin = match source {
        PinSource::File(path) => read_pin_file(path)?,
        PinSource::Env(name) => match std::env::var(name) {
            Ok(v) => Zeroizing::new(v),
            Err(std::env::VarError::NotPresent) => {
                return Err(Error::KeyBackend(format!(
                    "pkcs11: pin_env: environment variable {name} is not set; set it to the \
                     token's user PIN in the server's environment, or use pin_file"
                )));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(Error::KeyBackend(format!(
                    "pkcs11: pin_env: environment variable {name} is not valid UTF-8"
                )));
            }
        },
    };
    let trimmed = pin
        .strip_suffix("\r\n")
        .or_else(|| pin.strip_suffix('\n'))
        .unwrap_or(&pin);
    if trimmed.is_empty() {
        return Err(Error::KeyBackend(format!(
            "pkcs11: {source} is empty; it must hold the token's user PIN"
        )));
    }
    Ok(AuthPin::from(trimmed))
}

fn read_pin_file(path: &Path) -> Result<Zeroizing<String>, Error> {
    let unreadable = |e: std::io::Error| {
        Error::KeyBackend(format!(
            "pkcs11: pin_file {} cannot be read: {e}; write the token's user PIN to it and \
             chmod 600 {}",
            path.display(),
            path.display()
        ))
    };
    let mut file = fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(Error::KeyBackend(format!(
            "pkcs11: pin_file {} is not a regular file",
            path.display()
        )));
    }
    carapace_core::files::check_private("pkcs11: pin_file", path, &meta)
        .map_err(Error::KeyBackend)?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(64));
    file.read_to_end(&mut bytes).map_err(unreadable)?;
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(_) => Err(Error::KeyBackend(format!(
            "pkcs11: pin_file {} is not valid UTF-8",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn base() -> Pkcs11Config {
        Pkcs11Config {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: Some("ca".into()),
            pin_file: Some("/run/ca.pin".into()),
            ..Default::default()
        }
    }

    #[test]
    fn validate_lists_every_problem() {
        assert_eq!(base().validate(), Ok(()));
        let bad = Pkcs11Config {
            module: PathBuf::new(),
            token_label: Some("a".into()),
            token_serial: Some("b".into()),
            pin_file: None,
            pin_env: None,
            key_label_prefix: Some("a/b".into()),
            sessions: Some(0),
        };
        let problems = bad.validate().unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems[0].starts_with("module:"));
        assert!(problems[1].contains("not both"));
        assert!(problems[2].starts_with("pin_file or pin_env"));
        assert!(problems[3].starts_with("key_label_prefix"));
        assert!(problems[4].starts_with("sessions: 0"));

        let neither = Pkcs11Config {
            token_label: None,
            pin_file: None,
            pin_env: Some("CA_PIN".into()),
            sessions: Some(65),
            ..base()
        };
        let problems = neither.validate().unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("slot numbers are not stable"));

        let both_pins = Pkcs11Config {
            pin_env: Some("X".into()),
            ..base()
        };
        assert_eq!(both_pins.validate().unwrap_err().len(), 1);
        let empty_prefix = Pkcs11Config {
            key_label_prefix: Some(String::new()),
            ..base()
        };
        assert_eq!(empty_prefix.validate(), Ok(()));
    }

    #[test]
    fn parses_toml_and_refuses_unknown_keys() {
        let cfg: Pkcs11Config = toml::from_str(
            "module = \"/m.so\"\ntoken_serial = \"abc\"\npin_env = \"PIN\"\nsessions = 8\n",
        )
        .unwrap();
        assert_eq!(cfg.token_serial.as_deref(), Some("abc"));
        assert_eq!(cfg.session_count(), 8);
        assert_eq!(cfg.prefix(), DEFAULT_KEY_LABEL_PREFIX);
        assert!(toml::from_str::<Pkcs11Config>("module = \"/m.so\"\nslot = 0\n").is_err());
        assert!(toml::from_str::<Pkcs11Config>("token_label = \"x\"\n").is_err());
    }

    #[test]
    fn pin_file_checks() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        let missing = read_pin(&PinSource::File(path.clone())).unwrap_err();
        assert!(missing.to_string().contains("cannot be read"), "{missing}");

        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&path)
            .unwrap();
        std::fs::write(&path, "1234\n").unwrap();
        let open = read_pin(&PinSource::File(path.clone())).unwrap_err();
        let msg = open.to_string();
        assert!(msg.contains("mode 644"), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", path.display())),
            "{msg}"
        );
        assert!(!msg.contains("1234"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(
            read_pin(&PinSource::File(path.clone()))
                .unwrap()
                .expose_secret(),
            "1234"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(
            read_pin(&PinSource::File(path.clone()))
                .unwrap_err()
                .to_string()
                .contains("is empty")
        );

        let unset = read_pin(&PinSource::Env("CARAPACE_TEST_SURELY_UNSET_PIN".into()))
            .unwrap_err()
            .to_string();
        assert!(
            unset.contains("environment variable CARAPACE_TEST_SURELY_UNSET_PIN is not set"),
            "{unset}"
        );
    }
}
