//! Load and abuse against a running daemon, kept as tests: a SYN flood
//! while real clients connect, stalled and hostile API clients, garbage
//! on the metrics port, and parallel scrapes. Each asserts what must hold
//! (every real handshake measured, nothing lost, a real request still
//! answered) and prints its figures (docs/BENCHMARKS.md).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use handshake_tests::{
    Daemon, NetnsPair, echo_clients, echo_server, handshake_bin, http_get, require_root, serial,
    skip,
};

/// The daemon's resident memory, in MiB.
fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// `handshake status --json` against `daemon`, and how long it took.
fn timed_status(daemon: &Daemon) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    let out = Command::new(handshake_bin())
        .args(["status", "--json", "--api-socket"])
        .arg(&daemon.api_socket)
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (serde_json::from_slice(&out.stdout).unwrap(), took)
}

#[test]
fn a_syn_flood_loses_no_real_handshake() {
    require_root();
    let _serial = serial();
    if Command::new("hping3").arg("--version").output().is_err() {
        return skip("hping3 is not installed");
    }
    let pair = NetnsPair::new();
    let daemon = pair.server_daemon(&[]);
    const REAL: usize = 300;
    const PORT: u16 = 8080;
    let server: SocketAddr = format!("{}:{PORT}", NetnsPair::SERVER_V4).parse().unwrap();
    let serving = echo_server(&pair.server, server, REAL);
    let rss_before = rss_mib(daemon.pid());
    let before = daemon.scrape();
    // Ten seconds of SYNs as fast as hping3 sends them, from random
    // sources: the half-open table and the listener's SYN queue fill.
    let flood = Command::new("ip")
        .args(["netns", "exec", &pair.client, "timeout", "-s", "INT", "10"])
        .args([
            "hping3",
            "-S",
            "--flood",
            "--rand-source",
            "-p",
            &PORT.to_string(),
        ])
        .arg(NetnsPair::SERVER_V4)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hping3");
    std::thread::sleep(Duration::from_secs(1));
    echo_clients(&pair.client, server, REAL);
    serving.join().expect("echo server");
    let said = flood.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&said.stderr);
    let sent: u64 = said
        .lines()
        .find_map(|l| l.split(" packets transmitted").next()?.trim().parse().ok())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(1500));
    let after = daemon.scrape();
    let grew = |name: &str, labels: &[(&str, &str)]| {
        after.try_get(name, labels).unwrap_or(0.0) - before.try_get(name, labels).unwrap_or(0.0)
    };
    let established = grew(
        "handshake_tcp_handshakes_total",
        &[("role", "server"), ("outcome", "established")],
    );
    let syns = grew(
        "handshake_packets_total",
        &[("direction", "ingress"), ("kind", "syn")],
    );
    let rss_after = rss_mib(daemon.pid());
    eprintln!(
        "SYN flood: {sent} SYNs sent by hping3, {syns} seen by the hooks; {established} of {REAL} \
         real handshakes measured; ring buffer drops {}, socket events lost {}; RSS {rss_before:.1} → \
         {rss_after:.1} MiB",
        grew("handshake_ringbuf_dropped_total", &[]),
        grew("handshake_socket_events_dropped_total", &[]),
    );
    assert!(
        syns > 10_000.0,
        "the flood was too thin to mean anything: {syns} SYNs"
    );
    assert!(
        established >= REAL as f64,
        "{established} of {REAL} real handshakes measured"
    );
    assert_eq!(grew("handshake_ringbuf_dropped_total", &[]), 0.0);
    assert_eq!(grew("handshake_socket_events_dropped_total", &[]), 0.0);
    assert!(
        rss_after - rss_before < 32.0,
        "RSS grew {rss_before:.1} → {rss_after:.1} MiB"
    );
    let real: Vec<_> = daemon
        .conns(&["--role", "server", "--port", &PORT.to_string()])
        .into_iter()
        .filter(|c| c["outcome"] == "established")
        .collect();
    assert!(real.len() >= REAL, "{} established rows listed", real.len());
}

#[test]
fn stalled_and_hostile_api_clients_do_not_delay_a_real_request() {
    require_root();
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let (_, quiet) = timed_status(&daemon);
    // Twenty clients that connect and say nothing, one that sends a
    // megabyte of garbage, one that sends a request and never reads.
    let stalled: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&daemon.api_socket).unwrap())
        .collect();
    let mut garbage = UnixStream::connect(&daemon.api_socket).unwrap();
    garbage
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let bytes: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    // The daemon reads at most a short line, then answers and closes.
    let _ = garbage.write_all(&bytes);
    let mut deaf = UnixStream::connect(&daemon.api_socket).unwrap();
    deaf.write_all(b"conns\n").unwrap();
    let (status, busy) = timed_status(&daemon);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let mut answer = String::new();
    let _ = garbage.read_to_string(&mut answer);
    assert!(
        answer.contains("error"),
        "garbage is refused: {answer:.200}"
    );
    eprintln!(
        "API: status answered in {:.1} ms quiet, {:.1} ms with 20 stalled clients, a megabyte \
         of garbage and a client that never reads",
        quiet.as_secs_f64() * 1e3,
        busy.as_secs_f64() * 1e3
    );
    // Stalled clients are cut after 5 s; a real request never waits on them.
    assert!(busy < Duration::from_secs(2), "status took {busy:?}");
    drop(stalled);
    drop(deaf);
    assert!(
        daemon.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        daemon.log()
    );
}

#[test]
fn garbage_on_the_metrics_port_and_parallel_scrapes() {
    require_root();
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let addr = daemon.metrics_addr.clone();
    let send = |bytes: &[u8]| -> String {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    // (what, bytes, whether it is a request for /metrics after all)
    for (what, bytes, metrics) in [
        (
            "binary",
            (0..4096u32)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<u8>>(),
            false,
        ),
        ("a POST", b"POST /metrics HTTP/1.1\r\n\r\n".to_vec(), false),
        (
            "an unknown path",
            b"GET /../../etc/passwd HTTP/1.1\r\n\r\n".to_vec(),
            false,
        ),
        // Read up to the limit, then answered by its first line.
        ("a line without an end", b"GET /metrics".to_vec(), true),
        ("100 KB of headers", huge.into_bytes(), true),
    ] {
        let answer = send(&bytes);
        let ok = answer.starts_with("HTTP/1.1 200");
        assert_eq!(ok, metrics, "{what}: {answer:.200}");
    }
    // A client that opens and says nothing, held while others scrape.
    let _silent = TcpStream::connect(&addr).unwrap();
    let started = Instant::now();
    let scrapes: Vec<_> = (0..20)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || http_get(&addr, "/metrics"))
        })
        .collect();
    let bodies: Vec<String> = scrapes
        .into_iter()
        .map(|s| s.join().unwrap().expect("a scrape answered 200"))
        .collect();
    let took = started.elapsed();
    for body in &bodies {
        assert!(
            body.contains("handshake_build_info"),
            "a whole exposition: {body:.200}"
        );
        assert!(
            body.trim_end()
                .ends_with(|c: char| c.is_ascii_digit() || c == 'f'),
            "complete"
        );
    }
    eprintln!(
        "metrics: 20 parallel scrapes of {} bytes each answered in {:.1} ms in all, after \
         binary garbage, an unterminated line, a POST, a bad path and 100 KB of headers",
        bodies[0].len(),
        took.as_secs_f64() * 1e3
    );
    assert!(http_get(&addr, "/healthz").is_ok_and(|b| b == "ok\n"));
    assert!(
        daemon.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        daemon.log()
    );
}
