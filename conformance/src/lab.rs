//! A network-namespace lab in the style of WireGuard's `netns.sh`.
//!
//! One namespace for the server with a bridge at 198.18.0.1/24, one namespace
//! per client at 198.18.0.(10+i)/24, joined by veth pairs. Every name carries
//! the process id and a counter, so labs never collide. Dropping the lab kills
//! its processes (by PID) and deletes its namespaces.
//!
//! Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip`, and for most uses
//! `ping` and `iperf3`.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::certs::{self, CertFiles};

/// The server's underlay address.
pub const SERVER_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The default tunnel address of the server.
pub const SERVER_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// The proxy namespace's address on the server's underlay.
pub const PROXY_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
/// The router namespace's address on the server's underlay
/// ([`Lab::add_client_behind_router`]).
pub const ROUTER_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 6);
/// Routing table in the router namespace that sends packets into the
/// impairment device.
const IMPAIR_TABLE: &str = "100";
/// The impairment device in the router namespace.
const IMPAIR_DEV: &str = "imp0";
/// `[server]` lines for a server behind the lab's nginx ([`Lab::start_nginx`]).
pub const BEHIND_NGINX: &str = "listen_addr = \"198.18.0.1:8443\"\nplain_listen_addr = \"127.0.0.1:8080\"\ntrusted_proxies = [\"127.0.0.1/32\"]";
/// Tokens the lab's default server accepts.
pub const TOKENS: [&str; 2] = ["lab-token-1", "lab-token-2"];

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A handle to a process started in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId(usize);

struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
    exited: Option<std::process::ExitStatus>,
}

impl Proc {
    /// Ends the process and what it started, by PID, children first: a
    /// wrapper such as `timeout` does not pass SIGKILL on, and an orphaned
    /// iperf3 whose namespace is gone spins on a core.
    fn end(&mut self) {
        if self.exited.is_none() {
            crate::procstat::kill_descendants(self.child.id());
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }
}

/// The lab. See the module docs.
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    keep_dir: bool,
    namespaces: Vec<String>,
    clients: usize,
    /// Underlay address of each client, by index.
    client_addrs: Vec<Ipv4Addr>,
    /// The proxy namespace, once created.
    proxy_ns: Option<String>,
    /// The router namespace, once created.
    router_ns: Option<String>,
    /// The router's links to its clients.
    router_legs: Vec<String>,
    /// Each client's link as seen from the other end: (namespace, interface).
    client_links: Vec<(String, String)>,
    procs: Vec<Proc>,
    bin_dir: PathBuf,
    /// Certificates for the server (valid for 198.18.0.1 and "sallyport-lab").
    pub certs: CertFiles,
}

impl Lab {
    /// Builds a lab with `clients` client namespaces. `tag` appears in names
    /// (keep it short: interface names are limited to 15 characters).
    pub fn new(tag: &str, clients: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(clients <= 200, "at most 200 clients");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("sp{}{}{}", tag, std::process::id() % 100_000, n);
        let dir = std::env::temp_dir().join(format!("sallyport-{prefix}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let certs = certs::generate(&dir, &["sallyport-lab", &SERVER_UNDERLAY.to_string()])?;
        let mut lab = Self {
            prefix,
            dir,
            keep_dir: std::env::var_os("SALLYPORT_KEEP_LAB").is_some(),
            namespaces: Vec::new(),
            clients,
            client_addrs: (0..clients)
                .map(|i| Ipv4Addr::new(198, 18, 0, 10 + i as u8))
                .collect(),
            proxy_ns: None,
            router_ns: None,
            router_legs: Vec::new(),
            client_links: Vec::new(),
            procs: Vec::new(),
            bin_dir: bin_dir()?,
            certs,
        };
        lab.build_underlay()?;
        Ok(lab)
    }

    fn build_underlay(&mut self) -> anyhow::Result<()> {
        let srv = self.server_ns();
        self.add_ns(&srv)?;
        run(&["ip", "-n", &srv, "link", "add", "br0", "type", "bridge"])?;
        run(&[
            "ip",
            "-n",
            &srv,
            "addr",
            "add",
            "198.18.0.1/24",
            "dev",
            "br0",
        ])?;
        run(&["ip", "-n", &srv, "link", "set", "br0", "up"])?;
        for i in 0..self.clients {
            let ns = self.client_ns(i);
            self.add_ns(&ns)?;
            let veth = format!("vc{i}");
            add_veth(&srv, &veth, None, &ns, self.client_underlay(i))?;
            self.client_links.push((srv.clone(), veth));
        }
        Ok(())
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        run(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The server's namespace.
    pub fn server_ns(&self) -> String {
        format!("{}-s", self.prefix)
    }

    /// Client `i`'s namespace.
    pub fn client_ns(&self, i: usize) -> String {
        format!("{}-c{i}", self.prefix)
    }

    /// Client `i`'s underlay address.
    pub fn client_underlay(&self, i: usize) -> Ipv4Addr {
        self.client_addrs[i]
    }

    /// The proxy namespace: on the server's underlay at [`PROXY_UNDERLAY`],
    /// and the only way out for clients added with [`Lab::add_client_behind_proxy`].
    /// Created on first use; it does not forward IP packets.
    pub fn proxy_ns(&mut self) -> anyhow::Result<String> {
        if let Some(ns) = &self.proxy_ns {
            return Ok(ns.clone());
        }
        let ns = format!("{}-x", self.prefix);
        let srv = self.server_ns();
        self.add_ns(&ns)?;
        add_veth(&srv, "vx", None, &ns, PROXY_UNDERLAY)?;
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=0",
        ])?;
        self.proxy_ns = Some(ns.clone());
        Ok(ns)
    }

    /// Adds a client namespace whose only link goes to the proxy namespace
    /// (198.19.k.2/24, the proxy at 198.19.k.1): it cannot reach the server
    /// except through a proxy running there. Returns the client's index and
    /// the proxy's address on its link.
    pub fn add_client_behind_proxy(&mut self) -> anyhow::Result<(usize, Ipv4Addr)> {
        let proxy = self.proxy_ns()?;
        let i = self.clients;
        let k = (i + 1) as u8;
        let ns = self.client_ns(i);
        self.add_ns(&ns)?;
        let veth = format!("vp{i}");
        let proxy_addr = Ipv4Addr::new(198, 19, k, 1);
        let client_addr = Ipv4Addr::new(198, 19, k, 2);
        add_veth(&proxy, &veth, Some(proxy_addr), &ns, client_addr)?;
        self.clients += 1;
        self.client_addrs.push(client_addr);
        self.client_links.push((proxy, veth));
        Ok((i, proxy_addr))
    }

    /// The router namespace: on the server's underlay at [`ROUTER_UNDERLAY`],
    /// forwarding IP packets for the clients added with
    /// [`Lab::add_client_behind_router`] (198.19.128.0/17; the server routes
    /// it there). Plain kernel forwarding until [`Lab::start_impairment`].
    pub fn router_ns(&mut self) -> anyhow::Result<String> {
        if let Some(ns) = &self.router_ns {
            return Ok(ns.clone());
        }
        let ns = format!("{}-r", self.prefix);
        let srv = self.server_ns();
        self.add_ns(&ns)?;
        add_veth(&srv, "vr", None, &ns, ROUTER_UNDERLAY)?;
        // Forward, without reverse-path checks (packets come back in from the
        // impairment device) and without redirects.
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        ] {
            run(&["ip", "netns", "exec", &ns, "sysctl", "-qw", setting])?;
        }
        run(&[
            "ip",
            "-n",
            &srv,
            "route",
            "add",
            "198.19.128.0/17",
            "via",
            &ROUTER_UNDERLAY.to_string(),
        ])?;
        self.router_ns = Some(ns.clone());
        Ok(ns)
    }

    /// Adds a client namespace whose only link goes to the router namespace
    /// (198.19.(128+k).2/24, default route via the router at .1): every
    /// packet between it and the server crosses the router. Returns the
    /// client's index. Add these clients before [`Lab::start_impairment`].
    pub fn add_client_behind_router(&mut self) -> anyhow::Result<usize> {
        let router = self.router_ns()?;
        anyhow::ensure!(self.router_legs.len() < 127, "at most 127 routed clients");
        let i = self.clients;
        let k = 128 + self.router_legs.len() as u8;
        let ns = self.client_ns(i);
        self.add_ns(&ns)?;
        let veth = format!("vr{i}");
        let router_addr = Ipv4Addr::new(198, 19, k, 1);
        let client_addr = Ipv4Addr::new(198, 19, k, 2);
        add_veth(&router, &veth, Some(router_addr), &ns, client_addr)?;
        let via = router_addr.to_string();
        run(&["ip", "-n", &ns, "route", "add", "default", "via", &via])?;
        self.clients += 1;
        self.client_addrs.push(client_addr);
        self.router_legs.push(veth.clone());
        self.client_links.push((router, veth));
        Ok(i)
    }

    /// Starts `sallyport-impair` in the router namespace and routes every
    /// packet the router forwards (both directions, on every link) through
    /// it: each packet is held `delay`, and `loss_percent` % of them are
    /// dropped. Killing the process ends the impairment (the device and its
    /// route go; the rules then fall through to plain forwarding).
    pub fn start_impairment(
        &mut self,
        delay: Duration,
        loss_percent: f64,
    ) -> anyhow::Result<ProcId> {
        let router = self.router_ns()?;
        let bin = self.bin("sallyport-impair");
        let (d, l) = (delay.as_millis().to_string(), loss_percent.to_string());
        let id = self.spawn_in(
            &router,
            "impair",
            &[
                bin.as_os_str(),
                "--dev".as_ref(),
                IMPAIR_DEV.as_ref(),
                "--delay-ms".as_ref(),
                d.as_ref(),
                "--loss-percent".as_ref(),
                l.as_ref(),
            ],
        )?;
        let up = wait_for(Duration::from_secs(5), || {
            let o = self
                .exec(&router, &["ip", "link", "show", "dev", IMPAIR_DEV, "up"])
                .ok()?;
            (!o.stdout.is_empty()).then_some(())
        });
        if up.is_none() {
            bail!(
                "sallyport-impair did not create {IMPAIR_DEV}: {}",
                self.log(id)
            );
        }
        run(&[
            "ip",
            "-n",
            &router,
            "route",
            "replace",
            "default",
            "dev",
            IMPAIR_DEV,
            "table",
            IMPAIR_TABLE,
        ])?;
        // Packets coming back out of the device use the main table.
        let legs: Vec<String> = std::iter::once("eth0".to_string())
            .chain(self.router_legs.iter().cloned())
            .collect();
        for leg in legs {
            run(&[
                "ip",
                "-n",
                &router,
                "rule",
                "add",
                "iif",
                &leg,
                "lookup",
                IMPAIR_TABLE,
                "pref",
                "100",
            ])?;
        }
        Ok(id)
    }

    /// Takes client `i`'s link down (`up` false) or back up, at its far end
    /// (the server's bridge port, the proxy's or the router's side): the
    /// client's interface loses its carrier, as when a cable is pulled.
    pub fn set_client_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let (ns, dev) = &self.client_links[i];
        let state = if up { "up" } else { "down" };
        run(&["ip", "-n", ns, "link", "set", dev, state])
    }

    /// Number of client namespaces.
    pub fn clients(&self) -> usize {
        self.clients
    }

    /// The lab's scratch directory (configs, certificates, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server config on the defaults, listening on the underlay, with
    /// `extra` TOML appended inside the right sections (`[section]` headers in
    /// `extra` must not repeat the ones here; use `server_extra` etc.).
    pub fn server_config(&self, name: &str, sections: &ConfigExtra) -> anyhow::Result<PathBuf> {
        // `listen_addr` in `sections.server` replaces the default one.
        let listen = if sections
            .server
            .lines()
            .any(|l| l.trim_start().starts_with("listen_addr"))
        {
            String::new()
        } else {
            format!("listen_addr = \"{SERVER_UNDERLAY}:443\"\n")
        };
        // Leases are kept in the lab directory (never the host's /var/lib).
        let leases = if sections.vpn.contains("lease_file") {
            String::new()
        } else {
            format!("lease_file = \"{}\"\n", self.lease_file().display())
        };
        let text = format!(
            "[server]\n{listen}tls_cert = \"{}\"\ntls_key = \"{}\"\n{}\n\
             [vpn]\n{leases}{}\n[auth]\ntokens = [\"{}\", \"{}\"]\n{}\n",
            self.certs.cert.display(),
            self.certs.key.display(),
            sections.server,
            sections.vpn,
            TOKENS[0],
            TOKENS[1],
            sections.rest,
        );
        self.write(name, &text)
    }

    /// The lease file of servers started with [`Lab::server_config`].
    pub fn lease_file(&self) -> PathBuf {
        self.dir.join("leases.json")
    }

    /// A client config on the defaults pointing at the lab's server.
    pub fn client_config(
        &self,
        name: &str,
        token: &str,
        sections: &ConfigExtra,
    ) -> anyhow::Result<PathBuf> {
        let state = self.dir.join(format!("{name}.transport-state"));
        let text = format!(
            "[server]\nurl = \"wss://{SERVER_UNDERLAY}:443/tunnel\"\nca_file = \"{}\"\n{}\n\
             [transport]\nstate_file = \"{}\"\n{}\n\
             [auth]\ntoken = \"{token}\"\n[vpn]\n{}\n{}\n",
            self.certs.ca.display(),
            sections.server,
            state.display(),
            sections.transport,
            sections.vpn,
            sections.rest,
        );
        self.write(name, &text)
    }

    /// Writes a file into the lab directory.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }

    /// Path of one of the product's binaries.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Starts the server in its namespace.
    pub fn start_server(&mut self, config: &Path) -> anyhow::Result<ProcId> {
        let ns = self.server_ns();
        let bin = self.bin("sallyport-server");
        self.spawn_in(
            &ns,
            "server",
            &[bin.as_os_str(), "--config".as_ref(), config.as_os_str()],
        )
    }

    /// Waits until the server's TLS port accepts TCP from namespace `ns`.
    pub fn wait_server_listening(&self, ns: &str, timeout: Duration) -> anyhow::Result<()> {
        let probe = format!("echo > /dev/tcp/{SERVER_UNDERLAY}/443");
        wait_for(timeout, || {
            self.exec(ns, &["bash", "-c", &probe])
                .ok()
                .filter(|o| o.status.success())
        })
        .map(|_| ())
        .with_context(|| {
            format!("server not listening on {SERVER_UNDERLAY}:443 within {timeout:?}")
        })
    }

    /// Starts a client in client namespace `i`.
    pub fn start_client(&mut self, i: usize, config: &Path) -> anyhow::Result<ProcId> {
        let ns = self.client_ns(i);
        let bin = self.bin("sallyport-client");
        self.spawn_in(
            &ns,
            &format!("client{i}"),
            &[bin.as_os_str(), "--config".as_ref(), config.as_os_str()],
        )
    }

    /// Starts any command in namespace `ns`, logging to a file in the lab dir.
    pub fn spawn_in<S: AsRef<std::ffi::OsStr>>(
        &mut self,
        ns: &str,
        label: &str,
        argv: &[S],
    ) -> anyhow::Result<ProcId> {
        let log = self.dir.join(format!("{label}.{}.log", self.procs.len()));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn {label} in {ns}"))?;
        self.procs.push(Proc {
            label: label.into(),
            child,
            log,
            exited: None,
        });
        Ok(ProcId(self.procs.len() - 1))
    }

    /// The process's PID (`ip netns exec` execs, so this is the program's).
    pub fn pid(&self, id: ProcId) -> u32 {
        self.procs[id.0].child.id()
    }

    /// Sends `signal` (a name such as `TERM` or `INT`) to the process, by PID.
    pub fn signal(&self, id: ProcId, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(id).to_string())
            .status();
    }

    /// Waits up to `timeout` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, id: ProcId, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let p = &mut self.procs[id.0];
        if let Some(s) = p.exited {
            return Some(s);
        }
        loop {
            if let Ok(Some(s)) = p.child.try_wait() {
                p.exited = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and what it started with SIGKILL, by PID, and reaps
    /// it.
    pub fn kill(&mut self, id: ProcId) {
        self.procs[id.0].end();
    }

    /// Everything the process has logged so far.
    pub fn log(&self, id: ProcId) -> String {
        std::fs::read_to_string(&self.procs[id.0].log).unwrap_or_default()
    }

    /// The IPv4 address on `ifname` in `ns`, if the interface exists and has one.
    pub fn if_addr(&self, ns: &str, ifname: &str) -> Option<Ipv4Addr> {
        let out = Command::new("ip")
            .args(["-n", ns, "-4", "-o", "addr", "show", "dev", ifname])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let word = text
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)?;
        word.split('/').next()?.parse().ok()
    }

    /// Waits until client `i` has a tunnel address on `sallyport0`.
    pub fn wait_client_addr(&self, i: usize, timeout: Duration) -> anyhow::Result<Ipv4Addr> {
        let ns = self.client_ns(i);
        wait_for(timeout, || self.if_addr(&ns, "sallyport0"))
            .with_context(|| format!("client {i} got no tunnel address within {timeout:?}"))
    }

    /// Runs a command in `ns` and returns its output.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, ns: &str, argv: &[S]) -> anyhow::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run in {ns}"))
    }

    /// Whether `count` pings from `ns` to `dst` all get answers.
    pub fn ping(&self, ns: &str, dst: Ipv4Addr, count: u32) -> bool {
        let (c, d) = (count.to_string(), dst.to_string());
        self.exec(ns, &["ping", "-c", &c, "-i", "0.2", "-W", "2", "-q", &d])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Runs iperf3 from `from_ns` to a server started in `to_ns` bound to
    /// `to_addr`, for `secs` seconds with `streams` parallel streams; returns
    /// the receiver's throughput in bit/s.
    pub fn iperf3(
        &mut self,
        from_ns: &str,
        to_ns: &str,
        to_addr: Ipv4Addr,
        secs: u32,
        streams: u32,
    ) -> anyhow::Result<f64> {
        self.iperf3_result(from_ns, to_ns, to_addr, secs, streams)
            .map(|r| r.bits_per_second)
    }

    /// As [`Lab::iperf3`], with the bytes the receiver got.
    pub fn iperf3_result(
        &mut self,
        from_ns: &str,
        to_ns: &str,
        to_addr: Ipv4Addr,
        secs: u32,
        streams: u32,
    ) -> anyhow::Result<Iperf3Result> {
        let (srv, port) = self.start_iperf3_server(to_ns, to_addr)?;
        let (p, addr) = (port.to_string(), to_addr.to_string());
        let (t, n) = (secs.to_string(), streams.to_string());
        let out = self.exec(
            from_ns,
            &[
                "timeout",
                &(secs + 15).to_string(),
                "iperf3",
                "-c",
                &addr,
                "-p",
                &p,
                "-t",
                &t,
                "-P",
                &n,
                "-J",
            ],
        )?;
        self.kill(srv);
        iperf3_parse(&out.stdout, &out.stderr)
    }

    /// Starts an iperf3 server bound to `to_addr` in `to_ns` for one test on
    /// a fresh port; returns it and the port once it listens.
    fn start_iperf3_server(
        &mut self,
        to_ns: &str,
        to_addr: Ipv4Addr,
    ) -> anyhow::Result<(ProcId, u16)> {
        let port = 5201 + (COUNTER.fetch_add(1, Ordering::Relaxed) % 1000) as u16;
        let (p, addr) = (port.to_string(), to_addr.to_string());
        let srv = self.spawn_in(
            to_ns,
            "iperf3-server",
            &["iperf3", "-s", "-1", "-B", &addr, "-p", &p],
        )?;
        let ready = wait_for(Duration::from_secs(5), || {
            let o = self
                .exec(to_ns, &["ss", "-Hltn", &format!("sport = :{port}")])
                .ok()?;
            (!o.stdout.is_empty()).then_some(())
        });
        if ready.is_none() {
            self.kill(srv);
            bail!("iperf3 server did not start in {to_ns}");
        }
        Ok((srv, port))
    }

    /// Sends `count` pings from `ns` to `dst`, `interval_s` apart; the
    /// round-trip time of each answer in milliseconds. Fails when none came
    /// back.
    pub fn ping_rtts(
        &self,
        ns: &str,
        dst: Ipv4Addr,
        count: u32,
        interval_s: f64,
    ) -> anyhow::Result<Vec<f64>> {
        let (c, i, d) = (count.to_string(), interval_s.to_string(), dst.to_string());
        let out = self.exec(ns, &["ping", "-n", "-c", &c, "-i", &i, "-W", "2", &d])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rtts: Vec<f64> = text
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("time=")?.parse().ok())
            .collect();
        if rtts.is_empty() {
            bail!("ping {dst} from {ns}: no answer");
        }
        Ok(rtts)
    }

    /// Starts a Sallyport server on the defaults and a client in each client
    /// namespace (token 1), waits for every client's tunnel address. `mode`
    /// fixes the clients' transport; `nginx` puts the documented nginx recipe
    /// (docs/deploy-nginx.conf) in front of the server.
    pub fn start_sallyport(
        &mut self,
        mode: Option<&str>,
        nginx: bool,
    ) -> anyhow::Result<SallyportProcs> {
        let server_extra = ConfigExtra {
            server: if nginx {
                BEHIND_NGINX.into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        let scfg = self.server_config("server.toml", &server_extra)?;
        let server = self.start_server(&scfg)?;
        let nginx = if nginx {
            let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy-nginx.conf");
            Some(self.start_nginx(&recipe, true, "60s")?)
        } else {
            None
        };
        let client_extra = ConfigExtra {
            transport: mode.map(|m| format!("mode = \"{m}\"")).unwrap_or_default(),
            ..Default::default()
        };
        let mut clients = Vec::new();
        for i in 0..self.clients {
            let c = self.client_config(&format!("client{i}.toml"), TOKENS[0], &client_extra)?;
            clients.push(self.start_client(i, &c)?);
        }
        let mut addrs = Vec::new();
        for i in 0..self.clients {
            addrs.push(self.wait_client_addr(i, Duration::from_secs(15))?);
        }
        Ok(SallyportProcs {
            server,
            nginx,
            clients,
            addrs,
        })
    }
}

/// What [`Lab::iperf3_result`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Iperf3Result {
    /// The receiver's throughput.
    pub bits_per_second: f64,
    /// Bytes the receiver got.
    pub bytes: u64,
}

/// The processes and addresses [`Lab::start_sallyport`] set up.
#[derive(Debug, Clone)]
pub struct SallyportProcs {
    /// The server.
    pub server: ProcId,
    /// nginx in front of it, if asked for.
    pub nginx: Option<ProcId>,
    /// The clients, by index.
    pub clients: Vec<ProcId>,
    /// Each client's tunnel address, by index.
    pub addrs: Vec<Ipv4Addr>,
}

/// What the receiver got, from `iperf3 -J` output.
fn iperf3_parse(stdout: &[u8], stderr: &[u8]) -> anyhow::Result<Iperf3Result> {
    let json: serde_json::Value = serde_json::from_slice(stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(stderr)))?;
    if let Some(e) = json.get("error") {
        bail!("iperf3: {e}");
    }
    let received = &json["end"]["sum_received"];
    Ok(Iperf3Result {
        bits_per_second: received["bits_per_second"]
            .as_f64()
            .context("iperf3 reported no throughput")?,
        bytes: received["bytes"]
            .as_u64()
            .context("iperf3 reported no byte count")?,
    })
}

/// The receiver's throughput in bit/s from `iperf3 -J` output.
fn iperf3_rate(stdout: &[u8], stderr: &[u8]) -> anyhow::Result<f64> {
    iperf3_parse(stdout, stderr).map(|r| r.bits_per_second)
}

/// One iperf3 client for [`Lab::iperf3_many`].
#[derive(Debug, Clone)]
pub struct Iperf3Run {
    /// Namespace the client runs in.
    pub from_ns: String,
    /// Namespace the server runs in.
    pub to_ns: String,
    /// Address the server binds to.
    pub to_addr: Ipv4Addr,
    /// Parallel streams.
    pub streams: u32,
    /// Further client arguments (e.g. `--repeating-payload`, `-O 1`).
    pub extra: Vec<String>,
}

/// A background iperf3 test ([`Lab::start_iperf3`]).
#[derive(Debug)]
pub struct Iperf3Handle {
    client: ProcId,
    server: ProcId,
}

impl Lab {
    /// Runs several iperf3 clients at the same time, each against its own
    /// server, for `secs` seconds; returns each receiver's throughput in
    /// bit/s, in the order given.
    pub fn iperf3_many(&mut self, runs: &[Iperf3Run], secs: u32) -> anyhow::Result<Vec<f64>> {
        let mut servers = Vec::new();
        let mut ports = Vec::new();
        for r in runs {
            match self.start_iperf3_server(&r.to_ns, r.to_addr) {
                Ok((srv, port)) => {
                    servers.push(srv);
                    ports.push(port);
                }
                Err(e) => {
                    for s in servers {
                        self.kill(s);
                    }
                    return Err(e);
                }
            }
        }
        let mut clients = Vec::new();
        for (r, port) in runs.iter().zip(&ports) {
            let child = Command::new("ip")
                .args(["netns", "exec", &r.from_ns, "timeout"])
                .arg((secs + 15).to_string())
                .args([
                    "iperf3",
                    "-c",
                    &r.to_addr.to_string(),
                    "-p",
                    &port.to_string(),
                ])
                .args(["-t", &secs.to_string(), "-P", &r.streams.to_string(), "-J"])
                .args(&r.extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("spawn iperf3 in {}", r.from_ns))?;
            clients.push(child);
        }
        let outputs: Vec<_> = clients.into_iter().map(|c| c.wait_with_output()).collect();
        for s in servers {
            self.kill(s);
        }
        let mut result = Vec::new();
        for out in outputs {
            let out = out.context("wait for iperf3")?;
            result.push(iperf3_rate(&out.stdout, &out.stderr)?);
        }
        Ok(result)
    }

    /// Starts one iperf3 test in the background for up to `secs` seconds
    /// (client and server are lab processes), reporting every second; see
    /// [`Lab::iperf3_intervals`] and [`Lab::stop_iperf3`].
    pub fn start_iperf3(&mut self, run: &Iperf3Run, secs: u32) -> anyhow::Result<Iperf3Handle> {
        let (server, port) = self.start_iperf3_server(&run.to_ns, run.to_addr)?;
        let mut argv: Vec<String> = [
            "timeout",
            &(secs + 15).to_string(),
            "iperf3",
            "-c",
            &run.to_addr.to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &run.streams.to_string(),
            "-i",
            "1",
            "--forceflush",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(run.extra.iter().cloned());
        let client = self.spawn_in(&run.from_ns, "iperf3-client", &argv)?;
        Ok(Iperf3Handle { client, server })
    }

    /// The sending rate (bit/s) of each one-second interval a background
    /// iperf3 test has reported so far.
    pub fn iperf3_intervals(&self, h: &Iperf3Handle) -> Vec<f64> {
        self.log(h.client)
            .lines()
            .filter(|l| l.contains(" sec ") && !l.contains("sender") && !l.contains("receiver"))
            .filter(|l| !l.starts_with("[SUM]"))
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let unit = words.iter().position(|w| w.ends_with("bits/sec"))?;
                let value: f64 = words.get(unit.checked_sub(1)?)?.parse().ok()?;
                let scale = match words[unit].chars().next()? {
                    'K' => 1e3,
                    'M' => 1e6,
                    'G' => 1e9,
                    _ => 1.0,
                };
                Some(value * scale)
            })
            .collect()
    }

    /// Whether a background iperf3 test is still running (it ends early
    /// when its connection breaks).
    pub fn iperf3_running(&mut self, h: &Iperf3Handle) -> bool {
        self.wait_exit(h.client, Duration::ZERO).is_none()
    }

    /// Stops a background iperf3 test; its log keeps what it reported.
    pub fn stop_iperf3(&mut self, h: Iperf3Handle) {
        self.kill(h.client);
        self.kill(h.server);
    }

    /// `GET http://{addr}{path}` from inside namespace `ns` (with curl);
    /// the body of a 2xx answer.
    pub fn http_get(
        &self,
        ns: &str,
        addr: std::net::SocketAddr,
        path: &str,
    ) -> anyhow::Result<String> {
        let url = format!("http://{addr}{path}");
        let out = self.exec(ns, &["curl", "-sS", "--fail", "--max-time", "5", &url])?;
        if !out.status.success() {
            bail!("GET {url}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A counter of `ifname` in `ns` from sysfs, e.g. `rx_packets`.
    pub fn if_stat(&self, ns: &str, ifname: &str, stat: &str) -> anyhow::Result<u64> {
        let path = format!("/sys/class/net/{ifname}/statistics/{stat}");
        let out = self.exec(ns, &["cat", &path])?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("read {path} in {ns}"))
    }
}

impl Lab {
    /// Starts nginx in the server namespace on 443 with the nginx recipe at
    /// `recipe` (docs/deploy-nginx.conf), in front of a server configured with
    /// [`BEHIND_NGINX`]. Only the certificate paths are substituted, and every
    /// `60s` timeout becomes `timeout`. `grpc` false removes the `grpc_pass`
    /// block: a front that forwards only WebSocket.
    pub fn start_nginx(
        &mut self,
        recipe: &Path,
        grpc: bool,
        timeout: &str,
    ) -> anyhow::Result<ProcId> {
        let text = std::fs::read_to_string(recipe)
            .with_context(|| format!("read {}", recipe.display()))?;
        let cert = self.certs.cert.display().to_string();
        let key = self.certs.key.display().to_string();
        let mut site = text
            .replace("/etc/ssl/certs/vpn.example.com.crt", &cert)
            .replace("/etc/ssl/private/vpn.example.com.key", &key)
            .replace("60s;", &format!("{timeout};"));
        if !grpc {
            let start = site
                .find("        if ($content_type")
                .context("recipe has no grpc block")?;
            let end = start + site[start..].find("}\n").context("end of grpc block")? + 2;
            site.replace_range(start..end, "");
            anyhow::ensure!(!site
                .lines()
                .any(|l| l.trim_start().starts_with("grpc_pass")));
        }
        let dir = self.dir.clone();
        self.write("nginx-site.conf", &site)?;
        std::fs::create_dir_all(dir.join("nginx-tmp"))?;
        let main = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log info;\nevents {{ worker_connections 1024; }}\n\
             http {{\n access_log {d}/nginx-access.log;\n client_body_temp_path {d}/nginx-tmp;\n\
             proxy_temp_path {d}/nginx-tmp;\n fastcgi_temp_path {d}/nginx-tmp;\n\
             uwsgi_temp_path {d}/nginx-tmp;\n scgi_temp_path {d}/nginx-tmp;\n\
             include {d}/nginx-site.conf;\n}}\n",
            d = dir.display()
        );
        let conf = self.write("nginx.conf", &main)?;
        let ns = self.server_ns();
        let id = self.spawn_in(
            &ns,
            "nginx",
            &[
                "nginx".as_ref(),
                "-c".as_ref(),
                conf.as_os_str(),
                "-p".as_ref(),
                dir.as_os_str(),
            ],
        )?;
        let up = wait_for(Duration::from_secs(5), || {
            let o = self.exec(&ns, &["ss", "-Hltn", "sport = :443"]).ok()?;
            (!o.stdout.is_empty()).then_some(())
        });
        if up.is_none() {
            bail!("nginx did not start: {}", self.log(id));
        }
        Ok(id)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.end();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::thread::panicking() || self.keep_dir {
            eprintln!("lab {}: logs kept in {}", self.prefix, self.dir.display());
            for p in &self.procs {
                eprintln!("--- {} ({}) ---", p.label, p.log.display());
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Extra TOML lines for the generated configs.
#[derive(Debug, Default, Clone)]
pub struct ConfigExtra {
    /// Lines in `[server]`.
    pub server: String,
    /// Lines in `[vpn]`.
    pub vpn: String,
    /// Lines in `[transport]` (client configs only).
    pub transport: String,
    /// Whole further sections (`[limits]`, `[reconnect]`, ...).
    pub rest: String,
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A veth pair, both ends up: `dev` in `outer`, with `outer_addr`/24 or, if
/// `None`, as a port of the server's bridge `br0`; `eth0` in `inner` with
/// `inner_addr`/24.
fn add_veth(
    outer: &str,
    dev: &str,
    outer_addr: Option<Ipv4Addr>,
    inner: &str,
    inner_addr: Ipv4Addr,
) -> anyhow::Result<()> {
    run(&[
        "ip", "link", "add", dev, "netns", outer, "type", "veth", "peer", "name", "eth0", "netns",
        inner,
    ])?;
    match outer_addr {
        Some(a) => {
            run(&[
                "ip",
                "-n",
                outer,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", outer, "link", "set", dev, "up"])?;
        }
        None => run(&["ip", "-n", outer, "link", "set", dev, "master", "br0", "up"])?,
    }
    let addr = format!("{inner_addr}/24");
    run(&["ip", "-n", inner, "addr", "add", &addr, "dev", "eth0"])?;
    run(&["ip", "-n", inner, "link", "set", "eth0", "up"])
}

fn run(argv: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("run {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Where the product's binaries are: `$SALLYPORT_BIN_DIR`, else the cargo
/// target directory this executable runs from (tests run from `deps/`).
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("SALLYPORT_BIN_DIR") {
        return Ok(d.into());
    }
    let exe = std::env::current_exe().context("current exe")?;
    let mut dir = exe.parent().context("exe has no parent")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for b in ["sallyport-server", "sallyport-client"] {
        if !dir.join(b).exists() {
            bail!(
                "{} not found in {}: build it first (cargo build --bins) or set SALLYPORT_BIN_DIR",
                b,
                dir.display()
            );
        }
    }
    Ok(dir)
}
