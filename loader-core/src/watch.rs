//! Documents that are re-read when they change: the deny list, and the key service's
//! trust anchors. One mechanism serves both:
//!
//! - a file is checked at each use: when its size, mtime, ctime or inode changed since
//!   the last read (good or bad), it is read again through one handle (mode checked on
//!   that handle, size bounded) and parsed whole;
//! - with feature `keyd`, an `https://` URL (plain `http://` on loopback only) is
//!   fetched once at start and then by [`Watched::poll`] at the service's interval,
//!   with `If-None-Match` / `If-Modified-Since` when the server gave an ETag or a
//!   Last-Modified.
//!
//! The first read must succeed (a configured document never silently starts empty).
//! After that a failure either fails closed (every use returns the error until the file
//! is good again) or keeps the last good content; URLs always keep it. A document's
//! [`Document::merge`] decides what a new good copy replaces (the deny list only ever
//! grows). Changes and failures go to an optional [`Reporter`], once each: a failure is
//! reported again only when its text changes.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// A parsed document that can be watched.
pub(crate) trait Document: Sized + Send + Sync + 'static {
    /// What it is, in errors and logs ("deny list").
    const WHAT: &'static str;
    /// The operation an I/O error on its file names ("read deny list").
    const READ: &'static str;
    /// Largest accepted size in bytes.
    const MAX_LEN: u64;
    /// What someone else who can write the file could do (why such a file is refused).
    const WRITABLE_RISK: &'static str;
    /// Parses a whole document; `origin` names it in errors (a file, or a URL without
    /// its user info and query).
    fn parse(bytes: &[u8], origin: &Path) -> Result<Self>;
    /// What is kept when a good `new` copy replaces `old` (by default `new`).
    fn merge(_old: &Self, new: Self) -> Self {
        new
    }
    /// Entries, for logs.
    fn entries(&self) -> usize;
}

/// What happens when a file that was read once can no longer be read or parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnError {
    /// Every use returns the error until the file is good again.
    FailClosed,
    /// The last good content stays in use.
    KeepLast,
}

/// A change worth a log line.
#[derive(Debug)]
#[cfg_attr(not(feature = "keyd"), allow(dead_code))]
pub(crate) enum Event<'a> {
    /// A new good copy is in use (or a failing document is good again).
    Reloaded {
        /// [`Document::WHAT`].
        what: &'static str,
        /// The file, or the URL without user info and query.
        source: &'a Path,
        /// Entries in use now.
        entries: usize,
    },
    /// A read, fetch or parse failed.
    Failed {
        /// [`Document::WHAT`].
        what: &'static str,
        /// The file, or the URL without user info and query.
        source: &'a Path,
        /// What failed (never a secret: URLs in it are redacted).
        error: &'a Error,
        /// Entries of the last good copy still in use; `None` when failing closed.
        kept: Option<usize>,
    },
}

/// Where [`Event`]s go (the key service's log).
pub(crate) type Reporter = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// (mtime, mtime ns, size, inode, ctime, ctime ns).
type Stamp = (i64, i64, u64, u64, i64, i64);

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.mtime(), m.mtime_nsec(), m.len(), m.ino(), m.ctime(), m.ctime_nsec())
}

enum Origin {
    File(PathBuf),
    #[cfg(feature = "keyd")]
    Url(remote::Remote),
}

struct State<T> {
    value: Arc<T>,
    /// SHA-256 of the good copy in use.
    digest: [u8; 32],
    /// The file's stamp at the last read, good or bad (`None`: it could not be stat'ed).
    stamp: Option<Stamp>,
    /// The last read's error, while it stands.
    failure: Option<Error>,
    /// The server's ETag and Last-Modified for the good copy in use.
    #[cfg(feature = "keyd")]
    validators: remote::Validators,
}

/// A document re-read when it changes (see the module docs).
pub(crate) struct Watched<T: Document> {
    origin: Origin,
    /// The file, or the URL without user info and query: what errors and logs show.
    name: PathBuf,
    on_error: OnError,
    report: Option<Reporter>,
    state: Mutex<State<T>>,
}

/// Reads a document file through one handle: its stamp (of that handle), and at most
/// `T::MAX_LEN` bytes, refusing a file others can write.
fn read_file<T: Document>(path: &Path) -> Result<(Stamp, Zeroizing<Vec<u8>>)> {
    let bad = |detail: String| Error::Format { what: T::WHAT, path: path.to_owned(), detail };
    let mut f = std::fs::File::open(path).map_err(Error::io(T::READ, path))?;
    let meta = f.metadata().map_err(Error::io("stat", path))?;
    if meta.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "writable by group or others (mode {:o}); {}: chmod 644",
            meta.mode() & 0o777,
            T::WRITABLE_RISK
        )));
    }
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > T::MAX_LEN {
        return Err(bad(format!("larger than {} MiB", T::MAX_LEN >> 20)));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    (&mut f).take(T::MAX_LEN + 1).read_to_end(&mut bytes).map_err(Error::io(T::READ, path))?;
    if bytes.len() as u64 > T::MAX_LEN {
        return Err(bad(format!("larger than {} MiB", T::MAX_LEN >> 20)));
    }
    Ok((stamp(&meta), bytes))
}

impl<T: Document> Watched<T> {
    /// Watches the file at `path`; reading or parsing it fails now.
    pub(crate) fn file(path: &Path, on_error: OnError, report: Option<Reporter>) -> Result<Self> {
        let (st, bytes) = read_file::<T>(path)?;
        let value = T::parse(&bytes, path)?;
        Ok(Self {
            origin: Origin::File(path.to_owned()),
            name: path.to_owned(),
            on_error,
            report,
            state: Mutex::new(State {
                value: Arc::new(value),
                digest: crate::crypto::sha256(&bytes),
                stamp: Some(st),
                failure: None,
                #[cfg(feature = "keyd")]
                validators: remote::Validators::default(),
            }),
        })
    }

    /// Watches `source`: a file as [`Watched::file`] does, or a URL, fetched now (a
    /// failure is an error naming the URL and what to check) and then by
    /// [`Watched::poll`]; `ca` is the PEM CA file for `https://` (else `SSL_CERT_FILE`,
    /// else the system bundle).
    #[cfg(feature = "keyd")]
    pub(crate) fn open(
        source: &Source,
        on_error: OnError,
        ca: Option<&Path>,
        report: Option<Reporter>,
    ) -> Result<Self> {
        let text = match source {
            Source::File(p) => return Self::file(p, on_error, report),
            Source::Url(u) => u,
        };
        let remote = remote::Remote::open(text, T::WHAT, ca)?;
        let name = PathBuf::from(remote.shown());
        let first = remote.fetch(&remote::Validators::default(), T::MAX_LEN).and_then(|f| match f {
            remote::Fetched::Body { bytes, validators } => {
                let value = T::parse(&bytes, &name)?;
                Ok((value, crate::crypto::sha256(&bytes), validators))
            }
            remote::Fetched::NotModified => {
                Err(Error::InvalidArgument("answered 304 to a request without a validator".into()))
            }
        });
        let (value, digest, validators) = first.map_err(|e| {
            Error::InvalidArgument(format!(
                "the {} at {} could not be fetched at start ({e}); the service does not start without it: check the URL, that the server answers it, and the CA that signs its certificate (--source-ca, else SSL_CERT_FILE, else the system bundle)",
                T::WHAT,
                name.display()
            ))
        })?;
        Ok(Self {
            origin: Origin::Url(remote),
            name,
            on_error: OnError::KeepLast,
            report,
            state: Mutex::new(State { value: Arc::new(value), digest, stamp: None, failure: None, validators }),
        })
    }

    /// The file, or the URL without user info and query.
    pub(crate) fn name(&self) -> &Path {
        &self.name
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The content in use, after re-reading a file that changed. An error only for a
    /// file that fails closed and cannot be read or parsed now.
    pub(crate) fn current(&self) -> Result<Arc<T>> {
        match &self.origin {
            Origin::File(path) => self.refresh_file(path),
            #[cfg(feature = "keyd")]
            Origin::Url(_) => Ok(self.state().value.clone()),
        }
    }

    fn refresh_file(&self, path: &Path) -> Result<Arc<T>> {
        let now = std::fs::metadata(path).map(|m| stamp(&m));
        let mut st = self.state();
        if let Ok(s) = &now {
            if st.stamp == Some(*s) {
                return match (&st.failure, self.on_error) {
                    (Some(e), OnError::FailClosed) => Err(e.clone()),
                    _ => Ok(st.value.clone()),
                };
            }
        }
        let read = now.map_err(Error::io(T::READ, path)).and_then(|_| read_file::<T>(path)).and_then(|(s, bytes)| {
            st.stamp = Some(s);
            let digest = crate::crypto::sha256(&bytes);
            if digest == st.digest {
                return Ok(None);
            }
            T::parse(&bytes, path).map(|v| Some((v, digest)))
        });
        match read {
            Ok(new) => {
                self.accept(&mut st, new);
                Ok(st.value.clone())
            }
            Err(e) => {
                if matches!(e, Error::Io { .. }) && std::fs::metadata(path).is_err() {
                    // Gone: read it again as soon as it is back, whatever its stamp.
                    st.stamp = None;
                }
                self.fail(&mut st, e.clone());
                match self.on_error {
                    OnError::FailClosed => Err(e),
                    OnError::KeepLast => Ok(st.value.clone()),
                }
            }
        }
    }

    /// Puts a good copy in use (`None`: the same bytes as the copy in use).
    fn accept(&self, st: &mut State<T>, new: Option<(T, [u8; 32])>) {
        let recovered = st.failure.take().is_some();
        let changed = new.is_some();
        if let Some((v, digest)) = new {
            st.value = Arc::new(T::merge(&st.value, v));
            st.digest = digest;
        }
        if changed || recovered {
            if let Some(r) = &self.report {
                r(&Event::Reloaded { what: T::WHAT, source: &self.name, entries: st.value.entries() });
            }
        }
    }

    fn fail(&self, st: &mut State<T>, e: Error) {
        let again = st.failure.as_ref().is_some_and(|f| f.to_string() == e.to_string());
        if !again {
            if let Some(r) = &self.report {
                let kept = (self.on_error == OnError::KeepLast).then(|| st.value.entries());
                r(&Event::Failed { what: T::WHAT, source: &self.name, error: &e, kept });
            }
        }
        st.failure = Some(e);
    }

    /// Checks for a change now: a file as at each use, a URL by fetching it (with the
    /// server's validators; a failure keeps the last good copy and is reported).
    #[cfg(feature = "keyd")]
    pub(crate) fn poll(&self) {
        let remote = match &self.origin {
            Origin::File(_) => {
                let _ = self.current();
                return;
            }
            Origin::Url(r) => r,
        };
        let validators = self.state().validators.clone();
        // Fetched without the lock: uses go on with the copy in use meanwhile.
        let fetched = remote.fetch(&validators, T::MAX_LEN);
        let mut st = self.state();
        let outcome = fetched.and_then(|f| match f {
            remote::Fetched::NotModified => Ok(None),
            remote::Fetched::Body { bytes, validators } => {
                let digest = crate::crypto::sha256(&bytes);
                if digest == st.digest {
                    st.validators = validators;
                    return Ok(None);
                }
                let v = T::parse(&bytes, &self.name)?;
                st.validators = validators;
                Ok(Some((v, digest)))
            }
        });
        match outcome {
            Ok(new) => self.accept(&mut st, new),
            Err(e) => self.fail(&mut st, e),
        }
    }
}

/// Where the key service reads a deny list or trust anchors from: a file, re-read when
/// it changes, or a URL fetched at an interval.
#[cfg(feature = "keyd")]
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file, checked for a change (size, mtime, ctime, inode) at each use.
    File(PathBuf),
    /// An `https://` URL (plain `http://` is accepted on loopback only), fetched at
    /// start and then at the service's poll interval. User info and a query string are
    /// sent but never logged or shown in errors.
    Url(String),
}

#[cfg(feature = "keyd")]
impl Source {
    /// `https://...` or `http://...` is a URL; anything else a file path.
    pub fn parse(text: &str) -> Self {
        let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
        if lower.starts_with("https://") || lower.starts_with("http://") {
            Self::Url(text.to_owned())
        } else {
            Self::File(PathBuf::from(text))
        }
    }

    /// What logs and errors show: the file, or the URL without user info, query or
    /// fragment.
    pub fn display_name(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Url(u) => remote::redact(u),
        }
    }
}

#[cfg(feature = "keyd")]
impl From<PathBuf> for Source {
    fn from(p: PathBuf) -> Self {
        Self::File(p)
    }
}

#[cfg(feature = "keyd")]
impl From<&Path> for Source {
    fn from(p: &Path) -> Self {
        Self::File(p.to_owned())
    }
}

#[cfg(feature = "keyd")]
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Url(_) => f.debug_tuple("Url").field(&self.display_name()).finish(),
        }
    }
}

#[cfg(feature = "keyd")]
impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display_name())
    }
}

#[cfg(feature = "keyd")]
mod remote {
    //! Fetching a watched document over HTTPS: TLS 1.3 (rustls), no redirects, a
    //! bounded body and a time limit; user info and query never shown.

    use std::io::Read as _;
    use std::path::Path;
    use std::time::Duration;

    use zeroize::Zeroizing;

    use crate::error::{Error, Result};

    /// Longest time one fetch may take, connecting included.
    const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
    /// Longest time to connect.
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// The server's cache validators for the copy in use.
    #[derive(Clone, Debug, Default)]
    pub(super) struct Validators {
        etag: Option<String>,
        last_modified: Option<String>,
    }

    pub(super) enum Fetched {
        /// `304 Not Modified`.
        NotModified,
        Body {
            bytes: Zeroizing<Vec<u8>>,
            validators: Validators,
        },
    }

    pub(super) struct Remote {
        /// The URL as given (it may hold credentials: never shown).
        url: reqwest::Url,
        shown: String,
        what: &'static str,
        client: reqwest::blocking::Client,
    }

    /// `scheme://host[:port]/path` of `text` (user info, query and fragment dropped);
    /// text that is not a URL is shown as `(unparsable URL)`.
    pub(super) fn redact(text: &str) -> String {
        reqwest::Url::parse(text).map_or_else(|_| "(unparsable URL)".to_owned(), |u| shown(&u))
    }

    fn shown(u: &reqwest::Url) -> String {
        let host = u.host_str().unwrap_or("");
        match u.port() {
            Some(p) => format!("{}://{host}:{p}{}", u.scheme(), u.path()),
            None => format!("{}://{host}{}", u.scheme(), u.path()),
        }
    }

    impl Remote {
        pub(super) fn open(text: &str, what: &'static str, ca: Option<&Path>) -> Result<Self> {
            let url = reqwest::Url::parse(text)
                .map_err(|e| Error::InvalidArgument(format!("the {what} URL {} is not a URL ({e})", redact(text))))?;
            let shown = shown(&url);
            if url.host_str().is_none_or(str::is_empty) {
                return Err(Error::InvalidArgument(format!("the {what} URL {shown} has no host")));
            }
            let mut b = reqwest::blocking::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .connect_timeout(CONNECT_TIMEOUT)
                // A redirect could lead to plain http or elsewhere: refused.
                .redirect(reqwest::redirect::Policy::none());
            match url.scheme() {
                "https" => {
                    b = b.https_only(true).tls_backend_preconfigured(crate::tls::client_config(ca, None)?);
                }
                "http" if crate::tls::is_loopback(&url) => b = b.no_proxy(),
                "http" => {
                    return Err(Error::InvalidArgument(format!(
                        "the {what} URL {shown} is plain http://, refused off loopback (anyone on the path could change it): use https://"
                    )))
                }
                s => {
                    return Err(Error::InvalidArgument(format!(
                        "the {what} URL {shown} has scheme {s:?}: use https://"
                    )))
                }
            }
            let client = b.build().map_err(|e| Error::InvalidArgument(format!("{what} HTTP client: {e}")))?;
            Ok(Self { url, shown, what, client })
        }

        pub(super) fn shown(&self) -> &str {
            &self.shown
        }

        /// A fetch failure: the redacted URL and why, with any trace of the URL as
        /// given (credentials, query) removed from the library's text.
        fn failure(&self, why: String) -> Error {
            let mut why = why.replace(self.url.as_str(), &self.shown);
            // A user name can be a token too (https://TOKEN@host/...).
            for secret in [Some(self.url.username()), self.url.password(), self.url.query()].into_iter().flatten() {
                if !secret.is_empty() {
                    why = why.replace(secret, "(redacted)");
                }
            }
            Error::io_at("fetch", &self.shown, std::io::Error::other(why))
        }

        pub(super) fn fetch(&self, v: &Validators, max: u64) -> Result<Fetched> {
            let what = self.what;
            let mut req = self.client.get(self.url.clone());
            if let Some(e) = &v.etag {
                req = req.header(reqwest::header::IF_NONE_MATCH, e);
            }
            if let Some(l) = &v.last_modified {
                req = req.header(reqwest::header::IF_MODIFIED_SINCE, l);
            }
            let resp = req.send().map_err(|e| self.failure(crate::tls::error_chain(&e.without_url())))?;
            match resp.status().as_u16() {
                200 => {}
                304 if v.etag.is_some() || v.last_modified.is_some() => return Ok(Fetched::NotModified),
                s => return Err(self.failure(format!("HTTP {s} (expected 200 with the {what})"))),
            }
            if resp.content_length().is_some_and(|n| n > max) {
                return Err(self.failure(format!("the {what} is larger than {} MiB", max >> 20)));
            }
            let header = |h| resp.headers().get(h).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let validators = Validators {
                etag: header(reqwest::header::ETAG),
                last_modified: header(reqwest::header::LAST_MODIFIED),
            };
            let mut bytes = Zeroizing::new(Vec::new());
            resp.take(max + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| self.failure(format!("reading the body: {}", crate::tls::error_chain(&e))))?;
            if bytes.len() as u64 > max {
                return Err(self.failure(format!("the {what} is larger than {} MiB", max >> 20)));
            }
            Ok(Fetched::Body { bytes, validators })
        }
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    mod tests {
        /// The HTTP library's error text names the URL as given: user name, password and
        /// query (any of which can be a credential) are taken out of it.
        #[test]
        fn a_fetch_failure_names_no_credential_of_the_url() {
            let r = super::Remote::open("https://TOKENUSER:pw7@keys.example/x?sig=SIG9", "deny list", None).unwrap();
            let e = r
                .failure(
                    "error sending request for url (https://TOKENUSER:pw7@keys.example/x?sig=SIG9): TOKENUSER".into(),
                )
                .to_string();
            for secret in ["TOKENUSER", "pw7", "SIG9"] {
                assert!(!e.contains(secret), "{e}");
            }
            assert!(e.contains("https://keys.example/x"), "{e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Non-empty lines; a line "bad" makes the document invalid.
    struct Lines(Vec<String>);

    impl Document for Lines {
        const WHAT: &'static str = "lines";
        const READ: &'static str = "read lines";
        const MAX_LEN: u64 = 64;
        const WRITABLE_RISK: &'static str = "anyone could change them";

        fn parse(bytes: &[u8], origin: &Path) -> Result<Self> {
            let text = String::from_utf8_lossy(bytes);
            if text.lines().any(|l| l == "bad") {
                return Err(Error::Format { what: Self::WHAT, path: origin.to_owned(), detail: "a bad line".into() });
            }
            Ok(Self(text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()))
        }

        fn entries(&self) -> usize {
            self.0.len()
        }
    }

    fn write(path: &Path, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn watch(path: &Path, on_error: OnError) -> (Watched<Lines>, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let report: Reporter = Arc::new(move |e: &Event<'_>| {
            s.lock().unwrap().push(match e {
                Event::Reloaded { entries, .. } => format!("reloaded {entries}"),
                Event::Failed { error, kept, .. } => format!("failed {kept:?} {error}"),
            })
        });
        (Watched::file(path, on_error, Some(report)).unwrap(), seen)
    }

    #[test]
    fn a_changed_file_is_re_read_and_a_bad_one_keeps_the_last_good_copy_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc");
        write(&path, "a\nb\n", 0o644);
        let (w, seen) = watch(&path, OnError::KeepLast);
        assert_eq!(w.current().unwrap().0, ["a", "b"]);
        write(&path, "a\nb\nc\n", 0o644);
        assert_eq!(w.current().unwrap().entries(), 3);
        write(&path, "bad\n", 0o644);
        for _ in 0..3 {
            assert_eq!(w.current().unwrap().entries(), 3, "the last good copy stays");
        }
        // Others may write it: refused however good its content.
        write(&path, "x\n", 0o666);
        for _ in 0..3 {
            assert_eq!(w.current().unwrap().entries(), 3);
        }
        write(&path, "x\n", 0o644);
        assert_eq!(w.current().unwrap().0, ["x"]);
        // Touched with the same bytes: nothing to report.
        write(&path, "x\n", 0o600);
        assert_eq!(w.current().unwrap().0, ["x"]);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(seen[0], "reloaded 3");
        assert!(seen[1].starts_with("failed Some(3)") && seen[1].contains("a bad line"), "{seen:?}");
        assert!(seen[2].contains("writable by group or others") && seen[2].contains("anyone could change them"));
        assert_eq!(seen[3], "reloaded 1");
    }

    #[test]
    fn failing_closed_returns_the_error_until_the_file_is_good_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc");
        write(&path, "a\n", 0o644);
        let (w, seen) = watch(&path, OnError::FailClosed);
        write(&path, "bad\n", 0o644);
        assert!(w.current().is_err());
        assert!(w.current().is_err(), "an unchanged bad file still fails");
        std::fs::remove_file(&path).unwrap();
        for _ in 0..3 {
            assert!(matches!(w.current(), Err(Error::Io { .. })));
        }
        write(&path, "a\n", 0o644);
        assert_eq!(w.current().unwrap().0, ["a"], "a file that is back is read again");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        // Too large, and missing at start, are errors at once.
        write(&path, &"y\n".repeat(40), 0o644);
        assert!(w.current().err().unwrap().to_string().contains("larger than"));
        assert!(Watched::<Lines>::file(&dir.path().join("nope"), OnError::KeepLast, None).is_err());
    }

    #[cfg(feature = "keyd")]
    #[test]
    fn a_url_source_is_shown_without_credentials_or_query() {
        let s = Source::parse("https://ops:hunter2@keys.example:8443/a/deny.txt?sig=SECRET#frag");
        assert!(matches!(s, Source::Url(_)));
        assert_eq!(s.display_name(), "https://keys.example:8443/a/deny.txt");
        assert!(!format!("{s:?}").contains("hunter2") && !format!("{s:?}").contains("SECRET"));
        assert_eq!(Source::parse("/etc/deny.txt"), Source::File("/etc/deny.txt".into()));
        assert_eq!(Source::parse("not a url://x").display_name(), "not a url://x");
        let e = Watched::<Lines>::open(&Source::parse("http://192.0.2.1/x?sig=SECRET"), OnError::KeepLast, None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("plain http") && !e.contains("SECRET"), "{e}");
    }
}
