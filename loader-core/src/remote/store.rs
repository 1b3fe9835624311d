//! The object store client: configuration from options + environment, a tokio runtime
//! owned by the caller, retries with backoff under a deadline, and error messages with
//! every credential removed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use zeroize::Zeroizing;

use super::{Location, RemoteOptions};
use crate::error::{Error, RemoteFailure, Result};

/// A configured bucket: the client, the key prefix, and what to scrub from messages.
pub(crate) struct Bucket {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) bucket: String,
    pub(crate) prefix: String,
    secrets: Vec<Zeroizing<String>>,
    pub(crate) timeout: Duration,
    pub(crate) stall: Duration,
}

/// How one attempt failed.
pub(crate) enum Failure {
    /// Worth retrying (5xx, reset, timeout, short body).
    Transient(String),
    /// Retrying will not help.
    Permanent(RemoteFailure, String),
}

impl Bucket {
    pub(crate) fn new(loc: &Location, opts: &RemoteOptions) -> Result<Self> {
        let Location::S3 { bucket, prefix } = loc else {
            return Err(Error::InvalidArgument(format!("{loc} is not an object storage location")));
        };
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let mut secrets = Vec::new();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        for k in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"] {
            if let Some(v) = env(k) {
                secrets.push(Zeroizing::new(v));
            }
        }
        let endpoint = opts.endpoint.clone().or_else(|| env("AWS_ENDPOINT_URL")).or_else(|| env("AWS_ENDPOINT"));
        if let Some(e) = &endpoint {
            b = b.with_endpoint(e);
        }
        match opts.region.clone().or_else(|| env("AWS_REGION")).or_else(|| env("AWS_DEFAULT_REGION")) {
            Some(r) => b = b.with_region(r),
            None => b = b.with_region("us-east-1"),
        }
        if let Some(k) = &opts.access_key_id {
            secrets.push(Zeroizing::new(k.clone()));
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &opts.secret_access_key {
            secrets.push(k.clone());
            b = b.with_secret_access_key(k.as_str());
        }
        if let Some(k) = &opts.session_token {
            secrets.push(k.clone());
            b = b.with_token(k.as_str());
        }
        let loopback = endpoint.as_deref().is_some_and(|e| {
            e.starts_with("http://127.0.0.1") || e.starts_with("http://localhost") || e.starts_with("http://[::1]")
        });
        let allow_http = opts
            .allow_http
            .unwrap_or(loopback || env("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true")));
        // Our own loop retries whole downloads under one deadline; the client's own
        // retries are kept short so that deadline holds.
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: opts.timeout.min(Duration::from_secs(10)),
            backoff: Default::default(),
        };
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout_disabled();
        let store = b.with_client_options(client).with_retry(retry).build().map_err(|e| Error::Remote {
            url: loc.to_string(),
            shard: None,
            kind: RemoteFailure::Config,
            detail: scrub(&secrets, e.to_string()),
        })?;
        Ok(Self {
            store: Arc::new(store),
            bucket: bucket.clone(),
            prefix: prefix.clone(),
            secrets,
            timeout: opts.timeout,
            stall: opts.stall_timeout,
        })
    }

    /// Removes every credential from a message (a server may echo the access key id,
    /// and a client error may quote a request).
    pub(crate) fn scrub(&self, s: String) -> String {
        scrub(&self.secrets, s)
    }

    pub(crate) fn key(&self, name: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(name)
        } else {
            ObjPath::from(format!("{}/{name}", self.prefix))
        }
    }

    pub(crate) fn url(&self, name: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(name))
    }

    pub(crate) fn classify(&self, e: object_store::Error) -> Failure {
        match e {
            object_store::Error::NotFound { .. } => Failure::Permanent(RemoteFailure::NotFound, "404".into()),
            object_store::Error::Precondition { .. } => Failure::Permanent(
                RemoteFailure::Modified,
                "the object was replaced while this epoch read it (its ETag changed)".into(),
            ),
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                Failure::Permanent(RemoteFailure::Denied, self.scrub(e.to_string()))
            }
            other => Failure::Transient(self.scrub(other.to_string())),
        }
    }

    /// Fetches a small object whole (the manifest), retrying transient failures until
    /// the deadline.
    pub(crate) async fn get_small(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        self.with_retries(&self.url(name), None, || async {
            let got = tokio::time::timeout(self.stall, self.store.get_opts(&self.key(name), GetOptions::default()))
                .await
                .map_err(|_| Failure::Transient(format!("no response within {:?}", self.stall)))?
                .map_err(|e| self.classify(e))?;
            if got.meta.size > limit {
                return Err(Failure::Permanent(
                    RemoteFailure::Modified,
                    format!("{} bytes, more than the {limit} accepted", got.meta.size),
                ));
            }
            let mut out = Vec::with_capacity(got.meta.size as usize);
            let mut s = got.into_stream();
            loop {
                match tokio::time::timeout(self.stall, s.next()).await {
                    Err(_) => return Err(Failure::Transient(format!("stalled for {:?}", self.stall))),
                    Ok(None) => break,
                    Ok(Some(Err(e))) => return Err(self.classify(e)),
                    Ok(Some(Ok(b))) => {
                        if (out.len() + b.len()) as u64 > limit {
                            return Err(Failure::Permanent(RemoteFailure::Modified, "too large".into()));
                        }
                        out.extend_from_slice(&b);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// The one retry loop of every request to the store: runs `attempt` until it
    /// succeeds or fails permanently, retrying transient failures with backoff while
    /// the per-object timeout allows; the error names `url` (and `shard`).
    pub(crate) async fn with_retries<T, F, Fut>(&self, url: &str, shard: Option<u32>, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Failure>>,
    {
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match attempt().await {
                Ok(v) => return Ok(v),
                Err(Failure::Permanent(kind, detail)) => {
                    return Err(Error::Remote { url: url.to_owned(), shard, kind, detail })
                }
                Err(Failure::Transient(last)) => last,
            };
            let wait = backoff(attempts);
            if start.elapsed() + wait > self.timeout {
                return Err(self.gave_up(url, shard, attempts, start, &last));
            }
            tokio::time::sleep(wait).await;
        }
    }

    fn gave_up(&self, url: &str, shard: Option<u32>, attempts: u32, start: Instant, last: &str) -> Error {
        Error::Remote {
            url: url.to_owned(),
            shard,
            kind: RemoteFailure::Unavailable,
            detail: format!(
                "gave up after {attempts} attempt(s) in {:.1} s (timeout {:?}); last error: {}",
                start.elapsed().as_secs_f64(),
                self.timeout,
                self.scrub(last.to_owned())
            ),
        }
    }
}

/// Exponential backoff with jitter: 100 ms, 200 ms, ... capped at 5 s.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5000);
    let mut r = [0u8; 2];
    let _ = crate::crypto::random_bytes(&mut r);
    Duration::from_millis(base / 2 + u64::from(u16::from_le_bytes(r)) % (base / 2 + 1))
}

/// A tokio runtime for object store I/O, owned by whoever opened the dataset.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shardlock-s3")
        .enable_all()
        .build()
        .map_err(Error::os("start the object store runtime"))
}

/// A client that puts objects under `s3://bucket/prefix`, one at a time, in the
/// order the caller gives (so a manifest can go last).
pub(crate) struct Uploader {
    bucket: Bucket,
    rt: tokio::runtime::Runtime,
}

impl Uploader {
    /// A client for `dest` (`s3://bucket/prefix`).
    pub(crate) fn new(dest: &str, opts: &RemoteOptions) -> Result<Self> {
        let bucket = Bucket::new(&Location::parse(dest)?, opts)?;
        Ok(Self { bucket, rt: runtime()? })
    }

    /// Puts `bytes` as object `prefix/name`, retrying transient failures; each attempt
    /// and the whole put are bounded by the per-object timeout (the client's own
    /// timeout is off, so without this a server that accepts and never answers would
    /// hang the upload).
    pub(crate) fn put(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let b = &self.bucket;
        let (url, key) = (b.url(name), b.key(name));
        let payload = PutPayload::from(bytes);
        self.rt.block_on(b.with_retries(&url, None, || {
            let (payload, key) = (payload.clone(), &key);
            async move {
                match tokio::time::timeout(b.timeout, b.store.put(key, payload)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(b.classify(e)),
                    Err(_) => Err(Failure::Transient(format!("no answer to the upload within {:?}", b.timeout))),
                }
            }
        }))
    }

    /// The names of the objects directly under the prefix (not in sub-"directories").
    pub(crate) fn list(&self) -> Result<Vec<String>> {
        let b = &self.bucket;
        let url = b.url("");
        let prefix = (!b.prefix.is_empty()).then(|| ObjPath::from(b.prefix.as_str()));
        self.rt.block_on(b.with_retries(&url, None, || {
            let prefix = prefix.clone();
            async move {
                let listed = tokio::time::timeout(b.timeout, b.store.list_with_delimiter(prefix.as_ref())).await;
                match listed {
                    Ok(Ok(r)) => {
                        Ok(r.objects.iter().filter_map(|o| o.location.filename().map(str::to_owned)).collect())
                    }
                    Ok(Err(e)) => Err(b.classify(e)),
                    Err(_) => Err(Failure::Transient(format!("no answer to the listing within {:?}", b.timeout))),
                }
            }
        }))
    }

    /// Object `prefix/name` whole, refused past `limit` bytes.
    pub(crate) fn get(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        self.rt.block_on(self.bucket.get_small(name, limit))
    }

    /// Whether object `prefix/name` exists.
    pub(crate) fn exists(&self, name: &str) -> Result<bool> {
        let b = &self.bucket;
        let (url, key) = (b.url(name), b.key(name));
        self.rt.block_on(b.with_retries(&url, None, || {
            let key = &key;
            async move {
                match tokio::time::timeout(b.timeout, b.store.head(key)).await {
                    Ok(Ok(_)) => Ok(true),
                    Ok(Err(object_store::Error::NotFound { .. })) => Ok(false),
                    Ok(Err(e)) => Err(b.classify(e)),
                    Err(_) => Err(Failure::Transient(format!("no answer within {:?}", b.timeout))),
                }
            }
        }))
    }
}

fn scrub(secrets: &[Zeroizing<String>], mut s: String) -> String {
    for k in secrets {
        if k.len() >= 4 && s.contains(k.as_str()) {
            s = s.replace(k.as_str(), "[redacted]");
        }
    }
    s
}
