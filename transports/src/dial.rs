//! Building a client's dialers from its settings: the one place where a
//! transport is chosen by name and erased to `Box<dyn Dial>`.

use std::sync::Arc;
use std::time::Duration;

use crate::connect::{Connector, Proxy};
use crate::tls::ClientTrust;
use crate::ws::Endpoint;
use crate::{Dial, TransportError, TransportKind};

/// Everything a client knows about reaching its server.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `wss://host[:port]/path` (or `ws://` for cleartext behind a proxy).
    pub url: String,
    /// How to verify the server.
    pub trust: ClientTrust,
    /// An explicit HTTP CONNECT proxy (`"none"`: no proxy, whatever the
    /// environment says); `None` reads the environment as curl does.
    pub proxy: Option<String>,
    /// SNI to send instead of the URL's host.
    pub sni: Option<String>,
    /// HTTP `Host`/`:authority` to send instead of the URL's host.
    pub host_header: Option<String>,
    /// Largest frame accepted from the server.
    pub max_frame: usize,
    /// Time allowed for TCP, proxy, TLS and the transport's own handshake.
    pub timeout: Duration,
}

impl TransportKind {
    /// Parses `wss`, `h2` or `tls`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "wss" | "ws" | "websocket" => Some(TransportKind::WebSocket),
            "h2" | "http2" | "grpc" => Some(TransportKind::Http2),
            "tls" | "raw" => Some(TransportKind::RawTls),
            _ => None,
        }
    }
}

/// The proxy to use for `settings`: the explicit one, else the environment's.
pub fn proxy_for(settings: &ClientSettings) -> Result<Option<Proxy>, TransportError> {
    let ep = Endpoint::parse(&settings.url)?;
    match settings.proxy.as_deref() {
        Some("none") | Some("") => Ok(None),
        Some(p) => Proxy::parse(p).map(Some),
        None => Proxy::from_env(&ep.host, ep.tls),
    }
}

/// Builds the dialer for `kind`.
pub fn dialer(
    kind: TransportKind,
    settings: &ClientSettings,
) -> Result<Box<dyn Dial>, TransportError> {
    let ep = Endpoint::parse(&settings.url)?;
    let proxy = proxy_for(settings)?;
    let tls = if ep.tls {
        let cfg = crate::tls::client_config(&settings.trust, &[])?;
        let sni = settings.sni.clone().unwrap_or_else(|| ep.host.clone());
        Some((Arc::new(cfg), sni))
    } else {
        None
    };
    let connector = Connector::new(ep.host.clone(), ep.port, proxy, tls)?;
    let authority = settings.host_header.clone().unwrap_or_else(|| {
        let default_port = if ep.tls { 443 } else { 80 };
        let host = if ep.host.contains(':') {
            format!("[{}]", ep.host)
        } else {
            ep.host.clone()
        };
        if ep.port == default_port {
            host
        } else {
            format!("{host}:{}", ep.port)
        }
    });
    Ok(match kind {
        TransportKind::WebSocket => Box::new(crate::ws::WsDialer::new(
            connector,
            &ep.url,
            settings.host_header.as_deref(),
            settings.max_frame,
            settings.timeout,
        )?),
        TransportKind::Http2 => Box::new(crate::h2::H2Dialer::new(
            connector,
            &authority,
            ep.url.path(),
            settings.max_frame,
            settings.timeout,
        )?),
        TransportKind::RawTls => Box::new(crate::raw::RawDialer::new(
            connector,
            settings.max_frame,
            settings.timeout,
        )?),
        TransportKind::Memory => {
            return Err(TransportError::InvalidUrl {
                url: settings.url.clone(),
                reason: "the in-memory transport cannot be dialed by url".into(),
            })
        }
    })
}
