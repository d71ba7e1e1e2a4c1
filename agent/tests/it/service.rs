//! The agent as a service: on Windows under the service control manager (wine's in CI, the
//! real one on a VM), installed, started and stopped the way an administrator does it; on
//! Linux the `service` command is refused (systemd runs `run`; see the package test).

#[cfg(windows)]
use std::path::Path;
#[cfg(windows)]
use std::time::{Duration, Instant};

use crate::common::*;

#[cfg(not(windows))]
#[test]
fn the_windows_service_command_is_refused_elsewhere_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = write_config(
        dir.path(),
        &format!("[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {data:?}\n"),
    );
    for action in ["run", "install", "uninstall"] {
        let out = agent(&config, &["service", action]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("is for Windows"), "{stderr}");
        assert!(stderr.contains("lifeboat-agent run"), "{stderr}");
    }
    assert!(!dir.path().join("state").exists());
}

/// `sc` with `args`: its output (stdout, then stderr), and whether it succeeded.
#[cfg(windows)]
fn sc(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("sc")
        .args(args)
        .output()
        .expect("run sc");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Asks with `sc` (start, stop) until the service is in one of `states`: under load, wine's
/// `sc` sometimes answers nothing at all (seen in CI), so one unanswered request is not the
/// service's failure. A real refusal shows as the state never coming.
#[cfg(windows)]
fn sc_until(args: &[&str], name: &str, states: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        let (_, out) = sc(args);
        let settle = Instant::now() + Duration::from_secs(5);
        while Instant::now() < settle {
            let (s, q) = state(name);
            if s.as_deref().is_some_and(|s| states.contains(&s)) {
                return;
            }
            last = format!("sc {args:?}: {out}\nsc query: {q}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            Instant::now() < deadline,
            "{name} not in {states:?} within {limit:?}; last: {last}"
        );
    }
}

/// The service's state as `sc query` names it (`RUNNING`, `STOPPED`…), and the full answer.
#[cfg(windows)]
fn state(name: &str) -> (Option<String>, String) {
    let (_, out) = sc(&["query", name]);
    let state = out
        .lines()
        .find(|l| l.trim_start().starts_with("STATE"))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_owned);
    (state, out)
}

#[cfg(windows)]
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The point `status.json` names as the last one published, if any.
#[cfg(windows)]
fn last_point(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state_dir.join("status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["last_point"].as_str().map(str::to_owned)
}

/// Removes the test's service however the test ends, so no later run of the prefix starts it.
#[cfg(windows)]
struct Installed<'a> {
    config: &'a Path,
    name: &'a str,
}

#[cfg(windows)]
impl Drop for Installed<'_> {
    fn drop(&mut self) {
        // Not `agent`, which panics when the process cannot start: a panic while a failed
        // test unwinds would abort the whole binary without the failure's message.
        // Bounded: a hung `uninstall` under wine must not hang the binary past its report.
        let Ok(mut child) = std::process::Command::new(AGENT)
            .arg("--config")
            .arg(self.config)
            .args(["service", "uninstall", "--name", self.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A service test's config: `write_config`'s with the directory disk `data` at `data`,
/// cycles every 10 s and `extra` replication settings. Written again by each call.
#[cfg(windows)]
fn service_config(dir: &Path, data: &Path, extra: &str) -> std::path::PathBuf {
    let config = write_config(
        dir,
        &format!("[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {data:?}\n"),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[replication]",
        &format!("[replication]\ninterval = \"10s\"\n{extra}"),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Registers the agent as service `name` (manual start) and starts it with `sc start`; the
/// guard removes it however the test ends. Waits up to 65 s.
#[cfg(windows)]
fn install_and_start<'a>(config: &'a Path, name: &'a str) -> Installed<'a> {
    agent_ok(config, &["service", "install", "--name", name, "--manual"]);
    let installed = Installed { config, name };
    wait_for("registered, stopped", Duration::from_secs(20), || {
        state(name).0.as_deref() == Some("STOPPED")
    });
    start(name);
    installed
}

/// `sc start` until the manager says starting or running (up to 45 s).
#[cfg(windows)]
fn start(name: &str) {
    sc_until(
        &["start", name],
        name,
        &["START_PENDING", "RUNNING"],
        Duration::from_secs(40),
    );
}

/// `sc stop` until stopped (up to 75 s); the service must report exit code 0, its own and
/// Windows'.
#[cfg(windows)]
fn stop_cleanly(name: &str) {
    sc_until(
        &["stop", name],
        name,
        &["STOP_PENDING", "STOPPED"],
        Duration::from_secs(30),
    );
    wait_for("stopped", Duration::from_secs(40), || {
        state(name).0.as_deref() == Some("STOPPED")
    });
    let (_, q) = state(name);
    let exit = |key: &str| {
        q.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_owned)
    };
    assert_eq!(exit("WIN32_EXIT_CODE").as_deref(), Some("0"), "{q}");
    assert_eq!(exit("SERVICE_EXIT_CODE").as_deref(), Some("0"), "{q}");
}

/// Installed with `service install`, started with `sc start`: the service reports running,
/// publishes points that restore to the source's bytes (a file written while it runs is in a
/// later point), and stops on `sc stop` with exit code 0 and its log saying so; `service
/// uninstall` removes it. Run from a console, `service run` fails with a clear error and
/// writes nothing. `scripts/test-windows` runs it alone under its own timeout (300 s), which
/// its waits (about 260 s) fit, so a slow failure still says which wait ran out (a passing
/// run takes about 20 s).
#[cfg(windows)]
#[test]
fn the_agent_runs_as_a_windows_service_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("first.txt"), random_bytes(100_000, 1)).unwrap();
    let state_dir = dir.path().join("state");
    let config = service_config(dir.path(), &data, "");

    // Not under the service manager: refused at once, nothing written.
    let out = agent(&config, &["service", "run"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the service control manager"),
        "{stderr}"
    );
    assert!(!state_dir.exists(), "service run outside the manager wrote");

    let name = format!("LifeboatTest{}", std::process::id());
    let _installed = install_and_start(&config, &name);
    wait_for("running", Duration::from_secs(40), || {
        state(&name).0.as_deref() == Some("RUNNING")
    });
    wait_for("a first point", Duration::from_secs(40), || {
        last_point(&state_dir).is_some()
    });
    let first = last_point(&state_dir).unwrap();
    std::fs::write(data.join("second.txt"), random_bytes(50_000, 2)).unwrap();
    let mut second = String::new();
    wait_for("a later point", Duration::from_secs(40), || {
        second = last_point(&state_dir).unwrap();
        second != first
    });

    stop_cleanly(&name);
    let log = std::fs::read_to_string(state_dir.join("agent.log")).unwrap();
    assert!(log.contains("starting as a Windows service"), "{log}");
    assert!(log.contains("asks the agent to stop"), "{log}");
    assert!(log.contains("the service stopped"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");

    // What the service published restores to the source, byte for byte.
    let out = dir.path().join("restored");
    restore_id(dir.path(), &second, &out);
    assert_same_tree(&data, &out.join("data"));

    let removed = agent_ok(&config, &["service", "uninstall", "--name", &name]);
    assert!(removed.contains("removed service"), "{removed}");
    let (ok, q) = sc(&["query", &name]);
    assert!(!ok, "the service is still registered: {q}");
}

/// Files under `dir`, at any depth.
#[cfg(windows)]
fn walkdir_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter_map(Result::ok)
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walkdir_files(&e.path()),
                Ok(_) => 1,
                Err(_) => 0,
            })
            .sum()
    })
}

/// The disk's phase in `status.json` ("shipping", "idle"…), if the agent wrote it.
#[cfg(windows)]
fn disk_phase(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state_dir.join("status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["disks"]["data"]["phase"].as_str().map(str::to_owned)
}

/// `sc stop` while the service ships a cut (held slow by the bandwidth limit): it stops
/// cleanly (exit code 0, its log saying so) without finishing that cut and publishes nothing
/// half-made; started again (without the limit) it resumes and publishes a point that
/// restores to the source byte for byte. `scripts/test-windows` runs it alone under its own
/// timeout (300 s), which its waits (about 265 s) fit.
#[cfg(windows)]
#[test]
fn a_service_stopped_mid_shipment_publishes_nothing_half_made_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Incompressible: about 15 s at 64 KiB/s.
    std::fs::write(data.join("big.bin"), random_bytes(1 << 20, 7)).unwrap();
    let state_dir = dir.path().join("state");
    let config = service_config(dir.path(), &data, r#"bandwidth_limit = "64KiB""#);
    let name = format!("LifeboatStop{}", std::process::id());
    let _installed = install_and_start(&config, &name);
    // The limit holds the cut after its segment is stored, before its tag and point: the
    // stop comes with the segment in the store and nothing that publishes it.
    let segments = dir.path().join("store/v1/g/vms/vm1/disks/data/seg");
    let stored = || {
        std::fs::read_dir(&segments).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .count()
        })
    };
    wait_for("a segment stored", Duration::from_secs(40), || stored() > 0);
    assert_eq!(
        disk_phase(&state_dir).as_deref(),
        Some("shipping"),
        "the cut is not held where the test stops it"
    );
    stop_cleanly(&name);
    // The stop did not wait for the shipment: its segment is there, unpublished (no tag, no
    // point), and the log says the cycle resumes.
    assert!(stored() > 0);
    assert_eq!(
        last_point(&state_dir),
        None,
        "the interrupted cut published"
    );
    let empty = |sub: &str| {
        let d = dir.path().join("store/v1/g").join(sub);
        !d.exists() || walkdir_files(&d) == 0
    };
    assert!(empty("points"), "a point was published");
    assert!(
        empty("vms/vm1/disks/data/tag"),
        "the interrupted cut was tagged"
    );
    let log = std::fs::read_to_string(state_dir.join("agent.log")).unwrap();
    assert!(log.contains("asks the agent to stop"), "{log}");
    assert!(
        log.contains("the cycle in progress resumes at the next start"),
        "{log}"
    );
    assert!(log.contains("the service stopped"), "{log}");

    // Started again without the limit: the cut completes and restores to the source.
    service_config(dir.path(), &data, "");
    start(&name);
    wait_for("a point after the restart", Duration::from_secs(40), || {
        last_point(&state_dir).is_some()
    });
    let point = last_point(&state_dir).unwrap();
    let out = dir.path().join("restored");
    restore_id(dir.path(), &point, &out);
    assert_same_tree(&data, &out.join("data"));
    let log = std::fs::read_to_string(state_dir.join("agent.log")).unwrap();
    assert!(!log.contains("ERROR"), "{log}");
}

/// `consistency = "vss"` names Windows' shadow copy service: on Linux the config is refused
/// (exit 2) with what to use instead, and nothing is written.
#[cfg(not(windows))]
#[test]
fn a_vss_disk_is_refused_on_linux_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {data:?}\nconsistency = \"vss\"\n"
        ),
    );
    for cmd in ["sync", "check-config", "run"] {
        let out = agent(&config, &[cmd]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Volume Shadow Copy"), "{stderr}");
        assert!(stderr.contains("fsfreeze"), "{stderr}");
    }
    assert!(!dir.path().join("state").exists());
    assert!(!dir.path().join("store").exists());
}

/// Where the shadow copy service cannot make copies (wine implements none of it), a `vss`
/// disk's cut fails with the failing call and its HRESULT and publishes nothing (the
/// pre-copy is kept for the next cycle); `check` says the same. On a real Windows VM this
/// test has nothing to show and says so. (The order of a backup and its clean-up at every
/// failing step are the unit tests' in `agent/src/vss.rs`.)
#[cfg(windows)]
#[test]
fn a_vss_disk_without_a_shadow_copy_service_fails_its_cut_cleanly() {
    if std::env::var_os("WINEPREFIX").is_none() {
        eprintln!("skipped: this Windows has a shadow copy service (the test is for wine)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("db.bin"), random_bytes(200_000, 3)).unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {data:?}\nconsistency = \"vss\"\n"
        ),
    );
    let out = agent(&config, &["sync"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CreateVssBackupComponents") && stderr.contains("HRESULT 0x"),
        "{stderr}"
    );
    assert!(stderr.contains("cut abandoned"), "{stderr}");
    let points = dir.path().join("store").join("v1").join("g").join("points");
    assert!(
        !points.exists() || std::fs::read_dir(&points).unwrap().next().is_none(),
        "a point was published"
    );
    let out = agent(&config, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL disk") && stdout.contains("CreateVssBackupComponents"),
        "{stdout}"
    );
}
