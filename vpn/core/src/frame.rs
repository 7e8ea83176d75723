//! The unit a transport carries.

use bytes::Bytes;

/// One message on the wire, independent of the transport that carries it.
///
/// The WebSocket transport maps [`Frame::Control`] to a text message and
/// [`Frame::Packet`] to a binary message; the length-prefixed transports tag each
/// frame with its kind.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON control message (UTF-8 text), see [`crate::message::Control`].
    Control(Bytes),
    /// One complete IP packet.
    Packet(Bytes),
}

impl Frame {
    /// The payload length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Frame::Control(b) | Frame::Packet(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Frame {
    // Payloads may be large and are not useful in logs; show kind and size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::Control(b) => write!(f, "Control({})", String::from_utf8_lossy(b)),
            Frame::Packet(b) => write!(f, "Packet({} bytes)", b.len()),
        }
    }
}
