//! Damage in the agent's own cache store: the agent notices what its next tag relies on is
//! gone or damaged, says why, resynchronises, and the next point restores byte for byte.

mod common;

use std::path::{Path, PathBuf};

use common::*;

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
