//! The key service's wire API (docs/KEY-SERVICE.md): routes, request limits, manifest
//! registration and token-gated DEK release.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::metrics::Metrics;
use super::KeydConfig;
use crate::access::Access;
use crate::audit::{AuditEvent, AuditLog};
use crate::auth::{Authorizer, AuthorizerConfig, Clock};
use crate::dataset::Dataset;
use crate::error::{DenyReason, Error, Operation};
use crate::keys::{KeyProvider, TrustAnchor};

/// Largest release request body (a list of shard numbers).
const MAX_RELEASE_BODY: usize = 1 << 20;
/// Largest manifest the service accepts (a 10,000-shard manifest is about 4 MiB).
pub(super) const MAX_MANIFEST_BODY: usize = 64 << 20;
/// Manifest registrations verified at once (each holds its body in memory).
const MAX_REGISTRATIONS: usize = 4;
/// Longest time a client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Posted-digest aliases kept per cached manifest.
const ALIASES_PER_MANIFEST: usize = 4;
/// Principals tracked by the rate limiter; idle full buckets are dropped beyond this.
const MAX_BUCKETS: usize = 100_000;

/// Per-principal token buckets of shard releases.
struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// Takes `cost` from `principal`'s bucket; `Err(seconds until it would pass)`.
    fn take(&self, principal: &str, cost: f64) -> Result<(), f64> {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_BUCKETS && !b.contains_key(principal) {
            let (rate, burst) = (self.rate, self.burst);
            b.retain(|_, (level, at)| *level + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (level, at) = b.entry(principal.to_owned()).or_insert((self.burst, now));
        *level = (*level + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        // A request larger than the bucket passes when the bucket is full (else it never would).
        if *level >= cost || *level >= self.burst {
            *level -= cost;
            Ok(())
        } else {
            Err((cost.min(self.burst) - *level) / self.rate)
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub(super) struct Client {
    /// The subject CN of a verified client certificate (mTLS).
    identity: Option<String>,
    peer: SocketAddr,
}

impl Client {
    pub(super) fn of(conn: &rustls::ServerConnection, peer: SocketAddr) -> Self {
        let identity = conn.peer_certificates().and_then(|c| c.first()).and_then(|der| cert_identity(der));
        Self { identity, peer }
    }

    /// What the audit log records for this client.
    fn label(&self) -> String {
        match &self.identity {
            Some(id) => format!("cert:{id}"),
            None => format!("addr:{}", self.peer.ip()),
        }
    }
}

/// A certificate's identity: its one subject CN; with no CN at all, its first DNS name.
/// Several CNs, or a CN that is not readable text, give no identity (so no token's
/// principal can match).
fn cert_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cns: Vec<_> = cert.subject().iter_common_name().collect();
    match cns.as_slice() {
        [cn] => return cn.as_str().ok().filter(|s| !s.is_empty()).map(str::to_owned),
        [] => {}
        _ => return None,
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
        _ => None,
    })
}

/// A refusal of the whole request: status, error code, message.
struct Refusal(StatusCode, &'static str, String);

impl Refusal {
    fn of(e: &Error) -> Self {
        let status = match e {
            Error::AccessDenied { .. } => StatusCode::FORBIDDEN,
            Error::KeyProvider { .. } | Error::Audit { .. } | Error::Io { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::KeyUnavailable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        Self(status, e.code(), e.to_string())
    }
}

/// Verified manifests, keyed by the SHA-256 of what the signature covers (body and
/// signature), so re-encodings of one signed manifest (whitespace, key order) share one
/// entry; each posted digest is an alias of it.
#[derive(Default)]
struct Manifests {
    by_signed: HashMap<[u8; 32], Arc<Dataset>>,
    order: VecDeque<[u8; 32]>,
    aliases: HashMap<String, [u8; 32]>,
    alias_order: VecDeque<String>,
}

impl Manifests {
    fn get(&self, posted: &str) -> Option<Arc<Dataset>> {
        self.aliases.get(posted).and_then(|k| self.by_signed.get(k)).cloned()
    }

    fn insert(&mut self, posted: String, signed: [u8; 32], ds: Dataset, max: usize) {
        if !self.by_signed.contains_key(&signed) {
            while self.by_signed.len() >= max {
                let Some(old) = self.order.pop_front() else { break };
                self.by_signed.remove(&old);
            }
            self.order.push_back(signed);
            self.by_signed.insert(signed, Arc::new(ds));
        }
        if self.aliases.insert(posted.clone(), signed).is_none() {
            self.alias_order.push_back(posted);
        }
        while self.aliases.len() > max * ALIASES_PER_MANIFEST {
            let Some(old) = self.alias_order.pop_front() else { break };
            self.aliases.remove(&old);
        }
    }
}

/// Counts a request in the in-flight gauge until dropped (however the request ends).
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.enter();
        Self(m)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The service's state, shared by every connection.
pub(super) struct Service {
    keys: Arc<dyn KeyProvider>,
    trust: Vec<TrustAnchor>,
    skew: Duration,
    deny_list: Option<Arc<crate::auth::DenyList>>,
    clock: Option<Clock>,
    audit: Option<Arc<AuditLog>>,
    mtls: bool,
    min_generation: Option<u64>,
    max_shards: usize,
    max_manifests: usize,
    limiter: Option<RateLimiter>,
    in_flight: Arc<tokio::sync::Semaphore>,
    registrations: Arc<tokio::sync::Semaphore>,
    manifests: Mutex<Manifests>,
    ready: AtomicBool,
    pub(super) metrics: Metrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    manifest: String,
    shards: Vec<u32>,
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r.headers_mut().insert("cache-control", hyper::header::HeaderValue::from_static("no-store"));
    r
}

fn error_body(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    let mut r = json(status, body);
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body is not read: the connection cannot carry another request.
        r.headers_mut().insert("connection", hyper::header::HeaderValue::from_static("close"));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        // Clients back off with jitter anyway; one second is the coarsest useful hint.
        r.headers_mut().insert("retry-after", hyper::header::HeaderValue::from_static("1"));
    }
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

/// The bearer token of an `Authorization` header (a secret: never logged).
fn bearer(req: &Request<Incoming>) -> Option<Zeroizing<String>> {
    let v = req.headers().get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| Zeroizing::new(token.trim().to_owned()))
}

impl Service {
    pub(super) fn new(cfg: &KeydConfig) -> crate::error::Result<Self> {
        let audit = cfg.audit_log.as_deref().map(AuditLog::open).transpose()?.map(Arc::new);
        // One list for every request, re-read when the file changes; a bad file fails now.
        let deny_list = cfg.deny_list.as_deref().map(crate::auth::DenyList::open).transpose()?.map(Arc::new);
        Ok(Self {
            keys: cfg.keys.clone(),
            trust: cfg.trust.clone(),
            skew: cfg.skew,
            deny_list,
            clock: cfg.clock.clone(),
            audit,
            mtls: cfg.client_ca.is_some(),
            min_generation: cfg.min_generation,
            max_shards: cfg.max_shards,
            max_manifests: cfg.max_manifests,
            limiter: cfg.rate_limit.map(|rate| RateLimiter { rate, burst: rate * 2.0, buckets: Mutex::default() }),
            in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight)),
            registrations: Arc::new(tokio::sync::Semaphore::new(MAX_REGISTRATIONS)),
            manifests: Mutex::new(Manifests::default()),
            ready: AtomicBool::new(false),
            metrics: Metrics::default(),
        })
    }

    pub(super) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn manifests(&self) -> std::sync::MutexGuard<'_, Manifests> {
        self.manifests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes one request.
    pub(super) async fn handle(self: Arc<Self>, req: Request<Incoming>, client: Client) -> Response<Full<Bytes>> {
        let route: &'static str = match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => "healthz",
            (&Method::GET, "/readyz") => "readyz",
            (&Method::GET, "/metrics") => "metrics",
            (&Method::POST, "/v1/manifests") => "manifests",
            (&Method::POST, "/v1/release") => "release",
            (_, "/healthz" | "/readyz" | "/metrics" | "/v1/manifests" | "/v1/release") => {
                return error_body(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "see docs/KEY-SERVICE.md");
            }
            _ => return error_body(StatusCode::NOT_FOUND, "not_found", "no such route; see docs/KEY-SERVICE.md"),
        };
        let resp = match route {
            "healthz" => text(StatusCode::OK, "ok\n".into()),
            "readyz" if self.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n".into()),
            "readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
            "metrics" => text(StatusCode::OK, self.metrics.render(self.manifests().by_signed.len())),
            _ => self.clone().serve_post(route, req, client).await,
        };
        self.metrics.request(route, resp.status().as_u16());
        resp
    }

    async fn serve_post(
        self: Arc<Self>,
        route: &'static str,
        req: Request<Incoming>,
        client: Client,
    ) -> Response<Full<Bytes>> {
        let token = bearer(&req);
        let limit = if route == "manifests" { MAX_MANIFEST_BODY } else { MAX_RELEASE_BODY };
        // Manifests are large: only a few are read and verified at once; the others wait
        // their turn (a refusal before the body is read would break the sender's pipe).
        let _registration = if route == "manifests" {
            match tokio::time::timeout(BODY_TIMEOUT, self.registrations.clone().acquire_owned()).await {
                Ok(Ok(p)) => Some(p),
                _ => {
                    let mut r = error_body(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "busy",
                        "too many manifest registrations in flight; retry",
                    );
                    r.headers_mut().insert("connection", hyper::header::HeaderValue::from_static("close"));
                    return r;
                }
            }
        } else {
            None
        };
        // The body is read before a request slot is taken, and within a time limit, so
        // slow senders cannot hold the slots.
        let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), limit).collect()).await {
            Ok(Ok(b)) => Zeroizing::new(b.to_bytes().to_vec()),
            Ok(Err(_)) => {
                return error_body(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    &format!("request body larger than {limit} bytes, or cut off"),
                );
            }
            Err(_) => {
                return error_body(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    &format!("request body not received within {BODY_TIMEOUT:?}"),
                );
            }
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return error_body(StatusCode::SERVICE_UNAVAILABLE, "busy", "too many requests in flight; retry");
        };
        let me = self.clone();
        // The slot and the gauge belong to the blocking work: a client that cancels its
        // request (an HTTP/2 reset) does not free them before the work ends.
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _gauge = InFlight::new(&me.metrics);
            match route {
                "manifests" => me.register(&body),
                _ => me.release(token, &body, &client),
            }
        });
        match work.await {
            Ok(Ok(body)) => json(StatusCode::OK, body),
            Ok(Err(Refusal(status, code, message))) => error_body(status, code, &message),
            Err(_) => error_body(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request handler failed"),
        }
    }

    fn record(&self, ev: &AuditEvent) -> Result<(), Refusal> {
        match &self.audit {
            Some(log) => log.record(ev).map_err(|e| Refusal::of(&e)),
            None => Ok(()),
        }
    }

    /// `POST /v1/manifests`: verifies the signed manifest against the trust anchors
    /// (and the generation policy), and caches it by the SHA-256 of its bytes.
    fn register(&self, bytes: &[u8]) -> Result<Bytes, Refusal> {
        let digest = hex::encode(crate::crypto::sha256(bytes));
        // What the signature covers, whatever the encoding around it.
        let signed = crate::format::SignedManifest::parse(bytes, Path::new("posted manifest.json")).ok().map(|m| {
            let mut h = crate::crypto::Sha256::default();
            h.update(&crate::format::SignedManifest::signed_message(&m.body));
            h.update(&m.signature);
            h.finish()
        });
        let mut first_err = None;
        let mut ds = None;
        for anchor in &self.trust {
            match Dataset::from_manifest_bytes(
                Path::new("(posted)"),
                PathBuf::from("posted manifest.json"),
                bytes,
                anchor,
            ) {
                Ok(d) => {
                    ds = Some(d);
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let mut ev =
            AuditEvent { event: "manifest", detail: Some(format!("sha256 {digest}")), ..AuditEvent::default() };
        let checked = match (ds, first_err) {
            (Some(d), _) => match self.min_generation.map(|g| d.require_generation(g)) {
                Some(Err(e)) => Err(e),
                _ => Ok(d),
            },
            (None, Some(e)) => Err(e),
            (None, None) => Err(Error::InvalidArgument("no trust anchor".into())),
        };
        let ds = match checked {
            Ok(d) => d,
            Err(e) => {
                ev.decision = Some("deny");
                ev.reason = Some(e.code());
                self.record(&ev)?;
                let mut r = Refusal::of(&e);
                if r.0 == StatusCode::BAD_REQUEST || r.0 == StatusCode::FORBIDDEN {
                    r.0 = StatusCode::UNPROCESSABLE_ENTITY;
                }
                return Err(r);
            }
        };
        let (dataset, generation) = (ds.manifest().dataset_id.clone(), ds.manifest().generation);
        ev.decision = Some("allow");
        ev.dataset = Some(dataset.clone());
        self.record(&ev)?;
        let Some(signed) = signed else {
            return Err(Refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "manifest verified but not re-parsed".into(),
            ));
        };
        self.manifests().insert(digest.clone(), signed, ds, self.max_manifests);
        Ok(Bytes::from(serde_json::json!({"digest": digest, "dataset": dataset, "generation": generation}).to_string()))
    }

    /// `POST /v1/release`: authorizes `read` of each shard for the bearer token with the
    /// same authorizer as the loader, audits every decision, and unwraps only what
    /// passed, taking each wrapped DEK from the service's own verified manifest.
    fn release(&self, token: Option<Zeroizing<String>>, body: &[u8], client: &Client) -> Result<Bytes, Refusal> {
        let bad = |m: String| Refusal(StatusCode::BAD_REQUEST, "invalid_request", m);
        let req: ReleaseRequest = serde_json::from_slice(body).map_err(|e| {
            bad(format!("the body must be {{\"manifest\": \"<sha256 hex>\", \"shards\": [...]}} ({e})"))
        })?;
        if req.shards.is_empty() || req.shards.len() > self.max_shards {
            return Err(bad(format!("name between 1 and {} shards", self.max_shards)));
        }
        let mut seen = std::collections::HashSet::new();
        let shards: Vec<u32> = req.shards.into_iter().filter(|s| seen.insert(*s)).collect();
        let ds = self.manifests().get(&req.manifest).ok_or_else(|| {
            Refusal(
                StatusCode::NOT_FOUND,
                "unknown_manifest",
                format!("manifest {} is not registered here; POST it to /v1/manifests first", bounded(&req.manifest)),
            )
        })?;
        let n = ds.manifest().shards.len();
        if let Some(s) = shards.iter().find(|&&s| s as usize >= n) {
            return Err(bad(format!("dataset {:?} has {n} shards; there is no shard {s}", ds.manifest().dataset_id)));
        }
        let cfg = AuthorizerConfig {
            skew: self.skew,
            deny_list: None,
            clock: self.clock.clone().unwrap_or_else(|| AuthorizerConfig::default().clock),
        };
        let authorizer = Authorizer::from_text_with(
            ds.trust_anchor(),
            token.as_deref().map(String::as_str),
            cfg,
            self.deny_list.clone(),
        )
        .map_err(|e| Refusal::of(&e))?;
        let valid = authorizer.has_valid_token();
        let principal = authorizer.principal().to_owned();
        if let Some(limiter) = &self.limiter {
            // A valid token spends its principal's bucket, one unit per shard. A missing
            // or invalid one (each costs an evaluation and an audit record) spends its
            // client address's bucket, one unit per request, so a flood of bad tokens
            // cannot fill the audit log at line rate.
            let (key, cost, over) = if valid {
                (principal.clone(), shards.len() as f64, format!("principal {principal:?} is over its rate limit"))
            } else {
                let ip = client.peer.ip();
                let over = format!("requests without a valid token from {ip} are over the rate limit");
                (format!("\0bad-token:{ip}"), 1.0, over)
            };
            if let Err(wait) = limiter.take(&key, cost) {
                return Err(Refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("{over}; retry in {wait:.2}s"),
                ));
            }
        }
        // Under mTLS the certificate's identity must be exactly the token's principal
        // (an empty principal matches no certificate).
        let mismatch = (valid
            && self.mtls
            && (authorizer.raw_principal().is_empty()
                || client.identity.as_deref() != Some(authorizer.raw_principal())))
        .then(|| {
            format!(
                "the client certificate is for {:?}, the token for principal {:?}",
                client.identity.as_deref().unwrap_or(""),
                principal
            )
        });
        let mut access = Access::new(authorizer, self.keys.clone()).with_client(client.label());
        if let Some(log) = &self.audit {
            access = access.with_audit(log.clone());
        }
        let mut entries: Vec<Zeroizing<String>> = Vec::with_capacity(shards.len());
        // A denial that is the token's, not the shard's (no token, a token that does not
        // verify or cannot be evaluated, a certificate that is not its principal's), is
        // decided and audited once, for the first shard, and applies to all of them.
        let mut token_denial: Option<(DenyReason, String)> = None;
        for &shard in &shards {
            let started = Instant::now();
            let outcome = if let Some((reason, rule)) = &token_denial {
                Err(Error::AccessDenied {
                    dataset: None,
                    shard: None,
                    operation: None,
                    reason: *reason,
                    rule: rule.clone(),
                })
            } else if let Some(rule) = &mismatch {
                Err(access
                    .deny(&ds, shard, Operation::Read, DenyReason::PrincipalMismatch, rule.clone())
                    .map_err(|e| Refusal::of(&e))?)
            } else {
                access.release_dek(&ds, shard, Operation::Read)
            };
            let entry = match outcome {
                Ok(dek) => {
                    self.metrics.release(started.elapsed());
                    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(dek.expose()));
                    let mut e = Zeroizing::new(String::with_capacity(b64.len() + 32));
                    e.push_str(&format!("{{\"shard\":{shard},\"dek\":\""));
                    e.push_str(&b64);
                    e.push_str("\"}");
                    e
                }
                Err(Error::AccessDenied { reason, rule, .. }) => {
                    self.metrics.denial(reason.name());
                    if token_denial.is_none() && (!valid || mismatch.is_some() || reason == DenyReason::InvalidToken) {
                        token_denial = Some((reason, rule.clone()));
                    }
                    let rule = serde_json::to_string(&rule).unwrap_or_else(|_| "\"\"".into());
                    Zeroizing::new(format!("{{\"shard\":{shard},\"denied\":\"{}\",\"rule\":{rule}}}", reason.name()))
                }
                // The custody cannot unwrap this shard's key: say so for this shard only.
                Err(e @ Error::KeyUnavailable { .. }) => {
                    let msg = serde_json::to_string(&e.to_string()).unwrap_or_else(|_| "\"\"".into());
                    Zeroizing::new(format!("{{\"shard\":{shard},\"error\":\"{}\",\"message\":{msg}}}", e.code()))
                }
                // The audit log or the custody as a whole failed: nothing is released.
                Err(e) => return Err(Refusal::of(&e)),
            };
            entries.push(entry);
        }
        // One allocation of the exact size, so no grown-and-freed copy holds a DEK.
        let len = entries.iter().map(|e| e.len() + 1).sum::<usize>() + 16;
        let mut out = String::with_capacity(len);
        out.push_str("{\"deks\":[");
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(e);
        }
        out.push_str("]}");
        // The buffer moves to the HTTP stack, which does not zeroize it (THREAT-MODEL 5).
        Ok(Bytes::from(out.into_bytes()))
    }
}

/// At most 80 printable characters of something a client sent.
fn bounded(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}
