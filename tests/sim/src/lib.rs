//! A simulated group member speaking the real protocol over real mutual TLS: the load
//! generator's members (`lifeboat-loadgen`) and the tests' misbehaving peers. It does no
//! replication; each simulated VM owns one empty disk whose single tag it writes once, so the
//! points the coordinator publishes are real and restorable.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use lifeboat_proto::enroll::Enrolled;
use lifeboat_proto::model::{
    AgentMessage, CoordinatorMessage, CutAck, CutPhase, DiskInfo, DiskKind, DiskPosition, Provider,
    Register, VmFacts,
};
use lifeboat_proto::pb;
use lifeboat_proto::pb::session_client::SessionClient;
use lifeboat_store::manifest::{Consistency, DiskShape, Tag, now_millis};
use lifeboat_store::writer::StoreWriter;
use lifeboat_store::{DiskId, VmId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// The disk every simulated VM has.
pub const DISK: &str = "sim";

/// Writes tag 1 of the simulated VM's disk (an empty image) unless it exists.
pub async fn write_tag(writer: &StoreWriter, vm: &VmId) -> Result<()> {
    let tag = Tag {
        vm: vm.clone(),
        disk: DiskId::new(DISK)?,
        seq: 1,
        from_segment: 1,
        through_segment: 0,
        time: now_millis(),
        consistency: Consistency::Crash,
        block_size: 65536,
        shape: DiskShape::Image { size: 0 },
        origin: None,
    };
    writer.put_tag(&tag).await?;
    Ok(())
}

/// An open session of a simulated member.
#[derive(Debug)]
pub struct SimMember {
    pub vm: VmId,
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::CoordinatorMessage>,
}

/// The registration a simulated VM sends.
pub fn register(vm: &VmId) -> Register {
    Register {
        vm: vm.clone(),
        facts: VmFacts {
            os: "simulated".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        },
        disks: vec![DiskInfo {
            id: DiskId::new(DISK).expect("valid"),
            kind: DiskKind::Image,
            size_bytes: 0,
            provider: Provider::Fsfreeze,
        }],
    }
}

impl SimMember {
    /// Opens a session as `vm` with the credentials from enrolment, sending `first` (normally
    /// [`register`]) as the first message, and waits for `Registered`.
    pub async fn open(addr: &str, creds: &Enrolled, first: pb::AgentMessage) -> Result<Self> {
        let tls = lifeboat_proto::tls::client_config(
            &creds.ca_pem,
            Some((&creds.cert_pem, &creds.key_pem)),
        )?;
        let channel = lifeboat_proto::tls::connect(addr, tls).await?;
        let (tx, rx) = mpsc::channel(64);
        let vm = match &first.body {
            Some(pb::agent_message::Body::Register(r)) => VmId::new(r.vm.clone())?,
            _ => VmId::new("unregistered")?,
        };
        tx.send(first)
            .await
            .map_err(|_| anyhow!("session closed"))?;
        let inbound = SessionClient::new(channel)
            .open(ReceiverStream::new(rx))
            .await
            .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let mut m = SimMember { vm, tx, inbound };
        match m.next().await? {
            CoordinatorMessage::Registered { .. } => Ok(m),
            other => bail!("expected Registered, got {other:?}"),
        }
    }

    /// The next command from the coordinator.
    pub async fn next(&mut self) -> Result<CoordinatorMessage> {
        let m = self
            .inbound
            .message()
            .await
            .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
            .context("the coordinator closed the session")?;
        Ok(CoordinatorMessage::try_from(m)?)
    }

    /// Sends a raw message (tests send malformed ones).
    pub async fn send(&self, m: pb::AgentMessage) -> Result<()> {
        self.tx.send(m).await.map_err(|_| anyhow!("session closed"))
    }

    /// Acks a phase of `cut_id`; TAGGED carries tag 1 of the simulated disk.
    pub async fn ack(&self, cut_id: u64, phase: CutPhase) -> Result<()> {
        let disks = if phase == CutPhase::Tagged {
            vec![DiskPosition {
                disk: DiskId::new(DISK)?,
                tag: 1,
                through_segment: 0,
            }]
        } else {
            vec![]
        };
        self.send(
            AgentMessage::CutAck(CutAck {
                cut_id,
                phase,
                disks,
                consistency: Consistency::Crash,
                error: None,
            })
            .into(),
        )
        .await
    }

    /// Answers cuts like a healthy agent whose freeze and capture are instant, until the
    /// session ends. Reports (time Freeze arrived, time Commit arrived) of each cut to `times`.
    pub async fn serve(
        mut self,
        times: mpsc::UnboundedSender<(u64, Instant, Instant)>,
    ) -> Result<()> {
        let mut frozen_at = None;
        loop {
            match self.next().await? {
                CoordinatorMessage::Prepare { cut_id, .. } => {
                    self.ack(cut_id, CutPhase::Prepared).await?
                }
                CoordinatorMessage::Freeze { cut_id, .. } => {
                    frozen_at = Some((cut_id, Instant::now()));
                    self.ack(cut_id, CutPhase::Frozen).await?;
                }
                CoordinatorMessage::Commit { cut_id, .. } => {
                    let thawed = Instant::now();
                    if let Some((id, f)) = frozen_at.take()
                        && id == cut_id
                    {
                        let _ = times.send((cut_id, f, thawed));
                    }
                    self.ack(cut_id, CutPhase::Tagged).await?;
                }
                CoordinatorMessage::Abort { .. } => frozen_at = None,
                CoordinatorMessage::Registered { .. } => {}
            }
        }
    }
}

/// Mints a token in the coordinator's state directory and enrols `vm` with it.
pub async fn enroll(state_dir: &std::path::Path, addr: &str, vm: &VmId) -> Result<Enrolled> {
    let ca = lifeboat_coordinator::pki::Ca::load(state_dir)?;
    let token = lifeboat_coordinator::tokens::mint(
        state_dir,
        &ca.fingerprint,
        Some(vm.clone()),
        std::time::Duration::from_secs(300),
    )?;
    Ok(lifeboat_proto::enroll::enroll(addr, token.expose(), vm.as_str()).await?)
}
