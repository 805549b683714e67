//! Test support: one throwaway PostgreSQL cluster shared by every test of the binary (started
//! by the first test that needs it, removed by its watchdog when the binary exits), one
//! database (with its own slot and publication) per test, a real HTTPS receiver, and walhook
//! run either in-process or as the real binary (for kill -9 and signals). Waits are conditions
//! with deadlines; "nothing more arrives" is judged once walhook is quiescent
//! (`Env::quiescent`), never after a fixed sleep. A test that must change process-wide state
//! runs alone in a child process (`alone`).
#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use walhook::admin::endpoints::{Caller, EndpointView, Endpoints, NewEndpoint};
use walhook::config::Config;
use walhook::local::cluster::{ClusterOptions, TempCluster};
use walhook::local::receiver::{Received, Receiver};
use walhook::local::tls::LocalCa;
use walhook::local::SAMPLE_CRM_SCHEMA;
use walhook::pg::db::Db;
use walhook::security::secrets::SecretBox;
use walhook::security::ssrf::AddressPolicy;

/// Store writer settings of a writer a test runs by itself: its own metrics and health,
/// the default stall time, no payload archive.
pub fn writer_settings() -> walhook::store::WriterSettings {
    let metrics = Arc::new(walhook::ops::metrics::Metrics::new());
    let health = Arc::new(walhook::ops::StoreHealth::new(metrics.store_stalled.clone(), metrics.store_pinned.clone()));
    walhook::store::WriterSettings { health, metrics, stall_after: walhook::store::DEFAULT_STALL_AFTER, archive: false }
}

/// Logs of in-process walhook instances go to `$WALHOOK_TEST_LOG` when set.
fn init_test_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Some(path) = std::env::var_os("WALHOOK_TEST_LOG") {
            let file = std::fs::File::create(path).expect("log file");
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info,walhook=trace,pgwire_replication=debug")
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .try_init();
        }
    });
}

/// The cluster shared by the tests of the binary. (A static is never dropped: the cluster's
/// watchdog stops and removes it once this process has exited.)
pub fn cluster() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| TempCluster::start(&ClusterOptions::default()).expect("throwaway PostgreSQL"))
}

/// A throwaway cluster of the test's own (for tests that restart or reconfigure it).
pub fn own_cluster(extra_conf: &[&str]) -> TempCluster {
    TempCluster::start(&ClusterOptions { fsync: false, extra_conf: extra_conf.iter().map(|s| s.to_string()).collect() })
        .expect("throwaway PostgreSQL")
}

/// Seconds a started walhook has to stream its slot.
const STREAMING_WITHIN: u64 = 60;

pub const ACCOUNT_A: Uuid = Uuid::from_u128(0xaaaa_0000_0000_4000_8000_0000_0000_0001);
pub const ACCOUNT_B: Uuid = Uuid::from_u128(0xbbbb_0000_0000_4000_8000_0000_0000_0002);
pub const USER: Uuid = Uuid::from_u128(0xcccc_0000_0000_4000_8000_0000_0000_0003);

/// Everything one test needs: its database, a receiver, and a way to run walhook.
pub struct Env {
    pub name: String,
    pub url: String,
    pub db: Db,
    pub ca: LocalCa,
    pub ca_path: PathBuf,
    pub receiver: Receiver,
    pub dir: tempfile::TempDir,
    pub client: tokio_postgres::Client,
    pub metrics_port: u16,
    pub api_port: u16,
}

/// A port for a listener walhook opens later, from outside the range outgoing connections
/// take their local ports from (see `walhook::local::port`).
pub fn free_port() -> u16 {
    walhook::local::port::free().expect("a free port")
}

impl Env {
    /// A database named after the test with the sample CRM schema, migrated.
    pub async fn new(name: &str) -> Env {
        Self::on(cluster(), name).await
    }

    /// Like `new`, on a given cluster.
    pub async fn on(cluster: &TempCluster, name: &str) -> Env {
        let env = Self::unmigrated(cluster, name).await;
        let cfg = env.config("");
        walhook::app::migrate(&env.db, &cfg).await.expect("migrate");
        env
    }

    /// Runs `walhook migrate` for another slot (as an operator does before pointing walhook at
    /// a copy of its slot): a slot that exists is adopted.
    pub async fn migrate_slot(&self, slot: &str) {
        let cfg = self.config(&format!("[replication]\nslot = \"{slot}\"\n"));
        walhook::app::migrate(&self.db, &cfg).await.expect("migrate");
    }

    /// A database with the sample CRM schema that `walhook migrate` has not touched.
    pub async fn unmigrated(cluster: &TempCluster, name: &str) -> Env {
        init_test_logging();
        let url = cluster.create_database(name).await.expect("create database");
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        client.batch_execute(SAMPLE_CRM_SCHEMA).await.expect("sample schema");
        let ca = LocalCa::generate().expect("CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_path = ca.write_ca_pem(dir.path()).expect("CA pem");
        let receiver = Receiver::start(&ca).await.expect("receiver");
        let mut env = Env {
            name: name.to_owned(),
            url,
            db: Db::new(&Config::from_toml("[database]\nurl = \"postgres://x@localhost/x\"").unwrap().database)
                .unwrap(),
            ca,
            ca_path,
            receiver,
            dir,
            client,
            metrics_port: free_port(),
            api_port: free_port(),
        };
        env.db = Db::new(&env.config("").database).expect("db");
        env
    }

    /// The test configuration with `extra` TOML merged over it, key by key.
    pub fn config_toml(&self, extra: &str) -> String {
        let base = format!(
            "[database]\nurl = \"{url}\"\npool_size = 4\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [replication]\nslot = \"{name}\"\npublication = \"{name}\"\nstatus_interval = \"100ms\"\n\
             [dispatch]\nallowed_cidrs = [\"127.0.0.0/8\"]\nca_certs = [\"{ca}\"]\n\
             retry_schedule = [\"300ms\", \"600ms\", \"1s\"]\njitter = 0.0\nrequest_timeout = \"3s\"\n\
             connect_timeout = \"2s\"\npoll_interval = \"100ms\"\n\
             [shutdown]\ngrace = \"5s\"\n\
             [log]\nlevel = \"info,walhook=debug\"\n",
            url = self.url,
            api = self.api_port,
            metrics = self.metrics_port,
            name = self.name,
            ca = self.ca_path.display(),
        );
        let mut merged: toml::Table = base.parse().expect("base config");
        let extra: toml::Table = extra.parse().unwrap_or_else(|e| panic!("extra config: {e}"));
        merge(&mut merged, extra);
        toml::to_string(&merged).expect("config renders")
    }

    pub fn config(&self, extra: &str) -> Config {
        Config::from_toml(&self.config_toml(extra)).unwrap_or_else(|e| panic!("{e}\n{}", self.config_toml(extra)))
    }

    /// Registers an endpoint of `account` posting to receiver path `path`.
    pub async fn endpoint(&self, account: Uuid, path: &str, events: &[&str]) -> EndpointView {
        let (view, secret) = self.endpoint_url(account, &self.receiver.url(path), events).await;
        self.receiver.set_secret(path, &secret);
        view
    }

    /// Registers an endpoint of `account` posting to any `url`; returns it and its secret.
    /// (The address policy is wide open here: what dispatch refuses at connect time is what
    /// some tests are about.)
    pub async fn endpoint_url(&self, account: Uuid, url: &str, events: &[&str]) -> (EndpointView, String) {
        let open = AddressPolicy::new(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
        let endpoints = Endpoints::new(self.db.clone(), SecretBox::new(None).unwrap(), open, "public");
        let (view, secret) = endpoints
            .create(
                Caller { account_id: account, user_id: USER },
                NewEndpoint {
                    url: Some(url.to_owned()),
                    description: None,
                    events: Some(events.iter().map(|e| e.to_string()).collect()),
                    ..Default::default()
                },
            )
            .await
            .expect("create endpoint");
        (view, secret.expose().to_owned())
    }

    /// The instance's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await.unwrap().text().await.unwrap()
    }

    /// The value of one sample line of `/metrics` (0 when absent).
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find(|l| l.starts_with(line_prefix) && l[line_prefix.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn sql(&self, q: &str) {
        self.client.batch_execute(q).await.unwrap_or_else(|e| panic!("{q}: {e}"));
    }

    pub async fn scalar_i64(&self, q: &str) -> i64 {
        self.client.query_one(q, &[]).await.unwrap_or_else(|e| panic!("{q}: {e}")).get(0)
    }

    /// Sets `synchronous_standby_names` (commits with `synchronous_commit = on` wait for
    /// those standbys; none if empty) and waits until a new session sees it.
    pub async fn synchronous_standby(&self, names: &str) {
        self.sql(&format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'")).await;
        self.sql("SELECT pg_reload_conf()").await;
        wait_for(Duration::from_secs(10), || async {
            let (fresh, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let now: String = fresh.query_one("SHOW synchronous_standby_names", &[]).await.unwrap().get(0);
            now == names
        })
        .await;
    }

    /// Runs walhook in this process with `extra` config and waits, as a user does, until its
    /// `/readyz` says it is ready and streams (not standing by); stop it with `InProcess::stop`.
    pub async fn start(&self, extra: &str) -> InProcess {
        let cfg = Arc::new(self.config(extra));
        let ops = cfg.metrics.listen;
        let token = CancellationToken::new();
        let handle = tokio::spawn(walhook::app::run(cfg, token.clone()));
        let mut ip = InProcess { token, handle: Some(handle) };
        let ready = wait_ready(ops, Readiness::Streaming);
        tokio::pin!(ready);
        tokio::select! {
            () = &mut ready => {}
            // walhook stopped before it was ready: say why instead of waiting out the deadline.
            ended = ip.handle.as_mut().expect("just spawned") => panic!("walhook stopped before it was ready: {ended:?}"),
        }
        ip
    }

    /// Waits until the walhook on this test's operations port is ready as `how` says.
    pub async fn ready(&self, how: Readiness) {
        wait_ready(format!("127.0.0.1:{}", self.metrics_port).parse().unwrap(), how).await
    }

    /// Writes the config to a file and starts the real binary with it.
    pub fn spawn_binary(&self, extra: &str) -> Proc {
        self.spawn_command("run", extra)
    }

    /// Starts `walhook <command> --config <this test's config + extra>`.
    pub fn spawn_command(&self, command: &str, extra: &str) -> Proc {
        self.spawn_command_with(command, extra, |_| {})
    }

    /// Like `spawn_command`, with `setup` applied to the command first (environment, limits).
    pub fn spawn_command_with(&self, command: &str, extra: &str, setup: impl FnOnce(&mut Command)) -> Proc {
        let path = self.dir.path().join(format!("walhook-{}.toml", Uuid::new_v4()));
        std::fs::write(&path, self.config_toml(extra)).unwrap();
        let log = self.dir.path().join(format!("walhook-{}.log", Uuid::new_v4()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhook"));
        cmd.args([command, "--config", path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            // The tests' own log switch is no walhook setting (WALHOOK_* are config keys).
            .env_remove("WALHOOK_TEST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        setup(&mut cmd);
        let child = cmd.spawn().expect("spawn walhook");
        Proc { child, log }
    }

    /// The slot's confirmed position.
    pub async fn confirmed_lsn(&self) -> i64 {
        self.confirmed_lsn_of(&self.name).await
    }

    /// The confirmed position of `slot`.
    pub async fn confirmed_lsn_of(&self, slot: &str) -> i64 {
        self.scalar_i64(&format!(
            "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
    }

    /// Waits until walhook has nothing more to do for what this test committed so far: the
    /// slot's confirmed position has passed the WAL position read now (after the test's last
    /// commit), and no delivery in this test's database is pending (waiting for a retry, or in
    /// flight from the outbox). A position is confirmed only once every delivery before it is
    /// settled, so by then the receiver has got all it will get, short of retries. Panics,
    /// naming what is still outstanding, if that takes longer than 30 s.
    pub async fn quiescent(&self) {
        self.quiescent_slot(&self.name).await
    }

    /// Like `quiescent`, for walhook streaming `slot`.
    pub async fn quiescent_slot(&self, slot: &str) {
        let target = self.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
        let pending = "SELECT count(*) FROM walhook.deliveries WHERE status = 'pending'";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (confirmed, pending) = (self.confirmed_lsn_of(slot).await, self.scalar_i64(pending).await);
            if confirmed >= target && pending == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not quiescent within 30 s: slot {slot} confirmed {confirmed:#x}, the last commit ends by \
                 {target:#x}; {pending} deliveries pending"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs test `name` (`file::test`) alone in a child process of this test binary, for a test
/// that changes state of its whole process (it starves it of file descriptors, installs the
/// log subscriber) and would break the tests running beside it. In the child this returns
/// `true`: run the test's body. In the test's own process it runs the child, fails unless the
/// child ran exactly that test and it passed, and returns `false`: the body already ran.
pub async fn alone(name: &str) -> bool {
    const VAR: &str = "WALHOOK_TEST_ALONE";
    if std::env::var_os(VAR).is_some_and(|v| v == name) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = tokio::process::Command::new(exe)
        .args([name, "--exact", "--test-threads", "1", "--nocapture"])
        .env(VAR, name)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the test in a child process");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{name}, run alone:\n{stdout}\n{stderr}");
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name}, run alone in a child process, failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    false
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// walhook running inside the test process.
pub struct InProcess {
    pub token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<Result<(), walhook::app::AppError>>>,
}

impl InProcess {
    /// Graceful stop; returns walhook's result.
    pub async fn stop(mut self) -> Result<(), walhook::app::AppError> {
        self.token.cancel();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), handle).await.expect("walhook stops within 30 s").unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The walhook binary running as a child process.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }

    /// Waits for exit; `None` if still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a ready walhook says it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Ready and streaming the slot.
    Streaming,
    /// Ready, standing by while another replica streams.
    Standby,
}

/// `/readyz` of the walhook whose operations listener is `ops`: status and JSON body (`None`
/// when nothing answers).
pub async fn readyz(ops: std::net::SocketAddr) -> Option<(u16, serde_json::Value)> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let r = client.get(format!("http://{ops}/readyz")).send().await.ok()?;
    let status = r.status().as_u16();
    let body = r.bytes().await.ok()?;
    Some((status, serde_json::from_slice(&body).unwrap_or_default()))
}

/// Waits (the same generous deadline as a start may take on a loaded machine) until `/readyz`
/// on `ops` is 200 and says `how`; panics with its last answer otherwise.
pub async fn wait_ready(ops: std::net::SocketAddr, how: Readiness) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(STREAMING_WITHIN);
    let mut last = None;
    loop {
        if let Some((status, body)) = readyz(ops).await {
            let standby = body["standby"].as_bool() == Some(true);
            if status == 200 && standby == (how == Readiness::Standby) {
                return;
            }
            last = Some((status, body));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "walhook on {ops} not ready ({how:?}) within {STREAMING_WITHIN} s; /readyz last said {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A synchronous standby that is not there (for `synchronous_standby_names`).
pub const ABSENT_STANDBY: &str = "walhook_absent_standby";
/// Sessions whose commit waits for a synchronous standby.
pub const SYNC_WAITS: &str = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'";

/// Polls `cond` until it holds; panics after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(wait_until(timeout, cond).await, "condition not met within {timeout:?}");
}

/// Polls `cond` until it holds (true) or `timeout` passes (false), for a caller that says
/// what it saw when it fails.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to two minutes until `receiver` has seen every key of `expected` (`key` of each
/// request); then returns what it received. Fails naming how many arrived, a few missing
/// ones, and `proc`'s log.
pub async fn wait_for_keys<K: Eq + Hash + Debug>(
    receiver: &Receiver,
    expected: &HashSet<K>,
    key: impl Fn(&Received) -> K,
    proc: &Proc,
) -> Vec<Received> {
    let seen = |rs: &[Received]| rs.iter().map(&key).collect::<HashSet<_>>();
    receiver.wait_until(Duration::from_secs(120), |rs| expected.is_subset(&seen(rs))).await.unwrap_or_else(|rs| {
        let seen = seen(&rs);
        let missing: Vec<_> = expected.difference(&seen).take(5).collect();
        panic!("{} of {} changes arrived; missing e.g. {missing:?}\n{}", seen.len(), expected.len(), proc.log_text())
    })
}
