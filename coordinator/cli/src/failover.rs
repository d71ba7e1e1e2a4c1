//! `lifeboat failover` and `lifeboat test-failover`: restore a recovery point's VMs from the
//! target store, verified, with a report — a real failover (then `commit`) or a DR drill (then
//! `cleanup`).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;
use lifeboat_dr::failover::{self, Selector};
use lifeboat_store::backend::OpenMode;
use lifeboat_store::{GroupId, VmId};

use crate::common::{describe, open, processor, usage};
use crate::{StoreArgs, UsageError};

/// Where a failover reads from and writes to.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FailoverArgs {
    /// The target store (directory or `.toml`); nothing else is needed.
    #[arg(long)]
    store: Option<PathBuf>,
    #[arg(long)]
    group: Option<GroupId>,
    /// One VM; without it the whole group fails over together to a point covering all its VMs.
    #[arg(long)]
    vm: Option<VmId>,
    /// latest | latest-processed | latest-app-consistent | latest-multi-vm |
    /// latest-multi-vm-app-consistent | a point id | a time (RFC 3339, single VM).
    #[arg(long)]
    point: Option<String>,
    /// Output location: must not exist or be empty. Gets <vm>/<disk>.img or <vm>/<disk>/ and
    /// failover-report.json.
    #[arg(long)]
    to: Option<PathBuf>,
    /// The cache store, if still reachable: `--point latest` processes its pending points first.
    #[arg(long)]
    cache: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum FailoverAction {
    /// Confirm a real failover: its location is now where the VMs run.
    Commit {
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DrillAction {
    /// Remove a DR drill's output.
    Cleanup {
        #[arg(long)]
        to: PathBuf,
    },
}

/// `failover commit`: the failover's location is now where the VMs run.
pub fn commit(to: PathBuf) -> Result<()> {
    let r = failover::commit(&to).map_err(usage)?;
    println!(
        "committed failover to point {} of group {} in {}",
        r.point,
        r.group,
        to.display()
    );
    Ok(())
}

/// `test-failover cleanup`: removes a drill's output.
pub fn cleanup(to: PathBuf) -> Result<()> {
    failover::cleanup_drill(&to).map_err(usage)?;
    println!("removed the DR drill in {}", to.display());
    Ok(())
}

pub async fn run(a: FailoverArgs, drill: bool) -> Result<()> {
    let need = |what: &str| UsageError(format!("--{what} is required"));
    let store = a.store.ok_or_else(|| need("store"))?;
    let group = a.group.ok_or_else(|| need("group"))?;
    let point = a.point.ok_or_else(|| need("point"))?;
    let to = a.to.ok_or_else(|| need("to"))?;
    let selector: Selector = point
        .parse()
        .map_err(|e: failover::Refused| UsageError(e.0))?;
    // Refuse an occupied output before doing anything (processing included).
    failover::check_output(&to).map_err(|e| UsageError(e.0))?;
    let target = StoreArgs {
        store,
        group: group.clone(),
    };
    if selector == Selector::Latest {
        match &a.cache {
            Some(cache) => {
                let pass = processor(cache, &target, OpenMode::ReadWrite)
                    .await?
                    .pass()
                    .await?;
                println!(
                    "processed {} pending point(s) from the cache store first",
                    pass.points.len()
                );
                // Failing over goes on with what is in the target; what could not move is said.
                for (id, why) in &pass.quarantined {
                    eprintln!("quarantined point {id} (not processed): {why}");
                }
            }
            None => println!("no --cache given: `latest` is the latest processed point"),
        }
    }
    let reader = open(&target, OpenMode::ReadOnly).await?;
    let scan = reader.scan_points().await?;
    // With --vm, a point whose damage is in other VMs' data only still serves this VM.
    let only: Vec<VmId> = a.vm.iter().cloned().collect();
    if let Selector::Id(id) = &selector
        && let Some(d) = scan.damage(id)
        && (only.is_empty() || !d.spares(&only))
    {
        bail!(
            "recovery point {id} is damaged and cannot be restored: {}",
            d.reason
        );
    }
    // Every selector skips damaged points, and says which.
    for d in &scan.damaged {
        if only.is_empty() || !d.spares(&only) {
            eprintln!("skipping damaged point {}: {}", d.id, d.reason);
        }
    }
    let points = if only.is_empty() {
        scan.points
    } else {
        scan.usable_for(&only)
    };
    if points.is_empty() {
        bail!(UsageError(format!(
            "group {group} has no recovery points in the target store"
        )));
    }
    let vms = match a.vm {
        Some(vm) => {
            if !failover::group_vms(&points).contains(&vm) {
                bail!(UsageError(format!("VM {vm} is not in group {group}")));
            }
            vec![vm]
        }
        None => failover::group_vms(&points),
    };
    let chosen = failover::choose(&points, &vms, &selector).map_err(|e| UsageError(e.0))?;
    println!(
        "{} to {}",
        if drill {
            "test failover (DR drill)"
        } else {
            "failing over"
        },
        describe(&chosen)
    );
    let report = failover::restore_point(&reader, &chosen, &vms, &to, drill)
        .await
        .map_err(usage)?;
    for m in &report.members {
        for d in &m.disks {
            println!(
                "  {} / {} -> {}: {} bytes, {} blocks verified",
                m.vm,
                d.disk,
                d.output.display(),
                d.bytes,
                d.blocks_verified
            );
        }
    }
    println!(
        "{}: point {} ({} {}, {}), {} VM(s), {} bytes in {} ms; report in {}",
        report.kind,
        report.point,
        report.point_kind,
        if report.multi_vm {
            "multi-VM"
        } else {
            "single-VM"
        },
        report.point_time,
        report.members.len(),
        report.bytes,
        report.duration_ms,
        to.join(failover::REPORT).display()
    );
    Ok(())
}
