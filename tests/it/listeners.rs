//! Connection exhaustion: clients holding idle connections (no token, nothing sent) must not
//! take the descriptors that the API's real callers, the readiness probe, outbound deliveries
//! and the database need; clients holding places by sending something (one byte, a trickled
//! body, keep-alive polling) cannot keep probes or real requests out either; a request must
//! arrive whole within the header timeout and its headers fit a bounded buffer; an outbound
//! attempt that fails for a local resource reason is retried without spending one of the
//! delivery's attempts.
//!
//! The tests of this file run one at a time (`SERIAL`). The two that starve their own process
//! of file descriptors (one also installs the log subscriber) run alone in a child process of
//! the test binary (`common::alone`), so they starve no test of another file.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{self, wait_for, Env, ACCOUNT_A, USER};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use walhook::local::receiver::Receiver;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOKEN: &str = "listeners-operator-token-5a1c9e";
/// The descriptor limit the binary runs with.
const NOFILE: u64 = 256;
/// Caps small enough for `NOFILE`: 32 + 8 + 32 + 4 (pool) + 128 reserved = 204.
const CAPS: &str = "[api]\nmax_connections = 32\nheader_timeout = \"1s\"\n\
                    [metrics]\nmax_connections = 8\nheader_timeout = \"1s\"\n\
                    [dispatch]\nmax_concurrency = 32\n";
const BUDGET: usize = 204;

fn token_config() -> String {
    let sha: String = Sha256::digest(TOKEN.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "[auth]\nstatic_tokens = [{{ token_sha256 = \"{sha}\", account_id = \"{ACCOUNT_A}\", user_id = \"{USER}\" }}]\n"
    )
}

/// Runs the child with `RLIMIT_NOFILE` = `limit` (soft and hard).
fn nofile(limit: u64) -> impl FnOnce(&mut Command) {
    move |cmd| {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let rl = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Clients that keep `n` idle connections open to `addr`, reconnecting whenever walhook
/// closes one, like an attacker would.
struct IdleClients {
    stop: CancellationToken,
    connected: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl IdleClients {
    fn start(addrs: &[(SocketAddr, usize)]) -> IdleClients {
        let clients = IdleClients { stop: CancellationToken::new(), connected: Arc::default(), closed: Arc::default() };
        for &(addr, n) in addrs {
            for _ in 0..n {
                let (stop, connected, closed) =
                    (clients.stop.clone(), clients.connected.clone(), clients.closed.clone());
                tokio::spawn(async move {
                    loop {
                        let attempt =
                            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr));
                        let conn = tokio::select! {
                            _ = stop.cancelled() => return,
                            c = attempt => c,
                        };
                        let Ok(Ok(mut conn)) = conn else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        connected.fetch_add(1, Ordering::Relaxed);
                        let mut buf = [0u8; 256];
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = conn.read(&mut buf) => { closed.fetch_add(1, Ordering::Relaxed); }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
            }
        }
        clients
    }
}

impl Drop for IdleClients {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_starve_neither_the_api_nor_readiness_nor_deliveries() {
    let _serial = SERIAL.lock().await;
    let env = Env::new("listeners_idle").await;
    env.endpoint(ACCOUNT_A, "ok", &["contact.created"]).await;
    let mut wh = env.spawn_command_with("run", &format!("{CAPS}{}", token_config()), nofile(NOFILE));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let readyz = format!("http://127.0.0.1:{}/readyz", env.metrics_port);
    wait_for(Duration::from_secs(30), || async { http.get(&readyz).send().await.is_ok_and(|r| r.status() == 200) })
        .await;

    let api: SocketAddr = format!("127.0.0.1:{}", env.api_port).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    // Below the cap, a connection that sends nothing is closed after the header timeout.
    let mut lone = tokio::net::TcpStream::connect(api).await.unwrap();
    let lone_closed = tokio::time::timeout(Duration::from_secs(10), async {
        while lone.read(&mut [0u8; 64]).await.is_ok_and(|n| n > 0) {}
    })
    .await
    .is_ok();
    let idle = IdleClients::start(&[(api, 250), (metrics, 50)]);
    wait_for(Duration::from_secs(20), || async { idle.connected.load(Ordering::Relaxed) >= 300 }).await;

    let pid = wh.child.id();
    let most_fds = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (most, on) = (most_fds.clone(), sampling.clone());
        tokio::spawn(async move {
            while on.load(Ordering::Relaxed) {
                most.fetch_max(open_fds(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let list = async {
        let url = format!("http://127.0.0.1:{}/api/webhooks-list", env.api_port);
        let started = std::time::Instant::now();
        let outcome = match http
            .post(url)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
        {
            Ok(r) => format!("HTTP {}", r.status().as_u16()),
            Err(e) => format!("failed: {e:?}"),
        };
        (outcome, started.elapsed())
    };
    let ready = async {
        match http.get(&readyz).send().await {
            Ok(r) => format!("HTTP {}", r.status().as_u16()),
            Err(e) => format!("failed: {e:?}"),
        }
    };
    let delivery = async {
        env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')")
            .await;
        let q = "SELECT count(*) FROM walhook.deliveries WHERE status <> 'pending'";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while env.scalar_i64(q).await == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let row = env
            .client
            .query_opt("SELECT status, attempt_count, coalesce(last_error, '') FROM walhook.deliveries", &[])
            .await
            .unwrap();
        row.map(|r| {
            format!("{} after {} attempt(s) {}", r.get::<_, String>(0), r.get::<_, i32>(1), r.get::<_, String>(2))
        })
        .unwrap_or_else(|| "no delivery row".into())
    };
    let closes = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while idle.closed.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        idle.closed.load(Ordering::Relaxed)
    };
    let ((list, list_took), ready, delivery, closed) = tokio::join!(list, ready, delivery, closes);
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let most_fds = most_fds.load(Ordering::Relaxed);
    drop(idle);
    let log = wh.log_text();
    let exhausted = log.contains("Too many open files");
    println!("lone closed: {lone_closed}; list: {list} in {list_took:?}; readyz: {ready}; delivery: {delivery}; idle connections closed: {closed}; most descriptors: {most_fds}");
    let ok = lone_closed
        && list == "HTTP 200"
        && ready == "HTTP 200"
        && delivery == "delivered after 1 attempt(s) "
        && closed > 0
        && most_fds <= BUDGET
        && !exhausted;
    assert!(
        ok,
        "a lone silent connection closed after api.header_timeout: {lone_closed}; \
         with 300 idle connections held: webhooks-list {list}; /readyz {ready}; the delivery {delivery}; \
         idle connections closed by walhook: {closed}; most descriptors open: {most_fds} (budget {BUDGET}, \
         limit {NOFILE}); 'Too many open files' in the log: {exhausted}"
    );
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(20)).await.is_some_and(|s| s.success()), "{}", wh.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_start_when_the_caps_do_not_fit_the_descriptor_limit() {
    let _serial = SERIAL.lock().await;
    let env = Env::new("listeners_budget").await;
    // Defaults: 1024 + 64 + 1024 + 4 + 128 descriptors, far over 256.
    let mut wh = env.spawn_command_with("run", "", nofile(NOFILE));
    let status = wh.wait_exit(Duration::from_secs(20)).await;
    let log = wh.log_text();
    assert!(status.is_some_and(|s| !s.success()), "walhook must refuse to start: {status:?}\n{log}");
    for key in ["api.max_connections", "metrics.max_connections", "dispatch.max_concurrency", "database.pool_size"] {
        assert!(log.contains(key), "the error names {key}: {log}");
    }
    assert!(log.contains("RLIMIT_NOFILE") && log.contains("256"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_stalls_is_closed_after_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    let env = Env::new("listeners_stalled_body").await;
    let wh = env.start(&format!("[api]\nidle_timeout = \"1s\"\n{}", token_config())).await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", env.api_port)).await.unwrap();
    let head = format!(
        "POST /api/webhooks-list HTTP/1.1\r\nhost: walhook\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
    );
    tokio::io::AsyncWriteExt::write_all(&mut conn, head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "a request whose body stalls must be closed after api.idle_timeout");
    wh.stop().await.unwrap();
}

/// Keeps this process out of file descriptors until dropped: the soft limit is lowered to
/// what is open, and every descriptor that frees up is taken again at once.
struct Starve {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    saved: libc::rlimit,
}

impl Starve {
    fn start() -> Starve {
        let mut saved = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: reads into the struct passed.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut saved) }, 0);
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap();
        let low = libc::rlimit { rlim_cur: highest + 1, rlim_max: saved.rlim_max };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        let stop = Arc::new(AtomicBool::new(false));
        let on = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !on.load(Ordering::Relaxed) {
                while let Ok(f) = std::fs::File::open("/dev/null") {
                    held.push(f);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Starve { stop, thread: Some(thread), saved }
    }
}

impl Drop for Starve {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: writes the limit saved at start.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.saved) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_failing_for_lack_of_descriptors_does_not_spend_an_attempt() {
    let _serial = SERIAL.lock().await;
    if !common::alone("listeners::an_attempt_failing_for_lack_of_descriptors_does_not_spend_an_attempt").await {
        return;
    }
    let env = Env::new("listeners_local_failure").await;
    env.endpoint(ACCOUNT_A, "warm", &["contact.created"]).await;
    // One retry only: had the local failures counted, the delivery would fail for good.
    let wh = env.start("[dispatch]\nretry_schedule = [\"300ms\"]\n").await;
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')").await;
    let delivered = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(delivered).await == 1 }).await;
    // A receiver walhook has no connection to yet: its attempt needs a new socket.
    let fresh = Receiver::start(&env.ca).await.unwrap();
    let (ep, _) = env.endpoint_url(ACCOUNT_A, &fresh.url("fresh"), &["company.created"]).await;
    let q = format!(
        "SELECT status, attempt_count, next_attempt_at FROM walhook.deliveries WHERE endpoint_id = '{}'",
        ep.id
    );

    let starve = Starve::start();
    env.sql("INSERT INTO companies (account_id, name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'c')").await;
    // Wait until the delivery has failed for good, or has been retried locally at least
    // twice (more attempts than its schedule allows).
    let mut due_times = std::collections::HashSet::new();
    let mut state = (String::new(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while state.0 != "failed" && due_times.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no outcome within 40 s: {state:?}, {due_times:?}");
        if let Some(r) = env.client.query_opt(q.as_str(), &[]).await.unwrap() {
            state = (r.get::<_, String>(0), r.get::<_, i32>(1));
            if let Some(t) = r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(2) {
                due_times.insert(t);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(starve);
    let error: String = env
        .client
        .query_one(
            &format!("SELECT coalesce(last_error, '') FROM walhook.deliveries WHERE endpoint_id = '{}'", ep.id),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (state.0.as_str(), state.1),
        ("pending", 0),
        "out of descriptors, the delivery must wait without spending attempts (last error: {error})"
    );
    assert!(error.starts_with("local:") && error.contains("open files"), "{error}");
    let done =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'delivered'", ep.id);
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(&done).await == 1 }).await;
    let count = format!("SELECT attempt_count::int8 FROM walhook.deliveries WHERE endpoint_id = '{}'", ep.id);
    assert_eq!(env.scalar_i64(&count).await, 1, "delivered on its first counted attempt");
    let attempts = format!(
        "SELECT count(*) FROM walhook.attempt_log a JOIN walhook.deliveries d ON d.id = a.delivery_id \
         WHERE d.endpoint_id = '{}'",
        ep.id
    );
    assert_eq!(env.scalar_i64(&attempts).await, 1, "local failures are not recorded as attempts");
    assert_eq!(fresh.received_on("fresh").len(), 1);
    assert!(env.metric("walhook_dispatch_attempts_total{outcome=\"local\"}").await >= 2.0);
    wh.stop().await.unwrap();
}

/// One tenant's many endpoints on many ports and two spellings of one host (each its own
/// connection pool), answering after a second: walhook's outbound connections, in flight and
/// pooled together, stay within the descriptor budget its start-up check accepted, so no
/// delivery fails for lack of descriptors and the API keeps answering beside idle clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_hosts_of_one_tenant_keep_outbound_connections_within_the_descriptor_budget() {
    let _serial = SERIAL.lock().await;
    let env = Env::new("listeners_outbound_budget").await;
    let mut receivers = Vec::new();
    // HTTP/1.1 receivers, as most real ones are: a connection per request in flight.
    for _ in 0..10 {
        let r = Receiver::start_http1(&env.ca).await.unwrap();
        r.set_default("slow", walhook::local::receiver::Reply::Delay(Duration::from_secs(1), 200));
        r.keep_bodies(false);
        for spelling in ["127.0.0.1", "localhost"] {
            let url = r.url("slow").replace("127.0.0.1", spelling);
            env.endpoint_url(ACCOUNT_A, &url, &["contact.created"]).await;
        }
        receivers.push(r);
    }
    let mut wh = env.spawn_command_with("run", &format!("{CAPS}{}", token_config()), nofile(NOFILE));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let readyz = format!("http://127.0.0.1:{}/readyz", env.metrics_port);
    wait_for(Duration::from_secs(30), || async { http.get(&readyz).send().await.is_ok_and(|r| r.status() == 200) })
        .await;
    let api: SocketAddr = format!("127.0.0.1:{}", env.api_port).parse().unwrap();
    let idle = IdleClients::start(&[(api, 20)]);
    env.sql(
        "INSERT INTO contacts (account_id, first_name) \
         SELECT 'aaaa0000-0000-4000-8000-000000000001', 'c' || i FROM generate_series(1, 25) i",
    )
    .await;
    let pid = wh.child.id();
    let mut most_fds = 0;
    let mut calls = Vec::new();
    let done = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while env.scalar_i64(done).await < 500 {
        assert!(tokio::time::Instant::now() < deadline, "not all 500 delivered within 120 s\n{}", wh.log_text());
        most_fds = most_fds.max(open_fds(pid));
        let list = http
            .post(format!("http://{api}/api/webhooks-list"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await;
        calls.push(list.map(|r| r.status().as_u16()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(idle);
    let local = env.metric("walhook_dispatch_attempts_total{outcome=\"local\"}").await;
    let log = wh.log_text();
    println!("most descriptors {most_fds} (budget {BUDGET}); API answers {calls:?}; local failures {local}");
    assert!(calls.iter().all(|&c| c == 200), "the API kept answering: {calls:?}");
    assert_eq!(local, 0.0, "no attempt failed for lack of descriptors:\n{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(most_fds <= BUDGET, "{most_fds} descriptors open, over the budget of {BUDGET}");
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.is_some_and(|s| s.success()), "{}", wh.log_text());
}

#[test]
fn listener_limits_that_cannot_work_are_refused_naming_the_key() {
    let base = "[database]\nurl = \"postgres://u@h/db\"\n";
    for (extra, key) in [
        ("[api]\nmax_connections = 0\n", "api.max_connections"),
        ("[metrics]\nmax_connections = 0\n", "metrics.max_connections"),
        ("[api]\nheader_timeout = \"0s\"\n", "api.header_timeout"),
        ("[metrics]\nidle_timeout = \"0s\"\n", "metrics.idle_timeout"),
        ("[api]\nidle_timeout = \"soon\"\n", "api.idle_timeout"),
    ] {
        let e = walhook::config::Config::from_toml(&format!("{base}{extra}")).unwrap_err().to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
}

/// An attacker's connection: what it sends, and how it holds its place.
#[derive(Clone, Copy)]
enum Hold {
    /// One byte of a request, then nothing.
    OneByte,
    /// A valid request every `0`, keeping the connection alive between them.
    KeepAlive(&'static str, Duration),
    /// An authorized POST announcing a 60,000-byte body, then one byte every `0`.
    SlowBody(Duration),
    /// `1` pipelined `GET 0` with a tiny receive window, never reading an answer.
    NeverReads(&'static str, usize),
}

/// `n` attacker connections to `addr` of kind `hold`, each reconnecting when walhook closes it.
fn attack(stop: &CancellationToken, addr: SocketAddr, n: usize, hold: Hold) {
    use tokio::io::AsyncWriteExt;
    for _ in 0..n {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let connect = async {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    if let Hold::NeverReads(..) = hold {
                        socket.set_recv_buffer_size(1024)?;
                    }
                    socket.connect(addr).await
                };
                let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let held = async {
                    let mut buf = vec![0u8; 8192];
                    match hold {
                        Hold::OneByte => {
                            conn.write_all(b"P").await?;
                            while conn.read(&mut buf).await? > 0 {}
                        }
                        Hold::KeepAlive(path, every) => loop {
                            let req = format!("GET {path} HTTP/1.1\r\nhost: walhook\r\n\r\n");
                            conn.write_all(req.as_bytes()).await?;
                            // Read the response (any bytes will do), then wait.
                            if conn.read(&mut buf).await? == 0 {
                                break;
                            }
                            tokio::time::sleep(every).await;
                        },
                        Hold::NeverReads(path, n) => {
                            let req = format!("GET {path} HTTP/1.1\r\nhost: walhook\r\n\r\n").repeat(n);
                            conn.write_all(req.as_bytes()).await?;
                            // Hold the place, reading nothing; a closed connection shows as a
                            // failing write (blank lines between requests are allowed).
                            loop {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                match conn.try_write(b"\r\n") {
                                    Ok(_) => {}
                                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                    Err(e) => return Err(e),
                                }
                            }
                        }
                        Hold::SlowBody(every) => {
                            let head = format!(
                                "POST /api/webhooks-list HTTP/1.1\r\nhost: walhook\r\nauthorization: Bearer {TOKEN}\r\n\
                                 content-type: application/json\r\ncontent-length: 60000\r\n\r\n"
                            );
                            conn.write_all(head.as_bytes()).await?;
                            loop {
                                conn.write_all(b" ").await?;
                                tokio::select! {
                                    r = conn.read(&mut buf) => if r? == 0 { break },
                                    _ = tokio::time::sleep(every) => {}
                                }
                            }
                        }
                    }
                    Ok::<(), std::io::Error>(())
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = held => {}
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_probes_and_real_requests_get_in_past_clients_that_sent_something() {
    let _serial = SERIAL.lock().await;
    let env = Env::new("listeners_heard").await;
    let caps = "[api]\nmax_connections = 8\nheader_timeout = \"20s\"\nidle_timeout = \"60s\"\n\
                [metrics]\nmax_connections = 8\nheader_timeout = \"20s\"\nidle_timeout = \"60s\"\n";
    let wh = env.start(&format!("{caps}{}", token_config())).await;
    let api: SocketAddr = format!("127.0.0.1:{}", env.api_port).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    attack(&stop, metrics, 8, Hold::KeepAlive("/healthz", Duration::from_millis(500)));
    attack(&stop, metrics, 12, Hold::OneByte);
    attack(&stop, api, 6, Hold::KeepAlive("/api/openapi.json", Duration::from_millis(500)));
    attack(&stop, api, 8, Hold::OneByte);
    attack(&stop, api, 8, Hold::SlowBody(Duration::from_millis(300)));
    // Let the attackers take every place.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Like a kubelet probe: a new connection, 3 s to answer.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3)).pool_max_idle_per_host(0).build().unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let ready = match http.get(format!("http://{metrics}/readyz")).send().await {
            Ok(r) => format!("readyz HTTP {}", r.status().as_u16()),
            Err(e) => format!("readyz failed: {e}"),
        };
        let list = match http
            .post(format!("http://{api}/api/webhooks-list"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
        {
            Ok(r) => format!("list HTTP {}", r.status().as_u16()),
            Err(e) => format!("list failed: {e}"),
        };
        outcomes.push(ready);
        outcomes.push(list);
    }
    stop.cancel();
    assert!(
        outcomes.iter().all(|o| o.ends_with("HTTP 200")),
        "with every place held by clients that sent something, probes and requests must still get in: {outcomes:?}"
    );
    wh.stop().await.unwrap();
}

/// Clients that pipeline many requests and never read the answers (a tiny receive window):
/// once an answer cannot be delivered the connection loses its place, so real calls, `/readyz`
/// and `/healthz` (the chart's liveness probe) keep answering on both listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_answers_lose_their_places() {
    let _serial = SERIAL.lock().await;
    let env = Env::new("listeners_never_read").await;
    let caps = "[api]\nmax_connections = 16\nheader_timeout = \"2s\"\nidle_timeout = \"60s\"\n\
                [metrics]\nmax_connections = 8\nheader_timeout = \"2s\"\nidle_timeout = \"60s\"\n";
    let wh = env.start(&format!("{caps}{}", token_config())).await;
    let api: SocketAddr = format!("127.0.0.1:{}", env.api_port).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    attack(&stop, api, 40, Hold::NeverReads("/api/openapi.json", 80));
    attack(&stop, metrics, 20, Hold::NeverReads("/metrics", 200));
    attack(&stop, metrics, 10, Hold::NeverReads("/readyz", 2000));
    // Let them fill every place and every send buffer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).pool_max_idle_per_host(0).build().unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        for url in [format!("http://{metrics}/readyz"), format!("http://{metrics}/healthz")] {
            outcomes.push(match http.get(&url).send().await {
                Ok(r) => format!("{url} HTTP {}", r.status().as_u16()),
                Err(e) => format!("{url} failed: {e}"),
            });
        }
        let list = http
            .post(format!("http://{api}/api/webhooks-list"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await;
        outcomes.push(match list {
            Ok(r) => format!("list HTTP {}", r.status().as_u16()),
            Err(e) => format!("list failed: {e}"),
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    assert!(
        outcomes.iter().all(|o| o.ends_with("HTTP 200")),
        "clients that never read must not keep probes and real calls out: {outcomes:?}"
    );
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_trickled_slower_than_the_header_timeout_allows_is_closed() {
    let _serial = SERIAL.lock().await;
    let env = Env::new("listeners_trickled_body").await;
    let wh = env.start(&format!("[api]\nheader_timeout = \"2s\"\nidle_timeout = \"60s\"\n{}", token_config())).await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", env.api_port)).await.unwrap();
    let head = format!(
        "POST /api/webhooks-list HTTP/1.1\r\nhost: walhook\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 60000\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut conn, head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut conn, b" ").await;
            tokio::select! {
                r = conn.read(&mut buf) => if !r.is_ok_and(|n| n > 0) { return },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a body trickled one byte at a time must be closed once api.header_timeout has passed");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_beyond_the_buffer_bound_are_refused_at_once() {
    let _serial = SERIAL.lock().await;
    let env = Env::new("listeners_big_headers").await;
    let wh = env.start("[metrics]\nheader_timeout = \"60s\"\n").await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", env.metrics_port)).await.unwrap();
    let mut head = b"GET /healthz HTTP/1.1\r\nhost: walhook\r\nx-filler: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let _ = tokio::io::AsyncWriteExt::write_all(&mut conn, &head).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(
        ended.is_ok() && (got.is_empty() || text.starts_with("HTTP/1.1 431")),
        "64 KiB of headers must be refused long before the 60 s header timeout (closed: {}, got: {text:?})",
        ended.is_ok()
    );
    wh.stop().await.unwrap();
}

/// A log sink this test can read back.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap()).matches(needle).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failures_are_logged_at_most_once_a_second() {
    let _serial = SERIAL.lock().await;
    if !common::alone("listeners::accept_failures_are_logged_at_most_once_a_second").await {
        return;
    }
    let log = Captured::default();
    let sink = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("walhook::security::listener=warn")
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .try_init()
        .expect("this test needs the process's log subscriber (unset WALHOOK_TEST_LOG)");
    let env = Env::new("listeners_accept_warn").await;
    let wh = env.start("").await;
    // Sockets made before starving: connecting them needs no new descriptor, accepting them
    // does. They connect a few at a time, so some always wait to be accepted even when a
    // descriptor frees up now and then.
    let sockets: Vec<tokio::net::TcpSocket> = (0..320).map(|_| tokio::net::TcpSocket::new_v4().unwrap()).collect();
    let addr: SocketAddr = format!("127.0.0.1:{}", env.api_port).parse().unwrap();
    const LINE: &str = "accepting a connection failed";
    let starve = Starve::start();
    let started = std::time::Instant::now();
    let connecting = tokio::spawn(async move {
        let mut conns = Vec::new();
        let mut sockets = sockets.into_iter();
        loop {
            let batch: Vec<_> = sockets.by_ref().take(8).collect();
            if batch.is_empty() {
                return conns;
            }
            for s in batch {
                conns.push(s.connect(addr).await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    wait_for(Duration::from_secs(10), || async { log.count(LINE) >= 1 }).await;
    // A fixed wait, on purpose: the rate of lines is judged over a few seconds of failures.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines = log.count(LINE);
    let secs = started.elapsed().as_secs_f64();
    drop(starve);
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).to_string();
    println!("{lines} lines in {secs:.1} s:\n{text}");
    assert!(
        (lines as f64) <= secs.ceil() + 1.0,
        "{lines} accept-failure lines in {secs:.1} s: at most one a second expected\n{text}"
    );
    assert!(text.contains("not_logged="), "a line counts the failures not logged: {text}");
    drop(connecting.await.unwrap());
    wh.stop().await.unwrap();
}
