//! The client of a `shardlock keyd` key service ([`KeyServiceProvider`], feature
//! `key-service`): where a keyring goes, an `https://` URL makes the workload ask the
//! service for each shard's DEK, so it never holds a KEK.
//!
//! The loader still authorizes its own token first (a fast fail, and the [`Grant`] this
//! provider needs), then the service verifies the manifest and the token itself, audits
//! its decision in its own log and releases only what it allowed. The wire API is in
//! docs/KEY-SERVICE.md:
//!
//! - `POST /v1/manifests` with the signed `manifest.json` bytes, once per manifest;
//! - `POST /v1/release` with `Authorization: Bearer <token>` and
//!   `{"manifest": "<sha256 hex>", "shards": [...]}`: a shard and the next ones of the
//!   epoch's plan in one request ([`KeyProvider::plan`]).
//!
//! Released DEKs are held in locked key slots until their shard opens (each is used
//! once, so every epoch asks again and a revocation at the service bites at the next
//! shard open), and for at most [`ServiceOptions::hold`]. Requests are retried with
//! backoff and jitter within [`ServiceOptions::timeout`]; a failure is
//! `Error::KeyUnavailable` naming the service, a denial `Error::AccessDenied` with the
//! service's reason and rule.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use zeroize::Zeroizing;

use super::{Dek, Grant, KeyProvider, ReleaseContext};
use crate::crypto;
use crate::error::{DenyReason, Error, Operation, Result};

/// TLS material for reaching a key service.
#[derive(Clone, Debug, Default)]
pub struct ServiceTls {
    /// PEM file of the CA certificate(s) that sign the service's certificate. Without
    /// it, `SSL_CERT_FILE`, then the system bundle (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate chain, for a service that requires mTLS (its identity,
    /// the subject CN, must be the token's principal).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (must be readable by the owner only).
    pub client_key: Option<PathBuf>,
}

/// How the client talks to the service.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// TLS roots and client identity.
    pub tls: ServiceTls,
    /// Longest time one release may take, retries included (default 30 s).
    pub timeout: Duration,
    /// Most shards released in one request (default 64): a shard and the next ones of
    /// the plan.
    pub batch: usize,
    /// Longest time a released DEK is held before its shard opens (default 60 s); after
    /// that it is asked for again.
    pub hold: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self { tls: ServiceTls::default(), timeout: Duration::from_secs(30), batch: 64, hold: Duration::from_secs(60) }
    }
}

impl ServiceOptions {
    /// Defaults, with TLS files from the environment: `SHARDLOCK_CA_CERT` (else
    /// `SSL_CERT_FILE`), `SHARDLOCK_CLIENT_CERT`, `SHARDLOCK_CLIENT_KEY`, and
    /// `SHARDLOCK_KEY_SERVICE_TIMEOUT` (`30s`, `2m`, ...).
    pub fn from_env() -> Result<Self> {
        let path = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let mut o = Self::default();
        o.tls.ca_cert = path("SHARDLOCK_CA_CERT");
        o.tls.client_cert = path("SHARDLOCK_CLIENT_CERT");
        o.tls.client_key = path("SHARDLOCK_CLIENT_KEY");
        if let Ok(t) = std::env::var("SHARDLOCK_KEY_SERVICE_TIMEOUT") {
            o.timeout = crate::time::parse_ttl(&t)?;
        }
        Ok(o)
    }
}

type Digest = [u8; 32];

/// A released DEK's place: (manifest digest, SHA-256 of the token it was released
/// for, shard). A DEK released for one token is never handed to a request of another.
type Slot = (Digest, Digest, u32);

/// Largest answer read from the service (a release of 4,096 shards is ~300 KiB).
const MAX_ANSWER: u64 = 16 << 20;

/// Longest timeout (and hold) a client accepts.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Held {
    /// Manifests the service has verified (by SHA-256 of their bytes).
    registered: HashSet<Digest>,
    /// Released DEKs not yet used: when they arrived, and the epoch they are for.
    deks: HashMap<Slot, (Dek, Instant, u64)>,
    /// Each manifest's current shard plan and epoch number (one more per plan).
    plans: HashMap<Digest, (Arc<Vec<u32>>, u64)>,
    /// Shards named in a request now in flight (another worker waits for it rather
    /// than asking twice).
    pending: HashSet<Slot>,
}

impl Held {
    fn epoch(&self, digest: &Digest) -> u64 {
        self.plans.get(digest).map_or(0, |p| p.1)
    }
}

/// Clears the pending marks of one request however it ends (a panic included), and
/// wakes the workers waiting for them.
struct PendingGuard<'a> {
    provider: &'a KeyServiceProvider,
    slots: Vec<Slot>,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.provider.held();
        for k in &self.slots {
            held.pending.remove(k);
        }
        drop(held);
        self.provider.arrived.notify_all();
    }
}

/// Releases DEKs from a `shardlock keyd` service (see the module docs).
pub struct KeyServiceProvider {
    url: String,
    client: reqwest::blocking::Client,
    opts: ServiceOptions,
    held: Mutex<Held>,
    /// Signalled when a request in flight ends.
    arrived: std::sync::Condvar,
}

impl std::fmt::Debug for KeyServiceProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServiceProvider").field("url", &self.url).finish_non_exhaustive()
    }
}

/// One entry of a `/v1/release` answer.
#[derive(Deserialize)]
struct Released<'a> {
    shard: u32,
    #[serde(borrow, default)]
    dek: Option<&'a str>,
    #[serde(default)]
    denied: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    /// A custody failure for this shard (the service could not unwrap it).
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct ReleaseAnswer<'a> {
    #[serde(borrow)]
    deks: Vec<Released<'a>>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
    #[serde(default)]
    message: String,
}

/// What one HTTP exchange came to.
enum Reply {
    Ok(Zeroizing<Vec<u8>>),
    /// The service answered with an error document.
    Refused {
        status: u16,
        error: String,
        message: String,
    },
}

impl KeyServiceProvider {
    /// A client of the service at `url` (`https://host:port`, an optional path prefix
    /// allowed). Reads the TLS files now, so a missing or bad CA or client key fails
    /// here, naming the file.
    pub fn open(url: &str, opts: ServiceOptions) -> Result<Self> {
        let bad = |detail: String| Error::KeyProvider {
            provider: format!("key service {url}"),
            kind: crate::error::ProviderFailure::Unavailable,
            detail,
        };
        if url.starts_with("http://") {
            return Err(Error::InvalidArgument(format!(
                "key service {url}: plain http is refused (DEKs and tokens travel in the request); use https://"
            )));
        }
        if !url.starts_with("https://") {
            return Err(Error::InvalidArgument(format!("{url}: a key service URL starts with https://")));
        }
        if opts.batch == 0 || opts.batch > 4096 {
            return Err(Error::InvalidArgument("key service batch must be between 1 and 4096 shards".into()));
        }
        if opts.timeout.is_zero() || opts.timeout > MAX_TIMEOUT || opts.hold > MAX_TIMEOUT {
            return Err(Error::InvalidArgument(format!(
                "key service timeout must be more than 0 and, like hold, at most {MAX_TIMEOUT:?}"
            )));
        }
        let tls = client_tls(&opts.tls).map_err(|e| match e {
            Error::Io { .. } | Error::Format { .. } | Error::InsecurePermissions { .. } => e,
            other => bad(other.to_string()),
        })?;
        let parsed = reqwest::Url::parse(url).map_err(|_| Error::InvalidArgument(format!("{url}: not a URL")))?;
        crate::tls::checked_server(&parsed).map_err(|d| Error::InvalidArgument(format!("key service URL: {d}")))?;
        let client = reqwest::blocking::Client::builder()
            // A redirect could carry the bearer token elsewhere: none are followed.
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true)
            .tls_backend_preconfigured(tls)
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| bad(format!("cannot set up the HTTPS client: {}", crate::tls::error_chain(&e))))?;
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            client,
            opts,
            held: Mutex::new(Held::default()),
            arrived: std::sync::Condvar::new(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unavailable(&self, grant: &Grant, detail: String) -> Error {
        Error::KeyUnavailable {
            key_id: grant.kek_id().to_owned(),
            detail: format!(
                "key service {}: dataset {:?} shard {}: {detail}",
                self.url,
                grant.dataset(),
                grant.shard()
            ),
        }
    }

    /// One POST, retried on connection failures, 429 and 5xx until the deadline.
    fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
        deadline: Instant,
    ) -> std::result::Result<Reply, String> {
        let url = format!("{}{path}", self.url);
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let mut req = self.client.post(&url).header("content-type", "application/json").body(body.clone());
            if let Some(t) = token {
                let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                    .map_err(|_| "the token is not valid header text".to_owned())?;
                // Never indexed by HTTP/2 header compression, never printed.
                v.set_sensitive(true);
                req = req.header(reqwest::header::AUTHORIZATION, v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = req.timeout(left.max(Duration::from_millis(100))).send();
            let retry_why = match outcome {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let mut bytes = Zeroizing::new(Vec::with_capacity(64 << 10));
                    let read = std::io::Read::read_to_end(&mut std::io::Read::take(resp, MAX_ANSWER + 1), &mut bytes);
                    if read.is_err() || bytes.len() as u64 > MAX_ANSWER {
                        bytes.clear();
                    }
                    if status == 200 {
                        return Ok(Reply::Ok(bytes));
                    }
                    let (error, message) = match serde_json::from_slice::<ErrorAnswer>(&bytes) {
                        Ok(e) => (e.error, e.message),
                        Err(_) => {
                            (format!("http_{status}"), String::from_utf8_lossy(&bytes).chars().take(200).collect())
                        }
                    };
                    if status != 429 && status < 500 {
                        return Ok(Reply::Refused { status, error, message });
                    }
                    format!("HTTP {status} {error}: {message}")
                }
                Err(e) => {
                    let why = crate::tls::error_chain(&e);
                    if is_tls_failure(&e, &why) {
                        return Err(format!(
                            "TLS handshake failed ({why}); give the CA that signed the service's certificate \
                             (--ca-cert / ca_cert= / SHARDLOCK_CA_CERT), and a client certificate if the service requires mTLS"
                        ));
                    }
                    why
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{retry_why} ({attempt} attempts in {:.1?}); check that the service is running and reachable, \
                     and give a client certificate (--client-cert / client_cert=) if it requires mTLS",
                    self.opts.timeout
                ));
            }
            std::thread::sleep(backoff(attempt).min(deadline - now));
        }
    }

    fn register(&self, grant: &Grant, manifest: &[u8], digest: &Digest, deadline: Instant) -> Result<()> {
        match self.post("/v1/manifests", None, manifest.to_vec(), deadline) {
            Ok(Reply::Ok(_)) => {
                self.held().registered.insert(*digest);
                Ok(())
            }
            Ok(Reply::Refused { status, error, message }) => {
                Err(self
                    .unavailable(grant, format!("the service refused the manifest (HTTP {status} {error}: {message})")))
            }
            Err(why) => Err(self.unavailable(grant, why)),
        }
    }

    /// Shards to ask for with `shard` (the caller holds the lock and has marked
    /// `shard` pending): it, then the next ones of the plan neither held nor pending,
    /// which are marked pending too.
    fn batch_for(&self, held: &mut Held, digest: &Digest, token: &Digest, shard: u32) -> Vec<u32> {
        let mut out = vec![shard];
        if let Some((plan, _)) = held.plans.get(digest).cloned() {
            if let Some(at) = plan.iter().position(|&s| s == shard) {
                for &s in &plan[at + 1..] {
                    if out.len() >= self.opts.batch {
                        break;
                    }
                    let k = (*digest, *token, s);
                    if !out.contains(&s) && !held.deks.contains_key(&k) && held.pending.insert(k) {
                        out.push(s);
                    }
                }
            }
        }
        out
    }

    /// Asks the service for `shards` (all marked pending; the marks are cleared however
    /// this ends) for the epoch `epoch`, within `deadline`.
    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &self,
        grant: &Grant,
        ctx: &ReleaseContext<'_>,
        token: &Digest,
        shards: &[u32],
        epoch: u64,
        deadline: Instant,
    ) -> Result<Dek> {
        let digest = ctx.digest;
        let _guard = PendingGuard { provider: self, slots: shards.iter().map(|&s| (*digest, *token, s)).collect() };
        if !self.held().registered.contains(digest) {
            self.register(grant, ctx.manifest, digest, deadline)?;
        }
        let body = serde_json::to_vec(&serde_json::json!({"manifest": hex::encode(digest), "shards": shards}))
            .map_err(|_| Error::Internal("release request encoding".into()))?;
        let mut reply = self.post("/v1/release", ctx.token, body.clone(), deadline);
        if let Ok(Reply::Refused { error, .. }) = &reply {
            if error == "unknown_manifest" {
                // A restarted or other replica: register again, once.
                self.held().registered.remove(digest);
                self.register(grant, ctx.manifest, digest, deadline)?;
                reply = self.post("/v1/release", ctx.token, body, deadline);
            }
        }
        let bytes = match reply {
            Ok(Reply::Ok(b)) => b,
            Ok(Reply::Refused { status, error, message }) => {
                if let Ok(reason) = DenyReason::from_name(&error) {
                    return Err(denied(grant, reason, format!("key service {}: {message}", self.url)));
                }
                return Err(self.unavailable(grant, format!("HTTP {status} {error}: {message}")));
            }
            Err(why) => return Err(self.unavailable(grant, why)),
        };
        let answer: ReleaseAnswer<'_> = serde_json::from_slice(&bytes)
            .map_err(|_| self.unavailable(grant, "the service's answer is not a release document".into()))?;
        let mut mine = None;
        let now = Instant::now();
        let mut held = self.held();
        // A plan made while this request was in flight starts another epoch: what
        // arrived for the old one is not kept.
        let keep = held.epoch(digest) == epoch;
        for r in answer.deks {
            if !shards.contains(&r.shard) {
                continue;
            }
            let outcome = match (r.dek, r.denied, r.error) {
                (Some(b64), _, _) => Dek::from_base64(b64).ok_or_else(|| {
                    self.unavailable(grant, format!("shard {}: the released DEK is not 32 bytes of base64", r.shard))
                }),
                (None, Some(reason), _) => {
                    let reason = DenyReason::from_name(&reason).unwrap_or(DenyReason::InvalidToken);
                    Err(denied(grant, reason, format!("key service {}: {}", self.url, r.rule.unwrap_or_default())))
                }
                (None, None, Some(code)) => {
                    Err(self
                        .unavailable(grant, format!("shard {}: {code}: {}", r.shard, r.message.unwrap_or_default())))
                }
                (None, None, None) => {
                    Err(self.unavailable(grant, format!("shard {}: neither a DEK nor a denial", r.shard)))
                }
            };
            if r.shard == grant.shard() {
                mine = Some(outcome);
            } else if let (Ok(dek), true) = (outcome, keep) {
                held.deks.insert((*digest, *token, r.shard), (dek, now, epoch));
            }
        }
        drop(held);
        mine.unwrap_or_else(|| Err(self.unavailable(grant, "the service's answer does not name the shard".into())))
    }
}

fn denied(grant: &Grant, reason: DenyReason, rule: String) -> Error {
    Error::AccessDenied {
        dataset: Some(grant.dataset().to_owned()),
        shard: Some(grant.shard()),
        operation: grant.operation(),
        reason,
        rule,
    }
}

/// Exponential backoff from 50 ms to 2 s, with up to 50% jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 50u64.saturating_mul(1 << attempt.min(6)).min(2000);
    let mut r = [0u8; 2];
    let _ = crypto::random_bytes(&mut r);
    let jitter = u64::from(u16::from_le_bytes(r)) % (base / 2 + 1);
    Duration::from_millis(base + jitter)
}

/// True when a rustls error (a certificate or handshake failure) is in the chain, or
/// its text (`why`) says so: retrying does not help.
fn is_tls_failure(e: &(dyn std::error::Error + 'static), why: &str) -> bool {
    if why.contains("invalid peer certificate")
        || why.contains("received fatal alert")
        || why.contains("peer is incompatible")
    {
        return true;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = cur {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) {
                return true;
            }
        }
        cur = s.source();
    }
    false
}

/// The client TLS configuration for the service (`tls::client_config`, with the
/// environment's CA file as the fallback).
fn client_tls(tls: &ServiceTls) -> Result<rustls::ClientConfig> {
    let identity = match (&tls.client_cert, &tls.client_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => {
            return Err(Error::InvalidArgument(
                "a client certificate needs its key, and a key its certificate (client_cert and client_key)".into(),
            ))
        }
    };
    crate::tls::client_config(tls.ca_cert.as_deref(), identity)
}

impl KeyProvider for KeyServiceProvider {
    fn describe(&self) -> String {
        format!("key service {}", self.url)
    }

    fn active_kek_id(&self) -> &str {
        ""
    }

    /// The service decides what it can unwrap: every KEK id goes to it.
    fn holds(&self, _kek_id: &str) -> bool {
        true
    }

    fn wrap_dek(&self, _dek: &Dek) -> Result<(String, Vec<u8>)> {
        Err(Error::InvalidArgument(format!(
            "key service {}: a key service releases DEKs for reading; pack with the keyring or HSM the service uses",
            self.url
        )))
    }

    fn unwrap_dek(&self, grant: Grant) -> Result<Dek> {
        Err(self.unavailable(
            &grant,
            "a key service needs the token and manifest of the request (open shards through Access)".into(),
        ))
    }

    fn release_dek(&self, grant: Grant, ctx: &ReleaseContext<'_>) -> Result<Dek> {
        if grant.operation() != Some(Operation::Read) {
            let op = grant.operation().map_or("rotate", Operation::name);
            return Err(self.unavailable(
                &grant,
                format!("a key service releases DEKs for `read` only; `{op}` needs the keyring or HSM itself"),
            ));
        }
        let deadline = Instant::now() + self.opts.timeout;
        let token = crypto::sha256(ctx.token.unwrap_or_default().trim().as_bytes());
        let key = (*ctx.digest, token, grant.shard());
        let mut held = self.held();
        let (shards, epoch) = loop {
            let hold = self.opts.hold;
            held.deks.retain(|_, (_, at, _)| at.elapsed() < hold);
            if let Some((dek, _, _)) = held.deks.remove(&key) {
                return Ok(dek);
            }
            if held.pending.insert(key) {
                let epoch = held.epoch(ctx.digest);
                break (self.batch_for(&mut held, ctx.digest, &token, grant.shard()), epoch);
            }
            // Another worker's request names this shard: wait for it to end, then take
            // the key or ask for it ourselves, within this open's own deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(held);
                return Err(self.unavailable(&grant, "timed out waiting for another worker's request".into()));
            }
            held = self.arrived.wait_timeout(held, left).map_or_else(|p| p.into_inner().0, |r| r.0);
        };
        drop(held);
        self.fetch(&grant, ctx, &token, &shards, epoch, deadline)
    }

    fn plan(&self, manifest_digest: &[u8; 32], order: &[u32]) {
        let mut held = self.held();
        // A new epoch asks again for every shard: drop what an earlier plan released.
        held.deks.retain(|(d, _, _), _| d != manifest_digest);
        let epoch = held.epoch(manifest_digest) + 1;
        held.plans.insert(*manifest_digest, (Arc::new(order.to_vec()), epoch));
    }
}
