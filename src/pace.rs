//! Outbound pacing: how fast workers may call a CRM account or relay to a site's upstream.
//!
//! Each account gets a [`Pacer`]: a GCRA limiter (governor) spacing calls evenly at the
//! configured rate, plus a pause that a `429`/`503` with `Retry-After` sets, so the whole
//! account backs off for as long as the far side asked, not only the job that was told.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::{CrmConfig, Rate};

/// Paces calls to one outbound account.
pub struct Pacer {
    limiter: Option<DefaultDirectRateLimiter>,
    paused_until: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer at `rate`, or an unpaced one (`None`) that still honours pauses.
    ///
    /// Calls are spaced evenly (burst 1) whatever `rate.burst` says: a CRM that counts requests
    /// in a sliding one-second window answers 429 to a burst followed by a steady stream, and
    /// an even spacing never exceeds `count` in any window of `per` — with a 2% margin, so that
    /// it still does not when arrivals jitter (see [`JITTER_MARGIN_DIV`]).
    pub fn new(rate: Option<Rate>) -> Self {
        let limiter = rate.and_then(quota_for).map(RateLimiter::direct);
        Pacer {
            limiter,
            paused_until: Mutex::new(None),
        }
    }

    /// Wait until a call may be made now.
    pub async fn ready(&self) {
        loop {
            let until = *self.lock_pause();
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
    }

    /// The far side asked us to wait `for_how_long` (`Retry-After`): pause every caller.
    /// A shorter pause never cuts a longer one short.
    pub fn pause(&self, for_how_long: Duration) {
        let until = Instant::now() + for_how_long;
        let mut paused = self.lock_pause();
        if paused.is_none_or(|t| t < until) {
            *paused = Some(until);
        }
    }

    /// When the current pause ends, if one is in force.
    pub fn paused_until(&self) -> Option<Instant> {
        self.lock_pause().filter(|t| *t > Instant::now())
    }

    fn lock_pause(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A poisoned lock only means another thread panicked while holding a plain
        // `Option<Instant>`; the value is still valid, so keep using it.
        self.paused_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One [`Pacer`] per CRM account, shared by every site (and every worker) that uses it: two
/// sites on one ActiveCampaign account share its 5 requests/s.
#[derive(Default)]
pub struct Accounts {
    pacers: Mutex<HashMap<String, Arc<Pacer>>>,
}

impl Accounts {
    /// The pacer of the account `crm` names (kind, URL and user; the first site's rate wins).
    pub fn pacer(&self, crm: &CrmConfig) -> Arc<Pacer> {
        let account = format!(
            "{:?} {} {}",
            crm.kind,
            crm.url,
            crm.user.as_deref().unwrap_or("")
        );
        let mut pacers = self
            .pacers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pacers
            .entry(account)
            .or_insert_with(|| Arc::new(Pacer::new(Some(crm.rate))))
            .clone()
    }
}

/// Extra spacing, as a share of the even interval (1/`JITTER_MARGIN_DIV`): 2%, so `count`
/// calls span `per` plus 2% (20 ms of a 1 s window).
///
/// Why: the far side counts *arrivals* in a strict sliding window (the CRM simulator, and
/// ActiveCampaign's 5 requests/s), while we space the moments our calls are *released*. The
/// time between the two (a worker's wake-up, the connection, the far side's accept) varies by
/// milliseconds; spaced at exactly `per / count`, a call released on time behind one that was
/// slow to arrive lands `count + 1` calls inside one window and is answered 429 (which pauses
/// the whole account for `Retry-After`, ≥ 1 s, and costs the job a retry). `bench/crm.sh`
/// measured 2 such 429s per flood before this margin, none after.
const JITTER_MARGIN_DIV: u32 = 50;

/// The time between two calls at `rate`: `per / count`, plus the jitter margin; `None` for a
/// zero rate.
fn interval_for(rate: Rate) -> Option<Duration> {
    let count = NonZeroU32::new(rate.count)?;
    let even = rate.per / count.get();
    Some(even + even / JITTER_MARGIN_DIV)
}

/// The governor quota for `count` per `per`, spaced evenly (with the jitter margin); `None`
/// for a zero rate.
fn quota_for(rate: Rate) -> Option<Quota> {
    Quota::with_period(interval_for(rate)?).map(|q| q.allow_burst(NonZeroU32::MIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, per_ms: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_millis(per_ms),
            burst: count,
        }
    }

    #[tokio::test]
    async fn spaces_calls_evenly() {
        let pacer = Pacer::new(Some(rate(20, 1000)));
        let start = std::time::Instant::now();
        for _ in 0..6 {
            pacer.ready().await;
        }
        // First call is free, the next five are 50 ms apart each.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(240), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
    }

    #[tokio::test]
    async fn pause_holds_every_caller_and_longest_wins() {
        let pacer = Pacer::new(None);
        pacer.pause(Duration::from_millis(150));
        pacer.pause(Duration::from_millis(10));
        assert!(pacer.paused_until().is_some());
        let start = std::time::Instant::now();
        pacer.ready().await;
        assert!(start.elapsed() >= Duration::from_millis(140));
        assert!(pacer.paused_until().is_none());
    }

    /// Calls released at the pacer's interval whose arrival at the far side is delayed by up
    /// to `jitter` (the worst case: the first call of a window late, the last on time) never
    /// put more than `count` arrivals in a window of `per`, as a strict sliding window counts.
    #[test]
    fn spacing_leaves_room_for_arrival_jitter() {
        for (count, per_ms) in [(5, 1000), (1, 1000), (100, 60_000), (20, 1000)] {
            let rate = rate(count, per_ms);
            let interval = interval_for(rate).unwrap();
            let jitter = rate.per / 100;
            let arrivals: Vec<Duration> = (0..4 * count + 2)
                .map(|k| interval * k + if k % 2 == 0 { jitter } else { Duration::ZERO })
                .collect();
            let k = count as usize;
            for (i, first) in arrivals.iter().enumerate() {
                if let Some(next) = arrivals.get(i + k) {
                    // The (count+1)-th arrival must fall outside the window opened by `first`.
                    assert!(
                        next.saturating_sub(*first) >= rate.per,
                        "{count}/{per_ms}ms: arrivals {i} and {} are {:?} apart",
                        i + k,
                        next.saturating_sub(*first)
                    );
                }
            }
        }
        // It costs 2% of the rate.
        assert_eq!(
            interval_for(rate(5, 1000)),
            Some(Duration::from_millis(204))
        );
    }

    #[test]
    fn zero_rate_means_unpaced() {
        assert!(quota_for(rate(0, 1000)).is_none());
        assert!(quota_for(rate(5, 1000)).is_some());
    }
}
