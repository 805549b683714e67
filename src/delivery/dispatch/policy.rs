//! When to try again.
//!
//! What must hold: `n` delays in `dispatch.retry_schedule` mean `n` retries after the first
//! attempt, then the delivery fails; each delay is spread by ±`dispatch.jitter`; a
//! `Retry-After` is honoured but clamped to [scheduled delay, 2 × scheduled delay], so a
//! receiver can slow walhook down but neither hurry it nor park a delivery forever.

use std::time::Duration;

use rand::Rng;

use crate::config::DispatchConfig;

/// The retry schedule.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
    jitter: f64,
}

impl RetryPolicy {
    /// From `[dispatch]`.
    pub fn new(cfg: &DispatchConfig) -> Self {
        RetryPolicy { schedule: cfg.retry_schedule.iter().map(|d| d.get()).collect(), jitter: cfg.jitter }
    }

    /// A schedule without jitter (tests).
    #[cfg(test)]
    pub fn fixed(schedule: Vec<Duration>) -> Self {
        RetryPolicy { schedule, jitter: 0.0 }
    }

    /// Attempts a delivery gets in all.
    #[cfg(test)]
    pub fn max_attempts(&self) -> usize {
        self.schedule.len() + 1
    }

    /// Delay before the next attempt after `attempts_made` attempts, or `None` when the
    /// delivery has had all its attempts.
    pub fn next_delay(&self, attempts_made: usize, retry_after: Option<Duration>) -> Option<Duration> {
        let scheduled = *self.schedule.get(attempts_made.checked_sub(1)?)?;
        let spread = if self.jitter > 0.0 { rand::rng().random_range(-self.jitter..=self.jitter) } else { 0.0 };
        let jittered = scheduled.mul_f64(1.0 + spread);
        Some(match retry_after {
            Some(asked) => asked.clamp(scheduled, scheduled * 2),
            None => jittered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy { schedule: vec![Duration::from_secs(5), Duration::from_secs(300)], jitter }
    }

    #[test]
    fn schedule_length_bounds_attempts() {
        let p = policy(0.0);
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(p.next_delay(1, None), Some(Duration::from_secs(5)));
        assert_eq!(p.next_delay(2, None), Some(Duration::from_secs(300)));
        assert_eq!(p.next_delay(3, None), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = policy(0.2);
        for _ in 0..1000 {
            let d = p.next_delay(1, None).unwrap().as_secs_f64();
            assert!((4.0..=6.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn retry_after_is_clamped() {
        let p = policy(0.0);
        assert_eq!(p.next_delay(1, Some(Duration::from_secs(1))), Some(Duration::from_secs(5)));
        assert_eq!(p.next_delay(1, Some(Duration::from_secs(8))), Some(Duration::from_secs(8)));
        assert_eq!(p.next_delay(1, Some(Duration::from_secs(3600))), Some(Duration::from_secs(10)));
    }
}
