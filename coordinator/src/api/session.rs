//! The Session service: an agent's one long-lived stream (Register, then heartbeats and cut
//! acks in; cut commands out), and certificate renewal. Messages are validated into `model`
//! types here; the group sees only those.

use futures::StreamExt;
use lifeboat_proto::model::{AgentMessage, CoordinatorMessage};
use lifeboat_proto::pb;
use lifeboat_store::VmId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Services, detached, invalid_payload, peer_addr, peer_fingerprint, peer_name};
use crate::group::{self, Violation};

type SessionStream = futures::stream::BoxStream<'static, Result<pb::CoordinatorMessage, Status>>;

#[tonic::async_trait]
impl pb::session_server::Session for Services {
    type OpenStream = SessionStream;

    async fn open(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let peer = peer_addr(&req);
        let name = peer_name(&req).ok_or_else(|| {
            tracing::warn!(%peer, "session refused: no client certificate");
            Status::unauthenticated(
                "a client certificate is required; enrol first with `lifeboat-agent enroll`",
            )
        })?;
        let cert_vm = VmId::new(name.clone()).map_err(|_| {
            Status::permission_denied(format!("certificate {name:?} is not an agent certificate"))
        })?;
        let certificate = peer_fingerprint(&req).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(group::REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register message within 10 s"))??
            .ok_or_else(|| Status::cancelled("stream closed before Register"))?;
        let reg = match AgentMessage::try_from(first) {
            Ok(AgentMessage::Register(r)) => r,
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Register",
                ));
            }
            Err(e) => {
                tracing::warn!(%peer, vm = %cert_vm, error = %e, "malformed Register refused");
                return Err(e.into());
            }
        };
        if reg.vm != cert_vm {
            tracing::warn!(%peer, cert = %cert_vm, claimed = %reg.vm, "session refused: agent claimed another VM's id");
            return Err(Status::permission_denied(format!(
                "this certificate is for VM {cert_vm}; it cannot register as {}",
                reg.vm
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let registered = CoordinatorMessage::Registered {
            group: self.group.id.clone(),
            heartbeat_interval: self.group.config.heartbeat_interval,
        };
        let _ = tx.send(Ok(registered)).await;
        // The group holds the only strong sender: when it drops the session (replaced, member
        // removed, certificate renewed) the agent's stream ends and it reconnects.
        let weak = tx.downgrade();
        let group = self.group.clone();
        // Attaching (which may save the member list) and the session's life are one task: a
        // client gone while it attaches still ends in `detach`, when its stream ends.
        let (attached_tx, attached) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let session = match group.attach(reg, &certificate, tx).await {
                Ok(s) => {
                    let _ = attached_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    tracing::warn!(%peer, vm = %cert_vm, "session refused: {e}");
                    let _ = attached_tx.send(Err(e));
                    return;
                }
            };
            let tx = weak;
            let violation = |why: String| {
                let tx = tx.clone();
                async move {
                    if let Some(tx) = tx.upgrade() {
                        let _ = tx.send(Err(Violation(why))).await;
                    }
                }
            };
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => match AgentMessage::try_from(m) {
                        Ok(AgentMessage::Heartbeat(h)) => group.heartbeat(&cert_vm, session, h),
                        Ok(AgentMessage::CutAck(a)) => group.ack(&cert_vm, a),
                        Ok(AgentMessage::Register(_)) => {
                            violation("Register sent twice".into()).await;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(vm = %cert_vm, error = %e, "malformed message; closing the session");
                            violation(e.to_string()).await;
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(e) = invalid_payload(&e) {
                            tracing::warn!(vm = %cert_vm, error = %e.message(), "undecodable message; closing the session");
                            violation(e.message().to_string()).await;
                        } else {
                            tracing::debug!(vm = %cert_vm, error = %e, "session stream error");
                        }
                        break;
                    }
                }
            }
            group.detach(&cert_vm, session);
        });
        attached
            .await
            .map_err(|_| Status::internal("the session's task failed"))??;
        let out = ReceiverStream::new(rx).map(|m| match m {
            Ok(m) => Ok(pb::CoordinatorMessage::from(m)),
            Err(Violation(why)) => Err(Status::invalid_argument(why)),
        });
        Ok(Response::new(out.boxed()))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let peer = peer_addr(&req);
        let (Some(name), Some(old)) = (peer_name(&req), peer_fingerprint(&req)) else {
            tracing::warn!(%peer, "renewal refused: no client certificate");
            return Err(Status::unauthenticated(
                "a client certificate is required to renew it",
            ));
        };
        let vm = VmId::new(name.clone()).map_err(|_| {
            Status::permission_denied(format!("certificate {name:?} is not an agent certificate"))
        })?;
        self.group
            .may_renew(&vm, &old)
            .await
            .inspect_err(|e| tracing::warn!(%peer, %vm, "renewal refused: {e}"))?;
        let cert = self
            .ca
            .sign_agent(&req.into_inner().csr_pem, &vm, self.certificate_days())
            .map_err(|e| Status::invalid_argument(format!("RenewRequest.csr_pem: {e:#}")))?;
        let der = lifeboat_proto::tls::certs("signed certificate", &cert)
            .map_err(|e| Status::internal(e.to_string()))?;
        let (group, new) = (
            self.group.clone(),
            lifeboat_proto::tls::fingerprint(&der[0]),
        );
        let v = vm.clone();
        detached(async move { group.renewed(&v, &old, &new).await }).await??;
        tracing::info!(%peer, %vm, "agent certificate renewed; the previous one is no longer accepted");
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: cert,
        }))
    }
}
