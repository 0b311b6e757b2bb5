//! The handshake state machine of one TCP connection, as the packet hooks
//! see it: which packets start, advance and end a handshake, and what
//! became of it. Pure functions over [`Flow`] records, so the kernel
//! programs and the unit tests run the very same code.
//!
//! A flow lives in the kernel's half-open table from its first SYN until
//! the ACK that completes the handshake (or a RST), then in the established
//! table until its first data, FIN or RST decides between `established` and
//! `reset`. Userspace sweeps both tables for flows that time out or stay
//! idle (see handshake-user's `sweep`).

use crate::{
    abi::Direction,
    packet::{Family, TcpSegment, tcp_flags},
};

pub const ROLE_CLIENT: u8 = 1;
pub const ROLE_SERVER: u8 = 2;

pub const OUTCOME_IN_PROGRESS: u8 = 0;
pub const OUTCOME_ESTABLISHED: u8 = 1;
pub const OUTCOME_REFUSED: u8 = 2;
pub const OUTCOME_RESET: u8 = 3;
pub const OUTCOME_TIMEOUT: u8 = 4;

pub const SIDE_NONE: u8 = 0;
pub const SIDE_CLIENT: u8 = 1;
pub const SIDE_SERVER: u8 = 2;

/// Address families as the IP header's version number: the encoding of
/// [`Flow::family`], [`FlowKey::family`] and the TLS capture's key. (The
/// census speaks the kernel's `AF_INET`/`AF_INET6` instead, as the sockets
/// it reads do: [`crate::abi::AF_INET`].)
pub const IP_VERSION_4: u8 = 4;
pub const IP_VERSION_6: u8 = 6;

/// A connection in a canonical direction (the lower address/port pair
/// first), so both directions of its packets find the same entry; plus the
/// interface, so equal tuples on different interfaces do not collide.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub ifindex: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    pub family: u8,
    /// Padding, always zero. Two scalars, not `[u8; 3]`: zeroing a byte
    /// array compiles to a call to a byte-at-a-time `memset` subprogram in
    /// the kernel programs, and this key is built for every packet.
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(size_of::<FlowKey>() == 44);

/// What the hooks recorded of one handshake; also the ring-buffer event
/// that reports its outcome. Timestamps are `bpf_ktime_get_ns` (monotonic).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// First SYN.
    pub ts_syn: u64,
    /// First SYN-ACK (0: none yet).
    pub ts_synack: u64,
    /// The client's ACK that completed the handshake (0: none yet).
    pub ts_ack: u64,
    /// When the outcome was decided (0: in progress).
    pub ts_end: u64,
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub ifindex: u32,
    pub client_port: u16,
    pub server_port: u16,
    /// SYNs seen: 1 + retransmissions.
    pub syn_count: u16,
    /// SYN-ACKs seen: 1 + retransmissions (0: none).
    pub synack_count: u16,
    /// `IP_VERSION_4` or `IP_VERSION_6`.
    pub family: u8,
    /// This host's role: `ROLE_CLIENT` (it sent the SYN) or `ROLE_SERVER`.
    pub role: u8,
    /// `OUTCOME_*`.
    pub outcome: u8,
    /// Who sent the RST: `SIDE_*`.
    pub rst_from: u8,
}
const _: () = assert!(size_of::<Flow>() == 80);

/// Lexicographic order of two addresses; `None` when equal. As two
/// big-endian words, not a byte loop: this runs for every TCP packet.
#[inline(always)]
fn less(a: &[u8; 16], b: &[u8; 16]) -> Option<bool> {
    let (a, b) = (u128::from_be_bytes(*a), u128::from_be_bytes(*b));
    if a == b { None } else { Some(a < b) }
}

#[inline(always)]
fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    less(a, b).is_none()
}

/// `family` as [`IP_VERSION_4`] or [`IP_VERSION_6`].
#[inline(always)]
pub const fn ip_version(family: Family) -> u8 {
    match family {
        Family::Ipv4 => IP_VERSION_4,
        Family::Ipv6 => IP_VERSION_6,
    }
}

impl FlowKey {
    #[inline(always)]
    pub fn of(seg: &TcpSegment, ifindex: u32) -> Self {
        let src_first = match less(&seg.src_addr, &seg.dst_addr) {
            Some(src_lower) => src_lower,
            None => seg.src_port <= seg.dst_port,
        };
        let (addr_lo, port_lo, addr_hi, port_hi) = if src_first {
            (seg.src_addr, seg.src_port, seg.dst_addr, seg.dst_port)
        } else {
            (seg.dst_addr, seg.dst_port, seg.src_addr, seg.src_port)
        };
        Self {
            addr_lo,
            addr_hi,
            ifindex,
            port_lo,
            port_hi,
            family: ip_version(seg.family),
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// What the caller must do with a flow after a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing decided; the record (maybe updated) stays where it is.
    Keep,
    /// The handshake completed without data: move the record to the
    /// established table to wait for its first data, FIN or RST.
    Completed,
    /// The outcome is decided (`flow.outcome`): report it and forget it.
    Decided,
}

impl Flow {
    /// The record a SYN opens. `direction` is the SYN's: egress means this
    /// host is the client.
    #[inline(always)]
    pub fn open(seg: &TcpSegment, direction: Direction, ifindex: u32, now: u64) -> Self {
        // Every field spelled out: `..Self::default()` becomes a call to a
        // byte-wise memset in the kernel program. (The three zero
        // timestamps in a row still become one, 24 bytes: once per SYN.)
        Self {
            ts_syn: now,
            ts_synack: 0,
            ts_ack: 0,
            ts_end: 0,
            client_addr: seg.src_addr,
            server_addr: seg.dst_addr,
            ifindex,
            client_port: seg.src_port,
            server_port: seg.dst_port,
            syn_count: 1,
            synack_count: 0,
            family: ip_version(seg.family),
            role: match direction {
                Direction::Egress => ROLE_CLIENT,
                Direction::Ingress => ROLE_SERVER,
            },
            outcome: OUTCOME_IN_PROGRESS,
            rst_from: SIDE_NONE,
        }
    }

    /// Which side sent `seg`.
    #[inline(always)]
    pub fn side_of(&self, seg: &TcpSegment) -> u8 {
        let from_client = seg.src_port == self.client_port
            && (self.client_port != self.server_port || same(&seg.src_addr, &self.client_addr));
        if from_client {
            SIDE_CLIENT
        } else {
            SIDE_SERVER
        }
    }

    fn decide(&mut self, outcome: u8, now: u64) -> Step {
        self.outcome = outcome;
        self.ts_end = now;
        Step::Decided
    }

    /// A segment of a flow in the half-open table.
    #[inline(always)]
    ///
    /// `direction` is the hook that saw it. A packet from the client is
    /// expected on the hook the first SYN came through, one from the server
    /// on the other; a packet on the unexpected hook is the same packet seen
    /// a second time on one interface (loopback: egress, then ingress) and
    /// changes nothing, so it is not counted as a retransmission.
    pub fn half_open_step(&mut self, seg: &TcpSegment, direction: Direction, now: u64) -> Step {
        let side = self.side_of(seg);
        let first_syn_egress = self.role == ROLE_CLIENT;
        let expected_egress = (side == SIDE_CLIENT) == first_syn_egress;
        if (direction == Direction::Egress) != expected_egress {
            return Step::Keep;
        }
        if seg.has(tcp_flags::RST) {
            self.rst_from = side;
            let outcome = if self.ts_synack == 0 && side == SIDE_SERVER {
                OUTCOME_REFUSED
            } else {
                OUTCOME_RESET
            };
            return self.decide(outcome, now);
        }
        if seg.is_syn() {
            if side == SIDE_CLIENT {
                self.syn_count = self.syn_count.saturating_add(1);
            }
            return Step::Keep;
        }
        if seg.is_syn_ack() {
            if side == SIDE_SERVER {
                if self.ts_synack == 0 {
                    self.ts_synack = now;
                }
                self.synack_count = self.synack_count.saturating_add(1);
            }
            return Step::Keep;
        }
        if side == SIDE_CLIENT && seg.has(tcp_flags::ACK) && self.ts_synack != 0 && self.ts_ack == 0
        {
            self.ts_ack = now;
            if seg.payload_len > 0 || seg.has(tcp_flags::FIN) {
                return self.decide(OUTCOME_ESTABLISHED, now);
            }
            return Step::Completed;
        }
        Step::Keep
    }

    /// A segment of a flow in the established table (handshake complete,
    /// no data yet).
    #[inline(always)]
    pub fn established_step(&mut self, seg: &TcpSegment, now: u64) -> Step {
        if seg.has(tcp_flags::RST) {
            self.rst_from = self.side_of(seg);
            return self.decide(OUTCOME_RESET, now);
        }
        if seg.payload_len > 0 || seg.has(tcp_flags::FIN) {
            return self.decide(OUTCOME_ESTABLISHED, now);
        }
        Step::Keep
    }

    /// Whether a segment can change anything for a flow in the established
    /// table: pure ACKs cannot, so the hooks skip that lookup for them.
    #[inline(always)]
    pub fn may_decide_established(seg: &TcpSegment) -> bool {
        seg.payload_len > 0 || seg.has(tcp_flags::FIN | tcp_flags::RST)
    }
}

// SAFETY: both are `repr(C)` plain integers and byte arrays with the padding
// written out, valid for any bit pattern.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Flow {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{parse_tcp, tcp_flags::*};
    use crate::testframes::FrameBuilder;

    fn seg(b: FrameBuilder) -> TcpSegment {
        parse_tcp(&b.build()[..]).unwrap().unwrap()
    }

    /// Client 10.0.0.1:40000 → server 10.0.0.2:443, and the reverse.
    fn to_server(flags: u8, payload: &[u8]) -> TcpSegment {
        seg(FrameBuilder::v4().tcp(flags, payload))
    }

    fn to_client(flags: u8, payload: &[u8]) -> TcpSegment {
        let mut s = to_server(flags, payload);
        core::mem::swap(&mut s.src_addr, &mut s.dst_addr);
        core::mem::swap(&mut s.src_port, &mut s.dst_port);
        s
    }

    #[test]
    fn both_directions_share_a_key() {
        let a = FlowKey::of(&to_server(SYN, &[]), 3);
        let b = FlowKey::of(&to_client(SYN | ACK, &[]), 3);
        assert_eq!(a, b);
        assert_ne!(a, FlowKey::of(&to_server(SYN, &[]), 4));
    }

    #[test]
    fn server_handshake_then_data_is_established() {
        let mut f = Flow::open(&to_server(SYN, &[]), Direction::Ingress, 2, 100);
        assert_eq!(f.role, ROLE_SERVER);
        assert_eq!(
            f.half_open_step(&to_client(SYN | ACK, &[]), Direction::Egress, 130),
            Step::Keep
        );
        assert_eq!(
            f.half_open_step(&to_server(ACK, &[]), Direction::Ingress, 200),
            Step::Completed
        );
        assert_eq!((f.ts_synack, f.ts_ack), (130, 200));
        assert_eq!(f.established_step(&to_server(ACK, &[]), 210), Step::Keep);
        assert_eq!(
            f.established_step(&to_server(ACK | PSH, b"GET"), 250),
            Step::Decided
        );
        assert_eq!((f.outcome, f.ts_end), (OUTCOME_ESTABLISHED, 250));
    }

    #[test]
    fn retransmissions_are_counted_once_each() {
        let mut f = Flow::open(&to_server(SYN, &[]), Direction::Egress, 2, 0);
        assert_eq!(f.role, ROLE_CLIENT);
        f.half_open_step(&to_server(SYN, &[]), Direction::Egress, 1_000);
        f.half_open_step(&to_client(SYN | ACK, &[]), Direction::Ingress, 1_100);
        f.half_open_step(&to_client(SYN | ACK, &[]), Direction::Ingress, 2_100);
        assert_eq!((f.syn_count, f.synack_count, f.ts_synack), (2, 2, 1_100));
    }

    #[test]
    fn rst_answering_the_syn_is_refused() {
        let mut f = Flow::open(&to_server(SYN, &[]), Direction::Egress, 2, 0);
        assert_eq!(
            f.half_open_step(&to_client(RST | ACK, &[]), Direction::Ingress, 40),
            Step::Decided
        );
        assert_eq!((f.outcome, f.rst_from), (OUTCOME_REFUSED, SIDE_SERVER));
    }

    #[test]
    fn rst_after_the_handshake_before_data_is_reset() {
        let mut f = Flow::open(&to_server(SYN, &[]), Direction::Ingress, 2, 0);
        f.half_open_step(&to_client(SYN | ACK, &[]), Direction::Egress, 10);
        f.half_open_step(&to_server(ACK, &[]), Direction::Ingress, 20);
        assert_eq!(
            f.established_step(&to_client(RST | ACK, &[]), 30),
            Step::Decided
        );
        assert_eq!((f.outcome, f.rst_from), (OUTCOME_RESET, SIDE_SERVER));
    }

    #[test]
    fn data_on_the_completing_ack_decides_at_once() {
        let mut f = Flow::open(&to_server(SYN, &[]), Direction::Ingress, 2, 0);
        f.half_open_step(&to_client(SYN | ACK, &[]), Direction::Egress, 10);
        assert_eq!(
            f.half_open_step(&to_server(ACK | PSH, b"x"), Direction::Ingress, 20),
            Step::Decided
        );
        assert_eq!(f.outcome, OUTCOME_ESTABLISHED);
    }

    #[test]
    fn an_ack_before_the_syn_ack_completes_nothing() {
        let mut f = Flow::open(&to_server(SYN, &[]), Direction::Ingress, 2, 0);
        assert_eq!(
            f.half_open_step(&to_server(ACK, &[]), Direction::Ingress, 5),
            Step::Keep
        );
        assert_eq!(f.ts_ack, 0);
    }

    #[test]
    fn the_same_packet_seen_again_by_the_other_hook_is_not_a_retransmission() {
        // Loopback: each packet crosses egress, then ingress, of one
        // interface.
        let mut f = Flow::open(&to_server(SYN, &[]), Direction::Egress, 1, 0);
        f.half_open_step(&to_server(SYN, &[]), Direction::Ingress, 1);
        f.half_open_step(&to_client(SYN | ACK, &[]), Direction::Egress, 10);
        f.half_open_step(&to_client(SYN | ACK, &[]), Direction::Ingress, 11);
        assert_eq!((f.syn_count, f.synack_count, f.ts_synack), (1, 1, 11));
        assert_eq!(
            f.half_open_step(&to_server(ACK, &[]), Direction::Egress, 20),
            Step::Completed
        );
    }
}
