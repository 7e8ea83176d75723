//! An in-memory transport: two tunnel ends joined by bounded channels. For
//! tests of everything above the transports, without sockets.

use crate::ReceiverStream;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::{Frame, TransportError, TransportKind, Tunnel, TunnelInfo};

/// Two connected tunnel ends; what one sends the other receives, in order.
/// `capacity` frames may be in flight each way before senders wait.
pub fn pair(capacity: usize) -> (Tunnel, Tunnel) {
    let (a_tx, b_rx) = mpsc::channel(capacity);
    let (b_tx, a_rx) = mpsc::channel(capacity);
    (end(a_tx, a_rx), end(b_tx, b_rx))
}

fn end(tx: mpsc::Sender<Frame>, rx: mpsc::Receiver<Frame>) -> Tunnel {
    Tunnel {
        tx: Box::pin(PollSender::new(tx).sink_map_err(|_| TransportError::Closed)),
        rx: Box::pin(ReceiverStream::new(rx).map(Ok)),
        info: TunnelInfo {
            transport: TransportKind::Memory,
            peer: None,
        },
    }
}

/// A client-side dialer whose tunnels arrive at the paired acceptor channel.
#[derive(Clone)]
pub struct MemoryDialer {
    accept: mpsc::Sender<Tunnel>,
    capacity: usize,
}

impl MemoryDialer {
    /// Each dial creates a [`pair`] and sends the server end to `accept`.
    pub fn new(accept: mpsc::Sender<Tunnel>, capacity: usize) -> Self {
        Self { accept, capacity }
    }
}

impl crate::Dial for MemoryDialer {
    fn kind(&self) -> TransportKind {
        TransportKind::Memory
    }

    fn dial(&self) -> futures::future::BoxFuture<'_, Result<Tunnel, TransportError>> {
        Box::pin(async move {
            let (client, server) = pair(self.capacity);
            self.accept
                .send(server)
                .await
                .map_err(|_| TransportError::Closed)?;
            Ok(client)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn frames_arrive_in_order_and_close_ends_the_stream() {
        let (mut a, mut b) = pair(4);
        for i in 0..3u8 {
            a.tx.feed(Frame::Packet(Bytes::from(vec![i])))
                .await
                .expect("feed");
        }
        a.tx.flush().await.expect("flush");
        drop(a);
        let mut got = Vec::new();
        while let Some(f) = b.rx.next().await {
            got.push(f.expect("frame"));
        }
        assert_eq!(
            got,
            (0..3u8)
                .map(|i| Frame::Packet(Bytes::from(vec![i])))
                .collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn recv_ready_takes_what_is_ready_without_waiting() {
        let (mut a, mut b) = pair(16);
        for i in 0..5u8 {
            a.tx.feed(Frame::Packet(Bytes::from(vec![i])))
                .await
                .expect("feed");
        }
        a.tx.flush().await.expect("flush");
        let mut out = Vec::new();
        assert!(crate::recv_ready(&mut b.rx, &mut out, 3).await.expect("ok"));
        assert_eq!(out.len(), 3, "bounded by max");
        out.clear();
        assert!(crate::recv_ready(&mut b.rx, &mut out, 64)
            .await
            .expect("ok"));
        assert_eq!(out.len(), 2, "takes the rest without waiting for more");
    }
}
