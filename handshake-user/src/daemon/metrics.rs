//! Prometheus exposition: turns what the kernel counted ([`KernelCounts`]),
//! the attach results and the model's aggregates into text format, and
//! serves it through [`renderer`]. Rendering is pure (no maps, no I/O),
//! so it is unit-tested without a kernel; the counters are read from the
//! kernel at scrape time, never cached.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use handshake_common::{
    abi::{
        Direction, PacketKind, ParseError,
        census::{Listener, SUMMARY_ROW_IPV4, SUMMARY_ROW_IPV6},
        drops::{PACKET_ACK, PACKET_SYN, PACKET_SYN_ACK},
        tcp_state,
    },
    flow::{Flow, ROLE_SERVER},
};
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{self, Bucket, Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    daemon::{
        config::DaemonConfig,
        http::Render,
        state::{SelfStats, State, lock},
        status::{self, ProcessStats},
    },
    kernel::{
        census::Netstat,
        loader::{Attachment, Attachments, lock_attachments},
        maps::{Counters, FlowStats, KernelCounts, Table},
    },
    model::{
        closes::{self, CLOSE_BUCKETS, ClosePhase, CloseTotals, Closer, How, ROLES},
        conntrack::{BUCKETS, Histogram, Phase, Totals},
        listeners::{COOKIES_WITHIN_S, JiffyClock},
        states::{NetnsView, STUCK_STATES},
        tls::{TlsPhase, TlsTotals},
    },
    wire::{Family, Outcome, Role, STATES, TableView, state_name},
};

/// Everything one scrape shows.
#[derive(Debug)]
pub struct Report<'a> {
    pub counts: &'a KernelCounts,
    pub attachments: &'a [Attachment],
    pub totals: &'a Totals,
    /// Handshakes in the kernel tables at the last sweep.
    pub live: &'a [Flow],
    pub flow_stats: FlowStats,
    pub self_stats: SelfStats,
    /// Decoded records with a role, outcome or kind the kernel does not
    /// write (handshakes and socket-layer records).
    pub malformed_records: u64,
    /// How many listening ports `handshake_tcp_half_open` shows.
    pub half_open_top: usize,
    /// The last census of each namespace.
    pub census: &'a [NetnsView],
    /// Namespaces with their own `netns` label value (`--netns-top`).
    pub netns_top: usize,
    /// Listeners with their own series (`--listener-top`).
    pub listener_top: usize,
    /// The kernel's clock of listener stamps.
    pub jiffies: &'a JiffyClock,
    /// This kernel's drop reasons by number.
    pub reasons: &'a BTreeMap<u32, String>,
    /// How connections closed, since the start.
    pub closes: &'a CloseTotals,
    pub tls: &'a TlsTotals,
}

/// `/metrics`: the kernel's counters read now, the rest from the state.
/// A failed map read answers the scrape with an error and is counted.
pub fn renderer(
    state: Arc<Mutex<State>>,
    counters: Arc<Counters>,
    attachments: Attachments,
    config: &DaemonConfig,
    started_unix_s: f64,
) -> Render {
    let (half_open_top, netns_top, listener_top, sizes) = (
        config.half_open_top,
        config.netns_top,
        config.listener_top,
        config.tables,
    );
    Arc::new(move || {
        let counts = counters.read();
        let attachments = lock_attachments(&attachments).clone();
        let process = ProcessStats::read(started_unix_s);
        let mut state = lock(&state);
        let own = own_families(&process, &status::tables(sizes, state.table_entries));
        match counts {
            Ok(counts) => Ok(render(&Report {
                counts: &counts,
                attachments: &attachments,
                totals: state.conntrack.totals(),
                live: &state.live,
                flow_stats: state.flow_stats,
                self_stats: state.self_stats,
                malformed_records: state.conntrack.malformed + state.sockets.malformed,
                half_open_top,
                census: &state.census,
                netns_top,
                listener_top,
                jiffies: &state.jiffies,
                reasons: &counters.reasons,
                closes: &state.closes.totals,
                tls: &state.tls.totals,
            }) + &own),
            Err(error) => {
                state.self_stats.map_read_errors += 1;
                tracing::error!(%error, "reading the counter maps failed");
                Err(format!("reading the counter maps failed: {error}"))
            }
        }
    })
}

/// The daemon's own families: its version, its process (the names
/// Prometheus client libraries use) and its tables' fill.
pub fn own_families(process: &ProcessStats, tables: &[TableView]) -> String {
    let mut families = Families::default();
    families.gauges(
        "handshake_build_info",
        "1, labeled with the daemon's version.",
        vec![gauge(&[("version", env!("CARGO_PKG_VERSION"))], 1.0)],
    );
    families.counters(
        "process_cpu_seconds_total",
        "User and system CPU time the daemon spent, in seconds.",
        vec![{
            let mut c = Counter::default();
            c.set_value(process.cpu_s);
            let mut m = Metric::default();
            m.set_counter(c);
            m
        }],
    );
    for (name, help, value) in [
        (
            "process_resident_memory_bytes",
            "The daemon's resident memory, in bytes.",
            process.rss_bytes as f64,
        ),
        (
            "process_start_time_seconds",
            "When the daemon started, in seconds since the Unix epoch.",
            process.start_unix_s,
        ),
        (
            "process_open_fds",
            "File descriptors the daemon holds open.",
            process.open_fds as f64,
        ),
        (
            "handshake_map_memory_bytes",
            "Kernel memory of the BPF maps the daemon holds (memlock, as bpftool shows it).",
            process.map_memory_bytes as f64,
        ),
    ] {
        families.gauges(name, help, vec![gauge(&[], value)]);
    }
    families.gauges(
        "handshake_map_capacity",
        "Entries each kernel table can hold (--half-open-entries, --flow-entries, --socket-age-entries).",
        tables
            .iter()
            .map(|t| gauge(&[("map", &t.map)], f64::from(t.capacity)))
            .collect(),
    );
    families.gauges(
        "handshake_map_entries",
        "Entries in each flow table at the last sweep.",
        tables
            .iter()
            .filter_map(|t| Some(gauge(&[("map", &t.map)], t.entries? as f64)))
            .collect(),
    );
    encode(families)
}

/// Renders every family in Prometheus text format.
pub fn render(report: &Report<'_>) -> String {
    let mut families = Families::default();
    packet_families(report, &mut families);
    probe_families(report, &mut families);
    handshake_families(report, &mut families);
    table_families(report, &mut families);
    census_families(report, &mut families);
    listener_families(report, &mut families);
    close_families(report, &mut families);
    time_wait_families(report, &mut families);
    tls_families(report, &mut families);
    encode(families)
}

fn encode(families: Families) -> String {
    // The encoder rejects a family without samples (no transition seen
    // yet, no port half-open); Prometheus reads an absent series as none.
    let mut families = families.0;
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = Vec::new();
    if let Err(error) = TextEncoder::new().encode(&families, &mut out) {
        // Families are built here from bounded label sets; this would be a
        // bug, and a scrape must still answer.
        tracing::error!(%error, "encoding metrics failed");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The families of one scrape, in the order they are shown.
#[derive(Default)]
struct Families(Vec<MetricFamily>);

impl Families {
    fn add(&mut self, name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) {
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        family.set_help(help.to_owned());
        family.set_field_type(kind);
        family.set_metric(metrics);
        self.0.push(family);
    }

    fn counters(&mut self, name: &str, help: &str, metrics: Vec<Metric>) {
        self.add(name, help, MetricType::COUNTER, metrics);
    }

    fn gauges(&mut self, name: &str, help: &str, metrics: Vec<Metric>) {
        self.add(name, help, MetricType::GAUGE, metrics);
    }

    fn histograms(&mut self, name: &str, help: &str, metrics: Vec<Metric>) {
        self.add(name, help, MetricType::HISTOGRAM, metrics);
    }

    /// A counter family of one series without labels.
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.counters(name, help, vec![counter(&[], value)]);
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value as f64);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn histogram(pairs: &[(&str, &str)], h: &Histogram) -> Metric {
    cumulative(pairs, &BUCKETS, &h.buckets, h.count, h.sum)
}

/// A histogram over the close buckets.
fn close_histogram(pairs: &[(&str, &str)], h: &closes::Histogram) -> Metric {
    cumulative(pairs, &CLOSE_BUCKETS, &h.buckets, h.count, h.sum)
}

/// A Prometheus histogram from cumulative counts at `bounds`.
fn cumulative(
    pairs: &[(&str, &str)],
    bounds: &[f64],
    buckets: &[u64],
    count: u64,
    sum: f64,
) -> Metric {
    let mut out = proto::Histogram::default();
    out.set_sample_count(count);
    out.set_sample_sum(sum);
    out.set_bucket(
        bounds
            .iter()
            .zip(buckets)
            .map(|(bound, count)| {
                let mut b = Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(*count);
                b
            })
            .collect(),
    );
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(out);
    m
}

/// How connections closed: who first, FIN or RST, the closing states'
/// durations and the connections' lifetimes, per role. Counted as the
/// closes come: a close counts even once its row has left the history.
fn close_families(report: &Report<'_>, families: &mut Families) {
    let totals = report.closes;
    let mut closes = Vec::new();
    for (r, role) in ROLES.iter().enumerate() {
        for closer in Closer::ALL {
            for how in How::ALL {
                let n = totals.closes(r, closer, how);
                if n > 0 || *role != "unknown" && closer != Closer::Unknown {
                    closes.push(counter(
                        &[
                            ("role", role),
                            ("closer", closer.name()),
                            ("how", how.name()),
                        ],
                        n,
                    ));
                }
            }
        }
    }
    families.counters(
        "handshake_tcp_closes_total",
        "Connections whose socket closed, by this host's role, who closed first (local, remote, both: a simultaneous close; unknown: the socket had no age) and how (fin: the four-way close; rst).",
        closes,
    );
    let mut phases = Vec::new();
    for (r, role) in ROLES.iter().enumerate().take(2) {
        for phase in ClosePhase::ALL {
            let h = &totals.phases[r][phase as usize];
            phases.push(close_histogram(
                &[("role", role), ("phase", phase.name())],
                h,
            ));
        }
    }
    families.histograms(
        "handshake_tcp_close_duration_seconds",
        "Closing states' durations: close_wait (the peer's FIN to this end's close: the application's reaction), fin_wait (this end's FIN to the peer's: the peer's reaction; unknown for a socket the application had closed, whose FIN_WAIT2 the kernel hands to a minisock), last_ack, closing (both closed at once).",
        phases,
    );
    let lifetimes = ROLES
        .iter()
        .enumerate()
        .take(2)
        .map(|(r, role)| close_histogram(&[("role", role)], &totals.lifetimes[r]))
        .collect();
    families.histograms(
        "handshake_tcp_connection_duration_seconds",
        "Connections' lifetimes: from connect() (client) or the completed handshake (server) to the socket's close.",
        lifetimes,
    );
}

/// One histogram per (role, phase), empty ones included.
fn phase_histograms<P: Copy + Ord>(
    durations: &BTreeMap<(Role, P), Histogram>,
    phases: impl IntoIterator<Item = (Role, P, &'static str)>,
) -> Vec<Metric> {
    let empty = Histogram::default();
    phases
        .into_iter()
        .map(|(role, phase, name)| {
            let h = durations.get(&(role, phase)).unwrap_or(&empty);
            histogram(&[("role", role.name()), ("phase", name)], h)
        })
        .collect()
}

/// Server handshakes in progress per listening port (SYN-ACK sent, no ACK
/// yet: what `ss` lists as SYN-RECV), the busiest `top` ports.
pub fn half_open_by_port(live: &[Flow], top: usize) -> Vec<(u16, u64)> {
    let mut ports: BTreeMap<u16, u64> = BTreeMap::new();
    for flow in live {
        if flow.role == ROLE_SERVER && flow.ts_synack != 0 && flow.ts_ack == 0 {
            *ports.entry(flow.server_port).or_default() += 1;
        }
    }
    let mut ports: Vec<(u16, u64)> = ports.into_iter().collect();
    ports.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ports.truncate(top);
    ports
}

/// What the packet hooks and the state tracepoint counted.
fn packet_families(report: &Report<'_>, families: &mut Families) {
    let counts = report.counts;
    let packets = Direction::ALL
        .iter()
        .flat_map(|direction| {
            PacketKind::ALL.iter().map(move |kind| {
                counter(
                    &[("direction", direction.name()), ("kind", kind.name())],
                    counts.packets(*direction, *kind),
                )
            })
        })
        .collect();
    families.counters(
        "handshake_packets_total",
        "TCP handshake and TLS hello packets seen by the packet hooks.",
        packets,
    );
    let errors = ParseError::ALL
        .iter()
        .map(|e| counter(&[("kind", e.name())], counts.parse_error(*e)))
        .collect();
    families.counters(
        "handshake_parse_errors_total",
        "Frames the packet parser could not read, by reason; they were passed on untouched.",
        errors,
    );
    let transitions = counts
        .transitions
        .iter()
        .map(|&(from, to, count)| {
            counter(
                &[("from", &state_name(from)), ("to", &state_name(to))],
                count,
            )
        })
        .collect();
    families.counters(
        "handshake_tcp_state_transitions_total",
        "TCP socket state changes reported by sock:inet_sock_set_state, IPv4 and IPv6.",
        transitions,
    );
}

/// Where each probe is attached, and what the daemon lost.
fn probe_families(report: &Report<'_>, families: &mut Families) {
    let probes = report
        .attachments
        .iter()
        .map(|a| {
            gauge(
                &[
                    ("probe", a.probe),
                    ("interface", a.interface.as_deref().unwrap_or("")),
                    ("netns", a.netns.as_deref().unwrap_or("")),
                    ("mode", if a.attached { &a.detail } else { "" }),
                ],
                if a.attached { 1.0 } else { 0.0 },
            )
        })
        .collect();
    families.gauges(
        "handshake_probe_attached",
        "1 when the probe is attached (mode: xdp-native, xdp-skb, tcx, tc-clsact, tracepoint, tp_btf, iter/tcp), 0 when attaching it failed (see the daemon's log).",
        probes,
    );
    let stats = report.self_stats;
    families.counter(
        "handshake_map_read_errors_total",
        "BPF map reads that failed (a scrape answered with an error, or a sweep lost).",
        stats.map_read_errors,
    );
    families.counter(
        "handshake_events_malformed_total",
        "Ring-buffer records the daemon could not decode (of the wrong size, or with a role, outcome or kind the kernel does not write).",
        stats.events_malformed
            + stats.tls_events_malformed
            + report.malformed_records,
    );
}

/// Decided handshakes: phases, outcomes, retransmissions; and the ones
/// half-open now.
fn handshake_families(report: &Report<'_>, families: &mut Families) {
    let totals = report.totals;
    let phases = [
        (Role::Client, Phase::Connect),
        (Role::Server, Phase::SynToSynAck),
        (Role::Server, Phase::SynAckToAck),
    ];
    families.histograms(
        "handshake_tcp_handshake_duration_seconds",
        "TCP handshake phases: connect (client: SYN out to SYN-ACK in), syn_to_synack (server: SYN in to SYN-ACK out), synack_to_ack (server: SYN-ACK out to ACK in).",
        phase_histograms(
            &totals.durations,
            phases.map(|(role, phase)| (role, phase, phase.name())),
        ),
    );
    let outcomes = Role::ALL
        .iter()
        .flat_map(|role| {
            Outcome::DECIDED.iter().map(move |outcome| {
                let n = totals.handshakes.get(&(*role, *outcome)).copied();
                counter(
                    &[("role", role.name()), ("outcome", outcome.name())],
                    n.unwrap_or(0),
                )
            })
        })
        .collect();
    families.counters(
        "handshake_tcp_handshakes_total",
        "Decided TCP handshakes by this host's role and outcome (reset: RST after the handshake, before data).",
        outcomes,
    );
    for (name, help, source) in [
        (
            "handshake_tcp_syn_retransmits_total",
            "Retransmitted SYNs of decided handshakes.",
            &totals.syn_retransmits,
        ),
        (
            "handshake_tcp_synack_retransmits_total",
            "Retransmitted SYN-ACKs of decided handshakes.",
            &totals.synack_retransmits,
        ),
    ] {
        let metrics = Role::ALL
            .iter()
            .map(|role| {
                let n = source.get(role).copied().unwrap_or(0);
                counter(&[("role", role.name())], n)
            })
            .collect();
        families.counters(name, help, metrics);
    }
    let half_open = half_open_by_port(report.live, report.half_open_top)
        .into_iter()
        .map(|(port, n)| gauge(&[("port", &port.to_string())], n as f64))
        .collect();
    families.gauges(
        "handshake_tcp_half_open",
        "Server handshakes in progress (SYN-ACK sent, no ACK yet) per listening port, busiest ports only.",
        half_open,
    );
}

/// The kernel's flow tables: what they lost and refused.
fn table_families(report: &Report<'_>, families: &mut Families) {
    let stats = report.flow_stats;
    families.counter(
        "handshake_ringbuf_dropped_total",
        "Handshake events lost because the ring buffer was full.",
        stats.events_dropped,
    );
    families.counters(
        "handshake_map_evictions_total",
        "Entries the kernel's LRU flow tables evicted (their handshakes are not reported).",
        Table::ALL
            .iter()
            .map(|t| counter(&[("map", t.name())], stats.evictions[*t as usize]))
            .collect(),
    );
    families.counter(
        "handshake_socket_events_dropped_total",
        "Handshakes decided at the socket layer and lost: written over in a CPU's log before the daemon read them, or with no slot to go to.",
        stats.sock_events_dropped + report.self_stats.sock_records_lost,
    );
    families.counter(
        "handshake_map_insert_failures_total",
        "Flow-table inserts the kernel refused.",
        stats.insert_failures,
    );
    families.counter(
        "handshake_kernel_synack_retransmits_total",
        "SYN-ACK retransmissions as tcp:tcp_retransmit_synack reports them, host-wide.",
        stats.synack_retransmits_kernel,
    );
}

/// TLS handshakes from the hooks' hello records.
fn tls_families(report: &Report<'_>, families: &mut Families) {
    let tls = report.tls;
    let phases = Role::ALL
        .iter()
        .flat_map(|role| TlsPhase::ALL.map(|phase| (*role, phase, phase.name())));
    families.histograms(
        "handshake_tls_handshake_duration_seconds",
        "TLS handshake phases seen on the wire: client_hello_to_server_hello (ClientHello to ServerHello), server_hello_to_client_finished (ServerHello to the client's next record that is not ChangeCipherSpec).",
        phase_histograms(&tls.durations, phases),
    );
    families.counters(
        "handshake_tls_handshakes_total",
        "TLS handshakes whose ServerHello was seen, by this host's role and the negotiated version.",
        tls.handshakes
            .iter()
            .map(|((role, version), n)| counter(&[("role", role.name()), ("version", version)], *n))
            .collect(),
    );
    families.counters(
        "handshake_tls_client_hellos_total",
        "ClientHellos by the highest version offered and the first ALPN (h2, http/1.1, h3, http/1.0, acme-tls/1, other, none).",
        tls.client_hellos
            .iter()
            .map(|((version, alpn), n)| counter(&[("version", version), ("alpn", alpn)], *n))
            .collect(),
    );
    families.counters(
        "handshake_tls_parse_errors_total",
        "TLS hellos the daemon could not use, by reason (truncated, bad_length, wrong_type, incomplete: bytes stopped arriving, server_hello_without_client_hello, too_many_in_flight).",
        tls.parse_errors
            .iter()
            .map(|(reason, n)| counter(&[("reason", reason)], *n))
            .collect(),
    );
    families.counters(
        "handshake_tls_ringbuf_dropped_total",
        "TLS hello records lost to a full ring buffer, and pending-capture inserts the kernel refused.",
        vec![
            counter(&[("what", "records")], report.flow_stats.tls_events_dropped),
            counter(&[("what", "pending_inserts")], report.flow_stats.tls_pending_failures),
        ],
    );
}

/// The namespaces as the metrics label them: the `top` with the most
/// sockets by name, the rest together as `other`. Every namespace is in
/// exactly one group, so a sum over the label is the host's total.
pub fn netns_groups(census: &[NetnsView], top: usize) -> Vec<(&str, Vec<&NetnsView>)> {
    let mut ranked: Vec<&NetnsView> = census.iter().collect();
    ranked.sort_by(|a, b| {
        (b.total(), a.name != "host", &a.name).cmp(&(a.total(), b.name != "host", &b.name))
    });
    let rest = ranked.split_off(top.min(ranked.len()));
    let mut groups: Vec<(&str, Vec<&NetnsView>)> = ranked
        .into_iter()
        .map(|v| (v.name.as_str(), vec![v]))
        .collect();
    if !rest.is_empty() {
        groups.push(("other", rest));
    }
    groups
}

/// The socket census: states per namespace, stuck sockets, the
/// namespaces' state changes, and the census's own schedule and cost.
fn census_families(report: &Report<'_>, families: &mut Families) {
    let mut sockets = Vec::new();
    let mut oldest = Vec::new();
    let mut durations = Vec::new();
    let mut entered = Vec::new();
    for (netns, views) in netns_groups(report.census, report.netns_top) {
        for state in STUCK_STATES {
            let seconds = views
                .iter()
                .map(|v| v.oldest_seconds(state))
                .fold(0.0, f64::max);
            oldest.push(gauge(
                &[("netns", netns), ("state", &state_name(state))],
                seconds,
            ));
        }
        for state in STATES {
            for (row, family) in [
                (SUMMARY_ROW_IPV4, Family::Ipv4),
                (SUMMARY_ROW_IPV6, Family::Ipv6),
            ] {
                let count: u64 = views
                    .iter()
                    .map(|v| v.snapshot.count_family(row, state))
                    .sum();
                sockets.push(gauge(
                    &[
                        ("netns", netns),
                        ("state", &state_name(state)),
                        ("family", family.name()),
                    ],
                    count as f64,
                ));
            }
            let rate: f64 = views
                .iter()
                .map(|v| v.entered_per_second[state as usize])
                .sum();
            entered.push(gauge(
                &[("netns", netns), ("state", &state_name(state))],
                rate,
            ));
        }
        durations.push(gauge(
            &[("netns", netns)],
            views
                .iter()
                .map(|v| v.snapshot.duration.as_secs_f64())
                .sum(),
        ));
    }
    families.gauges(
        "handshake_tcp_sockets",
        "TCP sockets per state and family at the last census (iter/tcp) of each namespace, as ss counts them: request sockets as syn_recv, closed sockets waiting for their peer's FIN as fin_wait2. The --netns-top namespaces with the most sockets by name, the rest as netns=\"other\".",
        sockets,
    );
    families.gauges(
        "handshake_tcp_state_entries_per_second",
        "TCP sockets entering each state per second, per namespace (sock:inet_sock_set_state), over the daemon's last second or so.",
        entered,
    );
    families.gauges(
        "handshake_tcp_state_oldest_seconds",
        "Seconds the oldest socket in close_wait (the application never closed it), fin_wait2 (the peer never closed) or syn_sent (the peer never answered) has been in that state; 0 when none.",
        oldest,
    );
    families.gauges(
        "handshake_census_duration_seconds",
        "Wall time of the last census of the namespace: walk, read and map drain (netns=\"other\": the sum).",
        durations,
    );
    families.gauges(
        "handshake_netns",
        "Network namespaces the census counts: every one of the host (found through /run/netns, nsfs mounts and /proc/*/ns/net).",
        vec![gauge(&[], report.census.len() as f64)],
    );
    families.counters(
        "handshake_census_netns_total",
        "Namespaces the scheduled censuses counted afresh (counted) or left as they were, their sockets having changed no state since their last census (skipped).",
        vec![
            counter(&[("result", "counted")], report.self_stats.netns_counted),
            counter(&[("result", "skipped")], report.self_stats.netns_skipped),
        ],
    );
    families.counter(
        "handshake_socket_ages_untracked_total",
        "State changes the kernel could not note because both its slots and its overflow table of socket ages were full (--socket-age-entries), once per change: those sockets' ages show as unknown.",
        report.flow_stats.sock_ages_full,
    );
    families.gauges(
        "handshake_census_interval_seconds",
        "Seconds between scheduled censuses: --census-interval, stretched while censuses owe CPU time so that they take at most 1 % of one CPU on average, after a burst of up to 1 s (many new namespaces at once); requests from the CLI always count afresh.",
        vec![gauge(&[], report.self_stats.census_interval_s)],
    );
    families.counter(
        "handshake_census_errors_total",
        "Census runs that failed (see the daemon's log).",
        report.self_stats.census_errors,
    );
    families.counter(
        "handshake_checkpoint_errors_total",
        "Checkpoints of the daemon's totals that could not be written: a restart now would lose what changed since the last one written (see the daemon's log).",
        report.self_stats.checkpoint_errors,
    );
    families.gauges(
        "handshake_checkpoint_bytes",
        "Size of the last checkpoint written (its totals, the socket-layer rows it holds and how far it has read), 0 when nothing is kept across restarts.",
        vec![gauge(&[], report.self_stats.checkpoint_bytes as f64)],
    );
}

/// Listeners per (namespace, port), both families and every address
/// together: the `listener_top` with the longest queues, then the most
/// drops.
fn busiest_listeners<'a>(report: &Report<'a>) -> Vec<(&'a NetnsView, u16, Vec<&'a Listener>)> {
    let mut by_port: Vec<(&NetnsView, u16, Vec<&Listener>)> = Vec::new();
    for view in report.census {
        for listener in &view.snapshot.listeners {
            match by_port
                .iter_mut()
                .find(|(v, port, _)| v.inode == view.inode && *port == listener.local_port)
            {
                Some((_, _, list)) => list.push(listener),
                None => by_port.push((view, listener.local_port, vec![listener])),
            }
        }
    }
    let weight = |list: &[&Listener]| {
        let queued: u64 = list
            .iter()
            .map(|l| u64::from(l.accept_queue) + u64::from(l.syn_queue))
            .sum();
        let drops: u64 = list.iter().map(|l| u64::from(l.drops)).sum();
        (queued, drops)
    };
    by_port.sort_by(|a, b| weight(&b.2).cmp(&weight(&a.2)).then(a.1.cmp(&b.1)));
    by_port.truncate(report.listener_top);
    by_port
}

/// Listen queues, listener drops and SYN cookies; dropped handshake
/// packets by reason; each namespace's listen-queue counters.
fn listener_families(report: &Report<'_>, families: &mut Families) {
    let (mut length, mut max, mut drops, mut cookies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (view, port, list) in busiest_listeners(report) {
        let port = port.to_string();
        let labels = [("netns", view.name.as_str()), ("port", port.as_str())];
        let sum =
            |f: fn(&Listener) -> u32| list.iter().map(|l| u64::from(f(l))).sum::<u64>() as f64;
        for (queue, value) in [
            ("accept", sum(|l| l.accept_queue)),
            ("syn", sum(|l| l.syn_queue)),
        ] {
            length.push(gauge(&[labels[0], labels[1], ("queue", queue)], value));
        }
        max.push(gauge(&labels, sum(|l| l.accept_queue_max)));
        drops.push(counter(&labels, sum(|l| l.drops) as u64));
        let sending = list.iter().any(|l| {
            report
                .jiffies
                .seconds_between(l.overflow_stamp, view.snapshot.summary.jiffies)
                .is_some_and(|s| s < COOKIES_WITHIN_S)
        });
        cookies.push(gauge(&labels, if sending { 1.0 } else { 0.0 }));
    }
    families.gauges(
        "handshake_tcp_listen_queue_length",
        "Connections waiting for accept() (queue=accept, ss's Recv-Q) and request sockets waiting for the final ACK (queue=syn), per listening port, at the last census; the --listener-top longest queues, then most drops.",
        length,
    );
    families.gauges(
        "handshake_tcp_listen_queue_max",
        "The accept queue's limit (the listen() backlog, capped by somaxconn; ss's Send-Q).",
        max,
    );
    families.counters(
        "handshake_tcp_listen_drops_total",
        "Packets the listener dropped (its sk_drops, ss's skmem d): SYNs and final ACKs refused by a full queue, among others.",
        drops,
    );
    families.gauges(
        "handshake_tcp_listen_syn_cookies",
        "1 while the listener answers SYNs with cookies (its SYN queue, or its reuseport group's, overflowed in the last 2 s).",
        cookies,
    );
    handshake_drop_families(report, families);
    netstat_families(report, families);
}

/// Dropped handshake packets per namespace, port, packet and reason, the
/// `listener_top` busiest (namespace, port) pairs by name and the rest as
/// port `other`.
fn handshake_drop_families(report: &Report<'_>, families: &mut Families) {
    let name_of = |inode: u32| {
        report
            .census
            .iter()
            .find(|v| v.inode == u64::from(inode))
            .map_or_else(|| format!("ns:{inode}"), |v| v.name.clone())
    };
    let mut per_port: BTreeMap<(u32, u16), u64> = BTreeMap::new();
    for (key, count) in &report.counts.drops {
        *per_port.entry((key.netns, key.port)).or_default() += count;
    }
    let mut ranked: Vec<((u32, u16), u64)> = per_port.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(report.listener_top);
    let named: Vec<(u32, u16)> = ranked.into_iter().map(|(k, _)| k).collect();
    let mut series: BTreeMap<(String, String, &str, String), u64> = BTreeMap::new();
    for (key, count) in &report.counts.drops {
        let port = if named.contains(&(key.netns, key.port)) {
            key.port.to_string()
        } else {
            "other".to_owned()
        };
        let packet = match key.packet {
            PACKET_SYN => "syn",
            PACKET_SYN_ACK => "syn_ack",
            PACKET_ACK => "ack",
            _ => "other",
        };
        let reason = report
            .reasons
            .get(&key.reason)
            .cloned()
            .unwrap_or_else(|| format!("reason_{}", key.reason));
        *series
            .entry((name_of(key.netns), port, packet, reason))
            .or_default() += count;
    }
    families.counters(
        "handshake_tcp_handshake_drops_total",
        "Handshake packets the kernel dropped (skb:kfree_skb), by namespace, server port, packet (syn, syn_ack, and ack: a pure ACK a listener received, the final ACK) and the kernel's drop reason (no_socket: a closed port, the refusal; tcp_listen_overflow; tcp_flags; netfilter_drop...). A SYN a full listener drops is not freed as a drop: see handshake_tcp_listen_drops_total.",
        series
            .iter()
            .map(|((netns, port, packet, reason), n)| {
                counter(
                    &[
                        ("netns", netns),
                        ("port", port),
                        ("packet", packet),
                        ("reason", reason),
                    ],
                    *n,
                )
            })
            .collect(),
    );
    families.counter(
        "handshake_drops_uncounted_total",
        "Dropped packets the kfree_skb program could not count: headers it could not read, or its table full.",
        report.flow_stats.drop_parse_failures + report.flow_stats.handshake_drops_full,
    );
}

/// Each namespace's listen-queue counters from its `/proc/net/netstat`
/// (`nstat`'s TcpExt), at its last census; namespaces as the other
/// per-namespace series label them.
fn netstat_families(report: &Report<'_>, families: &mut Families) {
    let mut overflows = Vec::new();
    let mut listen_drops = Vec::new();
    let mut full = Vec::new();
    let mut syncookies = Vec::new();
    for (netns, views) in netns_groups(report.census, report.netns_top) {
        let sum =
            |f: fn(&Netstat) -> u64| views.iter().map(|v| f(&v.snapshot.netstat)).sum::<u64>();
        overflows.push(counter(&[("netns", netns)], sum(|n| n.listen_overflows)));
        listen_drops.push(counter(&[("netns", netns)], sum(|n| n.listen_drops)));
        full.push(counter(
            &[("netns", netns), ("action", "drop")],
            sum(|n| n.req_q_full_drop),
        ));
        full.push(counter(
            &[("netns", netns), ("action", "cookie")],
            sum(|n| n.req_q_full_do_cookies),
        ));
        for (what, value) in [
            ("sent", sum(|n| n.syncookies_sent)),
            ("recv", sum(|n| n.syncookies_recv)),
            ("failed", sum(|n| n.syncookies_failed)),
        ] {
            syncookies.push(counter(&[("netns", netns), ("what", what)], value));
        }
    }
    families.counters(
        "handshake_tcp_listen_overflows_total",
        "ListenOverflows of the namespace: a full accept queue refused a SYN or a final ACK.",
        overflows,
    );
    families.counters(
        "handshake_tcp_listen_netns_drops_total",
        "ListenDrops of the namespace: every drop at a listener, overflows included.",
        listen_drops,
    );
    families.counters(
        "handshake_tcp_syn_queue_full_total",
        "A full SYN queue dropped a SYN (action=drop: TCPReqQFullDrop) or answered it with a cookie (action=cookie: TCPReqQFullDoCookies).",
        full,
    );
    families.counters(
        "handshake_tcp_syncookies_total",
        "SYN cookies sent, received valid, and failed (SyncookiesSent, SyncookiesRecv, SyncookiesFailed).",
        syncookies,
    );
}

/// TIME_WAIT: sockets held, entries, and the port-exhaustion forecast.
fn time_wait_families(report: &Report<'_>, families: &mut Families) {
    let mut time_wait = Vec::new();
    let mut exhaustion = Vec::new();
    let mut entries_rate = Vec::new();
    for (netns, views) in netns_groups(report.census, report.netns_top) {
        let netns = [("netns", netns)];
        let held: u64 = views.iter().map(|v| v.time_wait()).sum();
        time_wait.push(gauge(&netns, held as f64));
        let soonest = views
            .iter()
            .filter_map(|v| v.forecast().first().and_then(|f| f.seconds_to_exhaustion))
            .fold(f64::INFINITY, f64::min);
        exhaustion.push(gauge(&netns, soonest));
        let rate: f64 = views.iter().filter_map(|v| v.entries_per_second()).sum();
        entries_rate.push(gauge(&netns, rate));
    }
    families.gauges(
        "handshake_tcp_time_wait_entries_per_second",
        "Sockets entering TIME_WAIT per second, per namespace, over the last seconds.",
        entries_rate,
    );
    families.gauges(
        "handshake_tcp_time_wait_sockets",
        "Sockets in TIME_WAIT at the last census.",
        time_wait,
    );
    families.gauges(
        "handshake_tcp_ephemeral_port_exhaustion_seconds",
        "Seconds until the destination soonest to run out of local ports (ip_local_port_range against the TIME_WAIT sockets held towards it and their growth) has none free; +Inf when none is heading there.",
        exhaustion,
    );
    let entries = report
        .counts
        .transitions
        .iter()
        .filter(|&&(from, to, _)| {
            to == tcp_state::CLOSE && (from == tcp_state::FIN_WAIT2 || from == tcp_state::CLOSING)
        })
        .map(|&(_, _, count)| count)
        .sum();
    families.counter(
        "handshake_tcp_time_wait_entries_total",
        "Sockets that entered TIME_WAIT, host-wide: FIN_WAIT2 or CLOSING -> CLOSE as sock:inet_sock_set_state reports it (a minisock takes over).",
        entries,
    );
}

#[cfg(test)]
mod tests {
    use handshake_common::abi::{Direction, PacketKind, ParseError};

    use super::*;
    use crate::model::conntrack::{Histogram, Phase};

    /// A namespace's view with `established` IPv4 sockets.
    fn view(name: &str, inode: u64, established: u64) -> NetnsView {
        let mut sockets = [[0; 16]; 2];
        sockets[0][tcp_state::ESTABLISHED as usize] = established;
        let snapshot = crate::kernel::census::NetnsCensus {
            summary: handshake_common::abi::census::Summary {
                sockets,
                ..Default::default()
            },
            sockets: Vec::new(),
            tw_remote: Vec::new(),
            tw_local: Vec::new(),
            port_range: (32768, 60999),
            listeners: Vec::new(),
            netstat: Default::default(),
            syncookies: false,
            duration: std::time::Duration::from_millis(3),
        };
        NetnsView::new(name, inode, snapshot, 0, 0)
    }

    #[test]
    fn the_busiest_namespaces_get_a_label_and_the_rest_sum_into_other() {
        let census = [
            view("host", 1, 5),
            view("a", 2, 50),
            view("ns:3", 3, 1),
            view("b", 4, 7),
        ];
        let groups = netns_groups(&census, 2);
        let names: Vec<&str> = groups.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["a", "b", "other"]);
        let text = render(&Report {
            counts: &KernelCounts::default(),
            attachments: &[],
            totals: &Totals::default(),
            live: &[],
            flow_stats: FlowStats::default(),
            self_stats: SelfStats::default(),
            malformed_records: 0,
            half_open_top: 5,
            census: &census,
            netns_top: 2,
            listener_top: 20,
            jiffies: &JiffyClock::default(),
            reasons: &BTreeMap::new(),
            closes: &CloseTotals::default(),
            tls: &TlsTotals::default(),
        });
        let established = |ns: &str| {
            format!("handshake_tcp_sockets{{netns=\"{ns}\",state=\"established\",family=\"ipv4\"}}")
        };
        for (ns, count) in [("a", 50), ("b", 7), ("other", 6)] {
            let line = format!("{} {count}", established(ns));
            assert!(text.lines().any(|l| l == line), "missing {line:?}");
        }
        assert!(!text.contains(&established("host")));
        // Every namespace gets a label when there are few.
        assert_eq!(netns_groups(&census, 20).len(), 4);
    }

    #[test]
    fn empty_families_are_left_out_not_fatal() {
        let text = render(&Report {
            counts: &KernelCounts::default(),
            attachments: &[],
            totals: &Totals::default(),
            live: &[],
            flow_stats: FlowStats::default(),
            self_stats: SelfStats::default(),
            malformed_records: 0,
            half_open_top: 5,
            census: &[],
            netns_top: 20,
            listener_top: 20,
            jiffies: &JiffyClock::default(),
            reasons: &BTreeMap::new(),
            closes: &CloseTotals::default(),
            tls: &TlsTotals::default(),
        });
        assert!(text.contains("handshake_packets_total{"));
        assert!(!text.contains("handshake_tcp_state_transitions_total"));
        assert!(!text.contains("handshake_tcp_half_open"));
    }

    #[test]
    fn renders_every_series_with_bounded_labels() {
        let mut counts = KernelCounts::default();
        counts.packets[Direction::Egress as usize][PacketKind::SynAck as usize] = 7;
        counts.parse_errors[ParseError::TcpBadDataOffset as usize] = 2;
        counts.transitions = vec![(tcp_state::SYN_SENT, tcp_state::ESTABLISHED, 5)];
        let attachments = [Attachment {
            probe: "xdp_handshake",
            interface: Some("eth0".to_owned()),
            netns: Some("host".to_owned()),
            detail: "xdp-native".to_owned(),
            attached: true,
        }];
        let mut totals = Totals::default();
        let mut h = Histogram::default();
        h.observe(0.000_03);
        totals
            .durations
            .insert((Role::Server, Phase::SynToSynAck), h);
        totals
            .handshakes
            .insert((Role::Client, Outcome::Refused), 3);
        let live = [Flow {
            role: ROLE_SERVER,
            ts_syn: 1,
            ts_synack: 2,
            server_port: 8080,
            ..Flow::default()
        }];
        let text = render(&Report {
            counts: &counts,
            attachments: &attachments,
            totals: &totals,
            live: &live,
            flow_stats: FlowStats::default(),
            self_stats: SelfStats {
                map_read_errors: 1,
                events_malformed: 0,
                census_errors: 0,
                tls_events_malformed: 0,
                sock_records_lost: 0,
                census_interval_s: 1.0,
                ..SelfStats::default()
            },
            malformed_records: 0,
            half_open_top: 5,
            census: &[],
            netns_top: 20,
            listener_top: 20,
            jiffies: &JiffyClock::default(),
            reasons: &BTreeMap::new(),
            closes: &CloseTotals::default(),
            tls: &TlsTotals::default(),
        });
        for line in [
            "handshake_packets_total{direction=\"egress\",kind=\"syn_ack\"} 7",
            "handshake_packets_total{direction=\"ingress\",kind=\"client_hello\"} 0",
            "handshake_parse_errors_total{kind=\"tcp_bad_data_offset\"} 2",
            "handshake_tcp_state_transitions_total{from=\"syn_sent\",to=\"established\"} 5",
            "handshake_probe_attached{probe=\"xdp_handshake\",interface=\"eth0\",netns=\"host\",mode=\"xdp-native\"} 1",
            "handshake_map_read_errors_total 1",
            "# TYPE handshake_packets_total counter",
            "handshake_tcp_handshakes_total{role=\"client\",outcome=\"refused\"} 3",
            "handshake_tcp_handshakes_total{role=\"server\",outcome=\"timeout\"} 0",
            "handshake_tcp_handshake_duration_seconds_bucket{role=\"server\",phase=\"syn_to_synack\",le=\"0.00005\"} 1",
            "handshake_tcp_handshake_duration_seconds_bucket{role=\"server\",phase=\"syn_to_synack\",le=\"0.00002\"} 0",
            "handshake_tcp_handshake_duration_seconds_count{role=\"client\",phase=\"connect\"} 0",
            "handshake_tcp_half_open{port=\"8080\"} 1",
            "handshake_map_evictions_total{map=\"half_open\"} 0",
            "handshake_ringbuf_dropped_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert_eq!(text.matches("handshake_packets_total{").count(), 12);
    }
}
