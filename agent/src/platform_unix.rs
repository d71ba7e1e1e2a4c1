//! Unix half of the agent's platform-specific calls (mirrored in `platform_windows.rs`).

use std::fs::File;
use std::io;

/// Reads exactly `buf.len()` bytes at `offset` without a shared cursor, so several threads can
/// read one file at once.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Resolves when the process is asked to stop (SIGTERM from systemd, or SIGINT).
pub async fn stop_requested() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
