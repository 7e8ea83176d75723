//! Batches of packets: the unit of work on the packet path.

use bytes::Bytes;

/// The most packets handled as one unit of work.
///
/// Readers await the first packet and then take whatever else is already ready,
/// up to this many, without waiting to fill a batch. 64 keeps the per-batch costs
/// (one flush, one lock, one pipeline call) well amortised while bounding the
/// latency a batch adds to its last packet.
pub const MAX_BATCH: usize = 64;

/// 1..=[`MAX_BATCH`] IP packets, in order.
///
/// The packets are reference-counted [`Bytes`] slices, so moving a batch between
/// tasks and dropping packets from it never copies packet data.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PacketBatch {
    packets: Vec<Bytes>,
}

impl PacketBatch {
    /// An empty batch with room for [`MAX_BATCH`] packets.
    pub fn new() -> Self {
        Self {
            packets: Vec::with_capacity(MAX_BATCH),
        }
    }

    /// Appends a packet.
    pub fn push(&mut self, packet: Bytes) {
        self.packets.push(packet);
    }

    /// Whether the batch holds [`MAX_BATCH`] packets or more.
    pub fn is_full(&self) -> bool {
        self.packets.len() >= MAX_BATCH
    }

    /// Number of packets.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Whether there are no packets.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Total bytes of all packets.
    pub fn bytes(&self) -> usize {
        self.packets.iter().map(Bytes::len).sum()
    }

    /// Keeps only the packets for which `keep` returns true.
    pub fn retain(&mut self, keep: impl FnMut(&Bytes) -> bool) {
        self.packets.retain(keep);
    }

    /// Keeps only the packets for which `keep` returns true; `keep` may
    /// replace a packet (a layer that rewrites packets and drops some).
    pub fn retain_mut(&mut self, keep: impl FnMut(&mut Bytes) -> bool) {
        self.packets.retain_mut(keep);
    }

    /// The packets, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Bytes> {
        self.packets.iter()
    }

    /// Mutable access to the packets, for layers that rewrite them in place.
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Bytes> {
        self.packets.iter_mut()
    }

    /// Removes all packets, keeping the allocation.
    pub fn clear(&mut self) {
        self.packets.clear();
    }

    /// Removes and yields all packets, keeping the allocation.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Bytes> {
        self.packets.drain(..)
    }
}

impl From<Vec<Bytes>> for PacketBatch {
    fn from(packets: Vec<Bytes>) -> Self {
        Self { packets }
    }
}

impl From<PacketBatch> for Vec<Bytes> {
    /// The packets, keeping the allocation for reuse.
    fn from(batch: PacketBatch) -> Self {
        batch.packets
    }
}

impl FromIterator<Bytes> for PacketBatch {
    fn from_iter<I: IntoIterator<Item = Bytes>>(iter: I) -> Self {
        Self {
            packets: iter.into_iter().collect(),
        }
    }
}

impl IntoIterator for PacketBatch {
    type Item = Bytes;
    type IntoIter = std::vec::IntoIter<Bytes>;
    fn into_iter(self) -> Self::IntoIter {
        self.packets.into_iter()
    }
}

impl<'a> IntoIterator for &'a PacketBatch {
    type Item = &'a Bytes;
    type IntoIter = std::slice::Iter<'a, Bytes>;
    fn into_iter(self) -> Self::IntoIter {
        self.packets.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_keeps_order_and_counts_bytes() {
        let mut b = PacketBatch::new();
        for i in 0..5u8 {
            b.push(Bytes::from(vec![i; usize::from(i) + 1]));
        }
        assert_eq!(b.bytes(), 1 + 2 + 3 + 4 + 5);
        b.retain(|p| p[0] % 2 == 0);
        let firsts: Vec<u8> = b.iter().map(|p| p[0]).collect();
        assert_eq!(firsts, vec![0, 2, 4]);
        assert!(!b.is_full());
    }

    #[test]
    fn full_at_max_batch() {
        let mut b = PacketBatch::new();
        for _ in 0..MAX_BATCH {
            assert!(!b.is_full());
            b.push(Bytes::from_static(b"x"));
        }
        assert!(b.is_full());
    }
}
