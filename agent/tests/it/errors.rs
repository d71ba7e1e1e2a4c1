//! Bad disks and a full state disk: clear errors, nothing published, nothing half-written, and
//! the next good run picks up without loss.

use std::process::Command;

use crate::common::*;

#[test]
fn vanished_or_wrong_kind_disks_fail_clearly_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), b"x").unwrap();
    let config = write_config(dir.path(), &disk("d", "directory", &data));
    agent_ok(&config, &["sync"]);
    let state = std::fs::read(dir.path().join("state/d.state")).unwrap();

    std::fs::remove_dir_all(&data).unwrap();
    let out = agent(&config, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("disk d: cannot access"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("state/d.state")).unwrap(),
        state
    );

    // A file where a directory was configured.
    std::fs::write(&data, b"not a directory").unwrap();
    let out = agent(&config, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a directory"), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let points = rt
        .block_on(reader(&dir.path().join("store"), "g").points())
        .unwrap();
    assert_eq!(points.len(), 1, "a failed run published a point");
}

#[test]
fn bad_config_is_exit_code_2_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[[disk]]\nid = \"../x\"\nkind = \"image\"\npath = \"/x\"\n",
    );
    let out = agent(&config, &["sync"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid disk id \"../x\""), "{err}");
    assert!(
        !dir.path().join("store").exists(),
        "a bad config touched the store"
    );
}

#[test]
fn a_full_state_disk_fails_cleanly_and_the_next_run_loses_nothing() {
    if !root_or_skip("a_full_state_disk_fails_cleanly_and_the_next_run_loses_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48k", "tmpfs"])
        .arg(&state));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).output();
        }
    }
    let _guard = Unmount(state.clone());

    // Enough files that their hashes do not fit in 48 KiB of state.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..600 {
        std::fs::write(data.join(format!("file-{i:04}")), format!("contents {i}")).unwrap();
    }
    let config = write_config(dir.path(), &disk("d", "directory", &data));
    let out = agent(&config, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-written state left: {leftovers:?}"
    );

    // Room again: the next run reconciles with the tag already in the store and ships on.
    drop(_guard);
    std::fs::write(data.join("file-0000"), "changed after the failure").unwrap();
    let out = agent_ok(&config, &["sync"]);
    let restored = dir.path().join("restored");
    restore_id(dir.path(), &point_id(&out), &restored);
    assert_same_tree(&data, &restored.join("d"));
}

#[test]
fn lost_state_is_rebuilt_by_checksum_compare_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    std::fs::write(&image, &data).unwrap();
    let config = write_config(dir.path(), &disk("img", "image", &image));
    agent_ok(&config, &["sync"]);
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    data[5 << 20] ^= 0xff;
    std::fs::write(&image, &data).unwrap();
    let out = agent(&config, &["sync"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no local state; resynchronising by checksum compare with the store"),
        "{stderr}"
    );
    // Only the changed block shipped: the hashes came from the store's segment indexes.
    assert!(stdout.contains("/ 1 changed blocks"), "{stdout}");
}

#[test]
fn a_cache_store_rolled_back_behind_the_agent_never_gets_reused_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut data = random_bytes(3 << 20, 4);
    std::fs::write(&image, &data).unwrap();
    let config = write_config(dir.path(), &disk("img", "image", &image));
    agent_ok(&config, &["sync"]);
    data[100] ^= 1;
    std::fs::write(&image, &data).unwrap();
    agent_ok(&config, &["sync"]);
    // The store loses its newest tag (and the point on it), as if restored from an older copy.
    // (Numbers of a history start from its time: the newest tag is the highest name.)
    let tags = dir.path().join("store/v1/g/vms/vm1/disks/img/tag");
    let mut names: Vec<String> = std::fs::read_dir(&tags)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let newest = names.pop().unwrap();
    let n: u64 = newest.trim_end_matches(".tag").parse().unwrap();
    std::fs::remove_file(tags.join(&newest)).unwrap();
    for p in std::fs::read_dir(dir.path().join("store/v1/g/points"))
        .unwrap()
        .flatten()
    {
        if p.file_name()
            .to_string_lossy()
            .ends_with(&format!("-t{n}.point"))
        {
            std::fs::remove_file(p.path()).unwrap();
        }
    }
    data[200_000] ^= 1;
    std::fs::write(&image, &data).unwrap();
    let out = agent(&config, &["sync"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("behind this agent's state"), "{stderr}");
    assert!(
        stdout.contains(&format!("tag {} ", n + 1)),
        "tag number {n} was reused: {stdout}"
    );
    let restored = dir.path().join("restored");
    restore_id(dir.path(), &point_id(&stdout), &restored);
    assert!(std::fs::read(restored.join("img")).unwrap() == data);
}

#[test]
fn a_damaged_page_of_block_hashes_costs_its_blocks_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // 4 KiB blocks: 4096 blocks, four pages of 1024 hashes.
    let mut data = random_bytes(16 << 20, 0x51);
    std::fs::write(&image, &data).unwrap();
    let config = write_config(dir.path(), &disk("img", "image", &image));
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[replication]", "[replication]\nblock_size = \"4KiB\"");
    std::fs::write(&config, text).unwrap();
    agent_ok(&config, &["sync"]);
    let base = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("img.blocks."))
        .expect("a block hash file");
    // One hash of the second page, and one block of the third page changed on the disk.
    let mut raw = std::fs::read(&base).unwrap();
    raw[1500 * 32 + 7] ^= 0x40;
    std::fs::write(&base, &raw).unwrap();
    data[2500 * 4096 + 9] ^= 1;
    std::fs::write(&image, &data).unwrap();
    let out = agent_ok(&config, &["sync"]);
    assert_eq!(
        changed_blocks(&out),
        1024 + 1,
        "the damaged page's blocks and the changed one ship again, nothing else\n{out}"
    );
    let restored = dir.path().join("restored");
    restore_id(dir.path(), &point_id(&out), &restored);
    assert!(std::fs::read(restored.join("img")).unwrap() == data);
    // And the state is whole again.
    let out = agent_ok(&config, &["sync"]);
    assert_eq!(changed_blocks(&out), 0, "{out}");
}
