//! The Admin service (admin certificates only): on-demand snapshots (each a job), the
//! members' status with processing's figures, member removal, and the jobs.

use lifeboat_proto::model::{consistency_to_wire, cut_kind_from_wire, stats_to_wire};
use lifeboat_proto::pb;
use lifeboat_store::VmId;
use tonic::{Request, Response, Status};

use super::{Services, detached, require_admin};
use crate::group::CutError;
use crate::jobs::{CancelError, JobRecord, JobState};

#[tonic::async_trait]
impl pb::admin_server::Admin for Services {
    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let who = require_admin(&req)?;
        let kind = cut_kind_from_wire("SnapshotRequest.kind", req.get_ref().kind)?;
        tracing::info!(admin = %who, ?kind, "on-demand snapshot");
        // The cut is a job of the group's, not this request's: it runs to its end (a point, or
        // an Abort to every member) even when the client disconnects or times out meanwhile.
        let (job, cut) = crate::work::start_cut(&self.group, &self.jobs, kind, &who)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let p = cut
            .await
            .map_err(|e| Status::internal(format!("the cut task failed: {e}")))?
            .ok_or_else(|| Status::cancelled(format!("job {job} was cancelled")))?
            .map_err(|e| match e {
                CutError::NoMembers | CutError::NoneCovered(_) => {
                    Status::failed_precondition(e.to_string())
                }
                CutError::Publish(_) => Status::internal(e.to_string()),
                CutError::Cancelled => Status::cancelled(format!("job {job} was cancelled")),
            })?;
        Ok(Response::new(pb::SnapshotResponse {
            point_id: p.point.id.to_string(),
            time_ms: p.point.time,
            consistency: consistency_to_wire(p.consistency),
            covered: p.point.members.iter().map(|m| m.vm.to_string()).collect(),
            excluded: p
                .point
                .excluded
                .iter()
                .map(|e| pb::Excluded {
                    vm: e.vm.to_string(),
                    reason: e.reason.clone(),
                })
                .collect(),
            job_id: job,
        }))
    }

    async fn members(
        &self,
        req: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        require_admin(&req)?;
        let members = self
            .group
            .members()
            .into_iter()
            .map(|m| {
                let reg = m.registered.map(pb::Register::from);
                pb::MemberStatus {
                    vm: m.vm.to_string(),
                    connected: m.connected,
                    healthy: m.healthy,
                    last_seen_ms: m.last_seen_ms,
                    facts: reg.as_ref().and_then(|r| r.facts.clone()),
                    disks: reg.map(|r| r.disks).unwrap_or_default(),
                    stats: m
                        .stats
                        .into_iter()
                        .map(|(d, s)| stats_to_wire(d, s))
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(pb::MembersResponse {
            group: self.group.id.to_string(),
            members,
            processing: self.hub.processing().map(|s| pb::ProcessingStatus {
                latest_processed_point: s
                    .latest_processed
                    .as_ref()
                    .map(|p| p.0.to_string())
                    .unwrap_or_default(),
                latest_processed_time_ms: s.latest_processed.map_or(0, |p| p.1),
                last_pass_ms: s.last_pass_ms.unwrap_or(0),
                last_error: s.last_error.unwrap_or_default(),
            }),
        }))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let who = require_admin(&req)?;
        let vm = VmId::new(req.into_inner().vm)
            .map_err(|e| Status::invalid_argument(format!("RemoveMemberRequest.vm: {e}")))?;
        tracing::info!(admin = %who, %vm, "removing member");
        let group = self.group.clone();
        let v = vm.clone();
        detached(async move { group.remove(&v).await }).await??;
        Ok(Response::new(pb::RemoveMemberResponse {}))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        require_admin(&req)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self.jobs.list().into_iter().map(job_to_wire).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let who = require_admin(&req)?;
        let id = req.into_inner().id;
        let job = self.jobs.cancel(id).map_err(|e| match e {
            CancelError::NotFound(_) => Status::not_found(e.to_string()),
            CancelError::Ended(..) => Status::failed_precondition(e.to_string()),
        })?;
        tracing::info!(admin = %who, job = id, kind = %job.kind, "job cancelled");
        Ok(Response::new(pb::CancelJobResponse {}))
    }
}

fn job_to_wire(j: JobRecord) -> pb::Job {
    pb::Job {
        id: j.id,
        kind: j.kind.to_string(),
        state: match j.state {
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        requested_by: j.requested_by,
        started_ms: j.started_ms,
        ended_ms: j.ended_ms,
        progress: j.progress,
        outcome: j.outcome,
    }
}
