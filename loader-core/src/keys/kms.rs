//! AWS KMS custody ([`KmsProvider`], feature `aws-kms`): the KEK is a KMS key that never
//! leaves KMS; DEKs are wrapped with `Encrypt` and unwrapped with `Decrypt`, each with
//! an `EncryptionContext` naming the dataset, shard and KEK id, so a wrapped DEK moved to
//! another shard's entry does not decrypt, and every use is in CloudTrail with that
//! context.
//!
//! ```text
//! aws-kms:arn:aws:kms:eu-west-1:111122223333:key/1234abcd-...?region=eu-west-1
//! aws-kms:alias/shardlock?region=us-east-1&endpoint=http://127.0.0.1:5000   (a local KMS, e.g. moto)
//! ```
//!
//! Credentials come only from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never from the URI; the region from
//! `region=`, else `AWS_REGION` / `AWS_DEFAULT_REGION`. Requests are signed with AWS
//! Signature Version 4. Plain `http://` endpoints are accepted only on loopback.
//!
//! The KEK id in the manifest is `aws-kms:<key>` as the URI names it, and `wrapped_dek`
//! is the hex of the `CiphertextBlob` (FORMAT.md section 7.6). Rotation: enable KMS
//! automatic key rotation (old ciphertexts keep decrypting), or move a dataset to
//! another key with `shardlock rotate --keyring aws-kms:OLD --new-keyring aws-kms:NEW`.

use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use base64::Engine as _;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{Dek, Grant, KeyProvider};
use crate::error::{Error, ProviderFailure, Result};

/// Prefix of KMS KEK ids in manifests.
pub const KEK_ID_PREFIX: &str = "aws-kms:";

/// Longest `CiphertextBlob` accepted (the hex in the manifest is twice this).
pub const MAX_CIPHERTEXT: usize = 512;

/// A parsed `aws-kms:` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsUri {
    /// Key id, key ARN, alias name (`alias/...`) or alias ARN.
    pub key: String,
    /// Region (`region=`), if given.
    pub region: Option<String>,
    /// Endpoint (`endpoint=`), if given (default `https://kms.<region>.amazonaws.com`).
    pub endpoint: Option<String>,
}

impl KmsUri {
    /// Parses `aws-kms:<key>[?region=R&endpoint=URL]`.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad =
            |d: &str| Error::InvalidArgument(format!("aws-kms URI {:?}: {d}", uri.split('?').next().unwrap_or("")));
        let rest = uri.strip_prefix(KEK_ID_PREFIX).ok_or_else(|| bad("does not start with aws-kms:"))?;
        let (key, query) = rest.split_once('?').unwrap_or((rest, ""));
        if key.is_empty() || key.len() > 2048 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("needs a key id, key ARN or alias/<name>"));
        }
        let mut out = Self { key: key.to_owned(), region: None, endpoint: None };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("region", v)) if !v.is_empty() => out.region = Some(v.to_owned()),
                Some(("endpoint", v)) if v.starts_with("https://") || loopback_http(v) => {
                    out.endpoint = Some(v.trim_end_matches('/').to_owned())
                }
                Some(("endpoint", _)) => return Err(bad("the endpoint must be https:// (http:// only on loopback)")),
                Some((k, _)) if k.contains("secret") || k.contains("access") || k.contains("token") => {
                    return Err(bad(
                        "credentials do not go in the URI; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                    ))
                }
                _ => return Err(bad("the query may have region=R and endpoint=URL")),
            }
        }
        Ok(out)
    }

    /// The KEK id this key has in manifests.
    pub fn kek_id(&self) -> String {
        format!("{KEK_ID_PREFIX}{}", self.key)
    }
}

fn loopback_http(url: &str) -> bool {
    ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|p| url.strip_prefix(p).is_some_and(|r| r.is_empty() || r.starts_with(':') || r.starts_with('/')))
}

/// Credentials from the environment (secrets: never printed).
struct Credentials {
    access_key: String,
    secret_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
}

/// Wraps and unwraps DEKs with a KMS key (see the module docs).
pub struct KmsProvider {
    uri: KmsUri,
    kek_id: String,
    region: String,
    endpoint: String,
    host: String,
    creds: Credentials,
    client: reqwest::blocking::Client,
}

impl std::fmt::Debug for KmsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsProvider")
            .field("kek_id", &self.kek_id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KmsAnswer<'a> {
    #[serde(borrow, default)]
    ciphertext_blob: Option<&'a str>,
    #[serde(borrow, default)]
    plaintext: Option<&'a str>,
}

#[derive(Deserialize)]
struct KmsError {
    #[serde(rename = "__type", default)]
    kind: String,
    #[serde(default, alias = "Message")]
    message: String,
}

fn hex_sha256(data: &[u8]) -> String {
    hex::encode(crate::crypto::sha256(data))
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg)
}

/// `YYYYMMDD'T'HHMMSS'Z'` of `t` (UTC).
fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let text = humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    // 2026-12-01T16:45:00Z -> 20261201T164500Z
    text.chars().filter(|c| c.is_ascii_digit() || *c == 'T' || *c == 'Z').collect()
}

impl KmsProvider {
    /// Opens the provider `uri` names, with credentials from the environment.
    pub fn open_uri(uri: &str) -> Result<Self> {
        let parsed = KmsUri::parse(uri)?;
        let kek_id = parsed.kek_id();
        let fail = |kind, detail: String| Error::KeyProvider { provider: format!("aws-kms {kek_id}"), kind, detail };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region =
            parsed.region.clone().or_else(|| env("AWS_REGION")).or_else(|| env("AWS_DEFAULT_REGION")).ok_or_else(
                || fail(ProviderFailure::Unavailable, "no region: give region= or set AWS_REGION".into()),
            )?;
        let access_key = env("AWS_ACCESS_KEY_ID").ok_or_else(|| {
            fail(ProviderFailure::PinSource, "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into())
        })?;
        let secret_key = Zeroizing::new(
            env("AWS_SECRET_ACCESS_KEY")
                .ok_or_else(|| fail(ProviderFailure::PinSource, "AWS_SECRET_ACCESS_KEY is not set".into()))?,
        );
        let session_token = env("AWS_SESSION_TOKEN").map(Zeroizing::new);
        let endpoint = parsed.endpoint.clone().unwrap_or_else(|| format!("https://kms.{region}.amazonaws.com"));
        let host = endpoint.split_once("://").map_or("", |(_, h)| h).split('/').next().unwrap_or("").to_owned();
        let mut builder = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10));
        if endpoint.starts_with("https://") {
            builder = builder.tls_backend_preconfigured(crate::tls::client_config(None, None)?);
        }
        let client = builder.build().map_err(|e| fail(ProviderFailure::Unavailable, format!("HTTPS client: {e}")))?;
        Ok(Self {
            kek_id,
            uri: parsed,
            region,
            endpoint,
            host,
            creds: Credentials { access_key, secret_key, session_token },
            client,
        })
    }

    /// One signed KMS call (`TrentService.<action>`), returning the answer body.
    fn call(&self, action: &str, body: &Zeroizing<String>) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
        let now = amz_date(SystemTime::now());
        let date = &now[..8];
        let target = format!("TrentService.{action}");
        let ctype = "application/x-amz-json-1.1";
        let mut headers: Vec<(&str, String)> = vec![
            ("content-type", ctype.to_owned()),
            ("host", self.host.clone()),
            ("x-amz-date", now.clone()),
            ("x-amz-target", target.clone()),
        ];
        if let Some(t) = &self.creds.session_token {
            headers.push(("x-amz-security-token", t.to_string()));
        }
        headers.sort_by(|a, b| a.0.cmp(b.0));
        let signed: Vec<&str> = headers.iter().map(|h| h.0).collect();
        let signed = signed.join(";");
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{}\n", v.trim())).collect();
        let canonical = format!("POST\n/\n\n{canonical_headers}\n{signed}\n{}", hex_sha256(body.as_bytes()));
        let scope = format!("{date}/{}/kms/aws4_request", self.region);
        let to_sign = format!("AWS4-HMAC-SHA256\n{now}\n{scope}\n{}", hex_sha256(canonical.as_bytes()));
        let k_secret = Zeroizing::new(format!("AWS4{}", self.creds.secret_key.as_str()));
        let k_date = hmac_sha256(k_secret.as_bytes(), date.as_bytes());
        let k_region = hmac_sha256(k_date.as_ref(), self.region.as_bytes());
        let k_service = hmac_sha256(k_region.as_ref(), b"kms");
        let k_signing = hmac_sha256(k_service.as_ref(), b"aws4_request");
        let signature = hex::encode(hmac_sha256(k_signing.as_ref(), to_sign.as_bytes()).as_ref());
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
            self.creds.access_key
        );
        let mut req = self.client.post(format!("{}/", self.endpoint)).body(body.as_bytes().to_vec());
        for (k, v) in &headers {
            if *k != "host" {
                let mut hv =
                    reqwest::header::HeaderValue::from_str(v).map_err(|_| format!("header {k} is not text"))?;
                hv.set_sensitive(*k == "x-amz-security-token");
                req = req.header(*k, hv);
            }
        }
        let mut hv = reqwest::header::HeaderValue::from_str(&auth).map_err(|_| "authorization header".to_owned())?;
        hv.set_sensitive(true);
        let resp = req
            .header(reqwest::header::AUTHORIZATION, hv)
            .send()
            .map_err(|e| format!("{} unreachable ({e}); check the endpoint and region", self.endpoint))?;
        let status = resp.status().as_u16();
        let mut bytes = Zeroizing::new(Vec::new());
        std::io::Read::read_to_end(&mut std::io::Read::take(resp, 1 << 20), &mut bytes)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if status != 200 {
            let e = serde_json::from_slice::<KmsError>(&bytes)
                .unwrap_or(KmsError { kind: String::new(), message: String::new() });
            let kind = e.kind.rsplit('#').next().unwrap_or("").to_owned();
            return Err(format!(
                "KMS {action} answered HTTP {status} {kind}: {}",
                e.message.chars().take(300).collect::<String>()
            ));
        }
        Ok(bytes)
    }

    fn context(&self, dataset: &str, shard: u32) -> serde_json::Value {
        serde_json::json!({
            "shardlock:dataset": dataset,
            "shardlock:shard": shard.to_string(),
            "shardlock:kek": self.kek_id,
        })
    }

    fn unavailable(&self, detail: String) -> Error {
        Error::KeyUnavailable { key_id: self.kek_id.clone(), detail: format!("aws-kms {}: {detail}", self.kek_id) }
    }
}

impl KeyProvider for KmsProvider {
    fn describe(&self) -> String {
        format!("aws-kms {} in {}", self.uri.key, self.region)
    }

    fn active_kek_id(&self) -> &str {
        &self.kek_id
    }

    fn wrap_dek(&self, _dek: &Dek) -> Result<(String, Vec<u8>)> {
        Err(Error::Internal("KMS wraps a DEK only with its dataset and shard (wrap_dek_for)".into()))
    }

    fn wrap_dek_for(&self, dek: &Dek, dataset: &str, shard: u32) -> Result<(String, Vec<u8>)> {
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(dek.expose()));
        let ctx = self.context(dataset, shard).to_string();
        let body = Zeroizing::new(format!(
            "{{\"KeyId\":{},\"Plaintext\":\"{}\",\"EncryptionContext\":{ctx}}}",
            serde_json::to_string(&self.uri.key).unwrap_or_default(),
            b64.as_str()
        ));
        let bytes =
            self.call("Encrypt", &body).map_err(|d| self.unavailable(format!("wrapping shard {shard}: {d}")))?;
        let answer: KmsAnswer<'_> =
            serde_json::from_slice(&bytes).map_err(|_| self.unavailable("Encrypt answered no JSON".into()))?;
        let blob = answer
            .ciphertext_blob
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or_else(|| self.unavailable("Encrypt answered no CiphertextBlob".into()))?;
        if blob.is_empty() || blob.len() > MAX_CIPHERTEXT {
            return Err(self.unavailable(format!("Encrypt answered a {}-byte ciphertext", blob.len())));
        }
        Ok((self.kek_id.clone(), blob))
    }

    fn unwrap_dek(&self, grant: Grant) -> Result<Dek> {
        if grant.kek_id() != self.kek_id {
            return Err(self.unavailable(format!(
                "shard {} is wrapped under {}, not this key",
                grant.shard(),
                grant.kek_id()
            )));
        }
        let body = Zeroizing::new(
            serde_json::json!({
                "KeyId": self.uri.key,
                "CiphertextBlob": base64::engine::general_purpose::STANDARD.encode(grant.wrapped_dek()),
                "EncryptionContext": self.context(grant.dataset(), grant.shard()),
            })
            .to_string(),
        );
        let bytes = self.call("Decrypt", &body).map_err(|d| {
            self.unavailable(format!(
                "dataset {:?} shard {}: {d} (a wrapped DEK moved from another shard does not decrypt)",
                grant.dataset(),
                grant.shard()
            ))
        })?;
        let answer: KmsAnswer<'_> =
            serde_json::from_slice(&bytes).map_err(|_| self.unavailable("Decrypt answered no JSON".into()))?;
        let raw = Zeroizing::new(
            answer
                .plaintext
                .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
                .ok_or_else(|| self.unavailable("Decrypt answered no Plaintext".into()))?,
        );
        Dek::from_slice(&raw)
            .ok_or_else(|| self.unavailable(format!("shard {}: the DEK is not 32 bytes", grant.shard())))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_their_refusals() {
        let u = KmsUri::parse("aws-kms:alias/shardlock?region=eu-west-1&endpoint=http://127.0.0.1:5000/").unwrap();
        assert_eq!(u.key, "alias/shardlock");
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(u.kek_id(), "aws-kms:alias/shardlock");
        for bad in [
            "aws-kms:",
            "aws-kms:alias/k?endpoint=http://kms.example.com",
            "aws-kms:alias/k?secret_access_key=abc",
            "aws-kms:alias/k?colour=blue",
        ] {
            let e = KmsUri::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("abc"), "{e}");
        }
    }

    /// AWS's published SigV4 example key derivation ("Examples of how to derive a
    /// signing key for Signature Version 4"): kSigning for 20120215/us-east-1/iam.
    #[test]
    fn the_signing_key_derivation_matches_aws_example() {
        let k_date = hmac_sha256(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20120215");
        let k_region = hmac_sha256(k_date.as_ref(), b"us-east-1");
        let k_service = hmac_sha256(k_region.as_ref(), b"iam");
        let k_signing = hmac_sha256(k_service.as_ref(), b"aws4_request");
        assert_eq!(hex::encode(k_signing.as_ref()), "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
        assert_eq!(amz_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_329_264_000)), "20120215T000000Z");
    }
}
