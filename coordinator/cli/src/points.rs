//! `lifeboat points list`: a group's recovery points, oldest first — with the target store,
//! whether each was processed, is quarantined (and why) or cannot be read.

use std::path::PathBuf;

use anyhow::Result;
use lifeboat_dr::process::Processor;
use lifeboat_store::backend::OpenMode;
use lifeboat_store::manifest::RecoveryPoint;

use crate::StoreArgs;
use crate::common::{describe, open};

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The target store: mark each point processed or not, and list points only it holds.
    #[arg(long)]
    target: Option<PathBuf>,
}

pub async fn list(a: ListArgs) -> Result<()> {
    let ListArgs { store, target } = a;
    let reader = open(&store, OpenMode::ReadOnly).await?;
    let scan = reader.scan_points().await?;
    let mut points = scan.points;
    let mut damaged = scan.damaged;
    let mut quarantined = std::collections::BTreeMap::new();
    let processed: Option<Vec<RecoveryPoint>> = match &target {
        Some(t) => {
            let target = open(
                &StoreArgs {
                    store: t.clone(),
                    group: store.group.clone(),
                },
                OpenMode::ReadOnly,
            )
            .await?;
            quarantined = Processor::new(
                store.group.clone(),
                reader.backend().clone(),
                target.backend().clone(),
            )
            .quarantined()
            .await?;
            let scan = target.scan_points().await?;
            for d in scan.damaged {
                if !damaged.iter().any(|e| e.id == d.id) {
                    damaged.push(d);
                }
            }
            Some(scan.points)
        }
        None => None,
    };
    if let Some(done) = &processed {
        for p in done {
            if !points.iter().any(|q| q.id == p.id) {
                points.push(p.clone());
            }
        }
        points.sort_by_key(|p| (p.time, p.id.to_string()));
    }
    if points.is_empty() && damaged.is_empty() {
        println!("no recovery points in group {}", store.group);
    }
    for p in points {
        match &processed {
            Some(done) => {
                if let Some(why) = quarantined.get(&p.id) {
                    // Not moving, and why: processing refused it (see the format's rule
                    // 8); also when the target holds another point under its id.
                    println!("quarantined  {}  reason: {why}", describe(&p));
                } else if done.iter().any(|q| q.id == p.id) {
                    println!("processed    {}", describe(&p));
                } else {
                    println!("unprocessed  {}", describe(&p));
                }
            }
            None => println!("{}", describe(&p)),
        }
    }
    // Listed, not fatal: one damaged point costs only itself.
    for d in &damaged {
        println!("damaged      {}  cannot be read: {}", d.id, d.reason);
    }
    Ok(())
}
