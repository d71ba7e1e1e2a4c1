//! Block devices under mounted ext4 and xfs with a live writer (root only; CI runs as root):
//! every recovery point restores to exactly the bytes an independent O_DIRECT read of the
//! device returned while the filesystem was frozen for that cut.
//!
//! The oracle is the test's own `dd iflag=direct`, run by the agent while frozen (through the
//! `LIFEBOAT_TEST_WHILE_FROZEN` instrumentation) into a file named by the cut's time; the agent
//! never sees those bytes. "Every block verified" only proves the store returned what the agent
//! stored; this proves what the agent stored was the device. Between cuts the agent is
//! SIGKILLed at random moments (mid pre-copy, mid freeze, mid upload), and the restored
//! database passes SQLite's integrity check.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lifeboat_tests::{LiveWriter, assert_same_bytes, attach_loop, check_database, oracle_command};

/// Tests here freeze filesystems and load both cores; one at a time keeps deadlines honest.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A tiny deterministic generator, so a failing run can be repeated.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn agent_cmd(config: &Path, oracles: &Path, device: &Path) -> Command {
    let mut c = Command::new(AGENT);
    c.arg("--config")
        .arg(config)
        .env("LIFEBOAT_LOG", "info")
        .env(
            "LIFEBOAT_TEST_WHILE_FROZEN",
            oracle_command(device, oracles),
        );
    c
}

fn block_device_restores_what_the_device_held(fs: &str, kind: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test = format!("{kind}_under_live_{fs}_restores_the_oracle");
    if !root_or_skip(&test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lfs = LoopFs::new(dir.path(), fs, 320);
    let oracles = dir.path().join("oracles");
    std::fs::create_dir_all(&oracles).unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"vol\"\nkind = \"{kind}\"\npath = {:?}\nconsistency = \"fsfreeze\"\nmount = {:?}\nfreeze_timeout = \"20s\"\n",
            if kind == "image" {
                &lfs.image
            } else {
                &lfs.device
            }
            .display(),
            lfs.mount.display()
        ),
    );
    let writer = LiveWriter::start(&lfs.mount, 7);
    std::thread::sleep(Duration::from_millis(500));

    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ fs.len() as u64;
    let mut published = Vec::new();
    let mut kills = 0;
    for round in 0..6 {
        // A cycle killed at a random moment: pre-copy, freeze, oracle, upload or tagging.
        if round > 0 {
            let mut child = agent_cmd(&config, &oracles, &lfs.device)
                .arg("sync")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let wait = Duration::from_millis(20 + next(&mut rng) % 600);
            let t0 = Instant::now();
            while t0.elapsed() < wait && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
            }
            let _ = child.wait();
        }
        let out = agent_cmd(&config, &oracles, &lfs.device)
            .arg("sync")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "sync {round} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("freeze: held"), "no freeze:\n{stdout}");
        published.push(point_id(&stdout));
        std::thread::sleep(Duration::from_millis(50 + next(&mut rng) % 300));
    }
    writer.stop();
    eprintln!(
        "{fs}: {} points, {kills} agents killed mid-cycle",
        published.len()
    );
    // The last pass was tracked (an image through its loop device), not a scan.
    let status = agent_ok(&config, &["status"]);
    assert!(status.contains("tracking: ebpf"), "{status}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&dir.path().join("store"), "g");
    let mut compared = 0;
    for (i, id) in published.iter().enumerate() {
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
        let oracle = oracles.join(format!("{}.img", point.time));
        assert!(oracle.exists(), "no oracle read at {} for {id}", point.time);
        assert_same_bytes(&out.join("vol"), &oracle, &format!("{fs} point {id}"));
        compared += 1;
        if i == published.len() - 1 {
            check_database(&out.join("vol"), fs, &dir.path().join("check-mnt"));
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    assert_eq!(compared, 6);
    // Leave no program attached to the block layer behind.
    agent_ok(&config, &["untrack"]);
}

#[test]
fn block_device_under_live_ext4_restores_the_oracle() {
    block_device_restores_what_the_device_held("ext4", "block_device");
}

#[test]
fn block_device_under_live_xfs_restores_the_oracle() {
    block_device_restores_what_the_device_held("xfs", "block_device");
}

/// An image attached to a loop device and mounted: tracked through the loop device, read
/// through the image's page cache, restored to what the loop device held at each cut.
#[test]
fn image_under_live_ext4_restores_the_oracle() {
    block_device_restores_what_the_device_held("ext4", "image");
}

/// `check` and `check-config` prove freezability: a `mount` that is missing, a plain
/// directory, or another filesystem (the host one holding an image) is refused with a clear
/// error, and `sync` refuses to cut rather than label an unfrozen disk crash-consistent.
/// A resync by checksum compare of a block device under a mounted ext4 with a live writer.
/// The offer is built from the O_DIRECT oracle read while frozen for the newest tag, which is
/// exactly what a restore of that tag gives, as processing would list it from the target. The
/// next cut must send only what the writer changed since, and the point it publishes, read
/// through a base over that tag, must equal its own oracle byte for byte.
#[test]
fn a_block_device_resynchronised_over_an_offered_tag_restores_the_oracle() {
    use lifeboat_store::sums::{SumEntry, SumsBuilder};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip("a_block_device_resynchronised_over_an_offered_tag_restores_the_oracle") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lfs = LoopFs::new(dir.path(), "ext4", 320);
    let oracles = dir.path().join("oracles");
    std::fs::create_dir_all(&oracles).unwrap();
    let config = block_device_config(dir.path(), &lfs, "20s");
    let writer = LiveWriter::start(&lfs.mount, 11);
    std::thread::sleep(Duration::from_millis(300));
    let sync = || {
        let out = agent_cmd(&config, &oracles, &lfs.device)
            .arg("sync")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("freeze: held"), "no freeze:\n{stdout}");
        (point_id(&stdout), stderr)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = dir.path().join("store");
    let reader = reader(&store, "g");
    let point = |id: &str| {
        rt.block_on(reader.point(&lifeboat_store::PointId::new(id).unwrap()))
            .unwrap()
    };
    let tag_of = |id: &str| {
        let p = point(id);
        let d = &p.members[0].disks[0];
        (
            rt.block_on(reader.tag(&p.members[0].vm, &d.disk, d.tag))
                .unwrap(),
            oracles.join(format!("{}.img", p.time)),
        )
    };
    sync();
    let (first, _) = sync();

    // Processing's offer of the newest tag: its blocks' hashes, from that cut's oracle.
    let (origin, oracle) = tag_of(&first);
    let image = std::fs::read(&oracle).unwrap();
    let bs = origin.block_size as usize;
    let mut sums = SumsBuilder::new(origin.seq, origin.block_size, vec![String::new()]);
    for (i, block) in image.chunks(bs).enumerate() {
        sums.push(SumEntry {
            target: 0,
            offset: (i * bs) as u64,
            length: block.len() as u32,
            hash: *blake3::hash(block).as_bytes(),
        });
    }
    let layout = reader.layout();
    for (name, bytes) in [
        (
            layout.resync_sums(&origin.vm, &origin.disk, origin.from_segment),
            sums.finish(),
        ),
        (
            layout.resync(&origin.vm, &origin.disk, origin.from_segment),
            bytes::Bytes::from_static(b"test"),
        ),
    ] {
        rt.block_on(reader.backend().put_new(&name, bytes)).unwrap();
    }
    let segs = |reader: &lifeboat_store::restore::StoreReader| {
        rt.block_on(reader.segment_seqs(&origin.vm, &origin.disk))
            .unwrap()
    };
    let before = segs(&reader);
    let (delta_id, log) = sync();
    assert!(
        log.contains("checksum compare with the tag processing offered"),
        "{log}"
    );
    let (delta, delta_oracle) = tag_of(&delta_id);
    assert_eq!(delta.origin, Some(origin.seq));
    let sent: u64 = segs(&reader)
        .into_iter()
        .filter(|s| !before.contains(s))
        .map(|s| {
            let name = layout.segment(&origin.vm, &origin.disk, s);
            std::fs::metadata(store.join(name.as_str())).unwrap().len()
        })
        .sum();
    eprintln!(
        "resync over tag {}: sent {sent} bytes of a {} byte device",
        origin.seq,
        image.len()
    );
    assert!(
        sent < image.len() as u64 / 4,
        "the resync sent {sent} bytes of a {} byte device",
        image.len()
    );
    // As processing does before it publishes it: a base over the origin; then the point is
    // the device as it was frozen for it.
    rt.block_on(lifeboat_store::compact::compact(
        &reader,
        &delta,
        1 << 20,
        3,
    ))
    .unwrap();
    let out = dir.path().join("restore-delta");
    rt.block_on(restore_point(&reader, &point(&delta_id), &out));
    assert_same_bytes(&out.join("vol"), &delta_oracle, "the resync's point");
    // The history goes on over it, tracked again.
    let (next_id, _) = sync();
    writer.stop();
    let (_, next_oracle) = tag_of(&next_id);
    let out = dir.path().join("restore-next");
    rt.block_on(restore_point(&reader, &point(&next_id), &out));
    assert_same_bytes(&out.join("vol"), &next_oracle, "the point after the resync");
    check_database(&out.join("vol"), "ext4", &dir.path().join("check-mnt"));
    agent_ok(&config, &["untrack"]);
}

#[test]
fn a_mount_that_is_not_the_disks_filesystem_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip("a_mount_that_is_not_the_disks_filesystem_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = LoopFs::named(dir.path(), "a", "ext4", 64);
    let b = LoopFs::named(dir.path(), "b", "ext4", 64);
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let cases: Vec<(String, &str)> = vec![
        // block device, mount missing
        (
            format!(
                "kind = \"block_device\"\npath = {:?}\nmount = \"{}/nowhere\"",
                a.device.display(),
                dir.path().display()
            ),
            "cannot be resolved",
        ),
        // block device, mount a plain directory
        (
            format!(
                "kind = \"block_device\"\npath = {:?}\nmount = {:?}",
                a.device.display(),
                plain.display()
            ),
            "is not a mount point",
        ),
        // block device, another device's filesystem
        (
            format!(
                "kind = \"block_device\"\npath = {:?}\nmount = {:?}",
                a.device.display(),
                b.mount.display()
            ),
            "not on",
        ),
        // image, the wrong image's filesystem
        (
            format!(
                "kind = \"image\"\npath = {:?}\nmount = {:?}",
                a.image.display(),
                b.mount.display()
            ),
            "not inside",
        ),
    ];
    for (disk, want) in &cases {
        let config = write_config(
            dir.path(),
            &format!("[[disk]]\nid = \"d\"\n{disk}\nconsistency = \"fsfreeze\"\n"),
        );
        let cc = agent(&config, &["check-config"]);
        assert_eq!(cc.status.code(), Some(2), "check-config accepted {disk}");
        let err = String::from_utf8_lossy(&cc.stderr);
        assert!(err.contains(want), "check-config for {disk}: {err}");
        let check = agent(&config, &["check"]);
        assert!(!check.status.success(), "check accepted {disk}");
        let text = String::from_utf8_lossy(&check.stdout);
        assert!(text.contains(want), "check for {disk}: {text}");
        let sync = agent(&config, &["sync"]);
        assert!(!sync.status.success(), "sync cut {disk}");
        assert!(
            String::from_utf8_lossy(&sync.stderr).contains(want),
            "sync for {disk}: {}",
            String::from_utf8_lossy(&sync.stderr)
        );
    }
    assert!(
        !dir.path().join("store/v1/g/points").exists()
            || std::fs::read_dir(dir.path().join("store/v1/g/points"))
                .unwrap()
                .next()
                .is_none(),
        "a point was published over a wrong mount"
    );
    // The right ones pass: the device's own filesystem, and the image's.
    for disk in [
        format!(
            "kind = \"block_device\"\npath = {:?}\nmount = {:?}",
            a.device.display(),
            a.mount.display()
        ),
        format!(
            "kind = \"image\"\npath = {:?}\nmount = {:?}",
            b.image.display(),
            b.mount.display()
        ),
    ] {
        let config = write_config(
            dir.path(),
            &format!("[[disk]]\nid = \"d\"\n{disk}\nconsistency = \"fsfreeze\"\n"),
        );
        agent_ok(&config, &["check-config"]);
    }
}

/// A config with one block device disk under `lfs`, frozen with `freeze_timeout`.
fn block_device_config(dir: &Path, lfs: &LoopFs, freeze_timeout: &str) -> PathBuf {
    write_config(
        dir,
        &format!(
            "[[disk]]\nid = \"vol\"\nkind = \"block_device\"\npath = {:?}\nconsistency = \"fsfreeze\"\nmount = {:?}\nfreeze_timeout = \"{freeze_timeout}\"\n",
            lfs.device.display(),
            lfs.mount.display()
        ),
    )
}

/// Starts `sync` in a process group of its own (as a shell job would be) whose oracle hook
/// marks "frozen" and then holds the freeze for 30 s; returns once the mark is there, with the
/// time it was seen.
fn sync_holding_the_freeze(config: &Path, dir: &Path) -> (std::process::Child, Instant) {
    let frozen_flag = dir.join("frozen");
    let mut c = Command::new(AGENT);
    c.arg("--config")
        .arg(config)
        .arg("sync")
        .env(
            "LIFEBOAT_TEST_WHILE_FROZEN",
            format!("touch {}; sleep 30", frozen_flag.display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let child = c.spawn().unwrap();
    let t0 = Instant::now();
    while !frozen_flag.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "never froze");
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, Instant::now())
}

/// A write and fsync under `mount` on a thread of its own: it finishes once the filesystem
/// is thawed.
fn probe_write(mount: &Path) -> std::thread::JoinHandle<()> {
    let probe = mount.join("probe");
    std::thread::spawn(move || {
        std::fs::write(&probe, b"x").unwrap();
        std::fs::File::open(&probe).unwrap().sync_all().unwrap();
    })
}

/// Stopping the agent's whole process group while it holds a freeze (Ctrl-Z at a terminal,
/// `kill -STOP -<pgid>`) does not stop the watchdog: the filesystem thaws at the deadline.
#[test]
fn stopping_the_agents_process_group_mid_freeze_still_thaws_at_the_deadline() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip("stopping_the_agents_process_group_mid_freeze_still_thaws_at_the_deadline") {
        return;
    }
    for signal in ["STOP", "TSTP"] {
        let dir = tempfile::tempdir().unwrap();
        let lfs = LoopFs::new(dir.path(), "ext4", 64);
        let config = block_device_config(dir.path(), &lfs, "1s");
        // The agent holds the freeze, so the group is stopped mid-freeze.
        let (mut child, frozen_at) = sync_holding_the_freeze(&config, dir.path());
        run(Command::new("kill")
            .args(["-s", signal, "--"])
            .arg(format!("-{}", child.id())));
        // The agent really is stopped (state T), or this test proves nothing.
        let t1 = Instant::now();
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
            let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
            if state == Some('T') {
                break;
            }
            assert!(
                t1.elapsed() < Duration::from_secs(5),
                "agent not stopped: {stat}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // A write must go through within the 1 s deadline plus slack, with the agent stopped.
        let writer = probe_write(&lfs.mount);
        while !writer.is_finished() {
            assert!(
                frozen_at.elapsed() < Duration::from_secs(10),
                "SIG{signal} of the agent's group kept the filesystem frozen past its deadline"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let held = frozen_at.elapsed();
        writer.join().unwrap();
        eprintln!("SIG{signal}: thawed {held:?} after the freeze with the agent's group stopped");
        assert!(held < Duration::from_millis(1000 + 1500), "held {held:?}");
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--"])
            .arg(format!("-{}", child.id()))
            .output();
        let _ = child.wait();
    }
}

/// A filesystem thawed by something else in the middle of a cut (`fsfreeze -u` by an admin, a
/// guard stopped early) means the capture may mix states: the cut is discarded, never published
/// as crash-consistent. The RCU switch the agent expedites during FIFREEZE is left as found.
#[test]
fn a_filesystem_thawed_by_someone_else_mid_cut_discards_the_cut() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip("a_filesystem_thawed_by_someone_else_mid_cut_discards_the_cut") {
        return;
    }
    let rcu = || std::fs::read_to_string("/sys/kernel/rcu_expedited").ok();
    let rcu_before = rcu();
    let dir = tempfile::tempdir().unwrap();
    let lfs = LoopFs::new(dir.path(), "ext4", 64);
    let config = block_device_config(dir.path(), &lfs, "20s");
    agent_ok(&config, &["sync"]);
    std::fs::write(lfs.mount.join("f"), b"changed").unwrap();
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(&config)
        .arg("sync")
        .env(
            "LIFEBOAT_TEST_WHILE_FROZEN",
            format!("fsfreeze -u {}", lfs.mount.display()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a cut whose filesystem was thawed mid-capture succeeded"
    );
    assert!(
        stderr.contains("thawed by something else"),
        "the error does not say why: {stderr}"
    );
    let points = std::fs::read_dir(dir.path().join("store/v1/g/points"))
        .unwrap()
        .count();
    assert_eq!(points, 1, "the discarded cut published a point");
    // The next cut, undisturbed, is published.
    agent_ok(&config, &["sync"]);
    assert_eq!(
        rcu(),
        rcu_before,
        "the agent left /sys/kernel/rcu_expedited changed"
    );
}

/// A cgroup v2 directory where this test may make child groups (`cgroup.freeze` lives in every
/// non-root group): the unified hierarchy itself, or its hybrid mount.
#[cfg(target_os = "linux")]
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
}

/// `pid` and every process descended from it, from /proc.
#[cfg(target_os = "linux")]
fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{n}/stat")).ok()?;
            let ppid = stat
                .rsplit(") ")
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((n, ppid))
        })
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(n, _)| *n));
        i += 1;
    }
    tree
}

/// A cgroup freeze of the agent (what `systemctl freeze lifeboat-agent` does to the unit) while
/// it holds a freeze: with the thaw guard, which runs outside the agent's cgroup (systemd
/// starts it per connection from `lifeboat-thaw-guard.socket`; here the test plays systemd's
/// part, accepting on the socket and starting `lifeboat-agent thaw-watchdog` on the
/// connection), the filesystem thaws at the deadline. Without it the child watchdog is frozen
/// along with the agent and the filesystem stays frozen: checked too, so the test shows it can
/// fail.
#[test]
#[cfg(target_os = "linux")]
fn a_cgroup_freeze_of_the_agent_mid_freeze_still_thaws_at_the_deadline_with_the_thaw_guard() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let name =
        "a_cgroup_freeze_of_the_agent_mid_freeze_still_thaws_at_the_deadline_with_the_thaw_guard";
    if !root_or_skip(name) {
        return;
    }
    let Some(cgroups) = cgroup2_root() else {
        eprintln!(
            "SKIPPED {name}: no cgroup v2 hierarchy mounted (neither /sys/fs/cgroup nor /sys/fs/cgroup/unified)"
        );
        return;
    };
    for guarded in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let lfs = LoopFs::new(dir.path(), "ext4", 64);
        let sock = dir.path().join("guard.sock");
        let config = block_device_config(dir.path(), &lfs, "1s");
        let text = std::fs::read_to_string(&config).unwrap();
        let text = text.replace(
            &format!("thaw_guard = {:?}", dir.path().join("no-thaw-guard.sock")),
            &format!("thaw_guard = {sock:?}"),
        );
        assert!(text.contains(&format!("thaw_guard = {sock:?}")));
        std::fs::write(&config, text).unwrap();
        // The socket unit's part: one `thaw-watchdog` per connection, the connection as stdin.
        let guards = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if guarded {
            let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            let guards = guards.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { break };
                    let child = Command::new(AGENT)
                        .arg("thaw-watchdog")
                        .stdin(std::os::fd::OwnedFd::from(conn))
                        .stdout(std::process::Stdio::null())
                        .spawn()
                        .unwrap();
                    guards.lock().unwrap().push(child);
                }
            });
        }
        let check = agent_ok(&config, &["check"]);
        assert_eq!(
            check.contains("guarded by the thaw guard"),
            guarded,
            "check does not say which watchdog guards the freeze:\n{check}"
        );
        // Every guard started so far (check's, never armed; an undisturbed cut's, told `done`)
        // ends by itself, successfully, without thawing anything.
        agent_ok(&config, &["sync"]);
        let all_exit = |what: &str| {
            let t = Instant::now();
            for g in guards.lock().unwrap().iter_mut() {
                let status = loop {
                    if let Some(s) = g.try_wait().unwrap() {
                        break s;
                    }
                    assert!(
                        t.elapsed() < Duration::from_secs(10),
                        "a thaw guard did not end after {what}"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                };
                assert!(
                    status.success(),
                    "a thaw guard failed after {what}: {status}"
                );
            }
        };
        if guarded {
            assert_eq!(
                guards.lock().unwrap().len(),
                2,
                "check and the cut each get a guard"
            );
            all_exit("check and an undisturbed cut");
        }
        let (mut child, frozen_at) = sync_holding_the_freeze(&config, dir.path());
        // Every process of the agent (its child watchdog, in a process group of its own,
        // included) into a cgroup of its own, then frozen.
        let group = cgroups.join(format!("lifeboat-test-{}", std::process::id()));
        std::fs::create_dir(&group).unwrap();
        for pid in process_tree(child.id()) {
            let _ = std::fs::write(group.join("cgroup.procs"), pid.to_string());
        }
        std::fs::write(group.join("cgroup.freeze"), "1").unwrap();
        while !std::fs::read_to_string(group.join("cgroup.events"))
            .unwrap()
            .contains("frozen 1")
        {
            assert!(
                frozen_at.elapsed() < Duration::from_secs(5),
                "cgroup never froze"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let writer = probe_write(&lfs.mount);
        let outcome = if guarded {
            while !writer.is_finished() {
                assert!(
                    frozen_at.elapsed() < Duration::from_secs(10),
                    "a cgroup freeze of the agent kept the filesystem frozen past its deadline despite the thaw guard"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let held = frozen_at.elapsed();
            eprintln!(
                "thaw guard: thawed {held:?} after the freeze with the agent's cgroup frozen"
            );
            assert!(held < Duration::from_millis(1000 + 1500), "held {held:?}");
            None
        } else {
            // Past the deadline with room to spare, the child watchdog (frozen too) has not
            // thawed: this is the case the guard exists for.
            std::thread::sleep(Duration::from_millis(3000));
            Some(writer.is_finished())
        };
        std::fs::write(group.join("cgroup.freeze"), "0").unwrap();
        if let Some(finished) = outcome {
            assert!(
                !finished,
                "without the thaw guard the filesystem thawed while the agent's cgroup was frozen: the guarded case proves nothing"
            );
        }
        writer.join().unwrap();
        let _ = std::fs::write(group.join("cgroup.kill"), "1");
        let _ = child.wait();
        let t1 = Instant::now();
        while std::fs::remove_dir(&group).is_err() {
            assert!(
                t1.elapsed() < Duration::from_secs(10),
                "cgroup never emptied"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if guarded {
            all_exit("thawing at the deadline");
        }
    }
}

/// Random 4 KiB O_DIRECT writes straight to a raw block device (no filesystem), plus buffered
/// ones, until the stop file appears; each loop it appends the count to its log.
const RAW_WRITER: &str = r#"
import mmap, os, random, sys, time
dev, stop, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(seed)
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
buffered = os.open(dev, os.O_RDWR)
buf = mmap.mmap(-1, 65536)
n = 0
while not os.path.exists(stop):
    n += 1
    k = rnd.choice([1, 1, 1, 4, 16])
    buf.seek(0)
    buf.write(rnd.randbytes(4096 * k))
    os.pwrite(fd, memoryview(buf)[: 4096 * k], rnd.randrange(size // 4096 - k) * 4096)
    if n % 7 == 0:
        os.pwrite(buffered, rnd.randbytes(512), rnd.randrange(size // 512) * 512)
    if n % 50 == 0:
        os.fsync(buffered)
    # A few hundred writes a second: churn, not a rewrite of the whole disk every pass.
    time.sleep(0.002)
os.fsync(buffered)
"#;

/// The amount after `key` in the agent's summary line ("pre-copy read 123 bytes").
fn read_bytes(out: &str, key: &str) -> u64 {
    out.split(key)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{key}` in {out}"))
}

fn raw_loop_device(dir: &Path, size_mib: u64) -> (PathBuf, PathBuf) {
    let image = dir.join("raw.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size_mib << 20)
        .unwrap();
    let dev = attach_loop(&image);
    (image, dev)
}

/// Detaches a loop device on drop.
#[derive(Debug)]
struct Detach(PathBuf);
impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).output();
    }
}

/// Restores the latest point and compares it with an O_DIRECT read of the (quiet) device.
fn assert_latest_equals_device(dir: &Path, dev: &Path, what: &str) {
    let out = dir.join("latest");
    let _ = std::fs::remove_dir_all(&out);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&dir.join("store"), "g");
    rt.block_on(async {
        let points = reader.points().await.unwrap();
        let p = points.into_iter().max_by_key(|p| p.time).unwrap();
        restore_point(&reader, &p, &out).await;
    });
    let oracle = dir.join("device.img");
    run(Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .arg(format!("of={}", oracle.display()))
        .args(["bs=1M", "iflag=direct", "status=none"]));
    assert_same_bytes(&out.join("raw"), &oracle, what);
    std::fs::remove_file(&oracle).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}

/// The epoch switch loses no write: a writer hammers the raw device with direct and buffered
/// writes *during* 24 read-outs (some agents SIGKILLed mid-pass, tracking resumed from pinned
/// maps each time); once it stops, one more pass must restore the device byte for byte. Later
/// passes read only what was written (not the whole disk), or the test fails: tracking that
/// silently fell back to scanning would prove nothing here.
#[test]
fn no_write_is_lost_across_read_outs_and_restarts() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip("no_write_is_lost_across_read_outs_and_restarts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_image, dev) = raw_loop_device(dir.path(), 512);
    let _detach = Detach(dev.clone());
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"raw\"\nkind = \"block_device\"\npath = {:?}\n",
            dev.display()
        ),
    );
    agent_ok(&config, &["untrack"]);
    agent_ok(&config, &["sync"]);
    let stop = dir.path().join("stop");
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(RAW_WRITER)
        .arg(&dev)
        .arg(&stop)
        .arg("11")
        .spawn()
        .unwrap();
    let mut rng = 0x1234_5678_9abc_def1_u64;
    let (mut tracked, mut kills) = (0, 0);
    for round in 0..24 {
        if round % 3 == 1 {
            let mut child = spawn_agent(&config, &["sync"]);
            std::thread::sleep(Duration::from_millis(next(&mut rng) % 150));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                kills += 1;
            }
            let _ = child.wait();
        }
        let out = agent_ok(&config, &["sync"]);
        let read = read_bytes(&out, "capture read ");
        if read < (512 << 20) / 4 {
            tracked += 1;
        }
    }
    std::fs::write(&stop, b"").unwrap();
    assert!(writer.wait().unwrap().success(), "writer failed");
    let out = agent_ok(&config, &["sync"]);
    let status = agent_ok(&config, &["status"]);
    eprintln!(
        "{kills} agents killed; {tracked} of 24 passes read a fraction of the disk\n{status}"
    );
    assert!(
        status.contains("tracking: ebpf"),
        "last pass was not tracked: {status}\n{out}"
    );
    assert!(tracked >= 20, "only {tracked} of 24 passes used tracking");
    assert_latest_equals_device(dir.path(), &dev, "after 24 read-outs under writes");
    agent_ok(&config, &["untrack"]);
}

/// Every discontinuity makes the next pass a checksum scan (never a full copy) and says why
/// in `status`: tracking state removed (as after a reboot), the device grown, a discard too
/// long to track block by block. Each time the latest point equals the device.
#[test]
fn discontinuities_fall_back_to_a_scan_with_the_reason() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip("discontinuities_fall_back_to_a_scan_with_the_reason") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 4 KiB blocks: a chunk of the tracker is 16 MiB, so a discard of the whole device spans
    // many chunks and is marked chunk by chunk.
    let (image, dev) = raw_loop_device(dir.path(), 1 << 10);
    let _detach = Detach(dev.clone());
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"raw\"\nkind = \"block_device\"\npath = {:?}\n",
            dev.display()
        ),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[replication]\n", "[replication]\nblock_size = \"4KiB\"\n");
    std::fs::write(&config, text).unwrap();
    let write_at = |offset_mib: u64, seed: u64| {
        let data = random_bytes(1 << 20, seed);
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset_mib << 20)).unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        f.sync_all().unwrap();
    };
    let tracking = || {
        let s = agent_ok(&config, &["status"]);
        s.lines()
            .find(|l| l.trim_start().starts_with("tracking:"))
            .unwrap_or("")
            .to_owned()
    };
    agent_ok(&config, &["untrack"]);
    write_at(3, 1);
    agent_ok(&config, &["sync"]);
    write_at(100, 2);
    let out = agent_ok(&config, &["sync"]);
    assert!(tracking().contains("ebpf: "), "{}", tracking());
    assert!(read_bytes(&out, "pre-copy read ") < 8 << 20, "{out}");

    // The verification sweep reads everything, tracker or not.
    agent_ok(&config, &["sync", "--verify"]);
    let t = tracking();
    assert!(t.contains("scan: verification sweep"), "{t}");

    // Tracking state gone (as after a reboot): a scan, not a full copy.
    agent_ok(&config, &["untrack"]);
    write_at(200, 3);
    let out = agent_ok(&config, &["sync"]);
    let t = tracking();
    assert!(
        t.contains("scan: ") && t.contains("no tracking state pinned"),
        "{t}"
    );
    let changed = read_bytes(&out, "bytes / ");
    assert!(
        changed < 1024,
        "a scan shipped {changed} blocks, not just the change: {out}"
    );
    assert_latest_equals_device(dir.path(), &dev, "after tracking state was removed");

    // A discard of the whole device: the kernel splits it into bios of at most
    // discard_max_bytes, each marked chunk by chunk (one longer than 256 chunks would be
    // counted as overflow and make the next pass scan).
    write_at(300, 4);
    agent_ok(&config, &["sync"]);
    run(Command::new("blkdiscard").arg(&dev));
    write_at(400, 5);
    agent_ok(&config, &["sync"]);
    let t = tracking();
    assert!(
        t.contains("ebpf: 262144 blocks") || (t.contains("scan: ") && t.contains("too long")),
        "{t}"
    );
    assert_latest_equals_device(dir.path(), &dev, "after a whole-device discard");
    agent_ok(&config, &["sync"]);
    assert!(
        tracking().contains("ebpf: "),
        "tracking did not resume: {}",
        tracking()
    );

    // The device grows: new maps for the new size, and a scan.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len((1 << 30) + (64 << 20))
        .unwrap();
    run(Command::new("losetup").arg("-c").arg(&dev));
    write_at((1 << 10) + 10, 6);
    agent_ok(&config, &["sync"]);
    let t = tracking();
    assert!(t.contains("scan: ") && t.contains("resized"), "{t}");
    assert_latest_equals_device(dir.path(), &dev, "after the device grew");
    agent_ok(&config, &["untrack"]);
}

/// An image tracked through its loop device, then replaced by another file under the same
/// name (a restore, a `qemu-img convert`): the loop device still holds the old file, so the
/// tracker can no longer vouch for the image. The next pass scans and ships the new contents.
#[test]
fn an_image_replaced_under_its_loop_device_is_scanned() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !root_or_skip("an_image_replaced_under_its_loop_device_is_scanned") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, random_bytes(64 << 20, 1)).unwrap();
    let dev = attach_loop(&image);
    let _detach = Detach(dev.clone());
    let config = write_config(dir.path(), &disk("img", "image", &image));
    agent_ok(&config, &["untrack"]);
    agent_ok(&config, &["sync"]);
    // A write through the loop device: tracked.
    let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1 << 20)).unwrap();
    std::io::Write::write_all(&mut f, &random_bytes(1 << 20, 2)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    agent_ok(&config, &["sync"]);
    let status = agent_ok(&config, &["status"]);
    assert!(status.contains("tracking: ebpf"), "{status}");

    // Replaced under the same name; the loop device keeps the old (now unlinked) file.
    let new = dir.path().join("disk.img.new");
    std::fs::write(&new, random_bytes(64 << 20, 3)).unwrap();
    std::fs::rename(&new, &image).unwrap();
    agent_ok(&config, &["sync"]);
    let status = agent_ok(&config, &["status"]);
    assert!(status.contains("tracking: scan: "), "{status}");
    let out = dir.path().join("restored");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&dir.path().join("store"), "g");
    rt.block_on(async {
        let p = reader
            .points()
            .await
            .unwrap()
            .into_iter()
            .max_by_key(|p| p.time)
            .unwrap();
        restore_point(&reader, &p, &out).await;
    });
    assert_same_bytes(&out.join("img"), &image, "the replaced image");
    agent_ok(&config, &["untrack"]);
}
