//! What the daemon keeps of the census, per watched namespace: the last
//! snapshot, a short history of TIME_WAIT counts, and what is derived from
//! them — entry rates and the ephemeral-port exhaustion forecast. Pure: the
//! census loop feeds it, the API and metrics read it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use handshake_common::abi::{
    census::{Listener, NetnsStats, Socket, TwKey},
    tcp_state,
};

use crate::{
    kernel::census::NetnsCensus,
    model::listeners::same_listener,
    wire::{Attribution, Endpoint, Family, Forecast, STATES, SocketView, TimeWaitView, state_name},
};

/// Whose a socket is, from its namespace's inode and its cgroup id: the
/// daemon resolves names and paths (`daemon::state::State::attribute`).
pub type Attribute<'a> = dyn FnMut(u64, u64) -> Attribution + 'a;

/// How much history is kept.
const WINDOW_NS: u64 = 10_000_000_000;

/// How far back rates look: short enough to follow a change of pace, long
/// enough to span several censuses.
const RATE_WINDOW_NS: u64 = 3_000_000_000;

/// The states whose sockets the regular census lists, to find the
/// oldest: an application that never closes (CLOSE_WAIT), a peer that never
/// closes (FIN_WAIT2), a peer that never answers (SYN_SENT).
pub const STUCK_STATES: [u32; 3] = [
    tcp_state::CLOSE_WAIT,
    tcp_state::FIN_WAIT2,
    tcp_state::SYN_SENT,
];

/// Socket records the regular census lists per namespace.
pub const STUCK_RECORDS: u32 = 1024;

/// Bit mask of [`STUCK_STATES`], as the census takes it.
pub fn stuck_mask() -> u32 {
    STUCK_STATES.iter().fold(0, |mask, s| mask | 1 << s)
}

/// How long a socket stays in TIME_WAIT on Linux (`TCP_TIMEWAIT_LEN`).
pub const TIME_WAIT_SECONDS: f64 = 60.0;

/// (family, remote address, remote port): a destination this host connects
/// to.
type Destination = (u16, [u8; 16], u16);

#[derive(Clone, Debug)]
struct Sample {
    at_ns: u64,
    /// Sockets that entered TIME_WAIT in this namespace so far.
    entries: u64,
    per_destination: HashMap<Destination, u64>,
}

/// One watched namespace.
#[derive(Clone, Debug)]
pub struct NetnsView {
    pub name: String,
    pub inode: u64,
    pub snapshot: NetnsCensus,
    pub taken_ns: u64,
    history: VecDeque<Sample>,
    /// Its state changes so far, and when they were read.
    stats: Option<(u64, NetnsStats)>,
    /// State changes per second by the state entered, between the last
    /// two reads at least half a second apart.
    pub entered_per_second: [f64; 16],
    /// The listeners of an earlier census at least half a second before
    /// the last, and when it was taken: drop rates.
    pub listeners_before: Option<(u64, Vec<Listener>)>,
}

impl NetnsView {
    pub fn new(name: &str, inode: u64, snapshot: NetnsCensus, entries: u64, now_ns: u64) -> Self {
        let mut view = Self {
            name: name.to_owned(),
            inode,
            snapshot: snapshot.clone(),
            taken_ns: now_ns,
            history: VecDeque::new(),
            stats: None,
            entered_per_second: [0.0; 16],
            listeners_before: None,
        };
        view.update(snapshot, entries, now_ns);
        view
    }

    /// Takes in the namespace's state changes so far (every round, counted
    /// afresh or not).
    pub fn observe(&mut self, stats: NetnsStats, now_ns: u64) {
        match self.stats {
            Some((then, before)) if now_ns.saturating_sub(then) >= 500_000_000 => {
                let seconds = (now_ns - then) as f64 / 1e9;
                for (rate, (after, before)) in self
                    .entered_per_second
                    .iter_mut()
                    .zip(stats.entered.iter().zip(before.entered))
                {
                    *rate = after.saturating_sub(before) as f64 / seconds;
                }
                self.stats = Some((now_ns, stats));
            }
            Some(_) => {}
            None => self.stats = Some((now_ns, stats)),
        }
    }

    /// Its state changes so far, by the state entered.
    pub fn stats(&self) -> NetnsStats {
        self.stats.map(|(_, s)| s).unwrap_or_default()
    }

    /// All sockets counted, every state.
    pub fn total(&self) -> u64 {
        STATES.iter().map(|s| self.snapshot.count(*s)).sum()
    }

    /// Takes in a new census of this namespace.
    pub fn update(&mut self, snapshot: NetnsCensus, entries: u64, now_ns: u64) {
        let per_destination = snapshot
            .tw_remote
            .iter()
            .filter(|(key, _)| key.port != 0)
            .map(|(key, count)| ((key.family, key.addr, key.port), *count))
            .collect();
        self.history.push_back(Sample {
            at_ns: now_ns,
            entries,
            per_destination,
        });
        // Keep one sample at or beyond the window, for a full-width rate.
        while self.history.len() > 2 && now_ns - self.history[1].at_ns >= WINDOW_NS {
            self.history.pop_front();
        }
        if self.listeners_before.is_none() || now_ns.saturating_sub(self.taken_ns) >= 500_000_000 {
            self.listeners_before =
                Some((self.taken_ns, std::mem::take(&mut self.snapshot.listeners)));
        }
        self.snapshot = snapshot;
        self.taken_ns = now_ns;
    }

    /// Listener `listener`'s record in the earlier census, and the seconds
    /// between the two.
    pub fn before(&self, listener: &Listener) -> Option<(&Listener, f64)> {
        let (then, listeners) = self.listeners_before.as_ref()?;
        let seconds = self.taken_ns.saturating_sub(*then) as f64 / 1e9;
        listeners
            .iter()
            .find(|l| same_listener(l, listener))
            .map(|l| (l, seconds))
    }

    fn span(&self) -> Option<(&Sample, &Sample, f64)> {
        let last = self.history.back()?;
        // The latest sample at least RATE_WINDOW old, or the oldest.
        let first = self
            .history
            .iter()
            .rev()
            .find(|s| last.at_ns - s.at_ns >= RATE_WINDOW_NS)
            .or_else(|| self.history.front())?;
        let seconds = (last.at_ns - first.at_ns) as f64 / 1e9;
        (seconds >= 0.5).then_some((first, last, seconds))
    }

    /// Sockets per second entering TIME_WAIT here, over the last seconds.
    pub fn entries_per_second(&self) -> Option<f64> {
        let (first, last, seconds) = self.span()?;
        Some(last.entries.saturating_sub(first.entries) as f64 / seconds)
    }

    /// Per destination with TIME_WAIT sockets: seconds until every local
    /// port of `ip_local_port_range` is held towards it, soonest first.
    /// `None`: not heading for exhaustion (not growing, or growing too
    /// slowly: at `r` per second TIME_WAIT levels off at `r × 60` sockets).
    pub fn forecast(&self) -> Vec<Forecast> {
        let (low, high) = self.snapshot.port_range;
        let ports = f64::from(high.saturating_sub(low)) + 1.0;
        let Some((first, last, seconds)) = self.span() else {
            return Vec::new();
        };
        let mut out: Vec<Forecast> = last
            .per_destination
            .iter()
            .map(|(dest, held)| {
                let before = first.per_destination.get(dest).copied().unwrap_or(0);
                let rate = held.saturating_sub(before) as f64 / seconds;
                let held = *held as f64;
                let seconds_to_exhaustion = if held >= ports {
                    Some(0.0)
                } else if rate > 0.0 && rate * TIME_WAIT_SECONDS > ports {
                    Some((ports - held) / rate)
                } else {
                    None
                };
                Forecast {
                    remote_addr: Family::from_af(dest.0).address(&dest.1),
                    remote_port: dest.2,
                    time_wait: held as u64,
                    growth_per_second: rate,
                    seconds_to_exhaustion,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            let key = |f: &Forecast| f.seconds_to_exhaustion.unwrap_or(f64::INFINITY);
            key(a)
                .total_cmp(&key(b))
                .then(b.time_wait.cmp(&a.time_wait))
        });
        out
    }

    /// Seconds the oldest full socket in `state` has been in it (0: none,
    /// or none the state tracepoint saw enter it).
    pub fn oldest_seconds(&self, state: u32) -> f64 {
        match self.snapshot.summary.oldest_since_ns[state as usize] {
            0 => 0.0,
            since => self.taken_ns.saturating_sub(since) as f64 / 1e9,
        }
    }

    /// The listed sockets in `state`, oldest first, at most `top`.
    pub fn oldest(&self, state: u32, top: usize, attribute: &mut Attribute<'_>) -> Vec<SocketView> {
        let mut views: Vec<SocketView> = self
            .snapshot
            .sockets
            .iter()
            .filter(|s| u32::from(s.state) == state)
            .map(|s| socket_view(attribute(self.inode, s.cgroup), s, self.taken_ns))
            .collect();
        SocketView::sort(&mut views);
        views.truncate(top);
        views
    }

    /// All eleven states, both families together, as `ss` counts them.
    pub fn states(&self) -> BTreeMap<String, u64> {
        STATES
            .iter()
            .map(|s| (state_name(*s).into_owned(), self.snapshot.count(*s)))
            .collect()
    }

    pub fn time_wait(&self) -> u64 {
        self.snapshot.count(tcp_state::TIME_WAIT)
    }
}

/// One full socket from a census listing, as the API shows it.
pub fn socket_view(attribution: Attribution, socket: &Socket, now_ns: u64) -> SocketView {
    let family = Family::from_af(socket.family);
    let comm_len = socket.comm.iter().position(|b| *b == 0).unwrap_or(16);
    SocketView {
        attribution,
        family: family.name().to_owned(),
        state: state_name(u32::from(socket.state)).into_owned(),
        local_addr: family.address(&socket.local_addr),
        local_port: socket.local_port,
        remote_addr: family.address(&socket.remote_addr),
        remote_port: socket.remote_port,
        state_age_s: (socket.since_ns != 0)
            .then(|| now_ns.saturating_sub(socket.since_ns) as f64 / 1e9),
        pid: (socket.pid != 0).then_some(socket.pid),
        comm: (comm_len > 0)
            .then(|| String::from_utf8_lossy(&socket.comm[..comm_len]).into_owned()),
    }
}

/// `handshake timewait` for one namespace: `top` entries per list.
pub fn time_wait_view(view: &NetnsView, top: usize) -> TimeWaitView {
    let endpoints = |entries: &[(TwKey, u64)]| {
        entries
            .iter()
            .take(top)
            .map(|(key, count)| Endpoint {
                remote_addr: Family::from_af(key.family).address(&key.addr),
                remote_port: key.port,
                count: *count,
            })
            .collect()
    };
    TimeWaitView {
        netns: view.name.clone(),
        netns_inode: view.inode,
        workloads: Vec::new(),
        count: view.time_wait(),
        entries_per_second: view.entries_per_second(),
        port_range: [view.snapshot.port_range.0, view.snapshot.port_range.1],
        top: endpoints(&view.snapshot.tw_remote),
        top_local: endpoints(&view.snapshot.tw_local),
        forecast: view.forecast().into_iter().take(top).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use handshake_common::abi::{AF_INET, census::Summary};

    use super::*;

    fn snapshot(tw_to_dest: u64) -> NetnsCensus {
        let mut sockets = [[0; 16]; 2];
        sockets[0][tcp_state::TIME_WAIT as usize] = tw_to_dest;
        NetnsCensus {
            summary: Summary {
                sockets,
                seen: tw_to_dest,
                ..Summary::default()
            },
            sockets: Vec::new(),
            tw_remote: vec![(
                TwKey {
                    family: AF_INET,
                    port: 80,
                    addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                },
                tw_to_dest,
            )],
            tw_local: Vec::new(),
            port_range: (40_000, 40_999),
            listeners: Vec::new(),
            netstat: Default::default(),
            syncookies: false,
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn a_steady_churn_forecasts_the_remaining_ports_over_its_rate() {
        // 100 connections a second towards 10.0.0.1:80, 1000 ports: at
        // 100 per second TIME_WAIT would level off at 6000 > 1000, so the
        // ports run out (1000 - 400) / 100 = 6 s after the fourth second.
        let mut view = NetnsView::new("host", 1, snapshot(0), 0, 0);
        for s in 1..=4u64 {
            view.update(snapshot(100 * s), 100 * s, s * 1_000_000_000);
        }
        let forecast = view.forecast();
        assert_eq!(forecast.len(), 1);
        assert_eq!(forecast[0].remote_addr, "10.0.0.1");
        assert_eq!(forecast[0].remote_port, 80);
        let seconds = forecast[0].seconds_to_exhaustion.unwrap();
        assert!((seconds - 6.0).abs() < 1e-9, "{seconds}");
        assert!((view.entries_per_second().unwrap() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn a_slow_or_flat_churn_never_exhausts() {
        // 10 per second levels off at 600 < 1000 ports.
        let mut view = NetnsView::new("host", 1, snapshot(0), 0, 0);
        view.update(snapshot(20), 20, 2_000_000_000);
        assert_eq!(view.forecast()[0].seconds_to_exhaustion, None);
        let mut flat = NetnsView::new("host", 1, snapshot(500), 0, 0);
        flat.update(snapshot(500), 0, 2_000_000_000);
        assert_eq!(flat.forecast()[0].seconds_to_exhaustion, None);
    }

    #[test]
    fn history_keeps_a_bounded_window() {
        let mut view = NetnsView::new("host", 1, snapshot(0), 0, 0);
        for s in 1..=100u64 {
            view.update(snapshot(s), s, s * 1_000_000_000);
        }
        assert!(view.history.len() <= 12, "{}", view.history.len());
        let rate = view.entries_per_second().unwrap();
        assert!((rate - 1.0).abs() < 1e-9, "{rate}");
    }
}
