//! `lifeboat jobs list` and `lifeboat jobs cancel`: the coordinator's long tasks (cuts,
//! processing passes, cache trims, retention, scrubs), as ASR's jobs view shows them, and
//! stopping one.

use anyhow::Result;
use lifeboat_proto::pb;

use crate::common::fmt_time;
use crate::coordinator::{CoordinatorArgs, admin, status_error};

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    coordinator: CoordinatorArgs,
    /// Only running jobs.
    #[arg(long)]
    running: bool,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    coordinator: CoordinatorArgs,
    /// The job's id (from `lifeboat jobs list`).
    #[arg(long)]
    id: u64,
}

fn state(j: &pb::Job) -> &'static str {
    match pb::JobState::try_from(j.state) {
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub async fn list(a: ListArgs) -> Result<()> {
    let ListArgs {
        coordinator,
        running,
    } = a;
    let mut client = admin(&coordinator).await?;
    let jobs = client
        .list_jobs(pb::ListJobsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .jobs;
    let now = lifeboat_store::manifest::now_millis();
    for j in jobs.iter().filter(|j| !running || state(j) == "running") {
        let took = match j.ended_ms {
            0 => format!("{}s so far", now.saturating_sub(j.started_ms) / 1000),
            e => humantime::format_duration(std::time::Duration::from_millis(
                e.saturating_sub(j.started_ms),
            ))
            .to_string(),
        };
        let what = if j.ended_ms == 0 {
            &j.progress
        } else {
            &j.outcome
        };
        println!(
            "{:>6}  {:<14} {:<10} {}  {:<12} by {:<12} {what}",
            j.id,
            j.kind,
            state(j),
            fmt_time(j.started_ms),
            took,
            j.requested_by
        );
    }
    Ok(())
}

pub async fn cancel(a: CancelArgs) -> Result<()> {
    let CancelArgs { coordinator, id } = a;
    let mut client = admin(&coordinator).await?;
    client
        .cancel_job(pb::CancelJobRequest { id })
        .await
        .map_err(status_error)?;
    println!("job {id}: cancellation requested");
    Ok(())
}
