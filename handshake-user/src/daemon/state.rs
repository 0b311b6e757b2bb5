//! What the daemon's loops share behind one lock: decided handshakes, the
//! last sweep's view of the flow tables, the censuses, the TLS tracker and
//! the daemon's own counters.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use handshake_common::{abi::socket::SockHandshake, flow::Flow};

use crate::{
    daemon::census::CensusRound,
    kernel::{clock, loader::chain, maps::FlowStats},
    model::{
        FastSet,
        conntrack::{Conntrack, RowKey, row_key},
        sockets::SocketHandshakes,
        states::NetnsView,
        tls::TlsTracker,
    },
    wire::Source,
};

/// What the daemon itself counts, next to what the kernel counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfStats {
    /// Map reads that failed (scrapes answered with an error, sweeps lost).
    pub map_read_errors: u64,
    /// Ring-buffer records of the wrong size.
    pub events_malformed: u64,
    /// Census runs that failed.
    pub census_errors: u64,
    /// TLS ring-buffer records of the wrong size.
    pub tls_events_malformed: u64,
    /// Socket-layer records a CPU overwrote before the daemon read them.
    pub sock_records_lost: u64,
    /// Seconds between the scheduled censuses as they run: the
    /// `--census-interval`, or longer while a census is slow (see
    /// `daemon::census::census_loop`); 0 before the first.
    pub census_interval_s: f64,
}

/// What the loops share: decided handshakes, the last sweep's view of the
/// tables, and the daemon's own counters.
#[derive(Debug)]
pub struct State {
    pub conntrack: Conntrack,
    /// Socket-layer handshakes waiting out their hold.
    pub sockets: SocketHandshakes,
    /// Handshakes in the kernel tables at the last sweep.
    pub live: Vec<Flow>,
    /// Their connection ends, as of the last sweep of the socket rows.
    live_before: FastSet<RowKey>,
    pub flow_stats: FlowStats,
    pub self_stats: SelfStats,
    /// The last census of each watched namespace (host first).
    pub census: Vec<NetnsView>,
    /// TLS handshakes from the hooks' hello records.
    pub tls: TlsTracker,
    /// Host-wide state transitions per second, `from->to`, between the
    /// last two censuses.
    pub transitions_per_second: BTreeMap<String, f64>,
}

impl State {
    /// Takes in one census round.
    pub fn apply_census(&mut self, round: CensusRound) {
        let now = clock::monotonic_ns();
        for (name, result) in round {
            match result {
                Ok((snapshot, entries)) => match self.census.iter_mut().find(|v| v.name == name) {
                    Some(view) => view.update(snapshot, entries, now),
                    None => self
                        .census
                        .push(NetnsView::new(&name, snapshot, entries, now)),
                },
                Err(error) => {
                    self.self_stats.census_errors += 1;
                    tracing::error!(netns = %name, error = %chain(&error), "census failed");
                }
            }
        }
    }
}

impl State {
    /// A handshake the packet hooks decided. The socket layer's row of the
    /// same handshake, held while the hooks tracked it, joins it when it
    /// comes due: counted once, with the wire's timings.
    pub fn record_wire(&mut self, flow: Flow) {
        self.conntrack.record(flow, Source::Wire);
    }

    /// A record of the socket layer: held until it may count.
    pub fn record_socket(&mut self, record: &SockHandshake) {
        let Self {
            sockets, conntrack, ..
        } = self;
        sockets.record(record, |flow| conntrack.record(flow, Source::Socket));
    }

    /// Counts the socket layer's rows that are due and that the packet
    /// hooks do not track (as of the last sweep of their tables).
    ///
    /// A connection end counts as tracked if the last sweep or the one
    /// before saw it: a handshake the hooks decided just before a sweep
    /// reaches the daemon through the ring buffer, up to a drain (50 ms)
    /// later, and its socket row must not count before it comes.
    pub fn sweep_sockets(&mut self, now_ns: u64) {
        let live: FastSet<RowKey> = self.live.iter().map(row_key).collect();
        let mut tracked = std::mem::replace(&mut self.live_before, live);
        tracked.extend(self.live_before.iter().copied());
        let Self {
            sockets, conntrack, ..
        } = self;
        sockets.sweep(now_ns, &tracked, |flow| {
            conntrack.record(flow, Source::Socket)
        });
    }

    /// Empty, keeping `history` decided handshakes and TLS connections.
    pub fn new(history: usize) -> Self {
        Self {
            conntrack: Conntrack::new(history),
            sockets: SocketHandshakes::default(),
            live: Vec::new(),
            live_before: FastSet::default(),
            flow_stats: FlowStats::default(),
            self_stats: SelfStats::default(),
            census: Vec::new(),
            tls: TlsTracker::new(history),
            transitions_per_second: BTreeMap::new(),
        }
    }
}

/// The state, even if a thread panicked while holding it: every loop
/// leaves it consistent between statements that matter.
pub fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
