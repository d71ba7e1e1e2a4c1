//! Serving a group: port 20004 bound and accepted by our own TLS loop (`listener`), the gRPC
//! surface (`api`) on it, and the coordinator's owned tasks (the cut scheduler, the processing
//! loop, the member health watch, the job history writer) — started here, and stopped here in
//! order: on shutdown no new job starts, running jobs drain while the sessions they need still
//! serve, then in-flight calls get a short grace.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::group::Group;
use crate::hub::Hub;
use crate::jobs::Jobs;
use crate::listener::{self, Limits};
use crate::pki::{self, Ca};

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

/// How long a stopping coordinator lets running jobs (a cut, a pass) end by themselves before
/// it cancels them, and how long it then waits for the cancelled ones.
const DRAIN: Duration = Duration::from_secs(30);
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long in-flight calls get once jobs are drained, before the connections left are closed
/// (agents' session streams never finish by themselves; they reconnect to the next coordinator).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The file in the state directory where a serving coordinator records the address it listens
/// on (`host:port` and a newline), written once it listens.
pub const ADDRESS_FILE: &str = "address";

/// Serves until `shutdown` resolves, then stops as the module says. `ready` receives the bound
/// address (port 0 in tests).
pub async fn serve(
    config: crate::config::Config,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let state_dir = config.state_dir.clone();
    let (tls, ca, jobs) = {
        let dir = state_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            Ok((server_tls(&dir)?, Ca::load(&dir)?, Jobs::load(&dir)?))
        })
        .await??
    };
    let ca = Arc::new(ca);
    let limits = Limits::for_members(config.max_members);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let processor = match &config.target {
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
    let plan = crate::work::ProcessingPlan {
        interval: config.processing_interval,
        scrub_interval: config.scrub_interval,
        scrub_mark: state_dir.join("scrub.last"),
        retention: config.policy.retention,
    };
    let hub = Arc::new(Hub::new(processor.is_some()));
    let group = Arc::new(Group::open(config).await?);
    tracing::info!(%addr, group = %group.id, ca = %ca.fingerprint, "coordinator serving");
    if let Some(r) = ready {
        let _ = r.send(addr);
    }

    // Owned tasks. `stop` ends the loops (they start no new job); the history writer has its
    // own token so it records the drained jobs last.
    let stop = CancellationToken::new();
    let stop_history = CancellationToken::new();
    let history = tokio::spawn(jobs.clone().write_history(state_dir, stop_history.clone()));
    let (conn_tx, conn_rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let accept = tokio::spawn(listener::accept_loop(listener, acceptor, limits, conn_tx));
    let health_task = {
        let g = group.clone();
        tokio::spawn(async move { g.watch_health().await })
    };
    let process_task = processor.map(|p| {
        tokio::spawn(crate::work::process_loop(
            p,
            group.clone(),
            jobs.clone(),
            hub.clone(),
            plan,
            stop.clone(),
        ))
    });
    let schedule_task = tokio::spawn(crate::work::schedule(
        group.clone(),
        jobs.clone(),
        stop.clone(),
    ));

    let services = crate::api::Services {
        group,
        ca,
        jobs: jobs.clone(),
        hub,
    };
    let (close, closing) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(crate::api::serve(services, conn_rx, async move {
        let _ = closing.await;
    }));
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut server => r.context("the gRPC server task failed")?.context("gRPC server failed"),
        () = &mut shutdown => {
            // Cuts need the members' sessions: the API keeps serving while jobs drain.
            stop.cancel();
            jobs.drain(DRAIN, DRAIN_GRACE).await;
            let _ = close.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r.context("the gRPC server task failed")?.context("gRPC server failed"),
                Err(_) => {
                    tracing::info!(grace = ?SHUTDOWN_GRACE, "sessions still open after the grace period: closed");
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    stop.cancel();
    accept.abort();
    health_task.abort();
    // Both loops saw `stop` and their jobs are drained: they end at once.
    let _ = tokio::time::timeout(DRAIN_GRACE, schedule_task).await;
    if let Some(t) = process_task {
        let _ = tokio::time::timeout(DRAIN_GRACE, t).await;
    }
    stop_history.cancel();
    let _ = history.await;
    result
}
