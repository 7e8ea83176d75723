//! The checks of the transports' framing and of the server's handshake; see
//! the crate docs.

use std::io::Cursor;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use sallyport_core::message::{Control, Token};
use sallyport_core::Frame;
use sallyport_transports::framing::{encode_frame, ChunkDecoder, FrameCodec};
use sallyport_transports::{TransportKind, TunnelInfo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::codec::Decoder;

use crate::{after_transport, MAX_FRAME};

/// Decodes frames from `buf` until it needs more bytes or fails; returns the
/// frames, whether it failed, and checks the buffer never grew towards a
/// claimed length (only up to the limit).
fn decode_all(
    codec: &mut FrameCodec,
    buf: &mut BytesMut,
    fed: usize,
    out: &mut Vec<Frame>,
) -> bool {
    loop {
        match codec.decode(buf) {
            Ok(Some(f)) => out.push(f),
            Ok(None) => {
                // A hostile length must not be allocated up front: the buffer
                // grows by at most one frame of the largest allowed size.
                let bound = 2 * (fed + MAX_FRAME + 6) + 64;
                assert!(
                    buf.capacity() <= bound,
                    "buffer capacity {} after {fed} bytes fed (bound {bound})",
                    buf.capacity()
                );
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut wire = BytesMut::new();
    for f in frames {
        encode_frame(f, &mut wire);
    }
    wire
}

/// Raw-TLS / gRPC length framing, the whole input at once. The frames decoded
/// re-encode to exactly the bytes they were decoded from.
pub fn framing_decode(data: &[u8]) {
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    decode_all(&mut codec, &mut buf, data.len(), &mut frames);
    let wire = encode_all(&frames);
    assert_eq!(&wire[..], &data[..wire.len()], "re-encoding differs");
    frames.iter().for_each(after_transport);
}

/// The same framing fed in chunks whose sizes come from the first 8 bytes of
/// the input: the decoder must give the same frames, the same verdict and
/// leave the same bytes as when it gets the stream at once.
pub fn framing_stream(data: &[u8]) {
    let (plan, stream) = data.split_at(data.len().min(8));
    let sizes: Vec<usize> = if plan.is_empty() {
        vec![1]
    } else {
        plan.iter().map(|&b| usize::from(b) + 1).collect()
    };

    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut chunked = Vec::new();
    let (mut fed, mut failed) = (0, false);
    for size in sizes.iter().cycle() {
        if fed >= stream.len() {
            break;
        }
        let end = (fed + size).min(stream.len());
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        if decode_all(&mut codec, &mut buf, fed, &mut chunked) {
            failed = true;
            break;
        }
    }

    let mut whole_buf = BytesMut::from(stream);
    let mut whole = Vec::new();
    let whole_failed = decode_all(
        &mut FrameCodec::new(MAX_FRAME),
        &mut whole_buf,
        stream.len(),
        &mut whole,
    );
    assert_eq!(chunked, whole, "chunked decoding gives other frames");
    assert_eq!(
        failed, whole_failed,
        "chunked decoding gives another verdict"
    );
    if !failed {
        assert_eq!(buf.len(), whole_buf.len(), "different bytes left over");
    }

    // The HTTP/2 body's decoder, given the same chunks, agrees.
    let mut h2 = ChunkDecoder::new(MAX_FRAME);
    let (mut h2_frames, mut h2_failed, mut at) = (Vec::new(), false, 0);
    'feed: for size in sizes.iter().cycle() {
        if at >= stream.len() {
            break;
        }
        let end = (at + size).min(stream.len());
        h2.push(Bytes::copy_from_slice(&stream[at..end]));
        at = end;
        loop {
            match h2.next_frame() {
                Ok(Some(f)) => h2_frames.push(f),
                Ok(None) => break,
                Err(_) => {
                    h2_failed = true;
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(h2_frames, whole, "chunk decoding gives other frames");
    assert_eq!(
        h2_failed, whole_failed,
        "chunk decoding gives another verdict"
    );
    let wire = encode_all(&chunked);
    assert_eq!(&wire[..], &stream[..wire.len()], "re-encoding differs");
}

/// An in-memory socket: reads the input, appends what is written to `out`.
struct MemIo {
    input: Cursor<Vec<u8>>,
    out: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for MemIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.input).poll_read(cx, buf)
    }
}

impl AsyncWrite for MemIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.out
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

fn ws_tunnel(input: Vec<u8>, role: Role) -> (sallyport_transports::Tunnel, Arc<Mutex<Vec<u8>>>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let io = MemIo {
        input: Cursor::new(input),
        out: out.clone(),
    };
    let cfg = sallyport_transports::ws::websocket_config(MAX_FRAME);
    let ws = runtime().block_on(WebSocketStream::from_raw_socket(io, role, Some(cfg)));
    let info = TunnelInfo {
        transport: TransportKind::WebSocket,
        peer: None,
    };
    (sallyport_transports::ws::into_tunnel(ws, info), out)
}

/// Reads frames as the server does from bytes a client sent.
fn ws_server_frames(input: Vec<u8>) -> Vec<Frame> {
    let (mut tunnel, _) = ws_tunnel(input, Role::Server);
    runtime().block_on(async {
        let mut frames = Vec::new();
        while let Some(Ok(f)) = tunnel.rx.next().await {
            frames.push(f);
        }
        frames
    })
}

/// WebSocket messages from a client mapped to frames (text = control, binary
/// = packet, which may be a compression extension frame; ping, pong and raw
/// frames are not frames). Control frames are UTF-8; the frames, sent again
/// by a client, are read back unchanged.
pub fn ws_messages(data: &[u8]) {
    let frames = ws_server_frames(data.to_vec());
    for f in &frames {
        if let Frame::Control(b) = f {
            assert!(std::str::from_utf8(b).is_ok(), "control frame is not utf-8");
        }
        after_transport(f);
    }
    if frames.is_empty() {
        return;
    }
    let (mut client, out) = ws_tunnel(Vec::new(), Role::Client);
    runtime().block_on(async {
        for f in &frames {
            client
                .tx
                .feed(f.clone())
                .await
                .expect("client encodes a frame it was given");
        }
        client.tx.flush().await.expect("flush to memory");
    });
    let wire = out.lock().expect("not poisoned").clone();
    assert_eq!(
        ws_server_frames(wire),
        frames,
        "frames change on a round trip"
    );
}

/// The server's handshake: the first frame of a connection (first input byte
/// picks control or packet). An accepted one is an `auth` or `reconnect`
/// with a known token; every refusal is answered.
pub fn server_handshake(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let payload = Bytes::copy_from_slice(rest);
    let frame = if kind & 1 == 0 {
        Frame::Control(payload)
    } else {
        Frame::Packet(payload)
    };
    let tokens = [Token::new("fuzz-token"), Token::new("second-token")];
    let credentials = tokens
        .each_ref()
        .map(|t| sallyport_server::config::Credential::plain(t.expose()));
    match sallyport_server::session::parse_hello(&credentials, frame) {
        Ok(hello) => {
            assert_eq!(kind & 1, 0, "a packet was taken for auth");
            assert!(hello.token < tokens.len());
            assert!(hello
                .client_id
                .as_ref()
                .is_none_or(|c| (1..=128).contains(&c.len())));
            match Control::decode(rest).expect("accepted, so it decodes") {
                Control::Auth(a) => assert_eq!(&a.token, &tokens[hello.token]),
                Control::Reconnect(r) => {
                    assert_eq!(&r.token, &tokens[hello.token]);
                    assert_eq!(hello.previous, Some(r.previous_ip));
                }
                other => panic!("accepted a {} message", other.kind()),
            }
        }
        Err(refusal) => assert!(refusal.reply().is_some(), "{refusal:?} sends no answer"),
    }
}
