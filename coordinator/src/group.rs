//! The replication group: who its members are, their sessions and health, and the cut protocol
//! that turns the members' frozen captures into one shared recovery point.
//!
//! One cut runs at a time ([`Group::cut`] holds `cut_lock`). The protocol and the argument for
//! why its points are consistent cuts are in `proto/lifeboat/v1/coordinator.proto`; this file
//! enforces the coordinator's half: Freeze only to PREPARED members, Commit only with every
//! FROZEN ack in before the ack deadline, and a point published (create-only, after reading back
//! every covered tag) with exactly the members that acked TAGGED.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use lifeboat_proto::model::{
    CoordinatorMessage, CutAck, CutKind, CutPhase, DiskStats, Heartbeat, Register,
};
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{
    Consistency, DiskRef, Excluded, Member as PointMember, PointKind, RecoveryPoint, now_millis,
};
use lifeboat_store::restore::StoreReader;
use lifeboat_store::writer::StoreWriter;
use lifeboat_store::{DiskId, GroupId, PointId, VmId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{Config, Deadlines};

/// What a session's outbound half carries: messages to the agent, or the protocol violation
/// for which the coordinator ends the session.
pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Violation>>;

/// A message from the agent that breaks the protocol; the session ends with it.
#[derive(Debug, Clone)]
pub struct Violation(pub String);

/// Why the group refused a request.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The group has `max_members` members.
    #[error("{0}")]
    Full(String),
    #[error("{0}")]
    NotFound(String),
    /// The certificate or VM may not do this.
    #[error("{0}")]
    Denied(String),
    /// The member list could not be saved; nothing changed.
    #[error("cannot save members.json: {0}")]
    Storage(String),
}

/// A member as the Admin API shows it.
#[derive(Debug, Clone)]
pub struct MemberView {
    pub vm: VmId,
    pub connected: bool,
    pub healthy: bool,
    pub last_seen_ms: u64,
    pub registered: Option<Register>,
    pub stats: Vec<(DiskId, DiskStats)>,
}

/// A member as the coordinator sees it.
#[derive(Debug, Default)]
pub struct MemberState {
    pub registered: Option<Register>,
    session: Option<(u64, Outbound)>,
    pub last_seen: Option<Instant>,
    pub last_seen_ms: u64,
    pub stats: Vec<(DiskId, DiskStats)>,
}

impl MemberState {
    pub fn connected(&self) -> bool {
        self.session.is_some()
    }
}

/// The durable member list (`members.json`): enrolled VMs, removed ones whose certificates are
/// no longer accepted, and each member's current certificate (SHA-256 of its DER) — the only one
/// accepted for it, so a certificate replaced by renewal or a new enrolment is worthless — plus
/// a renewed one not used yet. Both are accepted until the renewed one is first presented: an
/// agent that lost the answer to its renewal is not locked out.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberFile {
    members: BTreeSet<VmId>,
    removed: BTreeSet<VmId>,
    /// Missing for members recorded before certificates were tracked (or from a restored
    /// backup): the first certificate they present is recorded.
    #[serde(default)]
    certificates: BTreeMap<VmId, String>,
    #[serde(default)]
    renewed: BTreeMap<VmId, String>,
}

/// A published group point, as the catalog keeps it.
#[derive(Debug, Clone)]
pub struct Published {
    pub point: RecoveryPoint,
    pub consistency: Consistency,
}

/// Why a cut produced no point.
#[derive(Debug, thiserror::Error)]
pub enum CutError {
    #[error("no member is connected")]
    NoMembers,
    #[error("no member could be covered: {0}")]
    NoneCovered(String),
    #[error("publishing the point failed: {0}")]
    Publish(String),
    /// Cancelled before Commit went out (a cut is cancellable only until then).
    #[error("cancelled before the members were committed")]
    Cancelled,
}

type AckEvent = (VmId, CutAck);

/// The group.
#[derive(Debug)]
pub struct Group {
    pub id: GroupId,
    pub config: Config,
    writer: StoreWriter,
    reader: StoreReader,
    members: Mutex<BTreeMap<VmId, MemberState>>,
    /// Held across a save (async: the file is written off the workers), so saves are ordered
    /// and the memory copy changes only once its save succeeded.
    member_file: tokio::sync::Mutex<MemberFile>,
    cut_lock: tokio::sync::Mutex<()>,
    last_cut: AtomicU64,
    current: Mutex<Option<(u64, mpsc::UnboundedSender<AckEvent>)>>,
    catalog: Mutex<Vec<RecoveryPoint>>,
    next_session: AtomicU64,
}

fn members_path(config: &Config) -> PathBuf {
    config.state_dir.join("members.json")
}

/// `cut-floor`: the highest cut id issued, as decimal text.
fn floor_path(config: &Config) -> PathBuf {
    config.state_dir.join("cut-floor")
}

#[allow(clippy::disallowed_methods, reason = "called through spawn_blocking")]
fn read_floor(config: &Config) -> Result<u64> {
    match std::fs::read_to_string(floor_path(config)) {
        Ok(t) => t
            .trim()
            .parse()
            .with_context(|| format!("{} is damaged", floor_path(config).display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).context("cannot read the cut id floor"),
    }
}

#[allow(clippy::disallowed_methods, reason = "called through spawn_blocking")]
fn read_members(path: &std::path::Path) -> Result<MemberFile> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).context("members.json is damaged"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MemberFile::default()),
        Err(e) => Err(e).context("cannot read members.json"),
    }
}

#[allow(clippy::disallowed_methods, reason = "called through spawn_blocking")]
fn write_floor(path: &std::path::Path, cut_id: u64) -> Result<()> {
    lifeboat_store::durable::replace(path, format!("{cut_id}\n").as_bytes())?;
    Ok(())
}

/// Cut ids are Unix milliseconds, bumped past every cut id already in the catalog, so they
/// increase across restarts without extra state.
fn cut_id_of(point: &PointId) -> Option<u64> {
    point.as_str().strip_prefix('c')?.parse().ok()
}

pub fn point_id_of(cut_id: u64) -> PointId {
    PointId::new(format!("c{cut_id:013}")).expect("valid point id")
}

impl Group {
    /// Opens the group: member list from the state directory, catalog rebuilt from the store.
    pub async fn open(config: Config) -> Result<Self> {
        let backend = config
            .store
            .open()
            .await
            .context("cannot open the cache store")?;
        let layout = Layout::new(config.group.clone());
        let reader = StoreReader::new(backend.clone(), layout.clone());
        let writer = StoreWriter::new(backend, layout);
        let catalog: Vec<RecoveryPoint> = reader
            .points()
            .await
            .context("cannot rebuild the point catalog from the store")?
            .into_iter()
            .filter(|p| p.multi_vm)
            .collect();
        // The floor under the next cut id: the highest of the catalog, the floor file (the
        // cache is trimmed of processed points) and the target's points (the state directory
        // may be new), so ids stay unique across restarts and clock steps back.
        let floor = {
            let c = config.clone();
            tokio::task::spawn_blocking(move || read_floor(&c)).await??
        };
        let in_target = match &config.target {
            Some(t) => {
                let target = t.open().await.context("cannot open the target store")?;
                let names = target
                    .list(&reader.layout().points())
                    .await
                    .context("cannot list the target store's points")?;
                names
                    .iter()
                    .filter_map(|m| {
                        let id = m.name.file_name().strip_suffix(".point")?;
                        cut_id_of(&PointId::new(id).ok()?)
                    })
                    .max()
                    .unwrap_or(0)
            }
            None => 0,
        };
        let last_cut = catalog
            .iter()
            .filter_map(|p| cut_id_of(&p.id))
            .max()
            .unwrap_or(0)
            .max(floor)
            .max(in_target);
        let path = members_path(&config);
        let member_file = tokio::task::spawn_blocking(move || read_members(&path)).await??;
        let members = member_file
            .members
            .iter()
            .map(|vm| (vm.clone(), MemberState::default()))
            .collect();
        tracing::info!(
            group = %config.group,
            points = catalog.len(),
            members = member_file.members.len(),
            "catalog rebuilt from the store"
        );
        Ok(Group {
            id: config.group.clone(),
            writer,
            reader,
            members: Mutex::new(members),
            member_file: tokio::sync::Mutex::new(member_file),
            cut_lock: tokio::sync::Mutex::new(()),
            last_cut: AtomicU64::new(last_cut),
            current: Mutex::new(None),
            catalog: Mutex::new(catalog),
            next_session: AtomicU64::new(1),
            config,
        })
    }

    /// Writes `f` as the member list, off the async workers; on success it becomes the list in
    /// memory too (`current` is the guard of the list it replaces).
    async fn save_members(
        &self,
        current: &mut tokio::sync::MutexGuard<'_, MemberFile>,
        f: MemberFile,
    ) -> Result<(), GroupError> {
        let body = serde_json::to_vec_pretty(&f).expect("the member list serialises");
        lifeboat_store::durable::replace_async(members_path(&self.config), body)
            .await
            .map_err(|e| GroupError::Storage(format!("{e:#}")))?;
        **current = f;
        Ok(())
    }

    /// Whether `vm` may join (enrol): not beyond the group's size limit.
    pub async fn may_join(&self, vm: &VmId) -> Result<(), GroupError> {
        let f = self.member_file.lock().await;
        if !f.members.contains(vm) && f.members.len() >= self.config.max_members {
            return Err(GroupError::Full(format!(
                "group {} is full ({} members, max_members = {})",
                self.id,
                f.members.len(),
                self.config.max_members
            )));
        }
        Ok(())
    }

    /// Records an enrolled VM as a member with its certificate (and lifts an earlier removal).
    pub async fn join(&self, vm: &VmId, certificate: &str) -> Result<(), GroupError> {
        let mut guard = self.member_file.lock().await;
        let mut f = guard.clone();
        f.removed.remove(vm);
        f.certificates.insert(vm.clone(), certificate.to_string());
        f.renewed.remove(vm);
        let new = f.members.insert(vm.clone());
        self.save_members(&mut guard, f).await?;
        if new {
            self.members.lock().unwrap().entry(vm.clone()).or_default();
            tracing::info!(%vm, "VM joined the group");
        }
        Ok(())
    }

    /// Removes a member: closes its session and refuses its certificate from now on.
    pub async fn remove(&self, vm: &VmId) -> Result<(), GroupError> {
        let mut guard = self.member_file.lock().await;
        let mut f = guard.clone();
        if !f.members.remove(vm) {
            return Err(GroupError::NotFound(format!(
                "VM {vm} is not a member of group {}",
                self.id
            )));
        }
        f.removed.insert(vm.clone());
        self.save_members(&mut guard, f).await?;
        self.members.lock().unwrap().remove(vm);
        tracing::info!(%vm, "VM removed from the group");
        Ok(())
    }

    /// Refuses a certificate of `vm` that is not its current one, or of a removed VM.
    fn check_certificate(
        &self,
        f: &MemberFile,
        vm: &VmId,
        certificate: &str,
    ) -> Result<(), GroupError> {
        if f.removed.contains(vm) {
            return Err(GroupError::Denied(format!(
                "VM {vm} was removed from group {}; enrol it again with a new join token",
                self.id
            )));
        }
        let renewed = f.renewed.get(vm).is_some_and(|r| r == certificate);
        match f.certificates.get(vm) {
            Some(current) if current != certificate && !renewed => {
                Err(GroupError::Denied(format!(
                    "this certificate of VM {vm} was replaced (renewed or enrolled again); use the current one"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Refuses `certificate` unless it is the current one of a member `vm`.
    pub async fn may_renew(&self, vm: &VmId, certificate: &str) -> Result<(), GroupError> {
        let f = self.member_file.lock().await;
        self.check_member(&f, vm, certificate)
    }

    fn check_member(&self, f: &MemberFile, vm: &VmId, certificate: &str) -> Result<(), GroupError> {
        self.check_certificate(f, vm, certificate)?;
        if !f.members.contains(vm) {
            return Err(GroupError::Denied(format!(
                "VM {vm} is not a member of group {}",
                self.id
            )));
        }
        Ok(())
    }

    /// Records `new` as member `vm`'s renewed certificate (it replaces the current one when
    /// first used) and closes the session, so the agent reconnects with it.
    pub async fn renewed(&self, vm: &VmId, old: &str, new: &str) -> Result<(), GroupError> {
        let mut guard = self.member_file.lock().await;
        self.check_member(&guard, vm, old)?;
        let mut f = guard.clone();
        f.renewed.insert(vm.clone(), new.to_string());
        self.save_members(&mut guard, f).await?;
        if let Some(m) = self.members.lock().unwrap().get_mut(vm) {
            m.session = None;
        }
        Ok(())
    }

    /// Attaches a registered session made with `certificate` (its SHA-256); a second session for
    /// the same VM replaces the first. What the session changes in the member list (a renewed
    /// certificate's first use, a first certificate recorded, a member missing from the list)
    /// is saved before the session is accepted: a session refused for a failed save is retried
    /// by the agent, never accepted on a list that would forget it.
    pub async fn attach(
        &self,
        reg: Register,
        certificate: &str,
        tx: Outbound,
    ) -> Result<u64, GroupError> {
        let vm = reg.vm.clone();
        {
            let mut guard = self.member_file.lock().await;
            self.check_certificate(&guard, &vm, certificate)?;
            let mut f = guard.clone();
            if f.renewed.get(&vm).is_some_and(|r| r == certificate) {
                // First use of the renewed certificate: from now on it alone is accepted.
                f.renewed.remove(&vm);
                f.certificates.insert(vm.clone(), certificate.to_string());
            } else if !f.certificates.contains_key(&vm) {
                f.certificates.insert(vm.clone(), certificate.to_string());
            }
            if !f.members.contains(&vm) {
                // Enrolled with this CA but not on the list (for example members.json was
                // restored from a backup): the certificate is proof enough, within the limit.
                if f.members.len() >= self.config.max_members {
                    return Err(GroupError::Full(format!(
                        "group {} is full (max_members = {})",
                        self.id, self.config.max_members
                    )));
                }
                f.members.insert(vm.clone());
            }
            if *guard != f {
                self.save_members(&mut guard, f).await?;
            }
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut members = self.members.lock().unwrap();
        let m = members.entry(vm.clone()).or_default();
        if m.session.is_some() {
            tracing::info!(%vm, "a new session replaces the previous one");
        }
        m.registered = Some(reg);
        m.session = Some((id, tx));
        m.last_seen = Some(Instant::now());
        m.last_seen_ms = now_millis();
        tracing::info!(%vm, session = id, "member connected");
        Ok(id)
    }

    /// A session ended.
    pub fn detach(&self, vm: &VmId, session: u64) {
        let mut members = self.members.lock().unwrap();
        if let Some(m) = members.get_mut(vm)
            && m.session.as_ref().is_some_and(|(id, _)| *id == session)
        {
            m.session = None;
            tracing::warn!(%vm, "member disconnected");
            drop(members);
            // A cut in progress need not wait for its deadline to learn this member is gone.
            if let Some((cut_id, tx)) = &*self.current.lock().unwrap() {
                let _ = tx.send((
                    vm.clone(),
                    CutAck {
                        cut_id: *cut_id,
                        phase: CutPhase::Failed,
                        disks: vec![],
                        consistency: Consistency::NotFrozen,
                        error: Some("disconnected".into()),
                    },
                ));
            }
        }
    }

    pub fn heartbeat(&self, vm: &VmId, session: u64, hb: Heartbeat) {
        let mut members = self.members.lock().unwrap();
        if let Some(m) = members.get_mut(vm)
            && m.session.as_ref().is_some_and(|(id, _)| *id == session)
        {
            m.last_seen = Some(Instant::now());
            m.last_seen_ms = now_millis();
            m.stats = hb.disks;
        }
    }

    pub fn ack(&self, vm: &VmId, ack: CutAck) {
        if let Some(m) = self.members.lock().unwrap().get_mut(vm) {
            m.last_seen = Some(Instant::now());
            m.last_seen_ms = now_millis();
        }
        match &*self.current.lock().unwrap() {
            Some((cut_id, tx)) if *cut_id == ack.cut_id => {
                let _ = tx.send((vm.clone(), ack));
            }
            _ => {
                tracing::debug!(%vm, cut = ack.cut_id, "ack for a cut that is not running; ignored")
            }
        }
    }

    /// Whether a member is connected and heard from within three heartbeat intervals.
    pub fn healthy(&self, m: &MemberState) -> bool {
        m.connected()
            && m.last_seen
                .is_some_and(|t| t.elapsed() <= self.config.heartbeat_interval * 3)
    }

    /// A snapshot of the members for the Admin API.
    pub fn members(&self) -> Vec<MemberView> {
        let members = self.members.lock().unwrap();
        members
            .iter()
            .map(|(vm, m)| MemberView {
                vm: vm.clone(),
                connected: m.connected(),
                healthy: self.healthy(m),
                last_seen_ms: m.last_seen_ms,
                registered: m.registered.clone(),
                stats: m.stats.clone(),
            })
            .collect()
    }

    /// Logs members that stopped sending heartbeats (and when they come back); runs forever.
    pub async fn watch_health(&self) {
        let mut unhealthy = BTreeSet::new();
        loop {
            tokio::time::sleep(self.config.heartbeat_interval).await;
            let members = self.members.lock().unwrap();
            for (vm, m) in members.iter() {
                let ok = self.healthy(m);
                if !ok && unhealthy.insert(vm.clone()) {
                    tracing::warn!(%vm, connected = m.connected(), "member unhealthy: no heartbeat for three intervals");
                } else if ok && unhealthy.remove(vm) {
                    tracing::info!(%vm, "member healthy again");
                }
            }
        }
    }

    /// The group points published so far (from the store at start-up, then as cut).
    pub fn catalog(&self) -> Vec<RecoveryPoint> {
        self.catalog.lock().unwrap().clone()
    }

    fn deadlines(&self, kind: CutKind) -> Deadlines {
        match kind {
            CutKind::Crash => self.config.policy.crash,
            CutKind::App => self.config.policy.app,
        }
    }

    /// The highest cut id issued or seen; the next cut's id is above it.
    pub fn cut_floor(&self) -> u64 {
        self.last_cut.load(Ordering::SeqCst)
    }

    /// Holds off cuts while the guard lives (processing trims the cache store under it, so no
    /// cut's tags can go while its point is being published).
    pub async fn pause_cuts(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.cut_lock.lock().await
    }

    /// Runs one cut across the connected members and publishes its point. `cancel` stops it
    /// while members prepare or freeze (they are told to abort); once Commit went out, the
    /// members tag and the point is published whatever `cancel` says, so a cancelled cut never
    /// leaves a point behind that its caller was told did not happen.
    pub async fn cut(
        &self,
        kind: CutKind,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Published, CutError> {
        let _one_at_a_time = self.cut_lock.lock().await;
        let started = Instant::now();
        let cut_id = {
            let prev = self.last_cut.load(Ordering::SeqCst);
            let id = now_millis().max(prev + 1);
            self.last_cut.store(id, Ordering::SeqCst);
            id
        };
        // Durable before the id is used: a restart after a clock step back must not issue it
        // again once processing has trimmed its point from the cache.
        let path = floor_path(&self.config);
        let written = tokio::task::spawn_blocking(move || write_floor(&path, cut_id)).await;
        if let Err(e) = written.map_err(anyhow::Error::from).and_then(|r| r) {
            return Err(CutError::Publish(format!(
                "cannot record the cut id floor: {e:#}"
            )));
        }
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        *self.current.lock().unwrap() = Some((cut_id, ack_tx));
        // Should this future be dropped mid-cut (the coordinator shutting down), the members
        // are told at once instead of waiting out their deadlines frozen.
        let mut unfinished = Unfinished {
            group: self,
            cut_id,
            done: false,
        };
        let committing = std::sync::atomic::AtomicBool::new(false);
        let result = tokio::select! {
            r = self.run_cut(cut_id, kind, &mut acks, &committing) => r,
            () = async {
                cancel.cancelled().await;
                if committing.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
            } => {
                // run_cut is dropped here: `unfinished` tells every member to abort.
                return Err(CutError::Cancelled);
            }
        };
        unfinished.done = true;
        drop(unfinished);
        match &result {
            Ok(p) => tracing::info!(
                cut = cut_id,
                point = %p.point.id,
                ?kind,
                covered = p.point.members.len(),
                excluded = p.point.excluded.len(),
                took = ?started.elapsed(),
                "published group point"
            ),
            Err(e) => tracing::warn!(cut = cut_id, ?kind, error = %e, "cut produced no point"),
        }
        result
    }

    /// Every member with a session (to abort a cut whoever it reached).
    fn connected(&self) -> Vec<VmId> {
        self.members
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.connected())
            .map(|(vm, _)| vm.clone())
            .collect()
    }

    fn send(&self, to: &[VmId], msg: CoordinatorMessage) -> Vec<VmId> {
        let members = self.members.lock().unwrap();
        let mut failed = Vec::new();
        for vm in to {
            let sent = members
                .get(vm)
                .and_then(|m| m.session.as_ref())
                .is_some_and(|(_, tx)| tx.try_send(Ok(msg.clone())).is_ok());
            if !sent {
                failed.push(vm.clone());
            }
        }
        failed
    }

    /// Waits until every member of `waiting` answered `phase` (or failed), or the deadline.
    /// Returns the members that reached the phase, with their acks.
    async fn collect(
        &self,
        acks: &mut mpsc::UnboundedReceiver<AckEvent>,
        mut waiting: BTreeSet<VmId>,
        phase: CutPhase,
        deadline: tokio::time::Instant,
        excluded: &mut Vec<Excluded>,
    ) -> BTreeMap<VmId, CutAck> {
        let mut reached = BTreeMap::new();
        while !waiting.is_empty() {
            let ev = tokio::time::timeout_at(deadline, acks.recv()).await;
            let Ok(Some((vm, ack))) = ev else { break };
            if !waiting.contains(&vm) {
                continue;
            }
            if ack.phase == phase {
                waiting.remove(&vm);
                reached.insert(vm, ack);
            } else if ack.phase == CutPhase::Failed {
                waiting.remove(&vm);
                excluded.push(Excluded {
                    vm,
                    reason: ack.error.unwrap_or_else(|| "failed".into()),
                });
            }
        }
        let what = match phase {
            CutPhase::Prepared => "missed the prepare deadline",
            CutPhase::Frozen => "missed the freeze acknowledgement deadline",
            _ => "did not write its tags before the tag deadline",
        };
        for vm in waiting {
            excluded.push(Excluded {
                vm,
                reason: what.into(),
            });
        }
        reached
    }

    async fn run_cut(
        &self,
        cut_id: u64,
        kind: CutKind,
        acks: &mut mpsc::UnboundedReceiver<AckEvent>,
        committing: &std::sync::atomic::AtomicBool,
    ) -> Result<Published, CutError> {
        let d = self.deadlines(kind);
        let mut excluded = Vec::new();
        let (connected, known): (Vec<VmId>, Vec<VmId>) = {
            let members = self.members.lock().unwrap();
            (
                members
                    .iter()
                    .filter(|(_, m)| m.connected())
                    .map(|(vm, _)| vm.clone())
                    .collect(),
                members.keys().cloned().collect(),
            )
        };
        for vm in &known {
            if !connected.contains(vm) {
                excluded.push(Excluded {
                    vm: vm.clone(),
                    reason: "not connected".into(),
                });
            }
        }
        if connected.is_empty() {
            return Err(CutError::NoMembers);
        }
        let abort = |who: &[VmId], reason: &str| {
            self.send(
                who,
                CoordinatorMessage::Abort {
                    cut_id,
                    reason: reason.into(),
                },
            );
        };

        // Phase 1: prepare (hooks, pre-copy).
        let unreachable = self.send(
            &connected,
            CoordinatorMessage::Prepare {
                cut_id,
                kind,
                prepare_deadline: d.prepare,
            },
        );
        let asked: BTreeSet<VmId> = connected
            .iter()
            .filter(|vm| !unreachable.contains(vm))
            .cloned()
            .collect();
        excluded.extend(unreachable.into_iter().map(|vm| Excluded {
            vm,
            reason: "session not accepting messages".into(),
        }));
        let deadline = tokio::time::Instant::now() + d.prepare;
        let prepared = self
            .collect(
                acks,
                asked.clone(),
                CutPhase::Prepared,
                deadline,
                &mut excluded,
            )
            .await;
        let late: Vec<VmId> = asked
            .iter()
            .filter(|v| !prepared.contains_key(*v))
            .cloned()
            .collect();
        abort(&late, "excluded from this cut");
        if prepared.is_empty() {
            return Err(CutError::NoneCovered(summary(&excluded)));
        }

        // Phase 2: freeze. The clock for the ack deadline starts before the first Freeze goes
        // out, so every member froze after it started (see the .proto).
        let freeze_start = tokio::time::Instant::now();
        let to_freeze: Vec<VmId> = prepared.keys().cloned().collect();
        let unreachable = self.send(
            &to_freeze,
            CoordinatorMessage::Freeze {
                cut_id,
                ack_deadline: d.ack,
                freeze_deadline: d.freeze,
            },
        );
        excluded.extend(unreachable.iter().map(|vm| Excluded {
            vm: vm.clone(),
            reason: "session not accepting messages".into(),
        }));
        let asked: BTreeSet<VmId> = to_freeze
            .into_iter()
            .filter(|vm| !unreachable.contains(vm))
            .collect();
        let frozen = self
            .collect(
                acks,
                asked.clone(),
                CutPhase::Frozen,
                freeze_start + d.ack,
                &mut excluded,
            )
            .await;
        // The consistent instant: every member in `frozen` is frozen now. Never before the cut
        // id (itself above every earlier cut): after a clock step back, a point timed before
        // the latest processed one would be taken for a pruned one and never processed.
        let cut_time = now_millis().max(cut_id);
        self.last_cut.fetch_max(cut_time, Ordering::SeqCst);
        let late: Vec<VmId> = asked
            .iter()
            .filter(|v| !frozen.contains_key(*v))
            .cloned()
            .collect();
        abort(&late, "excluded from this cut");
        if frozen.is_empty() {
            return Err(CutError::NoneCovered(summary(&excluded)));
        }

        // Phase 3: commit; members thaw, upload and tag. From here on the cut is no longer
        // cancellable.
        committing.store(true, Ordering::SeqCst);
        let point_id = point_id_of(cut_id);
        let committed: Vec<VmId> = frozen.keys().cloned().collect();
        let unreachable = self.send(
            &committed,
            CoordinatorMessage::Commit {
                cut_id,
                point_id: point_id.clone(),
            },
        );
        excluded.extend(unreachable.iter().map(|vm| Excluded {
            vm: vm.clone(),
            reason: "commit could not be delivered".into(),
        }));
        let asked: BTreeSet<VmId> = committed
            .into_iter()
            .filter(|vm| !unreachable.contains(vm))
            .collect();
        let deadline = tokio::time::Instant::now() + self.config.policy.tag_deadline;
        let tagged = self
            .collect(acks, asked, CutPhase::Tagged, deadline, &mut excluded)
            .await;
        if tagged.is_empty() {
            return Err(CutError::NoneCovered(summary(&excluded)));
        }

        // Publish: read every covered tag back; a member's label is the weakest of what its ack
        // claims and what its tags in the store say.
        let checks = futures::stream::iter(
            tagged
                .into_iter()
                .map(|(vm, ack)| covered_member(&self.reader, vm, ack)),
        )
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
        let mut members = Vec::new();
        for c in checks {
            match c {
                Ok(m) => members.push(m),
                Err(e) => return Err(CutError::Publish(e)),
            }
        }
        members.sort_by(|a, b| a.vm.cmp(&b.vm));
        excluded.sort_by(|a, b| a.vm.cmp(&b.vm));
        let consistency = members
            .iter()
            .map(|m| m.consistency)
            .min()
            .unwrap_or(Consistency::NotFrozen);
        let point = RecoveryPoint {
            id: point_id,
            group: self.id.clone(),
            time: cut_time,
            kind: PointKind::of(consistency),
            multi_vm: true,
            members,
            excluded,
        };
        self.writer
            .put_point(&point)
            .await
            .map_err(|e| CutError::Publish(e.to_string()))?;
        self.catalog.lock().unwrap().push(point.clone());
        Ok(Published { point, consistency })
    }
}

/// A covered member's entry in the point, from its TAGGED ack checked against the store.
async fn covered_member(
    reader: &StoreReader,
    vm: VmId,
    ack: CutAck,
) -> Result<PointMember, String> {
    let mut label = ack.consistency;
    let mut disks = Vec::new();
    for p in &ack.disks {
        let tag = reader
            .tag(&vm, &p.disk, p.tag)
            .await
            .map_err(|e| format!("tag {} of {vm}/{}: {e}", p.tag, p.disk))?;
        label = label.min(tag.consistency);
        disks.push(DiskRef {
            disk: p.disk.clone(),
            tag: p.tag,
        });
    }
    Ok(PointMember {
        vm,
        disks,
        consistency: label,
    })
}

fn summary(excluded: &[Excluded]) -> String {
    excluded
        .iter()
        .map(|e| format!("{}: {}", e.vm, e.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// How long to wait before giving up on a session's first message.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The cut in progress: clears it from the group when the cut ends, and when it is dropped
/// unfinished, sends every connected member an Abort for it.
struct Unfinished<'a> {
    group: &'a Group,
    cut_id: u64,
    done: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        *self.group.current.lock().unwrap() = None;
        if !self.done {
            let to = self.group.connected();
            self.group.send(
                &to,
                CoordinatorMessage::Abort {
                    cut_id: self.cut_id,
                    reason: "the coordinator stopped this cut".into(),
                },
            );
            tracing::warn!(
                cut = self.cut_id,
                "cut stopped unfinished; its members were told to abort"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "test set-up")]
mod tests {
    use super::*;
    use std::path::Path;

    /// Regression: after a clock step back, the floor under cut ids was rebuilt from the
    /// cache store alone, which processing had trimmed: a restarted coordinator could issue an
    /// id the target already held. The floor file and the target's points now count too.
    #[tokio::test]
    async fn cut_ids_stay_above_every_id_issued_after_restarts_and_clock_steps() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, target, state) = (
            dir.path().join("cache"),
            dir.path().join("target"),
            dir.path().join("state"),
        );
        for d in [&cache, &target, &state] {
            std::fs::create_dir_all(d).unwrap();
        }
        let text = format!(
            "group = \"g1\"\nstate_dir = {:?}\n[store]\nkind = \"local\"\npath = {:?}\n[target]\nkind = \"local\"\npath = {:?}\n",
            state.display(),
            cache.display(),
            target.display()
        );
        let config = Config::parse(Path::new("c.toml"), &text).unwrap();
        // An hour ahead of the clock: issued before the clock stepped back.
        let ahead = now_millis() + 3_600_000;
        let points = target.join("v1/g1/points");
        std::fs::create_dir_all(&points).unwrap();
        std::fs::write(points.join(format!("{}.point", point_id_of(ahead))), b"x").unwrap();
        let g = Group::open(config.clone()).await.unwrap();
        assert!(g.cut_floor() >= ahead, "target's points ignored");
        drop(g);
        // With the target emptied too, the floor file alone carries the id.
        std::fs::remove_dir_all(&points).unwrap();
        write_floor(&floor_path(&config), ahead + 7).unwrap();
        let g = Group::open(config.clone()).await.unwrap();
        assert_eq!(g.cut_floor(), ahead + 7);
        drop(g);
        // A damaged floor file is an error, not a silent zero.
        std::fs::write(floor_path(&config), "garbage").unwrap();
        assert!(Group::open(config).await.is_err());
    }
}
