//! The inside device: a TUN interface that carries this machine's packets for
//! the tunnel's subnet.
//!
//! A small boundary over tun-rs, so that the server and client never see
//! platform details. This crate must not depend on transports, middleware or
//! anything that knows about the wire.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::BytesMut;
use sallyport_core::PacketBatch;

/// How to create the device.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Interface name, e.g. `tun0`.
    pub name: String,
    /// This host's address inside the tunnel.
    pub address: Ipv4Addr,
    /// Prefix length of the tunnel subnet; the kernel adds the subnet route.
    pub prefix: u8,
    /// Interface MTU.
    pub mtu: u16,
}

/// Errors from the device.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The process may not create network interfaces.
    #[error(
        "create TUN device {name}: permission denied: sallyport needs root or CAP_NET_ADMIN \
         (and access to /dev/net/tun)"
    )]
    PermissionDenied {
        /// Interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Any other failure creating the device.
    #[error("create TUN device {name}: {source}")]
    Create {
        /// Interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Changing the address failed.
    #[error("set address {address}/{prefix} on {name}: {source}")]
    Address {
        /// Interface name.
        name: String,
        /// The address.
        address: Ipv4Addr,
        /// Its prefix.
        prefix: u8,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A TUN device, up, with its address and MTU set. Cheap to clone; the
/// interface is removed when the last clone is dropped.
#[derive(Clone)]
pub struct TunDevice {
    dev: Arc<tun_rs::AsyncDevice>,
    name: Arc<str>,
    mtu: u16,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .finish()
    }
}

impl TunDevice {
    /// Creates the interface, sets its address, prefix and MTU, and brings it up.
    ///
    /// Must be called from within a tokio runtime.
    pub fn create(cfg: &TunConfig) -> Result<Self, TunError> {
        let dev = tun_rs::DeviceBuilder::new()
            .name(cfg.name.clone())
            .mtu(cfg.mtu)
            .ipv4(cfg.address, cfg.prefix, None)
            .enable(true)
            .build_async()
            .map_err(|source| {
                let name = cfg.name.clone();
                if source.kind() == io::ErrorKind::PermissionDenied
                    || source.raw_os_error() == Some(1)
                {
                    TunError::PermissionDenied { name, source }
                } else {
                    TunError::Create { name, source }
                }
            })?;
        let name = dev.name().unwrap_or_else(|_| cfg.name.clone());
        tracing::info!(
            interface = %name,
            address = %cfg.address,
            prefix = cfg.prefix,
            mtu = cfg.mtu,
            "inside device up"
        );
        Ok(Self {
            dev: Arc::new(dev),
            name: name.into(),
            mtu: cfg.mtu,
        })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MTU set at creation.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Replaces the interface's IPv4 address (and with it the subnet route).
    pub fn set_address(&self, address: Ipv4Addr, prefix: u8) -> Result<(), TunError> {
        self.dev
            .set_network_address(address, prefix, None)
            .map_err(|source| TunError::Address {
                name: self.name.to_string(),
                address,
                prefix,
                source,
            })?;
        tracing::info!(interface = %self.name, %address, prefix, "inside address changed");
        Ok(())
    }

    /// Reads one packet, waiting until one is there.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf).await
    }

    /// Writes one packet.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.dev.send(packet).await
    }

    /// Awaits the first packet, then takes whatever else is ready, until
    /// `batch` is full. Packets are carved out of `buf`, which is refilled in
    /// large chunks so that reading does not allocate per packet.
    pub async fn recv_batch(&self, buf: &mut BytesMut, batch: &mut PacketBatch) -> io::Result<()> {
        let slot = usize::from(self.mtu) + 64;
        reserve(buf, slot);
        let n = self.recv_into(buf, slot).await?;
        batch.push(buf.split_to(n).freeze());
        while !batch.is_full() {
            reserve(buf, slot);
            buf.resize(slot, 0);
            match self.dev.try_recv(&mut buf[..slot]) {
                Ok(n) => {
                    buf.truncate(n);
                    batch.push(buf.split().freeze());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    buf.clear();
                    break;
                }
                Err(e) => {
                    buf.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn recv_into(&self, buf: &mut BytesMut, slot: usize) -> io::Result<usize> {
        buf.resize(slot, 0);
        let r = self.dev.recv(&mut buf[..slot]).await;
        match r {
            Ok(n) => {
                buf.truncate(n);
                Ok(n)
            }
            Err(e) => {
                buf.clear();
                Err(e)
            }
        }
    }
}

/// Keeps at least `slot` bytes of spare room, allocating a fresh chunk for many
/// packets at once when the current one runs out.
fn reserve(buf: &mut BytesMut, slot: usize) {
    if buf.capacity() - buf.len() < slot {
        *buf = BytesMut::with_capacity(slot * sallyport_core::MAX_BATCH);
    }
}
