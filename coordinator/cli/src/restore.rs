//! `lifeboat restore`: one VM's disks at a recovery point, every byte verified; all disks or
//! none (a failure removes what it restored).

use std::path::PathBuf;

use anyhow::Result;
use lifeboat_dr::failover;
use lifeboat_store::backend::OpenMode;
use lifeboat_store::restore::restore_disk;
use lifeboat_store::{PointId, VmId};

use crate::common::{describe, disk_output, open, usage};
use crate::{StoreArgs, UsageError};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// The VM to restore.
    #[arg(long)]
    vm: VmId,
    /// Point id, or `latest`.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Output directory (created; must not exist or be empty). Image disks become
    /// `<disk>.img`, directory disks `<disk>/`.
    #[arg(long)]
    out: PathBuf,
}

pub async fn run(a: Args) -> Result<()> {
    let Args {
        store,
        vm,
        point,
        out,
    } = a;
    let reader = open(&store, OpenMode::ReadOnly).await?;
    let point = if point == "latest" {
        // Damage the scrub found in other VMs' data does not stop this VM's restore.
        reader
            .scan_points()
            .await?
            .usable_for(std::slice::from_ref(&vm))
            .into_iter()
            .rev()
            .find(|p| p.member(&vm).is_some())
            .ok_or_else(|| {
                UsageError(format!(
                    "no recovery point of group {} covers VM {vm}",
                    store.group
                ))
            })?
    } else {
        let id = PointId::new(point).map_err(|e| UsageError(e.to_string()))?;
        reader.point(&id).await?
    };
    let member = point.member(&vm).ok_or_else(|| {
        UsageError(format!(
            "recovery point {} does not cover VM {vm}",
            point.id
        ))
    })?;
    let output = failover::Output::prepare(&out).map_err(usage)?;
    println!("restoring VM {vm} at {}", describe(&point));
    // All disks or none: a failure removes the disks already restored (docs/format.md).
    let restored = async {
        for d in &member.disks {
            let tag = reader.tag(&vm, &d.disk, d.tag).await?;
            let target = disk_output(&out, &d.disk, &tag.shape);
            let report = restore_disk(&reader, &tag, &target).await?;
            println!(
                "  disk {} -> {}: {} bytes, {} blocks verified, {} segments read, {:.2?}",
                d.disk,
                target.display(),
                report.bytes,
                report.blocks,
                report.segments_read,
                report.elapsed
            );
        }
        anyhow::Ok(())
    }
    .await;
    if restored.is_err() {
        output.discard();
    }
    restored
}
