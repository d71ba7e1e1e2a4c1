//! Compaction: writes a base — the blocks of a disk at one tag, re-packed into segments of
//! their own — so restoring that tag or any later tag of the same full copy reads the base plus
//! the segments after it, never the whole history, and retention can delete the segments the
//! base replaces. Every block is verified on the way (it is read like a restore reads it).
//!
//! Ordering: the parts are written first, the base manifest last (create-only); a base without
//! a manifest does not exist for readers. A compaction's output is a function of the tag and the
//! store's bases, so parts left by a killed try — or written by a concurrent one — are the very
//! bytes this one writes: they are accepted, never deleted (deleting them could pull parts from
//! under a concurrent compaction about to write its manifest). Parts of a base that never got
//! its manifest are removed by retention once the tag is behind the oldest kept one.

use bytes::Bytes;

use crate::backend::ErrorKind;
use crate::codec::{self, SegmentBuilder};
use crate::error::{Error, Result};
use crate::manifest::{Base, DiskShape, Tag};
use crate::name::ObjectName;
use crate::restore::{StoreReader, files_of, plan_blocks, sources_for};

/// Compacts the disk of `tag` into a base at `tag`, with parts of about `part_size` bytes.
pub async fn compact(
    reader: &StoreReader,
    tag: &Tag,
    part_size: usize,
    level: i32,
) -> Result<Base> {
    let backend = reader.backend();
    let layout = reader.layout();
    let manifest = layout.base(&tag.vm, &tag.disk, tag.seq);
    if let Ok(data) = backend.get(&manifest).await {
        return Ok(Base::decode(manifest.as_str(), &data)?);
    }
    // Leftovers of an interrupted compaction: unreferenced, so safe to remove.
    let tree = match &tag.shape {
        DiskShape::Image { .. } => None,
        DiskShape::Directory { tree } => Some(reader.tree(&tag.vm, &tag.disk, tree).await?),
    };
    let files = files_of(tag, tree.as_ref());
    // A damaged base stands for nothing; the compaction builds on the readable ones.
    let bases = reader.readable_bases(&tag.vm, &tag.disk).await?;
    let (prev, mut sources) = sources_for(layout, tag, &bases);
    // A history that began as a delta over an earlier tag: its first base is built over what a
    // restore of that tag reads, and stands for the origin from then on.
    if prev.is_none()
        && let Some(o) = tag.origin
    {
        sources.splice(0..0, origin_sources(reader, tag, o, &bases).await?);
    }
    // What the new base stands for: the segments of the base it is built on (if that one
    // recorded them), then the identities of the segments after it.
    let mut ids = match &prev {
        // Damage to the earlier base's list costs only the new base's list, not the compaction.
        Some(b) => match reader.base_segment_ids(b).await {
            Ok(ids) => ids,
            Err(e) if e.is_damage_or_loss() => {
                tracing::warn!(error = %e, "compacting without segment identities");
                None
            }
            Err(e) => return Err(e),
        },
        None => Some(Vec::new()),
    };
    if let Some(ids) = ids.as_mut() {
        let first = prev
            .as_ref()
            .map_or(tag.from_segment, |b| b.through_segment + 1);
        for seq in first..=tag.through_segment {
            let name = layout.segment(&tag.vm, &tag.disk, seq);
            let id = reader.segment_id(&name).await?.ok_or_else(|| {
                Error::Inconsistent(format!("segment {name} is referenced by a tag but missing"))
            })?;
            ids.push(id);
        }
    }
    let plan = plan_blocks(reader, tag, &sources, &files).await?;

    let mut builder = SegmentBuilder::with_capacity(tag.block_size, level, part_size + (1 << 20));
    let mut parts = 0u32;
    let files = std::sync::Arc::new(files);
    for (src, placements) in plan {
        let name = sources[src].clone();
        let data = backend.get(&name).await?;
        let files = files.clone();
        let (b, full) =
            tokio::task::spawn_blocking(move || -> Result<(SegmentBuilder, Vec<Bytes>)> {
                let seg = codec::decode(name.as_str(), data)?;
                let mut d =
                    zstd::bulk::Decompressor::new().map_err(|e| Error::io(name.as_str(), e))?;
                let mut buf = Vec::new();
                let mut full = Vec::new();
                for p in placements {
                    let block = seg.read_block(&p.entry, &mut d, &mut buf)?;
                    builder.add_hashed(&files[p.file].0, p.entry.offset, block, p.entry.hash);
                    if builder.encoded_len() >= part_size {
                        let done = std::mem::replace(
                            &mut builder,
                            SegmentBuilder::with_capacity(
                                seg.block_size(),
                                level,
                                part_size + (1 << 20),
                            ),
                        );
                        full.push(done.finish());
                    }
                }
                Ok((builder, full))
            })
            .await
            .map_err(|e| Error::Invalid(format!("compaction worker failed: {e}")))??;
        builder = b;
        for data in full {
            parts += 1;
            put(reader, tag, parts, data).await?;
        }
    }
    if !builder.is_empty() || parts == 0 {
        parts += 1;
        put(reader, tag, parts, builder.finish()).await?;
    }
    // Like a part: written before the manifest, its bytes a function of the tag and the bases
    // before it.
    let segment_ids = match ids {
        Some(ids) => {
            let mut raw = Vec::with_capacity(ids.len() * 32);
            for h in &ids {
                let h = blake3::Hash::from_hex(h)
                    .map_err(|e| Error::Inconsistent(format!("segment identity {h}: {e}")))?;
                raw.extend_from_slice(h.as_bytes());
            }
            let hash = blake3::hash(&raw).to_hex().to_string();
            let name = layout.base_ids(&tag.vm, &tag.disk, tag.seq);
            put_object(reader, &name, Bytes::from(raw)).await?;
            Some(hash)
        }
        None => None,
    };
    let base = Base {
        vm: tag.vm.clone(),
        disk: tag.disk.clone(),
        tag: tag.seq,
        from_segment: tag.from_segment,
        through_segment: tag.through_segment,
        parts,
        block_size: tag.block_size,
        segment_ids,
    };
    match backend.put_new(&manifest, base.encode()).await {
        Ok(()) => Ok(base),
        Err(e) if e.kind == ErrorKind::AlreadyExists => Ok(Base::decode(
            manifest.as_str(),
            &backend.get(&manifest).await?,
        )?),
        Err(e) => Err(e.into()),
    }
}

/// What a restore of `tag`'s origin tag `o` reads: it must be of the same block size, and be
/// restorable on its own (through a base, if it has an origin of its own).
async fn origin_sources(
    reader: &StoreReader,
    tag: &Tag,
    o: u64,
    bases: &[Base],
) -> Result<Vec<ObjectName>> {
    let origin = reader.tag(&tag.vm, &tag.disk, o).await?;
    if origin.block_size != tag.block_size {
        return Err(Error::Inconsistent(format!(
            "tag {} of {}/{} lies over tag {o}, of another block size",
            tag.seq, tag.vm, tag.disk
        )));
    }
    let (base, sources) = sources_for(reader.layout(), &origin, bases);
    if base.is_none() && origin.origin.is_some() {
        return Err(Error::Inconsistent(format!(
            "tag {} of {}/{} lies over tag {o}, which has no readable base over its own origin",
            tag.seq, tag.vm, tag.disk
        )));
    }
    Ok(sources)
}

/// Writes a part create-only; an existing part with the same bytes (a killed or concurrent try)
/// is accepted, different bytes are an error.
async fn put(reader: &StoreReader, tag: &Tag, part: u32, data: Bytes) -> Result<()> {
    let name = reader.layout().base_part(&tag.vm, &tag.disk, tag.seq, part);
    put_object(reader, &name, data).await
}

/// [`put`] for any object of a base.
async fn put_object(reader: &StoreReader, name: &ObjectName, data: Bytes) -> Result<()> {
    let name = name.clone();
    match reader.backend().put_new(&name, data.clone()).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind == ErrorKind::AlreadyExists => {
            if reader.backend().get(&name).await? == data {
                Ok(())
            } else {
                Err(Error::Occupied(format!(
                    "{name} exists with other bytes than this compaction writes"
                )))
            }
        }
        Err(e) => Err(e.into()),
    }
}
