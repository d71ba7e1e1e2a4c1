//! Property: whatever random writes hit an image and a directory tree between cuts, every point
//! the real agent publishes restores to exactly what the disks held at that cut.

use std::path::Path;

use crate::common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    ImageWrite { at: u64, len: usize, seed: u64 },
    ImageZero { block: u64 },
    NewFile { name: u8, len: usize, seed: u64 },
    Append { name: u8, len: usize },
    Truncate { name: u8, to: usize },
    Delete { name: u8 },
    Rename { from: u8, to: u8 },
    Mkdir { name: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..(3 << 20), 1usize..200_000, any::<u64>())
            .prop_map(|(at, len, seed)| Op::ImageWrite { at, len, seed }),
        (0u64..48).prop_map(|block| Op::ImageZero { block }),
        (0u8..12, 0usize..300_000, any::<u64>()).prop_map(|(name, len, seed)| Op::NewFile {
            name,
            len,
            seed
        }),
        (0u8..12, 1usize..70_000).prop_map(|(name, len)| Op::Append { name, len }),
        (0u8..12, 0usize..100_000).prop_map(|(name, to)| Op::Truncate { name, to }),
        (0u8..12).prop_map(|name| Op::Delete { name }),
        (0u8..12, 0u8..12).prop_map(|(from, to)| Op::Rename { from, to }),
        (0u8..4).prop_map(|name| Op::Mkdir { name }),
    ]
}

fn file(root: &Path, name: u8) -> std::path::PathBuf {
    // Some files live in sub-directories that Mkdir may or may not have made.
    if name.is_multiple_of(3) {
        root.join(format!("d{}", name % 4)).join(format!("f{name}"))
    } else {
        root.join(format!("f{name}"))
    }
}

fn apply(op: &Op, image: &Path, tree: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    match op {
        Op::ImageWrite { at, len, seed } => {
            let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
            f.seek(SeekFrom::Start(*at)).unwrap();
            f.write_all(&random_bytes(*len, *seed)).unwrap(); // may grow the image
        }
        Op::ImageZero { block } => {
            let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
            f.seek(SeekFrom::Start(block * 65536)).unwrap();
            f.write_all(&[0u8; 65536]).unwrap();
        }
        Op::NewFile { name, len, seed } => {
            let p = file(tree, *name);
            if p.parent().unwrap().is_dir() {
                std::fs::write(p, random_bytes(*len, *seed)).unwrap();
            }
        }
        Op::Append { name, len } => {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .append(true)
                .open(file(tree, *name))
            {
                f.write_all(&vec![b'a'; *len]).unwrap();
            }
        }
        Op::Truncate { name, to } => {
            if let Ok(f) = std::fs::OpenOptions::new()
                .write(true)
                .open(file(tree, *name))
            {
                f.set_len(*to as u64).unwrap();
            }
        }
        Op::Delete { name } => {
            let _ = std::fs::remove_file(file(tree, *name));
        }
        Op::Rename { from, to } => {
            let (a, b) = (file(tree, *from), file(tree, *to));
            if b.parent().unwrap().is_dir() {
                let _ = std::fs::rename(a, b);
            }
        }
        Op::Mkdir { name } => {
            let _ = std::fs::create_dir(tree.join(format!("d{name}")));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 20, ..ProptestConfig::default() })]

    #[test]
    fn every_point_restores_to_the_disks_at_its_cut(
        rounds in proptest::collection::vec(proptest::collection::vec(op(), 1..12), 1..4)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (image, tree) = (dir.path().join("disk.img"), dir.path().join("tree"));
        std::fs::write(&image, random_bytes(3 << 20, 1)).unwrap();
        std::fs::create_dir_all(&tree).unwrap();
        let config = write_config(
            dir.path(),
            &[disk("img", "image", &image), disk("tree", "directory", &tree)].concat(),
        );
        let mut cuts = Vec::new();
        for (r, ops) in rounds.iter().enumerate() {
            for op in ops {
                apply(op, &image, &tree);
            }
            let out = agent_ok(&config, &["sync"]);
            // What the disks held at this cut (nothing writes during the cut here).
            let expect = dir.path().join(format!("expect-{r}"));
            copy_tree(&tree, &expect);
            cuts.push((point_id(&out), std::fs::read(&image).unwrap(), expect));
        }
        for (i, (id, img, expect)) in cuts.iter().enumerate() {
            let out = dir.path().join(format!("restored-{i}"));
            restore_id(dir.path(), id, &out);
            prop_assert!(std::fs::read(out.join("img")).unwrap() == *img, "image differs at point {i}");
            assert_same_tree(expect, &out.join("tree"));
        }
    }
}
