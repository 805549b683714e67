//! A throwaway certificate authority and a server certificate for `localhost`/127.0.0.1.
//!
//! What must hold: the CA's PEM is all a client needs to trust the server (it goes into
//! `dispatch.ca_certs`); nothing here is meant for production.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA plus one server certificate it signed.
pub struct LocalCa {
    /// PEM of the CA certificate.
    pub ca_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalCa")
    }
}

impl LocalCa {
    /// A new CA and a certificate for `localhost`, 127.0.0.1 and ::1.
    pub fn generate() -> Result<LocalCa, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "walhook local CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        params.subject_alt_names.push(SanType::IpAddress("::1".parse().expect("ip")));
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok(LocalCa { ca_pem: ca.pem(), cert: cert.der().clone(), key: key.serialize_der() })
    }

    /// Writes the CA's PEM into `dir` and returns the file's path.
    pub fn write_ca_pem(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("walhook-local-ca.pem");
        std::fs::write(&path, &self.ca_pem)?;
        Ok(path)
    }

    /// A rustls server configuration presenting the server certificate (h2 and http/1.1).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        crate::security::tls::install_crypto_provider();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let mut cfg =
            rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![self.cert.clone()], key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}
