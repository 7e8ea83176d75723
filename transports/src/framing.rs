//! Length-prefixed framing for the stream transports (raw TLS and HTTP/2).
//!
//! Every frame is a gRPC message: a 5-byte prefix (compressed flag `0`, then
//! the message length as a big-endian u32) and the message, whose first byte
//! says what it carries (`0x01` control message, `0x02` packet) and whose rest
//! is the payload. Raw TLS uses exactly the same bytes, so one codec serves both
//! and the HTTP/2 stream is a valid gRPC bidirectional stream.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{Frame, TransportError};

/// Bytes before the payload: gRPC prefix (5) and the kind byte (1).
pub const HEADER_LEN: usize = 6;
const KIND_CONTROL: u8 = 0x01;
const KIND_PACKET: u8 = 0x02;

/// Encodes and decodes [`Frame`]s; refuses frames whose payload exceeds
/// `max_payload`.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_payload: usize,
}

impl FrameCodec {
    /// A codec accepting payloads of at most `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self { max_payload }
    }
}

/// A frame's prefix (gRPC prefix and kind byte) and its payload.
pub fn frame_prefix(frame: Frame) -> ([u8; HEADER_LEN], Bytes) {
    let (kind, payload) = match frame {
        Frame::Control(b) => (KIND_CONTROL, b),
        Frame::Packet(b) => (KIND_PACKET, b),
    };
    // Payloads are bounded by the transport's frame limit, far below 4 GiB.
    let [a, b, c, d] = ((payload.len() + 1) as u32).to_be_bytes();
    ([0, a, b, c, d, kind], payload)
}

/// Appends one encoded frame to `dst`.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) {
    let (prefix, payload) = frame_prefix(frame.clone());
    dst.reserve(HEADER_LEN + payload.len());
    dst.extend_from_slice(&prefix);
    dst.extend_from_slice(&payload);
}

impl Encoder<Frame> for FrameCodec {
    type Error = TransportError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        if frame.len() > self.max_payload {
            return Err(TransportError::Protocol(format!(
                "frame of {} bytes exceeds the {}-byte limit",
                frame.len(),
                self.max_payload
            )));
        }
        encode_frame(&frame, dst);
        Ok(())
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = TransportError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if src.len() < 5 {
            return Ok(None);
        }
        let flag = src[0];
        if flag != 0 {
            return Err(TransportError::Protocol(format!(
                "unsupported grpc message flag {flag:#04x} (compressed messages are not used)"
            )));
        }
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        if len == 0 {
            return Err(TransportError::Protocol("empty frame".into()));
        }
        if len - 1 > self.max_payload {
            return Err(TransportError::FrameTooLarge {
                len: len - 1,
                limit: self.max_payload,
            });
        }
        if src.len() < 5 + len {
            src.reserve(5 + len - src.len());
            return Ok(None);
        }
        src.advance(5);
        let mut msg = src.split_to(len);
        let kind = msg[0];
        msg.advance(1);
        let payload: Bytes = msg.freeze();
        match kind {
            KIND_CONTROL => Ok(Some(Frame::Control(payload))),
            KIND_PACKET => Ok(Some(Frame::Packet(payload))),
            k => Err(TransportError::Protocol(format!(
                "unknown frame kind {k:#04x}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(frames: &[Frame], chunk: usize) -> Vec<Frame> {
        let mut codec = FrameCodec::new(70_000);
        let mut wire = BytesMut::new();
        for f in frames {
            codec.encode(f.clone(), &mut wire).expect("encode");
        }
        let mut got = Vec::new();
        let mut buf = BytesMut::new();
        for piece in wire.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(f) = codec.decode(&mut buf).expect("decode") {
                got.push(f);
            }
        }
        assert!(buf.is_empty(), "no leftover bytes");
        got
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_as_too_large_from_its_prefix() {
        let mut codec = FrameCodec::new(100);
        let mut src = BytesMut::from(&[0u8, 0, 0, 0, 102, 0x02][..]);
        let e = codec.decode(&mut src).expect_err("over the limit");
        assert!(e.is_frame_too_large(), "{e}");
        assert!(
            src.capacity() < 1000,
            "nothing reserved for the stated length"
        );
        let mut ok = BytesMut::from(&[0u8, 0, 0, 0, 101, 0x02][..]);
        assert!(codec.decode(&mut ok).expect("within the limit").is_none());
    }

    #[test]
    fn control_and_packet_round_trip_in_any_chunking() {
        let frames = vec![
            Frame::Control(Bytes::from_static(br#"{"type":"ping"}"#)),
            Frame::Packet(Bytes::from(vec![0x45; 1420])),
            Frame::Packet(Bytes::from_static(b"")),
        ];
        for chunk in [1, 2, 5, 6, 7, 100, 5000] {
            assert_eq!(roundtrip(&frames, chunk), frames, "chunk {chunk}");
        }
    }

    #[test]
    fn layout_is_a_grpc_message() {
        let mut wire = BytesMut::new();
        encode_frame(&Frame::Packet(Bytes::from_static(b"abc")), &mut wire);
        assert_eq!(&wire[..], &[0, 0, 0, 0, 4, 2, b'a', b'b', b'c']);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 0x10, 0, 0, 2][..]);
        assert!(codec.decode(&mut buf).is_err());
    }

    #[test]
    fn bad_flag_kind_and_empty_are_refused() {
        let mut codec = FrameCodec::new(100);
        for bad in [
            &[1u8, 0, 0, 0, 2, 2, 0][..],
            &[0, 0, 0, 0, 2, 9, 0],
            &[0, 0, 0, 0, 0],
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(codec.decode(&mut buf).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn encoder_refuses_oversized_frames() {
        let mut codec = FrameCodec::new(10);
        let mut buf = BytesMut::new();
        assert!(codec
            .encode(Frame::Packet(Bytes::from(vec![0; 11])), &mut buf)
            .is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut codec = FrameCodec::new(1000);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }

        #[test]
        fn any_frames_round_trip(payloads in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..2000)), 0..20), chunk in 1usize..3000) {
            let frames: Vec<Frame> = payloads.into_iter().map(|(c, p)| if c { Frame::Control(p.into()) } else { Frame::Packet(p.into()) }).collect();
            prop_assert_eq!(roundtrip(&frames, chunk), frames);
        }
    }
}
