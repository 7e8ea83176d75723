//! A frame sink that does not copy packets.
//!
//! A codec-based sink copies every frame into its write buffer, and TLS then
//! copies that buffer once more into its records: for a 64 KiB super-packet
//! that first copy was about 2% of the server's CPU under load (perf, issue
//! 7). [`FrameWriter`] keeps each queued frame as its 6-byte prefix and its
//! payload (`Bytes`, shared, not copied) and hands them to the stream in one
//! vectored write per flush; TLS copies them once, into its records.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::Sink;
use tokio::io::AsyncWrite;

use crate::framing::{frame_prefix, HEADER_LEN};
use crate::{Frame, TransportError};

/// Frames handed to the stream by one vectored write, at most.
const FRAMES_PER_WRITE: usize = 32;

/// Writes [`Frame`]s in the framing of [`crate::framing`] to `W`.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    queue: VecDeque<Queued>,
    /// Bytes queued and not yet written.
    queued: usize,
    max_payload: usize,
    /// `poll_ready` flushes first once this many bytes are queued.
    boundary: usize,
}

#[derive(Debug)]
struct Queued {
    prefix: [u8; HEADER_LEN],
    payload: Bytes,
    /// Bytes of prefix and payload already written.
    written: usize,
}

impl Queued {
    fn len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// What is left to write: part of the prefix (maybe empty) and of the payload.
    fn rest(&self) -> (&[u8], &[u8]) {
        if self.written < HEADER_LEN {
            (&self.prefix[self.written..], &self.payload[..])
        } else {
            (&[], &self.payload[self.written - HEADER_LEN..])
        }
    }
}

impl<W> FrameWriter<W> {
    /// A sink refusing payloads over `max_payload`; it writes out what is
    /// queued before taking more once `boundary` bytes wait.
    pub fn new(io: W, max_payload: usize, boundary: usize) -> Self {
        Self {
            io,
            queue: VecDeque::new(),
            queued: 0,
            max_payload,
            boundary: boundary.max(1),
        }
    }

    /// Marks `n` bytes from the front of the queue as written.
    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            let left = front.len() - front.written;
            if n < left {
                front.written += n;
                return;
            }
            n -= left;
            self.queue.pop_front();
        }
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Writes out everything queued (not flushing the stream itself).
    fn poll_write_queued(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let mut k = 0;
            for q in self.queue.iter().take(FRAMES_PER_WRITE) {
                let (prefix, payload) = q.rest();
                for part in [prefix, payload] {
                    if !part.is_empty() {
                        slices[k] = IoSlice::new(part);
                        k += 1;
                    }
                }
            }
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> Sink<Frame> for FrameWriter<W> {
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        if this.queued >= this.boundary {
            ready!(this.poll_write_queued(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, frame: Frame) -> Result<(), Self::Error> {
        let this = self.get_mut();
        if frame.len() > this.max_payload {
            return Err(TransportError::Protocol(format!(
                "frame of {} bytes exceeds the {}-byte limit",
                frame.len(),
                this.max_payload
            )));
        }
        let (prefix, payload) = frame_prefix(frame);
        let q = Queued {
            prefix,
            payload,
            written: 0,
        };
        this.queued += q.len();
        this.queue.push_back(q);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        ready!(this.poll_write_queued(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        ready!(this.poll_write_queued(cx))?;
        ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use futures::SinkExt;
    use tokio::io::AsyncReadExt;

    use crate::framing::encode_frame;

    /// Takes at most `limit` bytes per write, to exercise partial writes.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
        writes: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.limit);
            this.out.extend_from_slice(&buf[..n]);
            this.writes += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(this.limit - n);
                this.out.extend_from_slice(&b[..take]);
                n += take;
                if n == this.limit {
                    break;
                }
            }
            this.writes += 1;
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn frames() -> Vec<Frame> {
        (0..100u32)
            .map(|i| {
                let body: Vec<u8> = (0..(i * 37 % 3000)).map(|b| (b % 251) as u8).collect();
                if i % 7 == 0 {
                    Frame::Control(Bytes::from(body))
                } else {
                    Frame::Packet(Bytes::from(body))
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn writes_the_same_bytes_as_the_codec_through_any_partial_writes() {
        let mut expected = BytesMut::new();
        for f in frames() {
            encode_frame(&f, &mut expected);
        }
        for limit in [1, 5, 6, 7, 1000, 1 << 20] {
            let mut w = FrameWriter::new(
                Trickle {
                    out: Vec::new(),
                    limit,
                    writes: 0,
                },
                4096,
                8192,
            );
            for f in frames() {
                w.feed(f).await.expect("feed");
            }
            w.flush().await.expect("flush");
            assert_eq!(w.io.out, expected, "limit {limit}");
            assert_eq!(w.queued, 0);
            if limit == 1 << 20 {
                assert!(
                    w.io.writes <= 30,
                    "{} writes: frames go out together",
                    w.io.writes
                );
            }
        }
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_and_the_stream_reads_back() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(near, 100, 1024);
        let err = w
            .feed(Frame::Packet(Bytes::from(vec![0u8; 101])))
            .await
            .expect_err("too large");
        assert!(err.to_string().contains("exceeds"), "{err}");
        w.send(Frame::Packet(Bytes::from_static(b"ok")))
            .await
            .expect("send");
        let mut got = [0u8; HEADER_LEN + 2];
        far.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, &[0, 0, 0, 0, 3, 2, b'o', b'k']);
    }
}
