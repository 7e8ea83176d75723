//! The server's listening side: TCP, TLS, HTTP/1.1 with a WebSocket upgrade at
//! the tunnel path, and an ordinary 404 for everything else.
//!
//! Accepted tunnels are handed to the caller through [`Listener::accept`].
//! Each connection gets a bounded time to complete TLS and the upgrade; the
//! number of connections in that phase is bounded too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::{TransportError, TransportKind, Tunnel, TunnelInfo};

/// What the listener needs to know.
#[derive(Clone)]
pub struct ListenerConfig {
    /// Where to listen.
    pub listen_addr: SocketAddr,
    /// TLS settings (certificate, ALPN).
    pub tls: Arc<rustls::ServerConfig>,
    /// The HTTP path of the tunnel, e.g. `/tunnel`.
    pub path: String,
    /// Largest message accepted from a client.
    pub max_frame: usize,
    /// Time allowed from TCP accept to an upgraded tunnel.
    pub handshake_timeout: Duration,
    /// Most connections allowed between TCP accept and tunnel hand-over.
    pub max_pending: usize,
}

impl std::fmt::Debug for ListenerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerConfig")
            .field("listen_addr", &self.listen_addr)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A bound listener producing tunnels. Dropping it stops accepting.
pub struct Listener {
    tunnels: mpsc::Receiver<Tunnel>,
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Binds and starts accepting in the background.
    pub async fn bind(cfg: ListenerConfig) -> Result<Self, TransportError> {
        let tcp =
            TcpListener::bind(cfg.listen_addr)
                .await
                .map_err(|source| TransportError::Bind {
                    addr: cfg.listen_addr,
                    source,
                })?;
        let local_addr = tcp.local_addr()?;
        let (tx, tunnels) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(tcp, Arc::new(cfg), tx));
        Ok(Self {
            tunnels,
            local_addr,
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next tunnel; `None` once the listener has failed.
    pub async fn accept(&mut self) -> Option<Tunnel> {
        self.tunnels.recv().await
    }
}

async fn accept_loop(tcp: TcpListener, cfg: Arc<ListenerConfig>, tx: mpsc::Sender<Tunnel>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.tls.clone());
    let pending = Arc::new(Semaphore::new(cfg.max_pending));
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = cfg.max_pending, "too many pending connections, dropping");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (cfg, acceptor, tx) = (cfg.clone(), acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let timeout = cfg.handshake_timeout;
            let r =
                tokio::time::timeout(timeout, handle_tls(stream, peer, acceptor, cfg, tx, permit))
                    .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "connection ended before a tunnel")
                }
                Err(_) => tracing::debug!(%peer, "handshake timed out"),
            }
        });
    }
}

async fn handle_tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    cfg: Arc<ListenerConfig>,
    tx: mpsc::Sender<Tunnel>,
    permit: OwnedSemaphorePermit,
) -> Result<(), TransportError> {
    let tls = acceptor
        .accept(stream)
        .await
        .map_err(|source| TransportError::Tls {
            peer: peer.to_string(),
            source,
        })?;
    serve_http1(tls, peer, cfg, tx, permit).await
}

/// Serves HTTP/1.1 on `io`: the tunnel path upgrades to WebSocket, anything
/// else gets a 404.
async fn serve_http1<I>(
    io: I,
    peer: SocketAddr,
    cfg: Arc<ListenerConfig>,
    tx: mpsc::Sender<Tunnel>,
    permit: OwnedSemaphorePermit,
) -> Result<(), TransportError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let permit = Arc::new(std::sync::Mutex::new(Some(permit)));
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (cfg, tx, permit) = (cfg.clone(), tx.clone(), permit.clone());
        async move { Ok::<_, Infallible>(route(req, peer, &cfg, tx, &permit)) }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await
        .map_err(|e| TransportError::Protocol(format!("http: {e}")))
}

fn route(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    cfg: &ListenerConfig,
    tx: mpsc::Sender<Tunnel>,
    permit: &std::sync::Mutex<Option<OwnedSemaphorePermit>>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != cfg.path {
        return not_found();
    }
    let Some(accept_key) = websocket_accept_key(&req) else {
        return not_found();
    };
    let upgrade = hyper::upgrade::on(&mut req);
    // The permit travels with the upgrade and is released once the tunnel is
    // handed over (or fails).
    let permit = permit.lock().ok().and_then(|mut p| p.take());
    let ws_cfg = crate::ws::websocket_config(cfg.max_frame);
    tokio::spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_cfg),
                )
                .await;
                let info = TunnelInfo {
                    transport: TransportKind::WebSocket,
                    peer: Some(peer),
                };
                let _ = tx.send(crate::ws::into_tunnel(ws, info)).await;
            }
            Err(e) => tracing::debug!(%peer, error = %e, "websocket upgrade failed"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept_key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// The `Sec-WebSocket-Accept` value if `req` is a valid WebSocket upgrade.
fn websocket_accept_key<B>(req: &Request<B>) -> Option<String> {
    let h = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if req.method() != http::Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
        || h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13")
    {
        return None;
    }
    let key = h.get(header::SEC_WEBSOCKET_KEY)?;
    Some(derive_accept_key(key.as_bytes()))
}

fn not_found() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(b"404 Not Found\n")));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_request() -> http::request::Builder {
        Request::builder()
            .method("GET")
            .uri("/tunnel")
            .header("Upgrade", "websocket")
            .header("Connection", "keep-alive, Upgrade")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    #[test]
    fn accept_key_follows_rfc6455_example() {
        let req = upgrade_request().body(()).expect("req");
        assert_eq!(
            websocket_accept_key(&req).as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
    }

    #[test]
    fn plain_get_is_not_an_upgrade() {
        let req = Request::builder().uri("/tunnel").body(()).expect("req");
        assert_eq!(websocket_accept_key(&req), None);
        let post = upgrade_request().method("POST").body(()).expect("req");
        assert_eq!(websocket_accept_key(&post), None);
        let v8 = Request::builder()
            .uri("/tunnel")
            .header("Upgrade", "websocket")
            .header("Connection", "Upgrade")
            .header("Sec-WebSocket-Version", "8")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .expect("req");
        assert_eq!(websocket_accept_key(&v8), None);
    }
}
