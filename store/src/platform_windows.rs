//! Windows half of the few filesystem calls that differ by platform (mirrored in `platform_unix.rs`).
//! Built for x86_64-pc-windows-gnu and tested under wine by `scripts/test-windows`.

use std::io;
use std::path::Path;

/// NTFS makes a rename or link durable with the file's own flush; a directory cannot be opened
/// for flushing without FILE_FLAG_BACKUP_SEMANTICS, so this is a no-op.
pub fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Writes all of `buf` at `offset` (`seek_write` may write less; loop).
pub fn write_all_at(file: &std::fs::File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_write(buf, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Raw disks (`\\.\PhysicalDriveN`) are not restore targets on Windows yet.
pub fn is_block_device(_path: &Path) -> bool {
    false
}

/// Windows has no Unix mode bits; only the read-only bit could map, and is left alone.
pub fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Creates a file symbolic link (needs the SeCreateSymbolicLink privilege or developer mode).
/// Trees record targets with `/`, as a Unix source wrote them; Windows resolves a relative
/// target only with its own separator, so `/` becomes `\`.
pub fn symlink(target: &str, link: &Path) -> io::Result<()> {
    std::os::windows::fs::symlink_file(target.replace('/', "\\"), link)
}
