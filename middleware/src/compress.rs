//! lz4 compression of single packets, used only when negotiated.
//!
//! On the wire a compressed packet is a binary message that cannot be taken
//! for an IP packet (whose first nibble is 4 or 6):
//!
//! ```text
//! +------+----------------------+-----------------------+
//! | 0x01 | original length u16  | lz4 block             |
//! |      | (big-endian)         | (lz4_flex block form) |
//! +------+----------------------+-----------------------+
//! ```
//!
//! [`Compress`] tries only packets of at least the threshold size and keeps
//! the compressed form only when it is smaller than the packet. [`Decompress`]
//! passes raw packets through untouched, refuses any stated length above the
//! MTU before decompressing (so a hostile frame cannot make it allocate more),
//! and never writes more than the stated length. A frame that fails is a
//! counted drop ([`DropReason::DecompressFailed`]), not an error: one corrupt
//! packet does not end the session, just as a malformed IP packet does not.
//!
//! Compressing under TLS next to attacker-chosen data leaks information about
//! the rest of the data through the compressed length (CRIME, BREACH, and for
//! VPNs VORACLE against OpenVPN). That is why compression is off by default.

use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use sallyport_core::PacketBatch;
use tower_layer::Layer;
use tower_service::Service;

use crate::stats::{Direction, DropReason, StatsHandle};

/// The tag byte of an lz4-compressed packet.
pub const TAG_LZ4: u8 = 0x01;
/// Bytes before the lz4 block: the tag and the original length.
pub const HEADER_LEN: usize = 3;
/// Packets shorter than this are not tried by default: their headers
/// dominate and rarely compress.
pub const DEFAULT_THRESHOLD: usize = 128;

// Scratch space is allocated in blocks of this size and handed out as
// packets, so that compressing does not allocate once per packet.
const ARENA: usize = 64 * 1024;

/// Why a compressed frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// First nibble 0, but not a tag this side knows.
    #[error("unknown extension tag {0:#04x}")]
    UnknownTag(u8),
    /// Shorter than the header.
    #[error("compressed frame of {0} bytes is shorter than its header")]
    Truncated(usize),
    /// The stated length is zero or above the MTU.
    #[error("stated length {len} is outside 1..={mtu}")]
    BadLength {
        /// The stated original length.
        len: usize,
        /// The session's MTU.
        mtu: usize,
    },
    /// lz4 refused the block, or it did not fill exactly the stated length.
    #[error("corrupt lz4 block: {0}")]
    Corrupt(String),
}

/// Whether `frame` is a compression extension frame rather than an IP packet.
pub fn is_extension(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b >> 4 == 0)
}

/// Compresses `packet` into a frame if that makes it smaller; `arena` is
/// reusable scratch space. Packets longer than 65535 bytes are not tried.
pub fn compress_packet(packet: &[u8], arena: &mut BytesMut) -> Option<Bytes> {
    let len = u16::try_from(packet.len()).ok()?;
    let max = HEADER_LEN + lz4_flex::block::get_maximum_output_size(packet.len());
    if arena.capacity() < max {
        arena.reserve(max.max(ARENA));
    }
    arena.clear();
    arena.put_u8(TAG_LZ4);
    arena.put_u16(len);
    arena.resize(max, 0);
    let n = lz4_flex::block::compress_into(packet, &mut arena[HEADER_LEN..]).ok()?;
    if HEADER_LEN + n >= packet.len() {
        return None;
    }
    arena.truncate(HEADER_LEN + n);
    Some(arena.split().freeze())
}

/// The packet inside a frame: `Ok(None)` for a raw packet (pass it on as it
/// is), `Ok(Some(packet))` for a compressed one, `Err` for a bad frame.
pub fn decompress_packet(
    frame: &[u8],
    mtu: usize,
    arena: &mut BytesMut,
) -> Result<Option<Bytes>, CodecError> {
    if !is_extension(frame) {
        return Ok(None);
    }
    let Some(&[tag, hi, lo]) = frame.get(..HEADER_LEN) else {
        return Err(CodecError::Truncated(frame.len()));
    };
    if tag != TAG_LZ4 {
        return Err(CodecError::UnknownTag(tag));
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 || len > mtu {
        return Err(CodecError::BadLength { len, mtu });
    }
    if arena.capacity() < len {
        arena.reserve(len.max(ARENA));
    }
    arena.clear();
    arena.resize(len, 0);
    match lz4_flex::block::decompress_into(&frame[HEADER_LEN..], &mut arena[..]) {
        Ok(n) if n == len => Ok(Some(arena.split().freeze())),
        Ok(n) => Err(CodecError::Corrupt(format!(
            "decompressed to {n} bytes, stated {len}"
        ))),
        Err(e) => Err(CodecError::Corrupt(e.to_string())),
    }
}

/// Compresses the packets of each batch that get smaller (encap).
#[derive(Debug, Clone)]
pub struct CompressLayer {
    threshold: usize,
    stats: StatsHandle,
}

impl CompressLayer {
    /// Tries packets of at least `threshold` bytes; counts bytes in and out.
    pub fn new(threshold: usize, stats: StatsHandle) -> Self {
        Self { threshold, stats }
    }
}

impl<S> Layer<S> for CompressLayer {
    type Service = Compress<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Compress {
            inner,
            threshold: self.threshold,
            stats: self.stats.clone(),
            arena: BytesMut::new(),
        }
    }
}

/// See [`CompressLayer`].
#[derive(Debug)]
pub struct Compress<S> {
    inner: S,
    threshold: usize,
    stats: StatsHandle,
    arena: BytesMut,
}

impl<S> Service<PacketBatch> for Compress<S>
where
    S: Service<PacketBatch>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut batch: PacketBatch) -> Self::Future {
        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        for p in batch.iter_mut() {
            bytes_in += p.len() as u64;
            // Super-packets (PROTOCOL.md §11) go as they are: they exceed what
            // a compressed frame may state, and are mostly bulk data anyway.
            if p.len() >= self.threshold && !sallyport_core::offload::is_envelope(p) {
                if let Some(c) = compress_packet(p, &mut self.arena) {
                    *p = c;
                }
            }
            bytes_out += p.len() as u64;
        }
        self.stats
            .record_compression(Direction::Encap, bytes_in, bytes_out);
        self.inner.call(batch)
    }
}

/// Restores compressed packets; raw packets pass untouched (decap).
#[derive(Debug, Clone)]
pub struct DecompressLayer {
    mtu: usize,
    stats: StatsHandle,
}

impl DecompressLayer {
    /// Refuses anything that would decompress beyond `mtu` bytes.
    pub fn new(mtu: usize, stats: StatsHandle) -> Self {
        Self { mtu, stats }
    }
}

impl<S> Layer<S> for DecompressLayer {
    type Service = Decompress<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Decompress {
            inner,
            mtu: self.mtu,
            stats: self.stats.clone(),
            arena: BytesMut::new(),
        }
    }
}

/// See [`DecompressLayer`].
#[derive(Debug)]
pub struct Decompress<S> {
    inner: S,
    mtu: usize,
    stats: StatsHandle,
    arena: BytesMut,
}

impl<S> Service<PacketBatch> for Decompress<S>
where
    S: Service<PacketBatch>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut batch: PacketBatch) -> Self::Future {
        let (mut bytes_in, mut bytes_out, mut failed) = (0u64, 0u64, 0u64);
        let (mtu, arena) = (self.mtu, &mut self.arena);
        batch.retain_mut(|p| {
            bytes_in += p.len() as u64;
            match decompress_packet(p, mtu, arena) {
                Ok(None) => {}
                Ok(Some(plain)) => *p = plain,
                Err(_) => {
                    failed += 1;
                    return false;
                }
            }
            bytes_out += p.len() as u64;
            true
        });
        self.stats
            .record_compression(Direction::Decap, bytes_in, bytes_out);
        self.stats
            .record_drops(Direction::Decap, DropReason::DecompressFailed, failed);
        self.inner.call(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sallyport_core::ip::build_ipv4;
    use std::net::Ipv4Addr;
    use tower_test::{assert_request_eq, mock};

    const A: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);

    fn compressible(len: usize) -> Bytes {
        let payload: Vec<u8> = b"sallyport ".iter().copied().cycle().take(len).collect();
        Bytes::from(build_ipv4(A, B, 17, &payload))
    }

    fn incompressible(len: usize) -> Bytes {
        // A xorshift sequence: no repeats for lz4 to find.
        let mut x: u32 = 0x9e37_79b9;
        let payload: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        Bytes::from(build_ipv4(A, B, 17, &payload))
    }

    #[test]
    fn compressible_packets_shrink_and_round_trip() {
        let p = compressible(1000);
        let mut arena = BytesMut::new();
        let c = compress_packet(&p, &mut arena).expect("smaller");
        assert!(c.len() < p.len() / 4, "{} -> {}", p.len(), c.len());
        assert_eq!(c[0], TAG_LZ4);
        assert!(is_extension(&c) && !is_extension(&p));
        let back = decompress_packet(&c, 1420, &mut arena).expect("valid");
        assert_eq!(back, Some(p));
    }

    #[test]
    fn incompressible_packets_are_left_alone() {
        let p = incompressible(1000);
        assert_eq!(compress_packet(&p, &mut BytesMut::new()), None);
    }

    #[test]
    fn a_stated_length_above_the_mtu_is_refused_before_decompressing() {
        let p = compressible(1400);
        let c = compress_packet(&p, &mut BytesMut::new()).expect("smaller");
        assert_eq!(
            decompress_packet(&c, 1000, &mut BytesMut::new()),
            Err(CodecError::BadLength {
                len: p.len(),
                mtu: 1000
            })
        );
        // A tiny frame claiming 65535 bytes: refused without allocating them.
        let bomb = [TAG_LZ4, 0xff, 0xff, 0x1f, 0x00, 0x01, 0x00];
        let mut arena = BytesMut::new();
        assert!(matches!(
            decompress_packet(&bomb, 1420, &mut arena),
            Err(CodecError::BadLength { len: 65535, .. })
        ));
        assert!(arena.capacity() < 65535);
    }

    #[test]
    fn a_block_that_would_overflow_its_stated_length_is_refused() {
        let p = compressible(1400);
        let mut c = compress_packet(&p, &mut BytesMut::new())
            .expect("smaller")
            .to_vec();
        // Understate the length: the block holds more than that.
        c[1..3].copy_from_slice(&1000u16.to_be_bytes());
        assert!(matches!(
            decompress_packet(&c, 1420, &mut BytesMut::new()),
            Err(CodecError::Corrupt(_))
        ));
        // Overstate it: the block holds less.
        c[1..3].copy_from_slice(&1419u16.to_be_bytes());
        assert!(matches!(
            decompress_packet(&c, 1420, &mut BytesMut::new()),
            Err(CodecError::Corrupt(_))
        ));
    }

    #[test]
    fn unknown_tags_and_truncated_headers_are_refused() {
        let mut arena = BytesMut::new();
        assert_eq!(
            decompress_packet(&[0x02, 0, 10, 0], 1420, &mut arena),
            Err(CodecError::UnknownTag(0x02))
        );
        assert_eq!(
            decompress_packet(&[TAG_LZ4, 0], 1420, &mut arena),
            Err(CodecError::Truncated(2))
        );
        assert_eq!(decompress_packet(&[], 1420, &mut arena), Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn the_compress_layer_keeps_only_what_shrinks_and_counts_bytes() {
        let stats = StatsHandle::detached();
        let layer = CompressLayer::new(DEFAULT_THRESHOLD, stats.clone());
        let (mut svc, mut handle) = mock::spawn_layer::<PacketBatch, (), _>(layer);
        let small = compressible(40); // below the threshold
        let big = compressible(1000);
        let noise = incompressible(1000);
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(vec![small.clone(), big.clone(), noise.clone()].into());
        let (got, send) = handle.next_request().await.expect("request");
        send.send_response(());
        fut.await.expect("ok");
        let got: Vec<Bytes> = got.into_iter().collect();
        assert_eq!(got[0], small, "below the threshold: untouched");
        assert!(is_extension(&got[1]) && got[1].len() < big.len());
        assert_eq!(got[2], noise, "incompressible: untouched");
        let c = stats.global_counters();
        let total_in = (small.len() + big.len() + noise.len()) as u64;
        let total_out: u64 = got.iter().map(|p| p.len() as u64).sum();
        assert_eq!(c.compress_in(Direction::Encap), total_in);
        assert_eq!(c.compress_out(Direction::Encap), total_out);
    }

    #[tokio::test(start_paused = true)]
    async fn the_decompress_layer_restores_passes_raw_and_drops_bad_frames() {
        let stats = StatsHandle::detached();
        let layer = DecompressLayer::new(1420, stats.clone());
        let (mut svc, mut handle) = mock::spawn_layer::<PacketBatch, (), _>(layer);
        let big = compressible(1000);
        let c = compress_packet(&big, &mut BytesMut::new()).expect("smaller");
        let raw = incompressible(300);
        let bad = Bytes::from_static(&[TAG_LZ4, 0x05, 0x00, 0xff]);
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(vec![c.clone(), bad, raw.clone()].into());
        assert_request_eq!(handle, PacketBatch::from(vec![big.clone(), raw.clone()]))
            .send_response(());
        fut.await.expect("a bad frame is a drop, not an error");
        let g = stats.global_counters();
        assert_eq!(g.dropped(Direction::Decap, DropReason::DecompressFailed), 1);
        assert_eq!(
            g.compress_out(Direction::Decap),
            (big.len() + raw.len()) as u64
        );
    }

    #[tokio::test(start_paused = true)]
    async fn both_layers_pass_readiness_through() {
        let stats = StatsHandle::detached();
        let (mut c, mut ch) =
            mock::spawn_layer::<PacketBatch, (), _>(CompressLayer::new(128, stats.clone()));
        let (mut d, mut dh) =
            mock::spawn_layer::<PacketBatch, (), _>(DecompressLayer::new(1420, stats));
        ch.allow(0);
        dh.allow(0);
        tokio_test::assert_pending!(c.poll_ready());
        tokio_test::assert_pending!(d.poll_ready());
        ch.allow(1);
        dh.allow(1);
        tokio_test::assert_ready_ok!(c.poll_ready());
        tokio_test::assert_ready_ok!(d.poll_ready());
    }

    proptest! {
        #[test]
        fn any_packet_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..1400), repeat in 1usize..8) {
            let payload: Vec<u8> = payload.iter().copied().cycle().take(payload.len() * repeat).take(1380).collect();
            let p = Bytes::from(build_ipv4(A, B, 6, &payload));
            let mut arena = BytesMut::new();
            let wire = compress_packet(&p, &mut arena).unwrap_or_else(|| p.clone());
            prop_assert!(wire.len() <= p.len());
            let back = decompress_packet(&wire, 1420, &mut arena).expect("valid");
            prop_assert_eq!(back.unwrap_or(wire), p);
        }

        #[test]
        fn garbage_frames_never_panic_nor_exceed_the_mtu(frame in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut arena = BytesMut::new();
            if let Ok(Some(p)) = decompress_packet(&frame, 576, &mut arena) {
                prop_assert!(p.len() <= 576);
            }
        }
    }
}
