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
//! Needs root. The product's binaries are taken from the directory of this
//! executable (or `$SALLYPORT_BIN_DIR`).

use anyhow::bail;
use clap::{Parser, Subcommand};
use sallyport_conformance::bench::{self, BenchArgs};
use sallyport_conformance::lab::{Lab, SERVER_TUNNEL_IP, SERVER_UNDERLAY};

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
}

fn main() {
    let r = match Cli::parse().command {
        Cmd::Demo => demo(),
        Cmd::Bench(args) => bench::run(&args),
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
