//! The JSON objects the API answers with, as the daemon writes them and
//! the CLI reads them back. Field names are the documented JSON; the
//! daemon's model fills them in (`model`), the CLI only reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// (client address, client port, server address, server port): one
/// connection, whichever side this host was.
pub type Endpoints = (String, u16, String, u16);

/// Whose a socket or connection is: its network namespace and, from the
/// socket's cgroup v2 path (the cgroup it was created in), the container,
/// Kubernetes pod and systemd unit. `null` for what does not apply or is
/// not known (a connection only the packet hooks saw has no cgroup).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// `host`, the `ip netns` name, or `ns:<inode>`.
    pub netns: Option<String>,
    pub netns_inode: Option<u64>,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub unit: Option<String>,
}

/// One connection as `handshake conns --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnView {
    pub family: String,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    pub role: String,
    /// `established`, `refused`, `reset`, `timeout` or `in_progress`.
    pub outcome: String,
    /// Client: SYN out → SYN-ACK in, µs.
    pub connect_us: Option<f64>,
    /// Server: SYN in → SYN-ACK out, µs.
    pub syn_to_synack_us: Option<f64>,
    /// Server: SYN-ACK out → ACK in, µs.
    pub synack_to_ack_us: Option<f64>,
    pub syn_retransmits: u16,
    pub synack_retransmits: u16,
    /// Who sent the RST of a refused or reset handshake.
    pub rst_from: Option<String>,
    /// Interface of the packet hooks that saw it (0: the socket layer
    /// only).
    pub ifindex: u32,
    /// Where the timings came from: `socket`, `wire` or `both`.
    pub source: String,
    /// Seconds since the first SYN.
    pub age_s: f64,
    /// From the connection's ClientHello, when it carried TLS.
    pub sni: Option<String>,
    pub ja4: Option<String>,
    /// Negotiated, from the ServerHello.
    pub tls_version: Option<String>,
    /// Its SYN was retransmitted while its listener was overflowing (the
    /// accept queue full, the SYN queue full or sending cookies, or drops
    /// growing): the wait was the server's queue, not the network.
    pub listener_overflowing: bool,
    /// How this end's socket closed, once it did: who closed first
    /// (`local`, `remote`, `both`, `unknown`), and how (`fin`, `rst`; the
    /// RST's sender in `close_rst_by`).
    pub closed_by: Option<String>,
    pub close: Option<String>,
    pub close_rst_by: Option<String>,
    /// The closing states' durations, µs, where this end went through
    /// them: the peer's FIN to this end's close (the application's
    /// reaction), this end's FIN to the peer's (the peer's), LAST_ACK, and
    /// CLOSING (both closed at once).
    pub close_wait_us: Option<f64>,
    pub fin_wait_us: Option<f64>,
    pub last_ack_us: Option<f64>,
    pub closing_us: Option<f64>,
    /// From connect() (client) or the completed handshake (server) to the
    /// socket's close.
    pub lifetime_us: Option<f64>,
    #[serde(flatten)]
    pub attribution: Attribution,
}

impl ConnView {
    /// Its client's and server's endpoints, whichever side this host was.
    pub fn endpoints(&self) -> Endpoints {
        let local = (self.local_addr.clone(), self.local_port);
        let remote = (self.remote_addr.clone(), self.remote_port);
        let (client, server) = if self.role == "client" {
            (local, remote)
        } else {
            (remote, local)
        };
        (client.0, client.1, server.0, server.1)
    }
}

/// One full socket from a census listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SocketView {
    #[serde(flatten)]
    pub attribution: Attribution,
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
    /// Oldest first; unknown ages last.
    pub fn sort(views: &mut [Self]) {
        views.sort_by(|a, b| {
            b.state_age_s
                .unwrap_or(-1.0)
                .total_cmp(&a.state_age_s.unwrap_or(-1.0))
        });
    }
}

/// Closes of one listener or workload: `handshake closes --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloseGroupView {
    /// `listener` (a port this host served, in a namespace), `unit`,
    /// `container` or `pod`.
    pub kind: String,
    /// The port, unit, container id or pod UID.
    pub name: String,
    pub netns: Option<String>,
    pub closes: u64,
    pub rst: u64,
    pub rst_share: f64,
    /// CLOSE_WAIT durations of the group's closes (the application's
    /// reaction to the peer's FIN), µs.
    pub close_wait_p50_us: Option<f64>,
    pub close_wait_p99_us: Option<f64>,
    pub fin_wait_p50_us: Option<f64>,
    pub fin_wait_p99_us: Option<f64>,
}

/// One listener, from a fresh census: `handshake listeners --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerView {
    #[serde(flatten)]
    pub attribution: Attribution,
    pub family: String,
    pub local_addr: String,
    pub local_port: u16,
    /// Connections waiting for accept() (`sk_ack_backlog`, ss's Recv-Q).
    pub accept_queue: u32,
    /// Its limit (`sk_max_ack_backlog`, ss's Send-Q).
    pub accept_queue_max: u32,
    /// Request sockets waiting for the final ACK (ss's SYN-RECV).
    pub syn_queue: u32,
    /// The listener's drops (ss's skmem `d`).
    pub drops: u32,
    /// Drops per second between the last two censuses of its namespace.
    pub drops_per_second: Option<f64>,
    /// True while it answers SYNs with cookies (its SYN queue, or its
    /// reuseport group's, overflowed in the last 2 s).
    pub syn_cookies: bool,
    /// Seconds since its SYN queue last overflowed, when known.
    pub syn_overflow_s_ago: Option<f64>,
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
    pub netns_inode: u64,
    /// The namespace's state changes per second by the state entered,
    /// over the daemon's last second or so (the state tracepoint tells
    /// each socket's namespace).
    pub entered_per_second: BTreeMap<String, f64>,
    /// Seconds since this namespace was last counted: a quiet namespace
    /// keeps its counts until its sockets change.
    pub counted_s_ago: f64,
    /// The workloads whose processes live in this namespace (container,
    /// pod, unit; deduplicated, at most 64).
    pub workloads: Vec<Attribution>,
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
    pub netns_inode: u64,
    /// As in [`StatesView::workloads`].
    pub workloads: Vec<Attribution>,
    pub count: u64,
    pub entries_per_second: Option<f64>,
    pub port_range: [u16; 2],
    pub top: Vec<Endpoint>,
    pub top_local: Vec<Endpoint>,
    pub forecast: Vec<Forecast>,
}

/// One TLS connection as the hooks saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TlsView {
    pub family: String,
    pub client_addr: String,
    pub client_port: u16,
    pub server_addr: String,
    pub server_port: u16,
    /// This host's side: `client` when it sent the ClientHello.
    pub role: String,
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    pub ja4: String,
    pub ja4_r: String,
    pub ja3: String,
    pub ja3_hash: String,
    /// The highest version the client offered.
    pub offered_version: String,
    /// Negotiated, once the ServerHello was seen.
    pub version: Option<String>,
    /// Negotiated cipher suite, `0x1301` style.
    pub cipher: Option<String>,
    pub client_hello_to_server_hello_us: Option<f64>,
    pub server_hello_to_client_finished_us: Option<f64>,
    /// From the connection's first SYN to the client's first record after
    /// the ServerHello, when the TCP handshake was seen too.
    pub total_from_syn_us: Option<f64>,
    /// Kernel clock of the ClientHello, to join with the TCP handshake.
    #[serde(skip)]
    pub ts_client_hello: u64,
    #[serde(skip)]
    pub ts_client_finished: Option<u64>,
    #[serde(skip)]
    pub ifindex: u32,
    pub age_s: f64,
    #[serde(flatten)]
    pub attribution: Attribution,
}

impl TlsView {
    pub fn endpoints(&self) -> Endpoints {
        (
            self.client_addr.clone(),
            self.client_port,
            self.server_addr.clone(),
            self.server_port,
        )
    }
}

/// The daemon about itself: `handshake status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub pid: u32,
    /// Unix time the daemon started, seconds.
    pub started_unix_s: f64,
    pub uptime_s: f64,
    /// The user and the effective capabilities it runs with.
    pub uid: u32,
    pub capabilities: Vec<String>,
    /// Every probe tried: where it is attached, or why not.
    pub probes: Vec<ProbeView>,
    /// Census: `iter/tcp`, `netlink`, or `none`.
    pub census_source: String,
    pub census_interval_s: f64,
    /// The interval the census runs at now (longer while it is slow).
    pub census_interval_actual_s: f64,
    pub namespaces: usize,
    /// The kernel tables: capacity, and entries at the last sweep where
    /// the daemon knows them.
    pub tables: Vec<TableView>,
    /// What was lost, by what (the metrics' counters of the same names).
    pub lost: BTreeMap<String, u64>,
    /// The daemon's own resident memory and CPU time, and the kernel
    /// memory of its BPF maps.
    pub rss_bytes: u64,
    pub map_memory_bytes: u64,
    pub cpu_s: f64,
    pub metrics_addr: String,
    pub api_socket: String,
    /// The instance whose state is kept across restarts (`--instance`),
    /// if any; and where it is kept and what was taken up at the start,
    /// or why nothing is kept.
    pub instance: Option<String>,
    pub kept: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeView {
    pub probe: String,
    pub interface: Option<String>,
    pub netns: Option<String>,
    pub attached: bool,
    /// How it is attached (`tcx`, `tp_btf`, ...), or why it is not.
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableView {
    pub map: String,
    pub capacity: u32,
    pub entries: Option<u64>,
}
