//! A real HTTPS webhook receiver on 127.0.0.1: verifies Standard Webhooks signatures,
//! records what it got, and answers as scripted (statuses, delays, hangs, resets, headers).
//!
//! What must hold: it is a real TLS server speaking HTTP/1.1 and HTTP/2 over TCP, so
//! whatever walhook does to reach it is what it would do to reach a customer; a path's
//! script is consumed in order and then the path's default answer applies.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::tls::LocalCa;
use crate::security::secrets::SigningSecret;
use crate::security::sign::Signer;

/// One answer of the receiver.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer with this status at once.
    Status(u16),
    /// Answer with this status and headers (e.g. `Retry-After`, `Location`).
    StatusWith(u16, Vec<(String, String)>),
    /// Answer with this status after a delay.
    Delay(Duration, u16),
    /// Never answer; the client has to give up.
    Hang,
    /// Drop the connection without answering.
    Reset,
    /// Answer with this status, headers and body, byte for byte (hostile or odd answers).
    Raw(u16, Vec<(String, String)>, Bytes),
}

/// A request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path, e.g. `/ep1`.
    pub path: String,
    /// `webhook-id` header.
    pub webhook_id: String,
    /// `webhook-timestamp` header.
    pub timestamp: i64,
    /// `webhook-signature` header.
    pub signature: String,
    /// `user-agent` header.
    pub user_agent: String,
    /// `content-type` header.
    pub content_type: String,
    /// The raw body.
    pub body: Bytes,
    /// Whether the signature verified with the path's secret.
    pub verified: bool,
    /// When it arrived.
    pub at: SystemTime,
    /// What was answered (0 for a hang or reset).
    pub answered: u16,
    /// HTTP version of the request.
    pub http2: bool,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct State {
    log: Mutex<Vec<Received>>,
    secrets: Mutex<HashMap<String, Signer>>,
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    defaults: Mutex<HashMap<String, Reply>>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Received>>>,
    changed: Notify,
    connections: AtomicUsize,
    received: AtomicUsize,
    keep_bodies: std::sync::atomic::AtomicBool,
    keep_log: std::sync::atomic::AtomicBool,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Receiver({})", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Receiver {
    /// Starts a receiver on a free port of 127.0.0.1 with `ca`'s server certificate,
    /// offering HTTP/2 and HTTP/1.1.
    pub async fn start(ca: &LocalCa) -> std::io::Result<Receiver> {
        Self::start_with(ca, true).await
    }

    /// Like [`Receiver::start`], offering HTTP/1.1 only (as many real receivers do).
    pub async fn start_http1(ca: &LocalCa) -> std::io::Result<Receiver> {
        Self::start_with(ca, false).await
    }

    async fn start_with(ca: &LocalCa, offer_h2: bool) -> std::io::Result<Receiver> {
        let mut tls = ca.server_config().map_err(std::io::Error::other)?;
        if !offer_h2 {
            Arc::make_mut(&mut tls).alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        state.keep_bodies.store(true, Ordering::Relaxed);
        state.keep_log.store(true, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (st, stop2) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                st.connections.fetch_add(1, Ordering::Relaxed);
                let _ = tcp.set_nodelay(true);
                let (acceptor, st, stop3) = (acceptor.clone(), st.clone(), stop2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service = hyper::service::service_fn(move |req| handle(st.clone(), req, http2));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    tokio::select! {
                        _ = builder.serve_connection(TokioIo::new(tls), service) => {}
                        _ = stop3.cancelled() => {}
                    }
                });
            }
        });
        Ok(Receiver { addr, state, stop })
    }

    /// `https://127.0.0.1:<port>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{}", self.addr.port(), path.trim_start_matches('/'))
    }

    /// Registers the signing secret of the endpoint posting to `path`.
    pub fn set_secret(&self, path: &str, secret: &str) {
        let signer = SigningSecret::parse(secret).and_then(|s| Signer::new(&s)).expect("a whsec_ secret");
        self.state.secrets.lock().expect("lock").insert(normal(path), signer);
    }

    /// Answers the next requests on `path` with `replies`, in order.
    pub fn script(&self, path: &str, replies: Vec<Reply>) {
        self.state.scripts.lock().expect("lock").entry(normal(path)).or_default().extend(replies);
    }

    /// The answer on `path` once its script is used up (200 by default).
    pub fn set_default(&self, path: &str, reply: Reply) {
        self.state.defaults.lock().expect("lock").insert(normal(path), reply);
    }

    /// Stops keeping bodies (benchmarks).
    pub fn keep_bodies(&self, keep: bool) {
        self.state.keep_bodies.store(keep, Ordering::Relaxed);
    }

    /// Stops keeping the request log (benchmarks: `subscribe` and `total` still work).
    pub fn keep_log(&self, keep: bool) {
        self.state.keep_log.store(keep, Ordering::Relaxed);
    }

    /// Requests received in all, kept in the log or not.
    pub fn total(&self) -> usize {
        self.state.received.load(Ordering::Relaxed)
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.log.lock().expect("lock").clone()
    }

    /// Requests received on `path`.
    pub fn received_on(&self, path: &str) -> Vec<Received> {
        let p = normal(path);
        self.state.log.lock().expect("lock").iter().filter(|r| r.path == p).cloned().collect()
    }

    /// Number of requests received.
    pub fn count(&self) -> usize {
        self.state.log.lock().expect("lock").len()
    }

    /// TCP connections accepted (a refused target must leave this at zero).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// A feed of requests as they arrive.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Received> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state.subscribers.lock().expect("lock").push(tx);
        rx
    }

    /// Waits until `done` holds for what was received, or `timeout` passes; returns the log
    /// either way (`Err` on timeout).
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Result<Vec<Received>, Vec<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.state.changed.notified();
            {
                let log = self.state.log.lock().expect("lock");
                if done(&log) {
                    return Ok(log.clone());
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(self.received());
            }
        }
    }
}

fn normal(path: &str) -> String {
    format!("/{}", path.trim_start_matches('/'))
}

/// No answer: returning it makes hyper drop the connection (HTTP/1) or reset the stream
/// (HTTP/2). Used for scripted resets and for requests that never fully arrived.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped without an answer")]
struct Dropped;

async fn handle(st: Arc<State>, req: Request<Incoming>, http2: bool) -> Result<Response<Full<Bytes>>, Dropped> {
    let path = req.uri().path().to_owned();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (webhook_id, ts, signature, user_agent, content_type) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
        header("user-agent"),
        header("content-type"),
    );
    // A request whose body never fully arrived (the sender died mid-request) was not received.
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Err(Dropped);
    };
    let timestamp: i64 = ts.parse().unwrap_or(0);
    let verified = st
        .secrets
        .lock()
        .expect("lock")
        .get(&path)
        .is_some_and(|s| s.verify(&webhook_id, timestamp, &body, &signature));
    let reply = {
        let scripted = st.scripts.lock().expect("lock").get_mut(&path).and_then(VecDeque::pop_front);
        scripted.or_else(|| st.defaults.lock().expect("lock").get(&path).cloned()).unwrap_or(Reply::Status(200))
    };
    let answered = match &reply {
        Reply::Status(s) | Reply::StatusWith(s, _) | Reply::Delay(_, s) | Reply::Raw(s, _, _) => *s,
        Reply::Hang | Reply::Reset => 0,
    };
    let keep = st.keep_bodies.load(Ordering::Relaxed);
    let received = Received {
        path,
        webhook_id,
        timestamp,
        signature,
        user_agent,
        content_type,
        body: if keep { body } else { Bytes::new() },
        verified,
        at: SystemTime::now(),
        answered,
        http2,
    };
    st.received.fetch_add(1, Ordering::Relaxed);
    st.subscribers.lock().expect("lock").retain(|s| s.send(received.clone()).is_ok());
    if st.keep_log.load(Ordering::Relaxed) {
        st.log.lock().expect("lock").push(received);
    }
    st.changed.notify_waiters();
    let ok = Bytes::from_static(b"ok");
    let (status, headers, body) = match reply {
        Reply::Status(s) => (s, Vec::new(), ok),
        Reply::StatusWith(s, h) => (s, h, ok),
        Reply::Raw(s, h, body) => (s, h, body),
        Reply::Delay(d, s) => {
            tokio::time::sleep(d).await;
            (s, Vec::new(), ok)
        }
        Reply::Hang => std::future::pending().await,
        Reply::Reset => return Err(Dropped),
    };
    let mut resp = Response::builder().status(status);
    for (k, v) in headers {
        resp = resp.header(k, v);
    }
    Ok(resp.body(Full::new(body)).expect("valid response"))
}
