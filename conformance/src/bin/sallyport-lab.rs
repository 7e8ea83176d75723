//! `sallyport-lab demo | bench [SECONDS]`
//!
//! `demo`: a server and two clients in network namespaces on the default
//! config; the clients ping each other and the server; prints the results and
//! cleans up.
//!
//! `bench [SECONDS] [RUNS]`: iperf3 TCP, one stream, over the bare veth
//! underlay and through the tunnel over each transport (client → server
//! address, client → client through the hub), directly and through nginx, all
//! in the same run, each the median of RUNS runs (default 3), printed with the
//! ratio to the underlay.
//!
//! Needs root. The product's binaries are taken from the directory of this
//! executable (or `$SALLYPORT_BIN_DIR`).

use std::time::Duration;

use anyhow::{bail, Context};
use sallyport_conformance::lab::{
    ConfigExtra, Lab, BEHIND_NGINX, SERVER_TUNNEL_IP, SERVER_UNDERLAY, TOKENS,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("bench") => bench(
            args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5),
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3),
        ),
        _ => {
            eprintln!("usage: sallyport-lab demo | bench [SECONDS] [RUNS]");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("sallyport-lab: error: {e:#}");
        std::process::exit(1);
    }
}

fn start(tag: &str, clients: usize) -> anyhow::Result<(Lab, Vec<std::net::Ipv4Addr>)> {
    start_with(tag, clients, None, false)
}

/// A lab with a server and `clients` clients; `mode` fixes the transport,
/// `nginx` puts the documented nginx recipe in front of the server.
fn start_with(
    tag: &str,
    clients: usize,
    mode: Option<&str>,
    nginx: bool,
) -> anyhow::Result<(Lab, Vec<std::net::Ipv4Addr>)> {
    let mut lab = Lab::new(tag, clients)?;
    let server_extra = ConfigExtra {
        server: if nginx {
            BEHIND_NGINX.into()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let scfg = lab.server_config("server.toml", &server_extra)?;
    lab.start_server(&scfg)?;
    if nginx {
        let recipe =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy-nginx.conf");
        lab.start_nginx(&recipe, true, "60s")?;
    }
    let client_extra = ConfigExtra {
        transport: mode.map(|m| format!("mode = \"{m}\"")).unwrap_or_default(),
        ..Default::default()
    };
    let mut addrs = Vec::new();
    for i in 0..clients {
        let c = lab.client_config(&format!("client{i}.toml"), TOKENS[0], &client_extra)?;
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

fn bench(secs: u32, runs: usize) -> anyhow::Result<()> {
    let runs = runs.max(1);
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    let measure = |lab: &mut Lab, from: &str, to: &str, dst, what: &str| -> anyhow::Result<f64> {
        let mut v = Vec::new();
        for _ in 0..runs {
            v.push(
                lab.iperf3(from, to, dst, secs, 1)
                    .with_context(|| what.to_string())?,
            );
        }
        Ok(median(v))
    };
    {
        let mut lab = Lab::new("b", 2)?;
        let (a, b, s) = (lab.client_ns(0), lab.client_ns(1), lab.server_ns());
        let cb = lab.client_underlay(1);
        let to_server = measure(&mut lab, &a, &s, SERVER_UNDERLAY, "underlay")?;
        let to_client = measure(&mut lab, &a, &b, cb, "underlay c2c")?;
        rows.push(("underlay (bare veth)".into(), to_server, to_client));
    }
    for (mode, nginx) in [
        ("tls", false),
        ("h2", false),
        ("wss", false),
        ("h2", true),
        ("wss", true),
    ] {
        let (mut lab, addrs) = start_with("b", 2, Some(mode), nginx)?;
        let (a, b, s) = (lab.client_ns(0), lab.client_ns(1), lab.server_ns());
        let name = if nginx {
            format!("{mode} via nginx")
        } else {
            mode.to_string()
        };
        let to_server = measure(&mut lab, &a, &s, SERVER_TUNNEL_IP, &name)?;
        let to_client = measure(&mut lab, &a, &b, addrs[1], &name)?;
        rows.push((name, to_server, to_client));
    }
    let (base_s, base_c) = (rows[0].1, rows[0].2);
    println!("iperf3 TCP, 1 stream, {secs}s per run, median of {runs}; ratios against the bare underlay of the same run");
    println!(
        "{:<22} {:>14} {:>8} {:>14} {:>8}",
        "path", "c->server Mb/s", "ratio", "c->client Mb/s", "ratio"
    );
    for (name, s, c) in rows {
        println!(
            "{:<22} {:>14.0} {:>8.3} {:>14.0} {:>8.3}",
            name,
            s / 1e6,
            s / base_s,
            c / 1e6,
            c / base_c
        );
    }
    Ok(())
}
