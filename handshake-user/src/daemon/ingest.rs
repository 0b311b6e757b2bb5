//! Takes in what the kernel reports: ring-buffer records as they arrive,
//! and the periodic sweep that decides timeouts and idle handshakes (in
//! the kernel's flow tables) and the socket layer's held handshakes.

use std::{sync::Mutex, time::Duration};

use anyhow::Context as _;
use aya::Pod;
use handshake_common::abi::tls_capture::TlsChunk;

use crate::{
    daemon::{
        persist::{Checkpoint, Checkpointer},
        state::{State, lock},
    },
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
    counts: impl Fn(&mut State) -> (&mut u64, &mut u64),
) -> anyhow::Result<()> {
    loop {
        events
            .wait()
            .await
            .with_context(|| format!("reading the {ring} ring buffer"))?;
        let mut state = lock(state);
        events.drain(|record| apply(&mut state, record));
        let (malformed, position) = counts(&mut state);
        *malformed = events.malformed;
        *position = events.position();
    }
}

/// Takes in at once whatever waits in the rings and the socket log, as the
/// feeds would, before they start.
pub fn catch_up(
    state: &mut State,
    events: &mut EventReader,
    tls_events: &mut EventReader<TlsChunk>,
    log: &mut CpuLog,
) {
    events.drain(|flow| state.record_wire(*flow));
    state.self_stats.events_malformed = events.malformed;
    state.positions.events = events.position();
    tls_events.drain(|chunk| state.tls.record(chunk));
    state.self_stats.tls_events_malformed = tls_events.malformed;
    state.positions.tls = tls_events.position();
    log.drain(|record| state.record_socket(record));
    state.self_stats.sock_records_lost = log.lost;
    state.positions.sock_log.clear();
    state.positions.sock_log.extend_from_slice(log.positions());
}

/// Feeds the socket layer's records to the state as the CPUs wrote them,
/// every drain interval, and keeps the count of records lost.
pub async fn feed_log(mut log: CpuLog, state: &Mutex<State>) {
    loop {
        log.wait().await;
        let mut state = lock(state);
        log.drain(|record| state.record_socket(record));
        state.self_stats.sock_records_lost = log.lost;
        state.positions.sock_log.clear();
        state.positions.sock_log.extend_from_slice(log.positions());
    }
}

/// Decides timed-out and idle handshakes, and refreshes the live view and
/// the table counters; gives up stale TLS captures.
///
/// Then, with `checkpoints`, checkpoints what changed: right after the
/// sweep, which deletes the handshakes it decides from the kernel's
/// tables, so that a restart neither loses nor recounts them.
pub async fn sweep(
    mut tables: FlowTables,
    mut tls_maps: TlsMaps,
    expiry: Expiry,
    shared: &Mutex<State>,
    mut checkpoints: Option<&mut Checkpointer>,
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
        let mut state = lock(shared);
        state.tls.sweep(now);
        if let Err(error) = tls_result {
            state.self_stats.map_read_errors += 1;
            tracing::error!(%error, "maintaining the TLS capture table failed");
        }
        let mut decided_in_kernel_tables = false;
        match result {
            Ok((sweep, stats)) => {
                decided_in_kernel_tables = !sweep.decided.is_empty();
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
        // Every second; and at once after a sweep that took handshakes
        // out of the kernel's tables, which a restart could not read again.
        if let Some(checkpoints) = checkpoints.as_deref_mut()
            && (decided_in_kernel_tables || checkpoints.due(now))
        {
            let checkpoint = state.checkpoint(now);
            drop(state);
            checkpoint_now(checkpoints, checkpoint, shared, now);
        }
    }
}

/// Writes `checkpoint`, and notes in the state how it went.
pub fn checkpoint_now(
    checkpoints: &mut Checkpointer,
    checkpoint: Checkpoint,
    state: &Mutex<State>,
    now_ns: u64,
) {
    let written = checkpoints.write(checkpoint, now_ns);
    let mut state = lock(state);
    match written {
        Ok(Some(bytes)) => state.self_stats.checkpoint_bytes = bytes as u64,
        Ok(None) => {}
        Err(error) => {
            state.self_stats.checkpoint_errors += 1;
            if state.self_stats.checkpoint_errors == 1 {
                tracing::error!(%error, "writing the checkpoint failed: a restart would lose what changed since the last one");
            }
        }
    }
}
