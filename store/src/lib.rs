//! Lifeboat's bytes at rest, shared by the agent and the coordinator.
//!
//! - [`backend`]: the storage seam ([`backend::Backend`]) and its implementations — local
//!   directory (default), Azure Blob, in-memory (unit tests) — plus retry and fault wrappers;
//! - [`codec`]: the segment format (changed blocks of one disk, zstd + blake3, verified on read);
//! - [`manifest`]: tags, directory trees and recovery-point manifests;
//! - [`layout`]: where each object lives in the cache and target stores;
//! - [`restore`]: materialising a disk at a tag, verifying every byte;
//! - [`sums`]: the block hashes of a tag that let an agent resynchronise by checksum compare;
//! - [`verify`]: checking a whole store, naming each damaged object and the points it breaks;
//! - [`durable`]: replacing a small local file atomically and durably;
//! - [`service`]: readiness and watchdog notifications to systemd (`sd_notify`).
//!
//! The format is specified in `docs/format.md`; this crate is its reference implementation.

pub mod backend;
pub mod codec;
pub mod compact;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod durable;
pub mod error;
#[cfg(any(test, feature = "testing"))]
pub mod example;
pub mod layout;
pub mod manifest;
pub mod name;
pub mod restore;
pub mod secret;
pub mod service;
pub mod sums;
pub mod verify;
pub mod writer;

#[cfg(unix)]
#[path = "platform_unix.rs"]
mod platform;
#[cfg(windows)]
#[path = "platform_windows.rs"]
mod platform;

pub use backend::{Backend, DynBackend, ErrorKind, ObjectMeta, StoreConfig, StoreError};
pub use error::{Error, Result};
pub use name::{DiskId, GroupId, NameError, ObjectName, PointId, VmId};
/// Writes all of a buffer at an offset without a shared cursor, so several threads can write
/// one file at once (the agent's block hash files use it as the restore does).
pub use platform::write_all_at;
/// A path's DACL in SDDL, and whether this is wine (which keeps none): for the agent's `check`
/// and a secret file's.
#[cfg(windows)]
pub use platform::{dacl_sddl, owner_and_dacl_sddl, under_wine};
pub use secret::Secret;
