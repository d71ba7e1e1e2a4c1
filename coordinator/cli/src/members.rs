//! `lifeboat members` and `lifeboat remove-member`: the group's members as its coordinator
//! sees them (health, RPO, processing), and removing one.

use anyhow::Result;
use lifeboat_proto::pb;
use lifeboat_store::VmId;

use crate::common::fmt_time;
use crate::coordinator::{CoordinatorArgs, admin, status_error};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    coordinator: CoordinatorArgs,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    coordinator: CoordinatorArgs,
    #[arg(long)]
    vm: VmId,
}

pub async fn run(a: Args) -> Result<()> {
    let Args { coordinator } = a;
    let mut client = admin(&coordinator).await?;
    let r = client
        .members(pb::MembersRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    println!("group {}: {} member(s)", r.group, r.members.len());
    let now = lifeboat_store::manifest::now_millis();
    for m in r.members {
        let state = match (m.connected, m.healthy) {
            (true, true) => "healthy",
            (true, false) => "unhealthy",
            _ => "disconnected",
        };
        let facts = m
            .facts
            .map(|f| format!("{} {} cpus {} MiB", f.os, f.cpus, f.memory_bytes >> 20))
            .unwrap_or_default();
        let rpo = m
            .stats
            .iter()
            .map(|s| s.last_tag_time_ms)
            .min()
            .filter(|t| *t > 0)
            .map(|t| format!("RPO {}s", now.saturating_sub(t) / 1000))
            .unwrap_or_else(|| "no tag yet".into());
        println!(
            "{:<24} {state:<12} {} disk(s)  {rpo}  {facts}",
            m.vm,
            m.disks.len()
        );
    }
    match r.processing {
        None => println!("processing: off (the coordinator has no target store)"),
        Some(p) => {
            let ago = |t: u64| format!("{}s ago", now.saturating_sub(t) / 1000);
            let latest = if p.latest_processed_point.is_empty() {
                "none yet".to_string()
            } else {
                format!(
                    "{} ({}, {})",
                    p.latest_processed_point,
                    fmt_time(p.latest_processed_time_ms),
                    ago(p.latest_processed_time_ms)
                )
            };
            let pass = match p.last_pass_ms {
                0 => "no pass yet".to_string(),
                t => format!("last pass {}", ago(t)),
            };
            println!("latest processed point: {latest}; {pass}");
            if !p.last_error.is_empty() {
                println!("processing failing: {}", p.last_error);
            }
        }
    }
    Ok(())
}

pub async fn remove(a: RemoveArgs) -> Result<()> {
    let RemoveArgs { coordinator, vm } = a;
    let mut client = admin(&coordinator).await?;
    client
        .remove_member(pb::RemoveMemberRequest { vm: vm.to_string() })
        .await
        .map_err(status_error)?;
    println!("removed {vm} from the group");
    Ok(())
}
