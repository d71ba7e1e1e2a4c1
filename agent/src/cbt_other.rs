//! Changed-block tracking where the Linux eBPF tracker does not exist (mirror of
//! `cbt_linux.rs`): every pass is a checksum scan, and `check` and `status` say so.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// See `cbt_linux.rs`; never produced here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub generation: u64,
    pub since: u32,
    pub overflows: u64,
    #[serde(default)]
    pub seen: Vec<u64>,
}

/// Never constructed here.
#[derive(Debug)]
pub struct Tracker {
    _never: std::convert::Infallible,
}

/// See `cbt_linux.rs`; never produced here (no tracker opens), but matched on by callers.
#[allow(dead_code)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    Resumed,
    Started(String),
}

/// See `cbt_linux.rs`.
#[derive(Debug)]
pub struct ReadOut {
    pub blocks: Vec<u64>,
    pub cursor: Cursor,
}

const WHY: &str = "changed-block tracking uses eBPF on Linux; this platform scans";

impl Tracker {
    pub fn open(_device: &Path, _block_size: u32, _key: &str) -> Result<(Tracker, Opened), String> {
        Err(WHY.into())
    }
    pub fn generation(&self) -> u64 {
        match self._never {}
    }
    pub fn bind_image(&mut self, _image: &Path) -> Result<(), String> {
        match self._never {}
    }
    pub fn check(&self) -> Result<(), String> {
        match self._never {}
    }
    pub fn cursor_for_scan(&self) -> std::io::Result<Cursor> {
        match self._never {}
    }
    pub fn read_out(&self, _cursor: &Cursor) -> Result<ReadOut, String> {
        match self._never {}
    }
}

/// Nothing is ever pinned here.
pub fn forget(_key: &str) -> std::io::Result<bool> {
    Ok(false)
}

/// Never here.
pub fn loop_device_of(_image: &Path) -> Result<std::path::PathBuf, String> {
    Err(WHY.into())
}

/// Always unavailable here.
pub fn probe() -> Result<(), String> {
    Err(WHY.into())
}
