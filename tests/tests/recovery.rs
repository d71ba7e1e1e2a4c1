//! Recovery from the target store: processing (cache → target, restartable, never publishing
//! twice), failover and DR drills from the target store alone, corruption, and bad requests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lifeboat_tests::{
    CoordinatorProc, KillOnDrop, assert_same_tree, bin, copy_tree, random_bytes, set_point_time,
};

/// `lifeboat ARGS` with `--flag path` pairs.
fn command(args: &[&str], paths: &[(&str, &Path)]) -> Command {
    let mut cmd = Command::new(bin("lifeboat"));
    cmd.args(args);
    for (flag, p) in paths {
        cmd.arg(flag).arg(p);
    }
    cmd
}

fn lifeboat(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    command(args, paths).output().unwrap()
}

/// Runs `lifeboat` and SIGKILLs it after `ms` milliseconds, wherever it is.
fn killed_after(args: &[&str], paths: &[(&str, &Path)], ms: u64) {
    let mut child = command(args, paths).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    let _ = child.kill();
    let _ = child.wait();
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A single VM with an image and a directory, synced three times with changes between; returns
/// the point ids and copies of the disks at each.
struct Vm {
    dir: PathBuf,
    cache: PathBuf,
    points: Vec<String>,
    copies: Vec<PathBuf>,
}

impl Vm {
    fn new(dir: &Path) -> Self {
        let mut vm = Vm::setup(dir);
        for round in 0..3u64 {
            if round > 0 {
                vm.change(round, round * 700_000, 200_000);
            }
            vm.sync(round);
        }
        vm
    }

    fn setup(dir: &Path) -> Self {
        Vm::setup_with_cache(dir, &dir.join("cache"))
    }

    /// [`Vm::setup`] replicating into the local store at `cache`.
    fn setup_with_cache(dir: &Path, cache: &Path) -> Self {
        let cache = cache.to_path_buf();
        std::fs::create_dir_all(&cache).unwrap();
        let data = dir.join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, random_bytes(3 << 20, 1)).unwrap();
        std::fs::write(data.join("a.txt"), "first").unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "vm = \"vm1\"\ngroup = \"g1\"\nstate_dir = {:?}\n[store]\nkind = \"local\"\npath = {:?}\n[[disk]]\nid = \"os\"\nkind = \"image\"\npath = {:?}\n[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {:?}\n",
                dir.join("state").display(),
                cache.display(),
                image.display(),
                data.display()
            ),
        )
        .unwrap();
        Vm {
            dir: dir.into(),
            cache,
            points: vec![],
            copies: vec![],
        }
    }

    /// Rewrites `len` bytes of the image at `at` and adds a file.
    fn change(&self, round: u64, at: u64, len: usize) {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("disk.img"))
            .unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&random_bytes(len, round + 10)).unwrap();
        let data = self.dir.join("data");
        std::fs::write(
            data.join("sub").join(format!("r{round}")),
            format!("round {round}"),
        )
        .unwrap();
    }

    /// Syncs (a point) and keeps a copy of the disks as they are.
    /// Segments of 256 KiB: the 3 MiB image is a dozen of them, past the compaction threshold.
    fn small_segments(&self) {
        let config = self.dir.join("agent.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("[replication]\nsegment_size = \"256KiB\"\n");
        std::fs::write(&config, text).unwrap();
    }

    /// Syncs (a point), keeps a copy of the disks as they are, and returns the agent's log.
    fn sync(&mut self, round: u64) -> String {
        let out = self.run_sync();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let id = ok(out)
            .lines()
            .find_map(|l| l.strip_prefix("published recovery point "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string();
        let copy = self.dir.join(format!("copy-{round}"));
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::copy(self.dir.join("disk.img"), copy.join("os.img")).unwrap();
        copy_tree(&self.dir.join("data"), &copy.join("data"));
        self.points.push(id);
        self.copies.push(copy);
        log
    }

    /// `lifeboat-agent sync` with this VM's config.
    fn run_sync(&self) -> Output {
        Command::new(bin("lifeboat-agent"))
            .arg("--config")
            .arg(self.dir.join("agent.toml"))
            .arg("sync")
            .output()
            .unwrap()
    }

    /// A sync that must fail; returns its log.
    fn sync_fails(&self) -> String {
        let out = self.run_sync();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the sync succeeded:\n{log}");
        log
    }

    /// Asserts that `out` (a failover output) holds the disks as they were at point `i`.
    fn assert_restored(&self, i: usize, out: &Path) {
        assert_eq!(
            std::fs::read(self.copies[i].join("os.img")).unwrap(),
            std::fs::read(out.join("vm1/os.img")).unwrap(),
            "image at point {i}"
        );
        assert_same_tree(&self.copies[i].join("data"), &out.join("vm1/data"));
    }

    /// Fails point `i` over from `target` into `out` and asserts it is the disks at point `i`.
    fn assert_fails_over(&self, target: &Path, i: usize, out: &Path) {
        ok(failover(
            target,
            &["--vm", "vm1", "--point", &self.points[i]],
            out,
        ));
        self.assert_restored(i, out);
    }

    fn target(&self) -> PathBuf {
        let t = self.dir.join("target");
        std::fs::create_dir_all(&t).unwrap();
        t
    }

    fn process(&self) -> String {
        ok(lifeboat(
            &["process", "--group", "g1"],
            &[("--cache", &self.cache), ("--store", &self.target())],
        ))
    }
}

fn failover(target: &Path, extra: &[&str], to: &Path) -> Output {
    let mut args = vec!["failover", "--group", "g1"];
    args.extend_from_slice(extra);
    lifeboat(&args, &[("--store", target), ("--to", to)])
}

#[test]
fn processed_points_fail_over_from_the_target_alone() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(dir.path());
    let target = vm.target();

    // A pass killed at an arbitrary moment, then complete passes: every point once.
    killed_after(
        &["process", "--group", "g1"],
        &[("--cache", &vm.cache), ("--store", &target)],
        30,
    );
    let first = vm.process();
    assert!(first.contains("latest processed point: "), "{first}");
    assert!(first.contains("RPO vm1: "), "{first}");
    let again = vm.process();
    assert!(
        again.starts_with("processed 0 point(s)"),
        "published twice? {again}"
    );
    let listing = ok(lifeboat(
        &["points", "list", "--group", "g1"],
        &[("--store", &vm.cache), ("--target", &target)],
    ));
    assert_eq!(listing.matches("processed  ").count(), 3, "{listing}");

    // The source region is gone.
    std::fs::remove_dir_all(&vm.cache).unwrap();

    for (i, id) in vm.points.iter().enumerate() {
        let out = dir.path().join(format!("failover-{i}"));
        vm.assert_fails_over(&target, i, &out);
        let report = std::fs::read_to_string(out.join("failover-report.json")).unwrap();
        assert!(report.contains(&format!("\"point\": \"{id}\"")), "{report}");
    }
    let out = dir.path().join("failover-latest");
    let text = ok(failover(&target, &["--point", "latest-processed"], &out));
    assert!(text.contains(&vm.points[2]), "{text}");
    vm.assert_restored(2, &out);

    // A time between points picks the newest point at or before it.
    let out = dir.path().join("failover-time");
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let text = ok(failover(&target, &["--vm", "vm1", "--point", &now], &out));
    assert!(text.contains(&vm.points[2]), "{text}");

    // Commit a real failover; never twice.
    ok(lifeboat(&["failover", "commit"], &[("--to", &out)]));
    let again = lifeboat(&["failover", "commit"], &[("--to", &out)]);
    assert_eq!(again.status.code(), Some(2));
}

#[test]
fn bad_failover_requests_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(dir.path());
    let target = vm.target();
    vm.process();
    let out = dir.path().join("out");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--vm", "vm1", "--point", "vm1-1-t99"],
            "no recovery point vm1-1-t99",
        ),
        (
            &["--vm", "vm1", "--point", "2001-01-01T00:00:00Z"],
            "is before the oldest point",
        ),
        (
            &["--vm", "vm9", "--point", "latest"],
            "VM vm9 is not in group g1",
        ),
        (&["--vm", "vm1", "--point", "../x"], "not a point id"),
        (
            &["--vm", "vm1", "--point", "latest-multi-vm"],
            "no multi-VM point covers vm1",
        ),
        (
            &["--vm", "vm1", "--point", "latest-app-consistent"],
            "no app-consistent point",
        ),
    ];
    for (args, want) in cases {
        let o = failover(&target, args, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // An unknown group.
    let o = lifeboat(
        &["failover", "--group", "nope", "--point", "latest"],
        &[("--store", &target), ("--to", &out)],
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists());
    // An occupied location is left exactly as it was.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("precious"), "keep").unwrap();
    let o = failover(&target, &["--point", "latest"], &out);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not empty"));
    assert_eq!(
        std::fs::read_to_string(out.join("precious")).unwrap(),
        "keep"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    // Cleanup refuses what is not a drill.
    let o = lifeboat(&["test-failover", "cleanup"], &[("--to", &out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(out.join("precious").exists());
}

#[test]
fn a_corrupt_target_object_is_named_and_spares_points_that_do_not_need_it() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(dir.path());
    let target = vm.target();
    vm.process();
    // The newest segment of the image disk is needed by the latest point only.
    let segs = target.join("v1/g1/vms/vm1/disks/os/seg");
    let mut names: Vec<_> = std::fs::read_dir(&segs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let victim = names.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();

    let out = dir.path().join("latest");
    let o = failover(&target, &["--vm", "vm1", "--point", &vm.points[2]], &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let seg_name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        err.contains(&seg_name),
        "error does not name {seg_name}: {err}"
    );
    assert!(!out.exists(), "a failed failover leaves nothing behind");

    let out = dir.path().join("first");
    vm.assert_fails_over(&target, 0, &out);
}

#[test]
#[cfg_attr(windows, ignore = "hooks run through `sh -c`, which Windows lacks")]
fn a_group_drill_from_the_target_store_with_the_source_region_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = CoordinatorProc::init(
        dir.path(),
        "g1",
        "127.0.0.1:0",
        "processing_interval = \"1s\"\n[target]\nkind = \"local\"\npath = \"TARGET\"\n",
    );
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let text = std::fs::read_to_string(&c.config)
        .unwrap()
        .replace("\"TARGET\"", &format!("{target:?}"));
    std::fs::write(&c.config, text).unwrap();
    c.start();
    let mut agents = Vec::new();
    for vm in ["web", "db"] {
        let data = dir.path().join(vm);
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("f"), format!("{vm} data")).unwrap();
        let config = dir.path().join(format!("{vm}.toml"));
        std::fs::write(
            &config,
            format!(
                "vm = \"{vm}\"\ngroup = \"g1\"\nstate_dir = {:?}\n[store]\nkind = \"local\"\npath = {:?}\n[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {:?}\nconsistency = \"hooks\"\n[disk.hooks]\npre = [\"true\"]\npost = [\"true\"]\n",
                dir.path().join(format!("{vm}-state")).display(),
                c.store.display(),
                data.display()
            ),
        )
        .unwrap();
        let token = c.token(Some(vm), "10m");
        ok(Command::new(bin("lifeboat-agent"))
            .arg("--config")
            .arg(&config)
            .args(["enroll", "--coordinator", &c.addr, "--token", &token])
            .output()
            .unwrap());
        agents.push(KillOnDrop(
            Command::new(bin("lifeboat-agent"))
                .arg("--config")
                .arg(&config)
                .arg("run")
                .stderr(std::fs::File::create(dir.path().join(format!("{vm}.log"))).unwrap())
                .spawn()
                .unwrap(),
        ));
    }
    // Both members covered, crash then app.
    let deadline = Instant::now() + Duration::from_secs(60);
    let app = loop {
        let (id, stderr) = c.snapshot("g1", true);
        if stderr.contains("covering db, web") && stderr.contains("app-consistent") {
            break id;
        }
        assert!(Instant::now() < deadline, "{stderr}");
        std::thread::sleep(Duration::from_millis(500));
    };
    // Processing publishes it in the target.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !target.join(format!("v1/g1/points/{app}.point")).exists() {
        assert!(
            Instant::now() < deadline,
            "not processed:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        c.log_text()
            .contains("processed points into the target store")
    );
    // The two figures an operator watches: RPO per member, the latest processed point.
    let deadline = Instant::now() + Duration::from_secs(30);
    let members = loop {
        let o = c.admin(&["members"]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{text}");
        // RPO appears with the first heartbeat after a member's first tag.
        if !text.contains("latest processed point: none yet") && text.matches("RPO ").count() == 2 {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(members.contains("latest processed point: c"), "{members}");
    assert!(members.contains("; last pass "), "{members}");
    assert!(!members.contains("processing failing"), "{members}");
    // Lose the source region: coordinator, agents, cache store.
    c.kill();
    drop(agents);
    std::fs::remove_dir_all(&c.store).unwrap();

    let drill = dir.path().join("drill");
    let out = ok(lifeboat(
        &[
            "test-failover",
            "--group",
            "g1",
            "--point",
            "latest-multi-vm-app-consistent",
        ],
        &[("--store", &target), ("--to", &drill)],
    ));
    assert!(out.contains(&app), "{out}");
    assert!(out.contains("app-consistent multi-VM"), "{out}");
    for vm in ["web", "db"] {
        assert_eq!(
            std::fs::read_to_string(drill.join(vm).join("data/f")).unwrap(),
            format!("{vm} data")
        );
    }
    let report = std::fs::read_to_string(drill.join("failover-report.json")).unwrap();
    assert!(report.contains("\"kind\": \"test-failover\""), "{report}");
    // A drill is cleaned up, not committed.
    assert_eq!(
        lifeboat(&["failover", "commit"], &[("--to", &drill)])
            .status
            .code(),
        Some(2)
    );
    ok(lifeboat(&["test-failover", "cleanup"], &[("--to", &drill)]));
    assert!(!drill.exists());
}

#[test]
fn retention_keeps_points_while_none_are_new_and_never_resurrects_pruned_ones() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(dir.path());
    let target = vm.target();
    vm.process();
    // Points 3 h and 30 min older than the newest, in both stores: the cache (not trimmed
    // here) must hold the same points as the target, or processing refuses them as others.
    let newest = point_time(&target, &vm.points[2]);
    for store in [&target, &vm.cache] {
        set_point_time(store, "g1", &vm.points[0], newest - 3 * 3_600_000);
        set_point_time(store, "g1", &vm.points[1], newest - 1_800_000);
    }
    let prune = |retention: &str, now: &str| {
        lifeboat(
            &[
                "prune",
                "--group",
                "g1",
                "--retention",
                retention,
                "--now",
                now,
            ],
            &[("--store", &target)],
        )
    };
    let o = prune("30m", "2030-01-01T00:00:00Z");
    assert_eq!(o.status.code(), Some(2), "retention below 1h is refused");
    // Two hours after the newest point, with none since (replication broken), a 1 h retention
    // keeps what lies within an hour of the newest — the 30-min-older point outlives its
    // retention, nothing newer replaces it — and expires the older one.
    let later =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(7200))
            .to_string();
    let out = ok(prune("1h", &later));
    assert!(
        out.starts_with("kept 2 point(s); deleted 1 expired point(s)"),
        "{out}"
    );
    assert!(!out.contains(" 0 tag(s)"), "expired tags deleted: {out}");
    let again = ok(prune("1h", &later));
    assert!(
        again.contains("deleted 0 expired point(s), 0 tag(s), 0 tree(s), 0 segment(s), 0 base(s)"),
        "{again}"
    );
    // Processing again does not bring the pruned points back.
    let pass = vm.process();
    assert!(pass.starts_with("processed 0 point(s)"), "{pass}");
    // The kept point restores exactly; the pruned ones are gone with a clear error.
    let o = failover(
        &target,
        &["--vm", "vm1", "--point", &vm.points[0]],
        &dir.path().join("x"),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no recovery point"));
    for i in [1, 2] {
        let out = dir.path().join(format!("kept-{i}"));
        vm.assert_fails_over(&target, i, &out);
    }
}

fn point_time(target: &Path, id: &str) -> u64 {
    let name = format!("v1/g1/points/{id}.point");
    let data = std::fs::read(target.join(&name)).unwrap();
    lifeboat_store::manifest::RecoveryPoint::decode(&name, &data)
        .unwrap()
        .time
}

/// The bytes of the files under `dir` (what `du -sb` counts, less the directories themselves).
fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                size_of(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

#[test]
fn steady_churn_under_retention_stays_bounded_and_every_kept_point_restores() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::setup(dir.path());
    let target = vm.target();
    let mut sizes = Vec::new();
    // A point every 20 minutes, ending 20 minutes ago: with 1 h retention the last four are kept.
    let start = lifeboat_store::manifest::now_millis() - 15 * 1_200_000;
    for round in 0..14u64 {
        if round > 0 {
            // Half the image rewritten each round: history grows 1.5 MiB a round.
            vm.change(round, (round % 2) * (1 << 20), 3 << 19);
        }
        vm.sync(round);
        set_point_time(
            &vm.cache,
            "g1",
            &vm.points[round as usize],
            start + round * 1_200_000,
        );
        vm.process();
        if round >= 3 {
            let args = ["prune", "--group", "g1", "--retention", "1h"];
            if round == 9 {
                // Killed mid-prune: the next prune finishes the job, nothing kept is lost.
                killed_after(&args, &[("--store", &target)], 15);
            }
            let out = ok(lifeboat(&args, &[("--store", &target)]));
            assert!(out.starts_with("kept 4 point(s)"), "round {round}: {out}");
            sizes.push(size_of(&target.join("v1")));
        }
    }
    eprintln!("target store bytes after each prune: {sizes:?}");
    // Bounded: the last rounds take no more room than the early ones plus a base's worth.
    let (early, late) = (sizes[2], *sizes.last().unwrap());
    assert!(
        late <= early + (4 << 20),
        "target grew from {early} to {late} bytes: {sizes:?}"
    );
    // Without pruning the history alone would be > 3 + 13 × 1.5 MiB.
    assert!(late < 16 << 20, "{late} bytes: {sizes:?}");
    let bases = target.join("v1/g1/vms/vm1/disks/os/base");
    assert!(
        std::fs::read_dir(&bases).unwrap().count() >= 1,
        "no base written"
    );
    let segs = std::fs::read_dir(target.join("v1/g1/vms/vm1/disks/os/seg"))
        .unwrap()
        .count();
    assert!(segs <= 8, "{segs} image segments kept");
    // Every kept point restores exactly, though its early segments are gone.
    for i in 10..14 {
        let out = dir.path().join(format!("kept-{i}"));
        vm.assert_fails_over(&target, i, &out);
    }
}

#[test]
fn processed_data_leaves_the_cache_and_the_agent_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(dir.path());
    let target = vm.target();
    let cache_before = size_of(&vm.cache);
    let trim = |vm: &Vm| {
        ok(lifeboat(
            &["process", "--group", "g1", "--trim-cache"],
            &[("--cache", &vm.cache), ("--store", &target)],
        ))
    };
    let out = trim(&vm);
    assert!(
        out.contains("removed from the cache store: 3 point(s)"),
        "{out}"
    );
    assert!(size_of(&vm.cache) < cache_before, "nothing left the cache");
    // Each disk keeps its newest tag (where numbering continues).
    for disk in ["os", "data"] {
        let tags = std::fs::read_dir(vm.cache.join(format!("v1/g1/vms/vm1/disks/{disk}/tag")))
            .unwrap()
            .count();
        assert_eq!(tags, 1, "{disk}");
    }
    // The agent keeps replicating over the trimmed cache; new points process and fail over.
    for round in 3..5u64 {
        vm.change(round, round * 300_000, 100_000);
        vm.sync(round);
    }
    trim(&vm);
    for i in [0usize, 2, 4] {
        let out = dir.path().join(format!("after-trim-{i}"));
        vm.assert_fails_over(&target, i, &out);
    }
    // An agent that lost its state asks processing for a tag to resynchronise over rather than
    // send the whole disk (its segments left the cache): the sync fails saying so, the next
    // pass offers the newest tag the target holds, and the next sync sends only what differs,
    // in a history numbered after everything the target holds (a reused number would make
    // processing fail). That copy fails over too.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    vm.change(5, 0, 100_000);
    let waits = vm.sync_fails();
    assert!(
        waits.contains("waits for processing to offer a tag"),
        "{waits}"
    );
    let out = lifeboat(
        &["process", "--group", "g1", "--trim-cache"],
        &[("--cache", &vm.cache), ("--store", &target)],
    );
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success()
            && said.contains("asked vm1/os for a new history over tag")
            && said.contains("asked vm1/data for a new history over tag"),
        "{said}"
    );
    let log = vm.sync(5);
    assert!(
        log.contains("disk=os")
            && log
                .matches("checksum compare with the tag processing offered")
                .count()
                == 2,
        "{log}"
    );
    trim(&vm);
    let out = dir.path().join("after-reset");
    vm.assert_fails_over(&target, 5, &out);
}

/// Azurite's endpoint when `scripts/test.sh` started one; `None` (the test skips) outside it.
fn azurite(test: &str) -> Option<String> {
    match std::env::var("LIFEBOAT_AZURITE") {
        Ok(endpoint) => Some(endpoint),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none()
                    && std::env::var_os("LIFEBOAT_REQUIRE_AZURITE").is_none(),
                "LIFEBOAT_AZURITE is not set: run the tests through scripts/test.sh"
            );
            eprintln!("SKIPPED {test}: no Azurite (scripts/test.sh starts one)");
            None
        }
    }
}

/// A store the test looks into while the coordinator works on it.
struct Peek {
    rt: tokio::runtime::Runtime,
    backend: lifeboat_store::DynBackend,
}

impl Peek {
    fn azure(endpoint: &str, container: &str) -> Self {
        use lifeboat_store::backend::azure::{AzureBackend, AzureConfig};
        let rt = tokio::runtime::Runtime::new().unwrap();
        let backend = rt
            .block_on(AzureBackend::open(&AzureConfig::azurite(
                endpoint, container,
            )))
            .unwrap();
        Peek {
            rt,
            backend: std::sync::Arc::new(backend),
        }
    }

    /// Object names under `prefix`, sorted.
    fn names(&self, prefix: &str) -> Vec<String> {
        let prefix = lifeboat_store::ObjectName::new(prefix).unwrap();
        let mut names: Vec<String> = self
            .rt
            .block_on(self.backend.list(&prefix))
            .unwrap()
            .into_iter()
            .map(|m| m.name.as_str().to_string())
            .collect();
        names.sort();
        names
    }

    /// The ids of the published points.
    fn points(&self) -> std::collections::BTreeSet<String> {
        self.names("v1/g1/points")
            .iter()
            .filter_map(|n| n.strip_prefix("v1/g1/points/")?.strip_suffix(".point"))
            .map(str::to_string)
            .collect()
    }

    fn point(&self, id: &str) -> lifeboat_store::manifest::RecoveryPoint {
        let name = format!("v1/g1/points/{id}.point");
        let data = self
            .rt
            .block_on(
                self.backend
                    .get(&lifeboat_store::ObjectName::new(name.clone()).unwrap()),
            )
            .unwrap();
        lifeboat_store::manifest::RecoveryPoint::decode(&name, &data).unwrap()
    }
}

/// Polls `done` every few milliseconds for up to a minute.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn killing_the_coordinator_while_it_processes_and_prunes_loses_and_duplicates_nothing() {
    const TEST: &str =
        "killing_the_coordinator_while_it_processes_and_prunes_loses_and_duplicates_nothing";
    let Some(endpoint) = azurite(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The DR region is Azure Blob: its latency is what makes a pass long enough to interrupt.
    let container = format!("kills{}", std::process::id());
    let target_desc = format!(
        "kind = \"azure\"\naccount = \"devstoreaccount1\"\ncontainer = \"{container}\"\nendpoint = \"{endpoint}\"\ncredential = {{ kind = \"shared_key\", key = {:?} }}\n",
        lifeboat_store::backend::azure::EMULATOR_KEY
    );
    let target_toml = dir.path().join("target.toml");
    std::fs::write(&target_toml, &target_desc).unwrap();
    let mut coordinator = CoordinatorProc::init(
        &dir.path().join("c"),
        "g1",
        "127.0.0.1:0",
        &format!("processing_interval = \"1s\"\n[target]\n{target_desc}"),
    );

    // Sixteen points, two hours and a minute apart (times rewritten in the cache before the
    // coordinator ever sees them), the newest a minute old: with the default 24 h retention the
    // oldest four expire, and the oldest kept point has enough segments behind it to be
    // compacted.
    let mut vm = Vm::setup_with_cache(&dir.path().join("vm"), &coordinator.store);
    for round in 0..16u64 {
        if round > 0 {
            vm.change(round, (round * 170_000) % (2 << 20), 256 << 10);
        }
        vm.sync(round);
    }
    let now = lifeboat_store::manifest::now_millis();
    for (i, id) in vm.points.iter().enumerate() {
        set_point_time(
            &vm.cache,
            "g1",
            id,
            now - 60_000 - (15 - i as u64) * 7_260_000,
        );
    }
    let kept: std::collections::BTreeSet<String> = vm.points[4..].iter().cloned().collect();
    let expired: Vec<String> = vm.points[..4].to_vec();
    let peek = Peek::azure(&endpoint, &container);

    // Killed three times while it processes: each time once the target holds more objects
    // than at the previous kill, before every point is in.
    let mut mid_processing = 0;
    for _ in 0..3 {
        let before = peek.names("v1/g1").len();
        coordinator.start();
        wait_for("the target store to grow", || {
            peek.names("v1/g1").len() >= before + 12
        });
        coordinator.kill();
        let points = peek.points();
        if !kept.is_subset(&points) {
            mid_processing += 1;
        }
    }
    assert!(
        mid_processing >= 2,
        "only {mid_processing} of 3 kills landed while points were still being processed"
    );

    // Killed once pruning has begun: every point is in and an expired one is already gone.
    coordinator.start();
    wait_for("pruning to begin", || {
        let points = peek.points();
        kept.is_subset(&points) && expired.iter().any(|e| !points.contains(e))
    });
    coordinator.kill();
    let at_kill = peek.names("v1/g1");

    // What a compaction killed between its parts and its manifest leaves, at a tag no kept
    // point will ever compact at again.
    let orphan = "v1/g1/vms/vm1/disks/os/base/00000000000000000002/000001.seg";
    peek.rt
        .block_on(peek.backend.put_new(
            &lifeboat_store::ObjectName::new(orphan).unwrap(),
            bytes::Bytes::from_static(b"half a compaction"),
        ))
        .unwrap();

    // Restarted, it finishes: the expired points are gone, the store settles.
    coordinator.start();
    wait_for("the expired points to be pruned", || peek.points() == kept);
    let mut settled = peek.names("v1/g1");
    loop {
        std::thread::sleep(Duration::from_millis(2500));
        let now = peek.names("v1/g1");
        if now == settled {
            break;
        }
        settled = now;
    }
    coordinator.kill();
    let left: Vec<&String> = at_kill.iter().filter(|n| !settled.contains(n)).collect();
    let added: Vec<&String> = settled.iter().filter(|n| !at_kill.contains(n)).collect();
    eprintln!(
        "{mid_processing} kills while processing; at the kill while pruning, {} object(s) still to delete and {} to write: {left:?} {added:?}",
        left.len(),
        added.len()
    );
    assert_ne!(
        at_kill, settled,
        "the kill did not land while pruning: nothing was left for the restart to do"
    );
    let log = coordinator.log_text();
    for bad in [
        "processing failed",
        "pruning failed",
        "trimming the cache store failed",
    ] {
        assert!(!log.contains(bad), "{bad}:\n{log}");
    }

    // Nothing kept lost, nothing expired left behind: exactly the tags the kept points name,
    // and no base part without its manifest.
    let mut named: std::collections::BTreeSet<String> = Default::default();
    for id in &kept {
        for m in peek.point(id).members {
            for d in m.disks {
                named.insert(format!(
                    "v1/g1/vms/{}/disks/{}/tag/{:020}.tag",
                    m.vm, d.disk, d.tag
                ));
            }
        }
    }
    let tags: Vec<&String> = settled.iter().filter(|n| n.contains("/tag/")).collect();
    for t in &tags {
        assert!(named.contains(*t), "tag {t} outlived every point naming it");
    }
    assert_eq!(tags.len(), kept.len() * 2, "{tags:?}");
    assert!(!settled.iter().any(|n| n == orphan), "{orphan} left behind");
    let manifests: Vec<&String> = settled.iter().filter(|n| n.ends_with(".base")).collect();
    assert!(!manifests.is_empty(), "no compaction happened");
    for part in settled
        .iter()
        .filter(|n| n.contains("/base/") && n.ends_with(".seg"))
    {
        let (dir, _) = part.rsplit_once('/').unwrap();
        assert!(
            settled.contains(&format!("{dir}.base")),
            "base part {part} without a manifest was left behind"
        );
    }

    // The source region is gone; every kept point fails over from the target alone, exactly.
    std::fs::remove_dir_all(&vm.cache).unwrap();
    for i in 4..vm.points.len() {
        let out = dir.path().join(format!("failover-{i}"));
        vm.assert_fails_over(&target_toml, i, &out);
    }
}

/// The jam after compaction, with the real agent and CLI: a disk of many segments, and sync, process
/// with a cache trim, prune, round after round (as a user's script would). The first prune
/// compacts the image into a base; processing used to copy the segments it stands for again
/// every round, the trim removed them from the cache and the prune from the target, and the
/// third round failed on a segment gone from both.
#[test]
fn sync_process_trim_and_prune_round_after_round_never_jam() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::setup(dir.path());
    vm.small_segments();
    let target = vm.target();
    for round in 0..4u64 {
        if round > 0 {
            vm.change(round, round * 300_000, 100_000);
        }
        vm.sync(round);
        let out = ok(lifeboat(
            &["process", "--group", "g1", "--trim-cache"],
            &[("--cache", &vm.cache), ("--store", &target)],
        ));
        let copied: u64 = out
            .strip_prefix("processed 1 point(s), ")
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("round {round}: {out}"));
        if round == 0 {
            assert!(copied >= 8, "{out}");
        } else {
            assert!(
                copied <= 3,
                "round {round} copied again what a base holds: {out}"
            );
        }
        let pruned = ok(lifeboat(
            &["prune", "--group", "g1", "--retention", "24h"],
            &[("--store", &target)],
        ));
        if round == 0 {
            assert!(!pruned.contains("compacted 0 disk"), "{pruned}");
        }
    }
    for i in 0..4 {
        let out = dir.path().join(format!("out-{i}"));
        vm.assert_fails_over(&target, i, &out);
    }
}

/// The same rounds with the coordinator's processing loop (pass, trim of the cache, prune with
/// the default 24 h retention, every second) instead of the CLI.
#[test]
fn the_coordinators_processing_loop_never_jams_after_compacting() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let mut coordinator = CoordinatorProc::serving(
        &dir.path().join("c"),
        "g1",
        &format!(
            "processing_interval = \"1s\"\n[target]\nkind = \"local\"\npath = {:?}\n",
            target.display()
        ),
    );
    let mut vm = Vm::setup_with_cache(&dir.path().join("vm"), &coordinator.store);
    vm.small_segments();
    let bases = target.join("v1/g1/vms/vm1/disks/os/base");
    for round in 0..4u64 {
        if round > 0 {
            vm.change(round, round * 300_000, 100_000);
        }
        vm.sync(round);
        let point = target.join(format!("v1/g1/points/{}.point", vm.points[round as usize]));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !point.exists() {
            assert!(
                Instant::now() < deadline,
                "round {round}: point not processed:\n{}",
                coordinator.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let the loop finish the round (trim and prune) before the agent syncs again.
        std::thread::sleep(Duration::from_millis(2500));
        if round == 0 {
            assert!(
                std::fs::read_dir(&bases)
                    .map(|d| d.count())
                    .unwrap_or_default()
                    > 0,
                "no compaction:\n{}",
                coordinator.log_text()
            );
        }
    }
    coordinator.kill();
    let log = coordinator.log_text();
    for bad in [
        "processing failed",
        "pruning failed",
        "trimming the cache store failed",
    ] {
        assert!(!log.contains(bad), "{bad}:\n{log}");
    }
    // Each pass after the first copied what changed, not the segments a base holds.
    let copied: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("processed points into the target store"))
        .filter_map(|l| {
            l.split("segments=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(copied.len(), 4, "{log}");
    assert!(copied[1..].iter().all(|&n| n <= 3), "{copied:?}");
    for i in 0..4 {
        let out = dir.path().join(format!("out-{i}"));
        vm.assert_fails_over(&target, i, &out);
    }
}

/// Regression: a VM that lost its agent state and got a new cache store started again at
/// segment 1 / tag 1, and processing took the target's old segment 1 for the new one (or, after
/// identity checks, quarantined every new point). New histories now number from the time, so
/// the new history flows to the target beside the old one and restores its own bytes.
#[test]
fn a_reprotected_vm_with_a_new_cache_store_restores_its_new_bytes_from_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::setup(dir.path());
    let target = vm.target();
    vm.sync(0);
    vm.change(1, 100_000, 300_000);
    vm.sync(1);
    vm.process();
    // Re-protection: the agent's state and its cache store are gone; the target keeps the old
    // history (its newest point is within retention).
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    std::fs::remove_dir_all(&vm.cache).unwrap();
    std::fs::create_dir_all(&vm.cache).unwrap();
    vm.change(2, 0, 500_000);
    vm.sync(2);
    vm.change(3, 2_000_000, 100_000);
    vm.sync(3);
    let out = vm.process();
    assert!(out.starts_with("processed 2 point(s)"), "{out}");
    let list = ok(lifeboat(
        &["points", "list", "--group", "g1"],
        &[("--store", &target)],
    ));
    assert!(!list.contains("quarantine"), "{list}");
    let latest = dir.path().join("latest");
    ok(failover(
        &target,
        &["--vm", "vm1", "--point", "latest-processed"],
        &latest,
    ));
    vm.assert_restored(3, &latest);
    // Both histories stay restorable, each to its own bytes.
    for i in 0..4 {
        vm.assert_fails_over(&target, i, &dir.path().join(format!("out-{i}")));
    }
}

/// Regression: the point id `<vm>-<ms>-t<tag>` had to fit in 64 characters, so a long VM id
/// failed at its first point, after its segments and tag were written. Every valid VM id now
/// names points for any tag number.
#[test]
fn the_longest_vm_id_publishes_points_and_they_restore() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::setup(dir.path());
    let long = "v".repeat(64);
    let config = dir.path().join("agent.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("vm = \"vm1\"", &format!("vm = \"{long}\""));
    std::fs::write(&config, text).unwrap();
    ok(Command::new(bin("lifeboat-agent"))
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()
        .unwrap());
    vm.sync(0);
    vm.change(1, 0, 100_000);
    vm.sync(1);
    assert!(vm.points[1].starts_with(&long), "{:?}", vm.points);
    assert!(vm.points[1].len() > 90, "{:?}", vm.points);
    vm.process();
    let out = dir.path().join("out");
    ok(failover(
        &vm.target(),
        &["--vm", &long, "--point", &vm.points[1]],
        &out,
    ));
    assert_eq!(
        std::fs::read(vm.copies[1].join("os.img")).unwrap(),
        std::fs::read(out.join(&long).join("os.img")).unwrap()
    );
}

/// Regression: after the agent's newest tag was deleted from the cache store the agent made
/// a correct new copy, but processing stalled on the old point that named the lost tag (exit 2,
/// `no tag … for disk`) and newer good points never reached the target. A flipped byte in a
/// cache segment did the same. Processing now quarantines the point and moves on.
#[test]
fn damage_in_the_cache_costs_its_points_and_newer_points_reach_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(dir.path());
    let disk = vm.cache.join("v1/g1/vms/vm1/disks/os");
    let newest = |kind: &str| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(disk.join(kind))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v.pop().unwrap()
    };
    // Point 2's tag is lost.
    std::fs::remove_file(newest("tag")).unwrap();
    vm.change(3, 900_000, 50_000);
    vm.sync(3);
    let out = lifeboat(
        &["process", "--group", "g1"],
        &[("--cache", &vm.cache), ("--store", &vm.target())],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // The exit status says a point was refused; the newer one went through all the same.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("no tag"), "{stderr}");
    assert!(
        stdout.contains(&format!("latest processed point: {}", vm.points[3])),
        "{stdout}"
    );
    let list = ok(lifeboat(
        &["points", "list", "--group", "g1"],
        &[("--store", &vm.cache), ("--target", &vm.target())],
    ));
    assert!(list.contains(&vm.points[3]), "{list}");
    assert!(list.contains("quarantine"), "{list}");
    let out = dir.path().join("latest");
    ok(failover(
        &vm.target(),
        &["--vm", "vm1", "--point", "latest-processed"],
        &out,
    ));
    vm.assert_restored(3, &out);
    vm.assert_fails_over(&vm.target(), 0, &dir.path().join("zero"));
}

/// Regression: `lifeboat restore` left the disks it had restored when a later one failed,
/// and a failed failover deleted the user's own empty `--to` directory. Both now leave the
/// location as they found it.
#[test]
fn failed_restores_and_failovers_leave_the_output_as_they_found_it() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(dir.path());
    vm.process();
    // Damage every segment of the directory disk (restored after the image) in both stores.
    for store in [&vm.cache, &vm.target()] {
        let segs = store.join("v1/g1/vms/vm1/disks/data/seg");
        for e in std::fs::read_dir(&segs).unwrap().flatten() {
            let mut b = std::fs::read(e.path()).unwrap();
            let at = b.len() / 3;
            b[at] ^= 1;
            std::fs::write(e.path(), b).unwrap();
        }
    }
    let point = vm.points[2].as_str();
    for (mine, what) in [(false, "new"), (true, "existing empty")] {
        let out = dir.path().join(format!("restore-{mine}"));
        if mine {
            std::fs::create_dir(&out).unwrap();
        }
        let r = lifeboat(
            &["restore", "--group", "g1", "--vm", "vm1", "--point", point],
            &[("--store", &vm.cache), ("--out", &out)],
        );
        assert!(!r.status.success(), "restore of damaged data succeeded");
        assert_eq!(out.exists(), mine, "{what} output directory");
        if mine {
            assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "leftovers");
        }
        let to = dir.path().join(format!("failover-{mine}"));
        if mine {
            std::fs::create_dir(&to).unwrap();
        }
        let r = failover(&vm.target(), &["--vm", "vm1", "--point", point], &to);
        assert!(!r.status.success(), "failover of damaged data succeeded");
        assert_eq!(to.exists(), mine, "{what} --to directory");
        if mine {
            assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0, "leftovers");
        }
    }
}

/// Regression (found again by the lifecycle test): after the clock stepped back, a new point
/// was timed before the latest processed one, taken for a pruned one, and silently never
/// processed. The agent now times a tag after its disk's previous one. The clock step is real
/// for the agent: `faketime` (installed by scripts/test.sh) sets its clock an hour back.
#[test]
#[cfg_attr(
    windows,
    ignore = "steps the clock with faketime (LD_PRELOAD), which Windows lacks"
)]
fn a_point_cut_after_the_clock_stepped_back_is_processed() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::setup(dir.path());
    vm.sync(0);
    vm.process();
    vm.change(1, 0, 100_000);
    let out = ok(Command::new("faketime")
        .args(["-f", "-1h"])
        .arg(bin("lifeboat-agent"))
        .arg("--config")
        .arg(dir.path().join("agent.toml"))
        .arg("sync")
        .output()
        .expect("faketime (Debian package faketime; scripts/test.sh installs it)"));
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("published recovery point "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let processed = vm.process();
    assert!(
        processed.contains(&format!("latest processed point: {id}")),
        "{processed}"
    );
    let out = dir.path().join("latest");
    ok(failover(
        &vm.target(),
        &["--vm", "vm1", "--point", "latest-processed"],
        &out,
    ));
    assert_eq!(
        std::fs::read(dir.path().join("disk.img")).unwrap(),
        std::fs::read(out.join("vm1/os.img")).unwrap()
    );
}

/// Regression: damage in the target store to what a disk's history needs there (here the
/// base that compaction folded its first segments into, which retention then deleted and the
/// cache trimmed) quarantined every later point of the disk for good: the data existed only
/// on the source disk, and nothing asked for it. Processing now asks the agent, through the
/// cache store, for a new history; the next sync is a full copy and the next pass publishes it.
#[test]
fn target_damage_a_history_needs_asks_the_agent_for_a_new_copy_and_protection_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::setup(dir.path());
    vm.small_segments();
    let target = vm.target();
    // Points two hours apart under a one-hour retention: every prune expires all but the
    // newest, so the damaged history is soon behind retention and the new one compacts.
    let start = lifeboat_store::manifest::now_millis() - 30 * 86_400_000;
    let hours = |r: u64| start + r * 2 * 3_600_000;
    let round = |vm: &mut Vm, r: u64| -> (Output, Output) {
        vm.change(r, r * 300_000, 100_000);
        vm.sync(r);
        set_point_time(&vm.cache, "g1", vm.points.last().unwrap(), hours(r));
        let processed = lifeboat(
            &["process", "--group", "g1", "--trim-cache"],
            &[("--cache", &vm.cache), ("--store", &target)],
        );
        let pruned = lifeboat(
            &["prune", "--group", "g1", "--retention", "1h"],
            &[("--cache", &vm.cache), ("--store", &target)],
        );
        (processed, pruned)
    };
    for r in 0..2 {
        let (p, q) = round(&mut vm, r);
        ok(p);
        ok(q);
    }
    let bases = target.join("v1/g1/vms/vm1/disks/os/base");
    let manifest = std::fs::read_dir(&bases)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "base"))
        .expect("round 0's prune compacted the image into a base");
    let mut bytes = std::fs::read(&manifest).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&manifest, bytes).unwrap();

    // The next point cannot be completed in the target: quarantined, and the agent is asked.
    let (p, _) = round(&mut vm, 2);
    let stderr = String::from_utf8_lossy(&p.stderr).into_owned();
    assert_eq!(p.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("asked vm1/os for a new full copy"),
        "{stderr}"
    );
    let requests = vm.cache.join("v1/g1/vms/vm1/disks/os/resync");
    let request: Vec<PathBuf> = std::fs::read_dir(&requests)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(request.len(), 1);
    let request = request.into_iter().next().unwrap();

    // The agent answers with a new history; the pass publishes it and withdraws the request.
    vm.change(3, 3 * 300_000, 100_000);
    let log = vm.sync(3);
    assert!(
        // No tag of the disk restores in the target any more (the damaged base stood for all
        // of them), so nothing could be offered: a full copy.
        log.contains("a new history is needed; resynchronising with a new full copy"),
        "{log}"
    );
    set_point_time(&vm.cache, "g1", &vm.points[3], hours(3));
    // The pass still reports the point of the old history it could not copy (exit 1), and
    // publishes the new one.
    let out = lifeboat(
        &["process", "--group", "g1", "--trim-cache"],
        &[("--cache", &vm.cache), ("--store", &target)],
    );
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.contains(&format!("latest processed point: {}", vm.points[3])),
        "{out}"
    );
    assert_eq!(std::fs::read_dir(&requests).unwrap().count(), 0);
    let restored = dir.path().join("latest");
    ok(failover(
        &target,
        &["--vm", "vm1", "--point", "latest-processed"],
        &restored,
    ));
    vm.assert_restored(3, &restored);

    // Steady state again: the rounds after it process, prune and compact as usual — the
    // damaged base of the old history costs the new one nothing, and nobody is asked again.
    let mut compacted = false;
    for r in 4..7 {
        let (p, q) = round(&mut vm, r);
        ok(p);
        let stderr = String::from_utf8_lossy(&q.stderr).into_owned();
        let q = ok(q);
        assert!(!q.contains("retention skipped"), "{q}");
        assert!(!stderr.contains("asked vm1/os"), "round {r}: {stderr}");
        compacted |= !q.contains("compacted 0 disk");
        assert!(
            std::fs::read_dir(&requests).map_or(0, |d| d.count()) == 0,
            "round {r}: a resync request was written again"
        );
    }
    assert!(compacted, "the new history never compacted");

    // A request the agent already answered (left in place, as a cache credential without
    // delete would leave it) never starts another copy.
    std::fs::create_dir_all(&requests).unwrap();
    std::fs::write(&request, "stale").unwrap();
    vm.change(7, 7 * 300_000, 100_000);
    let log = vm.sync(7);
    assert!(!log.contains("resynchronising"), "{log}");
    assert!(!manifest.exists(), "the damaged base outlived its history");
    vm.assert_fails_over(&target, 6, &dir.path().join("out-6"));
}

/// Regression: a segment the cache store lost before processing copied it made the agent send
/// the whole disk again. The agent now waits for processing (which meets the same loss) to
/// offer a tag the target holds — its block hashes beside the resync request — and sends only
/// the blocks that differ from it; processing publishes the new history over a base built on
/// that tag. The oracle is the disk itself: copies kept at every cut, compared byte for byte.
#[test]
fn a_segment_lost_from_the_cache_is_resynchronised_by_checksum_compare() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::setup(dir.path());
    let target = vm.target();
    let process = |vm: &Vm| {
        lifeboat(
            &["process", "--group", "g1", "--trim-cache"],
            &[("--cache", &vm.cache), ("--store", &target)],
        )
    };
    for r in 0..3u64 {
        if r > 0 {
            vm.change(r, r * 700_000, 200_000);
        }
        vm.sync(r);
        ok(process(&vm));
    }
    // Round 3's newest image segment is lost before processing copies it.
    vm.change(3, 300_000, 100_000);
    vm.sync(3);
    let segs = vm.cache.join("v1/g1/vms/vm1/disks/os/seg");
    let listed = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    std::fs::remove_file(listed(&segs).pop().unwrap()).unwrap();

    // The agent finds it lost. Processing runs here (earlier segments were processed out of
    // the cache), so it waits for processing's offer instead of sending the whole disk.
    vm.change(4, 1_500_000, 100_000);
    let stderr = vm.sync_fails();
    assert!(
        stderr.contains("waits for processing to offer a tag"),
        "{stderr}"
    );

    // Processing quarantines the point over the lost segment and offers the newest tag the
    // target holds.
    let p = process(&vm);
    let stderr = String::from_utf8_lossy(&p.stderr).into_owned();
    assert_eq!(p.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("asked vm1/os for a new history over tag"),
        "{stderr}"
    );
    let requests = vm.cache.join("v1/g1/vms/vm1/disks/os/resync");
    assert_eq!(listed(&requests).len(), 2, "a request and its sums");

    // The agent resynchronises by checksum compare: the new history holds what differs from
    // the offered tag (rounds 3 and 4's changes, 200 KB of random bytes), not the 3 MiB image.
    let before = listed(&segs);
    let log = vm.sync(4);
    assert!(
        log.contains("resynchronising by checksum compare with the tag processing offered"),
        "{log}"
    );
    let sent: u64 = listed(&segs)
        .iter()
        .filter(|p| !before.contains(p))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    eprintln!("the resync sent {sent} bytes");
    assert!(
        sent > 200_000 && sent < 600_000,
        "the resync sent {sent} bytes for 200 KB of changes to a 3 MiB image"
    );

    // Processing publishes it over a base built on the offered tag, and withdraws the request.
    let p = process(&vm);
    let stdout = String::from_utf8_lossy(&p.stdout).into_owned();
    assert!(
        stdout.contains(&format!("latest processed point: {}", vm.points[4])),
        "{stdout}\n{}",
        String::from_utf8_lossy(&p.stderr)
    );
    assert!(listed(&requests).is_empty(), "{:?}", listed(&requests));
    vm.assert_fails_over(&target, 4, &dir.path().join("out-4"));

    // Steady state over the new history: later points restore, and so do the old ones.
    for r in 5..7u64 {
        vm.change(r, r * 400_000, 100_000);
        vm.sync(r);
        ok(process(&vm));
        ok(lifeboat(
            &["prune", "--group", "g1", "--retention", "24h"],
            &[("--cache", &vm.cache), ("--store", &target)],
        ));
    }
    vm.assert_fails_over(&target, 6, &dir.path().join("out-6"));
    vm.assert_fails_over(&target, 2, &dir.path().join("out-2"));
    ok(lifeboat(
        &["verify", "--group", "g1", "--read-data"],
        &[("--store", &target)],
    ));
}

/// Regression: the listing of an unchanged directory is one object all its tags name, and
/// processing took the target's copy on its name: a damaged one there broke every later
/// point of the disk while they were published as restorable. It is now compared and replaced.
#[test]
fn a_damaged_directory_listing_in_the_target_is_replaced_by_the_next_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::setup(dir.path());
    vm.sync(0);
    vm.process();
    let trees = vm.target().join("v1/g1/vms/vm1/disks/data/tree");
    let tree = std::fs::read_dir(&trees)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .next()
        .unwrap();
    let mut bytes = std::fs::read(&tree).unwrap();
    let at = bytes.len() - 1;
    bytes[at] ^= 0x01;
    std::fs::write(&tree, bytes).unwrap();
    // Only the image changes: the directory's next tag names the same listing.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("disk.img"))
            .unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&random_bytes(64 << 10, 77)).unwrap();
    }
    vm.sync(1);
    vm.process();
    let out = dir.path().join("latest");
    ok(failover(
        &vm.target(),
        &["--vm", "vm1", "--point", "latest-processed"],
        &out,
    ));
    vm.assert_restored(1, &out);
}
