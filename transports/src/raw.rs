//! The raw TLS transport: [`crate::framing`] frames directly over TLS, chosen by
//! the ALPN protocol id [`ALPN`]. The fastest path where nothing in between
//! speaks HTTP.

use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::FramedRead;

use crate::connect::Connector;
use crate::framing::FrameCodec;
use crate::writer::FrameWriter;
use crate::{Dial, TransportError, TransportKind, Tunnel, TunnelInfo};

/// The ALPN protocol id of the raw transport.
pub const ALPN: &[u8] = b"sallyport/1";

/// Wraps a byte stream that speaks the framing as a [`Tunnel`].
pub fn into_tunnel<I>(io: I, max_frame: usize, info: TunnelInfo) -> Tunnel
where
    I: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(io);
    let codec = FrameCodec::new(max_frame);
    // Batches are flushed explicitly; let a batch's worth queue up.
    let write = FrameWriter::new(w, max_frame, 256 * 1024);
    Tunnel {
        tx: Box::pin(write),
        rx: Box::pin(FramedRead::with_capacity(r, codec, 64 * 1024).fuse()),
        info,
    }
}

/// Dials raw TLS tunnels.
pub struct RawDialer {
    connector: Connector,
    max_frame: usize,
    timeout: Duration,
}

impl RawDialer {
    /// A dialer over `connector`, which must use TLS.
    pub fn new(
        connector: Connector,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        if !connector.is_tls() {
            return Err(TransportError::InvalidUrl {
                url: format!("{}:{}", connector.host, connector.port),
                reason: "the raw TLS transport needs TLS (a wss:// or https:// url)".into(),
            });
        }
        Ok(Self {
            connector,
            max_frame,
            timeout,
        })
    }

    async fn dial_inner(&self) -> Result<Tunnel, TransportError> {
        let (io, peer, alpn) = self.connector.connect(ALPN).await?;
        if alpn.as_deref() != Some(ALPN) {
            return Err(TransportError::Protocol(format!(
                "{}:{} did not accept ALPN {} (something in between, or an older server)",
                self.connector.host,
                self.connector.port,
                String::from_utf8_lossy(ALPN)
            )));
        }
        Ok(into_tunnel(
            io,
            self.max_frame,
            TunnelInfo {
                transport: TransportKind::RawTls,
                peer,
            },
        ))
    }
}

impl Dial for RawDialer {
    fn kind(&self) -> TransportKind {
        TransportKind::RawTls
    }

    fn dial(&self) -> futures::future::BoxFuture<'_, Result<Tunnel, TransportError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.dial_inner())
                .await
                .map_err(|_| TransportError::Timeout("raw tls connect"))?
        })
    }
}
