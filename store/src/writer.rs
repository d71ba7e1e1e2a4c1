//! Writing segments, trees, tags and points in the order the format requires.
//!
//! Invariant 3 is enforced here rather than trusted to callers: a tag is written only once
//! every segment and tree it references is in the store, a point only once every tag it
//! references is. Every write is create-only; re-writing identical bytes (a retry after a crash)
//! succeeds, different bytes under a taken name fail.

use bytes::Bytes;

use crate::backend::{DynBackend, ErrorKind};
use crate::error::{Error, Result};
use crate::layout::{Layout, parse_seq};
use crate::manifest::{DiskShape, RecoveryPoint, Tag, Tree};
use crate::name::{DiskId, ObjectName, VmId};
use crate::restore::{StoreReader, sources_for};

/// Writes one group's objects into a store.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    backend: DynBackend,
    layout: Layout,
}

impl StoreWriter {
    /// A writer for `layout`'s group in `backend`.
    pub fn new(backend: DynBackend, layout: Layout) -> Self {
        Self { backend, layout }
    }

    /// The layout written to.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The store written to.
    pub fn backend(&self) -> &DynBackend {
        &self.backend
    }

    /// Create-only put that treats "already there with the same bytes" as success.
    async fn put_idempotent(&self, name: &ObjectName, data: Bytes) -> Result<()> {
        match self.backend.put_new(name, data.clone()).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind == ErrorKind::AlreadyExists => {
                if self.backend.get(name).await? == data {
                    Ok(())
                } else {
                    Err(Error::Inconsistent(format!(
                        "{name} already exists with different content"
                    )))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes segment `seq` of a disk.
    pub async fn put_segment(&self, vm: &VmId, disk: &DiskId, seq: u64, data: Bytes) -> Result<()> {
        self.put_idempotent(&self.layout.segment(vm, disk, seq), data)
            .await
    }

    /// Writes a directory listing; returns its hash (what a tag's [`DiskShape::Directory`] holds).
    pub async fn put_tree(&self, vm: &VmId, disk: &DiskId, tree: &Tree) -> Result<String> {
        let (hash, data) = tree.encode();
        let name = self
            .layout
            .tree(vm, disk, &hash)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        match self.backend.put_new(&name, data).await {
            // Content-addressed: same name, same bytes.
            Ok(()) => Ok(hash),
            Err(e) if e.kind == ErrorKind::AlreadyExists => Ok(hash),
            Err(e) => Err(e.into()),
        }
    }

    /// [`StoreWriter::put_tree`] over an object under that name that may be damaged: if the
    /// stored bytes differ, they are deleted and written again (the one replacement in a
    /// create-only store: the name is the content's hash, so the new bytes are the only right
    /// ones).
    pub async fn replace_tree(&self, vm: &VmId, disk: &DiskId, tree: &Tree) -> Result<String> {
        let (hash, data) = tree.encode();
        let name = self
            .layout
            .tree(vm, disk, &hash)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        match self.backend.get(&name).await {
            Ok(stored) if stored == data => return Ok(hash),
            Ok(_) => self.backend.delete(&name).await?,
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.put_idempotent(&name, data).await?;
        Ok(hash)
    }

    /// Writes a tag after checking that its segments and tree are in the store.
    pub async fn put_tag(&self, tag: &Tag) -> Result<()> {
        self.put_tag_checking_from(tag, 0).await
    }

    /// Writes a tag after checking that its tree and its segments numbered `first` or later
    /// are in the store. An agent passes the first segment it wrote since its previous tag: the
    /// earlier ones were checked when that tag was written and may since have been processed
    /// out of the cache store into the target (`docs/format.md`, write rules 7 and 8).
    ///
    /// Segments that a base of the disk holds for this tag (the base a restore of the tag
    /// reads, [`sources_for`]) are not checked either: in a target store, compaction lets
    /// retention delete them once they are folded into the base.
    pub async fn put_tag_checking_from(&self, tag: &Tag, first: u64) -> Result<()> {
        // A damaged base stands for nothing: its segments must then be here on their own.
        let bases = StoreReader::new(self.backend.clone(), self.layout.clone())
            .readable_bases(&tag.vm, &tag.disk)
            .await?;
        let (base, _) = sources_for(&self.layout, tag, &bases);
        let first = first.max(base.map_or(0, |b| b.through_segment + 1));
        let range = tag.from_segment.max(first)..=tag.through_segment;
        let present: Vec<u64> = self
            .backend
            .list(&self.layout.segments(&tag.vm, &tag.disk))
            .await?
            .iter()
            .filter_map(|m| parse_seq(&m.name))
            .filter(|s| range.contains(s))
            .collect();
        let wanted = range.clone().count();
        if present.len() != wanted {
            return Err(Error::Inconsistent(format!(
                "tag {} of {}/{} references segments {}..={} but only {} of them are stored",
                tag.seq,
                tag.vm,
                tag.disk,
                range.start(),
                range.end(),
                present.len()
            )));
        }
        if let DiskShape::Directory { tree } = &tag.shape {
            let name = self
                .layout
                .tree(&tag.vm, &tag.disk, tree)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            self.backend.head(&name).await?;
        }
        self.put_idempotent(&self.layout.tag(&tag.vm, &tag.disk, tag.seq), tag.encode())
            .await
    }

    /// Publishes a recovery point after checking that every tag it references is stored.
    /// Strictly create-only: a point id is published once.
    pub async fn put_point(&self, point: &RecoveryPoint) -> Result<()> {
        if point.group != *self.layout.group() {
            return Err(Error::Invalid(format!(
                "point {} belongs to group {}, not {}",
                point.id,
                point.group,
                self.layout.group()
            )));
        }
        for m in &point.members {
            for d in &m.disks {
                self.backend
                    .head(&self.layout.tag(&m.vm, &d.disk, d.tag))
                    .await
                    .map_err(|e| {
                        Error::Inconsistent(format!(
                            "point {} references tag {} of {}/{}: {e}",
                            point.id, d.tag, m.vm, d.disk
                        ))
                    })?;
            }
        }
        self.backend
            .put_new(&self.layout.point(&point.id), point.encode())
            .await?;
        Ok(())
    }
}
