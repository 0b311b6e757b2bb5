//! The kernel ↔ userspace ABI: map and program names, counter layouts and
//! the numeric codes both sides index them with. Plain integers only: no
//! `bool` or Rust enums cross the boundary.

/// Program names as the kernel sees them (at most 15 bytes).
pub mod program {
    pub const XDP_INGRESS: &str = "xdp_handshake";
    pub const TC_INGRESS: &str = "tc_in_handshake";
    pub const TC_EGRESS: &str = "tc_eg_handshake";
    pub const TP_SOCK_SET_STATE: &str = "tp_sock_state";
    pub const TP_RETRANSMIT_SYNACK: &str = "tp_synack_rtx";
    /// `tcp_retransmit_skb` (BTF tracepoint): when a client's SYN is
    /// retransmitted, notes when its first SYN left.
    pub const TP_RETRANSMIT_SYN: &str = "tp_syn_rtx";
    /// A pass-only XDP program: the benchmark's baseline, never attached.
    pub const XDP_PASS_BASELINE: &str = "xdp_pass_base";
    /// A pass-only tc program: the churn benchmark's floor, attached only
    /// by the benchmark.
    pub const TC_PASS_BASELINE: &str = "tc_pass_base";
    /// `iter/tcp`: the socket census (see [`super::census`]).
    pub const ITER_TCP_CENSUS: &str = "iter_tcp_census";
    /// `skb:kfree_skb` (BTF tracepoint): dropped handshake packets by the
    /// kernel's reason (see [`super::drops`]). Loaded apart from
    /// [`HOOKS`]: a kernel whose tracepoint lacks the reason or the
    /// receiving socket refuses it, and the daemon goes on without.
    pub const TP_KFREE_SKB: &str = "tp_kfree_skb";

    /// The programs the daemon loads when it starts, before it attaches
    /// any (the census is loaded apart: it may fail and fall back).
    pub const HOOKS: [&str; 6] = [
        XDP_INGRESS,
        TC_INGRESS,
        TC_EGRESS,
        TP_SOCK_SET_STATE,
        TP_RETRANSMIT_SYNACK,
        TP_RETRANSMIT_SYN,
    ];

    /// Every program of the eBPF object.
    pub const ALL: [&str; 10] = [
        XDP_INGRESS,
        TC_INGRESS,
        TC_EGRESS,
        TP_SOCK_SET_STATE,
        TP_RETRANSMIT_SYNACK,
        TP_RETRANSMIT_SYN,
        XDP_PASS_BASELINE,
        TC_PASS_BASELINE,
        ITER_TCP_CENSUS,
        TP_KFREE_SKB,
    ];
}

/// Map names as the kernel sees them (at most 15 bytes).
pub mod map {
    pub const PACKET_COUNTS: &str = "PACKET_COUNTS";
    pub const PARSE_ERRORS: &str = "PARSE_ERRORS";
    pub const TRANSITIONS: &str = "TRANSITIONS";
    /// LRU hash: handshakes from their first SYN to the completing ACK.
    pub const HALF_OPEN: &str = "HALF_OPEN";
    /// LRU hash: completed handshakes waiting for their first data.
    pub const FLOWS: &str = "FLOWS";
    /// Ring buffer of decided handshakes (`flow::Flow` records).
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU counters of the flow tables, indexed by [`super::FlowStat`].
    pub const FLOW_STATS: &str = "FLOW_STATS";
    /// One [`super::census::Config`]: what the next census run reports.
    pub const CENSUS_CONFIG: &str = "CENSUS_CONFIG";
    /// One [`super::census::Summary`]: the running census's aggregates.
    pub const CENSUS_ACC: &str = "CENSUS_ACC";
    /// Hash [`super::census::TwKey`] → count: TIME_WAIT sockets per remote
    /// endpoint, filled by one census run and emptied by the daemon.
    pub const TW_REMOTE: &str = "TW_REMOTE";
    /// Hash [`super::census::TwKey`] (port 0) → count: per local address.
    pub const TW_LOCAL: &str = "TW_LOCAL";
    /// Ring buffer of TLS hello bytes ([`super::tls_capture::TlsChunk`]).
    pub const TLS_EVENTS: &str = "TLS_EVENTS";
    /// LRU hash [`super::tls_capture::TlsKey`] → [`super::tls_capture::TlsPending`].
    pub const TLS_PENDING: &str = "TLS_PENDING";
    /// One u32: non-zero while [`TLS_PENDING`] may hold entries; packets of
    /// other flows skip its lookup when it is zero. Set by the hooks,
    /// cleared by the daemon when the table is empty.
    pub const TLS_ACTIVE: &str = "TLS_ACTIVE";
    /// Per-CPU array of [`super::census::NETNS_SLOTS`] + 1
    /// [`super::census::NetnsStats`], two candidate slots per namespace
    /// ([`super::census::netns_slot`]) and the last for namespaces that
    /// found both taken: the state changes of each namespace's sockets, by
    /// the state entered, and its entries into TIME_WAIT. What tells the
    /// daemon which namespaces to count afresh.
    pub const NETNS_STATS: &str = "NETNS_STATS";
    /// Array of [`super::census::AgeSlot`]s, two probes per socket address:
    /// where the state tracepoint keeps each socket's
    /// [`super::census::SockAge`] from its first state change to its CLOSE,
    /// without a lock or a hash table.
    pub const SK_AGE_SLOTS: &str = "SK_AGE_SLOTS";
    /// Hash socket address → [`super::census::SockAge`]: the sockets whose
    /// two slots of [`SK_AGE_SLOTS`] were taken.
    pub const SK_AGE: &str = "SK_AGE";
    /// Per-CPU scratch space of the packet hooks (one `flow::Flow`) and of
    /// the TLS capture: kernel-only.
    pub const SCRATCH: &str = "SCRATCH";
    /// Array, mmapped by the daemon: per CPU, a ring of
    /// [`super::socket::LOG_SLOTS`] handshakes decided at the socket layer
    /// ([`super::socket::SockHandshake`]).
    pub const SOCK_LOG: &str = "SOCK_LOG";
    /// Array, mmapped by the daemon: per CPU, at index cpu ×
    /// [`super::socket::HEAD_STRIDE`], how many records it has written to
    /// [`SOCK_LOG`].
    pub const SOCK_LOG_HEADS: &str = "SOCK_LOG_HEADS";
    /// LRU hash socket address → when its first SYN left, noted for
    /// client sockets whose SYN was retransmitted (every namespace).
    pub const SYN_SENT_AT: &str = "SYN_SENT_AT";
    pub const TLS_SCRATCH: &str = "TLS_SCRATCH";
    /// Per-CPU word where the state tracepoint and the census turn a
    /// socket's address into a number to hash: kernel-only.
    pub const ADDRESS: &str = "ADDRESS";
    /// Per-CPU hash [`super::drops::DropKey`] → count: handshake packets
    /// the kernel dropped, by namespace, port, packet and reason.
    pub const HANDSHAKE_DROPS: &str = "HANDSHAKE_DROPS";

    /// The maps that outlive the daemon (`handshake daemon`, pinned in
    /// bpffs unless `--ephemeral`): the counters, the tables of handshakes
    /// in flight, socket ages, and the rings and logs not yet read. A new
    /// daemon reuses them when their layout matches, so counters continue,
    /// in-flight handshakes complete and known socket ages stay known. The
    /// census's scratch maps and per-CPU scratch space are not kept.
    pub const PERSISTENT: [&str; 17] = [
        PACKET_COUNTS,
        PARSE_ERRORS,
        TRANSITIONS,
        HALF_OPEN,
        FLOWS,
        EVENTS,
        FLOW_STATS,
        TLS_EVENTS,
        TLS_PENDING,
        TLS_ACTIVE,
        NETNS_STATS,
        SK_AGE_SLOTS,
        SK_AGE,
        SOCK_LOG,
        SOCK_LOG_HEADS,
        SYN_SENT_AT,
        HANDSHAKE_DROPS,
    ];

    /// Every map of the eBPF object.
    pub const ALL: [&str; 24] = [
        PACKET_COUNTS,
        PARSE_ERRORS,
        TRANSITIONS,
        HALF_OPEN,
        FLOWS,
        EVENTS,
        FLOW_STATS,
        CENSUS_CONFIG,
        CENSUS_ACC,
        TW_REMOTE,
        TW_LOCAL,
        TLS_EVENTS,
        TLS_PENDING,
        TLS_ACTIVE,
        NETNS_STATS,
        SK_AGE_SLOTS,
        SK_AGE,
        SCRATCH,
        TLS_SCRATCH,
        SOCK_LOG,
        SOCK_LOG_HEADS,
        SYN_SENT_AT,
        ADDRESS,
        HANDSHAKE_DROPS,
    ];
}

/// Default sizes; the daemon can set the table sizes at load time.
pub const HALF_OPEN_ENTRIES: u32 = 16 * 1024;
pub const FLOWS_ENTRIES: u32 = 64 * 1024;
/// Sockets whose state-entry time and opener the state tracepoint keeps:
/// slots of `SK_AGE_SLOTS` (a power of two), and a quarter as many entries
/// of the `SK_AGE` overflow table (see [`sock_age_tables`]).
pub const SOCK_AGE_ENTRIES: u32 = 64 * 1024;

/// The sizes of `SK_AGE_SLOTS` and of the `SK_AGE` overflow table for
/// `entries` sockets (`--socket-age-entries`): the slots rounded down to a
/// power of two (at least 2), the overflow a quarter of them (at least 16).
pub const fn sock_age_tables(entries: u32) -> (u32, u32) {
    let slots = if entries < 2 {
        2
    } else {
        1 << (31 - entries.leading_zeros())
    };
    let overflow = if slots / 4 < 16 { 16 } else { slots / 4 };
    (slots, overflow)
}
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Ask for a wakeup once this much is waiting in the ring buffer (a quarter
/// of it); userspace also drains it every 50 ms, so fewer events are never
/// stranded. The timer does nearly all the draining: 20,000 connections a
/// second fill ~100 KiB in 50 ms. A wakeup costs the daemon a context
/// switch (tens of µs on a virtual machine), so the fewer the better; a
/// quarter leaves three quarters for the time it takes the daemon to run.
pub const EVENTS_WAKEUP_BYTES: u64 = EVENTS_BYTES as u64 / 4;

/// Slots of [`map::FLOW_STATS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FlowStat {
    HalfOpenInserts = 0,
    HalfOpenDeletes = 1,
    FlowsInserts = 2,
    FlowsDeletes = 3,
    /// Events lost because the ring buffer was full.
    EventsDropped = 4,
    /// Inserts the kernel refused (should stay 0 for LRU maps).
    InsertFailures = 5,
    /// `tcp:tcp_retransmit_synack` hits.
    SynAckRetransmits = 6,
    /// TLS hello records lost because their ring buffer was full.
    TlsEventsDropped = 7,
    /// TLS pending-table inserts the kernel refused.
    TlsPendingFailures = 8,
    /// State changes the state tracepoint could not note (`SK_AGE` full):
    /// those sockets' ages show as unknown.
    SockAgesFull = 9,
    /// Socket-layer handshakes lost because their ring buffer was full.
    SockEventsDropped = 10,
    /// Dropped handshake packets not counted: `HANDSHAKE_DROPS` was full.
    HandshakeDropsFull = 11,
    /// Dropped packets `kfree_skb` showed whose headers could not be read.
    DropParseFailures = 12,
}

impl FlowStat {
    pub const COUNT: u32 = 13;
}

/// Which way a packet crossed the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// What a packet counts as. One packet can count as several kinds (a FIN
/// that carries a ClientHello is unusual but possible).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PacketKind {
    Syn = 0,
    SynAck = 1,
    Fin = 2,
    Rst = 3,
    ClientHello = 4,
    ServerHello = 5,
}

impl PacketKind {
    pub const COUNT: u32 = 6;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Syn,
        Self::SynAck,
        Self::Fin,
        Self::Rst,
        Self::ClientHello,
        Self::ServerHello,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Syn => "syn",
            Self::SynAck => "syn_ack",
            Self::Fin => "fin",
            Self::Rst => "rst",
            Self::ClientHello => "client_hello",
            Self::ServerHello => "server_hello",
        }
    }
}

/// Index into [`map::PACKET_COUNTS`]: one slot per (direction, kind).
pub const fn packet_count_index(direction: Direction, kind: PacketKind) -> u32 {
    direction as u32 * PacketKind::COUNT + kind as u32
}

/// Entries of [`map::PACKET_COUNTS`].
pub const PACKET_COUNTS_LEN: u32 = 2 * PacketKind::COUNT;

/// Why a frame could not be parsed. Each kind is a slot in
/// [`map::PARSE_ERRORS`]; the frame itself always passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ParseError {
    /// Fewer than 14 bytes of Ethernet header.
    EthernetTruncated = 0,
    /// A VLAN tag announced but cut short.
    VlanTruncated = 1,
    /// More than two VLAN tags.
    VlanTooDeep = 2,
    /// Fewer than 20 bytes of IPv4 header, or fewer than its IHL says.
    Ipv4Truncated = 3,
    /// IPv4 IHL below 5, or total length below the header length.
    Ipv4BadHeader = 4,
    /// Fewer than 40 bytes of IPv6 header.
    Ipv6Truncated = 5,
    /// An IPv6 extension header cut short.
    Ipv6ExtensionTruncated = 6,
    /// More IPv6 extension headers than the parser walks.
    Ipv6TooManyExtensions = 7,
    /// Fewer than 20 bytes of TCP header.
    TcpTruncated = 8,
    /// TCP data offset below 5.
    TcpBadDataOffset = 9,
    /// TCP data offset points past the end of the packet.
    TcpDataOffsetPastEnd = 10,
}

impl ParseError {
    pub const COUNT: u32 = 11;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::EthernetTruncated,
        Self::VlanTruncated,
        Self::VlanTooDeep,
        Self::Ipv4Truncated,
        Self::Ipv4BadHeader,
        Self::Ipv6Truncated,
        Self::Ipv6ExtensionTruncated,
        Self::Ipv6TooManyExtensions,
        Self::TcpTruncated,
        Self::TcpBadDataOffset,
        Self::TcpDataOffsetPastEnd,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::EthernetTruncated => "ethernet_truncated",
            Self::VlanTruncated => "vlan_truncated",
            Self::VlanTooDeep => "vlan_too_deep",
            Self::Ipv4Truncated => "ipv4_truncated",
            Self::Ipv4BadHeader => "ipv4_bad_header",
            Self::Ipv6Truncated => "ipv6_truncated",
            Self::Ipv6ExtensionTruncated => "ipv6_extension_truncated",
            Self::Ipv6TooManyExtensions => "ipv6_too_many_extensions",
            Self::TcpTruncated => "tcp_truncated",
            Self::TcpBadDataOffset => "tcp_bad_data_offset",
            Self::TcpDataOffsetPastEnd => "tcp_data_offset_past_end",
        }
    }
}

/// TCP states as `include/net/tcp_states.h` numbers them (stable since 2.6).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;

    /// The state's name as node_exporter's tcpstat collector spells it, or
    /// `None` for numbers outside the kernel's set.
    pub const fn name(state: u32) -> Option<&'static str> {
        Some(match state {
            ESTABLISHED => "established",
            SYN_SENT => "syn_sent",
            SYN_RECV => "syn_recv",
            FIN_WAIT1 => "fin_wait1",
            FIN_WAIT2 => "fin_wait2",
            TIME_WAIT => "time_wait",
            CLOSE => "close",
            CLOSE_WAIT => "close_wait",
            LAST_ACK => "last_ack",
            LISTEN => "listen",
            CLOSING => "closing",
            NEW_SYN_RECV => "new_syn_recv",
            _ => return None,
        })
    }
}

/// States are below 16, so a (from, to) pair is one slot of a 16×16 table.
pub const STATE_SLOTS: u32 = 16;

/// Index into [`map::TRANSITIONS`], or `None` for a state number the table
/// has no room for.
pub const fn transition_index(from: u32, to: u32) -> Option<u32> {
    if from < STATE_SLOTS && to < STATE_SLOTS {
        Some(from * STATE_SLOTS + to)
    } else {
        None
    }
}

/// Entries of [`map::TRANSITIONS`].
pub const TRANSITIONS_LEN: u32 = STATE_SLOTS * STATE_SLOTS;

/// The socket census: an `iter/tcp` program walks every TCP socket of one
/// network namespace (listeners, full sockets, TIME_WAIT minisocks and
/// request sockets) and aggregates in the kernel. Its output, read from
/// the iterator's file, is a sequence of records, each starting with a
/// [`census::Header`]: [`census::Socket`] records for the states the
/// [`census::Config`] asks for (at most `max_sockets`), then exactly one
/// [`census::Summary`], written when the walk ends.
pub mod census {
    /// Record kinds in the iterator's output.
    pub const RECORD_SOCKET: u32 = 1;
    pub const RECORD_SUMMARY: u32 = 2;
    pub const RECORD_LISTENER: u32 = 3;

    /// Rows of [`Summary::sockets`] per address family (an index, not a
    /// family code: the census's records carry `AF_INET`/`AF_INET6`).
    pub const SUMMARY_ROW_IPV4: usize = 0;
    pub const SUMMARY_ROW_IPV6: usize = 1;

    /// Entries of the TIME_WAIT aggregation maps; past them a census
    /// counts `tw_remote_overflow` / `tw_local_overflow`.
    pub const TW_REMOTE_ENTRIES: u32 = 4096;
    pub const TW_LOCAL_ENTRIES: u32 = 1024;

    /// Written by the daemon before each run.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config {
        /// Bit `1 << state` set: emit a [`Socket`] record for full sockets
        /// in that state (kernel state numbers).
        pub socket_states: u32,
        /// At most this many [`Socket`] records per run.
        pub max_sockets: u32,
        /// The namespace's `ip_local_port_range`: a TIME_WAIT socket whose
        /// local port lies in it was opened by this host (a client), and
        /// counts towards its remote endpoint; one whose local port lies
        /// outside it counts towards the remote address alone (port 0), so
        /// that a server's TIME_WAIT sockets do not make one entry each.
        pub ephemeral_low: u16,
        pub ephemeral_high: u16,
        /// At most this many [`Listener`] records per run.
        pub max_listeners: u32,
    }
    const _: () = assert!(size_of::<Config>() == 16);

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Header {
        pub kind: u32,
        /// Bytes of the whole record, header included.
        pub len: u32,
    }
    const _: () = assert!(size_of::<Header>() == 8);

    /// The aggregates of one run. `sockets[family][state]` counts by the
    /// kernel's state number as `ss` reports it: request sockets count as
    /// SYN_RECV (3), TIME_WAIT minisocks by their substate (TIME_WAIT, or
    /// FIN_WAIT2 for a closed socket waiting for its peer's FIN);
    /// `tw_fin_wait2` tells how many of the FIN_WAIT2 ones are minisocks.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Summary {
        pub header: Header,
        pub sockets: [[u64; 16]; 2],
        pub tw_fin_wait2: [u64; 2],
        /// Per state, the earliest `bpf_ktime_get_ns` at which a full
        /// socket still in that state entered it (0: none known).
        pub oldest_since_ns: [u64; 16],
        /// Sockets seen, and those whose fields could not be read.
        pub seen: u64,
        pub read_errors: u64,
        /// Socket records written this run.
        pub sockets_written: u64,
        /// Socket records not written: over `max_sockets`.
        pub sockets_dropped: u64,
        pub tw_remote_overflow: u64,
        pub tw_local_overflow: u64,
        /// Listener records written, and those not written (over
        /// `max_listeners`).
        pub listeners_written: u64,
        pub listeners_dropped: u64,
        /// The kernel's `jiffies` when the walk ended: with the
        /// listeners' overflow stamps, how long ago they overflowed.
        pub jiffies: u64,
    }
    const _: () = assert!(size_of::<Summary>() == 480);

    /// One listener: its queues and drops as `ss -tlnm` shows them, and
    /// when its SYN queue last overflowed.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Listener {
        pub header: Header,
        pub family: u16,
        pub local_port: u16,
        pub _pad: u32,
        pub local_addr: [u8; 16],
        /// `sk_ack_backlog`: connections waiting for accept() (ss Recv-Q).
        pub accept_queue: u32,
        /// `sk_max_ack_backlog` (ss Send-Q).
        pub accept_queue_max: u32,
        /// `icsk_accept_queue.qlen`: request sockets waiting for the
        /// final ACK.
        pub syn_queue: u32,
        /// The listener's drop count (`sk_drops`, or its per-NUMA
        /// counters), ss's `d` in skmem.
        pub drops: u32,
        /// `jiffies` (low 32 bits) of the last SYN queue overflow stamped
        /// on the listener or its reuseport group; 0: never.
        pub overflow_stamp: u32,
        pub _pad2: u32,
        /// The listener's cgroup v2 id.
        pub cgroup: u64,
    }
    const _: () = assert!(size_of::<Listener>() == 64);

    /// One full socket in a state [`Config::socket_states`] asks for.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Socket {
        pub header: Header,
        pub family: u16,
        pub state: u16,
        pub local_port: u16,
        pub remote_port: u16,
        /// IPv4 addresses in the first 4 bytes.
        pub local_addr: [u8; 16],
        pub remote_addr: [u8; 16],
        /// When it entered its state (`bpf_ktime_get_ns`), 0 if unknown
        /// (the socket changed state before the daemon started).
        pub since_ns: u64,
        /// The process that called connect(), for connections this host
        /// opened; 0 / empty otherwise.
        pub pid: u32,
        pub _pad: u32,
        pub comm: [u8; 16],
        /// The socket's cgroup v2 id (the kernfs inode number of its
        /// directory), set when the socket was created; 0 if unreadable.
        pub cgroup: u64,
    }
    const _: () = assert!(size_of::<Socket>() == 88);

    /// Key of the TIME_WAIT maps.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct TwKey {
        /// `AF_INET` or `AF_INET6`.
        pub family: u16,
        pub port: u16,
        pub addr: [u8; 16],
    }
    const _: () = assert!(size_of::<TwKey>() == 20);

    /// Field offsets the census reads, resolved from the running kernel's
    /// BTF by the daemon and passed to the program as read-only globals
    /// (aya-ebpf has no CO-RE). Names of those globals:
    pub mod offsets {
        /// `struct sock_common`
        pub const SKC_DADDR: &str = "OFF_SKC_DADDR";
        pub const SKC_RCV_SADDR: &str = "OFF_SKC_RCV_SADDR";
        pub const SKC_DPORT: &str = "OFF_SKC_DPORT";
        pub const SKC_NUM: &str = "OFF_SKC_NUM";
        pub const SKC_FAMILY: &str = "OFF_SKC_FAMILY";
        pub const SKC_STATE: &str = "OFF_SKC_STATE";
        pub const SKC_V6_DADDR: &str = "OFF_SKC_V6_DADDR";
        pub const SKC_V6_RCV_SADDR: &str = "OFF_SKC_V6_RCV_SADDR";
        /// `struct inet_timewait_sock`
        pub const TW_SUBSTATE: &str = "OFF_TW_SUBSTATE";
        /// `struct sock_common`: the `struct net *` of the socket.
        pub const SKC_NET: &str = "OFF_SKC_NET";
        /// `struct net`: `ns.inum`, the namespace's inode number.
        pub const NET_NS_INUM: &str = "OFF_NET_NS_INUM";
        /// `struct sock`
        pub const SK_PROTOCOL: &str = "OFF_SK_PROTOCOL";
        pub const SK_ERR: &str = "OFF_SK_ERR";
        /// `struct inet_sock` (the start of a `tcp_sock`): the local port,
        /// still set when `skc_num` has been zeroed on the way to CLOSE.
        pub const INET_SPORT: &str = "OFF_INET_SPORT";
        /// `struct tcp_sock`
        pub const TCP_SRTT_US: &str = "OFF_TCP_SRTT_US";
        pub const TCP_TOTAL_RETRANS: &str = "OFF_TCP_TOTAL_RETRANS";
        pub const TCP_DATA_SEGS_IN: &str = "OFF_TCP_DATA_SEGS_IN";
        pub const TCP_DATA_SEGS_OUT: &str = "OFF_TCP_DATA_SEGS_OUT";
        /// When the first SYN left (ms of the TCP clock), in SYN_SENT.
        pub const TCP_RETRANS_STAMP: &str = "OFF_TCP_RETRANS_STAMP";
        /// `struct sock`: `sk_cgrp_data.cgroup`, the socket's cgroup v2.
        pub const SK_CGROUP: &str = "OFF_SK_CGROUP";
        /// `struct cgroup`: `kn`, its kernfs node.
        pub const CGROUP_KN: &str = "OFF_CGROUP_KN";
        /// `struct kernfs_node`: `id`, the cgroup id (inode number).
        pub const KERNFS_ID: &str = "OFF_KERNFS_ID";
        /// `struct sock`: `sk_socket` (NULL once orphaned).
        pub const SK_SOCKET: &str = "OFF_SK_SOCKET";
        /// `struct sock`: the listener's queues and drops.
        pub const SK_ACK_BACKLOG: &str = "OFF_SK_ACK_BACKLOG";
        pub const SK_MAX_ACK_BACKLOG: &str = "OFF_SK_MAX_ACK_BACKLOG";
        pub const SK_DROPS: &str = "OFF_SK_DROPS";
        /// `struct sock`: `sk_drop_counters`, per-NUMA drop counts some
        /// sockets use instead of `sk_drops` (6.18).
        pub const SK_DROP_COUNTERS: &str = "OFF_SK_DROP_COUNTERS";
        /// `struct numa_drop_counters`: `drops0`, `drops1`.
        pub const NDC_DROPS0: &str = "OFF_NDC_DROPS0";
        pub const NDC_DROPS1: &str = "OFF_NDC_DROPS1";
        /// `inet_connection_sock.icsk_accept_queue.qlen`.
        pub const ICSK_SYN_QLEN: &str = "OFF_ICSK_SYN_QLEN";
        /// `struct sock`: `sk_reuseport_cb`, and `sock_reuseport`'s
        /// `synq_overflow_ts`.
        pub const SK_REUSEPORT_CB: &str = "OFF_SK_REUSEPORT_CB";
        pub const REUSEPORT_SYNQ_TS: &str = "OFF_REUSEPORT_SYNQ_TS";
        /// `tcp_sock.rx_opt.ts_recent_stamp`: a listener's last SYN queue
        /// overflow.
        pub const TCP_TS_RECENT_STAMP: &str = "OFF_TCP_TS_RECENT_STAMP";
        /// `struct sk_buff`: what `kfree_skb` reads of a dropped packet.
        pub const SKB_HEAD: &str = "OFF_SKB_HEAD";
        pub const SKB_NETWORK_HEADER: &str = "OFF_SKB_NETWORK_HEADER";
        pub const SKB_TRANSPORT_HEADER: &str = "OFF_SKB_TRANSPORT_HEADER";
        pub const SKB_PROTOCOL: &str = "OFF_SKB_PROTOCOL";
        pub const SKB_DEV: &str = "OFF_SKB_DEV";
        /// `struct net_device`: `nd_net`, its namespace.
        pub const NETDEV_ND_NET: &str = "OFF_NETDEV_ND_NET";
    }

    /// Slots of [`super::map::NETNS_STATS`] for namespaces counted apart
    /// (a power of two); one more, at this index, counts the rest
    /// together (its `inum` stays 0).
    pub const NETNS_SLOTS: u32 = 256;

    /// The first of the two slots of namespace `inum` (the other is
    /// `slot | 1`): a multiplicative hash, the way socket ages are
    /// placed. An array slot costs the state tracepoint an inlined
    /// lookup; a hash table's took ~45 ns a state change.
    #[inline(always)]
    pub const fn netns_slot(inum: u32) -> u32 {
        (inum.wrapping_mul(0x9E37_79B1) >> (32 - NETNS_SLOTS.trailing_zeros())) & !1
    }

    /// One namespace's slot (per CPU): the namespace that holds it (0:
    /// free), its sockets' state changes by the state entered
    /// (`entered[state]`), and the changes that put a socket in TIME_WAIT
    /// (FIN_WAIT2 or CLOSING → CLOSE). Any change means the namespace's
    /// socket counts may have changed. A CPU claims a free slot for a
    /// namespace in its own copy; the daemon adds up the copies by `inum`
    /// and frees a gone namespace's slots.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct NetnsStats {
        pub inum: u32,
        pub _pad: u32,
        pub entered: [u64; 16],
        pub time_wait_entries: u64,
    }
    const _: () = assert!(size_of::<NetnsStats>() == 144);

    impl NetnsStats {
        /// State changes of any kind.
        pub fn changes(&self) -> u64 {
            self.entered.iter().sum()
        }
    }

    // SAFETY: `repr(C)` plain integers and byte arrays, no implicit
    // padding (sizes asserted above), valid for any bit pattern.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for TwKey {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for Header {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for Summary {}
    // SAFETY: as above; `_pad` is written out.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for Socket {}
    // SAFETY: as above; `_pad` and `_pad2` are written out.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for Listener {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for NetnsStats {}

    /// Per-socket state kept by the state tracepoint in `SK_AGE`: when the
    /// socket entered its current state and, for connections this host
    /// opened, who called connect(); and for its close, when it was born
    /// (connect(), or its handshake completed for a listener's child) and
    /// when each end's FIN went (0: not yet).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SockAge {
        pub since_ns: u64,
        pub state: u16,
        /// `AGE_*` bits.
        pub flags: u16,
        pub pid: u32,
        pub comm: [u8; 16],
        pub born_ns: u64,
        /// This socket's FIN: it entered FIN_WAIT1 or LAST_ACK.
        pub fin_out_ns: u64,
        /// The peer's FIN: it entered CLOSE_WAIT or CLOSING, or left
        /// FIN_WAIT1/FIN_WAIT2 for TIME_WAIT.
        pub fin_in_ns: u64,
    }
    const _: () = assert!(size_of::<SockAge>() == 56);

    /// [`SockAge::flags`]: the socket opened the connection (connect()).
    pub const AGE_CLIENT: u16 = 1;
    /// The socket is a listener's child.
    pub const AGE_SERVER: u16 = 2;
    /// Both ends closed at once: the socket went through CLOSING.
    pub const AGE_CLOSING: u16 = 4;

    /// A slot of `SK_AGE_SLOTS`: the socket that holds it (its address; 0:
    /// free) and its age. A socket's slots are `i` and `i ^ 1` for `i` a
    /// hash of its address masked by `AGE_SLOT_MASK`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct AgeSlot {
        pub sk: u64,
        pub age: SockAge,
    }
    const _: () = assert!(size_of::<AgeSlot>() == 64);

    /// The first of the two slots of socket address `sk` in a table of
    /// `mask + 1` slots (a power of two): a multiplicative hash of the
    /// address above its 64-byte alignment.
    #[inline(always)]
    pub const fn age_slot(sk: u64, mask: u32) -> u32 {
        (((sk >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32) & mask & !1
    }
}

/// Handshake packets the kernel dropped: `skb:kfree_skb` (a BTF
/// tracepoint) passes each dropped packet with the kernel's reason and,
/// since 6.x, the socket that received it. SYNs, SYN-ACKs, and pure ACKs a
/// listener received (the final ACK) are counted by namespace, server
/// port, packet and reason; the daemon names the reasons from BTF (their
/// numbers move between kernels).
pub mod drops {
    /// Entries of [`super::map::HANDSHAKE_DROPS`].
    pub const DROP_ENTRIES: u32 = 4096;

    pub const PACKET_SYN: u8 = 1;
    pub const PACKET_SYN_ACK: u8 = 2;
    /// A pure ACK a listener received: a handshake's final ACK.
    pub const PACKET_ACK: u8 = 3;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct DropKey {
        /// The namespace's inode (of the receiving device, else socket).
        pub netns: u32,
        /// `enum skb_drop_reason`, as this kernel numbers it.
        pub reason: u32,
        /// The server's port: the destination of a SYN or ACK, the source
        /// of a SYN-ACK.
        pub port: u16,
        /// `PACKET_*`.
        pub packet: u8,
        pub _pad: u8,
    }
    const _: () = assert!(size_of::<DropKey>() == 12);

    // SAFETY: `repr(C)` plain integers, no implicit padding (size
    // asserted), valid for any bit pattern.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for DropKey {}
}

/// Handshakes from the socket layer: the state tracepoint sees every TCP
/// socket of every namespace change state, and writes one
/// [`socket::SockHandshake`] when a handshake ends (and one more when an
/// established connection is reset before any data). No packet is read.
///
/// The records go to a ring per CPU in an array the daemon maps into its
/// memory ([`super::map::SOCK_LOG`]): a write is a few stores to this
/// CPU's next slot and its count, with no lock and no wakeup (a shared
/// ring buffer's reservation took ~300 ns a record under churn here, two
/// CPUs contending for its lock); the daemon reads every CPU's new records
/// every 50 ms and counts those a CPU overwrote before they were read.
/// Programs do not nest on a CPU, so each CPU's ring has one writer.
pub mod socket {
    /// Records per CPU (a power of two): 0.6 MiB a CPU, 50 ms of 160,000
    /// handshakes a second on one CPU.
    pub const LOG_SLOTS: u32 = 8192;
    /// One count per 64-byte line in [`super::map::SOCK_LOG_HEADS`].
    pub const HEAD_STRIDE: u32 = 8;
    /// CPUs the log has room for in the object as built; the daemon sizes
    /// both arrays for the machine's possible CPUs when it loads them.
    pub const LOG_CPUS: u32 = 2;
    /// Entries of [`super::map::SYN_SENT_AT`]: client handshakes in
    /// progress at once (LRU: the oldest give way).
    pub const SYN_SENT_ENTRIES: u32 = 16 * 1024;

    /// SYN_SENT or SYN_RECV → ESTABLISHED.
    pub const KIND_ESTABLISHED: u8 = 1;
    /// SYN_SENT → CLOSE: refused (`sk_err` ECONNREFUSED), or given up.
    pub const KIND_FAILED: u8 = 2;
    /// ESTABLISHED → CLOSE with no data segment either way: a reset, sent
    /// (`sk_err` 0) or received (`sk_err` ECONNRESET).
    pub const KIND_RESET: u8 = 3;
    /// An established connection's socket closed (→ CLOSE): its close
    /// timeline in `start_ns` (born), `fin_out_ns`, `fin_in_ns`, `ts_ns`
    /// (the end), `old_state` and `close_flags` (`census::AGE_*`).
    pub const KIND_CLOSED: u8 = 4;

    /// [`SockHandshake::close_flags`]: the `census::AGE_*` bits the
    /// socket's age held (its role, CLOSING seen) and:
    pub const CLOSE_CLIENT: u8 = super::census::AGE_CLIENT as u8;
    pub const CLOSE_SERVER: u8 = super::census::AGE_SERVER as u8;
    pub const CLOSE_CLOSING: u8 = super::census::AGE_CLOSING as u8;
    /// The application had closed the socket (`sk_socket` NULL): from
    /// FIN_WAIT2 on, the kernel hands such a socket to a minisock, whose
    /// end (the peer's FIN) the state tracepoint does not see.
    pub const CLOSE_ORPHAN: u8 = 8;

    /// One socket's handshake as the state tracepoint saw it end.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SockHandshake {
        /// When the transition happened (`bpf_ktime_get_ns`).
        pub ts_ns: u64,
        /// When a client's first SYN left, noted when it was retransmitted
        /// (millisecond precision; 0: not retransmitted, or unknown).
        pub start_ns: u64,
        /// The socket's address: pairs a reset with its handshake.
        pub sk: u64,
        /// IPv4 addresses in the first 4 bytes.
        pub local_addr: [u8; 16],
        pub remote_addr: [u8; 16],
        /// The socket's network namespace (inode number).
        pub netns: u32,
        /// `tcp_sock.srtt_us` (µs × 8): the first RTT sample at
        /// ESTABLISHED. Client: SYN out → SYN-ACK in; server: SYN-ACK out
        /// → ACK in. 0 when no sample was taken (a retransmission).
        pub srtt_us: u32,
        /// `tcp_sock.total_retrans`: SYN (client) or SYN-ACK (server)
        /// retransmissions.
        pub total_retrans: u32,
        pub sk_err: u32,
        pub local_port: u16,
        pub remote_port: u16,
        /// `AF_INET` or `AF_INET6`.
        pub family: u16,
        /// `flow::ROLE_CLIENT`, `flow::ROLE_SERVER`, or 0 for a reset.
        pub role: u8,
        /// `KIND_*`.
        pub kind: u8,
        /// `KIND_CLOSED`: the state the socket left for CLOSE.
        pub old_state: u8,
        /// `KIND_CLOSED`: `census::AGE_*` bits (its role; CLOSING seen).
        pub close_flags: u8,
        pub _pad: u16,
        pub _pad2: u32,
        /// The socket's cgroup v2 id, set at its creation (a server's
        /// socket: its listener's); 0 if unreadable.
        pub cgroup: u64,
        /// `KIND_CLOSED`: when this end's FIN and the peer's went (0: not
        /// seen, or the socket had no age).
        pub fin_out_ns: u64,
        pub fin_in_ns: u64,
    }
    const _: () = assert!(size_of::<SockHandshake>() == 112);

    // SAFETY: `repr(C)` plain integers and byte arrays, no implicit
    // padding (size asserted above), valid for any bit pattern.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for SockHandshake {}
}

/// TLS hello capture: the packet hooks copy the first bytes of each TLS
/// ClientHello and ServerHello (across segments, up to [`tls_capture::MAX_HELLO`])
/// and mark the client's first record after the ServerHello, through their
/// own ring buffer; the daemon reassembles and parses.
pub mod tls_capture {
    use crate::packet::TcpSegment;

    /// Bytes of one hello the kernel copies at most.
    pub const MAX_HELLO: u32 = 4096;
    /// Payload bytes per ring-buffer record.
    pub const CHUNK: usize = 1024;
    /// Records one segment may produce (a GSO segment on egress can hold a
    /// whole hello).
    pub const CHUNKS_PER_SEGMENT: usize = 4;
    pub const EVENTS_BYTES: u32 = 2 << 20;
    /// Ask for a wakeup once this much is waiting: a quarter, as for the
    /// handshake events (1,500 TLS handshakes a second fill ~300 KiB in
    /// the 50 ms between timed drains).
    pub const EVENTS_WAKEUP_BYTES: u64 = EVENTS_BYTES as u64 / 4;
    /// Entries of the pending table: hellos still arriving, and
    /// connections waiting for the client's first record after the
    /// ServerHello.
    pub const PENDING_ENTRIES: u32 = 8192;

    pub const KIND_CLIENT_HELLO: u8 = 1;
    pub const KIND_SERVER_HELLO: u8 = 2;
    /// The client's first record after the ServerHello that is not
    /// ChangeCipherSpec (TLS 1.3: the encrypted Finished). No data.
    pub const KIND_CLIENT_FINISHED: u8 = 3;

    /// One direction of a TCP connection on one interface.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct TlsKey {
        pub src_addr: [u8; 16],
        pub dst_addr: [u8; 16],
        pub ifindex: u32,
        pub src_port: u16,
        pub dst_port: u16,
        /// [`crate::flow::IP_VERSION_4`] or [`crate::flow::IP_VERSION_6`].
        pub family: u8,
        /// Padding, always zero; two scalars, as in [`crate::flow::FlowKey`].
        pub _pad: u8,
        pub _pad2: u16,
    }
    const _: () = assert!(size_of::<TlsKey>() == 44);

    impl TlsKey {
        #[inline(always)]
        pub fn of(seg: &TcpSegment, ifindex: u32) -> Self {
            Self {
                src_addr: seg.src_addr,
                dst_addr: seg.dst_addr,
                ifindex,
                src_port: seg.src_port,
                dst_port: seg.dst_port,
                family: crate::flow::ip_version(seg.family),
                _pad: 0,
                _pad2: 0,
            }
        }

        /// The other direction.
        #[inline(always)]
        pub fn reversed(&self) -> Self {
            Self {
                src_addr: self.dst_addr,
                dst_addr: self.src_addr,
                src_port: self.dst_port,
                dst_port: self.src_port,
                ..*self
            }
        }
    }

    /// What the kernel still expects on one direction.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TlsPending {
        pub ts_ns: u64,
        /// Sequence number of the hello's first byte.
        pub start_seq: u32,
        /// Capture up to here (exclusive).
        pub end_seq: u32,
        pub kind: u8,
        pub _pad: [u8; 7],
    }
    const _: () = assert!(size_of::<TlsPending>() == 24);

    /// One ring-buffer record: up to [`CHUNK`] bytes of a hello, or a
    /// marker (`len` 0).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct TlsChunk {
        pub ts_ns: u64,
        pub key: TlsKey,
        pub kind: u8,
        /// For [`KIND_CLIENT_FINISHED`]: the record's content type.
        pub record_type: u8,
        /// Bytes of `data` used.
        pub len: u16,
        /// Offset of `data[0]` from the hello's first byte.
        pub offset: u32,
        /// Bytes of this hello the kernel captures in all.
        pub target: u32,
        /// Sequence number of the hello's first byte: names the hello.
        pub hello_seq: u32,
        /// [`crate::abi::Direction`] of the hook that saw it.
        pub direction: u32,
        pub data: [u8; CHUNK],
    }
    const _: () = assert!(size_of::<TlsChunk>() == 1096);

    // SAFETY: `repr(C)` plain integers and byte arrays, padding written out.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for TlsKey {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for TlsPending {}
    // SAFETY: as above; its 1,096 bytes are the sum of its fields.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for TlsChunk {}
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel() {
        for name in program::ALL.iter().chain(&map::ALL) {
            assert!(name.len() <= 15, "{name} is cut by the kernel");
        }
    }

    #[test]
    fn names_are_distinct_and_every_hook_is_a_program() {
        let names: alloc::collections::BTreeSet<&str> =
            program::ALL.iter().chain(&map::ALL).copied().collect();
        assert_eq!(names.len(), program::ALL.len() + map::ALL.len());
        for hook in program::HOOKS {
            assert!(program::ALL.contains(&hook), "{hook}");
        }
    }

    #[test]
    fn indexes_are_dense_and_distinct() {
        let mut seen = [false; PACKET_COUNTS_LEN as usize];
        for d in Direction::ALL {
            for k in PacketKind::ALL {
                let i = packet_count_index(d, k) as usize;
                assert!(!seen[i], "{d:?}/{k:?} shares slot {i}");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
        for (i, e) in ParseError::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i);
        }
        assert_eq!(transition_index(15, 15), Some(255));
        assert_eq!(transition_index(16, 1), None);
    }
}
