//! The randomised, model-based lifecycle test: real `lifeboat-agent sync` and
//! `lifeboat process|prune|restore|points` processes over an image disk and a directory disk with
//! random churn, cache trims, retention with time moving (point times, never the wall clock),
//! SIGKILLs, lost agent state, clock steps and damaged objects, with the invariants checked
//! after every step. Seeded: a failure prints `LIFEBOAT_LIFECYCLE_SEED` and
//! `LIFEBOAT_LIFECYCLE_STEPS` to replay it; `scripts/soak` runs the same body with fresh seeds.
//!
//! Scenarios the product does not handle yet sit behind flags (see [`Opts`]), so that the test
//! expects today's behaviour until they are flipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{Base, DiskShape, RecoveryPoint, Tag};
use lifeboat_store::restore::sources_for;
use lifeboat_store::{DiskId, GroupId, PointId, VmId};
use lifeboat_tests::bin;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const GROUP: &str = "g1";
const VM: &str = "vm1";
const IMAGE_BYTES: u64 = 16 << 20;
const BLOCK: u64 = 16 << 10;
const SEGMENT: u64 = 256 << 10;
const RETENTION_MS: u64 = 2 * 3_600_000;
const MINUTE: u64 = 60_000;
/// The directory disk is kept around this size (churn deletes files beyond it).
const DIR_TARGET_BYTES: u64 = 4 << 20;

/// What one run does; read from the environment so a failure replays exactly.
#[derive(Debug, Clone)]
struct Opts {
    seed: u64,
    steps: usize,
    /// `LIFEBOAT_LIFECYCLE_EXPECT_RESYNC=1` — the agent notices damage in its own cache store
    /// (damage in the agent's own cache store): a sync after cache damage must succeed, and a point cut by
    /// `sync --verify` (the sweep) must not rely on a damaged object. Off: such syncs may fail
    /// and such points may be broken.
    expect_resync: bool,
    /// `LIFEBOAT_LIFECYCLE_STRICT_CLOCK=1` — after a clock step back, points cut at earlier
    /// times than the latest processed one are still processed. Off: the
    /// model accepts that processing skips them as if pruned.
    strict_clock: bool,
    /// Re-protection (lost agent state and a new, empty cache store), expecting processing to
    /// carry on (time-derived history numbers keep the histories apart): on unless
    /// `LIFEBOAT_LIFECYCLE_REPROTECT=0`.
    reprotect: bool,
    /// `LIFEBOAT_LIFECYCLE_STRICT_BASES=1` — a damaged base manifest costs only the points
    /// that could restore from it. Off: it may cost every point of its disk (today).
    strict_bases: bool,
    /// `LIFEBOAT_LIFECYCLE_DAMAGE=0` turns damage off (to look at steady state alone).
    damage: bool,
    /// Protection resumes after damage: within [`STALL_LIMIT`] complete passes that follow
    /// new points, the newest point is processed (damage in the target that a disk's history
    /// needs makes processing ask the agent for a new history). On unless
    /// `LIFEBOAT_LIFECYCLE_LIVENESS=0`.
    liveness: bool,
}

/// Complete passes after new points without the newest one processed, counted from the last
/// damage, after which protection counts as stopped.
const STALL_LIMIT: u32 = 3;

impl Opts {
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let flag = |k: &str| var(k).is_some_and(|v| v != "0");
        let seed = var("LIFEBOAT_LIFECYCLE_SEED")
            .map(|s| s.parse().expect("LIFEBOAT_LIFECYCLE_SEED is a number"))
            .unwrap_or(0x11FE_B0A7);
        let steps = var("LIFEBOAT_LIFECYCLE_STEPS")
            .map(|s| s.parse().expect("LIFEBOAT_LIFECYCLE_STEPS is a number"))
            .unwrap_or(200);
        Opts {
            seed,
            steps,
            expect_resync: flag("LIFEBOAT_LIFECYCLE_EXPECT_RESYNC"),
            strict_clock: flag("LIFEBOAT_LIFECYCLE_STRICT_CLOCK"),
            reprotect: var("LIFEBOAT_LIFECYCLE_REPROTECT").is_none_or(|v| v != "0"),
            strict_bases: flag("LIFEBOAT_LIFECYCLE_STRICT_BASES"),
            damage: var("LIFEBOAT_LIFECYCLE_DAMAGE").is_none_or(|v| v != "0"),
            liveness: var("LIFEBOAT_LIFECYCLE_LIVENESS").is_none_or(|v| v != "0"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Store {
    Cache,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Harm {
    Flip,
    Truncate,
    Delete,
}

/// An object the test damaged, and what it looked like right after (to tell when it was
/// replaced or removed by the product, which ends the damage).
#[derive(Debug, Clone)]
struct Damage {
    harm: Harm,
    after: Option<(u64, SystemTime)>,
}

/// A point the agent published, as the model knows it.
#[derive(Debug, Clone)]
struct PointRec {
    time: u64,
    /// Bytes of the disks changed since the previous point (churn).
    churn: u64,
    /// Cut after the agent lost its state or its cache (may be a new full copy).
    full: bool,
    /// Cut while the model's clock was behind an earlier point's time.
    stepped_back: bool,
    /// Cut while some damage to the cache store was in effect.
    after_cache_damage: bool,
    /// Cut by `sync --verify` (the verification sweep, which reads the cache's segments back).
    verified: bool,
}

/// What a restore of a point reads, resolved to the store holding each object.
#[derive(Debug, Default)]
struct Needs {
    used: Vec<(Store, String)>,
    missing: Vec<(Store, String)>,
    /// An object that exists but does not decode (the name is in `used`).
    broken: Option<String>,
}

struct World {
    opts: Opts,
    rng: StdRng,
    dir: PathBuf,
    image: PathBuf,
    data: PathBuf,
    cache: PathBuf,
    target: PathBuf,
    state: PathBuf,
    refs: PathBuf,
    config: PathBuf,
    layout: Layout,
    /// The model's clock (Unix ms) for point times.
    now: u64,
    /// The newest point time handed out, to tell a clock step back.
    newest_time: u64,
    points: BTreeMap<String, PointRec>,
    damaged: BTreeMap<(Store, String), Damage>,
    /// Every object damaged at some point since the last complete scrub began: a damage record
    /// stands until the next scrub, even if its damage healed meanwhile.
    damaged_since_scrub: BTreeSet<(Store, String)>,
    /// Every object damaged when the quarantine records in the target were written: a pass
    /// rewrites them all, and they stand until the next one, even if that damage healed
    /// meanwhile (a damaged cache tree the agent's next tag writes whole again).
    damaged_at_pass: BTreeSet<(Store, String)>,
    /// Fingerprints of what each (store, point) restore read when it last restored exactly.
    restored: HashMap<(Store, String), (Prints, bool)>,
    churn_since_point: u64,
    full_pending: bool,
    /// Points cut since the last complete processing pass, and how many such passes in a row
    /// left the newest of them unprocessed (reset by damage and by progress).
    new_since_pass: Vec<String>,
    stalled: u32,
    log: Vec<String>,
    // Figures for the report and `scripts/soak`.
    cycles: u64,
    /// New histories the agent began, over a tag processing offered (a checksum compare) or as
    /// a full copy.
    delta_resyncs: u64,
    full_copies: u64,
    /// Syncs that waited for processing's offer.
    waits: u64,
    /// While the agent waits for processing's offer: complete passes since the wait began
    /// (reset by what can start a new wait: damage, lost state).
    waiting_passes: Option<u32>,
    processed: BTreeSet<String>,
    target_bytes: Vec<u64>,
    max_lag: u64,
    lag: u64,
    restores: u64,
}

type Check = Result<(), String>;

/// Name, length and mtime of each object a restore read.
type Prints = Vec<(String, u64, SystemTime)>;

#[test]
fn lifecycle_randomised_model_based() {
    let opts = Opts::from_env();
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::new(dir.path(), opts.clone());
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| world.run()));
    let failure = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(p) => Some(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        ),
    };
    eprintln!("{}", world.stats(started.elapsed()));
    if failure.is_none() && std::env::var_os("LIFEBOAT_LIFECYCLE_VERBOSE").is_some() {
        eprintln!("--- steps ---\n{}", world.log.join("\n"));
    }
    if let Some(why) = failure {
        let steps = world.log.len();
        eprintln!("--- steps ---\n{}", world.log.join("\n"));
        // Keep the stores for a look when asked to.
        if std::env::var_os("LIFEBOAT_LIFECYCLE_KEEP").is_some() {
            let kept = dir.keep();
            eprintln!("stores kept in {}", kept.display());
        }
        panic!(
            "lifecycle invariant broken: {why}\nreplay: LIFEBOAT_LIFECYCLE_SEED={} LIFEBOAT_LIFECYCLE_STEPS={steps}{}{}{}{}{}{}",
            opts.seed,
            if opts.expect_resync {
                " LIFEBOAT_LIFECYCLE_EXPECT_RESYNC=1"
            } else {
                ""
            },
            if opts.strict_clock {
                " LIFEBOAT_LIFECYCLE_STRICT_CLOCK=1"
            } else {
                ""
            },
            if opts.reprotect {
                ""
            } else {
                " LIFEBOAT_LIFECYCLE_REPROTECT=0"
            },
            if opts.strict_bases {
                " LIFEBOAT_LIFECYCLE_STRICT_BASES=1"
            } else {
                ""
            },
            if opts.damage {
                ""
            } else {
                " LIFEBOAT_LIFECYCLE_DAMAGE=0"
            },
            if opts.liveness {
                ""
            } else {
                " LIFEBOAT_LIFECYCLE_LIVENESS=0"
            },
        );
    }
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn short(s: &str) -> String {
    let s = s.trim().replace('\n', " | ");
    if s.chars().count() > 400 {
        format!("{}…", s.chars().take(400).collect::<String>())
    } else {
        s
    }
}

fn fingerprint(p: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Every file under `dir`, as `/`-separated names relative to `root`.
fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

fn bytes_and_count(dir: &Path) -> (u64, u64) {
    let mut names = Vec::new();
    files_under(dir, dir, &mut names);
    let bytes = names
        .iter()
        .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum();
    (bytes, names.len() as u64)
}

fn ids_of(listing: &str) -> (Vec<(String, String)>, Vec<String>) {
    // (status, id) per listed point; ids listed as damaged apart.
    let mut points = Vec::new();
    let mut damaged = Vec::new();
    for line in listing.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        match first {
            "no" => {}
            "damaged" => damaged.extend(words.next().map(str::to_string)),
            "processed" | "unprocessed" | "quarantined" => {
                if let Some(id) = words.next() {
                    points.push((first.to_string(), id.to_string()));
                }
            }
            id => points.push((String::new(), id.to_string())),
        }
    }
    (points, damaged)
}

impl World {
    fn new(dir: &Path, opts: Opts) -> Self {
        let rng = StdRng::seed_from_u64(opts.seed);
        let image = dir.join("disk.img");
        let data = dir.join("data");
        let cache = dir.join("cache");
        let target = dir.join("target");
        let refs = dir.join("refs");
        let state = dir.join("state");
        for d in [&data, &cache, &target, &refs] {
            std::fs::create_dir_all(d).unwrap();
        }
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "vm = \"{VM}\"\ngroup = \"{GROUP}\"\nstate_dir = {:?}\n[store]\nkind = \"local\"\npath = {:?}\n[replication]\nblock_size = \"{}KiB\"\nsegment_size = \"{}KiB\"\n[[disk]]\nid = \"os\"\nkind = \"image\"\npath = {:?}\n[[disk]]\nid = \"data\"\nkind = \"directory\"\npath = {:?}\n",
                state.display(),
                cache.display(),
                BLOCK >> 10,
                SEGMENT >> 10,
                image.display(),
                data.display()
            ),
        )
        .unwrap();
        // Point times start well in the past so that hours of model time never pass the wall
        // clock (the prune gets the model's time as --now).
        let now = lifeboat_store::manifest::now_millis() - 20 * 24 * 3_600_000;
        World {
            opts,
            rng,
            dir: dir.into(),
            image,
            data,
            cache,
            target,
            state,
            refs,
            config,
            layout: Layout::new(GroupId::new(GROUP).unwrap()),
            now,
            newest_time: 0,
            points: BTreeMap::new(),
            damaged: BTreeMap::new(),
            damaged_since_scrub: BTreeSet::new(),
            damaged_at_pass: BTreeSet::new(),
            restored: HashMap::new(),
            churn_since_point: 0,
            full_pending: true,
            new_since_pass: Vec::new(),
            stalled: 0,
            log: Vec::new(),
            cycles: 0,
            delta_resyncs: 0,
            full_copies: 0,
            waits: 0,
            waiting_passes: None,
            processed: BTreeSet::new(),
            target_bytes: Vec::new(),
            max_lag: 0,
            lag: 0,
            restores: 0,
        }
    }

    fn note(&mut self, s: String) {
        self.log.push(format!("{:>3} {s}", self.log.len() + 1));
    }

    fn root(&self, s: Store) -> &Path {
        match s {
            Store::Cache => &self.cache,
            Store::Target => &self.target,
        }
    }

    fn run(&mut self) -> Check {
        // Initial disks: an incompressible image and a few files.
        let mut img = vec![0u8; IMAGE_BYTES as usize];
        self.rng.fill_bytes(&mut img);
        std::fs::write(&self.image, &img).unwrap();
        drop(img);
        for _ in 0..12 {
            self.dir_op(0);
        }
        self.churn_since_point = IMAGE_BYTES;
        self.sync(None)?;
        self.check(false, false)?;
        for _ in 1..self.opts.steps {
            self.step()?;
        }
        // A final full round: whatever is pending gets processed and checked.
        self.process(None, true)?;
        self.check(true, false)
    }

    fn step(&mut self) -> Check {
        let damage = if self.opts.damage { 4 } else { 0 };
        let reprotect = if self.opts.reprotect { 2 } else { 0 };
        let weights = [
            ("sync", 30),
            ("sync-killed", 5),
            ("process", 22),
            ("process-killed", 5),
            ("prune", 14),
            ("prune-killed", 3),
            ("lose-state", 3),
            ("clock-step", 2),
            ("damage", damage),
            ("reprotect", reprotect),
        ];
        let total: u32 = weights.iter().map(|w| w.1).sum();
        let mut pick = self.rng.random_range(0..total);
        let mut what = "sync";
        for (w, n) in weights {
            if pick < n {
                what = w;
                break;
            }
            pick -= n;
        }
        let (processed, pruned) = match what {
            "sync" => {
                self.churn();
                self.sync(None)?;
                (false, false)
            }
            "sync-killed" => {
                self.churn();
                let ms = self.rng.random_range(0..400);
                self.sync(Some(ms))?;
                (false, false)
            }
            "process" => {
                let trim = self.rng.random_bool(0.8);
                let scrub = self.rng.random_bool(0.3);
                (self.process_with(None, trim, scrub)?, false)
            }
            "process-killed" => {
                let ms = self.rng.random_range(0..300);
                self.process(Some(ms), true)?;
                (false, false)
            }
            "prune" => (false, self.prune(None)?),
            "prune-killed" => {
                let ms = self.rng.random_range(0..200);
                self.prune(Some(ms))?;
                (false, false)
            }
            "lose-state" => {
                let _ = std::fs::remove_dir_all(&self.state);
                self.full_pending = true;
                self.waiting_passes = None;
                self.note("lose-state: agent state directory deleted".into());
                (false, false)
            }
            "clock-step" => {
                let back = self.rng.random_range(20..90) * MINUTE;
                self.now -= back;
                self.note(format!("clock-step: back {} min", back / MINUTE));
                (false, false)
            }
            "damage" => {
                self.waiting_passes = None;
                self.damage();
                (false, false)
            }
            "reprotect" => {
                let _ = std::fs::remove_dir_all(&self.state);
                std::fs::remove_dir_all(&self.cache).unwrap();
                std::fs::create_dir_all(&self.cache).unwrap();
                self.damaged.retain(|(s, _), _| *s != Store::Cache);
                self.full_pending = true;
                self.note("reprotect: agent state and cache store replaced by empty ones".into());
                (false, false)
            }
            _ => unreachable!(),
        };
        self.check(processed, pruned)
    }

    // ----- the source disks -----

    fn churn(&mut self) {
        let mut changed = 0;
        let writes = self.rng.random_range(0..6);
        if writes > 0 {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.image)
                .unwrap();
            for _ in 0..writes {
                let len = self.rng.random_range(1..(512 << 10)) as usize;
                let at = self.rng.random_range(0..IMAGE_BYTES - len as u64);
                let mut buf = vec![0u8; len];
                if self.rng.random_bool(0.8) {
                    self.rng.fill_bytes(&mut buf);
                }
                write_all_at(&mut f, &buf, at);
                changed += len as u64;
            }
        }
        for _ in 0..self.rng.random_range(0..8) {
            let kind = self.rng.random_range(0..4);
            changed += self.dir_op(kind);
        }
        self.churn_since_point += changed;
    }

    fn dir_files(&self) -> Vec<PathBuf> {
        let mut names = Vec::new();
        files_under(&self.data, &self.data, &mut names);
        names.sort();
        names.into_iter().map(|n| self.data.join(n)).collect()
    }

    /// One random change to the directory disk; returns the bytes it wrote.
    fn dir_op(&mut self, kind: u32) -> u64 {
        let files = self.dir_files();
        let size: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let kind = if size > DIR_TARGET_BYTES { 3 } else { kind };
        match (kind, files.is_empty()) {
            (1, false) => {
                // Overwrite a range of an existing file.
                let f = &files[self.rng.random_range(0..files.len())];
                let len = std::fs::metadata(f).unwrap().len();
                let n = self.rng.random_range(1..(64 << 10)) as usize;
                let at = self.rng.random_range(0..=len);
                let mut buf = vec![0u8; n];
                self.rng.fill_bytes(&mut buf);
                let mut file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
                write_all_at(&mut file, &buf, at);
                n as u64
            }
            (2, false) => {
                let f = &files[self.rng.random_range(0..files.len())];
                let len = std::fs::metadata(f).unwrap().len();
                let to = self.rng.random_range(0..=len);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(f)
                    .unwrap()
                    .set_len(to)
                    .unwrap();
                0
            }
            (3, false) => {
                let f = &files[self.rng.random_range(0..files.len())];
                std::fs::remove_file(f).unwrap();
                // Leave empty directories alone sometimes: they are part of the tree too.
                0
            }
            _ => {
                let sub = ["", "a", "b", "a/deep", "c"][self.rng.random_range(0..5)];
                let d = self.data.join(sub);
                std::fs::create_dir_all(&d).unwrap();
                let n = self.rng.random_range(0..(300 << 10)) as usize;
                let mut buf = vec![0u8; n];
                self.rng.fill_bytes(&mut buf);
                let name = format!("f{}", self.rng.random_range(0..200));
                let p = d.join(name);
                if p.is_dir() {
                    return 0;
                }
                std::fs::write(p, buf).unwrap();
                n as u64
            }
        }
    }

    fn keep_reference(&self, id: &str) {
        let r = self.refs.join(id);
        std::fs::create_dir_all(&r).unwrap();
        std::fs::copy(&self.image, r.join("os.img")).unwrap();
        lifeboat_tests::copy_tree(&self.data, &r.join("data"));
    }

    fn cache_point_ids(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.cache.join(format!("v1/{GROUP}/points")))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".point")
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cache_damage_in_effect(&self) -> bool {
        self.damaged.keys().any(|(s, _)| *s == Store::Cache)
    }

    /// `lifeboat-agent sync`, SIGKILLed after `kill_ms` when given; every point it published
    /// gets the model's time and a reference copy of the disks (which did not change meanwhile).
    /// The first segment of each disk's newest history in the cache (a change is a new full
    /// copy: a resync, or a first copy after lost state).
    fn histories(&self) -> Vec<Option<(u64, Option<u64>)>> {
        let vm = VmId::new(VM).unwrap();
        ["os", "data"]
            .iter()
            .map(|d| {
                let disk = DiskId::new(*d).unwrap();
                let dir = self.cache.join(self.layout.tags(&vm, &disk).as_str());
                let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                names.sort();
                let newest = names.pop()?;
                let data = std::fs::read(&newest).ok()?;
                Tag::decode(&newest.to_string_lossy(), &data)
                    .ok()
                    .map(|t| (t.from_segment, t.origin))
            })
            .collect()
    }

    fn sync(&mut self, kill_ms: Option<u64>) -> Check {
        let before = self.cache_point_ids();
        let histories = self.histories();
        let verified = self.rng.random_bool(0.25);
        let mut cmd = Command::new(bin("lifeboat-agent"));
        cmd.arg("--config").arg(&self.config).arg("sync");
        if verified {
            cmd.arg("--verify");
        }
        // Why the agent began a new history, if it did (for the step log).
        let mut why_new = String::new();
        let mut waits = false;
        let outcome = match kill_ms {
            None => {
                let o = cmd.output().unwrap();
                let text = out_text(&o);
                waits = !o.status.success() && text.contains("waits for processing to offer");
                why_new = text
                    .lines()
                    .filter(|l| l.contains("resynchronising") || l.contains("full copy"))
                    .map(short)
                    .collect::<Vec<_>>()
                    .join(" | ");
                if o.status.success() {
                    "ok".to_string()
                } else {
                    format!("exit {:?}: {}", o.status.code(), short(&text))
                }
            }
            Some(ms) => {
                let mut child = cmd
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                std::thread::sleep(Duration::from_millis(ms));
                let _ = child.kill();
                let _ = child.wait();
                format!("SIGKILL after {ms} ms")
            }
        };
        let new: Vec<String> = self
            .cache_point_ids()
            .difference(&before)
            .cloned()
            .collect();
        let stepped_back = self.now < self.newest_time;
        // A new history since the last sync (asked for by processing, say) is a full copy — or
        // a delta over a tag processing offered, counted here as one all the same (the bound
        // then holds for either).
        let now_histories = self.histories();
        let resynced = now_histories != histories;
        for (a, b) in histories.iter().zip(&now_histories) {
            match b {
                Some((from, origin)) if a.is_none_or(|a| a.0 != *from) => match origin {
                    Some(_) => self.delta_resyncs += 1,
                    None => self.full_copies += 1,
                },
                _ => {}
            }
        }
        for id in &new {
            lifeboat_tests::set_point_time(&self.cache, GROUP, id, self.now);
            self.keep_reference(id);
            self.points.insert(
                id.clone(),
                PointRec {
                    time: self.now,
                    churn: self.churn_since_point,
                    full: self.full_pending || resynced,
                    stepped_back,
                    after_cache_damage: self.cache_damage_in_effect(),
                    verified,
                },
            );
            self.newest_time = self.newest_time.max(self.now);
            self.cycles += 1;
        }
        self.new_since_pass.extend(new.iter().cloned());
        let failed_plain = kill_ms.is_none() && outcome != "ok";
        self.note(format!(
            "sync{}{}: {outcome}; new point(s) {new:?} at t+{} min{}",
            if verified { " --verify" } else { "" },
            if kill_ms.is_some() { "-killed" } else { "" },
            self.now / MINUTE % 100_000,
            if resynced && !why_new.is_empty() {
                format!("; new history: {why_new}")
            } else {
                String::new()
            }
        ));
        if !new.is_empty() {
            self.churn_since_point = 0;
            self.full_pending = false;
            self.now += self.rng.random_range(5..30) * MINUTE;
        }
        // A disk whose history cannot go on (lost state over a trimmed cache, a lost cache
        // segment) waits for processing's offer of a tag to resynchronise over: no point until
        // the next pass answers, by design.
        if waits {
            self.waits += 1;
            // A complete pass answers every ask: an agent still waiting after two of them
            // would wait its hour out for nothing.
            match self.waiting_passes {
                Some(n) if n >= 2 => {
                    return Err(format!(
                        "the agent still waits for processing's offer after {n} complete passes: {outcome}"
                    ));
                }
                Some(_) => {}
                None => self.waiting_passes = Some(0),
            }
        } else if outcome == "ok" {
            self.waiting_passes = None;
        }
        if failed_plain && !waits && (self.opts.expect_resync || !self.cache_damage_in_effect()) {
            return Err(format!("lifeboat-agent sync failed: {outcome}"));
        }
        Ok(())
    }

    // ----- processing and retention -----

    fn lifeboat(&self, args: &[&str], paths: &[(&str, &Path)]) -> Command {
        let mut cmd = Command::new(bin("lifeboat"));
        cmd.args(args).arg("--group").arg(GROUP);
        for (flag, p) in paths {
            cmd.arg(flag).arg(p);
        }
        cmd
    }

    /// Runs `cmd`, or SIGKILLs it after `kill_ms`; `None` when killed.
    fn run_or_kill(cmd: &mut Command, kill_ms: Option<u64>) -> Option<Output> {
        match kill_ms {
            None => Some(cmd.output().unwrap()),
            Some(ms) => {
                let mut child = cmd
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                std::thread::sleep(Duration::from_millis(ms));
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }

    /// `lifeboat process [--trim-cache]`; true when a complete pass ran (the advance invariant
    /// is then checked).
    fn process(&mut self, kill_ms: Option<u64>, trim: bool) -> Result<bool, String> {
        self.process_with(kill_ms, trim, false)
    }

    /// `lifeboat process [--trim-cache] [--scrub]`: with `scrub`, the target scrub too (points
    /// whose data it finds damaged are listed as damaged from then on).
    fn process_with(
        &mut self,
        kill_ms: Option<u64>,
        trim: bool,
        scrub: bool,
    ) -> Result<bool, String> {
        let mut args = vec!["process"];
        if trim {
            args.push("--trim-cache");
        }
        if scrub {
            args.push("--scrub");
        }
        let mut cmd = self.lifeboat(
            &args,
            &[("--cache", &self.cache), ("--store", &self.target)],
        );
        let before_scrub: BTreeSet<(Store, String)> = self.damaged.keys().cloned().collect();
        let o = Self::run_or_kill(&mut cmd, kill_ms);
        // A complete pass makes the quarantine records its own; a killed one may have
        // written some of them.
        if o.is_some() {
            if let Some(n) = self.waiting_passes.as_mut() {
                *n += 1;
            }
            self.damaged_at_pass = before_scrub.clone();
        } else {
            self.damaged_at_pass.extend(before_scrub.iter().cloned());
        }
        if scrub && o.is_some() {
            self.damaged_since_scrub = before_scrub;
        }
        let text = match &o {
            None => format!("SIGKILL after {} ms", kill_ms.unwrap_or_default()),
            Some(o) => format!("exit {:?}: {}", o.status.code(), short(&out_text(o))),
        };
        self.note(format!(
            "process{}{}{}: {text}",
            if trim { " --trim-cache" } else { "" },
            if scrub { " --scrub" } else { "" },
            if kill_ms.is_some() { " (killed)" } else { "" }
        ));
        Ok(o.is_some())
    }

    /// `lifeboat prune` at the model's time; true when it completed.
    fn prune(&mut self, kill_ms: Option<u64>) -> Result<bool, String> {
        let now = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(self.now))
            .to_string();
        let retention = format!("{}h", RETENTION_MS / 3_600_000);
        let mut cmd = self.lifeboat(
            &["prune", "--retention", &retention, "--now", &now],
            &[("--store", &self.target), ("--cache", &self.cache)],
        );
        let o = Self::run_or_kill(&mut cmd, kill_ms);
        let text = match &o {
            None => format!("SIGKILL after {} ms", kill_ms.unwrap_or_default()),
            Some(o) => format!("exit {:?}: {}", o.status.code(), short(&out_text(o))),
        };
        self.note(format!(
            "prune{}: {text}",
            if kill_ms.is_some() { " (killed)" } else { "" }
        ));
        match o {
            // Damage costs what it damages: retention reports what it cannot read and goes on
            // (ARCHITECTURE.md: *damage costs only what it damages*), it never stops for the
            // group.
            Some(o) if !o.status.success() => Err(format!("prune failed: {text}")),
            Some(_) => {
                let (bytes, _) = bytes_and_count(&self.target);
                self.target_bytes.push(bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    // ----- damage -----

    fn damage(&mut self) {
        let store = if self.rng.random_bool(0.5) {
            Store::Cache
        } else {
            Store::Target
        };
        let root = self.root(store).to_path_buf();
        let mut names = Vec::new();
        files_under(&root, &root.join("v1"), &mut names);
        names.retain(|n| !n.contains("/quarantine/"));
        names.sort();
        if names.is_empty() {
            self.note(format!("damage {store:?}: nothing to damage"));
            return;
        }
        // Pick a kind first, so that the rarer manifests get hit as often as segments.
        let kinds = [".seg", ".tag", ".point", ".tree", ".base", ".ids"];
        let kind = kinds[self.rng.random_range(0..kinds.len())];
        let of_kind: Vec<&String> = names.iter().filter(|n| n.ends_with(kind)).collect();
        let name = if of_kind.is_empty() {
            names[self.rng.random_range(0..names.len())].clone()
        } else {
            of_kind[self.rng.random_range(0..of_kind.len())].clone()
        };
        let path = root.join(&name);
        let len = std::fs::metadata(&path).unwrap().len();
        let harm = match self.rng.random_range(0..4) {
            0 | 1 if len > 0 => Harm::Flip,
            2 if len > 0 => Harm::Truncate,
            _ => Harm::Delete,
        };
        match harm {
            Harm::Flip => {
                let mut data = std::fs::read(&path).unwrap();
                let at = self.rng.random_range(0..data.len());
                data[at] ^= self.rng.random_range(1..=255u8);
                std::fs::write(&path, data).unwrap();
            }
            Harm::Truncate => {
                let to = self.rng.random_range(0..len);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(to)
                    .unwrap();
            }
            Harm::Delete => std::fs::remove_file(&path).unwrap(),
        }
        let after = fingerprint(&path);
        self.stalled = 0;
        self.note(format!("damage {store:?}: {harm:?} {name}"));
        self.damaged.insert((store, name), Damage { harm, after });
    }

    /// Drops damage the product repaired or removed: an object deleted (trim, retention) or
    /// rewritten since, or a deleted one written again.
    fn forget_healed_damage(&mut self) {
        let roots = (self.cache.clone(), self.target.clone());
        self.damaged.retain(|(s, name), d| {
            let root = if *s == Store::Cache {
                &roots.0
            } else {
                &roots.1
            };
            let now = fingerprint(&root.join(name));
            match d.harm {
                Harm::Delete => now.is_none(),
                // Processing removes a damaged cache listing so that the agent's next tag
                // naming it writes it whole: until then it is missing, still the test's doing.
                _ if now.is_none() && *s == Store::Cache && name.ends_with(".tree") => {
                    d.harm = Harm::Delete;
                    true
                }
                _ => now.is_some() && now == d.after,
            }
        });
    }

    // ----- the model's view of references -----

    fn read(&self, s: Store, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root(s).join(name)).ok()
    }

    fn exists(&self, s: Store, name: &str) -> bool {
        self.root(s).join(name).is_file()
    }

    /// The decodable bases of a disk in a store, and the names and tags of those that do not
    /// decode (damaged: a point that might have used one is accounted for by its name).
    fn bases(&self, s: Store, vm: &VmId, disk: &DiskId) -> (Vec<Base>, Vec<(u64, String)>) {
        let dir = self.root(s).join(self.layout.bases(vm, disk).as_str());
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(tag) = n.strip_suffix(".base").and_then(|t| t.parse::<u64>().ok()) else {
                continue;
            };
            let name = format!("{}/{n}", self.layout.bases(vm, disk));
            match Base::decode(&name, &std::fs::read(e.path()).unwrap_or_default()) {
                Ok(b) => out.push(b),
                Err(_) => bad.push((tag, name)),
            }
        }
        out.sort_by_key(|b| b.tag);
        (out, bad)
    }

    /// What restoring point `id` from store `s` reads. For the cache, a segment the trim
    /// removed resolves to the target (on its own or folded into a base there), where the
    /// format says it is.
    fn needs(&self, s: Store, id: &str) -> Needs {
        let mut n = Needs::default();
        let pid = PointId::new(id).unwrap();
        let pname = self.layout.point(&pid).to_string();
        let Some(data) = self.read(s, &pname) else {
            n.missing.push((s, pname));
            return n;
        };
        n.used.push((s, pname.clone()));
        let point = match RecoveryPoint::decode(&pname, &data) {
            Ok(p) => p,
            Err(e) => {
                n.broken = Some(format!("{pname}: {e}"));
                return n;
            }
        };
        for m in &point.members {
            for d in &m.disks {
                let tname = self.layout.tag(&m.vm, &d.disk, d.tag).to_string();
                let Some(data) = self.read(s, &tname) else {
                    n.missing.push((s, tname));
                    continue;
                };
                n.used.push((s, tname.clone()));
                let tag = match Tag::decode(&tname, &data) {
                    Ok(t) => t,
                    Err(e) => {
                        n.broken = Some(format!("{tname}: {e}"));
                        continue;
                    }
                };
                if let DiskShape::Directory { tree } = &tag.shape {
                    let name = self.layout.tree(&m.vm, &d.disk, tree).unwrap().to_string();
                    if self.exists(s, &name) {
                        n.used.push((s, name));
                    } else {
                        n.missing.push((s, name));
                    }
                }
                // A base the test deleted may be the one a restore would have used (its
                // segments are gone): count every damaged base of the disk as possibly needed.
                let prefix = format!("{}/", self.layout.bases(&m.vm, &d.disk));
                let stores: &[Store] = if s == Store::Cache {
                    &[Store::Cache, Store::Target]
                } else {
                    &[Store::Target]
                };
                n.used.extend(
                    self.damaged
                        .keys()
                        .filter(|(ds, name)| {
                            stores.contains(ds)
                                && name.starts_with(&prefix)
                                && name.ends_with(".base")
                        })
                        .cloned(),
                );
                let (bases, bad) = self.bases(s, &m.vm, &d.disk);
                let (base, sources) = sources_for(&self.layout, &tag, &bases);
                let chosen = base.as_ref().map(|b| b.tag).unwrap_or(0);
                if let Some(b) = &base {
                    n.used
                        .push((s, self.layout.base(&m.vm, &d.disk, b.tag).to_string()));
                }
                // A history resynchronised over an earlier tag is read through a base built
                // over that tag, which processing writes into the target (the cache never has
                // one): until then the point needs the target's copy of that tag's blocks.
                if base.is_none()
                    && let Some(o) = tag.origin
                {
                    n.used.push((
                        Store::Target,
                        self.layout.tag(&m.vm, &d.disk, o).to_string(),
                    ));
                }
                // A base that does not decode, newer than the one chosen and not after the
                // tag, may be the one a restore would have used. Today every reader of bases
                // (`StoreReader::bases`: restore, processing, retention) refuses the disk's
                // whole list on one damaged base, so any damaged base of the disk costs the
                // disk's points; LIFEBOAT_LIFECYCLE_STRICT_BASES=1 expects only those that
                // could use it to suffer.
                let strict = self.opts.strict_bases;
                n.used.extend(
                    bad.into_iter()
                        .filter(|(t, _)| !strict || (*t > chosen && *t <= tag.seq))
                        .map(|(_, name)| (s, name)),
                );
                let target_bases = if s == Store::Cache {
                    let (good, bad) = self.bases(Store::Target, &m.vm, &d.disk);
                    // Processing reads the target's bases to know what it holds, and a segment
                    // the cache trimmed may live only in one of them: a damaged one may be what
                    // this point needed.
                    n.used
                        .extend(bad.into_iter().map(|(_, name)| (Store::Target, name)));
                    good
                } else {
                    Vec::new()
                };
                for src in sources {
                    let src = src.to_string();
                    if self.exists(s, &src) {
                        // Processing compares a cache segment that a target base stands for
                        // with the identity the base recorded (`segments.ids`): the point needs
                        // that list too, and a damaged one quarantines it.
                        if s == Store::Cache {
                            let seq = lifeboat_store::layout::parse_seq(
                                &lifeboat_store::ObjectName::new(src.clone()).unwrap(),
                            );
                            for b in target_bases.iter().filter(|b| {
                                seq.is_some_and(|q| b.from_segment <= q && q <= b.through_segment)
                            }) {
                                n.used.push((
                                    Store::Target,
                                    self.layout.base_ids(&m.vm, &d.disk, b.tag).to_string(),
                                ));
                            }
                        }
                        n.used.push((s, src));
                        continue;
                    }
                    if s == Store::Cache {
                        if self.exists(Store::Target, &src) {
                            n.used.push((Store::Target, src));
                            continue;
                        }
                        let seq = lifeboat_store::layout::parse_seq(
                            &lifeboat_store::ObjectName::new(src.clone()).unwrap(),
                        );
                        let covering = seq.and_then(|q| {
                            target_bases.iter().rev().find(|b| {
                                b.from_segment == tag.from_segment
                                    && b.through_segment >= q
                                    && b.tag <= tag.seq
                                    && b.block_size == tag.block_size
                            })
                        });
                        if let Some(b) = covering {
                            n.used.push((
                                Store::Target,
                                self.layout.base(&m.vm, &d.disk, b.tag).to_string(),
                            ));
                            n.used.extend((1..=b.parts).map(|p| {
                                (
                                    Store::Target,
                                    self.layout.base_part(&m.vm, &d.disk, b.tag, p).to_string(),
                                )
                            }));
                            continue;
                        }
                    }
                    if s == Store::Cache {
                        // Trimmed from the cache: the target was where it had to be.
                        n.missing.push((Store::Target, src.clone()));
                    }
                    n.missing.push((s, src));
                }
            }
        }
        n.used.sort();
        n.used.dedup();
        n
    }

    /// Whether the point's trouble is accounted for by damage the test did.
    fn attributable(&self, n: &Needs, error: &str) -> bool {
        n.used
            .iter()
            .chain(&n.missing)
            .any(|k| self.damaged.contains_key(k))
            || self
                .damaged
                .keys()
                .any(|(_, name)| error.contains(name.as_str()))
    }

    /// `lifeboat points list`; the listing must never fail (one damaged point costs itself).
    fn list(&self, paths: &[(&str, &Path)]) -> Result<String, String> {
        let o = self.lifeboat(&["points", "list"], paths).output().unwrap();
        if !o.status.success() {
            return Err(format!(
                "`lifeboat points list {paths:?}` failed: {}",
                short(&out_text(&o))
            ));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Restores point `id` from store `s` and compares it with the reference copy.
    fn restore_matches(&mut self, s: Store, id: &str) -> Result<(), String> {
        let out = self.dir.join("restore-out");
        let _ = std::fs::remove_dir_all(&out);
        let o = self
            .lifeboat(
                &["restore", "--vm", VM, "--point", id],
                &[("--store", self.root(s)), ("--out", &out)],
            )
            .output()
            .unwrap();
        self.restores += 1;
        if !o.status.success() {
            let _ = std::fs::remove_dir_all(&out);
            return Err(format!("restore failed: {}", short(&out_text(&o))));
        }
        let reference = self.refs.join(id);
        let a = std::fs::read(out.join("os.img")).unwrap_or_default();
        let b = std::fs::read(reference.join("os.img")).unwrap();
        let result = if a != b {
            let first = a
                .chunks(4096)
                .zip(b.chunks(4096))
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()) / 4096);
            Err(format!(
                "WRONG BYTES: image restored from {s:?} at point {id} differs from the source at its cut ({} vs {} bytes, first differing 4 KiB block at {})",
                a.len(),
                b.len(),
                first * 4096
            ))
        } else {
            match lifeboat_tests::tree_difference(&reference.join("data"), &out.join("data")) {
                None => Ok(()),
                Some(d) => Err(format!(
                    "WRONG BYTES: directory restored from {s:?} at point {id} differs from the source at its cut: {}",
                    short(&d)
                )),
            }
        };
        let _ = std::fs::remove_dir_all(&out);
        result
    }

    /// Checks one listed point of store `s`: everything it references exists (or the damage
    /// the test did accounts for it), and it restores byte for byte (memoised on the
    /// fingerprints of what it reads). Returns whether it is intact.
    fn check_point(&mut self, s: Store, id: &str) -> Result<bool, String> {
        if !self.points.contains_key(id) {
            return Err(format!(
                "{s:?} lists point {id}, which the agent never published"
            ));
        }
        let n = self.needs(s, id);
        let damaged = self.attributable(&n, "");
        if let Some(b) = &n.broken {
            if !damaged {
                return Err(format!(
                    "{s:?} point {id} reads an object that does not decode and that the test did not damage: {b}"
                ));
            }
            return Ok(false);
        }
        if !n.missing.is_empty() {
            // Processed, then expired by retention in the target, and still in the cache
            // because the trim that would remove it was killed: its data went with retention
            // (the next trim removes the point); restoring it fails naming what is missing.
            let expired = s == Store::Cache
                && self.processed.contains(id)
                && !self.exists(
                    Store::Target,
                    self.layout.point(&PointId::new(id).unwrap()).as_str(),
                );
            if !damaged && !expired {
                return Err(format!(
                    "{s:?} point {id} references missing object(s): {:?}",
                    n.missing
                ));
            }
            return Ok(false);
        }
        // A cache point is restored from the cache alone when the cache holds all it reads
        // (otherwise processing is what moves it, and the advance check covers it).
        if n.used.iter().any(|(st, _)| *st != s) {
            return Ok(!damaged);
        }
        let prints: Prints = n
            .used
            .iter()
            .filter_map(|(st, name)| {
                fingerprint(&self.root(*st).join(name)).map(|(l, t)| (name.clone(), l, t))
            })
            .collect();
        let key = (s, id.to_string());
        match self.restored.get(&key) {
            Some((p, true)) if *p == prints => return Ok(!damaged),
            Some((p, false)) if *p == prints && damaged => return Ok(false),
            _ => {}
        }
        match self.restore_matches(s, id) {
            Ok(()) => {
                self.restored.insert(key, (prints, true));
                Ok(!damaged)
            }
            Err(e) if e.starts_with("WRONG BYTES") => Err(e),
            Err(e) => {
                if self.attributable(&n, &e) {
                    self.restored.insert(key, (prints, false));
                    Ok(false)
                } else {
                    Err(format!(
                        "{s:?} point {id} is listed as restorable, needs no damaged object, and does not restore: {e}"
                    ))
                }
            }
        }
    }

    /// The invariants, after every step.
    fn check(&mut self, processed: bool, pruned: bool) -> Check {
        self.forget_healed_damage();
        let target_listing = self.list(&[("--store", &self.target)])?;
        let cache_listing = self.list(&[("--store", &self.cache)])?;
        let both = self.list(&[("--store", &self.cache), ("--target", &self.target)])?;
        let (target_points, target_damaged) = ids_of(&target_listing);
        let (cache_points, cache_damaged) = ids_of(&cache_listing);
        let (both_points, _) = ids_of(&both);

        // A point object the test damaged (still there) is listed as damaged, not hidden.
        for ((s, name), d) in &self.damaged {
            if d.harm == Harm::Delete || !name.ends_with(".point") {
                continue;
            }
            let id = name
                .rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".point"))
                .unwrap_or_default()
                .to_string();
            let listed = if *s == Store::Target {
                &target_damaged
            } else {
                &cache_damaged
            };
            if !listed.contains(&id) {
                return Err(format!("damaged {s:?} point {id} is not listed as damaged"));
            }
        }

        // A point the scrub recorded as damaged reads an object the test damaged (now, or when
        // that scrub ran): a record never hides a whole point.
        for id in &target_damaged {
            let record = self.target.join(format!("v1/{GROUP}/damage/{id}.txt"));
            let Ok(text) = std::fs::read_to_string(&record) else {
                continue;
            };
            let n = self.needs(Store::Target, id);
            let known = n
                .used
                .iter()
                .chain(&n.missing)
                .any(|k| self.damaged_since_scrub.contains(k) || self.damaged.contains_key(k));
            if !known && !self.attributable(&n, &text) {
                return Err(format!(
                    "point {id} has a damage record but reads no damaged object: {text}"
                ));
            }
        }

        let mut target_ids = BTreeSet::new();
        for (_, id) in &target_points {
            target_ids.insert(id.clone());
            self.processed.insert(id.clone());
            self.check_point(Store::Target, id)?;
        }
        let mut intact_pending = Vec::new();
        for (_, id) in &cache_points {
            let intact = self.check_point(Store::Cache, id)?;
            if intact && !target_ids.contains(id) {
                intact_pending.push(id.clone());
            }
        }
        // Every tag in the target (not only those of points) has what it reads.
        self.check_target_tags()?;

        // Quarantines are accounted for by damage (or by a flagged known gap).
        for (status, id) in &both_points {
            if status != "quarantined" {
                continue;
            }
            let mut n = self.needs(Store::Cache, id);
            // Published, then damaged in the target while still in the cache (its trim was
            // killed): processing cannot tell it is the same point, and keeps it.
            n.used.push((
                Store::Target,
                self.layout.point(&PointId::new(id).unwrap()).to_string(),
            ));
            let line = both.lines().find(|l| l.contains(id.as_str())).unwrap_or("");
            let at_pass = n
                .used
                .iter()
                .chain(&n.missing)
                .any(|k| self.damaged_at_pass.contains(k))
                || self
                    .damaged_at_pass
                    .iter()
                    .any(|(_, name)| line.contains(name.as_str()));
            if !at_pass && !self.attributable(&n, "") {
                return Err(format!(
                    "point {id} is quarantined but needs no damaged object: {line}"
                ));
            }
        }

        // The latest processed point advances whenever a newer intact point exists.
        let latest_processed = target_ids
            .iter()
            .filter_map(|id| self.points.get(id).map(|p| p.time))
            .max()
            .unwrap_or(0);
        let newest_cache = cache_points
            .iter()
            .filter_map(|(_, id)| self.points.get(id).map(|p| p.time))
            .max()
            .unwrap_or(0);
        if processed {
            // Protection resumes: the newest point cut since the previous complete pass is
            // processed by this one, or within a few more (the agent answers a resync request
            // at its next sync). Points cut behind the latest processed one after a clock step
            // are exempt as above.
            let fresh = std::mem::take(&mut self.new_since_pass);
            let newest_fresh = fresh
                .iter()
                .filter_map(|id| self.points.get(id))
                .filter(|r| !r.stepped_back || self.opts.strict_clock)
                .map(|r| r.time)
                .max();
            match newest_fresh {
                Some(t) if latest_processed < t => {
                    self.stalled += 1;
                    if self.opts.liveness && self.stalled >= STALL_LIMIT {
                        return Err(format!(
                            "protection stopped: {} complete passes after new points, none processed (latest processed t={latest_processed}, newest t={t})",
                            self.stalled
                        ));
                    }
                }
                Some(_) => self.stalled = 0,
                None => {}
            }
            self.lag = newest_cache.saturating_sub(latest_processed);
            self.max_lag = self.max_lag.max(self.lag);
            for id in &intact_pending {
                let rec = &self.points[id];
                // Processed once and pruned since: retention, not a stall. Cut at a time behind
                // the latest processed point after a clock step: processing takes it for a pruned
                // point, accepted unless LIFEBOAT_LIFECYCLE_STRICT_CLOCK.
                let exempt =
                    self.processed.contains(id) || (rec.stepped_back && !self.opts.strict_clock);
                if !exempt {
                    return Err(format!(
                        "after a complete pass the intact cache point {id} (t={}) is not in the target (latest processed t={latest_processed})",
                        rec.time
                    ));
                }
            }
        }
        if self.opts.expect_resync {
            // A point cut by the verification sweep after cache damage must not rely on the
            // damaged objects (a plain sync checks only what its next tag relies on: the newest
            // tag and that segments exist; a damaged segment's bytes wait for the sweep).
            for (_, id) in &cache_points {
                if self
                    .points
                    .get(id)
                    .is_some_and(|r| r.after_cache_damage && r.verified)
                {
                    let n = self.needs(Store::Cache, id);
                    let hit: Vec<_> = n
                        .used
                        .iter()
                        .chain(&n.missing)
                        .filter(|k| self.damaged.contains_key(*k) && k.0 == Store::Cache)
                        .collect();
                    if !hit.is_empty() {
                        return Err(format!(
                            "point {id}, cut after cache damage, relies on damaged object(s) {hit:?}"
                        ));
                    }
                }
            }
        }

        // `lifeboat verify` agrees: clean where the test did no damage (opt-in until it has
        // run in CI for a while: LIFEBOAT_LIFECYCLE_VERIFY=1).
        if std::env::var_os("LIFEBOAT_LIFECYCLE_VERIFY").is_some() {
            for s in [Store::Target, Store::Cache] {
                // (An empty store is "nothing of the group" to verify: nothing to check yet.)
                if self.damaged.keys().any(|(d, _)| *d == s)
                    || !self.root(s).join(format!("v1/{GROUP}/points")).is_dir()
                {
                    continue;
                }
                let mut args = vec!["verify"];
                if s == Store::Cache {
                    args.push("--cache");
                }
                let o = self
                    .lifeboat(&args, &[("--store", self.root(s))])
                    .output()
                    .unwrap();
                if !o.status.success() {
                    return Err(format!(
                        "`lifeboat verify` of the {s:?} store (no damage done to it) failed: {}",
                        short(&out_text(&o))
                    ));
                }
            }
        }

        // Bounded stores under steady churn.
        if pruned && !self.damaged.keys().any(|(s, _)| *s == Store::Target) {
            self.check_bounds(&target_ids)?;
        }

        // References of points gone from both stores are no longer needed.
        let live: BTreeSet<String> = target_ids
            .iter()
            .cloned()
            .chain(self.cache_point_ids())
            .chain(target_damaged)
            .chain(cache_damaged)
            .collect();
        for id in self.points.keys() {
            if !live.contains(id) {
                let _ = std::fs::remove_dir_all(self.refs.join(id));
            }
        }
        Ok(())
    }

    fn check_target_tags(&self) -> Check {
        let vm = VmId::new(VM).unwrap();
        for disk in ["os", "data"] {
            let disk = DiskId::new(disk).unwrap();
            let dir = self.target.join(self.layout.tags(&vm, &disk).as_str());
            let (bases, bad) = self.bases(Store::Target, &vm, &disk);
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = format!(
                    "{}/{}",
                    self.layout.tags(&vm, &disk),
                    e.file_name().to_string_lossy()
                );
                let Ok(tag) = Tag::decode(&name, &std::fs::read(e.path()).unwrap_or_default())
                else {
                    continue; // damaged: accounted for through the points that use it
                };
                let (_, sources) = sources_for(&self.layout, &tag, &bases);
                let missing: Vec<(Store, String)> = sources
                    .iter()
                    .map(|s| (Store::Target, s.to_string()))
                    .filter(|(_, s)| !self.exists(Store::Target, s))
                    .collect();
                let mut used = vec![(Store::Target, name.clone())];
                used.extend(bad.iter().map(|(_, b)| (Store::Target, b.clone())));
                // A base the test deleted may be what this tag read.
                let prefix = format!("{}/", self.layout.bases(&vm, &disk));
                used.extend(
                    self.damaged
                        .keys()
                        .filter(|(s, n)| *s == Store::Target && n.starts_with(&prefix))
                        .cloned(),
                );
                let n = Needs {
                    used,
                    missing: missing.clone(),
                    broken: None,
                };
                if !missing.is_empty() && !self.attributable(&n, "") {
                    return Err(format!(
                        "target tag {name} references missing object(s) {missing:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The bound: one copy of the disks per full copy among the kept points, plus one for the
    /// base below them, plus twice the churn of the kept points, plus slack for manifests and
    /// a compaction's part-filled segments.
    fn check_bounds(&self, kept: &BTreeSet<String>) -> Check {
        let disks = IMAGE_BYTES + DIR_TARGET_BYTES + (1 << 20);
        let recs: Vec<&PointRec> = kept.iter().filter_map(|id| self.points.get(id)).collect();
        let fulls = recs.iter().filter(|r| r.full).count() as u64;
        let churn: u64 = recs.iter().map(|r| if r.full { 0 } else { r.churn }).sum();
        let bound = (2 + fulls) * disks + 2 * churn + (8 << 20);
        let (bytes, objects) = bytes_and_count(&self.target);
        let object_bound = (bound / SEGMENT) * 2 + 16 * recs.len() as u64 + 64 + (2 + fulls) * 40;
        if bytes > bound || objects > object_bound {
            return Err(format!(
                "target store not bounded: {bytes} bytes in {objects} objects (bounds {bound} bytes, {object_bound} objects) for {} kept point(s), {fulls} full copies, {churn} bytes of churn",
                recs.len()
            ));
        }
        Ok(())
    }

    fn stats(&self, elapsed: Duration) -> String {
        let sampled: Vec<String> = self
            .target_bytes
            .iter()
            .step_by((self.target_bytes.len() / 12).max(1))
            .map(|b| format!("{:.1}", *b as f64 / 1048576.0))
            .collect();
        format!(
            "lifecycle-stats seed={} steps={} cycles={} new_histories_delta={} new_histories_full={} syncs_waiting_for_an_offer={} points_published={} points_processed={} restores={} target_mib_over_time=[{}] lag_min={} max_lag_min={} damaged_now={} elapsed_s={:.0}",
            self.opts.seed,
            self.log.len(),
            self.cycles,
            self.delta_resyncs,
            self.full_copies,
            self.waits,
            self.points.len(),
            self.processed.len(),
            self.restores,
            sampled.join(","),
            self.lag / MINUTE,
            self.max_lag / MINUTE,
            self.damaged.len(),
            elapsed.as_secs_f64()
        )
    }
}

/// Found by the lifecycle test: a cache segment failing its checksum made `lifeboat process`
/// stop the whole pass (exit 1, "segment … is corrupt") instead of quarantining the point that
/// needs it, so no newer point of the group — here another VM's — was ever processed again.
#[test]
fn a_corrupt_cache_segment_costs_its_point_and_newer_points_still_move() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let target = dir.path().join("target");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&target).unwrap();
    let sync = |vm: &str| -> String {
        let d = dir.path().join(vm);
        std::fs::create_dir_all(&d).unwrap();
        let image = d.join("disk.img");
        if !image.exists() {
            std::fs::write(&image, lifeboat_tests::random_bytes(1 << 20, 7)).unwrap();
        }
        let config = d.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "vm = \"{vm}\"\ngroup = \"{GROUP}\"\nstate_dir = {:?}\n[store]\nkind = \"local\"\npath = {:?}\n[[disk]]\nid = \"os\"\nkind = \"image\"\npath = {:?}\n",
                d.join("state").display(),
                cache.display(),
                image.display()
            ),
        )
        .unwrap();
        let out = lifeboat_tests::run(
            Command::new(bin("lifeboat-agent"))
                .arg("--config")
                .arg(&config)
                .arg("sync"),
        );
        out.lines()
            .find_map(|l| l.strip_prefix("published recovery point "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string()
    };
    let first = sync("vma");
    // One byte of vma's segment payload flipped: its object checksum no longer matches.
    // Numbers are the first (time-derived) of the disk's history: take what is there.
    let seg = first_file(&cache.join(format!("v1/{GROUP}/vms/vma/disks/os/seg")));
    let mut data = std::fs::read(&seg).unwrap();
    data[100] ^= 0x40;
    std::fs::write(&seg, data).unwrap();
    let second = sync("vmb");
    let o = Command::new(bin("lifeboat"))
        .args(["process", "--group", GROUP, "--cache"])
        .arg(&cache)
        .arg("--store")
        .arg(&target)
        .output()
        .unwrap();
    let text = out_text(&o);
    // Exit 1 says something was quarantined; the pass itself went on.
    assert!(
        text.contains(&format!("quarantined point {first}")),
        "the damaged point is not quarantined: {text}"
    );
    assert!(
        target
            .join(format!("v1/{GROUP}/points/{second}.point"))
            .exists(),
        "the other VM's newer point was not processed: {text}"
    );
}

/// Found by the lifecycle test: retention stopped for the whole group (`lifeboat prune` exit 1,
/// "… is not a valid tag") when one kept tag in the target was damaged; it must report the
/// damaged disk and go on.
#[test]
fn a_damaged_kept_tag_does_not_stop_retention() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        seed: 1,
        steps: 0,
        expect_resync: false,
        strict_clock: false,
        reprotect: false,
        strict_bases: false,
        damage: false,
        liveness: true,
    };
    let mut w = World::new(dir.path(), opts);
    let mut img = vec![0u8; IMAGE_BYTES as usize];
    w.rng.fill_bytes(&mut img);
    std::fs::write(&w.image, &img).unwrap();
    w.dir_op(0);
    w.sync(None).unwrap();
    w.churn();
    w.sync(None).unwrap();
    assert!(w.process(None, true).unwrap());
    let tag = first_file(&w.target.join(format!("v1/{GROUP}/vms/{VM}/disks/os/tag")));
    let mut data = std::fs::read(&tag).unwrap();
    data[20] ^= 1;
    std::fs::write(&tag, data).unwrap();
    w.prune(None).unwrap_or_else(|e| panic!("{e}"));
}

/// The first file (by name) in `dir`.
fn first_file(dir: &Path) -> PathBuf {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    names.into_iter().next().expect("a file")
}

/// Writes `buf` at `at` in `f`, on any platform (a positioned write is Unix-only in std).
fn write_all_at(f: &mut std::fs::File, buf: &[u8], at: u64) {
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(buf).unwrap();
}
