//! A real S3-compatible server for tests (`moto_server` from PyPI `moto[server]`), and
//! a small TCP proxy in front of it that injects faults.
//!
//! The server is found through `SHARDLOCK_TEST_MOTO` (path to `moto_server`), else
//! `<workspace>/.venv/bin/moto_server`, else `moto_server` on PATH. It is started on a
//! free port of 127.0.0.1 and killed when the [`S3Server`] is dropped (also when the
//! test panics). When no server can be started the test is skipped with a message on
//! stderr, unless `SHARDLOCK_REQUIRE_S3=1` (set by `make test`), where it fails.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardlock::RemoteOptions;

/// Credentials the tests use; they must never show up in an error, log or file.
pub const ACCESS_KEY: &str = "AKIDCANARY7Q2W";
pub const SECRET_KEY: &str = "SECRETCANARY-9f8e7d6c5b4a-do-not-log";

pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub port: u16,
}

fn moto_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHARDLOCK_TEST_MOTO") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    if venv.exists() {
        return Some(venv);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("moto_server")).find(|p| p.exists())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl S3Server {
    /// Starts moto_server, or returns `None` (test skipped) when it is not installed
    /// and not required.
    pub fn start(test: &str) -> Option<Self> {
        let required = std::env::var("SHARDLOCK_REQUIRE_S3").is_ok_and(|v| v == "1");
        let Some(bin) = moto_path() else {
            assert!(!required, "moto_server not found (SHARDLOCK_REQUIRE_S3=1): run `make setup`");
            eprintln!("SKIPPED {test}: moto_server not found; `make setup` installs moto[server] into .venv");
            return None;
        };
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port to another process: try another one
                }
                // Only our moto answers S3 on this port (another test's proxy may have
                // been given the same free port and accept connections).
                if http(port, "GET", "/", b"") == 200 && matches!(child.try_wait(), Ok(None)) {
                    return Some(Self { child, endpoint: format!("http://127.0.0.1:{port}"), port });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server at {} did not start", bin.display());
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let status = http(self.port, "PUT", &format!("/{bucket}"), b"");
        assert!(status == 200, "create bucket {bucket}: HTTP {status}");
    }

    /// Replaces (or creates) an object.
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let status = http(self.port, "PUT", &format!("/{bucket}/{key}"), body);
        assert!(status == 200, "put {key}: HTTP {status}");
    }

    /// Deletes an object.
    pub fn delete(&self, bucket: &str, key: &str) {
        let status = http(self.port, "DELETE", &format!("/{bucket}/{key}"), b"");
        assert!(status == 204 || status == 200, "delete {key}: HTTP {status}");
    }

    /// Creates `bucket` and uploads the packed dataset `dir` (signed by `trust`'s
    /// issuer) under `prefix`.
    pub fn upload(&self, trust: &shardlock::TrustAnchor, dir: &Path, bucket: &str, prefix: &str) -> String {
        self.create_bucket(bucket);
        let url = format!("s3://{bucket}/{prefix}");
        shardlock::upload_dir(dir, &url, trust, &options(&self.endpoint, None)).unwrap();
        url
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for `endpoint` with the test credentials and short timeouts.
pub fn options(endpoint: &str, cache: Option<&Path>) -> RemoteOptions {
    let mut o = RemoteOptions::default();
    o.set("endpoint", endpoint).unwrap();
    o.set("region", "us-east-1").unwrap();
    o.set("access_key_id", ACCESS_KEY).unwrap();
    o.set("secret_access_key", SECRET_KEY).unwrap();
    o.set("timeout", "8s").unwrap();
    o.set("stall_timeout", "2s").unwrap();
    o.set("connect_timeout", "1s").unwrap();
    if let Some(c) = cache {
        o.cache_dir = Some(c.to_owned());
    }
    o
}

/// One HTTP/1.1 request with a dummy signature (moto does not check signatures, but
/// treats requests without any as anonymous); returns the status.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> u16 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=AKIDTEST/20260101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=00\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).and_then(|()| s.write_all(body)).is_err() {
        return 0;
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let line = String::from_utf8_lossy(&resp[..resp.len().min(64)]).into_owned();
    line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// What the proxy does to the next connections.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Answer the next `n` requests with `503 Slow Down` and close.
    Status503(usize),
    /// Close the next `n` connections after `after` bytes of response (mid-body).
    CutAfter { after: usize, n: usize },
    /// Accept and never answer.
    Blackhole,
    /// Forward, sleeping this long before every response read.
    Slow(Duration),
}

/// A TCP proxy on a free port of 127.0.0.1 in front of `upstream`.
pub struct Proxy {
    pub endpoint: String,
    fault: Arc<Mutex<Fault>>,
    stop: Arc<AtomicBool>,
    injected: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
    /// Everything clients sent upstream (requests), for tests that check which calls were made.
    sent: Arc<Mutex<Vec<u8>>>,
    port: u16,
}

impl Proxy {
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let stop = Arc::new(AtomicBool::new(false));
        let injected = Arc::new(AtomicUsize::new(0));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (f, st, inj, fwd, rec) = (fault.clone(), stop.clone(), injected.clone(), forwarded.clone(), sent.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let mode = {
                    let mut g = f.lock().unwrap();
                    let m = g.clone();
                    match &mut *g {
                        Fault::Status503(n) | Fault::CutAfter { n, .. } => {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                *g = Fault::Pass;
                            }
                        }
                        _ => {}
                    }
                    m
                };
                let (st, inj, live, fwd, rec) = (st.clone(), inj.clone(), f.clone(), fwd.clone(), rec.clone());
                std::thread::spawn(move || serve(client, upstream, mode, &live, &st, &inj, &fwd, rec));
            }
        });
        Self { endpoint: format!("http://127.0.0.1:{port}"), fault, stop, injected, forwarded, sent, port }
    }

    /// How often `needle` occurs in what clients sent upstream since the last
    /// [`Proxy::clear`] (e.g. an `X-Amz-Target` value or a request path).
    pub fn count(&self, needle: &str) -> usize {
        let sent = self.sent.lock().unwrap();
        String::from_utf8_lossy(&sent).matches(needle).count()
    }

    /// Forgets what clients sent so far.
    pub fn clear(&self) {
        self.sent.lock().unwrap().clear();
    }

    pub fn set(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }

    /// Faults actually injected so far (503s sent, connections cut).
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }

    /// Response bytes (headers and bodies) forwarded to clients so far.
    pub fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[allow(clippy::too_many_arguments)]
fn serve(
    mut client: TcpStream,
    upstream: u16,
    mode: Fault,
    live: &Mutex<Fault>,
    stop: &AtomicBool,
    injected: &AtomicUsize,
    forwarded: &AtomicUsize,
    sent: Arc<Mutex<Vec<u8>>>,
) {
    match mode {
        Fault::Status503(_) => {
            let mut buf = [0u8; 8192];
            let _ = client.read(&mut buf);
            injected.fetch_add(1, Ordering::SeqCst);
            let _ = client.write_all(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = client.shutdown(Shutdown::Both);
        }
        Fault::Blackhole => {
            let mut buf = [0u8; 8192];
            client.set_read_timeout(Some(Duration::from_millis(200))).ok();
            while !stop.load(Ordering::SeqCst) {
                match client.read(&mut buf) {
                    Ok(0) => return,
                    _ => continue,
                }
            }
        }
        Fault::Pass | Fault::CutAfter { .. } | Fault::Slow(_) => {
            let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16384];
                while let Ok(n @ 1..) = c2.read(&mut buf) {
                    sent.lock().unwrap().extend_from_slice(&buf[..n]);
                    if u2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = u2.shutdown(Shutdown::Write);
            });
            let mut sent = 0usize;
            let mut buf = vec![0u8; 16384];
            loop {
                if let Fault::Slow(d) = mode {
                    std::thread::sleep(d);
                }
                // A blackhole also swallows connections opened before it (pooled ones).
                while matches!(*live.lock().unwrap(), Fault::Blackhole) {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let n = match up.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Fault::CutAfter { after, .. } = mode {
                    if sent + n > after {
                        injected.fetch_add(1, Ordering::SeqCst);
                        let _ = client.write_all(&buf[..after.saturating_sub(sent)]);
                        let _ = client.shutdown(Shutdown::Both);
                        let _ = up.shutdown(Shutdown::Both);
                        return;
                    }
                }
                if client.write_all(&buf[..n]).is_err() {
                    break;
                }
                forwarded.fetch_add(n, Ordering::SeqCst);
                sent += n;
            }
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}
