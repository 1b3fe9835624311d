//! Key custody in a PKCS#11 HSM (feature `pkcs11`, crate `cryptoki`).
//!
//! The KEK is an AES key generated inside the token as non-extractable and sensitive
//! ([`generate_kek`], `shardlock keygen kek --pkcs11 URI`). DEKs are wrapped and unwrapped
//! by the token with `CKM_AES_KEY_WRAP_PAD` (AES key wrap with padding, RFC 5649): for a
//! 32-byte DEK the wrapped bytes are the same as [`super::Kek::wrap`] produces, so a
//! dataset moves between the keyring file and an HSM by rewrapping its DEKs only
//! (`shardlock rotate`).
//!
//! The provider is named by an RFC 7512 URI:
//!
//! ```text
//! pkcs11:token=shardlock;object=kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:HSM_PIN
//! ```
//!
//! - path attributes: `token` (label), `serial`, `manufacturer`, `model` select the
//!   token; `object` (label, required) and `id` select the KEK; `type` must be
//!   `secret-key` when given;
//! - query attributes: `module-path` (or `module-name`, searched in the usual module
//!   directories), `pin-source` (`env:VAR`, `file:/path` or `/path`; the file must be
//!   mode 0600; default: the `SHARDLOCK_PKCS11_PIN` variable), and the vendor attribute
//!   `x-allow-extractable=yes` to accept a KEK that can leave the HSM.
//!   `pin-value` is refused: a PIN in a URI ends up in `ps`, shell history and logs.
//!
//! One module context and one pool of logged-in sessions per token and process are
//! shared by every provider on that token; a session is used by one thread at a time
//! (taken from the pool, returned after the call), so the pipeline's workers unwrap in
//! parallel. Nothing ever waits for a session: an empty pool opens a new one.
//!
//! A PIN the token rejected is remembered (as a salted hash) and never tried again in
//! the process, so retries do not move the token's lockout counter. Set-up failures are
//! [`Error::KeyProvider`] with a [`ProviderFailure`] kind; failures while unwrapping a
//! shard's DEK (a wrapped DEK that does not unwrap, an HSM that disappears mid-run) are
//! [`Error::KeyUnavailable`] naming the provider.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use zeroize::{Zeroize, Zeroizing};

use super::{files, Dek, KeyProvider};
use crate::auth::Grant;
use crate::crypto;
use crate::error::{Error, ProviderFailure, Result};

/// Environment variable holding the PIN when the URI has no `pin-source`.
pub const DEFAULT_PIN_ENV: &str = "SHARDLOCK_PKCS11_PIN";

/// Directories searched for `module-name=NAME` (as `NAME.so` and `libNAME.so`).
const MODULE_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
    "/usr/lib/softhsm",
    "/usr/local/lib/softhsm",
    "/usr/lib64/softhsm",
];

/// Idle sessions kept per token; more may be open while more threads unwrap at once.
const MAX_IDLE_SESSIONS: usize = 32;

/// Where the PIN comes from. Never the URI itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// An environment variable.
    Env(String),
    /// A file of mode 0600 (one trailing newline is ignored).
    File(PathBuf),
}

/// How the module is named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleSpec {
    /// `module-path`: the shared library.
    Path(PathBuf),
    /// `module-name`: searched in the usual PKCS#11 module directories.
    Name(String),
}

/// A parsed RFC 7512 `pkcs11:` URI naming a token, a KEK and how to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// The PKCS#11 module.
    pub module: ModuleSpec,
    /// Token label.
    pub token: Option<String>,
    /// Token serial number.
    pub serial: Option<String>,
    /// Token manufacturer id.
    pub manufacturer: Option<String>,
    /// Token model.
    pub model: Option<String>,
    /// Label of the KEK object.
    pub object: String,
    /// CKA_ID of the KEK object, when given.
    pub id: Option<Vec<u8>>,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Accept a KEK that is extractable or not sensitive (`x-allow-extractable=yes`).
    pub allow_extractable: bool,
}

fn bad_uri(detail: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!(
        "PKCS#11 URI: {detail} (expected pkcs11:token=LABEL;object=KEK?module-path=/path/lib.so&pin-source=env:VAR)"
    ))
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// RFC 3986 percent-decoding of one attribute value.
fn pct_decode(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = b.get(i + 1).copied().and_then(hex_val);
            let lo = b.get(i + 2).copied().and_then(hex_val);
            match (hi, lo) {
                (Some(h), Some(l)) => out.push(h << 4 | l),
                _ => return Err(bad_uri(format!("bad percent-encoding in {s:?}"))),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn pct_encode(b: &[u8], out: &mut String) {
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~:/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
}

impl Pkcs11Uri {
    /// Parses `pkcs11:PATH-ATTRS[?QUERY-ATTRS]`. Unknown attributes are refused rather
    /// than ignored, so a typo cannot select another token or key.
    pub fn parse(s: &str) -> Result<Self> {
        let rest = s.strip_prefix("pkcs11:").ok_or_else(|| bad_uri("does not start with \"pkcs11:\""))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut seen: HashSet<&str> = HashSet::new();
        let text = |k: &str, v: Vec<u8>| {
            String::from_utf8(v).map_err(|_| bad_uri(format!("attribute {k} is not UTF-8 after percent-decoding")))
        };
        let (mut token, mut serial, mut manufacturer, mut model, mut object, mut id) =
            (None, None, None, None, None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr.split_once('=').ok_or_else(|| bad_uri(format!("path attribute {attr:?} has no '='")))?;
            if !seen.insert(k) {
                return Err(bad_uri(format!("attribute {k} given twice")));
            }
            let v = pct_decode(v)?;
            match k {
                "token" => token = Some(text(k, v)?),
                "serial" => serial = Some(text(k, v)?),
                "manufacturer" => manufacturer = Some(text(k, v)?),
                "model" => model = Some(text(k, v)?),
                "object" => object = Some(text(k, v)?),
                "id" => id = Some(v),
                "type" => {
                    if v != b"secret-key" {
                        return Err(bad_uri("type must be secret-key (the KEK is an AES secret key)"));
                    }
                }
                k if k.starts_with("pin-") || k.starts_with("module-") => {
                    return Err(bad_uri(format!("{k} is a query attribute: put it after '?'")))
                }
                k => {
                    return Err(bad_uri(format!(
                        "unsupported path attribute {k:?} (supported: token, serial, manufacturer, model, object, id, type)"
                    )))
                }
            }
        }
        let (mut module_path, mut module_name, mut pin, mut allow_extractable) = (None, None, None, false);
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr.split_once('=').ok_or_else(|| bad_uri(format!("query attribute {attr:?} has no '='")))?;
            if !seen.insert(k) {
                return Err(bad_uri(format!("attribute {k} given twice")));
            }
            match k {
                "pin-value" => {
                    return Err(bad_uri(
                        "pin-value is refused: a PIN in a URI shows in ps, shell history and logs; \
                         use pin-source=env:VAR or pin-source=file:/path (mode 0600)",
                    ))
                }
                "module-path" => module_path = Some(PathBuf::from(text(k, pct_decode(v)?)?)),
                "module-name" => module_name = Some(text(k, pct_decode(v)?)?),
                "pin-source" => {
                    let v = text(k, pct_decode(v)?)?;
                    pin = Some(if let Some(var) = v.strip_prefix("env:") {
                        if var.is_empty() {
                            return Err(bad_uri("pin-source=env: needs a variable name"));
                        }
                        PinSource::Env(var.to_owned())
                    } else if let Some(p) = v.strip_prefix("file://") {
                        PinSource::File(PathBuf::from(p))
                    } else if let Some(p) = v.strip_prefix("file:") {
                        PinSource::File(PathBuf::from(p))
                    } else if v.starts_with('/') {
                        PinSource::File(PathBuf::from(v))
                    } else {
                        return Err(bad_uri(format!(
                            "pin-source {v:?}: use env:VAR, file:/absolute/path or /absolute/path"
                        )));
                    });
                }
                "x-allow-extractable" => {
                    allow_extractable = match v {
                        "yes" | "true" | "1" => true,
                        "no" | "false" | "0" => false,
                        _ => return Err(bad_uri("x-allow-extractable takes yes or no")),
                    }
                }
                k => {
                    return Err(bad_uri(format!(
                        "unsupported query attribute {k:?} (supported: module-path, module-name, pin-source, x-allow-extractable)"
                    )))
                }
            }
        }
        let module = match (module_path, module_name) {
            (Some(p), None) => ModuleSpec::Path(p),
            (None, Some(n)) => ModuleSpec::Name(n),
            (Some(_), Some(_)) => return Err(bad_uri("give module-path or module-name, not both")),
            (None, None) => {
                return Err(bad_uri(
                    "no module: add module-path=/usr/lib/softhsm/libsofthsm2.so (or your HSM's module)",
                ))
            }
        };
        if token.is_none() && serial.is_none() {
            return Err(bad_uri("no token: add token=LABEL (or serial=...)"));
        }
        let object = object.ok_or_else(|| bad_uri("no KEK: add object=LABEL"))?;
        Ok(Self {
            module,
            token,
            serial,
            manufacturer,
            model,
            object,
            id,
            pin: pin.unwrap_or_else(|| PinSource::Env(DEFAULT_PIN_ENV.to_owned())),
            allow_extractable,
        })
    }

    /// The module path (resolving `module-name`).
    pub fn module_path(&self) -> Result<PathBuf> {
        match &self.module {
            ModuleSpec::Path(p) => Ok(p.clone()),
            ModuleSpec::Name(n) => MODULE_DIRS
                .iter()
                .flat_map(|d| [Path::new(d).join(format!("{n}.so")), Path::new(d).join(format!("lib{n}.so"))])
                .find(|p| p.is_file())
                .ok_or_else(|| Error::KeyProvider {
                    provider: self.describe(),
                    kind: ProviderFailure::ModuleLoad,
                    detail: format!(
                        "no module named {n:?} in {}; give module-path=/path/to/module.so",
                        MODULE_DIRS.join(", ")
                    ),
                }),
        }
    }

    /// A short human-readable name for errors and the audit log (no PIN, by construction).
    pub fn describe(&self) -> String {
        let token = match (&self.token, &self.serial) {
            (Some(t), _) => format!("token {t:?}"),
            (None, Some(s)) => format!("token serial {s:?}"),
            (None, None) => "token ?".into(),
        };
        let module = match &self.module {
            ModuleSpec::Path(p) => p.display().to_string(),
            ModuleSpec::Name(n) => n.clone(),
        };
        format!(
            "pkcs11 {token} object {:?} (module {module}){}",
            self.object,
            if self.allow_extractable { " [extractable KEK allowed]" } else { "" }
        )
    }
}

impl fmt::Display for Pkcs11Uri {
    /// The URI in canonical form (it never holds a PIN: only where to read it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::from("pkcs11:");
        let mut path: Vec<(&str, &[u8])> = Vec::new();
        for (k, v) in [("token", &self.token), ("serial", &self.serial), ("manufacturer", &self.manufacturer)] {
            if let Some(v) = v {
                path.push((k, v.as_bytes()));
            }
        }
        if let Some(v) = &self.model {
            path.push(("model", v.as_bytes()));
        }
        path.push(("object", self.object.as_bytes()));
        if let Some(id) = &self.id {
            path.push(("id", id));
        }
        for (i, (k, v)) in path.iter().enumerate() {
            if i > 0 {
                s.push(';');
            }
            s.push_str(k);
            s.push('=');
            pct_encode(v, &mut s);
        }
        s.push('?');
        match &self.module {
            ModuleSpec::Path(p) => {
                s.push_str("module-path=");
                pct_encode(p.as_os_str().as_encoded_bytes(), &mut s);
            }
            ModuleSpec::Name(n) => {
                s.push_str("module-name=");
                pct_encode(n.as_bytes(), &mut s);
            }
        }
        s.push_str("&pin-source=");
        match &self.pin {
            PinSource::Env(v) => {
                s.push_str("env:");
                pct_encode(v.as_bytes(), &mut s);
            }
            PinSource::File(p) => {
                s.push_str("file:");
                pct_encode(p.as_os_str().as_encoded_bytes(), &mut s);
            }
        }
        if self.allow_extractable {
            s.push_str("&x-allow-extractable=yes");
        }
        f.write_str(&s)
    }
}

impl PinSource {
    /// Reads the PIN. The error names the source, never the PIN.
    fn read(&self, provider: &str) -> Result<Zeroizing<Vec<u8>>> {
        let fail = |detail: String| Error::KeyProvider {
            provider: provider.to_owned(),
            kind: ProviderFailure::PinSource,
            detail,
        };
        let mut pin = match self {
            PinSource::Env(var) => match std::env::var_os(var) {
                Some(v) => Zeroizing::new(v.into_encoded_bytes()),
                None => {
                    return Err(fail(format!(
                        "environment variable {var} is not set; export it with the token's user PIN, or name \
                         another source with pin-source=env:VAR or pin-source=file:/path (mode 0600)"
                    )))
                }
            },
            PinSource::File(p) => files::read_secret_file(p)?,
        };
        while matches!(pin.last(), Some(b'\n' | b'\r')) {
            pin.pop();
        }
        if pin.is_empty() {
            return Err(fail(format!("the PIN from {} is empty", self.name())));
        }
        Ok(pin)
    }

    /// `$VAR` or the file path: where the PIN comes from, for messages.
    pub fn name(&self) -> String {
        match self {
            PinSource::Env(v) => format!("${v}"),
            PinSource::File(p) => p.display().to_string(),
        }
    }
}

/// Short PKCS#11 return-value name for error messages (`CKR_...`-like).
fn ck_name(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{rv:?} in {f:?}"),
        other => other.to_string(),
    }
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Errors after which a session (and probably every session of the token) is dead.
fn is_fatal(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::SlotIdInvalid
        )
    ) || matches!(e, CkError::LibraryLoading(_) | CkError::NullFunctionPointer)
}

fn is_handle_invalid(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::KeyHandleInvalid
                | RvError::UnwrappingKeyHandleInvalid
                | RvError::WrappingKeyHandleInvalid
                | RvError::ObjectHandleInvalid
        )
    )
}

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
struct SessionPool {
    module: Arc<Module>,
    slot: Slot,
    serial: String,
    label: String,
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

fn pool(uri: &Pkcs11Uri, provider: &str) -> Result<Arc<SessionPool>> {
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
/// dropped, unless it was discarded (then it is closed).
struct Lease<'a> {
    pool: &'a SessionPool,
    /// `Some` until the lease is dropped.
    session: Option<Session>,
    keep: Cell<bool>,
}

impl<'a> Lease<'a> {
    fn new(pool: &'a SessionPool, s: Session) -> Self {
        Self { pool, session: Some(s), keep: Cell::new(true) }
    }

    fn session(&self) -> &Session {
        self.session.as_ref().unwrap_or_else(|| unreachable!("a lease holds its session until dropped"))
    }

    /// The session (and, as the token probably went with it, every idle one) is dead.
    fn discard_all(&self) {
        self.keep.set(false);
        let idle = std::mem::take(&mut *self.pool.idle.lock().unwrap_or_else(|p| p.into_inner()));
        drop(idle);
    }

    /// Close this session instead of reusing it (a session object could not be
    /// destroyed: closing the session destroys it).
    fn discard(&self) {
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
    fn ctx(&self) -> &Pkcs11 {
        &self.module.ctx
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

    fn unavailable(&self, provider: &str, what: &str, e: &CkError) -> Error {
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
    fn checkout(&self, pin: &PinSource, provider: &str) -> Result<Lease<'_>> {
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
    fn login(&self, s: &Session, src: &PinSource, provider: &str) -> Result<()> {
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

/// Destroys a session object holding a DEK as soon as it is dropped, on every path; if
/// the token refuses, the session is closed instead of reused (which destroys it).
struct Destroy<'l, 'a>(&'l Lease<'a>, ObjectHandle);

impl Drop for Destroy<'_, '_> {
    fn drop(&mut self) {
        if self.0.session().destroy_object(self.1).is_err() {
            self.0.discard();
        }
    }
}

/// Template of a DEK as a short-lived session object (readable, so it can be copied out).
fn dek_template(value: Option<Vec<u8>>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ];
    if let Some(v) = value {
        t.push(Attribute::Value(v));
    }
    t
}

fn zeroize_template(t: &mut [Attribute]) {
    for a in t {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}

/// Counters of one provider (wraps, unwraps, time in unwrap) and of its token's logins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pkcs11Stats {
    /// DEKs wrapped.
    pub wraps: u64,
    /// DEKs unwrapped successfully.
    pub unwraps: u64,
    /// Total wall time of successful unwraps (HSM call, copy out, object destroyed), ns.
    pub unwrap_nanos: u64,
    /// C_Login calls this process made on the token.
    pub login_attempts: u64,
}

/// A KEK in a PKCS#11 token. See the module documentation.
pub struct Pkcs11Provider {
    uri: Pkcs11Uri,
    name: String,
    pool: Arc<SessionPool>,
    kek: Mutex<ObjectHandle>,
    kek_id: String,
    can_wrap: bool,
    wraps: AtomicU64,
    unwraps: AtomicU64,
    unwrap_nanos: AtomicU64,
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Provider({}, KEK {})", self.name, self.kek_id)
    }
}

fn require_mechanisms(pool: &SessionPool, provider: &str, need: &[MechanismType]) -> Result<()> {
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

/// The KEK id shardlock records in manifests for a key with CKA_ID `id`.
pub fn kek_id_for(id: &[u8]) -> String {
    format!("kek-{}", hex::encode(id))
}

fn find_kek(s: &Session, uri: &Pkcs11Uri) -> std::result::Result<Vec<ObjectHandle>, CkError> {
    let mut t = vec![Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(uri.object.as_bytes().to_vec())];
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    s.find_objects(&t)
}

impl Pkcs11Provider {
    /// Opens the KEK named by `uri`: loads the module, finds the token, logs in (once per
    /// process and token) and checks the key. Refuses an extractable or non-sensitive
    /// KEK unless the URI says `x-allow-extractable=yes`.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self> {
        let name = uri.describe();
        let pool = pool(uri, &name)?;
        require_mechanisms(&pool, &name, &[MechanismType::AES_KEY_WRAP_PAD])?;
        let lease = pool.checkout(&uri.pin, &name)?;
        // Check the PIN even when the token is already logged in (by another provider).
        pool.login(lease.session(), &uri.pin, &name)?;
        let s = lease.session();
        let fail = |kind, detail: String| Error::KeyProvider { provider: name.clone(), kind, detail };
        let handles = find_kek(s, uri).map_err(|e| pool.unavailable(&name, "C_FindObjects", &e))?;
        let h = match handles.as_slice() {
            [h] => *h,
            [] => {
                return Err(fail(
                    ProviderFailure::KekNotFound,
                    format!(
                        "token {:?} has no secret key labelled {:?}{}; create it with `shardlock keygen kek --pkcs11 \
                         '{uri}'`, or fix object= (and id=) in the URI",
                        pool.label,
                        uri.object,
                        uri.id.as_ref().map(|i| format!(" with id {}", hex::encode(i))).unwrap_or_default()
                    ),
                ))
            }
            many => {
                return Err(fail(
                    ProviderFailure::KekAmbiguous,
                    format!(
                        "{} secret keys on token {:?} are labelled {:?}; add id=%xx%xx... to the URI to pick one",
                        many.len(),
                        pool.label,
                        uri.object
                    ),
                ))
            }
        };
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::Unwrap,
                    AttributeType::Wrap,
                    AttributeType::Id,
                ],
            )
            .map_err(|e| pool.unavailable(&name, "C_GetAttributeValue", &e))?;
        let (mut key_type, mut len, mut extractable, mut sensitive, mut unwrap, mut wrap, mut id) =
            (None, None, None, None, None, None, Vec::new());
        for a in attrs {
            match a {
                Attribute::KeyType(k) => key_type = Some(k),
                Attribute::ValueLen(l) => len = Some(u64::from(l)),
                Attribute::Extractable(b) => extractable = Some(b),
                Attribute::Sensitive(b) => sensitive = Some(b),
                Attribute::Unwrap(b) => unwrap = Some(b),
                Attribute::Wrap(b) => wrap = Some(b),
                Attribute::Id(v) => id = v,
                _ => {}
            }
        }
        if key_type != Some(KeyType::AES) {
            return Err(fail(
                ProviderFailure::KekUnusable,
                format!("key {:?} is not an AES key; create a KEK with `shardlock keygen kek --pkcs11`", uri.object),
            ));
        }
        if !matches!(len, Some(16 | 24 | 32)) {
            return Err(fail(
                ProviderFailure::KekUnusable,
                format!(
                    "key {:?} is not a 128-, 192- or 256-bit AES key (CKA_VALUE_LEN {}); create a KEK with \
                     `shardlock keygen kek --pkcs11`",
                    uri.object,
                    len.map_or("unreadable".into(), |l| l.to_string())
                ),
            ));
        }
        if unwrap != Some(true) {
            return Err(fail(
                ProviderFailure::KekUnusable,
                format!("key {:?} does not allow unwrapping (CKA_UNWRAP is false)", uri.object),
            ));
        }
        if id.is_empty() {
            return Err(fail(
                ProviderFailure::KekUnusable,
                format!(
                    "key {:?} has no CKA_ID; shardlock names KEKs by it in manifests: set one (pkcs11-tool \
                     --id / softhsm2-util --id), or generate the KEK with `shardlock keygen kek --pkcs11`",
                    uri.object
                ),
            ));
        }
        if (extractable != Some(false) || sensitive != Some(true)) && !uri.allow_extractable {
            return Err(fail(
                ProviderFailure::KekExtractable,
                format!(
                    "key {:?} can leave the HSM (CKA_EXTRACTABLE {}, CKA_SENSITIVE {}), so it is no better than a \
                     key file; generate a non-extractable KEK with `shardlock keygen kek --pkcs11` and rotate to \
                     it, or add x-allow-extractable=yes to the URI to use this one anyway (recorded in the audit log)",
                    uri.object,
                    extractable.map_or("unreadable".into(), |b| b.to_string()),
                    sensitive.map_or("unreadable".into(), |b| b.to_string()),
                ),
            ));
        }
        drop(lease);
        Ok(Self {
            uri: uri.clone(),
            name,
            pool,
            kek: Mutex::new(h),
            kek_id: kek_id_for(&id),
            can_wrap: wrap == Some(true),
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            unwrap_nanos: AtomicU64::new(0),
        })
    }

    /// Parses `uri` and opens it.
    pub fn open_uri(uri: &str) -> Result<Self> {
        Self::open(&Pkcs11Uri::parse(uri)?)
    }

    /// The URI this provider was opened with.
    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// Counters since the provider was opened.
    pub fn stats(&self) -> Pkcs11Stats {
        Pkcs11Stats {
            wraps: self.wraps.load(Ordering::Relaxed),
            unwraps: self.unwraps.load(Ordering::Relaxed),
            unwrap_nanos: self.unwrap_nanos.load(Ordering::Relaxed),
            login_attempts: self.pool.auth.lock().unwrap_or_else(|p| p.into_inner()).attempts,
        }
    }

    /// Runs `op` with a pooled session and the KEK handle. A stale KEK handle (the token
    /// was re-inserted) is looked up once more; a dead session or token becomes
    /// [`Error::KeyUnavailable`] naming this provider, never a retry loop.
    fn with_kek<T>(
        &self,
        what: &str,
        mut op: impl FnMut(&Lease<'_>, ObjectHandle) -> std::result::Result<T, CkError>,
    ) -> Result<T> {
        let unavailable = |detail: String| Error::KeyUnavailable { key_id: self.kek_id.clone(), detail };
        for attempt in 0..2 {
            let lease = self.pool.checkout(&self.uri.pin, &self.name).map_err(|e| unavailable(e.to_string()))?;
            let kek = *self.kek.lock().unwrap_or_else(|p| p.into_inner());
            let err = match op(&lease, kek) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if attempt == 0 && is_handle_invalid(&err) {
                match find_kek(lease.session(), &self.uri) {
                    Ok(hs) if hs.len() == 1 => {
                        *self.kek.lock().unwrap_or_else(|p| p.into_inner()) = hs[0];
                        continue;
                    }
                    Ok(_) => {
                        return Err(unavailable(format!(
                            "{}: {what} failed ({}): the KEK is no longer on the token (deleted, or the token was \
                             removed or re-initialised); restore the token, or use the provider the dataset was \
                             rotated to",
                            self.name,
                            ck_name(&err)
                        )))
                    }
                    Err(e) if is_fatal(&e) => lease.discard_all(),
                    Err(_) => {}
                }
            }
            if is_fatal(&err) || is_handle_invalid(&err) {
                lease.discard_all();
                return Err(unavailable(format!(
                    "{}: {what} failed ({}): the HSM is unavailable (token removed, device error or module \
                     failure); check the HSM and restart the job",
                    self.name,
                    ck_name(&err)
                )));
            }
            return Err(unavailable(format!("{}: {what} failed ({})", self.name, ck_name(&err))));
        }
        Err(unavailable(format!("{}: {what} failed: the KEK handle keeps changing", self.name)))
    }
}

impl KeyProvider for Pkcs11Provider {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn active_kek_id(&self) -> &str {
        &self.kek_id
    }

    fn wrap_dek(&self, dek: &Dek) -> Result<(String, Vec<u8>)> {
        if !self.can_wrap {
            return Err(Error::KeyUnavailable {
                key_id: self.kek_id.clone(),
                detail: format!(
                    "{}: the KEK does not allow wrapping (CKA_WRAP is false); it can only read datasets",
                    self.name
                ),
            });
        }
        let wrapped = self.with_kek("C_WrapKey", |lease, kek| {
            let s = lease.session();
            let mut t = dek_template(Some(dek.expose().to_vec()));
            let created = s.create_object(&t);
            zeroize_template(&mut t);
            let h = created?;
            let _destroy = Destroy(lease, h);
            s.wrap_key(&Mechanism::AesKeyWrapPad, kek, h)
        })?;
        self.wraps.fetch_add(1, Ordering::Relaxed);
        Ok((self.kek_id.clone(), wrapped))
    }

    fn unwrap_dek(&self, grant: Grant) -> Result<Dek> {
        if grant.kek_id() != self.kek_id {
            return Err(Error::KeyUnavailable {
                key_id: grant.kek_id().to_owned(),
                detail: format!(
                    "{} holds KEK {}, not the one dataset {:?} shard {} is wrapped under; use the key provider the \
                     dataset was packed or last rotated with",
                    self.name,
                    self.kek_id,
                    grant.dataset(),
                    grant.shard()
                ),
            });
        }
        let t0 = Instant::now();
        let raw = self.with_kek("C_UnwrapKey", |lease, kek| {
            let s = lease.session();
            let template = dek_template(None);
            let h = match s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, grant.wrapped_dek(), &template) {
                Ok(h) => h,
                // A wrapped key that fails the KWP check: not a device problem.
                Err(e)
                    if matches!(
                        rv(&e),
                        Some(
                            RvError::GeneralError
                                | RvError::WrappedKeyInvalid
                                | RvError::WrappedKeyLenRange
                                | RvError::EncryptedDataInvalid
                                | RvError::EncryptedDataLenRange
                        )
                    ) =>
                {
                    return Ok(Err(ck_name(&e)))
                }
                Err(e) => return Err(e),
            };
            let destroy = Destroy(lease, h);
            // cryptoki copies the value out of its own buffer, which it frees without
            // zeroizing (see docs/HSM.md); every copy made here is zeroized.
            let mut attrs = s.get_attributes(h, &[AttributeType::Value])?;
            let mut out = Zeroizing::new(Vec::with_capacity(32));
            for a in &attrs {
                if let Attribute::Value(v) = a {
                    out.extend_from_slice(v);
                }
            }
            zeroize_template(&mut attrs);
            drop(destroy);
            Ok(Ok(out))
        })?;
        let fail = |why: &str| Error::KeyUnavailable {
            key_id: self.kek_id.clone(),
            detail: format!(
                "{}: the wrapped DEK of dataset {:?} shard {} {why} under this KEK (the manifest entry was altered, \
                 or it was wrapped by another key with the same id); restore the manifest, or open the dataset with \
                 the provider that wrapped it",
                self.name,
                grant.dataset(),
                grant.shard()
            ),
        };
        let raw = raw.map_err(|rv| fail(&format!("does not unwrap ({rv})")))?;
        let dek = Dek::from_slice(&raw).ok_or_else(|| fail("unwraps to a key that is not 32 bytes"))?;
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        self.unwrap_nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(dek)
    }
}

/// Generates a KEK inside the token named by `uri`: AES-256, non-extractable,
/// sensitive, private, usable only to wrap and unwrap, labelled `object` with a random
/// 8-byte CKA_ID (or the URI's `id`). Refuses if a key with that label exists. Returns
/// the KEK id recorded in manifests.
pub fn generate_kek(uri: &Pkcs11Uri) -> Result<String> {
    let name = uri.describe();
    let pool = pool(uri, &name)?;
    require_mechanisms(&pool, &name, &[MechanismType::AES_KEY_GEN, MechanismType::AES_KEY_WRAP_PAD])?;
    // A pooled session holds the login after keygen (closing a token's last session logs
    // it out); the read-write session for the new token object shares that login.
    let lease = pool.checkout(&uri.pin, &name)?;
    pool.login(lease.session(), &uri.pin, &name)?;
    let s = pool.ctx().open_rw_session(pool.slot).map_err(|e| pool.unavailable(&name, "C_OpenSession (rw)", &e))?;
    let existing = find_kek(&s, &Pkcs11Uri { id: None, ..uri.clone() })
        .map_err(|e| pool.unavailable(&name, "C_FindObjects", &e))?;
    if !existing.is_empty() {
        return Err(Error::KeyProvider {
            provider: name,
            kind: ProviderFailure::AlreadyExists,
            detail: format!(
                "token {:?} already has a key labelled {:?}; keygen never replaces a key: pick another object= label",
                pool.label, uri.object
            ),
        });
    }
    let id = match &uri.id {
        Some(id) if !id.is_empty() => id.clone(),
        _ => {
            let mut id = vec![0u8; 8];
            crypto::random_bytes(&mut id)?;
            id
        }
    };
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(uri.object.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    s.generate_key(&Mechanism::AesKeyGen, &template).map_err(|e| match rv(&e) {
        Some(_) if !is_fatal(&e) => Error::KeyProvider {
            provider: name.clone(),
            kind: ProviderFailure::Unsupported,
            detail: format!("the token refused to generate a non-extractable AES-256 KEK ({})", ck_name(&e)),
        },
        _ => pool.unavailable(&name, "C_GenerateKey", &e),
    })?;
    Ok(kek_id_for(&id))
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
        .map(|p| p.auth.lock().unwrap_or_else(|e| e.into_inner()).attempts)
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_rfc7512_uris() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=shard%20lock;object=kek;id=%01%02;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("shard lock"));
        assert_eq!(u.object, "kek");
        assert_eq!(u.id.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(u.module, ModuleSpec::Path("/usr/lib/softhsm/libsofthsm2.so".into()));
        assert_eq!(u.pin, PinSource::File("/run/pin".into()));
        assert!(!u.allow_extractable);
        // Canonical form round-trips.
        assert_eq!(Pkcs11Uri::parse(&u.to_string()).unwrap(), u);

        let u =
            Pkcs11Uri::parse("pkcs11:token=t;object=k?module-name=softhsm2&pin-source=env:P&x-allow-extractable=yes")
                .unwrap();
        assert_eq!(u.pin, PinSource::Env("P".into()));
        assert_eq!(u.module, ModuleSpec::Name("softhsm2".into()));
        assert!(u.allow_extractable);
        let u = Pkcs11Uri::parse("pkcs11:serial=abc;object=k?module-path=/m.so").unwrap();
        assert_eq!(u.pin, PinSource::Env(DEFAULT_PIN_ENV.into()));
        assert!(u.describe().contains("serial \"abc\""));
    }

    #[test]
    fn refuses_bad_uris_and_pin_values() {
        for (uri, why) in [
            ("token=t;object=k?module-path=/m.so", "pkcs11:"),
            ("pkcs11:token=t;object=k?module-path=/m.so&pin-value=1234", "pin-value is refused"),
            ("pkcs11:token=t?module-path=/m.so", "object"),
            ("pkcs11:object=k?module-path=/m.so", "token"),
            ("pkcs11:token=t;object=k", "module"),
            ("pkcs11:token=t;object=k;slot-id=3?module-path=/m.so", "slot-id"),
            ("pkcs11:token=t;object=k;type=private?module-path=/m.so", "secret-key"),
            ("pkcs11:token=t;token=u;object=k?module-path=/m.so", "twice"),
            ("pkcs11:token=t%zz;object=k?module-path=/m.so", "percent"),
            ("pkcs11:token=t;object=k?module-path=/m.so&pin-source=relative", "pin-source"),
            ("pkcs11:token=t;object=k?module-path=/m.so&x-sessions=3", "x-sessions"),
            ("pkcs11:token=t;object=k;module-path=/m.so", "query attribute"),
        ] {
            let e = Pkcs11Uri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
            assert!(!e.contains("1234"), "the PIN leaked into an error: {e}");
        }
    }
}
