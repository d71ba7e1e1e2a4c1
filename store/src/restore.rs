//! Reading a store back: tags, trees, points, and restoring a disk at a tag.
//!
//! A restore reads manifests first (point → tag → tree), then only the index of each segment
//! the tag names (two ranged gets), decides which stored block is the newest for every block of
//! the disk, and finally fetches just the segments holding those blocks, verifying each block's
//! blake3 before it is written. A block the tag should have but no segment holds is an error,
//! never a silent hole.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use crate::backend::{DynBackend, ErrorKind};
use crate::codec::{self, Encoding, Entry};
use crate::error::{Error, Result};
use crate::layout::{Layout, parse_numbered, parse_seq};
use crate::manifest::{Base, DiskShape, EntryKind, RecoveryPoint, Tag, Tree};
use crate::name::{DiskId, ObjectName, PointId, VmId};
use crate::platform;

/// Segments fetched and decoded at once during a restore.
const PARALLEL_SEGMENTS: usize = 4;

/// Reads one group's objects from a store.
#[derive(Debug, Clone)]
pub struct StoreReader {
    backend: DynBackend,
    layout: Layout,
    /// Whether [`StoreReader::scan_points`] looks for damage records (a target store's).
    records: bool,
}

impl StoreReader {
    /// A reader of `layout`'s group in `backend`.
    pub fn new(backend: DynBackend, layout: Layout) -> Self {
        Self {
            backend,
            layout,
            records: true,
        }
    }

    /// The same reader, not looking for damage records: a cache store has none, and a scan
    /// that a loop repeats every few seconds saves a listing.
    pub fn without_damage_records(mut self) -> Self {
        self.records = false;
        self
    }

    /// The layout read from.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The store read from.
    pub fn backend(&self) -> &DynBackend {
        &self.backend
    }

    /// Tag numbers of a disk, ascending.
    pub async fn tag_seqs(&self, vm: &VmId, disk: &DiskId) -> Result<Vec<u64>> {
        let list = self.backend.list(&self.layout.tags(vm, disk)).await?;
        Ok(list.iter().filter_map(|m| parse_seq(&m.name)).collect())
    }

    /// Segment numbers of a disk, ascending.
    pub async fn segment_seqs(&self, vm: &VmId, disk: &DiskId) -> Result<Vec<u64>> {
        let list = self.backend.list(&self.layout.segments(vm, disk)).await?;
        Ok(list.iter().filter_map(|m| parse_seq(&m.name)).collect())
    }

    /// Processing's resync requests for a disk (cache store): the first segment of each
    /// history it cannot complete in the target, with why (text, as written).
    pub async fn resync_requests(&self, vm: &VmId, disk: &DiskId) -> Result<Vec<(u64, String)>> {
        let mut out = Vec::new();
        for m in self.backend.list(&self.layout.resyncs(vm, disk)).await? {
            let Some(from) = parse_numbered(m.name.file_name(), "txt") else {
                continue;
            };
            match self.backend.get(&m.name).await {
                Ok(b) => out.push((from, String::from_utf8_lossy(&b).into_owned())),
                // Withdrawn since the listing.
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// The tags processing offers for a disk's new history (cache store): per resync sums
    /// beside a request, the request's history and the offered tag, read from the sums'
    /// first bytes. Unreadable ones are left out.
    pub async fn resync_offers(&self, vm: &VmId, disk: &DiskId) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for m in self.backend.list(&self.layout.resyncs(vm, disk)).await? {
            let Some(from) = parse_numbered(m.name.file_name(), "sums") else {
                continue;
            };
            match self.backend.get_range(&m.name, 0..24).await {
                Ok(b) => out.extend(crate::sums::peek_origin(&b).map(|o| (from, o))),
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// The agents' asks for an offer (cache store): per disk, the first segment of the history
    /// that cannot go on, and the text (the ask's Unix ms time on its first line, then why).
    pub async fn asks(&self) -> Result<Vec<(VmId, DiskId, u64, String)>> {
        let mut out = Vec::new();
        let root = format!("{}/", self.layout.asks());
        for m in self.backend.list(&self.layout.asks()).await? {
            let rest = &m.name.as_str()[root.len()..];
            let [vm, disk, file] = rest.split('/').collect::<Vec<_>>()[..] else {
                continue;
            };
            let (Ok(vm), Ok(disk), Some(from)) = (
                VmId::new(vm),
                DiskId::new(disk),
                parse_numbered(file, "txt"),
            ) else {
                continue;
            };
            match self.backend.get(&m.name).await {
                Ok(b) => out.push((vm, disk, from, String::from_utf8_lossy(&b).into_owned())),
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// One tag; an unknown tag is [`Error::Invalid`] naming it.
    pub async fn tag(&self, vm: &VmId, disk: &DiskId, seq: u64) -> Result<Tag> {
        let name = self.layout.tag(vm, disk, seq);
        let data = match self.backend.get(&name).await {
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(Error::Invalid(format!("no tag {seq} for disk {vm}/{disk}")));
            }
            other => other?,
        };
        let tag = Tag::decode(name.as_str(), &data)?;
        if tag.vm != *vm || tag.disk != *disk || tag.seq != seq {
            return Err(Error::Inconsistent(format!(
                "{name} holds tag {} of {}/{}",
                tag.seq, tag.vm, tag.disk
            )));
        }
        Ok(tag)
    }

    /// The newest tag of a disk, if any.
    pub async fn latest_tag(&self, vm: &VmId, disk: &DiskId) -> Result<Option<Tag>> {
        match self.tag_seqs(vm, disk).await?.last() {
            Some(&seq) => Ok(Some(self.tag(vm, disk, seq).await?)),
            None => Ok(None),
        }
    }

    /// A directory listing by hash.
    pub async fn tree(&self, vm: &VmId, disk: &DiskId, hash: &str) -> Result<Tree> {
        let name = self
            .layout
            .tree(vm, disk, hash)
            .map_err(|e| Error::Inconsistent(e.to_string()))?;
        let data = self.backend.get(&name).await?;
        if !data
            .split(|&b| b == b'\n')
            .next()
            .is_some_and(|h| h.ends_with(hash.as_bytes()))
        {
            return Err(Error::Inconsistent(format!(
                "{name} does not hold the tree it is named after"
            )));
        }
        Ok(Tree::decode(name.as_str(), &data)?)
    }

    /// One recovery point; an unknown id is [`Error::Invalid`] naming it.
    pub async fn point(&self, id: &PointId) -> Result<RecoveryPoint> {
        let name = self.layout.point(id);
        let data = match self.backend.get(&name).await {
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(Error::Invalid(format!(
                    "unknown recovery point {id} in group {}",
                    self.layout.group()
                )));
            }
            other => other?,
        };
        let p = RecoveryPoint::decode(name.as_str(), &data)?;
        if p.id != *id || p.group != *self.layout.group() {
            return Err(Error::Inconsistent(format!("{name} holds point {}", p.id)));
        }
        Ok(p)
    }

    /// All readable points of the group, oldest first. Damaged ones are left out (each logged);
    /// [`StoreReader::scan_points`] reports them.
    pub async fn points(&self) -> Result<Vec<RecoveryPoint>> {
        let scan = self.scan_points().await?;
        for d in &scan.damaged {
            // A damage record is the scrub's standing finding, already logged when made.
            if d.point.is_some() {
                tracing::debug!(point = %d.id, error = %d.reason, "skipping a damaged recovery point");
            } else {
                tracing::warn!(point = %d.id, error = %d.reason, "skipping a damaged recovery point");
            }
        }
        Ok(scan.points)
    }

    /// The group's points, oldest first, and those that cannot be read, with why. One damaged
    /// point costs only itself: the others are listed, chosen and restored as usual. A point
    /// that vanishes between the listing and its read (a prune running) is left out.
    ///
    /// A point with a damage record (the target scrub found an object its restore reads
    /// damaged or missing) is listed as damaged, with the record as the reason, and the point
    /// itself in [`DamagedPoint::point`].
    pub async fn scan_points(&self) -> Result<PointScan> {
        let list = self.backend.list(&self.layout.points()).await?;
        let recorded: BTreeSet<PointId> = if self.records {
            self.backend
                .list(&self.layout.damage())
                .await?
                .into_iter()
                .filter_map(|m| {
                    let id = m.name.file_name().strip_suffix(".txt")?;
                    PointId::new(id).ok()
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        let mut out = PointScan::default();
        for m in list {
            let Some(id) = m
                .name
                .file_name()
                .strip_suffix(".point")
                .and_then(|s| PointId::new(s).ok())
            else {
                continue;
            };
            match self.point(&id).await {
                // One record that cannot be read costs its point, never the scan.
                Ok(p) if recorded.contains(&id) => match self.damage_record(&id).await {
                    Ok(Some(why)) => {
                        let vms = record_vms(&why);
                        out.damaged.push(DamagedPoint {
                            id,
                            object: m.name.clone(),
                            reason: format!(
                                "the scrub found its data damaged: {}",
                                why.trim_end().replace('\n', "; ")
                            ),
                            point: Some(p),
                            vms,
                        })
                    }
                    Ok(None) => out.points.push(p),
                    Err(e) => out.damaged.push(DamagedPoint {
                        id,
                        object: m.name.clone(),
                        reason: format!("its damage record cannot be read: {e}"),
                        point: Some(p),
                        vms: Vec::new(),
                    }),
                },
                Ok(p) => out.points.push(p),
                // Deleted since the listing (`point` says "unknown" for a missing object).
                Err(Error::Invalid(_)) => {}
                Err(e @ (Error::Manifest(_) | Error::Inconsistent(_))) => {
                    out.damaged.push(DamagedPoint {
                        id,
                        object: m.name.clone(),
                        reason: e.to_string(),
                        point: None,
                        vms: Vec::new(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        out.points
            .sort_by(|a, b| (a.time, a.id.as_str()).cmp(&(b.time, b.id.as_str())));
        Ok(out)
    }

    /// The text of point `id`'s damage record, if it has one (bounded: a record is a line).
    pub async fn damage_record(&self, id: &PointId) -> Result<Option<String>> {
        match self.backend.get(&self.layout.damage_record(id)).await {
            Ok(b) => {
                let text = String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned();
                Ok(Some(text))
            }
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The verified index of one segment, read with two ranged gets.
    pub async fn segment_index(
        &self,
        vm: &VmId,
        disk: &DiskId,
        seq: u64,
    ) -> Result<codec::SegmentIndex> {
        self.segment_index_of(&self.layout.segment(vm, disk, seq))
            .await
    }

    /// The bases (compactions) of a disk, oldest first; each verified.
    pub async fn bases(&self, vm: &VmId, disk: &DiskId) -> Result<Vec<Base>> {
        let list = self.backend.list(&self.layout.bases(vm, disk)).await?;
        let mut out = Vec::new();
        for m in list {
            let Some(tag) = m
                .name
                .file_name()
                .strip_suffix(".base")
                .and_then(|d| d.parse::<u64>().ok())
            else {
                continue;
            };
            let data = self.backend.get(&m.name).await?;
            let b = Base::decode(m.name.as_str(), &data)?;
            if b.vm != *vm || b.disk != *disk || b.tag != tag {
                return Err(Error::Inconsistent(format!(
                    "{} holds the base of {}/{} at tag {}",
                    m.name, b.vm, b.disk, b.tag
                )));
            }
            out.push(b);
        }
        out.sort_by_key(|b| b.tag);
        Ok(out)
    }

    /// [`StoreReader::bases`] without the ones whose manifest is damaged (each logged): a
    /// restore chooses among the readable ones, so a damaged base costs only the restores that
    /// cannot do without it, never every restore of its disk.
    pub async fn readable_bases(&self, vm: &VmId, disk: &DiskId) -> Result<Vec<Base>> {
        let list = self.backend.list(&self.layout.bases(vm, disk)).await?;
        let mut out = Vec::new();
        for m in list {
            let Some(tag) = m
                .name
                .file_name()
                .strip_suffix(".base")
                .and_then(|d| d.parse::<u64>().ok())
            else {
                continue;
            };
            let data = match self.backend.get(&m.name).await {
                Ok(d) => d,
                // Removed by retention since the listing.
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            match Base::decode(m.name.as_str(), &data) {
                Ok(b) if b.vm == *vm && b.disk == *disk && b.tag == tag => out.push(b),
                Ok(b) => {
                    tracing::warn!(base = %m.name, holds = %format!("{}/{} at tag {}", b.vm, b.disk, b.tag), "skipping a base manifest that holds another base")
                }
                Err(e) => {
                    tracing::warn!(base = %m.name, error = %e, "skipping a damaged base manifest")
                }
            }
        }
        out.sort_by_key(|b| b.tag);
        Ok(out)
    }

    /// The identities (index blake3, hex) of the segments `from_segment..=through_segment` a
    /// base stands for, checked against the hash its manifest records; `None` for a base that
    /// did not record them (version 1, or compacted over one).
    pub async fn base_segment_ids(&self, base: &Base) -> Result<Option<Vec<String>>> {
        let Some(want) = &base.segment_ids else {
            return Ok(None);
        };
        let name = self.layout.base_ids(&base.vm, &base.disk, base.tag);
        let data = self.backend.get(&name).await?;
        if blake3::hash(&data).to_hex().as_str() != want
            || data.len() as u64 != base.segment_count() * 32
        {
            return Err(Error::Inconsistent(format!(
                "{name} is not the list of segment identities its base records"
            )));
        }
        Ok(Some(
            data.chunks_exact(32)
                .map(|h| {
                    blake3::Hash::from(<[u8; 32]>::try_from(h).expect("32"))
                        .to_hex()
                        .to_string()
                })
                .collect(),
        ))
    }

    /// The identity of the segment object `name`: the blake3 (hex) of its index, read from its
    /// footer (one head, one ranged get). Two segments with the same index hash hold the same
    /// blocks, since the index carries every block's blake3 and every block is checked against
    /// it when read. `None` when there is no such object.
    pub async fn segment_id(&self, name: &ObjectName) -> Result<Option<String>> {
        let size = match self.backend.head(name).await {
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
            other => other?.size,
        };
        let (_, hash) = self.footer(name, size).await?;
        Ok(Some(blake3::Hash::from(hash).to_hex().to_string()))
    }

    /// The (index range, index hash) in the footer of segment object `name` of `size` bytes.
    async fn footer(
        &self,
        name: &ObjectName,
        size: u64,
    ) -> Result<(std::ops::Range<u64>, codec::Hash)> {
        let flen = codec::FOOTER_LEN as u64;
        if size < flen {
            return Err(codec::CodecError {
                object: name.to_string(),
                what: format!("truncated: only {size} bytes"),
            }
            .into());
        }
        let footer = self.backend.get_range(name, size - flen..size).await?;
        Ok(codec::parse_footer(name.as_str(), &footer, size)?)
    }

    /// The verified index of the segment object `name`.
    pub async fn segment_index_of(&self, name: &ObjectName) -> Result<codec::SegmentIndex> {
        let name = name.clone();
        let size = match self.backend.head(&name).await {
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(Error::Inconsistent(format!(
                    "segment {name} is referenced by a tag but missing"
                )));
            }
            other => other?.size,
        };
        let (range, hash) = self.footer(&name, size).await?;
        let start = range.start;
        let index = self.backend.get_range(&name, range).await?;
        Ok(codec::decode_index(name.as_str(), &index, start, &hash)?)
    }
}

/// The points of a group as listed: the readable ones, oldest first, and the damaged ones.
#[derive(Debug, Clone, Default)]
pub struct PointScan {
    pub points: Vec<RecoveryPoint>,
    pub damaged: Vec<DamagedPoint>,
}

impl PointScan {
    /// Why point `id` cannot be read, if it is damaged.
    pub fn damage(&self, id: &PointId) -> Option<&DamagedPoint> {
        self.damaged.iter().find(|d| &d.id == id)
    }

    /// The points usable for restoring `vms`, oldest first: the whole ones, and those whose
    /// damage record names only other VMs.
    pub fn usable_for(&self, vms: &[VmId]) -> Vec<RecoveryPoint> {
        let mut out = self.points.clone();
        out.extend(
            self.damaged
                .iter()
                .filter(|d| d.spares(vms))
                .filter_map(|d| d.point.clone()),
        );
        out.sort_by(|a, b| (a.time, a.id.as_str()).cmp(&(b.time, b.id.as_str())));
        out
    }
}

impl DamagedPoint {
    /// Whether a restore of `vms` reads none of the damage (the point decodes and its record
    /// names only other VMs).
    pub fn spares(&self, vms: &[VmId]) -> bool {
        self.point.is_some() && !self.vms.is_empty() && !self.vms.iter().any(|v| vms.contains(v))
    }
}

/// A point object that cannot be read (bad checksum, unparsable, or holding another point).
#[derive(Debug, Clone)]
pub struct DamagedPoint {
    pub id: PointId,
    pub object: ObjectName,
    /// The decoder's error, naming the object; or the damage record's text.
    pub reason: String,
    /// The point, when it decodes but the scrub found its data damaged (so retention can
    /// still expire it by its time).
    pub point: Option<RecoveryPoint>,
    /// The VMs whose data the damage record names; empty when the whole point is unusable
    /// (it does not decode, or its record names no VM).
    pub vms: Vec<VmId>,
}

/// The VMs a damage record's lines (`<vm>/<disk>: <object>: <what>`) name.
fn record_vms(record: &str) -> Vec<VmId> {
    let mut vms: Vec<VmId> = record
        .lines()
        .filter_map(|l| VmId::new(l.split_once('/')?.0).ok())
        .collect();
    vms.sort();
    vms.dedup();
    vms
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Logical bytes of the restored disk (image size, or sum of file sizes).
    pub bytes: u64,
    /// Blocks decoded, verified and written.
    pub blocks: u64,
    /// Segments whose index was read.
    pub segments_indexed: u64,
    /// Segments fetched whole for their blocks.
    pub segments_read: u64,
    pub elapsed: Duration,
}

/// Where one winning block goes.
#[derive(Debug, Clone)]
pub struct Placement {
    pub entry: Entry,
    pub file: usize,
    /// Bytes of the block to write (less than its length when the disk or file shrank).
    pub keep: u32,
}

/// Restores the disk of `tag` into `out`: a disk-image file (created; must not exist) or an
/// existing block device for image disks, a directory (created, or existing and empty) for
/// directory disks. Every byte written was verified against its blake3.
pub async fn restore_disk(reader: &StoreReader, tag: &Tag, out: &Path) -> Result<RestoreReport> {
    let started = Instant::now();
    let bs = tag.block_size as u64;
    if bs == 0 {
        return Err(Error::Inconsistent(format!(
            "tag {} has block size 0",
            tag.seq
        )));
    }

    // What must be covered: (file index, file path or "", size).
    let tree = match &tag.shape {
        DiskShape::Image { .. } => None,
        DiskShape::Directory { tree } => Some(reader.tree(&tag.vm, &tag.disk, tree).await?),
    };
    let files = files_of(tag, tree.as_ref());

    let bases = reader.readable_bases(&tag.vm, &tag.disk).await?;
    let (base, sources) = sources_for(reader.layout(), tag, &bases);
    if let (None, Some(o)) = (&base, tag.origin) {
        return Err(Error::Inconsistent(format!(
            "tag {} of {}/{} lies over tag {o} and is read through a base of its history; \
             none is readable (not processed yet, or damaged)",
            tag.seq, tag.vm, tag.disk
        )));
    }
    let by_source = plan_blocks(reader, tag, &sources, &files).await?;
    let total: u64 = files.iter().map(|(_, size)| size).sum();

    // Prepare the output; on any failure from here on, remove what this restore created so a
    // failed restore leaves nothing behind that could be mistaken for a good disk.
    let segments_read = by_source.len() as u64;
    let existed = out.exists();
    let result = async {
        let (handles, fresh) = prepare_output(out, tree.as_ref(), &files)?;
        let blocks = write_blocks(reader, &sources, by_source, Arc::new(handles), fresh).await?;
        if let Some(tree) = &tree {
            finish_tree(out, tree)?;
        }
        Ok(blocks)
    }
    .await;
    let blocks = match result {
        Ok(b) => b,
        Err(e) => {
            if !platform::is_block_device(out) {
                if tree.is_some() && existed {
                    // It was an empty directory: empty it again.
                    if let Ok(entries) = fs::read_dir(out) {
                        for entry in entries.flatten() {
                            let p = entry.path();
                            let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
                        }
                    }
                } else if tree.is_some() {
                    let _ = fs::remove_dir_all(out);
                } else if !existed {
                    let _ = fs::remove_file(out);
                }
            }
            return Err(e);
        }
    };
    Ok(RestoreReport {
        bytes: total,
        blocks,
        segments_indexed: sources.len() as u64,
        segments_read,
        elapsed: started.elapsed(),
    })
}

/// The objects a restore of `tag` reads, in order (a later one's block wins), and the base
/// used, if any: the newest base of the same full copy at or before the tag, then the segments
/// after it; without one, the tag's segments.
pub fn sources_for(layout: &Layout, tag: &Tag, bases: &[Base]) -> (Option<Base>, Vec<ObjectName>) {
    let base = bases
        .iter()
        .filter(|b| {
            b.tag <= tag.seq
                && b.from_segment == tag.from_segment
                && b.through_segment <= tag.through_segment
                && b.block_size == tag.block_size
        })
        .max_by_key(|b| b.tag)
        .cloned();
    let mut out = Vec::new();
    let first = match &base {
        Some(b) => {
            out.extend((1..=b.parts).map(|p| layout.base_part(&tag.vm, &tag.disk, b.tag, p)));
            b.through_segment + 1
        }
        None => tag.from_segment,
    };
    out.extend((first..=tag.through_segment).map(|s| layout.segment(&tag.vm, &tag.disk, s)));
    (base, out)
}

/// Where one winning block of a tag is: which file (index into the files list) and which
/// source's entry.
pub type BlockPlan = BTreeMap<usize, Vec<Placement>>;

/// Pass 1 of a restore (indexes only): for every block of every file the newest entry among
/// `sources`, grouped by source. A block without one is an error naming it.
pub async fn plan_blocks(
    reader: &StoreReader,
    tag: &Tag,
    sources: &[ObjectName],
    files: &[(String, u64)],
) -> Result<BlockPlan> {
    check_disk_blocks(tag, files)?;
    let futs: Vec<_> = sources
        .iter()
        .cloned()
        .map(|name| async move { reader.segment_index_of(&name).await })
        .collect();
    let indexes: Vec<codec::SegmentIndex> = futures::stream::iter(futs)
        .buffered(16)
        .try_collect()
        .await?;
    let indexes: Vec<&codec::SegmentIndex> = indexes.iter().collect();
    plan_from_indexes(tag, sources, &indexes, files)
}

/// Refuses a tag (or tree) describing more blocks than a disk may have, before anything walks
/// them: a forged size must not make a plan endless.
fn check_disk_blocks(tag: &Tag, files: &[(String, u64)]) -> Result<()> {
    let bs = tag.block_size as u64;
    let blocks: u64 = files
        .iter()
        .map(|(_, size)| size.div_ceil(bs.max(1)))
        .fold(0, u64::saturating_add);
    if bs == 0 || blocks > crate::manifest::MAX_DISK_BLOCKS {
        return Err(Error::Inconsistent(format!(
            "tag {} of {}/{} describes {blocks} blocks of {bs} bytes, more than a disk may have",
            tag.seq, tag.vm, tag.disk
        )));
    }
    Ok(())
}

/// The planning half of [`plan_blocks`], over indexes already read (`indexes[i]` is the index
/// of `sources[i]`): `lifeboat verify` reads each index once and plans every tag from them.
pub fn plan_from_indexes(
    tag: &Tag,
    sources: &[ObjectName],
    indexes: &[&codec::SegmentIndex],
    files: &[(String, u64)],
) -> Result<BlockPlan> {
    check_disk_blocks(tag, files)?;
    let bs = tag.block_size as u64;
    let file_of: HashMap<&str, usize> = files
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.as_str(), i))
        .collect();
    let mut winners: HashMap<(usize, u64), (usize, Entry)> = HashMap::new();
    for (src, (targets, entries)) in indexes.iter().enumerate() {
        for e in entries {
            let Some(&file) = file_of.get(targets[e.target as usize].as_str()) else {
                continue; // a file that no longer exists at this tag
            };
            if e.offset % bs != 0 || e.length as u64 > bs {
                return Err(Error::Inconsistent(format!(
                    "{} has a block at {} that does not fit block size {bs}",
                    sources[src], e.offset
                )));
            }
            winners.insert((file, e.offset / bs), (src, *e));
        }
    }
    // Every block of every file must have a winner, at least as long as the file needs.
    let mut by_source: BlockPlan = BTreeMap::new();
    for (file, (path, size)) in files.iter().enumerate() {
        for block in 0..size.div_ceil(bs) {
            let need = (size - block * bs).min(bs) as u32;
            let what = || {
                let at = if path.is_empty() {
                    String::new()
                } else {
                    format!(" of file {path:?}")
                };
                format!(
                    "tag {} of {}/{} has no data for bytes {}..{}{at}",
                    tag.seq,
                    tag.vm,
                    tag.disk,
                    block * bs,
                    block * bs + need as u64
                )
            };
            let (src, entry) = winners
                .get(&(file, block))
                .ok_or_else(|| Error::Inconsistent(what()))?;
            if entry.length < need {
                return Err(Error::Inconsistent(what()));
            }
            by_source.entry(*src).or_default().push(Placement {
                entry: *entry,
                file,
                keep: need,
            });
        }
    }
    Ok(by_source)
}

/// The files a tag covers: `("", size)` for an image, `(path, size)` per file of a tree.
pub fn files_of(tag: &Tag, tree: Option<&Tree>) -> Vec<(String, u64)> {
    match (&tag.shape, tree) {
        (DiskShape::Image { size }, _) => vec![(String::new(), *size)],
        (_, Some(tree)) => tree
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::File { size } => Some((e.path.clone(), size)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Pass 2: fetches the segments holding winners, verifies their blocks and writes them.
async fn write_blocks(
    reader: &StoreReader,
    sources: &[ObjectName],
    by_source: BlockPlan,
    handles: Arc<Vec<(PathBuf, File)>>,
    fresh: bool,
) -> Result<u64> {
    let blocks: u64 = futures::stream::iter(by_source)
        .map(|(src, placements)| {
            let handles = Arc::clone(&handles);
            async move {
                let name = sources[src].clone();
                let data = reader.backend.get(&name).await?;
                let n = placements.len() as u64;
                tokio::task::spawn_blocking(move || -> Result<u64> {
                    let seg = codec::decode(name.as_str(), data)?;
                    let mut d =
                        zstd::bulk::Decompressor::new().map_err(|e| Error::io(name.as_str(), e))?;
                    let mut buf = Vec::new();
                    for p in placements {
                        // A fresh file is already zeros: zero blocks need no write.
                        if fresh && p.entry.encoding == Encoding::Zero {
                            continue;
                        }
                        let block = seg.read_block(&p.entry, &mut d, &mut buf)?;
                        let (path, file) = &handles[p.file];
                        platform::write_all_at(file, &block[..p.keep as usize], p.entry.offset)
                            .map_err(|e| Error::io(path, e))?;
                    }
                    Ok(n)
                })
                .await
                .map_err(|e| Error::Invalid(format!("restore worker failed: {e}")))?
            }
        })
        .buffer_unordered(PARALLEL_SEGMENTS)
        .try_fold(0, |acc, n| async move { Ok(acc + n) })
        .await?;
    for (path, f) in handles.iter() {
        f.sync_all().map_err(|e| Error::io(path, e))?;
    }
    Ok(blocks)
}

/// Creates the output files. Returns their handles (indexed like `files`) and whether they are
/// fresh (all zeros), so zero blocks can be skipped.
fn prepare_output(
    out: &Path,
    tree: Option<&Tree>,
    files: &[(String, u64)],
) -> Result<(Vec<(PathBuf, File)>, bool)> {
    match tree {
        None => {
            let size = files[0].1;
            if platform::is_block_device(out) {
                let f = OpenOptions::new()
                    .write(true)
                    .open(out)
                    .map_err(|e| Error::io(out, e))?;
                return Ok((vec![(out.to_path_buf(), f)], false));
            }
            if out.exists() {
                return Err(Error::Invalid(format!(
                    "{} already exists; a restore never overwrites a file",
                    out.display()
                )));
            }
            let f = File::create_new(out).map_err(|e| Error::io(out, e))?;
            f.set_len(size).map_err(|e| Error::io(out, e))?;
            Ok((vec![(out.to_path_buf(), f)], true))
        }
        Some(tree) => {
            match fs::read_dir(out) {
                Ok(mut entries) => {
                    if entries.next().is_some() {
                        return Err(Error::Invalid(format!(
                            "{} exists and is not empty; a restore never overwrites files",
                            out.display()
                        )));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
                }
                Err(e) => return Err(Error::io(out, e)),
            }
            for e in &tree.entries {
                if e.kind == EntryKind::Dir {
                    let p = out.join(&e.path);
                    fs::create_dir_all(&p).map_err(|err| Error::io(&p, err))?;
                }
            }
            let mut handles = Vec::with_capacity(files.len());
            for (rel, size) in files {
                let p = out.join(rel);
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                let f = File::create_new(&p).map_err(|e| Error::io(&p, e))?;
                f.set_len(*size).map_err(|e| Error::io(&p, e))?;
                handles.push((p, f));
            }
            Ok((handles, true))
        }
    }
}

/// Symlinks, permissions and modification times, once contents are in place.
fn finish_tree(out: &Path, tree: &Tree) -> Result<()> {
    for e in &tree.entries {
        let p = out.join(&e.path);
        match &e.kind {
            EntryKind::Symlink { target } => {
                platform::symlink(target, &p).map_err(|err| Error::io(&p, err))?;
            }
            EntryKind::File { .. } => {
                let mtime = std::time::UNIX_EPOCH + Duration::from_millis(e.mtime);
                let f = OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|err| Error::io(&p, err))?;
                f.set_modified(mtime).map_err(|err| Error::io(&p, err))?;
                if e.mode != 0 {
                    platform::set_mode(&p, e.mode).map_err(|err| Error::io(&p, err))?;
                }
            }
            EntryKind::Dir => {
                if e.mode != 0 {
                    platform::set_mode(&p, e.mode).map_err(|err| Error::io(&p, err))?;
                }
            }
        }
    }
    Ok(())
}
