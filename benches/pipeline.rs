//! walhook's end-to-end benchmark: `cargo bench --bench pipeline -- [--changes N] [--smoke]`.
//!
//! Everything runs in one process tree on this machine, in one run, so the ratios are fair on
//! a noisy shared host: a throwaway PostgreSQL (fsync on), the sample CRM schema, a local
//! HTTPS receiver that verifies every signature, the release `walhook` binary as its own
//! process (so its RSS and CPU are its own), and `pg_recvlogical` as the decode-limit
//! reference over the same publication and the same WAL.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use walhook::config::Config;
use walhook::db::Db;
use walhook::decode::all_event_types;
use walhook::dispatch::ssrf::AddressPolicy;
use walhook::endpoints::{Caller, Endpoints, NewEndpoint};
use walhook::local::cluster::{ClusterOptions, TempCluster};
use walhook::local::receiver::Receiver;
use walhook::local::tls::LocalCa;
use walhook::local::SAMPLE_CRM_SCHEMA;
use walhook::secrets::SecretBox;

#[derive(Debug, Parser)]
struct Args {
    /// Changes in the backlog-drain run.
    #[arg(long, default_value_t = 100_000)]
    changes: usize,
    /// Accounts (one endpoint each, subscribed to everything).
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// A small, quick run that only checks the benchmark still works.
    #[arg(long)]
    smoke: bool,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.changes = 2_000;
        args.accounts = 10;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args))
}

/// One account's id.
fn account(i: usize) -> uuid::Uuid {
    uuid::Uuid::from_u128(0xacc0_0000_0000_4000_8000_0000_0000_0000 | i as u128)
}

struct Bench {
    cluster: TempCluster,
    url: String,
    client: tokio_postgres::Client,
    receiver: Receiver,
    dir: tempfile::TempDir,
    ca_path: std::path::PathBuf,
}

impl Bench {
    async fn new(name: &str) -> anyhow::Result<Bench> {
        let cluster = tokio::task::spawn_blocking(|| {
            TempCluster::start(&ClusterOptions {
                fsync: true,
                extra_conf: vec!["max_wal_size = 4GB".into(), "checkpoint_timeout = 30min".into()],
            })
        })
        .await??;
        let url = cluster.create_database(name).await?;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client.batch_execute(SAMPLE_CRM_SCHEMA).await?;
        let ca = LocalCa::generate()?;
        let dir = tempfile::tempdir()?;
        let ca_path = ca.write_ca_pem(dir.path())?;
        let receiver = Receiver::start(&ca).await?;
        receiver.keep_bodies(false);
        Ok(Bench { cluster, url, client, receiver, dir, ca_path })
    }

    fn config_toml(&self) -> String {
        format!(
            "[database]\nurl = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [replication]\nslot = \"bench\"\npublication = \"bench\"\n\
             [dispatch]\nallowed_cidrs = [\"127.0.0.0/8\"]\nca_certs = [\"{}\"]\n[log]\nlevel = \"warn\"\n",
            self.url,
            self.ca_path.display()
        )
    }

    async fn migrate_and_endpoints(&self, accounts: usize) -> anyhow::Result<()> {
        let cfg = Config::from_toml(&self.config_toml())?;
        let db = Db::new(&cfg.database)?;
        walhook::migrate::migrate(&db, &cfg).await?;
        let endpoints =
            Endpoints::new(db, SecretBox::new(None)?, AddressPolicy::new(cfg.dispatch.allowed_cidrs.clone()));
        for i in 0..accounts {
            let path = format!("acct{i}");
            let (_, secret) = endpoints
                .create(
                    Caller { account_id: account(i), user_id: account(i) },
                    NewEndpoint {
                        url: Some(self.receiver.url(&path)),
                        description: None,
                        events: Some(all_event_types().map(str::to_owned).collect()),
                    },
                )
                .await?;
            self.receiver.set_secret(&path, secret.expose());
        }
        Ok(())
    }

    fn spawn_walhook(&self) -> anyhow::Result<Child> {
        let path = self.dir.path().join("walhook.toml");
        std::fs::write(&path, self.config_toml())?;
        Ok(Command::new(env!("CARGO_BIN_EXE_walhook"))
            .args(["run", "--config", path.to_str().unwrap_or_default()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?)
    }

    async fn scalar(&self, q: &str) -> anyhow::Result<i64> {
        Ok(self.client.query_one(q, &[]).await?.get(0))
    }
}

/// Writes `changes` changes, 10 per transaction (6 inserts, 3 updates, 1 delete), spread over
/// `accounts`, about 0.7 KB per row with tags and custom_fields, on 4 connections.
async fn load(url: &str, changes: usize, accounts: usize) -> anyhow::Result<usize> {
    let txs = changes / 10;
    let workers = 4;
    let mut handles = Vec::new();
    for w in 0..workers {
        let url = url.to_owned();
        handles.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let tables = ["contacts", "companies", "activities", "projects"];
            let mut sql = String::with_capacity(16 * 1024);
            for t in (w..txs).step_by(workers) {
                sql.clear();
                sql.push_str("BEGIN;");
                let table = tables[t % 4];
                let acct = account(t % accounts);
                let ids: Vec<String> = (0..6).map(|k| format!("b0000000-0000-4000-8000-{:012}", t * 10 + k)).collect();
                let filler = "x".repeat(420);
                let json = format!("'{{\"source\": \"bench\", \"score\": {t}, \"nested\": {{\"a\": [1, 2, 3]}}}}'");
                let tags = format!("ARRAY['vip', 'tier {}', 'q\"uote']", t % 7);
                for id in &ids {
                    let (cols, vals) = match table {
                        "contacts" => (
                            "first_name, last_name, email, title, tags, custom_fields",
                            format!("'Ann{t}', '{filler}', 'a{t}@example.com', 'CTO', {tags}, {json}"),
                        ),
                        "companies" => (
                            "name, domain, industry, tags, custom_fields",
                            format!("'Acme {t}', 'acme{t}.example', '{filler}', {tags}, {json}"),
                        ),
                        "activities" => ("subject, body, metadata", format!("'Call {t}', '{filler}', {json}")),
                        _ => ("name, status, tags, custom_fields", format!("'{filler}', 'active', {tags}, {json}")),
                    };
                    sql.push_str(&format!(
                        "INSERT INTO {table} (id, account_id, {cols}) VALUES ('{id}', '{acct}', {vals});"
                    ));
                }
                for id in &ids[..3] {
                    sql.push_str(&format!("UPDATE {table} SET updated_at = now() WHERE id = '{id}';"));
                }
                sql.push_str(&format!("DELETE FROM {table} WHERE id = '{}';", ids[5]));
                sql.push_str("COMMIT;");
                client.batch_execute(&sql).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(txs * 10)
}

/// Samples a process's resident memory (KiB) and CPU time (clock ticks) from /proc.
fn proc_stats(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let cpu = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((rss, cpu))
}

/// Ticks per second of /proc CPU times.
const CLK_TCK: f64 = 100.0;

async fn run(args: Args) -> anyhow::Result<()> {
    println!("walhook pipeline benchmark: {} changes, {} accounts", args.changes, args.accounts);
    let b = Bench::new("bench").await?;
    b.migrate_and_endpoints(args.accounts).await?;
    // Both slots exist before the load, so both hold the same backlog.
    b.client.batch_execute("SELECT pg_create_logical_replication_slot('bench', 'pgoutput'); SELECT pg_create_logical_replication_slot('reference', 'pgoutput');").await?;
    let t = Instant::now();
    let n = load(&b.url, args.changes, args.accounts).await?;
    let load_secs = t.elapsed().as_secs_f64();
    let end_lsn: String = b.client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    println!("loaded {n} changes in {load_secs:.1} s ({:.0} changes/s)", n as f64 / load_secs);

    // 1. Decode limit: pg_recvlogical with pgoutput draining the same WAL.
    let t = Instant::now();
    let status = Command::new(b.cluster.bindir().join("pg_recvlogical"))
        .args(["-h", "127.0.0.1", "-p", &b.cluster.port().to_string(), "-U", "postgres", "-d", "bench"])
        .args(["--slot", "reference", "--start", "-E", &end_lsn, "-f", "/dev/null", "--no-loop"])
        .args(["-o", "proto_version=1", "-o", "publication_names=bench"])
        .status()?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed");
    let ref_secs = t.elapsed().as_secs_f64();
    let ref_rate = n as f64 / ref_secs;
    println!("decode limit (pg_recvlogical, pgoutput): {ref_secs:.2} s, {ref_rate:.0} rows/s");

    // 2. Backlog drain through walhook.
    let t = Instant::now();
    let mut child = b.spawn_walhook()?;
    let pid = child.id();
    let sampler = {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(x) = proc_stats(pid) {
                    samples.push(x);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        (stop, h)
    };
    let expected = n; // one endpoint per account: one delivery per change
    let got = b.receiver.wait_until(Duration::from_secs(1800), |r| r.len() >= expected).await;
    let first = b.receiver.received().first().map(|r| r.at);
    let drain_secs = t.elapsed().as_secs_f64();
    let received = b.receiver.received();
    anyhow::ensure!(got.is_ok(), "only {} of {expected} webhooks arrived", received.len());
    let unique: HashSet<&str> = received.iter().map(|r| r.webhook_id.as_str()).collect();
    let verified = received.iter().filter(|r| r.verified).count();
    // Delivered and recorded: wait until the database agrees.
    let recorded_at = loop {
        let done = b.scalar("SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'").await?;
        if done >= expected as i64 {
            break t.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first_to_last = first
        .and_then(|f| received.last().map(|l| l.at.duration_since(f).unwrap_or_default().as_secs_f64()))
        .unwrap_or(drain_secs);
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.1.join().unwrap_or_default();
    let peak_rss = samples.iter().map(|s| s.0).max().unwrap_or(0) as f64 / 1024.0;
    let cpu_secs = samples.last().map(|s| s.1).unwrap_or(0) as f64 / CLK_TCK;
    let drain_rate = expected as f64 / first_to_last.max(1e-9);
    println!(
        "backlog drain: {expected} webhooks, {} unique ids, {verified} verified; first→last {first_to_last:.2} s = {drain_rate:.0} events/s \
         ({:.0}% of the decode limit); all recorded after {recorded_at:.2} s",
        unique.len(),
        100.0 * drain_rate / ref_rate
    );
    println!(
        "walhook: peak RSS {peak_rss:.1} MiB, CPU {cpu_secs:.2} s = {:.3} s per 1,000 events",
        1000.0 * cpu_secs / expected as f64
    );
    anyhow::ensure!(
        unique.len() == expected && verified == expected,
        "every webhook arrives once with a valid signature"
    );
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    Ok(())
}
