//! One replication cycle: scan each disk, pack changed blocks into segments, upload them, write
//! the tags, then make the new state durable — and, at start-up, reconcile local state with the
//! store so that a crash at any moment loses nothing.
//!
//! Ordering (ARCHITECTURE.md's *write ordering* and *no acknowledged change is lost*):
//! segments → tree → tag → local state → point. A crash before
//! the tag leaves orphan segments, deleted at the next start; a crash between tag and state is
//! rolled forward from the store's indexes; lost or damaged state is rebuilt from the store's
//! indexes and the disk re-compared block by block.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use lifeboat_store::codec::{Hash, SegmentBuilder};
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{
    Consistency, DiskRef, DiskShape, Member, PointKind, RecoveryPoint, Tag, now_millis,
};
use lifeboat_store::restore::StoreReader;
use lifeboat_store::writer::StoreWriter;
use lifeboat_store::{DynBackend, ErrorKind, PointId};
use tokio::sync::mpsc;

use crate::cbt::{Cursor, Opened, Tracker};
use crate::config::{Config, DiskConfig, DiskKind, Tracking};
use crate::scan::{self, ScanStats};
use crate::state::{self, BlockHashes, Content, DiskState, FileState, Hashes};
use crate::watch::Hints;

/// The agent's view of its store and config.
#[derive(Debug)]
pub struct Agent {
    pub config: Config,
    pub writer: StoreWriter,
    pub reader: StoreReader,
    /// Block trackers by disk, opened at a disk's first pass: the tracker, or why there is
    /// none.
    trackers: std::sync::Mutex<BTreeMap<String, Result<Arc<Tracker>, String>>>,
    /// Why a tracker was started afresh (not resumed), until a pass has reported it.
    started: std::sync::Mutex<BTreeMap<String, String>>,
    /// Directory listings the verification sweep found damaged in the cache store, by hash:
    /// a tag that names one again replaces it.
    damaged_trees: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// The name under which a disk's tracking state is pinned (unique per group, VM and disk).
pub fn tracking_key(config: &Config, disk: &DiskConfig) -> String {
    format!("{}-{}-{}", config.group, config.vm, disk.id)
}

/// How a pass finds the changed blocks of an image or block device.
enum Plan {
    /// Read every block; `cursor` (from the tracker, taken before the scan) is where the next
    /// pass starts.
    Scan { cursor: Option<Cursor>, why: String },
    /// Read only these blocks (the tracker's read-out).
    Listed { blocks: Vec<u64>, cursor: Cursor },
}

impl Agent {
    /// Opens the cache store named by `config`.
    pub async fn open(config: Config) -> Result<Self> {
        let backend: DynBackend = config
            .store
            .open()
            .await
            .context("cannot open the cache store")?;
        std::fs::create_dir_all(&config.state_dir).with_context(|| {
            format!(
                "cannot create state directory {}",
                config.state_dir.display()
            )
        })?;
        let layout = Layout::new(config.group.clone());
        Ok(Self {
            writer: StoreWriter::new(backend.clone(), layout.clone()),
            reader: StoreReader::new(backend, layout),
            config,
            trackers: Default::default(),
            started: Default::default(),
            damaged_trees: Default::default(),
        })
    }

    /// The disk's block tracker, opened (or started) at its first use; `Err` says why the
    /// disk is scanned instead. `reopen` drops a tracker that no longer matches the device.
    fn tracker(&self, disk: &DiskConfig, reopen: bool) -> Result<Arc<Tracker>, String> {
        let mut map = self.trackers.lock().unwrap_or_else(|e| e.into_inner());
        let key = disk.id.to_string();
        if reopen {
            map.remove(&key);
        }
        map.entry(key)
            .or_insert_with(|| {
                if disk.tracking == Tracking::Scan {
                    return Err("tracking = \"scan\" in the config".into());
                }
                // An image is tracked through the loop device it is attached to, if any.
                let device = match disk.kind {
                    DiskKind::BlockDevice => disk.path.clone(),
                    DiskKind::Image => crate::cbt::loop_device_of(&disk.path)?,
                    DiskKind::Directory => return Err("directories are walked, not tracked".into()),
                };
                let pin = tracking_key(&self.config, disk);
                let opened = Tracker::open(&device, self.config.replication.block_size.0 as u32, &pin)
                    .and_then(|(mut t, opened)| {
                        if disk.kind == DiskKind::Image {
                            t.bind_image(&disk.path)?;
                        }
                        Ok((t, opened))
                    });
                match opened {
                    Ok((t, opened)) => {
                        match opened {
                            Opened::Resumed => tracing::info!(disk = %disk.id, generation = t.generation(), "block tracking resumed from pinned state"),
                            Opened::Started(why) => {
                                tracing::info!(disk = %disk.id, generation = t.generation(), reason = %why, "block tracking started (the first pass scans)");
                                self.started
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(disk.id.to_string(), why);
                            }
                        }
                        Ok(Arc::new(t))
                    }
                    Err(why) => {
                        tracing::warn!(disk = %disk.id, reason = %why, "block tracking unavailable; every pass scans the whole disk");
                        Err(why)
                    }
                }
            })
            .clone()
    }

    /// Decides how this pass finds changed blocks of an image or block device (see [`Plan`]).
    fn plan(&self, disk: &DiskConfig, st: &DiskState, verify: bool) -> Plan {
        let tracker = match self.tracker(disk, false) {
            Ok(t) => match t.check() {
                Ok(()) => Ok(t),
                Err(why) => {
                    tracing::warn!(disk = %disk.id, reason = %why, "block tracking lost continuity; restarting it and scanning");
                    // New maps for the device as it is now (never the old pins again); the scan
                    // below starts their cursor, and says why itself.
                    if let Err(e) = crate::cbt::forget(&tracking_key(&self.config, disk)) {
                        tracing::warn!(disk = %disk.id, error = %e, "cannot remove the old tracking state");
                    }
                    let _ = self.tracker(disk, true);
                    self.started
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(disk.id.as_str());
                    Err(why)
                }
            },
            Err(why) => Err(why),
        };
        let scan_with = |why: String| {
            let cursor = self
                .tracker(disk, false)
                .ok()
                .and_then(|t| t.cursor_for_scan().ok());
            Plan::Scan { cursor, why }
        };
        let t = match tracker {
            Ok(t) => t,
            Err(why) => return scan_with(why),
        };
        let started = self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(disk.id.as_str());
        if let Some(why) = started
            && st
                .tracking
                .as_ref()
                .is_some_and(|c| c.generation != t.generation())
        {
            // New maps: the state's position belongs to the old ones. Say why they are new.
            return scan_with(format!("tracking started afresh: {why}"));
        }
        let size = scan::device_size(&disk.path).unwrap_or(0);
        let whole = match &st.content {
            Content::Image { size: s, hashes } => {
                *s == size && hashes.len() == size.div_ceil(st.block_size as u64)
            }
            Content::Directory { .. } => false,
        };
        match &st.tracking {
            // The verification sweep reads everything, whatever the tracker says: it is what
            // catches writes no tracepoint saw (passthrough commands, a bio-based stack's
            // write in flight across a read-out).
            _ if verify => scan_with("verification sweep".into()),
            _ if !whole => scan_with(
                "the last state does not cover the whole disk (first copy or resync)".into(),
            ),
            None => {
                scan_with("no tracking position in the state (first pass, or state rebuilt)".into())
            }
            Some(c) => match t.read_out(c) {
                Ok(r) => Plan::Listed {
                    blocks: r.blocks,
                    cursor: r.cursor,
                },
                Err(why) => {
                    tracing::warn!(disk = %disk.id, reason = %why, "block tracking cannot vouch for this pass; scanning");
                    scan_with(why)
                }
            },
        }
    }

    /// Brings a disk's local state in line with the store (see the module docs), and checks
    /// that the cache store still holds what the next tag relies on (`deep`: every byte of it,
    /// as the verification sweep does; otherwise that none of it is missing).
    pub async fn reconcile(&self, disk: &DiskConfig, deep: bool) -> Result<DiskState> {
        let vm = &self.config.vm;
        let bs = self.config.replication.block_size.0 as u32;
        let directory = disk.kind == DiskKind::Directory;
        let local = match state::load(&self.config.state_dir, &disk.id) {
            Ok(s) => s,
            // Not read (out of descriptors, an I/O error): try again next cycle rather than
            // throw the state away and read the whole disk.
            Err(e @ state::StateError::Io { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(disk = %disk.id, error = %e, "local state unusable; resynchronising by checksum compare with the store");
                None
            }
        };
        let segs = self.reader.segment_seqs(vm, &disk.id).await?;
        let max_seg = segs.last().copied().unwrap_or(0);
        let latest = match self.reader.latest_tag(vm, &disk.id).await {
            Ok(l) => Ok(l),
            Err(e) if e.is_damage() => Err(e),
            Err(e) => return Err(e.into()),
        };

        // The steady state: local state and store agree, and the state file need not be
        // rewritten (it is as large as the disk's block hashes).
        let mut unchanged = false;
        let latest = match latest {
            Ok(l) => l,
            Err(e) => {
                // Every later tag would stand on it: start a new full copy numbered after it.
                let seq = self
                    .reader
                    .tag_seqs(vm, &disk.id)
                    .await?
                    .last()
                    .copied()
                    .unwrap_or(0);
                let through = local.as_ref().map_or(0, |s| s.through_segment).max(max_seg);
                tracing::warn!(disk = %disk.id, tag = seq, error = %e, "the newest tag in the cache store is damaged; resynchronising with a new full copy numbered after it");
                let mut st = self.fresh_copy(
                    disk,
                    seq.max(local.as_ref().map_or(0, |s| s.tag_seq)),
                    through,
                );
                state::save(&self.config.state_dir, &mut st)?;
                return Ok(st);
            }
        };
        let mut st = match (local, &latest) {
            (Some(s), Some(l)) if s.tag_seq == l.seq && s.block_size == bs => {
                unchanged = true;
                s
            }
            (Some(s), Some(l)) if s.tag_seq < l.seq && s.block_size == bs => {
                tracing::info!(disk = %disk.id, from = s.tag_seq, to = l.seq, "state is behind the store (crash after a tag); rolling forward from segment indexes");
                let through = s.through_segment;
                match self.roll_forward(s, l).await {
                    Ok(s) => s,
                    Err(e) => {
                        let why =
                            format!("cannot roll the local state forward to tag {}: {e}", l.seq);
                        let through = through.max(max_seg).max(l.through_segment);
                        self.restart_history(disk, l, &segs, through, &why).await?
                    }
                }
            }
            (Some(s), Some(l)) if s.tag_seq > l.seq => {
                // Numbers must never be reused (the target store may hold the lost ones).
                tracing::warn!(disk = %disk.id, state_tag = s.tag_seq, store_tag = l.seq, "the cache store is behind this agent's state (restored or rolled back?); starting a new full copy");
                self.fresh_copy(disk, s.tag_seq, s.through_segment.max(max_seg))
            }
            (Some(s), None) if s.tag_seq == 0 && s.block_size == bs => s,
            (Some(s), None) => {
                tracing::warn!(disk = %disk.id, state_tag = s.tag_seq, "the cache store holds no tag although one was written (store emptied or replaced); starting a new full copy");
                self.fresh_copy(disk, s.tag_seq, s.through_segment.max(max_seg))
            }
            (local, Some(l)) => {
                match &local {
                    Some(s) if s.block_size != bs => {
                        tracing::warn!(disk = %disk.id, old = s.block_size, new = bs, "block size changed; starting a new full copy")
                    }
                    Some(s) => {
                        tracing::warn!(disk = %disk.id, state_tag = s.tag_seq, store_tag = l.seq, "local state does not match the store; resynchronising by checksum compare")
                    }
                    None => {
                        tracing::warn!(disk = %disk.id, store_tag = l.seq, "no local state; resynchronising by checksum compare with the store")
                    }
                }
                if l.block_size == bs {
                    let base = DiskState::fresh(
                        vm.clone(),
                        disk.id.clone(),
                        bs,
                        directory,
                        l.from_segment,
                    );
                    // A history over an origin holds only what changed since that tag: rolled
                    // forward from nothing, every other block would be sent again.
                    let rolled = match l.origin {
                        Some(o) => Err(anyhow::anyhow!(
                            "its history lies over tag {o}, whose blocks only the target store holds"
                        )),
                        None => self.roll_forward(base, l).await,
                    };
                    match rolled {
                        Ok(s) => s,
                        Err(e) => {
                            // Numbers continue after the tag even when processing removed its
                            // segments from the cache: the target store holds them.
                            let through = max_seg.max(l.through_segment);
                            let why =
                                format!("the cache store cannot vouch for tag {}: {e}", l.seq);
                            self.restart_history(disk, l, &segs, through, &why).await?
                        }
                    }
                } else {
                    self.fresh_copy(disk, l.seq, max_seg.max(l.through_segment))
                }
            }
            // A new history: its numbers start from the time, so they never meet those of an
            // earlier history of this disk that the target store may still hold (a VM that lost
            // its state and got a new cache store).
            (_, None) => DiskState::fresh(
                vm.clone(),
                disk.id.clone(),
                bs,
                directory,
                history_start(now_millis(), max_seg),
            ),
        };
        // The content kind must match the disk kind (the config may have changed).
        if matches!(st.content, Content::Directory { .. }) != directory {
            st = self.fresh_copy(disk, st.tag_seq, st.through_segment.max(max_seg));
            unchanged = false;
        }
        // Segments past the last tag belong to a cycle that never finished: no tag references
        // them, and their blocks will be shipped again, so they go — or, when the credential
        // may not delete (a container SAS without `d`), they are adopted.
        let orphans: Vec<u64> = segs
            .iter()
            .copied()
            .filter(|&s| s > st.through_segment)
            .collect();
        if !orphans.is_empty() {
            let before = (st.from_segment, st.through_segment);
            st = self
                .drop_orphans(disk, st, latest.as_ref(), &orphans)
                .await?;
            // Adopted (or stepped over): the state now says so.
            unchanged &= before == (st.from_segment, st.through_segment);
        }
        if deep && let Some(tag) = latest.as_ref().filter(|l| l.seq == st.tag_seq) {
            self.check_tree(tag).await?;
        }
        // Processing asks for a new history when the target store cannot complete this one
        // (damage there, or data gone from both stores): what it lacks exists only here.
        let asked = self
            .reader
            .resync_requests(vm, &disk.id)
            .await?
            .into_iter()
            .find(|(from, _)| *from >= st.from_segment);
        if let Some((from, why)) = asked {
            let through = st.through_segment.max(max_seg);
            st = self
                .answer_request(disk, st.tag_seq, through, from, &why)
                .await?;
            state::save(&self.config.state_dir, &mut st)?;
            return Ok(st);
        }
        match self.check_cache(disk, &mut st, &segs, deep).await? {
            Checked::Intact => {}
            Checked::Lost(why) => {
                // Processing meets the same loss when it copies the points over it, and its
                // answer (checked above) may offer a tag to resynchronise over.
                let why =
                    format!("the cache store lost or damaged what the next tag relies on ({why})");
                if self
                    .answer_or_ask(
                        disk,
                        st.from_segment,
                        processed_out(&segs, st.from_segment) || st.origin.is_some(),
                        &why,
                    )
                    .await?
                    .is_some()
                {
                    bail!(
                        "a resync request for disk {} appeared meanwhile; the next cycle answers it",
                        disk.id
                    );
                }
                tracing::warn!(disk = %disk.id, reason = %why, "resynchronising with a new full copy");
                st = self.fresh_copy(disk, st.tag_seq, st.through_segment.max(max_seg));
                unchanged = false;
            }
        }
        // A state of an earlier format becomes the current one now, once.
        if !unchanged || st.version < state::STATE_VERSION {
            state::save(&self.config.state_dir, &mut st)?;
        }
        Ok(st)
    }

    /// The verification sweep's check of the listing the next tag of an unchanged directory
    /// reuses (trees are content-addressed, so the writer takes an existing name as the same
    /// bytes): a damaged one is noted, and a tag that names it again replaces it first (one
    /// not named again stays as it is, with the points that named it).
    async fn check_tree(&self, tag: &Tag) -> Result<()> {
        let DiskShape::Directory { tree } = &tag.shape else {
            return Ok(());
        };
        match self.reader.tree(&tag.vm, &tag.disk, tree).await {
            Ok(_) => Ok(()),
            // Gone: the next tag writes it again.
            Err(lifeboat_store::Error::Store(e))
                if e.kind == lifeboat_store::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(e) if e.is_damage() => {
                tracing::warn!(disk = %tag.disk, error = %e, "the directory listing in the cache store is damaged; the next tag that names it writes it again");
                self.damaged_trees
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(tree.clone());
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks the segments of the current history that the next tag will reference. Segments
    /// missing below the lowest one present were processed out of the cache (trim keeps every
    /// segment after the second-newest tag's, so a gap above that, or a missing newest
    /// segment, is loss). `deep` reads every present segment whole and checks each block. A
    /// segment gone or damaged leaves no way to go on in this history.
    async fn check_cache(
        &self,
        disk: &DiskConfig,
        st: &mut DiskState,
        segs: &[u64],
        deep: bool,
    ) -> Result<Checked> {
        let vm = &self.config.vm;
        let range = st.from_segment..=st.through_segment;
        let present: Vec<u64> = segs.iter().copied().filter(|s| range.contains(s)).collect();
        if let Some(&lowest) = present.first() {
            let expected = st.through_segment - lowest + 1;
            if present.len() as u64 != expected {
                let missing = (lowest..=st.through_segment)
                    .find(|s| present.binary_search(s).is_err())
                    .unwrap_or(lowest);
                return Ok(Checked::Lost(format!(
                    "segment {missing} is missing ({} of segments {lowest}..={} are stored)",
                    present.len(),
                    st.through_segment
                )));
            }
        }
        if !deep {
            return Ok(Checked::Intact);
        }
        for seq in present {
            let name = self.writer.layout().segment(vm, &disk.id, seq);
            let data = match self.writer.backend().get(&name).await {
                Ok(d) => d,
                // Processed out of the cache since the listing.
                Err(e) if e.kind == lifeboat_store::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let damage = match lifeboat_store::codec::decode(name.as_str(), data) {
                Ok(seg) => match seg.verify_all() {
                    Ok(()) => continue,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            // Even with every block it holds shipped again, a tag over its range would still
            // name it, and processing verifies every segment it copies: the history ends here.
            return Ok(Checked::Lost(format!(
                "segment {seq} is damaged ({damage})"
            )));
        }
        Ok(Checked::Intact)
    }

    /// Deletes orphan segments, highest first (so an interrupted run leaves a run of orphans
    /// that still starts right after `st`). If the store refuses the delete as not permitted,
    /// the orphans are adopted instead, as a checkpointed pass would be: `st` rolls forward
    /// over their indexes, so it describes exactly what a restore of the range through them
    /// yields and the next pass ships whatever differs from that; it scans (the tracker's
    /// position predates the orphans). Orphans it cannot adopt (no tag to take the disk's
    /// shape from, a gap, a damaged index, another history's) are stepped over by a new full
    /// copy numbered after them: numbers are never reused, and nothing references the orphans.
    /// A new history with no tag yet (a resync interrupted before its first tag) instead starts
    /// again after them as it was, over the same origin.
    async fn drop_orphans(
        &self,
        disk: &DiskConfig,
        st: DiskState,
        latest: Option<&Tag>,
        orphans: &[u64],
    ) -> Result<DiskState> {
        let vm = &self.config.vm;
        let mut denied = None;
        for (i, &seq) in orphans.iter().enumerate().rev() {
            tracing::info!(disk = %disk.id, seq, "removing orphan segment of an interrupted cycle");
            match self
                .writer
                .backend()
                .delete(&self.writer.layout().segment(vm, &disk.id, seq))
                .await
            {
                Ok(()) => {}
                Err(e) if e.kind == ErrorKind::Denied => {
                    denied = Some((e, i));
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some((e, i)) = denied else {
            return Ok(st);
        };
        // Deleting goes highest first, so what is left is `orphans[..=i]`.
        let remaining = &orphans[..=i];
        let last = remaining[i];
        let contiguous = remaining
            .iter()
            .enumerate()
            .all(|(i, &s)| s == st.through_segment + 1 + i as u64);
        let through = st.through_segment;
        let tag_seq = st.tag_seq;
        tracing::info!(disk = %disk.id, error = %e, "the store does not let this agent delete orphan segments; adopting them");
        // A new history with no tag yet (a resync, or a first copy after a tag of an older
        // one): what the interrupted cycle left are its own first segments, which no tag
        // gives a shape. It starts again after them, as it was (over the same origin).
        if latest.is_some_and(|t| t.from_segment != st.from_segment)
            && st.through_segment + 1 == st.from_segment
        {
            tracing::warn!(disk = %disk.id, first = st.from_segment, last, "the new history starts again after the segments an interrupted cycle left");
            let mut st = st;
            st.from_segment = last + 1;
            st.through_segment = last;
            return Ok(st);
        }
        let adopted = match latest {
            Some(tag) if contiguous && tag.from_segment == st.from_segment => self
                .roll_forward_to(st, tag, last)
                .await
                .map_err(|e| e.to_string()),
            Some(tag) if tag.from_segment != st.from_segment => {
                Err("they belong to a history the newest tag is not of".into())
            }
            Some(_) => Err("they do not follow the last shipped segment without a gap".into()),
            None => Err("no tag yet gives the disk's shape".into()),
        };
        match adopted {
            Ok(s) => Ok(s),
            Err(why) => {
                tracing::warn!(disk = %disk.id, reason = %why, "cannot adopt orphan segments; starting a new full copy numbered after them");
                Ok(self.fresh_copy(disk, tag_seq, through.max(last)))
            }
        }
    }

    fn fresh_copy(&self, disk: &DiskConfig, tag_seq: u64, max_seg: u64) -> DiskState {
        let mut s = DiskState::fresh(
            self.config.vm.clone(),
            disk.id.clone(),
            self.config.replication.block_size.0 as u32,
            disk.kind == DiskKind::Directory,
            max_seg + 1,
        );
        s.tag_seq = tag_seq;
        s
    }

    /// Answers processing's request for a new history of the disk (the one from `from` cannot
    /// be completed in the target store): over the tag it offered when it did (a checksum
    /// compare, [`Agent::delta_copy`]), else a full copy. Numbered from the time, like a
    /// history begun afresh, and after the request and every number known here (`through`):
    /// a store written before time-derived numbering may still hold an older history's
    /// higher numbers, which a count from here could meet.
    async fn answer_request(
        &self,
        disk: &DiskConfig,
        tag_seq: u64,
        through: u64,
        from: u64,
        why: &str,
    ) -> Result<DiskState> {
        let start = history_start(now_millis(), through.max(from));
        // An error reaching the store or the state directory fails the cycle (the next one
        // tries again); only an offer that is not usable falls back to a full copy.
        Ok(match self.delta_copy(disk, tag_seq, start, from).await? {
            Offered::Delta(delta) => {
                tracing::warn!(disk = %disk.id, history = from, origin = delta.origin, reason = %why, "a new history is needed; resynchronising by checksum compare with the tag processing offered");
                delta
            }
            Offered::Nothing => {
                tracing::warn!(disk = %disk.id, history = from, reason = %why, "a new history is needed; resynchronising with a new full copy");
                self.fresh_copy(disk, tag_seq, start - 1)
            }
            Offered::Unusable(e) => {
                tracing::warn!(disk = %disk.id, history = from, reason = %why, error = %e, "a new history is needed, and processing's offer cannot be used; resynchronising with a new full copy");
                self.fresh_copy(disk, tag_seq, start - 1)
            }
        })
    }

    /// The history of tag `l` cannot go on here (`why`): a new one numbered after `through`,
    /// over the tag processing offers when it does ([`Agent::answer_or_ask`]), else a full copy.
    async fn restart_history(
        &self,
        disk: &DiskConfig,
        l: &Tag,
        segs: &[u64],
        through: u64,
        why: &str,
    ) -> Result<DiskState> {
        let runs = processing_runs(segs, l);
        match self.answer_or_ask(disk, l.from_segment, runs, why).await? {
            Some((from, asked)) => {
                self.answer_request(disk, l.seq, through, from, &asked)
                    .await
            }
            None => {
                tracing::warn!(disk = %disk.id, reason = %why, "starting a new full copy");
                Ok(self.fresh_copy(disk, l.seq, through))
            }
        }
    }

    /// The history of a disk from `from` cannot go on here (`why`). Where processing runs on
    /// this cache store (`processed`, see [`processing_runs`]), a new history over a tag the
    /// target holds costs only what differs from it, and processing can offer one: its
    /// request when it is in (`Some`: the history it names and why), else an ask for one and
    /// an error while the ask is younger than [`OFFER_WAIT`]. `None`: a full copy now (nothing
    /// processes this cache store, or the wait is over).
    async fn answer_or_ask(
        &self,
        disk: &DiskConfig,
        from: u64,
        processed: bool,
        why: &str,
    ) -> Result<Option<(u64, String)>> {
        let vm = &self.config.vm;
        if let Some(r) = self
            .reader
            .resync_requests(vm, &disk.id)
            .await?
            .into_iter()
            .find(|(f, _)| *f >= from)
        {
            return Ok(Some(r));
        }
        if !processed {
            return Ok(None);
        }
        let name = self.reader.layout().ask(vm, &disk.id, from);
        let backend = self.reader.backend();
        let now = now_millis();
        let asked = match backend.get(&name).await {
            // An unreadable time (damage) counts as a wait that is over.
            Ok(b) => String::from_utf8_lossy(&b)
                .lines()
                .next()
                .and_then(|l| l.parse::<u64>().ok())
                .unwrap_or(0),
            Err(e) if e.kind == ErrorKind::NotFound => {
                match backend.put_new(&name, format!("{now}\n{why}").into()).await {
                    Ok(()) => {
                        tracing::warn!(disk = %disk.id, history = from, reason = %why, "asked processing for a tag to resynchronise over (a checksum compare)");
                        now
                    }
                    Err(e) if e.kind == ErrorKind::AlreadyExists => now,
                    // A credential that may not write there: nobody can be asked.
                    Err(e) if matches!(e.kind, ErrorKind::Denied | ErrorKind::Permanent) => {
                        tracing::warn!(disk = %disk.id, error = %e, "cannot ask processing for a tag to resynchronise over");
                        return Ok(None);
                    }
                    // Anything else is worth another try next cycle.
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let waited = Duration::from_millis(now.saturating_sub(asked));
        // An ask timed in the future (this clock stepped back since) counts as a wait that is
        // over: a skew must not stretch it.
        if asked <= now && waited < OFFER_WAIT {
            bail!(
                "{why}; disk {} waits for processing to offer a tag to resynchronise over (a checksum compare): asked {} ago, a full copy if none comes within {}",
                disk.id,
                humantime::format_duration(Duration::from_secs(waited.as_secs())),
                humantime::format_duration(OFFER_WAIT)
            );
        }
        Ok(None)
    }

    /// A new history from segment `start` that lies over the tag processing offered with its
    /// request for a new history of `from` (the resync sums beside it): the state holds that
    /// tag's block hashes and no tracking position, so the next pass scans the disk and ships
    /// only the blocks that differ from it — a checksum compare, where a full copy ships every
    /// block. An error is one reaching the store or the state directory (the cycle fails and
    /// the next one tries again).
    async fn delta_copy(
        &self,
        disk: &DiskConfig,
        tag_seq: u64,
        start: u64,
        from: u64,
    ) -> Result<Offered> {
        const CHUNK: u64 = 8 << 20;
        let name = self
            .reader
            .layout()
            .resync_sums(&self.config.vm, &disk.id, from);
        let backend = self.reader.backend();
        let len = match backend.head(&name).await {
            Ok(m) => m.size,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(Offered::Nothing),
            Err(e) => return Err(e.into()),
        };
        // Through a file: the sums of a large disk (32 bytes a block and then some) need not
        // fit in memory.
        let mut file = tempfile::tempfile_in(&self.config.state_dir)?;
        let mut at = 0;
        while at < len {
            let end = (at + CHUNK).min(len);
            let bytes = match backend.get_range(&name, at..end).await {
                Ok(b) => b,
                // Withdrawn meanwhile: the request went with it.
                Err(e) if e.kind == ErrorKind::NotFound => return Ok(Offered::Nothing),
                Err(e) => return Err(e.into()),
            };
            // Sums are create-only: a short read is the transport's, worth another try.
            if bytes.len() as u64 != end - at {
                bail!(
                    "{name} came back short ({} of {} bytes)",
                    bytes.len(),
                    end - at
                );
            }
            tokio::task::block_in_place(|| io::Write::write_all(&mut file, &bytes))?;
            at = end;
        }
        let mut st = self.fresh_copy(disk, tag_seq, start - 1);
        let next_tag = if tag_seq == 0 { start } else { tag_seq + 1 };
        let (dir, bs) = (self.config.state_dir.clone(), u64::from(st.block_size));
        let directory = disk.kind == DiskKind::Directory;
        let disk_id = disk.id.to_string();
        let decoded =
            tokio::task::spawn_blocking(move || -> Result<Result<(u64, Content), String>> {
                io::Seek::seek(&mut file, io::SeekFrom::Start(0))?;
                let r = io::BufReader::new(file);
                let mut image: Option<crate::blocks::NewHashes> = None;
                let mut batch = Vec::new();
                // Where the entries stand: the target, the next block it must have, and whether
                // the last one was whole (only a target's last block may be short).
                let (mut at_target, mut next, mut whole, mut size) = (None, 0u64, true, 0u64);
                let mut files: BTreeMap<String, FileState> = BTreeMap::new();
                // An error of the state directory (full, failing) is not the offer's fault: kept
                // here, it fails the cycle for another try instead of costing a full copy.
                let mut local: Option<io::Error> = None;
                let header = match lifeboat_store::sums::decode(name.as_str(), r, len, |h, e| {
                    if u64::from(h.block_size) != bs {
                        return Err(format!("block size {} is not this disk's", h.block_size));
                    }
                    let target = &h.targets[e.target as usize];
                    if directory == target.is_empty() {
                        return Err("the sums are of another kind of disk".into());
                    }
                    if at_target != Some(e.target) {
                        (at_target, next, whole) = (Some(e.target), 0, true);
                    }
                    if e.offset / bs != next || !whole {
                        return Err(format!("no block at {} of {target:?}", next * bs));
                    }
                    next += 1;
                    whole = u64::from(e.length) == bs;
                    size = e.offset + u64::from(e.length);
                    if directory {
                        let f = files.entry(target.clone()).or_insert(FileState {
                            size: 0,
                            stamp: None,
                            hashes: Hashes::default(),
                        });
                        f.hashes.0.push(e.hash);
                        f.size = size;
                        return Ok(());
                    }
                    if image.is_none() {
                        match crate::blocks::NewHashes::create(&dir, h.entries) {
                            Ok(n) => image = Some(n),
                            Err(e) => {
                                let what = e.to_string();
                                local = Some(e);
                                return Err(what);
                            }
                        }
                    }
                    batch.push(e.hash);
                    if batch.len() == 4096 {
                        let first = next - batch.len() as u64;
                        let wrote = image.as_ref().expect("created").write_at(first, &batch);
                        if let Err(e) = wrote {
                            let what = e.to_string();
                            local = Some(e);
                            return Err(what);
                        }
                        batch.clear();
                    }
                    Ok(())
                }) {
                    Ok(h) => h,
                    Err(e) => {
                        if let Some(io) = local {
                            return Err(io.into());
                        }
                        return Ok(Err(e.to_string()));
                    }
                };
                // What no entry could say (sums of an empty disk): its kind and block size.
                if u64::from(header.block_size) != bs {
                    return Ok(Err(format!(
                        "block size {} is not this disk's",
                        header.block_size
                    )));
                }
                if header.targets.iter().any(|t| t.is_empty() == directory) {
                    return Ok(Err("the sums are of another kind of disk".into()));
                }
                let content = if directory {
                    Content::Directory { files }
                } else {
                    let hashes = match image {
                        Some(h) => {
                            h.write_at(next - batch.len() as u64, &batch)?;
                            h.finish(&dir, &disk_id)?
                        }
                        None => BlockHashes::default(),
                    };
                    Content::Image { size, hashes }
                };
                Ok(Ok((header.origin, content)))
            })
            .await??;
        let (origin, content) = match decoded {
            Ok(d) => d,
            Err(why) => return Ok(Offered::Unusable(why)),
        };
        if origin >= next_tag {
            return Ok(Offered::Unusable(format!(
                "the offered tag {origin} is not before this history's first tag {next_tag}"
            )));
        }
        st.content = content;
        st.origin = Some(origin);
        Ok(Offered::Delta(st))
    }

    /// Applies the block hashes of segments `st.through_segment+1 ..= tag.through_segment` (read
    /// from their indexes, no data) so `st` describes the disk as of `tag`.
    async fn roll_forward(&self, st: DiskState, tag: &Tag) -> Result<DiskState> {
        self.roll_forward_to(st, tag, tag.through_segment).await
    }

    /// [`Agent::roll_forward`] through segment `through`, which may lie past the tag (orphans
    /// adopted): the disk's shape is the tag's, and the state covers `..=through`.
    async fn roll_forward_to(
        &self,
        mut st: DiskState,
        tag: &Tag,
        through: u64,
    ) -> Result<DiskState> {
        let vm = &self.config.vm;
        let bs = tag.block_size as u64;
        let start = (st.through_segment + 1).max(tag.from_segment);
        let mut files: BTreeMap<String, BTreeMap<u64, [u8; 32]>> = BTreeMap::new();
        let (dir, disk) = (&self.config.state_dir, tag.disk.as_str());
        // Blocks past the tag's size (written before the disk shrank) go.
        let blocks = match &tag.shape {
            DiskShape::Image { size } => size.div_ceil(bs),
            DiskShape::Directory { .. } => 0,
        };
        for seq in start..=through {
            let (targets, entries) = self.reader.segment_index(vm, &tag.disk, seq).await?;
            for e in entries {
                let t = &targets[e.target as usize];
                if t.is_empty() {
                    // Applied as read (later segments overwrite earlier ones): the hashes of a
                    // long history need not fit in memory.
                    if let Content::Image { hashes, .. } = &mut st.content
                        && e.offset / bs < blocks
                    {
                        hashes.set(e.offset / bs, e.hash);
                    }
                } else {
                    files
                        .entry(t.clone())
                        .or_default()
                        .insert(e.offset / bs, e.hash);
                }
            }
            if let Content::Image { hashes, .. } = &mut st.content {
                tokio::task::block_in_place(|| hashes.merge_if_large(dir, disk))?;
            }
        }
        match (&mut st.content, &tag.shape) {
            (Content::Image { size, hashes }, DiskShape::Image { size: new_size }) => {
                hashes.resize(new_size.div_ceil(bs));
                *size = *new_size;
            }
            (Content::Directory { files: known }, DiskShape::Directory { tree }) => {
                let tree = self.reader.tree(vm, &tag.disk, tree).await?;
                let mut next = BTreeMap::new();
                for e in tree.entries {
                    let lifeboat_store::manifest::EntryKind::File { size } = e.kind else {
                        continue;
                    };
                    let n = size.div_ceil(bs) as usize;
                    let mut hashes = known
                        .get(&e.path)
                        .map(|f| f.hashes.0.clone())
                        .unwrap_or_default();
                    hashes.resize(n, [0; 32]);
                    if let Some(updates) = files.get(&e.path) {
                        for (&i, &h) in updates {
                            if (i as usize) < n {
                                hashes[i as usize] = h;
                            }
                        }
                    }
                    // Stamp unknown: the next scan re-reads the file and compares hashes.
                    next.insert(
                        e.path,
                        FileState {
                            size,
                            stamp: None,
                            hashes: Hashes(hashes),
                        },
                    );
                }
                *known = next;
            }
            _ => bail!("tag {} of disk {} has another disk kind", tag.seq, tag.disk),
        }
        st.tag_seq = tag.seq;
        st.from_segment = tag.from_segment;
        st.through_segment = through;
        st.origin = tag.origin;
        // The hashes now describe the tag, which may come from a timeline the tracker's
        // position never saw (a VM reverted to a snapshot): the next pass scans.
        st.tracking = None;
        Ok(st)
    }

    /// Scans a disk against `st` and ships what changed: uploaded as it goes
    /// ([`ShipMode::Upload`]), or kept in memory to upload after a thaw ([`ShipMode::Collect`]).
    /// `st.content` becomes the disk as scanned; in upload mode `st.through_segment` advances
    /// past the uploaded segments. Nothing is tagged and no state is saved here.
    pub async fn ship(
        &self,
        disk: &DiskConfig,
        st: &mut DiskState,
        mode: ShipMode,
        hints: Hints,
    ) -> Result<Shipped> {
        let r = &self.config.replication;
        let bs = r.block_size.0 as usize;
        let level = r.zstd_level;
        let seg_target = r.segment_size.0 as usize;
        // A segment is cut once it reaches the target, so it never exceeds it by more than a
        // block (stored raw at worst) plus its index.
        let seg_capacity = seg_target + 2 * bs + (64 << 10);
        // Blocks per segment, whatever they encode to: all-zero blocks cost an index entry
        // (61 bytes) and no payload, so without a cap a sparse disk's first copy would put
        // 130,000 of them in one segment (and its index and checkpoint list in memory). 16,384
        // keeps a segment's index near 1 MiB.
        const SEGMENT_BLOCKS: usize = 16_384;
        // The memory cap bounds finished segments: one being built, one being uploaded, the
        // rest queued between them.
        let in_flight = ((r.memory_cap.0 / r.segment_size.0) as usize)
            .saturating_sub(2)
            .max(1);
        let (tx, mut rx) = mpsc::channel::<Outgoing>(in_flight);
        let (collect_cap, stop_at) = match mode {
            ShipMode::Upload => (None, None),
            ShipMode::Collect { cap, deadline } => (Some(cap), Some(deadline)),
        };

        // Receiver: uploads segments in order, numbered after the last one shipped — or, when
        // collecting, keeps them (bounded by the cap).
        let writer = self.writer.clone();
        let (vm, disk_id) = (self.config.vm.clone(), disk.id.clone());
        let first_seq = st.through_segment + 1;
        let limit = r.bandwidth_limit.map(|b| b.0);
        // Plain bytes of the segments uploaded so far.
        let shipped = Arc::new(AtomicU64::new(0));
        // A total is known for the initial copy of an image: every block ships.
        let total = match disk.kind {
            _ if st.tag_seq > 0 => 0,
            DiskKind::Directory => 0,
            _ => scan::device_size(&disk.path).unwrap_or(0),
        };
        let progress = Arc::clone(&shipped);
        // Plain bytes of changed blocks found by the scan; minus `shipped`, the backlog.
        let found = Arc::new(AtomicU64::new(0));
        let found_by_scan = Arc::clone(&found);
        let state_dir = self.config.state_dir.clone();
        let phase = if collect_cap.is_some() {
            "capturing"
        } else {
            "shipping"
        };
        let key = disk.id.to_string();
        let report = move |done: u64, rate: f64, phase: &str| {
            let backlog = found.load(Ordering::Relaxed).saturating_sub(done);
            crate::progress::update(&state_dir, |s| {
                let d = s.disks.entry(key.clone()).or_default();
                d.phase = phase.to_owned();
                d.backlog_bytes = backlog;
                d.done = done;
                d.total = total;
                d.rate_bytes_per_s = rate;
                d.eta_s =
                    (total > done && rate > 0.0).then(|| ((total - done) as f64 / rate) as u64);
            })
        };
        report(0, 0.0, phase);
        let plan = match disk.kind {
            DiskKind::Directory => None,
            // Reads the tracker's maps and sysfs: blocking, but short (a few ms per TiB).
            _ => Some(tokio::task::block_in_place(|| {
                self.plan(disk, st, hints.reread_all)
            })),
        };
        let (listed, next_cursor, how) = match plan {
            None => (None, None, String::new()),
            Some(Plan::Scan { cursor, why }) => (None, cursor, format!("scan: {why}")),
            Some(Plan::Listed { blocks, cursor }) => {
                let how = format!("ebpf: {} blocks written since the last pass", blocks.len());
                (Some(blocks), Some(cursor), how)
            }
        };
        if !how.is_empty() {
            tracing::debug!(disk = %disk.id, tracking = %how, "pass");
            let key = disk.id.to_string();
            crate::progress::update(&self.config.state_dir, |s| {
                s.disks.entry(key).or_default().tracking = how;
            });
        }
        // Checkpoints make a long pass resumable: every so often, the state is saved as
        // "segments up to here are shipped, and this is what they hold".
        // A checkpoint needs its own copy of the state (the pass takes the block hashes), so
        // only passes that can be long keep one: a tracked pass reads only what was written
        // since the last one, and if it dies the last tag's state still stands.
        let mut checkpoint = (collect_cap.is_none() && listed.is_none()).then(|| st.clone());
        let state_dir_ck = self.config.state_dir.clone();
        let receiver = tokio::spawn(async move {
            let mut seq = first_seq;
            let mut last_checkpoint = Instant::now();
            let mut stored = 0u64;
            let mut kept = Vec::new();
            let t0 = Instant::now();
            let mut last_log = Instant::now();
            while let Some(Outgoing {
                data,
                plain,
                blocks,
                files,
            }) = rx.recv().await
            {
                let len = data.len() as u64;
                stored += len;
                if let Some(cap) = collect_cap {
                    if stored > cap {
                        bail!(
                            "changes captured during the freeze exceed the memory cap ({cap} bytes)"
                        );
                    }
                    kept.push(data);
                    continue;
                }
                writer.put_segment(&vm, &disk_id, seq, data).await?;
                progress.fetch_add(plain, Ordering::Relaxed);
                if let Some(ck) = checkpoint.as_mut() {
                    match &mut ck.content {
                        Content::Image { hashes, .. } => {
                            for (offset, h) in blocks {
                                hashes.set(offset / bs as u64, h);
                            }
                        }
                        Content::Directory { files: durable } => durable.extend(files),
                    }
                    ck.through_segment = seq;
                    // A merge (the overlay outgrew its cap: a long first copy) and a save are
                    // file writes; keep them off the async workers' queue.
                    if last_checkpoint.elapsed() > CHECKPOINT_EVERY {
                        last_checkpoint = Instant::now();
                        tokio::task::block_in_place(|| state::save(&state_dir_ck, ck))?;
                    } else if let Content::Image { hashes, .. } = &mut ck.content
                        && hashes.needs_merge()
                    {
                        let disk = ck.disk.to_string();
                        tokio::task::block_in_place(|| hashes.merge(&state_dir_ck, &disk))?;
                    }
                }
                seq += 1;
                if let Some(limit) = limit {
                    let due = Duration::from_secs_f64(stored as f64 / limit as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                if last_log.elapsed() > Duration::from_secs(2) {
                    last_log = Instant::now();
                    let done = progress.load(Ordering::Relaxed);
                    let rate = done as f64 / t0.elapsed().as_secs_f64().max(1e-3);
                    report(done, rate, phase);
                    if total > 0 {
                        let eta = (total.saturating_sub(done)) as f64 / rate.max(1.0);
                        tracing::info!(disk = %disk_id, done, total, rate_mb_s = rate / 1e6, eta_s = eta as u64, "replication progress");
                    }
                }
            }
            let done = progress.load(Ordering::Relaxed);
            report(
                done,
                done as f64 / t0.elapsed().as_secs_f64().max(1e-3),
                "idle",
            );
            anyhow::Ok((seq - first_seq, stored, kept))
        });

        // Scanner on a blocking thread; hands full segments on, blocking when the receiver
        // lags (backpressure under the memory cap).
        let path = disk.path.clone();
        let kind = disk.kind;
        // Block devices are read past their page cache (see `scan`'s module docs).
        let direct = kind == DiskKind::BlockDevice;
        // Moved, not copied: an image's block hashes are as large as the disk is (32 bytes a
        // block). A failed pass leaves `st` without them; every caller then drops `st` (the
        // durable state on disk is untouched) or falls back to its own earlier copy.
        let content = std::mem::replace(
            &mut st.content,
            Content::Image {
                size: 0,
                hashes: BlockHashes::default(),
            },
        );
        let threads = r.scan_threads;
        let (home_dir, home_disk) = (self.config.state_dir.clone(), disk.id.to_string());
        let scan = tokio::task::spawn_blocking(
            move || -> Result<(Content, Shape, ScanStats, Vec<String>)> {
                let started = Instant::now();
                let mut stats = ScanStats::default();
                let mut builder = SegmentBuilder::with_capacity(bs as u32, level, seg_capacity);
                let mut blocks = Vec::new();
                // Files whose every changed block is in the segment being built (or an earlier one):
                // durable once that segment is.
                let done_files = std::cell::RefCell::new(Vec::new());
                let mut file_done = |rel: &str, f: &FileState| {
                    done_files.borrow_mut().push((rel.to_owned(), f.clone()));
                };
                let mut sink = |target: &str, offset: u64, data: &[u8], h| -> io::Result<()> {
                    builder.add_hashed(target, offset, data, h);
                    found_by_scan.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if target.is_empty() {
                        blocks.push((offset, h));
                    }
                    if builder.encoded_len() >= seg_target || builder.len() >= SEGMENT_BLOCKS {
                        let full = std::mem::replace(
                            &mut builder,
                            SegmentBuilder::with_capacity(bs as u32, level, seg_capacity),
                        );
                        tx.blocking_send(Outgoing {
                            plain: full.plain_bytes(),
                            data: full.finish(),
                            blocks: std::mem::take(&mut blocks),
                            files: std::mem::take(&mut *done_files.borrow_mut()),
                        })
                        .map_err(|_| io::Error::other("segment receiver stopped"))?;
                    }
                    Ok(())
                };
                let mut linked = Vec::new();
                let (content, shape) = match (kind, content) {
                    (DiskKind::Directory, Content::Directory { files }) => {
                        let mut hints = hints;
                        let since = hints.since.take();
                        let mut pass = scan::DirPass {
                            hints: &hints,
                            stop_at,
                            file_done: &mut file_done,
                        };
                        let found = match since {
                            // A frozen capture whose events are complete: only what changed.
                            Some(since) => {
                                let changes = crate::dirdelta::Changes {
                                    reread: hints.dirty.iter().cloned().collect(),
                                    restat: since.linked.into_iter().collect(),
                                };
                                crate::dirdelta::capture(
                                    &path, bs, since.tree, files, &changes, &mut pass, &mut stats,
                                    &mut sink,
                                )
                            }
                            None => scan::scan_directory(
                                &path, bs, &files, &mut pass, &mut stats, &mut sink,
                            ),
                        }
                        .with_context(|| format!("cannot scan directory {}", path.display()))?;
                        linked = found.linked;
                        (
                            Content::Directory { files: found.files },
                            Shape::Tree(found.tree),
                        )
                    }
                    (_, Content::Image { mut hashes, size }) if listed.is_some() => {
                        let blocks = listed.as_deref().unwrap_or_default();
                        scan::scan_listed(
                            &path,
                            direct,
                            bs,
                            size,
                            blocks,
                            &mut hashes,
                            (&home_dir, &home_disk),
                            stop_at,
                            &mut stats,
                            &mut sink,
                        )
                        .with_context(|| format!("cannot read disk {}", path.display()))?;
                        (Content::Image { size, hashes }, Shape::Size(size))
                    }
                    (_, Content::Image { hashes, .. }) => {
                        let (size, hashes) = scan::scan_image(
                            &path,
                            direct,
                            bs,
                            &hashes,
                            // Frozen: no file may be written (see `scan_image`).
                            stop_at
                                .is_none()
                                .then_some((home_dir.as_path(), home_disk.as_str())),
                            threads,
                            stop_at,
                            &mut stats,
                            &mut sink,
                        )
                        .with_context(|| format!("cannot read disk {}", path.display()))?;
                        (Content::Image { size, hashes }, Shape::Size(size))
                    }
                    _ => bail!("disk kind changed under a running agent"),
                };
                if !builder.is_empty() {
                    tx.blocking_send(Outgoing {
                        plain: builder.plain_bytes(),
                        data: builder.finish(),
                        blocks,
                        files: done_files.into_inner(),
                    })
                    .map_err(|_| anyhow::anyhow!("segment receiver stopped"))?;
                }
                stats.elapsed = started.elapsed();
                Ok((content, shape, stats, linked))
            },
        );
        let scan_result = scan.await.context("scanner thread failed")?;
        let received = receiver.await.context("segment receiver failed")?;
        // The receiver's error (upload failure, cap) explains a scanner's "receiver stopped".
        let (uploaded, stored_bytes, kept) = received?;
        let (content, shape, stats, linked) = scan_result?;
        st.content = content;
        if disk.kind != DiskKind::Directory {
            st.tracking = next_cursor;
        }
        st.through_segment += uploaded;
        Ok(Shipped {
            shape,
            stats,
            stored_bytes,
            kept,
            linked,
        })
    }

    /// Uploads segments kept by a [`ShipMode::Collect`] pass, after the thaw.
    pub async fn upload_kept(
        &self,
        disk: &DiskConfig,
        st: &mut DiskState,
        kept: Vec<Bytes>,
    ) -> Result<u64> {
        let n = kept.len() as u64;
        for data in kept {
            self.writer
                .put_segment(&self.config.vm, &disk.id, st.through_segment + 1, data)
                .await?;
            st.through_segment += 1;
        }
        Ok(n)
    }

    /// Writes a disk's tag over everything shipped so far, then makes the state durable.
    pub async fn write_tag(
        &self,
        disk: &DiskConfig,
        st: &mut DiskState,
        shape: Shape,
        time: u64,
        consistency: Consistency,
    ) -> Result<Tag> {
        // Segments up to the previous tag's were checked when it was written (and processing
        // may have moved them to the target since); check what this tag adds.
        let previous = match st.tag_seq {
            0 => None,
            prev => self.reader.tag(&self.config.vm, &disk.id, prev).await.ok(),
        };
        let shape = match shape {
            Shape::Size(size) => DiskShape::Image { size },
            Shape::Tree(tree) => {
                let hash = tree.encode().0;
                let noted = self
                    .damaged_trees
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&hash);
                // An unchanged directory names the listing its previous tag named: every
                // point from here on would share a damaged copy, so what is stored is compared
                // (a read of what a changed directory writes each cycle) and replaced.
                let reused = previous.as_ref().is_some_and(
                    |p| matches!(&p.shape, DiskShape::Directory { tree } if *tree == hash),
                );
                let damaged = noted || reused;
                DiskShape::Directory {
                    tree: if damaged {
                        match self
                            .writer
                            .replace_tree(&self.config.vm, &disk.id, &tree)
                            .await
                        {
                            Ok(hash) => hash,
                            // May not delete (a container SAS without `d`): the damaged copy
                            // stays; processing, which may, removes it when it meets it, and a
                            // later tag writes it whole.
                            Err(lifeboat_store::Error::Store(e))
                                if e.kind == lifeboat_store::ErrorKind::Denied =>
                            {
                                tracing::warn!(disk = %disk.id, error = %e, "cannot replace a damaged directory listing in the cache store (no delete permission); processing will");
                                hash
                            }
                            Err(e) => return Err(e.into()),
                        }
                    } else {
                        self.writer
                            .put_tree(&self.config.vm, &disk.id, &tree)
                            .await?
                    },
                }
            }
        };
        let tag = Tag {
            vm: self.config.vm.clone(),
            disk: disk.id.clone(),
            // The first tag of a history takes the number of its first segment (see
            // [`history_start`]); later ones count up from the previous tag.
            seq: match st.tag_seq {
                0 => st.from_segment,
                prev => prev + 1,
            },
            from_segment: st.from_segment,
            through_segment: st.through_segment,
            time,
            consistency,
            block_size: st.block_size,
            shape,
            origin: st.origin,
        };
        let first = match &previous {
            Some(p) if p.from_segment == tag.from_segment => p.through_segment + 1,
            _ => 0,
        };
        // Times only grow within a disk's history: after a clock step back, a point timed
        // before the latest processed one would be taken for a pruned one and never processed.
        let mut tag = tag;
        if let Some(p) = &previous
            && tag.time <= p.time
        {
            tracing::warn!(disk = %disk.id, clock = tag.time, previous = p.time, "the clock is behind the previous tag's time (stepped back?); timing this tag just after it");
            tag.time = p.time + 1;
        }
        self.writer.put_tag_checking_from(&tag, first).await?;
        st.tag_seq = tag.seq;
        state::save(&self.config.state_dir, st)?;
        Ok(tag)
    }

    /// Publishes a single-VM recovery point over the given tags.
    pub async fn publish_local_point(
        &self,
        tags: &[Tag],
        kind: PointKind,
    ) -> Result<RecoveryPoint> {
        let time = tags.iter().map(|t| t.time).min().unwrap_or_else(now_millis);
        let consistency = tags
            .iter()
            .map(|t| t.consistency)
            .min()
            .unwrap_or(Consistency::NotFrozen);
        let id = PointId::new(format!(
            "{}-{}-t{}",
            self.config.vm,
            time,
            tags.iter().map(|t| t.seq).max().unwrap_or(0)
        ))?;
        let point = RecoveryPoint {
            id,
            group: self.config.group.clone(),
            time,
            kind,
            multi_vm: false,
            members: vec![Member {
                vm: self.config.vm.clone(),
                disks: tags
                    .iter()
                    .map(|t| DiskRef {
                        disk: t.disk.clone(),
                        tag: t.seq,
                    })
                    .collect(),
                consistency,
            }],
            excluded: vec![],
        };
        self.writer.put_point(&point).await?;
        Ok(point)
    }
}

/// A finished segment on its way to the receiver, with what the checkpoint needs: the
/// (offset, hash) of its image blocks, and the directory files completed by the time it was cut.
struct Outgoing {
    data: Bytes,
    plain: u64,
    blocks: Vec<(u64, Hash)>,
    files: Vec<(String, FileState)>,
}

/// How often a long pass saves a resumable checkpoint.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

/// What a scan says about the disk's shape, before the tree (if any) is stored.
#[derive(Debug)]
pub enum Shape {
    Size(u64),
    Tree(lifeboat_store::manifest::Tree),
}

/// How [`Agent::ship`] handles finished segments.
#[derive(Debug, Clone, Copy)]
pub enum ShipMode {
    /// Upload as they are made (pre-copy, unfrozen).
    Upload,
    /// Keep in memory, at most `cap` bytes, and stop at `deadline` (the frozen capture).
    Collect { cap: u64, deadline: Instant },
}

/// What [`Agent::ship`] did.
#[derive(Debug)]
pub struct Shipped {
    pub shape: Shape,
    pub stats: ScanStats,
    pub stored_bytes: u64,
    pub kept: Vec<Bytes>,
    /// A directory's files with more than one hard link (see `watch::Since`).
    pub linked: Vec<String>,
}

/// What [`Agent::check_cache`] found.
/// What processing offered a disk's new history ([`Agent::delta_copy`]).
enum Offered {
    /// No sums beside the request: a full copy.
    Nothing,
    /// Sums that cannot be used here, and why: a full copy.
    Unusable(String),
    /// The new history's state, over the offered tag.
    Delta(DiskState),
}

/// Whether segments of the history from `from` were processed out of the cache store (the
/// lowest of its segments the cache holds is past its first, or it holds none): where that
/// happened, processing runs and can offer a tag to resynchronise over.
fn processed_out(segs: &[u64], from: u64) -> bool {
    segs.iter()
        .find(|&&s| s >= from)
        .is_none_or(|&lowest| lowest > from)
}

/// [`processed_out`] for the history of `tag`, or a history over an origin (which processing
/// offered, so it runs here).
fn processing_runs(segs: &[u64], tag: &Tag) -> bool {
    processed_out(segs, tag.from_segment) || tag.origin.is_some()
}

/// How long a disk whose history cannot go on waits, after asking, for processing's offer of a
/// tag to resynchronise over before it makes a full copy (processing runs at most an hour
/// apart).
const OFFER_WAIT: Duration = Duration::from_secs(3600);

enum Checked {
    Intact,
    /// Gone or damaged: the history cannot go on.
    Lost(String),
}

/// Bits of a history's first number below its start time: a history may write 2^20 segments
/// per millisecond that passed before the next history of the disk began without meeting it.
const HISTORY_SHIFT: u32 = 20;

/// First segment (and tag) number of a new history of a disk begun at `now` (Unix ms): the time
/// in the high bits, so a history begun later, by a VM that lost its state and its cache store,
/// never reuses a number an earlier one published to the target. Past `max_seg` (segments
/// already in this cache store) in any case. Overflows in the year 2527; saturates there.
pub fn history_start(now: u64, max_seg: u64) -> u64 {
    now.checked_shl(HISTORY_SHIFT)
        .filter(|n| n >> HISTORY_SHIFT == now)
        .unwrap_or(u64::MAX / 2)
        .max(max_seg)
        + 1
}

/// Checks that a disk's path is there and of the configured kind, with an actionable message.
pub fn check_disk_path(disk: &DiskConfig) -> Result<()> {
    let p: &Path = &disk.path;
    let m = std::fs::metadata(p)
        .with_context(|| format!("disk {}: cannot access {}", disk.id, p.display()))?;
    let ok = match disk.kind {
        DiskKind::Directory => m.is_dir(),
        DiskKind::Image => m.is_file(),
        DiskKind::BlockDevice => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_block_device()
            }
            #[cfg(not(unix))]
            {
                true
            }
        }
    };
    if !ok {
        bail!(
            "disk {}: {} is not a {}",
            disk.id,
            p.display(),
            match disk.kind {
                DiskKind::Directory => "directory",
                DiskKind::Image => "regular file (disk image)",
                DiskKind::BlockDevice => "block device",
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::history_start;

    #[test]
    fn histories_begun_later_start_past_any_number_an_earlier_one_could_reach() {
        let t = 1_796_000_000_000; // December 2026, in ms
        let a = history_start(t, 0);
        let b = history_start(t + 1, 0);
        assert!(b > a + (1 << 19), "{a} {b}");
        // Segments already in the cache store are never reused.
        assert_eq!(history_start(0, 41), 42);
        assert_eq!(history_start(t, u64::MAX / 2 + 5), u64::MAX / 2 + 6);
        // A clock far in the future saturates instead of wrapping.
        assert!(history_start(u64::MAX / 4, 0) > a);
    }
}
