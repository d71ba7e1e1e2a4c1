//! `lifeboat snapshot`: asks the group's coordinator for a recovery point across the group now
//! and prints its id once it is published.

use anyhow::{Result, bail};
use lifeboat_proto::pb;
use lifeboat_store::GroupId;
use lifeboat_store::manifest::Consistency;

use crate::UsageError;
use crate::common::fmt_time;
use crate::coordinator::{CoordinatorArgs, admin, status_error};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    coordinator: CoordinatorArgs,
    /// The group the coordinator runs (checked against the coordinator's answer).
    #[arg(long)]
    group: GroupId,
    /// Run the members' application hooks: an app-consistent point.
    #[arg(long)]
    app_consistent: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let Args {
        coordinator,
        group,
        app_consistent,
    } = a;
    let mut client = admin(&coordinator).await?;
    let members = client
        .members(pb::MembersRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if members.group != group.as_str() {
        bail!(UsageError(format!(
            "the coordinator at {} runs group {}, not {group}",
            coordinator.coordinator, members.group
        )));
    }
    let kind = if app_consistent {
        pb::CutKind::App
    } else {
        pb::CutKind::Crash
    };
    let r = client
        .snapshot(pb::SnapshotRequest { kind: kind as i32 })
        .await
        .map_err(status_error)?
        .into_inner();
    let label = match pb::Consistency::try_from(r.consistency) {
        Ok(pb::Consistency::App) => Consistency::App,
        Ok(pb::Consistency::Crash) => Consistency::Crash,
        _ => Consistency::NotFrozen,
    };
    println!("{}", r.point_id);
    eprintln!(
        "published {label} point {} at {} (job {}) covering {}",
        r.point_id,
        fmt_time(r.time_ms),
        r.job_id,
        r.covered.join(", ")
    );
    for e in &r.excluded {
        eprintln!("  excluded {}: {}", e.vm, e.reason);
    }
    Ok(())
}
