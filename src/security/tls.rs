//! Shared TLS plumbing: the process-wide crypto provider and PEM loading.
//!
//! What must hold: exactly one rustls crypto provider is installed before any TLS object is
//! built (two are compiled in through dependencies, so rustls cannot pick one itself).

use std::path::Path;

use rustls::pki_types::CertificateDer;

/// Installs the aws-lc-rs provider as the process default; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
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
