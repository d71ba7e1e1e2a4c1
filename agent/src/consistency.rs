//! Consistency providers: freezing filesystems around a cut (with a deadline that always ends
//! the freeze) and running application pre/post hooks with timeouts.
//!
//! A freeze is guarded twice: the agent thaws when the cut is captured or fails, and a separate
//! watchdog *process* (`lifeboat-agent thaw-watchdog`), started before the freeze, thaws at the
//! deadline even if the agent hangs or is killed with SIGKILL. At start-up the agent also thaws
//! any configured mount left frozen (for example by a restart that killed both).
//!
//! The watchdog is either a child process in a process group of its own (it survives SIGKILL,
//! SIGSTOP and SIGTSTP of the agent's group) or, where the `lifeboat-thaw-guard.socket` unit is
//! installed, an instance of `lifeboat-thaw-guard@.service` that systemd starts per connection
//! in a cgroup of its own: that one also survives a cgroup freeze of the agent's unit
//! (`systemctl freeze lifeboat-agent`), which stops every process of the unit, a child
//! watchdog included. Both speak the same lines (see [`run_watchdog`]).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

#[cfg(target_os = "linux")]
#[path = "freeze_linux.rs"]
mod platform;
#[cfg(not(target_os = "linux"))]
#[path = "freeze_other.rs"]
mod platform;

/// When a freeze began and ended, by the wall clock (for reports and tests).
#[derive(Debug, Clone, Copy)]
pub struct FreezeWindow {
    pub frozen_at: SystemTime,
    pub thawed_at: SystemTime,
    pub held: Duration,
    /// Of `held`, how long the FIFREEZE calls themselves took (the filesystem writing back
    /// and checkpointing its journal, writers already blocked): the part of the window the
    /// agent does not control.
    pub freezing: Duration,
}

/// Filesystems frozen for a cut. Dropping it thaws them.
#[derive(Debug)]
pub struct Frozen {
    mounts: Vec<PathBuf>,
    /// Held open while frozen: the watchdog reads end-of-file on it when this process dies,
    /// and thaws at once instead of at its deadline.
    watchdog: Option<Lifeline>,
    started: Instant,
    frozen_at: SystemTime,
    deadline: Duration,
    /// Time spent in FIFREEZE.
    freezing: Duration,
}

/// A thaw watchdog started ahead of a freeze, waiting to be armed. Starting a process takes
/// milliseconds (and CPU other members need), so a group member starts it while preparing, not
/// inside the freeze window. Dropping an unarmed watchdog ends it.
#[derive(Debug)]
pub struct Watchdog {
    line: Option<Lifeline>,
    mounts: Vec<PathBuf>,
}

/// How the agent reaches its watchdog; the watchdog reads end-of-file when the agent dies.
#[derive(Debug)]
enum Lifeline {
    /// `lifeboat-agent thaw-watchdog MOUNTS…`, a child of the agent.
    Child {
        child: Child,
        stdin: Option<std::process::ChildStdin>,
    },
    /// A connection to the thaw guard socket (`lifeboat-agent thaw-watchdog`, started by
    /// systemd per connection, at the other end).
    #[cfg(unix)]
    Guard(std::os::unix::net::UnixStream),
}

/// The version of the thaw guard's lines, in its first line: the guard is whatever
/// `/usr/bin/lifeboat-agent` is installed, which may be another build than this agent.
const GUARD_PROTOCOL: u32 = 1;

/// How long the guard has to say it is ready (systemd starting the instance included) before
/// the agent guards the freeze itself.
#[cfg(unix)]
const GUARD_READY: Duration = Duration::from_secs(3);

/// The thaw guard's first line.
#[derive(serde::Serialize, serde::Deserialize)]
struct GuardHello {
    version: u32,
    mounts: Vec<PathBuf>,
}

impl Lifeline {
    fn send(&mut self, line: &str) -> std::io::Result<()> {
        use std::io::Write;
        match self {
            Lifeline::Child { stdin, .. } => {
                let stdin = stdin
                    .as_mut()
                    .ok_or_else(|| std::io::Error::other("the watchdog's stdin is closed"))?;
                stdin.write_all(line.as_bytes())?;
                stdin.flush()
            }
            #[cfg(unix)]
            Lifeline::Guard(s) => s.write_all(line.as_bytes()),
        }
    }

    /// Ends the watchdog. With `thawed` (every mount was thawed by the agent), it is told the
    /// freeze is over and exits without thawing anything; without, it reads end-of-file and
    /// thaws at once from its own descriptors.
    fn end(self, thawed: bool) {
        match self {
            Lifeline::Child { mut child, stdin } => {
                if thawed {
                    let _ = child.kill();
                    let _ = child.wait();
                } else {
                    drop(stdin);
                }
            }
            #[cfg(unix)]
            Lifeline::Guard(mut s) => {
                if thawed {
                    let _ = std::io::Write::write_all(&mut s, b"done\n");
                }
                // Wait (briefly) for the guard to be gone, so no guard of this freeze can
                // thaw a later one.
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut sink = [0u8; 64];
                while let Ok(n) = std::io::Read::read(&mut s, &mut sink) {
                    if n == 0 {
                        break;
                    }
                }
            }
        }
    }
}

/// Reads one line from the guard (at most 4 KiB), within the stream's read timeout.
#[cfg(unix)]
fn read_guard_line(s: &mut std::os::unix::net::UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match std::io::Read::read(s, &mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the guard closed the connection",
                ));
            }
            _ if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ if line.len() >= 4096 => {
                return Err(std::io::Error::other("the guard's line is too long"));
            }
            _ => line.push(byte[0]),
        }
    }
}

/// Which watchdog a freeze of `mounts` gets, for `check`: the thaw guard when it answers
/// ready for them (it is never armed, so it exits untouched).
pub fn watchdog_kind(guard: &std::path::Path, mounts: &[PathBuf]) -> String {
    #[cfg(unix)]
    let answer = Watchdog::guard(mounts, guard).map(|w| w.is_some());
    #[cfg(not(unix))]
    let answer: Result<bool> = {
        let _ = mounts;
        Ok(false)
    };
    match answer {
        Ok(true) => format!(
            "the thaw guard at {} (survives SIGKILL, stops and a cgroup freeze of the agent)",
            guard.display()
        ),
        Ok(false) => format!(
            "a child process (survives SIGKILL and stops of the agent's process group, not a cgroup freeze of its unit: no thaw guard socket at {})",
            guard.display()
        ),
        Err(e) => format!(
            "a child process (the thaw guard at {} does not answer: {e:#})",
            guard.display()
        ),
    }
}

/// Connects to the thaw guard socket; `None` when there is none (not installed, not under
/// systemd, not Unix).
#[cfg(unix)]
fn connect_guard(guard: &std::path::Path) -> Result<Option<std::os::unix::net::UnixStream>> {
    match std::os::unix::net::UnixStream::connect(guard) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context("cannot connect")),
    }
}

impl Watchdog {
    /// Readies a watchdog for `mounts`: the thaw guard at `guard` when it answers, else a
    /// child process. It thaws them once armed and its deadline passes, and exits without
    /// touching them if never armed.
    pub fn spawn(mounts: &[PathBuf], guard: &std::path::Path) -> Result<Self> {
        #[cfg(unix)]
        match Self::guard(mounts, guard) {
            Ok(Some(w)) => return Ok(w),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                guard = %guard.display(),
                error = %format!("{e:#}"),
                "the thaw guard does not answer; a child process guards this freeze (it does not survive a cgroup freeze of the agent)"
            ),
        }
        #[cfg(not(unix))]
        let _ = guard;
        Self::child(mounts)
    }

    /// Hands the freeze of `mounts` to the thaw guard: names them (absolute, symlinks
    /// resolved: the guard resolves nothing relative to this process) and waits for `ready`,
    /// which the guard says once it has opened every one. A guard that does not answer in
    /// time, or refuses, is an error: the caller guards the freeze itself.
    #[cfg(unix)]
    fn guard(mounts: &[PathBuf], guard: &std::path::Path) -> Result<Option<Self>> {
        let Some(mut stream) = connect_guard(guard)? else {
            return Ok(None);
        };
        let mut absolute = Vec::new();
        for m in mounts {
            let a = std::fs::canonicalize(m)
                .with_context(|| format!("cannot resolve mount {}", m.display()))?;
            anyhow::ensure!(a.to_str().is_some(), "mount {} is not UTF-8", a.display());
            absolute.push(a);
        }
        let hello = GuardHello {
            version: GUARD_PROTOCOL,
            mounts: absolute,
        };
        stream.set_read_timeout(Some(GUARD_READY))?;
        std::io::Write::write_all(
            &mut stream,
            format!("{}\n", serde_json::to_string(&hello)?).as_bytes(),
        )
        .context("cannot name the mounts to the thaw guard")?;
        let answer = read_guard_line(&mut stream).context("no answer from the thaw guard")?;
        anyhow::ensure!(answer == "ready", "the thaw guard refused: {answer}");
        stream.set_read_timeout(None)?;
        Ok(Some(Watchdog {
            line: Some(Lifeline::Guard(stream)),
            mounts: mounts.to_vec(),
        }))
    }

    fn child(mounts: &[PathBuf]) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the agent's own executable")?;
        let mut cmd = Command::new(exe);
        // A process group of its own: stopping the agent's group (Ctrl-Z at a terminal,
        // `kill -STOP -<pgid>`, a job-control stop from a shell) must not stop the watchdog
        // too, or a filesystem stays frozen until someone sends SIGCONT.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .arg("thaw-watchdog")
            .args(mounts)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the thaw watchdog")?;
        let stdin = child.stdin.take();
        Ok(Watchdog {
            line: Some(Lifeline::Child { child, stdin }),
            mounts: mounts.to_vec(),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Never armed: a child is killed, a guard told `done` exits untouched.
        if let Some(l) = self.line.take() {
            l.end(true);
        }
    }
}

impl Frozen {
    /// Arms `watchdog` with a hard `deadline`, then freezes its mounts (in order). On any
    /// failure, whatever was frozen is thawed again before returning the error.
    ///
    /// With `expedite`, RCU grace periods are expedited for the FIFREEZE calls (see
    /// `expedite_grace_periods`): most of an idle filesystem's freeze is spent waiting for them,
    /// and applications already wait from the first of them on.
    pub fn freeze(mut watchdog: Watchdog, deadline: Duration, expedite: bool) -> Result<Self> {
        let mut line = watchdog.line.take().context("watchdog already used")?;
        let mounts = std::mem::take(&mut watchdog.mounts);
        let expedited = expedite.then(platform::expedite_grace_periods);
        // The watchdog clears the switch should this process die before it does.
        let ours = expedited.as_ref().is_some_and(|e| e.set_by_us());
        let armed = line
            .send(&format!("{} {}\n", deadline.as_millis(), u8::from(ours)))
            .context("cannot arm the thaw watchdog");
        let mut frozen = Frozen {
            mounts: Vec::new(),
            watchdog: Some(line),
            started: Instant::now(),
            frozen_at: SystemTime::now(),
            deadline,
            freezing: Duration::ZERO,
        };
        armed?;
        // Nothing the agent writes may block on a frozen filesystem (see `progress`).
        crate::progress::hold_writes(true);
        for m in &mounts {
            let t = Instant::now();
            platform::freeze(m).with_context(|| format!("cannot freeze {}", m.display()))?;
            tracing::debug!(mount = %m.display(), took = ?t.elapsed(), "froze");
            frozen.freezing += t.elapsed();
            frozen.mounts.push(m.clone());
        }
        drop(expedited);
        Ok(frozen)
    }

    /// When the freeze began (the cut's time).
    pub fn frozen_at(&self) -> SystemTime {
        self.frozen_at
    }

    /// Thaws everything; fails if any thaw failed or the deadline had already passed (the
    /// watchdog may have thawed, so the capture cannot be trusted as a consistent cut).
    /// Whether the deadline has not passed yet (so the watchdog has not thawed).
    pub fn within_deadline(&self) -> bool {
        self.started.elapsed() <= self.deadline
    }

    /// Thaws everything. With `capture_done`, the capture finished before the deadline and
    /// stays valid even if the watchdog has thawed since (a group member kept frozen waiting
    /// for its Commit); otherwise passing the deadline fails: the watchdog may have thawed mid-capture.
    pub fn thaw_after_capture(mut self, capture_done: bool) -> Result<FreezeWindow> {
        let held = self.started.elapsed();
        let result = self.thaw_all();
        // A mount found already thawed well before the deadline was thawed by someone else
        // (`fsfreeze -u`, a stopped guard) while the capture ran: its bytes may mix states.
        // (Near the deadline it may be the watchdog, armed a moment before `started`.)
        if let Ok(false) = result
            && held + Duration::from_millis(100) <= self.deadline
        {
            bail!(
                "a filesystem was thawed by something else during the cut's {held:?} freeze; the cut is discarded"
            );
        }
        let window = FreezeWindow {
            frozen_at: self.frozen_at,
            thawed_at: SystemTime::now(),
            held,
            freezing: self.freezing,
        };
        result?;
        if held > self.deadline && !capture_done {
            bail!(
                "freeze held {held:?}, past its {:?} deadline; the cut is discarded",
                self.deadline
            );
        }
        Ok(window)
    }

    /// Thaws every mount; `Ok(false)` when one was no longer frozen. A mount the agent could
    /// not thaw is left to the watchdog, which then thaws at once.
    fn thaw_all(&mut self) -> Result<bool> {
        let mut first_err = None;
        let mut all_frozen = true;
        for m in self.mounts.drain(..).rev() {
            match platform::thaw(&m) {
                Ok(was_frozen) => all_frozen &= was_frozen,
                Err(e) => {
                    tracing::error!(mount = %m.display(), error = %e, "thaw failed; the watchdog thaws it");
                    first_err.get_or_insert(anyhow::anyhow!("cannot thaw {}: {e}", m.display()));
                }
            }
        }
        if let Some(w) = self.watchdog.take() {
            w.end(first_err.is_none());
        }
        crate::progress::hold_writes(false);
        first_err.map_or(Ok(all_frozen), Err)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.thaw_all();
    }
}

/// For a disk that freezes, checks that its mount is a mount point holding the filesystem on
/// that disk (see `verify_mount`); `Ok` for disks that do not freeze.
pub fn verify_freeze_target(d: &crate::config::DiskConfig) -> Result<()> {
    use crate::config::DiskKind;
    if !d.freezes() {
        return Ok(());
    }
    let mount = d.mount.as_deref().unwrap_or(d.path.as_path());
    let what = match d.kind {
        DiskKind::Directory => platform::MountOf::Directory,
        DiskKind::BlockDevice => platform::MountOf::BlockDevice,
        DiskKind::Image => platform::MountOf::Image,
    };
    platform::verify_mount(mount, &d.path, what)
        .map_err(|e| anyhow::anyhow!("disk {}: cannot freeze it: {e}", d.id))
}

pub use platform::{identity, on_tmpfs};

/// Writes back the mounts' dirty data ahead of a freeze; failures only cost freeze time.
pub fn presync(mounts: &[PathBuf]) {
    for m in mounts {
        if let Err(e) = platform::sync(m) {
            tracing::debug!(mount = %m.display(), error = %e, "syncfs before the freeze failed");
        }
    }
}

/// The watchdog process's body: wait to be armed, then thaw every mount at the deadline — or
/// at once when stdin reaches end-of-file first, which means the agent died while frozen.
/// Never armed (stdin closed first), or told `done` (the agent thawed), it exits without
/// touching anything.
///
/// The lines on stdin: with `mounts` empty, first a JSON array of the mount paths (the thaw
/// guard's case: one socket serves every freeze); then the arming line, the deadline in
/// milliseconds (unless `deadline` is given) followed by `1` if the agent expedited RCU grace
/// periods for its FIFREEZE calls (and so may die leaving them expedited), else `0`; then
/// `done` once the agent has thawed.
///
/// Thawing at once matters beyond a shorter freeze: a watchdog that outlived its agent would
/// thaw whatever freeze holds the mount at its deadline, including a restarted agent's, in the
/// middle of that agent's capture (see also [`thaw_leftovers`], which ends such watchdogs).
pub fn run_watchdog(deadline: Option<Duration>, mounts: &[PathBuf]) {
    platform::ignore_stop_signals();
    let read_line = || {
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(n) if n > 0 => Some(line),
            _ => None,
        }
    };
    let guard = mounts.is_empty();
    let mounts: Vec<PathBuf> = if guard {
        let Some(first) = read_line() else { return };
        let refuse = |why: String| {
            tracing::error!("thaw guard: {why}");
            let _ = platform::reply_on_stdin(&format!("error {why}\n"));
        };
        let hello = match serde_json::from_str::<GuardHello>(&first) {
            Ok(h) if h.version != GUARD_PROTOCOL => {
                return refuse(format!(
                    "protocol version {} (this guard speaks {GUARD_PROTOCOL}; install the agent's own version)",
                    h.version
                ));
            }
            Ok(h) if !h.mounts.is_empty() && h.mounts.iter().all(|m| m.is_absolute()) => h,
            _ => return refuse("the first line does not name absolute mounts".into()),
        };
        for m in &hello.mounts {
            if let Err(e) = std::fs::File::open(m) {
                return refuse(format!("cannot open {}: {e}", m.display()));
            }
        }
        if platform::reply_on_stdin("ready\n").is_err() {
            return;
        }
        hello.mounts
    } else {
        mounts.to_vec()
    };
    let (deadline, expedited) = match deadline {
        Some(d) => (d, false),
        None => {
            let Some(line) = read_line() else { return };
            let mut words = line.split_whitespace();
            match words.next().map(str::parse) {
                Some(Ok(ms)) => (Duration::from_millis(ms), words.next() == Some("1")),
                _ => return,
            }
        }
    };
    if guard {
        tracing::info!(mounts = ?mounts, ?deadline, "thaw guard armed");
    }
    // `true`: told `done`; `false`: end-of-file, the agent is gone.
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    std::thread::spawn(move || {
        loop {
            match read_line() {
                Some(l) if l.trim() == "done" => break tx.send(true),
                Some(_) => continue,
                None => break tx.send(false),
            }
        }
    });
    let why = match rx.recv_timeout(deadline) {
        Ok(true) => return,
        Ok(false) => "the agent is gone (or could not thaw) while frozen; thawed by the watchdog",
        Err(_) => "freeze deadline passed; thawed by the watchdog",
    };
    // The agent may have died, or be stopped, in the middle of its FIFREEZE calls.
    if expedited {
        platform::clear_expedited();
    }
    for m in &mounts {
        match platform::thaw(m) {
            Ok(true) => {
                tracing::warn!(mount = %m.display(), ?deadline, "{why}")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(mount = %m.display(), error = %e, "watchdog cannot thaw"),
        }
    }
}

/// Thaws mounts a previous run may have left frozen; logs any that were. First ends any thaw
/// watchdog a killed earlier run left for these mounts: at its deadline it would thaw this
/// run's own freeze mid-capture.
pub fn thaw_leftovers(mounts: &[PathBuf]) {
    platform::end_orphan_watchdogs(mounts);
    for m in mounts {
        match platform::thaw(m) {
            Ok(true) => {
                tracing::warn!(mount = %m.display(), "found the filesystem frozen at start-up (previous run died mid-cut); thawed it")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(mount = %m.display(), error = %e, "cannot check freeze state")
            }
        }
    }
}

/// Bytes of each of a hook's output streams kept for the log.
const HOOK_LOG_BYTES: u64 = 16 << 10;

/// Runs a hook command with `sh -c` in a process group of its own, killing the whole group at
/// `timeout`. Output is logged, bounded.
///
/// The hook is done when its shell exits. Its output goes to unlinked temporary files rather
/// than pipes, read once it is done: a process the hook leaves behind (a lock holder that its
/// post hook ends, say) would hold a pipe open and, with it, the cut; and a hook printing more
/// than a pipe holds would stall on the write until killed as "timed out". A hook that times
/// out loses every process of its group, so nothing it started outlives the failed cut.
pub fn run_hook(phase: &str, command: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let stdout = tempfile::tempfile().context("cannot create a file for a hook's output")?;
    let stderr = tempfile::tempfile().context("cannot create a file for a hook's output")?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?);
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{phase} hook {command:?} cannot start"))?;
    // The command holds its own handles; ours are for reading back.
    drop(cmd);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            kill_group(&mut child);
            let _ = child.wait();
            bail!("{phase} hook {command:?} timed out after {timeout:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (out, err) = (bounded_text(stdout), bounded_text(stderr));
    tracing::info!(phase, command, %status, stdout = %out, stderr = %err, took = ?started.elapsed(), "hook finished");
    if !status.success() {
        bail!("{phase} hook {command:?} failed ({status}): {err}");
    }
    Ok(())
}

/// Kills every process of a hook's group (its shell and whatever that started).
fn kill_group(child: &mut Child) {
    platform::kill_process_group(child.id());
    let _ = child.kill();
}

/// The start of what a hook wrote to `file` (at most [`HOOK_LOG_BYTES`]), trimmed, with how
/// much more there was.
fn bounded_text(mut file: std::fs::File) -> String {
    use std::io::{Read, Seek};
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if file.rewind().is_ok() {
        let _ = (&mut file).take(HOOK_LOG_BYTES).read_to_end(&mut buf);
    }
    let mut text = String::from_utf8_lossy(&buf).trim().to_owned();
    if total > buf.len() as u64 {
        text.push_str(&format!(" … ({} more bytes)", total - buf.len() as u64));
    }
    text
}

/// How a cycle run by [`unless_stopped`] ended.
#[derive(Debug)]
pub enum Run<T> {
    /// It ran to its end; no stop came.
    Done(T),
    /// A stop came while it held a filesystem frozen (or shadow copies): it ran to its end;
    /// stop now.
    DoneThenStop(T),
    /// A stop came and the cycle was dropped.
    Stopped,
}

/// Runs one replication cycle unless `stop` comes first. A stop ends the cycle at once (its
/// work is resumable: checkpoints and the cache store's tags are what a restart reads, exactly
/// as after a SIGKILL), so a service stop never waits out a long copy; but a cut that holds a
/// filesystem frozen (or VSS shadow copies) finishes first, so its thaw (their deletion) is the
/// agent's and the point is kept. `stop`
/// must not be polled again once this returned anything but `Done`.
///
/// Only for cycles that run no hooks (not-frozen background passes, crash-consistent cuts):
/// "frozen" here is the freeze itself, and an app cut stopped after its pre hooks or between
/// its thaw and its post hooks would skip the post hooks.
pub async fn unless_stopped<T>(
    cycle: impl std::future::Future<Output = T>,
    stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Run<T> {
    tokio::pin!(cycle);
    tokio::select! {
        r = &mut cycle => Run::Done(r),
        () = stop.as_mut() => {
            if crate::progress::held() || crate::vss::held() {
                tracing::info!("stopping once the cut in progress thaws (or releases its shadow copies) and ends");
                Run::DoneThenStop(cycle.await)
            } else {
                tracing::info!("stopping; the cycle in progress resumes at the next start");
                Run::Stopped
            }
        }
    }
}
