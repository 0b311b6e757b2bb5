//! The counter maps, the flow tables and the TLS capture's table, turned
//! into plain values: [`KernelCounts`] summed over CPUs, the flows a
//! [`Sweep`] found. (The census's maps are the census's.)

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use handshake_common::{
    abi::{
        self, Direction, FlowStat, PacketKind, ParseError, STATE_SLOTS,
        drops::DropKey,
        map as names,
        tls_capture::{TlsKey, TlsPending},
    },
    flow::{Flow, FlowKey},
};

use crate::kernel::error::LoadError;

/// The packet, parse-error and state-transition counters, read from the
/// kernel at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// `packets[direction][kind]`.
    pub packets: [[u64; PacketKind::COUNT as usize]; 2],
    /// Indexed by [`ParseError`] code.
    pub parse_errors: [u64; ParseError::COUNT as usize],
    /// Non-zero (from, to, count) state transitions.
    pub transitions: Vec<(u32, u32, u64)>,
    /// Dropped handshake packets (`skb:kfree_skb`), by key.
    pub drops: Vec<(DropKey, u64)>,
}

impl KernelCounts {
    pub fn packets(&self, direction: Direction, kind: PacketKind) -> u64 {
        self.packets[direction as usize][kind as usize]
    }

    pub fn parse_error(&self, error: ParseError) -> u64 {
        self.parse_errors[error as usize]
    }

    pub fn transition(&self, from: u32, to: u32) -> u64 {
        self.transitions
            .iter()
            .find(|(f, t, _)| (*f, *t) == (from, to))
            .map_or(0, |(_, _, n)| *n)
    }
}

/// The per-CPU counter maps.
pub struct Counters {
    packets: PerCpuArray<MapData, u64>,
    parse_errors: PerCpuArray<MapData, u64>,
    transitions: PerCpuArray<MapData, u64>,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    /// This kernel's drop reasons by number, from its BTF.
    pub reasons: BTreeMap<u32, String>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<PerCpuArray<MapData, u64>, LoadError> {
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    PerCpuArray::try_from(map).map_err(|source| LoadError::Map { name, source })
}

fn sum(map: &PerCpuArray<MapData, u64>, index: u32) -> Result<u64, MapError> {
    Ok(map.get(&index, 0)?.iter().sum())
}

impl Counters {
    /// `reasons`: this kernel's drop reasons, as the loader read them.
    pub(crate) fn take_from(
        ebpf: &mut Ebpf,
        reasons: BTreeMap<u32, String>,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            packets: take(ebpf, names::PACKET_COUNTS)?,
            parse_errors: take(ebpf, names::PARSE_ERRORS)?,
            transitions: take(ebpf, names::TRANSITIONS)?,
            drops: {
                let name = names::HANDSHAKE_DROPS;
                let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
                PerCpuHashMap::try_from(map).map_err(|source| LoadError::Map { name, source })?
            },
            reasons,
        })
    }

    /// The kernel's name of drop reason `reason`, or its number.
    pub fn reason_name(&self, reason: u32) -> String {
        self.reasons
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| format!("reason_{reason}"))
    }

    pub fn read(&self) -> Result<KernelCounts, MapError> {
        let mut snapshot = KernelCounts::default();
        for direction in Direction::ALL {
            for kind in PacketKind::ALL {
                let index = abi::packet_count_index(direction, kind);
                snapshot.packets[direction as usize][kind as usize] = sum(&self.packets, index)?;
            }
        }
        for error in ParseError::ALL {
            snapshot.parse_errors[error as usize] = sum(&self.parse_errors, error as u32)?;
        }
        for (index, values) in self.transitions.iter().enumerate() {
            let count: u64 = values?.iter().sum();
            if count > 0 {
                let index = index as u32;
                snapshot
                    .transitions
                    .push((index / STATE_SLOTS, index % STATE_SLOTS, count));
            }
        }
        for entry in self.drops.iter() {
            let (key, per_cpu) = entry?;
            snapshot.drops.push((key, per_cpu.iter().sum()));
        }
        snapshot.drops.sort_unstable();
        Ok(snapshot)
    }
}

/// The kernel's flow tables, their counters, and what userspace removed
/// from them.
pub struct FlowTables {
    half_open: HashMap<MapData, FlowKey, Flow>,
    flows: HashMap<MapData, FlowKey, Flow>,
    stats: PerCpuArray<MapData, u64>,
    user_deletes: [u64; 2],
    evictions: [u64; 2],
}

impl std::fmt::Debug for FlowTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTables").finish_non_exhaustive()
    }
}

/// The two flow tables, for metrics labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    HalfOpen = 0,
    Flows = 1,
}

impl Table {
    pub const ALL: [Self; 2] = [Self::HalfOpen, Self::Flows];

    pub const fn name(self) -> &'static str {
        match self {
            Self::HalfOpen => "half_open",
            Self::Flows => "flows",
        }
    }
}

/// What one pass over the flow tables found.
#[derive(Clone, Debug, Default)]
pub struct Sweep {
    /// Handshakes the sweep decided (timed out, or established and idle);
    /// removed from the tables.
    pub decided: Vec<Flow>,
    /// Handshakes still in the tables.
    pub live: Vec<Flow>,
    /// How many of them each [`Table`] holds.
    pub entries: [u64; 2],
}

/// Kernel-side counters of the flow tables, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub events_dropped: u64,
    pub insert_failures: u64,
    /// TLS hello records lost to a full ring buffer.
    pub tls_events_dropped: u64,
    /// TLS pending-table inserts the kernel refused.
    pub tls_pending_failures: u64,
    /// State changes the state tracepoint could not note: its table was
    /// full.
    pub sock_ages_full: u64,
    /// Socket-layer handshakes lost to a full ring buffer.
    pub sock_events_dropped: u64,
    pub synack_retransmits_kernel: u64,
    /// Dropped packets `kfree_skb` could not parse, and handshake drops
    /// its full table could not count.
    pub drop_parse_failures: u64,
    pub handshake_drops_full: u64,
    /// LRU evictions per [`Table`], derived (see [`FlowTables::sweep`]).
    pub evictions: [u64; 2],
}

impl FlowTables {
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        let hash = |ebpf: &mut Ebpf, name: &'static str| {
            let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
            HashMap::try_from(map).map_err(|source| LoadError::Map { name, source })
        };
        Ok(Self {
            half_open: hash(ebpf, names::HALF_OPEN)?,
            flows: hash(ebpf, names::FLOWS)?,
            stats: take(ebpf, names::FLOW_STATS)?,
            user_deletes: [0; 2],
            evictions: [0; 2],
        })
    }

    fn stat(&self, which: FlowStat) -> Result<u64, MapError> {
        sum(&self.stats, which as u32)
    }

    pub fn stats(&self) -> Result<FlowStats, MapError> {
        Ok(FlowStats {
            events_dropped: self.stat(FlowStat::EventsDropped)?,
            insert_failures: self.stat(FlowStat::InsertFailures)?,
            tls_events_dropped: self.stat(FlowStat::TlsEventsDropped)?,
            tls_pending_failures: self.stat(FlowStat::TlsPendingFailures)?,
            sock_ages_full: self.stat(FlowStat::SockAgesFull)?,
            sock_events_dropped: self.stat(FlowStat::SockEventsDropped)?,
            synack_retransmits_kernel: self.stat(FlowStat::SynAckRetransmits)?,
            drop_parse_failures: self.stat(FlowStat::DropParseFailures)?,
            handshake_drops_full: self.stat(FlowStat::HandshakeDropsFull)?,
            evictions: self.evictions,
        })
    }

    /// Walks both tables: removes and returns the handshakes `expire`
    /// decides, lists the rest, and updates the eviction counts.
    ///
    /// An LRU map evicts silently, so evictions are derived: inserts minus
    /// deletes (the kernel's and ours) minus live entries. Inserts are read
    /// before the walk and deletes after it, so activity during the walk
    /// can only make the figure too low, never invent an eviction; the
    /// exported count is the highest figure seen, exact when traffic pauses.
    pub fn sweep(&mut self, expire: impl Fn(&Flow) -> Option<Flow>) -> Result<Sweep, MapError> {
        let inserts = [
            self.stat(FlowStat::HalfOpenInserts)?,
            self.stat(FlowStat::FlowsInserts)?,
        ];
        let mut sweep = Sweep::default();
        let mut live = [0u64; 2];
        for table in Table::ALL {
            let map = match table {
                Table::HalfOpen => &mut self.half_open,
                Table::Flows => &mut self.flows,
            };
            // Collect first: deleting while walking restarts the walk.
            let entries: Vec<(FlowKey, Flow)> = map.iter().filter_map(Result::ok).collect();
            for (key, flow) in entries {
                match expire(&flow) {
                    // Whoever deletes the entry reports it: if the kernel
                    // got there first, it has already sent the event.
                    Some(decided) => {
                        if map.remove(&key).is_ok() {
                            self.user_deletes[table as usize] += 1;
                            sweep.decided.push(decided);
                        }
                    }
                    None => {
                        live[table as usize] += 1;
                        sweep.live.push(flow);
                    }
                }
            }
        }
        let kernel_deletes = [
            self.stat(FlowStat::HalfOpenDeletes)?,
            self.stat(FlowStat::FlowsDeletes)?,
        ];
        for table in Table::ALL {
            let t = table as usize;
            let gone = kernel_deletes[t] + self.user_deletes[t] + live[t];
            let estimate = inserts[t].saturating_sub(gone);
            self.evictions[t] = self.evictions[t].max(estimate);
        }
        sweep.entries = live;
        Ok(sweep)
    }
}

/// The TLS capture's pending table and its "may hold entries" flag.
pub struct TlsMaps {
    pending: HashMap<MapData, TlsKey, TlsPending>,
    active: Array<MapData, u32>,
}

impl std::fmt::Debug for TlsMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaps").finish_non_exhaustive()
    }
}

/// A pending capture older than this is given up (its hello will not
/// complete, or the client never sent another record).
const TLS_PENDING_TIMEOUT_NS: u64 = 10_000_000_000;

impl TlsMaps {
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        let map = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
        };
        Ok(Self {
            pending: HashMap::try_from(map(ebpf, names::TLS_PENDING)?).map_err(|source| {
                LoadError::Map {
                    name: names::TLS_PENDING,
                    source,
                }
            })?,
            active: Array::try_from(map(ebpf, names::TLS_ACTIVE)?).map_err(|source| {
                LoadError::Map {
                    name: names::TLS_ACTIVE,
                    source,
                }
            })?,
        })
    }

    /// Gives up stale captures and, when none is left, lets the hooks skip
    /// the table again. The flag is cleared before the table is checked,
    /// and set again if it is not empty, so a capture the hooks start
    /// meanwhile always leaves the flag set.
    pub fn maintain(&mut self, now_ns: u64) -> Result<(), MapError> {
        let stale: Vec<TlsKey> = self
            .pending
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, p)| now_ns.saturating_sub(p.ts_ns) >= TLS_PENDING_TIMEOUT_NS)
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            let _ = self.pending.remove(key);
        }
        if self.active.get(&0, 0)? == 0 {
            return Ok(());
        }
        self.active.set(0, &0, 0)?;
        if self.pending.keys().next().is_some() {
            self.active.set(0, &1, 0)?;
        }
        Ok(())
    }
}
