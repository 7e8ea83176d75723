//! The server's listening side: one TLS port for every transport, told apart
//! by ALPN (`sallyport/1` → raw TLS; `h2`, `http/1.1` or none → HTTP, where a
//! WebSocket upgrade or a gRPC POST at the tunnel path becomes a tunnel), and
//! optionally a cleartext port (HTTP/1.1 WebSocket upgrades and h2c) for
//! running behind a TLS-terminating reverse proxy.
//!
//! Anything that is not a tunnel request gets an ordinary web response (a 404,
//! or the configured static page), never a hint that a VPN is there.
//!
//! Each connection gets a bounded time to become a tunnel, and the number of
//! connections in that phase is bounded too. Accepted tunnels are handed out
//! through [`Listener::accept`].

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::readahead::ReadAhead;
use crate::{TransportError, TransportKind, Tunnel, TunnelInfo};

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

/// What the listener needs to know.
#[derive(Clone)]
pub struct ListenerConfig {
    /// The TLS port for every transport.
    pub listen_addr: SocketAddr,
    /// An optional cleartext port (WebSocket upgrades and h2c).
    pub plain_addr: Option<SocketAddr>,
    /// TLS settings (certificate; ALPN is set here).
    pub tls: Arc<rustls::ServerConfig>,
    /// The HTTP path of the tunnel, e.g. `/tunnel`.
    pub path: String,
    /// Largest message accepted from a client.
    pub max_frame: usize,
    /// Time allowed from TCP accept to an established tunnel.
    pub handshake_timeout: Duration,
    /// Most connections allowed between TCP accept and tunnel hand-over.
    pub max_pending: usize,
    /// Most of those from one source address (0: no per-source limit), so
    /// one address cannot take every slot (slowloris).
    pub max_pending_per_source: usize,
    /// Peers whose `X-Forwarded-For` is believed (reverse proxies).
    pub trusted_proxies: Vec<IpNet>,
    /// Served with 200 to GET requests that are not tunnel requests (else 404).
    pub static_page: Option<Bytes>,
}

impl std::fmt::Debug for ListenerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerConfig")
            .field("listen_addr", &self.listen_addr)
            .field("plain_addr", &self.plain_addr)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The ALPN protocols the TLS port offers, in preference order.
pub fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![
        crate::raw::ALPN.to_vec(),
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
    ]
}

/// Bound listeners producing tunnels. Dropping it stops accepting.
pub struct Listener {
    tunnels: mpsc::Receiver<Tunnel>,
    local_addr: SocketAddr,
    plain_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    refused: Arc<AtomicU64>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Counts of something per source address, with a cap; a [`SourceSlot`]
/// holds one until dropped.
#[derive(Debug, Default)]
pub struct PerSource {
    max: usize,
    held: Mutex<std::collections::HashMap<IpAddr, usize>>,
}

/// One source's slot in a [`PerSource`]; released on drop.
#[derive(Debug)]
pub struct SourceSlot {
    of: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    /// At most `max` per source (0: unlimited).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            held: Mutex::default(),
        })
    }

    /// A slot for `ip`, unless it already holds `max`.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut m = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if self.max != 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            of: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.of.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

struct Shared {
    per_source: Arc<PerSource>,
    unlimited: Arc<PerSource>,
    cfg: ListenerConfig,
    tx: mpsc::Sender<Tunnel>,
    pending: Arc<Semaphore>,
    refused: Arc<AtomicU64>,
}

impl Listener {
    /// Binds the TLS port (and the cleartext one, if configured) and starts
    /// accepting in the background.
    pub async fn bind(mut cfg: ListenerConfig) -> Result<Self, TransportError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| TransportError::Bind { addr, source })
        };
        let tls_listener = bind(cfg.listen_addr).await?;
        let local_addr = tls_listener.local_addr()?;
        let plain_listener = match cfg.plain_addr {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let plain_addr = plain_listener.as_ref().and_then(|l| l.local_addr().ok());
        let mut tls = (*cfg.tls).clone();
        tls.alpn_protocols = alpn_protocols();
        cfg.tls = Arc::new(tls);
        let (tx, tunnels) = mpsc::channel(64);
        let refused = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            per_source: PerSource::new(cfg.max_pending_per_source),
            unlimited: PerSource::new(0),
            pending: Arc::new(Semaphore::new(cfg.max_pending)),
            refused: refused.clone(),
            cfg,
            tx,
        });
        let mut tasks = vec![tokio::spawn(accept_loop(
            tls_listener,
            shared.clone(),
            true,
        ))];
        if let Some(l) = plain_listener {
            tasks.push(tokio::spawn(accept_loop(l, shared, false)));
        }
        Ok(Self {
            tunnels,
            local_addr,
            plain_addr,
            tasks,
            refused,
        })
    }

    /// The bound TLS address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound cleartext address, if any.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_addr
    }

    /// How many connections were dropped at accept because `max_pending`
    /// were already in set-up (a live counter, for metrics).
    pub fn refused_counter(&self) -> Arc<AtomicU64> {
        self.refused.clone()
    }

    /// The next tunnel; `None` once the listener has failed.
    pub async fn accept(&mut self) -> Option<Tunnel> {
        self.tunnels.recv().await
    }
}

async fn accept_loop(tcp: TcpListener, shared: Arc<Shared>, tls: bool) {
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.cfg.tls.clone());
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
        let Ok(permit) = shared.pending.clone().try_acquire_owned() else {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, limit = shared.cfg.max_pending, "too many connections not yet authenticated, dropping");
            continue;
        };
        // A trusted reverse proxy speaks for many clients: no per-source cap
        // on it (the session applies one to the forwarded address).
        let source_limit = if shared
            .cfg
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer.ip()))
        {
            &shared.unlimited
        } else {
            &shared.per_source
        };
        let Some(slot) = source_limit.try_take(peer.ip()) else {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, limit = shared.cfg.max_pending_per_source, "too many connections not yet authenticated from this address, dropping");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        tokio::spawn(async move {
            let handover = Handover::new((permit, slot));
            let r = if tls {
                handle_tls(stream, peer, acceptor, &shared, handover).await
            } else {
                serve_http(stream, peer, shared.clone(), handover).await
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended before a tunnel");
            }
        });
    }
}

/// The pending-connection permit and the signal that the connection has
/// become a tunnel (after which no handshake deadline applies).
#[derive(Clone)]
struct Handover {
    permit: Arc<Mutex<Option<(OwnedSemaphorePermit, SourceSlot)>>>,
    done: Arc<Notify>,
}

impl Handover {
    fn new(permit: (OwnedSemaphorePermit, SourceSlot)) -> Self {
        Self {
            permit: Arc::new(Mutex::new(Some(permit))),
            done: Arc::new(Notify::new()),
        }
    }

    fn complete(&self) {
        if let Ok(mut p) = self.permit.lock() {
            p.take();
        }
        self.done.notify_one();
    }
}

async fn handle_tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: &Arc<Shared>,
    handover: Handover,
) -> Result<(), TransportError> {
    let tls = tokio::time::timeout(
        shared.cfg.handshake_timeout,
        acceptor.accept(ReadAhead::new(stream)),
    )
    .await
    .map_err(|_| TransportError::Timeout("tls handshake"))?
    .map_err(|source| TransportError::Tls {
        peer: peer.to_string(),
        source,
    })?;
    if tls.get_ref().1.alpn_protocol() == Some(crate::raw::ALPN) {
        let tunnel = crate::raw::into_tunnel(
            tls,
            shared.cfg.max_frame,
            TunnelInfo {
                transport: TransportKind::RawTls,
                peer: Some(peer),
            },
        );
        handover.complete();
        let _ = shared.tx.send(tunnel).await;
        return Ok(());
    }
    serve_http(tls, peer, shared.clone(), handover).await
}

/// Serves HTTP/1.1 and HTTP/2 on `io` until the connection ends; the
/// handshake deadline applies until a tunnel has been handed over.
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    shared: Arc<Shared>,
    handover: Handover,
) -> Result<(), TransportError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = shared.cfg.handshake_timeout;
    let done = handover.done.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (shared, handover) = (shared.clone(), handover.clone());
        async move { Ok::<_, Infallible>(route(req, peer, &shared, &handover).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(crate::h2::STREAM_WINDOW)
        .initial_connection_window_size(crate::h2::CONNECTION_WINDOW)
        .max_frame_size(crate::h2::MAX_FRAME);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let http_err = |e: Box<dyn std::error::Error + Send + Sync>| {
        TransportError::Protocol(format!("http: {e}"))
    };
    tokio::select! {
        r = conn.as_mut() => return r.map_err(http_err),
        _ = done.notified() => {}
        _ = tokio::time::sleep(deadline) => return Err(TransportError::Timeout("http request")),
    }
    conn.await.map_err(http_err)
}

async fn route(
    mut req: Request<Incoming>,
    socket_peer: SocketAddr,
    shared: &Shared,
    handover: &Handover,
) -> Response<RespBody> {
    let cfg = &shared.cfg;
    if req.uri().path() != cfg.path {
        return decoy(&req, cfg);
    }
    let peer = real_peer(&req, socket_peer, &cfg.trusted_proxies);
    if crate::h2::is_grpc(&req) && req.version() == http::Version::HTTP_2 {
        let info = TunnelInfo {
            transport: TransportKind::Http2,
            peer: Some(peer),
        };
        let (resp, tunnel) = crate::h2::accept(req, info, cfg.max_frame);
        handover.complete();
        if shared.tx.send(tunnel).await.is_err() {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "");
        }
        return resp.map(|b| b.boxed_unsync());
    }
    let Some(accept_key) = websocket_accept_key(&req) else {
        return decoy(&req, cfg);
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let ws_cfg = crate::ws::websocket_config(cfg.max_frame);
    let (tx, handover) = (shared.tx.clone(), handover.clone());
    tokio::spawn(async move {
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
                handover.complete();
                let _ = tx.send(crate::ws::into_tunnel(ws, info)).await;
            }
            Err(e) => tracing::debug!(%peer, error = %e, "websocket upgrade failed"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).boxed_unsync());
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

/// The client's address: the socket peer, or, when that is a trusted proxy,
/// the right-most untrusted address of `X-Forwarded-For`.
pub fn real_peer<B>(req: &Request<B>, socket_peer: SocketAddr, trusted: &[IpNet]) -> SocketAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&socket_peer.ip()) {
        return socket_peer;
    }
    let hops: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(hops.first())
        .map(|ip| SocketAddr::new(*ip, 0))
        .unwrap_or(socket_peer)
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

/// What a non-tunnel request gets: the static page for a GET when one is
/// configured, else an ordinary 404.
fn decoy<B>(req: &Request<B>, cfg: &ListenerConfig) -> Response<RespBody> {
    match (&cfg.static_page, req.method()) {
        (Some(page), &http::Method::GET | &http::Method::HEAD) => {
            let mut r = Response::new(Full::new(page.clone()).boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        _ => plain(StatusCode::NOT_FOUND, "404 Not Found\n"),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync());
    *resp.status_mut() = status;
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

    fn xff(v: &str) -> Request<()> {
        Request::builder()
            .header("x-forwarded-for", v)
            .body(())
            .expect("req")
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.1/32".parse().expect("net"),
            "10.0.0.0/8".parse().expect("net"),
        ];
        let proxy: SocketAddr = "127.0.0.1:5555".parse().expect("addr");
        let stranger: SocketAddr = "203.0.113.9:5555".parse().expect("addr");
        let ip = |r: SocketAddr| r.ip().to_string();
        assert_eq!(
            ip(real_peer(&xff("198.51.100.7"), proxy, &trusted)),
            "198.51.100.7"
        );
        assert_eq!(
            ip(real_peer(
                &xff("1.2.3.4, 198.51.100.7, 10.1.1.1"),
                proxy,
                &trusted
            )),
            "198.51.100.7"
        );
        assert_eq!(
            ip(real_peer(&xff("198.51.100.7"), stranger, &trusted)),
            "203.0.113.9"
        );
        assert_eq!(ip(real_peer(&xff("garbage"), proxy, &trusted)), "127.0.0.1");
    }
}
