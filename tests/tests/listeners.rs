//! Listen queues and dropped handshakes, against `ss`, `nstat` and what
//! was sent: listeners with small backlogs in fresh namespaces,
//! overflowed on purpose (a listener that never accepts, final ACKs that
//! never arrive, a SYN flood), SYNs to a closed port.

use std::{
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use handshake_tests::{Daemon, NetnsPair, NftDrop, require_root, serial, sh, spawn_in};

/// A listener socket with backlog `backlog` on `addr`, made with socket2's
/// calls through libc (std's `TcpListener::bind` listens with 128).
fn listen(addr: SocketAddr, backlog: i32) -> TcpListener {
    use std::os::fd::FromRawFd as _;
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a fresh fd, owned by the listener
    // returned; the address structs are valid for the sizes given.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        );
        let rc = match addr {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                libc::bind(fd, (&raw const sin).cast(), size_of_val(&sin) as u32)
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                libc::bind(fd, (&raw const sin6).cast(), size_of_val(&sin6) as u32)
            }
        };
        assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, backlog), 0, "listen");
        TcpListener::from_raw_fd(fd)
    }
}

/// `ss -tlnm` in `ns` for port `port`: per local address, (Recv-Q, Send-Q,
/// drops).
fn ss_listeners(ns: &str, port: u16) -> Vec<(String, u32, u32, u32)> {
    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "ss",
            "-tlnmH",
            &format!("sport = :{port}"),
        ],
    );
    let mut rows = Vec::new();
    let mut lines = out.lines();
    while let Some(line) = lines.next() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() != Some(&"LISTEN") {
            continue;
        }
        let skmem = lines.next().unwrap_or_default();
        let drops = skmem
            .trim()
            .trim_start_matches("skmem:(")
            .trim_end_matches(')')
            .split(',')
            .find_map(|f| f.strip_prefix('d'))
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let local = fields[3].rsplit_once(':').map_or("", |(a, _)| a);
        let local = local
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        rows.push((
            local,
            fields[1].parse().unwrap(),
            fields[2].parse().unwrap(),
            drops,
        ));
    }
    rows.sort();
    rows
}

/// The daemon's listeners on `port` in `ns`, as ss's rows.
fn daemon_listeners(daemon: &Daemon, ns: &str, port: u16) -> Vec<(String, u32, u32, u32)> {
    let port_arg = port.to_string();
    let listed = daemon.cli_json("listeners", &["--netns", ns, "--port", &port_arg]);
    let mut rows: Vec<_> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| {
            (
                v["local_addr"].as_str().unwrap().to_owned(),
                v["accept_queue"].as_u64().unwrap() as u32,
                v["accept_queue_max"].as_u64().unwrap() as u32,
                v["drops"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    rows.sort();
    rows
}

/// A `TcpExt` counter of `nstat` in `ns`.
fn nstat(ns: &str, name: &str) -> u64 {
    let out = sh("ip", &["netns", "exec", ns, "nstat", "-az", name]);
    out.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == name).then(|| f.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// A listener with backlog 3 that never accepts, and 20 clients per
/// family: 4 connections wait for accept() (the kernel lets one more than
/// the backlog in), the others' SYNs are dropped and retransmitted. The
/// daemon's queues and drops equal ss's at a quiet moment; the
/// namespace's overflow counter equals nstat's; once accepted, the
/// clients' handshakes are marked as having waited on the listener.
#[test]
fn a_listener_that_never_accepts_shows_its_full_queue_and_drops() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = Daemon::start(&[]);
    const PORT: u16 = 7700;
    let addrs: Vec<SocketAddr> = [NetnsPair::SERVER_V4, NetnsPair::SERVER_V6]
        .iter()
        .map(|h| {
            let ip: std::net::IpAddr = h.parse().unwrap();
            SocketAddr::new(ip, PORT)
        })
        .collect();
    let listeners = {
        let addrs = addrs.clone();
        spawn_in(&pair.server, move || {
            addrs.iter().map(|a| listen(*a, 3)).collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    };
    let clients: Vec<_> = addrs
        .iter()
        .flat_map(|a| std::iter::repeat_n(*a, 20))
        .map(|a| {
            spawn_in(&pair.client, move || {
                TcpStream::connect_timeout(&a, Duration::from_secs(60)).ok()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));

    // SYN retransmissions keep the drops growing: compare at a moment
    // when ss reads the same before and after the daemon does.
    let mut matched = false;
    for _ in 0..20 {
        let before = ss_listeners(&pair.server, PORT);
        let ours = daemon_listeners(&daemon, &pair.server, PORT);
        let after = ss_listeners(&pair.server, PORT);
        if before == after {
            assert_eq!(ours, before, "the daemon's listeners against ss");
            matched = true;
            break;
        }
    }
    assert!(matched, "ss never read the same twice in a row");
    let ours = daemon_listeners(&daemon, &pair.server, PORT);
    assert_eq!(ours.len(), 2, "{ours:?}");
    for (addr, accept_queue, max, drops) in &ours {
        assert_eq!((*accept_queue, *max), (4, 3), "{addr}");
        assert!(*drops > 0, "{addr}: no drops");
    }
    // The namespace's counters, as nstat reads them at the same census.
    let listed = daemon.cli_json("states", &["--netns", &pair.server]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let metrics = daemon.scrape();
    let overflows = metrics.get(
        "handshake_tcp_listen_overflows_total",
        &[("netns", &pair.server)],
    );
    let truth = nstat(&pair.server, "TcpExtListenOverflows") as f64;
    assert!(
        (overflows - truth).abs() <= 4.0 && overflows > 0.0,
        "ListenOverflows {overflows} against nstat's {truth}"
    );
    let port = PORT.to_string();
    let labels = [("netns", pair.server.as_str()), ("port", port.as_str())];
    assert_eq!(
        metrics.get(
            "handshake_tcp_listen_queue_length",
            &[labels[0], labels[1], ("queue", "accept")]
        ),
        8.0
    );
    assert_eq!(metrics.get("handshake_tcp_listen_queue_max", &labels), 6.0);
    assert!(metrics.get("handshake_tcp_listen_drops_total", &labels) > 0.0);

    // Accepted at last: the clients' handshakes complete after SYN
    // retransmissions, marked as having waited on their listener.
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || {
                let mut held = Vec::new();
                l.set_nonblocking(true).unwrap();
                let until = Instant::now() + Duration::from_secs(20);
                while held.len() < 20 && Instant::now() < until {
                    match l.accept() {
                        Ok((s, _)) => held.push(s),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                held
            })
        })
        .collect();
    let connected: Vec<TcpStream> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap())
        .collect();
    assert_eq!(connected.len(), 40, "every client connected once accepted");
    let held: Vec<Vec<TcpStream>> = accepting.into_iter().map(|a| a.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let rows = daemon.conns(&["--port", &port, "--role", "client"]);
    let retransmitted: Vec<_> = rows
        .iter()
        .filter(|r| r["syn_retransmits"].as_u64() > Some(0))
        .collect();
    assert!(!retransmitted.is_empty(), "{rows:?}");
    for row in retransmitted {
        assert_eq!(row["listener_overflowing"], true, "{row}");
    }
    for s in &connected {
        let _ = s.shutdown(Shutdown::Both);
    }
    drop((connected, held));
}

/// Final ACKs that never leave the client: the server's request sockets
/// wait in the SYN queue, as many as ss lists in SYN-RECV for the port.
#[test]
fn request_sockets_waiting_for_the_final_ack_are_the_syn_queue() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = Daemon::start(&[]);
    const PORT: u16 = 7701;
    let _no_final_acks = NftDrop::output(
        &pair.client,
        &format!("tcp dport {PORT} tcp flags & (syn | ack | fin | rst) == ack"),
    );
    let addrs: Vec<SocketAddr> = [NetnsPair::SERVER_V4, NetnsPair::SERVER_V6]
        .iter()
        .map(|h| SocketAddr::new(h.parse().unwrap(), PORT))
        .collect();
    let listeners = {
        let addrs = addrs.clone();
        spawn_in(&pair.server, move || {
            addrs.iter().map(|a| listen(*a, 64)).collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    };
    // The clients think they are connected (their ACK left, as far as
    // they know); the server waits for it.
    let clients: Vec<TcpStream> = addrs
        .iter()
        .flat_map(|a| std::iter::repeat_n(*a, 5))
        .map(|a| {
            spawn_in(&pair.client, move || {
                TcpStream::connect_timeout(&a, Duration::from_secs(5)).expect("connect")
            })
            .join()
            .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let syn_recv = sh(
        "ip",
        &[
            "netns",
            "exec",
            &pair.server,
            "ss",
            "-tanH",
            "state",
            "syn-recv",
            &format!("sport = :{PORT}"),
        ],
    )
    .lines()
    .count() as u64;
    assert_eq!(syn_recv, 10, "ss's SYN-RECV sockets");
    let listed = daemon.cli_json(
        "listeners",
        &["--netns", &pair.server, "--port", &PORT.to_string()],
    );
    let queued: u64 = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["syn_queue"].as_u64().unwrap())
        .sum();
    assert_eq!(queued, syn_recv, "{listed}");
    for v in listed.as_array().unwrap() {
        assert_eq!(v["syn_queue"], 5, "{v}");
        assert_eq!(v["accept_queue"], 0, "{v}");
    }
    drop((clients, listeners));
}

/// SYNs to a port nobody listens on are refused: each is a `no_socket`
/// drop of a SYN on that port, in that namespace.
#[test]
fn syns_to_a_closed_port_are_no_socket_drops() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = Daemon::start(&[]);
    const PORT: u16 = 7702;
    // Once the daemon has counted the namespace, its series carry its
    // name (before, `ns:<inode>`).
    daemon.cli_json("states", &["--netns", &pair.server]);
    let mut refused = 0;
    for host in [NetnsPair::SERVER_V4, NetnsPair::SERVER_V6] {
        let addr = SocketAddr::new(host.parse().unwrap(), PORT);
        for _ in 0..7 {
            let result = spawn_in(&pair.client, move || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            })
            .join()
            .unwrap();
            match result {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }
    let port = PORT.to_string();
    let metrics = daemon.scrape();
    let dropped = metrics.get(
        "handshake_tcp_handshake_drops_total",
        &[
            ("netns", &pair.server),
            ("port", &port),
            ("packet", "syn"),
            ("reason", "no_socket"),
        ],
    );
    assert_eq!(
        dropped,
        f64::from(refused),
        "no_socket drops against refusals"
    );
}

/// A SYN flood from one address whose SYN-ACKs the client's namespace
/// drops, against a listener with a small backlog and `tcp_syncookies=1`:
/// the listener reports SYN cookies while `SyncookiesSent` grows, and
/// handshakes to another port are still measured.
#[test]
fn a_syn_flood_shows_syn_cookies_and_real_handshakes_still_count() {
    require_root();
    let _serial = serial();
    if Command::new("hping3").arg("--version").output().is_err() {
        return handshake_tests::skip("hping3 is not installed");
    }
    let pair = NetnsPair::new();
    let daemon = Daemon::start(&[]);
    const FLOODED: u16 = 7703;
    const OTHER: u16 = 7704;
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &pair.server,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_syncookies=1",
        ],
    );
    let _no_synacks = NftDrop::input(
        &pair.client,
        &format!("tcp sport {FLOODED} tcp flags & (syn | ack) == syn | ack"),
    );
    let flooded = SocketAddr::new(NetnsPair::SERVER_V4.parse().unwrap(), FLOODED);
    let other = SocketAddr::new(NetnsPair::SERVER_V4.parse().unwrap(), OTHER);
    let listeners = spawn_in(&pair.server, move || {
        (listen(flooded, 8), listen(other, 64))
    })
    .join()
    .unwrap();
    let sent_before = nstat(&pair.server, "TcpExtSyncookiesSent");
    let mut flood = Command::new("ip")
        .args(["netns", "exec", &pair.client, "hping3", "-q", "-S", "-p"])
        .arg(FLOODED.to_string())
        .args(["-i", "u1000", "-c", "6000", NetnsPair::SERVER_V4])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("hping3");
    std::thread::sleep(Duration::from_secs(2));
    let listed = daemon.cli_json(
        "listeners",
        &["--netns", &pair.server, "--port", &FLOODED.to_string()],
    );
    let sent = nstat(&pair.server, "TcpExtSyncookiesSent");
    assert!(sent > sent_before, "SyncookiesSent did not grow");
    assert_eq!(listed[0]["syn_cookies"], true, "{listed}");
    // Full: the kernel queues one more request than the backlog.
    assert_eq!(listed[0]["syn_queue"], 9, "{listed}");
    let metrics = daemon.scrape();
    let port = FLOODED.to_string();
    assert_eq!(
        metrics.get(
            "handshake_tcp_listen_syn_cookies",
            &[("netns", &pair.server), ("port", &port)]
        ),
        1.0
    );
    // Real handshakes to the other port, during the flood.
    let accept = std::thread::spawn(move || {
        let (_, other_listener) = &listeners;
        (0..10)
            .map(|_| other_listener.accept().unwrap().0)
            .collect::<Vec<_>>()
    });
    let clients: Vec<TcpStream> = (0..10)
        .map(|_| {
            spawn_in(&pair.client, move || {
                TcpStream::connect_timeout(&other, Duration::from_secs(5)).expect("connect")
            })
            .join()
            .unwrap()
        })
        .collect();
    let accepted = accept.join().unwrap();
    let _ = flood.wait();
    std::thread::sleep(Duration::from_millis(1500));
    let rows = daemon.conns(&["--port", &OTHER.to_string(), "--role", "server"]);
    let established = rows
        .iter()
        .filter(|r| r["outcome"] == "established")
        .count();
    assert_eq!(established, 10, "{rows:?}");
    drop((clients, accepted));
}
