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

impl FrameCodec {
    /// The length of the message (kind byte and payload) whose prefix starts
    /// `src`, once the 5 prefix bytes are there; refuses what no peer of ours
    /// sends.
    fn message_len(&self, src: &[u8]) -> Result<Option<usize>, TransportError> {
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
        Ok(Some(len))
    }

    /// How many more bytes the frame that starts `src` needs (the rest of
    /// its prefix first); 0 when it is whole.
    pub fn missing(&self, src: &[u8]) -> Result<usize, TransportError> {
        Ok(match self.message_len(src)? {
            None => 5 - src.len(),
            Some(len) => (5 + len).saturating_sub(src.len()),
        })
    }

    /// Decodes the frame at the front of `src` without copying it: the
    /// payload is a slice of `src`'s buffer. `None` while it is not whole.
    pub fn decode_bytes(&self, src: &mut Bytes) -> Result<Option<Frame>, TransportError> {
        let Some(len) = self.message_len(src)? else {
            return Ok(None);
        };
        if src.len() < 5 + len {
            return Ok(None);
        }
        src.advance(5);
        frame_from(src.split_to(len)).map(Some)
    }
}

/// A frame from its message: the kind byte, then the payload.
fn frame_from(mut msg: Bytes) -> Result<Frame, TransportError> {
    let kind = msg[0];
    msg.advance(1);
    match kind {
        KIND_CONTROL => Ok(Frame::Control(msg)),
        KIND_PACKET => Ok(Frame::Packet(msg)),
        k => Err(TransportError::Protocol(format!(
            "unknown frame kind {k:#04x}"
        ))),
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = TransportError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        let Some(len) = self.message_len(src)? else {
            return Ok(None);
        };
        if src.len() < 5 + len {
            src.reserve(5 + len - src.len());
            return Ok(None);
        }
        src.advance(5);
        frame_from(src.split_to(len).freeze()).map(Some)
    }
}

/// Decodes frames from a stream that arrives in chunks (HTTP/2 DATA frames):
/// frames whole inside a chunk are sliced out of it without a copy; only a
/// frame split across chunks is put together in a buffer of its own.
#[derive(Debug)]
pub struct ChunkDecoder {
    codec: FrameCodec,
    /// The start of a frame that the chunks so far did not complete.
    partial: BytesMut,
    /// What is left of the latest chunk.
    chunk: Bytes,
}

impl ChunkDecoder {
    /// A decoder for frames of at most `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            codec: FrameCodec::new(max_payload),
            partial: BytesMut::new(),
            chunk: Bytes::new(),
        }
    }

    /// Takes the next chunk; call only once [`ChunkDecoder::next_frame`]
    /// has answered `None`.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(self.chunk.is_empty(), "the previous chunk is decoded");
        self.chunk = chunk;
    }

    /// The next whole frame, or `None` until another chunk is pushed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if !self.partial.is_empty() {
                if let Some(f) = self.codec.decode(&mut self.partial)? {
                    return Ok(Some(f));
                }
                if self.chunk.is_empty() {
                    return Ok(None);
                }
                // Copy over only what completes this frame (or its prefix).
                let n = self.codec.missing(&self.partial)?.min(self.chunk.len());
                self.partial.extend_from_slice(&self.chunk.split_to(n));
                continue;
            }
            if self.chunk.is_empty() {
                return Ok(None);
            }
            if let Some(f) = self.codec.decode_bytes(&mut self.chunk)? {
                return Ok(Some(f));
            }
            // A frame that goes on in the next chunk.
            self.partial.extend_from_slice(&self.chunk);
            self.chunk.clear();
        }
    }

    /// Whether bytes of an unfinished frame are held.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty() || !self.chunk.is_empty()
    }

    /// Forgets everything held (after an error).
    pub fn clear(&mut self) {
        self.partial.clear();
        self.chunk.clear();
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

    /// A control message, packets of several sizes and an empty one.
    fn sample_frames() -> Vec<Frame> {
        vec![
            Frame::Control(Bytes::from_static(br#"{"type":"ping"}"#)),
            Frame::Packet(Bytes::from(vec![0x45; 1420])),
            Frame::Packet(Bytes::from_static(b"")),
            Frame::Packet(Bytes::from(vec![0x46; 3000])),
        ]
    }

    #[test]
    fn control_and_packet_round_trip_in_any_chunking() {
        let frames = sample_frames();
        for chunk in [1, 2, 5, 6, 7, 100, 5000] {
            assert_eq!(roundtrip(&frames, chunk), frames, "chunk {chunk}");
        }
    }

    #[test]
    fn chunk_decoder_gives_the_same_frames_in_any_chunking_and_slices_whole_ones() {
        let frames = sample_frames();
        let mut wire = BytesMut::new();
        for f in &frames {
            encode_frame(f, &mut wire);
        }
        let wire = wire.freeze();
        for chunk in [1, 2, 5, 6, 7, 100, 1500, 5000] {
            let mut d = ChunkDecoder::new(70_000);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(wire.slice_ref(piece));
                while let Some(f) = d.next_frame().expect("decode") {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "chunk {chunk}");
            assert!(!d.has_partial(), "chunk {chunk}: nothing left over");
        }
        // In one chunk, every payload points into the chunk itself.
        let mut d = ChunkDecoder::new(70_000);
        d.push(wire.clone());
        let range = wire.as_ptr_range();
        while let Some(f) = d.next_frame().expect("decode") {
            let p = match &f {
                Frame::Control(b) | Frame::Packet(b) => b.as_ptr(),
            };
            assert!(range.contains(&p) || range.end == p, "a copy: {f:?}");
        }
    }

    #[test]
    fn chunk_decoder_refuses_what_the_codec_refuses() {
        let mut d = ChunkDecoder::new(100);
        d.push(Bytes::from_static(&[0, 0, 0, 0, 102]));
        assert!(d
            .next_frame()
            .expect_err("over the limit")
            .is_frame_too_large());
        let mut d = ChunkDecoder::new(100);
        d.push(Bytes::from_static(&[0, 0]));
        assert!(d.next_frame().expect("partial").is_none());
        d.push(Bytes::from_static(&[0, 0, 2, 9, 0]));
        assert!(d.next_frame().is_err(), "unknown kind across chunks");
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
