//! Throwaway certificates: a CA and a server certificate it signed, as PEM
//! files, for tests and the demo.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// Paths of generated PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The CA certificate (what clients put in `ca_file`).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

/// Writes `ca.crt`, `server.crt` and `server.key` into `dir`; the server
/// certificate is valid for `names` (DNS names or IP addresses).
pub fn generate(dir: &Path, names: &[&str]) -> anyhow::Result<CertFiles> {
    let ca_key = KeyPair::generate().context("generate CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sallyport throwaway CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).context("self-sign CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().context("generate server key")?;
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .context("server params")?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("sallyport"),
    );
    let cert = params
        .signed_by(&key, &issuer)
        .context("sign server cert")?;

    let files = CertFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, ca_cert.pem()).context("write ca.crt")?;
    std::fs::write(&files.cert, cert.pem()).context("write server.crt")?;
    std::fs::write(&files.key, key.serialize_pem()).context("write server.key")?;
    Ok(files)
}
