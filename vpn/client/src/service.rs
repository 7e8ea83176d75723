//! The Windows service (part of the binary, not the library):
//! `sallyport-client service install|uninstall|start|stop`, and `service run`,
//! the entry point the service control manager starts.
//!
//! The MSI registers the same service itself (name, arguments, automatic
//! start); `service install` is for running the client without the MSI.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sallyport_client::config::ClientConfig;
use windows_service::service::{
    ServiceAccess, ServiceControl, ServiceControlAccept, ServiceErrorControl, ServiceExitCode,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use crate::logging::{self, Console};

/// The service's name; the MSI (`packaging/msi/sallyport.wxs`) uses the same.
pub const SERVICE_NAME: &str = "Sallyport";
const DISPLAY_NAME: &str = "Sallyport VPN client";
const DESCRIPTION: &str = "Connects this computer to a Sallyport VPN server.";
const SERVICE_TYPE: ServiceType = ServiceType::OWN_PROCESS;
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// `sallyport-client service ...`
#[derive(clap::Subcommand, Debug, Clone, Copy)]
pub enum Command {
    /// Manage the Windows service.
    #[command(subcommand)]
    Service(Action),
}

/// What to do with the service.
#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Register the service (automatic start) for this executable.
    Install,
    /// Stop the service if it runs, and remove it.
    Uninstall,
    /// Start the service.
    Start,
    /// Stop the service and wait until it has stopped.
    Stop,
    /// The service's entry point: started by Windows, not by hand.
    #[command(hide = true)]
    Run,
}

/// `%ProgramData%\Sallyport`: the configuration and the logs.
///
/// Asked of the Known Folders API rather than the environment: a service's
/// environment need not have `ProgramData` (wine gives services another).
pub fn data_dir() -> PathBuf {
    known_folders::get_known_folder_path(known_folders::KnownFolder::ProgramData)
        .or_else(|| std::env::var_os("ProgramData").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
        .join("Sallyport")
}

/// Runs a `service` subcommand; `config` is the explicit `--config`, if any.
pub fn command(Command::Service(action): Command, config: Option<PathBuf>) -> anyhow::Result<()> {
    match action {
        Action::Install => install(config),
        Action::Uninstall => uninstall(),
        Action::Start => start(),
        Action::Stop => stop(),
        Action::Run => {
            let path = config.unwrap_or_else(|| data_dir().join("client.toml"));
            let _ = CONFIG_PATH.set(path);
            service_dispatcher::start(SERVICE_NAME, ffi_service_main).context(
                "connect to the service control manager (`service run` is started by Windows; \
                 use `service start`, or run without a subcommand in the foreground)",
            )
        }
    }
}

fn manager(access: ServiceManagerAccess) -> anyhow::Result<ServiceManager> {
    ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT | access)
        .context("open the service control manager (run as Administrator)")
}

fn install(config: Option<PathBuf>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locate sallyport-client.exe")?;
    let mut args: Vec<OsString> = vec!["service".into(), "run".into()];
    if let Some(config) = config {
        let config = std::path::absolute(&config)
            .with_context(|| format!("resolve {}", config.display()))?;
        args.extend(["--config".into(), config.into_os_string()]);
    }
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: SERVICE_TYPE,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe.clone(),
        launch_arguments: args,
        dependencies: vec![],
        account_name: None, // LocalSystem: creating the adapter needs it.
        account_password: None,
    };
    let service = manager(ServiceManagerAccess::CREATE_SERVICE)?
        .create_service(&info, ServiceAccess::CHANGE_CONFIG)
        .with_context(|| format!("create service {SERVICE_NAME}"))?;
    service
        .set_description(DESCRIPTION)
        .context("set the service description")?;
    println!(
        "service {SERVICE_NAME} installed (automatic start): {}",
        exe.display()
    );
    Ok(())
}

fn uninstall() -> anyhow::Result<()> {
    let service = manager(ServiceManagerAccess::empty())?
        .open_service(
            SERVICE_NAME,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .with_context(|| format!("open service {SERVICE_NAME}"))?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        service.stop().context("stop the service")?;
        wait_for(&service, ServiceState::Stopped)?;
    }
    service.delete().context("delete the service")?;
    println!("service {SERVICE_NAME} removed");
    Ok(())
}

fn start() -> anyhow::Result<()> {
    let service = manager(ServiceManagerAccess::empty())?
        .open_service(SERVICE_NAME, ServiceAccess::START)
        .with_context(|| format!("open service {SERVICE_NAME}"))?;
    service.start::<&OsStr>(&[]).context("start the service")?;
    println!("service {SERVICE_NAME} started");
    Ok(())
}

fn stop() -> anyhow::Result<()> {
    let service = manager(ServiceManagerAccess::empty())?
        .open_service(
            SERVICE_NAME,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP,
        )
        .with_context(|| format!("open service {SERVICE_NAME}"))?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        service.stop().context("stop the service")?;
        wait_for(&service, ServiceState::Stopped)?;
    }
    println!("service {SERVICE_NAME} stopped");
    Ok(())
}

fn wait_for(
    service: &windows_service::service::Service,
    state: ServiceState,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let now = service.query_status()?.current_state;
        if now == state {
            return Ok(());
        }
        if started.elapsed() > STOP_TIMEOUT {
            bail!("service is {now:?} after {STOP_TIMEOUT:?}, expected {state:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The configuration the service runs with, set before the dispatcher starts.
static CONFIG_PATH: OnceLock<PathBuf> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

fn service_main(_args: Vec<OsString>) {
    // There is nobody to report to but the log (and the exit code).
    if let Err(e) = run_service() {
        tracing::error!(error = %crate::report(&e), "service failed");
    }
}

fn run_service() -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            stop.cancel();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let status = service_control_handler::register(SERVICE_NAME, handler)
        .context("register the service control handler")?;
    let set = |state, accept, code| {
        status.set_service_status(ServiceStatus {
            service_type: SERVICE_TYPE,
            current_state: state,
            controls_accepted: accept,
            exit_code: code,
            checkpoint: 0,
            wait_hint: Duration::from_secs(10),
            process_id: None,
        })
    };

    let path = CONFIG_PATH
        .get()
        .cloned()
        .unwrap_or_else(|| data_dir().join("client.toml"));
    let cfg = ClientConfig::load(&path);
    let level = cfg.as_ref().map_or("info", |c| c.logging.level.as_str());
    let _log = logging::init(level, Console::No);
    let accept = ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN;
    set(ServiceState::Running, accept, ServiceExitCode::NO_ERROR)?;
    tracing::info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "service started");

    let result = cfg
        .map_err(anyhow::Error::from)
        .and_then(|cfg| crate::run_until(cfg, async move { shutdown.cancelled().await }));
    // A service-specific code makes the SCM record the stop as a failure.
    let code = match &result {
        Ok(()) => ServiceExitCode::NO_ERROR,
        Err(e) => {
            tracing::error!(error = %crate::report(e), "stopping");
            ServiceExitCode::ServiceSpecific(1)
        }
    };
    set(ServiceState::Stopped, ServiceControlAccept::empty(), code)?;
    Ok(())
}
