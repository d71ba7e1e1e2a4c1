//! Windows half of the agent's platform-specific calls (mirror of `platform_unix.rs`).
//! Built for x86_64-pc-windows-gnu and tested under wine by `scripts/test-windows`.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

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

/// Opens a disk for reading; with `direct` (volumes and physical drives) unbuffered
/// (FILE_FLAG_NO_BUFFERING), for the reason given in `platform_unix.rs`.
pub fn open_disk(path: &Path, direct: bool) -> io::Result<File> {
    use std::os::windows::fs::OpenOptionsExt;
    const FILE_FLAG_NO_BUFFERING: u32 = 0x2000_0000;
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(FILE_FLAG_NO_BUFFERING);
    }
    o.open(path)
}

/// Returns a future that resolves on Ctrl-C, for `run` in a console (the service's stop comes
/// from its control handler; see `service_windows.rs`).
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
