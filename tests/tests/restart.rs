//! Restarts that lose nothing: a daemon of a kept instance killed with
//! SIGKILL in the middle of loopback traffic, and started again, counts
//! every handshake of the traffic exactly once, knows the ages of the
//! CLOSE_WAIT sockets it knew, and its counters go on from where they
//! were. SIGTERM detaches every program and keeps the maps; `--fresh` and
//! `handshake reset` start again from 0; one daemon per instance.
//!
//! The traffic is this test's alone (the tests of this file run one at a
//! time, the test binaries one after another), so the daemon's host-wide
//! totals must move by exactly what the test did.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use handshake_tests::{
    Daemon, Metrics, NetnsPair, echo_clients, echo_server, handshake_bin, require_root, serial,
    spawn_in, tc_filters, tcx_programs, xdp_program,
};
use handshake_user::kernel::loader::PRETEND_MISSING;
use serde_json::Value;

/// An instance of this test's own; its kept state goes when it drops
/// (after the daemons, which are declared after it).
struct Instance(String);

impl Instance {
    fn new(test: &str) -> Self {
        let this = Self(format!("hs-test-{test}-{}", std::process::id()));
        let _ = reset(&this.0);
        this
    }

    fn pins(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/handshake").join(&self.0)
    }

    fn start(&self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--instance", self.0.as_str()];
        args.extend_from_slice(extra);
        Daemon::start(&args)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = reset(&self.0);
    }
}

fn reset(instance: &str) -> std::process::Output {
    Command::new(handshake_bin())
        .args(["reset", "--instance", instance])
        .output()
        .expect("run handshake reset")
}

/// A loopback listener on a port below the ephemeral range (the clients'
/// ports never collide with it).
fn listener() -> TcpListener {
    let base = 20_000 + (std::process::id() % 5_000) as u16;
    (0..2_000)
        .find_map(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
        .expect("a free loopback port")
}

/// `count` connections to a fresh echo listener at `rate` per second, each
/// one byte each way and closed by the client; returns when all are done.
fn traffic(count: usize, rate: f64) -> thread::JoinHandle<()> {
    let server = listener();
    let addr = server.local_addr().unwrap();
    thread::spawn(move || {
        let serving = thread::spawn(move || {
            for _ in 0..count {
                let (mut s, _) = server.accept().expect("accept");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).expect("read");
                s.write_all(&b).expect("write");
            }
        });
        let start = Instant::now();
        for i in 0..count {
            let mut c = TcpStream::connect(addr).expect("connect");
            c.write_all(b"x").expect("write");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).expect("read");
            drop(c);
            let due = start + Duration::from_secs_f64((i + 1) as f64 / rate);
            thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        serving.join().unwrap();
    })
}

/// Established handshakes per role.
fn established(m: &Metrics) -> (f64, f64) {
    (m.established("client"), m.established("server"))
}

/// Every counter of `families` in `before` is at least as high in `after`:
/// what Prometheus needs to see no reset.
fn no_counter_went_back(before: &Metrics, after: &Metrics, families: &[&str]) {
    for family in families {
        let (b, a) = (before.get(family, &[]), after.get(family, &[]));
        assert!(a >= b, "{family} went back from {b} to {a}: a reset");
    }
}

/// The CLOSE_WAIT ages the daemon gives the sockets on `port`.
fn close_wait_ages(daemon: &Daemon, port: u16) -> Vec<f64> {
    let rows = daemon.conns(&["--state", "close_wait"]);
    rows.iter()
        .filter(|r| r["local_port"] == port)
        .map(|r| r["state_age_s"].as_f64().expect("an age"))
        .collect()
}

#[test]
fn a_daemon_killed_mid_traffic_and_started_again_loses_nothing() {
    require_root();
    let _serial = serial();
    let instance = Instance::new("kill");
    let first = instance.start(&["--fresh"]);

    // Ten sockets held in CLOSE_WAIT: the client closed, the server did not.
    let held = listener();
    let held_port = held.local_addr().unwrap().port();
    let mut holders = Vec::new();
    for _ in 0..10 {
        let client = TcpStream::connect(held.local_addr().unwrap()).unwrap();
        holders.push(held.accept().unwrap().0);
        drop(client);
    }
    thread::sleep(Duration::from_secs(3));
    let ages_before = close_wait_ages(&first, held_port);
    assert_eq!(ages_before.len(), 10, "{ages_before:?}");
    assert!(ages_before.iter().all(|a| *a >= 2.5), "{ages_before:?}");
    thread::sleep(Duration::from_millis(1500));
    let start = first.scrape();
    let held_handshakes = established(&start);

    // 1,200 connections over 6 s; SIGKILL 2 s in, and a new daemon 1 s later.
    let connections = 1_200;
    let traffic = traffic(connections, 200.0);
    thread::sleep(Duration::from_secs(2));
    let before_kill = first.scrape();
    let killed_at = Instant::now();
    let status = first.stop(libc::SIGKILL);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    thread::sleep(Duration::from_secs(1));
    let second = instance.start(&[]);
    traffic.join().expect("traffic");
    // Held rows count after 1 s; a sweep every 200 ms.
    thread::sleep(Duration::from_millis(2500));
    let after = second.scrape();

    let (client, server) = established(&after);
    let expected = (
        held_handshakes.0 + connections as f64,
        held_handshakes.1 + connections as f64,
    );
    assert_eq!(
        (client, server),
        expected,
        "every handshake counted once, across a SIGKILL:\n{}",
        second.log()
    );
    no_counter_went_back(
        &before_kill,
        &after,
        &[
            "handshake_tcp_handshakes_total",
            "handshake_tcp_state_transitions_total",
            "handshake_tcp_handshake_duration_seconds_count",
            "handshake_tcp_closes_total",
        ],
    );
    assert_eq!(
        after.get("handshake_socket_events_dropped_total", &[]),
        0.0,
        "no socket-layer record lost"
    );

    // The CLOSE_WAIT sockets are as old as they are, not new.
    let ages_after = close_wait_ages(&second, held_port);
    assert_eq!(ages_after.len(), 10, "{ages_after:?}");
    let lived = killed_at.elapsed().as_secs_f64();
    for (before, after) in ages_before.iter().zip(&ages_after) {
        assert!(
            *after >= before + lived,
            "a CLOSE_WAIT age {before:.1} s before the restart is {after:.1} s {lived:.1} s later"
        );
    }

    // Status says what was kept, and that the tracepoints never left.
    let status = second.cli_json("status", &[]);
    assert_eq!(status["instance"], instance.0.as_str());
    let kept = status["kept"].as_str().unwrap();
    assert!(kept.contains("taken up from the daemon before"), "{kept}");
    for probe in status["probes"].as_array().unwrap() {
        if probe["probe"].as_str().unwrap().starts_with("tp_") {
            assert_eq!(
                probe["detail"], "tp_btf, pinned, kept from the daemon before",
                "{probe}"
            );
        }
    }
    drop(second);
    drop(holders);
}

/// Programs of `name` attached through a link now, host-wide.
fn links_of(name: &str) -> usize {
    let programs: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .map(|p| p.id())
        .collect();
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| programs.contains(&l.program_id()))
        .count()
}

#[test]
fn sigterm_detaches_and_keeps_the_maps_fresh_and_reset_forget_them() {
    require_root();
    let _serial = serial();
    let instance = Instance::new("term");
    let first = instance.start(&["--fresh"]);
    assert_eq!(links_of("tp_sock_state"), 1);

    // One daemon per instance.
    let out = Command::new(handshake_bin())
        .args(["daemon", "--instance", &instance.0])
        .args(["--metrics-addr", "127.0.0.1:0", "--api-socket"])
        .arg(std::env::temp_dir().join(format!("{}-2.sock", instance.0)))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.trim().lines().last().unwrap().contains("is in use"),
        "{said}"
    );
    // Nor is it reset under a running daemon.
    let out = reset(&instance.0);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use"));

    traffic(100, 500.0).join().unwrap();
    thread::sleep(Duration::from_millis(1500));
    let before = established(&first.scrape());
    assert!(before.0 >= 100.0 && before.1 >= 100.0, "{before:?}");

    // SIGTERM: nothing stays attached, the maps stay pinned.
    assert!(first.stop(libc::SIGTERM).success());
    assert_eq!(links_of("tp_sock_state"), 0, "SIGTERM detaches");
    let pinned: Vec<String> = std::fs::read_dir(instance.pins())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(pinned.iter().any(|p| p == "SOCK_LOG"), "{pinned:?}");
    assert!(!pinned.iter().any(|p| p.starts_with("link_")), "{pinned:?}");

    // Started again: the counters go on.
    let second = instance.start(&[]);
    traffic(50, 500.0).join().unwrap();
    thread::sleep(Duration::from_millis(1500));
    let after = established(&second.scrape());
    assert_eq!(after, (before.0 + 50.0, before.1 + 50.0));
    drop(second);

    // --fresh: from 0.
    let fresh = instance.start(&["--fresh"]);
    assert_eq!(established(&fresh.scrape()), (0.0, 0.0));
    drop(fresh);

    // reset: nothing left.
    let out = reset(&instance.0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!instance.pins().exists());
    assert!(!PathBuf::from(format!("/run/handshake/{}.checkpoint", instance.0)).exists());
}

/// The packet hooks too: on the server side of a veth pair, their links
/// (TCX, and XDP with `--ingress-hook xdp`) are pinned with the maps, so
/// across a SIGKILL the interface is never without its hooks; the new
/// daemon keeps them, and every handshake is counted once — the hooks' row
/// and the socket's joined. Then an upgrade (new maps: the programs are
/// swapped into the pinned links) and a change of ingress hook (the old
/// one goes); SIGTERM leaves nothing attached.
#[test]
fn packet_hooks_stay_attached_across_a_sigkill_and_every_handshake_counts_once() {
    hooks_across_a_sigkill("hooks", &[]);
}

/// The same with the ingress hook on XDP (a pinned XDP link) beside the
/// TCX egress hook.
#[test]
fn an_xdp_ingress_hook_stays_attached_across_a_sigkill_too() {
    hooks_across_a_sigkill("xdp", &["--ingress-hook", "xdp"]);
}

fn hooks_across_a_sigkill(test: &str, ingress: &[&str]) {
    require_root();
    let _serial = serial();
    let instance = Instance::new(test);
    let pair = NetnsPair::new();
    let mut hooks = vec![
        "--netns",
        pair.server.as_str(),
        "--iface",
        pair.server_if.as_str(),
    ];
    hooks.extend_from_slice(ingress);
    // What is attached to the server's veth: TCX programs and the XDP one.
    let attached = || {
        let mut names = tcx_programs(&pair.server, &pair.server_if);
        names.extend(xdp_program(&pair.server, &pair.server_if));
        names.sort();
        names
    };
    let mut args = vec!["--fresh"];
    args.extend_from_slice(&hooks);
    let first = instance.start(&args);
    let hooked = attached();
    assert_eq!(hooked.len(), 2, "ingress and egress: {hooked:?}");
    let connections = 1_000;
    let server: std::net::SocketAddr = format!("{}:8080", NetnsPair::SERVER_V4).parse().unwrap();
    let serving = echo_server(&pair.server, server, connections);
    let start = first.scrape();
    let clients = spawn_in(&pair.client, move || {
        let began = Instant::now();
        for i in 0..connections {
            let mut c = TcpStream::connect(server).expect("connect");
            c.write_all(b"x").expect("send");
            c.shutdown(std::net::Shutdown::Write).expect("half-close");
            c.read_to_end(&mut Vec::new()).expect("answer");
            let due = began + Duration::from_secs_f64((i + 1) as f64 / 200.0);
            thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    });
    thread::sleep(Duration::from_secs(2));
    first.stop(libc::SIGKILL);
    assert_eq!(attached(), hooked, "the hooks stay after SIGKILL");
    thread::sleep(Duration::from_secs(1));
    let second = instance.start(&hooks);
    clients.join().expect("clients");
    serving.join().expect("server");
    thread::sleep(Duration::from_millis(2500));
    let after = second.scrape();

    let served = after.established("server") - start.established("server");
    assert_eq!(served, connections as f64, "{}", second.log());
    assert_eq!(
        after.packets("ingress", "syn") - start.packets("ingress", "syn"),
        connections as u64,
        "the hooks saw every SYN"
    );
    let rows = second.conns(&["--role", "server", "--port", "8080"]);
    assert!(
        rows.iter().all(|r| r["source"] == "both"),
        "every row the hooks' and the socket's at once: {:?}",
        rows.iter()
            .filter(|r| r["source"] != "both")
            .take(3)
            .collect::<Vec<_>>()
    );
    let hooks_say = |daemon: &Daemon, how: &str| {
        let status = daemon.cli_json("status", &[]);
        let packet_hooks: Vec<Value> = status["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["interface"].is_string())
            .cloned()
            .collect();
        assert_eq!(packet_hooks.len(), 2, "{packet_hooks:?}");
        for probe in packet_hooks {
            assert!(probe["detail"].as_str().unwrap().ends_with(how), "{probe}");
        }
    };
    hooks_say(&second, ", pinned, kept from the daemon before");
    assert_eq!(attached(), hooked, "the same programs, never replaced");

    // An upgrade, as far as the hooks can tell: other table sizes, so the
    // maps are new and so must the programs be that write into them. They
    // are swapped into the pinned links in place.
    second.stop(libc::SIGKILL);
    let mut upgrade = hooks.clone();
    upgrade.extend(["--flow-entries", "8192"]);
    let third = instance.start(&upgrade);
    hooks_say(&third, ", pinned, its program replaced in place");
    assert_eq!(attached(), hooked, "one program on each hook");

    // The other ingress hook: the kept one goes, never both at once.
    third.stop(libc::SIGKILL);
    let other = if ingress.is_empty() { "xdp" } else { "tc" };
    let mut switched = hooks[..4].to_vec();
    switched.extend(["--ingress-hook", other]);
    let fourth = instance.start(&switched);
    let now = attached();
    assert_eq!(now.len(), 2, "one ingress and one egress hook: {now:?}");
    assert_ne!(now, hooked, "the ingress hook is the other kind");
    assert!(fourth.stop(libc::SIGTERM).success());
    assert_eq!(
        attached(),
        Vec::<String>::new(),
        "SIGTERM detaches the pinned hooks too"
    );
}

/// The clsact filters of the hooks on a kernel without TCX (forced) are not
/// the process's: after a SIGKILL they stay, and their program writes into
/// the pinned maps. The next daemon removes them before it attaches its
/// own, so no packet counts twice; SIGTERM leaves none.
#[test]
fn without_tcx_a_killed_daemons_filters_are_replaced_not_doubled() {
    require_root();
    let _serial = serial();
    let instance = Instance::new("clsact");
    let pair = NetnsPair::new();
    let start = |fresh: bool| {
        let mut args = vec![
            "--instance",
            instance.0.as_str(),
            "--netns",
            pair.server.as_str(),
            "--iface",
            pair.server_if.as_str(),
        ];
        if fresh {
            args.push("--fresh");
        }
        Daemon::start_with_env(&args, &[(PRETEND_MISSING, "tcx")])
    };
    let filters = || tc_filters(&pair.server, &pair.server_if, "ingress");
    let server: std::net::SocketAddr = format!("{}:8081", NetnsPair::SERVER_V4).parse().unwrap();
    let first = start(true);
    let serving = echo_server(&pair.server, server, 20);
    echo_clients(&pair.client, server, 20);
    serving.join().unwrap();
    first.stop(libc::SIGKILL);
    assert!(
        !filters().trim().is_empty(),
        "the filter outlives the process"
    );

    let second = start(false);
    thread::sleep(Duration::from_millis(1500));
    let before = second.scrape();
    let serving = echo_server(&pair.server, server, 50);
    echo_clients(&pair.client, server, 50);
    serving.join().unwrap();
    thread::sleep(Duration::from_millis(1500));
    let after = second.scrape();
    assert_eq!(
        after.packets("ingress", "syn") - before.packets("ingress", "syn"),
        50,
        "one filter, not two: {}",
        filters()
    );
    assert_eq!(
        after.established("server") - before.established("server"),
        50.0
    );
    assert!(second.stop(libc::SIGTERM).success());
    assert!(
        filters().trim().is_empty(),
        "SIGTERM leaves no filter: {}",
        filters()
    );
}
