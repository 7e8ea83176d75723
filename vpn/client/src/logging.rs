//! Logging for the binary (not part of the library). On Linux: stderr, which
//! systemd's journal collects. On Windows: a file under
//! `%ProgramData%\Sallyport\logs`, rotated daily and kept for a week, plus
//! the console when run in the foreground.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Whether to log to the console as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// Foreground: also log to stderr.
    Yes,
    /// Windows service: there is no console.
    #[cfg_attr(not(windows), allow(dead_code))]
    No,
}

/// Keeps the log file's writer thread alive; dropping it flushes the file.
#[must_use = "dropping the guard stops file logging"]
pub struct Guard {
    #[cfg(windows)]
    _file: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the global subscriber. `RUST_LOG` overrides `level`.
pub fn init(level: &str, console: Console) -> Guard {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    use std::io::IsTerminal;
    let stderr = (console == Console::Yes).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter())
    });

    #[cfg(windows)]
    {
        let dir = crate::service::data_dir().join("logs");
        let appender = std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                tracing_appender::rolling::Builder::new()
                    .rotation(tracing_appender::rolling::Rotation::DAILY)
                    .filename_prefix("client")
                    .filename_suffix("log")
                    .max_log_files(7)
                    .build(&dir)
                    .map_err(|e| e.to_string())
            });
        let (file, guard, file_error) = match appender {
            Ok(appender) => {
                let (writer, guard) = tracing_appender::non_blocking(appender);
                let layer = tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false)
                    .with_filter(filter());
                (Some(layer), Some(guard), None)
            }
            Err(e) => (None, None, Some(e)),
        };
        tracing_subscriber::registry()
            .with(stderr)
            .with(file)
            .init();
        match file_error {
            None => tracing::debug!(dir = %dir.display(), "logging to file"),
            Some(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot log to file"),
        }
        Guard { _file: guard }
    }
    #[cfg(not(windows))]
    {
        tracing_subscriber::registry().with(stderr).init();
        Guard {}
    }
}
