//! Windows: a Wintun adapter through tun-rs, configured step by step.
//!
//! tun-rs creates the adapter and sets address and MTU; the subnet route is
//! added here through the IP Helper API. Each is read back afterwards, because
//! a half-configured adapter fails later in ways that are hard to trace (the
//! classic: an address without its on-link route, so nothing reaches the
//! tunnel). `wintun.dll` is loaded from the executable's directory only, never
//! from the search path, so that a stray copy elsewhere cannot be picked up.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use windows_sys::Win32::Foundation::{ERROR_OBJECT_ALREADY_EXISTS, NO_ERROR, WIN32_ERROR};
use windows_sys::Win32::NetworkManagement::IpHelper::{
    CreateIpForwardEntry2, DeleteIpForwardEntry2, GetIpForwardEntry2, GetUnicastIpAddressEntry,
    InitializeIpForwardEntry, InitializeUnicastIpAddressEntry, MIB_IPFORWARD_ROW2,
    MIB_UNICASTIPADDRESS_ROW,
};
use windows_sys::Win32::NetworkManagement::Ndis::NET_LUID_LH;
use windows_sys::Win32::Networking::WinSock::{
    AF_INET, IN_ADDR, IN_ADDR_0, MIB_IPPROTO_NETMGMT, SOCKADDR_IN, SOCKADDR_INET,
};

use crate::{create_error, TunConfig, TunError};

/// The driver library's file name, expected beside the executable.
pub(crate) const WINTUN_DLL: &str = "wintun.dll";

/// The route to the tunnel subnet through the adapter. Removed on drop if this
/// process added it; a route Windows added with the address goes with the
/// address.
pub(crate) struct Route {
    row: MIB_IPFORWARD_ROW2,
    net: Ipv4Net,
    added: bool,
}

impl Drop for Route {
    fn drop(&mut self) {
        if !self.added {
            return;
        }
        // SAFETY: `row` is a fully initialised MIB_IPFORWARD_ROW2 that
        // CreateIpForwardEntry2 accepted; the call only reads it.
        #[allow(unsafe_code)]
        let rc = unsafe { DeleteIpForwardEntry2(&self.row) };
        if rc == NO_ERROR {
            tracing::debug!(subnet = %self.net, "subnet route removed");
        } else {
            tracing::debug!(subnet = %self.net, error = %win32(rc), "removing subnet route failed (adapter gone?)");
        }
    }
}

/// Where `wintun.dll` must be: beside the running executable.
pub(crate) fn wintun_path() -> Result<PathBuf, TunError> {
    let exe = std::env::current_exe().map_err(|e| TunError::Driver {
        path: WINTUN_DLL.into(),
        reason: format!("cannot locate the executable: {e}"),
    })?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    Ok(dir.join(WINTUN_DLL))
}

/// Creates the adapter and configures it; returns it with its route.
pub(crate) fn create(cfg: &TunConfig) -> Result<(tun_rs::AsyncDevice, Option<Route>), TunError> {
    let path = wintun_path()?;
    if !path.is_file() {
        return Err(TunError::Driver {
            path,
            reason: "not found: it is installed beside sallyport-client.exe".into(),
        });
    }
    // SAFETY: loading a DLL runs its initialisation code; this is the signed
    // Wintun library installed with the program, from the program's own
    // directory (an absolute path, so the DLL search order plays no part).
    #[allow(unsafe_code)]
    let wintun = unsafe { wintun::load_from_path(&path) }.map_err(|e| TunError::Driver {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let Some(file) = path.to_str() else {
        return Err(TunError::Driver {
            path,
            reason: "path is not valid Unicode".into(),
        });
    };
    let dev = tun_rs::DeviceBuilder::new()
        .name(cfg.name.clone())
        .description("Sallyport")
        .wintun_file(file.to_string())
        .build_async()
        .map_err(|source| create_error(&cfg.name, source))?;
    match wintun::get_running_driver_version(&wintun) {
        Ok(v) => tracing::info!(driver = %v, dll = %path.display(), "Wintun loaded"),
        Err(e) => tracing::debug!(error = %e, "Wintun driver version unknown"),
    }
    let route = readdress(&dev, &cfg.name, cfg.address, cfg.prefix, cfg.mtu)?;
    Ok((dev, route))
}

/// Sets address, prefix, MTU and the subnet route, then reads each back.
pub(crate) fn readdress(
    dev: &tun_rs::AsyncDevice,
    name: &str,
    address: Ipv4Addr,
    prefix: u8,
    mtu: u16,
) -> Result<Option<Route>, TunError> {
    let configure = |what: String| {
        let name = name.to_string();
        move |source| TunError::Configure { name, what, source }
    };
    let verify = |what: String| TunError::Verify {
        name: name.to_string(),
        what,
    };
    let net = Ipv4Net::new(address, prefix)
        .map_err(|e| verify(format!("prefix /{prefix}: {e}")))?
        .trunc();

    dev.set_network_address(address, prefix, None::<Ipv4Addr>)
        .map_err(|source| TunError::Address {
            name: name.to_string(),
            address,
            prefix,
            source,
        })?;
    dev.set_mtu(mtu).map_err(configure(format!("MTU {mtu}")))?;
    let index = dev
        .if_index()
        .map_err(configure("interface index lookup".into()))?;
    let luid = dev
        .if_luid()
        .map_err(configure("interface LUID lookup".into()))?;
    let route = add_route(luid, index, net).map_err(configure(format!("route {net}")))?;

    match address_prefix(index, address) {
        Ok(p) if p == prefix => {}
        Ok(p) => {
            return Err(verify(format!(
                "address {address} has prefix /{p}, not /{prefix}"
            )))
        }
        Err(e) => {
            return Err(verify(format!(
                "address {address}/{prefix} is not set: {e}"
            )))
        }
    }
    let have = dev.mtu().map_err(configure("MTU read-back".into()))?;
    if have != mtu {
        return Err(verify(format!("MTU is {have}, not {mtu}")));
    }
    route_present(&route.row).map_err(|e| verify(format!("route {net} is missing: {e}")))?;
    tracing::debug!(interface = name, %address, prefix, mtu, subnet = %net, route_added = route.added, "adapter configured and verified");
    Ok(Some(route))
}

fn sockaddr_v4(ip: Ipv4Addr) -> SOCKADDR_INET {
    let mut sa = SOCKADDR_INET::default();
    sa.Ipv4 = SOCKADDR_IN {
        sin_family: AF_INET,
        sin_port: 0,
        sin_addr: IN_ADDR {
            S_un: IN_ADDR_0 {
                // Network byte order: the octets as they are.
                S_addr: u32::from_ne_bytes(ip.octets()),
            },
        },
        sin_zero: [0; 8],
    };
    sa
}

/// Adds the on-link route `net` via the adapter. Windows usually adds it with
/// the address already; then it is left to Windows.
fn add_route(luid: NET_LUID_LH, index: u32, net: Ipv4Net) -> io::Result<Route> {
    let mut row = MIB_IPFORWARD_ROW2::default();
    // SAFETY: `row` is a valid, writable MIB_IPFORWARD_ROW2.
    #[allow(unsafe_code)]
    unsafe {
        InitializeIpForwardEntry(&mut row)
    };
    row.InterfaceLuid = luid;
    row.InterfaceIndex = index;
    row.DestinationPrefix.Prefix = sockaddr_v4(net.network());
    row.DestinationPrefix.PrefixLength = net.prefix_len();
    row.NextHop = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    row.Metric = 0;
    row.Protocol = MIB_IPPROTO_NETMGMT;
    // SAFETY: `row` is initialised above; the call only reads it.
    #[allow(unsafe_code)]
    let rc = unsafe { CreateIpForwardEntry2(&row) };
    let added = match rc {
        NO_ERROR => true,
        ERROR_OBJECT_ALREADY_EXISTS => false,
        e => return Err(win32(e)),
    };
    Ok(Route { row, net, added })
}

/// Looks the route up by its keys (interface, prefix, next hop).
fn route_present(row: &MIB_IPFORWARD_ROW2) -> io::Result<()> {
    let mut probe = *row;
    // SAFETY: `probe` is a valid MIB_IPFORWARD_ROW2 with its key fields set;
    // the call fills in the rest.
    #[allow(unsafe_code)]
    let rc = unsafe { GetIpForwardEntry2(&mut probe) };
    if rc == NO_ERROR {
        Ok(())
    } else {
        Err(win32(rc))
    }
}

/// The on-link prefix length of `address` on interface `index`.
fn address_prefix(index: u32, address: Ipv4Addr) -> io::Result<u8> {
    let mut row = MIB_UNICASTIPADDRESS_ROW::default();
    // SAFETY: `row` is a valid, writable MIB_UNICASTIPADDRESS_ROW.
    #[allow(unsafe_code)]
    unsafe {
        InitializeUnicastIpAddressEntry(&mut row)
    };
    row.InterfaceIndex = index;
    row.Address = sockaddr_v4(address);
    // SAFETY: `row` has its key fields (interface, address) set; the call
    // fills in the rest.
    #[allow(unsafe_code)]
    let rc = unsafe { GetUnicastIpAddressEntry(&mut row) };
    if rc == NO_ERROR {
        Ok(row.OnLinkPrefixLength)
    } else {
        Err(win32(rc))
    }
}

fn win32(code: WIN32_ERROR) -> io::Error {
    io::Error::from_raw_os_error(code as i32)
}
