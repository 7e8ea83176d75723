//! The checks behind Sallyport's fuzz targets, one function per parser of
//! network input. Each feeds untrusted bytes to the real entry point and
//! asserts the invariants that are cheap to check (no output above the limit,
//! decode → encode → decode gives the same value). A panic is a finding.
//!
//! The fuzz targets in `fuzz_targets/` call these; the workspace test
//! `conformance/tests/fuzz_corpus.rs` includes this file and `net.rs` and
//! replays the seed corpora (and every crash input kept there) through the
//! same functions, so plain `cargo test` covers them without a fuzzer.
//!
//! The transport and handshake checks (`net.rs`) need the transports and the
//! server, whose instrumented build is large; the `net` feature (on by
//! default) brings them in, and without it the core targets build alone.

use std::cell::RefCell;

use bytes::BytesMut;
use sallyport_core::ip::{build_ipv4, build_ipv6, IpHeader};
use sallyport_core::message::{Control, MAX_CONTROL_LEN};
use sallyport_core::Frame;
use sallyport_middleware::compress::{compress_packet, decompress_packet, is_extension};

#[cfg(feature = "net")]
mod net;
#[cfg(feature = "net")]
pub use net::{framing_decode, framing_stream, server_handshake, ws_messages};

/// The tunnel MTU the checks use (the server's default).
pub const MTU: usize = 1420;
/// The largest frame payload accepted. Smaller than the server's default so
/// that short fuzz inputs reach the limit.
pub const MAX_FRAME: usize = 2048;

/// What a session does with a frame once the transport has produced it: a
/// control message is decoded, a packet is decompressed if it is an
/// extension frame and its IP header is read.
#[doc(hidden)]
pub fn after_transport(frame: &Frame) {
    assert!(frame.len() <= MAX_FRAME, "frame of {} bytes", frame.len());
    match frame {
        Frame::Control(b) => control_json(b),
        Frame::Packet(p) => lz4_decompress(p),
    }
}

/// Control JSON (`Control::decode`): anything it accepts re-encodes and
/// decodes to the same message.
pub fn control_json(data: &[u8]) {
    let Ok(msg) = Control::decode(data) else {
        return;
    };
    let wire = msg.encode();
    if wire.len() <= MAX_CONTROL_LEN {
        let again = Control::decode(&wire).expect("an encoded message decodes");
        assert_eq!(again, msg, "round trip changes the message");
    }
}

/// IP header views: accepted headers lie within the packet, and a packet
/// rebuilt from the fields parses to the same addresses and protocol.
pub fn ip_header(data: &[u8]) {
    let Ok(h) = IpHeader::parse(data) else {
        return;
    };
    assert_eq!(h.version(), data[0] >> 4);
    assert!(
        h.total_len() <= data.len(),
        "total length beyond the packet"
    );
    let rebuilt = match h {
        IpHeader::V4(v4) => {
            assert!((20..=60).contains(&v4.header_len) && v4.header_len <= v4.total_len);
            build_ipv4(
                v4.src,
                v4.dst,
                v4.protocol,
                &data[v4.header_len..v4.total_len],
            )
        }
        IpHeader::V6(v6) => {
            assert!(v6.total_len >= 40);
            build_ipv6(v6.src, v6.dst, v6.next_header, &data[40..v6.total_len])
        }
    };
    let again = IpHeader::parse(&rebuilt).expect("a built packet parses");
    assert_eq!((again.src(), again.dst()), (h.src(), h.dst()));
    match (again, h) {
        (IpHeader::V4(a), IpHeader::V4(b)) => assert_eq!(a.protocol, b.protocol),
        (IpHeader::V6(a), IpHeader::V6(b)) => assert_eq!(a.next_header, b.next_header),
        _ => panic!("version changed on a rebuild"),
    }
}

thread_local! {
    // The middleware keeps one arena per session; so do the checks, so that
    // state left over from one frame meets the next.
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// lz4 decompression as the decap middleware does it, bounded by the MTU:
/// raw packets pass, a decompressed packet has exactly its stated length (at
/// most the MTU), and recompressing it gives it back.
pub fn lz4_decompress(data: &[u8]) {
    ARENA.with_borrow_mut(|arena| match decompress_packet(data, MTU, arena) {
        Ok(None) => {
            assert!(!is_extension(data));
            ip_header(data);
        }
        Ok(Some(p)) => {
            assert!(is_extension(data));
            assert!(!p.is_empty() && p.len() <= MTU, "{} bytes", p.len());
            assert_eq!(p.len(), usize::from(u16::from_be_bytes([data[1], data[2]])));
            ip_header(&p);
            if let Some(c) = compress_packet(&p, arena) {
                let back = decompress_packet(&c, MTU, arena)
                    .expect("own output decompresses")
                    .expect("own output is an extension frame");
                assert_eq!(back, p, "round trip changes the packet");
            }
        }
        Err(_) => assert!(is_extension(data)),
    });
}
