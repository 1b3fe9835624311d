//! The key service's TLS listener: TLS 1.3 only (rustls), HTTP/1.1 and HTTP/2 (hyper),
//! optional mTLS, bounded handshakes and connections, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use super::api::{self, Service};
use super::KeydConfig;
use crate::error::{Error, Result};

/// Longest TLS handshake before a connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Time requests in flight get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Longest wait for a request's headers (also an idle HTTP/1.1 connection's limit).
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections one client address may hold open.
const MAX_CONNECTIONS_PER_IP: usize = 256;

/// Open connections per client address.
#[derive(Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One counted connection; uncounted when dropped.
struct IpSlot(Arc<PerIp>, std::net::IpAddr);

impl PerIp {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot(self.clone(), ip))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// The server's rustls configuration (the TLS files are read here, so errors name them).
pub(super) fn tls_config(cfg: &KeydConfig) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = crate::tls::read_certs(&cfg.tls_cert)?;
    let key = crate::tls::read_private_key(&cfg.tls_key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::InvalidArgument(format!("TLS set-up: {e}")))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in crate::tls::read_certs(ca)? {
                roots.add(c).map_err(|e| Error::Format {
                    what: "client CA certificate",
                    path: ca.clone(),
                    detail: format!("not a usable trust anchor ({e})"),
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::InvalidArgument(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| {
        Error::InvalidArgument(format!(
            "TLS certificate {} and key {} do not make a server identity: {e}",
            cfg.tls_cert.display(),
            cfg.tls_key.display()
        ))
    })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

/// Serves until `stop` fires (or a signal, with `signals`).
pub(super) fn run(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<Service>,
    stop: tokio::sync::oneshot::Receiver<()>,
    signals: bool,
) -> Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("shardlock-keyd-io")
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("key service runtime: {e}")))?;
    rt.block_on(serve(listener, tls, state, stop, signals))
}

async fn stop_signal(stop: tokio::sync::oneshot::Receiver<()>, signals: bool) {
    if !signals {
        let _ = stop.await;
        return;
    }
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = stop => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<Service>,
    stop: tokio::sync::oneshot::Receiver<()>,
    signals: bool,
) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| Error::Internal(format!("key service listener: {e}")))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_ip = Arc::new(PerIp::default());
    let stopping = stop_signal(stop, signals);
    tokio::pin!(stopping);
    state.set_ready(true);
    loop {
        let permit = tokio::select! {
            _ = &mut stopping => break,
            p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut stopping => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                // Out of descriptors and the like: back off briefly, keep serving.
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue }
            },
        };
        let Some(ip_slot) = per_ip.take(peer.ip()) else {
            state.metrics.dropped_connection();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = (permit, ip_slot);
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
                state.metrics.dropped_connection();
                return;
            };
            let client = api::Client::of(stream.get_ref().1, peer);
            let svc = service_fn(move |req| {
                let state = state.clone();
                let client = client.clone();
                async move { Ok::<_, std::convert::Infallible>(state.handle(req, client).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(64)
                .max_header_list_size(128 << 10)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
            let _ = watcher.watch(conn).await;
        });
    }
    state.set_ready(false);
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_ok();
    state.log.line("info", "shutdown", vec![("drained", drained.into())]);
    Ok(())
}
