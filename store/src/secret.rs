//! A string that never prints: account keys, SAS tokens, join tokens — and where a config
//! takes one from: inline, a file only its owner may read, or an environment variable.

use std::fmt;
use std::path::Path;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// A secret value. `Debug` shows `***`; there is no `Display`; reading it takes [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// In a config, a secret is a string (`key = "..."`), or read when the config is loaded from a
/// file (`key = { file = "/etc/lifeboat/cache.key" }`, which must be a regular file no one but
/// its owner may read or write: mode 0600 or 0400; on Windows, an access list that lets no
/// group of ordinary users read it) or an environment variable
/// (`token = { env = "LIFEBOAT_CACHE_SAS" }`, e.g. from the unit's `EnvironmentFile=`), so
/// config files can be shared or kept in version control without the secrets. Surrounding
/// whitespace (a file's final newline) is dropped; an empty secret is an error. Errors name the
/// file or variable, never the value.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecretVisitor)
    }
}

struct SecretVisitor;

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a secret: a string, { file = "/path" } or { env = "NAME" }"#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
        let mut source: Option<(String, String)> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != "file" && key != "env" {
                return Err(de::Error::unknown_field(&key, &["file", "env"]));
            }
            let value: String = map.next_value()?;
            if source.is_some() {
                return Err(de::Error::custom(
                    "a secret comes from one of `file` or `env`, not both",
                ));
            }
            source = Some((key, value));
        }
        match source {
            Some((key, path)) if key == "file" => {
                from_file(Path::new(&path)).map_err(de::Error::custom)
            }
            Some((_, name)) => from_env(&name).map_err(de::Error::custom),
            None => Err(de::Error::custom(
                "an empty secret table: give `file = \"/path\"` or `env = \"NAME\"`",
            )),
        }
    }
}

fn from_file(path: &Path) -> Result<Secret, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "secret file {} is not a regular file",
            path.display()
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "secret file {} is open to group or others (mode {mode:04o}): make it 0600 (chmod 600 {})",
                path.display(),
                path.display()
            ));
        }
    }
    // Wine keeps no DACLs on Unix files: nothing to read there (the parsing is tested alone).
    #[cfg(windows)]
    if !crate::under_wine() {
        let sddl = crate::owner_and_dacl_sddl(path).map_err(|e| {
            format!(
                "secret file {}: cannot read its access list: {e}",
                path.display()
            )
        })?;
        if let Some(who) = readable_by_others(&sddl) {
            return Err(format!(
                "secret file {} can be read by {who}: let only its owner, SYSTEM and Administrators read it (icacls \"{}\" /inheritance:r /grant:r *S-1-5-18:F *S-1-5-32-544:F)",
                path.display(),
                path.display()
            ));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("secret file {}: {e}", path.display()))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("secret file {} is empty", path.display()));
    }
    Ok(Secret(value.to_owned()))
}

/// Who besides the file's owner, SYSTEM and Administrators may read a file whose owner and
/// DACL are `sddl` (as `ConvertSecurityDescriptorToStringSecurityDescriptorW` writes them,
/// `O:…D:…`), if anyone. An allowlist, like Unix's 0600: any allow entry that applies to the
/// file itself and grants reading its data (or generic read or all), or changing its access
/// list or owner (a way to grant oneself reading), to anyone else is named. No DACL at all
/// lets everyone in. Deny entries are not weighed: a file meant to be private should not
/// need them, and ignoring them only refuses more.
#[cfg_attr(not(windows), allow(dead_code))]
fn readable_by_others(sddl: &str) -> Option<String> {
    // Trustees that may: SYSTEM, Administrators, OWNER RIGHTS, TrustedInstaller.
    const TRUSTED: &[&str] = &[
        "SY",
        "S-1-5-18",
        "BA",
        "S-1-5-32-544",
        "OW",
        "S-1-3-4",
        "S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464",
    ];
    // Names for the groups a refusal is most likely to be about.
    const NAMES: &[(&[&str], &str)] = &[
        (&["WD", "S-1-1-0"], "Everyone"),
        (&["AU", "S-1-5-11"], "Authenticated Users"),
        (&["BU", "S-1-5-32-545"], "Users"),
        (&["BG", "S-1-5-32-546"], "Guests"),
        (&["PU", "S-1-5-32-547"], "Power Users"),
        (&["RD", "S-1-5-32-555"], "Remote Desktop Users"),
        (&["IU", "S-1-5-4"], "Interactive users"),
        (&["NU", "S-1-5-2"], "Network users"),
        (&["AN", "S-1-5-7"], "Anonymous"),
        (&["AC", "S-1-15-2-1"], "ALL APPLICATION PACKAGES"),
        (&["DU"], "Domain Users"),
    ];
    let everyone = || Some("everyone (the file has no access list)".to_owned());
    // "O:" comes first when present: a two-letter alias or a SID ("S-1-…", digits and dashes).
    let owner = sddl.strip_prefix("O:").map(|rest| {
        if rest.starts_with("S-") {
            let end = rest
                .char_indices()
                .skip(1)
                .find(|(_, c)| !(c.is_ascii_digit() || *c == '-'))
                .map_or(rest.len(), |(i, _)| i);
            &rest[..end]
        } else {
            rest.get(..2).unwrap_or(rest)
        }
    });
    // An owner always may change the access list: a group owning the file lets every member
    // grant themselves reading.
    let name = |sid: &str| {
        NAMES
            .iter()
            .find(|(names, _)| names.contains(&sid))
            .map(|(_, who)| *who)
    };
    if let Some(who) = owner.and_then(name) {
        return Some(format!("{who} (the file's owner)"));
    }
    let Some(dacl) = sddl.split_once("D:").map(|x| x.1) else {
        return everyone();
    };
    // Only the owner and DACL are asked for, so no SACL ("S:") follows. The DACL's flags ("P",
    // "AI"…) come before the first entry, and entries are
    // "(type;flags;rights;object;inherited object;sid[;condition])"; a condition's own
    // parentheses make pieces of no six fields, which are passed over.
    let flags = &dacl[..dacl.find('(').unwrap_or(dacl.len())];
    if flags.contains("NO_ACCESS_CONTROL") {
        return everyone();
    }
    for ace in dacl.split('(').skip(1) {
        let fields: Vec<&str> = ace.trim_end_matches(')').split(';').collect();
        let [kind, ace_flags, rights, _, _, sid, ..] = fields.as_slice() else {
            continue;
        };
        // Allow entries: plain, object, callback. "IO": inherit-only, for children, not this
        // file.
        if !matches!(*kind, "A" | "OA" | "XA" | "ZA")
            || ace_flags.as_bytes().chunks(2).any(|c| c == b"IO")
        {
            continue;
        }
        if TRUSTED.contains(sid) || owner == Some(*sid) {
            continue;
        }
        let reads = match rights
            .strip_prefix("0x")
            .or_else(|| rights.strip_prefix("0X"))
        {
            // FILE_READ_DATA, WRITE_DAC, WRITE_OWNER, GENERIC_ALL, GENERIC_READ.
            Some(hex) => u32::from_str_radix(hex, 16).map_or(true, |r| r & 0x900C_0001 != 0),
            // "CC" is 0x1 written as a directory-service right, and KEY_EXECUTE ("KX") holds
            // it as KEY_READ does; "WD" and "WO" are WRITE_DAC and WRITE_OWNER.
            None => rights.as_bytes().chunks(2).any(|c| {
                matches!(
                    c,
                    b"FA" | b"FR" | b"GA" | b"GR" | b"CC" | b"KA" | b"KR" | b"KX" | b"WD" | b"WO"
                )
            }),
        };
        if reads {
            return Some(name(sid).map_or_else(|| (*sid).to_owned(), str::to_owned));
        }
    }
    None
}

fn from_env(name: &str) -> Result<Secret, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_owned())),
        Ok(_) => Err(format!("secret environment variable {name} is empty")),
        Err(std::env::VarError::NotPresent) => {
            Err(format!("secret environment variable {name} is not set"))
        }
        Err(std::env::VarError::NotUnicode(_)) => Err(format!(
            "secret environment variable {name} is not valid UTF-8"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{Secret, readable_by_others};

    /// DACLs as Windows writes them back: what a private secret file has, what it inherits
    /// from ProgramData or a user's folder, and the odd forms.
    #[test]
    fn a_windows_access_list_that_lets_others_read_is_named() {
        for private in [
            "D:P(A;;FA;;;SY)(A;;FA;;;BA)",
            "O:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)",
            // ProgramData's CREATOR OWNER entry, made the creating user's: its owner.
            "O:S-1-5-21-1-2-3-1001D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;S-1-5-21-1-2-3-1001)",
            "O:S-1-5-21-1-2-3-1001G:S-1-5-21-1-2-3-513D:(A;;FA;;;S-1-5-21-1-2-3-1001)",
            "D:PAI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;;FA;;;OW)",
            // Users may only traverse or read attributes; an inherit-only entry is for children.
            "O:BAD:P(A;;FA;;;SY)(A;;0x100080;;;BU)(A;OICIIO;GR;;;BU)",
            // Denied, not allowed.
            "D:P(A;;FA;;;SY)(D;;FA;;;WD)",
            // No entries: nobody but the owner's right to change it.
            "O:SYD:P",
        ] {
            assert_eq!(readable_by_others(private), None, "{private}");
        }
        for (open, who) in [
            (
                "O:BAD:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;OICIID;0x1200a9;;;BU)",
                "Users",
            ),
            ("D:(A;;FR;;;WD)", "Everyone"),
            ("D:(A;;GR;;;AU)", "Authenticated Users"),
            ("D:(A;;0x1;;;S-1-5-32-545)", "Users"),
            ("D:(A;ID;GA;;;S-1-1-0)", "Everyone"),
            (
                "D:(A;;CCDCLCSWRPWPDTLOCRSDRCWDWO;;;IU)",
                "Interactive users",
            ),
            ("D:P(A;;FA;;;SY)(A;;FR;;;RD)", "Remote Desktop Users"),
            ("D:P(A;;FA;;;SY)(A;;GR;;;AC)", "ALL APPLICATION PACKAGES"),
            // Another user than the owner, and a trusted domain's users written as a SID.
            (
                "O:S-1-5-21-1-2-3-1001D:P(A;;FA;;;S-1-5-21-1-2-3-1001)(A;;FR;;;S-1-5-21-1-2-3-1002)",
                "S-1-5-21-1-2-3-1002",
            ),
            (
                "O:BAD:P(A;;FA;;;SY)(A;;FA;;;S-1-5-21-9-8-7-513)",
                "S-1-5-21-9-8-7-513",
            ),
            // Not reading, but able to grant itself reading: WRITE_DAC, WRITE_OWNER.
            ("D:P(A;;FA;;;SY)(A;;WD;;;BU)", "Users"),
            ("D:P(A;;FA;;;SY)(A;;0x80000;;;BU)", "Users"),
            // A callback allow entry, with a condition, and an entry after it.
            ("D:P(A;;FA;;;SY)(XA;;FR;;;BU;(x))", "Users"),
            (
                "D:P(A;;FA;;;SY)(XA;;FR;;;SY;(WIN://SYSAPPID Contains \"S:x\"))(A;;KX;;;WD)",
                "Everyone",
            ),
            // A group owning the file may change its access list.
            (
                "O:BUD:P(A;;FA;;;SY)(A;;FR;;;BU)",
                "Users (the file's owner)",
            ),
            ("O:WDD:(A;;FA;;;WD)", "Everyone (the file's owner)"),
            (
                "D:NO_ACCESS_CONTROL",
                "everyone (the file has no access list)",
            ),
            (
                "O:BAD:PNO_ACCESS_CONTROL",
                "everyone (the file has no access list)",
            ),
            (
                "D:AINO_ACCESS_CONTROL",
                "everyone (the file has no access list)",
            ),
            ("O:BAG:SY", "everyone (the file has no access list)"),
        ] {
            assert_eq!(readable_by_others(open).as_deref(), Some(who), "{open}");
        }
    }

    fn parse(json: &str) -> Result<Secret, String> {
        serde_json::from_str::<Secret>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn inline_file_and_environment_forms() {
        assert_eq!(parse(r#""sv=1&sig=x""#).unwrap().expose(), "sv=1&sig=x");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sas");
        std::fs::write(&path, "sv=2&sig=y\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let file = serde_json::json!({ "file": path }).to_string();
        assert_eq!(parse(&file).unwrap().expose(), "sv=2&sig=y");

        // The environment is process-wide and setting it is unsafe: read one that is set.
        let path_var = std::env::var("PATH").unwrap();
        assert_eq!(
            parse(r#"{"env":"PATH"}"#).unwrap().expose(),
            path_var.trim()
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_file_others_may_read_is_refused_without_showing_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.key");
        std::fs::write(&path, "hunter2").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = parse(&serde_json::json!({ "file": path }).to_string()).unwrap_err();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(parse(&serde_json::json!({ "file": path }).to_string()).is_err());
    }

    #[test]
    fn bad_sources_are_clear_errors() {
        let e = parse(r#"{"env":"LIFEBOAT_TEST_SURELY_UNSET_VARIABLE"}"#).unwrap_err();
        assert!(
            e.contains("LIFEBOAT_TEST_SURELY_UNSET_VARIABLE is not set"),
            "{e}"
        );
        let e = parse(r#"{"file":"/nonexistent/lifeboat.key"}"#).unwrap_err();
        assert!(e.contains("/nonexistent/lifeboat.key"), "{e}");
        let e = parse(r#"{"file":"/a","env":"B"}"#).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = parse(r#"{"path":"/a"}"#).unwrap_err();
        assert!(e.contains("unknown field `path`"), "{e}");
        assert!(parse("{}").unwrap_err().contains("empty secret table"));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let e = parse(&serde_json::json!({ "file": empty }).to_string()).unwrap_err();
        assert!(e.contains("is empty"), "{e}");
    }

    #[test]
    fn never_prints() {
        let s = super::Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
