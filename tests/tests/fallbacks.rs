//! Kernels without every feature, forced one by one with
//! `HANDSHAKE_PRETEND_MISSING` on this kernel, which has them all: each
//! facility has a fallback that still measures handshakes, or a one-line
//! error that names it (the README's matrix).

use std::{net::SocketAddr, process::Command};

use handshake_tests::{
    Daemon, NetnsPair, echo_clients, echo_server, handshake_bin, require_root, serial,
};
use handshake_user::kernel::loader::PRETEND_MISSING;
use serde_json::Value;

/// A daemon on the pair's server side that pretends `facility` is missing,
/// after ten handshakes to the server: its status, metrics and rows.
struct Run {
    daemon: Daemon,
    status: Value,
    established: f64,
}

fn run(pair: &NetnsPair, facility: &str, port: u16) -> Run {
    run_with(pair, facility, port, &[])
}

/// [`run`], with `extra` flags.
fn run_with(pair: &NetnsPair, facility: &str, port: u16, extra: &[&str]) -> Run {
    let mut command = Command::new(handshake_bin());
    command.env(PRETEND_MISSING, facility);
    let mut args = vec!["--netns", &pair.server, "--iface", &pair.server_if];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_command(command, &args);
    let server: SocketAddr = format!("{}:{port}", NetnsPair::SERVER_V4).parse().unwrap();
    let serving = echo_server(&pair.server, server, 10);
    echo_clients(&pair.client, server, 10);
    serving.join().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = daemon.cli_json("status", &[]);
    let established = daemon.scrape().get(
        "handshake_tcp_handshakes_total",
        &[("role", "server"), ("outcome", "established")],
    );
    Run {
        daemon,
        status,
        established,
    }
}

fn probe<'a>(status: &'a Value, name: &str) -> Vec<&'a Value> {
    status["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["probe"] == name)
        .collect()
}

#[test]
fn every_missing_facility_has_a_fallback_or_names_itself() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();

    // No TCX (before 6.6): clsact filters, removed again on stop.
    let tcx = run(&pair, "tcx", 8101);
    for hook in ["tc_in_handshake", "tc_eg_handshake"] {
        let p = probe(&tcx.status, hook);
        assert!(
            p.iter()
                .all(|p| p["attached"] == true && p["detail"] == "tc-clsact"),
            "{p:?}"
        );
    }
    assert!(tcx.established >= 10.0, "{}", tcx.established);
    assert!(tcx.daemon.stop(libc::SIGTERM).success());
    for direction in ["ingress", "egress"] {
        let filters = handshake_tests::tc_filters(&pair.server, &pair.server_if, direction);
        assert!(
            filters.trim().is_empty(),
            "a clsact filter left after stop: {filters}"
        );
    }

    // No BTF tracepoints (before 5.5): the packet hooks still time the
    // handshakes they see; the socket-layer probes say why they are off.
    let no_tp = run(&pair, "tp_btf", 8102);
    for name in [
        "tp_sock_state",
        "tp_syn_rtx",
        "tp_synack_rtx",
        "tp_kfree_skb",
    ] {
        let p = probe(&no_tp.status, name);
        assert!(
            p.iter().all(|p| p["attached"] == false && p["detail"].as_str().unwrap().contains("tp_btf")),
            "{name}: {p:?}"
        );
    }
    assert!(
        no_tp.established >= 10.0,
        "the hooks time handshakes: {}",
        no_tp.established
    );
    assert_eq!(no_tp.status["census_source"], "iter/tcp");
    drop(no_tp);

    // No kfree_skb drop reasons: everything else runs.
    let no_drops = run(&pair, "kfree_skb", 8103);
    let p = probe(&no_drops.status, "tp_kfree_skb");
    assert!(p.iter().all(|p| p["attached"] == false), "{p:?}");
    assert_eq!(
        probe(&no_drops.status, "tp_sock_state")[0]["attached"],
        true
    );
    assert!(no_drops.established >= 10.0);
    drop(no_drops);

    // No iter/tcp (before 5.9): the census counts through sock_diag.
    let no_iter = run(&pair, "iter_tcp", 8104);
    assert_eq!(
        no_iter.status["census_source"], "netlink",
        "{:#}",
        no_iter.status
    );
    let states = no_iter
        .daemon
        .cli_json("states", &["--netns", &pair.server]);
    assert_eq!(states[0]["netns"], pair.server.as_str(), "{states}");
    drop(no_iter);

    // cgroup v1 only: no attribution, said at the start; handshakes counted.
    let v1 = run(&pair, "cgroup2", 8105);
    assert!(v1.established >= 10.0);
    assert!(
        v1.daemon.log().contains("no cgroup v2 hierarchy"),
        "{}",
        v1.daemon.log()
    );
    let rows = v1.daemon.conns(&["--role", "server", "--port", "8105"]);
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["cgroup"].is_null()),
        "{rows:?}"
    );
    drop(v1);

    // A read-only bpffs: nothing is kept across restarts, said at the
    // start and in status; handshakes are counted.
    let instance = format!("hs-test-robpffs-{}", std::process::id());
    let read_only = run_with(&pair, "bpffs", 8106, &["--instance", &instance]);
    assert!(read_only.established >= 10.0);
    let kept = read_only.status["kept"].as_str().unwrap();
    assert!(
        read_only.status["instance"].is_null()
            && kept.starts_with("nothing")
            && kept.contains("bpffs"),
        "{:#}",
        read_only.status
    );
    assert!(
        read_only
            .daemon
            .log()
            .contains("nothing is kept across restarts"),
        "{}",
        read_only.daemon.log()
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/handshake")
            .join(&instance)
            .exists()
    );
    drop(read_only);

    // No BTF at all: no fallback; one line that names it, before anything
    // is loaded.
    let out = Command::new(handshake_bin())
        .env(PRETEND_MISSING, "btf")
        .args([
            "daemon",
            "--ephemeral",
            "--metrics-addr",
            "127.0.0.1:0",
            "--api-socket",
        ])
        .arg(std::env::temp_dir().join(format!("handshake-nobtf-{}.sock", std::process::id())))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let last = said.trim().lines().last().unwrap_or("");
    assert!(
        last.contains("no BTF") && last.contains("CONFIG_DEBUG_INFO_BTF"),
        "{said}"
    );
}
