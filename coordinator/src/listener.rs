//! Who may hold a connection to port 20004, and for how long: admission into separate pools for
//! TLS handshakes, connections with a verified client certificate and connections without one,
//! per-source and per-certificate limits, and the timers that close connections which hold a
//! slot without using it.
//!
//! Why our own mechanism rather than tonic's or hyper's settings: `max_connection_age` applies to
//! every connection (it would cut agents' session streams), HTTP/2 keepalives only detect dead
//! peers (a live stranger answers pings), and `timeout` bounds a call, not a connection that makes
//! none. The certificate is known only after the handshake, so the pool is chosen then; idleness
//! is "no request in flight", which only the HTTP layer knows: [`Track`] (a tower layer) counts
//! the calls of each connection in an [`Activity`] that the connection's stream wrapper
//! ([`Conn`]) reads to arm its timer. When the timer fires the stream fails its reads and writes,
//! hyper drops the connection and its slot is free.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// Handshakes one source address may have in flight; more are refused at once.
pub const HANDSHAKES_PER_SOURCE: usize = 32;
/// A TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the handshake, the first request must start within this, or the connection is closed.
/// Every client of the coordinator (agents, the admin CLI, enrolment, health checks) connects to
/// make a call at once.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections without a client certificate after the handshake, in all: enrolment, health,
/// reflection, and whoever else reaches the port. They never take the slots of agents and
/// admins, which have their own pool.
pub const STRANGERS: usize = 64;
/// Of those, from one source address: so one address cannot take the pool from the health
/// checks and enrolments of others. With [`HANDSHAKES_PER_SOURCE`], an address without
/// certificates holds at most 40 connections in any state. Connections with a verified
/// certificate are limited per certificate instead ([`CONNECTIONS_PER_CERTIFICATE`]): many
/// agents may share one address behind NAT.
pub const STRANGERS_PER_SOURCE: usize = 8;
/// A connection without a client certificate and no call in flight for this long is closed.
pub const STRANGER_IDLE: Duration = Duration::from_secs(10);
/// ...and after this long in any case (enrolment and health calls take milliseconds; a health
/// watcher reconnects).
pub const STRANGER_LIFETIME: Duration = Duration::from_secs(60);
/// Connections one verified client certificate may hold: an agent needs one for its session
/// and one more while it renews; an admin runs a few commands at once.
pub const CONNECTIONS_PER_CERTIFICATE: usize = 16;

/// Sizes of the pools.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TLS handshakes in flight.
    pub handshakes: usize,
    /// Connections with a verified client certificate.
    pub verified: usize,
    /// Connections without one.
    pub strangers: usize,
}

impl Limits {
    /// For a group of at most `max_members`: two connections per member (a session and a
    /// renewal or an old session being replaced) plus room for admins. As many handshakes, so a
    /// whole group can reconnect at once, but never fewer than 256: a small group's pool must
    /// not be filled by the handshakes of a few sources (32 each).
    pub fn for_members(max_members: usize) -> Self {
        let verified = max_members * 2 + 64;
        Limits {
            handshakes: verified.max(256),
            verified,
            strangers: STRANGERS,
        }
    }
}

/// The source a peer's limits are counted against: its IPv4 address, or the /64 prefix of its
/// IPv6 address (one host usually has a whole /64 to pick addresses from). A v4-mapped address
/// counts as the IPv4 one.
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

#[derive(Debug, Default)]
struct Source {
    handshakes: usize,
    strangers: usize,
}

#[derive(Debug, Default)]
struct Counts {
    handshakes: usize,
    strangers: usize,
    verified: usize,
    sources: HashMap<IpAddr, Source>,
    /// Connections per certificate (SHA-256 of the leaf).
    certificates: HashMap<String, usize>,
}

#[derive(Debug)]
struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
}

#[derive(Debug)]
enum Slot {
    Handshake(IpAddr),
    Stranger(IpAddr),
    Verified(String),
}

/// A slot in one of the pools, given back when dropped.
#[derive(Debug)]
struct Held {
    admission: Arc<Admission>,
    slot: Slot,
}

impl Admission {
    fn handshake(self: &Arc<Self>, ip: IpAddr) -> Result<Held, &'static str> {
        let mut c = self.counts.lock().unwrap();
        if c.handshakes >= self.limits.handshakes {
            return Err("too many handshakes in flight");
        }
        let s = c.sources.entry(ip).or_default();
        if s.handshakes >= HANDSHAKES_PER_SOURCE {
            return Err("too many handshakes in flight from this source");
        }
        s.handshakes += 1;
        c.handshakes += 1;
        Ok(Held {
            admission: self.clone(),
            slot: Slot::Handshake(ip),
        })
    }

    /// The slot of a connection whose handshake finished, by whether it showed a (verified)
    /// client certificate. Takes the place of the handshake's slot.
    fn connection(
        self: &Arc<Self>,
        ip: IpAddr,
        certificate: Option<String>,
    ) -> Result<Held, &'static str> {
        let mut c = self.counts.lock().unwrap();
        let slot = match certificate {
            Some(fp) => {
                if c.verified >= self.limits.verified {
                    return Err("too many open connections");
                }
                let n = c.certificates.entry(fp.clone()).or_default();
                if *n >= CONNECTIONS_PER_CERTIFICATE {
                    return Err("too many connections with this client certificate");
                }
                *n += 1;
                c.verified += 1;
                Slot::Verified(fp)
            }
            None => {
                if c.strangers >= self.limits.strangers {
                    return Err("too many connections without a client certificate");
                }
                let s = c.sources.entry(ip).or_default();
                if s.strangers >= STRANGERS_PER_SOURCE {
                    return Err(
                        "too many connections without a client certificate from this source",
                    );
                }
                s.strangers += 1;
                c.strangers += 1;
                Slot::Stranger(ip)
            }
        };
        Ok(Held {
            admission: self.clone(),
            slot,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut c = self.admission.counts.lock().unwrap();
        let c = &mut *c;
        let source = |sources: &mut HashMap<IpAddr, Source>, ip: &IpAddr, f: fn(&mut Source)| {
            if let Some(s) = sources.get_mut(ip) {
                f(s);
                if s.handshakes == 0 && s.strangers == 0 {
                    sources.remove(ip);
                }
            }
        };
        match &self.slot {
            Slot::Handshake(ip) => {
                c.handshakes -= 1;
                source(&mut c.sources, ip, |s| s.handshakes -= 1);
            }
            Slot::Stranger(ip) => {
                c.strangers -= 1;
                source(&mut c.sources, ip, |s| s.strangers -= 1);
            }
            Slot::Verified(fp) => {
                c.verified -= 1;
                if let Some(n) = c.certificates.get_mut(fp) {
                    *n -= 1;
                    if *n == 0 {
                        c.certificates.remove(fp);
                    }
                }
            }
        }
    }
}

/// What a connection has done, as far as its timers care.
#[derive(Debug, Clone, Copy)]
struct Use {
    since: Instant,
    requests: u64,
    in_flight: usize,
    /// When the last call in flight ended (`since` before the first).
    idle_since: Instant,
}

/// When a connection with use `u` is to be closed and why; `None`: not while it stays as it is.
fn close_at(u: &Use, stranger: bool) -> Option<(Instant, &'static str)> {
    let lifetime = (
        u.since + STRANGER_LIFETIME,
        "maximum lifetime without a client certificate",
    );
    if u.requests == 0 {
        let first = (
            u.since + FIRST_REQUEST_TIMEOUT,
            "no request after the handshake",
        );
        return Some(if stranger { first.min(lifetime) } else { first });
    }
    if !stranger {
        return None;
    }
    if u.in_flight == 0 {
        let idle = (
            u.idle_since + STRANGER_IDLE,
            "idle without a client certificate",
        );
        return Some(idle.min(lifetime));
    }
    Some(lifetime)
}

/// The calls of one connection, shared by its stream ([`Conn`]) and its requests ([`Track`]).
#[derive(Debug)]
pub struct Activity {
    state: Mutex<Use>,
    /// The connection's task, woken when a call ends (its idle timer starts).
    waker: AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        let now = Instant::now();
        Activity {
            state: Mutex::new(Use {
                since: now,
                requests: 0,
                in_flight: 0,
                idle_since: now,
            }),
            waker: AtomicWaker::new(),
        }
    }

    fn start(self: &Arc<Self>) -> InFlight {
        let mut s = self.state.lock().unwrap();
        s.requests += 1;
        s.in_flight += 1;
        InFlight(self.clone())
    }
}

/// One call in flight; it ends when dropped (with its response body, for streams).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut s = self.0.state.lock().unwrap();
            s.in_flight -= 1;
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
            }
        }
        self.0.waker.wake();
    }
}

/// What a request learns of its connection: tonic's TLS information (copied by [`Track`] into
/// the request, so `Request::peer_certs` and `remote_addr` work as usual) and its activity.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    tls: TlsConnectInfo<TcpConnectInfo>,
    activity: Arc<Activity>,
}

/// An accepted TLS connection; holds its slot until dropped, and fails once its timer fires.
pub struct Conn {
    inner: TlsStream<TcpStream>,
    peer: SocketAddr,
    stranger: bool,
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
    closed: Option<&'static str>,
    _slot: Held,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .field("stranger", &self.stranger)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Whether the connection is to be closed now; otherwise arms the timer (and the wake-up
    /// when a call ends) so that this is asked again in time.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        if self.closed.is_some() {
            return self.closed;
        }
        self.activity.waker.register(cx.waker());
        loop {
            let u = *self.activity.state.lock().unwrap();
            let (at, why) = close_at(&u, self.stranger)?;
            if Instant::now() >= at {
                tracing::debug!(peer = %self.peer, "closing connection: {why}");
                self.closed = Some(why);
                return self.closed;
            }
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
    }
}

fn closed(why: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, why)
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            tls: self.inner.connect_info(),
            activity: self.activity.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // hyper always has a read pending on a connection, so the timer is armed here.
        if let Some(why) = self.expired(cx) {
            return Poll::Ready(Err(closed(why)));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(why) = self.closed {
            return Poll::Ready(Err(closed(why)));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(why) = self.closed {
            return Poll::Ready(Err(closed(why)));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes, handing admitted ones to tonic.
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: Limits,
    out: mpsc::Sender<std::io::Result<Conn>>,
) {
    let admission = Arc::new(Admission {
        limits,
        counts: Mutex::default(),
    });
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handshake = match admission.handshake(source(peer.ip())) {
            Ok(h) => h,
            Err(why) => {
                tracing::warn!(%peer, "refusing connection: {why}");
                continue;
            }
        };
        let (acceptor, out, admission) = (acceptor.clone(), out.clone(), admission.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(handshake);
            let tls = match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return refused(peer, &e.to_string()),
                Err(_) => return refused(peer, "TLS handshake timed out"),
            };
            // The verifier refuses any certificate not chaining to the group CA, so one that is
            // here is verified; which identity it carries is each service's business.
            let certificate = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| lifeboat_proto::tls::fingerprint(c));
            let stranger = certificate.is_none();
            let slot = match admission.connection(source(peer.ip()), certificate) {
                Ok(s) => s,
                Err(why) => {
                    tracing::warn!(%peer, "refusing connection: {why}");
                    return;
                }
            };
            let activity = Arc::new(Activity::new());
            let deadline = activity.state.lock().unwrap().since + FIRST_REQUEST_TIMEOUT;
            let _ = out
                .send(Ok(Conn {
                    inner: tls,
                    peer,
                    stranger,
                    activity,
                    timer: Box::pin(tokio::time::sleep_until(deadline)),
                    closed: None,
                    _slot: slot,
                }))
                .await;
        });
    }
}

fn refused(peer: SocketAddr, why: &str) {
    let hint = if why.contains("InvalidContentType") || why.contains("corrupt message") {
        " (plaintext? the coordinator only speaks TLS)"
    } else {
        ""
    };
    tracing::warn!(%peer, "refused connection: {why}{hint}");
}

/// The tower layer that counts each connection's calls in flight (see the module's comment).
#[derive(Debug, Clone, Copy, Default)]
pub struct Track;

impl<S> tower::Layer<S> for Track {
    type Service = Tracked<S>;
    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Tracked<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Guarded<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let guard = match req.extensions().get::<PeerInfo>().cloned() {
            Some(p) => {
                req.extensions_mut().insert(p.tls);
                Some(p.activity.start())
            }
            None => None,
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let r = response.await?;
            Ok(r.map(|body| Guarded {
                inner: body,
                _in_flight: guard,
            }))
        })
    }
}

/// A response body that keeps its call in flight until it is done (or dropped).
#[derive(Debug)]
pub struct Guarded<B> {
    inner: B,
    _in_flight: Option<InFlight>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(u: &Use, stranger: bool) -> Option<(Duration, &'static str)> {
        close_at(u, stranger).map(|(t, why)| (t - u.since, why))
    }

    #[test]
    fn timers_close_silent_connections_and_idle_or_old_strangers() {
        let since = Instant::now();
        let mut u = Use {
            since,
            requests: 0,
            in_flight: 0,
            idle_since: since,
        };
        // No request yet: everyone gets FIRST_REQUEST_TIMEOUT.
        for stranger in [false, true] {
            assert_eq!(
                at(&u, stranger),
                Some((FIRST_REQUEST_TIMEOUT, "no request after the handshake"))
            );
        }
        // A call in flight: a certificate holder is never closed, a stranger at its lifetime.
        u.requests = 1;
        u.in_flight = 1;
        assert_eq!(at(&u, false), None);
        assert_eq!(
            at(&u, true),
            Some((
                STRANGER_LIFETIME,
                "maximum lifetime without a client certificate"
            ))
        );
        // Idle since 3 s in: a stranger is closed STRANGER_IDLE later, the other never.
        u.in_flight = 0;
        u.idle_since = since + Duration::from_secs(3);
        assert_eq!(at(&u, false), None);
        assert_eq!(
            at(&u, true),
            Some((
                Duration::from_secs(3) + STRANGER_IDLE,
                "idle without a client certificate"
            ))
        );
        // Idle late in its life: the lifetime comes first.
        u.idle_since = since + STRANGER_LIFETIME - Duration::from_secs(1);
        assert_eq!(
            at(&u, true).unwrap(),
            (
                STRANGER_LIFETIME,
                "maximum lifetime without a client certificate"
            )
        );
    }

    #[test]
    fn pools_are_separate_and_limited_per_source_and_certificate() {
        let a = Arc::new(Admission {
            limits: Limits {
                handshakes: 40,
                verified: 20,
                strangers: 10,
            },
            counts: Mutex::default(),
        });
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let hs: Vec<_> = (0..HANDSHAKES_PER_SOURCE)
            .map(|_| a.handshake(ip(1)).unwrap())
            .collect();
        assert_eq!(
            a.handshake(ip(1)).unwrap_err(),
            "too many handshakes in flight from this source"
        );
        let other = a.handshake(ip(2)).unwrap();
        drop(hs);
        let strangers: Vec<_> = (0..STRANGERS_PER_SOURCE)
            .map(|_| a.connection(ip(1), None).unwrap())
            .collect();
        assert_eq!(
            a.connection(ip(1), None).unwrap_err(),
            "too many connections without a client certificate from this source"
        );
        let more: Vec<_> = (0..2).map(|_| a.connection(ip(2), None).unwrap()).collect();
        assert_eq!(
            a.connection(ip(3), None).unwrap_err(),
            "too many connections without a client certificate"
        );
        // The stranger pool is full, the verified one is not: certificate holders get in, from
        // the same address too, up to their per-certificate limit.
        let agent: Vec<_> = (0..CONNECTIONS_PER_CERTIFICATE)
            .map(|_| a.connection(ip(1), Some("aa".into())).unwrap())
            .collect();
        assert_eq!(
            a.connection(ip(1), Some("aa".into())).unwrap_err(),
            "too many connections with this client certificate"
        );
        let others: Vec<_> = (0..4)
            .map(|_| a.connection(ip(1), Some("bb".into())).unwrap())
            .collect();
        assert_eq!(
            a.connection(ip(1), Some("cc".into())).unwrap_err(),
            "too many open connections"
        );
        // One IPv6 host is one source, whichever address of its /64 it uses; IPv4 in IPv6 is
        // IPv4.
        assert_eq!(
            source("2001:db8:1:2:aaaa::1".parse().unwrap()),
            source("2001:db8:1:2:bbbb::7".parse().unwrap())
        );
        assert_ne!(
            source("2001:db8:1:2::1".parse().unwrap()),
            source("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(source("::ffff:10.0.0.1".parse().unwrap()), ip(1));
        // Everything given back leaves nothing behind.
        drop((other, strangers, more, agent, others));
        let c = a.counts.lock().unwrap();
        assert_eq!((c.handshakes, c.strangers, c.verified), (0, 0, 0));
        assert!(c.sources.is_empty() && c.certificates.is_empty());
    }
}
