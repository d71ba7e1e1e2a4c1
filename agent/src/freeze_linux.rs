//! Linux half of filesystem freezing: FIFREEZE / FITHAW on a mount point (what `fsfreeze -f/-u`
//! does). Mirrored by `freeze_other.rs` on platforms without it (Windows uses VSS instead).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

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

/// Makes this process (the thaw watchdog) immune to SIGTERM, SIGINT and SIGHUP, so a service
/// manager stopping the agent's whole process group cannot take the watchdog down before it has
/// thawed. SIGKILL still works; by the time a manager escalates to it, the deadline has passed.
pub fn ignore_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installing SIG_IGN has no memory-safety preconditions; no handler code runs.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}
