//! `lifeboat verify`: checks a store (cache or target) like restic's `check` and names each
//! damaged or missing object with the recovery points it breaks.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use lifeboat_store::GroupId;
use lifeboat_store::backend::OpenMode;
use lifeboat_store::verify::{VerifyOptions, verify};

use crate::UsageError;
use crate::common::store_config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A local store directory, or a TOML file describing the store (`kind = "azure"`, …).
    #[arg(long)]
    store: PathBuf,
    /// Only this replication group (default: every group in the store).
    #[arg(long)]
    group: Option<GroupId>,
    /// Also read every segment and base part whole: object checksum and every block's
    /// blake3 (reads the whole store; without it, segments are checked by footer and index).
    #[arg(long)]
    read_data: bool,
    /// The store is a cache store that processing trims: a tag's segments below the lowest
    /// one the cache still holds of that disk were moved to the target store and are not
    /// reported missing.
    #[arg(long)]
    cache: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let Args {
        store,
        group,
        read_data,
        cache,
    } = a;
    run_verify(&store, group, read_data, cache).await
}

/// `lifeboat verify`: prints every damaged object with the points it breaks, orphans as
/// warnings, and a summary; damage is exit 1, a walk that could not finish exit 2.
async fn run_verify(
    store: &Path,
    group: Option<GroupId>,
    read_data: bool,
    cache: bool,
) -> Result<()> {
    let config = store_config(store, true)?;
    // A store that cannot be opened cannot be verified: that is not damage found. Verifying
    // reads and lists only, so a read-only SAS is enough.
    let backend = config
        .open_as(
            OpenMode::ReadOnly,
            lifeboat_store::backend::retry::RetryPolicy::default(),
        )
        .await
        .map_err(|e| UsageError(format!("cannot open store {}: {e}", store.display())))?;
    let opts = VerifyOptions {
        group: group.clone(),
        read_data,
        trimmed_cache: cache,
    };
    let r = verify(backend, &opts)
        .await
        .map_err(|e| UsageError(format!("could not verify {}: {e}", store.display())))?;
    if r.groups.is_empty() {
        bail!(UsageError(format!(
            "store {} holds no Lifeboat objects (nothing under v1/)",
            store.display()
        )));
    }
    if let Some(g) = &group
        && r.objects_checked == 0
        && r.orphans.is_empty()
    {
        bail!(UsageError(format!(
            "store {} holds nothing of group {g}",
            store.display()
        )));
    }
    for d in &r.damaged {
        println!("damaged  {}: {}", d.object, d.what);
        if d.breaks.is_empty() {
            println!("         breaks no recovery point");
        } else {
            println!("         breaks point(s): {}", d.breaks.join(", "));
        }
        if !d.tags.is_empty() {
            println!(
                "         and tag(s) no point uses yet: {}",
                d.tags.join(", ")
            );
        }
    }
    for o in &r.orphans {
        println!("warning  orphan {}: {}", o.object, o.why);
    }
    if r.trimmed > 0 {
        println!(
            "{} segment reference(s) resolved as trimmed to the target store (--cache)",
            r.trimmed
        );
    }
    let groups: Vec<String> = r.groups.iter().map(|g| g.to_string()).collect();
    println!(
        "verified {} group(s) [{}]: {} object(s) checked, {} bytes read{}, {} damaged, {} of {} point(s) broken, {} orphan(s)",
        r.groups.len(),
        groups.join(", "),
        r.objects_checked,
        r.bytes_read,
        if read_data {
            ""
        } else {
            " (indexes only; --read-data reads every block)"
        },
        r.damaged.len(),
        r.broken_points.len(),
        r.points,
        r.orphans.len()
    );
    if !cache
        && r.damaged
            .iter()
            .any(|d| d.what == "missing" && d.breaks.is_empty() && d.object.contains("/seg/"))
    {
        // A cache store that processing trimmed names, in its newest tags, segments only the
        // target holds now (docs/format.md, write rule 7).
        eprintln!(
            "hint: if {} is a cache store that processing trims, its missing older segments are in the target store: run with --cache",
            store.display()
        );
    }
    if !r.is_clean() {
        bail!(
            "{} damaged object(s); {} recovery point(s) cannot be restored",
            r.damaged.len(),
            r.broken_points.len()
        );
    }
    Ok(())
}
