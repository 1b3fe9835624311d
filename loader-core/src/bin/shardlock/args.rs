//! From command-line values to library values: size and backend parsers, and the
//! remote and reader options shared by several commands.

use std::sync::Arc;

use shardlock::AuditLog;
use shardlock::RemoteOptions;
use shardlock::TrustAnchor;
use shardlock::{service, KeyProvider};
use shardlock::{Access, Authorizer, AuthorizerConfig};
use shardlock::{Backend, Error};

use crate::cli::{ReaderArgs, RemoteArgs, StoreArgs};

impl StoreArgs {
    /// The store's address, region and timeouts (no cache: for upload).
    pub(crate) fn options(&self) -> Result<RemoteOptions, Error> {
        let mut o = RemoteOptions::default();
        o.endpoint.clone_from(&self.s3_endpoint);
        o.region.clone_from(&self.s3_region);
        if self.s3_allow_http {
            o.allow_http = Some(true);
        }
        if let Some(t) = &self.s3_timeout {
            o.set("timeout", t)?;
        }
        Ok(o)
    }
}

impl RemoteArgs {
    pub(crate) fn options(&self) -> Result<RemoteOptions, Error> {
        let mut o = self.store.options()?;
        o.cache_dir.clone_from(&self.cache_dir);
        o.cache_bytes = self.cache_bytes;
        o.set("range_reads", &self.range_reads)?;
        Ok(o)
    }
}

impl ReaderArgs {
    /// The key provider `--keyring` names (a [`shardlock::ProviderSet`] when repeated);
    /// a key service gets the TLS options.
    pub(crate) fn keys(&self) -> Result<Arc<dyn KeyProvider>, Error> {
        shardlock::ProviderSet::combine(self.keyring.iter().map(|spec| self.open_one(spec)).collect::<Result<_, _>>()?)
    }

    fn open_one(&self, spec: &str) -> Result<Arc<dyn KeyProvider>, Error> {
        if !shardlock::is_service_url(spec) {
            return shardlock::open_provider(spec);
        }
        let mut opts = service::ServiceOptions::from_env()?;
        if self.ca_cert.is_some() {
            opts.tls.ca_cert.clone_from(&self.ca_cert);
        }
        if self.client_cert.is_some() {
            opts.tls.client_cert.clone_from(&self.client_cert);
            opts.tls.client_key.clone_from(&self.client_key);
        }
        Ok(Arc::new(service::KeyServiceProvider::open(spec, opts)?))
    }

    /// The trust anchor and the access gate: `--token` (or `token`, when given, in its
    /// place), the deny list, the clock skew and the audit log.
    pub(crate) fn access(&self, token: Option<shardlock::Token>) -> Result<(TrustAnchor, Access), Error> {
        let keys = self.keys()?;
        let trust = TrustAnchor::load(&self.trust)?;
        let cfg = AuthorizerConfig {
            skew: shardlock::parse_ttl(&self.clock_skew)?,
            deny_list: self.deny_list.clone(),
            ..Default::default()
        };
        let authorizer = match token {
            Some(t) => Authorizer::new(&trust, Some(t), cfg)?,
            None => Authorizer::from_file(&trust, self.token.as_deref(), cfg)?,
        };
        let mut access = Access::new(authorizer, keys);
        if let Some(p) = &self.audit_log {
            access = access.with_audit(Arc::new(AuditLog::open(p)?));
        }
        Ok((trust, access))
    }
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 268435456, 64MiB, 512k)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("unknown size unit {u:?} (use k, MiB, GiB)")),
    };
    n.checked_mul(mul).filter(|&v| v > 0).ok_or_else(|| format!("{s:?} is out of range"))
}

pub(crate) fn parse_backend(s: &str) -> Result<Backend, String> {
    Backend::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Backend::ALL.iter().map(|b| b.name()).collect();
        format!("unknown backend {s:?}; this build has: {}", names.join(", "))
    })
}
