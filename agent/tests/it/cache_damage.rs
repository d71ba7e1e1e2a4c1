//! Damage in the agent's own cache store: the agent notices what its next tag relies on is
//! gone or damaged, says why, resynchronises, and the next point restores byte for byte.

use std::path::{Path, PathBuf};

use crate::common::*;

/// A VM with a 6 MiB image disk and a directory disk, synced twice with a change between.
struct Vm {
    dir: tempfile::TempDir,
    config: PathBuf,
    image: Vec<u8>,
}

impl Vm {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = random_bytes(6 << 20, 9);
        std::fs::write(dir.path().join("disk.img"), &image).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("f"), random_bytes(3 << 20, 3)).unwrap();
        let config = write_config(
            dir.path(),
            &format!(
                "{}{}",
                disk("img", "image", &dir.path().join("disk.img")),
                disk("files", "directory", &data)
            ),
        );
        let mut vm = Vm { dir, config, image };
        agent_ok(&vm.config, &["sync"]);
        vm.change(1);
        agent_ok(&vm.config, &["sync"]);
        vm
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn change(&mut self, round: u64) {
        let at = (round as usize * 1_300_000) % (5 << 20);
        self.image[at..at + 70_000].copy_from_slice(&random_bytes(70_000, round + 100));
        std::fs::write(self.path().join("disk.img"), &self.image).unwrap();
        std::fs::write(
            self.path().join("data").join(format!("new-{round}")),
            random_bytes(10_000, round),
        )
        .unwrap();
    }

    /// Objects of the image disk of kind `kind` ("seg", "tag"), sorted by name.
    fn objects(&self, kind: &str) -> Vec<PathBuf> {
        let dir = self.path().join("store/v1/g/vms/vm1/disks/img").join(kind);
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    }

    /// Syncs (optionally `--verify`), then restores the new point and compares both disks.
    fn sync_and_restore(&mut self, round: u64, args: &[&str]) -> (String, String) {
        self.change(round);
        let mut all = vec!["sync"];
        all.extend_from_slice(args);
        let out = agent(&self.config, &all);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        let restored = self.path().join(format!("restored-{round}"));
        restore_id(self.path(), &point_id(&stdout), &restored);
        assert!(
            std::fs::read(restored.join("img")).unwrap() == self.image,
            "image differs after round {round}\n{stderr}"
        );
        assert_same_tree(&self.path().join("data"), &restored.join("files"));
        (stdout, stderr)
    }
}

/// Regression: a flipped byte in a segment went unnoticed; every later point was
/// unrestorable and unprocessable. The verification sweep now reads the segments back and,
/// finding one damaged, starts a new copy that no longer names it (processing verifies every
/// segment it copies, so a history naming it could never reach the target again).
#[test]
fn a_flipped_byte_in_a_cache_segment_is_found_and_the_history_starts_again() {
    let mut vm = Vm::new();
    let first = vm.objects("seg")[0].clone();
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&first, &bytes).unwrap();
    let (stdout, stderr) = vm.sync_and_restore(2, &["--verify"]);
    assert!(
        stderr.contains("lost or damaged what the next tag relies on"),
        "{stderr}"
    );
    // The new point's tag no longer reaches back to the damaged segment.
    let id = point_id(&stdout);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&vm.path().join("store"), "g");
    let p = rt
        .block_on(reader.point(&lifeboat_store::PointId::new(id).unwrap()))
        .unwrap();
    let d = p.members[0]
        .disks
        .iter()
        .find(|d| d.disk.as_str() == "img")
        .unwrap();
    let tag = rt
        .block_on(reader.tag(&p.members[0].vm, &d.disk, d.tag))
        .unwrap();
    let damaged: u64 = first
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    assert!(tag.from_segment > damaged, "{tag:?}");
    // The history goes on without another resync.
    let (_, stderr) = vm.sync_and_restore(3, &["--verify"]);
    assert!(!stderr.contains("resynchronising"), "{stderr}");
}

/// Regression: a damaged newest tag made every later sync fail with no resync.
#[test]
fn a_damaged_newest_tag_starts_a_new_copy_numbered_after_it() {
    let mut vm = Vm::new();
    let newest = vm.objects("tag").pop().unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let (_, stderr) = vm.sync_and_restore(2, &[]);
    assert!(
        stderr.contains("newest tag in the cache store is damaged"),
        "{stderr}"
    );
    let (_, stderr) = vm.sync_and_restore(3, &[]);
    assert!(!stderr.contains("damaged"), "{stderr}");
}

/// A segment the next tag needs, deleted from the cache store (not by processing: newer ones
/// are still there), cannot be worked around in this history: a new full copy.
#[test]
fn a_lost_segment_of_the_current_history_starts_a_new_copy() {
    let mut vm = Vm::new();
    let segs = vm.objects("seg");
    assert!(segs.len() >= 3, "{segs:?}");
    std::fs::remove_file(&segs[1]).unwrap();
    let (_, stderr) = vm.sync_and_restore(2, &[]);
    assert!(
        stderr.contains("lost or damaged what the next tag relies on"),
        "{stderr}"
    );
    let (_, stderr) = vm.sync_and_restore(3, &["--verify"]);
    assert!(!stderr.contains("resynchronising"), "{stderr}");
}

/// Found by the lifecycle test: an unchanged directory's next tag reuses its listing by name
/// (content-addressed), so a damaged listing broke every later point, `--verify` or not. The
/// verification sweep now checks it and writes it again.
#[test]
fn a_damaged_listing_of_an_unchanged_directory_is_written_again_by_the_sweep() {
    let vm = Vm::new();
    let trees = vm.path().join("store/v1/g/vms/vm1/disks/files/tree");
    for e in std::fs::read_dir(&trees).unwrap().flatten() {
        let mut b = std::fs::read(e.path()).unwrap();
        let at = b.len() - 3;
        b[at] ^= 0x10;
        std::fs::write(e.path(), b).unwrap();
    }
    // The directory is unchanged: the next tag names the same listing.
    let out = agent(&vm.config, &["sync", "--verify"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("directory listing in the cache store is damaged"),
        "{stderr}"
    );
    let restored = vm.path().join("restored");
    restore_id(vm.path(), &point_id(&stdout), &restored);
    assert_same_tree(&vm.path().join("data"), &restored.join("files"));
}

/// Processing's offer of a tag to resynchronise over (resync sums beside a request) is used
/// only when it fits the disk: sums of another block size, or missing a block, cost a full
/// copy and say why; fitting sums make the new history a delta over the offered tag — it
/// sends only what differs — and, once a base is built over that tag (as processing does in
/// the target), the disk restores byte for byte.
#[test]
fn an_offered_tag_is_used_only_when_its_sums_fit_the_disk() {
    use lifeboat_store::sums::{SumEntry, SumsBuilder};
    let mut vm = Vm::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = vm.path().join("store");
    let reader = reader(&store, "g");
    let (vmid, img) = (
        lifeboat_store::VmId::new("vm1").unwrap(),
        lifeboat_store::DiskId::new("img").unwrap(),
    );
    let newest = || {
        rt.block_on(reader.latest_tag(&vmid, &img))
            .unwrap()
            .unwrap()
    };
    // Processing's request for a new history of the newest one, with sums of the image as it
    // is at the newest tag: `block_size` and the blocks `skip` leaves out as given.
    let offer = |image: &[u8], block_size: u32, skip: Option<usize>| {
        let tag = newest();
        let mut sums = SumsBuilder::new(tag.seq, block_size, vec![String::new()]);
        for (i, block) in image.chunks(block_size as usize).enumerate() {
            if Some(i) != skip {
                sums.push(SumEntry {
                    target: 0,
                    offset: (i * block_size as usize) as u64,
                    length: block.len() as u32,
                    hash: *blake3::hash(block).as_bytes(),
                });
            }
        }
        let layout = reader.layout();
        for (name, bytes) in [
            (
                layout.resync_sums(&vmid, &img, tag.from_segment),
                sums.finish(),
            ),
            (
                layout.resync(&vmid, &img, tag.from_segment),
                bytes::Bytes::from_static(b"test"),
            ),
        ] {
            rt.block_on(reader.backend().put_new(&name, bytes)).unwrap();
        }
        tag
    };
    let bs = newest().block_size;
    let unusable = [(bs / 2, None, "block size"), (bs, Some(3), "no block at")];
    for (round, (block_size, skip, why)) in unusable.into_iter().enumerate() {
        let old = offer(&vm.image, block_size, skip);
        let (_, stderr) = vm.sync_and_restore(2 + round as u64, &[]);
        assert!(
            stderr.contains("offer cannot be used") && stderr.contains(why),
            "{stderr}"
        );
        let new = newest();
        assert!(
            new.from_segment > old.from_segment && new.origin.is_none(),
            "{new:?}"
        );
    }

    // Sums that fit: a delta over the offered tag.
    let origin = offer(&vm.image, bs, None);
    let before: Vec<PathBuf> = vm.objects("seg");
    vm.change(9);
    let out = agent(&vm.config, &["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("checksum compare with the tag processing offered"),
        "{stderr}"
    );
    let delta = newest();
    assert_eq!(delta.origin, Some(origin.seq));
    let sent: u64 = vm
        .objects("seg")
        .iter()
        .filter(|p| !before.contains(p))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    // 70,000 changed bytes of a 6 MiB image: two 64 KiB blocks, a little over.
    assert!(
        sent > 70_000 && sent < 4 * bs as u64,
        "the delta sent {sent} bytes"
    );
    // Without a base over the origin the tag does not restore; with one it restores exactly.
    let restored = vm.path().join("delta-no-base");
    let err = rt
        .block_on(lifeboat_store::restore::restore_disk(
            &reader, &delta, &restored,
        ))
        .unwrap_err();
    assert!(err.to_string().contains("lies over tag"), "{err}");
    rt.block_on(lifeboat_store::compact::compact(
        &reader,
        &delta,
        1 << 20,
        3,
    ))
    .unwrap();
    let restored = vm.path().join("delta.img");
    rt.block_on(lifeboat_store::restore::restore_disk(
        &reader, &delta, &restored,
    ))
    .unwrap();
    assert!(std::fs::read(&restored).unwrap() == vm.image);
}
