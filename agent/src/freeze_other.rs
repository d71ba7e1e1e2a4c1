//! Filesystem freezing where FIFREEZE does not exist (mirror of `freeze_linux.rs`): refused
//! with a clear error, so a config asking for `fsfreeze` fails at the first cut, never silently.

use std::io;
use std::path::Path;

/// Always unsupported here.
pub fn freeze(_mount: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "fsfreeze is only available on Linux (use consistency = \"hooks\" or \"none\")",
    ))
}

/// Nothing can be frozen, so nothing needs thawing.
pub fn thaw(_mount: &Path) -> io::Result<bool> {
    Ok(false)
}

/// Nothing to prepare for: nothing is ever frozen here.
pub fn sync(_mount: &Path) -> io::Result<()> {
    Ok(())
}

/// Sends SIGKILL to every process of group `pgid` where there are process groups (a hook's:
/// it runs in a group of its own); elsewhere the caller kills the hook's own process.
pub fn kill_process_group(pgid: u32) {
    #[cfg(unix)]
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status();
    #[cfg(not(unix))]
    let _ = pgid;
}

/// No freeze here, so no grace periods to expedite.
#[derive(Debug)]
pub struct Expedited;

/// Does nothing here (see `freeze_linux.rs`).
pub fn expedite_grace_periods() -> Expedited {
    Expedited
}

impl Expedited {
    /// Never set here.
    pub fn set_by_us(&self) -> bool {
        false
    }
}

/// Nothing to clear here.
pub fn clear_expedited() {}

/// No thaw guard here (it is a systemd socket unit).
pub fn reply_on_stdin(_line: &str) -> io::Result<()> {
    Ok(())
}

/// Nothing is ever frozen here, so the watchdog has nothing to protect.
pub fn ignore_stop_signals() {}

/// Freezing is refused here, so there is no mount to verify: the freeze itself says why.
pub fn verify_mount(_mount: &Path, _disk: &Path, _what: MountOf) -> Result<(), String> {
    Ok(())
}

/// What a disk's `mount` must hold (see `freeze_linux.rs`).
#[derive(Debug, Clone, Copy)]
pub enum MountOf {
    Directory,
    BlockDevice,
    Image,
}

/// No freeze here, so no watchdog outlives its agent.
pub fn end_orphan_watchdogs(_mounts: &[std::path::PathBuf]) {}

/// Freezes are Linux-only here: nothing a mark touches can be frozen.
pub fn on_tmpfs(_path: &Path) -> io::Result<bool> {
    Ok(true)
}

/// Not available: the caller treats change events as unverifiable.
pub fn identity(_path: &Path) -> io::Result<(u64, u64, u64)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no mount identity on this platform",
    ))
}
