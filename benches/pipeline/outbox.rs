//! `--outbox`: what the outbox path delivers per second against the fast path, on the same
//! endpoints in one run (one per account, `--accounts`). First the fast path: a backlog of
//! `--outbox-changes` written while walhook is stopped is drained directly. Then a recovery:
//! the receiver answers 503, so the same number of changes fail their attempt and its one
//! retry (`retry_schedule = ["1s"]`) and end `failed` with their payloads stored; the receiver
//! answers 200 again and each endpoint's failures are recovered (`webhooks-recover`), so the
//! outbox sends them all. Reported: deliveries/s of both (first to last arrival), the ratio,
//! CPU per delivery and walhook's RSS through the outbox drain.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use walhook::admin::endpoints::{Caller, Endpoints};
use walhook::config::Config;
use walhook::local::receiver::Reply;
use walhook::pg::db::Db;
use walhook::security::secrets::SecretBox;
use walhook::security::ssrf::AddressPolicy;

use crate::measure::{self, Memory, RssSampler};
use crate::{account, load, verify, Args, Bench};

/// Row ids of the fast-path drain carry this phase.
const PHASE_FAST: u8 = 14;
/// Row ids of the recovered deliveries carry this phase.
const PHASE_OUTBOX: u8 = 13;

/// Runs both drains and prints their table.
pub async fn run(b: &mut Bench, args: &Args) -> anyhow::Result<()> {
    b.dispatch_extra = "retry_schedule = [\"1s\"]\n".into();
    let txs = args.outbox_changes / 10;
    let n = txs * 10;
    let accounts = args.accounts;
    let set_reply = |reply: Reply| {
        for i in 0..accounts {
            b.receiver.set_default(&format!("acct{i}"), reply.clone());
        }
    };

    // The fast path.
    load::bulk(&b.url, PHASE_FAST, txs, 4, move |t| account(t % accounts)).await?;
    let mut walhook = b.spawn_walhook()?;
    let pid = walhook.id();
    let rss = RssSampler::start(pid);
    b.wait_for_phase(PHASE_FAST, n, Duration::from_secs(1800)).await?;
    verify(b, PHASE_FAST, n, 1)?;
    let fast = rate(b, PHASE_FAST, n);
    println!("outbox: fast path {n} deliveries at {fast:.0}/s");

    // Every delivery fails its attempt and its retry, and is stored failed.
    set_reply(Reply::Status(503));
    load::bulk(&b.url, PHASE_OUTBOX, txs, 4, move |t| account(t % accounts)).await?;
    let failed = "SELECT count(*) FROM walhook.deliveries WHERE status = 'failed'";
    let deadline = Instant::now() + Duration::from_secs(3600);
    while b.scalar(failed).await? < n as i64 {
        ensure!(Instant::now() < deadline, "the outbox phase's deliveries did not all fail");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    set_reply(Reply::Status(200));
    b.seen.lock().unwrap().remove(&PHASE_OUTBOX);

    // Recovered: the outbox sends them all.
    let endpoints = admin(b)?;
    let rows = b.client.query("SELECT id, account_id FROM walhook.endpoints WHERE url LIKE '%/acct%'", &[]).await?;
    let backend: i32 = b.client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let postmaster = measure::parent_of(backend as u32);
    let (pg_before, reaped_before) = (measure::pg_cpu_by_kind(), measure::reaped_cpu_secs(postmaster));
    let cpu_before = measure::cpu_secs(pid);
    let from = Instant::now();
    let (since, until) = (chrono::Utc::now() - chrono::Duration::hours(1), chrono::Utc::now());
    let mut recovered = 0;
    for r in &rows {
        let (id, acct): (uuid::Uuid, uuid::Uuid) = (r.get(0), r.get(1));
        recovered += endpoints.recover(Caller { account_id: acct, user_id: acct }, id, since, until).await?;
    }
    ensure!(recovered == n as u64, "recovered {recovered} of {n} failed deliveries");
    b.wait_for_phase(PHASE_OUTBOX, n, Duration::from_secs(3600)).await?;
    let walhook_cpu = measure::cpu_secs(pid) - cpu_before;
    let (pg_cpu, pg_parts) = measure::pg_cpu_delta(&pg_before, &measure::pg_cpu_by_kind());
    // Pooled connections closed meanwhile took their CPU with them: the postmaster reaped it.
    let exited = measure::reaped_cpu_secs(postmaster) - reaped_before;
    let (pg_cpu, pg_parts) = (pg_cpu + exited, format!("{pg_parts}, exited {exited:.1} s"));
    verify(b, PHASE_OUTBOX, n, 1)?;
    let outbox = rate(b, PHASE_OUTBOX, n);
    let mem = Memory::of(&rss.between(from, Instant::now()));
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = walhook.wait();
    println!(
        "outbox: {n} recovered deliveries of {accounts} endpoints at {outbox:.0}/s ({:.0}% of the fast path); \
         CPU per 1,000: walhook {:.3} s, postgres {:.3} s ({pg_parts}); RSS peak {:.1} MiB, median {:.1} MiB",
        100.0 * outbox / fast,
        1e3 * walhook_cpu / n as f64,
        1e3 * pg_cpu / n as f64,
        mem.peak,
        mem.median
    );
    println!(
        "\n| Path | Deliveries/s | Of the fast path | walhook CPU per 1,000 | PostgreSQL CPU per 1,000 | RSS peak |"
    );
    println!("|---|---|---|---|---|---|");
    println!("| fast (direct) | {fast:.0} | 100% | | | |");
    println!(
        "| outbox ({n} recovered) | {outbox:.0} | {:.0}% | {:.3} s | {:.3} s | {:.1} MiB |",
        100.0 * outbox / fast,
        1e3 * walhook_cpu / n as f64,
        1e3 * pg_cpu / n as f64,
        mem.peak
    );
    Ok(())
}

/// Deliveries/s of a phase, first to last arrival.
fn rate(b: &Bench, phase: u8, n: usize) -> f64 {
    let (first, last) = b.phase(phase, |s| (s.first, s.last));
    let span = last.zip(first).and_then(|(l, f)| l.duration_since(f).ok()).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    n as f64 / span
}

/// The admin operations, as the API serves them.
fn admin(b: &Bench) -> anyhow::Result<Endpoints> {
    let cfg = Config::from_toml(&b.config_toml())?;
    Ok(Endpoints::new(
        Db::new(&cfg.database)?,
        SecretBox::new(None)?,
        AddressPolicy::new(cfg.dispatch.allowed_cidrs.clone()),
        cfg.database.crm_schema.as_str(),
    ))
}
