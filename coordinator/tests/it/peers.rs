//! The coordinator against well-behaved and hostile peers, over real TLS on a real port:
//! enrolment with one-time tokens, refused certificates and claims, malformed messages, a flood
//! of connections, strangers trying to fill the listener, undecodable payloads, group size,
//! removal, token lifetimes.

use std::time::Duration;

use lifeboat_proto::enroll::{self, EnrollError};
use lifeboat_proto::model::AgentMessage;
use lifeboat_proto::pb;
use lifeboat_sim::{self as sim, SimMember};
use lifeboat_store::VmId;
use lifeboat_tests::CoordinatorProc;

fn vm(s: &str) -> VmId {
    VmId::new(s).unwrap()
}

fn register(v: &str) -> pb::AgentMessage {
    AgentMessage::Register(sim::register(&vm(v))).into()
}

fn start(dir: &std::path::Path, extra: &str) -> CoordinatorProc {
    CoordinatorProc::serving(dir, "g1", extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_refuses_bad_tokens_certificates_and_claims() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), "max_members = 3");
    let addr = c.addr.clone();

    // A good enrolment, then the same token again.
    let t = c.token(Some("vm1"), "1h");
    let vm1 = enroll::enroll(&addr, &t, "vm1").await.unwrap();
    assert_eq!(vm1.group, "g1");
    let again = enroll::enroll(&addr, &t, "vm1").await.unwrap_err();
    assert!(again.to_string().contains("already used"), "{again}");

    // Expired.
    let t = c.token(None, "1ms");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let e = enroll::enroll(&addr, &t, "vm2").await.unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");

    // Minted for another VM: refused, and consumed.
    let t = c.token(Some("vm2"), "1h");
    let e = enroll::enroll(&addr, &t, "vm3").await.unwrap_err();
    assert!(e.to_string().contains("minted for VM vm2"), "{e}");

    // Malformed, and pinned to another CA: the agent never even talks.
    assert!(matches!(
        enroll::enroll(&addr, "lifeboat1:nope", "vm2").await,
        Err(EnrollError::Token)
    ));
    let t = c.token(None, "1h");
    let forged = format!("{}{}", &t[..t.len() - 64], "0".repeat(64));
    let e = enroll::enroll(&addr, &forged, "vm2").await.unwrap_err();
    assert!(
        lifeboat_proto::tls::error_chain(&e).contains("does not match the fingerprint")
            || e.to_string().contains("does not match"),
        "{e}"
    );
    // ...and that token is still good for its rightful use.
    let vm2 = enroll::enroll(&addr, &t, "vm2").await.unwrap();

    // An id with path characters is refused before anything is written.
    let t = c.token(None, "1h");
    let e = enroll::enroll(&addr, &t, "../etc").await.unwrap_err();
    assert!(e.to_string().contains("invalid"), "{e}");

    // A session without a client certificate.
    let tls = lifeboat_proto::tls::client_config(&vm1.ca_pem, None).unwrap();
    let ch = lifeboat_proto::tls::connect(&addr, tls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(register("vm1")).await.unwrap();
    let e = pb::session_client::SessionClient::new(ch)
        .open(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // vm1's certificate claiming to be vm2.
    let e = SimMember::open(&addr, &vm1, register("vm2"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot register as vm2"), "{e}");

    // A certificate from another group's CA: the handshake is refused and logged.
    let other = tempfile::tempdir().unwrap();
    lifeboat_coordinator::pki::init(other.path(), "other", &[]).unwrap();
    let read = |f: &str| std::fs::read_to_string(other.path().join("admin").join(f)).unwrap();
    let foreign = lifeboat_proto::enroll::Enrolled {
        ca_pem: vm1.ca_pem.clone(),
        cert_pem: read("admin.pem"),
        key_pem: read("admin.key"),
        group: "other".into(),
    };
    // The client sees only a broken transport (an error of the connection, or the call
    // cancelled with it, depending on when the refusal lands); the cause is the coordinator's,
    // in its log.
    let e = SimMember::open(&addr, &foreign, register("vm1"))
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("transport error") || text.contains("operation was canceled"),
        "{text}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !c
        .log_text()
        .contains("refused connection: invalid peer certificate: UnknownIssuer")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the foreign certificate's refusal was not logged:\n{}",
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Plaintext HTTP/2 to the TLS port.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        assert!(r.is_err(), "plaintext must not be served");
    }

    // An agent certificate cannot act as admin.
    let tls = lifeboat_proto::tls::client_config(&vm1.ca_pem, Some((&vm1.cert_pem, &vm1.key_pem)))
        .unwrap();
    let ch = lifeboat_proto::tls::connect(&addr, tls).await.unwrap();
    let e = pb::admin_client::AdminClient::new(ch)
        .snapshot(pb::SnapshotRequest { kind: 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // A malformed message closes that session only; the member can come back.
    let m = SimMember::open(&addr, &vm1, register("vm1")).await.unwrap();
    m.send(pb::AgentMessage { body: None }).await.unwrap();
    let mut m = m;
    let e = m.next().await.unwrap_err();
    assert!(
        e.to_string().contains("AgentMessage.body is missing"),
        "{e}"
    );
    let _vm1_session = SimMember::open(&addr, &vm1, register("vm1")).await.unwrap();

    // Group size: vm1 and vm2 are members, vm3 fills the group, vm4 is refused.
    let t = c.token(None, "1h");
    enroll::enroll(&addr, &t, "vm3").await.unwrap();
    let t = c.token(None, "1h");
    let e = enroll::enroll(&addr, &t, "vm4").await.unwrap_err();
    assert!(e.to_string().contains("is full"), "{e}");

    // Removal: the certificate stops working.
    let out = c.admin(&["remove-member", "--vm", "vm2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = SimMember::open(&addr, &vm2, register("vm2"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("was removed"), "{e}");
    let out = c.admin(&["remove-member", "--vm", "vm9"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "unknown member is a usage error"
    );

    let log = c.log_text();
    for needle in [
        "enrolment refused",
        "agent claimed another VM's id",
        "refused connection",
        "malformed message",
    ] {
        assert!(
            log.contains(needle),
            "coordinator log lacks {needle:?}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_does_not_stop_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), "");
    let addr = c.addr.clone();
    let creds = sim::enroll(&c.state_dir, &addr, &vm("vm1")).await.unwrap();
    let writer = writer(&c);
    sim::write_tag(&writer, &vm("vm1")).await.unwrap();
    let member = SimMember::open(&addr, &creds, register("vm1"))
        .await
        .unwrap();
    let (times, _rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(member.serve(times));

    // 400 idle connections and 100 that send garbage, all from another source address.
    let mut flood = Vec::new();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    for i in 0..500 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(mut s) = sock.connect(([127, 0, 0, 1], port).into()).await {
            if i % 5 == 0 {
                use tokio::io::AsyncWriteExt;
                let _ = s
                    .write_all(b"GET / HTTP/1.1\r\n\r\n\x16\x03\x01garbage")
                    .await;
            }
            flood.push(s);
        }
    }
    // The group keeps working: a new admin connection and a whole cut succeed meanwhile.
    let c = std::sync::Arc::new(c);
    let (id, stderr) = tokio::task::spawn_blocking({
        let c = c.clone();
        move || c.snapshot("g1", false)
    })
    .await
    .unwrap();
    assert!(id.starts_with('c'), "{id}");
    assert!(stderr.contains("covering vm1"), "{stderr}");
    drop(flood);
    assert!(
        c.log_text()
            .contains("too many handshakes in flight from this source")
    );
}

fn writer(c: &CoordinatorProc) -> lifeboat_store::writer::StoreWriter {
    let backend: lifeboat_store::DynBackend =
        std::sync::Arc::new(lifeboat_store::backend::local::LocalBackend::open(&c.store).unwrap());
    lifeboat_store::writer::StoreWriter::new(
        backend,
        lifeboat_store::layout::Layout::new(lifeboat_store::GroupId::new("g1").unwrap()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_replaces_the_certificate_and_the_old_one_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), "agent_certificate_lifetime = \"30days\"");
    let addr = c.addr.clone();
    let t = c.token(Some("vm1"), "1h");
    let old = enroll::enroll(&addr, &t, "vm1").await.unwrap();
    let days_left = |pem: &str| {
        let der = lifeboat_proto::tls::certs("cert", pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        let now = lifeboat_store::manifest::now_millis() as i64 / 1000;
        (cert.validity().not_after.timestamp() - now) as f64 / 86_400.0
    };
    let left = days_left(&old.cert_pem);
    assert!((29.9..=30.1).contains(&left), "{left} days");
    let _first = SimMember::open(&addr, &old, register("vm1")).await.unwrap();

    // An agent that lost the answer to its renewal still gets in with its old certificate and
    // renews again; the first renewed certificate is then worthless.
    let lost = enroll::renew(&addr, &old, "vm1").await.unwrap();
    let mut session = SimMember::open(&addr, &old, register("vm1")).await.unwrap();
    let new = enroll::renew(&addr, &old, "vm1").await.unwrap();
    assert!((29.9..=30.1).contains(&days_left(&new.cert_pem)));
    assert_ne!(new.cert_pem, old.cert_pem);
    assert_ne!(new.key_pem, old.key_pem, "renewal makes a new key pair");
    let e = SimMember::open(&addr, &lost, register("vm1"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("was replaced"), "{e}");
    // The session on the old certificate is closed, so the agent reconnects with the new one.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if session.next().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the old certificate's session stayed open");
    let _s = SimMember::open(&addr, &new, register("vm1")).await.unwrap();
    // Once the renewed certificate is used, the old one is worth nothing: no session, no renewal.
    let e = SimMember::open(&addr, &old, register("vm1"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("was replaced"), "{e}");
    let e = enroll::renew(&addr, &old, "vm1").await.unwrap_err();
    assert!(e.to_string().contains("was replaced"), "{e}");

    // An admin certificate is not an agent's.
    let admin = c.state_dir.join("admin");
    let read = |f: &str| std::fs::read_to_string(admin.join(f)).unwrap();
    let admin = enroll::Enrolled {
        ca_pem: read("ca.pem"),
        cert_pem: read("admin.pem"),
        key_pem: read("admin.key"),
        group: "g1".into(),
    };
    let e = enroll::renew(&addr, &admin, "vm1").await.unwrap_err();
    assert!(e.to_string().contains("not an agent certificate"), "{e}");

    // A removed member cannot renew; enrolled again, its earlier certificate stays refused.
    let out = c.admin(&["remove-member", "--vm", "vm1"]);
    assert!(out.status.success());
    let e = enroll::renew(&addr, &new, "vm1").await.unwrap_err();
    assert!(e.to_string().contains("was removed"), "{e}");
    let t = c.token(Some("vm1"), "1h");
    let again = enroll::enroll(&addr, &t, "vm1").await.unwrap();
    let _s = SimMember::open(&addr, &again, register("vm1"))
        .await
        .unwrap();
    let e = SimMember::open(&addr, &new, register("vm1"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("was replaced"), "{e}");
    let log = c.log_text();
    assert!(log.contains("agent certificate renewed"), "{log}");
    assert!(log.contains("renewal refused"), "{log}");
}

/// A stop (SIGTERM) ends the coordinator within its grace period even while an agent's session
/// stream is open — the stream never ends by itself, and a plain graceful shutdown waited for
/// it until the service manager's SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(windows, ignore = "sends SIGTERM, which Windows lacks")]
async fn sigterm_ends_serve_with_a_session_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = start(dir.path(), "");
    let t = c.token(Some("vm1"), "1h");
    let vm1 = enroll::enroll(&c.addr, &t, "vm1").await.unwrap();
    let _session = SimMember::open(&c.addr, &vm1, register("vm1"))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let s = c.terminate(Duration::from_secs(20));
        (s, c.log_text())
    })
    .await
    .unwrap();
    let (status, log) = status;
    let status = status.unwrap_or_else(|| panic!("still serving 20 s after SIGTERM:\n{log}"));
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        log.contains("sessions still open after the grace period"),
        "{log}"
    );
}

/// How a hostile stranger (no client certificate) holds its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// TCP only, never a TLS ClientHello.
    BeforeTls,
    /// TLS finished, then nothing: no HTTP/2 preface.
    AfterTls,
    /// TLS and the HTTP/2 preface, answering the server's PINGs and SETTINGS like a live
    /// client (so keepalives cannot tell it from one), but never a request.
    AfterPreface,
}

/// What the strangers of one kind saw, for the figures and the assertions.
#[derive(Debug, Default)]
struct Stalled {
    /// TCP connections made.
    opened: std::sync::atomic::AtomicUsize,
    /// Connections that got as far as this kind goes (TCP, TLS, or TLS and preface).
    established: std::sync::atomic::AtomicUsize,
    /// Closed by the coordinator within 300 ms of that (refused), or failed before it.
    refused: std::sync::atomic::AtomicUsize,
    /// Closed by the coordinator later (a timeout).
    timed_out: std::sync::atomic::AtomicUsize,
    /// Open now, and the most open at once.
    held: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    /// The longest a connection was held before the coordinator closed it.
    longest_ms: std::sync::atomic::AtomicU64,
}

/// The HTTP/2 client connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// Reads what the coordinator sends until it closes the connection, acking PINGs and SETTINGS
/// when `answer` (as an HTTP/2 client's library would).
async fn hold<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, answer: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !answer {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
        return;
    }
    let mut head = [0u8; 9];
    loop {
        if s.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).await.is_err() {
            return;
        }
        let (kind, flags) = (head[3], head[4]);
        let ack: Option<Vec<u8>> = match (kind, flags & 1) {
            (4, 0) => Some(vec![0, 0, 0, 4, 1, 0, 0, 0, 0]),
            (6, 0) => Some([&[0, 0, 8, 6, 1, 0, 0, 0, 0][..], &payload].concat()),
            _ => None,
        };
        if let Some(a) = ack
            && s.write_all(&a).await.is_err()
        {
            return;
        }
    }
}

/// Holds an established stranger connection until the coordinator closes it, counting.
async fn watch<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: S,
    answer: bool,
    seen: &Stalled,
) -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    seen.established.fetch_add(1, SeqCst);
    let now = seen.held.fetch_add(1, SeqCst) + 1;
    seen.peak.fetch_max(now, SeqCst);
    let t = std::time::Instant::now();
    hold(s, answer).await;
    seen.held.fetch_sub(1, SeqCst);
    let held = t.elapsed();
    if held < Duration::from_millis(300) {
        seen.refused.fetch_add(1, SeqCst);
        return true;
    }
    seen.timed_out.fetch_add(1, SeqCst);
    seen.longest_ms.fetch_max(held.as_millis() as u64, SeqCst);
    false
}

/// TLS over `tcp`, then the HTTP/2 preface if `preface`; `None` if the coordinator refused.
async fn tls_stall(
    tls: &tokio_rustls::TlsConnector,
    tcp: tokio::net::TcpStream,
    preface: bool,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let name = rustls::pki_types::ServerName::try_from("coordinator.lifeboat").unwrap();
    let connect = tokio::time::timeout(Duration::from_secs(10), tls.connect(name, tcp));
    let mut s = connect.await.ok()?.ok()?;
    if preface {
        s.write_all(H2_PREFACE).await.ok()?;
    }
    Some(s)
}

/// One stranger from `source`: connects, stalls as `stall` says until the coordinator closes
/// the connection, and connects again, until aborted.
async fn stranger(
    stall: Stall,
    source: std::net::IpAddr,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    seen: std::sync::Arc<Stalled>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    loop {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((source, 0).into()).unwrap();
        let refused = match sock.connect(([127, 0, 0, 1], port).into()).await {
            Err(_) => {
                seen.refused.fetch_add(1, SeqCst);
                true
            }
            Ok(tcp) if stall == Stall::BeforeTls => {
                seen.opened.fetch_add(1, SeqCst);
                watch(tcp, false, &seen).await
            }
            Ok(tcp) => {
                seen.opened.fetch_add(1, SeqCst);
                let preface = stall == Stall::AfterPreface;
                match tls_stall(&tls, tcp, preface).await {
                    Some(s) => watch(s, preface, &seen).await,
                    None => {
                        seen.refused.fetch_add(1, SeqCst);
                        true
                    }
                }
            }
        };
        // Back again at once after a timeout; after a refusal a little later, so that the
        // strangers' handshakes do not take both cores from everyone else (this test is about
        // holding connections, not about burning CPU).
        let pause = if refused { 500 } else { 50 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A health check on a new connection without a client certificate, as a monitor makes it.
async fn health_check(addr: &str, ca: &str) -> Result<Duration, String> {
    let t = std::time::Instant::now();
    let call = async {
        let tls = lifeboat_proto::tls::client_config(ca, None).map_err(|e| e.to_string())?;
        let ch = lifeboat_proto::tls::connect(addr, tls)
            .await
            .map_err(|e| e.to_string())?;
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(_)) => Ok(t.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// `Members` on a new admin connection.
async fn members(addr: &str, state_dir: &std::path::Path) -> Result<pb::MembersResponse, String> {
    let admin = state_dir.join("admin");
    let read = |f: &str| std::fs::read_to_string(admin.join(f)).unwrap();
    let call = async {
        let tls = lifeboat_proto::tls::client_config(
            &read("ca.pem"),
            Some((&read("admin.pem"), &read("admin.key"))),
        )
        .map_err(|e| e.to_string())?;
        let ch = lifeboat_proto::tls::connect(addr, tls)
            .await
            .map_err(|e| e.to_string())?;
        pb::admin_client::AdminClient::new(ch)
            .members(pb::MembersRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 5 s".into()))
}

/// Strangers cannot fill the listener: hundreds of connections without a client certificate,
/// stalled before TLS, after TLS and after the HTTP/2 preface, from three addresses and opened
/// again as soon as the coordinator closes them, while health checks, an admin and an enrolled
/// agent (its session and a heartbeat) are served. The coordinator closes the stalled ones after
/// its first-request timeout, and an idle connection without a certificate after its idle
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_fill_the_listener() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    // 4 members: a small pool for agents and admins (72 connections), which the strangers
    // filled before they were kept apart.
    let c = start(dir.path(), "max_members = 4");
    let addr = c.addr.clone();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let creds = sim::enroll(&c.state_dir, &addr, &vm("vm1")).await.unwrap();
    let ca = creds.ca_pem.clone();

    // An honest client without a certificate that makes one call and then sits idle: the
    // coordinator closes its connection after the idle timeout (10 s).
    let idle = {
        let (addr, ca) = (addr.clone(), ca.clone());
        tokio::spawn(async move {
            let mut send = h2_connect(&addr, &ca, None).await;
            let s = h2_unary(&mut send.0, "/lifeboat.v1.Enrollment/GetCa", &[]).await;
            assert_eq!(s.code(), tonic::Code::Ok, "{s:?}");
            let t = std::time::Instant::now();
            let _ = tokio::time::timeout(Duration::from_secs(20), send.1).await;
            t.elapsed()
        })
    };

    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        lifeboat_proto::tls::client_config(&ca, None).unwrap(),
    ));
    let kinds = [
        (Stall::BeforeTls, [127, 0, 0, 2]),
        (Stall::AfterTls, [127, 0, 0, 3]),
        (Stall::AfterPreface, [127, 0, 0, 4]),
    ];
    const PER_KIND: usize = 100;
    let mut attack = Vec::new();
    let mut seen = Vec::new();
    for (stall, source) in kinds {
        let s = std::sync::Arc::new(Stalled::default());
        for _ in 0..PER_KIND {
            attack.push(tokio::spawn(stranger(
                stall,
                source.into(),
                port,
                tls.clone(),
                s.clone(),
            )));
        }
        seen.push((stall, s));
    }
    // Every stranger has connected once (polled, not slept).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while seen.iter().any(|(_, s)| s.opened.load(SeqCst) < PER_KIND) {
        assert!(
            std::time::Instant::now() < deadline,
            "the strangers could not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let attack_started = std::time::Instant::now();

    // While they keep at it (past the coordinator's 5 s timeouts, so closed strangers come
    // back): health every 200 ms, an admin call, an agent's session and heartbeat.
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let before = lifeboat_store::manifest::now_millis();
    let agent = SimMember::open(&addr, &creds, register("vm1")).await;
    if let Ok(a) = &agent {
        a.send(
            AgentMessage::Heartbeat(lifeboat_proto::model::Heartbeat {
                time_ms: before,
                disks: vec![],
            })
            .into(),
        )
        .await
        .unwrap();
    }
    let mut heard = None;
    let mut admin = Vec::new();
    while attack_started.elapsed() < Duration::from_secs(8) {
        match health_check(&addr, &ca).await {
            Ok(t) => latencies.push(t),
            Err(e) => failures.push(e),
        }
        if heard.is_none() {
            let m = members(&addr, &c.state_dir).await;
            heard = m.as_ref().ok().and_then(|m| {
                m.members
                    .iter()
                    .find(|m| m.vm == "vm1" && m.connected && m.last_seen_ms >= before)
                    .map(|_| attack_started.elapsed())
            });
            admin.push(m.map(|_| ()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    admin.push(members(&addr, &c.state_dir).await.map(|_| ()));

    let figures: Vec<String> = seen
        .iter()
        .map(|(stall, s)| {
            format!(
                "{stall:?}: opened {} established {} refused {} timed out {} (longest held {} ms) held now {} at most {}",
                s.opened.load(SeqCst),
                s.established.load(SeqCst),
                s.refused.load(SeqCst),
                s.timed_out.load(SeqCst),
                s.longest_ms.load(SeqCst),
                s.held.load(SeqCst),
                s.peak.load(SeqCst),
            )
        })
        .collect();
    for a in &attack {
        a.abort();
    }
    latencies.sort();
    eprintln!(
        "listener under attack for {:.1?}:",
        attack_started.elapsed()
    );
    for f in &figures {
        eprintln!("  strangers {f}");
    }
    if !latencies.is_empty() {
        eprintln!(
            "  health: {} answered, {} failed; latency p50 {:.1?} p99 {:.1?} max {:.1?}",
            latencies.len(),
            failures.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().unwrap()
        );
    }
    let admin_failed: Vec<_> = admin.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!(
        "  admin: {} calls, {} failed; agent: {}, heartbeat seen {:.1?} into the attack",
        admin.len(),
        admin_failed.len(),
        if agent.is_ok() {
            "connected"
        } else {
            "refused"
        },
        heard
    );

    assert!(
        failures.is_empty(),
        "{} of {} health checks failed during the attack, first: {}\n{}",
        failures.len(),
        failures.len() + latencies.len(),
        failures[0],
        figures.join("\n")
    );
    assert!(latencies.len() >= 10, "{latencies:?}");
    assert!(
        admin_failed.is_empty(),
        "admin calls failed: {admin_failed:?}"
    );
    let agent = agent.unwrap_or_else(|e| panic!("the agent could not connect: {e:#}"));
    assert!(heard.is_some(), "the agent's heartbeat was not seen");
    // The agent's session outlived the attack.
    let mut agent = agent;
    agent
        .send(
            AgentMessage::Heartbeat(lifeboat_proto::model::Heartbeat {
                time_ms: lifeboat_store::manifest::now_millis(),
                disks: vec![],
            })
            .into(),
        )
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), agent.next())
            .await
            .is_err(),
        "the agent's session ended"
    );
    // The stalled strangers were closed by the coordinator, after TLS within its first-request
    // timeout (5 s, plus scheduling), before TLS at the handshake timeout (5 s). Under wine the
    // lower bound does not hold: in one CI run the longest pre-TLS stranger was closed after
    // 4.4 s (wine's socket layer closes or reports them early; its accept loop also lags this
    // flood by seconds, so late refusals count as holds). There only the upper bound (nothing
    // is held for ever) is asserted; the Linux run asserts both.
    let shortest_timeout = if cfg!(windows) { 0 } else { 4_500 };
    for (stall, s) in &seen {
        assert!(s.timed_out.load(SeqCst) > 0, "{stall:?} never timed out");
        let longest = s.longest_ms.load(SeqCst);
        assert!(
            (shortest_timeout..10_000).contains(&longest),
            "{stall:?} held for {longest} ms"
        );
    }
    let idle = idle.await.unwrap();
    eprintln!("  an idle connection without a certificate was closed after {idle:.1?}");
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(15)).contains(&idle),
        "{idle:?}"
    );
}

/// A TLS connection speaking raw HTTP/2 (with `identity` as its client certificate): the
/// request handle, and the connection, which ends when the coordinator closes it.
async fn h2_connect(
    addr: &str,
    ca: &str,
    identity: Option<&enroll::Enrolled>,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let config = lifeboat_proto::tls::client_config(
        ca,
        identity.map(|i| (i.cert_pem.as_str(), i.key_pem.as_str())),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("coordinator.lifeboat").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, conn)
}

/// A gRPC message frame around `payload` (which need not be a valid protobuf).
fn grpc_frame(payload: &[u8]) -> bytes::Bytes {
    let mut f = vec![0u8];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.into()
}

/// Starts a gRPC call to `path` sending `first` and leaving the request open.
async fn h2_call(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    first: &[u8],
    end: bool,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let req = http::Request::post(format!("http://coordinator.lifeboat{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut send = send.clone().ready().await.unwrap();
    let (response, mut stream) = send.send_request(req, false).unwrap();
    stream.send_data(grpc_frame(first), end).unwrap();
    (response, stream)
}

/// The messages of a response and the status that ended it (from the headers of a
/// trailers-only response, or from the trailers).
async fn h2_response(
    response: http::Response<h2::RecvStream>,
) -> (Vec<bytes::Bytes>, tonic::Status) {
    let (parts, mut body) = response.into_parts();
    if let Some(s) = tonic::Status::from_header_map(&parts.headers) {
        return (vec![], s);
    }
    let mut messages = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        let _ = body.flow_control().release_capacity(d.len());
        messages.push(d);
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    let s = tonic::Status::from_header_map(&trailers).expect("a grpc-status");
    (messages, s)
}

async fn h2_unary(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    payload: &[u8],
) -> tonic::Status {
    let (response, _stream) = h2_call(send, path, payload, true).await;
    h2_response(response.await.unwrap()).await.1
}

/// Bytes that are not a valid encoding of any message: field 1, length-delimited, with a
/// length past the end.
const GARBAGE: &[u8] = b"\x0a\xff\x01garbage";

/// A payload that does not decode as the request message is INVALID_ARGUMENT (as
/// `coordinator.proto` promises), not INTERNAL, and changes nothing: on unary calls, as a
/// session's first message and later in a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payloads_are_invalid_argument() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), "");
    let addr = c.addr.clone();
    let t = c.token(Some("vm1"), "1h");
    let vm1 = enroll::enroll(&addr, &t, "vm1").await.unwrap();
    let (mut send, _conn) = h2_connect(&addr, &vm1.ca_pem, None).await;
    for path in [
        "/lifeboat.v1.Enrollment/Enroll",
        "/lifeboat.v1.Enrollment/GetCa",
        "/grpc.health.v1.Health/Check",
    ] {
        let s = h2_unary(&mut send, path, GARBAGE).await;
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{path}: {s:?}");
        assert!(s.message().contains("failed to decode"), "{path}: {s:?}");
    }
    // A token sent in an undecodable request is not consumed.
    let t = c.token(Some("vm2"), "1h");
    let mut bad = pb::EnrollRequest {
        token: t.clone(),
        vm: "vm2".into(),
        csr_pem: String::new(),
    }
    .encode_to_vec();
    bad.extend_from_slice(GARBAGE);
    let s = h2_unary(&mut send, "/lifeboat.v1.Enrollment/Enroll", &bad).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");

    // A session: garbage as the first message, then garbage after Register.
    let (mut send, _conn) = h2_connect(&addr, &vm1.ca_pem, Some(&vm1)).await;
    let (response, _stream) = h2_call(&mut send, "/lifeboat.v1.Session/Open", GARBAGE, false).await;
    let (_, s) = h2_response(response.await.unwrap()).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    let (response, mut stream) = h2_call(
        &mut send,
        "/lifeboat.v1.Session/Open",
        &register("vm1").encode_to_vec(),
        false,
    )
    .await;
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    stream.send_data(grpc_frame(GARBAGE), false).unwrap();
    let (messages, s) = h2_response(response).await;
    assert_eq!(messages.len(), 1, "Registered, then the end: {messages:?}");
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(
        c.log_text()
            .contains("undecodable message; closing the session")
    );
    // The member comes back as usual, and the token sent in garbage still enrols.
    let _s = SimMember::open(&addr, &vm1, register("vm1")).await.unwrap();
    enroll::enroll(&addr, &t, "vm2").await.unwrap();
}

/// `join-token --ttl` beyond a year is refused with a clear error (it once wrapped around into
/// a token that never expired) and mints nothing; a year, the maximum, works.
#[test]
fn join_token_lifetimes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let c = lifeboat_tests::CoordinatorProc::init(dir.path(), "g1", "127.0.0.1:1", "");
    let tokens = c.state_dir.join("tokens");
    let count = || std::fs::read_dir(&tokens).map_or(0, |d| d.count());
    let join_token = |ttl: &str| {
        std::process::Command::new(lifeboat_tests::bin("lifeboat-coordinator"))
            .arg("--config")
            .arg(&c.config)
            .args(["join-token", "--ttl", ttl])
            .output()
            .unwrap()
    };
    for ttl in ["1000000000years", "366days", "1year 1s"] {
        let out = join_token(ttl);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{ttl}: {stderr}");
        assert!(stderr.contains("at most 1year"), "{ttl}: {stderr}");
        assert!(out.stdout.is_empty(), "{ttl}");
        assert_eq!(count(), 0, "{ttl} minted a token");
    }
    let out = join_token("1year");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lifeboat1:"));
    assert_eq!(count(), 1);
    let help = std::process::Command::new(lifeboat_tests::bin("lifeboat-coordinator"))
        .args(["join-token", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("at most 1 year"));
}
