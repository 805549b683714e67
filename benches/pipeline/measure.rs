//! Measuring: process RSS and CPU from /proc, sampled in the background; latency percentiles.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Ticks per second of /proc CPU times.
const CLK_TCK: f64 = 100.0;

/// Resident memory (KiB) and CPU time (ticks) of `pid`.
pub fn proc_stats(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let cpu = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((rss, cpu))
}

/// CPU seconds of `pid` so far.
pub fn cpu_secs(pid: u32) -> f64 {
    proc_stats(pid).map(|s| s.1).unwrap_or(0) as f64 / CLK_TCK
}

/// CPU seconds of the children `pid` has reaped so far (for the postmaster: every backend and
/// walsender that has exited, such as `pg_recvlogical`'s).
pub fn reaped_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (field(13) + field(14)) as f64 / CLK_TCK
}

/// The parent of `pid` (for a backend: the postmaster).
pub fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    after.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// CPU seconds per PostgreSQL process kind (walsender, client backends, background).
pub fn pg_cpu_by_kind() -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).into_owned();
        let Some(rest) = cmdline.strip_prefix("postgres: ") else { continue };
        let kind = if rest.starts_with("walsender") {
            "walsender"
        } else if rest.contains("127.0.0.1") || rest.contains("[local]") {
            "backends"
        } else {
            "background"
        };
        *out.entry(kind).or_insert(0.0) += cpu_secs(pid);
    }
    out
}

/// Difference of two `pg_cpu_by_kind` readings, as text.
pub fn pg_cpu_delta(before: &BTreeMap<&'static str, f64>, after: &BTreeMap<&'static str, f64>) -> (f64, String) {
    let mut total = 0.0;
    let parts: Vec<String> = after
        .iter()
        .map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            total += d;
            format!("{k} {d:.1} s")
        })
        .collect();
    (total, parts.join(", "))
}

/// Samples a process's RSS every 100 ms until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some((rss, _)) = proc_stats(pid) {
                    out.lock().unwrap().push((Instant::now(), rss));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler { stop, samples, handle: Some(handle) }
    }

    /// RSS samples (MiB) taken between `from` and `to`.
    pub fn between(&self, from: Instant, to: Instant) -> Vec<f64> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, r)| *r as f64 / 1024.0)
            .collect()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Peak, median and spread of memory samples (MiB).
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub peak: f64,
    pub median: f64,
}

impl Memory {
    pub fn of(samples: &[f64]) -> Memory {
        if samples.is_empty() {
            return Memory::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        Memory { peak: s[s.len() - 1], median: s[s.len() / 2] }
    }
}

/// p50, p99, max of latencies in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub count: usize,
}

impl Latency {
    pub fn of(mut ms: Vec<f64>) -> Latency {
        if ms.is_empty() {
            return Latency::default();
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        Latency { p50: at(0.50), p99: at(0.99), max: ms[ms.len() - 1], count: ms.len() }
    }
}
