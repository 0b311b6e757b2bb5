//! Handshakes from the socket layer: the state tracepoint's records
//! (`SockHandshake`) turned into the same `Flow` rows the packet hooks
//! make, and held a moment before they count:
//! - an established handshake waits [`HOLD_NS`], as the packet hooks wait
//!   for data: a reset before any data in that time makes it `reset`;
//! - any other waits [`GRACE_NS`], the time the packet hooks' own row of
//!   the same handshake may take to arrive;
//! - and every one waits while the packet hooks still track the same
//!   connection end (their row will follow).
//!
//! Rows wait in arrival order, one queue per wait, so a record costs an
//! append and a sweep takes from the front: no table keyed by connection
//! (each such insert was a cache miss, ~1 µs a connection under loopback
//! churn). A reset, rare, is kept by socket until its handshake comes due.
//! The packet hooks' row of the same handshake is found when the socket
//! row counts (`conntrack` merges them). Pure: the daemon feeds it
//! records, the hooks' live keys and a clock.

use std::collections::VecDeque;

use handshake_common::{
    abi::socket::{KIND_ESTABLISHED, KIND_FAILED, KIND_RESET, SockHandshake},
    flow::{
        Flow, IP_VERSION_4, IP_VERSION_6, OUTCOME_ESTABLISHED, OUTCOME_REFUSED, OUTCOME_RESET,
        OUTCOME_TIMEOUT, ROLE_CLIENT, ROLE_SERVER, SIDE_CLIENT, SIDE_SERVER,
    },
};

use crate::{
    model::{
        FastMap, FastSet, SAVED_ROW_BYTES,
        conntrack::{Origin, RowKey, row_key},
        get_rows, put_row,
    },
    wire::Family,
};

/// A socket's family and addresses as the wire carries them: an IPv6
/// socket talking IPv4 (a dual-stack listener, `::ffff:a.b.c.d`) is IPv4
/// on the wire, and must key as the packet hooks' row of the same
/// connection does (IPv4, the address in the first 4 bytes).
pub fn as_on_the_wire(record: &SockHandshake) -> (u8, [u8; 16], [u8; 16]) {
    let (local, remote) = (record.local_addr, record.remote_addr);
    match Family::from_af(record.family) {
        Family::Ipv4 => (IP_VERSION_4, local, remote),
        Family::Ipv6 => match (v4_mapped(&local), v4_mapped(&remote)) {
            (Some(local), Some(remote)) => (IP_VERSION_4, local, remote),
            _ => (IP_VERSION_6, local, remote),
        },
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d` in the first 4 bytes.
fn v4_mapped(addr: &[u8; 16]) -> Option<[u8; 16]> {
    let prefix = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    (addr[..12] == prefix).then(|| {
        let mut v4 = [0; 16];
        v4[..4].copy_from_slice(&addr[12..]);
        v4
    })
}

/// How long an established handshake waits for a reset before it counts:
/// as long as the packet hooks wait for data (`daemon::IDLE_AFTER`).
pub const HOLD_NS: u64 = 1_000_000_000;

/// How long any other socket-layer row waits for the packet hooks' row of
/// the same handshake: a sweep (200 ms) and a ring-buffer drain (50 ms).
pub const GRACE_NS: u64 = 300_000_000;

/// Rows held at once, at most; past it the oldest are decided early,
/// never dropped.
const MAX_HELD: usize = 1 << 17;

/// Resets kept at once, at most, waiting for their handshake to come due;
/// past it the oldest are forgotten (their handshakes count as
/// established).
const MAX_RESETS: usize = 1 << 14;

const ECONNREFUSED: u32 = 111;
const ECONNRESET: u32 = 104;

#[derive(Clone, Copy, Debug)]
struct Held {
    flow: Flow,
    origin: Origin,
    sk: u64,
    /// When it may count.
    due_ns: u64,
}

/// A connection reset before any data, by socket address.
#[derive(Clone, Copy, Debug)]
struct Reset {
    local_port: u16,
    remote_port: u16,
    sk_err: u32,
    ts_ns: u64,
}

/// Socket-layer rows waiting to count, in arrival order.
#[derive(Debug, Default)]
pub struct SocketHandshakes {
    /// Established handshakes, waiting [`HOLD_NS`].
    established: VecDeque<Held>,
    /// Refused and timed-out ones, waiting [`GRACE_NS`].
    failed: VecDeque<Held>,
    /// Due, but the packet hooks still track their connection end.
    waiting: Vec<Held>,
    /// Resets before data, by socket address.
    resets: FastMap<u64, Reset>,
    /// Records of an unknown kind or role (a kernel/user mismatch; should
    /// stay 0).
    pub malformed: u64,
}

impl SocketHandshakes {
    /// Takes one record; hands rows that must count now to `decided`.
    pub fn record(&mut self, record: &SockHandshake, mut decided: impl FnMut(Flow, Origin)) {
        let (outcome, wait) = match record.kind {
            KIND_ESTABLISHED => (OUTCOME_ESTABLISHED, HOLD_NS),
            KIND_FAILED if record.sk_err == ECONNREFUSED => (OUTCOME_REFUSED, GRACE_NS),
            KIND_FAILED => (OUTCOME_TIMEOUT, GRACE_NS),
            KIND_RESET => return self.reset(record),
            _ => {
                self.malformed += 1;
                return;
            }
        };
        let Some(flow) = flow_of(record, outcome) else {
            self.malformed += 1;
            return;
        };
        if self.len() >= MAX_HELD
            && let Some(oldest) = self.established.pop_front()
        {
            decided(self.settle(oldest), oldest.origin);
        }
        let queue = if outcome == OUTCOME_ESTABLISHED {
            &mut self.established
        } else {
            &mut self.failed
        };
        queue.push_back(Held {
            flow,
            origin: Origin {
                netns: record.netns,
                cgroup: record.cgroup,
            },
            sk: record.sk,
            due_ns: record.ts_ns + wait,
        });
    }

    fn len(&self) -> usize {
        self.established.len() + self.failed.len() + self.waiting.len()
    }

    /// A connection reset before any data: kept until its handshake comes
    /// due (a reset of a handshake decided already changes nothing).
    fn reset(&mut self, record: &SockHandshake) {
        if self.resets.len() >= MAX_RESETS {
            self.resets.clear();
        }
        self.resets.insert(
            record.sk,
            Reset {
                local_port: record.local_port,
                remote_port: record.remote_port,
                sk_err: record.sk_err,
                ts_ns: record.ts_ns,
            },
        );
    }

    /// `held` as it counts: `reset` if its socket was reset before data
    /// (the same socket, the same ports) while it waited.
    fn settle(&mut self, held: Held) -> Flow {
        let mut flow = held.flow;
        if flow.outcome != OUTCOME_ESTABLISHED || self.resets.is_empty() {
            return flow;
        }
        let Some(reset) = self.resets.remove(&held.sk) else {
            return flow;
        };
        // This end's ports, and which side this end and its peer are.
        let (ports, (this_side, peer_side)) = if flow.role == ROLE_CLIENT {
            (
                (flow.client_port, flow.server_port),
                (SIDE_CLIENT, SIDE_SERVER),
            )
        } else {
            (
                (flow.server_port, flow.client_port),
                (SIDE_SERVER, SIDE_CLIENT),
            )
        };
        if ports != (reset.local_port, reset.remote_port) {
            return flow;
        }
        // Received (ECONNRESET) or sent by this socket.
        flow.rst_from = if reset.sk_err == ECONNRESET {
            peer_side
        } else {
            this_side
        };
        flow.outcome = OUTCOME_RESET;
        flow.ts_end = reset.ts_ns;
        flow
    }

    /// Hands over the rows due by `now_ns` whose connection end the packet
    /// hooks do not track (`live`): those will see no row of theirs.
    pub fn sweep(
        &mut self,
        now_ns: u64,
        live: &FastSet<RowKey>,
        mut decided: impl FnMut(Flow, Origin),
    ) {
        let mut due = std::mem::take(&mut self.waiting);
        for queue in [&mut self.established, &mut self.failed] {
            while queue.front().is_some_and(|h| now_ns >= h.due_ns) {
                due.extend(queue.pop_front());
            }
        }
        for held in due {
            if !live.is_empty() && live.contains(&row_key(&held.flow)) {
                self.waiting.push(held);
            } else {
                let flow = self.settle(held);
                decided(flow, held.origin);
            }
        }
        // Resets whose handshake was never held (decided already, or made
        // before the daemon started) are forgotten once it would be due.
        if !self.resets.is_empty() {
            self.resets
                .retain(|_, r| now_ns < r.ts_ns + HOLD_NS + GRACE_NS);
        }
    }

    /// What a restart must not lose (`daemon::persist`): every row held,
    /// appended to `rows` ([`put_row`]), and every reset waiting.
    pub fn save(&self, rows: &mut Vec<u8>) -> SavedSockets {
        for held in self
            .established
            .iter()
            .chain(&self.failed)
            .chain(&self.waiting)
        {
            put_row(rows, &held.flow, held.origin, held.sk, held.due_ns);
        }
        SavedSockets {
            held: [
                self.established.len(),
                self.failed.len(),
                self.waiting.len(),
            ],
            resets: self
                .resets
                .iter()
                .map(|(sk, r)| (*sk, r.local_port, r.remote_port, r.sk_err, r.ts_ns))
                .collect(),
            malformed: self.malformed,
        }
    }

    /// The rows a daemon before this one held ([`Self::save`]), from the
    /// front of `rows`; returns them and what follows. Rows that do not
    /// decode count as malformed.
    pub fn restore(saved: SavedSockets, rows: &[u8]) -> (Self, &[u8]) {
        let mut this = Self {
            malformed: saved.malformed,
            ..Self::default()
        };
        let [established, failed, waiting] = saved.held;
        let count = established + failed + waiting;
        let Some((mine, rest)) = rows.split_at_checked(count * SAVED_ROW_BYTES) else {
            this.malformed += count as u64;
            return (this, &[]);
        };
        let mut held = get_rows(mine)
            .into_iter()
            .flatten()
            .map(|(flow, origin, sk, due_ns)| Held {
                flow,
                origin,
                sk,
                due_ns,
            });
        this.established = held.by_ref().take(established).collect();
        this.failed = held.by_ref().take(failed).collect();
        this.waiting = held.collect();
        this.resets = saved
            .resets
            .into_iter()
            .take(MAX_RESETS)
            .map(|(sk, local_port, remote_port, sk_err, ts_ns)| {
                (
                    sk,
                    Reset {
                        local_port,
                        remote_port,
                        sk_err,
                        ts_ns,
                    },
                )
            })
            .collect();
        (this, rest)
    }

    /// Rows still held, as they stand, and whose they are.
    pub fn held(&self) -> impl Iterator<Item = (&Flow, Origin)> {
        self.established
            .iter()
            .chain(&self.failed)
            .chain(&self.waiting)
            .map(|h| (&h.flow, h.origin))
    }
}

/// The held rows' counts and the resets of [`SocketHandshakes::save`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedSockets {
    /// Established, failed and waiting rows, in that order in the rows.
    held: [usize; 3],
    /// Socket, local and remote port, error, when.
    resets: Vec<(u64, u16, u16, u32, u64)>,
    malformed: u64,
}

/// The row a record makes. Client: SYN out → SYN-ACK in is the first RTT
/// sample when the SYN was not retransmitted, else the time since
/// connect() began. Server: SYN-ACK out → ACK in is the first RTT sample
/// unless the SYN-ACK was retransmitted; when the SYN came is not known
/// at this layer (`ts_syn` is set to the SYN-ACK's time, and the phase
/// is not reported: `conntrack::phases`).
fn flow_of(record: &SockHandshake, outcome: u8) -> Option<Flow> {
    let (family, local_addr, remote_addr) = as_on_the_wire(record);
    let now = record.ts_ns;
    let rtt_ns = u64::from(record.srtt_us >> 3) * 1000;
    let sampled = record.srtt_us != 0;
    let retransmits = record.total_retrans.min(u32::from(u16::MAX - 1)) as u16;
    let mut flow = Flow {
        ts_end: now,
        family,
        role: record.role,
        outcome,
        ..Flow::default()
    };
    match record.role {
        ROLE_CLIENT => {
            (flow.client_addr, flow.server_addr) = (local_addr, remote_addr);
            (flow.client_port, flow.server_port) = (record.local_port, record.remote_port);
            flow.syn_count = 1 + retransmits;
            let start = (record.start_ns != 0).then_some(record.start_ns);
            if outcome == OUTCOME_ESTABLISHED {
                flow.ts_synack = now;
                flow.ts_ack = now;
                flow.synack_count = 1;
                flow.ts_syn = match (retransmits, sampled, start) {
                    (0, true, _) => now - rtt_ns.min(now),
                    (_, _, Some(start)) => start,
                    _ => now - rtt_ns.min(now),
                };
            } else {
                flow.ts_syn = start.unwrap_or(now);
                if outcome == OUTCOME_REFUSED {
                    flow.rst_from = SIDE_SERVER;
                }
            }
        }
        ROLE_SERVER => {
            (flow.server_addr, flow.client_addr) = (local_addr, remote_addr);
            (flow.server_port, flow.client_port) = (record.local_port, record.remote_port);
            flow.syn_count = 1;
            flow.synack_count = 1 + retransmits;
            flow.ts_ack = now;
            flow.ts_synack = if sampled && retransmits == 0 {
                now - rtt_ns.min(now)
            } else {
                0
            };
            flow.ts_syn = if flow.ts_synack != 0 {
                flow.ts_synack
            } else {
                now
            };
        }
        _ => return None,
    }
    Some(flow)
}

#[cfg(test)]
mod tests {
    use handshake_common::abi::{AF_INET, AF_INET6};

    use super::*;

    fn record(role: u8, kind: u8) -> SockHandshake {
        let mut local = [0; 16];
        local[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut remote = [0; 16];
        remote[..4].copy_from_slice(&[10, 0, 0, 2]);
        SockHandshake {
            ts_ns: 5_000_000_000,
            start_ns: 4_999_000_000,
            sk: 0xffff_0000_1234,
            local_addr: local,
            remote_addr: remote,
            netns: 1,
            srtt_us: 40 << 3,
            total_retrans: 0,
            sk_err: 0,
            local_port: if role == ROLE_CLIENT { 40000 } else { 80 },
            remote_port: if role == ROLE_CLIENT { 80 } else { 40000 },
            family: AF_INET,
            role,
            kind,
            cgroup: 7,
            ..SockHandshake::default()
        }
    }

    /// What a restart keeps of the held rows comes due as the rows would
    /// have: the same flows, with the same resets, at the same time.
    #[test]
    fn held_rows_and_resets_survive_a_save_and_a_restore() {
        let mut held = SocketHandshakes::default();
        let never = |_: Flow, _: Origin| panic!("nothing is due yet");
        held.record(&record(ROLE_CLIENT, KIND_ESTABLISHED), never);
        held.record(&record(ROLE_SERVER, KIND_ESTABLISHED), never);
        let mut refused = record(ROLE_CLIENT, KIND_FAILED);
        refused.sk_err = ECONNREFUSED;
        refused.sk = 99;
        held.record(&refused, never);
        let mut reset = record(ROLE_SERVER, KIND_RESET);
        reset.sk_err = ECONNRESET;
        held.record(&reset, never);
        let mut rows = Vec::new();
        let saved = held.save(&mut rows);
        let json = serde_json::to_string(&saved).unwrap();
        let whole = rows.clone();
        rows.extend_from_slice(b"next");
        let (mut restored, rest) =
            SocketHandshakes::restore(serde_json::from_str(&json).unwrap(), &rows);
        assert_eq!(rest, b"next", "what follows the rows is left");
        let due = |s: &mut SocketHandshakes, now| {
            let mut out = Vec::new();
            s.sweep(now, &FastSet::default(), |flow, origin| {
                out.push((flow, origin))
            });
            out
        };
        for now in [5_100_000_000, 5_400_000_000, 7_000_000_000] {
            assert_eq!(due(&mut held, now), due(&mut restored, now), "at {now}");
        }
        assert_eq!(restored.malformed, 0);
        // Rows cut short: counted as malformed, none made up.
        let (cut, _) = SocketHandshakes::restore(saved, &whole[..whole.len() - 1]);
        assert_eq!((cut.malformed, cut.held().count()), (3, 0));
    }

    /// A dual-stack listener's socket (IPv6, `::ffff:10.0.0.2`) keys as the
    /// packet hooks' IPv4 row of the same connection: otherwise both count.
    #[test]
    fn a_dual_stack_socket_keys_as_the_ipv4_it_carries() {
        let v4 = record(ROLE_SERVER, KIND_ESTABLISHED);
        let mapped = |addr: [u8; 16]| {
            let mut m = [0u8; 16];
            m[10] = 0xff;
            m[11] = 0xff;
            m[12..].copy_from_slice(&addr[..4]);
            m
        };
        let v6 = SockHandshake {
            family: AF_INET6,
            local_addr: mapped(v4.local_addr),
            remote_addr: mapped(v4.remote_addr),
            ..v4
        };
        let (a, b) = (
            flow_of(&v4, OUTCOME_ESTABLISHED),
            flow_of(&v6, OUTCOME_ESTABLISHED),
        );
        assert_eq!(row_key(&a.unwrap()), row_key(&b.unwrap()));
        // A real IPv6 address stays IPv6.
        let mut native = v6;
        native.remote_addr[0] = 0xfd;
        assert_eq!(
            flow_of(&native, OUTCOME_ESTABLISHED).unwrap().family,
            IP_VERSION_6
        );
    }

    fn decided(tracker: &mut SocketHandshakes, record: &SockHandshake) -> Vec<Flow> {
        let mut out = Vec::new();
        tracker.record(record, |f, _| out.push(f));
        out
    }

    #[test]
    fn a_client_connect_is_its_first_rtt_sample_and_waits_for_a_reset() {
        let mut tracker = SocketHandshakes::default();
        let established = record(ROLE_CLIENT, KIND_ESTABLISHED);
        assert!(decided(&mut tracker, &established).is_empty());
        let mut out = Vec::new();
        let none = FastSet::default();
        tracker.sweep(established.ts_ns + HOLD_NS - 1, &none, |f, _| out.push(f));
        assert!(out.is_empty());
        // While the packet hooks track it, it waits for their row.
        let live = FastSet::from_iter([row_key(tracker.held().next().unwrap().0)]);
        tracker.sweep(established.ts_ns + HOLD_NS, &live, |f, _| out.push(f));
        assert!(out.is_empty());
        tracker.sweep(established.ts_ns + HOLD_NS, &none, |f, _| out.push(f));
        assert_eq!(out.len(), 1);
        let flow = out[0];
        assert_eq!(
            (flow.role, flow.outcome),
            (ROLE_CLIENT, OUTCOME_ESTABLISHED)
        );
        assert_eq!(flow.ts_synack - flow.ts_syn, 40_000, "40 µs");
        assert_eq!((flow.client_port, flow.server_port), (40000, 80));
    }

    #[test]
    fn a_server_without_a_sample_has_no_synack_time() {
        let mut tracker = SocketHandshakes::default();
        let mut established = record(ROLE_SERVER, KIND_ESTABLISHED);
        established.total_retrans = 2;
        established.srtt_us = 0;
        decided(&mut tracker, &established);
        let mut out = Vec::new();
        tracker.sweep(u64::MAX, &FastSet::default(), |f, _| out.push(f));
        assert_eq!((out[0].ts_synack, out[0].synack_count), (0, 3));
        assert_eq!((out[0].client_port, out[0].server_port), (40000, 80));
    }

    #[test]
    fn a_reset_before_data_decides_the_held_handshake() {
        let mut tracker = SocketHandshakes::default();
        let established = record(ROLE_SERVER, KIND_ESTABLISHED);
        decided(&mut tracker, &established);
        let mut reset = record(0, KIND_RESET);
        (reset.local_port, reset.remote_port) = (80, 40000);
        reset.sk_err = ECONNRESET;
        reset.ts_ns += 1_000;
        assert!(decided(&mut tracker, &reset).is_empty());
        let mut out = Vec::new();
        tracker.sweep(established.ts_ns + HOLD_NS, &FastSet::default(), |f, _| {
            out.push(f)
        });
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].outcome, out[0].rst_from, out[0].ts_end),
            (OUTCOME_RESET, SIDE_CLIENT, reset.ts_ns)
        );
        // A reset of a socket not held (decided already) changes nothing,
        // and is forgotten once its handshake would have been due.
        assert!(decided(&mut tracker, &reset).is_empty());
        out.clear();
        tracker.sweep(
            reset.ts_ns + HOLD_NS + GRACE_NS,
            &FastSet::default(),
            |f, _| out.push(f),
        );
        assert!(out.is_empty());
        assert!(tracker.resets.is_empty());
    }

    #[test]
    fn a_reset_of_other_ports_at_the_same_address_is_not_this_handshake() {
        let mut tracker = SocketHandshakes::default();
        let established = record(ROLE_CLIENT, KIND_ESTABLISHED);
        decided(&mut tracker, &established);
        let mut reset = record(0, KIND_RESET);
        (reset.local_port, reset.remote_port) = (40001, 80);
        decided(&mut tracker, &reset);
        let mut out = Vec::new();
        tracker.sweep(u64::MAX, &FastSet::default(), |f, _| out.push(f));
        assert_eq!(out[0].outcome, OUTCOME_ESTABLISHED);
    }

    #[test]
    fn failures_wait_their_grace() {
        let mut tracker = SocketHandshakes::default();
        let mut refused = record(ROLE_CLIENT, KIND_FAILED);
        refused.sk_err = ECONNREFUSED;
        assert!(decided(&mut tracker, &refused).is_empty());
        let mut out = Vec::new();
        let none = FastSet::default();
        tracker.sweep(refused.ts_ns + GRACE_NS - 1, &none, |f, _| out.push(f));
        assert!(out.is_empty());
        tracker.sweep(refused.ts_ns + GRACE_NS, &none, |f, _| out.push(f));
        assert_eq!(
            (out[0].outcome, out[0].rst_from),
            (OUTCOME_REFUSED, SIDE_SERVER)
        );
        assert_eq!(out[0].ts_syn, refused.start_ns);
        // The same four-tuple twice while held: two handshakes, in order.
        let mut later = record(ROLE_CLIENT, KIND_FAILED);
        later.ts_ns += 1;
        decided(&mut tracker, &record(ROLE_CLIENT, KIND_FAILED));
        decided(&mut tracker, &later);
        out.clear();
        tracker.sweep(u64::MAX, &none, |f, _| out.push(f));
        let ends: Vec<u64> = out.iter().map(|f| f.ts_end).collect();
        assert_eq!(ends, [later.ts_ns - 1, later.ts_ns]);
        assert_eq!(decided(&mut tracker, &record(7, KIND_FAILED)).len(), 0);
        assert_eq!(tracker.malformed, 1);
    }
}
