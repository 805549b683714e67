//! walhook's end-to-end benchmark: `cargo bench --bench pipeline` (see BENCHMARKS.md).
//!
//! Everything runs on this machine in one run, so ratios are fair on a noisy shared host:
//! a throwaway PostgreSQL (fsync on) with the sample CRM schema, a local HTTPS receiver that
//! verifies every signature, the release `walhook` binary as its own process (its RSS and
//! CPU are its own), and `pg_recvlogical` draining the same WAL as the decode-limit
//! reference. Phases: backlog drain, live latency at two rates, fan-out, and a dead endpoint
//! building a million-delivery backlog beside a healthy one. Every phase checks that the
//! receiver got every expected event. `--memory` runs only the large-row memory cases
//! (`memory.rs`) instead, `--archive` only the payload archive's cost (`archive.rs`), `--signing`
//! only what a signature costs per request by scheme and during a rotation (`signing.rs`),
//! `--backfill` only a backfill's rows/s and the live latency beside it (`backfill.rs`),
//! `--outbox` only the outbox's deliveries/s against the fast path's (`outbox.rs`),
//! `--slow` only slow receivers against the concurrency bound (`slow.rs`). `--http1` makes the
//! receiver speak only HTTP/1.1 in any of them.

mod archive;
mod backfill;
mod load;
mod measure;
mod memory;
mod outbox;
mod signing;
mod slow;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::ensure;
use clap::Parser;
use measure::{Latency, Memory, RssSampler};
use walhook::admin::endpoints::{Caller, Endpoints, NewEndpoint};
use walhook::config::Config;
use walhook::local::cluster::{ClusterOptions, TempCluster};
use walhook::local::receiver::{Received, Receiver, Reply};
use walhook::local::tls::LocalCa;
use walhook::local::SAMPLE_CRM_SCHEMA;
use walhook::model::event::EventType;
use walhook::pg::db::Db;
use walhook::security::secrets::SecretBox;
use walhook::security::ssrf::AddressPolicy;

#[derive(Debug, Parser)]
struct Args {
    /// Changes in the backlog drain.
    #[arg(long, default_value_t = 100_000)]
    changes: usize,
    /// Accounts of the drain and latency phases (one endpoint each, all events).
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// Seconds of each live-latency phase.
    #[arg(long, default_value_t = 30.0)]
    latency_secs: f64,
    /// Endpoints of the fan-out account.
    #[arg(long, default_value_t = 100)]
    fanout_endpoints: usize,
    /// Changes written for the fan-out account.
    #[arg(long, default_value_t = 2_000)]
    fanout_changes: usize,
    /// Deliveries the dead endpoint accumulates (0 skips the phase).
    #[arg(long, default_value_t = 1_000_000)]
    backlog: usize,
    /// A small, quick run that only checks the benchmark still works.
    #[arg(long)]
    smoke: bool,
    /// Run only the memory cases: large rows behind a slow endpoint (RSS during and after).
    #[arg(long)]
    memory: bool,
    /// Run only the payload archive's cost: the same backlog drained with it off, on, off.
    #[arg(long)]
    archive: bool,
    /// Run only the signing cost per request: v1, v1a, and each during a rotation.
    #[arg(long)]
    signing: bool,
    /// Run only the backfill: rows/s, and live latency at 200/s beside it.
    #[arg(long)]
    backfill: bool,
    /// Backfill: rows of the backfilled account.
    #[arg(long, default_value_t = 100_000)]
    backfill_rows: usize,
    /// Backfill: rows of ~300 kB of the large-row case.
    #[arg(long, default_value_t = 600)]
    backfill_big_rows: usize,
    /// Memory cases: the endpoint answers each request after this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    answer_ms: u64,
    /// Memory cases: rows of the large-row case.
    #[arg(long, default_value_t = 3_000)]
    big_rows: usize,
    /// Memory cases: kB per row of the large-row case.
    #[arg(long, default_value_t = 400)]
    big_row_kb: usize,
    /// Memory cases: rows of the medium-row case (0 skips it).
    #[arg(long, default_value_t = 6_000)]
    medium_rows: usize,
    /// Memory cases: kB per row of the medium-row case.
    #[arg(long, default_value_t = 40)]
    medium_row_kb: usize,
    /// walhook's `dispatch.memory_limit` (its default when not given).
    #[arg(long)]
    memory_limit: Option<String>,
    /// Run only the slow receivers: 100 endpoints answering after 200 ms, with the defaults
    /// and with each `--slow-concurrency`.
    #[arg(long)]
    slow: bool,
    /// Slow receivers: changes of the backlog each case drains.
    #[arg(long, default_value_t = 40_000)]
    slow_changes: usize,
    /// Slow receivers: milliseconds before each answer.
    #[arg(long, default_value_t = 200)]
    slow_answer_ms: u64,
    /// Slow receivers: `dispatch.max_concurrency` of a further case (repeatable).
    #[arg(long)]
    slow_concurrency: Vec<usize>,
    /// Run only the outbox against the fast path: a recovered endpoint per account drains
    /// `--outbox-changes` failed deliveries.
    #[arg(long)]
    outbox: bool,
    /// Outbox: changes of each of the two drains.
    #[arg(long, default_value_t = 200_000)]
    outbox_changes: usize,
    /// The receiver speaks only HTTP/1.1 (every mode).
    #[arg(long)]
    http1: bool,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

const PHASE_DRAIN: u8 = 1;
const PHASE_LOW: u8 = 2;
const PHASE_HIGH: u8 = 3;
const PHASE_FANOUT: u8 = 4;
const PHASE_BACKLOG: u8 = 5;
const PHASE_BESIDE: u8 = 6;
const PHASE_MEMORY_BIG: u8 = 7;
const PHASE_MEMORY_MEDIUM: u8 = 8;
const PHASE_MEMORY_FAST: u8 = 12;

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.signing {
        return signing::run(args.smoke);
    }
    if args.smoke {
        (args.changes, args.accounts, args.latency_secs) = (2_000, 10, 3.0);
        (args.fanout_endpoints, args.fanout_changes, args.backlog) = (10, 100, 2_000);
        (args.backfill_rows, args.backfill_big_rows, args.slow_changes) = (2_000, 50, 2_000);
        args.outbox_changes = 2_000;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args))
}

fn account(i: usize) -> uuid::Uuid {
    uuid::Uuid::from_u128(0xacc0_0000_0000_4000_8000_0000_0000_0000 | i as u128)
}
const FANOUT_ACCOUNT: usize = 0xf0f0;
const DEAD_ACCOUNT: usize = 0xdead;

/// What the receiver saw, per phase.
#[derive(Default)]
struct Seen {
    count: usize,
    ids: HashSet<u128>,
    unverified: usize,
    by_event: HashMap<String, usize>,
    /// (row number, path, arrival) of each request.
    arrivals: Vec<(usize, bool, SystemTime)>,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
}

/// Reads phase, row number and event type out of a body without parsing all of it.
fn peek(body: &[u8]) -> Option<(u8, usize, &str)> {
    let text = std::str::from_utf8(body).ok()?;
    let event = text.strip_prefix("{\"event\":\"")?.split('"').next()?;
    let id_at = text.find("\"data\":{\"id\":\"")? + 14;
    let (phase, n) = load::parse_row_id(text.get(id_at..id_at + 36)?)?;
    Some((phase, n, event))
}

fn collect(mut feed: tokio::sync::mpsc::UnboundedReceiver<Received>, seen: Arc<Mutex<HashMap<u8, Seen>>>) {
    tokio::spawn(async move {
        while let Some(r) = feed.recv().await {
            let Some((phase, n, event)) = peek(&r.body) else { continue };
            let mut all = seen.lock().unwrap();
            let s = all.entry(phase).or_default();
            s.count += 1;
            if let Ok(id) = uuid::Uuid::parse_str(&r.webhook_id) {
                s.ids.insert(id.as_u128());
            }
            s.unverified += usize::from(!r.verified);
            *s.by_event.entry(event.to_owned()).or_default() += 1;
            s.arrivals.push((n, r.path != "/dead", r.at));
            s.first = Some(s.first.map_or(r.at, |f| f.min(r.at)));
            s.last = Some(s.last.map_or(r.at, |l| l.max(r.at)));
        }
    });
}

struct Bench {
    cluster: TempCluster,
    url: String,
    client: tokio_postgres::Client,
    receiver: Receiver,
    dir: tempfile::TempDir,
    ca_path: std::path::PathBuf,
    seen: Arc<Mutex<HashMap<u8, Seen>>>,
    /// Extra `[dispatch]` lines of walhook's configuration.
    dispatch_extra: String,
    /// Extra sections after `[dispatch]` (e.g. `[retention]`).
    retention_extra: String,
}

impl Bench {
    async fn new(http1: bool) -> anyhow::Result<Bench> {
        let cluster = tokio::task::spawn_blocking(|| {
            TempCluster::start(&ClusterOptions {
                fsync: true,
                extra_conf: vec!["max_wal_size = 8GB".into(), "checkpoint_timeout = 30min".into()],
            })
        })
        .await??;
        let url = cluster.create_database("bench").await?;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client.batch_execute(SAMPLE_CRM_SCHEMA).await?;
        let ca = LocalCa::generate()?;
        let dir = tempfile::tempdir()?;
        let ca_path = ca.write_ca_pem(dir.path())?;
        let receiver = if http1 { Receiver::start_http1(&ca).await? } else { Receiver::start(&ca).await? };
        receiver.keep_log(false);
        let seen = Arc::new(Mutex::new(HashMap::new()));
        collect(receiver.subscribe(), seen.clone());
        Ok(Bench {
            cluster,
            url,
            client,
            receiver,
            dir,
            ca_path,
            seen,
            dispatch_extra: String::new(),
            retention_extra: String::new(),
        })
    }

    fn config_toml(&self) -> String {
        format!(
            "[database]\nurl = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [replication]\nslot = \"bench\"\npublication = \"bench\"\n\
             [dispatch]\nallowed_cidrs = [\"127.0.0.0/8\"]\nca_certs = [\"{}\"]\n{}{}[log]\nlevel = \"warn\"\n",
            self.url,
            self.ca_path.display(),
            self.dispatch_extra,
            self.retention_extra,
        )
    }

    async fn endpoints(&self, args: &Args) -> anyhow::Result<()> {
        let cfg = Config::from_toml(&self.config_toml())?;
        let db = Db::new(&cfg.database)?;
        walhook::app::migrate(&db, &cfg).await?;
        let endpoints = Endpoints::new(
            db,
            SecretBox::new(None)?,
            AddressPolicy::new(cfg.dispatch.allowed_cidrs.clone()),
            cfg.database.crm_schema.as_str(),
        );
        let all: Vec<String> = EventType::ALL.iter().map(|e| e.name().to_owned()).collect();
        let make = |acct: usize, path: String| {
            let (endpoints, url, all) = (endpoints.clone(), self.receiver.url(&path), all.clone());
            async move {
                let caller = Caller { account_id: account(acct), user_id: account(acct) };
                let new = NewEndpoint { url: Some(url), events: Some(all), ..Default::default() };
                let (_, secret) = endpoints.create(caller, new).await?;
                anyhow::Ok((path, secret.expose().to_owned()))
            }
        };
        let mut jobs = Vec::new();
        for i in 0..args.accounts {
            jobs.push(make(i, format!("acct{i}")));
        }
        for j in 0..args.fanout_endpoints {
            jobs.push(make(FANOUT_ACCOUNT, format!("fan{j}")));
        }
        jobs.push(make(memory::MEMORY_ACCOUNT, "slow".into()));
        jobs.push(make(DEAD_ACCOUNT, "dead".into()));
        jobs.push(make(DEAD_ACCOUNT, "alive".into()));
        for job in jobs {
            let (path, secret) = job.await?;
            self.receiver.set_secret(&path, &secret);
        }
        self.receiver.set_default("dead", Reply::Hang);
        Ok(())
    }

    fn spawn_walhook(&self) -> anyhow::Result<Child> {
        let path = self.dir.path().join("walhook.toml");
        std::fs::write(&path, self.config_toml())?;
        // PIPELINE_BENCH_WRAP puts a wrapper that execs walhook in front of it (e.g. "taskset -c 1").
        // (Not WALHOOK_*: walhook reads those as configuration and refuses unknown keys.)
        let wrap = std::env::var("PIPELINE_BENCH_WRAP").unwrap_or_default();
        let mut argv: Vec<String> = wrap.split_whitespace().map(str::to_owned).collect();
        argv.push(env!("CARGO_BIN_EXE_walhook").to_owned());
        Ok(Command::new(&argv[0])
            .args(&argv[1..])
            .args(["run", "--config", path.to_str().unwrap_or_default()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?)
    }

    async fn scalar(&self, q: &str) -> anyhow::Result<i64> {
        Ok(self.client.query_one(q, &[]).await?.get(0))
    }

    fn phase<T>(&self, phase: u8, f: impl FnOnce(&Seen) -> T) -> T {
        let all = self.seen.lock().unwrap();
        f(all.get(&phase).unwrap_or(&Seen::default()))
    }

    async fn wait_for_phase(&self, phase: u8, expected: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.phase(phase, |s| s.count);
            if got >= expected {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "phase {phase}: only {got} of {expected} webhooks arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the drain wrote to the WAL, by record type (`pg_waldump --stats=record`), when
/// `PIPELINE_BENCH_WALDUMP` is set.
async fn waldump(b: &Bench, from: &str) -> anyhow::Result<()> {
    let row =
        b.client.query_one("SELECT current_setting('data_directory'), pg_current_wal_insert_lsn()::text", &[]).await?;
    let (dir, to): (String, String) = (row.get(0), row.get(1));
    let out = Command::new(b.cluster.bindir().join("pg_waldump"))
        .args(["--stats=record", "-p", &format!("{dir}/pg_wal"), "-s", from, "-e", &to])
        .output()?;
    println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Checks a phase's deliveries: all arrived once, signed, with the right mix of operations.
fn verify(b: &Bench, phase: u8, expected: usize, per_change: usize) -> anyhow::Result<()> {
    b.phase(phase, |s| {
        ensure!(s.count == expected, "phase {phase}: {} webhooks, expected {expected}", s.count);
        ensure!(s.ids.len() == expected, "phase {phase}: {} distinct webhook ids of {expected}", s.ids.len());
        ensure!(s.unverified == 0, "phase {phase}: {} signatures did not verify", s.unverified);
        let ops = |op: &str| s.by_event.iter().filter(|(e, _)| e.ends_with(op)).map(|(_, c)| c).sum::<usize>();
        if let Some(changes) = expected.checked_div(per_change) {
            ensure!(
                (ops(".created"), ops(".updated"), ops(".deleted"))
                    == (changes * 6 / 10 * per_change, changes * 3 / 10 * per_change, changes / 10 * per_change),
                "phase {phase}: wrong mix of operations {:?}",
                s.by_event
            );
        }
        Ok(())
    })
}

/// Latencies (ms) of a phase's arrivals on healthy paths against commit return times.
fn latencies(b: &Bench, phase: u8, commits: &HashMap<usize, SystemTime>, tx_of: impl Fn(usize) -> usize) -> Latency {
    b.phase(phase, |s| {
        Latency::of(
            s.arrivals
                .iter()
                .filter(|(_, healthy, _)| *healthy)
                .filter_map(|(n, _, at)| {
                    let committed = commits.get(&tx_of(*n))?;
                    Some(at.duration_since(*committed).map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0))
                })
                .collect(),
        )
    })
}

struct Row {
    figure: String,
    value: String,
    target: String,
    holds: Option<bool>,
}

fn row(figure: impl Into<String>, value: impl Into<String>, target: impl Into<String>, holds: Option<bool>) -> Row {
    Row { figure: figure.into(), value: value.into(), target: target.into(), holds }
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    let mut b = Bench::new(args.http1).await?;
    if let Some(limit) = &args.memory_limit {
        b.dispatch_extra = format!("memory_limit = {limit:?}\n");
    }
    if args.memory {
        (args.accounts, args.fanout_endpoints) = (0, 0);
        b.endpoints(&args).await?;
        let (slow, kb) = (args.answer_ms, args.big_row_kb);
        let mut cases = vec![
            memory::Case { phase: PHASE_MEMORY_BIG, rows: args.big_rows, kb, answer_ms: slow, per_tx: 10 },
            memory::Case { phase: PHASE_MEMORY_FAST, rows: args.big_rows, kb, answer_ms: 0, per_tx: 1 },
        ];
        if args.medium_rows > 0 {
            let (rows, kb) = (args.medium_rows, args.medium_row_kb);
            cases.push(memory::Case { phase: PHASE_MEMORY_MEDIUM, rows, kb, answer_ms: slow, per_tx: 10 });
        }
        return memory::run(&b, &args, &cases).await;
    }
    if args.backfill {
        (args.accounts, args.fanout_endpoints) = (1, 0);
        return backfill::run(&mut b, &args).await;
    }
    if args.outbox {
        args.fanout_endpoints = 0;
        b.endpoints(&args).await?;
        return outbox::run(&mut b, &args).await;
    }
    if args.slow {
        args.fanout_endpoints = 0;
        b.endpoints(&args).await?;
        return slow::run(&mut b, &args).await;
    }
    if args.archive {
        args.fanout_endpoints = 0;
        b.endpoints(&args).await?;
        return archive::run(&mut b, &args).await;
    }
    b.endpoints(&args).await?;
    // (`walhook migrate` created walhook's slot; the reference slots start here, before the
    // load, like it.)
    b.client
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('reference' || i, 'pgoutput') FROM generate_series(1, 3) i",
        )
        .await?;
    let mut rows = Vec::new();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!("machine: {} cores, {machine}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));

    // 1 + 2. Backlog written while walhook is stopped; the decode limit over the same WAL.
    let txs = args.changes / 10;
    let t = Instant::now();
    let accounts = args.accounts;
    load::bulk(&b.url, PHASE_DRAIN, txs, 4, move |t| account(t % accounts)).await?;
    let n = txs * 10;
    println!("loaded {n} changes in {:.1} s", t.elapsed().as_secs_f64());
    let end_lsn: String = b.client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    // Three decodes of the same WAL, one slot each; the median is the reference (this shared
    // machine's speed wanders by a third from one second to the next).
    let mut decode_rates = Vec::new();
    let backend: i32 = b.client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let postmaster = measure::parent_of(backend as u32);
    let reaped_before = measure::reaped_cpu_secs(postmaster);
    for i in 1..=3 {
        let slot = format!("reference{i}");
        let t = Instant::now();
        let status = Command::new(b.cluster.bindir().join("pg_recvlogical"))
            .args(["-h", "127.0.0.1", "-p", &b.cluster.port().to_string(), "-U", "postgres", "-d", "bench"])
            .args(["--slot", &slot, "--start", "-E", &end_lsn, "-f", "/dev/null", "--no-loop"])
            .args(["-o", "proto_version=1", "-o", "publication_names=bench"])
            .status()?;
        ensure!(status.success(), "pg_recvlogical failed");
        decode_rates.push(n as f64 / t.elapsed().as_secs_f64());
        b.client.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')")).await?;
    }
    decode_rates.sort_by(f64::total_cmp);
    let decode_rate = decode_rates[1];
    // The reference walsenders have exited: the postmaster reaped their CPU.
    let walsender_us = 1e6 * (measure::reaped_cpu_secs(postmaster) - reaped_before) / (3 * n) as f64;
    println!(
        "decode limit: {:.0} / {:.0} / {:.0} rows/s (median taken)",
        decode_rates[0], decode_rates[1], decode_rates[2]
    );

    let pg_before = measure::pg_cpu_by_kind();
    let self_before = measure::cpu_secs(std::process::id());
    let wal_before = b.scalar("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8").await?;
    let lsn_before: String = b.client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
    let started = Instant::now();
    let mut walhook = b.spawn_walhook()?;
    let pid = walhook.id();
    let rss = RssSampler::start(pid);
    b.wait_for_phase(PHASE_DRAIN, n, Duration::from_secs(1800)).await?;
    let drained = Instant::now();
    let recorded = loop {
        if b.scalar("SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'").await? >= n as i64 {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let walhook_cpu = measure::cpu_secs(pid);
    let wal_bytes = b.scalar("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8").await? - wal_before;
    if std::env::var_os("PIPELINE_BENCH_WALDUMP").is_some() {
        waldump(&b, &lsn_before).await?;
    }
    let pg_after = measure::pg_cpu_by_kind();
    let backends_cpu =
        pg_after.get("backends").copied().unwrap_or(0.0) - pg_before.get("backends").copied().unwrap_or(0.0);
    let (pg_cpu, pg_parts) = measure::pg_cpu_delta(&pg_before, &pg_after);
    let bench_cpu = measure::cpu_secs(std::process::id()) - self_before;
    verify(&b, PHASE_DRAIN, n, 1)?;
    let (first, last) = b.phase(PHASE_DRAIN, |s| (s.first, s.last));
    let span = last.zip(first).and_then(|(l, f)| l.duration_since(f).ok()).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    let drain_rate = n as f64 / span;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let drain_mem = Memory::of(&rss.between(started, recorded));
    let idle_mem = Memory::of(&rss.between(recorded + Duration::from_secs(1), Instant::now()));
    let ratio = drain_rate / decode_rate;
    println!(
        "drain: {n} events, first→last {span:.2} s = {drain_rate:.0}/s = {:.0}% of decode limit {decode_rate:.0}/s; recorded {:.2} s after start",
        100.0 * ratio,
        recorded.duration_since(started).as_secs_f64()
    );
    println!(
        "drain CPU: walhook {walhook_cpu:.1} s, postgres {pg_cpu:.1} s ({pg_parts}), receiver+bench {bench_cpu:.1} s; wall {:.1} s",
        drained.duration_since(started).as_secs_f64()
    );
    let backends_us = 1e6 * backends_cpu / n as f64;
    let (walhook_us, receiver_us) = (1e6 * walhook_cpu / n as f64, 1e6 * bench_cpu / n as f64);
    println!(
        "per delivered event: walhook {walhook_us:.1} µs CPU, postgres backends {backends_us:.1} µs, WAL {:.0} bytes; \
         reference walsender {walsender_us:.1} µs CPU per decoded row",
        wal_bytes as f64 / n as f64
    );
    rows.push(row("Decode limit (pg_recvlogical, pgoutput)", format!("{decode_rate:.0} rows/s"), "reference", None));
    rows.push(row(
        "Postgres backends' CPU recording an event (drain)",
        format!(
            "{backends_us:.1} µs ({:.1}× the walsender's {walsender_us:.1} µs per decoded row)",
            backends_us / walsender_us
        ),
        "≤ the walsender's per decoded row",
        Some(backends_us <= walsender_us),
    ));
    rows.push(row(
        "WAL written per delivered event (drain)",
        format!("{:.0} bytes", wal_bytes as f64 / n as f64),
        "halved",
        None,
    ));
    rows.push(row(
        "walhook CPU per event (drain)",
        format!(
            "{walhook_us:.1} µs ({:.1}× the receiver's {receiver_us:.1} µs, loader included)",
            walhook_us / receiver_us
        ),
        "≤ 1.5× the receiver's",
        Some(walhook_us <= 1.5 * receiver_us),
    ));
    rows.push(row(
        "Backlog drain",
        format!("{drain_rate:.0} events/s ({:.0}% of decode limit)", 100.0 * ratio),
        "≥ 40% of decode limit",
        Some(ratio >= 0.4),
    ));
    rows.push(row(
        "CPU per 1,000 events (drain)",
        format!(
            "walhook {:.3} s; postgres {:.3} s; receiver {:.3} s",
            1e3 * walhook_cpu / n as f64,
            1e3 * pg_cpu / n as f64,
            1e3 * bench_cpu / n as f64
        ),
        "—",
        None,
    ));

    // 3. Live latency at two rates.
    let mut latency_mem = Vec::new();
    for (phase, rate, p50_max, p99_max) in [(PHASE_LOW, 200.0, Some(5.0), 25.0), (PHASE_HIGH, 1000.0, None, 50.0)] {
        let from = Instant::now();
        let cpu0 = measure::cpu_secs(pid);
        let commits = load::paced(&b.url, phase, rate, args.latency_secs, account(0)).await?;
        let expected = commits.len();
        b.wait_for_phase(phase, expected, Duration::from_secs(120)).await?;
        verify(&b, phase, expected, 0)?;
        let lat = latencies(&b, phase, &commits, |n| n);
        let mem = Memory::of(&rss.between(from, Instant::now()));
        latency_mem.push(mem);
        let cpu = measure::cpu_secs(pid) - cpu0;
        println!(
            "latency at {rate}/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} events; RSS peak {:.1} MiB median {:.1}; walhook CPU {:.3} s per 1,000",
            lat.p50, lat.p99, lat.max, lat.count, mem.peak, mem.median, 1e3 * cpu / expected as f64
        );
        let holds = p50_max.is_none_or(|m| lat.p50 <= m) && lat.p99 <= p99_max;
        let target = match p50_max {
            Some(m) => format!("p50 ≤ {m} ms, p99 ≤ {p99_max} ms"),
            None => format!("p99 ≤ {p99_max} ms"),
        };
        rows.push(row(
            format!("Live latency at {rate}/s"),
            format!("p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", lat.p50, lat.p99, lat.max),
            target,
            Some(holds),
        ));
    }

    // 4. Fan-out: one account, many endpoints.
    let txs = args.fanout_changes / 10;
    load::bulk(&b.url, PHASE_FANOUT, txs, 4, |_| account(FANOUT_ACCOUNT)).await?;
    let expected = txs * 10 * args.fanout_endpoints;
    b.wait_for_phase(PHASE_FANOUT, expected, Duration::from_secs(600)).await?;
    verify(&b, PHASE_FANOUT, expected, args.fanout_endpoints)?;
    let (first, last) = b.phase(PHASE_FANOUT, |s| (s.first, s.last));
    let span = last.zip(first).and_then(|(l, f)| l.duration_since(f).ok()).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    let fanout_rate = expected as f64 / span;
    println!(
        "fan-out: {expected} deliveries to {} endpoints in {span:.2} s = {fanout_rate:.0}/s",
        args.fanout_endpoints
    );
    rows.push(row(
        format!("Fan-out (1 account, {} endpoints)", args.fanout_endpoints),
        format!("{fanout_rate:.0} deliveries/s"),
        "≥ 20,000 deliveries/s",
        Some(fanout_rate >= 20_000.0),
    ));

    // 5. A dead endpoint builds a backlog beside a healthy one.
    if args.backlog > 0 {
        let from = Instant::now();
        let txs = args.backlog / 10;
        load::bulk(&b.url, PHASE_BACKLOG, txs, 2, |_| account(DEAD_ACCOUNT)).await?;
        let healthy_expected = txs * 10;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let pending_q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'pending'";
        // Counting a million pending rows costs Postgres CPU: count only once the healthy
        // endpoint has everything, and then every few seconds.
        loop {
            let healthy = b.phase(PHASE_BACKLOG, |s| s.arrivals.iter().filter(|a| a.1).count());
            let pending = if healthy >= healthy_expected { b.scalar(pending_q).await? } else { 0 };
            if pending >= healthy_expected as i64 {
                break;
            }
            ensure!(Instant::now() < deadline, "backlog: {healthy} healthy deliveries, {pending} pending");
            tokio::time::sleep(Duration::from_secs(if healthy >= healthy_expected { 3 } else { 1 })).await;
        }
        let built = Instant::now();
        // The healthy endpoint's latency while the dead one holds the backlog (and its retries
        // keep timing out): single-change transactions at 200/s to the account of both.
        let commits = load::paced(&b.url, PHASE_BESIDE, 200.0, args.latency_secs, account(DEAD_ACCOUNT)).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let healthy = |b: &Bench| b.phase(PHASE_BESIDE, |s| s.arrivals.iter().filter(|a| a.1).count());
        while healthy(&b) < commits.len() {
            ensure!(
                Instant::now() < deadline,
                "beside the dead endpoint: {} of {} arrived",
                healthy(&b),
                commits.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lat = latencies(&b, PHASE_BESIDE, &commits, |n| n);
        // Flat means: the second half of the build and what follows look like the first half.
        tokio::time::sleep(Duration::from_secs(if args.smoke { 2 } else { 10 })).await;
        let mem = Memory::of(&rss.between(from, Instant::now()));
        let half = from + built.duration_since(from) / 2;
        let early = Memory::of(&rss.between(from, half));
        let late = Memory::of(&rss.between(half, Instant::now()));
        let drift = (late.median - early.median) / early.median;
        let pending = b.scalar(pending_q).await?;
        println!(
            "dead endpoint: {pending} pending deliveries in {:.0} s; RSS peak {:.1} MiB, median {:.1} (first half {:.1}, second half {:.1}, drift {:+.0}%); healthy endpoint beside it at 200/s: p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            built.duration_since(from).as_secs_f64(), mem.peak, mem.median, early.median, late.median, 100.0 * drift, lat.p50, lat.p99, lat.max
        );
        rows.push(row(
            format!("RSS with a dead endpoint's {pending}-delivery backlog"),
            format!("peak {:.1} MiB, median {:.1} MiB, drift {:+.0}%", mem.peak, mem.median, 100.0 * drift),
            "≤ 40 MiB steady, ≤ 64 MiB peak, flat ±10%",
            Some(mem.median <= 40.0 && mem.peak <= 64.0 && drift.abs() <= 0.10),
        ));
        rows.push(row(
            "Healthy endpoint beside the dead one, 200/s",
            format!("p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", lat.p50, lat.p99, lat.max),
            "p50 ≤ 5 ms, p99 ≤ 25 ms (as at 200/s)",
            Some(lat.p50 <= 5.0 && lat.p99 <= 25.0),
        ));
    }
    let steady = latency_mem.iter().map(|m| m.median).fold(idle_mem.median, f64::max);
    let peak = latency_mem.iter().map(|m| m.peak).fold(drain_mem.peak, f64::max);
    let after_cpu = rows.iter().position(|r| r.figure.starts_with("CPU per 1,000")).map_or(rows.len(), |i| i + 1);
    rows.insert(
        after_cpu,
        row(
            "RSS during drain and live latency",
            format!("peak {peak:.1} MiB, steady {steady:.1} MiB (idle after drain {:.1})", idle_mem.median),
            "≤ 40 MiB steady, ≤ 64 MiB peak",
            Some(steady <= 40.0 && peak <= 64.0),
        ),
    );

    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = walhook.wait();
    drop(rss);
    println!("\n| Figure | Measured | Target | Holds |\n|---|---|---|---|");
    for r in &rows {
        let holds = match r.holds {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!("| {} | {} | {} | {holds} |", r.figure, r.value, r.target);
    }
    Ok(())
}
