//! Serving port 20004: our own TLS accept loop (`listener`: refused handshakes logged with the
//! peer, separate pools for connections with and without a client certificate, timers for idle
//! ones), then tonic with the Enrollment, Session and Admin services plus standard health checking
//! and reflection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use lifeboat_proto::model::{AgentMessage, CoordinatorMessage};
use lifeboat_proto::pb;
use lifeboat_proto::tls::ADMIN_PREFIX;
use lifeboat_store::VmId;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::group::{self, CutError, Group};
use crate::listener::{self, Limits};
use crate::pki::{self, Ca};
use crate::tokens::{self, TokenError};

fn server_tls(state_dir: &std::path::Path) -> Result<rustls::ServerConfig> {
    let (chain, key) = pki::server_identity(state_dir)?;
    let ca = Ca::load(state_dir)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in lifeboat_proto::tls::certs("CA", &ca.ca_pem)? {
        roots.add(c)?;
    }
    // Client certificates are optional at the TLS layer (enrolment, health and reflection need
    // none); any certificate presented must chain to the group CA, and each service checks that
    // the one it needs is there.
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        lifeboat_proto::tls::provider(),
    )
    .allow_unauthenticated()
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(lifeboat_proto::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            lifeboat_proto::tls::certs("server certificate", &chain)?,
            lifeboat_proto::tls::key("server key", &key)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The start of every message of prost's decode errors, which tonic turns into INTERNAL.
const UNDECODABLE: &str = "failed to decode Protobuf message";

/// A payload that is not a valid encoding of the request message is the caller's error:
/// INVALID_ARGUMENT (as `coordinator.proto` promises), with prost's words on what was wrong,
/// instead of the INTERNAL tonic's codec answers.
fn invalid_payload(s: &Status) -> Option<Status> {
    (s.code() == tonic::Code::Internal && s.message().starts_with(UNDECODABLE))
        .then(|| Status::invalid_argument(s.message()))
}

/// Rewrites the status of a response that failed on an undecodable request (a tonic codec
/// error ends a call with its status in the headers, before any message).
fn undecodable_is_invalid<B>(mut res: http::Response<B>) -> http::Response<B> {
    if let Some(s) = Status::from_header_map(res.headers()).and_then(|s| invalid_payload(&s)) {
        let _ = s.add_header(res.headers_mut());
    }
    res
}

/// The common name of the verified client certificate, if one was presented.
fn peer_name<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

/// SHA-256 of the client certificate, the form `members.json` records.
fn peer_fingerprint<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    Some(lifeboat_proto::tls::fingerprint(certs.first()?))
}

fn peer_addr<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".into())
}

fn require_admin<T>(req: &Request<T>) -> Result<String, Status> {
    match peer_name(req) {
        Some(n) if n.starts_with(ADMIN_PREFIX) => Ok(n),
        Some(n) => {
            tracing::warn!(peer = %peer_addr(req), cert = %n, "admin call refused: not an admin certificate");
            Err(Status::permission_denied(format!(
                "certificate {n:?} is not an admin certificate"
            )))
        }
        None => Err(Status::unauthenticated(
            "an admin client certificate is required (see the coordinator's admin/ directory)",
        )),
    }
}

#[derive(Debug, Clone)]
struct Services {
    group: Arc<Group>,
    ca: Arc<Ca>,
    /// Present when the coordinator processes into a target store.
    processing: Option<Arc<Mutex<lifeboat_dr::process::Status>>>,
}

impl Services {
    /// The configured agent certificate lifetime, in whole days.
    fn certificate_days(&self) -> i64 {
        (self.group.config.agent_certificate_lifetime.as_secs() / 86_400) as i64
    }
}

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
        self.group.may_join(&vm)?;
        let state_dir = self.group.config.state_dir.clone();
        if let Err(e) = tokens::consume(&state_dir, &r.token, &vm) {
            tracing::warn!(%peer, %vm, error = %e, detail = ?e, "enrolment refused");
            return Err(match e {
                TokenError::Invalid(_) => Status::unauthenticated(e.to_string()),
                TokenError::WrongVm { .. } => Status::permission_denied(e.to_string()),
            });
        }
        let cert = self
            .ca
            .sign_agent(&r.csr_pem, &vm, self.certificate_days())
            .map_err(|e| {
                tracing::warn!(%peer, %vm, error = %e, "enrolment refused");
                Status::invalid_argument(format!("EnrollRequest.csr_pem: {e:#}"))
            })?;
        let der = lifeboat_proto::tls::certs("signed certificate", &cert)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.group
            .join(&vm, &lifeboat_proto::tls::fingerprint(&der[0]))
            .map_err(|e| Status::internal(format!("cannot record the member: {e:#}")))?;
        tracing::info!(%peer, %vm, "agent enrolled");
        Ok(Response::new(pb::EnrollResponse {
            certificate_pem: cert,
            ca_pem: self.ca.ca_pem.clone(),
            group: self.group.id.to_string(),
        }))
    }
}

type SessionStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

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
        let _ = tx.send(Ok(registered.into())).await;
        // The group holds the only strong sender: when it drops the session (replaced, member
        // removed, certificate renewed) the agent's stream ends and it reconnects.
        let weak = tx.downgrade();
        let session = self.group.attach(reg, &certificate, tx).inspect_err(
            |e| tracing::warn!(%peer, vm = %cert_vm, "session refused: {}", e.message()),
        )?;
        let tx = weak;
        let group = self.group.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => match AgentMessage::try_from(m) {
                        Ok(AgentMessage::Heartbeat(h)) => group.heartbeat(&cert_vm, session, h),
                        Ok(AgentMessage::CutAck(a)) => group.ack(&cert_vm, a),
                        Ok(AgentMessage::Register(_)) => {
                            if let Some(tx) = tx.upgrade() {
                                let _ = tx
                                    .send(Err(Status::invalid_argument("Register sent twice")))
                                    .await;
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(vm = %cert_vm, error = %e, "malformed message; closing the session");
                            if let Some(tx) = tx.upgrade() {
                                let _ = tx.send(Err(e.into())).await;
                            }
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(e) = invalid_payload(&e) {
                            tracing::warn!(vm = %cert_vm, error = %e.message(), "undecodable message; closing the session");
                            if let Some(tx) = tx.upgrade() {
                                let _ = tx.send(Err(e)).await;
                            }
                        } else {
                            tracing::debug!(vm = %cert_vm, error = %e, "session stream error");
                        }
                        break;
                    }
                }
            }
            group.detach(&cert_vm, session);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
            .inspect_err(|e| tracing::warn!(%peer, %vm, "renewal refused: {}", e.message()))?;
        let cert = self
            .ca
            .sign_agent(&req.into_inner().csr_pem, &vm, self.certificate_days())
            .map_err(|e| Status::invalid_argument(format!("RenewRequest.csr_pem: {e:#}")))?;
        let der = lifeboat_proto::tls::certs("signed certificate", &cert)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.group
            .renewed(&vm, &old, &lifeboat_proto::tls::fingerprint(&der[0]))?;
        tracing::info!(%peer, %vm, "agent certificate renewed; the previous one is no longer accepted");
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: cert,
        }))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Services {
    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let who = require_admin(&req)?;
        let kind =
            lifeboat_proto::model::cut_kind_from_wire("SnapshotRequest.kind", req.get_ref().kind)?;
        tracing::info!(admin = %who, ?kind, "on-demand snapshot");
        // The cut is the group's, not this request's: it runs to its end (a point, or an
        // Abort to every member) even when the client disconnects or times out meanwhile.
        let group = self.group.clone();
        let cut = tokio::spawn(async move { group.cut(kind).await });
        let p = cut
            .await
            .map_err(|e| Status::internal(format!("the cut task failed: {e}")))?
            .map_err(|e| match e {
                CutError::NoMembers | CutError::NoneCovered(_) => {
                    Status::failed_precondition(e.to_string())
                }
                CutError::Publish(_) => Status::internal(e.to_string()),
            })?;
        Ok(Response::new(pb::SnapshotResponse {
            point_id: p.point.id.to_string(),
            time_ms: p.point.time,
            consistency: lifeboat_proto::model::consistency_to_wire(p.consistency),
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
        }))
    }

    async fn members(
        &self,
        req: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        require_admin(&req)?;
        Ok(Response::new(pb::MembersResponse {
            group: self.group.id.to_string(),
            members: self.group.members(),
            processing: self.processing.as_ref().map(|s| {
                let s = s.lock().unwrap().clone();
                pb::ProcessingStatus {
                    latest_processed_point: s
                        .latest_processed
                        .as_ref()
                        .map(|p| p.0.to_string())
                        .unwrap_or_default(),
                    latest_processed_time_ms: s.latest_processed.map_or(0, |p| p.1),
                    last_pass_ms: s.last_pass_ms.unwrap_or(0),
                    last_error: s.last_error.unwrap_or_default(),
                }
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
        self.group.remove(&vm)?;
        Ok(Response::new(pb::RemoveMemberResponse {}))
    }
}

/// How long a stopping coordinator lets in-flight calls finish before closing the connections
/// left (agents' session streams never finish by themselves).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The file in the state directory where a serving coordinator records the address it listens
/// on (`host:port` and a newline), written once it listens.
pub const ADDRESS_FILE: &str = "address";

/// Serves until `shutdown` resolves (then at most [`SHUTDOWN_GRACE`] longer). `ready` receives
/// the bound address (port 0 in tests).
pub async fn serve(
    config: crate::config::Config,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let tls = server_tls(&config.state_dir)?;
    let ca = Arc::new(Ca::load(&config.state_dir)?);
    let limits = Limits::for_members(config.max_members);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let processing = match &config.target {
        Some(t) => Some(lifeboat_dr::process::Processor::new(
            config.group.clone(),
            config
                .store
                .open()
                .await
                .context("cannot open the cache store")?,
            t.open().await.context("cannot open the target store")?,
        )),
        None => None,
    };
    let processing_interval = config.processing_interval;
    let scrub_interval = config.scrub_interval;
    let scrub_mark = config.state_dir.join("scrub.last");
    let retention = config.policy.retention;
    let group = Arc::new(Group::open(config).await?);
    tracing::info!(%addr, group = %group.id, ca = %ca.fingerprint, "coordinator serving");
    if let Some(r) = ready {
        let _ = r.send(addr);
    }

    let (conn_tx, conn_rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let accept = tokio::spawn(listener::accept_loop(listener, acceptor, limits, conn_tx));
    let health_task = {
        let g = group.clone();
        tokio::spawn(async move { g.watch_health().await })
    };
    let status = processing
        .as_ref()
        .map(|_| Arc::new(Mutex::new(lifeboat_dr::process::Status::default())));
    let process_task = processing.map(|p| {
        let group = group.clone();
        let status = status.clone().expect("made with the processor");
        tokio::spawn(async move {
            // Due one interval after the last scrub (its end is recorded in the state
            // directory), so restarts neither skip it nor repeat it; on a first start, one
            // interval from now.
            let mut next_scrub = if scrub_interval.is_zero() {
                None
            } else {
                let mark = scrub_mark.clone();
                let last = tokio::task::spawn_blocking(move || read_scrub_mark(&mark))
                    .await
                    .ok()
                    .flatten();
                let now_ms = lifeboat_store::manifest::now_millis();
                let last = match last {
                    Some(ms) if ms <= now_ms => ms,
                    _ => {
                        let mark = scrub_mark.clone();
                        let _ = tokio::task::spawn_blocking(move || write_scrub_mark(&mark, now_ms)).await;
                        now_ms
                    }
                };
                let since = std::time::Duration::from_millis(now_ms - last);
                Some(tokio::time::Instant::now() + scrub_interval.saturating_sub(since))
            };
            // A scrub reads the whole target store and may take hours: it runs beside the
            // passes (which only add objects), never beside retention (which deletes them: they
            // would read as missing), so retention waits for it.
            let scrub_lock = Arc::new(tokio::sync::Mutex::new(()));
            let mut scrub_task: Option<tokio::task::JoinHandle<()>> = None;
            let mut scrub_retry: Option<tokio::sync::oneshot::Receiver<bool>> = None;
            // What the last scrub found damaged, shown with every round's status until the next.
            let scrub_finding: Arc<Mutex<Option<String>>> = Arc::default();
            loop {
                let mut error = None;
                match p.pass().await {
                    Ok(pass) => {
                        status.lock().unwrap().latest_processed = pass.latest_processed.clone();
                        // Each was logged by the pass; the status shows the first to admins.
                        if let Some((id, why)) = pass.quarantined.first() {
                            error = Some(format!(
                                "processing: {} point(s) quarantined, first {id}: {why}",
                                pass.quarantined.len()
                            ));
                        }
                        let rpo = pass.rpo_ms.values().max().copied().unwrap_or(0);
                        if !pass.points.is_empty() {
                            tracing::info!(
                                points = pass.points.len(),
                                segments = pass.segments,
                                bytes = pass.bytes,
                                took = ?pass.elapsed,
                                latest_processed = ?pass.latest_processed.as_ref().map(|p| p.0.to_string()),
                                worst_rpo_s = rpo / 1000,
                                "processed points into the target store"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "processing failed; retrying next interval");
                        error = Some(format!("processing: {e:#}"));
                    }
                }
                {
                    let _no_cuts = group.pause_cuts().await;
                    match p.trim_cache().await {
                        Ok(t) if t.segments > 0 || t.points > 0 => tracing::info!(
                            points = t.points,
                            tags = t.tags,
                            segments = t.segments,
                            bytes = t.bytes,
                            "processed data removed from the cache store"
                        ),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "trimming the cache store failed; retrying next interval");
                            error = error.or(Some(format!("trimming the cache: {e:#}")));
                        }
                    }
                }
                let pruned = match scrub_lock.try_lock() {
                    Ok(_no_scrub) => {
                        p.prune(retention, lifeboat_store::manifest::now_millis())
                            .await
                    }
                    Err(_) => {
                        tracing::debug!("a scrub is running; retention waits for it");
                        Ok(Default::default())
                    }
                };
                if let Ok(r) = &pruned {
                    // Retention went on around them; they stay for an operator to look at.
                    for d in &r.damaged {
                        tracing::warn!(error = %d, "unreadable point in the target store left in place");
                    }
                }
                match pruned {
                    Ok(r) if !r.points.is_empty() || r.segments > 0 || r.orphan_parts > 0 => tracing::info!(
                        expired = r.points.len(),
                        tags = r.tags,
                        segments = r.segments,
                        orphan_parts = r.orphan_parts,
                        kept = r.kept,
                        "retention applied to the target store"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "pruning failed; retrying next interval");
                        error = error.or(Some(format!("retention: {e:#}")));
                    }
                }
                if let Some(due) = next_scrub
                    && tokio::time::Instant::now() >= due
                    && scrub_task.as_ref().is_none_or(|t| t.is_finished())
                {
                    // Taken before the task starts: no prune slips in between.
                    let no_prune = scrub_lock.clone().lock_owned().await;
                    let (p, finding, mark) = (p.clone(), scrub_finding.clone(), scrub_mark.clone());
                    let (retry_tx, retry) = tokio::sync::oneshot::channel();
                    scrub_retry = Some(retry);
                    next_scrub = None;
                    scrub_task = Some(tokio::spawn(async move {
                        let _no_prune = no_prune;
                        match p.scrub().await {
                            Ok(s) => {
                                tracing::info!(
                                    objects = s.objects,
                                    bytes = s.bytes,
                                    damaged_points = s.damaged.len(),
                                    cleared = s.cleared,
                                    resyncs = s.resyncs.len(),
                                    took = ?s.elapsed,
                                    "scrubbed the target store"
                                );
                                *finding.lock().unwrap() = s.damaged.first().map(|(id, why)| {
                                    format!(
                                        "scrub: {} point(s) damaged, first {id}: {why}",
                                        s.damaged.len()
                                    )
                                });
                                let now = lifeboat_store::manifest::now_millis();
                                let _ = tokio::task::spawn_blocking(move || write_scrub_mark(&mark, now)).await;
                                let _ = retry_tx.send(false);
                            }
                            Err(e) => {
                                tracing::error!(error = %format!("{e:#}"), "scrubbing the target store failed; retrying in an hour");
                                *finding.lock().unwrap() = Some(format!("scrub: {e:#}"));
                                let _ = retry_tx.send(true);
                            }
                        }
                    }));
                }
                // The next scrub: an interval after one that finished, an hour after one that
                // failed.
                if let Some(rx) = &mut scrub_retry
                    && let Ok(failed) = rx.try_recv()
                {
                    scrub_retry = None;
                    let after = if failed {
                        SCRUB_RETRY.min(scrub_interval)
                    } else {
                        scrub_interval
                    };
                    next_scrub = Some(tokio::time::Instant::now() + after);
                }
                if let Some(f) = scrub_finding.lock().unwrap().clone() {
                    error = error.or(Some(f));
                }
                {
                    let mut s = status.lock().unwrap();
                    s.last_pass_ms = Some(lifeboat_store::manifest::now_millis());
                    s.last_error = error;
                }
                tokio::time::sleep(processing_interval).await;
            }
        })
    });
    let schedule_task = {
        let g = group.clone();
        tokio::spawn(async move { g.schedule().await })
    };

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::session_server::SessionServer<Services>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lifeboat_proto::DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let services = Services {
        group,
        ca,
        processing: status,
    };
    // A graceful shutdown alone would wait for every agent's session stream, which never ends
    // by itself: a stop would last until the service manager's SIGKILL. In-flight calls get
    // SHUTDOWN_GRACE after the signal; then the remaining connections are dropped (agents
    // reconnect; a cut in progress is covered by each member's own freeze watchdog).
    let (signalled, stop_signalled) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled.send(());
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(Duration::from_secs(4)))
        .tcp_nodelay(true)
        .layer(listener::Track)
        .layer(tower::util::MapResponseLayer::new(undecodable_is_invalid))
        .add_service(health)
        .add_service(reflection)
        .add_service(pb::enrollment_server::EnrollmentServer::new(
            services.clone(),
        ))
        .add_service(pb::session_server::SessionServer::new(services.clone()))
        .add_service(pb::admin_server::AdminServer::new(services))
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), shutdown);
    let result = tokio::select! {
        r = server => r,
        () = async {
            if stop_signalled.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "sessions still open after the grace period: closed");
            Ok(())
        }
    };
    accept.abort();
    health_task.abort();
    schedule_task.abort();
    if let Some(t) = process_task {
        t.abort();
    }
    result.context("gRPC server failed")
}

/// How soon a failed scrub is tried again.
const SCRUB_RETRY: std::time::Duration = std::time::Duration::from_secs(3600);

/// When the last scrub ended (Unix ms), from the coordinator's state directory.
fn read_scrub_mark(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn write_scrub_mark(path: &std::path::Path, ms: u64) {
    if let Err(e) = lifeboat_store::durable::replace(path, format!("{ms}\n").as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record when the scrub ran");
    }
}
