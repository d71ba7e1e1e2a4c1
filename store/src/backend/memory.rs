//! In-memory backend, for unit tests only: the same contract, no durability.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, ErrorKind, ObjectMeta, StoreError, check_range};
use crate::name::ObjectName;

/// A map from names to bytes behind a mutex.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<ObjectName, Bytes>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ObjectName, Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces an object's bytes regardless of the create-only rule; for corruption tests.
    pub fn overwrite_for_test(&self, name: &ObjectName, data: Bytes) {
        self.lock().insert(name.clone(), data);
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn put_new(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError> {
        let mut map = self.lock();
        if map.contains_key(name) {
            return Err(StoreError::new(ErrorKind::AlreadyExists, "put", name));
        }
        map.insert(name.clone(), data);
        Ok(())
    }

    async fn get(&self, name: &ObjectName) -> Result<Bytes, StoreError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::new(ErrorKind::NotFound, "get", name))
    }

    async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes, StoreError> {
        let data = self.get(name).await?;
        check_range(name, &range, data.len() as u64)?;
        Ok(data.slice(range.start as usize..range.end as usize))
    }

    async fn head(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError> {
        let size = self
            .lock()
            .get(name)
            .map(|d| d.len() as u64)
            .ok_or_else(|| StoreError::new(ErrorKind::NotFound, "head", name))?;
        Ok(ObjectMeta {
            name: name.clone(),
            size,
        })
    }

    async fn list(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError> {
        let dir = format!("{prefix}/");
        Ok(self
            .lock()
            .iter()
            .filter(|(n, _)| n.as_str().starts_with(&dir))
            .map(|(n, d)| ObjectMeta {
                name: n.clone(),
                size: d.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, name: &ObjectName) -> Result<(), StoreError> {
        self.lock().remove(name);
        Ok(())
    }
}
