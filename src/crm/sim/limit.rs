//! The simulated account's rate limit: a sliding window, strict like the CRMs' own (no
//! burst allowance beyond `count`), so a client that paces itself right never sees a `429`
//! and one that does not always does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// At most `count` API requests in any window of length `per` (`--rate 5/s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimRate {
    pub count: u32,
    pub per: Duration,
}

impl SimRate {
    /// The config file's rate syntax (`"5/s"`, `"100/min"`, `"10/5m"`).
    pub fn parse(text: &str) -> Result<SimRate, String> {
        crate::config::parse_rate(text).map(|(count, per)| SimRate { count, per })
    }
}

/// The times of the requests admitted within the last window, oldest first.
#[derive(Debug)]
pub(super) struct SlidingWindow {
    rate: SimRate,
    admitted: VecDeque<Instant>,
}

impl SlidingWindow {
    pub fn new(rate: SimRate) -> Self {
        SlidingWindow {
            rate,
            admitted: VecDeque::new(),
        }
    }

    /// Admit a request arriving `now`, or say how long until one would be admitted. Refused
    /// requests do not count: the window holds what the CRM served.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        while let Some(oldest) = self.admitted.front() {
            if now.saturating_duration_since(*oldest) >= self.rate.per {
                self.admitted.pop_front();
            } else {
                break;
            }
        }
        if self.admitted.len() < self.rate.count as usize {
            self.admitted.push_back(now);
            return Ok(());
        }
        // Full: the next slot opens when the oldest admitted request leaves the window.
        let oldest = self.admitted.front().copied().unwrap_or(now);
        Err(self
            .rate
            .per
            .saturating_sub(now.saturating_duration_since(oldest)))
    }
}

/// `Retry-After` in whole seconds, rounded up and at least 1 (`0` would invite a retry loop).
pub(super) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn five_per_second() -> SimRate {
        SimRate {
            count: 5,
            per: Duration::from_secs(1),
        }
    }

    #[test]
    fn parses_the_config_syntax() {
        assert_eq!(
            SimRate::parse("5/s"),
            Ok(SimRate {
                count: 5,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(SimRate::parse("100/min").map(|r| r.per), Ok(ms(60_000)));
        assert!(SimRate::parse("five").is_err());
        assert!(SimRate::parse("0/s").is_err());
    }

    #[test]
    fn at_most_count_in_any_window() {
        let mut window = SlidingWindow::new(five_per_second());
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(window.admit(t0 + ms(i * 10)), Ok(()), "request {i}");
        }
        // The sixth within the same second waits until the first leaves the window.
        assert_eq!(window.admit(t0 + ms(100)), Err(ms(900)));
        // Refused requests do not count: at 1 s exactly the first slot is free again.
        assert_eq!(window.admit(t0 + ms(1000)), Ok(()));
        assert_eq!(window.admit(t0 + ms(1005)), Err(ms(5)));
        assert_eq!(window.admit(t0 + ms(1010)), Ok(()));
    }

    #[test]
    fn steady_pace_at_the_rate_is_never_refused() {
        let mut window = SlidingWindow::new(five_per_second());
        let t0 = Instant::now();
        for i in 0..100 {
            assert_eq!(window.admit(t0 + ms(i * 200)), Ok(()), "request {i}");
        }
    }

    #[test]
    fn a_sliding_window_not_a_fixed_one() {
        // 5 at the end of one second and 5 at the start of the next are 10 in 20 ms: a fixed
        // window would let them through.
        let mut window = SlidingWindow::new(five_per_second());
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(window.admit(t0 + ms(990 + i)).is_ok());
        }
        assert!(window.admit(t0 + ms(1005)).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(ms(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(ms(1000)), 1);
        assert_eq!(retry_after_secs(ms(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
    }
}
