//! Unix half of the agent's platform-specific calls (mirrored in `platform_windows.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Reads exactly `buf.len()` bytes at `offset` without a shared cursor, so several threads can
/// read one file at once.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Opens a disk for reading. With `direct` (block devices), reads bypass the block device's
/// page cache (O_DIRECT on Linux): a filesystem mounted on the device writes file data straight
/// to the device, around that cache, so a cached read can return bytes the filesystem has long
/// overwritten. Direct reads need buffers, offsets and lengths aligned to the logical block
/// size; see `scan::AlignedBuf`.
pub fn open_disk(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    #[cfg(target_os = "linux")]
    if direct {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_DIRECT);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = direct;
    o.open(path)
}

/// Takes over SIGTERM and SIGINT now (so neither kills the agent mid-cut, with a filesystem
/// frozen) and returns a future that resolves when one arrives.
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
