//! Durable local state of each protected disk: what was last shipped and tagged.
//!
//! One file per disk in the state directory, replaced atomically (temp file, fsync, rename,
//! fsync directory) and checksummed, so after a crash it is either the previous good state or
//! the new one — and a damaged file is detected, reported and replaced by a resync.
//!
//! Format 2 (written now): a line `lifeboat-state 2 <blake3 of the rest, hex>`, then the
//! length of a JSON header (u64, little endian), the header (everything but an image's block
//! hashes), then the image's block hashes raw, 32 bytes each — 32 bytes of state per block,
//! where format 1 (still read) spent 64 hex characters in JSON.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use lifeboat_store::codec::Hash;
use lifeboat_store::durable::Access;
use lifeboat_store::{DiskId, VmId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const STATE_VERSION: u32 = 2;

/// Block hashes, stored compactly as one hex string.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Content {
    Image { size: u64, hashes: Hashes },
    Directory { files: BTreeMap<String, FileState> },
}

/// Durable state of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default)]
    pub tracking: Option<crate::cbt::Cursor>,
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
            content: if directory {
                Content::Directory {
                    files: BTreeMap::new(),
                }
            } else {
                Content::Image {
                    size: 0,
                    hashes: Hashes::default(),
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

/// Loads a disk's state; `Ok(None)` if there is none.
pub fn load(state_dir: &Path, disk: &DiskId) -> Result<Option<DiskState>, StateError> {
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
    let header = std::str::from_utf8(&data[..nl]).map_err(|_| damaged("bad header"))?;
    let body = &data[nl + 1..];
    let sum = blake3::hash(body).to_hex();
    let state: DiskState = if header == format!("lifeboat-state 1 {sum}") {
        serde_json::from_slice(body).map_err(|e| damaged(&e.to_string()))?
    } else if header == format!("lifeboat-state {STATE_VERSION} {sum}") {
        let len = body
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .ok_or_else(|| damaged("truncated"))?;
        let json = body
            .get(8..8usize.saturating_add(len))
            .ok_or_else(|| damaged("truncated"))?;
        let raw = &body[8 + len..];
        let mut state: DiskState =
            serde_json::from_slice(json).map_err(|e| damaged(&e.to_string()))?;
        if raw.len() % 32 != 0 {
            return Err(damaged("partial block hash"));
        }
        match &mut state.content {
            Content::Image { hashes, .. } => {
                hashes.0 = raw
                    .chunks_exact(32)
                    .map(|c| c.try_into().expect("32 bytes"))
                    .collect();
            }
            Content::Directory { .. } if raw.is_empty() => {}
            Content::Directory { .. } => return Err(damaged("block hashes for a directory")),
        }
        state
    } else {
        return Err(damaged("checksum or version mismatch"));
    };
    if state.disk != *disk {
        return Err(damaged("belongs to another disk"));
    }
    Ok(Some(state))
}

/// Replaces a disk's state atomically and durably.
pub fn save(state_dir: &Path, state: &DiskState) -> Result<(), StateError> {
    let path = path_of(state_dir, &state.disk);
    let io = |source| StateError::Io {
        path: path.clone(),
        source,
    };
    // The header is the state without an image's block hashes, which follow it raw.
    let (json, raw): (Vec<u8>, &[Hash]) = match &state.content {
        Content::Image { size, hashes } => {
            let header = DiskState {
                version: STATE_VERSION,
                content: Content::Image {
                    size: *size,
                    hashes: Hashes::default(),
                },
                tracking: state.tracking.clone(),
                vm: state.vm.clone(),
                disk: state.disk.clone(),
                ..*state
            };
            (
                serde_json::to_vec(&header).expect("state serialises"),
                &hashes.0,
            )
        }
        Content::Directory { .. } => (serde_json::to_vec(state).expect("state serialises"), &[]),
    };
    // Checksummed, then written, without a second copy of the hashes in memory.
    let len = (json.len() as u64).to_le_bytes();
    let mut sum = blake3::Hasher::new();
    sum.update(&len).update(&json);
    for h in raw {
        sum.update(h);
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
        for h in raw {
            w.write_all(h)?;
        }
        Ok(())
    })
    .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskId::new("d").unwrap();
        assert!(load(dir.path(), &disk).unwrap().is_none());
        let mut s = DiskState::fresh(VmId::new("vm").unwrap(), disk.clone(), 4096, false, 1);
        s.content = Content::Image {
            size: 8192,
            hashes: Hashes(vec![[1; 32], [0xab; 32]]),
        };
        save(dir.path(), &s).unwrap();
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
    fn image_state_is_binary_and_format_1_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskId::new("d").unwrap();
        let blocks = 16_384; // 1 GiB of 64 KiB blocks
        let mut s = DiskState::fresh(VmId::new("vm").unwrap(), disk.clone(), 65536, false, 1);
        s.content = Content::Image {
            size: blocks * 65536,
            hashes: Hashes((0..blocks).map(|i| [(i % 251) as u8; 32]).collect()),
        };
        s.tag_seq = 7;
        save(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path(), &disk).unwrap().unwrap(), s);
        let len = fs::metadata(path_of(dir.path(), &disk)).unwrap().len();
        assert!(
            len <= blocks * 32 + 4096,
            "{len} bytes of state for {blocks} blocks"
        );
        // A state file of format 1 (hex in JSON), as earlier agents wrote it.
        let mut v1 = s.clone();
        v1.version = 1;
        let body = serde_json::to_vec(&v1).unwrap();
        let mut file = format!("lifeboat-state 1 {}\n", blake3::hash(&body).to_hex()).into_bytes();
        file.extend_from_slice(&body);
        fs::write(path_of(dir.path(), &disk), file).unwrap();
        let loaded = load(dir.path(), &disk).unwrap().unwrap();
        assert_eq!(loaded.content, s.content);
        // Truncated or padded binary sections are damage, not a shorter disk.
        save(dir.path(), &s).unwrap();
        let p = path_of(dir.path(), &disk);
        let raw = fs::read(&p).unwrap();
        let nl = raw.iter().position(|&b| b == b'\n').unwrap();
        let mut body = raw[nl + 1..].to_vec();
        body.extend_from_slice(&[0; 5]);
        let mut bad = format!("lifeboat-state 2 {}\n", blake3::hash(&body).to_hex()).into_bytes();
        bad.extend_from_slice(&body);
        fs::write(&p, bad).unwrap();
        let err = load(dir.path(), &disk).unwrap_err();
        assert!(err.to_string().contains("partial block hash"), "{err}");
    }
}
