//! The store's integration tests, one binary: `conformance` (every backend passes the same
//! suite), `restore` (restores exactly, property-tested), `vectors` (the committed example
//! store of `docs/format.md`), `verify` (damage found and attributed).

mod conformance;
mod restore;
mod vectors;
mod verify;
