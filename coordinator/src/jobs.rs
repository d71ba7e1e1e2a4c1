//! Jobs: every long task the coordinator runs — a cut, a processing pass, a cache trim,
//! retention, a scrub — with an id, a state, progress, cancellation and a history that outlives
//! restarts (`jobs.json` in the state directory, written by one task off the async workers).
//!
//! A job's work is a future that may be dropped at any await: that is how it is cancelled,
//! and it costs what a SIGKILL would (every step of the data plane and of the cut protocol is
//! built to be interrupted there; a dropped cut tells its members to abort).

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_store::manifest::now_millis;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Finished jobs kept in the history (the newest).
pub const HISTORY: usize = 500;

/// The history file in the state directory.
pub const FILE: &str = "jobs.json";

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// A crash-consistent group cut.
    CrashSnapshot,
    /// An app-consistent group cut (hooks run).
    AppSnapshot,
    /// Cache → target: copying published points into the DR region.
    Process,
    /// Removing what the target holds from the cache.
    TrimCache,
    /// Retention, compaction and garbage collection in the target.
    Retention,
    /// Reading back every object of the target store.
    Scrub,
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobKind::CrashSnapshot => "crash-snapshot",
            JobKind::AppSnapshot => "app-snapshot",
            JobKind::Process => "process",
            JobKind::TrimCache => "trim-cache",
            JobKind::Retention => "retention",
            JobKind::Scrub => "scrub",
        })
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        })
    }
}

/// One job as admins see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRecord {
    pub id: u64,
    pub kind: JobKind,
    pub state: JobState,
    /// Who asked: `schedule`, `processing`, or an admin certificate's name.
    pub requested_by: String,
    pub started_ms: u64,
    /// 0 while running.
    pub ended_ms: u64,
    /// What it is doing now (running) or did last.
    pub progress: String,
    /// What came of it: a summary, or why it failed or was cancelled.
    pub outcome: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    next_id: u64,
    jobs: Vec<JobRecord>,
}

#[derive(Debug)]
struct Inner {
    next_id: u64,
    running: BTreeMap<u64, (JobRecord, CancellationToken)>,
    history: VecDeque<JobRecord>,
    /// Set once the coordinator stops: no job starts any more.
    closed: bool,
}

/// The registry. Changes are announced on a watch channel (the history writer, later metrics
/// and the dashboard read it).
#[derive(Debug)]
pub struct Jobs {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

/// Why no job was started.
#[derive(Debug, thiserror::Error)]
#[error("the coordinator is stopping; no new job starts")]
pub struct Closed;

/// Why a job was refused cancellation.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("there is no job {0}")]
    NotFound(u64),
    #[error("job {0} already ended ({1})")]
    Ended(u64, JobState),
}

impl Jobs {
    /// The registry with the history of `state_dir` (jobs recorded as running there were cut
    /// short by the coordinator stopping: they are recorded as failed for that reason). The
    /// history is only history: a damaged file is set aside (`jobs.json.damaged`) with a
    /// warning and the coordinator starts with none, rather than not at all.
    #[allow(clippy::disallowed_methods, reason = "called through spawn_blocking")]
    pub fn load(state_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let path = state_dir.join(FILE);
        let file: JobFile = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(f) => f,
                Err(e) => {
                    let aside = state_dir.join(format!("{FILE}.damaged"));
                    tracing::warn!(path = %path.display(), error = %e, aside = %aside.display(), "the job history is damaged; starting without it");
                    std::fs::rename(&path, &aside)
                        .map_err(|e| anyhow::anyhow!("cannot set aside {}: {e}", path.display()))?;
                    JobFile::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => JobFile::default(),
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        let mut history: VecDeque<JobRecord> = file.jobs.into_iter().collect();
        for j in history.iter_mut().filter(|j| j.state == JobState::Running) {
            j.state = JobState::Failed;
            j.ended_ms = j.started_ms.max(j.ended_ms);
            j.outcome = "the coordinator stopped while it ran".into();
        }
        let next_id = file
            .next_id
            .max(history.iter().map(|j| j.id + 1).max().unwrap_or(1));
        Ok(Arc::new(Jobs {
            inner: Mutex::new(Inner {
                next_id,
                running: BTreeMap::new(),
                history,
                closed: false,
            }),
            changed: watch::Sender::new(0),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn announce(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Starts a job: recorded as running until its [`Job`] handle ends it.
    pub fn start(self: &Arc<Self>, kind: JobKind, requested_by: &str) -> Result<Job, Closed> {
        let token = CancellationToken::new();
        let id = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(Closed);
            }
            let id = inner.next_id;
            inner.next_id += 1;
            let record = JobRecord {
                id,
                kind,
                state: JobState::Running,
                requested_by: requested_by.to_string(),
                started_ms: now_millis(),
                ended_ms: 0,
                progress: String::new(),
                outcome: String::new(),
            };
            inner.running.insert(id, (record, token.clone()));
            id
        };
        self.announce();
        Ok(Job {
            id,
            jobs: self.clone(),
            token,
            ended: false,
        })
    }

    /// Running jobs, then the history, newest first.
    pub fn list(&self) -> Vec<JobRecord> {
        let inner = self.lock();
        let mut all: Vec<JobRecord> = inner.running.values().map(|(r, _)| r.clone()).collect();
        all.reverse();
        all.extend(inner.history.iter().rev().cloned());
        all
    }

    /// Asks running job `id` to stop.
    pub fn cancel(&self, id: u64) -> Result<JobRecord, CancelError> {
        let inner = self.lock();
        if let Some((r, token)) = inner.running.get(&id) {
            token.cancel();
            return Ok(r.clone());
        }
        match inner.history.iter().find(|j| j.id == id) {
            Some(j) => Err(CancelError::Ended(id, j.state)),
            None => Err(CancelError::NotFound(id)),
        }
    }

    /// Announces every change (the counter only says that one happened).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Stops new jobs, waits up to `limit` for the running ones to end by themselves, then
    /// cancels the rest and waits (a cancelled job ends at its next await) up to `grace`.
    pub async fn drain(&self, limit: Duration, grace: Duration) {
        self.lock().closed = true;
        if self.idle_within(limit).await {
            return;
        }
        let left: Vec<u64> = {
            let inner = self.lock();
            for (_, token) in inner.running.values() {
                token.cancel();
            }
            inner.running.keys().copied().collect()
        };
        tracing::warn!(jobs = ?left, waited = ?limit, "jobs still running at shutdown: cancelled");
        self.idle_within(grace).await;
    }

    /// Whether no job runs, now or within `limit`.
    async fn idle_within(&self, limit: Duration) -> bool {
        // Subscribed before the count is read: no change slips between the two.
        let mut rx = self.subscribe();
        let idle = async {
            while !self.lock().running.is_empty() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, idle).await.is_ok()
    }

    fn end(&self, id: u64, state: JobState, outcome: String, keep: bool) {
        {
            let mut inner = self.lock();
            let Some((mut record, _)) = inner.running.remove(&id) else {
                return;
            };
            record.state = state;
            record.ended_ms = now_millis();
            record.outcome = outcome;
            if keep {
                inner.history.push_back(record);
                while inner.history.len() > HISTORY {
                    inner.history.pop_front();
                }
            }
        }
        self.announce();
    }

    fn set_progress(&self, id: u64, text: String) {
        if let Some((r, _)) = self.lock().running.get_mut(&id) {
            r.progress = text;
        } else {
            return;
        }
        self.announce();
    }

    fn snapshot(&self) -> JobFile {
        let inner = self.lock();
        let mut jobs: Vec<JobRecord> = inner.history.iter().cloned().collect();
        jobs.extend(inner.running.values().map(|(r, _)| r.clone()));
        JobFile {
            next_id: inner.next_id,
            jobs,
        }
    }

    /// Writes `jobs.json` after every change until the registry is dropped or `stop` fires
    /// (then once more). Writes coalesce: each writes the latest state.
    pub async fn write_history(self: Arc<Self>, state_dir: PathBuf, stop: CancellationToken) {
        let mut rx = self.subscribe();
        let path = state_dir.join(FILE);
        loop {
            let stopping = tokio::select! {
                r = rx.changed() => r.is_err(),
                () = stop.cancelled() => true,
            };
            let body = serde_json::to_vec_pretty(&self.snapshot()).expect("jobs serialise");
            if let Err(e) = lifeboat_store::durable::replace_async(path.clone(), body).await {
                tracing::warn!(error = %e, "cannot write the job history");
            }
            if stopping {
                return;
            }
        }
    }
}

/// A running job. Ending it ([`Job::succeeded`], [`Job::failed`]) records the outcome; dropped
/// without one, it is recorded as cancelled (when asked) or as failed.
#[derive(Debug)]
pub struct Job {
    id: u64,
    jobs: Arc<Jobs>,
    token: CancellationToken,
    ended: bool,
}

/// Whether a finished job stays in the history: a pass that found nothing to do does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Yes,
    No,
}

impl Job {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Says what the job is doing now.
    pub fn progress(&self, text: impl Into<String>) {
        self.jobs.set_progress(self.id, text.into());
    }

    /// Runs `work` unless the job is cancelled first (then `None`, and the job is ended as
    /// cancelled).
    pub async fn run<T>(&mut self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            r = work => Some(r),
            () = self.token.cancelled() => {
                self.end(JobState::Cancelled, "cancelled".into(), Keep::Yes);
                None
            }
        }
    }

    /// The job's cancellation, for work that decides itself where it may stop.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Ends the job as cancelled (work that stopped on its [`Job::token`]).
    pub fn cancelled(mut self) {
        self.end(JobState::Cancelled, "cancelled".into(), Keep::Yes);
    }

    pub fn succeeded(mut self, outcome: impl Into<String>, keep: Keep) {
        self.end(JobState::Succeeded, outcome.into(), keep);
    }

    pub fn failed(mut self, why: impl Into<String>) {
        self.end(JobState::Failed, why.into(), Keep::Yes);
    }

    fn end(&mut self, state: JobState, outcome: String, keep: Keep) {
        if !self.ended {
            self.ended = true;
            self.jobs.end(self.id, state, outcome, keep == Keep::Yes);
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.token.is_cancelled() {
            self.end(JobState::Cancelled, "cancelled".into(), Keep::Yes);
        } else {
            self.end(
                JobState::Failed,
                "ended without an outcome (its task stopped)".into(),
                Keep::Yes,
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "test set-up")]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_end_cancel_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path()).unwrap();
        let stop = CancellationToken::new();
        let writer = tokio::spawn(
            jobs.clone()
                .write_history(dir.path().to_path_buf(), stop.clone()),
        );

        let done = jobs.start(JobKind::Process, "processing").unwrap();
        done.progress("copying point c1");
        assert_eq!(jobs.list()[0].progress, "copying point c1");
        done.succeeded("1 point", Keep::Yes);
        let quiet = jobs.start(JobKind::TrimCache, "processing").unwrap();
        quiet.succeeded("nothing to trim", Keep::No);

        // Cancelled while its work waits: the work is dropped, the job says so.
        let mut cut = jobs.start(JobKind::AppSnapshot, "admin-alice").unwrap();
        let id = cut.id();
        let j = jobs.clone();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            j.cancel(id).unwrap();
        });
        assert!(cut.run(std::future::pending::<()>()).await.is_none());
        cancel.await.unwrap();
        drop(cut);
        assert!(matches!(
            jobs.cancel(id),
            Err(CancelError::Ended(_, JobState::Cancelled))
        ));
        assert!(matches!(jobs.cancel(999), Err(CancelError::NotFound(999))));

        let interrupted = jobs.start(JobKind::Scrub, "processing").unwrap();
        let list = jobs.list();
        assert_eq!(
            list.iter().map(|j| (j.kind, j.state)).collect::<Vec<_>>(),
            [
                (JobKind::Scrub, JobState::Running),
                (JobKind::AppSnapshot, JobState::Cancelled),
                (JobKind::Process, JobState::Succeeded),
            ]
        );
        stop.cancel();
        writer.await.unwrap();
        std::mem::forget(interrupted); // the process "dies" with the scrub running

        // After a restart: the history is back, the interrupted job failed for that reason,
        // and ids go on from where they were.
        let again = Jobs::load(dir.path()).unwrap();
        let list = again.list();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].state, JobState::Failed);
        assert_eq!(list[0].outcome, "the coordinator stopped while it ran");
        let next = again.start(JobKind::Process, "processing").unwrap();
        assert!(next.id() > list.iter().map(|j| j.id).max().unwrap());
    }

    #[test]
    fn a_damaged_history_is_set_aside_and_the_registry_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{\"next_id\": 3, \"jobs\": [tor").unwrap();
        let jobs = Jobs::load(dir.path()).unwrap();
        assert!(jobs.list().is_empty());
        assert!(dir.path().join("jobs.json.damaged").exists());
        assert!(!dir.path().join(FILE).exists());
    }

    #[tokio::test]
    async fn drain_waits_for_running_jobs_then_cancels_and_refuses_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path()).unwrap();
        // One job ends by itself within the limit; the other never would.
        let quick = jobs.start(JobKind::Process, "processing").unwrap();
        let mut stuck = jobs.start(JobKind::Scrub, "processing").unwrap();
        let stuck_task = tokio::spawn(async move {
            let r = stuck.run(std::future::pending::<()>()).await;
            assert!(r.is_none());
        });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            quick.succeeded("done", Keep::Yes);
        });
        jobs.drain(Duration::from_millis(500), Duration::from_secs(5))
            .await;
        stuck_task.await.unwrap();
        let states: Vec<_> = jobs.list().iter().map(|j| (j.kind, j.state)).collect();
        assert_eq!(
            states,
            [
                (JobKind::Scrub, JobState::Cancelled),
                (JobKind::Process, JobState::Succeeded)
            ]
        );
        assert!(jobs.start(JobKind::Process, "processing").is_err());
    }
}
