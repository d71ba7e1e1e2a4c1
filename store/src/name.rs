//! Validated names: object names in a store and the ids (VM, disk, group, point) that go into them.
//!
//! Every name that reaches a backend passes through [`ObjectName`], so no id from a config file,
//! a CLI argument or the wire can climb out of a store with `..`, `/` or an absolute path.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct NameError {
    what: &'static str,
    value: String,
    why: &'static str,
}

/// Longest group, VM or disk id accepted; keeps object names well under every store's key limit.
pub const MAX_ID_LEN: usize = 64;

/// Longest point id accepted. A single-VM point is named `<vm>-<unix ms>-t<tag>`, so every
/// valid VM id must fit with a 20-digit time and a 20-digit tag number: 64 + 1 + 20 + 2 + 20.
pub const MAX_POINT_ID_LEN: usize = 128;

fn check_component(what: &'static str, s: &str, max: usize) -> Result<(), NameError> {
    let err = |why| NameError {
        what,
        value: s.to_owned(),
        why,
    };
    if s.is_empty() {
        return Err(err("must not be empty"));
    }
    if s.len() > max {
        return Err(err("is too long"));
    }
    if s == "." || s == ".." || s.contains("..") {
        return Err(err("must not contain '..'"));
    }
    if s.starts_with('.') || s.starts_with('-') {
        return Err(err("must start with a letter, digit or '_'"));
    }
    if let Some(_bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(err(
            "may only contain ASCII letters, digits, '.', '_' and '-' (no '/', '\\' or spaces)",
        ));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates an id.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                check_component($what, &s, $max)?;
                Ok(Self(s))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// A replication group: the VMs that share recovery points.
    GroupId,
    "group id",
    MAX_ID_LEN
);
id_type!(
    /// A protected VM (one agent).
    VmId,
    "VM id",
    MAX_ID_LEN
);
id_type!(
    /// A protected disk of a VM: a block device, a disk image or a directory tree.
    DiskId,
    "disk id",
    MAX_ID_LEN
);
id_type!(
    /// A recovery point.
    PointId,
    "recovery point id",
    MAX_POINT_ID_LEN
);

/// The name of an object in a store: `/`-separated components, each a valid id-like component.
///
/// Never absolute, never empty, never `.` or `..`; this is what makes a local directory store
/// safe to point at untrusted names.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName(String);

impl ObjectName {
    /// Longest object name accepted (Azure allows 1024 characters).
    pub const MAX_LEN: usize = 1024;

    /// Parses and validates an object name.
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        if s.len() > Self::MAX_LEN {
            return Err(NameError {
                what: "object name",
                value: s,
                why: "is too long",
            });
        }
        if s.is_empty() {
            return Err(NameError {
                what: "object name",
                value: s,
                why: "must not be empty",
            });
        }
        for part in s.split('/') {
            check_component("object name", part, 255).map_err(|e| NameError {
                value: s.clone(),
                ..e
            })?;
        }
        Ok(Self(s))
    }

    /// Joins one more validated component.
    pub fn join(&self, component: &str) -> Result<Self, NameError> {
        Self::new(format!("{}/{component}", self.0))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl FromStr for ObjectName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_path_tricks() {
        for bad in [
            "", "..", ".", "a/b", "a\\b", "../etc", "a..b", ".hidden", "-x", "a b", "é",
        ] {
            assert!(VmId::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["vm-1", "web_01", "db.prod", "A9"] {
            assert_eq!(VmId::new(good).unwrap().as_str(), good);
        }
        assert!(VmId::new("x".repeat(65)).is_err());
        // The longest VM id with the largest time and tag still names a point.
        let longest = format!("{}-{}-t{}", "v".repeat(MAX_ID_LEN), u64::MAX, u64::MAX);
        assert!(PointId::new(longest).is_ok());
        assert!(PointId::new("p".repeat(MAX_POINT_ID_LEN + 1)).is_err());
    }

    #[test]
    fn object_names_refuse_path_tricks() {
        for bad in ["", "/a", "a/", "a//b", "a/../b", "a/./b", "/", "a/.tmp"] {
            assert!(ObjectName::new(bad).is_err(), "{bad:?} accepted");
        }
        let n = ObjectName::new("v1/g/vm/disk/seg/00000001.seg").unwrap();
        assert_eq!(n.file_name(), "00000001.seg");
        assert!(n.join("..").is_err());
    }

    #[test]
    fn ids_deserialize_with_validation() {
        let ok: VmId = serde_json::from_str("\"vm1\"").unwrap();
        assert_eq!(ok.as_str(), "vm1");
        assert!(serde_json::from_str::<VmId>("\"../x\"").is_err());
    }
}
