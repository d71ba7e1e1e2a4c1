//! Linux half of filesystem freezing: FIFREEZE / FITHAW on a mount point (what `fsfreeze -f/-u`
//! does). Mirrored by `freeze_other.rs` on platforms without it (Windows uses VSS instead).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn ioctl(mount: &Path, request: libc::c_ulong) -> io::Result<()> {
    let dir = File::open(mount)?;
    // SAFETY: `dir` is an open descriptor for the duration of the call; FIFREEZE and FITHAW take
    // an int argument that the kernel ignores, and touch no memory of ours.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Freezes the filesystem mounted at `mount`: new writes block until it is thawed.
pub fn freeze(mount: &Path) -> io::Result<()> {
    ioctl(mount, FIFREEZE)
}

/// Thaws the filesystem at `mount`. Returns `Ok(false)` if it was not frozen.
pub fn thaw(mount: &Path) -> io::Result<bool> {
    match ioctl(mount, FITHAW) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The kernel's switch for expedited RCU grace periods. FIFREEZE waits for about three normal
/// grace periods (one per freeze level of the superblock's writer locks), 8–40 ms in all on an
/// idle machine whatever the filesystem has to write; expedited, the same call takes under a
/// millisecond.
const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// Expedited RCU grace periods while held: the switch is set on creation and cleared again on
/// drop, unless it was already set by someone else (then it is left alone).
#[derive(Debug)]
pub struct Expedited {
    set_by_us: bool,
}

/// Expedites RCU grace periods until the returned guard drops, when the kernel allows it (root,
/// a writable /sys); otherwise does nothing and the freeze takes its normal time.
pub fn expedite_grace_periods() -> Expedited {
    // Expedited grace periods interrupt every CPU, the ones isolated for latency-critical work
    // (nohz_full, isolcpus) included: on such a machine the freeze takes its normal time.
    let isolated = ["nohz_full", "isolated"].iter().any(|f| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/{f}"))
            .is_ok_and(|s| !s.trim().is_empty() && s.trim() != "(null)")
    });
    if isolated {
        tracing::debug!(
            "CPUs are isolated (nohz_full or isolcpus); RCU grace periods are not expedited"
        );
        return Expedited { set_by_us: false };
    }
    let set_by_us = match std::fs::read_to_string(RCU_EXPEDITED) {
        Ok(v) if v.trim() == "0" => match std::fs::write(RCU_EXPEDITED, "1") {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot expedite RCU grace periods; the freeze takes its normal time");
                false
            }
        },
        _ => false,
    };
    Expedited { set_by_us }
}

impl Expedited {
    /// Whether this guard set the switch (and will clear it).
    pub fn set_by_us(&self) -> bool {
        self.set_by_us
    }
}

impl Drop for Expedited {
    fn drop(&mut self) {
        if self.set_by_us {
            clear_expedited();
        }
    }
}

/// Clears the expedited-grace-period switch (an agent that set it died before clearing it).
pub fn clear_expedited() {
    if let Err(e) = std::fs::write(RCU_EXPEDITED, "0") {
        tracing::warn!(error = %e, "cannot clear {RCU_EXPEDITED}");
    }
}

/// Writes `line` to descriptor 0: the thaw guard's connection, which systemd hands it as
/// stdin (`StandardInput=socket`), is how it answers the agent.
pub fn reply_on_stdin(line: &str) -> io::Result<()> {
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        // SAFETY: writes from a live slice to descriptor 0, which this process does not close.
        let n = unsafe { libc::write(0, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        rest = &rest[n as usize..];
    }
    Ok(())
}

/// Writes back the dirty data of the filesystem at `mount` (syncfs), so the freeze that follows
/// has little left to flush: done before a group cut's Freeze, it shortens the freeze window.
pub fn sync(mount: &Path) -> io::Result<()> {
    let dir = File::open(mount)?;
    // SAFETY: `dir` is an open descriptor for the duration of the call; syncfs takes no memory.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `path` is on tmpfs, which has no freeze operation: a file made there can never block
/// on a freeze (unlike one on another btrfs subvolume of a frozen filesystem, whose `st_dev`
/// differs from the frozen mount's).
pub fn on_tmpfs(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a NUL-terminated path alive for the call; `s` is a plain C struct the
    // kernel fills.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Both are a `c_long` on some targets and not others.
    #[allow(clippy::unnecessary_cast)]
    Ok(s.f_type as i64 == libc::TMPFS_MAGIC as i64)
}

/// (device, inode, mount id) of `path` itself: a directory replaced, or a filesystem mounted
/// over it or remounted (which drops every inotify watch on it, silently), changes one of them.
pub fn identity(path: &Path) -> io::Result<(u64, u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: as above; `stx` is a plain C struct the kernel fills.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_INO | libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel reports no mount id",
        ));
    }
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    Ok((dev, stx.stx_ino, stx.stx_mnt_id))
}

/// Sends SIGKILL to every process of group `pgid` (a hook's: it runs in a group of its own).
pub fn kill_process_group(pgid: u32) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        // SAFETY: killpg only sends a signal.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
    }
}

/// Makes this process (the thaw watchdog) immune to SIGTERM, SIGINT and SIGHUP, so a service
/// manager stopping the agent's whole process group cannot take the watchdog down before it has
/// thawed, and to the job-control stops that can be ignored (SIGTSTP, SIGTTIN, SIGTTOU). SIGKILL
/// and SIGSTOP cannot be ignored; the watchdog's own process group keeps a group-wide SIGSTOP
/// off it, and by the time a manager escalates to SIGKILL the deadline has passed.
pub fn ignore_stop_signals() {
    for sig in [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ] {
        // SAFETY: installing SIG_IGN has no memory-safety preconditions; no handler code runs.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

/// What a disk's `mount` must hold for a freeze of it to hold the disk's writes.
#[derive(Debug, Clone, Copy)]
pub enum MountOf {
    /// The filesystem the directory tree lives on.
    Directory,
    /// The filesystem on this block device (or on one of its partitions).
    BlockDevice,
    /// The filesystem inside this image file, mounted through a loop device.
    Image,
}

/// Checks that `mount` is a mount point and that the filesystem mounted there is the one on
/// `disk`: otherwise freezing it would hold nobody's writes to the disk, and a point labelled
/// crash-consistent would be a lie. The error says what is mounted there instead.
pub fn verify_mount(mount: &Path, disk: &Path, what: MountOf) -> Result<(), String> {
    let canon = mount
        .canonicalize()
        .map_err(|e| format!("mount {} cannot be resolved: {e}", mount.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    // The last entry for a path is the one on top (later mounts hide earlier ones).
    let Some((major, minor)) = info
        .lines()
        .filter_map(parse_mountinfo)
        .filter(|(point, _)| *point == canon)
        .map(|(_, dev)| dev)
        .next_back()
    else {
        return Err(format!(
            "{} is not a mount point: set `mount` to where the disk's filesystem is mounted",
            mount.display()
        ));
    };
    let mounted = format!("{major}:{minor}");
    match what {
        MountOf::Directory => {
            let d = std::fs::metadata(disk)
                .map_err(|e| format!("cannot access {}: {e}", disk.display()))?;
            let m = std::fs::metadata(&canon)
                .map_err(|e| format!("cannot access {}: {e}", canon.display()))?;
            if d.dev() != m.dev() {
                return Err(format!(
                    "{} is not on the filesystem mounted at {}: freezing it would not hold the directory's writes",
                    disk.display(),
                    mount.display()
                ));
            }
            Ok(())
        }
        MountOf::BlockDevice => {
            let m = std::fs::metadata(disk)
                .map_err(|e| format!("cannot access {}: {e}", disk.display()))?;
            if !m.file_type().is_block_device() {
                return Err(format!("{} is not a block device", disk.display()));
            }
            let want = format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev()));
            if whole_disk(&mounted).as_deref() == Some(want.as_str()) || mounted == want {
                return Ok(());
            }
            Err(format!(
                "the filesystem mounted at {} is on device {mounted}{}, not on {} ({want}): set `mount` to where {} is mounted",
                mount.display(),
                dev_name(&mounted)
                    .map(|n| format!(" (/dev/{n})"))
                    .unwrap_or_default(),
                disk.display(),
                disk.display()
            ))
        }
        MountOf::Image => {
            let image = disk
                .canonicalize()
                .map_err(|e| format!("cannot access {}: {e}", disk.display()))?;
            let backing = [Some(mounted.clone()), whole_disk(&mounted)]
                .into_iter()
                .flatten()
                .find_map(|dev| loop_backing_file(&dev));
            match backing {
                Some(b) if b == image => Ok(()),
                Some(b) => Err(format!(
                    "the filesystem mounted at {} is inside {}, not inside {}",
                    mount.display(),
                    b.display(),
                    image.display()
                )),
                None => Err(format!(
                    "the filesystem mounted at {} (device {mounted}) is not inside {}: `mount` must be where the image itself is mounted through a loop device, not the filesystem holding the image file; for an image a hypervisor writes, use consistency = \"hooks\" without `mount` (quiesce in the guest) or \"none\"",
                    mount.display(),
                    image.display()
                )),
            }
        }
    }
}

/// (mount point, (major, minor)) of a line of /proc/self/mountinfo.
fn parse_mountinfo(line: &str) -> Option<(PathBuf, (u32, u32))> {
    let mut f = line.split(' ');
    let (_id, _parent, dev, _root, point) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let (major, minor) = dev.split_once(':')?;
    Some((
        PathBuf::from(unescape_octal(point)),
        (major.parse().ok()?, minor.parse().ok()?),
    ))
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash in paths).
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The whole disk holding partition `dev` ("major:minor"), if `dev` is a partition.
fn whole_disk(dev: &str) -> Option<String> {
    let sys = Path::new("/sys/dev/block").join(dev);
    if !sys.join("partition").exists() {
        return None;
    }
    let parent = sys.canonicalize().ok()?.parent()?.join("dev");
    Some(std::fs::read_to_string(parent).ok()?.trim().to_owned())
}

/// The kernel's name of device `dev` ("loop3").
fn dev_name(dev: &str) -> Option<String> {
    let sys = Path::new("/sys/dev/block").join(dev).canonicalize().ok()?;
    Some(sys.file_name()?.to_string_lossy().into_owned())
}

/// The file behind loop device `dev`, if it is one.
fn loop_backing_file(dev: &str) -> Option<PathBuf> {
    let raw = std::fs::read_to_string(
        Path::new("/sys/dev/block")
            .join(dev)
            .join("loop/backing_file"),
    )
    .ok()?;
    let raw = raw.trim_end_matches('\n');
    // A backing file deleted while attached shows as "path (deleted)": never the image.
    if raw.ends_with(" (deleted)") {
        return None;
    }
    Some(PathBuf::from(raw))
}

/// Ends (SIGKILL) every thaw watchdog for any of `mounts` whose agent is gone: its parent is no
/// longer a `lifeboat-agent` (a killed agent's children are re-parented to init or a
/// subreaper). Waits until each has exited, so none can thaw a freeze taken after this returns.
/// A living agent's watchdog is left alone.
pub fn end_orphan_watchdogs(mounts: &[std::path::PathBuf]) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let argv = |pid: &str| -> Vec<String> {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let is_agent = |args: &[String]| {
        args.first().is_some_and(|a| {
            Path::new(a)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("lifeboat-agent"))
        })
    };
    let wanted: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
    for e in procs.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        let Ok(n) = pid.parse::<i32>() else { continue };
        if n == std::process::id() as i32 {
            continue;
        }
        let args = argv(&pid);
        if !is_agent(&args)
            || args.get(1).map(String::as_str) != Some("thaw-watchdog")
            || !args[2..].iter().any(|a| wanted.contains(a))
        {
            continue;
        }
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
                let rest = &s[s.rfind(')')? + 1..];
                rest.split_whitespace().nth(1).map(str::to_owned)
            });
        if parent.as_deref().is_some_and(|p| is_agent(&argv(p))) {
            continue;
        }
        tracing::warn!(
            pid = n,
            "ending the thaw watchdog of an agent that died while frozen"
        );
        // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
        unsafe { libc::kill(n, libc::SIGKILL) };
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true)
        };
        let t = std::time::Instant::now();
        while !gone() && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let line = "36 35 7:3 / /mnt/with\\040space rw,relatime shared:1 - ext4 /dev/loop3 rw";
        assert_eq!(
            parse_mountinfo(line),
            Some((PathBuf::from("/mnt/with space"), (7, 3)))
        );
        assert_eq!(parse_mountinfo("garbage"), None);
    }

    #[test]
    fn a_plain_directory_is_not_a_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let err = verify_mount(&sub, &sub, MountOf::Directory).unwrap_err();
        assert!(err.contains("is not a mount point"), "{err}");
        let err = verify_mount(&dir.path().join("missing"), &sub, MountOf::Directory).unwrap_err();
        assert!(err.contains("cannot be resolved"), "{err}");
    }
}
