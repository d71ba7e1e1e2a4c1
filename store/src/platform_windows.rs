//! Windows half of the few filesystem calls that differ by platform (mirrored in `platform_unix.rs`).
//! Built for x86_64-pc-windows-gnu and tested under wine by `scripts/test-windows`.

use std::io;
use std::path::Path;

/// NTFS makes a rename or link durable with the file's own flush; a directory cannot be opened
/// for flushing without FILE_FLAG_BACKUP_SEMANTICS, so this is a no-op.
pub fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Writes all of `buf` at `offset` (`seek_write` may write less; loop).
pub fn write_all_at(file: &std::fs::File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_write(buf, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Raw disks (`\\.\PhysicalDriveN`) are not restore targets on Windows yet.
pub fn is_block_device(_path: &Path) -> bool {
    false
}

/// Windows has no Unix mode bits; only the read-only bit could map, and is left alone.
pub fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Creates a file symbolic link (needs the SeCreateSymbolicLink privilege or developer mode).
/// Trees record targets with `/`, as a Unix source wrote them; Windows resolves a relative
/// target only with its own separator, so `/` becomes `\`.
pub fn symlink(target: &str, link: &Path) -> io::Result<()> {
    std::os::windows::fs::symlink_file(target.replace('/', "\\"), link)
}

fn wide(p: &std::ffi::OsStr) -> Vec<u16> {
    use std::os::windows::ffi::OsStrExt;
    p.encode_wide().chain(Some(0)).collect()
}

/// `path`'s DACL in SDDL (`D:P(A;OICI;FA;;;SY)…`): what the agent's `check` compares.
pub fn dacl_sddl(path: &Path) -> io::Result<String> {
    sddl(
        path,
        windows_sys::Win32::Security::DACL_SECURITY_INFORMATION,
    )
}

/// `path`'s owner and DACL in SDDL (`O:BAD:P(A;;FA;;;SY)…`): what a secret file's check reads
/// (the owner may read its own file).
pub fn owner_and_dacl_sddl(path: &Path) -> io::Result<String> {
    use windows_sys::Win32::Security::{DACL_SECURITY_INFORMATION, OWNER_SECURITY_INFORMATION};
    sddl(path, OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION)
}

#[allow(
    unsafe_code,
    reason = "Win32 security calls; every pointer is owned for the call"
)]
fn sddl(path: &Path, info: u32) -> io::Result<String> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertSecurityDescriptorToStringSecurityDescriptorW, GetNamedSecurityInfoW,
        SDDL_REVISION_1, SE_FILE_OBJECT,
    };
    use windows_sys::Win32::Security::PSECURITY_DESCRIPTOR;
    let name = wide(path.as_os_str());
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `name` is NUL-terminated; `sd` receives a LocalAlloc'd descriptor freed below.
    let code = unsafe {
        GetNamedSecurityInfoW(
            name.as_ptr(),
            SE_FILE_OBJECT,
            info,
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
            info,
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
/// DACLs on Unix files, so what a check reads back there says nothing.
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
