//! The coordinator's long-running work, every step of it a job (see `jobs`): the cut
//! scheduler, on-demand cuts, and the processing loop that drives the DR data plane (passes,
//! cache trims, retention, scrubs). Each loop starts nothing once `stop` fires; what runs then
//! is drained by `Jobs::drain`.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_dr::process::Processor;
use lifeboat_proto::model::CutKind;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::group::{CutError, Group, Published};
use crate::hub::Hub;
use crate::jobs::{Closed, JobKind, Jobs, Keep};

/// What a cut job's task returns: `None` when the job was cancelled.
pub type CutTask = JoinHandle<Option<Result<Published, CutError>>>;

/// Starts a cut as a job of its own task (so it outlives whoever asked); returns the job's id
/// and the task.
pub fn start_cut(
    group: &Arc<Group>,
    jobs: &Arc<Jobs>,
    kind: CutKind,
    requested_by: &str,
) -> Result<(u64, CutTask), Closed> {
    let job_kind = match kind {
        CutKind::Crash => JobKind::CrashSnapshot,
        CutKind::App => JobKind::AppSnapshot,
    };
    let job = jobs.start(job_kind, requested_by)?;
    let id = job.id();
    let group = group.clone();
    let task = tokio::spawn(async move {
        job.progress("cutting");
        // The cut decides where it may stop (before Commit), not the job.
        let r = match group.cut(kind, &job.token()).await {
            Err(CutError::Cancelled) => None,
            r => Some(r),
        };
        match &r {
            Some(Ok(p)) => {
                let excluded = if p.point.excluded.is_empty() {
                    String::new()
                } else {
                    format!(", {} excluded", p.point.excluded.len())
                };
                job.succeeded(
                    format!(
                        "point {} ({}), {} covered{excluded}",
                        p.point.id,
                        p.consistency,
                        p.point.members.len()
                    ),
                    Keep::Yes,
                );
            }
            Some(Err(e)) => job.failed(e.to_string()),
            None => job.cancelled(),
        }
        r
    });
    Ok((id, task))
}

/// Cuts points on the policy's schedule until `stop`. An app point due at the same time as a
/// crash point replaces it (an app point is also crash-consistent).
pub async fn schedule(group: Arc<Group>, jobs: Arc<Jobs>, stop: CancellationToken) {
    let policy = group.config.policy.clone();
    let mut next_crash = tokio::time::Instant::now() + policy.crash_interval;
    let mut next_app = policy.app_interval.map(|i| tokio::time::Instant::now() + i);
    loop {
        let due = match next_app {
            Some(a) if a <= next_crash => a,
            _ => next_crash,
        };
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = stop.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        let kind = if next_app.is_some_and(|a| a <= now) {
            next_app = policy.app_interval.map(|i| now + i);
            CutKind::App
        } else {
            CutKind::Crash
        };
        next_crash = now + policy.crash_interval;
        let Ok((_, task)) = start_cut(&group, &jobs, kind, "schedule") else {
            return;
        };
        match task.await {
            Ok(Some(Err(e))) => tracing::warn!(?kind, error = %e, "scheduled cut failed"),
            Ok(_) => {}
            Err(e) => tracing::error!(?kind, error = %e, "the scheduled cut's task failed"),
        }
    }
}

/// How the processing loop runs.
#[derive(Debug, Clone)]
pub struct ProcessingPlan {
    pub interval: Duration,
    /// Zero: never.
    pub scrub_interval: Duration,
    /// Where the end of the last scrub is recorded (Unix ms), so restarts neither skip nor
    /// repeat one.
    pub scrub_mark: PathBuf,
    pub retention: Duration,
}

/// How soon a failed scrub is tried again.
const SCRUB_RETRY: Duration = Duration::from_secs(3600);

/// One step of the loop as a job: `None` when it was cancelled or no job may start (the
/// coordinator is stopping).
async fn step<T>(
    jobs: &Arc<Jobs>,
    kind: JobKind,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
    summary: impl FnOnce(&T) -> (String, Keep),
) -> Option<anyhow::Result<T>> {
    let mut job = jobs.start(kind, "processing").ok()?;
    let r = job.run(work).await?;
    match &r {
        Ok(v) => {
            let (text, keep) = summary(v);
            job.succeeded(text, keep);
        }
        Err(e) => job.failed(format!("{e:#}")),
    }
    Some(r)
}

fn keep_if(done: bool) -> Keep {
    if done { Keep::Yes } else { Keep::No }
}

/// Processing, every `plan.interval` until `stop`: a pass (cache → target), a cache trim
/// (under the group's cut lock), retention (never beside a scrub, which would read what it
/// deletes as missing) and, when due, a scrub in a task of its own. Their figures go to the
/// hub.
pub async fn process_loop(
    p: Processor,
    group: Arc<Group>,
    jobs: Arc<Jobs>,
    hub: Arc<Hub>,
    plan: ProcessingPlan,
    stop: CancellationToken,
) {
    let mut scrubs = Scrubs::new(&plan).await;
    while !stop.is_cancelled() {
        // A pass that did not run (cancelled) leaves the figures of the last one standing.
        let (ran, mut error) = match pass(&p, &jobs, &hub).await {
            Some(error) => (true, error),
            None => (false, None),
        };
        if stop.is_cancelled() {
            break;
        }
        error = error.or(trim(&p, &jobs, &group).await);
        if stop.is_cancelled() {
            break;
        }
        // Retention waits for a running scrub; a retention run cancelled mid-way may still
        // have deletes in flight on the blocking pool, so no scrub starts beside them.
        let retention_interrupted = match scrubs.lock.clone().try_lock_owned() {
            Ok(_no_scrub) => match retention(&p, &jobs, plan.retention).await {
                Some(e) => {
                    error = error.or(e);
                    false
                }
                None => true,
            },
            Err(_) => {
                tracing::debug!("a scrub is running; retention waits for it");
                false
            }
        };
        if !retention_interrupted && !stop.is_cancelled() {
            scrubs.start_if_due(&p, &jobs).await;
        }
        scrubs.reschedule();
        error = error.or(scrubs.finding());
        hub.update_processing(|s| {
            if ran {
                s.last_pass_ms = Some(lifeboat_store::manifest::now_millis());
                s.last_error = error;
            } else if error.is_some() {
                s.last_error = error;
            }
        });
        tokio::select! {
            () = tokio::time::sleep(plan.interval) => {}
            () = stop.cancelled() => break,
        }
    }
    // A scrub in progress is a job: the coordinator's drain waits for it or cancels it.
    scrubs.finish().await;
}

/// One pass as a job: `None` when it did not run, else the error to show, if any.
async fn pass(p: &Processor, jobs: &Arc<Jobs>, hub: &Hub) -> Option<Option<String>> {
    let pass = step(jobs, JobKind::Process, p.pass(), |pass| {
        let text = if pass.quarantined.is_empty() {
            format!("{} point(s), {} bytes", pass.points.len(), pass.bytes)
        } else {
            format!(
                "{} point(s), {} bytes; {} quarantined",
                pass.points.len(),
                pass.bytes,
                pass.quarantined.len()
            )
        };
        (
            text,
            keep_if(!pass.points.is_empty() || !pass.quarantined.is_empty()),
        )
    })
    .await?;
    let pass = match pass {
        Ok(pass) => pass,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "processing failed; retrying next interval");
            return Some(Some(format!("processing: {e:#}")));
        }
    };
    hub.update_processing(|s| s.latest_processed = pass.latest_processed.clone());
    if !pass.points.is_empty() {
        let rpo = pass.rpo_ms.values().max().copied().unwrap_or(0);
        tracing::info!(
            points = pass.points.len(),
            segments = pass.segments,
            bytes = pass.bytes,
            took = ?pass.elapsed,
            latest_processed = ?pass.latest_processed.as_ref().map(|p| p.0.to_string()),
            worst_rpo_s = rpo / 1000,
            "processed points into the target store"
        );
    }
    // Each was logged by the pass; the status shows the first to admins.
    Some(pass.quarantined.first().map(|(id, why)| {
        format!(
            "processing: {} point(s) quarantined, first {id}: {why}",
            pass.quarantined.len()
        )
    }))
}

/// The cache trim as a job, under the group's cut lock (no cut's tags go while its point is
/// being published); the error to show, if any.
async fn trim(p: &Processor, jobs: &Arc<Jobs>, group: &Group) -> Option<String> {
    let trimmed = {
        let _no_cuts = group.pause_cuts().await;
        step(jobs, JobKind::TrimCache, p.trim_cache(), |t| {
            (
                format!(
                    "{} point(s), {} tag(s), {} segment(s), {} bytes",
                    t.points, t.tags, t.segments, t.bytes
                ),
                keep_if(t.segments > 0 || t.points > 0),
            )
        })
        .await
    };
    match trimmed {
        Some(Ok(t)) if t.segments > 0 || t.points > 0 => {
            tracing::info!(
                points = t.points,
                tags = t.tags,
                segments = t.segments,
                bytes = t.bytes,
                "processed data removed from the cache store"
            );
            None
        }
        Some(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), "trimming the cache store failed; retrying next interval");
            Some(format!("trimming the cache: {e:#}"))
        }
        _ => None,
    }
}

/// Retention as a job: `None` when it did not run to its end, else the error to show, if any.
async fn retention(p: &Processor, jobs: &Arc<Jobs>, keep: Duration) -> Option<Option<String>> {
    let now = lifeboat_store::manifest::now_millis();
    let pruned = step(jobs, JobKind::Retention, p.prune(keep, now), |r| {
        (
            format!(
                "{} point(s) expired, {} segment(s) removed, {} kept",
                r.points.len(),
                r.segments,
                r.kept
            ),
            keep_if(!r.points.is_empty() || r.segments > 0 || r.orphan_parts > 0),
        )
    })
    .await?;
    match pruned {
        Ok(r) => {
            // Retention went on around them; they stay for an operator to look at.
            for d in &r.damaged {
                tracing::warn!(error = %d, "unreadable point in the target store left in place");
            }
            if !r.points.is_empty() || r.segments > 0 || r.orphan_parts > 0 {
                tracing::info!(
                    expired = r.points.len(),
                    tags = r.tags,
                    segments = r.segments,
                    orphan_parts = r.orphan_parts,
                    kept = r.kept,
                    "retention applied to the target store"
                );
            }
            Some(None)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "pruning failed; retrying next interval");
            Some(Some(format!("retention: {e:#}")))
        }
    }
}

/// Scrubs of the target store: when the next is due, the one running (in a task of its own,
/// holding `lock` so retention waits), and what the last one found.
struct Scrubs {
    lock: Arc<tokio::sync::Mutex<()>>,
    interval: Duration,
    mark: PathBuf,
    next: Option<tokio::time::Instant>,
    task: Option<JoinHandle<()>>,
    /// Whether the running scrub failed (or was cancelled): sent when it ends.
    ended: Option<tokio::sync::oneshot::Receiver<bool>>,
    /// What the last scrub found damaged, shown with every round's status until the next.
    finding: Arc<std::sync::Mutex<Option<String>>>,
}

impl Scrubs {
    async fn new(plan: &ProcessingPlan) -> Self {
        Scrubs {
            lock: Arc::default(),
            interval: plan.scrub_interval,
            mark: plan.scrub_mark.clone(),
            next: first_scrub(plan).await,
            task: None,
            ended: None,
            finding: Arc::default(),
        }
    }

    fn finding(&self) -> Option<String> {
        self.finding.lock().unwrap().clone()
    }

    /// Starts a scrub when one is due and none runs.
    async fn start_if_due(&mut self, p: &Processor, jobs: &Arc<Jobs>) {
        let due = self.next.is_some_and(|d| tokio::time::Instant::now() >= d);
        if !due || self.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        // Taken before the task starts: no prune slips in between.
        let no_prune = self.lock.clone().lock_owned().await;
        let (p, jobs, finding, mark) = (
            p.clone(),
            jobs.clone(),
            self.finding.clone(),
            self.mark.clone(),
        );
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        self.ended = Some(ended);
        self.next = None;
        self.task = Some(tokio::spawn(async move {
            let _no_prune = no_prune;
            let scrubbed = step(&jobs, JobKind::Scrub, p.scrub(), |s| {
                (
                    format!(
                        "{} object(s), {} bytes read; {} damaged point(s), {} resync(s)",
                        s.objects,
                        s.bytes,
                        s.damaged.len(),
                        s.resyncs.len()
                    ),
                    Keep::Yes,
                )
            })
            .await;
            let failed = match scrubbed {
                Some(Ok(s)) => {
                    tracing::info!(
                        objects = s.objects,
                        bytes = s.bytes,
                        damaged_points = s.damaged.len(),
                        cleared = s.cleared,
                        resyncs = s.resyncs.len(),
                        took = ?s.elapsed,
                        "scrubbed the target store"
                    );
                    *finding.lock().unwrap() = s.damaged.first().map(|(id, why)| {
                        format!(
                            "scrub: {} point(s) damaged, first {id}: {why}",
                            s.damaged.len()
                        )
                    });
                    let now = lifeboat_store::manifest::now_millis();
                    let _ = tokio::task::spawn_blocking(move || write_scrub_mark(&mark, now)).await;
                    false
                }
                Some(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "scrubbing the target store failed; retrying in an hour");
                    *finding.lock().unwrap() = Some(format!("scrub: {e:#}"));
                    true
                }
                // Cancelled: due again after the retry delay.
                None => true,
            };
            let _ = ended_tx.send(failed);
        }));
    }

    /// Once the running scrub ended: the next is due an interval after one that finished, an
    /// hour after one that failed.
    fn reschedule(&mut self) {
        if let Some(rx) = &mut self.ended
            && let Ok(failed) = rx.try_recv()
        {
            self.ended = None;
            let after = if failed {
                SCRUB_RETRY.min(self.interval)
            } else {
                self.interval
            };
            self.next = Some(tokio::time::Instant::now() + after);
        }
    }

    async fn finish(self) {
        if let Some(t) = self.task {
            let _ = t.await;
        }
    }
}

/// When the first scrub is due: one interval after the last one's end as recorded in the state
/// directory; on a first start, one interval from now. `None`: scrubs are off.
async fn first_scrub(plan: &ProcessingPlan) -> Option<tokio::time::Instant> {
    if plan.scrub_interval.is_zero() {
        return None;
    }
    let mark = plan.scrub_mark.clone();
    let last = tokio::task::spawn_blocking(move || read_scrub_mark(&mark))
        .await
        .ok()
        .flatten();
    let now_ms = lifeboat_store::manifest::now_millis();
    let last = match last {
        Some(ms) if ms <= now_ms => ms,
        _ => {
            let mark = plan.scrub_mark.clone();
            let _ = tokio::task::spawn_blocking(move || write_scrub_mark(&mark, now_ms)).await;
            now_ms
        }
    };
    let since = Duration::from_millis(now_ms - last);
    Some(tokio::time::Instant::now() + plan.scrub_interval.saturating_sub(since))
}

/// When the last scrub ended (Unix ms), from the coordinator's state directory.
#[allow(clippy::disallowed_methods, reason = "called through spawn_blocking")]
fn read_scrub_mark(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[allow(clippy::disallowed_methods, reason = "called through spawn_blocking")]
fn write_scrub_mark(path: &std::path::Path, ms: u64) {
    if let Err(e) = lifeboat_store::durable::replace(path, format!("{ms}\n").as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record when the scrub ran");
    }
}
