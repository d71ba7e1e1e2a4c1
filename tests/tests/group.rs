//! A replication group end to end: a coordinator on a real TLS port and several real
//! `lifeboat-agent` processes, each protecting its own loop-mounted ext4 with `fsfreeze`.
//!
//! - A cross-VM causal workload (B writes record n only after A's record n is durable, C after
//!   B's): for every published multi-VM point, restoring all covered VMs shows no effect
//!   without its cause.
//! - App points run every member's hooks; a failing or timed-out hook never yields a false
//!   label.
//! - The coordinator SIGKILLed mid-cut: agents thaw within their deadline, nothing partial is
//!   published, and cutting resumes after a restart.
//! - An agent cut off by a network namespace is excluded (and named), never stays frozen, and
//!   catches up when it returns.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifeboat_tests::{
    CoordinatorProc, LiveWriter, LoopFs, assert_same_bytes, bin, check_database, oracle_command,
    root_or_skip, run, set_point_time,
};

/// Group tests freeze filesystems and load both cores; one at a time keeps deadlines honest.
static SERIAL: Mutex<()> = Mutex::new(());

const POLICY: &str = r#"
[policy]
tag_deadline = "30s"
[policy.crash]
prepare = "20s"
ack = "1s"
freeze = "3s"
[policy.app]
prepare = "20s"
ack = "1s"
freeze = "3s"
"#;

/// A running agent process; SIGKILLed on drop.
struct AgentProc {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    netns: Option<String>,
    env: Vec<(String, String)>,
}

impl AgentProc {
    fn new(
        dir: &Path,
        c: &CoordinatorProc,
        vm: &str,
        disk_toml: &str,
        netns: Option<&str>,
    ) -> Self {
        let vdir = dir.join(vm);
        std::fs::create_dir_all(&vdir).unwrap();
        let config = vdir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "vm = \"{vm}\"\ngroup = \"g1\"\nstate_dir = {:?}\n\n[store]\nkind = \"local\"\npath = {:?}\n\n[replication]\ninterval = \"10s\"\n\n{disk_toml}",
                vdir.join("state").display(),
                c.store.display()
            ),
        )
        .unwrap();
        let a = AgentProc {
            config,
            log: vdir.join("agent.log"),
            child: None,
            netns: netns.map(String::from),
            env: Vec::new(),
        };
        let token = c.token(Some(vm), "10m");
        let out = a
            .command()
            .arg("enroll")
            .arg("--coordinator")
            .arg(&c.addr)
            .arg("--token")
            .arg(token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "enroll {vm}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        a
    }

    fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("lifeboat-agent"));
                c
            }
            None => Command::new(bin("lifeboat-agent")),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .env("LIFEBOAT_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command()
            .arg("run")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn fsfreeze_disk(mount: &Path) -> String {
    format!(
        "[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {:?}\nconsistency = \"fsfreeze\"\nfreeze_timeout = \"5s\"\n",
        mount.display()
    )
}

/// One running agent per VM, each protecting its own loop-mounted ext4 with fsfreeze, all
/// healthy members of `c`'s group.
fn frozen_members(dir: &Path, c: &CoordinatorProc, vms: &[&str]) -> (Vec<LoopFs>, Vec<AgentProc>) {
    let fss: Vec<LoopFs> = vms
        .iter()
        .map(|v| LoopFs::named(dir, v, "ext4", 48))
        .collect();
    let agents = vms
        .iter()
        .zip(&fss)
        .map(|(v, fs)| {
            let mut a = AgentProc::new(dir, c, v, &fsfreeze_disk(&fs.mount), None);
            a.start();
            a
        })
        .collect();
    wait_healthy(c, vms, Duration::from_secs(30));
    (fss, agents)
}

/// Waits until `lifeboat members` shows every VM of `vms` healthy.
fn wait_healthy(c: &CoordinatorProc, vms: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let out = c.admin(&["members"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let healthy = vms.iter().all(|vm| {
            text.lines()
                .any(|l| l.split_whitespace().next() == Some(vm) && l.contains(" healthy "))
        });
        if healthy {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members never all healthy:\n{text}\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Takes a snapshot, retrying while members are still busy with initial replication, until
/// one covers every VM in `vms`.
fn snapshot_covering(c: &CoordinatorProc, vms: &[&str], app: bool) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (id, stderr) = c.snapshot("g1", app);
        let covered = stderr
            .lines()
            .find_map(|l| l.split(" covering ").nth(1))
            .unwrap_or("")
            .to_string();
        if vms.iter().all(|v| covered.split(", ").any(|x| x == *v)) {
            return (id, stderr);
        }
        assert!(
            Instant::now() < deadline,
            "no point covered {vms:?}: {stderr}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn restore(c: &CoordinatorProc, vm: &str, point: &str, out: &Path) {
    run(Command::new(bin("lifeboat"))
        .args([
            "restore", "--group", "g1", "--vm", vm, "--point", point, "--store",
        ])
        .arg(&c.store)
        .arg("--out")
        .arg(out));
}

/// Complete records of a log file, checked to be exactly 0, 1, 2, … in order.
fn records(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut n = 0;
    for line in text.lines() {
        assert_eq!(
            line,
            format!("{n:016}"),
            "{} is not a clean prefix",
            path.display()
        );
        n += 1;
    }
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "torn record in {}",
        path.display()
    );
    n
}

fn append_durable(path: &Path, n: u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(format!("{n:016}\n").as_bytes()).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn multi_vm_points_are_consistent_cuts_of_a_causal_workload() {
    if !root_or_skip("multi_vm_points_are_consistent_cuts_of_a_causal_workload") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(dir.path(), "g1", POLICY);
    let vms = ["a", "b", "c"];
    let (fss, agents) = frozen_members(dir.path(), &c, &vms);

    // The causal chain: a's record n is durable before b writes n, b's before c's.
    let stop = Arc::new(AtomicBool::new(false));
    let logs: Vec<PathBuf> = fss.iter().map(|f| f.mount.join("records.log")).collect();
    let workload = {
        let (stop, logs) = (stop.clone(), logs.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                for l in &logs {
                    append_durable(l, n);
                }
                n += 1;
            }
            n
        })
    };
    let mut points = Vec::new();
    points.push(snapshot_covering(&c, &vms, false).0);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        let (id, stderr) = c.snapshot("g1", false);
        assert!(
            stderr.contains("crash-consistent") || stderr.contains("excluded"),
            "{stderr}"
        );
        points.push(id);
    }
    stop.store(true, Ordering::Relaxed);
    let written = workload.join().unwrap();
    assert!(written > 0);

    let mut checked = 0;
    for p in &points {
        let out = dir.path().join(format!("restore-{p}"));
        let mut counts = Vec::new();
        for v in vms {
            let o = out.join(v);
            restore(&c, v, p, &o);
            counts.push(records(&o.join("data/records.log")));
        }
        // No effect without its cause.
        assert!(
            counts[0] >= counts[1] && counts[1] >= counts[2],
            "point {p}: records a={} b={} c={} break causality",
            counts[0],
            counts[1],
            counts[2]
        );
        // One instant: the chain can be at most one record apart per hop.
        assert!(
            counts[0] - counts[2] <= 1,
            "point {p}: {counts:?} is not one instant"
        );
        eprintln!("point {p}: records {counts:?}");
        checked += 1;
    }
    assert_eq!(checked, points.len());
    let listing = run(Command::new(bin("lifeboat"))
        .args(["points", "list", "--group", "g1", "--store"])
        .arg(&c.store));
    for p in &points {
        let line = listing.lines().find(|l| l.starts_with(p.as_str())).unwrap();
        assert!(line.contains("crash-consistent multi-VM"), "{line}");
    }
    // Agents say how long they held their freeze.
    assert!(
        agents[0].log_text().contains("group cut tagged"),
        "{}",
        agents[0].log_text()
    );

    // The same points from the target store, after processing and a prune that expires the
    // first two and compacts every disk at the oldest kept tag: still consistent cuts.
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    run(Command::new(bin("lifeboat"))
        .args(["process", "--group", "g1", "--cache"])
        .arg(&c.store)
        .arg("--store")
        .arg(&target));
    // The first two points made two hours before the others, which are a minute apart.
    let n = points.len() as u64;
    let newest = lifeboat_store::manifest::now_millis();
    for (i, p) in points.iter().enumerate() {
        let i = i as u64;
        let back = (n - 1 - i) * 60_000 + if i < 2 { 7_200_000 } else { 0 };
        set_point_time(&target, "g1", p, newest - back);
    }
    let pruned = run(Command::new(bin("lifeboat"))
        .args(["prune", "--group", "g1", "--retention", "1h", "--store"])
        .arg(&target));
    assert!(
        pruned.starts_with("kept 3 point(s); deleted 2 expired"),
        "{pruned}"
    );
    assert!(
        pruned.contains("compacted") && !pruned.contains("compacted 0 disk"),
        "{pruned}"
    );
    for p in &points[2..] {
        let out = dir.path().join(format!("target-restore-{p}"));
        let mut counts = Vec::new();
        for v in vms {
            let o = out.join(v);
            run(Command::new(bin("lifeboat"))
                .args([
                    "restore", "--group", "g1", "--vm", v, "--point", p, "--store",
                ])
                .arg(&target)
                .arg("--out")
                .arg(&o));
            counts.push(records(&o.join("data/records.log")));
        }
        assert!(
            counts[0] >= counts[1] && counts[1] >= counts[2] && counts[0] - counts[2] <= 1,
            "point {p} from the target after compaction: {counts:?}"
        );
    }
}

#[test]
#[cfg_attr(windows, ignore = "hooks run through `sh -c`, which Windows lacks")]
fn app_points_run_hooks_and_never_claim_more_than_happened() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(dir.path(), "g1", POLICY);
    let flags = dir.path().join("flags");
    std::fs::create_dir_all(&flags).unwrap();
    let mut agents = Vec::new();
    for vm in ["web", "db"] {
        let data = dir.path().join(format!("{vm}-data"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("f"), vm).unwrap();
        let marker = dir.path().join(format!("{vm}.hooks"));
        let pre = format!(
            "test -e {f}/{vm}.fail && exit 3; test -e {f}/{vm}.slow && sleep 30; echo pre >> {m}",
            f = flags.display(),
            m = marker.display()
        );
        let disk = format!(
            "[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {:?}\nconsistency = \"hooks\"\n\n[disk.hooks]\npre = [{pre:?}]\npost = [\"echo post >> {}\"]\ntimeout = \"1s\"\n",
            data.display(),
            marker.display()
        );
        let mut a = AgentProc::new(dir.path(), &c, vm, &disk, None);
        a.start();
        agents.push(a);
    }
    wait_healthy(&c, &["web", "db"], Duration::from_secs(30));
    let hooks = |vm: &str| {
        std::fs::read_to_string(dir.path().join(format!("{vm}.hooks"))).unwrap_or_default()
    };

    // Both hooks succeed: an app-consistent point covering both.
    let (id, stderr) = snapshot_covering(&c, &["web", "db"], true);
    assert!(
        stderr.contains("published app-consistent point"),
        "{stderr}"
    );
    for vm in ["web", "db"] {
        assert!(hooks(vm).contains("pre\npost\n"), "{vm}: {}", hooks(vm));
    }
    let listing = |c: &CoordinatorProc| {
        run(Command::new(bin("lifeboat"))
            .args(["points", "list", "--group", "g1", "--store"])
            .arg(&c.store))
    };
    let l = listing(&c);
    assert!(
        l.lines()
            .any(|x| x.starts_with(&id) && x.contains("app-consistent   multi-VM")),
        "{l}"
    );

    // A failing pre hook on db, then a timed-out one: never labelled app.
    for flag in ["db.fail", "db.slow"] {
        std::fs::write(flags.join(flag), "").unwrap();
        let (id, stderr) = snapshot_covering(&c, &["web", "db"], true);
        assert!(
            !stderr.contains("published app-consistent"),
            "{flag}: {stderr}"
        );
        let l = listing(&c);
        let line = l.lines().find(|x| x.starts_with(&id)).unwrap();
        assert!(!line.contains(" app-consistent "), "{flag}: {line}");
        assert!(line.contains("web (app-consistent)"), "{flag}: {line}");
        assert!(!line.contains("db (app-consistent)"), "{flag}: {line}");
        std::fs::remove_file(flags.join(flag)).unwrap();
    }
    drop(agents);
}

/// Whether a durable write to `mount` finishes within `within`.
fn write_finishes(mount: &Path, within: Duration) -> Option<Duration> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = mount.join("probe");
    let started = Instant::now();
    std::thread::spawn(move || {
        append_durable(&p, 0);
        let _ = tx.send(());
    });
    rx.recv_timeout(within).ok().map(|_| started.elapsed())
}

#[test]
fn coordinator_killed_mid_cut_leaves_no_frozen_filesystem_and_no_partial_point() {
    if !root_or_skip("coordinator_killed_mid_cut_leaves_no_frozen_filesystem_and_no_partial_point")
    {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(dir.path(), "g1", POLICY);
    let (fss, agents) = frozen_members(dir.path(), &c, &["a", "b"]);
    let (first, _) = snapshot_covering(&c, &["a", "b"], false);

    // A simulated member that acks PREPARED and then stalls, so the real agents sit frozen
    // waiting for a Commit when the coordinator dies.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (froze_tx, froze_rx) = std::sync::mpsc::channel();
    rt.block_on(async {
        use lifeboat_proto::model::{AgentMessage, CoordinatorMessage, CutPhase};
        use lifeboat_sim::{self as sim, SimMember};
        let vm = lifeboat_store::VmId::new("stall").unwrap();
        let creds = sim::enroll(&c.state_dir, &c.addr, &vm).await.unwrap();
        let mut m = SimMember::open(
            &c.addr,
            &creds,
            AgentMessage::Register(sim::register(&vm)).into(),
        )
        .await
        .unwrap();
        tokio::spawn(async move {
            while let Ok(msg) = m.next().await {
                match msg {
                    CoordinatorMessage::Prepare { cut_id, .. } => {
                        m.ack(cut_id, CutPhase::Prepared).await.unwrap()
                    }
                    CoordinatorMessage::Freeze { .. } => {
                        let _ = froze_tx.send(Instant::now());
                    }
                    _ => {}
                }
            }
        });
    });
    let pid = c.pid().expect("running");
    let c = Arc::new(c);
    let snap = {
        let c = c.clone();
        std::thread::spawn(move || c.admin(&["snapshot", "--group", "g1"]))
    };
    froze_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the cut reached Freeze");
    std::thread::sleep(Duration::from_millis(150));
    // The real agents are frozen now: a durable write does not get through.
    assert!(
        write_finishes(&fss[0].mount, Duration::from_millis(100)).is_none(),
        "a is not frozen"
    );
    let killed_at = Instant::now();
    run(Command::new("kill").args(["-KILL", &pid.to_string()]));
    let snap = snap.join().unwrap();
    assert!(
        !snap.status.success(),
        "the snapshot cannot succeed with its coordinator dead"
    );
    // Every agent thaws within its freeze deadline (3 s) of the freeze, whatever the coordinator.
    for fs in &fss {
        let took =
            write_finishes(&fs.mount, Duration::from_secs(5)).expect("filesystem left frozen");
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "thawed after {took:?}"
        );
    }
    let mut c = Arc::into_inner(c).unwrap();
    c.kill(); // reap
    let listing = || {
        run(Command::new(bin("lifeboat"))
            .args(["points", "list", "--group", "g1", "--store"])
            .arg(&c.store))
    };
    assert_eq!(
        listing().lines().count(),
        1,
        "no partial point: {}",
        listing()
    );
    assert!(listing().starts_with(&first));

    // Restarted, the coordinator rebuilds its catalog and the agents come back.
    c.start();
    wait_healthy(&c, &["a", "b"], Duration::from_secs(30));
    let (next, stderr) = snapshot_covering(&c, &["a", "b"], false);
    assert!(next > first);
    assert!(stderr.contains("excluded stall: not connected"), "{stderr}");
    drop(agents);
}

/// A network namespace joined to the host by a veth pair; deleted on drop.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn new(name: &str, host_ip: &str, ns_ip: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let host_if = format!("{name}h");
        let ns_if = format!("{name}n");
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        run(Command::new("ip").args(["netns", "add", name]));
        run(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]));
        run(Command::new("ip").args(["link", "set", &ns_if, "netns", name]));
        run(Command::new("ip").args(["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]));
        run(Command::new("ip").args(["link", "set", &host_if, "up"]));
        let ns = |args: &[&str]| {
            run(Command::new("ip").args(["netns", "exec", name]).args(args));
        };
        ns(&["ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if]);
        ns(&["ip", "link", "set", &ns_if, "up"]);
        ns(&["ip", "link", "set", "lo", "up"]);
        Netns {
            name: name.into(),
            host_if,
        }
    }

    fn link(&self, up: bool) {
        run(Command::new("ip").args([
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" },
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[test]
fn an_agent_cut_off_by_the_network_is_excluded_and_catches_up() {
    if !root_or_skip("an_agent_cut_off_by_the_network_is_excluded_and_catches_up") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let net = Netns::new("lbt0", "10.231.7.1", "10.231.7.2");
    let policy = POLICY.replace("prepare = \"20s\"", "prepare = \"4s\"");
    let mut c = CoordinatorProc::init(dir.path(), "g1", "10.231.7.1:0", &policy);
    c.start();
    let fss: Vec<LoopFs> = ["near", "far"]
        .iter()
        .map(|v| LoopFs::named(dir.path(), v, "ext4", 48))
        .collect();
    let mut near = AgentProc::new(dir.path(), &c, "near", &fsfreeze_disk(&fss[0].mount), None);
    let mut far = AgentProc::new(
        dir.path(),
        &c,
        "far",
        &fsfreeze_disk(&fss[1].mount),
        Some("lbt0"),
    );
    near.start();
    far.start();
    wait_healthy(&c, &["near", "far"], Duration::from_secs(30));
    snapshot_covering(&c, &["near", "far"], false);

    // Cut far off. The next point covers near alone and names far as excluded.
    net.link(false);
    std::fs::write(fss[1].mount.join("while-away"), b"written while cut off").unwrap();
    let (id, stderr) = c.snapshot("g1", false);
    assert!(stderr.contains("covering near\n"), "{stderr}");
    assert!(stderr.contains("excluded far:"), "{stderr}");
    let listing = run(Command::new(bin("lifeboat"))
        .args(["points", "list", "--group", "g1", "--store"])
        .arg(&c.store));
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("excluded: far")),
        "{listing}"
    );
    // far never stays frozen.
    assert!(
        write_finishes(&fss[1].mount, Duration::from_secs(5)).is_some(),
        "far left frozen"
    );

    // Back on the network: far reconnects and the next point covers it, with what it wrote.
    net.link(true);
    wait_healthy(&c, &["near", "far"], Duration::from_secs(60));
    let (id, _) = snapshot_covering(&c, &["near", "far"], false);
    let out = dir.path().join("restore-far");
    restore(&c, "far", &id, &out);
    assert_eq!(
        std::fs::read(out.join("data/while-away")).unwrap(),
        b"written while cut off"
    );
    drop((near, far));
}

#[test]
fn a_running_agent_carries_on_after_its_certificate_is_renewed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(&dir.path().join("c"), "g1", POLICY);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "before").unwrap();
    let disk = format!(
        "[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {:?}\nconsistency = \"none\"\n",
        data.display()
    );
    let mut a = AgentProc::new(dir.path(), &c, "web", &disk, None);
    a.start();
    wait_healthy(&c, &["web"], Duration::from_secs(30));
    snapshot_covering(&c, &["web"], false);
    let identity = dir.path().join("web/state/identity");
    let old_cert = std::fs::read_to_string(identity.join("agent.pem")).unwrap();
    let old_key = std::fs::read_to_string(identity.join("agent.key")).unwrap();

    let out = a.command().arg("renew").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("renewed the certificate of VM web: valid until"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        std::fs::read_to_string(identity.join("agent.pem")).unwrap(),
        old_cert
    );
    assert_ne!(
        std::fs::read_to_string(identity.join("agent.key")).unwrap(),
        old_key
    );
    assert!(!identity.join("agent.pem.next").exists());

    // The coordinator closed the session that ran on the old certificate; the running agent
    // reconnects with the new one (the old one would be refused) and is covered again.
    std::fs::write(data.join("f"), "after").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.log_text().matches("member connected").count() < 2 {
        assert!(Instant::now() < deadline, "{}", c.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_healthy(&c, &["web"], Duration::from_secs(30));
    let (id, _) = snapshot_covering(&c, &["web"], false);
    let log = c.log_text();
    assert!(!log.contains("session refused"), "{log}");
    let out = dir.path().join("restored");
    restore(&c, "web", &id, &out);
    assert_eq!(
        std::fs::read_to_string(out.join("data/f")).unwrap(),
        "after"
    );
}

/// Two VMs whose disks are block devices under mounted ext4 and xfs, each with a live writer
/// (SQLite in WAL mode and random writes). Agents are SIGKILLed and restarted between points.
/// Every VM of every multi-VM point restores to exactly what the test's own O_DIRECT read of
/// that VM's device returned while it was frozen for the cut, and the restored databases pass
/// SQLite's integrity check.
#[test]
fn group_points_of_block_devices_restore_what_each_device_held() {
    if !root_or_skip("group_points_of_block_devices_restore_what_each_device_held") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // The oracle read (a whole device, while frozen) happens before the FROZEN ack: give the
    // phase room for it on 2 shared cores.
    let policy = POLICY
        .replace("ack = \"1s\"", "ack = \"8s\"")
        .replace("freeze = \"3s\"", "freeze = \"15s\"");
    let c = CoordinatorProc::serving(dir.path(), "g1", &policy);
    let vms = [("a", "ext4"), ("b", "xfs")];
    let fss: Vec<LoopFs> = vms
        .iter()
        .map(|(v, fs)| LoopFs::named(dir.path(), v, fs, 320))
        .collect();
    let oracles: Vec<PathBuf> = vms
        .iter()
        .map(|(v, _)| dir.path().join(format!("oracles-{v}")))
        .collect();
    let mut agents: Vec<AgentProc> = vms
        .iter()
        .zip(&fss)
        .zip(&oracles)
        .map(|(((v, _), fs), o)| {
            std::fs::create_dir_all(o).unwrap();
            let disk = format!(
                "[[disk]]\nid = \"vol\"\nkind = \"block_device\"\npath = {:?}\nconsistency = \"fsfreeze\"\nmount = {:?}\nfreeze_timeout = \"30s\"\n",
                fs.device.display(),
                fs.mount.display()
            );
            let mut a = AgentProc::new(dir.path(), &c, v, &disk, None);
            a.env.push(("LIFEBOAT_TEST_WHILE_FROZEN".into(), oracle_command(&fs.device, o)));
            a.start();
            a
        })
        .collect();
    let names: Vec<&str> = vms.iter().map(|(v, _)| *v).collect();
    wait_healthy(&c, &names, Duration::from_secs(60));
    let writers: Vec<LiveWriter> = fss
        .iter()
        .enumerate()
        .map(|(i, fs)| LiveWriter::start(&fs.mount, 100 + i as u64))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let mut points = Vec::new();
    for round in 0..4 {
        if round > 0 {
            // SIGKILL one member between points; it comes back and catches up.
            let a = &mut agents[round % 2];
            if let Some(mut child) = a.child.take() {
                child.kill().unwrap();
                let _ = child.wait();
            }
            a.start();
            wait_healthy(&c, &names, Duration::from_secs(60));
        }
        points.push(snapshot_covering(&c, &names, false).0);
        std::thread::sleep(Duration::from_millis(300));
    }
    for w in writers {
        w.stop();
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = lifeboat_store::restore::StoreReader::new(
        std::sync::Arc::new(lifeboat_store::backend::local::LocalBackend::open(&c.store).unwrap()),
        lifeboat_store::layout::Layout::new(lifeboat_store::GroupId::new("g1").unwrap()),
    );
    let mut compared = 0;
    for p in &points {
        let point = rt
            .block_on(reader.point(&lifeboat_store::PointId::new(p.clone()).unwrap()))
            .unwrap();
        assert!(point.multi_vm, "{p} is not a multi-VM point");
        for (i, (vm, fs)) in vms.iter().enumerate() {
            let m = point.members.iter().find(|m| m.vm.as_str() == *vm).unwrap();
            assert_eq!(
                m.consistency,
                lifeboat_store::manifest::Consistency::Crash,
                "{p} {vm}"
            );
            let tag = rt
                .block_on(reader.tag(&m.vm, &m.disks[0].disk, m.disks[0].tag))
                .unwrap();
            let oracle = oracles[i].join(format!("{}.img", tag.time));
            assert!(
                oracle.exists(),
                "no oracle read for {vm} at {} ({p})",
                tag.time
            );
            let out = dir.path().join(format!("restore-{p}-{vm}"));
            restore(&c, vm, p, &out);
            assert_same_bytes(&out.join("vol.img"), &oracle, &format!("point {p} VM {vm}"));
            check_database(
                &out.join("vol.img"),
                fs,
                &dir.path().join(format!("check-{vm}")),
            );
            std::fs::remove_dir_all(&out).unwrap();
            compared += 1;
        }
    }
    assert_eq!(compared, 2 * points.len());
    eprintln!(
        "{} multi-VM points of 2 block-device VMs equal their oracles",
        points.len()
    );
    // Stop the agents, then leave no program attached to the block layer behind.
    for a in &mut agents {
        if let Some(mut child) = a.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = a.command().arg("untrack").output().unwrap();
        assert!(out.status.success(), "untrack failed");
    }
}

/// Regression: a member ran its background replication inside its command loop, so a stop
/// (SIGTERM, as systemd sends it) waited for an initial copy to end — hours for a large disk,
/// until the service manager's SIGKILL. A stop now ends the copy at once; the next start
/// resumes it, and the VM's first covered point restores the image exactly.
#[test]
#[cfg_attr(windows, ignore = "sends SIGTERM, which Windows lacks")]
fn a_member_stops_at_once_during_its_initial_copy_and_resumes_after() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(&dir.path().join("c"), "g1", POLICY);
    let image = dir.path().join("disk.img");
    std::fs::write(&image, lifeboat_tests::random_bytes(16 << 20, 7)).unwrap();
    let disk = format!(
        "[[disk]]\nid = \"img\"\nkind = \"image\"\npath = {:?}\nconsistency = \"none\"\n",
        image.display()
    );
    let mut a = AgentProc::new(dir.path(), &c, "big", &disk, None);
    // At 2 MiB/s the 16 MiB copy takes 8 s: long enough to stop in the middle of it.
    let slow = std::fs::read_to_string(&a.config)
        .unwrap()
        .replace("[replication]", "[replication]\nbandwidth_limit = \"2MiB\"");
    std::fs::write(&a.config, slow).unwrap();
    a.start();
    let status = dir.path().join("big/state/status.json");
    let shipped = || -> Option<(u64, u64)> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&status).ok()?).ok()?;
        let d = &v["disks"]["img"];
        Some((d["done"].as_u64()?, d["total"].as_u64()?))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while shipped().is_none_or(|(done, _)| done == 0) {
        assert!(Instant::now() < deadline, "no copy began: {}", a.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = a.child.as_ref().unwrap().id().to_string();
    run(Command::new("kill").args(["-TERM", &pid]));
    let stopped_at = Instant::now();
    let mut child = a.child.take().unwrap();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stopped_at.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!(
                "the member ignored SIGTERM for 5 s during its initial copy: {}",
                a.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit}: {}", a.log_text());
    let (done, total) = shipped().unwrap();
    assert!(
        done < total,
        "the copy finished before the stop: {done} of {total}"
    );
    assert!(
        a.log_text()
            .contains("stopping; the cycle in progress resumes at the next start"),
        "{}",
        a.log_text()
    );

    // The next start resumes the copy; the first point that covers the VM is the image.
    let fast = std::fs::read_to_string(&a.config)
        .unwrap()
        .replace("bandwidth_limit = \"2MiB\"\n", "");
    std::fs::write(&a.config, fast).unwrap();
    a.start();
    wait_healthy(&c, &["big"], Duration::from_secs(30));
    let (id, _) = snapshot_covering(&c, &["big"], false);
    let out = dir.path().join("restored");
    restore(&c, "big", &id, &out);
    assert_same_bytes(&out.join("img.img"), &image, "the restored image");
}
