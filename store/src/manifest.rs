//! Tags, directory trees and recovery-point manifests, and their checksummed envelope.
//!
//! Every manifest object is `lifeboat-<kind> <version> <blake3-hex>\n` followed by the body
//! (JSON; zstd-compressed JSON for trees). The hash covers the body, so a flipped or missing
//! byte anywhere is caught before the JSON parser sees it.

use std::collections::BTreeSet;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::name::{DiskId, GroupId, PointId, VmId};

/// Version of tags and trees this code writes; it reads 1 up to it.
pub const MANIFEST_VERSION: u32 = 1;
/// Newest version of bases: 2 added `segments`, the identity of what a base stands for; 3
/// allows a base that stands for no segment (the first base of a history over an origin tag
/// that changed nothing since it). Only such a base is written at version 3, every other at 2;
/// versions 1 and 2 are still read.
pub const BASE_VERSION: u32 = 3;
/// Version of points this code writes: 2 added kind `not_frozen`. Version-1 points are still
/// read (their `crash` kind may cover members that were not frozen; see
/// [`RecoveryPoint::effective_kind`]).
pub const POINT_VERSION: u32 = 2;
/// Newest version of tags: 2 added `origin` (a history resynchronised as a delta over an
/// earlier tag). A tag without one is still written at version 1, so readers that predate it
/// read every other tag.
pub const TAG_VERSION: u32 = 2;

/// The version each kind of manifest is written at. Kinds change version independently, so a
/// format change to one kind does not make older readers refuse the others.
fn written_version(kind: &str) -> u32 {
    match kind {
        "base" => BASE_VERSION,
        "point" => POINT_VERSION,
        "tag" => TAG_VERSION,
        _ => MANIFEST_VERSION,
    }
}

/// Why a manifest was rejected. Always names the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object} is not a valid {kind}: {what}")]
pub struct ManifestError {
    pub object: String,
    pub kind: &'static str,
    pub what: String,
}

fn envelope(kind: &str, body: &[u8]) -> Bytes {
    envelope_at(kind, written_version(kind), body)
}

fn envelope_at(kind: &str, version: u32, body: &[u8]) -> Bytes {
    let mut out = format!(
        "lifeboat-{kind} {version} {}\n",
        blake3::hash(body).to_hex()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// Checks the header of a manifest object; returns its version and body.
fn open_envelope<'a>(
    kind: &'static str,
    object: &str,
    data: &'a [u8],
) -> Result<(u32, &'a [u8]), ManifestError> {
    let err = |what: String| ManifestError {
        object: object.to_owned(),
        kind,
        what,
    };
    let nl = data
        .iter()
        .position(|&b| b == b'\n')
        .filter(|&p| p < 200)
        .ok_or_else(|| err("no header line".into()))?;
    let header = std::str::from_utf8(&data[..nl]).map_err(|_| err("header is not text".into()))?;
    let mut parts = header.split(' ');
    let (Some(k), Some(v), Some(h), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err(format!("malformed header {header:?}")));
    };
    if k != format!("lifeboat-{kind}") {
        return Err(err(format!("wrong object type {k:?}")));
    }
    let newest = written_version(kind);
    let version = (1..=newest).find(|n| v == n.to_string()).ok_or_else(|| {
        err(format!(
            "version {v} is not supported (this build reads 1 to {newest})"
        ))
    })?;
    let body = &data[nl + 1..];
    if blake3::hash(body).to_hex().as_str() != h {
        return Err(err("checksum mismatch (damaged or truncated)".into()));
    }
    Ok((version, body))
}

/// Most blocks a disk (or a file of a directory disk) may have: 64 TiB at the smallest block
/// size. Bounds the work a forged tag or tree can make a restore plan.
pub const MAX_DISK_BLOCKS: u64 = 1 << 34;
/// Most segments one tag may read.
pub const MAX_TAG_SEGMENTS: u64 = 1 << 32;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// The current time as [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How much a cut can promise about the data it captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Taken without holding writes: blocks may come from slightly different instants.
    NotFrozen,
    /// Writes were held (fsfreeze) while the cut was captured: like a power cut.
    Crash,
    /// Applications were quiesced (hooks / VSS) and writes held.
    App,
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Consistency::NotFrozen => "not-frozen",
            Consistency::Crash => "crash-consistent",
            Consistency::App => "app-consistent",
        })
    }
}

/// What a disk looked like at a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum DiskShape {
    /// A block device or disk image of `size` bytes.
    Image { size: u64 },
    /// A directory tree, listed by the tree object with this blake3 (hex).
    Directory { tree: String },
}

/// A tag: "all writes acknowledged before the cut are in segments `from..=through` of this
/// disk, and none after". Restoring reads exactly those segments, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tag {
    pub vm: VmId,
    pub disk: DiskId,
    /// Tag number within the disk: a history's first tag takes its first segment's number
    /// (time-derived, `docs/format.md`), later ones count up by one.
    pub seq: u64,
    /// First segment a restore needs (the start of the latest full copy).
    pub from_segment: u64,
    /// Last segment included; `from_segment - 1` when none is needed (an empty disk).
    pub through_segment: u64,
    /// When the cut was taken.
    pub time: UnixMillis,
    pub consistency: Consistency,
    /// Block size of the disk's segments.
    pub block_size: u32,
    pub shape: DiskShape,
    /// A history resynchronised as a delta (`docs/format.md`, *Resync*): the number of an
    /// earlier tag of this disk whose blocks the history's segments lie over. Every tag of
    /// that history carries it. A restore reads it through a base of the history (processing
    /// compacts one over the origin before it publishes the history's first tag); without
    /// one, the history's own segments do not hold every block and the restore fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<u64>,
}

impl Tag {
    /// Serialises into a tag object (version 1 unless it has an origin).
    pub fn encode(&self) -> Bytes {
        let body = serde_json::to_vec_pretty(self).expect("tag serialises");
        match self.origin {
            Some(_) => envelope_at("tag", TAG_VERSION, &body),
            None => envelope_at("tag", 1, &body),
        }
    }

    /// Parses and verifies a tag object named `object`.
    pub fn decode(object: &str, data: &[u8]) -> Result<Self, ManifestError> {
        let (version, body) = open_envelope("tag", object, data)?;
        let tag: Tag = serde_json::from_slice(body).map_err(|e| ManifestError {
            object: object.into(),
            kind: "tag",
            what: e.to_string(),
        })?;
        let err = |what: String| ManifestError {
            object: object.into(),
            kind: "tag",
            what,
        };
        let segments = tag
            .through_segment
            .checked_add(1)
            .and_then(|end| end.checked_sub(tag.from_segment));
        if tag.seq == 0 || tag.from_segment == 0 || segments.is_none_or(|n| n > MAX_TAG_SEGMENTS) {
            return Err(err("sequence numbers out of range".into()));
        }
        // Readers walk every block of the disk and every segment of the range: a forged block
        // size or size must not turn that into an endless loop.
        crate::codec::check_block_size(tag.block_size).map_err(&err)?;
        match tag.origin {
            Some(_) if version < 2 => {
                return Err(err("field `origin` needs version 2".into()));
            }
            // An earlier tag: a chain of origins can only go back, never round.
            Some(o) if o == 0 || o >= tag.seq => {
                return Err(err(format!("origin {o} is not a tag before {}", tag.seq)));
            }
            _ => {}
        }
        if let DiskShape::Image { size } = tag.shape
            && size.div_ceil(tag.block_size as u64) > MAX_DISK_BLOCKS
        {
            return Err(err(format!(
                "image size {size} is more than {MAX_DISK_BLOCKS} blocks of block size {}",
                tag.block_size
            )));
        }
        Ok(tag)
    }

    /// The segment numbers a restore at this tag reads.
    pub fn segments(&self) -> std::ops::RangeInclusive<u64> {
        self.from_segment..=self.through_segment
    }
}

/// What kind of filesystem object a tree entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum EntryKind {
    File { size: u64 },
    Dir,
    Symlink { target: String },
}

/// One path in a directory disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeEntry {
    /// `/`-separated path relative to the disk's root; never absolute, never `..`.
    pub path: String,
    pub kind: EntryKind,
    /// Unix permission bits (0 where the platform has none).
    pub mode: u32,
    /// Modification time.
    pub mtime: UnixMillis,
}

/// The listing of a directory disk at a tag. Content-addressed: stored once per distinct tree.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    /// Sorted by path, unique.
    pub entries: Vec<TreeEntry>,
}

/// Whether `s` is 64 lowercase hex digits (a blake3 hash as the format writes it).
fn is_hex_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a relative path from a tree or a segment target: no escaping the disk's root.
pub fn check_rel_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty path".into());
    }
    if p.starts_with('/') || p.contains('\\') || p.contains('\0') {
        return Err(format!("path {p:?} is absolute or has '\\' or NUL"));
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("path {p:?} has an empty, '.' or '..' component"));
    }
    Ok(())
}

/// A base: the blocks of a disk at tag `tag`, compacted from segments
/// `from_segment..=through_segment` into `parts` segments of their own (see `docs/format.md`,
/// compaction). A restore of any later tag of the same full copy may read the base instead of
/// those segments, so restore cost stays bounded as history grows, and retention can delete them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    pub vm: VmId,
    pub disk: DiskId,
    pub tag: u64,
    pub from_segment: u64,
    pub through_segment: u64,
    pub parts: u32,
    pub block_size: u32,
    /// What the base stands for: the blake3 (hex) of its `segments.ids` object, which holds
    /// the identity (index blake3, 32 bytes) of each segment `from_segment..=through_segment`
    /// in order, so processing can tell whether a segment of that number in a cache store is
    /// the one the base was compacted from or another history's (`docs/format.md`, identity).
    /// A separate object, read only when such a segment is met, so this manifest stays small
    /// however long the history. Absent in version-1 bases and in bases compacted over one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_ids: Option<String>,
}

impl Base {
    /// Serialises into a base object.
    pub fn encode(&self) -> Bytes {
        let body = serde_json::to_vec_pretty(self).expect("base serialises");
        if self.through_segment < self.from_segment {
            envelope_at("base", BASE_VERSION, &body)
        } else {
            envelope_at("base", 2, &body)
        }
    }

    /// Parses and verifies a base object named `object`.
    pub fn decode(object: &str, data: &[u8]) -> Result<Self, ManifestError> {
        let err = |what: String| ManifestError {
            object: object.into(),
            kind: "base",
            what,
        };
        let (version, body) = open_envelope("base", object, data)?;
        let b: Base = serde_json::from_slice(body).map_err(|e| err(e.to_string()))?;
        // Empty (`through_segment = from_segment - 1`) only from version 3.
        let lowest_through = if version >= 3 {
            b.from_segment.saturating_sub(1)
        } else {
            b.from_segment
        };
        if b.from_segment == 0
            || b.through_segment < lowest_through
            || b.through_segment == u64::MAX
            || b.parts == 0
        {
            return Err(err("segment or part numbers out of range".into()));
        }
        crate::codec::check_block_size(b.block_size).map_err(&err)?;
        if b.segment_ids.as_deref().is_some_and(|h| !is_hex_hash(h)) {
            return Err(err("segment_ids is not a blake3 hash".into()));
        }
        Ok(b)
    }

    /// How many segments the base stands for.
    pub fn segment_count(&self) -> u64 {
        self.through_segment + 1 - self.from_segment
    }
}

impl Tree {
    /// Serialises into a tree object and its content hash (hex), which names it.
    pub fn encode(&self) -> (String, Bytes) {
        let json = serde_json::to_vec(self).expect("tree serialises");
        let body = zstd::bulk::compress(&json, 3).expect("zstd compresses");
        let hash = blake3::hash(&body).to_hex().to_string();
        (hash, envelope("tree", &body))
    }

    /// Parses and verifies a tree object; checks every path and the sort order.
    pub fn decode(object: &str, data: &[u8]) -> Result<Self, ManifestError> {
        let err = |what: String| ManifestError {
            object: object.into(),
            kind: "tree",
            what,
        };
        let (_, body) = open_envelope("tree", object, data)?;
        // Bound decompression so a hostile object cannot exhaust memory.
        let json = zstd::bulk::decompress(body, 1 << 30).map_err(|e| err(e.to_string()))?;
        let tree: Tree = serde_json::from_slice(&json).map_err(|e| err(e.to_string()))?;
        let mut seen = BTreeSet::new();
        for e in &tree.entries {
            check_rel_path(&e.path).map_err(&err)?;
            if !seen.insert(e.path.as_str()) {
                return Err(err(format!("path {:?} listed twice", e.path)));
            }
        }
        if !tree.entries.is_sorted_by(|a, b| a.path < b.path) {
            return Err(err("entries not sorted".into()));
        }
        Ok(tree)
    }
}

/// What a point as a whole can promise: the weakest [`Consistency`] of its members, in the
/// same words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    /// At least one member was not frozen (point version 2; version-1 points said `crash`).
    NotFrozen,
    /// Every member was frozen: like a power cut.
    Crash,
    /// Every member was frozen with its applications quiesced.
    App,
}

impl PointKind {
    /// The kind of a point whose weakest member is `weakest`.
    pub fn of(weakest: Consistency) -> Self {
        match weakest {
            Consistency::NotFrozen => PointKind::NotFrozen,
            Consistency::Crash => PointKind::Crash,
            Consistency::App => PointKind::App,
        }
    }

    fn consistency(self) -> Consistency {
        match self {
            PointKind::NotFrozen => Consistency::NotFrozen,
            PointKind::Crash => Consistency::Crash,
            PointKind::App => Consistency::App,
        }
    }
}

impl fmt::Display for PointKind {
    /// The words of [`Consistency`]: every command and report says the same thing the same way.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.consistency().fmt(f)
    }
}

/// One disk of a covered VM: which tag of it the point uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    pub disk: DiskId,
    pub tag: u64,
}

/// A VM covered by a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub vm: VmId,
    pub disks: Vec<DiskRef>,
    /// The weakest consistency among this VM's tags in the point.
    pub consistency: Consistency,
}

/// A VM of the group left out of a point, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Excluded {
    pub vm: VmId,
    pub reason: String,
}

/// A recovery point: one tag per disk of each covered VM, plus time and kind of the cut.
/// Written last and once (create-only): its existence is its publication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryPoint {
    pub id: PointId,
    pub group: GroupId,
    pub time: UnixMillis,
    pub kind: PointKind,
    /// Whether the VMs were cut together (a shared freeze) rather than one VM alone.
    pub multi_vm: bool,
    pub members: Vec<Member>,
    #[serde(default)]
    pub excluded: Vec<Excluded>,
}

impl RecoveryPoint {
    /// Serialises into a point object.
    pub fn encode(&self) -> Bytes {
        envelope(
            "point",
            &serde_json::to_vec_pretty(self).expect("point serialises"),
        )
    }

    /// Parses and verifies a point object.
    pub fn decode(object: &str, data: &[u8]) -> Result<Self, ManifestError> {
        let (_, body) = open_envelope("point", object, data)?;
        let p: RecoveryPoint = serde_json::from_slice(body).map_err(|e| ManifestError {
            object: object.into(),
            kind: "recovery point",
            what: e.to_string(),
        })?;
        if p.members.is_empty() {
            return Err(ManifestError {
                object: object.into(),
                kind: "recovery point",
                what: "covers no VM".into(),
            });
        }
        Ok(p)
    }

    /// What the point can promise: its kind, weakened to its weakest member. A version-1 point
    /// stored `crash` even when a member was not frozen; this says `not-frozen` for it.
    pub fn effective_kind(&self) -> PointKind {
        let weakest = self
            .members
            .iter()
            .map(|m| m.consistency)
            .fold(self.kind.consistency(), Consistency::min);
        PointKind::of(weakest)
    }

    /// The member entry of `vm`, if the point covers it.
    pub fn member(&self, vm: &VmId) -> Option<&Member> {
        self.members.iter().find(|m| &m.vm == vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag() -> Tag {
        Tag {
            vm: VmId::new("vm1").unwrap(),
            disk: DiskId::new("root").unwrap(),
            seq: 3,
            from_segment: 1,
            through_segment: 7,
            time: 1_700_000_000_000,
            consistency: Consistency::Crash,
            block_size: 65536,
            shape: DiskShape::Image { size: 1 << 30 },
            origin: None,
        }
    }

    #[test]
    fn tag_round_trips_and_rejects_damage() {
        let t = tag();
        let raw = t.encode();
        assert_eq!(Tag::decode("t", &raw).unwrap(), t);
        for i in [0, 10, raw.len() / 2, raw.len() - 2] {
            let mut bad = raw.to_vec();
            bad[i] ^= 0x20;
            assert!(Tag::decode("t", &bad).is_err(), "flip at {i} accepted");
        }
        let err = Tag::decode("v1/x.tag", &raw[..raw.len() - 1]).unwrap_err();
        assert!(
            err.to_string().starts_with("v1/x.tag is not a valid tag"),
            "{err}"
        );
        // A point object is not a tag even though both are JSON envelopes.
        assert!(Tag::decode("t", &sample_point().encode()).is_err());
    }

    #[test]
    fn tag_rejects_unknown_fields_and_bad_ids() {
        let body = serde_json::to_string(&tag()).unwrap();
        let extra = body.replacen('{', "{\"surprise\":1,", 1);
        assert!(Tag::decode("t", &envelope("tag", extra.as_bytes())).is_err());
        let bad_id = body.replace("\"vm1\"", "\"../vm1\"");
        assert!(Tag::decode("t", &envelope("tag", bad_id.as_bytes())).is_err());
    }

    #[test]
    fn a_tag_with_an_origin_is_version_2_and_every_other_stays_version_1() {
        let plain = tag().encode();
        assert!(plain.starts_with(b"lifeboat-tag 1 "));
        let mut t = tag();
        t.origin = Some(2);
        let delta = t.encode();
        assert!(delta.starts_with(b"lifeboat-tag 2 "));
        assert_eq!(Tag::decode("t", &delta).unwrap(), t);
        // The field at version 1 (a reader of version 1 would not know it) is refused.
        let body = serde_json::to_vec(&t).unwrap();
        let err = Tag::decode("t", &envelope_at("tag", 1, &body)).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        // An origin must be an earlier tag: chains of origins only go back.
        for o in [0, 3, 4] {
            t.origin = Some(o);
            let err = Tag::decode("t", &t.encode()).unwrap_err();
            assert!(err.to_string().contains("origin"), "{o}: {err}");
        }
    }

    #[test]
    fn tag_refuses_block_sizes_and_sizes_a_restore_cannot_plan() {
        // A forged block size of 1 would make a planner walk one entry per byte of the disk.
        for bs in [0u32, 1, 1000, 4095, 65537, 1 << 30] {
            let mut t = tag();
            t.block_size = bs;
            let err = Tag::decode("v1/x.tag", &t.encode()).unwrap_err();
            assert!(err.to_string().contains("block size"), "{bs}: {err}");
        }
        let mut t = tag();
        t.block_size = 4096;
        t.shape = DiskShape::Image { size: u64::MAX };
        assert!(Tag::decode("t", &t.encode()).is_err());
        let mut t = tag();
        t.through_segment = u64::MAX;
        assert!(Tag::decode("t", &t.encode()).is_err());
    }

    fn sample_point() -> RecoveryPoint {
        RecoveryPoint {
            id: PointId::new("p-1").unwrap(),
            group: GroupId::new("g").unwrap(),
            time: 5,
            kind: PointKind::App,
            multi_vm: true,
            members: vec![Member {
                vm: VmId::new("vm1").unwrap(),
                disks: vec![DiskRef {
                    disk: DiskId::new("root").unwrap(),
                    tag: 3,
                }],
                consistency: Consistency::App,
            }],
            excluded: vec![Excluded {
                vm: VmId::new("vm2").unwrap(),
                reason: "missed the freeze deadline".into(),
            }],
        }
    }

    #[test]
    fn point_round_trips() {
        let p = sample_point();
        assert_eq!(RecoveryPoint::decode("p", &p.encode()).unwrap(), p);
    }

    /// Regression: a point with a member that was not frozen is stored as not-frozen and
    /// said so in the words every command uses; a version-1 point that stored `crash` for one
    /// is still read, and still says not-frozen.
    #[test]
    fn a_point_not_frozen_says_so_and_old_points_still_read() {
        let mut p = sample_point();
        p.members[0].consistency = Consistency::NotFrozen;
        p.kind = PointKind::of(Consistency::NotFrozen);
        let raw = p.encode();
        assert!(raw.starts_with(b"lifeboat-point 2 "));
        assert!(String::from_utf8_lossy(&raw).contains("\"kind\": \"not_frozen\""));
        assert_eq!(RecoveryPoint::decode("p", &raw).unwrap(), p);
        assert_eq!(p.effective_kind().to_string(), "not-frozen");
        assert_eq!(
            p.effective_kind().to_string(),
            p.members[0].consistency.to_string()
        );

        let mut old = p.clone();
        old.kind = PointKind::Crash;
        let body = serde_json::to_vec(&old).unwrap();
        let v1 = format!("lifeboat-point 1 {}\n", blake3::hash(&body).to_hex());
        let v1 = [v1.as_bytes(), &body].concat();
        let read = RecoveryPoint::decode("p", &v1).unwrap();
        assert_eq!(read.kind, PointKind::Crash);
        assert_eq!(read.effective_kind(), PointKind::NotFrozen);
        let v3 = String::from_utf8_lossy(&v1).replacen("point 1", "point 3", 1);
        assert!(RecoveryPoint::decode("p", v3.as_bytes()).is_err());
        assert_eq!(PointKind::App.to_string(), Consistency::App.to_string());
        assert_eq!(PointKind::Crash.to_string(), "crash-consistent");
    }

    #[test]
    fn tree_checks_paths() {
        let mk = |path: &str| Tree {
            entries: vec![TreeEntry {
                path: path.into(),
                kind: EntryKind::Dir,
                mode: 0o755,
                mtime: 0,
            }],
        };
        let (_, ok) = mk("a/b c/d").encode();
        assert!(Tree::decode("t", &ok).is_ok());
        for bad in ["../x", "/etc", "a//b", "a/./b", ""] {
            let (_, raw) = mk(bad).encode();
            assert!(Tree::decode("t", &raw).is_err(), "{bad:?} accepted");
        }
    }
}
