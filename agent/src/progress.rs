//! The agent's live status, `status.json` in the state directory: replication progress (bytes
//! done of total, rate, ETA), churn of the last cycle and the last point. Written by the running
//! agent (best effort, atomically replaced), read by `lifeboat-agent status`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// The whole status file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub updated: u64,
    pub disks: BTreeMap<String, DiskStatus>,
    pub last_point: Option<String>,
    pub last_point_time: Option<u64>,
    pub last_error: Option<String>,
}

static CURRENT: Mutex<Option<Status>> = Mutex::new(None);

/// Set while a filesystem is frozen: `status.json` may live on it, and a write there would
/// block until the thaw (the watchdog's, at the deadline). Updates stay in memory meanwhile;
/// the first one after the thaw writes them all.
static HELD: AtomicBool = AtomicBool::new(false);

/// Holds (`true`) or releases writes of `status.json` (see [`HELD`]).
pub fn hold_writes(on: bool) {
    HELD.store(on, Ordering::SeqCst);
}

/// Applies `f` to the in-memory status and rewrites `status.json` (errors are logged only:
/// status must never stop replication).
pub fn update(state_dir: &Path, f: impl FnOnce(&mut Status)) {
    let mut guard = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let status = guard.get_or_insert_with(|| load(state_dir).unwrap_or_default());
    f(status);
    status.updated = lifeboat_store::manifest::now_millis();
    if HELD.load(Ordering::SeqCst) {
        return;
    }
    let path = state_dir.join("status.json");
    let body = serde_json::to_vec_pretty(status).expect("status serialises");
    if let Err(e) = lifeboat_store::durable::replace(&path, &body) {
        tracing::debug!(error = %e, "cannot write status.json");
    }
}

/// Reads `status.json`, if any.
pub fn load(state_dir: &Path) -> Option<Status> {
    let data = std::fs::read(state_dir.join("status.json")).ok()?;
    serde_json::from_slice(&data).ok()
}
