//! Teardown: how each connection's socket closed, from the state
//! tracepoint's close record (`SockHandshake` of kind `KIND_CLOSED`): who
//! closed first, with a FIN or a RST, and how long each closing state
//! lasted. Aggregated as they come (they count in the metrics even once
//! the history has rotated them out), and kept in a bounded history for
//! `handshake conns` and `handshake closes`. Pure.

use std::collections::VecDeque;

use handshake_common::{
    abi::{
        socket::{CLOSE_CLIENT, CLOSE_CLOSING, CLOSE_ORPHAN, CLOSE_SERVER, SockHandshake},
        tcp_state,
    },
    flow::{ROLE_CLIENT, ROLE_SERVER},
};

use crate::{
    model::{
        conntrack::{Origin, RowKey},
        sockets::as_on_the_wire,
    },
    wire::Role,
};

/// Upper bounds of the close and lifetime buckets, in seconds: from
/// 100 µs (a peer on the LAN answering a FIN) to a day (a connection that
/// lives long, or a CLOSE_WAIT leak).
pub const CLOSE_BUCKETS: [f64; 17] = [
    100e-6, 1e-3, 10e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    1800.0, 3600.0, 86400.0,
];

/// A cumulative-bucket histogram over [`CLOSE_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Histogram {
    pub buckets: [u64; CLOSE_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (bound, bucket) in CLOSE_BUCKETS.iter().zip(&mut self.buckets) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

const ECONNRESET: u32 = 104;

/// Who closed first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Closer {
    Local,
    Remote,
    /// Both at once (the socket went through CLOSING).
    Both,
    /// Not known (the socket's age was not noted).
    Unknown,
}

impl Closer {
    pub const ALL: [Self; 4] = [Self::Local, Self::Remote, Self::Both, Self::Unknown];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Remote => "remote",
            Self::Both => "both",
            Self::Unknown => "unknown",
        }
    }
}

/// How: the FINs' four-way close, or a RST.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum How {
    Fin,
    Rst,
}

impl How {
    pub const ALL: [Self; 2] = [Self::Fin, Self::Rst];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::Rst => "rst",
        }
    }
}

/// A closing state's duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClosePhase {
    /// From the peer's FIN to this socket's close: the application's
    /// reaction time.
    CloseWait,
    /// From this socket's FIN to the peer's (FIN_WAIT1 + FIN_WAIT2): the
    /// peer's reaction time.
    FinWait,
    /// From this socket's FIN, sent after the peer's, to the peer's ACK.
    LastAck,
    /// Both FINs crossed: from the peer's FIN to the ACK of this one.
    Closing,
}

impl ClosePhase {
    pub const ALL: [Self; 4] = [Self::CloseWait, Self::FinWait, Self::LastAck, Self::Closing];

    pub const fn name(self) -> &'static str {
        match self {
            Self::CloseWait => "close_wait",
            Self::FinWait => "fin_wait",
            Self::LastAck => "last_ack",
            Self::Closing => "closing",
        }
    }
}

/// One socket's close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close {
    pub key: RowKey,
    pub origin: Origin,
    /// `None`: the socket's role was not noted.
    pub role: Option<Role>,
    pub closer: Closer,
    pub how: How,
    /// Who sent the RST of a `rst` close: `Local` or `Remote`.
    pub rst_by: Option<Closer>,
    pub end_ns: u64,
    /// Nanoseconds, by phase, where the socket went through it and the
    /// times are known.
    pub phases: [Option<u64>; 4],
    /// From connect() (client) or the completed handshake (server) to
    /// CLOSE.
    pub lifetime_ns: Option<u64>,
}

impl Close {
    pub fn phase(&self, phase: ClosePhase) -> Option<u64> {
        self.phases[phase as usize]
    }
}

/// The close a record describes; `None` for a record of another kind or a
/// family it does not know.
pub fn close_of(record: &SockHandshake, origin: Origin) -> Option<Close> {
    let (family, local_addr, remote_addr) = as_on_the_wire(record);
    let flags = record.close_flags;
    let role = if flags & CLOSE_CLIENT != 0 {
        Some(Role::Client)
    } else if flags & CLOSE_SERVER != 0 {
        Some(Role::Server)
    } else {
        None
    };
    let local = (local_addr, record.local_port);
    let remote = (remote_addr, record.remote_port);
    // Keyed as the handshake's row: client first. A socket of unknown role
    // keys as a client (its row, if any, will not match: no history).
    let (client, server, role_code) = match role {
        Some(Role::Server) => (remote, local, ROLE_SERVER),
        _ => (local, remote, ROLE_CLIENT),
    };
    let key: RowKey = (role_code, family, client.0, client.1, server.0, server.1);
    let old = u32::from(record.old_state);
    let end = record.ts_ns;
    let known = |t: u64| (t != 0).then_some(t);
    let (fin_out, mut fin_in) = (known(record.fin_out_ns), known(record.fin_in_ns));
    let reset_received = record.sk_err == ECONNRESET;
    let aborted = matches!(old, tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT);
    let (how, rst_by) = if reset_received {
        (How::Rst, Some(Closer::Remote))
    } else if aborted {
        (How::Rst, Some(Closer::Local))
    } else {
        (How::Fin, None)
    };
    // A socket the application still held saw the peer's FIN end its
    // FIN_WAIT (→ TIME_WAIT); an orphan's FIN_WAIT2 went on in a minisock.
    if how == How::Fin
        && matches!(old, tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2)
        && flags & CLOSE_ORPHAN == 0
        && fin_in.is_none()
    {
        fin_in = Some(end);
    }
    let closer = match (how, rst_by) {
        (How::Rst, Some(by)) if fin_out.is_none() && fin_in.is_none() => by,
        _ if flags & CLOSE_CLOSING != 0 || old == tcp_state::CLOSING => Closer::Both,
        _ => match (fin_out, fin_in) {
            (Some(out), Some(inn)) if out < inn => Closer::Local,
            (Some(_), Some(_)) => Closer::Remote,
            (Some(_), None) => Closer::Local,
            (None, Some(_)) => Closer::Remote,
            (None, None) => match old {
                tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2 => Closer::Local,
                tcp_state::LAST_ACK | tcp_state::CLOSE_WAIT => Closer::Remote,
                _ => Closer::Unknown,
            },
        },
    };
    let between = |from: Option<u64>, to: Option<u64>| match (from, to) {
        (Some(from), Some(to)) if to >= from => Some(to - from),
        _ => None,
    };
    let mut phases = [None; 4];
    match closer {
        Closer::Remote => {
            phases[ClosePhase::CloseWait as usize] =
                between(fin_in, fin_out.or((how == How::Rst).then_some(end)));
            if old == tcp_state::LAST_ACK {
                phases[ClosePhase::LastAck as usize] = between(fin_out, Some(end));
            }
        }
        Closer::Local => phases[ClosePhase::FinWait as usize] = between(fin_out, fin_in),
        Closer::Both => {
            phases[ClosePhase::FinWait as usize] = between(fin_out, fin_in);
            if old == tcp_state::CLOSING {
                phases[ClosePhase::Closing as usize] = between(fin_in, Some(end));
            }
        }
        Closer::Unknown => {}
    }
    Some(Close {
        key,
        origin,
        role,
        closer,
        how,
        rst_by,
        end_ns: end,
        phases,
        lifetime_ns: between(known(record.start_ns), Some(end)),
    })
}

/// Roles as the close totals index them: client, server, unknown.
pub const ROLES: [&str; 3] = ["client", "server", "unknown"];

fn role_index(role: Option<Role>) -> usize {
    match role {
        Some(Role::Client) => 0,
        Some(Role::Server) => 1,
        None => 2,
    }
}

/// Everything counted over closes since the start, in arrays indexed by
/// role ([`ROLES`]), closer, how and phase (their `ALL` order): a close
/// costs a few additions, no lookup.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CloseTotals {
    pub closes: [[[u64; 2]; 4]; 3],
    pub phases: [[Histogram; 4]; 3],
    pub lifetimes: [Histogram; 3],
}

impl CloseTotals {
    pub fn closes(&self, role: usize, closer: Closer, how: How) -> u64 {
        self.closes[role][closer as usize][how as usize]
    }
}

/// Closes: totals since the start, and the most recent ones.
#[derive(Debug)]
pub struct Closes {
    recent: VecDeque<Close>,
    capacity: usize,
    pub totals: CloseTotals,
}

impl Closes {
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            totals: CloseTotals::default(),
        }
    }

    /// Counts a close and keeps it.
    pub fn record(&mut self, close: Close) {
        let role = role_index(close.role);
        self.totals.closes[role][close.closer as usize][close.how as usize] += 1;
        for phase in ClosePhase::ALL {
            if let Some(ns) = close.phase(phase) {
                self.totals.phases[role][phase as usize].observe(ns as f64 / 1e9);
            }
        }
        if let Some(ns) = close.lifetime_ns {
            self.totals.lifetimes[role].observe(ns as f64 / 1e9);
        }
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(close);
    }

    /// Recent closes, oldest first.
    pub fn recent(&self) -> impl DoubleEndedIterator<Item = &Close> {
        self.recent.iter()
    }
}

/// Quantile `q` (0..=1) of `values` (sorted here), nearest rank.
pub fn quantile(values: &mut [u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

#[cfg(test)]
mod tests {
    use handshake_common::abi::{AF_INET, socket::KIND_CLOSED};

    use super::*;

    fn record(old: u32, flags: u8, fin_out: u64, fin_in: u64, end: u64) -> SockHandshake {
        SockHandshake {
            ts_ns: end,
            start_ns: 1_000,
            local_port: 80,
            remote_port: 40_000,
            family: AF_INET,
            kind: KIND_CLOSED,
            old_state: old as u8,
            close_flags: flags,
            fin_out_ns: fin_out,
            fin_in_ns: fin_in,
            ..SockHandshake::default()
        }
    }

    #[test]
    fn a_server_that_closes_after_the_peer_waited_in_close_wait() {
        // Peer's FIN at 10 ms, our close at 310 ms, the peer's ACK at 311.
        let close = close_of(
            &record(
                tcp_state::LAST_ACK,
                CLOSE_SERVER,
                310_000_000,
                10_000_000,
                311_000_000,
            ),
            Origin::default(),
        )
        .unwrap();
        assert_eq!((close.closer, close.how), (Closer::Remote, How::Fin));
        assert_eq!(close.role, Some(Role::Server));
        assert_eq!(close.phase(ClosePhase::CloseWait), Some(300_000_000));
        assert_eq!(close.phase(ClosePhase::LastAck), Some(1_000_000));
        assert_eq!(close.phase(ClosePhase::FinWait), None);
        assert_eq!(close.lifetime_ns, Some(311_000_000 - 1_000));
    }

    #[test]
    fn a_client_that_closed_first_waited_in_fin_wait_for_the_peer() {
        // Our FIN at 10 ms; the peer's at 310 ms ends FIN_WAIT2.
        let close = close_of(
            &record(
                tcp_state::FIN_WAIT2,
                CLOSE_CLIENT,
                10_000_000,
                0,
                310_000_000,
            ),
            Origin::default(),
        )
        .unwrap();
        assert_eq!((close.closer, close.how), (Closer::Local, How::Fin));
        assert_eq!(close.phase(ClosePhase::FinWait), Some(300_000_000));
        // An orphan's FIN_WAIT2 went on in a minisock: not known.
        let orphan = close_of(
            &record(
                tcp_state::FIN_WAIT2,
                CLOSE_CLIENT | CLOSE_ORPHAN,
                10_000_000,
                0,
                10_100_000,
            ),
            Origin::default(),
        )
        .unwrap();
        assert_eq!(orphan.closer, Closer::Local);
        assert_eq!(orphan.phase(ClosePhase::FinWait), None);
    }

    #[test]
    fn resets_and_simultaneous_closes() {
        let mut sent = record(tcp_state::ESTABLISHED, CLOSE_CLIENT, 0, 0, 5_000);
        let close = close_of(&sent, Origin::default()).unwrap();
        assert_eq!(
            (close.closer, close.how, close.rst_by),
            (Closer::Local, How::Rst, Some(Closer::Local))
        );
        sent.sk_err = ECONNRESET;
        let close = close_of(&sent, Origin::default()).unwrap();
        assert_eq!(
            (close.closer, close.how, close.rst_by),
            (Closer::Remote, How::Rst, Some(Closer::Remote))
        );
        let both = close_of(
            &record(
                tcp_state::CLOSING,
                CLOSE_CLIENT | CLOSE_CLOSING,
                1_000,
                2_000,
                9_000,
            ),
            Origin::default(),
        )
        .unwrap();
        assert_eq!(both.closer, Closer::Both);
        assert_eq!(both.phase(ClosePhase::Closing), Some(7_000));
        assert_eq!(both.phase(ClosePhase::FinWait), Some(1_000));
    }

    #[test]
    fn totals_count_every_close_and_the_history_is_bounded() {
        let mut closes = Closes::new(2);
        for end in [1, 2, 3] {
            let close = close_of(
                &record(tcp_state::FIN_WAIT2, CLOSE_CLIENT, 1, 0, end * 1_000),
                Origin::default(),
            )
            .unwrap();
            closes.record(close);
        }
        assert_eq!(closes.recent().count(), 2);
        assert_eq!(closes.totals.closes(0, Closer::Local, How::Fin), 3);
        assert_eq!(quantile(&mut [5, 1, 3], 0.5), Some(3));
        assert_eq!(quantile(&mut [5, 1, 3, 9], 0.99), Some(9));
    }
}
