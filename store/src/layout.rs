//! Where objects live. Cache and target stores share one key structure (see `docs/format.md`):
//!
//! ```text
//! v1/<group>/vms/<vm>/disks/<disk>/seg/<seq:020>.seg     segments, counting up from a history's first number
//! v1/<group>/vms/<vm>/disks/<disk>/tag/<seq:020>.tag     tags, counting up from a history's first number
//! v1/<group>/vms/<vm>/disks/<disk>/base/<tag:020>.base   a compaction of the disk at a tag
//! v1/<group>/vms/<vm>/disks/<disk>/base/<tag:020>/<part:06>.seg   its segments
//! v1/<group>/vms/<vm>/disks/<disk>/base/<tag:020>/segments.ids    what it stands for
//! v1/<group>/vms/<vm>/disks/<disk>/tree/<blake3>.tree    directory listings, by content
//! v1/<group>/vms/<vm>/disks/<disk>/resync/<from:020>.txt  processing asks for a new history (cache)
//! v1/<group>/vms/<vm>/disks/<disk>/resync/<from:020>.sums the tag it may start over (cache)
//! v1/<group>/asks/<vm>/<disk>/<from:020>.txt             an agent asks processing for an offer (cache)
//! v1/<group>/points/<point-id>.point                     recovery points
//! v1/<group>/quarantine/<point-id>.txt                   why processing refused a point
//! v1/<group>/damage/<point-id>.txt                       what the target scrub found damaged under a point
//! ```
//!
//! Sequence numbers are zero-padded so that name order is numeric order in every backend.

use crate::name::{DiskId, GroupId, ObjectName, PointId, VmId};

/// The key-structure version, first component of every name.
pub const ROOT: &str = "v1";

fn name(s: String) -> ObjectName {
    // Every component comes from a validated id or a number, so this cannot fail.
    ObjectName::new(s).expect("layout builds valid names from valid ids")
}

/// Names of one group's objects in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    group: GroupId,
}

impl Layout {
    /// The layout of `group`.
    pub fn new(group: GroupId) -> Self {
        Self { group }
    }

    /// The group.
    pub fn group(&self) -> &GroupId {
        &self.group
    }

    /// Everything of the group.
    pub fn group_root(&self) -> ObjectName {
        name(format!("{ROOT}/{}", self.group))
    }

    /// All VMs of the group.
    pub fn vms_root(&self) -> ObjectName {
        name(format!("{ROOT}/{}/vms", self.group))
    }

    /// Everything of one disk.
    pub fn disk_root(&self, vm: &VmId, disk: &DiskId) -> ObjectName {
        name(format!("{ROOT}/{}/vms/{vm}/disks/{disk}", self.group))
    }

    /// Prefix of a disk's segments.
    pub fn segments(&self, vm: &VmId, disk: &DiskId) -> ObjectName {
        name(format!("{}/seg", self.disk_root(vm, disk)))
    }

    /// One segment.
    pub fn segment(&self, vm: &VmId, disk: &DiskId, seq: u64) -> ObjectName {
        name(format!("{}/seg/{seq:020}.seg", self.disk_root(vm, disk)))
    }

    /// Prefix of a disk's tags.
    pub fn tags(&self, vm: &VmId, disk: &DiskId) -> ObjectName {
        name(format!("{}/tag", self.disk_root(vm, disk)))
    }

    /// One tag.
    pub fn tag(&self, vm: &VmId, disk: &DiskId, seq: u64) -> ObjectName {
        name(format!("{}/tag/{seq:020}.tag", self.disk_root(vm, disk)))
    }

    /// A directory listing, by the hex blake3 of its body.
    pub fn tree(
        &self,
        vm: &VmId,
        disk: &DiskId,
        hash: &str,
    ) -> Result<ObjectName, crate::NameError> {
        ObjectName::new(format!("{}/tree/{hash}.tree", self.disk_root(vm, disk)))
    }

    /// Prefix of a disk's bases (compactions).
    pub fn bases(&self, vm: &VmId, disk: &DiskId) -> ObjectName {
        name(format!("{}/base", self.disk_root(vm, disk)))
    }

    /// The manifest of the base at `tag`; written after its parts.
    pub fn base(&self, vm: &VmId, disk: &DiskId, tag: u64) -> ObjectName {
        name(format!("{}/base/{tag:020}.base", self.disk_root(vm, disk)))
    }

    /// Part `part` (from 1) of the base at `tag`: a segment.
    pub fn base_part(&self, vm: &VmId, disk: &DiskId, tag: u64, part: u32) -> ObjectName {
        name(format!(
            "{}/base/{tag:020}/{part:06}.seg",
            self.disk_root(vm, disk)
        ))
    }

    /// The identities of the segments the base at `tag` stands for (see `Base::segment_ids`);
    /// written with its parts, before the manifest.
    pub fn base_ids(&self, vm: &VmId, disk: &DiskId, tag: u64) -> ObjectName {
        name(format!(
            "{}/base/{tag:020}/segments.ids",
            self.disk_root(vm, disk)
        ))
    }

    /// Prefix of a disk's resync requests (cache store).
    pub fn resyncs(&self, vm: &VmId, disk: &DiskId) -> ObjectName {
        name(format!("{}/resync", self.disk_root(vm, disk)))
    }

    /// Processing's request that the agent start a new history of the disk, because the
    /// history whose first segment is `from` cannot be completed in the target store.
    pub fn resync(&self, vm: &VmId, disk: &DiskId, from: u64) -> ObjectName {
        name(format!(
            "{}/resync/{from:020}.txt",
            self.disk_root(vm, disk)
        ))
    }

    /// The block hashes of the tag processing offers as the origin of that new history
    /// ([`crate::sums`]): beside the request, written before it.
    pub fn resync_sums(&self, vm: &VmId, disk: &DiskId, from: u64) -> ObjectName {
        name(format!(
            "{}/resync/{from:020}.sums",
            self.disk_root(vm, disk)
        ))
    }

    /// Prefix of the agents' asks for an offer (cache store), listed once per processing pass.
    pub fn asks(&self) -> ObjectName {
        name(format!("{ROOT}/{}/asks", self.group))
    }

    /// An agent's ask that processing offer a tag to start a new history of the disk over
    /// (its own history from `from` cannot go on: its state is lost and the cache no longer
    /// holds what a roll-forward reads, or the cache lost what the next tag relies on).
    pub fn ask(&self, vm: &VmId, disk: &DiskId, from: u64) -> ObjectName {
        name(format!(
            "{ROOT}/{}/asks/{vm}/{disk}/{from:020}.txt",
            self.group
        ))
    }

    /// Prefix of the group's recovery points.
    pub fn points(&self) -> ObjectName {
        name(format!("{ROOT}/{}/points", self.group))
    }

    /// One recovery point.
    pub fn point(&self, id: &PointId) -> ObjectName {
        name(format!("{ROOT}/{}/points/{id}.point", self.group))
    }

    /// Prefix of the records of quarantined points (target store).
    pub fn quarantine(&self) -> ObjectName {
        name(format!("{ROOT}/{}/quarantine", self.group))
    }

    /// Why processing quarantined point `id` (plain text), while it does.
    pub fn quarantine_record(&self, id: &PointId) -> ObjectName {
        name(format!("{ROOT}/{}/quarantine/{id}.txt", self.group))
    }

    /// Prefix of the damage records (target store).
    pub fn damage(&self) -> ObjectName {
        name(format!("{ROOT}/{}/damage", self.group))
    }

    /// What the target scrub found damaged or missing under point `id` (plain text).
    pub fn damage_record(&self, id: &PointId) -> ObjectName {
        name(format!("{ROOT}/{}/damage/{id}.txt", self.group))
    }
}

/// The sequence number in a segment or tag name (`…/00000000000000000042.seg` → 42).
pub fn parse_seq(name: &ObjectName) -> Option<u64> {
    let file = name.file_name();
    parse_numbered(file, "seg").or_else(|| parse_numbered(file, "tag"))
}

/// The number of a file named `<number:020>.<ext>` (segments, tags, bases, resync requests
/// and sums, asks); `None` for any other name.
pub fn parse_numbered(file: &str, ext: &str) -> Option<u64> {
    let digits = file.strip_suffix(ext)?.strip_suffix('.')?;
    if digits.len() != 20 {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_numerically_and_parse_back() {
        let l = Layout::new(GroupId::new("g").unwrap());
        let (vm, disk) = (VmId::new("vm").unwrap(), DiskId::new("d").unwrap());
        let a = l.segment(&vm, &disk, 9);
        let b = l.segment(&vm, &disk, 10);
        assert!(a < b);
        assert_eq!(parse_seq(&b), Some(10));
        assert_eq!(
            l.tag(&vm, &disk, 1).as_str(),
            "v1/g/vms/vm/disks/d/tag/00000000000000000001.tag"
        );
        assert!(l.tree(&vm, &disk, "../x").is_err());
    }
}
