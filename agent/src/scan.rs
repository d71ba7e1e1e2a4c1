//! Finding changed blocks: block-scan diff of images and block devices, and of directory trees.
//!
//! Both compare the blake3 of every block read with the hash last shipped and hand changed
//! blocks to a sink. Images are read in large sequential chunks on a reader thread while the
//! calling thread hashes, so hashing and I/O overlap.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use lifeboat_store::codec::Hash;
use lifeboat_store::manifest::{EntryKind, Tree, TreeEntry, UnixMillis};

use crate::state::{FileState, Hashes};

/// Read size for images: large sequential reads are what disks and page caches like best.
const CHUNK: usize = 4 << 20;

/// Receives changed blocks: (target, offset, bytes, blake3). Targets are `""` for images and the
/// relative path for files of a directory disk. Returning an error stops the scan.
pub type Sink<'a> = dyn FnMut(&str, u64, &[u8], Hash) -> io::Result<()> + 'a;

/// What a scan found besides the changed blocks it handed on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanStats {
    pub bytes_read: u64,
    pub blocks_changed: u64,
    pub bytes_changed: u64,
    pub files_read: u64,
    pub files_skipped: u64,
}

/// Fails with `TimedOut` once `stop_at` has passed (a frozen capture out of time).
fn check_deadline(stop_at: Option<Instant>) -> io::Result<()> {
    match stop_at {
        Some(t) if Instant::now() >= t => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "freeze deadline reached before the capture finished",
        )),
        _ => Ok(()),
    }
}

/// The size of an image file or block device.
pub fn device_size(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::End(0))
}

/// Scans an image or block device; returns its size and the hashes of all its blocks.
pub fn scan_image(
    path: &Path,
    block_size: usize,
    old: &[Hash],
    stop_at: Option<Instant>,
    stats: &mut ScanStats,
    sink: &mut Sink<'_>,
) -> io::Result<(u64, Vec<Hash>)> {
    let mut file = File::open(path)?;
    let size = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    let mut hashes = Vec::with_capacity(size.div_ceil(block_size as u64) as usize);
    let chunk = CHUNK.max(block_size) / block_size * block_size;

    // Two buffers in flight: one being filled, one being hashed.
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<(u64, Vec<u8>)>>(1);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        empty_tx
            .send(Vec::with_capacity(chunk))
            .expect("fresh channel");
    }
    std::thread::scope(|scope| -> io::Result<()> {
        scope.spawn(move || {
            let mut offset = 0u64;
            while offset < size {
                let Ok(mut buf) = empty_rx.recv() else { return };
                let want = ((size - offset) as usize).min(chunk);
                buf.resize(want, 0);
                let r = file.read_exact(&mut buf).map(|_| (offset, buf));
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    return;
                }
                offset += want as u64;
            }
        });
        // Owned by this closure, so an early return drops them and the reader thread, blocked
        // on one of them, sees the channel close and exits instead of deadlocking the scope.
        let (full_rx, empty_tx) = (full_rx, empty_tx);
        let mut done = 0u64;
        while done < size {
            let (offset, buf) = full_rx.recv().map_err(|_| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "image reader stopped")
            })??;
            check_deadline(stop_at)?;
            for (i, block) in buf.chunks(block_size).enumerate() {
                let h = *blake3::hash(block).as_bytes();
                let idx = hashes.len();
                if old.get(idx) != Some(&h) {
                    stats.blocks_changed += 1;
                    stats.bytes_changed += block.len() as u64;
                    sink("", offset + (i * block_size) as u64, block, h)?;
                }
                hashes.push(h);
            }
            done += buf.len() as u64;
            stats.bytes_read += buf.len() as u64;
            // The reader may have quit on an error we already reported; ignore a closed channel.
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })?;
    // A block that shrank at the end is covered by the new size; blocks past it are dropped.
    Ok((size, hashes))
}

/// File metadata that changes whenever contents may have: mtime, ctime (ns), inode.
#[cfg(unix)]
fn stamp(m: &fs::Metadata) -> (i64, i64, u64) {
    use std::os::unix::fs::MetadataExt;
    (
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        m.ino(),
    )
}

#[cfg(not(unix))]
fn stamp(m: &fs::Metadata) -> (i64, i64, u64) {
    let t = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    (t, t, 0)
}

#[cfg(unix)]
fn mode(m: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn mode(_m: &fs::Metadata) -> u32 {
    0
}

fn mtime_ms(m: &fs::Metadata) -> UnixMillis {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Scans a directory tree. Files whose change stamp is unchanged are not read unless `verify`
/// is set (the verification sweep, which re-hashes everything). Returns the tree and the new
/// per-file state.
pub fn scan_directory(
    root: &Path,
    block_size: usize,
    old: &BTreeMap<String, FileState>,
    verify: bool,
    stop_at: Option<Instant>,
    stats: &mut ScanStats,
    sink: &mut Sink<'_>,
) -> io::Result<(Tree, BTreeMap<String, FileState>)> {
    let meta = fs::metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", root.display()),
        ));
    }
    let mut entries = Vec::new();
    let mut files = BTreeMap::new();
    let mut buf = vec![0u8; block_size];
    walk(root, "", &mut |rel, m| {
        check_deadline(stop_at)?;
        let ty = m.file_type();
        if ty.is_dir() {
            entries.push(TreeEntry {
                path: rel.to_owned(),
                kind: EntryKind::Dir,
                mode: mode(m),
                mtime: mtime_ms(m),
            });
        } else if ty.is_symlink() {
            let target = fs::read_link(root.join(rel))?;
            let Some(target) = target.to_str() else {
                tracing::warn!(path = rel, "symlink target is not UTF-8; not replicated");
                return Ok(());
            };
            entries.push(TreeEntry {
                path: rel.to_owned(),
                kind: EntryKind::Symlink {
                    target: target.to_owned(),
                },
                mode: 0,
                mtime: mtime_ms(m),
            });
        } else if ty.is_file() {
            let st = stamp(m);
            let prev = old.get(rel);
            let unchanged = prev.is_some_and(|p| p.stamp == Some(st) && p.size == m.len());
            let state = if unchanged && !verify {
                stats.files_skipped += 1;
                prev.cloned().expect("checked above")
            } else {
                stats.files_read += 1;
                let old_hashes = prev.map(|p| &p.hashes.0[..]).unwrap_or(&[]);
                let (size, hashes) =
                    match hash_file(&root.join(rel), rel, &mut buf, old_hashes, stats, sink) {
                        Ok(r) => r,
                        // Deleted between listing and reading: not part of this cut.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                        Err(e) => return Err(e),
                    };
                if verify && unchanged && prev.is_some_and(|p| p.hashes.0 != hashes) {
                    tracing::warn!(
                        path = rel,
                        "verification sweep found changed contents that no event reported \
                         (e.g. writes through mmap); shipping them now"
                    );
                }
                FileState {
                    size,
                    stamp: Some(st),
                    hashes: Hashes(hashes),
                }
            };
            entries.push(TreeEntry {
                path: rel.to_owned(),
                kind: EntryKind::File { size: state.size },
                mode: mode(m),
                mtime: mtime_ms(m),
            });
            files.insert(rel.to_owned(), state);
        } else {
            tracing::debug!(
                path = rel,
                "special file (socket, fifo, device) not replicated"
            );
        }
        Ok(())
    })?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((Tree { entries }, files))
}

fn hash_file(
    path: &Path,
    rel: &str,
    buf: &mut [u8],
    old: &[Hash],
    stats: &mut ScanStats,
    sink: &mut Sink<'_>,
) -> io::Result<(u64, Vec<Hash>)> {
    let mut f = File::open(path)?;
    let mut hashes = Vec::new();
    let mut offset = 0u64;
    loop {
        // Fill a whole block unless the file ends: short reads must not shift block borders.
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        let block = &buf[..n];
        let h = *blake3::hash(block).as_bytes();
        if old.get(hashes.len()) != Some(&h) {
            stats.blocks_changed += 1;
            stats.bytes_changed += n as u64;
            sink(rel, offset, block, h)?;
        }
        hashes.push(h);
        stats.bytes_read += n as u64;
        offset += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok((offset, hashes))
}

/// Depth-first walk in name order, giving each entry's `/`-separated relative path.
fn walk(
    dir: &Path,
    rel: &str,
    f: &mut dyn FnMut(&str, &fs::Metadata) -> io::Result<()>,
) -> io::Result<()> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        match entry.file_name().into_string() {
            Ok(name) => names.push(name),
            Err(raw) => {
                tracing::warn!(dir = %dir.display(), name = ?raw, "file name is not UTF-8; not replicated");
            }
        }
    }
    names.sort();
    for name in names {
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let path = dir.join(&name);
        let m = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Deleted between listing and stat: it is simply not in this cut.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        f(&child_rel, &m)?;
        if m.is_dir() {
            walk(&path, &child_rel, f)?;
        }
    }
    Ok(())
}
