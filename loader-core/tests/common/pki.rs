//! A throw-away PKI for the key service tests (rcgen): include with
//! `#[path = "common/pki.rs"] mod pki;`.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A key service on a free port of 127.0.0.1 in front of `keys`, trusting `trust`
/// (with `edit` applied to its configuration), and a client for it that trusts the
/// test CA: a workload that holds no KEK, only the service's URL and CA.
pub fn serve(
    pki: &Pki,
    keys: Arc<dyn shardlock::KeyProvider>,
    trust: shardlock::TrustAnchor,
    edit: impl FnOnce(&mut shardlock::KeydConfig),
) -> (shardlock::KeyService, Arc<shardlock::service::KeyServiceProvider>) {
    let (cert, key) = pki.server();
    let mut cfg = shardlock::KeydConfig::new("127.0.0.1:0".parse().unwrap(), keys, vec![trust], cert, key);
    edit(&mut cfg);
    let svc = shardlock::KeyService::start(cfg).unwrap();
    let mut opts = shardlock::service::ServiceOptions::default();
    opts.tls.ca_cert = Some(pki.ca());
    let client = shardlock::service::KeyServiceProvider::open(&format!("https://{}", svc.local_addr()), opts).unwrap();
    (svc, Arc::new(client))
}

/// A test PKI: a CA, a server certificate for 127.0.0.1/localhost, client certificates.
pub struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "shardlock test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self { dir: dir.to_owned(), ca }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Writes `<name>.pem` and `<name>.key` (0600) for a certificate with subject CN
    /// `cn`, names `sans`, signed by the CA; `expired` puts its validity in the past.
    pub fn issue(&self, name: &str, cn: &str, sans: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        shardlock::write_new_file(&k, key.serialize_pem().as_bytes(), 0o600).unwrap();
        (c, k)
    }

    /// A raw HTTPS client (TLS 1.3 and 1.2 offered) that trusts this CA, with the client
    /// certificate `client` (cert, key) if given: for requests that skip the loader's own
    /// checks.
    pub fn raw_client(&self, client: Option<(PathBuf, PathBuf)>) -> reqwest::blocking::Client {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(self.ca()).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match client {
            Some((c, k)) => b
                .with_client_auth_cert(
                    rustls::pki_types::CertificateDer::pem_file_iter(c).unwrap().map(|c| c.unwrap()).collect(),
                    rustls::pki_types::PrivateKeyDer::from_pem_file(k).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        reqwest::blocking::Client::builder().tls_backend_preconfigured(cfg).build().unwrap()
    }

    pub fn server(&self) -> (PathBuf, PathBuf) {
        let c = self.dir.join("server.pem");
        if c.exists() {
            return (c, self.dir.join("server.key"));
        }
        self.issue("server", "keyd", &["127.0.0.1", "localhost"], false)
    }
}
