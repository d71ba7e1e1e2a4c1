//! `lifeboat`: the admin CLI. `main` owns exit codes: 0 success, 1 failure (for `verify`:
//! damage found), 2 bad usage or input (unknown point, occupied output, invalid ids, a store
//! that cannot be opened or read through by `verify`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use lifeboat_dr::failover::{self, Selector};
use lifeboat_dr::process::Processor;
use lifeboat_proto::pb;
use lifeboat_proto::pb::admin_client::AdminClient;
use lifeboat_store::backend::{Init, OpenMode};
use lifeboat_store::layout::Layout;
use lifeboat_store::manifest::{Consistency, RecoveryPoint};
use lifeboat_store::restore::{StoreReader, restore_disk};
use lifeboat_store::verify::{VerifyOptions, verify};
use lifeboat_store::{DiskId, GroupId, PointId, StoreConfig, VmId};

/// Lifeboat administration.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where recovery points are read from.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// A local store directory, or a TOML file describing the store (`kind = "azure"`, …).
    #[arg(long)]
    store: PathBuf,
    /// Replication group.
    #[arg(long)]
    group: GroupId,
}

/// How to reach a group's coordinator as an admin.
#[derive(Debug, clap::Args)]
struct CoordinatorArgs {
    /// The coordinator, `host:port` (port 20004).
    #[arg(long, env = "LIFEBOAT_COORDINATOR")]
    coordinator: String,
    /// Directory holding `ca.pem`, `admin.pem` and `admin.key` (the coordinator's
    /// `<state_dir>/admin`, copied to the admin's machine).
    #[arg(long, env = "LIFEBOAT_CREDENTIALS")]
    credentials: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cut a recovery point across the group now; prints its id once it is published.
    Snapshot {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
        /// The group the coordinator runs (checked against the coordinator's answer).
        #[arg(long)]
        group: GroupId,
        /// Run the members' application hooks: an app-consistent point.
        #[arg(long)]
        app_consistent: bool,
    },
    /// The group's members: connected, healthy, replication figures.
    Members {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Remove a VM from the group (its certificate stops working; its data stays).
    RemoveMember {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
        #[arg(long)]
        vm: VmId,
    },
    /// Move recovery points from the cache store into the target store (one pass) and report
    /// RPO and the latest processed point.
    Process {
        /// The cache store.
        #[arg(long)]
        cache: PathBuf,
        /// Then delete from the cache what the target now holds (as the coordinator does; only
        /// while no coordinator of the group is cutting points).
        #[arg(long)]
        trim_cache: bool,
        /// Then scrub the target store (as the coordinator does every `scrub_interval`): read
        /// every object every point needs, record the points whose data is damaged (listed as
        /// damaged from then on, skipped by selectors) and ask for a new full copy where a
        /// disk's newest tag reads damaged data. Reads the whole target store.
        #[arg(long)]
        scrub: bool,
        /// The target store.
        #[command(flatten)]
        target: StoreArgs,
    },
    /// Apply retention to the target store: delete expired points and the data no kept point
    /// needs (the coordinator does this after each processing pass; this is for when it is gone).
    Prune {
        #[command(flatten)]
        target: StoreArgs,
        /// The group's cache store: where a prune that finds a history it can no longer keep
        /// (damage in the target) asks the disk's agent for a new full copy. Without it, such
        /// a history is only reported; the next `process` asks.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// How long points are kept, 1h to 72h, counted back from the newest point (or from
        /// now, if earlier): while no new points arrive nothing expires.
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Duration,
        /// Evaluate as of this time (RFC 3339) instead of now: a time before the newest point
        /// previews what retention will have kept then.
        #[arg(long)]
        now: Option<humantime::Timestamp>,
    },
    /// Fail over: restore a recovery point's VMs from the target store, verified.
    Failover {
        #[command(subcommand)]
        action: Option<FailoverAction>,
        #[command(flatten)]
        args: FailoverArgs,
    },
    /// A DR drill: a failover into an isolated location; replication is not touched.
    TestFailover {
        #[command(subcommand)]
        action: Option<DrillAction>,
        #[command(flatten)]
        args: FailoverArgs,
    },
    /// Check a store (cache or target), like restic's `check`: resolve every reference, check
    /// every checksum (with --read-data every block too), and name each damaged or missing
    /// object with the recovery points it breaks. Exit 0 clean, 1 damage found, 2 could not
    /// verify (bad usage, store unreadable).
    Verify {
        /// A local store directory, or a TOML file describing the store (`kind = "azure"`, …).
        #[arg(long)]
        store: PathBuf,
        /// Only this replication group (default: every group in the store).
        #[arg(long)]
        group: Option<GroupId>,
        /// Also read every segment and base part whole: object checksum and every block's
        /// blake3 (reads the whole store; without it, segments are checked by footer and index).
        #[arg(long)]
        read_data: bool,
        /// The store is a cache store that processing trims: a tag's segments below the lowest
        /// one the cache still holds of that disk were moved to the target store and are not
        /// reported missing.
        #[arg(long)]
        cache: bool,
    },
    /// Recovery points.
    Points {
        #[command(subcommand)]
        command: PointsCommand,
    },
    /// The stores themselves.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Restore a VM's disks at a recovery point, verifying every byte.
    Restore {
        #[command(flatten)]
        store: StoreArgs,
        /// The VM to restore.
        #[arg(long)]
        vm: VmId,
        /// Point id, or `latest`.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Output directory (created; must not exist or be empty). Image disks become
        /// `<disk>.img`, directory disks `<disk>/`.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Create a store's Azure container (or local directory) if it does not exist: the one
    /// step that needs a credential allowed to create containers (the account key, or an
    /// account SAS); agents and the coordinator can then run with container-scoped SAS tokens.
    Init {
        /// A local store directory, or a TOML file describing the store (`kind = "azure"`, …).
        #[arg(long)]
        store: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PointsCommand {
    /// List a group's recovery points, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// The target store: mark each point processed or not, and list points only it holds.
        #[arg(long)]
        target: Option<PathBuf>,
    },
}

/// Where a failover reads from and writes to.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct FailoverArgs {
    /// The target store (directory or `.toml`); nothing else is needed.
    #[arg(long)]
    store: Option<PathBuf>,
    #[arg(long)]
    group: Option<GroupId>,
    /// One VM; without it the whole group fails over together to a point covering all its VMs.
    #[arg(long)]
    vm: Option<VmId>,
    /// latest | latest-processed | latest-app-consistent | latest-multi-vm |
    /// latest-multi-vm-app-consistent | a point id | a time (RFC 3339, single VM).
    #[arg(long)]
    point: Option<String>,
    /// Output location: must not exist or be empty. Gets <vm>/<disk>.img or <vm>/<disk>/ and
    /// failover-report.json.
    #[arg(long)]
    to: Option<PathBuf>,
    /// The cache store, if still reachable: `--point latest` processes its pending points first.
    #[arg(long)]
    cache: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum FailoverAction {
    /// Confirm a real failover: its location is now where the VMs run.
    Commit {
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DrillAction {
    /// Remove a DR drill's output.
    Cleanup {
        #[arg(long)]
        to: PathBuf,
    },
}

/// An error the user can fix by changing the request: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e.downcast_ref::<UsageError>().is_some()
                || matches!(
                    e.downcast_ref::<lifeboat_store::Error>(),
                    Some(lifeboat_store::Error::Invalid(_))
                );
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// Parses `--store`: a local directory, or a `.toml` store description (validated here).
fn store_config(store: &Path, must_exist: bool) -> Result<StoreConfig> {
    if store.extension().is_some_and(|e| e == "toml") {
        let text = std::fs::read_to_string(store)
            .with_context(|| format!("cannot read {}", store.display()))?;
        let config = toml::from_str::<StoreConfig>(&text)
            .map_err(|e| UsageError(format!("{}: {e}", store.display())))?;
        config
            .validate()
            .map_err(|e| UsageError(format!("{}: {e}", store.display())))?;
        Ok(config)
    } else {
        if must_exist && !store.is_dir() {
            return Err(UsageError(format!(
                "store {} is not a directory (or a .toml store description)",
                store.display()
            ))
            .into());
        }
        Ok(StoreConfig::Local {
            path: store.to_owned(),
        })
    }
}

/// Opens a store. Every command but processing opens [`OpenMode::ReadOnly`]: it needs only
/// read and list rights, and never creates a container.
async fn open(args: &StoreArgs, mode: OpenMode) -> Result<StoreReader> {
    let config = store_config(&args.store, true)?;
    let backend = config
        .open_as(mode, lifeboat_store::backend::retry::RetryPolicy::default())
        .await?;
    Ok(StoreReader::new(backend, Layout::new(args.group.clone())))
}

fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn describe(p: &RecoveryPoint) -> String {
    // Never claim more than the weakest member had (a version-1 "crash" point of disks that
    // were not frozen says not-frozen), in the words of every other command.
    let kind = p.effective_kind().to_string();
    let scope = if p.multi_vm { "multi-VM" } else { "single-VM" };
    let members: Vec<String> = p
        .members
        .iter()
        .map(|m| format!("{} ({})", m.vm, m.consistency))
        .collect();
    let mut line = format!(
        "{}  {}  {kind:<16} {scope:<9}  members: {}",
        p.id,
        fmt_time(p.time),
        members.join(", ")
    );
    if !p.excluded.is_empty() {
        let ex: Vec<String> = p
            .excluded
            .iter()
            .map(|e| format!("{} ({})", e.vm, e.reason))
            .collect();
        line.push_str(&format!("  excluded: {}", ex.join(", ")));
    }
    line
}

async fn admin(args: &CoordinatorArgs) -> Result<AdminClient<tonic::transport::Channel>> {
    let read = |f: &str| {
        let p = args.credentials.join(f);
        std::fs::read_to_string(&p)
            .map_err(|e| UsageError(format!("cannot read {}: {e}", p.display())))
    };
    let (ca, cert, key) = (read("ca.pem")?, read("admin.pem")?, read("admin.key")?);
    let tls = lifeboat_proto::tls::client_config(&ca, Some((&cert, &key)))?;
    let channel = lifeboat_proto::tls::connect(&args.coordinator, tls).await?;
    Ok(AdminClient::new(channel))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    let msg = format!("coordinator: {}", s.message());
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => UsageError(msg).into(),
        _ => anyhow::anyhow!(msg),
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Snapshot {
            coordinator,
            group,
            app_consistent,
        } => {
            let mut client = admin(&coordinator).await?;
            let members = client
                .members(pb::MembersRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if members.group != group.as_str() {
                bail!(UsageError(format!(
                    "the coordinator at {} runs group {}, not {group}",
                    coordinator.coordinator, members.group
                )));
            }
            let kind = if app_consistent {
                pb::CutKind::App
            } else {
                pb::CutKind::Crash
            };
            let r = client
                .snapshot(pb::SnapshotRequest { kind: kind as i32 })
                .await
                .map_err(status_error)?
                .into_inner();
            let label = match pb::Consistency::try_from(r.consistency) {
                Ok(pb::Consistency::App) => Consistency::App,
                Ok(pb::Consistency::Crash) => Consistency::Crash,
                _ => Consistency::NotFrozen,
            };
            println!("{}", r.point_id);
            eprintln!(
                "published {label} point {} at {} covering {}",
                r.point_id,
                fmt_time(r.time_ms),
                r.covered.join(", ")
            );
            for e in &r.excluded {
                eprintln!("  excluded {}: {}", e.vm, e.reason);
            }
            Ok(())
        }
        Command::Members { coordinator } => {
            let mut client = admin(&coordinator).await?;
            let r = client
                .members(pb::MembersRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!("group {}: {} member(s)", r.group, r.members.len());
            let now = lifeboat_store::manifest::now_millis();
            for m in r.members {
                let state = match (m.connected, m.healthy) {
                    (true, true) => "healthy",
                    (true, false) => "unhealthy",
                    _ => "disconnected",
                };
                let facts = m
                    .facts
                    .map(|f| format!("{} {} cpus {} MiB", f.os, f.cpus, f.memory_bytes >> 20))
                    .unwrap_or_default();
                let rpo = m
                    .stats
                    .iter()
                    .map(|s| s.last_tag_time_ms)
                    .min()
                    .filter(|t| *t > 0)
                    .map(|t| format!("RPO {}s", now.saturating_sub(t) / 1000))
                    .unwrap_or_else(|| "no tag yet".into());
                println!(
                    "{:<24} {state:<12} {} disk(s)  {rpo}  {facts}",
                    m.vm,
                    m.disks.len()
                );
            }
            match r.processing {
                None => println!("processing: off (the coordinator has no target store)"),
                Some(p) => {
                    let ago = |t: u64| format!("{}s ago", now.saturating_sub(t) / 1000);
                    let latest = if p.latest_processed_point.is_empty() {
                        "none yet".to_string()
                    } else {
                        format!(
                            "{} ({}, {})",
                            p.latest_processed_point,
                            fmt_time(p.latest_processed_time_ms),
                            ago(p.latest_processed_time_ms)
                        )
                    };
                    let pass = match p.last_pass_ms {
                        0 => "no pass yet".to_string(),
                        t => format!("last pass {}", ago(t)),
                    };
                    println!("latest processed point: {latest}; {pass}");
                    if !p.last_error.is_empty() {
                        println!("processing failing: {}", p.last_error);
                    }
                }
            }
            Ok(())
        }
        Command::RemoveMember { coordinator, vm } => {
            let mut client = admin(&coordinator).await?;
            client
                .remove_member(pb::RemoveMemberRequest { vm: vm.to_string() })
                .await
                .map_err(status_error)?;
            println!("removed {vm} from the group");
            Ok(())
        }
        Command::Verify {
            store,
            group,
            read_data,
            cache,
        } => run_verify(&store, group, read_data, cache).await,
        Command::Points {
            command: PointsCommand::List { store, target },
        } => {
            let reader = open(&store, OpenMode::ReadOnly).await?;
            let scan = reader.scan_points().await?;
            let mut points = scan.points;
            let mut damaged = scan.damaged;
            let mut quarantined = std::collections::BTreeMap::new();
            let processed: Option<Vec<RecoveryPoint>> = match &target {
                Some(t) => {
                    let target = open(
                        &StoreArgs {
                            store: t.clone(),
                            group: store.group.clone(),
                        },
                        OpenMode::ReadOnly,
                    )
                    .await?;
                    quarantined = Processor::new(
                        store.group.clone(),
                        reader.backend().clone(),
                        target.backend().clone(),
                    )
                    .quarantined()
                    .await?;
                    let scan = target.scan_points().await?;
                    for d in scan.damaged {
                        if !damaged.iter().any(|e| e.id == d.id) {
                            damaged.push(d);
                        }
                    }
                    Some(scan.points)
                }
                None => None,
            };
            if let Some(done) = &processed {
                for p in done {
                    if !points.iter().any(|q| q.id == p.id) {
                        points.push(p.clone());
                    }
                }
                points.sort_by_key(|p| (p.time, p.id.to_string()));
            }
            if points.is_empty() && damaged.is_empty() {
                println!("no recovery points in group {}", store.group);
            }
            for p in points {
                match &processed {
                    Some(done) => {
                        if let Some(why) = quarantined.get(&p.id) {
                            // Not moving, and why: processing refused it (see the format's rule
                            // 8); also when the target holds another point under its id.
                            println!("quarantined  {}  reason: {why}", describe(&p));
                        } else if done.iter().any(|q| q.id == p.id) {
                            println!("processed    {}", describe(&p));
                        } else {
                            println!("unprocessed  {}", describe(&p));
                        }
                    }
                    None => println!("{}", describe(&p)),
                }
            }
            // Listed, not fatal: one damaged point costs only itself.
            for d in &damaged {
                println!("damaged      {}  cannot be read: {}", d.id, d.reason);
            }
            Ok(())
        }
        Command::Prune {
            target,
            cache,
            retention,
            now,
        } => {
            let range = lifeboat_dr::RETENTION;
            if !range.contains(&retention) {
                bail!(UsageError(format!(
                    "--retention {} is out of range (1h to 72h)",
                    humantime::format_duration(retention)
                )));
            }
            let now = match now {
                Some(t) => std::time::SystemTime::from(t)
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                None => lifeboat_store::manifest::now_millis(),
            };
            // Prune deletes, but never creates the store it prunes.
            let p = match &cache {
                Some(cache) => processor(cache, &target, OpenMode::ReadOnly).await?,
                None => {
                    let reader = open(&target, OpenMode::ReadOnly).await?;
                    Processor::retention_only(target.group.clone(), reader.backend().clone())
                }
            };
            let r = p.prune(retention, now).await?;
            for d in &r.damaged {
                eprintln!("left in place, unreadable (its data may be pruned): {d}");
            }
            print_resyncs(&r.resyncs);
            println!(
                "kept {} point(s); deleted {} expired point(s), {} tag(s), {} tree(s), {} segment(s), {} base(s); compacted {} disk(s)",
                r.kept,
                r.points.len(),
                r.tags,
                r.trees,
                r.segments,
                r.bases_deleted,
                r.bases
            );
            if r.orphan_parts > 0 {
                println!(
                    "removed {} part(s) of unfinished compactions",
                    r.orphan_parts
                );
            }
            Ok(())
        }
        Command::Process {
            cache,
            target,
            trim_cache,
            scrub,
        } => {
            let p = processor(&cache, &target, OpenMode::ReadWrite).await?;
            let pass = p.pass().await?;
            print_pass(&pass);
            if trim_cache {
                let t = p.trim_cache().await?;
                println!(
                    "removed from the cache store: {} point(s), {} tag(s), {} tree(s), {} segment(s), {} bytes",
                    t.points, t.tags, t.trees, t.segments, t.bytes
                );
                if t.conflicts > 0 {
                    eprintln!(
                        "kept {} point(s) and segment(s) in the cache store that the target holds another version of",
                        t.conflicts
                    );
                }
            }
            let mut damaged = 0;
            if scrub {
                let s = p.scrub().await?;
                println!(
                    "scrubbed the target store: {} object(s), {} bytes read, {} damaged point(s), {} damage record(s) cleared",
                    s.objects,
                    s.bytes,
                    s.damaged.len(),
                    s.cleared
                );
                for (id, why) in &s.damaged {
                    eprintln!("damaged point {id}: {why}");
                }
                for r in &s.resyncs {
                    println!(
                        "{r}: the history from segment {} reads damaged data",
                        r.from
                    );
                }
                damaged = s.damaged.len();
            }
            // The rest was processed; the exit status still says something was refused.
            if damaged > 0 {
                bail!("{damaged} point(s) in the target store are damaged; see above");
            }
            if !pass.quarantined.is_empty() {
                bail!(
                    "{} point(s) quarantined (not processed); see above",
                    pass.quarantined.len()
                );
            }
            Ok(())
        }
        Command::Failover {
            action: Some(FailoverAction::Commit { to }),
            ..
        } => {
            let r = failover::commit(&to).map_err(usage)?;
            println!(
                "committed failover to point {} of group {} in {}",
                r.point,
                r.group,
                to.display()
            );
            Ok(())
        }
        Command::Failover { action: None, args } => run_failover(args, false).await,
        Command::TestFailover {
            action: Some(DrillAction::Cleanup { to }),
            ..
        } => {
            failover::cleanup_drill(&to).map_err(usage)?;
            println!("removed the DR drill in {}", to.display());
            Ok(())
        }
        Command::TestFailover { action: None, args } => run_failover(args, true).await,
        Command::Store {
            command: StoreCommand::Init { store },
        } => {
            let config = store_config(&store, false)?;
            let what = match &config {
                StoreConfig::Local { path } => format!("store directory {}", path.display()),
                StoreConfig::Azure(a) => {
                    format!("container {} in storage account {}", a.container, a.account)
                }
            };
            match config.init().await? {
                Init::Created => println!("created {what}"),
                Init::Existed => println!("{what} exists already; nothing to do"),
            }
            Ok(())
        }
        Command::Restore {
            store,
            vm,
            point,
            out,
        } => {
            let reader = open(&store, OpenMode::ReadOnly).await?;
            let point = if point == "latest" {
                // Damage the scrub found in other VMs' data does not stop this VM's restore.
                reader
                    .scan_points()
                    .await?
                    .usable_for(std::slice::from_ref(&vm))
                    .into_iter()
                    .rev()
                    .find(|p| p.member(&vm).is_some())
                    .ok_or_else(|| {
                        UsageError(format!(
                            "no recovery point of group {} covers VM {vm}",
                            store.group
                        ))
                    })?
            } else {
                let id = PointId::new(point).map_err(|e| UsageError(e.to_string()))?;
                reader.point(&id).await?
            };
            let member = point.member(&vm).ok_or_else(|| {
                UsageError(format!(
                    "recovery point {} does not cover VM {vm}",
                    point.id
                ))
            })?;
            let output = failover::Output::prepare(&out).map_err(usage)?;
            println!("restoring VM {vm} at {}", describe(&point));
            // All disks or none: a failure removes the disks already restored (docs/format.md).
            let restored = async {
                for d in &member.disks {
                    let tag = reader.tag(&vm, &d.disk, d.tag).await?;
                    let target = disk_output(&out, &d.disk, &tag.shape);
                    let report = restore_disk(&reader, &tag, &target).await?;
                    println!(
                        "  disk {} -> {}: {} bytes, {} blocks verified, {} segments read, {:.2?}",
                        d.disk,
                        target.display(),
                        report.bytes,
                        report.blocks,
                        report.segments_read,
                        report.elapsed
                    );
                }
                anyhow::Ok(())
            }
            .await;
            if restored.is_err() {
                output.discard();
            }
            restored
        }
    }
}

/// `lifeboat verify`: prints every damaged object with the points it breaks, orphans as
/// warnings, and a summary; damage is exit 1, a walk that could not finish exit 2.
async fn run_verify(
    store: &Path,
    group: Option<GroupId>,
    read_data: bool,
    cache: bool,
) -> Result<()> {
    let config = store_config(store, true)?;
    // A store that cannot be opened cannot be verified: that is not damage found. Verifying
    // reads and lists only, so a read-only SAS is enough.
    let backend = config
        .open_as(
            OpenMode::ReadOnly,
            lifeboat_store::backend::retry::RetryPolicy::default(),
        )
        .await
        .map_err(|e| UsageError(format!("cannot open store {}: {e}", store.display())))?;
    let opts = VerifyOptions {
        group: group.clone(),
        read_data,
        trimmed_cache: cache,
    };
    let r = verify(backend, &opts)
        .await
        .map_err(|e| UsageError(format!("could not verify {}: {e}", store.display())))?;
    if r.groups.is_empty() {
        bail!(UsageError(format!(
            "store {} holds no Lifeboat objects (nothing under v1/)",
            store.display()
        )));
    }
    if let Some(g) = &group
        && r.objects_checked == 0
        && r.orphans.is_empty()
    {
        bail!(UsageError(format!(
            "store {} holds nothing of group {g}",
            store.display()
        )));
    }
    for d in &r.damaged {
        println!("damaged  {}: {}", d.object, d.what);
        if d.breaks.is_empty() {
            println!("         breaks no recovery point");
        } else {
            println!("         breaks point(s): {}", d.breaks.join(", "));
        }
        if !d.tags.is_empty() {
            println!(
                "         and tag(s) no point uses yet: {}",
                d.tags.join(", ")
            );
        }
    }
    for o in &r.orphans {
        println!("warning  orphan {}: {}", o.object, o.why);
    }
    if r.trimmed > 0 {
        println!(
            "{} segment reference(s) resolved as trimmed to the target store (--cache)",
            r.trimmed
        );
    }
    let groups: Vec<String> = r.groups.iter().map(|g| g.to_string()).collect();
    println!(
        "verified {} group(s) [{}]: {} object(s) checked, {} bytes read{}, {} damaged, {} of {} point(s) broken, {} orphan(s)",
        r.groups.len(),
        groups.join(", "),
        r.objects_checked,
        r.bytes_read,
        if read_data {
            ""
        } else {
            " (indexes only; --read-data reads every block)"
        },
        r.damaged.len(),
        r.broken_points.len(),
        r.points,
        r.orphans.len()
    );
    if !cache
        && r.damaged
            .iter()
            .any(|d| d.what == "missing" && d.breaks.is_empty() && d.object.contains("/seg/"))
    {
        // A cache store that processing trimmed names, in its newest tags, segments only the
        // target holds now (docs/format.md, write rule 7).
        eprintln!(
            "hint: if {} is a cache store that processing trims, its missing older segments are in the target store: run with --cache",
            store.display()
        );
    }
    if !r.is_clean() {
        bail!(
            "{} damaged object(s); {} recovery point(s) cannot be restored",
            r.damaged.len(),
            r.broken_points.len()
        );
    }
    Ok(())
}

/// Turns the library's "refused" errors into usage errors (exit 2).
fn usage(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<failover::Refused>() {
        Some(r) => UsageError(r.0.clone()).into(),
        None => e,
    }
}

async fn processor(cache: &Path, target: &StoreArgs, mode: OpenMode) -> Result<Processor> {
    // The cache is never created here (an empty new cache has nothing to process); the
    // target is, when missing and the credential may (`mode`).
    let cache_reader = open(
        &StoreArgs {
            store: cache.to_owned(),
            group: target.group.clone(),
        },
        OpenMode::ReadOnly,
    )
    .await?;
    let target_reader = open(target, mode).await?;
    Ok(Processor::new(
        target.group.clone(),
        cache_reader.backend().clone(),
        target_reader.backend().clone(),
    ))
}

fn print_resyncs(resyncs: &[lifeboat_dr::process::Resync]) {
    for r in resyncs {
        eprintln!(
            "{r}: the target store cannot complete its history from segment {}",
            r.from
        );
    }
}

fn print_pass(pass: &lifeboat_dr::process::Pass) {
    println!(
        "processed {} point(s), {} segment(s), {} bytes in {:.2?}",
        pass.points.len(),
        pass.segments,
        pass.bytes,
        pass.elapsed
    );
    for (id, why) in &pass.quarantined {
        eprintln!("quarantined point {id} (not processed): {why}");
    }
    print_resyncs(&pass.resyncs);
    match &pass.latest_processed {
        Some((id, t)) => println!("latest processed point: {id} ({})", fmt_time(*t)),
        None => println!("latest processed point: none"),
    }
    for (vm, ms) in &pass.rpo_ms {
        println!(
            "RPO {vm}: {}",
            humantime::format_duration(Duration::from_secs(ms / 1000))
        );
    }
}

async fn run_failover(a: FailoverArgs, drill: bool) -> Result<()> {
    let need = |what: &str| UsageError(format!("--{what} is required"));
    let store = a.store.ok_or_else(|| need("store"))?;
    let group = a.group.ok_or_else(|| need("group"))?;
    let point = a.point.ok_or_else(|| need("point"))?;
    let to = a.to.ok_or_else(|| need("to"))?;
    let selector: Selector = point
        .parse()
        .map_err(|e: failover::Refused| UsageError(e.0))?;
    // Refuse an occupied output before doing anything (processing included).
    failover::check_output(&to).map_err(|e| UsageError(e.0))?;
    let target = StoreArgs {
        store,
        group: group.clone(),
    };
    if selector == Selector::Latest {
        match &a.cache {
            Some(cache) => {
                let pass = processor(cache, &target, OpenMode::ReadWrite)
                    .await?
                    .pass()
                    .await?;
                println!(
                    "processed {} pending point(s) from the cache store first",
                    pass.points.len()
                );
                // Failing over goes on with what is in the target; what could not move is said.
                for (id, why) in &pass.quarantined {
                    eprintln!("quarantined point {id} (not processed): {why}");
                }
            }
            None => println!("no --cache given: `latest` is the latest processed point"),
        }
    }
    let reader = open(&target, OpenMode::ReadOnly).await?;
    let scan = reader.scan_points().await?;
    // With --vm, a point whose damage is in other VMs' data only still serves this VM.
    let only: Vec<VmId> = a.vm.iter().cloned().collect();
    if let Selector::Id(id) = &selector
        && let Some(d) = scan.damage(id)
        && (only.is_empty() || !d.spares(&only))
    {
        bail!(
            "recovery point {id} is damaged and cannot be restored: {}",
            d.reason
        );
    }
    // Every selector skips damaged points, and says which.
    for d in &scan.damaged {
        if only.is_empty() || !d.spares(&only) {
            eprintln!("skipping damaged point {}: {}", d.id, d.reason);
        }
    }
    let points = if only.is_empty() {
        scan.points
    } else {
        scan.usable_for(&only)
    };
    if points.is_empty() {
        bail!(UsageError(format!(
            "group {group} has no recovery points in the target store"
        )));
    }
    let vms = match a.vm {
        Some(vm) => {
            if !failover::group_vms(&points).contains(&vm) {
                bail!(UsageError(format!("VM {vm} is not in group {group}")));
            }
            vec![vm]
        }
        None => failover::group_vms(&points),
    };
    let chosen = failover::choose(&points, &vms, &selector).map_err(|e| UsageError(e.0))?;
    println!(
        "{} to {}",
        if drill {
            "test failover (DR drill)"
        } else {
            "failing over"
        },
        describe(&chosen)
    );
    let report = failover::restore_point(&reader, &chosen, &vms, &to, drill)
        .await
        .map_err(usage)?;
    for m in &report.members {
        for d in &m.disks {
            println!(
                "  {} / {} -> {}: {} bytes, {} blocks verified",
                m.vm,
                d.disk,
                d.output.display(),
                d.bytes,
                d.blocks_verified
            );
        }
    }
    println!(
        "{}: point {} ({} {}, {}), {} VM(s), {} bytes in {} ms; report in {}",
        report.kind,
        report.point,
        report.point_kind,
        if report.multi_vm {
            "multi-VM"
        } else {
            "single-VM"
        },
        report.point_time,
        report.members.len(),
        report.bytes,
        report.duration_ms,
        to.join(failover::REPORT).display()
    );
    Ok(())
}

fn disk_output(out: &Path, disk: &DiskId, shape: &lifeboat_store::manifest::DiskShape) -> PathBuf {
    match shape {
        lifeboat_store::manifest::DiskShape::Image { .. } => out.join(format!("{disk}.img")),
        lifeboat_store::manifest::DiskShape::Directory { .. } => out.join(disk.as_str()),
    }
}

/// A reader that stops early (`lifeboat points list | head -n 1`) ends this process the way it
/// ends `ls` or `grep`: quietly, by SIGPIPE. Rust ignores SIGPIPE by default, which turns the
/// next write into a panic with a backtrace.
#[cfg(unix)]
#[allow(unsafe_code)]
fn quiet_on_broken_pipe() {
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn quiet_on_broken_pipe() {}
