//! Admission limits of one site (governor, GCRA): per client IP and for the whole site.
//! A request over a limit is answered `429` with `Retry-After`; nothing is queued.
//!
//! The per-IP limiter is keyed: it keeps one small state per client, so it is kept bounded —
//! IPv6 clients are keyed by their /64 (one subscriber's whole prefix counts as one client),
//! and clients whose allowance is full again are forgotten by [`Limits::forget_idle`], which
//! the front door calls periodically and whenever the table grows past [`MAX_TRACKED`].

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{Rate, SiteLimits};

/// Client states kept before idle ones are forgotten early.
pub const MAX_TRACKED: usize = 100_000;

pub struct Limits {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_site: Option<DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl Limits {
    pub fn new(limits: &SiteLimits) -> Self {
        Limits {
            per_ip: limits.per_ip.and_then(quota).map(RateLimiter::keyed),
            per_site: limits.per_site.and_then(quota).map(RateLimiter::direct),
            clock: DefaultClock::default(),
        }
    }

    /// Admit one request from `ip`, or say how long until it would be admitted.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.per_ip else {
            return Ok(());
        };
        if limiter.len() > MAX_TRACKED {
            self.forget_idle();
        }
        limiter
            .check_key(&client_key(ip))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Admit one request for the site, or say how long until it would be admitted.
    pub fn check_site(&self) -> Result<(), Duration> {
        let Some(limiter) = &self.per_site else {
            return Ok(());
        };
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forget clients whose allowance is full again (they would be admitted as new anyway).
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.per_ip {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Clients tracked by the per-IP limiter.
    pub fn tracked(&self) -> usize {
        self.per_ip.as_ref().map_or(0, |l| l.len())
    }
}

/// The governor quota for a configured rate; `None` for a zero count (no limit).
fn quota(rate: Rate) -> Option<Quota> {
    let count = NonZeroU32::new(rate.count)?;
    let burst = NonZeroU32::new(rate.burst).unwrap_or(count);
    Quota::with_period(rate.per / count.get()).map(|q| q.allow_burst(burst))
}

/// IPv4 addresses as they are; IPv6 addresses cut to their /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, per: Duration, burst: u32) -> Option<Rate> {
        Some(Rate { count, per, burst })
    }

    #[test]
    fn per_ip_burst_then_429_with_wait() {
        let l = Limits::new(&SiteLimits {
            per_ip: rate(2, Duration::from_secs(10), 2),
            per_site: None,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(l.check_ip(a).is_ok());
        assert!(l.check_ip(a).is_ok());
        let wait = l.check_ip(a).unwrap_err();
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );
        assert!(l.check_ip(b).is_ok(), "other clients are not affected");
        assert!(l.check_site().is_ok(), "no site limit configured");
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let l = Limits::new(&SiteLimits {
            per_ip: rate(1, Duration::from_secs(60), 1),
            per_site: None,
        });
        assert!(l.check_ip("2001:db8::1".parse().unwrap()).is_ok());
        assert!(l.check_ip("2001:db8::ffff".parse().unwrap()).is_err());
        assert!(l.check_ip("2001:db8:0:1::1".parse().unwrap()).is_ok());
        assert_eq!(l.tracked(), 2);
    }

    #[test]
    fn site_limit() {
        let l = Limits::new(&SiteLimits {
            per_ip: None,
            per_site: rate(1, Duration::from_secs(60), 1),
        });
        assert!(l.check_site().is_ok());
        assert!(l.check_site().is_err());
    }
}
