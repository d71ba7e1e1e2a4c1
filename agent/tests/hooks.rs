//! App-consistent points through pre/post hooks: labels follow what really happened.

mod common;

use lifeboat_store::manifest::{Consistency, PointKind};

use common::*;

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
