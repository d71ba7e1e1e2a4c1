//! Resync sums: the block hashes of one tag of a disk as the target store restores it, which
//! processing puts beside a resync request in the cache store so the disk's agent can start
//! its new history as a delta over that tag (a checksum compare) instead of a full copy.
//!
//! Entries are fixed-size and sorted, so a reader streams the object (a 64 GiB disk at 64 KiB
//! blocks is 1 Mi entries, 48 MiB) and checks its blake3 trailer before trusting any of it.
//! `docs/format.md`, *Resync sums*, specifies the bytes.

use std::io::Read;

use bytes::Bytes;

use crate::codec::check_block_size;
use crate::manifest::check_rel_path;

/// First bytes of every sums object.
pub const MAGIC: &[u8; 8] = b"LBSUMS\0\0";
/// The version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of one entry: target u32, offset u64, length u32, blake3.
pub const ENTRY_LEN: usize = 4 + 8 + 4 + 32;
/// Most targets (files) one sums object may name.
pub const MAX_TARGETS: u32 = 1 << 24;

/// One block of the origin tag: `hash` is the blake3 of its `length` plain bytes at `offset`
/// of `target` (`""` for an image, a file's relative path for a directory disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SumEntry {
    pub target: u32,
    pub offset: u64,
    pub length: u32,
    pub hash: [u8; 32],
}

/// What a sums object's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumsHeader {
    /// The tag whose blocks these are (the new history's origin).
    pub origin: u64,
    pub block_size: u32,
    pub targets: Vec<String>,
    /// How many entries follow.
    pub entries: u64,
}

/// Why a sums object was refused; always names it.
#[derive(Debug, thiserror::Error)]
#[error("{object} is not valid resync sums: {what}")]
pub struct SumsError {
    pub object: String,
    pub what: String,
}

/// The origin a sums object names, from its first 24 bytes (see [`decode`] for the rest): what
/// a reader needs to know which tag is offered without reading the whole object. `None` when
/// the bytes are not the start of a sums object this build reads.
pub fn peek_origin(head: &[u8]) -> Option<u64> {
    let head = head.get(..24)?;
    if &head[..8] != MAGIC || head[8..10] != VERSION.to_le_bytes() || head[10..12] != [0, 0] {
        return None;
    }
    let origin = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
    (origin != 0).then_some(origin)
}

/// Builds a sums object: targets sorted and unique (byte order), entries added in any order.
#[derive(Debug)]
pub struct SumsBuilder {
    header: SumsHeader,
    entries: Vec<SumEntry>,
}

impl SumsBuilder {
    pub fn new(origin: u64, block_size: u32, targets: Vec<String>) -> Self {
        SumsBuilder {
            header: SumsHeader {
                origin,
                block_size,
                targets,
                entries: 0,
            },
            entries: Vec::new(),
        }
    }

    pub fn push(&mut self, e: SumEntry) {
        self.entries.push(e);
    }

    /// The object's bytes. Sorts the entries (the caller may add them in any order).
    pub fn finish(mut self) -> Bytes {
        self.entries.sort_by_key(|e| (e.target, e.offset));
        let h = &self.header;
        let mut out = Vec::with_capacity(64 + self.entries.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&h.block_size.to_le_bytes());
        out.extend_from_slice(&h.origin.to_le_bytes());
        out.extend_from_slice(&(h.targets.len() as u32).to_le_bytes());
        for t in &h.targets {
            out.extend_from_slice(&(t.len() as u16).to_le_bytes());
            out.extend_from_slice(t.as_bytes());
        }
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.target.to_le_bytes());
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.length.to_le_bytes());
            out.extend_from_slice(&e.hash);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        Bytes::from(out)
    }
}

/// A reader that hashes what passes through it and counts it.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
    read: u64,
}

impl<R: Read> Hashing<R> {
    fn exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(buf)?;
        self.hasher.update(buf);
        self.read += buf.len() as u64;
        Ok(())
    }
}

/// Reads a sums object of `len` bytes from `r`, handing each entry to `each` as it is read
/// (with the header), in order. Nothing read may be trusted until this returns `Ok`: the
/// trailer, which covers every byte before it, is checked last, so a caller building state
/// from the entries must discard it on an error.
pub fn decode<R: Read>(
    object: &str,
    r: R,
    len: u64,
    mut each: impl FnMut(&SumsHeader, SumEntry) -> Result<(), String>,
) -> Result<SumsHeader, SumsError> {
    let err = |what: String| SumsError {
        object: object.to_owned(),
        what,
    };
    let mut r = Hashing {
        inner: r,
        hasher: blake3::Hasher::new(),
        read: 0,
    };
    let io = |e: std::io::Error| err(format!("truncated or unreadable: {e}"));
    let mut fixed = [0u8; 28];
    r.exact(&mut fixed).map_err(io)?;
    if &fixed[..8] != MAGIC {
        return Err(err("wrong magic".into()));
    }
    let version = u16::from_le_bytes([fixed[8], fixed[9]]);
    if version != VERSION {
        return Err(err(format!(
            "version {version} is not supported (this build reads {VERSION})"
        )));
    }
    let flags = u16::from_le_bytes([fixed[10], fixed[11]]);
    if flags != 0 {
        return Err(err(format!("unknown flags {flags:#06x}")));
    }
    let block_size = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
    check_block_size(block_size).map_err(&err)?;
    let origin = u64::from_le_bytes(fixed[16..24].try_into().expect("8 bytes"));
    if origin == 0 {
        return Err(err("origin tag 0".into()));
    }
    let count = u32::from_le_bytes(fixed[24..28].try_into().expect("4 bytes"));
    if count > MAX_TARGETS || u64::from(count) * 2 > len {
        return Err(err(format!("{count} targets")));
    }
    let mut targets = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut l = [0u8; 2];
        r.exact(&mut l).map_err(io)?;
        let n = u16::from_le_bytes(l) as usize;
        if r.read + n as u64 > len {
            return Err(err("a target runs past the end".into()));
        }
        let mut b = vec![0u8; n];
        r.exact(&mut b).map_err(io)?;
        let t = String::from_utf8(b).map_err(|_| err("a target is not UTF-8".into()))?;
        if !t.is_empty() {
            check_rel_path(&t).map_err(&err)?;
        } else if count != 1 {
            return Err(err("an image target beside others".into()));
        }
        // Sorted and unique: one file's blocks never come under two targets.
        if targets
            .last()
            .is_some_and(|l: &String| l.as_bytes() >= t.as_bytes())
        {
            return Err(err("targets are not sorted and unique".into()));
        }
        targets.push(t);
    }
    let mut n = [0u8; 8];
    r.exact(&mut n).map_err(io)?;
    let entries = u64::from_le_bytes(n);
    let header = SumsHeader {
        origin,
        block_size,
        targets,
        entries,
    };
    let rest = len.checked_sub(r.read + 32);
    if rest.is_none_or(|rest| entries.checked_mul(ENTRY_LEN as u64) != Some(rest)) {
        return Err(err(format!(
            "{entries} entries do not fill the {len} bytes"
        )));
    }
    let bs = u64::from(block_size);
    let mut last: Option<(u32, u64)> = None;
    let mut raw = [0u8; ENTRY_LEN];
    for _ in 0..entries {
        r.exact(&mut raw).map_err(io)?;
        let e = SumEntry {
            target: u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes")),
            offset: u64::from_le_bytes(raw[4..12].try_into().expect("8 bytes")),
            length: u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes")),
            hash: raw[16..48].try_into().expect("32 bytes"),
        };
        if e.target >= count
            || !e.offset.is_multiple_of(bs)
            || e.length == 0
            || u64::from(e.length) > bs
            || e.offset.checked_add(u64::from(e.length)).is_none()
        {
            return Err(err(format!(
                "entry at {} of target {} is out of bounds",
                e.offset, e.target
            )));
        }
        if last.is_some_and(|l| l >= (e.target, e.offset)) {
            return Err(err("entries are not in (target, offset) order".into()));
        }
        last = Some((e.target, e.offset));
        each(&header, e).map_err(&err)?;
    }
    let mut trailer = [0u8; 32];
    r.inner.read_exact(&mut trailer).map_err(io)?;
    if r.hasher.finalize().as_bytes() != &trailer {
        return Err(err("checksum mismatch (damaged or truncated)".into()));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bytes {
        let mut b = SumsBuilder::new(7, 4096, vec!["a".into(), "b/c".into()]);
        b.push(SumEntry {
            target: 1,
            offset: 4096,
            length: 10,
            hash: [2; 32],
        });
        b.push(SumEntry {
            target: 0,
            offset: 0,
            length: 4096,
            hash: [1; 32],
        });
        b.finish()
    }

    fn read(data: &[u8]) -> Result<(SumsHeader, Vec<SumEntry>), SumsError> {
        let mut out = Vec::new();
        let h = decode("s", data, data.len() as u64, |_, e| {
            out.push(e);
            Ok(())
        })?;
        Ok((h, out))
    }

    /// The bytes `docs/format.md` gives (*Resync sums*, test vector).
    #[test]
    fn the_documented_test_vector() {
        let zero = blake3::hash(&[0u8; 4096]);
        assert!(zero.to_hex().starts_with("b6fb73fc"));
        let mut b = SumsBuilder::new(7, 4096, vec!["a".into()]);
        b.push(SumEntry {
            target: 0,
            offset: 0,
            length: 4096,
            hash: *zero.as_bytes(),
        });
        let bytes = b.finish();
        assert_eq!(bytes.len(), 119);
        let head = "4c4253554d5300000100000000100000070000000000000001000000010061010000000000000000000000000000000000000000100000";
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&hex[..head.len()], head);
        assert_eq!(&bytes[55..87], zero.as_bytes());
        assert_eq!(
            &hex[174..],
            "de2d710745b05e72ee7ae712084a6e5e7052bc471e8b3f662131e3862bc9120b",
            "trailer"
        );
        let (h, entries) = read(&bytes).unwrap();
        assert_eq!((h.origin, h.block_size, entries.len()), (7, 4096, 1));
    }

    #[test]
    fn sums_read_back_sorted() {
        assert_eq!(peek_origin(&sample()), Some(7));
        let (h, entries) = read(&sample()).unwrap();
        assert_eq!(h.origin, 7);
        assert_eq!(h.targets, ["a", "b/c"]);
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].target, entries[1].offset), (0, 4096));
    }

    #[test]
    fn every_damaged_byte_and_every_truncation_is_refused() {
        let good = sample().to_vec();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(read(&bad).is_err(), "byte {i} flipped was accepted");
        }
        for n in 0..good.len() {
            assert!(read(&good[..n]).is_err(), "truncated to {n} was accepted");
        }
    }

    #[test]
    fn entries_out_of_order_or_out_of_bounds_are_refused() {
        for (target, offset, length) in [(0, 0, 4096), (0, 1, 10), (0, 8192, 0), (5, 0, 1)] {
            let mut b = SumsBuilder::new(7, 4096, vec!["a".into()]);
            b.push(SumEntry {
                target: 0,
                offset: 0,
                length: 4096,
                hash: [1; 32],
            });
            // `finish` sorts; a duplicate position stays a duplicate.
            b.push(SumEntry {
                target,
                offset,
                length,
                hash: [3; 32],
            });
            let err = read(&b.finish()).unwrap_err().to_string();
            assert!(
                err.contains("order") || err.contains("bounds"),
                "{target}/{offset}/{length}: {err}"
            );
        }
        for targets in [vec!["../x"], vec!["b", "a"], vec!["a", "a"], vec!["", "a"]] {
            let b = SumsBuilder::new(7, 4096, targets.iter().map(|t| t.to_string()).collect());
            assert!(read(&b.finish()).is_err(), "{targets:?}");
        }
    }
}
