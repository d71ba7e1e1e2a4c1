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
/// its owner may read or write: mode 0600 or 0400) or an environment variable
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
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("secret file {}: {e}", path.display()))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("secret file {} is empty", path.display()));
    }
    Ok(Secret(value.to_owned()))
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
    use super::Secret;

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
