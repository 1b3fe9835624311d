//! The process-wide registry of modules and the pool of logged-in sessions per token.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;

use super::rv::ck_name;
use super::uri::{PinSource, Pkcs11Uri};
use crate::crypto;
use crate::error::{Error, ProviderFailure, Result};

/// Idle sessions kept per token; more may be open while more threads unwrap at once.
const MAX_IDLE_SESSIONS: usize = 32;

// ---------------------------------------------------------------------------------------
// Process-wide registry: one initialised context per module, one session pool per token.

struct Module {
    path: PathBuf,
    ctx: Pkcs11,
}

struct Registry {
    pid: u32,
    modules: HashMap<PathBuf, Arc<Module>>,
    pools: Vec<Arc<SessionPool>>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn registry() -> MutexGuard<'static, Option<Registry>> {
    let mut g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if let Some(r) = g.as_mut().filter(|r| r.pid != pid) {
        // A forked child: the parent's sessions are not ours to close (for a networked HSM
        // that would close the parent's), so they are leaked; each module is finalised and
        // initialised again, as PKCS#11 requires of a child.
        for p in r.pools.drain(..) {
            let idle = std::mem::take(&mut *p.idle.lock().unwrap_or_else(|e| e.into_inner()));
            std::mem::forget(idle);
        }
        for m in r.modules.values() {
            let _ = m.ctx.clone().finalize();
        }
        r.modules.clear();
        r.pid = pid;
    }
    if g.is_none() {
        *g = Some(Registry { pid, modules: HashMap::new(), pools: Vec::new() });
    }
    g
}

fn module(path: &Path, provider: &str) -> Result<Arc<Module>> {
    let fail = |detail: String| Error::KeyProvider {
        provider: provider.to_owned(),
        kind: ProviderFailure::ModuleLoad,
        detail,
    };
    if !path.is_file() {
        return Err(fail(format!(
            "{} does not exist; install the HSM's PKCS#11 module (SoftHSM2: apt-get install softhsm2, \
             module /usr/lib/softhsm/libsofthsm2.so) or fix module-path",
            path.display()
        )));
    }
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mut g = registry();
    let reg = g.as_mut().ok_or_else(|| Error::Internal("pkcs11 registry".into()))?;
    if let Some(m) = reg.modules.get(&key) {
        return Ok(m.clone());
    }
    let ctx = Pkcs11::new(&key)
        .map_err(|e| fail(format!("{} is not a loadable PKCS#11 module ({e}); check module-path", path.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another library in this process initialised the module first: share it.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(fail(format!(
                "C_Initialize of {} failed ({}); for SoftHSM2 check SOFTHSM2_CONF and its tokendir",
                path.display(),
                ck_name(&e)
            )))
        }
    }
    let m = Arc::new(Module { path: key.clone(), ctx });
    reg.modules.insert(key, m.clone());
    Ok(m)
}

struct AuthState {
    salt: [u8; 32],
    /// Salted hash of the PIN this process logged in with.
    good: Option<[u8; 32]>,
    /// Salted hashes of PINs the token rejected: never tried again.
    rejected: Vec<[u8; 32]>,
    /// C_Login calls made by this process on this token.
    attempts: u64,
}

/// The logged-in sessions of one token, shared by every provider on it in this process.
pub(super) struct SessionPool {
    module: Arc<Module>,
    pub(super) slot: Slot,
    serial: String,
    pub(super) label: String,
    pid: u32,
    idle: Mutex<Vec<Session>>,
    auth: Mutex<AuthState>,
}

fn token_matches(uri: &Pkcs11Uri, info: &cryptoki::slot::TokenInfo) -> bool {
    uri.token.as_deref().is_none_or(|t| info.label() == t.trim_end())
        && uri.serial.as_deref().is_none_or(|s| info.serial_number() == s.trim_end())
        && uri.manufacturer.as_deref().is_none_or(|s| info.manufacturer_id() == s.trim_end())
        && uri.model.as_deref().is_none_or(|s| info.model() == s.trim_end())
}

pub(super) fn pool(uri: &Pkcs11Uri, provider: &str) -> Result<Arc<SessionPool>> {
    let path = uri.module_path()?;
    let m = module(&path, provider)?;
    let unavailable = |e: CkError| Error::KeyProvider {
        provider: provider.to_owned(),
        kind: ProviderFailure::Unavailable,
        detail: format!("listing the module's tokens failed ({}); check the HSM and its module", ck_name(&e)),
    };
    let slots = m.ctx.get_slots_with_token().map_err(unavailable)?;
    let mut found = Vec::new();
    let mut labels = Vec::new();
    for s in slots {
        let Ok(info) = m.ctx.get_token_info(s) else { continue };
        if !info.token_initialized() {
            continue;
        }
        labels.push(format!("{:?}", info.label()));
        if token_matches(uri, &info) {
            found.push((s, info));
        }
    }
    let (slot, info) = match found.len() {
        1 => found.remove(0),
        0 => {
            return Err(Error::KeyProvider {
                provider: provider.to_owned(),
                kind: ProviderFailure::TokenNotFound,
                detail: format!(
                    "no initialised token matches; the module has {}. Fix token= in the URI{}",
                    if labels.is_empty() { "no initialised token".into() } else { labels.join(", ") },
                    if path.to_string_lossy().contains("softhsm") {
                        " (SoftHSM2: create one with softhsm2-util --init-token --free --label LABEL, \
                         with the same SOFTHSM2_CONF)"
                    } else {
                        ""
                    }
                ),
            })
        }
        n => {
            return Err(Error::KeyProvider {
                provider: provider.to_owned(),
                kind: ProviderFailure::TokenNotFound,
                detail: format!("{n} tokens match; add serial= to the URI to pick one"),
            })
        }
    };
    let mut g = registry();
    let reg = g.as_mut().ok_or_else(|| Error::Internal("pkcs11 registry".into()))?;
    if let Some(p) = reg.pools.iter().find(|p| Arc::ptr_eq(&p.module, &m) && p.slot == slot) {
        return Ok(p.clone());
    }
    let mut salt = [0u8; 32];
    crypto::random_bytes(&mut salt)?;
    let p = Arc::new(SessionPool {
        module: m,
        slot,
        serial: info.serial_number().to_owned(),
        label: info.label().to_owned(),
        pid: std::process::id(),
        idle: Mutex::new(Vec::new()),
        auth: Mutex::new(AuthState { salt, good: None, rejected: Vec::new(), attempts: 0 }),
    });
    reg.pools.push(p.clone());
    Ok(p)
}

/// A session taken from a pool for one call on one thread; it goes back to the pool when
/// dropped, unless it was discarded or the pool already keeps [`MAX_IDLE_SESSIONS`] idle
/// ones (then it is closed), or it belongs to the parent of a fork (then it is leaked).
pub(super) struct Lease<'a> {
    pool: &'a SessionPool,
    /// `Some` until the lease is dropped.
    session: Option<Session>,
    keep: Cell<bool>,
}

impl<'a> Lease<'a> {
    fn new(pool: &'a SessionPool, s: Session) -> Self {
        Self { pool, session: Some(s), keep: Cell::new(true) }
    }

    pub(super) fn session(&self) -> &Session {
        self.session.as_ref().unwrap_or_else(|| unreachable!("a lease holds its session until dropped"))
    }

    /// The session (and, as the token probably went with it, every idle one) is dead.
    pub(super) fn discard_all(&self) {
        self.keep.set(false);
        let idle = std::mem::take(&mut *self.pool.idle.lock().unwrap_or_else(|p| p.into_inner()));
        drop(idle);
    }

    /// Close this session instead of reusing it (a session object could not be
    /// destroyed: closing the session destroys it).
    pub(super) fn discard(&self) {
        self.keep.set(false);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(s) = self.session.take() else { return };
        if std::process::id() != self.pool.pid {
            // The parent's session: not ours to close.
            std::mem::forget(s);
            return;
        }
        if self.keep.get() {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE_SESSIONS {
                idle.push(s);
            }
        }
    }
}

impl SessionPool {
    pub(super) fn ctx(&self) -> &Pkcs11 {
        &self.module.ctx
    }

    /// C_Login calls this process has made on the token (the login state itself stays
    /// private to this module).
    pub(super) fn login_attempts(&self) -> u64 {
        self.auth.lock().unwrap_or_else(|p| p.into_inner()).attempts
    }

    fn tag(salt: &[u8; 32], pin: &[u8]) -> [u8; 32] {
        let mut h = crypto::Sha256::default();
        h.update(salt);
        h.update(pin);
        h.finish()
    }

    fn stale(&self, provider: &str) -> Option<Error> {
        (std::process::id() != self.pid).then(|| Error::KeyProvider {
            provider: provider.to_owned(),
            kind: ProviderFailure::Unavailable,
            detail: "this provider was opened in another process (before a fork); open it again in this process".into(),
        })
    }

    pub(super) fn unavailable(&self, provider: &str, what: &str, e: &CkError) -> Error {
        Error::KeyProvider {
            provider: provider.to_owned(),
            kind: ProviderFailure::Unavailable,
            detail: format!(
                "{what} failed ({}): the token {:?} (serial {}) or its module is unavailable (removed, device error, \
                 module failure); check the HSM, then restart the job",
                ck_name(e),
                self.label,
                self.serial
            ),
        }
    }

    /// A session for one call: an idle one, or a new one (logged in if the token lost
    /// its login). Never waits.
    pub(super) fn checkout(&self, pin: &PinSource, provider: &str) -> Result<Lease<'_>> {
        if let Some(e) = self.stale(provider) {
            return Err(e);
        }
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(s) = idle {
            return Ok(Lease::new(self, s));
        }
        let s = self.ctx().open_ro_session(self.slot).map_err(|e| self.unavailable(provider, "C_OpenSession", &e))?;
        let lease = Lease::new(self, s);
        let state = match lease.session().get_session_info() {
            Ok(i) => i.session_state(),
            Err(e) => {
                lease.discard();
                return Err(self.unavailable(provider, "C_GetSessionInfo", &e));
            }
        };
        if !matches!(state, SessionState::RoUser | SessionState::RwUser) {
            self.login(lease.session(), pin, provider)?;
        }
        Ok(lease)
    }

    /// Logs the token in with the PIN from `src` once per process, or checks that `src`
    /// holds the PIN the process logged in with. A PIN the token rejected is never sent
    /// again.
    pub(super) fn login(&self, s: &Session, src: &PinSource, provider: &str) -> Result<()> {
        let mut pin = src.read(provider)?;
        let mut a = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        let tag = Self::tag(&a.salt, &pin);
        let fail = |kind, detail: String| Error::KeyProvider { provider: provider.to_owned(), kind, detail };
        if a.rejected.iter().any(|r| crypto::ct_eq(r, &tag)) {
            return Err(fail(
                ProviderFailure::PinIncorrect,
                format!(
                    "the token {:?} already rejected the PIN from {} in this process; it is not tried again, so the \
                     token's lockout counter does not move. Fix the PIN source and restart",
                    self.label,
                    src.name()
                ),
            ));
        }
        let state =
            s.get_session_info().map_err(|e| self.unavailable(provider, "C_GetSessionInfo", &e))?.session_state();
        if matches!(state, SessionState::RoUser | SessionState::RwUser) {
            return match a.good {
                Some(g) if !crypto::ct_eq(&g, &tag) => Err(fail(
                    ProviderFailure::PinIncorrect,
                    "this PIN differs from the one this process logged in to the token with; use the same PIN \
                     source for every provider on one token"
                        .into(),
                )),
                // Logged in with this PIN, or by another library in the process.
                _ => Ok(()),
            };
        }
        let info =
            self.ctx().get_token_info(self.slot).map_err(|e| self.unavailable(provider, "C_GetTokenInfo", &e))?;
        if info.user_pin_locked() {
            return Err(fail(
                ProviderFailure::PinLocked,
                format!(
                    "the user PIN of token {:?} is locked after too many wrong PINs; the security officer must \
                     reset it (C_InitPIN, e.g. pkcs11-tool --init-pin --login --login-type so)",
                    self.label
                ),
            ));
        }
        a.attempts += 1;
        let raw = RawAuthPin::new(Box::new(std::mem::take(&mut *pin)));
        match s.login_with_raw(UserType::User, &raw) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                a.good = Some(tag);
                Ok(())
            }
            Err(CkError::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange), _)) => {
                a.rejected.push(tag);
                let after = self.ctx().get_token_info(self.slot).ok();
                let warn = match after {
                    Some(i) if i.user_pin_locked() => " The PIN is now locked: the security officer must reset it.",
                    Some(i) if i.user_pin_final_try() => {
                        " One more wrong PIN locks the token: check the PIN before the next run."
                    }
                    Some(i) if i.user_pin_count_low() => " The token counts failed logins.",
                    _ => "",
                };
                Err(fail(
                    ProviderFailure::PinIncorrect,
                    format!(
                        "the token {:?} rejected the PIN from {} ({rv:?}); shardlock does not retry it.{warn} \
                         Fix the PIN source",
                        self.label,
                        src.name()
                    ),
                ))
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(fail(
                ProviderFailure::PinLocked,
                format!("the user PIN of token {:?} is locked; the security officer must reset it", self.label),
            )),
            Err(e) => Err(self.unavailable(provider, "C_Login", &e)),
        }
    }
}

pub(super) fn require_mechanisms(pool: &SessionPool, provider: &str, need: &[MechanismType]) -> Result<()> {
    let have =
        pool.ctx().get_mechanism_list(pool.slot).map_err(|e| pool.unavailable(provider, "C_GetMechanismList", &e))?;
    for m in need {
        if !have.contains(m) {
            return Err(Error::KeyProvider {
                provider: provider.to_owned(),
                kind: ProviderFailure::Unsupported,
                detail: format!(
                    "token {:?} does not offer {m} (AES key wrap with padding, RFC 5649), which shardlock's wrapped \
                     DEKs use; use another HSM or the keyring file",
                    pool.label
                ),
            });
        }
    }
    Ok(())
}

/// C_Login calls this process has made on the token `uri` names (0 if it never opened
/// it). A diagnostic: a rejected PIN is tried once, however often a provider is opened.
pub fn login_attempts(uri: &Pkcs11Uri) -> u64 {
    let Ok(path) = uri.module_path() else { return 0 };
    let key = std::fs::canonicalize(&path).unwrap_or(path);
    let g = registry();
    let Some(reg) = g.as_ref() else { return 0 };
    reg.pools
        .iter()
        .filter(|p| p.module.path == key)
        .filter(|p| {
            uri.token.as_deref().is_none_or(|t| p.label == t) && uri.serial.as_deref().is_none_or(|s| p.serial == s)
        })
        .map(|p| p.login_attempts())
        .sum()
}
