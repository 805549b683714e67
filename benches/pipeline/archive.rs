//! `--archive`: what the payload archive (`retention.payloads`) costs. The same backlog
//! (`--changes`, written while walhook is stopped, one endpoint per account) is drained three
//! times by a fresh walhook: archive off, on, off again (the two offs bound the machine's
//! drift). Reported per run: drain rate, CPU per 1,000 events (walhook, PostgreSQL), WAL bytes
//! walhook's writes added per event, and the growth of `walhook.events` (table, TOAST and
//! index) per event; BENCHMARKS.md scales them to a million events.

use std::process::Command;
use std::time::Duration;

use crate::{account, load, measure, verify, Args, Bench};

/// Phases of the three drains (row ids carry them).
const PHASES: [(u8, bool); 3] = [(9, false), (10, true), (11, false)];

/// One drain's figures.
struct Drain {
    archive: bool,
    rate: f64,
    walhook_cpu_per_k: f64,
    pg_cpu_per_k: f64,
    wal_per_event: f64,
    events_bytes_per_event: f64,
}

/// Runs the three drains and prints their table.
pub async fn run(b: &mut Bench, args: &Args) -> anyhow::Result<()> {
    let mut drains = Vec::new();
    for (phase, archive) in PHASES {
        b.retention_extra = if archive { "[retention]\npayloads = \"72h\"\n".into() } else { String::new() };
        drains.push(drain(b, args, phase, archive).await?);
    }
    println!("\n| Drain | Events/s | walhook CPU per 1,000 | PostgreSQL CPU per 1,000 | WAL per event | walhook.events per event |");
    println!("|---|---|---|---|---|---|");
    for d in &drains {
        println!(
            "| archive {} | {:.0} | {:.3} s | {:.3} s | {:.0} B | {:.0} B |",
            if d.archive { "on (72h)" } else { "off" },
            d.rate,
            d.walhook_cpu_per_k,
            d.pg_cpu_per_k,
            d.wal_per_event,
            d.events_bytes_per_event
        );
    }
    Ok(())
}

async fn drain(b: &Bench, args: &Args, phase: u8, archive: bool) -> anyhow::Result<Drain> {
    let txs = args.changes / 10;
    let n = txs * 10;
    let accounts = args.accounts;
    load::bulk(&b.url, phase, txs, 4, move |t| account(t % accounts)).await?;
    let lsn = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8";
    let size = "SELECT pg_total_relation_size('walhook.events')";
    let delivered = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    let (wal0, size0, done0) = (b.scalar(lsn).await?, b.scalar(size).await?, b.scalar(delivered).await?);
    let pg_before = measure::pg_cpu_by_kind();
    let mut walhook = b.spawn_walhook()?;
    let pid = walhook.id();
    b.wait_for_phase(phase, n, Duration::from_secs(1800)).await?;
    while b.scalar(delivered).await? < done0 + n as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let walhook_cpu = measure::cpu_secs(pid);
    let (pg_cpu, _) = measure::pg_cpu_delta(&pg_before, &measure::pg_cpu_by_kind());
    let (wal1, size1) = (b.scalar(lsn).await?, b.scalar(size).await?);
    verify(b, phase, n, 1)?;
    let (first, last) = b.phase(phase, |s| (s.first, s.last));
    let span = last.zip(first).and_then(|(l, f)| l.duration_since(f).ok()).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = walhook.wait();
    let d = Drain {
        archive,
        rate: n as f64 / span,
        walhook_cpu_per_k: 1e3 * walhook_cpu / n as f64,
        pg_cpu_per_k: 1e3 * pg_cpu / n as f64,
        wal_per_event: (wal1 - wal0) as f64 / n as f64,
        events_bytes_per_event: (size1 - size0) as f64 / n as f64,
    };
    println!(
        "archive {}: {n} events at {:.0}/s; CPU per 1,000: walhook {:.3} s, postgres {:.3} s; WAL {:.0} B/event; walhook.events +{:.0} B/event",
        if archive { "on" } else { "off" },
        d.rate,
        d.walhook_cpu_per_k,
        d.pg_cpu_per_k,
        d.wal_per_event,
        d.events_bytes_per_event
    );
    Ok(d)
}
