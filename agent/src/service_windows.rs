//! The agent as a Windows service: the service control manager's entry points (dispatcher,
//! control handler, status reports) around the same replication loop `run` drives, and
//! registering or removing the service (`lifeboat-agent service install|uninstall`).
//!
//! Stop, pre-shutdown and shutdown all become the loop's stop: a cut holding a freeze or a
//! shadow copy ends first (thawed, the shadow copy released), anything else is dropped at once
//! and resumes from its checkpoints at the next start. The service reports stop-pending with a
//! wait hint covering the longest freeze a config allows, and ticks its checkpoint while it
//! drains, so the manager neither kills it mid-cut nor waits on a hung one for ever.

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
/// of its own with only the service's arguments.
static PENDING: Mutex<Option<(String, Config)>> = Mutex::new(None);
/// The replication loop's outcome, for the process's exit code.
static OUTCOME: Mutex<Option<Result<()>>> = Mutex::new(None);

windows_service::define_windows_service!(ffi_service_main, service_main);

/// Runs the agent as the service `name`: returns when the service has stopped. Fails at once
/// when the process was not started by the service control manager.
pub fn dispatch(name: &str, config: Config) -> Result<()> {
    *PENDING.lock().unwrap() = Some((name.to_owned(), config));
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
    let (outcome, reporter) = run_service(&name, config);
    let exit = match &outcome {
        Ok(()) => {
            tracing::info!("the service stopped");
            ServiceExitCode::Win32(0)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the service stopped on an error");
            ServiceExitCode::ServiceSpecific(1)
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

/// Runs the loop under the manager; the reporter (once registered) is for the final "stopped".
fn run_service(name: &str, config: Config) -> (Result<()>, Option<std::sync::Arc<Reporter>>) {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Preshutdown | ServiceControl::Shutdown => {
            tracing::info!(?control, "the service manager asks the agent to stop");
            let _ = stop_tx.send(true);
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
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
    reporter.set(
        ServiceState::StartPending,
        ServiceExitCode::Win32(0),
        START_HINT,
    );
    tracing::info!(service = name, config_vm = %config.vm, "starting as a Windows service");

    // Ready and stopping reach the manager from the loop, at the moments systemd hears them.
    let r = reporter.clone();
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stopping.clone();
    lifeboat_store::service::report_to(move |event| match event {
        lifeboat_store::service::Event::Ready => r.set(
            ServiceState::Running,
            ServiceExitCode::Win32(0),
            Duration::ZERO,
        ),
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
        display_name: "Lifeboat agent".into(),
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
    // Refinements: a manager without them (wine's) still runs the service.
    let refinements = [
        (
            "description",
            service.set_description(
                "Replicates this machine's disks to Lifeboat recovery points (disaster recovery).",
            ),
        ),
        (
            "restart on failure",
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
            }),
        ),
        (
            "pre-shutdown timeout",
            service.set_preshutdown_timeout(STOP_HINT),
        ),
    ];
    for (what, r) in refinements {
        if let Err(e) = r {
            eprintln!("warning: service {name}: cannot set its {what}: {e}");
        }
    }
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

/// The service's log: `agent.log`, opened for appending (its directory made) at the first
/// line. A line that cannot be written is dropped: the service runs on without its log.
#[derive(Debug)]
pub struct LogFile {
    path: std::path::PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl LogFile {
    pub fn new(path: std::path::PathBuf) -> Self {
        LogFile {
            path,
            file: Mutex::new(None),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogLine<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LogLine(self)
    }
}

/// One log line's writer.
#[derive(Debug)]
pub struct LogLine<'a>(&'a LogFile);

impl std::io::Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = self.0.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.is_none() {
            if let Some(dir) = self.0.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            *file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.0.path)?,
            );
        }
        file.as_mut().expect("opened above").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
