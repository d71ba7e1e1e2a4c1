//! Unix half of the agent's platform-specific calls (mirrored in `platform_windows.rs`).

use std::fs::File;
use std::io;

/// Reads exactly `buf.len()` bytes at `offset` without a shared cursor, so several threads can
/// read one file at once.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
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
