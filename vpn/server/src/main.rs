//! `sallyport-server --config FILE [--check-config | --print-pin]`,
//! `sallyport-server --hash-token < token`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sallyport_server::config::ServerConfig;
use tokio_util::sync::CancellationToken;

/// Sallyport VPN server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Path to the TOML configuration.
    #[arg(long, default_value = "/etc/sallyport/server.toml")]
    config: PathBuf,
    /// Validate the configuration (and certificate) and exit; FILE, if
    /// given, instead of --config.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    check_config: Option<Option<PathBuf>>,
    /// Print the pin of the configured certificate's public key (for the
    /// clients' `server.pin_sha256`) and exit.
    #[arg(long, conflicts_with = "check_config")]
    print_pin: bool,
    /// Read a token from standard input and print its `sha256:` form (for
    /// `[auth]`), then exit.
    #[arg(long, conflicts_with_all = ["check_config", "print_pin"])]
    hash_token: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sallyport-server: error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    if args.hash_token {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("read the token from standard input")?;
        let token = line.trim_end_matches(['\r', '\n']);
        anyhow::ensure!(!token.is_empty(), "no token on standard input");
        println!("{}", sallyport_server::config::hash_token(token));
        return Ok(());
    }
    if args.print_pin {
        let cfg = ServerConfig::load(&args.config)?;
        println!("{}", sallyport_server::print_pin(&cfg)?);
        return Ok(());
    }
    if let Some(file) = args.check_config {
        let path = file.unwrap_or(args.config);
        sallyport_server::check(&ServerConfig::load(&path)?)?;
        println!("{}: configuration ok", path.display());
        return Ok(());
    }
    let cfg = ServerConfig::load(&args.config)?;
    init_logging(&cfg.logging.level);
    match sallyport_server::raise_nofile_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(
                ?before,
                ?after,
                "raised the open-files limit (RLIMIT_NOFILE)"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    let result = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        sallyport_server::run(cfg, shutdown).await
    });
    // Do not wait for blocking helper threads (DNS lookups, device I/O).
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    result?;
    Ok(())
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can still be stopped by SIGKILL.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// message before already includes.
fn report(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let m = cause.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
    }
    s
}
