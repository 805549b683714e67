//! Rate limiting a warning that may repeat many times a second (a failing `accept`).
//!
//! What must hold: at most one line per [`Every::period`]; each line says how many
//! occurrences were left unlogged since the previous one.

use std::time::Duration;

use tokio::time::Instant;

/// Decides which occurrences of a repeating event get a log line.
#[derive(Debug)]
pub(super) struct Every {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Every {
    pub(super) fn new(period: Duration) -> Self {
        Every { period, last: None, suppressed: 0 }
    }

    /// An occurrence at `now`: `Some(n)` to log it, `n` being how many were not logged since
    /// the previous line; `None` to stay quiet.
    pub(super) fn occurred(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|at| now.duration_since(at) < self.period) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_counting_the_ones_left_out() {
        let mut every = Every::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(every.occurred(t), Some(0));
        let logged: Vec<Option<u64>> =
            (1..=122u64).map(|i| every.occurred(t + Duration::from_millis(i * 30_000 / 122))).collect();
        let lines = logged.iter().filter(|l| l.is_some()).count();
        assert!(lines <= 31, "122 failures in 30 s give at most one line a second: {lines}");
        let counted: u64 = logged.iter().flatten().map(|n| n + 1).sum::<u64>() + every.suppressed;
        assert_eq!(counted, 122, "every failure is logged or counted");
    }
}
