//! The segment codec: a batch of changed blocks of one disk as one immutable object.
//!
//! Layout (little-endian; `docs/format.md` is the specification):
//!
//! ```text
//! header   "LBSEGMNT" | version u16 | flags u16 | block_size u32            (16 bytes)
//! payloads zstd frames or raw blocks, back to back
//! index    target_count u32 | (len u16, utf-8)* | entry_count u32 | entry*  (entry = 61 bytes)
//! footer   index_offset u64 | index_len u64 | blake3(index) | xxh3-128(all before) | "LBSEGEND"
//! ```
//!
//! Every entry carries the blake3 of its plain block, so a block read on its own (ranged get) is
//! verifiable; the whole-object checksum catches truncation, reordering and flips anywhere.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;

/// Magic at the start of every segment.
pub const MAGIC: &[u8; 8] = b"LBSEGMNT";
/// Magic at the very end of every segment.
pub const END_MAGIC: &[u8; 8] = b"LBSEGEND";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Largest block accepted; bounds memory a hostile object can make a reader allocate.
pub const MAX_BLOCK: u32 = 16 << 20;
/// Smallest block size a disk may have: with smaller blocks a forged object or tag makes a
/// reader walk one entry per few bytes of the disk.
pub const MIN_BLOCK: u32 = 4 << 10;

/// Checks a disk's block size: a power of two, [`MIN_BLOCK`] to [`MAX_BLOCK`].
pub fn check_block_size(block_size: u32) -> Result<(), String> {
    if block_size.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        Ok(())
    } else {
        Err(format!(
            "block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
        ))
    }
}

const HEADER_LEN: usize = 16;
/// Bytes at the end of every segment that locate and checksum its index.
pub const FOOTER_LEN: usize = 8 + 8 + 32 + 16 + 8;
const ENTRY_LEN: usize = 4 + 8 + 4 + 1 + 8 + 4 + 32;

/// A blake3 digest.
pub type Hash = [u8; 32];

/// How a block's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// All zeros; nothing stored.
    Zero = 0,
    /// A zstd frame.
    Zstd = 1,
    /// Stored as is (zstd did not make it smaller).
    Raw = 2,
}

/// One block in a segment's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Index into the segment's target table (which file of a directory disk; 0 for images).
    pub target: u32,
    /// Byte offset of the block within its target.
    pub offset: u64,
    /// Plain length of the block.
    pub length: u32,
    pub encoding: Encoding,
    /// Where the stored bytes are, within the object.
    pub payload_offset: u64,
    pub payload_len: u32,
    /// blake3 of the plain block.
    pub hash: Hash,
}

/// Why a segment was rejected. Always names the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("segment {object} is corrupt: {what}")]
pub struct CodecError {
    pub object: String,
    pub what: String,
}

fn corrupt(object: &str, what: impl fmt::Display) -> CodecError {
    CodecError {
        object: object.to_owned(),
        what: what.to_string(),
    }
}

/// The blake3 of `len` zero bytes, cached for the common block size.
pub fn zero_hash(len: u32) -> Hash {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<u32, Hash>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    *map.entry(len)
        .or_insert_with(|| *blake3::hash(&vec![0u8; len as usize]).as_bytes())
}

/// [`MAX_BLOCK`] zero bytes, shared; calloc'd, so untouched pages cost no memory.
fn zeros() -> &'static [u8] {
    static ZEROS: OnceLock<Vec<u8>> = OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; MAX_BLOCK as usize])
}

/// The whole-object checksum: xxh3-128 of every byte before it. It guards against accidental
/// damage (truncation, reordering, flips) at memory speed; the content identity of each block
/// is its blake3, and the index is covered by a blake3 too.
pub fn object_checksum(bytes: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes()
}

/// Whether a block is all zeros (memcmp-speed).
pub fn is_zero(data: &[u8]) -> bool {
    const Z: [u8; 128] = [0; 128];
    let mut chunks = data.chunks_exact(128);
    chunks.all(|c| c == Z) && chunks.remainder().iter().all(|b| *b == 0)
}

/// Builds one segment from blocks. Adding the same (target, offset) twice keeps the last.
pub struct SegmentBuilder {
    block_size: u32,
    compressor: zstd::bulk::Compressor<'static>,
    targets: Vec<String>,
    target_ids: HashMap<String, u32>,
    entries: BTreeMap<(u32, u64), Entry>,
    /// Identical blocks within the segment share one payload.
    by_hash: HashMap<Hash, (Encoding, u64, u32)>,
    out: Vec<u8>,
    plain_bytes: u64,
    scratch: Vec<u8>,
}

impl fmt::Debug for SegmentBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentBuilder")
            .field("blocks", &self.entries.len())
            .field("plain_bytes", &self.plain_bytes)
            .field("encoded_len", &self.out.len())
            .finish()
    }
}

impl SegmentBuilder {
    /// A new, empty segment for a disk with `block_size`, compressing at zstd `level`.
    pub fn new(block_size: u32, level: i32) -> Self {
        Self::with_capacity(block_size, level, 4 << 20)
    }

    /// Like [`SegmentBuilder::new`], reserving `capacity` bytes up front — the caller's segment
    /// size plus a block — so a full segment is built without reallocating.
    pub fn with_capacity(block_size: u32, level: i32, capacity: usize) -> Self {
        let mut out = Vec::with_capacity(HEADER_LEN + capacity);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&block_size.to_le_bytes());
        Self {
            block_size,
            compressor: zstd::bulk::Compressor::new(level).expect("valid zstd level"),
            targets: Vec::new(),
            target_ids: HashMap::new(),
            entries: BTreeMap::new(),
            by_hash: HashMap::new(),
            out,
            plain_bytes: 0,
            scratch: Vec::new(),
        }
    }

    /// Adds a block, hashing it.
    pub fn add(&mut self, target: &str, offset: u64, data: &[u8]) {
        let hash = *blake3::hash(data).as_bytes();
        self.add_hashed(target, offset, data, hash);
    }

    /// Adds a block whose blake3 the caller already computed (the scanner hashes every block).
    pub fn add_hashed(&mut self, target: &str, offset: u64, data: &[u8], hash: Hash) {
        assert!(
            data.len() <= MAX_BLOCK as usize,
            "block larger than MAX_BLOCK"
        );
        let target = match self.target_ids.get(target) {
            Some(&id) => id,
            None => {
                let id = self.targets.len() as u32;
                assert!(target.len() <= u16::MAX as usize, "target name too long");
                self.targets.push(target.to_owned());
                self.target_ids.insert(target.to_owned(), id);
                id
            }
        };
        let (encoding, payload_offset, payload_len) = match self.by_hash.get(&hash) {
            Some(&stored) => stored,
            None => {
                let stored = self.store_payload(data);
                self.by_hash.insert(hash, stored);
                stored
            }
        };
        self.plain_bytes += data.len() as u64;
        self.entries.insert(
            (target, offset),
            Entry {
                target,
                offset,
                length: data.len() as u32,
                encoding,
                payload_offset,
                payload_len,
                hash,
            },
        );
    }

    fn store_payload(&mut self, data: &[u8]) -> (Encoding, u64, u32) {
        if is_zero(data) {
            return (Encoding::Zero, 0, 0);
        }
        let start = self.out.len() as u64;
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        let compressed = self
            .compressor
            .compress_to_buffer(data, &mut self.scratch)
            .is_ok();
        if compressed && self.scratch.len() < data.len() {
            self.out.extend_from_slice(&self.scratch);
            (Encoding::Zstd, start, self.scratch.len() as u32)
        } else {
            self.out.extend_from_slice(data);
            (Encoding::Raw, start, data.len() as u32)
        }
    }

    /// Blocks added so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no block was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Plain bytes added so far.
    pub fn plain_bytes(&self) -> u64 {
        self.plain_bytes
    }

    /// Approximate size of the finished object.
    pub fn encoded_len(&self) -> usize {
        self.out.len() + self.entries.len() * ENTRY_LEN + FOOTER_LEN
    }

    /// The nominal block size given at creation.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Writes index and footer and returns the object's bytes.
    pub fn finish(mut self) -> Bytes {
        let index_offset = self.out.len() as u64;
        let mut index = Vec::with_capacity(8 + self.entries.len() * ENTRY_LEN);
        index.extend_from_slice(&(self.targets.len() as u32).to_le_bytes());
        for t in &self.targets {
            index.extend_from_slice(&(t.len() as u16).to_le_bytes());
            index.extend_from_slice(t.as_bytes());
        }
        index.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in self.entries.values() {
            index.extend_from_slice(&e.target.to_le_bytes());
            index.extend_from_slice(&e.offset.to_le_bytes());
            index.extend_from_slice(&e.length.to_le_bytes());
            index.push(e.encoding as u8);
            index.extend_from_slice(&e.payload_offset.to_le_bytes());
            index.extend_from_slice(&e.payload_len.to_le_bytes());
            index.extend_from_slice(&e.hash);
        }
        self.out.extend_from_slice(&index);
        self.out.extend_from_slice(&index_offset.to_le_bytes());
        self.out
            .extend_from_slice(&(index.len() as u64).to_le_bytes());
        self.out.extend_from_slice(blake3::hash(&index).as_bytes());
        let checksum = object_checksum(&self.out);
        self.out.extend_from_slice(&checksum);
        self.out.extend_from_slice(END_MAGIC);
        Bytes::from(self.out)
    }
}

/// A decoded, structurally verified segment. Blocks are verified against their hashes as they
/// are read ([`Segment::read_block`]); [`Segment::verify_all`] checks every one.
#[derive(Debug, Clone)]
pub struct Segment {
    object: String,
    block_size: u32,
    targets: Vec<String>,
    entries: Vec<Entry>,
    data: Bytes,
}

struct Reader<'a> {
    object: &'a str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| corrupt(self.object, format!("index truncated in {what}")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
}

/// Decodes and structurally verifies a segment object: magics, version, whole-object hash,
/// index hash, index bounds and ordering. `object` names it in errors.
pub fn decode(object: &str, data: Bytes) -> Result<Segment, CodecError> {
    let len = data.len();
    if len < HEADER_LEN + FOOTER_LEN {
        return Err(corrupt(object, format!("truncated: only {len} bytes")));
    }
    if &data[..8] != MAGIC {
        return Err(corrupt(object, "not a segment (bad magic)"));
    }
    if &data[len - 8..] != END_MAGIC {
        return Err(corrupt(object, "truncated or damaged end (bad end magic)"));
    }
    let version = u16::from_le_bytes([data[8], data[9]]);
    if version != VERSION {
        return Err(corrupt(
            object,
            format!("format version {version} is not supported (this build reads {VERSION})"),
        ));
    }
    let block_size = u32::from_le_bytes(data[12..16].try_into().expect("4"));
    let footer = &data[len - FOOTER_LEN..];
    if object_checksum(&data[..len - 24]) != footer[48..64] {
        return Err(corrupt(
            object,
            "object checksum mismatch (damaged or truncated)",
        ));
    }
    // Checked after the checksum, so accidental damage is reported as such: a sealed header
    // with flags set was written by a format this build does not know (or forged), and
    // ignoring a flag could mean reading its bytes wrongly.
    let flags = u16::from_le_bytes([data[10], data[11]]);
    if flags != 0 {
        return Err(corrupt(
            object,
            format!("unknown flags {flags:#06x} (format version {VERSION} defines none)"),
        ));
    }
    check_block_size(block_size).map_err(|e| corrupt(object, e))?;
    let index_offset = u64::from_le_bytes(footer[..8].try_into().expect("8"));
    let index_len = u64::from_le_bytes(footer[8..16].try_into().expect("8"));
    let index_end = index_offset
        .checked_add(index_len)
        .filter(|&e| e == (len - FOOTER_LEN) as u64 && index_offset >= HEADER_LEN as u64)
        .ok_or_else(|| corrupt(object, "index location out of bounds"))?;
    let index = &data[index_offset as usize..index_end as usize];
    if blake3::hash(index).as_bytes() != &footer[16..48] {
        return Err(corrupt(object, "index checksum mismatch"));
    }
    let (targets, entries) = parse_index(object, index, index_offset)?;
    Ok(Segment {
        object: object.to_owned(),
        block_size,
        targets,
        entries,
        data,
    })
}

fn parse_index(object: &str, index: &[u8], payload_end: u64) -> Result<SegmentIndex, CodecError> {
    let mut r = Reader {
        object,
        buf: index,
        pos: 0,
    };
    let target_count = r.u32("target count")? as usize;
    if target_count > index.len() / 2 {
        return Err(corrupt(object, "target count exceeds index size"));
    }
    let mut targets = Vec::with_capacity(target_count);
    for _ in 0..target_count {
        let n = r.u16("target name length")? as usize;
        let name = std::str::from_utf8(r.take(n, "target name")?)
            .map_err(|_| corrupt(object, "target name is not UTF-8"))?;
        targets.push(name.to_owned());
    }
    let entry_count = r.u32("entry count")? as usize;
    if entry_count.checked_mul(ENTRY_LEN) != Some(index.len() - r.pos) {
        return Err(corrupt(object, "entry count does not match index size"));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(entry_count);
    for i in 0..entry_count {
        let target = r.u32("entry")?;
        let offset = r.u64("entry")?;
        let length = r.u32("entry")?;
        let encoding = match r.u8("entry")? {
            0 => Encoding::Zero,
            1 => Encoding::Zstd,
            2 => Encoding::Raw,
            e => return Err(corrupt(object, format!("entry {i}: unknown encoding {e}"))),
        };
        let payload_offset = r.u64("entry")?;
        let payload_len = r.u32("entry")?;
        let hash: Hash = r.take(32, "entry")?.try_into().expect("32");
        let e = Entry {
            target,
            offset,
            length,
            encoding,
            payload_offset,
            payload_len,
            hash,
        };
        if target as usize >= targets.len() {
            return Err(corrupt(
                object,
                format!("entry {i}: target {target} out of range"),
            ));
        }
        if length > MAX_BLOCK || offset.checked_add(length as u64).is_none() {
            return Err(corrupt(object, format!("entry {i}: bad length {length}")));
        }
        let payload_ok = match encoding {
            Encoding::Zero => payload_offset == 0 && payload_len == 0,
            Encoding::Raw => payload_len == length,
            Encoding::Zstd => payload_len > 0,
        } && (encoding == Encoding::Zero
            || (payload_offset >= HEADER_LEN as u64
                && payload_offset + payload_len as u64 <= payload_end));
        if !payload_ok {
            return Err(corrupt(object, format!("entry {i}: payload out of bounds")));
        }
        if let Some(prev) = entries.last()
            && (prev.target, prev.offset + prev.length as u64) > (target, offset)
        {
            return Err(corrupt(
                object,
                format!("entry {i}: blocks out of order or overlapping"),
            ));
        }
        entries.push(e);
    }
    Ok((targets, entries))
}

/// Where a segment's index is, read from its last [`FOOTER_LEN`] bytes, so a reader can
/// fetch just the index with a ranged get. Returns (index range, index hash).
pub fn parse_footer(
    object: &str,
    footer: &[u8],
    object_len: u64,
) -> Result<(std::ops::Range<u64>, Hash), CodecError> {
    if footer.len() != FOOTER_LEN || &footer[FOOTER_LEN - 8..] != END_MAGIC {
        return Err(corrupt(object, "truncated or damaged end (bad end magic)"));
    }
    let index_offset = u64::from_le_bytes(footer[..8].try_into().expect("8"));
    let index_len = u64::from_le_bytes(footer[8..16].try_into().expect("8"));
    let end = index_offset
        .checked_add(index_len)
        .filter(|&e| {
            Some(e) == object_len.checked_sub(FOOTER_LEN as u64)
                && index_offset >= HEADER_LEN as u64
        })
        .ok_or_else(|| corrupt(object, "index location out of bounds"))?;
    Ok((index_offset..end, footer[16..48].try_into().expect("32")))
}

/// A segment's target table and entries.
pub type SegmentIndex = (Vec<String>, Vec<Entry>);

/// Verifies and parses an index fetched on its own (see [`parse_footer`]).
pub fn decode_index(
    object: &str,
    index: &[u8],
    index_offset: u64,
    hash: &Hash,
) -> Result<SegmentIndex, CodecError> {
    if blake3::hash(index).as_bytes() != hash {
        return Err(corrupt(object, "index checksum mismatch"));
    }
    parse_index(object, index, index_offset)
}

impl Segment {
    /// The object this segment was decoded from.
    pub fn object(&self) -> &str {
        &self.object
    }

    /// The disk's nominal block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The target table (file paths of a directory disk; `""` for an image).
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// The index, sorted by (target, offset).
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Returns one block's bytes, verified against its blake3: borrowed from the object when
    /// stored raw, else decompressed into `out`.
    pub fn read_block<'a>(
        &'a self,
        e: &Entry,
        decompressor: &mut zstd::bulk::Decompressor<'_>,
        out: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], CodecError> {
        let payload = &self.data
            [e.payload_offset as usize..(e.payload_offset + e.payload_len as u64) as usize];
        let block: &[u8] = match e.encoding {
            Encoding::Zero => {
                if e.hash != zero_hash(e.length) {
                    return Err(self.block_err(e, "zero block with a non-zero hash"));
                }
                return Ok(&zeros()[..e.length as usize]);
            }
            Encoding::Raw => payload,
            Encoding::Zstd => {
                out.clear();
                out.reserve(e.length as usize);
                let n = decompressor
                    .decompress_to_buffer(payload, out)
                    .map_err(|err| self.block_err(e, format!("zstd: {err}")))?;
                if n != e.length as usize {
                    return Err(self.block_err(e, "decompressed length differs"));
                }
                out
            }
        };
        if blake3::hash(block).as_bytes() != &e.hash {
            return Err(self.block_err(e, "block checksum mismatch"));
        }
        Ok(block)
    }

    fn block_err(&self, e: &Entry, what: impl fmt::Display) -> CodecError {
        corrupt(
            &self.object,
            format!(
                "block at {}:{} ({})",
                self.targets[e.target as usize], e.offset, what
            ),
        )
    }

    /// Calls `f(target, offset, bytes)` for every block in order, verifying each.
    pub fn for_each_block(
        &self,
        mut f: impl FnMut(&str, u64, &[u8]) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let mut d = zstd::bulk::Decompressor::new().expect("zstd decompressor");
        let mut buf = Vec::with_capacity(self.block_size as usize);
        for e in &self.entries {
            let block = self.read_block(e, &mut d, &mut buf)?;
            f(&self.targets[e.target as usize], e.offset, block)?;
        }
        Ok(())
    }

    /// Verifies every block.
    pub fn verify_all(&self) -> Result<(), CodecError> {
        self.for_each_block(|_, _, _| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Bytes {
        let mut b = SegmentBuilder::new(4096, 3);
        b.add("", 0, &[0u8; 4096]);
        b.add("", 4096, &b"hello world ".repeat(341)[..4092]);
        b.add(
            "",
            8192,
            &(0..4096u32)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<_>>(),
        );
        b.add("", 12288, &b"hello world ".repeat(341)[..4092]);
        b.finish()
    }

    fn blocks_of(seg: &Segment) -> Vec<(String, u64, Vec<u8>)> {
        let mut v = Vec::new();
        seg.for_each_block(|t, o, d| {
            v.push((t.to_owned(), o, d.to_vec()));
            Ok(())
        })
        .unwrap();
        v
    }

    #[test]
    fn identical_blocks_share_one_payload_and_zeros_take_none() {
        let seg = decode("s", sample()).unwrap();
        let e = seg.entries();
        assert_eq!(e[0].encoding, Encoding::Zero);
        assert_eq!(e[1].payload_offset, e[3].payload_offset);
        assert_eq!(e[3].length, 4092);
        seg.verify_all().unwrap();
    }

    #[test]
    fn errors_name_the_object_and_the_problem() {
        let mut raw = sample().to_vec();
        raw[20] ^= 1;
        let err = decode("v1/g/vm/d/seg/1.seg", Bytes::from(raw)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "segment v1/g/vm/d/seg/1.seg is corrupt: object checksum mismatch (damaged or truncated)"
        );
        let raw = sample();
        let err = decode("x", raw.slice(..raw.len() - 1)).unwrap_err();
        assert!(err.to_string().contains("end magic"), "{err}");
    }

    #[test]
    fn a_forged_block_with_a_fixed_up_object_hash_is_still_caught() {
        // Someone (or a bug) rewrites a payload and recomputes the outer hashes: the per-block
        // hash still catches it.
        let raw = sample().to_vec();
        let seg = decode("s", Bytes::from(raw.clone())).unwrap();
        let e = seg.entries()[2];
        assert_ne!(e.encoding, Encoding::Zero);
        let mut forged = raw.clone();
        forged[e.payload_offset as usize] ^= 0xff;
        let len = forged.len();
        let h = object_checksum(&forged[..len - 24]);
        forged[len - 24..len - 8].copy_from_slice(&h);
        let seg = decode("s", Bytes::from(forged)).unwrap();
        let err = seg.verify_all().unwrap_err();
        assert!(err.what.contains(":8192"), "{err}");
    }

    /// Re-seals `raw` (a valid segment) after its header was changed, so only the header check
    /// can refuse it.
    fn reseal(mut raw: Vec<u8>) -> Bytes {
        let len = raw.len();
        let h = object_checksum(&raw[..len - 24]);
        raw[len - 24..len - 8].copy_from_slice(&h);
        Bytes::from(raw)
    }

    #[test]
    fn unknown_flags_are_refused() {
        // No flag is defined in version 1: a set bit means a format this build cannot read.
        for flags in [0x8001u16, 1, 0x8000] {
            let mut raw = sample().to_vec();
            raw[10..12].copy_from_slice(&flags.to_le_bytes());
            let err = decode("v1/x.seg", reseal(raw)).unwrap_err();
            assert!(err.to_string().contains("flags"), "{flags:#x}: {err}");
        }
    }

    #[test]
    fn block_sizes_outside_the_format_are_refused() {
        for bs in [0u32, 1, 4095, 6000, 2 * MAX_BLOCK] {
            let mut raw = sample().to_vec();
            raw[12..16].copy_from_slice(&bs.to_le_bytes());
            let err = decode("v1/x.seg", reseal(raw)).unwrap_err();
            assert!(err.to_string().contains("block size"), "{bs}: {err}");
        }
        assert!(check_block_size(MIN_BLOCK).is_ok() && check_block_size(MAX_BLOCK).is_ok());
    }

    /// A structurally sealed object around arbitrary payload and index bytes: the hashes are
    /// right, so the decoder's own bounds checks are what stands between it and a panic.
    pub(crate) fn forge(payload: &[u8], index: &[u8]) -> Bytes {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&4096u32.to_le_bytes());
        out.extend_from_slice(payload);
        let index_offset = out.len() as u64;
        out.extend_from_slice(index);
        out.extend_from_slice(&index_offset.to_le_bytes());
        out.extend_from_slice(&(index.len() as u64).to_le_bytes());
        out.extend_from_slice(blake3::hash(index).as_bytes());
        let h = object_checksum(&out);
        out.extend_from_slice(&h);
        out.extend_from_slice(END_MAGIC);
        Bytes::from(out)
    }

    fn arb_blocks() -> impl Strategy<Value = Vec<(u8, u64, Vec<u8>)>> {
        let block = prop_oneof![
            (1usize..3000).prop_map(|n| vec![0u8; n]),
            proptest::collection::vec(any::<u8>(), 1..3000),
            (1usize..3000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        ];
        proptest::collection::vec((0u8..3, 0u64..64, block), 0..24)
    }

    proptest! {
        #[test]
        fn round_trip(blocks in arb_blocks()) {
            let mut b = SegmentBuilder::new(4096, 3);
            let mut expect = BTreeMap::new();
            for (t, slot, data) in &blocks {
                let target = format!("f{t}");
                b.add(&target, slot * 4096, data);
                expect.insert((target, slot * 4096), data.clone());
            }
            let seg = decode("s", b.finish()).unwrap();
            let got: BTreeMap<_, _> = blocks_of(&seg)
                .into_iter()
                .map(|(t, o, d)| ((t, o), d))
                .collect();
            prop_assert_eq!(got, expect);
        }

        #[test]
        fn any_bit_flip_is_caught(pos in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let mut raw = sample().to_vec();
            let i = pos.index(raw.len());
            raw[i] ^= 1 << bit;
            let r = decode("s", Bytes::from(raw)).and_then(|s| s.verify_all());
            prop_assert!(r.is_err());
        }

        #[test]
        fn any_truncation_is_caught(cut in any::<proptest::sample::Index>()) {
            let raw = sample();
            let n = cut.index(raw.len());
            prop_assert!(decode("s", raw.slice(..n)).is_err());
        }

        #[test]
        fn reordered_chunks_are_caught(a in any::<proptest::sample::Index>(), b in any::<proptest::sample::Index>(), len in 1usize..64) {
            let raw = sample().to_vec();
            let (i, j) = (a.index(raw.len() - len), b.index(raw.len() - len));
            prop_assume!(raw[i..i + len] != raw[j..j + len]);
            let mut moved = raw.clone();
            let chunk: Vec<u8> = raw[i..i + len].to_vec();
            moved.copy_within(j..j + len, i);
            moved[j..j + len].copy_from_slice(&chunk);
            prop_assume!(moved != raw);
            let r = decode("s", Bytes::from(moved)).and_then(|s| s.verify_all());
            prop_assert!(r.is_err());
        }

        /// Bounded fuzzing of the decoder: arbitrary bytes, and valid segments with arbitrary
        /// bytes spliced in, never panic and never verify.
        #[test]
        fn decoder_survives_garbage(garbage in proptest::collection::vec(any::<u8>(), 0..4096), at in any::<proptest::sample::Index>()) {
            let r = decode("g", Bytes::from(garbage.clone())).and_then(|s| s.verify_all());
            prop_assert!(r.is_err(), "{} arbitrary bytes verified as a segment", garbage.len());
            let mut raw = sample().to_vec();
            let i = at.index(raw.len());
            let end = (i + garbage.len()).min(raw.len());
            raw[i..end].copy_from_slice(&garbage[..end - i]);
            let changed = raw != sample().to_vec();
            let r = decode("g", Bytes::from(raw)).and_then(|s| s.verify_all());
            // Unchanged bytes (the splice wrote what was there) still verify; any change fails.
            prop_assert_eq!(r.is_ok(), !changed);
        }

        /// Sealed objects with hostile indexes: counts, offsets, lengths and encodings that lie.
        #[test]
        fn decoder_survives_forged_indexes(
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            entries in proptest::collection::vec(
                (0u32..3, any::<u64>(), 0u32..5000, 0u8..4, 0u64..600, 0u32..600), 0..6),
            targets in 0u32..3,
        ) {
            let mut index = Vec::new();
            index.extend_from_slice(&targets.to_le_bytes());
            for t in 0..targets {
                let name = format!("t{t}");
                index.extend_from_slice(&(name.len() as u16).to_le_bytes());
                index.extend_from_slice(name.as_bytes());
            }
            index.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for (t, off, len, enc, poff, plen) in entries {
                index.extend_from_slice(&t.to_le_bytes());
                index.extend_from_slice(&off.to_le_bytes());
                index.extend_from_slice(&len.to_le_bytes());
                index.push(enc);
                index.extend_from_slice(&poff.to_le_bytes());
                index.extend_from_slice(&plen.to_le_bytes());
                index.extend_from_slice(&[7u8; 32]);
            }
            if let Ok(seg) = decode("forged", forge(&payload, &index)) {
                // Hashes are all 7s: no block can verify.
                prop_assert!(seg.entries().is_empty() || seg.verify_all().is_err());
            }
        }
    }
}
