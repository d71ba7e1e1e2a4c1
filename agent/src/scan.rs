//! Finding changed blocks: block-scan diff of images and block devices, and of directory trees.
//!
//! Both compare the blake3 of every block read with the hash last shipped and hand changed
//! blocks to a sink. Images are read in large chunks by several workers, each hashing what it
//! read, so hashing and I/O overlap.
//!
//! Which bytes a read sees matters as much as which blocks it reads. A block device under a
//! mounted filesystem is read with O_DIRECT: the filesystem writes file data to the device
//! around the device's own page cache, so a cached read may return stale bytes. An image file
//! is read through its page cache, which is the one cache every writer of that file shares — a
//! loop device (buffered or `dio`), a hypervisor using O_DIRECT (whose writes invalidate the
//! cached pages) — so cached reads of an image are coherent with what its writers wrote.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use lifeboat_store::codec::Hash;
use lifeboat_store::manifest::{EntryKind, Tree, TreeEntry, UnixMillis};

use crate::blocks::{BlockHashes, NewHashes, Pages};
use crate::state::{FileState, Hashes};
use crate::watch::Hints;

/// Read size for images: large sequential reads are what disks and page caches like best, and
/// 1 MiB is already past the point of diminishing returns; each worker and each queued chunk
/// holds one, so it also sets the scan's share of the memory cap.
#[cfg(not(test))]
const CHUNK: usize = 1 << 20;
/// Tiny in unit tests, so several workers share even a small image.
#[cfg(test)]
const CHUNK: usize = 8192;

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
    /// How long the pass took, from first read to last block handed on.
    pub elapsed: std::time::Duration,
}

/// Fails with `TimedOut` once `stop_at` has passed (a frozen capture out of time).
pub(crate) fn check_deadline(stop_at: Option<Instant>) -> io::Result<()> {
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

/// Alignment of direct-read buffers: the largest logical block size of common devices (4 KiB
/// native disks; 512-byte ones are satisfied too). Offsets and lengths are multiples of the
/// block size (at least 4 KiB) except a device's last chunk, which ends at the device's end, a
/// multiple of its logical block size.
const DIRECT_ALIGN: usize = 4096;

/// A read buffer whose start is aligned for direct I/O, without `unsafe`: a slightly larger
/// vector, used from its first aligned byte.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { raw, start, len }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A chunk read by a scan worker whose changed blocks the caller must see.
struct Changed {
    offset: u64,
    buf: Vec<u8>,
    /// (block index within the chunk, hash) of each changed block.
    blocks: Vec<(usize, Hash)>,
}

/// Scans an image or block device with `threads` workers, each reading and hashing its own
/// contiguous share with positioned reads; changed blocks reach `sink` on the calling thread.
/// `direct` reads past the page cache (block devices; see the module docs). Returns the size
/// and the hashes of all blocks, written as a new base file in `home` (the state directory and
/// the disk's name) as they are read: memory does not grow with the disk. Without `home` (a
/// frozen capture: the state directory may be on a frozen filesystem, where a write would
/// block), the changed hashes go to an overlay over `old` instead, bounded as the capture is.
#[allow(clippy::too_many_arguments)]
pub fn scan_image(
    path: &Path,
    direct: bool,
    block_size: usize,
    old: &BlockHashes,
    home: Option<(&Path, &str)>,
    threads: usize,
    stop_at: Option<Instant>,
    stats: &mut ScanStats,
    sink: &mut Sink<'_>,
) -> io::Result<(u64, BlockHashes)> {
    let file = crate::platform::open_disk(path, direct)?;
    let size = (&file).seek(SeekFrom::End(0))?;
    let blocks = size.div_ceil(block_size as u64) as usize;
    let chunk_blocks = (CHUNK / block_size).max(1);
    let chunk = chunk_blocks * block_size;
    // Each worker takes a contiguous run of whole chunks.
    let chunks = blocks.div_ceil(chunk_blocks).max(1);
    let threads = threads.clamp(1, chunks);
    let per_worker = chunks.div_ceil(threads);
    let out = match home {
        Some((dir, _)) => Some(NewHashes::create(dir, blocks as u64)?),
        None => None,
    };
    let mut overlay = out.is_none().then(|| {
        let mut o = old.clone();
        o.resize(blocks as u64);
        o
    });
    // One chunk of changes queued per worker: bounded memory whatever the churn.
    let (tx, rx) = mpsc::sync_channel::<io::Result<Changed>>(threads);

    std::thread::scope(|scope| -> io::Result<()> {
        for w in 0..threads {
            let first_chunk = w * per_worker;
            let last_chunk = ((w + 1) * per_worker).min(chunks);
            if first_chunk >= last_chunk {
                break;
            }
            let first_block = first_chunk * chunk_blocks;
            let n_blocks = (last_chunk * chunk_blocks).min(blocks) - first_block;
            let (tx, file, out) = (tx.clone(), &file, out.as_ref());
            scope.spawn(move || {
                let mut aligned = AlignedBuf::new(chunk);
                let buf = aligned.as_mut_slice();
                let mut pages = Pages::default();
                let mut mine = Vec::with_capacity(chunk_blocks);
                let mut done = 0;
                while done < n_blocks {
                    let offset = ((first_block + done) * block_size) as u64;
                    let len = ((size - offset) as usize).min(chunk);
                    let r = check_deadline(stop_at).and_then(|_| {
                        crate::platform::read_exact_at(file, &mut buf[..len], offset)
                    });
                    if let Err(e) = r {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    let mut changed = Vec::new();
                    mine.clear();
                    for (i, block) in buf[..len].chunks(block_size).enumerate() {
                        let h = *blake3::hash(block).as_bytes();
                        let idx = (first_block + done + i) as u64;
                        match pages.get(old, idx) {
                            Ok(was) if was == h => {}
                            Ok(_) => changed.push((i, h)),
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                        mine.push(h);
                    }
                    if let Some(out) = out
                        && let Err(e) = out.write_at((first_block + done) as u64, &mine)
                    {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    let n = len.div_ceil(block_size);
                    done += n;
                    let report = Changed {
                        offset,
                        buf: if changed.is_empty() {
                            Vec::new()
                        } else {
                            buf[..len].to_vec()
                        },
                        blocks: changed,
                    };
                    if tx.send(Ok(report)).is_err() {
                        return; // the caller stopped
                    }
                }
            });
        }
        drop(tx);
        // Owned here so an early return closes it and unblocks the workers.
        let rx = rx;
        for msg in rx.iter() {
            let c = msg?;
            for &(i, h) in &c.blocks {
                let start = i * block_size;
                let end = (start + block_size).min(c.buf.len());
                let block = &c.buf[start..end];
                stats.blocks_changed += 1;
                stats.bytes_changed += block.len() as u64;
                sink("", c.offset + start as u64, block, h)?;
                if let Some(o) = overlay.as_mut() {
                    o.set((c.offset + start as u64) / block_size as u64, h);
                }
            }
        }
        Ok(())
    })?;
    stats.bytes_read = size;
    let hashes = match (out, overlay) {
        (Some(out), _) => {
            let (dir, disk) = home.expect("a home for new hashes");
            out.finish(dir, disk)?
        }
        (None, Some(o)) => o,
        (None, None) => unreachable!("one of the two is always made"),
    };
    Ok((size, hashes))
}

/// Reads and hashes only `blocks` (sorted block indices, the tracker's read-out) of an image or
/// block device of `size` bytes, updating `hashes` (one per block of the device) and handing
/// changed blocks to `sink`. Adjacent blocks are read together, up to a chunk at a time. An
/// overlay grown past its cap is merged into a new base file in `home` on the way.
#[allow(clippy::too_many_arguments)]
pub fn scan_listed(
    path: &Path,
    direct: bool,
    block_size: usize,
    size: u64,
    blocks: &[u64],
    hashes: &mut BlockHashes,
    home: (&Path, &str),
    stop_at: Option<Instant>,
    stats: &mut ScanStats,
    sink: &mut Sink<'_>,
) -> io::Result<()> {
    let file = crate::platform::open_disk(path, direct)?;
    let chunk_blocks = (CHUNK / block_size).max(1);
    let mut aligned = AlignedBuf::new(chunk_blocks * block_size);
    let buf = aligned.as_mut_slice();
    let mut pages = Pages::default();
    let mut i = 0;
    while i < blocks.len() {
        check_deadline(stop_at)?;
        // Not while frozen: the merge writes 32 bytes per block of the disk; the save after
        // the thaw does it instead.
        if stop_at.is_none() && hashes.needs_merge() {
            hashes.merge(home.0, home.1)?;
            pages = Pages::default();
        }
        // A run of consecutive blocks, at most a chunk long.
        let first = blocks[i];
        let mut n = 1;
        while i + n < blocks.len() && blocks[i + n] == first + n as u64 && n < chunk_blocks {
            n += 1;
        }
        i += n;
        let offset = first * block_size as u64;
        if offset >= size || first >= hashes.len() {
            continue;
        }
        let len = ((size - offset) as usize).min(n * block_size);
        crate::platform::read_exact_at(&file, &mut buf[..len], offset)?;
        stats.bytes_read += len as u64;
        for (k, block) in buf[..len].chunks(block_size).enumerate() {
            let idx = first + k as u64;
            let h = *blake3::hash(block).as_bytes();
            if pages.get(hashes, idx)? != h {
                hashes.set(idx, h);
                stats.blocks_changed += 1;
                stats.bytes_changed += block.len() as u64;
                sink("", offset + (k * block_size) as u64, block, h)?;
            }
        }
    }
    Ok(())
}

/// How a directory pass runs.
pub struct DirPass<'a> {
    /// Files to re-read whatever their stamps say.
    pub hints: &'a Hints,
    /// Give up (a frozen capture out of time) once this passes.
    pub stop_at: Option<Instant>,
    /// Called when a file is done: every changed block of it has reached the sink.
    pub file_done: &'a mut dyn FnMut(&str, &FileState),
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

/// What a directory pass found.
pub struct DirScan {
    pub tree: Tree,
    pub files: BTreeMap<String, FileState>,
    /// Files with more than one hard link: a write through a link outside the disk raises no
    /// event here, so a capture that trusts events stats these.
    pub linked: Vec<String>,
}

/// Scans a directory tree. Files whose change stamp is unchanged are not read unless an event
/// named them or `hints.reread_all` is set (the verification sweep). Returns the tree and the new
/// per-file state.
pub fn scan_directory(
    root: &Path,
    block_size: usize,
    old: &BTreeMap<String, FileState>,
    pass: &mut DirPass<'_>,
    stats: &mut ScanStats,
    sink: &mut Sink<'_>,
) -> io::Result<DirScan> {
    let (hints, stop_at) = (pass.hints, pass.stop_at);
    let meta = fs::metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", root.display()),
        ));
    }
    let mut entries = Vec::new();
    let mut files = BTreeMap::new();
    let mut linked = Vec::new();
    let mut buf = vec![0u8; block_size];
    walk(root, "", &mut |rel, m| {
        check_deadline(stop_at)?;
        let force = if hints.dirty.contains(rel) {
            Force::Named
        } else if hints.reread_all {
            Force::Sweep
        } else {
            Force::No
        };
        let Some((entry, state)) = visit(root, rel, m, old.get(rel), force, &mut buf, stats, sink)?
        else {
            return Ok(());
        };
        if let Some(state) = state {
            (pass.file_done)(rel, &state);
            if links(m) > 1 {
                linked.push(rel.to_owned());
            }
            files.insert(rel.to_owned(), state);
        }
        entries.push(entry);
        Ok(())
    })?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(DirScan {
        tree: Tree { entries },
        files,
        linked,
    })
}

#[cfg(unix)]
pub(crate) fn links(m: &fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::nlink(m)
}

#[cfg(not(unix))]
pub(crate) fn links(_m: &fs::Metadata) -> u64 {
    1
}

/// Why a file is read whatever its stamps say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Force {
    /// It is not: read only if its stamps moved.
    No,
    /// An event or a shared-writable mapping named it.
    Named,
    /// The verification sweep reads everything.
    Sweep,
}

/// One entry of a directory pass: its listing entry and, for a file, its state — read (and its
/// changed blocks handed to `sink`) if forced or its stamp moved since `prev`. `None`: not
/// replicated (special files, names that are not UTF-8) or gone since it was listed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn visit(
    root: &Path,
    rel: &str,
    m: &fs::Metadata,
    prev: Option<&FileState>,
    force: Force,
    buf: &mut [u8],
    stats: &mut ScanStats,
    sink: &mut Sink<'_>,
) -> io::Result<Option<(TreeEntry, Option<FileState>)>> {
    let ty = m.file_type();
    if ty.is_dir() {
        return Ok(Some((
            TreeEntry {
                path: rel.to_owned(),
                kind: EntryKind::Dir,
                mode: mode(m),
                mtime: mtime_ms(m),
            },
            None,
        )));
    }
    if ty.is_symlink() {
        let target = match fs::read_link(root.join(rel)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(target) = target.to_str() else {
            tracing::warn!(path = rel, "symlink target is not UTF-8; not replicated");
            return Ok(None);
        };
        return Ok(Some((
            TreeEntry {
                path: rel.to_owned(),
                kind: EntryKind::Symlink {
                    target: target.to_owned(),
                },
                mode: 0,
                mtime: mtime_ms(m),
            },
            None,
        )));
    }
    if !ty.is_file() {
        tracing::debug!(
            path = rel,
            "special file (socket, fifo, device) not replicated"
        );
        return Ok(None);
    }
    let st = stamp(m);
    let unchanged = prev.is_some_and(|p| p.stamp == Some(st) && p.size == m.len());
    let state = if unchanged && force == Force::No {
        stats.files_skipped += 1;
        prev.cloned().expect("checked above")
    } else {
        stats.files_read += 1;
        let old_hashes = prev.map(|p| &p.hashes.0[..]).unwrap_or(&[]);
        let (size, hashes) = match hash_file(&root.join(rel), rel, buf, old_hashes, stats, sink) {
            Ok(r) => r,
            // Deleted between listing and reading: not part of this cut.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if unchanged && prev.is_some_and(|p| p.hashes.0 != hashes) {
            if force == Force::Named {
                tracing::info!(
                    path = rel,
                    "a filesystem event or a shared-writable mapping caught a change its stamps \
                     did not show"
                );
            } else {
                tracing::warn!(
                    path = rel,
                    "verification sweep found changed contents that neither stamps nor \
                     events reported (e.g. writes through mmap); shipping them now"
                );
            }
        }
        FileState {
            size,
            stamp: Some(st),
            hashes: Hashes(hashes),
        }
    };
    Ok(Some((
        TreeEntry {
            path: rel.to_owned(),
            kind: EntryKind::File { size: state.size },
            mode: mode(m),
            mtime: mtime_ms(m),
        },
        Some(state),
    )))
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
pub(crate) fn walk(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn scan(
        root: &Path,
        old: &BTreeMap<String, FileState>,
        verify: bool,
    ) -> (Vec<String>, BTreeMap<String, FileState>) {
        scan_with(root, old, verify, &HashSet::new())
    }

    fn scan_with(
        root: &Path,
        old: &BTreeMap<String, FileState>,
        verify: bool,
        dirty: &HashSet<String>,
    ) -> (Vec<String>, BTreeMap<String, FileState>) {
        let mut seen = Vec::new();
        let mut stats = ScanStats::default();
        let hints = Hints {
            dirty: dirty.clone(),
            reread_all: verify,
            since: None,
        };
        let mut pass = DirPass {
            hints: &hints,
            stop_at: None,
            file_done: &mut |_, _| {},
        };
        let files = scan_directory(root, 4096, old, &mut pass, &mut stats, &mut |t, o, _, _| {
            seen.push(format!("{t}@{o}"));
            Ok(())
        })
        .unwrap()
        .files;
        (seen, files)
    }

    #[test]
    fn the_verification_sweep_finds_changes_that_stamps_hide() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![7u8; 10_000]).unwrap();
        let (first, mut state) = scan(dir.path(), &BTreeMap::new(), false);
        assert_eq!(first, ["f@0", "f@4096", "f@8192"]);
        // Pretend the contents changed without the stamp moving (writes through mmap can do
        // that): the state remembers other hashes for blocks 0 and 2.
        let f = state.get_mut("f").unwrap();
        f.hashes.0[0] = [1; 32];
        f.hashes.0[2] = [2; 32];
        let (quick, _) = scan(dir.path(), &state, false);
        assert!(
            quick.is_empty(),
            "a stamp-based pass reads nothing: {quick:?}"
        );
        // A file named by an event is re-read whatever its stamp says.
        let named: HashSet<String> = ["f".to_owned()].into();
        let (by_event, _) = scan_with(dir.path(), &state, false, &named);
        assert_eq!(by_event, ["f@0", "f@8192"]);
        let (sweep, after) = scan(dir.path(), &state, true);
        assert_eq!(sweep, ["f@0", "f@8192"]);
        let (again, _) = scan(dir.path(), &after, true);
        assert!(again.is_empty());
    }

    #[test]
    fn image_scan_reports_exactly_the_changed_blocks_with_any_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut data: Vec<u8> = (0..(9 * 4096 + 100)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let home = tempfile::tempdir().unwrap();
        let home = (home.path(), "img");
        for threads in [1, 2, 3, 8] {
            let mut stats = ScanStats::default();
            let (size, hashes) = scan_image(
                &path,
                false,
                4096,
                &BlockHashes::default(),
                Some(home),
                threads,
                None,
                &mut stats,
                &mut |_, _, _, _| Ok(()),
            )
            .unwrap();
            assert_eq!(size, data.len() as u64);
            assert_eq!(hashes.len(), 10);
            let expect: Vec<Hash> = data
                .chunks(4096)
                .map(|b| *blake3::hash(b).as_bytes())
                .collect();
            assert_eq!(hashes.to_vec().unwrap(), expect, "threads {threads}");
            data[4096 * 3 + 5] ^= 1;
            data[4096 * 9 + 1] ^= 1;
            std::fs::write(&path, &data).unwrap();
            let mut seen = Vec::new();
            let (_, _) = scan_image(
                &path,
                false,
                4096,
                &hashes,
                Some(home),
                threads,
                None,
                &mut stats,
                &mut |_, o, b, h| {
                    assert_eq!(*blake3::hash(b).as_bytes(), h);
                    seen.push((o, b.len()));
                    Ok(())
                },
            )
            .unwrap();
            seen.sort();
            assert_eq!(
                seen,
                [(4096 * 3, 4096), (4096 * 9, 100)],
                "threads {threads}"
            );
        }
    }
}
