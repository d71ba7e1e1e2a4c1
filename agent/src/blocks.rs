//! An image's block hashes, kept on disk instead of in memory: immutable base files read a
//! page at a time (each page checksummed) plus a bounded overlay of the hashes changed since the
//! bases were written. Memory grows with churn, not with the size of the disk.
//!
//! A 1 TiB disk of 64 KiB blocks has 16 Mi blocks: 512 MiB of hashes, which a per-VM agent
//! must not hold (nor rewrite at every tag). Here the hashes are cut into extents of [`EXTENT`]
//! blocks, each its own base file, written once (by a full scan, or when the overlay outgrows
//! [`OVERLAY_CAP`]) and never modified; a merge rewrites only the extents its changes touch, so
//! a first copy that checkpoints as it goes writes each extent about once, not the whole disk's
//! hashes at every checkpoint; a tag's state save writes only the overlay. Clones share the
//! bases and the overlay (copied on write), so a cut can keep the state as it was after its
//! pre-copy for the price of the changes since.
//!
//! Base file `<disk>.blocks.<16 hex>` in the state directory (all integers little endian):
//! - the hashes, 32 bytes each, `stored` of them;
//! - one checksum per page of [`PAGE`] hashes: blake3(page number as u64 ‖ the page's bytes);
//! - a 48-byte trailer: `LBBLOCK1`, `stored` as u64, and blake3(checksums ‖ `stored` as u64),
//!   the base's id, which the state file records beside the name.
//!
//! A page whose checksum does not match reads as "not known" (its blocks are shipped again);
//! a trailer that does not match makes the state unusable, and the agent resynchronises by
//! checksum compare with the store, as for any damaged state file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lifeboat_store::codec::Hash;

/// Hashes per checksummed page of a base file (32 KiB).
pub const PAGE: u64 = 1024;

/// Hashes per extent (one base file of 2 MiB, standing for 4 GiB of 64 KiB blocks).
pub const EXTENT: u64 = 65_536;

/// Changed hashes held in memory before they are merged into new base files. 65,536 entries
/// are about 4 MiB of memory and 2.5 MiB per state save; a merge rewrites the extents they
/// touch (2 MiB each): at worst, changes spread over a whole 1 TiB disk, 512 MiB for every
/// 4 GiB of distinct blocks changed, about 1/8 of the data shipped for them.
pub const OVERLAY_CAP: usize = 65_536;

const MAGIC: &[u8; 8] = b"LBBLOCK1";
const TRAILER: u64 = 48;

/// The hash of every block of an image: `[0; 32]` (which no block hashes to) for a block not
/// known yet, so it is read and shipped.
#[derive(Clone, Default)]
pub struct BlockHashes {
    len: u64,
    /// Extent `k` holds blocks `k * EXTENT ..`; `None`: none known there.
    extents: Arc<Vec<Option<Arc<Base>>>>,
    /// Blocks the bases may answer for (a disk that shrank and grew again must not see the
    /// hashes of its old tail).
    base_len: u64,
    overlay: Arc<BTreeMap<u64, Hash>>,
}

/// What a state file records to find and check a base.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRef {
    pub name: String,
    /// The base's id (its trailer's checksum), hex.
    pub id: String,
}

/// Paths of the base files this process holds open: garbage collection leaves them be, so a
/// state kept in memory (a cut's pre-copy state, a checkpoint, a pass's result) never has to
/// write its base again because a save of another copy of the state removed it.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live(path: &Path, add: bool) {
    let mut l = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    if add {
        l.push(path.to_owned());
    } else if let Some(i) = l.iter().position(|p| p == path) {
        l.swap_remove(i);
    }
}

/// An immutable base file, open for positioned reads. Its name may be removed while it is in
/// use (a newer state saved meanwhile); the open handle still reads it, and a save of a state
/// that still refers to it writes it out again under a new name.
struct Base {
    file: File,
    path: Mutex<PathBuf>,
    stored: u64,
    sums: Vec<Hash>,
    id: Hash,
}

/// A base file failed its checks: the state that names it cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[error("block hash file {path} is damaged: {what}")]
pub struct Damaged {
    path: PathBuf,
    what: String,
}

fn damaged(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        Damaged {
            path: path.to_owned(),
            what: what.to_string(),
        },
    )
}

fn page_sum(page: u64, bytes: &[u8]) -> Hash {
    *blake3::Hasher::new()
        .update(&page.to_le_bytes())
        .update(bytes)
        .finalize()
        .as_bytes()
}

fn base_id(sums: &[Hash], stored: u64) -> Hash {
    let mut h = blake3::Hasher::new();
    for s in sums {
        h.update(s);
    }
    *h.update(&stored.to_le_bytes()).finalize().as_bytes()
}

impl Base {
    fn open(path: &Path, expect: &BaseRef) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let size = file.seek(SeekFrom::End(0))?;
        if size < TRAILER {
            return Err(damaged(path, "shorter than its trailer"));
        }
        let mut t = [0u8; TRAILER as usize];
        crate::platform::read_exact_at(&file, &mut t, size - TRAILER)?;
        if &t[..8] != MAGIC {
            return Err(damaged(path, "no trailer"));
        }
        let stored = u64::from_le_bytes(t[8..16].try_into().expect("8 bytes"));
        let id: Hash = t[16..48].try_into().expect("32 bytes");
        let pages = stored.div_ceil(PAGE);
        if stored
            .checked_mul(32)
            .and_then(|n| n.checked_add(pages * 32 + TRAILER))
            != Some(size)
        {
            return Err(damaged(path, "size does not match its trailer"));
        }
        if stored > EXTENT {
            return Err(damaged(path, "more hashes than an extent holds"));
        }
        if hex(&id) != expect.id {
            return Err(damaged(path, "not the base the state names"));
        }
        let mut raw = vec![0u8; (pages * 32) as usize];
        crate::platform::read_exact_at(&file, &mut raw, stored * 32)?;
        let sums: Vec<Hash> = raw
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        if base_id(&sums, stored) != id {
            return Err(damaged(path, "page checksums do not match its id"));
        }
        live(path, true);
        Ok(Self {
            file,
            path: Mutex::new(path.to_owned()),
            stored,
            sums,
            id,
        })
    }

    fn path(&self) -> PathBuf {
        self.path.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads and checks page `p` into `out`.
    fn read_page(&self, p: u64, out: &mut Vec<Hash>) -> io::Result<()> {
        let first = p * PAGE;
        let n = (self.stored - first).min(PAGE) as usize;
        let mut raw = vec![0u8; n * 32];
        crate::platform::read_exact_at(&self.file, &mut raw, first * 32)?;
        out.clear();
        if page_sum(p, &raw) != self.sums[p as usize] {
            // Damage costs what it damaged: these blocks become "not known", so they are read
            // and shipped again, as on a first copy. Safe, because a zero hash never matches a
            // block; no hash that could wrongly match is ever believed.
            tracing::warn!(file = %self.path().display(), page = p, blocks = n, "a page of block hashes fails its checksum; its blocks will be shipped again");
            out.resize(n, [0; 32]);
            return Ok(());
        }
        out.extend(
            raw.chunks_exact(32)
                .map(|c| <Hash>::try_from(c).expect("32 bytes")),
        );
        Ok(())
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        live(&self.path(), false);
    }
}

pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader's cache of one page of a base: sequential reads cost one read per [`PAGE`] blocks.
/// Each thread reading a [`BlockHashes`] keeps its own.
#[derive(Default)]
pub struct Pages {
    /// (the base, page number) cached.
    key: Option<(usize, u64)>,
    data: Vec<Hash>,
}

impl Pages {
    /// The hash of block `i` of `h` (`[0; 32]` past its end).
    pub fn get(&mut self, h: &BlockHashes, i: u64) -> io::Result<Hash> {
        if i >= h.len {
            return Ok([0; 32]);
        }
        if let Some(v) = h.overlay.get(&i) {
            return Ok(*v);
        }
        if i >= h.base_len {
            return Ok([0; 32]);
        }
        let k = i / EXTENT;
        let Some(Some(base)) = h.extents.get(k as usize) else {
            return Ok([0; 32]);
        };
        let j = i - k * EXTENT;
        if j >= base.stored {
            return Ok([0; 32]);
        }
        let key = (Arc::as_ptr(base) as usize, j / PAGE);
        if self.key != Some(key) {
            self.key = None;
            base.read_page(key.1, &mut self.data)?;
            self.key = Some(key);
        }
        Ok(self.data[(j % PAGE) as usize])
    }
}

impl BlockHashes {
    /// Number of blocks.
    pub fn len(&self) -> u64 {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Changed hashes held in memory.
    #[cfg(test)]
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }

    /// The hash of block `i` (one page read; use [`Pages`] for many).
    #[cfg(test)]
    pub fn get(&self, i: u64) -> io::Result<Hash> {
        Pages::default().get(self, i)
    }

    /// Grows (new blocks unknown) or shrinks the disk.
    pub fn resize(&mut self, n: u64) {
        if n < self.len {
            self.base_len = self.base_len.min(n);
            if self.overlay.range(n..).next().is_some() {
                Arc::make_mut(&mut self.overlay).split_off(&n);
            }
        }
        self.len = n;
    }

    /// Sets block `i`'s hash, growing the disk to hold it.
    pub fn set(&mut self, i: u64, h: Hash) {
        if i >= self.len {
            self.len = i + 1;
        }
        Arc::make_mut(&mut self.overlay).insert(i, h);
    }

    /// Whether the overlay has outgrown [`OVERLAY_CAP`] and should be merged ([`Self::merge`]).
    pub fn needs_merge(&self) -> bool {
        self.overlay.len() > OVERLAY_CAP
    }

    /// Merges the overlay into a new base file in `dir` if it outgrew [`OVERLAY_CAP`].
    pub fn merge_if_large(&mut self, dir: &Path, disk: &str) -> io::Result<()> {
        if self.needs_merge() {
            self.merge(dir, disk)?;
        }
        Ok(())
    }

    /// Writes the extents the overlay touches (or that a shrink cut short) as new base files in
    /// `dir`, emptying the overlay; the others are kept as they are. Memory: one page.
    pub fn merge(&mut self, dir: &Path, disk: &str) -> io::Result<()> {
        let n = self.len.div_ceil(EXTENT);
        let mut out: Vec<Option<Arc<Base>>> = Vec::with_capacity(n as usize);
        let mut pages = Pages::default();
        let mut buf = Vec::with_capacity(PAGE as usize);
        for k in 0..n {
            let (lo, hi) = (k * EXTENT, ((k + 1) * EXTENT).min(self.len));
            let old = self.extents.get(k as usize).cloned().flatten();
            let changed = self.overlay.range(lo..hi).next().is_some();
            // Kept only if it answers for exactly these blocks, all of them visible.
            let keep = !changed
                && old
                    .as_ref()
                    .is_none_or(|b| b.stored == hi - lo && self.base_len >= hi);
            if keep {
                out.push(old);
                continue;
            }
            let new = NewBase::create(dir, disk, hi - lo)?;
            let mut i = lo;
            while i < hi {
                buf.clear();
                let end = (i + PAGE).min(hi);
                for b in i..end {
                    buf.push(pages.get(self, b)?);
                }
                new.write_at(i - lo, &buf)?;
                i = end;
            }
            out.push(Some(new.finish_base()?));
        }
        self.extents = Arc::new(out);
        self.base_len = self.len;
        self.overlay = Arc::default();
        Ok(())
    }

    /// Block hashes from a list (tests, and state files of earlier formats).
    pub fn from_vec(dir: &Path, disk: &str, hashes: &[Hash]) -> io::Result<Self> {
        let out = NewHashes::create(dir, hashes.len() as u64)?;
        for (k, chunk) in hashes.chunks(PAGE as usize).enumerate() {
            out.write_at(k as u64 * PAGE, chunk)?;
        }
        out.finish(dir, disk)
    }

    /// Every hash, in memory (tests and small disks only).
    pub fn to_vec(&self) -> io::Result<Vec<Hash>> {
        let mut pages = Pages::default();
        (0..self.len).map(|i| pages.get(self, i)).collect()
    }

    /// The overlay, in block order.
    pub fn overlay(&self) -> impl Iterator<Item = (u64, Hash)> + '_ {
        self.overlay.iter().map(|(&i, &h)| (i, h))
    }

    /// What a state file records of the bases (per extent), writing one out again if its name
    /// was removed (by hand, or by another process).
    pub fn base_refs(&self, dir: &Path, disk: &str) -> io::Result<Vec<Option<BaseRef>>> {
        let mut refs = Vec::with_capacity(self.extents.len());
        for base in self.extents.iter() {
            let Some(base) = base else {
                refs.push(None);
                continue;
            };
            let path = base.path();
            if !path.exists() {
                // Copied byte for byte (damaged pages included), so its id is the one recorded.
                let new = copy_out(&base.file, dir, disk)?;
                live(&path, false);
                live(&new, true);
                *base.path.lock().unwrap_or_else(|e| e.into_inner()) = new;
            }
            refs.push(Some(BaseRef {
                name: base
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                id: hex(&base.id),
            }));
        }
        Ok(refs)
    }

    /// Block hashes as a state file records them: `len` blocks, bases (per extent) answering
    /// for the first `base_len`, and an overlay.
    pub fn open(
        dir: &Path,
        len: u64,
        base_len: u64,
        refs: &[Option<BaseRef>],
        overlay: BTreeMap<u64, Hash>,
    ) -> io::Result<Self> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        if overlay.range(len..).next().is_some() || base_len > len {
            return Err(bad(
                "state holds block hashes past the end of its disk".into()
            ));
        }
        if refs.len() as u64 > len.div_ceil(EXTENT) {
            return Err(bad("state names more extents than its disk has".into()));
        }
        let mut extents = Vec::with_capacity(refs.len());
        for r in refs {
            extents.push(match r {
                None => None,
                Some(r) if !is_base_name(&r.name) => {
                    return Err(bad(format!(
                        "state names a block hash file {:?} of no known form",
                        r.name
                    )));
                }
                Some(r) => Some(Arc::new(Base::open(&dir.join(&r.name), r)?)),
            });
        }
        Ok(Self {
            len,
            extents: Arc::new(extents),
            base_len,
            overlay: Arc::new(overlay),
        })
    }

    /// Blocks the bases answer for (what a state file records beside them).
    pub fn base_len(&self) -> u64 {
        self.base_len
    }

    /// Removes the base files of `disk` in `dir` other than `keep`, and temporaries other
    /// processes left behind (a crash while writing one).
    pub fn collect_garbage(dir: &Path, disk: &str, keep: &[String]) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let prefix = format!("{disk}.blocks.");
        let tmp_prefix = format!(".{disk}.blocks.");
        let mine = format!(".{}.tmp", std::process::id());
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let held = LIVE
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|p| p.file_name() == Some(e.file_name().as_os_str()));
            let stale = !held
                && match name.strip_prefix(&prefix) {
                    Some(rest) => is_hex16(rest) && !keep.contains(&name),
                    None => name.strip_prefix(&tmp_prefix).is_some_and(|rest| {
                        rest.len() > 16 && is_hex16(&rest[..16]) && !rest[16..].ends_with(&mine)
                    }),
                };
            if stale && let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), error = %err, "cannot remove an old block hash file");
            }
        }
    }
}

/// Writes the whole of an open base file under a new name in `dir`, durably.
fn copy_out(file: &File, dir: &Path, disk: &str) -> io::Result<PathBuf> {
    let size = file.metadata()?.len();
    let out = NewBase::create(dir, disk, 0)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = ((size - at) as usize).min(buf.len());
        crate::platform::read_exact_at(file, &mut buf[..n], at)?;
        lifeboat_store::write_all_at(&out.file, &buf[..n], at)?;
        at += n as u64;
    }
    out.persist()
}

fn is_hex16(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `name` is a base file's name (`<disk>.blocks.<16 hex>`), never a path.
fn is_base_name(name: &str) -> bool {
    name.rsplit_once(".blocks.")
        .is_some_and(|(disk, suffix)| !disk.is_empty() && is_hex16(suffix))
        && !name.contains(['/', '\\'])
        && !name.starts_with('.')
}

/// Equal when every block's hash is (reads both; for tests).
impl PartialEq for BlockHashes {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && match (self.to_vec(), other.to_vec()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
    }
}

impl Eq for BlockHashes {}

impl std::fmt::Debug for BlockHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHashes")
            .field("len", &self.len)
            .field(
                "extents",
                &self.extents.iter().filter(|e| e.is_some()).count(),
            )
            .field("base_len", &self.base_len)
            .field("overlay", &self.overlay.len())
            .finish()
    }
}

/// A base file being written: hashes land at their positions (from several threads at once),
/// then [`NewBase::finish`] adds the checksums and makes it durable under its final name.
/// Dropped unfinished, it is removed.
pub struct NewBase {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    len: u64,
    done: bool,
}

impl NewBase {
    /// A base of `len` hashes for `disk` in `dir`, all `[0; 32]` until written.
    pub fn create(dir: &Path, disk: &str, len: u64) -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seed = format!(
            "{}-{}-{:?}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
        );
        let tag = &blake3::hash(seed.as_bytes()).to_hex()[..16];
        let path = dir.join(format!("{disk}.blocks.{tag}"));
        let tmp = dir.join(format!(".{disk}.blocks.{tag}.{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let new = Self {
            file,
            tmp,
            path,
            len,
            done: false,
        };
        // Unwritten hashes read as zeros: "not known".
        new.file.set_len(len * 32)?;
        Ok(new)
    }

    /// Writes `hashes` from block `first` on.
    pub fn write_at(&self, first: u64, hashes: &[Hash]) -> io::Result<()> {
        debug_assert!(first + hashes.len() as u64 <= self.len);
        let raw: Vec<u8> = hashes.iter().flatten().copied().collect();
        lifeboat_store::write_all_at(&self.file, &raw, first * 32)
    }

    /// Makes the file durable under its final name, as written.
    fn persist(mut self) -> io::Result<PathBuf> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        self.done = true;
        if let Some(dir) = self.path.parent() {
            lifeboat_store::durable::sync_dir(dir)?;
        }
        Ok(self.path.clone())
    }

    /// Adds the page checksums and the trailer, and makes the file durable under its name.
    fn finish_base(mut self) -> io::Result<Arc<Base>> {
        let pages = self.len.div_ceil(PAGE);
        let mut sums = Vec::with_capacity(pages as usize);
        let mut raw = vec![0u8; (PAGE * 32) as usize];
        for p in 0..pages {
            let n = ((self.len - p * PAGE).min(PAGE) * 32) as usize;
            crate::platform::read_exact_at(&self.file, &mut raw[..n], p * PAGE * 32)?;
            sums.push(page_sum(p, &raw[..n]));
        }
        let id = base_id(&sums, self.len);
        let mut tail = Vec::with_capacity(sums.len() * 32 + TRAILER as usize);
        for s in &sums {
            tail.extend_from_slice(s);
        }
        tail.extend_from_slice(MAGIC);
        tail.extend_from_slice(&self.len.to_le_bytes());
        tail.extend_from_slice(&id);
        lifeboat_store::write_all_at(&self.file, &tail, self.len * 32)?;
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        self.done = true;
        if let Some(dir) = self.path.parent() {
            lifeboat_store::durable::sync_dir(dir)?;
        }
        let file = self.file.try_clone()?;
        live(&self.path, true);
        Ok(Arc::new(Base {
            file,
            path: Mutex::new(self.path.clone()),
            stored: self.len,
            sums,
            id,
        }))
    }
}

/// Every block's hash of a disk being written from several threads at once (a full scan): an
/// anonymous temporary file, cut into extents' base files by [`NewHashes::finish`]. Dropped
/// unfinished, it leaves nothing.
pub struct NewHashes {
    file: File,
    len: u64,
}

impl NewHashes {
    /// Room for `len` hashes, all `[0; 32]` until written.
    pub fn create(dir: &Path, len: u64) -> io::Result<Self> {
        let file = tempfile::tempfile_in(dir)?;
        file.set_len(len * 32)?;
        Ok(Self { file, len })
    }

    /// Writes `hashes` from block `first` on.
    pub fn write_at(&self, first: u64, hashes: &[Hash]) -> io::Result<()> {
        debug_assert!(first + hashes.len() as u64 <= self.len);
        let raw: Vec<u8> = hashes.iter().flatten().copied().collect();
        lifeboat_store::write_all_at(&self.file, &raw, first * 32)
    }

    /// One base file per extent, durable; the hashes as a whole.
    pub fn finish(self, dir: &Path, disk: &str) -> io::Result<BlockHashes> {
        let mut extents = Vec::with_capacity(self.len.div_ceil(EXTENT) as usize);
        let mut buf = vec![0u8; (PAGE * 32) as usize];
        let mut k = 0;
        while k * EXTENT < self.len {
            let (lo, hi) = (k * EXTENT, ((k + 1) * EXTENT).min(self.len));
            let new = NewBase::create(dir, disk, hi - lo)?;
            let mut at = lo;
            while at < hi {
                let n = (hi - at).min(PAGE);
                let bytes = &mut buf[..(n * 32) as usize];
                crate::platform::read_exact_at(&self.file, bytes, at * 32)?;
                lifeboat_store::write_all_at(&new.file, bytes, (at - lo) * 32)?;
                at += n;
            }
            extents.push(Some(new.finish_base()?));
            k += 1;
        }
        Ok(BlockHashes {
            len: self.len,
            extents: Arc::new(extents),
            base_len: self.len,
            overlay: Arc::default(),
        })
    }
}

impl Drop for NewBase {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> Hash {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    fn refs(b: &BlockHashes, dir: &Path) -> Vec<Option<BaseRef>> {
        b.base_refs(dir, "d").unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn bases_and_overlay_read_back_through_pages() {
        let dir = tempfile::tempdir().unwrap();
        let n = EXTENT + 3 * PAGE + 17;
        let v: Vec<Hash> = (0..n).map(h).collect();
        assert!(BlockHashes::default().is_empty());
        let mut b = BlockHashes::from_vec(dir.path(), "d", &v).unwrap();
        assert_eq!(refs(&b, dir.path()).len(), 2, "two extents");
        assert_eq!(b.to_vec().unwrap(), v);
        b.set(5, [7; 32]);
        b.set(n + 2, [9; 32]); // grows
        assert_eq!(b.len(), n + 3);
        assert_eq!(b.get(5).unwrap(), [7; 32]);
        assert_eq!(b.get(n).unwrap(), [0; 32]);
        assert_eq!(b.get(n + 2).unwrap(), [9; 32]);
        // A clone keeps its view while the original changes.
        let before = b.clone();
        b.set(6, [1; 32]);
        assert_eq!(before.get(6).unwrap(), h(6));
        // Shrinking hides the tail of the bases, and growing again does not bring it back.
        let mut c = b.clone();
        c.resize(10);
        c.resize(EXTENT + 20);
        assert_eq!(c.get(12).unwrap(), [0; 32]);
        assert_eq!(c.get(EXTENT + 1).unwrap(), [0; 32]);
        assert_eq!(c.get(9).unwrap(), h(9));
        for x in [b, c] {
            let mut m = x.clone();
            m.merge(dir.path(), "d").unwrap();
            assert_eq!(m.overlay_len(), 0);
            assert_eq!(m.to_vec().unwrap(), x.to_vec().unwrap());
        }
    }

    #[test]
    fn a_merge_rewrites_only_the_extents_it_touches() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<Hash> = (0..3 * EXTENT).map(h).collect();
        let mut b = BlockHashes::from_vec(dir.path(), "d", &v).unwrap();
        let before = refs(&b, dir.path());
        b.set(EXTENT + 5, [3; 32]);
        b.merge(dir.path(), "d").unwrap();
        let after = refs(&b, dir.path());
        assert_eq!(after[0], before[0]);
        assert_ne!(after[1], before[1]);
        assert_eq!(after[2], before[2]);
        assert_eq!(b.get(EXTENT + 5).unwrap(), [3; 32]);
        // A first copy checkpointing as it goes (blocks set in order, merged whenever the
        // overlay is full) writes each extent a few times, not the whole disk every time.
        let dir2 = tempfile::tempdir().unwrap();
        let mut c = BlockHashes::default();
        let mut written = 0u64;
        for i in 0..4 * EXTENT {
            c.set(i, h(i));
            if c.needs_merge() {
                let old: Vec<_> = refs(&c, dir2.path());
                c.merge(dir2.path(), "d").unwrap();
                let new = refs(&c, dir2.path());
                written += new
                    .iter()
                    .enumerate()
                    .filter(|(k, r)| old.get(*k) != Some(*r))
                    .count() as u64;
            }
        }
        c.merge(dir2.path(), "d").unwrap();
        assert!(
            written <= 8,
            "{written} extent files written for a 4-extent disk"
        );
        assert_eq!(
            c.to_vec().unwrap(),
            (0..4 * EXTENT).map(h).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_damaged_page_reads_as_unknown_and_a_damaged_trailer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<Hash> = (0..2 * PAGE).map(h).collect();
        let b = BlockHashes::from_vec(dir.path(), "d", &v).unwrap();
        let r = refs(&b, dir.path());
        let name = r[0].as_ref().unwrap().name.clone();
        let path = dir.path().join(&name);
        let mut raw = std::fs::read(&path).unwrap();
        raw[(PAGE * 32 + 40) as usize] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        let again = BlockHashes::open(dir.path(), 2 * PAGE, 2 * PAGE, &r, BTreeMap::new()).unwrap();
        assert_eq!(again.get(3).unwrap(), h(3));
        // The damaged page's blocks are "not known"; the other page is intact.
        for i in PAGE..2 * PAGE {
            assert_eq!(again.get(i).unwrap(), [0; 32]);
        }
        assert_eq!(again.get(PAGE - 1).unwrap(), h(PAGE - 1));
        // The trailer's id must be the one the state names.
        let wrong = vec![Some(BaseRef {
            id: hex(&[0; 32]),
            name: name.clone(),
        })];
        let err =
            BlockHashes::open(dir.path(), 2 * PAGE, 2 * PAGE, &wrong, BTreeMap::new()).unwrap_err();
        assert!(
            err.to_string().contains("not the base the state names"),
            "{err}"
        );
        // A name that is a path is refused before anything is opened.
        let evil = vec![Some(BaseRef {
            name: "../etc.blocks.0123456789abcdef".into(),
            id: String::new(),
        })];
        let err =
            BlockHashes::open(dir.path(), 2 * PAGE, 2 * PAGE, &evil, BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("no known form"), "{err}");
    }

    #[test]
    #[cfg_attr(
        windows,
        ignore = "Windows keeps an open file's name until its last handle closes: a base in use cannot be removed from under it"
    )]
    fn a_base_removed_while_in_use_is_written_again_when_saved() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<Hash> = (0..100).map(h).collect();
        let b = BlockHashes::from_vec(dir.path(), "d", &v).unwrap();
        let r0 = refs(&b, dir.path())[0].clone().unwrap();
        // Garbage collection leaves a base this process holds.
        BlockHashes::collect_garbage(dir.path(), "d", &[]);
        assert_eq!(names(dir.path()), std::slice::from_ref(&r0.name));
        // Removed anyway (by hand, or another process): the open handle still reads, and a
        // save writes it again, byte for byte (same id).
        std::fs::remove_file(dir.path().join(&r0.name)).unwrap();
        assert_eq!(b.get(42).unwrap(), h(42));
        let r = refs(&b, dir.path());
        let r1 = r[0].clone().unwrap();
        assert_ne!(r1.name, r0.name);
        assert_eq!(r1.id, r0.id);
        assert_eq!(names(dir.path()), std::slice::from_ref(&r1.name));
        let again = BlockHashes::open(dir.path(), 100, 100, &r, BTreeMap::new()).unwrap();
        assert_eq!(again.to_vec().unwrap(), v);
        // Once nothing holds a base, collection removes what no state names, and never
        // another disk's files.
        let mut m = again.clone();
        m.set(3, [9; 32]);
        m.merge(dir.path(), "d").unwrap();
        let other = BlockHashes::from_vec(dir.path(), "d.blocks.x", &v).unwrap();
        let kept_other = other.base_refs(dir.path(), "d.blocks.x").unwrap()[0]
            .clone()
            .unwrap();
        drop((b, again, other));
        let keep: Vec<String> = refs(&m, dir.path())
            .into_iter()
            .flatten()
            .map(|r| r.name)
            .collect();
        BlockHashes::collect_garbage(dir.path(), "d", &keep);
        let mut want = keep.clone();
        want.push(kept_other.name);
        want.sort();
        assert_eq!(names(dir.path()), want);
    }

    /// The test vector of docs/format.md ("Agent state").
    #[test]
    fn the_documented_test_vector() {
        let dir = tempfile::tempdir().unwrap();
        let b = BlockHashes::from_vec(dir.path(), "d", &[h(0), h(1), h(2)]).unwrap();
        let r = refs(&b, dir.path())[0].clone().unwrap();
        assert_eq!(
            r.id,
            "8842fed034cd0d3887d4f16eba6a1add5015212c76793209cf00953dc61cebb2"
        );
        let raw = std::fs::read(dir.path().join(&r.name)).unwrap();
        assert_eq!(raw.len(), 176);
        assert_eq!(
            hex(raw[96..128].try_into().unwrap()),
            "879e8ea0aab0ffec545945c31434886794ed645ed819ac972d44283b37bcb3c6"
        );
        assert_eq!(&raw[128..136], b"LBBLOCK1");
    }

    #[test]
    fn an_unfinished_base_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let w = NewBase::create(dir.path(), "d", 10).unwrap();
        w.write_at(0, &[[1; 32]]).unwrap();
        drop(w);
        let n = NewHashes::create(dir.path(), 10).unwrap();
        n.write_at(0, &[[1; 32]]).unwrap();
        drop(n);
        assert!(names(dir.path()).is_empty());
    }
}
