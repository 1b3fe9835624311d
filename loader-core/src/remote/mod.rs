//! Datasets in S3-compatible object storage (`s3://bucket/prefix`), read through a
//! local cache directory that holds ciphertext only.
//!
//! The manifest is fetched and verified against the trust anchor exactly as from a
//! local directory. Shards are then downloaded ahead of the epoch plan, with bounded
//! concurrency, into the cache: each download goes to a temporary name, is checked
//! against the signed manifest's `file_bytes` and `sha256`, and only then renamed to
//! its final name (the SHA-256 itself), so a partial or substituted object is never
//! read. The loader memory-maps the cached file as it would a local shard; everything
//! after that (authorization, DEK unwrap, chunk authentication) is unchanged.
//! See `docs/S3.md`.
//!
//! [`Location`] and [`RemoteOptions`] are always compiled, so code that passes them
//! builds with or without the `s3` feature; opening an `s3://` location without it
//! fails with [`crate::Error::Remote`] ([`crate::RemoteFailure::Config`]).

#[cfg(feature = "s3")]
mod cache;
#[cfg(feature = "s3")]
mod download;
#[cfg(feature = "s3")]
mod prefetch;
#[cfg(feature = "s3")]
mod ranged;
#[cfg(feature = "s3")]
mod store;

#[cfg(feature = "s3")]
pub(crate) use prefetch::{fetch_manifest, RemoteShards};

/// How the ciphertext of one shard is reached.
pub(crate) enum ShardSource {
    /// A local file: the dataset directory's, or a verified file in the remote cache.
    File(std::fs::File, PathBuf),
    /// Ranged reads of the shard's object (remote, not cached; needs the `s3` feature).
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    Ranged(std::sync::Arc<dyn RangeSource>),
}

/// Byte ranges of a remote dataset's shard objects, fetched on demand (ranged GETs)
/// instead of through the cache. What comes back is ciphertext exactly as stored;
/// the reader authenticates every chunk it decrypts, as for a local file.
pub(crate) trait RangeSource: Send + Sync {
    /// Fetches each request concurrently, retrying transient failures, each within the
    /// per-object timeout; results (bytes, the object's ETag) are in request order.
    fn get_ranges(&self, reqs: &[RangeRequest]) -> Result<Vec<(Vec<u8>, Option<String>)>>;
}

/// Bytes `range` of shard `shard`'s object; with `if_match`, only from the object
/// version with that ETag (a replaced object fails as [`RemoteFailure::Modified`]).
/// (Without the `s3` feature nothing builds one: no shard is ever read by ranges.)
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "s3"), allow(dead_code))]
pub(crate) struct RangeRequest {
    pub(crate) shard: u32,
    pub(crate) range: std::ops::Range<u64>,
    pub(crate) if_match: Option<String>,
}

/// When shards of a remote dataset are read with ranged GETs of just the chunks a
/// batch needs, instead of being downloaded whole into the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RangeReads {
    /// Ranged reads when they are cheaper: `global` shuffle over shards (not yet
    /// cached) that do not all fit in `cache_bytes`. Whole-shard downloads would then
    /// evict shards the epoch still needs and fetch them again, while ranged reads
    /// move each needed chunk once per epoch. Otherwise whole shards are cached, and
    /// later epochs read them from local disk.
    #[default]
    Auto,
    /// Every shard not already in the cache is read with ranged GETs.
    Always,
    /// Whole shards only.
    Never,
}

impl RangeReads {
    /// Parses `auto`, `always` or `never`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(Error::InvalidArgument(format!("range reads {s:?}: expected auto, always or never"))),
        }
    }
}
#[cfg(feature = "s3")]
pub(crate) use store::Uploader;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::{Error, RemoteFailure, Result};

/// Where a dataset lives: a local directory or a prefix in an S3 bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A directory (a plain path, or a `file://` URL).
    Local(PathBuf),
    /// `s3://bucket/prefix`: the manifest is `prefix/manifest.json`.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix without leading or trailing `/` (may be empty).
        prefix: String,
    },
}

impl Location {
    /// Parses `s3://bucket/prefix`, `file:///dir` or a plain path.
    pub fn parse(s: &str) -> Result<Self> {
        let bad =
            |detail: String| Error::Remote { url: s.to_owned(), shard: None, kind: RemoteFailure::Config, detail };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let ok_bucket = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
            if !ok_bucket {
                return Err(bad(format!("{bucket:?} is not a bucket name (3-63 of a-z 0-9 . -)")));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                return Err(bad("the key prefix must not contain empty, `.` or `..` segments".into()));
            }
            return Ok(Self::S3 { bucket: bucket.to_owned(), prefix: prefix.to_owned() });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad("a file:// URL needs an absolute path (file:///data/ds)".into()));
            }
            return Ok(Self::Local(PathBuf::from(rest)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(bad(format!("unsupported scheme {scheme:?}: use s3://, file:// or a path")));
        }
        Ok(Self::Local(PathBuf::from(s)))
    }

    /// Parses a path that may hold a URL (as given to [`crate::Loader::builder`]).
    pub fn from_path(p: &Path) -> Result<Self> {
        match p.to_str() {
            Some(s) => Self::parse(s),
            None => Ok(Self::Local(p.to_owned())),
        }
    }

    /// True for object storage.
    pub fn is_remote(&self) -> bool {
        !matches!(self, Self::Local(_))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Connection, cache and retry settings for `s3://` datasets.
///
/// Every connection setting that is `None` falls back to the usual AWS environment
/// variables (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT`, `AWS_REGION` / `AWS_DEFAULT_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`).
/// The secret key and session token are held in zeroizing strings, are not printed by
/// `Debug`, and are removed from every error message.
#[derive(Clone)]
pub struct RemoteOptions {
    /// Endpoint URL of an S3-compatible server (`http://127.0.0.1:9000`); default AWS.
    pub endpoint: Option<String>,
    /// Region (default from the environment, else `us-east-1`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<Zeroizing<String>>,
    /// Session token (temporary credentials).
    pub session_token: Option<Zeroizing<String>>,
    /// Allow `http://` endpoints (default: only when the endpoint is `http://127.0.0.1`
    /// / `localhost`, or `AWS_ALLOW_HTTP=true`).
    pub allow_http: Option<bool>,
    /// Cache directory (default `$SHARDLOCK_CACHE_DIR`, else `$XDG_CACHE_HOME/shardlock`,
    /// else `~/.cache/shardlock`). Holds ciphertext shard files only.
    pub cache_dir: Option<PathBuf>,
    /// Bytes of shards this process keeps in the cache before it evicts shards the
    /// epoch plan no longer needs (default: no limit). Prefetching stays within it; a
    /// shard a batch needs right now is fetched even when that overshoots it.
    pub cache_bytes: Option<u64>,
    /// Shards downloaded at once (default 4).
    pub concurrency: usize,
    /// Give up on one object (manifest or shard) after this long, retries included
    /// (default 120 s): the error names the object and what to do.
    pub timeout: Duration,
    /// Retry a download that makes no progress for this long (default 20 s).
    pub stall_timeout: Duration,
    /// Connection timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Ranged GETs of just the needed chunks instead of whole shards (default
    /// [`RangeReads::Auto`]: for `global` shuffle when the shards do not fit in
    /// `cache_bytes`).
    pub range_reads: RangeReads,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            allow_http: None,
            cache_dir: None,
            cache_bytes: None,
            concurrency: 4,
            timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            range_reads: RangeReads::Auto,
        }
    }
}

impl fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |o: bool| if o { "<set>" } else { "<unset>" };
        f.debug_struct("RemoteOptions")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &set(self.access_key_id.is_some()))
            .field("secret_access_key", &set(self.secret_access_key.is_some()))
            .field("session_token", &set(self.session_token.is_some()))
            .field("allow_http", &self.allow_http)
            .field("cache_dir", &self.cache_dir)
            .field("cache_bytes", &self.cache_bytes)
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("range_reads", &self.range_reads)
            .finish()
    }
}

impl RemoteOptions {
    /// Sets one option by name, for bindings and the CLI: `endpoint`, `region`,
    /// `access_key_id`, `secret_access_key`, `session_token`, `allow_http`,
    /// `cache_dir`, `cache_bytes`, `concurrency`, `timeout`, `stall_timeout`,
    /// `connect_timeout` (durations like `30s`, `2m`), `range_reads` (`auto`, `always`,
    /// `never`). An error never echoes the value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |what: &str| Error::InvalidArgument(format!("s3 option {key}: {what}"));
        let dur = |v: &str| crate::time::parse_ttl(v).map_err(|_| bad("expected a duration such as 30s or 2m"));
        match key {
            "endpoint" | "endpoint_url" => self.endpoint = Some(value.to_owned()),
            "region" => self.region = Some(value.to_owned()),
            "access_key_id" => self.access_key_id = Some(value.to_owned()),
            "secret_access_key" => self.secret_access_key = Some(Zeroizing::new(value.to_owned())),
            "session_token" => self.session_token = Some(Zeroizing::new(value.to_owned())),
            "allow_http" => {
                self.allow_http = Some(match value {
                    "true" | "1" | "True" => true,
                    "false" | "0" | "False" => false,
                    _ => return Err(bad("expected true or false")),
                })
            }
            "cache_dir" => self.cache_dir = Some(PathBuf::from(value)),
            "cache_bytes" => self.cache_bytes = Some(value.parse().map_err(|_| bad("expected a byte count"))?),
            "concurrency" => {
                self.concurrency = value
                    .parse()
                    .ok()
                    .filter(|&n: &usize| (1..=64).contains(&n))
                    .ok_or_else(|| bad("expected 1..=64"))?
            }
            "timeout" => self.timeout = dur(value)?,
            "stall_timeout" => self.stall_timeout = dur(value)?,
            "connect_timeout" => self.connect_timeout = dur(value)?,
            "range_reads" => {
                self.range_reads = RangeReads::parse(value).map_err(|_| bad("expected auto, always or never"))?
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown s3 option {key:?} (known: endpoint, region, access_key_id, secret_access_key, \
                     session_token, allow_http, cache_dir, cache_bytes, concurrency, timeout, stall_timeout, \
                     connect_timeout, range_reads)"
                )))
            }
        }
        Ok(())
    }

    /// The cache directory these options select. There is no shared fallback (such
    /// as a directory under `/tmp`, where another user could have created it first):
    /// with none of `cache_dir`, `SHARDLOCK_CACHE_DIR`, `XDG_CACHE_HOME` or `HOME` set,
    /// this is an error that says so.
    pub fn resolved_cache_dir(&self) -> Result<PathBuf> {
        if let Some(d) = &self.cache_dir {
            return Ok(d.clone());
        }
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(d) = env("SHARDLOCK_CACHE_DIR") {
            return Ok(d);
        }
        if let Some(d) = env("XDG_CACHE_HOME") {
            return Ok(d.join("shardlock"));
        }
        match env("HOME") {
            Some(h) => Ok(h.join(".cache").join("shardlock")),
            None => Err(Error::Remote {
                url: String::new(),
                shard: None,
                kind: RemoteFailure::Config,
                detail:
                    "no cache directory: set the s3 option cache_dir, or SHARDLOCK_CACHE_DIR, XDG_CACHE_HOME or HOME"
                        .into(),
            }),
        }
    }
}

/// Without the `s3` feature: no uploader can be made ([`RemoteFailure::Config`]).
#[cfg(not(feature = "s3"))]
pub(crate) enum Uploader {}

#[cfg(not(feature = "s3"))]
impl Uploader {
    pub(crate) fn new(dest: &str, opts: &RemoteOptions) -> Result<Self> {
        let _ = opts;
        Err(unsupported(&Location::parse(dest)?))
    }

    pub(crate) fn put(&self, _name: &str, _bytes: Vec<u8>) -> Result<()> {
        match *self {}
    }

    pub(crate) fn list(&self) -> Result<Vec<String>> {
        match *self {}
    }

    pub(crate) fn get(&self, _name: &str, _limit: u64) -> Result<Vec<u8>> {
        match *self {}
    }

    pub(crate) fn exists(&self, _name: &str) -> Result<bool> {
        match *self {}
    }
}

/// Fails for an `s3://` location in a build without the `s3` feature.
#[cfg(not(feature = "s3"))]
pub(crate) fn unsupported(loc: &Location) -> Error {
    Error::Remote {
        url: loc.to_string(),
        shard: None,
        kind: RemoteFailure::Config,
        detail: "this build of shardlock has no object storage support (cargo feature `s3`)".into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            Location::parse("s3://my-bucket/a/b/").unwrap(),
            Location::S3 { bucket: "my-bucket".into(), prefix: "a/b".into() }
        );
        assert_eq!(Location::parse("s3://bkt").unwrap(), Location::S3 { bucket: "bkt".into(), prefix: String::new() });
        assert_eq!(Location::parse("file:///data/ds").unwrap(), Location::Local("/data/ds".into()));
        assert_eq!(Location::parse("rel/dir").unwrap(), Location::Local("rel/dir".into()));
        for bad in ["s3://B/x", "s3://ab/x", "s3://bkt/a/../b", "s3://bkt/a//b", "gs://b/x", "file://rel"] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Location::parse("s3://bkt/p/").unwrap().to_string(), "s3://bkt/p");
    }

    #[test]
    fn debug_hides_credentials() {
        let mut o = RemoteOptions::default();
        o.set("access_key_id", "AKIDCANARY").unwrap();
        o.set("secret_access_key", "SECRETCANARY").unwrap();
        o.set("session_token", "TOKENCANARY").unwrap();
        let d = format!("{o:?}");
        assert!(!d.contains("CANARY"), "{d}");
        let e = o.set("timeout", "SECRETCANARY").unwrap_err().to_string();
        assert!(!e.contains("CANARY"), "{e}");
    }
}
