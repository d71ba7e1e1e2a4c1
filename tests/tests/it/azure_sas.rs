//! Least privilege on Azure Blob (Azurite): each component works with the SAS rights
//! `docs/azure.md` lists for it, and one right fewer fails with an error naming it that
//! changes nothing. Tokens are service SAS tokens for one container, signed here with
//! Azurite's well-known account key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use lifeboat_store::backend::Init;
use lifeboat_store::backend::azure::{
    AzureConfig, AzureCredential, EMULATOR_ACCOUNT, EMULATOR_KEY,
};
use lifeboat_store::{ErrorKind, ObjectName, Secret, StoreConfig};
use lifeboat_tests::{bin, random_bytes};

/// The SAS version the tokens are signed for: the one `object_store` speaks, which the
/// pinned Azurite (3.37) accepts.
const SV: &str = "2023-11-03";

/// Azurite's endpoint when `scripts/test.sh` started one; `None` (the test skips) outside it.
fn azurite(test: &str) -> Option<String> {
    match std::env::var("LIFEBOAT_AZURITE") {
        Ok(endpoint) => Some(endpoint),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none()
                    && std::env::var_os("LIFEBOAT_REQUIRE_AZURITE").is_none(),
                "LIFEBOAT_AZURITE is not set: run the tests through scripts/test.sh"
            );
            eprintln!("SKIPPED {test}: no Azurite (scripts/test.sh starts one)");
            None
        }
    }
}

/// A service SAS for `container` granting `perms` (e.g. `rl`), valid until 2099: the string
/// to sign of service SAS versions 2020-12-06 and later, HMAC-SHA256 with the account key.
fn sas(container: &str, perms: &str) -> String {
    let expiry = "2099-01-01T00:00:00Z";
    let resource = format!("/blob/{EMULATOR_ACCOUNT}/{container}");
    // sp, st, se, resource, si, sip, spr, sv, sr, snapshot, ses, rscc, rscd, rsce, rscl, rsct
    let fields = [
        perms, "", expiry, &resource, "", "", "", SV, "c", "", "", "", "", "", "", "",
    ];
    let key = base64::engine::general_purpose::STANDARD
        .decode(EMULATOR_KEY)
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(fields.join("\n").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let enc = |s: &str| {
        s.replace('%', "%25")
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
            .replace(':', "%3A")
    };
    format!(
        "sv={SV}&se={}&sr=c&sp={perms}&sig={}",
        enc(expiry),
        enc(&sig)
    )
}

/// An account SAS for the blob service granting `perms` on resource types `srt` (`c`:
/// containers, `o`: objects): what may create containers.
fn account_sas(perms: &str, srt: &str) -> String {
    let expiry = "2099-01-01T00:00:00Z";
    // account, sp, ss, srt, st, se, sip, spr, sv, ses, and a final newline
    let fields = [
        EMULATOR_ACCOUNT,
        perms,
        "b",
        srt,
        "",
        expiry,
        "",
        "",
        SV,
        "",
        "",
    ];
    let key = base64::engine::general_purpose::STANDARD
        .decode(EMULATOR_KEY)
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(fields.join("\n").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let enc = |s: &str| {
        s.replace('%', "%25")
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
            .replace(':', "%3A")
    };
    format!(
        "sv={SV}&ss=b&srt={srt}&sp={perms}&se={}&sig={}",
        enc(expiry),
        enc(&sig)
    )
}

fn config(endpoint: &str, container: &str, perms: Option<&str>) -> AzureConfig {
    let mut cfg = AzureConfig::azurite(endpoint, container);
    if let Some(p) = perms {
        cfg.credential = AzureCredential::Sas {
            token: Secret::new(sas(container, p)),
        };
    }
    cfg
}

/// A store description for `--store` and `[store]`: the account key when `perms` is `None`.
fn toml_for(endpoint: &str, container: &str, perms: Option<&str>) -> String {
    let credential = match perms {
        None => format!("{{ kind = \"shared_key\", key = \"{EMULATOR_KEY}\" }}"),
        Some(p) => format!("{{ kind = \"sas\", token = {:?} }}", sas(container, p)),
    };
    format!(
        "kind = \"azure\"\naccount = \"{EMULATOR_ACCOUNT}\"\ncontainer = \"{container}\"\nendpoint = \"{endpoint}\"\ncredential = {credential}\n"
    )
}

fn write_toml(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Every object in the container, by the account key: what "changes nothing" is checked on.
fn objects(rt: &tokio::runtime::Runtime, endpoint: &str, container: &str) -> Vec<String> {
    rt.block_on(async {
        let b = StoreConfig::Azure(config(endpoint, container, None))
            .open_read_only()
            .await
            .unwrap();
        b.list(&ObjectName::new("v1").unwrap())
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name.as_str().to_owned())
            .collect()
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", text(&out));
    text(&out)
}

fn lifeboat(args: &[&str]) -> Output {
    Command::new(bin("lifeboat")).args(args).output().unwrap()
}

fn agent(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("lifeboat-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn unique(what: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(std::time::SystemTime::now()) & 0xffff_ffff;
    format!("{what}{}x{r:x}", std::process::id())
}

/// The store layer: opens need read and list only, a read-only open never creates, a writer
/// with a container SAS cannot create and says how, and each refused operation names the
/// right it lacks and changes nothing. Also checks that Azurite enforces the rights relied on.
#[test]
fn store_operations_need_exactly_their_rights() {
    let Some(endpoint) = azurite("store_operations_need_exactly_their_rights") else {
        return;
    };
    let container = unique("sasstore");
    let rt = rt();
    let store = |perms: Option<&str>| StoreConfig::Azure(config(&endpoint, &container, perms));
    let name = ObjectName::new("v1/g/x").unwrap();
    rt.block_on(async {
        // Missing container: a reader is told, and nothing is created.
        let err = store(Some("rl")).open_read_only().await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&container), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
        assert!(msg.contains("lifeboat store init"), "{msg}");
        // A writer with a container SAS (it may not create containers) is told the same.
        let err = store(Some("rwdl")).open().await.unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind, ErrorKind::Denied, "{msg}");
        assert!(
            msg.contains(&container) && msg.contains("lifeboat store init"),
            "{msg}"
        );
        // `init` with the container SAS cannot either; with the account key it creates, once.
        assert!(store(Some("rwdl")).init().await.is_err());
        assert_eq!(store(None).init().await.unwrap(), Init::Created);
        assert_eq!(store(None).init().await.unwrap(), Init::Existed);
        assert_eq!(store(Some("rl")).init().await.unwrap(), Init::Existed);

        // A writer whose credential may create containers (an account SAS with container
        // rights) creates a missing one itself; one without them is refused.
        let other = unique("sasacct");
        let with_account_sas = |perms: &str| {
            let mut cfg = config(&endpoint, &other, None);
            cfg.credential = AzureCredential::Sas {
                token: Secret::new(account_sas(perms, "co")),
            };
            StoreConfig::Azure(cfg)
        };
        let err = with_account_sas("rdl").open().await.unwrap_err();
        assert!(err.to_string().contains("lifeboat store init"), "{err}");
        let opened = with_account_sas("rwdlc").open().await.unwrap();
        // Nothing shows the token: not the opened store's `Debug`.
        let sig = account_sas("rwdlc", "co");
        let sig = sig.rsplit("sig=").next().unwrap();
        let shown = format!("{opened:?}");
        assert!(!shown.contains(sig) && !shown.contains("sig"), "{shown}");
        assert_eq!(
            StoreConfig::Azure(config(&endpoint, &other, None))
                .init()
                .await
                .unwrap(),
            Init::Existed
        );

        // Read-only: opens and lists; a put is refused, naming the right, and writes nothing.
        let ro = store(Some("rl")).open_read_only().await.unwrap();
        assert!(ro.list(&name).await.unwrap().is_empty());
        let err = ro
            .put_new(&name, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind, ErrorKind::Denied, "{msg}");
        assert!(msg.contains("write (w)") && msg.contains("`rl`"), "{msg}");
        assert!(msg.contains(&container), "{msg}");
        assert!(ro.list(&name).await.unwrap().is_empty());

        // Write without delete: what the agent is given.
        let agent = store(Some("rwl")).open().await.unwrap();
        agent
            .put_new(&name, Bytes::from_static(b"first"))
            .await
            .unwrap();
        // Create-only stays create-only: the second put is "already exists", not a denial
        // and not an overwrite, so a retried put that finds its own bytes is recognised.
        let err = agent
            .put_new(&name, Bytes::from_static(b"second"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::AlreadyExists, "{err}");
        // Why `c` (create) is not enough: the same second put is refused outright.
        let create_only = store(Some("rcl")).open().await.unwrap();
        let err = create_only
            .put_new(&name, Bytes::from_static(b"second"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Denied, "{err}");
        let err = agent.delete(&name).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Denied, "{err}");
        assert!(err.to_string().contains("delete (d)"), "{err}");
        assert_eq!(
            agent.get(&name).await.unwrap(),
            Bytes::from_static(b"first")
        );
        // An object above the block-upload threshold (staged in blocks, then copied): `w`
        // suffices; the staging blob it may not delete is left, and not listed.
        let big = ObjectName::new("v1/g/big").unwrap();
        let size = lifeboat_store::backend::azure::AzureBackend::MULTIPART_THRESHOLD + 1;
        agent
            .put_new(&big, Bytes::from(random_bytes(size, 7)))
            .await
            .unwrap();
        assert_eq!(agent.head(&big).await.unwrap().size, size as u64);

        // One right fewer than read + list: without list no open; without read no get.
        let err = store(Some("r")).open_read_only().await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Denied, "{err}");
        assert!(err.to_string().contains("list"), "{err}");
        let lo = store(Some("l")).open_read_only().await.unwrap();
        let err = lo.get(&name).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Denied, "{err}");
        assert!(err.to_string().contains("read (r)"), "{err}");
        // Without write, no put.
        let rl = store(Some("rdl")).open().await.unwrap();
        let other = ObjectName::new("v1/g/y").unwrap();
        let err = rl
            .put_new(&other, Bytes::from_static(b"y"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Denied, "{err}");
        // With delete, delete works (the coordinator's right).
        rl.delete(&name).await.unwrap();
        rl.delete(&big).await.unwrap();
        assert!(rl.list(&name).await.unwrap().is_empty());
    });
    assert!(objects(&rt, &endpoint, &container).is_empty());
}

/// An agent on a 3 MiB image whose `[store]` is `store_toml`.
fn agent_config(dir: &Path, name: &str, store_toml: &str) -> PathBuf {
    write_toml(
        dir,
        name,
        &format!(
            "vm = \"vm1\"\ngroup = \"g\"\nstate_dir = {:?}\n[replication]\nsegment_size = \"256KiB\"\n[[disk]]\nid = \"os\"\nkind = \"image\"\npath = {:?}\n[store]\n{store_toml}",
            dir.join("state"),
            dir.join("disk.img")
        ),
    )
}

/// Overwrites `len` bytes of the image at `at` with fresh random bytes; returns the image.
fn change(dir: &Path, seed: u64, at: usize, len: usize) -> Vec<u8> {
    let image = dir.join("disk.img");
    let mut data = std::fs::read(&image).unwrap();
    data[at..at + len].copy_from_slice(&random_bytes(len, seed));
    std::fs::write(&image, &data).unwrap();
    data
}

/// The agent runs with a container SAS without delete (`rwl`): it replicates, its preflight
/// passes (and says it may not delete), and the orphan segment of an interrupted cycle, which
/// it used to delete at start-up, is adopted instead — the next point still restores exactly,
/// although the orphan holds bytes the disk no longer has. One right fewer (no read, no list,
/// no create) fails with an error naming it, and the store is unchanged.
#[test]
fn agent_replicates_with_a_container_sas_without_delete() {
    let Some(endpoint) = azurite("agent_replicates_with_a_container_sas_without_delete") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let container = unique("sasagent");
    let rt = rt();

    // The admin creates the container once, with the account key.
    let admin = write_toml(d, "admin.toml", &toml_for(&endpoint, &container, None));
    let out = ok(lifeboat(&[
        "store",
        "init",
        "--store",
        admin.to_str().unwrap(),
    ]));
    assert!(out.contains("created container"), "{out}");

    std::fs::write(d.join("disk.img"), random_bytes(3 << 20, 1)).unwrap();
    let config = agent_config(
        d,
        "agent.toml",
        &toml_for(&endpoint, &container, Some("rwl")),
    );
    ok(agent(&config, &["check-config"]));
    let out = ok(agent(&config, &["check"]));
    assert!(out.contains("not allowed to delete"), "{out}");
    ok(agent(&config, &["sync"]));

    // What a cycle killed after uploading a segment leaves: a segment after the last tag,
    // here holding block 0 with bytes the disk never had.
    let layout = lifeboat_store::layout::Layout::new(lifeboat_store::GroupId::new("g").unwrap());
    let (vm, disk) = (
        lifeboat_store::VmId::new("vm1").unwrap(),
        lifeboat_store::DiskId::new("os").unwrap(),
    );
    let orphan = rt.block_on(async {
        let b = StoreConfig::Azure(config_for_admin(&endpoint, &container))
            .open()
            .await
            .unwrap();
        let reader = lifeboat_store::restore::StoreReader::new(b.clone(), layout.clone());
        let last = *reader
            .segment_seqs(&vm, &disk)
            .await
            .unwrap()
            .last()
            .unwrap();
        let mut seg = lifeboat_store::codec::SegmentBuilder::new(64 << 10, 3);
        seg.add("", 0, &random_bytes(64 << 10, 99));
        let name = layout.segment(&vm, &disk, last + 1);
        b.put_new(&name, seg.finish()).await.unwrap();
        name.as_str().to_owned()
    });

    let expected = change(d, 2, 1 << 20, 100_000);
    // Before: the agent's start-up deleted the orphan, which this SAS refuses.
    ok(agent(&config, &["sync"]));
    assert!(objects(&rt, &endpoint, &container).contains(&orphan));
    let ro = write_toml(d, "ro.toml", &toml_for(&endpoint, &container, Some("rl")));
    let restored = d.join("restored");
    ok(lifeboat(&[
        "restore",
        "--store",
        ro.to_str().unwrap(),
        "--group",
        "g",
        "--vm",
        "vm1",
        "--point",
        "latest",
        "--out",
        restored.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(restored.join("os.img")).unwrap() == expected,
        "the point after the adopted orphan does not restore the disk"
    );

    // One right fewer: each refused, naming it, with nothing written.
    change(d, 3, 2 << 20, 100_000);
    for (perms, names) in [("wl", "read (r)"), ("rw", "list"), ("rl", "write (w)")] {
        let before = objects(&rt, &endpoint, &container);
        let config = agent_config(
            d,
            &format!("agent-{perms}.toml"),
            &toml_for(&endpoint, &container, Some(perms)),
        );
        let msg = failed(agent(&config, &["sync"]));
        assert!(msg.contains(names), "with `{perms}`: {msg}");
        assert_eq!(
            objects(&rt, &endpoint, &container),
            before,
            "with `{perms}`"
        );
    }
}

fn config_for_admin(endpoint: &str, container: &str) -> AzureConfig {
    config(endpoint, container, None)
}

/// Admin views and failover work with a read-only SAS (`rl`); processing and the cache trim
/// work with the coordinator's rights (cache `rdl`, target `rwdl`), and with one right fewer
/// each fails naming it without changing the store it was refused on.
#[test]
fn admins_read_with_a_read_only_sas_and_processing_needs_its_rights() {
    let Some(endpoint) =
        azurite("admins_read_with_a_read_only_sas_and_processing_needs_its_rights")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (cache, target) = (unique("sascache"), unique("sastarget"));
    let rt = rt();
    for c in [&cache, &target] {
        let admin = write_toml(d, &format!("{c}.toml"), &toml_for(&endpoint, c, None));
        ok(lifeboat(&[
            "store",
            "init",
            "--store",
            admin.to_str().unwrap(),
        ]));
    }
    let sas_toml = |container: &str, perms: &str| {
        write_toml(
            d,
            &format!("{container}-{perms}.toml"),
            &toml_for(&endpoint, container, Some(perms)),
        )
        .to_str()
        .unwrap()
        .to_owned()
    };

    std::fs::write(d.join("disk.img"), random_bytes(3 << 20, 1)).unwrap();
    let config = agent_config(d, "agent.toml", &toml_for(&endpoint, &cache, Some("rwl")));
    ok(agent(&config, &["sync"]));
    let expected = change(d, 5, 200_000, 300_000);
    ok(agent(&config, &["sync"]));

    // Processing without write on the target: refused, naming it; the target stays empty.
    let msg = failed(lifeboat(&[
        "process",
        "--cache",
        &sas_toml(&cache, "rdl"),
        "--store",
        &sas_toml(&target, "rdl"),
        "--group",
        "g",
    ]));
    assert!(msg.contains("write (w)"), "{msg}");
    assert!(objects(&rt, &endpoint, &target).is_empty());

    // The trim without delete on the cache: the pass runs, the trim is refused, naming the
    // right, and the cache keeps every object.
    let cache_before = objects(&rt, &endpoint, &cache);
    let msg = failed(lifeboat(&[
        "process",
        "--cache",
        &sas_toml(&cache, "rl"),
        "--store",
        &sas_toml(&target, "rwdl"),
        "--group",
        "g",
        "--trim-cache",
    ]));
    assert!(msg.contains("delete (d)"), "{msg}");
    assert_eq!(objects(&rt, &endpoint, &cache), cache_before);

    // With the coordinator's rights: processed (already) and trimmed.
    ok(lifeboat(&[
        "process",
        "--cache",
        &sas_toml(&cache, "rdl"),
        "--store",
        &sas_toml(&target, "rwdl"),
        "--group",
        "g",
        "--trim-cache",
    ]));
    assert!(objects(&rt, &endpoint, &cache).len() < cache_before.len());

    // Read-only views and failover.
    let out = ok(lifeboat(&[
        "points",
        "list",
        "--store",
        &sas_toml(&cache, "rl"),
        "--target",
        &sas_toml(&target, "rl"),
        "--group",
        "g",
    ]));
    assert_eq!(out.matches("processed ").count(), 2, "{out}");
    let target_before = objects(&rt, &endpoint, &target);
    let to = d.join("dr");
    ok(lifeboat(&[
        "failover",
        "--store",
        &sas_toml(&target, "rl"),
        "--group",
        "g",
        "--vm",
        "vm1",
        "--point",
        "latest-processed",
        "--to",
        to.to_str().unwrap(),
    ]));
    assert!(std::fs::read(to.join("vm1").join("os.img")).unwrap() == expected);

    // One right fewer for the read-only admin: without read, failover is refused naming it and
    // leaves no output; without list, no listing.
    let to = d.join("dr2");
    let msg = failed(lifeboat(&[
        "failover",
        "--store",
        &sas_toml(&target, "l"),
        "--group",
        "g",
        "--vm",
        "vm1",
        "--point",
        "latest-processed",
        "--to",
        to.to_str().unwrap(),
    ]));
    assert!(msg.contains("read (r)"), "{msg}");
    assert!(!to.exists(), "a refused failover left {}", to.display());
    let msg = failed(lifeboat(&[
        "points",
        "list",
        "--store",
        &sas_toml(&target, "r"),
        "--group",
        "g",
    ]));
    assert!(msg.contains("may not list"), "{msg}");
    assert_eq!(objects(&rt, &endpoint, &target), target_before);
}
