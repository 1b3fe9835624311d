//! PEM files for TLS (features `key-service` and `keyd`): certificate chains, and
//! private keys read as secret files (owner-only permissions, like every key file).

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// The system CA bundle, used when neither a CA file nor `SSL_CERT_FILE` is given.
pub(crate) const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

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
