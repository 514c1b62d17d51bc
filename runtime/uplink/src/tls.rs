//! The rustls client configuration of an uplink.

use std::{
    fs::File,
    io::BufReader,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::UplinkError;

/// Where the trust anchors and the client identity come from.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// CA certificates (PEM); `None`: the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to verify and send as SNI instead of the url's host.
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

/// Where Debian (and most distributions) keep the system's roots.
const SYSTEM_ROOTS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

fn tls_error(path: &Path, message: impl Into<String>) -> UplinkError {
    UplinkError::Tls {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn open(path: &Path) -> Result<BufReader<File>, UplinkError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| tls_error(path, format!("cannot open: {e}")))
}

pub fn client_config(settings: &TlsSettings) -> Result<rustls::ClientConfig, UplinkError> {
    let mut roots = rustls::RootCertStore::empty();
    let ca_path = match &settings.ca {
        Some(path) => path.clone(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .or_else(|| SYSTEM_ROOTS.iter().map(PathBuf::from).find(|p| p.exists()))
            .ok_or_else(|| {
                tls_error(
                    Path::new(SYSTEM_ROOTS[0]),
                    "no system CA roots found; install ca-certificates or set tls.ca",
                )
            })?,
    };
    for cert in rustls_pemfile::certs(&mut open(&ca_path)?) {
        let cert = cert.map_err(|e| tls_error(&ca_path, format!("not a PEM file: {e}")))?;
        // The system bundle may hold certificates rustls cannot use; a given CA must parse.
        if let Err(e) = roots.add(cert)
            && settings.ca.is_some()
        {
            return Err(tls_error(&ca_path, format!("bad CA certificate: {e}")));
        }
    }
    if roots.is_empty() {
        return Err(tls_error(&ca_path, "contains no CA certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&ca_path, e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&settings.cert, &settings.key) {
        (Some(cert_path), Some(key_path)) => {
            let certs: Vec<_> = rustls_pemfile::certs(&mut open(cert_path)?)
                .collect::<Result<_, _>>()
                .map_err(|e| tls_error(cert_path, format!("not a PEM certificate file: {e}")))?;
            if certs.is_empty() {
                return Err(tls_error(cert_path, "contains no PEM certificate"));
            }
            let key = rustls_pemfile::private_key(&mut open(key_path)?)
                .map_err(|e| tls_error(key_path, format!("not a PEM key file: {e}")))?
                .ok_or_else(|| {
                    tls_error(
                        key_path,
                        "contains no private key (PKCS#8, PKCS#1 or SEC1 PEM)",
                    )
                })?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                tls_error(key_path, format!("certificate and key do not match: {e}"))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = settings
        .alpn
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(config)
}
