//! Outbound connections for webhook requests: to allowed addresses only, over TLS, and counted,
//! so that walhook never holds more of them than its descriptor budget has room for.
//!
//! What must hold:
//! - Only `https`, and only addresses the [`AddressPolicy`] allows, literal or resolved
//!   (docs/architecture.md, invariant 17): a name is resolved here and every forbidden address
//!   is dropped before a connection is tried; a name with none left is [`Refused`].
//! - At most [`Gate`]'s capacity of connections are open at once, in flight and idle in the
//!   pool together (`dispatch.max_concurrency` + [`IDLE_KEPT`], counted in the descriptor
//!   budget). A new connection past it closes the pooled connection idle the longest (its last
//!   byte was an answer read, at least [`REAP_AFTER`] ago, and no answer is still being read on
//!   it: [`InFlight`]) and waits, within the connect
//!   timeout, for its place: one that finds none fails as a local failure ([`GateFull`]),
//!   retried without spending an attempt, never as the receiver's.
//! - TLS verifies the receiver's certificate against the Mozilla roots and
//!   `dispatch.ca_certs`; ALPN offers HTTP/2 and HTTP/1.1.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::security::ssrf::{AddressPolicy, Refused};

/// Idle pooled connections kept beyond the requests in flight (part of the descriptor
/// budget's reserve, `ops::descriptors::RESERVED`).
pub const IDLE_KEPT: usize = 64;
// The idle ones are counted in the descriptor budget's reserve, with room to spare for the rest.
const _: () = assert!(IDLE_KEPT as u64 <= crate::ops::descriptors::RESERVED / 2);

/// A pooled connection whose last byte was an answer read this long ago may be closed to make
/// room for a new one.
pub const REAP_AFTER: Duration = Duration::from_millis(500);
/// How often a new connection waiting for its place looks again for one to close.
const RELOOK: Duration = Duration::from_millis(50);

/// No place for a new outbound connection within the connect timeout: every one is in use.
#[derive(Debug, thiserror::Error)]
#[error("no outbound connection free within the connect timeout ({0} open, all in use)")]
pub struct GateFull(pub usize);

/// Last use of a connection: what it did last and when.
#[derive(Debug)]
struct Track {
    /// Milliseconds after the gate's `base` of the last byte moved.
    last_ms: AtomicU64,
    /// [`WROTE`] or [`READ`]: whether it waits for an answer or has its answer.
    last: AtomicU8,
    /// Requests whose answer is still being read on it (headers in, body coming).
    answering: Arc<AtomicUsize>,
    fd: RawFd,
}

/// Marks a connection as reading an answer, from the response's headers to the end of its
/// body: the HTTP client hands it over in the response's extensions (see [`Tls`]), and the
/// sender holds [`InFlight::reading`]'s guard while it reads the body. A connection reading
/// an answer is never closed to make room.
#[derive(Debug, Clone)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one answer being read until the guard is dropped.
    pub fn reading(&self) -> Reading {
        self.0.fetch_add(1, Ordering::SeqCst);
        Reading(self.0.clone())
    }
}

/// See [`InFlight::reading`].
#[derive(Debug)]
pub struct Reading(Arc<AtomicUsize>);

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

const WROTE: u8 = 1;
const READ: u8 = 2;

/// The places for open outbound connections.
#[derive(Debug)]
pub struct Gate {
    places: Arc<Semaphore>,
    capacity: usize,
    live: Mutex<Vec<Weak<Track>>>,
    base: Instant,
}

impl Gate {
    /// Room for `capacity` open connections.
    pub fn new(capacity: usize) -> Self {
        Gate {
            places: Arc::new(Semaphore::new(capacity)),
            capacity,
            live: Mutex::new(Vec::new()),
            base: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis().min(u64::MAX as u128) as u64
    }

    /// A place for a new connection, closing idle ones to make room, until `deadline`.
    async fn enter(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, GateFull> {
        loop {
            if let Ok(place) = self.places.clone().try_acquire_owned() {
                return Ok(place);
            }
            self.reap_idlest();
            tokio::select! {
                biased;
                place = self.places.clone().acquire_owned() => return Ok(place.expect("never closed")),
                _ = tokio::time::sleep(RELOOK) => {}
                _ = tokio::time::sleep_until(deadline) => return Err(GateFull(self.capacity)),
            }
        }
    }

    /// Shuts down the connection whose answer was read the longest ago (at least
    /// [`REAP_AFTER`]): its connection task ends at once, closing the socket and freeing its
    /// place. A connection waiting for an answer, or still reading one (its headers in, its
    /// body coming: [`InFlight`]), is never chosen.
    fn reap_idlest(&self) -> bool {
        let now = self.now_ms();
        let mut live = self.live.lock().expect("gate lock");
        live.retain(|w| w.strong_count() > 0);
        let idlest = (live.iter())
            .filter_map(Weak::upgrade)
            .filter(|t| t.last.load(Ordering::Relaxed) == READ && t.answering.load(Ordering::SeqCst) == 0)
            .filter(|t| now.saturating_sub(t.last_ms.load(Ordering::Relaxed)) >= REAP_AFTER.as_millis() as u64)
            .min_by_key(|t| t.last_ms.load(Ordering::Relaxed));
        let Some(t) = idlest else { return false };
        // SAFETY: shutdown(2) on a socket we hold open; it frees nothing (the owner closes it
        // when its connection task ends), so the descriptor cannot be reused meanwhile.
        unsafe { libc::shutdown(t.fd, libc::SHUT_RDWR) };
        t.last.store(0, Ordering::Relaxed); // chosen once
        tracing::debug!("closed an idle outbound connection to make room for a new one");
        true
    }

    fn track(&self, fd: RawFd) -> Arc<Track> {
        let t = Arc::new(Track {
            last_ms: AtomicU64::new(self.now_ms()),
            last: AtomicU8::new(WROTE),
            answering: Arc::new(AtomicUsize::new(0)),
            fd,
        });
        self.live.lock().expect("gate lock").push(Arc::downgrade(&t));
        t
    }
}

/// A TCP connection holding its place in the [`Gate`], recording its last use.
#[derive(Debug)]
pub struct Counted {
    tcp: TcpStream,
    track: Arc<Track>,
    gate: Arc<Gate>,
    _place: OwnedSemaphorePermit,
}

impl Counted {
    fn used(&self, what: u8) {
        self.track.last_ms.store(self.gate.now_ms(), Ordering::Relaxed);
        self.track.last.store(what, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.used(READ);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.used(WROTE);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// A TLS connection to a receiver, as the HTTP client's pool holds it.
#[derive(Debug)]
pub struct Tls(tokio_rustls::client::TlsStream<Counted>);

impl Connection for Tls {
    fn connected(&self) -> Connected {
        let (counted, session) = self.0.get_ref();
        // Handed to each response on this connection (hyper-util puts it in its extensions).
        let connected = Connected::new().extra(InFlight(counted.track.answering.clone()));
        if session.alpn_protocol() == Some(b"h2") {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl AsyncRead for Tls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Makes outbound connections for the HTTP client (a `tower::Service<Uri>`).
#[derive(Clone)]
pub struct Connector {
    policy: Arc<AddressPolicy>,
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("gate", &self.gate.capacity).finish()
    }
}

impl Connector {
    /// Connections under `policy`, verified by `tls`, each within `connect_timeout`, at most
    /// `gate`'s capacity open at once.
    pub fn new(
        policy: Arc<AddressPolicy>,
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
        gate: Arc<Gate>,
    ) -> Self {
        Connector { policy, tls: tokio_rustls::TlsConnector::from(tls), connect_timeout, gate }
    }

    async fn connect(self, uri: Uri) -> Result<TokioIo<Tls>, BoxError> {
        if uri.scheme_str() != Some("https") {
            return Err(Box::new(Refused { host: uri.to_string(), reason: "not https".into() }));
        }
        let host = uri.host().ok_or("the URL has no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let deadline = Instant::now() + self.connect_timeout;
        let addrs = allowed_addresses(&self.policy, &host, port).await?;
        let place = self.gate.enter(deadline).await?;
        let mut last_error = io::Error::other("no address to connect to");
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last_error = e,
                Err(_) => {
                    last_error = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    break;
                }
            }
        }
        let tcp = tcp.ok_or(last_error)?;
        tcp.set_nodelay(true)?;
        let track = self.gate.track(tcp.as_raw_fd());
        let counted = Counted { tcp, track, gate: self.gate.clone(), _place: place };
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.clone()).map_err(|_| format!("{host} is not a valid TLS name"))?,
        };
        let tls = tokio::time::timeout_at(deadline, self.tls.connect(name, counted))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(TokioIo::new(Tls(tls)))
    }
}

/// Error type of the connector (hyper's client boxes it).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Tls>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// The addresses of `host` webhooks may target: a literal checked, a name resolved with every
/// forbidden answer dropped; [`Refused`] when none is left.
async fn allowed_addresses(policy: &AddressPolicy, host: &str, port: u16) -> Result<Vec<SocketAddr>, BoxError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return match policy.check(ip) {
            Ok(()) => Ok(vec![SocketAddr::new(ip, port)]),
            Err(reason) => Err(Box::new(Refused { host: host.to_owned(), reason })),
        };
    }
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let mut reason = "no address".to_owned();
    let allowed: Vec<SocketAddr> = found
        .into_iter()
        .filter(|a| match policy.check(a.ip()) {
            Ok(()) => true,
            Err(r) => {
                reason = r;
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        return Err(Box::new(Refused { host: host.to_owned(), reason }));
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_gate_closes_the_idlest_answered_connection_never_one_awaiting_an_answer() {
        let gate = Arc::new(Gate::new(2));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for what in [READ, WROTE] {
            let place = gate.enter(Instant::now() + Duration::from_secs(1)).await.unwrap();
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let track = gate.track(tcp.as_raw_fd());
            track.last.store(what, Ordering::Relaxed);
            held.push((Counted { tcp, track, gate: gate.clone(), _place: place }, server));
        }
        let soon = Instant::now() + Duration::from_millis(200);
        assert!(gate.enter(soon).await.is_err(), "full, and nothing idle long enough yet");
        tokio::time::sleep(REAP_AFTER).await;
        assert!(gate.reap_idlest(), "the answered one is idle now");
        assert!(!gate.reap_idlest(), "never the one awaiting its answer, nor the same one twice");
        // The reaped connection reads its end; dropping it (as its task does) frees the place.
        let (mut reaped, _server) = held.remove(0);
        let mut byte = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut reaped, &mut byte).await.unwrap();
        assert_eq!(n, 0);
        drop(reaped);
        assert!(gate.enter(Instant::now() + Duration::from_secs(1)).await.is_ok());
    }

    /// A receiver that sends its status and headers at once and its body later: while the
    /// body is coming, its connection is never the one closed to make room.
    #[cfg(feature = "demo")]
    #[tokio::test]
    async fn a_connection_still_reading_its_answer_is_never_closed_to_make_room() {
        use http_body_util::{BodyExt, Full};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        // A CA and a certificate for 127.0.0.1 (rcgen, as the demo's local CA makes them).
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        crate::security::tls::install_crypto_provider();
        let server_key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut server_tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], server_key)
            .unwrap();
        server_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tls.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n").await.unwrap();
            tls.flush().await.unwrap();
            tokio::time::sleep(REAP_AFTER * 3).await;
            tls.write_all(b"ok").await.unwrap();
            tls.flush().await.unwrap();
            let _ = tls.read(&mut buf).await; // keep it open until the client goes
        });

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let gate = Arc::new(Gate::new(1));
        let policy = Arc::new(AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]));
        let connector = Connector::new(policy, Arc::new(tls), Duration::from_secs(2), gate.clone());
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, Full<bytes::Bytes>>(connector);
        let request = hyper::Request::post(format!("https://127.0.0.1:{port}/")).body(Full::default()).unwrap();
        let resp = client.request(request).await.unwrap();
        let reading = resp.extensions().get::<InFlight>().expect("the client hands the connection's marker over");
        let guard = reading.reading();
        tokio::time::sleep(REAP_AFTER * 2).await;
        assert!(!gate.reap_idlest(), "headers read long ago, but the body is still coming");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok", "the answer arrived whole");
        drop(guard);
        tokio::time::sleep(REAP_AFTER * 2).await;
        assert!(gate.reap_idlest(), "answered and idle: now it may make room");
    }
}
