//! The WebSocket transport: the original protocol. Text messages carry JSON
//! control messages, binary messages carry one IP packet each.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::connect::Connector;
use crate::{Frame, TransportError, TransportKind, Tunnel, TunnelInfo};

/// WebSocket limits for a largest message of `max_frame` bytes.
pub fn websocket_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// Wraps an established WebSocket as a [`Tunnel`].
pub fn into_tunnel<S>(ws: WebSocketStream<S>, info: TunnelInfo) -> Tunnel
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    Tunnel {
        tx: Box::pin(WsSink { inner: sink }),
        rx: Box::pin(WsStream { inner: stream }),
        info,
    }
}

pin_project_lite::pin_project! {
    struct WsStream<S> { #[pin] inner: S }
}

impl<S> Stream for WsStream<S>
where
    S: Stream<Item = Result<Message, tungstenite::Error>>,
{
    type Item = Result<Frame, TransportError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            let msg = match ready!(this.inner.as_mut().poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(m)) => m,
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            };
            return Poll::Ready(Some(Ok(match msg {
                Message::Text(t) => Frame::Control(t.into()),
                Message::Binary(b) => Frame::Packet(b),
                Message::Close(_) => return Poll::Ready(None),
                // WebSocket-level pings are answered by tungstenite itself.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            })));
        }
    }
}

pin_project_lite::pin_project! {
    struct WsSink<S> { #[pin] inner: S }
}

impl<S> Sink<Frame> for WsSink<S>
where
    S: Sink<Message, Error = tungstenite::Error>,
{
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.project().inner.poll_ready(cx).map_err(Into::into)
    }

    fn start_send(self: Pin<&mut Self>, item: Frame) -> Result<(), Self::Error> {
        let msg = match item {
            Frame::Packet(b) => Message::Binary(b),
            Frame::Control(b) => Message::Text(
                Utf8Bytes::try_from(b)
                    .map_err(|_| TransportError::Protocol("control message is not utf-8".into()))?,
            ),
        };
        self.project().inner.start_send(msg).map_err(Into::into)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.project().inner.poll_flush(cx).map_err(Into::into)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.project().inner.poll_close(cx).map_err(Into::into)
    }
}

/// Where and how a client connects.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The full URL (`wss://host:port/path` or `ws://...`).
    pub url: url::Url,
    /// Host to connect to and to name in SNI.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether TLS is used (`wss`).
    pub tls: bool,
}

impl Endpoint {
    /// Parses a `wss://` or `ws://` URL.
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let invalid = |reason: &str| TransportError::InvalidUrl {
            url: url.into(),
            reason: reason.into(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        let tls = match parsed.scheme() {
            "wss" | "https" => true,
            "ws" | "http" => false,
            _ => {
                return Err(invalid(
                    "scheme must be wss:// (or ws:// behind a TLS proxy)",
                ))
            }
        };
        let host = parsed
            .host_str()
            .ok_or_else(|| invalid("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| invalid("no port"))?;
        let mut ws_url = parsed.clone();
        // tungstenite wants ws/wss; accept https/http as aliases.
        let scheme = if tls { "wss" } else { "ws" };
        ws_url
            .set_scheme(scheme)
            .map_err(|_| invalid("cannot use scheme"))?;
        Ok(Self {
            url: ws_url,
            host,
            port,
            tls,
        })
    }
}

/// Dials WebSocket tunnels (over TLS unless the URL says `ws://`).
pub struct WsDialer {
    connector: Connector,
    request: http::Request<()>,
    max_frame: usize,
    timeout: Duration,
}

impl WsDialer {
    /// A dialer for the WebSocket at `url`, reached through `connector`;
    /// `host_header` overrides the `Host` sent (fronted deployments).
    pub fn new(
        connector: Connector,
        url: &url::Url,
        host_header: Option<&str>,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.as_str().into_client_request()?;
        if let Some(h) = host_header {
            let v = http::HeaderValue::from_str(h).map_err(|e| TransportError::InvalidUrl {
                url: h.into(),
                reason: format!("invalid host header: {e}"),
            })?;
            request.headers_mut().insert(http::header::HOST, v);
        }
        Ok(Self {
            connector,
            request,
            max_frame,
            timeout,
        })
    }

    async fn dial_inner(&self) -> Result<Tunnel, TransportError> {
        let (io, peer, _alpn) = self.connector.connect(b"http/1.1").await?;
        let info = TunnelInfo {
            transport: TransportKind::WebSocket,
            peer,
        };
        let cfg = Some(websocket_config(self.max_frame));
        let (ws, _resp) =
            tokio_tungstenite::client_async_with_config(self.request.clone(), io, cfg).await?;
        Ok(into_tunnel(ws, info))
    }
}

impl crate::Dial for WsDialer {
    fn kind(&self) -> TransportKind {
        TransportKind::WebSocket
    }

    fn dial(&self) -> futures::future::BoxFuture<'_, Result<Tunnel, TransportError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.dial_inner())
                .await
                .map_err(|_| TransportError::Timeout("websocket connect"))?
        })
    }
}

/// Resolves `host` and connects to the first address that answers, with
/// `TCP_NODELAY` set (the tunnel carries interactive traffic).
pub async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, TransportError> {
    let target = format!("{host}:{port}");
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| TransportError::Resolve {
            host: target.clone(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(TransportError::Connect {
        addr: target,
        source: last.unwrap_or_else(|| std::io::Error::other("no addresses")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parses_wss_with_default_port() {
        let e = Endpoint::parse("wss://vpn.example.com/tunnel").expect("ok");
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("vpn.example.com", 443, true)
        );
        assert_eq!(e.url.path(), "/tunnel");
    }

    #[test]
    fn endpoint_parses_ws_and_ipv6() {
        let e = Endpoint::parse("ws://[::1]:8080/t").expect("ok");
        assert_eq!((e.host.as_str(), e.port, e.tls), ("::1", 8080, false));
    }

    #[test]
    fn endpoint_rejects_other_schemes() {
        assert!(Endpoint::parse("ftp://x/y").is_err());
        assert!(Endpoint::parse("not a url").is_err());
    }
}
