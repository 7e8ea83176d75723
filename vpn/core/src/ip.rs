//! Read-only views of IPv4 and IPv6 headers.
//!
//! Everything here takes untrusted bytes from the network or a device and
//! returns an error rather than panicking, whatever the input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of an IPv4 header without options.
pub const IPV4_MIN_HEADER: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER: usize = 40;

/// Why bytes are not a usable IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    /// No bytes at all.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("unknown ip version {0}")]
    UnknownVersion(u8),
    /// Fewer bytes than the header needs.
    #[error("truncated ipv{version} header: {len} bytes, need {need}")]
    Truncated {
        /// 4 or 6.
        version: u8,
        /// Bytes present.
        len: usize,
        /// Bytes the header needs.
        need: usize,
    },
    /// IPv4 header length field below 5 words.
    #[error("invalid ipv4 header length {0} words")]
    BadHeaderLength(u8),
    /// The total length field disagrees with the buffer.
    #[error("ip total length {claimed} exceeds the {len} bytes received")]
    BadTotalLength {
        /// Length the header claims.
        claimed: usize,
        /// Bytes present.
        len: usize,
    },
}

/// A validated view of an IPv4 or IPv6 packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpHeader {
    /// IPv4.
    V4(Ipv4Header),
    /// IPv6.
    V6(Ipv6Header),
}

/// The fields of an IPv4 header that routing needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Total length field (header and payload).
    pub total_len: usize,
    /// Header length in bytes.
    pub header_len: usize,
    /// Protocol number (6 TCP, 17 UDP, 1 ICMP, ...).
    pub protocol: u8,
}

/// The fields of an IPv6 header that routing needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Header {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Total length (fixed header plus payload length field).
    pub total_len: usize,
    /// Next header number.
    pub next_header: u8,
}

impl IpHeader {
    /// Parses and validates the header at the start of `packet`.
    ///
    /// The total length in the header must not exceed `packet.len()`; trailing
    /// bytes beyond it (padding) are allowed, as kernels allow them.
    pub fn parse(packet: &[u8]) -> Result<Self, IpError> {
        let first = *packet.first().ok_or(IpError::Empty)?;
        match first >> 4 {
            4 => Ipv4Header::parse(packet).map(IpHeader::V4),
            6 => Ipv6Header::parse(packet).map(IpHeader::V6),
            v => Err(IpError::UnknownVersion(v)),
        }
    }

    /// 4 or 6.
    pub fn version(&self) -> u8 {
        match self {
            IpHeader::V4(_) => 4,
            IpHeader::V6(_) => 6,
        }
    }

    /// Source address.
    pub fn src(&self) -> IpAddr {
        match self {
            IpHeader::V4(h) => IpAddr::V4(h.src),
            IpHeader::V6(h) => IpAddr::V6(h.src),
        }
    }

    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        match self {
            IpHeader::V4(h) => IpAddr::V4(h.dst),
            IpHeader::V6(h) => IpAddr::V6(h.dst),
        }
    }

    /// Total length of the packet according to its header.
    pub fn total_len(&self) -> usize {
        match self {
            IpHeader::V4(h) => h.total_len,
            IpHeader::V6(h) => h.total_len,
        }
    }
}

impl Ipv4Header {
    /// Parses an IPv4 header; see [`IpHeader::parse`].
    pub fn parse(p: &[u8]) -> Result<Self, IpError> {
        let fixed: &[u8; IPV4_MIN_HEADER] = p
            .get(..IPV4_MIN_HEADER)
            .and_then(|s| s.try_into().ok())
            .ok_or(IpError::Truncated {
                version: 4,
                len: p.len(),
                need: IPV4_MIN_HEADER,
            })?;
        if fixed[0] >> 4 != 4 {
            return Err(IpError::UnknownVersion(fixed[0] >> 4));
        }
        let ihl = fixed[0] & 0x0f;
        if ihl < 5 {
            return Err(IpError::BadHeaderLength(ihl));
        }
        let header_len = usize::from(ihl) * 4;
        if p.len() < header_len {
            return Err(IpError::Truncated {
                version: 4,
                len: p.len(),
                need: header_len,
            });
        }
        let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if total_len > p.len() || total_len < header_len {
            return Err(IpError::BadTotalLength {
                claimed: total_len,
                len: p.len(),
            });
        }
        Ok(Self {
            src: Ipv4Addr::new(fixed[12], fixed[13], fixed[14], fixed[15]),
            dst: Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]),
            total_len,
            header_len,
            protocol: fixed[9],
        })
    }
}

impl Ipv6Header {
    /// Parses an IPv6 header; see [`IpHeader::parse`].
    pub fn parse(p: &[u8]) -> Result<Self, IpError> {
        let fixed: &[u8; IPV6_HEADER] = p
            .get(..IPV6_HEADER)
            .and_then(|s| s.try_into().ok())
            .ok_or(IpError::Truncated {
                version: 6,
                len: p.len(),
                need: IPV6_HEADER,
            })?;
        if fixed[0] >> 4 != 6 {
            return Err(IpError::UnknownVersion(fixed[0] >> 4));
        }
        let payload_len = usize::from(u16::from_be_bytes([fixed[4], fixed[5]]));
        let total_len = IPV6_HEADER + payload_len;
        if total_len > p.len() {
            return Err(IpError::BadTotalLength {
                claimed: total_len,
                len: p.len(),
            });
        }
        let mut src = [0u8; 16];
        src.copy_from_slice(&fixed[8..24]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&fixed[24..40]);
        Ok(Self {
            src: Ipv6Addr::from(src),
            dst: Ipv6Addr::from(dst),
            total_len,
            next_header: fixed[6],
        })
    }
}

/// Builds IPv4 packets for tests and tools: a valid header (with checksum)
/// around `payload`, protocol 253 (reserved for experimentation) unless set.
pub fn build_ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = IPV4_MIN_HEADER + payload.len();
    let total16 = u16::try_from(total).unwrap_or(u16::MAX);
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0]);
    p[2..4].copy_from_slice(&total16.to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p[..IPV4_MIN_HEADER]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Builds an IPv6 packet around `payload` (next header 59, "no next header",
/// unless set).
pub fn build_ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let len16 = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    let mut p = Vec::with_capacity(IPV6_HEADER + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&len16.to_be_bytes());
    p.extend_from_slice(&[next_header, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// The internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);

    #[test]
    fn ipv4_fields_are_read() {
        let p = build_ipv4(A, B, 17, b"hello");
        let h = IpHeader::parse(&p).expect("valid");
        assert_eq!(h.version(), 4);
        assert_eq!(h.src(), IpAddr::V4(A));
        assert_eq!(h.dst(), IpAddr::V4(B));
        assert_eq!(h.total_len(), 25);
        assert_eq!(checksum(&p[..20]), 0, "header checksum verifies");
    }

    #[test]
    fn ipv6_fields_are_read() {
        let s: Ipv6Addr = "fd00::2".parse().expect("addr");
        let d: Ipv6Addr = "fd00::3".parse().expect("addr");
        let p = build_ipv6(s, d, 59, &[1, 2, 3]);
        let h = IpHeader::parse(&p).expect("valid");
        assert_eq!(h.version(), 6);
        assert_eq!(h.src(), IpAddr::V6(s));
        assert_eq!(h.dst(), IpAddr::V6(d));
        assert_eq!(h.total_len(), 43);
    }

    #[test]
    fn empty_is_rejected() {
        assert_eq!(IpHeader::parse(&[]), Err(IpError::Empty));
    }

    #[test]
    fn unknown_version_is_rejected() {
        assert_eq!(
            IpHeader::parse(&[0x50; 40]),
            Err(IpError::UnknownVersion(5))
        );
        assert_eq!(IpHeader::parse(&[0x00]), Err(IpError::UnknownVersion(0)));
    }

    #[test]
    fn truncated_ipv4_is_rejected_at_every_length() {
        let p = build_ipv4(A, B, 1, b"");
        for n in 1..20 {
            assert!(
                matches!(
                    IpHeader::parse(&p[..n]),
                    Err(IpError::Truncated { version: 4, .. })
                ),
                "len {n}"
            );
        }
    }

    #[test]
    fn truncated_ipv6_is_rejected_at_every_length() {
        let p = build_ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 59, b"");
        for n in 1..40 {
            assert!(
                matches!(
                    IpHeader::parse(&p[..n]),
                    Err(IpError::Truncated { version: 6, .. })
                ),
                "len {n}"
            );
        }
    }

    #[test]
    fn ipv4_header_length_below_five_words_is_rejected() {
        let mut p = build_ipv4(A, B, 1, b"");
        p[0] = 0x44;
        assert_eq!(IpHeader::parse(&p), Err(IpError::BadHeaderLength(4)));
    }

    #[test]
    fn ipv4_options_longer_than_buffer_are_rejected() {
        let mut p = build_ipv4(A, B, 1, b"");
        p[0] = 0x4f; // 60-byte header, only 20 present
        assert!(matches!(
            IpHeader::parse(&p),
            Err(IpError::Truncated { need: 60, .. })
        ));
    }

    #[test]
    fn total_length_beyond_buffer_is_rejected() {
        let mut p = build_ipv4(A, B, 1, b"abc");
        p[2..4].copy_from_slice(&100u16.to_be_bytes());
        assert!(matches!(
            IpHeader::parse(&p),
            Err(IpError::BadTotalLength { claimed: 100, .. })
        ));
        let mut p6 = build_ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 59, b"abc");
        p6[4..6].copy_from_slice(&10u16.to_be_bytes());
        assert!(matches!(
            IpHeader::parse(&p6),
            Err(IpError::BadTotalLength { claimed: 50, .. })
        ));
    }

    #[test]
    fn ipv4_total_length_below_header_is_rejected() {
        let mut p = build_ipv4(A, B, 1, b"abc");
        p[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert!(matches!(
            IpHeader::parse(&p),
            Err(IpError::BadTotalLength { .. })
        ));
    }

    #[test]
    fn trailing_padding_is_allowed() {
        let mut p = build_ipv4(A, B, 1, b"abc");
        p.extend_from_slice(&[0; 7]);
        assert_eq!(IpHeader::parse(&p).map(|h| h.total_len()), Ok(23));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = IpHeader::parse(&bytes);
        }

        #[test]
        fn built_ipv4_round_trips(a in any::<[u8;4]>(), b in any::<[u8;4]>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let p = build_ipv4(a.into(), b.into(), 6, &payload);
            let h = IpHeader::parse(&p).expect("valid");
            prop_assert_eq!(h.src(), IpAddr::V4(a.into()));
            prop_assert_eq!(h.dst(), IpAddr::V4(b.into()));
            prop_assert_eq!(h.total_len(), p.len());
        }
    }
}
