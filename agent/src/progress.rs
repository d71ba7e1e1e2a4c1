//! The agent's live status: replication progress (bytes done of total, rate, ETA), churn of the
//! last cycle and the last point. One in-memory hub that the session's heartbeats read
//! ([`current`]); a writer thread mirrors it to `status.json` in the state directory (atomically
//! replaced, off the async workers) for `lifeboat-agent status`, run as another process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One disk's live figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskStatus {
    /// What the agent is doing with the disk now: "idle", "shipping", "capturing".
    pub phase: String,
    /// Bytes scanned in the current pass, and the disk's size (0 for directories).
    pub done: u64,
    pub total: u64,
    pub rate_bytes_per_s: f64,
    pub eta_s: Option<u64>,
    /// Changed bytes found by the current pass but not uploaded yet: churn waiting, never
    /// dropped.
    pub backlog_bytes: u64,
    /// Changed bytes of the last completed cycle, and how fast they were shipped.
    pub last_churn_bytes: u64,
    pub last_churn_bytes_per_s: f64,
    pub last_tag: u64,
    pub last_tag_time: u64,
    /// How the last pass found changed blocks, and why ("ebpf: 12 blocks written since the
    /// last pass", "scan: <reason>").
    #[serde(default)]
    pub tracking: String,
}

/// The whole status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub updated: u64,
    pub disks: BTreeMap<String, DiskStatus>,
    pub last_point: Option<String>,
    pub last_point_time: Option<u64>,
    pub last_error: Option<String>,
}

/// The hub: the status, where it is mirrored, and how far the mirror has got.
#[derive(Debug, Default)]
struct Hub {
    status: Option<Status>,
    dir: Option<PathBuf>,
    /// Bumped by every update; `written` is the generation the file last received.
    generation: u64,
    written: u64,
    /// Set while a filesystem is frozen: `status.json` may live on it, and a write there would
    /// block until the thaw (the watchdog's, at the deadline). Updates stay in memory
    /// meanwhile; the writer catches up after the thaw.
    held: bool,
}

static HUB: Mutex<Hub> = Mutex::new(Hub {
    status: None,
    dir: None,
    generation: 0,
    written: 0,
    held: false,
});
/// Signalled on every update and release (for the writer) and every write (for `flush`).
static CHANGED: Condvar = Condvar::new();
static WRITER: OnceLock<()> = OnceLock::new();

fn hub() -> std::sync::MutexGuard<'static, Hub> {
    HUB.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds (`true`) or releases writes of `status.json` (see [`Hub::held`]).
pub fn hold_writes(on: bool) {
    hub().held = on;
    CHANGED.notify_all();
}

/// Whether writes are held: a filesystem is frozen now.
pub fn held() -> bool {
    hub().held
}

/// Applies `f` to the live status. Never blocks on the disk: the writer thread mirrors the
/// result to `status.json` (errors are logged only: status must never stop replication).
pub fn update(state_dir: &Path, f: impl FnOnce(&mut Status)) {
    {
        let mut h = hub();
        if h.status.is_none() {
            // Figures of a previous run (last point, last tag) stay until replaced.
            h.status = Some(load(state_dir).unwrap_or_default());
        }
        let status = h.status.as_mut().expect("set above");
        f(status);
        status.updated = lifeboat_store::manifest::now_millis();
        h.dir = Some(state_dir.to_path_buf());
        h.generation += 1;
    }
    WRITER.get_or_init(|| {
        std::thread::Builder::new()
            .name("status-writer".into())
            .spawn(write_loop)
            .expect("cannot start the status writer thread");
    });
    CHANGED.notify_all();
}

/// The live status, as the last update left it (what heartbeats report).
pub fn current(state_dir: &Path) -> Status {
    let h = hub();
    match &h.status {
        Some(s) => s.clone(),
        None => {
            drop(h);
            load(state_dir).unwrap_or_default()
        }
    }
}

/// Waits (at most `limit`) until `status.json` holds every update made so far: a one-shot
/// command's last figures reach the file before the process exits. Returns whether they did.
pub fn flush(limit: Duration) -> bool {
    let h = hub();
    let target = h.generation;
    let (h, timeout) = CHANGED
        .wait_timeout_while(h, limit, |h| h.written < target)
        .unwrap_or_else(|e| e.into_inner());
    drop(h);
    !timeout.timed_out()
}

fn write_loop() {
    let mut h = hub();
    loop {
        h = CHANGED
            .wait_while(h, |h| h.held || h.written == h.generation)
            .unwrap_or_else(|e| e.into_inner());
        let (Some(status), Some(dir)) = (h.status.clone(), h.dir.clone()) else {
            continue;
        };
        let generation = h.generation;
        drop(h);
        let path = dir.join("status.json");
        let body = serde_json::to_vec_pretty(&status).expect("status serialises");
        if let Err(e) = lifeboat_store::durable::replace(&path, &body) {
            tracing::debug!(error = %e, "cannot write status.json");
        }
        h = hub();
        h.written = h.written.max(generation);
        CHANGED.notify_all();
    }
}

/// Reads `status.json`, if any.
pub fn load(state_dir: &Path) -> Option<Status> {
    let data = std::fs::read(state_dir.join("status.json")).ok()?;
    serde_json::from_slice(&data).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer mirrors the hub to the file, waits while held, and catches up on release.
    #[test]
    fn the_file_follows_the_hub_and_waits_while_held() {
        let dir = tempfile::tempdir().unwrap();
        update(dir.path(), |s| s.last_point = Some("p1".into()));
        assert!(flush(Duration::from_secs(10)));
        assert_eq!(load(dir.path()).unwrap().last_point.as_deref(), Some("p1"));
        hold_writes(true);
        update(dir.path(), |s| s.last_point = Some("p2".into()));
        assert!(!flush(Duration::from_millis(200)), "written while held");
        assert_eq!(load(dir.path()).unwrap().last_point.as_deref(), Some("p1"));
        assert_eq!(current(dir.path()).last_point.as_deref(), Some("p2"));
        hold_writes(false);
        assert!(flush(Duration::from_secs(10)));
        assert_eq!(load(dir.path()).unwrap().last_point.as_deref(), Some("p2"));
    }
}
