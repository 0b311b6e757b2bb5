//! Prometheus exposition: turns a counter [`Snapshot`] and the attach
//! results into text format. Pure: no maps, no I/O, so it is unit-tested
//! without a kernel. Values are read from the kernel at scrape time by the
//! caller, never cached.

use handshake_common::abi::{Direction, PacketKind, ParseError, tcp_state};
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{loader::Attachment, maps::Snapshot};

/// What the daemon itself counts, next to what the kernel counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfStats {
    /// Scrapes answered with an error because a map could not be read.
    pub map_read_errors: u64,
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

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
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

fn state_name(state: u32) -> String {
    tcp_state::name(state).map_or_else(|| format!("state_{state}"), str::to_owned)
}

/// Renders every family in Prometheus text format.
pub fn render(snapshot: &Snapshot, attachments: &[Attachment], stats: SelfStats) -> String {
    let mut families = Vec::new();

    let mut packets = Vec::new();
    for direction in Direction::ALL {
        for kind in PacketKind::ALL {
            packets.push(counter(
                &[("direction", direction.name()), ("kind", kind.name())],
                snapshot.packets(direction, kind),
            ));
        }
    }
    families.push(family(
        "handshake_packets_total",
        "TCP handshake and TLS hello packets seen by the packet hooks.",
        MetricType::COUNTER,
        packets,
    ));

    let errors = ParseError::ALL
        .iter()
        .map(|e| counter(&[("kind", e.name())], snapshot.parse_error(*e)))
        .collect();
    families.push(family(
        "handshake_parse_errors_total",
        "Frames the packet parser could not read, by reason; they were passed on untouched.",
        MetricType::COUNTER,
        errors,
    ));

    let transitions = snapshot
        .transitions
        .iter()
        .map(|&(from, to, count)| {
            counter(
                &[("from", &state_name(from)), ("to", &state_name(to))],
                count,
            )
        })
        .collect();
    families.push(family(
        "handshake_tcp_state_transitions_total",
        "TCP socket state changes reported by sock:inet_sock_set_state, IPv4 and IPv6.",
        MetricType::COUNTER,
        transitions,
    ));

    let probes = attachments
        .iter()
        .map(|a| {
            gauge(
                &[
                    ("probe", a.probe),
                    ("interface", a.interface.as_deref().unwrap_or("")),
                    ("mode", if a.attached { &a.detail } else { "" }),
                ],
                if a.attached { 1.0 } else { 0.0 },
            )
        })
        .collect();
    families.push(family(
        "handshake_probe_attached",
        "1 when the probe is attached (mode: xdp-native, xdp-skb, tcx, tc-clsact, tracepoint), 0 when attaching it failed (see the daemon's log).",
        MetricType::GAUGE,
        probes,
    ));

    families.push(family(
        "handshake_map_read_errors_total",
        "Scrapes that failed because a BPF map could not be read.",
        MetricType::COUNTER,
        vec![counter(&[], stats.map_read_errors)],
    ));

    let mut out = Vec::new();
    // Encoding families we built ourselves into a Vec cannot fail.
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("text encoding of well-formed families");
    String::from_utf8(out).expect("the text encoder writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_with_bounded_labels() {
        let mut snapshot = Snapshot::default();
        snapshot.packets[Direction::Egress as usize][PacketKind::SynAck as usize] = 7;
        snapshot.parse_errors[ParseError::TcpBadDataOffset as usize] = 2;
        snapshot.transitions = vec![(tcp_state::SYN_SENT, tcp_state::ESTABLISHED, 5)];
        let attachments = [Attachment {
            probe: "xdp_handshake",
            interface: Some("eth0".to_owned()),
            detail: "xdp-native".to_owned(),
            attached: true,
        }];
        let text = render(&snapshot, &attachments, SelfStats { map_read_errors: 1 });
        for line in [
            "handshake_packets_total{direction=\"egress\",kind=\"syn_ack\"} 7",
            "handshake_packets_total{direction=\"ingress\",kind=\"client_hello\"} 0",
            "handshake_parse_errors_total{kind=\"tcp_bad_data_offset\"} 2",
            "handshake_tcp_state_transitions_total{from=\"syn_sent\",to=\"established\"} 5",
            "handshake_probe_attached{probe=\"xdp_handshake\",interface=\"eth0\",mode=\"xdp-native\"} 1",
            "handshake_map_read_errors_total 1",
            "# TYPE handshake_packets_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert_eq!(text.matches("handshake_packets_total{").count(), 12);
    }
}
