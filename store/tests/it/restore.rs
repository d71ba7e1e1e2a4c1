//! Restore through a real local-directory store: byte-for-byte equality at every tag, the
//! write-ordering checks of the writer, and loud failures on damaged or missing objects.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use lifeboat_store::backend::local::LocalBackend;
use lifeboat_store::codec::SegmentBuilder;
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{
    Consistency, DiskRef, DiskShape, EntryKind, Member, PointKind, RecoveryPoint, Tag, Tree,
    TreeEntry,
};
use lifeboat_store::restore::{StoreReader, restore_disk};
use lifeboat_store::writer::StoreWriter;
use lifeboat_store::{DiskId, DynBackend, Error, GroupId, PointId, VmId};
use proptest::prelude::*;

const BS: u32 = 4096;

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    backend: DynBackend,
    writer: StoreWriter,
    reader: StoreReader,
    vm: VmId,
    disk: DiskId,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let backend: DynBackend = Arc::new(LocalBackend::open(&root).unwrap());
    let layout = Layout::new(GroupId::new("g").unwrap());
    Fixture {
        writer: StoreWriter::new(backend.clone(), layout.clone()),
        reader: StoreReader::new(backend.clone(), layout),
        backend,
        root,
        _dir: dir,
        vm: VmId::new("vm1").unwrap(),
        disk: DiskId::new("disk0").unwrap(),
    }
}

fn image_tag(f: &Fixture, seq: u64, through: u64, size: u64) -> Tag {
    Tag {
        vm: f.vm.clone(),
        disk: f.disk.clone(),
        seq,
        from_segment: 1,
        through_segment: through,
        time: seq,
        consistency: Consistency::Crash,
        block_size: BS,
        shape: DiskShape::Image { size },
        origin: None,
    }
}

/// Writes `disk` as segment `seq`, only the blocks in `dirty` (all when `None`).
async fn ship(f: &Fixture, seq: u64, disk: &[u8], dirty: Option<&[u64]>) {
    let mut b = SegmentBuilder::new(BS, 3);
    let blocks: Vec<u64> = match dirty {
        Some(d) => d.to_vec(),
        None => (0..(disk.len() as u64).div_ceil(BS as u64)).collect(),
    };
    for blk in blocks {
        let start = (blk * BS as u64) as usize;
        let end = (start + BS as usize).min(disk.len());
        b.add("", start as u64, &disk[start..end]);
    }
    f.writer
        .put_segment(&f.vm, &f.disk, seq, b.finish())
        .await
        .unwrap();
}

async fn restore_bytes(f: &Fixture, tag: &Tag, name: &str) -> Result<Vec<u8>, Error> {
    let out = f.root.parent().unwrap().join(name);
    restore_disk(&f.reader, tag, &out).await?;
    Ok(std::fs::read(out).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random writes over several increments: restoring each tag yields the disk exactly as it
    /// was when that tag was cut.
    #[test]
    fn every_tag_restores_exactly(
        size_blocks in 1u64..40,
        tail in 0u64..BS as u64,
        rounds in proptest::collection::vec(
            proptest::collection::vec((0u64..40, any::<u8>(), any::<bool>()), 0..10), 1..5),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let f = fixture();
            let size = size_blocks * BS as u64 + tail;
            let mut disk = vec![0u8; size as usize];
            ship(&f, 1, &disk, None).await;
            let mut snapshots = vec![disk.clone()];
            f.writer.put_tag(&image_tag(&f, 1, 1, size)).await.unwrap();
            for (r, writes) in rounds.iter().enumerate() {
                let mut dirty = std::collections::BTreeSet::new();
                for (blk, byte, zero) in writes {
                    let blk = blk % size.div_ceil(BS as u64);
                    let start = (blk * BS as u64) as usize;
                    let end = (start + BS as usize).min(disk.len());
                    for (i, b) in disk[start..end].iter_mut().enumerate() {
                        *b = if *zero { 0 } else { byte.wrapping_add(i as u8) };
                    }
                    dirty.insert(blk);
                }
                let seq = r as u64 + 2;
                ship(&f, seq, &disk, Some(&dirty.into_iter().collect::<Vec<_>>())).await;
                f.writer.put_tag(&image_tag(&f, seq, seq, size)).await.unwrap();
                snapshots.push(disk.clone());
            }
            for (i, want) in snapshots.iter().enumerate() {
                let tag = f.reader.tag(&f.vm, &f.disk, i as u64 + 1).await.unwrap();
                let got = restore_bytes(&f, &tag, &format!("out{i}.img")).await.unwrap();
                assert!(got == *want, "tag {} differs", i + 1);
            }
        });
    }
}

#[tokio::test]
async fn a_tag_cannot_reference_a_missing_segment() {
    let f = fixture();
    ship(&f, 1, &[1u8; 5000], None).await;
    let err = f
        .writer
        .put_tag(&image_tag(&f, 1, 2, 5000))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("only 1 of them are stored"),
        "{err}"
    );
    assert!(f.reader.tag_seqs(&f.vm, &f.disk).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_point_cannot_reference_a_missing_tag_and_is_published_once() {
    let f = fixture();
    ship(&f, 1, &[1u8; 5000], None).await;
    f.writer.put_tag(&image_tag(&f, 1, 1, 5000)).await.unwrap();
    let mut point = RecoveryPoint {
        id: PointId::new("p1").unwrap(),
        group: GroupId::new("g").unwrap(),
        time: 1,
        kind: PointKind::Crash,
        multi_vm: false,
        members: vec![Member {
            vm: f.vm.clone(),
            disks: vec![DiskRef {
                disk: f.disk.clone(),
                tag: 2,
            }],
            consistency: Consistency::Crash,
        }],
        excluded: vec![],
    };
    assert!(f.writer.put_point(&point).await.is_err());
    point.members[0].disks[0].tag = 1;
    f.writer.put_point(&point).await.unwrap();
    assert!(f.writer.put_point(&point).await.is_err(), "published twice");
    assert_eq!(f.reader.points().await.unwrap(), vec![point]);
    let err = f
        .reader
        .point(&PointId::new("nope").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "unknown recovery point nope in group g");
}

#[tokio::test]
async fn damaged_segment_fails_restore_naming_it_and_writes_nothing_more() {
    let f = fixture();
    let disk: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    ship(&f, 1, &disk, None).await;
    f.writer
        .put_tag(&image_tag(&f, 1, 1, disk.len() as u64))
        .await
        .unwrap();
    let seg = f
        .root
        .join("v1/g/vms/vm1/disks/disk0/seg/00000000000000000001.seg");
    let mut raw = std::fs::read(&seg).unwrap();
    raw[40] ^= 0x01;
    std::fs::write(&seg, raw).unwrap();
    let tag = f.reader.tag(&f.vm, &f.disk, 1).await.unwrap();
    let err = restore_bytes(&f, &tag, "bad.img").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("segment v1/g/vms/vm1/disks/disk0/seg/00000000000000000001.seg is corrupt"),
        "{err}"
    );
    assert!(
        !f.root.parent().unwrap().join("bad.img").exists(),
        "failed restore left output"
    );
}

#[tokio::test]
async fn restore_never_overwrites_and_unknown_tags_are_clear_errors() {
    let f = fixture();
    ship(&f, 1, &[7u8; 100], None).await;
    f.writer.put_tag(&image_tag(&f, 1, 1, 100)).await.unwrap();
    let tag = f.reader.tag(&f.vm, &f.disk, 1).await.unwrap();
    let out = f.root.parent().unwrap().join("exists.img");
    std::fs::write(&out, b"precious").unwrap();
    let err = restore_disk(&f.reader, &tag, &out).await.unwrap_err();
    assert!(err.to_string().contains("never overwrites"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let err = f.reader.tag(&f.vm, &f.disk, 9).await.unwrap_err();
    assert_eq!(err.to_string(), "no tag 9 for disk vm1/disk0");
}

#[tokio::test]
#[cfg_attr(
    windows,
    ignore = "restores a symbolic link, and wine's CreateSymbolicLink is a stub"
)]
async fn directory_disk_restores_files_dirs_links_and_modes() {
    let f = fixture();
    let files: BTreeMap<&str, Vec<u8>> = [
        ("a.txt", b"hello".to_vec()),
        (
            "dir/big.bin",
            (0..10_000u32).map(|i| (i * 31) as u8).collect(),
        ),
        ("dir/empty", vec![]),
        ("dir/zeros", vec![0u8; 9000]),
    ]
    .into_iter()
    .collect();
    let mut b = SegmentBuilder::new(BS, 3);
    for (path, data) in &files {
        for (i, chunk) in data.chunks(BS as usize).enumerate() {
            b.add(path, (i * BS as usize) as u64, chunk);
        }
    }
    // A file that existed once but is not in the tree must not appear.
    b.add("gone.txt", 0, b"deleted");
    f.writer
        .put_segment(&f.vm, &f.disk, 1, b.finish())
        .await
        .unwrap();
    let file = |p: &str, size: u64| TreeEntry {
        path: p.into(),
        kind: EntryKind::File { size },
        mode: 0o640,
        mtime: 1_600_000_000_000,
    };
    let tree = Tree {
        entries: vec![
            file("a.txt", 5),
            TreeEntry {
                path: "dir".into(),
                kind: EntryKind::Dir,
                mode: 0o750,
                mtime: 0,
            },
            file("dir/big.bin", 10_000),
            file("dir/empty", 0),
            TreeEntry {
                path: "dir/link".into(),
                kind: EntryKind::Symlink {
                    target: "../a.txt".into(),
                },
                mode: 0,
                mtime: 0,
            },
            file("dir/zeros", 9000),
        ],
    };
    let hash = f.writer.put_tree(&f.vm, &f.disk, &tree).await.unwrap();
    let mut tag = image_tag(&f, 1, 1, 0);
    tag.shape = DiskShape::Directory { tree: hash };
    f.writer.put_tag(&tag).await.unwrap();

    let out = f.root.parent().unwrap().join("restored");
    let report = restore_disk(&f.reader, &tag, &out).await.unwrap();
    assert_eq!(report.bytes, 5 + 10_000 + 9000);
    for (path, data) in &files {
        assert_eq!(&std::fs::read(out.join(path)).unwrap(), data, "{path}");
    }
    assert!(!out.join("gone.txt").exists());
    assert_eq!(
        std::fs::read_link(out.join("dir/link")).unwrap(),
        Path::new("../a.txt")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("a.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }
    let mtime = std::fs::metadata(out.join("a.txt"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        mtime,
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_600_000_000_000)
    );
}

#[tokio::test]
async fn a_tag_whose_segments_leave_a_hole_is_refused() {
    let f = fixture();
    // Only block 0 of a two-block disk was ever shipped: the tag lies about the disk.
    ship(&f, 1, &[5u8; 2 * BS as usize], Some(&[0])).await;
    f.writer
        .put_tag(&image_tag(&f, 1, 1, 2 * BS as u64))
        .await
        .unwrap();
    let tag = f.reader.tag(&f.vm, &f.disk, 1).await.unwrap();
    let err = restore_bytes(&f, &tag, "hole.img").await.unwrap_err();
    assert!(
        err.to_string().contains("has no data for bytes 4096..8192"),
        "{err}"
    );
    assert!(!f.root.parent().unwrap().join("hole.img").exists());
    let _ = &f.backend;
}

/// Three increments over a 24-block image; returns the disk at tag 3.
async fn history(f: &Fixture) -> (Tag, Vec<u8>) {
    let size = 24 * BS as u64;
    // Incompressible, so the base needs several small parts.
    let mut disk = lifeboat_store::conformance::pseudo_random(size as usize, 7).to_vec();
    ship(f, 1, &disk, None).await;
    f.writer.put_tag(&image_tag(f, 1, 1, size)).await.unwrap();
    for seq in 2..=3u64 {
        let blocks = [seq, seq * 5];
        for b in blocks {
            let at = (b * BS as u64) as usize;
            disk[at..at + BS as usize].fill(seq as u8);
        }
        ship(f, seq, &disk, Some(&blocks)).await;
        f.writer
            .put_tag(&image_tag(f, seq, seq, size))
            .await
            .unwrap();
    }
    (f.reader.tag(&f.vm, &f.disk, 3).await.unwrap(), disk)
}

#[tokio::test]
async fn a_compaction_killed_before_its_manifest_or_racing_another_leaves_a_good_base() {
    use lifeboat_store::compact::compact;
    let f = fixture();
    let (tag, disk) = history(&f).await;
    // Killed after its parts: the manifest is missing, the parts are there.
    let first = compact(&f.reader, &tag, 16 << 10, 3).await.unwrap();
    assert!(first.parts > 1, "the test wants several parts");
    let manifest = f.reader.layout().base(&f.vm, &f.disk, tag.seq);
    f.backend.delete(&manifest).await.unwrap();
    // The retry, and a concurrent second one, accept the parts already there (same bytes).
    let (a, b) = tokio::join!(
        compact(&f.reader, &tag, 16 << 10, 3),
        compact(&f.reader, &tag, 16 << 10, 3)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.parts, b.parts), (first.parts, first.parts));
    // The base alone restores the disk: its segments may go.
    for seq in 1..=3 {
        f.backend
            .delete(&f.reader.layout().segment(&f.vm, &f.disk, seq))
            .await
            .unwrap();
    }
    assert!(restore_bytes(&f, &tag, "compacted.img").await.unwrap() == disk);

    // A part with other bytes under the name is never taken for this compaction's.
    let g = fixture();
    let (tag, _) = history(&g).await;
    let part = g.reader.layout().base_part(&g.vm, &g.disk, tag.seq, 1);
    g.backend
        .put_new(&part, bytes::Bytes::from_static(b"someone else's"))
        .await
        .unwrap();
    let e = compact(&g.reader, &tag, 16 << 10, 3).await.unwrap_err();
    assert!(e.to_string().contains("other bytes"), "{e}");
    assert!(
        g.backend
            .get(&g.reader.layout().base(&g.vm, &g.disk, tag.seq))
            .await
            .is_err(),
        "no manifest over a foreign part"
    );
}

/// A store whose listing still shows a point that is gone by the time it is read, as when a
/// prune deletes it between the two calls.
#[derive(Debug)]
struct ListsAGhost(DynBackend, lifeboat_store::ObjectName);

#[async_trait::async_trait]
impl lifeboat_store::Backend for ListsAGhost {
    async fn put_new(
        &self,
        name: &lifeboat_store::ObjectName,
        data: bytes::Bytes,
    ) -> Result<(), lifeboat_store::StoreError> {
        self.0.put_new(name, data).await
    }
    async fn get(
        &self,
        name: &lifeboat_store::ObjectName,
    ) -> Result<bytes::Bytes, lifeboat_store::StoreError> {
        self.0.get(name).await
    }
    async fn get_range(
        &self,
        name: &lifeboat_store::ObjectName,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes, lifeboat_store::StoreError> {
        self.0.get_range(name, range).await
    }
    async fn head(
        &self,
        name: &lifeboat_store::ObjectName,
    ) -> Result<lifeboat_store::ObjectMeta, lifeboat_store::StoreError> {
        self.0.head(name).await
    }
    async fn list(
        &self,
        prefix: &lifeboat_store::ObjectName,
    ) -> Result<Vec<lifeboat_store::ObjectMeta>, lifeboat_store::StoreError> {
        let mut out = self.0.list(prefix).await?;
        if self.1.as_str().starts_with(prefix.as_str()) {
            out.push(lifeboat_store::ObjectMeta {
                name: self.1.clone(),
                size: 10,
            });
        }
        Ok(out)
    }
    async fn delete(
        &self,
        name: &lifeboat_store::ObjectName,
    ) -> Result<(), lifeboat_store::StoreError> {
        self.0.delete(name).await
    }
}

/// Regression: listing points survives a damaged point (reported, with why) and a point
/// deleted between the listing and its read (left out).
#[tokio::test]
async fn listing_points_survives_damage_and_points_vanishing() {
    let f = fixture();
    ship(&f, 1, &[1u8; 5000], None).await;
    f.writer.put_tag(&image_tag(&f, 1, 1, 5000)).await.unwrap();
    let point = |id: &str, time| RecoveryPoint {
        id: PointId::new(id).unwrap(),
        group: GroupId::new("g").unwrap(),
        time,
        kind: PointKind::Crash,
        multi_vm: false,
        members: vec![Member {
            vm: f.vm.clone(),
            disks: vec![DiskRef {
                disk: f.disk.clone(),
                tag: 1,
            }],
            consistency: Consistency::Crash,
        }],
        excluded: vec![],
    };
    for (id, time) in [("p1", 1), ("p2", 2), ("p3", 3)] {
        f.writer.put_point(&point(id, time)).await.unwrap();
    }
    let layout = Layout::new(GroupId::new("g").unwrap());
    let p1 = f.root.join("v1/g/points/p1.point");
    let mut raw = std::fs::read(&p1).unwrap();
    raw.push(b' ');
    std::fs::write(&p1, raw).unwrap();
    let ghost = layout.point(&PointId::new("p0").unwrap());
    let reader = StoreReader::new(Arc::new(ListsAGhost(f.backend.clone(), ghost)), layout);
    let scan = reader.scan_points().await.unwrap();
    assert_eq!(scan.points, vec![point("p2", 2), point("p3", 3)]);
    assert_eq!(scan.damaged.len(), 1);
    assert_eq!(scan.damaged[0].id.as_str(), "p1");
    assert!(
        scan.damaged[0].reason.contains("v1/g/points/p1.point")
            && scan.damaged[0].reason.contains("checksum mismatch"),
        "{}",
        scan.damaged[0].reason
    );
    assert_eq!(reader.points().await.unwrap().len(), 2);
}

/// Regression: a base records what it stands for — the identity of every segment it was
/// compacted from, carried over when compacted over an earlier base — in an object of its own,
/// checked against the manifest when read.
#[tokio::test]
async fn a_base_records_the_identities_of_the_segments_it_stands_for() {
    use lifeboat_store::compact::compact;
    let f = fixture();
    let (tag, _) = history(&f).await;
    let layout = f.reader.layout().clone();
    let mut ids = Vec::new();
    for seq in 1..=3 {
        let name = layout.segment(&f.vm, &f.disk, seq);
        ids.push(f.reader.segment_id(&name).await.unwrap().unwrap());
    }
    let at2 = compact(
        &f.reader,
        &f.reader.tag(&f.vm, &f.disk, 2).await.unwrap(),
        1 << 20,
        3,
    )
    .await
    .unwrap();
    assert_eq!(
        f.reader.base_segment_ids(&at2).await.unwrap().unwrap(),
        ids[..2]
    );
    // Compacted over the base at tag 2, with segments 1 and 2 gone: carried over.
    for seq in 1..=2 {
        f.backend
            .delete(&layout.segment(&f.vm, &f.disk, seq))
            .await
            .unwrap();
    }
    let at3 = compact(&f.reader, &tag, 1 << 20, 3).await.unwrap();
    assert_eq!(f.reader.base_segment_ids(&at3).await.unwrap().unwrap(), ids);
    // The manifest names them by hash only: its size does not grow with the history.
    let manifest = f
        .backend
        .get(&layout.base(&f.vm, &f.disk, 3))
        .await
        .unwrap();
    assert!(manifest.len() < 1024, "{} bytes", manifest.len());
    // Other bytes under the list's name are refused, naming it.
    let list = layout.base_ids(&f.vm, &f.disk, 3);
    std::fs::write(f.root.join(list.as_str()), [0u8; 96]).unwrap();
    let e = f.reader.base_segment_ids(&at3).await.unwrap_err();
    assert!(e.to_string().contains(list.as_str()), "{e}");

    // A lost list costs only the next base's list, not the compaction.
    let g = fixture();
    let (tag, disk) = history(&g).await;
    let at2 = compact(
        &g.reader,
        &g.reader.tag(&g.vm, &g.disk, 2).await.unwrap(),
        1 << 20,
        3,
    )
    .await
    .unwrap();
    g.backend
        .delete(&layout.base_ids(&g.vm, &g.disk, at2.tag))
        .await
        .unwrap();
    let at3 = compact(&g.reader, &tag, 1 << 20, 3).await.unwrap();
    assert_eq!(at3.segment_ids, None);
    assert!(restore_bytes(&g, &tag, "lost-list.img").await.unwrap() == disk);
}

/// A history over an origin tag (a resync by checksum compare) holds only the blocks that
/// differ from that tag; `delta` writes them as the agent would (a block whose bytes or length
/// differ, or that the origin did not have) into segment `seq`.
async fn ship_delta(f: &Fixture, seq: u64, before: &[u8], after: &[u8]) {
    let bs = BS as usize;
    let mut b = SegmentBuilder::new(BS, 3);
    for start in (0..after.len()).step_by(bs) {
        let now = &after[start..(start + bs).min(after.len())];
        let then = before.get(start..(start + bs).min(before.len()));
        if then != Some(now) {
            b.add("", start as u64, now);
        }
    }
    f.writer
        .put_segment(&f.vm, &f.disk, seq, b.finish())
        .await
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// A history over an origin restores only through the base compacted over that origin —
    /// exactly the disk at its tag, whether the disk grew, shrank or changed in place — and
    /// without that base the restore refuses rather than restore a disk with the unchanged
    /// blocks missing.
    #[test]
    fn a_history_over_an_origin_restores_exactly_through_its_base(
        before_len in 1usize..(12 * BS as usize),
        after_len in 1usize..(12 * BS as usize),
        writes in proptest::collection::vec((0usize..12, any::<u8>()), 0..6),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use lifeboat_store::compact::compact;
            let f = fixture();
            let before: Vec<u8> = (0..before_len).map(|i| (i / 7) as u8).collect();
            ship(&f, 1, &before, None).await;
            f.writer.put_tag(&image_tag(&f, 1, 1, before_len as u64)).await.unwrap();
            let mut after = before.clone();
            after.resize(after_len, 0xee);
            for (blk, byte) in writes {
                let start = (blk * BS as usize).min(after_len - 1);
                after[start] = byte;
            }
            ship_delta(&f, 100, &before, &after).await;
            let delta = Tag {
                seq: 2,
                from_segment: 100,
                through_segment: 100,
                origin: Some(1),
                ..image_tag(&f, 2, 100, after_len as u64)
            };
            f.writer.put_tag(&delta).await.unwrap();
            let err = restore_bytes(&f, &delta, "no-base.img").await.unwrap_err();
            assert!(err.to_string().contains("lies over tag 1"), "{err}");
            let base = compact(&f.reader, &delta, 16 << 10, 3).await.unwrap();
            assert_eq!((base.tag, base.from_segment), (2, 100));
            assert!(restore_bytes(&f, &delta, "over-origin.img").await.unwrap() == after);
            // Later tags of the history read that base, not the origin.
            let mut later = after.clone();
            later[0] ^= 0xff;
            ship(&f, 101, &later, Some(&[0])).await;
            let next = Tag { seq: 3, through_segment: 101, time: 3, ..delta.clone() };
            f.writer.put_tag(&next).await.unwrap();
            std::fs::remove_file(f.root.join(f.reader.layout().tag(&f.vm, &f.disk, 1).as_str()))
                .unwrap();
            assert!(restore_bytes(&f, &next, "later.img").await.unwrap() == later);
        });
    }
}

/// An origin of another block size, or an origin that itself lies over one and has no base,
/// cannot be compacted over: an error naming it, and nothing written.
#[tokio::test]
async fn a_base_over_an_unusable_origin_is_refused() {
    use lifeboat_store::compact::compact;
    let f = fixture();
    let disk = vec![7u8; 3 * BS as usize];
    ship(&f, 1, &disk, None).await;
    f.writer
        .put_tag(&image_tag(&f, 1, 1, disk.len() as u64))
        .await
        .unwrap();
    // Tag 2 lies over tag 1 and has no base; tag 3 lies over tag 2.
    ship_delta(&f, 50, &disk, &disk).await;
    let two = Tag {
        seq: 2,
        from_segment: 50,
        through_segment: 50,
        origin: Some(1),
        ..image_tag(&f, 2, 50, disk.len() as u64)
    };
    f.writer.put_tag(&two).await.unwrap();
    ship_delta(&f, 60, &disk, &disk).await;
    let three = Tag {
        seq: 3,
        from_segment: 60,
        through_segment: 60,
        origin: Some(2),
        ..image_tag(&f, 3, 60, disk.len() as u64)
    };
    f.writer.put_tag(&three).await.unwrap();
    let err = compact(&f.reader, &three, 1 << 20, 3).await.unwrap_err();
    assert!(err.to_string().contains("no readable base"), "{err}");
    // Of another block size.
    let other = Tag {
        seq: 4,
        block_size: 2 * BS,
        from_segment: 70,
        through_segment: 69,
        origin: Some(1),
        ..image_tag(&f, 4, 69, disk.len() as u64)
    };
    f.writer.put_tag(&other).await.unwrap();
    let err = compact(&f.reader, &other, 1 << 20, 3).await.unwrap_err();
    assert!(err.to_string().contains("another block size"), "{err}");
    let bases = f.reader.layout().bases(&f.vm, &f.disk);
    assert!(f.backend.list(&bases).await.unwrap().is_empty());
}

/// A disk unchanged since the offered tag: the new history's first tag reads no segment, and
/// its base (over the origin) stands for none — written at base version 3, read back, and the
/// disk restores exactly.
#[tokio::test]
async fn an_unchanged_disk_over_an_origin_gets_an_empty_base_and_restores() {
    use lifeboat_store::compact::compact;
    use lifeboat_store::manifest::Base;
    let f = fixture();
    let disk: Vec<u8> = (0..5 * BS as usize + 100)
        .map(|i| (i % 251) as u8)
        .collect();
    ship(&f, 1, &disk, None).await;
    f.writer
        .put_tag(&image_tag(&f, 1, 1, disk.len() as u64))
        .await
        .unwrap();
    let delta = Tag {
        seq: 2,
        from_segment: 90,
        through_segment: 89,
        origin: Some(1),
        ..image_tag(&f, 2, 89, disk.len() as u64)
    };
    f.writer.put_tag(&delta).await.unwrap();
    let base = compact(&f.reader, &delta, 1 << 20, 3).await.unwrap();
    assert_eq!((base.from_segment, base.through_segment), (90, 89));
    let name = f.reader.layout().base(&f.vm, &f.disk, 2);
    let bytes = f.backend.get(&name).await.unwrap();
    assert!(bytes.starts_with(b"lifeboat-base 3 "));
    assert_eq!(Base::decode(name.as_str(), &bytes).unwrap(), base);
    assert!(restore_bytes(&f, &delta, "unchanged.img").await.unwrap() == disk);
}
