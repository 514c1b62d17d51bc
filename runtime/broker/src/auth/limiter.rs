//! Failed-login tracking per source address.
//!
//! An address with `max_failures` failed logins within `window` of its first counted
//! failure is refused for `window` from the failure that reached the limit; refusals while
//! refused do not extend it. Afterwards it starts from zero. Successful logins do not reset
//! the count (an attacker with one valid account cannot interleave them to keep guessing).
//!
//! IPv6 addresses are tracked by their /64 prefix (one host usually owns a whole /64), and
//! IPv4-mapped IPv6 addresses as IPv4. At most `capacity` addresses are tracked: when full,
//! entries whose time has passed go first, then the not-refused one with the oldest
//! failure (so a flood of new addresses does not lift a refusal).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

/// The default cap on tracked addresses (about 60 bytes each).
pub const DEFAULT_CAPACITY: usize = 10_000;

#[derive(Debug)]
pub struct FailureTracker {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    entries: HashMap<IpAddr, Entry>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    first: Instant,
    last: Instant,
    refused_until: Option<Instant>,
}

impl Entry {
    fn expired(&self, now: Instant, window: Duration) -> bool {
        match self.refused_until {
            Some(until) => now >= until,
            None => now.duration_since(self.first) >= window,
        }
    }
}

/// What recording a failure did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Counted; the address may still try.
    Counted(u32),
    /// This failure reached the limit: the address is refused from now on.
    NowRefused,
    /// Tracking is off (`max_failures` 0) or the address is unknown.
    Ignored,
}

impl FailureTracker {
    /// `max_failures` 0 turns the limiter off.
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        Self {
            max_failures,
            window,
            capacity: capacity.max(1),
            entries: HashMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_failures > 0 && !self.window.is_zero()
    }

    /// Is `address` refused at `now`?
    pub fn is_refused(&mut self, address: IpAddr, now: Instant) -> bool {
        if !self.enabled() {
            return false;
        }
        let key = key(address);
        match self.entries.get(&key) {
            Some(entry) if entry.refused_until.is_some_and(|until| now < until) => true,
            Some(entry) if entry.expired(now, self.window) => {
                self.entries.remove(&key);
                false
            }
            _ => false,
        }
    }

    /// Counts a failed login from `address`.
    pub fn record_failure(&mut self, address: IpAddr, now: Instant) -> Recorded {
        if !self.enabled() {
            return Recorded::Ignored;
        }
        let key = key(address);
        if let Some(entry) = self.entries.get(&key)
            && entry.expired(now, self.window)
        {
            self.entries.remove(&key);
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.make_room(now);
        }
        let entry = self.entries.entry(key).or_insert(Entry {
            failures: 0,
            first: now,
            last: now,
            refused_until: None,
        });
        if entry.refused_until.is_some() {
            // Already refused: the window runs from the failure that reached the limit.
            return Recorded::Ignored;
        }
        entry.failures += 1;
        entry.last = now;
        if entry.failures >= self.max_failures {
            entry.refused_until = Some(now + self.window);
            Recorded::NowRefused
        } else {
            Recorded::Counted(entry.failures)
        }
    }

    pub fn tracked(&self) -> usize {
        self.entries.len()
    }

    fn make_room(&mut self, now: Instant) {
        let window = self.window;
        self.entries.retain(|_, entry| !entry.expired(now, window));
        if self.entries.len() >= self.capacity
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| (entry.refused_until.is_some(), entry.last))
                .map(|(key, _)| *key)
        {
            self.entries.remove(&oldest);
        }
    }
}

/// The tracking key of an address: IPv4 as is, IPv4-mapped IPv6 as IPv4, other IPv6 by
/// its /64 prefix.
fn key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = v6.to_bits() & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from_bits(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn refuses_after_max_failures_for_one_window() {
        let mut tracker = FailureTracker::new(3, WINDOW, 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(tracker.record_failure(a, t0), Recorded::Counted(1));
        assert_eq!(
            tracker.record_failure(a, t0 + Duration::from_secs(10)),
            Recorded::Counted(2)
        );
        assert!(!tracker.is_refused(a, t0 + Duration::from_secs(11)));
        let third = t0 + Duration::from_secs(50);
        assert_eq!(tracker.record_failure(a, third), Recorded::NowRefused);
        assert!(tracker.is_refused(a, third));
        assert!(
            tracker.is_refused(a, third + WINDOW - Duration::from_millis(1)),
            "a full window from the failure that reached the limit"
        );
        assert!(!tracker.is_refused(ip("192.0.2.2"), third), "per address");
        assert_eq!(
            tracker.record_failure(a, third + Duration::from_secs(1)),
            Recorded::Ignored,
            "failures while refused do not extend the refusal"
        );
        assert!(!tracker.is_refused(a, third + WINDOW));
        assert_eq!(tracker.tracked(), 0, "forgotten after its time");
        assert_eq!(
            tracker.record_failure(a, third + WINDOW),
            Recorded::Counted(1),
            "starts from zero"
        );
    }

    #[test]
    fn failures_spread_over_more_than_a_window_do_not_add_up() {
        let mut tracker = FailureTracker::new(2, WINDOW, 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(tracker.record_failure(a, t0), Recorded::Counted(1));
        assert_eq!(tracker.record_failure(a, t0 + WINDOW), Recorded::Counted(1));
        assert_eq!(
            tracker.record_failure(a, t0 + WINDOW + Duration::from_secs(1)),
            Recorded::NowRefused
        );
    }

    #[test]
    fn ipv6_by_prefix_and_mapped_ipv4() {
        let mut tracker = FailureTracker::new(2, WINDOW, 100);
        let now = Instant::now();
        tracker.record_failure(ip("2001:db8:1:2::1"), now);
        tracker.record_failure(ip("2001:db8:1:2:ffff::9"), now);
        assert!(tracker.is_refused(ip("2001:db8:1:2::77"), now));
        assert!(!tracker.is_refused(ip("2001:db8:1:3::1"), now));
        tracker.record_failure(ip("::ffff:192.0.2.7"), now);
        tracker.record_failure(ip("192.0.2.7"), now);
        assert!(tracker.is_refused(ip("192.0.2.7"), now));
    }

    #[test]
    fn memory_is_bounded() {
        let mut tracker = FailureTracker::new(2, WINDOW, 50);
        let t0 = Instant::now();
        let refused = ip("198.51.100.1");
        tracker.record_failure(refused, t0);
        tracker.record_failure(refused, t0);
        for i in 0..1000u32 {
            let address = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            tracker.record_failure(address, t0 + Duration::from_millis(u64::from(i) + 1));
            assert!(tracker.tracked() <= 50);
        }
        assert!(
            tracker.is_refused(refused, t0 + Duration::from_secs(2)),
            "a refusal outlives the flood"
        );
        // The newest addresses are kept.
        let newest = IpAddr::from((0x0a00_0000u32 + 999).to_be_bytes());
        assert_eq!(
            tracker.record_failure(newest, t0 + Duration::from_secs(2)),
            Recorded::NowRefused
        );
    }

    #[test]
    fn off_when_max_failures_is_zero() {
        let mut tracker = FailureTracker::new(0, WINDOW, 10);
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                tracker.record_failure(ip("192.0.2.1"), now),
                Recorded::Ignored
            );
        }
        assert!(!tracker.is_refused(ip("192.0.2.1"), now));
        assert_eq!(tracker.tracked(), 0);
    }
}
