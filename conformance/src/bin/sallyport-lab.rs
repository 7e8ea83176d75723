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
//! `scale [SESSIONS...] [--transport T] [--traffic-secs S] [--pps P]`: for
//! each count (default 1000 and 10000), a fresh server on a /16 and
//! `sallyport-load` in one client namespace opening that many sessions
//! (without TUN devices), holding them idle, then sending packets between
//! them through the hub; prints the load generator's report (handshakes/s,
//! sessions lost, the server's RSS per session and CPU) side by side.
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
        Some("scale") => scale(&args[1..]),
        Some("bench") => bench(
            args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5),
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3),
        ),
        _ => {
            eprintln!(
                "usage: sallyport-lab demo | bench [SECONDS] [RUNS] | scale [SESSIONS...] \
                 [--transport tls|h2|wss] [--traffic-secs S] [--pps P] [--concurrency C]"
            );
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

/// See the module docs.
fn scale(args: &[String]) -> anyhow::Result<()> {
    let mut counts = Vec::new();
    let (mut transport, mut traffic, mut pps, mut concurrency) = ("tls", "5", "2", "128");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().map(String::as_str).context("missing value");
        match a.as_str() {
            "--transport" => transport = value()?,
            "--traffic-secs" => traffic = value()?,
            "--pps" => pps = value()?,
            "--concurrency" => concurrency = value()?,
            n => counts.push(
                n.parse::<usize>()
                    .with_context(|| format!("not a count: {n}"))?,
            ),
        }
    }
    if counts.is_empty() {
        counts = vec![1000, 10_000];
    }
    let mut reports = Vec::new();
    for &n in &counts {
        let mut lab = Lab::new("sc", 1)?;
        let extra = ConfigExtra {
            vpn: "subnet = \"10.200.0.0/16\"\nserver_ip = \"10.200.0.1\"\nstats_interval = \"0s\""
                .into(),
            rest: "[limits]\nmax_unauthenticated = 4096\nmax_sessions_per_token = 0\n\
                   auth_failures_per_minute = 0\n[logging]\nlevel = \"warn\"\n"
                .into(),
            ..Default::default()
        };
        let scfg = lab.server_config("server.toml", &extra)?;
        let server = lab.start_server(&scfg)?;
        let ns = lab.client_ns(0);
        if let Err(e) = lab.wait_server_listening(&ns, Duration::from_secs(10)) {
            bail!("{e:#}\n{}", lab.log(server));
        }
        let load = lab.bin("sallyport-load");
        let (url, ca, pid) = (
            format!("wss://{SERVER_UNDERLAY}:443/tunnel"),
            lab.certs.ca.display().to_string(),
            lab.pid(server).to_string(),
        );
        let count = n.to_string();
        eprintln!("scale: {n} sessions over {transport} ...");
        let out = lab.exec(
            &ns,
            &[
                load.to_string_lossy().as_ref(),
                "--url",
                &url,
                "--ca",
                &ca,
                "--token",
                TOKENS[0],
                "--transport",
                transport,
                "--sessions",
                &count,
                "--concurrency",
                concurrency,
                "--hold-secs",
                "5",
                "--traffic-secs",
                traffic,
                "--pps",
                pps,
                "--server-pid",
                &pid,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.trim().is_empty() {
            bail!(
                "sallyport-load printed nothing: {}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                lab.log(server)
            );
        }
        reports.push((n, text));
        lab.signal(server, "TERM");
        if lab.wait_exit(server, Duration::from_secs(20)).is_none() {
            lab.kill(server);
        }
    }
    println!("\nscale over {transport} (traffic: {traffic} s at {pps} packets/s per session):");
    let keys: Vec<String> = reports[0]
        .1
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(k, _)| k.to_string()))
        .collect();
    print!("{:<32}", "");
    for (n, _) in &reports {
        print!("{:>16}", format!("{n} sessions"));
    }
    println!();
    for k in keys.iter().filter(|k| *k != "first_error") {
        print!("{k:<32}");
        for (_, text) in &reports {
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                .unwrap_or("-");
            print!("{v:>16}");
        }
        println!();
    }
    for (n, text) in &reports {
        if let Some(e) = text.lines().find_map(|l| l.strip_prefix("first_error: ")) {
            println!("{n} sessions: first error: {e}");
        }
    }
    Ok(())
}
