//! The cut protocol's rules as the coordinator enforces them, with simulated members over real
//! TLS: late members are excluded and named, nothing is published without TAGGED acks, a
//! restarted coordinator rebuilds its catalog from the store and keeps cut ids increasing; and
//! a non-Rust client reaches health and reflection.

use std::time::Duration;

use lifeboat_proto::model::{AgentMessage, CoordinatorMessage, CutPhase};
use lifeboat_sim::{self as sim, SimMember};
use lifeboat_store::VmId;
use lifeboat_tests::CoordinatorProc;

const POLICY: &str = r#"
[policy]
tag_deadline = "2s"
[policy.crash]
prepare = "1s"
ack = "300ms"
freeze = "1s"
"#;

fn vm(s: &str) -> VmId {
    VmId::new(s).unwrap()
}

async fn member(c: &CoordinatorProc, name: &str) -> SimMember {
    let creds = sim::enroll(&c.state_dir, &c.addr, &vm(name)).await.unwrap();
    let backend: lifeboat_store::DynBackend =
        std::sync::Arc::new(lifeboat_store::backend::local::LocalBackend::open(&c.store).unwrap());
    let writer = lifeboat_store::writer::StoreWriter::new(
        backend,
        lifeboat_store::layout::Layout::new(lifeboat_store::GroupId::new("g1").unwrap()),
    );
    sim::write_tag(&writer, &vm(name)).await.unwrap();
    SimMember::open(
        &c.addr,
        &creds,
        AgentMessage::Register(sim::register(&vm(name))).into(),
    )
    .await
    .unwrap()
}

fn points(c: &CoordinatorProc) -> String {
    let out = std::process::Command::new(lifeboat_tests::bin("lifeboat"))
        .args(["points", "list", "--group", "g1", "--store"])
        .arg(&c.store)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn snapshot(c: &std::sync::Arc<CoordinatorProc>) -> std::process::Output {
    let c = c.clone();
    tokio::task::spawn_blocking(move || c.admin(&["snapshot", "--group", "g1"]))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_members_are_excluded_and_restart_keeps_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(dir.path(), "g1", POLICY);
    let (times, _rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(member(&c, "good").await.serve(times.clone()));
    // Acks PREPARED, never FROZEN.
    let mut stuck = member(&c, "stuck").await;
    tokio::spawn(async move {
        while let Ok(m) = stuck.next().await {
            if let CoordinatorMessage::Prepare { cut_id, .. } = m {
                stuck.ack(cut_id, CutPhase::Prepared).await.unwrap();
            }
        }
    });
    // Never answers at all.
    let silent = member(&c, "silent").await;
    // Enrolled, then gone.
    drop(member(&c, "gone").await);
    let c = std::sync::Arc::new(c);
    // Until the coordinator has seen all three sessions open and the fourth end.
    let t = std::time::Instant::now();
    loop {
        let (_, _, members, _) = admin(&c, &["members"]).await;
        let state = |vm: &str| {
            members
                .lines()
                .find(|l| l.split_whitespace().next() == Some(vm))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_owned)
        };
        if ["good", "stuck", "silent"]
            .iter()
            .all(|v| state(v).as_deref() == Some("healthy"))
            && state("gone").as_deref() == Some("disconnected")
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{members}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = snapshot(&c).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}\n{}", c.log_text());
    let first = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(stderr.contains("covering good\n"), "{stderr}");
    assert!(
        stderr.contains("excluded stuck: missed the freeze acknowledgement deadline"),
        "{stderr}"
    );
    assert!(
        stderr.contains("excluded silent: missed the prepare deadline"),
        "{stderr}"
    );
    assert!(stderr.contains("excluded gone: not connected"), "{stderr}");
    // The point in the store records exactly the covered member and the excluded ones.
    let listing = points(&c);
    assert!(listing.contains(&first), "{listing}");
    assert!(
        listing.contains("members: good (crash-consistent)"),
        "{listing}"
    );
    assert!(
        listing.contains("silent (missed the prepare deadline)"),
        "{listing}"
    );
    drop(silent);

    // Restart (SIGKILL): the catalog comes back from the store and cut ids keep increasing.
    let mut c = std::sync::Arc::into_inner(c).unwrap();
    c.kill();
    c.start();
    assert!(c.log_text().contains("points=1"), "{}", c.log_text());
    let (times, _rx2) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(member(&c, "good2").await.serve(times));
    let c = std::sync::Arc::new(c);
    let out = snapshot(&c).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(second > first, "{second} after {first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_point_without_tags() {
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(dir.path(), "g1", POLICY);
    // Freezes and is committed, but never reports its tags.
    let mut m = member(&c, "mute").await;
    tokio::spawn(async move {
        while let Ok(msg) = m.next().await {
            match msg {
                CoordinatorMessage::Prepare { cut_id, .. } => {
                    m.ack(cut_id, CutPhase::Prepared).await.unwrap()
                }
                CoordinatorMessage::Freeze { cut_id, .. } => {
                    m.ack(cut_id, CutPhase::Frozen).await.unwrap()
                }
                _ => {}
            }
        }
    });
    let c = std::sync::Arc::new(c);
    let out = snapshot(&c).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("did not write its tags"), "{stderr}");
    assert!(points(&c).contains("no recovery points"), "{}", points(&c));
}

#[test]
#[cfg_attr(
    windows,
    ignore = "runs Debian's python3 with grpcio, which the Windows run under wine cannot start"
)]
fn python_grpcio_calls_health_and_reflection_over_tls() {
    let python = "/usr/bin/python3";
    let has_grpc = std::process::Command::new(python)
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_grpc {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3-grpcio is missing (scripts/test.sh installs it)"
        );
        eprintln!("SKIPPED: Debian's python3-grpcio is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(dir.path(), "g1", "");
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/health_reflection.py"
        ))
        .arg(&c.addr)
        .arg(c.state_dir.join("admin/ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("health SERVING"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_cuts_on_the_policy_interval() {
    let dir = tempfile::tempdir().unwrap();
    let policy = POLICY.replace(
        "[policy]\n",
        "[policy]\ncrash_interval = \"10s\"\napp_interval = \"off\"\n",
    );
    let c = CoordinatorProc::serving(dir.path(), "g1", &policy);
    let (times, mut cuts) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(member(&c, "vm1").await.serve(times));
    // Nothing on demand: the first scheduled cut comes one interval after start.
    let first = tokio::time::timeout(Duration::from_secs(15), cuts.recv())
        .await
        .expect("a scheduled cut within 15 s")
        .unwrap();
    // Published once the coordinator read the member's tags back.
    let id = format!("c{:013}", first.0);
    let t = std::time::Instant::now();
    let listing = loop {
        let listing = points(&c);
        if listing.contains(&id) {
            break listing;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{listing}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(listing.contains("crash-consistent multi-VM"), "{listing}");
}

/// A member "slow" that takes `prepare` to prepare, then acks every phase like a healthy
/// agent; each cut id it is asked to prepare goes to the returned channel.
async fn slow_member(
    c: &CoordinatorProc,
    prepare: Duration,
) -> tokio::sync::mpsc::UnboundedReceiver<u64> {
    let mut m = member(c, "slow").await;
    let (prepare_tx, prepare_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(msg) = m.next().await {
            match msg {
                CoordinatorMessage::Prepare { cut_id, .. } => {
                    let _ = prepare_tx.send(cut_id);
                    tokio::time::sleep(prepare).await;
                    m.ack(cut_id, CutPhase::Prepared).await.unwrap()
                }
                CoordinatorMessage::Freeze { cut_id, .. } => {
                    m.ack(cut_id, CutPhase::Frozen).await.unwrap()
                }
                CoordinatorMessage::Commit { cut_id, .. } => {
                    m.ack(cut_id, CutPhase::Tagged).await.unwrap()
                }
                _ => {}
            }
        }
    });
    prepare_rx
}

/// A cut is the group's, not the request's: when the admin client asking for a snapshot is
/// killed mid-cut, the cut still runs to its end and publishes its point, and the next
/// snapshot works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_client_is_gone_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let policy = POLICY.replace("prepare = \"1s\"", "prepare = \"5s\"");
    let c = CoordinatorProc::serving(dir.path(), "g1", &policy);
    // Prepares slowly (a long pre-copy), then answers like a healthy agent.
    let mut prepare_rx = slow_member(&c, Duration::from_millis(1500)).await;
    let mut client = snapshot_client(&c);
    // The cut is under way (the member was asked to prepare): the client goes.
    tokio::time::timeout(Duration::from_secs(20), prepare_rx.recv())
        .await
        .expect("no Prepare reached the member")
        .unwrap();
    client.kill().unwrap();
    client.wait().unwrap();
    let t = std::time::Instant::now();
    while !points(&c).contains("members: slow") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the cut died with its client: {}\n{}",
            points(&c),
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = std::sync::Arc::new(c);
    let out = snapshot(&c).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A member that never answers: every message it receives goes to the returned channel.
async fn silent_member(
    c: &CoordinatorProc,
    name: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<CoordinatorMessage> {
    let mut m = member(c, name).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(msg) = m.next().await {
            let _ = tx.send(msg);
        }
    });
    rx
}

async fn next_message(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<CoordinatorMessage>,
    what: &str,
    pick: impl Fn(&CoordinatorMessage) -> bool,
) -> CoordinatorMessage {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = rx.recv().await.expect("session ended");
            if pick(&m) {
                return m;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} reached the member"))
}

async fn admin(c: &std::sync::Arc<CoordinatorProc>, args: &[&str]) -> (bool, i32, String, String) {
    let (c, args) = (
        c.clone(),
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    );
    let out = tokio::task::spawn_blocking(move || {
        c.admin(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    (
        out.status.success(),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn snapshot_client(c: &CoordinatorProc) -> std::process::Child {
    std::process::Command::new(lifeboat_tests::bin("lifeboat"))
        .args([
            "snapshot",
            "--group",
            "g1",
            "--coordinator",
            &c.addr,
            "--credentials",
        ])
        .arg(c.state_dir.join("admin"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every cut is a job with an id: listed while it runs, cancelled on request (the member is
/// told to abort at once, the waiting client is answered), refused a second cancellation, and
/// kept in the history across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_is_a_job_that_an_admin_can_cancel_and_its_history_outlives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let policy = POLICY.replace("prepare = \"1s\"", "prepare = \"60s\"");
    let c = CoordinatorProc::serving(dir.path(), "g1", &policy);
    let mut hang = silent_member(&c, "hang").await;
    let client = snapshot_client(&c);
    let prepare = next_message(&mut hang, "Prepare", |m| {
        matches!(m, CoordinatorMessage::Prepare { .. })
    })
    .await;
    let CoordinatorMessage::Prepare { cut_id, .. } = prepare else {
        unreachable!()
    };
    let c = std::sync::Arc::new(c);
    let (ok, _, listing, err) = admin(&c, &["jobs", "list", "--running"]).await;
    assert!(ok, "{err}");
    let line = listing
        .lines()
        .find(|l| l.contains("crash-snapshot") && l.contains("running"))
        .unwrap_or_else(|| panic!("the cut is not a running job:\n{listing}"));
    assert!(line.contains("by admin"), "{line}");
    let id = line.split_whitespace().next().unwrap().to_string();

    let cancelled_at = std::time::Instant::now();
    let (ok, _, out, err) = admin(&c, &["jobs", "cancel", "--id", &id]).await;
    assert!(ok && out.contains("cancellation requested"), "{out}{err}");
    // Well before the 60 s prepare deadline: the member is told to abort this cut...
    let abort = next_message(&mut hang, "Abort", |m| {
        matches!(m, CoordinatorMessage::Abort { .. })
    })
    .await;
    assert!(
        matches!(abort, CoordinatorMessage::Abort { cut_id: a, .. } if a == cut_id),
        "{abort:?}"
    );
    // ...and the client that asked for the snapshot is answered.
    let out = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(cancelled_at.elapsed() < Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("job {id} was cancelled")),
        "{stderr}"
    );

    let (ok, code, _, err) = admin(&c, &["jobs", "cancel", "--id", &id]).await;
    assert!(!ok && code == 1, "{err}");
    assert!(err.contains("already ended (cancelled)"), "{err}");
    let (ok, code, _, err) = admin(&c, &["jobs", "cancel", "--id", "999999"]).await;
    assert!(!ok && code == 2, "{err}");
    assert!(err.contains("there is no job 999999"), "{err}");

    // The history survives even a SIGKILL, once written (it is written after every change).
    let history = c.state_dir.join("jobs.json");
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&history).is_ok_and(|h| h.contains("\"cancelled\"")) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "jobs.json never recorded the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = std::sync::Arc::into_inner(c).unwrap();
    c.kill();
    c.start();
    let c = std::sync::Arc::new(c);
    let (ok, _, listing, err) = admin(&c, &["jobs", "list"]).await;
    assert!(ok, "{err}");
    assert!(
        listing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&id) && l.contains("cancelled")),
        "{listing}"
    );
}

/// A stop (SIGTERM) lets a running cut end before the coordinator exits — its members need
/// their sessions for that, so the API serves while jobs drain. Before, the serving loop
/// gave in-flight calls 3 s and then dropped the cut: a point whose members prepared for 4 s
/// was lost, and the members had to abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(windows, ignore = "sends SIGTERM, which Windows lacks")]
async fn a_stopping_coordinator_lets_the_running_cut_publish_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let policy = POLICY.replace("prepare = \"1s\"", "prepare = \"10s\"");
    let mut c = CoordinatorProc::serving(dir.path(), "g1", &policy);
    // Prepares for 4 s (a long pre-copy), then answers like a healthy agent.
    let mut prepare_rx = slow_member(&c, Duration::from_secs(4)).await;
    let client = snapshot_client(&c);
    tokio::time::timeout(Duration::from_secs(20), prepare_rx.recv())
        .await
        .expect("no Prepare reached the member")
        .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let s = c.terminate(Duration::from_secs(60));
        (s, c)
    })
    .await
    .unwrap();
    let (status, mut c) = status;
    assert!(status.is_some_and(|s| s.success()), "{}", c.log_text());
    let out = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}: {stderr}\n{}",
        out.status,
        c.log_text()
    );
    let point = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(points(&c).contains(&point), "{}", points(&c));
    assert!(
        !c.log_text().contains("cut stopped unfinished"),
        "{}",
        c.log_text()
    );
    c.start();
    let c = std::sync::Arc::new(c);
    let (_, _, listing, _) = admin(&c, &["jobs", "list"]).await;
    assert!(
        listing
            .lines()
            .any(|l| l.contains("crash-snapshot") && l.contains("succeeded") && l.contains(&point)),
        "{listing}"
    );
}

/// Regression: the member list was saved on the async workers and two callers dropped a
/// failed save, so a change could live in memory only and vanish at the next restart. A
/// change that cannot be saved is now refused, with the cause, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_change_that_cannot_be_saved_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::serving(dir.path(), "g1", POLICY);
    let (times, _rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(member(&c, "vm1").await.serve(times));
    // members.json replaced by a directory with something in it: no rename can replace it.
    let path = c.state_dir.join("members.json");
    let saved = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("x"), b"x").unwrap();
    let c = std::sync::Arc::new(c);
    let (ok, _, _, err) = admin(&c, &["remove-member", "--vm", "vm1"]).await;
    assert!(!ok, "{err}");
    assert!(err.contains("cannot save members.json"), "{err}");
    let (ok, _, members, err) = admin(&c, &["members"]).await;
    assert!(ok, "{err}");
    assert!(
        members
            .lines()
            .any(|l| l.starts_with("vm1 ") && l.contains("healthy")),
        "{members}"
    );
    // With the file back, the same request works.
    std::fs::remove_dir_all(&path).unwrap();
    std::fs::write(&path, saved).unwrap();
    let (ok, _, _, err) = admin(&c, &["remove-member", "--vm", "vm1"]).await;
    assert!(ok, "{err}");
}
