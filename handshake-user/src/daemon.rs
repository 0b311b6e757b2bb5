//! `handshake daemon`: wiring and lifetime. Binds the metrics address and
//! the API socket first (a clash fails before the kernel is touched), loads
//! and attaches the programs, then runs three loops — ring-buffer events,
//! the sweep of the flow tables, and the two servers — until SIGINT or
//! SIGTERM, and detaches everything.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use handshake_common::flow::Flow;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api, clock,
    config::DaemonConfig,
    conntrack::{Conntrack, Expiry},
    events::EventReader,
    http,
    loader::Observer,
    maps::{FlowStats, FlowTables},
    metrics::{self, Report, SelfStats},
};

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

    let mut observer = Observer::load_with(config.tables).context("loading the kernel programs")?;
    let counters = observer.take_counters()?;
    let tables = observer.take_flow_tables()?;
    let events = observer.take_events()?;
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
    }));
    let attachments = observer.attachments().to_vec();
    let half_open_top = config.half_open_top;
    let render: http::Render = {
        let state = Arc::clone(&state);
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
            () = api::serve(api_listener, Arc::clone(&state)) => {}
            result = read_events(events, &state) => result?,
            result = sweep(tables, expiry, &state) => result?,
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

/// Feeds decided handshakes from the ring buffer to conntrack.
async fn read_events(mut events: EventReader, state: &Mutex<State>) -> anyhow::Result<()> {
    let mut batch = Vec::new();
    loop {
        events
            .next_batch(&mut batch)
            .await
            .context("reading the event ring buffer")?;
        if batch.is_empty() {
            continue;
        }
        let mut state = lock(state);
        for flow in batch.drain(..) {
            state.conntrack.record(flow);
        }
        state.self_stats.events_malformed = events.malformed;
    }
}

/// Decides timed-out and idle handshakes, and refreshes the live view and
/// the table counters.
async fn sweep(mut tables: FlowTables, expiry: Expiry, state: &Mutex<State>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock::monotonic_ns();
        let result = tables
            .sweep(|flow| expiry.expire(flow, now))
            .and_then(|sweep| Ok((sweep, tables.stats()?)));
        let mut state = lock(state);
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
