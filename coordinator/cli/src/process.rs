//! `lifeboat process`: one processing pass from the cache store into the target store, as the
//! coordinator runs it — optionally trimming the cache and scrubbing the target.

use std::path::PathBuf;

use anyhow::{Result, bail};
use lifeboat_store::backend::OpenMode;

use crate::StoreArgs;
use crate::common::{print_pass, processor};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cache store.
    #[arg(long)]
    cache: PathBuf,
    /// Then delete from the cache what the target now holds (as the coordinator does; only
    /// while no coordinator of the group is cutting points).
    #[arg(long)]
    trim_cache: bool,
    /// Then scrub the target store (as the coordinator does every `scrub_interval`): read
    /// every object every point needs, record the points whose data is damaged (listed as
    /// damaged from then on, skipped by selectors) and ask for a new history where a disk's
    /// newest tag reads damaged data. Reads the whole target store.
    #[arg(long)]
    scrub: bool,
    /// The target store.
    #[command(flatten)]
    target: StoreArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let Args {
        cache,
        target,
        trim_cache,
        scrub,
    } = a;
    let p = processor(&cache, &target, OpenMode::ReadWrite).await?;
    let pass = p.pass().await?;
    print_pass(&pass);
    if trim_cache {
        let t = p.trim_cache().await?;
        println!(
            "removed from the cache store: {} point(s), {} tag(s), {} tree(s), {} segment(s), {} bytes",
            t.points, t.tags, t.trees, t.segments, t.bytes
        );
        if t.conflicts > 0 {
            eprintln!(
                "kept {} point(s) and segment(s) in the cache store that the target holds another version of",
                t.conflicts
            );
        }
    }
    let mut damaged = 0;
    if scrub {
        let s = p.scrub().await?;
        println!(
            "scrubbed the target store: {} object(s), {} bytes read, {} damaged point(s), {} damage record(s) cleared",
            s.objects,
            s.bytes,
            s.damaged.len(),
            s.cleared
        );
        for (id, why) in &s.damaged {
            eprintln!("damaged point {id}: {why}");
        }
        for r in &s.resyncs {
            println!(
                "{r}: the history from segment {} reads damaged data",
                r.from
            );
        }
        damaged = s.damaged.len();
    }
    // The rest was processed; the exit status still says something was refused.
    if damaged > 0 {
        bail!("{damaged} point(s) in the target store are damaged; see above");
    }
    if !pass.quarantined.is_empty() {
        bail!(
            "{} point(s) quarantined (not processed); see above",
            pass.quarantined.len()
        );
    }
    Ok(())
}
