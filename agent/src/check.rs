//! `lifeboat-agent check`: the tutorial's preflight. Each check prints one line; a failing one
//! says how to fix it. Nothing is changed except a probe object written to and removed from
//! the cache store.

use std::fmt::Write as _;
use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use lifeboat_store::manifest::now_millis;
use lifeboat_store::{Backend, ObjectName};

use crate::config::{Config, ConsistencyKind, DiskKind, Tracking};
use crate::scan;

/// The outcome of one check.
#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok: true,
        detail: detail.into(),
    }
}

fn fail(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok: false,
        detail: detail.into(),
    }
}

/// Runs every check.
pub async fn run(config: &Config) -> Vec<Check> {
    let mut out = vec![proxy(), clock_floor()];
    out.push(store(config).await);
    if let Some(c) = &config.coordinator {
        out.push(coordinator(c).await);
    }
    if config.coordinator.is_some()
        || crate::identity::dir(&config.state_dir)
            .join("agent.pem")
            .exists()
    {
        out.push(enrolment(config).await);
    }
    out.push(state_space(config));
    #[cfg(windows)]
    out.push(state_access(config));
    for d in &config.disks {
        out.push(disk(config, d));
    }
    out
}

/// An HTTPS proxy that needs credentials is refused, as ASR does.
fn proxy() -> Check {
    for var in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        if let Ok(v) = std::env::var(var) {
            let authority = v.split("://").nth(1).unwrap_or(&v);
            if authority.split('/').next().unwrap_or("").contains('@') {
                return fail(
                    "proxy",
                    format!(
                        "{var} names a proxy with credentials; authentication proxies are not supported — use a proxy without authentication or allow direct access to the store"
                    ),
                );
            }
            return pass("proxy", format!("{var} set, without credentials"));
        }
    }
    pass("proxy", "direct connection (no HTTPS proxy set)")
}

/// A clock before 2024 is certainly wrong (no NTP yet?), and would skew every RPO figure.
fn clock_floor() -> Check {
    const JAN_2024_MS: u64 = 1_704_067_200_000;
    let now = now_millis();
    if now < JAN_2024_MS {
        return fail(
            "clock",
            "the system clock is before 2024; enable time synchronisation (chrony/systemd-timesyncd)",
        );
    }
    pass("clock", "plausible")
}

async fn store(config: &Config) -> Check {
    let backend = match config.store.open().await {
        Ok(b) => b,
        Err(e) => {
            return fail(
                "cache store",
                format!("{e} — check the store settings and credentials in [store]"),
            );
        }
    };
    let probe = ObjectName::new(format!(
        "v1/{}/probes/{}-{:016x}",
        config.group,
        config.vm,
        rand_u64()
    ))
    .expect("valid probe name");
    let payload = Bytes::from(format!("lifeboat probe {}", now_millis()));
    let r = async {
        backend.put_new(&probe, payload.clone()).await?;
        let back = backend.get(&probe).await?;
        // The agent does not need to delete (docs/azure.md): a refusal is reported, not a
        // failure, and leaves the tiny probe behind (docs/azure.md says so).
        let deleted = match backend.delete(&probe).await {
            Ok(()) => true,
            Err(e) if e.kind == lifeboat_store::ErrorKind::Denied => false,
            Err(e) => return Err(e),
        };
        Ok::<_, lifeboat_store::StoreError>((back == payload, deleted))
    }
    .await;
    let mut detail = match r {
        Ok((true, true)) => String::from("reachable, writable, readable"),
        Ok((true, false)) => format!(
            "reachable, writable, readable (not allowed to delete, which the agent does not need; probe {probe} left in place)"
        ),
        Ok((false, _)) => return fail("cache store", "read back different bytes than written"),
        Err(e) => {
            return fail(
                "cache store",
                format!(
                    "{e} — the agent needs read, write and list rights on the store (docs/azure.md)"
                ),
            );
        }
    };
    // Tags written by this VM must not lie in the future of its clock.
    let reader = lifeboat_store::restore::StoreReader::new(
        backend,
        lifeboat_store::layout::Layout::new(config.group.clone()),
    );
    for d in &config.disks {
        if let Ok(Some(tag)) = reader.latest_tag(&config.vm, &d.id).await
            && tag.time > now_millis() + 5 * 60_000
        {
            return fail(
                "clock",
                format!(
                    "disk {}'s last tag is {}s in this clock's future; the clock went backwards — fix time synchronisation",
                    d.id,
                    (tag.time - now_millis()) / 1000
                ),
            );
        }
    }
    let _ = write!(detail, "; clock consistent with the tags stored");
    pass("cache store", detail)
}

async fn coordinator(addr: &str) -> Check {
    let addrs: Vec<_> = match addr.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return fail(
                "coordinator",
                format!("cannot resolve {addr}: {e} — check `coordinator` and DNS"),
            );
        }
    };
    for a in &addrs {
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(a)).await
        {
            return pass("coordinator", format!("{addr} accepts connections"));
        }
    }
    fail(
        "coordinator",
        format!(
            "{addr} does not accept connections — allow outbound TCP to port 20004 and check the coordinator runs"
        ),
    )
}

/// The agent's group identity: enrolled, certificate valid, coordinator verified by the pinned CA
/// and accepting this agent's certificate at the TLS layer.
async fn enrolment(config: &Config) -> Check {
    let id = match crate::identity::Identity::load(&config.state_dir, config.coordinator.as_deref())
    {
        Ok(i) => i,
        Err(e) => return fail("enrolment", format!("{e:#}")),
    };
    let until = match id.not_after() {
        Ok(t) => t,
        Err(e) => return fail("enrolment", format!("{e:#}")),
    };
    let left = until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    if left.is_zero() {
        return fail(
            "enrolment",
            "the client certificate has expired — enrol again with a new join token",
        );
    }
    let tls = match id.tls() {
        Ok(t) => t,
        Err(e) => return fail("enrolment", format!("{e:#}")),
    };
    match lifeboat_proto::tls::connect(&id.coordinator, tls).await {
        Ok(_) => pass(
            "enrolment",
            format!(
                "certificate valid for {} more days (renewed automatically from {}); {} verified with the pinned group CA",
                left.as_secs() / 86_400,
                id.renew_at()
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                    .unwrap_or_else(|_| "?".into()),
                id.coordinator
            ),
        ),
        Err(e) => fail("enrolment", e.to_string()),
    }
}

/// Free space for the state files: two copies (the atomic replace) of each disk's hashes.
fn state_space(config: &Config) -> Check {
    let dir = &config.state_dir;
    let made = !dir.exists();
    if let Err(e) = std::fs::create_dir_all(dir) {
        return fail(
            "state directory",
            format!("cannot create {}: {e}", dir.display()),
        );
    }
    // Windows: a state directory made here is private from the start, as the agent makes it
    // (ProgramData would hand down Users' read); one that exists is only reported on.
    #[cfg(windows)]
    if made && let Err(e) = crate::platform::make_private_dir(dir) {
        return fail(
            "state directory",
            format!(
                "cannot restrict {} to SYSTEM and Administrators: {e}",
                dir.display()
            ),
        );
    }
    #[cfg(not(windows))]
    let _ = made;
    let probe = dir.join(".write-probe");
    if let Err(e) = std::fs::write(&probe, b"probe").and_then(|_| std::fs::remove_file(&probe)) {
        return fail(
            "state directory",
            format!("{} is not writable: {e}", dir.display()),
        );
    }
    let bs = config.replication.block_size.0;
    let need: u64 = config
        .disks
        .iter()
        .map(|d| match d.kind {
            DiskKind::Directory => 64 << 20,
            _ => scan::device_size(&d.path).unwrap_or(0) / bs * 70 * 2,
        })
        .sum::<u64>()
        + (16 << 20);
    match available(dir) {
        Some(avail) if avail < need => fail(
            "state directory",
            format!(
                "{} has {} MiB free, needs about {} MiB — free space or move state_dir",
                dir.display(),
                avail >> 20,
                need >> 20
            ),
        ),
        Some(avail) => pass(
            "state directory",
            format!("{} MiB free, about {} MiB needed", avail >> 20, need >> 20),
        ),
        None => pass("state directory", "writable (free space unknown)"),
    }
}

/// Windows: whether the state directory (the agent's key is in it) is for SYSTEM and
/// Administrators only, as the agent makes it when it starts; reported, not changed.
#[cfg(windows)]
fn state_access(config: &Config) -> Check {
    let dir = &config.state_dir;
    if crate::platform::under_wine() {
        return pass(
            "state access",
            "not checked: wine keeps no permissions on Unix files",
        );
    }
    match crate::platform::dir_dacl(dir) {
        Ok(sddl) if crate::platform::is_private_dacl(&sddl) => pass(
            "state access",
            format!("{} is for SYSTEM and Administrators only", dir.display()),
        ),
        Ok(sddl) => fail(
            "state access",
            format!(
                "{} may be readable by others ({sddl}); the agent restricts it to SYSTEM and Administrators when it starts (`lifeboat-agent sync`, or the service)",
                dir.display()
            ),
        ),
        Err(e) => fail(
            "state access",
            format!("cannot read the permissions of {}: {e}", dir.display()),
        ),
    }
}

fn available(path: &Path) -> Option<u64> {
    let path = path.canonicalize().ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list().ok()?;
    disks
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

fn disk(config: &Config, d: &crate::config::DiskConfig) -> Check {
    if let Err(e) = crate::sync::check_disk_path(d) {
        return fail("disk", format!("{e:#} — fix `path` of this [[disk]]"));
    }
    let readable = match d.kind {
        DiskKind::Directory => std::fs::read_dir(&d.path).map(|_| ()),
        _ => std::fs::File::open(&d.path).map(|_| ()),
    };
    if let Err(e) = readable {
        return fail(
            "disk",
            format!(
                "disk {}: cannot read {}: {e} — run the agent as root or grant read access",
                d.id,
                d.path.display()
            ),
        );
    }
    if d.consistency != ConsistencyKind::None {
        let is_root = std::env::var("USER").is_ok_and(|u| u == "root")
            || std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
            });
        let freezes = d.freezes();
        if freezes && !is_root {
            return fail(
                "disk",
                format!(
                    "disk {}: fsfreeze needs root (CAP_SYS_ADMIN) — run the agent as root or use consistency = \"none\"",
                    d.id
                ),
            );
        }
        if let Err(e) = crate::consistency::verify_freeze_target(d) {
            return fail("disk", format!("{e:#}"));
        }
        if let Some(state_mount) = mount_point_of(&config.state_dir)
            && let Some(disk_mount) = mount_point_of(d.mount.as_deref().unwrap_or(d.path.as_path()))
            && freezes
            && state_mount == disk_mount
        {
            return fail(
                "disk",
                format!(
                    "disk {}: state_dir is on the filesystem that gets frozen — move state_dir elsewhere",
                    d.id
                ),
            );
        }
    }
    let freezes = d.freezes();
    let mut detail = format!("disk {} ({}) readable", d.id, d.path.display());
    if d.consistency == ConsistencyKind::Vss {
        // The service answers (an administrator, the service not disabled); whether a
        // snapshot of the volume succeeds only a cut tells.
        let volume = match crate::vss::volume_of(&d.path, d.mount.as_deref()) {
            Ok(v) => v,
            Err(e) => return fail("disk", format!("disk {}: {e:#}", d.id)),
        };
        if let Err(e) = crate::vss::open() {
            return fail("disk", format!("disk {}: {e:#}", d.id));
        }
        let _ = write!(
            detail,
            "; shadow copies of {} by VSS (copy-only, writers included)",
            volume.display()
        );
    }
    if freezes {
        let _ = write!(
            detail,
            "; freezes {}, the filesystem on it, guarded by {}",
            d.mount.as_deref().unwrap_or(d.path.as_path()).display(),
            crate::consistency::watchdog_kind(
                &config.thaw_guard,
                &[d.mount.clone().unwrap_or_else(|| d.path.clone())]
            )
        );
    }
    let tracking = match (d.kind, d.tracking) {
        (DiskKind::Directory, _) if !freezes => None,
        (DiskKind::Directory, Tracking::Scan) => Some(
            "a frozen capture walks every file (tracking = \"scan\")".to_owned(),
        ),
        (DiskKind::Directory, Tracking::Auto) => Some(
            "a frozen capture reads what change events named since the pre-copy (walks every \
             file if events were lost)"
                .to_owned(),
        ),
        (_, Tracking::Scan) => Some("checksum scan (tracking = \"scan\")".to_owned()),
        (DiskKind::Image, Tracking::Auto) => Some(
            match crate::cbt::loop_device_of(&d.path).and_then(|dev| {
                crate::cbt::probe().map(|()| dev)
            }) {
                Ok(dev) => format!("eBPF changed-block tracking through {} (a start without pinned tracking state scans once)", dev.display()),
                Err(why) => format!("checksum scan: {why}"),
            },
        ),
        (DiskKind::BlockDevice, Tracking::Auto) => Some(match crate::cbt::probe() {
            Ok(()) => "eBPF changed-block tracking (a start without pinned tracking state, e.g. after a reboot, scans once)".to_owned(),
            Err(why) => format!("checksum scan: {why}"),
        }),
    };
    if let Some(t) = tracking {
        let _ = write!(detail, "; tracking: {t}");
    }
    pass("disk", detail)
}

fn mount_point_of(path: &Path) -> Option<std::path::PathBuf> {
    let path = path.canonicalize().ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list().ok()?;
    disks
        .iter()
        .map(|d| d.mount_point().to_path_buf())
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(now_millis())
}
