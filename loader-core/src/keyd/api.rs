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

/// A certificate's identity: its subject CN, else its first DNS name.
fn cert_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
        return Some(cn.to_owned());
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

#[derive(Default)]
struct Manifests {
    by_digest: HashMap<String, Arc<Dataset>>,
    order: VecDeque<String>,
}

/// The service's state, shared by every connection.
pub(super) struct Service {
    keys: Arc<dyn KeyProvider>,
    trust: Vec<TrustAnchor>,
    skew: Duration,
    deny_list: Option<PathBuf>,
    clock: Option<Clock>,
    audit: Option<Arc<AuditLog>>,
    mtls: bool,
    min_generation: Option<u64>,
    max_shards: usize,
    max_manifests: usize,
    limiter: Option<RateLimiter>,
    in_flight: tokio::sync::Semaphore,
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
        if let Some(p) = &cfg.deny_list {
            // Fails now, naming the file, rather than on every request.
            crate::auth::DenyList::open(p)?;
        }
        Ok(Self {
            keys: cfg.keys.clone(),
            trust: cfg.trust.clone(),
            skew: cfg.skew,
            deny_list: cfg.deny_list.clone(),
            clock: cfg.clock.clone(),
            audit,
            mtls: cfg.client_ca.is_some(),
            min_generation: cfg.min_generation,
            max_shards: cfg.max_shards,
            max_manifests: cfg.max_manifests,
            limiter: cfg.rate_limit.map(|rate| RateLimiter { rate, burst: rate * 2.0, buckets: Mutex::default() }),
            in_flight: tokio::sync::Semaphore::new(cfg.max_in_flight),
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
            "metrics" => text(StatusCode::OK, self.metrics.render(self.manifests().by_digest.len())),
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
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return error_body(StatusCode::SERVICE_UNAVAILABLE, "busy", "too many requests in flight; retry");
        };
        self.metrics.enter();
        let token = bearer(&req);
        let limit = if route == "manifests" { crate::format::manifest::MAX_LEN as usize } else { MAX_RELEASE_BODY };
        let body = match Limited::new(req.into_body(), limit).collect().await {
            Ok(b) => Zeroizing::new(b.to_bytes().to_vec()),
            Err(_) => {
                self.metrics.leave();
                return error_body(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    &format!("request body larger than {limit} bytes, or cut off"),
                );
            }
        };
        let me = self.clone();
        let work = tokio::task::spawn_blocking(move || match route {
            "manifests" => me.register(&body),
            _ => me.release(token, &body, &client),
        });
        let out = match work.await {
            Ok(Ok(body)) => json(StatusCode::OK, body),
            Ok(Err(Refusal(status, code, message))) => error_body(status, code, &message),
            Err(_) => error_body(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request handler failed"),
        };
        self.metrics.leave();
        out
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
        let mut m = self.manifests();
        if !m.by_digest.contains_key(&digest) {
            while m.by_digest.len() >= self.max_manifests {
                let Some(old) = m.order.pop_front() else { break };
                m.by_digest.remove(&old);
            }
            m.order.push_back(digest.clone());
            m.by_digest.insert(digest.clone(), Arc::new(ds));
        }
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
        let ds = self.manifests().by_digest.get(&req.manifest).cloned().ok_or_else(|| {
            Refusal(
                StatusCode::NOT_FOUND,
                "unknown_manifest",
                format!("manifest {} is not registered here; POST it to /v1/manifests first", bounded(&req.manifest)),
            )
        })?;
        let n = ds.manifest().shards.len();
        if let Some(s) = req.shards.iter().find(|&&s| s as usize >= n) {
            return Err(bad(format!("dataset {:?} has {n} shards; there is no shard {s}", ds.manifest().dataset_id)));
        }
        let cfg = AuthorizerConfig {
            skew: self.skew,
            deny_list: self.deny_list.clone(),
            clock: self.clock.clone().unwrap_or_else(|| AuthorizerConfig::default().clock),
        };
        let authorizer = Authorizer::from_text(ds.trust_anchor(), token.as_deref().map(String::as_str), cfg)
            .map_err(|e| Refusal::of(&e))?;
        let principal = authorizer.principal().to_owned();
        if let (Some(limiter), false) = (&self.limiter, principal.is_empty()) {
            let distinct = req.shards.iter().collect::<std::collections::HashSet<_>>().len();
            if let Err(wait) = limiter.take(&principal, distinct as f64) {
                return Err(Refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("principal {principal:?} is over its rate limit; retry in {wait:.2}s"),
                ));
            }
        }
        let mut access = Access::new(authorizer, self.keys.clone()).with_client(client.label());
        if let Some(log) = &self.audit {
            access = access.with_audit(log.clone());
        }
        // Under mTLS the certificate's identity must be the token's principal.
        let mismatch = (self.mtls && !principal.is_empty() && client.identity.as_deref() != Some(principal.as_str()))
            .then(|| {
                format!(
                    "the client certificate is for {:?}, the token for principal {:?}",
                    client.identity.as_deref().unwrap_or(""),
                    principal
                )
            });
        let mut out = Zeroizing::new(String::from("{\"deks\":["));
        let mut seen = std::collections::HashSet::new();
        for shard in req.shards {
            if !seen.insert(shard) {
                continue;
            }
            if seen.len() > 1 {
                out.push(',');
            }
            let started = Instant::now();
            let outcome = match &mismatch {
                Some(rule) => Err(access
                    .deny(&ds, shard, Operation::Read, DenyReason::PrincipalMismatch, rule.clone())
                    .map_err(|e| Refusal::of(&e))?),
                None => access.release_dek(&ds, shard, Operation::Read),
            };
            match outcome {
                Ok(dek) => {
                    self.metrics.release(started.elapsed());
                    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(dek.expose()));
                    out.push_str(&format!("{{\"shard\":{shard},\"dek\":\""));
                    out.push_str(&b64);
                    out.push_str("\"}");
                }
                Err(Error::AccessDenied { reason, rule, .. }) => {
                    self.metrics.denial(reason.name());
                    let rule = serde_json::to_string(&rule).unwrap_or_else(|_| "\"\"".into());
                    out.push_str(&format!("{{\"shard\":{shard},\"denied\":\"{}\",\"rule\":{rule}}}", reason.name()));
                }
                Err(e) => return Err(Refusal::of(&e)),
            }
        }
        out.push_str("]}");
        Ok(Bytes::from(out.as_bytes().to_vec()))
    }
}

/// At most 80 printable characters of something a client sent.
fn bounded(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}
