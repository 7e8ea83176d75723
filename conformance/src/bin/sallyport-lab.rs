//! `sallyport-lab demo | bench [OPTIONS]`
//!
//! `demo`: a server and two clients in network namespaces on the default
//! config; the clients ping each other and the server; prints the results and
//! cleans up.
//!
//! `bench`: the end-to-end benchmark (see `sallyport_conformance::bench` and
//! `benches/e2e`): Sallyport over each transport beside the bare underlay,
//! OpenVPN and SoftEther, in one run; `bench --help` for the options.
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
use clap::{Parser, Subcommand};
use sallyport_conformance::bench::{self, BenchArgs};
use sallyport_conformance::lab::{ConfigExtra, Lab, SERVER_TUNNEL_IP, SERVER_UNDERLAY, TOKENS};

#[derive(Parser)]
#[command(about = "Sallyport's network-namespace lab: demo and benchmark (needs root)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A server and two clients that ping each other.
    Demo,
    /// The end-to-end benchmark.
    Bench(BenchArgs),
    /// Many sessions without TUN devices (`sallyport-load`): handshakes/s,
    /// RSS per session, CPU; `scale [SESSIONS...] [--transport T]
    /// [--traffic-secs S] [--pps P] [--concurrency C]`.
    Scale {
        /// Session counts and options, as above.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    let r = match Cli::parse().command {
        Cmd::Demo => demo(),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Scale { args } => scale(&args),
    };
    if let Err(e) = r {
        eprintln!("sallyport-lab: error: {e:#}");
        std::process::exit(1);
    }
}

fn demo() -> anyhow::Result<()> {
    println!("building the lab: server namespace + 2 client namespaces on a veth underlay");
    let mut lab = Lab::new("d", 2)?;
    let addrs = lab.start_sallyport(None, false)?.addrs;
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
