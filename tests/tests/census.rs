//! The socket census against `ss`: sockets held in every state a test can
//! produce on purpose, in two network namespaces, over both families;
//! the census of each namespace must equal `ss -tan` there, state by state.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use handshake_common::abi::{census::SUMMARY_ROW_IPV4, census::SUMMARY_ROW_IPV6, tcp_state};
use handshake_tests::{
    Daemon, NetnsPair, NftDrop, require_root, serial, sh, sink_server, spawn_in,
};
use handshake_user::{
    kernel::{
        loader::{Observer, PRETEND_MISSING},
        netns::Netns,
    },
    wire::STATES,
};

/// `ss -tan` in `ns`, family `-4` or `-6`: sockets per state number.
fn ss_counts(ns: &str, family: &str) -> BTreeMap<u32, u64> {
    let out = sh("ip", &["netns", "exec", ns, "ss", "-tanH", family]);
    let mut counts = BTreeMap::new();
    for line in out.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let state = match name {
            "ESTAB" => tcp_state::ESTABLISHED,
            "SYN-SENT" => tcp_state::SYN_SENT,
            "SYN-RECV" => tcp_state::SYN_RECV,
            "FIN-WAIT-1" => tcp_state::FIN_WAIT1,
            "FIN-WAIT-2" => tcp_state::FIN_WAIT2,
            "TIME-WAIT" => tcp_state::TIME_WAIT,
            "UNCONN" | "CLOSE" => tcp_state::CLOSE,
            "CLOSE-WAIT" => tcp_state::CLOSE_WAIT,
            "LAST-ACK" => tcp_state::LAST_ACK,
            "LISTEN" => tcp_state::LISTEN,
            "CLOSING" => tcp_state::CLOSING,
            other => panic!("ss printed an unknown state {other:?}: {line}"),
        };
        *counts.entry(state).or_default() += 1;
    }
    counts
}

#[test]
fn census_equals_ss_for_time_wait_on_both_sides() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let mut observer = Observer::load().expect("load the kernel programs");
    let mut census = observer.take_census().expect("census loads on this kernel");

    let v4: SocketAddr = format!("{}:7100", NetnsPair::SERVER_V4).parse().unwrap();
    let v6: SocketAddr = format!("[{}]:7100", NetnsPair::SERVER_V6).parse().unwrap();
    // Server: accepts; closes first on odd connections (TIME_WAIT on the
    // server side), waits for the client's close on even ones.
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = spawn_in(&pair.server, move || {
        let listeners = [
            TcpListener::bind(v4).unwrap(),
            TcpListener::bind(v6).unwrap(),
        ];
        ready_tx.send(()).unwrap();
        let mut held = Vec::new();
        for listener in &listeners {
            for i in 0..20 {
                let (mut stream, _) = listener.accept().unwrap();
                if i % 2 == 1 {
                    drop(stream);
                } else {
                    let mut buf = [0u8; 1];
                    let _ = stream.read(&mut buf);
                    held.push(stream);
                }
            }
        }
        drop(held);
        listeners
    });
    ready_rx.recv().unwrap();
    let client = spawn_in(&pair.client, move || {
        for addr in [v4, v6] {
            for i in 0..20 {
                let mut stream = TcpStream::connect(addr).unwrap();
                if i % 2 == 1 {
                    let mut buf = [0u8; 1];
                    let _ = stream.read(&mut buf);
                } else {
                    stream.write_all(b"x").unwrap();
                    stream.shutdown(Shutdown::Both).unwrap();
                }
            }
        }
    });
    client.join().unwrap();
    let listeners = server.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    for ns in [&pair.client, &pair.server] {
        let netns = Netns::open(ns).unwrap();
        let snapshot = census.run(&netns, 0, 0).expect("census run");
        for (family, flag) in [(SUMMARY_ROW_IPV4, "-4"), (SUMMARY_ROW_IPV6, "-6")] {
            let expected = ss_counts(ns, flag);
            for state in STATES {
                assert_eq!(
                    snapshot.count_family(family, state),
                    expected.get(&state).copied().unwrap_or(0),
                    "{ns} {flag} state {state}: census {:?} ss {expected:?}",
                    snapshot.summary.sockets[family]
                );
            }
        }
        eprintln!(
            "{ns}: census {:?} in {:?}; TIME_WAIT remote {:?}",
            snapshot.summary.sockets, snapshot.duration, snapshot.tw_remote
        );
    }
    drop(listeners);
}

/// The state names `handshake states --json` uses, by kernel number.
fn json_name(state: u32) -> &'static str {
    tcp_state::name(state).unwrap()
}

/// `handshake states --json` for namespace `ns`: sockets per state number.
fn daemon_states(daemon: &Daemon, ns: &str) -> BTreeMap<u32, u64> {
    let answer = daemon.cli_json("states", &[]);
    let view = answer
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["netns"] == ns)
        .unwrap_or_else(|| panic!("no namespace {ns} in {answer}"));
    STATES
        .iter()
        .map(|s| (*s, view["states"][json_name(*s)].as_u64().unwrap()))
        .collect()
}

fn addr(family: &str, host: &str, port: u16) -> SocketAddr {
    if family == "-4" {
        format!("{host}:{port}").parse().unwrap()
    } else {
        format!("[{host}]:{port}").parse().unwrap()
    }
}

/// Every state a test can hold on purpose, in both namespaces and both
/// families, then: `handshake states` equals `ss -tan` there, state by
/// state, and so does `handshake_tcp_sockets` per family.
#[test]
fn states_equal_ss_in_every_state() {
    every_state("iter");
}

/// The same through the sock_diag fallback.
#[test]
fn states_equal_ss_in_every_state_through_netlink() {
    every_state("netlink");
}

fn every_state(source: &str) {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let server_daemon = pair.server_daemon(&["--census-source", source]);
    let client_daemon = pair.client_daemon(&["--census-source", source]);
    let expected_source = if source == "iter" {
        "iter/tcp"
    } else {
        "sock_diag"
    };
    assert_eq!(
        server_daemon.cli_json("states", &[])[0]["census_source"],
        expected_source
    );
    let families = [("-4", NetnsPair::SERVER_V4), ("-6", NetnsPair::SERVER_V6)];
    const PER: usize = 4;
    let (tw_client, tw_server, half_closed, syn, closing, ack_lost) =
        (7101, 7102, 7103, 7104, 7105, 7106);

    // Server side: every listener, for both families.
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = spawn_in(&pair.server, move || {
        let mut listeners = Vec::new();
        for (family, host) in families {
            for port in [tw_client, tw_server, half_closed, syn, closing, ack_lost] {
                listeners.push(TcpListener::bind(addr(family, host, port)).unwrap());
            }
        }
        ready_tx.send(()).unwrap();
        let mut held = Vec::new();
        for listener in listeners.chunks(6) {
            // Client closes first: read to EOF, then close.
            for _ in 0..PER {
                let (mut s, _) = listener[0].accept().unwrap();
                let _ = s.read_to_end(&mut Vec::new());
            }
            // Server closes first.
            for _ in 0..PER {
                drop(listener[1].accept().unwrap());
            }
            // Never closes: CLOSE_WAIT once the client closed.
            for _ in 0..PER {
                held.push(listener[2].accept().unwrap().0);
            }
            // Simultaneous close.
            held.push(listener[4].accept().unwrap().0);
        }
        (listeners, held)
    });
    ready_rx.recv().unwrap();

    let (client_tx, client_rx) = mpsc::channel();
    let client = spawn_in(&pair.client, move || {
        let mut held = Vec::new();
        for (family, host) in families {
            for _ in 0..PER {
                let mut s = TcpStream::connect(addr(family, host, tw_client)).unwrap();
                s.write_all(b"x").unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let _ = s.read_to_end(&mut Vec::new());
            }
            for _ in 0..PER {
                let mut s = TcpStream::connect(addr(family, host, tw_server)).unwrap();
                let _ = s.read_to_end(&mut Vec::new());
            }
            for i in 0..PER {
                let s = TcpStream::connect(addr(family, host, half_closed)).unwrap();
                if i % 2 == 0 {
                    // A full socket in FIN_WAIT2.
                    s.shutdown(Shutdown::Write).unwrap();
                    held.push(s);
                } else {
                    // Closed: a TIME_WAIT minisock in substate FIN_WAIT2.
                    drop(s);
                }
            }
            held.push(TcpStream::connect(addr(family, host, closing)).unwrap());
        }
        client_tx.send(held).unwrap();
    });
    let client_held = client_rx.recv().unwrap();
    client.join().unwrap();

    // Simultaneous close: both FINs dropped on the way in, both sides
    // close, then the client's FIN is let through: the server, whose own
    // FIN is still unacknowledged, goes CLOSING; the client stays in
    // FIN_WAIT1 (everything towards it is still dropped).
    let into_server = NftDrop::input(&pair.server, &format!("tcp dport {closing}"));
    let into_client = NftDrop::input(&pair.client, &format!("tcp sport {closing}"));
    let (listeners, server_held) = server.join().unwrap();
    for s in server_held
        .iter()
        .filter(|s| s.local_addr().unwrap().port() == closing)
    {
        s.shutdown(Shutdown::Write).unwrap();
    }
    for s in client_held
        .iter()
        .filter(|s| s.peer_addr().unwrap().port() == closing)
    {
        s.shutdown(Shutdown::Write).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(into_server);

    // SYN_SENT on the client, SYN_RECV (request sockets) on the server:
    // SYN-ACKs dropped on their way into the client.
    let no_synacks = NftDrop::input(
        &pair.client,
        &format!("tcp sport {syn} tcp flags & (syn | ack) == syn | ack"),
    );
    let connecting: Vec<JoinHandle<()>> = families
        .iter()
        .flat_map(|&(family, host)| {
            let ns = pair.client.clone();
            (0..PER).map(move |_| {
                spawn_in(&ns, move || {
                    let _ = TcpStream::connect_timeout(
                        &addr(family, host, syn),
                        Duration::from_secs(20),
                    );
                })
            })
        })
        .collect();

    // SYN_RECV again, by dropping the client's final ACK: the client is
    // ESTABLISHED, the server keeps its request sockets.
    let no_final_ack = NftDrop::input(
        &pair.server,
        &format!("tcp dport {ack_lost} tcp flags & (fin | syn | rst | ack) == ack"),
    );
    let acked = spawn_in(&pair.client, move || {
        families
            .iter()
            .flat_map(|&(family, host)| {
                (0..PER).map(move |_| TcpStream::connect(addr(family, host, ack_lost)).unwrap())
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();

    // Long enough for the client's FIN to be retransmitted into the
    // server (RTO backoff) and for every SYN to be out.
    std::thread::sleep(Duration::from_secs(3));
    for (daemon, ns) in [
        (&server_daemon, &pair.server),
        (&client_daemon, &pair.client),
    ] {
        let census = daemon_states(daemon, ns);
        let mut expected = ss_counts(ns, "-4");
        for (state, count) in ss_counts(ns, "-6") {
            *expected.entry(state).or_default() += count;
        }
        for state in STATES {
            assert_eq!(
                census[&state],
                expected.get(&state).copied().unwrap_or(0),
                "{ns}: {} differs: handshake states {census:?}, ss {expected:?}",
                json_name(state)
            );
        }
        // Per family, from the metrics of the same census.
        let metrics = daemon.scrape();
        for (family, flag) in [("ipv4", "-4"), ("ipv6", "-6")] {
            let expected = ss_counts(ns, flag);
            for state in STATES {
                assert_eq!(
                    metrics.get(
                        "handshake_tcp_sockets",
                        &[
                            ("netns", ns),
                            ("state", json_name(state)),
                            ("family", family)
                        ]
                    ) as u64,
                    expected.get(&state).copied().unwrap_or(0),
                    "{ns} {family} {}",
                    json_name(state)
                );
            }
        }
        eprintln!("{ns}: {census:?}");
    }
    // Every state the test meant to hold is there.
    let server = daemon_states(&server_daemon, &pair.server);
    let client = daemon_states(&client_daemon, &pair.client);
    assert_eq!(server[&tcp_state::TIME_WAIT], 2 * PER as u64);
    assert_eq!(client[&tcp_state::TIME_WAIT], 2 * PER as u64);
    assert_eq!(server[&tcp_state::CLOSE_WAIT], 2 * PER as u64);
    assert_eq!(client[&tcp_state::FIN_WAIT2], 2 * PER as u64);
    assert_eq!(server[&tcp_state::SYN_RECV], 4 * PER as u64);
    assert_eq!(client[&tcp_state::SYN_SENT], 2 * PER as u64);
    assert_eq!(client[&tcp_state::ESTABLISHED], 2 * PER as u64);
    assert_eq!(server[&tcp_state::CLOSING], 2);
    assert_eq!(client[&tcp_state::FIN_WAIT1], 2);
    assert_eq!(server[&tcp_state::LISTEN], 12);

    // TIME_WAIT per remote endpoint: the client's towards the server's
    // port, the server's towards the client's address (any port).
    let timewait = client_daemon.cli_json("timewait", &["--top", "5"]);
    let view = timewait
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["netns"] == pair.client.as_str())
        .unwrap();
    assert_eq!(view["count"], 2 * PER as u64);
    let top = view["top"].as_array().unwrap();
    for host in [NetnsPair::SERVER_V4, NetnsPair::SERVER_V6] {
        assert!(
            top.iter().any(|e| e["remote_addr"] == host
                && e["remote_port"] == tw_client
                && e["count"] == PER as u64),
            "{host}:{tw_client} x{PER} missing from {view}"
        );
    }
    let timewait = server_daemon.cli_json("timewait", &[]);
    let view = timewait
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["netns"] == pair.server.as_str())
        .unwrap();
    assert!(
        view["top"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["remote_addr"] == NetnsPair::CLIENT_V4
                && e["remote_port"] == 0
                && e["count"] == PER as u64),
        "{view}"
    );

    drop(no_synacks);
    drop(no_final_ack);
    drop(acked);
    drop(into_client);
    for c in connecting {
        c.join().unwrap();
    }
    drop((listeners, server_held, client_held));
}

/// Churn towards one destination at a steady rate, with a narrowed
/// `ip_local_port_range`, then a `timewait` request: the forecast for that
/// destination counts exactly the TIME_WAIT sockets `ss` shows towards it,
/// grows at the rate the churn went, and gives the ports left over that
/// rate; a namespace heading nowhere exports +Inf. (Whether exhaustion
/// then comes when forecast is a wall-clock matter: `cargo xtask bench --
/// forecast`.)
#[test]
fn the_port_exhaustion_forecast_counts_what_ss_counts() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    const PORTS: u16 = 1000;
    const RATE: f64 = 100.0;
    const MADE: u32 = 350;
    let range = format!("40000 {}", 40000 + PORTS - 1);
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &pair.client,
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_local_port_range={range}"),
        ],
    );
    let daemon = pair.client_daemon(&["--census-interval", "500ms"]);
    let server_addr: SocketAddr = format!("{}:7200", NetnsPair::SERVER_V4).parse().unwrap();
    let _server = sink_server(&pair.server, server_addr);
    let entries_before = daemon
        .scrape()
        .get("handshake_tcp_time_wait_entries_total", &[]);
    // MADE connections at a steady pace, each closed by the client first
    // (TIME_WAIT on its side) once the server has closed its end too.
    spawn_in(&pair.client, move || {
        let started = Instant::now();
        for n in 0..MADE {
            let due = Duration::from_secs_f64(f64::from(n) / RATE);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            let mut stream = TcpStream::connect(server_addr).expect("connect");
            stream.shutdown(Shutdown::Write).expect("shutdown");
            let _ = stream.read_to_end(&mut Vec::new());
        }
    })
    .join()
    .unwrap();

    // Nothing enters or leaves TIME_WAIT now (it lasts 60 s): ss before
    // and after the request must agree with the census in between.
    let ss_time_wait = || {
        let filter = format!("dst {server_addr}");
        let out = sh(
            "ip",
            &[
                "netns",
                "exec",
                &pair.client,
                "ss",
                "-tanH",
                "state",
                "time-wait",
                &filter,
            ],
        );
        out.lines().filter(|l| !l.trim().is_empty()).count() as u64
    };
    let before = ss_time_wait();
    let answer = daemon.cli_json("timewait", &[]);
    assert_eq!(
        ss_time_wait(),
        before,
        "TIME_WAIT changed during the request"
    );
    assert_eq!(
        before,
        u64::from(MADE),
        "one TIME_WAIT socket per connection"
    );
    let view = answer
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["netns"] == pair.client.as_str())
        .unwrap()
        .clone();
    assert_eq!(view["count"], before, "{view}");
    assert_eq!(
        view["port_range"],
        serde_json::json!([40000, 40000 + PORTS - 1])
    );
    let forecast = view["forecast"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["remote_addr"] == NetnsPair::SERVER_V4 && f["remote_port"] == 7200)
        .unwrap_or_else(|| panic!("no forecast for the destination: {view}"))
        .clone();
    assert_eq!(forecast["time_wait"], before, "{forecast}");
    let growth = forecast["growth_per_second"].as_f64().unwrap();
    assert!(
        (growth - RATE).abs() <= 0.2 * RATE,
        "growth {growth}/s for a churn of {RATE}/s: {forecast}"
    );
    // At RATE a second TIME_WAIT would level off at 60 RATE > PORTS: the
    // ports left run out at the rate they are taken.
    let left = f64::from(PORTS) - before as f64;
    let predicted = forecast["seconds_to_exhaustion"]
        .as_f64()
        .unwrap_or_else(|| panic!("no exhaustion forecast: {forecast}"));
    assert!(
        (predicted - left / growth).abs() <= 1e-6 * predicted,
        "{predicted} s for {left} ports at {growth}/s"
    );
    let rate = view["entries_per_second"].as_f64().unwrap();
    assert!((rate - RATE).abs() <= 0.2 * RATE, "entry rate {rate}");

    // Every connection entered TIME_WAIT once; the counter is host-wide,
    // so closes elsewhere on the host may add a few.
    let metrics = daemon.scrape();
    let entries = metrics.get("handshake_tcp_time_wait_entries_total", &[]) - entries_before;
    assert!(
        (f64::from(MADE)..=f64::from(MADE) + 5.0).contains(&entries),
        "{entries} entries into TIME_WAIT for {MADE} connections"
    );
    let exhaustion = |netns: &str| {
        metrics.get(
            "handshake_tcp_ephemeral_port_exhaustion_seconds",
            &[("netns", netns)],
        )
    };
    // The scrape shows the last scheduled census: the same forecast, give
    // or take the half second between censuses.
    let scheduled = exhaustion(&pair.client);
    assert!(
        scheduled.is_finite() && (scheduled - predicted).abs() <= 0.5 * predicted,
        "exported {scheduled} s, answered {predicted} s"
    );
    assert_eq!(exhaustion("host"), f64::INFINITY, "the host heads nowhere");
}

/// Sockets stuck in CLOSE_WAIT (a server that never closes), FIN_WAIT2 (its
/// peer, half-closed) and SYN_SENT (SYN-ACKs dropped): `conns --state`
/// lists each with its age in that state, within 1 s of the truth, and the
/// process that opened the connections this host opened.
#[test]
fn stuck_sockets_show_their_age_and_opener() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let server_daemon = pair.server_daemon(&[]);
    let client_daemon = pair.client_daemon(&[]);
    let (held_port, syn_port) = (7400, 7401);
    let families = [("-4", NetnsPair::SERVER_V4), ("-6", NetnsPair::SERVER_V6)];

    let (ready_tx, ready_rx) = mpsc::channel();
    let server = spawn_in(&pair.server, move || {
        let mut listeners = Vec::new();
        for (family, host) in families {
            listeners.push(TcpListener::bind(addr(family, host, held_port)).unwrap());
            listeners.push(TcpListener::bind(addr(family, host, syn_port)).unwrap());
        }
        ready_tx.send(()).unwrap();
        // Accepted and never closed.
        let held: Vec<TcpStream> = listeners
            .iter()
            .step_by(2)
            .map(|l| l.accept().unwrap().0)
            .collect();
        (listeners, held)
    });
    ready_rx.recv().unwrap();
    let client = spawn_in(&pair.client, move || {
        families
            .iter()
            .map(|&(family, host)| {
                let s = TcpStream::connect(addr(family, host, held_port)).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                s
            })
            .collect::<Vec<_>>()
    });
    let half_closed = client.join().unwrap();
    let closed_at = Instant::now();
    let (listeners, held) = server.join().unwrap();

    let no_synacks = NftDrop::input(
        &pair.client,
        &format!("tcp sport {syn_port} tcp flags & (syn | ack) == syn | ack"),
    );
    let connect_at = Instant::now();
    let connecting: Vec<JoinHandle<()>> = families
        .iter()
        .map(|&(family, host)| {
            spawn_in(&pair.client, move || {
                let _ = TcpStream::connect_timeout(
                    &addr(family, host, syn_port),
                    Duration::from_secs(20),
                );
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));

    let check = |daemon: &Daemon, ns: &str, state: &str, since: Instant, opened_here: bool| {
        // Every namespace is counted: the one of this test's sockets.
        let rows = daemon.conns(&["--state", state, "--netns", ns]);
        let truth = since.elapsed().as_secs_f64();
        assert_eq!(rows.len(), 2, "{state}: {rows:?}");
        for row in &rows {
            let age = row["state_age_s"]
                .as_f64()
                .unwrap_or_else(|| panic!("no age: {row}"));
            assert!(
                (age - truth).abs() <= 1.0,
                "{state}: age {age:.2} s, truth {truth:.2} s: {row}"
            );
            if opened_here {
                assert_eq!(row["pid"], std::process::id(), "{row}");
                assert!(!row["comm"].as_str().unwrap_or("").is_empty(), "{row}");
            } else {
                assert!(row["pid"].is_null(), "{row}");
            }
        }
        eprintln!("{state}: {rows:?} (truth {truth:.2} s)");
    };
    check(&server_daemon, &pair.server, "close_wait", closed_at, false);
    check(&client_daemon, &pair.client, "FIN-WAIT-2", closed_at, true);
    check(&client_daemon, &pair.client, "syn_sent", connect_at, true);

    // The same ages in the metrics, right after a fresh census.
    let _ = server_daemon.cli_json("states", &[]);
    let oldest = server_daemon.scrape().get(
        "handshake_tcp_state_oldest_seconds",
        &[("netns", &pair.server), ("state", "close_wait")],
    );
    let truth = closed_at.elapsed().as_secs_f64();
    assert!(
        (oldest - truth).abs() <= 1.0,
        "oldest close_wait {oldest:.2} s, truth {truth:.2} s"
    );

    // A state name the CLI does not know is one line and a non-zero exit.
    let out = std::process::Command::new(handshake_tests::handshake_bin())
        .args(["conns", "--state", "half-open", "--api-socket"])
        .arg(&client_daemon.api_socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );

    drop(no_synacks);
    for c in connecting {
        c.join().unwrap();
    }
    drop((listeners, held, half_closed));
}

/// `n` established connections from the client namespace to `port` in
/// the server namespace, held open: (client ends, listener and server
/// ends), and when the first connect began.
fn hold_connections(
    pair: &NetnsPair,
    port: u16,
    n: usize,
) -> (Vec<TcpStream>, (TcpListener, Vec<TcpStream>), Instant) {
    let at = addr("-4", NetnsPair::SERVER_V4, port);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = spawn_in(&pair.server, move || {
        let listener = TcpListener::bind(at).unwrap();
        ready_tx.send(()).unwrap();
        let held: Vec<TcpStream> = (0..n).map(|_| listener.accept().unwrap().0).collect();
        (listener, held)
    });
    ready_rx.recv().unwrap();
    let started = Instant::now();
    let clients = spawn_in(&pair.client, move || {
        (0..n)
            .map(|_| TcpStream::connect(at).unwrap())
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    (clients, server.join().unwrap(), started)
}

/// Every age in `ages`, taken by a census after `connected`, is at least
/// the time since `connected` (when the last of the connections was
/// established) and at most the time since `started` (before the first).
fn ages_within(ages: &[f64], started: Instant, connected: Instant, asked: Instant) {
    let (low, high) = (
        asked.duration_since(connected).as_secs_f64() - 0.01,
        started.elapsed().as_secs_f64() + 0.01,
    );
    let wrong: Vec<_> = ages.iter().filter(|a| !(low..=high).contains(*a)).collect();
    assert!(
        wrong.is_empty(),
        "ages {wrong:?} outside {low:.3}..{high:.3} s (established between those)"
    );
}

/// The daemon's count of state changes the table of socket ages could not
/// note, once it reaches `at_least` (the kernel's counters reach the
/// metrics at the next sweep, 200 ms) or after 2 s.
fn untracked_state_changes(daemon: &Daemon, at_least: f64) -> f64 {
    let mut untracked = 0.0;
    for _ in 0..20 {
        untracked = daemon
            .scrape()
            .get("handshake_socket_ages_untracked_total", &[]);
        if untracked >= at_least {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    untracked
}

/// Connections held from the client namespace to a server-side daemon
/// with a table of `entries` socket ages, after `listeners` other
/// listeners opened in the server namespace. Fields drop in order: the
/// connections, the listeners, the daemon, the namespaces.
struct HeldAges {
    _held: (Vec<TcpStream>, (TcpListener, Vec<TcpStream>)),
    _listeners: Vec<TcpListener>,
    daemon: Daemon,
    _pair: NetnsPair,
    /// The ages `conns --state established` shows for both ends of the
    /// held connections, each within the time since the first connect.
    aged: Vec<f64>,
}

const HELD: usize = 200;

/// Socket ages the host namespace's own sockets may hold while a test
/// runs (its scrapes, anything else on the machine).
const HOST_AGES_SLACK: usize = 8;

/// Entries of the daemon's map `name`, as bpftool dumps it.
fn map_entries(name: &str) -> usize {
    let dump = sh("bpftool", &["--json", "map", "dump", "name", name]);
    let value: serde_json::Value = serde_json::from_str(&dump).expect("bpftool JSON");
    value.as_array().expect("a list of entries").len()
}

/// Slots of the daemon's array map `name` that a socket holds (the first
/// eight bytes of the value, its address, not zero), as bpftool dumps it.
fn held_slots(name: &str) -> usize {
    let dump = sh("bpftool", &["--json", "map", "dump", "name", name]);
    let value: serde_json::Value = serde_json::from_str(&dump).expect("bpftool JSON");
    value
        .as_array()
        .expect("a list of entries")
        .iter()
        .filter(|entry| {
            let bytes = entry["value"].as_array().expect("raw value bytes");
            bytes[..8].iter().any(|b| b.as_str() != Some("0x00"))
        })
        .count()
}

fn held_with_ages(entries: &str, port: u16, listeners: usize) -> HeldAges {
    let pair = NetnsPair::new();
    let daemon = pair.server_daemon(&["--socket-age-entries", entries]);
    let listeners = spawn_in(&pair.server, move || {
        (0..listeners)
            .map(|_| TcpListener::bind((NetnsPair::SERVER_V4, 0)).unwrap())
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let (clients, server, started) = hold_connections(&pair, port, HELD);
    let connected = Instant::now();
    // Ages grow while the table is read: a moment to tell them apart.
    std::thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    // Both ends: every namespace's sockets get ages.
    let rows: Vec<serde_json::Value> = daemon
        .conns(&["--state", "established"])
        .into_iter()
        .filter(|r| r["netns"] == pair.server.as_str() || r["netns"] == pair.client.as_str())
        .collect();
    assert_eq!(rows.len(), 2 * HELD, "{rows:?}");
    let aged: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["state_age_s"].as_f64())
        .collect();
    ages_within(&aged, started, connected, asked);
    HeldAges {
        _held: (clients, server),
        _listeners: listeners,
        daemon,
        _pair: pair,
        aged,
    }
}

/// More sockets than the kernel's table of socket ages holds: the sockets
/// it noted keep their ages, the others show none, and every state change
/// it could not note is counted, never silently lost.
#[test]
fn a_full_table_of_socket_ages_is_counted() {
    require_root();
    let _serial = serial();
    let held = held_with_ages("64", 7500, 0);
    let aged = held.aged.len();
    // 64 slots and 16 overflow entries for the TCP sockets of every
    // namespace: both are full, and all but the few the host's own
    // sockets may hold went to the connections' ends.
    let (slots, overflow) = handshake_common::abi::sock_age_tables(64);
    assert_eq!((slots, overflow), (64, 16));
    // A host socket that held a slot or an entry and closed leaves it free
    // for a while: the server ends took theirs before.
    let (held_slots, entries) = (held_slots("SK_AGE_SLOTS"), map_entries("SK_AGE"));
    assert!(
        (64 - HOST_AGES_SLACK..=64).contains(&held_slots),
        "{held_slots} of 64 slots held"
    );
    assert!(
        (16 - HOST_AGES_SLACK..=16).contains(&entries),
        "{entries} of 16 overflow entries"
    );
    let capacity = 64 + 16;
    assert!(
        (capacity - HOST_AGES_SLACK..=capacity).contains(&aged),
        "{aged} of {} ends with an age, with room for {capacity}",
        2 * HELD
    );
    // A server end without an age found the table full once (at SYN_RECV
    // -> ESTABLISHED: its SYN_RECV is not noted), a client end twice
    // (CLOSE -> SYN_SENT, SYN_SENT -> ESTABLISHED); the host's own sockets
    // (the scrapes that read the count among them) add a few.
    let without = (2 * HELD - aged) as f64;
    let untracked = untracked_state_changes(&held.daemon, without);
    assert!(
        (without..=2.0 * without + 24.0).contains(&untracked),
        "{untracked} state changes counted as untracked for {without} sockets without an age"
    );
    eprintln!(
        "{aged} of {} sockets with an age, {untracked} state changes untracked",
        2 * HELD
    );
}

/// With a table of 512 socket ages (and 128 overflow entries) and
/// `listeners` listeners opened first, every end of the 200 held
/// connections has an age and no state change goes untracked.
fn every_end_has_an_age(port: u16, listeners: usize) {
    let held = held_with_ages("512", port, listeners);
    assert_eq!(held.aged.len(), 2 * HELD, "ends with an age");
    // Give a late count time to arrive; there should be none.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(untracked_state_changes(&held.daemon, 0.0), 0.0);
}

/// Sockets of every namespace get ages, the client ends (whose namespace
/// carries no packet hook) as the server ends.
#[test]
fn sockets_of_every_namespace_get_ages() {
    require_root();
    let _serial = serial();
    every_end_has_an_age(7501, 0);
}

/// Listeners take no age entries (the census reads none for them): 300
/// listeners opened first would otherwise need 700 of the 640 entries,
/// and leave some of the 400 connection ends after them without ages.
#[test]
fn listeners_take_no_age_entries() {
    require_root();
    let _serial = serial();
    every_end_has_an_age(7502, 300);
}

/// The census runs every `--census-interval` while it is fast (a census
/// of this idle host takes a few ms, far inside 1 % of the interval), as
/// `handshake_census_interval_seconds` shows.
#[test]
fn the_census_runs_at_the_interval_asked_for() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    // 1 % of 1 s is 10 ms: a round over the host's and the server's
    // namespaces takes ~5 ms here (each walks 262,144 empty buckets).
    for (flag, seconds) in [("1s", 1.0), ("2s", 2.0)] {
        let daemon = pair.server_daemon(&["--census-interval", flag]);
        // A census slowed by the VM stretches one interval; the next fast
        // one brings it back.
        let mut interval = f64::NAN;
        for _ in 0..30 {
            let metrics = daemon.scrape();
            interval = metrics.get("handshake_census_interval_seconds", &[]);
            if interval == seconds {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(interval, seconds, "--census-interval {flag}");
        let took = daemon
            .scrape()
            .get("handshake_census_duration_seconds", &[("netns", "host")]);
        assert!(
            took > 0.0 && took < 0.01 * seconds,
            "a census took {took} s"
        );
    }
}

/// Where `iter/tcp` cannot be loaded (pretended here), `--census-source
/// auto` counts through sock_diag and says so in the metrics; `iter`
/// refuses to start, in one line.
#[test]
fn without_iter_tcp_the_census_falls_back_to_netlink_or_refuses() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let no_iter = [(PRETEND_MISSING, "iter_tcp")];
    let args = ["--netns", &pair.server, "--iface", &pair.server_if];
    let daemon = Daemon::start_with_env(&args, &no_iter);
    let states = daemon.cli_json("states", &[]);
    assert_eq!(states[0]["census_source"], "sock_diag", "{states}");
    let counted: BTreeMap<u32, u64> = daemon_states(&daemon, &pair.server)
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        counted,
        ss_counts(&pair.server, "-4")
            .into_iter()
            .chain(ss_counts(&pair.server, "-6"))
            .fold(BTreeMap::new(), |mut all, (state, n)| {
                *all.entry(state).or_insert(0) += n;
                all
            }),
        "the netlink census against ss"
    );
    let metrics = daemon.scrape();
    let probe = |name| metrics.get("handshake_probe_attached", &[("probe", name)]);
    assert_eq!(probe("iter_tcp_census"), 0.0);
    assert_eq!(probe("sock_diag_census"), 1.0);
    drop(daemon);

    let out = std::process::Command::new(handshake_tests::handshake_bin())
        .arg("daemon")
        .args(args)
        .args([
            "--census-source",
            "iter",
            "--ephemeral",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--api-socket", "/run/handshake-test-no-iter.sock"])
        .env(PRETEND_MISSING, "iter_tcp")
        .output()
        .expect("run handshake daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("handshake: ") && last.contains("--census-source iter"),
        "{stderr}"
    );
}

/// Sockets that entered their state before the daemon started have no
/// age (`null`, not a made-up one); once they change state, they do.
#[test]
fn sockets_older_than_the_daemon_have_no_age_until_they_change_state() {
    require_root();
    let _serial = serial();
    const N: usize = 10;
    let pair = NetnsPair::new();
    let (clients, (listener, server_ends), _) = hold_connections(&pair, 7503, N);
    let daemon = pair.server_daemon(&[]);
    let rows = daemon.conns(&["--state", "established", "--netns", &pair.server]);
    assert_eq!(rows.len(), N, "{rows:?}");
    for row in &rows {
        assert!(row["state_age_s"].is_null(), "{row}");
        assert!(row["pid"].is_null(), "{row}");
    }
    // The clients close: the server ends go to CLOSE_WAIT now, while the
    // daemon watches.
    let closed_at = Instant::now();
    drop(clients);
    std::thread::sleep(Duration::from_millis(200));
    let rows = daemon.conns(&["--state", "close_wait", "--netns", &pair.server]);
    assert_eq!(rows.len(), N, "{rows:?}");
    let ages: Vec<f64> = rows
        .iter()
        .map(|r| {
            r["state_age_s"]
                .as_f64()
                .unwrap_or_else(|| panic!("no age: {r}"))
        })
        .collect();
    ages_within(
        &ages,
        closed_at,
        closed_at + Duration::from_millis(100),
        Instant::now(),
    );
    drop((listener, server_ends));
}
