//! OpenBao / Vault Transit custody ([`TransitProvider`], feature `transit`): the KEK is a
//! Transit key that never leaves the server; DEKs are made with `datakey/plaintext` (or
//! wrapped with `encrypt`, when rotating in from other custody) and unwrapped with
//! `decrypt`, each under a derived-key context naming the dataset and
//! shard, so a wrapped DEK moved to another shard's entry does not decrypt.
//!
//! ```text
//! transit:https://bao.internal:8200/transit/shardlock?token-source=file:/run/secrets/bao-token&ca-cert=/etc/ssl/bao-ca.pem
//!         ^ server                  ^ mount  ^ key (created with derived=true)
//! ```
//!
//! - `token-source=env:VAR` or `file:PATH` (a 0600 file): the Vault token; default
//!   `env:VAULT_TOKEN`, then `env:BAO_TOKEN`. It is never part of the URI, an error or
//!   the audit log.
//! - `ca-cert=PATH`: the CA of the server's certificate (default `SSL_CERT_FILE`, then the
//!   system bundle). Plain `http://` is accepted only for a loopback address (a dev server).
//!
//! The KEK id in the manifest is `transit:<mount>/<key>` (without the server, which may
//! move), and `wrapped_dek` is the hex of the Transit ciphertext text (`vault:vN:...`,
//! FORMAT.md section 7.5). Rotation is Transit's: `bao write -f transit/keys/<key>/rotate`,
//! then `shardlock rotate --keyring transit:... --new-keyring transit:...` (the same key)
//! calls `rewrap` for every DEK, which moves it to the newest key version without it
//! leaving Transit; payloads are untouched.

use std::path::PathBuf;

use base64::Engine as _;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{Dek, Grant, KeyProvider, Rewrap, WrapContext};
use crate::error::{Error, ProviderFailure, Result};

/// Prefix of Transit KEK ids in manifests.
pub const KEK_ID_PREFIX: &str = "transit:";

/// Longest Transit ciphertext accepted (the hex in the manifest is twice this).
pub const MAX_CIPHERTEXT: usize = 512;

/// A parsed `transit:` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitUri {
    /// `scheme://host:port` of the server.
    pub server: String,
    /// Mount path of the Transit engine (`transit`, or `kms/transit`).
    pub mount: String,
    /// Name of the Transit key.
    pub key: String,
    /// Where the Vault token comes from (`env:VAR` or `file:PATH`); `None`: the default.
    pub token_source: Option<String>,
    /// CA certificate file for the server's certificate.
    pub ca_cert: Option<PathBuf>,
}

fn bad_uri(uri: &str, detail: &str) -> Error {
    // Never echo the server part (it may hold user info) or the query: the mount and key
    // names are enough to say which URI.
    let _ = uri;
    Error::InvalidArgument(format!("transit URI: {detail}"))
}

impl TransitUri {
    /// Parses `transit:<scheme>://<host>[:port]/<mount>/<key>[?token-source=...&ca-cert=...]`.
    pub fn parse(uri: &str) -> Result<Self> {
        let rest = uri.strip_prefix("transit:").ok_or_else(|| bad_uri(uri, "does not start with transit:"))?;
        let (url, query) = rest.split_once('?').unwrap_or((rest, ""));
        let parsed = reqwest::Url::parse(url).map_err(|_| bad_uri(uri, "needs the server's https:// URL"))?;
        let server = crate::tls::checked_server(&parsed).map_err(|d| bad_uri(uri, d))?;
        let segments: Vec<&str> = parsed.path().split('/').filter(|s| !s.is_empty()).collect();
        let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        let Some((key, mount)) = segments.split_last() else { return Err(bad_uri(uri, "needs /<mount>/<key>")) };
        if mount.is_empty() || !ok(key) || !mount.iter().all(|s| ok(s)) {
            return Err(bad_uri(uri, "mount and key names are [A-Za-z0-9_.-], as /<mount>/<key>"));
        }
        let mut out =
            Self { server, mount: mount.join("/"), key: (*key).to_owned(), token_source: None, ca_cert: None };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("token-source", v)) if v.starts_with("env:") || v.starts_with("file:") => {
                    out.token_source = Some(v.to_owned())
                }
                Some(("ca-cert", v)) if !v.is_empty() => out.ca_cert = Some(PathBuf::from(v)),
                Some(("token", _)) => {
                    return Err(bad_uri(uri, "a token does not go in the URI; use token-source=env:VAR or file:PATH"))
                }
                _ => return Err(bad_uri(uri, "the query may have token-source=env:VAR|file:PATH and ca-cert=PATH")),
            }
        }
        Ok(out)
    }

    /// The KEK id this key has in manifests.
    pub fn kek_id(&self) -> String {
        format!("{KEK_ID_PREFIX}{}/{}", self.mount, self.key)
    }
}

/// Wraps and unwraps DEKs with a Transit key (see the module docs).
pub struct TransitProvider {
    uri: TransitUri,
    kek_id: String,
    token: Zeroizing<String>,
    client: reqwest::blocking::Client,
    /// Whether the key was seen to be `derived` (checked once, before the first wrap).
    derived_checked: std::sync::OnceLock<()>,
}

impl std::fmt::Debug for TransitProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransitProvider").field("kek_id", &self.kek_id).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    data: Option<AnswerData<'a>>,
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Deserialize)]
struct AnswerData<'a> {
    #[serde(borrow, default)]
    ciphertext: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    plaintext: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    derived: Option<bool>,
}

/// The derived-key context of one shard's DEK: binds the wrap to (issuer, dataset, shard
/// index, shard id).
fn context(ctx: &WrapContext<'_>) -> String {
    base64::engine::general_purpose::STANDARD.encode(ctx.text())
}

/// Printable, bounded text of what a server said.
fn bounded(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(300).collect()
}

impl TransitProvider {
    /// Opens the provider `uri` names; reads the token now, so a missing one fails here.
    pub fn open_uri(uri: &str) -> Result<Self> {
        let parsed = TransitUri::parse(uri)?;
        let provider = format!("transit {}", parsed.kek_id());
        let fail =
            |kind: ProviderFailure, detail: String| Error::KeyProvider { provider: provider.clone(), kind, detail };
        let token = match parsed.token_source.as_deref() {
            Some(src) => read_token(src).map_err(|d| fail(ProviderFailure::PinSource, d))?,
            None => read_token("env:VAULT_TOKEN").or_else(|_| read_token("env:BAO_TOKEN")).map_err(|_| {
                fail(
                    ProviderFailure::PinSource,
                    "no token: set VAULT_TOKEN (or BAO_TOKEN), or give token-source=env:VAR|file:PATH".into(),
                )
            })?,
        };
        let client = crate::tls::custody_client(&parsed.server, parsed.ca_cert.as_deref())?;
        Ok(Self { kek_id: parsed.kek_id(), uri: parsed, token, client, derived_checked: std::sync::OnceLock::new() })
    }

    /// One call: `POST /v1/<mount>/<op>/<key>` with `body`, or a `GET` of the key
    /// (`op == "keys"`, no body).
    fn call(&self, op: &str, body: Option<&Zeroizing<String>>) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
        let url = format!("{}/v1/{}/{op}/{}", self.uri.server, self.uri.mount, self.uri.key);
        let mut token = reqwest::header::HeaderValue::from_str(&self.token)
            .map_err(|_| "the token is not header text".to_owned())?;
        token.set_sensitive(true);
        let req = match body {
            Some(b) => self.client.post(&url).header("content-type", "application/json").body(b.as_bytes().to_vec()),
            None => self.client.get(&url),
        };
        let resp = req
            .header("X-Vault-Token", token)
            .send()
            .map_err(|e| format!("{} unreachable ({e}); check that the server runs and the URI", self.uri.server))?;
        let status = resp.status().as_u16();
        // Sized up front: a grown buffer would leave freed copies of a plaintext DEK.
        let mut bytes = Zeroizing::new(Vec::with_capacity(64 << 10));
        std::io::Read::read_to_end(&mut std::io::Read::take(resp, 64 << 10), &mut bytes)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if status != 200 {
            let errors = serde_json::from_slice::<Answer<'_>>(&bytes).map(|a| a.errors.join("; ")).unwrap_or_default();
            return Err(format!("Transit {op} answered HTTP {status}: {}", bounded(&errors)));
        }
        Ok(bytes)
    }

    /// Refuses to wrap under a key that is not `derived` (the context would be ignored,
    /// and a wrapped DEK would decrypt for any shard). Checked once.
    fn require_derived(&self) -> Result<()> {
        if self.derived_checked.get().is_some() {
            return Ok(());
        }
        let bytes = self.call("keys", None).map_err(|d| self.unavailable(format!("reading the key: {d}")))?;
        let derived = serde_json::from_slice::<Answer<'_>>(&bytes).ok().and_then(|a| a.data).and_then(|d| d.derived);
        if derived != Some(true) {
            return Err(Error::KeyProvider {
                provider: format!("transit {}", self.kek_id),
                kind: ProviderFailure::KekUnusable,
                detail: "the Transit key is not derived, so it would ignore the per-shard context; create it with derived=true".into(),
            });
        }
        let _ = self.derived_checked.set(());
        Ok(())
    }

    fn unavailable(&self, detail: String) -> Error {
        Error::KeyUnavailable { key_id: self.kek_id.clone(), detail: format!("transit {}: {detail}", self.kek_id) }
    }

    fn data<'a>(&self, op: &str, bytes: &'a [u8]) -> Result<AnswerData<'a>> {
        serde_json::from_slice::<Answer<'_>>(bytes)
            .ok()
            .and_then(|a| a.data)
            .ok_or_else(|| self.unavailable(format!("{op} answered no data")))
    }

    /// The `vault:vN:...` ciphertext of an answer, within [`MAX_CIPHERTEXT`].
    fn ciphertext(&self, op: &str, bytes: &[u8]) -> Result<Vec<u8>> {
        let ct =
            self.data(op, bytes)?.ciphertext.ok_or_else(|| self.unavailable(format!("{op} answered no ciphertext")))?;
        if !ct.starts_with("vault:v") || ct.len() > MAX_CIPHERTEXT || !ct.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.unavailable(format!("{op} answered an unexpected ciphertext ({} bytes)", ct.len())));
        }
        Ok(ct.as_bytes().to_vec())
    }

    /// The 32-byte DEK of an answer's base64 `plaintext`.
    fn plaintext_dek(&self, op: &str, shard: u32, bytes: &[u8]) -> Result<Dek> {
        let pt =
            self.data(op, bytes)?.plaintext.ok_or_else(|| self.unavailable(format!("{op} answered no plaintext")))?;
        Dek::from_base64(&pt)
            .ok_or_else(|| self.unavailable(format!("shard {shard}: the DEK {op} answered is not 32 bytes of base64")))
    }

    /// The Transit ciphertext text of the DEK `grant` names.
    fn grant_ciphertext<'g>(&self, grant: &'g Grant) -> Result<&'g str> {
        std::str::from_utf8(grant.wrapped_dek())
            .ok()
            .filter(|c| c.starts_with("vault:v") && c.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                self.unavailable(format!("shard {}: the wrapped DEK is not a Transit ciphertext", grant.shard()))
            })
    }
}

/// The Vault token from `env:VAR` or `file:PATH` (an owner-only file).
fn read_token(src: &str) -> std::result::Result<Zeroizing<String>, String> {
    let t = if let Some(var) = src.strip_prefix("env:") {
        Zeroizing::new(std::env::var(var).map_err(|_| format!("{var} is not set"))?)
    } else if let Some(path) = src.strip_prefix("file:") {
        let bytes = crate::fs::read_secret_file(std::path::Path::new(path)).map_err(|e| e.to_string())?;
        Zeroizing::new(String::from_utf8(bytes.to_vec()).map_err(|_| format!("{path} is not text"))?)
    } else {
        return Err("token-source is env:VAR or file:PATH".into());
    };
    let t = Zeroizing::new(t.trim().to_owned());
    if t.is_empty() {
        return Err(format!("{src}: the token is empty"));
    }
    Ok(t)
}

impl KeyProvider for TransitProvider {
    fn describe(&self) -> String {
        format!("transit {} at {}", self.kek_id, self.uri.server)
    }

    fn active_kek_id(&self) -> &str {
        &self.kek_id
    }

    fn wrap_dek(&self, _dek: &Dek) -> Result<(String, Vec<u8>)> {
        Err(Error::Internal("Transit wraps a DEK only with its dataset and shard (wrap_dek_for)".into()))
    }

    fn wrap_dek_for(&self, dek: &Dek, ctx: &WrapContext<'_>) -> Result<(String, Vec<u8>)> {
        self.require_derived()?;
        let shard = ctx.shard;
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(dek.expose()));
        let context = context(ctx);
        let mut body = Zeroizing::new(String::with_capacity(b64.len() + context.len() + 64));
        body.push_str("{\"plaintext\":\"");
        body.push_str(&b64);
        body.push_str("\",\"context\":\"");
        body.push_str(&context);
        body.push_str("\"}");
        let bytes =
            self.call("encrypt", Some(&body)).map_err(|d| self.unavailable(format!("wrapping shard {shard}: {d}")))?;
        Ok((self.kek_id.clone(), self.ciphertext("encrypt", &bytes)?))
    }

    /// `datakey/plaintext`: Transit draws the DEK and returns it with its wrap under the
    /// shard's derived-key context.
    fn generate_dek_for(&self, ctx: &WrapContext<'_>) -> Result<(Dek, String, Vec<u8>)> {
        self.require_derived()?;
        let body = Zeroizing::new(serde_json::json!({"context": context(ctx), "bits": 256}).to_string());
        let bytes = self
            .call("datakey/plaintext", Some(&body))
            .map_err(|d| self.unavailable(format!("a data key for shard {}: {d}", ctx.shard)))?;
        let dek = self.plaintext_dek("datakey", ctx.shard, &bytes)?;
        Ok((dek, self.kek_id.clone(), self.ciphertext("datakey", &bytes)?))
    }

    /// `rewrap`: to the newest version of the same key on the same server (after a
    /// Transit key rotation); the DEK never leaves Transit.
    fn rewrap_for(&self, grant: Grant, target: &dyn KeyProvider) -> Result<Rewrap> {
        let same_key = target
            .as_any()
            .and_then(|t| t.downcast_ref::<Self>())
            .is_some_and(|t| t.uri.server == self.uri.server && t.kek_id == self.kek_id);
        if !same_key || grant.kek_id() != self.kek_id {
            return Ok(Rewrap::Unsupported(grant));
        }
        let ct = self.grant_ciphertext(&grant)?;
        let body =
            Zeroizing::new(serde_json::json!({"ciphertext": ct, "context": context(&grant.context())}).to_string());
        let bytes = self
            .call("rewrap", Some(&body))
            .map_err(|d| self.unavailable(format!("rewrapping shard {}: {d}", grant.shard())))?;
        Ok(Rewrap::Done(self.kek_id.clone(), self.ciphertext("rewrap", &bytes)?))
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn unwrap_dek(&self, grant: Grant) -> Result<Dek> {
        if grant.kek_id() != self.kek_id {
            return Err(self.unavailable(format!(
                "shard {} is wrapped under {}, not this key",
                grant.shard(),
                grant.kek_id()
            )));
        }
        let ct = self.grant_ciphertext(&grant)?;
        let body =
            Zeroizing::new(serde_json::json!({"ciphertext": ct, "context": context(&grant.context())}).to_string());
        let bytes = self.call("decrypt", Some(&body)).map_err(|d| {
            self.unavailable(format!(
                "dataset {:?} shard {}: {d} (a wrapped DEK moved from another shard does not decrypt)",
                grant.dataset(),
                grant.shard()
            ))
        })?;
        self.plaintext_dek("decrypt", grant.shard(), &bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_server_mount_and_key_and_refuse_what_they_must() {
        let u = TransitUri::parse(
            "transit:https://bao.internal:8200/kms/transit/shardlock?token-source=file:/run/t&ca-cert=/ca.pem",
        )
        .unwrap();
        assert_eq!(u.server, "https://bao.internal:8200");
        assert_eq!((u.mount.as_str(), u.key.as_str()), ("kms/transit", "shardlock"));
        assert_eq!(u.kek_id(), "transit:kms/transit/shardlock");
        assert_eq!(u.token_source.as_deref(), Some("file:/run/t"));
        assert!(TransitUri::parse("transit:http://127.0.0.1:8200/transit/k").is_ok());
        for bad in [
            "transit:http://bao.internal:8200/transit/k",
            "transit:https://bao.internal/k",
            "transit:https://bao.internal/transit/",
            "transit:https://bao.internal/transit/k?token=s.abc",
            "transit:ftp://x/transit/k",
            "transit:https://bao.internal/transit/k%20x",
            "transit:http://localhost:pw@evil.example/transit/k",
            "transit:https://user:pw@bao.internal/transit/k",
            "transit:https://bao.internal/transit/k#frag",
        ] {
            let e = TransitUri::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("s.abc") && !e.contains("pw"), "{e}");
        }
    }
}
