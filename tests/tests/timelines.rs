//! Handshake timelines against real traffic between two namespaces, with a
//! daemon on each side (server role and client role): phase durations
//! compared connection by connection with tcpdump on the same veths, every
//! outcome provoked for real (a closed port, a server that resets, SYN-ACKs
//! dropped by nftables), and a burst of 20,000 connections.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use handshake_tests::{
    Capture, CapturedHandshake, NetnsPair, NftDrop, Packet, captured_handshakes, echo_clients,
    echo_server, median_p99, parse_capture, require_root, serial, sh, spawn_in,
};
use serde_json::Value;

fn v4(port: u16) -> SocketAddr {
    format!("{}:{port}", NetnsPair::SERVER_V4).parse().unwrap()
}

fn v6(port: u16) -> SocketAddr {
    format!("[{}]:{port}", NetnsPair::SERVER_V6)
        .parse()
        .unwrap()
}

/// The daemons' view of connections to `port`, by client (address, port).
fn by_client_port(conns: &[Value], role: &str, port: u16) -> BTreeMap<(String, u16), Vec<Value>> {
    let mut out: BTreeMap<(String, u16), Vec<Value>> = BTreeMap::new();
    for c in conns.iter().filter(|c| c["role"] == role) {
        let (local, remote) = (
            c["local_port"].as_u64().unwrap(),
            c["remote_port"].as_u64().unwrap(),
        );
        let client = match role {
            "server" if local == u64::from(port) => (&c["remote_addr"], remote),
            "client" if remote == u64::from(port) => (&c["local_addr"], local),
            _ => continue,
        };
        let addr = client.0.as_str().unwrap().to_owned();
        out.entry((addr, client.1 as u16))
            .or_default()
            .push(c.clone());
    }
    out
}

fn us(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a duration, got {v}"))
}

/// The span in µs between two packets of a capture.
fn wire_us(name: &str, from: Option<u64>, to: Option<u64>) -> f64 {
    let (Some(from), Some(to)) = (from, to) else {
        panic!("{name}: the capture lacks a packet of a handshake the daemon timed");
    };
    (to - from) as f64 / 1e3
}

/// Absolute differences in µs between the daemon's phase and the capture's.
fn compare(name: &str, pairs: impl Iterator<Item = (f64, Option<u64>, Option<u64>)>) -> Vec<f64> {
    let mut diffs = Vec::new();
    for (i, (daemon_us, from, to)) in pairs.enumerate() {
        let capture_us = wire_us(name, from, to);
        if (daemon_us - capture_us).abs() > 50.0 {
            println!(
                "{name}: handshake #{i}: daemon {daemon_us:.1} µs, tcpdump {capture_us:.1} µs"
            );
        }
        diffs.push((daemon_us - capture_us).abs());
    }
    summarize(name, &diffs);
    diffs
}

fn summarize(name: &str, diffs: &[f64]) {
    let (median, p99) = median_p99(&mut diffs.to_vec());
    println!(
        "{name}: {} handshakes, |daemon - tcpdump| median {median:.1} µs, p99 {p99:.1} µs, max {:.1} µs",
        diffs.len(),
        diffs.iter().copied().fold(0.0, f64::max)
    );
}

#[test]
fn phases_agree_with_tcpdump_on_both_roles() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let server = pair.server_daemon(&[]);
    let client = pair.client_daemon(&[]);
    let server_capture = Capture::start(&pair.server, &pair.server_if);
    let client_capture = Capture::start(&pair.client, &pair.client_if);

    let (n4, n6) = (60, 40);
    let s4 = echo_server(&pair.server, v4(8080), n4);
    echo_clients(&pair.client, v4(8080), n4);
    s4.join().expect("IPv4 server");
    let s6 = echo_server(&pair.server, v6(8080), n6);
    echo_clients(&pair.client, v6(8080), n6);
    s6.join().expect("IPv6 server");

    let server_packets = parse_capture(&server_capture.finish());
    let client_packets = parse_capture(&client_capture.finish());
    // Decided on first data; give the ring buffer's timer drain a moment.
    std::thread::sleep(Duration::from_millis(300));
    let server_view = by_client_port(&server.conns(&["--port", "8080"]), "server", 8080);
    let client_view = by_client_port(&client.conns(&["--port", "8080"]), "client", 8080);
    let server_seen = captured_handshakes(&server_packets, 8080);
    let client_seen = captured_handshakes(&client_packets, 8080);

    assert_eq!(
        server_seen.len(),
        n4 + n6,
        "connections in the server capture"
    );
    for (view, seen, role) in [
        (&server_view, &server_seen, "server"),
        (&client_view, &client_seen, "client"),
    ] {
        assert_eq!(
            view.keys().collect::<Vec<_>>(),
            seen.keys().collect::<Vec<_>>(),
            "{role} daemon: the same connections as its capture"
        );
        for (port, rows) in view {
            assert_eq!(
                rows.len(),
                1,
                "{role}: client {port:?} listed {} times",
                rows.len()
            );
            assert_eq!(rows[0]["outcome"], "established", "{role}: {}", rows[0]);
            assert_eq!(rows[0]["syn_retransmits"], 0);
        }
    }
    let families: Vec<&str> = server_view
        .values()
        .map(|r| r[0]["family"].as_str().unwrap())
        .collect();
    assert_eq!(families.iter().filter(|f| **f == "ipv6").count(), n6);

    let mut all = Vec::new();
    all.extend(compare(
        "server syn_to_synack",
        server_view.iter().map(|(p, r)| {
            (
                us(&r[0]["syn_to_synack_us"]),
                server_seen[p].syn,
                server_seen[p].syn_ack,
            )
        }),
    ));
    all.extend(compare(
        "server synack_to_ack",
        server_view.iter().map(|(p, r)| {
            (
                us(&r[0]["synack_to_ack_us"]),
                server_seen[p].syn_ack,
                server_seen[p].ack,
            )
        }),
    ));
    all.extend(compare(
        "client connect",
        client_view.iter().map(|(p, r)| {
            (
                us(&r[0]["connect_us"]),
                client_seen[p].syn,
                client_seen[p].syn_ack,
            )
        }),
    ));
    // Nearly every phase agrees within a few µs. Now and then some are off
    // by 100-250 µs, in either direction and in bursts: the hooks stamp a
    // packet when they run, tcpdump when the packet was queued (receive) or
    // with the stack's own departure stamp (send: seen as SYN-ACKs tcpdump
    // dates ~120 µs before tc egress saw them), and on this 2-vCPU VM the
    // work between the two is sometimes descheduled (seen in 1 run in 3 to
    // 6, up to 8 of 300 phases). So: the median within 10 µs, and at most
    // 5 % of phases past 50 µs, each printed above.
    agree("all phases", &all, 10.0);

    let metrics = server.scrape();
    assert_eq!(
        metrics.get(
            "handshake_tcp_handshakes_total",
            &[("role", "server"), ("outcome", "established")]
        ),
        (n4 + n6) as f64
    );
    assert_eq!(
        metrics.get(
            "handshake_tcp_handshake_duration_seconds_count",
            &[("role", "server"), ("phase", "synack_to_ack")]
        ),
        (n4 + n6) as f64
    );
    let client_metrics = client.scrape();
    assert_eq!(
        client_metrics.get(
            "handshake_tcp_handshake_duration_seconds_count",
            &[("role", "client"), ("phase", "connect")]
        ),
        (n4 + n6) as f64
    );
}

/// When a capture saw one packet of a handshake.
type PacketTime = fn(&CapturedHandshake) -> Option<u64>;

/// Closes `stream` with a RST (SO_LINGER 0) instead of a FIN.
fn close_with_reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a valid linger struct.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    drop(stream);
}

/// The daemon's metrics, after checking that they count `n` established
/// handshakes at each end.
fn established_at_both_ends(
    daemon: &handshake_tests::Daemon,
    n: usize,
) -> handshake_tests::Metrics {
    let m = daemon.scrape();
    for role in ["client", "server"] {
        assert_eq!(
            m.get(
                "handshake_tcp_handshakes_total",
                &[("role", role), ("outcome", "established")]
            ),
            n as f64,
            "{role}"
        );
    }
    m
}

/// The differences `all` (µs) between the daemon's phases and tcpdump's:
/// the median within `median_limit`, at most 5 % past 50 µs.
fn agree(name: &str, all: &[f64], median_limit: f64) {
    let (median, p99) = median_p99(&mut all.to_vec());
    let late = all.iter().filter(|d| **d > 50.0).count();
    println!("{name}: median {median:.1} µs, p99 {p99:.1} µs, {late} past 50 µs");
    assert!(
        median <= median_limit,
        "{name}: median |daemon - tcpdump| is {median:.1} µs"
    );
    assert!(
        late * 20 <= all.len(),
        "{name}: {late} of {} phases differ from tcpdump by more than 50 µs",
        all.len()
    );
}

/// nftables in `ns`: drop incoming SYN-ACKs from `port` while it lives.
fn drop_synacks(ns: &str, port: u16) -> NftDrop {
    NftDrop::input(
        ns,
        &format!("tcp sport {port} tcp flags & (syn | ack) == syn | ack"),
    )
}

/// One row of each daemon for the connection from client port `port`.
fn only_row(conns: &[Value], role: &str, server_port: u16) -> Value {
    let rows: Vec<&Value> = conns
        .iter()
        .filter(|c| {
            c["role"] == role && (c["local_port"] == server_port || c["remote_port"] == server_port)
        })
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "{role} rows for port {server_port}: {rows:?}"
    );
    rows[0].clone()
}

#[test]
fn refused_reset_and_timed_out_handshakes_on_both_roles() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let server = pair.server_daemon(&["--handshake-timeout", "2s"]);
    let client = pair.client_daemon(&["--handshake-timeout", "2s"]);
    let server_capture = Capture::start(&pair.server, &pair.server_if);
    let client_capture = Capture::start(&pair.client, &pair.client_if);
    let mut timeout_ports = Vec::new();

    for (family, addr) in [("ipv4", v4 as fn(u16) -> SocketAddr), ("ipv6", v6)] {
        let base = if family == "ipv4" { 9100 } else { 9200 };
        let (refused_port, reset_port, timeout_port) = (base + 1, base + 2, base + 3);
        timeout_ports.push(timeout_port);

        // Refused: nothing listens.
        let target = addr(refused_port);
        let error = spawn_in(&pair.client, move || {
            TcpStream::connect(target).unwrap_err()
        })
        .join()
        .unwrap();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);

        // Reset: the server accepts and closes with SO_LINGER 0 before any data.
        let target = addr(reset_port);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reset_server = spawn_in(&pair.server, move || {
            let listener = TcpListener::bind(target).expect("bind");
            ready_tx.send(()).unwrap();
            let (stream, _) = listener.accept().expect("accept");
            close_with_reset(stream);
        });
        ready_rx.recv().unwrap();
        spawn_in(&pair.client, move || {
            let mut stream = TcpStream::connect(target).expect("connect");
            let mut buf = [0u8; 1];
            let read = stream.read(&mut buf);
            assert!(read.is_err(), "expected a reset, read {read:?}");
        })
        .join()
        .unwrap();
        reset_server.join().unwrap();

        // Timeout: SYN-ACKs dropped in the client's namespace.
        let target = addr(timeout_port);
        let listener_ready = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = listener_ready;
        let timeout_server = spawn_in(&pair.server, move || {
            let listener = TcpListener::bind(target).expect("bind");
            ready_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_secs(4));
            drop(listener);
        });
        ready_rx.recv().unwrap();
        let rule = drop_synacks(&pair.client, timeout_port);
        let connecting = spawn_in(&pair.client, move || {
            TcpStream::connect_timeout(&target, Duration::from_millis(1500)).unwrap_err()
        });
        std::thread::sleep(Duration::from_millis(1200));
        let ss = sh(
            "ip",
            &[
                "netns",
                "exec",
                &pair.server,
                "ss",
                "-Htn",
                "state",
                "syn-recv",
                "sport",
                "=",
                &format!(":{timeout_port}"),
            ],
        );
        let syn_recv = ss.lines().filter(|l| !l.trim().is_empty()).count();
        let half_open = server.scrape().get(
            "handshake_tcp_half_open",
            &[("port", &timeout_port.to_string())],
        );
        assert_eq!(syn_recv, 1, "ss SYN-RECV while SYN-ACKs are dropped:\n{ss}");
        assert_eq!(half_open, syn_recv as f64, "half-open gauge vs ss");
        let error = connecting.join().unwrap();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        drop(rule);
        // The 2 s handshake timeout, plus a sweep.
        std::thread::sleep(Duration::from_millis(1400));
        timeout_server.join().unwrap();

        let server_conns = server.conns(&[]);
        let client_conns = client.conns(&[]);
        for (conns, role) in [(&server_conns, "server"), (&client_conns, "client")] {
            let refused = only_row(conns, role, refused_port);
            assert_eq!(refused["outcome"], "refused", "{family} {role}: {refused}");
            assert_eq!(refused["rst_from"], "server");
            assert_eq!(refused["family"], family);
            let reset = only_row(conns, role, reset_port);
            assert_eq!(reset["outcome"], "reset", "{family} {role}: {reset}");
            assert_eq!(reset["rst_from"], "server");
            let timeout = only_row(conns, role, timeout_port);
            assert_eq!(timeout["outcome"], "timeout", "{family} {role}: {timeout}");
        }
    }

    // Retransmissions against each side's capture. The daemons decide a
    // timed-out handshake 2 s after its first SYN (plus a sweep); no SYN or
    // SYN-ACK leaves within 0.5 s of that (retransmits go at 1 s and 3 s).
    let kernel_synack_rtx = server
        .scrape()
        .get("handshake_kernel_synack_retransmits_total", &[]);
    let server_packets = parse_capture(&server_capture.finish());
    let client_packets = parse_capture(&client_capture.finish());
    for (daemon, role, packets) in [
        (&server, "server", &server_packets),
        (&client, "client", &client_packets),
    ] {
        let conns = daemon.conns(&[]);
        filters_select_what_they_name(daemon, &conns);
        let (mut syn_rtx, mut synack_rtx) = (0, 0);
        for port in &timeout_ports {
            let (syns, synacks) = handshake_packets(packets, *port, 2_000_000_000);
            let row = only_row(&conns, role, *port);
            assert_eq!(row["syn_retransmits"], syns - 1, "{role}: {row}");
            assert_eq!(row["synack_retransmits"], synacks - 1, "{role}: {row}");
            syn_rtx += syns - 1;
            synack_rtx += synacks - 1;
        }
        assert!(
            syn_rtx > 0 && synack_rtx > 0,
            "{role}: nothing retransmitted"
        );
        let m = daemon.scrape();
        for outcome in ["refused", "reset", "timeout"] {
            assert_eq!(
                m.get(
                    "handshake_tcp_handshakes_total",
                    &[("role", role), ("outcome", outcome)]
                ),
                2.0,
                "{role} {outcome}"
            );
        }
        assert_eq!(
            m.get("handshake_tcp_syn_retransmits_total", &[("role", role)]),
            syn_rtx as f64,
            "{role}"
        );
        assert_eq!(
            m.get("handshake_tcp_synack_retransmits_total", &[("role", role)]),
            synack_rtx as f64,
            "{role}"
        );
    }
    // The kernel's own count covers every SYN-ACK the server resent, to
    // the end of the capture.
    let resent: u64 = timeout_ports
        .iter()
        .map(|port| handshake_packets(&server_packets, *port, u64::MAX).1 - 1)
        .sum();
    assert_eq!(kernel_synack_rtx, resent as f64, "tcp_retransmit_synack");
}

/// SYNs to `port` and SYN-ACKs from it in `packets`, within `window_ns`
/// of the first SYN.
fn handshake_packets(packets: &[Packet], port: u16, window_ns: u64) -> (u64, u64) {
    let first = packets
        .iter()
        .filter(|p| p.dst_port == port && p.flags == "S")
        .map(|p| p.ts_ns)
        .min()
        .unwrap_or_else(|| panic!("no SYN to port {port} in the capture"));
    let within = |p: &&Packet| p.ts_ns - first < window_ns;
    let count = |keep: &dyn Fn(&Packet) -> bool| {
        packets
            .iter()
            .filter(|p| p.ts_ns >= first)
            .filter(within)
            .filter(|p| keep(p))
            .count() as u64
    };
    (
        count(&|p| p.dst_port == port && p.flags == "S"),
        count(&|p| p.src_port == port && p.flags == "S."),
    )
}

#[test]
fn twenty_thousand_connections_each_reported_once() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let server = pair.server_daemon(&[]);
    let (n4, n6) = (12_000, 8_000);
    let s4 = echo_server(&pair.server, v4(8090), n4);
    let s6 = echo_server(&pair.server, v6(8090), n6);
    let c4 = {
        let ns = pair.client.clone();
        std::thread::spawn(move || echo_clients(&ns, v4(8090), n4))
    };
    echo_clients(&pair.client, v6(8090), n6);
    c4.join().expect("IPv4 clients");
    s4.join().expect("IPv4 server");
    s6.join().expect("IPv6 server");
    std::thread::sleep(Duration::from_millis(500));

    let view = by_client_port(&server.conns(&["--port", "8090"]), "server", 8090);
    // Each connection once: as many distinct client endpoints as
    // connections made, and one row for each.
    assert_eq!(
        view.len(),
        n4 + n6,
        "distinct connections in handshake conns"
    );
    let repeated: Vec<_> = view.iter().filter(|(_, rows)| rows.len() != 1).collect();
    assert!(repeated.is_empty(), "listed more than once: {repeated:?}");
    let m = server.scrape();
    assert_eq!(
        m.get(
            "handshake_tcp_handshakes_total",
            &[("role", "server"), ("outcome", "established")]
        ),
        (n4 + n6) as f64
    );
    assert_eq!(m.get("handshake_ringbuf_dropped_total", &[]), 0.0);
    assert_eq!(m.get("handshake_map_evictions_total", &[]), 0.0);
    assert_eq!(m.get("handshake_map_insert_failures_total", &[]), 0.0);
}

/// A SYN flood into a half-open table of 64: the flood's own entries are
/// evicted, exactly as many as did not fit, and counted; the real
/// handshakes that follow are all measured, and no completed handshake is
/// ever evicted.
#[test]
fn a_syn_flood_evicts_only_its_own_half_open_entries() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    const TABLE: usize = 64;
    const FLOOD: usize = 500;
    const REAL: usize = 50;
    let (flood_port, real_port) = (9300, 9301);
    let server = pair.server_daemon(&["--half-open-entries", &TABLE.to_string()]);
    let flood_listener = spawn_in(&pair.server, move || TcpListener::bind(v4(flood_port)))
        .join()
        .unwrap()
        .expect("bind the flooded port");
    // No SYN-ACK of the flooded port reaches a client socket: every SYN
    // leaves a half-open handshake behind.
    let rule = drop_synacks(&pair.client, flood_port);
    spawn_in(&pair.client, move || {
        for _ in 0..FLOOD {
            let attempt = TcpStream::connect_timeout(&v4(flood_port), Duration::from_millis(1));
            assert!(attempt.is_err(), "a flood connection completed");
        }
    })
    .join()
    .unwrap();
    let echo = echo_server(&pair.server, v4(real_port), REAL);
    echo_clients(&pair.client, v4(real_port), REAL);
    echo.join().unwrap();
    // Two sweeps (200 ms each) after the last packet.
    std::thread::sleep(Duration::from_millis(600));

    let rows = by_client_port(
        &server.conns(&["--port", &real_port.to_string()]),
        "server",
        real_port,
    );
    assert_eq!(rows.len(), REAL, "real handshakes measured");
    for (client, rows) in &rows {
        assert_eq!(rows.len(), 1, "{client:?}: {rows:?}");
        assert_eq!(rows[0]["outcome"], "established", "{}", rows[0]);
    }
    let m = server.scrape();
    let live = m.get(
        "handshake_tcp_half_open",
        &[("port", &flood_port.to_string())],
    );
    assert!(
        live as usize <= TABLE,
        "{live} half-open in a table of {TABLE}"
    );
    // Inserted: the flood and the real SYNs; left by the completing ACK:
    // the real ones; still there: `live`. The rest were evicted.
    let evicted = m.get("handshake_map_evictions_total", &[("map", "half_open")]);
    eprintln!("{FLOOD} flood SYNs into a table of {TABLE}: {live} left, {evicted} evicted");
    let (inserted, completed) = (FLOOD + REAL, REAL);
    assert_eq!(
        evicted,
        (inserted - completed) as f64 - live,
        "half-open evictions"
    );
    assert_eq!(
        m.get("handshake_map_evictions_total", &[("map", "flows")]),
        0.0
    );
    assert_eq!(m.get("handshake_ringbuf_dropped_total", &[]), 0.0);
    drop(rule);
    drop(flood_listener);
}

/// `conns --role` and `--outcome` list exactly the rows of the whole list
/// that carry that role or outcome (ages aside: they grow between calls).
fn filters_select_what_they_name(daemon: &handshake_tests::Daemon, all: &[Value]) {
    let without_age = |rows: Vec<Value>| -> Vec<Value> {
        rows.into_iter()
            .map(|mut row| {
                row.as_object_mut().expect("a JSON object").remove("age_s");
                row
            })
            .collect()
    };
    for (flag, value, field, json) in [
        ("--role", "client", "role", "client"),
        ("--role", "server", "role", "server"),
        ("--outcome", "refused", "outcome", "refused"),
        ("--outcome", "reset", "outcome", "reset"),
        ("--outcome", "timeout", "outcome", "timeout"),
        ("--outcome", "established", "outcome", "established"),
        ("--outcome", "in-progress", "outcome", "in_progress"),
    ] {
        let expected: Vec<Value> = all.iter().filter(|r| r[field] == json).cloned().collect();
        assert_eq!(
            without_age(daemon.conns(&[flag, value])),
            without_age(expected),
            "conns {flag} {value}"
        );
    }
}

/// The socket layer alone, in namespaces made after the daemon started and
/// that it was never pointed at (its packet hooks sit on the host's `lo`):
/// both ends of every connection, once each, with client `connect_us` and
/// server `synack_to_ack_us` against tcpdump on each end's veth and against
/// what the applications themselves measured.
#[test]
fn the_socket_layer_times_both_ends_in_namespaces_made_after_the_start() {
    require_root();
    let _serial = serial();
    let daemon = handshake_tests::Daemon::start(&["--iface", "lo"]);
    let pair = NetnsPair::new();
    let server_capture = Capture::start(&pair.server, &pair.server_if);
    let client_capture = Capture::start(&pair.client, &pair.client_if);
    let (n4, n6) = (60, 40);
    // When each client called connect (by its address), when connect
    // returned, and when the server's accept returned it.
    let mut called = BTreeMap::new();
    let mut connected = BTreeMap::new();
    let mut accepted = BTreeMap::new();
    let key = |a: SocketAddr| (a.ip().to_string(), a.port());
    for (addr, n) in [(v4(8081), n4), (v6(8081), n6)] {
        let server = echo_server(&pair.server, addr, n);
        for c in echo_clients(&pair.client, addr, n) {
            called.insert(key(c.local), c.called);
            connected.insert(key(c.local), c.returned);
        }
        for (client, at) in server.join().expect("echo server") {
            accepted.insert(key(client), at);
        }
    }
    let server_seen = captured_handshakes(&parse_capture(&server_capture.finish()), 8081);
    let client_seen = captured_handshakes(&parse_capture(&client_capture.finish()), 8081);
    // Established handshakes wait 1 s for a reset before they count.
    std::thread::sleep(Duration::from_millis(1500));
    let conns = daemon.conns(&["--port", "8081"]);
    let mut all = Vec::new();
    for (role, seen) in [("server", &server_seen), ("client", &client_seen)] {
        let view = by_client_port(&conns, role, 8081);
        assert_eq!(view.len(), n4 + n6, "{role} ends listed");
        assert_eq!(
            view.keys().collect::<Vec<_>>(),
            seen.keys().collect::<Vec<_>>(),
            "{role}: the connections of the capture"
        );
        assert_eq!(
            view.keys().collect::<Vec<_>>(),
            called.keys().collect::<Vec<_>>(),
            "{role}: the connections the client made"
        );
        for rows in view.values() {
            assert_eq!(rows.len(), 1, "{role}: {rows:?}");
            let row = &rows[0];
            assert_eq!(row["outcome"], "established", "{row}");
            assert_eq!(row["source"], "socket", "{row}");
            assert_eq!(row["ifindex"], 0, "{row}");
        }
        // The phase, its packets, and the application's span around it:
        // the client's connect call; for the server, from that call (before
        // the SYN-ACK) to its accept's return (after the ACK).
        let (phase, from, to, end): (&str, PacketTime, PacketTime, _) = if role == "server" {
            // The SYN's arrival is not seen at the socket layer.
            for rows in view.values() {
                assert!(rows[0]["syn_to_synack_us"].is_null(), "{}", rows[0]);
            }
            ("synack_to_ack_us", |h| h.syn_ack, |h| h.ack, &accepted)
        } else {
            ("connect_us", |h| h.syn, |h| h.syn_ack, &connected)
        };
        let name = format!("{role} {phase} (socket)");
        all.extend(enclosed(
            &name,
            view.iter().map(|(client, rows)| Enclosed {
                daemon_us: us(&rows[0][phase]),
                wire_us: wire_us(&name, from(&seen[client]), to(&seen[client])),
                application_us: (end[client] - called[client]).as_secs_f64() * 1e6,
            }),
        ));
    }
    // The stack stamps a phase's first packet before tcpdump sees it leave
    // and its last packet's processing after tcpdump saw it come in, so the
    // socket layer's phase is never shorter than the wire's. Usually it is
    // a few µs longer; on a busy host it holds what the host added itself
    // (SYN-ACKs waiting in the receive backlog for a CPU: seen up to
    // ~0.9 ms in CI; a neighbour resolution: ~1 s once), which the
    // applications waited for too. `enclosed` checks both bounds on each
    // handshake, this the median.
    let (median, _) = median_p99(&mut all.clone());
    assert!(
        median <= 20.0,
        "socket phases: median |daemon - tcpdump| is {median:.1} µs"
    );
    let m = established_at_both_ends(&daemon, n4 + n6);
    assert_eq!(m.get("handshake_socket_events_dropped_total", &[]), 0.0);
}

/// A socket-layer phase beside the wire's and the application's spans.
struct Enclosed {
    daemon_us: f64,
    wire_us: f64,
    application_us: f64,
}

/// Checks that each daemon phase lies between the wire's and the
/// application's spans (within 2 µs, the daemon's rounding), prints those
/// more than 50 µs off the wire, and returns |daemon - wire| of each.
fn enclosed(name: &str, phases: impl Iterator<Item = Enclosed>) -> Vec<f64> {
    let mut diffs = Vec::new();
    for (i, p) in phases.enumerate() {
        let Enclosed {
            daemon_us,
            wire_us,
            application_us,
        } = p;
        if daemon_us - wire_us > 50.0 {
            println!(
                "{name}: handshake #{i}: daemon {daemon_us:.1} µs, tcpdump {wire_us:.1} µs, \
                 application {application_us:.1} µs"
            );
        }
        assert!(
            daemon_us >= wire_us - 2.0 && daemon_us <= application_us + 2.0,
            "{name}: handshake #{i}: daemon {daemon_us:.1} µs is not between tcpdump's \
             {wire_us:.1} µs and the application's {application_us:.1} µs"
        );
        diffs.push((daemon_us - wire_us).abs());
    }
    summarize(name, &diffs);
    diffs
}

/// Refused, reset and timed-out handshakes from the socket layer alone
/// (no packet hook on the path), at both ends where the end has a socket.
#[test]
fn the_socket_layer_decides_refused_reset_and_timed_out() {
    require_root();
    let _serial = serial();
    let daemon = handshake_tests::Daemon::start(&["--iface", "lo", "--handshake-timeout", "2s"]);
    let pair = NetnsPair::new();
    let client_capture = Capture::start(&pair.client, &pair.client_if);
    let (refused_port, reset_port, timeout_port) = (9401, 9402, 9403);

    let error = spawn_in(&pair.client, move || {
        TcpStream::connect(v4(refused_port)).unwrap_err()
    })
    .join()
    .unwrap();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reset_server = spawn_in(&pair.server, move || {
        let listener = TcpListener::bind(v4(reset_port)).expect("bind");
        ready_tx.send(()).unwrap();
        let (stream, _) = listener.accept().expect("accept");
        close_with_reset(stream);
    });
    ready_rx.recv().unwrap();
    spawn_in(&pair.client, move || {
        let mut stream = TcpStream::connect(v4(reset_port)).expect("connect");
        assert!(stream.read(&mut [0u8; 1]).is_err(), "expected a reset");
    })
    .join()
    .unwrap();
    reset_server.join().unwrap();

    let listener = spawn_in(&pair.server, move || TcpListener::bind(v4(timeout_port)))
        .join()
        .unwrap()
        .expect("bind");
    let rule = drop_synacks(&pair.client, timeout_port);
    let error = spawn_in(&pair.client, move || {
        TcpStream::connect_timeout(&v4(timeout_port), Duration::from_millis(1500)).unwrap_err()
    })
    .join()
    .unwrap();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    drop(rule);
    let packets = parse_capture(&client_capture.finish());
    std::thread::sleep(Duration::from_millis(300));

    let conns = daemon.conns(&[]);
    let refused = only_row(&conns, "client", refused_port);
    assert_eq!(
        (
            &refused["outcome"],
            &refused["rst_from"],
            &refused["source"]
        ),
        (&"refused".into(), &"server".into(), &"socket".into()),
        "{refused}"
    );
    for role in ["client", "server"] {
        let reset = only_row(&conns, role, reset_port);
        assert_eq!(reset["outcome"], "reset", "{role}: {reset}");
        assert_eq!(reset["rst_from"], "server", "{role}: {reset}");
    }
    let timeout = only_row(&conns, "client", timeout_port);
    assert_eq!(timeout["outcome"], "timeout", "{timeout}");
    // Every SYN the client sent before it gave up, the first aside.
    let (syns, synacks) = handshake_packets(&packets, timeout_port, u64::MAX);
    assert_eq!(timeout["syn_retransmits"], syns - 1, "{timeout}");
    // The server's end has no socket yet (a request, never completed),
    // but its SYN-ACK retransmissions are counted: every SYN-ACK that
    // reached the client's veth (and was dropped there) but the first,
    // whether its timer or a retransmitted SYN sent it again. The server
    // may resend more after the capture stopped.
    let resent = daemon
        .scrape()
        .get("handshake_kernel_synack_retransmits_total", &[]);
    assert!(synacks >= 2, "the server retransmitted SYN-ACKs: {synacks}");
    assert!(
        resent >= (synacks - 1) as f64,
        "{resent} SYN-ACK retransmissions counted, {synacks} SYN-ACKs captured"
    );
    drop(listener);
}

/// 20,000 connections over loopback with the daemon's defaults there
/// (packet hooks on `lo`, the socket layer everywhere): each handshake
/// once per role, the client's end seen by both sources, nothing dropped.
#[test]
fn twenty_thousand_loopback_connections_once_per_role() {
    require_root();
    let _serial = serial();
    let daemon = handshake_tests::Daemon::start(&["--iface", "lo"]);
    let n = 20_000;
    let port = handshake_tests::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listener = TcpListener::bind(addr).expect("bind");
    // One connection at a time: the client waits for the server's answer.
    let server = std::thread::spawn(move || {
        for _ in 0..n {
            let (mut stream, _) = listener.accept().expect("accept");
            let _ = stream.read_to_end(&mut Vec::new());
            let _ = stream.write_all(b"ok");
        }
    });
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.write_all(b"hi").expect("send");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let _ = stream.read_to_end(&mut Vec::new());
    }
    server.join().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let conns = daemon.conns(&["--port", &port.to_string()]);
    // Loopback reuses a client port 1 s after its TIME_WAIT began
    // (tcp_tw_reuse), so one four-tuple may carry several connections:
    // each must then have as many rows at one end as at the other.
    let client = by_client_port(&conns, "client", port);
    let server = by_client_port(&conns, "server", port);
    for (role, view, source) in [("client", &client, "both"), ("server", &server, "socket")] {
        assert_eq!(view.values().map(Vec::len).sum::<usize>(), n, "{role} rows");
        let odd: Vec<_> = view
            .values()
            .flatten()
            .filter(|row| row["source"] != source || row["outcome"] != "established")
            .take(3)
            .collect();
        assert!(odd.is_empty(), "{role}: {odd:?}");
    }
    let unequal: Vec<_> = client
        .iter()
        .filter(|(key, rows)| server.get(*key).map(Vec::len) != Some(rows.len()))
        .take(3)
        .collect();
    assert!(unequal.is_empty(), "ends listed unequally: {unequal:?}");
    let m = established_at_both_ends(&daemon, n);
    assert_eq!(m.get("handshake_socket_events_dropped_total", &[]), 0.0);
    assert_eq!(m.get("handshake_ringbuf_dropped_total", &[]), 0.0);
}

/// A dual-stack listener (`[::]`, as openssl s_server and many servers
/// bind) accepts IPv4 clients on IPv6 sockets (`::ffff:10.201.0.1`): the
/// socket layer's row and the packet hooks' IPv4 row are one handshake,
/// counted once. They were counted twice before.
#[test]
fn a_dual_stack_listener_counts_each_ipv4_handshake_once() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = pair.server_daemon(&[]);
    const PORT: u16 = 8444;
    let before = daemon
        .scrape()
        .try_get(
            "handshake_tcp_handshakes_total",
            &[("role", "server"), ("outcome", "established")],
        )
        .unwrap_or(0.0);
    let serving = echo_server(&pair.server, format!("[::]:{PORT}").parse().unwrap(), 20);
    echo_clients(&pair.client, v4(PORT), 20);
    serving.join().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let after = daemon.scrape().get(
        "handshake_tcp_handshakes_total",
        &[("role", "server"), ("outcome", "established")],
    );
    let rows = daemon.conns(&["--role", "server", "--port", &PORT.to_string()]);
    let sources: Vec<&str> = rows.iter().filter_map(|r| r["source"].as_str()).collect();
    assert_eq!(rows.len(), 20, "{sources:?}");
    assert!(
        rows.iter()
            .all(|r| r["source"] == "both" && r["family"] == "ipv4"),
        "{rows:#?}"
    );
    assert_eq!(after - before, 20.0, "20 handshakes, counted once each");
}
