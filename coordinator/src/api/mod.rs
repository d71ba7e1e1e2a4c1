//! The gRPC surface of port 20004: the only code of the coordinator that touches the wire
//! types (`pb`) and `tonic::Status`. It authenticates the caller (client certificates), turns
//! requests into domain calls on the [`Group`], the [`Jobs`] and the [`Hub`], and their
//! answers and errors back into wire messages and status codes. Everything below it speaks
//! domain types only.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

mod admin;
mod enrollment;
mod session;

use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::pb;
use lifeboat_proto::tls::ADMIN_PREFIX;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use crate::group::{Group, GroupError};
use crate::hub::Hub;
use crate::jobs::Jobs;
use crate::listener::{self, Conn};
use crate::pki::Ca;

/// What every service of the API reaches.
#[derive(Debug, Clone)]
pub struct Services {
    pub group: Arc<Group>,
    pub ca: Arc<Ca>,
    pub jobs: Arc<Jobs>,
    pub hub: Arc<Hub>,
}

impl Services {
    /// The configured agent certificate lifetime, in whole days.
    fn certificate_days(&self) -> i64 {
        (self.group.config.agent_certificate_lifetime.as_secs() / 86_400) as i64
    }
}

impl From<GroupError> for Status {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::Full(m) => Status::resource_exhausted(m),
            GroupError::NotFound(m) => Status::not_found(m),
            GroupError::Denied(m) => Status::permission_denied(m),
            GroupError::Storage(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// Serves the Enrollment, Session and Admin services, health checking and reflection on the
/// connections the listener admits, until `shutdown` resolves; then lets in-flight calls end
/// (the caller bounds how long: agents' session streams never end by themselves).
pub async fn serve(
    services: Services,
    incoming: tokio::sync::mpsc::Receiver<Result<Conn, std::io::Error>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::session_server::SessionServer<Services>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lifeboat_proto::DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tonic::transport::Server::builder()
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
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
        .await?;
    Ok(())
}

/// Runs `work` in a task of its own and waits for it. tonic drops a handler's future when its
/// client disconnects or its deadline passes; a change to the group (the member list saved,
/// then applied in memory) must not stop half-way for that, so it runs here.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| Status::internal(format!("the request's task failed: {e}")))
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
