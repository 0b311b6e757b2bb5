//! `handshake daemon`: wiring and lifetime. Binds the metrics address and
//! the API socket first (a clash fails before the kernel is touched), loads
//! and attaches the programs, then runs its loops — ring-buffer events
//! (`ingest`), the sweep of the flow tables, the census (`census`), and
//! the two servers (`api`, `http` with `metrics`) — until SIGINT or
//! SIGTERM, and detaches everything. The loops share one [`State`].

pub mod api;
pub mod census;
pub mod config;
pub mod http;
pub mod ingest;
pub mod interfaces;
pub mod metrics;
pub mod persist;
pub mod state;
pub mod status;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use handshake_common::abi::tls_capture::TlsChunk;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    daemon::{
        census::{CensusRunner, census_loop},
        config::{CensusSource, DaemonConfig},
        persist::{Checkpoint, Checkpointer, Kept, Persist, PersistError},
        state::State,
    },
    kernel::{
        census::{CensusError, Method},
        events::{CpuLog, EventReader},
        loader::Observer,
        maps::{Counters, FlowTables, TlsMaps},
        netns::{self, Netns},
    },
    model::conntrack::Expiry,
};

/// A completed handshake with no data for this long counts as established.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// The census, shared by its schedule and the API's on-demand rounds.
pub type SharedCensus = Arc<Mutex<CensusRunner>>;

pub fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config)?;
    let (persist, mut kept) = keep_state(&config)?;
    let mut observer = Observer::load_with(
        config.tables,
        Some(config.hooks.ingress),
        persist.as_ref().map(|p| p.pins.as_path()),
    )
    .context("loading the kernel programs")?;
    let checkpoint = persist.as_ref().and_then(Persist::load);
    let feeds = Feeds::take(&mut observer, checkpoint.as_ref())?;
    if let Some(checkpoint) = &checkpoint {
        kept.detail = format!(
            "{}; taken up from the daemon before (pid {}), {} socket-log records read again",
            kept.detail, checkpoint.pid, feeds.log_behind
        );
    }
    let census = start_census(&mut observer, &config)?;
    let observer = Arc::new(Mutex::new(attach(observer, &config)?));
    let served = serve(
        &config,
        listeners,
        feeds,
        census,
        &observer,
        (persist, kept, checkpoint),
    );
    detach(observer, &config)?;
    tracing::info!("detached; exiting");
    served
}

/// The instance's kept state, locked; `None` with `--ephemeral`, or when
/// bpffs cannot be used (said, and the daemon goes on keeping nothing).
/// Another daemon of the same instance is an error.
fn keep_state(config: &DaemonConfig) -> anyhow::Result<(Option<Persist>, Kept)> {
    let Some((instance, fresh)) = &config.instance else {
        return Ok((
            None,
            Kept {
                instance: None,
                detail: "nothing (--ephemeral)".to_owned(),
            },
        ));
    };
    match Persist::open(instance, *fresh) {
        Ok(persist) => {
            let detail = format!(
                "maps pinned in {}, checkpoint {}",
                persist.pins.display(),
                persist.checkpoint.display()
            );
            Ok((
                Some(persist),
                Kept {
                    instance: Some(instance.clone()),
                    detail,
                },
            ))
        }
        Err(error @ (PersistError::InUse { .. } | PersistError::BadName(_))) => Err(error.into()),
        Err(error) => {
            tracing::warn!(
                %error,
                "nothing is kept across restarts: every counter starts from 0 at the next start"
            );
            Ok((
                None,
                Kept {
                    instance: None,
                    detail: format!("nothing: {error}"),
                },
            ))
        }
    }
}

/// The namespace the packet hooks' object is dropped in (the first named,
/// or the host's), and the others hooks were attached in.
fn primary(config: &DaemonConfig) -> &Netns {
    &config.hooks.namespaces[0]
}

/// Detaches every hook in its namespace, then the rest with the object.
fn detach(observer: Arc<Mutex<Observer>>, config: &DaemonConfig) -> anyhow::Result<()> {
    let observer = match Arc::try_unwrap(observer) {
        Ok(mutex) => mutex.into_inner().unwrap_or_else(|p| p.into_inner()),
        // A task still holds it (it cannot: the loops have ended); its
        // links go when the process exits.
        Err(_) => return Ok(()),
    };
    let mut others: Vec<Netns> = config.hooks.namespaces[1..]
        .iter()
        .filter_map(|n| n.try_clone().ok())
        .collect();
    if config.hooks.all {
        others.extend(
            netns::discover()
                .iter()
                .filter_map(|f| match f.name.as_str() {
                    "host" => None,
                    _ => Netns::open_found(f).ok(),
                }),
        );
    }
    observer
        .detach(primary(config), &others)
        .context("detaching the kernel programs")
}

/// The metrics address and the API socket, bound before anything touches
/// the kernel.
struct Listeners {
    metrics: std::net::TcpListener,
    api: std::os::unix::net::UnixListener,
    /// Removes the socket file when the daemon stops.
    _api_file: api::SocketFile,
}

impl Listeners {
    fn bind(config: &DaemonConfig) -> anyhow::Result<Self> {
        let metrics = std::net::TcpListener::bind(config.metrics_addr)
            .with_context(|| format!("cannot listen on --metrics-addr {}", config.metrics_addr))?;
        metrics.set_nonblocking(true)?;
        let api = api::bind(&config.api_socket, config.api_group)?;
        Ok(Self {
            metrics,
            api,
            _api_file: api::SocketFile(config.api_socket.clone()),
        })
    }
}

/// The maps the loops read, taken out of the loaded object.
struct Feeds {
    counters: Arc<Counters>,
    tables: FlowTables,
    events: RingBuf<MapData>,
    sock_log: CpuLog,
    tls_events: RingBuf<MapData>,
    tls_maps: TlsMaps,
    /// Socket-log records to read again or catch up after a restart.
    log_behind: u64,
}

impl Feeds {
    /// With a `checkpoint`, the rings and the log are read from where it
    /// was taken.
    fn take(observer: &mut Observer, checkpoint: Option<&Checkpoint>) -> anyhow::Result<Self> {
        let positions = checkpoint.map(|c| &c.positions);
        let (tls_events, tls_maps) = observer.take_tls(positions.map(|p| p.tls))?;
        let mut sock_log = observer.take_sock_log()?;
        let log_behind = checkpoint.map_or(0, |c| {
            sock_log.resume(&c.positions.sock_log, c.self_stats.sock_records_lost)
        });
        Ok(Self {
            counters: Arc::new(observer.take_counters()?),
            tables: observer.take_flow_tables()?,
            events: observer.take_events(positions.map(|p| p.events))?,
            sock_log,
            tls_events,
            tls_maps,
            log_behind,
        })
    }
}

/// The census, or `None` when it cannot run: the daemon goes on without
/// it and says so (`handshake_probe_attached`), unless `--census-source
/// iter` insists on the program.
fn start_census(
    observer: &mut Observer,
    config: &DaemonConfig,
) -> anyhow::Result<Option<SharedCensus>> {
    let census = observer.take_census().and_then(|mut census| {
        match config.census_source.required() {
            Some(Method::Netlink) => census.use_netlink(),
            Some(Method::Iter) if census.method() != Method::Iter => {
                return Err(CensusError::IterUnavailable);
            }
            _ => {}
        }
        CensusRunner::new(census, primary(config))
    });
    observer.record_census(census.as_ref().map(CensusRunner::method));
    let runner = match census {
        Ok(runner) => runner,
        Err(error) if config.census_source == CensusSource::Iter => return Err(error.into()),
        Err(_) => return Ok(None),
    };
    Ok(Some(Arc::new(Mutex::new(runner))))
}

/// Attaches the tracepoints and the packet hooks; fails, detaching what
/// it can, only when nothing at all could be attached.
fn attach(mut observer: Observer, config: &DaemonConfig) -> anyhow::Result<Observer> {
    say_where_packets_are_seen(config);
    observer.attach_tracepoints();
    for (at, netns) in config.hooks.namespaces.iter().enumerate() {
        let names: Vec<String> = config
            .interfaces
            .iter()
            .filter(|(i, _)| *i == at)
            .map(|(_, name)| name.clone())
            .collect();
        observer.attach_interfaces(netns, &names, config.hooks.ingress, config.hooks.xdp_mode)?;
    }
    observer.release_unclaimed_links();
    if observer.attachments().iter().any(|a| a.attached) {
        return Ok(observer);
    }
    let reasons: Vec<_> = observer
        .attachments()
        .iter()
        .map(|a| format!("{}: {}", a.probe, a.detail))
        .collect();
    observer.detach(primary(config), &config.hooks.namespaces[1..])?;
    bail!("no probe could be attached ({})", reasons.join("; "));
}

/// The start-up log's word on the packet hooks: where they go, and why not
/// on loopback unless asked.
fn say_where_packets_are_seen(config: &DaemonConfig) {
    if !config.loopback_skipped.is_empty() {
        tracing::info!(
            skipped = ?config.loopback_skipped,
            "no packet hooks on loopback by default: handshakes between local sockets are \
             timed at both ends by the socket layer; TLS hellos on loopback are not captured \
             (--iface lo attaches there)"
        );
    }
    if config.interfaces.is_empty() && !config.hooks.all {
        tracing::info!(
            "no packet hooks yet: TCP handshakes of every namespace come from the socket layer; \
             TLS hellos and wire timing need an interface (--iface NAME); interfaces that \
             appear and match are attached as they come up"
        );
    }
}

/// Runs every loop until a signal, or until one of them fails.
fn serve(
    config: &DaemonConfig,
    listeners: Listeners,
    feeds: Feeds,
    census: Option<SharedCensus>,
    observer: &Arc<Mutex<Observer>>,
    (persist, kept, checkpoint): (Option<Persist>, Kept, Option<Checkpoint>),
) -> anyhow::Result<()> {
    let mut initial = State::new(config.conn_history);
    if let Some(checkpoint) = checkpoint {
        initial.restore(checkpoint);
    }
    initial.kept = kept;
    let mut checkpoints = persist.map(Checkpointer::new);
    if let Some(root) = &config.cgroup_root {
        initial.cgroups = crate::kernel::cgroup::Cgroups::at(root.clone());
    }
    if initial.cgroups.root().is_none() {
        tracing::warn!(
            "no cgroup v2 hierarchy is mounted (cgroup v1 only?): sockets are not attributed \
             to containers, pods or units (--cgroup-root names one mounted elsewhere)"
        );
    }
    initial.hook_netns = primary(config)
        .inode()
        .ok()
        .and_then(|inode| u32::try_from(inode).ok())
        .unwrap_or(0);
    let state = Arc::new(Mutex::new(initial));
    let started_unix_s = status::unix_now_s();
    let render = metrics::renderer(
        Arc::clone(&state),
        Arc::clone(&feeds.counters),
        observer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attachments_handle(),
        config,
        started_unix_s,
    );
    let status = status::status(
        config,
        Arc::clone(&state),
        observer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attachments_handle(),
        started_unix_s,
    );
    let expiry = Expiry {
        handshake_timeout_ns: config.handshake_timeout.as_nanos() as u64,
        idle_ns: IDLE_AFTER.as_nanos() as u64,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let metrics_listener = tokio::net::TcpListener::from_std(listeners.metrics)?;
        let api_listener = tokio::net::UnixListener::from_std(listeners.api)?;
        let mut events =
            EventReader::new(feeds.events).context("polling the event ring buffer")?;
        let mut tls_events = EventReader::<TlsChunk>::new(feeds.tls_events)
            .context("polling the TLS ring buffer")?;
        let mut sock_log = feeds.sock_log;
        {
            let mut state = state::lock(&state);
            events.malformed = state.self_stats.events_malformed;
            tls_events.malformed = state.self_stats.tls_events_malformed;
            // What waits in the rings and the log — read again after a
            // restart, or written while no daemon ran — is taken in before
            // any held socket row may come due: a row due at once must
            // find its hooks' twin among them, not count alone.
            ingest::catch_up(&mut state, &mut events, &mut tls_events, &mut sock_log);
        }
        tracing::info!(
            metrics = %config.metrics_addr,
            api = %config.api_socket.display(),
            netns = ?config.hooks.namespaces.iter().map(Netns::name).collect::<Vec<_>>(),
            all_netns = config.hooks.all,
            interfaces = ?config.interfaces.iter().map(|(_, n)| n).collect::<Vec<_>>(),
            "serving"
        );
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        tokio::select! {
            () = http::serve(metrics_listener, Arc::clone(&render)) => {}
            () = api::serve(api_listener, Arc::clone(&state), census.clone(), render, status) => {}
            result = ingest::feed(events, &state, "event") => result?,
            () = ingest::feed_log(sock_log, &state) => {}
            result = ingest::sweep(
                feeds.tables,
                feeds.tls_maps,
                expiry,
                &state,
                checkpoints.as_mut(),
            ) => result?,
            result = ingest::feed(tls_events, &state, "TLS") => result?,
            () = census_loop(census, &feeds.counters, config.census_interval, &state) => {}
            () = interfaces::follow(Arc::clone(observer), hook_plan(config), Arc::clone(&state)) => {}
            _ = sigterm.recv() => tracing::info!("SIGTERM: detaching"),
            _ = sigint.recv() => tracing::info!("SIGINT: detaching"),
        }
        // The last word, for the next daemon of this instance: what this
        // one read after its last sweep.
        if let Some(checkpoints) = checkpoints.as_mut() {
            let now = crate::kernel::clock::monotonic_ns();
            let checkpoint = state::lock(&state).checkpoint(now);
            ingest::checkpoint_now(checkpoints, checkpoint, &state, now);
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// A copy of the configured plan for the interface follower.
fn hook_plan(config: &DaemonConfig) -> interfaces::HookPlan {
    let plan = &config.hooks;
    interfaces::HookPlan {
        namespaces: plan
            .namespaces
            .iter()
            .filter_map(|n| n.try_clone().ok())
            .collect(),
        all: plan.all,
        patterns: plan.patterns.clone(),
        ingress: plan.ingress,
        xdp_mode: plan.xdp_mode,
    }
}
