//! `lifeboat`'s exit codes as scripts rely on them: 0 success, 2 bad usage or input; and its
//! own crate's integration test, so `cargo test --workspace` builds the binary every other
//! crate's end-to-end tests run.

use std::process::Command;

const LIFEBOAT: &str = env!("CARGO_BIN_EXE_lifeboat");

#[test]
fn help_succeeds_and_bad_usage_is_exit_2() {
    let out = Command::new(LIFEBOAT).arg("--help").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for command in [
        "points", "process", "prune", "failover", "verify", "snapshot",
    ] {
        assert!(text.contains(command), "--help lacks {command}: {text}");
    }
    let out = Command::new(LIFEBOAT)
        .arg("no-such-command")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let dir = tempfile::tempdir().unwrap();
    // A store that does not exist: bad input, exit 2, nothing created.
    let missing = dir.path().join("missing");
    let out = Command::new(LIFEBOAT)
        .args(["points", "list", "--group", "g", "--store"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        !missing.exists(),
        "a listing created the store it was pointed at"
    );
}
