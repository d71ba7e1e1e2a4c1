//! The agent's TOML config: parsed and validated here, at the edge; unknown fields are errors.
//!
//! Sizes are written `"64KiB"`, `"8MiB"` or as plain byte counts; durations as `"5m"`, `"2s"`.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lifeboat_store::{DiskId, GroupId, StoreConfig, VmId};
use serde::{Deserialize, Deserializer};

/// A byte count parsed from `"64KiB"`, `"1 MiB"`, `"512"` or an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match b {
            _ if b >= 1 << 30 && b.is_multiple_of(1 << 30) => write!(f, "{}GiB", b >> 30),
            _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => write!(f, "{}MiB", b >> 20),
            _ if b >= 1 << 10 && b.is_multiple_of(1 << 10) => write!(f, "{}KiB", b >> 10),
            _ => write!(f, "{b}B"),
        }
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (try \"64KiB\" or \"8MiB\")"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            u => {
                return Err(format!(
                    "unknown size unit {u:?} in {s:?} (use KiB, MiB, GiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// What a protected disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskKind {
    /// A regular file holding a disk image (raw).
    Image,
    /// A block device such as `/dev/vdb`.
    BlockDevice,
    /// A directory tree (a file-set volume).
    Directory,
}

/// How a cut of the disk is made consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyKind {
    /// No freeze: points are labelled not-frozen.
    #[default]
    None,
    /// FIFREEZE/FITHAW on the mount holding the disk.
    Fsfreeze,
    /// Pre/post commands (app quiesce), plus fsfreeze when `mount` is set.
    Hooks,
    /// Windows: a shadow copy of the disk's volume (`mount`, or the root of `path`) made by
    /// the Volume Shadow Copy Service, copy-only with its writers (app-consistent when every
    /// writer succeeds), read by the capture instead of the live volume.
    Vss,
}

/// How changes are found while frozen (and, for block devices, between cuts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tracking {
    /// Block devices: the eBPF tracker where it can run (reads only blocks written since the
    /// last pass), a checksum scan otherwise and after any discontinuity. Images: a scan.
    /// Frozen directories: the capture reads what change events (and shared-writable
    /// mappings, and files with other hard links) say changed since the pre-copy, walking
    /// every file only when the events cannot vouch for themselves.
    #[default]
    Auto,
    /// Always a checksum scan of the whole disk (every block read and hashed); for
    /// directories, a frozen capture that walks and stats every file.
    Scan,
}

/// Pre/post commands run around a cut.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Run before the cut (e.g. flush and lock the database). A failure downgrades the point
    /// to crash-consistent.
    pub pre: Vec<String>,
    /// Run after the cut, whatever happened.
    pub post: Vec<String>,
    /// Deadline for each command.
    #[serde(with = "humantime_serde", default = "default_hook_timeout")]
    pub timeout: Duration,
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(30)
}

/// One protected disk.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub id: DiskId,
    pub kind: DiskKind,
    pub path: PathBuf,
    #[serde(default)]
    pub consistency: ConsistencyKind,
    /// Mount point to freeze (fsfreeze); defaults to `path` for directories.
    #[serde(default)]
    pub mount: Option<PathBuf>,
    #[serde(default)]
    pub hooks: Option<Hooks>,
    /// Hard deadline for a freeze; the agent thaws when it passes, whatever else happens.
    #[serde(with = "humantime_serde", default = "default_freeze_timeout")]
    pub freeze_timeout: Duration,
    /// How changes are found (see [`Tracking`]).
    #[serde(default)]
    pub tracking: Tracking,
}

impl DiskConfig {
    /// Whether a cut freezes the filesystem holding this disk (FIFREEZE on `mount`, or on
    /// `path` for a directory).
    pub fn freezes(&self) -> bool {
        match self.consistency {
            ConsistencyKind::Fsfreeze => true,
            ConsistencyKind::Hooks => self.mount.is_some(),
            ConsistencyKind::None | ConsistencyKind::Vss => false,
        }
    }
}

fn default_freeze_timeout() -> Duration {
    Duration::from_secs(2)
}

/// Tuning of the data path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Replication {
    /// Change-tracking granularity.
    pub block_size: ByteSize,
    /// zstd level for segments (1–19).
    pub zstd_level: i32,
    /// Segments are cut when their encoded size reaches this.
    pub segment_size: ByteSize,
    /// Most bytes of finished segments waiting for upload at once.
    pub memory_cap: ByteSize,
    /// Upload rate limit, bytes per second.
    pub bandwidth_limit: Option<ByteSize>,
    /// How often the agent ships changes and cuts a local point (when not in a group).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Threads reading and hashing a disk image or block device at once (1–64).
    pub scan_threads: usize,
    /// How often `run` re-reads every file of directory disks whatever their change stamps say
    /// (the verification sweep; catches writes through mmap and clock games).
    #[serde(with = "humantime_serde")]
    pub verify_interval: Duration,
    /// Expedite the kernel's RCU grace periods for the few milliseconds of a FIFREEZE call
    /// (Linux, root): the freeze then takes well under a millisecond on an idle filesystem
    /// instead of 8–40 ms. Briefly costs every CPU an interrupt per grace period.
    pub expedite_freeze: bool,
}

impl Default for Replication {
    fn default() -> Self {
        Self {
            block_size: ByteSize(64 << 10),
            zstd_level: 3,
            segment_size: ByteSize(8 << 20),
            memory_cap: ByteSize(32 << 20),
            bandwidth_limit: None,
            interval: Duration::from_secs(300),
            verify_interval: Duration::from_secs(24 * 3600),
            expedite_freeze: true,
            scan_threads: std::thread::available_parallelism()
                .map(|n| n.get().min(4))
                .unwrap_or(1),
        }
    }
}

/// The whole agent config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub vm: VmId,
    pub group: GroupId,
    /// Where durable local state lives (block hashes, sequence numbers).
    pub state_dir: PathBuf,
    /// The group's coordinator, `host:20004`; unset for a VM replicating on its own.
    #[serde(default)]
    pub coordinator: Option<String>,
    /// The cache store.
    pub store: StoreConfig,
    /// The thaw guard's socket (the `lifeboat-thaw-guard.socket` unit): where it answers, it
    /// guards every freeze from a cgroup of its own, so a cgroup freeze of the agent's unit
    /// cannot keep a filesystem frozen past its deadline. Elsewhere a child process guards it.
    #[serde(default = "default_thaw_guard")]
    pub thaw_guard: PathBuf,
    #[serde(default)]
    pub replication: Replication,
    #[serde(rename = "disk")]
    pub disks: Vec<DiskConfig>,
}

fn default_thaw_guard() -> PathBuf {
    PathBuf::from("/run/lifeboat-thaw-guard.sock")
}

/// A config that parsed but makes no sense, or did not parse.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.store.validate()?;
        let r = &self.replication;
        let bs = r.block_size.0;
        if !(4096..=(4 << 20)).contains(&bs) || !bs.is_power_of_two() {
            return Err(format!(
                "replication.block_size = {} must be a power of two between 4KiB and 4MiB",
                r.block_size
            ));
        }
        if !(1..=19).contains(&r.zstd_level) {
            return Err(format!(
                "replication.zstd_level = {} must be between 1 and 19",
                r.zstd_level
            ));
        }
        if r.segment_size.0 < bs || r.segment_size.0 > (256 << 20) {
            return Err(format!(
                "replication.segment_size = {} must be at least the block size and at most 256MiB",
                r.segment_size
            ));
        }
        if r.memory_cap.0 < 2 * r.segment_size.0 {
            return Err(format!(
                "replication.memory_cap = {} must hold at least two segments ({} each)",
                r.memory_cap, r.segment_size
            ));
        }
        if r.bandwidth_limit.is_some_and(|b| b.0 < 64 << 10) {
            return Err("replication.bandwidth_limit must be at least 64KiB (per second)".into());
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(3600)).contains(&r.interval) {
            return Err(format!(
                "replication.interval = {} must be between 10s and 60m",
                humantime::format_duration(r.interval)
            ));
        }
        if r.verify_interval < r.interval {
            return Err(
                "replication.verify_interval must not be shorter than replication.interval".into(),
            );
        }
        if !(1..=64).contains(&r.scan_threads) {
            return Err(format!(
                "replication.scan_threads = {} must be between 1 and 64",
                r.scan_threads
            ));
        }
        if self.disks.is_empty() {
            return Err("no [[disk]] to protect".into());
        }
        let mut ids = HashSet::new();
        for d in &self.disks {
            if !ids.insert(&d.id) {
                return Err(format!("disk id {} is used twice", d.id));
            }
            if d.consistency == ConsistencyKind::Vss && !cfg!(windows) {
                return Err(format!(
                    "disk {}: consistency = \"vss\" is Windows' Volume Shadow Copy Service; on Linux use \"fsfreeze\" (with `mount`) or \"hooks\"",
                    d.id
                ));
            }
            if d.consistency == ConsistencyKind::Vss {
                if d.kind == DiskKind::BlockDevice {
                    return Err(format!(
                        "disk {}: consistency = \"vss\" shadows volumes: give a directory or an image file on the volume, not a device",
                        d.id
                    ));
                }
                if let Some(m) = &d.mount
                    && !d.path.starts_with(m)
                {
                    return Err(format!(
                        "disk {}: mount {} (the volume to shadow) must hold path {}",
                        d.id,
                        m.display(),
                        d.path.display()
                    ));
                }
            }
            if !d.path.is_absolute() {
                return Err(format!(
                    "disk {}: path {} must be absolute",
                    d.id,
                    d.path.display()
                ));
            }
            if d.consistency == ConsistencyKind::Hooks && d.hooks.is_none() {
                return Err(format!(
                    "disk {}: consistency = \"hooks\" needs a [disk.hooks] table",
                    d.id
                ));
            }
            if d.consistency == ConsistencyKind::Fsfreeze
                && d.kind != DiskKind::Directory
                && d.mount.is_none()
            {
                return Err(format!(
                    "disk {}: consistency = \"fsfreeze\" needs `mount`: where the filesystem on this disk is mounted (for an image, the filesystem inside it, mounted through a loop device — not the filesystem that holds the image file)",
                    d.id
                ));
            }
            if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&d.freeze_timeout) {
                return Err(format!(
                    "disk {}: freeze_timeout must be between 100ms and 60s",
                    d.id
                ));
            }
        }
        // A restore writes `<id>.img` for an image or block device and `<id>/` for a
        // directory: two disks must not restore to one name.
        let mut outputs = HashSet::new();
        for d in &self.disks {
            let name = match d.kind {
                DiskKind::Directory => d.id.to_string(),
                _ => format!("{}.img", d.id),
            };
            if !outputs.insert(name.clone()) {
                return Err(format!(
                    "disk {}: restores to {name}, as another disk of this VM does; rename one of them",
                    d.id
                ));
            }
        }
        // The store and the state inside a protected directory would be shipped by every cycle
        // they grow with: a store that copies itself without end.
        for d in self.disks.iter().filter(|d| d.kind == DiskKind::Directory) {
            if let StoreConfig::Local { path } = &self.store
                && inside(path, &d.path)
            {
                return Err(format!(
                    "store.path {} is inside directory disk {} ({}): each cycle would replicate the store into itself; put the cache store outside every protected directory",
                    path.display(),
                    d.id,
                    d.path.display()
                ));
            }
            if inside(&self.state_dir, &d.path) {
                return Err(format!(
                    "state_dir {} is inside directory disk {} ({}): each cycle would replicate the agent's own state; move it outside every protected directory",
                    self.state_dir.display(),
                    d.id,
                    d.path.display()
                ));
            }
        }
        if let Some(c) = &self.coordinator
            && !c.contains(':')
        {
            return Err(format!(
                "coordinator = {c:?} must be host:port (the coordinator listens on 20004)"
            ));
        }
        Ok(())
    }
}

/// Whether `path` is `dir` or below it, comparing the resolved paths where they exist (a
/// symbolic link must not hide a store inside a protected directory).
fn inside(path: &Path, dir: &Path) -> bool {
    let resolve = |p: &Path| {
        // The nearest existing ancestor, resolved, with the rest appended.
        let mut base = p.to_path_buf();
        let mut rest = Vec::new();
        while !base.exists() {
            match (base.file_name().map(|n| n.to_owned()), base.parent()) {
                (Some(n), Some(parent)) => {
                    rest.push(n);
                    base = parent.to_path_buf();
                }
                _ => return p.to_path_buf(),
            }
        }
        let mut out = std::fs::canonicalize(&base).unwrap_or(base);
        out.extend(rest.into_iter().rev());
        out
    };
    resolve(path).starts_with(resolve(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
vm = "web-01"
group = "shop"
state_dir = "/var/lib/lifeboat"

[store]
kind = "local"
path = "/srv/lifeboat-cache"

[replication]
block_size = "64KiB"
segment_size = "8MiB"

[[disk]]
id = "data"
kind = "directory"
path = "/srv/data"
consistency = "fsfreeze"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("agent.toml"), &on_this_platform(text))
    }

    /// The fixtures' Unix absolute paths, made absolute on Windows too (`/srv` has no drive
    /// there) by putting them on drive C:, so that the same checks run on both.
    fn on_this_platform(text: &str) -> String {
        if cfg!(windows) {
            text.replace("\"/", "\"C:/")
        } else {
            text.to_owned()
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.replication.block_size, ByteSize(65536));
        assert_eq!(c.replication.zstd_level, 3);
        assert_eq!(c.disks[0].freeze_timeout, Duration::from_secs(2));
    }

    #[test]
    fn packaged_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.example.toml");
        let c = parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(c.disks.len(), 2);
    }

    /// The Windows installer's example (VSS) is valid there, and refused with the reason here.
    #[test]
    fn packaged_windows_example_config_is_valid_on_windows() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/windows/agent.example.toml");
        let r = parse(&std::fs::read_to_string(path).unwrap());
        if cfg!(windows) {
            let c = r.unwrap();
            assert_eq!(c.disks[0].consistency, ConsistencyKind::Vss);
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("Volume Shadow Copy"), "{e}");
        }
    }

    #[test]
    fn bad_values_get_clear_errors() {
        let cases = [
            (GOOD.replace("64KiB", "3000"), "power of two"),
            (GOOD.replace("64KiB", "64 parsecs"), "unknown size unit"),
            (GOOD.replace("\"web-01\"", "\"../etc\""), "invalid VM id"),
            (
                GOOD.replace("/srv/data", "relative/data"),
                "must be absolute",
            ),
            (
                GOOD.replace("[replication]", "[replication]\nzstd_level = 40"),
                "zstd_level",
            ),
            (
                GOOD.replace("[replication]", "[replication]\ncolour = 1"),
                "unknown field `colour`",
            ),
            (
                GOOD.replace("\"directory\"", "\"floppy\""),
                "unknown variant `floppy`",
            ),
            (
                GOOD.replace("consistency = \"fsfreeze\"", "consistency = \"hooks\""),
                "[disk.hooks]",
            ),
            (
                GOOD.replace("[replication]", "[replication]\ninterval = \"1s\""),
                "between 10s and 60m",
            ),
            // Regressions: an image `os` and a directory `os.img` sync but never restore;
            // a store inside a protected directory grows every cycle.
            (
                format!(
                    "{GOOD}\n[[disk]]\nid = \"os\"\nkind = \"image\"\npath = \"/srv/os\"\n[[disk]]\nid = \"os.img\"\nkind = \"directory\"\npath = \"/srv/x\"\n"
                ),
                "disk os.img: restores to os.img, as another disk",
            ),
            (
                GOOD.replace("/srv/lifeboat-cache", "/srv/data/.cache/lifeboat"),
                "store.path /srv/data/.cache/lifeboat is inside directory disk data",
            ),
            (
                GOOD.replace("/var/lib/lifeboat", "/srv/data/state"),
                "state_dir /srv/data/state is inside directory disk data",
            ),
        ];
        for (text, want) in cases {
            // The paths the message names are on drive C: too.
            let want = if cfg!(windows) {
                want.replace(" /", " C:/")
            } else {
                want.to_owned()
            };
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(&want), "expected {want:?} in {err:?}");
            assert!(err.starts_with("config agent.toml"), "{err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_store_reached_through_a_symlink_is_still_inside() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&data, dir.path().join("link")).unwrap();
        assert!(inside(&dir.path().join("link/cache/new"), &data));
        assert!(!inside(&dir.path().join("database"), &data));
        assert!(inside(&data, &data));
    }
}
