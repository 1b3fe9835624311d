//! RFC 7512 `pkcs11:` URIs: parsing, percent coding, the canonical form, and where the PIN comes from.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

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

/// Where the PIN comes from. Never the URI itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// An environment variable.
    Env(String),
    /// A file of mode 0600.
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
    /// Reads the PIN, without its trailing line endings (`\n`, `\r`, however many, from
    /// either source). The error names the source, never the PIN.
    pub(super) fn read(&self, provider: &str) -> Result<Zeroizing<Vec<u8>>> {
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
            PinSource::File(p) => crate::fs::read_secret_file(p)?,
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
