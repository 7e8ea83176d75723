//! Linux TUN offload: super-packets in and out of the device, and cutting
//! them into plain packets for whoever cannot take them whole.
//!
//! With `IFF_VNET_HDR` every packet crosses the device behind a 10-byte virtio
//! header. Reading, the header becomes the 4-byte envelope of
//! [`sallyport_core::offload`] in place (its last four bytes), so the packet is
//! never copied; writing, it is rebuilt from the envelope and written with the
//! packet in one `writev`.

use std::io;

use bytes::{Bytes, BytesMut};
use sallyport_core::offload::{self, Carried, Gso, OffloadError};

/// Length of the virtio header in front of every packet.
pub const VNET_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;

/// At most this many segments come out of one super-packet.
const MAX_SEGMENTS: usize = 1024;

/// What one read from an offload device holds, as a range of the read buffer.
///
/// `frame[..n]` is the read (virtio header first). A super-packet's envelope
/// header is written over the end of the virtio header; a plain packet gets
/// its checksum completed when the kernel left it partial.
pub(crate) fn from_device(frame: &mut [u8]) -> Result<std::ops::Range<usize>, OffloadError> {
    let (vnet, ip) = frame
        .split_at_mut_checked(VNET_LEN)
        .ok_or(OffloadError::Malformed(
            "read shorter than the virtio header",
        ))?;
    let flags = vnet[0];
    let gso_type = vnet[1];
    let gso_size = u16::from_ne_bytes([vnet[4], vnet[5]]);
    let csum_start = usize::from(u16::from_ne_bytes([vnet[6], vnet[7]]));
    let csum_offset = usize::from(u16::from_ne_bytes([vnet[8], vnet[9]]));
    if gso_type == GSO_NONE {
        if flags & F_NEEDS_CSUM != 0 {
            complete_checksum(ip, csum_start, csum_offset)?;
        }
        return Ok(VNET_LEN..frame.len());
    }
    let gso = Gso::for_packet(gso_type, gso_size, ip)?;
    let at = VNET_LEN - offload::HEADER_LEN;
    frame[at..VNET_LEN].copy_from_slice(&gso.header());
    Ok(at..frame.len())
}

/// The virtio header for writing `frame` (plain packet or envelope) and the IP
/// packet to write behind it.
pub(crate) fn to_device(frame: &[u8]) -> Result<([u8; VNET_LEN], &[u8]), OffloadError> {
    match offload::carried(frame)? {
        Carried::Plain(ip) => Ok(([0; VNET_LEN], ip)),
        Carried::Super(gso, ip) => Ok((vnet_header(&gso), ip)),
    }
}

fn vnet_header(gso: &Gso) -> [u8; VNET_LEN] {
    let mut h = [0u8; VNET_LEN];
    h[0] = F_NEEDS_CSUM;
    h[1] = gso.gso_type();
    h[2..4].copy_from_slice(&gso.header_len.to_ne_bytes());
    h[4..6].copy_from_slice(&gso.segment_size.to_ne_bytes());
    h[6..8].copy_from_slice(&gso.csum_start.to_ne_bytes());
    h[8..10].copy_from_slice(&gso.csum_offset.to_ne_bytes());
    h
}

/// Folds the transport checksum the kernel left partial (the pseudo-header
/// sum is already in the field).
fn complete_checksum(ip: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let at = start
        .checked_add(offset)
        .filter(|at| at + 2 <= ip.len())
        .ok_or(OffloadError::Malformed("checksum offset beyond the packet"))?;
    let initial = u16::from_be_bytes([ip[at], ip[at + 1]]);
    ip[at] = 0;
    ip[at + 1] = 0;
    let sum = !tun_rs::checksum(&ip[start..], u64::from(initial));
    ip[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Cuts `frame` into plain IP packets for a peer or device without offload:
/// a plain packet passes as it is; a super-packet becomes its segments, each
/// with its own lengths, sequence number and checksums.
pub fn segment(frame: Bytes, out: &mut Vec<Bytes>) -> Result<(), OffloadError> {
    let (gso, ip) = match offload::carried(&frame)? {
        Carried::Plain(_) => {
            out.push(frame);
            return Ok(());
        }
        Carried::Super(gso, ip) => (gso, ip),
    };
    let header = vnet_header(&gso);
    let hdr = tun_rs::VirtioNetHdr::decode(&header)
        .map_err(|_| OffloadError::Malformed("virtio header"))?;
    let payload = ip.len() - usize::from(gso.header_len);
    let segments = payload.div_ceil(usize::from(gso.segment_size)).max(1);
    if segments > MAX_SEGMENTS {
        return Err(OffloadError::Malformed("too many segments"));
    }
    let slot = usize::from(gso.header_len) + usize::from(gso.segment_size);
    let mut arena = BytesMut::zeroed(slot * segments);
    let mut input = ip.to_vec();
    let mut sizes = vec![0usize; segments];
    let n = {
        let mut bufs: Vec<&mut [u8]> = arena.chunks_mut(slot).collect();
        tun_rs::gso_split(&mut input, hdr, &mut bufs, &mut sizes, 0, ip[0] >> 4 == 6)
            .map_err(|_| OffloadError::Malformed("cannot be segmented"))?
    };
    let arena = arena.freeze();
    out.extend(
        sizes[..n]
            .iter()
            .enumerate()
            .map(|(i, len)| arena.slice(i * slot..i * slot + len)),
    );
    Ok(())
}

/// Maps an offload error to an I/O error for device callers.
pub(crate) fn invalid(e: OffloadError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sallyport_core::ip::{build_ipv4, IpHeader};
    use std::net::Ipv4Addr;

    /// A TCP super-packet as the kernel hands it out: pseudo-header sum in
    /// the checksum field, total length covering all segments.
    fn super_packet(payload: usize) -> Vec<u8> {
        let mut tcp = vec![0u8; 20 + payload];
        tcp[12] = 5 << 4;
        tcp[13] = 0x18; // PSH, ACK
        for (i, b) in tcp[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        build_ipv4(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
            6,
            &tcp,
        )
    }

    #[test]
    fn a_read_super_packet_becomes_an_envelope_in_place_and_back() {
        let ip = super_packet(4000);
        let gso = Gso::for_packet(1, 1000, &ip).expect("valid");
        let mut read = vnet_header(&gso).to_vec();
        read.extend_from_slice(&ip);
        let range = from_device(&mut read).expect("valid");
        let frame = &read[range];
        assert_eq!(&frame[..4], &gso.header());
        let (header, packet) = to_device(frame).expect("valid");
        assert_eq!(header, vnet_header(&gso));
        assert_eq!(packet, &ip[..]);
    }

    #[test]
    fn a_super_packet_is_cut_into_valid_segments() {
        let ip = super_packet(4000);
        let gso = Gso::for_packet(1, 1000, &ip).expect("valid");
        let mut frame = gso.header().to_vec();
        frame.extend_from_slice(&ip);
        let mut out = Vec::new();
        segment(Bytes::from(frame), &mut out).expect("segments");
        assert_eq!(out.len(), 4);
        let mut data = Vec::new();
        for (i, p) in out.iter().enumerate() {
            let h = IpHeader::parse(p).expect("valid IP");
            assert_eq!(h.total_len(), p.len());
            assert_eq!(p.len(), 20 + 20 + 1000);
            assert_eq!(sallyport_core::ip::checksum(&p[..20]), 0, "IPv4 header sum");
            let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
            assert_eq!(seq, 1000 * i as u32);
            data.extend_from_slice(&p[40..]);
        }
        assert_eq!(data, ip[40..]);
        let mut plain = Vec::new();
        segment(out[0].clone(), &mut plain).expect("plain passes");
        assert_eq!(plain, vec![out[0].clone()]);
    }

    #[test]
    fn bad_reads_are_errors_not_panics() {
        assert!(from_device(&mut [0u8; 4]).is_err());
        let mut r = [0u8; VNET_LEN + 20];
        r[0] = F_NEEDS_CSUM;
        r[6] = 200; // csum_start beyond the packet
        assert!(from_device(&mut r).is_err());
        r[0] = 0;
        r[1] = 1; // TCPv4 super-packet, but no IP header
        r[4] = 200;
        assert!(from_device(&mut r).is_err());
        let mut big = vec![0u8; 4];
        big[0] = offload::TAG_GSO;
        assert!(segment(Bytes::from(big), &mut Vec::new()).is_err());
    }
}
