//! Domain types of the session protocol, validated on receipt (`TryFrom<pb::…>`) and turned back
//! into wire types for sending (`From<…> for pb::…`). An invalid message becomes a
//! [`ProtocolError`] naming the field, which maps to gRPC `INVALID_ARGUMENT`.

use std::time::Duration;

use lifeboat_store::manifest::Consistency;
use lifeboat_store::{DiskId, VmId};

use crate::{PROTOCOL_VERSION, pb};

/// Why a received message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u32),
}

impl From<ProtocolError> for tonic::Status {
    fn from(e: ProtocolError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn invalid(field: &'static str, why: impl ToString) -> ProtocolError {
    ProtocolError::Invalid {
        field,
        why: why.to_string(),
    }
}

fn vm(field: &'static str, s: String) -> Result<VmId, ProtocolError> {
    VmId::new(s).map_err(|e| invalid(field, e))
}

fn disk(field: &'static str, s: String) -> Result<DiskId, ProtocolError> {
    DiskId::new(s).map_err(|e| invalid(field, e))
}

/// What a disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    Image,
    BlockDevice,
    Directory,
}

/// A disk's consistency provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    None,
    Fsfreeze,
    Hooks,
    Vss,
}

/// One protected disk, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub id: DiskId,
    pub kind: DiskKind,
    pub size_bytes: u64,
    pub provider: Provider,
}

/// Facts about the VM (informational).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmFacts {
    pub os: String,
    pub kernel: String,
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub agent_version: String,
}

/// The first message of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub vm: VmId,
    pub facts: VmFacts,
    pub disks: Vec<DiskInfo>,
}

/// Replication figures of one disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub last_tag: u64,
    pub last_tag_time_ms: u64,
    pub churn_bytes_per_s: u64,
    pub backlog_bytes: u64,
    pub shipped_bytes: u64,
    pub total_bytes: u64,
}

/// A heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub time_ms: u64,
    pub disks: Vec<(DiskId, DiskStats)>,
}

/// Where a member's cut stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutPhase {
    Prepared,
    Frozen,
    Tagged,
    Failed,
}

/// A disk's tag in a cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPosition {
    pub disk: DiskId,
    pub tag: u64,
    pub through_segment: u64,
}

/// An agent's answer in the cut protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutAck {
    pub cut_id: u64,
    pub phase: CutPhase,
    pub disks: Vec<DiskPosition>,
    pub consistency: Consistency,
    pub error: Option<String>,
}

/// Anything an agent sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    Register(Register),
    Heartbeat(Heartbeat),
    CutAck(CutAck),
}

/// What a cut promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CutKind {
    Crash,
    App,
}

/// Anything the coordinator sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorMessage {
    Registered {
        group: lifeboat_store::GroupId,
        heartbeat_interval: Duration,
    },
    Prepare {
        cut_id: u64,
        kind: CutKind,
        prepare_deadline: Duration,
    },
    Freeze {
        cut_id: u64,
        ack_deadline: Duration,
        freeze_deadline: Duration,
    },
    Commit {
        cut_id: u64,
        point_id: lifeboat_store::PointId,
    },
    Abort {
        cut_id: u64,
        reason: String,
    },
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

fn positive_ms(field: &'static str, v: u64) -> Result<Duration, ProtocolError> {
    if v == 0 {
        return Err(ProtocolError::Missing(field));
    }
    Ok(Duration::from_millis(v))
}

fn cut_id(field: &'static str, v: u64) -> Result<u64, ProtocolError> {
    if v == 0 {
        return Err(ProtocolError::Missing(field));
    }
    Ok(v)
}

pub fn cut_kind_from_wire(field: &'static str, v: i32) -> Result<CutKind, ProtocolError> {
    match pb::CutKind::try_from(v) {
        Ok(pb::CutKind::Crash) => Ok(CutKind::Crash),
        Ok(pb::CutKind::App) => Ok(CutKind::App),
        _ => Err(invalid(field, format!("unknown cut kind {v}"))),
    }
}

pub fn cut_kind_to_wire(k: CutKind) -> i32 {
    match k {
        CutKind::Crash => pb::CutKind::Crash as i32,
        CutKind::App => pb::CutKind::App as i32,
    }
}

pub fn consistency_to_wire(c: Consistency) -> i32 {
    let w = match c {
        Consistency::NotFrozen => pb::Consistency::NotFrozen,
        Consistency::Crash => pb::Consistency::Crash,
        Consistency::App => pb::Consistency::App,
    };
    w as i32
}

impl TryFrom<pb::CoordinatorMessage> for CoordinatorMessage {
    type Error = ProtocolError;
    fn try_from(m: pb::CoordinatorMessage) -> Result<Self, ProtocolError> {
        use pb::coordinator_message::Body;
        Ok(
            match m
                .body
                .ok_or(ProtocolError::Missing("CoordinatorMessage.body"))?
            {
                Body::Registered(r) => CoordinatorMessage::Registered {
                    group: lifeboat_store::GroupId::new(r.group)
                        .map_err(|e| invalid("Registered.group", e))?,
                    heartbeat_interval: positive_ms(
                        "Registered.heartbeat_interval_ms",
                        r.heartbeat_interval_ms,
                    )?,
                },
                Body::Prepare(p) => CoordinatorMessage::Prepare {
                    cut_id: cut_id("Prepare.cut_id", p.cut_id)?,
                    kind: cut_kind_from_wire("Prepare.kind", p.kind)?,
                    prepare_deadline: positive_ms(
                        "Prepare.prepare_deadline_ms",
                        p.prepare_deadline_ms,
                    )?,
                },
                Body::Freeze(f) => {
                    let ack_deadline = positive_ms("Freeze.ack_deadline_ms", f.ack_deadline_ms)?;
                    let freeze_deadline =
                        positive_ms("Freeze.freeze_deadline_ms", f.freeze_deadline_ms)?;
                    if freeze_deadline <= ack_deadline {
                        return Err(invalid(
                            "Freeze.freeze_deadline_ms",
                            "must be longer than ack_deadline_ms",
                        ));
                    }
                    CoordinatorMessage::Freeze {
                        cut_id: cut_id("Freeze.cut_id", f.cut_id)?,
                        ack_deadline,
                        freeze_deadline,
                    }
                }
                Body::Commit(c) => CoordinatorMessage::Commit {
                    cut_id: cut_id("Commit.cut_id", c.cut_id)?,
                    point_id: lifeboat_store::PointId::new(c.point_id)
                        .map_err(|e| invalid("Commit.point_id", e))?,
                },
                Body::Abort(a) => CoordinatorMessage::Abort {
                    cut_id: cut_id("Abort.cut_id", a.cut_id)?,
                    reason: a.reason,
                },
            },
        )
    }
}

impl From<CoordinatorMessage> for pb::CoordinatorMessage {
    fn from(m: CoordinatorMessage) -> Self {
        use pb::coordinator_message::Body;
        let body = match m {
            CoordinatorMessage::Registered {
                group,
                heartbeat_interval,
            } => Body::Registered(pb::Registered {
                group: group.into(),
                heartbeat_interval_ms: ms(heartbeat_interval),
            }),
            CoordinatorMessage::Prepare {
                cut_id,
                kind,
                prepare_deadline,
            } => Body::Prepare(pb::Prepare {
                cut_id,
                kind: cut_kind_to_wire(kind),
                prepare_deadline_ms: ms(prepare_deadline),
            }),
            CoordinatorMessage::Freeze {
                cut_id,
                ack_deadline,
                freeze_deadline,
            } => Body::Freeze(pb::Freeze {
                cut_id,
                ack_deadline_ms: ms(ack_deadline),
                freeze_deadline_ms: ms(freeze_deadline),
            }),
            CoordinatorMessage::Commit { cut_id, point_id } => Body::Commit(pb::Commit {
                cut_id,
                point_id: point_id.into(),
            }),
            CoordinatorMessage::Abort { cut_id, reason } => {
                Body::Abort(pb::Abort { cut_id, reason })
            }
        };
        pb::CoordinatorMessage { body: Some(body) }
    }
}

impl From<AgentMessage> for pb::AgentMessage {
    fn from(m: AgentMessage) -> Self {
        use pb::agent_message::Body;
        let body = match m {
            AgentMessage::Register(r) => Body::Register(r.into()),
            AgentMessage::Heartbeat(h) => Body::Heartbeat(h.into()),
            AgentMessage::CutAck(a) => Body::CutAck(a.into()),
        };
        pb::AgentMessage { body: Some(body) }
    }
}

impl From<Heartbeat> for pb::Heartbeat {
    fn from(h: Heartbeat) -> Self {
        pb::Heartbeat {
            time_ms: h.time_ms,
            disks: h
                .disks
                .into_iter()
                .map(|(d, s)| stats_to_wire(d, s))
                .collect(),
        }
    }
}

pub fn stats_to_wire(d: DiskId, s: DiskStats) -> pb::DiskStats {
    pb::DiskStats {
        disk: d.into(),
        last_tag: s.last_tag,
        last_tag_time_ms: s.last_tag_time_ms,
        churn_bytes_per_s: s.churn_bytes_per_s,
        backlog_bytes: s.backlog_bytes,
        shipped_bytes: s.shipped_bytes,
        total_bytes: s.total_bytes,
    }
}

impl TryFrom<pb::AgentMessage> for AgentMessage {
    type Error = ProtocolError;
    fn try_from(m: pb::AgentMessage) -> Result<Self, ProtocolError> {
        use pb::agent_message::Body;
        match m.body.ok_or(ProtocolError::Missing("AgentMessage.body"))? {
            Body::Register(r) => Ok(AgentMessage::Register(r.try_into()?)),
            Body::Heartbeat(h) => Ok(AgentMessage::Heartbeat(h.try_into()?)),
            Body::CutAck(a) => Ok(AgentMessage::CutAck(a.try_into()?)),
        }
    }
}

impl TryFrom<pb::Register> for Register {
    type Error = ProtocolError;
    fn try_from(r: pb::Register) -> Result<Self, ProtocolError> {
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(r.protocol_version));
        }
        let f = r.facts.unwrap_or_default();
        let mut disks = Vec::with_capacity(r.disks.len());
        for d in r.disks {
            let kind = match pb::DiskKind::try_from(d.kind) {
                Ok(pb::DiskKind::Image) => DiskKind::Image,
                Ok(pb::DiskKind::BlockDevice) => DiskKind::BlockDevice,
                Ok(pb::DiskKind::Directory) => DiskKind::Directory,
                _ => {
                    return Err(invalid(
                        "Register.disks.kind",
                        format!("unknown kind {}", d.kind),
                    ));
                }
            };
            let provider = match pb::Provider::try_from(d.provider) {
                Ok(pb::Provider::None) => Provider::None,
                Ok(pb::Provider::Fsfreeze) => Provider::Fsfreeze,
                Ok(pb::Provider::Hooks) => Provider::Hooks,
                Ok(pb::Provider::Vss) => Provider::Vss,
                _ => {
                    return Err(invalid(
                        "Register.disks.provider",
                        format!("unknown provider {}", d.provider),
                    ));
                }
            };
            disks.push(DiskInfo {
                id: disk("Register.disks.id", d.id)?,
                kind,
                size_bytes: d.size_bytes,
                provider,
            });
        }
        let mut ids: Vec<_> = disks.iter().map(|d| &d.id).collect();
        ids.sort();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("Register.disks", "a disk id appears twice"));
        }
        Ok(Register {
            vm: vm("Register.vm", r.vm)?,
            facts: VmFacts {
                os: f.os,
                kernel: f.kernel,
                hostname: f.hostname,
                cpus: f.cpus,
                memory_bytes: f.memory_bytes,
                agent_version: f.agent_version,
            },
            disks,
        })
    }
}

impl TryFrom<pb::Heartbeat> for Heartbeat {
    type Error = ProtocolError;
    fn try_from(h: pb::Heartbeat) -> Result<Self, ProtocolError> {
        let disks = h
            .disks
            .into_iter()
            .map(|d| {
                Ok((
                    disk("Heartbeat.disks.disk", d.disk)?,
                    DiskStats {
                        last_tag: d.last_tag,
                        last_tag_time_ms: d.last_tag_time_ms,
                        churn_bytes_per_s: d.churn_bytes_per_s,
                        backlog_bytes: d.backlog_bytes,
                        shipped_bytes: d.shipped_bytes,
                        total_bytes: d.total_bytes,
                    },
                ))
            })
            .collect::<Result<_, ProtocolError>>()?;
        Ok(Heartbeat {
            time_ms: h.time_ms,
            disks,
        })
    }
}

impl TryFrom<pb::CutAck> for CutAck {
    type Error = ProtocolError;
    fn try_from(a: pb::CutAck) -> Result<Self, ProtocolError> {
        if a.cut_id == 0 {
            return Err(ProtocolError::Missing("CutAck.cut_id"));
        }
        let phase = match pb::CutPhase::try_from(a.phase) {
            Ok(pb::CutPhase::Prepared) => CutPhase::Prepared,
            Ok(pb::CutPhase::Frozen) => CutPhase::Frozen,
            Ok(pb::CutPhase::Tagged) => CutPhase::Tagged,
            Ok(pb::CutPhase::Failed) => CutPhase::Failed,
            _ => {
                return Err(invalid(
                    "CutAck.phase",
                    format!("unknown phase {}", a.phase),
                ));
            }
        };
        let consistency = match pb::Consistency::try_from(a.consistency) {
            Ok(pb::Consistency::NotFrozen) => Consistency::NotFrozen,
            Ok(pb::Consistency::Crash) => Consistency::Crash,
            Ok(pb::Consistency::App) => Consistency::App,
            // A failed member claims nothing.
            _ if phase == CutPhase::Failed => Consistency::NotFrozen,
            _ => {
                return Err(invalid(
                    "CutAck.consistency",
                    format!("unknown consistency {}", a.consistency),
                ));
            }
        };
        if phase == CutPhase::Tagged && a.disks.is_empty() {
            return Err(invalid("CutAck.disks", "a TAGGED ack must list its tags"));
        }
        let disks = a
            .disks
            .into_iter()
            .map(|d| {
                if d.tag == 0 {
                    return Err(invalid("CutAck.disks.tag", "tag numbers start at 1"));
                }
                Ok(DiskPosition {
                    disk: disk("CutAck.disks.disk", d.disk)?,
                    tag: d.tag,
                    through_segment: d.through_segment,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(CutAck {
            cut_id: a.cut_id,
            phase,
            disks,
            consistency,
            error: (!a.error.is_empty()).then_some(a.error),
        })
    }
}

impl From<Register> for pb::Register {
    fn from(r: Register) -> Self {
        pb::Register {
            protocol_version: PROTOCOL_VERSION,
            vm: r.vm.into(),
            facts: Some(pb::VmFacts {
                os: r.facts.os,
                kernel: r.facts.kernel,
                hostname: r.facts.hostname,
                cpus: r.facts.cpus,
                memory_bytes: r.facts.memory_bytes,
                agent_version: r.facts.agent_version,
            }),
            disks: r
                .disks
                .into_iter()
                .map(|d| pb::DiskInfo {
                    id: d.id.into(),
                    kind: match d.kind {
                        DiskKind::Image => pb::DiskKind::Image,
                        DiskKind::BlockDevice => pb::DiskKind::BlockDevice,
                        DiskKind::Directory => pb::DiskKind::Directory,
                    } as i32,
                    size_bytes: d.size_bytes,
                    provider: match d.provider {
                        Provider::None => pb::Provider::None,
                        Provider::Fsfreeze => pb::Provider::Fsfreeze,
                        Provider::Hooks => pb::Provider::Hooks,
                        Provider::Vss => pb::Provider::Vss,
                    } as i32,
                })
                .collect(),
        }
    }
}

impl From<CutAck> for pb::CutAck {
    fn from(a: CutAck) -> Self {
        pb::CutAck {
            cut_id: a.cut_id,
            phase: match a.phase {
                CutPhase::Prepared => pb::CutPhase::Prepared,
                CutPhase::Frozen => pb::CutPhase::Frozen,
                CutPhase::Tagged => pb::CutPhase::Tagged,
                CutPhase::Failed => pb::CutPhase::Failed,
            } as i32,
            disks: a
                .disks
                .into_iter()
                .map(|d| pb::DiskPosition {
                    disk: d.disk.into(),
                    tag: d.tag,
                    through_segment: d.through_segment,
                })
                .collect(),
            consistency: consistency_to_wire(a.consistency),
            error: a.error.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn register() -> Register {
        Register {
            vm: VmId::new("web-01").unwrap(),
            facts: VmFacts {
                os: "Debian 12".into(),
                cpus: 2,
                ..Default::default()
            },
            disks: vec![DiskInfo {
                id: DiskId::new("root").unwrap(),
                kind: DiskKind::BlockDevice,
                size_bytes: 1 << 30,
                provider: Provider::Fsfreeze,
            }],
        }
    }

    #[test]
    fn register_round_trips_through_the_wire() {
        let wire = pb::AgentMessage {
            body: Some(pb::agent_message::Body::Register(register().into())),
        }
        .encode_to_vec();
        let back = AgentMessage::try_from(pb::AgentMessage::decode(&wire[..]).unwrap()).unwrap();
        assert_eq!(back, AgentMessage::Register(register()));
    }

    #[test]
    fn invalid_messages_name_the_field() {
        let mut r: pb::Register = register().into();
        r.vm = "../etc".into();
        let err = Register::try_from(r).unwrap_err();
        assert!(
            err.to_string().starts_with("Register.vm: invalid VM id"),
            "{err}"
        );

        let mut r: pb::Register = register().into();
        r.protocol_version = 9;
        assert_eq!(
            Register::try_from(r).unwrap_err(),
            ProtocolError::Version(9)
        );

        let mut r: pb::Register = register().into();
        r.disks[0].kind = 42;
        assert!(
            Register::try_from(r)
                .unwrap_err()
                .to_string()
                .contains("Register.disks.kind")
        );

        let mut r: pb::Register = register().into();
        r.disks.push(r.disks[0].clone());
        assert!(
            Register::try_from(r)
                .unwrap_err()
                .to_string()
                .contains("appears twice")
        );

        let empty = AgentMessage::try_from(pb::AgentMessage { body: None }).unwrap_err();
        assert_eq!(empty.to_string(), "AgentMessage.body is missing");
        let status: tonic::Status = empty.into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn cut_acks_are_checked() {
        let ack = CutAck {
            cut_id: 7,
            phase: CutPhase::Tagged,
            disks: vec![DiskPosition {
                disk: DiskId::new("root").unwrap(),
                tag: 3,
                through_segment: 9,
            }],
            consistency: Consistency::App,
            error: None,
        };
        assert_eq!(
            CutAck::try_from(pb::CutAck::from(ack.clone())).unwrap(),
            ack
        );
        let mut bad = pb::CutAck::from(ack.clone());
        bad.disks.clear();
        assert!(CutAck::try_from(bad).is_err(), "TAGGED without tags");
        let mut bad = pb::CutAck::from(ack);
        bad.cut_id = 0;
        assert!(CutAck::try_from(bad).is_err());
    }

    #[test]
    fn coordinator_messages_are_checked() {
        let freeze = CoordinatorMessage::Freeze {
            cut_id: 3,
            ack_deadline: Duration::from_millis(500),
            freeze_deadline: Duration::from_millis(1000),
        };
        let wire = pb::CoordinatorMessage::from(freeze.clone());
        assert_eq!(CoordinatorMessage::try_from(wire.clone()).unwrap(), freeze);
        // A freeze deadline not longer than the ack deadline would break the consistency
        // argument: refused.
        let mut bad = wire;
        if let Some(pb::coordinator_message::Body::Freeze(f)) = &mut bad.body {
            f.freeze_deadline_ms = 500;
        }
        assert!(
            CoordinatorMessage::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("freeze_deadline_ms")
        );
        let commit = pb::CoordinatorMessage {
            body: Some(pb::coordinator_message::Body::Commit(pb::Commit {
                cut_id: 1,
                point_id: "../x".into(),
            })),
        };
        assert!(CoordinatorMessage::try_from(commit).is_err());
    }

    #[test]
    fn garbage_bytes_never_panic() {
        // Whatever the model accepts survives its own wire form unchanged; what it refuses, it
        // refuses with an error (never a panic). Both paths must be taken, or the inputs
        // prove nothing.
        let mut refused = 0;
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            if let Ok(m) = pb::AgentMessage::decode(&bytes[..]) {
                match AgentMessage::try_from(m) {
                    Ok(a) => {
                        let again = AgentMessage::try_from(pb::AgentMessage::from(a.clone()));
                        assert_eq!(again.as_ref(), Ok(&a), "{bytes:?}");
                    }
                    Err(_) => refused += 1,
                }
            }
            if let Ok(m) = pb::CoordinatorMessage::decode(&bytes[..]) {
                match CoordinatorMessage::try_from(m) {
                    Ok(c) => {
                        let again =
                            CoordinatorMessage::try_from(pb::CoordinatorMessage::from(c.clone()));
                        assert_eq!(again.as_ref(), Ok(&c), "{bytes:?}");
                    }
                    Err(_) => refused += 1,
                }
            }
        }
        assert!(
            refused > 0,
            "no garbage input reached the model's validation"
        );
    }
}
