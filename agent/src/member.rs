//! `run` for a VM in a group: the agent keeps replicating on its own interval (not-frozen tags,
//! no points) and takes part in the coordinator's cuts, which make the group's points.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use lifeboat_proto::model::{
    AgentMessage, CoordinatorMessage, CutAck, CutKind, CutPhase, DiskInfo, DiskKind, DiskPosition,
    Provider, Register, VmFacts,
};
use lifeboat_store::manifest::Consistency;
use tokio::sync::mpsc;

use crate::config::{Config, ConsistencyKind};
use crate::cut::{self, Budget, Driver};
use crate::identity::Identity;
use crate::session::{self, Command};
use crate::sync::Agent;
use crate::watch::Watchers;

/// The registration: who this VM is and what it protects.
pub fn register(config: &Config) -> Register {
    use sysinfo::System;
    let memory = System::new()
        .map(|mut s| {
            s.refresh_memory();
            s.total_memory()
        })
        .unwrap_or(0);
    Register {
        vm: config.vm.clone(),
        facts: VmFacts {
            os: System::long_os_version().unwrap_or_default(),
            kernel: System::kernel_version().unwrap_or_default(),
            hostname: System::host_name().unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: memory,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        },
        disks: config
            .disks
            .iter()
            .map(|d| DiskInfo {
                id: d.id.clone(),
                kind: match d.kind {
                    crate::config::DiskKind::Image => DiskKind::Image,
                    crate::config::DiskKind::BlockDevice => DiskKind::BlockDevice,
                    crate::config::DiskKind::Directory => DiskKind::Directory,
                },
                size_bytes: crate::scan::device_size(&d.path).unwrap_or(0),
                provider: match d.consistency {
                    ConsistencyKind::None => Provider::None,
                    ConsistencyKind::Fsfreeze => Provider::Fsfreeze,
                    ConsistencyKind::Hooks => Provider::Hooks,
                    ConsistencyKind::Vss => Provider::Vss,
                },
            })
            .collect(),
    }
}

/// Drives one cut for the coordinator: acks each phase and waits for the next command.
struct Coordinated<'a> {
    cut_id: u64,
    commands: &'a mut mpsc::Receiver<Command>,
    acks: &'a mpsc::Sender<AgentMessage>,
    /// When the coordinator stops waiting for PREPARED (as far as this agent can tell).
    prepare_until: Instant,
    local_freeze: Duration,
    /// Whether any disk freezes (the freeze deadline matters only then).
    freezes: bool,
    consistency: Consistency,
    /// When the freeze began and how long it may last, once frozen.
    freeze: Option<(Instant, Duration)>,
    point: Option<lifeboat_store::PointId>,
}

impl Coordinated<'_> {
    async fn ack(&self, phase: CutPhase, disks: Vec<DiskPosition>, error: Option<String>) {
        let _ = self
            .acks
            .send(AgentMessage::CutAck(CutAck {
                cut_id: self.cut_id,
                phase,
                disks,
                consistency: self.consistency,
                error,
            }))
            .await;
    }

    /// The next command of this cut before `until`; other cuts' commands are dropped.
    async fn next(&mut self, until: Instant) -> Result<CoordinatorMessage> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.commands.recv()).await {
                Err(_) => bail!("the coordinator's next command did not come in time"),
                Ok(None) => bail!("the session ended"),
                Ok(Some((_, m))) => {
                    let id = match &m {
                        CoordinatorMessage::Prepare { cut_id, .. }
                        | CoordinatorMessage::Freeze { cut_id, .. }
                        | CoordinatorMessage::Commit { cut_id, .. }
                        | CoordinatorMessage::Abort { cut_id, .. } => *cut_id,
                        CoordinatorMessage::Registered { .. } => continue,
                    };
                    if id == self.cut_id {
                        return Ok(m);
                    }
                    if let CoordinatorMessage::Prepare { cut_id, .. } = m {
                        // One cut at a time: a newer Prepare means ours is over.
                        self.refuse(cut_id, "busy with another cut").await;
                        bail!("the coordinator started cut {cut_id}");
                    }
                }
            }
        }
    }

    async fn refuse(&self, cut_id: u64, why: &str) {
        let _ = self
            .acks
            .send(AgentMessage::CutAck(CutAck {
                cut_id,
                phase: CutPhase::Failed,
                disks: vec![],
                consistency: Consistency::NotFrozen,
                error: Some(why.into()),
            }))
            .await;
    }
}

impl Driver for Coordinated<'_> {
    async fn prepared(&mut self, quiesced: bool) -> Result<Budget> {
        if !quiesced && self.consistency == Consistency::App {
            self.consistency = Consistency::Crash;
        }
        if Instant::now() > self.prepare_until {
            bail!("pre-copy and hooks took longer than the prepare deadline");
        }
        self.ack(CutPhase::Prepared, vec![], None).await;
        let until = self.prepare_until + Duration::from_secs(2);
        match self.next(until).await? {
            CoordinatorMessage::Freeze {
                ack_deadline,
                freeze_deadline,
                ..
            } => {
                let freeze = freeze_deadline.min(self.local_freeze);
                if self.freezes && freeze <= ack_deadline {
                    bail!(
                        "this agent's freeze_timeout ({:?}) is not longer than the group's acknowledgement deadline ({ack_deadline:?})",
                        self.local_freeze
                    );
                }
                self.freeze = Some((Instant::now(), freeze));
                // The capture must be in before the coordinator stops listening.
                Ok(Budget {
                    freeze,
                    capture: ack_deadline.min(freeze.mul_f64(0.8)),
                })
            }
            CoordinatorMessage::Abort { reason, .. } => {
                bail!("aborted by the coordinator: {reason}")
            }
            other => bail!("unexpected {other:?} before Freeze"),
        }
    }

    async fn captured(&mut self) -> Result<()> {
        self.ack(CutPhase::Frozen, vec![], None).await;
        let (since, freeze) = self.freeze.expect("frozen after prepared");
        // Wait for Commit at most until the freeze deadline: past it the coordinator cannot
        // have committed in time (its ack deadline is shorter).
        match self.next(since + freeze).await? {
            CoordinatorMessage::Commit { point_id, .. } => {
                self.point = Some(point_id);
                Ok(())
            }
            CoordinatorMessage::Abort { reason, .. } => {
                Err(anyhow!("aborted by the coordinator: {reason}"))
            }
            other => Err(anyhow!("unexpected {other:?} before Commit")),
        }
    }

    fn always_collect(&self) -> bool {
        true
    }
}

/// A Prepare as it arrived.
#[derive(Debug, Clone, Copy)]
struct Asked {
    arrived: Instant,
    cut_id: u64,
    kind: CutKind,
    prepare_deadline: Duration,
}

/// One coordinated cut, from its Prepare to the TAGGED (or FAILED) ack.
async fn take_part(
    agent: &Agent,
    watchers: &Watchers,
    commands: &mut mpsc::Receiver<Command>,
    acks: &mpsc::Sender<AgentMessage>,
    asked: Asked,
) {
    let Asked {
        arrived,
        cut_id,
        kind,
        prepare_deadline,
    } = asked;
    let mut driver = Coordinated {
        cut_id,
        commands,
        acks,
        prepare_until: arrived + prepare_deadline,
        local_freeze: cut::local_freeze_deadline(&agent.config.disks),
        freezes: !cut::freeze_mounts(&agent.config.disks).is_empty(),
        consistency: if kind == CutKind::App {
            Consistency::App
        } else {
            Consistency::Crash
        },
        freeze: None,
        point: None,
    };
    if Instant::now() > driver.prepare_until {
        driver
            .refuse(cut_id, "busy replicating when the cut was asked for")
            .await;
        return;
    }
    let started = Instant::now();
    let r = cut::cut_with(
        agent,
        kind == CutKind::App,
        false,
        Some(watchers),
        &mut driver,
    )
    .await;
    match r {
        Ok(r) => {
            let consistency = r
                .tags
                .iter()
                .map(|t| t.consistency)
                .min()
                .unwrap_or(Consistency::NotFrozen);
            driver.consistency = consistency;
            let disks = r
                .tags
                .iter()
                .map(|t| DiskPosition {
                    disk: t.disk.clone(),
                    tag: t.seq,
                    through_segment: t.through_segment,
                })
                .collect();
            driver.ack(CutPhase::Tagged, disks, None).await;
            let point = driver.point.clone();
            crate::progress::update(&agent.config.state_dir, |s| {
                s.last_point = point.map(|p| p.to_string());
                s.last_point_time = Some(lifeboat_store::manifest::now_millis());
                s.last_error = None;
            });
            if let Some(w) = r.freeze {
                let us = |t: std::time::SystemTime| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as u64)
                };
                tracing::info!(
                    cut = cut_id,
                    held = ?w.held,
                    frozen_at_us = us(w.frozen_at),
                    thawed_at_us = us(w.thawed_at),
                    took = ?started.elapsed(),
                    %consistency,
                    "group cut tagged"
                );
            } else {
                tracing::info!(cut = cut_id, took = ?started.elapsed(), %consistency, "group cut tagged (no freeze)");
            }
        }
        Err(e) => {
            tracing::warn!(cut = cut_id, error = %format!("{e:#}"), "left the group cut");
            driver
                .ack(CutPhase::Failed, vec![], Some(format!("{e:#}")))
                .await;
        }
    }
}

/// Background replication between cuts: ship what changed and keep it as a not-frozen tag.
async fn replicate(agent: &Agent, verify: bool, watchers: &Watchers) -> Result<()> {
    // A disk that cannot go on (waiting for processing's offer, say) costs its own tag only:
    // the others still replicate, and ask for what they need in the same round.
    let mut failed = None;
    for d in &agent.config.disks {
        crate::sync::check_disk_path(d)?;
        let mut st = match agent.reconcile(d, verify).await {
            Ok(st) => st,
            Err(e) => {
                failed.get_or_insert(e);
                continue;
            }
        };
        let hints = {
            let mut h = watchers.take(d.id.as_str());
            h.reread_all |= verify;
            h
        };
        let shipped = agent
            .ship(d, &mut st, crate::sync::ShipMode::Upload, hints)
            .await?;
        let tag = agent
            .write_tag(
                d,
                &mut st,
                shipped.shape,
                lifeboat_store::manifest::now_millis(),
                Consistency::NotFrozen,
            )
            .await?;
        crate::progress::update(&agent.config.state_dir, |s| {
            let e = s.disks.entry(d.id.to_string()).or_default();
            e.last_tag = tag.seq;
            e.last_tag_time = tag.time;
        });
    }
    failed.map_or(Ok(()), Err)
}

/// `run` in a group, until `stop` resolves.
pub async fn run(
    agent: &Agent,
    watchers: &Watchers,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let identity = Identity::load(&agent.config.state_dir, agent.config.coordinator.as_deref())?;
    if let Ok(t) = identity.not_after()
        && t < std::time::SystemTime::now()
    {
        bail!("this agent's certificate has expired; enrol it again with a new join token");
    }
    let (cmd_tx, mut commands) = mpsc::channel(64);
    let (ack_tx, ack_rx) = mpsc::channel(256);
    let session = tokio::spawn(session::run(
        identity,
        register(&agent.config),
        agent.config.state_dir.clone(),
        cmd_tx,
        ack_rx,
    ));
    tokio::pin!(stop);
    let interval = agent.config.replication.interval;
    let mut next = tokio::time::Instant::now();
    let mut last_sweep: Option<Instant> = None;
    let result = loop {
        tokio::select! {
            biased;
            _ = &mut stop => {
                tracing::info!("stopping");
                break Ok(());
            }
            Some((arrived, m)) = commands.recv() => {
                if let CoordinatorMessage::Prepare { cut_id, kind, prepare_deadline } = m {
                    let asked = Asked { arrived, cut_id, kind, prepare_deadline };
                    take_part(agent, watchers, &mut commands, &ack_tx, asked).await;
                }
            }
            _ = tokio::time::sleep_until(next) => {
                let sweep = last_sweep.is_none_or(|t| t.elapsed() >= agent.config.replication.verify_interval);
                // A stop ends background replication at once, even mid-way through an initial
                // copy of a large disk (it resumes from its checkpoints at the next start).
                let (result, then_stop) = match crate::consistency::unless_stopped(replicate(agent, sweep, watchers), &mut stop).await {
                    crate::consistency::Run::Done(r) => (r, false),
                    crate::consistency::Run::DoneThenStop(r) => (r, true),
                    crate::consistency::Run::Stopped => (Ok(()), true),
                };
                match result {
                    Ok(()) if sweep => last_sweep = Some(Instant::now()),
                    Ok(()) => {}
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "replication cycle failed"),
                }
                if then_stop {
                    break Ok(());
                }
                next = tokio::time::Instant::now() + interval;
            }
        }
    };
    session.abort();
    result
}
