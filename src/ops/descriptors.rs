//! The file-descriptor budget, checked at start.
//!
//! What must hold: walhook raises its soft `RLIMIT_NOFILE` to the hard limit (or as far as
//! the system lets it, at least to what it needs), then refuses
//! to start unless the limit covers every connection it may hold at once, so that clients of
//! the listeners can never take the descriptors outbound deliveries and the database need:
//! `api.max_connections` + `metrics.max_connections` + `dispatch.max_concurrency` +
//! `database.pool_size` + [`RESERVED`] (64 idle pooled outbound connections: outbound ones are
//! at most `dispatch.max_concurrency` + 64 in all, see `delivery::dispatch::connect`; the
//! replication, leader and readiness connections, DNS lookups, files, the runtime's own). The
//! error names every key.

use crate::config::Config;

/// Descriptors kept for everything the configured caps do not count.
pub const RESERVED: u64 = 128;

/// The configured caps do not fit in the process's descriptor limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "file descriptors: api.max_connections ({api}) + metrics.max_connections ({metrics}) + \
     dispatch.max_concurrency ({dispatch}) + database.pool_size ({pool}) + {RESERVED} reserved = {needed}, \
     but the limit (RLIMIT_NOFILE) is {limit}: lower those keys or raise the limit (ulimit -n, \
     systemd LimitNOFILE, the container runtime's nofile)"
)]
pub struct BudgetError {
    api: usize,
    metrics: usize,
    dispatch: usize,
    pool: usize,
    needed: u64,
    limit: u64,
}

/// Descriptors the configuration needs at most.
pub fn needed(cfg: &Config) -> u64 {
    [cfg.api.max_connections, cfg.metrics.max_connections, cfg.dispatch.max_concurrency, cfg.database.pool_size]
        .iter()
        .map(|n| *n as u64)
        .sum::<u64>()
        + RESERVED
}

/// Raises the soft descriptor limit to the hard one and checks `cfg` fits; returns the limit.
pub fn reserve(cfg: &Config) -> Result<u64, BudgetError> {
    let needed = needed(cfg);
    let limit = raise_limit(needed);
    if needed > limit {
        return Err(BudgetError {
            api: cfg.api.max_connections,
            metrics: cfg.metrics.max_connections,
            dispatch: cfg.dispatch.max_concurrency,
            pool: cfg.database.pool_size,
            needed,
            limit,
        });
    }
    tracing::debug!(limit, needed, "file descriptor budget fits");
    Ok(limit)
}

/// The soft `RLIMIT_NOFILE`, raised to the hard limit, or at least to `want` where the
/// system refuses the hard limit itself (macOS caps it below an unlimited hard limit).
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
fn raise_limit(want: u64) -> u64 {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return u64::MAX; // unknown: nothing to check against
    }
    let want = want as libc::rlim_t;
    for target in [rl.rlim_max, want.min(rl.rlim_max)] {
        if rl.rlim_cur >= target {
            break;
        }
        let raised = libc::rlimit { rlim_cur: target, rlim_max: rl.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            rl.rlim_cur = target;
        }
    }
    if rl.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        rl.rlim_cur as u64
    }
}
