//! `handshake daemon`: wiring and lifetime. Binds the metrics address and
//! the API socket first (a clash fails before the kernel is touched), loads
//! and attaches the programs, then runs three loops — ring-buffer events,
//! the sweep of the flow tables, and the two servers — until SIGINT or
//! SIGTERM, and detaches everything.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use handshake_common::flow::Flow;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api,
    census::{Census, CensusError, Snapshot, Source},
    cli::CensusSourceFlag,
    clock,
    config::DaemonConfig,
    conntrack::{Conntrack, Expiry},
    events::{EventReader, Record},
    http,
    loader::Observer,
    maps::{Counters, FlowStats, FlowTables, TlsMaps},
    metrics::{self, Report, SelfStats},
    netns::Netns,
    states::{NetnsView, state_name},
    tlsconn::TlsTracker,
};
use handshake_common::abi::tls_capture::TlsChunk;

/// How often the flow tables are swept for timeouts and idle handshakes.
const SWEEP_EVERY: Duration = Duration::from_millis(200);

/// A completed handshake with no data for this long counts as established.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// What the loops share: decided handshakes, the last sweep's view of the
/// tables, and the daemon's own counters.
#[derive(Debug)]
pub struct State {
    pub conntrack: Conntrack,
    /// Handshakes in the kernel tables at the last sweep.
    pub live: Vec<Flow>,
    pub flow_stats: FlowStats,
    pub self_stats: SelfStats,
    /// The last census of each watched namespace (host first).
    pub census: Vec<NetnsView>,
    /// TLS handshakes from the hooks' hello records.
    pub tls: TlsTracker,
    /// Host-wide state transitions per second, `from->to`, between the
    /// last two censuses.
    pub transitions_per_second: BTreeMap<String, f64>,
}

impl State {
    /// Takes in one census round.
    pub fn apply_census(&mut self, round: CensusRound) {
        let now = clock::monotonic_ns();
        for (name, result) in round {
            match result {
                Ok((snapshot, entries)) => match self.census.iter_mut().find(|v| v.name == name) {
                    Some(view) => view.update(snapshot, entries, now),
                    None => self
                        .census
                        .push(NetnsView::new(&name, snapshot, entries, now)),
                },
                Err(error) => {
                    self.self_stats.census_errors += 1;
                    tracing::error!(netns = %name, error = %format!("{:#}", anyhow::Error::new(error)), "census failed");
                }
            }
        }
    }
}

/// The census and the namespaces it watches: the host's, and the one of
/// `--netns`. `&mut` serialises runs (they share the program's maps).
#[derive(Debug)]
pub struct CensusRunner {
    census: Census,
    watched: Vec<(Netns, u64)>,
}

/// One census of every watched namespace: per namespace, its snapshot and
/// TIME_WAIT entries so far.
pub type CensusRound = Vec<(String, Result<(Snapshot, u64), CensusError>)>;

impl CensusRunner {
    /// How the census counts: `iter/tcp`, or sock_diag netlink.
    pub const fn source(&self) -> Source {
        self.census.source()
    }

    pub fn new(census: Census, netns: &Netns) -> anyhow::Result<Self> {
        let mut watched = vec![(Netns::host(), Netns::host().inode()?)];
        if netns.name() != "host" {
            watched.push((netns.try_clone()?, netns.inode()?));
        }
        Ok(Self { census, watched })
    }

    /// The inode numbers of the watched namespaces.
    pub fn inodes(&self) -> Vec<u64> {
        self.watched.iter().map(|(_, inode)| *inode).collect()
    }

    /// Counts every watched namespace, listing the full sockets in the
    /// states of `socket_states` (bit `1 << state`), at most `max_sockets`
    /// per namespace.
    pub fn run(&mut self, socket_states: u32, max_sockets: u32) -> CensusRound {
        let Self { census, watched } = self;
        watched
            .iter()
            .map(|(netns, inode)| {
                let result = census
                    .run(netns, socket_states, max_sockets)
                    .map(|snapshot| (snapshot, census.time_wait_entries(*inode)));
                (netns.name().to_owned(), result)
            })
            .collect()
    }
}

/// The states whose sockets the regular census lists, to find the
/// oldest: an application that never closes (CLOSE_WAIT), a peer that never
/// closes (FIN_WAIT2), a peer that never answers (SYN_SENT).
pub const STUCK_STATES: [u32; 3] = [
    handshake_common::abi::tcp_state::CLOSE_WAIT,
    handshake_common::abi::tcp_state::FIN_WAIT2,
    handshake_common::abi::tcp_state::SYN_SENT,
];

/// Socket records the regular census lists per namespace.
pub const STUCK_RECORDS: u32 = 1024;

/// Bit mask of [`STUCK_STATES`].
pub fn stuck_mask() -> u32 {
    STUCK_STATES.iter().fold(0, |mask, s| mask | 1 << s)
}

/// Runs a census round off the async threads; lists sockets in
/// `socket_states` (bit `1 << state`).
pub async fn census_round(
    runner: &Arc<Mutex<CensusRunner>>,
    socket_states: u32,
    max_sockets: u32,
) -> CensusRound {
    let runner = Arc::clone(runner);
    tokio::task::spawn_blocking(move || {
        runner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .run(socket_states, max_sockets)
    })
    .await
    .unwrap_or_default()
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let metrics_listener = std::net::TcpListener::bind(config.metrics_addr)
        .with_context(|| format!("cannot listen on --metrics-addr {}", config.metrics_addr))?;
    metrics_listener.set_nonblocking(true)?;
    let api_listener = api::bind(&config.api_socket)?;
    let _socket_file = api::SocketFile(config.api_socket.clone());

    let mut observer = Observer::load_with(config.tables, Some(config.ingress_hook))
        .context("loading the kernel programs")?;
    let counters = Arc::new(observer.take_counters()?);
    let tables = observer.take_flow_tables()?;
    let events = observer.take_events()?;
    let (tls_events, tls_maps) = observer.take_tls()?;
    let census = observer
        .take_census()
        .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
        .and_then(|mut census| {
            match config.census_source {
                CensusSourceFlag::Netlink => census.use_netlink(),
                CensusSourceFlag::Iter if census.source() != Source::Iter => {
                    return Err("--census-source iter: the iter/tcp program could not be loaded (see the warning above)".to_owned());
                }
                _ => {}
            }
            CensusRunner::new(census, &config.netns).map_err(|e| format!("{e:#}"))
        });
    observer.record_census(
        census
            .as_ref()
            .map(CensusRunner::source)
            .map_err(Clone::clone),
    );
    if config.census_source == CensusSourceFlag::Iter
        && let Err(reason) = &census
    {
        bail!("{reason}");
    }
    if let Ok(runner) = &census {
        observer
            .age_sockets_in(&runner.inodes())
            .context("naming the namespaces whose sockets get ages")?;
    }
    let census = census.ok().map(|runner| Arc::new(Mutex::new(runner)));
    observer.attach_tracepoints();
    observer.attach_interfaces(
        &config.netns,
        &config.interfaces,
        config.ingress_hook,
        config.xdp_mode,
    )?;
    if observer.attachments().iter().all(|a| !a.attached) {
        let reasons: Vec<_> = observer
            .attachments()
            .iter()
            .map(|a| format!("{}: {}", a.probe, a.detail))
            .collect();
        observer.detach(&config.netns)?;
        bail!("no probe could be attached ({})", reasons.join("; "));
    }

    let state = Arc::new(Mutex::new(State {
        conntrack: Conntrack::new(config.conn_history),
        live: Vec::new(),
        flow_stats: FlowStats::default(),
        self_stats: SelfStats::default(),
        census: Vec::new(),
        tls: TlsTracker::new(config.conn_history),
        transitions_per_second: BTreeMap::new(),
    }));
    let attachments = observer.attachments().to_vec();
    let half_open_top = config.half_open_top;
    let render: http::Render = {
        let state = Arc::clone(&state);
        let counters = Arc::clone(&counters);
        Arc::new(move || {
            let snapshot = counters.snapshot();
            let mut state = lock(&state);
            match snapshot {
                Ok(snapshot) => Ok(metrics::render(&Report {
                    snapshot: &snapshot,
                    attachments: &attachments,
                    totals: state.conntrack.totals(),
                    live: &state.live,
                    flow_stats: state.flow_stats,
                    self_stats: state.self_stats,
                    half_open_top,
                    census: &state.census,
                    tls: &state.tls.totals,
                })),
                Err(error) => {
                    state.self_stats.map_read_errors += 1;
                    tracing::error!(%error, "reading the counter maps failed");
                    Err(format!("reading the counter maps failed: {error}"))
                }
            }
        })
    };
    let expiry = Expiry {
        handshake_timeout_ns: config.handshake_timeout.as_nanos() as u64,
        idle_ns: IDLE_AFTER.as_nanos() as u64,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let metrics_listener = tokio::net::TcpListener::from_std(metrics_listener)?;
        let api_listener = tokio::net::UnixListener::from_std(api_listener)?;
        let events = EventReader::new(events).context("polling the event ring buffer")?;
        let tls_events =
            EventReader::<TlsChunk>::new(tls_events).context("polling the TLS ring buffer")?;
        tracing::info!(
            metrics = %config.metrics_addr,
            api = %config.api_socket.display(),
            netns = config.netns.name(),
            interfaces = ?config.interfaces,
            "serving"
        );
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        tokio::select! {
            () = http::serve(metrics_listener, render) => {}
            () = api::serve(api_listener, Arc::clone(&state), census.clone()) => {}
            result = feed(
                events,
                &state,
                "event",
                |state, flow| state.conntrack.record(*flow),
                |stats| &mut stats.events_malformed,
            ) => result?,
            result = sweep(tables, tls_maps, expiry, &state) => result?,
            result = feed(
                tls_events,
                &state,
                "TLS",
                |state, chunk| state.tls.record(chunk),
                |stats| &mut stats.tls_events_malformed,
            ) => result?,
            () = census_loop(census.clone(), &counters, config.census_interval, &state) => {}
            _ = sigterm.recv() => tracing::info!("SIGTERM: detaching"),
            _ = sigint.recv() => tracing::info!("SIGINT: detaching"),
        }
        Ok::<_, anyhow::Error>(())
    });
    drop(runtime);
    observer
        .detach(&config.netns)
        .context("detaching the kernel programs")?;
    tracing::info!("detached; exiting");
    served
}

/// The share of one CPU the scheduled censuses may take. A census walks
/// the whole established hash table (262,144 buckets on a 24 GiB machine,
/// ~1 ms even when empty) and every socket in it; with hundreds of thousands
/// of sockets one census takes tens of milliseconds, and a census a second
/// would take a few percent of a CPU from the very traffic it counts.
const CENSUS_CPU_BUDGET: f64 = 0.01;

/// When the next scheduled census starts, after one that started at
/// `started` and took `took`: `every` later, or later still if the census
/// took more than [`CENSUS_CPU_BUDGET`] of that.
fn next_census(started: Instant, took: Duration, every: Duration) -> Instant {
    started + every.max(took.div_f64(CENSUS_CPU_BUDGET))
}

/// Runs the census of every watched namespace every `every` (stretched
/// while censuses are slow: [`next_census`]), and derives the host-wide
/// transition rates from the counters meanwhile.
async fn census_loop(
    runner: Option<Arc<Mutex<CensusRunner>>>,
    counters: &Counters,
    every: Duration,
    state: &Mutex<State>,
) {
    // (when, transition counts `(from, to, count)`) at the last round.
    type Counts = Vec<(u32, u32, u64)>;
    let mut last: Option<(u64, Counts)> = None;
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next.into()).await;
        let started = Instant::now();
        let round = match &runner {
            Some(runner) => census_round(runner, stuck_mask(), STUCK_RECORDS).await,
            None => Vec::new(),
        };
        next = next_census(started, started.elapsed(), every);
        let now = clock::monotonic_ns();
        let transitions = counters.snapshot().map(|s| s.transitions).ok();
        let mut state = lock(state);
        state.self_stats.census_interval_s = (next - started).as_secs_f64();
        state.apply_census(round);
        if let (Some((then, before)), Some(after)) = (&last, &transitions) {
            let seconds = (now - then) as f64 / 1e9;
            state.transitions_per_second = after
                .iter()
                .map(|&(from, to, count)| {
                    let prior = before
                        .iter()
                        .find(|&&(f, t, _)| f == from && t == to)
                        .map_or(0, |&(_, _, c)| c);
                    (
                        format!("{}->{}", state_name(from), state_name(to)),
                        count.saturating_sub(prior) as f64 / seconds,
                    )
                })
                .collect();
        }
        if let Some(after) = transitions {
            last = Some((now, after));
        }
    }
}

/// Feeds the records of one ring buffer to the state, as they lie in the
/// ring, and keeps its count of malformed records.
async fn feed<T: Record>(
    mut events: EventReader<T>,
    state: &Mutex<State>,
    ring: &'static str,
    apply: impl Fn(&mut State, &T),
    malformed: impl Fn(&mut SelfStats) -> &mut u64,
) -> anyhow::Result<()> {
    loop {
        events
            .wait()
            .await
            .with_context(|| format!("reading the {ring} ring buffer"))?;
        let mut state = lock(state);
        events.drain(|record| apply(&mut state, record));
        *malformed(&mut state.self_stats) = events.malformed;
    }
}

/// Decides timed-out and idle handshakes, and refreshes the live view and
/// the table counters; gives up stale TLS captures.
async fn sweep(
    mut tables: FlowTables,
    mut tls_maps: TlsMaps,
    expiry: Expiry,
    state: &Mutex<State>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock::monotonic_ns();
        let result = tables
            .sweep(|flow| expiry.expire(flow, now))
            .and_then(|sweep| Ok((sweep, tables.stats()?)));
        let tls_result = tls_maps.maintain(now);
        let mut state = lock(state);
        state.tls.sweep(now);
        if let Err(error) = tls_result {
            state.self_stats.map_read_errors += 1;
            tracing::error!(%error, "maintaining the TLS capture table failed");
        }
        match result {
            Ok((sweep, stats)) => {
                for flow in sweep.decided {
                    state.conntrack.record(flow);
                }
                state.live = sweep.live;
                state.flow_stats = stats;
            }
            Err(error) => {
                state.self_stats.map_read_errors += 1;
                tracing::error!(%error, "sweeping the flow tables failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_census_stretches_the_schedule_to_its_budget() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        // An idle host: 2 ms a census, well inside 1 % of a second.
        assert_eq!(
            next_census(start, Duration::from_millis(2), second),
            start + second
        );
        // 300,000 sockets: 50 ms a census, then the next one 5 s later.
        assert_eq!(
            next_census(start, Duration::from_millis(50), second),
            start + Duration::from_secs(5)
        );
    }
}
