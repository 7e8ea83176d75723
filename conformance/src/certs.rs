//! Throwaway certificates: a CA and a server certificate it signed, as PEM
//! files, for tests and the demo; optionally client certificates from the
//! same CA (for the benchmark's OpenVPN baseline).

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

/// A client certificate and its key, signed by the same CA as the server's.
#[derive(Debug, Clone)]
pub struct ClientCertFiles {
    /// The client's certificate.
    pub cert: PathBuf,
    /// The client's private key.
    pub key: PathBuf,
}

/// Writes `ca.crt`, `server.crt` and `server.key` into `dir`; the server
/// certificate is valid for `names` (DNS names or IP addresses).
pub fn generate(dir: &Path, names: &[&str]) -> anyhow::Result<CertFiles> {
    generate_with_clients(dir, names, 0).map(|(files, _)| files)
}

/// As [`generate`], and also `client{i}.crt`/`client{i}.key` for `clients`
/// clients (common name `client{i}`).
pub fn generate_with_clients(
    dir: &Path,
    names: &[&str],
    clients: usize,
) -> anyhow::Result<(CertFiles, Vec<ClientCertFiles>)> {
    let ca_key = KeyPair::generate().context("generate CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sallyport throwaway CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).context("self-sign CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let files = CertFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, ca_cert.pem()).context("write ca.crt")?;
    let cn = names.first().copied().unwrap_or("sallyport");
    leaf(&issuer, names, cn, &files.cert, &files.key)?;
    let mut client_files = Vec::new();
    for i in 0..clients {
        let cn = format!("client{i}");
        let c = ClientCertFiles {
            cert: dir.join(format!("{cn}.crt")),
            key: dir.join(format!("{cn}.key")),
        };
        leaf(&issuer, &[], &cn, &c.cert, &c.key)?;
        client_files.push(c);
    }
    Ok((files, client_files))
}

/// Signs a certificate for `names` with common name `cn`; writes it and its key.
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: &[&str],
    cn: &str,
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<()> {
    let key = KeyPair::generate().with_context(|| format!("generate key for {cn}"))?;
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .with_context(|| format!("params for {cn}"))?;
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("sign cert for {cn}"))?;
    std::fs::write(cert_path, cert.pem())
        .with_context(|| format!("write {}", cert_path.display()))?;
    std::fs::write(key_path, key.serialize_pem())
        .with_context(|| format!("write {}", key_path.display()))?;
    Ok(())
}
