//! The one way a local file (state, keys, certificates, member list, floors, reports) is
//! replaced durably.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Who may read a file written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Its owner and others (0644 on Unix, before the umask).
    Shared,
    /// Its owner alone (0600 on Unix), from the moment it exists: keys and secrets.
    Private,
}

/// Replaces `path` with `bytes`, readable by all; see [`replace_with`].
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, Access::Shared, |w| w.write_all(bytes))
}

/// [`replace`] from async code: the write and its fsyncs run on tokio's blocking pool, never
/// on an async worker.
pub async fn replace_async(path: PathBuf, bytes: Vec<u8>) -> io::Result<()> {
    tokio::task::spawn_blocking(move || replace(&path, &bytes))
        .await
        .map_err(io::Error::other)?
}

/// Replaces `path` with `bytes`, readable by its owner alone; see [`replace_with`].
pub fn replace_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, Access::Private, |w| w.write_all(bytes))
}

/// Replaces `path` with what `fill` writes, so that after a crash it holds either the old bytes
/// or the new ones, never a mix: a temporary sibling is created, written, flushed, renamed over
/// `path`, and the directory flushed so the rename itself survives. A failure leaves `path` as
/// it was and no temporary behind.
///
/// The temporary's name is unique to this call (process id and a counter) and it is created
/// new with its final access: two files replaced at once never share one, and a leftover from
/// a crash can never lend a private file its own, looser mode.
pub fn replace_with(
    path: &Path,
    access: Access,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temporary(dir, path)?;
    let written = (|| {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(
            &mut o,
            match access {
                Access::Shared => 0o644,
                Access::Private => 0o600,
            },
        );
        #[cfg(not(unix))]
        let _ = access;
        let mut w = BufWriter::with_capacity(1 << 20, o.open(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    crate::platform::sync_dir(dir)
}

/// Flushes a directory's entries (a file created or renamed in it) to stable storage, where
/// the platform can (a no-op on Windows, whose file system journals names itself).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    crate::platform::sync_dir(dir)
}

/// A temporary name beside `path` that no other call of this process uses.
fn temporary(dir: &Path, path: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    Ok(dir.join(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        replace(&p, b"one").unwrap();
        replace(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Regression: the agent wrote its key and certificate through one temporary name
    /// (`with_extension("tmp")`), so a 0644 leftover could carry the private key.
    #[cfg(unix)]
    #[test]
    fn a_private_file_is_private_whatever_was_left_behind() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("agent.key");
        // Leftovers under every name an older writer used, readable by all.
        for old in ["agent.tmp", "agent.key.tmp", ".agent.key.tmp"] {
            std::fs::write(dir.path().join(old), b"leftover").unwrap();
            std::fs::set_permissions(dir.path().join(old), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        replace_private(&key, b"secret").unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
    }

    #[test]
    fn files_replaced_at_once_never_share_a_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<PathBuf> = (0..8).map(|i| dir.path().join(format!("f{i}"))).collect();
        std::thread::scope(|s| {
            for (i, p) in names.iter().enumerate() {
                s.spawn(move || {
                    for round in 0..50 {
                        replace(p, format!("{i}:{round}").as_bytes()).unwrap();
                    }
                });
            }
        });
        for (i, p) in names.iter().enumerate() {
            assert_eq!(std::fs::read_to_string(p).unwrap(), format!("{i}:49"));
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), names.len());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        replace(&p, b"old").unwrap();
        let e = replace_with(&p, Access::Shared, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
