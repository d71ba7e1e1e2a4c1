//! The frozen capture of a directory disk from what changed since its pre-copy, instead of a
//! walk of every file: a freeze then lasts as long as the changes take to read, whatever the
//! number of unchanged files.
//!
//! What changed is the union of:
//! - the paths change events named since the pre-copy began, drained through a barrier while
//!   frozen (see `watch`), so no event of a write before the freeze is still in flight;
//! - files mapped shared and writable by any process (writes through `mmap` raise no events,
//!   and while a page stays dirty they do not even move the file's mtime): re-read;
//! - files with more than one hard link, as the pre-copy's walk listed them (a write through a
//!   link outside the disk raises no event on this disk's directories): stat'ed, re-read if
//!   their stamps moved;
//! - the parent directories of those paths (a create or delete moves a directory's mtime).
//!
//! A directory that is new (or was something else) is walked whole: files created in it before
//! its watch was added raised no event. Anything that cannot vouch for completeness (a lost or
//! overflowed event queue, a barrier that did not come back, the mappings unreadable) makes the
//! caller fall back to the full walk, and say why.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

use lifeboat_store::manifest::{EntryKind, Tree, TreeEntry};

use crate::scan::{self, DirPass, DirScan, Force, ScanStats, Sink};
use crate::state::FileState;

/// What the capture applies to the pre-copy's listing.
pub struct Changes {
    /// Re-read whatever their stamps say (events, shared-writable mappings).
    pub reread: BTreeSet<String>,
    /// Stat'ed, re-read if their stamps moved (files with other hard links).
    pub restat: BTreeSet<String>,
}

/// Applies `changes` to the pre-copy's listing `base` and per-file state `files`, reading what
/// changed. Equal to what a full walk would return while nothing writes (a test checks that).
#[allow(clippy::too_many_arguments)]
pub fn capture(
    root: &Path,
    block_size: usize,
    base: Tree,
    mut files: BTreeMap<String, FileState>,
    changes: &Changes,
    pass: &mut DirPass<'_>,
    stats: &mut ScanStats,
    sink: &mut Sink<'_>,
) -> io::Result<DirScan> {
    let stop_at = pass.stop_at;
    let mut todo: BTreeSet<&str> = changes.reread.iter().map(String::as_str).collect();
    todo.extend(changes.restat.iter().map(String::as_str));
    for p in changes.reread.iter() {
        let mut a = p.as_str();
        while let Some((parent, _)) = a.rsplit_once('/') {
            todo.insert(parent);
            a = parent;
        }
    }
    let was_dir = |p: &str| {
        base.entries
            .binary_search_by(|e| e.path.as_str().cmp(p))
            .is_ok_and(|i| matches!(base.entries[i].kind, EntryKind::Dir))
    };
    // New listing entries (None: gone), and prefixes ("dir/") whose old entries all go.
    let mut updates: BTreeMap<String, Option<TreeEntry>> = BTreeMap::new();
    let mut gone: Vec<String> = Vec::new();
    let mut walked: Vec<String> = Vec::new();
    let mut linked = Vec::new();
    let mut buf = vec![0u8; block_size];
    let take_under = |files: &mut BTreeMap<String, FileState>, prefix: &str| {
        let doomed: Vec<String> = files
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        doomed
            .into_iter()
            .filter_map(|k| files.remove(&k).map(|f| (k, f)))
            .collect::<BTreeMap<_, _>>()
    };
    // Whether every ancestor of a path is a real directory now (not a symlink, which a path
    // lookup would follow out of the disk, nor gone).
    let mut dirs_ok: BTreeMap<String, bool> = BTreeMap::new();
    let mut ancestors_ok = |p: &str| -> io::Result<bool> {
        let mut chain = Vec::new();
        let mut a = p;
        while let Some((parent, _)) = a.rsplit_once('/') {
            chain.push(parent);
            a = parent;
        }
        for a in chain.into_iter().rev() {
            let ok = match dirs_ok.get(a) {
                Some(&ok) => ok,
                None => {
                    let ok = match fs::symlink_metadata(root.join(a)) {
                        Ok(m) => m.is_dir(),
                        Err(e)
                            if e.kind() == io::ErrorKind::NotFound
                                || e.kind() == io::ErrorKind::NotADirectory =>
                        {
                            false
                        }
                        Err(e) => return Err(e),
                    };
                    dirs_ok.insert(a.to_owned(), ok);
                    ok
                }
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    };
    for p in todo {
        scan::check_deadline(stop_at)?;
        if walked.iter().any(|w| p.starts_with(w.as_str())) {
            continue;
        }
        let path = root.join(p);
        let m = if ancestors_ok(p)? {
            match fs::symlink_metadata(&path) {
                Ok(m) => Some(m),
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.kind() == io::ErrorKind::NotADirectory =>
                {
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let under = format!("{p}/");
        let Some(m) = m else {
            updates.insert(p.to_owned(), None);
            files.remove(p);
            if was_dir(p) {
                take_under(&mut files, &under);
                gone.push(under);
            }
            continue;
        };
        let named = changes.reread.contains(p);
        if m.is_dir() && was_dir(p) && !named {
            // An ancestor of a named path: its children have events of their own; only its
            // own entry (mtime, mode) moves.
            let (entry, _) = scan::visit(root, p, &m, None, Force::No, &mut buf, stats, sink)?
                .expect("a directory is always listed");
            updates.insert(p.to_owned(), Some(entry));
            continue;
        }
        // Whatever was at this path before goes; a directory named by an event may be another
        // one now (renamed or swapped into place, or deleted and made again), so its contents
        // are walked, stamps compared with what was there under the same names.
        let before = if was_dir(p) {
            gone.push(under.clone());
            take_under(&mut files, &under)
        } else {
            BTreeMap::new()
        };
        let force = if named { Force::Named } else { Force::No };
        let prev = files.remove(p);
        match scan::visit(root, p, &m, prev.as_ref(), force, &mut buf, stats, sink)? {
            None => {
                updates.insert(p.to_owned(), None);
            }
            Some((entry, state)) => {
                if let Some(state) = state {
                    (pass.file_done)(p, &state);
                    if scan::links(&m) > 1 {
                        linked.push(p.to_owned());
                    }
                    files.insert(p.to_owned(), state);
                }
                updates.insert(p.to_owned(), Some(entry));
            }
        }
        if m.is_dir() {
            scan::walk(&path, p, &mut |rel, m| {
                scan::check_deadline(stop_at)?;
                let force = if changes.reread.contains(rel) || !before.contains_key(rel) {
                    Force::Named
                } else {
                    Force::No
                };
                if let Some((entry, state)) =
                    scan::visit(root, rel, m, before.get(rel), force, &mut buf, stats, sink)?
                {
                    if let Some(state) = state {
                        (pass.file_done)(rel, &state);
                        if scan::links(m) > 1 {
                            linked.push(rel.to_owned());
                        }
                        files.insert(rel.to_owned(), state);
                    }
                    updates.insert(rel.to_owned(), Some(entry));
                }
                Ok(())
            })?;
            walked.push(under);
        }
    }

    // Only the outermost of nested prefixes, so the one sorting just before a path is the only
    // one that can contain it.
    gone.sort();
    gone.dedup();
    let mut outer: Vec<String> = Vec::with_capacity(gone.len());
    for g in gone {
        if outer.last().is_none_or(|o| !g.starts_with(o.as_str())) {
            outer.push(g);
        }
    }
    let is_gone = |path: &str| {
        let i = outer.partition_point(|g| g.as_str() <= path);
        i > 0 && path.starts_with(outer[i - 1].as_str())
    };
    // Merge two sorted sequences: the old listing (less what went) and the updates.
    let mut entries = Vec::with_capacity(base.entries.len() + updates.len());
    let mut ups = updates.into_iter().peekable();
    for e in base.entries {
        while let Some((k, _)) = ups.peek()
            && k.as_str() < e.path.as_str()
        {
            if let Some((_, Some(n))) = ups.next() {
                entries.push(n);
            }
        }
        if ups.peek().is_some_and(|(k, _)| *k == e.path) {
            if let Some((_, Some(n))) = ups.next() {
                entries.push(n);
            }
            continue;
        }
        if !is_gone(&e.path) {
            entries.push(e);
        }
    }
    entries.extend(ups.filter_map(|(_, v)| v));
    // Files with other links that did not change stay listed as such.
    linked.extend(
        changes
            .restat
            .iter()
            .filter(|p| files.contains_key(p.as_str()))
            .cloned(),
    );
    linked.sort();
    linked.dedup();
    Ok(DirScan {
        tree: Tree { entries },
        files,
        linked,
    })
}

/// What [`shared_writable_under`] found.
#[derive(Debug, Default)]
pub struct Mapped {
    /// Files of the disk mapped shared and writable, relative to its root.
    pub paths: BTreeSet<String>,
    /// Processes whose mappings could not be read (pid, command): what they write through a
    /// mapping is not seen by this capture (the next walk or verification sweep reads it).
    pub unreadable: Vec<(u32, String)>,
}

/// Files under `root` that some process maps shared and writable, relative to `root`: by path
/// (as this mount namespace names them) and by (device, inode) through `inodes` (the disk's
/// files by inode, for mappings made through another path: a bind mount, a container).
/// Processes whose mappings this process may not read (no CAP_SYS_PTRACE, or an LSM's
/// refusal) are listed, for the caller to report; any other failure is an error.
#[cfg(target_os = "linux")]
pub fn shared_writable_under(
    root: &Path,
    inodes: &std::collections::HashMap<u64, String>,
) -> io::Result<Mapped> {
    use std::os::unix::fs::MetadataExt;
    let root = fs::canonicalize(root)?;
    let dev = fs::metadata(&root)?.dev();
    let prefix = format!("{}/", root.to_string_lossy().trim_end_matches('/'));
    let mut found = Mapped::default();
    let out = &mut found.paths;
    for e in fs::read_dir("/proc")? {
        let e = e?;
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let maps = match fs::read_to_string(e.path().join("maps")) {
            Ok(m) => m,
            // Exited since listed.
            Err(err)
                if err.kind() == io::ErrorKind::NotFound
                    || err.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                let pid = name.to_string_lossy().parse().unwrap_or(0);
                let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                found.unreadable.push((pid, comm.trim().to_owned()));
                continue;
            }
            Err(err) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("cannot read {}: {err}", e.path().join("maps").display()),
                ));
            }
        };
        for line in maps.lines() {
            let mut fields = line.split_whitespace();
            let perms = fields.nth(1).unwrap_or("");
            if perms.as_bytes().get(1) != Some(&b'w') || perms.as_bytes().get(3) != Some(&b's') {
                continue;
            }
            let (Some(map_dev), Some(ino)) = (fields.nth(1), fields.next()) else {
                continue;
            };
            let by_inode = map_dev
                .split_once(':')
                .and_then(|(ma, mi)| {
                    Some(libc::makedev(
                        u32::from_str_radix(ma, 16).ok()?,
                        u32::from_str_radix(mi, 16).ok()?,
                    ))
                })
                .filter(|&d| d == dev)
                .and_then(|_| inodes.get(&ino.parse().ok()?));
            if let Some(rel) = by_inode {
                out.insert(rel.clone());
            }
            // The path is the rest of the line from its first " /" (no earlier field has one).
            let Some(at) = line.find(" /") else { continue };
            let path = line[at + 1..].trim_end_matches(" (deleted)");
            if let Some(rel) = path.strip_prefix(&prefix) {
                out.insert(rel.to_owned());
            }
        }
    }
    Ok(found)
}

#[cfg(not(target_os = "linux"))]
pub fn shared_writable_under(
    _root: &Path,
    _inodes: &std::collections::HashMap<u64, String>,
) -> io::Result<Mapped> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "shared-writable mappings are only listed on Linux",
    ))
}

// Symlinks, hard links and /proc: Linux only.
#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::watch::Hints;

    fn full(root: &Path, old: &BTreeMap<String, FileState>) -> (DirScan, Vec<String>) {
        let hints = Hints::default();
        let mut pass = DirPass {
            hints: &hints,
            stop_at: None,
            file_done: &mut |_, _| {},
        };
        let mut seen = Vec::new();
        let r = scan::scan_directory(
            root,
            4096,
            old,
            &mut pass,
            &mut ScanStats::default(),
            &mut |t, o, _, _| {
                seen.push(format!("{t}@{o}"));
                Ok(())
            },
        )
        .unwrap();
        (r, seen)
    }

    fn delta(root: &Path, pre: &DirScan, changes: &Changes) -> (DirScan, Vec<String>) {
        let hints = Hints::default();
        let mut pass = DirPass {
            hints: &hints,
            stop_at: None,
            file_done: &mut |_, _| {},
        };
        let mut seen = Vec::new();
        let r = capture(
            root,
            4096,
            pre.tree.clone(),
            pre.files.clone(),
            changes,
            &mut pass,
            &mut ScanStats::default(),
            &mut |t, o, _, _| {
                seen.push(format!("{t}@{o}"));
                Ok(())
            },
        )
        .unwrap();
        (r, seen)
    }

    /// Random changes to a tree, naming what changed as inotify would (the path written,
    /// created, removed or renamed, both names of a rename; nothing inside a directory that
    /// was created or renamed into place). The capture must equal a full walk.
    #[test]
    fn applying_named_changes_equals_a_full_walk() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            for d in ["a", "a/b", "c", "c/d/e"] {
                fs::create_dir_all(root.join(d)).unwrap();
            }
            for i in 0..12 {
                let d = ["a", "a/b", "c", "c/d/e", ""][i % 5];
                fs::write(root.join(d).join(format!("f{i}")), vec![i as u8; 5000]).unwrap();
            }
            let (pre, _) = full(root, &BTreeMap::new());
            let mut reread = BTreeSet::new();
            let list = |root: &Path| -> Vec<String> {
                let mut v = Vec::new();
                scan::walk(root, "", &mut |rel, _| {
                    v.push(rel.to_owned());
                    Ok(())
                })
                .unwrap();
                v
            };
            for _ in 0..1 + next(6) {
                let all = list(root);
                let pick = |k: u64| all.get(k as usize).cloned();
                let is_link = |p: &str| {
                    fs::symlink_metadata(root.join(p)).is_ok_and(|m| m.file_type().is_symlink())
                };
                let real = |dir: bool| -> Vec<String> {
                    all.iter()
                        .filter(|p| !is_link(p) && root.join(p).is_dir() == dir)
                        .cloned()
                        .collect()
                };
                match next(9) {
                    0 if pick(0).is_some_and(|p| is_link(&p)) => {}
                    0 => {
                        // Write into a file (or create one); never through a symlink (inotify
                        // would name the target).
                        let p = pick(next(all.len() as u64 + 1)).unwrap_or("new".into());
                        if is_link(&p) {
                            continue;
                        }
                        if root.join(&p).is_dir() {
                            let f = format!("{p}/w{round}");
                            fs::write(root.join(&f), b"written").unwrap();
                            reread.insert(f);
                        } else {
                            let mut data = fs::read(root.join(&p)).unwrap_or_default();
                            data.resize(data.len().max(9000), 1);
                            let at = next(data.len() as u64) as usize;
                            data[at] ^= 0xff;
                            fs::write(root.join(&p), data).unwrap();
                            reread.insert(p);
                        }
                    }
                    1 => {
                        // Remove a file or a whole directory.
                        if let Some(p) = pick(next(all.len() as u64)) {
                            let path = root.join(&p);
                            if path.is_dir() {
                                fs::remove_dir_all(path).unwrap();
                            } else {
                                fs::remove_file(path).unwrap();
                            }
                            reread.insert(p);
                        }
                    }
                    2 => {
                        // Rename anything to a new top-level name.
                        if let Some(p) = pick(next(all.len() as u64)) {
                            let to = format!("moved{}", next(1000));
                            fs::rename(root.join(&p), root.join(&to)).unwrap();
                            reread.insert(p);
                            reread.insert(to);
                        }
                    }
                    3 => {
                        // A new directory with contents, named only by itself.
                        let d = format!("n{}", next(1000));
                        fs::create_dir_all(root.join(&d).join("deep")).unwrap();
                        fs::write(root.join(&d).join("deep/x"), b"inside").unwrap();
                        reread.insert(d);
                    }
                    6 => {
                        // Two directories swap names (a database's "rename the new one into
                        // place"): only the two names are named.
                        let dirs = real(true);
                        if dirs.len() >= 2 {
                            let (a, b) = (
                                &dirs[next(dirs.len() as u64) as usize],
                                &dirs[next(dirs.len() as u64) as usize],
                            );
                            if a != b
                                && !a.starts_with(&format!("{b}/"))
                                && !b.starts_with(&format!("{a}/"))
                            {
                                fs::rename(root.join(a), root.join("swap.tmp")).unwrap();
                                fs::rename(root.join(b), root.join(a)).unwrap();
                                fs::rename(root.join("swap.tmp"), root.join(b)).unwrap();
                                reread.insert(a.clone());
                                reread.insert(b.clone());
                                reread.insert("swap.tmp".into());
                            }
                        }
                    }
                    7 => {
                        // A file renamed over another that exists.
                        let files = real(false);
                        if files.len() >= 2 {
                            let (a, b) = (
                                &files[next(files.len() as u64) as usize],
                                &files[next(files.len() as u64) as usize],
                            );
                            if a != b {
                                fs::rename(root.join(a), root.join(b)).unwrap();
                                reread.insert(a.clone());
                                reread.insert(b.clone());
                            }
                        }
                    }
                    8 => {
                        // A directory deleted and made again under its name, with other files.
                        let dirs = real(true);
                        if let Some(d) = dirs.get(next(dirs.len() as u64 + 1) as usize) {
                            fs::remove_dir_all(root.join(d)).unwrap();
                            fs::create_dir(root.join(d)).unwrap();
                            fs::write(root.join(d).join("again"), b"made again").unwrap();
                            reread.insert(d.clone());
                        }
                    }
                    4 => {
                        // A file replaced by a directory of the same name.
                        if let Some(p) = pick(next(all.len() as u64))
                            && root.join(&p).is_file()
                        {
                            fs::remove_file(root.join(&p)).unwrap();
                            fs::create_dir(root.join(&p)).unwrap();
                            fs::write(root.join(&p).join("y"), b"y").unwrap();
                            reread.insert(p);
                        }
                    }
                    _ => {
                        // A symlink.
                        let l = format!("l{}", next(1000));
                        let _ = std::os::unix::fs::symlink("a/f0", root.join(&l));
                        reread.insert(l);
                    }
                }
            }
            let changes = Changes {
                reread,
                restat: BTreeSet::new(),
            };
            let (got, _) = delta(root, &pre, &changes);
            let (want, _) = full(root, &pre.files);
            assert_eq!(got.tree, want.tree, "round {round}: {:?}", changes.reread);
            assert_eq!(
                got.files.keys().collect::<Vec<_>>(),
                want.files.keys().collect::<Vec<_>>(),
                "round {round}"
            );
            for (k, f) in &want.files {
                assert_eq!(got.files[k].hashes, f.hashes, "round {round}: {k}");
                assert_eq!(got.files[k].size, f.size, "round {round}: {k}");
            }
        }
    }

    #[test]
    fn unnamed_files_are_not_read_and_linked_ones_are_stat_ed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for i in 0..50 {
            fs::write(root.join(format!("f{i}")), vec![i as u8; 100]).unwrap();
        }
        let outside = tempfile::tempdir().unwrap();
        fs::hard_link(root.join("f7"), outside.path().join("link")).unwrap();
        let (pre, _) = full(root, &BTreeMap::new());
        assert_eq!(pre.linked, ["f7"]);
        // Written through the other link: no event names it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(outside.path().join("link"), vec![0xaa; 100]).unwrap();
        fs::write(root.join("f3"), vec![0xbb; 100]).unwrap();
        let changes = Changes {
            reread: ["f3".to_owned()].into(),
            restat: pre.linked.iter().cloned().collect(),
        };
        let (got, seen) = delta(root, &pre, &changes);
        assert_eq!(seen, ["f3@0", "f7@0"]);
        assert_eq!(got.linked, ["f7"]);
        assert_eq!(got.tree, full(root, &pre.files).0.tree);
    }

    #[test]
    fn shared_writable_mappings_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mapped.db");
        fs::write(&f, vec![0u8; 8192]).unwrap();
        // python3 maps the file shared and writable, says so, and waits.
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import mmap,sys\nf=open(sys.argv[1],'r+b')\nm=mmap.mmap(f.fileno(),0)\nm[0:4]=b'abcd'\nprint('mapped',flush=True)\nsys.stdin.read()",
            )
            .arg(&f)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "mapped");
        let inodes = std::collections::HashMap::new();
        let found = shared_writable_under(dir.path(), &inodes).unwrap().paths;
        drop(child.stdin.take());
        child.wait().unwrap();
        assert!(found.contains("mapped.db"), "{found:?}");
        assert!(
            !shared_writable_under(dir.path(), &inodes)
                .unwrap()
                .paths
                .contains("mapped.db"),
            "the mapping ended with the process"
        );
    }
}
