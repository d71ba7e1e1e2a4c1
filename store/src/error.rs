//! The crate's error for operations above the storage seam (writing, reading, restoring).

use std::path::PathBuf;

use crate::backend::StoreError;
use crate::codec::CodecError;
use crate::manifest::ManifestError;

/// What went wrong; every variant names the object or path involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The request cannot be carried out as asked (unknown point, occupied output, …).
    #[error("{0}")]
    Invalid(String),
    /// What is in the store contradicts itself (a referenced object is missing, a tag does not
    /// cover its disk, …).
    #[error("store is inconsistent: {0}")]
    Inconsistent(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
