//! `sallyport-impair --dev NAME --delay-ms D --loss-percent P [--seed S]`
//!
//! Creates the TUN device NAME (up, MTU 1500, no address) and sends every
//! packet routed into it back into the kernel D ms later, dropping P % of
//! them at random (see `sallyport_conformance::impair`). The lab routes a
//! router namespace's forwarded traffic through it. Prints the counters every
//! few seconds and on SIGTERM/SIGINT, then exits 0.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use sallyport_conformance::impair::{self, ImpairConfig, ImpairStats};

/// Delays and drops the packets routed into a TUN device.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Name of the TUN device to create.
    #[arg(long)]
    dev: String,
    /// Delay of every packet, each direction, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Share of packets dropped, in percent.
    #[arg(long, default_value_t = 0.0)]
    loss_percent: f64,
    /// Seed of the loss decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Packets held at once before further ones are dropped.
    #[arg(long, default_value_t = 50_000)]
    queue: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(0.0..=100.0).contains(&args.loss_percent) {
        eprintln!("sallyport-impair: --loss-percent must be within 0..=100");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sallyport-impair: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(real_main(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sallyport-impair: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn real_main(args: Args) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let dev = tun_rs::DeviceBuilder::new()
        .name(args.dev.clone())
        .mtu(1500)
        .enable(true)
        .build_async()
        .map_err(|e| std::io::Error::new(e.kind(), format!("create TUN {}: {e}", args.dev)))?;
    let cfg = ImpairConfig {
        delay: Duration::from_millis(args.delay_ms),
        loss: args.loss_percent / 100.0,
        seed: args.seed,
        queue: args.queue,
    };
    eprintln!(
        "sallyport-impair: {} up: delay {} ms each way, loss {} %",
        args.dev, args.delay_ms, args.loss_percent
    );
    let stats = Arc::new(ImpairStats::default());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    let forward = impair::run(Arc::new(dev), cfg, stats.clone());
    tokio::pin!(forward);
    let result = loop {
        tokio::select! {
            r = &mut forward => break r,
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            _ = report.tick() => eprintln!("sallyport-impair: {}", stats.summary()),
        }
    };
    eprintln!("sallyport-impair: stopped: {}", stats.summary());
    result
}
