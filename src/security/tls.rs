//! Shared TLS plumbing: the process-wide crypto provider and PEM loading.
//!
//! What must hold: exactly one rustls crypto provider, ring's (walhook's one crypto backend:
//! signatures, sealed secrets and tokens use it too), is installed before any TLS object is
//! built. (pgwire-replication's TLS dependencies compile aws-lc-rs in as well, so rustls cannot
//! pick one itself.)

use std::path::Path;

use rustls::pki_types::CertificateDer;

/// Installs ring's provider as the process default; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads every certificate in a PEM file.
pub fn read_pem_certs(path: &Path) -> std::io::Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice()).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}
