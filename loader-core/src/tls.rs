//! PEM files for TLS (features `key-service` and `keyd`): certificate chains, and
//! private keys read as secret files (owner-only permissions, like every key file).

use std::path::Path;
#[cfg(feature = "key-service")]
use std::path::PathBuf;
#[cfg(feature = "key-service")]
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// The system CA bundle, used when neither a CA file nor `SSL_CERT_FILE` is given.
#[cfg(feature = "key-service")]
pub(crate) const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// An error and its sources as one line, each text once (HTTP client errors nest the
/// same words several levels deep).
#[cfg(feature = "key-service")]
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// The certificates of a PEM file (at least one).
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad =
        |detail: &str| Error::Format { what: "PEM certificate file", path: path.to_owned(), detail: detail.into() };
    let bytes = std::fs::read(path).map_err(Error::io("read certificate", path))?;
    let certs: std::result::Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|_| bad("not PEM certificates"))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The private key of a PEM file that only its owner can read.
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let text = crate::fs::read_secret_file(path)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|_| Error::Format {
        what: "PEM private key file",
        path: path.to_owned(),
        detail: "no PRIVATE KEY block (PKCS#8, PKCS#1 or SEC1)".into(),
    })
}

/// A rustls client configuration: TLS 1.3 only, ALPN h2 and http/1.1, roots from `ca`
/// (else `SSL_CERT_FILE`, else the system bundle), and an optional client certificate
/// (chain file, key file).
#[cfg(feature = "key-service")]
pub(crate) fn client_config(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let ca = ca
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(&ca)? {
        roots.add(c).map_err(|e| Error::Format {
            what: "CA certificate",
            path: ca.clone(),
            detail: format!("not a usable trust anchor ({e})"),
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::InvalidArgument(format!("TLS set-up: {e}")))?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((c, k)) => builder.with_client_auth_cert(read_certs(c)?, read_private_key(k)?).map_err(|e| {
            Error::InvalidArgument(format!("client certificate {} and key {}: {e}", c.display(), k.display()))
        })?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// `scheme://host[:port]` of a custody server URL: https, or http on loopback only; no
/// user info, query or fragment (the host that is checked is the host that is called).
#[cfg(feature = "key-service")]
pub(crate) fn checked_server(url: &reqwest::Url) -> std::result::Result<String, &'static str> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err("user info (user:password@) is refused: credentials do not go in the URI");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the server URL takes no query or fragment here");
    }
    let host = url.host_str().ok_or("the server URL needs a host")?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(url) => {}
        "http" => return Err("plain http is accepted only for a loopback dev server; use https://"),
        _ => return Err("the server URL must be https://"),
    }
    Ok(match url.port() {
        Some(p) => format!("{}://{host}:{p}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

/// True when `url`'s host is this machine: `localhost`, 127.0.0.0/8 or `[::1]` (the
/// host as parsed, so `127.0.0.1.evil.example` is not).
#[cfg(feature = "key-service")]
pub(crate) fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An HTTP client for custody: no redirects (a redirect could carry a token or a DEK
/// elsewhere), no proxy for loopback, https only unless loopback.
#[cfg(any(feature = "transit", feature = "aws-kms"))]
pub(crate) fn custody_client(server: &str, ca: Option<&std::path::Path>) -> Result<reqwest::blocking::Client> {
    let mut b = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .connect_timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none());
    if server.starts_with("https://") {
        b = b.https_only(true).tls_backend_preconfigured(crate::tls::client_config(ca, None)?);
    } else {
        b = b.no_proxy();
    }
    b.build().map_err(|e| Error::InvalidArgument(format!("custody HTTP client: {e}")))
}
