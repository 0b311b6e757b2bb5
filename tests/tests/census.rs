//! The socket census against `ss`: sockets held in every state a test can
//! produce on purpose, in two network namespaces, over both families;
//! the census of each namespace must equal `ss -tan` there, state by state.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use handshake_common::abi::{census::FAMILY_V4, census::FAMILY_V6, tcp_state};
use handshake_tests::{NetnsPair, enter_netns, require_root, serial, sh, spawn_in};
use handshake_user::{census::STATES, loader::Observer, netns::Netns};

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
    let server = spawn_in(&pair.server, move || {
        let listeners = [TcpListener::bind(v4).unwrap(), TcpListener::bind(v6).unwrap()];
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
        for (family, flag) in [(FAMILY_V4, "-4"), (FAMILY_V6, "-6")] {
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
            snapshot.summary.sockets,
            snapshot.duration,
            snapshot.tw_remote
        );
    }
    drop(listeners);
    let _ = enter_netns;
}
