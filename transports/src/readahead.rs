//! A read buffer between the TCP socket and TLS.
//!
//! rustls asks its transport for at most 4 KiB per read, so without a buffer a
//! 64 KiB super-packet costs sixteen `recv` calls. [`ReadAhead`] takes
//! whatever the socket holds, up to 64 KiB, in one call and serves rustls's
//! small reads from memory. Reads go straight to the caller until one fills
//! the caller's buffer (the stream carries bulk data); and the buffer exists
//! only while data flows: once the socket has nothing more it is freed.
//! Handshakes and idle sessions hold none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one socket read may take.
pub const READ_AHEAD: usize = 64 * 1024;

/// Wraps a stream so that small reads are served from one large read.
/// Writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buf: BytesMut,
    size: usize,
    /// A direct read has filled the caller's buffer: read ahead from now on.
    busy: bool,
}

impl<T> ReadAhead<T> {
    /// Reads ahead up to [`READ_AHEAD`] bytes.
    pub fn new(inner: T) -> Self {
        Self::with_size(inner, READ_AHEAD)
    }

    /// Reads ahead up to `size` bytes.
    pub fn with_size(inner: T, size: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            size: size.max(1),
            busy: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes read from the stream and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether a buffer is held.
    pub fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // A caller asking for as much as a read-ahead gains nothing from
            // the copy.
            if !this.busy || dst.remaining() >= this.size {
                let room = dst.remaining();
                let before = dst.filled().len();
                let r = Pin::new(&mut this.inner).poll_read(cx, dst);
                this.busy |=
                    matches!(r, Poll::Ready(Ok(()))) && dst.filled().len() - before == room;
                return r;
            }
            if this.buf.capacity() < this.size {
                this.buf.reserve(this.size);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing more for now: an idle connection holds no buffer.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream: `dst` stays unfilled, which says so.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = dst.remaining().min(this.buf.len());
        dst.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reach the wrapped stream.
    struct Counting<T> {
        inner: T,
        reads: usize,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            dst: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.inner).poll_read(cx, dst);
            if r.is_ready() {
                this.reads += 1;
            }
            r
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_the_buffer_goes_when_idle() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.expect("write");
        let mut r = ReadAhead::new(Counting {
            inner: near,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = r.read(&mut chunk).await.expect("read");
            assert!(n > 0, "no early end");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data, "bytes arrive whole and in order");
        assert_eq!(
            r.inner.reads, 3,
            "100 000 bytes in one 4 KiB read (which shows more is waiting) and two of 64 KiB, not 25"
        );
        assert_eq!(r.buffered(), 0);

        // Nothing more to read: the next read waits, and the buffer is gone.
        assert!(futures::poll!(std::pin::pin!(r.read(&mut chunk))).is_pending());
        assert!(!r.holds_buffer(), "an idle stream holds no buffer");

        far.write_all(b"more").await.expect("write");
        drop(far);
        let n = r.read(&mut chunk).await.expect("read");
        assert_eq!(&chunk[..n], b"more");
        assert_eq!(r.read(&mut chunk).await.expect("eof"), 0, "end of stream");
    }

    #[tokio::test]
    async fn short_reads_such_as_a_handshake_allocate_nothing() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(near);
        let mut chunk = [0u8; 4096];
        for msg in [&b"client hello"[..], b"finished", b"ping"] {
            far.write_all(msg).await.expect("write");
            let n = r.read(&mut chunk).await.expect("read");
            assert_eq!(&chunk[..n], msg);
            assert!(
                !r.holds_buffer(),
                "a read shorter than asked allocates nothing"
            );
        }
    }

    #[tokio::test]
    async fn a_large_read_goes_straight_through_and_writes_pass() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        far.write_all(&[7u8; 70_000]).await.expect("write");
        let mut r = ReadAhead::new(near);
        let mut big = vec![0u8; READ_AHEAD];
        let n = r.read(&mut big).await.expect("read");
        assert!(n > 0 && big[..n].iter().all(|&b| b == 7));
        assert!(!r.holds_buffer(), "no copy for a caller with room");
        r.write_all(b"back").await.expect("write through");
        let mut back = [0u8; 4];
        far.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"back");
    }
}
