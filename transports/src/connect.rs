//! The bottom of every client transport: TCP, optionally through an HTTP
//! CONNECT proxy, then optionally TLS with one ALPN protocol.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use ipnet::IpNet;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::TransportError;

/// A byte stream of any kind (TCP, TLS over TCP, ...), erased once here.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// An erased byte stream.
pub type BoxIo = Box<dyn Io>;

/// An HTTP CONNECT proxy.
#[derive(Clone)]
pub struct Proxy {
    host: String,
    port: u16,
    auth: Option<String>,
    /// `http://user@host:port`, for logs (never the password).
    shown: String,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port]` (port 80 when absent, as curl
    /// does; `host:port` without a scheme is accepted).
    pub fn parse(s: &str) -> Result<Self, TransportError> {
        let with_scheme = if s.contains("://") {
            s.to_string()
        } else {
            format!("http://{s}")
        };
        let invalid = |reason: &str| TransportError::InvalidUrl {
            url: redact(s),
            reason: reason.into(),
        };
        let u = url::Url::parse(&with_scheme).map_err(|e| invalid(&e.to_string()))?;
        if u.scheme() != "http" {
            return Err(invalid("only http:// proxies (HTTP CONNECT) are supported"));
        }
        let host = u
            .host_str()
            .ok_or_else(|| invalid("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = u.port_or_known_default().unwrap_or(80);
        let auth = if u.username().is_empty() {
            None
        } else {
            let user = percent_decode(u.username());
            let pass = percent_decode(u.password().unwrap_or(""));
            Some(base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
        };
        let shown = if u.username().is_empty() {
            format!("http://{host}:{port}")
        } else {
            format!("http://{}@{host}:{port}", u.username())
        };
        Ok(Self {
            host,
            port,
            auth,
            shown,
        })
    }

    /// The proxy the environment asks for, as curl reads it: `https_proxy` or
    /// `HTTPS_PROXY` for TLS targets, `http_proxy` for cleartext ones, unless
    /// `NO_PROXY`/`no_proxy` exempts `host`.
    pub fn from_env(host: &str, tls: bool) -> Result<Option<Self>, TransportError> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        let proxy = if tls {
            var(&["https_proxy", "HTTPS_PROXY"])
        } else {
            var(&["http_proxy"])
        };
        let Some(proxy) = proxy else {
            return Ok(None);
        };
        if let Some(no) = var(&["no_proxy", "NO_PROXY"]) {
            if no_proxy_matches(&no, host) {
                return Ok(None);
            }
        }
        Self::parse(&proxy).map(Some)
    }

    /// Opens a tunnel through the proxy to `host:port`.
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, TransportError> {
        let mut stream = crate::ws::connect_tcp(&self.host, self.port)
            .await
            .map_err(|e| TransportError::Proxy {
                proxy: self.shown.clone(),
                reason: format!("cannot reach the proxy: {e}"),
            })?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(a) = &self.auth {
            req.push_str(&format!("Proxy-Authorization: Basic {a}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        // Read the response head byte-wise-buffered but never past it: what
        // follows belongs to the tunnel.
        let mut reader = BufReader::with_capacity(1, &mut stream);
        let mut status = String::new();
        let mut total = 0usize;
        reader.read_line(&mut status).await?;
        total += status.len();
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).await?;
            total += n;
            if n == 0 {
                return Err(TransportError::Proxy {
                    proxy: self.shown.clone(),
                    reason: "closed the connection during CONNECT".into(),
                });
            }
            if total > 16 * 1024 {
                return Err(TransportError::Proxy {
                    proxy: self.shown.clone(),
                    reason: "CONNECT response head too large".into(),
                });
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let status = status.trim_end();
        let code = status.split_whitespace().nth(1).unwrap_or("");
        match code {
            "200" => Ok(stream),
            // 407 is the standard answer; some proxies (tinyproxy) send 401.
            "407" | "401" => Err(TransportError::Proxy {
                proxy: self.shown.clone(),
                reason: if self.auth.is_some() {
                    format!("rejected the credentials ({code}) for CONNECT {authority}")
                } else {
                    format!(
                        "requires authentication ({code}) for CONNECT {authority}: \
                         set user:pass in [transport] proxy"
                    )
                },
            }),
            _ => Err(TransportError::Proxy {
                proxy: self.shown.clone(),
                reason: format!("refused CONNECT {authority}: {status:?}"),
            }),
        }
    }
}

fn redact(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => s.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a `NO_PROXY` list exempts `host`: `*`, exact names, domain
/// suffixes (`example.com` and `.example.com` both match `a.example.com`),
/// IP addresses and CIDR ranges.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    list.split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            if let Some(ip) = ip {
                if let Ok(net) = entry.parse::<IpNet>() {
                    return net.contains(&ip);
                }
                return entry.parse::<IpAddr>().is_ok_and(|e| e == ip);
            }
            let entry = entry.trim_start_matches('.');
            host == entry || host.ends_with(&format!(".{entry}"))
        })
}

/// How a client reaches the server's port: host, port, proxy and TLS.
#[derive(Clone)]
pub struct Connector {
    /// Server host (name or address).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Proxy to tunnel through, if any.
    pub proxy: Option<Proxy>,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("proxy", &self.proxy)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    /// A connector; `tls` is the base client config and the SNI name to send
    /// (None for cleartext).
    pub fn new(
        host: String,
        port: u16,
        proxy: Option<Proxy>,
        tls: Option<(Arc<rustls::ClientConfig>, String)>,
    ) -> Result<Self, TransportError> {
        let tls = match tls {
            None => None,
            Some((cfg, sni)) => {
                let name =
                    ServerName::try_from(sni.clone()).map_err(|e| TransportError::InvalidUrl {
                        url: sni,
                        reason: format!("not a valid TLS server name: {e}"),
                    })?;
                Some((cfg, name))
            }
        };
        Ok(Self {
            host,
            port,
            proxy,
            tls,
        })
    }

    /// Whether TLS is used.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects (through the proxy if set) and, with TLS, completes a handshake
    /// offering `alpn`. Returns the stream, the peer address of the TCP socket
    /// and the ALPN protocol the server chose.
    pub async fn connect(
        &self,
        alpn: &[u8],
    ) -> Result<(BoxIo, Option<std::net::SocketAddr>, Option<Vec<u8>>), TransportError> {
        let tcp = match &self.proxy {
            Some(p) => p.connect(&self.host, self.port).await?,
            None => crate::ws::connect_tcp(&self.host, self.port).await?,
        };
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr().ok();
        match &self.tls {
            None => Ok((Box::new(tcp), peer, None)),
            Some((base, name)) => {
                let mut cfg = (**base).clone();
                cfg.alpn_protocols = vec![alpn.to_vec()];
                let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                    .connect(name.clone(), crate::readahead::ReadAhead::new(tcp))
                    .await
                    .map_err(|source| TransportError::Tls {
                        peer: format!("{}:{}", self.host, self.port),
                        source,
                    })?;
                let chosen = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                Ok((Box::new(tls), peer, chosen))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_url_with_credentials_is_parsed_and_redacted() {
        let p = Proxy::parse("http://alice:s%40cret@proxy.corp:3128").expect("ok");
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        let expected = base64::engine::general_purpose::STANDARD.encode("alice:s@cret");
        assert_eq!(p.auth.as_deref(), Some(expected.as_str()));
        assert_eq!(p.to_string(), "http://alice@proxy.corp:3128");
        assert!(!format!("{p:?}").contains("cret"));
    }

    #[test]
    fn proxy_without_scheme_or_port_takes_defaults() {
        let p = Proxy::parse("proxy.corp:8080").expect("ok");
        assert_eq!(
            (p.host.as_str(), p.port, p.auth.is_none()),
            ("proxy.corp", 8080, true)
        );
        let p = Proxy::parse("http://proxy.corp").expect("ok");
        assert_eq!(p.port, 80);
    }

    #[test]
    fn socks_proxies_are_refused_clearly() {
        let e = Proxy::parse("socks5://u:p@h:1080")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("only http://") && !e.contains(":p@"), "{e}");
    }

    #[test]
    fn no_proxy_matching_follows_curl() {
        assert!(no_proxy_matches("*", "anything"));
        assert!(no_proxy_matches("example.com", "example.com"));
        assert!(no_proxy_matches("example.com", "vpn.example.com"));
        assert!(no_proxy_matches(".example.com", "vpn.example.com"));
        assert!(!no_proxy_matches("example.com", "badexample.com"));
        assert!(no_proxy_matches("localhost, 10.0.0.0/8", "10.1.2.3"));
        assert!(no_proxy_matches("198.18.0.1", "198.18.0.1"));
        assert!(!no_proxy_matches("198.18.0.2", "198.18.0.1"));
        assert!(no_proxy_matches("::1", "[::1]"));
        assert!(!no_proxy_matches("", "x"));
    }
}
