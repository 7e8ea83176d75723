//! Segmentation offload: TCP (and UDP) super-packets carried whole.
//!
//! A Linux TUN device opened with offload hands out TCP "super-packets" of up
//! to 64 KiB, one IP header for many segments, and takes them back the same
//! way: the kernel cuts them into MTU-sized segments (or hands them whole to a
//! local socket) only at the far end. Our stream transports have no MTU, so
//! when both ends agree in the handshake (`"offload":["gso"]`, PROTOCOL.md §11)
//! such a packet crosses the tunnel as one frame instead of forty-five.
//!
//! On the packet path a super-packet is an *envelope*: the IP packet with a
//! 4-byte extension header in front, whose first byte (`0x02`) has a high nibble
//! of 0 so that it can never be taken for an IP packet:
//!
//! | byte 0 | byte 1                           | bytes 2–3                | rest      |
//! |--------|----------------------------------|--------------------------|-----------|
//! | `0x02` | kind: 1 TCPv4, 4 TCPv6, 5 UDP, \| 0x80 ECN | segment size (u16, BE) | IP packet |
//!
//! The kinds are Linux's `VIRTIO_NET_HDR_GSO_*` values. Everything else the
//! receiving kernel needs (header length, checksum offsets) follows from the
//! packet itself, and is recomputed here rather than trusted. The transport
//! checksum of a super-packet is partial (the pseudo-header sum only), as the
//! kernel hands it out and expects it back.

use std::fmt;

/// Extension tag of an envelope (the compression extension uses `0x01`).
pub const TAG_GSO: u8 = 0x02;

/// Bytes in front of the IP packet.
pub const HEADER_LEN: usize = 4;

/// The offload name offered and accepted in the handshake.
pub const OFFLOAD_GSO: &str = "gso";

/// The largest envelope: a 64 KiB IP packet and its header.
pub const MAX_ENVELOPE: usize = 65_535 + HEADER_LEN;

/// Fewer bytes per segment than this is refused: it would make one envelope
/// into thousands of packets.
pub const MIN_SEGMENT: u16 = 64;

const ECN: u8 = 0x80;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Which transport a super-packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    /// TCP over IPv4.
    TcpV4,
    /// TCP over IPv6.
    TcpV6,
    /// UDP (either IP version).
    Udp,
}

impl GsoKind {
    fn wire(self) -> u8 {
        match self {
            GsoKind::TcpV4 => 1,
            GsoKind::TcpV6 => 4,
            GsoKind::Udp => 5,
        }
    }
}

/// How a super-packet is to be segmented, with the offsets derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    /// Transport.
    pub kind: GsoKind,
    /// The TCP segments carry CWR/ECN (Linux's `VIRTIO_NET_HDR_GSO_ECN`).
    pub ecn: bool,
    /// Payload bytes per segment (the MSS for TCP).
    pub segment_size: u16,
    /// Where the transport header starts (the IP header's length).
    pub csum_start: u16,
    /// Offset of the checksum field within the transport header.
    pub csum_offset: u16,
    /// IP plus transport header length.
    pub header_len: u16,
}

impl Gso {
    /// The extension header for this super-packet.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        let kind = self.kind.wire() | if self.ecn { ECN } else { 0 };
        let [hi, lo] = self.segment_size.to_be_bytes();
        [TAG_GSO, kind, hi, lo]
    }

    /// Linux's `gso_type` value.
    pub fn gso_type(&self) -> u8 {
        self.kind.wire() | if self.ecn { ECN } else { 0 }
    }

    /// Validates `gso_type`/`segment_size` (as read from a TUN device or an
    /// envelope) against the IP packet they describe.
    pub fn for_packet(gso_type: u8, segment_size: u16, ip: &[u8]) -> Result<Self, OffloadError> {
        let ecn = gso_type & ECN != 0;
        let kind = match gso_type & !ECN {
            1 => GsoKind::TcpV4,
            4 => GsoKind::TcpV6,
            5 => GsoKind::Udp,
            t => return Err(OffloadError::UnknownKind(t)),
        };
        if segment_size < MIN_SEGMENT {
            return Err(OffloadError::SegmentSize(segment_size));
        }
        let version = ip.first().map(|b| b >> 4);
        let (ip_len, protocol) = match version {
            Some(4) => {
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                if ihl < 20 || ip.len() < ihl {
                    return Err(OffloadError::Malformed("IPv4 header"));
                }
                (ihl, ip[9])
            }
            // Extension headers are not followed: the kernel does not put
            // them on segmentable packets it hands out.
            Some(6) if ip.len() >= 40 => (40, ip[6]),
            _ => return Err(OffloadError::Malformed("IP header")),
        };
        let (expect_proto, transport_len, csum_offset) = match kind {
            GsoKind::TcpV4 | GsoKind::TcpV6 => {
                let tcp = ip
                    .get(ip_len + 12)
                    .ok_or(OffloadError::Malformed("TCP header"))?;
                (IPPROTO_TCP, usize::from(tcp >> 4) * 4, 16u16)
            }
            GsoKind::Udp => (IPPROTO_UDP, 8, 6u16),
        };
        let version_ok = match kind {
            GsoKind::TcpV4 => version == Some(4),
            GsoKind::TcpV6 => version == Some(6),
            GsoKind::Udp => true,
        };
        if !version_ok || protocol != expect_proto {
            return Err(OffloadError::Mismatch);
        }
        if transport_len < 8 || (expect_proto == IPPROTO_TCP && transport_len < 20) {
            return Err(OffloadError::Malformed("transport header length"));
        }
        let header_len = ip_len + transport_len;
        if ip.len() < header_len {
            return Err(OffloadError::Malformed("packet shorter than its headers"));
        }
        Ok(Self {
            kind,
            ecn,
            segment_size,
            csum_start: ip_len as u16,
            csum_offset,
            header_len: header_len as u16,
        })
    }
}

/// What a frame on the packet path carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried<'a> {
    /// A plain IP packet.
    Plain(&'a [u8]),
    /// A super-packet and how to segment it.
    Super(Gso, &'a [u8]),
}

/// Whether `frame` is an envelope (by its tag alone).
pub fn is_envelope(frame: &[u8]) -> bool {
    frame.first() == Some(&TAG_GSO)
}

/// The IP packet in `frame`, envelope or not, for code that only reads its
/// header (routing, anti-spoofing). Not validated beyond the tag.
pub fn ip_bytes(frame: &[u8]) -> &[u8] {
    if is_envelope(frame) {
        frame.get(HEADER_LEN..).unwrap_or_default()
    } else {
        frame
    }
}

/// Splits a frame into what it carries, validating an envelope's header
/// against its packet.
pub fn carried(frame: &[u8]) -> Result<Carried<'_>, OffloadError> {
    if !is_envelope(frame) {
        return Ok(Carried::Plain(frame));
    }
    let (head, ip) = frame
        .split_at_checked(HEADER_LEN)
        .ok_or(OffloadError::Malformed("envelope header"))?;
    let gso = Gso::for_packet(head[1], u16::from_be_bytes([head[2], head[3]]), ip)?;
    Ok(Carried::Super(gso, ip))
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffloadError {
    /// Kind byte not one of the known ones.
    UnknownKind(u8),
    /// Segment size below [`MIN_SEGMENT`].
    SegmentSize(u16),
    /// Kind does not match the IP version or protocol.
    Mismatch,
    /// Headers missing or inconsistent.
    Malformed(&'static str),
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffloadError::UnknownKind(k) => write!(f, "unknown offload kind {k:#04x}"),
            OffloadError::SegmentSize(s) => {
                write!(f, "segment size {s} below the minimum {MIN_SEGMENT}")
            }
            OffloadError::Mismatch => f.write_str("offload kind does not match the packet"),
            OffloadError::Malformed(what) => write!(f, "malformed super-packet: {what}"),
        }
    }
}

impl std::error::Error for OffloadError {}

/// Whether an offer (`"offload":[...]`) includes segmentation offload.
pub fn offers_gso(offer: &Option<Vec<String>>) -> bool {
    offer
        .as_deref()
        .is_some_and(|o| o.iter().any(|s| s == OFFLOAD_GSO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ip::build_ipv4;
    use std::net::Ipv4Addr;

    fn tcp_v4(payload: usize) -> Vec<u8> {
        let mut tcp = vec![0u8; 20 + payload];
        tcp[12] = 5 << 4;
        build_ipv4(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
            IPPROTO_TCP,
            &tcp,
        )
    }

    #[test]
    fn an_envelope_round_trips_and_exposes_its_packet() {
        let ip = tcp_v4(3000);
        let gso = Gso::for_packet(1, 1380, &ip).expect("valid");
        assert_eq!(
            (gso.csum_start, gso.csum_offset, gso.header_len),
            (20, 16, 40)
        );
        let mut frame = gso.header().to_vec();
        frame.extend_from_slice(&ip);
        assert_eq!(ip_bytes(&frame), &ip[..]);
        assert_eq!(carried(&frame), Ok(Carried::Super(gso, &ip[..])));
        assert_eq!(carried(&ip), Ok(Carried::Plain(&ip[..])));
    }

    #[test]
    fn inconsistent_envelopes_are_refused() {
        let ip = tcp_v4(3000);
        let with = |kind: u8, size: u16, ip: &[u8]| {
            let [hi, lo] = size.to_be_bytes();
            let mut f = vec![TAG_GSO, kind, hi, lo];
            f.extend_from_slice(ip);
            carried(&f).map(|_| ())
        };
        assert_eq!(
            with(4, 1380, &ip),
            Err(OffloadError::Mismatch),
            "v6 kind, v4 packet"
        );
        assert_eq!(
            with(5, 1380, &ip),
            Err(OffloadError::Mismatch),
            "udp kind, tcp packet"
        );
        assert_eq!(with(2, 1380, &ip), Err(OffloadError::UnknownKind(2)));
        assert_eq!(with(1, 10, &ip), Err(OffloadError::SegmentSize(10)));
        assert!(
            with(1, 1380, &ip[..30]).is_err(),
            "cut inside the TCP header"
        );
        assert!(with(1, 1380, &[]).is_err());
        assert!(carried(&[TAG_GSO, 1]).is_err());
        assert_eq!(with(1 | ECN, 1380, &ip), Ok(()));
    }

    #[test]
    fn offers_are_matched_by_name() {
        assert!(offers_gso(&Some(vec!["x".into(), "gso".into()])));
        assert!(!offers_gso(&Some(vec![])));
        assert!(!offers_gso(&None));
    }
}
