//! Filesystem events for directory disks (`notify`: inotify on Linux, ReadDirectoryChangesW on
//! Windows): every path an event names is re-read at the next pass even if its change stamp
//! looks unchanged. Events add to the stamp check, never replace it — their delivery is
//! asynchronous and cannot be ordered against a freeze, so a pass still stats every file. An
//! overflowed queue makes the next pass a full verification sweep, and says so.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::config::{DiskConfig, DiskKind};

#[derive(Debug, Default)]
struct Dirty {
    paths: HashSet<String>,
    overflow: bool,
}

/// What events said about one disk since the last [`Watchers::take`].
#[derive(Debug, Default, Clone)]
pub struct Hints {
    /// Relative paths named by events.
    pub dirty: HashSet<String>,
    /// Every file must be re-read (events were lost, or a verification sweep is due).
    pub reread_all: bool,
}

/// Watchers of every directory disk.
pub struct Watchers {
    _watchers: Vec<RecommendedWatcher>,
    dirty: BTreeMap<String, Arc<Mutex<Dirty>>>,
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers")
            .field("disks", &self.dirty.keys())
            .finish()
    }
}

fn relative(root: &Path, p: &Path) -> Option<String> {
    let rel = p.strip_prefix(root).ok()?;
    let s = rel.to_str()?.replace('\\', "/");
    (!s.is_empty()).then_some(s)
}

impl Watchers {
    /// Starts watching every directory disk, recursively.
    pub fn start(disks: &[DiskConfig]) -> Result<Self> {
        let mut watchers = Vec::new();
        let mut dirty = BTreeMap::new();
        for d in disks.iter().filter(|d| d.kind == DiskKind::Directory) {
            let state = Arc::new(Mutex::new(Dirty::default()));
            let (root, sink, id) = (d.path.clone(), Arc::clone(&state), d.id.clone());
            let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
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
            })
            .context("cannot create a filesystem watcher")?;
            w.watch(&d.path, RecursiveMode::Recursive)
                .with_context(|| format!("cannot watch {}", d.path.display()))?;
            watchers.push(w);
            dirty.insert(d.id.to_string(), state);
        }
        Ok(Self {
            _watchers: watchers,
            dirty,
        })
    }

    /// Takes (and clears) what events said about a disk.
    pub fn take(&self, disk: &str) -> Hints {
        let Some(d) = self.dirty.get(disk) else {
            return Hints::default();
        };
        let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
        let taken = std::mem::take(&mut *d);
        Hints {
            dirty: taken.paths,
            reread_all: taken.overflow,
        }
    }

    /// Gives hints back after a pass that failed, so they count for the next one.
    pub fn put_back(&self, disk: &str, hints: Hints) {
        if let Some(d) = self.dirty.get(disk) {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
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
            },
        );
        let h2 = w.take("d");
        assert!(h2.reread_all && h2.dirty.contains("x"));
        let _ = h;
    }
}
