//! `shardlock keyd`: the key service (feature `keyd`). It holds (or reaches) the KEK,
//! verifies every manifest and token itself, audits each decision in its own log, and
//! releases a shard's DEK only after its own authorization passed, so the workload that
//! a token constrains never holds the KEK. docs/KEY-SERVICE.md has the wire API.
//!
//! - [`KeydConfig`]: what the service serves with (custody, trust anchors, TLS, deny
//!   list, audit log, limits, log).
//! - [`Source`] (`shardlock::KeydSource`): a deny list or trust file, or an `https://`
//!   URL, re-read when it changes.
//! - [`LogFormat`]: text or JSON lines for the operational log (never a secret).
//! - [`KeyService`]: a running service: [`KeyService::start`] binds and serves on a
//!   thread of its own; [`KeyService::shutdown`] stops it gracefully.
//!
//! The release path is [`crate::Access`], exactly as in the loader: authorize →
//! `Grant` from the service's own verified manifest → unwrap → audit.

mod api;
mod log;
mod metrics;
mod server;
mod trust;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Clock;
use crate::error::{Error, Result};
use crate::keys::{KeyProvider, TrustAnchor};
pub use crate::watch::Source;
pub use log::LogFormat;

/// How a key service serves.
pub struct KeydConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port; see [`KeyService::local_addr`]).
    pub listen: SocketAddr,
    /// The custody that unwraps DEKs: a keyring file, a PKCS#11 HSM, OpenBao/Vault Transit
    /// or AWS KMS ([`crate::open_provider`]), or several of them as a
    /// [`crate::ProviderSet`] ([`crate::open_providers`]) for manifests whose shards are
    /// wrapped under different custody.
    pub keys: Arc<dyn KeyProvider>,
    /// Issuer keys whose manifests (and tokens) this service always accepts. With
    /// `trust_sources`, at least one anchor in all.
    pub trust: Vec<TrustAnchor>,
    /// Trust files (one `.pub`, or a JSON array of them) or `https://` URLs, re-read when
    /// they change: an anchor added there is honoured at the next manifest
    /// registration; a manifest registered under an anchor no longer in any source (nor
    /// in `trust`) is not served (`403 untrusted_manifest`, audited). A source that
    /// cannot be read or parsed after start keeps its last good anchors (logged).
    pub trust_sources: Vec<Source>,
    /// PEM certificate chain the service presents.
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert` (owner-only permissions).
    pub tls_key: PathBuf,
    /// With a CA file, every client must present a certificate it signed, whose subject
    /// CN must equal the token's principal (mTLS): a stolen token alone is not enough.
    pub client_ca: Option<PathBuf>,
    /// Deny list of revocation ids: a file, re-read whenever it changes (one that cannot
    /// be read or parsed fails every release until it can), or an `https://` URL polled
    /// every `poll_interval` (a failed fetch keeps the last good copy, logged).
    pub deny_list: Option<Source>,
    /// PEM CA certificate(s) for `https://` sources; else `SSL_CERT_FILE`, else the
    /// system bundle.
    pub source_ca: Option<PathBuf>,
    /// How often URL sources are fetched (and files checked without a request; default
    /// 30 s).
    pub poll_interval: Duration,
    /// The service's hash-chained audit log (every decision, never a key or token).
    pub audit_log: Option<PathBuf>,
    /// Allowed clock skew against the issuer (default 30 s, as in the loader).
    pub skew: Duration,
    /// Refuse manifests older than this generation (a rolled-back copy).
    pub min_generation: Option<u64>,
    /// Requests served at once; more are answered `503 busy` (default 256).
    pub max_in_flight: usize,
    /// Most shards one release request may name (default 4096).
    pub max_shards: usize,
    /// Verified manifests kept (default 1024; the oldest is dropped first).
    pub max_manifests: usize,
    /// Shard releases each principal may ask for per second (a token bucket holding
    /// twice that); more are answered `429 rate_limited`. `None`: no limit.
    pub rate_limit: Option<f64>,
    /// Stop on SIGINT/SIGTERM (the CLI; tests stop with [`KeyService::shutdown`]).
    pub handle_signals: bool,
    /// The clock (injectable for tests); `None` is the system clock.
    pub clock: Option<Clock>,
    /// Format of the operational log (default text).
    pub log_format: LogFormat,
    /// Where the operational log goes (default stderr): one line per request and per
    /// start, shutdown, reload and fetch failure.
    pub log: Box<dyn std::io::Write + Send>,
}

impl KeydConfig {
    /// A configuration with the defaults for everything but custody, trust and TLS.
    pub fn new(
        listen: SocketAddr,
        keys: Arc<dyn KeyProvider>,
        trust: Vec<TrustAnchor>,
        tls_cert: PathBuf,
        tls_key: PathBuf,
    ) -> Self {
        Self {
            listen,
            keys,
            trust,
            trust_sources: Vec::new(),
            tls_cert,
            tls_key,
            client_ca: None,
            deny_list: None,
            source_ca: None,
            poll_interval: Duration::from_secs(30),
            audit_log: None,
            skew: Duration::from_secs(30),
            min_generation: None,
            max_in_flight: 256,
            max_shards: 4096,
            max_manifests: 1024,
            rate_limit: None,
            handle_signals: false,
            clock: None,
            log_format: LogFormat::Text,
            log: Box::new(std::io::stderr()),
        }
    }
}

impl std::fmt::Debug for KeydConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeydConfig")
            .field("listen", &self.listen)
            .field("keys", &self.keys.describe())
            .field("trust", &self.trust.iter().map(TrustAnchor::key_id).collect::<Vec<_>>())
            .field("trust_sources", &self.trust_sources)
            .field("client_ca", &self.client_ca)
            .field("deny_list", &self.deny_list)
            .field("poll_interval", &self.poll_interval)
            .field("log_format", &self.log_format)
            .field("audit_log", &self.audit_log)
            .finish_non_exhaustive()
    }
}

/// A running key service.
pub struct KeyService {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    /// Dropped to stop the poller of the watched sources (it ends after a fetch in
    /// flight, without being waited for).
    poll_stop: Option<std::sync::mpsc::Sender<()>>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl KeyService {
    /// Checks the configuration, reads the TLS files, binds the address and starts
    /// serving on a thread of its own. Everything that can be wrong with the
    /// configuration fails here, naming the file or setting.
    pub fn start(mut cfg: KeydConfig) -> Result<Self> {
        if cfg.trust.is_empty() && cfg.trust_sources.is_empty() {
            return Err(Error::InvalidArgument(
                "the key service needs at least one trust anchor (--trust FILE.pub)".into(),
            ));
        }
        if cfg.poll_interval.is_zero() {
            return Err(Error::InvalidArgument("the poll interval must be longer than zero".into()));
        }
        let set = cfg.keys.as_any().and_then(|k| k.downcast_ref::<crate::keys::ProviderSet>());
        let members = set.map_or_else(|| vec![cfg.keys.clone()], |s| s.members().to_vec());
        if members.iter().any(|k| k.describe().starts_with("key service")) {
            return Err(Error::InvalidArgument(
                "the key service's custody must hold the KEK (a keyring file, pkcs11:, transit: or aws-kms:), not be another key service".into(),
            ));
        }
        if cfg.rate_limit.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(Error::InvalidArgument("the rate limit must be a positive number of shards per second".into()));
        }
        if cfg.max_in_flight == 0 || cfg.max_shards == 0 || cfg.max_manifests == 0 {
            return Err(Error::InvalidArgument(
                "max_in_flight, max_shards and max_manifests must be at least 1".into(),
            ));
        }
        let tls = server::tls_config(&cfg)?;
        let state = Arc::new(api::Service::new(&mut cfg)?);
        if state.trust.current().is_empty() {
            return Err(Error::InvalidArgument(
                "the key service needs at least one trust anchor, and its trust files hold none".into(),
            ));
        }
        let listener = std::net::TcpListener::bind(cfg.listen)
            .map_err(|e| Error::InvalidArgument(format!("cannot listen on {}: {e}", cfg.listen)))?;
        listener.set_nonblocking(true).map_err(Error::io("listen", std::path::Path::new("socket")))?;
        let addr = listener.local_addr().map_err(Error::io("listen", std::path::Path::new("socket")))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let signals = cfg.handle_signals;
        let poll_stop = state.watches().then(|| Self::poller(state.clone(), cfg.poll_interval)).transpose()?;
        state.log_start(addr, &cfg);
        let thread = std::thread::Builder::new()
            .name("shardlock-keyd".into())
            .spawn(move || server::run(listener, tls, state, stop_rx, signals))
            .map_err(|e| Error::Internal(format!("cannot start the key service thread: {e}")))?;
        Ok(Self { addr, stop: Some(stop_tx), thread: Some(thread), poll_stop })
    }

    /// Checks the watched sources every `interval` until the sender is dropped.
    fn poller(state: Arc<api::Service>, interval: Duration) -> Result<std::sync::mpsc::Sender<()>> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("shardlock-keyd-poll".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    state.poll_sources();
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the key service's poll thread: {e}")))?;
        Ok(tx)
    }

    /// The address the service listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (up to 10 s), and returns.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.join()
    }

    /// Serves until a signal (with `handle_signals`) or a fatal error stops the service.
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        let r = match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Internal("the key service thread panicked".into())),
            None => Ok(()),
        };
        self.poll_stop = None;
        r
    }
}

impl Drop for KeyService {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.join();
    }
}
