//! Filesystem events for directory disks (`notify`: inotify on Linux, ReadDirectoryChangesW on
//! Windows): every path an event names is re-read at the next pass even if its change stamp
//! looks unchanged. An unfrozen pass still stats every file (events add to the stamp check). A
//! frozen capture may trust events instead (see `dirdelta`), once [`Watchers::drain`] has
//! passed a barrier: a file created in a directory that is never frozen, whose event is
//! delivered after every event queued before it — so after the freeze, every write before it
//! has been seen. An overflowed queue makes the next pass a full verification sweep, and says so.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lifeboat_store::manifest::Tree;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::config::{DiskConfig, DiskKind};

#[derive(Debug, Default)]
struct Dirty {
    paths: HashSet<String>,
    overflow: bool,
    /// The highest barrier mark this disk's watcher has delivered.
    marks: u64,
}

#[derive(Debug, Default)]
struct Shared {
    dirty: Mutex<Dirty>,
    marked: Condvar,
    /// The watched root's (device, inode, mount id) when the watch began: if it changes (the
    /// directory replaced, a filesystem mounted over it, a remount, which drops every watch
    /// silently), events say nothing about what is there now.
    root: Option<(u64, u64, u64)>,
    path: PathBuf,
}

/// What events said about one disk since the last [`Watchers::take`].
#[derive(Debug, Default, Clone)]
pub struct Hints {
    /// Relative paths named by events.
    pub dirty: HashSet<String>,
    /// Every file must be re-read (events were lost, or a verification sweep is due).
    pub reread_all: bool,
    /// Set when `dirty` is complete since a pre-copy began (drained through a barrier while
    /// frozen): that pre-copy's listing and linked files, which a capture updates instead of
    /// walking the disk.
    pub since: Option<Since>,
}

/// A pre-copy's result, for a capture that applies events to it.
#[derive(Debug, Clone)]
pub struct Since {
    pub tree: Tree,
    /// Files with more than one hard link (stat'ed by the capture: writes through a link
    /// outside the disk raise no event here).
    pub linked: Vec<String>,
    /// Files mapped shared-writable when the pre-copy began (re-read by the capture even if
    /// the mapping is gone by then: pages dirtied through it never moved the file's mtime).
    pub mapped_before: std::collections::BTreeSet<String>,
    /// The pre-copy's files by inode, to find mappings made through other paths.
    pub inodes: std::collections::HashMap<u64, String>,
}

/// A directory no filesystem we freeze holds (tmpfs, normally), where a barrier creates its
/// marks. Removed with the watchers.
struct Barrier {
    dir: tempfile::TempDir,
    dev: u64,
    next: AtomicU64,
}

/// Watchers of every directory disk.
pub struct Watchers {
    disks: BTreeMap<String, Mutex<Watched>>,
    barrier: Option<Barrier>,
}

/// One disk's watch (replaced when its root turns out to be another directory).
struct Watched {
    _watcher: RecommendedWatcher,
    shared: Arc<Shared>,
    config: DiskConfig,
}

#[cfg(unix)]
fn device_of(p: &Path) -> std::io::Result<u64> {
    Ok(std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(p)?))
}

#[cfg(not(unix))]
fn device_of(p: &Path) -> std::io::Result<u64> {
    std::fs::metadata(p).map(|_| 0)
}

/// The device holding `p`, for comparing with the barrier's (a mark made on a frozen
/// filesystem would block until the thaw).
pub fn device(p: &Path) -> Option<u64> {
    device_of(p).ok()
}

impl Barrier {
    fn new() -> Option<Self> {
        let mut places: Vec<PathBuf> = Vec::new();
        // systemd's RuntimeDirectory= (tmpfs under /run), then shared memory, then /tmp.
        if let Some(r) = std::env::var_os("RUNTIME_DIRECTORY") {
            places.extend(std::env::split_paths(&r).take(1));
        }
        places.push("/dev/shm".into());
        places.push(std::env::temp_dir());
        for p in places {
            // Only tmpfs, which cannot be frozen: a mark made there never waits for a thaw.
            if !crate::consistency::on_tmpfs(&p).unwrap_or(false) {
                continue;
            }
            if let Ok(dir) = tempfile::Builder::new()
                .prefix("lifeboat-barrier-")
                .tempdir_in(&p)
                && let Ok(dev) = device_of(dir.path())
            {
                return Some(Self {
                    dir,
                    dev,
                    next: AtomicU64::new(0),
                });
            }
        }
        None
    }
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers")
            .field("disks", &self.disks.keys())
            .finish()
    }
}

fn relative(root: &Path, p: &Path) -> Option<String> {
    let rel = p.strip_prefix(root).ok()?;
    let s = rel.to_str()?;
    // A backslash is a separator on Windows only; on Linux it may be part of a name.
    #[cfg(windows)]
    let s = s.replace('\\', "/");
    (!s.is_empty()).then(|| s.to_owned())
}

/// A recursive watch of one directory disk (and of the barrier directory, `marks`).
fn watch(d: &DiskConfig, marks: Option<&Path>) -> Result<Watched> {
    let state = Arc::new(Shared {
        root: crate::consistency::identity(&d.path).ok(),
        path: d.path.clone(),
        ..Shared::default()
    });
    let (root, sink, id) = (d.path.clone(), Arc::clone(&state), d.id.clone());
    let marks_dir = marks.map(Path::to_path_buf);
    let handler = move |ev: notify::Result<notify::Event>| {
        // A barrier's mark: every event queued before it has now been handled.
        if let (Ok(ev), Some(m)) = (&ev, &marks_dir)
            && let Some(n) = ev
                .paths
                .iter()
                .filter(|p| p.parent() == Some(m.as_path()))
                .filter_map(|p| p.file_name()?.to_str()?.strip_prefix("mark-")?.parse().ok())
                .max()
        {
            let mut s = sink.dirty.lock().unwrap_or_else(|e| e.into_inner());
            s.marks = s.marks.max(n);
            sink.marked.notify_all();
            return;
        }
        // Opening or reading a file changes nothing (the agent's own reads among them).
        if let Ok(ev) = &ev
            && let EventKind::Access(a) = ev.kind
            && a != AccessKind::Close(AccessMode::Write)
        {
            return;
        }
        let mut s = sink.dirty.lock().unwrap_or_else(|e| e.into_inner());
        // The root itself removed or renamed: its watch is gone with it.
        if let Ok(ev) = &ev
            && matches!(
                ev.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
            )
            && ev.paths.iter().any(|p| p == &root)
        {
            if !s.overflow {
                tracing::warn!(disk = %id, "the watched directory itself was removed or renamed; the next pass re-reads every file");
            }
            s.overflow = true;
            return;
        }
        match ev {
            Ok(ev) if ev.need_rescan() => {
                if !s.overflow {
                    tracing::warn!(disk = %id, "filesystem event queue overflowed; the next pass re-reads every file");
                }
                s.overflow = true;
            }
            Ok(ev) => {
                for p in &ev.paths {
                    if let Some(rel) = relative(&root, p) {
                        s.paths.insert(rel);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(disk = %id, error = %e, "filesystem events lost; the next pass re-reads every file");
                s.overflow = true;
            }
        }
    };
    // Symlinks are not followed: a link to a directory inside the disk would share
    // its watch (events then name one of the two paths), and one to a directory
    // outside would report paths that are not on this disk.
    let mut w = RecommendedWatcher::new(
        handler,
        notify::Config::default().with_follow_symlinks(false),
    )
    .context("cannot create a filesystem watcher")?;
    w.watch(&d.path, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", d.path.display()))?;
    if let Some(m) = marks {
        w.watch(m, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", m.display()))?;
    }
    Ok(Watched {
        _watcher: w,
        shared: state,
        config: d.clone(),
    })
}

impl Watchers {
    /// Starts watching every directory disk, recursively.
    pub fn start(disks: &[DiskConfig]) -> Result<Self> {
        let barrier = Barrier::new();
        if barrier.is_none() {
            tracing::info!(
                "no directory for event barriers (RUNTIME_DIRECTORY, /dev/shm, the temporary directory); frozen captures of directory disks walk every file"
            );
        }
        let marks = barrier.as_ref().map(|b| b.dir.path().to_owned());
        let mut watched = BTreeMap::new();
        for d in disks.iter().filter(|d| d.kind == DiskKind::Directory) {
            watched.insert(d.id.to_string(), Mutex::new(watch(d, marks.as_deref())?));
        }
        Ok(Self {
            disks: watched,
            barrier,
        })
    }

    fn shared(&self, disk: &str) -> Option<Arc<Shared>> {
        let w = self.disks.get(disk)?;
        let w = w.lock().unwrap_or_else(|e| e.into_inner());
        Some(Arc::clone(&w.shared))
    }

    /// Watches a disk afresh (its root is another directory than the one watched).
    fn rewatch(&self, disk: &str) {
        let Some(w) = self.disks.get(disk) else {
            return;
        };
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        let marks = self.barrier.as_ref().map(|b| b.dir.path().to_owned());
        match watch(&w.config, marks.as_deref()) {
            Ok(new) => *w = new,
            Err(e) => {
                tracing::warn!(disk, error = %format!("{e:#}"), "cannot watch the directory again")
            }
        }
    }

    /// Takes (and clears) what events said about a disk.
    pub fn take(&self, disk: &str) -> Hints {
        let Some(d) = self.shared(disk) else {
            return Hints::default();
        };
        let mut d = d.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let marks = d.marks;
        let taken = std::mem::replace(
            &mut *d,
            Dirty {
                marks,
                ..Dirty::default()
            },
        );
        Hints {
            dirty: taken.paths,
            reread_all: taken.overflow,
            since: None,
        }
    }

    /// Takes what events said about a disk once every event queued before this call has been
    /// delivered: a mark is created in the barrier directory and its event awaited (events of
    /// one watcher arrive in order). `frozen` are the devices frozen now, where no mark may be
    /// made. An error says why the events cannot be trusted to be complete.
    pub fn drain(
        &self,
        disk: &str,
        frozen: &[u64],
        timeout: Duration,
    ) -> std::result::Result<Hints, String> {
        let b = self
            .barrier
            .as_ref()
            .ok_or("no directory for event barriers")?;
        if frozen.contains(&b.dev) {
            return Err(format!(
                "the event barrier directory {} is on a frozen filesystem",
                b.dir.path().display()
            ));
        }
        let shared = self.shared(disk).ok_or("disk not watched")?;
        match (shared.root, crate::consistency::identity(&shared.path)) {
            (Some(then), Ok(now)) if then == now => {}
            (None, _) | (_, Err(_)) => {
                return Err(
                    "the watched directory's identity (device, inode, mount) is unknown".into(),
                );
            }
            _ => {
                // Its watches went with it: watch what is there now, for the next cut (whose
                // pre-copy walks); this capture walks.
                self.rewatch(disk);
                return Err(format!(
                    "{} was replaced, remounted or mounted over since the watch began (watching it again from now)",
                    shared.path.display()
                ));
            }
        }
        let n = b.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mark = b.dir.path().join(format!("mark-{n}"));
        std::fs::File::create(&mark).map_err(|e| format!("cannot make a barrier mark: {e}"))?;
        let deadline = Instant::now() + timeout;
        let mut d = shared.dirty.lock().unwrap_or_else(|e| e.into_inner());
        while d.marks < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(d);
                let _ = std::fs::remove_file(&mark);
                return Err(format!(
                    "the event barrier did not come back within {timeout:?}"
                ));
            }
            d = shared
                .marked
                .wait_timeout(d, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(d);
        let _ = std::fs::remove_file(&mark);
        Ok(self.take(disk))
    }

    /// Gives hints back after a pass that failed, so they count for the next one.
    pub fn put_back(&self, disk: &str, hints: Hints) {
        if let Some(d) = self.shared(disk) {
            let mut d = d.dirty.lock().unwrap_or_else(|e| e.into_inner());
            d.paths.extend(hints.dirty);
            d.overflow |= hints.reread_all;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    #[cfg_attr(
        windows,
        ignore = "wine delivers no change events to notify's ReadDirectoryChangesW watcher"
    )]
    fn events_name_changed_paths_relative_to_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        let disk: DiskConfig = toml::from_str(&format!(
            "id = \"d\"\nkind = \"directory\"\npath = {:?}\n",
            dir.path().display()
        ))
        .unwrap();
        let w = Watchers::start(std::slice::from_ref(&disk)).unwrap();
        std::fs::write(dir.path().join("sub/new.txt"), b"hello").unwrap();
        let t0 = Instant::now();
        let mut seen = HashSet::new();
        while t0.elapsed() < Duration::from_secs(5) && !seen.contains("sub/new.txt") {
            seen.extend(w.take("d").dirty);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(seen.contains("sub/new.txt"), "{seen:?}");
        let h = w.take("d");
        assert!(!h.reread_all);
        w.put_back(
            "d",
            Hints {
                dirty: ["x".to_owned()].into(),
                reread_all: true,
                since: None,
            },
        );
        let h2 = w.take("d");
        assert!(h2.reread_all && h2.dirty.contains("x"));
        let _ = h;
    }

    /// A drain returns every event of a write made before it, with no wait in between.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_drain_sees_every_write_made_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let disk: DiskConfig = toml::from_str(&format!(
            "id = \"d\"\nkind = \"directory\"\npath = {:?}\n",
            dir.path().display()
        ))
        .unwrap();
        let w = Watchers::start(std::slice::from_ref(&disk)).unwrap();
        for i in 0..300 {
            std::fs::write(dir.path().join(format!("f{}", i % 7)), [i as u8]).unwrap();
            let h = w.drain("d", &[], Duration::from_secs(5)).unwrap();
            assert!(h.dirty.contains(&format!("f{}", i % 7)), "{i}: {h:?}");
            assert!(!h.reread_all);
        }
        // Reads are not changes.
        let _ = std::fs::read(dir.path().join("f1")).unwrap();
        assert!(
            w.drain("d", &[], Duration::from_secs(5))
                .unwrap()
                .dirty
                .is_empty()
        );
        // The directory replaced by another under its name: its watches are gone, so that
        // drain cannot vouch, and the disk is watched afresh for the next one.
        std::fs::rename(dir.path(), dir.path().with_extension("old")).unwrap();
        std::fs::create_dir(dir.path()).unwrap();
        let err = w.drain("d", &[], Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("watching it again"), "{err}");
        std::fs::write(dir.path().join("after"), b"x").unwrap();
        let h = w.drain("d", &[], Duration::from_secs(5)).unwrap();
        assert!(h.dirty.contains("after"), "{h:?}");
        std::fs::remove_dir_all(dir.path().with_extension("old")).unwrap();
        // A barrier on a frozen device is refused, never attempted.
        let dev = device(w.barrier.as_ref().unwrap().dir.path()).unwrap();
        let err = w.drain("d", &[dev], Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("frozen"), "{err}");
    }
}
