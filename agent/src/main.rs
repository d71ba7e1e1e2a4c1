//! `lifeboat-agent`: the per-VM agent's command line. `main` owns exit codes:
//! 0 success, 1 runtime failure, 2 bad usage or config.

mod config;
mod scan;
mod state;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lifeboat_store::manifest::{Consistency, PointKind};

use crate::config::Config;
use crate::sync::Agent;

/// Lifeboat's per-VM replication agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Agent config file.
    #[arg(
        long,
        short,
        env = "LIFEBOAT_AGENT_CONFIG",
        default_value = "/etc/lifeboat/agent.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ship every disk's changes once, tag them and publish a single-VM point.
    Sync,
    /// Replicate continuously: a cycle every `replication.interval`, until stopped.
    Run,
    /// Show each disk's replication state.
    Status,
    /// Validate the config file and exit.
    CheckConfig,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        Command::Status => status(&config),
        Command::Sync => {
            let agent = Agent::open(config).await?;
            cycle(&agent).await
        }
        Command::Run => {
            let agent = Agent::open(config).await?;
            let interval = agent.config.replication.interval;
            loop {
                if let Err(e) = cycle(&agent).await {
                    // A failed cycle is retried at the next tick; nothing it did is trusted
                    // until reconciled again.
                    tracing::error!(error = %format!("{e:#}"), "replication cycle failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tokio::signal::ctrl_c() => {
                        tracing::info!("stopping");
                        return Ok(());
                    }
                }
            }
        }
    }
}

async fn cycle(agent: &Agent) -> Result<()> {
    let mut tags = Vec::new();
    for disk in &agent.config.disks {
        sync::check_disk_path(disk)?;
        let mut st = agent.reconcile(disk).await?;
        let report = agent
            .sync_disk(disk, &mut st, Consistency::NotFrozen, false)
            .await?;
        println!(
            "disk {}: tag {} ({}), read {} bytes, {} changed blocks ({} bytes), {} segment(s), {} bytes stored, {:.2?}",
            disk.id,
            report.tag.seq,
            report.tag.consistency,
            report.stats.bytes_read,
            report.stats.blocks_changed,
            report.stats.bytes_changed,
            report.segments,
            report.stored_bytes,
            report.elapsed
        );
        tags.push(report.tag);
    }
    let point = agent.publish_local_point(&tags, PointKind::Crash).await?;
    println!(
        "published recovery point {} ({} member(s))",
        point.id,
        point.members.len()
    );
    Ok(())
}

fn status(config: &Config) -> Result<()> {
    for disk in &config.disks {
        match state::load(&config.state_dir, &disk.id) {
            Ok(Some(s)) => {
                let size = match &s.content {
                    state::Content::Image { size, .. } => format!("{size} bytes"),
                    state::Content::Directory { files } => format!("{} files", files.len()),
                };
                println!(
                    "disk {}: last tag {}, segments {}..={}, {size}",
                    disk.id, s.tag_seq, s.from_segment, s.through_segment
                );
            }
            Ok(None) => println!("disk {}: not replicated yet", disk.id),
            Err(e) => println!("disk {}: {e}", disk.id),
        }
    }
    Ok(())
}
