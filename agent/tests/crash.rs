//! SIGKILL the agent again and again while it replicates a changing disk: nothing is lost, the
//! final point restores to exactly the source, and no orphan segment survives.

mod common;

use std::time::Duration;

use common::*;

fn mutate(path: &std::path::Path, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut x = seed | 1;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.seek(SeekFrom::Start(x % (96 << 20))).unwrap();
        f.write_all(&x.to_le_bytes().repeat(512)).unwrap();
    }
}

#[test]
fn killed_agents_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let data: Vec<u8> = (0..(96u32 << 20) / 4)
        .flat_map(|i| (i.wrapping_mul(2_654_435_761) >> (i % 7)).to_le_bytes())
        .collect();
    std::fs::write(&image, &data).unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    for i in 0..40 {
        std::fs::write(
            tree.join(format!("sub/f{i}")),
            vec![i as u8; 70_000 * (i % 3)],
        )
        .unwrap();
    }
    let config = write_config(
        dir.path(),
        &[
            disk("img", "image", &image),
            disk("tree", "directory", &tree),
        ]
        .concat(),
    );
    let mut kills = 0;
    for round in 0..8u64 {
        let mut child = spawn_agent(&config, &["sync"]);
        std::thread::sleep(Duration::from_millis(30 + round * 37 % 200));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        mutate(&image, round + 1);
        std::fs::write(tree.join(format!("sub/f{round}")), format!("round {round}")).unwrap();
        let _ = std::fs::remove_file(tree.join(format!("sub/f{}", 39 - round)));
    }
    assert!(
        kills >= 4,
        "only {kills} of 8 runs were killed mid-way; slow the kills down"
    );

    // A last, uninterrupted run; its point must equal the source.
    let out = agent_ok(&config, &["sync"]);
    let id = point_id(&out);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&dir.path().join("store"), "g");
    let restored = dir.path().join("restored");
    rt.block_on(async {
        let point = reader
            .point(&lifeboat_store::PointId::new(id).unwrap())
            .await
            .unwrap();
        restore_point(&reader, &point, &restored).await;
        // No segment past the last tag: orphans of killed runs were removed.
        for disk in ["img", "tree"] {
            let vm = lifeboat_store::VmId::new("vm1").unwrap();
            let d = lifeboat_store::DiskId::new(disk).unwrap();
            let tag = reader.latest_tag(&vm, &d).await.unwrap().unwrap();
            let segs = reader.segment_seqs(&vm, &d).await.unwrap();
            assert_eq!(
                segs.last().copied(),
                Some(tag.through_segment),
                "orphans of {disk}"
            );
        }
    });
    assert!(std::fs::read(restored.join("img")).unwrap() == std::fs::read(&image).unwrap());
    assert_same_tree(&tree, &restored.join("tree"));
}

/// Kills a bandwidth-limited initial replication after its first checkpoint, resumes it at full
/// speed, checks the resumed run shipped less than three quarters again, and returns its output;
/// the caller checks the point.
fn interrupt_and_resume(dir: &std::path::Path, disk_toml: &str) -> String {
    let config = write_config(dir, disk_toml);
    let slow = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[replication]", "[replication]\nbandwidth_limit = \"3MiB\"");
    let fast = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, slow).unwrap();
    let mut child = spawn_agent(&config, &["sync"]);
    // Past the first checkpoint (10 s), well before the end (16 s).
    std::thread::sleep(Duration::from_millis(12_500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished before it could be interrupted"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::write(&config, fast).unwrap();
    let out = agent_ok(&config, &["sync"]);
    // Both tests replicate 48 MiB of incompressible data in 64 KiB blocks.
    let (changed, total) = (changed_blocks(&out), (48u64 << 20) / 65536);
    assert!(
        changed < total * 3 / 4,
        "resumed run shipped {changed} of {total} blocks: the checkpoint was not used\n{out}"
    );
    out
}

#[test]
fn an_interrupted_initial_replication_of_an_image_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let data = random_bytes(48 << 20, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(&image, &data).unwrap();
    let out = interrupt_and_resume(dir.path(), &disk("img", "image", &image));
    let restored = dir.path().join("restored");
    restore_id(dir.path(), &point_id(&out), &restored);
    assert!(std::fs::read(restored.join("img")).unwrap() == data);
}

#[test]
fn an_interrupted_initial_replication_of_a_directory_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    for i in 0..48u64 {
        let sub = tree.join(format!("d{}", i % 5));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{i}")), random_bytes(1 << 20, i + 1)).unwrap();
    }
    let out = interrupt_and_resume(dir.path(), &disk("tree", "directory", &tree));
    let restored = dir.path().join("restored");
    restore_id(dir.path(), &point_id(&out), &restored);
    assert_same_tree(&tree, &restored.join("tree"));
}
