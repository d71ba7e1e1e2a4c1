//! App-consistent points through pre/post hooks: labels follow what really happened.

use lifeboat_store::manifest::{Consistency, PointKind};

use crate::common::*;

fn setup(pre: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("file"), b"contents").unwrap();
    let marks = dir.path().join("marks");
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = \"{d}\"\nconsistency = \"hooks\"\n\n[disk.hooks]\npre = [{pre:?}]\npost = [\"echo post >> {m}\"]\ntimeout = \"1s\"\n",
            d = data.display(),
            m = marks.display()
        ),
    );
    (dir, config)
}

fn point_of(dir: &std::path::Path, out: &str) -> lifeboat_store::manifest::RecoveryPoint {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(
        reader(&dir.join("store"), "g")
            .point(&lifeboat_store::PointId::new(point_id(out)).unwrap()),
    )
    .unwrap()
}

#[test]
#[cfg_attr(windows, ignore = "hooks run through `sh -c`, which Windows lacks")]
fn successful_hooks_make_an_app_consistent_point() {
    let (dir, config) = setup("echo pre > /dev/null");
    let out = agent_ok(&config, &["snapshot", "--app-consistent"]);
    let p = point_of(dir.path(), &out);
    assert_eq!(p.kind, PointKind::App);
    assert_eq!(p.members[0].consistency, Consistency::App);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("marks")).unwrap(),
        "post\n"
    );
    // Without --app-consistent the hooks do not run and the point says so.
    let out = agent_ok(&config, &["sync"]);
    let p = point_of(dir.path(), &out);
    // Not frozen either (no fsfreeze here): the stored kind says so, as the member does.
    assert_eq!(p.kind, PointKind::NotFrozen);
    assert_eq!(p.members[0].consistency, Consistency::NotFrozen);
    assert!(out.contains("(not-frozen,"), "{out}");
}

#[test]
#[cfg_attr(windows, ignore = "hooks run through `sh -c`, which Windows lacks")]
fn a_failing_or_hanging_pre_hook_never_yields_an_app_label() {
    for pre in ["echo cannot quiesce >&2; exit 3", "sleep 5"] {
        let (dir, config) = setup(pre);
        let out = agent(&config, &["snapshot", "--app-consistent"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let p = point_of(dir.path(), &String::from_utf8_lossy(&out.stdout));
        assert_ne!(p.kind, PointKind::App, "{pre}");
        assert_eq!(p.kind, PointKind::of(p.members[0].consistency), "{pre}");
        assert_ne!(p.members[0].consistency, Consistency::App, "{pre}");
        assert!(
            stderr.contains("pre hook failed"),
            "the downgrade must be logged: {stderr}"
        );
        // Post hooks did not run, because no pre hook of that disk completed.
        assert!(!dir.path().join("marks").exists());
    }
}

/// Regression: a pre hook that left a process behind (`sleep 40 &`, as a hook that starts a
/// lock holder for its post hook to end does) held the cut until that process exited: its
/// output was read to end-of-file after the hook, and the process kept the pipe open. The
/// hook is done when its shell is, and the process it left is not the agent's to end.
#[test]
#[cfg_attr(windows, ignore = "hooks run through `sh -c`, which Windows lacks")]
fn a_hook_that_leaves_a_process_behind_does_not_hold_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("holder.pid");
    let (dir2, config) = setup(&format!(
        "sleep 60 & echo $! > {}; echo lock taken",
        pid_file.display()
    ));
    let started = std::time::Instant::now();
    let out = agent_ok(&config, &["snapshot", "--app-consistent"]);
    let took = started.elapsed();
    let holder = pid_in(&pid_file);
    let alive = std::path::Path::new(&format!("/proc/{holder}")).exists();
    kill(holder);
    // 60 s is the holder's life; the 1 s timeout plus a snapshot is far below it.
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
    assert!(alive, "the process a successful hook left was killed");
    let p = point_of(dir2.path(), &out);
    assert_eq!(p.kind, PointKind::App);
}

/// Regression: a hook printing more than a pipe holds stalled on its write and was killed as
/// "timed out", downgrading the point.
#[test]
#[cfg_attr(windows, ignore = "hooks run through `sh -c`, which Windows lacks")]
fn a_hook_with_a_lot_of_output_succeeds_and_its_log_is_bounded() {
    let (dir, config) = setup("yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx | head -c 300000; echo");
    let out = agent(&config, &["snapshot", "--app-consistent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let p = point_of(dir.path(), &String::from_utf8_lossy(&out.stdout));
    assert_eq!(p.kind, PointKind::App, "{stderr}");
    assert!(stderr.contains("more bytes)"), "{stderr}");
    assert!(stderr.len() < 100_000, "hook output logged unbounded");
}

/// A hook that times out loses every process it started: nothing of a failed cut's
/// preparation (a lock holder, say) outlives it.
#[test]
#[cfg_attr(windows, ignore = "hooks run through `sh -c`, which Windows lacks")]
fn a_hook_that_times_out_is_killed_with_everything_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("child.pid");
    let (_dir2, config) = setup(&format!(
        "sleep 60 & echo $! > {}; sleep 60",
        pid_file.display()
    ));
    let out = agent(&config, &["snapshot", "--app-consistent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timed out"), "{stderr}");
    let child = pid_in(&pid_file);
    // Killed: gone, or a zombie waiting for whoever adopted it to reap it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let dead = loop {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if stat.is_empty() || state == Some("Z") {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if !dead {
        // So that a failing test leaves nothing behind.
        kill(child);
    }
    assert!(dead, "the hook's background process outlived its timeout");
}

/// The process id a hook wrote to `path`.
fn pid_in(path: &std::path::Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// SIGKILLs `pid`, so that a test leaves nothing behind.
fn kill(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}
