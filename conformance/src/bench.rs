//! The end-to-end benchmark (`benches/e2e`, `sallyport-lab bench`).
//!
//! In one run, each in a fresh [`Lab`] (a server and two clients on a veth
//! underlay): the bare underlay, Sallyport over each transport (and through
//! nginx), OpenVPN 2.6 over UDP and TCP, and SoftEther VPN 5 over TLS on TCP
//! 443. For each: iperf3 TCP with 1 and 4 streams, client 0 → the server's
//! address and client 0 → client 1 (through the hub), each the median of
//! `runs` runs; ping round trips; CPU seconds per GiB moved of the server and
//! the client processes (utime + stime from `/proc` over the iperf3 runs,
//! divided by the bytes iperf3 received); the server's memory with two
//! clients. Prints one table with every figure, its ratio to the underlay and
//! to OpenVPN-UDP, and writes it as markdown when asked. Speed is never
//! asserted; a path that does not come up fails the run (after the table).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::baselines::{self, DescendantGuard, OpenVpnProto};
use crate::lab::{Lab, SERVER_TUNNEL_IP, SERVER_UNDERLAY};
use crate::procstat;

/// Command-line options of the benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Quick check (CI): 1 run of 1 s each, 1 stream only, 3 pings, no nginx
    /// paths. Fails only if a tunnel does not come up or carry traffic.
    #[arg(long)]
    pub smoke: bool,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    pub secs: u32,
    /// Runs per iperf3 figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Pings per round-trip figure (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub pings: u32,
    /// Seconds between pings. The default, 0.05, measures an idle lab, where
    /// every process on the way must first wake up; 0.002 keeps them busy.
    #[arg(long, default_value_t = 0.05)]
    pub ping_interval: f64,
    /// Only these paths (comma-separated): underlay, tls, h2, wss, h2-nginx,
    /// wss-nginx, openvpn-udp, openvpn-tcp, softether.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Also write the table as markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Append each lab's namespaces and directory to this file as they are
    /// made (lines `ns NAME`, `dir PATH`), so a wrapper can clean up if this
    /// process is killed.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
}

/// One way from client to server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Underlay,
    Sallyport { mode: &'static str, nginx: bool },
    OpenVpn(OpenVpnProto),
    SoftEther,
}

const ALL_PATHS: [Path; 9] = [
    Path::Underlay,
    Path::Sallyport {
        mode: "tls",
        nginx: false,
    },
    Path::Sallyport {
        mode: "h2",
        nginx: false,
    },
    Path::Sallyport {
        mode: "wss",
        nginx: false,
    },
    Path::Sallyport {
        mode: "h2",
        nginx: true,
    },
    Path::Sallyport {
        mode: "wss",
        nginx: true,
    },
    Path::OpenVpn(OpenVpnProto::Udp),
    Path::OpenVpn(OpenVpnProto::Tcp),
    Path::SoftEther,
];

impl Path {
    fn name(self) -> String {
        match self {
            Path::Underlay => "underlay".into(),
            Path::Sallyport { mode, nginx: false } => mode.into(),
            Path::Sallyport { mode, nginx: true } => format!("{mode}-nginx"),
            Path::OpenVpn(OpenVpnProto::Udp) => "openvpn-udp".into(),
            Path::OpenVpn(OpenVpnProto::Tcp) => "openvpn-tcp".into(),
            Path::SoftEther => "softether".into(),
        }
    }

    fn label(self) -> String {
        match self {
            Path::Underlay => "underlay (veth)".into(),
            Path::Sallyport { mode, nginx: false } => format!("sallyport {mode}"),
            Path::Sallyport { mode, nginx: true } => format!("sallyport {mode} via nginx"),
            Path::OpenVpn(OpenVpnProto::Udp) => "openvpn udp".into(),
            Path::OpenVpn(OpenVpnProto::Tcp) => "openvpn tcp".into(),
            Path::SoftEther => "softether tls/443".into(),
        }
    }
}

/// The figures, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Tput { to_client: bool, streams: u32 },
    Rtt { to_client: bool },
    CpuPerGib { server: bool, to_client: bool },
    MachinePerGib { to_client: bool },
    RssIdle,
    HwmAfter,
}

impl Metric {
    fn all() -> Vec<Metric> {
        let mut v = Vec::new();
        for to_client in [false, true] {
            for streams in STREAMS {
                v.push(Metric::Tput { to_client, streams });
            }
        }
        v.push(Metric::Rtt { to_client: false });
        v.push(Metric::Rtt { to_client: true });
        for server in [true, false] {
            for to_client in [false, true] {
                v.push(Metric::CpuPerGib { server, to_client });
            }
        }
        for to_client in [false, true] {
            v.push(Metric::MachinePerGib { to_client });
        }
        v.push(Metric::RssIdle);
        v.push(Metric::HwmAfter);
        v
    }

    fn label(self) -> String {
        let dir = |c: bool| if c { "c→client" } else { "c→server" };
        match self {
            Metric::Tput { to_client, streams } => {
                format!(
                    "iperf3 {} {streams} stream{} Mbit/s",
                    dir(to_client),
                    if streams > 1 { "s" } else { "" }
                )
            }
            Metric::Rtt { to_client } => format!("ping {} median ms", dir(to_client)),
            Metric::CpuPerGib { server, to_client } => format!(
                "{} CPU s/GiB {}",
                if server { "server" } else { "clients" },
                dir(to_client)
            ),
            Metric::MachinePerGib { to_client } => {
                format!("machine CPU s/GiB {}", dir(to_client))
            }
            Metric::RssIdle => "server VmRSS MiB, 2 clients idle".into(),
            Metric::HwmAfter => "server VmHWM MiB after load".into(),
        }
    }

    fn format(self, v: f64) -> String {
        match self {
            Metric::Tput { .. } => format!("{v:.0}"),
            Metric::Rtt { .. } => format!("{v:.3}"),
            Metric::CpuPerGib { .. } | Metric::MachinePerGib { .. } => format!("{v:.2}"),
            Metric::RssIdle | Metric::HwmAfter => format!("{v:.1}"),
        }
    }
}

const STREAMS: [u32; 2] = [1, 4];

/// A path's figures; `None` where it has none (the underlay has no process).
struct PathResult {
    path: Path,
    values: Vec<(Metric, f64)>,
}

impl PathResult {
    fn get(&self, m: Metric) -> Option<f64> {
        self.values.iter().find(|(k, _)| *k == m).map(|(_, v)| *v)
    }
}

/// A lab with a path set up in it. Field order matters: the guard kills
/// forked workers before the lab kills what it started and removes the
/// namespaces.
struct Setup {
    _guard: DescendantGuard,
    lab: Lab,
    server_pids: Vec<u32>,
    client_pids: Vec<u32>,
    server_addr: Ipv4Addr,
    peer_addr: Ipv4Addr,
}

fn setup(path: Path, manifest: Option<&std::path::Path>) -> anyhow::Result<Setup> {
    let mut lab = Lab::new("e", 2)?;
    if let Some(m) = manifest {
        let mut text = format!("dir {}\n", lab.dir().display());
        for ns in [lab.server_ns(), lab.client_ns(0), lab.client_ns(1)] {
            let _ = writeln!(text, "ns {ns}");
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m)
            .with_context(|| format!("open {}", m.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
    }
    let (guard, server, clients, server_addr, addrs) = match path {
        Path::Underlay => {
            let addrs = vec![lab.client_underlay(0), lab.client_underlay(1)];
            (
                DescendantGuard::default(),
                vec![],
                vec![],
                SERVER_UNDERLAY,
                addrs,
            )
        }
        Path::Sallyport { mode, nginx } => {
            let p = lab.start_sallyport(Some(mode), nginx)?;
            let mut server = vec![p.server];
            server.extend(p.nginx);
            (
                DescendantGuard::default(),
                server,
                p.clients,
                SERVER_TUNNEL_IP,
                p.addrs,
            )
        }
        Path::OpenVpn(proto) => {
            let b = baselines::start_openvpn(&mut lab, proto)?;
            (b.guard, vec![b.server], b.clients, b.server_addr, b.addrs)
        }
        Path::SoftEther => {
            let b = baselines::start_softether(&mut lab)?;
            (b.guard, vec![b.server], b.clients, b.server_addr, b.addrs)
        }
    };
    Ok(Setup {
        server_pids: server.iter().map(|&id| lab.pid(id)).collect(),
        client_pids: clients.iter().map(|&id| lab.pid(id)).collect(),
        _guard: guard,
        lab,
        server_addr,
        peer_addr: addrs[1],
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

const GIB: f64 = (1u64 << 30) as f64;

struct Plan {
    secs: u32,
    runs: usize,
    pings: u32,
    ping_interval: f64,
    streams: Vec<u32>,
    tck: f64,
}

fn measure(
    path: Path,
    plan: &Plan,
    manifest: Option<&std::path::Path>,
) -> anyhow::Result<PathResult> {
    let mut s = setup(path, manifest)?;
    let mut values = Vec::new();
    let mem = |pids: &[u32]| procstat::memory_kib(pids);
    let has_procs = !s.server_pids.is_empty();
    if has_procs {
        values.push((Metric::RssIdle, mem(&s.server_pids).0 as f64 / 1024.0));
    }
    let (c0, c1, srv) = (s.lab.client_ns(0), s.lab.client_ns(1), s.lab.server_ns());
    for (to_client, dst) in [(false, s.server_addr), (true, s.peer_addr)] {
        // Not counted: the first packet also waits for ARP (and a switch's
        // MAC learning).
        let _ = s.lab.ping(&c0, dst, 1);
        let rtts = s
            .lab
            .ping_rtts(&c0, dst, plan.pings, plan.ping_interval)
            .with_context(|| format!("{}: ping {dst}", path.name()))?;
        values.push((Metric::Rtt { to_client }, median(rtts)));
    }
    for (to_client, to_ns, dst) in [(false, &srv, s.server_addr), (true, &c1, s.peer_addr)] {
        let (mut cpu_srv, mut cpu_cli, mut cpu_all, mut bytes) = (0.0, 0.0, 0.0, 0u64);
        for &streams in &plan.streams {
            let mut v = Vec::new();
            for _ in 0..plan.runs {
                let before = (
                    procstat::cpu_seconds(&s.server_pids, plan.tck),
                    procstat::cpu_seconds(&s.client_pids, plan.tck),
                    procstat::machine_busy_seconds(plan.tck),
                );
                let r = s
                    .lab
                    .iperf3_result(&c0, to_ns, dst, plan.secs, streams)
                    .with_context(|| {
                        format!("{}: iperf3 to {dst}, {streams} streams", path.name())
                    })?;
                cpu_srv += procstat::cpu_seconds(&s.server_pids, plan.tck) - before.0;
                cpu_cli += procstat::cpu_seconds(&s.client_pids, plan.tck) - before.1;
                cpu_all += procstat::machine_busy_seconds(plan.tck) - before.2;
                bytes += r.bytes;
                v.push(r.bits_per_second / 1e6);
            }
            values.push((Metric::Tput { to_client, streams }, median(v)));
        }
        if bytes > 0 {
            values.push((
                Metric::MachinePerGib { to_client },
                cpu_all / (bytes as f64 / GIB),
            ));
        }
        if has_procs && bytes > 0 {
            let gib = bytes as f64 / GIB;
            values.push((
                Metric::CpuPerGib {
                    server: true,
                    to_client,
                },
                cpu_srv / gib,
            ));
            values.push((
                Metric::CpuPerGib {
                    server: false,
                    to_client,
                },
                cpu_cli / gib,
            ));
        }
    }
    if has_procs {
        values.push((Metric::HwmAfter, mem(&s.server_pids).1 as f64 / 1024.0));
    }
    // Every process must still be running: a crash under load is a failure.
    let gone: Vec<u32> = s
        .server_pids
        .iter()
        .chain(&s.client_pids)
        .copied()
        .filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    if !gone.is_empty() {
        bail!(
            "{}: processes {gone:?} exited during the benchmark",
            path.name()
        );
    }
    drop(s);
    Ok(PathResult { path, values })
}

fn ratio(v: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 && v / b < 0.1 => format!("{:.3}", v / b),
        Some(b) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    }
}

/// The table as (header lines, rows of cells).
fn table(results: &[PathResult]) -> Vec<[String; 5]> {
    let find = |p: Path| results.iter().find(|r| r.path == p);
    let underlay = find(Path::Underlay);
    let ovpn = find(Path::OpenVpn(OpenVpnProto::Udp));
    let mut rows = Vec::new();
    for m in Metric::all() {
        let mut first = true;
        for r in results {
            let Some(v) = r.get(m) else { continue };
            rows.push([
                if first { m.label() } else { String::new() },
                r.path.label(),
                m.format(v),
                ratio(v, underlay.and_then(|u| u.get(m))),
                ratio(v, ovpn.and_then(|o| o.get(m))),
            ]);
            first = false;
        }
    }
    rows
}

/// CPU seconds to open and seal one GiB as TLS 1.3 records of 16 KiB with
/// AES-256-GCM (what rustls negotiates first, through aws-lc-rs): the crypto
/// the hub adds to every byte from one client to another. Best of 3 rounds.
fn aead_pair_seconds_per_gib() -> f64 {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("32-byte key"));
    let mut record = vec![0u8; 16 * 1024];
    let rounds = 4096u64; // 64 MiB each way per round
    let mut best = f64::INFINITY;
    for round in 0..3u64 {
        let t = Instant::now();
        for i in 0..rounds {
            let n = round * rounds + i;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&n.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut record,
                )
                .expect("seal");
            record.extend_from_slice(tag.as_ref());
            let plain = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut record,
                )
                .expect("open what was sealed")
                .len();
            record.truncate(plain);
        }
        let gib = (rounds * record.len() as u64) as f64 / GIB;
        best = best.min(t.elapsed().as_secs_f64() / gib);
    }
    best
}

/// How far client → client can come to client → server on this machine,
/// for the paths that carry TLS over TCP through a hub (Sallyport's). A byte
/// from one client to another costs what it costs to the server, plus what
/// the hub adds: one TLS open and one seal and one more TCP hop (the server
/// sends, the other client receives); the TUN write and the receiving
/// kernel's work are on both ways. With the CPU as the limit (as it is on a
/// small machine), the ratio is at most c→server / (c→server + that hop).
/// The hop's TCP cost is the underlay's machine CPU per GiB (a TCP flow over
/// veth, both ends' copies included).
fn ceilings(results: &[PathResult], aead_pair: f64) -> String {
    let mut out = String::new();
    let Some(hop) = results
        .iter()
        .find(|r| r.path == Path::Underlay)
        .and_then(|u| u.get(Metric::MachinePerGib { to_client: false }))
    else {
        return out;
    };
    let floor = aead_pair + hop;
    let _ = writeln!(
        out,
        "c→client ceiling (CPU-bound): the hub adds to each byte an AES-256-GCM open + seal \
         ({aead_pair:.2} s/GiB, 16 KiB records, this CPU) and a TCP hop ({hop:.2} s/GiB, the \
         underlay's machine CPU): {floor:.2} s/GiB at least; ceiling = c→server / (c→server + {floor:.2})"
    );
    for r in results {
        let Path::Sallyport { .. } = r.path else {
            continue;
        };
        let fig = |to_client| {
            r.get(Metric::Tput {
                to_client,
                streams: 1,
            })
        };
        let (Some(cs), Some(cc), Some(machine)) = (
            fig(false),
            fig(true),
            r.get(Metric::MachinePerGib { to_client: false }),
        ) else {
            continue;
        };
        let _ = writeln!(
            out,
            "  {:<26} c→server {machine:.2} machine s/GiB: ceiling {:.2}, measured {:.2} (1 stream)",
            r.path.label(),
            machine / (machine + floor),
            cc / cs,
        );
    }
    out
}

const HEADER: [&str; 5] = ["figure", "path", "value", "× underlay", "× openvpn-udp"];

fn print_text(rows: &[[String; 5]]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<38} {:<26} {:>10} {:>11} {:>14}",
        HEADER[0], HEADER[1], HEADER[2], HEADER[3], HEADER[4]
    );
    for r in rows {
        if !r[0].is_empty() {
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "{:<38} {:<26} {:>10} {:>11} {:>14}",
            r[0], r[1], r[2], r[3], r[4]
        );
    }
    out
}

fn markdown(rows: &[[String; 5]]) -> String {
    let mut out = format!("| {} |\n|---|---|--:|--:|--:|\n", HEADER.join(" | "));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out
}

fn first_line(argv: &[&str]) -> String {
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|e| format!("{}: {e}", argv[0]))
}

/// Runs the benchmark. See the module docs.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let plan = if args.smoke {
        Plan {
            secs: 1,
            runs: 1,
            pings: 3,
            ping_interval: 0.05,
            streams: vec![1],
            tck: procstat::ticks_per_second(),
        }
    } else {
        Plan {
            secs: args.secs.max(1),
            runs: args.runs.max(1),
            pings: args.pings.max(1),
            ping_interval: args.ping_interval.max(0.002),
            streams: STREAMS.to_vec(),
            tck: procstat::ticks_per_second(),
        }
    };
    let paths: Vec<Path> = ALL_PATHS
        .into_iter()
        .filter(|p| {
            if !args.only.is_empty() {
                args.only.contains(&p.name())
            } else {
                !(args.smoke && matches!(p, Path::Sallyport { nginx: true, .. }))
            }
        })
        .collect();
    if let Some(unknown) = args
        .only
        .iter()
        .find(|n| !ALL_PATHS.iter().any(|p| p.name() == **n))
    {
        bail!("unknown path {unknown:?} in --only");
    }
    let started = Instant::now();
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for path in paths {
        let t = Instant::now();
        eprintln!("bench: {} ...", path.label());
        match measure(path, &plan, args.manifest.as_deref()) {
            Ok(r) => {
                eprintln!("bench: {} done in {:.0?}", path.label(), t.elapsed());
                results.push(r);
            }
            Err(e) => {
                eprintln!("bench: {} FAILED: {e:#}", path.label());
                failures.push(format!("{}: {e:#}", path.label()));
            }
        }
    }
    let mut intro = String::new();
    let _ = writeln!(
        intro,
        "Sallyport end-to-end benchmark{}: iperf3 TCP {} s per run, median of {} run{}; ping {} × {} s, median; \
         CPU = utime+stime of the process trees over all iperf3 runs of that direction / GiB received; \
         each path in a fresh lab (server + 2 clients, veth underlay). Took {:.0?}.",
        if args.smoke { " (smoke)" } else { "" },
        plan.secs,
        plan.runs,
        if plan.runs == 1 { "" } else { "s" },
        plan.pings,
        plan.ping_interval,
        started.elapsed(),
    );
    let _ = writeln!(
        intro,
        "host: {} cores, kernel {}; {}; {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        first_line(&["uname", "-r"]),
        first_line(&["openvpn", "--version"]),
        first_line(&[
            "dpkg-query",
            "-W",
            "-f",
            "softether-vpnserver ${Version}",
            "softether-vpnserver"
        ]),
    );
    let rows = table(&results);
    let ceiling = ceilings(&results, aead_pair_seconds_per_gib());
    println!("{intro}");
    print!("{}", print_text(&rows));
    if !ceiling.is_empty() {
        print!("\n{ceiling}");
    }
    if let Some(file) = &args.markdown {
        let text = format!(
            "{}\n{}\n{}",
            intro.replace('\n', "\n\n"),
            markdown(&rows),
            ceiling.replace("\n  ", "\n- ")
        );
        std::fs::write(file, text).with_context(|| format!("write {}", file.display()))?;
        println!("\nmarkdown written to {}", file.display());
    }
    if !failures.is_empty() {
        bail!(
            "{} path(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_gives_ratios_against_underlay_and_openvpn_udp_and_dashes_without_base() {
        let m = Metric::Tput {
            to_client: false,
            streams: 1,
        };
        let cpu = Metric::CpuPerGib {
            server: true,
            to_client: false,
        };
        let results = vec![
            PathResult {
                path: Path::Underlay,
                values: vec![(m, 1000.0)],
            },
            PathResult {
                path: Path::OpenVpn(OpenVpnProto::Udp),
                values: vec![(m, 100.0), (cpu, 4.0)],
            },
            PathResult {
                path: Path::Sallyport {
                    mode: "tls",
                    nginx: false,
                },
                values: vec![(m, 500.0), (cpu, 2.0)],
            },
        ];
        let rows = table(&results);
        let tls = rows
            .iter()
            .find(|r| r[1] == "sallyport tls" && r[2] == "500")
            .expect("tls throughput row");
        assert_eq!((tls[3].as_str(), tls[4].as_str()), ("0.50", "5.00"));
        let tls_cpu = rows
            .iter()
            .find(|r| r[1] == "sallyport tls" && r[2] == "2.00")
            .expect("tls cpu row");
        assert_eq!((tls_cpu[3].as_str(), tls_cpu[4].as_str()), ("-", "0.50"));
        // The figure's name is on its first row only.
        assert_eq!(rows.iter().filter(|r| r[0] == m.label()).count(), 1);
        assert!(markdown(&rows).lines().count() == rows.len() + 2);
    }

    #[test]
    fn the_ceiling_adds_the_hub_hop_to_the_client_to_server_cost() {
        let tput = |to_client| Metric::Tput {
            to_client,
            streams: 1,
        };
        let machine = Metric::MachinePerGib { to_client: false };
        let results = vec![
            PathResult {
                path: Path::Underlay,
                values: vec![(machine, 0.5)],
            },
            PathResult {
                path: Path::Sallyport {
                    mode: "tls",
                    nginx: false,
                },
                values: vec![(tput(false), 4000.0), (tput(true), 2000.0), (machine, 3.0)],
            },
            PathResult {
                path: Path::OpenVpn(OpenVpnProto::Udp),
                values: vec![(tput(false), 400.0), (tput(true), 300.0), (machine, 9.0)],
            },
        ];
        let text = ceilings(&results, 0.5);
        // 3 / (3 + 0.5 + 0.5)
        assert!(text.contains("ceiling 0.75, measured 0.50"), "{text}");
        assert!(!text.contains("openvpn"), "only hub-over-TLS paths: {text}");
        assert_eq!(ceilings(&results[1..], 0.5), "", "no underlay, no floor");
    }

    #[test]
    fn sealing_and_opening_a_gib_takes_measurable_time() {
        let s = aead_pair_seconds_per_gib();
        assert!(s > 0.0 && s.is_finite(), "{s}");
    }

    #[test]
    fn every_path_name_is_unique() {
        let mut names: Vec<String> = ALL_PATHS.iter().map(|p| p.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL_PATHS.len());
    }
}
