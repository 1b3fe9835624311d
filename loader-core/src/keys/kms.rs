//! AWS KMS custody ([`KmsProvider`], feature `aws-kms`): the KEK is a KMS key that never
//! leaves KMS; DEKs are made with `GenerateDataKey` (or wrapped with `Encrypt`, when
//! rotating in from other custody) and unwrapped with `Decrypt`, each with
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
//! is the hex of the `CiphertextBlob` (FORMAT.md section 7.6). `pack` asks KMS for each
//! shard's DEK with `GenerateDataKey`. Rotation: enable KMS automatic key rotation (old
//! ciphertexts keep decrypting), or move a dataset to another key with
//! `shardlock rotate --keyring aws-kms:OLD --new-keyring aws-kms:NEW`, which calls
//! `ReEncrypt` for each DEK when both keys are at the same endpoint and region, so no DEK
//! leaves KMS during the move.

use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use base64::Engine as _;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{Dek, Grant, KeyProvider, Rewrap, WrapContext};
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
        let bad = |d: &str| {
            Error::InvalidArgument(format!(
                "aws-kms URI starting {:?}: {d}",
                uri.split(['?', '@']).next().unwrap_or("")
            ))
        };
        let rest = uri.strip_prefix(KEK_ID_PREFIX).ok_or_else(|| bad("does not start with aws-kms:"))?;
        let (key, query) = rest.split_once('?').unwrap_or((rest, ""));
        if key.is_empty() || key.len() > 2048 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("needs a key id, key ARN or alias/<name>"));
        }
        let mut out = Self { key: key.to_owned(), region: None, endpoint: None };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("region", v)) if valid_region(v) => out.region = Some(v.to_owned()),
                Some(("region", _)) => return Err(bad("a region is [a-z0-9-], like eu-west-1")),
                Some(("endpoint", v)) => {
                    let url = reqwest::Url::parse(v).map_err(|_| bad("the endpoint is not a URL"))?;
                    if !matches!(url.path(), "" | "/") {
                        return Err(bad("the endpoint takes no path"));
                    }
                    out.endpoint = Some(crate::tls::checked_server(&url).map_err(bad)?);
                }
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

/// An AWS region name: lowercase letters, digits and dashes (so it cannot change the
/// default endpoint's host).
fn valid_region(r: &str) -> bool {
    !r.is_empty() && r.len() <= 32 && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
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
    ciphertext_blob: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    plaintext: Option<std::borrow::Cow<'a, str>>,
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

/// HMAC-SHA256, into zeroizing memory (the derived signing keys are credentials).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg).as_ref().to_vec())
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
        let region = parsed
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .filter(|r| valid_region(r))
            .ok_or_else(|| {
                fail(ProviderFailure::Unavailable, "no valid region: give region= or set AWS_REGION".into())
            })?;
        let access_key = env("AWS_ACCESS_KEY_ID").ok_or_else(|| {
            fail(ProviderFailure::PinSource, "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into())
        })?;
        let secret_key = Zeroizing::new(
            env("AWS_SECRET_ACCESS_KEY")
                .ok_or_else(|| fail(ProviderFailure::PinSource, "AWS_SECRET_ACCESS_KEY is not set".into()))?,
        );
        let session_token = env("AWS_SESSION_TOKEN").map(Zeroizing::new);
        let suffix = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
        let endpoint = parsed.endpoint.clone().unwrap_or_else(|| format!("https://kms.{region}.{suffix}"));
        // The signed host is exactly what the request is sent to (checked_server
        // normalised it: no user info, no default port, lowercase).
        let host = endpoint.split_once("://").map_or("", |(_, h)| h).to_owned();
        let client = crate::tls::custody_client(&endpoint, None)?;
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
        let mut headers: Vec<(&str, Zeroizing<String>)> = vec![
            ("content-type", Zeroizing::new(ctype.to_owned())),
            ("host", Zeroizing::new(self.host.clone())),
            ("x-amz-date", Zeroizing::new(now.clone())),
            ("x-amz-target", Zeroizing::new(target.clone())),
        ];
        // The header list (and so the session token in it) is zeroized when dropped.
        let session = self.creds.session_token.as_ref().map(|t| Zeroizing::new(t.to_string()));
        if let Some(t) = session {
            headers.push(("x-amz-security-token", t));
        }
        headers.sort_by(|a, b| a.0.cmp(b.0));
        let signed: Vec<&str> = headers.iter().map(|h| h.0).collect();
        let signed = signed.join(";");
        let canonical_headers: Zeroizing<String> =
            Zeroizing::new(headers.iter().map(|(k, v)| format!("{k}:{}\n", v.trim())).collect());
        let canonical = Zeroizing::new(format!(
            "POST\n/\n\n{}\n{signed}\n{}",
            canonical_headers.as_str(),
            hex_sha256(body.as_bytes())
        ));
        let scope = format!("{date}/{}/kms/aws4_request", self.region);
        let to_sign = format!("AWS4-HMAC-SHA256\n{now}\n{scope}\n{}", hex_sha256(canonical.as_bytes()));
        let k_secret = Zeroizing::new(format!("AWS4{}", self.creds.secret_key.as_str()));
        let k_date = hmac_sha256(k_secret.as_bytes(), date.as_bytes());
        let k_region = hmac_sha256(&k_date, self.region.as_bytes());
        let k_service = hmac_sha256(&k_region, b"kms");
        let k_signing = hmac_sha256(&k_service, b"aws4_request");
        let signature = hex::encode(&*hmac_sha256(&k_signing, to_sign.as_bytes()));
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
        // Sized up front: a grown buffer would leave freed copies of a plaintext DEK.
        let mut bytes = Zeroizing::new(Vec::with_capacity(64 << 10));
        std::io::Read::read_to_end(&mut std::io::Read::take(resp, 64 << 10), &mut bytes)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if status != 200 {
            let e = serde_json::from_slice::<KmsError>(&bytes)
                .unwrap_or(KmsError { kind: String::new(), message: String::new() });
            let kind: String = e
                .kind
                .rsplit('#')
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(80)
                .collect();
            let message: String = e.message.chars().map(|c| if c.is_control() { ' ' } else { c }).take(300).collect();
            return Err(format!("KMS {action} answered HTTP {status} {kind}: {message}"));
        }
        Ok(bytes)
    }

    /// The EncryptionContext of one shard's DEK (FORMAT.md section 7.6).
    fn context(&self, ctx: &WrapContext<'_>) -> serde_json::Value {
        serde_json::json!({
            "shardlock:issuer": ctx.issuer,
            "shardlock:dataset": ctx.dataset,
            "shardlock:shard": ctx.shard.to_string(),
            "shardlock:shard-id": ctx.shard_id,
            "shardlock:kek": self.kek_id,
        })
    }

    fn unavailable(&self, detail: String) -> Error {
        Error::KeyUnavailable { key_id: self.kek_id.clone(), detail: format!("aws-kms {}: {detail}", self.kek_id) }
    }

    fn answer<'a>(&self, action: &str, bytes: &'a [u8]) -> Result<KmsAnswer<'a>> {
        serde_json::from_slice(bytes).map_err(|_| self.unavailable(format!("{action} answered no JSON")))
    }

    /// The `CiphertextBlob` of an answer, within [`MAX_CIPHERTEXT`].
    fn blob(&self, action: &str, b64: Option<std::borrow::Cow<'_, str>>) -> Result<Vec<u8>> {
        let blob = b64
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.as_bytes()).ok())
            .ok_or_else(|| self.unavailable(format!("{action} answered no CiphertextBlob")))?;
        if blob.is_empty() || blob.len() > MAX_CIPHERTEXT {
            return Err(self.unavailable(format!("{action} answered a {}-byte ciphertext", blob.len())));
        }
        Ok(blob)
    }

    /// The 32-byte DEK of an answer's `Plaintext`.
    fn plaintext_dek(&self, action: &str, shard: u32, b64: Option<&str>) -> Result<Dek> {
        let b64 = b64.ok_or_else(|| self.unavailable(format!("{action} answered no Plaintext")))?;
        Dek::from_base64(b64)
            .ok_or_else(|| self.unavailable(format!("shard {shard}: the DEK {action} answered is not 32 bytes")))
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

    fn wrap_dek_for(&self, dek: &Dek, ctx: &WrapContext<'_>) -> Result<(String, Vec<u8>)> {
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(dek.expose()));
        let context = self.context(ctx).to_string();
        let key = serde_json::to_string(&self.uri.key).unwrap_or_default();
        // One allocation of the final size: no grown-and-freed copy holds the DEK.
        let mut body = Zeroizing::new(String::with_capacity(b64.len() + context.len() + key.len() + 64));
        body.push_str("{\"KeyId\":");
        body.push_str(&key);
        body.push_str(",\"Plaintext\":\"");
        body.push_str(&b64);
        body.push_str("\",\"EncryptionContext\":");
        body.push_str(&context);
        body.push('}');
        let bytes =
            self.call("Encrypt", &body).map_err(|d| self.unavailable(format!("wrapping shard {}: {d}", ctx.shard)))?;
        let answer = self.answer("Encrypt", &bytes)?;
        Ok((self.kek_id.clone(), self.blob("Encrypt", answer.ciphertext_blob)?))
    }

    /// `GenerateDataKey`: KMS draws the DEK and returns it with its wrap under this key
    /// and the shard's EncryptionContext.
    fn generate_dek_for(&self, ctx: &WrapContext<'_>) -> Result<(Dek, String, Vec<u8>)> {
        let body = Zeroizing::new(
            serde_json::json!({"KeyId": self.uri.key, "KeySpec": "AES_256", "EncryptionContext": self.context(ctx)})
                .to_string(),
        );
        let bytes = self
            .call("GenerateDataKey", &body)
            .map_err(|d| self.unavailable(format!("a data key for shard {}: {d}", ctx.shard)))?;
        let answer = self.answer("GenerateDataKey", &bytes)?;
        let dek = self.plaintext_dek("GenerateDataKey", ctx.shard, answer.plaintext.as_deref())?;
        Ok((dek, self.kek_id.clone(), self.blob("GenerateDataKey", answer.ciphertext_blob)?))
    }

    /// `ReEncrypt` to another KMS key at the same endpoint and region: KMS decrypts under
    /// the source context and encrypts under the target's, and the DEK never leaves KMS.
    fn rewrap_for(&self, grant: Grant, target: &dyn KeyProvider) -> Result<Rewrap> {
        let Some(to) = target.as_any().and_then(|t| t.downcast_ref::<Self>()) else {
            return Ok(Rewrap::Unsupported(grant));
        };
        if (to.endpoint.as_str(), to.region.as_str()) != (self.endpoint.as_str(), self.region.as_str())
            || grant.kek_id() != self.kek_id
        {
            return Ok(Rewrap::Unsupported(grant));
        }
        let body = Zeroizing::new(
            serde_json::json!({
                "CiphertextBlob": base64::engine::general_purpose::STANDARD.encode(grant.wrapped_dek()),
                "SourceKeyId": self.uri.key,
                "SourceEncryptionContext": self.context(&grant.context()),
                "DestinationKeyId": to.uri.key,
                "DestinationEncryptionContext": to.context(&grant.context()),
            })
            .to_string(),
        );
        let bytes = self
            .call("ReEncrypt", &body)
            .map_err(|d| self.unavailable(format!("re-encrypting shard {} for {}: {d}", grant.shard(), to.kek_id)))?;
        let answer = self.answer("ReEncrypt", &bytes)?;
        Ok(Rewrap::Done(to.kek_id.clone(), self.blob("ReEncrypt", answer.ciphertext_blob)?))
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
        let body = Zeroizing::new(
            serde_json::json!({
                "KeyId": self.uri.key,
                "CiphertextBlob": base64::engine::general_purpose::STANDARD.encode(grant.wrapped_dek()),
                "EncryptionContext": self.context(&grant.context()),
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
        let answer = self.answer("Decrypt", &bytes)?;
        self.plaintext_dek("Decrypt", grant.shard(), answer.plaintext.as_deref())
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
        let n = KmsUri::parse("aws-kms:k?endpoint=https://KMS.Example.com:443").unwrap();
        assert_eq!(n.endpoint.as_deref(), Some("https://kms.example.com"), "the signed host is the normalised one");
        assert_eq!(u.kek_id(), "aws-kms:alias/shardlock");
        for bad in [
            "aws-kms:",
            "aws-kms:alias/k?endpoint=http://kms.example.com",
            "aws-kms:alias/k?secret_access_key=abc",
            "aws-kms:alias/k?colour=blue",
            "aws-kms:alias/k?endpoint=http://127.0.0.1:80@evil.example",
            "aws-kms:alias/k?region=x@evil.example%23",
            "aws-kms:alias/k?endpoint=https://kms.example.com/prefix",
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
        let k_region = hmac_sha256(&k_date, b"us-east-1");
        let k_service = hmac_sha256(&k_region, b"iam");
        let k_signing = hmac_sha256(&k_service, b"aws4_request");
        assert_eq!(hex::encode(&*k_signing), "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
        assert_eq!(amz_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_329_264_000)), "20120215T000000Z");
    }
}
