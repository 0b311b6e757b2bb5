//! Listeners from the census: their queues and drops, the drop rate
//! between two censuses, whether they answer SYNs with cookies, and when
//! they overflowed, to mark the handshakes that waited on them. Pure: the
//! census loop feeds it, the API and metrics read it.

use std::collections::VecDeque;

use handshake_common::abi::census::Listener;

use crate::wire::{Attribution, Family, ListenerView};

/// The kernel's clock of listener stamps (`jiffies`), against the
/// daemon's: its rate (HZ, a build option of the kernel) from two
/// censuses at least a second apart.
#[derive(Clone, Copy, Debug, Default)]
pub struct JiffyClock {
    first: Option<(u64, u64)>,
    hz: Option<f64>,
}

/// The rates kernels are built with.
const KNOWN_HZ: [f64; 4] = [100.0, 250.0, 300.0, 1000.0];

impl JiffyClock {
    /// Takes in `jiffies` as a census read it at `now_ns`.
    pub fn observe(&mut self, jiffies: u64, now_ns: u64) {
        let Some((j0, t0)) = self.first else {
            self.first = Some((jiffies, now_ns));
            return;
        };
        let seconds = now_ns.saturating_sub(t0) as f64 / 1e9;
        if self.hz.is_none() && seconds >= 1.0 && jiffies > j0 {
            let rate = (jiffies - j0) as f64 / seconds;
            let nearest = KNOWN_HZ
                .iter()
                .copied()
                .min_by(|a, b| (a - rate).abs().total_cmp(&(b - rate).abs()))
                .unwrap_or(rate);
            self.hz = Some(if (nearest - rate).abs() <= 0.1 * nearest {
                nearest
            } else {
                rate
            });
        }
    }

    /// Seconds from `stamp` to `now` (both the low 32 bits of `jiffies`),
    /// once the rate is known; `None` for a stamp of 0 (never).
    pub fn seconds_between(&self, stamp: u32, now: u64) -> Option<f64> {
        let hz = self.hz?;
        (stamp != 0).then(|| f64::from((now as u32).wrapping_sub(stamp)) / hz)
    }

    pub fn hz(&self) -> Option<f64> {
        self.hz
    }
}

/// A listener answers SYNs with cookies while its overflow stamp is this
/// recent: the kernel refreshes it at most once a second while sending
/// them (`tcp_synq_overflow`).
pub const COOKIES_WITHIN_S: f64 = 2.0;

/// Whether a listener overflowed at this census: its accept queue full, its
/// drops grown since `before`, or cookies sent (`stamp_s_ago` recent).
pub fn overflowing(
    listener: &Listener,
    before: Option<&Listener>,
    stamp_s_ago: Option<f64>,
) -> bool {
    // The kernel's test (`sk_acceptq_is_full`): more waiting than the
    // backlog.
    listener.accept_queue > listener.accept_queue_max
        || before.is_some_and(|b| listener.drops > b.drops)
        || stamp_s_ago.is_some_and(|s| s < COOKIES_WITHIN_S)
}

/// The same listener in an earlier census: family, address, port.
pub fn same_listener(a: &Listener, b: &Listener) -> bool {
    (a.family, a.local_addr, a.local_port) == (b.family, b.local_addr, b.local_port)
}

/// One listener as `handshake listeners` shows it.
pub fn listener_view(
    attribution: Attribution,
    listener: &Listener,
    before: Option<(&Listener, f64)>,
    stamp_s_ago: Option<f64>,
) -> ListenerView {
    let family = Family::from_af(listener.family);
    ListenerView {
        attribution,
        family: family.name().to_owned(),
        local_addr: family.address(&listener.local_addr),
        local_port: listener.local_port,
        accept_queue: listener.accept_queue,
        accept_queue_max: listener.accept_queue_max,
        syn_queue: listener.syn_queue,
        drops: listener.drops,
        drops_per_second: before.and_then(|(b, seconds)| {
            (seconds > 0.0).then(|| f64::from(listener.drops.wrapping_sub(b.drops)) / seconds)
        }),
        syn_cookies: stamp_s_ago.is_some_and(|s| s < COOKIES_WITHIN_S),
        syn_overflow_s_ago: stamp_s_ago,
    }
}

/// Overflow episodes kept, at most.
const MAX_EPISODES: usize = 4096;

/// When listeners overflowed: per namespace and port, from one census to
/// the next.
#[derive(Clone, Debug, Default)]
pub struct Overflows {
    episodes: VecDeque<Episode>,
}

#[derive(Clone, Copy, Debug)]
struct Episode {
    netns: u64,
    port: u16,
    from_ns: u64,
    to_ns: u64,
}

impl Overflows {
    /// The listener on `port` of namespace `netns` overflowed between
    /// `from_ns` and `to_ns` (joined to its last episode when they touch).
    pub fn record(&mut self, netns: u64, port: u16, from_ns: u64, to_ns: u64) {
        if let Some(last) = self
            .episodes
            .iter_mut()
            .rev()
            .find(|e| e.netns == netns && e.port == port)
            && from_ns <= last.to_ns
        {
            last.to_ns = last.to_ns.max(to_ns);
            return;
        }
        if self.episodes.len() == MAX_EPISODES {
            self.episodes.pop_front();
        }
        self.episodes.push_back(Episode {
            netns,
            port,
            from_ns,
            to_ns,
        });
    }

    /// Whether a listener on `port` (of namespace `netns`, or of any when
    /// `None`) overflowed at some time between `from_ns` and `to_ns`.
    pub fn during(&self, netns: Option<u64>, port: u16, from_ns: u64, to_ns: u64) -> bool {
        self.episodes.iter().any(|e| {
            e.port == port
                && netns.is_none_or(|n| n == e.netns)
                && e.from_ns <= to_ns
                && from_ns <= e.to_ns
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_rate_is_read_from_two_censuses() {
        let mut clock = JiffyClock::default();
        clock.observe(1_000_000, 0);
        assert_eq!(clock.seconds_between(999_000, 1_000_000), None);
        // 251 jiffies in a second: a 250 Hz kernel.
        clock.observe(1_000_251, 1_000_000_000);
        assert_eq!(clock.hz(), Some(250.0));
        assert_eq!(clock.seconds_between(1_000_001, 1_000_251), Some(1.0));
        assert_eq!(clock.seconds_between(0, 1_000_251), None);
        // The low 32 bits wrap.
        assert_eq!(clock.seconds_between(u32::MAX, (1 << 32) + 249), Some(1.0));
    }

    #[test]
    fn overflow_episodes_join_and_are_found_by_time() {
        let mut overflows = Overflows::default();
        overflows.record(7, 80, 1_000, 2_000);
        overflows.record(7, 80, 2_000, 3_000);
        overflows.record(8, 443, 5_000, 6_000);
        assert!(overflows.during(Some(7), 80, 2_500, 2_600));
        assert!(overflows.during(None, 80, 0, 1_000));
        assert!(!overflows.during(Some(8), 80, 2_500, 2_600));
        assert!(!overflows.during(Some(7), 80, 3_001, 4_000));
        assert_eq!(overflows.episodes.len(), 2);
    }

    #[test]
    fn a_full_accept_queue_or_growing_drops_or_cookies_is_overflowing() {
        let quiet = Listener {
            accept_queue: 0,
            accept_queue_max: 3,
            drops: 5,
            ..Listener::default()
        };
        assert!(!overflowing(&quiet, Some(&quiet), None));
        let full = Listener {
            accept_queue: 4,
            ..quiet
        };
        assert!(overflowing(&full, None, None));
        let dropping = Listener { drops: 6, ..quiet };
        assert!(overflowing(&dropping, Some(&quiet), None));
        assert!(overflowing(&quiet, None, Some(0.5)));
        assert!(!overflowing(&quiet, None, Some(30.0)));
    }
}
