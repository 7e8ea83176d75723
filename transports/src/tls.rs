//! TLS configuration for both ends: certificates from PEM files, the client's
//! trust roots (webpki roots plus an optional CA file), and the opt-in
//! "no verification" mode for tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Why a TLS configuration could not be built. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A file could not be read.
    #[error("read {what} {path}: {source}")]
    Read {
        /// "certificate", "private key" or "CA file".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{what} {path}: {reason}")]
    Invalid {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (e.g. key does not match certificate).
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider both ends use.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads all certificates from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let what = "certificate";
    let data = std::fs::read(path).map_err(|source| TlsConfigError::Read {
        what,
        path: path.into(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsConfigError::Invalid {
            what,
            path: path.into(),
            reason: format!("malformed PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Invalid {
            what,
            path: path.into(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let what = "private key";
    let data = std::fs::read(path).map_err(|source| TlsConfigError::Read {
        what,
        path: path.into(),
        source,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsConfigError::Invalid {
            what,
            path: path.into(),
            reason: format!("malformed PEM: {e}"),
        })?
        .ok_or_else(|| TlsConfigError::Invalid {
            what,
            path: path.into(),
            reason: "no PRIVATE KEY block found".into(),
        })
}

/// A server configuration from PEM files, offering `alpn` in order.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsConfigError::Invalid {
            what: "certificate and key",
            path: cert.into(),
            reason: format!("do not form a usable pair: {e}"),
        })?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// How the client decides whether to trust the server.
#[derive(Debug, Clone, Default)]
pub struct ClientTrust {
    /// Skip verification entirely (testing only; logged as a warning).
    pub insecure: bool,
    /// Trust this CA (PEM) in addition to the webpki roots.
    pub ca_file: Option<PathBuf>,
}

/// A client configuration offering `alpn`.
pub fn client_config(
    trust: &ClientTrust,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let mut cfg = if trust.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &trust.ca_file {
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| TlsConfigError::Invalid {
                    what: "CA file",
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Accepts any certificate. Only reachable through `verify_tls = false`.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
