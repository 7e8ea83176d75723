//! The inside device: a TUN interface that carries this machine's packets for
//! the tunnel's subnet.
//!
//! A small boundary over tun-rs, so that the server and client never see
//! platform details. This crate must not depend on transports, middleware or
//! anything that knows about the wire.
//!
//! On Linux the kernel adds the subnet route with the address. On Windows the
//! device is a Wintun adapter (`wintun.dll` is loaded from the executable's
//! directory); address, prefix, MTU and the subnet route are set one by one and
//! read back, and the route this crate added is removed with the device.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::BytesMut;
use sallyport_core::PacketBatch;

#[cfg(target_os = "linux")]
pub mod offload;
#[cfg(windows)]
mod windows;

/// How to create the device.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Interface name, e.g. `tun0`.
    pub name: String,
    /// This host's address inside the tunnel.
    pub address: Ipv4Addr,
    /// Prefix length of the tunnel subnet; the subnet is routed to the device.
    pub prefix: u8,
    /// Interface MTU.
    pub mtu: u16,
    /// Ask for segmentation offload (Linux only; see [`offload`]): reads may
    /// then yield 64 KiB super-packets in envelopes, and writes take them.
    pub offload: bool,
}

/// Errors from the device.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The process may not create network interfaces.
    #[cfg_attr(
        not(windows),
        error(
            "create TUN device {name}: permission denied: sallyport needs root or CAP_NET_ADMIN \
             (and access to /dev/net/tun)"
        )
    )]
    #[cfg_attr(
        windows,
        error(
            "create TUN device {name}: access denied: run as Administrator or as the \
             Sallyport service"
        )
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
    /// The TUN driver library could not be found or loaded (Windows: `wintun.dll`).
    #[error("load TUN driver {path}: {reason}")]
    Driver {
        /// Where it was looked for.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Setting a property of the interface failed (Windows: MTU, route).
    #[error("set {what} on {name}: {source}")]
    Configure {
        /// Interface name.
        name: String,
        /// What was being set, e.g. `MTU 1420`.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A property read back after setting it differs from what was set.
    #[error("verify {name}: {what}")]
    Verify {
        /// Interface name.
        name: String,
        /// What differs.
        what: String,
    },
}

/// A TUN device, up, with its address and MTU set. Cheap to clone; the
/// interface (and on Windows the route added for it) is removed when the last
/// clone is dropped.
#[derive(Clone)]
pub struct TunDevice {
    dev: Backend,
    name: Arc<str>,
    mtu: u16,
    offload: bool,
}

#[derive(Clone)]
enum Backend {
    Os(Arc<OsDevice>),
    #[cfg(feature = "test-null-device")]
    Null,
}

struct OsDevice {
    // Declared before `dev` so that the route goes before the adapter.
    #[cfg(windows)]
    route: std::sync::Mutex<Option<windows::Route>>,
    dev: tun_rs::AsyncDevice,
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
        #[cfg(feature = "test-null-device")]
        {
            tracing::warn!(
                interface = %cfg.name,
                address = %cfg.address,
                "test-null-device build: no TUN device is created; inside packets are dropped"
            );
            Ok(Self {
                dev: Backend::Null,
                name: cfg.name.as_str().into(),
                mtu: cfg.mtu,
                offload: false,
            })
        }
        #[cfg(not(feature = "test-null-device"))]
        {
            Self::create_os(cfg)
        }
    }

    #[cfg_attr(feature = "test-null-device", allow(dead_code))]
    fn create_os(cfg: &TunConfig) -> Result<Self, TunError> {
        #[cfg(not(windows))]
        let os = {
            let builder = tun_rs::DeviceBuilder::new()
                .name(cfg.name.clone())
                .mtu(cfg.mtu)
                .ipv4(cfg.address, cfg.prefix, None)
                .enable(true);
            #[cfg(target_os = "linux")]
            let builder = builder.offload(cfg.offload);
            let dev = builder
                .build_async()
                .map_err(|source| create_error(&cfg.name, source))?;
            OsDevice { dev }
        };
        #[cfg(windows)]
        let os = {
            let (dev, route) = windows::create(cfg)?;
            OsDevice {
                route: std::sync::Mutex::new(route),
                dev,
            }
        };
        let name = os.dev.name().unwrap_or_else(|_| cfg.name.clone());
        #[cfg(target_os = "linux")]
        let offload = os.dev.tcp_gso();
        #[cfg(not(target_os = "linux"))]
        let offload = false;
        tracing::info!(
            interface = %name,
            address = %cfg.address,
            prefix = cfg.prefix,
            mtu = cfg.mtu,
            offload,
            "inside device up"
        );
        Ok(Self {
            dev: Backend::Os(Arc::new(os)),
            name: name.into(),
            mtu: cfg.mtu,
            offload,
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

    /// Whether the device carries super-packets (Linux segmentation offload).
    /// Reads then yield envelopes ([`sallyport_core::offload`]) besides plain
    /// packets, and [`TunDevice::send`] takes both.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Replaces the interface's IPv4 address (and with it the subnet route).
    pub fn set_address(&self, address: Ipv4Addr, prefix: u8) -> Result<(), TunError> {
        match &self.dev {
            Backend::Os(os) => {
                #[cfg(not(windows))]
                os.dev
                    .set_network_address(address, prefix, None)
                    .map_err(|source| TunError::Address {
                        name: self.name.to_string(),
                        address,
                        prefix,
                        source,
                    })?;
                #[cfg(windows)]
                {
                    let mut route = os.route.lock().unwrap_or_else(|p| p.into_inner());
                    // The old route goes first; its subnet may differ.
                    drop(route.take());
                    *route = windows::readdress(&os.dev, &self.name, address, prefix, self.mtu)?;
                }
            }
            #[cfg(feature = "test-null-device")]
            Backend::Null => {}
        }
        tracing::info!(interface = %self.name, %address, prefix, "inside address changed");
        Ok(())
    }

    /// Reads one packet, waiting until one is there.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.dev {
            Backend::Os(os) => os.dev.recv(buf).await,
            #[cfg(feature = "test-null-device")]
            Backend::Null => std::future::pending().await,
        }
    }

    /// Writes one packet: a plain IP packet, or on an offload device also an
    /// envelope (a super-packet).
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        match &self.dev {
            #[cfg(target_os = "linux")]
            Backend::Os(os) if self.offload => {
                let (vnet, ip) = offload::to_device(packet).map_err(offload::invalid)?;
                let bufs = [io::IoSlice::new(&vnet), io::IoSlice::new(ip)];
                os.dev.send_vectored(&bufs).await
            }
            Backend::Os(os) => os.dev.send(packet).await,
            #[cfg(feature = "test-null-device")]
            Backend::Null => Ok(packet.len()),
        }
    }

    /// Writes one packet (as [`TunDevice::send`]) without waiting: a device
    /// that cannot take it now answers `WouldBlock`. On Linux a TUN device
    /// takes a write at once, so the caller can skip a hop to a writer task.
    pub fn try_send(&self, packet: &[u8]) -> io::Result<usize> {
        match &self.dev {
            #[cfg(target_os = "linux")]
            Backend::Os(os) if self.offload => {
                let (vnet, ip) = offload::to_device(packet).map_err(offload::invalid)?;
                let bufs = [io::IoSlice::new(&vnet), io::IoSlice::new(ip)];
                os.dev.try_send_vectored(&bufs)
            }
            Backend::Os(os) => os.dev.try_send(packet),
            #[cfg(feature = "test-null-device")]
            Backend::Null => Ok(packet.len()),
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.dev {
            Backend::Os(os) => os.dev.try_recv(buf),
            #[cfg(feature = "test-null-device")]
            Backend::Null => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Takes whatever packets are ready, until `batch` is full; when none is,
    /// awaits one and returns it alone. Packets are carved out of `buf`, which
    /// is refilled in large chunks so that reading does not allocate per
    /// packet; the bytes after a packet stay initialised for the next read, so
    /// only what packets took is zeroed again.
    ///
    /// A packet that wakes an idle reader goes on at once: asking the device
    /// for more would be one more system call on its way (about 5-10 µs on a
    /// small VM) that nearly always answers "nothing". The next call asks,
    /// after the packet has left; under load packets are already waiting and
    /// are taken in batches.
    pub async fn recv_batch(&self, buf: &mut BytesMut, batch: &mut PacketBatch) -> io::Result<()> {
        let slot = self.read_slot();
        prepare(buf, slot);
        match self.try_recv(&mut buf[..slot]) {
            Ok(n) => self.take(buf, n, batch),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let n = self.recv(&mut buf[..slot]).await?;
                self.take(buf, n, batch);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        while !batch.is_full() {
            prepare(buf, slot);
            match self.try_recv(&mut buf[..slot]) {
                Ok(n) => self.take(buf, n, batch),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Room one read needs: a packet of the MTU, or with offload a 64 KiB
    /// super-packet behind its virtio header.
    fn read_slot(&self) -> usize {
        #[cfg(target_os = "linux")]
        if self.offload {
            return offload::VNET_LEN + 65_535;
        }
        usize::from(self.mtu) + 64
    }

    /// Moves the `n` bytes just read into `batch`.
    fn take(&self, buf: &mut BytesMut, n: usize, batch: &mut PacketBatch) {
        #[cfg(target_os = "linux")]
        if self.offload {
            let mut read = buf.split_to(n);
            match offload::from_device(&mut read) {
                Ok(range) => batch.push(read.freeze().slice(range)),
                // The kernel handed out something we cannot describe: drop
                // it rather than stop reading.
                Err(e) => tracing::debug!(error = %e, "dropping unreadable offload packet"),
            }
            return;
        }
        batch.push(buf.split_to(n).freeze());
    }
}

/// Cuts a frame into plain IP packets for a peer or device without
/// segmentation offload: plain packets pass as they are, a super-packet
/// becomes its segments. Only Linux can cut them; elsewhere a super-packet is
/// an error (such peers never agree to offload).
pub fn segment(
    frame: bytes::Bytes,
    out: &mut Vec<bytes::Bytes>,
) -> Result<(), sallyport_core::offload::OffloadError> {
    #[cfg(target_os = "linux")]
    {
        offload::segment(frame, out)
    }
    #[cfg(not(target_os = "linux"))]
    {
        if sallyport_core::offload::is_envelope(&frame) {
            return Err(sallyport_core::offload::OffloadError::Malformed(
                "segmentation offload is not supported on this platform",
            ));
        }
        out.push(frame);
        Ok(())
    }
}

/// Classifies a failure to create the device.
fn create_error(name: &str, source: io::Error) -> TunError {
    let name = name.to_string();
    // EPERM on Linux, ERROR_ACCESS_DENIED on Windows.
    let denied = if cfg!(windows) { 5 } else { 1 };
    if source.kind() == io::ErrorKind::PermissionDenied || source.raw_os_error() == Some(denied) {
        TunError::PermissionDenied { name, source }
    } else {
        TunError::Create { name, source }
    }
}

/// Makes `buf[..slot]` readable: a fresh chunk for many packets at once when
/// the current one runs out, and zeroes only for bytes not yet initialised.
fn prepare(buf: &mut BytesMut, slot: usize) {
    if buf.capacity() < slot {
        *buf = BytesMut::with_capacity(slot * sallyport_core::MAX_BATCH);
    }
    if buf.len() < slot {
        buf.resize(slot, 0);
    }
}
