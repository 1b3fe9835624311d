//! `shardlock keyd`: the key service, until SIGINT or SIGTERM.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shardlock::{Error, KeyService, KeydConfig, KeydSource, LogFormat};

use crate::cli::KeydArgs;

/// `--config FILE`: the options of [`KeydArgs`] in TOML.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeydFile {
    listen: Option<std::net::SocketAddr>,
    keyring: Option<Keyrings>,
    #[serde(default)]
    trust: Vec<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    deny_list: Option<String>,
    source_ca: Option<PathBuf>,
    poll_interval: Option<String>,
    log_format: Option<String>,
    audit_log: Option<PathBuf>,
    clock_skew: Option<String>,
    min_generation: Option<u64>,
    max_in_flight: Option<usize>,
    max_shards: Option<usize>,
    rate_limit: Option<f64>,
    json: Option<bool>,
}

/// `keyring = "..."` or `keyring = ["...", "..."]` (several custodies).
#[derive(Deserialize)]
#[serde(untagged)]
enum Keyrings {
    One(String),
    Many(Vec<String>),
}

fn read_config(path: &Path) -> Result<KeydFile, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        op: "read config",
        path: path.to_owned(),
        source: std::sync::Arc::new(e),
    })?;
    toml::from_str(&text).map_err(|e| Error::Format {
        what: "keyd config (TOML)",
        path: path.to_owned(),
        detail: e.to_string().replace('\n', " "),
    })
}

/// `name` from the command line, else from the file, else a required-option error.
fn required<T>(cli: Option<T>, file: Option<T>, name: &str) -> Result<T, Error> {
    cli.or(file)
        .ok_or_else(|| Error::InvalidArgument(format!("--{name} is required (on the command line or in --config)")))
}

pub(crate) fn keyd_cmd(a: KeydArgs) -> Result<(), Error> {
    let f = match &a.config {
        Some(p) => read_config(p)?,
        None => KeydFile::default(),
    };
    let file_keyrings = f.keyring.map(|k| match k {
        Keyrings::One(s) => vec![s],
        Keyrings::Many(v) => v,
    });
    let keyring =
        required(Some(a.keyring).filter(|k| !k.is_empty()), file_keyrings.filter(|k| !k.is_empty()), "keyring")?;
    let trust_files = if a.trust.is_empty() { f.trust } else { a.trust };
    if trust_files.is_empty() {
        return Err(Error::InvalidArgument("--trust is required (on the command line or in --config)".into()));
    }
    let keys = shardlock::open_providers(&keyring)?;
    let listen = a.listen.or(f.listen).unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 8443)));
    let mut cfg = KeydConfig::new(
        listen,
        keys,
        Vec::new(),
        required(a.tls_cert, f.tls_cert, "tls-cert")?,
        required(a.tls_key, f.tls_key, "tls-key")?,
    );
    // Files and URLs alike are read by the service at start (an error names the one
    // that failed) and re-read when they change.
    cfg.trust_sources = trust_files.iter().map(|t| KeydSource::parse(t)).collect();
    cfg.client_ca = a.client_ca.or(f.client_ca);
    cfg.deny_list = a.deny_list.or(f.deny_list).map(|d| KeydSource::parse(&d));
    cfg.source_ca = a.source_ca.or(f.source_ca);
    if let Some(s) = a.poll_interval.or(f.poll_interval) {
        cfg.poll_interval = shardlock::parse_ttl(&s)?;
    }
    if let Some(s) = a.log_format.or(f.log_format) {
        cfg.log_format = s.parse::<LogFormat>()?;
    }
    cfg.audit_log = a.audit_log.or(f.audit_log);
    if let Some(s) = a.clock_skew.or(f.clock_skew) {
        cfg.skew = shardlock::parse_ttl(&s)?;
    }
    cfg.min_generation = a.min_generation.or(f.min_generation);
    if let Some(n) = a.max_in_flight.or(f.max_in_flight) {
        cfg.max_in_flight = n;
    }
    if let Some(n) = a.max_shards.or(f.max_shards) {
        cfg.max_shards = n;
    }
    cfg.rate_limit = a.rate_limit.or(f.rate_limit);
    cfg.handle_signals = true;
    let mtls = cfg.client_ca.is_some();
    let provider = cfg.keys.describe();
    let service = KeyService::start(cfg)?;
    let addr = service.local_addr();
    let mut out = std::io::stdout().lock();
    let line = if a.json || f.json == Some(true) {
        serde_json::json!({"listening": format!("https://{addr}"), "mtls": mtls, "custody": provider}).to_string()
    } else {
        format!(
            "shardlock keyd: listening on https://{addr} (custody: {provider}; mTLS {})",
            if mtls { "required" } else { "off" }
        )
    };
    // A closed stdout must not stop the service.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    drop(out);
    service.wait()
}
