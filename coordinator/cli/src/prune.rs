//! `lifeboat prune`: retention over the target store, as the coordinator applies it after each
//! processing pass — for when it is gone, or to preview with `--now`.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Result, bail};
use lifeboat_dr::process::Processor;
use lifeboat_store::backend::OpenMode;

use crate::common::{open, print_resyncs, processor};
use crate::{StoreArgs, UsageError};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: StoreArgs,
    /// The group's cache store: where a prune that finds a history it can no longer keep
    /// (damage in the target) asks the disk's agent for a new history. Without it, such a
    /// history is only reported; the next `process` asks.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// How long points are kept, 1h to 72h, counted back from the newest point (or from
    /// now, if earlier): while no new points arrive nothing expires.
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Evaluate as of this time (RFC 3339) instead of now: a time before the newest point
    /// previews what retention will have kept then.
    #[arg(long)]
    now: Option<humantime::Timestamp>,
}

pub async fn run(a: Args) -> Result<()> {
    let Args {
        target,
        cache,
        retention,
        now,
    } = a;
    let range = lifeboat_dr::RETENTION;
    if !range.contains(&retention) {
        bail!(UsageError(format!(
            "--retention {} is out of range (1h to 72h)",
            humantime::format_duration(retention)
        )));
    }
    let now = match now {
        Some(t) => std::time::SystemTime::from(t)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        None => lifeboat_store::manifest::now_millis(),
    };
    // Prune deletes, but never creates the store it prunes.
    let p = match &cache {
        Some(cache) => processor(cache, &target, OpenMode::ReadOnly).await?,
        None => {
            let reader = open(&target, OpenMode::ReadOnly).await?;
            Processor::retention_only(target.group.clone(), reader.backend().clone())
        }
    };
    let r = p.prune(retention, now).await?;
    for d in &r.damaged {
        eprintln!("left in place, unreadable (its data may be pruned): {d}");
    }
    print_resyncs(&r.resyncs);
    println!(
        "kept {} point(s); deleted {} expired point(s), {} tag(s), {} tree(s), {} segment(s), {} base(s); compacted {} disk(s)",
        r.kept,
        r.points.len(),
        r.tags,
        r.trees,
        r.segments,
        r.bases_deleted,
        r.bases
    );
    if r.orphan_parts > 0 {
        println!(
            "removed {} part(s) of unfinished compactions",
            r.orphan_parts
        );
    }
    Ok(())
}
