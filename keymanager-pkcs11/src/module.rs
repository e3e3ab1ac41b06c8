//! PKCS#11 modules loaded in this process.
//!
//! A module is one shared library with one global state: `C_Initialize` and `C_Finalize`
//! act on the whole process. Two key managers over the same module (the key manager and
//! the upstream authority on one token, or a test reopening a token) therefore share one
//! [`Module`]: it is initialised when the first user arrives and finalised when the last
//! one leaves. The library itself stays loaded for the life of the process (unloading a
//! C++ module such as SoftHSM2 and loading it again is not reliably safe).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use carapace_core::Error;

use crate::rv::rv_name;

static MODULES: LazyLock<Mutex<HashMap<PathBuf, Arc<Module>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before any call that can panic,
    // so a poisoned lock is safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One loaded PKCS#11 library.
#[derive(Debug)]
pub(crate) struct Module {
    path: PathBuf,
    pkcs11: Pkcs11,
    state: Mutex<ModuleState>,
}

#[derive(Debug)]
struct ModuleState {
    users: usize,
    initialized: bool,
    /// Bumped on every C_Finalize: sessions opened before are gone.
    generation: u64,
}

/// A key manager's use of a module; releasing it (drop) finalises the module when it was
/// the last one.
#[derive(Debug)]
pub(crate) struct ModuleUse {
    module: Arc<Module>,
}

/// What SoftHSM2 users need to hear when the module or the token is not as expected.
pub(crate) fn softhsm_hint(module: &Path) -> Option<String> {
    if !module.to_string_lossy().contains("softhsm") {
        return None;
    }
    let conf = std::env::var("SOFTHSM2_CONF")
        .unwrap_or_else(|_| "not set, so /etc/softhsm/softhsm2.conf".to_owned());
    Some(format!(
        "SoftHSM2 finds its tokens in the directories.tokendir of the file SOFTHSM2_CONF names \
         (SOFTHSM2_CONF is {conf}); a token directory owned by another user is silently \
         invisible, so initialise the token as the user running Carapace"
    ))
}

fn module_error(path: &Path, what: &str) -> Error {
    Error::KeyBackend(format!(
        "pkcs11: PKCS#11 module {} could not be loaded: {what}; check `module` (SoftHSM2: \
         apt-get install softhsm2, /usr/lib/softhsm/libsofthsm2.so)",
        path.display()
    ))
}

fn initialize(pkcs11: &Pkcs11) -> Result<(), CkError> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

impl ModuleUse {
    /// Loads (once per process) and initialises the module at `path`.
    pub(crate) fn acquire(path: &Path) -> Result<ModuleUse, Error> {
        if !path.exists() {
            return Err(module_error(path, "no such file"));
        }
        let key = std::fs::canonicalize(path).map_err(|e| module_error(path, &e.to_string()))?;
        let module = {
            let mut modules = lock(&MODULES);
            match modules.get(&key) {
                Some(m) => m.clone(),
                None => {
                    let pkcs11 =
                        Pkcs11::new(&key).map_err(|e| module_error(path, &e.to_string()))?;
                    let m = Arc::new(Module {
                        path: path.to_owned(),
                        pkcs11,
                        state: Mutex::new(ModuleState {
                            users: 0,
                            initialized: false,
                            generation: 0,
                        }),
                    });
                    modules.insert(key, m.clone());
                    m
                }
            }
        };
        {
            let mut st = lock(&module.state);
            if !st.initialized {
                initialize(&module.pkcs11).map_err(|e| {
                    let mut msg = format!(
                        "pkcs11: PKCS#11 module {}: C_Initialize failed with {}",
                        path.display(),
                        ck_name(&e)
                    );
                    if let Some(hint) = softhsm_hint(path) {
                        msg.push_str(&format!(
                            "; {hint}; the file must be readable and its directories.tokendir \
                             must exist"
                        ));
                    }
                    Error::KeyBackend(msg)
                })?;
                st.initialized = true;
            }
            st.users += 1;
        }
        Ok(ModuleUse { module })
    }

    pub(crate) fn pkcs11(&self) -> &Pkcs11 {
        &self.module.pkcs11
    }

    pub(crate) fn path(&self) -> &Path {
        &self.module.path
    }

    /// The module's finalisation count: sessions opened under another one are gone.
    pub(crate) fn generation(&self) -> u64 {
        lock(&self.module.state).generation
    }

    /// `C_Finalize` then `C_Initialize`, which rescans the slots and drops every session
    /// and login of this process, when this key manager is the module's only user.
    /// Returns whether it did. The caller must have no call in flight on the module.
    pub(crate) fn reinitialize(&self) -> Result<bool, CkError> {
        let mut st = lock(&self.module.state);
        if st.users > 1 {
            return Ok(false);
        }
        if st.initialized {
            // An error here means the module was not initialised any more: fine.
            let _ = self.module.pkcs11.clone().finalize();
            st.initialized = false;
            st.generation += 1;
        }
        initialize(&self.module.pkcs11)?;
        st.initialized = true;
        Ok(true)
    }

    /// Test hook: `C_Finalize` then `C_Initialize` whoever else uses the module, as a
    /// device reset looks to the process.
    pub(crate) fn testing_reset(&self) -> Result<(), CkError> {
        let mut st = lock(&self.module.state);
        let _ = self.module.pkcs11.clone().finalize();
        st.generation += 1;
        st.initialized = false;
        initialize(&self.module.pkcs11)?;
        st.initialized = true;
        Ok(())
    }
}

impl Drop for ModuleUse {
    fn drop(&mut self) {
        let mut st = lock(&self.module.state);
        st.users = st.users.saturating_sub(1);
        if st.users == 0 && st.initialized {
            if let Err(e) = self.module.pkcs11.clone().finalize() {
                tracing::debug!(module = %self.module.path.display(), error = %ck_name(&e), "C_Finalize failed");
            }
            st.initialized = false;
            st.generation += 1;
        }
    }
}

/// A cryptoki error as a short name: the `CKR_*` code for PKCS#11 return values.
pub(crate) fn ck_name(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, _) => rv_name(rv),
        other => other.to_string(),
    }
}
