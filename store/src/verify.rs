//! `lifeboat verify`: walks a store (cache or target), resolves every reference (points → tags →
//! trees, bases and segments; bases → parts and `segments.ids`; quarantine records), checks
//! every checksum it can without reading data, and with `read_data` every segment and base part
//! whole, block by block. Each damaged or missing object is reported with the recovery points
//! it breaks — computed the way a restore reads the store, so one damaged object costs exactly
//! the points whose restore would fail on it — and objects nothing references are reported as
//! orphans (warnings, not damage).
//!
//! Decoding is the reader's own ([`StoreReader`], [`codec`], [`crate::manifest`]): verify has
//! no second decoder, so what it accepts is what a restore accepts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;

use crate::backend::{DynBackend, ErrorKind};
use crate::codec;
use crate::error::{Error, Result};
use crate::layout::{Layout, ROOT, parse_numbered, parse_seq};
use crate::manifest::{Base, DiskShape, RecoveryPoint, Tag};
use crate::name::{DiskId, GroupId, ObjectName, PointId, VmId};
use crate::restore::{StoreReader, files_of, plan_from_indexes, sources_for};

/// Segment indexes (or whole segments, with `read_data`) checked at once.
const PARALLEL: usize = 8;

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// One group; every group under the version root when `None`.
    pub group: Option<GroupId>,
    /// Read every segment and base part whole: object checksum and every block's blake3.
    /// Without it, segments are checked through their footer and index only.
    pub read_data: bool,
    /// The store is a cache store that processing trims: a tag's segments numbered below the
    /// lowest segment the store still holds of that disk were moved to the target store
    /// (`docs/format.md`, write rule 7) and are counted as trimmed, not reported missing.
    pub trimmed_cache: bool,
}

/// A damaged or missing object and what it costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The object's name in the store.
    pub object: String,
    /// What is wrong with it (the decoder's or reader's words).
    pub what: String,
    /// The recovery points whose restore fails on it (`group/point`), sorted.
    pub breaks: Vec<String>,
    /// Tags (`vm/disk#seq`) that fail on it but no point uses (e.g. an agent's newest tag).
    pub tags: Vec<String>,
    /// Every tag that fails on it, used by a point or not.
    pub failing: Vec<(VmId, DiskId, u64)>,
}

/// An object nothing references: a leftover, not damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub object: String,
    pub why: String,
}

/// What a verification found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Groups walked.
    pub groups: Vec<GroupId>,
    /// Objects examined (read whole, in part, or headed).
    pub objects_checked: u64,
    /// Bytes fetched from the store.
    pub bytes_read: u64,
    /// Recovery points found (readable or not).
    pub points: u64,
    /// Points whose restore would fail (`group/point`), sorted.
    pub broken_points: Vec<String>,
    /// Damaged or missing objects, by name.
    pub damaged: Vec<Damage>,
    /// Unreferenced objects, by name.
    pub orphans: Vec<Orphan>,
    /// Segment references resolved as trimmed from a cache store (see
    /// [`VerifyOptions::trimmed_cache`]).
    pub trimmed: u64,
}

impl VerifyReport {
    /// Whether nothing is damaged or missing (orphans do not count).
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Verifies the store in `backend`. Damage is reported, not returned as an error; an error
/// means the walk could not finish (the store unreachable, a permission refused).
pub async fn verify(backend: DynBackend, opts: &VerifyOptions) -> Result<VerifyReport> {
    let root = ObjectName::new(ROOT).expect("root is a valid name");
    let listing = backend.list(&root).await?;
    let mut report = VerifyReport::default();
    // Objects of each group, by name; anything that is not under a valid group is an orphan.
    let mut by_group: BTreeMap<GroupId, BTreeMap<String, u64>> = BTreeMap::new();
    for m in listing {
        let rest = m.name.as_str().strip_prefix("v1/").unwrap_or_default();
        let (group, _) = rest.split_once('/').unwrap_or((rest, ""));
        match GroupId::new(group) {
            Ok(g) if opts.group.as_ref().is_none_or(|want| *want == g) => {
                by_group
                    .entry(g)
                    .or_default()
                    .insert(m.name.to_string(), m.size);
            }
            Ok(_) => {}
            Err(_) => report.orphans.push(Orphan {
                object: m.name.to_string(),
                why: "not an object of the format (no group)".into(),
            }),
        }
    }
    if let Some(g) = &opts.group {
        by_group.entry(g.clone()).or_default();
    }
    for (group, objects) in by_group {
        let walk = GroupWalk::new(backend.clone(), group.clone(), objects, opts);
        walk.run(&mut report).await?;
        report.groups.push(group);
    }
    report.damaged.sort_by(|a, b| a.object.cmp(&b.object));
    report.orphans.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(report)
}

/// A tag of a disk: `(vm, disk, seq)`.
type TagKey = (VmId, DiskId, u64);

fn tag_label((vm, disk, seq): &TagKey) -> String {
    format!("{vm}/{disk}#{seq}")
}

/// What one damaged object costs while the walk goes on.
#[derive(Debug, Default)]
struct Cost {
    what: String,
    tags: BTreeSet<TagKey>,
    points: BTreeSet<PointId>,
}

/// The walk of one group's objects.
struct GroupWalk<'a> {
    reader: StoreReader,
    group: GroupId,
    /// Every listed object of the group and its size.
    objects: BTreeMap<String, u64>,
    /// Objects some reference resolved to (or roots), so the rest are orphans.
    used: BTreeSet<String>,
    damage: BTreeMap<String, Cost>,
    /// Points using each tag.
    users: BTreeMap<TagKey, BTreeSet<PointId>>,
    /// Segments numbered after their disk's newest tag (by name), for the orphans' reason.
    after_newest: BTreeSet<String>,
    opts: &'a VerifyOptions,
    checked: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl<'a> GroupWalk<'a> {
    fn new(
        backend: DynBackend,
        group: GroupId,
        objects: BTreeMap<String, u64>,
        opts: &'a VerifyOptions,
    ) -> Self {
        Self {
            reader: StoreReader::new(backend, Layout::new(group.clone())),
            group,
            objects,
            used: BTreeSet::new(),
            damage: BTreeMap::new(),
            users: BTreeMap::new(),
            after_newest: BTreeSet::new(),
            opts,
            checked: Arc::default(),
            bytes: Arc::default(),
        }
    }

    fn layout(&self) -> &Layout {
        self.reader.layout()
    }

    fn listed(&self, name: &ObjectName) -> bool {
        self.objects.contains_key(name.as_str())
    }

    fn damaged(&mut self, object: &str, what: impl Into<String>) -> &mut Cost {
        let cost = self.damage.entry(object.to_owned()).or_default();
        if cost.what.is_empty() {
            cost.what = what.into();
        }
        cost
    }

    /// Reads a whole object, counting it.
    async fn get(&self, name: &ObjectName) -> Result<bytes::Bytes> {
        self.checked.fetch_add(1, Ordering::Relaxed);
        let data = self.reader.backend().get(name).await?;
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    async fn run(mut self, report: &mut VerifyReport) -> Result<()> {
        let prefix = format!("{}/", self.layout().group_root());
        // Sort the listing into the format's kinds of object.
        let mut points = Vec::new();
        let mut disks: BTreeSet<(VmId, DiskId)> = BTreeSet::new();
        let mut records = Vec::new();
        for name in self.objects.keys() {
            let rest = &name[prefix.len()..];
            let parts: Vec<&str> = rest.split('/').collect();
            match parts.as_slice() {
                ["points", file] => points.push(file.to_string()),
                ["quarantine", file] => records.push(format!("quarantine/{file}")),
                ["damage", file] => records.push(format!("damage/{file}")),
                // An agent's ask for an offer: informational, read by processing.
                ["asks", vm, disk, file]
                    if VmId::new(*vm).is_ok()
                        && DiskId::new(*disk).is_ok()
                        && parse_numbered(file, "txt").is_some() =>
                {
                    self.used.insert(name.clone());
                }
                ["vms", vm, "disks", disk, ..] => {
                    if let (Ok(vm), Ok(disk)) = (VmId::new(*vm), DiskId::new(*disk)) {
                        disks.insert((vm, disk));
                    }
                }
                _ => {}
            }
        }

        // Points: each is a root; its tags are what it needs.
        for file in points {
            let name = format!("{prefix}points/{file}");
            let Some(id) = file
                .strip_suffix(".point")
                .and_then(|s| PointId::new(s).ok())
            else {
                continue; // an orphan
            };
            self.used.insert(name.clone());
            report.points += 1;
            let object = self.layout().point(&id);
            let point = match self.get(&object).await {
                Ok(data) => RecoveryPoint::decode(&name, &data).map_err(Error::from),
                Err(e) => Err(e),
            };
            let point = match point {
                Ok(p) if p.id != id || p.group != self.group => Err(Error::Inconsistent(format!(
                    "{name} holds point {} of group {}",
                    p.id, p.group
                ))),
                other => other,
            };
            match point {
                Ok(p) => {
                    for m in &p.members {
                        disks.extend(m.disks.iter().map(|d| (m.vm.clone(), d.disk.clone())));
                        for d in &m.disks {
                            self.users
                                .entry((m.vm.clone(), d.disk.clone(), d.tag))
                                .or_default()
                                .insert(id.clone());
                        }
                    }
                }
                Err(e) if e.is_damage_or_loss() => {
                    self.damaged(&name, e.to_string()).points.insert(id);
                }
                Err(e) => return Err(e),
            }
        }

        for (vm, disk) in disks {
            self.disk(&vm, &disk, report).await?;
        }

        // Quarantine and damage records: plain text naming a point by their name; informational
        // (a damage record hides nothing from this walk: every point is walked).
        for file in records {
            let name = format!("{prefix}{file}");
            let valid = file
                .rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".txt"))
                .is_some_and(|id| PointId::new(id).is_ok());
            if !valid {
                continue;
            }
            self.used.insert(name.clone());
            let data = self
                .get(&ObjectName::new(name.clone()).expect("listed"))
                .await;
            match data {
                Ok(d) if std::str::from_utf8(&d).is_ok() => {}
                Ok(_) => {
                    self.damaged(&name, "record is not text");
                }
                Err(e) if e.is_damage_or_loss() => {
                    self.damaged(&name, e.to_string());
                }
                Err(e) => return Err(e),
            }
        }

        // Orphans: listed, never reached.
        for name in self.objects.keys() {
            if self.used.contains(name) {
                continue;
            }
            let rest = &name[prefix.len()..];
            let why = if rest.starts_with("probes/") {
                "a probe left by `lifeboat-agent check`"
            } else if self.after_newest.contains(name) {
                "a segment after the disk's newest tag (left by an interrupted cycle)"
            } else if rest.contains("/seg/") {
                "a segment no tag reads (left by an interrupted prune, or trimmed history)"
            } else if rest.contains("/base/") {
                "part of a base no tag reads, or of a compaction that never wrote its manifest"
            } else if rest.contains("/tree/") {
                "a tree no tag lists"
            } else {
                "not an object of the format"
            };
            report.orphans.push(Orphan {
                object: name.clone(),
                why: why.into(),
            });
        }

        // What each damaged object costs: the points using the tags that fail on it.
        let mut broken: BTreeSet<PointId> = BTreeSet::new();
        for (object, cost) in std::mem::take(&mut self.damage) {
            let mut points = cost.points.clone();
            let mut orphan_tags = Vec::new();
            for t in &cost.tags {
                match self.users.get(t) {
                    Some(users) => points.extend(users.iter().cloned()),
                    None => orphan_tags.push(tag_label(t)),
                }
            }
            broken.extend(points.iter().cloned());
            report.damaged.push(Damage {
                object,
                what: cost.what,
                breaks: points
                    .iter()
                    .map(|p| format!("{}/{p}", self.group))
                    .collect(),
                tags: orphan_tags,
                failing: cost.tags.iter().cloned().collect(),
            });
        }
        report
            .broken_points
            .extend(broken.iter().map(|p| format!("{}/{p}", self.group)));
        report.broken_points.sort();
        report.objects_checked += self.checked.load(Ordering::Relaxed);
        report.bytes_read += self.bytes.load(Ordering::Relaxed);
        Ok(())
    }

    /// One disk: its bases, tags, trees and every object a restore of each tag reads.
    async fn disk(&mut self, vm: &VmId, disk: &DiskId, report: &mut VerifyReport) -> Result<()> {
        let layout = self.layout().clone();
        let disk_prefix = format!("{}/", layout.disk_root(vm, disk));
        let mut tag_seqs: BTreeSet<u64> = BTreeSet::new();
        let mut base_seqs: BTreeSet<u64> = BTreeSet::new();
        let mut segment_seqs: BTreeSet<u64> = BTreeSet::new();
        for name in self.objects.keys() {
            let Some(rest) = name.strip_prefix(&disk_prefix) else {
                continue;
            };
            let object = ObjectName::new(name.clone()).expect("listed names are valid");
            match rest.split_once('/') {
                Some(("tag", _)) => tag_seqs.extend(parse_seq(&object)),
                Some(("seg", _)) => segment_seqs.extend(parse_seq(&object)),
                // Processing's requests for a new history: informational, read by the agent.
                Some(("resync", file))
                    if parse_numbered(file, "txt")
                        .or_else(|| parse_numbered(file, "sums"))
                        .is_some() =>
                {
                    self.used.insert(name.clone());
                }
                Some(("base", file)) => {
                    if let Some(seq) = parse_numbered(file, "base") {
                        base_seqs.insert(seq);
                    }
                }
                _ => {}
            }
        }
        // Tags points need but the store does not list are missing.
        let referenced: Vec<TagKey> = self
            .users
            .range((vm.clone(), disk.clone(), 0)..)
            .map(|(k, _)| k.clone())
            .take_while(|k| k.0 == *vm && k.1 == *disk)
            .collect();
        for key in referenced {
            if !tag_seqs.contains(&key.2) {
                let name = layout.tag(vm, disk, key.2);
                self.damaged(name.as_str(), "missing (a recovery point references it)")
                    .tags
                    .insert(key.clone());
            }
        }
        // Bases. A restore chooses among the readable manifests of the disk
        // (`StoreReader::readable_bases`), so a damaged one costs the restores that cannot do
        // without it: those whose segments it stood for are gone, which the plans below find.
        let mut bases = Vec::new();
        // Damaged manifests by tag: a restore at or after one that misses a segment misses
        // it because the base that stood for it cannot be read.
        let mut damaged_bases: Vec<(u64, String)> = Vec::new();
        for seq in base_seqs {
            let name = layout.base(vm, disk, seq);
            self.used.insert(name.to_string());
            let base = match self.get(&name).await {
                Ok(data) => Base::decode(name.as_str(), &data).map_err(Error::from),
                Err(e) => Err(e),
            };
            let base = match base {
                Ok(b) if b.vm != *vm || b.disk != *disk || b.tag != seq => {
                    Err(Error::Inconsistent(format!(
                        "{name} holds the base of {}/{} at tag {}",
                        b.vm, b.disk, b.tag
                    )))
                }
                other => other,
            };
            match base {
                Ok(b) => bases.push(b),
                Err(e) if e.is_damage_or_loss() => {
                    self.damaged(name.as_str(), e.to_string());
                    damaged_bases.push((seq, name.to_string()));
                    // Its parts are not orphans: a repaired manifest would read them.
                    let parts = format!("{disk_prefix}base/{seq:020}/");
                    let held: Vec<String> = self
                        .objects
                        .keys()
                        .filter(|n| n.starts_with(&parts))
                        .cloned()
                        .collect();
                    self.used.extend(held);
                }
                Err(e) => return Err(e),
            }
        }
        let mut identities: Vec<(u64, ObjectName, Vec<String>)> = Vec::new();
        for b in &bases {
            // Restores do not read the identities; processing does (segment identity), so
            // damage to them breaks no point but is damage all the same.
            if b.segment_ids.is_some() {
                let name = layout.base_ids(vm, disk, b.tag);
                self.used.insert(name.to_string());
                self.checked.fetch_add(1, Ordering::Relaxed);
                self.bytes
                    .fetch_add(b.segment_count() * 32, Ordering::Relaxed);
                match self.reader.base_segment_ids(b).await {
                    Ok(Some(ids)) => identities.push((b.from_segment, name, ids)),
                    Ok(None) => {}
                    Err(e) if e.is_damage_or_loss() => {
                        let what = format!(
                            "{e} (restores do not read it; processing cannot check segment identities against this base)"
                        );
                        self.damaged(name.as_str(), what);
                    }
                    Err(e) => return Err(e),
                }
            }
        }

        // Tags, and what a restore of each reads.
        let lowest_segment = segment_seqs.first().copied();
        let mut newest_through = None;
        let mut needs: Vec<(TagKey, Tag, Vec<ObjectName>, bool)> = Vec::new();
        let mut trees: HashMap<String, Vec<TagKey>> = HashMap::new();
        for seq in &tag_seqs {
            let key = (vm.clone(), disk.clone(), *seq);
            let name = layout.tag(vm, disk, *seq);
            self.used.insert(name.to_string());
            let tag = match self.get(&name).await {
                Ok(data) => Tag::decode(name.as_str(), &data).map_err(Error::from),
                Err(e) => Err(e),
            };
            let tag = match tag {
                Ok(t) if t.vm != *vm || t.disk != *disk || t.seq != *seq => {
                    Err(Error::Inconsistent(format!(
                        "{name} holds tag {} of {}/{}",
                        t.seq, t.vm, t.disk
                    )))
                }
                other => other,
            };
            let tag = match tag {
                Ok(t) => t,
                Err(e) if e.is_damage_or_loss() => {
                    self.damaged(name.as_str(), e.to_string()).tags.insert(key);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let DiskShape::Directory { tree } = &tag.shape {
                trees.entry(tree.clone()).or_default().push(key.clone());
            }
            // Tags come in number order: the last one read is the newest.
            newest_through = Some(tag.through_segment);
            let (base, sources) = sources_for(&layout, &tag, &bases);
            let mut kept = Vec::with_capacity(sources.len());
            let mut partial = false;
            // A history lying over an origin tag is read through a base over it: in a cache
            // store (before processing builds that base in the target) the rest is elsewhere;
            // anywhere else, without a readable base the tag does not restore.
            if let (None, Some(o)) = (&base, tag.origin) {
                if self.opts.trimmed_cache {
                    partial = true;
                } else {
                    // Its own objects are not orphans for it.
                    for s in &sources {
                        self.used.insert(s.to_string());
                    }
                    self.damaged(
                        name.as_str(),
                        format!(
                            "lies over tag {o} and no readable base of its history stands for it"
                        ),
                    )
                    .tags
                    .insert(key);
                    continue;
                }
            }
            for s in sources {
                let is_segment = s.as_str().contains("/seg/");
                let skip = self.opts.trimmed_cache
                    && is_segment
                    && parse_seq(&s).is_some_and(|n| lowest_segment.is_none_or(|low| n < low));
                if !self.listed(&s) && skip {
                    report.trimmed += 1;
                    partial = true;
                    continue;
                }
                if is_segment
                    && !self.listed(&s)
                    && let Some((_, base)) = damaged_bases.iter().rev().find(|(b, _)| *b <= tag.seq)
                {
                    // The cost is the damaged base's, not a missing segment's.
                    self.damage
                        .entry(base.clone())
                        .or_default()
                        .tags
                        .insert(key.clone());
                    partial = true;
                    continue;
                }
                kept.push(s);
            }
            for s in &kept {
                self.used.insert(s.to_string());
            }
            // Part of what it reads is elsewhere: check what is here, plan nothing.
            let plan = !partial;
            needs.push((key, tag, kept, plan));
        }

        if let Some(through) = newest_through {
            for seq in segment_seqs.range(through.saturating_add(1)..) {
                self.after_newest
                    .insert(layout.segment(vm, disk, *seq).to_string());
            }
        }

        // Trees, once each.
        let mut good_trees = HashMap::new();
        for (hash, keys) in trees {
            let name = match layout.tree(vm, disk, &hash) {
                Ok(n) => n,
                Err(e) => {
                    // Tag::decode does not check the hash's spelling; the tag is what is wrong.
                    for k in keys {
                        let tag = layout.tag(vm, disk, k.2);
                        self.damaged(tag.as_str(), e.to_string()).tags.insert(k);
                    }
                    continue;
                }
            };
            self.used.insert(name.to_string());
            self.checked.fetch_add(1, Ordering::Relaxed);
            let size = self.objects.get(name.as_str()).copied().unwrap_or(0);
            self.bytes.fetch_add(size, Ordering::Relaxed);
            match self.reader.tree(vm, disk, &hash).await {
                Ok(t) => {
                    good_trees.insert(hash, t);
                }
                Err(e) if e.is_damage_or_loss() => {
                    let what = match &e {
                        Error::Store(s) if s.kind == ErrorKind::NotFound => "missing".to_string(),
                        _ => e.to_string(),
                    };
                    self.damaged(name.as_str(), what).tags.extend(keys);
                }
                Err(e) => return Err(e),
            }
        }

        // Every object a restore reads: its index always, its whole body with `read_data`.
        // The parts of every readable base too, also of one no tag reads any more.
        let mut wanted: BTreeSet<ObjectName> = needs
            .iter()
            .flat_map(|(_, _, s, _)| s.iter().cloned())
            .collect();
        for b in &bases {
            for part in 1..=b.parts {
                let name = layout.base_part(vm, disk, b.tag, part);
                self.used.insert(name.to_string());
                wanted.insert(name);
            }
        }
        let checks: Vec<_> = wanted
            .into_iter()
            .map(|name| {
                let reader = self.reader.clone();
                let listed = self.listed(&name);
                let read_data = self.opts.read_data;
                let (checked, bytes) = (self.checked.clone(), self.bytes.clone());
                async move {
                    let r =
                        check_segment(&reader, &name, listed, read_data, &checked, &bytes).await;
                    (name, r)
                }
            })
            .collect();
        let results: Vec<(ObjectName, Result<codec::SegmentIndex>)> = futures::stream::iter(checks)
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut indexes: HashMap<ObjectName, codec::SegmentIndex> = HashMap::new();
        let mut bad: HashMap<ObjectName, String> = HashMap::new();
        for (name, r) in results {
            match r {
                Ok(ix) => {
                    indexes.insert(name, ix);
                }
                Err(e) if e.is_damage_or_loss() => {
                    let what = if self.listed(&name) {
                        e.to_string()
                    } else {
                        "missing".to_string()
                    };
                    bad.insert(name, what);
                }
                Err(e) => return Err(e),
            }
        }

        // A segment still in the store under a number a base stands for must be the segment
        // the base was compacted from: another one is another history under the same number
        // (`docs/format.md`, segment identity), and the tags reading it cannot be trusted.
        for (first, ids_name, ids) in identities {
            for (i, want) in ids.iter().enumerate() {
                let seq = first + i as u64;
                let name = layout.segment(vm, disk, seq);
                if !self.listed(&name) || bad.contains_key(&name) {
                    continue;
                }
                self.checked.fetch_add(1, Ordering::Relaxed);
                self.bytes
                    .fetch_add(codec::FOOTER_LEN as u64, Ordering::Relaxed);
                let got = match self.reader.segment_id(&name).await {
                    Ok(Some(id)) => id,
                    Ok(None) => continue,
                    Err(e) if e.is_damage_or_loss() => continue, // its own check reports it
                    Err(e) => return Err(e),
                };
                if got != *want {
                    let readers: Vec<TagKey> = needs
                        .iter()
                        .filter(|(_, _, s, _)| s.contains(&name))
                        .map(|(k, _, _, _)| k.clone())
                        .collect();
                    let what = format!(
                        "is not the segment {seq} that {ids_name} records (identity {got}, recorded {want}): another history of the disk under the same number"
                    );
                    self.damaged(name.as_str(), what).tags.extend(readers);
                }
            }
        }

        // Damaged parts of a base no tag reads: damage, costing no point.
        for (name, what) in &bad {
            self.damaged(name.as_str(), what.clone());
        }

        // Each tag: fails on each damaged object it reads; with all of them sound, it must
        // still cover every block of its disk (a restore refuses holes).
        for (key, tag, sources, plan) in needs {
            let mut sound = true;
            for s in &sources {
                if let Some(what) = bad.get(s) {
                    self.damaged(s.as_str(), what.clone())
                        .tags
                        .insert(key.clone());
                    sound = false;
                }
            }
            let tree = match &tag.shape {
                DiskShape::Image { .. } => None,
                DiskShape::Directory { tree } => match good_trees.get(tree) {
                    Some(t) => Some(t),
                    None => {
                        sound = false;
                        None
                    }
                },
            };
            if !sound || !plan {
                continue;
            }
            let files = files_of(&tag, tree);
            let ixs: Vec<&codec::SegmentIndex> = sources.iter().map(|s| &indexes[s]).collect();
            if let Err(e) = plan_from_indexes(&tag, &sources, &ixs, &files) {
                let name = layout.tag(vm, disk, tag.seq);
                self.damaged(name.as_str(), format!("does not restore: {e}"))
                    .tags
                    .insert(key);
            }
        }
        Ok(())
    }
}

/// Checks one segment or base part: missing, footer and index (always), whole object and every
/// block (with `read_data`). Returns its verified index.
async fn check_segment(
    reader: &StoreReader,
    name: &ObjectName,
    listed: bool,
    read_data: bool,
    checked: &AtomicU64,
    bytes: &AtomicU64,
) -> Result<codec::SegmentIndex> {
    checked.fetch_add(1, Ordering::Relaxed);
    // A listing is not a snapshot: an object written after it (a pass running beside this
    // walk) is asked for before being called missing.
    if !listed {
        match reader.backend().head(name).await {
            Ok(_) => {}
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(Error::Inconsistent("missing".into()));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !read_data {
        let ix = reader.segment_index_of(name).await?;
        // Footer and index: what a restore plans from.
        let index_len: u64 =
            4 + ix.0.iter().map(|t| 2 + t.len() as u64).sum::<u64>() + 4 + ix.1.len() as u64 * 61;
        bytes.fetch_add(codec::FOOTER_LEN as u64 + index_len, Ordering::Relaxed);
        return Ok(ix);
    }
    let data = reader.backend().get(name).await?;
    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    let object = name.to_string();
    tokio::task::spawn_blocking(move || -> Result<codec::SegmentIndex> {
        let seg = codec::decode(&object, data)?;
        seg.verify_all()?;
        Ok((seg.targets().to_vec(), seg.entries().to_vec()))
    })
    .await
    .map_err(|e| Error::Invalid(format!("verify worker failed: {e}")))?
}
