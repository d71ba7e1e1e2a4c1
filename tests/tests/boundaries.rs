//! The crate boundaries ARCHITECTURE.md states as absences, checked from `cargo metadata`
//! (the workspace's own manifests; normal dependencies, followed through workspace crates):
//! a boundary that is only written down erodes with the first convenient import.

use std::collections::{BTreeMap, BTreeSet};

/// Per workspace crate, its normal (not dev or build) dependencies by name.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut deps = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let names = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect();
        deps.insert(p["name"].as_str().unwrap().to_owned(), names);
    }
    deps
}

/// Everything `krate` depends on, through workspace crates.
fn reach(deps: &BTreeMap<String, BTreeSet<String>>, krate: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![krate.to_owned()];
    while let Some(k) = todo.pop() {
        for d in deps.get(&k).into_iter().flatten() {
            if seen.insert(d.clone()) && deps.contains_key(d) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
#[cfg_attr(
    windows,
    ignore = "runs cargo metadata, which the Windows test run (under wine) lacks; the manifests are the same on every platform and checked on Linux"
)]
fn the_stated_boundaries_hold() {
    let deps = dependencies();
    for k in [
        "lifeboat-store",
        "lifeboat-proto",
        "lifeboat-dr",
        "lifeboat-agent",
        "lifeboat-coordinator",
        "lifeboat-cli",
    ] {
        assert!(deps.contains_key(k), "no workspace crate {k}: {deps:?}");
    }
    let rpc = ["tonic", "prost", "lifeboat-proto"];
    // (crate, what it never depends on, why)
    let rules: &[(&str, &[&str], &str)] = &[
        (
            "lifeboat-store",
            &[
                "lifeboat-proto",
                "lifeboat-dr",
                "lifeboat-agent",
                "lifeboat-coordinator",
                "lifeboat-cli",
                "tonic",
                "prost",
            ],
            "the store format is read and written with no network protocol",
        ),
        (
            "lifeboat-dr",
            &["lifeboat-agent", "lifeboat-coordinator", "lifeboat-cli"],
            "the DR data plane works with the coordinator gone",
        ),
        ("lifeboat-dr", &rpc, "the DR data plane speaks no gRPC"),
        (
            "lifeboat-cli",
            &["lifeboat-coordinator", "lifeboat-agent"],
            "the CLI works with the coordinator gone and never links its server",
        ),
        (
            "lifeboat-agent",
            &["lifeboat-coordinator", "lifeboat-dr", "lifeboat-cli"],
            "an agent only speaks the protocol",
        ),
        (
            "lifeboat-coordinator",
            &["lifeboat-agent", "lifeboat-cli"],
            "the server links neither the agent nor the CLI",
        ),
        (
            "lifeboat-proto",
            &[
                "lifeboat-dr",
                "lifeboat-agent",
                "lifeboat-coordinator",
                "lifeboat-cli",
            ],
            "the protocol depends on no side of it",
        ),
    ];
    for (krate, never, why) in rules {
        let reached = reach(&deps, krate);
        for n in *never {
            assert!(
                !reached.contains(*n),
                "{krate} depends on {n}, but {why} (ARCHITECTURE.md, boundaries)"
            );
        }
    }
    // The test can fail: the coordinator does reach the data plane and the protocol.
    let coordinator = reach(&deps, "lifeboat-coordinator");
    assert!(coordinator.contains("lifeboat-dr") && coordinator.contains("tonic"));
}
