//! `cargo xtask bench [WHICH]`: benchmarks, each reported as ratios against
//! a baseline measured side by side in the same run (docs/BENCHMARKS.md).
//!
//! 1. `xdp`: what the ingress program costs per frame, as a ratio to a
//!    pass-only XDP program from the same object, both driven by
//!    BPF_PROG_TEST_RUN, in interleaved rounds.
//! 2. `fingerprint`: the daemon's userspace cost per ClientHello (parse,
//!    and parse plus JA4/JA4_r/JA3).
//! 3. `churn`: saturated connection churn over loopback and between two
//!    namespaces, in interleaved rounds of {no observer, the daemon's
//!    defaults, the daemon with hooks on the path, pass-only hooks there,
//!    libbpf-tools `tcpstates`}, each verified running and emitting; each
//!    observer's conns/s as a ratio to the same round's no-observer rate,
//!    its machine CPU per connection, and the programs' cost from the
//!    kernel's statistics.
//! 4. `census`: the socket census against `ss` and node_exporter.
//! 5. `tls`: full TLS handshakes per second with and without the daemon.
//! 6. `forecast`: whether the port-exhaustion forecast comes true on the
//!    wall clock (forecast seconds over the seconds exhaustion took).
//! 7. `namespaces`: the daemon's idle CPU with the host's namespace alone
//!    and with 100 more, side by side with what counting every namespace
//!    every round would cost; and a full census on request.
//!
//! Each measurement is one BPF_PROG_TEST_RUN call repeating the frame
//! `REPEAT` times. The kernel runs the repeats in the calling thread, so the
//! per-frame time is that thread's CPU time over `REPEAT`: sub-nanosecond
//! resolution, and time spent descheduled (the kernel yields every few
//! thousand repeats) is not counted. The kernel's own figure, whole
//! nanoseconds, is printed beside it.

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use handshake_common::{
    abi::program,
    packet::tcp_flags::{ACK, PSH, SYN},
    testframes::{FrameBuilder, client_hello_record},
};
use handshake_user::kernel::loader::Observer;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 7;

struct Sample {
    cpu_ns: f64,
    kernel_ns: u128,
}

/// Program `name` of the loaded object, as the type it must be.
fn program_of<'a, P>(observer: &'a mut Observer, name: &str) -> &'a mut P
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    observer
        .ebpf_mut()
        .program_mut(name)
        .unwrap_or_else(|| panic!("no program {name}"))
        .try_into()
        .unwrap_or_else(|e| panic!("program {name}: {e}"))
}

fn measure(observer: &mut Observer, name: &str, frame: &[u8]) -> Sample {
    let prog: &mut Xdp = program_of(observer, name);
    let start = thread_cpu_ns();
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: REPEAT,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test run of {name}: {e}"));
    let cpu = thread_cpu_ns() - start;
    Sample {
        cpu_ns: cpu as f64 / f64::from(REPEAT),
        kernel_ns: result.duration.as_nanos(),
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u128 {
    u128::from(handshake_user::kernel::clock::read_ns(
        libc::CLOCK_THREAD_CPUTIME_ID,
    ))
}

/// CPU time the whole machine spent busy so far (user, nice, system, irq,
/// softirq of every CPU; idle, iowait and steal left out), in seconds.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    let line = stat.lines().next().expect("/proc/stat has a cpu line");
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().expect("/proc/stat counter"))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Rounds of the churn and TLS benchmarks: `default`, or
/// `HANDSHAKE_BENCH_ROUNDS` for a longer (or quicker) run.
fn rounds(default: usize) -> usize {
    std::env::var("HANDSHAKE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(default)
}

/// The kernel programs of the object, by name: those the daemon attaches
/// and the benchmark's floors (a program that did not run is not listed).
const PROGRAMS: [&str; 10] = program::ALL;

/// Runs and run time so far of each of [`PROGRAMS`], summed over the
/// loaded programs of that name, from the kernel's own statistics (kept
/// only while [`ProgramCosts::start`]'s file descriptor is open).
fn program_totals() -> Vec<(u64, u64)> {
    let mut totals = vec![(0, 0); PROGRAMS.len()];
    for info in aya::programs::loaded_programs().flatten() {
        // The kernel keeps 15 bytes of a name, aya may keep fewer: match
        // the start.
        let name = info.name_as_str().unwrap_or_default();
        if name.len() < 8 {
            continue;
        }
        if let Some(i) = PROGRAMS.iter().position(|p| p.starts_with(name)) {
            totals[i].0 += info.run_count();
            totals[i].1 += info.run_time().as_nanos() as u64;
        }
    }
    totals
}

/// What each of the daemon's kernel programs costs under a load, from the
/// kernel's per-program statistics (BPF_ENABLE_STATS: two clock reads per
/// run, so a measuring round is run apart from the ratio rounds).
struct ProgramCosts {
    _stats: std::os::fd::OwnedFd,
    before: Vec<(u64, u64)>,
}

impl ProgramCosts {
    fn start() -> Self {
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .expect("BPF_ENABLE_STATS (run as root)");
        Self {
            _stats: stats,
            before: program_totals(),
        }
    }

    /// Prints, per program that ran, its runs and time per unit of work
    /// (`per`: a connection, a handshake) over `units` of it, done at
    /// `rate` units a second; their total; the daemon process's own CPU
    /// (`daemon_seconds` over the same work); and both as a share of the
    /// machine's CPU. Call it while the programs are still loaded.
    fn report(self, units: f64, per: &str, daemon_seconds: f64, rate: f64) {
        let after = program_totals();
        let mut total = 0.0;
        for (i, name) in PROGRAMS.iter().enumerate() {
            let runs = after[i].0.saturating_sub(self.before[i].0);
            let ns = after[i].1.saturating_sub(self.before[i].1);
            if runs == 0 {
                continue;
            }
            let us_per = ns as f64 / 1000.0 / units;
            total += us_per;
            println!(
                "    {name:<16} {:>5.1} runs, {:>5.0} ns a run, {us_per:>5.2} µs per {per}",
                runs as f64 / units,
                ns as f64 / runs as f64,
            );
        }
        println!("    {:<16} {total:>42.2} µs per {per}", "all programs");
        let daemon_us = daemon_seconds * 1e6 / units;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "    {:<16} {daemon_us:>42.2} µs per {per}\n    kernel programs and daemon process: {:.1} % of the machine's CPU at this rate",
            "daemon process",
            (total + daemon_us) * rate / 1e6 / cpus * 100.0
        );
    }
}

/// The smallest and the largest of `values`.
fn spread(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Per-pair ratios (with over without) split by which round of the pair
/// ran first, and the estimate that cancels an effect of the order: the
/// geometric mean of the two groups' medians. A round's position in its
/// pair can move its rate by a few percent on this VM (what ran just
/// before it); alternating the order cancels that only if both orders
/// weigh the same, which one median over all pairs does not ensure.
fn order_report(daemon_first: &mut [f64], daemon_second: &mut [f64]) {
    if daemon_first.is_empty() || daemon_second.is_empty() {
        return;
    }
    let (first, second) = (median(daemon_first), median(daemon_second));
    println!(
        "ratio by order: daemon's round first {first:.3} ({} pairs), second {second:.3} ({} pairs); order-balanced {:.3}",
        daemon_first.len(),
        daemon_second.len(),
        (first * second).sqrt()
    );
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".to_owned());
    if which == "all" || which == "xdp" {
        xdp_cost();
    }
    if which == "all" || which == "fingerprint" {
        fingerprint_cost();
    }
    if which == "all" || which == "churn" {
        churn::run(
            std::env::args().nth(2).as_deref(),
            std::env::args().nth(3).as_deref(),
        );
    }
    if which == "all" || which == "census" {
        census::run();
    }
    if which == "all" || which == "tls" {
        tls::run();
    }
    if which == "all" || which == "forecast" {
        forecast::run();
    }
    if which == "all" || which == "namespaces" {
        namespaces::run();
    }
}

fn xdp_cost() {
    let mut observer = Observer::load().expect("load the kernel programs (run as root)");
    // The baseline is loaded on demand: the daemon never loads it.
    program_of::<Xdp>(&mut observer, program::XDP_PASS_BASELINE)
        .load()
        .expect("load the baseline");
    let frames = [
        (
            "bare ACK (IPv4, data frame)",
            FrameBuilder::v4().tcp_options(12).tcp(ACK, &[]).build(),
        ),
        (
            "data, 512 B of HTTP (IPv4)",
            FrameBuilder::v4()
                .tcp_options(12)
                .tcp(
                    ACK | PSH,
                    &[b"GET / HTTP/1.1\r\nHost: x\r\n".as_slice(), &[b'a'; 485]].concat(),
                )
                .build(),
        ),
        (
            "SYN (IPv4, 20 B options)",
            FrameBuilder::v4().tcp_options(20).tcp(SYN, &[]).build(),
        ),
        (
            "SYN (IPv6, 20 B options)",
            FrameBuilder::v6().tcp_options(20).tcp(SYN, &[]).build(),
        ),
        (
            "ClientHello (IPv4)",
            FrameBuilder::v4()
                .tcp_options(12)
                .tcp(ACK | PSH, &client_hello_record())
                .build(),
        ),
    ];

    println!(
        "XDP ingress cost per frame, BPF_PROG_TEST_RUN, {REPEAT} repeats x {ROUNDS} interleaved rounds"
    );
    println!(
        "{:<30} {:>10} {:>10} {:>8} {:>8} {:>8} {:>12}",
        "frame", "pass ns", "ours ns", "ratio", "min", "max", "kernel ns"
    );
    for (label, frame) in &frames {
        let (mut base, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut kernel = (0u128, 0u128);
        for _ in 0..ROUNDS {
            let b = measure(&mut observer, program::XDP_PASS_BASELINE, frame);
            let o = measure(&mut observer, program::XDP_INGRESS, frame);
            ratios.push(o.cpu_ns / b.cpu_ns);
            base.push(b.cpu_ns);
            ours.push(o.cpu_ns);
            kernel = (b.kernel_ns, o.kernel_ns);
        }
        let (min, max) = spread(&ratios);
        println!(
            "{:<30} {:>10.1} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>6} / {:<4}",
            label,
            median(&mut base),
            median(&mut ours),
            median(&mut ratios),
            min,
            max,
            kernel.0,
            kernel.1
        );
    }
    println!(
        "ratio = ours / pass-only, median of the per-round ratios; kernel ns = the kernel's own per-run figure (last round, pass / ours)"
    );
}

/// What the daemon spends in userspace per ClientHello: parsing it, and
/// parsing it and computing JA4, JA4_r and JA3, over the 62 reference
/// ClientHellos, in interleaved rounds. Thread CPU time per hello.
fn fingerprint_cost() {
    use handshake_common::tls::ClientHello;
    use handshake_tests::capture_file::{
        first_handshake_messages, read_frames, reference_captures,
    };
    use handshake_user::model::fingerprint::Fingerprints;

    const PASSES: usize = 2000;
    let hellos: Vec<Vec<u8>> = reference_captures()
        .iter()
        .flat_map(|(path, _)| first_handshake_messages(&read_frames(path)).into_values())
        .collect();
    let time = |fingerprint: bool| {
        let start = thread_cpu_ns();
        for _ in 0..PASSES {
            for hello in &hellos {
                let parsed = ClientHello::parse(std::hint::black_box(hello));
                if fingerprint && let Ok(parsed) = &parsed {
                    std::hint::black_box(Fingerprints::of(parsed));
                } else {
                    std::hint::black_box(&parsed);
                }
            }
        }
        (thread_cpu_ns() - start) as f64 / (PASSES * hellos.len()) as f64
    };
    let (mut parse, mut both, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let p = time(false);
        let b = time(true);
        parse.push(p);
        both.push(b);
        ratios.push(b / p);
    }
    println!();
    println!(
        "Userspace cost per ClientHello ({} reference hellos x {PASSES}, {ROUNDS} interleaved rounds)",
        hellos.len()
    );
    println!(
        "parse only {:.2} µs, parse + JA4/JA4_r/JA3 {:.2} µs, ratio {:.2}",
        median(&mut parse) / 1000.0,
        median(&mut both) / 1000.0,
        median(&mut ratios)
    );
}

mod churn {
    //! Connection churn, in two scenes: two namespaces joined by a veth
    //! pair, and two sockets of the host over loopback. Two client threads
    //! connect as fast as they can; a server thread accepts and closes at
    //! once (the server closes first, so TIME_WAIT lands on the server side
    //! and client ports stay free); the client reads the EOF and closes.
    //! Each round runs every observer of the scene for `ROUND`, the order
    //! rotated each round. Every observer is checked to be running and to
    //! have seen the round's connections before its figure counts; one that
    //! was not gets no ratio.

    use std::{
        io::{BufRead as _, BufReader, Read as _},
        net::{SocketAddr, TcpListener, TcpStream},
        process::{Child, Command, Stdio},
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        thread::JoinHandle,
        time::{Duration, Instant},
    };

    use aya::programs::{SchedClassifier, TcAttachType, tc::TcAttach};
    use handshake_common::abi::program;
    use handshake_tests::{Daemon, NetnsPair, spawn_in};
    use handshake_user::kernel::{loader, netns::Netns};

    const ROUNDS: usize = 15;
    const ROUND: Duration = Duration::from_secs(3);
    const PORT: u16 = 7000;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Scene {
        /// Client and server namespaces over a veth pair.
        Namespaces,
        /// Client and server sockets of the host over 127.0.0.1.
        Loopback,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Observer {
        None,
        /// `handshake daemon` with no flags, in the host: no packet hook on
        /// the churn's path (none on loopback, none in the namespaces).
        Defaults,
        /// The daemon with its packet hooks on the churn's path: the
        /// server-side veth (tc or XDP ingress), or `lo`.
        HooksTc,
        HooksXdp,
        /// Programs that return at once, attached where the hooks go.
        PassOnly,
        /// libbpf-tools `tcpstates`, host-wide.
        Tcpstates,
    }

    impl Observer {
        fn parse(name: &str) -> Option<Self> {
            Some(match name {
                "none" => Self::None,
                "defaults" => Self::Defaults,
                "tc" => Self::HooksTc,
                "xdp" => Self::HooksXdp,
                "pass" => Self::PassOnly,
                "tcpstates" => Self::Tcpstates,
                _ => return None,
            })
        }

        fn label(self, scene: Scene) -> &'static str {
            match (self, scene) {
                (Self::None, _) => "no observer",
                (Self::Defaults, _) => "daemon, defaults (no hook on the path)",
                (Self::HooksTc, Scene::Namespaces) => "daemon, tc hooks on the veth",
                (Self::HooksTc, Scene::Loopback) => "daemon, tc hooks on lo (--iface lo)",
                (Self::HooksXdp, Scene::Namespaces) => "daemon, XDP (generic) + tc on the veth",
                (Self::HooksXdp, Scene::Loopback) => "daemon, XDP (generic) + tc on lo",
                (Self::PassOnly, Scene::Namespaces) => "pass-only tc hooks on the veth",
                (Self::PassOnly, Scene::Loopback) => "pass-only tc hooks on lo",
                (Self::Tcpstates, _) => "libbpf-tools tcpstates",
            }
        }

        const fn is_daemon(self) -> bool {
            matches!(self, Self::Defaults | Self::HooksTc | Self::HooksXdp)
        }

        const fn default_list(scene: Scene) -> &'static [Self] {
            match scene {
                Scene::Namespaces => &[
                    Self::None,
                    Self::Defaults,
                    Self::HooksTc,
                    Self::HooksXdp,
                    Self::PassOnly,
                    Self::Tcpstates,
                ],
                Scene::Loopback => &[
                    Self::None,
                    Self::Defaults,
                    Self::HooksTc,
                    Self::PassOnly,
                    Self::Tcpstates,
                ],
            }
        }
    }

    /// Where the churn runs: the namespaces (or none: the host), the
    /// interface the hooks go on, and the server's address.
    struct Place {
        scene: Scene,
        pair: Option<NetnsPair>,
        server: SocketAddr,
    }

    impl Place {
        fn new(scene: Scene) -> Self {
            match scene {
                Scene::Namespaces => Self {
                    scene,
                    server: format!("{}:{PORT}", NetnsPair::SERVER_V4).parse().unwrap(),
                    pair: Some(NetnsPair::new()),
                },
                Scene::Loopback => Self {
                    scene,
                    server: format!("127.0.0.1:{}", PORT + 1).parse().unwrap(),
                    pair: None,
                },
            }
        }

        fn client_ns(&self) -> Option<&str> {
            self.pair.as_ref().map(|p| p.client.as_str())
        }

        fn server_ns(&self) -> Option<&str> {
            self.pair.as_ref().map(|p| p.server.as_str())
        }

        /// The interface the hooks go on, in the server's namespace.
        fn hook_iface(&self) -> &str {
            self.pair.as_ref().map_or("lo", |p| p.server_if.as_str())
        }

        fn spawn<T: Send + 'static>(
            ns: Option<&str>,
            f: impl FnOnce() -> T + Send + 'static,
        ) -> JoinHandle<T> {
            match ns {
                Some(ns) => spawn_in(ns, f),
                None => std::thread::spawn(f),
            }
        }

        /// `ss -K` of the TIME_WAIT sockets the last round left (only this
        /// churn's port on the host).
        fn clear_time_wait(&self) {
            let filter = format!("( sport = :{0} or dport = :{0} )", self.server.port());
            let namespaces: Vec<Option<&str>> = match &self.pair {
                Some(p) => vec![Some(p.client.as_str()), Some(p.server.as_str())],
                None => vec![None],
            };
            for ns in namespaces {
                let mut command = match ns {
                    Some(ns) => {
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", ns, "ss"]);
                        c
                    }
                    None => Command::new("ss"),
                };
                let _ = command
                    .args(["-K", "state", "time-wait", &filter])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    /// The pass-only floor: `tc_pass_base` from the daemon's own object,
    /// loaded once, attached at ingress and egress for its rounds.
    struct PassOnly {
        observer: loader::Observer,
    }

    impl PassOnly {
        fn load() -> Self {
            let mut pass = Self {
                observer: loader::Observer::load().expect("load the kernel programs"),
            };
            pass.program()
                .load()
                .expect("load the pass-only tc program");
            pass
        }

        fn program(&mut self) -> &mut SchedClassifier {
            super::program_of(&mut self.observer, program::TC_PASS_BASELINE)
        }

        fn attach(&mut self, place: &Place) {
            let netns = match place.server_ns() {
                Some(ns) => Netns::open(ns).expect("server namespace"),
                None => Netns::host(),
            };
            let iface = std::ffi::CString::new(place.hook_iface()).unwrap();
            let prog = self.program();
            netns
                .run(|| {
                    for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
                        prog.attach(
                            iface.as_c_str(),
                            TcAttach::Tcx {
                                attach_type,
                                order: Default::default(),
                            },
                        )
                        .expect("attach the pass-only tc program (TCX)");
                    }
                })
                .expect("enter the server namespace");
        }

        /// Detaches both links (TCX links detach with their owner, wherever
        /// they were made).
        fn detach(&mut self) {
            let prog = self.program();
            let _ = prog.unload();
            prog.load().expect("reload the pass-only tc program");
        }
    }

    /// `tcpstates` and the count of lines it printed (a header, then one
    /// line per state change).
    struct Tcpstates {
        child: Child,
        lines: Arc<AtomicU64>,
    }

    enum Running {
        Nothing,
        Daemon(Daemon),
        Pass,
        Tool(Tcpstates),
    }

    fn start(observer: Observer, place: &Place, pass: &mut Option<PassOnly>) -> Running {
        let hooks = |hook: &str| {
            Running::Daemon(match &place.pair {
                Some(pair) => pair.server_daemon(&["--ingress-hook", hook]),
                None => Daemon::start(&["--iface", "lo", "--ingress-hook", hook]),
            })
        };
        match observer {
            Observer::None => Running::Nothing,
            Observer::Defaults => Running::Daemon(Daemon::start(&[])),
            Observer::HooksTc => hooks("tc"),
            Observer::HooksXdp => hooks("xdp"),
            Observer::PassOnly => {
                pass.get_or_insert_with(PassOnly::load).attach(place);
                Running::Pass
            }
            Observer::Tcpstates => {
                // Line-buffered: it prints with stdio, which would hold a
                // pipe's lines back a block at a time.
                let mut child = Command::new("stdbuf")
                    .args(["-oL", "tcpstates"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start tcpstates (Debian package libbpf-tools)");
                let lines = Arc::new(AtomicU64::new(0));
                let out = child.stdout.take().expect("piped stdout");
                let counted = Arc::clone(&lines);
                std::thread::spawn(move || {
                    for _ in BufReader::new(out).lines().map_while(Result::ok) {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                });
                // It prints its header once attached.
                let deadline = Instant::now() + Duration::from_secs(10);
                while lines.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Running::Tool(Tcpstates { child, lines })
            }
        }
    }

    /// Stops the observer; whether it was running and saw the round's
    /// connections, and if not, why.
    fn stop(running: Running, pass: &mut Option<PassOnly>) -> Result<(), String> {
        match running {
            Running::Nothing => Ok(()),
            Running::Pass => {
                if let Some(pass) = pass {
                    pass.detach();
                }
                Ok(())
            }
            Running::Daemon(daemon) => {
                let metrics = daemon.scrape();
                let counted = metrics
                    .try_get("handshake_tcp_handshakes_total", &[("role", "server")])
                    .unwrap_or(0.0);
                daemon.stop(libc::SIGTERM);
                if counted > 0.0 {
                    Ok(())
                } else {
                    Err("the daemon counted no server handshake".to_owned())
                }
            }
            Running::Tool(mut tool) => {
                // SAFETY: kill on our own child's pid.
                unsafe { libc::kill(tool.child.id() as i32, libc::SIGINT) };
                let status = tool.child.wait();
                let lines = tool.lines.load(Ordering::Relaxed);
                // A header line, then events.
                if lines > 1 {
                    Ok(())
                } else {
                    Err(format!(
                        "tcpstates printed {lines} line(s) and exited {status:?}: not attached"
                    ))
                }
            }
        }
    }

    /// Lets the kernel finish freeing what the last round and `ss -K` left
    /// (sockets go through RCU) before the next measurement starts.
    fn settle() {
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Connections completed by two client threads in `ROUND`.
    fn round(place: &Place) -> f64 {
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + ROUND;
        let server = place.server;
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let done = Arc::clone(&done);
                Place::spawn(place.client_ns(), move || {
                    let mut buf = [0u8; 16];
                    while Instant::now() < deadline {
                        if let Ok(mut stream) = TcpStream::connect(server) {
                            let _ = stream.read(&mut buf);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().expect("client thread");
        }
        done.load(Ordering::Relaxed) as f64 / ROUND.as_secs_f64()
    }

    /// One observer's figures over the rounds.
    #[derive(Default)]
    struct Figures {
        rates: Vec<f64>,
        /// The machine's busy CPU per connection, µs.
        machine_us: Vec<f64>,
        /// The daemon process's CPU per connection, µs.
        daemon_us: Vec<f64>,
        /// Why a round did not count, if one did not.
        failures: Vec<String>,
    }

    /// Mounts tracefs for `tcpstates` (a classic tracepoint) when it is
    /// not mounted, as on a freshly booted machine here; unmounts it again
    /// when dropped.
    struct Tracefs {
        mounted_here: bool,
    }

    impl Tracefs {
        const PATH: &str = "/sys/kernel/tracing";

        fn ensure() -> Self {
            if std::path::Path::new(Self::PATH).join("events").exists() {
                return Self {
                    mounted_here: false,
                };
            }
            let status = Command::new("mount")
                .args(["-t", "tracefs", "nodev", Self::PATH])
                .status();
            let mounted_here = matches!(status, Ok(s) if s.success());
            println!(
                "tracefs was not mounted: {} (tcpstates needs it)",
                if mounted_here {
                    "mounted it for tcpstates, unmounted after"
                } else {
                    "could not mount it"
                }
            );
            Self { mounted_here }
        }
    }

    impl Drop for Tracefs {
        fn drop(&mut self) {
            if self.mounted_here {
                let _ = Command::new("umount").arg(Self::PATH).status();
            }
        }
    }

    /// `args`: `[SCENE] [OBSERVERS]`, SCENE one of `all` (default),
    /// `namespaces`, `loopback`; OBSERVERS comma-separated, `none` first
    /// (the baseline), from `none,defaults,tc,xdp,pass,tcpstates`.
    /// Repeating `none` measures the benchmark's own noise.
    pub fn run(scene: Option<&str>, list: Option<&str>) {
        let scenes = match scene.unwrap_or("all") {
            "all" => vec![Scene::Loopback, Scene::Namespaces],
            "namespaces" => vec![Scene::Namespaces],
            "loopback" => vec![Scene::Loopback],
            other => {
                eprintln!(
                    "handshake-bench: unknown churn scene {other:?} (all, namespaces, loopback)"
                );
                std::process::exit(2)
            }
        };
        let chosen: Option<Vec<Observer>> = list.map(|list| {
            list.split(',')
                .map(|name| {
                    Observer::parse(name).unwrap_or_else(|| {
                        eprintln!(
                            "handshake-bench: unknown observer {name:?} (none, defaults, tc, xdp, pass, tcpstates)"
                        );
                        std::process::exit(2)
                    })
                })
                .collect()
        });
        if let Some(list) = &chosen
            && list.first() != Some(&Observer::None)
        {
            eprintln!("handshake-bench: the first observer must be `none`, the baseline");
            std::process::exit(2);
        }
        let _tracefs = Tracefs::ensure();
        for scene in scenes {
            let observers = chosen
                .clone()
                .unwrap_or_else(|| Observer::default_list(scene).to_vec());
            run_scene(scene, &observers);
        }
    }

    fn run_scene(scene: Scene, observers: &[Observer]) {
        let place = Place::new(scene);
        let server = place.server;
        let stop_server = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let acceptor = {
            let stop_server = Arc::clone(&stop_server);
            Place::spawn(place.server_ns(), move || {
                let listener = TcpListener::bind(server).expect("bind churn server");
                ready_tx.send(()).expect("bench waits");
                for stream in listener.incoming() {
                    if stop_server.load(Ordering::Relaxed) {
                        break;
                    }
                    drop(stream);
                }
            })
        };
        ready_rx.recv().expect("churn server");
        let mut pass = None;

        let rounds = super::rounds(ROUNDS);
        println!();
        println!(
            "Connection churn, {} (IPv4, 2 client threads, {} s rounds, {rounds} interleaved rounds)",
            match scene {
                Scene::Namespaces => "two namespaces over veth",
                Scene::Loopback => "host loopback",
            },
            ROUND.as_secs()
        );
        let mut figures: Vec<Figures> = observers.iter().map(|_| Figures::default()).collect();
        for r in 0..rounds {
            // Rotate the order each round, so no observer always follows the
            // same one.
            for k in 0..observers.len() {
                let i = (k + r) % observers.len();
                let observer = observers[i];
                let running = start(observer, &place, &mut pass);
                place.clear_time_wait();
                settle();
                let cpu_before = daemon_cpu(&running);
                let busy_before = super::machine_busy_seconds();
                let rate = round(&place);
                let busy = super::machine_busy_seconds() - busy_before;
                let cpu = daemon_cpu(&running) - cpu_before;
                let verified = stop(running, &mut pass);
                let conns = rate * ROUND.as_secs_f64();
                let f = &mut figures[i];
                let own = if observer.is_daemon() {
                    format!("  daemon {:.2} µs/conn", cpu * 1e6 / conns)
                } else {
                    String::new()
                };
                println!(
                    "  round {:>2} {:<44} {rate:>8.0} conns/s  machine {:>6.1} µs/conn{own}{}",
                    r + 1,
                    observer.label(scene),
                    busy * 1e6 / conns,
                    verified
                        .as_ref()
                        .err()
                        .map_or(String::new(), |e| format!("  NOT COUNTED: {e}"))
                );
                match verified {
                    Ok(()) => {
                        f.rates.push(rate);
                        f.machine_us.push(busy * 1e6 / conns);
                        f.daemon_us.push(cpu * 1e6 / conns);
                    }
                    Err(e) => f.failures.push(e),
                }
            }
        }
        for observer in observers
            .iter()
            .filter(|o| **o != Observer::None && **o != Observer::Tcpstates)
        {
            cost_round(*observer, &place, &mut pass);
        }
        stop_server.store(true, Ordering::Relaxed);
        Place::spawn(place.client_ns(), move || {
            let _ = TcpStream::connect(server);
        })
        .join()
        .ok();
        acceptor.join().ok();
        summary(scene, observers, &figures);
    }

    fn daemon_cpu(running: &Running) -> f64 {
        match running {
            Running::Daemon(daemon) => daemon.cpu_seconds(),
            _ => 0.0,
        }
    }

    /// One more round with the kernel's per-program statistics on
    /// (BPF_ENABLE_STATS: two clock reads a run, so apart from the ratio
    /// rounds): what each program costs per connection.
    fn cost_round(observer: Observer, place: &Place, pass: &mut Option<PassOnly>) {
        let running = start(observer, place, pass);
        place.clear_time_wait();
        settle();
        let costs = super::ProgramCosts::start();
        let cpu_before = daemon_cpu(&running);
        let rate = round(place);
        let cpu = daemon_cpu(&running) - cpu_before;
        let conns = rate * ROUND.as_secs_f64();
        println!(
            "Where the cost goes: {} (kernel statistics on, {rate:.0} conns/s):",
            observer.label(place.scene)
        );
        costs.report(conns, "connection", cpu, rate);
        if let Err(e) = stop(running, pass) {
            println!("    NOT COUNTED: {e}");
        }
    }

    fn summary(scene: Scene, observers: &[Observer], figures: &[Figures]) {
        println!(
            "{:<44} {:>9} {:>7} {:>7} {:>7} {:>10} {:>10} {:>10}",
            "observer", "median/s", "ratio", "min", "max", "machine µs", "over none", "daemon µs"
        );
        let mut base_machine = figures[0].machine_us.clone();
        let base_machine = super::median(&mut base_machine);
        for (observer, f) in observers.iter().zip(figures) {
            let label = observer.label(scene);
            if f.rates.is_empty() {
                println!(
                    "{label:<44} no ratio: not verified running and emitting ({})",
                    f.failures.first().map_or("", String::as_str)
                );
                continue;
            }
            // Ratios of the rounds in which this observer counted.
            let mut ratios: Vec<f64> = f
                .rates
                .iter()
                .zip(&figures[0].rates)
                .map(|(o, base)| o / base)
                .collect();
            let (min, max) = super::spread(&ratios);
            let mut rates = f.rates.clone();
            let mut machine = f.machine_us.clone();
            let machine = super::median(&mut machine);
            let mut daemon = f.daemon_us.clone();
            let daemon = if observer.is_daemon() {
                format!("{:>10.2}", super::median(&mut daemon))
            } else {
                format!("{:>10}", "")
            };
            println!(
                "{label:<44} {:>9.0} {:>7.3} {min:>7.3} {max:>7.3} {machine:>10.2} {:>+10.2} {daemon}{}",
                super::median(&mut rates),
                super::median(&mut ratios),
                machine - base_machine,
                if f.failures.is_empty() {
                    String::new()
                } else {
                    format!("  ({} round(s) not counted)", f.failures.len())
                }
            );
        }
        println!(
            "ratio = conns/s over the same round's no-observer conns/s, median over rounds; machine µs = all CPUs' busy time per connection (/proc/stat), median; over none = its excess over the no-observer rounds'; daemon µs = the daemon process's CPU per connection"
        );
    }
}

mod census {
    //! The socket census against `ss` and node_exporter's tcpstat collector
    //! (both netlink sock_diag), on one namespace holding ~30,000 TIME_WAIT
    //! sockets, in interleaved rounds; and the daemon's memory with and
    //! without those sockets.

    use std::{
        fs::File,
        io::Read as _,
        net::{SocketAddr, TcpListener, TcpStream},
        os::{fd::AsRawFd as _, unix::process::CommandExt as _},
        process::{Command, Stdio},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::{Duration, Instant},
    };

    use handshake_common::abi::tcp_state;
    use handshake_tests::{NetnsPair, free_port, http_get, spawn_in};
    use handshake_user::kernel::{loader::Observer, netns::Netns};

    const TARGET: u64 = 30_000;
    const ROUNDS: usize = 7;

    /// `program args` with its network namespace set to `ns` (no `ip netns
    /// exec` in between, so only the tool itself is timed).
    fn in_netns(ns: &str, program: &str, args: &[&str]) -> Command {
        let handle = File::open(format!("/run/netns/{ns}")).expect("open netns");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setns in the forked child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        cmd
    }

    fn rss_kib(pid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn run() {
        let pair = NetnsPair::new();
        let mut observer = Observer::load().expect("load the kernel programs (run as root)");
        let mut census = observer
            .take_census()
            .expect("the census loads on this kernel");
        let netns = Netns::open(&pair.server).expect("server namespace");
        let daemon = pair.server_daemon(&[]);
        let rss_before = rss_kib(daemon.pid());

        // TIME_WAIT on the server side: it closes first. Four server
        // ports, because connect() reuses a client port as soon as its
        // own side is closed, and a new SYN recycles the server's TIME_WAIT
        // socket of the same four-tuple.
        let servers: Vec<SocketAddr> = (7300..7304)
            .map(|port| format!("{}:{port}", NetnsPair::SERVER_V4).parse().unwrap())
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptors: Vec<_> = servers
            .iter()
            .map(|&server| {
                let stop = Arc::clone(&stop);
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                let acceptor = spawn_in(&pair.server, move || {
                    let listener = TcpListener::bind(server).unwrap();
                    ready_tx.send(()).unwrap();
                    for stream in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        drop(stream);
                    }
                });
                ready_rx.recv().unwrap();
                acceptor
            })
            .collect();
        let filler = {
            let servers = servers.clone();
            spawn_in(&pair.client, move || {
                for i in 0..TARGET + TARGET / 3 {
                    if let Ok(mut s) = TcpStream::connect(servers[i as usize % servers.len()]) {
                        let _ = s.read(&mut [0u8; 1]);
                    }
                }
            })
        };
        filler.join().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let held = census
            .run(&netns, 0, 0)
            .unwrap()
            .count(tcp_state::TIME_WAIT);

        // node_exporter with only tcpstat, inside the namespace.
        let exporter_addr = format!("127.0.0.1:{}", free_port());
        let mut exporter = in_netns(
            &pair.server,
            "prometheus-node-exporter",
            &[
                "--collector.disable-defaults",
                "--collector.tcpstat",
                &format!("--web.listen-address={exporter_addr}"),
            ],
        )
        .spawn()
        .expect("start prometheus-node-exporter (Debian package)");
        let exporter_up = |addr: &str| {
            // It listens inside the namespace: ask from a thread there.
            let addr = addr.to_owned();
            let ns = pair.server.clone();
            spawn_in(&ns, move || http_get(&addr, "/metrics"))
                .join()
                .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while exporter_up(&exporter_addr).is_err() {
            assert!(Instant::now() < deadline, "node_exporter did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }

        let mut ours = Vec::new();
        let mut ss = Vec::new();
        let mut tcpstat = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let snapshot = census.run(&netns, 0, 0).unwrap();
            ours.push(t.elapsed().as_secs_f64());
            assert!(snapshot.count(tcp_state::TIME_WAIT) + 100 >= held);

            let t = Instant::now();
            let status = in_netns(&pair.server, "ss", &["-tan", "state", "time-wait"])
                .status()
                .expect("run ss");
            ss.push(t.elapsed().as_secs_f64());
            assert!(status.success());

            let t = Instant::now();
            let body = exporter_up(&exporter_addr).expect("scrape node_exporter");
            tcpstat.push(t.elapsed().as_secs_f64());
            assert!(body.contains("node_tcp_connection_states"));
        }
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(exporter.id() as i32, libc::SIGTERM) };
        let _ = exporter.wait();

        // The daemon has censused the namespace every second meanwhile.
        let rss_after = rss_kib(daemon.pid());
        drop(daemon);
        stop.store(true, Ordering::Relaxed);
        let _ = spawn_in(&pair.client, move || {
            for server in servers {
                let _ = TcpStream::connect(server);
            }
        })
        .join();
        for acceptor in acceptors {
            acceptor.join().ok();
        }

        let median = |v: &mut Vec<f64>| super::median(v);
        let (m_ours, m_ss, m_tcpstat) = (median(&mut ours), median(&mut ss), median(&mut tcpstat));
        println!();
        println!(
            "Census of one namespace holding {held} TIME_WAIT sockets, {ROUNDS} interleaved rounds (median wall time)"
        );
        println!("{:<52} {:>10} {:>12}", "method", "ms", "vs census");
        println!(
            "{:<52} {:>10.2} {:>12}",
            "handshake census (iter/tcp, aggregated in the kernel)",
            m_ours * 1e3,
            "1.00"
        );
        println!(
            "{:<52} {:>10.2} {:>11.2}x",
            "ss -tan state time-wait (netlink, whole process)",
            m_ss * 1e3,
            m_ss / m_ours
        );
        println!(
            "{:<52} {:>10.2} {:>11.2}x",
            "node_exporter tcpstat (scrape, netlink)",
            m_tcpstat * 1e3,
            m_tcpstat / m_ours
        );
        println!(
            "daemon RSS: {rss_before} KiB before the sockets existed, {rss_after} KiB with {held} TIME_WAIT sockets censused every second"
        );
    }
}

mod tls {
    //! Full TLS handshakes per second between two namespaces (openssl
    //! s_time against s_server, TLS 1.3, ECDSA P-256), with and without the
    //! daemon attached to the server side, in interleaved rounds; with
    //! `HANDSHAKE_BENCH_TLS_FLOOR=1`, also with the daemon attached to the
    //! server namespace's `lo` only, which tells what the daemon costs
    //! before its packet hooks do anything on the TLS path.
    //!
    //! Two server processes and two clients run at once, so both CPUs stay
    //! busy and the rate is the machine's capacity: whatever the daemon
    //! takes (its own CPU, the kernel programs) comes off that rate. One
    //! client alone is a serial exchange that leaves a CPU idle half the
    //! time, hides the observer's cost in that idle time, and varies more
    //! from round to round on a virtual machine.

    use std::{
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use handshake_tests::{Daemon, NetnsPair, TlsServer};

    const ROUNDS: usize = 15;
    const SECONDS: u32 = 3;
    const PORTS: [u16; 2] = [4444, 4445];

    /// Daemon flags: `HANDSHAKE_BENCH_TLS_HOOK=xdp` measures XDP ingress
    /// instead of the default (tc).
    fn hook_args() -> Vec<&'static str> {
        match std::env::var("HANDSHAKE_BENCH_TLS_HOOK").as_deref() {
            Ok("xdp") => vec!["--ingress-hook", "xdp"],
            _ => vec![],
        }
    }

    fn client(pair: &NetnsPair, port: u16) -> Child {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.client,
                "openssl",
                "s_time",
                "-new",
                "-connect",
            ])
            .arg(format!("{}:{port}", NetnsPair::SERVER_V4))
            .args(["-time", &SECONDS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run openssl s_time")
    }

    /// Handshakes per second of one client per server, all at once, and
    /// how many in all.
    fn round(pair: &NetnsPair) -> (f64, f64) {
        let started = Instant::now();
        let clients: Vec<Child> = PORTS.iter().map(|port| client(pair, *port)).collect();
        let mut count = 0.0;
        for c in clients {
            let out = c.wait_with_output().expect("wait for openssl s_time");
            let text = String::from_utf8_lossy(&out.stdout);
            count += text
                .lines()
                .find_map(|l| {
                    l.split(" connections in ")
                        .next()?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("s_time printed no count:\n{text}"));
        }
        (count / started.elapsed().as_secs_f64(), count)
    }

    /// What a round runs beside the clients.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Arm {
        None,
        Daemon,
        /// The daemon attached to the server namespace's `lo` instead of
        /// its veth: census, state tracepoint, sweeps and process, but no
        /// packet hook on the TLS path. What any daemon of this design
        /// costs before it looks at a packet.
        Floor,
    }

    impl Arm {
        const fn label(self) -> &'static str {
            match self {
                Self::None => "no observer",
                Self::Daemon => "handshake daemon",
                Self::Floor => "daemon on lo only",
            }
        }

        fn start(self, pair: &NetnsPair) -> Option<Daemon> {
            match self {
                Self::None => None,
                Self::Daemon => Some(pair.server_daemon(&hook_args())),
                Self::Floor => Some(Daemon::start(&["--netns", &pair.server, "--iface", "lo"])),
            }
        }
    }

    /// `HANDSHAKE_BENCH_TLS_FLOOR=1` adds [`Arm::Floor`] to every round.
    fn arms() -> Vec<Arm> {
        let mut arms = vec![Arm::None, Arm::Daemon];
        if std::env::var("HANDSHAKE_BENCH_TLS_FLOOR").is_ok_and(|v| v == "1") {
            arms.push(Arm::Floor);
        }
        arms
    }

    fn geometric_mean(values: &[f64]) -> f64 {
        (values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp()
    }

    pub fn run() {
        let pair = NetnsPair::new();
        let servers: Vec<TlsServer> = PORTS
            .iter()
            .map(|port| TlsServer::start(&pair.server, *port, &[]))
            .collect();
        let rounds = super::rounds(ROUNDS);
        let arms = arms();
        println!();
        println!(
            "Full TLS 1.3 handshakes between two namespaces ({} openssl s_time -new clients against as many s_server, {SECONDS} s rounds, {rounds} interleaved rounds, daemon {}{})",
            PORTS.len(),
            if hook_args().is_empty() {
                "with tc ingress"
            } else {
                "with XDP ingress"
            },
            if arms.contains(&Arm::Floor) {
                "; and a daemon on the server namespace's lo only"
            } else {
                ""
            }
        );
        let (mut none, mut ours, mut ratios, mut cpu_ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut floor_ratios, mut over_floor) = (Vec::new(), Vec::new());
        let (mut daemon_first, mut daemon_second) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let (mut rates, mut cpu) = ([0.0; 3], [0.0; 3]);
            // Rotate which goes first.
            for k in 0..arms.len() {
                let arm = arms[(k + r) % arms.len()];
                let daemon = arm.start(&pair);
                std::thread::sleep(Duration::from_millis(300));
                let busy = super::machine_busy_seconds();
                let (rate, count) = round(&pair);
                let per_handshake = (super::machine_busy_seconds() - busy) * 1e6 / count;
                if arm == Arm::Daemon
                    && let Some(daemon) = &daemon
                {
                    let seen: f64 = daemon.scrape().get(
                        "handshake_tls_handshakes_total",
                        &[("role", "server"), ("version", "1.3")],
                    );
                    assert!(seen > 0.0, "the daemon saw no TLS handshake");
                }
                drop(daemon);
                println!(
                    "  round {:>2} {:<18} {:>7.0} handshakes/s  machine CPU {:>6.1} µs per handshake",
                    r + 1,
                    arm.label(),
                    rate,
                    per_handshake
                );
                rates[arm as usize] = rate;
                cpu[arm as usize] = per_handshake;
            }
            let (without, with) = (Arm::None as usize, Arm::Daemon as usize);
            none.push(rates[without]);
            ours.push(rates[with]);
            ratios.push(rates[with] / rates[without]);
            cpu_ratios.push(cpu[without] / cpu[with]);
            if arms.len() == 2 {
                // With k = 0 first: the daemon's round came first in odd rounds.
                if r % 2 == 1 {
                    daemon_first.push(rates[with] / rates[without]);
                } else {
                    daemon_second.push(rates[with] / rates[without]);
                }
            } else {
                let floor = Arm::Floor as usize;
                floor_ratios.push(rates[floor] / rates[without]);
                over_floor.push(rates[with] / rates[floor]);
            }
        }
        // One more round, apart: the kernel's per-program statistics cost
        // two clock reads a run.
        let daemon = pair.server_daemon(&hook_args());
        std::thread::sleep(Duration::from_millis(300));
        let costs = super::ProgramCosts::start();
        let cpu_before = daemon.cpu_seconds();
        let (rate, count) = round(&pair);
        let cpu = daemon.cpu_seconds() - cpu_before;
        println!(
            "Where the daemon's cost goes (one more round, kernel statistics on, {rate:.0} handshakes/s):"
        );
        costs.report(count, "handshake", cpu, rate);
        drop(daemon);
        drop(servers);
        let (min, max) = super::spread(&ratios);
        println!(
            "no observer {:.0}/s, daemon {:.0}/s (medians); ratio median {:.3}, min {min:.3}, max {max:.3}",
            super::median(&mut none),
            super::median(&mut ours),
            super::median(&mut ratios)
        );
        super::order_report(&mut daemon_first, &mut daemon_second);
        if !floor_ratios.is_empty() {
            let (daemon, floor, over) = (
                geometric_mean(&ratios),
                geometric_mean(&floor_ratios),
                geometric_mean(&over_floor),
            );
            println!(
                "daemon on lo only: ratio median {:.3}; daemon over it: median {:.3}; geometric means: daemon {daemon:.3}, on lo only {floor:.3}, daemon over it {over:.3}",
                super::median(&mut floor_ratios),
                super::median(&mut over_floor),
            );
        }
        println!(
            "machine CPU per handshake, no observer over daemon: median {:.3}",
            super::median(&mut cpu_ratios)
        );
    }
}

/// Whether the port-exhaustion forecast comes true on the wall clock:
/// steady churn towards one destination with a narrowed
/// `ip_local_port_range`, the forecast read a few seconds in, then the
/// churn goes on until connect() finds no free port. (The test suite
/// checks what the forecast counts; only a clock can check when.)
mod forecast {
    use std::{
        net::{SocketAddr, TcpStream},
        time::{Duration, Instant},
    };

    use handshake_tests::{NetnsPair, sh, sink_server, spawn_in};

    const PORTS: u16 = 1000;
    const RATE: f64 = 100.0;

    pub fn run() {
        let pair = NetnsPair::new();
        let range = format!("40000 {}", 40000 + PORTS - 1);
        let sysctl = format!("net.ipv4.ip_local_port_range={range}");
        sh(
            "ip",
            &["netns", "exec", &pair.client, "sysctl", "-qw", &sysctl],
        );
        let daemon = pair.client_daemon(&["--census-interval", "500ms"]);
        let server: SocketAddr = format!("{}:7200", NetnsPair::SERVER_V4).parse().unwrap();
        let _server = sink_server(&pair.server, server);
        let started = Instant::now();
        let churn = spawn_in(&pair.client, move || {
            let mut n = 0u32;
            loop {
                let due = Duration::from_secs_f64(f64::from(n) / RATE);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
                match TcpStream::connect(server) {
                    Ok(stream) => drop(stream),
                    Err(error) => return (started.elapsed(), n, error.to_string()),
                }
                n += 1;
                assert!(
                    n < 10 * u32::from(PORTS),
                    "no exhaustion after {n} connections"
                );
            }
        });
        std::thread::sleep(Duration::from_secs(4));
        let asked = started.elapsed();
        let answer = daemon.cli_json("timewait", &[]);
        let forecast = answer
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["netns"] == pair.client.as_str())
            .and_then(|v| v["forecast"].as_array()?.first().cloned())
            .unwrap_or_else(|| panic!("no forecast: {answer}"));
        let (exhausted_at, made, error) = churn.join().unwrap();
        let predicted = forecast["seconds_to_exhaustion"].as_f64();
        let actual = (exhausted_at - asked).as_secs_f64();
        println!(
            "forecast: {PORTS} ports, {RATE}/s; asked at {:.2} s: {} left (growth {:.1}/s, {} held); connect() failed at {:.2} s after {made} connections ({error}): {actual:.2} s left; forecast/actual {}",
            asked.as_secs_f64(),
            predicted.map_or_else(|| "no exhaustion".to_owned(), |p| format!("{p:.2} s")),
            forecast["growth_per_second"].as_f64().unwrap_or(f64::NAN),
            forecast["time_wait"],
            exhausted_at.as_secs_f64(),
            predicted.map_or_else(|| "-".to_owned(), |p| format!("{:.3}", p / actual)),
        );
    }
}

mod namespaces {
    use std::{
        process::Command,
        time::{Duration, Instant},
    };

    use handshake_tests::{Daemon, Metrics, sh, unique_id};

    use super::median;

    /// Namespaces made for the second phase.
    const EXTRA: usize = 100;
    /// Each idle phase.
    const IDLE: Duration = Duration::from_secs(30);

    /// Named namespaces, deleted on drop.
    struct Made(Vec<String>);

    impl Drop for Made {
        fn drop(&mut self) {
            for ns in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    fn counted(m: &Metrics, result: &str) -> f64 {
        m.get("handshake_census_netns_total", &[("result", result)])
    }

    /// The daemon's CPU share over `IDLE`, and the namespaces its rounds
    /// counted afresh and skipped meanwhile.
    fn idle(daemon: &Daemon) -> (f64, f64, f64) {
        let (before, cpu) = (daemon.scrape(), daemon.cpu_seconds());
        let started = Instant::now();
        std::thread::sleep(IDLE);
        let (after, cpu_after) = (daemon.scrape(), daemon.cpu_seconds());
        (
            (cpu_after - cpu) / started.elapsed().as_secs_f64(),
            counted(&after, "counted") - counted(&before, "counted"),
            counted(&after, "skipped") - counted(&before, "skipped"),
        )
    }

    pub fn run() {
        // TIME_WAIT sockets left by other benchmarks would make the host's
        // namespace count afresh every round.
        let _ = Command::new("ss")
            .args(["-K", "state", "time-wait"])
            .output();
        let daemon = Daemon::start(&[]);
        let listed = |daemon: &Daemon| daemon.scrape().get("handshake_netns", &[]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while listed(&daemon) < 1.0 {
            assert!(Instant::now() < deadline, "the daemon counts no namespace");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (alone, alone_fresh, alone_skipped) = idle(&daemon);

        let id = unique_id();
        let made = Made((0..EXTRA).map(|i| format!("hs-b{id}-{i}")).collect());
        for ns in &made.0 {
            sh("ip", &["netns", "add", ns]);
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while listed(&daemon) < (EXTRA + 1) as f64 {
            assert!(
                Instant::now() < deadline,
                "the daemon did not find the namespaces"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Until a round has skipped them all (the first counts them).
        let skipped = counted(&daemon.scrape(), "skipped");
        while counted(&daemon.scrape(), "skipped") < skipped + EXTRA as f64 {
            assert!(
                Instant::now() < deadline + Duration::from_secs(60),
                "never skipped"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let (many, many_fresh, many_skipped) = idle(&daemon);

        // A request counts every namespace afresh: its time, and what
        // each namespace's census took (what counting every namespace
        // every round would cost a second).
        let mut requests = Vec::new();
        let mut per_round = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let states = daemon.cli_json("states", &[]);
            requests.push(started.elapsed().as_secs_f64() * 1e3);
            let views = states.as_array().expect("states");
            assert_eq!(views.len(), EXTRA + 1, "every namespace listed");
            per_round.push(
                views
                    .iter()
                    .filter_map(|v| v["census_seconds"].as_f64())
                    .sum::<f64>(),
            );
        }
        let naive = median(&mut per_round);
        let rss = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS"))
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
            })
            .unwrap_or_default();
        println!(
            "namespaces: idle daemon, host only: {:.2} % of one CPU ({alone_fresh} counted afresh, {alone_skipped} skipped in {} s)",
            alone * 100.0,
            IDLE.as_secs()
        );
        println!(
            "namespaces: idle daemon, {} namespaces: {:.2} % of one CPU ({many_fresh} counted afresh, {many_skipped} skipped); ratio to host only {:.2}",
            EXTRA + 1,
            many * 100.0,
            many / alone
        );
        println!(
            "namespaces: counting every namespace every round would take {:.1} ms a second ({:.1} % of one CPU): {:.0}x the measured idle share",
            naive * 1e3,
            naive * 100.0,
            naive / many
        );
        println!(
            "namespaces: a full census on request ({} namespaces): median {:.0} ms; daemon RSS {rss} KiB",
            EXTRA + 1,
            median(&mut requests)
        );
        drop(made);
    }
}
