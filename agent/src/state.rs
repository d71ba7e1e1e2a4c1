//! Durable local state of each protected disk: what was last shipped and tagged.
//!
//! One file per disk in the state directory, replaced atomically (temp file, fsync, rename,
//! fsync directory) and checksummed, so after a crash it is either the previous good state or
//! the new one — and a damaged file is detected, reported and replaced by a resync.
//!
//! Format 3 (written now): a line `lifeboat-state 3 <blake3 of the rest, hex>`, then the
//! length of a JSON header (u64, little endian), the header (everything but an image's block
//! hashes; for an image, the name, length and id of its base file, see `blocks`), then the
//! image's overlay: (block number u64 LE, hash) pairs, 40 bytes each, ascending. An image's
//! hashes live in the base file, 32 bytes per block, written once and never rewritten in place;
//! a save writes only the hashes changed since (at most `blocks::OVERLAY_CAP` of them).
//! Formats 2 (the header, then every block hash raw) and 1 (hex in JSON) are still read, and
//! become format 3 at the next save.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use lifeboat_store::codec::Hash;
use lifeboat_store::durable::Access;
use lifeboat_store::{DiskId, VmId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::blocks::BaseRef;
pub use crate::blocks::BlockHashes;

/// The format `save` writes.
pub const STATE_VERSION: u32 = 3;

/// Block hashes, stored compactly as one hex string (a directory's files; format 1 images).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hashes(pub Vec<Hash>);

impl Serialize for Hashes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(self.0.len() * 64);
        for h in &self.0 {
            for b in h {
                out.push_str(&format!("{b:02x}"));
            }
        }
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Hashes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 64 != 0 {
            return Err(serde::de::Error::custom("hash list has a partial hash"));
        }
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(s.len() / 64);
        for chunk in bytes.chunks(64) {
            let mut h = [0u8; 32];
            for (i, pair) in chunk.chunks(2).enumerate() {
                let txt = std::str::from_utf8(pair).map_err(serde::de::Error::custom)?;
                h[i] = u8::from_str_radix(txt, 16).map_err(serde::de::Error::custom)?;
            }
            out.push(h);
        }
        Ok(Hashes(out))
    }
}

/// What the agent knows of one file of a directory disk as last shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub size: u64,
    /// Change stamp (mtime ns, ctime ns, inode); `None` forces a re-read on the next scan.
    pub stamp: Option<(i64, i64, u64)>,
    pub hashes: Hashes,
}

/// What the disk held at the last tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Image { size: u64, hashes: BlockHashes },
    Directory { files: BTreeMap<String, FileState> },
}

/// Durable state of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    pub version: u32,
    pub vm: VmId,
    pub disk: DiskId,
    pub block_size: u32,
    /// Last tag written (0: none yet).
    pub tag_seq: u64,
    /// First segment of the current full copy.
    pub from_segment: u64,
    /// Last segment covered by the last tag (`from_segment - 1` if none).
    pub through_segment: u64,
    pub content: Content,
    /// Where the block tracker stood when `content` was read: the next pass reads only blocks
    /// written since. `None`: the next pass scans.
    pub tracking: Option<crate::cbt::Cursor>,
    /// The tag the current history lies over (a resync by checksum compare), which its tags
    /// carry (`docs/format.md`, tag `origin`); `None` for a history that began as a full copy.
    pub origin: Option<u64>,
}

/// The state file's JSON part, in every format.
#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    vm: VmId,
    disk: DiskId,
    block_size: u32,
    tag_seq: u64,
    from_segment: u64,
    through_segment: u64,
    content: HeaderContent,
    #[serde(default)]
    tracking: Option<crate::cbt::Cursor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum HeaderContent {
    Image {
        size: u64,
        /// Format 1: every hash, hex; format 2: empty (the hashes follow the header raw).
        #[serde(default, skip_serializing)]
        hashes: Hashes,
        /// Format 3: the number of blocks and the base file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blocks: Option<BlocksHeader>,
    },
    Directory {
        files: BTreeMap<String, FileState>,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlocksHeader {
    /// Blocks of the disk.
    len: u64,
    /// Of those, how many the bases answer for.
    base_len: u64,
    /// Base file of each extent (`blocks::EXTENT` blocks), `null` where none is known.
    extents: Vec<Option<BaseRef>>,
}

impl DiskState {
    /// The state of a disk never shipped: the next cycle is a full copy starting at segment
    /// `from_segment`.
    pub fn fresh(
        vm: VmId,
        disk: DiskId,
        block_size: u32,
        directory: bool,
        from_segment: u64,
    ) -> Self {
        Self {
            version: STATE_VERSION,
            vm,
            disk,
            block_size,
            tag_seq: 0,
            from_segment,
            through_segment: from_segment - 1,
            tracking: None,
            origin: None,
            content: if directory {
                Content::Directory {
                    files: BTreeMap::new(),
                }
            } else {
                Content::Image {
                    size: 0,
                    hashes: BlockHashes::default(),
                }
            },
        }
    }
}

/// Why a state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path} cannot be read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is damaged: {what}")]
    Damaged { path: PathBuf, what: String },
}

/// The state file of a disk.
pub fn path_of(state_dir: &Path, disk: &DiskId) -> PathBuf {
    state_dir.join(format!("{disk}.state"))
}

/// Loads a disk's state; `Ok(None)` if there is none. Reads the header and the overlay; an
/// image's base file is opened and its page checksums read, its hashes only when used. A state
/// of an earlier format gets its base file written here (save it soon: until then every load
/// writes another).
pub fn load(state_dir: &Path, disk: &DiskId) -> Result<Option<DiskState>, StateError> {
    read(state_dir, disk, true)
}

/// A disk's state without an image's block hashes (empty): what `status` shows. Reads only the
/// state file, and writes nothing.
pub fn peek(state_dir: &Path, disk: &DiskId) -> Result<Option<DiskState>, StateError> {
    read(state_dir, disk, false)
}

fn read(state_dir: &Path, disk: &DiskId, hashes: bool) -> Result<Option<DiskState>, StateError> {
    let path = path_of(state_dir, disk);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let damaged = |what: &str| StateError::Damaged {
        path: path.clone(),
        what: what.to_owned(),
    };
    let nl = data
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| damaged("no header"))?;
    let line = std::str::from_utf8(&data[..nl]).map_err(|_| damaged("bad header"))?;
    let body = &data[nl + 1..];
    let sum = blake3::hash(body).to_hex();
    let (version, json, raw): (u32, &[u8], &[u8]) = if line == format!("lifeboat-state 1 {sum}") {
        (1, body, &[])
    } else if let Some(v @ (2 | 3)) = [2, 3]
        .into_iter()
        .find(|v| line == format!("lifeboat-state {v} {sum}"))
    {
        let len = body
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .ok_or_else(|| damaged("truncated"))?;
        let json = body
            .get(8..8usize.saturating_add(len))
            .ok_or_else(|| damaged("truncated"))?;
        (v, json, &body[8 + len..])
    } else {
        return Err(damaged("checksum or version mismatch"));
    };
    let header: Header = serde_json::from_slice(json).map_err(|e| damaged(&e.to_string()))?;
    if header.disk != *disk {
        return Err(damaged("belongs to another disk"));
    }
    let content = match header.content {
        HeaderContent::Directory { files } if raw.is_empty() => Content::Directory { files },
        HeaderContent::Directory { .. } => return Err(damaged("block hashes for a directory")),
        HeaderContent::Image { size, .. } if !hashes => Content::Image {
            size,
            hashes: BlockHashes::default(),
        },
        HeaderContent::Image {
            size,
            hashes,
            blocks,
        } => {
            let hashes =
                match (version, blocks) {
                    (3, Some(b)) => {
                        if raw.len() % 40 != 0 {
                            return Err(damaged("partial overlay entry"));
                        }
                        let mut overlay = BTreeMap::new();
                        let mut last = None;
                        for e in raw.chunks_exact(40) {
                            let i = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                            if last.is_some_and(|l| l >= i) {
                                return Err(damaged("overlay out of order"));
                            }
                            last = Some(i);
                            overlay.insert(i, e[8..].try_into().expect("32 bytes"));
                        }
                        BlockHashes::open(state_dir, b.len, b.base_len, &b.extents, overlay)
                            .map_err(|e| {
                                match e.kind() {
                                    // A base that is gone or fails its checks: the state cannot be used.
                                    std::io::ErrorKind::NotFound
                                    | std::io::ErrorKind::InvalidData => damaged(&e.to_string()),
                                    // Anything else (out of descriptors, an I/O error) may pass: the
                                    // state is not thrown away for it.
                                    _ => StateError::Io {
                                        path: path.clone(),
                                        source: e,
                                    },
                                }
                            })?
                    }
                    (3, None) => return Err(damaged("image without block hashes")),
                    (v, _) => {
                        let list: Vec<Hash> = if v == 2 {
                            if raw.len() % 32 != 0 {
                                return Err(damaged("partial block hash"));
                            }
                            raw.chunks_exact(32)
                                .map(|c| c.try_into().expect("32 bytes"))
                                .collect()
                        } else {
                            hashes.0
                        };
                        BlockHashes::from_vec(state_dir, disk.as_str(), &list).map_err(
                            |source| StateError::Io {
                                path: path.clone(),
                                source,
                            },
                        )?
                    }
                };
            Content::Image { size, hashes }
        }
    };
    Ok(Some(DiskState {
        version,
        vm: header.vm,
        disk: header.disk,
        block_size: header.block_size,
        tag_seq: header.tag_seq,
        from_segment: header.from_segment,
        through_segment: header.through_segment,
        content,
        tracking: header.tracking,
        origin: header.origin,
    }))
}

/// Replaces a disk's state atomically and durably: merges an image's overlay into a new base
/// first if it outgrew its cap (in `state` itself, so the next save does not merge again), then
/// writes the header and the overlay, then removes base files no state in this process holds.
pub fn save(state_dir: &Path, state: &mut DiskState) -> Result<(), StateError> {
    let path = path_of(state_dir, &state.disk);
    let io = |source| StateError::Io {
        path: path.clone(),
        source,
    };
    let disk = state.disk.to_string();
    let disk = disk.as_str();
    if let Content::Image { hashes, .. } = &mut state.content {
        hashes.merge_if_large(state_dir, disk).map_err(io)?;
    }
    let (content, overlay, keep) = match &state.content {
        Content::Image { size, hashes } => {
            let extents = hashes.base_refs(state_dir, disk).map_err(io)?;
            let keep: Vec<String> = extents.iter().flatten().map(|b| b.name.clone()).collect();
            (
                HeaderContent::Image {
                    size: *size,
                    hashes: Hashes::default(),
                    blocks: Some(BlocksHeader {
                        len: hashes.len(),
                        base_len: hashes.base_len(),
                        extents,
                    }),
                },
                Some(hashes),
                keep,
            )
        }
        Content::Directory { files } => (
            HeaderContent::Directory {
                files: files.clone(),
            },
            None,
            Vec::new(),
        ),
    };
    let header = Header {
        version: STATE_VERSION,
        vm: state.vm.clone(),
        disk: state.disk.clone(),
        block_size: state.block_size,
        tag_seq: state.tag_seq,
        from_segment: state.from_segment,
        through_segment: state.through_segment,
        content,
        tracking: state.tracking.clone(),
        origin: state.origin,
    };
    let json = serde_json::to_vec(&header).expect("state serialises");
    let len = (json.len() as u64).to_le_bytes();
    let mut sum = blake3::Hasher::new();
    sum.update(&len).update(&json);
    let entries: Vec<(u64, Hash)> = overlay.map(|h| h.overlay().collect()).unwrap_or_default();
    for (i, h) in &entries {
        sum.update(&i.to_le_bytes()).update(h);
    }
    // A full disk leaves the old state and no half-written file behind.
    lifeboat_store::durable::replace_with(&path, Access::Shared, |w| {
        writeln!(
            w,
            "lifeboat-state {STATE_VERSION} {}",
            sum.finalize().to_hex()
        )?;
        w.write_all(&len)?;
        w.write_all(&json)?;
        for (i, h) in &entries {
            w.write_all(&i.to_le_bytes())?;
            w.write_all(h)?;
        }
        Ok(())
    })
    .map_err(io)?;
    state.version = STATE_VERSION;
    // Bases of earlier states, and of passes that never got saved, are no longer needed (one
    // still held in memory reads through its open handle, and is written again if saved).
    BlockHashes::collect_garbage(state_dir, disk, &keep);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, hashes: &[Hash]) -> Content {
        Content::Image {
            size: hashes.len() as u64 * 4096,
            hashes: BlockHashes::from_vec(dir, "d", hashes).unwrap(),
        }
    }

    #[test]
    fn round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskId::new("d").unwrap();
        assert!(load(dir.path(), &disk).unwrap().is_none());
        let mut s = DiskState::fresh(VmId::new("vm").unwrap(), disk.clone(), 4096, false, 1);
        s.content = image(dir.path(), &[[1; 32], [0xab; 32]]);
        save(dir.path(), &mut s).unwrap();
        assert_eq!(load(dir.path(), &disk).unwrap().unwrap(), s);
        let p = path_of(dir.path(), &disk);
        let mut raw = fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 5] ^= 1;
        fs::write(&p, raw).unwrap();
        let err = load(dir.path(), &disk).unwrap_err();
        assert!(err.to_string().contains("is damaged"), "{err}");
    }

    #[test]
    fn a_save_writes_the_changes_not_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskId::new("d").unwrap();
        let blocks = 16_384u64; // 1 GiB of 64 KiB blocks
        let mut s = DiskState::fresh(VmId::new("vm").unwrap(), disk.clone(), 65536, false, 1);
        let all: Vec<Hash> = (0..blocks).map(|i| [(i % 251) as u8; 32]).collect();
        s.content = image(dir.path(), &all);
        s.tag_seq = 7;
        save(dir.path(), &mut s).unwrap();
        assert_eq!(load(dir.path(), &disk).unwrap().unwrap(), s);
        let on_disk = |dir: &Path| -> u64 {
            fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum()
        };
        assert!(
            on_disk(dir.path()) <= blocks * 33 + 4096,
            "{} bytes of state for {blocks} blocks",
            on_disk(dir.path())
        );
        // A tag changing 3 blocks rewrites a state file of a few hundred bytes; the base file
        // stays as it was.
        let Content::Image { hashes, .. } = &mut s.content else {
            unreachable!()
        };
        for i in [0, 5000, blocks - 1] {
            hashes.set(i, [0xee; 32]);
        }
        save(dir.path(), &mut s).unwrap();
        let len = fs::metadata(path_of(dir.path(), &disk)).unwrap().len();
        assert!(len < 1024, "state file of {len} bytes after 3 changes");
        let back = load(dir.path(), &disk).unwrap().unwrap();
        assert_eq!(back, s);
        // (A state held in memory keeps its base file from collection.)
        drop(back);
        // Past the cap, the save merges the changes into a new base and drops the old one.
        let Content::Image { hashes, .. } = &mut s.content else {
            unreachable!()
        };
        for i in 0..=crate::blocks::OVERLAY_CAP as u64 {
            hashes.set(i % blocks, [0x11; 32]);
            hashes.set(blocks + i, [0x22; 32]);
        }
        save(dir.path(), &mut s).unwrap();
        let len = fs::metadata(path_of(dir.path(), &disk)).unwrap().len();
        assert!(len < 1024, "state file of {len} bytes after a merge");
        let files = fs::read_dir(dir.path()).unwrap().count() as u64;
        let extents =
            (blocks + crate::blocks::OVERLAY_CAP as u64 + 1).div_ceil(crate::blocks::EXTENT);
        assert_eq!(files, 1 + extents, "the state and one base file per extent");
        assert_eq!(load(dir.path(), &disk).unwrap().unwrap(), s);
    }

    #[test]
    fn formats_1_and_2_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskId::new("d").unwrap();
        let all: Vec<Hash> = (0..300u32).map(|i| [(i % 251) as u8; 32]).collect();
        let hex: String = all.iter().map(crate::blocks::hex).collect();
        let p = path_of(dir.path(), &disk);
        // Format 1 (hex in JSON), as earlier agents wrote it.
        let body = format!(
            r#"{{"version":1,"vm":"vm","disk":"d","block_size":4096,"tag_seq":7,"from_segment":1,"through_segment":9,"content":{{"kind":"image","size":1228800,"hashes":"{hex}"}}}}"#
        );
        let mut file = format!(
            "lifeboat-state 1 {}\n",
            blake3::hash(body.as_bytes()).to_hex()
        )
        .into_bytes();
        file.extend_from_slice(body.as_bytes());
        fs::write(&p, file).unwrap();
        let v1 = load(dir.path(), &disk).unwrap().unwrap();
        assert_eq!(v1.tag_seq, 7);
        let Content::Image { hashes, size } = &v1.content else {
            panic!("not an image")
        };
        assert_eq!((*size, hashes.to_vec().unwrap()), (1228800, all.clone()));
        // Format 2: the JSON header, then the hashes raw.
        let json = br#"{"version":2,"vm":"vm","disk":"d","block_size":4096,"tag_seq":7,"from_segment":1,"through_segment":9,"content":{"kind":"image","size":1228800,"hashes":""}}"#;
        let mut body = (json.len() as u64).to_le_bytes().to_vec();
        body.extend_from_slice(json);
        for h in &all {
            body.extend_from_slice(h);
        }
        let mut file = format!("lifeboat-state 2 {}\n", blake3::hash(&body).to_hex()).into_bytes();
        file.extend_from_slice(&body);
        fs::write(&p, &file).unwrap();
        let v2 = load(dir.path(), &disk).unwrap().unwrap();
        assert_eq!((v2.tag_seq, v2.content), (v1.tag_seq, v1.content));
        // Truncated or padded binary sections are damage, not a shorter disk.
        body.extend_from_slice(&[0; 5]);
        let mut bad = format!("lifeboat-state 2 {}\n", blake3::hash(&body).to_hex()).into_bytes();
        bad.extend_from_slice(&body);
        fs::write(&p, bad).unwrap();
        let err = load(dir.path(), &disk).unwrap_err();
        assert!(err.to_string().contains("partial block hash"), "{err}");
    }

    #[test]
    fn a_damaged_or_missing_base_makes_the_state_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskId::new("d").unwrap();
        let mut s = DiskState::fresh(VmId::new("vm").unwrap(), disk.clone(), 4096, false, 1);
        s.content = image(dir.path(), &[[3; 32]; 10]);
        save(dir.path(), &mut s).unwrap();
        // Nothing of this process holds the base open (Windows would keep its name until then).
        let tag = s.tag_seq;
        drop(s);
        let base = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains(".blocks."))
            .unwrap();
        let mut raw = fs::read(&base).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1; // the trailer's id
        fs::write(&base, &raw).unwrap();
        let err = load(dir.path(), &disk).unwrap_err();
        assert!(
            err.to_string().contains("not the base the state names"),
            "{err}"
        );
        fs::remove_file(&base).unwrap();
        let err = load(dir.path(), &disk).unwrap_err();
        assert!(matches!(err, StateError::Damaged { .. }), "{err}");
        #[cfg(unix)]
        assert!(err.to_string().contains("No such file"), "{err}");
        // `status` reads the state file alone.
        assert_eq!(peek(dir.path(), &disk).unwrap().unwrap().tag_seq, tag);
    }
}
