//! `--slow`: receivers that answer every request after `--slow-answer-ms` (200 ms), one endpoint
//! per account (`--accounts`, 100). A backlog of `--slow-changes` is written while walhook is
//! stopped; a fresh walhook drains it, once with its defaults and once per
//! `--slow-concurrency` value given. Reported per case: deliveries/s against the bound the
//! concurrency settings allow (requests in flight ÷ answer time), walhook's RSS idle and at its
//! peak, and what each request in flight costs ((peak − idle) ÷ in flight). `--http1` makes the
//! receiver speak only HTTP/1.1 (one connection per request in flight), as most real ones do.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::measure::{Memory, RssSampler};
use crate::{account, load, verify, Args, Bench};

/// First phase of the slow cases (row ids carry it); one phase per case.
const FIRST_PHASE: u8 = 20;

/// The defaults of `[dispatch]` that bound requests in flight (config/default.toml).
fn defaults(b: &Bench) -> anyhow::Result<(usize, usize, usize)> {
    let cfg = walhook::config::Config::from_toml(&b.config_toml())?;
    let d = &cfg.dispatch;
    Ok((d.max_concurrency, d.endpoint_concurrency, d.account_concurrency))
}

/// Runs the cases and prints their table.
pub async fn run(b: &mut Bench, args: &Args) -> anyhow::Result<()> {
    let (max, per_endpoint, per_account) = defaults(b)?;
    for i in 0..args.accounts {
        b.receiver.set_default(&format!("acct{i}"), walhook::local::receiver::Reply::Delay(answer(args), 200));
    }
    let mut cases = vec![None];
    cases.extend(args.slow_concurrency.iter().copied().map(Some));
    let mut rows = Vec::new();
    for (i, concurrency) in cases.into_iter().enumerate() {
        b.dispatch_extra = concurrency.map(|c| format!("max_concurrency = {c}\n")).unwrap_or_default();
        let in_flight = concurrency.unwrap_or(max).min(args.accounts * per_endpoint.min(per_account));
        let phase = FIRST_PHASE + i as u8;
        rows.push(case(b, args, phase, concurrency, in_flight).await?);
    }
    println!(
        "\n| Case ({} receivers, {} ms) | Deliveries/s | Bound | Of the bound | RSS idle → peak | Per request in flight |",
        if args.http1 { "HTTP/1.1" } else { "HTTP/2" },
        args.slow_answer_ms
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    println!(
        "(defaults: max_concurrency {max}, endpoint_concurrency {per_endpoint}, account_concurrency {per_account})"
    );
    Ok(())
}

fn answer(args: &Args) -> Duration {
    Duration::from_millis(args.slow_answer_ms)
}

async fn case(
    b: &Bench,
    args: &Args,
    phase: u8,
    concurrency: Option<usize>,
    in_flight: usize,
) -> anyhow::Result<String> {
    let txs = args.slow_changes / 10;
    let n = txs * 10;
    let accounts = args.accounts;
    load::bulk(&b.url, phase, txs, 4, move |t| account(t % accounts)).await?;
    let mut walhook = b.spawn_walhook()?;
    let pid = walhook.id();
    let rss = RssSampler::start(pid);
    let started = Instant::now();
    // Idle: started, nothing sent yet (the first answer takes `answer_ms`).
    b.wait_for_phase(phase, 1, Duration::from_secs(120)).await?;
    let first = Instant::now();
    b.wait_for_phase(phase, n, Duration::from_secs(3600)).await?;
    let done = Instant::now();
    verify(b, phase, n, 1)?;
    let (f, l) = b.phase(phase, |s| (s.first, s.last));
    let span = l.zip(f).and_then(|(l, f)| l.duration_since(f).ok()).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    let rate = n as f64 / span;
    let bound = in_flight as f64 / answer(args).as_secs_f64();
    let idle = Memory::of(&rss.between(started, first));
    let busy = Memory::of(&rss.between(first, done));
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = walhook.wait();
    let per_request = 1024.0 * (busy.peak - idle.median).max(0.0) / in_flight as f64;
    let name = concurrency.map_or("defaults".to_owned(), |c| format!("max_concurrency = {c}"));
    println!(
        "slow receivers, {name}: {n} deliveries at {rate:.0}/s of a {bound:.0}/s bound ({:.0}%); RSS idle {:.1} MiB, peak {:.1} MiB; {per_request:.1} KiB per request in flight ({in_flight})",
        100.0 * rate / bound,
        idle.median,
        busy.peak
    );
    Ok(format!(
        "| {name} | {rate:.0} | {bound:.0} ({in_flight} in flight) | {:.0}% | {:.1} → {:.1} MiB | {per_request:.1} KiB |",
        100.0 * rate / bound,
        idle.median,
        busy.peak
    ))
}
