//! `sallyport-conformance --url URL --token TOKEN [--transport wss|h2|tls|all]
//! [--ca FILE | --insecure] [--only PATTERN] [--junit FILE]`
//!
//! Checks a server against docs/PROTOCOL.md. Prints one line per check, then
//! `N passed, M failed[, K skipped]`; exits 0 only when nothing failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use sallyport_conformance::suite::{
    self, Filter, RateLimit, Target, Timeouts, Transport, CHECKS, NOT_CHECKED,
};
use sallyport_transports::tls::ClientTrust;

const AFTER_HELP: &str = "\
What the suite assumes of the server:
  - a pool for a few hundred sessions: every session the suite closes holds its
    address for vpn.lease_grace (5 min by default); one run holds about 100
    plus --sessions, so give the server a /16 (against a /24 the concurrency
    check is skipped unless --sessions is at most about 140, and a second run within
    the grace period may find the pool exhausted);
  - --auth-timeout and --max-frame equal to its limits.auth_timeout and
    limits.max_frame_size;
  - no other client holding the top addresses of the subnet (they are asked
    for by reconnect and used as unheld destinations);
  - a TUN device answering ICMP echo at server_ip (routing.server_reachable).
The keepalive checks wait up to 3.5 of the server's keepalive intervals; those
that would wait longer than --max-wait are skipped (configure the server with
keepalive_interval = \"1s\" to run them quickly).
Checks that need a second token are skipped without --token2; the rate-limit
check is skipped without --rate-limit-bps (the server's limit for
--rate-limit-token, a token the other checks do not use).
Exit status: 0 when no check failed, 1 when some did, 2 on usage errors.";

/// Checks a Sallyport server against docs/PROTOCOL.md.
#[derive(Parser, Debug)]
#[command(version, after_help = AFTER_HELP)]
struct Args {
    /// The tunnel URL, e.g. wss://vpn.example.com:443/tunnel.
    #[arg(long, required_unless_present = "list")]
    url: Option<String>,
    /// A token the server accepts.
    #[arg(long, required_unless_present = "list")]
    token: Option<String>,
    /// A second accepted token, for the checks that need two identities.
    #[arg(long)]
    token2: Option<String>,
    /// Which transport to test; `all` is every transport this build speaks.
    #[arg(long, value_enum, default_value = "wss")]
    transport: TransportArg,
    /// Trust this CA (PEM) in addition to the public roots.
    #[arg(long, conflicts_with = "insecure")]
    ca: Option<PathBuf>,
    /// Do not verify the server's certificate.
    #[arg(long)]
    insecure: bool,
    /// Run only these checks: comma-separated ids (routing.forged_source),
    /// areas (routing), statement ids (H1) or globs (*token*).
    #[arg(long)]
    only: Option<String>,
    /// Also write a JUnit XML report to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// The server's limits.auth_timeout.
    #[arg(long, default_value = "10s", value_parser = duration)]
    auth_timeout: Duration,
    /// The server's limits.max_frame_size, bytes.
    #[arg(long, default_value_t = sallyport_core::offload::MAX_ENVELOPE)]
    max_frame: usize,
    /// How long an expected reply may take.
    #[arg(long, default_value = "2s", value_parser = duration)]
    reply_timeout: Duration,
    /// How long to watch before concluding that something did not arrive.
    #[arg(long, default_value = "300ms", value_parser = duration)]
    quiet: Duration,
    /// The longest one check may wait on the server's timers; longer checks
    /// are skipped.
    #[arg(long, default_value = "30s", value_parser = duration)]
    max_wait: Duration,
    /// Sessions opened at once by the concurrency check.
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Run handshake.pool_exhausted: opens sessions until the pool is empty,
    /// leaving every address held for the lease grace period.
    #[arg(long)]
    exhaust_pool: bool,
    /// The most sessions handshake.pool_exhausted opens.
    #[arg(long, default_value_t = 1024)]
    exhaust_limit: usize,
    /// Run policy.rate_limit: the server limits the sessions of
    /// --rate-limit-token to N bytes per second each way.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rate_limit_bps: Option<u64>,
    /// The burst of that limit, bytes [default: the project's server's
    /// default, N/10 and at least 65536].
    #[arg(long, value_name = "BYTES", requires = "rate_limit_bps")]
    rate_limit_burst: Option<u64>,
    /// The token that limit applies to [default: --token]. Best a token of
    /// its own: the other checks expect --token to be unlimited.
    #[arg(long, value_name = "TOKEN", requires = "rate_limit_bps")]
    rate_limit_token: Option<String>,
    /// List the checks with their docs/PROTOCOL.md statements and exit.
    #[arg(long)]
    list: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Wss,
    H2,
    Tls,
    All,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for c in CHECKS {
            println!("{:<32} {:<10} {}", c.id, c.spec_label(), c.description);
        }
        for (id, why) in NOT_CHECKED {
            println!("{:<32} {:<10} not checked: {why}", "-", format!("[{id}]"));
        }
        return ExitCode::SUCCESS;
    }
    let (Some(url), Some(token)) = (args.url.clone(), args.token.clone()) else {
        eprintln!("sallyport-conformance: --url and --token are required");
        return ExitCode::from(2);
    };
    let mut target = Target::new(url, token);
    target.token2 = args.token2.clone();
    target.trust = ClientTrust {
        insecure: args.insecure,
        ca_file: args.ca.clone(),
        ..Default::default()
    };
    target.timeouts = Timeouts {
        reply: args.reply_timeout,
        quiet: args.quiet,
        auth_timeout: args.auth_timeout,
        max_wait: args.max_wait,
        ..Timeouts::default()
    };
    target.max_frame = args.max_frame;
    target.sessions = args.sessions;
    target.exhaust_pool = args.exhaust_pool;
    target.exhaust_limit = args.exhaust_limit;
    target.rate_limit = args.rate_limit_bps.map(|bps| RateLimit {
        bytes_per_sec: bps,
        burst_bytes: args
            .rate_limit_burst
            .unwrap_or_else(|| RateLimit::default_burst(bps)),
        token: args.rate_limit_token.clone(),
    });

    let transports = match args.transport {
        TransportArg::Wss => vec![Transport::Wss],
        TransportArg::H2 => vec![Transport::H2],
        TransportArg::Tls => vec![Transport::Tls],
        TransportArg::All => suite::supported_transports(&target),
    };
    let filter = args.only.as_deref().map(Filter::parse).unwrap_or_default();
    if !CHECKS.iter().any(|c| filter.matches(c)) {
        eprintln!("sallyport-conformance: no check matches --only (see --list)");
        return ExitCode::from(2);
    }

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sallyport-conformance: start async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = rt.block_on(suite::run(target, &transports, &filter, |o| {
        println!("{}", o.line())
    }));
    if let Some(path) = &args.junit {
        if let Err(e) = suite::write_junit(&report, path) {
            eprintln!("sallyport-conformance: write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    println!("{}", report.summary());
    rt.shutdown_timeout(Duration::from_millis(500));
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
