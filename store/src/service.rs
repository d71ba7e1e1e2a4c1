//! Telling the service manager how a long-running command is doing (systemd's `sd_notify`):
//! readiness, liveness pings and stopping, as datagrams to `$NOTIFY_SOCKET`.
//!
//! Hand-written rather than a dependency: the protocol is one datagram of `KEY=value` lines
//! to a Unix socket, and outside a `Type=notify` unit (no `NOTIFY_SOCKET`) every call is a
//! no-op, so the binaries behave the same when run by hand. Other service managers (the
//! Windows one) hear the same moments through [`report_to`].

use std::time::Duration;

/// Sends `state` (newline-separated `KEY=value` assignments) to the service manager, if this
/// process was started with a notification socket. Failures are logged, never fatal: a lost
/// notification costs at most a start timeout, which the service manager reports by itself.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::warn!(error = %e, socket = ?path, "cannot notify the service manager");
    }
}

/// A state a service manager other than systemd is told about (the Windows service control
/// manager, whose reports the agent's service module makes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Ready,
    Stopping,
}

type Reporter = Box<dyn Fn(Event) + Send + Sync>;
static OTHER: std::sync::OnceLock<Reporter> = std::sync::OnceLock::new();

/// Sends [`ready`] and [`stopping`] to `report` too, for the life of the process (set once, by
/// the code that runs under such a manager; a second call is ignored).
pub fn report_to(report: impl Fn(Event) + Send + Sync + 'static) {
    let _ = OTHER.set(Box::new(report));
}

fn other(event: Event) {
    if let Some(report) = OTHER.get() {
        report(event);
    }
}

/// The service is up: `Type=notify` units count as started from here (a Windows service is
/// reported running).
pub fn ready() {
    notify("READY=1");
    other(Event::Ready);
}

/// The service is shutting down (logged by the service manager as "deactivating"; a Windows
/// service is reported stop-pending).
pub fn stopping() {
    notify("STOPPING=1");
    other(Event::Stopping);
}

/// The watchdog interval the service manager asked for (`WatchdogSec=`), if it is meant for
/// this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval until the runtime stops. What a ping proves is that
/// the process's async runtime still schedules tasks — a deadlocked or wedged runtime gets the
/// process restarted — not that replication makes progress (status and RPO tell that).
pub fn spawn_watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    });
}

#[cfg(unix)]
fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    // A leading '@' names a socket in the abstract namespace (Linux only).
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::other("abstract sockets need Linux"));
        }
    }
    socket.send_to(state.as_bytes(), std::path::Path::new(path))?;
    Ok(())
}

#[cfg(not(unix))]
fn send(_path: &std::ffi::OsStr, _state: &str) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    // The environment is process-wide, so one test covers both socket kinds in sequence.
    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("lifeboat-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        // A socket nobody listens on is an error for `send`, which `notify` only logs.
        assert!(send(dir.path().join("absent").as_os_str(), "READY=1").is_err());
    }
}
