//! Helpers for the privileged tests and benchmarks: network-namespace pairs
//! joined by a veth (deleted on drop, even when a test fails), threads and
//! commands inside a namespace, the daemon as a child process, a Prometheus
//! text scraper and a tcpdump capture.
//!
//! Everything is real: the kernel programs, the traffic, the tools.

pub mod capture_file;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Privileged tests share host-wide state (the state tracepoint counts every
/// socket on the host), so they run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Panics with a clear message when not root: these tests load programs
/// into the kernel and create namespaces, and must not pass by skipping.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged test: run as root (`sudo -E cargo xtask test`); it loads BPF programs and creates network namespaces"
    );
}

/// Marks the running test as skipped: it cannot run on this machine
/// (`reason` names the missing kernel feature). Says so on stderr and in
/// the file `HANDSHAKE_SKIP_LOG` names, from which `cargo xtask test`
/// counts it as skipped rather than passed. The test returns after this.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("HANDSHAKE_SKIP_LOG") {
        use std::io::Write as _;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open HANDSHAKE_SKIP_LOG");
        writeln!(log, "{test}: {reason}").expect("write HANDSHAKE_SKIP_LOG");
    }
}

/// Runs a command and returns its stdout; panics with its stderr on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A suffix unique to this process and call, for names tests create
/// (namespaces, interfaces: short enough for a 15-byte interface name).
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Two network namespaces, `client` and `server`, joined by a veth pair:
/// 10.201.0.1/24 + fd00:201::1/64 on the client side, .2 / ::2 on the server
/// side. Dropping it deletes both namespaces (and with them the veth).
pub struct NetnsPair {
    pub client: String,
    pub server: String,
    pub client_if: String,
    pub server_if: String,
}

impl NetnsPair {
    pub const CLIENT_V4: &'static str = "10.201.0.1";
    pub const SERVER_V4: &'static str = "10.201.0.2";
    pub const CLIENT_V6: &'static str = "fd00:201::1";
    pub const SERVER_V6: &'static str = "fd00:201::2";

    pub fn new() -> Self {
        let id = unique_id();
        let pair = Self {
            client: format!("hs-c-{id}"),
            server: format!("hs-s-{id}"),
            client_if: format!("hsc{id}"),
            server_if: format!("hss{id}"),
        };
        sh("ip", &["netns", "add", &pair.client]);
        sh("ip", &["netns", "add", &pair.server]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &pair.client_if,
                "netns",
                &pair.client,
                "type",
                "veth",
                "peer",
                "name",
                &pair.server_if,
                "netns",
                &pair.server,
            ],
        );
        for (ns, ifname, v4, v6) in [
            (
                &pair.client,
                &pair.client_if,
                Self::CLIENT_V4,
                Self::CLIENT_V6,
            ),
            (
                &pair.server,
                &pair.server_if,
                Self::SERVER_V4,
                Self::SERVER_V6,
            ),
        ] {
            sh(
                "ip",
                &["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", ifname],
            );
            sh(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    ifname,
                    "nodad",
                ],
            );
            sh("ip", &["-n", ns, "link", "set", ifname, "up"]);
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

impl NetnsPair {
    /// A daemon attached to the server-side veth, with `extra` flags.
    pub fn server_daemon(&self, extra: &[&str]) -> Daemon {
        Self::daemon(&self.server, &self.server_if, extra)
    }

    /// A daemon attached to the client-side veth, with `extra` flags.
    pub fn client_daemon(&self, extra: &[&str]) -> Daemon {
        Self::daemon(&self.client, &self.client_if, extra)
    }

    fn daemon(ns: &str, iface: &str, extra: &[&str]) -> Daemon {
        let mut args = vec!["--netns", ns, "--iface", iface];
        args.extend_from_slice(extra);
        Daemon::start(&args)
    }
}

impl Default for NetnsPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Moves the calling thread into network namespace `name`.
pub fn enter_netns(name: &str) {
    let file = std::fs::File::open(Path::new("/run/netns").join(name))
        .unwrap_or_else(|e| panic!("opening netns {name}: {e}"));
    // SAFETY: setns only changes the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({name}): {}", std::io::Error::last_os_error());
}

/// Runs `f` on a new thread inside namespace `name`.
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let name = name.to_owned();
    std::thread::spawn(move || {
        enter_netns(&name);
        f()
    })
}

/// A TCP server inside a namespace: for each connection it reads until the
/// client's FIN, answers `ok`, and closes, so every connection shows exactly
/// one FIN each way and no RST. Stops after `connections` connections and
/// returns each one's client and when `accept` returned it.
pub fn echo_server(
    ns: &str,
    bind: SocketAddr,
    connections: usize,
) -> JoinHandle<Vec<(SocketAddr, Instant)>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = spawn_in(ns, move || {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        ready_tx.send(()).expect("test thread waits");
        let mut accepted = Vec::with_capacity(connections);
        for _ in 0..connections {
            let (mut stream, client) = listener.accept().expect("accept");
            accepted.push((client, Instant::now()));
            let mut sink = Vec::new();
            stream.read_to_end(&mut sink).expect("read request");
            stream.write_all(b"ok").expect("answer");
        }
        accepted
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("echo server did not start");
    handle
}

/// A server at `at` in namespace `ns` that reads each connection to its
/// end, then closes it, for as long as the process lives: its clients
/// close first and keep the TIME_WAIT.
pub fn sink_server(ns: &str, at: SocketAddr) -> JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in(ns, move || {
        let listener = TcpListener::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}"));
        ready_tx.send(()).expect("test thread waits");
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let _ = stream.read_to_end(&mut Vec::new());
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("sink server did not start");
    server
}

/// From namespace `ns`, opens `count` connections to `server` one after
/// another: send, half-close, read the answer, close. Returns how long
/// each one's `connect` took as the application saw it.
pub fn echo_clients(ns: &str, server: SocketAddr, count: usize) -> Vec<Connect> {
    spawn_in(ns, move || {
        let mut connects = Vec::with_capacity(count);
        for i in 0..count {
            let called = Instant::now();
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i} to {server}: {e}"));
            let returned = Instant::now();
            connects.push(Connect {
                local: stream.local_addr().expect("local address"),
                called,
                returned,
            });
            stream.write_all(b"hello").expect("send");
            stream
                .shutdown(std::net::Shutdown::Write)
                .expect("half-close");
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).expect("read answer");
            assert_eq!(answer, b"ok", "connection {i} to {server}");
        }
        connects
    })
    .join()
    .expect("client thread panicked")
}

/// One client connection of [`echo_clients`]: its own address, and when
/// its `connect` was called and returned.
#[derive(Clone, Copy, Debug)]
pub struct Connect {
    pub local: SocketAddr,
    pub called: Instant,
    pub returned: Instant,
}

/// The `handshake` binary under test: `$HANDSHAKE_BIN`, which
/// `cargo xtask test` sets, else the one next to this test's target dir.
pub fn handshake_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("HANDSHAKE_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("handshake"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} missing: run the tests with `cargo xtask test`",
        bin.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// The daemon as a child process; SIGTERM and wait on drop.
pub struct Daemon {
    child: Option<Child>,
    pub metrics_addr: String,
    pub api_socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `handshake daemon ARGS --metrics-addr 127.0.0.1:<free>
    /// --api-socket <private path>` and waits until `/metrics` answers.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`Self::start`] with `env` added to the daemon's environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(handshake_bin());
        command.envs(env.iter().copied());
        Self::start_command(command, args)
    }

    /// [`Self::start`] through `command`: the binary, or a wrapper such as
    /// `setpriv ... /usr/sbin/handshake`, to which `daemon ARGS` and the
    /// addresses are appended.
    pub fn start_command(mut command: Command, args: &[&str]) -> Self {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let id = unique_id();
        let log = std::env::temp_dir().join(format!("handshake-daemon-{id}.log"));
        let api_socket = std::env::temp_dir().join(format!("handshake-{id}.sock"));
        let log_file = std::fs::File::create(&log).expect("daemon log file");
        // Each test's daemon keeps nothing across restarts unless it names
        // its own instance: the host's default instance is not the tests'.
        let keeps = args.contains(&"--instance");
        let child = command
            .arg("daemon")
            .args(args)
            .args((!keeps).then_some("--ephemeral"))
            .args(["--metrics-addr", &metrics_addr])
            .arg("--api-socket")
            .arg(&api_socket)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start handshake daemon");
        let mut daemon = Self {
            child: Some(child),
            metrics_addr,
            api_socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = daemon.child_mut().try_wait().expect("poll daemon") {
                panic!("daemon exited early ({status}):\n{}", daemon.log());
            }
            if daemon.api_metrics().is_ok() {
                break daemon;
            }
            assert!(
                Instant::now() < deadline,
                "daemon not serving after 30 s:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon running")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's metrics, read through its API socket: a scrape over
    /// TCP would itself be a handshake every daemon on the host counts.
    /// (`http_get` reads `/metrics` over HTTP.)
    pub fn scrape(&self) -> Metrics {
        let body = self
            .api_metrics()
            .unwrap_or_else(|e| panic!("reading metrics: {e}\n{}", self.log()));
        Metrics::parse(&body)
    }

    fn api_metrics(&self) -> Result<String, String> {
        use std::os::unix::net::UnixStream;
        let mut stream = UnixStream::connect(&self.api_socket).map_err(|e| e.to_string())?;
        stream.write_all(b"metrics\n").map_err(|e| e.to_string())?;
        let mut body = String::new();
        stream
            .read_to_string(&mut body)
            .map_err(|e| e.to_string())?;
        if body.starts_with("{\"error\"") {
            return Err(body);
        }
        Ok(body)
    }

    /// `handshake conns --json ARGS` against this daemon.
    pub fn conns(&self, args: &[&str]) -> Vec<serde_json::Value> {
        match self.cli_json("conns", args) {
            serde_json::Value::Array(rows) => rows,
            other => panic!("conns --json prints a JSON array, not {other}"),
        }
    }

    /// `handshake SUBCOMMAND --json ARGS` against this daemon, parsed.
    pub fn cli_json(&self, subcommand: &str, args: &[&str]) -> serde_json::Value {
        let out = Command::new(handshake_bin())
            .args([subcommand, "--json", "--api-socket"])
            .arg(&self.api_socket)
            .args(args)
            .output()
            .expect("run handshake");
        assert!(
            out.status.success(),
            "handshake {subcommand} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("--json prints JSON")
    }

    /// User plus system CPU time the daemon has used so far, in seconds
    /// (`/proc/PID/stat`, all its threads).
    pub fn cpu_seconds(&self) -> f64 {
        let pid = self.child.as_ref().expect("daemon running").id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the whole line.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// Sends `signal` and waits; returns the exit status.
    pub fn stop(mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().expect("wait for daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A minimal HTTP/1.1 GET; returns the body of a 200 answer.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or_default().to_owned());
    }
    Ok(body.to_owned())
}

/// Parsed Prometheus text: `name` + sorted labels → value.
#[derive(Clone, Debug, Default)]
pub struct Metrics(BTreeMap<(String, Vec<(String, String)>), f64>);

impl Metrics {
    /// The daemon's own reader of the text format (`handshake watch`'s),
    /// with empty label values dropped, as Prometheus stores them.
    pub fn parse(text: &str) -> Self {
        let samples = handshake_user::cli::watch::Sample::parse(text)
            .into_series()
            .into_iter()
            .map(|((name, labels), value)| {
                let labels = labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
                ((name, labels), value)
            })
            .collect();
        Self(samples)
    }

    /// The sum of the series of `name` that carry all of `labels` (what
    /// PromQL's `sum(name{labels})` gives). Panics when no series matches:
    /// a renamed or vanished metric must fail a test, not read as 0.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| {
            panic!("no series {name}{labels:?} in the scrape: renamed, or not exported?")
        })
    }

    /// Like [`Self::get`], but 0 when no series matches: only for series
    /// that appear once something happened (a state transition, a port
    /// half-open), read before it did. The family itself must exist.
    pub fn get_or_zero(&self, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        assert!(
            self.0.keys().any(|(n, _)| n == family),
            "no family {family} in the scrape: renamed, or not exported?"
        );
        self.find(name, labels).unwrap_or(0.0)
    }

    /// Like [`Self::get`], `None` when no series matches: for a benchmark
    /// that checks whether a peer counted anything at all.
    pub fn try_get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.find(name, labels)
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut matching = self
            .0
            .iter()
            .filter(|((n, pairs), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v))
            })
            .map(|(_, value)| *value)
            .peekable();
        matching.peek()?;
        Some(matching.sum())
    }

    /// Established handshakes counted for `role` (`client`, `server`).
    pub fn established(&self, role: &str) -> f64 {
        self.get(
            "handshake_tcp_handshakes_total",
            &[("role", role), ("outcome", "established")],
        )
    }

    pub fn packets(&self, direction: &str, kind: &str) -> u64 {
        self.get(
            "handshake_packets_total",
            &[("direction", direction), ("kind", kind)],
        ) as u64
    }

    /// State changes `from` → `to` so far: 0 before the first (the
    /// series, and before any change the family, appear with it).
    pub fn transitions(&self, from: &str, to: &str) -> u64 {
        let name = "handshake_tcp_state_transitions_total";
        self.find(name, &[("from", from), ("to", to)])
            .unwrap_or(0.0) as u64
    }
}

/// tcpdump on an interface inside a namespace, writing a pcap file.
pub struct Capture {
    child: Option<Child>,
    stderr: Option<std::io::Lines<BufReader<std::process::ChildStderr>>>,
    pub file: PathBuf,
}

impl Capture {
    pub fn start(ns: &str, iface: &str) -> Self {
        let file = std::env::temp_dir().join(format!("handshake-{}.pcap", unique_id()));
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-n", "-i", iface])
            // Immediate mode: without it packets wait in the kernel's ring
            // for a block to fill or a 1 s timeout, and those still waiting
            // when the capture stops are lost (seen: the last TLS SYNs).
            // A 32 MiB buffer so bursts are not dropped either.
            .args(["--immediate-mode", "-U", "-B", "32768"])
            .args(["--time-stamp-precision", "nano", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        let stderr = child.stderr.take().expect("tcpdump stderr");
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(_)) => {}
                _ => panic!("tcpdump did not start capturing on {iface} in {ns}"),
            }
        }
        Self {
            child: Some(child),
            stderr: Some(lines),
            file,
        }
    }

    /// Stops the capture and returns tcpdump's own one-line decoding of
    /// every packet. Panics if tcpdump says the kernel dropped any: the
    /// capture would not be a reference then.
    pub fn finish(mut self) -> Vec<String> {
        // Packets still in flight reach the capture socket within this.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
        let summary: Vec<String> = self
            .stderr
            .take()
            .map(|lines| lines.map_while(Result::ok).collect())
            .unwrap_or_default();
        let dropped = summary
            .iter()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        assert_eq!(dropped, Some(0), "tcpdump lost packets: {summary:?}");
        sh(
            "tcpdump",
            &[
                "-n",
                "-tt",
                "--time-stamp-precision",
                "nano",
                "-r",
                self.file.to_str().expect("UTF-8 path"),
            ],
        )
        .lines()
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Counts of handshake flags in tcpdump's decoding, per direction as seen
/// from the host that owns `local_addrs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlagCounts {
    pub syn: u64,
    pub syn_ack: u64,
    pub fin: u64,
    pub rst: u64,
}

/// Splits tcpdump lines into (ingress, egress) flag counts for the host
/// whose addresses are `local_addrs`.
pub fn flag_counts(lines: &[String], local_addrs: &[&str]) -> (FlagCounts, FlagCounts) {
    let (mut ingress, mut egress) = (FlagCounts::default(), FlagCounts::default());
    for line in lines {
        // "12:00:00.000000 IP 10.0.0.1.40000 > 10.0.0.2.80: Flags [S], ..."
        let Some(flags) = line
            .split("Flags [")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
        else {
            continue;
        };
        let mut words = line.split_whitespace().skip(2);
        let src = words.next().unwrap_or_default();
        let src_addr = src.rsplit_once('.').map_or(src, |(addr, _port)| addr);
        let counts = if local_addrs.contains(&src_addr) {
            &mut egress
        } else {
            &mut ingress
        };
        let syn = flags.contains('S');
        let ack = flags.contains('.');
        counts.syn += u64::from(syn && !ack);
        counts.syn_ack += u64::from(syn && ack);
        counts.fin += u64::from(flags.contains('F'));
        counts.rst += u64::from(flags.contains('R'));
    }
    (ingress, egress)
}

/// `tc filter show dev IFACE DIRECTION` in namespace `ns`: the clsact
/// filters (not TCX links) on that hook.
pub fn tc_filters(ns: &str, iface: &str, direction: &str) -> String {
    sh(
        "ip",
        &[
            "netns", "exec", ns, "tc", "filter", "show", "dev", iface, direction,
        ],
    )
}

/// Names of the programs attached through TCX to `iface` in namespace `ns`,
/// for both hooks (`tc filter show` and bpftool 7.1 do not list TCX).
pub fn tcx_programs(ns: &str, iface: &str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let iface = std::ffi::CString::new(iface).expect("interface name");
    spawn_in(ns, move || {
        let mut names = Vec::new();
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, programs) = SchedClassifier::query_tcx(iface.as_c_str(), hook)
                .unwrap_or_else(|e| panic!("querying TCX {hook:?}: {e}"));
            names.extend(
                programs
                    .iter()
                    .map(|p| format!("tcx {hook:?}: {}", p.name_as_str().unwrap_or("?"))),
            );
        }
        names
    })
    .join()
    .expect("TCX query thread")
}

/// The XDP program attached to `iface` in namespace `ns`, as
/// `xdp NAME (MODE)`, if one is.
pub fn xdp_program(ns: &str, iface: &str) -> Option<String> {
    let shown = sh("ip", &["-n", ns, "-details", "link", "show", "dev", iface]);
    let words: Vec<&str> = shown.split_whitespace().collect();
    let mode = words
        .iter()
        .find(|w| w.starts_with("xdp"))
        .copied()
        .unwrap_or("xdp");
    let at = words.iter().position(|w| *w == "prog/xdp")?;
    let name = words[at..]
        .windows(2)
        .find(|w| w[0] == "name")
        .map_or("?", |w| w[1]);
    Some(format!("xdp {name} ({mode})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcpdump_flags_per_direction() {
        let lines: Vec<String> = [
            "12:00:00.000001 IP 10.201.0.1.40000 > 10.201.0.2.8080: Flags [S], seq 1, win 64240, length 0",
            "12:00:00.000002 IP 10.201.0.2.8080 > 10.201.0.1.40000: Flags [S.], seq 9, ack 2, win 65160, length 0",
            "12:00:00.000003 IP6 fd00:201::1.40000 > fd00:201::2.8080: Flags [F.], seq 6, ack 1, win 502, length 0",
            "12:00:00.000004 IP6 fd00:201::2.8080 > fd00:201::1.40000: Flags [R.], seq 1, ack 7, win 0, length 0",
            "12:00:00.000005 IP 10.201.0.1.40000 > 10.201.0.2.8080: Flags [.], ack 1, win 502, length 0",
        ]
        .iter()
        .map(|l| (*l).to_owned())
        .collect();
        let (ingress, egress) = flag_counts(&lines, &["10.201.0.2", "fd00:201::2"]);
        assert_eq!(
            ingress,
            FlagCounts {
                syn: 1,
                syn_ack: 0,
                fin: 1,
                rst: 0
            }
        );
        assert_eq!(
            egress,
            FlagCounts {
                syn: 0,
                syn_ack: 1,
                fin: 0,
                rst: 1
            }
        );
    }

    #[test]
    fn reads_handshakes_from_a_capture() {
        let lines: Vec<String> = [
            "1764000000.000001000 IP 10.201.0.1.40000 > 10.201.0.2.8080: Flags [S], seq 1, length 0",
            "1764000000.000031000 IP 10.201.0.2.8080 > 10.201.0.1.40000: Flags [S.], seq 9, ack 2, length 0",
            "1764000000.000101000 IP 10.201.0.1.40000 > 10.201.0.2.8080: Flags [.], ack 1, length 0",
            "1764000000.000151000 IP 10.201.0.1.40000 > 10.201.0.2.8080: Flags [P.], seq 1:6, ack 1, length 5",
        ]
        .iter()
        .map(|l| (*l).to_owned())
        .collect();
        let packets = parse_capture(&lines);
        assert_eq!(packets.len(), 4);
        assert_eq!(packets[1].flags, "S.");
        let h = captured_handshakes(&packets, 8080)[&("10.201.0.1".to_owned(), 40000)];
        assert_eq!(
            (h.syn, h.syn_ack, h.ack),
            (
                Some(1_764_000_000_000_001_000),
                Some(1_764_000_000_000_031_000),
                Some(1_764_000_000_000_101_000)
            )
        );
    }

    #[test]
    fn parses_prometheus_text() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE x counter\nx{b=\"2\",a=\"1\"} 3\nplain 4\ny{probe=\"p\",interface=\"\"} 1\n",
        );
        assert_eq!(m.get("x", &[("a", "1"), ("b", "2")]), 3.0);
        assert_eq!(m.get("plain", &[]), 4.0);
        assert_eq!(m.get("y", &[("probe", "p")]), 1.0);
        assert_eq!(m.get_or_zero("x", "x", &[("a", "9")]), 0.0);
        for absent in [
            std::panic::catch_unwind(|| m.get("absent", &[])),
            std::panic::catch_unwind(|| m.get("x", &[("a", "9")])),
            std::panic::catch_unwind(|| m.get_or_zero("absent", "absent", &[])),
        ] {
            assert!(absent.is_err(), "an absent series must not read as a value");
        }
    }
}

/// One TCP packet as tcpdump decoded it (`tcpdump -tt` with nanosecond
/// timestamps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub ts_ns: u64,
    pub src: String,
    pub src_port: u16,
    pub dst: String,
    pub dst_port: u16,
    /// tcpdump's flag letters: `S`, `S.`, `.`, `P.`, `F.`, `R`, `R.` ...
    pub flags: String,
}

/// Parses `tcpdump -n -tt --time-stamp-precision nano -r` output.
pub fn parse_capture(lines: &[String]) -> Vec<Packet> {
    let endpoint = |word: &str| {
        let word = word.trim_end_matches(':');
        let (addr, port) = word.rsplit_once('.')?;
        Some((addr.to_owned(), port.parse().ok()?))
    };
    lines
        .iter()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (secs, nanos) = words.first()?.split_once('.')?;
            let ts_ns = secs.parse::<u64>().ok()? * 1_000_000_000 + nanos.parse::<u64>().ok()?;
            let (src, src_port) = endpoint(words.get(2)?)?;
            let (dst, dst_port) = endpoint(words.get(4)?)?;
            let flags = line.split("Flags [").nth(1)?.split(']').next()?.to_owned();
            Some(Packet {
                ts_ns,
                src,
                src_port,
                dst,
                dst_port,
                flags,
            })
        })
        .collect()
}

/// The handshake of one connection as a capture saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapturedHandshake {
    pub syn: Option<u64>,
    pub syn_ack: Option<u64>,
    /// The client's first packet after the SYN-ACK (the completing ACK).
    pub ack: Option<u64>,
}

/// Handshakes in a capture, by client (address, port), for connections to
/// `server_port`. The address matters: IPv4 and IPv6 connections can share
/// an ephemeral port number.
pub fn captured_handshakes(
    packets: &[Packet],
    server_port: u16,
) -> BTreeMap<(String, u16), CapturedHandshake> {
    let mut out: BTreeMap<(String, u16), CapturedHandshake> = BTreeMap::new();
    // In time order, not file order: tcpdump writes packets in the order
    // its socket got them, but stamps received ones when they were queued.
    let mut packets: Vec<&Packet> = packets.iter().collect();
    packets.sort_by_key(|p| p.ts_ns);
    for p in packets {
        if p.dst_port == server_port {
            let h = out.entry((p.src.clone(), p.src_port)).or_default();
            if p.flags == "S" {
                h.syn.get_or_insert(p.ts_ns);
            } else if h.syn_ack.is_some() && h.ack.is_none() {
                h.ack = Some(p.ts_ns);
            }
        } else if p.src_port == server_port && p.flags == "S." {
            out.entry((p.dst.clone(), p.dst_port))
                .or_default()
                .syn_ack
                .get_or_insert(p.ts_ns);
        }
    }
    out
}

/// Median and 99th percentile of `values` (sorted in place).
pub fn median_p99(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// An nftables rule in namespace `ns`, on the input hook, that drops what
/// `expr` matches (e.g. `tcp sport 80 tcp flags & (syn | ack) == syn | ack`),
/// for as long as the value lives.
pub struct NftDrop {
    ns: String,
    table: String,
}

impl NftDrop {
    /// Drops the packets `expr` matches as they arrive in `ns`.
    pub fn input(ns: &str, expr: &str) -> Self {
        Self::hook(ns, "input", expr)
    }

    /// Drops the packets `expr` matches as they leave `ns`.
    pub fn output(ns: &str, expr: &str) -> Self {
        Self::hook(ns, "output", expr)
    }

    fn hook(ns: &str, hook: &str, expr: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let table = format!("handshake_test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let rules = format!(
            "table inet {table} {{\n  chain {hook} {{\n    type filter hook {hook} priority 0;\n    {expr} drop\n  }}\n}}\n"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("run nft");
        nft.stdin
            .take()
            .expect("nft stdin")
            .write_all(rules.as_bytes())
            .expect("write nft rules");
        let status = nft.wait().expect("wait for nft");
        assert!(status.success(), "nft rule in {ns}:\n{rules}");
        Self {
            ns: ns.to_owned(),
            table,
        }
    }
}

impl Drop for NftDrop {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "nft",
                "delete",
                "table",
                "inet",
                &self.table,
            ])
            .status();
    }
}

/// Waits until something listens on TCP `port` in namespace `ns`.
pub fn wait_listening(ns: &str, port: u16) {
    for _ in 0..100 {
        let out = sh(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "ss",
                "-Hltn",
                &format!("sport = :{port}"),
            ],
        );
        if !out.trim().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} in {ns}");
}

/// A directory of this test process's own under the temp dir.
pub fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("handshake-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A self-signed P-256 certificate for `name` and its key, in `dir`.
pub fn self_signed_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "1",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    (cert, key)
}

/// `tcpdump -w FILE` on an interface inside a namespace, until dropped or
/// [`PcapFile::finish`]ed.
pub struct PcapFile {
    child: Child,
    pub path: PathBuf,
}

impl PcapFile {
    pub fn start(ns: &str, iface: &str, path: &Path, filter: &str) -> Self {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "tcpdump",
                "-i",
                iface,
                "-U",
                "--immediate-mode",
                "-w",
            ])
            .arg(path)
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        let mut capture = Self {
            child,
            path: path.to_owned(),
        };
        // tcpdump says "listening on" once the capture runs.
        let stderr = capture.child.stderr.take().expect("tcpdump stderr");
        let mut line = String::new();
        BufReader::new(stderr)
            .read_line(&mut line)
            .expect("tcpdump starts");
        capture
    }

    /// Stops the capture, letting tcpdump write out what it holds.
    pub fn finish(mut self) -> PathBuf {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        self.path.clone()
    }
}

impl Drop for PcapFile {
    fn drop(&mut self) {
        // SAFETY: as above; harmless if it has exited.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// `openssl s_server` in namespace `ns` on `port` with a fresh self-signed
/// certificate, `extra` flags appended; waits until it listens, and is
/// killed when dropped.
pub struct TlsServer {
    child: Child,
}

impl TlsServer {
    pub fn start(ns: &str, port: u16, extra: &[&str]) -> Self {
        let dir = tempdir().join(format!("s_server-{port}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (cert, key) = self_signed_cert(&dir, "tls.test");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "openssl", "s_server", "-quiet"])
            .args(["-accept", &port.to_string(), "-cert"])
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        wait_listening(ns, port);
        Self { child }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
