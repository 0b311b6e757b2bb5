//! Teardown timelines against a packet capture: servers that close a set
//! time after the client's FIN, clients that reset (SO_LINGER 0), and
//! both ends closing at once, in fresh namespaces, both families. Each
//! connection's close as the daemon reports it — who closed first, how,
//! and how long each closing state lasted — is compared with the FIN and
//! RST timestamps tcpdump saw on the server's veth.

use std::{
    io::Read as _,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use handshake_tests::{
    Capture, Daemon, NetnsPair, NftDrop, parse_capture, require_root, serial, spawn_in,
};

/// The server's wait between the client's FIN and its own close.
const DELAY: Duration = Duration::from_millis(300);
const PER_FAMILY: usize = 4;

/// The server's addresses, both families, on `port`.
fn servers(port: u16) -> Vec<SocketAddr> {
    [NetnsPair::SERVER_V4, NetnsPair::SERVER_V6]
        .iter()
        .map(|h| SocketAddr::new(h.parse().unwrap(), port))
        .collect()
}

/// A server in `pair`'s server namespace on `addrs`: per address,
/// accepts `PER_FAMILY` connections one at a time, reads each to the
/// client's FIN (EOF), waits `delay`, and closes.
fn eof_server(
    pair: &NetnsPair,
    addrs: &[SocketAddr],
    delay: Duration,
) -> std::thread::JoinHandle<()> {
    let addrs = addrs.to_vec();
    spawn_in(&pair.server, move || {
        let listeners: Vec<TcpListener> = addrs
            .iter()
            .map(|a| TcpListener::bind(a).unwrap())
            .collect();
        for listener in &listeners {
            for _ in 0..PER_FAMILY {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 16];
                while s.read(&mut buf).unwrap_or(0) > 0 {}
                std::thread::sleep(delay);
                drop(s);
            }
        }
    })
}

/// The daemon's rows of closed connections on `port`, by role.
fn closed_rows(daemon: &Daemon, port: u16, role: &str) -> Vec<serde_json::Value> {
    daemon.conns(&["--closed", "--port", &port.to_string(), "--role", role])
}

/// The client's port of a row.
fn client_port(row: &serde_json::Value) -> u16 {
    let port = if row["role"] == "client" {
        &row["local_port"]
    } else {
        &row["remote_port"]
    };
    port.as_u64().unwrap() as u16
}

#[test]
fn a_server_that_closes_late_shows_close_wait_and_its_client_fin_wait() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = Daemon::start(&[]);
    const PORT: u16 = 7800;
    let capture = Capture::start(&pair.server, &pair.server_if);
    let addrs = servers(PORT);
    // Until the client's FIN (EOF), then the delay.
    let server = eof_server(&pair, &addrs, DELAY);
    std::thread::sleep(Duration::from_millis(100));
    for addr in &addrs {
        for _ in 0..PER_FAMILY {
            let addr = *addr;
            spawn_in(&pair.client, move || {
                // The client keeps its socket until the server's FIN: the
                // socket layer sees its whole FIN_WAIT.
                let mut s = TcpStream::connect(addr).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let mut buf = [0u8; 16];
                while s.read(&mut buf).unwrap_or(0) > 0 {}
            })
            .join()
            .unwrap();
        }
    }
    server.join().unwrap();
    let packets = parse_capture(&capture.finish());
    std::thread::sleep(Duration::from_millis(500));

    // The capture's FINs: per client port, the client's and the server's.
    let fin_gap = |client_port: u16| {
        let fin = |from_client: bool| {
            packets
                .iter()
                .find(|p| {
                    p.flags.contains('F')
                        && if from_client {
                            p.src_port == client_port && p.dst_port == PORT
                        } else {
                            p.src_port == PORT && p.dst_port == client_port
                        }
                })
                .map(|p| p.ts_ns)
                .unwrap_or_else(|| panic!("no FIN for client port {client_port} in the capture"))
        };
        (fin(false) - fin(true)) as f64 / 1e3
    };
    let servers = closed_rows(&daemon, PORT, "server");
    let clients = closed_rows(&daemon, PORT, "client");
    assert_eq!(servers.len(), 2 * PER_FAMILY, "{servers:?}");
    assert_eq!(clients.len(), 2 * PER_FAMILY, "{clients:?}");
    let delay_us = DELAY.as_secs_f64() * 1e6;
    for (rows, phase, closer) in [
        (&servers, "close_wait_us", "remote"),
        (&clients, "fin_wait_us", "local"),
    ] {
        for row in rows {
            assert_eq!(row["closed_by"], closer, "{row}");
            assert_eq!(row["close"], "fin", "{row}");
            let ours = row[phase]
                .as_f64()
                .unwrap_or_else(|| panic!("no {phase}: {row}"));
            let wire = fin_gap(client_port(row));
            assert!(
                (ours - delay_us).abs() <= 0.1 * delay_us,
                "{phase} {ours:.0} µs against the server's {delay_us:.0} µs delay: {row}"
            );
            assert!(
                (ours - wire).abs() <= 0.1 * wire,
                "{phase} {ours:.0} µs against the capture's FIN to FIN {wire:.0} µs: {row}"
            );
            assert!(row["lifetime_us"].as_f64().unwrap() >= ours, "{row}");
        }
    }
    for row in &servers {
        assert!(row["last_ack_us"].as_f64().is_some(), "{row}");
    }
    let metrics = daemon.scrape();
    let closes = |role: &str, closer: &str| {
        metrics.get(
            "handshake_tcp_closes_total",
            &[("role", role), ("closer", closer), ("how", "fin")],
        )
    };
    assert!(closes("server", "remote") >= (2 * PER_FAMILY) as f64);
    assert!(closes("client", "local") >= (2 * PER_FAMILY) as f64);
    let ranked = daemon.cli_json("closes", &["--top", "50"]);
    let listener = ranked
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["kind"] == "listener" && g["name"] == PORT.to_string().as_str())
        .unwrap_or_else(|| panic!("port {PORT} not ranked: {ranked}"));
    let p50 = listener["close_wait_p50_us"].as_f64().unwrap();
    assert!((p50 - delay_us).abs() <= 0.1 * delay_us, "{listener}");
}

#[test]
fn clients_that_reset_are_rst_closes_on_both_ends() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = Daemon::start(&[]);
    const PORT: u16 = 7801;
    let addrs = servers(PORT);
    let server = eof_server(&pair, &addrs, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(100));
    for addr in &addrs {
        for _ in 0..PER_FAMILY {
            let addr = *addr;
            spawn_in(&pair.client, move || {
                use std::io::Write as _;
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"x").unwrap();
                std::thread::sleep(Duration::from_millis(20));
                // SO_LINGER 0: close() resets.
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid socket and option of the size given.
                let rc = unsafe {
                    use std::os::fd::AsRawFd as _;
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&raw const linger).cast(),
                        size_of::<libc::linger>() as u32,
                    )
                };
                assert_eq!(rc, 0, "SO_LINGER");
            })
            .join()
            .unwrap();
        }
    }
    server.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for (role, closer) in [("client", "local"), ("server", "remote")] {
        let rows = closed_rows(&daemon, PORT, role);
        assert_eq!(rows.len(), 2 * PER_FAMILY, "{rows:?}");
        for row in rows {
            assert_eq!(row["close"], "rst", "{row}");
            assert_eq!(row["closed_by"], closer, "{row}");
            assert_eq!(row["close_rst_by"], closer, "{row}");
        }
    }
    let metrics = daemon.scrape();
    assert!(
        metrics.get(
            "handshake_tcp_closes_total",
            &[("role", "client"), ("closer", "local"), ("how", "rst")]
        ) >= (2 * PER_FAMILY) as f64
    );
}

#[test]
fn both_ends_closing_at_once_go_through_closing() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = Daemon::start(&[]);
    const PORT: u16 = 7802;
    let addrs = servers(PORT);
    let listeners = {
        let addrs = addrs.clone();
        spawn_in(&pair.server, move || {
            addrs
                .iter()
                .map(|a| TcpListener::bind(a).unwrap())
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    };
    let clients: Vec<TcpStream> = addrs
        .iter()
        .map(|a| {
            let a = *a;
            spawn_in(&pair.client, move || TcpStream::connect(a).unwrap())
                .join()
                .unwrap()
        })
        .collect();
    let accepted: Vec<TcpStream> = listeners.iter().map(|l| l.accept().unwrap().0).collect();
    // Both FINs held on the way in, both ends close; then the client's
    // FIN is let through: the server, whose own FIN is still
    // unacknowledged, goes CLOSING (the census test's staging). The
    // client, whose FIN and the server's come back together once all
    // flows, may see either.
    let into_server = NftDrop::input(&pair.server, &format!("tcp dport {PORT}"));
    let into_client = NftDrop::input(&pair.client, &format!("tcp sport {PORT}"));
    for s in accepted.iter().chain(&clients) {
        s.shutdown(Shutdown::Write).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(into_server);
    // The client's FIN is retransmitted within a few hundred ms.
    std::thread::sleep(Duration::from_millis(1500));
    drop(into_client);
    std::thread::sleep(Duration::from_millis(2500));
    drop((clients, accepted));
    std::thread::sleep(Duration::from_millis(500));
    let servers = closed_rows(&daemon, PORT, "server");
    assert_eq!(servers.len(), 2, "{servers:?}");
    for row in servers {
        assert_eq!(row["closed_by"], "both", "{row}");
        assert_eq!(row["close"], "fin", "{row}");
        let closing = row["closing_us"]
            .as_f64()
            .unwrap_or_else(|| panic!("no CLOSING time: {row}"));
        assert!(closing > 0.0, "{row}");
    }
    let clients = closed_rows(&daemon, PORT, "client");
    assert_eq!(clients.len(), 2, "{clients:?}");
    for row in clients {
        assert!(
            row["closed_by"] == "both" || row["closed_by"] == "local",
            "{row}"
        );
        assert_eq!(row["close"], "fin", "{row}");
    }
}
