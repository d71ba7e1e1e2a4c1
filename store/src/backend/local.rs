//! Local-directory backend: the embedded default store, one file per object.
//!
//! Create-only writes go to a temporary file under `<root>/.tmp`, are fsynced, then hard-linked
//! to their final name (which fails atomically if the name is taken) and the directory is
//! fsynced. A crash therefore leaves either no object or a whole one, plus at worst a stray
//! temporary file, which [`LocalBackend::open`] sweeps.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, ErrorKind, ObjectMeta, StoreError, check_range};
use crate::name::ObjectName;
use crate::platform::sync_dir;

const TMP_DIR: &str = ".tmp";
/// Temporary files older than this are left-overs of a crash (no write takes a day).
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

/// A store rooted at a local directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: Arc<PathBuf>,
}

fn io_err(op: &'static str, name: impl std::fmt::Display, e: io::Error) -> StoreError {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        io::ErrorKind::PermissionDenied => ErrorKind::Denied,
        io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            ErrorKind::Transient
        }
        _ => ErrorKind::Permanent,
    };
    StoreError::new(kind, op, name).with_detail(e)
}

impl LocalBackend {
    /// Opens (creating if needed) a store rooted at `root`, and removes stale temporary files.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root: PathBuf = root.into();
        let tmp = root.join(TMP_DIR);
        fs::create_dir_all(&tmp).map_err(|e| io_err("open", root.display(), e))?;
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > STALE_TMP);
                if stale {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(Self {
            root: Arc::new(root),
        })
    }

    /// Opens an existing store for reading: creates nothing and sweeps nothing, so it works on
    /// a read-only copy, and a mistyped path is an error rather than a new, empty store.
    pub fn open_existing(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root: PathBuf = root.into();
        if !root.is_dir() {
            return Err(StoreError::new(ErrorKind::NotFound, "open", root.display())
                .with_detail("no store directory there"));
        }
        Ok(Self {
            root: Arc::new(root),
        })
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &ObjectName) -> PathBuf {
        // ObjectName guarantees relative, `..`-free components.
        self.root.join(name.as_str())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let root = Arc::clone(&self.root);
        tokio::task::spawn_blocking(move || f(&root))
            .await
            .map_err(|e| StoreError::new(ErrorKind::Permanent, "local", "task").with_detail(e))?
    }
}

fn put_new_blocking(root: &Path, name: &ObjectName, data: &[u8]) -> Result<(), StoreError> {
    let path = root.join(name.as_str());
    if path.exists() {
        return Err(StoreError::new(ErrorKind::AlreadyExists, "put", name));
    }
    let parent = path.parent().expect("object path has a parent");
    create_dirs_durably(root, parent).map_err(|e| io_err("put", name, e))?;
    // A store opened with `open_existing` (which creates nothing) may lack it.
    create_dirs_durably(root, &root.join(TMP_DIR)).map_err(|e| io_err("put", name, e))?;

    let tmp = root.join(TMP_DIR).join(format!(
        "{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = File::create_new(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::hard_link(&tmp, &path)?;
        sync_dir(parent)
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(|e| io_err("put", name, e))
}

/// `create_dir_all`, then fsync every directory whose entry list changed, so a new object's
/// path survives a crash as well as its bytes.
fn create_dirs_durably(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.is_dir() && cur != root {
        missing.push(cur.to_path_buf());
        cur = cur.parent().unwrap_or(root);
    }
    fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        sync_dir(d.parent().unwrap_or(root))?;
    }
    Ok(())
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue; // not a name this store could have written
        };
        let child = format!("{rel}/{file_name}");
        let Ok(name) = ObjectName::new(child.clone()) else {
            continue; // `.tmp` and anything else foreign
        };
        let ty = entry.file_type()?;
        if ty.is_dir() {
            walk(&entry.path(), &child, out)?;
        } else if ty.is_file() {
            out.push(ObjectMeta {
                name,
                size: entry.metadata()?.len(),
            });
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for LocalBackend {
    async fn put_new(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError> {
        let name = name.clone();
        self.blocking(move |root| put_new_blocking(root, &name, &data))
            .await
    }

    async fn get(&self, name: &ObjectName) -> Result<Bytes, StoreError> {
        let path = self.path(name);
        let name = name.clone();
        self.blocking(move |_| {
            fs::read(&path)
                .map(Bytes::from)
                .map_err(|e| io_err("get", &name, e))
        })
        .await
    }

    async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes, StoreError> {
        let path = self.path(name);
        let name = name.clone();
        self.blocking(move |_| {
            let mut f = File::open(&path).map_err(|e| io_err("get_range", &name, e))?;
            let size = f
                .metadata()
                .map_err(|e| io_err("get_range", &name, e))?
                .len();
            check_range(&name, &range, size)?;
            let mut buf = vec![0; (range.end - range.start) as usize];
            f.seek(SeekFrom::Start(range.start))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| io_err("get_range", &name, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn head(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError> {
        let path = self.path(name);
        let name = name.clone();
        self.blocking(move |_| {
            let m = fs::metadata(&path).map_err(|e| io_err("head", &name, e))?;
            if !m.is_file() {
                return Err(StoreError::new(ErrorKind::NotFound, "head", &name));
            }
            Ok(ObjectMeta {
                name,
                size: m.len(),
            })
        })
        .await
    }

    async fn list(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError> {
        let prefix = prefix.clone();
        self.blocking(move |root| {
            let mut out = Vec::new();
            walk(&root.join(prefix.as_str()), prefix.as_str(), &mut out)
                .map_err(|e| io_err("list", &prefix, e))?;
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, name: &ObjectName) -> Result<(), StoreError> {
        let path = self.path(name);
        let name = name.clone();
        self.blocking(move |_| match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(parent) = path.parent() {
                    sync_dir(parent).map_err(|e| io_err("delete", &name, e))?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &name, e)),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-only open creates nothing (a mistyped path is an error, not a new store), and a
    /// store opened so still takes writes (prune compacts) although it has no `.tmp` yet.
    #[tokio::test]
    async fn open_existing_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = LocalBackend::open_existing(&missing).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
        assert!(!missing.exists());

        let b = LocalBackend::open_existing(dir.path()).unwrap();
        assert!(!dir.path().join(TMP_DIR).exists());
        let name = ObjectName::new("v1/x").unwrap();
        b.put_new(&name, Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(b.get(&name).await.unwrap(), Bytes::from_static(b"x"));
    }
}
