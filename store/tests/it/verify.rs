//! `verify` over a store made by real writes (the example store of the test vectors), on a
//! local directory and on Azurite: a clean store is clean; each kind of damage is named with
//! exactly the points it breaks — checked against what a restore of every point actually
//! does — and a flipped byte in a segment body is found only when data is read.

use std::collections::BTreeSet;
use std::sync::Arc;

use lifeboat_store::backend::local::LocalBackend;
use lifeboat_store::example;
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{DiskShape, Tag};
use lifeboat_store::restore::{StoreReader, restore_disk};
use lifeboat_store::verify::{VerifyOptions, VerifyReport, verify};
use lifeboat_store::{DiskId, DynBackend, GroupId, ObjectName, PointId, VmId};

/// A store to damage: a fresh local directory, or a fresh prefix on Azurite.
trait Place {
    async fn fresh(&self) -> Option<(tempfile::TempDir, DynBackend)>;
}

struct Local;
impl Place for Local {
    async fn fresh(&self) -> Option<(tempfile::TempDir, DynBackend)> {
        let dir = tempfile::tempdir().unwrap();
        let b: DynBackend = Arc::new(LocalBackend::open(dir.path().join("store")).unwrap());
        Some((dir, b))
    }
}

struct Azurite;
impl Place for Azurite {
    async fn fresh(&self) -> Option<(tempfile::TempDir, DynBackend)> {
        use lifeboat_store::backend::azure::{AzureBackend, AzureConfig};
        let Ok(endpoint) = std::env::var("LIFEBOAT_AZURITE") else {
            assert!(
                std::env::var_os("CI").is_none()
                    && std::env::var_os("LIFEBOAT_REQUIRE_AZURITE").is_none(),
                "LIFEBOAT_AZURITE is not set: run the tests through scripts/test.sh"
            );
            eprintln!("SKIPPED: verify on Azurite (LIFEBOAT_AZURITE unset)");
            return None;
        };
        let mut cfg = AzureConfig::azurite(&endpoint, "verify");
        use std::hash::{BuildHasher, RandomState};
        cfg.prefix = Some(format!(
            "run-{:016x}",
            RandomState::new().hash_one(std::time::SystemTime::now())
        ));
        let b: DynBackend = Arc::new(AzureBackend::open(&cfg).await.expect("Azurite reachable"));
        Some((tempfile::tempdir().unwrap(), b))
    }
}

/// The number of the example's `i`-th segment or tag (1-based).
fn n(i: u64) -> u64 {
    example::FIRST + i - 1
}

fn layout() -> Layout {
    Layout::new(GroupId::new(example::GROUP).unwrap())
}
fn vm() -> VmId {
    VmId::new(example::VM).unwrap()
}
fn os() -> DiskId {
    DiskId::new(example::IMAGE_DISK).unwrap()
}
fn data() -> DiskId {
    DiskId::new(example::DIR_DISK).unwrap()
}

/// The example's point ids, oldest first.
async fn point_ids(b: &DynBackend) -> Vec<PointId> {
    let r = StoreReader::new(b.clone(), layout());
    r.points()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect()
}

/// Replaces object `name` by `f(its bytes)` (objects are immutable: delete, then put).
async fn damage(b: &DynBackend, name: &ObjectName, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = b.get(name).await.unwrap().to_vec();
    f(&mut bytes);
    b.delete(name).await.unwrap();
    b.put_new(name, bytes.into()).await.unwrap();
}

async fn run(b: &DynBackend, read_data: bool) -> VerifyReport {
    let opts = VerifyOptions {
        read_data,
        ..Default::default()
    };
    verify(b.clone(), &opts).await.unwrap()
}

/// The points whose restore fails, found by restoring each one (every disk) for real.
async fn unrestorable(b: &DynBackend, ids: &[PointId], scratch: &std::path::Path) -> Vec<String> {
    let r = StoreReader::new(b.clone(), layout());
    let mut out = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let ok = async {
            let p = r.point(id).await?;
            for m in &p.members {
                for d in &m.disks {
                    let tag = r.tag(&m.vm, &d.disk, d.tag).await?;
                    let dir = scratch.join(format!("restore-{i}-{}-{}", d.disk, rand_suffix()));
                    restore_disk(&r, &tag, &dir).await?;
                }
            }
            Ok::<_, lifeboat_store::Error>(())
        }
        .await;
        if ok.is_err() {
            out.push(format!("{}/{id}", example::GROUP));
        }
    }
    out
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}

/// Asserts `report` names exactly `object` as damaged, breaking exactly the points at indexes
/// `broken`, and that those are exactly the points a restore fails on.
async fn assert_costs(
    b: &DynBackend,
    report: &VerifyReport,
    object: &ObjectName,
    broken: &[usize],
    scratch: &std::path::Path,
) {
    let ids = point_ids_all(b).await;
    let want: Vec<String> = broken
        .iter()
        .map(|&i| format!("{}/{}", example::GROUP, ids[i]))
        .collect();
    assert_eq!(
        report.damaged.len(),
        1,
        "expected only {object} damaged: {:#?}",
        report.damaged
    );
    let d = &report.damaged[0];
    assert_eq!(d.object, object.as_str(), "{d:?}");
    assert_eq!(d.breaks, want, "{d:?}");
    assert_eq!(report.broken_points, want);
    // What verify says a damaged object costs is what restoring every point finds.
    assert_eq!(unrestorable(b, &ids, scratch).await, want);
}

/// All three point ids, also when one point object is damaged (from the listing).
async fn point_ids_all(b: &DynBackend) -> Vec<PointId> {
    let mut ids: Vec<PointId> = b
        .list(&layout().points())
        .await
        .unwrap()
        .iter()
        .filter_map(|m| m.name.file_name().strip_suffix(".point")?.parse().ok())
        .collect();
    // Ids are `<vm>-<time>-t<n>` with one time width: name order is time order.
    ids.sort();
    ids
}

async fn scenarios(place: impl Place) {
    // Clean: nothing damaged, no orphans, every point restores.
    let Some((dir, b)) = place.fresh().await else {
        return;
    };
    example::build(b.clone()).await.unwrap();
    let ids = point_ids(&b).await;
    assert_eq!(ids.len(), 3);
    for read_data in [false, true] {
        let r = run(&b, read_data).await;
        assert!(r.is_clean(), "{:#?}", r.damaged);
        assert!(r.orphans.is_empty(), "{:#?}", r.orphans);
        assert_eq!((r.points, r.broken_points.len()), (3, 0));
        assert!(r.objects_checked > 20 && r.bytes_read > 0, "{r:?}");
    }
    assert!(unrestorable(&b, &ids, dir.path()).await.is_empty());
    let l = layout();

    // A flipped byte in a segment body (a payload, not the index): found only with read_data,
    // and it costs only the point that reads the segment (tag 3 of the image).
    let seg = l.segment(&vm(), &os(), n(3));
    damage(&b, &seg, |d| d[16] ^= 0x40).await;
    let r = run(&b, false).await;
    assert!(
        r.is_clean(),
        "index-only check saw a payload flip: {:#?}",
        r.damaged
    );
    let r = run(&b, true).await;
    assert!(!r.is_clean());
    assert!(r.damaged[0].what.contains("checksum"), "{:?}", r.damaged);
    assert_costs(&b, &r, &seg, &[2], dir.path()).await;

    // Each of the following on a fresh copy.
    let cases: Vec<(&str, ObjectName, Vec<usize>, bool)> = vec![
        // A truncated tag: costs the point of that tag only.
        ("truncate", l.tag(&vm(), &data(), n(1)), vec![0], false),
        // A deleted segment: tag 1 of the image reads segment 1 (tags 2, 3 read the base).
        ("delete", l.segment(&vm(), &os(), n(1)), vec![0], false),
        // A damaged point manifest: costs that point only.
        ("flip", l.point(&ids[1]), vec![1], false),
        // A damaged base part: every tag restoring from the base (2 and 3), not tag 1.
        (
            "flip-body",
            l.base_part(&vm(), &os(), n(2), 1),
            vec![1, 2],
            true,
        ),
        // A truncated base part: seen without reading data (its footer is gone).
        (
            "truncate",
            l.base_part(&vm(), &data(), n(2), 1),
            vec![1, 2],
            false,
        ),
        // A missing tree: the tag listing it.
        ("delete-tree", l.tag(&vm(), &data(), n(3)), vec![2], false),
        // A sound tag whose segments do not cover its disk (a hole): the tag is what is wrong.
        ("hole", l.tag(&vm(), &os(), n(1)), vec![0], false),
        // A damaged base manifest: restores choose among the readable ones, so it costs the
        // points that cannot do without it (the segments it stood for are pruned), and no
        // longer tag 1's point, which reads segments only.
        ("flip", l.base(&vm(), &os(), n(2)), vec![1, 2], false),
        // Damaged segment identities: damage, but no restore reads them.
        ("flip", l.base_ids(&vm(), &os(), n(2)), vec![], false),
        // A damaged part of a base no tag reads (tag 2 and 3 deleted, with their points):
        // damage, costing nothing.
        (
            "unread-base",
            l.base_part(&vm(), &data(), n(2), 1),
            vec![],
            false,
        ),
    ];
    for (how, object, broken, read_data) in cases {
        let Some((dir, b)) = place.fresh().await else {
            return;
        };
        example::build(b.clone()).await.unwrap();
        let object = match how {
            "delete-tree" => {
                // The tree the tag lists, by its name.
                let r = StoreReader::new(b.clone(), l.clone());
                let tag = r.tag(&vm(), &data(), n(3)).await.unwrap();
                let DiskShape::Directory { tree } = tag.shape else {
                    panic!("directory disk");
                };
                let name = l.tree(&vm(), &data(), &tree).unwrap();
                b.delete(&name).await.unwrap();
                name
            }
            "delete" => {
                b.delete(&object).await.unwrap();
                object
            }
            "truncate" => {
                damage(&b, &object, |d| d.truncate(d.len() - 3)).await;
                object
            }
            "flip" => {
                damage(&b, &object, |d| {
                    let i = d.len() / 2;
                    d[i] ^= 1
                })
                .await;
                object
            }
            "hole" => {
                // Re-sealed, so it decodes: only the coverage check can see it.
                damage(&b, &object, |d| {
                    let mut tag = Tag::decode("t", d).unwrap();
                    tag.shape = DiskShape::Image { size: 20_000 };
                    *d = tag.encode().to_vec();
                })
                .await;
                object
            }
            "unread-base" => {
                for p in &ids[1..] {
                    b.delete(&l.point(p)).await.unwrap();
                }
                for disk in [os(), data()] {
                    for seq in n(2)..=n(3) {
                        b.delete(&l.tag(&vm(), &disk, seq)).await.unwrap();
                    }
                }
                damage(&b, &object, |d| d.truncate(d.len() - 1)).await;
                object
            }
            "flip-body" => {
                damage(&b, &object, |d| d[16] ^= 1).await;
                object
            }
            _ => unreachable!(),
        };
        let r = run(&b, read_data).await;
        assert!(!r.is_clean(), "{how} {object}: not found");
        assert_costs(&b, &r, &object, &broken, dir.path()).await;
    }

    // Another history under a number a base stands for: segment 1 replaced by a sound
    // segment of other bytes (an agent that started again at 1). A restore of tag 1 would
    // succeed with the other bytes; verify names the segment and the point reading it.
    let Some((dir, b)) = place.fresh().await else {
        return;
    };
    example::build(b.clone()).await.unwrap();
    let seg1 = l.segment(&vm(), &os(), n(1));
    let mut other = lifeboat_store::codec::SegmentBuilder::new(example::BLOCK, 3);
    for blk in 0..4u64 {
        let len = if blk == 3 { 14000 - 12288 } else { 4096 };
        other.add("", blk * 4096, &vec![blk as u8 + 1; len]);
    }
    b.delete(&seg1).await.unwrap();
    b.put_new(&seg1, other.finish()).await.unwrap();
    let r = run(&b, true).await;
    assert_eq!(r.damaged.len(), 1, "{:#?}", r.damaged);
    assert_eq!(r.damaged[0].object, seg1.as_str());
    assert!(
        r.damaged[0].what.contains("another history"),
        "{:?}",
        r.damaged
    );
    assert_eq!(r.broken_points, [format!("{}/{}", example::GROUP, ids[0])]);
    assert!(
        unrestorable(&b, &ids, dir.path()).await.is_empty(),
        "restores trust numbers"
    );

    // A cache store after processing trimmed it: the lowest segments of a disk are in the
    // target. Missing to a plain verify; counted, not reported, with `trimmed_cache`.
    let Some((_dir, b)) = place.fresh().await else {
        return;
    };
    example::build(b.clone()).await.unwrap();
    let seg1 = l.segment(&vm(), &os(), n(1));
    b.delete(&seg1).await.unwrap();
    let r = run(&b, true).await;
    assert_eq!(r.damaged.len(), 1, "{:#?}", r.damaged);
    assert_eq!(r.damaged[0].object, seg1.as_str());
    let opts = VerifyOptions {
        read_data: true,
        trimmed_cache: true,
        ..Default::default()
    };
    let r = verify(b.clone(), &opts).await.unwrap();
    assert!(r.is_clean(), "{:#?}", r.damaged);
    assert_eq!(r.trimmed, 1);
    // A hole in the middle of what the cache holds is still damage.
    b.delete(&l.segment(&vm(), &data(), n(3))).await.unwrap();
    let r = verify(b.clone(), &opts).await.unwrap();
    assert_eq!(r.damaged.len(), 1, "{:#?}", r.damaged);

    // An orphan (a leftover segment after the newest tag) is a warning, not damage.
    let Some((_dir, b)) = place.fresh().await else {
        return;
    };
    example::build(b.clone()).await.unwrap();
    let extra = l.segment(&vm(), &os(), n(9));
    b.put_new(&extra, b.get(&l.segment(&vm(), &os(), n(3))).await.unwrap())
        .await
        .unwrap();
    let r = run(&b, true).await;
    assert!(r.is_clean(), "{:#?}", r.damaged);
    let orphans: BTreeSet<&str> = r.orphans.iter().map(|o| o.object.as_str()).collect();
    assert_eq!(orphans, BTreeSet::from([extra.as_str()]));
}

#[tokio::test]
async fn verify_names_damage_and_what_it_costs_on_a_local_store() {
    scenarios(Local).await;
}

#[tokio::test]
async fn verify_names_damage_and_what_it_costs_on_azurite() {
    scenarios(Azurite).await;
}
