//! `shardlock keyd`: the key service, until SIGINT or SIGTERM.

use std::io::Write as _;

use shardlock::{Error, KeyService, KeydConfig, TrustAnchor};

use crate::cli::KeydArgs;

pub(crate) fn keyd_cmd(a: KeydArgs) -> Result<(), Error> {
    let keys = shardlock::open_provider(&a.keyring)?;
    let trust = a.trust.iter().map(|p| TrustAnchor::load(p)).collect::<Result<Vec<_>, _>>()?;
    let mut cfg = KeydConfig::new(a.listen, keys, trust, a.tls_cert, a.tls_key);
    cfg.client_ca = a.client_ca;
    cfg.deny_list = a.deny_list;
    cfg.audit_log = a.audit_log;
    cfg.skew = shardlock::parse_ttl(&a.clock_skew)?;
    cfg.min_generation = a.min_generation;
    cfg.max_in_flight = a.max_in_flight;
    cfg.max_shards = a.max_shards;
    cfg.handle_signals = true;
    let mtls = cfg.client_ca.is_some();
    let provider = cfg.keys.describe();
    let service = KeyService::start(cfg)?;
    let addr = service.local_addr();
    let mut out = std::io::stdout().lock();
    let line = if a.json {
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
