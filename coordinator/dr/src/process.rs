//! Processing: moves a group's recovery points from the cache store (source region) into the
//! target store (DR region) and publishes them there, following the store's write ordering —
//! segments, then the tree, then the tag, then the point, create-only — so the target alone
//! restores every point it lists, with the cache store and the coordinator gone.
//!
//! Every object is verified (segment checksums, manifest hashes) on the way: damage in the
//! cache is reported naming the object, never copied. A pass can be interrupted at any moment:
//! what it copied is re-checked, not duplicated, and a point is published exactly once because
//! point objects are create-only. Cache objects are not deleted yet (see the note in
//! `docs/format.md`, write rule 7).
//!
//! Retention ([`Processor::prune`]) deletes expired points from the target, then the tags,
//! trees and segments no kept point needs — in that order, so an interrupted prune leaves only
//! unreferenced objects, which the next prune removes. The newest point is always kept: when no
//! new points can be made, old ones outlive retention rather than leaving none. Before deleting
//! segments, a prune compacts the disk at its oldest kept tag into a base
//! (`lifeboat_store::compact`) once enough segments lie behind it: kept points then restore from
//! the base plus the segments after it, and storage stays bounded under steady churn.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::{Context, Result};
use lifeboat_store::compact::compact;
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{Base, DiskShape, RecoveryPoint, Tag, now_millis};
use lifeboat_store::restore::{StoreReader, sources_for};
use lifeboat_store::writer::StoreWriter;
use lifeboat_store::{DiskId, DynBackend, ErrorKind, GroupId, PointId, VmId};

/// What trimming the cache store deleted.
#[derive(Debug, Default, Clone)]
pub struct Trimmed {
    pub points: u64,
    pub tags: u64,
    pub trees: u64,
    pub segments: u64,
    pub bytes: u64,
    /// Points and segments left in place because the target holds another version of them.
    pub conflicts: u64,
}

/// What a prune deleted.
#[derive(Debug, Default, Clone)]
pub struct Pruned {
    pub points: Vec<PointId>,
    pub tags: u64,
    pub trees: u64,
    pub segments: u64,
    pub kept: usize,
    /// Bases written (compactions) and deleted.
    pub bases: u64,
    pub bases_deleted: u64,
    /// Parts of bases whose compaction never finished.
    pub orphan_parts: u64,
    /// Points that cannot be read, with why (each names its object).
    pub damaged: Vec<String>,
    /// Disks whose agent was asked for a new history, as in [`Pass::resyncs`].
    pub resyncs: Vec<Resync>,
}

/// What a scrub of the target store found and did.
#[derive(Debug, Default, Clone)]
pub struct Scrubbed {
    /// Objects checked and bytes read (every object whole: segments, base parts, manifests).
    pub objects: u64,
    pub bytes: u64,
    /// Points the scrub found damaged, with the first damaged object each reads.
    pub damaged: Vec<(PointId, String)>,
    /// Damage records removed (their point whole again, or gone).
    pub cleared: u64,
    /// Disks whose agent was asked for a new history: the damage is in what their newest tag
    /// reads, so every later tag would read it too.
    pub resyncs: Vec<Resync>,
    pub elapsed: std::time::Duration,
}

/// Compact once this many segments lie between the oldest kept tag and its current base.
pub const COMPACT_AFTER_SEGMENTS: u64 = 4;
/// Size of a base's parts.
const BASE_PART_BYTES: usize = 64 << 20;

/// What the coordinator's processing loop last did, for `lifeboat members`.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// Newest point published in the target, and its time.
    pub latest_processed: Option<(PointId, u64)>,
    /// When the last pass ended (Unix ms).
    pub last_pass_ms: Option<u64>,
    /// The last step that failed, with its error; cleared by a clean round.
    pub last_error: Option<String>,
}

/// The two stores of a group.
#[derive(Debug, Clone)]
pub struct Processor {
    cache: StoreReader,
    target: StoreReader,
    writer: StoreWriter,
    /// Whether `cache` is a real cache store, where resync requests go (not so for a
    /// retention-only processor, whose "cache" is the target itself).
    asks: bool,
}

/// What one pass did, and the figures ASR reports.
#[derive(Debug, Default, Clone)]
pub struct Pass {
    pub points: Vec<PointId>,
    pub segments: u64,
    pub bytes: u64,
    pub elapsed: std::time::Duration,
    /// Newest point published in the target.
    pub latest_processed: Option<(PointId, u64)>,
    /// Per VM: now − time of the newest tag of its disks in the cache store (ms).
    pub rpo_ms: BTreeMap<VmId, u64>,
    /// Points not processed, and why: their data cannot be copied as it is (damaged or
    /// missing objects, another history under the same names). Newer points were still
    /// processed; a quarantined point is retried by every pass until a newer published point
    /// covering its VMs supersedes it.
    pub quarantined: Vec<(PointId, String)>,
    /// Disks whose agent this pass asked for a new history (resync requests written), with
    /// the first segment of the history the target cannot complete.
    pub resyncs: Vec<Resync>,
}

impl Processor {
    pub fn new(group: GroupId, cache: DynBackend, target: DynBackend) -> Self {
        let layout = Layout::new(group);
        Processor {
            cache: StoreReader::new(cache, layout.clone()).without_damage_records(),
            target: StoreReader::new(target.clone(), layout.clone()),
            writer: StoreWriter::new(target, layout),
            asks: true,
        }
    }

    /// A processor for retention alone ([`Processor::prune`]) when no cache store is at hand:
    /// it reports a history it cannot keep but cannot ask its agent for a new one.
    pub fn retention_only(group: GroupId, target: DynBackend) -> Self {
        Processor {
            asks: false,
            ..Processor::new(group, target.clone(), target)
        }
    }

    /// Ids of the points already published in the target.
    async fn published(&self) -> Result<BTreeSet<String>> {
        let list = self
            .target
            .backend()
            .list(&self.target.layout().points())
            .await?;
        Ok(list
            .iter()
            .filter_map(|m| {
                let n = m.name.as_str();
                n.rsplit('/')
                    .next()?
                    .strip_suffix(".point")
                    .map(String::from)
            })
            .collect())
    }

    /// Copies and publishes every cache point not yet in the target, oldest first. A cache
    /// point older than a published point covering the same VMs is not copied: it was pruned
    /// (or superseded), and bringing it back would undo retention. Points of one VM, and of one
    /// group, are published in time order, so nothing unprocessed is ever skipped this way.
    pub async fn pass(&self) -> Result<Pass> {
        let started = Instant::now();
        let mut pass = Pass::default();
        let published = self.published().await?;
        let scan = self
            .cache
            .scan_points()
            .await
            .context("listing cache points")?;
        // A point that cannot be read cannot be copied; the others still move.
        for d in scan.damaged {
            tracing::error!(point = %d.id, error = %d.reason, "point quarantined: not processed");
            pass.quarantined.push((d.id, d.reason));
        }
        let mut points = scan.points;
        points.sort_by_key(|p| (p.time, p.id.to_string()));
        // Per disk, what the target holds (listed once per pass).
        let mut have: BTreeMap<(VmId, DiskId), Held> = BTreeMap::new();
        let (processed, conflicts) = self.processed(&points, &published).await?;
        for (id, why) in conflicts {
            tracing::error!(point = %id, error = %why, "point quarantined: not processed");
            pass.quarantined.push((id, why));
        }
        let done: Vec<&RecoveryPoint> = points
            .iter()
            .filter(|p| processed.contains(&p.id))
            .collect();
        for p in &points {
            if published.contains(p.id.as_str()) {
                continue;
            }
            let superseded = done
                .iter()
                .any(|q| q.time > p.time && p.members.iter().all(|m| q.member(&m.vm).is_some()));
            if superseded {
                continue;
            }
            match self.copy_point(p, &mut have, &mut pass).await {
                Ok(()) => pass.points.push(p.id.clone()),
                Err(e) if quarantines(&e) => {
                    let why = format!("{e:#}");
                    tracing::error!(point = %p.id, error = %why, "point quarantined: not processed");
                    if let Some(b) = e.downcast_ref::<Broken>()
                        && let Some(r) = self.request_resync(b).await
                    {
                        pass.resyncs.push(r);
                    }
                    pass.quarantined.push((p.id.clone(), why));
                }
                Err(e) => return Err(e.context(format!("processing point {}", p.id))),
            }
        }
        self.answer_asks(&mut pass).await?;
        self.record_quarantines(&pass).await?;
        let disks: BTreeSet<(VmId, DiskId)> = points
            .iter()
            .flat_map(|p| {
                p.members
                    .iter()
                    .flat_map(|m| m.disks.iter().map(|d| (m.vm.clone(), d.disk.clone())))
            })
            .collect();
        self.settle_resyncs(&disks).await?;
        pass.latest_processed = self
            .target
            .points()
            .await?
            .into_iter()
            .max_by_key(|p| p.time)
            .map(|p| (p.id, p.time));
        pass.rpo_ms = self.rpo().await?;
        pass.elapsed = started.elapsed();
        Ok(pass)
    }

    /// Makes the target's quarantine records (`quarantine/<point>.txt`, the reason as text)
    /// those of this pass: one per point it quarantined, none for any other (processed since,
    /// superseded, or gone from the cache). They are what `lifeboat points list --target` shows
    /// for a point that is not moving.
    async fn record_quarantines(&self, pass: &Pass) -> Result<()> {
        let backend = self.target.backend();
        let layout = self.target.layout();
        let now: BTreeSet<&PointId> = pass.quarantined.iter().map(|(id, _)| id).collect();
        for (id, _) in self.quarantined().await? {
            if !now.contains(&id) {
                backend.delete(&layout.quarantine_record(&id)).await?;
            }
        }
        for (id, why) in &pass.quarantined {
            self.put_record(&layout.quarantine_record(id), why).await?;
        }
        Ok(())
    }

    /// Makes the text record `name` of the target hold `text` (records are create-only: a
    /// different one is deleted first). True when it was written, false when it already held
    /// that text. Another writer recording it meanwhile counts as written: either text will do.
    async fn put_record(
        &self,
        name: &lifeboat_store::ObjectName,
        text: &str,
    ) -> std::result::Result<bool, lifeboat_store::StoreError> {
        let backend = self.target.backend();
        match backend.get(name).await {
            Ok(b) if b == text.as_bytes() => return Ok(false),
            Ok(_) => backend.delete(name).await?,
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match backend.put_new(name, text.to_owned().into()).await {
            Err(e) if e.kind != ErrorKind::AlreadyExists => Err(e),
            _ => Ok(true),
        }
    }

    /// Asks the agent of a disk, through the cache store, for a new history: the target cannot
    /// complete the one starting at `b.from`, and the data it lacks now exists only on the
    /// source disk. The request, when in place; it offers a tag to lie the new history over
    /// (a checksum compare) when one can be ([`Processor::offer_origin`]), and asks for a
    /// full copy otherwise. A cache store that refuses the write costs the request, never the
    /// pass (the point stays quarantined and the next pass asks again).
    async fn request_resync(&self, b: &Broken) -> Option<Resync> {
        if !self.asks {
            return None;
        }
        // Already answered: the agent's newest tag is of a later history (the old one's points
        // are still kept, and retention meets its damage again on every prune).
        if let Ok(Some(t)) = self.cache.latest_tag(&b.vm, &b.disk).await
            && t.from_segment > b.from
        {
            return None;
        }
        let layout = self.cache.layout();
        let name = layout.resync(&b.vm, &b.disk, b.from);
        let resync = |origin| Resync {
            vm: b.vm.clone(),
            disk: b.disk.clone(),
            from: b.from,
            origin,
        };
        // Asked before (a pass that met the same damage): the offer, if any, stands.
        if self.cache.backend().head(&name).await.is_ok() {
            let origin = self
                .cache
                .resync_offers(&b.vm, &b.disk)
                .await
                .ok()
                .and_then(|o| o.into_iter().find(|(f, _)| *f == b.from))
                .map(|(_, o)| o);
            return Some(resync(origin));
        }
        let origin = match self.offer_origin(b).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(vm = %b.vm, disk = %b.disk, error = %format!("{e:#}"), "cannot prepare an offer now; the request waits for a later pass");
                return None;
            }
        };
        match self
            .cache
            .backend()
            .put_new(&name, b.why.clone().into())
            .await
        {
            Ok(()) => {
                match origin {
                    Some(o) => {
                        tracing::warn!(vm = %b.vm, disk = %b.disk, history = b.from, origin = o, reason = %b.why, "the target store cannot complete this history; asked the agent for a new one over tag {o} (a checksum compare)")
                    }
                    None => {
                        tracing::warn!(vm = %b.vm, disk = %b.disk, history = b.from, reason = %b.why, "the target store cannot complete this history; asked the agent for a new full copy")
                    }
                }
                Some(resync(origin))
            }
            Err(e) if e.kind == ErrorKind::AlreadyExists => Some(resync(origin)),
            Err(e) => {
                tracing::error!(vm = %b.vm, disk = %b.disk, error = %e, "cannot write a resync request to the cache store");
                None
            }
        }
    }

    /// Answers the agents' asks (`asks/` in the cache store): an agent whose history cannot go
    /// on (its local state lost while the cache no longer holds what a roll-forward reads, or
    /// the cache lost what its next tag relies on) asks for an offer rather than send the whole
    /// disk, and waits a while for it. Each ask gets a request, with an offer where one can be
    /// made; an ask the agent has moved past (its newest cache tag is of a later history) is
    /// removed.
    async fn answer_asks(&self, pass: &mut Pass) -> Result<()> {
        if !self.asks {
            return Ok(());
        }
        for (vm, disk, from, text) in self.cache.asks().await? {
            let moved_on = matches!(
                self.cache.latest_tag(&vm, &disk).await,
                Ok(Some(t)) if t.from_segment > from
            );
            if moved_on {
                let name = self.cache.layout().ask(&vm, &disk, from);
                if let Err(e) = self.cache.backend().delete(&name).await {
                    tracing::warn!(ask = %name, error = %e, "cannot remove an answered ask");
                }
                continue;
            }
            let why = text.split_once('\n').map_or(text.as_str(), |(_, w)| w);
            let b = Broken {
                vm,
                disk,
                from,
                why: format!("the agent asks for a new history: {why}"),
                over_origin: false,
            };
            if let Some(r) = self.request_resync(&b).await {
                pass.resyncs.push(r);
            }
        }
        Ok(())
    }

    /// Offers the agent of `b`'s disk a tag to lie its new history over, so it ships what
    /// differs from that tag instead of a full copy: the newest of the disk's last few tags in
    /// the target that compacts — every block read and verified, into a base at it, which the
    /// new history's first base is later built over — goes beside the request as resync sums
    /// (its blocks' hashes). Only a tag whose every block verifies is offered, and none when
    /// the break was in building a base over the history's own origin (so a bad origin costs
    /// one full copy, never a loop of deltas over it) or when no recent tag compacts; the
    /// agent then makes a full copy. Retention keeps an offered tag while its sums stand.
    ///
    /// An error is one reaching a store (not damage): the request then waits for a later pass,
    /// since a request written without sums would never get them.
    async fn offer_origin(&self, b: &Broken) -> Result<Option<u64>> {
        if b.over_origin {
            return Ok(None);
        }
        let seqs = self.target.tag_seqs(&b.vm, &b.disk).await?;
        for &seq in seqs.iter().rev().take(3) {
            let tried = async {
                let tag = self.target.tag(&b.vm, &b.disk, seq).await?;
                self.sums_of(&tag).await
            };
            let sums = match tried.await {
                Ok(s) => s,
                Err(e) if quarantines(&e) => {
                    tracing::warn!(vm = %b.vm, disk = %b.disk, tag = seq, error = %format!("{e:#}"), "tag cannot be offered as the origin of a resync");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let name = self.cache.layout().resync_sums(&b.vm, &b.disk, b.from);
            return match self.cache.backend().put_new(&name, sums).await {
                Ok(()) => Ok(Some(seq)),
                Err(e) if e.kind == ErrorKind::AlreadyExists => Ok(Some(seq)),
                // A cache credential that may not write here asks for a full copy instead.
                Err(e) if matches!(e.kind, ErrorKind::Denied | ErrorKind::Permanent) => {
                    tracing::warn!(sums = %name, error = %e, "cannot write resync sums to the cache store");
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            };
        }
        Ok(None)
    }

    /// The resync sums of `tag` in the target: compacts it (reading and verifying every block
    /// a restore reads), then lists the base's blocks.
    async fn sums_of(&self, tag: &Tag) -> Result<bytes::Bytes> {
        let base = compact(&self.target, tag, BASE_PART_BYTES, 3).await?;
        let layout = self.target.layout();
        // One entry per block of the disk (48 bytes each, plus the object they go into):
        // targets are numbered as met and renumbered in path order at the end, so no path is
        // held more than once.
        let mut paths: Vec<String> = Vec::new();
        let mut number: std::collections::HashMap<String, u32> = Default::default();
        let mut entries = Vec::new();
        for part in 1..=base.parts {
            let name = layout.base_part(&tag.vm, &tag.disk, tag.seq, part);
            let (targets, index) = self.target.segment_index_of(&name).await?;
            let local: Vec<u32> = targets
                .into_iter()
                .map(|t| {
                    *number.entry(t.clone()).or_insert_with(|| {
                        paths.push(t);
                        paths.len() as u32 - 1
                    })
                })
                .collect();
            entries.extend(index.into_iter().map(|e| lifeboat_store::sums::SumEntry {
                target: local[e.target as usize],
                offset: e.offset,
                length: e.length,
                hash: e.hash,
            }));
        }
        drop(number);
        let mut order: Vec<u32> = (0..paths.len() as u32).collect();
        order.sort_by(|a, b| paths[*a as usize].cmp(&paths[*b as usize]));
        let mut renumber = vec![0u32; paths.len()];
        for (new, old) in order.iter().enumerate() {
            renumber[*old as usize] = new as u32;
        }
        let sorted: Vec<String> = order
            .iter()
            .map(|i| std::mem::take(&mut paths[*i as usize]))
            .collect();
        let mut sums = lifeboat_store::sums::SumsBuilder::new(tag.seq, tag.block_size, sorted);
        for mut e in entries {
            e.target = renumber[e.target as usize];
            sums.push(e);
        }
        Ok(sums.finish())
    }

    /// Scrubs the target store: reads every object every point needs, whole (segments and base
    /// parts block by block), the way `lifeboat verify --read-data` does. Damage in data that
    /// processing never re-reads (a segment copied long ago, a base part) is otherwise found
    /// only when a restore or a compaction meets it.
    ///
    /// The walk's listing is not a snapshot (a pass publishes, a compaction replaces segments
    /// by a base while it runs), so nothing is concluded from it directly: an object reported
    /// missing that exists now is not damage, and which points break is decided afterwards,
    /// for the points and bases the target holds *then*, by what their tags read. So points
    /// published during the walk are judged too, and a point whose tag now reads a new base is
    /// not blamed for the segments the base replaced.
    ///
    /// What it does with that: a disk whose newest tag reads damage has its agent asked for a
    /// new history first (every later tag would read it too); then every broken point gets a
    /// damage record naming the VM/disk and object (readers list it as damaged for selections
    /// that include that VM), and records of points found whole are removed. One failing write
    /// costs its record, not the scrub.
    pub async fn scrub(&self) -> Result<Scrubbed> {
        let started = Instant::now();
        let opts = lifeboat_store::verify::VerifyOptions {
            group: Some(self.target.layout().group().clone()),
            read_data: true,
            trimmed_cache: false,
        };
        let report = lifeboat_store::verify::verify(self.target.backend().clone(), &opts)
            .await
            .context("scrubbing the target store")?;
        let mut out = Scrubbed {
            objects: report.objects_checked,
            bytes: report.bytes_read,
            ..Scrubbed::default()
        };
        let backend = self.target.backend();
        let layout = self.target.layout();
        // The damaged objects, re-checked: one listed as missing that is there now was written
        // (or listed) after the walk began.
        let mut damaged: BTreeMap<String, String> = BTreeMap::new();
        for d in &report.damaged {
            if d.what.starts_with("missing")
                && let Ok(name) = lifeboat_store::ObjectName::new(d.object.clone())
            {
                match backend.head(&name).await {
                    Ok(_) => continue,
                    Err(e) if e.kind == ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            damaged.insert(d.object.clone(), d.what.clone());
        }
        if damaged.is_empty() {
            out.cleared = self.clear_records(&BTreeSet::new()).await?;
            out.elapsed = started.elapsed();
            return Ok(out);
        }
        // What the target holds now: its points, and per disk its readable bases.
        let scan = self.target.scan_points().await?;
        let points: Vec<RecoveryPoint> = scan
            .points
            .into_iter()
            .chain(scan.damaged.into_iter().filter_map(|d| d.point))
            .collect();
        let mut reads = TagReads::new(&self.target);
        // 1. Resyncs first: the one finding that must not be lost to a later error.
        let mut disks: BTreeSet<(VmId, DiskId)> = BTreeSet::new();
        for p in &points {
            for m in &p.members {
                disks.extend(m.disks.iter().map(|d| (m.vm.clone(), d.disk.clone())));
            }
        }
        for (vm, disk) in &disks {
            let Some(newest) = self.target.tag_seqs(vm, disk).await?.into_iter().max() else {
                continue;
            };
            if let Some(hit) = reads.hits(vm, disk, newest, &damaged).await? {
                let tag_from = reads.history_of(vm, disk, newest);
                let Some(from) = tag_from else { continue };
                let b = Broken {
                    vm: vm.clone(),
                    disk: disk.clone(),
                    from,
                    why: format!("the target scrub found what tag {newest} reads damaged: {hit}"),
                    over_origin: false,
                };
                if let Some(r) = self.request_resync(&b).await {
                    out.resyncs.push(r);
                }
            }
        }
        // 2. Records: per point, the VM/disk pairs whose tags read damage.
        let mut broken: BTreeMap<PointId, Vec<String>> = BTreeMap::new();
        for p in &points {
            for m in &p.members {
                for d in &m.disks {
                    if let Some(hit) = reads.hits(&m.vm, &d.disk, d.tag, &damaged).await? {
                        broken
                            .entry(p.id.clone())
                            .or_default()
                            .push(format!("{}/{}: {hit}", m.vm, d.disk));
                    }
                }
            }
        }
        out.cleared = self
            .clear_records(&broken.keys().cloned().collect())
            .await?;
        for (id, lines) in broken {
            let why = lines.join("\n") + "\n";
            match self.put_record(&layout.damage_record(&id), &why).await {
                Ok(true) => {
                    tracing::error!(point = %id, damage = %why.trim_end(), "the scrub found this point's data damaged; it is listed as damaged for the VMs named")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(point = %id, error = %e, "cannot write a damage record"),
            }
            out.damaged.push((id, why.trim_end().replace('\n', "; ")));
        }
        out.elapsed = started.elapsed();
        Ok(out)
    }

    /// Removes the damage records of points not in `keep`; how many.
    async fn clear_records(&self, keep: &BTreeSet<PointId>) -> Result<u64> {
        let backend = self.target.backend();
        let layout = self.target.layout();
        let mut cleared = 0;
        for m in backend.list(&layout.damage()).await? {
            let Some(id) = m
                .name
                .file_name()
                .strip_suffix(".txt")
                .and_then(|s| PointId::new(s).ok())
            else {
                continue;
            };
            if !keep.contains(&id) {
                backend.delete(&m.name).await?;
                cleared += 1;
            }
        }
        Ok(cleared)
    }

    /// Withdraws the resync requests their agents answered: the disk's newest tag in the cache
    /// belongs to a later history than the one each request names.
    async fn settle_resyncs(&self, disks: &BTreeSet<(VmId, DiskId)>) -> Result<()> {
        for (vm, disk) in disks {
            let requests = self.cache.resync_requests(vm, disk).await?;
            if requests.is_empty() {
                continue;
            }
            let newest = match self.cache.latest_tag(vm, disk).await {
                Ok(Some(t)) => t,
                // Nothing newer to judge by (or a damaged newest tag, which the agent answers
                // with a new history anyway): the request stays.
                Ok(None) => continue,
                Err(e) => {
                    let e = anyhow::Error::from(e);
                    if quarantines(&e) {
                        continue;
                    }
                    return Err(e);
                }
            };
            // An offer stands until the history over it has its first base in the target (built
            // when that history's first tag is published): until then retention must keep the
            // offered tag, which it knows by the sums.
            if newest.origin.is_some()
                && !self
                    .target
                    .readable_bases(vm, disk)
                    .await?
                    .iter()
                    .any(|b| b.from_segment == newest.from_segment)
            {
                continue;
            }
            let newest = newest.from_segment;
            for (from, _) in requests.into_iter().filter(|(from, _)| newest > *from) {
                tracing::info!(%vm, %disk, history = from, new_history = newest, "resync answered");
                // The sums first: a request is never left without them by a withdrawal that
                // stopped half-way, so no sums outlive their request.
                let layout = self.cache.layout();
                for name in [
                    layout.resync_sums(vm, disk, from),
                    layout.resync(vm, disk, from),
                ] {
                    // An answered request left in place costs nothing (the agent ignores
                    // requests older than its history); a credential without delete must not
                    // stop the pass.
                    if let Err(e) = self.cache.backend().delete(&name).await {
                        tracing::warn!(request = %name, error = %e, "cannot withdraw an answered resync request");
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The target's quarantine records: point id → why.
    pub async fn quarantined(&self) -> Result<BTreeMap<PointId, String>> {
        let backend = self.target.backend();
        let mut out = BTreeMap::new();
        for m in backend.list(&self.target.layout().quarantine()).await? {
            let Some(id) = m
                .name
                .file_name()
                .strip_suffix(".txt")
                .and_then(|s| PointId::new(s).ok())
            else {
                continue;
            };
            match backend.get(&m.name).await {
                Ok(b) => {
                    out.insert(id, String::from_utf8_lossy(&b).into_owned());
                }
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    async fn copy_point(
        &self,
        p: &RecoveryPoint,
        have: &mut BTreeMap<(VmId, DiskId), Held>,
        pass: &mut Pass,
    ) -> Result<()> {
        for m in &p.members {
            for d in &m.disks {
                let tag = self.cache.tag(&m.vm, &d.disk, d.tag).await?;
                let key = (m.vm.clone(), d.disk.clone());
                if !have.contains_key(&key) {
                    let held = Held::of(&self.target, &m.vm, &d.disk).await?;
                    have.insert(key.clone(), held);
                }
                let held = have.get_mut(&key).expect("inserted");
                self.copy_segments(&tag, held, pass)
                    .await
                    .map_err(|e| broken(&tag, e))?;
                if let DiskShape::Directory { tree } = &tag.shape {
                    let t = match self.cache.tree(&m.vm, &d.disk, tree).await {
                        Ok(t) => t,
                        Err(e) if e.is_damage() => {
                            // The agent may not delete (a container SAS without `d`), and an
                            // unchanged directory's next tag names this listing again: removing
                            // it lets that tag write it whole (trees are create-only).
                            let name = self.cache.layout().tree(&m.vm, &d.disk, tree)?;
                            tracing::warn!(tree = %name, error = %e, "removing a damaged listing from the cache store so the agent writes it again");
                            self.cache.backend().delete(&name).await?;
                            return Err(e.into());
                        }
                        Err(e) => return Err(e.into()),
                    };
                    // An unchanged directory's tags all name one listing: a damaged copy in
                    // the target would break every later point, so what is there is compared
                    // and replaced, never taken on its name.
                    self.writer.replace_tree(&m.vm, &d.disk, &t).await?;
                }
                // A history resynchronised as a delta over an earlier tag holds only what
                // changed since it: its first tag is published with a base built over that
                // tag, which every restore of the history then reads instead.
                if let Some(o) = tag.origin
                    && sources_for(self.target.layout(), &tag, &held.bases)
                        .0
                        .is_none()
                {
                    let base = match compact(&self.target, &tag, BASE_PART_BYTES, 3).await {
                        Ok(b) => b,
                        Err(e) => {
                            let e = anyhow::Error::from(e);
                            if !quarantines(&e) {
                                return Err(e);
                            }
                            return Err(Broken {
                                vm: tag.vm.clone(),
                                disk: tag.disk.clone(),
                                from: tag.from_segment,
                                why: format!("no base over origin tag {o}: {e:#}"),
                                over_origin: true,
                            }
                            .into());
                        }
                    };
                    tracing::info!(vm = %m.vm, disk = %d.disk, tag = tag.seq, origin = o, "built the base of a history resynchronised over an earlier tag");
                    held.bases.push(base);
                }
                self.writer
                    .put_tag(&tag)
                    .await
                    .map_err(|e| broken(&tag, e.into()))?;
            }
        }
        match self.writer.put_point(p).await {
            Ok(()) => Ok(()),
            // Published by an earlier, interrupted pass (once is enough) — or another point was
            // published under this id, which must not count as this one being processed.
            Err(lifeboat_store::Error::Store(e)) if e.kind == ErrorKind::AlreadyExists => {
                match self.differs_from_published(p).await? {
                    None => Ok(()),
                    Some(why) => Err(Conflict(why).into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the target's point under `p`'s id is another point than `p`, and how. Compared
    /// as bytes, then decoded (the same point re-encoded by another version is the same
    /// point); an unreadable one differs. One pruned since it was listed was `p`'s.
    async fn differs_from_published(&self, p: &RecoveryPoint) -> Result<Option<String>> {
        let name = self.target.layout().point(&p.id);
        let theirs = match self.target.backend().get(&name).await {
            Ok(b) => b,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if theirs == p.encode() {
            return Ok(None);
        }
        Ok(match RecoveryPoint::decode(name.as_str(), &theirs) {
            Ok(q) if q == *p => None,
            Ok(_) => Some(format!(
                "{name} in the target store is another point than the cache store's point of that id; not processed, and kept in the cache store"
            )),
            Err(e) => Some(format!(
                "the target store's point of that id cannot be compared with the cache store's: {e}; not processed, and kept in the cache store"
            )),
        })
    }

    /// Splits the cache's points whose id the target has published into those published as
    /// they are (processed) and those under whose id the target holds another point, with why.
    async fn processed(
        &self,
        points: &[RecoveryPoint],
        published: &BTreeSet<String>,
    ) -> Result<(BTreeSet<PointId>, Vec<(PointId, String)>)> {
        let mut done = BTreeSet::new();
        let mut conflicts = Vec::new();
        for p in points.iter().filter(|p| published.contains(p.id.as_str())) {
            match self.differs_from_published(p).await? {
                None => {
                    done.insert(p.id.clone());
                }
                Some(why) => conflicts.push((p.id.clone(), why)),
            }
        }
        Ok((done, conflicts))
    }

    /// Copies the segments of `tag` that a restore of it reads in the target and the target
    /// lacks, after checking that every segment of the tag the cache still holds is the one the
    /// target holds, or a base there stands for, under that number.
    ///
    /// Segments folded into a base the tag restores from are not in the target on their own
    /// any more (compaction let retention delete them) and are not needed: copying them again
    /// would only have them trimmed from the cache and deleted by the next prune, until a later
    /// tag needs one that is gone from both stores.
    ///
    /// A number alone is no identity: an agent that lost its state and got a new cache store
    /// starts again at segment 1, and the target may still hold an older history's segment 1
    /// (or a base standing for it). Taking that for the new one would publish a point that
    /// restores, verified, the older bytes, so a different identity refuses the point with a
    /// [`Conflict`] naming both objects. A segment the cache no longer holds was trimmed, which
    /// [`Processor::trim_cache`] does only after the same check.
    async fn copy_segments(&self, tag: &Tag, held: &mut Held, pass: &mut Pass) -> Result<()> {
        let (vm, disk) = (&tag.vm, &tag.disk);
        let (base, _) = sources_for(self.target.layout(), tag, &held.bases);
        let first = base.map_or(tag.from_segment, |b| b.through_segment + 1);
        if held.in_cache.is_none() {
            let seqs = self.cache.segment_seqs(vm, disk).await?;
            held.in_cache = Some(seqs.into_iter().collect());
        }
        for seq in tag.segments() {
            if held.verified.contains(&seq) {
                continue;
            }
            let name = self.cache.layout().segment(vm, disk, seq);
            let needed = seq >= first && !held.segments.contains(&seq);
            let cached = held.in_cache.as_ref().is_some_and(|c| c.contains(&seq));
            let id = match cached {
                true => self.cache.segment_id(&name).await?,
                false => None,
            };
            let Some(id) = id else {
                if needed {
                    return Err(lifeboat_store::Error::Inconsistent(format!(
                        "segment {name} of tag {} of {vm}/{disk} is in neither the cache nor the target store",
                        tag.seq
                    ))
                    .into());
                }
                continue;
            };
            self.check_identity(held, vm, disk, seq, &name, &id).await?;
            if needed {
                let data = self.cache.backend().get(&name).await?;
                // Verify before it becomes the only copy that survives the source region.
                lifeboat_store::codec::decode(name.as_str(), data.clone())?;
                pass.bytes += data.len() as u64;
                self.writer.put_segment(vm, disk, seq, data).await?;
                held.segments.insert(seq);
                pass.segments += 1;
            }
            held.verified.insert(seq);
        }
        Ok(())
    }

    /// Checks that the cache's segment `seq` (`name`, identity `id`) is what the target holds
    /// under that number: the segment object there, and every base that stands for it.
    /// Returns whether the target holds it at all.
    async fn check_identity(
        &self,
        held: &mut Held,
        vm: &VmId,
        disk: &DiskId,
        seq: u64,
        name: &lifeboat_store::ObjectName,
        id: &str,
    ) -> Result<bool> {
        let layout = self.target.layout();
        let mut known = false;
        if held.segments.contains(&seq) {
            let theirs = layout.segment(vm, disk, seq);
            if let Some(tid) = self.target.segment_id(&theirs).await? {
                if tid != id {
                    return Err(Conflict(format!(
                        "{name} in the cache store is not {theirs} in the target store (index {id} vs {tid}): another history of the disk under the same numbers (an agent that lost its state and started again?); not processed"
                    ))
                    .into());
                }
                known = true;
            }
        }
        let covering: Vec<Base> = held
            .bases
            .iter()
            .filter(|b| b.from_segment <= seq && seq <= b.through_segment)
            .cloned()
            .collect();
        for b in covering {
            // Read once per base, and only when a segment it stands for is met.
            if let std::collections::btree_map::Entry::Vacant(e) = held.ids.entry(b.tag) {
                e.insert(self.target.base_segment_ids(&b).await?);
            }
            let bid = held.ids[&b.tag]
                .as_ref()
                .and_then(|ids| ids.get(usize::try_from(seq - b.from_segment).ok()?));
            match bid {
                Some(bid) if bid != id => {
                    return Err(Conflict(format!(
                        "{name} in the cache store is not the segment {seq} that base {} in the target store was compacted from (index {id} vs {bid}): another history of the disk under the same numbers (an agent that lost its state and started again?); not processed",
                        layout.base(vm, disk, b.tag)
                    ))
                    .into());
                }
                // A version-1 base did not record what it stands for: nothing to compare.
                _ => known = true,
            }
        }
        Ok(known)
    }

    /// Deletes from the cache store what is durable in the target and no longer needed there:
    /// processed (or pruned) points; tags other than each disk's newest that no unprocessed point
    /// references; trees no remaining tag lists; segments that the target holds, up to the
    /// second-newest tag's last one (an agent that crashed right after its newest tag rolls
    /// forward from the segments after that). Each disk's newest tag stays, so an agent that lost
    /// its state finds where numbering continues. Must not run while a cut is being published
    /// (the coordinator holds the cut lock).
    pub async fn trim_cache(&self) -> Result<Trimmed> {
        let mut out = Trimmed::default();
        let cache = &self.cache;
        let backend = cache.backend();
        let layout = cache.layout();
        let published = self.published().await?;
        let points = cache.points().await?;
        let (processed, conflicts) = self.processed(&points, &published).await?;
        let conflicting: BTreeSet<&PointId> = conflicts.iter().map(|(id, _)| id).collect();
        let done: Vec<&RecoveryPoint> = points
            .iter()
            .filter(|p| processed.contains(&p.id))
            .collect();
        let mut live_tags: BTreeMap<(VmId, DiskId), BTreeSet<u64>> = BTreeMap::new();
        for p in &points {
            let superseded = done
                .iter()
                .any(|q| q.time > p.time && p.members.iter().all(|m| q.member(&m.vm).is_some()));
            // A point under whose id the target holds another stays, with its data, for an
            // operator to look at: it is the only copy.
            if conflicting.contains(&p.id) {
                out.conflicts += 1;
            }
            if !conflicting.contains(&p.id) && (processed.contains(&p.id) || superseded) {
                backend.delete(&layout.point(&p.id)).await?;
                out.points += 1;
            } else {
                for m in &p.members {
                    for d in &m.disks {
                        live_tags
                            .entry((m.vm.clone(), d.disk.clone()))
                            .or_default()
                            .insert(d.tag);
                    }
                }
            }
        }
        for (vm, disk) in disks_in(cache).await? {
            let seqs = cache.tag_seqs(&vm, &disk).await?;
            let Some(&latest) = seqs.last() else { continue };
            let live = live_tags
                .get(&(vm.clone(), disk.clone()))
                .cloned()
                .unwrap_or_default();
            let keep_after = match seqs.len() {
                n if n >= 2 => cache.tag(&vm, &disk, seqs[n - 2]).await?.through_segment,
                _ => 0,
            };
            let mut trees = BTreeSet::new();
            for &seq in &seqs {
                if seq == latest || live.contains(&seq) {
                    if let DiskShape::Directory { tree } = cache.tag(&vm, &disk, seq).await?.shape {
                        trees.insert(tree);
                    }
                } else {
                    backend.delete(&layout.tag(&vm, &disk, seq)).await?;
                    out.tags += 1;
                }
            }
            let tree_prefix = lifeboat_store::ObjectName::new(
                layout.disk_root(&vm, &disk).as_str().to_string() + "/tree",
            )?;
            for m in backend.list(&tree_prefix).await? {
                let hash = m.name.file_name().trim_end_matches(".tree").to_string();
                if !trees.contains(&hash) {
                    backend.delete(&m.name).await?;
                    out.trees += 1;
                }
            }
            let mut in_target = Held::of(&self.target, &vm, &disk).await?;
            for m in backend.list(&layout.segments(&vm, &disk)).await? {
                let Some(seq) = lifeboat_store::layout::parse_seq(&m.name) else {
                    continue;
                };
                if seq > keep_after || !in_target.covers(seq) {
                    continue;
                }
                // Only a segment the target is shown to hold (the same identity) leaves the
                // cache: processing trusts a trimmed segment to be the target's.
                let Some(id) = cache.segment_id(&m.name).await? else {
                    continue;
                };
                let same = match self
                    .check_identity(&mut in_target, &vm, &disk, seq, &m.name, &id)
                    .await
                {
                    Ok(known) => known,
                    Err(e) if e.is::<Conflict>() => {
                        tracing::warn!(error = %e, "not trimming a segment the target holds another version of");
                        out.conflicts += 1;
                        false
                    }
                    // Damage in the target (say, a base's identity list) keeps this segment in
                    // the cache; it does not stop the trim of the others.
                    Err(e) if quarantines(&e) => {
                        tracing::warn!(error = %format!("{e:#}"), segment = %m.name, "not trimming a segment whose identity the target cannot show");
                        false
                    }
                    Err(e) => return Err(e),
                };
                if same {
                    backend.delete(&m.name).await?;
                    out.segments += 1;
                    out.bytes += m.size;
                }
            }
        }
        Ok(out)
    }

    /// Applies retention to the target store as of `now` (Unix ms). The window counts back from
    /// the newest point (or `now`, if earlier): a point expires only once newer points cover
    /// the retention after it, so while no new points arrive (replication broken) nothing
    /// expires — as ASR, which "only replaces the oldest point if it generates new points".
    pub async fn prune(&self, retention: std::time::Duration, now: u64) -> Result<Pruned> {
        let mut out = Pruned::default();
        let target = &self.target;
        let backend = target.backend();
        let layout = target.layout();
        let scan = target.scan_points().await?;
        // An unreadable point is neither kept nor expired: nothing says what it references or
        // when it was cut. It stays (reported) and does not hold back the others. A point the
        // scrub found damaged decodes: it expires by its time like any other.
        // Kept whatever their age: the newest point, and the newest whole one (not listed as
        // damaged by the scrub), so damage alone never leaves a group without a point.
        let mut points = scan.points;
        points.sort_by_key(|p| (p.time, p.id.to_string()));
        let newest_whole = points.last().map(|p| p.id.clone());
        for d in scan.damaged {
            match d.point {
                Some(p) => points.push(p),
                None => out.damaged.push(d.reason),
            }
        }
        points.sort_by_key(|p| (p.time, p.id.to_string()));
        let newest_time = points.last().map_or(now, |p| p.time);
        let newest = points.last().map(|p| p.id.clone());
        let horizon = now
            .min(newest_time)
            .saturating_sub(retention.as_millis() as u64);
        let (kept, expired): (Vec<_>, Vec<_>) = points.into_iter().partition(|p| {
            p.time >= horizon
                || Some(&p.id) == newest.as_ref()
                || Some(&p.id) == newest_whole.as_ref()
        });
        out.kept = kept.len();
        // 1. Unpublish (a damage record goes with its point).
        for p in &expired {
            backend.delete(&layout.point(&p.id)).await?;
            backend.delete(&layout.damage_record(&p.id)).await?;
            out.points.push(p.id.clone());
        }
        // 2. Tags no kept point references; 3. trees and segments no remaining tag needs.
        let mut needed: BTreeMap<(VmId, DiskId), BTreeSet<u64>> = BTreeMap::new();
        for p in &kept {
            for m in &p.members {
                for d in &m.disks {
                    needed
                        .entry((m.vm.clone(), d.disk.clone()))
                        .or_default()
                        .insert(d.tag);
                }
            }
        }
        for (vm, disk) in disks_in(target).await? {
            let mut keep = needed
                .get(&(vm.clone(), disk.clone()))
                .cloned()
                .unwrap_or_default();
            // A tag offered to an agent to lie its new history over must outlive the offer,
            // which stands until that history's first base, built over it, is in the target.
            if self.asks {
                match self.cache.resync_offers(&vm, &disk).await {
                    Ok(offers) => keep.extend(offers.into_iter().map(|(_, o)| o)),
                    Err(e) => {
                        tracing::warn!(%vm, %disk, error = %format!("{e:#}"), "cannot read the resync offers in the cache store; retention keeps this disk's data this time");
                        out.damaged.push(format!(
                            "{vm}/{disk}: retention skipped this disk: the cache store's resync offers cannot be read: {e:#}"
                        ));
                        continue;
                    }
                }
            }
            // Damage costs what it damages: a disk whose kept tags, bases or segments cannot be
            // read keeps all its data this time (deleting less is always safe) and is reported;
            // the other disks are pruned as usual.
            if let Err(e) = self.prune_disk(&vm, &disk, &keep, &mut out).await {
                if !quarantines(&e) {
                    return Err(e);
                }
                tracing::error!(%vm, %disk, error = %format!("{e:#}"), "retention skipped a damaged disk");
                out.damaged
                    .push(format!("{vm}/{disk}: retention skipped this disk: {e:#}"));
            }
        }
        Ok(out)
    }

    /// Retention of one disk: deletes the tags not in `keep`, compacts at the oldest kept tag,
    /// and deletes the trees, segments and bases no kept tag reads.
    async fn prune_disk(
        &self,
        vm: &VmId,
        disk: &DiskId,
        keep: &BTreeSet<u64>,
        out: &mut Pruned,
    ) -> Result<()> {
        let (vm, disk) = (vm.clone(), disk.clone());
        let target = &self.target;
        let backend = target.backend();
        let layout = target.layout();
        let mut kept_tags = Vec::new();
        for seq in target.tag_seqs(&vm, &disk).await? {
            if keep.contains(&seq) {
                kept_tags.push(target.tag(&vm, &disk, seq).await?);
            } else {
                backend.delete(&layout.tag(&vm, &disk, seq)).await?;
                out.tags += 1;
            }
        }
        // Compaction: a base at the oldest kept tag once enough segments lie behind it, so
        // restores stay bounded and the segments it replaces can go.
        if let Some(oldest) = kept_tags.first() {
            let bases = target.readable_bases(&vm, &disk).await?;
            let (base, _) = lifeboat_store::restore::sources_for(layout, oldest, &bases);
            let covered = base
                .as_ref()
                .map_or(oldest.from_segment.saturating_sub(1), |b| b.through_segment);
            if oldest.through_segment.saturating_sub(covered) >= COMPACT_AFTER_SEGMENTS
                && base.as_ref().is_none_or(|b| b.tag != oldest.seq)
            {
                // A damaged object under the oldest kept tag stops its compaction, not the
                // rest of retention: the segments a base would replace stay.
                match lifeboat_store::compact::compact(target, oldest, BASE_PART_BYTES, 3).await {
                    Ok(_) => out.bases += 1,
                    Err(e) => {
                        let e = anyhow::Error::from(e);
                        if !quarantines(&e) {
                            return Err(e);
                        }
                        out.damaged.push(format!(
                            "{vm}/{disk}: no compaction at tag {}: {e:#}",
                            oldest.seq
                        ));
                        // What the oldest kept tag reads is damaged or gone, and every later
                        // tag of its history reads the same: only a new history mends it. (A
                        // leftover part under the base's name puts no data at stake.)
                        let occupied = matches!(
                            e.downcast_ref::<lifeboat_store::Error>(),
                            Some(lifeboat_store::Error::Occupied(_))
                        );
                        let b = Broken {
                            vm: vm.clone(),
                            disk: disk.clone(),
                            from: oldest.from_segment,
                            why: format!("no compaction at tag {}: {e:#}", oldest.seq),
                            over_origin: false,
                        };
                        if !occupied && let Some(r) = self.request_resync(&b).await {
                            out.resyncs.push(r);
                        }
                    }
                }
            }
        }
        // What the kept tags read: their bases' parts and the segments after them.
        let bases = target.readable_bases(&vm, &disk).await?;
        let mut need_segments = BTreeSet::new();
        let mut need_bases = BTreeSet::new();
        let mut trees = BTreeSet::new();
        for t in &kept_tags {
            let (base, _) = lifeboat_store::restore::sources_for(layout, t, &bases);
            let first = match &base {
                Some(b) => {
                    need_bases.insert(b.tag);
                    b.through_segment + 1
                }
                None => t.from_segment,
            };
            need_segments.extend(first..=t.through_segment);
            if let DiskShape::Directory { tree } = &t.shape {
                trees.insert(tree.clone());
            }
        }
        let tree_prefix = layout.disk_root(&vm, &disk).as_str().to_string() + "/tree";
        let tree_prefix = lifeboat_store::ObjectName::new(tree_prefix)?;
        for m in backend.list(&tree_prefix).await? {
            let hash = m.name.file_name().trim_end_matches(".tree").to_string();
            if !trees.contains(&hash) {
                backend.delete(&m.name).await?;
                out.trees += 1;
            }
        }
        for seq in target.segment_seqs(&vm, &disk).await? {
            if !need_segments.contains(&seq) {
                backend.delete(&layout.segment(&vm, &disk, seq)).await?;
                out.segments += 1;
            }
        }
        // Parts without a manifest are a compaction killed half-way; one at the oldest kept
        // tag is retried (and cleaned) by `compact`, older ones never will be.
        let oldest_kept = kept_tags.first().map_or(u64::MAX, |t| t.seq);
        // A base whose manifest cannot be read stands for nothing. Which history it was of is
        // unknown, so it goes only once no kept tag could have restored from it: each is older
        // than it (a base serves tags at or after its own) or restores from a newer base.
        let unusable = |t: u64| {
            kept_tags.iter().all(|k| {
                k.seq < t
                    || lifeboat_store::restore::sources_for(layout, k, &bases)
                        .0
                        .is_some_and(|b| b.tag > t)
            })
        };
        let listed = backend.list(&layout.bases(&vm, &disk)).await?;
        let prefix = format!("{}/", layout.bases(&vm, &disk));
        // Manifests that stay (readable or not): their parts are not leftovers.
        let mut manifests = BTreeSet::new();
        for m in &listed {
            let Some(t) = m
                .name
                .as_str()
                .strip_prefix(&prefix)
                .and_then(|f| f.strip_suffix(".base"))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if !bases.iter().any(|b| b.tag == t) && unusable(t) {
                tracing::warn!(base = %m.name, "removing an unreadable base manifest no kept tag could restore from");
                backend.delete(&m.name).await?;
                out.bases_deleted += 1;
            } else {
                manifests.insert(t);
            }
        }
        for m in &listed {
            let Some((tag, _part)) = m
                .name
                .as_str()
                .strip_prefix(&prefix)
                .and_then(|f| f.split_once('/'))
            else {
                continue; // a manifest
            };
            let Ok(tag) = tag.parse::<u64>() else {
                continue;
            };
            if tag < oldest_kept && !manifests.contains(&tag) {
                backend.delete(&m.name).await?;
                out.orphan_parts += 1;
            }
        }
        for b in bases.iter().filter(|b| !need_bases.contains(&b.tag)) {
            // Manifest first: a base without one is unreferenced leftovers.
            backend.delete(&layout.base(&vm, &disk, b.tag)).await?;
            backend.delete(&layout.base_ids(&vm, &disk, b.tag)).await?;
            for part in 1..=b.parts {
                backend
                    .delete(&layout.base_part(&vm, &disk, b.tag, part))
                    .await?;
            }
            out.bases_deleted += 1;
        }
        Ok(())
    }

    /// RPO per VM from the cache store's newest tags.
    pub async fn rpo(&self) -> Result<BTreeMap<VmId, u64>> {
        let now = now_millis();
        let mut out: BTreeMap<VmId, u64> = BTreeMap::new();
        let vms = self
            .cache
            .backend()
            .list(&self.cache.layout().vms_root())
            .await?;
        // Names look like v1/<group>/vms/<vm>/disks/<disk>/tag/<seq>.tag.
        let mut newest: BTreeMap<(VmId, DiskId), u64> = BTreeMap::new();
        for m in vms {
            let parts: Vec<&str> = m.name.as_str().split('/').collect();
            if let [_, _, "vms", vm, "disks", disk, "tag", file] = parts.as_slice()
                && let (Ok(vm), Ok(disk), Some(seq)) = (
                    VmId::new(*vm),
                    DiskId::new(*disk),
                    file.strip_suffix(".tag")
                        .and_then(|s| s.parse::<u64>().ok()),
                )
            {
                let e = newest.entry((vm, disk)).or_insert(0);
                *e = (*e).max(seq);
            }
        }
        for ((vm, disk), seq) in newest {
            let t = self.cache.tag(&vm, &disk, seq).await?;
            let age = now.saturating_sub(t.time);
            let e = out.entry(vm).or_insert(0);
            *e = (*e).max(age);
        }
        Ok(out)
    }
}

/// Whether a failure to copy a point is about that point's data (so the point is quarantined
/// and newer ones still move), rather than about reaching the stores (so the pass stops and
/// is retried).
fn quarantines(e: &anyhow::Error) -> bool {
    // A segment that fails its checksums is that point's data, like a damaged manifest.
    if e.is::<Conflict>() || e.is::<lifeboat_store::codec::CodecError>() {
        return true;
    }
    match e.downcast_ref::<lifeboat_store::Error>() {
        _ if e.is::<Broken>() => true,
        Some(lifeboat_store::Error::Store(s)) => s.kind == ErrorKind::NotFound,
        Some(lifeboat_store::Error::Io { .. }) | None => false,
        Some(_) => true,
    }
}

/// A segment in the cache store is not the one the target holds under its number (another
/// history of the disk); the point is refused, never published over the other history.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Conflict(pub String);

/// A disk's history cannot be completed in the target store: something its tags need there is
/// damaged or gone from both stores, or is damaged in the cache store and not yet copied. The
/// point is quarantined and the disk's agent is asked for a new history, which needs nothing
/// of the old one ([`Processor::pass`]).
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct Broken {
    pub vm: VmId,
    pub disk: DiskId,
    /// First segment of the history.
    pub from: u64,
    pub why: String,
    /// The break is in building the history's first base over its origin tag (gone or
    /// damaged since it was offered): the new history gets no offer, so a bad origin costs one
    /// full copy, never a loop of deltas over it.
    pub over_origin: bool,
}

/// A disk whose agent was asked for a new history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    pub vm: VmId,
    pub disk: DiskId,
    /// First segment of the history the target cannot complete.
    pub from: u64,
    /// The tag offered to lie the new history over (a checksum compare); `None`: a full copy.
    pub origin: Option<u64>,
}

impl std::fmt::Display for Resync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.origin {
            Some(o) => write!(
                f,
                "asked {}/{} for a new history over tag {o} (a checksum compare: only blocks that differ are sent)",
                self.vm, self.disk
            ),
            None => write!(f, "asked {}/{} for a new full copy", self.vm, self.disk),
        }
    }
}

/// `e`, from copying `tag`'s data, as [`Broken`] when it is about that data (damage, loss,
/// another history under the same numbers) rather than about reaching the stores.
fn broken(tag: &Tag, e: anyhow::Error) -> anyhow::Error {
    if e.is::<Broken>() || !quarantines(&e) {
        return e;
    }
    Broken {
        vm: tag.vm.clone(),
        disk: tag.disk.clone(),
        from: tag.from_segment,
        why: format!("{e:#}"),
        over_origin: false,
    }
    .into()
}

/// What the target store holds of one disk: segments on their own, and bases (each standing
/// for the segments `from_segment..=through_segment` it was compacted from); for a pass, also
/// the cache's segment numbers and the segments already checked.
#[derive(Debug, Default)]
struct Held {
    segments: BTreeSet<u64>,
    bases: Vec<Base>,
    in_cache: Option<BTreeSet<u64>>,
    verified: BTreeSet<u64>,
    /// Per base (by tag), the identities of the segments it stands for, once read.
    ids: BTreeMap<u64, Option<Vec<String>>>,
}

impl Held {
    async fn of(target: &StoreReader, vm: &VmId, disk: &DiskId) -> Result<Self> {
        Ok(Held {
            segments: target.segment_seqs(vm, disk).await?.into_iter().collect(),
            // A damaged base stands for nothing: what it replaced must come from the cache,
            // or the history cannot be completed (a resync).
            bases: target.readable_bases(vm, disk).await?,
            ..Held::default()
        })
    }

    /// Whether segment `seq` is in the target, on its own or folded into a base.
    fn covers(&self, seq: u64) -> bool {
        self.segments.contains(&seq)
            || self
                .bases
                .iter()
                .any(|b| (b.from_segment..=b.through_segment).contains(&seq))
    }
}

/// What tags read in the target as it is now (tag, tree, base manifest and parts, segments),
/// with each disk's bases and each tag read once.
struct TagReads<'a> {
    target: &'a StoreReader,
    bases: BTreeMap<(VmId, DiskId), Vec<Base>>,
    tags: BTreeMap<(VmId, DiskId, u64), Option<Tag>>,
}

impl<'a> TagReads<'a> {
    fn new(target: &'a StoreReader) -> Self {
        TagReads {
            target,
            bases: BTreeMap::new(),
            tags: BTreeMap::new(),
        }
    }

    /// The first object tag `seq` of a disk reads that is in `damaged`, as "object: what"; a
    /// tag that is gone reads nothing (its point is gone or going too).
    async fn hits(
        &mut self,
        vm: &VmId,
        disk: &DiskId,
        seq: u64,
        damaged: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let layout = self.target.layout();
        let tag_name = layout.tag(vm, disk, seq).to_string();
        if let Some(what) = damaged.get(&tag_name) {
            return Ok(Some(format!("{tag_name}: {what}")));
        }
        let key = (vm.clone(), disk.clone(), seq);
        if !self.tags.contains_key(&key) {
            let tag = match self.target.tag(vm, disk, seq).await {
                Ok(t) => Some(t),
                Err(e) if e.is_damage_or_loss() => None,
                Err(e) => return Err(e.into()),
            };
            self.tags.insert(key.clone(), tag);
        }
        let Some(tag) = self.tags[&key].clone() else {
            return Ok(None);
        };
        let disk_key = (vm.clone(), disk.clone());
        if !self.bases.contains_key(&disk_key) {
            let bases = self.target.readable_bases(vm, disk).await?;
            self.bases.insert(disk_key.clone(), bases);
        }
        let (base, mut objects) = sources_for(layout, &tag, &self.bases[&disk_key]);
        if let Some(b) = &base {
            objects.push(layout.base(vm, disk, b.tag));
        }
        if let DiskShape::Directory { tree } = &tag.shape
            && let Ok(name) = layout.tree(vm, disk, tree)
        {
            objects.push(name);
        }
        Ok(objects.into_iter().find_map(|o| {
            let o = o.to_string();
            damaged.get(&o).map(|what| format!("{o}: {what}"))
        }))
    }

    /// The first segment of tag `seq`'s history, once [`TagReads::hits`] has read it.
    fn history_of(&self, vm: &VmId, disk: &DiskId, seq: u64) -> Option<u64> {
        self.tags
            .get(&(vm.clone(), disk.clone(), seq))
            .and_then(|t| t.as_ref())
            .map(|t| t.from_segment)
    }
}

/// The (VM, disk) pairs a store holds objects for.
async fn disks_in(store: &StoreReader) -> Result<BTreeSet<(VmId, DiskId)>> {
    let mut out = BTreeSet::new();
    for m in store.backend().list(&store.layout().vms_root()).await? {
        let parts: Vec<&str> = m.name.as_str().split('/').collect();
        if let [_, _, "vms", vm, "disks", disk, ..] = parts.as_slice()
            && let (Ok(vm), Ok(disk)) = (VmId::new(*vm), DiskId::new(*disk))
        {
            out.insert((vm, disk));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lifeboat_store::backend::memory::MemoryBackend;
    use lifeboat_store::codec::SegmentBuilder;
    use lifeboat_store::manifest::{Consistency, DiskRef, Member, PointKind};

    use super::*;

    /// A target point of the same id with other content is not "already published"
    /// (identity, not number): copying must fail naming it, not succeed.
    #[tokio::test]
    async fn copy_point_compares_an_existing_point() {
        let group = GroupId::new("g").unwrap();
        let layout = Layout::new(group.clone());
        let cache: DynBackend = Arc::new(MemoryBackend::new());
        let memory = Arc::new(MemoryBackend::new());
        let (vm, disk) = (VmId::new("vm").unwrap(), DiskId::new("d").unwrap());
        let w = StoreWriter::new(cache.clone(), layout.clone());
        let mut b = SegmentBuilder::new(4096, 3);
        b.add("", 0, &[7u8; 4096]);
        w.put_segment(&vm, &disk, 1, b.finish()).await.unwrap();
        let tag = Tag {
            vm: vm.clone(),
            disk: disk.clone(),
            seq: 1,
            from_segment: 1,
            through_segment: 1,
            time: 10,
            consistency: Consistency::Crash,
            block_size: 4096,
            shape: DiskShape::Image { size: 4096 },
            origin: None,
        };
        w.put_tag(&tag).await.unwrap();
        let point = RecoveryPoint {
            id: PointId::new("vm-10-t1").unwrap(),
            group: group.clone(),
            time: 10,
            kind: PointKind::Crash,
            multi_vm: false,
            members: vec![Member {
                vm,
                disks: vec![DiskRef { disk, tag: 1 }],
                consistency: Consistency::Crash,
            }],
            excluded: vec![],
        };
        w.put_point(&point).await.unwrap();
        let p = Processor::new(group, cache, memory.clone());
        let mut have = BTreeMap::new();
        p.copy_point(&point, &mut have, &mut Pass::default())
            .await
            .unwrap();
        // Again, as an interrupted pass would: the same point is fine.
        p.copy_point(&point, &mut have, &mut Pass::default())
            .await
            .unwrap();
        let mut other = point.clone();
        other.time = 11;
        memory.overwrite_for_test(&layout.point(&point.id), other.encode());
        let err = p
            .copy_point(&point, &mut have, &mut Pass::default())
            .await
            .unwrap_err();
        assert!(err.is::<Conflict>(), "{err:#}");
        assert!(
            err.to_string().contains(layout.point(&point.id).as_str()),
            "{err:#}"
        );
    }
}
