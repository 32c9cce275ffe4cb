//! Reading TLS material at config load: certificate chains, private keys, CA bundles. Every
//! problem is returned as text for the caller to pin on the field that named the file.

use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// A server certificate ready for SNI selection.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub key: Arc<CertifiedKey>,
    /// Lower-cased DNS names from the leaf's subjectAltName; wildcards as `*.example.com`.
    pub names: Vec<String>,
    /// Seconds since the epoch after which the leaf is expired.
    pub not_after: i64,
    /// With OCSP stapling: the certificate with its current status, once there is one.
    pub stapled: Option<Arc<arc_swap::ArcSwapOption<CertifiedKey>>>,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    let certs =
        certs.map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: contains no PEM certificate", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(format!(
            "{}: contains no PEM private key (PKCS#1, PKCS#8 or SEC1)",
            path.display()
        )),
        Err(e) => Err(format!("{}: unreadable private key: {e}", path.display())),
    }
}

/// DNS names and expiry of a leaf certificate.
pub fn leaf_names(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Load a certificate chain and its key, checking that they belong together and that the
/// certificate names at least one DNS host.
pub fn load_server_cert(cert: &Path, key: &Path) -> Result<ServerCert, (bool, String)> {
    // (true, _) blames the key file, (false, _) the certificate file.
    let chain = load_chain(cert).map_err(|e| (false, e))?;
    let (names, not_after) =
        leaf_names(&chain[0]).map_err(|e| (false, format!("{}: {e}", cert.display())))?;
    if names.is_empty() {
        return Err((
            false,
            format!("{}: the certificate covers no DNS name (no subjectAltName DNS entries), so no SNI can select it", cert.display()),
        ));
    }
    let der = load_key(key).map_err(|e| (true, e))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| {
        (
            true,
            format!("{}: unsupported private key: {e}", key.display()),
        )
    })?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|_| {
        (
            true,
            format!(
                "{}: the private key does not match the certificate {}",
                key.display(),
                cert.display()
            ),
        )
    })?;
    Ok(ServerCert {
        key: Arc::new(ck),
        names,
        not_after,
        stapled: None,
    })
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let certs = load_chain(path)?;
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{}: no usable CA certificate", path.display()));
    }
    Ok(store)
}
