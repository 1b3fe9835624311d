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

use super::log::{Fields, Log};
use super::metrics::Metrics;
use super::trust::TrustSet;
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

/// The paths the service serves.
const ROUTES: [&str; 5] = ["/healthz", "/readyz", "/metrics", "/v1/manifests", "/v1/release"];

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

/// What the request log says about a release, beyond the HTTP exchange: who asked
/// (the principal and revocation id of a valid token, never the token) and how many
/// shards were asked for, released and denied.
#[derive(Clone, Debug, Default)]
struct Note {
    principal: String,
    token_id: String,
    asked: usize,
    released: usize,
    denied: usize,
    /// The distinct reasons of the denials, in the order first met.
    reasons: Vec<&'static str>,
}

/// The `error` code of an error answer, for the request log (a response extension,
/// never sent).
#[derive(Clone, Copy, Debug)]
struct ErrorCode(&'static str);

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
    pub(super) trust: Arc<TrustSet>,
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
    pub(super) log: Arc<Log>,
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

fn error_body(status: StatusCode, code: &'static str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    let mut r = json(status, body);
    r.extensions_mut().insert(ErrorCode(code));
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
    /// The state for `cfg`, whose log sink it takes. Reads the audit log, the deny list
    /// and the trust sources now: a bad one fails here, naming it.
    pub(super) fn new(cfg: &mut KeydConfig) -> crate::error::Result<Self> {
        let log = Arc::new(Log::new(cfg.log_format, std::mem::replace(&mut cfg.log, Box::new(std::io::sink()))));
        let report = log.reporter();
        let audit = cfg.audit_log.as_deref().map(AuditLog::open).transpose()?.map(Arc::new);
        let ca = cfg.source_ca.as_deref();
        // One list for every request, re-read when it changes; a bad one fails now.
        let deny_list = cfg
            .deny_list
            .as_ref()
            .map(|s| crate::auth::DenyList::open_source(s, ca, Some(report.clone())))
            .transpose()?
            .map(Arc::new);
        let trust = TrustSet::open(&cfg.trust, &cfg.trust_sources, ca, &report)?;
        Ok(Self {
            keys: cfg.keys.clone(),
            trust,
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
            log,
        })
    }

    /// True when there is a deny list or a trust source to poll.
    pub(super) fn watches(&self) -> bool {
        self.deny_list.is_some() || self.trust.watches()
    }

    /// Fetches the URL sources and checks the files now (the poll thread's work).
    pub(super) fn poll_sources(&self) {
        if let Some(d) = &self.deny_list {
            d.poll();
        }
        self.trust.poll();
    }

    /// The `start` log line: where the service listens and what it serves with.
    pub(super) fn log_start(&self, addr: SocketAddr, cfg: &KeydConfig) {
        let deny_ids = self.deny_list.as_ref().and_then(|d| d.entries().ok());
        self.log.line(
            "info",
            "start",
            vec![
                ("listen", format!("https://{addr}").into()),
                ("custody", self.keys.describe().into()),
                ("mtls", self.mtls.into()),
                ("trust_anchors", self.trust.current().iter().map(|a| a.key_id()).collect::<Vec<_>>().into()),
                ("trust_sources", self.trust.sources().into()),
                ("deny_list", self.deny_list.as_ref().map(|d| d.path().display().to_string()).into()),
                ("deny_list_entries", deny_ids.into()),
                ("audit_log", cfg.audit_log.as_ref().map(|p| p.display().to_string()).into()),
                ("rate_limit", cfg.rate_limit.into()),
                ("poll_interval_s", cfg.poll_interval.as_secs_f64().into()),
            ],
        );
    }

    pub(super) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn manifests(&self) -> std::sync::MutexGuard<'_, Manifests> {
        self.manifests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes one request, and logs it.
    pub(super) async fn handle(self: Arc<Self>, req: Request<Incoming>, client: Client) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let method = req.method().clone();
        // Only a route's own path is logged: anything else a client sends is not echoed.
        let path = ROUTES.into_iter().find(|r| *r == req.uri().path()).unwrap_or("(other)");
        let resp = self.clone().route(req, client.clone()).await;
        self.log_request(&method, path, &resp, started, &client);
        resp
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>, client: Client) -> Response<Full<Bytes>> {
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

    /// The `request` log line: the exchange, who asked (never the token) and, for a
    /// release, how many shards were asked for, released and denied.
    fn log_request(
        &self,
        method: &Method,
        path: &'static str,
        resp: &Response<Full<Bytes>>,
        started: Instant,
        client: &Client,
    ) {
        let ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let note = resp.extensions().get::<Note>();
        let some = |s: &str| if s.is_empty() { serde_json::Value::Null } else { s.into() };
        let mut fields: Fields = vec![
            ("method", method.as_str().to_owned().into()),
            ("path", path.into()),
            ("status", resp.status().as_u16().into()),
            ("latency_ms", ms.into()),
            ("client", client.peer.to_string().into()),
            ("identity", client.identity.as_deref().map(bounded).into()),
        ];
        if let Some(n) = note {
            fields.extend([
                ("principal", some(&n.principal)),
                ("token_id", some(&n.token_id)),
                ("shards_asked", n.asked.into()),
                ("shards_released", n.released.into()),
                ("shards_denied", n.denied.into()),
                (
                    "deny_reasons",
                    if n.reasons.is_empty() { serde_json::Value::Null } else { n.reasons.join(",").into() },
                ),
            ]);
        }
        fields.push(("error", resp.extensions().get::<ErrorCode>().map(|c| c.0).into()));
        let level = if resp.status().is_server_error() { "warn" } else { "info" };
        self.log.line(level, "request", fields);
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
                "manifests" => (me.register(&body), None),
                _ => {
                    let mut note = Note::default();
                    let r = me.release(token, &body, &client, &mut note);
                    (r, Some(note))
                }
            }
        });
        let (mut resp, note) = match work.await {
            Ok((Ok(body), note)) => (json(StatusCode::OK, body), note),
            Ok((Err(Refusal(status, code, message)), note)) => (error_body(status, code, &message), note),
            Err(_) => (error_body(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request handler failed"), None),
        };
        if let Some(n) = note {
            resp.extensions_mut().insert(n);
        }
        resp
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
        let parsed = crate::format::SignedManifest::parse(bytes, Path::new("posted manifest.json")).ok();
        let claimed = parsed.as_ref().map(|m| m.manifest.issuer_key_id.clone());
        let signed = parsed.map(|m| {
            let mut h = crate::crypto::Sha256::default();
            h.update(&crate::format::SignedManifest::signed_message(&m.body));
            h.update(&m.signature);
            h.finish()
        });
        let mut first_err = None;
        let mut ds = None;
        let current = self.trust.current();
        // Verified only under the anchors with the key id the manifest names (else under
        // the first, for its error): a large trust bundle does not multiply the cost of
        // an unauthenticated registration.
        let mut candidates: Vec<&TrustAnchor> =
            current.iter().filter(|a| claimed.as_deref() == Some(a.key_id().as_str())).collect();
        if candidates.is_empty() {
            candidates.extend(current.first());
        }
        for anchor in candidates {
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
            (None, None) => Err(Error::ManifestSignature {
                path: PathBuf::from("posted manifest.json"),
                detail: "the service trusts no issuer key now (its trust sources hold none)".into(),
            }),
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
    fn release(
        &self,
        token: Option<Zeroizing<String>>,
        body: &[u8],
        client: &Client,
        note: &mut Note,
    ) -> Result<Bytes, Refusal> {
        let bad = |m: String| Refusal(StatusCode::BAD_REQUEST, "invalid_request", m);
        let req: ReleaseRequest = serde_json::from_slice(body).map_err(|e| {
            bad(format!("the body must be {{\"manifest\": \"<sha256 hex>\", \"shards\": [...]}} ({e})"))
        })?;
        if req.shards.is_empty() || req.shards.len() > self.max_shards {
            return Err(bad(format!("name between 1 and {} shards", self.max_shards)));
        }
        let mut seen = std::collections::HashSet::new();
        let shards: Vec<u32> = req.shards.into_iter().filter(|s| seen.insert(*s)).collect();
        note.asked = shards.len();
        let ds = self.manifests().get(&req.manifest).ok_or_else(|| {
            Refusal(
                StatusCode::NOT_FOUND,
                "unknown_manifest",
                format!("manifest {} is not registered here; POST it to /v1/manifests first", bounded(&req.manifest)),
            )
        })?;
        if !self.trust.trusts(ds.trust_anchor()) {
            return Err(self.untrusted(&ds, &req.manifest, shards.len(), client));
        }
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
        note.principal.clone_from(&principal);
        note.token_id = authorizer.token_id().to_owned();
        // A valid token spends its principal's bucket, one unit per shard. A missing or
        // invalid one (each costs an evaluation and an audit record) spends its client
        // address's bucket, one unit per request, so a flood of bad tokens cannot fill
        // the audit log at line rate.
        if valid {
            self.limit(&principal, shards.len() as f64, || format!("principal {principal:?} is over its rate limit"))?;
        } else {
            self.limit_unverified(client)?;
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
                    note.released += 1;
                    self.metrics.release(started.elapsed());
                    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(dek.expose()));
                    let mut e = Zeroizing::new(String::with_capacity(b64.len() + 32));
                    e.push_str(&format!("{{\"shard\":{shard},\"dek\":\""));
                    e.push_str(&b64);
                    e.push_str("\"}");
                    e
                }
                Err(Error::AccessDenied { reason, rule, .. }) => {
                    note.denied += 1;
                    if !note.reasons.contains(&reason.name()) {
                        note.reasons.push(reason.name());
                    }
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

impl Service {
    /// Takes `cost` from `key`'s bucket, if there is a rate limit; `over` says who is over it.
    fn limit(&self, key: &str, cost: f64, over: impl FnOnce() -> String) -> Result<(), Refusal> {
        match self.limiter.as_ref().map(|l| l.take(key, cost)) {
            Some(Err(wait)) => {
                Err(Refusal(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("{}; retry in {wait:.2}s", over())))
            }
            _ => Ok(()),
        }
    }

    /// One unit from the bucket of requests without a verified token from `client`'s address.
    fn limit_unverified(&self, client: &Client) -> Result<(), Refusal> {
        let ip = client.peer.ip();
        self.limit(&format!("\0bad-token:{ip}"), 1.0, || {
            format!("requests without a valid token from {ip} are over the rate limit")
        })
    }

    /// The refusal of a release for a manifest registered under a trust anchor the
    /// service no longer has (its trust sources changed): audited as a deny, once per
    /// request (the token is not evaluated: its issuer is not trusted either).
    fn untrusted(&self, ds: &Dataset, digest: &str, shards: usize, client: &Client) -> Refusal {
        if let Err(r) = self.limit_unverified(client) {
            return r;
        }
        let key = ds.trust_anchor().key_id();
        let rule = format!(
            "manifest {} was verified under issuer key {key}, which is no longer a trust anchor of this service",
            bounded(digest)
        );
        let ev = AuditEvent {
            event: "authorize",
            client: Some(client.label()),
            dataset: Some(ds.manifest().dataset_id.clone()),
            operation: Some(Operation::Read.name()),
            decision: Some("deny"),
            reason: Some("untrusted_manifest"),
            rule: Some(rule.clone()),
            detail: Some(format!("{shards} shards asked")),
            ..AuditEvent::default()
        };
        if let Err(r) = self.record(&ev) {
            return r;
        }
        Refusal(
            StatusCode::FORBIDDEN,
            "untrusted_manifest",
            format!("{rule}; nothing is released for it (ask the data owner which issuer to trust)"),
        )
    }
}

/// At most 80 printable characters of something a client sent.
fn bounded(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}
