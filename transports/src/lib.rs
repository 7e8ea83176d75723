//! How Sallyport frames cross a network.
//!
//! Every transport turns a connection into a [`Tunnel`]: a sink and a stream of
//! [`Frame`]s, type-erased once at this boundary so that the server and client
//! are not generic over the transport. Dialing ([`Dial`]) happens on the client;
//! the [`listener`] accepts on the server and hands out tunnels.
//!
//! Writers feed a whole batch of frames and flush once; readers take the first
//! frame and then whatever else is ready ([`recv_ready`]).
//!
//! This crate knows nothing of IP routing and must not depend on the middleware.

use std::net::SocketAddr;
use std::pin::Pin;

use futures::future::BoxFuture;
use futures::{FutureExt, Sink, Stream, StreamExt};
pub use sallyport_core::Frame;

pub mod connect;
pub mod dial;
pub mod framing;
pub mod h2;
pub mod listener;
pub mod memory;
pub mod raw;
pub mod readahead;
pub mod tls;
pub mod writer;
pub mod ws;

/// Frames coming in from the peer.
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, TransportError>> + Send>>;
/// Frames going out to the peer. `feed` many, then `flush` once.
pub type FrameSink = Pin<Box<dyn Sink<Frame, Error = TransportError> + Send>>;

/// Which transport carries a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// WebSocket (over TLS, or plain behind a reverse proxy).
    WebSocket,
    /// A gRPC-shaped HTTP/2 stream (over TLS, or h2c behind a reverse proxy).
    Http2,
    /// Length-prefixed frames directly over TLS (ALPN `sallyport/1`).
    RawTls,
    /// In-process, for tests.
    Memory,
}

impl TransportKind {
    /// Short name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            TransportKind::WebSocket => "wss",
            TransportKind::Http2 => "h2",
            TransportKind::RawTls => "tls",
            TransportKind::Memory => "memory",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An established connection that carries frames both ways.
pub struct Tunnel {
    /// Outgoing frames.
    pub tx: FrameSink,
    /// Incoming frames; ends when the peer closes.
    pub rx: FrameStream,
    /// Where it came from and how.
    pub info: TunnelInfo,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("info", &self.info).finish()
    }
}

/// Facts about a tunnel, for logs.
#[derive(Debug, Clone)]
pub struct TunnelInfo {
    /// The transport.
    pub transport: TransportKind,
    /// The peer's address as seen by the socket.
    pub peer: Option<SocketAddr>,
}

/// Opens tunnels to a server (the client side of a transport).
pub trait Dial: Send + Sync {
    /// The transport this dialer speaks.
    fn kind(&self) -> TransportKind;
    /// Connects and completes the transport's own handshake (not the VPN's).
    fn dial(&self) -> BoxFuture<'_, Result<Tunnel, TransportError>>;
}

/// Errors from transports. Messages name what was being done and to whom.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URL cannot be used.
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Name resolution failed.
    #[error("resolve {host}: {source}")]
    Resolve {
        /// host:port.
        host: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TCP connect failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("tls handshake with {peer}: {source}")]
    Tls {
        /// The peer.
        peer: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading certificates or keys failed.
    #[error(transparent)]
    TlsConfig(#[from] tls::TlsConfigError),
    /// The WebSocket handshake or stream failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The peer sent something the transport cannot carry.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer sent a message larger than the transport's limit.
    #[error("protocol violation: frame of {len} bytes exceeds the {limit}-byte limit")]
    FrameTooLarge {
        /// The length it stated.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The HTTP proxy failed or refused.
    #[error("proxy {proxy}: {reason}")]
    Proxy {
        /// The proxy, without password.
        proxy: String,
        /// What happened.
        reason: String,
    },
    /// The HTTP/2 transport failed.
    #[error("http/2: {0}")]
    Http2(String),
    /// Binding a listening socket failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A step took longer than allowed.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// Other I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The other end of an in-memory tunnel is gone.
    #[error("tunnel closed")]
    Closed,
}

impl TransportError {
    /// Whether the peer sent a message over the frame limit (any transport).
    pub fn is_frame_too_large(&self) -> bool {
        use tokio_tungstenite::tungstenite::Error as Ws;
        matches!(
            self,
            TransportError::FrameTooLarge { .. } | TransportError::WebSocket(Ws::Capacity(_))
        )
    }
}

impl From<hyper::Error> for TransportError {
    fn from(e: hyper::Error) -> Self {
        TransportError::Http2(e.to_string())
    }
}

/// Awaits the first frame, then appends whatever else is ready without
/// waiting, up to `max` frames in `out`. Returns `Ok(false)` when the stream
/// has ended (any frames read before the end are still in `out`).
pub async fn recv_ready(
    rx: &mut FrameStream,
    out: &mut Vec<Frame>,
    max: usize,
) -> Result<bool, TransportError> {
    match rx.next().await {
        Some(f) => out.push(f?),
        None => return Ok(false),
    }
    while out.len() < max {
        match rx.next().now_or_never() {
            Some(Some(f)) => out.push(f?),
            Some(None) => return Ok(false),
            None => break,
        }
    }
    Ok(true)
}

/// A `Stream` over an mpsc receiver (one adapter; not worth a dependency).
pub struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> ReceiverStream<T> {
    /// Wraps `rx`.
    pub fn new(rx: tokio::sync::mpsc::Receiver<T>) -> Self {
        Self(rx)
    }
}

impl<T> Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
