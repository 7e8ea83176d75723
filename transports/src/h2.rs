//! The HTTP/2 transport: one bidirectional stream per session, shaped as a
//! gRPC bidirectional stream (POST to the tunnel path, `content-type:
//! application/grpc`, gRPC length-prefixed messages, trailers at the end), so
//! that it passes nginx `grpc_pass` and CDNs that carry gRPC.
//!
//! Flow control: hyper releases the stream's receive window as the body is
//! read, so a session moves any amount of data through a window of any size.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Sink, Stream};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::StreamBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::connect::Connector;
use crate::framing::{encode_frame, ChunkDecoder};
use crate::{Dial, Frame, ReceiverStream, TransportError, TransportKind, Tunnel, TunnelInfo};

/// The content type of a gRPC request and response.
pub const GRPC_CONTENT_TYPE: &str = "application/grpc";
/// Receive window per stream: large enough for a fast single stream.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Receive window per connection.
pub const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// The largest DATA frame we take (SETTINGS_MAX_FRAME_SIZE): a 64 KiB
/// super-packet in one frame instead of the default 16 KiB's five.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Bytes encoded before a flush is forced.
const FLUSH_AT: usize = 256 * 1024;

type BodyItem = Result<http_body::Frame<Bytes>, Infallible>;
/// The body we send: chunks handed over by a [`Tunnel`]'s sink.
pub type OutBody = StreamBody<ReceiverStream<BodyItem>>;

/// Whether `req` asks for a gRPC-shaped tunnel stream.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::POST
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(GRPC_CONTENT_TYPE))
}

/// Server side: turns an accepted gRPC request into the response to send and
/// the [`Tunnel`] that reads the request body and writes the response body.
pub fn accept(
    req: Request<Incoming>,
    info: TunnelInfo,
    max_frame: usize,
) -> (Response<OutBody>, Tunnel) {
    let (tx, body) = out_body();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let tunnel = Tunnel {
        tx: Box::pin(BodySink::new(tx, max_frame, Some(trailers))),
        rx: Box::pin(BodyStream::new(req.into_body(), max_frame)),
        info,
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(GRPC_CONTENT_TYPE),
    );
    (resp, tunnel)
}

fn out_body() -> (mpsc::Sender<BodyItem>, OutBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, StreamBody::new(ReceiverStream::new(rx)))
}

/// Encodes frames into one buffer and hands it to the body on flush.
struct BodySink {
    buf: BytesMut,
    tx: PollSender<BodyItem>,
    max_frame: usize,
    trailers: Option<HeaderMap>,
}

impl BodySink {
    fn new(tx: mpsc::Sender<BodyItem>, max_frame: usize, trailers: Option<HeaderMap>) -> Self {
        Self {
            buf: BytesMut::with_capacity(64 * 1024),
            tx: PollSender::new(tx),
            max_frame,
            trailers,
        }
    }
}

impl Sink<Frame> for BodySink {
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.buf.len() >= FLUSH_AT {
            return self.poll_flush(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Frame) -> Result<(), Self::Error> {
        if item.len() > self.max_frame {
            return Err(TransportError::Protocol(format!(
                "frame of {} bytes exceeds the {}-byte limit",
                item.len(),
                self.max_frame
            )));
        }
        encode_frame(&item, &mut self.get_mut().buf);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.tx.poll_reserve(cx)).map_err(|_| TransportError::Closed)?;
        let chunk = this.buf.split().freeze();
        this.tx
            .send_item(Ok(http_body::Frame::data(chunk)))
            .map_err(|_| TransportError::Closed)?;
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready!(self.as_mut().poll_flush(cx))?;
        let this = self.get_mut();
        if this.trailers.is_some() {
            ready!(this.tx.poll_reserve(cx)).map_err(|_| TransportError::Closed)?;
            if let Some(t) = this.trailers.take() {
                this.tx
                    .send_item(Ok(http_body::Frame::trailers(t)))
                    .map_err(|_| TransportError::Closed)?;
            }
        }
        this.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// Decodes frames from a received body; frames whole inside a DATA frame
/// are not copied ([`ChunkDecoder`]).
struct BodyStream<B> {
    body: B,
    frames: ChunkDecoder,
    done: bool,
}

impl<B> BodyStream<B> {
    fn new(body: B, max_frame: usize) -> Self {
        Self {
            body,
            frames: ChunkDecoder::new(max_frame),
            done: false,
        }
    }
}

impl<B> Stream for BodyStream<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<TransportError>,
{
    type Item = Result<Frame, TransportError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.frames.next_frame() {
                Ok(Some(f)) => return Poll::Ready(Some(Ok(f))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    this.frames.clear();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.done {
                if this.frames.has_partial() {
                    this.frames.clear();
                    return Poll::Ready(Some(Err(TransportError::Protocol(
                        "stream ended inside a frame".into(),
                    ))));
                }
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => this.done = true,
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.frames.push(data),
                    Err(frame) => {
                        if let Some(status) = frame
                            .trailers_ref()
                            .and_then(|t| t.get("grpc-status"))
                            .filter(|s| s.as_bytes() != b"0")
                        {
                            this.done = true;
                            return Poll::Ready(Some(Err(TransportError::Http2(format!(
                                "stream ended with grpc-status {}",
                                String::from_utf8_lossy(status.as_bytes())
                            )))));
                        }
                    }
                },
            }
        }
    }
}

/// Dials HTTP/2 tunnels: over TLS with ALPN `h2`, or h2c (prior knowledge)
/// for a cleartext URL.
pub struct H2Dialer {
    connector: Connector,
    uri: http::Uri,
    max_frame: usize,
    timeout: Duration,
}

impl H2Dialer {
    /// A dialer that POSTs to `path` on the server `connector` reaches;
    /// `authority` is the `:authority` to send (the URL's host, or the
    /// configured host header).
    pub fn new(
        connector: Connector,
        authority: &str,
        path: &str,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let scheme = if connector.is_tls() { "https" } else { "http" };
        let uri: http::Uri = format!("{scheme}://{authority}{path}").parse().map_err(
            |e: http::uri::InvalidUri| TransportError::InvalidUrl {
                url: format!("{scheme}://{authority}{path}"),
                reason: e.to_string(),
            },
        )?;
        Ok(Self {
            connector,
            uri,
            max_frame,
            timeout,
        })
    }

    async fn dial_inner(&self) -> Result<Tunnel, TransportError> {
        let (io, peer, alpn) = self.connector.connect(b"h2").await?;
        if self.connector.is_tls() && alpn.as_deref() != Some(b"h2") {
            return Err(TransportError::Http2(format!(
                "{}:{} did not negotiate h2 via ALPN",
                self.connector.host, self.connector.port
            )));
        }
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| TransportError::Http2(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http/2 connection ended");
            }
        });
        let (tx, body) = out_body();
        let req = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, GRPC_CONTENT_TYPE)
            .header(header::TE, "trailers")
            .header(
                header::USER_AGENT,
                concat!("grpc-sallyport/", env!("CARGO_PKG_VERSION")),
            )
            .body(body)
            .map_err(|e| TransportError::Http2(e.to_string()))?;
        // Do not wait for the response headers: some fronts (nginx grpc_pass)
        // send them only with the first response data, which comes after our
        // first message. The body stream checks them when it first reads.
        let uri_path = self.uri.path().to_string();
        // Dispatched now (hyper queues the stream when send_request is
        // called); the handle rides along so the connection stays open.
        let pending = send.send_request(req);
        let response: ResponseFuture = Box::pin(async move {
            let resp = pending
                .await
                .map_err(|e| TransportError::Http2(format!("request: {e}")))?;
            check_response(&resp, &uri_path)?;
            Ok((resp.into_body(), send))
        });
        Ok(Tunnel {
            tx: Box::pin(BodySink::new(tx, self.max_frame, None)),
            rx: Box::pin(BodyStream::new(LazyBody::Waiting(response), self.max_frame)),
            info: TunnelInfo {
                transport: TransportKind::Http2,
                peer,
            },
        })
    }
}

fn check_response<B>(resp: &Response<B>, path: &str) -> Result<(), TransportError> {
    let status = resp.status();
    let grpc = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(GRPC_CONTENT_TYPE));
    if status != StatusCode::OK || !grpc {
        return Err(TransportError::Http2(format!(
            "server answered {status} (content-type {:?}) instead of a gRPC stream at {path}",
            resp.headers().get(header::CONTENT_TYPE),
        )));
    }
    if let Some(s) = resp
        .headers()
        .get("grpc-status")
        .filter(|s| s.as_bytes() != b"0")
    {
        return Err(TransportError::Http2(format!(
            "server refused the stream: grpc-status {}",
            String::from_utf8_lossy(s.as_bytes())
        )));
    }
    Ok(())
}

type ResponseFuture = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    (Incoming, hyper::client::conn::http2::SendRequest<OutBody>),
                    TransportError,
                >,
            > + Send,
    >,
>;

/// The response body, once the response headers have arrived and passed
/// [`check_response`].
enum LazyBody {
    Waiting(ResponseFuture),
    /// The request handle is held only to keep the connection open.
    Body(
        Incoming,
        #[allow(dead_code)] hyper::client::conn::http2::SendRequest<OutBody>,
    ),
}

impl Body for LazyBody {
    type Data = Bytes;
    type Error = TransportError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, TransportError>>> {
        let this = self.get_mut();
        loop {
            match this {
                LazyBody::Waiting(fut) => match ready!(fut.as_mut().poll(cx)) {
                    Ok((body, send)) => *this = LazyBody::Body(body, send),
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
                LazyBody::Body(b, _) => return Pin::new(b).poll_frame(cx).map_err(Into::into),
            }
        }
    }
}

impl Dial for H2Dialer {
    fn kind(&self) -> TransportKind {
        TransportKind::Http2
    }

    fn dial(&self) -> futures::future::BoxFuture<'_, Result<Tunnel, TransportError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.dial_inner())
                .await
                .map_err(|_| TransportError::Timeout("http/2 connect"))?
        })
    }
}
