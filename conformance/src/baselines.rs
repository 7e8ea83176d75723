//! The VPNs the benchmark puts beside Sallyport, set up in a [`Lab`] from
//! their Debian packages: OpenVPN 2.6 (`openvpn`) over UDP or TCP, and
//! SoftEther VPN 5 (`softether-vpnserver`, `-vpnclient`, `-vpncmd`) over TLS
//! on TCP 443. Each gets a server in the lab's server namespace and a client
//! in every client namespace, with tunnel addresses in a subnet of its own.
//!
//! Debian's SoftEther keeps its state in fixed directories
//! (`/var/lib/softether`, `/var/log/softether`, `/run/softether`), so every
//! SoftEther process runs in a private mount namespace with per-process
//! directories from the lab directory bind-mounted over those.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::certs;
use crate::lab::{wait_for, Lab, ProcId, SERVER_UNDERLAY};
use crate::procstat;

/// What a baseline set up: its processes and tunnel addresses.
pub struct Baseline {
    /// The server process.
    pub server: ProcId,
    /// The client processes, by index.
    pub clients: Vec<ProcId>,
    /// The server's tunnel address.
    pub server_addr: Ipv4Addr,
    /// Each client's tunnel address, by index.
    pub addrs: Vec<Ipv4Addr>,
    /// Kills the processes' forked children when dropped.
    pub guard: DescendantGuard,
}

/// Kills (SIGKILL, by PID) the descendants of the given processes when
/// dropped. Drop it before the [`Lab`], which kills only the processes it
/// started: a daemon's forked worker would otherwise outlive the lab.
#[derive(Default)]
pub struct DescendantGuard(Vec<u32>);

impl Drop for DescendantGuard {
    fn drop(&mut self) {
        for &pid in &self.0 {
            procstat::kill_descendants(pid);
        }
    }
}

/// OpenVPN's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenVpnProto {
    /// UDP (OpenVPN's default and fastest mode).
    Udp,
    /// TCP.
    Tcp,
}

const OPENVPN_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 8, 0, 1);
const OPENVPN_DEV: &str = "ovpn0";
const UP_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts an OpenVPN 2.6 server (server mode, `client-to-client`, topology
/// subnet, tun, AES-256-GCM, a throwaway PKI, data channel offload off so the
/// data path is OpenVPN's own) and a client per client namespace; waits
/// until every client has its address and reaches the server through the
/// tunnel.
pub fn start_openvpn(lab: &mut Lab, proto: OpenVpnProto) -> anyhow::Result<Baseline> {
    let dir = lab.dir().join("openvpn");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let (pki, client_certs) =
        certs::generate_with_clients(&dir, &["openvpn-server"], lab.clients())?;
    let (server_proto, client_proto) = match proto {
        OpenVpnProto::Udp => ("udp4", "udp4"),
        OpenVpnProto::Tcp => ("tcp4-server", "tcp4-client"),
    };
    let common = |extra: &[&str]| -> Vec<OsString> {
        let mut v: Vec<OsString> = [
            "openvpn",
            "--dev",
            OPENVPN_DEV,
            "--dev-type",
            "tun",
            "--data-ciphers",
            "AES-256-GCM",
            "--disable-dco",
            "--verb",
            "3",
            "--ca",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        v.push(pki.ca.clone().into());
        v.extend(extra.iter().map(OsString::from));
        v
    };
    let server_underlay = SERVER_UNDERLAY.to_string();
    let mut argv = common(&[
        "--server",
        "10.8.0.0",
        "255.255.255.0",
        "--topology",
        "subnet",
        "--client-to-client",
        "--proto",
        server_proto,
        "--local",
        &server_underlay,
        "--port",
        "1194",
        "--dh",
        "none",
        "--keepalive",
        "10",
        "60",
    ]);
    argv.extend(["--cert".into(), pki.cert.clone().into()]);
    argv.extend(["--key".into(), pki.key.clone().into()]);
    let srv_ns = lab.server_ns();
    let server = lab.spawn_in(&srv_ns, "openvpn-server", &argv)?;
    wait_for(UP_TIMEOUT, || {
        (lab.if_addr(&srv_ns, OPENVPN_DEV) == Some(OPENVPN_SERVER_IP)).then_some(())
    })
    .with_context(|| format!("openvpn server did not come up: {}", lab.log(server)))?;
    let mut clients = Vec::new();
    for (i, c) in client_certs.iter().enumerate() {
        let mut argv = common(&[
            "--client",
            "--proto",
            client_proto,
            "--remote",
            &server_underlay,
            "1194",
            "--nobind",
            "--connect-retry",
            "1",
        ]);
        argv.extend(["--cert".into(), c.cert.clone().into()]);
        argv.extend(["--key".into(), c.key.clone().into()]);
        let ns = lab.client_ns(i);
        clients.push(lab.spawn_in(&ns, &format!("openvpn-client{i}"), &argv)?);
    }
    let addrs = wait_clients(lab, &clients, OPENVPN_DEV, OPENVPN_SERVER_IP)?;
    Ok(Baseline {
        server,
        clients,
        server_addr: OPENVPN_SERVER_IP,
        addrs,
        guard: DescendantGuard::default(),
    })
}

/// Waits until client `i` has an address on `dev` and pings `server_addr`
/// through it; the addresses by index.
fn wait_clients(
    lab: &Lab,
    clients: &[ProcId],
    dev: &str,
    server_addr: Ipv4Addr,
) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut addrs = Vec::new();
    for (i, &id) in clients.iter().enumerate() {
        let ns = lab.client_ns(i);
        let addr = wait_for(UP_TIMEOUT, || lab.if_addr(&ns, dev))
            .with_context(|| format!("client {i} got no address on {dev}: {}", lab.log(id)))?;
        wait_for(UP_TIMEOUT, || lab.ping(&ns, server_addr, 1).then_some(())).with_context(
            || {
                format!(
                    "client {i} cannot ping {server_addr} through {dev}: {}",
                    lab.log(id)
                )
            },
        )?;
        addrs.push(addr);
    }
    Ok(addrs)
}

const SOFTETHER_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const SOFTETHER_DIRS: [(&str, &str); 3] = [
    ("lib", "/var/lib/softether"),
    ("log", "/var/log/softether"),
    ("run", "/run/softether"),
];
/// The server's tap (the local bridge from the virtual hub, device "soft").
const SOFTETHER_SERVER_TAP: &str = "tap_soft";
/// The client's virtual NIC ("nic0").
const SOFTETHER_CLIENT_NIC: &str = "vpn_nic0";
/// The password of SoftEther user `u{i}` (client `i`).
fn softether_password(i: usize) -> String {
    format!("lab-password-{i}")
}

/// The command line that runs `argv` with SoftEther's state directories
/// replaced by `<state>/{lib,log,run}` (created here), in a private mount
/// namespace. The program keeps the PID (`unshare` and `sh` exec).
fn softether_argv(state: &Path, argv: &[&str]) -> anyhow::Result<Vec<OsString>> {
    let mut script = String::from("set -e\n");
    for (sub, target) in SOFTETHER_DIRS {
        std::fs::create_dir_all(state.join(sub))
            .with_context(|| format!("create {}", state.join(sub).display()))?;
        // The mount points themselves must exist in the host's tree.
        std::fs::create_dir_all(target).with_context(|| format!("create {target}"))?;
        script.push_str(&format!("mount --bind \"$1/{sub}\" {target}\n"));
    }
    script.push_str("shift\nexec \"$@\"\n");
    let mut v: Vec<OsString> = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
        .iter()
        .map(OsString::from)
        .collect();
    v.push(script.into());
    v.push("sh".into());
    v.push(state.into());
    v.extend(argv.iter().map(OsString::from));
    Ok(v)
}

/// Runs `vpncmd` in `ns` with the commands in `commands` (one a line);
/// fails when vpncmd or any command reports an error.
fn vpncmd(
    lab: &Lab,
    ns: &str,
    state: &Path,
    target: &[&str],
    commands: &str,
) -> anyhow::Result<()> {
    let file = state.with_extension("vpncmd");
    std::fs::write(&file, commands).with_context(|| format!("write {}", file.display()))?;
    let input = format!("/IN:{}", file.display());
    let mut argv = vec!["/usr/libexec/softether/vpncmd/vpncmd"];
    argv.extend_from_slice(target);
    argv.push(&input);
    let out = lab.exec(ns, &softether_argv(state, &argv)?)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Error occurred") {
        bail!(
            "vpncmd {} in {ns} failed ({}): {}{}",
            target.join(" "),
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Waits until something in `ns` listens on TCP `port`.
fn wait_listen(lab: &Lab, ns: &str, port: u16) -> Option<()> {
    wait_for(UP_TIMEOUT, || {
        let o = lab
            .exec(ns, &["ss", "-Hltn", &format!("sport = :{port}")])
            .ok()?;
        (!o.stdout.is_empty()).then_some(())
    })
}

/// Starts a SoftEther VPN 5 server on the server's underlay port 443 (its
/// other listeners removed, SecureNAT and UDP acceleration off, so the data
/// goes over TLS on TCP 443 only), its virtual hub bridged to a tap in the
/// server namespace that holds 10.200.0.1/24, and a SoftEther client in
/// every client namespace (user `u{i}`, address 10.200.0.(11+i)/24 on its
/// virtual NIC). Client to client goes through the virtual hub.
pub fn start_softether(lab: &mut Lab) -> anyhow::Result<Baseline> {
    let base: PathBuf = lab.dir().join("softether");
    let srv_ns = lab.server_ns();
    let mut guard = DescendantGuard::default();
    let srv_state = base.join("server");
    let argv = softether_argv(
        &srv_state,
        &["/usr/libexec/softether/vpnserver/vpnserver", "execsvc"],
    )?;
    let server = lab.spawn_in(&srv_ns, "vpnserver", &argv)?;
    guard.0.push(lab.pid(server));
    wait_listen(lab, &srv_ns, 443)
        .with_context(|| format!("vpnserver did not listen on 443: {}", lab.log(server)))?;
    let mut cmds = String::from(
        "ListenerDelete 992\nListenerDelete 1194\nListenerDelete 5555\n\
         Hub DEFAULT\nSecureNatDisable\nExtOptionSet DisableUdpAcceleration /VALUE:true\n",
    );
    for i in 0..lab.clients() {
        cmds.push_str(&format!(
            "UserCreate u{i} /GROUP:none /REALNAME:none /NOTE:none\n\
             UserPasswordSet u{i} /PASSWORD:{}\n",
            softether_password(i)
        ));
    }
    cmds.push_str("BridgeCreate DEFAULT /DEVICE:soft /TAP:yes\n");
    vpncmd(
        lab,
        &srv_ns,
        &base.join("vpncmd-server"),
        &["localhost:443", "/SERVER"],
        &cmds,
    )?;
    wait_for(UP_TIMEOUT, || {
        lab.if_addr(&srv_ns, SOFTETHER_SERVER_TAP).or_else(|| {
            let _ = lab.exec(
                &srv_ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    "10.200.0.1/24",
                    "dev",
                    SOFTETHER_SERVER_TAP,
                ],
            );
            None
        })
    })
    .with_context(|| {
        format!(
            "vpnserver made no {SOFTETHER_SERVER_TAP}: {}",
            lab.log(server)
        )
    })?;

    let mut clients = Vec::new();
    for i in 0..lab.clients() {
        let ns = lab.client_ns(i);
        let state = base.join(format!("client{i}"));
        let argv = softether_argv(
            &state,
            &["/usr/libexec/softether/vpnclient/vpnclient", "execsvc"],
        )?;
        let id = lab.spawn_in(&ns, &format!("vpnclient{i}"), &argv)?;
        guard.0.push(lab.pid(id));
        clients.push(id);
        wait_listen(lab, &ns, 9931)
            .with_context(|| format!("vpnclient {i} did not start: {}", lab.log(id)))?;
        let cmds = format!(
            "NicCreate nic0\n\
             AccountCreate lab /SERVER:{SERVER_UNDERLAY}:443 /HUB:DEFAULT /USERNAME:u{i} /NICNAME:nic0\n\
             AccountPasswordSet lab /PASSWORD:{} /TYPE:standard\n\
             AccountConnect lab\n",
            softether_password(i)
        );
        vpncmd(
            lab,
            &ns,
            &base.join(format!("vpncmd-client{i}")),
            &["localhost", "/CLIENT"],
            &cmds,
        )?;
        let addr = format!("10.200.0.{}/24", 11 + i);
        wait_for(UP_TIMEOUT, || {
            lab.if_addr(&ns, SOFTETHER_CLIENT_NIC).or_else(|| {
                let _ = lab.exec(
                    &ns,
                    &["ip", "addr", "add", &addr, "dev", SOFTETHER_CLIENT_NIC],
                );
                None
            })
        })
        .with_context(|| {
            format!(
                "vpnclient {i} made no {SOFTETHER_CLIENT_NIC}: {}",
                lab.log(id)
            )
        })?;
    }
    let addrs = wait_clients(lab, &clients, SOFTETHER_CLIENT_NIC, SOFTETHER_SERVER_IP)?;
    Ok(Baseline {
        server,
        clients,
        server_addr: SOFTETHER_SERVER_IP,
        addrs,
        guard,
    })
}
