//! The committed example store (`store/tests/vectors/`, described in `docs/format.md`): every
//! object decodes, every point restores to the committed expected contents, `verify` finds it
//! clean, and the generator still writes exactly these bytes.
//!
//! Regenerate after a format change (e.g. numbering rules) with
//! `LIFEBOAT_WRITE_VECTORS=1 cargo test -p lifeboat-store --test it vectors:: -- --ignored regenerate`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lifeboat_store::backend::local::LocalBackend;
use lifeboat_store::codec;
use lifeboat_store::example::{self, Expected, ExpectedKind};
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{Base, DiskShape, RecoveryPoint, Tag, Tree};
use lifeboat_store::restore::{StoreReader, restore_disk};
use lifeboat_store::verify::{VerifyOptions, verify};
use lifeboat_store::{DynBackend, GroupId, ObjectName};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// Every file under `root` (relative path, bytes), sorted; the local store's `.tmp/` left out.
fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".tmp" {
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
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A copy of the committed store in a temporary directory (opening a local store writes its
/// `.tmp/`; the source tree stays untouched).
fn committed() -> (tempfile::TempDir, DynBackend) {
    let dir = tempfile::tempdir().unwrap();
    for (rel, bytes) in files(&vectors().join("store")) {
        let p = dir.path().join("store").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let backend: DynBackend = Arc::new(LocalBackend::open(dir.path().join("store")).unwrap());
    (dir, backend)
}

fn reader(backend: DynBackend) -> StoreReader {
    StoreReader::new(backend, Layout::new(GroupId::new(example::GROUP).unwrap()))
}

#[tokio::test]
async fn every_object_decodes() {
    let (_dir, backend) = committed();
    let r = reader(backend.clone());
    let all = backend.list(&ObjectName::new("v1").unwrap()).await.unwrap();
    assert!(!all.is_empty(), "no vectors committed");
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for m in &all {
        let name = m.name.as_str();
        let data = backend.get(&m.name).await.unwrap();
        let kind = match name.rsplit_once('.').map(|(_, ext)| ext) {
            Some("seg") => {
                codec::decode(name, data).unwrap().verify_all().unwrap();
                "segment"
            }
            Some("tag") => {
                Tag::decode(name, &data).unwrap();
                "tag"
            }
            Some("tree") => {
                Tree::decode(name, &data).unwrap();
                "tree"
            }
            Some("point") => {
                RecoveryPoint::decode(name, &data).unwrap();
                "point"
            }
            Some("base") => {
                let b = Base::decode(name, &data).unwrap();
                r.base_segment_ids(&b).await.unwrap().unwrap();
                "base"
            }
            Some("ids") => "segment ids", // checked with its base
            _ => panic!("unexpected object {name}"),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    // Both kinds of disk, a base of each, every kind of manifest.
    for kind in ["segment", "tag", "tree", "point", "base", "segment ids"] {
        assert!(
            kinds.contains_key(kind),
            "no {kind} in the vectors: {kinds:?}"
        );
    }
}

/// What a restored disk holds, in the words of `expected.txt`.
fn restored(point: &RecoveryPoint, disk: &str, out: &Path, image: bool) -> Vec<Expected> {
    let mk = |path: String, what| Expected {
        point: point.id.clone(),
        disk: disk.parse().unwrap(),
        path,
        what,
    };
    if image {
        return vec![mk(
            String::new(),
            ExpectedKind::File(std::fs::read(out).unwrap()),
        )];
    }
    let mut v = Vec::new();
    fn walk(root: &Path, dir: &Path, v: &mut Vec<(String, PathBuf)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            v.push((rel, p.clone()));
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, v);
            }
        }
    }
    let mut paths = Vec::new();
    walk(out, out, &mut paths);
    paths.sort();
    for (rel, p) in paths {
        let what = if p.is_symlink() {
            ExpectedKind::Symlink(std::fs::read_link(&p).unwrap().to_string_lossy().into())
        } else if p.is_dir() {
            ExpectedKind::Dir
        } else {
            ExpectedKind::File(std::fs::read(&p).unwrap())
        };
        v.push(mk(rel, what));
    }
    v
}

#[tokio::test]
#[cfg_attr(
    windows,
    ignore = "the vectors hold symbolic links, and wine's CreateSymbolicLink is a stub"
)]
async fn every_point_restores_to_the_expected_bytes() {
    let (dir, backend) = committed();
    let r = reader(backend);
    let points = r.points().await.unwrap();
    assert_eq!(points.len(), 3);
    let mut got = Vec::new();
    for p in &points {
        for m in &p.members {
            for d in &m.disks {
                let tag = r.tag(&m.vm, &d.disk, d.tag).await.unwrap();
                let image = matches!(tag.shape, DiskShape::Image { .. });
                let out = dir.path().join(format!("out-{}-{}", p.id, d.disk));
                restore_disk(&r, &tag, &out).await.unwrap();
                got.extend(restored(p, d.disk.as_str(), &out, image));
            }
        }
    }
    let want = std::fs::read_to_string(vectors().join("expected.txt")).unwrap();
    let got = String::from_utf8(example::expected_text(&got).to_vec()).unwrap();
    assert_eq!(got, want, "restored contents differ from expected.txt");
}

#[tokio::test]
async fn verify_finds_the_vectors_clean() {
    let (_dir, backend) = committed();
    let opts = VerifyOptions {
        read_data: true,
        ..Default::default()
    };
    let report = verify(backend, &opts).await.unwrap();
    assert!(report.is_clean(), "{:?}", report.damaged);
    assert!(report.orphans.is_empty(), "{:?}", report.orphans);
    assert_eq!(report.points, 3);
}

/// Builds the example into `dir` and returns the expected contents.
async fn generate(dir: &Path) -> bytes::Bytes {
    let backend: DynBackend = Arc::new(LocalBackend::open(dir).unwrap());
    let expected = example::build(backend).await.unwrap();
    example::expected_text(&expected)
}

/// The committed vectors are what the current writer writes: a format change (or a change of
/// the numbering rules) must regenerate them, so they never describe an older format silently.
#[tokio::test]
async fn the_generator_writes_these_very_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let expected = generate(&dir.path().join("store")).await;
    let hint = "regenerate with LIFEBOAT_WRITE_VECTORS=1 cargo test -p lifeboat-store --test it vectors:: -- --ignored regenerate";
    assert_eq!(
        String::from_utf8_lossy(&expected),
        std::fs::read_to_string(vectors().join("expected.txt")).unwrap(),
        "expected.txt is stale; {hint}"
    );
    let fresh = files(&dir.path().join("store"));
    let committed = files(&vectors().join("store"));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fresh), names(&committed), "{hint}");
    for ((name, a), (_, b)) in fresh.iter().zip(&committed) {
        assert!(
            a == b,
            "{name} differs from what the writer writes now; {hint}"
        );
    }
}

/// Rewrites `store/tests/vectors/` from the generator (only with `LIFEBOAT_WRITE_VECTORS=1`).
#[tokio::test]
#[ignore = "rewrites the committed vectors; run with LIFEBOAT_WRITE_VECTORS=1"]
async fn regenerate() {
    if std::env::var_os("LIFEBOAT_WRITE_VECTORS").is_none() {
        eprintln!("LIFEBOAT_WRITE_VECTORS is not set: nothing rewritten");
        return;
    }
    let store = vectors().join("store");
    if store.exists() {
        std::fs::remove_dir_all(&store).unwrap();
    }
    let expected = generate(&store).await;
    let _ = std::fs::remove_dir(store.join(".tmp"));
    std::fs::write(vectors().join("expected.txt"), expected).unwrap();
}

/// `docs/format.md` states the vectors (every restored hash, the walked-through tag's header,
/// the walked-through segment's size and identity): it must say what the committed bytes are.
#[test]
fn format_md_states_these_vectors() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/format.md"))
            .unwrap();
    let expected = std::fs::read_to_string(vectors().join("expected.txt")).unwrap();
    for line in expected.lines().filter(|l| l.contains(" file ")) {
        let hash = line.rsplit(' ').next().unwrap();
        assert!(doc.contains(hash), "format.md does not state {line}");
    }
    let disk = vectors().join("store/v1/vectors/vms/vm1/disks/os");
    let tag = std::fs::read(disk.join(format!("tag/{:020}.tag", example::FIRST))).unwrap();
    let header = String::from_utf8_lossy(&tag[..tag.iter().position(|&b| b == b'\n').unwrap()]);
    let hash = header.rsplit(' ').next().unwrap();
    assert!(
        doc.contains(&format!("`{}…{}`", &hash[..8], &hash[56..])),
        "tag header {header}"
    );
    assert!(
        doc.contains(&format!("\n{} bytes. Bytes 0–79", tag.len())),
        "tag size"
    );
    let seg = std::fs::read(disk.join(format!("seg/{:020}.seg", example::FIRST + 2))).unwrap();
    assert!(
        doc.contains(&format!("{} bytes, holds one", seg.len())),
        "segment size"
    );
    let id = &seg[seg.len() - 56..seg.len() - 24];
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert!(
        doc.contains(&format!(
            "`{} {} … {} {}`",
            hex(&id[..2]),
            hex(&id[2..4]),
            hex(&id[28..30]),
            hex(&id[30..])
        )),
        "segment identity"
    );
}
