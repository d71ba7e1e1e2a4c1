//! `lifeboat-agent run`: cycles on its timer, picks up changes, idles at ~0 CPU between cycles
//! (no busy polling), and stops cleanly on SIGTERM.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
#[cfg_attr(
    windows,
    ignore = "reads the agent's CPU time from /proc and stops it with SIGTERM: Linux only"
)]
fn run_cycles_idles_quietly_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a"), b"first").unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![3u8; 4 << 20]).unwrap();
    let config = write_config(
        dir.path(),
        &[
            disk("data", "directory", &data),
            disk("img", "image", &image),
        ]
        .concat(),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[replication]",
        "[replication]\ninterval = \"10s\"\nverify_interval = \"1h\"",
    );
    std::fs::write(&config, text).unwrap();
    let mut child = spawn_agent(&config, &["run"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&dir.path().join("store"), "g");
    let wait_points = |n: usize| {
        let t0 = Instant::now();
        loop {
            let points = rt.block_on(reader.points()).unwrap_or_default();
            if points.len() >= n {
                return points;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(40),
                "no point {n} from `run`"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_points(1);
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(6));
    let idle_ticks = cpu_ticks(child.id()) - before;
    assert!(
        idle_ticks <= 3,
        "an idle agent used {idle_ticks} CPU ticks (1/100 s) in 6 s between cycles"
    );

    // One agent per state directory: a second one is refused and changes nothing (it would
    // interleave tags, and thaw the first one's freeze as a leftover).
    let second = agent(&config, &["sync"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another lifeboat-agent is using state directory"),
        "{err}"
    );

    std::fs::write(data.join("a"), b"second").unwrap();
    let points = wait_points(2);
    let restored = dir.path().join("restored");
    rt.block_on(restore_point(&reader, points.last().unwrap(), &restored));
    assert_eq!(std::fs::read(restored.join("data/a")).unwrap(), b"second");

    // SIGTERM, as systemd sends it.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "run did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "run exited with {status} on SIGTERM");
}
