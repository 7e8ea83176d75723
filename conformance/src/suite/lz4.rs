//! The lz4 frame of docs/PROTOCOL.md §9, written here from the document (not
//! borrowed from the project's middleware) so that the suite checks the
//! server against the text, not against itself:
//!
//! ```text
//! 0x01 | original length (u16, big-endian) | lz4 block
//! ```

/// The tag of an lz4 frame.
pub(crate) const TAG_LZ4: u8 = 0x01;
/// Tag and stated length.
pub(crate) const HEADER_LEN: usize = 3;

/// Whether a binary message is an extension frame rather than an IP packet
/// (its first nibble is 0).
pub(crate) fn is_extension(msg: &[u8]) -> bool {
    msg.first().is_some_and(|b| b >> 4 == 0)
}

/// The lz4 block of `packet` (no frame header, no checksum).
pub(crate) fn block(packet: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress(packet)
}

/// A frame with any tag, stated length and block: for well-formed frames and
/// for the malformed ones [C4] is about.
pub(crate) fn frame_with(tag: u8, stated: u16, block: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + block.len());
    f.push(tag);
    f.extend_from_slice(&stated.to_be_bytes());
    f.extend_from_slice(block);
    f
}

/// The lz4 frame of `packet`, or `None` when it would not be smaller than
/// the packet (a sender then sends the packet raw, [C3]).
pub(crate) fn compress(packet: &[u8]) -> Option<Vec<u8>> {
    let stated = u16::try_from(packet.len()).ok()?;
    let f = frame_with(TAG_LZ4, stated, &block(packet));
    (f.len() < packet.len()).then_some(f)
}

/// Decodes a frame the way [C4] tells a receiver to: tag `0x01`, a stated
/// length in `1..=mtu`, and a block that decompresses to exactly that length.
pub(crate) fn decode(frame: &[u8], mtu: usize) -> Result<Vec<u8>, String> {
    let Some(&[tag, hi, lo]) = frame.get(..HEADER_LEN) else {
        return Err(format!(
            "a {}-byte frame is shorter than its header",
            frame.len()
        ));
    };
    if tag != TAG_LZ4 {
        return Err(format!("unknown tag {tag:#04x}"));
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 || len > mtu {
        return Err(format!("stated length {len} is outside 1..={mtu}"));
    }
    let mut out = vec![0u8; len];
    match lz4_flex::block::decompress_into(&frame[HEADER_LEN..], &mut out) {
        Ok(n) if n == len => Ok(out),
        Ok(n) => Err(format!("the block decompresses to {n} bytes, stated {len}")),
        Err(e) => Err(format!("corrupt lz4 block: {e}")),
    }
}

/// Whatever a lenient receiver would make of a frame: the block decompressed
/// whatever the tag and stated length say (up to 64 KiB). Used to recognise
/// a probe that a server wrongly let through inside a frame.
pub(crate) fn decode_lenient(frame: &[u8]) -> Option<Vec<u8>> {
    let block = frame.get(HEADER_LEN..)?;
    let mut out = vec![0u8; 65_536];
    let n = lz4_flex::block::decompress_into(block, &mut out).ok()?;
    out.truncate(n);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet() -> Vec<u8> {
        let mut p = vec![0x45, 0, 0x03, 0xe8];
        p.resize(1000, 0x5a);
        p
    }

    #[test]
    fn a_frame_round_trips_and_is_smaller() {
        let p = packet();
        let f = compress(&p).expect("compressible");
        assert!(f.len() < p.len());
        assert_eq!(f[0], TAG_LZ4);
        assert_eq!(u16::from_be_bytes([f[1], f[2]]), 1000);
        assert!(is_extension(&f));
        assert!(!is_extension(&p));
        assert_eq!(decode(&f, 1420).expect("decodes"), p);
    }

    #[test]
    fn an_incompressible_packet_is_not_framed() {
        let p: Vec<u8> = (0..64u8).collect();
        assert!(compress(&p).is_none());
    }

    #[test]
    fn decode_refuses_what_c4_refuses() {
        let p = packet();
        let b = block(&p);
        for bad in [
            frame_with(TAG_LZ4, 0, &b),
            frame_with(TAG_LZ4, 1001, &b),
            frame_with(TAG_LZ4, 999, &b),
            frame_with(0x02, 1000, &b),
            vec![TAG_LZ4, 0],
            frame_with(TAG_LZ4, 1000, &[0xff; 8]),
        ] {
            assert!(
                decode(&bad, 1420).is_err(),
                "{:?}",
                &bad[..3.min(bad.len())]
            );
        }
        assert!(
            decode(&frame_with(TAG_LZ4, 1000, &b), 999).is_err(),
            "above mtu"
        );
        assert_eq!(decode_lenient(&frame_with(0x02, 0, &b)), Some(p));
    }
}
