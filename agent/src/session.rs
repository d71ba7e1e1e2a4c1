//! The agent's session with its coordinator: connect over mutual TLS, register, send
//! heartbeats, pass the coordinator's commands to the member loop and its acks back. Reconnects
//! with backoff for as long as the agent runs; commands are stamped with their arrival time so
//! the member loop can tell stale ones.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lifeboat_proto::model::{AgentMessage, CoordinatorMessage, DiskStats, Heartbeat, Register};
use lifeboat_proto::pb;
use lifeboat_proto::pb::session_client::SessionClient;
use lifeboat_store::DiskId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::Identity;

/// A coordinator command and when it arrived.
pub type Command = (Instant, CoordinatorMessage);

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs the session until the process ends.
pub async fn run(
    identity: Identity,
    register: Register,
    state_dir: PathBuf,
    commands: mpsc::Sender<Command>,
    mut acks: mpsc::Receiver<AgentMessage>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match once(&identity, &register, &state_dir, &commands, &mut acks).await {
            Ok(()) => tracing::warn!("coordinator closed the session; reconnecting"),
            Err(e) => {
                tracing::warn!(coordinator = %identity.coordinator, error = %e, "session with the coordinator failed; retrying in {backoff:?}")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn once(
    identity: &Identity,
    register: &Register,
    state_dir: &std::path::Path,
    commands: &mpsc::Sender<Command>,
    acks: &mut mpsc::Receiver<AgentMessage>,
) -> Result<(), String> {
    let tls = identity.tls().map_err(|e| format!("{e:#}"))?;
    let channel = lifeboat_proto::tls::connect(&identity.coordinator, tls)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
    tx.send(AgentMessage::Register(register.clone()).into())
        .await
        .map_err(|_| "session closed")?;
    let mut inbound = SessionClient::new(channel)
        .open(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    // Acks queued while disconnected belong to cuts the coordinator has given up on.
    while acks.try_recv().is_ok() {}
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = inbound.message() => {
                let m = match m {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(()),
                    Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
                };
                match CoordinatorMessage::try_from(m) {
                    Ok(CoordinatorMessage::Registered { group, heartbeat_interval }) => {
                        tracing::info!(%group, coordinator = %identity.coordinator, "registered with the coordinator");
                        heartbeat = tokio::time::interval(heartbeat_interval);
                        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    Ok(c) => {
                        if commands.send((Instant::now(), c)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "malformed message from the coordinator ignored"),
                }
            }
            Some(ack) = acks.recv() => {
                tx.send(ack.into()).await.map_err(|_| "session closed")?;
            }
            _ = heartbeat.tick() => {
                tx.send(AgentMessage::Heartbeat(stats(state_dir)).into())
                    .await
                    .map_err(|_| "session closed")?;
            }
        }
    }
}

/// The heartbeat's figures, from the agent's live status file.
fn stats(state_dir: &std::path::Path) -> Heartbeat {
    let live = crate::progress::load(state_dir).unwrap_or_default();
    Heartbeat {
        time_ms: lifeboat_store::manifest::now_millis(),
        disks: live
            .disks
            .iter()
            .filter_map(|(d, s)| {
                Some((
                    DiskId::new(d.clone()).ok()?,
                    DiskStats {
                        last_tag: s.last_tag,
                        last_tag_time_ms: s.last_tag_time,
                        churn_bytes_per_s: s.last_churn_bytes_per_s as u64,
                        backlog_bytes: s.backlog_bytes,
                        shipped_bytes: s.done,
                        total_bytes: if s.last_tag == 0 { s.total } else { 0 },
                    },
                ))
            })
            .collect(),
    }
}
