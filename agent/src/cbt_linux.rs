//! Driverless changed-block tracking on Linux: a small eBPF program on the block layer's
//! tracepoints records, per block of a protected device, the epoch in which it was last
//! written, in maps pinned under `/sys/fs/bpf/lifeboat/` so tracking outlives agent restarts.
//!
//! Why this shape:
//! - **No kernel module, no compiler at build time.** The program is a few dozen instructions
//!   assembled here; field offsets come from the tracepoints' `format` files at run time, so it
//!   loads on any kernel with BPF and these tracepoints, without BTF, clang or kernel headers.
//! - **Two tracepoints.** `block:block_bio_queue` sees every bio submitted to any block device
//!   (partitions report their own `dev` and sectors already remapped to the whole disk);
//!   `block:block_rq_complete` marks the same range again when a request-based device (virtio,
//!   NVMe, SCSI, loop) completes it, so a write still in flight while a read-out reads its
//!   block is seen again after it lands. Bio-based stacks (dm, md) report no completion, so
//!   they are not tracked: they are scanned, and `status` says why.
//! - **Marks only grow.** A mark is a compare-and-swap to the maximum, so a program that
//!   loaded the epoch before a switch and stores after it can lower nothing.
//! - **Epochs, not bits.** Each block holds the epoch of its last write (`u32`), each chunk of
//!   4096 blocks a coarse epoch for writes too long to mark block by block (discards), and a
//!   counter counts writes too long even for that (the agent then scans). A read-out advances
//!   the epoch and collects blocks marked since the cursor; nothing is ever cleared, so a
//!   read-out whose data is thrown away (an abandoned cut) loses nothing: its cursor is simply
//!   not kept. A mark racing the switch can land after the scan with the old epoch, so the
//!   cursor keeps the old epoch and the blocks it already collected at it ([`Cursor::seen`]):
//!   a block marked later at that epoch, not among them, is read next time.
//! - **Generations.** Each set of maps has a random generation; the agent's state records the
//!   generation and epoch its last tag covers. Any discontinuity — new maps (first start,
//!   reboot, maps removed), device resized or replaced (`diskseq`), partitions changed,
//!   overflow — makes the next pass a checksum scan, never a full copy, with the reason.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where tracking state is pinned (the conventional bpffs mount).
const BPFFS: &str = "/sys/fs/bpf";
const TRACEFS: &str = "/sys/kernel/tracing";
/// Blocks per chunk (one map value).
const CHUNK_BLOCKS: u64 = 4096;
/// Longest write marked block by block; longer ones mark whole chunks.
const FINE_LIMIT: i32 = 64;
/// Longest write (in chunks) marked chunk by chunk; longer ones count as overflow.
const COARSE_LIMIT: i32 = 256;

/// Slots of the `meta` map.
const META_EPOCH: u32 = 0;
const META_GENERATION: u32 = 1;
const META_OVERFLOWS: u32 = 2;
const META_NBLOCKS: u32 = 3;
const META_SHIFT: u32 = 4;
const META_DISKSEQ: u32 = 5;
const META_DEV: u32 = 6;
/// A fingerprint of the set of tracked devs (the disk and its partitions).
const META_DEVS: u32 = 7;
const META_SLOTS: u32 = 8;

/// Where the agent is in a tracker's history: blocks marked with an epoch after `since`, or
/// at `since` but not in `seen`, are dirty. Kept in the disk's state with its last tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub generation: u64,
    pub since: u32,
    /// Overflow count already covered by a scan.
    pub overflows: u64,
    /// Blocks collected at epoch `since` (a racing late mark re-marks one not in here); kept
    /// with the state, or every block written just before a cut would be read twice.
    #[serde(default)]
    pub seen: Vec<u64>,
}

/// A tracker for one block device.
#[derive(Debug)]
pub struct Tracker {
    pin: PathBuf,
    device: PathBuf,
    meta: OwnedFd,
    chunks: OwnedFd,
    generation: u64,
    nblocks: u64,
    block_size: u64,
    diskseq: u64,
    devs: BTreeSet<u32>,
    /// For an image tracked through its loop device: the image and its (dev, inode) when
    /// tracking began.
    image: Option<(PathBuf, u64, u64)>,
}

/// How [`Tracker::open`] found the tracking state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Pinned maps of an earlier run, still continuous.
    Resumed,
    /// New maps; the reason says why the old ones (if any) could not be used.
    Started(String),
}

/// The result of a read-out: the dirty blocks (sorted) and the cursor to keep once they are
/// shipped.
#[derive(Debug)]
pub struct ReadOut {
    pub blocks: Vec<u64>,
    pub cursor: Cursor,
}

impl Tracker {
    /// Opens (or starts) tracking of `device` at `block_size`, pinned under `key`.
    pub fn open(device: &Path, block_size: u32, key: &str) -> Result<(Tracker, Opened), String> {
        let id = DeviceId::of(device)?;
        ensure_mounted(BPFFS, "bpf", 0xcafe_4a11)?;
        ensure_mounted(TRACEFS, "tracefs", 0x7472_6163)?;
        let pin = Path::new(BPFFS).join("lifeboat").join(key);
        let want = Meta {
            nblocks: id.size.div_ceil(block_size as u64),
            shift: (block_size / 512).trailing_zeros() as u64,
            diskseq: id.diskseq,
            dev: id.kdev as u64,
            devs: fingerprint(&id.devs),
        };
        if want.nblocks > i32::MAX as u64 {
            return Err("the device has more blocks than the tracker numbers (2^31); use a larger block_size".into());
        }
        if !id.blk_mq {
            // Bio-based stacks (dm, md) report no request completion: a write in flight across
            // a read-out would get no second mark. Scanning is slower, not wrong.
            return Err("a bio-based device (device-mapper, md): the tracker cannot see its writes complete".into());
        }
        let reason = match Tracker::resume(&pin, device, &id, block_size, &want) {
            Ok(t) => return Ok((t, Opened::Resumed)),
            Err(reason) => reason,
        };
        let _ = std::fs::remove_dir_all(&pin);
        let t = Tracker::create(&pin, device, &id, block_size, &want)?;
        Ok((t, Opened::Started(reason)))
    }

    fn resume(
        pin: &Path,
        device: &Path,
        id: &DeviceId,
        block_size: u32,
        want: &Meta,
    ) -> Result<Tracker, String> {
        if !pin.exists() {
            return Err("no tracking state pinned (first start, or the machine rebooted)".into());
        }
        let get = |name: &str| obj_get(&pin.join(name)).map_err(|e| format!("pinned {name}: {e}"));
        let meta = get("meta")?;
        let chunks = get("chunks")?;
        // Maps pinned by another version of the agent may have other sizes: reading them
        // into our buffers would overflow them.
        if map_info(&meta).ok() != Some((BPF_MAP_TYPE_ARRAY, 4, 8, META_SLOTS)) {
            return Err("the pinned maps have another layout (another agent version?)".into());
        }
        // The links keep the programs attached; without them nothing was tracked.
        get("link-queue")?;
        get("link-complete")?;
        let m = |slot| lookup_u64(&meta, slot).map_err(|e| format!("reading pinned meta: {e}"));
        if m(META_NBLOCKS)? != want.nblocks || m(META_SHIFT)? != want.shift {
            return Err("the device was resized or the block size changed".into());
        }
        let nchunks = want.nblocks.div_ceil(CHUNK_BLOCKS).max(1);
        let chunk_layout = (
            BPF_MAP_TYPE_ARRAY,
            4,
            ((CHUNK_BLOCKS + 1) * 4) as u32,
            nchunks as u32,
        );
        if map_info(&chunks).ok() != Some(chunk_layout) {
            return Err("the pinned maps have another layout (another agent version?)".into());
        }
        if m(META_DISKSEQ)? != want.diskseq || m(META_DEV)? != want.dev {
            return Err("the device was replaced (its disk sequence number changed)".into());
        }
        if m(META_DEVS)? != want.devs {
            return Err("the device's partitions changed".into());
        }
        let t = Tracker {
            pin: pin.to_owned(),
            device: device.to_owned(),
            generation: m(META_GENERATION)?,
            meta,
            chunks,
            nblocks: want.nblocks,
            block_size: block_size as u64,
            diskseq: id.diskseq,
            devs: id.devs.clone(),
            image: None,
        };
        Ok(t)
    }

    fn create(
        pin: &Path,
        device: &Path,
        id: &DeviceId,
        block_size: u32,
        want: &Meta,
    ) -> Result<Tracker, String> {
        let fail = |what: &str, e: io::Error| format!("cannot {what}: {e}");
        let nchunks = want.nblocks.div_ceil(CHUNK_BLOCKS).max(1);
        let meta = map_create(BPF_MAP_TYPE_ARRAY, 4, 8, META_SLOTS)
            .map_err(|e| fail("create the BPF map", e))?;
        let chunks = map_create(
            BPF_MAP_TYPE_ARRAY,
            4,
            ((CHUNK_BLOCKS + 1) * 4) as u32,
            u32::try_from(nchunks).map_err(|_| "device too large to track".to_string())?,
        )
        .map_err(|e| fail("create the BPF map", e))?;
        let devs =
            map_create(BPF_MAP_TYPE_HASH, 4, 4, 256).map_err(|e| fail("create the BPF map", e))?;
        for d in &id.devs {
            update(&devs, &d.to_ne_bytes(), &0u32.to_ne_bytes())
                .map_err(|e| fail("fill the device map", e))?;
        }
        let generation = random_u64();
        for (slot, v) in [
            (META_EPOCH, 1),
            (META_GENERATION, generation),
            (META_OVERFLOWS, 0),
            (META_NBLOCKS, want.nblocks),
            (META_SHIFT, want.shift),
            (META_DISKSEQ, want.diskseq),
            (META_DEV, want.dev),
            (META_DEVS, want.devs),
        ] {
            update(&meta, &slot.to_ne_bytes(), &v.to_ne_bytes())
                .map_err(|e| fail("initialise the BPF map", e))?;
        }
        let maps = Maps {
            devs: devs.as_raw_fd(),
            meta: meta.as_raw_fd(),
            chunks: chunks.as_raw_fd(),
        };
        std::fs::create_dir_all(pin).map_err(|e| fail("create the pin directory", e))?;
        let pin_obj = |fd: &OwnedFd, name: &str| {
            obj_pin(fd, &pin.join(name)).map_err(|e| fail(&format!("pin {name}"), e))
        };
        for (tp, link_name) in [
            ("block_bio_queue", "link-queue"),
            ("block_rq_complete", "link-complete"),
        ] {
            let fields = Fields::of(tp)?;
            let insns = program(&fields, &maps, want.shift as i32, want.nblocks);
            let prog = prog_load(&insns)
                .map_err(|e| format!("the kernel refused the tracking program for {tp}: {e}"))?;
            let event = perf_tracepoint(fields.id)
                .map_err(|e| fail(&format!("open tracepoint {tp}"), e))?;
            let link =
                link_create(&prog, &event).map_err(|e| fail(&format!("attach to {tp}"), e))?;
            pin_obj(&link, link_name)?;
        }
        pin_obj(&meta, "meta")?;
        pin_obj(&chunks, "chunks")?;
        pin_obj(&devs, "devs")?;
        Ok(Tracker {
            pin: pin.to_owned(),
            device: device.to_owned(),
            meta,
            chunks,
            generation,
            nblocks: want.nblocks,
            block_size: block_size as u64,
            diskseq: id.diskseq,
            devs: id.devs.clone(),
            image: None,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Ties the tracker to the image file behind its loop device: replacing the file, or
    /// detaching it, is a discontinuity.
    pub fn bind_image(&mut self, image: &Path) -> Result<(), String> {
        let m = std::fs::metadata(image)
            .map_err(|e| format!("cannot stat {}: {e}", image.display()))?;
        self.image = Some((image.to_owned(), m.dev(), m.ino()));
        Ok(())
    }

    /// Whether the maps still describe this device as it is now; the reason if not.
    pub fn check(&self) -> Result<(), String> {
        let id = DeviceId::of(&self.device)?;
        if id.size.div_ceil(self.block_size) != self.nblocks {
            return Err("the device was resized".into());
        }
        if id.diskseq != self.diskseq {
            return Err("the device was replaced (its disk sequence number changed)".into());
        }
        if id.devs != self.devs {
            return Err("the device's partitions changed".into());
        }
        if !self.pin.join("link-queue").exists() || !self.pin.join("link-complete").exists() {
            return Err("the tracking programs were detached (pins removed)".into());
        }
        if let Some((image, dev, ino)) = &self.image {
            let m = std::fs::metadata(image)
                .map_err(|e| format!("cannot stat {}: {e}", image.display()))?;
            if (m.dev(), m.ino()) != (*dev, *ino) {
                return Err("the image file was replaced".into());
            }
            if loop_device_of(image).ok().as_deref() != Some(self.device.as_path()) {
                return Err("the image was detached from its loop device".into());
            }
        }
        // The pinned maps, not the ones this process holds: someone may have removed the pins
        // and started tracking anew, detaching the programs that fill ours.
        let pinned = obj_get(&self.pin.join("meta")).map_err(|e| format!("pinned meta: {e}"))?;
        match lookup_u64(&pinned, META_GENERATION) {
            Ok(g) if g == self.generation => Ok(()),
            Ok(_) => Err("the tracking maps were reset".into()),
            Err(e) => Err(format!("cannot read the tracking maps: {e}")),
        }
    }

    /// Starts a new epoch; returns the one that ended. Writes from now on carry a later epoch.
    pub fn switch(&self) -> io::Result<u32> {
        let e = lookup_u64(&self.meta, META_EPOCH)?;
        update(
            &self.meta,
            &META_EPOCH.to_ne_bytes(),
            &(e + 1).to_ne_bytes(),
        )?;
        Ok(e as u32)
    }

    /// A cursor for a pass that is about to read the whole device (a scan): everything
    /// written before this call is covered by that pass.
    pub fn cursor_for_scan(&self) -> io::Result<Cursor> {
        let overflows = lookup_u64(&self.meta, META_OVERFLOWS)?;
        let since = self.switch()?;
        Ok(Cursor {
            generation: self.generation,
            since,
            overflows,
            seen: Vec::new(),
        })
    }

    /// Switches the epoch and collects the blocks written since `cursor`. `Err` with a reason
    /// when the cursor cannot vouch for them (another generation, overflow): scan instead.
    pub fn read_out(&self, cursor: &Cursor) -> Result<ReadOut, String> {
        if cursor.generation != self.generation {
            return Err("tracking restarted since the last tag (new generation)".into());
        }
        let io = |e: io::Error| format!("cannot read the tracking maps: {e}");
        let overflows = lookup_u64(&self.meta, META_OVERFLOWS).map_err(io)?;
        if overflows != cursor.overflows {
            return Err("a single write was too long to track block by block (a discard of the whole disk?)".into());
        }
        let ended = self.switch().map_err(io)?;
        let seen: BTreeSet<u64> = cursor.seen.iter().copied().collect();
        let mut blocks = Vec::new();
        let mut at_ended = Vec::new();
        let nchunks = self.nblocks.div_ceil(CHUNK_BLOCKS);
        let mut value = vec![0u8; ((CHUNK_BLOCKS + 1) * 4) as usize];
        for c in 0..nchunks {
            lookup(&self.chunks, &(c as u32).to_ne_bytes(), &mut value).map_err(io)?;
            let slot = |j: usize| u32::from_ne_bytes(value[j * 4..j * 4 + 4].try_into().unwrap());
            let coarse = slot(0);
            let first = c * CHUNK_BLOCKS;
            for j in 0..CHUNK_BLOCKS.min(self.nblocks - first) {
                let e = slot(j as usize + 1).max(coarse);
                if e == 0 {
                    continue;
                }
                let b = first + j;
                if e > cursor.since || (e == cursor.since && !seen.contains(&b)) {
                    blocks.push(b);
                    if e == ended {
                        at_ended.push(b);
                    }
                }
            }
        }
        Ok(ReadOut {
            blocks,
            cursor: Cursor {
                generation: self.generation,
                since: ended,
                overflows,
                seen: at_ended,
            },
        })
    }
}

/// Stops tracking under `key`: removing the pinned links detaches the programs, and the maps
/// go with the last reference. Returns whether anything was pinned.
pub fn forget(key: &str) -> io::Result<bool> {
    let pin = Path::new(BPFFS).join("lifeboat").join(key);
    match std::fs::remove_dir_all(&pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The loop device an image file is attached to (at offset 0, whole file), through which its
/// writes can be tracked; the reason if there is none. While attached, the loop device is
/// taken to be the image's only writer (anything else writing the file under a mounted
/// filesystem would corrupt it anyway).
pub fn loop_device_of(image: &Path) -> Result<PathBuf, String> {
    let image = image
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", image.display()))?;
    let mut found = Vec::new();
    for e in std::fs::read_dir("/sys/block").map_err(|e| format!("cannot list /sys/block: {e}"))? {
        let Ok(e) = e else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let attr = |a: &str| std::fs::read_to_string(e.path().join("loop").join(a)).ok();
        let Some(backing) = attr("backing_file") else {
            continue;
        };
        if Path::new(backing.trim_end_matches('\n')) != image {
            continue;
        }
        let zero = |a: &str| attr(a).is_none_or(|v| v.trim() == "0");
        if std::fs::read_to_string(e.path().join("ro")).is_ok_and(|v| v.trim() == "1") {
            return Err(format!(
                "/dev/{name} is a read-only loop device: something else writes the image"
            ));
        }
        if !zero("offset") || !zero("sizelimit") {
            return Err(format!(
                "/dev/{name} maps only part of the image (offset or size limit)"
            ));
        }
        found.push(Path::new("/dev").join(&name));
    }
    match found.len() {
        0 => Err("the image is not attached to a loop device, so its writers (a hypervisor?) bypass the block layer the tracker sees".into()),
        1 => Ok(found.remove(0)),
        _ => Err("the image is attached to several loop devices".into()),
    }
}

/// Whether tracking can run here, by loading the program (verifier included) without
/// attaching it or pinning anything; the reason if not.
pub fn probe() -> Result<(), String> {
    ensure_mounted(TRACEFS, "tracefs", 0x7472_6163)?;
    let m = |t, v| map_create(t, 4, v, 1).map_err(|e| format!("BPF maps unavailable: {e}"));
    let (devs, meta, chunks) = (
        map_create(BPF_MAP_TYPE_HASH, 4, 4, 1).map_err(|e| format!("BPF maps unavailable: {e}"))?,
        m(BPF_MAP_TYPE_ARRAY, 8)?,
        m(BPF_MAP_TYPE_ARRAY, ((CHUNK_BLOCKS + 1) * 4) as u32)?,
    );
    let maps = Maps {
        devs: devs.as_raw_fd(),
        meta: meta.as_raw_fd(),
        chunks: chunks.as_raw_fd(),
    };
    for tp in ["block_bio_queue", "block_rq_complete"] {
        let fields = Fields::of(tp)?;
        prog_load(&program(&fields, &maps, 7, 1))
            .map_err(|e| format!("the kernel refused the tracking program for {tp}: {e}"))?;
    }
    Ok(())
}

struct Meta {
    nblocks: u64,
    shift: u64,
    diskseq: u64,
    dev: u64,
    devs: u64,
}

fn fingerprint(devs: &BTreeSet<u32>) -> u64 {
    let mut h = blake3::Hasher::new();
    for d in devs {
        h.update(&d.to_le_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// What identifies a device's contents to the tracker.
struct DeviceId {
    /// The kernel's dev_t (major << 20 | minor), as the tracepoints report it.
    kdev: u32,
    size: u64,
    diskseq: u64,
    /// The device and its partitions.
    devs: BTreeSet<u32>,
    /// A request-based (blk-mq) device: completions are traced.
    blk_mq: bool,
}

impl DeviceId {
    fn of(device: &Path) -> Result<Self, String> {
        let m = std::fs::metadata(device)
            .map_err(|e| format!("cannot stat {}: {e}", device.display()))?;
        if !m.file_type().is_block_device() {
            return Err(format!("{} is not a block device", device.display()));
        }
        let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        let kdev = |ma: u32, mi: u32| (ma << 20) | mi;
        let sys = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
        if sys.join("partition").exists() {
            return Err("a partition is tracked through its whole disk; protect the disk".into());
        }
        let size = {
            use std::io::Seek;
            let mut f = std::fs::File::open(device)
                .map_err(|e| format!("cannot open {}: {e}", device.display()))?;
            f.seek(io::SeekFrom::End(0)).map_err(|e| e.to_string())?
        };
        let diskseq = std::fs::read_to_string(sys.join("diskseq"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut devs = BTreeSet::from([kdev(major, minor)]);
        if let Ok(entries) = std::fs::read_dir(&sys) {
            for e in entries.flatten() {
                let p = e.path();
                if p.join("partition").exists()
                    && let Ok(d) = std::fs::read_to_string(p.join("dev"))
                    && let Some((ma, mi)) = d.trim().split_once(':')
                    && let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse())
                {
                    devs.insert(kdev(ma, mi));
                }
            }
        }
        Ok(DeviceId {
            kdev: kdev(major, minor),
            size,
            diskseq,
            devs,
            blk_mq: sys.join("mq").exists(),
        })
    }
}

/// Offsets of the fields the program reads, from the tracepoint's `format` file.
struct Fields {
    id: u64,
    dev: i16,
    sector: i16,
    nr_sector: i16,
    rwbs: i16,
}

impl Fields {
    fn of(tp: &str) -> Result<Self, String> {
        let dir = Path::new(TRACEFS).join("events/block").join(tp);
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| format!("tracepoint block:{tp} unavailable ({f}: {e})"))
        };
        let id = read("id")?
            .trim()
            .parse()
            .map_err(|_| format!("block:{tp}: bad id"))?;
        let format = read("format")?;
        let field = |name: &str, size: u32| -> Result<i16, String> {
            for line in format.lines() {
                let Some(decl) = line.trim().strip_prefix("field:") else {
                    continue;
                };
                let mut parts = decl.split(';').map(str::trim);
                let ty = parts.next().unwrap_or("");
                let named = ty
                    .rsplit(' ')
                    .next()
                    .is_some_and(|n| n == name || n.starts_with(&format!("{name}[")));
                if !named {
                    continue;
                }
                let get = |key: &str| {
                    decl.split(';')
                        .map(str::trim)
                        .find_map(|p| p.strip_prefix(key))
                        .and_then(|v| v.parse::<u32>().ok())
                };
                let (Some(off), Some(sz)) = (get("offset:"), get("size:")) else {
                    break;
                };
                // rwbs is read byte by byte; the others whole, aligned as the verifier wants.
                let ok = if name == "rwbs" {
                    sz >= 2
                } else {
                    sz == size && off % size == 0
                };
                if !ok {
                    return Err(format!("block:{tp}: field {name} has an unexpected layout"));
                }
                return i16::try_from(off).map_err(|_| format!("block:{tp}: field {name} too far"));
            }
            Err(format!("block:{tp}: no field {name}"))
        };
        Ok(Fields {
            id,
            dev: field("dev", 4)?,
            sector: field("sector", 8)?,
            nr_sector: field("nr_sector", 4)?,
            rwbs: field("rwbs", 1)?,
        })
    }
}

struct Maps {
    devs: i32,
    meta: i32,
    chunks: i32,
}

// ---- the program ----

/// One BPF instruction.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;

const W: u8 = 0x00;
const B: u8 = 0x10;
const DW: u8 = 0x18;

/// A tiny assembler with forward labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: std::collections::HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
    }
    fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.insns.len());
    }
    fn mov(&mut self, dst: u8, src: u8) {
        self.raw(0x07 | 0xb0 | 0x08, dst, src, 0, 0);
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0x07 | 0xb0, dst, 0, 0, imm);
    }
    /// 64-bit ALU with an immediate: `op` is BPF_ADD (0x00), BPF_SUB (0x10), BPF_AND (0x50),
    /// BPF_LSH (0x60), BPF_RSH (0x70).
    fn alu_imm(&mut self, op: u8, dst: u8, imm: i32) {
        self.raw(0x07 | op, dst, 0, 0, imm);
    }
    fn alu(&mut self, op: u8, dst: u8, src: u8) {
        self.raw(0x07 | op | 0x08, dst, src, 0, 0);
    }
    fn ldx(&mut self, size: u8, dst: u8, src: u8, off: i16) {
        self.raw(0x01 | size | 0x60, dst, src, off, 0);
    }
    fn stx(&mut self, size: u8, dst: u8, src: u8, off: i16) {
        self.raw(0x03 | size | 0x60, dst, src, off, 0);
    }
    fn st_imm(&mut self, size: u8, dst: u8, off: i16, imm: i32) {
        self.raw(0x02 | size | 0x60, dst, 0, off, imm);
    }
    /// Atomic `*(u64 *)(dst + off) += src`.
    fn atomic_add(&mut self, dst: u8, src: u8, off: i16) {
        self.raw(0x03 | DW | 0xc0, dst, src, off, 0);
    }
    /// `*(u32 *)slot = max(*slot, r9)`, atomically: marks only ever grow, so a program that
    /// loaded an older epoch and stores late cannot hide a newer mark. A compare-and-swap,
    /// retried a few times (each failure means another CPU raised the value), unrolled so the
    /// verifier sees straight-line code. `slot` is clobbered; r0–r3 are scratch.
    fn mark_max(&mut self, slot: u8, done: &'static str) {
        self.mov(R2, slot);
        for _ in 0..4 {
            self.ldx(W, R0, R2, 0);
            self.jmp_reg(JGE, R0, R9, done);
            self.mov(R3, R0);
            // BPF_STX | BPF_W | BPF_ATOMIC, imm BPF_CMPXCHG: r0 = cmpxchg(*(u32 *)(r2), r0, r9).
            self.raw(0x03 | W | 0xc0, R2, R9, 0, 0xf1);
            self.jmp_reg(JEQ, R0, R3, done);
        }
    }
    fn ld_map(&mut self, dst: u8, fd: i32) {
        // BPF_LD | BPF_DW | BPF_IMM with src = BPF_PSEUDO_MAP_FD: the kernel swaps in the map.
        self.raw(0x18, dst, 1, 0, fd);
        self.raw(0, 0, 0, 0, 0);
    }
    /// Conditional jump on an immediate: `op` is JEQ (0x10), JGE (0x30), JLT (0xa0).
    fn jmp_imm(&mut self, op: u8, dst: u8, imm: i32, to: &'static str) {
        self.fixups.push((self.insns.len(), to));
        self.raw(0x05 | op, dst, 0, 0, imm);
    }
    fn jmp_reg(&mut self, op: u8, dst: u8, src: u8, to: &'static str) {
        self.fixups.push((self.insns.len(), to));
        self.raw(0x05 | op | 0x08, dst, src, 0, 0);
    }
    fn ja(&mut self, to: &'static str) {
        self.fixups.push((self.insns.len(), to));
        self.raw(0x05, 0, 0, 0, 0);
    }
    /// `r0 = bpf_map_lookup_elem(map, r10 + key)`, or end the program if there is no entry.
    fn lookup_or_exit(&mut self, map: i32, key: i16) {
        self.ld_map(R1, map);
        self.mov(R2, R10);
        self.alu_imm(ADD, R2, key as i32);
        self.call(MAP_LOOKUP_ELEM);
        self.jmp_imm(JEQ, R0, 0, "exit");
    }
    fn call(&mut self, helper: i32) {
        self.raw(0x05 | 0x80, 0, 0, 0, helper);
    }
    fn exit(&mut self) {
        self.raw(0x05 | 0x90, 0, 0, 0, 0);
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in std::mem::take(&mut self.fixups) {
            let target = self.labels[to] as isize;
            self.insns[at].off = (target - at as isize - 1) as i16;
        }
        self.insns
    }
}

const ADD: u8 = 0x00;
const AND: u8 = 0x50;
const LSH: u8 = 0x60;
const RSH: u8 = 0x70;
const SUB: u8 = 0x10;
const JEQ: u8 = 0x10;
const JGE: u8 = 0x30;
const JLT: u8 = 0xa0;
const JLE: u8 = 0xb0;
const MAP_LOOKUP_ELEM: i32 = 1;

/// The tracking program for one tracepoint (see the module docs): for a write to a tracked
/// device, stamp the current epoch on every block it touches.
fn program(f: &Fields, maps: &Maps, shift: i32, nblocks: u64) -> Vec<Insn> {
    // Callers refuse devices past this (see `Tracker::open`): block numbers are immediates.
    let nblocks = nblocks.min(i32::MAX as u64) as i32;
    let mut a = Asm::default();
    a.mov(R6, R1);
    // Is the device (or a partition of it) tracked?
    a.ldx(W, R1, R6, f.dev);
    a.stx(W, R10, R1, -4);
    a.lookup_or_exit(maps.devs, -4);
    // Reads change nothing ('R' is the op letter, after an optional 'F' for a preflush).
    a.ldx(B, R1, R6, f.rwbs);
    a.jmp_imm(JEQ, R1, b'R' as i32, "exit");
    a.ldx(B, R1, R6, f.rwbs + 1);
    a.jmp_imm(JEQ, R1, b'R' as i32, "exit");
    // Blocks first ..= last.
    a.ldx(DW, R7, R6, f.sector);
    a.ldx(W, R8, R6, f.nr_sector);
    a.jmp_imm(JEQ, R8, 0, "exit");
    a.alu(ADD, R8, R7);
    a.alu_imm(ADD, R8, -1);
    a.alu_imm(RSH, R7, shift);
    a.alu_imm(RSH, R8, shift);
    a.jmp_imm(JGE, R7, nblocks, "exit");
    a.jmp_imm(JLT, R8, nblocks, "clamped");
    a.mov_imm(R8, nblocks - 1);
    a.label("clamped");
    // The current epoch.
    a.st_imm(W, R10, -8, META_EPOCH as i32);
    a.lookup_or_exit(maps.meta, -8);
    a.ldx(DW, R9, R0, 0);
    a.mov(R1, R8);
    a.alu(SUB, R1, R7);
    a.jmp_imm(JGE, R1, FINE_LIMIT, "coarse");
    // Block by block; the counter bounds the loop for the verifier.
    a.mov_imm(R6, 0);
    a.label("fine");
    a.mov(R1, R7);
    a.alu_imm(RSH, R1, 12);
    a.stx(W, R10, R1, -12);
    a.lookup_or_exit(maps.chunks, -12);
    a.mov(R1, R7);
    a.alu_imm(AND, R1, (CHUNK_BLOCKS - 1) as i32);
    a.alu_imm(ADD, R1, 1);
    a.alu_imm(LSH, R1, 2);
    a.alu(ADD, R0, R1);
    a.mark_max(R0, "fine_next");
    a.label("fine_next");
    a.alu_imm(ADD, R6, 1);
    a.alu_imm(ADD, R7, 1);
    a.jmp_imm(JGE, R6, FINE_LIMIT, "exit");
    a.jmp_reg(JLE, R7, R8, "fine");
    a.ja("exit");
    // Chunk by chunk (slot 0 of each chunk).
    a.label("coarse");
    a.alu_imm(RSH, R7, 12);
    a.alu_imm(RSH, R8, 12);
    a.mov(R1, R8);
    a.alu(SUB, R1, R7);
    a.jmp_imm(JGE, R1, COARSE_LIMIT, "overflow");
    a.mov_imm(R6, 0);
    a.label("cloop");
    a.stx(W, R10, R7, -12);
    a.lookup_or_exit(maps.chunks, -12);
    a.mark_max(R0, "cloop_next");
    a.label("cloop_next");
    a.alu_imm(ADD, R6, 1);
    a.alu_imm(ADD, R7, 1);
    a.jmp_imm(JGE, R6, COARSE_LIMIT, "exit");
    a.jmp_reg(JLE, R7, R8, "cloop");
    a.ja("exit");
    // Too long even for chunks: count it; the agent scans.
    a.label("overflow");
    a.st_imm(W, R10, -8, META_OVERFLOWS as i32);
    a.lookup_or_exit(maps.meta, -8);
    a.mov_imm(R1, 1);
    a.atomic_add(R0, R1, 0);
    a.label("exit");
    a.mov_imm(R0, 0);
    a.exit();
    a.finish()
}

// ---- system calls ----

const BPF_MAP_CREATE: i32 = 0;
const BPF_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_PROG_LOAD: i32 = 5;
const BPF_OBJ_PIN: i32 = 6;
const BPF_OBJ_GET: i32 = 7;
const BPF_LINK_CREATE: i32 = 28;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PERF_EVENT: u32 = 41;

fn bpf<T>(cmd: i32, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] value of the layout the kernel expects
    // for `cmd` (a prefix of `union bpf_attr`); the kernel reads and writes only
    // `size_of::<T>()` bytes of it. Pointers inside it point to buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_of(rc: i64) -> OwnedFd {
    // SAFETY: `rc` is a new file descriptor the kernel just returned to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut a = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    bpf(BPF_MAP_CREATE, &mut a).map(fd_of)
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut a = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a).map(|_| ())
}

fn lookup_u64(map: &OwnedFd, slot: u32) -> io::Result<u64> {
    let mut v = [0u8; 8];
    lookup(map, &slot.to_ne_bytes(), &mut v)?;
    Ok(u64::from_ne_bytes(v))
}

fn update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut a = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0, // BPF_ANY
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

fn prog_load(insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(b"lifeboat");
    let mut log = vec![0u8; 1 << 16];
    let mut a = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACEPOINT,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
    };
    match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => Ok(fd_of(fd)),
        Err(e) => {
            // Load again with the verifier's log, to say why.
            a.log_level = 1;
            a.log_size = log.len() as u32;
            a.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, &mut a);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let tail: String = text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            Err(io::Error::new(e.kind(), format!("{e} ({tail})")))
        }
    }
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

const BPF_OBJ_GET_INFO_BY_FD: i32 = 15;

/// (type, key size, value size, max entries) of a map.
fn map_info(map: &OwnedFd) -> io::Result<(u32, u32, u32, u32)> {
    // struct bpf_map_info starts: type, id, key_size, value_size, max_entries (u32 each).
    let mut info = [0u32; 20];
    let mut a = InfoAttr {
        bpf_fd: map.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    Ok((info[0], info[2], info[3], info[4]))
}

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    let mut a = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut a).map(|_| ())
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    let mut a = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    bpf(BPF_OBJ_GET, &mut a).map(fd_of)
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
}

fn link_create(prog: &OwnedFd, event: &OwnedFd) -> io::Result<OwnedFd> {
    let mut a = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: event.as_raw_fd() as u32,
        attach_type: BPF_PERF_EVENT,
        flags: 0,
        bpf_cookie: 0,
    };
    bpf(BPF_LINK_CREATE, &mut a).map(fd_of)
}

/// A perf event on tracepoint `id` (any process, CPU 0: a BPF program attached to a
/// tracepoint event runs on every CPU).
fn perf_tracepoint(id: u64) -> io::Result<OwnedFd> {
    // struct perf_event_attr, first version (64 bytes): type, size, config, rest zero.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&2u32.to_ne_bytes()); // PERF_TYPE_TRACEPOINT
    attr[4..8].copy_from_slice(&64u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: `attr` is a 64-byte perf_event_attr (PERF_ATTR_SIZE_VER0) that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_mut_ptr(),
            -1i32,
            0i32,
            -1i32,
            8u64, // PERF_FLAG_FD_CLOEXEC
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd_of(rc))
    }
}

fn cpath(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

/// Mounts a pseudo filesystem (bpffs, tracefs) at its usual place if it is not there.
fn ensure_mounted(at: &str, fstype: &str, magic: i64) -> Result<(), String> {
    let c = cpath(Path::new(at)).map_err(|e| e.to_string())?;
    // SAFETY: `st` is plain old data the kernel fills; `c` is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc == 0 && st.f_type as u32 == magic as u32 {
        return Ok(());
    }
    let t = std::ffi::CString::new(fstype).expect("no NUL");
    // SAFETY: all three strings are valid and NUL-terminated; no data argument.
    let rc = unsafe { libc::mount(t.as_ptr(), c.as_ptr(), t.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "{fstype} is not mounted at {at} and cannot be: {}",
            io::Error::last_os_error()
        ))
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32);
    }
    u64::from_ne_bytes(b).max(1)
}
