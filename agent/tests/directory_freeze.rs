//! Directory disks on a frozen ext4 with live writers of every kind change events can miss
//! (writes through a shared mapping, through a hard link outside the disk, into directories
//! made or renamed into place a moment earlier, directories swapped under the same names,
//! files renamed over others): every point restores exactly the tree the
//! test's own copy held, made while the filesystem was frozen (`LIFEBOAT_TEST_WHILE_FROZEN`),
//! and the frozen capture read what changed from events instead of walking every file.
//! Root only (loop devices, mount, fsfreeze); CI runs as root.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lifeboat_tests::{assert_same_tree, tree_difference};

/// Random changes of every kind under `data`, a file written through a hard link in `outside`,
/// and a file mapped shared and writable, written through the mapping without a pause (the
/// mapping stays open, as a database's would).
const WRITER: &str = r#"
import mmap, os, random, shutil, sys, time
data, outside, stop, ready = sys.argv[1:5]
rnd = random.Random(11)
m = mmap.mmap(os.open(os.path.join(data, "mapped.bin"), os.O_RDWR), 0)
link = os.path.join(outside, "link.bin")
open(ready, "w").close()
i = 0
while not os.path.exists(stop):
    i += 1
    off = rnd.randrange(len(m) - 64)
    m[off:off + 64] = rnd.randbytes(64)
    op = rnd.randrange(8)
    d = os.path.join(data, f"d{rnd.randrange(30)}")
    if op == 0:
        with open(os.path.join(d, f"f{rnd.randrange(100)}"), "wb") as f:
            f.write(rnd.randbytes(rnd.randrange(1, 9000)))
    elif op == 1:
        p = os.path.join(d, f"f{rnd.randrange(100)}")
        if os.path.exists(p):
            os.remove(p)
    elif op == 2:
        n = os.path.join(data, f"new{i}")
        os.makedirs(os.path.join(n, "deep"))
        for k in range(3):
            with open(os.path.join(n, "deep", f"x{k}"), "wb") as f:
                f.write(rnd.randbytes(3000))
    elif op == 3:
        news = [e for e in os.listdir(data) if e.startswith("new")]
        if news:
            src = os.path.join(data, rnd.choice(news))
            if rnd.randrange(2):
                os.rename(src, os.path.join(data, f"moved{i}"))
            else:
                shutil.rmtree(src)
    elif op == 4:
        with open(link, "r+b") as f:
            f.seek(rnd.randrange(60000))
            f.write(rnd.randbytes(100))
    elif op == 5:
        with open(os.path.join(d, f"f{rnd.randrange(100)}"), "ab") as f:
            f.write(b"appended\n")
    elif op == 6:
        # A new version renamed over the old one, as editors and databases do.
        p = os.path.join(d, f"f{rnd.randrange(100)}")
        with open(p + ".new", "wb") as f:
            f.write(rnd.randbytes(rnd.randrange(1, 5000)))
        os.rename(p + ".new", p)
    elif op == 7 and i % 20 == 0:
        # Two directories swap names: the same paths, other contents.
        a, b = (os.path.join(data, f"d{k}") for k in rnd.sample(range(30), 2))
        os.rename(a, a + ".swap")
        os.rename(b, a)
        os.rename(a + ".swap", b)
    time.sleep(0.002)
"#;

#[test]
fn directory_points_under_live_writers_restore_the_frozen_tree_from_events() {
    if !root_or_skip("directory_points_under_live_writers_restore_the_frozen_tree_from_events") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lfs = LoopFs::new(dir.path(), "ext4", 320);
    let (data, outside) = (lfs.mount.join("data"), lfs.mount.join("outside"));
    // 3,000 files that mostly never change: what a walk would stat while frozen.
    for d in 0..30 {
        let sub = data.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            std::fs::write(sub.join(format!("f{f}")), random_bytes(1000, d * 1000 + f)).unwrap();
        }
    }
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(data.join("mapped.bin"), vec![0u8; 256 << 10]).unwrap();
    std::fs::write(data.join("linked.bin"), vec![1u8; 64 << 10]).unwrap();
    std::fs::hard_link(data.join("linked.bin"), outside.join("link.bin")).unwrap();
    let oracles = dir.path().join("oracles");
    std::fs::create_dir_all(&oracles).unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"tree\"\nkind = \"directory\"\npath = {:?}\nconsistency = \"fsfreeze\"\nmount = {:?}\nfreeze_timeout = \"20s\"\n",
            data.display(),
            lfs.mount.display()
        ),
    );
    let (stop, ready) = (dir.path().join("stop"), dir.path().join("ready"));
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(WRITER)
        .arg(&data)
        .arg(&outside)
        .arg(&stop)
        .arg(&ready)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ready.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the writer never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut cuts = Vec::new();
    for _ in 0..5 {
        let out = Command::new(AGENT)
            .arg("--config")
            .arg(&config)
            .arg("sync")
            .env(
                "LIFEBOAT_TEST_WHILE_FROZEN",
                format!(
                    "cp -a {} {}/$LIFEBOAT_CUT_TIME_MS",
                    data.display(),
                    oracles.display()
                ),
            )
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "sync failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("state/status.json")).unwrap())
                .unwrap();
        let how = status["disks"]["tree"]["tracking"].as_str().unwrap_or("");
        assert!(
            how.starts_with("events:"),
            "the frozen capture walked the disk: {how}"
        );
        eprintln!(
            "{how}; {}",
            text.lines()
                .find(|l| l.contains("capture read"))
                .unwrap_or("")
        );
        cuts.push(point_id(&text));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(&stop, b"").unwrap();
    assert!(writer.wait().unwrap().success(), "writer failed");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&dir.path().join("store"), "g");
    let mut previous: Option<std::path::PathBuf> = None;
    for (i, id) in cuts.iter().enumerate() {
        let out = dir.path().join(format!("restore-{i}"));
        let point = rt.block_on(async {
            let p = reader
                .point(&lifeboat_store::PointId::new(id.clone()).unwrap())
                .await
                .unwrap();
            restore_point(&reader, &p, &out).await;
            p
        });
        assert_eq!(
            point.members[0].consistency,
            lifeboat_store::manifest::Consistency::Crash
        );
        let oracle = oracles.join(point.time.to_string());
        assert_same_tree(&oracle, &out.join("tree"));
        // The writers changed the tree between cuts, so equality above is not vacuous.
        if let Some(p) = &previous {
            assert!(
                tree_difference(p, &oracle).is_some(),
                "two cuts saw the same tree: the writer was not running"
            );
        }
        previous = Some(oracle);
    }
}
