//! `handshake watch`: a full-screen view refreshed each interval. Each
//! refresh asks the daemon for its metrics text and its recent
//! connections over the API socket (no TCP connection, which the daemon
//! would count), and turns two samples into a [`Frame`]: rates are the
//! counters' growth between them, latency percentiles come from the
//! histogram buckets that grew. The frame is plain data, drawn with
//! ratatui, or printed as JSON with `--json`. A daemon that goes away is
//! said on screen and asked again at the next refresh.

use std::{
    collections::BTreeMap,
    io::IsTerminal as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Table},
};
use serde::Serialize;

use crate::{
    cli::{WatchFlags, client, config::parse_duration},
    wire::{ConnView, Request},
};

/// One sample of the metrics: series (name and sorted labels) to value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample(BTreeMap<(String, Vec<(String, String)>), f64>);

impl Sample {
    /// Reads Prometheus text format; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Self {
        let mut series = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (head, value) = match line.rfind('}') {
                Some(end) => (&line[..=end], line[end + 1..].trim()),
                None => match line.split_once(' ') {
                    Some((name, value)) => (name, value.trim()),
                    None => continue,
                },
            };
            let value = match value.split_whitespace().next().map(str::parse::<f64>) {
                Some(Ok(v)) => v,
                _ => continue,
            };
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => (name, labels(rest.trim_end_matches('}'))),
                None => (head, Vec::new()),
            };
            series.insert((name.to_owned(), labels), value);
        }
        Self(series)
    }

    /// Series (name, labels sorted by name) to value.
    pub fn into_series(self) -> BTreeMap<(String, Vec<(String, String)>), f64> {
        self.0
    }

    /// Every series of `name` whose labels include `with`.
    fn series<'a>(
        &'a self,
        name: &'a str,
        with: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a [(String, String)], f64)> + 'a {
        self.0
            .iter()
            .filter(move |((n, labels), _)| {
                n == name
                    && with
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|((_, labels), value)| (labels.as_slice(), *value))
    }

    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.series(name, with).map(|(_, v)| v).sum()
    }
}

/// `a="x",b="y\"z"` as pairs, sorted by name.
fn labels(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        pairs.push((name.trim_matches([',', ' ']).to_owned(), value));
        rest = &after[end..];
    }
    pairs.sort();
    pairs
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// What one refresh shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Frame {
    /// Seconds between the two samples the rates come from.
    pub interval_s: f64,
    /// Decided handshakes per second by outcome (both roles).
    pub handshakes_per_second: BTreeMap<String, f64>,
    /// Per role and phase: p50, p90, p99 in milliseconds, over the
    /// interval, or since the start when none was decided in it.
    pub latency_ms: Vec<PhaseLatency>,
    /// The slowest handshakes among the recent ones.
    pub slowest: Vec<ConnLine>,
    /// The most recent handshakes that did not establish.
    pub failing: Vec<ConnLine>,
    /// Listening ports with the longest queues at the last census.
    pub listeners: Vec<ListenerLine>,
    pub time_wait: f64,
    /// Seconds to ephemeral-port exhaustion, the soonest namespace;
    /// `None` when none is heading there.
    pub exhaustion_s: Option<f64>,
    /// TLS handshakes by negotiated version, since the start.
    pub tls_versions: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PhaseLatency {
    pub role: String,
    pub phase: String,
    pub count: f64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConnLine {
    pub role: String,
    pub outcome: String,
    pub remote: String,
    pub local_port: u16,
    /// The handshake's own time: connect (client) or SYN to ACK (server).
    pub ms: Option<f64>,
    pub age_s: f64,
    pub netns: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ListenerLine {
    pub netns: String,
    pub port: String,
    pub accept: f64,
    pub syn: f64,
    pub max: f64,
}

const HANDSHAKES: &str = "handshake_tcp_handshakes_total";
const DURATIONS: &str = "handshake_tcp_handshake_duration_seconds";
/// The recent connections a refresh looks at for the slowest and failing.
const WATCHED: usize = 2_000;

/// Listeners shown.
const ROWS: usize = 8;
/// Slowest and failing connections kept; the screen shows what fits.
const CONN_ROWS: usize = 30;

impl Frame {
    pub fn build(before: &Sample, now: &Sample, conns: &[ConnView], interval_s: f64) -> Self {
        let per_second = interval_s.max(1e-3);
        let mut handshakes_per_second = BTreeMap::new();
        for (labels, value) in now.series(HANDSHAKES, &[]) {
            let outcome = label(labels, "outcome").to_owned();
            let was = before.sum(
                HANDSHAKES,
                &[("role", label(labels, "role")), ("outcome", &outcome)],
            );
            *handshakes_per_second.entry(outcome).or_insert(0.0) +=
                (value - was).max(0.0) / per_second;
        }
        let latency_ms = [
            ("client", "connect"),
            ("server", "syn_to_synack"),
            ("server", "synack_to_ack"),
        ]
        .iter()
        .map(|(role, phase)| latency(before, now, role, phase))
        .collect();

        let line = |c: &ConnView| ConnLine {
            role: c.role.clone(),
            outcome: c.outcome.clone(),
            remote: format!("{}:{}", c.remote_addr, c.remote_port),
            local_port: c.local_port,
            ms: handshake_us(c).map(|us| us / 1e3),
            age_s: c.age_s,
            netns: c.attribution.netns.clone(),
        };
        let mut slowest: Vec<&ConnView> =
            conns.iter().filter(|c| handshake_us(c).is_some()).collect();
        slowest.sort_by(|a, b| {
            handshake_us(b)
                .partial_cmp(&handshake_us(a))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut failing: Vec<&ConnView> = conns
            .iter()
            .filter(|c| !matches!(c.outcome.as_str(), "established" | "in_progress"))
            .collect();
        failing.sort_by(|a, b| {
            a.age_s
                .partial_cmp(&b.age_s)
                .unwrap_or(std::cmp::Ordering::Equal)
        });

        let mut listeners: Vec<ListenerLine> = now
            .series("handshake_tcp_listen_queue_max", &[])
            .map(|(labels, max)| {
                let (netns, port) = (label(labels, "netns"), label(labels, "port"));
                let queue = |q: &str| {
                    now.sum(
                        "handshake_tcp_listen_queue_length",
                        &[("netns", netns), ("port", port), ("queue", q)],
                    )
                };
                ListenerLine {
                    netns: netns.to_owned(),
                    port: port.to_owned(),
                    accept: queue("accept"),
                    syn: queue("syn"),
                    max,
                }
            })
            .collect();
        listeners.sort_by(|a, b| {
            (b.accept + b.syn)
                .partial_cmp(&(a.accept + a.syn))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        listeners.truncate(ROWS);

        let exhaustion = now
            .series("handshake_tcp_ephemeral_port_exhaustion_seconds", &[])
            .map(|(_, v)| v)
            .fold(f64::INFINITY, f64::min);
        let mut tls_versions = BTreeMap::new();
        for (labels, value) in now.series("handshake_tls_handshakes_total", &[]) {
            *tls_versions
                .entry(label(labels, "version").to_owned())
                .or_insert(0.0) += value;
        }
        Self {
            interval_s,
            handshakes_per_second,
            latency_ms,
            slowest: slowest.into_iter().take(CONN_ROWS).map(line).collect(),
            failing: failing.into_iter().take(CONN_ROWS).map(line).collect(),
            listeners,
            time_wait: now.sum("handshake_tcp_time_wait_sockets", &[]),
            exhaustion_s: exhaustion.is_finite().then_some(exhaustion),
            tls_versions,
        }
    }
}

fn handshake_us(c: &ConnView) -> Option<f64> {
    match (c.connect_us, c.syn_to_synack_us, c.synack_to_ack_us) {
        (Some(connect), _, _) => Some(connect),
        (None, Some(a), Some(b)) => Some(a + b),
        _ => None,
    }
}

/// Percentiles of one phase from the buckets that grew between the
/// samples, or from all of them when none did.
fn latency(before: &Sample, now: &Sample, role: &str, phase: &str) -> PhaseLatency {
    let with = [("role", role), ("phase", phase)];
    let buckets = |s: &Sample| -> Vec<(f64, f64)> {
        let mut b: Vec<(f64, f64)> = s
            .series(&format!("{DURATIONS}_bucket"), &with)
            .filter_map(|(labels, count)| {
                let le = label(labels, "le");
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, count))
            })
            .collect();
        b.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap_or(std::cmp::Ordering::Equal));
        b
    };
    let (now_b, before_b) = (buckets(now), buckets(before));
    let grown: Vec<(f64, f64)> = now_b
        .iter()
        .map(|(le, n)| {
            let was = before_b
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - was)
        })
        .collect();
    let recent = grown.last().is_some_and(|(_, n)| *n > 0.0);
    let used = if recent { grown } else { now_b };
    let count = used.last().map_or(0.0, |(_, n)| *n);
    let q = |q: f64| quantile(&used, q).map(|s| s * 1e3);
    PhaseLatency {
        role: role.to_owned(),
        phase: phase.to_owned(),
        count,
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
    }
}

/// `histogram_quantile`'s linear interpolation over cumulative buckets.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// Two samples one interval apart, and the connections now.
fn sample(socket: &Path) -> anyhow::Result<(Sample, Vec<ConnView>)> {
    let metrics = client::request(socket, Request::Metrics)?;
    // The newest only: the whole history (65,536 rows by default) each
    // second would keep the daemon busy building JSON.
    let conns: Vec<ConnView> = client::fetch(
        socket,
        Request::Conns {
            newest: Some(WATCHED),
        },
    )?;
    Ok((Sample::parse(&metrics), conns))
}

pub fn run(flags: &WatchFlags) -> anyhow::Result<()> {
    let interval = parse_duration(&flags.interval).with_context(|| {
        format!(
            "--interval {:?} is not a duration such as 1s",
            flags.interval
        )
    })?;
    if flags.json {
        let (before, _) = sample(&flags.api_socket)?;
        let started = Instant::now();
        std::thread::sleep(interval);
        let (now, conns) = sample(&flags.api_socket)?;
        let frame = Frame::build(&before, &now, &conns, started.elapsed().as_secs_f64());
        println!("{}", serde_json::to_string_pretty(&frame)?);
        return Ok(());
    }
    if !std::io::stdout().is_terminal() {
        bail!("watch needs a terminal; `handshake watch --json` prints one frame");
    }
    let mut terminal = ratatui::init();
    let result = watch_loop(&mut terminal, &flags.api_socket, interval);
    ratatui::restore();
    result
}

fn watch_loop(
    terminal: &mut ratatui::DefaultTerminal,
    socket: &Path,
    interval: Duration,
) -> anyhow::Result<()> {
    let mut previous: Option<(Sample, Instant)> = None;
    let mut frame = Frame::default();
    loop {
        let problem = match sample(socket) {
            Ok((now, conns)) => {
                let at = Instant::now();
                let (before, elapsed) = match &previous {
                    Some((s, t)) => (s.clone(), at.duration_since(*t).as_secs_f64()),
                    None => (now.clone(), interval.as_secs_f64()),
                };
                frame = Frame::build(&before, &now, &conns, elapsed);
                previous = Some((now, at));
                None
            }
            Err(error) => {
                // Rates restart from the next answer: a new daemon's
                // counters start again.
                previous = None;
                Some(format!("(asking again every {interval:.1?}) {error:#}"))
            }
        };
        terminal.draw(|f| draw(f, &frame, problem.as_deref(), socket))?;
        let deadline = Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                    return Ok(());
                }
            }
        }
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

/// A bordered table titled `title`: a bold header of the columns' names,
/// the columns' widths, one row of cells each.
fn table<'a>(
    title: &'a str,
    columns: &[(&'a str, Constraint)],
    rows: impl Iterator<Item = Vec<String>>,
) -> Table<'a> {
    let header = Row::new(columns.iter().map(|(name, _)| *name))
        .style(Style::default().add_modifier(Modifier::BOLD));
    Table::new(rows.map(Row::new), columns.iter().map(|(_, width)| *width))
        .header(header)
        .block(Block::default().borders(Borders::ALL).title(title))
}

fn draw(f: &mut ratatui::Frame<'_>, frame: &Frame, problem: Option<&str>, socket: &Path) {
    use Constraint::{Length, Min};
    let [top, middle, bottom, footer] =
        Layout::vertical([Length(6), Min(6), Length(ROWS as u16 + 3), Length(1)]).areas(f.area());
    let [rates, latency] =
        Layout::horizontal([Constraint::Percentage(35), Constraint::Percentage(65)]).areas(top);
    let [slowest, failing] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(middle);
    let [listeners, host] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);

    let rate_lines: Vec<Line<'_>> = frame
        .handshakes_per_second
        .iter()
        .map(|(outcome, r)| Line::from(format!("{outcome:<12} {r:>9.1}/s")))
        .collect();
    f.render_widget(
        Paragraph::new(rate_lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title("Handshakes per second"),
        ),
        rates,
    );
    let rows = frame.latency_ms.iter().map(|p| {
        vec![
            p.role.clone(),
            p.phase.clone(),
            format!("{:.0}", p.count),
            ms(p.p50_ms),
            ms(p.p90_ms),
            ms(p.p99_ms),
        ]
    });
    let columns = [
        ("ROLE", Length(7)),
        ("PHASE", Length(14)),
        ("N", Length(8)),
        ("P50 ms", Length(8)),
        ("P90 ms", Length(8)),
        ("P99 ms", Length(8)),
    ];
    f.render_widget(table("Phase latency", &columns, rows), latency);
    let conn_table = |lines: &[ConnLine], title: &'static str| {
        let rows = lines.iter().map(|c| {
            vec![
                c.role.clone(),
                c.outcome.clone(),
                c.remote.clone(),
                c.local_port.to_string(),
                ms(c.ms),
                format!("{:.0}", c.age_s),
            ]
        });
        let columns = [
            ("ROLE", Length(6)),
            ("OUTCOME", Length(11)),
            ("REMOTE", Min(16)),
            ("PORT", Length(6)),
            ("MS", Length(9)),
            ("AGE s", Length(6)),
        ];
        table(title, &columns, rows)
    };
    f.render_widget(conn_table(&frame.slowest, "Slowest recent"), slowest);
    f.render_widget(conn_table(&frame.failing, "Failing recent"), failing);
    let rows = frame.listeners.iter().map(|l| {
        vec![
            l.netns.clone(),
            l.port.clone(),
            format!("{:.0}", l.accept),
            format!("{:.0}", l.syn),
            format!("{:.0}", l.max),
        ]
    });
    let columns = [
        ("NETNS", Min(10)),
        ("PORT", Length(6)),
        ("ACCEPT", Length(7)),
        ("SYN", Length(6)),
        ("MAX", Length(6)),
    ];
    f.render_widget(table("Listen queues", &columns, rows), listeners);
    let mut lines = vec![
        Line::from(format!("TIME_WAIT        {:.0}", frame.time_wait)),
        Line::from(format!(
            "ports exhausted  {}",
            frame.exhaustion_s.map_or_else(
                || "not heading there".to_owned(),
                |s| format!("in {s:.0} s")
            )
        )),
        Line::from("TLS versions:"),
    ];
    lines.extend(
        frame
            .tls_versions
            .iter()
            .map(|(v, n)| Line::from(format!("  {v:<10} {n:>8.0}"))),
    );
    f.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title("TIME_WAIT and TLS"),
        ),
        host,
    );
    let status = match problem {
        Some(problem) => format!(" daemon not answering: {problem}"),
        None => format!(
            " {} · every {:.1} s · q quits",
            socket.display(),
            frame.interval_s
        ),
    };
    f.render_widget(Paragraph::new(status), footer);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP x
handshake_tcp_handshakes_total{role="client",outcome="established"} 10
handshake_tcp_handshakes_total{role="server",outcome="established"} 10
handshake_tcp_handshakes_total{role="client",outcome="refused"} 0
handshake_tcp_handshake_duration_seconds_bucket{role="client",phase="connect",le="0.001"} 10
handshake_tcp_handshake_duration_seconds_bucket{role="client",phase="connect",le="0.01"} 10
handshake_tcp_handshake_duration_seconds_bucket{role="client",phase="connect",le="+Inf"} 10
"#;
    const NOW: &str = r#"handshake_tcp_handshakes_total{role="client",outcome="established"} 30
handshake_tcp_handshakes_total{role="server",outcome="established"} 30
handshake_tcp_handshakes_total{role="client",outcome="refused"} 4
handshake_tcp_handshake_duration_seconds_bucket{role="client",phase="connect",le="0.001"} 10
handshake_tcp_handshake_duration_seconds_bucket{role="client",phase="connect",le="0.01"} 30
handshake_tcp_handshake_duration_seconds_bucket{role="client",phase="connect",le="+Inf"} 30
handshake_tcp_listen_queue_max{netns="host",port="80"} 128
handshake_tcp_listen_queue_length{netns="host",port="80",queue="accept"} 7
handshake_tcp_listen_queue_length{netns="host",port="80",queue="syn"} 1
handshake_tcp_time_wait_sockets{netns="host"} 40
handshake_tcp_time_wait_sockets{netns="other"} 2
handshake_tcp_ephemeral_port_exhaustion_seconds{netns="host"} +Inf
handshake_tls_handshakes_total{role="client",version="TLS 1.3"} 3
handshake_tls_handshakes_total{role="server",version="TLS 1.3"} 3
"#;

    #[test]
    fn labels_with_escapes() {
        let s = Sample::parse("m{a=\"x\\\"y\",b=\"1,2\"} 5\nplain 2\n");
        assert_eq!(s.sum("m", &[("a", "x\"y"), ("b", "1,2")]), 5.0);
        assert_eq!(s.sum("plain", &[]), 2.0);
    }

    #[test]
    fn a_frame_from_two_samples() {
        let frame = Frame::build(&Sample::parse(BEFORE), &Sample::parse(NOW), &[], 2.0);
        assert_eq!(frame.handshakes_per_second["established"], 20.0);
        assert_eq!(frame.handshakes_per_second["refused"], 2.0);
        let connect = &frame.latency_ms[0];
        // The 20 new handshakes all fell in (1 ms, 10 ms]: the median is
        // halfway through that bucket.
        assert_eq!(connect.count, 20.0);
        assert!((connect.p50_ms.unwrap() - 5.5).abs() < 1e-9, "{connect:?}");
        assert_eq!(frame.listeners[0].accept, 7.0);
        assert_eq!(frame.listeners[0].max, 128.0);
        assert_eq!(frame.time_wait, 42.0);
        assert_eq!(frame.exhaustion_s, None);
        assert_eq!(frame.tls_versions["TLS 1.3"], 6.0);
    }

    #[test]
    fn quantiles_as_prometheus_interpolates() {
        let buckets = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&buckets, 0.5), Some(0.1));
        assert!((quantile(&buckets, 0.75).unwrap() - 0.15).abs() < 1e-12);
        assert_eq!(quantile(&[], 0.5), None);
    }
}
