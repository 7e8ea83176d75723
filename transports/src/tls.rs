//! TLS configuration for both ends: certificates from PEM files (reloadable
//! on the server, see [`CertStore`]), the client's trust (webpki roots plus an
//! optional CA file, or pins of the server's public key), and the opt-in
//! "no verification" mode for tests.
//!
//! Both ends use TLS 1.3 (1.2 only as a fallback) with the provider's default
//! key exchange groups, whose first is the post-quantum hybrid X25519MLKEM768:
//! every client config is built by [`client_config`], so every dial path,
//! direct or through a proxy, offers it first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

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

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 of a certificate's DER SubjectPublicKeyInfo: what a client's
/// `pin_sha256` pins. It stays the same when a certificate is renewed with
/// the same key.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    Ok(sha256(ee.subject_public_key_info().as_ref()))
}

/// A pin as printed by `sallyport-server --print-pin`: standard base64 of
/// the SHA-256.
pub fn format_pin(pin: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(pin)
}

/// Parses a pin: base64 (as `--print-pin` prints, or `openssl ... | base64`)
/// or 64 hex digits (colons allowed), optionally prefixed `sha256/` or `sha256:`.
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    let s = s
        .strip_prefix("sha256/")
        .or_else(|| s.strip_prefix("sha256:"))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    let bytes = if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| e.to_string())?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| format!("{s:?} is neither 64 hex digits nor base64"))?
    };
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{s:?} is {} bytes, a SHA-256 is 32", bytes.len()))
}

/// The server's certificate and key, swapped whole by [`CertStore::reload`]
/// (SIGHUP) while connections keep the key they started with.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads the certificate chain and key from PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsConfigError> {
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(certified_key(cert, key)?)),
            cert: cert.into(),
            key: key.into(),
        }))
    }

    /// Reads the files again; on any error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsConfigError> {
        let new = Arc::new(certified_key(&self.cert, &self.key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// The certificate chain and key in use.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The pin (SHA-256 of the public key) of the certificate in use.
    pub fn pin(&self) -> Result<[u8; 32], rustls::Error> {
        let ck = self.current();
        spki_sha256(ck.end_entity_cert()?)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsConfigError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsConfigError::Invalid {
        what: "certificate and key",
        path: cert.into(),
        reason: format!("do not form a usable pair: {e}"),
    })
}

/// A server configuration from PEM files, offering `alpn` in order.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    server_config_with(CertStore::load(cert, key)?, alpn)
}

/// A server configuration whose certificate comes from `store` (reloadable),
/// offering `alpn` in order.
pub fn server_config_with(
    store: Arc<CertStore>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(store);
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
    /// SHA-256 pins of the server's public key (SubjectPublicKeyInfo). When
    /// any is given, the server is trusted if and only if its key matches
    /// one; CAs, names and validity dates are not checked.
    pub pins: Vec<[u8; 32]>,
}

/// A client configuration offering `alpn`.
pub fn client_config(
    trust: &ClientTrust,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let mut cfg = if trust.insecure || !trust.pins.is_empty() {
        let pins = (!trust.insecure).then(|| trust.pins.clone());
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(KeyVerifier {
                pins,
                provider: provider(),
            }))
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

/// Trust without CAs: in the server's key when its SHA-256 is one of `pins`,
/// or in any certificate when `pins` is `None` (only reachable through
/// `verify_tls = false`). Either way the handshake signature is verified, so
/// the server proves it holds the key.
#[derive(Debug)]
struct KeyVerifier {
    pins: Option<Vec<[u8; 32]>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// The server's key is not pinned.
struct PinMismatch([u8; 32]);

// rustls shows the cause with `Debug`: make that the readable message.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server public key sha256 {} matches no server.pin_sha256",
            format_pin(&self.0)
        )
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for KeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pins) = &self.pins else {
            return Ok(ServerCertVerified::assertion());
        };
        let got = spki_sha256(end_entity)?;
        if pins.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch(got))),
            )))
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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
                ca_file: Some(ca),
                ..Default::default()
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

    /// A self-signed certificate for `name` with `key`, written to `dir`.
    fn self_signed(dir: &Path, key: &KeyPair, name: &str) -> (PathBuf, PathBuf) {
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(key)
            .expect("sign");
        std::fs::create_dir_all(dir).expect("dir");
        let p = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&p.0, cert.pem()).expect("write");
        std::fs::write(&p.1, key.serialize_pem()).expect("write");
        p
    }

    /// Handshakes a client trusting `trust` with a server using `store`.
    async fn handshake(store: Arc<CertStore>, trust: &ClientTrust) -> Result<(), String> {
        let server = server_config_with(store, &[]).expect("server");
        let client = client_config(trust, &[]).expect("client");
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        // The name is not what the certificate says: pins do not check names.
        let name = ServerName::try_from("vpn.example.com").expect("name");
        let (_s, c) = tokio::join!(acceptor.accept(b), connector.connect(name, a));
        c.map(|_| ()).map_err(|e| e.to_string())
    }

    fn pinned(pins: Vec<[u8; 32]>) -> ClientTrust {
        ClientTrust {
            pins,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_pinned_key_is_trusted_without_a_ca_and_across_renewal_and_reload() {
        let dir = std::env::temp_dir().join(format!("sallyport-pin-{}", std::process::id()));
        let key = KeyPair::generate().expect("key");
        let (cert, keyfile) = self_signed(&dir, &key, "old.example");
        let store = CertStore::load(&cert, &keyfile).expect("store");
        let pin = store.pin().expect("pin");
        let other = [7u8; 32];
        handshake(store.clone(), &pinned(vec![other, pin]))
            .await
            .expect("pinned key, second of two pins");

        // Renewed: a new certificate (other name, new serial) for the same key.
        let before = store.current();
        self_signed(&dir, &key, "new.example");
        store.reload().expect("reload");
        assert!(!Arc::ptr_eq(&before, &store.current()), "swapped");
        assert_eq!(store.pin().expect("pin"), pin, "same key, same pin");
        handshake(store.clone(), &pinned(vec![pin]))
            .await
            .expect("renewed certificate, same key");

        // A bad file on reload keeps the certificate in use.
        std::fs::write(&cert, "garbage").expect("write");
        let e = store.reload().expect_err("bad certificate");
        assert!(e.to_string().contains("cert.pem"), "{e}");
        handshake(store.clone(), &pinned(vec![pin]))
            .await
            .expect("old certificate still served");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_wrong_pin_is_refused_with_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("sallyport-pin-bad-{}", std::process::id()));
        let key = KeyPair::generate().expect("key");
        let (cert, keyfile) = self_signed(&dir, &key, "localhost");
        let store = CertStore::load(&cert, &keyfile).expect("store");
        let e = handshake(store.clone(), &pinned(vec![[1u8; 32]]))
            .await
            .expect_err("not pinned");
        let _ = std::fs::remove_dir_all(&dir);
        let want = format_pin(&store.pin().expect("pin"));
        assert!(
            e.contains("matches no server.pin_sha256") && e.contains(&want),
            "{e}"
        );
        // And the unpinned default (webpki roots) refuses a self-signed one.
        let e = handshake(store, &ClientTrust::default())
            .await
            .expect_err("self-signed");
        assert!(e.contains("invalid peer certificate"), "{e}");
    }

    #[test]
    fn every_trust_mode_offers_the_post_quantum_group_first() {
        for trust in [
            ClientTrust::default(),
            pinned(vec![[0; 32]]),
            ClientTrust {
                insecure: true,
                ..Default::default()
            },
        ] {
            let cfg = client_config(&trust, &[]).expect("client");
            let groups = &cfg.crypto_provider().kx_groups;
            assert_eq!(
                groups.first().map(|g| g.name()),
                Some(rustls::NamedGroup::X25519MLKEM768),
                "{trust:?}"
            );
        }
    }

    #[test]
    fn pins_parse_from_base64_and_hex() {
        let pin: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let b64 = format_pin(&pin);
        let hex: String = pin.iter().map(|b| format!("{b:02x}")).collect();
        let colons: Vec<String> = pin.iter().map(|b| format!("{b:02X}")).collect();
        for s in [
            b64.clone(),
            format!("sha256/{b64}"),
            hex.clone(),
            format!("sha256:{hex}"),
            colons.join(":"),
        ] {
            assert_eq!(parse_pin(&s), Ok(pin), "{s}");
        }
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&hex[..62]).is_err());
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
