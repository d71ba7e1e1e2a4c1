//! Cutting a recovery point: pre-copy, quiesce, freeze, capture, thaw, tag — alone (a
//! single-VM point the agent publishes) or as one member of a group cut, where a [`Driver`]
//! talking to the coordinator decides when to freeze and whether the capture is kept.
//!
//! 1. reconcile each disk's state with the store;
//! 2. pre-copy: ship every disk's changes while the VM runs (the bulk of the data);
//! 3. app points: run the pre hooks; a failure downgrades the point, never mislabels it;
//! 4. freeze the mounts of `fsfreeze` / `hooks` disks (deadline = the shortest `freeze_timeout`);
//! 5. capture: scan every disk again and keep what changed since step 2 in memory — for block
//!    devices, the blocks the tracker saw written; for directories, the paths events named
//!    (see `dirdelta`), unless something says they may be incomplete;
//! 6. thaw (the watchdog process thaws at the deadline regardless), then the post hooks;
//! 7. upload the captured segments, write tags, save state, publish the point.
//!
//! If the capture misses the deadline or outgrows the memory cap, the cut is abandoned: nothing
//! is tagged or published, and the next cycle starts over from the last durable state.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use lifeboat_store::manifest::{Consistency, PointKind, RecoveryPoint, Tag};

use crate::config::{ConsistencyKind, DiskConfig, DiskKind, Tracking};
use crate::consistency::{self, FreezeWindow, Frozen};
use crate::scan::ScanStats;
use crate::sync::{self, Agent, Shape, ShipMode};
use crate::watch::{Hints, Since, Watchers};

/// How long a frozen capture waits for its event barrier before walking the disk instead.
const BARRIER_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether a directory disk's frozen capture may read only what events named: it is frozen,
/// and tracking is not turned off.
fn captures_from_events(d: &DiskConfig) -> bool {
    d.kind == DiskKind::Directory && d.tracking == Tracking::Auto && d.freezes()
}

/// What a cut did, per disk and overall. `point` is set when the agent published one itself.
#[derive(Debug)]
pub struct CutReport {
    pub point: Option<RecoveryPoint>,
    pub tags: Vec<Tag>,
    pub precopy: Vec<ScanStats>,
    pub capture: Vec<ScanStats>,
    pub freeze: Option<FreezeWindow>,
    pub stored_bytes: u64,
    pub elapsed: Duration,
}

/// The two moments a cut waits for permission. [`Local`] grants both at once; a group member's
/// driver asks the coordinator (see `member.rs`).
pub trait Driver {
    /// Hooks ran (`quiesced` says whether they succeeded) and the pre-copy is shipped. Returns
    /// the freeze deadline and the time the capture may take, or an error to abandon the cut.
    fn prepared(&mut self, quiesced: bool) -> impl Future<Output = Result<Budget>>;
    /// Frozen and captured. `Ok` keeps the capture; an error discards it.
    fn captured(&mut self) -> impl Future<Output = Result<()>>;
    /// Whether pre-copy and an in-memory capture are wanted even without a freeze (a group
    /// member must answer Freeze quickly whatever its provider).
    fn always_collect(&self) -> bool;
}

/// The freeze deadline (the watchdog's) and the time the capture may take.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub freeze: Duration,
    pub capture: Duration,
}

/// A cut the agent runs alone.
#[derive(Debug)]
pub struct Local {
    pub freeze: Duration,
}

impl Driver for Local {
    async fn prepared(&mut self, _quiesced: bool) -> Result<Budget> {
        // Keep a margin for thawing inside the deadline.
        Ok(Budget {
            freeze: self.freeze,
            capture: self.freeze.mul_f64(0.8),
        })
    }
    async fn captured(&mut self) -> Result<()> {
        Ok(())
    }
    fn always_collect(&self) -> bool {
        false
    }
}

/// The shortest `freeze_timeout` of the disks that freeze (2 s when none does).
pub fn local_freeze_deadline(disks: &[DiskConfig]) -> Duration {
    disks
        .iter()
        .filter(|d| !matches!(d.consistency, ConsistencyKind::None | ConsistencyKind::Vss))
        .map(|d| d.freeze_timeout)
        .min()
        .unwrap_or(Duration::from_secs(2))
}

/// The mounts to freeze for the configured disks, deduplicated.
pub fn freeze_mounts(disks: &[DiskConfig]) -> Vec<PathBuf> {
    let mut set = BTreeSet::new();
    for d in disks {
        if d.freezes() {
            let m = d.mount.clone().unwrap_or_else(|| d.path.clone());
            set.insert(m);
        }
    }
    set.into_iter().collect()
}

/// The volumes to shadow (VSS) for the configured disks, deduplicated.
fn shadow_volumes(disks: &[DiskConfig]) -> Result<Vec<PathBuf>> {
    let mut set = BTreeSet::new();
    for d in disks {
        if d.consistency == ConsistencyKind::Vss {
            set.insert(crate::vss::volume_of(&d.path, d.mount.as_deref())?);
        }
    }
    Ok(set.into_iter().collect())
}

/// A value whose drop blocks (a VSS backup's abort and deletion), dropped on a blocking
/// thread rather than on the async worker that drops it (an error, a stop).
#[derive(Debug)]
struct OffWorker<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> OffWorker<T> {
    fn take(&mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T: Send + 'static> Drop for OffWorker<T> {
    fn drop(&mut self) {
        if let Some(v) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || drop(v));
                }
                Err(_) => drop(v),
            }
        }
    }
}

/// A directory's files by inode (from their stamps), to match mappings made through other
/// paths.
fn inodes_of(st: &crate::state::DiskState) -> std::collections::HashMap<u64, String> {
    match &st.content {
        crate::state::Content::Directory { files } => files
            .iter()
            .filter_map(|(k, f)| f.stamp.map(|s| (s.2, k.clone())))
            .collect(),
        crate::state::Content::Image { .. } => Default::default(),
    }
}

/// A frozen directory disk's capture hints: every event since the pre-copy (drained through a
/// barrier) plus the files mapped shared-writable, with the pre-copy's listing to apply them to
/// — or, when either cannot be vouched for, the events alone, and the capture walks every file.
fn from_events(
    w: &Watchers,
    d: &DiskConfig,
    since: Since,
    frozen: &[u64],
    state_dir: &std::path::Path,
) -> Hints {
    let how = match w.drain(d.id.as_str(), frozen, BARRIER_TIMEOUT) {
        Ok(h) if h.reread_all => Err((h, "events were lost".to_owned())),
        Ok(h) => match crate::dirdelta::shared_writable_under(&d.path, &since.inodes) {
            Ok(mut mapped) => {
                mapped.paths.extend(since.mapped_before.iter().cloned());
                Ok((h, mapped))
            }
            Err(e) => Err((h, format!("cannot list shared-writable mappings: {e}"))),
        },
        Err(why) => Err((w.take(d.id.as_str()), why)),
    };
    let (hints, note) = match how {
        Ok((mut h, mapped)) => {
            let mut note = format!(
                "events: {} paths changed since the pre-copy, {} mapped shared-writable",
                h.dirty.len(),
                mapped.paths.len()
            );
            if !mapped.unreadable.is_empty() {
                let who: Vec<String> = mapped
                    .unreadable
                    .iter()
                    .map(|(pid, comm)| format!("{pid} ({comm})"))
                    .collect();
                let who = who.join(", ");
                tracing::warn!(disk = %d.id, processes = %who, "cannot read these processes' memory maps (CAP_SYS_PTRACE?): what they write through shared mappings is not in this point unless an event names the file; the next pre-copy (by mtime) or verification sweep ships it");
                note.push_str(&format!("; maps unreadable: {who}"));
            }
            h.dirty.extend(mapped.paths);
            h.since = Some(since);
            (h, note)
        }
        Err((h, why)) => {
            tracing::info!(disk = %d.id, reason = %why, "frozen capture walks every file");
            (h, format!("walk: {why}"))
        }
    };
    let key = d.id.to_string();
    crate::progress::update(state_dir, |s| {
        s.disks.entry(key).or_default().tracking = note;
    });
    hints
}

/// Environment variable naming a command to run while every disk is frozen, after the capture.
/// It exists for tests: their oracle reads the devices itself (O_DIRECT) at the cut, so a
/// restore can be compared with bytes the agent never touched. The command sees the cut's time
/// (the tag and point time, Unix ms) as `LIFEBOAT_CUT_TIME_MS`; its failure abandons the cut.
/// The watchdog deadline holds as always.
pub const ORACLE_HOOK_ENV: &str = "LIFEBOAT_TEST_WHILE_FROZEN";

async fn run_oracle_hook(frozen_at: SystemTime) -> Result<()> {
    let Some(cmd) = std::env::var_os(ORACLE_HOOK_ENV) else {
        return Ok(());
    };
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .env("LIFEBOAT_CUT_TIME_MS", millis(frozen_at).to_string())
        .stdin(std::process::Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(
        status.success(),
        "{ORACLE_HOOK_ENV} command failed: {status}"
    );
    Ok(())
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Cuts and publishes a single-VM point for every configured disk of this VM. `verify` re-reads
/// every file of directory disks; `watchers` (in `run`) name files to re-read whatever their
/// stamps say.
pub async fn cut(
    agent: &Agent,
    app: bool,
    verify: bool,
    watchers: Option<&Watchers>,
) -> Result<CutReport> {
    let mut local = Local {
        freeze: local_freeze_deadline(&agent.config.disks),
    };
    let mut r = cut_with(agent, app, verify, watchers, &mut local).await?;
    // The point promises what its weakest disk does, in the same words.
    let weakest = r
        .tags
        .iter()
        .map(|t| t.consistency)
        .min()
        .unwrap_or(Consistency::NotFrozen);
    let kind = PointKind::of(weakest);
    r.point = Some(agent.publish_local_point(&r.tags, kind).await?);
    Ok(r)
}

/// Cuts every disk of this VM under `driver` and writes the tags; publishes nothing.
pub async fn cut_with(
    agent: &Agent,
    app: bool,
    verify: bool,
    watchers: Option<&Watchers>,
    driver: &mut impl Driver,
) -> Result<CutReport> {
    // A one-off cut (`sync`) watches its frozen directory disks from here on, so the capture
    // can read only what changed since the pre-copy.
    let local = match watchers {
        Some(_) => None,
        None => {
            let disks: Vec<DiskConfig> = agent
                .config
                .disks
                .iter()
                .filter(|d| captures_from_events(d))
                .cloned()
                .collect();
            if disks.is_empty() {
                None
            } else {
                match Watchers::start(&disks) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::info!(error = %format!("{e:#}"), "cannot watch directory disks for changes; their frozen capture walks every file");
                        None
                    }
                }
            }
        }
    };
    let watchers = watchers.or(local.as_ref());
    let taken: Vec<Hints> = agent
        .config
        .disks
        .iter()
        .map(|d| {
            let mut h = watchers.map(|w| w.take(d.id.as_str())).unwrap_or_default();
            h.reread_all |= verify;
            h
        })
        .collect();
    let mut spent = Vec::new();
    let result = cut_inner(agent, app, &taken, watchers, driver, &mut spent).await;
    if result.is_err()
        && let Some(w) = watchers
    {
        // What the pre-copy and the capture took counts for the next cut.
        for (d, h) in agent.config.disks.iter().zip(taken) {
            w.put_back(d.id.as_str(), h);
        }
        for (d, h) in spent {
            w.put_back(&d, h);
        }
    }
    result
}

async fn cut_inner(
    agent: &Agent,
    app: bool,
    hints: &[Hints],
    watchers: Option<&Watchers>,
    driver: &mut impl Driver,
    spent: &mut Vec<(String, Hints)>,
) -> Result<CutReport> {
    let started = Instant::now();
    let disks = &agent.config.disks;
    let mut states = Vec::new();
    // Every disk is reconciled even when one cannot go on, so that all that wait for
    // processing's offer ask for it in the same cut.
    let mut failed: Vec<anyhow::Error> = Vec::new();
    for (d, h) in disks.iter().zip(hints) {
        sync::check_disk_path(d)?;
        // Never label a point crash-consistent over a freeze of the wrong filesystem.
        consistency::verify_freeze_target(d)?;
        match agent.reconcile(d, h.reread_all).await {
            Ok(st) => states.push(st),
            Err(e) => failed.push(e),
        }
    }
    match failed.len() {
        0 => {}
        1 => return Err(failed.remove(0)),
        _ => bail!(
            "{}",
            failed
                .iter()
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }

    // 2. Pre-copy, when a freeze follows: it keeps the frozen capture short. Without a freeze
    // the capture pass alone ships everything.
    let mounts = freeze_mounts(disks);
    // Shadowed volumes (VSS) need no pre-copy: the capture reads a shadow copy, which holds
    // nothing up however long it takes (a group member's capture still answers deadlines).
    let volumes = shadow_volumes(disks)?;
    let collect = !mounts.is_empty() || driver.always_collect();
    let mut precopy = Vec::new();
    let mut precopy_shapes = Vec::new();
    let mut since: Vec<Option<Since>> = Vec::new();
    let mut stored = 0;
    if !mounts.is_empty() {
        // Dirty pages reach the device (and the change tracking) only when written back: flush
        // them now, so the pre-copy ships them instead of leaving them for the frozen capture.
        // The flush just before the freeze then finds only what was written during the
        // pre-copy.
        let m = mounts.clone();
        tokio::task::spawn_blocking(move || consistency::presync(&m)).await?;
    }
    for ((d, st), h) in disks.iter().zip(states.iter_mut()).zip(hints) {
        if !collect {
            precopy.push(ScanStats::default());
            continue;
        }
        // Files mapped shared-writable as the pre-copy begins: pages dirtied through such a
        // mapping never move the file's mtime, so the capture re-reads them even if the
        // mapping is gone by the freeze.
        let events = captures_from_events(d) && !h.reread_all;
        let mapped_before = if events {
            let inodes = inodes_of(st);
            tokio::task::block_in_place(|| {
                crate::dirdelta::shared_writable_under(&d.path, &inodes)
            })
            .map(|m| m.paths)
            .map_err(|e| tracing::info!(disk = %d.id, error = %e, "cannot list shared-writable mappings; the frozen capture walks every file"))
            .ok()
        } else {
            None
        };
        let shipped = agent.ship(d, st, ShipMode::Upload, h.clone()).await?;
        stored += shipped.stored_bytes;
        precopy.push(shipped.stats);
        // Copied now, not while frozen: what a capture from events applies its changes to.
        since.push(match (&shipped.shape, mapped_before) {
            (Shape::Tree(tree), Some(mapped_before)) => Some(Since {
                tree: tree.clone(),
                linked: shipped.linked,
                mapped_before,
                inodes: inodes_of(st),
            }),
            _ => None,
        });
        precopy_shapes.push(shipped.shape);
    }
    // What was shipped so far, should the frozen capture fail.
    let after_precopy = states.clone();

    // 3. Quiesce applications.
    let mut quiesced = app;
    let hooks: Vec<_> = disks.iter().filter_map(|d| d.hooks.clone()).collect();
    let mut ran_pre = Vec::new();
    if app {
        // VSS writers quiesce their applications themselves, in the snapshot.
        if hooks.is_empty() && volumes.is_empty() {
            tracing::warn!(
                "app-consistent point requested but no disk has hooks; cutting a crash-consistent point"
            );
            quiesced = false;
        }
        'pre: for h in &hooks {
            for cmd in &h.pre {
                let hook = h.clone();
                let cmd = cmd.clone();
                let r = tokio::task::spawn_blocking(move || {
                    consistency::run_hook("pre", &cmd, hook.timeout)
                })
                .await?;
                if let Err(e) = r {
                    tracing::warn!(error = %format!("{e:#}"), "pre hook failed; this point will be crash-consistent, not app-consistent");
                    quiesced = false;
                    break 'pre;
                }
            }
            ran_pre.push(h.clone());
        }
    }

    // 4–6. Freeze, capture, (permission), thaw.
    let cap = agent.config.replication.memory_cap.0;
    let capture = async {
        // Ready the freeze before saying so: dirty data written back, watchdog started.
        let watchdog = if mounts.is_empty() {
            None
        } else {
            let m = mounts.clone();
            tokio::task::spawn_blocking(move || consistency::presync(&m)).await?;
            // Off the async workers: the guard's handshake may wait seconds for systemd.
            let (m, guard) = (mounts.clone(), agent.config.thaw_guard.clone());
            Some(
                tokio::task::spawn_blocking(move || consistency::Watchdog::spawn(&m, &guard))
                    .await??,
            )
        };
        // Devices about to be frozen: no event barrier may be made on them.
        let frozen_devs: Vec<u64> = mounts
            .iter()
            .filter_map(|m| crate::watch::device(m))
            .collect();
        // VSS writers prepare now (seconds), before the cut's instant; only the snapshot
        // itself follows the freeze.
        let mut prepared = OffWorker(if volumes.is_empty() {
            None
        } else {
            let v = volumes.clone();
            Some(
                tokio::task::spawn_blocking(move || {
                    crate::vss::Prepared::new(crate::vss::open()?, &v)
                })
                .await??,
            )
        });
        let budget = driver.prepared(quiesced).await?;
        let frozen = match watchdog {
            Some(w) => Some(Frozen::freeze(
                w,
                budget.freeze,
                agent.config.replication.expedite_freeze,
            )?),
            None => None,
        };
        // The cut's instant: for shadow copies, before the snapshot (every write acknowledged
        // before it is in the copies). The capture's time counts from here, the snapshot's
        // included, as the coordinator's deadline does.
        let cut_time = SystemTime::now();
        let stop = Instant::now() + budget.capture;
        // Shadow copies (VSS): made now, while writers quiesce and VSS holds the volumes;
        // the capture then reads them, not the live volumes.
        let mut shadows = OffWorker(match prepared.take() {
            None => None,
            Some(p) => {
                let set = tokio::task::spawn_blocking(move || p.snapshot()).await??;
                if !set.failed_writers.is_empty() {
                    tracing::warn!(writers = %set.failed_writers.join("; "), "VSS writers failed: the shadow copies are crash-consistent, not app-consistent");
                }
                Some(set)
            }
        });
        let writers_ok = shadows.0.as_ref().is_some_and(|s| s.failed_writers.is_empty());
        let mut captured = Vec::new();
        let mut since = since;
        since.resize(disks.len(), None);
        for (((d, st), h), since) in disks.iter().zip(states.iter_mut()).zip(hints).zip(since) {
            let mode = if collect {
                ShipMode::Collect {
                    cap,
                    deadline: stop,
                }
            } else {
                ShipMode::Upload
            };
            // Without a pre-copy this is the only pass and takes the hints; after one, the
            // pre-copy took them, and the capture takes what events said since.
            let pass_hints = match (collect, watchers) {
                (false, _) => h.clone(),
                (true, Some(w)) => match since {
                    Some(since) if frozen.is_some() => {
                        from_events(w, d, since, &frozen_devs, &agent.config.state_dir)
                    }
                    _ => w.take(d.id.as_str()),
                },
                (true, None) => Hints::default(),
            };
            spent.push((
                d.id.to_string(),
                Hints {
                    dirty: pass_hints.dirty.clone(),
                    reread_all: pass_hints.reread_all,
                    since: None,
                },
            ));
            // A shadowed disk is read in its shadow copy.
            let shadowed;
            let read = match &shadows.0 {
                Some(set) if d.consistency == ConsistencyKind::Vss => {
                    shadowed = DiskConfig {
                        path: set.shadow_of(&d.path)?,
                        ..d.clone()
                    };
                    &shadowed
                }
                _ => d,
            };
            captured.push(agent.ship(read, st, mode, pass_hints).await?);
        }
        if let Some(f) = &frozen {
            run_oracle_hook(f.frozen_at()).await?;
        }
        // A group member waits here, frozen, for the coordinator's Commit. The capture was
        // complete before the deadline, so a thaw by the watchdog while waiting does not
        // invalidate it (see the cut protocol in the .proto).
        let capture_took = cut_time.elapsed().unwrap_or_default();
        let in_time = frozen.as_ref().is_none_or(|f| f.within_deadline());
        let permitted = if in_time {
            driver.captured().await
        } else {
            Err(anyhow::anyhow!("the capture overran the freeze deadline"))
        };
        let waited = cut_time
            .elapsed()
            .unwrap_or_default()
            .saturating_sub(capture_took);
        let window = match frozen {
            Some(f) => Some(f.thaw_after_capture(in_time)?),
            None => None,
        };
        tracing::debug!(?capture_took, ?waited, "frozen capture");
        if let Some(set) = shadows.take() {
            // After a Commit the point is the group's: a failure to tell the writers or to
            // delete the copies is logged, never turned into a failed cut.
            let kept = permitted.is_ok();
            match tokio::task::spawn_blocking(move || set.release(kept)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "VSS: releasing the shadow copies failed")
                }
                Err(e) => tracing::warn!(error = %e, "VSS: releasing the shadow copies failed"),
            }
        }
        permitted?;
        anyhow::Ok((cut_time, window, captured, writers_ok))
    }
    .await;

    // Post hooks run whatever happened, for every disk whose pre hooks ran.
    for h in &ran_pre {
        for cmd in &h.post {
            let (cmd, timeout) = (cmd.clone(), h.timeout);
            let r =
                tokio::task::spawn_blocking(move || consistency::run_hook("post", &cmd, timeout))
                    .await?;
            if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), "post hook failed");
            }
        }
    }
    let (cut_time, window, captured, writers_ok) = match capture {
        Ok(c) => c,
        Err(e) => {
            // Keep the pre-copy: tag it as not frozen (no point references it), so the next
            // cycle starts from here instead of shipping it all again.
            if !precopy_shapes.is_empty() {
                let now = lifeboat_store::manifest::now_millis();
                for ((d, mut st), shape) in disks.iter().zip(after_precopy).zip(precopy_shapes) {
                    if let Err(err) = agent
                        .write_tag(d, &mut st, shape, now, Consistency::NotFrozen)
                        .await
                    {
                        tracing::warn!(disk = %d.id, error = %format!("{err:#}"), "cannot keep pre-copy progress");
                    }
                }
            }
            return Err(e.context("cut abandoned (pre-copy kept as an unpublished not-frozen tag)"));
        }
    };

    // 7. Upload, tag, publish.
    let mut tags = Vec::new();
    let mut capture_stats = Vec::new();
    for ((d, st), shipped) in disks.iter().zip(states.iter_mut()).zip(captured) {
        stored += shipped.stored_bytes;
        agent.upload_kept(d, st, shipped.kept).await?;
        let frozen = window.is_some() && d.freezes();
        // Applications were quiesced VM-wide by the pre hooks: every disk whose writes were
        // also held (or that has the hooks itself) is app-consistent. A shadow copy is
        // app-consistent when every VSS writer succeeded, crash-consistent otherwise.
        let label = if d.consistency == ConsistencyKind::Vss {
            if writers_ok {
                Consistency::App
            } else {
                Consistency::Crash
            }
        } else if quiesced && (frozen || d.hooks.is_some()) {
            Consistency::App
        } else if frozen {
            Consistency::Crash
        } else {
            Consistency::NotFrozen
        };
        let time = millis(window.map(|w| w.frozen_at).unwrap_or(cut_time));
        let tag = agent.write_tag(d, st, shipped.shape, time, label).await?;
        let churn = shipped.stats.bytes_changed + precopy[tags.len()].bytes_changed;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        crate::progress::update(&agent.config.state_dir, |s| {
            let e = s.disks.entry(d.id.to_string()).or_default();
            e.last_churn_bytes = churn;
            e.last_churn_bytes_per_s = churn as f64 / secs;
            e.last_tag = tag.seq;
            e.last_tag_time = tag.time;
        });
        tags.push(tag);
        capture_stats.push(shipped.stats);
    }
    Ok(CutReport {
        point: None,
        tags,
        precopy,
        capture: capture_stats,
        freeze: window,
        stored_bytes: stored,
        elapsed: started.elapsed(),
    })
}
