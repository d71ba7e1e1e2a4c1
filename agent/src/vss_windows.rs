//! The COM half of the VSS provider: [`ShadowApi`] over the flat C functions of
//! `native/vss_windows.c` (IVssBackupComponents through its C interface). Each call is one
//! HRESULT, turned into an error that names the step and the code (VSS_E_* codes are what
//! Microsoft's documentation and `vssadmin` speak).
#![allow(
    unsafe_code,
    reason = "calls into the C shim over COM; each call passes pointers it owns for the call"
)]

use std::ffi::c_void;
use std::os::windows::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::vss::ShadowApi;

/// A GUID's bytes, aligned as the C struct is.
#[repr(C, align(4))]
#[derive(Clone, Copy, Default)]
struct Guid([u8; 16]);

unsafe extern "C" {
    fn lb_vss_open(out: *mut *mut c_void) -> i32;
    fn lb_vss_begin(v: *mut c_void) -> i32;
    fn lb_vss_start_set(v: *mut c_void) -> i32;
    fn lb_vss_add_volume(v: *mut c_void, volume: *const u16, id: *mut Guid) -> i32;
    fn lb_vss_prepare(v: *mut c_void) -> i32;
    fn lb_vss_snapshot(v: *mut c_void) -> i32;
    fn lb_vss_device(v: *mut c_void, id: *const Guid, out: *mut u16, cap: usize) -> i32;
    fn lb_vss_failed_writers(v: *mut c_void, out: *mut u16, cap: usize, count: *mut u32) -> i32;
    fn lb_vss_complete(v: *mut c_void) -> i32;
    fn lb_vss_abort(v: *mut c_void) -> i32;
    fn lb_vss_delete_set(v: *mut c_void) -> i32;
    fn lb_vss_close(v: *mut c_void);
}

/// One IVssBackupComponents, used from one thread at a time (the blocking task that owns the
/// cut's shadow set).
struct Com(*mut c_void);

// The backup components object lives in the multithreaded apartment, which the shim keeps
// alive for the process (CoIncrementMTAUsage), so it may be called from whichever blocking
// thread holds the set (never from two at once: `&mut self` everywhere).
unsafe impl Send for Com {}

fn check(step: &str, hr: i32) -> Result<()> {
    if hr < 0 {
        bail!("{step} failed: HRESULT 0x{:08X}", hr as u32);
    }
    Ok(())
}

fn wide(p: &Path) -> Vec<u16> {
    p.as_os_str()
        .encode_wide()
        .chain(std::iter::once(0))
        .collect()
}

fn from_wide(buf: &[u16]) -> String {
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    std::ffi::OsString::from_wide(&buf[..end])
        .to_string_lossy()
        .into_owned()
}

/// A backup session of this machine's shadow copy service.
pub fn open() -> Result<Box<dyn ShadowApi>> {
    let mut v = std::ptr::null_mut();
    check(
        "CreateVssBackupComponents (is the Volume Shadow Copy service available, and the agent an administrator?)",
        unsafe { lb_vss_open(&mut v) },
    )?;
    Ok(Box::new(Com(v)))
}

impl ShadowApi for Com {
    fn begin(&mut self) -> Result<()> {
        check(
            "InitializeForBackup / SetBackupState / GatherWriterMetadata",
            unsafe { lb_vss_begin(self.0) },
        )
    }
    fn start_set(&mut self) -> Result<()> {
        check("StartSnapshotSet", unsafe { lb_vss_start_set(self.0) })
    }
    fn add_volume(&mut self, volume: &Path) -> Result<u128> {
        let mut id = Guid::default();
        let name = wide(volume);
        check("AddToSnapshotSet", unsafe {
            lb_vss_add_volume(self.0, name.as_ptr(), &mut id)
        })?;
        Ok(u128::from_le_bytes(id.0))
    }
    fn prepare(&mut self) -> Result<()> {
        check("PrepareForBackup", unsafe { lb_vss_prepare(self.0) })
    }
    fn snapshot(&mut self) -> Result<()> {
        check("DoSnapshotSet", unsafe { lb_vss_snapshot(self.0) })
    }
    fn device(&mut self, snapshot: u128) -> Result<PathBuf> {
        let id = Guid(snapshot.to_le_bytes());
        let mut buf = vec![0u16; 1024];
        check("GetSnapshotProperties", unsafe {
            lb_vss_device(self.0, &id, buf.as_mut_ptr(), buf.len())
        })?;
        // A device object (\\?\GLOBALROOT\Device\…) is opened as a path; a trailing
        // separator makes it the volume's root for directory disks.
        Ok(PathBuf::from(from_wide(&buf) + "\\"))
    }
    fn failed_writers(&mut self) -> Result<Vec<String>> {
        let mut buf = vec![0u16; 16 * 1024];
        let mut count = 0u32;
        check("GatherWriterStatus", unsafe {
            lb_vss_failed_writers(self.0, buf.as_mut_ptr(), buf.len(), &mut count)
        })?;
        let mut failed: Vec<String> = from_wide(&buf)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        // Lines that did not fit the buffer still count: a failure is never dropped.
        let missing = (count as usize).saturating_sub(failed.len());
        if missing > 0 {
            failed.push(format!("{missing} more writer(s) failed"));
        }
        Ok(failed)
    }
    fn complete(&mut self) -> Result<()> {
        check("BackupComplete", unsafe { lb_vss_complete(self.0) })
    }
    fn abort(&mut self) -> Result<()> {
        check("AbortBackup", unsafe { lb_vss_abort(self.0) })
    }
    fn delete_set(&mut self) -> Result<()> {
        check("DeleteSnapshots", unsafe { lb_vss_delete_set(self.0) })
    }
}

impl Drop for Com {
    fn drop(&mut self) {
        unsafe { lb_vss_close(self.0) }
    }
}
