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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    fn write_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        std::fs::create_dir_all(dir).expect("dir");
        let p = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        std::fs::write(&p.0, ca_cert.pem()).expect("write");
        std::fs::write(&p.1, cert.pem()).expect("write");
        std::fs::write(&p.2, key.serialize_pem()).expect("write");
        p
    }

    #[tokio::test]
    async fn tls13_with_the_post_quantum_hybrid_group_is_negotiated() {
        let dir = std::env::temp_dir().join(format!("sallyport-tls-{}", std::process::id()));
        let (ca, cert, key) = write_certs(&dir);
        let server = server_config(&cert, &key, &[b"h2"]).expect("server");
        let client = client_config(
            &ClientTrust {
                insecure: false,
                ca_file: Some(ca),
            },
            &[b"h2"],
        )
        .expect("client");
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("localhost").expect("name");
        let (s, c) = tokio::join!(acceptor.accept(b), connector.connect(name, a));
        let (s, c) = (s.expect("server handshake"), c.expect("client handshake"));
        let _ = std::fs::remove_dir_all(&dir);
        for conn in [
            c.get_ref().1.negotiated_key_exchange_group(),
            s.get_ref().1.negotiated_key_exchange_group(),
        ] {
            assert_eq!(
                conn.map(|g| g.name()),
                Some(rustls::NamedGroup::X25519MLKEM768)
            );
        }
        assert_eq!(
            c.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
    }

    #[test]
    fn unreadable_and_empty_files_name_the_file() {
        let e = load_certs(Path::new("/nonexistent/cert.pem")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("sallyport-tls-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem").expect("write");
        let e = load_certs(&empty).expect_err("no certs").to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        let e = load_key(&empty).expect_err("no key").to_string();
        assert!(e.contains("no PRIVATE KEY"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
