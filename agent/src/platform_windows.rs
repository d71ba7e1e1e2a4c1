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
/// ProgramData, whose Users may read and create) with full control for SYSTEM and
/// Administrators, inherited by everything created inside — the agent's private key among it —
/// and Administrators as owner (an owner may always change the DACL back).
pub const PRIVATE_DIR_SDDL: &str = "O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)";
/// The config's directory, when the service starts: the same, except that Users may read.
const CONFIG_DIR_SDDL: &str = "O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;0x1200a9;;;BU)";
/// The config file: Administrators' and its ACL reset to what the directory hands down.
const CONFIG_FILE_SDDL: &str = "O:BAD:";

fn wide(p: &std::ffi::OsStr) -> Vec<u16> {
    use std::os::windows::ffi::OsStrExt;
    p.encode_wide().chain(std::iter::once(0)).collect()
}

/// A junction or symbolic link where a directory of ours should be: refused, or a rewrite of
/// its permissions (as SYSTEM) would land on whatever it points to.
fn refuse_reparse_point(path: &Path) -> io::Result<()> {
    use std::os::windows::fs::MetadataExt;
    const FILE_ATTRIBUTE_REPARSE_POINT: u32 = 0x400;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_attributes() & FILE_ATTRIBUTE_REPARSE_POINT != 0 => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a junction or a link; it must be a directory of its own",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// Gives `path` the owner and DACL of `sddl` ("O:…D:…"); `protected` cuts inheritance from
/// the parent, otherwise the DACL is the explicit part and the parent's inheritable entries
/// are added.
#[allow(
    unsafe_code,
    reason = "Win32 security calls; every pointer is owned for the call"
)]
fn apply_sddl(path: &Path, sddl: &str, protected: bool) -> io::Result<()> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1, SE_FILE_OBJECT,
        SetNamedSecurityInfoW,
    };
    use windows_sys::Win32::Security::{
        ACL, DACL_SECURITY_INFORMATION, GetSecurityDescriptorDacl, GetSecurityDescriptorOwner,
        OWNER_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR,
        PSID, UNPROTECTED_DACL_SECURITY_INFORMATION,
    };
    let text = wide(std::ffi::OsStr::new(sddl));
    let name = wide(path.as_os_str());
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `text` is NUL-terminated and lives for the call; `sd` receives a LocalAlloc'd
    // descriptor freed below.
    if unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            text.as_ptr(),
            SDDL_REVISION_1,
            &mut sd,
            std::ptr::null_mut(),
        )
    } == 0
    {
        return Err(io::Error::last_os_error());
    }
    let r = (|| {
        let (mut present, mut defaulted) = (0, 0);
        let mut dacl: *mut ACL = std::ptr::null_mut();
        let mut owner: PSID = std::ptr::null_mut();
        // SAFETY: `sd` is the valid descriptor made above; `dacl` and `owner` point into it.
        unsafe {
            if GetSecurityDescriptorDacl(sd, &mut present, &mut dacl, &mut defaulted) == 0
                || GetSecurityDescriptorOwner(sd, &mut owner, &mut defaulted) == 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let inheritance = if protected {
            PROTECTED_DACL_SECURITY_INFORMATION
        } else {
            UNPROTECTED_DACL_SECURITY_INFORMATION
        };
        // SAFETY: `name` is NUL-terminated; `owner` and `dacl` stay valid until `sd` is freed.
        let code = unsafe {
            SetNamedSecurityInfoW(
                name.as_ptr(),
                SE_FILE_OBJECT,
                OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION | inheritance,
                owner,
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
    })();
    // SAFETY: `sd` came from LocalAlloc in the conversion above.
    unsafe { LocalFree(sd as _) };
    r
}

/// Gives the state directory [`PRIVATE_DIR_SDDL`]'s owner and DACL (a junction is refused).
pub fn make_private_dir(dir: &Path) -> io::Result<()> {
    refuse_reparse_point(dir)?;
    apply_sddl(dir, PRIVATE_DIR_SDDL, true)
}

/// What the service (LocalSystem) does to its config before reading it: the directory is
/// Administrators' with Users reading, the file Administrators' with only what the directory
/// hands down — so no other user can have written, or keep a way to rewrite, what the service
/// runs (its hooks run as SYSTEM).
pub fn protect_config(config: &Path) -> io::Result<()> {
    if let Some(dir) = config.parent().filter(|d| !d.as_os_str().is_empty()) {
        refuse_reparse_point(dir)?;
        apply_sddl(dir, CONFIG_DIR_SDDL, true)?;
    }
    refuse_reparse_point(config)?;
    if config.exists() {
        apply_sddl(config, CONFIG_FILE_SDDL, false)?;
    }
    Ok(())
}

/// Whether `sddl` (as [`dir_dacl`] reads it) is [`PRIVATE_DIR_SDDL`]'s DACL: protected, and
/// exactly its entries in any order. Windows adds flags of its own ("AI", auto-inherited) when
/// it writes the DACL back; they do not matter here.
pub fn is_private_dacl(sddl: &str) -> bool {
    let want = PRIVATE_DIR_SDDL.split_once("D:").map(|x| x.1).unwrap_or("");
    let parse = |s: &str| -> Option<(String, std::collections::BTreeSet<String>)> {
        let s = s.strip_prefix("D:")?;
        let (flags, rest) = s.split_at(s.find('(').unwrap_or(s.len()));
        let aces = rest
            .split(')')
            .filter(|a| !a.is_empty())
            .map(|a| a.trim_start_matches('(').to_owned())
            .collect();
        Some((flags.to_owned(), aces))
    };
    match (parse(sddl), parse(&format!("D:{want}"))) {
        (Some((flags, aces)), Some((_, wanted))) => flags.contains('P') && aces == wanted,
        _ => false,
    }
}

/// `dir`'s DACL in SDDL, as [`PRIVATE_DIR_SDDL`] writes it (for `check`).
pub use lifeboat_store::dacl_sddl as dir_dacl;
/// Whether this process runs under wine (which keeps no DACLs on Unix files).
pub use lifeboat_store::under_wine;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_dacl_is_recognised_whatever_flags_windows_adds() {
        assert!(is_private_dacl("D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)"));
        assert!(is_private_dacl("D:PAI(A;OICI;FA;;;BA)(A;OICI;FA;;;SY)"));
        // Not protected: ProgramData's entries come back with the next inheritance.
        assert!(!is_private_dacl("D:AI(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)"));
        // Users may read.
        assert!(!is_private_dacl(
            "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;0x1200a9;;;BU)"
        ));
        assert!(!is_private_dacl("D:P(A;OICI;FA;;;SY)"));
        assert!(!is_private_dacl("garbage"));
    }
}
