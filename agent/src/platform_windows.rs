//! Windows half of the agent's platform-specific calls (mirror of `platform_unix.rs`).
//! Built for x86_64-pc-windows-gnu and tested under wine by `scripts/test-windows`.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Reads exactly `buf.len()` bytes at `offset` (`seek_read` may read less; loop).
pub fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Opens a disk for reading; with `direct` (volumes and physical drives) unbuffered
/// (FILE_FLAG_NO_BUFFERING), for the reason given in `platform_unix.rs`.
pub fn open_disk(path: &Path, direct: bool) -> io::Result<File> {
    use std::os::windows::fs::OpenOptionsExt;
    const FILE_FLAG_NO_BUFFERING: u32 = 0x2000_0000;
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(FILE_FLAG_NO_BUFFERING);
    }
    o.open(path)
}

/// Returns a future that resolves on Ctrl-C, for `run` in a console (the service's stop comes
/// from its control handler; see `service_windows.rs`).
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// What the agent's state directory is given: a protected DACL (nothing inherited from
/// ProgramData, whose Users may read) with full control for SYSTEM and Administrators,
/// inherited by everything created inside — the agent's private key among it.
pub const PRIVATE_DIR_SDDL: &str = "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)";

fn wide(p: &std::ffi::OsStr) -> Vec<u16> {
    use std::os::windows::ffi::OsStrExt;
    p.encode_wide().chain(std::iter::once(0)).collect()
}

/// Gives `dir` [`PRIVATE_DIR_SDDL`]'s DACL.
#[allow(
    unsafe_code,
    reason = "Win32 security calls; every pointer is owned for the call"
)]
pub fn make_private_dir(dir: &Path) -> io::Result<()> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1, SE_FILE_OBJECT,
        SetNamedSecurityInfoW,
    };
    use windows_sys::Win32::Security::{
        ACL, DACL_SECURITY_INFORMATION, GetSecurityDescriptorDacl,
        PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR,
    };
    let sddl = wide(std::ffi::OsStr::new(PRIVATE_DIR_SDDL));
    let name = wide(dir.as_os_str());
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `sddl` is NUL-terminated and lives for the call; `sd` receives a LocalAlloc'd
    // descriptor freed below.
    if unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl.as_ptr(),
            SDDL_REVISION_1,
            &mut sd,
            std::ptr::null_mut(),
        )
    } == 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut present = 0;
    let mut defaulted = 0;
    let mut dacl: *mut ACL = std::ptr::null_mut();
    // SAFETY: `sd` is the valid descriptor made above; `dacl` points into it.
    let r =
        if unsafe { GetSecurityDescriptorDacl(sd, &mut present, &mut dacl, &mut defaulted) } == 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: `name` is NUL-terminated; `dacl` stays valid until `sd` is freed below.
            let code = unsafe {
                SetNamedSecurityInfoW(
                    name.as_ptr(),
                    SE_FILE_OBJECT,
                    DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    dacl,
                    std::ptr::null(),
                )
            };
            if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(code as i32))
            }
        };
    // SAFETY: `sd` came from LocalAlloc in the conversion above.
    unsafe { LocalFree(sd as _) };
    r
}

/// `dir`'s DACL in SDDL, as [`PRIVATE_DIR_SDDL`] writes it (for `check`).
#[allow(
    unsafe_code,
    reason = "Win32 security calls; every pointer is owned for the call"
)]
pub fn dir_dacl(dir: &Path) -> io::Result<String> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertSecurityDescriptorToStringSecurityDescriptorW, GetNamedSecurityInfoW,
        SDDL_REVISION_1, SE_FILE_OBJECT,
    };
    use windows_sys::Win32::Security::{DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR};
    let name = wide(dir.as_os_str());
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `name` is NUL-terminated; `sd` receives a LocalAlloc'd descriptor freed below.
    let code = unsafe {
        GetNamedSecurityInfoW(
            name.as_ptr(),
            SE_FILE_OBJECT,
            DACL_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    if code != 0 {
        return Err(io::Error::from_raw_os_error(code as i32));
    }
    let mut text: *mut u16 = std::ptr::null_mut();
    let mut len = 0u32;
    // SAFETY: `sd` is valid; `text` receives a LocalAlloc'd string of `len` characters.
    let ok = unsafe {
        ConvertSecurityDescriptorToStringSecurityDescriptorW(
            sd,
            SDDL_REVISION_1,
            DACL_SECURITY_INFORMATION,
            &mut text,
            &mut len,
        )
    };
    let r = if ok == 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: `text` holds `len` UTF-16 units (with the terminating NUL).
        let units = unsafe { std::slice::from_raw_parts(text, len as usize) };
        let end = units.iter().position(|&c| c == 0).unwrap_or(units.len());
        let s = String::from_utf16_lossy(&units[..end]);
        // SAFETY: from LocalAlloc in the conversion above.
        unsafe { LocalFree(text as _) };
        Ok(s)
    };
    // SAFETY: from LocalAlloc in GetNamedSecurityInfoW.
    unsafe { LocalFree(sd as _) };
    r
}

/// Whether this process runs under wine (its ntdll exports `wine_get_version`): wine keeps no
/// DACLs on Unix files, so what `check` reads back there says nothing.
#[allow(
    unsafe_code,
    reason = "looks up an export by name; no pointer is dereferenced"
)]
pub fn under_wine() -> bool {
    use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleW, GetProcAddress};
    let ntdll = wide(std::ffi::OsStr::new("ntdll.dll"));
    // SAFETY: NUL-terminated names; ntdll is always loaded.
    unsafe {
        let module = GetModuleHandleW(ntdll.as_ptr());
        !module.is_null() && GetProcAddress(module, c"wine_get_version".as_ptr().cast()).is_some()
    }
}
