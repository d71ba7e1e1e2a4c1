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
    /// A name that must hold exactly the bytes a writer produces holds others (a leftover of
    /// an interrupted write by another version, say): the data it stands for is not at stake.
    #[error("{0}")]
    Occupied(String),
}

impl Error {
    /// Whether what is stored is wrong: a decoder or consistency check refused it (rather than
    /// the store being unreachable, or the request wrong).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Error::Codec(_) | Error::Manifest(_) | Error::Inconsistent(_)
        )
    }

    /// [`Error::is_damage`], or an object missing (or refused as a name by the backend).
    pub fn is_damage_or_loss(&self) -> bool {
        match self {
            Error::Store(s) => matches!(
                s.kind,
                crate::backend::ErrorKind::NotFound | crate::backend::ErrorKind::InvalidInput
            ),
            e => e.is_damage(),
        }
    }

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
