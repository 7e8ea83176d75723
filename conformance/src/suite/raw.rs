//! Connections over the framed transports (HTTP/2 and raw TLS) on which the
//! suite can also write raw bytes: framed messages the project's own codec
//! refuses to produce (a non-zero compressed flag, an unknown kind, a zero
//! length), for [F4].
//!
//! Each is a [`Tunnel`] like the dialer's (so the usual session machinery
//! drives it) plus a sender of raw bytes that go out unframed on the same
//! stream, in order with the frames.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sallyport_transports::connect::Connector;
use sallyport_transports::framing::{encode_frame, FrameCodec};
use sallyport_transports::ws::Endpoint;
use sallyport_transports::{
    Frame, FrameSink, FrameStream, TransportError, TransportKind, Tunnel, TunnelInfo,
};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, FramedRead};

use super::{Target, Transport, OWN_MAX_FRAME};

/// Raw bytes to write on a [`RawTunnel`]'s stream.
pub(crate) type RawSender = mpsc::Sender<Bytes>;

/// A tunnel that also takes raw bytes.
pub(crate) struct RawTunnel {
    pub tunnel: Tunnel,
    pub raw: RawSender,
}

/// Opens `transport` (HTTP/2 or raw TLS) to the target's server.
pub(crate) async fn dial(target: &Target, transport: Transport) -> Result<RawTunnel, String> {
    let limit = target.timeouts.reply.max(Duration::from_secs(5));
    tokio::time::timeout(limit, dial_inner(target, transport))
        .await
        .map_err(|_| format!("connect: no connection within {limit:?}"))?
}

async fn dial_inner(target: &Target, transport: Transport) -> Result<RawTunnel, String> {
    let ep = Endpoint::parse(&target.url).map_err(|e| e.to_string())?;
    let tls = if ep.tls {
        let cfg = sallyport_transports::tls::client_config(&target.trust, &[])
            .map_err(|e| e.to_string())?;
        Some((Arc::new(cfg), ep.host.clone()))
    } else {
        None
    };
    let connector =
        Connector::new(ep.host.clone(), ep.port, None, tls).map_err(|e| e.to_string())?;
    let (raw, rx) = mpsc::channel::<Bytes>(64);
    let tx: FrameSink = Box::pin(raw.clone().sink_map_err(|_| TransportError::Closed).with(
        |f: Frame| {
            let mut b = BytesMut::new();
            encode_frame(&f, &mut b);
            futures::future::ready(Ok::<_, TransportError>(b.freeze()))
        },
    ));
    let tunnel = match transport {
        Transport::Tls => {
            let alpn = sallyport_transports::raw::ALPN;
            if !connector.is_tls() {
                return Err("the raw TLS transport needs a wss:// url".into());
            }
            let (io, peer, chosen) = connector
                .connect(alpn)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            if chosen.as_deref() != Some(alpn) {
                return Err(format!(
                    "the server did not accept ALPN {}",
                    String::from_utf8_lossy(alpn)
                ));
            }
            let (r, mut w) = tokio::io::split(io);
            let mut rx = rx;
            tokio::spawn(async move {
                while let Some(b) = rx.next().await {
                    if w.write_all(&b).await.is_err() || w.flush().await.is_err() {
                        return;
                    }
                }
                let _ = w.shutdown().await;
            });
            let frames: FrameStream =
                Box::pin(FramedRead::new(r, FrameCodec::new(OWN_MAX_FRAME)).fuse());
            Tunnel {
                tx,
                rx: frames,
                info: TunnelInfo {
                    transport: TransportKind::RawTls,
                    peer,
                },
            }
        }
        Transport::H2 => {
            let (io, peer, chosen) = connector
                .connect(b"h2")
                .await
                .map_err(|e| format!("connect: {e}"))?;
            if connector.is_tls() && chosen.as_deref() != Some(b"h2") {
                return Err("the server did not negotiate h2 via ALPN".into());
            }
            let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("http/2 handshake: {e}"))?;
            tokio::spawn(conn);
            let body: RawBody = StreamBody::new(rx.map(data_frame as DataFrame));
            let scheme = if ep.tls { "https" } else { "http" };
            let host = if ep.host.contains(':') {
                format!("[{}]", ep.host)
            } else {
                ep.host.clone()
            };
            let uri = format!("{scheme}://{host}:{}{}", ep.port, ep.url.path());
            let req = http::Request::post(uri)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .body(body)
                .map_err(|e| e.to_string())?;
            // Not awaited here: a client must not wait for the response
            // headers before its first message.
            let pending = send.send_request(req);
            let frames = futures::stream::unfold(
                H2Read {
                    pending: Some(Box::pin(pending)),
                    body: None,
                    _send: send,
                    buf: BytesMut::new(),
                    codec: FrameCodec::new(OWN_MAX_FRAME),
                    done: false,
                },
                H2Read::next,
            );
            Tunnel {
                tx,
                rx: Box::pin(frames),
                info: TunnelInfo {
                    transport: TransportKind::Http2,
                    peer,
                },
            }
        }
        Transport::Wss => return Err("WebSocket messages are not framed".into()),
    };
    Ok(RawTunnel { tunnel, raw })
}

type Pending = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<Incoming>, hyper::Error>> + Send>,
>;

type DataFrame = fn(Bytes) -> Result<http_body::Frame<Bytes>, Infallible>;
/// The request body: raw bytes as they are handed over.
type RawBody = StreamBody<futures::stream::Map<mpsc::Receiver<Bytes>, DataFrame>>;

fn data_frame(b: Bytes) -> Result<http_body::Frame<Bytes>, Infallible> {
    Ok(http_body::Frame::data(b))
}

/// The response side of a raw HTTP/2 stream, decoded into frames.
struct H2Read {
    pending: Option<Pending>,
    body: Option<Incoming>,
    /// Held so that the connection stays open.
    _send: hyper::client::conn::http2::SendRequest<RawBody>,
    buf: BytesMut,
    codec: FrameCodec,
    done: bool,
}

type Item = Result<Frame, TransportError>;

impl H2Read {
    async fn next(mut self) -> Option<(Item, Self)> {
        loop {
            if self.done {
                return None;
            }
            if let Some(p) = self.pending.take() {
                match p.await {
                    Ok(resp) if resp.status() == http::StatusCode::OK => {
                        self.body = Some(resp.into_body())
                    }
                    Ok(resp) => {
                        self.done = true;
                        let e = format!("the server answered {}", resp.status());
                        return Some((Err(TransportError::Http2(e)), self));
                    }
                    Err(e) => {
                        self.done = true;
                        return Some((Err(e.into()), self));
                    }
                }
            }
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => return Some((Ok(f), self)),
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Some((Err(e), self));
                }
            }
            let body = self.body.as_mut()?;
            match body.frame().await {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some((Err(e.into()), self));
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => self.buf.extend_from_slice(&d),
                    Err(f) => {
                        if let Some(s) = f
                            .trailers_ref()
                            .and_then(|t| t.get("grpc-status"))
                            .filter(|s| s.as_bytes() != b"0")
                        {
                            self.done = true;
                            let e = format!(
                                "stream ended with grpc-status {}",
                                String::from_utf8_lossy(s.as_bytes())
                            );
                            return Some((Err(TransportError::Http2(e)), self));
                        }
                    }
                },
            }
        }
    }
}
