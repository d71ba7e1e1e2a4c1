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
    // Nothing ships the test tools.
    for k in [
        "lifeboat-store",
        "lifeboat-dr",
        "lifeboat-agent",
        "lifeboat-coordinator",
        "lifeboat-cli",
    ] {
        assert!(
            !reach(&deps, k).contains("lifeboat-sim"),
            "{k} depends on lifeboat-sim"
        );
    }
}

/// Words that mean the wire layer: the generated types and gRPC's status.
const WIRE: &[&str] = &[
    "pb::",
    "lifeboat_proto::pb",
    "tonic::Status",
    "Status::",
    "tonic::Request",
    "tonic::Response",
];

/// Lines of `text` that use the wire layer, outside comments.
fn wire_uses(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .filter(|l| {
            // tonic's transport (connection info for the listener) is not the wire layer.
            (l.contains("tonic::") && !l.contains("tonic::transport"))
                || WIRE.iter().any(|w| {
                    // Whole words only: `ProcessingStatus::` is a domain type.
                    l.match_indices(w).any(|(i, _)| {
                        !l[..i]
                            .chars()
                            .next_back()
                            .is_some_and(|c| c.is_alphanumeric() || c == '_')
                    })
                })
        })
        .map(str::to_owned)
        .collect()
}

/// In the coordinator, `api/` alone touches `pb` and `tonic::Status`: the group, jobs, the
/// hub and the serving loop speak domain types, so a second front end (metrics, a dashboard)
/// or another transport reuses them as they are.
#[test]
fn only_the_coordinators_api_layer_touches_wire_types() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../coordinator/src");
    let mut checked = 0;
    let mut api_uses = 0;
    let mut todo = vec![src.clone()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let uses = wire_uses(&std::fs::read_to_string(&p).unwrap());
            let rel = p.strip_prefix(&src).unwrap();
            if rel.starts_with("api") {
                api_uses += uses.len();
            } else {
                assert!(
                    uses.is_empty(),
                    "{} uses wire types outside api/ (ARCHITECTURE.md, boundaries):\n{}",
                    rel.display(),
                    uses.join("\n")
                );
            }
            checked += 1;
        }
    }
    // The test can fail: it read the crate, and api/ is where the wire types are.
    assert!(checked >= 10, "read {checked} files of {}", src.display());
    assert!(api_uses > 20, "api/ uses wire types {api_uses} times");
    assert_eq!(wire_uses("let s = Status::internal(\"x\");").len(), 1);
    assert!(wire_uses("let s = ProcessingStatus::default();").is_empty());
    assert_eq!(wire_uses("use tonic::{Request, Status};").len(), 1);
    assert!(wire_uses("use tonic::transport::server::Connected;").is_empty());
}
