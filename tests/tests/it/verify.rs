//! `lifeboat verify` as a user runs it, on a copy of the committed example store
//! (`store/tests/vectors/store`) in a local directory and on Azurite (a `.toml` store
//! description): exit 0 when clean; a flipped byte in a segment body found only with
//! `--read-data`, named with the points it breaks, exit 1; a missing store or group exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lifeboat_tests::bin;

const GROUP: &str = "vectors";
/// The last name (in name order: numeric and time order) in `dir` of the committed store.
fn newest(dir: &str) -> String {
    let mut names: Vec<String> = std::fs::read_dir(vectors().join("v1/vectors").join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.pop().expect("vectors committed")
}

/// The image disk's newest segment (its third): read by the third point only.
fn segment() -> String {
    let dir = "vms/vm1/disks/os/seg";
    format!("v1/vectors/{dir}/{}", newest(dir))
}

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../store/tests/vectors/store")
}

/// Every object file of the committed store: (object name, bytes).
fn objects() -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            // Object names separate with '/' whatever the platform's path separator.
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if rel.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&vectors(), &vectors(), &mut out);
    assert!(out.len() > 10, "no vectors committed");
    out
}

fn verify(store: &Path, extra: &[&str]) -> (i32, String) {
    let out: Output = Command::new(bin("lifeboat"))
        .arg("verify")
        .arg("--store")
        .arg(store)
        .args(extra)
        .output()
        .expect("spawn lifeboat");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exit code"), text)
}

/// The checks every store goes through; `flip` damages the segment of [`segment`].
fn check(store: &Path, flip: impl FnOnce()) {
    let (code, text) = verify(store, &["--read-data"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("0 damaged, 0 of 3 point(s) broken"), "{text}");
    let (code, text) = verify(store, &["--group", GROUP]);
    assert_eq!(code, 0, "{text}");

    flip();
    // Index and footer are intact: only reading the data finds it.
    let (code, text) = verify(store, &["--group", GROUP]);
    assert_eq!(code, 0, "a payload flip seen without --read-data:\n{text}");
    let (code, text) = verify(store, &["--group", GROUP, "--read-data"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("damaged  {}", segment())), "{text}");
    assert!(text.contains("checksum"), "{text}");
    let broken: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("breaks point(s): "))
        .collect();
    assert_eq!(broken.len(), 1, "{text}");
    assert_eq!(
        broken[0],
        format!("{GROUP}/{}", newest("points").trim_end_matches(".point")),
        "only the third point reads the third segment: {text}"
    );
    assert!(text.contains("1 damaged, 1 of 3 point(s) broken"), "{text}");

    // A group the store does not hold: nothing to verify, exit 2.
    let (code, text) = verify(store, &["--group", "nosuch"]);
    assert_eq!(code, 2, "{text}");
}

#[test]
fn verify_a_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    for (name, bytes) in objects() {
        let p = store.join(&name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let seg = store.join(segment());
    check(&store, || {
        let mut b = std::fs::read(&seg).unwrap();
        b[16] ^= 0x40;
        std::fs::write(&seg, b).unwrap();
    });
    // A store that does not exist, and an empty directory: cannot verify, exit 2.
    let (code, text) = verify(&dir.path().join("missing"), &[]);
    assert_eq!(code, 2, "{text}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, text) = verify(&empty, &[]);
    assert_eq!(code, 2, "{text}");
}

#[test]
fn verify_an_azure_store() {
    use lifeboat_store::backend::azure::{AzureBackend, AzureConfig, EMULATOR_KEY};
    use lifeboat_store::{Backend, ObjectName};
    let Ok(endpoint) = std::env::var("LIFEBOAT_AZURITE") else {
        assert!(
            std::env::var_os("CI").is_none()
                && std::env::var_os("LIFEBOAT_REQUIRE_AZURITE").is_none(),
            "LIFEBOAT_AZURITE is not set: run the tests through scripts/test.sh"
        );
        eprintln!("SKIPPED verify_an_azure_store: no Azurite (scripts/test.sh starts one)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("run-{}", std::process::id());
    let mut cfg = AzureConfig::azurite(&endpoint, "verify-cli");
    cfg.prefix = Some(prefix.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(AzureBackend::open(&cfg)).unwrap();
    for (name, bytes) in objects() {
        let name = ObjectName::new(name).unwrap();
        rt.block_on(backend.delete(&name)).unwrap();
        rt.block_on(backend.put_new(&name, bytes.into())).unwrap();
    }
    let toml = dir.path().join("target.toml");
    std::fs::write(
        &toml,
        format!(
            "kind = \"azure\"\naccount = \"devstoreaccount1\"\ncontainer = \"verify-cli\"\nendpoint = \"{endpoint}\"\nprefix = \"{prefix}\"\ncredential = {{ kind = \"shared_key\", key = \"{EMULATOR_KEY}\" }}\n"
        ),
    )
    .unwrap();
    check(&toml, || {
        let name = ObjectName::new(segment()).unwrap();
        let mut b = rt.block_on(backend.get(&name)).unwrap().to_vec();
        b[16] ^= 0x40;
        rt.block_on(backend.delete(&name)).unwrap();
        rt.block_on(backend.put_new(&name, b.into())).unwrap();
    });
}

fn lifeboat(args: &[&str], paths: &[(&str, &Path)]) -> (i32, String) {
    let mut c = Command::new(bin("lifeboat"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    let out = c.output().expect("spawn lifeboat");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exit code"), text)
}

/// The target scrub (`lifeboat process --scrub`, what the coordinator runs every
/// `scrub_interval`): a flipped byte in a segment body that processing never re-reads is found,
/// the one point that reads it is recorded as damaged (listed so, skipped by `latest-processed`,
/// refused by name) while the others stay restorable, the disk's agent is asked for a new
/// history (its newest tag reads the damage), and once the object is whole again the next
/// scrub clears the record.
#[test]
fn the_scrub_records_damaged_points_and_asks_for_a_new_history() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    for (name, bytes) in objects() {
        let p = target.join(&name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let process = |extra: &[&str]| {
        let mut args = vec!["process", "--group", GROUP];
        args.extend_from_slice(extra);
        lifeboat(&args, &[("--cache", &cache), ("--store", &target)])
    };
    let (code, text) = process(&["--scrub"]);
    assert_eq!(code, 0, "a clean store's scrub failed:\n{text}");
    assert!(text.contains("0 damaged point(s)"), "{text}");

    let seg = target.join(segment());
    let good = std::fs::read(&seg).unwrap();
    let mut bad = good.clone();
    bad[16] ^= 0x40;
    std::fs::write(&seg, &bad).unwrap();
    let third = newest("points").trim_end_matches(".point").to_owned();
    // Before a scrub nothing says so: the point is listed like the others.
    let list =
        |store: &Path| lifeboat(&["points", "list", "--group", GROUP], &[("--store", store)]);
    let (_, text) = list(&target);
    assert!(!text.contains("damaged"), "{text}");

    let (code, text) = process(&["--scrub"]);
    assert_ne!(code, 0, "a scrub that found damage exited 0:\n{text}");
    assert!(text.contains(&format!("damaged point {third}")), "{text}");
    // The point before it does not read the damage: the agent is offered its tag to
    // resynchronise over (a checksum compare) rather than asked for a full copy.
    assert!(
        text.contains("asked vm1/os for a new history over tag"),
        "{text}"
    );
    let record = target.join(format!("v1/{GROUP}/damage/{third}.txt"));
    let why = std::fs::read_to_string(&record).expect("no damage record");
    assert!(
        why.contains(&segment()),
        "the record does not name the object: {why}"
    );
    let mut requests: Vec<String> =
        std::fs::read_dir(cache.join(format!("v1/{GROUP}/vms/vm1/disks/os/resync")))
            .expect("no resync request in the cache store")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
    requests.sort();
    assert!(
        requests.len() == 2
            && requests[0].ends_with(".sums")
            && requests[1] == requests[0].replace(".sums", ".txt"),
        "not one request with its sums: {requests:?}"
    );

    let (_, text) = list(&target);
    let damaged: Vec<&str> = text.lines().filter(|l| l.contains("damaged")).collect();
    assert!(
        damaged.len() == 1 && damaged[0].contains(&third),
        "points list does not show exactly the scrub's finding:\n{text}"
    );
    let out = dir.path().join("failover");
    let (code, text) = lifeboat(
        &[
            "test-failover",
            "--group",
            GROUP,
            "--point",
            "latest-processed",
        ],
        &[("--store", &target), ("--to", &out)],
    );
    assert_eq!(code, 0, "the intact points no longer fail over:\n{text}");
    assert!(
        text.contains(&format!("skipping damaged point {third}")),
        "{text}"
    );
    let report = std::fs::read_to_string(out.join("failover-report.json")).unwrap();
    assert!(
        report.contains(&nth_point(1)),
        "latest-processed did not fall back to the second point: {report}"
    );
    let (code, text) = lifeboat(
        &["test-failover", "--group", GROUP, "--point", &third],
        &[("--store", &target), ("--to", &dir.path().join("named"))],
    );
    assert_ne!(
        code, 0,
        "a named failover to the damaged point succeeded:\n{text}"
    );
    assert!(text.contains("damaged"), "{text}");

    // Mended (say, copied back from a replica): the next scrub clears the record.
    std::fs::write(&seg, &good).unwrap();
    let (code, text) = process(&["--scrub"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 damage record(s) cleared"), "{text}");
    assert!(!record.exists());
    let (_, text) = list(&target);
    assert!(!text.contains("damaged"), "{text}");

    // Damage only an old tag reads (the first segment, which the base at the second tag
    // replaced for later tags): that point is recorded, and no new history is asked for.
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    let first_seg = target.join(format!(
        "v1/{GROUP}/vms/vm1/disks/os/seg/{}",
        oldest("vms/vm1/disks/os/seg")
    ));
    let mut b = std::fs::read(&first_seg).unwrap();
    b[16] ^= 0x40;
    std::fs::write(&first_seg, b).unwrap();
    let (code, text) = process(&["--scrub"]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains(&format!("damaged point {}", nth_point(0))),
        "{text}"
    );
    assert!(
        !text.contains("asked vm1/os"),
        "a resync for damage the newest tag does not read:\n{text}"
    );
    assert!(
        !cache
            .join(format!("v1/{GROUP}/vms/vm1/disks/os/resync"))
            .exists(),
        "a resync request for damage the newest tag does not read"
    );
    let (_, text) = list(&target);
    assert_eq!(
        text.lines().filter(|l| l.contains("damaged")).count(),
        1,
        "{text}"
    );
}

/// The `i`th point id (0 = oldest) of the committed store.
fn nth_point(i: usize) -> String {
    let mut names: Vec<String> = std::fs::read_dir(vectors().join("v1/vectors/points"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names[i].trim_end_matches(".point").to_owned()
}

/// The first name (in name order) in `dir` of the committed store.
fn oldest(dir: &str) -> String {
    let mut names: Vec<String> = std::fs::read_dir(vectors().join("v1/vectors").join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.swap_remove(0)
}
