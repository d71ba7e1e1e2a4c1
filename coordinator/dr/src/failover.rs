//! Failover and DR drills: choose a recovery point in the target store, restore every covered
//! VM's disks into a new location (each block verified against its blake3), and write a report.
//! Needs nothing but the target store: the source region, its cache store and the coordinator
//! may all be gone.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lifeboat_store::manifest::{DiskShape, PointKind, RecoveryPoint};
use lifeboat_store::restore::{StoreReader, restore_disk};
use lifeboat_store::{PointId, VmId};
use serde::{Deserialize, Serialize};

/// Which point to fail over to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The newest point (after processing what the cache holds, when it is reachable).
    Latest,
    /// The newest point already in the target store.
    LatestProcessed,
    LatestAppConsistent,
    LatestMultiVm,
    LatestMultiVmAppConsistent,
    /// A point id (single VM or group).
    Id(PointId),
    /// The newest point at or before a time (Unix ms); single VM only.
    At(u64),
}

/// An error the user can fix by changing the request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl std::str::FromStr for Selector {
    type Err = Refused;
    fn from_str(s: &str) -> Result<Self, Refused> {
        Ok(match s {
            "latest" => Selector::Latest,
            "latest-processed" => Selector::LatestProcessed,
            "latest-app-consistent" => Selector::LatestAppConsistent,
            "latest-multi-vm" => Selector::LatestMultiVm,
            "latest-multi-vm-app-consistent" => Selector::LatestMultiVmAppConsistent,
            _ => {
                if let Ok(t) = humantime::parse_rfc3339_weak(s) {
                    let ms = t
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_err(|_| Refused(format!("{s}: before 1970")))?
                        .as_millis() as u64;
                    Selector::At(ms)
                } else {
                    Selector::Id(PointId::new(s).map_err(|e| {
                        Refused(format!(
                            "--point {s:?}: not a point id ({e}), a time (RFC 3339) or one of latest, latest-processed, latest-app-consistent, latest-multi-vm, latest-multi-vm-app-consistent"
                        ))
                    })?)
                }
            }
        })
    }
}

fn is_app(p: &RecoveryPoint) -> bool {
    p.effective_kind() == PointKind::App
}

/// Every VM the group's points know of (covered or excluded).
pub fn group_vms(points: &[RecoveryPoint]) -> Vec<VmId> {
    let mut vms: Vec<VmId> = points
        .iter()
        .flat_map(|p| {
            p.members
                .iter()
                .map(|m| m.vm.clone())
                .chain(p.excluded.iter().map(|e| e.vm.clone()))
        })
        .collect();
    vms.sort();
    vms.dedup();
    vms
}

/// Chooses the point: the newest matching `selector` that covers every VM in `vms`.
pub fn choose(
    points: &[RecoveryPoint],
    vms: &[VmId],
    selector: &Selector,
) -> Result<RecoveryPoint, Refused> {
    let covers = |p: &RecoveryPoint| vms.iter().all(|vm| p.member(vm).is_some());
    let mut sorted: Vec<&RecoveryPoint> = points.iter().collect();
    sorted.sort_by_key(|p| (p.time, p.id.to_string()));
    let newest = |f: &dyn Fn(&RecoveryPoint) -> bool, what: &str| {
        sorted
            .iter()
            .rev()
            .find(|p| covers(p) && f(p))
            .map(|p| (*p).clone())
            .ok_or_else(|| Refused(format!("no {what} point covers {}", names(vms))))
    };
    match selector {
        Selector::Latest | Selector::LatestProcessed => newest(&|_| true, "recovery"),
        Selector::LatestAppConsistent => newest(&is_app, "app-consistent"),
        Selector::LatestMultiVm => newest(&|p| p.multi_vm, "multi-VM"),
        Selector::LatestMultiVmAppConsistent => {
            newest(&|p| p.multi_vm && is_app(p), "multi-VM app-consistent")
        }
        Selector::Id(id) => {
            let p = points
                .iter()
                .find(|p| &p.id == id)
                .ok_or_else(|| Refused(format!("no recovery point {id} in the target store")))?;
            if !covers(p) {
                return Err(Refused(format!("point {id} does not cover {}", names(vms))));
            }
            Ok(p.clone())
        }
        Selector::At(ms) => {
            if vms.len() != 1 {
                return Err(Refused(
                    "a point by time is for one VM (--vm); a group fails over to a common point"
                        .into(),
                ));
            }
            let oldest = sorted.iter().find(|p| covers(p));
            match oldest {
                Some(o) if o.time > *ms => Err(Refused(format!(
                    "{} is before the oldest point of {} ({})",
                    fmt_time(*ms),
                    names(vms),
                    fmt_time(o.time)
                ))),
                _ => newest(&|p| p.time <= *ms, "recovery"),
            }
        }
    }
}

fn names(vms: &[VmId]) -> String {
    vms.iter()
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What a failover did, also written as `failover-report.json` in the output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// "failover" or "test-failover".
    pub kind: String,
    pub group: String,
    pub point: String,
    pub point_time: String,
    pub point_kind: String,
    pub multi_vm: bool,
    pub members: Vec<MemberReport>,
    pub bytes: u64,
    pub duration_ms: u64,
    /// Set by `lifeboat failover commit`.
    #[serde(default)]
    pub committed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberReport {
    pub vm: String,
    pub consistency: String,
    pub disks: Vec<DiskReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskReport {
    pub disk: String,
    pub tag: u64,
    pub output: PathBuf,
    pub bytes: u64,
    pub blocks_verified: u64,
}

pub const REPORT: &str = "failover-report.json";
/// Marks a DR drill's output, so `test-failover cleanup` never removes anything else.
pub const DRILL_MARKER: &str = ".lifeboat-test-failover";

/// Checks that `to` does not exist or is an empty directory.
#[allow(
    clippy::disallowed_methods,
    reason = "synchronous: the CLI calls it directly, restore_point through spawn_blocking"
)]
pub fn check_output(to: &Path) -> Result<(), Refused> {
    match std::fs::read_dir(to) {
        Ok(mut e) => {
            if e.next().is_some() {
                return Err(Refused(format!(
                    "{} exists and is not empty; Lifeboat never overwrites",
                    to.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Refused(format!("cannot use {}: {e}", to.display()))),
    }
}

/// An output location being filled by a restore or failover. If the command fails, what it
/// wrote goes — and the location itself only if the command created it: a user's own empty
/// directory (a mount point, say) stays.
#[derive(Debug)]
pub struct Output {
    path: PathBuf,
    created: bool,
}

impl Output {
    /// Checks `to` (absent or empty) and creates it if absent.
    #[allow(
        clippy::disallowed_methods,
        reason = "synchronous: the CLI calls it directly, restore_point through spawn_blocking"
    )]
    pub fn prepare(to: &Path) -> Result<Self> {
        check_output(to)?;
        let created = !to.exists();
        std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
        Ok(Output {
            path: to.to_path_buf(),
            created,
        })
    }

    /// Removes what was written (best effort: the command is failing already).
    #[allow(
        clippy::disallowed_methods,
        reason = "synchronous: the CLI calls it directly, restore_point through spawn_blocking"
    )]
    pub fn discard(self) {
        if self.created {
            let _ = std::fs::remove_dir_all(&self.path);
            return;
        }
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
}

/// Restores `point` for `vms` into `to/<vm>/…`; on failure removes what it wrote.
pub async fn restore_point(
    reader: &StoreReader,
    point: &RecoveryPoint,
    vms: &[VmId],
    to: &Path,
    drill: bool,
) -> Result<Report> {
    let output = {
        let to = to.to_path_buf();
        tokio::task::spawn_blocking(move || Output::prepare(&to)).await??
    };
    let started = Instant::now();
    let result = async {
        if drill {
            tokio::fs::write(to.join(DRILL_MARKER), point.id.as_str()).await?;
        }
        let mut members = Vec::new();
        let mut bytes = 0;
        for vm in vms {
            let m = point.member(vm).expect("chosen to cover");
            let mut disks = Vec::new();
            for d in &m.disks {
                let tag = reader.tag(vm, &d.disk, d.tag).await?;
                let out = match tag.shape {
                    DiskShape::Image { .. } => to.join(vm.as_str()).join(format!("{}.img", d.disk)),
                    DiskShape::Directory { .. } => to.join(vm.as_str()).join(d.disk.as_str()),
                };
                tokio::fs::create_dir_all(to.join(vm.as_str())).await?;
                let r = restore_disk(reader, &tag, &out).await?;
                bytes += r.bytes;
                disks.push(DiskReport {
                    disk: d.disk.to_string(),
                    tag: d.tag,
                    output: out,
                    bytes: r.bytes,
                    blocks_verified: r.blocks,
                });
            }
            members.push(MemberReport {
                vm: vm.to_string(),
                consistency: m.consistency.to_string(),
                disks,
            });
        }
        let report = Report {
            kind: if drill { "test-failover" } else { "failover" }.into(),
            group: point.group.to_string(),
            point: point.id.to_string(),
            point_time: fmt_time(point.time),
            // The words of `lifeboat points list` and of the members' `consistency`.
            point_kind: point.effective_kind().to_string(),
            multi_vm: point.multi_vm,
            members,
            bytes,
            duration_ms: started.elapsed().as_millis() as u64,
            committed: false,
        };
        lifeboat_store::durable::replace_async(
            to.join(REPORT),
            serde_json::to_vec_pretty(&report)?,
        )
        .await?;
        anyhow::Ok(report)
    }
    .await;
    if result.is_err() {
        let _ = tokio::task::spawn_blocking(move || output.discard()).await;
    }
    result
}

/// Removes a DR drill's output; refuses anything that is not one.
#[allow(
    clippy::disallowed_methods,
    reason = "synchronous: the CLI calls it directly, restore_point through spawn_blocking"
)]
pub fn cleanup_drill(to: &Path) -> Result<()> {
    if !to.join(DRILL_MARKER).is_file() {
        bail!(Refused(format!(
            "{} is not a test-failover output (no {DRILL_MARKER}); refusing to remove it",
            to.display()
        )));
    }
    std::fs::remove_dir_all(to).with_context(|| format!("cannot remove {}", to.display()))
}

/// Marks a real failover as committed: its location is now where the VMs live.
#[allow(
    clippy::disallowed_methods,
    reason = "synchronous: the CLI calls it directly, restore_point through spawn_blocking"
)]
pub fn commit(to: &Path) -> Result<Report> {
    if to.join(DRILL_MARKER).exists() {
        bail!(Refused(format!(
            "{} is a DR drill; drills are cleaned up, not committed",
            to.display()
        )));
    }
    let path = to.join(REPORT);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Refused(format!("{} is not a failover output: {e}", to.display())))?;
    let mut report: Report = serde_json::from_str(&text).context("failover report")?;
    if report.committed {
        bail!(Refused(format!(
            "the failover in {} is already committed",
            to.display()
        )));
    }
    report.committed = true;
    lifeboat_store::durable::replace(&path, &serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}
