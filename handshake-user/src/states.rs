//! What the daemon keeps of the census, per watched namespace: the last
//! snapshot, a short history of TIME_WAIT counts, and what is derived from
//! them — entry rates and the ephemeral-port exhaustion forecast. Pure: the
//! census loop feeds it, the API and metrics read it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use handshake_common::abi::{AF_INET, census::Socket, tcp_state};
use serde::{Deserialize, Serialize};

use crate::census::{STATES, Snapshot, addr};

/// How much history is kept.
const WINDOW_NS: u64 = 10_000_000_000;

/// How far back rates look: short enough to follow a change of pace, long
/// enough to span several censuses.
const RATE_WINDOW_NS: u64 = 3_000_000_000;

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
    pub snapshot: Snapshot,
    pub taken_ns: u64,
    history: VecDeque<Sample>,
}

impl NetnsView {
    pub fn new(name: &str, snapshot: Snapshot, entries: u64, now_ns: u64) -> Self {
        let mut view = Self {
            name: name.to_owned(),
            snapshot: snapshot.clone(),
            taken_ns: now_ns,
            history: VecDeque::new(),
        };
        view.update(snapshot, entries, now_ns);
        view
    }

    /// Takes in a new census of this namespace.
    pub fn update(&mut self, snapshot: Snapshot, entries: u64, now_ns: u64) {
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
        self.snapshot = snapshot;
        self.taken_ns = now_ns;
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
                    remote_addr: addr(dest.0, &dest.1),
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
    pub fn oldest(&self, state: u32, top: usize) -> Vec<SocketView> {
        let mut views: Vec<SocketView> = self
            .snapshot
            .sockets
            .iter()
            .filter(|s| u32::from(s.state) == state)
            .map(|s| SocketView::of(&self.name, s, self.taken_ns))
            .collect();
        SocketView::sort(&mut views);
        views.truncate(top);
        views
    }

    /// All eleven states, both families together, as `ss` counts them.
    pub fn states(&self) -> BTreeMap<String, u64> {
        STATES
            .iter()
            .map(|s| (state_name(*s).to_owned(), self.snapshot.count(*s)))
            .collect()
    }

    pub fn time_wait(&self) -> u64 {
        self.snapshot.count(tcp_state::TIME_WAIT)
    }
}

pub fn state_name(state: u32) -> &'static str {
    tcp_state::name(state).unwrap_or("unknown")
}

/// A state by the name `ss` or this tool prints (`close_wait`,
/// `CLOSE-WAIT`, `estab`...).
pub fn state_by_name(name: &str) -> Option<u32> {
    let bare = |s: &str| s.to_ascii_lowercase().replace(['-', '_'], "");
    let name = match bare(name).as_str() {
        "estab" => "established".to_owned(),
        other => other.to_owned(),
    };
    STATES
        .iter()
        .copied()
        .find(|s| bare(state_name(*s)) == name)
}

/// One full socket from a census listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SocketView {
    pub netns: String,
    pub family: String,
    pub state: String,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    /// Seconds in this state; `null` when the socket entered it before the
    /// daemon started.
    pub state_age_s: Option<f64>,
    /// The process that called connect(), for connections this host opened.
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

impl SocketView {
    pub fn of(netns: &str, socket: &Socket, now_ns: u64) -> Self {
        let comm_len = socket.comm.iter().position(|b| *b == 0).unwrap_or(16);
        Self {
            netns: netns.to_owned(),
            family: if socket.family == AF_INET {
                "ipv4"
            } else {
                "ipv6"
            }
            .to_owned(),
            state: state_name(u32::from(socket.state)).to_owned(),
            local_addr: addr(socket.family, &socket.local_addr),
            local_port: socket.local_port,
            remote_addr: addr(socket.family, &socket.remote_addr),
            remote_port: socket.remote_port,
            state_age_s: (socket.since_ns != 0)
                .then(|| now_ns.saturating_sub(socket.since_ns) as f64 / 1e9),
            pid: (socket.pid != 0).then_some(socket.pid),
            comm: (comm_len > 0)
                .then(|| String::from_utf8_lossy(&socket.comm[..comm_len]).into_owned()),
        }
    }

    /// Oldest first; unknown ages last.
    pub fn sort(views: &mut [Self]) {
        views.sort_by(|a, b| {
            b.state_age_s
                .unwrap_or(-1.0)
                .total_cmp(&a.state_age_s.unwrap_or(-1.0))
        });
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    pub remote_addr: String,
    pub remote_port: u16,
    pub time_wait: u64,
    pub growth_per_second: f64,
    pub seconds_to_exhaustion: Option<f64>,
}

/// `handshake states --json`: one per watched namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatesView {
    pub netns: String,
    pub states: BTreeMap<String, u64>,
    /// Host-wide (the state tracepoint sees every namespace): per
    /// `from->to`, over the daemon's last second or so.
    pub transitions_per_second: BTreeMap<String, f64>,
    /// `iter/tcp`, or `sock_diag` (netlink) where the program is unavailable.
    pub census_source: String,
    pub census_seconds: f64,
    /// For close_wait, fin_wait2 and syn_sent: the oldest sockets, oldest
    /// first (a leak, a peer that never closes, a peer that never answers).
    pub oldest: BTreeMap<String, Vec<SocketView>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub remote_addr: String,
    /// 0: all ports of that address (this host's TIME_WAIT sockets as a
    /// server, whose local port is not ephemeral).
    pub remote_port: u16,
    pub count: u64,
}

/// `handshake timewait --json`: one per watched namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimeWaitView {
    pub netns: String,
    pub count: u64,
    pub entries_per_second: Option<f64>,
    pub port_range: [u16; 2],
    pub top: Vec<Endpoint>,
    pub top_local: Vec<Endpoint>,
    pub forecast: Vec<Forecast>,
}

impl TimeWaitView {
    pub fn of(view: &NetnsView, top: usize) -> Self {
        let endpoints = |entries: &[(handshake_common::abi::census::TwKey, u64)]| {
            entries
                .iter()
                .take(top)
                .map(|(key, count)| Endpoint {
                    remote_addr: addr(key.family, &key.addr),
                    remote_port: key.port,
                    count: *count,
                })
                .collect()
        };
        Self {
            netns: view.name.clone(),
            count: view.time_wait(),
            entries_per_second: view.entries_per_second(),
            port_range: [view.snapshot.port_range.0, view.snapshot.port_range.1],
            top: endpoints(&view.snapshot.tw_remote),
            top_local: endpoints(&view.snapshot.tw_local),
            forecast: view.forecast().into_iter().take(top).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use handshake_common::abi::{
        AF_INET,
        census::{Summary, TwKey},
    };

    use super::*;

    fn snapshot(tw_to_dest: u64) -> Snapshot {
        let mut sockets = [[0; 16]; 2];
        sockets[0][tcp_state::TIME_WAIT as usize] = tw_to_dest;
        Snapshot {
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
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn a_steady_churn_forecasts_the_remaining_ports_over_its_rate() {
        // 100 connections a second towards 10.0.0.1:80, 1000 ports: at
        // 100 per second TIME_WAIT would level off at 6000 > 1000, so the
        // ports run out (1000 - 400) / 100 = 6 s after the fourth second.
        let mut view = NetnsView::new("host", snapshot(0), 0, 0);
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
        let mut view = NetnsView::new("host", snapshot(0), 0, 0);
        view.update(snapshot(20), 20, 2_000_000_000);
        assert_eq!(view.forecast()[0].seconds_to_exhaustion, None);
        let mut flat = NetnsView::new("host", snapshot(500), 0, 0);
        flat.update(snapshot(500), 0, 2_000_000_000);
        assert_eq!(flat.forecast()[0].seconds_to_exhaustion, None);
    }

    #[test]
    fn states_are_found_by_any_usual_spelling() {
        assert_eq!(state_by_name("FIN-WAIT-2"), Some(tcp_state::FIN_WAIT2));
        assert_eq!(state_by_name("close_wait"), Some(tcp_state::CLOSE_WAIT));
        assert_eq!(state_by_name("ESTAB"), Some(tcp_state::ESTABLISHED));
        assert_eq!(state_by_name("SYN-SENT"), Some(tcp_state::SYN_SENT));
        assert_eq!(state_by_name("half-open"), None);
    }

    #[test]
    fn history_keeps_a_bounded_window() {
        let mut view = NetnsView::new("host", snapshot(0), 0, 0);
        for s in 1..=100u64 {
            view.update(snapshot(s), s, s * 1_000_000_000);
        }
        assert!(view.history.len() <= 12, "{}", view.history.len());
        let rate = view.entries_per_second().unwrap();
        assert!((rate - 1.0).abs() < 1e-9, "{rate}");
    }
}
