//! Processing at the store level, without agents or a coordinator process: a fake agent writes
//! segments, tags and single-VM points into a cache store with the store API, and each round
//! runs what the coordinator's processing loop runs (pass, trim of the cache, prune with
//! compaction); restores from the target are compared byte for byte with what was written.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_dr::process::Processor;
use lifeboat_store::backend::memory::MemoryBackend;
use lifeboat_store::codec::SegmentBuilder;
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{
    Consistency, DiskRef, DiskShape, Member, PointKind, RecoveryPoint, Tag,
};
use lifeboat_store::restore::{StoreReader, restore_disk};
use lifeboat_store::writer::StoreWriter;
use lifeboat_store::{DiskId, DynBackend, GroupId, PointId, VmId};

const BS: u32 = 4096;
const BLOCKS: u64 = 64;
const HOUR_MS: u64 = 3_600_000;
const T0: u64 = 1_700_000_000_000;
const RETENTION: Duration = Duration::from_secs(3600);

fn group() -> GroupId {
    GroupId::new("rg").unwrap()
}

/// A single-VM agent with one image disk, writing into `cache`.
struct Agent {
    writer: StoreWriter,
    vm: VmId,
    disk: DiskId,
    /// The disk as the agent last shipped it.
    image: Vec<u8>,
    /// Next segment number, next tag number, first segment of the current full copy.
    next_segment: u64,
    next_tag: u64,
    from_segment: u64,
    /// First segment written since the last tag.
    first_unreferenced: u64,
    salt: u64,
    /// What the tags and points say; `kind` as an agent before point version 2 stored it.
    consistency: Consistency,
    kind: PointKind,
}

impl Agent {
    fn new(cache: DynBackend, salt: u64) -> Self {
        Agent {
            writer: StoreWriter::new(cache, Layout::new(group())),
            vm: VmId::new("r1").unwrap(),
            disk: DiskId::new("os").unwrap(),
            image: vec![0; (BLOCKS * BS as u64) as usize],
            next_segment: 1,
            next_tag: 1,
            from_segment: 1,
            first_unreferenced: 1,
            salt,
            consistency: Consistency::Crash,
            kind: PointKind::Crash,
        }
    }

    /// Changes `blocks` (new pseudo-random bytes) and ships them as one segment.
    async fn write(&mut self, blocks: impl IntoIterator<Item = u64>) {
        let mut b = SegmentBuilder::new(BS, 3);
        for blk in blocks {
            let start = (blk * BS as u64) as usize;
            let block = &mut self.image[start..start + BS as usize];
            for (i, byte) in block.iter_mut().enumerate() {
                self.salt = self
                    .salt
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407 + i as u64);
                *byte = (self.salt >> 56) as u8;
            }
            b.add("", start as u64, block);
        }
        self.writer
            .put_segment(&self.vm, &self.disk, self.next_segment, b.finish())
            .await
            .unwrap();
        self.next_segment += 1;
    }

    /// Writes a tag over everything shipped and a point naming it; returns the point.
    async fn cut(&mut self, time: u64) -> RecoveryPoint {
        let tag = Tag {
            vm: self.vm.clone(),
            disk: self.disk.clone(),
            seq: self.next_tag,
            from_segment: self.from_segment,
            through_segment: self.next_segment - 1,
            time,
            consistency: self.consistency,
            block_size: BS,
            shape: DiskShape::Image {
                size: self.image.len() as u64,
            },
            origin: None,
        };
        self.writer
            .put_tag_checking_from(&tag, self.first_unreferenced)
            .await
            .unwrap();
        self.first_unreferenced = self.next_segment;
        self.next_tag += 1;
        let point = RecoveryPoint {
            id: PointId::new(format!("{}-{time}-t{}", self.vm, tag.seq)).unwrap(),
            group: group(),
            time,
            kind: self.kind,
            multi_vm: false,
            members: vec![Member {
                vm: self.vm.clone(),
                disks: vec![DiskRef {
                    disk: self.disk.clone(),
                    tag: tag.seq,
                }],
                consistency: self.consistency,
            }],
            excluded: vec![],
        };
        self.writer.put_point(&point).await.unwrap();
        point
    }
}

/// Restores `point`'s disk from `target` and returns its bytes.
async fn restored(target: &DynBackend, point: &RecoveryPoint, dir: &Path) -> Vec<u8> {
    let reader = StoreReader::new(target.clone(), Layout::new(group()));
    let point = reader.point(&point.id).await.unwrap();
    let d = &point.members[0].disks[0];
    let tag = reader
        .tag(&point.members[0].vm, &d.disk, d.tag)
        .await
        .unwrap();
    let out = dir.join(format!("{}.img", point.id));
    restore_disk(&reader, &tag, &out).await.unwrap();
    std::fs::read(&out).unwrap()
}

/// The reported repro: a disk with many segments, process + trim + prune rounds with
/// retention expiring all but the newest point each round, so the disk is compacted again and
/// again. Every round copies only the segments written since the last one, and every newest
/// point restores exactly.
#[tokio::test]
async fn repeated_rounds_with_compactions_never_recopy_and_never_jam() {
    let dir = tempfile::tempdir().unwrap();
    let cache: DynBackend = Arc::new(MemoryBackend::new());
    let target: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), cache.clone(), target.clone());
    let mut agent = Agent::new(cache.clone(), 1);
    let mut compactions = 0;
    for round in 0..8u64 {
        let segments_before = agent.next_segment;
        if round == 0 {
            // The full copy, in several segments.
            for chunk in 0..6 {
                agent.write(chunk * 10..(chunk * 10 + 10).min(BLOCKS)).await;
            }
            agent.write(60..BLOCKS).await;
        } else {
            for k in 0..3 {
                agent
                    .write([(round * 7 + k * 13) % BLOCKS, (round * 3 + k) % BLOCKS])
                    .await;
            }
        }
        let written = agent.next_segment - segments_before;
        let time = T0 + round * 2 * HOUR_MS;
        let point = agent.cut(time).await;

        let pass = p
            .pass()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        assert_eq!(pass.points, vec![point.id.clone()], "round {round}");
        assert_eq!(
            pass.segments, written,
            "round {round}: copied segments the target already covers"
        );
        p.trim_cache().await.unwrap();
        let pruned = p.prune(RETENTION, time).await.unwrap();
        compactions += pruned.bases;
        assert_eq!(
            restored(&target, &point, dir.path()).await,
            agent.image,
            "round {round}"
        );
    }
    assert!(compactions >= 3, "only {compactions} compactions");
}

/// Runs one processing round as the coordinator does, at `time`.
async fn round(p: &Processor, time: u64) -> lifeboat_dr::process::Pass {
    let pass = p.pass().await.unwrap();
    p.trim_cache().await.unwrap();
    p.prune(RETENTION, time).await.unwrap();
    pass
}

/// Regression: a VM that lost its agent state and got a new cache store starts again at
/// segment 1 and tag 1. The target still holds old segment 1 (kept by the newest old point) but
/// no longer old tag 1: processing must not take the old segment for the new one.
#[tokio::test]
async fn a_new_history_never_reuses_old_segments_of_the_same_number() {
    let dir = tempfile::tempdir().unwrap();
    let target: DynBackend = Arc::new(MemoryBackend::new());
    let old_cache: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), old_cache.clone(), target.clone());
    let mut old = Agent::new(old_cache.clone(), 1);
    old.write(0..BLOCKS).await;
    old.cut(T0).await;
    round(&p, T0).await;
    old.write([1, 2]).await;
    let old_point = old.cut(T0 + 2 * HOUR_MS).await;
    round(&p, T0 + 2 * HOUR_MS).await;

    let new_cache: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), new_cache.clone(), target.clone());
    let mut new = Agent::new(new_cache.clone(), 99);
    new.write(0..BLOCKS).await;
    let new_point = new.cut(T0 + 3 * HOUR_MS).await;
    let pass = round(&p, T0 + 3 * HOUR_MS).await;
    assert!(pass.points.is_empty(), "published over another history");
    let (id, why) = &pass.quarantined[0];
    assert_eq!(id, &new_point.id);
    assert!(
        why.contains("v1/rg/vms/r1/disks/os/seg/00000000000000000001.seg"),
        "{why}"
    );
    // Nothing changed: the new point is neither published nor trimmed, the old one restores.
    let reader = StoreReader::new(target.clone(), Layout::new(group()));
    assert!(reader.point(&new_point.id).await.is_err());
    assert!(
        StoreReader::new(new_cache.clone(), Layout::new(group()))
            .point(&new_point.id)
            .await
            .is_ok()
    );
    assert_eq!(restored(&target, &old_point, dir.path()).await, old.image);
}

/// The same with the old segments folded into a base: the base stands for segments 1..=n of
/// the old history, and the new history's segments of those numbers are not the same.
#[tokio::test]
async fn a_new_history_never_reuses_an_old_base() {
    let dir = tempfile::tempdir().unwrap();
    let target: DynBackend = Arc::new(MemoryBackend::new());
    let old_cache: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), old_cache.clone(), target.clone());
    let mut old = Agent::new(old_cache.clone(), 1);
    let mut old_point = None;
    old.write(0..BLOCKS).await;
    for r in 0..4u64 {
        for k in 0..3 {
            old.write([(r * 5 + k) % BLOCKS, (r + 20 * k) % BLOCKS])
                .await;
        }
        old_point = Some(old.cut(T0 + r * 2 * HOUR_MS).await);
        round(&p, T0 + r * 2 * HOUR_MS).await;
    }
    let old_point = old_point.unwrap();
    let bases = StoreReader::new(target.clone(), Layout::new(group()))
        .bases(&old.vm, &old.disk)
        .await
        .unwrap();
    assert!(!bases.is_empty());

    // The new history gets as far as the old base's tag before it is first processed.
    let new_cache: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), new_cache.clone(), target.clone());
    let mut new = Agent::new(new_cache.clone(), 99);
    let mut last = None;
    new.write(0..BLOCKS).await;
    for t in 0..old.next_tag {
        new.write([t % BLOCKS, (t * 7 + 3) % BLOCKS, (t + 40) % BLOCKS])
            .await;
        new.write([(t + 11) % BLOCKS]).await;
        new.write([(t + 30) % BLOCKS]).await;
        last = Some(new.cut(T0 + 10 * HOUR_MS + t).await);
    }
    let pass = round(&p, T0 + 11 * HOUR_MS).await;
    let last = last.unwrap();
    assert!(
        pass.points.is_empty(),
        "published a point that restores from another history's base"
    );
    assert!(pass.quarantined.iter().any(|(id, _)| id == &last.id));
    assert!(
        pass.quarantined
            .iter()
            .all(|(_, why)| why.contains("/base/")),
        "{:?}",
        pass.quarantined
    );
    assert_eq!(restored(&target, &old_point, dir.path()).await, old.image);
}

/// Regression: the target holds another point under a cache point's id (foreign, forged
/// or damaged). The cache's point is not taken as processed: it is reported and kept.
#[tokio::test]
async fn another_point_under_the_same_id_is_refused_and_kept_in_the_cache() {
    let memory = Arc::new(MemoryBackend::new());
    let target: DynBackend = memory.clone();
    let cache: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), cache.clone(), target.clone());
    let mut agent = Agent::new(cache.clone(), 1);
    agent.write(0..BLOCKS).await;
    let point = agent.cut(T0).await;
    p.pass().await.unwrap();
    let mut other = point.clone();
    other.kind = PointKind::App;
    other.members[0].consistency = Consistency::App;
    let layout = Layout::new(group());
    memory.overwrite_for_test(&layout.point(&point.id), other.encode());

    let pass = p.pass().await.unwrap();
    assert_eq!(pass.quarantined.len(), 1, "{:?}", pass.quarantined);
    assert_eq!(pass.quarantined[0].0, point.id);
    assert!(
        pass.quarantined[0]
            .1
            .contains(layout.point(&point.id).as_str()),
        "{}",
        pass.quarantined[0].1
    );
    let trimmed = p.trim_cache().await.unwrap();
    assert_eq!(trimmed.points, 0);
    let cache_reader = StoreReader::new(cache.clone(), layout);
    assert_eq!(cache_reader.point(&point.id).await.unwrap(), point);
}

fn lifeboat(args: &[&str]) -> std::process::Output {
    std::process::Command::new(lifeboat_tests::bin("lifeboat"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Regression: one byte appended to the oldest point in the target. It is listed as
/// damaged with its reason, selectors skip it and say so, every intact point still fails over,
/// and naming the damaged one is a clear error.
#[tokio::test]
async fn a_damaged_point_costs_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("target");
    let target: DynBackend =
        Arc::new(lifeboat_store::backend::local::LocalBackend::open(&store).unwrap());
    let cache: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), cache.clone(), target.clone());
    let mut agent = Agent::new(cache.clone(), 1);
    let mut points = Vec::new();
    let mut images = Vec::new();
    agent.write(0..BLOCKS).await;
    for i in 0..3u64 {
        agent.write([i, i + 10]).await;
        points.push(agent.cut(T0 + i * 60_000).await);
        images.push(agent.image.clone());
    }
    assert_eq!(p.pass().await.unwrap().points.len(), 3);
    let oldest = store.join(format!("v1/rg/points/{}.point", points[0].id));
    let mut raw = std::fs::read(&oldest).unwrap();
    raw.push(b'\n');
    std::fs::write(&oldest, raw).unwrap();
    let s = store.to_str().unwrap();

    let list = lifeboat(&["points", "list", "--store", s, "--group", "rg"]);
    assert!(list.status.success(), "{}", text(&list));
    let out = text(&list);
    assert!(
        out.contains(points[1].id.as_str()) && out.contains(points[2].id.as_str()),
        "{out}"
    );
    let damaged_line = out
        .lines()
        .find(|l| l.contains(points[0].id.as_str()))
        .unwrap_or_else(|| panic!("damaged point not listed: {out}"));
    assert!(
        damaged_line.contains("damaged") && damaged_line.contains("checksum mismatch"),
        "{out}"
    );

    let to = dir.path().join("latest");
    let o = lifeboat(&[
        "failover",
        "--store",
        s,
        "--group",
        "rg",
        "--point",
        "latest-processed",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("skipping damaged point"), "{}", text(&o));
    assert_eq!(std::fs::read(to.join("r1/os.img")).unwrap(), images[2]);

    let to = dir.path().join("named");
    let o = lifeboat(&[
        "failover",
        "--store",
        s,
        "--group",
        "rg",
        "--point",
        points[1].id.as_str(),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(to.join("r1/os.img")).unwrap(), images[1]);

    let to = dir.path().join("bad");
    let o = lifeboat(&[
        "failover",
        "--store",
        s,
        "--group",
        "rg",
        "--point",
        points[0].id.as_str(),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("damaged"), "{}", text(&o));
    assert!(!to.exists());

    // Retention goes on around it.
    let pruned = p.prune(RETENTION, T0).await.unwrap();
    assert_eq!(pruned.damaged.len(), 1, "{pruned:?}");
}

/// Processing quarantines a cache point it cannot read and still moves the newer ones.
#[tokio::test]
async fn processing_quarantines_a_damaged_point_and_moves_newer_ones() {
    let memory = Arc::new(MemoryBackend::new());
    let cache: DynBackend = memory.clone();
    let target: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), cache.clone(), target.clone());
    let mut agent = Agent::new(cache.clone(), 1);
    let mut points = Vec::new();
    agent.write(0..BLOCKS).await;
    for i in 0..3u64 {
        agent.write([i]).await;
        points.push(agent.cut(T0 + i * 60_000).await);
    }
    let name = Layout::new(group()).point(&points[0].id);
    let mut raw = points[0].encode().to_vec();
    raw.push(0);
    memory.overwrite_for_test(&name, raw.into());
    let pass = p.pass().await.unwrap();
    assert_eq!(
        pass.points,
        vec![points[1].id.clone(), points[2].id.clone()]
    );
    assert_eq!(pass.quarantined.len(), 1);
    assert_eq!(pass.quarantined[0].0, points[0].id);
    assert!(
        pass.quarantined[0].1.contains(name.as_str()),
        "{:?}",
        pass.quarantined
    );
    assert_eq!(
        pass.latest_processed.map(|(id, _)| id),
        Some(points[2].id.clone())
    );
}

/// Regression: a point whose member was not frozen, stored as agents before point version
/// 2 did (kind `crash`): `points list`, the failover output and its report all say not-frozen,
/// in the words the members' consistency uses.
#[tokio::test]
async fn every_command_says_not_frozen_for_a_point_that_was_not_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("target");
    let target: DynBackend =
        Arc::new(lifeboat_store::backend::local::LocalBackend::open(&store).unwrap());
    let cache: DynBackend = Arc::new(MemoryBackend::new());
    let p = Processor::new(group(), cache.clone(), target.clone());
    let mut agent = Agent::new(cache.clone(), 1);
    agent.consistency = Consistency::NotFrozen;
    agent.write(0..BLOCKS).await;
    let point = agent.cut(T0).await;
    p.pass().await.unwrap();
    let s = store.to_str().unwrap();

    let list = lifeboat(&["points", "list", "--store", s, "--group", "rg"]);
    assert!(list.status.success(), "{}", text(&list));
    let line = text(&list);
    assert!(line.contains("  not-frozen "), "{line}");
    assert!(line.contains("r1 (not-frozen)"), "{line}");

    let to = dir.path().join("out");
    let o = lifeboat(&[
        "failover",
        "--store",
        s,
        "--group",
        "rg",
        "--point",
        point.id.as_str(),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(not-frozen single-VM"), "{}", text(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(to.join("failover-report.json")).unwrap()).unwrap();
    assert_eq!(report["point_kind"], "not-frozen");
    assert_eq!(report["members"][0]["consistency"], "not-frozen");
}

/// Regression: a quarantine is recorded in the target (`quarantine/<point>.txt`), shown
/// with its reason by `points list --target`, and cleared once the point no longer waits.
#[tokio::test]
async fn a_quarantine_is_recorded_listed_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let (cache_dir, target_dir) = (dir.path().join("cache"), dir.path().join("target"));
    let local = |p: &Path| -> DynBackend {
        Arc::new(lifeboat_store::backend::local::LocalBackend::open(p).unwrap())
    };
    let (cache, target) = (local(&cache_dir), local(&target_dir));
    let p = Processor::new(group(), cache.clone(), target.clone());
    let mut agent = Agent::new(cache.clone(), 1);
    agent.write(0..BLOCKS).await;
    let point = agent.cut(T0).await;
    p.pass().await.unwrap();
    // Another point under its id in the target.
    let layout = Layout::new(group());
    let published = target_dir.join(layout.point(&point.id).as_str());
    let original = std::fs::read(&published).unwrap();
    let mut other = point.clone();
    other.time += 1;
    std::fs::write(&published, other.encode()).unwrap();
    let pass = p.pass().await.unwrap();
    assert_eq!(pass.quarantined.len(), 1);
    let record = target_dir.join(layout.quarantine_record(&point.id).as_str());
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        pass.quarantined[0].1
    );
    let list = lifeboat(&[
        "points",
        "list",
        "--store",
        cache_dir.to_str().unwrap(),
        "--group",
        "rg",
        "--target",
        target_dir.to_str().unwrap(),
    ]);
    assert!(list.status.success(), "{}", text(&list));
    let out = text(&list);
    let line = out.lines().find(|l| l.contains(point.id.as_str())).unwrap();
    assert!(
        line.starts_with("quarantined") && line.contains("another point"),
        "{out}"
    );
    // Put right: the point is the target's again, and the next pass clears the record.
    std::fs::write(&published, original).unwrap();
    assert!(p.pass().await.unwrap().quarantined.is_empty());
    assert!(!record.exists());
}
