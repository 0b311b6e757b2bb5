//! Takes in what the kernel reports: ring-buffer records as they arrive,
//! and the periodic sweep that decides timeouts and idle handshakes (in
//! the kernel's flow tables) and the socket layer's held handshakes.

use std::{sync::Mutex, time::Duration};

use anyhow::Context as _;
use aya::Pod;

use crate::{
    daemon::state::{SelfStats, State, lock},
    kernel::{
        clock,
        events::{CpuLog, EventReader},
        maps::{FlowTables, TlsMaps},
    },
    model::conntrack::Expiry,
};

/// How often the flow tables are swept for timeouts and idle handshakes.
const SWEEP_EVERY: Duration = Duration::from_millis(200);

/// Feeds the records of one ring buffer to the state, as they lie in the
/// ring, and keeps its count of malformed records.
pub async fn feed<T: Pod>(
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

/// Feeds the socket layer's records to the state as the CPUs wrote them,
/// every drain interval, and keeps the count of records lost.
pub async fn feed_log(mut log: CpuLog, state: &Mutex<State>) {
    loop {
        log.wait().await;
        let mut state = lock(state);
        log.drain(|record| state.record_socket(record));
        state.self_stats.sock_records_lost = log.lost;
    }
}

/// Decides timed-out and idle handshakes, and refreshes the live view and
/// the table counters; gives up stale TLS captures.
pub async fn sweep(
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
                    state.record_wire(flow);
                }
                state.live = sweep.live;
                state.table_entries = sweep.entries;
                state.flow_stats = stats;
            }
            Err(error) => {
                state.self_stats.map_read_errors += 1;
                tracing::error!(%error, "sweeping the flow tables failed");
            }
        }
        state.sweep_sockets(now);
    }
}
