//! The whole host: a daemon started with no flags finds every network
//! namespace by itself — named, held only by a process, created after it
//! started — counts each exactly (against `ss` inside it), names whose
//! each socket is from its cgroup (Docker-like and Kubernetes-like cgroups
//! made here), follows interfaces as they come and go, and stays idle
//! with many quiet namespaces.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use handshake_tests::{Daemon, require_root, serial, sh, unique_id};

/// `n` random hex digits (container ids, pod UIDs), from the kernel's
/// random UUIDs.
fn hex(n: usize) -> String {
    let mut out = String::new();
    while out.len() < n {
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("a uuid");
        out.extend(uuid.trim().chars().filter(char::is_ascii_hexdigit));
    }
    out.truncate(n);
    out
}

/// Where cgroup v2 is mounted here (`/sys/fs/cgroup/unified` next to v1
/// controllers on this machine, `/sys/fs/cgroup` on most).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mounts
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next()? == "cgroup2")
                .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .expect("cgroup v2 is mounted")
}

/// A cgroup made for the test, removed (with the parents it made) on drop.
struct Cgroup {
    /// From the v2 root, as the daemon shows it.
    path: String,
    made: Vec<PathBuf>,
}

impl Cgroup {
    fn new(path: &str) -> Self {
        let root = cgroup2_root();
        let mut made = Vec::new();
        let mut dir = root.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                made.push(dir.clone());
            }
        }
        Self {
            path: path.to_owned(),
            made,
        }
    }

    fn procs(&self) -> PathBuf {
        cgroup2_root()
            .join(self.path.trim_start_matches('/'))
            .join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            // Its processes have exited (dropped first); retry a moment.
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A named namespace, deleted on drop.
struct Named(String);

impl Named {
    fn new(name: &str) -> Self {
        sh("ip", &["netns", "add", name]);
        sh("ip", &["-n", name, "link", "set", "lo", "up"]);
        Self(name.to_owned())
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Opens, on 127.0.0.1:PORT of its namespace, a listener with `held`
/// established connections, `close_wait` connections its peers closed
/// (CLOSE_WAIT here, FIN_WAIT2 there), and `time_wait` closed ones; says
/// `ready` and holds them until stdin closes.
const WORKLOAD: &str = r#"
import socket, sys
port, held, close_wait, time_wait = map(int, sys.argv[1:5])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port)); l.listen(512)
keep = []
for _ in range(held):
    c = socket.create_connection(("127.0.0.1", port)); keep += [c, l.accept()[0]]
for _ in range(close_wait):
    c = socket.create_connection(("127.0.0.1", port)); a = l.accept()[0]
    c.shutdown(socket.SHUT_WR); keep += [c, a]
for _ in range(time_wait):
    c = socket.create_connection(("127.0.0.1", port)); a = l.accept()[0]
    c.close(); a.close()
print("ready", flush=True)
sys.stdin.read()
"#;

/// A process holding sockets (see [`WORKLOAD`]), placed in a cgroup
/// before it opens them, in a namespace: a named one (`ip netns exec`),
/// or a new one only it holds (`unshare -n`).
struct Workload {
    child: Child,
}

impl Workload {
    fn start(netns: Option<&str>, cgroup: Option<&Cgroup>, port: u16, counts: [u32; 3]) -> Self {
        let enter = match cgroup {
            Some(cg) => format!("echo $$ > {} && ", cg.procs().display()),
            None => String::new(),
        };
        let run = match netns {
            Some(ns) => format!("exec ip netns exec {ns} python3 -c \"$0\" \"$@\""),
            None => "exec unshare -n sh -c 'ip link set lo up && exec python3 -c \"$0\" \"$@\"' \"$0\" \"$@\"".to_owned(),
        };
        let mut child = Command::new("sh")
            .args(["-c", &format!("{enter}{run}"), WORKLOAD])
            .args(
                [port, counts[0] as u16, counts[1] as u16, counts[2] as u16].map(|n| n.to_string()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a workload");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("workload says ready");
        assert_eq!(line.trim(), "ready", "workload did not start");
        Self { child }
    }

    /// The PID of the process that holds the sockets (`unshare` and
    /// `ip netns exec` exec into it).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its namespace's inode number.
    fn netns_inode(&self) -> u64 {
        let link = std::fs::read_link(format!("/proc/{}/ns/net", self.pid())).expect("ns link");
        let text = link.to_string_lossy();
        text.trim_start_matches("net:[")
            .trim_end_matches(']')
            .parse()
            .expect("inode")
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ss -tanH` counts per state name as the daemon spells them, in the
/// namespace `enter` (a command prefix) runs in.
fn ss_states(enter: &[&str]) -> BTreeMap<String, u64> {
    let mut args: Vec<&str> = enter.to_vec();
    args.extend(["ss", "-tanH"]);
    let out = sh(args[0], &args[1..]);
    let mut counts = BTreeMap::new();
    for line in out.lines() {
        let Some(state) = line.split_whitespace().next() else {
            continue;
        };
        let name = match state {
            "ESTAB" => "established",
            "SYN-SENT" => "syn_sent",
            "SYN-RECV" => "syn_recv",
            "FIN-WAIT-1" => "fin_wait1",
            "FIN-WAIT-2" => "fin_wait2",
            "TIME-WAIT" => "time_wait",
            "CLOSE-WAIT" => "close_wait",
            "LAST-ACK" => "last_ack",
            "LISTEN" => "listen",
            "CLOSING" => "closing",
            "UNCONN" => "close",
            other => panic!("ss state {other:?}"),
        }
        .to_owned();
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// The daemon's counts for namespace `name`, the states with sockets.
fn daemon_states(daemon: &Daemon, name: &str) -> BTreeMap<String, u64> {
    let states = daemon.cli_json("states", &[]);
    let view = states
        .as_array()
        .expect("a list")
        .iter()
        .find(|v| v["netns"] == name)
        .unwrap_or_else(|| panic!("namespace {name} not listed: {states}"));
    view["states"]
        .as_object()
        .expect("states")
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[test]
fn every_namespace_is_counted_exactly_and_every_socket_is_attributed() {
    require_root();
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let id = unique_id();

    // Namespaces and "containers" made after the daemon started.
    let plain = Named::new(&format!("hs-plain-{id}"));
    let docker_ns = Named::new(&format!("hs-docker-{id}"));
    let pod_ns = Named::new(&format!("hs-pod-{id}"));
    let docker_id = hex(64);
    let (pod_uid, pod_container) = {
        let h = hex(32);
        (
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            ),
            hex(64),
        )
    };
    let docker_cg = Cgroup::new(&format!("/system.slice/docker-{docker_id}.scope"));
    let pod_cg = Cgroup::new(&format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{pod_container}.scope",
        pod_uid.replace('-', "_")
    ));
    let service_cg = Cgroup::new(&format!("/system.slice/hs-test-{id}.service"));

    let plain_w = Workload::start(Some(&plain.0), Some(&service_cg), 8100, [3, 2, 4]);
    let docker_w = Workload::start(Some(&docker_ns.0), Some(&docker_cg), 8101, [5, 1, 2]);
    let pod_w = Workload::start(Some(&pod_ns.0), Some(&pod_cg), 8102, [4, 3, 1]);
    let hidden_w = Workload::start(None, None, 8103, [2, 2, 2]);
    let hidden_inode = hidden_w.netns_inode();
    let hidden_name = format!("ns:{hidden_inode}");

    // A quiet moment: every state settled (FIN_WAIT2 waits on its peer).
    std::thread::sleep(Duration::from_millis(300));
    for (name, enter) in [
        (plain.0.clone(), vec!["ip", "netns", "exec", &plain.0]),
        (
            docker_ns.0.clone(),
            vec!["ip", "netns", "exec", &docker_ns.0],
        ),
        (pod_ns.0.clone(), vec!["ip", "netns", "exec", &pod_ns.0]),
    ] {
        assert_eq!(daemon_states(&daemon, &name), ss_states(&enter), "{name}");
    }
    let pid = hidden_w.pid().to_string();
    assert_eq!(
        daemon_states(&daemon, &hidden_name),
        ss_states(&["nsenter", "-t", &pid, "-n"]),
        "the namespace only a process holds"
    );

    // Every socket row names its namespace and workload.
    let rows = daemon.conns(&["--state", "established"]);
    let rows_of = |ns: &str| -> Vec<&serde_json::Value> {
        rows.iter().filter(|r| r["netns"] == ns).collect()
    };
    let check = |ns: &str,
                 cgroup: &str,
                 container: Option<&str>,
                 pod: Option<&str>,
                 unit: Option<&str>,
                 expected: usize| {
        let mine = rows_of(ns);
        assert_eq!(mine.len(), expected, "{ns}: {mine:?}");
        for row in mine {
            assert_eq!(row["cgroup"], cgroup, "{row}");
            assert_eq!(row["container_id"].as_str(), container, "{row}");
            assert_eq!(row["pod_uid"].as_str(), pod, "{row}");
            assert_eq!(row["unit"].as_str(), unit, "{row}");
            assert!(row["netns_inode"].as_u64().is_some(), "{row}");
        }
    };
    let service = format!("hs-test-{id}.service");
    check(&plain.0, &service_cg.path, None, None, Some(&service), 6);
    check(
        &docker_ns.0,
        &docker_cg.path,
        Some(&docker_id),
        None,
        None,
        10,
    );
    check(
        &pod_ns.0,
        &pod_cg.path,
        Some(&pod_container),
        Some(&pod_uid),
        None,
        8,
    );
    let hidden_rows = rows_of(&hidden_name);
    assert_eq!(hidden_rows.len(), 4, "{hidden_rows:?}");
    assert_eq!(hidden_rows[0]["netns_inode"], hidden_inode);

    // CLOSE_WAIT rows too, and the filters of the CLI.
    let close_wait = daemon.conns(&["--state", "close_wait", "--container", &docker_id[..12]]);
    assert_eq!(close_wait.len(), 1, "{close_wait:?}");
    assert_eq!(close_wait[0]["container_id"], docker_id.as_str());
    let by_pod = daemon.conns(&["--state", "close_wait", "--pod", &pod_uid]);
    assert_eq!(by_pod.len(), 3, "{by_pod:?}");
    let by_unit = daemon.conns(&["--state", "established", "--unit", &service]);
    assert_eq!(by_unit.len(), 6, "{by_unit:?}");
    let by_ns = daemon.conns(&["--state", "established", "--netns", &hidden_name]);
    assert_eq!(by_ns.len(), 4, "{by_ns:?}");

    // The socket layer's handshake rows carry the same.
    let handshakes = daemon.conns(&["--container", &docker_id]);
    assert_eq!(
        handshakes.len(),
        2 * (5 + 1 + 2),
        "both ends of each of the docker workload's handshakes: {handshakes:?}"
    );
    assert!(
        handshakes
            .iter()
            .all(|r| r["netns"] == docker_ns.0.as_str())
    );
    let by_pod = daemon.conns(&["--pod", &pod_uid, "--role", "server"]);
    assert_eq!(by_pod.len(), 4 + 3 + 1, "{by_pod:?}");

    // states and timewait by workload: the namespaces holding it.
    let states = daemon.cli_json("states", &["--container", &docker_id[..12]]);
    let names: Vec<&str> = states
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["netns"].as_str())
        .collect();
    assert_eq!(names, [docker_ns.0.as_str()], "{states}");
    let timewait = daemon.cli_json("timewait", &["--pod", &pod_uid]);
    assert_eq!(timewait[0]["netns"], pod_ns.0.as_str(), "{timewait}");
    assert_eq!(timewait[0]["count"], 1, "{timewait}");

    // The metrics: every namespace with its own label (fewer than the top
    // 20 here), and the host-wide sum.
    let metrics = daemon.scrape();
    let established = |ns: &str| {
        metrics.get(
            "handshake_tcp_sockets",
            &[("netns", ns), ("state", "established"), ("family", "ipv4")],
        )
    };
    assert_eq!(established(&docker_ns.0), 10.0);
    assert_eq!(established(&hidden_name), 4.0);

    // A namespace that is gone is forgotten.
    drop(hidden_w);
    std::thread::sleep(Duration::from_millis(1500));
    let states = daemon.cli_json("states", &[]);
    assert!(
        !states
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["netns"] == hidden_name.as_str()),
        "{hidden_name} still listed: {states}"
    );
    drop((plain_w, docker_w, pod_w));
}

/// The inode number of namespace `path`.
fn inode_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).expect("namespace file").ino()
}

/// BPF programs and links loaded on the host now (`bpftool`).
fn bpf_objects() -> (usize, usize) {
    let count = |what: &str| {
        let out = sh("bpftool", &["--json", what, "show"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    };
    (count("prog"), count("link"))
}

/// Open file descriptors of process `pid`.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn interfaces_are_followed_as_they_come_and_go() {
    require_root();
    let _serial = serial();
    let id = unique_id();
    let daemon = Daemon::start(&[]);
    // A second daemon hooks interfaces named hsp* in every namespace.
    let everywhere = Daemon::start(&["--netns", "all", "--iface", "hsp*"]);
    let peer = Named::new(&format!("hs-if-{id}"));
    let (host_if, peer_if) = (format!("hsh{id}"), format!("hsp{id}"));

    // A veth pair made after the start: its host end is attached within a
    // second, and counts the handshakes through it.
    let made = Instant::now();
    sh(
        "ip",
        &[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &peer.0,
        ],
    );
    sh("ip", &["addr", "add", "10.214.0.1/24", "dev", &host_if]);
    sh("ip", &["link", "set", &host_if, "up"]);
    sh(
        "ip",
        &[
            "-n",
            &peer.0,
            "addr",
            "add",
            "10.214.0.2/24",
            "dev",
            &peer_if,
        ],
    );
    sh("ip", &["-n", &peer.0, "link", "set", &peer_if, "up"]);
    let attached = |daemon: &Daemon| {
        daemon.scrape().try_get(
            "handshake_probe_attached",
            &[
                ("probe", "tc_in_handshake"),
                ("interface", &host_if),
                ("netns", "host"),
            ],
        )
    };
    while attached(&daemon) != Some(1.0) {
        let waited = made.elapsed();
        assert!(
            waited < Duration::from_secs(3),
            "not attached after {waited:?}:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("attached {:?} after the interface was made", made.elapsed());
    assert!(
        made.elapsed() < Duration::from_secs(1),
        "attached after {:?}",
        made.elapsed()
    );
    // The other daemon found the new namespace and its interface.
    let inside = |daemon: &Daemon| {
        daemon.scrape().try_get(
            "handshake_probe_attached",
            &[
                ("probe", "tc_eg_handshake"),
                ("interface", &peer_if),
                ("netns", &peer.0),
            ],
        )
    };
    while inside(&everywhere) != Some(1.0) {
        assert!(
            made.elapsed() < Duration::from_secs(5),
            "--netns all: {peer_if} in {} not attached:\n{}",
            peer.0,
            everywhere.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("--netns all attached inside {:?} after", made.elapsed());
    assert_eq!(inside(&daemon), None, "the default hooks stay in the host");
    drop(everywhere);

    let listener = std::net::TcpListener::bind("10.214.0.1:8200").expect("bind on the veth");
    let server = std::thread::spawn(move || {
        for _ in 0..5 {
            let _ = listener.accept();
        }
    });
    for _ in 0..5 {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &peer.0,
                "python3",
                "-c",
                "import socket; socket.create_connection(('10.214.0.1', 8200)).close()",
            ],
        );
    }
    server.join().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let index = std::fs::read_to_string(format!("/sys/class/net/{host_if}/ifindex"))
        .expect("ifindex")
        .trim()
        .parse::<u64>()
        .unwrap();
    let rows = daemon.conns(&["--port", "8200", "--role", "server"]);
    let wire: Vec<_> = rows
        .iter()
        .filter(|r| r["ifindex"] == index && r["source"] != "socket")
        .collect();
    assert_eq!(
        wire.len(),
        5,
        "the new interface's hooks saw each handshake: {rows:?}"
    );
    assert!(wire.iter().all(|r| r["netns"] == "host"), "{wire:?}");

    // Deleted: nothing attached, no series left.
    sh("ip", &["link", "del", &host_if]);
    let gone = Instant::now();
    while attached(&daemon).is_some() {
        assert!(
            gone.elapsed() < Duration::from_secs(3),
            "series still there:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A thousand interfaces made and deleted leak nothing: programs,
    // links, and the daemon's own descriptors.
    std::thread::sleep(Duration::from_millis(500));
    let before = (bpf_objects(), fds(daemon.pid()));
    let mut batch = String::new();
    for round in 0..100 {
        batch.clear();
        for i in 0..10 {
            let name = format!("hsc{id}_{i}");
            batch.push_str(&format!("link add {name} type veth peer name {name}p\n"));
            batch.push_str(&format!("link set {name} up\nlink set {name}p up\n"));
        }
        ip_batch(&batch);
        // Some rounds give the daemon time to attach, others do not.
        std::thread::sleep(Duration::from_millis(if round % 2 == 0 { 150 } else { 5 }));
        batch.clear();
        for i in 0..10 {
            batch.push_str(&format!("link del hsc{id}_{i}\n"));
        }
        ip_batch(&batch);
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = (bpf_objects(), fds(daemon.pid()));
    assert_eq!(
        after, before,
        "((programs, links), daemon fds) before and after"
    );
    let leftover = daemon.scrape().try_get(
        "handshake_probe_attached",
        &[
            ("probe", "tc_in_handshake"),
            ("interface", &format!("hsc{id}_0")),
        ],
    );
    assert_eq!(leftover, None);
    let attaches = daemon
        .log()
        .matches("attached probe=\"tc_in_handshake\"")
        .count();
    eprintln!(
        "{attaches} ingress attaches over 1,000 interfaces; {before:?} before, {after:?} after"
    );
    assert!(attaches > 100, "the daemon followed too few: {attaches}");
    drop(peer);
}

/// Runs `ip -batch -` with `commands`.
fn ip_batch(commands: &str) {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("ip -batch");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(commands.as_bytes())
        .expect("write batch");
    assert!(child.wait().expect("ip").success(), "ip -batch failed");
}

#[test]
fn fifty_quiet_namespaces_are_listed_and_cost_nothing_between_requests() {
    require_root();
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let id = unique_id();
    let namespaces: Vec<Named> = (0..50)
        .map(|i| Named::new(&format!("hs-q{id}-{i}")))
        .collect();
    let inodes: Vec<u64> = namespaces
        .iter()
        .map(|n| inode_of(&Path::new("/run/netns").join(&n.0)))
        .collect();
    // Found within a round or two.
    std::thread::sleep(Duration::from_millis(2500));
    // A TIME_WAIT socket in the host's namespace (this client closes
    // first): an empty namespace counted after it must not show it.
    handshake_tests::http_get(&daemon.metrics_addr, "/metrics").expect("scrape");
    let states = daemon.cli_json("states", &[]);
    for (ns, inode) in namespaces.iter().zip(&inodes) {
        let view = states
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["netns"] == ns.0.as_str())
            .unwrap_or_else(|| panic!("{} not listed", ns.0));
        assert_eq!(view["netns_inode"], *inode);
        let counted: u64 = view["states"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(serde_json::Value::as_u64)
            .sum();
        assert_eq!(counted, 0, "an empty namespace: {view}");
    }
    // Idle: the scheduled rounds count afresh only what changed. Once
    // they skip the quiet namespaces (after a first round that counted
    // them all, and may have spent the census's CPU burst):
    let counted = |m: &handshake_tests::Metrics, result: &str| {
        m.get("handshake_census_netns_total", &[("result", result)])
    };
    let settled = counted(&daemon.scrape(), "skipped");
    let deadline = Instant::now() + Duration::from_secs(60);
    while counted(&daemon.scrape(), "skipped") < settled + 100.0 {
        assert!(
            Instant::now() < deadline,
            "the census never skipped the quiet namespaces"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (metrics, cpu) = (daemon.scrape(), daemon.cpu_seconds());
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let (later, cpu_later) = (daemon.scrape(), daemon.cpu_seconds());
    let seconds = started.elapsed().as_secs_f64();
    let share = (cpu_later - cpu) / seconds;
    let fresh = counted(&later, "counted") - counted(&metrics, "counted");
    let skipped = counted(&later, "skipped") - counted(&metrics, "skipped");
    eprintln!(
        "idle with {} namespaces: {:.2} % of one CPU; {fresh} counted afresh and {skipped} left as they were over {seconds:.1} s",
        states.as_array().unwrap().len(),
        share * 100.0
    );
    // Over ~10 rounds (1 s apart: paid back), the 50 quiet namespaces
    // are never counted again (the host and namespaces holding TIME_WAIT
    // or request sockets may be, each round).
    let rounds = (fresh + skipped) / states.as_array().unwrap().len() as f64;
    assert!(rounds >= 5.0, "{rounds} rounds in {seconds:.1} s");
    assert!(
        skipped >= 50.0 * rounds - 1.0,
        "{skipped} skipped in {rounds} rounds"
    );
    assert!(
        fresh <= 4.0 * rounds,
        "{fresh} counted afresh in {rounds} rounds"
    );
    drop(namespaces);
}

/// The CLI's output piped into a reader that goes away (`| head -1`) ends
/// it quietly: no panic on the broken pipe.
#[test]
fn a_reader_that_goes_away_ends_the_cli_quietly() {
    require_root();
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let bin = handshake_tests::handshake_bin();
    for command in ["conns", "states", "listeners", "closes", "tls", "timewait"] {
        // `true` exits at once; the CLI writes after it, into a pipe
        // nobody reads.
        let script = format!(
            "sleep 0.2; {} {command} --api-socket {} 2>/tmp/handshake-pipe-$$.err; cat /tmp/handshake-pipe-$$.err >&2; rm -f /tmp/handshake-pipe-$$.err",
            bin.display(),
            daemon.api_socket.display()
        );
        let out = Command::new("sh")
            .args(["-c", &format!("({script}) | true")])
            .output()
            .expect("run the pipeline");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "handshake {command} | true: {stderr}"
        );
    }
}
