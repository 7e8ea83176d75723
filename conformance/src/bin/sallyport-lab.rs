//! `sallyport-lab demo | bench [SECONDS]`
//!
//! `demo`: a server and two clients in network namespaces on the default
//! config; the clients ping each other and the server; prints the results and
//! cleans up.
//!
//! `bench`: iperf3 TCP over the bare veth underlay and through the tunnel
//! (client → server address, client → client through the hub) in the same run,
//! each the median of 3 runs, printed with the ratio to the underlay.
//!
//! Needs root. The product's binaries are taken from the directory of this
//! executable (or `$SALLYPORT_BIN_DIR`).

use std::time::Duration;

use anyhow::{bail, Context};
use sallyport_conformance::lab::{ConfigExtra, Lab, SERVER_TUNNEL_IP, SERVER_UNDERLAY, TOKENS};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("bench") => bench(
            args.get(1)
                .map(|s| s.parse())
                .transpose()
                .unwrap_or(None)
                .unwrap_or(5),
        ),
        _ => {
            eprintln!("usage: sallyport-lab demo | bench [SECONDS]");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("sallyport-lab: error: {e:#}");
        std::process::exit(1);
    }
}

fn start(tag: &str, clients: usize) -> anyhow::Result<(Lab, Vec<std::net::Ipv4Addr>)> {
    let mut lab = Lab::new(tag, clients)?;
    let scfg = lab.server_config("server.toml", &ConfigExtra::default())?;
    lab.start_server(&scfg)?;
    let mut addrs = Vec::new();
    for i in 0..clients {
        let c = lab.client_config(
            &format!("client{i}.toml"),
            TOKENS[0],
            &ConfigExtra::default(),
        )?;
        lab.start_client(i, &c)?;
    }
    for i in 0..clients {
        addrs.push(lab.wait_client_addr(i, Duration::from_secs(15))?);
    }
    Ok((lab, addrs))
}

fn demo() -> anyhow::Result<()> {
    println!("building the lab: server namespace + 2 client namespaces on a veth underlay");
    let (lab, addrs) = start("d", 2)?;
    println!("server {SERVER_UNDERLAY}:443 (tunnel address {SERVER_TUNNEL_IP})");
    for (i, a) in addrs.iter().enumerate() {
        println!(
            "client {i}: underlay {} -> tunnel address {a}",
            lab.client_underlay(i)
        );
    }
    let mut failed = 0;
    let checks = [
        (0, addrs[1], "client 0 -> client 1"),
        (1, addrs[0], "client 1 -> client 0"),
        (0, SERVER_TUNNEL_IP, "client 0 -> server"),
        (1, SERVER_TUNNEL_IP, "client 1 -> server"),
    ];
    for (from, to, what) in checks {
        let out = lab.exec(
            &lab.client_ns(from),
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", &to.to_string()],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let summary: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("packets") || l.contains("rtt"))
            .collect();
        println!(
            "ping {what} ({to}): {}",
            if out.status.success() { "ok" } else { "FAILED" }
        );
        for l in summary {
            println!("    {l}");
        }
        if !out.status.success() {
            failed += 1;
        }
    }
    println!("cleaning up");
    drop(lab);
    if failed > 0 {
        bail!("{failed} ping checks failed");
    }
    println!("demo ok");
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(secs: u32) -> anyhow::Result<()> {
    let (mut lab, addrs) = start("b", 2)?;
    let (a, b, s) = (lab.client_ns(0), lab.client_ns(1), lab.server_ns());
    let runs = 3;
    let mut rows = Vec::new();
    let cases: [(&str, &str, &str, std::net::Ipv4Addr); 3] = [
        ("underlay (veth) client -> server", &a, &s, SERVER_UNDERLAY),
        ("tunnel client -> server address", &a, &s, SERVER_TUNNEL_IP),
        ("tunnel client -> client (hub)", &a, &b, addrs[1]),
    ];
    for (name, from, to, dst) in cases {
        let mut v = Vec::new();
        for _ in 0..runs {
            v.push(
                lab.iperf3(from, to, dst, secs, 1)
                    .with_context(|| name.to_string())?,
            );
        }
        rows.push((name, median(v)));
    }
    let base = rows[0].1;
    println!("iperf3 TCP, 1 stream, {secs}s, median of {runs} (transport: wss)");
    println!("{:<36} {:>12} {:>10}", "path", "Mbit/s", "ratio");
    for (name, bps) in rows {
        println!("{:<36} {:>12.0} {:>10.3}", name, bps / 1e6, bps / base);
    }
    Ok(())
}
