//! Initial replication shows its progress in `lifeboat-agent status` while it runs.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn status_shows_progress_rate_and_eta_during_initial_replication() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let data: Vec<u8> = (0..(12u32 << 20) / 4)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    std::fs::write(&image, data).unwrap();
    let config = write_config(dir.path(), &disk("img", "image", &image));
    // Slow the upload down so there is progress to watch.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[replication]", "[replication]\nbandwidth_limit = \"2MiB\"");
    std::fs::write(&config, text).unwrap();
    let mut child = spawn_agent(&config, &["sync"]);
    let t0 = Instant::now();
    let mut seen = None;
    while t0.elapsed() < Duration::from_secs(20) && child.try_wait().unwrap().is_none() {
        let out = agent_ok(&config, &["status"]);
        if out.contains("shipping:") && out.contains("MB/s, ETA") && !out.contains("(0.0%)") {
            seen = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let seen = seen.expect("status never showed replication progress");
    assert!(
        seen.contains("disk img: initial replication not finished"),
        "{seen}"
    );
    assert!(seen.contains("of 12582912 bytes shipped"), "{seen}");
    // The upload is the bottleneck here: the scan is ahead, and the difference shows as backlog.
    assert!(!seen.contains("backlog 0 bytes"), "{seen}");
}
