//! `lifeboat-agent check`: passes on a good set-up; each broken piece fails with a fix.

use crate::common::*;

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {:?}\n",
            dir.path().join("data")
        ),
    );
    (dir, config)
}

fn check(config: &std::path::Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(AGENT)
        .arg("--config")
        .arg(config)
        .arg("check")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn a_good_setup_passes_every_check() {
    let (_dir, config) = setup();
    let (ok, out) = check(&config, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("ok   cache store"), "{out}");
    // The probe object was removed again.
    let probes = _dir.path().join("store/v1/g/probes");
    assert!(
        std::fs::read_dir(&probes)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true)
    );
}

#[test]
fn an_authenticating_proxy_is_refused() {
    let (_dir, config) = setup();
    let out = std::process::Command::new(AGENT)
        .arg("--config")
        .arg(&config)
        .arg("check")
        .env("HTTPS_PROXY", "http://user:secret@proxy.example:3128")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("authentication proxies are not supported"),
        "{text}"
    );
    assert!(
        !text.contains("secret"),
        "the proxy password was printed: {text}"
    );
}

#[test]
fn a_missing_disk_and_an_unreachable_coordinator_fail_with_fixes() {
    let (dir, config) = setup();
    std::fs::remove_dir(dir.path().join("data")).unwrap();
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "state_dir",
        &format!("coordinator = \"127.0.0.1:{port}\"\nstate_dir"),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let (ok, out) = check(&config, &[]);
    assert!(!ok);
    assert!(
        out.contains("FAIL disk") && out.contains("fix `path`"),
        "{out}"
    );
    assert!(
        out.contains("FAIL coordinator") && out.contains("port 20004"),
        "{out}"
    );
    // With a listener there, the coordinator check passes.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (_, out) = check(&config, &[]);
    assert!(out.contains("ok   coordinator"), "{out}");
    drop(listener);
}
