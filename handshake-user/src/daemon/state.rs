//! What the daemon's loops share behind one lock: decided handshakes, the
//! last sweep's view of the flow tables, the censuses, the TLS tracker and
//! the daemon's own counters.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use handshake_common::{
    abi::socket::{KIND_CLOSED, SockHandshake},
    flow::Flow,
};

use crate::{
    daemon::{
        census::{CensusRound, Counted},
        persist::{Checkpoint, Kept, Positions},
    },
    kernel::{cgroup::Cgroups, clock, loader::chain, maps::FlowStats},
    model::{
        FastMap, FastSet,
        closes::{Closes, close_of},
        conntrack::{Conntrack, Origin, RowKey, row_key},
        listeners::{JiffyClock, Overflows, overflowing},
        sockets::SocketHandshakes,
        states::NetnsView,
        tls::TlsTracker,
        workload::Workload,
    },
    wire::{Attribution, Source},
};

/// What the daemon itself counts, next to what the kernel counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Checkpoints that could not be written, and the size of the last
    /// written (`daemon::persist`).
    pub checkpoint_errors: u64,
    pub checkpoint_bytes: u64,
    /// Seconds between the scheduled censuses as they run: the
    /// `--census-interval`, or longer while a census is slow (see
    /// `daemon::census::census_loop`); 0 before the first.
    pub census_interval_s: f64,
    /// How long the last round took to find the host's namespaces.
    pub netns_discovery_s: f64,
    /// Namespaces counted afresh by the scheduled rounds, and those left
    /// as they were (no state change since their last census).
    pub netns_counted: u64,
    pub netns_skipped: u64,
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
    /// Entries per flow table ([`crate::kernel::maps::Table`]) at the last
    /// sweep.
    pub table_entries: [u64; 2],
    /// Their connection ends, as of the last sweep of the socket rows.
    live_before: FastSet<RowKey>,
    /// Namespaces whose census failed and was logged.
    census_failed: FastSet<u64>,
    pub flow_stats: FlowStats,
    pub self_stats: SelfStats,
    /// The last census of each namespace of the host (host first).
    pub census: Vec<NetnsView>,
    /// Cgroup ids to paths, for attribution.
    pub cgroups: Cgroups,
    /// The kernel's `jiffies` against the daemon's clock (listener stamps).
    pub jiffies: JiffyClock,
    /// When listeners overflowed, to mark the handshakes that waited.
    pub overflows: Overflows,
    /// How connections closed: totals and the most recent.
    pub closes: Closes,
    /// The inode of the namespace the packet hooks are attached in (the
    /// first, with several): their rows' namespace, unless
    /// `hook_netns_by_index` knows better.
    pub hook_netns: u32,
    /// Per hooked interface index, its namespace's inode (0: the index is
    /// hooked in several namespaces).
    pub hook_netns_by_index: FastMap<u32, u32>,
    /// TLS handshakes from the hooks' hello records.
    pub tls: TlsTracker,
    /// Host-wide state transitions per second, `from->to`, between the
    /// last two censuses.
    pub transitions_per_second: BTreeMap<String, f64>,
    /// How far the rings and the socket log are read, as of what the
    /// state has taken in (each feed sets it with what it applied).
    pub positions: Positions,
    /// What is kept across restarts.
    pub kept: Kept,
}

impl State {
    /// Takes in one census round: the namespaces counted afresh, every
    /// namespace's state changes, and forgets the namespaces that are gone.
    pub fn apply_census(&mut self, round: CensusRound) {
        let now = clock::monotonic_ns();
        for counted in round.counted {
            let Counted {
                name,
                inode,
                result,
            } = counted;
            match result {
                Ok((snapshot, entries)) => {
                    self.jiffies.observe(snapshot.summary.jiffies, now);
                    let at = match self.census.iter().position(|v| v.inode == inode) {
                        Some(at) => {
                            let view = &mut self.census[at];
                            view.name = name;
                            view.update(snapshot, entries, now);
                            at
                        }
                        None => {
                            self.census
                                .push(NetnsView::new(&name, inode, snapshot, entries, now));
                            self.census.len() - 1
                        }
                    };
                    note_overflows(&self.census[at], &self.jiffies, &mut self.overflows);
                }
                Err(error) => {
                    self.self_stats.census_errors += 1;
                    // Said once per namespace: it fails the same way every
                    // round (handshake_census_errors_total counts them all).
                    if self.census_failed.insert(inode) {
                        let error = chain(&error);
                        let hint = if error.contains("Operation not permitted") {
                            "; entering another network namespace needs CAP_SYS_ADMIN"
                        } else {
                            ""
                        };
                        tracing::error!(netns = %name, %error, "census failed{hint}");
                    }
                }
            }
        }
        if !round.present.is_empty() {
            let present: BTreeMap<u64, String> = round.present.into_iter().collect();
            self.census
                .retain_mut(|view| match present.get(&view.inode) {
                    Some(name) => {
                        view.name.clone_from(name);
                        true
                    }
                    None => false,
                });
        }
        for view in &mut self.census {
            let stats = round
                .stats
                .iter()
                .find(|(inode, _)| u64::from(*inode) == view.inode)
                .map(|(_, stats)| *stats)
                .unwrap_or_default();
            view.observe(stats, now);
        }
        // The host first, then by name.
        self.census
            .sort_by(|a, b| (a.name != "host", &a.name).cmp(&(b.name != "host", &b.name)));
        self.self_stats.netns_discovery_s = round.discovery.as_secs_f64();
    }

    /// The namespace (inode) of the packet hooks on interface `ifindex`.
    pub fn hooks_netns(&self, ifindex: u32) -> u32 {
        self.hook_netns_by_index
            .get(&ifindex)
            .copied()
            .unwrap_or(self.hook_netns)
    }

    /// Whose a socket of namespace `inode` and cgroup `cgroup` is.
    pub fn attribute(&mut self, inode: u64, cgroup: u64) -> Attribution {
        attribution(&self.census, &mut self.cgroups, inode, cgroup)
    }
}

/// Records the listeners of `view`'s last census that overflowed since
/// its census before.
fn note_overflows(view: &NetnsView, clock: &JiffyClock, overflows: &mut Overflows) {
    let now = view.taken_ns;
    for listener in &view.snapshot.listeners {
        let before = view.before(listener);
        let stamp_s_ago =
            clock.seconds_between(listener.overflow_stamp, view.snapshot.summary.jiffies);
        if overflowing(listener, before.map(|(b, _)| b), stamp_s_ago) {
            let since = before.map_or(now.saturating_sub(1_000_000_000), |(_, seconds)| {
                now.saturating_sub((seconds * 1e9) as u64)
            });
            overflows.record(view.inode, listener.local_port, since, now);
        }
    }
}

/// Whose a socket of namespace `inode` (0: unknown) and cgroup `cgroup`
/// (0: unknown) is: the namespace's name from the census, the cgroup's
/// path from the v2 hierarchy, and what the path names.
pub fn attribution(
    census: &[NetnsView],
    cgroups: &mut Cgroups,
    inode: u64,
    cgroup: u64,
) -> Attribution {
    let netns = (inode != 0).then(|| {
        census
            .iter()
            .find(|v| v.inode == inode)
            .map_or_else(|| format!("ns:{inode}"), |v| v.name.clone())
    });
    let path = cgroups.path(cgroup).map(str::to_owned);
    let workload = path.as_deref().map(Workload::of).unwrap_or_default();
    Attribution {
        netns,
        netns_inode: (inode != 0).then_some(inode),
        cgroup: path,
        container_id: workload.container_id,
        pod_uid: workload.pod_uid,
        unit: workload.unit,
    }
}

impl State {
    /// A handshake the packet hooks decided. The socket layer's row of the
    /// same handshake, held while the hooks tracked it, joins it when it
    /// comes due: counted once, with the wire's timings.
    pub fn record_wire(&mut self, flow: Flow) {
        let origin = Origin {
            netns: self.hooks_netns(flow.ifindex),
            cgroup: 0,
        };
        self.conntrack.record_from(flow, Source::Wire, origin);
    }

    /// A record of the socket layer: a close is counted and kept; a
    /// handshake is held until it may count.
    pub fn record_socket(&mut self, record: &SockHandshake) {
        if record.kind == KIND_CLOSED {
            let origin = Origin {
                netns: record.netns,
                cgroup: record.cgroup,
            };
            match close_of(record, origin) {
                Some(close) => self.closes.record(close),
                None => self.sockets.malformed += 1,
            }
            return;
        }
        let Self {
            sockets, conntrack, ..
        } = self;
        sockets.record(record, |flow, origin| {
            conntrack.record_from(flow, Source::Socket, origin);
        });
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
        sockets.sweep(now_ns, &tracked, |flow, origin| {
            conntrack.record_from(flow, Source::Socket, origin);
        });
    }

    /// What a restart must not lose ([`crate::daemon::persist`]), as of
    /// `now_ns`.
    pub fn checkpoint(&self, now_ns: u64) -> Checkpoint {
        // A held socket row comes due within HOLD + GRACE of its record,
        // and looks for its twin within SAME_HANDSHAKE of that.
        let since = now_ns.saturating_sub(
            crate::model::sockets::HOLD_NS
                + crate::model::sockets::GRACE_NS
                + crate::model::conntrack::SAME_HANDSHAKE_NS,
        );
        let mut rows = Vec::new();
        let sockets = self.sockets.save(&mut rows);
        let unpaired = self.conntrack.unpaired_wire(since);
        for (flow, origin) in &unpaired {
            crate::model::put_row(&mut rows, flow, *origin, 0, 0);
        }
        Checkpoint {
            unpaired_wire: unpaired.len(),
            rows,
            conntrack_malformed: self.conntrack.malformed,
            sockets,
            closes: self.closes.totals.clone(),
            tls: self.tls.totals.save(),
            self_stats: self.self_stats,
            positions: self.positions.clone(),
            ..Checkpoint::of_totals(self.conntrack.totals())
        }
    }

    /// Takes up what a daemon before this one checkpointed: its totals go
    /// on, its held rows are held again. The positions are the feeds' to
    /// take up.
    pub fn restore(&mut self, checkpoint: Checkpoint) {
        self.conntrack
            .restore_totals(checkpoint.totals(), checkpoint.conntrack_malformed);
        let (sockets, rest) = SocketHandshakes::restore(checkpoint.sockets, &checkpoint.rows);
        self.sockets = sockets;
        let unpaired: Vec<(Flow, Origin)> = crate::model::get_rows(rest)
            .into_iter()
            .flatten()
            .take(checkpoint.unpaired_wire)
            .map(|(flow, origin, _, _)| (flow, origin))
            .collect();
        self.conntrack.restore_unpaired(unpaired);
        self.closes.totals = checkpoint.closes;
        self.tls.totals = crate::model::tls::TlsTotals::restore(checkpoint.tls);
        let gauges = self.self_stats;
        self.self_stats = SelfStats {
            census_interval_s: gauges.census_interval_s,
            netns_discovery_s: gauges.netns_discovery_s,
            ..checkpoint.self_stats
        };
        self.positions = checkpoint.positions;
    }

    /// Empty, keeping `history` decided handshakes and TLS connections.
    pub fn new(history: usize) -> Self {
        Self {
            conntrack: Conntrack::new(history),
            sockets: SocketHandshakes::default(),
            live: Vec::new(),
            table_entries: [0; 2],
            live_before: FastSet::default(),
            census_failed: FastSet::default(),
            flow_stats: FlowStats::default(),
            self_stats: SelfStats::default(),
            census: Vec::new(),
            cgroups: Cgroups::new(),
            jiffies: JiffyClock::default(),
            overflows: Overflows::default(),
            closes: Closes::new(history),
            hook_netns: 0,
            hook_netns_by_index: FastMap::default(),
            tls: TlsTracker::new(history),
            transitions_per_second: BTreeMap::new(),
            positions: Positions::default(),
            kept: Kept::default(),
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
