//! Helpers shared by Lifeboat's end-to-end tests: root detection (CI runs as root and there a
//! skip is a failure), loop-mounted filesystems, deterministic data, finding the built binaries.
//! The multi-process group tests (coordinator plus agents) live in `tests/tests/`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// Whether the test runs as root; prints why it skips otherwise. CI runs as root, and there a
/// skip is a failure — except on Windows (`scripts/test-windows`), which has none of these.
pub fn root_or_skip(test: &str) -> bool {
    if cfg!(windows) {
        eprintln!("SKIPPED {test}: loop-mounted filesystems and fsfreeze are Linux only");
        return false;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test} needs root (loop devices, mount, fsfreeze, namespaces) and CI runs as root"
        );
        eprintln!("SKIPPED {test}: needs root for loop-mounted filesystems, fsfreeze, namespaces");
    }
    root
}

/// A filesystem in an image file, attached to a loop device and mounted; unmounted, detached
/// and deleted on drop. `device` is the loop device (a block device under a mounted
/// filesystem, as on a VM), `image` the file behind it.
#[derive(Debug)]
pub struct LoopFs {
    pub mount: PathBuf,
    pub image: PathBuf,
    pub device: PathBuf,
}

impl LoopFs {
    /// Makes a `size_mib` filesystem of type `fs` ("ext4", "xfs") under `dir` and mounts it.
    pub fn new(dir: &Path, fs: &str, size_mib: u64) -> Self {
        Self::named(dir, fs, fs, size_mib)
    }

    /// As [`LoopFs::new`], with `name` distinguishing several filesystems in one directory.
    pub fn named(dir: &Path, name: &str, fs: &str, size_mib: u64) -> Self {
        let image = dir.join(format!("{name}.img"));
        let mount = dir.join(format!("{name}-mnt"));
        std::fs::create_dir_all(&mount).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size_mib << 20).unwrap();
        drop(f);
        let mkfs = format!("mkfs.{fs}");
        let mut cmd = Command::new(&mkfs);
        if fs == "ext4" {
            // No lazy initialisation: a kernel thread zeroing inode tables in the background
            // would change the device between a test's oracle read and the agent's capture.
            cmd.args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]);
        } else {
            cmd.arg("-q").arg("-f");
        }
        run(cmd.arg(&image));
        let device = attach_loop(&image);
        run(Command::new("mount").arg(&device).arg(&mount));
        LoopFs {
            mount,
            image,
            device,
        }
    }
}

/// Attaches `image` to a free loop device (whole file) and returns the device's path.
pub fn attach_loop(image: &Path) -> PathBuf {
    PathBuf::from(
        run(Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(image))
        .trim(),
    )
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Never leave a frozen filesystem behind, whatever the test did.
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).output();
        let _ = Command::new("umount").arg(&self.mount).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Runs a command, insists it succeeded, returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts two directory trees are identical (see [`tree_difference`]).
pub fn assert_same_tree(a: &Path, b: &Path) {
    if let Some(d) = tree_difference(a, b) {
        panic!("{d}");
    }
}

/// The first difference between two directory trees, if any: names, the kind of each entry
/// (directory, file, symbolic link), files' bytes, links' targets. Compared here rather than
/// by `diff -r`, which Windows lacks.
pub fn tree_difference(a: &Path, b: &Path) -> Option<String> {
    fn entries(dir: &Path) -> Result<BTreeMap<OsString, std::fs::FileType>, String> {
        let fail = |e: std::io::Error| format!("cannot list {}: {e}", dir.display());
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir).map_err(fail)? {
            let e = e.map_err(fail)?;
            out.insert(e.file_name(), e.file_type().map_err(fail)?);
        }
        Ok(out)
    }
    let (ea, eb) = match (entries(a), entries(b)) {
        (Ok(ea), Ok(eb)) => (ea, eb),
        (Err(e), _) | (_, Err(e)) => return Some(e),
    };
    if !ea.keys().eq(eb.keys()) {
        return Some(format!(
            "{} holds {:?}, {} holds {:?}",
            a.display(),
            ea.keys().collect::<Vec<_>>(),
            b.display(),
            eb.keys().collect::<Vec<_>>()
        ));
    }
    for (name, ta) in &ea {
        let tb = eb[name];
        let (pa, pb) = (a.join(name), b.join(name));
        let differ = || Some(format!("{} and {} differ", pa.display(), pb.display()));
        if ta.is_symlink() || tb.is_symlink() {
            if !(ta.is_symlink() && tb.is_symlink())
                || std::fs::read_link(&pa).ok() != std::fs::read_link(&pb).ok()
            {
                return differ();
            }
        } else if ta.is_dir() || tb.is_dir() {
            if !(ta.is_dir() && tb.is_dir()) {
                return differ();
            }
            if let Some(d) = tree_difference(&pa, &pb) {
                return Some(d);
            }
        } else {
            match (std::fs::read(&pa), std::fs::read(&pb)) {
                (Ok(x), Ok(y)) if x == y => {}
                _ => return differ(),
            }
        }
    }
    None
}

/// Copies the directory tree `from` to `to` (which must not exist), as `cp -a` would the
/// names, kinds and bytes; not modes or times.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap_or_else(|e| panic!("cannot create {}: {e}", to.display()));
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ty = e.file_type().unwrap();
        if ty.is_symlink() {
            let target = std::fs::read_link(&src).unwrap();
            #[cfg(unix)]
            std::os::unix::fs::symlink(target, &dst).unwrap();
            #[cfg(windows)]
            std::os::windows::fs::symlink_file(target, &dst).unwrap();
        } else if ty.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Deterministic incompressible bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A workspace binary (`lifeboat-agent`, `lifeboat-coordinator`, `lifeboat`) next to the
/// running test's directory. `cargo test --workspace` builds them all before running tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (scripts/test.sh)",
        p.display()
    );
    p
}

/// A `lifeboat-coordinator` process for tests: configured on a free loopback port with a local
/// store under its directory, initialised, and killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct CoordinatorProc {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub store: PathBuf,
    pub addr: String,
    pub log: PathBuf,
    child: Option<std::process::Child>,
}

impl CoordinatorProc {
    /// Writes the configuration (plus `extra` TOML, e.g. a `[policy]` table) and runs `init`.
    pub fn init(dir: &Path, group: &str, listen: &str, extra: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let store = dir.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let state_dir = dir.join("coordinator");
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "group = \"{group}\"\nstate_dir = {:?}\nlisten = \"{listen}\"\nheartbeat_interval = \"1s\"\n{extra}\n[store]\nkind = \"local\"\npath = {:?}\n",
                state_dir.display(),
                store.display()
            ),
        )
        .unwrap();
        run(Command::new(bin("lifeboat-coordinator"))
            .arg("--config")
            .arg(&config)
            .arg("init"));
        CoordinatorProc {
            dir: dir.to_owned(),
            config,
            state_dir,
            store,
            addr: listen.to_string(),
            log: dir.join("coordinator.log"),
            child: None,
        }
    }

    /// `init` listening on a loopback port the system picks, then `start`: a serving
    /// coordinator of group `group`, whose address is what it reports.
    pub fn serving(dir: &Path, group: &str, extra: &str) -> Self {
        let mut c = Self::init(dir, group, "127.0.0.1:0", extra);
        c.start();
        c
    }

    /// Starts `serve` and waits until it listens. Configured on port 0, the first start learns
    /// the port from the address the coordinator reports in its state directory, and later
    /// starts listen on that same address (agents are configured with it).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let reported = self.state_dir.join("address");
        let learn = self.addr.ends_with(":0");
        if learn {
            let _ = std::fs::remove_file(&reported);
        } else {
            let text = std::fs::read_to_string(&self.config).unwrap();
            let host = self.addr.rsplit_once(':').map_or("", |(h, _)| h);
            let pinned = text.replace(
                &format!("listen = \"{host}:0\""),
                &format!("listen = \"{}\"", self.addr),
            );
            if pinned != text {
                std::fs::write(&self.config, pinned).unwrap();
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("lifeboat-coordinator"))
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("LIFEBOAT_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn lifeboat-coordinator");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        if learn {
            self.addr = loop {
                if let Ok(a) = std::fs::read_to_string(&reported)
                    && a.ends_with('\n')
                {
                    break a.trim().to_string();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "coordinator reported no address:\n{}",
                    self.log_text()
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
        }
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "coordinator did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (as a service manager's stop), then waits up to `within` for the exit; `None`
    /// if it is still running then (it is SIGKILLed, as a service manager would).
    pub fn terminate(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        run(Command::new("kill").arg("-TERM").arg(c.id().to_string()));
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = c.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Mints a join token (`--vm` when given).
    pub fn token(&self, vm: Option<&str>, ttl: &str) -> String {
        let mut cmd = Command::new(bin("lifeboat-coordinator"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("join-token")
            .arg("--ttl")
            .arg(ttl);
        if let Some(vm) = vm {
            cmd.arg("--vm").arg(vm);
        }
        run(&mut cmd).trim().to_string()
    }

    /// Runs the admin CLI against this coordinator (`snapshot`, `members`, …).
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("lifeboat"))
            .args(args)
            .arg("--coordinator")
            .arg(&self.addr)
            .arg("--credentials")
            .arg(self.state_dir.join("admin"))
            .output()
            .expect("run lifeboat")
    }

    /// `lifeboat snapshot`, insisting it succeeded; returns (point id, stderr).
    pub fn snapshot(&self, group: &str, app: bool) -> (String, String) {
        let mut args = vec!["snapshot", "--group", group];
        if app {
            args.push("--app-consistent");
        }
        let out = self.admin(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "snapshot failed: {stderr}\n--- coordinator log ---\n{}",
            self.log_text()
        );
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr,
        )
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A spawned process that is SIGKILLed when dropped, so a failing test leaves nothing running.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Rewrites the time of point `id` of `group` in the local store at `store`: tests make hours of
/// history in seconds.
pub fn set_point_time(store: &Path, group: &str, id: &str, time: u64) {
    let name = format!("v1/{group}/points/{id}.point");
    let path = store.join(&name);
    let mut p =
        lifeboat_store::manifest::RecoveryPoint::decode(&name, &std::fs::read(&path).unwrap())
            .unwrap();
    p.time = time;
    std::fs::write(&path, p.encode()).unwrap();
}

/// SQLite in WAL mode taking commits, plus random 4 KiB overwrites of a 16 MiB file (some
/// fsync'd, most left in the page cache for the freeze to flush) and new small files.
pub const LIVE_WRITER: &str = r#"
import os, random, sqlite3, sys
root, stop, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(seed)
c = sqlite3.connect(os.path.join(root, "app.db"), isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB)")
blob = os.path.join(root, "blob.bin")
with open(blob, "ab") as f:
    f.truncate(16 << 20)
fd = os.open(blob, os.O_RDWR)
i = 0
while not os.path.exists(stop):
    i += 1
    c.execute("BEGIN")
    c.execute("INSERT INTO t VALUES(NULL, randomblob(?))", (rnd.randrange(100, 6000),))
    c.execute("COMMIT")
    os.pwrite(fd, rnd.randbytes(4096), rnd.randrange(4096) * 4096)
    if i % 16 == 0:
        os.fsync(fd)
    if i % 50 == 0:
        with open(os.path.join(root, f"f{i % 2000}.txt"), "w") as f:
            f.write(f"{i}\n" * rnd.randrange(1, 3000))
"#;

/// A live writer on a mounted filesystem; stopped (and checked) by [`LiveWriter::stop`].
#[derive(Debug)]
pub struct LiveWriter {
    child: Child,
    stop: PathBuf,
}

impl LiveWriter {
    pub fn start(mount: &Path, seed: u64) -> Self {
        let stop = mount.with_extension("stop");
        let child = Command::new("python3")
            .arg("-c")
            .arg(LIVE_WRITER)
            .arg(mount)
            .arg(&stop)
            .arg(seed.to_string())
            .spawn()
            .unwrap();
        LiveWriter { child, stop }
    }

    pub fn stop(mut self) {
        std::fs::write(&self.stop, b"").unwrap();
        assert!(self.child.wait().unwrap().success(), "writer failed");
    }
}

impl Drop for LiveWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The oracle command: an O_DIRECT copy of `device` into `oracles/<cut time ms>.img`.
pub fn oracle_command(device: &Path, oracles: &Path) -> String {
    format!(
        "dd if={} of={}/$LIFEBOAT_CUT_TIME_MS.img bs=1M iflag=direct status=none",
        device.display(),
        oracles.display()
    )
}

/// Compares a restored image with the oracle read at its cut; names the first differing
/// 4 KiB block.
pub fn assert_same_bytes(restored: &Path, oracle: &Path, what: &str) {
    let a = std::fs::read(restored).unwrap();
    let b = std::fs::read(oracle).unwrap();
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: restored size differs from the device"
    );
    if a != b {
        let first = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .position(|(x, y)| x != y)
            .unwrap();
        let differing = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .filter(|(x, y)| x != y)
            .count();
        panic!(
            "{what}: restored image differs from the O_DIRECT oracle in {differing} 4 KiB blocks, first at offset {}",
            first * 4096
        );
    }
}

/// Mounts a restored image read-only and runs SQLite's integrity check on its database.
pub fn check_database(image: &Path, fs: &str, at: &Path) {
    std::fs::create_dir_all(at).unwrap();
    // A copy of an xfs filesystem has its UUID: allow it next to the original.
    // Read-write, so the journal or log of the crash-consistent image is replayed.
    let opts = if fs == "xfs" { "loop,nouuid" } else { "loop" };
    run(Command::new("mount").args(["-o", opts]).arg(image).arg(at));
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro', uri=True); print(c.execute('PRAGMA integrity_check').fetchone()[0], c.execute('select count(*) from t').fetchone()[0])")
        .arg(at.join("app.db"))
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(at).output();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("ok "),
        "restored database: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
