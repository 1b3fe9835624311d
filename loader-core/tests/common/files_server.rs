//! A small HTTPS file server for the key service's URL sources (deny list, trust
//! anchors): HTTP/1.1, one request per connection, ETag / If-None-Match, a status that
//! can be forced, and a record of what each request carried. Include with
//! `#[path = "common/files_server.rs"] mod files_server;`.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The request target, query included.
    pub target: String,
    /// Its If-None-Match header.
    pub if_none_match: Option<String>,
    /// Its Authorization header.
    pub authorization: Option<String>,
    /// The status answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    /// path -> (body, etag)
    files: HashMap<String, (Vec<u8>, String)>,
    forced: Option<u16>,
    seen: Vec<Seen>,
}

/// The server; stopped when dropped.
pub struct FilesServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FilesServer {
    /// Serves on a free port of 127.0.0.1 with the PEM certificate and key given.
    pub fn start(cert: &Path, key: &Path) -> Self {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap().map(|c| c.unwrap()).collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let cfg = Arc::new(cfg);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, halt) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(tcp) = tcp else { continue };
                let (cfg, st) = (cfg.clone(), st.clone());
                std::thread::spawn(move || serve(tcp, cfg, st));
            }
        });
        Self { addr, state, stop }
    }

    /// `https://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Serves `body` at `path` with a fresh ETag.
    pub fn put(&self, path: &str, body: &[u8]) {
        let mut st = self.state.lock().unwrap();
        let n = st.files.len() + st.seen.len();
        st.files.insert(path.to_owned(), (body.to_vec(), format!("\"v{n}-{}\"", body.len())));
    }

    /// Answers every request with `status` (and no body) until `None`.
    pub fn force(&self, status: Option<u16>) {
        self.state.lock().unwrap().forced = status;
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

impl Drop for FilesServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(tcp: TcpStream, cfg: Arc<rustls::ServerConfig>, state: Arc<Mutex<State>>) {
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let Ok(conn) = rustls::ServerConnection::new(cfg) else { return };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 << 10 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let target = lines.next().unwrap_or("").split(' ').nth(1).unwrap_or("").to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let path = target.split('?').next().unwrap_or("").to_owned();
    let if_none_match = headers.get("if-none-match").cloned();
    let mut st = state.lock().unwrap();
    let (status, body, etag) = match (st.forced, st.files.get(&path)) {
        (Some(code), _) => (code, Vec::new(), None),
        (None, None) => (404, Vec::new(), None),
        (None, Some((_, etag))) if if_none_match.as_deref() == Some(etag.as_str()) => {
            (304, Vec::new(), Some(etag.clone()))
        }
        (None, Some((body, etag))) => (200, body.clone(), Some(etag.clone())),
    };
    st.seen.push(Seen { target, if_none_match, authorization: headers.get("authorization").cloned(), status });
    drop(st);
    let mut out = format!("HTTP/1.1 {status} X\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    if let Some(e) = etag {
        out.push_str(&format!("etag: {e}\r\n"));
    }
    out.push_str("\r\n");
    let _ = tls.write_all(out.as_bytes()).and_then(|()| tls.write_all(&body)).and_then(|()| tls.flush());
    tls.conn.send_close_notify();
    let _ = tls.flush();
}
