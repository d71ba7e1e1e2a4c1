//! The coordinator's configuration (`coordinator.toml`): parsed and validated here, at the edge,
//! with unknown fields rejected and every out-of-range value named.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lifeboat_store::{GroupId, StoreConfig};
use serde::{Deserialize, Deserializer};

/// A parsed, validated coordinator configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The replication group this coordinator runs.
    pub group: GroupId,
    /// CA, server and admin credentials, join tokens, the member list.
    pub state_dir: PathBuf,
    /// Address to serve gRPC on; the well-known port is 20004.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Most VMs the group may hold (ASR allows 16).
    #[serde(default = "default_max_members")]
    pub max_members: usize,
    /// How often agents must send heartbeats; three missed ones mark a member unhealthy.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The cache store the group's agents write and where group points are published.
    pub store: StoreConfig,
    /// The target store in the DR region; when set, points are processed into it.
    #[serde(default)]
    pub target: Option<StoreConfig>,
    /// How often processing looks for new points in the cache store (1 s to 1 h).
    #[serde(default = "default_processing", with = "humantime_serde")]
    pub processing_interval: Duration,
    /// How often the processing loop scrubs the target store: reads every object every point
    /// needs, records damaged points and asks for a new history where the newest tag is hit
    /// (1 hour to 90 days, or "0s" for never; default 7 days). The first scrub runs one
    /// interval after start.
    #[serde(default = "default_scrub", with = "humantime_serde")]
    pub scrub_interval: Duration,
    /// How long agent certificates are valid (1 day to 825 days, default 365 days); agents renew
    /// theirs once a third of it is left, so a short lifetime costs nothing but renewals.
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub agent_certificate_lifetime: Duration,
    #[serde(default)]
    pub policy: Policy,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], lifeboat_proto::PORT))
}
fn default_max_members() -> usize {
    256
}
fn default_processing() -> Duration {
    Duration::from_secs(30)
}
fn default_scrub() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_cert_lifetime() -> Duration {
    Duration::from_secs(365 * 86_400)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}

/// When to cut points and how long each phase may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Crash-consistent point interval, 10 s to 60 min.
    #[serde(with = "humantime_serde")]
    pub crash_interval: Duration,
    /// App-consistent point interval, 1 h to 12 h, or "off".
    #[serde(deserialize_with = "off_or_duration")]
    pub app_interval: Option<Duration>,
    pub crash: Deadlines,
    pub app: Deadlines,
    /// How long committed members have to upload their capture and write tags.
    #[serde(with = "humantime_serde")]
    pub tag_deadline: Duration,
    /// How long points are kept in the target store, 1 h to 72 h.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

/// The retention range the policy allows (the data plane's).
pub use lifeboat_dr::RETENTION;

/// The deadlines of one kind of cut (see the cut protocol in the `.proto`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deadlines {
    /// From Prepare to PREPARED: pre-copy, and the pre hooks of app points.
    #[serde(with = "humantime_serde")]
    pub prepare: Duration,
    /// From Freeze to the last FROZEN ack.
    #[serde(with = "humantime_serde")]
    pub ack: Duration,
    /// The agents' watchdog: longest a member stays frozen. Must exceed `ack`.
    #[serde(with = "humantime_serde")]
    pub freeze: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            crash_interval: Duration::from_secs(300),
            app_interval: Some(Duration::from_secs(4 * 3600)),
            crash: Deadlines {
                prepare: Duration::from_secs(10),
                ack: Duration::from_millis(500),
                freeze: Duration::from_millis(1500),
            },
            // Application hooks run in the prepare phase (tens of seconds); the freeze itself
            // is as short as a crash point's.
            app: Deadlines {
                prepare: Duration::from_secs(60),
                ack: Duration::from_millis(500),
                freeze: Duration::from_millis(1500),
            },
            tag_deadline: Duration::from_secs(300),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

fn off_or_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s == "off" {
        return Ok(None);
    }
    humantime::parse_duration(&s).map(Some).map_err(|e| {
        serde::de::Error::custom(format!("{s:?}: {e} (a duration like \"4h\", or \"off\")"))
    })
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.store.validate()?;
        if let Some(t) = &self.target {
            t.validate()
                .map_err(|e| e.replacen("store.", "target.", 1))?;
        }
        let p = &self.policy;
        let range = |name: &str, v: Duration, lo: Duration, hi: Duration| {
            if v < lo || v > hi {
                Err(format!(
                    "policy.{name} = {} is out of range ({} to {})",
                    humantime::format_duration(v),
                    humantime::format_duration(lo),
                    humantime::format_duration(hi)
                ))
            } else {
                Ok(())
            }
        };
        range(
            "crash_interval",
            p.crash_interval,
            Duration::from_secs(10),
            Duration::from_secs(3600),
        )?;
        if let Some(a) = p.app_interval {
            range(
                "app_interval",
                a,
                Duration::from_secs(3600),
                Duration::from_secs(12 * 3600),
            )?;
        }
        for (name, d) in [("crash", p.crash), ("app", p.app)] {
            if d.prepare.is_zero() || d.ack.is_zero() {
                return Err(format!("policy.{name}: deadlines must be positive"));
            }
            if d.freeze <= d.ack {
                return Err(format!(
                    "policy.{name}.freeze ({}) must be longer than policy.{name}.ack ({}): a member's watchdog must not thaw before the coordinator can have heard from every member",
                    humantime::format_duration(d.freeze),
                    humantime::format_duration(d.ack)
                ));
            }
        }
        range(
            "retention",
            p.retention,
            *RETENTION.start(),
            *RETENTION.end(),
        )?;
        if p.tag_deadline.is_zero() {
            return Err("policy.tag_deadline must be positive".into());
        }
        if self.max_members == 0 || self.max_members > 4096 {
            return Err(format!(
                "max_members = {} is out of range (1 to 4096)",
                self.max_members
            ));
        }
        range(
            "processing_interval",
            self.processing_interval,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )
        .map_err(|e| e.replace("policy.", ""))?;
        if !self.scrub_interval.is_zero() {
            range(
                "scrub_interval",
                self.scrub_interval,
                Duration::from_secs(3600),
                Duration::from_secs(90 * 86_400),
            )
            .map_err(|e| format!("{} (or \"0s\" for no scrub)", e.replace("policy.", "")))?;
        }
        let days = self.agent_certificate_lifetime.as_secs() / 86_400;
        if !(1..=825).contains(&days) {
            return Err(format!(
                "agent_certificate_lifetime = {} is out of range (1 day to 825 days)",
                humantime::format_duration(self.agent_certificate_lifetime)
            ));
        }
        range(
            "heartbeat_interval",
            self.heartbeat_interval,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )
        .map_err(|e| e.replace("policy.", ""))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
group = "g1"
state_dir = "/tmp/x"
[store]
kind = "local"
path = "/tmp/store"
"#;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("c.toml"), &format!("{BASE}{extra}"))
    }

    /// With top-level keys, which must come before BASE's `[store]` table.
    fn parse_top(keys: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("c.toml"), &format!("{keys}{BASE}"))
    }

    #[test]
    fn defaults_follow_the_policy() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.port(), 20004);
        assert_eq!(c.max_members, 256);
        assert_eq!(c.policy.crash_interval, Duration::from_secs(300));
        assert_eq!(c.policy.app_interval, Some(Duration::from_secs(4 * 3600)));
    }

    #[test]
    fn the_packaged_example_parses() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/coordinator.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.group.as_str(), "shop");
        assert_eq!(c.policy.crash.ack, Duration::from_millis(500));
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse("[policy]\ncrash_interval = \"5s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policy.crash_interval = 5s is out of range"),
            "{e}"
        );
        let e = parse("[policy]\napp_interval = \"13h\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("app_interval"), "{e}");
        assert!(
            parse("[policy]\napp_interval = \"off\"\n")
                .unwrap()
                .policy
                .app_interval
                .is_none()
        );
        let e = parse("[policy.crash]\nprepare = \"1s\"\nack = \"1s\"\nfreeze = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be longer than policy.crash.ack"), "{e}");
        let e = parse_top("agent_certificate_lifetime = \"2h\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent_certificate_lifetime = 2h is out of range (1 day to 825 days)"),
            "{e}"
        );
        let e = parse_top("max_members = 0\n").unwrap_err().to_string();
        assert!(e.contains("max_members = 0 is out of range"), "{e}");
        let e = parse_top("scrub_interval = \"5m\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("scrub_interval = 5m is out of range") && e.contains("\"0s\" for no scrub"),
            "{e}"
        );
        assert!(
            parse_top("scrub_interval = \"0s\"\n")
                .unwrap()
                .scrub_interval
                .is_zero()
        );
        assert_eq!(
            parse_top("agent_certificate_lifetime = \"30days\"\n")
                .unwrap()
                .agent_certificate_lifetime,
            Duration::from_secs(30 * 86_400)
        );
        let e = parse_top("colour = \"red\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = Config::parse(Path::new("c.toml"), &BASE.replace("g1", "../g")).unwrap_err();
        assert!(e.to_string().contains("group"), "{e}");
    }
}
