//! The coordinator against well-behaved and hostile peers, over real TLS on a real port:
//! enrolment with one-time tokens, refused certificates and claims, malformed messages, a flood
//! of connections, group size, removal — and a client not written in Rust (Python grpcio)
//! calling health and reflection.

use std::time::Duration;

use lifeboat_coordinator::sim::{self, SimMember};
use lifeboat_proto::enroll::{self, EnrollError};
use lifeboat_proto::model::AgentMessage;
use lifeboat_proto::pb;
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
    assert!(
        SimMember::open(&addr, &foreign, register("vm1"))
            .await
            .is_err()
    );

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
