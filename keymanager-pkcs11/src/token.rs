//! One token: the logged-in session pool, and reconnection when the token or the module
//! fails.
//!
//! Every PKCS#11 call runs on a session leased from the pool ([`Token::run`]), so `N`
//! calls run in parallel on `N` sessions. When a call fails in a way that means the
//! connection is gone (see [`crate::rv::classify`]), the pool is marked broken (one
//! warning), and the next lease reconnects: it waits until no call is in flight,
//! finalises and re-initialises the module (which rescans the slots), finds the token
//! again by label or serial, logs in and opens fresh sessions. Reconnection is attempted
//! at most once per [`RECONNECT_INTERVAL`]; in between, calls fail at once with
//! [`Error::KeyUnavailable`]. Idempotent operations (signing, lookups) retry once after a
//! successful reconnection, so a token that comes straight back is invisible to callers.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use secrecy::ExposeSecret;

use carapace_core::Error;

use crate::config::{PinSource, Pkcs11Config, TokenSelector, invalid, read_pin};
use crate::module::{ModuleUse, ck_name, lock, softhsm_hint};
use crate::rv::{Failure, classify, describe, rv_name};

/// At most one reconnection attempt per this interval.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a reconnection waits for calls still in flight on the old sessions.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(30);

/// The error of an operation run on a session.
#[derive(Debug)]
pub(crate) enum OpError {
    /// A PKCS#11 call failed.
    Ck(CkError),
    /// The operation decided (key not found, bad data, ...).
    Core(Error),
}

impl From<CkError> for OpError {
    fn from(e: CkError) -> Self {
        OpError::Ck(e)
    }
}

impl From<Error> for OpError {
    fn from(e: Error) -> Self {
        OpError::Core(e)
    }
}

/// A connection failure during connect, with whether retrying can help.
struct ConnectError {
    message: String,
    /// Retrying cannot help (wrong or locked PIN, ambiguous token).
    permanent: bool,
    /// The token refused the PIN: retrying with the same one could lock the token.
    pin_refused: bool,
}

impl ConnectError {
    fn temporary(message: String) -> Self {
        ConnectError {
            message,
            permanent: false,
            pin_refused: false,
        }
    }
}

struct Outage {
    cause: String,
    since: Instant,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

struct PoolState {
    connected: bool,
    /// Bumped on every (re)connection; leases and cached handles carry it.
    epoch: u64,
    /// The module generation the current sessions were opened under.
    generation: u64,
    slot: Option<Slot>,
    idle: Vec<Session>,
    out: usize,
    /// Sessions of a broken connection with their module generation: closed before
    /// reconnecting if the module was not finalised since (else they are gone already).
    stale: Vec<(u64, Session)>,
    outage: Option<Outage>,
    reconnecting: bool,
    reconnects: u64,
    /// The most sessions ever leased at once.
    max_out: usize,
    /// A reconnection failure that retrying cannot fix.
    fatal: Option<Fatal>,
}

/// Why the pool stopped reconnecting.
struct Fatal {
    message: String,
    /// The PIN the token refused: the PIN source is read again (at most once per
    /// [`RECONNECT_INTERVAL`]) and reconnection resumes once it holds another PIN.
    refused_pin: Option<AuthPin>,
    last_check: Instant,
}

/// A token opened by a key manager, shared by its signers.
pub(crate) struct Token {
    pub(crate) selector: TokenSelector,
    pub(crate) prefix: String,
    pub(crate) size: usize,
    pin_source: PinSource,
    pin: Mutex<AuthPin>,
    state: Mutex<PoolState>,
    cond: Condvar,
    /// Private key handles by label, with the epoch they were found in.
    handles: Mutex<HashMap<String, (u64, ObjectHandle)>>,
    /// Serialises object creation and deletion in this process.
    pub(crate) admin: Mutex<()>,
    // Last: dropped after the sessions are closed in Drop.
    module: ModuleUse,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the PIN.
        f.debug_struct("Token")
            .field("module", &self.module.path())
            .field("token", &self.selector)
            .field("pin", &self.pin_source)
            .field("key_label_prefix", &self.prefix)
            .field("sessions", &self.size)
            .finish_non_exhaustive()
    }
}

/// A session taken from the pool; returned on drop.
pub(crate) struct Lease<'a> {
    token: &'a Token,
    session: Option<Session>,
    pub(crate) epoch: u64,
    generation: u64,
}

impl Lease<'_> {
    pub(crate) fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.token.state);
        st.out = st.out.saturating_sub(1);
        if let Some(s) = self.session.take() {
            if st.connected && st.epoch == self.epoch {
                st.idle.push(s);
            } else {
                st.stale.push((self.generation, s));
            }
        }
        self.token.cond.notify_all();
    }
}

struct Conn {
    slot: Slot,
    sessions: Vec<Session>,
}

fn close_all(sessions: Vec<Session>) {
    for s in sessions {
        // The session may be gone with the token; nothing to do about it.
        let _ = s.close();
    }
}

/// Finds the slot holding the selected token.
fn find_slot(module: &ModuleUse, selector: &TokenSelector) -> Result<Slot, ConnectError> {
    let p = module.pkcs11();
    let slots = p.get_slots_with_token().map_err(|e| {
        ConnectError::temporary(format!(
            "pkcs11: listing the slots of PKCS#11 module {} failed with {}",
            module.path().display(),
            ck_name(&e)
        ))
    })?;
    let mut present = Vec::new();
    let mut found = Vec::new();
    for slot in slots {
        let Ok(info) = p.get_token_info(slot) else {
            continue;
        };
        if !info.token_initialized() {
            continue;
        }
        let (label, serial) = (info.label().trim_end(), info.serial_number().trim());
        if selector.matches(label, serial) {
            found.push(slot);
        }
        present.push(format!("{label:?} (serial {serial})"));
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => {
            let present = if present.is_empty() {
                "no initialised token is present".to_owned()
            } else {
                format!("tokens present: {}", present.join(", "))
            };
            let mut msg = format!(
                "pkcs11: no {selector} in PKCS#11 module {}; {present}; check {}",
                module.path().display(),
                selector.key()
            );
            if let Some(hint) = softhsm_hint(module.path()) {
                msg.push_str("; ");
                msg.push_str(&hint);
            }
            Err(ConnectError::temporary(msg))
        }
        many => Err(ConnectError {
            pin_refused: false,
            message: format!(
                "pkcs11: {} tokens match {selector} ({present}); name the token by \
                 token_serial instead",
                many.len(),
                present = present.join(", ")
            ),
            permanent: true,
        }),
    }
}

fn login_error(
    e: &CkError,
    selector: &TokenSelector,
    pin: &PinSource,
    module: &ModuleUse,
) -> ConnectError {
    let permanent = |message: String| ConnectError {
        message,
        permanent: true,
        pin_refused: true,
    };
    match e {
        CkError::Pkcs11(RvError::PinIncorrect, _) => permanent(format!(
            "pkcs11: the token rejected the PIN (CKR_PIN_INCORRECT): check that {pin} holds \
             the user PIN of the {selector}; repeated failures may lock the token"
        )),
        CkError::Pkcs11(RvError::PinLocked, _) => permanent(format!(
            "pkcs11: the user PIN of the {selector} is locked (CKR_PIN_LOCKED) after too many \
             wrong PINs; the security officer must set a new one (e.g. pkcs11-tool --module {} \
             --token-label <label> --login --login-type so --init-pin) and {pin} must hold it",
            module.path().display()
        )),
        CkError::Pkcs11(RvError::PinExpired, _) => permanent(format!(
            "pkcs11: the user PIN of the {selector} has expired (CKR_PIN_EXPIRED): set a new \
             one with the HSM's tools and put it in {pin}"
        )),
        CkError::Pkcs11(rv @ (RvError::PinLenRange | RvError::PinInvalid), _) => {
            permanent(format!(
                "pkcs11: the {selector} refused the PIN's format ({}): check that {pin} \
                 holds only the user PIN (one line)",
                rv_name(rv)
            ))
        }
        CkError::Pkcs11(RvError::UserPinNotInitialized, _) => permanent(format!(
            "pkcs11: the user PIN of the {selector} is not initialised \
             (CKR_USER_PIN_NOT_INITIALIZED): initialise it with the HSM's tools (SoftHSM2: \
             softhsm2-util --init-token ... --pin)"
        )),
        other => ConnectError::temporary(format!(
            "pkcs11: logging in to the {selector} failed: {}",
            describe(other)
        )),
    }
}

/// Finds the token, opens `n` sessions and logs in (once: login is per token).
fn connect(
    module: &ModuleUse,
    selector: &TokenSelector,
    pin: &AuthPin,
    pin_source: &PinSource,
    n: usize,
) -> Result<Conn, ConnectError> {
    let slot = find_slot(module, selector)?;
    let p = module.pkcs11();
    let mut sessions = Vec::with_capacity(n);
    let open_error = |e: &CkError| {
        let mut msg = format!(
            "pkcs11: opening a session on the {selector} failed: {}",
            describe(e)
        );
        if matches!(e, CkError::Pkcs11(RvError::SessionCount, _)) {
            msg.push_str(&format!(
                "; the token allows fewer sessions than `sessions` = {n}: lower it"
            ));
        }
        ConnectError::temporary(msg)
    };
    for i in 0..n {
        match p.open_rw_session_no_drop(slot) {
            Ok(s) => sessions.push(s),
            Err(e) => {
                close_all(sessions);
                return Err(open_error(&e));
            }
        }
        if i == 0 {
            match sessions[0].login(UserType::User, Some(pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => {
                    close_all(sessions);
                    return Err(login_error(&e, selector, pin_source, module));
                }
            }
        }
    }
    Ok(Conn { slot, sessions })
}

impl Token {
    /// Loads the module, finds the token, logs in and fills the pool (blocking).
    pub(crate) fn open(cfg: &Pkcs11Config) -> Result<Token, Error> {
        cfg.validate().map_err(invalid)?;
        let selector = cfg.selector()?;
        let pin_source = cfg.pin_source()?;
        let pin = read_pin(&pin_source)?;
        let size = cfg.session_count();
        let module = ModuleUse::acquire(&cfg.module)?;
        let conn = connect(&module, &selector, &pin, &pin_source, size)
            .map_err(|e| Error::KeyBackend(e.message))?;
        tracing::info!(
            module = %module.path().display(),
            token = %selector,
            sessions = size,
            "PKCS#11 token open"
        );
        let generation = module.generation();
        Ok(Token {
            selector,
            prefix: cfg.prefix().to_owned(),
            size,
            pin_source,
            pin: Mutex::new(pin),
            state: Mutex::new(PoolState {
                connected: true,
                epoch: 1,
                generation,
                slot: Some(conn.slot),
                idle: conn.sessions,
                out: 0,
                stale: Vec::new(),
                outage: None,
                reconnecting: false,
                reconnects: 0,
                max_out: 0,
                fatal: None,
            }),
            cond: Condvar::new(),
            handles: Mutex::new(HashMap::new()),
            admin: Mutex::new(()),
            module,
        })
    }

    /// How many times the pool reconnected since the token was opened.
    pub(crate) fn reconnects(&self) -> u64 {
        lock(&self.state).reconnects
    }

    fn unavailable(&self, st: &PoolState) -> Error {
        match &st.outage {
            Some(o) => {
                let mut msg = format!(
                    "pkcs11: the {} has been unavailable for {:.1} s ({})",
                    self.selector,
                    o.since.elapsed().as_secs_f64(),
                    o.cause
                );
                if let Some(last) = &o.last_error {
                    let last = last.strip_prefix("pkcs11: ").unwrap_or(last);
                    msg.push_str(&format!("; last reconnection attempt: {last}"));
                }
                msg.push_str(&format!(
                    "; reconnecting at most every {} s",
                    RECONNECT_INTERVAL.as_secs()
                ));
                Error::KeyUnavailable(msg)
            }
            None => Error::KeyUnavailable(format!("pkcs11: the {} is unavailable", self.selector)),
        }
    }

    /// Takes a session from the pool, reconnecting first if the pool is broken and a
    /// reconnection is due; waits while every session is in use.
    pub(crate) fn checkout(&self) -> Result<Lease<'_>, Error> {
        let mut st = lock(&self.state);
        loop {
            if st.fatal.is_some() && !self.pin_replaced(&mut st) {
                let msg = st.fatal.as_ref().map(|f| f.message.clone());
                return Err(Error::KeyBackend(msg.unwrap_or_default()));
            }
            if st.reconnecting {
                st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if st.connected {
                if let Some(session) = st.idle.pop() {
                    st.out += 1;
                    st.max_out = st.max_out.max(st.out);
                    return Ok(Lease {
                        token: self,
                        session: Some(session),
                        epoch: st.epoch,
                        generation: st.generation,
                    });
                }
                st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let due = st
                .outage
                .as_ref()
                .and_then(|o| o.last_attempt)
                .is_none_or(|t| t.elapsed() >= RECONNECT_INTERVAL);
            if !due {
                return Err(self.unavailable(&st));
            }
            st = self.reconnect(st)?;
        }
    }

    /// With reconnection stopped because the token refused the PIN: reads the PIN source
    /// again (at most once per [`RECONNECT_INTERVAL`]) and, if it now holds another PIN,
    /// takes it and resumes reconnecting. Never tries the refused PIN again.
    fn pin_replaced(&self, st: &mut PoolState) -> bool {
        let Some(fatal) = st.fatal.as_mut() else {
            return true;
        };
        let Some(refused) = &fatal.refused_pin else {
            return false;
        };
        if fatal.last_check.elapsed() < RECONNECT_INTERVAL {
            return false;
        }
        fatal.last_check = Instant::now();
        let Ok(new) = read_pin(&self.pin_source) else {
            return false;
        };
        if new.expose_secret() == refused.expose_secret() {
            return false;
        }
        tracing::info!(token = %self.selector, source = %self.pin_source, "PIN changed; reconnecting");
        *lock(&self.pin) = new;
        st.fatal = None;
        if let Some(o) = st.outage.as_mut() {
            o.last_attempt = None;
        }
        true
    }

    /// Marks the connection of `epoch` broken (once) and logs why.
    fn mark_broken(&self, epoch: u64, cause: &str) {
        let mut st = lock(&self.state);
        if !st.connected || st.epoch != epoch {
            return;
        }
        st.connected = false;
        let generation = st.generation;
        let idle = std::mem::take(&mut st.idle);
        st.stale.extend(idle.into_iter().map(|s| (generation, s)));
        st.outage = Some(Outage {
            cause: cause.to_owned(),
            since: Instant::now(),
            last_attempt: None,
            last_error: None,
        });
        self.handles_clear();
        tracing::warn!(
            token = %self.selector,
            module = %self.module.path().display(),
            cause,
            "PKCS#11 token failed; reconnecting"
        );
        self.cond.notify_all();
    }

    fn handles_clear(&self) {
        lock(&self.handles).clear();
    }

    /// Reconnects with the state lock held (released while waiting for calls in flight).
    fn reconnect<'a>(
        &'a self,
        mut st: MutexGuard<'a, PoolState>,
    ) -> Result<MutexGuard<'a, PoolState>, Error> {
        st.reconnecting = true;
        if let Some(o) = st.outage.as_mut() {
            o.last_attempt = Some(Instant::now());
        }
        let deadline = Instant::now() + IN_FLIGHT_WAIT;
        while st.out > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.reconnecting = false;
                let err = format!(
                    "{} calls on the old sessions did not return within {} s",
                    st.out,
                    IN_FLIGHT_WAIT.as_secs()
                );
                if let Some(o) = st.outage.as_mut() {
                    o.last_error = Some(err);
                }
                self.cond.notify_all();
                return Err(self.unavailable(&st));
            }
            st = self
                .cond
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        // Nothing is in flight: close what may still be open, rescan, log in again.
        let generation = self.module.generation();
        for (g, s) in std::mem::take(&mut st.stale) {
            if g == generation {
                let _ = s.close();
            }
        }
        let pin = lock(&self.pin).clone();
        let result = self
            .module
            .reinitialize()
            .map_err(|e| {
                let mut msg = format!(
                    "pkcs11: re-initialising PKCS#11 module {} failed with {}",
                    self.module.path().display(),
                    ck_name(&e)
                );
                if softhsm_hint(self.module.path()).is_some() {
                    msg.push_str(" (SoftHSM2: is its directories.tokendir there?)");
                }
                ConnectError::temporary(msg)
            })
            .and_then(|_| {
                connect(
                    &self.module,
                    &self.selector,
                    &pin,
                    &self.pin_source,
                    self.size,
                )
            });
        st.reconnecting = false;
        self.cond.notify_all();
        match result {
            Ok(conn) => {
                st.connected = true;
                st.epoch += 1;
                st.generation = self.module.generation();
                st.slot = Some(conn.slot);
                st.idle = conn.sessions;
                st.reconnects += 1;
                self.handles_clear();
                let down = st
                    .outage
                    .take()
                    .map(|o| o.since.elapsed())
                    .unwrap_or_default();
                tracing::info!(
                    token = %self.selector,
                    down_for_ms = down.as_millis() as u64,
                    "PKCS#11 token back"
                );
                Ok(st)
            }
            Err(e) if e.permanent => {
                tracing::error!(
                    token = %self.selector,
                    error = %e.message,
                    "PKCS#11 reconnection refused; not retrying until the PIN changes"
                );
                st.fatal = Some(Fatal {
                    message: e.message.clone(),
                    refused_pin: e.pin_refused.then_some(pin),
                    last_check: Instant::now(),
                });
                Err(Error::KeyBackend(e.message))
            }
            Err(e) => {
                tracing::debug!(token = %self.selector, error = %e.message, "PKCS#11 reconnection failed");
                if let Some(o) = st.outage.as_mut() {
                    o.last_error = Some(e.message);
                }
                Err(self.unavailable(&st))
            }
        }
    }

    /// Runs `op` on a pooled session. A connection failure breaks the pool and, when
    /// `retry` (the operation is idempotent), is retried once after reconnecting. An
    /// object handle that became invalid counts as a connection failure: SoftHSM2 answers
    /// that way when its token directory went away, and a reconnection reloads it.
    pub(crate) fn run<T>(
        &self,
        retry: bool,
        mut op: impl FnMut(&Session, u64) -> Result<T, OpError>,
    ) -> Result<T, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let lease = self.checkout()?;
            let epoch = lease.epoch;
            let result = match lease.session() {
                Some(s) => op(s, epoch),
                None => Err(OpError::Core(self.unavailable(&lock(&self.state)))),
            };
            drop(lease);
            let e = match result {
                Ok(v) => return Ok(v),
                Err(OpError::Core(e)) => return Err(e),
                Err(OpError::Ck(e)) => e,
            };
            match classify(&e) {
                Failure::Call => return Err(call_error(&e)),
                Failure::Connection => {
                    let cause = describe(&e);
                    self.mark_broken(epoch, &cause);
                    if !(retry && attempt == 1) {
                        return Err(Error::KeyUnavailable(format!(
                            "pkcs11: the {}: {cause}; reconnecting",
                            self.selector
                        )));
                    }
                }
            }
        }
    }

    /// The private key object labelled `label` (cached per connection).
    pub(crate) fn private_key(
        &self,
        s: &Session,
        epoch: u64,
        label: &str,
        id: &str,
    ) -> Result<ObjectHandle, OpError> {
        if let Some(&(e, h)) = lock(&self.handles).get(label)
            && e == epoch
        {
            return Ok(h);
        }
        let found = s.find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])?;
        match found.as_slice() {
            [] => Err(Error::KeyNotFound(id.to_owned()).into()),
            [h] => {
                lock(&self.handles).insert(label.to_owned(), (epoch, *h));
                Ok(*h)
            }
            many => Err(Error::KeyBackend(format!(
                "pkcs11: the {} holds {} private keys labelled {label:?}; delete the extra ones \
                 (pkcs11-tool --delete-object --type privkey --label {label})",
                self.selector,
                many.len()
            ))
            .into()),
        }
    }

    /// Caches a private key handle found or created in `epoch`.
    pub(crate) fn remember(&self, label: &str, epoch: u64, h: ObjectHandle) {
        lock(&self.handles).insert(label.to_owned(), (epoch, h));
    }

    /// Forgets the cached handle of `label`.
    pub(crate) fn forget(&self, label: &str) {
        lock(&self.handles).remove(label);
    }

    /// Test hook: the module forgets every session and login, as after a device reset;
    /// the pool is not told.
    pub(crate) fn testing_reset_module(&self) -> Result<(), Error> {
        // Like a reconnection, wait for calls in flight: finalising SoftHSM2 under a
        // running call is not a device reset but a use-after-free.
        // No new lease meanwhile (checkout waits while `reconnecting`).
        let mut st = lock(&self.state);
        st.reconnecting = true;
        while st.out > 0 {
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let result = self
            .module
            .testing_reset()
            .map_err(|e| Error::KeyBackend(format!("pkcs11: reset: {}", ck_name(&e))));
        st.reconnecting = false;
        self.cond.notify_all();
        result
    }

    /// Test hook: logs the token out (every session of the process loses the login).
    pub(crate) fn testing_logout(&self) -> Result<(), Error> {
        let lease = self.checkout()?;
        match lease.session() {
            Some(s) => s
                .logout()
                .map_err(|e| Error::KeyBackend(format!("pkcs11: logout: {}", ck_name(&e)))),
            None => Ok(()),
        }
    }

    /// Test hook: the most sessions ever leased at once.
    pub(crate) fn max_in_flight(&self) -> usize {
        lock(&self.state).max_out
    }

    /// Test hook: the slot the token was found in.
    pub(crate) fn slot_id(&self) -> Option<u64> {
        lock(&self.state).slot.map(|s| s.id())
    }
}

/// A permanent failure of one call, with a hint for the common ones.
pub(crate) fn call_error(e: &CkError) -> Error {
    let mut msg = format!("pkcs11: {}", describe(e));
    if let CkError::Pkcs11(rv, _) = e {
        match rv {
            RvError::MechanismInvalid | RvError::MechanismParamInvalid => {
                msg.push_str(": the token does not support the mechanism this key type needs")
            }
            RvError::TokenWriteProtected => msg.push_str(": the token is write-protected"),
            RvError::DeviceMemory => msg.push_str(": the token is full"),
            RvError::KeyFunctionNotPermitted => {
                msg.push_str(": the key's attributes do not allow this use")
            }
            _ => {}
        }
    }
    Error::KeyBackend(msg)
}

impl Drop for Token {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        let generation = self.module.generation();
        let idle = std::mem::take(&mut st.idle);
        if st.generation == generation {
            close_all(idle);
        }
        for (g, s) in std::mem::take(&mut st.stale) {
            if g == generation {
                let _ = s.close();
            }
        }
        // `module` is dropped next: it finalises the module if this was its last user.
    }
}
