//! The CLI as a person at a terminal meets it: `handshake watch` driven
//! under tmux while real traffic flows (two captures of the pane, the
//! daemon going away and coming back, `q`), `status` in both forms,
//! completions, `--json` on every command, and one clear line when no
//! daemon answers.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use handshake_tests::{Daemon, free_port, handshake_bin, require_root, serial, unique_id};

/// A tmux session running one command; killed on drop.
struct Tmux(String);

impl Tmux {
    fn start(command: &str) -> Self {
        let name = format!("hsw{}", unique_id());
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                "160",
                "-y",
                "48",
                command,
            ])
            .env("TERM", "xterm-256color")
            .status()
            .expect("tmux");
        assert!(ok.success(), "tmux new-session failed");
        Self(name)
    }

    fn capture(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.0])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until the pane shows `text`; returns the pane.
    fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pane = self.capture();
            if pane.contains(text) {
                return pane;
            }
            assert!(
                Instant::now() < deadline,
                "the pane never showed {text:?}:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Loopback traffic until dropped: connections to a listener that accepts
/// and closes, and to a port nothing listens on (refused).
struct Traffic(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Traffic {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let open = listener.local_addr().unwrap();
        let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            while !running.load(Ordering::Relaxed) {
                for _ in 0..5 {
                    drop(TcpStream::connect(open));
                    while let Ok((stream, _)) = listener.accept() {
                        drop(stream);
                    }
                }
                let _ = TcpStream::connect(closed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self(stop, Some(handle))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(handle) = self.1.take() {
            let _ = handle.join();
        }
    }
}

/// The number before `/s` on the pane's line for `outcome`.
fn rate(pane: &str, outcome: &str) -> f64 {
    pane.lines()
        .find_map(|l| {
            let at = l.find(outcome)?;
            let rest = &l[at + outcome.len()..];
            rest.split("/s").next()?.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no {outcome} rate on the pane:\n{pane}"))
}

#[test]
fn watch_follows_traffic_survives_a_restart_and_quits_on_q() {
    require_root();
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.api_socket.clone();
    let _traffic = Traffic::start();
    let tmux = Tmux::start(&format!(
        "{} watch --api-socket {}",
        handshake_bin().display(),
        socket.display()
    ));
    tmux.wait_for("q quits");
    std::thread::sleep(Duration::from_millis(2500));
    let first = tmux.capture();
    std::thread::sleep(Duration::from_millis(2000));
    let second = tmux.capture();
    eprintln!("{second}");
    for pane in [&first, &second] {
        for panel in [
            "Handshakes per second",
            "Phase latency",
            "Slowest recent",
            "Failing recent",
            "Listen queues",
            "TIME_WAIT",
            "TLS versions",
        ] {
            assert!(pane.contains(panel), "no {panel:?} on the pane:\n{pane}");
        }
        // Refused connections count at once; established ones after the
        // socket layer's 1 s hold, so one refresh may catch none of them.
        assert!(rate(pane, "refused") > 1.0, "{pane}");
        assert!(
            pane.contains("127.0.0.1"),
            "recent connections listed:\n{pane}"
        );
        assert!(pane.contains("client  connect"), "{pane}");
    }
    let established = rate(&first, "established").max(rate(&second, "established"));
    assert!(
        established > 10.0,
        "no established handshakes per second:\n{first}\n{second}"
    );
    assert_ne!(first, second, "the view refreshes");

    // The daemon goes away: the view says so and keeps asking; a new one
    // on the same socket is picked up.
    drop(daemon);
    tmux.wait_for("daemon not answering");
    assert!(tmux.alive(), "watch keeps running without a daemon");
    // Daemon::start picks its own socket; this one takes the watched path.
    let metrics = format!("127.0.0.1:{}", free_port());
    let again = Stopped(
        Command::new(handshake_bin())
            .args([
                "daemon",
                "--ephemeral",
                "--metrics-addr",
                &metrics,
                "--api-socket",
            ])
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start a daemon"),
    );
    let back = tmux.wait_for("q quits");
    assert!(!back.contains("daemon not answering"), "{back}");

    Command::new("tmux")
        .args(["send-keys", "-t", &tmux.0, "q"])
        .status()
        .expect("tmux send-keys");
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux.alive() {
        assert!(
            Instant::now() < deadline,
            "q did not end watch:\n{}",
            tmux.capture()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(again);
}

/// A child daemon, stopped with SIGTERM when dropped.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn status_completions_and_json_on_every_command() {
    require_root();
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let status = daemon.cli_json("status", &[]);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(status["census_source"], "iter/tcp");
    let probes = status["probes"].as_array().unwrap();
    for probe in [
        "tp_sock_state",
        "tp_syn_rtx",
        "tp_synack_rtx",
        "tp_kfree_skb",
        "iter_tcp_census",
    ] {
        let p = probes
            .iter()
            .find(|p| p["probe"] == probe)
            .unwrap_or_else(|| panic!("{probe} not in status: {status:#}"));
        assert_eq!(p["attached"], true, "{p}");
    }
    let tables = status["tables"].as_array().unwrap();
    assert!(
        tables
            .iter()
            .any(|t| t["map"] == "flows" && t["capacity"].as_u64() > Some(0))
    );
    assert!(status["lost"]["ringbuf_dropped"].is_u64());
    assert!(status["rss_bytes"].as_u64().unwrap() > 1 << 20);
    // The socket-age tables alone take ~3.8 MiB at the default size.
    assert!(
        status["map_memory_bytes"].as_u64().unwrap() > 3 << 20,
        "{status:#}"
    );

    let text = Command::new(handshake_bin())
        .args(["status", "--api-socket"])
        .arg(&daemon.api_socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    for line in [
        "handshake ",
        "uptime",
        "census",
        "tp_sock_state",
        "TABLE",
        "LOST",
    ] {
        assert!(text.contains(line), "status prints {line:?}:\n{text}");
    }
    let metrics = daemon.scrape();
    assert_eq!(
        metrics.get(
            "handshake_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(metrics.get("process_resident_memory_bytes", &[]) > 0.0);

    // Every command that asks the daemon prints JSON with --json.
    for command in [
        "conns",
        "states",
        "tls",
        "timewait",
        "listeners",
        "closes",
        "status",
    ] {
        daemon.cli_json(command, &[]);
    }
    let frame = daemon.cli_json("watch", &["--interval", "200ms"]);
    assert!(frame["handshakes_per_second"].is_object(), "{frame}");

    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(handshake_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout.len() > 1000,
            "completions {shell}"
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("conns"),
            "{shell}"
        );
    }
    let bash = Command::new("bash")
        .args(["-c", "source /dev/stdin && complete -p handshake"])
        .stdin(
            Command::new(handshake_bin())
                .args(["completions", "bash"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
                .stdout
                .take()
                .unwrap(),
        )
        .output()
        .unwrap();
    assert!(
        bash.status.success(),
        "{}",
        String::from_utf8_lossy(&bash.stderr)
    );

    // Bad input: one line and a non-zero exit.
    let missing = std::env::temp_dir().join(format!("handshake-none-{}.sock", unique_id()));
    for args in [
        vec!["status", "--api-socket", missing.to_str().unwrap()],
        vec!["watch", "--json", "--api-socket", missing.to_str().unwrap()],
        vec!["completions", "tcsh"],
    ] {
        let out = Command::new(handshake_bin()).args(&args).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!said.contains("panicked"), "{args:?}: {said}");
        if args[0] != "completions" {
            assert_eq!(said.trim().lines().count(), 1, "{args:?}: {said}");
        }
    }
    // watch refuses to draw on something that is not a terminal.
    let out = Command::new(handshake_bin())
        .args(["watch", "--api-socket"])
        .arg(&daemon.api_socket)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("--json"), "{said}");
}
