//! Helpers for the agent's end-to-end tests: run the real `lifeboat-agent` binary, make
//! loop-mounted filesystems (root only), restore points through the store library.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use lifeboat_store::backend::local::LocalBackend;
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::RecoveryPoint;
use lifeboat_store::restore::{StoreReader, restore_disk};
use lifeboat_store::{DynBackend, GroupId};

#[allow(unused_imports)]
pub use lifeboat_tests::{LoopFs, assert_same_tree, copy_tree, random_bytes, root_or_skip, run};

pub const AGENT: &str = env!("CARGO_BIN_EXE_lifeboat-agent");

/// Runs the agent with a config; returns its output.
pub fn agent(config: &Path, args: &[&str]) -> Output {
    let run = || {
        Command::new(AGENT)
            .arg("--config")
            .arg(config)
            .args(args)
            .env("LIFEBOAT_LOG", "info")
            .output()
    };
    match run() {
        // Wine's process creation once failed with ERROR_INTERNAL_ERROR (the new process died
        // before it began, not the agent's doing): asked again, once.
        Err(e) if cfg!(windows) && e.raw_os_error() == Some(1359) => run(),
        other => other,
    }
    .expect("run lifeboat-agent")
}

/// Runs the agent and insists it succeeded.
pub fn agent_ok(config: &Path, args: &[&str]) -> String {
    let out = agent(config, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lifeboat-agent {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A reader over a local store for group `group`.
pub fn reader(store: &Path, group: &str) -> StoreReader {
    let backend: DynBackend = Arc::new(LocalBackend::open(store).unwrap());
    StoreReader::new(backend, Layout::new(GroupId::new(group).unwrap()))
}

/// Restores every disk of the only member of `point` under `out/<disk>`.
pub async fn restore_point(reader: &StoreReader, point: &RecoveryPoint, out: &Path) {
    let m = &point.members[0];
    std::fs::create_dir_all(out).unwrap();
    for d in &m.disks {
        let tag = reader.tag(&m.vm, &d.disk, d.tag).await.unwrap();
        restore_disk(reader, &tag, &out.join(d.disk.as_str()))
            .await
            .unwrap();
    }
}

/// Writes an agent config.
pub fn write_config(dir: &Path, disks: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"vm = "vm1"
group = "g"
state_dir = {state:?}
# Never the host's installed thaw guard (another build): the child watchdog, unless a test
# sets up its own guard.
thaw_guard = {guard:?}

[store]
kind = "local"
path = {store:?}

[replication]
segment_size = "1MiB"
memory_cap = "64MiB"

{disks}
"#,
            state = dir.join("state"),
            guard = dir.join("no-thaw-guard.sock"),
            store = dir.join("store")
        ),
    )
    .unwrap();
    path
}

/// Value of `key=` in the agent's output (e.g. `frozen_at_ms`).
pub fn field(out: &str, key: &str) -> Option<u64> {
    let at = out.find(&format!("{key}="))? + key.len() + 1;
    out[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

/// The id in "published recovery point <id>".
pub fn point_id(out: &str) -> String {
    out.split("published recovery point ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("a published point")
        .to_owned()
}

/// Starts the agent in the background, output discarded (for tests that kill it).
pub fn spawn_agent(config: &Path, args: &[&str]) -> std::process::Child {
    Command::new(AGENT)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start lifeboat-agent")
}

/// Restores point `id` of group "g" from the local store under `dir/store` into `out`.
pub fn restore_id(dir: &Path, id: &str, out: &Path) -> RecoveryPoint {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = reader(&dir.join("store"), "g");
    rt.block_on(async {
        let p = reader
            .point(&lifeboat_store::PointId::new(id).unwrap())
            .await
            .unwrap();
        restore_point(&reader, &p, out).await;
        p
    })
}

/// A `[[disk]]` table for `write_config`, with no consistency provider.
pub fn disk(id: &str, kind: &str, path: &Path) -> String {
    format!(
        "[[disk]]\nid = \"{id}\"\nkind = \"{kind}\"\npath = {:?}\n\n",
        path.display()
    )
}

/// The capture's changed-block count in `sync`'s output ("capture read B bytes / N changed
/// blocks").
pub fn changed_blocks(out: &str) -> u64 {
    out.split("capture read ")
        .nth(1)
        .and_then(|r| r.split(" / ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("changed block count")
}
