//! Real `fsfreeze` on loop-mounted ext4 and xfs (root only; CI runs as root).
//!
//! - A SQLite database in WAL mode takes fsync'd commits while points are cut: every restored
//!   point must pass `PRAGMA integrity_check`, hold every row acknowledged before the freeze and
//!   no row begun after the thaw.
//! - A capture that cannot finish in time is abandoned and the filesystem is thawed by the
//!   deadline; an agent killed with SIGKILL mid-freeze is thawed by its watchdog process.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// The tests here measure how long writes stall; running them one at a time keeps one test's
/// fsync storm out of another's figures.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const WRITER: &str = r#"
import os, sqlite3, sys, time
db, log, stop = sys.argv[1:4]
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
c.execute("PRAGMA synchronous=FULL")
c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB)")
f = open(log, "a", buffering=1)
i = 0
while not os.path.exists(stop):
    i += 1
    start = time.time_ns()
    c.execute("BEGIN")
    c.execute("INSERT INTO t VALUES(?, randomblob(3000))", (i,))
    c.execute("COMMIT")
    f.write(f"{i} {start} {time.time_ns()}\n")
"#;

const CHECK: &str = r#"
import sqlite3, sys
db, log, frozen_ms, thawed_ms = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = sqlite3.connect(db)
ok = c.execute("PRAGMA integrity_check").fetchone()[0]
assert ok == "ok", ok
ids = {r[0] for r in c.execute("SELECT id FROM t")}
acked = late = 0
for line in open(log):
    i, start, end = map(int, line.split())
    if end < frozen_ms * 1_000_000:
        assert i in ids, f"row {i} acknowledged before the freeze is missing"
        acked += 1
    if start > (thawed_ms + 1) * 1_000_000:
        assert i not in ids, f"row {i} begun after the thaw leaked into the point"
        late += 1
print(f"integrity ok, {len(ids)} rows, {acked} acknowledged before the cut all present, {late} later rows absent")
"#;

fn sqlite_points_are_consistent(fs: &str) {
    let _serial = serial();
    let test = format!("sqlite_wal_points_on_{fs}");
    if !root_or_skip(&test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lfs = LoopFs::new(dir.path(), fs, 320);
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"db\"\nkind = \"directory\"\npath = {:?}\nconsistency = \"fsfreeze\"\nfreeze_timeout = \"5s\"\n",
            lfs.mount.display()
        ),
    );
    let (log, stop) = (dir.path().join("acks.log"), dir.path().join("stop"));
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(WRITER)
        .arg(lfs.mount.join("app.db"))
        .arg(&log)
        .arg(&stop)
        .spawn()
        .unwrap();
    // Cut only once the writer has committed a row: before that the database may not even
    // hold its table yet (python starts slowly on a loaded machine).
    let t0 = Instant::now();
    while std::fs::read_to_string(&log).map_or(true, |l| l.lines().count() < 2) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the writer never committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut cuts = Vec::new();
    for _ in 0..4 {
        let out = agent_ok(&config, &["sync"]);
        let held_ok = out.contains("freeze: held");
        assert!(held_ok, "no freeze reported:\n{out}");
        cuts.push((
            point_id(&out),
            field(&out, "frozen_at_ms").unwrap(),
            field(&out, "thawed_at_ms").unwrap(),
        ));
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::write(&stop, b"").unwrap();
    assert!(writer.wait().unwrap().success(), "writer failed");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&dir.path().join("store"), "g");
    for (i, (id, frozen, thawed)) in cuts.iter().enumerate() {
        assert!(thawed - frozen < 5000, "freeze outlived its deadline");
        let out = dir.path().join(format!("restore-{i}"));
        rt.block_on(async {
            let point = reader
                .point(&lifeboat_store::PointId::new(id.clone()).unwrap())
                .await
                .unwrap();
            assert_eq!(
                point.members[0].consistency,
                lifeboat_store::manifest::Consistency::Crash
            );
            restore_point(&reader, &point, &out).await;
        });
        let check = run(Command::new("python3")
            .arg("-c")
            .arg(CHECK)
            .arg(out.join("db/app.db"))
            .arg(&log)
            .arg(frozen.to_string())
            .arg(thawed.to_string()));
        eprintln!("{fs} point {id}: {}", check.trim());
    }
}

#[test]
fn sqlite_wal_points_on_ext4() {
    sqlite_points_are_consistent("ext4");
}

#[test]
fn sqlite_wal_points_on_xfs() {
    sqlite_points_are_consistent("xfs");
}

/// Writes and fsyncs a small file on `mount` in a loop; records the longest stall.
struct Prober {
    stop: Arc<AtomicBool>,
    max_stall_ms: Arc<AtomicU64>,
    current_since: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(mount: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max_stall_ms = Arc::new(AtomicU64::new(0));
        let current_since = Arc::new(AtomicU64::new(0));
        let path = mount.join("probe");
        let t0 = Instant::now();
        let (s, m, c) = (stop.clone(), max_stall_ms.clone(), current_since.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let began = Instant::now();
                c.store(
                    began.duration_since(t0).as_millis() as u64 + 1,
                    Ordering::Relaxed,
                );
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(b"probe").unwrap();
                f.sync_all().unwrap();
                c.store(0, Ordering::Relaxed);
                m.fetch_max(began.elapsed().as_millis() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        // Milliseconds since `t0` at which the write in progress began (0: none in progress).
        let _ = t0;
        Prober {
            stop,
            max_stall_ms,
            current_since,
            handle: Some(handle),
        }
    }

    fn stalled_for(&self, t0_elapsed_ms: u64) -> u64 {
        match self.current_since.load(Ordering::Relaxed) {
            0 => 0,
            since => t0_elapsed_ms.saturating_sub(since - 1),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        self.max_stall_ms.load(Ordering::Relaxed)
    }
}

#[test]
fn a_capture_past_its_deadline_is_abandoned_and_thawed_in_time() {
    let _serial = serial();
    if !root_or_skip("a_capture_past_its_deadline_is_abandoned_and_thawed_in_time") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A big image holding the frozen filesystem, scanned (not tracked): re-scanning it while
    // frozen takes far longer than 150ms.
    let lfs = LoopFs::new(dir.path(), "ext4", 3072);
    let image = lfs.image.clone();
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"big\"\nkind = \"image\"\npath = {:?}\nconsistency = \"fsfreeze\"\nmount = {:?}\nfreeze_timeout = \"150ms\"\ntracking = \"scan\"\n",
            image.display(),
            lfs.mount.display()
        ),
    );
    let prober = Prober::start(&lfs.mount);
    let out = agent(&config, &["sync"]);
    let max_stall = prober.finish();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a cut past its deadline was published"
    );
    assert!(stderr.contains("freeze deadline"), "{stderr}");
    assert!(
        max_stall < 150 + 250,
        "writes stalled {max_stall}ms with a 150ms freeze deadline"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let points = rt
        .block_on(reader(&dir.path().join("store"), "g").points())
        .unwrap();
    assert!(points.is_empty(), "abandoned cut published a point");
}

/// A 6 GiB sparse image holding a filesystem whose capture outlasts a 1.5 s freeze deadline, an
/// agent cutting it, and the moment the filesystem is seen frozen (a probe write blocked for
/// 100 ms). Calls `stop` on the agent then, and returns the longest write stall seen.
fn stop_agent_mid_freeze(
    dir: &Path,
    stop: impl FnOnce(&mut std::process::Child),
) -> (LoopFs, std::path::PathBuf, u64) {
    let lfs = LoopFs::new(dir, "ext4", 6144);
    let image = lfs.image.clone();
    let config = write_config(
        dir,
        &format!(
            "[[disk]]\nid = \"big\"\nkind = \"image\"\npath = {:?}\nconsistency = \"fsfreeze\"\nmount = {:?}\nfreeze_timeout = \"1500ms\"\ntracking = \"scan\"\n",
            image.display(),
            lfs.mount.display()
        ),
    );
    let prober = Prober::start(&lfs.mount);
    let t0 = Instant::now();
    let mut child = spawn_agent(&config, &["sync"]);
    let mut stop = Some(stop);
    while t0.elapsed() < Duration::from_secs(120) && child.try_wait().unwrap().is_none() {
        if prober.stalled_for(t0.elapsed().as_millis() as u64) > 100 {
            (stop.take().unwrap())(&mut child);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    let max_stall = prober.finish();
    assert!(stop.is_none(), "never saw the filesystem frozen");
    (lfs, config, max_stall)
}

#[test]
fn an_agent_killed_while_frozen_is_thawed_by_its_watchdog() {
    let _serial = serial();
    if !root_or_skip("an_agent_killed_while_frozen_is_thawed_by_its_watchdog") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_lfs, config, max_stall) =
        stop_agent_mid_freeze(dir.path(), |child| child.kill().unwrap()); // SIGKILL
    assert!(
        max_stall < 1500 + 500,
        "filesystem stayed frozen {max_stall}ms after the agent died; deadline 1500ms"
    );
    // The next run cleans up after the killed one and cuts normally (with a longer deadline).
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("1500ms", "20s");
    std::fs::write(&config, text).unwrap();
    let out = agent_ok(&config, &["sync"]);
    assert!(out.contains("published recovery point"), "{out}");
}

#[test]
fn sigterm_mid_freeze_and_the_thaw_command_never_leave_a_filesystem_frozen() {
    let _serial = serial();
    if !root_or_skip("sigterm_mid_freeze_and_the_thaw_command_never_leave_a_filesystem_frozen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // SIGTERM while frozen: the agent ends the cut (here: its deadline) and exits; writes resume.
    let (lfs, config, max_stall) = stop_agent_mid_freeze(dir.path(), |child| {
        run(Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()));
    });
    assert!(
        max_stall < 1500 + 500,
        "writes stalled {max_stall}ms after SIGTERM"
    );

    // `thaw` (the unit's ExecStopPost) thaws a filesystem left frozen by anyone.
    run(Command::new("fsfreeze").arg("-f").arg(&lfs.mount));
    agent_ok(&config, &["thaw"]);
    let probe = Prober::start(&lfs.mount);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        probe.finish() < 200,
        "still frozen after `lifeboat-agent thaw`"
    );
}

/// Starts `lifeboat-agent thaw-watchdog <mount>` armed with `deadline_ms`, as a killed agent's
/// watchdog would be; its stdin (the agent's end of the lifeline) is returned held open.
fn watchdog(mount: &Path, deadline_ms: u64) -> (std::process::Child, std::process::ChildStdin) {
    let mut child = Command::new(AGENT)
        .arg("thaw-watchdog")
        .arg(mount)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{deadline_ms}").unwrap();
    stdin.flush().unwrap();
    (child, stdin)
}

/// Found by the block-device oracle tests under load: a watchdog that outlived its SIGKILLed
/// agent slept on to its deadline and then thawed the *next* run's freeze mid-capture, and
/// that point was labelled crash-consistent. A watchdog now thaws at once when its agent dies,
/// and an agent ends any orphaned watchdog of its mounts before it freezes.
#[test]
fn a_watchdog_never_thaws_a_freeze_that_is_not_its_own() {
    let _serial = serial();
    if !root_or_skip("a_watchdog_never_thaws_a_freeze_that_is_not_its_own") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lfs = LoopFs::new(dir.path(), "ext4", 64);
    let writable = |mount: &Path| {
        Command::new("timeout")
            .arg("1")
            .arg("sh")
            .arg("-c")
            .arg(format!("echo x > {}/probe", mount.display()))
            .status()
            .unwrap()
            .success()
    };

    // The agent's end of the lifeline closes (it died): the watchdog thaws now, not in 60 s.
    let (mut early, lifeline) = watchdog(&lfs.mount, 60_000);
    run(Command::new("fsfreeze").arg("-f").arg(&lfs.mount));
    drop(lifeline);
    let t0 = Instant::now();
    while !writable(&lfs.mount) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "still frozen 20 s after the watchdog's agent died"
        );
    }
    early.wait().unwrap();

    // An orphaned watchdog (its agent gone, the lifeline held by someone else) armed to fire
    // in 2.5 s, while the next run holds its own freeze for 4 s and checks it is still frozen.
    let (mut orphan, _held) = watchdog(&lfs.mount, 2_500);
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"vol\"\nkind = \"image\"\npath = {:?}\nconsistency = \"fsfreeze\"\nmount = {:?}\nfreeze_timeout = \"20s\"\n",
            lfs.image.display(),
            lfs.mount.display()
        ),
    );
    // Still frozen after 4 s: FIFREEZE on a frozen filesystem fails with EBUSY (a probe write
    // would block uninterruptibly instead). Had it been thawed, undo the test's own freeze.
    let still_frozen = format!(
        "sleep 4; if fsfreeze -f {m} 2>/dev/null; then fsfreeze -u {m}; exit 1; fi",
        m = lfs.mount.display()
    );
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(&config)
        .arg("sync")
        .env("LIFEBOAT_TEST_WHILE_FROZEN", still_frozen)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the freeze was thawed under the agent:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = orphan.try_wait().unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the orphaned watchdog was left running: {status:?}"
    );
}
