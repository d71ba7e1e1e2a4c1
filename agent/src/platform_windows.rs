//! Windows half of the agent's platform-specific calls (mirror of `platform_unix.rs`).
//! Untested: no Windows target can be built in this project's CI.

use std::fs::File;
use std::io;

/// Reads exactly `buf.len()` bytes at `offset` (`seek_read` may read less; loop).
pub fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Returns a future that resolves on Ctrl-C (the service stop path is the Windows service
/// control handler, not written yet).
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
