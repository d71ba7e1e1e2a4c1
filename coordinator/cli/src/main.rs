//! `lifeboat`: the admin CLI, one module per command. `main` owns exit codes: 0 success, 1
//! failure (for `verify`: damage found), 2 bad usage or input (unknown point, occupied output,
//! invalid ids, a store that cannot be opened or read through by `verify`).

mod common;
mod coordinator;
mod failover;
mod jobs;
mod members;
mod points;
mod process;
mod prune;
mod restore;
mod snapshot;
mod store;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lifeboat_store::GroupId;

/// Lifeboat administration.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where recovery points are read from.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// A local store directory, or a TOML file describing the store (`kind = "azure"`, …).
    #[arg(long)]
    pub store: PathBuf,
    /// Replication group.
    #[arg(long)]
    pub group: GroupId,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cut a recovery point across the group now; prints its id once it is published.
    Snapshot(snapshot::Args),
    /// The group's members: connected, healthy, replication figures.
    Members(members::Args),
    /// Remove a VM from the group (its certificate stops working; its data stays).
    RemoveMember(members::RemoveArgs),
    /// Move recovery points from the cache store into the target store (one pass) and report
    /// RPO and the latest processed point.
    Process(process::Args),
    /// Apply retention to the target store: delete expired points and the data no kept point
    /// needs (the coordinator does this after each processing pass; this is for when it is gone).
    Prune(prune::Args),
    /// Fail over: restore a recovery point's VMs from the target store, verified.
    Failover {
        #[command(subcommand)]
        action: Option<failover::FailoverAction>,
        #[command(flatten)]
        args: failover::FailoverArgs,
    },
    /// A DR drill: a failover into an isolated location; replication is not touched.
    TestFailover {
        #[command(subcommand)]
        action: Option<failover::DrillAction>,
        #[command(flatten)]
        args: failover::FailoverArgs,
    },
    /// Check a store (cache or target), like restic's `check`: resolve every reference, check
    /// every checksum (with --read-data every block too), and name each damaged or missing
    /// object with the recovery points it breaks. Exit 0 clean, 1 damage found, 2 could not
    /// verify (bad usage, store unreadable).
    Verify(verify::Args),
    /// Recovery points.
    Points {
        #[command(subcommand)]
        command: PointsCommand,
    },
    /// The stores themselves.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Restore a VM's disks at a recovery point, verifying every byte.
    Restore(restore::Args),
    /// The coordinator's jobs: cuts, processing passes, cache trims, retention, scrubs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Running jobs, then the recent ones, newest first.
    List(jobs::ListArgs),
    /// Ask a running job to stop (a cut tells its members to abort and thaw).
    Cancel(jobs::CancelArgs),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Create a store's Azure container (or local directory) if it does not exist: the one
    /// step that needs a credential allowed to create containers (the account key, or an
    /// account SAS); agents and the coordinator can then run with container-scoped SAS tokens.
    Init(store::InitArgs),
}

#[derive(Debug, Subcommand)]
enum PointsCommand {
    /// List a group's recovery points, oldest first.
    List(points::ListArgs),
}

/// An error the user can fix by changing the request: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub String);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(no_sigpipe_here)
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e.downcast_ref::<UsageError>().is_some()
                || matches!(
                    e.downcast_ref::<lifeboat_store::Error>(),
                    Some(lifeboat_store::Error::Invalid(_))
                );
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Snapshot(a) => snapshot::run(a).await,
        Command::Members(a) => members::run(a).await,
        Command::RemoveMember(a) => members::remove(a).await,
        Command::Process(a) => process::run(a).await,
        Command::Prune(a) => prune::run(a).await,
        Command::Failover {
            action: Some(failover::FailoverAction::Commit { to }),
            ..
        } => failover::commit(to),
        Command::Failover { action: None, args } => failover::run(args, false).await,
        Command::TestFailover {
            action: Some(failover::DrillAction::Cleanup { to }),
            ..
        } => failover::cleanup(to),
        Command::TestFailover { action: None, args } => failover::run(args, true).await,
        Command::Verify(a) => verify::run(a).await,
        Command::Points {
            command: PointsCommand::List(a),
        } => points::list(a).await,
        Command::Store {
            command: StoreCommand::Init(a),
        } => store::init(a).await,
        Command::Restore(a) => restore::run(a).await,
        Command::Jobs {
            command: JobsCommand::List(a),
        } => jobs::list(a).await,
        Command::Jobs {
            command: JobsCommand::Cancel(a),
        } => jobs::cancel(a).await,
    }
}

/// A reader that stops early (`lifeboat points list | head -n 1`) ends this process the way it
/// ends `ls` or `grep`: quietly, by SIGPIPE. Rust ignores SIGPIPE by default, which turns the
/// next write into a panic with a backtrace.
#[cfg(unix)]
#[allow(unsafe_code)]
fn quiet_on_broken_pipe() {
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn quiet_on_broken_pipe() {}

/// The runtime's threads, where the network I/O happens, block SIGPIPE: with its default
/// disposition restored for stdout's sake (above), a write to a socket the coordinator has
/// just closed (a stop, a restart) would otherwise kill the process with no message, even after
/// its answer arrived. A SIGPIPE raised by a write is sent to the thread that wrote; blocked,
/// it stays pending and the write returns EPIPE, which the gRPC stack handles. Output is
/// written on the main thread, which keeps the default.
#[cfg(unix)]
#[allow(unsafe_code)]
fn no_sigpipe_here() {
    // SAFETY: changes this thread's own signal mask; the set is initialised before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(not(unix))]
fn no_sigpipe_here() {}
