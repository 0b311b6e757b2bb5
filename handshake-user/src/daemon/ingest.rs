//! Takes in what the kernel reports: ring-buffer records as they arrive,
//! and the periodic sweep that decides timeouts and idle handshakes (in
//! the kernel's flow tables) and the socket layer's held handshakes.

use std::{sync::Mutex, time::Duration};

use anyhow::Context as _;
use aya::Pod;
use handshake_common::{abi::tls_capture::TlsChunk, flow::Flow};

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

/// A source of records the state takes in: the records, its count of
/// those lost or malformed, and how far it has read (for a checkpoint).
pub trait TakeIn {
    fn take_in(&mut self, state: &mut State);
}

/// Handshakes the packet hooks decided.
impl TakeIn for EventReader<Flow> {
    fn take_in(&mut self, state: &mut State) {
        self.drain(|flow| state.record_wire(*flow));
        state.self_stats.events_malformed = self.malformed;
        state.positions.events = self.position();
    }
}

/// TLS hello bytes.
impl TakeIn for EventReader<TlsChunk> {
    fn take_in(&mut self, state: &mut State) {
        self.drain(|chunk| state.tls.record(chunk));
        state.self_stats.tls_events_malformed = self.malformed;
        state.positions.tls = self.position();
    }
}

/// The socket layer's records, as the CPUs wrote them.
impl TakeIn for CpuLog {
    fn take_in(&mut self, state: &mut State) {
        self.drain(|record| state.record_socket(record));
        state.self_stats.sock_records_lost = self.lost;
        state.positions.sock_log.clear();
        state.positions.sock_log.extend_from_slice(self.positions());
    }
}

/// Feeds the records of one ring buffer to the state, as they lie in the
/// ring, as they arrive.
pub async fn feed<T: Pod>(
    mut events: EventReader<T>,
    state: &Mutex<State>,
    ring: &'static str,
) -> anyhow::Result<()>
where
    EventReader<T>: TakeIn,
{
    loop {
        events
            .wait()
            .await
            .with_context(|| format!("reading the {ring} ring buffer"))?;
        events.take_in(&mut lock(state));
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
    events.take_in(state);
    tls_events.take_in(state);
    log.take_in(state);
}

/// Feeds the socket layer's records to the state every drain interval.
pub async fn feed_log(mut log: CpuLog, state: &Mutex<State>) {
    loop {
        log.wait().await;
        log.take_in(&mut lock(state));
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
