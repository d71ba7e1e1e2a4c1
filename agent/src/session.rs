//! The agent's session with its coordinator: connect over mutual TLS, register, send
//! heartbeats, pass the coordinator's commands to the member loop and its acks back. Reconnects
//! with backoff for as long as the agent runs; commands are stamped with their arrival time so
//! the member loop can tell stale ones. Renews the agent's certificate when it is due, between
//! sessions.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lifeboat_proto::model::{
    AgentMessage, CoordinatorMessage, CutPhase, DiskStats, Heartbeat, Register,
};
use lifeboat_proto::pb;
use lifeboat_proto::pb::session_client::SessionClient;
use lifeboat_store::DiskId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::Identity;

/// A coordinator command and when it arrived.
pub type Command = (Instant, CoordinatorMessage);

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// After a failed renewal, the next try waits this long (the session carries on meanwhile).
const RENEW_RETRY: Duration = Duration::from_secs(3600);

/// How a session ended without an error.
enum End {
    Closed,
    /// The certificate is due for renewal: reconnect, renewing first.
    Renew,
}

/// Runs the session until the process ends.
pub async fn run(
    mut identity: Identity,
    register: Register,
    state_dir: PathBuf,
    commands: mpsc::Sender<Command>,
    mut acks: mpsc::Receiver<AgentMessage>,
) {
    let mut backoff = Duration::from_millis(200);
    let mut renew_retry: Option<SystemTime> = None;
    loop {
        // Whatever `lifeboat-agent renew` (or an earlier renewal) left on disk is current.
        match Identity::load(&state_dir, Some(&identity.coordinator)) {
            Ok(i) => identity = i,
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot reload the agent identity"),
        }
        let renew_at = identity
            .renew_at()
            .ok()
            .map(|t| renew_retry.map_or(t, |r| r.max(t)));
        if renew_at.is_some_and(|t| SystemTime::now() >= t) {
            match crate::identity::renew(&state_dir, &identity, &register.vm).await {
                Ok(renewed) => {
                    tracing::info!(
                        valid_until = %humantime::format_rfc3339_seconds(renewed.not_after().unwrap_or(UNIX_EPOCH)),
                        "agent certificate renewed"
                    );
                    identity = renewed;
                    renew_retry = None;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed; retrying in an hour");
                    renew_retry = Some(SystemTime::now() + RENEW_RETRY);
                }
            }
            continue;
        }
        match once(
            &identity, renew_at, &register, &state_dir, &commands, &mut acks,
        )
        .await
        {
            Ok(End::Renew) => {
                backoff = Duration::from_millis(200);
                continue;
            }
            Ok(End::Closed) => tracing::warn!("coordinator closed the session; reconnecting"),
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
    renew_at: Option<SystemTime>,
    register: &Register,
    state_dir: &std::path::Path,
    commands: &mpsc::Sender<Command>,
    acks: &mut mpsc::Receiver<AgentMessage>,
) -> Result<End, String> {
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
                    Ok(None) => return Ok(End::Closed),
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
                            return Ok(End::Closed);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "malformed message from the coordinator ignored"),
                }
            }
            Some(ack) = acks.recv() => {
                let tagged = matches!(&ack, AgentMessage::CutAck(a) if a.phase == CutPhase::Tagged);
                tx.send(ack.into()).await.map_err(|_| "session closed")?;
                if tagged {
                    // The new tag's time now, not a heartbeat later: it is the member's RPO.
                    tx.send(AgentMessage::Heartbeat(stats(state_dir)).into())
                        .await
                        .map_err(|_| "session closed")?;
                }
            }
            _ = heartbeat.tick() => {
                if renew_at.is_some_and(|t| SystemTime::now() >= t) {
                    return Ok(End::Renew);
                }
                tx.send(AgentMessage::Heartbeat(stats(state_dir)).into())
                    .await
                    .map_err(|_| "session closed")?;
            }
        }
    }
}

/// The heartbeat's figures, from the agent's live status (in memory, never read back from
/// `status.json`).
fn stats(state_dir: &std::path::Path) -> Heartbeat {
    let live = crate::progress::current(state_dir);
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
