//! `lifeboat-agent`: the per-VM agent's command line. `main` owns exit codes:
//! 0 success, 1 runtime failure, 2 bad usage or config.

mod blocks;
#[cfg(target_os = "linux")]
#[path = "cbt_linux.rs"]
mod cbt;
#[cfg(not(target_os = "linux"))]
#[path = "cbt_other.rs"]
mod cbt;
mod check;
mod config;
mod consistency;
mod cut;
mod dirdelta;
mod identity;
// The Windows service's log; elsewhere only its tests use it.
#[cfg_attr(not(windows), allow(dead_code))]
mod logfile;
mod member;
#[cfg(unix)]
#[path = "platform_unix.rs"]
mod platform;
#[cfg(windows)]
#[path = "platform_windows.rs"]
mod platform;
mod progress;
mod scan;
#[cfg(windows)]
#[path = "service_windows.rs"]
mod service;
mod session;
mod state;
mod sync;
mod vss;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::sync::Agent;

/// Lifeboat's per-VM replication agent.
/// Where the config is looked for when neither `--config` nor the environment names one: the
/// package's location, or on Windows the machine-wide application data directory.
#[cfg(not(windows))]
const DEFAULT_CONFIG: &str = "/etc/lifeboat/agent.toml";
#[cfg(windows)]
const DEFAULT_CONFIG: &str = r"C:\ProgramData\Lifeboat\agent.toml";

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Agent config file.
    #[arg(
        long,
        short,
        env = "LIFEBOAT_AGENT_CONFIG",
        default_value = DEFAULT_CONFIG
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ship every disk's changes once, cut a crash-consistent point (frozen where configured)
    /// and publish it.
    Sync {
        /// Re-read every file of directory disks, not only those whose stamps changed.
        #[arg(long)]
        verify: bool,
    },
    /// Cut a point now; with --app-consistent, run the disks' pre/post hooks around it.
    Snapshot {
        #[arg(long)]
        app_consistent: bool,
    },
    /// Replicate continuously: a cycle every `replication.interval`, until stopped.
    Run,
    /// Joins a group: gets this VM a client certificate from the coordinator (the key is made
    /// here and never sent) and pins the coordinator's CA.
    Enroll {
        /// The coordinator, `host:port`; defaults to `coordinator` in the config.
        #[arg(long)]
        coordinator: Option<String>,
        /// The one-time token from `lifeboat-coordinator join-token`.
        #[arg(long, env = "LIFEBOAT_JOIN_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Renew this agent's client certificate now, over a new key pair. The coordinator closes
    /// the running agent's session; it reconnects with the new certificate, after which the old
    /// one is refused. A running agent renews by itself once a third of the lifetime is left.
    Renew,
    /// Show each disk's replication state.
    Status,
    /// Validate the config file and exit.
    CheckConfig,
    /// Thaw every filesystem this config freezes, if frozen (the service manager's
    /// ExecStopPost: a stop can never leave a filesystem frozen).
    Thaw,
    /// Stop changed-block tracking of this config's disks: detach the eBPF programs and remove
    /// their pinned maps (before removing a disk or the agent; the next pass scans).
    Untrack,
    /// Preflight: store reachable and writable, coordinator reachable, clock, free space,
    /// disks readable and freezable. Exits 1 if any check fails.
    Check,
    /// Windows: run as, register or remove the agent's Windows service (on Linux the Debian
    /// package's systemd unit runs `lifeboat-agent run`).
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// (internal) Thaw MOUNTS after DEADLINE unless told `done` first; started around each
    /// freeze. With no MOUNTS, the first line of stdin names them: the thaw guard unit's form.
    #[command(hide = true)]
    ThawWatchdog {
        #[arg(long)]
        deadline_ms: Option<u64>,
        mounts: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceAction {
    /// What the installed service runs: `run`, under the service control manager, which
    /// starts and stops it. Logs go to `agent.log` in the state directory.
    Run {
        #[arg(long, default_value = SERVICE_NAME)]
        name: String,
    },
    /// Register the service (automatic start, restart on failure) to run this executable with
    /// this config. The MSI package does this itself.
    Install {
        #[arg(long, default_value = SERVICE_NAME)]
        name: String,
        /// Start only when asked (`sc start`), not at boot.
        #[arg(long)]
        manual: bool,
    },
    /// Stop the service if it runs, and remove it.
    Uninstall {
        #[arg(long, default_value = SERVICE_NAME)]
        name: String,
    },
}

/// The Windows service's name, as the MSI package registers it.
const SERVICE_NAME: &str = "LifeboatAgent";

/// Logs go to stderr (the journal under systemd), except a Windows service's, which has none.
fn init_tracing(writer: tracing_subscriber::fmt::writer::BoxMakeWriter, ansi: bool) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(writer)
        .with_ansi(ansi)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let service_run = matches!(
        cli.command,
        Command::Service {
            action: ServiceAction::Run { .. }
        }
    );
    if !service_run {
        init_tracing(
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        );
    }
    if let Command::ThawWatchdog {
        deadline_ms,
        mounts,
    } = &cli.command
    {
        consistency::run_watchdog(deadline_ms.map(std::time::Duration::from_millis), mounts);
        return ExitCode::SUCCESS;
    }
    // The service reads its config under the service manager, so that a bad one is reported
    // there (and in its log), not on a console nobody sees.
    if let Command::Service { action } = cli.command {
        return service_command(action, &cli.config);
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::CheckConfig) {
        // What a config can only get wrong on this machine: a `mount` that is not where the
        // disk's filesystem is mounted (freezing it would hold nothing). Bad config: exit 2.
        for d in &config.disks {
            if let Err(e) = consistency::verify_freeze_target(d) {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command, config));
    // The last figures reach `status.json` (the writer thread's job) before the process ends.
    progress::flush(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lifeboat-agent service …`: Windows only; elsewhere a usage error (exit 2).
#[cfg(windows)]
fn service_command(action: ServiceAction, path: &std::path::Path) -> ExitCode {
    let result = match action {
        ServiceAction::Run { name } => {
            // A service has no console: its log is a file (next to its state, or next to its
            // config when that cannot be read), made at the first line; run from a console,
            // where the dispatcher refuses at once, nothing is written.
            init_tracing(
                tracing_subscriber::fmt::writer::BoxMakeWriter::new(service::LogFile),
                false,
            );
            service::dispatch(&name, path)
        }
        ServiceAction::Install { name, manual } => match Config::load(path) {
            Ok(_) => service::install(&name, path, manual),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        ServiceAction::Uninstall { name } => service::uninstall(&name),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Errors of the service's own run are in its log already (`service_main`); this
        // line is for a console, so that a refused `service run` writes nothing.
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(windows))]
fn service_command(action: ServiceAction, _path: &std::path::Path) -> ExitCode {
    let _ = action;
    eprintln!(
        "error: `lifeboat-agent service` is for Windows; on Linux the Debian package's systemd unit (lifeboat-agent.service) runs `lifeboat-agent run`"
    );
    ExitCode::from(2)
}

async fn run(command: Command, config: Config) -> Result<()> {
    match command {
        Command::CheckConfig => {
            println!(
                "config ok: VM {} in group {}, {} disk(s)",
                config.vm,
                config.group,
                config.disks.len()
            );
            Ok(())
        }
        Command::ThawWatchdog { .. } => unreachable!("handled before the config is read"),
        Command::Service { .. } => unreachable!("handled before the runtime starts"),
        Command::Untrack => {
            for d in &config.disks {
                let key = sync::tracking_key(&config, d);
                if cbt::forget(&key)? {
                    println!("disk {}: tracking stopped", d.id);
                }
            }
            Ok(())
        }
        Command::Thaw => {
            consistency::thaw_leftovers(&cut::freeze_mounts(&config.disks));
            Ok(())
        }
        Command::Status => status(&config),
        Command::Check => {
            let checks = check::run(&config).await;
            for c in &checks {
                println!(
                    "{} {:<16} {}",
                    if c.ok { "ok  " } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
            let failed = checks.iter().filter(|c| !c.ok).count();
            if failed > 0 {
                anyhow::bail!("{failed} check(s) failed");
            }
            Ok(())
        }
        // From here on SIGTERM / SIGINT are ours: a cut in progress finishes (or hits its freeze
        // deadline) before the process exits, instead of dying with a filesystem frozen.
        Command::Sync { verify } => {
            let _stop = platform::stop_signal()?;
            cycle(&open(config).await?, false, verify, None).await
        }
        Command::Snapshot { app_consistent } => {
            let _stop = platform::stop_signal()?;
            cycle(&open(config).await?, app_consistent, false, None).await
        }
        Command::Enroll { coordinator, token } => {
            let addr = coordinator
                .or_else(|| config.coordinator.clone())
                .ok_or_else(|| anyhow::anyhow!("no coordinator: pass --coordinator HOST:20004 or set `coordinator` in the config"))?;
            let token = lifeboat_store::Secret::new(token);
            identity::enroll(&config.state_dir, &config.vm, &config.group, &addr, &token).await?;
            println!(
                "enrolled VM {} in group {} (coordinator {addr})",
                config.vm, config.group
            );
            Ok(())
        }
        Command::Renew => {
            let current =
                identity::Identity::load(&config.state_dir, config.coordinator.as_deref())?;
            let renewed = identity::renew(&config.state_dir, &current, &config.vm).await?;
            println!(
                "renewed the certificate of VM {}: valid until {}",
                config.vm,
                humantime::format_rfc3339_seconds(renewed.not_after()?)
            );
            Ok(())
        }
        Command::Run => replicate(config, platform::stop_signal()?).await,
    }
}

/// Replicates continuously until `stop` resolves: what `run` and the Windows service do. A
/// cut holding a freeze (or making shadow copies) ends before the stop is honoured; anything
/// else is dropped at once, resumable from its checkpoints.
async fn replicate(config: Config, stop: impl std::future::Future<Output = ()>) -> Result<()> {
    tokio::pin!(stop);
    let in_group =
        config.coordinator.is_some() || identity::dir(&config.state_dir).join("agent.pem").exists();
    let agent = open(config).await?;
    let interval = agent.config.replication.interval;
    let watchers = watch::Watchers::start(&agent.config.disks)?;
    // Ready once the config is valid, leftovers are thawed and the state is reconciled
    // with the store: what the service manager's start (Type=notify) then vouches for.
    lifeboat_store::service::ready();
    lifeboat_store::service::spawn_watchdog();
    if in_group {
        let r = member::run(&agent, &watchers, stop).await;
        lifeboat_store::service::stopping();
        return r;
    }
    // The first cycle sweeps: what changed while the agent was down is proven by
    // reading, not assumed from stamps.
    let mut last_sweep: Option<std::time::Instant> = None;
    loop {
        let sweep =
            last_sweep.is_none_or(|t| t.elapsed() >= agent.config.replication.verify_interval);
        let (result, then_stop) = match consistency::unless_stopped(
            cycle(&agent, false, sweep, Some(&watchers)),
            &mut stop,
        )
        .await
        {
            consistency::Run::Done(r) => (r, false),
            consistency::Run::DoneThenStop(r) => (r, true),
            consistency::Run::Stopped => (Ok(()), true),
        };
        if then_stop {
            if let Err(e) = result {
                tracing::error!(error = %format!("{e:#}"), "replication cycle failed");
            }
            lifeboat_store::service::stopping();
            return Ok(());
        }
        if sweep && result.is_ok() {
            last_sweep = Some(std::time::Instant::now());
        }
        if let Err(e) = result {
            // A failed cycle is retried at the next tick; nothing it did is trusted
            // until reconciled again.
            tracing::error!(error = %format!("{e:#}"), "replication cycle failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut stop => {
                tracing::info!("stopping");
                lifeboat_store::service::stopping();
                return Ok(());
            }
        }
    }
}

/// Opens the agent: takes its state directory for this process alone, then thaws anything a
/// previous run left frozen.
async fn open(config: Config) -> Result<Agent> {
    lock_state_dir(&config.state_dir)?;
    consistency::thaw_leftovers(&cut::freeze_mounts(&config.disks));
    Agent::open(config).await
}

/// Held for the life of the process: a second agent on the same state directory would
/// interleave tags and states, remove the other's block hash files, and thaw the other's
/// freeze as a leftover. The lock is the kernel's, released when the process ends however it
/// ends.
fn lock_state_dir(dir: &std::path::Path) -> Result<()> {
    static LOCK: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create state directory {}: {e}", dir.display()))?;
    // Windows: the state (the agent's key among it) is for SYSTEM and Administrators only,
    // whatever the parent (ProgramData lets Users read) would hand down.
    #[cfg(windows)]
    platform::make_private_dir(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot restrict state directory {} to SYSTEM and Administrators: {e}",
            dir.display()
        )
    })?;
    let path = dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            let _ = LOCK.set(file);
            Ok(())
        }
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another lifeboat-agent is using state directory {} (stop it first, or give this one its own state_dir)",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock {}: {e}", path.display())
        }
    }
}

async fn cycle(
    agent: &Agent,
    app: bool,
    verify: bool,
    watchers: Option<&watch::Watchers>,
) -> Result<()> {
    let started = std::time::Instant::now();
    let r = match cut::cut(agent, app, verify, watchers).await {
        Ok(r) => r,
        Err(e) => {
            progress::update(&agent.config.state_dir, |s| {
                s.last_error = Some(format!("{e:#}"))
            });
            return Err(e);
        }
    };
    let point = r.point.as_ref().expect("a local cut publishes its point");
    progress::update(&agent.config.state_dir, |s| {
        s.last_point = Some(point.id.to_string());
        s.last_point_time = Some(point.time);
        s.last_error = None;
    });
    let interval = agent.config.replication.interval;
    if started.elapsed() > interval {
        tracing::warn!(took = ?started.elapsed(), ?interval, "a cycle took longer than the interval: churn exceeds what this agent ships in time; points are further apart than configured (nothing is dropped)");
    }
    for (i, tag) in r.tags.iter().enumerate() {
        let (pre, cap) = (&r.precopy[i], &r.capture[i]);
        println!(
            "disk {}: tag {} ({}), pre-copy read {} bytes / {} changed blocks, capture read {} bytes / {} changed blocks in {:.3}s",
            tag.disk,
            tag.seq,
            tag.consistency,
            pre.bytes_read,
            pre.blocks_changed,
            cap.bytes_read,
            cap.blocks_changed,
            cap.elapsed.as_secs_f64()
        );
    }
    if let Some(w) = r.freeze {
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        };
        println!(
            "freeze: held {:.1?} (frozen_at_ms={} thawed_at_ms={}; FIFREEZE took {:.1?})",
            w.held,
            ms(w.frozen_at),
            ms(w.thawed_at),
            w.freezing
        );
    }
    println!(
        "published recovery point {} ({}, {} bytes stored, {:.2?})",
        point.id,
        point.effective_kind(),
        r.stored_bytes,
        r.elapsed
    );
    Ok(())
}

fn status(config: &Config) -> Result<()> {
    // A state directory this user may not read (on Windows it is SYSTEM's and Administrators'
    // only) would otherwise look like "no point yet".
    if let Err(e) = std::fs::read_dir(&config.state_dir)
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        anyhow::bail!(
            "cannot read state directory {}: {e} (run as root, or on Windows from an elevated console)",
            config.state_dir.display()
        );
    }
    let live = progress::load(&config.state_dir).unwrap_or_default();
    let now = lifeboat_store::manifest::now_millis();
    let ago = |t: u64| {
        humantime::format_duration(std::time::Duration::from_secs(now.saturating_sub(t) / 1000))
    };
    println!("VM {} in group {}", config.vm, config.group);
    match (&live.last_point, live.last_point_time) {
        (Some(p), Some(t)) => println!("last point: {p}, {} ago (RPO)", ago(t)),
        _ => println!("last point: none yet"),
    }
    if let Some(e) = &live.last_error {
        println!("last cycle failed: {e}");
    }
    for disk in &config.disks {
        let d = live
            .disks
            .get(disk.id.as_str())
            .cloned()
            .unwrap_or_default();
        match state::peek(&config.state_dir, &disk.id) {
            Ok(Some(s)) if s.tag_seq == 0 => {
                println!("disk {}: initial replication not finished", disk.id)
            }
            Ok(Some(s)) => {
                let size = match &s.content {
                    state::Content::Image { size, .. } => format!("{size} bytes"),
                    state::Content::Directory { files } => format!("{} files", files.len()),
                };
                println!(
                    "disk {}: last tag {} ({} ago), segments {}..={}, {size}; last cycle churn {} bytes at {:.1} MB/s",
                    disk.id,
                    s.tag_seq,
                    ago(d.last_tag_time),
                    s.from_segment,
                    s.through_segment,
                    d.last_churn_bytes,
                    d.last_churn_bytes_per_s / 1e6
                );
            }
            Ok(None) => println!("disk {}: not replicated yet", disk.id),
            Err(e) => println!("disk {}: {e}", disk.id),
        }
        if !d.tracking.is_empty() {
            println!("  tracking: {}", d.tracking);
        }
        if d.phase == "shipping" || d.phase == "capturing" {
            let pct = if d.total > 0 {
                100.0 * d.done as f64 / d.total as f64
            } else {
                0.0
            };
            println!(
                "  {}: {} of {} bytes shipped ({pct:.1}%), {:.1} MB/s, ETA {}, backlog {} bytes",
                d.phase,
                d.done,
                d.total,
                d.rate_bytes_per_s / 1e6,
                d.eta_s
                    .map(|s| format!("{s}s"))
                    .unwrap_or_else(|| "unknown".into()),
                d.backlog_bytes
            );
        }
    }
    Ok(())
}
