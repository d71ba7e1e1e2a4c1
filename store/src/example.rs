//! The example store behind the format's test vectors (`store/tests/vectors/`, described in
//! `docs/format.md`): one VM with an image disk and a directory disk, three tags of each, a
//! base (compaction) of each at the second tag (the second segment, which it stands for,
//! deleted as retention would), and three single-VM recovery points — written through
//! the real writer and compactor, so every object is one the product would write.
//!
//! Deterministic: fixed contents, times, modes and zstd level, so rebuilding it gives the same
//! bytes with the same zstd. [`build`] returns what each point must restore to, computed from
//! the contents it wrote, never from a restore.

use bytes::Bytes;

use crate::backend::DynBackend;
use crate::codec::SegmentBuilder;
use crate::compact::compact;
use crate::error::Result;
use crate::layout::Layout;
use crate::manifest::{
    Consistency, DiskRef, DiskShape, EntryKind, Member, PointKind, RecoveryPoint, Tag, Tree,
    TreeEntry,
};
use crate::name::{DiskId, GroupId, PointId, VmId};
use crate::restore::StoreReader;
use crate::writer::StoreWriter;

/// The example's group, VM and disks.
pub const GROUP: &str = "vectors";
pub const VM: &str = "vm1";
pub const IMAGE_DISK: &str = "os";
pub const DIR_DISK: &str = "data";
/// Block size of both disks: the smallest the format allows, so the example stays small.
pub const BLOCK: u32 = 4096;
/// Base parts are cut at this size, so the image's base has more than one part.
const PART_BYTES: usize = 4096;
/// Time of the first cut (2026-01-01T00:00:00Z, ms); later cuts follow by a minute.
const T0: u64 = 1_767_225_600_000;
/// The number of the first segment and tag of each disk: a history begun at [`T0`] numbers
/// from `(T0 << 20) + 1` (`history_start` in `agent/src/sync.rs`, `docs/format.md`,
/// numbering). Round `r` (1..=3) writes segment and tag `FIRST + r - 1`.
/// lead: numbering — change this (and regenerate) if the rule changes.
pub const FIRST: u64 = (T0 << 20) + 1;

/// One thing a restored disk must hold: `path` is `""` for an image disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub point: PointId,
    pub disk: DiskId,
    pub path: String,
    pub what: ExpectedKind,
}

/// A file's (or image's) bytes, or a symlink's target, or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedKind {
    File(Vec<u8>),
    Symlink(String),
    Dir,
}

impl Expected {
    /// One line of `expected.txt`: `<point> <disk> <path or -> file <size> <blake3>`,
    /// `… symlink <target>` or `… dir`.
    pub fn line(&self) -> String {
        let path = if self.path.is_empty() {
            "-"
        } else {
            &self.path
        };
        let what = match &self.what {
            ExpectedKind::File(b) => format!("file {} {}", b.len(), blake3::hash(b).to_hex()),
            ExpectedKind::Symlink(t) => format!("symlink {t}"),
            ExpectedKind::Dir => "dir".into(),
        };
        format!("{} {} {path} {what}", self.point, self.disk)
    }
}

/// Deterministic bytes that do not compress (so a block is stored raw).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Text that compresses (so a block is stored as zstd).
fn text(len: usize, what: &str) -> Vec<u8> {
    what.as_bytes().iter().copied().cycle().take(len).collect()
}

/// A directory disk's state: entries by path (sorted), file contents alongside.
type Dir = Vec<(String, ExpectedKind)>;

fn tree_of(dir: &Dir, mtime: u64) -> Tree {
    let mut entries: Vec<TreeEntry> = dir
        .iter()
        .map(|(path, what)| TreeEntry {
            path: path.clone(),
            kind: match what {
                ExpectedKind::File(b) => EntryKind::File {
                    size: b.len() as u64,
                },
                ExpectedKind::Symlink(t) => EntryKind::Symlink { target: t.clone() },
                ExpectedKind::Dir => EntryKind::Dir,
            },
            mode: match what {
                ExpectedKind::File(_) => 0o644,
                ExpectedKind::Symlink(_) => 0, // as the agent writes it: a link has no mode of its own
                ExpectedKind::Dir => 0o755,
            },
            mtime,
        })
        .collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Tree { entries }
}

/// Adds the blocks of `data` (a whole image or file) at block numbers `blocks` (all if `None`).
fn add_blocks(b: &mut SegmentBuilder, target: &str, data: &[u8], blocks: Option<&[u64]>) {
    let bs = BLOCK as u64;
    let all: Vec<u64> = (0..(data.len() as u64).div_ceil(bs)).collect();
    for &blk in blocks.unwrap_or(&all) {
        let start = (blk * bs) as usize;
        let end = (start + BLOCK as usize).min(data.len());
        b.add(target, start as u64, &data[start..end]);
    }
}

/// Writes the example store into `backend` (which should be empty) and returns what each
/// point restores to, in point order.
pub async fn build(backend: DynBackend) -> Result<Vec<Expected>> {
    let group = GroupId::new(GROUP).expect("valid");
    let vm = VmId::new(VM).expect("valid");
    let os = DiskId::new(IMAGE_DISK).expect("valid");
    let data = DiskId::new(DIR_DISK).expect("valid");
    let layout = Layout::new(group.clone());
    let writer = StoreWriter::new(backend.clone(), layout.clone());
    let reader = StoreReader::new(backend, layout);

    // The image: text, zeros, noise (the one block stored raw: the example stays a few KiB),
    // and a short last block (14000 bytes).
    let mut image = text(4096, "lifeboat example image, block 0\n");
    image.extend(vec![0u8; 4096]);
    image.extend(noise(4096, 2));
    image.extend(text(14000 - 12288, "tail of the image\n"));
    let mut dir: Dir = vec![
        ("empty".into(), ExpectedKind::Dir),
        (
            "hello.txt".into(),
            ExpectedKind::File(b"hello, lifeboat\n".to_vec()),
        ),
        ("link".into(), ExpectedKind::Symlink("hello.txt".into())),
        ("sub".into(), ExpectedKind::Dir),
        (
            "sub/blocks.bin".into(),
            ExpectedKind::File(
                [
                    text(4096, "first block of blocks.bin\n"),
                    text(1904, "second block\n"),
                ]
                .concat(),
            ),
        ),
    ];

    let mut expected = Vec::new();
    for round in 1..=3u64 {
        let time = T0 + (round - 1) * 60_000;
        let seq = FIRST + round - 1;
        // What changed this round, in each disk (the first round ships everything).
        let mut img_seg = SegmentBuilder::new(BLOCK, 3);
        let mut dir_seg = SegmentBuilder::new(BLOCK, 3);
        match round {
            1 => {
                add_blocks(&mut img_seg, "", &image, None);
                for (path, what) in &dir {
                    if let ExpectedKind::File(b) = what {
                        add_blocks(&mut dir_seg, path, b, None);
                    }
                }
            }
            2 => {
                // One block of the image rewritten; one file grows.
                image[8192..8192 + 4096]
                    .copy_from_slice(&text(4096, "block 2, rewritten in round 2\n"));
                add_blocks(&mut img_seg, "", &image, Some(&[2]));
                let hello = b"hello, lifeboat\nsecond line\n".to_vec();
                add_blocks(&mut dir_seg, "hello.txt", &hello, None);
                dir[1].1 = ExpectedKind::File(hello);
            }
            _ => {
                // The image grows to 4 full blocks; a file is removed, another added.
                image.resize(16384, 0);
                image[12288..].copy_from_slice(&text(4096, "block 3, round 3\n"));
                add_blocks(&mut img_seg, "", &image, Some(&[3]));
                dir.retain(|(p, _)| p != "sub/blocks.bin");
                let new = text(5000, "new file\n");
                add_blocks(&mut dir_seg, "new.txt", &new, None);
                dir.push(("new.txt".into(), ExpectedKind::File(new)));
                dir.sort_by(|a, b| a.0.cmp(&b.0));
            }
        }
        let consistency = if round == 3 {
            Consistency::App
        } else {
            Consistency::Crash
        };
        writer.put_segment(&vm, &os, seq, img_seg.finish()).await?;
        writer
            .put_segment(&vm, &data, seq, dir_seg.finish())
            .await?;
        let tree = writer.put_tree(&vm, &data, &tree_of(&dir, time)).await?;
        let tag = |disk: &DiskId, shape: DiskShape| Tag {
            vm: vm.clone(),
            disk: disk.clone(),
            seq,
            from_segment: FIRST,
            through_segment: seq,
            time,
            consistency,
            block_size: BLOCK,
            shape,
            origin: None,
        };
        let os_tag = tag(
            &os,
            DiskShape::Image {
                size: image.len() as u64,
            },
        );
        let data_tag = tag(&data, DiskShape::Directory { tree });
        writer.put_tag(&os_tag).await?;
        writer.put_tag(&data_tag).await?;
        if round == 2 {
            // As a prune does: compact, then delete what no tag reads any more — the second
            // segment, which the base stands for (the first tag still reads the first segment).
            for (disk, tag) in [(&os, &os_tag), (&data, &data_tag)] {
                compact(&reader, tag, PART_BYTES, 3).await?;
                let seg = reader.layout().segment(&vm, disk, seq);
                reader.backend().delete(&seg).await?;
            }
        }
        // The single-VM point id an agent writes: `<vm>-<time>-t<newest tag>`.
        let id = PointId::new(format!("{vm}-{time}-t{seq}")).expect("valid");
        writer
            .put_point(&RecoveryPoint {
                id: id.clone(),
                group: group.clone(),
                time,
                kind: PointKind::of(consistency),
                multi_vm: false,
                members: vec![Member {
                    vm: vm.clone(),
                    disks: vec![
                        DiskRef {
                            disk: os.clone(),
                            tag: seq,
                        },
                        DiskRef {
                            disk: data.clone(),
                            tag: seq,
                        },
                    ],
                    consistency,
                }],
                excluded: vec![],
            })
            .await?;
        expected.push(Expected {
            point: id.clone(),
            disk: os.clone(),
            path: String::new(),
            what: ExpectedKind::File(image.clone()),
        });
        for (path, what) in &dir {
            expected.push(Expected {
                point: id.clone(),
                disk: data.clone(),
                path: path.clone(),
                what: what.clone(),
            });
        }
    }
    Ok(expected)
}

/// The bytes of `expected.txt` for `expected`.
pub fn expected_text(expected: &[Expected]) -> Bytes {
    let mut out = String::from(
        "# <point> <disk> <path, - for an image> file <size> <blake3> | symlink <target> | dir\n",
    );
    for e in expected {
        out.push_str(&e.line());
        out.push('\n');
    }
    Bytes::from(out)
}
