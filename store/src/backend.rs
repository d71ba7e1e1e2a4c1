//! The storage seam: one small trait every store implements, and the errors it speaks.
//!
//! Backends are deliberately dumb (named immutable blobs); everything Lifeboat knows about
//! segments, tags and points lives above this line. Cross-cutting behaviour is a wrapper of the
//! same trait: [`retry::Retrying`] adds backoff, [`faulty::Faulty`] injects faults in tests.

pub mod azure;
#[cfg(any(test, feature = "testing"))]
pub mod faulty;
pub mod local;
pub mod memory;
pub mod retry;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::name::ObjectName;

/// What kind of failure a [`StoreError`] is; callers branch on this, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object does not exist.
    NotFound,
    /// A create-only put found the name taken.
    AlreadyExists,
    /// Worth retrying: throttling (429/503), timeouts, dropped connections.
    Transient,
    /// Retrying will not help: bad credentials, missing container, malformed configuration.
    Permanent,
    /// The credential may not do this (HTTP 403, `EACCES`): a least-privilege credential
    /// without the right, or a wrong key. Callers that can do without the operation (an agent
    /// that may not delete) branch on this; retrying will not help.
    Denied,
    /// The request itself is wrong (e.g. a range past the end of the object).
    InvalidInput,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Transient => "transient failure",
            ErrorKind::Permanent => "failed",
            ErrorKind::Denied => "permission denied",
            ErrorKind::InvalidInput => "invalid request",
        })
    }
}

/// A failed store operation, naming the object it was about.
#[derive(Debug, thiserror::Error)]
#[error("{op} {name}: {kind}{}", detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
pub struct StoreError {
    pub kind: ErrorKind,
    pub op: &'static str,
    pub name: String,
    detail: Option<String>,
}

impl StoreError {
    /// A new error for operation `op` on `name`.
    pub fn new(kind: ErrorKind, op: &'static str, name: impl fmt::Display) -> Self {
        Self {
            kind,
            op,
            name: name.to_string(),
            detail: None,
        }
    }

    /// Adds the underlying cause, flattened to text so errors stay `Send + Sync + 'static`.
    pub fn with_detail(mut self, detail: impl fmt::Display) -> Self {
        self.detail = Some(detail.to_string());
        self
    }

    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

/// A listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub name: ObjectName,
    pub size: u64,
}

/// An object store holding immutable named blobs.
///
/// Contract shared by every implementation (checked by the conformance suite in
/// [`crate::conformance`]):
/// - objects are immutable: written once by [`Backend::put_new`], never modified, maybe deleted;
/// - a reader sees a whole object or none of it, never a torn one, even after a crash;
/// - errors name the object and carry an [`ErrorKind`]; `Transient` errors may be retried.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// Stores `data` under `name` only if no object of that name exists, atomically.
    /// Fails with [`ErrorKind::AlreadyExists`] otherwise, leaving the existing object untouched.
    async fn put_new(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError>;

    /// Reads a whole object. [`ErrorKind::NotFound`] if absent.
    async fn get(&self, name: &ObjectName) -> Result<Bytes, StoreError>;

    /// Reads `range` of an object; the range must lie within the object
    /// ([`ErrorKind::InvalidInput`] otherwise).
    async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes, StoreError>;

    /// Size of an object. [`ErrorKind::NotFound`] if absent.
    async fn head(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError>;

    /// Every object whose name starts with `prefix/`, at any depth, sorted by name.
    /// An empty result is not an error.
    async fn list(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError>;

    /// Deletes an object. Deleting an absent object succeeds, so retries are safe.
    async fn delete(&self, name: &ObjectName) -> Result<(), StoreError>;
}

/// A shared, type-erased backend, as the rest of Lifeboat holds one.
pub type DynBackend = Arc<dyn Backend>;

/// Checks a requested range against an object size; shared by implementations.
pub(crate) fn check_range(
    name: &ObjectName,
    range: &Range<u64>,
    size: u64,
) -> Result<(), StoreError> {
    if range.start > range.end || range.end > size {
        return Err(
            StoreError::new(ErrorKind::InvalidInput, "get_range", name).with_detail(format!(
                "range {}..{} outside object of {size} bytes",
                range.start, range.end
            )),
        );
    }
    Ok(())
}

#[async_trait]
impl<T: Backend + ?Sized> Backend for Arc<T> {
    async fn put_new(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError> {
        (**self).put_new(name, data).await
    }
    async fn get(&self, name: &ObjectName) -> Result<Bytes, StoreError> {
        (**self).get(name).await
    }
    async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes, StoreError> {
        (**self).get_range(name, range).await
    }
    async fn head(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError> {
        (**self).head(name).await
    }
    async fn list(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError> {
        (**self).list(prefix).await
    }
    async fn delete(&self, name: &ObjectName) -> Result<(), StoreError> {
        (**self).delete(name).await
    }
}

/// Which store to open; parsed from agent and coordinator configs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, tag = "kind")]
pub enum StoreConfig {
    /// A local directory (the embedded default).
    Local { path: std::path::PathBuf },
    /// An Azure Blob container.
    Azure(azure::AzureConfig),
}

/// What an opener may do to the store itself (not its objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Admin views, restores, failover: the store must exist and nothing is created, so a
    /// read-only credential works and a mistyped name is an error rather than a new, empty
    /// store.
    ReadOnly,
    /// Writers (agents, the coordinator): a missing container or directory is created when
    /// the credential may do so; otherwise the error says how to create it.
    ReadWrite,
}

/// What [`StoreConfig::init`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Created,
    Existed,
}

impl StoreConfig {
    /// Checks what can be checked without a request (called where configs are parsed).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            StoreConfig::Local { path } if path.as_os_str().is_empty() => {
                Err("store.path must not be empty".into())
            }
            StoreConfig::Local { .. } => Ok(()),
            StoreConfig::Azure(cfg) => cfg.validate(),
        }
    }

    /// Opens the store as a writer, wrapped in the default retry policy.
    pub async fn open(&self) -> Result<DynBackend, StoreError> {
        self.open_with(retry::RetryPolicy::default()).await
    }

    /// Opens an existing store for reading only: creates nothing, needs only read and list.
    pub async fn open_read_only(&self) -> Result<DynBackend, StoreError> {
        self.open_as(OpenMode::ReadOnly, retry::RetryPolicy::default())
            .await
    }

    /// Opens the store as a writer with a given retry policy.
    pub async fn open_with(&self, policy: retry::RetryPolicy) -> Result<DynBackend, StoreError> {
        self.open_as(OpenMode::ReadWrite, policy).await
    }

    /// Opens the store in `mode` with a given retry policy.
    pub async fn open_as(
        &self,
        mode: OpenMode,
        policy: retry::RetryPolicy,
    ) -> Result<DynBackend, StoreError> {
        Ok(match self {
            StoreConfig::Local { path } => {
                let backend = match mode {
                    OpenMode::ReadWrite => local::LocalBackend::open(path)?,
                    OpenMode::ReadOnly => local::LocalBackend::open_existing(path)?,
                };
                Arc::new(retry::Retrying::new(backend, policy))
            }
            StoreConfig::Azure(cfg) => {
                let backend = retry::with_retries(&policy, "open", &cfg.container, |_| {
                    azure::AzureBackend::open_as(cfg, mode)
                })
                .await?;
                Arc::new(retry::Retrying::new(backend, policy))
            }
        })
    }

    /// Creates the store's container (or directory) if it does not exist: the explicit admin
    /// step for deployments whose agents and coordinator may not create containers.
    pub async fn init(&self) -> Result<Init, StoreError> {
        match self {
            StoreConfig::Local { path } => {
                let existed = path.is_dir();
                local::LocalBackend::open(path)?;
                Ok(if existed {
                    Init::Existed
                } else {
                    Init::Created
                })
            }
            StoreConfig::Azure(cfg) => {
                retry::with_retries(
                    &retry::RetryPolicy::default(),
                    "init",
                    &cfg.container,
                    |_| azure::init(cfg),
                )
                .await
            }
        }
    }
}
