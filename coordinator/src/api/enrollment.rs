//! The Enrollment service: the group CA for first contact, and enrolment by one-time join
//! token (the token is consumed and the member recorded off the async workers).

use lifeboat_proto::pb;
use lifeboat_store::VmId;
use tonic::{Request, Response, Status};

use super::{Services, detached, peer_addr};
use crate::tokens::{self, TokenError};

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for Services {
    async fn get_ca(
        &self,
        _: Request<pb::GetCaRequest>,
    ) -> Result<Response<pb::GetCaResponse>, Status> {
        Ok(Response::new(pb::GetCaResponse {
            ca_pem: self.ca.ca_pem.clone(),
        }))
    }

    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let peer = peer_addr(&req);
        let r = req.into_inner();
        let vm = VmId::new(r.vm.clone())
            .map_err(|e| Status::invalid_argument(format!("EnrollRequest.vm: {e}")))?;
        self.group.may_join(&vm).await?;
        // From the token on, one step: a client gone mid-way must not leave its token used
        // and the VM not a member.
        let (group, ca, days) = (self.group.clone(), self.ca.clone(), self.certificate_days());
        let (who, peer2) = (vm.clone(), peer.clone());
        let cert = detached(async move {
            let state_dir = group.config.state_dir.clone();
            let (token, v) = (r.token.clone(), who.clone());
            // A rename and an fsync: off the async workers.
            let consumed =
                tokio::task::spawn_blocking(move || tokens::consume(&state_dir, &token, &v))
                    .await
                    .map_err(|e| Status::internal(format!("the token check failed: {e}")))?;
            if let Err(e) = consumed {
                tracing::warn!(peer = %peer2, vm = %who, error = %e, detail = ?e, "enrolment refused");
                return Err(match e {
                    TokenError::Invalid(_) => Status::unauthenticated(e.to_string()),
                    TokenError::WrongVm { .. } => Status::permission_denied(e.to_string()),
                });
            }
            let cert = ca.sign_agent(&r.csr_pem, &who, days).map_err(|e| {
                tracing::warn!(peer = %peer2, vm = %who, error = %e, "enrolment refused");
                Status::invalid_argument(format!("EnrollRequest.csr_pem: {e:#}"))
            })?;
            let der = lifeboat_proto::tls::certs("signed certificate", &cert)
                .map_err(|e| Status::internal(e.to_string()))?;
            group
                .join(&who, &lifeboat_proto::tls::fingerprint(&der[0]))
                .await?;
            Ok::<_, Status>(cert)
        })
        .await??;
        tracing::info!(%peer, %vm, "agent enrolled");
        Ok(Response::new(pb::EnrollResponse {
            certificate_pem: cert,
            ca_pem: self.ca.ca_pem.clone(),
            group: self.group.id.to_string(),
        }))
    }
}
