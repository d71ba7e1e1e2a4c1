//! `lifeboat-loadgen`: measures cut latency and freeze window of a running coordinator with
//! simulated members speaking the real protocol over real mutual TLS (one connection each), or
//! with real agents already in the group (`--members 0 --agent-log …`).
//!
//! Cut latency is the admin's `Snapshot` call, from request to published point. The freeze
//! window of a cut is from the first member's freeze to the last member's thaw: for simulated
//! members, when Freeze and Commit reach them; for real agents, the `frozen_at_us` /
//! `thawed_at_us` they log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lifeboat_coordinator::config::Config;
use lifeboat_proto::model::AgentMessage;
use lifeboat_proto::pb;
use lifeboat_sim::{self as sim, SimMember};
use lifeboat_store::VmId;
use lifeboat_store::layout::Layout;
use lifeboat_store::writer::StoreWriter;

#[derive(Debug, Parser)]
#[command(about = "Cut latency and freeze window of a running coordinator")]
struct Cli {
    /// The coordinator's configuration (address, state directory for tokens and admin
    /// credentials, store).
    #[arg(long)]
    config: PathBuf,
    /// Simulated members to add.
    #[arg(long, default_value_t = 16)]
    members: usize,
    /// Cuts to measure.
    #[arg(long, default_value_t = 100)]
    cuts: usize,
    /// Logs of real agents in the group, for their freeze windows.
    #[arg(long = "agent-log")]
    agent_logs: Vec<PathBuf>,
    /// The coordinator's pid, to report its peak memory.
    #[arg(long)]
    pid: Option<u32>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// (cut id → (first freeze µs, last thaw µs)) from agents' "group cut tagged" lines.
fn agent_windows(logs: &[PathBuf]) -> Result<BTreeMap<u64, (u64, u64)>> {
    let mut w: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for log in logs {
        let text = std::fs::read_to_string(log).with_context(|| format!("{}", log.display()))?;
        for line in text.lines().filter(|l| l.contains("group cut tagged")) {
            let field = |k: &str| -> Option<u64> {
                let i = line.find(&format!(" {k}="))? + k.len() + 2;
                line[i..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            if let (Some(cut), Some(f), Some(t)) =
                (field("cut"), field("frozen_at_us"), field("thawed_at_us"))
            {
                let e = w.entry(cut).or_insert((f, t));
                e.0 = e.0.min(f);
                e.1 = e.1.max(t);
            }
        }
    }
    Ok(w)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli.config)?;
    let addr = config.listen.to_string().replace("0.0.0.0", "127.0.0.1");
    let writer = StoreWriter::new(
        config.store.open().await?,
        Layout::new(config.group.clone()),
    );

    let (times_tx, mut times) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    for i in 0..cli.members {
        let vm = VmId::new(format!("sim-{i:04}"))?;
        let creds = sim::enroll(&config.state_dir, &addr, &vm).await?;
        sim::write_tag(&writer, &vm).await?;
        let m = SimMember::open(
            &addr,
            &creds,
            AgentMessage::Register(sim::register(&vm)).into(),
        )
        .await?;
        tokio::spawn(m.serve(times_tx.clone()));
    }
    drop(times_tx);
    eprintln!(
        "{} simulated members enrolled and connected in {:.1?}",
        cli.members,
        started.elapsed()
    );

    let admin = config.state_dir.join("admin");
    let read = |f: &str| std::fs::read_to_string(admin.join(f));
    let tls = lifeboat_proto::tls::client_config(
        &read("ca.pem")?,
        Some((&read("admin.pem")?, &read("admin.key")?)),
    )?;
    let mut client =
        pb::admin_client::AdminClient::new(lifeboat_proto::tls::connect(&addr, tls).await?);
    let mut latencies = Vec::new();
    let mut ids = Vec::new();
    let mut incomplete = 0;
    for _ in 0..cli.cuts {
        let t = Instant::now();
        let r = client
            .snapshot(pb::SnapshotRequest {
                kind: pb::CutKind::Crash as i32,
            })
            .await
            .map_err(|s| anyhow::anyhow!("snapshot: {}", s.message()))?
            .into_inner();
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if !r.excluded.is_empty() {
            incomplete += 1;
        }
        ids.push(r.point_id);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Freeze windows.
    let mut windows = Vec::new();
    if cli.members > 0 {
        let mut per_cut: BTreeMap<u64, (Instant, Instant)> = BTreeMap::new();
        while let Ok((cut, f, t)) = times.try_recv() {
            let e = per_cut.entry(cut).or_insert((f, t));
            e.0 = e.0.min(f);
            e.1 = e.1.max(t);
        }
        windows.extend(per_cut.values().map(|(f, t)| (*t - *f).as_secs_f64() * 1e3));
    }
    if !cli.agent_logs.is_empty() {
        let w = agent_windows(&cli.agent_logs)?;
        let wanted: Vec<u64> = ids
            .iter()
            .filter_map(|id| id.strip_prefix('c')?.parse().ok())
            .collect();
        windows.extend(
            wanted
                .iter()
                .filter_map(|c| w.get(c))
                .map(|(f, t)| (t.saturating_sub(*f)) as f64 / 1e3),
        );
    }
    if windows.is_empty() {
        bail!("no freeze windows measured");
    }
    latencies.sort_by(f64::total_cmp);
    windows.sort_by(f64::total_cmp);
    let members = cli.members + cli.agent_logs.len();
    println!(
        "members={members} cuts={} cut_ms_p50={:.2} cut_ms_p99={:.2} freeze_window_ms_p50={:.2} freeze_window_ms_p99={:.2} windows={} points_with_exclusions={incomplete}",
        latencies.len(),
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        pct(&windows, 0.5),
        pct(&windows, 0.99),
        windows.len()
    );
    if let Some(pid) = cli.pid {
        println!(
            "coordinator_rss_mib={:.1} coordinator_peak_rss_mib={:.1}",
            rss_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
            rss_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0
        );
    }
    Ok(())
}
