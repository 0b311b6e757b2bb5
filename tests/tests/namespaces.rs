//! The daemon against real traffic: two network namespaces joined by a veth
//! pair, the daemon attached to the server side, plain TCP and real TLS
//! (openssl s_server / s_client, TLS 1.2 and 1.3) over IPv4 and IPv6.
//! What the daemon reports is compared with what was sent and with what
//! tcpdump saw on the same interface.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use handshake_tests::{
    Capture, Metrics, NetnsPair, TlsServer, echo_clients, echo_server, flag_counts, handshake_bin,
    http_get, require_root, serial, sh, tcx_programs,
};

const PLAIN_V4: usize = 120;
const PLAIN_V6: usize = 80;
const TLS_PORT: u16 = 4433;

/// One TLS connection from the client namespace with `openssl s_client`.
fn tls_client(pair: &NetnsPair, server: &str, version: &str, sni: Option<&str>) {
    let connect = format!("{server}:{TLS_PORT}");
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &pair.client,
        "openssl",
        "s_client",
        "-connect",
        &connect,
        version,
    ]);
    if let Some(sni) = sni {
        cmd.args(["-servername", sni]);
    } else {
        cmd.arg("-noservername");
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Cipher is") && !stdout.contains("Cipher is (NONE)"),
        "TLS handshake {version} to {connect} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn deltas(before: &Metrics, after: &Metrics, direction: &str, kind: &str) -> u64 {
    after.packets(direction, kind) - before.packets(direction, kind)
}

#[test]
fn counters_equal_what_was_sent_and_what_tcpdump_saw() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    // XDP ingress here (the default, tc, is what the other tests use).
    let daemon = pair.server_daemon(&["--ingress-hook", "xdp"]);
    let before = daemon.scrape();
    for probe in ["xdp_handshake", "tc_eg_handshake"] {
        assert_eq!(
            before.get(
                "handshake_probe_attached",
                &[("probe", probe), ("interface", &pair.server_if)]
            ),
            1.0,
            "{probe} not attached:\n{}",
            daemon.log()
        );
    }
    assert_eq!(
        before.get("handshake_probe_attached", &[("probe", "tp_sock_state")]),
        1.0
    );

    let capture = Capture::start(&pair.server, &pair.server_if);

    // Plain TCP, both families.
    let v4: SocketAddr = format!("{}:8080", NetnsPair::SERVER_V4).parse().unwrap();
    let v6: SocketAddr = format!("[{}]:8080", NetnsPair::SERVER_V6).parse().unwrap();
    let server4 = echo_server(&pair.server, v4, PLAIN_V4);
    echo_clients(&pair.client, v4, PLAIN_V4);
    server4.join().expect("IPv4 server");
    let server6 = echo_server(&pair.server, v6, PLAIN_V6);
    echo_clients(&pair.client, v6, PLAIN_V6);
    server6.join().expect("IPv6 server");

    // TLS 1.2 and 1.3, with and without SNI, both families.
    let tls_runs: Vec<(&str, &str, Option<&str>)> = [
        (NetnsPair::SERVER_V4, "-tls1_2", Some("test.example")),
        (NetnsPair::SERVER_V4, "-tls1_3", Some("test.example")),
        (NetnsPair::SERVER_V4, "-tls1_3", None),
        ("[fd00:201::2]", "-tls1_2", None),
        ("[fd00:201::2]", "-tls1_3", Some("v6.test.example")),
    ]
    .into_iter()
    .cycle()
    .take(20)
    .collect();
    let naccept = tls_runs.len().to_string();
    let s_server = TlsServer::start(&pair.server, TLS_PORT, &["-naccept", &naccept]);
    for (server, version, sni) in &tls_runs {
        tls_client(&pair, server, version, *sni);
    }
    drop(s_server);

    // Let the last FINs and ACKs cross before reading both sides.
    std::thread::sleep(Duration::from_millis(500));
    let after = daemon.scrape();
    let lines = capture.finish();
    let (ingress, egress) = flag_counts(&lines, &[NetnsPair::SERVER_V4, NetnsPair::SERVER_V6]);

    let connections = (PLAIN_V4 + PLAIN_V6 + tls_runs.len()) as u64;
    // What was sent.
    assert_eq!(ingress.syn, connections, "tcpdump: SYNs in");
    assert_eq!(
        deltas(&before, &after, "ingress", "syn"),
        connections,
        "SYNs in"
    );
    assert_eq!(
        deltas(&before, &after, "egress", "syn_ack"),
        connections,
        "SYN-ACKs out"
    );
    assert_eq!(
        deltas(&before, &after, "ingress", "client_hello"),
        tls_runs.len() as u64,
        "ClientHellos in"
    );
    assert_eq!(
        deltas(&before, &after, "egress", "server_hello"),
        tls_runs.len() as u64,
        "ServerHellos out"
    );
    for (direction, kind) in [
        ("egress", "syn"),
        ("ingress", "syn_ack"),
        ("egress", "client_hello"),
        ("ingress", "server_hello"),
    ] {
        assert_eq!(
            deltas(&before, &after, direction, kind),
            0,
            "{direction} {kind}"
        );
    }
    // What tcpdump saw, per direction and flag (FIN and RST depend on how
    // openssl closes; the capture is the judge).
    for (direction, seen) in [("ingress", ingress), ("egress", egress)] {
        for (kind, want) in [
            ("syn", seen.syn),
            ("syn_ack", seen.syn_ack),
            ("fin", seen.fin),
            ("rst", seen.rst),
        ] {
            assert_eq!(
                deltas(&before, &after, direction, kind),
                want,
                "{direction} {kind}: daemon vs tcpdump"
            );
        }
    }
    // Plain connections close cleanly: one FIN each way at least for each.
    assert!(ingress.fin >= (PLAIN_V4 + PLAIN_V6) as u64);
    assert!(egress.fin >= (PLAIN_V4 + PLAIN_V6) as u64);

    // The state tracepoint is host-wide; the snapshots were read through
    // the API socket, so our connections are all it saw.
    let opened = connections;
    let transitions = |from, to| after.transitions(from, to) - before.transitions(from, to);
    assert_eq!(transitions("close", "syn_sent"), opened, "connect()s");
    assert_eq!(
        transitions("syn_sent", "established"),
        opened,
        "active opens"
    );
    assert_eq!(transitions("listen", "syn_recv"), opened, "passive opens");
    assert_eq!(transitions("syn_recv", "established"), opened, "accepted");
    assert_eq!(
        after.get("handshake_parse_errors_total", &[("kind", "tcp_truncated")]),
        0.0
    );

    // Prometheus reads the same over HTTP.
    let scraped =
        Metrics::parse(&http_get(&daemon.metrics_addr, "/metrics").expect("GET /metrics"));
    assert_eq!(
        scraped.packets("egress", "syn_ack"),
        after.packets("egress", "syn_ack")
    );

    let status = daemon.stop(libc::SIGTERM);
    assert!(status.success(), "daemon exit on SIGTERM: {status}");
}

/// After SIGTERM (either ingress hook) and even after SIGKILL, nothing of
/// ours is left on the interface.
#[test]
fn stopping_the_daemon_leaves_nothing_attached() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    for (hook, signal) in [
        ("xdp", libc::SIGTERM),
        ("tc", libc::SIGTERM),
        ("xdp", libc::SIGINT),
        ("xdp", libc::SIGKILL),
    ] {
        let daemon = pair.server_daemon(&["--ingress-hook", hook]);
        // The API is root's alone unless opened up.
        let socket = daemon.api_socket.clone();
        let mode = std::fs::metadata(&socket)
            .expect("API socket")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{}",
            socket.display()
        );
        let attached = attachments(&pair);
        assert!(
            attached.contains("tc_eg_handshake"),
            "egress hook not visible while running ({hook}):\n{attached}"
        );
        let status = daemon.stop(signal);
        if signal != libc::SIGKILL {
            assert!(
                status.success(),
                "exit status after signal {signal}: {status}"
            );
            assert!(!socket.exists(), "{} left behind", socket.display());
        }
        // Links held by a killed process are released asynchronously.
        let mut left = attachments(&pair);
        for _ in 0..50 {
            if !left.contains("handshake") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            left = attachments(&pair);
        }
        assert!(
            !left.contains("handshake"),
            "left behind after {hook} daemon got signal {signal}:\n{left}"
        );
        let link = sh(
            "ip",
            &["-n", &pair.server, "link", "show", "dev", &pair.server_if],
        );
        assert!(!link.contains("xdp"), "XDP still attached:\n{link}");
    }
}

/// What `ip link`, `tc filter show` and a TCX query show on the server veth.
fn attachments(pair: &NetnsPair) -> String {
    let mut out = sh(
        "ip",
        &["-n", &pair.server, "link", "show", "dev", &pair.server_if],
    );
    for parent in ["ingress", "egress"] {
        out += &sh(
            "tc",
            &[
                "-n",
                &pair.server,
                "filter",
                "show",
                "dev",
                &pair.server_if,
                parent,
            ],
        );
    }
    for line in tcx_programs(&pair.server, &pair.server_if) {
        out += &line;
        out.push('\n');
    }
    out
}

#[test]
fn bad_interface_or_namespace_is_one_line_and_non_zero() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    for (args, needle) in [
        (
            vec!["--netns", &pair.server, "--iface", "nosuch0"],
            "\"nosuch0\"",
        ),
        (vec!["--iface", "nosuch0"], "\"nosuch0\""),
        (vec!["--netns", "hs-no-such-ns"], "\"hs-no-such-ns\""),
        (vec!["--metrics-addr", "nonsense"], "nonsense"),
        (vec!["--xdp-mode", "turbo"], "turbo"),
    ] {
        let out = Command::new(handshake_bin())
            .arg("daemon")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run handshake");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: error must name {needle}: {stderr}"
        );
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains(needle),
            "{args:?}: first line must say it: {stderr}"
        );
    }
    // The CLI without a daemon: one line, non-zero.
    let out = Command::new(handshake_bin())
        .args(["conns", "--api-socket", "/run/handshake-test-no-such.sock"])
        .stdin(Stdio::null())
        .output()
        .expect("run handshake conns");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "conns without a daemon must fail");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("no daemon answers on /run/handshake-test-no-such.sock"),
        "{stderr}"
    );
    // Nothing was attached by the failed starts.
    assert!(!attachments(&pair).contains("handshake"));
}

/// Two daemons on one interface: each sees every packet. The tc hooks
/// pass the verdict on (TCX_NEXT), so neither ends the other's chain, nor
/// that of any other program attached after ours.
#[test]
fn two_daemons_on_one_interface_both_see_every_packet() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let first = pair.server_daemon(&[]);
    let second = pair.server_daemon(&[]);
    let n = 20;
    let addr: SocketAddr = format!("{}:8085", NetnsPair::SERVER_V4).parse().unwrap();
    let server = echo_server(&pair.server, addr, n);
    echo_clients(&pair.client, addr, n);
    server.join().expect("echo server");
    for (which, daemon) in [("first", &first), ("second", &second)] {
        let m = daemon.scrape();
        assert_eq!(m.packets("ingress", "syn"), n as u64, "{which} daemon");
        assert_eq!(m.packets("egress", "syn_ack"), n as u64, "{which} daemon");
    }
}
