//! `--backfill`: what a backfill reads per second, and what it does to the live stream.
//! `--backfill-rows` contacts of one account (about 0.7 kB each, like the other phases) are
//! written before walhook starts. Then, each against a reference in this same run:
//! 1. rows/s of an unthrottled backfill (`rows_per_second = 0`) against one `SELECT *` reading
//!    the same rows as text (the simple query protocol, like the backfill) in this process;
//! 2. live latency at 200 changes/s (another account) alone, then while a backfill at the
//!    default pace (`rows_per_second = 2000`) runs throughout;
//! 3. the same endpoint's live rate for the same rows (each updated once, 1,000 per
//!    transaction), the bound a backfill to one endpoint shares with the stream;
//! 4. RSS while `--backfill-big-rows` rows of ~300 kB are backfilled under a 4 MiB
//!    `dispatch.memory_limit`, against the same process idle.
//!
//! Every backfilled row must arrive signed, each backfill under ids of its own.

use std::time::{Duration, Instant};

use anyhow::ensure;
use walhook::admin::endpoints::{Caller, Endpoints, NewEndpoint};
use walhook::config::Config;
use walhook::pg::db::Db;
use walhook::security::secrets::SecretBox;
use walhook::security::ssrf::AddressPolicy;

use crate::measure::{Memory, RssSampler};
use crate::{account, latencies, load, measure, Args, Bench};

/// Row ids of the backfilled rows carry this phase.
const PHASE_ROWS: u8 = 12;
/// Live changes alone.
const PHASE_ALONE: u8 = 13;
/// Live changes beside a backfill.
const PHASE_BESIDE: u8 = 14;
/// The account whose rows are backfilled.
const BACKFILL_ACCOUNT: usize = 0xbf;
/// Large rows' ids carry this phase.
const PHASE_BIG: u8 = 15;
/// The account of the large rows.
const BIG_ACCOUNT: usize = 0xb16;

pub async fn run(b: &mut Bench, args: &Args) -> anyhow::Result<()> {
    let n = args.backfill_rows;
    b.endpoints(args).await?;
    let cfg = Config::from_toml(&b.config_toml())?;
    let endpoints = Endpoints::new(
        Db::new(&cfg.database)?,
        SecretBox::new(None)?,
        AddressPolicy::new(cfg.dispatch.allowed_cidrs.clone()),
        cfg.database.crm_schema.as_str(),
    );
    let t = Instant::now();
    b.client
        .batch_execute(&format!(
            "INSERT INTO contacts (id, account_id, first_name, last_name, email, title, tags, custom_fields) \
             SELECT ('b{PHASE_ROWS:07x}-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, '{acct}', 'Ann' || i, \
             repeat('x', 420), 'a' || i || '@example.com', 'CTO', ARRAY['vip', 'tier ' || (i % 7)], \
             jsonb_build_object('source', 'bench', 'score', i, 'nested', jsonb_build_object('a', ARRAY[1, 2, 3])) \
             FROM generate_series(0, {last}) i",
            acct = account(BACKFILL_ACCOUNT),
            last = n - 1
        ))
        .await?;
    println!("wrote {n} rows in {:.1} s", t.elapsed().as_secs_f64());
    // Created after the rows: routing is as of each commit, so the stream sends it none of them.
    let caller = Caller { account_id: account(BACKFILL_ACCOUNT), user_id: account(BACKFILL_ACCOUNT) };
    let new = NewEndpoint {
        url: Some(b.receiver.url("backfill")),
        events: Some(vec!["contact.created".into(), "contact.updated".into()]),
        ..Default::default()
    };
    let (ep, secret) = endpoints.create(caller, new).await?;
    b.receiver.set_secret("backfill", secret.expose());

    // The reference: the same rows read as text by one SELECT.
    let t = Instant::now();
    let read = b
        .client
        .simple_query(&format!("SELECT * FROM contacts WHERE account_id = '{}' ORDER BY id", account(BACKFILL_ACCOUNT)))
        .await?;
    let select_rate = n as f64 / t.elapsed().as_secs_f64();
    ensure!(read.len() > n, "the reference read {} rows", read.len());

    // 1. Unthrottled.
    b.retention_extra = "[backfill]\nrows_per_second = 0\n".into();
    let mut walhook = b.spawn_walhook()?;
    let pid = walhook.id();
    wait_streaming(b).await?;
    let cpu0 = measure::cpu_secs(pid);
    let pg_before = measure::pg_cpu_by_kind();
    let started = Instant::now();
    let bf = endpoints.backfill(caller, ep.id, None).await?;
    b.wait_for_phase(PHASE_ROWS, n, Duration::from_secs(1800)).await?;
    let took = started.elapsed().as_secs_f64();
    let walhook_cpu = measure::cpu_secs(pid) - cpu0;
    let (pg_cpu, pg_parts) = measure::pg_cpu_delta(&pg_before, &measure::pg_cpu_by_kind());
    let rate = n as f64 / took;
    wait_finished(&endpoints, caller, bf.id).await?;
    println!(
        "backfill, unthrottled: {n} rows in {took:.2} s = {rate:.0} rows/s = {:.0}% of one SELECT of the same rows \
         ({select_rate:.0} rows/s); CPU per 1,000 rows: walhook {:.3} s, postgres {:.3} s ({pg_parts})",
        100.0 * rate / select_rate,
        1e3 * walhook_cpu / n as f64,
        1e3 * pg_cpu / n as f64
    );
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = walhook.wait();

    // 2. Live latency at 200/s, alone and beside a backfill at the default pace.
    b.retention_extra = String::new();
    let mut walhook = b.spawn_walhook()?;
    let pid = walhook.id();
    wait_streaming(b).await?;
    let commits = load::paced(&b.url, PHASE_ALONE, 200.0, args.latency_secs, account(0)).await?;
    b.wait_for_phase(PHASE_ALONE, commits.len(), Duration::from_secs(120)).await?;
    let alone = latencies(b, PHASE_ALONE, &commits, |n| n);
    let before = b.phase(PHASE_ROWS, |s| s.count);
    let bf = endpoints.backfill(caller, ep.id, None).await?;
    let commits = load::paced(&b.url, PHASE_BESIDE, 200.0, args.latency_secs, account(0)).await?;
    let during = b.phase(PHASE_ROWS, |s| s.count) - before;
    let running = endpoints.backfill_get(caller, bf.id).await?.status == "running";
    b.wait_for_phase(PHASE_BESIDE, commits.len(), Duration::from_secs(120)).await?;
    let beside = latencies(b, PHASE_BESIDE, &commits, |n| n);
    b.wait_for_phase(PHASE_ROWS, before + n, Duration::from_secs(1800)).await?;
    wait_finished(&endpoints, caller, bf.id).await?;
    let (ids, unverified) = b.phase(PHASE_ROWS, |s| (s.ids.len(), s.unverified));
    ensure!(ids == 2 * n, "{ids} distinct webhook ids for two backfills of {n} rows");
    ensure!(unverified == 0, "{unverified} backfilled requests did not verify");
    println!(
        "live latency at 200/s: alone p50 {:.1} ms, p99 {:.1} ms; beside a backfill at 2000 rows/s ({during} rows \
         during the window, {:.0}/s{}) p50 {:.1} ms ({:.2}×), p99 {:.1} ms ({:.2}×)",
        alone.p50,
        alone.p99,
        during as f64 / args.latency_secs,
        if running { ", still running at its end" } else { ", ended within it" },
        beside.p50,
        beside.p50 / alone.p50,
        beside.p99,
        beside.p99 / alone.p99,
    );

    // 3. The same endpoint's live rate for the same rows: each updated once, 1,000 per
    //    transaction, written as fast as PostgreSQL takes them.
    let started = Instant::now();
    for first in (0..n).step_by(1000) {
        b.client
            .batch_execute(&format!(
                "UPDATE contacts SET title = 'CEO' WHERE account_id = '{}' AND id >= '{}' AND id < '{}'",
                account(BACKFILL_ACCOUNT),
                load::row_id(PHASE_ROWS, first),
                load::row_id(PHASE_ROWS, first + 1000),
            ))
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    while b.phase(PHASE_ROWS, |s| s.by_event.get("contact.updated").copied().unwrap_or(0)) < n {
        ensure!(Instant::now() < deadline, "the updates did not all arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let live_rate = n as f64 / started.elapsed().as_secs_f64();
    println!(
        "the same endpoint live: {n} updates of the same rows at {live_rate:.0}/s; the unthrottled backfill is {:.0}% \
         of it",
        100.0 * rate / live_rate
    );
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = walhook.wait();

    // 4. Large rows under a small memory limit: RSS while backfilling them, against idle.
    large_rows(b, &endpoints, args).await
}

/// `--backfill-big-rows` rows of about 300 kB backfilled with `dispatch.memory_limit = 4MiB`:
/// peak RSS against the same process idle just before.
async fn large_rows(b: &mut Bench, endpoints: &Endpoints, args: &Args) -> anyhow::Result<()> {
    let n = args.backfill_big_rows;
    let caller = Caller { account_id: account(BIG_ACCOUNT), user_id: account(BIG_ACCOUNT) };
    b.client
        .batch_execute(&format!(
            "INSERT INTO contacts (id, account_id, first_name, title) \
             SELECT ('b{PHASE_BIG:07x}-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, '{}', 'Big' || i, \
             repeat(md5(i::text), 9600) FROM generate_series(0, {}) i",
            account(BIG_ACCOUNT),
            n - 1
        ))
        .await?;
    let new = NewEndpoint {
        url: Some(b.receiver.url("big")),
        events: Some(vec!["contact.created".into()]),
        ..Default::default()
    };
    let (ep, secret) = endpoints.create(caller, new).await?;
    b.receiver.set_secret("big", secret.expose());
    b.dispatch_extra = "memory_limit = \"4MiB\"\n".into();
    b.retention_extra = "[backfill]\nrows_per_second = 0\n".into();
    let mut walhook = b.spawn_walhook()?;
    let pid = walhook.id();
    let rss = RssSampler::start(pid);
    wait_streaming(b).await?;
    let idle_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let bf = endpoints.backfill(caller, ep.id, None).await?;
    b.wait_for_phase(PHASE_BIG, n, Duration::from_secs(1800)).await?;
    wait_finished(endpoints, caller, bf.id).await?;
    let idle = Memory::of(&rss.between(idle_from, started));
    let busy = Memory::of(&rss.between(started, Instant::now()));
    println!(
        "large rows: {n} rows of ~300 kB backfilled in {:.1} s with dispatch.memory_limit 4MiB: RSS idle {:.1} MiB, \
         peak {:.1} MiB (+{:.1} MiB)",
        started.elapsed().as_secs_f64(),
        idle.median,
        busy.peak,
        busy.peak - idle.median
    );
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = walhook.wait();
    b.dispatch_extra.clear();
    Ok(())
}

/// Until the spawned walhook streams (its slot is active).
/// Until the spawned walhook streams and has read the WAL written so far (the rows' inserts).
async fn wait_streaming(b: &Bench) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let target: String =
        b.client.query_one("SELECT pg_logical_emit_message(false, 'bench', 'mark')::text", &[]).await?.get(0);
    let caught_up = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'bench' AND active \
         AND confirmed_flush_lsn >= '{target}'::pg_lsn"
    );
    while b.scalar(&caught_up).await? == 0 {
        ensure!(Instant::now() < deadline, "walhook did not start streaming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn wait_finished(endpoints: &Endpoints, caller: Caller, id: uuid::Uuid) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = endpoints.backfill_get(caller, id).await?.status;
        if status == "finished" {
            return Ok(());
        }
        ensure!(status == "running" && Instant::now() < deadline, "backfill {id} is {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
