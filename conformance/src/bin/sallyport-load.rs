//! `sallyport-load --url URL --token TOKEN --sessions N [...]`: opens N
//! sessions to a server without TUN devices and reports handshakes per
//! second, sessions established, failed and lost, and (with --server-pid) the
//! server's RSS per session and CPU time. See `sallyport_conformance::load`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sallyport_conformance::load::{self, LoadConfig};
use sallyport_transports::TransportKind;

/// Sallyport load generator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The tunnel URL, e.g. wss://198.18.0.1:443/tunnel.
    #[arg(long)]
    url: String,
    /// A token the server accepts.
    #[arg(long)]
    token: String,
    /// tls, h2 or wss.
    #[arg(long, default_value = "tls")]
    transport: String,
    /// Trust this CA (PEM) in addition to the public roots.
    #[arg(long, conflicts_with = "insecure")]
    ca: Option<PathBuf>,
    /// Do not verify the server's certificate.
    #[arg(long)]
    insecure: bool,
    /// Sessions to open.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds to hold the sessions idle once all are open.
    #[arg(long, default_value_t = 5.0)]
    hold_secs: f64,
    /// Seconds of traffic after the hold (each session sends to the next
    /// one's address, through the server's hub); 0: none.
    #[arg(long, default_value_t = 0.0)]
    traffic_secs: f64,
    /// Packets per second per session in the traffic phase.
    #[arg(long, default_value_t = 10)]
    pps: u32,
    /// UDP payload bytes per packet.
    #[arg(long, default_value_t = 64)]
    packet_size: usize,
    /// The server's PID (for RSS and CPU time from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Instead of sessions: a slowloris flood of this many connections that
    /// never authenticate (a third silent after TCP, a third sending a byte a
    /// second, a third silent after TLS); waits --hold-secs for the server to
    /// close them all, reports how, and fails if any is still open.
    #[arg(long)]
    slowloris: Option<usize>,
    /// Seconds allowed for one session's connect and handshake.
    #[arg(long, default_value_t = 30.0)]
    timeout_secs: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let Some(transport) = TransportKind::parse(&args.transport) else {
        eprintln!("sallyport-load: --transport must be tls, h2 or wss");
        return ExitCode::from(2);
    };
    match load::raise_open_files() {
        Ok(Some(n)) if (n as usize) < args.sessions + 64 => eprintln!(
            "sallyport-load: warning: only {n} open files allowed for {} sessions",
            args.sessions
        ),
        Err(e) => eprintln!("sallyport-load: warning: could not raise the open-files limit: {e}"),
        _ => {}
    }
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
    let cfg = LoadConfig {
        url: args.url,
        trust: load::trust(args.ca, args.insecure),
        token: args.token,
        transport,
        sessions: args.sessions,
        concurrency: args.concurrency,
        hold: secs(args.hold_secs),
        traffic: secs(args.traffic_secs),
        pps: args.pps,
        packet_size: args.packet_size,
        server_pid: args.server_pid,
        timeout: secs(args.timeout_secs),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sallyport-load: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(connections) = args.slowloris {
        let flood = load::FloodConfig {
            url: cfg.url,
            trust: cfg.trust,
            connections,
            wait: cfg.hold,
        };
        let r = rt
            .block_on(load::flood(flood))
            .map(|r| (r.lines(), r.still_open == 0));
        return finish(r);
    }
    let r = rt.block_on(load::run(cfg)).map(|r| {
        let ok = r.established == r.sessions && r.lost == 0;
        (r.lines(), ok)
    });
    finish(r)
}

/// Prints the report; success only when it says all went well.
fn finish(r: anyhow::Result<(String, bool)>) -> ExitCode {
    match r {
        Ok((lines, ok)) => {
            print!("{lines}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sallyport-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
