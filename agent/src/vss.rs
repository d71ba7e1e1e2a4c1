//! Windows' Volume Shadow Copy Service as a consistency provider: the order of a copy-only
//! backup with writers (gather writers, start a set, add volumes, prepare, snapshot, read,
//! complete, delete), written once over [`ShadowApi`], the small interface the COM calls sit
//! behind (`vss_windows.rs`). The order and the clean-up are platform-free and tested here
//! with a scripted interface; the COM half only compiles and refuses cleanly under wine,
//! which has no shadow copies.
//!
//! What a cut gets: a shadow copy of each volume, made while VSS holds writes (its writers
//! quiesce their applications first — SQL Server, Exchange, the registry…), read at leisure
//! by the capture instead of the live volume. Nothing is ever left half-made: a failure at
//! any step aborts the backup and deletes the set, and so does dropping a [`ShadowSet`] that
//! was not released (a stop, an abandoned cut, a panic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[cfg(windows)]
#[path = "vss_windows.rs"]
mod com;

/// A backup session of this machine's shadow copy service.
pub fn open() -> Result<Box<dyn ShadowApi>> {
    #[cfg(windows)]
    return com::open();
    #[cfg(not(windows))]
    anyhow::bail!(
        "VSS is Windows' Volume Shadow Copy Service; on Linux use consistency = \"fsfreeze\""
    )
}

/// One backup session of the shadow copy service, step by step. Every call blocks (VSS's
/// asynchronous steps are waited for inside, each under a timeout that cancels it) and runs
/// off the async workers.
pub trait ShadowApi: Send {
    /// Copy-only backup state, writers included (no component selection, so every writer
    /// takes part and no application log is truncated), then gathers the writers' metadata.
    fn begin(&mut self) -> Result<()>;
    /// Starts a snapshot set.
    fn start_set(&mut self) -> Result<()>;
    /// Adds a volume (`C:\`) to the set; returns the snapshot's id.
    fn add_volume(&mut self, volume: &Path) -> Result<u128>;
    /// Writers prepare (PrepareForBackup): seconds, before the cut's instant.
    fn prepare(&mut self) -> Result<()>;
    /// The snapshot (DoSnapshotSet): writers freeze, the volumes are flushed and held (VSS
    /// holds writes at most 10 s), the copies made, writers thaw.
    fn snapshot(&mut self) -> Result<()>;
    /// The device a snapshot is read through (`\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy7\`).
    fn device(&mut self, snapshot: u128) -> Result<PathBuf>;
    /// Writers that did not come through the snapshot (any state but stable or waiting for
    /// completion, or a failure code): their names, states and errors.
    fn failed_writers(&mut self) -> Result<Vec<String>>;
    /// Tells writers the backup is done (BackupComplete).
    fn complete(&mut self) -> Result<()>;
    /// Tells writers the backup is abandoned (AbortBackup).
    fn abort(&mut self) -> Result<()>;
    /// Deletes the set's snapshots, if any were made.
    fn delete_set(&mut self) -> Result<()>;
}

/// Backups in this process whose writers are preparing or whose snapshot is being made.
static ALIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether a cut is making shadow copies now (writers preparing, or the snapshot with writes
/// held): a stop lets that step end first, as it does a freeze (`consistency::unless_stopped`).
/// Reading the copies afterwards may take hours; a stop then drops the cut, and the dropped
/// set aborts the backup and deletes the copies (VSS also releases them when the process
/// ends, as backup-context copies are auto-release).
pub fn held() -> bool {
    ALIVE.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// Counts one backup in [`ALIVE`] for as long as it lives.
struct Alive;

impl Alive {
    fn new() -> Alive {
        ALIVE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Alive
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        ALIVE.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A backup whose writers have prepared, the volumes in its set: what a cut readies before
/// its instant. [`Prepared::snapshot`] makes the copies; dropping it aborts.
pub struct Prepared {
    api: Option<Box<dyn ShadowApi>>,
    ids: Vec<(PathBuf, u128)>,
    _alive: Alive,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("ids", &self.ids).finish()
    }
}

/// Shadow copies of some volumes, readable until released. Dropping it unreleased aborts the
/// backup and deletes the copies.
pub struct ShadowSet {
    api: Option<Box<dyn ShadowApi>>,
    devices: BTreeMap<PathBuf, PathBuf>,
    /// Writers that failed: the copies are crash-consistent, not app-consistent.
    pub failed_writers: Vec<String>,
}

impl std::fmt::Debug for ShadowSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowSet")
            .field("devices", &self.devices)
            .field("failed_writers", &self.failed_writers)
            .finish()
    }
}

impl Prepared {
    /// Begins a backup of `volumes` through `api` and has the writers prepare. On any failure
    /// the backup is aborted before the error returns.
    pub fn new(mut api: Box<dyn ShadowApi>, volumes: &[PathBuf]) -> Result<Prepared> {
        let alive = Alive::new();
        let made = (|| -> Result<Vec<(PathBuf, u128)>> {
            api.begin().context("VSS: cannot begin a backup")?;
            api.start_set()
                .context("VSS: cannot start a snapshot set")?;
            let mut ids = Vec::new();
            for v in volumes {
                let id = api
                    .add_volume(v)
                    .with_context(|| format!("VSS: cannot add volume {}", v.display()))?;
                ids.push((v.clone(), id));
            }
            api.prepare()
                .context("VSS: the writers could not prepare")?;
            Ok(ids)
        })();
        match made {
            Ok(ids) => Ok(Prepared {
                api: Some(api),
                ids,
                _alive: alive,
            }),
            Err(e) => {
                abandon(api.as_mut());
                Err(e)
            }
        }
    }

    /// Makes the shadow copies. On any failure the backup is aborted and whatever was made
    /// deleted before the error returns.
    pub fn snapshot(mut self) -> Result<ShadowSet> {
        let mut api = self.api.take().expect("snapshot once");
        let ids = std::mem::take(&mut self.ids);
        let made = (|| -> Result<(BTreeMap<PathBuf, PathBuf>, Vec<String>)> {
            api.snapshot().context("VSS: the snapshot failed")?;
            let mut devices = BTreeMap::new();
            for (v, id) in ids {
                let dev = api.device(id).with_context(|| {
                    format!("VSS: cannot find the shadow copy of {}", v.display())
                })?;
                devices.insert(v, dev);
            }
            let failed = api
                .failed_writers()
                .context("VSS: cannot read the writers' status")?;
            Ok((devices, failed))
        })();
        match made {
            Ok((devices, failed_writers)) => Ok(ShadowSet {
                api: Some(api),
                devices,
                failed_writers,
            }),
            Err(e) => {
                abandon(api.as_mut());
                Err(e)
            }
        }
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(mut api) = self.api.take() {
            abandon(api.as_mut());
        }
        // `_alive` is dropped after this, once the abort is done.
    }
}

impl ShadowSet {
    /// Prepares and snapshots at once.
    #[cfg(test)]
    pub fn create(api: Box<dyn ShadowApi>, volumes: &[PathBuf]) -> Result<ShadowSet> {
        Prepared::new(api, volumes)?.snapshot()
    }

    /// Where `path` (on one of the set's volumes) is read in its shadow copy.
    pub fn shadow_of(&self, path: &Path) -> Result<PathBuf> {
        for (volume, device) in &self.devices {
            if let Ok(rest) = path.strip_prefix(volume) {
                return Ok(if rest.as_os_str().is_empty() {
                    device.clone()
                } else {
                    device.join(rest)
                });
            }
        }
        anyhow::bail!("{} is on none of the shadowed volumes", path.display())
    }

    /// Done reading: writers are told the backup completed (`kept`) or was abandoned, and the
    /// copies are deleted. Errors are the deletion's or the completion's; the copies are
    /// deleted either way.
    pub fn release(mut self, kept: bool) -> Result<()> {
        let mut api = self.api.take().expect("released once");
        let told = if kept { api.complete() } else { api.abort() };
        let deleted = api.delete_set();
        told.context(if kept {
            "VSS: BackupComplete failed"
        } else {
            "VSS: AbortBackup failed"
        })?;
        deleted.context("VSS: cannot delete the shadow copies")
    }
}

impl Drop for ShadowSet {
    fn drop(&mut self) {
        if let Some(mut api) = self.api.take() {
            abandon(api.as_mut());
        }
    }
}

/// Aborts and deletes, logging what fails (nothing more can be done about it here).
fn abandon(api: &mut dyn ShadowApi) {
    if let Err(e) = api.abort() {
        tracing::warn!(error = %format!("{e:#}"), "VSS: AbortBackup failed");
    }
    if let Err(e) = api.delete_set() {
        tracing::warn!(error = %format!("{e:#}"), "VSS: cannot delete the shadow copies; `vssadmin list shadows` shows them");
    }
}

/// The volume a path is on, by its root (`C:\data` → `C:\`); `mount`, when set, names it.
pub fn volume_of(path: &Path, mount: Option<&Path>) -> Result<PathBuf> {
    if let Some(m) = mount {
        return Ok(m.to_path_buf());
    }
    let mut root = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::Prefix(_) | std::path::Component::RootDir => root.push(c),
            _ => break,
        }
    }
    anyhow::ensure!(
        root.has_root(),
        "{}: not an absolute path, so its volume is unknown",
        path.display()
    );
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records the calls, fails the one named, and keeps what a real service would hold.
    #[derive(Default)]
    struct World {
        calls: Vec<String>,
        /// Snapshots that exist now.
        snapshots: Vec<u128>,
        in_backup: bool,
    }

    struct Scripted {
        world: Arc<Mutex<World>>,
        fail: Option<&'static str>,
        writers_failing: Vec<String>,
        next: u128,
        pending: Vec<u128>,
    }

    impl Scripted {
        fn step(&mut self, name: &'static str) -> Result<()> {
            self.world.lock().unwrap().calls.push(name.to_owned());
            if self.fail == Some(name) {
                anyhow::bail!("{name}: 0x80042302");
            }
            Ok(())
        }
    }

    impl ShadowApi for Scripted {
        fn begin(&mut self) -> Result<()> {
            self.step("begin")?;
            self.world.lock().unwrap().in_backup = true;
            Ok(())
        }
        fn start_set(&mut self) -> Result<()> {
            self.step("start_set")
        }
        fn add_volume(&mut self, _volume: &Path) -> Result<u128> {
            self.step("add_volume")?;
            self.next += 1;
            self.pending.push(self.next);
            Ok(self.next)
        }
        fn prepare(&mut self) -> Result<()> {
            self.step("prepare")
        }
        fn snapshot(&mut self) -> Result<()> {
            self.step("snapshot")?;
            let made = std::mem::take(&mut self.pending);
            self.world.lock().unwrap().snapshots.extend(made);
            Ok(())
        }
        fn device(&mut self, snapshot: u128) -> Result<PathBuf> {
            self.step("device")?;
            Ok(PathBuf::from(format!("/shadow{snapshot}")))
        }
        fn failed_writers(&mut self) -> Result<Vec<String>> {
            self.step("failed_writers")?;
            Ok(self.writers_failing.clone())
        }
        fn complete(&mut self) -> Result<()> {
            self.step("complete")?;
            self.world.lock().unwrap().in_backup = false;
            Ok(())
        }
        fn abort(&mut self) -> Result<()> {
            self.world.lock().unwrap().calls.push("abort".into());
            self.world.lock().unwrap().in_backup = false;
            Ok(())
        }
        fn delete_set(&mut self) -> Result<()> {
            self.step("delete_set")?;
            self.world.lock().unwrap().snapshots.clear();
            Ok(())
        }
    }

    fn scripted(fail: Option<&'static str>) -> (Box<Scripted>, Arc<Mutex<World>>) {
        let world = Arc::new(Mutex::new(World::default()));
        let api = Box::new(Scripted {
            world: world.clone(),
            fail,
            writers_failing: vec![],
            next: 0,
            pending: vec![],
        });
        (api, world)
    }

    fn volumes() -> Vec<PathBuf> {
        vec![PathBuf::from("/c"), PathBuf::from("/d")]
    }

    #[test]
    fn a_copy_only_backup_runs_in_order_and_is_deleted_when_released() {
        let (api, world) = scripted(None);
        let set = ShadowSet::create(api, &volumes()).unwrap();
        assert_eq!(world.lock().unwrap().snapshots.len(), 2);
        assert_eq!(
            set.shadow_of(Path::new("/d/data/x.db")).unwrap(),
            PathBuf::from("/shadow2/data/x.db")
        );
        assert_eq!(
            set.shadow_of(Path::new("/c")).unwrap(),
            PathBuf::from("/shadow1")
        );
        assert!(set.shadow_of(Path::new("/e/x")).is_err());
        assert!(set.failed_writers.is_empty());
        set.release(true).unwrap();
        let w = world.lock().unwrap();
        assert_eq!(
            w.calls,
            [
                "begin",
                "start_set",
                "add_volume",
                "add_volume",
                "prepare",
                "snapshot",
                "device",
                "device",
                "failed_writers",
                "complete",
                "delete_set"
            ]
        );
        assert!(w.snapshots.is_empty() && !w.in_backup);
    }

    #[test]
    fn a_failure_at_any_step_aborts_and_leaves_no_snapshot() {
        for step in [
            "begin",
            "start_set",
            "add_volume",
            "prepare",
            "snapshot",
            "device",
            "failed_writers",
        ] {
            let (api, world) = scripted(Some(step));
            let e = ShadowSet::create(api, &volumes()).unwrap_err();
            assert!(format!("{e:#}").contains("0x80042302"), "{step}: {e:#}");
            let w = world.lock().unwrap();
            assert!(w.snapshots.is_empty(), "{step}: left {:?}", w.snapshots);
            assert!(!w.in_backup, "{step}: backup not aborted");
            assert_eq!(
                &w.calls[w.calls.len() - 2..],
                ["abort", "delete_set"],
                "{step}"
            );
        }
    }

    #[test]
    fn a_set_dropped_unreleased_is_aborted_and_deleted() {
        // What an abandoned or stopped cut does: the set goes out of scope mid-capture.
        let (api, world) = scripted(None);
        let set = ShadowSet::create(api, &volumes()).unwrap();
        drop(set);
        let w = world.lock().unwrap();
        assert!(w.snapshots.is_empty() && !w.in_backup);
        assert_eq!(&w.calls[w.calls.len() - 2..], ["abort", "delete_set"]);
        assert!(!w.calls.contains(&"complete".to_owned()));
    }

    #[test]
    fn a_prepared_backup_counts_as_held_and_a_drop_before_the_snapshot_aborts() {
        // Prepared before the cut's instant, then the cut is abandoned (a stop, a refusal).
        let (api, world) = scripted(None);
        let prepared = Prepared::new(api, &volumes()).unwrap();
        assert!(held());
        drop(prepared);
        let w = world.lock().unwrap();
        assert!(w.snapshots.is_empty() && !w.in_backup);
        assert!(!w.calls.contains(&"snapshot".to_owned()));
        assert_eq!(&w.calls[w.calls.len() - 2..], ["abort", "delete_set"]);
    }

    #[test]
    fn an_abandoned_capture_aborts_and_a_failed_completion_still_deletes() {
        let (api, world) = scripted(None);
        ShadowSet::create(api, &volumes())
            .unwrap()
            .release(false)
            .unwrap();
        assert!(world.lock().unwrap().calls.contains(&"abort".to_owned()));

        let (api, world) = scripted(Some("complete"));
        let e = ShadowSet::create(api, &volumes())
            .unwrap()
            .release(true)
            .unwrap_err();
        assert!(format!("{e:#}").contains("BackupComplete"), "{e:#}");
        assert!(world.lock().unwrap().snapshots.is_empty());
    }

    #[test]
    fn failed_writers_are_reported_with_the_set() {
        let (mut api, _world) = scripted(None);
        api.writers_failing = vec!["SqlServerWriter: retryable error".into()];
        let set = ShadowSet::create(api, &volumes()).unwrap();
        assert_eq!(set.failed_writers, ["SqlServerWriter: retryable error"]);
    }

    #[test]
    fn the_volume_of_a_path_is_its_root_unless_named() {
        assert_eq!(
            volume_of(Path::new("/srv/data"), None).unwrap(),
            PathBuf::from("/")
        );
        assert_eq!(
            volume_of(Path::new("/srv/data"), Some(Path::new("/srv"))).unwrap(),
            PathBuf::from("/srv")
        );
        assert!(volume_of(Path::new("data"), None).is_err());
        #[cfg(windows)]
        assert_eq!(
            volume_of(Path::new(r"C:\data\db"), None).unwrap(),
            PathBuf::from(r"C:\")
        );
    }
}
