//! What the commands share: opening stores from `--store`, the processor over a cache and a
//! target, and how points and passes are printed.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use lifeboat_dr::failover;
use lifeboat_dr::process::Processor;
use lifeboat_store::backend::OpenMode;
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::RecoveryPoint;
use lifeboat_store::restore::StoreReader;
use lifeboat_store::{DiskId, StoreConfig};

use crate::{StoreArgs, UsageError};

/// Parses `--store`: a local directory, or a `.toml` store description (validated here).
pub fn store_config(store: &Path, must_exist: bool) -> Result<StoreConfig> {
    if store.extension().is_some_and(|e| e == "toml") {
        let text = std::fs::read_to_string(store)
            .with_context(|| format!("cannot read {}", store.display()))?;
        let config = toml::from_str::<StoreConfig>(&text)
            .map_err(|e| UsageError(format!("{}: {e}", store.display())))?;
        config
            .validate()
            .map_err(|e| UsageError(format!("{}: {e}", store.display())))?;
        Ok(config)
    } else {
        if must_exist && !store.is_dir() {
            return Err(UsageError(format!(
                "store {} is not a directory (or a .toml store description)",
                store.display()
            ))
            .into());
        }
        Ok(StoreConfig::Local {
            path: store.to_owned(),
        })
    }
}

/// Opens a store. Every command but processing opens [`OpenMode::ReadOnly`]: it needs only
/// read and list rights, and never creates a container.
pub async fn open(args: &StoreArgs, mode: OpenMode) -> Result<StoreReader> {
    let config = store_config(&args.store, true)?;
    let backend = config
        .open_as(mode, lifeboat_store::backend::retry::RetryPolicy::default())
        .await?;
    Ok(StoreReader::new(backend, Layout::new(args.group.clone())))
}

pub fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn describe(p: &RecoveryPoint) -> String {
    // Never claim more than the weakest member had (a version-1 "crash" point of disks that
    // were not frozen says not-frozen), in the words of every other command.
    let kind = p.effective_kind().to_string();
    let scope = if p.multi_vm { "multi-VM" } else { "single-VM" };
    let members: Vec<String> = p
        .members
        .iter()
        .map(|m| format!("{} ({})", m.vm, m.consistency))
        .collect();
    let mut line = format!(
        "{}  {}  {kind:<16} {scope:<9}  members: {}",
        p.id,
        fmt_time(p.time),
        members.join(", ")
    );
    if !p.excluded.is_empty() {
        let ex: Vec<String> = p
            .excluded
            .iter()
            .map(|e| format!("{} ({})", e.vm, e.reason))
            .collect();
        line.push_str(&format!("  excluded: {}", ex.join(", ")));
    }
    line
}

/// Turns the library's "refused" errors into usage errors (exit 2).
pub fn usage(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<failover::Refused>() {
        Some(r) => UsageError(r.0.clone()).into(),
        None => e,
    }
}

pub async fn processor(cache: &Path, target: &StoreArgs, mode: OpenMode) -> Result<Processor> {
    // The cache is never created here (an empty new cache has nothing to process); the
    // target is, when missing and the credential may (`mode`).
    let cache_reader = open(
        &StoreArgs {
            store: cache.to_owned(),
            group: target.group.clone(),
        },
        OpenMode::ReadOnly,
    )
    .await?;
    let target_reader = open(target, mode).await?;
    Ok(Processor::new(
        target.group.clone(),
        cache_reader.backend().clone(),
        target_reader.backend().clone(),
    ))
}

pub fn print_resyncs(resyncs: &[lifeboat_dr::process::Resync]) {
    for r in resyncs {
        eprintln!(
            "{r}: the target store cannot complete its history from segment {}",
            r.from
        );
    }
}

pub fn print_pass(pass: &lifeboat_dr::process::Pass) {
    println!(
        "processed {} point(s), {} segment(s), {} bytes in {:.2?}",
        pass.points.len(),
        pass.segments,
        pass.bytes,
        pass.elapsed
    );
    for (id, why) in &pass.quarantined {
        eprintln!("quarantined point {id} (not processed): {why}");
    }
    print_resyncs(&pass.resyncs);
    match &pass.latest_processed {
        Some((id, t)) => println!("latest processed point: {id} ({})", fmt_time(*t)),
        None => println!("latest processed point: none"),
    }
    for (vm, ms) in &pass.rpo_ms {
        println!(
            "RPO {vm}: {}",
            humantime::format_duration(Duration::from_secs(ms / 1000))
        );
    }
}

pub fn disk_output(
    out: &Path,
    disk: &DiskId,
    shape: &lifeboat_store::manifest::DiskShape,
) -> PathBuf {
    match shape {
        lifeboat_store::manifest::DiskShape::Image { .. } => out.join(format!("{disk}.img")),
        lifeboat_store::manifest::DiskShape::Directory { .. } => out.join(disk.as_str()),
    }
}
