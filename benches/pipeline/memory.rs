//! `--memory`: resident memory with large rows (issue: memory bounded by counts, not bytes).
//! For each case, N rows of K kB are inserted (10 per transaction, or one) while walhook
//! runs, for one endpoint that answers every request after `--answer-ms` (or at once: the
//! fast case, one large row per transaction); reported: idle RSS before the burst, peak RSS
//! from the first insert until every delivery is recorded, and idle RSS (median) 10–15 s
//! after that and 75–80 s after it (past walhook's database connection lifetime).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;

use crate::measure::{Memory, RssSampler};
use crate::{account, verify, Args, Bench};
use walhook::local::receiver::Reply;

/// Account and receiver path of the memory cases.
pub const MEMORY_ACCOUNT: usize = 0x3e3;
const PATH: &str = "slow";

/// One case: `rows` rows of `kb` kB.
pub struct Case {
    pub phase: u8,
    pub rows: usize,
    pub kb: usize,
    /// The endpoint answers after this many milliseconds (0: at once).
    pub answer_ms: u64,
    /// Rows per transaction.
    pub per_tx: usize,
}

/// Runs each case with a fresh walhook; prints a table row per case.
pub async fn run(b: &Bench, _args: &Args, cases: &[Case]) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for case in cases {
        let reply = match case.answer_ms {
            0 => Reply::Status(200),
            ms => Reply::Delay(Duration::from_millis(ms), 200),
        };
        b.receiver.set_default(PATH, reply);
        let mut walhook = b.spawn_walhook()?;
        let pid = walhook.id();
        let rss = RssSampler::start(pid);
        wait_streaming(b).await?;
        let quiet = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = Memory::of(&rss.between(quiet, Instant::now()));
        let stored_before = b.scalar("SELECT count(*) FROM walhook.events").await?;
        let started = Instant::now();
        load(b, case).await?;
        let loaded = started.elapsed();
        b.wait_for_phase(case.phase, case.rows, Duration::from_secs(3600)).await?;
        let q = format!(
            "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered' AND event_type = 'contact.created' \
             AND entity_key LIKE 'contacts:b{:07x}-%'",
            case.phase
        );
        while b.scalar(&q).await? < case.rows as i64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let recorded = Instant::now();
        verify(b, case.phase, case.rows, 0)?;
        tokio::time::sleep(Duration::from_secs(80)).await;
        let during = Memory::of(&rss.between(started, recorded));
        let at = |s: u64| recorded + Duration::from_secs(s);
        let idle = Memory::of(&rss.between(at(10), at(15)));
        let idle_late = Memory::of(&rss.between(at(75), at(80)));
        // Payloads are stored only for deliveries that went through the outbox.
        let outbox = b.scalar("SELECT count(*) FROM walhook.events").await? - stored_before;
        let took = recorded.duration_since(started).as_secs_f64();
        println!(
            "memory: {} rows of {} kB, {} per transaction, behind a {} ms endpoint: loaded in {:.1} s, recorded after {took:.1} s; RSS idle before {:.1} MiB, peak {:.1} MiB, idle {:.1} MiB after 10 s, {:.1} MiB after 75 s; {outbox} went through the outbox",
            case.rows, case.kb, case.per_tx, case.answer_ms, loaded.as_secs_f64(), before.median, during.peak, idle.median, idle_late.median
        );
        lines.push(format!(
            "| {} rows × {} kB, {} per transaction, endpoint answering in {} ms | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {took:.0} s | {outbox} |",
            case.rows, case.kb, case.per_tx, case.answer_ms, before.median, during.peak, idle.median, idle_late.median
        ));
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let _ = walhook.wait();
        drop(rss);
    }
    println!(
        "\n| Case | Idle RSS before | Peak RSS | Idle RSS 10 s after | Idle RSS 75 s after | Delivered and recorded in | Via the outbox |\n|---|---|---|---|---|---|---|"
    );
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// Inserts the case's rows, `per_tx` per transaction, on 2 connections.
async fn load(b: &Bench, case: &Case) -> anyhow::Result<()> {
    let per = case.per_tx.max(1);
    let txs = case.rows.div_ceil(per);
    let mut handles = Vec::new();
    for w in 0..2 {
        let (url, phase, chars, rows) = (b.url.clone(), case.phase, case.kb * 1000, case.rows);
        handles.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            for t in (w..txs).step_by(2) {
                let (from, to) = (t * per, (t * per + per - 1).min(rows - 1));
                client
                    .batch_execute(&format!(
                        "INSERT INTO contacts (id, account_id, first_name, last_name) \
                         SELECT format('b%s-0000-4000-8000-%s', lpad(to_hex({phase}), 7, '0'), lpad(i::text, 12, '0'))::uuid, \
                           '{acct}', 'm' || i, rpad(i::text || '-', {chars}, 'x') \
                         FROM generate_series({from}, {to}) i",
                        acct = account(MEMORY_ACCOUNT)
                    ))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

async fn wait_streaming(b: &Bench) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let q = "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = 'bench'";
    while b.scalar(q).await? < 1 {
        ensure!(Instant::now() < deadline, "walhook did not start streaming");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
