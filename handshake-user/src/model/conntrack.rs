//! What became of each handshake: the bounded table of recent connections
//! and the aggregates the metrics are made of (outcomes, phase histograms,
//! retransmissions). Pure: records come in as `Flow`s from the ring buffer
//! or the sweep; no aya, no tokio, no I/O.

use std::collections::{BTreeMap, VecDeque};

use handshake_common::flow::{
    Flow, OUTCOME_ESTABLISHED, OUTCOME_IN_PROGRESS, OUTCOME_REFUSED, OUTCOME_RESET,
    OUTCOME_TIMEOUT, ROLE_CLIENT, ROLE_SERVER, SIDE_CLIENT, SIDE_SERVER,
};

use crate::{
    model::{FastMap, FastSet},
    wire::{ConnView, Family, Outcome, Role, Source},
};

/// Upper bounds of the duration buckets, in seconds: 1-2-5 steps from 10 µs
/// (a LAN) to 60 s (a WAN with retransmissions).
pub const BUCKETS: [f64; 22] = [
    10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3,
    200e-3, 500e-3, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// A cumulative-bucket histogram, as Prometheus exposes it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Histogram {
    /// Observations at or below each bound of [`BUCKETS`].
    pub buckets: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (bound, bucket) in BUCKETS.iter().zip(&mut self.buckets) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// This host's role in a flow: `None` for a record with no valid role (a
/// kernel/user mismatch).
pub const fn role_of(flow: &Flow) -> Option<Role> {
    match flow.role {
        ROLE_CLIENT => Some(Role::Client),
        ROLE_SERVER => Some(Role::Server),
        _ => None,
    }
}

/// What became of a flow: `None` for an outcome code the kernel does not
/// write.
pub const fn outcome_of(flow: &Flow) -> Option<Outcome> {
    match flow.outcome {
        OUTCOME_IN_PROGRESS => Some(Outcome::InProgress),
        OUTCOME_ESTABLISHED => Some(Outcome::Established),
        OUTCOME_REFUSED => Some(Outcome::Refused),
        OUTCOME_RESET => Some(Outcome::Reset),
        OUTCOME_TIMEOUT => Some(Outcome::Timeout),
        _ => None,
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Phase {
    /// Client: SYN out → SYN-ACK in.
    Connect,
    /// Server: SYN in → SYN-ACK out.
    SynToSynAck,
    /// Server: SYN-ACK out → ACK in.
    SynAckToAck,
}

impl Phase {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::SynToSynAck => "syn_to_synack",
            Self::SynAckToAck => "synack_to_ack",
        }
    }
}

/// Phase durations of a flow in nanoseconds, where both ends were seen.
/// The socket layer does not see when a server's SYN came (`sockets`).
pub fn phases(flow: &Flow, source: Source) -> Vec<(Phase, u64)> {
    let span = |from: u64, to: u64| (from != 0 && to >= from).then(|| to - from);
    let mut out = Vec::new();
    match role_of(flow) {
        Some(Role::Client) => {
            out.extend(span(flow.ts_syn, flow.ts_synack).map(|d| (Phase::Connect, d)));
        }
        Some(Role::Server) => {
            if source != Source::Socket {
                out.extend(span(flow.ts_syn, flow.ts_synack).map(|d| (Phase::SynToSynAck, d)));
            }
            out.extend(span(flow.ts_synack, flow.ts_ack).map(|d| (Phase::SynAckToAck, d)));
        }
        None => {}
    }
    out
}

/// One flow as `handshake conns` shows it, `now` giving its age.
pub fn conn_view(flow: &Flow, source: Source, now: u64) -> ConnView {
    let role = role_of(flow);
    let family = Family::from_ip_version(flow.family);
    let (local, remote) = if role == Some(Role::Client) {
        (
            (&flow.client_addr, flow.client_port),
            (&flow.server_addr, flow.server_port),
        )
    } else {
        (
            (&flow.server_addr, flow.server_port),
            (&flow.client_addr, flow.client_port),
        )
    };
    let phases = phases(flow, source);
    let us = |phase| {
        phases
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, nanos)| *nanos as f64 / 1e3)
    };
    ConnView {
        family: family.name().to_owned(),
        local_addr: family.address(local.0),
        local_port: local.1,
        remote_addr: family.address(remote.0),
        remote_port: remote.1,
        role: role.map_or("unknown", Role::name).to_owned(),
        outcome: outcome_of(flow).map_or("unknown", Outcome::name).to_owned(),
        connect_us: us(Phase::Connect),
        syn_to_synack_us: us(Phase::SynToSynAck),
        synack_to_ack_us: us(Phase::SynAckToAck),
        syn_retransmits: flow.syn_count.saturating_sub(1),
        synack_retransmits: flow.synack_count.saturating_sub(1),
        rst_from: match flow.rst_from {
            SIDE_CLIENT => Some("client".to_owned()),
            SIDE_SERVER => Some("server".to_owned()),
            _ => None,
        },
        ifindex: flow.ifindex,
        source: source.name().to_owned(),
        age_s: now.saturating_sub(flow.ts_syn) as f64 / 1e9,
        sni: None,
        ja4: None,
        tls_version: None,
        listener_overflowing: false,
        closed_by: None,
        close: None,
        close_rst_by: None,
        close_wait_us: None,
        fin_wait_us: None,
        last_ack_us: None,
        closing_us: None,
        lifetime_us: None,
        attribution: Default::default(),
    }
}

/// Everything counted over decided handshakes.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub handshakes: BTreeMap<(Role, Outcome), u64>,
    pub durations: BTreeMap<(Role, Phase), Histogram>,
    pub syn_retransmits: BTreeMap<Role, u64>,
    pub synack_retransmits: BTreeMap<Role, u64>,
}

/// One connection end as both sources name it: this host's role, the
/// family, the client's and the server's address and port.
pub type RowKey = (u8, u8, [u8; 16], u16, [u8; 16], u16);

pub fn row_key(flow: &Flow) -> RowKey {
    (
        flow.role,
        flow.family,
        flow.client_addr,
        flow.client_port,
        flow.server_addr,
        flow.server_port,
    )
}

/// Rows of one connection end from the two sources are one row when they
/// lie this close ([`same_handshake`]): the same handshake, not a reused
/// four-tuple (loopback may reuse one after 1 s).
pub const SAME_HANDSHAKE_NS: u64 = 500_000_000;

/// The moment both sources of a connection end know of its handshake:
/// the completing ACK, when both saw one, or else the first SYN. Not the
/// first SYN first: a server's socket row cannot know when it came (its
/// `ts_syn` is the SYN-ACK's time), and a SYN answered only when
/// retransmitted puts the wire's first SYN a second or more before. The
/// ACK is seen by the hook and by the socket within microseconds.
fn moments(a: &Flow, b: &Flow) -> (u64, u64) {
    if a.ts_ack != 0 && b.ts_ack != 0 {
        (a.ts_ack, b.ts_ack)
    } else {
        (a.ts_syn, b.ts_syn)
    }
}

/// Whose a connection end is, as the kernel names it: the network
/// namespace's inode number and the socket's cgroup v2 id (0: unknown).
/// The socket layer knows both; the packet hooks know the namespace they
/// are attached in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Origin {
    pub netns: u32,
    pub cgroup: u64,
}

/// A decided handshake, where its timings came from, and whose it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub flow: Flow,
    pub source: Source,
    pub origin: Origin,
}

/// Decided handshakes: aggregates since start, and the most recent ones,
/// one row per connection end whichever sources saw it.
#[derive(Debug)]
pub struct Conntrack {
    recent: VecDeque<Slot>,
    /// Sequence number of `recent`'s first row.
    first_seq: u64,
    /// The newest packet-hook row (`wire` or `both`) of each connection end
    /// still in `recent`; older ones of the same end (a four-tuple reused)
    /// hang off it through [`Slot::prev`]. Socket rows are not indexed:
    /// the socket layer's row of a handshake counts after the packet
    /// hooks' (`sockets` holds it while they track the connection), so
    /// only a socket row looks for a wire row, never the other way; and an
    /// index entry per socket row was a cache miss per connection.
    index: FastMap<RowKey, u64>,
    capacity: usize,
    totals: Totals,
    /// Records that carried no valid role or outcome (a kernel/user
    /// mismatch; should stay 0).
    pub malformed: u64,
}

/// A row of the history and the sequence number of the previous row of
/// the same connection end ([`NO_ROW`]: none).
#[derive(Clone, Copy, Debug)]
struct Slot {
    row: Row,
    prev: u64,
}

const NO_ROW: u64 = u64::MAX;

impl Conntrack {
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: VecDeque::with_capacity(capacity.min(4096)),
            first_seq: 0,
            index: FastMap::default(),
            capacity: capacity.max(1),
            totals: Totals::default(),
            malformed: 0,
        }
    }

    /// Takes one decided handshake from `source`. The other source's row of
    /// the same handshake takes it in instead (the packet hooks' timings
    /// are kept: they are the wire's); it is counted once, when first seen.
    pub fn record(&mut self, flow: Flow, source: Source) {
        self.record_from(flow, source, Origin::default());
    }

    /// [`Self::record`], with whose connection end it is: a socket row's
    /// origin replaces a packet-hook row's when they merge (it names the
    /// socket's cgroup).
    pub fn record_from(&mut self, flow: Flow, source: Source, origin: Origin) {
        let (Some(role), Some(outcome)) = (role_of(&flow), outcome_of(&flow)) else {
            self.malformed += 1;
            return;
        };
        if outcome == Outcome::InProgress {
            self.malformed += 1;
            return;
        }
        let key = row_key(&flow);
        if let Some(row) = self.other_source(&key, &flow, source) {
            if source == Source::Wire {
                row.flow = flow;
            } else {
                row.origin = origin;
            }
            row.source = Source::Both;
            return;
        }
        self.count(&flow, source, role, outcome);
        self.push(flow, source, origin);
    }

    /// Keeps a counted row in the history (and the index).
    fn push(&mut self, flow: Flow, source: Source, origin: Origin) {
        let key = row_key(&flow);
        if self.recent.len() == self.capacity
            && let Some(old) = self.recent.pop_front()
        {
            // Rows of a key roll out oldest first: the index entry goes
            // with the key's newest row.
            if old.row.source != Source::Socket {
                let old_key = row_key(&old.row.flow);
                if self.index.get(&old_key) == Some(&self.first_seq) {
                    self.index.remove(&old_key);
                }
            }
            self.first_seq += 1;
        }
        let seq = self.first_seq + self.recent.len() as u64;
        let prev = if source == Source::Socket {
            NO_ROW
        } else {
            self.index.insert(key, seq).unwrap_or(NO_ROW)
        };
        self.recent.push_back(Slot {
            row: Row {
                flow,
                source,
                origin,
            },
            prev,
        });
    }

    /// Positions in `recent` of the rows of connection end `key`, newest
    /// first.
    fn rows_of(&self, key: &RowKey) -> impl Iterator<Item = usize> + '_ {
        let mut seq = self.index.get(key).copied().unwrap_or(NO_ROW);
        std::iter::from_fn(move || {
            let at = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
            seq = self.recent.get(at)?.prev;
            Some(at)
        })
    }

    /// The packet hooks' row of the same handshake as socket row `flow`,
    /// if kept and not merged yet: of the rows of its connection end within
    /// [`SAME_HANDSHAKE_NS`] of it ([`moments`]), the closest. Not the
    /// newest: a client that closes first frees its port at once, and a
    /// busy one reuses the four-tuple every few hundred milliseconds (the
    /// server's TIME_WAIT socket takes the new SYN), so one connection end
    /// has several handshakes within the window; taking the newest paired
    /// each socket row with the next handshake's hook row, and left one of
    /// each unpaired, counted twice (4.4 % too many over a 10-minute soak).
    fn other_source(&mut self, key: &RowKey, flow: &Flow, source: Source) -> Option<&mut Row> {
        if source != Source::Socket || self.index.is_empty() {
            return None;
        }
        let mut closest: Option<(u64, usize)> = None;
        for at in self.rows_of(key) {
            let row = &self.recent[at].row;
            let (theirs, ours) = moments(&row.flow, flow);
            // Newest first: the rest are older still.
            if theirs.saturating_add(SAME_HANDSHAKE_NS) <= ours {
                break;
            }
            let gap = theirs.abs_diff(ours);
            if row.source == Source::Wire
                && gap < SAME_HANDSHAKE_NS
                && closest.is_none_or(|(best, _)| gap < best)
            {
                closest = Some((gap, at));
            }
        }
        let (_, at) = closest?;
        self.recent.get_mut(at).map(|slot| &mut slot.row)
    }

    fn count(&mut self, flow: &Flow, source: Source, role: Role, outcome: Outcome) {
        *self.totals.handshakes.entry((role, outcome)).or_default() += 1;
        for (phase, nanos) in phases(flow, source) {
            self.totals
                .durations
                .entry((role, phase))
                .or_default()
                .observe(nanos as f64 / 1e9);
        }
        *self.totals.syn_retransmits.entry(role).or_default() +=
            u64::from(flow.syn_count.saturating_sub(1));
        *self.totals.synack_retransmits.entry(role).or_default() +=
            u64::from(flow.synack_count.saturating_sub(1));
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// The packet hooks' rows decided since `since_ns` that no socket row
    /// has joined yet: a socket row held now may still need its twin, and
    /// a restart must keep them ([`Self::restore_unpaired`]), or that
    /// socket row would count alone, the twin having counted already.
    pub fn unpaired_wire(&self, since_ns: u64) -> Vec<(Flow, Origin)> {
        // Hooks' rows go into the history as they are decided; socket rows
        // (of ends the hooks do not see) a hold later, so only the hooks'
        // decide where to stop.
        self.recent
            .iter()
            .rev()
            .filter(|slot| slot.row.source != Source::Socket)
            .take_while(|slot| slot.row.flow.ts_end >= since_ns)
            .filter(|slot| slot.row.source == Source::Wire)
            .map(|slot| (slot.row.flow, slot.row.origin))
            .collect()
    }

    /// Takes back the rows of [`Self::unpaired_wire`] (newest first), as
    /// rows already counted.
    pub fn restore_unpaired(&mut self, rows: Vec<(Flow, Origin)>) {
        for (flow, origin) in rows.into_iter().rev() {
            self.push(flow, Source::Wire, origin);
        }
    }

    /// Takes up the totals a daemon before this one counted, so that its
    /// counters continue (`daemon::persist`).
    pub fn restore_totals(&mut self, totals: Totals, malformed: u64) {
        self.totals = totals;
        self.malformed = malformed;
    }

    /// Decided handshakes, oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &Row> {
        self.recent.iter().map(|slot| &slot.row)
    }

    /// The connection ends of the decided rows still kept (built when
    /// asked: the API's, not a record's, cost).
    pub fn keys(&self) -> FastSet<RowKey> {
        self.recent
            .iter()
            .map(|slot| row_key(&slot.row.flow))
            .collect()
    }
}

/// When the sweep decides a handshake the packets did not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// No SYN-ACK, or no completing ACK, this long after the first SYN.
    pub handshake_timeout_ns: u64,
    /// A completed handshake with no data, FIN or RST this long after its
    /// ACK counts as established (idle connections, e.g. pools).
    pub idle_ns: u64,
}

impl Expiry {
    /// The decided flow, or `None` to leave it in its table.
    pub fn expire(&self, flow: &Flow, now: u64) -> Option<Flow> {
        let (since, limit, outcome) = if flow.ts_ack == 0 {
            (flow.ts_syn, self.handshake_timeout_ns, OUTCOME_TIMEOUT)
        } else {
            (flow.ts_ack, self.idle_ns, OUTCOME_ESTABLISHED)
        };
        (now.saturating_sub(since) >= limit).then_some(Flow {
            outcome,
            ts_end: now,
            ..*flow
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use handshake_common::flow::{IP_VERSION_4, OUTCOME_IN_PROGRESS};

    fn flow(role: u8, outcome: u8) -> Flow {
        Flow {
            ts_syn: 1_000,
            ts_synack: 51_000,
            ts_ack: 151_000,
            ts_end: 200_000,
            role,
            outcome,
            syn_count: 2,
            synack_count: 1,
            family: IP_VERSION_4,
            ..Flow::default()
        }
    }

    #[test]
    fn server_handshake_feeds_both_server_phases() {
        let mut ct = Conntrack::new(10);
        ct.record(flow(ROLE_SERVER, OUTCOME_ESTABLISHED), Source::Wire);
        let t = ct.totals();
        assert_eq!(t.handshakes[&(Role::Server, Outcome::Established)], 1);
        let h = &t.durations[&(Role::Server, Phase::SynToSynAck)];
        assert_eq!(
            (h.count, h.buckets[1], h.buckets[2]),
            (1, 0, 1),
            "50 µs: not in ≤ 20 µs, in ≤ 50 µs"
        );
        assert_eq!(t.durations[&(Role::Server, Phase::SynAckToAck)].count, 1);
        assert!(!t.durations.contains_key(&(Role::Server, Phase::Connect)));
        assert_eq!(t.syn_retransmits[&Role::Server], 1);
    }

    #[test]
    fn client_connect_phase_and_a_refusal_without_synack() {
        let mut ct = Conntrack::new(10);
        ct.record(flow(ROLE_CLIENT, OUTCOME_ESTABLISHED), Source::Wire);
        let mut refused = flow(ROLE_CLIENT, OUTCOME_REFUSED);
        refused.ts_synack = 0;
        refused.ts_ack = 0;
        ct.record(refused, Source::Wire);
        let t = ct.totals();
        assert_eq!(t.durations[&(Role::Client, Phase::Connect)].count, 1);
        assert_eq!(t.handshakes[&(Role::Client, Outcome::Refused)], 1);
    }

    #[test]
    fn the_table_keeps_the_most_recent() {
        let mut ct = Conntrack::new(2);
        for port in 1..=3 {
            let mut f = flow(ROLE_CLIENT, OUTCOME_ESTABLISHED);
            f.client_port = port;
            ct.record(f, Source::Wire);
        }
        let ports: Vec<u16> = ct.recent().map(|r| r.flow.client_port).collect();
        assert_eq!(ports, [2, 3]);
        assert_eq!(
            ct.totals().handshakes[&(Role::Client, Outcome::Established)],
            3
        );
    }

    #[test]
    fn expiry_times_out_half_open_and_settles_idle_ones() {
        let policy = Expiry {
            handshake_timeout_ns: 1_000,
            idle_ns: 500,
        };
        let mut half_open = flow(ROLE_SERVER, OUTCOME_IN_PROGRESS);
        half_open.ts_ack = 0;
        assert_eq!(policy.expire(&half_open, 1_999), None);
        let timed_out = policy.expire(&half_open, 2_000).unwrap();
        assert_eq!(
            (timed_out.outcome, timed_out.ts_end),
            (OUTCOME_TIMEOUT, 2_000)
        );
        let idle = flow(ROLE_SERVER, OUTCOME_IN_PROGRESS);
        assert_eq!(policy.expire(&idle, 151_499), None);
        assert_eq!(
            policy.expire(&idle, 151_500).unwrap().outcome,
            OUTCOME_ESTABLISHED
        );
    }

    #[test]
    fn both_sources_of_one_handshake_make_one_row_counted_once() {
        let mut ct = Conntrack::new(10);
        let socket = flow(ROLE_CLIENT, OUTCOME_ESTABLISHED);
        let mut wire = socket;
        wire.ts_synack += 7;
        wire.ifindex = 3;
        // The socket layer's row counts after the packet hooks' (it is
        // held while they track the connection) and joins it.
        ct.record(wire, Source::Wire);
        ct.record(socket, Source::Socket);
        let rows: Vec<Row> = ct.recent().copied().collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].source, Source::Both);
        assert_eq!(rows[0].flow, wire, "the wire's timings are kept");
        assert_eq!(
            ct.totals().handshakes[&(Role::Client, Outcome::Established)],
            1
        );
        // The server end of the same connection is a row of its own, and
        // a later handshake on the same four-tuple is a new row.
        ct.record(flow(ROLE_SERVER, OUTCOME_ESTABLISHED), Source::Socket);
        let after = |by: u64| Flow {
            ts_syn: socket.ts_syn + by,
            ts_synack: socket.ts_synack + by,
            ts_ack: socket.ts_ack + by,
            ts_end: socket.ts_end + by,
            ..socket
        };
        let later = after(SAME_HANDSHAKE_NS);
        ct.record(later, Source::Wire);
        // A third on it comes before the later one's socket row: each
        // socket row still finds its own.
        let third = after(2 * SAME_HANDSHAKE_NS);
        ct.record(third, Source::Wire);
        ct.record(third, Source::Socket);
        ct.record(later, Source::Socket);
        let sources: Vec<Source> = ct.recent().map(|r| r.source).collect();
        assert_eq!(
            sources,
            [Source::Both, Source::Socket, Source::Both, Source::Both]
        );
        // A socket row with no packet-hook row is a row of its own.
        let mut alone = socket;
        alone.client_port += 1;
        ct.record(alone, Source::Socket);
        assert_eq!(ct.recent().last().unwrap().source, Source::Socket);
    }

    /// A reused four-tuple meets the server's TIME_WAIT socket, which
    /// answers the first SYN with an ACK; the client's RST clears it and
    /// the SYN sent again 1 s later makes the connection. The hooks' row
    /// starts at the first SYN, the server socket's at the SYN-ACK: the
    /// same handshake, counted once.
    #[test]
    fn a_server_handshake_on_a_retransmitted_syn_is_counted_once() {
        let mut ct = Conntrack::new(10);
        let second = 1_000_000_000;
        let wire = Flow {
            ts_syn: 5 * second,
            ts_synack: 6 * second + 10_000,
            ts_ack: 6 * second + 60_000,
            syn_count: 2,
            ..flow(ROLE_SERVER, OUTCOME_ESTABLISHED)
        };
        let socket = Flow {
            ts_syn: 6 * second + 10_000,
            ts_synack: 6 * second + 10_000,
            ts_ack: 6 * second + 61_000,
            syn_count: 1,
            ..wire
        };
        ct.record(wire, Source::Wire);
        ct.record(socket, Source::Socket);
        assert_eq!(
            ct.totals().handshakes[&(Role::Server, Outcome::Established)],
            1
        );
        assert_eq!(ct.recent().next().unwrap().source, Source::Both);
    }

    /// A client that closes first reuses its four-tuple within the window
    /// (the server's TIME_WAIT socket takes each new SYN): the hooks decide
    /// three handshakes before the socket layer's held rows come due, and
    /// each socket row joins its own, not the newest.
    #[test]
    fn handshakes_reusing_a_tuple_within_the_window_pair_with_their_own() {
        let mut ct = Conntrack::new(10);
        let at = |ms: u64| {
            let t = 10_000_000_000 + ms * 1_000_000;
            Flow {
                ts_syn: t,
                ts_synack: t + 20_000,
                ts_ack: t + 40_000,
                ts_end: t + 300_000,
                syn_count: 1,
                ..flow(ROLE_SERVER, OUTCOME_ESTABLISHED)
            }
        };
        let handshakes = [at(0), at(280), at(490)];
        for wire in handshakes {
            ct.record(wire, Source::Wire);
        }
        for wire in handshakes {
            // The socket's row: the SYN-ACK's time for the SYN, the ACK
            // a few microseconds after the hook saw it.
            let socket = Flow {
                ts_syn: wire.ts_synack,
                ts_ack: wire.ts_ack + 3_000,
                ..wire
            };
            ct.record(socket, Source::Socket);
        }
        assert_eq!(
            ct.totals().handshakes[&(Role::Server, Outcome::Established)],
            3
        );
        assert!(ct.recent().all(|r| r.source == Source::Both));
    }

    /// Across a restart: the hooks' row counted by the daemon before, its
    /// socket twin still held. The new daemon takes the unpaired row back
    /// uncounted, and the twin joins it instead of counting alone.
    #[test]
    fn unpaired_hook_rows_survive_a_restart_for_their_socket_twins() {
        let mut before = Conntrack::new(10);
        let wire = flow(ROLE_SERVER, OUTCOME_ESTABLISHED);
        let mut old = wire;
        old.client_port += 1;
        old.ts_end = 100;
        before.record(old, Source::Wire);
        before.record(wire, Source::Wire);
        let kept = before.unpaired_wire(wire.ts_end);
        assert_eq!(kept.len(), 1, "the old row is outside the window");
        let mut after = Conntrack::new(10);
        after.restore_totals(before.totals().clone(), 0);
        after.restore_unpaired(kept);
        after.record(wire, Source::Socket);
        assert_eq!(
            after.totals().handshakes[&(Role::Server, Outcome::Established)],
            2
        );
        assert_eq!(after.recent().last().unwrap().source, Source::Both);
    }

    #[test]
    fn the_index_forgets_rows_that_roll_out() {
        let mut ct = Conntrack::new(2);
        let first = flow(ROLE_CLIENT, OUTCOME_ESTABLISHED);
        ct.record(first, Source::Socket);
        for port in 1..=2 {
            let mut f = first;
            f.client_port = port;
            ct.record(f, Source::Socket);
        }
        assert!(!ct.keys().contains(&row_key(&first)));
        // The wire's row of the rolled-out handshake is a row of its own.
        ct.record(first, Source::Wire);
        assert_eq!(ct.recent().last().unwrap().source, Source::Wire);
    }

    #[test]
    fn undecided_or_unknown_records_are_not_counted() {
        let mut ct = Conntrack::new(2);
        ct.record(flow(ROLE_CLIENT, OUTCOME_IN_PROGRESS), Source::Wire);
        ct.record(flow(9, OUTCOME_RESET), Source::Wire);
        assert_eq!(ct.malformed, 2);
        assert!(ct.totals().handshakes.is_empty());
    }
}
