//! The agent as a Windows service: the service control manager's entry points (dispatcher,
//! control handler, status reports) around the same replication loop `run` drives, and
//! registering or removing the service (`lifeboat-agent service install|uninstall`).
//!
//! Stop, pre-shutdown and shutdown all become the loop's stop: a cut holding a freeze, or
//! making shadow copies, ends first; anything else (reading copies among it: they are then
//! released) is dropped at once and resumes from its checkpoints at the next start. The control handler reports
//! stop-pending at once, and the checkpoint ticks while the loop drains, so the manager
//! neither kills the service mid-cut nor waits on a hung one for ever.
//!
//! The config is read under the manager: a bad one stops the service with a service-specific
//! exit code (2) and a line in `agent.log` beside the config; a missing one (a first install)
//! stops it with exit code 0 and a line saying where the config goes. At every start the
//! service sets its own recovery (restart 5 s, 5 s and 30 s after failures, including a stop
//! with an error exit code) and pre-shutdown time, so a service the MSI registered and one
//! `service install` registered behave alike.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_dispatcher;
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

use crate::config::Config;

/// How long the manager is told a start or a stop may take before it is considered hung. A
/// stop waits for a cut in its freeze (at most 60 s, the largest `freeze_timeout`) and for
/// the capture's upload.
const START_HINT: Duration = Duration::from_secs(60);
const STOP_HINT: Duration = Duration::from_secs(90);

/// What `dispatch` hands the service's main function, which the dispatcher calls on a thread
/// of its own with only the service's arguments: the service's name and its config's path.
static PENDING: Mutex<Option<(String, std::path::PathBuf)>> = Mutex::new(None);
/// Where the log goes once known (see [`LogFile`]).
static LOG_PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
/// The replication loop's outcome, for the process's exit code.
static OUTCOME: Mutex<Option<Result<()>>> = Mutex::new(None);

windows_service::define_windows_service!(ffi_service_main, service_main);

/// Runs the agent as the service `name` with the config at `config`: returns when the service
/// has stopped. Fails at once when the process was not started by the service control manager.
pub fn dispatch(name: &str, config: &Path) -> Result<()> {
    *PENDING.lock().unwrap() = Some((name.to_owned(), config.to_path_buf()));
    service_dispatcher::start(name, ffi_service_main).map_err(|e| {
        anyhow!(
            "cannot reach the service control manager: {e} (this command is what the installed service runs; start it with `sc start {name}`, or run `lifeboat-agent run` in a console)"
        )
    })?;
    OUTCOME
        .lock()
        .unwrap()
        .take()
        .unwrap_or_else(|| Err(anyhow!("the service's main function did not run")))
}

fn service_main(_arguments: Vec<OsString>) {
    let Some((name, config)) = PENDING.lock().unwrap().take() else {
        return;
    };
    let (outcome, reporter) = run_service(&name, &config);
    let exit = match &outcome {
        Ok(()) => {
            tracing::info!("the service stopped");
            ServiceExitCode::Win32(0)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the service stopped on an error");
            // 2 for a config that cannot be used (as the console's exit code), 1 otherwise.
            let bad_config = e.downcast_ref::<BadConfig>().is_some();
            ServiceExitCode::ServiceSpecific(if bad_config { 2 } else { 1 })
        }
    };
    // The outcome is in place before the manager hears "stopped": that returns `dispatch`.
    *OUTCOME.lock().unwrap() = Some(outcome);
    if let Some(r) = reporter {
        r.set(ServiceState::Stopped, exit, Duration::ZERO);
    }
}

/// The status handle and the checkpoint a pending state counts up.
struct Reporter {
    handle: service_control_handler::ServiceStatusHandle,
    checkpoint: AtomicU32,
}

impl Reporter {
    fn set(&self, state: ServiceState, exit: ServiceExitCode, hint: Duration) {
        let pending = matches!(
            state,
            ServiceState::StartPending | ServiceState::StopPending
        );
        let status = ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: if state == ServiceState::Running {
                ServiceControlAccept::STOP | ServiceControlAccept::PRESHUTDOWN
            } else {
                ServiceControlAccept::empty()
            },
            exit_code: exit,
            checkpoint: if pending {
                self.checkpoint.fetch_add(1, Ordering::SeqCst) + 1
            } else {
                0
            },
            wait_hint: if pending { hint } else { Duration::ZERO },
            process_id: None,
        };
        if let Err(e) = self.handle.set_service_status(status) {
            tracing::warn!(error = %e, ?state, "cannot report the service's state");
        }
    }
}

/// A config the service cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadConfig(String);

/// Runs the loop under the manager; the reporter (once registered) is for the final "stopped".
fn run_service(name: &str, path: &Path) -> (Result<()>, Option<std::sync::Arc<Reporter>>) {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // Set once registered; the handler reports stop-pending through it at once.
    let cell: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<Reporter>>> = Default::default();
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = {
        let (cell, stopping) = (cell.clone(), stopping.clone());
        move |control| match control {
            ServiceControl::Stop | ServiceControl::Preshutdown | ServiceControl::Shutdown => {
                tracing::info!(?control, "the service manager asks the agent to stop");
                stopping.store(true, Ordering::SeqCst);
                if let Some(r) = cell.get() {
                    r.set(
                        ServiceState::StopPending,
                        ServiceExitCode::Win32(0),
                        STOP_HINT,
                    );
                }
                let _ = stop_tx.send(true);
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        }
    };
    let handle = match service_control_handler::register(name, handler) {
        Ok(h) => h,
        Err(e) => {
            let e = anyhow!(e).context("cannot register the service's control handler");
            return (Err(e), None);
        }
    };
    let reporter = std::sync::Arc::new(Reporter {
        handle,
        checkpoint: AtomicU32::new(0),
    });
    let _ = cell.set(reporter.clone());
    reporter.set(
        ServiceState::StartPending,
        ServiceExitCode::Win32(0),
        START_HINT,
    );
    // The config and its directory are made Administrators' before the config is read: the
    // service runs what it says as SYSTEM.
    if let Err(e) = crate::platform::protect_config(path) {
        let _ = LOG_PATH.set(path.parent().unwrap_or(Path::new(".")).join("agent.log"));
        let e = anyhow!(BadConfig(format!(
            "cannot make {} Administrators' only: {e}",
            path.display()
        )));
        return (Err(e), Some(reporter));
    }
    // No config yet (the MSI starts the service after a first install): nothing to run, and
    // not a failure to restart on.
    if !path.exists() {
        let beside = path.parent().unwrap_or(Path::new("."));
        let _ = LOG_PATH.set(beside.join("agent.log"));
        // The example config's state directory, made private now: a secret file written into
        // it before the first real start inherits SYSTEM's and Administrators' access only,
        // and is not refused for being readable by Users (ProgramData's default).
        let state = beside.join("state");
        match std::fs::create_dir_all(&state)
            .and_then(|()| crate::platform::make_private_dir(&state))
        {
            Ok(()) => tracing::info!(
                state = %state.display(),
                "made the state directory for SYSTEM and Administrators only: secret files go there"
            ),
            Err(e) => tracing::warn!(
                state = %state.display(),
                error = %e,
                "cannot make the state directory private"
            ),
        }
        tracing::info!(
            config = %path.display(),
            "no config yet: copy agent.example.toml beside it, edit it, then `sc start {name}`; stopping"
        );
        return (Ok(()), Some(reporter));
    }
    let config = match Config::load(path) {
        Ok(c) => {
            let _ = LOG_PATH.set(c.state_dir.join("agent.log"));
            c
        }
        Err(e) => {
            let beside = path.parent().unwrap_or(Path::new(".")).join("agent.log");
            let _ = LOG_PATH.set(beside);
            return (Err(BadConfig(e.to_string()).into()), Some(reporter));
        }
    };
    tracing::info!(service = name, config_vm = %config.vm, "starting as a Windows service");
    configure_recovery(name);

    // Ready and stopping reach the manager from the loop, at the moments systemd hears them.
    let r = reporter.clone();
    let s = stopping.clone();
    lifeboat_store::service::report_to(move |event| match event {
        // A stop that came while the agent opened is stop-pending already: not "running".
        lifeboat_store::service::Event::Ready if !s.load(Ordering::SeqCst) => r.set(
            ServiceState::Running,
            ServiceExitCode::Win32(0),
            Duration::ZERO,
        ),
        lifeboat_store::service::Event::Ready => {}
        lifeboat_store::service::Event::Stopping => {
            s.store(true, Ordering::SeqCst);
            r.set(
                ServiceState::StopPending,
                ServiceExitCode::Win32(0),
                STOP_HINT,
            )
        }
    });

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return (
                Err(anyhow!(e).context("cannot start the runtime")),
                Some(reporter),
            );
        }
    };
    let stop = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    // While the loop drains, the checkpoint moves: the manager sees progress, not a hang.
    let ticker = {
        let (r, s) = (reporter.clone(), stopping.clone());
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                if s.load(Ordering::SeqCst) {
                    r.set(
                        ServiceState::StopPending,
                        ServiceExitCode::Win32(0),
                        STOP_HINT,
                    );
                }
            }
        })
    };
    let result = runtime.block_on(crate::replicate(config, stop));
    ticker.abort();
    runtime.shutdown_timeout(Duration::from_secs(5));
    crate::progress::flush(Duration::from_secs(5));
    (result, Some(reporter))
}

/// Registers the service `name` to run this executable with the config at `config_path`
/// (made absolute): started at boot unless `manual`, restarted 5 s, 5 s and 30 s after
/// failures.
pub fn install(name: &str, config_path: &Path, manual: bool) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let config = std::path::absolute(config_path)
        .with_context(|| format!("cannot make {} absolute", config_path.display()))?;
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .context("cannot open the service control manager (an administrator's console?)")?;
    let info = ServiceInfo {
        name: name.into(),
        // Display names are unique among services like names: a second agent's (tests, a
        // second config) carries its name.
        display_name: if name == crate::SERVICE_NAME {
            "Lifeboat agent".into()
        } else {
            format!("Lifeboat agent ({name})").into()
        },
        service_type: ServiceType::OWN_PROCESS,
        start_type: if manual {
            ServiceStartType::OnDemand
        } else {
            ServiceStartType::AutoStart
        },
        error_control: ServiceErrorControl::Normal,
        executable_path: exe,
        launch_arguments: vec![
            "--config".into(),
            config.into_os_string(),
            "service".into(),
            "run".into(),
            "--name".into(),
            name.into(),
        ],
        dependencies: vec![],
        // LocalSystem: reading volumes and making shadow copies need it.
        account_name: None,
        account_password: None,
    };
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG)
        .with_context(|| format!("cannot create the service {name}"))?;
    if let Err(e) = service.set_description(DESCRIPTION) {
        eprintln!("warning: service {name}: cannot set its description: {e}");
    }
    // The recovery settings are the service's own at every start (`configure_recovery`).
    println!(
        "installed service {name}: {} --config {} service run (start it with `sc start {name}`)",
        info.executable_path.display(),
        Path::new(&info.launch_arguments[1]).display()
    );
    Ok(())
}

/// Stops the service `name` if it runs (waiting for it, up to the stop hint and a margin) and
/// removes it.
pub fn uninstall(name: &str) -> Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("cannot open the service control manager (an administrator's console?)")?;
    let service = manager
        .open_service(
            name,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .with_context(|| format!("cannot open the service {name}"))?;
    let status = service.query_status()?;
    if status.current_state != ServiceState::Stopped {
        if status.current_state != ServiceState::StopPending {
            service
                .stop()
                .with_context(|| format!("cannot stop the service {name}"))?;
        }
        let deadline = std::time::Instant::now() + STOP_HINT + Duration::from_secs(30);
        while service.query_status()?.current_state != ServiceState::Stopped {
            if std::time::Instant::now() > deadline {
                bail!("the service {name} did not stop within {STOP_HINT:?}; not removed");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    service
        .delete()
        .with_context(|| format!("cannot remove the service {name}"))?;
    println!("removed service {name}");
    Ok(())
}

const DESCRIPTION: &str =
    "Replicates this machine's disks to Lifeboat recovery points (disaster recovery).";

/// The service's recovery, set by the running service on itself: restarts after failures
/// (also after a stop with an error exit code) and time to drain a cut at shutdown. A
/// manager without these settings (wine's) still runs the service: failures are logged.
fn configure_recovery(name: &str) {
    let result = (|| -> windows_service::Result<()> {
        let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
        let service = manager.open_service(name, ServiceAccess::CHANGE_CONFIG)?;
        service.update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86_400)),
            reboot_msg: None,
            command: None,
            actions: Some(
                [5, 5, 30]
                    .into_iter()
                    .map(|s| ServiceAction {
                        action_type: ServiceActionType::Restart,
                        delay: Duration::from_secs(s),
                    })
                    .collect(),
            ),
        })?;
        service.set_failure_actions_on_non_crash_failures(true)?;
        service.set_preshutdown_timeout(STOP_HINT)
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot set the service's restart on failure and pre-shutdown time");
    }
}

/// The service's log: `agent.log` beside its state (or beside its config when that cannot be
/// read), opened for appending (its directory made) at the first line once that place is
/// known; lines before are dropped. At 16 MiB it moves to `agent.log.1` and begins again. A
/// line that cannot be written is dropped too: the service runs on without its log.
#[derive(Debug)]
pub struct LogFile;

static LOG: Mutex<Option<crate::logfile::RotatingLog>> = Mutex::new(None);

/// `agent.log`'s size before it moves to `agent.log.1`: the service writes a few lines per
/// cycle, so this is weeks of them, and the two files stay under 32 MiB.
const LOG_LIMIT: u64 = 16 << 20;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogLine;
    fn make_writer(&'a self) -> Self::Writer {
        LogLine
    }
}

/// One log line's writer.
#[derive(Debug)]
pub struct LogLine;

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(path) = LOG_PATH.get() else {
            return Ok(buf.len());
        };
        let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
        log.get_or_insert_with(|| crate::logfile::RotatingLog::new(path, LOG_LIMIT))
            .write_line(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
